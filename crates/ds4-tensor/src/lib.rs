//! Shapes, element types, host tensors and the GGUF container: the ground floor of ds4-rs.
//!
//! This crate owns the vocabulary every other crate speaks: [`DType`] (the ggml type table,
//! with block sizes), [`Shape`] (dimension order documented below), [`HostTensor`] (bytes that
//! are either owned or borrowed zero-copy from a memory-mapped file) and the [`gguf`] reader
//! and writer. It will also hold the one `Backend` trait of model-level operations that the
//! CPU, CUDA and Metal backends implement (see [`backend`]).
//!
//! It deliberately knows nothing about how a block format is decoded (that is `ds4-quant`),
//! about layers or routing (`ds4-model`), or about devices.
//!
//! # Dimension order
//!
//! GGUF lists dimensions innermost first: `ne[0]` is the contiguous one. [`Shape`] stores
//! them in that GGUF order, because that is what the file says and what the byte-size
//! formulas use. Shape *comments* in this code base are row-major, outermost first, as numpy
//! prints them: a GGUF weight with `ne = [4096, 1024]` is written `// [1024, 4096]` (1024 rows
//! of 4096 values), and [`Shape::numpy`] returns that order.
//!
//! Modules, in reading order: [`dtype`], [`shape`], [`tensor`], [`gguf`], [`backend`].

#![warn(missing_docs)]

pub mod alloc;
pub mod backend;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod shape;
pub mod tensor;

pub use dtype::DType;
pub use error::{Error, Result};
pub use shape::Shape;
pub use tensor::{HostTensor, TensorBytes};
