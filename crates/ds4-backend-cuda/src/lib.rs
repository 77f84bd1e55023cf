//! The CUDA backend: DeepSeek V4 model-level operations on NVIDIA GPUs.
//!
//! This crate will implement `ds4-tensor`'s `Backend` trait with CUDA C++ kernels from
//! `kernels/cuda/`, compiled at run time by NVRTC and loaded through `cudarc` with dynamic
//! loading, so the crate builds on machines without a CUDA toolkit. It sees only
//! `ds4-tensor` and `ds4-quant`; no CUDA type appears above it.
//!
//! Status: not implemented yet (the CUDA issue). [`probe`] reports that plainly instead of
//! pretending to run.

#![warn(missing_docs)]

/// Why the CUDA backend cannot be used in this build.
pub fn probe() -> Result<(), String> {
    Err("CUDA backend unavailable: not implemented in this build yet".to_string())
}
