//! Crash safety and multi-process sharing, with real processes.
//!
//! The children are this test binary re-executed on an ignored helper test
//! (`child_process`) with `DS4_KVCACHE_CHILD` naming the job; run directly, the helper
//! returns at once.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use ds4_kvcache::format;
use ds4_kvcache::{SaveReason, SaveRequest, Sections, Store};

const CHILD_ENV: &str = "DS4_KVCACHE_CHILD";
const DIR_ENV: &str = "DS4_KVCACHE_CHILD_DIR";
const SEED_ENV: &str = "DS4_KVCACHE_CHILD_SEED";
const CRASH_BUDGET: u64 = 12 << 20;
const SHARE_BUDGET: u64 = 10 << 20;

fn spawn_child(job: &str, dir: &Path, seed: u64) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .args(["--ignored", "--exact", "child_process", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, job)
        .env(DIR_ENV, dir)
        .env(SEED_ENV, seed.to_string())
        .stdout(Stdio::piped())
        .stderr(if job == "share" {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn child")
}

fn size_for(text: &str) -> usize {
    // 0.5 to 3.5 MB: large enough that a kill often lands mid-write.
    500_000 + (text.len() * 7919 % 7) * 500_000
}

fn save_text(store: &Store, text: &str) -> ds4_kvcache::Result<ds4_kvcache::SaveOutcome> {
    let payload = payload_for(text.as_bytes(), size_for(text));
    let tokens = tokens_for(text.as_bytes());
    store.save(&SaveRequest {
        text: text.as_bytes(),
        tokens: &tokens,
        ctx_size: 32768,
        reason: SaveReason::Continued,
        payload: &payload,
    })
}

/// Every visible entry file must be complete and hold exactly what was saved for its text.
fn check_visible_files(dir: &Path) -> usize {
    let mut n = 0;
    for name in names_with(dir, ".rkv") {
        if name.contains(".tmp.") {
            continue;
        }
        let bytes = std::fs::read(dir.join(&name)).expect("read entry");
        let d = format::decode(&bytes)
            .unwrap_or_else(|e| panic!("visible file {name} is not complete: {e}"));
        let text = String::from_utf8(d.text.clone()).expect("utf8 text");
        assert_eq!(d.tokens, tokens_for(&d.text), "{name}");
        assert_eq!(d.sections, payload_for(&d.text, size_for(&text)), "{name}");
        assert_eq!(
            name,
            format!(
                "{}.rkv",
                ds4_kvcache::store::key_hex(&ds4_kvcache::key_of(&d.text))
            )
        );
        n += 1;
    }
    n
}

/// Cheap deterministic "random" numbers for kill times.
fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 33
}

#[test]
fn sigkill_during_save_never_leaves_a_partial_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = 0x5eed;
    let mut n_complete = 0;
    let mut n_killed_with_temp = 0;
    let iterations = 50;
    let start = Instant::now();
    for iter in 0..iterations {
        let mut child = spawn_child("crash", dir.path(), iter);
        std::thread::sleep(Duration::from_millis(5 + lcg(&mut rng) % 120));
        child.kill().expect("SIGKILL child");
        child.wait().expect("reap child");
        if !names_with(dir.path(), ".tmp.").is_empty() {
            n_killed_with_temp += 1;
        }
        n_complete = check_visible_files(dir.path());
        // The next opener cleans up after the dead writer and keeps the budget.
        let (store, _) = open(config(dir.path(), CRASH_BUDGET));
        assert!(
            names_with(dir.path(), ".tmp.").is_empty(),
            "orphan temp left"
        );
        assert!(store.usage_bytes().expect("usage") <= CRASH_BUDGET);
    }
    // The test only means something if kills landed mid-write and saves also completed.
    assert!(
        n_killed_with_temp >= 5,
        "only {n_killed_with_temp} kills hit a write"
    );
    assert!(n_complete >= 1, "no save ever completed");
    eprintln!(
        "{iterations} kills, {n_killed_with_temp} mid-write, {n_complete} files at the end, {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn two_processes_share_one_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let children: Vec<Child> = (0..2)
        .map(|i| spawn_child("share", dir.path(), i))
        .collect();
    let mut n_other = 0;
    for child in children {
        let out = child.wait_with_output().expect("child output");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        let line = stdout
            .lines()
            .find_map(|l| l.split("LOADED_OTHER=").nth(1))
            .unwrap_or_else(|| panic!("no child report in:\n{stdout}"));
        n_other += line.trim().parse::<u32>().expect("count");
    }
    eprintln!("entries loaded across processes: {n_other}");
    assert!(n_other > 0, "no process ever loaded the other's entry");
    for seed in 0..2 {
        std::fs::remove_file(dir.path().join(format!("ready.{seed}"))).expect("marker");
    }
    assert!(dir_bytes(dir.path()) <= SHARE_BUDGET);
    assert!(check_visible_files(dir.path()) > 0);
    assert!(names_with(dir.path(), ".tmp.").is_empty());
}

/// The child side of both tests (does nothing unless started by them).
#[test]
#[ignore = "helper process for the tests in this file"]
fn child_process() {
    let Ok(job) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = std::path::PathBuf::from(std::env::var(DIR_ENV).expect("dir"));
    let seed: u64 = std::env::var(SEED_ENV)
        .expect("seed")
        .parse()
        .expect("seed number");
    match job.as_str() {
        "crash" => {
            let (store, _) = open(config(&dir, CRASH_BUDGET));
            // Save until killed.
            for i in 0.. {
                save_text(&store, &format!("crash run {seed} save {i}")).expect("save");
            }
        }
        "share" => {
            let mut cfg = config(&dir, SHARE_BUDGET);
            cfg.fsync = false;
            let (store, _) = open(cfg);
            let other = 1 - seed;
            // Start together, so the two really overlap. Names the store does not own are
            // ignored by it (and not counted in the budget).
            std::fs::write(dir.join(format!("ready.{seed}")), b"").expect("ready marker");
            let t = Instant::now();
            while !dir.join(format!("ready.{other}")).exists() {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "the other child never started"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut loaded_other = 0;
            for i in 0..25 {
                save_text(&store, &format!("proc {seed} save {i}")).expect("save");
                let usage = store.usage_bytes().expect("usage");
                assert!(usage <= SHARE_BUDGET, "{usage} > {SHARE_BUDGET}");
                for j in (0..=i).rev().take(3) {
                    let text = format!("proc {other} save {j}");
                    if let Some(l) = store
                        .lookup_load::<Sections>(text.as_bytes(), 32768)
                        .expect("lookup")
                    {
                        // The longest stored prefix: "save 2" when "save 20" is gone.
                        assert!(text.as_bytes().starts_with(&l.text));
                        let got = String::from_utf8(l.text.clone()).expect("utf8");
                        assert_eq!(l.state, payload_for(&l.text, size_for(&got)));
                        assert_eq!(l.tokens, tokens_for(&l.text));
                        loaded_other += 1;
                    }
                }
            }
            println!("\nLOADED_OTHER={loaded_other}");
        }
        other => panic!("unknown child job {other}"),
    }
}
