//! Constrained decoding that makes the model call a tool: `tool_choice: "required"` and
//! a named function (API.md GAP-S11, PROMPT.md GAP-T16).
//!
//! The model is not asked nicely; the generation loop ([`crate::generate`]) lets a
//! [`Forcer`] pick or restrict each token, so the output is a DSML block in exactly the
//! layout the renderer produces for history (PROMPT.md §2.8), which the ordinary DSML
//! parser then recognises:
//!
//! 1. **Thinking.** In thinking mode the model reasons freely. As soon as the reasoning
//!    ends (`</think>` generated) the call starts. If the model tries to end its turn
//!    inside the reasoning (EOS or a turn marker), or the token budget gets so low that
//!    the call would no longer fit, `</think>` is forced instead. Without thinking the
//!    call starts at the first token, so there is no text before the block.
//! 2. **Structure by token tries.** Every structural stretch is a set of candidate
//!    strings, each tokenized *as a whole* (so the forced tokens are exactly the
//!    tokenization the renderer produces when the call is replayed, which keeps the KV
//!    prefix reusable): the block opening plus `<｜DSML｜invoke name="NAME">\n` for each
//!    allowed tool (one for a named choice), followed by either the opening tag of one of
//!    the tool's parameters (`<｜DSML｜parameter name="KEY" string="true|false">`, with
//!    `string` from the JSON schema type) or the end of the invoke and block. Where the
//!    candidates agree the token is forced; where they differ the model chooses by
//!    greedy argmax over the allowed next tokens (markup is greedy anyway, PROMPT.md
//!    §3.3). Parameters already written are not offered again; the end is not offered
//!    while `required` parameters are missing (unless the budget is short).
//! 3. **Values are the model's.** Inside a value the model samples with the request's
//!    settings. It may not end its turn, write turn markers or think tags, or write the
//!    `｜DSML｜` marker other than right after `</` (which closes the value); such tokens
//!    are masked and the model samples again. When it closes the value, the rest of the
//!    closing tag is forced and the next structural choice (another parameter or the
//!    end) follows.
//! 4. **Budget.** When the remaining token budget only just fits the closing tags, the
//!    value is closed and the block ended by force, so a call always comes out complete
//!    (a JSON-typed value cut this way may not be valid JSON: that call then fails to
//!    parse, as any malformed call does).
//!
//! Not constrained: the *content* of values (no JSON-schema grammar), parameter names
//! outside the schema's `properties` (a tool whose schema has no `properties` can only
//! be called with `{}` arguments), and parallel calls (exactly one call is forced).

use serde_json::Value;

use crate::sampling::Sampler;
use crate::tokenizer::{DSML_TEXT, SpecialIds, Tokenizer};

/// One parameter of a forced tool, from its JSON schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForcedParam {
    /// Parameter (property) name.
    pub name: String,
    /// Rendered with `string="true"` (schema type `string`), else JSON (`string="false"`).
    pub string: bool,
    /// Listed in the schema's `required`.
    pub required: bool,
}

/// A tool the model may be made to call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForcedTool {
    /// Function name.
    pub name: String,
    /// Parameters in the schema's property order.
    pub params: Vec<ForcedParam>,
}

impl ForcedTool {
    /// Reads a tool definition as the API layer holds it: an object with `name` and a
    /// JSON schema in `parameters` or `input_schema` (OpenAI `function` object, Anthropic
    /// tool, Responses tool), or an OpenAI tool wrapping it in `function`. Returns `None`
    /// when there is no name.
    pub fn from_json(text: &str) -> Option<ForcedTool> {
        let v: Value = serde_json::from_str(text).ok()?;
        let f = v.get("function").filter(|f| f.is_object()).unwrap_or(&v);
        let name = f.get("name")?.as_str()?.to_string();
        let schema = f.get("parameters").or_else(|| f.get("input_schema"));
        let mut params = Vec::new();
        if let Some(props) = schema
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
        {
            let required: Vec<&str> = schema
                .and_then(|s| s.get("required"))
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (k, p) in props {
                params.push(ForcedParam {
                    name: k.clone(),
                    string: p.get("type").and_then(Value::as_str) == Some("string"),
                    required: required.contains(&k.as_str()),
                });
            }
        }
        Some(ForcedTool { name, params })
    }
}

