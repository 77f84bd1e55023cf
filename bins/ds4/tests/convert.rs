//! End-to-end tests of `ds4 convert`, run as a process on the tiny fixture checkpoints
//! (`tests/fixtures/model/*/checkpoint`). The conversion itself is tested in
//! `crates/ds4-model/tests/convert.rs`; here: flags, messages, exit codes and the output file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ds4_tensor::gguf::GgufFile;

fn checkpoint(model: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/model")
        .join(model)
        .join("checkpoint")
}

fn ds4(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .output()
        .expect("ds4 runs")
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ds4-cli-convert-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn help_lists_presets_and_defaults() {
    let out = ds4(&["convert".as_ref(), "--help".as_ref()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "f16",
        "q8",
        "q4",
        "q2",
        "[default: q2]",
        "--threads",
        "--name",
        "--force",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn converts_a_fixture_and_reports_fallbacks() {
    let dir = scratch("ok");
    let out_path = dir.join("m0.gguf");
    let out = ds4(&[
        "convert".as_ref(),
        checkpoint("m0_mixed").as_os_str(),
        out_path.as_os_str(),
        "--preset".as_ref(),
        "q4".as_ref(),
        "--threads".as_ref(),
        "1".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("preset q4"), "{stdout}");
    // d = 64 is not a multiple of 256: the Q4_K experts fall back to Q8_0, and say so.
    assert!(
        stderr.contains("fallback: blk.0.ffn_gate_exps.weight: ne[0] = 64 is not a multiple of 256 (Q4_K), wrote Q8_0"),
        "{stderr}"
    );
    let file = GgufFile::open(&out_path).expect("valid GGUF");
    assert_eq!(file.get_str("general.name").expect("name"), "m0_mixed");
    assert!(!dir.join("m0.gguf.tmp").exists());
    let inspect = ds4(&["inspect".as_ref(), out_path.as_os_str()]);
    assert!(
        inspect.status.success(),
        "ds4 inspect: {}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("deepseek4.block_count"));

    // A second run refuses to overwrite without --force.
    let again = ds4(&[
        "convert".as_ref(),
        checkpoint("m0_mixed").as_os_str(),
        out_path.as_os_str(),
    ]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = scratch("bad");
    let out_path = dir.join("x.gguf");
    let out = ds4(&["convert".as_ref(), dir.as_os_str(), out_path.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("config.json"), "{stderr}");
    assert!(!out_path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}
