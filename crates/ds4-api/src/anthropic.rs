//! Anthropic Messages (`/v1/messages`, `/v1/messages/count_tokens`), for Claude Code and
//! the Anthropic SDKs.
//!
//! Requests map onto `ds4_model::chat` messages: `system` (string or text blocks, with
//! Claude Code's `x-anthropic-` billing lines dropped), `text`/`thinking`/`tool_use`
//! blocks of assistant turns, `text`/`tool_result` blocks of user turns (tool results
//! become tool messages, merged into the user turn by the renderer). Images and
//! documents are refused with a 400 (GAP-S28). Errors use Anthropic's envelope.
//! Responses carry real token counts (`input_tokens` = prompt minus the reused prefix,
//! `cache_read_input_tokens` = the reused prefix), `stop_reason` including
//! `stop_sequence` with the matched string (GAP-S10), and the standard streaming event
//! sequence with a `ping`, live `input_json_delta`s and `error` events (GAP-S24).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ds4_model::chat::{ChatMessage, Prompt, Role};
use ds4_model::dsml::ToolCall;
use ds4_model::generate::{Event, FinishReason, GenOptions};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::engine::Generation;
use crate::error::{ApiError, Flavor};
use crate::openai::{
    ChatParts, apply_tool_choice, body_bytes, content_text, parse_json, plan_chat,
};
use crate::request::{
    self, Projector, SERVED_MODEL_ID, SamplingFields, SseEvent, ThinkingControls, present,
};
use crate::server::AppState;
use crate::worker::WorkerMsg;

const F: Flavor = Flavor::Anthropic;

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    content: Box<RawValue>,
}

#[derive(Debug, Deserialize, Default)]
struct OutputConfig {
    effort: Option<String>,
}

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: Option<String>,
    messages: Option<Vec<MessageIn>>,
    system: Option<Value>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    tools: Option<Vec<Box<RawValue>>>,
    tool_choice: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    thinking: Option<Value>,
    output_config: Option<OutputConfig>,
    reasoning_effort: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ToolIn {
    #[serde(rename = "type")]
    ty: Option<String>,
    name: String,
    description: Option<String>,
    input_schema: Option<Box<RawValue>>,
}

/// Converts Anthropic tools to the `{"name","description","parameters"}` objects the
/// template renders, keeping the schema's bytes. Server tools (`web_search_…`,
/// `bash_…`) have no client-side implementation here and are skipped.
fn parse_tools(tools: Option<Vec<Box<RawValue>>>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out = Vec::new();
    for (i, raw) in tools.unwrap_or_default().into_iter().enumerate() {
        let t: ToolIn = serde_json::from_str(raw.get())
            .map_err(|e| ApiError::bad_request(F, format!("tools[{i}]: {e}")))?;
        if t.ty.as_deref().is_some_and(|ty| ty != "custom") {
            continue;
        }
        let mut text = format!("{{\"name\":{}", json!(t.name));
        if let Some(d) = &t.description {
            text.push_str(&format!(",\"description\":{}", json!(d)));
        }
        let schema = t
            .input_schema
            .as_ref()
            .map_or("{\"type\":\"object\",\"properties\":{}}", |s| s.get());
        text.push_str(&format!(",\"parameters\":{schema}}}"));
        out.push((t.name, text));
    }
    Ok(out)
}

fn system_text(v: Option<&Value>) -> Result<Option<String>, ApiError> {
    let parts: Vec<String> = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut parts = Vec::new();
            for b in a {
                match b {
                    Value::String(s) => parts.push(s.clone()),
                    Value::Object(o) => match o.get("text") {
                        Some(Value::String(t)) => parts.push(t.clone()),
                        _ => {
                            return Err(ApiError::bad_request(
                                F,
                                "system blocks must be text blocks",
                            ));
                        }
                    },
                    _ => {
                        return Err(ApiError::bad_request(
                            F,
                            "system must be a string or text blocks",
                        ));
                    }
                }
            }
            parts
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                F,
                "system must be a string or text blocks",
            ));
        }
    };
    let mut out = String::new();
    for p in parts.into_iter().filter(|p| !p.starts_with("x-anthropic-")) {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&p);
    }
    Ok(Some(out))
}

