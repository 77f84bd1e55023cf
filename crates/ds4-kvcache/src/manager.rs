//! The disk KV cache as an engine uses it: one implementation for `ds4-server` and the `ds4`
//! CLI (KVCACHE.md s4.2 and s5).
//!
//! [`DiskCache`] owns the [`Store`], its background [`Writer`] and the policy state of the
//! one live session (the continued-save frontier, a consumed entry waiting for its
//! successor). The engine calls it at four moments:
//!
//! 1. [`DiskCache::before_generate`], before each generation of a prompt: an **evict** save
//!    of a live session the prompt replaces; **restore** of the longest stored prefix when it
//!    beats what the session already holds; then the session is prefilled up to each **cold**
//!    and **continued** save point of the prompt and snapshotted there;
//! 2. [`DiskCache::after_token`], after every generated token is fed: a **continued** save
//!    when the live length reaches an aligned frontier;
//! 3. [`DiskCache::evict`], when the engine drops the session itself (`/clear`, a new
//!    context size);
//! 4. [`DiskCache::shutdown`], on a clean exit: the **shutdown** save, then the writer drains.
//!
//! Keys are text: the key text of a token prefix is the concatenation of its token pieces
//! (`Tokenizer::decode`), so the text of a prefix is a byte prefix of the text of the whole
//! prompt. A restored entry is used only when its tokens are a token prefix of the prompt too
//! (two token sequences may decode to the same bytes). Every save copies the state (the
//! snapshot, the only time the engine waits) and hands it to the writer thread; a full queue
//! drops the save, since the cache is an optimization and must not stall generation.
//!
//! Nothing here knows HTTP: the server reads [`CacheStats`] for `/metrics`, the CLI prints
//! [`Prepared`] and the stats on stderr.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ds4_model::generate::PrefixCache;
use ds4_model::tokenizer::Tokenizer;
use ds4_model::{Session, SessionState};

use crate::error::Result;
use crate::format::{ModelIdentity, SaveReason};
use crate::policy::{Frontier, Policy};
use crate::store::{Key, SaveOutcome, Store, StoreConfig};
use crate::writer::{SaveJob, Ticket, Writer};

/// Receives the cache's warnings and notices (one line each, without a prefix).
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// How to open the disk cache (`--kv-disk-dir`, `--kv-disk-space-mb`, `--kv-cache-*`).
#[derive(Debug, Clone)]
pub struct DiskCacheConfig {
    /// The cache directory (created if missing).
    pub dir: PathBuf,
    /// Space budget in MiB.
    pub space_mb: u64,
    /// Save moments and lengths.
    pub policy: Policy,
    /// `fsync` every saved file and the directory (default true).
    pub fsync: bool,
}

impl DiskCacheConfig {
    /// ds4's defaults: 4096 MiB, the default policy, fsync on.
    pub fn new(dir: impl Into<PathBuf>) -> DiskCacheConfig {
        DiskCacheConfig {
            dir: dir.into(),
            space_mb: 4096,
            policy: Policy::default(),
            fsync: true,
        }
    }
}

/// Counters of the disk cache (for `/metrics` and the CLI's statistics line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Generations whose prefix was restored from disk.
    pub hits: u64,
    /// Generations that found neither a live nor a stored prefix.
    pub misses: u64,
    /// Tokens restored from disk instead of prefilled.
    pub reused_tokens: u64,
    /// Saves handed to the writer.
    pub saves_queued: u64,
    /// Saves the writer finished with a new file.
    pub saves_written: u64,
    /// Saves dropped (writer queue full) or failed.
    pub saves_failed: u64,
    /// Bytes the cache directory holds.
    pub disk_bytes: u64,
    /// The space budget in bytes.
    pub budget_bytes: u64,
    /// Snapshots taken for saves (each one pauses the engine for a state copy).
    pub snapshots: u64,
    /// Total time the engine spent in save snapshots (copy, key text, submit), microseconds.
    pub snapshot_us_total: u64,
    /// The longest such pause, microseconds.
    pub snapshot_us_max: u64,
}

/// A restore from disk done by [`DiskCache::before_generate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Restored {
    /// Tokens of the restored state.
    pub n_tokens: usize,
    /// Size of the file read.
    pub file_bytes: u64,
    /// Seconds the lookup, read, verification and swap took.
    pub secs: f64,
}

