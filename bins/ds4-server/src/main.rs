//! `ds4-server`: OpenAI- and Anthropic-compatible HTTP for coding agents.
//!
//! Not implemented yet (the server issue): it says so and exits non-zero rather than
//! pretending to serve.

fn main() -> std::process::ExitCode {
    eprintln!("ds4-server: not implemented yet; see the README status table");
    std::process::ExitCode::FAILURE
}
