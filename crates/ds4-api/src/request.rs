//! What every generation endpoint shares: thinking-mode resolution, sampling parameters
//! and their validation, unguessable ids, the exact-DSML replay memory, and the path
//! from a rendered prompt to a queued job (tokenize, check the context, enqueue).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use ds4_model::chat::{Prompt, ThinkingMode};
use ds4_model::generate::GenOptions;
use ds4_model::sampling::SamplingParams;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::engine::Generation;
use crate::error::{ApiError, Flavor};
use crate::server::AppState;
use crate::worker::{JobHandle, SubmitError, WorkerMsg};

/// One server-sent event.
pub type SseEvent = axum::response::sse::Event;

/// The id the server lists in `/v1/models`.
pub const SERVED_MODEL_ID: &str = "deepseek-v4-flash";
/// Alias that turns thinking off by default.
pub const ALIAS_CHAT: &str = "deepseek-chat";
/// Alias that turns thinking on by default.
pub const ALIAS_REASONER: &str = "deepseek-reasoner";

/// Deserializes a field so that an explicit JSON `null` is `Some(Value::Null)` and only
/// an absent field is `None` (with `#[serde(default)]`): `"thinking": null` still counts
/// as an explicit thinking control (API.md §3.5.2).
pub fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// `n` random bytes from the OS as lowercase hex (tool-call and message ids, GAP-S13).
pub fn random_hex(n_bytes: usize) -> String {
    let mut buf = vec![0u8; n_bytes];
    if getrandom::fill(&mut buf).is_err() {
        // The OS RNG is unavailable only on broken systems; refuse predictable ids.
        panic!("the operating system's random number generator is unavailable");
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random u64 (default seeds).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b).max(1)
}

/// Maps an effort string to a mode; `None` = thinking disabled.
pub fn effort_mode(effort: &str) -> Result<Option<ThinkingMode>, String> {
    match effort {
        "max" => Ok(Some(ThinkingMode::Max)),
        "xhigh" | "high" | "medium" | "low" | "minimal" => Ok(Some(ThinkingMode::High)),
        "none" => Ok(None),
        other => Err(format!(
            "invalid reasoning effort {other:?}: expected one of none, minimal, low, medium, high, xhigh, max"
        )),
    }
}

/// Thinking controls of a request, before resolution.
#[derive(Debug, Clone, Default)]
pub struct ThinkingControls {
    /// `thinking` field as sent (object, bool or null), if present.
    pub thinking: Option<Value>,
    /// `think` field.
    pub think: Option<bool>,
    /// `reasoning_effort` / `output_config.effort`.
    pub effort: Option<String>,
}

/// Resolves the thinking mode (API.md §3.5.2): explicit `thinking`/`think`, else the model
/// alias, else on; an effort picks `max`/`high` or disables it.
pub fn resolve_thinking(model: &str, c: &ThinkingControls) -> Result<ThinkingMode, String> {
    let mut explicit: Option<bool> = None;
    let mut any_explicit = false;
    if let Some(t) = &c.thinking {
        any_explicit = true;
        match t {
            Value::Bool(b) => explicit = Some(*b),
            Value::Null => {}
            Value::Object(o) => match o.get("type").and_then(Value::as_str) {
                Some("enabled") | Some("adaptive") => explicit = Some(true),
                Some("disabled") => explicit = Some(false),
                Some(other) => {
                    return Err(format!(
                        "thinking.type must be \"enabled\" or \"disabled\", got {other:?}"
                    ));
                }
                None => {}
            },
            _ => return Err("thinking must be an object, a boolean or null".into()),
        }
    }
    if let Some(b) = c.think {
        any_explicit = true;
        explicit = Some(b);
    }
    let mut enabled = explicit.unwrap_or(any_explicit || model != ALIAS_CHAT);
    let mut mode = ThinkingMode::High;
    if let Some(e) = &c.effort {
        match effort_mode(e)? {
            None => enabled = false,
            Some(m) => mode = m,
        }
    }
    Ok(if enabled { mode } else { ThinkingMode::None })
}

/// Sampling fields as sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct SamplingFields {
    /// `temperature`.
    pub temperature: Option<f64>,
    /// `top_p`.
    pub top_p: Option<f64>,
    /// `top_k`.
    pub top_k: Option<i64>,
    /// `min_p`.
    pub min_p: Option<f64>,
    /// `seed`.
    pub seed: Option<i64>,
}

