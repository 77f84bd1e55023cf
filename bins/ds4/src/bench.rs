//! `ds4 bench`: prefill and decode speed at context frontiers, in the spirit of ds4's
//! `ds4_bench`, and the synthetic model generator it is usually run on.
//!
//! For every frontier `N` of `--ctx-list` a fresh session prefills `N` tokens (timed: prefill
//! tokens/s) and then decodes `--gen` tokens greedily one at a time (timed: decode tokens/s at
//! that depth). The prompt is a fixed pseudo-random id sequence (`id_i = (i * 7919 + 13) mod
//! V`), the same one `benches/llamacpp_bench.cpp` feeds llama.cpp, so both engines do the same
//! work. Results go to stdout as a table and, with `--csv`, to a CSV file with one row per
//! frontier (the columns of `benches/results/*-model.csv`).
//!
//! `--gen-synthetic OUT.gguf` writes a model with random weights instead
//! (`ds4_model::synthetic`): ds4's layout and type map at a size chosen by the flags.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use ds4_model::convert::{Preset, Progress};
use ds4_model::synthetic::{SyntheticShape, write_synthetic};
use ds4_model::{LoadOptions, Model, Session};

/// Flags of `ds4 bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model to benchmark (a ds4 GGUF file).
    #[arg(short = 'm', long, required_unless_present = "gen_synthetic")]
    pub model: Option<PathBuf>,
    /// Context frontiers: prefill this many tokens, then decode `--gen` tokens.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub ctx_list: Vec<usize>,
    /// Tokens decoded greedily after each prefill.
    #[arg(long = "gen", default_value_t = 32)]
    pub n_gen: usize,
    /// Worker threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Write the results as CSV here.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Tokens per prefill step.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Turn off the FP8/FP4 simulation of cache rows (llama.cpp does not simulate).
    #[arg(long)]
    pub no_qat_sim: bool,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = crate::run::BackendArg::Cpu)]
    pub backend: crate::run::BackendArg,
    /// Instead of benchmarking, write a synthetic random-weight model to this GGUF file.
    #[arg(long, value_name = "OUT.gguf")]
    pub gen_synthetic: Option<PathBuf>,
    /// Type map of the synthetic model: q2 (IQ2_XXS/Q2_K experts) or q4 (Q4_K experts).
    #[arg(long, default_value = "q2")]
    pub preset: String,
    /// Synthetic model: hidden size (multiple of 256).
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    /// Synthetic model: layers.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Synthetic model: routed experts.
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    /// Synthetic model: experts per token.
    #[arg(long, default_value_t = 6)]
    pub experts_used: usize,
    /// Synthetic model: expert FFN width (multiple of 256).
    #[arg(long, default_value_t = 256)]
    pub ff: usize,
    /// Synthetic model: vocabulary size.
    #[arg(long, default_value_t = 16384)]
    pub vocab: usize,
    /// Synthetic model: seed of the weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Instead of the frontier table: time to first token of an N-token prompt, cold vs
    /// restored from the disk KV cache, and the cache's save/load GB/s next to the raw disk
    /// speed of the same bytes (docs/KVCACHE_FORMAT.md s8).
    #[arg(long, value_name = "N")]
    pub kv_ttft: Option<usize>,
    /// Directory for --kv-ttft's files (a temp dir is made inside it).
    #[arg(long, value_name = "DIR", default_value = "/tmp")]
    pub kv_dir: PathBuf,
    /// Repetitions of --kv-ttft (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
}

/// One measured frontier.
struct Row {
    ctx: usize,
    prefill_s: f64,
    n_gen: usize,
    decode_s: f64,
}

/// A `/proc/self/status` size field of this process in bytes (`VmRSS:` resident now,
/// `VmHWM:` peak resident), if known (Linux only).
fn status_bytes(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The benchmark prompt: shared with `benches/llamacpp_bench.cpp`.
pub(crate) fn prompt(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i as u64 * 7919 + 13) % n_vocab as u64) as u32)
        .collect()
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs `ds4 bench`.
pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = args.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool.build().context("thread pool")?;
    pool.install(|| match &args.gen_synthetic {
        Some(out) => generate(args, out),
        None => bench(args),
    })
}

