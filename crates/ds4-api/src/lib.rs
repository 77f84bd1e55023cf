//! OpenAI- and Anthropic-compatible HTTP serving for coding agents.
//!
//! This is the only crate that knows HTTP and JSON wire types: routes, request parsing,
//! SSE framing, the bounded request queue in front of the one inference worker, and
//! protocol-shaped errors. It drives the model through the [`Engine`] trait, whose real
//! implementation ([`ModelEngine`]) wraps `ds4_model::generate`; tests use
//! [`fake::FakeEngine`] behind the same trait, so the whole HTTP surface is tested
//! in-process without a model (STYLE.md §5).
//!
//! Safe by default: loopback bind (in the binary), optional API key compared in constant
//! time, body and queue limits, user/system/tool text tokenized as plain text (never as
//! control tokens), unguessable tool-call ids, and every bad input answered with a 4xx in
//! the endpoint's own error shape.
//!
//! Modules, in reading order:
//! - [`error`]: [`ApiError`], the OpenAI and Anthropic error envelopes;
//! - [`engine`]: the [`Engine`] trait, its job and result types, [`ModelEngine`];
//! - [`fake`]: a scripted engine for tests;
//! - [`worker`]: the bounded queue and the one inference thread, cancellation;
//! - [`request`]: what every generation endpoint shares: thinking modes, sampling,
//!   ids, the tool-call replay memory;
//! - [`openai`], the endpoints `/v1/chat/completions` and `/v1/completions`;
//! - [`anthropic`], the endpoint `/v1/messages`;
//! - [`responses`], the endpoint `/v1/responses` (Codex CLI);
//! - [`metrics`]: Prometheus counters;
//! - [`server`]: configuration, router, middleware (auth, CORS), health, models, serving
//!   with a connection cap and graceful shutdown.

#![warn(missing_docs)]

pub mod anthropic;
pub mod engine;
pub mod error;
pub mod fake;
pub mod kvdisk;
pub mod metrics;
pub mod openai;
pub mod request;
pub mod responses;
pub mod server;
pub mod worker;

pub use engine::{Engine, EngineInfo, Generation, ModelEngine};
pub use error::{ApiError, Flavor};
pub use kvdisk::{DiskCacheConfig, KvStats};
pub use server::{AppState, ServerConfig, router, serve};
