//! The error type of ds4-tensor.

/// Errors of the tensor layer: GGUF parsing and validation, and shape checks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file is not a usable GGUF file; `what` says exactly why and where.
    #[error("invalid GGUF file: {what}")]
    InvalidGguf {
        /// What is wrong, naming the key, tensor or offset.
        what: String,
    },
    /// The file does not start with `"GGUF"`.
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The GGUF version is not one this reader supports.
    #[error("unsupported GGUF version {version:#x}: {why}")]
    UnsupportedVersion {
        /// The version field as read (little-endian).
        version: u32,
        /// Why it is refused.
        why: String,
    },
    /// A tensor has a ggml type id this engine does not support (or a removed one).
    #[error("tensor {tensor}: unsupported ggml type id {id}")]
    UnknownDType {
        /// The tensor name.
        tensor: String,
        /// The type id.
        id: u32,
    },
    /// A metadata key occurs twice.
    #[error("metadata key {key}: duplicated")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A tensor name occurs twice.
    #[error("tensor {name}: duplicated")]
    DuplicateTensor {
        /// The tensor name.
        name: String,
    },
    /// A metadata value has the right type but an unusable value.
    #[error("metadata key {key}: {what}")]
    KeyValue {
        /// The key.
        key: String,
        /// What is wrong with the value.
        what: String,
    },
    /// A metadata key is missing.
    #[error("metadata key {key}: missing")]
    MissingKey {
        /// The key.
        key: String,
    },
    /// A metadata key has another type than the one asked for.
    #[error("metadata key {key}: expected {expected}, found {found}")]
    KeyType {
        /// The key.
        key: String,
        /// The expected value type.
        expected: String,
        /// The value type found.
        found: String,
    },
    /// A tensor is missing.
    #[error("tensor {name}: missing")]
    MissingTensor {
        /// The tensor name.
        name: String,
    },
    /// A tensor has another shape than expected.
    #[error("tensor {name}: expected shape {expected:?}, got {got:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// Expected GGUF-order dims.
        expected: Vec<u64>,
        /// Actual GGUF-order dims.
        got: Vec<u64>,
    },
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
