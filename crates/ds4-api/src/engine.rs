//! The [`Engine`] trait: what the HTTP layer needs from inference, and [`ModelEngine`],
//! its real implementation over `ds4_model::generate`.
//!
//! The trait is deliberately narrow: tokenize a rendered prompt (called from request
//! handlers, in parallel) and run one generation (called only from the one worker
//! thread, so an implementation may hold its live session behind a mutex without
//! contention). Events and results reuse `ds4_model::generate`'s types, so there is one
//! generation loop in the project; this crate only projects its events onto the wire.

use std::sync::{Arc, Mutex};

use ds4_kvcache::Frontier;
use ds4_model::chat::Prompt;
use ds4_model::dsml::{self, ParseOptions};
use ds4_model::generate::{self, Event, GenOptions, Outcome, PrefixCache};
use ds4_model::tokenizer::Tokenizer;
use ds4_model::{Model, Session};

use crate::kvdisk::{DiskCache, DiskCacheConfig, KvStats};

/// Static facts about the loaded engine.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Display name of the model (GGUF `general.name`, or the demo's name).
    pub model_name: String,
    /// Context size of the session, in tokens.
    pub n_ctx: usize,
}

/// One finished generation: the loop's [`Outcome`] plus what the API needs besides it.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    /// The generation loop's result (texts, calls, usage, timings, finish reason).
    pub outcome: Outcome,
    /// Raw generated text (reasoning, markers and DSML included), lossily decoded.
    pub raw_text: String,
    /// Exact bytes of the tool-call block as sampled (for exact replay, PROMPT.md §2.10).
    pub tool_block: Option<String>,
}

/// Errors an engine reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The model layer failed (bad token, context full, backend error).
    #[error(transparent)]
    Model(#[from] ds4_model::Error),
    /// Tokenization failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The disk KV cache could not be opened.
    #[error("kv cache: {0}")]
    KvCache(String),
}

/// What the HTTP layer calls. `generate` is only ever called from the worker thread.
pub trait Engine: Send + Sync + 'static {
    /// Static facts (model name, context size).
    fn info(&self) -> EngineInfo;

    /// Token ids of a rendered prompt, with special-token literals in untrusted text kept
    /// as text.
    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError>;

    /// Runs one generation of `prompt` with `opts`; `on_progress(done, total)` during
    /// prefill, `on_event` for the output as it is produced.
    fn generate(
        &self,
        prompt: &[u32],
        opts: &GenOptions,
        on_progress: &mut dyn FnMut(usize, usize),
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation, EngineError>;

    /// Tokens currently held by the live session (for `/metrics` and `/health`).
    fn live_tokens(&self) -> usize;

    /// Disk KV cache counters, when a disk cache is configured.
    fn kv_stats(&self) -> Option<KvStats> {
        None
    }

    /// Graceful shutdown: persist what should outlive the process (the shutdown save of
    /// the disk KV cache). Called once, after the worker stopped taking jobs.
    fn shutdown(&self) {}
}

/// The real engine: a `ds4_model` model, its tokenizer and the one live session.
///
/// The model is deliberately leaked (`&'static`): the server keeps it for the life of
/// the process, and a `'static` borrow lets the session live next to it without a
/// self-referential struct.
pub struct ModelEngine {
    tok: Arc<Tokenizer>,
    name: String,
    n_ctx: usize,
    live: Mutex<Live>,
    live_tokens: std::sync::atomic::AtomicUsize,
    prefill_chunk: usize,
    disk: Option<DiskCache>,
}

struct Live {
    session: Session<'static>,
    cache: PrefixCache,
    frontier: Frontier,
}

impl std::fmt::Debug for ModelEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEngine")
            .field("name", &self.name)
            .field("n_ctx", &self.n_ctx)
            .finish()
    }
}

impl ModelEngine {
    /// Wraps a loaded `ds4_model::Engine` with one session of `n_ctx` tokens.
    pub fn new(engine: ds4_model::Engine, n_ctx: usize) -> Result<ModelEngine, EngineError> {
        ModelEngine::with_disk_cache(engine, n_ctx, None)
    }

    /// Like [`ModelEngine::new`], with the disk KV cache of `disk` (its store is opened and
    /// indexed here, tagged with the model's identity).
    pub fn with_disk_cache(
        engine: ds4_model::Engine,
        n_ctx: usize,
        disk: Option<&DiskCacheConfig>,
    ) -> Result<ModelEngine, EngineError> {
        let tok = engine.tokenizer()?.clone();
        let disk = match disk {
            Some(cfg) => Some(
                DiskCache::open(cfg, crate::kvdisk::identity_of(&engine.model), &tok)
                    .map_err(|e| EngineError::KvCache(e.to_string()))?,
            ),
            None => None,
        };
        let name = engine.name.clone();
        let model: &'static Model = &Box::leak(Box::new(engine)).model;
        Ok(ModelEngine {
            tok,
            name,
            n_ctx,
            live: Mutex::new(Live {
                session: Session::new(model, n_ctx),
                cache: PrefixCache::new(),
                frontier: Frontier::default(),
            }),
            live_tokens: std::sync::atomic::AtomicUsize::new(0),
            prefill_chunk: 256,
            disk,
        })
    }
}

impl Engine for ModelEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model_name: self.name.clone(),
            n_ctx: self.n_ctx,
        }
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        prompt
            .tokenize(&self.tok, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    fn generate(
        &self,
        prompt: &[u32],
        opts: &GenOptions,
        on_progress: &mut dyn FnMut(usize, usize),
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation, EngineError> {
        // A panic in a previous generation poisons the lock; the session is then reset
        // by the prefix check (its tokens no longer match), so recovering is safe.
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let Live {
            session,
            cache,
            frontier,
        } = &mut *live;
        let mut opts = opts.clone();
        opts.prefill_chunk = self.prefill_chunk;
        let prepared = match &self.disk {
            Some(d) => d.before_generate(
                &self.tok,
                session,
                cache,
                frontier,
                prompt,
                &opts,
                on_progress,
            ),
            None => Ok(Default::default()),
        };
        let res = prepared.and_then(|p| {
            generate::generate(
                session,
                &self.tok,
                prompt,
                &opts,
                Some(cache),
                on_progress,
                on_event,
            )
            .map(|mut o| {
                // Tokens prefilled to reach the save points were work of this request.
                o.usage.cached_tokens = o.usage.cached_tokens.saturating_sub(p.prefed);
                o.timings.prefill_tokens += p.prefed;
                o
            })
        });
        self.live_tokens
            .store(session.n_past(), std::sync::atomic::Ordering::Relaxed);
        let outcome = res?;
        let raw = self.tok.decode(&outcome.tokens).unwrap_or_default();
        let raw_text = String::from_utf8_lossy(&raw).into_owned();
        let tool_block = if outcome.tool_calls.is_empty() {
            None
        } else {
            dsml::parse_completion(
                &raw_text,
                ParseOptions {
                    thinking: opts.thinking,
                    tools: opts.tools,
                    accept_plain_xml: opts.accept_plain_xml,
                },
            )
            .ok()
            .and_then(|m| m.tool_block)
        };
        Ok(Generation {
            outcome,
            raw_text,
            tool_block,
        })
    }

    fn live_tokens(&self) -> usize {
        self.live_tokens.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn kv_stats(&self) -> Option<KvStats> {
        self.disk.as_ref().map(DiskCache::stats)
    }

    fn shutdown(&self) {
        if let Some(d) = &self.disk {
            let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            d.shutdown(&self.tok, &live.session);
        }
    }
}
