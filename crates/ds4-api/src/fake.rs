//! A scripted [`Engine`] for tests: no model, deterministic output, observable inputs.
//!
//! Tokenization counts one token per byte of the rendered prompt, so context limits can
//! be hit with small requests. Generation replays a [`FakeScript`] one "token" (a few
//! characters) at a time through the same [`Event`]s the real loop produces, honouring
//! the options the HTTP layer sets (thinking, tools, budget, stop strings, cancel flag),
//! and records what it was asked so tests can check request parsing end to end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ds4_model::chat::Prompt;
use ds4_model::dsml::{self, ParsedToolCall, ToolCall};
use ds4_model::generate::{Event, FinishReason, GenOptions, Outcome, Timings, Usage};

use crate::engine::{Engine, EngineError, EngineInfo, Generation};

/// What the fake model "generates".
#[derive(Debug, Clone)]
pub struct FakeScript {
    /// Reasoning (emitted only when the prompt is in thinking mode).
    pub reasoning: String,
    /// Visible answer.
    pub content: String,
    /// Tool calls `(name, arguments JSON)` (emitted only when tools are active).
    pub tool_calls: Vec<(String, String)>,
    /// Pause before each token (to test disconnects and keep-alives).
    pub token_delay: Duration,
    /// Pause before the first token (a long "prefill").
    pub prefill_delay: Duration,
}

impl Default for FakeScript {
    fn default() -> Self {
        FakeScript {
            reasoning: "Let me think.".into(),
            content: "Hello from the fake engine.".into(),
            tool_calls: Vec::new(),
            token_delay: Duration::ZERO,
            prefill_delay: Duration::ZERO,
        }
    }
}

/// What the fake engine was last asked.
#[derive(Debug, Clone, Default)]
pub struct FakeCall {
    /// The rendered prompt text of the last tokenize call.
    pub prompt_text: String,
    /// Options of the last generation.
    pub opts: Option<GenOptions>,
    /// Prompt length of the last generation.
    pub prompt_tokens: usize,
}

/// The scripted engine.
#[derive(Debug, Clone)]
pub struct FakeEngine {
    n_ctx: usize,
    /// The script; change it between requests.
    pub script: Arc<Mutex<FakeScript>>,
    /// The last inputs.
    pub last: Arc<Mutex<FakeCall>>,
    /// Generations that ended because the cancel flag was set.
    pub cancelled: Arc<AtomicUsize>,
    /// Generations run to completion or cancellation.
    pub runs: Arc<AtomicUsize>,
}