/// A content block as a JSON map, plus the raw text of its `input` (tool_use), so tool
/// arguments keep the client's key order (a `Value` map would sort them).
type BlockIn = (serde_json::Map<String, Value>, Option<String>);

fn text_block(s: String) -> BlockIn {
    (
        serde_json::Map::from_iter([
            ("type".to_string(), json!("text")),
            ("text".to_string(), json!(s)),
        ]),
        None,
    )
}

fn blocks(content: &RawValue, i: usize) -> Result<Vec<BlockIn>, ApiError> {
    #[derive(Deserialize)]
    struct InputOnly {
        input: Option<Box<RawValue>>,
    }
    let bad = || {
        ApiError::bad_request(
            F,
            format!("messages[{i}].content must be a string or an array of blocks"),
        )
    };
    if let Ok(s) = serde_json::from_str::<String>(content.get()) {
        return Ok(vec![text_block(s)]);
    }
    let raws: Vec<Box<RawValue>> = serde_json::from_str(content.get()).map_err(|_| bad())?;
    raws.iter()
        .map(|raw| {
            if let Ok(s) = serde_json::from_str::<String>(raw.get()) {
                return Ok(text_block(s));
            }
            let map: serde_json::Map<String, Value> =
                serde_json::from_str(raw.get()).map_err(|_| {
                    ApiError::bad_request(
                        F,
                        format!("messages[{i}].content: blocks must be objects"),
                    )
                })?;
            let input = serde_json::from_str::<InputOnly>(raw.get())
                .ok()
                .and_then(|o| o.input)
                .map(|r| r.get().to_string());
            Ok((map, input))
        })
        .collect()
}

fn str_field<'a>(
    b: &'a serde_json::Map<String, Value>,
    k: &str,
    i: usize,
) -> Result<&'a str, ApiError> {
    b.get(k).and_then(Value::as_str).ok_or_else(|| {
        ApiError::bad_request(F, format!("messages[{i}]: block needs a string {k:?}"))
    })
}

fn convert_messages(state: &AppState, msgs: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    let mut out = Vec::new();
    for (i, m) in msgs.into_iter().enumerate() {
        let bl = blocks(&m.content, i)?;
        match m.role.as_str() {
            "user" => {
                let mut text: Option<String> = None;
                for (b, _) in bl {
                    match b.get("type").and_then(Value::as_str).unwrap_or("") {
                        "text" => text
                            .get_or_insert_default()
                            .push_str(str_field(&b, "text", i)?),
                        "tool_result" => {
                            if let Some(t) = text.take() {
                                out.push(ChatMessage::new(Role::User, t));
                            }
                            let id = str_field(&b, "tool_use_id", i)?.to_string();
                            let body = content_text(
                                b.get("content"),
                                F,
                                &format!("messages[{i}].tool_result.content"),
                            )?;
                            out.push(ChatMessage::tool_result(id, body));
                        }
                        other => {
                            return Err(ApiError::bad_request(
                                F,
                                format!(
                                    "messages[{i}]: content block type {other:?} is not supported in user messages"
                                ),
                            ));
                        }
                    }
                }
                if let Some(t) = text {
                    out.push(ChatMessage::new(Role::User, t));
                }
            }
            "assistant" => {
                let mut cm = ChatMessage::new(Role::Assistant, "");
                for (b, raw_input) in bl {
                    match b.get("type").and_then(Value::as_str).unwrap_or("") {
                        "text" => cm.content.push_str(str_field(&b, "text", i)?),
                        "thinking" => cm
                            .reasoning
                            .get_or_insert_default()
                            .push_str(str_field(&b, "thinking", i)?),
                        "redacted_thinking" => {}
                        "tool_use" => cm.tool_calls.push(ToolCall {
                            id: Some(str_field(&b, "id", i)?.to_string()),
                            name: str_field(&b, "name", i)?.to_string(),
                            // Raw text: the client's key order, not a sorted map.
                            arguments: raw_input.clone().unwrap_or_else(|| "{}".to_string()),
                        }),
                        other => {
                            return Err(ApiError::bad_request(
                                F,
                                format!(
                                    "messages[{i}]: content block type {other:?} is not supported in assistant messages"
                                ),
                            ));
                        }
                    }
                }
                let ids: Vec<&str> = cm
                    .tool_calls
                    .iter()
                    .filter_map(|c| c.id.as_deref())
                    .collect();
                cm.raw_tool_block = state.tool_memory.block_for(&ids);
                out.push(cm);
            }
            other => {
                return Err(ApiError::bad_request(
                    F,
                    format!("messages[{i}]: role must be user or assistant, got {other:?}"),
                ));
            }
        }
    }
    Ok(out)
}

