//! The disk KV cache as the engine uses it: lookup and restore before a prefill, and the
//! save moments (cold, continued, evict, shutdown) of ds4-server.
//!
//! The store keys entries on text; the key text of a token prefix is the concatenation of
//! its token pieces (`Tokenizer::decode`), so the text of a prefix is a byte prefix of the
//! text of the whole prompt. A restored entry is only used when its tokens are a token
//! prefix of the prompt too (two token sequences may decode to the same bytes).
//!
//! Saves of prompt prefixes (cold and continued) need the state at an exact position, so
//! the engine prefills up to each save point itself, snapshots, hands the snapshot to the
//! background [`Writer`], and lets the generation loop prefill the rest. Writes never stall
//! generation: a full writer queue drops the save (it is an optimization).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ds4_kvcache::{
    Frontier, ModelIdentity, Policy, SaveJob, SaveReason, Store, StoreConfig, Writer,
};
use ds4_model::generate::{GenOptions, PrefixCache};
use ds4_model::tokenizer::Tokenizer;
use ds4_model::{Model, Session, SessionState};

/// How to open the disk cache (`--kv-disk-dir`, `--kv-disk-space-mb`, `--kv-cache-*`).
#[derive(Debug, Clone)]
pub struct DiskCacheConfig {
    /// The cache directory (created if missing).
    pub dir: PathBuf,
    /// Space budget in MiB.
    pub space_mb: u64,
    /// Save moments and lengths.
    pub policy: Policy,
}

/// Counters of the disk cache, for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct KvStats {
    /// Requests whose prefix was restored from disk.
    pub hits: u64,
    /// Requests that found neither a live nor a stored prefix.
    pub misses: u64,
    /// Tokens restored from disk instead of prefilled.
    pub reused_tokens: u64,
    /// Bytes the cache directory holds.
    pub disk_bytes: u64,
    /// The space budget in bytes.
    pub budget_bytes: u64,
}

/// Errors opening the disk cache.
pub type DiskCacheError = ds4_kvcache::Error;

/// The model identity stored in every entry: the config (shapes, ratios, vocabulary size)
/// decides the state layout; the weight types decide its numbers.
pub fn identity_of(model: &Model) -> ModelIdentity {
    let shape = format!("{:?}", model.config());
    let w = model.weights();
    let mut types = format!("{:?} {:?}", w.token_embd.dtype, w.output.dtype);
    for l in &w.layers {
        types.push_str(&format!(
            " {:?} {:?} {:?} {:?}",
            l.attn_q_a.dtype, l.attn_q_b.dtype, l.attn_kv.dtype, l.attn_output_b.dtype
        ));
    }
    ModelIdentity::from_bytes(shape.as_bytes(), types.as_bytes())
}

/// The open disk cache of one engine.
#[derive(Debug)]
pub struct DiskCache {
    store: Arc<Store>,
    writer: Mutex<Option<Writer>>,
    policy: Policy,
    user: u32,
    assistant: u32,
    hits: AtomicU64,
    misses: AtomicU64,
    reused: AtomicU64,
}

/// What [`DiskCache::before_generate`] did to the session.
#[derive(Debug, Default, Clone, Copy)]
pub struct Prepared {
    /// Prompt tokens the engine prefilled itself (to save at exact positions); the
    /// generation loop reports them as cached, the engine moves them back to prefilled.
    pub prefed: usize,
}

impl DiskCache {
    /// Opens (and indexes) the store and starts its writer.
    pub fn open(
        cfg: &DiskCacheConfig,
        identity: ModelIdentity,
        tok: &Tokenizer,
    ) -> Result<DiskCache, DiskCacheError> {
        let mut sc = StoreConfig::new(&cfg.dir, identity).with_space_mb(cfg.space_mb);
        sc.policy = cfg.policy.clone();
        let store = Arc::new(Store::open(sc)?);
        let writer = Writer::spawn(store.clone(), 2)?;
        let sp = tok.specials();
        Ok(DiskCache {
            store,
            writer: Mutex::new(Some(writer)),
            policy: cfg.policy.clone(),
            user: sp.user,
            assistant: sp.assistant,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            reused: AtomicU64::new(0),
        })
    }

