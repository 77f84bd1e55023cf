//! OpenAI Chat Completions (`/v1/chat/completions`) and Completions (`/v1/completions`).
//!
//! Requests are parsed strictly with serde (wrong types, missing `messages`, empty
//! arrays, bad UTF-8 and unsupported content parts are 400s in OpenAI's error shape),
//! rendered with `ds4_model::chat` (official layout, injection-safe segments), and queued.
//! Responses follow API.md §3.7/§3.8: `reasoning_content` beside `content`, tool calls
//! with unguessable `call_` ids, usage with cached and reasoning token counts. Streaming
//! sends the role chunk, reasoning/content deltas, tool-call headers and argument
//! fragments as soon as the DSML invoke is recognised, the finish chunk, optional usage
//! and `[DONE]`. The final parse is authoritative: calls that were not streamed live
//! are sent whole before the finish chunk (GAP-S29).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ds4_model::chat::{self, ChatMessage, ChatOptions, Prompt, Role, Segment, ThinkingMode, Trust};
use ds4_model::dsml::{ParsedToolCall, ToolCall};
use ds4_model::generate::{Event, FinishReason, GenOptions};
use ds4_model::tokenizer::BOS_TEXT;
use ds4_model::toolforce::ForcedTool;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::engine::Generation;
use crate::error::{ApiError, Flavor};
use crate::request::{
    self, Projector, SERVED_MODEL_ID, SamplingFields, SseEvent, ThinkingControls, present,
};
use crate::server::AppState;
use crate::worker::WorkerMsg;

const F: Flavor = Flavor::OpenAi;

/// Reads the body, mapping size and read failures to OpenAI/Anthropic errors (413 for
/// bodies past `--max-body-mb`).
pub fn body_bytes(body: Result<Bytes, BytesRejection>, flavor: Flavor) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(flavor, status, "request body too large")
        } else {
            ApiError::new(
                flavor,
                StatusCode::BAD_REQUEST,
                format!("cannot read request body: {r}"),
            )
        }
    })
}

/// Parses JSON into `T`, turning serde's message into a 400.
pub fn parse_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], flavor: Flavor) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            flavor,
            "empty request body: expected a JSON object",
        ));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(flavor, format!("invalid JSON request: {e}")))
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StopField {
    fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a final usage chunk.
    #[serde(default)]
    pub include_usage: bool,
}

/// A tool call in an assistant message of the history.
#[derive(Debug, Deserialize)]
struct ToolCallIn {
    id: Option<String>,
    function: FunctionIn,
}

#[derive(Debug, Deserialize)]
struct FunctionIn {
    name: String,
    #[serde(default)]
    arguments: Option<Box<RawValue>>,
}

/// One message of `messages`.
#[derive(Debug, Deserialize)]
struct MessageIn {
    role: Option<String>,
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    reasoning_content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallIn>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// `/v1/chat/completions` request.
#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    messages: Option<Vec<MessageIn>>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<Value>,
    stop: Option<StopField>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    tools: Option<Vec<Box<RawValue>>>,
    tool_choice: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    thinking: Option<Value>,
    think: Option<bool>,
    reasoning_effort: Option<String>,
    n: Option<i64>,
    response_format: Option<Value>,
}

/// Text of a `content` value: a string, null, or an array of strings and text parts.
/// Images, audio and files are refused (GAP-S28) rather than silently dropped.
pub fn content_text(v: Option<&Value>, flavor: Flavor, field: &str) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match p {
                    Value::String(s) => out.push_str(s),
                    Value::Object(o) => {
                        let ty = o.get("type").and_then(Value::as_str).unwrap_or("text");
                        match (ty, o.get("text")) {
                            ("text" | "input_text" | "output_text", Some(Value::String(t))) => {
                                out.push_str(t)
                            }
                            ("text" | "input_text" | "output_text", _) => {
                                return Err(ApiError::bad_request(
                                    flavor,
                                    format!("{field}: a text part needs a string \"text\""),
                                )
                                .param(field));
                            }
                            (other, _) => {
                                return Err(ApiError::bad_request(
                                    flavor,
                                    format!("{field}: content part type {other:?} is not supported (text only)"),
                                )
                                .param(field));
                            }
                        }
                    }
                    _ => {
                        return Err(ApiError::bad_request(
                            flavor,
                            format!("{field}: content parts must be strings or objects"),
                        )
                        .param(field));
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::bad_request(
            flavor,
            format!("{field} must be a string, an array or null"),
        )
        .param(field)),
    }
}

