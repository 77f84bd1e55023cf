//! The generation loop shared by the `ds4` CLI and `ds4-server`: prompt tokens in,
//! a stream of typed [`Event`]s out.
//!
//! One call of [`generate`] does, in order (PROMPT.md §3, API.md §2.4/§3.5):
//! 1. **Prefix reuse.** If the session already holds a prefix of the prompt, only the
//!    suffix is fed. If the session diverged from the prompt, the snapshot kept in the
//!    [`PrefixCache`] (the state right after the previous prompt) is restored when it is a
//!    prefix; otherwise the session is reset and the whole prompt is fed.
//! 2. **Prefill** in chunks of [`GenOptions::prefill_chunk`] tokens, calling the progress
//!    callback after each chunk and checking the cancel flag between chunks.
//! 3. **Decoding** token by token: the sampler ([`crate::sampling`]) with the request's
//!    parameters, except greedy inside DSML markup when tools are active
//!    ([`crate::dsml::DsmlGreedyTracker`]); UTF-8 is stream-decoded; stop strings are
//!    searched in the raw text; the text is split into reasoning (up to `</think>` when
//!    the prompt ended with `<think>`) and content; with tools, content goes through the
//!    streaming DSML parser ([`crate::dsml::DsmlStream`]) which yields tool-call events
//!    and ends generation when the block closes. With [`GenOptions::force_tool_call`]
//!    (`tool_choice` required / named) a [`crate::toolforce::Forcer`] picks or restricts
//!    each token so that the output is a call of one of those tools.
//! 4. **Stop** on EOS (never emitted nor fed), `<｜User｜>`/`<｜Assistant｜>`/BOS
//!    (defensive), a stop string (text cut before it), a closed tool block, the token
//!    budget, a full context, or the cancel flag (checked before every token).
//!
//! Events arrive through a callback in generation order; the last one is always
//! [`Event::Done`]. The same information is returned as an [`Outcome`] (full texts,
//! generated ids, parsed calls) for callers that do not stream.
//!
//! API (stable; used by the CLI and the server):
//! - [`prompt_tokens`]: render chat messages and tokenize them (injection-safe);
//! - [`GenOptions`] (sampling, stop strings, budget, tools, thinking, cancel flag);
//! - [`PrefixCache`] (optional prompt snapshot for divergent prompts);
//! - [`generate`]`(session, tokenizer, prompt, opts, cache, on_progress, on_event)`, and
//!   [`generate_observed`] with a hook after each generated token is fed;
//! - [`Event`], [`FinishReason`], [`Usage`], [`Timings`], [`Outcome`].
//!
//! The session is fed every generated token except EOS (never fed) and the token that
//! completed a stop string or closed a tool block (the next turn's prompt supplies it), so
//! a following turn whose prompt extends the transcript reuses the session automatically.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::chat::{ChatMessage, ChatOptions, ThinkingMode, render};
use crate::dsml::{DsmlEvent, DsmlGreedyTracker, DsmlStream, ParsedToolCall};
use crate::error::{Error, Result};
use crate::sampling::{self, Sampler, SamplingParams, StopScanner};
use crate::session::{Session, SessionState};
use crate::tokenizer::{StreamDecoder, THINK_END_TEXT, THINK_TEXT, Tokenizer};
use crate::toolforce::{ForcedTool, Forcer};

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS was sampled.
    Eos,
    /// A stop string appeared in the output (the text is cut before it).
    StopString,
    /// The tool-call block closed.
    ToolCalls,
    /// The token budget ([`GenOptions::max_tokens`]) was used up.
    Length,
    /// The session's context is full.
    ContextFull,
    /// The cancel flag was set (Ctrl+C, client gone, shutdown).
    Cancelled,
    /// The model emitted `<｜User｜>`, `<｜Assistant｜>` or BOS (never happens with a
    /// correct prompt); stopped defensively.
    UnexpectedSpecial,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string: `stop`, `tool_calls` or `length`
    /// (a cancelled generation reports `stop`).
    pub fn openai(self) -> &'static str {
        match self {
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Length | FinishReason::ContextFull => "length",
            _ => "stop",
        }
    }
}

