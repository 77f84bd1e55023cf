//! OpenAI- and Anthropic-compatible HTTP serving for coding agents.
//!
//! This is the only crate that knows HTTP and JSON wire types: routes, request parsing,
//! SSE framing, the request queue in front of the one inference worker, and API-shaped
//! errors. It drives the model through `ds4-model` and reuses prefixes through `ds4-kvcache`.
//!
//! Status: not implemented yet (the server issue).

#![warn(missing_docs)]
