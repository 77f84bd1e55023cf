//! Session state snapshots and the crash-safe, space-capped disk KV cache.
//!
//! This crate owns the on-disk format of saved sessions (magic, version, checksums, model
//! identity), the in-memory index of stored prefixes and the eviction policy. It knows the
//! model's state layout through `ds4-model` and nothing of HTTP.
//!
//! Status: not implemented yet (the KV cache issue).

#![warn(missing_docs)]