/// Token counts of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens that were already in the session (not recomputed).
    pub cached_tokens: usize,
    /// Generated tokens (reasoning included; EOS not counted).
    pub completion_tokens: usize,
    /// Generated tokens that belong to the reasoning (before `</think>`).
    pub reasoning_tokens: usize,
}

/// Wall-clock timings of one generation.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Tokens actually prefilled (prompt minus reused prefix).
    pub prefill_tokens: usize,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Tokens generated.
    pub decode_tokens: usize,
    /// Seconds spent generating (sampling + decode steps).
    pub decode_secs: f64,
}

impl Timings {
    /// Prefill tokens per second (0 when nothing was prefilled).
    pub fn prefill_tps(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill_secs)
    }

    /// Generated tokens per second.
    pub fn decode_tps(&self) -> f64 {
        rate(self.decode_tokens, self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if n == 0 || secs <= 0.0 {
        0.0
    } else {
        n as f64 / secs
    }
}

/// What [`generate`] reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Reasoning text (without the `<think>`/`</think>` markers).
    Reasoning(String),
    /// Visible answer text.
    Content(String),
    /// A tool call began (tools active): its position in the block and its name.
    ToolCallStart {
        /// Position of the call in the block, from 0.
        index: usize,
        /// Function name.
        name: String,
    },
    /// A fragment of a tool call's JSON arguments.
    ToolCallArgs {
        /// Position of the call in the block.
        index: usize,
        /// JSON text to append.
        delta: String,
    },
    /// A complete, validated tool call.
    ToolCall(ParsedToolCall),
    /// Generation ended; always the last event.
    Done {
        /// Why.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
        /// Timings.
        timings: Timings,
    },
}

/// Options of one [`generate`] call.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Sampling parameters (temperature 0 = greedy).
    pub sampling: SamplingParams,
    /// Stop strings (searched in the raw generated text).
    pub stop: Vec<String>,
    /// Most tokens to generate (reasoning included).
    pub max_tokens: usize,
    /// The prompt ended with `<think>`: the output starts with reasoning.
    pub thinking: bool,
    /// Tools are offered: parse DSML tool calls from the content and stop when the block
    /// closes.
    pub tools: bool,
    /// Sample greedily inside DSML markup (PROMPT.md §3.3). Only used with `tools`.
    pub dsml_greedy: bool,
    /// Accept plain-XML `<tool_calls>` blocks too (ds4 compatibility).
    pub accept_plain_xml: bool,
    /// Non-empty (with `tools`): the generation must call one of these tools
    /// (`tool_choice: "required"`, or one tool for a named choice); decoding is
    /// constrained by [`crate::toolforce::Forcer`].
    pub force_tool_call: Vec<ForcedTool>,
    /// Tokens per prefill step between progress reports and cancel checks.
    pub prefill_chunk: usize,
    /// Set it (from another thread or a signal handler) to stop at the next chunk/token.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenOptions {
    fn default() -> Self {
        Self {
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            max_tokens: 50_000,
            thinking: true,
            tools: false,
            dsml_greedy: true,
            accept_plain_xml: false,
            force_tool_call: Vec::new(),
            prefill_chunk: 256,
            cancel: None,
        }
    }
}

/// Keeps a snapshot of the session right after the last prompt, so that a next prompt
/// that shares it but not the generated tail (e.g. the server re-rendering history with
/// reasoning dropped) restarts from there instead of from scratch.
#[derive(Debug, Clone, Default)]
pub struct PrefixCache {
    snapshot: Option<SessionState>,
}

impl PrefixCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the snapshot (e.g. after the session changed outside [`generate`]).
    pub fn clear(&mut self) {
        self.snapshot = None;
    }

    /// Tokens of the saved snapshot, if any.
    pub fn tokens(&self) -> Option<&[u32]> {
        self.snapshot.as_ref().map(|s| s.tokens.as_slice())
    }
}