const BLOCK_CLOSE: &str = "</｜DSML｜invoke>\n</｜DSML｜tool_calls>";

fn header(name: &str) -> String {
    format!("\n\n<{DSML_TEXT}tool_calls>\n<{DSML_TEXT}invoke name=\"{name}\">\n")
}

fn opener(p: &ForcedParam) -> String {
    format!(
        "<{DSML_TEXT}parameter name=\"{}\" string=\"{}\">",
        p.name, p.string
    )
}

/// What completing a candidate leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// The opening tag of parameter `param` of tool `tool` is written: its value follows.
    Value { tool: usize, param: usize },
    /// The block is closed.
    Closed { tool: usize },
}

#[derive(Debug, Clone)]
struct Cand {
    tokens: Vec<u32>,
    after: After,
}

#[derive(Debug, Clone)]
enum Phase {
    /// The model is reasoning (thinking mode, before `</think>`).
    Thinking,
    /// `</think>` was forced; the call starts once the pipeline has seen it.
    EndingThought,
    /// Walking candidate token sequences; `pos` of their tokens are written.
    Choose { cands: Vec<Cand>, pos: usize },
    /// Inside the value of parameter `param`; `text` is what was written of it.
    Value {
        tool: usize,
        param: usize,
        text: String,
    },
    /// The block is closed; nothing more is constrained.
    Done,
}

/// Per-generation state of the constraint. The generation loop asks [`Forcer::pick`]
/// for each token and reports every emitted token to [`Forcer::observe`].
#[derive(Debug, Clone)]
pub struct Forcer {
    tools: Vec<ForcedTool>,
    specials: SpecialIds,
    phase: Phase,
    used: Vec<bool>,
    /// Tokens of `</｜DSML｜parameter>\n` + [`BLOCK_CLOSE`] (closing from inside a value).
    close_from_value: Vec<u32>,
    /// Tokens needed to end the reasoning and write the longest header alternative.
    start_reserve: usize,
}

impl Forcer {
    /// A constraint forcing a call of one of `tools` (one tool = a named choice).
    /// `thinking` = the prompt ended with `<think>`.
    pub fn new(tok: &Tokenizer, tools: Vec<ForcedTool>, thinking: bool) -> Forcer {
        let close_from_value = tok.encode(&format!("</{DSML_TEXT}parameter>\n{BLOCK_CLOSE}"), true);
        let mut f = Forcer {
            tools,
            specials: tok.specials(),
            phase: Phase::Thinking,
            used: Vec::new(),
            close_from_value,
            start_reserve: 0,
        };
        let longest = f
            .header_cands(tok, usize::MAX)
            .iter()
            .map(|c| c.tokens.len())
            .max()
            .unwrap_or(0);
        f.start_reserve = 1 + longest + f.close_from_value.len() + 2;
        if !thinking {
            f.start_call(tok, usize::MAX);
        }
        f
    }

