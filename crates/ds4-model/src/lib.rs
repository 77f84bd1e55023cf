//! The DeepSeek V4 model: configuration, weights, routing and the forward pass.
//!
//! This crate reads the model shape from GGUF metadata or a Hugging Face `config.json`,
//! validates it in one place, binds weights by their ds4 GGUF names (zero copy from the
//! memory map), and runs the forward pass once, written against the `Backend` trait of
//! `ds4-tensor`. Its public API is deliberately small so other Rust programs can embed it:
//! load a model, open a session, feed tokens, read logits.
//!
//! Status: being built (the model issue).

#![warn(missing_docs)]