/// What a generation produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// Reasoning text (thinking modes).
    pub reasoning: String,
    /// Visible answer text (without a tool block when tools are active).
    pub content: String,
    /// Parsed tool calls, in order.
    pub tool_calls: Vec<ParsedToolCall>,
    /// Generated token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Why generation ended (None only if it never ran).
    pub finish_reason: Option<FinishReason>,
    /// The DSML parser's error, if the tool block could not be parsed (the rest of the
    /// text was then passed through as content).
    pub tool_error: Option<String>,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
}

/// Renders `messages` with `opts` and tokenizes them with special-token recognition
/// only outside user/system/tool text. Returns the ids and whether the prompt ends in
/// thinking mode (ends with `<think>`).
pub fn prompt_tokens(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    opts: &ChatOptions,
) -> Result<(Vec<u32>, bool)> {
    let prompt = render(messages, opts);
    let ids = prompt.tokenize(tok, false)?;
    let thinking = opts.effective_thinking() != ThinkingMode::None;
    Ok((ids, thinking))
}

/// Runs one generation (see the module docs). `on_progress(done, total)` is called
/// during prefill with the prompt tokens fed so far out of those to feed; `on_event`
/// receives the output. Errors (a bad token id, a prompt longer than the context, a
/// backend failure) are returned; the cancel flag is not an error.
pub fn generate(
    session: &mut Session<'_>,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenOptions,
    cache: Option<&mut PrefixCache>,
    on_progress: &mut dyn FnMut(usize, usize),
    on_event: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    generate_observed(
        session,
        tok,
        prompt,
        opts,
        cache,
        on_progress,
        on_event,
        &mut |_| {},
    )
}

