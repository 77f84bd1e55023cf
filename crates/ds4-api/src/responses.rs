//! OpenAI Responses API (`/v1/responses`), the wire API of Codex CLI.
//!
//! Input is a string or an item list: `message` (roles user/assistant/system/developer,
//! text parts), `reasoning` (its summary/content text is attached to the next assistant
//! turn), `function_call` and `function_call_output`. `instructions` becomes the system
//! prompt. Function tools render like chat tools. There is no server-side response store:
//! `previous_response_id` and `conversation` are refused with a 400 (replay the input).
//!
//! Streaming follows the official event lifecycle with `event:` lines and a
//! `sequence_number` on every event (GAP-S16): `response.created`,
//! `response.in_progress`, then per output item `response.output_item.added`, its
//! deltas (`response.reasoning_summary_text.delta` when a summary was requested,
//! `response.output_text.delta`, `response.function_call_arguments.delta`) and `.done`
//! events — the reasoning item is closed as soon as the answer starts, never overlapping
//! the message item — and finally `response.completed` or `response.incomplete`.

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use ds4_model::chat::{ChatMessage, Role};
use ds4_model::dsml::ToolCall;
use ds4_model::generate::{Event, FinishReason};
use serde::Deserialize;
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

const F: Flavor = Flavor::OpenAi;

