//! `ds4` without a subcommand: one-shot generation (`-p`), the interactive chat (no
//! prompt, see [`crate::repl`]) and the diagnostics (`--dump-tokens`, `--dump-logits`,
//! `--dump-logprobs`).
//!
//! Flags follow API.md §2.2 (ds4's CLI), plus `--top-k`, `--stop` and the issue-3
//! diagnostics. The generation itself is `ds4_model::generate`, shared with the server.
//! Output (API.md §2.5, with GAP-C2 fixed): the answer streams to stdout; reasoning is
//! dimmed on a terminal, and goes to stderr when stdout is not a terminal, so that a pipe
//! receives only the answer; statistics and progress go to stderr.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ds4_kvcache::DiskCache;
use ds4_model::chat::{ChatMessage, ChatOptions, Role, THINK_MAX_MIN_CTX, ThinkingMode};
use ds4_model::generate::{self, Event, GenOptions, Outcome};
use ds4_model::sampling::SamplingParams;
use ds4_model::tokenizer::{BOS_TEXT, Tokenizer};
use ds4_model::{Engine, LoadOptions, Session};

/// A command-line usage error: printed like clap's and exits with status 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// Compute backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    /// Reference CPU backend.
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// Apple Metal.
    Metal,
}

/// Default model file, looked up in the working directory.
pub const DEFAULT_MODEL: &str = "ds4flash.gguf";
/// Default system prompt (ds4's, without a trailing period).
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant";

/// Flags of `ds4` run/chat (no subcommand).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Model: a ds4 .gguf file or a Hugging Face checkpoint directory. Default:
    /// ./ds4flash.gguf if it exists, else the embedded demo model (random weights).
    #[arg(short = 'm', long, value_name = "MODEL")]
    pub model: Option<PathBuf>,
    /// Prompt text: render it as one user turn, generate the answer, exit. A prompt that
    /// starts with <｜begin▁of▁sentence｜> is used as an already rendered chat prompt.
    #[arg(short = 'p', long, value_name = "TEXT", conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from FILE (whole file, as-is).
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// System prompt; an empty string disables it.
    #[arg(long, value_name = "TEXT", default_value = DEFAULT_SYSTEM)]
    pub system: String,
    /// Context size in tokens.
    #[arg(short = 'c', long, value_name = "N", default_value_t = 32768,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub ctx: u64,
    /// Maximum tokens to generate (reasoning included).
    #[arg(short = 'n', long = "tokens", value_name = "N", default_value_t = 50000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub n_tokens: u64,
    /// Temperature; 0 = greedy.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = float_in(0.0, 100.0))]
    pub temp: f32,
    /// Nucleus (top-p) mass; 1 = off.
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = float_in(0.0, 1.0))]
    pub top_p: f32,
    /// Keep only the K most likely tokens; 0 = off.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub top_k: usize,
    /// Keep tokens with probability >= F x p(best token).
    #[arg(long, value_name = "F", default_value_t = 0.05, value_parser = float_in(0.0, 1.0))]
    pub min_p: f32,
    /// RNG seed for sampling (> 0). Default: from the clock and the process id.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub seed: Option<u64>,
    /// Thinking mode (the default): the model reasons inside <think>...</think> first.
    #[arg(long, group = "mode")]
    pub think: bool,
    /// Non-thinking mode: the model answers directly.
    #[arg(long, group = "mode")]
    pub nothink: bool,
    /// Think Max: thinking plus the maximum-effort prefix; needs --ctx >= 393216, else
    /// normal thinking is used (with a warning).
    #[arg(long, group = "mode")]
    pub think_max: bool,
    /// Stop generating when this text appears (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Tokenize the prompt exactly as written (no BOS, no template; special-token
    /// literals recognised), print ids and vocabulary pieces, exit. Loads no weights.
    #[arg(long)]
    pub dump_tokens: bool,
    /// With --dump-tokens: print {"ids": [...], "pieces": [...]} instead.
    #[arg(long, requires = "dump_tokens")]
    pub json: bool,
    /// Greedy continuation of the (templated) prompt, writing each step's top-k logprobs
    /// as JSON to FILE; nothing on stdout.
    #[arg(long, value_name = "FILE")]
    pub dump_logprobs: Option<PathBuf>,
    /// Alternatives per step for --dump-logprobs (at most 128).
    #[arg(long, value_name = "K", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=128))]
    pub logprobs_top_k: u64,
    /// Raw prompt token ids for --dump-logits, comma separated (no BOS added).
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    pub prompt_tokens: Vec<u32>,
    /// Write float32 logits [n_tokens, vocab] of --prompt-tokens as .npy (row t = logits
    /// after token t), then exit.
    #[arg(long, value_name = "OUT.npy", requires = "prompt_tokens")]
    pub dump_logits: Option<PathBuf>,
    /// With --dump-logits: feed the tokens one at a time (decode path) instead of one
    /// batched prefill.
    #[arg(long, requires = "dump_logits")]
    pub decode: bool,
    /// Prefill chunk: most tokens evaluated in one batched step.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk: u64,
    /// Worker threads for the CPU backend. Default: all cores (env DS4_THREADS overrides).
    #[arg(short = 't', long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=256))]
    pub threads: Option<u64>,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = BackendArg::Cpu)]
    pub backend: BackendArg,
    /// Do not simulate the FP8 KV / FP4 indexer rounding of the trained model (to compare
    /// with transformers or llama.cpp, which do not simulate it).
    #[arg(long)]
    pub no_qat_sim: bool,
    /// Disk KV cache (`--kv-disk-dir`, `--kv-cache-*`).
    #[command(flatten)]
    pub kv: ds4_kvcache::KvCacheArgs,
}