/// The arguments of a history tool call as JSON text: a JSON string holding JSON, or a
/// raw JSON value.
fn arguments_text(raw: Option<&RawValue>) -> String {
    match raw {
        None => "{}".into(),
        Some(r) => match serde_json::from_str::<String>(r.get()) {
            Ok(s) => s,
            Err(_) => r.get().to_string(),
        },
    }
}

/// Parses the tools list: the raw `function` object of each, byte-for-byte.
fn parse_tools(tools: Option<Vec<Box<RawValue>>>) -> Result<Vec<(String, String)>, ApiError> {
    #[derive(Deserialize)]
    struct ToolIn {
        #[serde(rename = "type")]
        ty: Option<String>,
        function: Option<Box<RawValue>>,
    }
    #[derive(Deserialize)]
    struct FnHead {
        name: String,
    }
    let mut out = Vec::new();
    for (i, raw) in tools.unwrap_or_default().into_iter().enumerate() {
        let t: ToolIn = serde_json::from_str(raw.get())
            .map_err(|e| ApiError::bad_request(F, format!("tools[{i}]: {e}")).param("tools"))?;
        if t.ty.as_deref().is_some_and(|ty| ty != "function") {
            return Err(ApiError::bad_request(
                F,
                format!("tools[{i}]: only function tools are supported"),
            )
            .param("tools"));
        }
        let Some(f) = t.function else {
            return Err(
                ApiError::bad_request(F, format!("tools[{i}]: missing function")).param("tools"),
            );
        };
        let head: FnHead = serde_json::from_str(f.get()).map_err(|e| {
            ApiError::bad_request(F, format!("tools[{i}].function: {e}")).param("tools")
        })?;
        out.push((head.name, f.get().to_string()));
    }
    Ok(out)
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The model decides (`auto`, absent; `none` drops the tools instead).
    Auto,
    /// A call of any declared tool is mandatory (`required`, Anthropic `any`).
    Required,
    /// A call of this tool is mandatory.
    Named(String),
}

/// Applies `tool_choice` to the tool list: `none` drops the tools; everything else keeps
/// all of them in the prompt (a named choice too, so that the rendered tools block, and
/// with it the KV prefix, stays the same whatever the agent forces on a turn). A
/// mandatory choice is enforced by [`forced_tools`] in [`GenOptions::force_tool_call`]
/// (constrained decoding, `ds4_model::toolforce`). A mandatory choice without tools, or
/// naming an unknown tool, is a 400.
pub fn apply_tool_choice(
    tools: Vec<(String, String)>,
    choice: Option<&Value>,
    flavor: Flavor,
) -> Result<(Vec<(String, String)>, Choice), ApiError> {
    let named = |name: &str, tools: Vec<(String, String)>| {
        if tools.iter().any(|(n, _)| n == name) {
            Ok((tools, Choice::Named(name.to_string())))
        } else {
            Err(
                ApiError::bad_request(flavor, format!("tool_choice names unknown tool {name:?}"))
                    .param("tool_choice"),
            )
        }
    };
    let required = |tools: Vec<(String, String)>| {
        if tools.is_empty() {
            Err(ApiError::bad_request(
                flavor,
                "tool_choice requires a tool call but no (function) tools are declared",
            )
            .param("tool_choice"))
        } else {
            Ok((tools, Choice::Required))
        }
    };
    match choice {
        None | Some(Value::Null) => Ok((tools, Choice::Auto)),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok((Vec::new(), Choice::Auto)),
            "auto" => Ok((tools, Choice::Auto)),
            "required" | "any" => required(tools),
            other => Err(
                ApiError::bad_request(flavor, format!("unknown tool_choice {other:?}"))
                    .param("tool_choice"),
            ),
        },
        Some(Value::Object(o)) => {
            let ty = o.get("type").and_then(Value::as_str).unwrap_or("");
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| o.get("name"))
                .and_then(Value::as_str);
            match (ty, name) {
                ("none", _) => Ok((Vec::new(), Choice::Auto)),
                ("auto", _) => Ok((tools, Choice::Auto)),
                ("any" | "required", _) => required(tools),
                (_, Some(n)) => named(n, tools),
                _ => Err(
                    ApiError::bad_request(flavor, "tool_choice object needs a function name")
                        .param("tool_choice"),
                ),
            }
        }
        Some(_) => Err(
            ApiError::bad_request(flavor, "tool_choice must be a string or an object")
                .param("tool_choice"),
        ),
    }
}

