//! Opening the disk KV cache of `ds4` run/chat, and what the CLI prints about it.
//!
//! The flags are `ds4_kvcache::cli::KvCacheArgs`, the same definition `ds4-server` uses
//! (names, defaults and ranges of KVCACHE.md s10); the cache itself is
//! `ds4_kvcache::DiskCache`, the same implementation the server uses: before a prompt the
//! longest stored prefix is restored, long prompts get cold and continued checkpoints,
//! `/clear` (or a new unrelated conversation) saves the live session first, and a clean exit
//! (EOF, `/quit`, Ctrl+C) saves it last.

use std::sync::Arc;

use anyhow::{Context, Result};
use ds4_kvcache::{CacheStats, DiskCache, DiskCacheConfig, KvCacheArgs, Prepared};
use ds4_model::Engine;

/// The cache configuration of the flags, or `None` without `--kv-disk-dir`; a bad value is
/// a usage error (exit 2).
pub fn config(args: &KvCacheArgs) -> Result<Option<DiskCacheConfig>> {
    args.config()
        .map_err(|e| crate::run::UsageError(e.to_string()).into())
}

/// Opens the cache for `engine`'s model, if `--kv-disk-dir` is set.
pub fn open(args: &KvCacheArgs, engine: &Engine) -> Result<Option<DiskCache>> {
    let Some(cfg) = config(args)? else {
        return Ok(None);
    };
    let tok = engine.tokenizer()?.clone();
    let cache = DiskCache::open(
        &cfg,
        ds4_kvcache::model_identity(&engine.model),
        tok,
        Arc::new(|m: &str| eprintln!("ds4: kv cache: {m}")),
    )
    .with_context(|| format!("opening the disk KV cache {}", cfg.dir.display()))?;
    let n = cache.store().entries().map(|e| e.len()).unwrap_or(0);
    eprintln!(
        "ds4: kv cache: {} ({n} checkpoints, budget {} MiB)",
        cfg.dir.display(),
        cfg.space_mb
    );
    Ok(Some(cache))
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// One stderr line on what the cache did before a generation.
pub fn print_prepared(p: &Prepared, prompt_len: usize) {
    let mut parts = Vec::new();
    if let Some(n) = p.evicted {
        parts.push(format!("saved the previous conversation ({n} tokens)"));
    }
    match &p.restored {
        Some(r) => parts.push(format!(
            "restored {} of {prompt_len} prompt tokens from disk ({:.1} MB in {:.3} s)",
            r.n_tokens,
            mb(r.file_bytes),
            r.secs
        )),
        None => parts.push("no stored prefix".to_string()),
    }
    for (reason, n) in &p.saves {
        parts.push(format!("{} save at {n} tokens", reason_name(*reason)));
    }
    eprintln!("ds4: kv cache: {}", parts.join("; "));
}

fn reason_name(r: ds4_kvcache::SaveReason) -> &'static str {
    use ds4_kvcache::SaveReason::*;
    match r {
        Cold => "cold",
        Continued => "continued",
        Evict => "evict",
        Shutdown => "shutdown",
        Unknown => "other",
    }
}

/// The statistics line printed at exit.
pub fn print_stats(s: &CacheStats, shutdown_saved: Option<usize>) {
    let at_exit = match shutdown_saved {
        Some(n) => format!("saved {n} tokens at exit; "),
        None => String::new(),
    };
    eprintln!(
        "ds4: kv cache: {at_exit}hits {}, misses {}, reused {} tokens, {} checkpoints written ({} failed), \
         snapshot pause max {:.1} ms, disk {:.1} of {:.0} MiB",
        s.hits,
        s.misses,
        s.reused_tokens,
        s.saves_written,
        s.saves_failed,
        s.snapshot_us_max as f64 / 1000.0,
        s.disk_bytes as f64 / 1048576.0,
        s.budget_bytes as f64 / 1048576.0,
    );
}
