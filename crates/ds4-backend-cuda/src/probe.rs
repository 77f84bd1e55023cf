//! Finding the CUDA driver, a device and NVRTC without panicking.
//!
//! cudarc loads `libcuda`/`libnvrtc` lazily on first use and *panics* when a library is
//! missing (`dynamic-loading` resolves symbols at run time). A missing GPU is a normal user
//! mistake (`ds4 --backend cuda` on a laptop), so this module checks each library's presence
//! first with cudarc's own `is_culib_present` (which only tries to open the library), and
//! wraps the first real driver calls in `catch_unwind` in case a library is present but
//! lacks a symbol.

use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::{CudaError, CudaResult};

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Number of CUDA devices the driver reports.
    pub n_devices: usize,
    /// Name of device 0.
    pub name: String,
    /// Compute capability `(major, minor)` of device 0.
    pub compute_capability: (i32, i32),
}

/// Runs `f`, turning a panic inside cudarc into `on_panic`.
pub(crate) fn no_panic<T>(f: impl FnOnce() -> CudaResult<T>, on_panic: CudaError) -> CudaResult<T> {
    // The default hook would print the panic message to stderr before we return a clean
    // error; silence it for the duration of the call. The lock keeps two threads from
    // interleaving take/set and losing the original hook.
    static HOOK_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = HOOK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = catch_unwind(AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.unwrap_or(Err(on_panic))
}

/// Checks that the driver loads and initialises and that device `ordinal` exists; returns
/// the device count.
pub(crate) fn check_driver(ordinal: usize) -> CudaResult<usize> {
    // SAFETY: is_culib_present only calls dlopen on candidate library names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    no_panic(
        || {
            cudarc::driver::result::init().map_err(|e| CudaError::DriverInit(e.to_string()))?;
            let count = cudarc::driver::result::device::get_count()
                .map_err(|e| CudaError::DriverInit(e.to_string()))?
                .max(0) as usize;
            if ordinal >= count {
                return Err(CudaError::NoDevice { ordinal, count });
            }
            Ok(count)
        },
        CudaError::NoDriver,
    )
}

/// Checks that NVRTC can be loaded (the kernels are compiled at run time).
pub(crate) fn check_nvrtc() -> CudaResult<()> {
    // SAFETY: is_culib_present only calls dlopen on candidate library names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoNvrtc)
    }
}

/// Whether the CUDA backend can run here: the driver loads, a device exists, NVRTC loads.
/// Never panics; the error says which piece is missing.
pub fn probe() -> CudaResult<DeviceInfo> {
    let n_devices = check_driver(0)?;
    check_nvrtc()?;
    no_panic(
        || {
            let ctx = cudarc::driver::CudaContext::new(0)
                .map_err(|e| CudaError::driver("creating a context on device 0", e))?;
            let name = ctx
                .name()
                .map_err(|e| CudaError::driver("reading the device name", e))?;
            let compute_capability = ctx
                .compute_capability()
                .map_err(|e| CudaError::driver("reading the compute capability", e))?;
            Ok(DeviceInfo {
                n_devices,
                name,
                compute_capability,
            })
        },
        CudaError::NoDriver,
    )
}