/// What [`DiskCache::before_generate`] did to the session.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Prepared {
    /// Prompt tokens prefilled here to stop at save points; the generation loop then sees
    /// them as already in the session, so the engine counts them back as prefilled work.
    pub prefed: usize,
    /// The prefix restored from disk, if any.
    pub restored: Option<Restored>,
    /// Tokens of the replaced live session queued for an evict save.
    pub evicted: Option<usize>,
    /// Saves queued at prompt positions (cold and continued), in order.
    pub saves: Vec<(SaveReason, usize)>,
}

#[derive(Debug, Default)]
struct LiveState {
    /// The continued-save schedule of the live conversation.
    frontier: Frontier,
    /// A restored entry longer than `cold_max_tokens` and its tokens: removed once a save
    /// extending it is durable (ds4 deletes it right after loading, KVCACHE.md s11.13).
    consume: Option<(Key, Vec<u32>)>,
    /// Saves in flight, reaped for the counters and warnings.
    pending: Vec<(SaveReason, usize, Ticket)>,
}

/// The open disk cache of one engine and its one live session.
pub struct DiskCache {
    store: Arc<Store>,
    writer: Mutex<Option<Writer>>,
    policy: Policy,
    tok: Arc<Tokenizer>,
    user: u32,
    assistant: u32,
    live: Mutex<LiveState>,
    log: LogFn,
    /// Whether the shutdown save already ran.
    closed: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    reused: AtomicU64,
    saves_queued: AtomicU64,
    saves_written: AtomicU64,
    saves_failed: AtomicU64,
    snapshots: AtomicU64,
    snapshot_us_total: AtomicU64,
    snapshot_us_max: AtomicU64,
}