/// The tools a mandatory `tool_choice` lets the model call (empty when not forced).
pub fn forced_tools(tools: &[(String, String)], choice: &Choice) -> Vec<ForcedTool> {
    tools
        .iter()
        .filter(|(name, _)| match choice {
            Choice::Auto => false,
            Choice::Required => true,
            Choice::Named(n) => n == name,
        })
        .filter_map(|(_, json)| ForcedTool::from_json(json))
        .collect()
}

/// What a chat-style request says about the prompt and its generation, after each API's
/// own parsing (input for [`plan_chat`]).
#[derive(Debug)]
pub struct ChatParts<'a> {
    /// The conversation, system turn first.
    pub msgs: &'a [ChatMessage],
    /// The requested thinking mode (before the context-size rule of `ChatOptions`).
    pub mode: ThinkingMode,
    /// The declared tools, `(name, JSON)`, after [`apply_tool_choice`].
    pub tools: &'a [(String, String)],
    /// The `tool_choice`, after [`apply_tool_choice`].
    pub choice: &'a Choice,
    /// A JSON schema the answer must follow (OpenAI `response_format`), if any.
    pub response_format: Option<String>,
    /// Sampling fields as sent.
    pub sampling: SamplingFields,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// The shared tail of every chat-style endpoint: renders the prompt with the tools at the
/// engine's context size, validates the sampling fields under the effective thinking mode
/// (400 naming the field), and builds the generation options (a mandatory `tool_choice`
/// becomes [`GenOptions::force_tool_call`]).
pub fn plan_chat(
    state: &AppState,
    parts: ChatParts<'_>,
    flavor: Flavor,
) -> Result<(Prompt, GenOptions), ApiError> {
    let copts = ChatOptions {
        thinking: parts.mode,
        ctx_size: state.engine().map_or(0, |e| e.info().n_ctx),
        tools: parts.tools.iter().map(|(_, t)| t.clone()).collect(),
        response_format: parts.response_format,
        ..ChatOptions::default()
    };
    let prompt = chat::render(parts.msgs, &copts);
    let effective = copts.effective_thinking();
    let sampling = request::sampling(&parts.sampling, effective)
        .map_err(|(m, p)| ApiError::bad_request(flavor, m).param(p))?;
    let opts = GenOptions {
        sampling,
        stop: parts.stop,
        thinking: effective != ThinkingMode::None,
        tools: !parts.tools.is_empty(),
        force_tool_call: forced_tools(parts.tools, parts.choice),
        ..GenOptions::default()
    };
    Ok((prompt, opts))
}

fn seed_value(v: Option<&Value>, flavor: Flavor) -> Result<Option<i64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_i64().or_else(|| n.as_u64().map(|u| (u >> 1) as i64))),
        Some(_) => Err(ApiError::bad_request(flavor, "seed must be an integer").param("seed")),
    }
}

/// Everything the generation needs, after parsing.
struct ChatJob {
    model: String,
    prompt: Prompt,
    opts: GenOptions,
    max_tokens: Option<usize>,
    stream: bool,
    include_usage: bool,
}

