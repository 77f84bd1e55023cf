//! The server's side of the disk KV cache: a thin adapter over
//! [`ds4_kvcache::DiskCache`], which holds the whole policy (lookup and restore, the cold,
//! continued, evict and shutdown saves) and is shared with the `ds4` CLI.
//!
//! What stays here is what only the server needs: opening the cache with its log prefix,
//! and the counters `/metrics` exposes (rendered by [`crate::metrics::render_kv`]).

use std::sync::Arc;

pub use ds4_kvcache::{DiskCache, DiskCacheConfig};
use ds4_model::Model;
use ds4_model::tokenizer::Tokenizer;

/// Counters of the disk cache, for `/metrics`.
pub type KvStats = ds4_kvcache::CacheStats;

/// Errors opening the disk cache.
pub type DiskCacheError = ds4_kvcache::Error;

/// Opens the disk cache for `model` (its identity tags every entry); warnings go to stderr
/// with the server's prefix.
pub fn open(
    cfg: &DiskCacheConfig,
    model: &Model,
    tok: Arc<Tokenizer>,
) -> Result<DiskCache, DiskCacheError> {
    DiskCache::open(
        cfg,
        ds4_kvcache::model_identity(model),
        tok,
        Arc::new(|m: &str| eprintln!("ds4-server: kv cache: {m}")),
    )
}