struct Job {
    model: String,
    prompt: Prompt,
    opts: GenOptions,
    max_tokens: Option<usize>,
    stream: bool,
}

fn build(state: &AppState, req: MessagesRequest) -> Result<Job, ApiError> {
    let model = req.model.unwrap_or_else(|| SERVED_MODEL_ID.to_string());
    let Some(messages) = req.messages else {
        return Err(ApiError::bad_request(F, "missing messages"));
    };
    if messages.is_empty() {
        return Err(ApiError::bad_request(F, "messages must not be empty"));
    }
    let effort = req
        .output_config
        .and_then(|o| o.effort)
        .or(req.reasoning_effort);
    let mode = request::resolve_thinking(
        &model,
        &ThinkingControls {
            thinking: req.thinking,
            think: None,
            effort,
        },
    )
    .map_err(|m| ApiError::bad_request(F, m))?;
    let (tools, choice) = apply_tool_choice(parse_tools(req.tools)?, req.tool_choice.as_ref(), F)?;
    let mut msgs = Vec::new();
    if let Some(s) = system_text(req.system.as_ref())? {
        msgs.push(ChatMessage::new(Role::System, s));
    }
    msgs.extend(convert_messages(state, messages)?);
    let (prompt, opts) = plan_chat(
        state,
        ChatParts {
            msgs: &msgs,
            mode,
            tools: &tools,
            choice: &choice,
            response_format: None,
            sampling: SamplingFields {
                temperature: req.temperature,
                top_p: req.top_p,
                top_k: req.top_k,
                ..SamplingFields::default()
            },
            stop: req
                .stop_sequences
                .unwrap_or_default()
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
        },
        F,
    )?;
    Ok(Job {
        model,
        prompt,
        opts,
        max_tokens: request::max_tokens(req.max_tokens, F, "max_tokens")?,
        stream: req.stream.unwrap_or(false),
    })
}

/// Anthropic `stop_reason` and `stop_sequence`.
fn stop_reason(g: &Generation, stops: &[String]) -> (&'static str, Option<String>) {
    match g.outcome.finish_reason {
        Some(FinishReason::ToolCalls) if !g.outcome.tool_calls.is_empty() => ("tool_use", None),
        Some(FinishReason::Length | FinishReason::ContextFull) => ("max_tokens", None),
        Some(FinishReason::StopString) => {
            let hit = stops
                .iter()
                .filter_map(|s| g.raw_text.find(s.as_str()).map(|i| (i, s)))
                .min_by_key(|(i, _)| *i)
                .map(|(_, s)| s.clone());
            ("stop_sequence", hit)
        }
        _ => ("end_turn", None),
    }
}

