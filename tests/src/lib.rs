//! Helpers shared by the cross-crate tests: fixture paths and small readers.

#![warn(missing_docs)]

use std::path::PathBuf;

/// The directory of committed fixtures (`tests/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}