fn float_in(
    lo: f32,
    hi: f32,
) -> impl Fn(&str) -> std::result::Result<f32, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: f32 = s.parse().map_err(|_| format!("not a number: {s}"))?;
        if v.is_finite() && (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(format!("must be in [{lo}, {hi}]"))
        }
    }
}

impl RunArgs {
    /// The thinking mode requested by the flags.
    pub fn thinking(&self) -> ThinkingMode {
        if self.nothink {
            ThinkingMode::None
        } else if self.think_max {
            ThinkingMode::Max
        } else {
            ThinkingMode::High
        }
    }

    /// Sampling parameters from the flags.
    pub fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed.unwrap_or_else(time_seed),
        }
    }

    fn load_options(&self) -> LoadOptions {
        LoadOptions {
            qat_sim: !self.no_qat_sim,
            prefill_chunk: self.chunk as usize,
            device: self.backend.device(),
            upload_progress: (self.backend != BackendArg::Cpu).then(crate::gpu::upload_progress),
        }
    }

    fn prompt_text(&self) -> Result<Option<String>> {
        if let Some(p) = &self.prompt {
            return Ok(Some(p.clone()));
        }
        match &self.prompt_file {
            Some(f) => std::fs::read_to_string(f)
                .map(Some)
                .map_err(|e| usage(format!("cannot read prompt file {}: {e}", f.display()))),
            None => Ok(None),
        }
    }
}

/// A seed from the clock and the process id (never 0).
pub fn time_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (t ^ ((std::process::id() as u64) << 32)).max(1)
}

/// Runs `ds4` without a subcommand.
pub fn run(args: &RunArgs) -> Result<()> {
    check_backend(args.backend)?;
    setup_threads(args.threads)?;
    if args.dump_tokens {
        return dump_tokens(args);
    }
    if let Some(out) = &args.dump_logits {
        return dump_logits(args, out);
    }
    if args.think_max && (args.ctx as usize) < THINK_MAX_MIN_CTX {
        eprintln!(
            "ds4: warning: --think-max needs --ctx >= {THINK_MAX_MIN_CTX}; ctx={} uses normal thinking instead",
            args.ctx
        );
    }
    let prompt = args.prompt_text()?;
    // Bad --kv-cache-* values are usage errors, reported before the model loads.
    crate::kvcache::config(&args.kv)?;
    let engine = load_engine(args)?;
    if let Some(file) = &args.dump_logprobs {
        let Some(text) = prompt else {
            return Err(usage(
                "--dump-logprobs needs a prompt (-p or --prompt-file)",
            ));
        };
        return dump_logprobs(args, &engine, &text, file);
    }
    match prompt {
        Some(text) => one_shot(args, &engine, &text),
        None => crate::repl::run(args, &engine),
    }
}

