//! The crate's error type.
//!
//! Format errors ([`Error::Corrupt`] and friends) say what is wrong with the bytes; the store
//! wraps them in [`Error::BadFile`] with the path, after it has deleted the file, so a caller
//! can log one line and carry on with a cold prefill.

use std::path::PathBuf;

/// Errors of the KV cache store and its file format.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file does not start with the format's magic bytes.
    #[error("not a ds4-rs kv cache file (bad magic)")]
    BadMagic,
    /// The file was written by another version of the format.
    #[error("unsupported kv cache format version {found} (this build reads {expected})")]
    UnsupportedVersion {
        /// Version found in the file.
        found: u32,
        /// Version this build reads and writes.
        expected: u32,
    },
    /// The bytes end before a structure they announce.
    #[error("truncated kv cache file: {what} needs {needed} bytes, {available} available")]
    Truncated {
        /// Which part is cut short.
        what: &'static str,
        /// Bytes the part needs (counted from the start of the file).
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// A CRC-32 does not match the bytes it covers.
    #[error("kv cache checksum mismatch in {what}: stored {stored:08x}, computed {computed:08x}")]
    Checksum {
        /// Header, section table, or the name of a section.
        what: String,
        /// Checksum recorded in the file.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
    /// The structure is inconsistent (overlapping sections, bad names, wrong counts, ...).
    #[error("corrupt kv cache file: {reason}")]
    Corrupt {
        /// What is inconsistent.
        reason: String,
    },
    /// The file was written by a model of another shape (its state would not fit).
    #[error(
        "kv cache file is from another model (shape id {found:016x}, expected {expected:016x})"
    )]
    ModelMismatch {
        /// Shape id of the running model.
        expected: u64,
        /// Shape id recorded in the file.
        found: u64,
    },
    /// The file was written with other weight types and the policy rejects that.
    #[error(
        "kv cache file is from other weights (weights id {found:016x}, expected {expected:016x})"
    )]
    WeightsMismatch {
        /// Weights id of the running model.
        expected: u64,
        /// Weights id recorded in the file.
        found: u64,
    },
    /// The stored text does not hash to the file's key or is not the requested prefix.
    #[error("kv cache key text does not match: {reason}")]
    KeyMismatch {
        /// What differs.
        reason: &'static str,
    },
    /// A bad file was found; it has been deleted (or was already gone).
    #[error("kv cache file {}: {source} (file deleted)", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        #[source]
        source: Box<Error>,
    },
    /// The entry is larger than the whole space budget, so it is never written.
    #[error("kv cache entry of {bytes} bytes does not fit the budget of {budget} bytes")]
    TooLarge {
        /// Size the file would have, plus headroom.
        bytes: u64,
        /// The directory budget.
        budget: u64,
    },
    /// Eviction could not free enough space (files of other processes in flight).
    #[error("kv cache directory is full: need {needed} bytes, {free} free after eviction")]
    NoSpace {
        /// Bytes the new file needs.
        needed: u64,
        /// Bytes free after evicting every evictable entry.
        free: u64,
    },
    /// No entry with this key is stored.
    #[error("no kv cache entry {key}")]
    NotFound {
        /// The hex key.
        key: String,
    },
    /// A request or configuration value is out of range.
    #[error("invalid kv cache request: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// The payload sections do not form a valid state.
    #[error("kv cache payload: {reason}")]
    Payload {
        /// What is wrong.
        reason: String,
    },
    /// The background writer has stopped.
    #[error("kv cache writer thread is gone")]
    WriterGone,
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Whether this error means the file's bytes are bad (so the file should be removed),
    /// as opposed to an I/O failure or a valid file that belongs to someone else.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::BadMagic
                | Error::UnsupportedVersion { .. }
                | Error::Truncated { .. }
                | Error::Checksum { .. }
                | Error::Corrupt { .. }
                | Error::KeyMismatch { .. }
        )
    }
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
