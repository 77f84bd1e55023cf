//! The error type of the CUDA backend, and its conversion to the trait's `BackendError`.

use ds4_tensor::backend::BackendError;

/// Why the CUDA backend cannot start or an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// `libcuda` (the NVIDIA driver's user-space library) could not be loaded.
    #[error("CUDA backend unavailable: no CUDA driver found (libcuda.so could not be loaded)")]
    NoDriver,
    /// The driver loaded but `cuInit` failed (no usable GPU, driver/kernel-module mismatch).
    #[error("CUDA backend unavailable: the CUDA driver failed to initialise: {0}")]
    DriverInit(String),
    /// The driver reports no device, or not the requested one.
    #[error("CUDA backend unavailable: no CUDA device {ordinal} (the driver reports {count})")]
    NoDevice {
        /// The requested device ordinal.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// `libnvrtc` (the run-time CUDA compiler the kernels need) could not be loaded.
    #[error(
        "CUDA backend unavailable: NVRTC not found (libnvrtc.so could not be loaded; install the CUDA toolkit or put its lib directory on LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    /// NVRTC rejected the kernel sources (a bug in kernels/cuda/*.cu for this device).
    #[error("CUDA kernel compilation failed for {arch}: {log}")]
    Compile {
        /// The target architecture, e.g. `sm_90`.
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {err}")]
    Driver {
        /// What was being done.
        what: String,
        /// The driver's error.
        err: String,
    },
}

impl CudaError {
    /// A driver error while doing `what`.
    pub(crate) fn driver(what: impl Into<String>, err: impl std::fmt::Display) -> CudaError {
        CudaError::Driver {
            what: what.into(),
            err: err.to_string(),
        }
    }
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> BackendError {
        BackendError::Device(e.to_string())
    }
}

/// Result with [`CudaError`].
pub type CudaResult<T> = std::result::Result<T, CudaError>;