fn check_backend(b: BackendArg) -> Result<()> {
    match b {
        BackendArg::Cpu => Ok(()),
        // The probe names what is missing (driver, device, NVRTC); loading then uploads
        // the weights (LoadOptions::device).
        BackendArg::Cuda => match ds4_backend_cuda::probe() {
            Ok(_) => Ok(()),
            Err(e) => bail!("--backend cuda: {e}"),
        },
        BackendArg::Metal => match ds4_backend_metal::probe() {
            Ok(()) => bail!(
                "--backend metal: the backend is present but ds4 cannot run models on it yet; use --backend cpu"
            ),
            Err(msg) => bail!("--backend metal: {msg}"),
        },
    }
}

impl BackendArg {
    /// The device this flag selects.
    pub fn device(self) -> ds4_model::device::Device {
        use ds4_model::device::Device;
        match self {
            BackendArg::Cpu => Device::Cpu,
            BackendArg::Cuda => Device::Cuda,
            BackendArg::Metal => Device::Metal,
        }
    }

    /// The flag's value as typed.
    pub fn name(self) -> &'static str {
        match self {
            BackendArg::Cpu => "cpu",
            BackendArg::Cuda => "cuda",
            BackendArg::Metal => "metal",
        }
    }
}

fn setup_threads(flag: Option<u64>) -> Result<()> {
    let env = std::env::var("DS4_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0);
    if let Some(n) = flag.map(|n| n as usize).or(env) {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("configuring threads")?;
    }
    Ok(())
}

/// Where the model comes from when `-m` is not given.
fn model_path(args: &RunArgs) -> Option<PathBuf> {
    match &args.model {
        Some(p) => Some(p.clone()),
        None => {
            let p = Path::new(DEFAULT_MODEL);
            p.exists().then(|| p.to_path_buf())
        }
    }
}

fn say_demo() {
    eprintln!(
        "ds4: no -m given and ./{DEFAULT_MODEL} not found: using the embedded demo model ({}); its output is gibberish",
        ds4_model::demo::NAME
    );
}

/// Loads the model (with a spinner on a terminal).
pub fn load_engine(args: &RunArgs) -> Result<Engine> {
    let path = model_path(args);
    if path.is_none() {
        say_demo();
    }
    // A GPU backend draws its own upload progress bar instead of the spinner.
    let spinner = match args.backend {
        BackendArg::Cpu => spinner(match &path {
            Some(p) => format!("loading {}", p.display()),
            None => "building the demo model".to_string(),
        }),
        _ => None,
    };
    let t0 = Instant::now();
    let engine = match &path {
        Some(p) => Engine::load(p, &args.load_options())
            .with_context(|| format!("loading model {}", p.display()))?,
        None => Engine::demo(&args.load_options()).context("building the demo model")?,
    };
    if let Some(s) = spinner {
        s.finish_and_clear();
    }
    let c = engine.model.config();
    eprintln!(
        "ds4: model {} ({} layers, hidden {}, vocab {}) loaded in {:.2}s; ctx={}, backend={}",
        engine.name,
        c.n_layer,
        c.n_embd,
        c.n_vocab,
        t0.elapsed().as_secs_f64(),
        args.ctx,
        args.backend.name()
    );
    Ok(engine)
}

fn spinner(msg: String) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.set_message(msg);
    s.enable_steady_tick(Duration::from_millis(100));
    Some(s)
}

// ---------------------------------------------------------------------------
// --dump-tokens