fn usage_json(g: &Generation) -> Value {
    let u = g.outcome.usage;
    json!({
        "input_tokens": u.prompt_tokens - u.cached_tokens.min(u.prompt_tokens),
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

fn new_tool_id() -> String {
    format!("toolu_{}", request::random_hex(16))
}

/// A response content block; tool inputs keep the model's key order (raw JSON).
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Thinking {
        thinking: String,
        signature: String,
    },
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Box<RawValue>,
    },
}

/// `POST /v1/messages`.
pub async fn messages(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, F)?;
    let req: MessagesRequest = parse_json(&bytes, F)?;
    let job = build(&state, req)?;
    let stops = job.opts.stop.clone();
    let prompt_text = state.tracing().then(|| job.prompt.to_text());
    let prepared =
        request::enqueue(&state, F, "messages", job.prompt, job.max_tokens, job.opts).await?;
    let id = format!("msg_{}", request::random_hex(12));
    if job.stream {
        let proj = MessageStream {
            state: state.clone(),
            id,
            model: job.model,
            prompt_tokens: prepared.prompt_tokens,
            stops,
            next_index: 0,
            open: None,
            tool_ids: Vec::new(),
            trace: prompt_text.map(|p| (bytes.to_vec(), p)),
        };
        return Ok(request::sse_response(&state, prepared.job, proj));
    }
    let res = request::collect(prepared.job).await;
    if let Some(p) = &prompt_text {
        state.trace(&request::trace_text("messages", &bytes, p, &res));
    }
    let g = res.map_err(|e| ApiError::new(F, StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let o = &g.outcome;
    let mut content = Vec::new();
    if !o.reasoning.is_empty() {
        content.push(Block::Thinking {
            thinking: o.reasoning.clone(),
            signature: id.clone(),
        });
    }
    if !o.content.is_empty() || o.tool_calls.is_empty() {
        content.push(Block::Text {
            text: o.content.clone(),
        });
    }
    let mut ids = Vec::new();
    for c in &o.tool_calls {
        let tid = new_tool_id();
        ids.push(tid.clone());
        let input = RawValue::from_string(c.arguments.clone())
            .unwrap_or_else(|_| RawValue::from_string("{}".into()).expect("valid JSON"));
        content.push(Block::ToolUse {
            id: tid,
            name: c.name.clone(),
            input,
        });
    }
    if let Some(block) = &g.tool_block {
        state.tool_memory.remember(&ids, block);
    }
    let (reason, seq) = stop_reason(&g, &stops);
    let body = format!(
        "{{\"id\":{},\"type\":\"message\",\"role\":\"assistant\",\"model\":{},\"content\":{},\"stop_reason\":{},\"stop_sequence\":{},\"usage\":{}}}",
        json!(id),
        json!(job.model),
        serde_json::to_string(&content).map_err(|e| ApiError::new(
            F,
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string()
        ))?,
        json!(reason),
        json!(seq),
        usage_json(&g),
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// `POST /v1/messages/count_tokens`: the real prompt token count.
pub async fn count_tokens(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let bytes = body_bytes(body, F)?;
        let req: MessagesRequest = parse_json(&bytes, F)?;
        let job = build(&state, req)?;
        let Some(engine) = state.engine() else {
            return Err(ApiError::new(
                F,
                StatusCode::SERVICE_UNAVAILABLE,
                "model is loading",
            ));
        };
        let n = tokio::task::spawn_blocking(move || engine.tokenize(&job.prompt).map(|t| t.len()))
            .await
            .map_err(|_| {
                ApiError::new(
                    F,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "tokenizer task failed",
                )
            })?
            .map_err(|e| ApiError::new(F, StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(axum::Json(json!({"input_tokens": n})).into_response())
    };
    run.await.unwrap_or_else(|e: ApiError| e.into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Thinking,
    Text,
    Tool,
}

/// The streaming projector of `/v1/messages`.
struct MessageStream {
    state: AppState,
    id: String,
    model: String,
    prompt_tokens: usize,
    stops: Vec<String>,
    next_index: usize,
    open: Option<Open>,
    tool_ids: Vec<String>,
    trace: Option<(Vec<u8>, String)>,
}

fn ev(name: &str, data: Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

impl MessageStream {
    /// Closes the open block (with the thinking signature) and opens `kind`.
    fn switch(&mut self, kind: Option<Open>, start: Value, out: &mut Vec<SseEvent>) {
        if let Some(open) = self.open.take() {
            let idx = self.next_index - 1;
            if open == Open::Thinking {
                out.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": idx,
                    "delta": {"type": "signature_delta", "signature": self.id}}),
                ));
            }
            out.push(ev(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": idx}),
            ));
        }
        if let Some(k) = kind {
            out.push(ev("content_block_start", json!({"type": "content_block_start", "index": self.next_index, "content_block": start})));
            self.next_index += 1;
            self.open = Some(k);
        }
    }

    fn delta(&self, delta: Value) -> SseEvent {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.next_index - 1, "delta": delta}),
        )
    }
}