fn build_chat(state: &AppState, req: ChatRequest) -> Result<ChatJob, ApiError> {
    let model = req.model.unwrap_or_else(|| SERVED_MODEL_ID.to_string());
    let Some(messages) = req.messages else {
        return Err(ApiError::bad_request(F, "missing messages").param("messages"));
    };
    if messages.is_empty() {
        return Err(ApiError::bad_request(F, "messages must not be empty").param("messages"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(F, "only n=1 is supported").param("n"));
    }
    let mode = request::resolve_thinking(
        &model,
        &ThinkingControls {
            thinking: req.thinking,
            think: req.think,
            effort: req.reasoning_effort,
        },
    )
    .map_err(|m| ApiError::bad_request(F, m).param("reasoning_effort"))?;
    let (tools, choice) = apply_tool_choice(parse_tools(req.tools)?, req.tool_choice.as_ref(), F)?;
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let field = format!("messages[{i}].content");
        let role = match m.role.as_deref().unwrap_or("user") {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => Role::Tool,
            other => {
                return Err(ApiError::bad_request(
                    F,
                    format!("messages[{i}]: unknown role {other:?}"),
                )
                .param("messages"));
            }
        };
        let mut cm = ChatMessage::new(role, content_text(m.content.as_ref(), F, &field)?);
        if role == Role::Assistant {
            let r = content_text(
                m.reasoning_content.as_ref(),
                F,
                &format!("messages[{i}].reasoning_content"),
            )?;
            cm.reasoning = (!r.is_empty()).then_some(r);
            for c in m.tool_calls.unwrap_or_default() {
                cm.tool_calls.push(ToolCall {
                    id: c.id,
                    name: c.function.name,
                    arguments: arguments_text(c.function.arguments.as_deref()),
                });
            }
            let ids: Vec<&str> = cm
                .tool_calls
                .iter()
                .filter_map(|c| c.id.as_deref())
                .collect();
            if ids.len() == cm.tool_calls.len() {
                cm.raw_tool_block = state.tool_memory.block_for(&ids);
            }
        }
        if role == Role::Tool {
            cm.tool_call_id = m.tool_call_id;
        }
        msgs.push(cm);
    }
    let response_format = match &req.response_format {
        Some(rf) if rf.get("type").and_then(Value::as_str) == Some("json_schema") => rf
            .get("json_schema")
            .and_then(|s| s.get("schema"))
            .map(Value::to_string),
        _ => None,
    };
    let (prompt, opts) = plan_chat(
        state,
        ChatParts {
            msgs: &msgs,
            mode,
            tools: &tools,
            choice: &choice,
            response_format,
            sampling: SamplingFields {
                temperature: req.temperature,
                top_p: req.top_p,
                top_k: req.top_k,
                min_p: req.min_p,
                seed: seed_value(req.seed.as_ref(), F)?,
            },
            stop: req.stop.map(StopField::into_vec).unwrap_or_default(),
        },
        F,
    )?;
    let max_tokens = request::max_tokens(
        req.max_completion_tokens.or(req.max_tokens),
        F,
        "max_tokens",
    )?;
    Ok(ChatJob {
        model,
        prompt,
        opts,
        max_tokens,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// OpenAI `finish_reason`.
pub fn finish_str(g: &Generation) -> &'static str {
    match g.outcome.finish_reason {
        Some(FinishReason::ToolCalls) if !g.outcome.tool_calls.is_empty() => "tool_calls",
        Some(FinishReason::Length | FinishReason::ContextFull) => "length",
        _ => "stop",
    }
}

fn usage_json(g: &Generation) -> Value {
    let u = g.outcome.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": u.prompt_tokens - u.cached_tokens.min(u.prompt_tokens)},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

fn tool_call_json(id: &str, c: &ParsedToolCall) -> Value {
    json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

/// Assigns ids to the calls (keeping those streamed live) and remembers the exact block.
fn finalize_ids(state: &AppState, g: &Generation, streamed: &[String]) -> Vec<String> {
    let ids: Vec<String> = (0..g.outcome.tool_calls.len())
        .map(|i| streamed.get(i).cloned().unwrap_or_else(new_call_id))
        .collect();
    if let Some(block) = &g.tool_block {
        state.tool_memory.remember(&ids, block);
    }
    ids
}

fn new_call_id() -> String {
    format!("call_{}", request::random_hex(16))
}

fn engine_error(flavor: Flavor, e: String) -> ApiError {
    ApiError::new(flavor, StatusCode::INTERNAL_SERVER_ERROR, e)
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, F)?;
    let req: ChatRequest = parse_json(&bytes, F)?;
    let job = build_chat(&state, req)?;
    let prompt_text = state.tracing().then(|| job.prompt.to_text());
    let prepared =
        request::enqueue(&state, F, "messages", job.prompt, job.max_tokens, job.opts).await?;
    let id = format!("chatcmpl-{}", request::random_hex(12));
    let created = request::now_secs();
    if job.stream {
        let proj = ChatStream {
            state: state.clone(),
            id,
            model: job.model,
            created,
            include_usage: job.include_usage,
            ids: Vec::new(),
            trace: prompt_text.map(|p| (bytes.to_vec(), p)),
        };
        return Ok(request::sse_response(&state, prepared.job, proj));
    }
    let res = request::collect(prepared.job).await;
    if let Some(p) = &prompt_text {
        state.trace(&request::trace_text("chat", &bytes, p, &res));
    }
    let g = res.map_err(|e| engine_error(F, e))?;
    let ids = finalize_ids(&state, &g, &[]);
    let mut message = json!({"role": "assistant", "content": g.outcome.content});
    if !g.outcome.reasoning.is_empty() {
        message["reasoning_content"] = json!(g.outcome.reasoning);
    }
    if !g.outcome.tool_calls.is_empty() {
        message["tool_calls"] = g
            .outcome
            .tool_calls
            .iter()
            .zip(&ids)
            .map(|(c, id)| tool_call_json(id, c))
            .collect();
    }
    Ok(axum::Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": job.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_str(&g)}],
        "usage": usage_json(&g),
    }))
    .into_response())
}