fn dump_tokens(args: &RunArgs) -> Result<()> {
    let Some(text) = args.prompt_text()? else {
        return Err(usage("--dump-tokens needs a prompt (-p or --prompt-file)"));
    };
    let tok: Arc<Tokenizer> = match model_path(args) {
        Some(p) => Arc::new(
            ds4_model::engine::load_tokenizer(&p)
                .with_context(|| format!("reading the tokenizer of {}", p.display()))?,
        ),
        None => {
            say_demo();
            ds4_model::demo::tokenizer()?
        }
    };
    let ids = tok.encode(&text, true);
    let pieces: Vec<String> = ids
        .iter()
        .map(|&id| tok.vocab_string(id).unwrap_or_default())
        .collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if args.json {
        serde_json::to_writer(&mut out, &serde_json::json!({"ids": ids, "pieces": pieces}))?;
        writeln!(out)?;
    } else {
        let list: Vec<String> = ids.iter().map(u32::to_string).collect();
        writeln!(out, "[{}]", list.join(", "))?;
        for (id, piece) in ids.iter().zip(&pieces) {
            writeln!(out, "{id:>6}  {piece}")?;
        }
    }
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// --dump-logits

fn dump_logits(args: &RunArgs, out: &Path) -> Result<()> {
    let ids = &args.prompt_tokens;
    if ids.is_empty() {
        return Err(usage("--dump-logits needs --prompt-tokens"));
    }
    let engine = load_engine(args)?;
    let n_vocab = engine.model.config().n_vocab;
    let ctx = (args.ctx as usize).max(ids.len());
    let mut session = Session::new(&engine.model, ctx);
    let t0 = Instant::now();
    let logits = if args.decode {
        let mut all = Vec::with_capacity(ids.len() * n_vocab);
        for &id in ids {
            session.feed(&[id])?;
            all.extend_from_slice(session.logits()?);
        }
        all
    } else {
        session.feed_all_logits(ids)?
    };
    write_npy_f32(out, &[ids.len(), n_vocab], &logits)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "ds4: wrote logits [{}, {n_vocab}] to {} ({:.2}s, {})",
        ids.len(),
        out.display(),
        t0.elapsed().as_secs_f64(),
        if args.decode { "decode" } else { "prefill" }
    );
    Ok(())
}

/// Writes a float32 little-endian C-order .npy file.
pub fn write_npy_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_txt = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// One-shot generation

/// Token ids of a one-shot prompt (API.md §2.3) and whether it ends in thinking mode.
pub fn one_shot_prompt(args: &RunArgs, tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, bool)> {
    if text.starts_with(BOS_TEXT) {
        let ids = tok.encode(text, true);
        let thinking = ids.last() == Some(&tok.specials().think);
        return Ok((ids, thinking));
    }
    let mut msgs = Vec::new();
    if !args.system.is_empty() {
        msgs.push(ChatMessage::new(Role::System, args.system.clone()));
    }
    msgs.push(ChatMessage::new(Role::User, text));
    let opts = ChatOptions {
        thinking: args.thinking(),
        ctx_size: args.ctx as usize,
        ..ChatOptions::default()
    };
    Ok(generate::prompt_tokens(tok, &msgs, &opts)?)
}

fn one_shot(args: &RunArgs, engine: &Engine, text: &str) -> Result<()> {
    let tok = engine.tokenizer()?;
    let (prompt, thinking) = one_shot_prompt(args, tok, text)?;
    let disk = crate::kvcache::open(&args.kv, engine)?;
    let mut session = Session::new(&engine.model, args.ctx as usize);
    let mut cancel = None;
    if disk.is_some() {
        // With a disk cache, Ctrl+C ends the answer cleanly so the exit save runs; a second
        // Ctrl+C exits at once without saving (as ds4-server does).
        let flag = Arc::new(AtomicBool::new(false));
        let c = flag.clone();
        ctrlc::set_handler(move || {
            if c.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        })
        .context("installing the Ctrl+C handler")?;
        cancel = Some(flag);
    }
    let opts = GenOptions {
        sampling: args.sampling(),
        stop: args.stop.clone(),
        max_tokens: args.n_tokens as usize,
        thinking,
        prefill_chunk: args.chunk as usize,
        cancel,
        ..GenOptions::default()
    };
    let result = run_generation(&mut session, tok, &prompt, &opts, disk.as_ref());
    if let Ok(outcome) = &result {
        print_stats(outcome);
    }
    if let Some(d) = &disk {
        let saved = d.shutdown(&session);
        crate::kvcache::print_stats(&d.stats(), saved);
    }
    result.map(|_| ())
}

