//! The place of the one `Backend` trait of model-level operations.
//!
//! The trait (matvec on any block format, norms, RoPE, hyper-connection mixing, compressor
//! step, indexer top-k, attention over raw and compressed rows, MoE dispatch, SwiGLU) is
//! designed together with the forward pass in `ds4-model` and lands here, in the lowest
//! crate, so that `ds4-backend-cuda` and `ds4-backend-metal` can implement it without seeing
//! the model. Until then this module only holds the device identifier that the CLI's
//! `--backend` flag parses.

/// Which compute device a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU (all cores).
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
    /// An Apple GPU through Metal.
    Metal,
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "metal" => Ok(Device::Metal),
            other => Err(format!("unknown backend {other:?}: expected cpu, cuda or metal")),
        }
    }
}