    /// Whether the forced block has been closed.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn start_call(&mut self, tok: &Tokenizer, remaining: usize) {
        let cands = self.header_cands(tok, remaining);
        self.phase = Phase::Choose { cands, pos: 0 };
    }

    /// Header alternatives of every allowed tool.
    fn header_cands(&self, tok: &Tokenizer, remaining: usize) -> Vec<Cand> {
        let mut out = Vec::new();
        for (t, tool) in self.tools.iter().enumerate() {
            let used = vec![false; tool.params.len()];
            out.extend(self.choice_cands(tok, t, &header(&tool.name), true, &used, remaining));
        }
        out
    }

    /// The alternatives after `prefix`: an unused parameter's opening tag, or the end of
    /// the block (`first` = no parameter written yet, which renders an empty line).
    fn choice_cands(
        &self,
        tok: &Tokenizer,
        tool: usize,
        prefix: &str,
        first: bool,
        used: &[bool],
        remaining: usize,
    ) -> Vec<Cand> {
        let mut out = Vec::new();
        let close_len = self.close_from_value.len();
        for (i, p) in self.tools[tool].params.iter().enumerate() {
            if used.get(i).copied().unwrap_or(false) {
                continue;
            }
            let tokens = tok.encode(&format!("{prefix}{}", opener(p)), true);
            // Room for the tag, one value token and the closing tags.
            if tokens.len() + 1 + close_len <= remaining {
                out.push(Cand {
                    tokens,
                    after: After::Value { tool, param: i },
                });
            }
        }
        let missing_required = self.tools[tool]
            .params
            .iter()
            .enumerate()
            .any(|(i, p)| p.required && !used.get(i).copied().unwrap_or(false));
        let can_continue = !out.is_empty();
        if missing_required && can_continue {
            out.retain(|c| match c.after {
                After::Value { param, .. } => self.tools[tool].params[param].required,
                After::Closed { .. } => true,
            });
        } else {
            let sep = if first { "\n" } else { "" };
            out.push(Cand {
                tokens: tok.encode(&format!("{prefix}{sep}{BLOCK_CLOSE}"), true),
                after: After::Closed { tool },
            });
        }
        out
    }

    /// Chooses the next token, or `None` to let the caller sample freely (the forcer is
    /// done). `remaining` = tokens left in the budget including this one; `sample` draws
    /// from (possibly masked) logits with the request's settings.
    pub fn pick(
        &mut self,
        tok: &Tokenizer,
        logits: &[f32],
        remaining: usize,
        sampler: &mut Sampler,
        temperature: f32,
    ) -> Option<u32> {
        match &mut self.phase {
            Phase::Done => None,
            Phase::EndingThought => Some(self.specials.think_end),
            Phase::Thinking => {
                if remaining <= self.start_reserve {
                    self.phase = Phase::EndingThought;
                    return Some(self.specials.think_end);
                }
                let id = sampler.sample_with_temperature(logits, temperature);
                if self.ends_turn(id) {
                    self.phase = Phase::EndingThought;
                    return Some(self.specials.think_end);
                }
                Some(id)
            }
            Phase::Choose { cands, pos } => {
                let p = *pos;
                let mut best: Option<u32> = None;
                for c in cands.iter() {
                    let Some(&id) = c.tokens.get(p) else { continue };
                    let better = match best {
                        None => true,
                        Some(b) => {
                            logit(logits, id) > logit(logits, b)
                                || (logit(logits, id) == logit(logits, b) && id < b)
                        }
                    };
                    if better {
                        best = Some(id);
                    }
                }
                best
            }
            Phase::Value { text, .. } => {
                if remaining <= self.close_from_value.len() {
                    let tokens = self.close_from_value.clone();
                    let (tool, _) = self.value_tool().unwrap_or((0, 0));
                    let first = tokens.first().copied();
                    self.phase = Phase::Choose {
                        cands: vec![Cand {
                            tokens,
                            after: After::Closed { tool },
                        }],
                        pos: 0,
                    };
                    return first;
                }
                let after_lt = text.ends_with("</");
                let mut masked: Option<Vec<f32>> = None;
                for _ in 0..64 {
                    let l = masked.as_deref().unwrap_or(logits);
                    let id = sampler.sample_with_temperature(l, temperature);
                    if self.value_token_ok(tok, id, after_lt) {
                        return Some(id);
                    }
                    let m = masked.get_or_insert_with(|| logits.to_vec());
                    if let Some(x) = m.get_mut(id as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
                // Pathological logits: close the value deterministically.
                Some(self.close_from_value[0])
            }
        }
    }

    fn value_tool(&self) -> Option<(usize, usize)> {
        match self.phase {
            Phase::Value { tool, param, .. } => Some((tool, param)),
            _ => None,
        }
    }

    fn ends_turn(&self, id: u32) -> bool {
        let s = &self.specials;
        id == s.eos || id == s.bos || id == s.user || id == s.assistant
    }

    /// Whether a value may continue with `id`.
    fn value_token_ok(&self, tok: &Tokenizer, id: u32, after_lt: bool) -> bool {
        let s = &self.specials;
        if self.ends_turn(id) || id == s.think || id == s.think_end {
            return false;
        }
        if id == s.dsml {
            return after_lt;
        }
        // An ordinary token spelling the fullwidth bar could fake a marker.
        match tok.token_to_piece(id) {
            Some(b) => !b.windows(3).any(|w| w == "｜".as_bytes()),
            None => false,
        }
    }

    /// Reports an emitted token: `piece` is its decoded text, `in_reasoning` whether the
    /// generation is still inside the reasoning after it, `remaining` the budget left.
    pub fn observe(
        &mut self,
        tok: &Tokenizer,
        id: u32,
        piece: &str,
        in_reasoning: bool,
        remaining: usize,
    ) {
        match &mut self.phase {
            Phase::Done => {}
            Phase::Thinking | Phase::EndingThought => {
                if !in_reasoning {
                    self.start_call(tok, remaining);
                }
            }
            Phase::Choose { cands, pos } => {
                let p = *pos;
                cands.retain(|c| c.tokens.get(p) == Some(&id));
                *pos += 1;
                let p = *pos;
                let finished = cands
                    .iter()
                    .filter(|c| c.tokens.len() == p)
                    .map(|c| c.after)
                    .next();
                if cands.is_empty() {
                    // The caller emitted something else (cannot happen): give up.
                    self.phase = Phase::Done;
                    return;
                }
                match finished {
                    None => {}
                    Some(After::Closed { .. }) => self.phase = Phase::Done,
                    Some(After::Value { tool, param }) => {
                        if self.used.len() != self.tools[tool].params.len() {
                            self.used = vec![false; self.tools[tool].params.len()];
                        }
                        self.used[param] = true;
                        self.phase = Phase::Value {
                            tool,
                            param,
                            text: String::new(),
                        };
                    }
                }
            }
            Phase::Value { tool, text, .. } => {
                let tool = *tool;
                if id == self.specials.dsml && text.ends_with("</") {
                    let used = self.used.clone();
                    let cands =
                        self.choice_cands(tok, tool, "parameter>\n", false, &used, remaining);
                    self.phase = Phase::Choose { cands, pos: 0 };
                } else {
                    text.push_str(piece);
                }
            }
        }
    }
}

fn logit(l: &[f32], id: u32) -> f32 {
    l.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{ChatMessage, ChatOptions, Role, ThinkingMode};
    use crate::generate::{FinishReason, GenOptions, Outcome, generate, prompt_tokens};
    use crate::sampling::SamplingParams;
    use crate::session::{LoadOptions, Session};

    const WEATHER: &str = r#"{"name":"get_weather","description":"Weather.","parameters":{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},"required":["city"]}}"#;
    const TIME: &str = r#"{"name":"get_time","parameters":{"type":"object","properties":{}}}"#;

    #[test]
    fn schemas_are_read_from_every_tool_shape() {
        let t = ForcedTool::from_json(WEATHER).expect("tool");
        assert_eq!(t.name, "get_weather");
        assert_eq!(
            t.params,
            vec![
                ForcedParam {
                    name: "city".into(),
                    string: true,
                    required: true
                },
                ForcedParam {
                    name: "days".into(),
                    string: false,
                    required: false
                },
            ]
        );
        let wrapped = format!(r#"{{"type":"function","function":{WEATHER}}}"#);
        assert_eq!(ForcedTool::from_json(&wrapped), Some(t.clone()));
        let anthropic = r#"{"name":"x","input_schema":{"properties":{"a":{"type":"string"}}}}"#;
        assert_eq!(
            ForcedTool::from_json(anthropic).expect("tool").params.len(),
            1
        );
        assert_eq!(ForcedTool::from_json(r#"{"description":"no name"}"#), None);
        assert_eq!(ForcedTool::from_json("not json"), None);
    }

    /// Runs the demo model (random weights: it never calls a tool by itself) with a
    /// forced call of `allowed` among the tools `WEATHER` and `TIME`.
    fn forced(allowed: &[&str], thinking: ThinkingMode, max_tokens: usize, seed: u64) -> Outcome {
        let model = crate::demo::model(&LoadOptions::default()).expect("demo");
        let tok = crate::demo::tokenizer().expect("tokenizer");
        let chat = ChatOptions {
            thinking,
            tools: vec![WEATHER.into(), TIME.into()],
            ..ChatOptions::default()
        };
        let msgs = [ChatMessage::new(Role::User, "Weather in Rome?")];
        let (prompt, thinking) = prompt_tokens(&tok, &msgs, &chat).expect("prompt");
        let opts = GenOptions {
            sampling: SamplingParams {
                temperature: 1.0,
                seed,
                ..SamplingParams::default()
            },
            max_tokens,
            thinking,
            tools: true,
            force_tool_call: allowed
                .iter()
                .filter_map(|a| ForcedTool::from_json(a))
                .collect(),
            ..GenOptions::default()
        };
        let mut s = Session::new(&model, prompt.len() + max_tokens + 8);
        let out = generate(
            &mut s,
            &tok,
            &prompt,
            &opts,
            None,
            &mut |_, _| {},
            &mut |_| {},
        )
        .expect("generate");
        // The forced structure is tokenized as the renderer tokenizes it: re-encoding
        // the generated text reproduces the block's opening tokens.
        let text = String::from_utf8_lossy(&tok.decode(&out.tokens).expect("decode")).into_owned();
        let open = text
            .find("\n\n<｜DSML｜tool_calls>")
            .expect("block opening");
        let block = &text[open..];
        // Forced text: everything up to the first value (or the whole block).
        let forced_end = block.find(" string=\"").map_or(block.len(), |i| i + 9);
        let head_ids = tok.encode(&block[..forced_end], true);
        assert!(
            out.tokens.windows(head_ids.len()).any(|w| w == head_ids),
            "forced tokens are canonical: {head_ids:?} in {:?} {text:?}",
            out.tokens
        );
        out
    }

    #[test]
    fn named_choice_yields_that_call_without_thinking() {
        for seed in [1, 2, 3] {
            let o = forced(&[WEATHER], ThinkingMode::None, 48, seed);
            assert_eq!(o.finish_reason, Some(FinishReason::ToolCalls), "{o:?}");
            assert_eq!(o.tool_calls.len(), 1);
            assert_eq!(o.tool_calls[0].name, "get_weather");
            let args: Value = serde_json::from_str(&o.tool_calls[0].arguments).expect("json");
            assert!(args.get("city").is_some(), "required parameter present");
            assert!(o.content.is_empty(), "no text before a forced call");
            assert!(o.tool_error.is_none());
        }
        // A tool without parameters: the call is `{}`.
        let o = forced(&[TIME], ThinkingMode::None, 32, 4);
        assert_eq!(o.tool_calls.len(), 1);
        assert_eq!(o.tool_calls[0].name, "get_time");
        assert_eq!(o.tool_calls[0].arguments, "{}");
    }

    #[test]
    fn required_choice_ends_the_reasoning_and_calls_a_declared_tool() {
        for seed in [5, 6] {
            let o = forced(&[WEATHER, TIME], ThinkingMode::High, 64, seed);
            assert_eq!(o.finish_reason, Some(FinishReason::ToolCalls), "{o:?}");
            assert_eq!(o.tool_calls.len(), 1);
            assert!(["get_weather", "get_time"].contains(&o.tool_calls[0].name.as_str()));
            assert!(o.usage.reasoning_tokens > 0, "the model reasoned first");
            assert!(o.usage.completion_tokens <= 64);
        }
    }
}
