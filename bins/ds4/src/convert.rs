//! `ds4 convert`: a Hugging Face checkpoint directory (or a ds4 GGUF) to a ds4 GGUF file.
//!
//! The conversion itself is `ds4_model::convert`; this module parses the flags, sizes the
//! thread pool, draws the progress bar (stderr, only on a terminal) and prints the summary,
//! including every tensor that fell back to a wider type because its rows are not whole
//! blocks.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use ds4_model::convert::{self, ConvertOptions, Preset, Progress};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The type map, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// Every matrix F16, 1-D tensors F32, tid2eid I32 (lossless for BF16 weights in F16 range).
    F16,
    /// ds4's map with the routed experts in Q8_0.
    Q8,
    /// ds4's q4 map: routed experts Q4_K, attention/shared/output Q8_0, the rest F16/F32.
    Q4,
    /// ds4's q2 map: routed gate/up IQ2_XXS, routed down Q2_K, the rest as q4.
    Q2,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Preset {
        match p {
            PresetArg::F16 => Preset::F16,
            PresetArg::Q8 => Preset::Q8,
            PresetArg::Q4 => Preset::Q4,
            PresetArg::Q2 => Preset::Q2,
        }
    }
}

/// Flags of `ds4 convert`.
#[derive(Debug, Args)]
#[command(after_long_help = "\
Types per preset (FORMATS.md s3): norms, biases, sinks and HC base/scale are always F32, \
ffn_gate_tid2eid I32; embedding, router, HC fn, compressor and indexer F16; attention, \
shared experts and output Q8_0 (F16 with --preset f16); routed experts per preset. \
A tensor whose rows are not whole blocks (256 values for Q2_K/Q4_K/IQ2_XXS, 32 for Q8_0) \
falls back to Q8_0, then F16; every fallback is listed at the end. \
Only BF16/F16/F32 checkpoints are read (not the FP8/FP4 hub release).")]
pub struct ConvertArgs {
    /// Checkpoint directory (config.json, *.safetensors, optionally tokenizer.json), or a ds4
    /// GGUF file to re-type (its tokenizer metadata is carried over).
    pub src: PathBuf,
    /// Output GGUF file (written to OUT.tmp, then renamed).
    pub out: PathBuf,
    /// Type map to write.
    #[arg(long, value_enum, default_value = "q2")]
    pub preset: PresetArg,
    /// general.name to record [default: the checkpoint directory's name].
    #[arg(long)]
    pub name: Option<String>,
    /// Quantization threads [default: all cores]; the output does not depend on it.
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Overwrite OUT if it exists.
    #[arg(long, short = 'f')]
    pub force: bool,
}

/// Runs `ds4 convert`.
pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    if args.out.exists() && !args.force {
        bail!("{} exists (use --force to overwrite)", args.out.display());
    }
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        pool = pool.num_threads(n);
    }
    let pool = pool.build().context("starting the thread pool")?;
    let opts = ConvertOptions {
        preset: args.preset.into(),
        name: args.name.clone(),
    };

    let bar = ProgressBar::with_draw_target(
        None,
        if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} tensors, {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut written = 0u64;
    let mut total = 0u64;
    let report = pool
        .install(|| {
            convert::convert(&args.src, &args.out, &opts, &mut |p| match p {
                Progress::Start {
                    n_tensors,
                    data_bytes,
                } => {
                    bar.set_length(n_tensors as u64);
                    total = data_bytes;
                }
                Progress::Tensor { tensor } => {
                    written += tensor.n_bytes();
                    bar.set_message(format!(
                        "{} / {} ({})",
                        HumanBytes(written),
                        HumanBytes(total),
                        tensor.name
                    ));
                    bar.inc(1);
                }
            })
        })
        .with_context(|| {
            format!(
                "converting {} to {}",
                args.src.display(),
                args.out.display()
            )
        })?;
    bar.finish_and_clear();

    let mut by_type: Vec<(ds4_tensor::DType, usize, u64)> = Vec::new();
    for t in &report.tensors {
        match by_type.iter_mut().find(|e| e.0 == t.dtype) {
            Some(e) => {
                e.1 += 1;
                e.2 += t.n_bytes();
            }
            None => by_type.push((t.dtype, 1, t.n_bytes())),
        }
    }
    for t in report.fallbacks() {
        eprintln!(
            "fallback: {}: ne[0] = {} is not a multiple of {} ({}), wrote {}",
            t.name,
            t.dims[0],
            t.wanted.block_elems(),
            t.wanted,
            t.dtype
        );
    }
    let c = &report.config;
    println!(
        "wrote {} ({}): preset {}, {} layers, d = {}, {} experts, {} tensors{}",
        args.out.display(),
        HumanBytes(report.file_bytes),
        opts.preset,
        c.n_layer,
        c.n_embd,
        c.n_expert,
        report.tensors.len(),
        if report.tokenizer {
            ", tokenizer included"
        } else {
            ", no tokenizer.json (no tokenizer metadata)"
        }
    );
    for (dtype, n, bytes) in by_type {
        println!(
            "  {:<8} {n:>5} tensors {:>12}",
            dtype.name(),
            HumanBytes(bytes).to_string()
        );
    }
    let n_fallback = report.fallbacks().count();
    if n_fallback > 0 {
        println!("  {n_fallback} tensors fell back to a wider type (listed on stderr)");
    }
    Ok(())
}