impl FakeEngine {
    /// A fake engine with an `n_ctx`-token (byte) context.
    pub fn new(n_ctx: usize) -> FakeEngine {
        FakeEngine {
            n_ctx,
            script: Arc::new(Mutex::new(FakeScript::default())),
            last: Arc::new(Mutex::new(FakeCall::default())),
            cancelled: Arc::new(AtomicUsize::new(0)),
            runs: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Replaces the script.
    pub fn set_script(&self, script: FakeScript) {
        *self.script.lock().expect("fake script lock") = script;
    }

    /// The last inputs.
    pub fn last(&self) -> FakeCall {
        self.last.lock().expect("fake call lock").clone()
    }
}

/// Splits text into "tokens" of at most three characters.
fn pieces(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(3).map(|c| c.iter().collect()).collect()
}

impl Engine for FakeEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            model_name: "fake".into(),
            n_ctx: self.n_ctx,
        }
    }

    fn tokenize(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = prompt.to_text();
        let ids = text.bytes().map(u32::from).collect();
        self.last.lock().expect("fake call lock").prompt_text = text;
        Ok(ids)
    }

    fn generate(
        &self,
        prompt: &[u32],
        opts: &GenOptions,
        on_progress: &mut dyn FnMut(usize, usize),
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generation, EngineError> {
        let script = self.script.lock().expect("fake script lock").clone();
        {
            let mut last = self.last.lock().expect("fake call lock");
            last.opts = Some(opts.clone());
            last.prompt_tokens = prompt.len();
        }
        self.runs.fetch_add(1, Ordering::Relaxed);
        let cancelled = || {
            opts.cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
        };
        on_progress(0, prompt.len());
        std::thread::sleep(script.prefill_delay);
        on_progress(prompt.len(), prompt.len());
        let mut out = Outcome {
            usage: Usage {
                prompt_tokens: prompt.len(),
                ..Usage::default()
            },
            ..Outcome::default()
        };
        let mut raw = String::new();
        let mut n = 0usize;
        let mut finish = FinishReason::Eos;
        // Each step: (is_reasoning, text).
        let mut steps: Vec<(bool, String)> = Vec::new();
        if opts.thinking {
            steps.extend(pieces(&script.reasoning).into_iter().map(|p| (true, p)));
            steps.push((true, "</think>".into()));
        }
        // Stop strings cut the content where the first one starts (the real loop holds
        // back a possible partial stop string; the fake knows the whole text up front).
        let mut content = script.content.clone();
        let mut stop_hit = None;
        if let Some((i, s)) = opts
            .stop
            .iter()
            .filter_map(|s| content.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i)
        {
            content.truncate(i);
            stop_hit = Some(s.clone());
        }
        steps.extend(pieces(&content).into_iter().map(|p| (false, p)));
        let mut stopped = false;
        for (reasoning, piece) in steps {
            if cancelled() {
                finish = FinishReason::Cancelled;
                stopped = true;
                break;
            }
            if n >= opts.max_tokens {
                finish = FinishReason::Length;
                stopped = true;
                break;
            }
            std::thread::sleep(script.token_delay);
            n += 1;
            raw.push_str(&piece);
            if reasoning {
                out.usage.reasoning_tokens += 1;
                if piece != "</think>" {
                    out.reasoning.push_str(&piece);
                    on_event(Event::Reasoning(piece));
                }
                continue;
            }
            out.content.push_str(&piece);
            on_event(Event::Content(piece));
        }
        if let Some(s) = stop_hit.filter(|_| !stopped) {
            // The raw text holds the stop string, as the real loop's decoded tokens do.
            raw.push_str(&s);
            finish = FinishReason::StopString;
            stopped = true;
        }
        let mut tool_block = None;
        if !stopped && opts.tools && !script.tool_calls.is_empty() {
            let calls: Vec<ToolCall> = script
                .tool_calls
                .iter()
                .map(|(name, args)| ToolCall {
                    id: None,
                    name: name.clone(),
                    arguments: args.clone(),
                })
                .collect();
            let block = dsml::render_tool_calls(&calls);
            for (index, (name, args)) in script.tool_calls.iter().enumerate() {
                n += 1;
                on_event(Event::ToolCallStart {
                    index,
                    name: name.clone(),
                });
                for p in pieces(args) {
                    on_event(Event::ToolCallArgs { index, delta: p });
                }
                let call = ParsedToolCall {
                    name: name.clone(),
                    arguments: args.clone(),
                };
                on_event(Event::ToolCall(call.clone()));
                out.tool_calls.push(call);
            }
            raw.push_str(&block);
            tool_block = Some(block);
            finish = FinishReason::ToolCalls;
        }
        if finish == FinishReason::Cancelled {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        out.usage.completion_tokens = n;
        out.timings = Timings {
            prefill_tokens: prompt.len(),
            prefill_secs: 0.001,
            decode_tokens: n,
            decode_secs: 0.001,
        };
        out.finish_reason = Some(finish);
        on_event(Event::Done {
            finish_reason: finish,
            usage: out.usage,
            timings: out.timings,
        });
        Ok(Generation {
            outcome: out,
            raw_text: raw,
            tool_block,
        })
    }

    fn live_tokens(&self) -> usize {
        self.last.lock().expect("fake call lock").prompt_tokens
    }
}
