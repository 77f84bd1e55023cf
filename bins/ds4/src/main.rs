//! `ds4`: the command line of ds4-rs.
//!
//! Thin by design: argument parsing, output formatting and exit codes. The work is done by
//! the library crates.

use clap::{Parser, Subcommand};

mod bench;
mod bench_kv;
mod convert;
mod gpu;
mod inspect;
mod kvcache;
mod repl;
mod run;

/// DeepSeek V4 Flash inference engine (ds4-rs).
///
/// Without a subcommand: `ds4 -p TEXT` answers one prompt, `ds4` alone starts an interactive
/// chat, `--dump-tokens` / `--dump-logits` / `--dump-logprobs` are diagnostics.
#[derive(Debug, Parser)]
#[command(name = "ds4", version, about, long_about = None)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a GGUF file's metadata and tensor table, or dump one tensor as .npy.
    Inspect(inspect::InspectArgs),
    /// Convert a Hugging Face checkpoint directory into a ds4 GGUF file (f16/q8/q4/q2).
    Convert(convert::ConvertArgs),
    /// Prefill/decode speed at context frontiers (CSV), or write a synthetic benchmark model.
    Bench(bench::BenchArgs),
}

/// Large heap blocks (activation buffers) on cache-line boundaries for the SIMD kernels.
#[global_allocator]
static ALLOC: ds4_tensor::alloc::CacheLineAlloc = ds4_tensor::alloc::CacheLineAlloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Inspect(args)) => inspect::run(&args),
        Some(Command::Convert(args)) => convert::run(&args),
        Some(Command::Bench(args)) => bench::run(&args),
        None => run::run(&cli.run),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                return std::process::ExitCode::SUCCESS;
            }
            if let Some(u) = err.downcast_ref::<run::UsageError>() {
                eprintln!("ds4: error: {u}");
                return std::process::ExitCode::from(2);
            }
            eprintln!("ds4: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A closed stdout (`ds4 inspect big.gguf | head`) is not an error.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
