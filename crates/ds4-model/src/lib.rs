//! The DeepSeek V4 model: configuration, weights, routing and the forward pass.
//!
//! This crate reads the model shape from GGUF metadata or a Hugging Face `config.json`,
//! validates it in one place, binds weights by their ds4 GGUF names (zero copy from the
//! memory map), and runs the forward pass once, written against the `Backend` trait of
//! `ds4-tensor`. Its public API is deliberately small so other Rust programs can embed it:
//! load a model, open a session, feed tokens, read logits.
//!
//! It deliberately knows nothing about devices beyond the trait (the CUDA and Metal crates
//! implement it), nor about HTTP or session files (`ds4-api`, `ds4-kvcache`).
//!
//! Modules, in reading order:
//! - [`config`]: the model shape from GGUF metadata or `config.json`, validated once;
//! - [`weights`]: every tensor bound by its GGUF name; [`checkpoint`] and [`gguf`] feed it;
//! - [`hub_quant`]: FP8/FP4 dequantization of the official hub checkpoint's tensors;
//! - [`numerics`]: RoPE/YaRN frequencies, FP8/FP4 simulation, Hadamard, top-k;
//! - [`state`]: per-layer decoding state (raw ring, compressor frontiers, compressed rows);
//! - [`forward`]: the forward pass, once, against `ds4_tensor::backend::Backend`;
//! - [`cpu`]: the CPU backend (the correctness oracle);
//! - [`device`]: picking the backend at load (CPU, or CUDA with the weights uploaded);
//! - [`session`]: [`Model`] and [`Session`], the public engine boundary.
//!
//! ```no_run
//! use ds4_model::{LoadOptions, Model, Session};
//! let model = Model::load("tiny/".as_ref(), &LoadOptions::default())?;
//! let mut session = Session::new(&model, 4096);
//! session.feed(&[0, 42, 7])?;
//! let next = session.logits()?;
//! # Ok::<(), ds4_model::Error>(())
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod cpu;
pub mod device;
pub mod error;
pub mod forward;
pub mod gguf;
pub mod hub_quant;
pub mod numerics;
mod rng;
pub mod session;
pub mod state;
pub mod synthetic;
pub mod weights;

pub use config::Config;
pub use engine::Engine;
pub use error::{Error, Result};
pub use session::{LoadOptions, Model, Session, SessionState};

pub mod chat;
pub mod demo;
pub mod dsml;
pub mod engine;
pub mod generate;
pub mod sampling;
pub mod tokenizer;
pub mod toolforce;