    /// Current counters.
    pub fn stats(&self) -> KvStats {
        KvStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            reused_tokens: self.reused.load(Ordering::Relaxed),
            disk_bytes: self.store.usage_bytes().unwrap_or(0),
            budget_bytes: self.store.config().budget_bytes,
        }
    }

    /// Queues a save of `state` (whose tokens are `tokens`); never blocks unless `wait`.
    fn save(
        &self,
        tok: &Tokenizer,
        state: SessionState,
        tokens: &[u32],
        n_ctx: usize,
        reason: SaveReason,
        wait: bool,
    ) {
        let Ok(text) = tok.decode(tokens) else {
            return;
        };
        let job = SaveJob {
            text,
            tokens: tokens.to_vec(),
            ctx_size: n_ctx,
            reason,
            payload: Box::new(state),
        };
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = guard.as_ref() else { return };
        if wait {
            match w.submit_wait(job).map(|t| t.wait()) {
                Ok(Ok(_)) => {}
                Ok(Err(e)) | Err(e) => eprintln!("ds4-server: kv cache: {reason:?} save: {e}"),
            }
        } else if w.submit(job).is_err() {
            eprintln!("ds4-server: kv cache: writer busy, {reason:?} save skipped");
        }
    }

    /// Before a generation of `prompt`: evict-save a live session the prompt replaces,
    /// restore the longest stored prefix when it beats what the session holds, and prefill
    /// up to the cold and continued save points, saving at each.
    #[allow(clippy::too_many_arguments)]
    pub fn before_generate(
        &self,
        tok: &Tokenizer,
        session: &mut Session<'static>,
        cache: &mut PrefixCache,
        frontier: &mut Frontier,
        prompt: &[u32],
        opts: &GenOptions,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Prepared, ds4_model::Error> {
        let n_ctx = session.n_ctx();
        let held = session.tokens();
        let common = held.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let session_prefix = common == held.len();
        let snap_prefix = cache
            .tokens()
            .filter(|t| prompt.starts_with(t))
            .map_or(0, <[u32]>::len);
        // Another conversation replaces the live one: keep it on disk first.
        if !session_prefix
            && common < self.policy.min_tokens
            && snap_prefix == 0
            && let Some(n) = self.policy.evict_target(held.len())
        {
            let tokens = held[..n].to_vec();
            self.save(
                tok,
                session.snapshot(),
                &tokens,
                n_ctx,
                SaveReason::Evict,
                false,
            );
        }
        let live_reuse = if session_prefix {
            held.len()
        } else {
            snap_prefix
        };

        let mut hit = false;
        if let Ok(text) = tok.decode(prompt) {
            let better = match self.store.lookup(&text, n_ctx) {
                Ok(Some(h)) => h.entry.n_tokens as usize > live_reuse,
                Ok(None) => false,
                Err(e) => {
                    eprintln!("ds4-server: kv cache lookup: {e}");
                    false
                }
            };
            if better {
                match self.store.lookup_load::<SessionState>(&text, n_ctx) {
                    Ok(Some(l))
                        if l.tokens.len() > live_reuse
                            && l.tokens.len() <= n_ctx
                            && prompt.starts_with(&l.tokens)
                            && l.state.tokens == l.tokens =>
                    {
                        session.restore(&l.state);
                        cache.clear();
                        frontier.reset();
                        frontier.note(l.tokens.len());
                        hit = true;
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        self.reused
                            .fetch_add(l.tokens.len() as u64, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("ds4-server: kv cache load: {e}"),
                }
            }
        }
        if !hit && live_reuse == 0 {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }

        // Prefill to the save points only when the session continues from its own state
        // (a prefix-cache snapshot restore is left to the generation loop).
        let session_prefix = prompt.starts_with(session.tokens());
        if !session_prefix {
            if snap_prefix > 0 {
                return Ok(Prepared::default());
            }
            session.reset();
            cache.clear();
            frontier.reset();
        }
        let start = session.n_past();
        let mut targets = Vec::new();
        if !hit
            && start == 0
            && let Some(t) = self.policy.cold_target(prompt, self.user, self.assistant)
        {
            targets.push((t, SaveReason::Cold));
        }
        let step = self.policy.continued_step();
        if let Some(q) = start.max(frontier.last).checked_div(step) {
            let mut m = (q + 1) * step;
            while m <= prompt.len() {
                if let Some(t) = self.policy.continued_target(m, frontier) {
                    targets.push((t, SaveReason::Continued));
                }
                m += step;
            }
        }
        targets.retain(|&(t, _)| t > start && t <= prompt.len() && t <= n_ctx);
        targets.sort_by_key(|&(t, _)| t);
        targets.dedup_by_key(|&mut (t, _)| t);
        let cancelled = || {
            opts.cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
        };
        for (t, reason) in targets {
            if cancelled() {
                break;
            }
            let from = session.n_past();
            session.feed(&prompt[from..t])?;
            on_progress(t - start, prompt.len() - start);
            self.save(tok, session.snapshot(), &prompt[..t], n_ctx, reason, false);
            frontier.note(t);
        }
        Ok(Prepared {
            prefed: session.n_past() - start,
        })
    }

    /// The shutdown save of the live session, then drains the writer (blocking).
    pub fn shutdown(&self, tok: &Tokenizer, session: &Session<'static>) {
        if let Some(n) = self.policy.shutdown_target(session.n_past()) {
            let tokens = session.tokens()[..n].to_vec();
            self.save(
                tok,
                session.snapshot(),
                &tokens,
                session.n_ctx(),
                SaveReason::Shutdown,
                true,
            );
        }
        if let Some(w) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            w.finish();
        }
    }
}
