//! Configuration, router, middleware and serving.
//!
//! [`router`] builds the whole HTTP surface over an [`AppState`]; it is what tests call
//! in-process with `tower::ServiceExt::oneshot`. [`serve`] runs it on a listener with a
//! cap on open connections (GAP-S3) and graceful shutdown.
//!
//! The outer middleware ([`guard`]) does, for every request: answer `OPTIONS` with 204
//! (CORS preflight), check the API key (constant-time, everything but `/health`),
//! add CORS headers when enabled, and count the request in `/metrics`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::engine::Engine;
use crate::error::{ApiError, Flavor};
use crate::metrics::Metrics;
use crate::request::{ALIAS_CHAT, ALIAS_REASONER, SERVED_MODEL_ID, ToolMemory};
use crate::worker::Worker;

/// Serving options (the binary's flags).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Required key (`Authorization: Bearer KEY` or `x-api-key: KEY`); `None` = open.
    pub api_key: Option<String>,
    /// Add permissive CORS headers.
    pub cors: bool,
    /// Largest request body accepted (413 past it).
    pub max_body_bytes: usize,
    /// Jobs that may wait for the worker (429 past it).
    pub max_queue: usize,
    /// Open connections served at once (more wait in the accept backlog).
    pub max_connections: usize,
    /// Output budget when the client sets none (always clamped to the room left).
    pub default_max_tokens: usize,
    /// `Retry-After` seconds on 429.
    pub retry_after_secs: u64,
    /// Milliseconds of SSE silence before a keep-alive comment.
    pub keepalive_ms: u64,
    /// Exact-DSML replay map size in ids (0 disables exact replay).
    pub tool_memory_max_ids: usize,
    /// Human-readable request trace (contains full prompts and outputs).
    pub trace: Option<PathBuf>,
    /// File persisting the exact-DSML replay map across restarts (the server uses
    /// `--kv-disk-dir/tool-memory.jsonl`); `None` keeps it in memory only.
    pub tool_memory_file: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            api_key: None,
            cors: false,
            max_body_bytes: 64 << 20,
            max_queue: 16,
            max_connections: 256,
            default_max_tokens: 393_216,
            retry_after_secs: 2,
            keepalive_ms: 5000,
            tool_memory_max_ids: 100_000,
            trace: None,
            tool_memory_file: None,
        }
    }
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    /// Options.
    pub config: Arc<ServerConfig>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Exact-DSML replay memory.
    pub tool_memory: Arc<ToolMemory>,
    engine: Arc<OnceLock<Arc<dyn Engine>>>,
    worker: Arc<OnceLock<Worker>>,
    trace: Option<Arc<Mutex<std::fs::File>>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .field("ready", &self.engine.get().is_some())
            .finish()
    }
}

impl AppState {
    /// State with no engine yet (`/health` says loading until [`AppState::set_engine`]).
    pub fn new(config: ServerConfig) -> io::Result<AppState> {
        let trace = match &config.trace {
            Some(p) => Some(Arc::new(Mutex::new(std::fs::File::create(p)?))),
            None => None,
        };
        let tool_memory = match &config.tool_memory_file {
            Some(p) => ToolMemory::with_file(config.tool_memory_max_ids, 512 << 20, p)?,
            None => ToolMemory::new(config.tool_memory_max_ids, 512 << 20),
        };
        Ok(AppState {
            tool_memory: Arc::new(tool_memory),
            config: Arc::new(config),
            metrics: Arc::new(Metrics::default()),
            engine: Arc::new(OnceLock::new()),
            worker: Arc::new(OnceLock::new()),
            trace,
        })
    }

    /// State with an engine already loaded (tests).
    pub fn with_engine(config: ServerConfig, engine: Arc<dyn Engine>) -> io::Result<AppState> {
        let s = AppState::new(config)?;
        s.set_engine(engine);
        Ok(s)
    }

    /// Installs the loaded engine and starts the worker; the server is then ready.
    pub fn set_engine(&self, engine: Arc<dyn Engine>) {
        let worker = Worker::start(engine.clone(), self.config.max_queue, self.metrics.clone());
        let _ = self.worker.set(worker);
        let _ = self.engine.set(engine);
    }

    /// The engine, once loaded.
    pub fn engine(&self) -> Option<Arc<dyn Engine>> {
        self.engine.get().cloned()
    }

    /// The worker, once the engine is loaded.
    pub fn worker(&self) -> Option<&Worker> {
        self.worker.get()
    }

    /// Stops accepting jobs and cancels the running one (shutdown).
    pub fn shutdown(&self) {
        if let Some(w) = self.worker.get() {
            w.close();
        }
    }

    /// Appends a section to the trace file, if tracing.
    pub fn trace(&self, text: &str) {
        if let Some(t) = &self.trace {
            use std::io::Write;
            let mut f = t.lock().unwrap_or_else(|p| p.into_inner());
            let _ = f.write_all(text.as_bytes());
        }
    }

    /// Whether tracing is on (to skip building trace text otherwise).
    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model_one))
        .route("/v1/chat/completions", post(crate::openai::chat))
        .route("/v1/completions", post(crate::openai::completions))
        .route("/v1/messages", post(crate::anthropic::messages))
        .route(
            "/v1/messages/count_tokens",
            post(crate::anthropic::count_tokens),
        )
        .route("/v1/responses", post(crate::responses::responses))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    ApiError::new(
        Flavor::for_path(&path),
        StatusCode::NOT_FOUND,
        format!("unknown endpoint: {} {path}", req.method()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    ApiError::new(
        Flavor::for_path(&path),
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} not allowed on {path}", req.method()),
    )
}

