//! The Metal backend: DeepSeek V4 model-level operations on Apple GPUs.
//!
//! This crate will implement `ds4-tensor`'s `Backend` trait with Metal shaders from
//! `kernels/metal/`, embedded with `include_str!`. It builds everywhere and compiles its
//! Metal code only on Apple targets. It sees only `ds4-tensor` and `ds4-quant`.
//!
//! Status: not implemented yet. [`probe`] reports that plainly instead of pretending to run.

#![warn(missing_docs)]

/// Why the Metal backend cannot be used in this build.
pub fn probe() -> Result<(), String> {
    Err("Metal backend unavailable: not implemented in this build yet".to_string())
}
