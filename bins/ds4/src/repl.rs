//! The interactive chat (API.md §2.6): a multi-turn transcript of token ids and one live
//! session, so each turn only prefills its new text.
//!
//! The transcript is BOS, the optional Think-Max prefix, the system text, then per turn
//! `<｜User｜>` text `<｜Assistant｜>` `<think>`/`</think>`, every generated token (the
//! reasoning included, like ds4) and EOS. `ds4_model::generate` reuses the session
//! whenever it holds a prefix of the transcript.
//!
//! Ctrl+C during prefill or generation sets the cancel flag (a SIGINT handler); the
//! generation stops at the next chunk or token and the prompt returns. A turn that
//! produced nothing is rolled back. Ctrl+C at the prompt is ignored, Ctrl+D exits.
//!
//! With `--kv-disk-dir` each turn first restores the longest stored prefix of the
//! transcript, `/clear` and `/ctx` save the conversation being dropped (evict), and leaving
//! (`/quit`, Ctrl+D) saves it (shutdown), so a later `ds4` resumes it from disk.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use ds4_kvcache::DiskCache;
use ds4_model::chat::{REASONING_EFFORT_MAX_PREFIX, THINK_MAX_MIN_CTX, ThinkingMode};
use ds4_model::generate::{FinishReason, GenOptions};
use ds4_model::tokenizer::Tokenizer;
use ds4_model::{Engine, Session};
use rustyline::config::Configurer;
use rustyline::error::ReadlineError;

use crate::run::{RunArgs, print_stats, run_generation};

const HELP: &str = "\
Commands:
  /help         this help
  /think        thinking mode (reasoning first; the default)
  /think-max    Think Max (needs /ctx >= 393216)
  /nothink      answer directly, no reasoning
  /ctx N        new session with context N (the transcript is kept and re-read)
  /read FILE    send the content of FILE as the next message
  /clear        forget the conversation
  /quit, /exit  leave (or Ctrl+D)
Ctrl+C stops the current answer.";

struct Chat<'e> {
    tok: &'e Tokenizer,
    session: Session<'e>,
    disk: Option<DiskCache>,
    engine: &'e Engine,
    transcript: Vec<u32>,
    mode: ThinkingMode,
    ctx: usize,
    system: String,
}

impl<'e> Chat<'e> {
    /// The transcript head: BOS, Think-Max prefix (in max mode), system text.
    fn head(&self) -> Vec<u32> {
        let mut t = vec![self.tok.specials().bos];
        if self.mode == ThinkingMode::Max {
            t.extend(self.tok.encode(REASONING_EFFORT_MAX_PREFIX, false));
        }
        if !self.system.is_empty() {
            t.extend(self.tok.encode(&self.system, false));
        }
        t
    }

    /// The session is about to be dropped: keep it on disk first (evict save).
    fn evict(&self) {
        if let Some(n) = self.disk.as_ref().and_then(|d| d.evict(&self.session)) {
            eprintln!("ds4: kv cache: saving the conversation ({n} tokens)");
        }
    }

    fn set_mode(&mut self, mode: ThinkingMode) -> &'static str {
        let mode = if mode == ThinkingMode::Max && self.ctx < THINK_MAX_MIN_CTX {
            eprintln!(
                "ds4: warning: /think-max needs /ctx >= {THINK_MAX_MIN_CTX}; using normal thinking"
            );
            ThinkingMode::High
        } else {
            mode
        };
        let had_prefix = self.mode == ThinkingMode::Max;
        let old_head = self.head().len();
        self.mode = mode;
        if had_prefix != (mode == ThinkingMode::Max) {
            // The Think-Max prefix sits right after BOS: rebuild the head (the session is
            // re-read from scratch on the next turn).
            let rest = self
                .transcript
                .split_off(old_head.min(self.transcript.len()));
            self.transcript = self.head();
            self.transcript.extend(rest);
        }
        match mode {
            ThinkingMode::None => "Thinking mode: none.",
            ThinkingMode::High => "Thinking mode: high.",
            ThinkingMode::Max => "Thinking mode: max.",
        }
    }

    fn turn(&mut self, args: &RunArgs, text: &str, cancel: &Arc<AtomicBool>) -> Result<()> {
        let sp = self.tok.specials();
        let rollback = self.transcript.len();
        self.transcript.push(sp.user);
        self.transcript.extend(self.tok.encode(text, false));
        self.transcript.push(sp.assistant);
        let thinking = self.mode != ThinkingMode::None;
        self.transcript
            .push(if thinking { sp.think } else { sp.think_end });
        cancel.store(false, Ordering::SeqCst);
        let opts = GenOptions {
            sampling: args.sampling(),
            stop: args.stop.clone(),
            max_tokens: args.n_tokens as usize,
            thinking,
            prefill_chunk: (args.chunk as usize).min(64),
            cancel: Some(cancel.clone()),
            ..GenOptions::default()
        };
        let result = run_generation(
            &mut self.session,
            self.tok,
            &self.transcript,
            &opts,
            self.disk.as_ref(),
        );
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                self.transcript.truncate(rollback);
                eprintln!("ds4: prompt processing failed: {e:#}");
                return Ok(());
            }
        };
        if outcome.tokens.is_empty() && outcome.finish_reason == Some(FinishReason::Cancelled) {
            self.transcript.truncate(rollback);
            eprintln!("ds4: interrupted");
            return Ok(());
        }
        self.transcript.extend_from_slice(&outcome.tokens);
        self.transcript.push(sp.eos);
        if outcome.finish_reason == Some(FinishReason::Cancelled) {
            eprintln!("ds4: interrupted");
        }
        print_stats(&outcome);
        Ok(())
    }
}

