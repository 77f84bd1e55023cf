//! `ds4 inspect`: metadata, tensor table and tensor dumps of a GGUF file.

use std::path::PathBuf;

/// Arguments of `ds4 inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The GGUF file.
    pub file: PathBuf,
}

/// Runs `ds4 inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    anyhow::bail!("{}: GGUF reading is being written", args.file.display())
}