/// Validates sampling fields (GAP-S7: 400 for nonsense values) and applies the
/// thinking-mode override (PROMPT.md §3.4: knobs are accepted but ignored while thinking;
/// the seed is kept).
pub fn sampling(
    f: &SamplingFields,
    mode: ThinkingMode,
) -> Result<SamplingParams, (String, &'static str)> {
    let mut p = SamplingParams::default();
    if let Some(t) = f.temperature {
        if !(0.0..=100.0).contains(&t) {
            return Err((
                "temperature must be between 0 and 100".into(),
                "temperature",
            ));
        }
        p.temperature = t as f32;
    }
    if let Some(v) = f.top_p {
        if !(0.0..=1.0).contains(&v) {
            return Err(("top_p must be between 0 and 1".into(), "top_p"));
        }
        p.top_p = if v == 0.0 { 1.0 } else { v as f32 };
    }
    if let Some(k) = f.top_k {
        if k < 0 {
            return Err(("top_k must be >= 0".into(), "top_k"));
        }
        p.top_k = (k as usize).min(ds4_model::sampling::TOP_K_MAX);
    }
    if let Some(v) = f.min_p {
        if !(0.0..=1.0).contains(&v) {
            return Err(("min_p must be between 0 and 1".into(), "min_p"));
        }
        p.min_p = v as f32;
    }
    p.seed = match f.seed {
        Some(s) if s > 0 => s as u64,
        _ => random_u64(),
    };
    Ok(if mode == ThinkingMode::None {
        p
    } else {
        p.thinking_override()
    })
}

