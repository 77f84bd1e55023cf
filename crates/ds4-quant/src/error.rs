//! The error type of ds4-quant.
//!
//! The scalar format functions (`q2_k::dequantize`, `q8_0::dot`, ...) take typed slices and
//! treat mismatched lengths as a caller bug (they panic with a message). The byte-level entry
//! points in [`crate::row`] work on untrusted bytes and report every problem as an [`Error`].

use ds4_tensor::DType;

/// Errors of the quantization layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A byte or value count is not a whole number of blocks of the type.
    #[error("{dtype:?}: {len} {unit} is not a whole number of {block}-{unit} blocks")]
    NotWholeBlocks {
        /// The element or block type.
        dtype: DType,
        /// The length that was given.
        len: usize,
        /// The block size in the same unit.
        block: usize,
        /// `"bytes"` or `"values"`.
        unit: &'static str,
    },
    /// The operation is not implemented for this type.
    #[error("{op} is not supported for {dtype:?}")]
    Unsupported {
        /// The element or block type.
        dtype: DType,
        /// The operation, e.g. `"quantize"`.
        op: &'static str,
    },
    /// The output slice has the wrong length for the input.
    #[error("output length mismatch: expected {expected} values, got {got}")]
    OutputLength {
        /// The length the input implies.
        expected: usize,
        /// The length of the output that was given.
        got: usize,
    },
    /// The importance vector does not fit the data (it must hold one weight per column of
    /// whole rows of the input).
    #[error("importance vector of {got} values does not fit {len} values")]
    ImportanceLength {
        /// Length of the importance vector.
        got: usize,
        /// Length of the data.
        len: usize,
    },
    /// An input value the quantizer does not accept (NaN, infinite, or beyond the magnitude
    /// it supports).
    #[error("{dtype:?} quantize: {what} {value:e} at index {index} is outside the supported range")]
    InputRange {
        /// The target type.
        dtype: DType,
        /// `"value"` or `"importance"`.
        what: &'static str,
        /// Index of the first offending value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// An error from the tensor layer.
    #[error(transparent)]
    Tensor(#[from] ds4_tensor::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