fn generate(args: &BenchArgs, out: &std::path::Path) -> anyhow::Result<()> {
    let preset = match args.preset.as_str() {
        "q2" => Preset::Q2,
        "q4" => Preset::Q4,
        "q8" => Preset::Q8,
        other => bail!("unknown preset {other:?}: expected q2, q4 or q8"),
    };
    let shape = SyntheticShape {
        n_embd: args.hidden,
        n_layer: args.layers,
        n_expert: args.experts,
        n_expert_used: args.experts_used,
        n_ff_exp: args.ff,
        n_vocab: args.vocab,
        n_hash_layer: 3.min(args.layers),
        seed: args.seed,
    };
    let t0 = Instant::now();
    let mut done = 0usize;
    let report = write_synthetic(&shape, preset, out, &mut |p| {
        if let Progress::Tensor { tensor } = p {
            done += 1;
            if tensor.name.contains("_exps") {
                eprint!("\r{done} tensors, {} ...", tensor.name);
            }
        }
    })
    .with_context(|| format!("writing {}", out.display()))?;
    eprintln!();
    let fallbacks: Vec<&str> = report.fallbacks().map(|t| t.name.as_str()).collect();
    println!(
        "wrote {} ({:.1} MiB, {} tensors, preset {preset}) in {:.1} s",
        out.display(),
        report.file_bytes as f64 / (1 << 20) as f64,
        report.tensors.len(),
        t0.elapsed().as_secs_f64()
    );
    if !fallbacks.is_empty() {
        println!("fell back to a wider type: {}", fallbacks.join(", "));
    }
    Ok(())
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let Some(path) = &args.model else {
        bail!("-m MODEL is required");
    };
    let file_bytes = std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .len();
    let rss0 = status_bytes("VmRSS:");
    let t0 = Instant::now();
    let opts = LoadOptions {
        qat_sim: !args.no_qat_sim,
        prefill_chunk: args.prefill_chunk,
        device: args.backend.device(),
        upload_progress: (args.backend != crate::run::BackendArg::Cpu)
            .then(crate::gpu::upload_progress),
    };
    let model = Model::load(path, &opts).with_context(|| format!("loading {}", path.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    if let Some(n) = args.kv_ttft {
        println!("model {} loaded in {load_s:.2} s", path.display());
        return crate::bench_kv::run(&model, n, &args.kv_dir, args.reps.max(1));
    }
    let rss1 = status_bytes("VmRSS:");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let n_vocab = model.config().n_vocab;
    let threads = rayon::current_num_threads();
    println!(
        "model {} ({:.1} MiB), loaded in {:.2} s; RSS {:.1} -> {:.1} MiB after load; {threads} threads; backend {}",
        path.display(),
        mib(file_bytes),
        load_s,
        rss0.map_or(f64::NAN, mib),
        rss1.map_or(f64::NAN, mib),
        args.backend.name(),
    );
    println!(
        "{:>8} {:>10} {:>12} {:>6} {:>10} {:>12}",
        "ctx", "prefill_s", "prefill_t/s", "gen", "decode_s", "decode_t/s"
    );
    let mut rows = Vec::new();
    for &ctx in &args.ctx_list {
        if ctx == 0 {
            bail!("--ctx-list: frontiers must be positive");
        }
        let mut s = Session::new(&model, ctx + args.n_gen);
        let toks = prompt(ctx, n_vocab);
        let t = Instant::now();
        s.feed(&toks)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..args.n_gen {
            let next = argmax(s.logits()?);
            s.feed(&[next])?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        let r = Row {
            ctx,
            prefill_s,
            n_gen: args.n_gen,
            decode_s,
        };
        println!(
            "{:>8} {:>10.3} {:>12.2} {:>6} {:>10.3} {:>12.2}",
            r.ctx,
            r.prefill_s,
            r.ctx as f64 / r.prefill_s,
            r.n_gen,
            r.decode_s,
            r.n_gen as f64 / r.decode_s
        );
        rows.push(r);
    }
    println!(
        "peak RSS {:.1} MiB",
        status_bytes("VmHWM:").map_or(f64::NAN, mib)
    );
    if let Some(csv) = &args.csv {
        let mut f = std::fs::File::create(csv).with_context(|| format!("{}", csv.display()))?;
        writeln!(
            f,
            "engine,model,threads,ctx,prefill_s,prefill_tps,gen,decode_s,decode_tps"
        )?;
        let name = path
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        for r in &rows {
            writeln!(
                f,
                "ds4-rs,{name},{threads},{},{:.4},{:.3},{},{:.4},{:.3}",
                r.ctx,
                r.prefill_s,
                r.ctx as f64 / r.prefill_s,
                r.n_gen,
                r.decode_s,
                r.n_gen as f64 / r.decode_s
            )?;
        }
    }
    Ok(())
}