/// Constant-time equality: the time depends only on the lengths, never on where the
/// first differing byte is.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let x_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    // Evaluate both so the time does not say which header was tried.
    let a = bearer.is_some_and(|b| ct_eq(b.as_bytes(), key.as_bytes()));
    let b = x_key.is_some_and(|b| ct_eq(b.as_bytes(), key.as_bytes()));
    a | b
}

fn endpoint_name(path: &str) -> &'static str {
    match path {
        "/health" | "/v1/health" => "health",
        "/metrics" => "metrics",
        "/v1/models" => "models",
        "/v1/chat/completions" => "chat_completions",
        "/v1/completions" => "completions",
        "/v1/messages" => "messages",
        "/v1/messages/count_tokens" => "count_tokens",
        "/v1/responses" => "responses",
        p if p.starts_with("/v1/models/") => "models",
        _ => "other",
    }
}

fn add_cors(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
}

/// Preflight, authentication, CORS and request counting.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let endpoint = endpoint_name(&path);
    let mut resp = if req.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else if let Some(key) = state
        .config
        .api_key
        .as_deref()
        .filter(|_| endpoint != "health")
        && !authorized(req.headers(), key)
    {
        ApiError::new(
            Flavor::for_path(&path),
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key (send Authorization: Bearer KEY or x-api-key: KEY)",
        )
        .into_response()
    } else {
        next.run(req).await
    };
    if state.config.cors {
        add_cors(&mut resp);
    }
    state.metrics.request(endpoint, resp.status().as_u16());
    resp
}

async fn health(State(state): State<AppState>) -> Response {
    match state.engine() {
        Some(e) => {
            let info = e.info();
            let depth = state.worker().map_or(0, Worker::queue_depth);
            axum::Json(json!({
                "status": "ok",
                "model": SERVED_MODEL_ID,
                "engine_model": info.model_name,
                "n_ctx": info.n_ctx,
                "queue_depth": depth,
                "live_context_tokens": e.live_tokens(),
            }))
            .into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let (live, n_ctx) = state
        .engine()
        .map_or((0, 0), |e| (e.live_tokens(), e.info().n_ctx));
    let depth = state.worker().map_or(0, Worker::queue_depth);
    let mut body = state
        .metrics
        .render(depth, live, n_ctx, state.engine().is_some());
    if let Some(kv) = state.engine().and_then(|e| e.kv_stats()) {
        body.push_str(&crate::metrics::render_kv(&kv));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn model_object(state: &AppState, id: &str) -> Value {
    let n_ctx = state.engine().map_or(0, |e| e.info().n_ctx);
    json!({
        "id": id,
        "object": "model",
        "created": 1767225600u64,
        "owned_by": "ds4",
        "name": "DeepSeek V4 Flash",
        "context_length": n_ctx,
        "top_provider": {
            "context_length": n_ctx,
            "max_completion_tokens": state.config.default_max_tokens.min(n_ctx),
            "is_moderated": false
        },
        "supported_parameters": ["tools", "tool_choice", "max_tokens", "temperature", "top_p",
            "top_k", "min_p", "stop", "seed", "stream", "reasoning_effort"]
    })
}

async fn models(State(state): State<AppState>) -> Response {
    let data: Vec<Value> = [SERVED_MODEL_ID, ALIAS_CHAT, ALIAS_REASONER]
        .iter()
        .map(|id| model_object(&state, id))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn model_one(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if [SERVED_MODEL_ID, ALIAS_CHAT, ALIAS_REASONER].contains(&id.as_str()) {
        axum::Json(model_object(&state, &id)).into_response()
    } else {
        ApiError::new(
            Flavor::OpenAi,
            StatusCode::NOT_FOUND,
            format!("model {id:?} does not exist"),
        )
        .code("model_not_found")
        .param("model")
        .into_response()
    }
}

// ===========================================================================
// Serving with a connection cap.

/// A TCP listener that holds a semaphore permit per open connection: at most
/// `max_connections` are served at once; further clients wait in the kernel backlog.
#[derive(Debug)]
pub struct LimitedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
}

impl LimitedListener {
    /// Wraps `inner` with a cap of `max` connections.
    pub fn new(inner: TcpListener, max: usize) -> LimitedListener {
        LimitedListener {
            inner,
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }
}

/// A connection and its permit (released when the connection closes).
#[derive(Debug)]
pub struct LimitedStream {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    let _ = io.set_nodelay(true);
                    return (
                        LimitedStream {
                            io,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops accepting, cancels
/// the running generation and waits for open connections to finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let app = router(state.clone());
    let listener = LimitedListener::new(listener, state.config.max_connections);
    let st = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            st.shutdown();
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::{LimitedListener, ct_eq};
    use axum::serve::Listener;
    use std::time::Duration;

    /// `--max-connections`: with a cap of 1 a second client is not accepted until the
    /// first connection closes.
    #[tokio::test]
    async fn connection_cap_holds_further_clients_back() {
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = inner.local_addr().expect("addr");
        let mut l = LimitedListener::new(inner, 1);
        let _c1 = tokio::net::TcpStream::connect(addr).await.expect("c1");
        let (first, _) = l.accept().await;
        let _c2 = tokio::net::TcpStream::connect(addr).await.expect("c2");
        let second = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
        assert!(
            second.is_err(),
            "a second connection was accepted past the cap"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), l.accept()).await;
        assert!(
            second.is_ok(),
            "the waiting client was not accepted after a close"
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
    }
}
