//! Save/load throughput of the store next to the raw disk speed, measured in the same run.
//!
//! ```text
//! cargo test -p ds4-kvcache --release --test bench -- --ignored --nocapture
//! DS4_KVCACHE_BENCH_MB=512 DS4_KVCACHE_BENCH_REPS=3 DS4_KVCACHE_BENCH_DIR=/cache/disk (optional)
//! ```
//!
//! "cold" reads first drop the file's pages from the page cache with
//! `posix_fadvise(DONTNEED)` after an `fsync`, so they come from the device (or from the
//! hypervisor's cache on a VM, which this cannot see). "warm" reads hit the page cache.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ds4_kvcache::{SaveJob, SaveReason, SaveRequest, Sections, Writer, key_of};

fn drop_cache(path: &Path) {
    let f = File::open(path).expect("open for fadvise");
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Median, min and max.
fn median(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn read_all(path: &Path) -> (u64, Duration) {
    let t = Instant::now();
    let mut f = File::open(path).expect("open");
    let mut buf = Vec::new();
    let n = f.read_to_end(&mut buf).expect("read");
    (n as u64, t.elapsed())
}

#[test]
#[ignore = "slow: writes and reads GBs"]
fn bench_save_load_throughput() {
    let mb: usize = std::env::var("DS4_KVCACHE_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let base = std::env::var("DS4_KVCACHE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    let reps: usize = std::env::var("DS4_KVCACHE_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let size = mb << 20;
    // 43 layer-like sections plus logits, like a session state.
    let mut payload = Sections::default();
    let per = size / 44;
    for i in 0..44 {
        payload.push(format!("L{i:02}"), bytes(0x9e37_79b9 + i as u64, per));
    }
    let n_bytes = payload.n_bytes();
    let tokens: Vec<u32> = (0..30_000).collect();
    let text = vec![b'a'; 100_000];
    println!(
        "payload {:.1} MiB in {} sections, dir {}",
        n_bytes as f64 / 1048576.0,
        44,
        base.display()
    );

    let blob: Vec<u8> = payload
        .0
        .iter()
        .flat_map(|s| s.bytes.iter().copied())
        .collect();
    let mut cfg = config(dir.path(), 8 << 30);
    cfg.policy.min_tokens = 1;
    let (store, _) = open(cfg);
    let store = Arc::new(store);
    let key = key_of(&text);
    let raw = dir.path().join("raw.bin");
    // Interleaved repetitions, reported as medians: the disk is shared with other work.
    let mut t_raw_write = Vec::new();
    let mut t_raw_cold = Vec::new();
    let mut t_raw_warm = Vec::new();
    let mut t_save = Vec::new();
    let mut t_load_cold = Vec::new();
    let mut t_load_warm = Vec::new();
    let mut file_bytes = 0;
    for _ in 0..reps {
        // Raw disk: one big buffer, write + fsync, then read cold and warm.
        let t = Instant::now();
        let mut f = File::create(&raw).expect("create");
        for c in blob.chunks(8 << 20) {
            f.write_all(c).expect("write");
        }
        f.sync_all().expect("fsync");
        t_raw_write.push(t.elapsed());
        drop(f);
        drop_cache(&raw);
        t_raw_cold.push(read_all(&raw).1);
        t_raw_warm.push(read_all(&raw).1);
        std::fs::remove_file(&raw).expect("rm raw");

        // Store save (fsync of file and directory included) and loads.
        let t = Instant::now();
        let out = store
            .save(&SaveRequest {
                text: &text,
                tokens: &tokens,
                ctx_size: 65536,
                reason: SaveReason::Shutdown,
                payload: &payload,
            })
            .expect("save");
        t_save.push(t.elapsed());
        file_bytes = match out {
            ds4_kvcache::SaveOutcome::Written { file_bytes, .. } => file_bytes,
            other => panic!("{other:?}"),
        };
        drop_cache(&store.entry_path(&key));
        let t = Instant::now();
        let cold = store.load::<Sections>(&key).expect("cold load");
        t_load_cold.push(t.elapsed());
        assert_eq!(cold.state, payload);
        drop(cold);
        let t = Instant::now();
        let warm = store.load::<Sections>(&key).expect("warm load");
        t_load_warm.push(t.elapsed());
        drop(warm);
        store.remove(&key).expect("remove");
    }
    drop(blob);

    let t = Instant::now();
    let crc = crc32fast::hash(&payload.0[0].bytes);
    let crc_time = t.elapsed();
    let crc_bytes = payload.0[0].bytes.len() as u64;
    assert_ne!(crc, 0);

    // Background save: what the inference thread pays (snapshot copy + submit) and how
    // much a 1 ms "decode step" loop is delayed while the writer runs.
    let writer = Writer::spawn(store.clone(), 1).expect("writer");
    let t = Instant::now();
    let snapshot = payload.clone();
    let snapshot_time = t.elapsed();
    let t = Instant::now();
    let ticket = writer
        .submit(SaveJob {
            text: b"background".to_vec(),
            tokens: tokens.clone(),
            ctx_size: 65536,
            reason: SaveReason::Continued,
            payload: Box::new(snapshot),
            supersedes: None,
        })
        .expect("queue has room");
    let submit_time = t.elapsed();
    let mut worst_step = Duration::ZERO;
    let mut n_steps = 0;
    while ticket.try_result().is_none() && n_steps < 100_000 {
        let s = Instant::now();
        while s.elapsed() < Duration::from_millis(1) {
            std::hint::spin_loop();
        }
        worst_step = worst_step.max(s.elapsed());
        n_steps += 1;
    }
    let bg_total = t.elapsed();
    writer.finish();

    let mib = n_bytes as f64 / 1048576.0;
    println!("medians of {reps} interleaved runs");
    println!("| measurement | median time | GB/s median (min..max) |");
    println!("|---|---:|---:|");
    let row = |name: &str, (d, lo, hi): (Duration, Duration, Duration), b: u64| {
        println!(
            "| {name} | {:.3} s | {:.2} ({:.2}..{:.2}) |",
            d.as_secs_f64(),
            gbps(b, d),
            gbps(b, hi),
            gbps(b, lo)
        );
    };
    row("raw write + fsync", median(t_raw_write), n_bytes);
    row(
        "raw read, cold (fadvise DONTNEED)",
        median(t_raw_cold),
        n_bytes,
    );
    row("raw read, warm (page cache)", median(t_raw_warm), n_bytes);
    row(
        "store save (CRC, write, fsync, rename, dir fsync)",
        median(t_save),
        file_bytes,
    );
    row(
        "store load, cold (read, CRC, verify, rebuild)",
        median(t_load_cold),
        file_bytes,
    );
    row("store load, warm", median(t_load_warm), file_bytes);
    row(
        "CRC-32 alone (one section, in memory)",
        (crc_time, crc_time, crc_time),
        crc_bytes,
    );
    row(
        "snapshot copy (clone of the payload)",
        (snapshot_time, snapshot_time, snapshot_time),
        n_bytes,
    );
    println!(
        "background save of {mib:.0} MiB: submit {:.1} us, done after {:.2} s; \
         {n_steps} 1-ms steps meanwhile, worst {:.2} ms",
        submit_time.as_secs_f64() * 1e6,
        bg_total.as_secs_f64(),
        worst_step.as_secs_f64() * 1e3
    );
}