impl Projector for MessageStream {
    fn start(&mut self) -> Vec<SseEvent> {
        vec![
            ev(
                "message_start",
                json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0,
                          "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}}),
            ),
            ev("ping", json!({"type": "ping"})),
        ]
    }

    fn on_msg(&mut self, msg: WorkerMsg) -> Vec<SseEvent> {
        let mut out = Vec::new();
        match msg {
            WorkerMsg::Progress(..) => {}
            WorkerMsg::Event(Event::Reasoning(t)) => {
                if self.open != Some(Open::Thinking) {
                    self.switch(
                        Some(Open::Thinking),
                        json!({"type": "thinking", "thinking": "", "signature": ""}),
                        &mut out,
                    );
                }
                out.push(self.delta(json!({"type": "thinking_delta", "thinking": t})));
            }
            WorkerMsg::Event(Event::Content(t)) => {
                if self.open != Some(Open::Text) {
                    self.switch(
                        Some(Open::Text),
                        json!({"type": "text", "text": ""}),
                        &mut out,
                    );
                }
                out.push(self.delta(json!({"type": "text_delta", "text": t})));
            }
            WorkerMsg::Event(Event::ToolCallStart { name, .. }) => {
                let id = new_tool_id();
                self.tool_ids.push(id.clone());
                self.switch(
                    Some(Open::Tool),
                    json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
                    &mut out,
                );
            }
            WorkerMsg::Event(Event::ToolCallArgs { delta, .. }) => {
                if self.open == Some(Open::Tool) {
                    out.push(
                        self.delta(json!({"type": "input_json_delta", "partial_json": delta})),
                    );
                }
            }
            WorkerMsg::Event(_) => {}
            WorkerMsg::Finished(res) => {
                if let Some((raw, p)) = &self.trace {
                    self.state
                        .trace(&request::trace_text("messages", raw, p, &res));
                }
                match res {
                    Err(e) => {
                        self.switch(None, Value::Null, &mut out);
                        out.push(ev(
                            "error",
                            json!({"type": "error", "error": {"type": "api_error", "message": e}}),
                        ));
                    }
                    Ok(g) => {
                        let o = &g.outcome;
                        // Calls the live projection missed go out whole (final parse wins).
                        for c in o.tool_calls.iter().skip(self.tool_ids.len()) {
                            let id = new_tool_id();
                            self.tool_ids.push(id.clone());
                            self.switch(
                                Some(Open::Tool),
                                json!({"type": "tool_use", "id": id, "name": c.name, "input": {}}),
                                &mut out,
                            );
                            out.push(self.delta(
                                json!({"type": "input_json_delta", "partial_json": c.arguments}),
                            ));
                        }
                        if self.next_index == 0
                            || (self.open == Some(Open::Thinking) && o.tool_calls.is_empty())
                        {
                            // Never an empty message; a thinking-only answer gets an empty text block.
                            self.switch(
                                Some(Open::Text),
                                json!({"type": "text", "text": ""}),
                                &mut out,
                            );
                        }
                        self.switch(None, Value::Null, &mut out);
                        let n = self.tool_ids.len().min(o.tool_calls.len());
                        if let Some(block) = &g.tool_block {
                            self.state.tool_memory.remember(&self.tool_ids[..n], block);
                        }
                        let (reason, seq) = stop_reason(&g, &self.stops);
                        out.push(ev("message_delta", json!({"type": "message_delta",
                            "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": usage_json(&g)})));
                        out.push(ev("message_stop", json!({"type": "message_stop"})));
                    }
                }
            }
        }
        out
    }
}