impl std::fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskCache")
            .field("dir", &self.store.dir())
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain counters and queues: still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DiskCache {
    /// Opens (and indexes) the store under `identity` and starts its writer. `log` gets
    /// warnings (bad files deleted, failed saves).
    pub fn open(
        cfg: &DiskCacheConfig,
        identity: ModelIdentity,
        tok: Arc<Tokenizer>,
        log: LogFn,
    ) -> Result<DiskCache> {
        let mut sc = StoreConfig::new(&cfg.dir, identity).with_space_mb(cfg.space_mb);
        sc.policy = cfg.policy.clone();
        sc.fsync = cfg.fsync;
        let warn = log.clone();
        let store = Arc::new(Store::open_with_warn(sc, Box::new(move |m: &str| warn(m)))?);
        let writer = Writer::spawn(store.clone(), 2)?;
        let sp = tok.specials();
        Ok(DiskCache {
            store,
            writer: Mutex::new(Some(writer)),
            policy: cfg.policy.clone(),
            user: sp.user,
            assistant: sp.assistant,
            tok,
            live: Mutex::new(LiveState::default()),
            log,
            closed: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            saves_queued: AtomicU64::new(0),
            saves_written: AtomicU64::new(0),
            saves_failed: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            snapshot_us_total: AtomicU64::new(0),
            snapshot_us_max: AtomicU64::new(0),
        })
    }

    /// The store (for inspection and tests).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Current counters (reaps finished saves first; reads the directory usage).
    pub fn stats(&self) -> CacheStats {
        self.reap(&mut lock(&self.live), false);
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            reused_tokens: self.reused.load(Ordering::Relaxed),
            saves_queued: self.saves_queued.load(Ordering::Relaxed),
            saves_written: self.saves_written.load(Ordering::Relaxed),
            saves_failed: self.saves_failed.load(Ordering::Relaxed),
            disk_bytes: self.store.usage_bytes().unwrap_or(0),
            budget_bytes: self.store.config().budget_bytes,
            snapshots: self.snapshots.load(Ordering::Relaxed),
            snapshot_us_total: self.snapshot_us_total.load(Ordering::Relaxed),
            snapshot_us_max: self.snapshot_us_max.load(Ordering::Relaxed),
        }
    }

    /// Collects finished saves (all of them, waiting, with `wait`).
    fn reap(&self, live: &mut LiveState, wait: bool) {
        let pending = std::mem::take(&mut live.pending);
        for (reason, n, ticket) in pending {
            let result = if wait {
                Some(ticket.wait())
            } else {
                match ticket.try_result() {
                    Some(r) => Some(r),
                    None => {
                        live.pending.push((reason, n, ticket));
                        None
                    }
                }
            };
            match result {
                None => {}
                Some(Ok(SaveOutcome::Written { .. })) => {
                    self.saves_written.fetch_add(1, Ordering::Relaxed);
                }
                Some(Ok(SaveOutcome::AlreadyStored { .. })) => {}
                Some(Err(e)) => {
                    self.saves_failed.fetch_add(1, Ordering::Relaxed);
                    (self.log)(&format!("{reason:?} save of {n} tokens failed: {e}"));
                }
            }
        }
    }

    /// Snapshots `session` (whose first `n` tokens are saved; `n` must be its length) and
    /// queues the save; blocks for room only with `wait`. Returns whether it was queued.
    fn save(
        &self,
        live: &mut LiveState,
        session: &Session<'_>,
        reason: SaveReason,
        wait: bool,
    ) -> bool {
        self.reap(live, false);
        let t0 = Instant::now();
        let tokens = session.tokens().to_vec();
        let Ok(text) = self.tok.decode(&tokens) else {
            return false;
        };
        let state: SessionState = session.snapshot();
        let supersedes = match &live.consume {
            Some((key, t)) if tokens.len() > t.len() && tokens.starts_with(t) => {
                let key = *key;
                live.consume = None;
                Some(key)
            }
            _ => None,
        };
        let n = tokens.len();
        let job = SaveJob {
            text,
            tokens,
            ctx_size: session.n_ctx(),
            reason,
            payload: Box::new(state),
            supersedes,
        };
        let guard = lock(&self.writer);
        let Some(w) = guard.as_ref() else {
            return false;
        };
        let queued = if wait {
            match w.submit_wait(job) {
                Ok(t) => Some(t),
                Err(e) => {
                    (self.log)(&format!("{reason:?} save: {e}"));
                    None
                }
            }
        } else {
            w.submit(job).ok()
        };
        drop(guard);
        let us = t0.elapsed().as_micros() as u64;
        self.snapshots.fetch_add(1, Ordering::Relaxed);
        self.snapshot_us_total.fetch_add(us, Ordering::Relaxed);
        self.snapshot_us_max.fetch_max(us, Ordering::Relaxed);
        match queued {
            Some(t) => {
                self.saves_queued.fetch_add(1, Ordering::Relaxed);
                live.pending.push((reason, n, t));
                true
            }
            None => {
                self.saves_failed.fetch_add(1, Ordering::Relaxed);
                if !wait {
                    (self.log)(&format!(
                        "writer busy, {reason:?} save of {n} tokens skipped"
                    ));
                }
                false
            }
        }
    }

    /// Before a generation of `prompt` in `session`: evict-save a live session the prompt
    /// replaces, restore the longest stored prefix when it beats what the session (or the
    /// optional prompt snapshot `prefix`) holds, and prefill up to the cold and continued
    /// save points of the prompt, saving at each. `cancel` stops between save points;
    /// `on_progress(done, total)` reports the prefill done here.
    pub fn before_generate(
        &self,
        session: &mut Session<'_>,
        mut prefix: Option<&mut PrefixCache>,
        prompt: &[u32],
        cancel: Option<&AtomicBool>,
        on_progress: &mut dyn FnMut(usize, usize),
    ) -> std::result::Result<Prepared, ds4_model::Error> {
        let mut live = lock(&self.live);
        let mut prepared = Prepared::default();
        let n_ctx = session.n_ctx();
        let held_len = session.n_past();
        let common = session
            .tokens()
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let session_prefix = common == held_len;
        let snap_prefix = prefix
            .as_deref()
            .and_then(PrefixCache::tokens)
            .filter(|t| prompt.starts_with(t))
            .map_or(0, <[u32]>::len);
        // Another conversation replaces the live one: keep it on disk first.
        if !session_prefix && common < self.policy.min_tokens && snap_prefix == 0 {
            if let Some(n) = self.policy.evict_target(held_len)
                && self.save(&mut live, session, SaveReason::Evict, false)
            {
                prepared.evicted = Some(n);
            }
            live.frontier.reset();
            live.consume = None;
        }
        let live_reuse = if session_prefix {
            held_len
        } else {
            snap_prefix
        };

        let t0 = Instant::now();
        let mut hit = false;
        if let Ok(text) = self.tok.decode(prompt) {
            let better = match self.store.lookup(&text, n_ctx) {
                Ok(Some(h)) => h.entry.n_tokens as usize > live_reuse,
                Ok(None) => false,
                Err(e) => {
                    (self.log)(&format!("lookup: {e}"));
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
                        let n = l.tokens.len();
                        session.restore_owned(l.state);
                        if let Some(c) = prefix.as_deref_mut() {
                            c.clear();
                        }
                        live.frontier.reset();
                        live.frontier.note(n);
                        live.consume = self
                            .policy
                            .consume_after_load(n)
                            .then_some((l.entry.key, l.tokens));
                        hit = true;
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        self.reused.fetch_add(n as u64, Ordering::Relaxed);
                        prepared.restored = Some(Restored {
                            n_tokens: n,
                            file_bytes: l.entry.file_bytes,
                            secs: t0.elapsed().as_secs_f64(),
                        });
                    }
                    Ok(_) => {}
                    Err(e) => (self.log)(&format!("load: {e}")),
                }
            }
        }
        if !hit && live_reuse == 0 {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }

        // Prefill to the save points only when the session continues from its own state
        // (a prompt-snapshot restore is left to the generation loop).
        if !prompt.starts_with(session.tokens()) {
            if snap_prefix > 0 {
                return Ok(prepared);
            }
            session.reset();
            if let Some(c) = prefix {
                c.clear();
            }
            live.frontier.reset();
            live.consume = None;
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
        if let Some(q) = start.max(live.frontier.last).checked_div(step) {
            let mut m = (q + 1) * step;
            while m <= prompt.len() {
                if let Some(t) = self.policy.continued_target(m, &live.frontier) {
                    targets.push((t, SaveReason::Continued));
                }
                m += step;
            }
        }
        targets.retain(|&(t, _)| t > start && t <= prompt.len() && t <= n_ctx);
        targets.sort_by_key(|&(t, _)| t);
        targets.dedup_by_key(|&mut (t, _)| t);
        for (t, reason) in targets {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                break;
            }
            let from = session.n_past();
            session.feed(&prompt[from..t])?;
            on_progress(t - start, prompt.len() - start);
            if self.save(&mut live, session, reason, false) {
                prepared.saves.push((reason, t));
            }
            live.frontier.note(t);
        }
        prepared.prefed = session.n_past() - start;
        Ok(prepared)
    }

    /// After a generated token was fed: a continued save when the live length reached an
    /// aligned frontier. Returns the pause it caused (the snapshot), if it saved.
    pub fn after_token(&self, session: &Session<'_>) -> Option<Duration> {
        let step = self.policy.continued_step();
        let n = session.n_past();
        if step == 0 || !n.is_multiple_of(step) {
            return None;
        }
        let mut live = lock(&self.live);
        self.policy.continued_target(n, &live.frontier)?;
        let t0 = Instant::now();
        self.save(&mut live, session, SaveReason::Continued, false);
        live.frontier.note(n);
        Some(t0.elapsed())
    }

    /// The engine is about to drop `session` itself (`/clear`, a new context): an evict
    /// save when it is long enough, and the live schedule is forgotten. Returns the tokens
    /// queued for saving.
    pub fn evict(&self, session: &Session<'_>) -> Option<usize> {
        let mut live = lock(&self.live);
        let n = self.policy.evict_target(session.n_past());
        let saved = n.filter(|_| self.save(&mut live, session, SaveReason::Evict, false));
        live.frontier.reset();
        live.consume = None;
        saved
    }

    /// The shutdown save of `session` (waiting for it), then drains the writer. Runs once;
    /// later calls do nothing. Returns the tokens saved.
    pub fn shutdown(&self, session: &Session<'_>) -> Option<usize> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return None;
        }
        let mut live = lock(&self.live);
        let saved = self
            .policy
            .shutdown_target(session.n_past())
            .filter(|_| self.save(&mut live, session, SaveReason::Shutdown, true));
        self.reap(&mut live, true);
        if let Some(w) = lock(&self.writer).take() {
            w.finish();
        }
        saved
    }
}
