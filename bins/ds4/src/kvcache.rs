//! The disk KV cache flags of `ds4` run/chat and what the CLI prints about the cache.
//!
//! The flags and defaults are `ds4-server`'s (KVCACHE.md s10); the cache itself is
//! `ds4_kvcache::DiskCache`, the same implementation the server uses: before a prompt the
//! longest stored prefix is restored, long prompts get cold and continued checkpoints,
//! `/clear` (or a new unrelated conversation) saves the live session first, and a clean exit
//! (EOF, `/quit`, Ctrl+C) saves it last.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use ds4_kvcache::{CacheStats, DiskCache, DiskCacheConfig, Policy, Prepared};
use ds4_model::Engine;

/// `--kv-disk-dir` and the `--kv-cache-*` policy knobs.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Disk KV cache")]
pub struct KvCacheArgs {
    /// Save prompt states (KV cache checkpoints) in DIR and restore the longest saved
    /// prefix of later prompts from it, also across runs: a long prompt seen before
    /// costs a file read instead of a prefill. Off when unset. With -p the session is also
    /// saved at exit (end of the answer or Ctrl+C); in the chat, /clear, /ctx and leaving
    /// (/quit, Ctrl+D) save the conversation first. Files are checksummed and tagged with
    /// the model; a file of another model is never used.
    #[arg(long = "kv-disk-dir", value_name = "DIR")]
    pub kv_disk_dir: Option<PathBuf>,
    /// Space budget of --kv-disk-dir in MiB: a hard cap, the least useful checkpoints are
    /// evicted (score: tokens saved per byte, weighted by recent hits).
    #[arg(long = "kv-disk-space-mb", value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_disk_space_mb: u64,
    /// Never save or restore checkpoints shorter than N tokens.
    #[arg(long = "kv-cache-min-tokens", value_name = "N", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_min_tokens: u64,
    /// Cold save: after the first prefill of a prompt with no cached prefix, store its
    /// stable part (up to the last user turn, or the prompt minus the trim, aligned) when
    /// the prompt has at most N tokens; 0 disables. Restored checkpoints longer than N are
    /// deleted once a longer checkpoint of the same conversation is on disk.
    #[arg(
        long = "kv-cache-cold-max-tokens",
        value_name = "N",
        default_value_t = 30000
    )]
    pub kv_cache_cold_max_tokens: u64,
    /// Continued saves: a checkpoint every ~N tokens of a long prompt or answer, at absolute
    /// positions rounded up to the alignment (10000 -> every 10240); 0 disables.
    #[arg(
        long = "kv-cache-continued-interval-tokens",
        value_name = "N",
        default_value_t = 10000
    )]
    pub kv_cache_continued_interval_tokens: u64,
    /// Tokens left out at the end of cold saves (the tail whose tokenization may change when
    /// text is appended).
    #[arg(
        long = "kv-cache-boundary-trim-tokens",
        value_name = "N",
        default_value_t = 32
    )]
    pub kv_cache_boundary_trim_tokens: u64,
    /// Cold and continued checkpoint lengths are multiples of N (0: no alignment).
    #[arg(
        long = "kv-cache-boundary-align-tokens",
        value_name = "N",
        default_value_t = 2048
    )]
    pub kv_cache_boundary_align_tokens: u64,
    /// Only restore checkpoints written with the same weight types (by default a checkpoint
    /// of the 2-bit model is used by the 4-bit one and vice versa, as in ds4).
    #[arg(long = "kv-cache-reject-different-quant")]
    pub kv_cache_reject_different_quant: bool,
}

impl KvCacheArgs {
    /// The cache configuration, or `None` without `--kv-disk-dir`.
    pub fn config(&self) -> Result<Option<DiskCacheConfig>> {
        let Some(dir) = &self.kv_disk_dir else {
            return Ok(None);
        };
        let policy = Policy {
            min_tokens: self.kv_cache_min_tokens as usize,
            cold_max_tokens: self.kv_cache_cold_max_tokens as usize,
            continued_interval_tokens: self.kv_cache_continued_interval_tokens as usize,
            boundary_trim_tokens: self.kv_cache_boundary_trim_tokens as usize,
            boundary_align_tokens: self.kv_cache_boundary_align_tokens as usize,
            reject_different_quant: self.kv_cache_reject_different_quant,
        };
        policy
            .validate()
            .map_err(|e| crate::run::UsageError(format!("--kv-cache-*: {e}")))?;
        Ok(Some(DiskCacheConfig {
            space_mb: self.kv_disk_space_mb,
            policy,
            ..DiskCacheConfig::new(dir.clone())
        }))
    }

    /// Opens the cache for `engine`'s model, if `--kv-disk-dir` is set.
    pub fn open(&self, engine: &Engine) -> Result<Option<DiskCache>> {
        let Some(cfg) = self.config()? else {
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