/// Runs one generation, printing as it goes (shared with the REPL). With a disk KV cache,
/// the longest stored prefix is restored first and checkpoints are saved on the way.
pub fn run_generation(
    session: &mut Session<'_>,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenOptions,
    disk: Option<&DiskCache>,
) -> Result<Outcome> {
    let mut printer = Printer::new();
    let mut progress = PrefillProgress::new();
    let t0 = Instant::now();
    let prefed = match disk {
        Some(d) => {
            let p = d.before_generate(
                session,
                None,
                prompt,
                opts.cancel.as_deref(),
                &mut |done, total| progress.update(done, total),
            )?;
            crate::kvcache::print_prepared(&p, prompt.len());
            p.prefed
        }
        None => 0,
    };
    let result = generate::generate_observed(
        session,
        tok,
        prompt,
        opts,
        None,
        &mut |done, total| progress.update(done + prefed, total + prefed),
        &mut |ev| printer.event(ev),
        &mut |s| {
            if let Some(d) = disk {
                d.after_token(s);
            }
        },
    );
    progress.finish();
    printer.end();
    let mut outcome = result?;
    // Tokens prefilled to reach the save points were work of this prompt, not reuse.
    outcome.usage.cached_tokens = outcome.usage.cached_tokens.saturating_sub(prefed);
    outcome.timings.prefill_tokens += prefed;
    if disk.is_some() {
        // The restore and the prefill up to the save points belong to the prompt's time.
        let before =
            t0.elapsed().as_secs_f64() - outcome.timings.prefill_secs - outcome.timings.decode_secs;
        outcome.timings.prefill_secs += before.max(0.0);
    }
    Ok(outcome)
}

/// Prints statistics of a generation to stderr.
pub fn print_stats(o: &Outcome) {
    let reason = o
        .finish_reason
        .map(|r| format!("{r:?}"))
        .unwrap_or_default();
    eprintln!(
        "ds4: prompt {} tokens ({} reused), prefill: {:.2} t/s, generation: {:.2} t/s ({} tokens, {})",
        o.usage.prompt_tokens,
        o.usage.cached_tokens,
        o.timings.prefill_tps(),
        o.timings.decode_tps(),
        o.usage.completion_tokens,
        reason
    );
    if let Some(e) = &o.tool_error {
        eprintln!("ds4: tool block not parsed: {e}");
    }
}

/// A prefill progress bar on stderr, shown only on a terminal and only once the prefill
/// has taken more than a second.
struct PrefillProgress {
    started: Instant,
    bar: Option<indicatif::ProgressBar>,
    tty: bool,
}

impl PrefillProgress {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        if done == 0 {
            self.started = Instant::now();
        }
        if self.bar.is_none()
            && self.tty
            && done < total
            && self.started.elapsed() > Duration::from_secs(1)
        {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "processing {pos}/{len} input tokens [{bar:30}] {percent}% {per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            self.bar = Some(bar);
        }
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

const DIM: &str = "\x1b[90m";
const RESET: &str = "\x1b[0m";

/// Streams events: content to stdout, reasoning dimmed on a terminal or to stderr when
/// stdout is piped, tool calls as marked lines.
struct Printer {
    stdout_tty: bool,
    stderr_tty: bool,
    in_reasoning: bool,
    /// Last byte written to stdout (to end the output with a newline).
    last_out: Option<u8>,
    last_reason: Option<u8>,
}

impl Printer {
    fn new() -> Self {
        Self {
            stdout_tty: std::io::stdout().is_terminal(),
            stderr_tty: std::io::stderr().is_terminal(),
            in_reasoning: false,
            last_out: None,
            last_reason: None,
        }
    }

    fn out(&mut self, s: &str) {
        if s.is_empty() {
            return;
        }
        let mut o = std::io::stdout().lock();
        // A closed stdout ends the output silently; generation still completes.
        let _ = o.write_all(s.as_bytes());
        let _ = o.flush();
        self.last_out = s.as_bytes().last().copied();
    }

