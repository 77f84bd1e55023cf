//! The error type of ds4-model.

use ds4_tensor::backend::BackendError;

/// Errors of model loading and evaluation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration key is missing, has the wrong type, or violates a shape constraint.
    #[error("config {key}: {what}")]
    Config {
        /// The metadata or `config.json` key (or derived quantity) at fault.
        key: String,
        /// What is wrong with it.
        what: String,
    },
    /// A weight is missing, or has the wrong shape or type.
    #[error("tensor {name}: {what}")]
    Tensor {
        /// The GGUF name of the tensor.
        name: String,
        /// What is wrong with it.
        what: String,
    },
    /// The model file or directory is not usable.
    #[error("model {path}: {what}")]
    Load {
        /// The path given to the loader.
        path: String,
        /// Why it cannot be loaded.
        what: String,
    },
    /// A token id outside the vocabulary.
    #[error("token id {token} out of range (vocabulary size {n_vocab})")]
    TokenOutOfRange {
        /// The offending id.
        token: u32,
        /// The vocabulary size.
        n_vocab: usize,
    },
    /// Feeding more tokens than the session context holds.
    #[error("context full: {n_past} tokens cached + {n_new} new > context {n_ctx}")]
    ContextFull {
        /// Tokens already in the session.
        n_past: usize,
        /// Tokens being fed.
        n_new: usize,
        /// The session's context size.
        n_ctx: usize,
    },
    /// Asking for logits before any token was fed.
    #[error("no logits: no token has been evaluated yet")]
    NoLogits,
    /// An error of the tensor layer (GGUF parsing).
    #[error(transparent)]
    TensorLayer(#[from] ds4_tensor::Error),
    /// A backend failure.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The tokenizer could not be built or used.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// Text was needed but the model came without a tokenizer.
    #[error(
        "model {model} has no tokenizer (no tokenizer.ggml.* metadata in the GGUF, no tokenizer.json next to the checkpoint); token ids work, text does not"
    )]
    NoTokenizer {
        /// The model path or name.
        model: String,
    },
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn config_err(key: &str, what: impl Into<String>) -> Error {
    Error::Config {
        key: key.to_string(),
        what: what.into(),
    }
}

pub(crate) fn tensor_err(name: &str, what: impl Into<String>) -> Error {
    Error::Tensor {
        name: name.to_string(),
        what: what.into(),
    }
}
