//! The CUDA backend: DeepSeek V4 model-level operations on NVIDIA GPUs.
//!
//! [`CudaBackend`] implements `ds4-tensor`'s `Backend` trait with CUDA C++ kernels from
//! `kernels/cuda/`, compiled at run time by NVRTC for the device's architecture
//! ([`kernels`]) and launched through `cudarc` with dynamic loading, so the crate builds on
//! machines without a CUDA toolkit and [`probe()`] reports a missing driver, device or NVRTC
//! as an error instead of a panic. It sees only `ds4-tensor` and `ds4-quant`; no CUDA type
//! appears above it. docs/CUDA.md has the design, the status (what has and has not run on
//! a GPU) and how to test it on the borrowed GPU machine.

#![warn(missing_docs)]

pub mod error;
pub mod kernels;
pub mod probe;

pub use error::{CudaError, CudaResult};
pub use probe::{DeviceInfo, probe};
pub mod backend;

pub use backend::CudaBackend;