/// The streaming projector of chat completions.
struct ChatStream {
    state: AppState,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Ids of the tool calls streamed live, by index.
    ids: Vec<String>,
    trace: Option<(Vec<u8>, String)>,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> SseEvent {
        SseEvent::default().data(
            json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
            .to_string(),
        )
    }
}

impl Projector for ChatStream {
    fn start(&mut self) -> Vec<SseEvent> {
        vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
    }

    fn on_msg(&mut self, msg: WorkerMsg) -> Vec<SseEvent> {
        match msg {
            WorkerMsg::Progress(..) => Vec::new(),
            WorkerMsg::Event(Event::Reasoning(t)) => {
                vec![self.chunk(json!({"reasoning_content": t}), None)]
            }
            WorkerMsg::Event(Event::Content(t)) => vec![self.chunk(json!({"content": t}), None)],
            WorkerMsg::Event(Event::ToolCallStart { index, name }) => {
                let id = new_call_id();
                while self.ids.len() < index {
                    self.ids.push(new_call_id());
                }
                self.ids.push(id.clone());
                vec![self.chunk(
                    json!({"tool_calls": [{"index": index, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                    None,
                )]
            }
            WorkerMsg::Event(Event::ToolCallArgs { index, delta }) => {
                vec![self.chunk(
                    json!({"tool_calls": [{"index": index, "function": {"arguments": delta}}]}),
                    None,
                )]
            }
            WorkerMsg::Event(_) => Vec::new(),
            WorkerMsg::Finished(res) => {
                if let Some((raw, p)) = &self.trace {
                    self.state.trace(&request::trace_text("chat", raw, p, &res));
                }
                let g = match res {
                    Ok(g) => g,
                    Err(e) => {
                        return vec![
                            SseEvent::default().event("error").data(
                                json!({"error": {"message": e, "type": "server_error"}})
                                    .to_string(),
                            ),
                            SseEvent::default().data("[DONE]"),
                        ];
                    }
                };
                let n_live = self.ids.len();
                let ids = finalize_ids(&self.state, &g, &self.ids);
                let mut out = Vec::new();
                // Calls the live projection did not deliver go out whole (final parse wins).
                let rest: Vec<Value> = g
                    .outcome
                    .tool_calls
                    .iter()
                    .enumerate()
                    .skip(n_live)
                    .map(|(i, c)| {
                        let mut v = tool_call_json(&ids[i], c);
                        v["index"] = json!(i);
                        v
                    })
                    .collect();
                if !rest.is_empty() {
                    out.push(self.chunk(json!({"tool_calls": rest}), None));
                }
                out.push(self.chunk(json!({}), Some(finish_str(&g))));
                if self.include_usage {
                    out.push(SseEvent::default().data(
                        json!({
                            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": usage_json(&g),
                        })
                        .to_string(),
                    ));
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
        }
    }
}

// ===========================================================================
// Legacy completions.

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: Option<String>,
    prompt: Option<Value>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<Value>,
    stop: Option<StopField>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "present")]
    thinking: Option<Value>,
    think: Option<bool>,
    reasoning_effort: Option<String>,
    suffix: Option<String>,
    echo: Option<bool>,
    n: Option<i64>,
}

/// `POST /v1/completions`. The prompt is wrapped as one user turn of the chat template
/// (thinking off unless asked for, GAP-S15; only the answer is returned as `text`); a
/// prompt that starts with the BOS literal is taken as already rendered and tokenized
/// as-is, special tokens included (the client wrote the whole prompt).
pub async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, F)?;
    let req: CompletionRequest = parse_json(&bytes, F)?;
    let model = req.model.unwrap_or_else(|| SERVED_MODEL_ID.to_string());
    let text = match req.prompt {
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(F, "missing prompt").param("prompt"));
        }
        Some(Value::String(s)) => s,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                F,
                "prompt must be a string (batched prompts are not supported)",
            )
            .param("prompt"));
        }
    };
    if req.suffix.is_some() {
        return Err(ApiError::bad_request(F, "suffix is not supported").param("suffix"));
    }
    if req.echo == Some(true) {
        return Err(ApiError::bad_request(F, "echo is not supported").param("echo"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(F, "only n=1 is supported").param("n"));
    }
    let any_control =
        req.thinking.is_some() || req.think.is_some() || req.reasoning_effort.is_some();
    let mode = if any_control || model == request::ALIAS_REASONER {
        request::resolve_thinking(
            &model,
            &ThinkingControls {
                thinking: req.thinking,
                think: req.think,
                effort: req.reasoning_effort,
            },
        )
        .map_err(|m| ApiError::bad_request(F, m).param("reasoning_effort"))?
    } else {
        ThinkingMode::None
    };
    let n_ctx = state.engine().map_or(0, |e| e.info().n_ctx);
    let (prompt, thinking) = if text.starts_with(BOS_TEXT) {
        let thinking = text.ends_with("<think>");
        (
            Prompt {
                segments: vec![Segment::Text {
                    text,
                    trust: Trust::Model,
                }],
            },
            thinking,
        )
    } else {
        let copts = ChatOptions {
            thinking: mode,
            ctx_size: n_ctx,
            ..ChatOptions::default()
        };
        let p = chat::render(&[ChatMessage::new(Role::User, text)], &copts);
        (p, copts.effective_thinking() != ThinkingMode::None)
    };
    let sampling = request::sampling(
        &SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            seed: seed_value(req.seed.as_ref(), F)?,
        },
        if thinking {
            ThinkingMode::High
        } else {
            ThinkingMode::None
        },
    )
    .map_err(|(m, p)| ApiError::bad_request(F, m).param(p))?;
    let opts = GenOptions {
        sampling,
        stop: req.stop.map(StopField::into_vec).unwrap_or_default(),
        thinking,
        tools: false,
        ..GenOptions::default()
    };
    let max_tokens = request::max_tokens(req.max_tokens, F, "max_tokens")?;
    let prepared = request::enqueue(&state, F, "prompt", prompt, max_tokens, opts).await?;
    let id = format!("cmpl-{}", request::random_hex(12));
    let created = request::now_secs();
    if req.stream.unwrap_or(false) {
        let proj = CompletionStream {
            id,
            model,
            created,
            include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        };
        return Ok(request::sse_response(&state, prepared.job, proj));
    }
    let g = request::collect(prepared.job)
        .await
        .map_err(|e| engine_error(F, e))?;
    let mut choice = json!({"text": g.outcome.content, "index": 0, "logprobs": null, "finish_reason": finish_str(&g)});
    if !g.outcome.reasoning.is_empty() {
        choice["reasoning_content"] = json!(g.outcome.reasoning);
    }
    Ok(axum::Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [choice], "usage": usage_json(&g),
    }))
    .into_response())
}

struct CompletionStream {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
}

impl CompletionStream {
    fn chunk(&self, text: &str, finish: Option<&str>) -> SseEvent {
        SseEvent::default().data(
            json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}],
            })
            .to_string(),
        )
    }
}

impl Projector for CompletionStream {
    fn start(&mut self) -> Vec<SseEvent> {
        Vec::new()
    }

    fn on_msg(&mut self, msg: WorkerMsg) -> Vec<SseEvent> {
        match msg {
            WorkerMsg::Event(Event::Content(t)) => vec![self.chunk(&t, None)],
            WorkerMsg::Finished(Ok(g)) => {
                let mut out = vec![self.chunk("", Some(finish_str(&g)))];
                if self.include_usage {
                    out.push(SseEvent::default().data(
                        json!({"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.model, "choices": [], "usage": usage_json(&g)})
                        .to_string(),
                    ));
                }
                out.push(SseEvent::default().data("[DONE]"));
                out
            }
            WorkerMsg::Finished(Err(e)) => vec![
                SseEvent::default()
                    .event("error")
                    .data(json!({"error": {"message": e, "type": "server_error"}}).to_string()),
                SseEvent::default().data("[DONE]"),
            ],
            _ => Vec::new(),
        }
    }
}
