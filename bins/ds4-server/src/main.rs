//! `ds4-server`: OpenAI- and Anthropic-compatible HTTP for coding agents.
//!
//! Thin by design: parse flags, bind, load the model in the background (so `/health`
//! answers 503 "loading" meanwhile), serve `ds4_api::router` until SIGINT/SIGTERM.
//! Everything HTTP lives in `ds4-api`; see docs/SERVER.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ds4_api::{AppState, DiskCacheConfig, ModelEngine, ServerConfig};
use ds4_model::LoadOptions;

/// OpenAI- and Anthropic-compatible HTTP server for DeepSeek V4 Flash.
#[derive(Debug, Parser)]
#[command(name = "ds4-server", version)]
struct Args {
    /// GGUF model (or checkpoint directory). Default: ./ds4flash.gguf if it exists, else
    /// the embedded demo model (random weights; for trying the API only).
    #[arg(short = 'm', long = "model")]
    model: Option<PathBuf>,
    /// Bind address (IPv4, IPv6 or hostname). Non-loopback without --api-key is warned about.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Bind port (0 = any free port; the chosen one is logged).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Context size of the session, in tokens.
    #[arg(short = 'c', long = "ctx", default_value_t = 32768, value_parser = clap::value_parser!(u64).range(1..))]
    ctx: u64,
    /// Default max output tokens when a request sets none (clamped to the room left).
    #[arg(short = 'n', long = "tokens", default_value_t = 393_216, value_parser = clap::value_parser!(u64).range(1..))]
    tokens: u64,
    /// CPU threads for inference (default: rayon's choice, or DS4_THREADS).
    #[arg(short = 't', long = "threads", value_parser = clap::value_parser!(u64).range(1..=256))]
    threads: Option<u64>,
    /// Backend: cpu or cuda (NVIDIA GPU 0; weights are uploaded to it at load).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Require this API key (`Authorization: Bearer KEY` or `x-api-key: KEY`) on every
    /// request except /health.
    #[arg(long = "api-key", env = "DS4_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Add permissive CORS headers to every response.
    #[arg(long)]
    cors: bool,
    /// Write a human-readable trace of every request (full prompts and outputs) to FILE.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Largest request body in MiB (413 past it).
    #[arg(long = "max-body-mb", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_body_mb: u64,
    /// Open connections served at once (others wait in the backlog).
    #[arg(long = "max-connections", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Requests that may wait for the worker; past it: 429 with Retry-After.
    #[arg(long = "max-queue", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    max_queue: u64,
    /// Disable the tool-id -> sampled-DSML replay map (history is rendered canonically).
    #[arg(long = "disable-exact-dsml-tool-replay")]
    disable_exact_replay: bool,
    /// Max tool ids kept in the replay map.
    #[arg(long = "tool-memory-max-ids", default_value_t = 100_000)]
    tool_memory_max_ids: usize,
    /// Disk KV cache (`--kv-disk-dir`, `--kv-disk-space-mb`, `--kv-cache-*`), shared with
    /// the `ds4` CLI.
    #[command(flatten)]
    kv: ds4_kvcache::KvCacheArgs,
}

