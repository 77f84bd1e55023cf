//! `ds4`: the command line of ds4-rs.
//!
//! Thin by design: argument parsing, output formatting and exit codes. The work is done by
//! the library crates.

use clap::{Parser, Subcommand};

mod convert;
mod inspect;

/// DeepSeek V4 Flash inference engine (ds4-rs).
#[derive(Debug, Parser)]
#[command(name = "ds4", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a GGUF file's metadata and tensor table, or dump one tensor as .npy.
    Inspect(inspect::InspectArgs),
    /// Convert a Hugging Face checkpoint directory into a ds4 GGUF file (f16/q8/q4/q2).
    Convert(convert::ConvertArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(&args),
        Command::Convert(args) => convert::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            if is_broken_pipe(&err) {
                return std::process::ExitCode::SUCCESS;
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