    fn end_reasoning(&mut self) {
        if !self.in_reasoning {
            return;
        }
        self.in_reasoning = false;
        let nl = if self.last_reason == Some(b'\n') {
            ""
        } else {
            "\n"
        };
        if self.stdout_tty {
            self.out(&format!("{nl}{RESET}"));
            self.last_out = Some(b'\n');
        } else {
            let mut e = std::io::stderr().lock();
            let end = if self.stderr_tty { RESET } else { "" };
            let _ = write!(e, "{nl}{end}");
            if !self.stderr_tty {
                let _ = writeln!(e, "--- end of reasoning ---");
            }
        }
    }

    fn event(&mut self, ev: Event) {
        match ev {
            Event::Reasoning(t) => {
                if !self.in_reasoning {
                    self.in_reasoning = true;
                    if self.stdout_tty {
                        self.out(DIM);
                    } else {
                        let mut e = std::io::stderr().lock();
                        if self.stderr_tty {
                            let _ = write!(e, "{DIM}");
                        } else {
                            let _ = writeln!(e, "--- reasoning ---");
                        }
                    }
                }
                self.last_reason = t.as_bytes().last().copied();
                if self.stdout_tty {
                    self.out(&t);
                } else {
                    let mut e = std::io::stderr().lock();
                    let _ = e.write_all(t.as_bytes());
                    let _ = e.flush();
                }
            }
            Event::Content(t) => {
                self.end_reasoning();
                self.out(&t);
            }
            Event::ToolCallStart { .. } | Event::ToolCallArgs { .. } => {}
            Event::ToolCall(c) => {
                self.end_reasoning();
                self.out(&format!("\n[tool call] {}({})\n", c.name, c.arguments));
            }
            Event::Done { .. } => self.end_reasoning(),
        }
    }

    fn end(&mut self) {
        self.end_reasoning();
        if self.last_out.is_some_and(|b| b != b'\n') {
            self.out("\n");
        }
    }
}

// ---------------------------------------------------------------------------
// --dump-logprobs

fn dump_logprobs(args: &RunArgs, engine: &Engine, text: &str, file: &Path) -> Result<()> {
    use serde_json::json;
    let tok = engine.tokenizer()?;
    let (prompt, _) = one_shot_prompt(args, tok, text)?;
    let ctx = args.ctx as usize;
    if prompt.len() >= ctx {
        bail!("prompt processing failed: prompt exceeds context");
    }
    let mut session = Session::new(&engine.model, ctx);
    session.feed(&prompt)?;
    let k = args.logprobs_top_k as usize;
    let eos = tok.specials().eos;
    let token_json = |id: u32| {
        let bytes = tok.token_to_piece(id).unwrap_or_default().to_vec();
        let text: String = match std::str::from_utf8(&bytes) {
            Ok(s) => s.to_string(),
            Err(_) => bytes
                .iter()
                .map(|&b| if b < 0x80 { b as char } else { char::from(b) })
                .collect(),
        };
        json!({"id": id, "text": text, "bytes": bytes})
    };
    let mut steps = Vec::new();
    let max_steps = (args.n_tokens as usize).min(ctx - prompt.len());
    for step in 0..max_steps {
        let logits = session.logits()?;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max as f64
            + logits
                .iter()
                .map(|&l| ((l - max) as f64).exp())
                .sum::<f64>()
                .ln();
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let kk = k.min(order.len());
        order.select_nth_unstable_by(kk - 1, |&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        order.truncate(kk);
        order.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        let selected = order[0];
        let top: Vec<_> = order
            .iter()
            .map(|&id| {
                let l = logits[id as usize];
                json!({"token": token_json(id), "logit": l, "logprob": l as f64 - lse})
            })
            .collect();
        steps.push(json!({"step": step, "selected": token_json(selected), "top_logprobs": top}));
        if selected == eos || step + 1 == max_steps {
            break;
        }
        session.feed(&[selected])?;
    }
    let doc = json!({
        "source": "ds4-rs",
        "prompt_tokens": prompt.len(),
        "ctx": ctx,
        "top_k": k,
        "steps": steps,
    });
    std::fs::write(file, serde_json::to_vec(&doc)?)
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!(
        "ds4: wrote {} logprob steps to {}",
        steps.len(),
        file.display()
    );
    Ok(())
}
