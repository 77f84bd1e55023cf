//! The [`Engine`] trait: what the HTTP layer needs from inference, and [`ModelEngine`],
//! its real implementation over `ds4_model::generate`.
//!
//! The trait is deliberately narrow: tokenize a rendered prompt (called from request
//! handlers, in parallel) and run one generation (called only from the one worker
//! thread, so an implementation may hold its live session behind a mutex without
//! contention). Events and results reuse `ds4_model::generate`'s types, so there is one
//! generation loop in the project; this crate only projects its events onto the wire.

use std::sync::{Arc, Mutex};

use ds4_model::chat::{Prompt, Segment, Trust};
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
    /// Tokens of the live session and their decoded bytes, as of the last generation
    /// (read by [`Engine::tokenize`] without waiting for the running generation).
    live_view: Mutex<Arc<(Vec<u32>, Vec<u8>)>>,
    prefill_chunk: usize,
    disk: Option<DiskCache>,
}

struct Live {
    session: Session<'static>,
    cache: PrefixCache,
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
                crate::kvdisk::open(cfg, &engine.model, tok.clone())
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
            }),
            live_tokens: std::sync::atomic::AtomicUsize::new(0),
            live_view: Mutex::new(Arc::new((Vec::new(), Vec::new()))),
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
        let canonical = prompt
            .tokenize(&self.tok, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let view = self
            .live_view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(reuse_live_prefix(
            &self.tok, prompt, canonical, &view.0, &view.1,
        ))
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
        let Live { session, cache } = &mut *live;
        let mut opts = opts.clone();
        opts.prefill_chunk = self.prefill_chunk;
        let prepared = match &self.disk {
            Some(d) => d.before_generate(
                session,
                Some(cache),
                prompt,
                opts.cancel.as_deref(),
                on_progress,
            ),
            None => Ok(Default::default()),
        };
        let disk = self.disk.as_ref();
        let res = prepared.and_then(|p| {
            generate::generate_observed(
                session,
                &self.tok,
                prompt,
                &opts,
                Some(cache),
                on_progress,
                on_event,
                // Continued saves at aligned frontiers while decoding.
                &mut |s| {
                    if let Some(d) = disk {
                        d.after_token(s);
                    }
                },
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
        let held = session.tokens().to_vec();
        let text = self.tok.decode(&held).unwrap_or_default();
        *self.live_view.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new((held, text));
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
            d.shutdown(&live.session);
        }
    }
}

/// Tokens for `prompt` that keep the live session's tokens when the prompt's text
/// extends the session's text (PROMPT.md §1.7, the BPE boundary rule): the model's
/// sampled tokens are not always the canonical tokenization of their text, so a client
/// resending the conversation re-renders the same bytes (exact DSML replay) but
/// tokenizing them afresh would diverge from the KV state inside the last answer. Then
/// the live tokens are kept and only the text after them is tokenized, segment by
/// segment with each segment's own special-token mode. Invalid UTF-8 in the live text
/// matches the U+FFFD the API replaced it with.
///
/// Safety (GAP-T1): beyond the longest common token prefix with the canonical
/// tokenization, the reused region must lie in template or model text (where special
/// literals are control tokens anyway), never in user, system or tool-result text;
/// otherwise, or when the texts differ, the canonical tokens are returned.
pub fn reuse_live_prefix(
    tok: &Tokenizer,
    prompt: &Prompt,
    canonical: Vec<u32>,
    live: &[u32],
    live_text: &[u8],
) -> Vec<u32> {
    let k = live
        .iter()
        .zip(&canonical)
        .take_while(|(a, b)| a == b)
        .count();
    if live.is_empty() || k == live.len() {
        return canonical;
    }
    let text = prompt.to_text();
    // The API sent invalid UTF-8 the model produced as U+FFFD (GAP-T2), and clients send
    // that back: compare the way the text left the server. The KV keeps the real bytes.
    let live_lossy = String::from_utf8_lossy(live_text);
    let n = live_lossy.len();
    if !text.starts_with(live_lossy.as_ref()) {
        return canonical;
    }
    let Ok(agreed) = tok.decode(&canonical[..k]) else {
        return canonical;
    };
    let from = agreed.len();
    let mut suffix: Vec<(&str, bool)> = Vec::new();
    let mut at = 0usize;
    for seg in &prompt.segments {
        let (piece, special, trust) = match seg {
            Segment::Special(lit) => (*lit, true, Trust::Template),
            Segment::Text { text, trust } => (text.as_str(), *trust != Trust::Untrusted, *trust),
        };
        let (start, end) = (at, at + piece.len());
        at = end;
        if end > from && start < n && trust == Trust::Untrusted {
            return canonical;
        }
        if end <= n {
            continue;
        }
        if start >= n {
            suffix.push((piece, special));
        } else if matches!(seg, Segment::Special(_)) {
            // The live text ends inside a control token's literal.
            return canonical;
        } else {
            suffix.push((&piece[n - start..], special));
        }
    }
    let mut out = live.to_vec();
    out.extend(tok.encode_parts(suffix));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_model::tokenizer::{ASSISTANT_TEXT, EOS_TEXT, THINK_END_TEXT, USER_TEXT};

    fn prompt(parts: &[(Option<&'static str>, &str, Trust)]) -> Prompt {
        Prompt {
            segments: parts
                .iter()
                .map(|(sp, text, trust)| match sp {
                    Some(lit) => Segment::Special(lit),
                    None => Segment::Text {
                        text: text.to_string(),
                        trust: *trust,
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn live_tokens_are_kept_when_the_prompt_extends_their_text() {
        let tok = ds4_model::demo::tokenizer().expect("tokenizer");
        let u = Trust::Untrusted;
        let m = Trust::Model;
        let turn1 = [
            (None, "Be brief.", u),
            (Some(USER_TEXT), "", u),
            (None, "Say hello", u),
            (Some(ASSISTANT_TEXT), "", u),
            (Some(THINK_END_TEXT), "", u),
        ];
        let p1 = prompt(&turn1);
        let mut live = p1.tokenize(&tok, false).expect("tokens");
        // The model wrote "Hello world" as non-canonical pieces.
        for piece in ["Hel", "lo", " wor", "ld"] {
            live.extend(tok.encode(piece, false));
        }
        let live_text = tok.decode(&live).expect("decode");
        let mut turn2 = turn1.to_vec();
        turn2.extend([
            (None, "Hello world", m),
            (Some(EOS_TEXT), "", u),
            (Some(USER_TEXT), "", u),
            (None, "Again <｜User｜>", u),
            (Some(ASSISTANT_TEXT), "", u),
            (Some(THINK_END_TEXT), "", u),
        ]);
        let p2 = prompt(&turn2);
        let canonical = p2.tokenize(&tok, false).expect("tokens");
        assert!(
            !canonical.starts_with(&live),
            "the test needs divergent tokens"
        );
        let ids = reuse_live_prefix(&tok, &p2, canonical.clone(), &live, &live_text);
        assert!(ids.starts_with(&live));
        assert_eq!(tok.decode(&ids).expect("decode"), p2.to_text().as_bytes());
        // The user's special literal after the reused prefix stays plain text.
        let user = tok.specials().user;
        assert_eq!(
            ids.iter().filter(|&&t| t == user).count(),
            canonical.iter().filter(|&&t| t == user).count()
        );

        // The divergent region is user text: never reused (could smuggle control tokens).
        let mut turn2u = turn1.to_vec();
        turn2u[2] = (None, "Say hello", u);
        turn2u.push((None, "Hello world", u));
        let p2u = prompt(&turn2u);
        let canon_u = p2u.tokenize(&tok, false).expect("tokens");
        assert_eq!(
            reuse_live_prefix(&tok, &p2u, canon_u.clone(), &live, &live_text),
            canon_u
        );
        // Invalid UTF-8 the model wrote comes back from the client as U+FFFD.
        let c3 = (0..tok.n_vocab() as u32)
            .find(|&id| tok.token_to_piece(id) == Some(&[0xC3][..]))
            .expect("byte token 0xC3");
        let mut live_bad = p1.tokenize(&tok, false).expect("tokens");
        live_bad.push(c3);
        live_bad.extend(tok.encode("x", false));
        let bad_text = tok.decode(&live_bad).expect("decode");
        assert!(std::str::from_utf8(&bad_text).is_err());
        let mut turn2b = turn1.to_vec();
        turn2b.extend([(None, "\u{FFFD}x", m), (Some(EOS_TEXT), "", u)]);
        let p2b = prompt(&turn2b);
        let canon_b = p2b.tokenize(&tok, false).expect("tokens");
        let ids = reuse_live_prefix(&tok, &p2b, canon_b, &live_bad, &bad_text);
        assert!(ids.starts_with(&live_bad));
        assert_eq!(ids.len(), live_bad.len() + 1);

        // Different text: canonical.
        let other = prompt(&[(None, "Something else", u)]);
        let canon_o = other.tokenize(&tok, false).expect("tokens");
        assert_eq!(
            reuse_live_prefix(&tok, &other, canon_o.clone(), &live, &live_text),
            canon_o
        );
    }
}
