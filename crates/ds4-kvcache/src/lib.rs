//! Session state snapshots and the crash-safe, space-capped disk KV cache.
//!
//! A long prompt costs minutes of prefill; a saved state brings it back in a second. This
//! crate stores states in a directory keyed by the SHA-1 of the rendered text they
//! represent, finds the longest stored prefix of a new prompt, and decides (as ds4-server
//! does) when to save and what to evict. Unlike ds4 (KVCACHE.md s11) every file is
//! checksummed and tagged with the model's identity, saves are atomic and durable
//! (temp file, fsync, rename, directory fsync), the space budget is a hard cap that
//! includes files being written, and several processes can share one directory.
//!
//! The crate knows nothing of HTTP: [`manager::DiskCache`] is the engine-facing cache that
//! both `ds4-server` and the `ds4` CLI drive (lookup and restore before a prefill, the cold,
//! continued, evict and shutdown saves, statistics), built on the pure [`policy`] functions,
//! the [`store`] and the background [`writer`]. The store sees the model's state only as
//! named byte sections ([`payload`]), with one impl for `ds4_model::SessionState`
//! ([`session`]); [`identity`] tags every entry with the model that wrote it.
//!
//! Modules, in reading order:
//! * [`payload`]: the state as named byte sections;
//! * [`format`](mod@format): the versioned file format (docs/KVCACHE_FORMAT.md);
//! * [`policy`]: ds4's save moments, lengths and eviction score, as pure functions;
//! * [`store`]: the directory, its index, lookup, load, save and eviction;
//! * [`writer`]: the background save thread;
//! * [`session`]: `SessionState` as a payload;
//! * [`identity`]: the model identity of a loaded model;
//! * [`manager`]: the cache as an engine uses it (server and CLI);
//! * [`accounting`]: bytes per token of the state, per layer type;
//! * `cli` (feature `cli`): the `--kv-disk-dir`/`--kv-cache-*` flags of both binaries.

#![warn(missing_docs)]

pub mod accounting;
#[cfg(feature = "cli")]
pub mod cli;
pub mod error;
pub mod format;
pub mod identity;
pub mod manager;
pub mod payload;
pub mod policy;
pub mod session;
pub mod store;
pub mod writer;

#[cfg(feature = "cli")]
pub use cli::KvCacheArgs;
pub use error::{Error, Result};
pub use format::{ModelIdentity, SaveReason};
pub use identity::model_identity;
pub use manager::{CacheStats, DiskCache, DiskCacheConfig, LogFn, Prepared, Restored};
pub use payload::{FromSections, OwnedSection, Payload, Section, Sections};
pub use policy::{Frontier, Policy};
pub use store::{
    EntryInfo, Hit, Key, Loaded, SaveOutcome, SaveRequest, Store, StoreConfig, key_of,
};
pub use writer::{SaveJob, Ticket, Writer};
