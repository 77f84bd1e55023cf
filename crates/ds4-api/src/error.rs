//! API errors and their wire shapes.
//!
//! Every endpoint answers errors in its own protocol's envelope (API.md §3.12, GAP-S21):
//! OpenAI-style endpoints `{"error":{"message","type","code","param"}}`, `/v1/messages`
//! Anthropic's `{"type":"error","error":{"type","message"}}`. The error type follows the
//! status (`invalid_request_error`, `authentication_error`, `not_found_error`,
//! `rate_limit_error`, `overloaded_error`, `server_error`/`api_error`). Client errors are
//! not logged as server errors.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// Which protocol's error envelope to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, everything else).
    OpenAi,
    /// Anthropic (`/v1/messages`).
    Anthropic,
}

impl Flavor {
    /// The flavour of a request path.
    pub fn for_path(path: &str) -> Flavor {
        if path.starts_with("/v1/messages") {
            Flavor::Anthropic
        } else {
            Flavor::OpenAi
        }
    }
}

/// An error answered to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Envelope to use.
    pub flavor: Flavor,
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI `code` (e.g. `context_length_exceeded`).
    pub code: Option<&'static str>,
    /// OpenAI `param` (the offending request field).
    pub param: Option<String>,
    /// Extra members of the error object (`n_prompt_tokens`, `n_ctx`).
    pub extra: Map<String, Value>,
    /// Seconds for a `Retry-After` header (429/503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(flavor: Flavor, status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            flavor,
            status,
            message: message.into(),
            code: None,
            param: None,
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// 400 invalid request.
    pub fn bad_request(flavor: Flavor, message: impl Into<String>) -> ApiError {
        ApiError::new(flavor, StatusCode::BAD_REQUEST, message)
    }

    /// Sets the OpenAI `param`.
    pub fn param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    /// Sets the OpenAI `code`.
    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    /// The prompt does not fit in the context (`prompt_tokens >= n_ctx`: generation needs
    /// at least one free slot).
    pub fn context_exceeded(
        flavor: Flavor,
        param: &str,
        n_prompt: usize,
        n_ctx: usize,
    ) -> ApiError {
        let mut e = ApiError::bad_request(
            flavor,
            format!(
                "Prompt has {n_prompt} tokens, but the configured context size is {n_ctx} tokens"
            ),
        )
        .param(param)
        .code("context_length_exceeded");
        e.extra.insert("n_prompt_tokens".into(), json!(n_prompt));
        e.extra.insert("n_ctx".into(), json!(n_ctx));
        e
    }

    /// The error `type` string for this status and flavour.
    pub fn kind(&self) -> &'static str {
        let s = self.status.as_u16();
        match (self.flavor, s) {
            (_, 401) => "authentication_error",
            (Flavor::Anthropic, 403) => "permission_error",
            (_, 404) => "not_found_error",
            (Flavor::Anthropic, 413) => "request_too_large",
            (_, 429) => "rate_limit_error",
            (Flavor::Anthropic, 503) => "overloaded_error",
            (Flavor::OpenAi, 503) => "server_error",
            (Flavor::Anthropic, 500..) => "api_error",
            (Flavor::OpenAi, 500..) => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        let mut err = Map::new();
        match self.flavor {
            Flavor::OpenAi => {
                err.insert("message".into(), json!(self.message));
                err.insert("type".into(), json!(self.kind()));
                err.insert("param".into(), json!(self.param));
                err.insert("code".into(), json!(self.code));
                err.extend(self.extra.clone());
                json!({ "error": err })
            }
            Flavor::Anthropic => {
                err.insert("type".into(), json!(self.kind()));
                err.insert("message".into(), json!(self.message));
                err.extend(self.extra.clone());
                json!({ "type": "error", "error": err })
            }
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() && self.status != StatusCode::SERVICE_UNAVAILABLE {
            eprintln!("ds4-server: error: {}", self.message);
        }
        let mut text = self.body().to_string();
        text.push('\n');
        let mut resp = (self.status, text).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