/// Validates a token limit field: negative → 400; absent → None.
pub fn max_tokens(v: Option<i64>, flavor: Flavor, param: &str) -> Result<Option<usize>, ApiError> {
    match v {
        Some(n) if n < 0 => {
            Err(ApiError::bad_request(flavor, format!("{param} must be >= 0")).param(param))
        }
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

/// Remembers, per tool-call id, the exact DSML block the model sampled, so that a
/// client's JSON history renders back to the same bytes (exact replay, PROMPT.md §2.10).
/// Bounded by id count and total bytes; the oldest entries go first.
///
/// With a file ([`ToolMemory::with_file`], the server puts it in `--kv-disk-dir` next to
/// the KV checkpoints) every remembered block is appended as one JSON line and the map
/// is reloaded at start, so a history whose KV prefix comes back from the disk cache
/// after a restart still re-renders byte-identically. The file is rewritten with only
/// the kept entries at load and whenever it grows past twice their size; a torn last
/// line (crash while appending) is skipped.
#[derive(Debug)]
pub struct ToolMemory {
    inner: Mutex<ToolMemoryInner>,
    max_ids: usize,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct ToolMemoryInner {
    map: HashMap<String, Arc<String>>,
    order: VecDeque<(String, usize)>,
    bytes: usize,
    file: Option<ToolMemoryFile>,
}

#[derive(Debug)]
struct ToolMemoryFile {
    path: std::path::PathBuf,
    out: std::fs::File,
    /// Bytes in the file.
    len: u64,
}

/// One line of the tool-memory file.
#[derive(Debug, serde::Serialize, Deserialize)]
struct ToolMemoryLine {
    ids: Vec<String>,
    block: String,
}

impl ToolMemoryInner {
    fn insert(&mut self, ids: &[String], block: Arc<String>, max_ids: usize, max_bytes: usize) {
        for id in ids {
            self.map.insert(id.clone(), block.clone());
            self.order.push_back((id.clone(), block.len()));
            self.bytes += block.len();
        }
        while self.order.len() > max_ids || self.bytes > max_bytes {
            let Some((id, n)) = self.order.pop_front() else {
                break;
            };
            self.bytes -= n;
            // An id remembered twice: only its latest entry maps.
            if !self.order.iter().any(|(i, _)| *i == id) {
                self.map.remove(&id);
            }
        }
    }

    /// The kept entries as file lines, oldest first, ids of one block together.
    fn lines(&self) -> Vec<ToolMemoryLine> {
        let mut out: Vec<ToolMemoryLine> = Vec::new();
        for (id, _) in &self.order {
            let Some(block) = self.map.get(id) else {
                continue;
            };
            match out.last_mut() {
                Some(l) if l.block == **block => {
                    if !l.ids.contains(id) {
                        l.ids.push(id.clone());
                    }
                }
                _ => out.push(ToolMemoryLine {
                    ids: vec![id.clone()],
                    block: block.as_str().to_string(),
                }),
            }
        }
        out
    }

    /// Rewrites the file with the kept entries (temp file + rename).
    fn compact(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        let Some(f) = &self.file else {
            return Ok(());
        };
        let path = f.path.clone();
        let tmp = path.with_extension("jsonl.tmp");
        let mut text = String::new();
        for l in self.lines() {
            if let Ok(j) = serde_json::to_string(&l) {
                text.push_str(&j);
                text.push('\n');
            }
        }
        {
            let mut t = std::fs::File::create(&tmp)?;
            t.write_all(text.as_bytes())?;
            t.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        let out = std::fs::OpenOptions::new().append(true).open(&path)?;
        self.file = Some(ToolMemoryFile {
            path,
            out,
            len: text.len() as u64,
        });
        Ok(())
    }
}

impl ToolMemory {
    /// A memory holding at most `max_ids` ids and about `max_bytes` of block text.
    pub fn new(max_ids: usize, max_bytes: usize) -> ToolMemory {
        ToolMemory {
            inner: Mutex::new(ToolMemoryInner::default()),
            max_ids,
            max_bytes,
        }
    }

    /// Like [`ToolMemory::new`], loading and then appending to the file at `path`
    /// (created if missing).
    pub fn with_file(
        max_ids: usize,
        max_bytes: usize,
        path: &std::path::Path,
    ) -> std::io::Result<ToolMemory> {
        let m = ToolMemory::new(max_ids, max_bytes);
        if max_ids == 0 {
            return Ok(m);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        {
            let mut inner = m.inner.lock().unwrap_or_else(|p| p.into_inner());
            // Identical blocks share one allocation, as they did when remembered.
            let mut interned: HashMap<String, Arc<String>> = HashMap::new();
            for line in text.lines() {
                let Ok(l) = serde_json::from_str::<ToolMemoryLine>(line) else {
                    continue;
                };
                let block = interned
                    .entry(l.block.clone())
                    .or_insert_with(|| Arc::new(l.block))
                    .clone();
                inner.insert(&l.ids, block, max_ids, max_bytes);
            }
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            inner.file = Some(ToolMemoryFile {
                path: path.to_path_buf(),
                out,
                len: 0,
            });
            inner.compact()?;
        }
        Ok(m)
    }

    /// Records that `ids` were all produced by `block`.
    pub fn remember(&self, ids: &[String], block: &str) {
        if self.max_ids == 0 || ids.is_empty() {
            return;
        }
        let block = Arc::new(block.to_string());
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(ids, block.clone(), self.max_ids, self.max_bytes);
        let kept = m.bytes as u64;
        if let Some(f) = m.file.as_mut() {
            use std::io::Write;
            let line = ToolMemoryLine {
                ids: ids.to_vec(),
                block: block.as_str().to_string(),
            };
            if let Ok(mut j) = serde_json::to_string(&line) {
                j.push('\n');
                // A failed append only costs replay after a restart.
                if f.out.write_all(j.as_bytes()).is_ok() {
                    f.len += j.len() as u64;
                }
            }
            if f.len > 2 * kept + (1 << 20) {
                let _ = m.compact();
            }
        }
    }

    /// The block that produced every one of `ids`, if they all map to the same one.
    pub fn block_for(&self, ids: &[&str]) -> Option<String> {
        if ids.is_empty() {
            return None;
        }
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let first = m.map.get(ids[0])?;
        for id in &ids[1..] {
            if !Arc::ptr_eq(m.map.get(*id)?, first) {
                return None;
            }
        }
        Some(first.as_str().to_string())
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request ready for the worker.
#[derive(Debug)]
pub struct Prepared {
    /// The queued job.
    pub job: JobHandle,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
}

/// Tokenizes `prompt` (off the async threads), rejects it if it does not fit, clamps the
/// token budget to the room left and queues the job.
pub async fn enqueue(
    state: &AppState,
    flavor: Flavor,
    param: &str,
    prompt: Prompt,
    requested_max: Option<usize>,
    mut opts: GenOptions,
) -> Result<Prepared, ApiError> {
    let Some(engine) = state.engine() else {
        let mut e = ApiError::new(
            flavor,
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "model is loading",
        );
        e.retry_after = Some(5);
        return Err(e);
    };
    let n_ctx = engine.info().n_ctx;
    let e2 = engine.clone();
    let tokens = tokio::task::spawn_blocking(move || e2.tokenize(&prompt))
        .await
        .map_err(|_| {
            ApiError::new(
                flavor,
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "tokenizer task failed",
            )
        })?
        .map_err(|e| {
            ApiError::new(
                flavor,
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            )
        })?;
    if tokens.len() >= n_ctx {
        return Err(ApiError::context_exceeded(
            flavor,
            param,
            tokens.len(),
            n_ctx,
        ));
    }
    let room = n_ctx - tokens.len();
    opts.max_tokens = requested_max
        .unwrap_or(state.config.default_max_tokens)
        .min(room);
    let prompt_tokens = tokens.len();
    let Some(worker) = state.worker() else {
        return Err(ApiError::new(
            flavor,
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "model is loading",
        ));
    };
    match worker.submit(tokens, opts) {
        Ok(job) => Ok(Prepared { job, prompt_tokens }),
        Err(SubmitError::Full) => {
            state.metrics.queue_full();
            let mut e = ApiError::new(
                flavor,
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "server busy: {} requests already queued; retry later",
                    worker.queue_depth()
                ),
            );
            e.retry_after = Some(state.config.retry_after_secs);
            Err(e)
        }
        Err(SubmitError::Closed) => Err(ApiError::new(
            flavor,
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "server shutting down",
        )),
    }
}

/// The unix time in seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ===========================================================================
// SSE streaming and collection of a job's messages.

/// Turns a job's worker messages into wire events for one protocol.
pub trait Projector: Send + 'static {
    /// Events sent before any output (role chunk, `message_start`).
    fn start(&mut self) -> Vec<SseEvent>;
    /// Events for one worker message; [`WorkerMsg::Finished`] ends the stream.
    fn on_msg(&mut self, msg: WorkerMsg) -> Vec<SseEvent>;
}

/// An SSE response driven by `job` through `proj`. Keep-alive comments go out after
/// `keepalive_ms` (5 s by default) of silence (queue wait, long prefill, hidden
/// reasoning; GAP-S5). Dropping the body
/// (client gone) drops the job's guard, which cancels the generation.
pub fn sse_response(
    state: &AppState,
    job: JobHandle,
    mut proj: impl Projector,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{KeepAlive, Sse};
    let pending: VecDeque<SseEvent> = proj.start().into();
    let JobHandle { rx, guard } = job;
    let stream = futures_util::stream::unfold(
        (rx, proj, guard, pending, false),
        |(mut rx, mut proj, guard, mut pending, mut done)| async move {
            loop {
                if let Some(ev) = pending.pop_front() {
                    return Some((
                        Ok::<_, std::convert::Infallible>(ev),
                        (rx, proj, guard, pending, done),
                    ));
                }
                if done {
                    return None;
                }
                let msg = rx
                    .recv()
                    .await
                    .unwrap_or_else(|| WorkerMsg::Finished(Err("worker stopped".into())));
                if matches!(msg, WorkerMsg::Finished(_)) {
                    done = true;
                }
                pending.extend(proj.on_msg(msg));
            }
        },
    );
    let mut resp = Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(std::time::Duration::from_millis(
                    state.config.keepalive_ms.max(1),
                ))
                .text("keep-alive"),
        )
        .into_response();
    resp.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    resp
}

/// Waits for a job to finish (non-streaming requests). If the client disconnects, the
/// handler future is dropped with the job's guard, which cancels the generation.
pub async fn collect(job: JobHandle) -> Result<Generation, String> {
    let JobHandle { mut rx, guard } = job;
    let res = loop {
        match rx.recv().await {
            Some(WorkerMsg::Finished(r)) => break r,
            Some(_) => {}
            None => break Err("worker stopped".into()),
        }
    };
    drop(guard);
    res
}

/// Text of the trace for one finished request.
pub fn trace_text(
    kind: &str,
    raw_request: &[u8],
    prompt: &str,
    g: &Result<Generation, String>,
) -> String {
    let mut s = format!(
        "===== request {kind} {} =====\n--- raw request json ---\n{}\n--- rendered prompt ---\n{prompt}\n",
        now_secs(),
        String::from_utf8_lossy(raw_request)
    );
    match g {
        Ok(g) => {
            let o = &g.outcome;
            s.push_str(&format!(
                "--- generated text ---\n{}\n--- parsed message ---\nfinish={:?} prompt_tokens={} cached_tokens={} completion_tokens={} reasoning_tokens={}\nreasoning: {}\ncontent: {}\n",
                g.raw_text, o.finish_reason, o.usage.prompt_tokens, o.usage.cached_tokens,
                o.usage.completion_tokens, o.usage.reasoning_tokens, o.reasoning, o.content
            ));
            s.push_str(&format!(
                "cache: reused {} of {} prompt tokens, prefilled {}\n",
                o.usage.cached_tokens, o.usage.prompt_tokens, o.timings.prefill_tokens
            ));
            for c in &o.tool_calls {
                s.push_str(&format!("tool_call: {} {}\n", c.name, c.arguments));
            }
            if let Some(b) = &g.tool_block {
                s.push_str(&format!("tool_block (kept for exact replay): {b:?}\n"));
            }
            if let Some(e) = &o.tool_error {
                s.push_str(&format!("tool_parse_error: {e}\n"));
            }
        }
        Err(e) => s.push_str(&format!("--- error ---\n{e}\n")),
    }
    s.push_str("===== end request =====\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        model: &str,
        thinking: Option<Value>,
        think: Option<bool>,
        effort: Option<&str>,
        want: ThinkingMode,
    ) {
        let c = ThinkingControls {
            thinking,
            think,
            effort: effort.map(str::to_string),
        };
        assert_eq!(
            resolve_thinking(model, &c).expect("valid"),
            want,
            "{model} {c:?}"
        );
    }

    #[test]
    fn thinking_resolution() {
        use serde_json::json;
        check("deepseek-v4-flash", None, None, None, ThinkingMode::High);
        check("deepseek-chat", None, None, None, ThinkingMode::None);
        check("deepseek-reasoner", None, None, None, ThinkingMode::High);
        check(
            "deepseek-chat",
            Some(json!({"type":"enabled"})),
            None,
            None,
            ThinkingMode::High,
        );
        check(
            "deepseek-reasoner",
            Some(json!(false)),
            None,
            None,
            ThinkingMode::None,
        );
        check("x", None, Some(false), None, ThinkingMode::None);
        check("x", None, None, Some("max"), ThinkingMode::Max);
        check("x", None, None, Some("low"), ThinkingMode::High);
        check("x", None, None, Some("none"), ThinkingMode::None);
        // An explicit null still disables the alias rule.
        check(
            "deepseek-chat",
            Some(Value::Null),
            None,
            None,
            ThinkingMode::High,
        );
        assert!(
            resolve_thinking(
                "x",
                &ThinkingControls {
                    effort: Some("huge".into()),
                    ..Default::default()
                }
            )
            .is_err()
        );
    }

    #[test]
    fn tool_memory_is_bounded_and_exact() {
        let m = ToolMemory::new(3, 1 << 20);
        m.remember(&["a".into(), "b".into()], "BLOCK1");
        m.remember(&["c".into()], "BLOCK2");
        assert_eq!(m.block_for(&["a", "b"]).as_deref(), Some("BLOCK1"));
        assert_eq!(m.block_for(&["a", "c"]), None);
        m.remember(&["d".into()], "BLOCK3");
        assert_eq!(m.block_for(&["a"]), None, "oldest evicted");
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn tool_memory_file_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("ds4-toolmem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tool-memory.jsonl");
        {
            let m = ToolMemory::with_file(3, 1 << 20, &path).expect("open");
            m.remember(&["a".into(), "b".into()], "BLOCK1\n\"quoted\"");
            m.remember(&["c".into()], "BLOCK2");
            m.remember(&["d".into()], "BLOCK3");
        }
        // A torn line from a crash while appending is skipped.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .expect("append");
            f.write_all(b"{\"ids\":[\"e\"],\"blo").expect("write");
        }
        let m = ToolMemory::with_file(3, 1 << 20, &path).expect("reopen");
        assert_eq!(m.block_for(&["a"]), None, "evicted before the restart");
        assert_eq!(m.block_for(&["b"]).as_deref(), Some("BLOCK1\n\"quoted\""));
        assert_eq!(m.block_for(&["c"]).as_deref(), Some("BLOCK2"));
        assert_eq!(m.block_for(&["d"]).as_deref(), Some("BLOCK3"));
        assert_eq!(m.len(), 3);
        // Compacted at load: only the kept entries remain in the file.
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(!text.contains("\"e\""));
        // Ids of one block stay one block (multi-call replay needs that).
        m.remember(&["x".into(), "y".into()], "PAR");
        drop(m);
        let m = ToolMemory::with_file(3, 1 << 20, &path).expect("reopen");
        assert_eq!(m.block_for(&["x", "y"]).as_deref(), Some("PAR"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ids_are_random_hex() {
        let a = random_hex(16);
        let b = random_hex(16);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn sampling_validation() {
        let bad = SamplingFields {
            temperature: Some(-1.0),
            ..Default::default()
        };
        assert!(sampling(&bad, ThinkingMode::None).is_err());
        let ok = SamplingFields {
            temperature: Some(0.0),
            top_k: Some(5000),
            seed: Some(7),
            ..Default::default()
        };
        let p = sampling(&ok, ThinkingMode::None).expect("valid");
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, ds4_model::sampling::TOP_K_MAX);
        assert_eq!(p.seed, 7);
        let p = sampling(&ok, ThinkingMode::High).expect("valid");
        assert_eq!(p.temperature, 1.0, "thinking overrides the knobs");
        assert_eq!(p.seed, 7, "but keeps the seed");
    }
}