/// Large heap blocks (activation buffers) on cache-line boundaries for the SIMD kernels.
#[global_allocator]
static ALLOC: ds4_tensor::alloc::CacheLineAlloc = ds4_tensor::alloc::CacheLineAlloc;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ds4-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let device: ds4_model::device::Device = match args.backend.parse() {
        Ok(d) => d,
        Err(e) => bail!("--backend: {e}"),
    };
    // Fail before binding the port when the GPU is missing (a normal user mistake).
    match device {
        ds4_model::device::Device::Cpu => {}
        ds4_model::device::Device::Cuda => {
            if let Err(e) = ds4_backend_cuda::probe() {
                bail!("--backend cuda: {e}");
            }
        }
        ds4_model::device::Device::Metal => {
            bail!("--backend metal: not available in this build (cpu or cuda)")
        }
    }
    if let Some(t) = args.threads.or_else(|| {
        std::env::var("DS4_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
    }) {
        // SAFETY: single-threaded here: no other thread exists yet to read the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", t.to_string()) };
    }
    let disk = args.kv.config()?;
    let config = ServerConfig {
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        cors: args.cors,
        max_body_bytes: (args.max_body_mb as usize) << 20,
        max_queue: args.max_queue as usize,
        max_connections: args.max_connections as usize,
        default_max_tokens: args.tokens as usize,
        tool_memory_max_ids: if args.disable_exact_replay {
            0
        } else {
            args.tool_memory_max_ids
        },
        trace: args.trace.clone(),
        // Exact DSML replay survives restarts along with the disk KV checkpoints.
        tool_memory_file: args
            .kv
            .kv_disk_dir
            .as_ref()
            .map(|d| d.join("tool-memory.jsonl")),
        ..ServerConfig::default()
    };
    let state = AppState::new(config).context("opening the trace or tool-memory file")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = bind(&args.host, args.port).await?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && state.config.api_key.is_none() {
            eprintln!(
                "ds4-server: WARNING: listening on non-loopback {addr} WITHOUT an API key: anyone who can reach this port can use the model. Set --api-key or DS4_API_KEY."
            );
        }
        eprintln!("ds4-server: listening on http://{addr}");
        let st = state.clone();
        let n_ctx = args.ctx as usize;
        let model = args.model.clone();
        std::thread::Builder::new()
            .name("ds4-load".into())
            .spawn(move || match load(model, n_ctx, disk.as_ref(), device) {
                Ok(engine) => {
                    st.set_engine(Arc::new(engine));
                    eprintln!("ds4-server: model ready (ctx={n_ctx})");
                }
                Err(e) => {
                    eprintln!("ds4-server: error: loading the model failed: {e:#}");
                    std::process::exit(1);
                }
            })
            .context("starting the loader thread")?;
        ds4_api::serve(listener, state.clone(), shutdown_signal())
            .await
            .context("serving")?;
        // The worker was told to stop; the shutdown save waits for the running job.
        if let Some(engine) = state.engine() {
            tokio::task::spawn_blocking(move || engine.shutdown())
                .await
                .context("shutdown save")?;
        }
        eprintln!("ds4-server: shut down");
        Ok(())
    })
}

async fn bind(host: &str, port: u16) -> Result<tokio::net::TcpListener> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving --host {host}"))?
        .collect();
    let mut last = None;
    for a in addrs {
        match tokio::net::TcpListener::bind(a).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("binding {host}:{port}")),
        None => bail!("--host {host} resolved to no address"),
    }
}

fn load(
    model: Option<PathBuf>,
    n_ctx: usize,
    disk: Option<&DiskCacheConfig>,
    device: ds4_model::device::Device,
) -> Result<ModelEngine> {
    let opts = LoadOptions {
        device,
        upload_progress: (device != ds4_model::device::Device::Cpu).then(upload_progress),
        ..LoadOptions::default()
    };
    let default = PathBuf::from("ds4flash.gguf");
    let engine = match model {
        Some(p) => {
            eprintln!("ds4-server: loading model {}", p.display());
            ds4_model::Engine::load(&p, &opts)
                .with_context(|| format!("loading {}", p.display()))?
        }
        None if default.exists() => {
            eprintln!("ds4-server: loading model ./ds4flash.gguf");
            ds4_model::Engine::load(&default, &opts).context("loading ./ds4flash.gguf")?
        }
        None => {
            eprintln!(
                "ds4-server: no -m and no ./ds4flash.gguf: serving the embedded DEMO model ({}); its answers are random text",
                ds4_model::demo::NAME
            );
            ds4_model::Engine::demo(&opts).context("building the demo model")?
        }
    };
    if let Some(d) = disk {
        eprintln!(
            "ds4-server: disk KV cache at {} ({} MiB)",
            d.dir.display(),
            d.space_mb
        );
    }
    Ok(ModelEngine::with_disk_cache(engine, n_ctx, disk)?)
}

/// Logs the GPU weight upload every 10% (the server's stderr is a log, not a terminal).
fn upload_progress() -> ds4_model::device::UploadProgress {
    let last = std::sync::Mutex::new(u64::MAX);
    ds4_model::device::UploadProgress(Arc::new(move |done, total| {
        let tenth = (done * 10).checked_div(total).unwrap_or(10);
        let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
        if *l != tenth {
            *l = tenth;
            eprintln!(
                "ds4-server: uploading weights to the GPU: {:.2} / {:.2} GiB",
                done as f64 / (1u64 << 30) as f64,
                total as f64 / (1u64 << 30) as f64
            );
        }
    }))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("ds4-server: shutting down (finishing open connections)");
}
