//! The disk KV cache from the command line (`--kv-disk-dir`), on the embedded demo model:
//! a second run of the same long prompt restores its prefix from disk and answers exactly
//! as the first (same seed), and the interactive chat saves the conversation on `/clear`
//! and at EOF. Small `--kv-cache-*` values make a few hundred tokens "long". `ds4 inspect
//! --ctx` reports what a context costs, as the session really holds it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ds4-kv-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn ds4(cwd: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .current_dir(cwd)
        .env("HOME", cwd)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ds4 runs");
    if let Some(input) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        w.write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("ds4 exits")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The number in `line` right after `prefix`.
fn number_after(s: &str, prefix: &str) -> Option<usize> {
    let i = s.find(prefix)? + prefix.len();
    let digits: String = s[i..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn n_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "rkv"))
                .count()
        })
        .unwrap_or(0)
}

const KNOBS: [&str; 6] = [
    "--kv-cache-min-tokens",
    "32",
    "--kv-cache-boundary-align-tokens",
    "16",
    "--kv-cache-continued-interval-tokens",
    "64",
];

#[test]
fn help_explains_the_cache_flags() {
    let cwd = scratch("help");
    let out = ds4(&cwd, &["--help"], None);
    let help = text(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("Disk KV cache:"), "{help}");
    for flag in [
        "--kv-disk-dir",
        "--kv-disk-space-mb",
        "--kv-cache-min-tokens",
        "--kv-cache-cold-max-tokens",
        "--kv-cache-continued-interval-tokens",
        "--kv-cache-boundary-trim-tokens",
        "--kv-cache-boundary-align-tokens",
        "--kv-cache-reject-different-quant",
    ] {
        assert!(help.contains(flag), "{flag} missing:\n{help}");
    }
    // Invalid knobs are a usage error (exit 2), as in the server.
    let bad = ds4(
        &cwd,
        &[
            "-p",
            "x",
            "--kv-disk-dir",
            "kv",
            "--kv-cache-min-tokens",
            "600",
            "--kv-cache-cold-max-tokens",
            "100",
        ],
        None,
    );
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn second_run_of_a_long_prompt_is_restored_from_disk_with_identical_output() {
    let cwd = scratch("oneshot");
    let cache = cwd.join("kv");
    let c = cache.to_str().expect("utf8");
    let prompt = "Summarize the following notes about rivers and lakes. ".repeat(8);
    let mut args = vec![
        "-p",
        &prompt,
        "--seed",
        "7",
        "-n",
        "12",
        "--ctx",
        "1024",
        "--nothink",
        "--kv-disk-dir",
        c,
    ];
    args.extend(KNOBS);

    let first = ds4(&cwd, &args, None);
    let err1 = text(&first.stderr);
    assert!(first.status.success(), "{err1}");
    assert!(err1.contains("ds4: kv cache: no stored prefix"), "{err1}");
    assert!(err1.contains("cold save at"), "{err1}");
    assert!(
        err1.contains("saved") && err1.contains("tokens at exit"),
        "{err1}"
    );
    assert!(err1.contains("hits 0, misses 1"), "{err1}");
    // The cold checkpoint, continued ones at 64-token frontiers and the exit save.
    assert!(n_entries(&cache) >= 3, "{err1}");

    let second = ds4(&cwd, &args, None);
    let err2 = text(&second.stderr);
    assert!(second.status.success(), "{err2}");
    let restored = number_after(&err2, "ds4: kv cache: restored ").unwrap_or(0);
    assert!(restored >= 64, "{err2}");
    assert!(err2.contains("hits 1, misses 0"), "{err2}");
    assert!(
        err2.contains(&format!("reused {restored} tokens")),
        "{err2}"
    );
    // The generation statistics count the restored tokens as reused.
    assert!(err2.contains(&format!("({restored} reused)")), "{err2}");
    // Same seed, same logits after the restored prefix: the same answer.
    assert!(!first.stdout.is_empty());
    assert_eq!(text(&first.stdout), text(&second.stdout));
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn interactive_chat_saves_on_clear_and_at_eof_and_resumes() {
    let cwd = scratch("repl");
    let cache = cwd.join("kv");
    let c = cache.to_str().expect("utf8");
    let mut args = vec![
        "--seed",
        "3",
        "-n",
        "6",
        "--ctx",
        "2048",
        "--nothink",
        "--kv-disk-dir",
        c,
    ];
    args.extend(KNOBS);
    let long = "Please read this long message about mountains and valleys. ".repeat(6);
    let other = "A different topic: the design of small sailing boats. ".repeat(6);
    let input = format!("{long}\n/clear\n{other}\n");

    let run1 = ds4(&cwd, &args, Some(&input));
    let err1 = text(&run1.stderr);
    assert!(run1.status.success(), "{err1}");
    // /clear kept the first conversation, EOF the second one.
    let evicted = number_after(&err1, "ds4: kv cache: saving the conversation (").unwrap_or(0);
    assert!(evicted > 64, "{err1}");
    assert!(err1.contains("tokens at exit"), "{err1}");
    assert!(err1.contains("hits 0, misses 2"), "{err1}");

    // A new chat starting with the same first message restores its stable prefix.
    let run2 = ds4(&cwd, &args, Some(&format!("{long}\n")));
    let err2 = text(&run2.stderr);
    assert!(run2.status.success(), "{err2}");
    let restored = number_after(&err2, "ds4: kv cache: restored ").unwrap_or(0);
    assert!(restored >= 32, "{err2}");
    assert!(err2.contains("hits 1"), "{err2}");
    // The answer to the first message is the same as in the first chat.
    // (stdout: the command help, then the answers.)
    let answer = |out: &str| -> Option<String> {
        let help_end = out.find("Ctrl+C stops the current answer.\n")?;
        out[help_end..].lines().nth(1).map(str::to_string)
    };
    let a1 = answer(&text(&run1.stdout));
    assert!(a1.as_ref().is_some_and(|a| !a.trim().is_empty()), "{a1:?}");
    assert_eq!(a1, answer(&text(&run2.stdout)));
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn inspect_reports_the_state_cost_of_a_context() {
    let cwd = scratch("inspect");
    let model = cwd.join("tiny.gguf");
    let m = model.to_str().expect("utf8");
    let made = ds4(
        &cwd,
        &[
            "bench",
            "--gen-synthetic",
            m,
            "--hidden",
            "256",
            "--layers",
            "5",
            "--experts",
            "4",
            "--experts-used",
            "2",
            "--vocab",
            "512",
        ],
        None,
    );
    assert!(made.status.success(), "{}", text(&made.stderr));
    let ctx = 100_000usize;
    let out = ds4(&cwd, &["inspect", m, "--ctx", &ctx.to_string()], None);
    let report = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The printed total is the accounting of the file's own config.
    let g = ds4_tensor::gguf::GgufFile::open(&model).expect("gguf");
    let cfg = ds4_model::Config::from_gguf(&g).expect("config");
    let mem = ds4_kvcache::accounting::state_memory(&cfg, ctx);
    let total = number_after(&report, "B/token of context (all layers), ").expect(&report);
    assert_eq!(total as u64, mem.total_bytes(), "{report}");
    for name in ["sliding", "CSA (r=4)", "HCA (r=128)"] {
        assert!(report.contains(name), "{report}");
    }
    // ... and a session of that model really holds that much (small context, same formula).
    let engine_model =
        ds4_model::Model::load(&model, &ds4_model::LoadOptions::default()).expect("load");
    let mut s = ds4_model::Session::new(&engine_model, 64);
    let ids: Vec<u32> = (0..41).collect();
    s.feed(&ids).expect("feed");
    let st = s.snapshot();
    let held: usize = st
        .layers
        .iter()
        .map(|l| {
            let c = |c: &Option<ds4_model::state::CompressorState>| {
                c.as_ref()
                    .map_or(0, |c| c.state_kv.len() + c.state_score.len())
            };
            l.raw.len()
                + l.comp_rows.len()
                + l.index_rows.len()
                + c(&l.attn_compressor)
                + c(&l.indexer_compressor)
        })
        .sum::<usize>()
        + st.tokens.len()
        + st.logits.len();
    assert_eq!(
        held as u64 * 4,
        ds4_kvcache::accounting::state_memory(&cfg, ids.len()).total_bytes()
    );
    let _ = std::fs::remove_dir_all(&cwd);
}