fn history_path() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".ds4_history"),
        None => PathBuf::from(".ds4_history"),
    }
}

/// Runs the interactive chat until `/quit` or Ctrl+D.
pub fn run(args: &RunArgs, engine: &Engine) -> Result<()> {
    let tok = engine.tokenizer()?.as_ref();
    let ctx = args.ctx as usize;
    let disk = crate::kvcache::open(&args.kv, engine)?;
    let mut chat = Chat {
        tok,
        session: Session::new(&engine.model, ctx),
        disk,
        engine,
        transcript: Vec::new(),
        mode: ThinkingMode::High,
        ctx,
        system: args.system.clone(),
    };
    chat.set_mode(args.thinking());
    chat.transcript = chat.head();

    let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let c = cancel.clone();
        // Ctrl+C while generating: stop at the next token. The prompt itself reads keys in
        // raw mode, where Ctrl+C is a key, not a signal. Installed after the editor on
        // purpose: rustyline takes SIGINT over when it opens the terminal, and ours must win.
        ctrlc::set_handler(move || c.store(true, Ordering::SeqCst))
            .context("installing the Ctrl+C handler")?;
    }
    let history = history_path();
    let _ = rl.set_max_history_size(512);
    // A missing history file is normal on first use.
    let _ = rl.load_history(&history);
    if std::io::stdout().is_terminal() {
        println!(
            "ds4 interactive chat with {}. /help for commands.",
            engine.name
        );
    }
    println!("{HELP}");
    loop {
        let line = match rl.readline("ds4> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("reading input"),
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line);
        let message = if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = match cmd.split_once(char::is_whitespace) {
                Some((n, a)) => (n, a.trim()),
                None => (cmd, ""),
            };
            match name {
                "help" => {
                    println!("{HELP}");
                    continue;
                }
                "quit" | "exit" => break,
                "think" => {
                    println!("{}", chat.set_mode(ThinkingMode::High));
                    continue;
                }
                "think-max" => {
                    let msg = chat.set_mode(ThinkingMode::Max);
                    if chat.mode == ThinkingMode::High {
                        println!("Thinking mode: high (ctx below {THINK_MAX_MIN_CTX}).");
                    } else {
                        println!("{msg}");
                    }
                    continue;
                }
                "nothink" => {
                    println!("{}", chat.set_mode(ThinkingMode::None));
                    continue;
                }
                "ctx" => {
                    match arg.parse::<usize>() {
                        Ok(n) if n > 0 => {
                            chat.evict();
                            chat.ctx = n;
                            chat.session = Session::new(&chat.engine.model, n);
                            println!(
                                "Context: {n} tokens (the conversation is re-read next turn)."
                            );
                        }
                        _ => eprintln!("ds4: /ctx needs a positive number"),
                    }
                    continue;
                }
                "clear" => {
                    chat.evict();
                    chat.transcript = chat.head();
                    chat.session.reset();
                    println!("Conversation cleared.");
                    continue;
                }
                "read" => match std::fs::read_to_string(arg) {
                    Ok(text) if !arg.is_empty() => text,
                    Ok(_) => {
                        eprintln!("ds4: /read needs a file name");
                        continue;
                    }
                    Err(e) => {
                        eprintln!("ds4: cannot read {arg}: {e}");
                        continue;
                    }
                },
                _ => {
                    eprintln!("ds4: unknown command: /{name}");
                    continue;
                }
            }
        } else {
            line.to_string()
        };
        chat.turn(args, &message, &cancel)?;
        let _ = std::io::stdout().flush();
    }
    let _ = rl.save_history(&history);
    if let Some(d) = &chat.disk {
        let saved = d.shutdown(&chat.session);
        crate::kvcache::print_stats(&d.stats(), saved);
    }
    Ok(())
}
