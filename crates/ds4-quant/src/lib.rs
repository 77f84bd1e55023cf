//! Quantized block formats for DeepSeek V4 Flash weights and activations.
//!
//! Each format module defines its block layout plus a scalar `dequantize` and `dot` that
//! *define* the format (FORMATS.md s2). The scalar code is the specification: the SIMD paths
//! in [`simd`] and the GPU kernels under `kernels/` are tested against it. The quantizers the
//! converter needs live beside their format. This crate knows nothing about devices, layers
//! or files.
//!
//! Modules, in reading order:
//! - [`blocks`]: the `#[repr(C)]` block structs with compile-time size checks;
//! - [`tables`]: the IQ2_XXS lattice constants;
//! - [`f16`](mod@f16), [`q8_0`], [`q2_k`], [`q4_k`], [`iq2_xxs`], [`q8_k`]: one module per format
//!   (dequantize, quantize, scalar dot);
//! - [`iq2_xxs_quantize`]: the IQ2_XXS quantizer (lattice search tables, llama.cpp-identical);
//! - [`row`]: dispatch on a [`ds4_tensor::DType`] for whole rows of raw bytes;
//! - [`simd`]: AVX2/AVX-512/NEON dot kernels with runtime feature detection;
//! - [`gemv`]: multi-threaded matrix x vector and matrix x small batch.

#![warn(missing_docs)]

pub mod blocks;
pub mod tables;

pub mod error;
pub mod f16;
pub mod gemv;
pub mod iq2_xxs;
pub mod iq2_xxs_quantize;
mod kquant;
pub mod q2_k;
pub mod q4_k;
pub mod q8_0;
pub mod q8_k;
pub mod row;
pub mod simd;

pub use blocks::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, QK_K, QK8_0};
pub use error::{Error, Result};