#[derive(Debug, Deserialize)]
struct ReasoningIn {
    effort: Option<String>,
    summary: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    model: Option<String>,
    input: Option<Box<RawValue>>,
    instructions: Option<String>,
    tools: Option<Vec<Box<RawValue>>>,
    tool_choice: Option<Value>,
    max_output_tokens: Option<i64>,
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stream: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    reasoning: Option<Value>,
    previous_response_id: Option<Value>,
    conversation: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ItemIn {
    #[serde(rename = "type")]
    ty: Option<String>,
    role: Option<String>,
    content: Option<Value>,
    summary: Option<Value>,
    call_id: Option<String>,
    id: Option<String>,
    name: Option<String>,
    arguments: Option<String>,
    output: Option<Value>,
}

fn parse_tools(tools: Option<Vec<Box<RawValue>>>) -> Result<Vec<(String, String)>, ApiError> {
    #[derive(Deserialize)]
    struct ToolIn {
        #[serde(rename = "type")]
        ty: String,
        name: Option<String>,
        description: Option<String>,
        parameters: Option<Box<RawValue>>,
    }
    let mut out = Vec::new();
    for (i, raw) in tools.unwrap_or_default().into_iter().enumerate() {
        let t: ToolIn = serde_json::from_str(raw.get())
            .map_err(|e| ApiError::bad_request(F, format!("tools[{i}]: {e}")).param("tools"))?;
        if t.ty != "function" {
            // Hosted tools (web_search, …) have no implementation here.
            continue;
        }
        let Some(name) = t.name else {
            return Err(
                ApiError::bad_request(F, format!("tools[{i}]: missing name")).param("tools"),
            );
        };
        let mut text = format!("{{\"name\":{}", json!(name));
        if let Some(d) = &t.description {
            text.push_str(&format!(",\"description\":{}", json!(d)));
        }
        let params = t
            .parameters
            .as_ref()
            .map_or("{\"type\":\"object\",\"properties\":{}}", |p| p.get());
        text.push_str(&format!(",\"parameters\":{params}}}"));
        out.push((name, text));
    }
    Ok(out)
}

/// Text of a reasoning item's `summary`/`content` arrays.
fn parts_text(v: Option<&Value>) -> String {
    let mut out = Vec::new();
    if let Some(Value::Array(a)) = v {
        for p in a {
            if let Some(t) = p.get("text").and_then(Value::as_str) {
                out.push(t.to_string());
            }
        }
    }
    out.join("\n")
}

fn convert_input(state: &AppState, input: &RawValue) -> Result<Vec<ChatMessage>, ApiError> {
    if let Ok(s) = serde_json::from_str::<String>(input.get()) {
        return Ok(vec![ChatMessage::new(Role::User, s)]);
    }
    let items: Vec<ItemIn> = serde_json::from_str(input.get()).map_err(|e| {
        ApiError::bad_request(F, format!("invalid input items: {e}")).param("input")
    })?;
    let mut out: Vec<ChatMessage> = Vec::new();
    let mut pending_reasoning: Option<String> = None;
    for (i, it) in items.into_iter().enumerate() {
        let field = format!("input[{i}].content");
        match it.ty.as_deref().unwrap_or("message") {
            "message" => {
                let role = match it.role.as_deref().unwrap_or("user") {
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    "system" | "developer" => Role::System,
                    other => {
                        return Err(ApiError::bad_request(
                            F,
                            format!("input[{i}]: unknown role {other:?}"),
                        )
                        .param("input"));
                    }
                };
                let mut m = ChatMessage::new(role, content_text(it.content.as_ref(), F, &field)?);
                if role == Role::Assistant {
                    m.reasoning = pending_reasoning.take();
                }
                out.push(m);
            }
            "reasoning" => {
                let mut t = parts_text(it.summary.as_ref());
                let c = parts_text(it.content.as_ref());
                if !c.is_empty() {
                    if !t.is_empty() {
                        t.push('\n');
                    }
                    t.push_str(&c);
                }
                pending_reasoning = Some(t);
            }
            "function_call" => {
                let call = ToolCall {
                    id: it.call_id.or(it.id),
                    name: it.name.unwrap_or_default(),
                    arguments: it.arguments.unwrap_or_else(|| "{}".into()),
                };
                // Calls merge into the preceding assistant turn.
                match out.last_mut() {
                    Some(m) if m.role == Role::Assistant => m.tool_calls.push(call),
                    _ => {
                        let mut m = ChatMessage::new(Role::Assistant, "");
                        m.reasoning = pending_reasoning.take();
                        m.tool_calls.push(call);
                        out.push(m);
                    }
                }
            }
            "function_call_output" => {
                let body = match &it.output {
                    Some(Value::String(s)) => s.clone(),
                    other => content_text(other.as_ref(), F, &format!("input[{i}].output"))?,
                };
                out.push(ChatMessage::tool_result(
                    it.call_id.unwrap_or_default(),
                    body,
                ));
            }
            other => {
                return Err(ApiError::bad_request(
                    F,
                    format!("input[{i}]: item type {other:?} is not supported"),
                )
                .param("input"));
            }
        }
    }
    for m in out
        .iter_mut()
        .filter(|m| m.role == Role::Assistant && !m.tool_calls.is_empty())
    {
        let ids: Vec<&str> = m
            .tool_calls
            .iter()
            .filter_map(|c| c.id.as_deref())
            .collect();
        if ids.len() == m.tool_calls.len() {
            m.raw_tool_block = state.tool_memory.block_for(&ids);
        }
    }
    Ok(out)
}

/// `POST /v1/responses`.
pub async fn responses(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match inner(state, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn inner(state: AppState, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let bytes = body_bytes(body, F)?;
    let req: ResponsesRequest = parse_json(&bytes, F)?;
    for (name, v) in [
        ("previous_response_id", &req.previous_response_id),
        ("conversation", &req.conversation),
    ] {
        if v.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request(
                F,
                format!("{name} is not supported; replay full input instead"),
            )
            .param(name));
        }
    }
    let model = req.model.unwrap_or_else(|| SERVED_MODEL_ID.to_string());
    let Some(input) = req.input else {
        return Err(ApiError::bad_request(F, "missing input").param("input"));
    };
    let (effort, summary) = match &req.reasoning {
        Some(Value::Null) | None => (None, false),
        Some(v) => {
            let r: ReasoningIn = serde_json::from_value(v.clone()).map_err(|e| {
                ApiError::bad_request(F, format!("invalid reasoning: {e}")).param("reasoning")
            })?;
            (
                r.effort,
                r.summary
                    .is_some_and(|s| matches!(s.as_str(), "auto" | "concise" | "detailed")),
            )
        }
    };
    let mode = request::resolve_thinking(
        &model,
        &ThinkingControls {
            thinking: None,
            think: None,
            effort,
        },
    )
    .map_err(|m| ApiError::bad_request(F, m).param("reasoning"))?;
    let (tools, choice) = apply_tool_choice(parse_tools(req.tools)?, req.tool_choice.as_ref(), F)?;
    let mut msgs = Vec::new();
    if let Some(i) = req.instructions.filter(|i| !i.is_empty()) {
        msgs.push(ChatMessage::new(Role::System, i));
    }
    msgs.extend(convert_input(&state, &input)?);
    if msgs.iter().all(|m| m.role == Role::System) {
        return Err(ApiError::bad_request(F, "input has no messages").param("input"));
    }
    let (prompt, opts) = plan_chat(
        &state,
        ChatParts {
            msgs: &msgs,
            mode,
            tools: &tools,
            choice: &choice,
            response_format: None,
            sampling: SamplingFields {
                temperature: req.temperature,
                top_p: req.top_p,
                ..SamplingFields::default()
            },
            stop: Vec::new(),
        },
        F,
    )?;
    let max = request::max_tokens(
        req.max_output_tokens.or(req.max_tokens),
        F,
        "max_output_tokens",
    )?;
    let prompt_text = state.tracing().then(|| prompt.to_text());
    let prepared = request::enqueue(&state, F, "input", prompt, max, opts).await?;
    let resp = RespState {
        state: state.clone(),
        id: format!("resp_{}", request::random_hex(12)),
        model,
        created: request::now_secs(),
        summary,
        seq: 0,
        items: Vec::new(),
        open: None,
        text: String::new(),
        call_ids: Vec::new(),
        trace: prompt_text.map(|p| (bytes.to_vec(), p)),
    };
    if req.stream.unwrap_or(false) {
        return Ok(request::sse_response(&state, prepared.job, resp));
    }
    let res = request::collect(prepared.job).await;
    resp.trace(&res);
    let g = res.map_err(|e| ApiError::new(F, StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let mut r = resp;
    let (obj, _) = r.final_object(&g);
    Ok(axum::Json(obj).into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Reasoning,
    Message,
    Call,
}

/// Builds output items and (streaming) the event lifecycle.
struct RespState {
    state: AppState,
    id: String,
    model: String,
    created: u64,
    summary: bool,
    seq: u64,
    /// Finished output items.
    items: Vec<Value>,
    /// The open item: kind, id, accumulated text, (call name).
    open: Option<(Open, String, String, String)>,
    text: String,
    call_ids: Vec<String>,
    /// `--trace`: the raw request and the rendered prompt.
    trace: Option<(Vec<u8>, String)>,
}

impl RespState {
    fn trace(&self, res: &Result<Generation, String>) {
        if let Some((raw, p)) = &self.trace {
            self.state
                .trace(&request::trace_text("responses", raw, p, res));
        }
    }

    fn ev(&mut self, ty: &str, mut body: Value) -> SseEvent {
        body["type"] = json!(ty);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        SseEvent::default().event(ty).data(body.to_string())
    }

    fn object(&self, status: &str, output: Vec<Value>) -> Value {
        json!({"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "model": self.model, "output": output})
    }

    fn close(&mut self, out: &mut Vec<SseEvent>) {
        let Some((kind, id, text, name)) = self.open.take() else {
            return;
        };
        let idx = self.items.len();
        let item = match kind {
            Open::Reasoning => {
                let e = self.ev(
                    "response.reasoning_summary_text.done",
                    json!({"item_id": id, "output_index": idx, "summary_index": 0, "text": text}),
                );
                out.push(e);
                let e = self.ev("response.reasoning_summary_part.done", json!({"item_id": id, "output_index": idx, "summary_index": 0, "part": {"type": "summary_text", "text": text}}));
                out.push(e);
                json!({"id": id, "type": "reasoning", "status": "completed", "summary": [{"type": "summary_text", "text": text}]})
            }
            Open::Message => {
                let e = self.ev(
                    "response.output_text.done",
                    json!({"item_id": id, "output_index": idx, "content_index": 0, "text": text}),
                );
                out.push(e);
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let e = self.ev(
                    "response.content_part.done",
                    json!({"item_id": id, "output_index": idx, "content_index": 0, "part": part}),
                );
                out.push(e);
                json!({"id": id, "type": "message", "status": "completed", "role": "assistant", "content": [part]})
            }
            Open::Call => {
                let call_id = self.call_ids.last().cloned().unwrap_or_default();
                let e = self.ev(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": idx, "name": name, "arguments": text}),
                );
                out.push(e);
                json!({"id": id, "type": "function_call", "status": "completed", "name": name, "call_id": call_id, "arguments": text})
            }
        };
        let e = self.ev(
            "response.output_item.done",
            json!({"output_index": idx, "item": item}),
        );
        out.push(e);
        self.items.push(item);
    }

    fn open_item(&mut self, kind: Open, name: &str, out: &mut Vec<SseEvent>) {
        self.close(out);
        let idx = self.items.len();
        let (id, item) = match kind {
            Open::Reasoning => {
                let id = format!("rs_{}", request::random_hex(12));
                (
                    id.clone(),
                    json!({"id": id, "type": "reasoning", "status": "in_progress", "summary": []}),
                )
            }
            Open::Message => {
                let id = format!("msg_{}", request::random_hex(12));
                (
                    id.clone(),
                    json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}),
                )
            }
            Open::Call => {
                let id = format!("fc_{}", request::random_hex(12));
                let call_id = format!("call_{}", request::random_hex(16));
                self.call_ids.push(call_id.clone());
                (
                    id.clone(),
                    json!({"id": id, "type": "function_call", "status": "in_progress", "name": name, "call_id": call_id, "arguments": ""}),
                )
            }
        };
        let e = self.ev(
            "response.output_item.added",
            json!({"output_index": idx, "item": item}),
        );
        out.push(e);
        match kind {
            Open::Reasoning => {
                let e = self.ev("response.reasoning_summary_part.added", json!({"item_id": id, "output_index": idx, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}));
                out.push(e);
            }
            Open::Message => {
                let e = self.ev("response.content_part.added", json!({"item_id": id, "output_index": idx, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}));
                out.push(e);
            }
            Open::Call => {}
        }
        self.open = Some((kind, id, String::new(), name.to_string()));
    }

    fn push(&mut self, kind: Open, name: &str, delta: &str, out: &mut Vec<SseEvent>) {
        if self.open.as_ref().map(|o| o.0) != Some(kind) || (kind == Open::Call && !name.is_empty())
        {
            self.open_item(kind, name, out);
        }
        let idx = self.items.len();
        let Some((_, id, text, _)) = self.open.as_mut() else {
            return;
        };
        text.push_str(delta);
        let id = id.clone();
        let (ty, body) = match kind {
            Open::Reasoning => (
                "response.reasoning_summary_text.delta",
                json!({"item_id": id, "output_index": idx, "summary_index": 0, "delta": delta}),
            ),
            Open::Message => (
                "response.output_text.delta",
                json!({"item_id": id, "output_index": idx, "content_index": 0, "delta": delta}),
            ),
            Open::Call => (
                "response.function_call_arguments.delta",
                json!({"item_id": id, "output_index": idx, "delta": delta}),
            ),
        };
        if !delta.is_empty() {
            let e = self.ev(ty, body);
            out.push(e);
        }
    }

    fn usage(g: &Generation) -> Value {
        let u = g.outcome.usage;
        json!({"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
               "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
               "total_tokens": u.prompt_tokens + u.completion_tokens})
    }

    fn status(g: &Generation) -> &'static str {
        match g.outcome.finish_reason {
            Some(FinishReason::Length | FinishReason::ContextFull) => "incomplete",
            _ => "completed",
        }
    }

    /// The complete response object (non-streaming, and the terminal event's payload).
    fn final_object(&mut self, g: &Generation) -> (Value, Vec<SseEvent>) {
        let mut sink = Vec::new();
        if self.items.is_empty() && self.open.is_none() {
            // Non-streaming: build the items from the final parse.
            let o = &g.outcome;
            if self.summary && !o.reasoning.is_empty() {
                self.push(Open::Reasoning, "", &o.reasoning.clone(), &mut sink);
            }
            if !o.content.is_empty() {
                self.push(Open::Message, "", &o.content.clone(), &mut sink);
            }
        }
        // Calls the live projection missed (or all of them, non-streaming).
        let n_calls = self.call_ids.len();
        for c in g.outcome.tool_calls.iter().skip(n_calls) {
            self.push(Open::Call, &c.name, &c.arguments, &mut sink);
        }
        self.close(&mut sink);
        let n = self.call_ids.len().min(g.outcome.tool_calls.len());
        if let Some(block) = &g.tool_block {
            self.state.tool_memory.remember(&self.call_ids[..n], block);
        }
        let status = Self::status(g);
        let mut obj = self.object(status, self.items.clone());
        obj["usage"] = Self::usage(g);
        if status == "incomplete" {
            obj["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        self.text.clear();
        (obj, sink)
    }
}

impl Projector for RespState {
    fn start(&mut self) -> Vec<SseEvent> {
        let created = self.object("in_progress", Vec::new());
        let a = self.ev("response.created", json!({"response": created}));
        let b = self.ev("response.in_progress", json!({"response": created}));
        vec![a, b]
    }

    fn on_msg(&mut self, msg: WorkerMsg) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if let WorkerMsg::Finished(res) = &msg {
            self.trace(res);
        }
        match msg {
            WorkerMsg::Event(Event::Reasoning(t)) if self.summary => {
                self.push(Open::Reasoning, "", &t, &mut out)
            }
            WorkerMsg::Event(Event::Content(t)) => self.push(Open::Message, "", &t, &mut out),
            WorkerMsg::Event(Event::ToolCallStart { name, .. }) => {
                self.push(Open::Call, &name, "", &mut out)
            }
            WorkerMsg::Event(Event::ToolCallArgs { delta, .. }) => {
                self.push(Open::Call, "", &delta, &mut out)
            }
            WorkerMsg::Finished(Ok(g)) => {
                // Events produced while finishing (closing the open item, missed calls).
                let (obj, closing) = self.final_object(&g);
                out.extend(closing);
                let ty = if obj["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                let e = self.ev(ty, json!({"response": obj}));
                out.push(e);
            }
            WorkerMsg::Finished(Err(e)) => {
                let mut failed = self.object("failed", self.items.clone());
                failed["error"] = json!({"code": "server_error", "message": e});
                let e = self.ev("response.failed", json!({"response": failed}));
                out.push(e);
            }
            _ => {}
        }
        out
    }
}