/// [`generate`], calling `after_feed(session)` each time a generated token has been fed to
/// the session (the disk KV cache's continued saves during decoding snapshot it there).
#[allow(clippy::too_many_arguments)]
pub fn generate_observed(
    session: &mut Session<'_>,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenOptions,
    cache: Option<&mut PrefixCache>,
    on_progress: &mut dyn FnMut(usize, usize),
    on_event: &mut dyn FnMut(Event),
    after_feed: &mut dyn FnMut(&Session<'_>),
) -> Result<Outcome> {
    if prompt.is_empty() {
        return Err(Error::NoLogits);
    }
    if prompt.len() > session.n_ctx() {
        return Err(Error::ContextFull {
            n_past: 0,
            n_new: prompt.len(),
            n_ctx: session.n_ctx(),
        });
    }
    let cancelled = || {
        opts.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    };
    let mut out = Outcome::default();

    // 1. Prefix reuse.
    let held = session.tokens();
    let reusable = held.len() <= prompt.len() && prompt[..held.len()] == *held;
    if !reusable || (held.len() == prompt.len() && session.logits().is_err()) {
        let snap = cache.as_deref().and_then(|c| c.snapshot.as_ref());
        match snap {
            Some(s) if s.tokens.len() <= prompt.len() && prompt[..s.tokens.len()] == s.tokens => {
                session.restore(s)
            }
            _ => session.reset(),
        }
    }
    let cached = session.n_past();
    out.usage.prompt_tokens = prompt.len();
    out.usage.cached_tokens = cached;

    // 2. Prefill.
    let t0 = Instant::now();
    let todo = &prompt[cached..];
    let chunk = opts.prefill_chunk.max(1);
    let mut done = 0;
    on_progress(0, todo.len());
    for piece in todo.chunks(chunk) {
        if cancelled() {
            out.timings.prefill_tokens = done;
            out.timings.prefill_secs = t0.elapsed().as_secs_f64();
            return Ok(finish(out, FinishReason::Cancelled, on_event));
        }
        session.feed(piece)?;
        done += piece.len();
        on_progress(done, todo.len());
    }
    out.timings.prefill_tokens = done;
    out.timings.prefill_secs = t0.elapsed().as_secs_f64();
    if let Some(c) = cache {
        c.snapshot = Some(session.snapshot());
    }

    // 3. Decode.
    let t1 = Instant::now();
    let specials = tok.specials();
    let mut sampler = Sampler::new(opts.sampling);
    let mut tracker = DsmlGreedyTracker::new(opts.thinking);
    let mut text = TextPipeline::new(opts);
    let mut forcer = (opts.tools && !opts.force_tool_call.is_empty())
        .then(|| Forcer::new(tok, opts.force_tool_call.clone(), opts.thinking));
    let mut pending: Option<u32> = None;
    let reason = loop {
        if let Some(id) = pending.take() {
            if session.n_past() >= session.n_ctx() {
                break FinishReason::ContextFull;
            }
            session.feed(&[id])?;
            after_feed(session);
        }
        if cancelled() {
            break FinishReason::Cancelled;
        }
        if out.tokens.len() >= opts.max_tokens {
            break FinishReason::Length;
        }
        let logits = session.logits()?;
        let greedy = opts.tools && opts.dsml_greedy && tracker.region().force_greedy();
        let temperature = if greedy {
            0.0
        } else {
            opts.sampling.temperature
        };
        // Tokens left: the budget, and the context (the last sampled token is not fed).
        let remaining = (opts.max_tokens - out.tokens.len())
            .min(session.n_ctx().saturating_sub(session.n_past()) + 1);
        let forced = forcer
            .as_mut()
            .and_then(|f| f.pick(tok, logits, remaining, &mut sampler, temperature));
        let id = match forced {
            Some(id) => id,
            None => sampler.sample_with_temperature(logits, temperature),
        };
        if let Some(r) = sampling::end_token_reason(id, &specials) {
            break match r {
                sampling::FinishReason::Eos => FinishReason::Eos,
                _ => FinishReason::UnexpectedSpecial,
            };
        }
        out.tokens.push(id);
        if text.in_reasoning() {
            out.usage.reasoning_tokens += 1;
        }
        let piece = text.decoder.push(tok, id)?;
        tracker.push(&piece);
        let ended = text.push(&piece, &mut out, on_event);
        if let Some(f) = forcer.as_mut() {
            f.observe(tok, id, &piece, text.in_reasoning(), remaining - 1);
        }
        if let Some(r) = ended {
            break r;
        }
        pending = Some(id);
    };
    text.finish(&mut out, on_event);
    out.usage.completion_tokens = out.tokens.len();
    out.timings.decode_tokens = out.tokens.len();
    out.timings.decode_secs = t1.elapsed().as_secs_f64();
    Ok(finish(out, reason, on_event))
}

fn finish(mut out: Outcome, reason: FinishReason, on_event: &mut dyn FnMut(Event)) -> Outcome {
    out.finish_reason = Some(reason);
    on_event(Event::Done {
        finish_reason: reason,
        usage: out.usage,
        timings: out.timings,
    });
    out
}

/// Raw text -> stop strings -> reasoning/content split -> DSML (with tools).
struct TextPipeline {
    decoder: StreamDecoder,
    stop: StopScanner,
    /// Still inside the reasoning (thinking mode, `</think>` not seen yet).
    reasoning: bool,
    /// Reasoning text not yet released (may hold a partial `</think>` or a leading `<think>`).
    held: String,
    /// Nothing of the reasoning was released yet (a leading `<think>` is dropped).
    at_start: bool,
    dsml: Option<DsmlStream>,
}

impl TextPipeline {
    fn new(opts: &GenOptions) -> Self {
        Self {
            decoder: StreamDecoder::new(),
            stop: StopScanner::new(opts.stop.iter().cloned()),
            reasoning: opts.thinking,
            held: String::new(),
            at_start: true,
            dsml: opts.tools.then(|| DsmlStream::new(opts.accept_plain_xml)),
        }
    }

    fn in_reasoning(&self) -> bool {
        self.reasoning
    }

    /// Feeds decoded text; returns a finish reason when the text ends generation.
    fn push(
        &mut self,
        piece: &str,
        out: &mut Outcome,
        on_event: &mut dyn FnMut(Event),
    ) -> Option<FinishReason> {
        let visible = self.stop.push(piece);
        let r = self.route(&visible, out, on_event);
        if r.is_some() {
            return r;
        }
        self.stop.stopped().then_some(FinishReason::StopString)
    }

    fn finish(&mut self, out: &mut Outcome, on_event: &mut dyn FnMut(Event)) {
        let mut rest = self.decoder.finish();
        if !self.stop.stopped() {
            rest = self.stop.push(&rest);
            rest.push_str(&self.stop.finish());
        }
        self.route(&rest, out, on_event);
        if self.reasoning && !self.held.is_empty() {
            let r = std::mem::take(&mut self.held);
            emit_reasoning(r, out, on_event);
        }
        if let Some(d) = self.dsml.as_mut() {
            match d.finish() {
                Ok(evs) => dsml_events(evs, out, on_event),
                Err(e) => out.tool_error = Some(e.to_string()),
            }
        }
    }

    /// Splits reasoning from content and sends content to the DSML parser.
    fn route(
        &mut self,
        text: &str,
        out: &mut Outcome,
        on_event: &mut dyn FnMut(Event),
    ) -> Option<FinishReason> {
        if text.is_empty() {
            return None;
        }
        let content = if self.reasoning {
            self.held.push_str(text);
            if self.at_start {
                if THINK_TEXT.starts_with(self.held.as_str()) && self.held.len() < THINK_TEXT.len()
                {
                    return None;
                }
                if let Some(rest) = self.held.strip_prefix(THINK_TEXT) {
                    self.held = rest.to_string();
                }
                self.at_start = false;
            }
            if let Some(i) = self.held.find(THINK_END_TEXT) {
                let after = self.held[i + THINK_END_TEXT.len()..].to_string();
                self.held.truncate(i);
                let r = std::mem::take(&mut self.held);
                emit_reasoning(r, out, on_event);
                self.reasoning = false;
                after
            } else {
                // Release all but a tail that may be the start of `</think>`.
                let keep = (1..THINK_END_TEXT.len())
                    .rev()
                    .find(|&n| {
                        self.held.len() >= n
                            && self.held.is_char_boundary(self.held.len() - n)
                            && THINK_END_TEXT.starts_with(&self.held[self.held.len() - n..])
                    })
                    .unwrap_or(0);
                let cut = self.held.len() - keep;
                let r: String = self.held.drain(..cut).collect();
                emit_reasoning(r, out, on_event);
                return None;
            }
        } else {
            text.to_string()
        };
        if content.is_empty() {
            return None;
        }
        match self.dsml.as_mut() {
            None => {
                out.content.push_str(&content);
                on_event(Event::Content(content));
                None
            }
            Some(d) => match d.push(&content) {
                Ok(evs) => {
                    let closed = evs.contains(&DsmlEvent::BlockClosed);
                    dsml_events(evs, out, on_event);
                    closed.then_some(FinishReason::ToolCalls)
                }
                Err(e) => {
                    // Unparseable block: stop parsing, pass the rest through as text.
                    out.tool_error = Some(e.to_string());
                    self.dsml = None;
                    None
                }
            },
        }
    }
}

fn emit_reasoning(text: String, out: &mut Outcome, on_event: &mut dyn FnMut(Event)) {
    if !text.is_empty() {
        out.reasoning.push_str(&text);
        on_event(Event::Reasoning(text));
    }
}

fn dsml_events(evs: Vec<DsmlEvent>, out: &mut Outcome, on_event: &mut dyn FnMut(Event)) {
    for e in evs {
        match e {
            DsmlEvent::Content(c) => {
                out.content.push_str(&c);
                on_event(Event::Content(c));
            }
            DsmlEvent::ToolCallBegin { index, name } => {
                on_event(Event::ToolCallStart { index, name })
            }
            DsmlEvent::ArgumentsDelta { index, fragment } => on_event(Event::ToolCallArgs {
                index,
                delta: fragment,
            }),
            DsmlEvent::ToolCall(c) => {
                out.tool_calls.push(c.clone());
                on_event(Event::ToolCall(c));
            }
            DsmlEvent::BlockClosed => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;
    use crate::session::LoadOptions;

    fn run(
        session: &mut Session<'_>,
        tok: &Tokenizer,
        prompt: &[u32],
        opts: &GenOptions,
        cache: Option<&mut PrefixCache>,
    ) -> (Outcome, Vec<Event>) {
        let mut events = Vec::new();
        let out = generate(
            session,
            tok,
            prompt,
            opts,
            cache,
            &mut |_, _| {},
            &mut |e| events.push(e),
        )
        .expect("generate");
        (out, events)
    }

    #[test]
    fn greedy_and_seeded_generation_is_reproducible_and_reuses_prefixes() {
        let model = crate::demo::model(&LoadOptions::default()).expect("demo");
        let tok = crate::demo::tokenizer().expect("tokenizer");
        let msgs = [ChatMessage::new(Role::User, "Hello")];
        let chat = ChatOptions {
            thinking: ThinkingMode::None,
            ..ChatOptions::default()
        };
        let (prompt, thinking) = prompt_tokens(&tok, &msgs, &chat).expect("prompt");
        assert!(!thinking);
        let opts = GenOptions {
            sampling: SamplingParams::greedy(),
            max_tokens: 6,
            thinking,
            ..GenOptions::default()
        };
        let mut s = Session::new(&model, 256);
        let (a, ev) = run(&mut s, &tok, &prompt, &opts, None);
        assert_eq!(a.tokens.len(), 6);
        assert_eq!(a.finish_reason, Some(FinishReason::Length));
        assert_eq!(a.usage.cached_tokens, 0);
        // Events carry exactly the content, and Done comes last.
        let streamed: String = ev
            .iter()
            .filter_map(|e| match e {
                Event::Content(c) => Some(c.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(streamed, a.content);
        assert!(matches!(ev.last(), Some(Event::Done { .. })));
        // The content is the decoded tokens.
        let decoded = String::from_utf8_lossy(&tok.decode(&a.tokens).expect("decode")).into_owned();
        assert_eq!(a.content, decoded);

        // Same prompt again in the same session: the session diverged (holds generated
        // tokens), so without a cache it restarts, and the output is identical.
        let (b, _) = run(&mut s, &tok, &prompt, &opts, None);
        assert_eq!(a.tokens, b.tokens);

        // Extending the transcript reuses the session: only the suffix is fed.
        let mut next = prompt.clone();
        next.extend_from_slice(&b.tokens);
        next.extend(tok.encode(
            "<｜end▁of▁sentence｜><｜User｜>more<｜Assistant｜></think>",
            true,
        ));
        let held = s.n_past();
        let (c, _) = run(&mut s, &tok, &next, &opts, None);
        assert_eq!(c.usage.cached_tokens, held);
        assert_eq!(c.timings.prefill_tokens, next.len() - held);
        // ... and equals a fresh session's answer to the same prompt.
        let mut fresh = Session::new(&model, 256);
        let (c2, _) = run(&mut fresh, &tok, &next, &opts, None);
        assert_eq!(c.tokens, c2.tokens);

        // Seeded sampling is reproducible; a prefix cache restores the prompt snapshot.
        let sampled = GenOptions {
            sampling: SamplingParams {
                temperature: 1.0,
                seed: 7,
                ..SamplingParams::default()
            },
            max_tokens: 5,
            ..opts.clone()
        };
        let mut cache = PrefixCache::new();
        let (d1, _) = run(&mut s, &tok, &prompt, &sampled, Some(&mut cache));
        let (d2, _) = run(&mut s, &tok, &prompt, &sampled, Some(&mut cache));
        assert_eq!(d1.tokens, d2.tokens);
        assert_eq!(d2.usage.cached_tokens, prompt.len());
        assert_eq!(d2.timings.prefill_tokens, 0);
    }

    #[test]
    fn budget_cancel_and_context_limits() {
        let model = crate::demo::model(&LoadOptions::default()).expect("demo");
        let tok = crate::demo::tokenizer().expect("tokenizer");
        let prompt = tok.encode(
            "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>",
            true,
        );
        let cancel = Arc::new(AtomicBool::new(true));
        let opts = GenOptions {
            sampling: SamplingParams::greedy(),
            max_tokens: 4,
            cancel: Some(cancel.clone()),
            ..GenOptions::default()
        };
        let mut s = Session::new(&model, prompt.len() + 2);
        let (o, _) = run(&mut s, &tok, &prompt, &opts, None);
        assert_eq!(o.finish_reason, Some(FinishReason::Cancelled));
        assert!(o.tokens.is_empty());
        cancel.store(false, Ordering::Relaxed);
        let (o, _) = run(&mut s, &tok, &prompt, &opts, None);
        // Two tokens fit in the context after the prompt (+ one sampled, not fed).
        assert_eq!(o.finish_reason, Some(FinishReason::ContextFull));
        assert_eq!(o.tokens.len(), 3);
        // Everything generated in thinking mode without `</think>` is reasoning.
        assert_eq!(o.usage.reasoning_tokens, 3);
        assert!(o.content.is_empty());
        let mut tiny = Session::new(&model, 2);
        let err = generate(
            &mut tiny,
            &tok,
            &prompt,
            &opts,
            None,
            &mut |_, _| {},
            &mut |_| {},
        );
        assert!(matches!(err, Err(Error::ContextFull { .. })));
    }

    #[test]
    fn text_pipeline_splits_reasoning_stops_and_parses_tools() {
        let opts = GenOptions {
            thinking: true,
            tools: true,
            stop: vec!["STOP".into()],
            ..GenOptions::default()
        };
        let mut p = TextPipeline::new(&opts);
        let mut out = Outcome::default();
        let mut events = Vec::new();
        let mut on = |e: Event| events.push(e);
        let pieces = [
            "<think>",
            "plan",
            " it</",
            "think>",
            "Sure.",
            "\n\n<｜DSML｜tool_calls>\n",
            "<｜DSML｜invoke name=\"f\">\n",
            "<｜DSML｜parameter name=\"x\" string=\"true\">a&b</｜DSML｜parameter>\n",
            "</｜DSML｜invoke>\n",
            "</｜DSML｜tool_calls>",
        ];
        let mut reason = None;
        for piece in pieces {
            reason = p.push(piece, &mut out, &mut on);
            if reason.is_some() {
                break;
            }
        }
        p.finish(&mut out, &mut on);
        assert_eq!(reason, Some(FinishReason::ToolCalls));
        assert_eq!(out.reasoning, "plan it");
        assert_eq!(out.content, "Sure.");
        assert_eq!(out.tool_calls.len(), 1);
        assert_eq!(out.tool_calls[0].name, "f");
        assert_eq!(out.tool_calls[0].arguments, r#"{"x":"a&b"}"#);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::ToolCallStart { .. }))
        );

        let mut p = TextPipeline::new(&GenOptions {
            thinking: false,
            ..opts
        });
        let mut out = Outcome::default();
        let mut none = |_: Event| {};
        assert_eq!(p.push("abc ST", &mut out, &mut none), None);
        assert_eq!(
            p.push("OP tail", &mut out, &mut none),
            Some(FinishReason::StopString)
        );
        p.finish(&mut out, &mut none);
        assert_eq!(out.content, "abc ");
    }
}
