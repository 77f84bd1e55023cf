//! Tests that need no GPU: the probe fails cleanly (or succeeds on a GPU machine), and NVRTC,
//! when present, compiles the kernel sources.

use ds4_backend_cuda::{CudaBackend, CudaError, kernels, probe};

#[test]
fn probe_and_new_fail_cleanly_or_succeed() {
    match probe() {
        Ok(info) => {
            eprintln!("CUDA present: {info:?}");
            assert!(info.n_devices >= 1);
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.starts_with("CUDA backend unavailable: "),
                "unexpected probe error: {msg}"
            );
            // The same error from the constructor, twice (no state is left behind).
            for _ in 0..2 {
                let err = CudaBackend::new(0).expect_err("no device, yet new() succeeded");
                assert_eq!(err.to_string(), msg);
            }
        }
    }
}

#[test]
fn missing_device_ordinal_is_an_error() {
    match CudaBackend::new(1000) {
        Err(CudaError::NoDevice { ordinal: 1000, .. }) | Err(CudaError::NoDriver) => {}
        Err(CudaError::DriverInit(_)) => {}
        other => panic!("device 1000: {other:?}"),
    }
}

/// Compiles the kernels with NVRTC for sm_90 when libnvrtc can be loaded (it needs no GPU);
/// prints an explicit skip otherwise. On this project's build machine:
/// `LD_LIBRARY_PATH=/work/targets/cuda-venv/lib/python3.11/site-packages/nvidia/cu13/lib`
/// after `pip install 'nvidia-cuda-nvrtc==13.0.*'` into that venv.
#[test]
fn nvrtc_compiles_the_kernels_when_available() {
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("skipped: NVRTC not found (no libnvrtc on the library path)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ds4-cuda-cache-{}", std::process::id()));
    let t0 = std::time::Instant::now();
    let ptx =
        kernels::ptx_cached_in("sm_90", Some(&dir)).expect("NVRTC compiles kernels/cuda/*.cu");
    let cold = t0.elapsed();
    // For `ptxas` on NVRTC's own output (kernels/cuda/check.sh checks nvcc's).
    if let Some(p) = std::env::var_os("DS4_NVRTC_PTX_OUT") {
        std::fs::write(p, &ptx).expect("write PTX");
    }
    for name in kernels::KERNEL_NAMES {
        assert!(
            ptx.contains(&format!(".entry {name}(")),
            "PTX lacks kernel {name}"
        );
    }
    // Second call: from the disk cache, same text.
    let t1 = std::time::Instant::now();
    assert_eq!(
        kernels::ptx_cached_in("sm_90", Some(&dir)).expect("cached"),
        ptx
    );
    eprintln!(
        "NVRTC compile {:.2}s, cached load {:.4}s",
        cold.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    let files: Vec<_> = std::fs::read_dir(&dir).expect("cache dir").collect();
    assert_eq!(files.len(), 1, "one cached PTX file");
    let _ = std::fs::remove_dir_all(&dir);
}
