//! `ds4-server --backend`: an unknown name is a usage error, and `cuda` on a machine without
//! a GPU exits 1 with a message naming CUDA (never a panic, never a bound port).

use std::process::Command;

fn server(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ds4-server"))
        .args(args)
        .output()
        .expect("run ds4-server")
}

#[test]
fn cuda_without_gpu_and_unknown_backend_fail_cleanly() {
    let out = server(&["--backend", "tpu", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown backend \"tpu\""), "{err}");

    if ds4_backend_cuda::probe().is_ok() {
        eprintln!("skipped the no-GPU --backend cuda check: a CUDA device is present");
        return;
    }
    let out = server(&["--backend", "cuda", "--port", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--backend cuda: CUDA backend unavailable"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !err.contains("listening"),
        "bound a port before failing: {err}"
    );
}
