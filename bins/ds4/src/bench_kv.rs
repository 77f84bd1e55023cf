//! `ds4 bench --kv-ttft N`: time to first token of an N-token prompt, cold (prefill) vs
//! restored from the disk KV cache, and the cache's save/load throughput next to the raw
//! disk speed measured in the same run, on the same bytes, in the same directory.
//!
//! Per repetition, in this order (repetitions interleave everything, medians are reported,
//! because the machine is shared):
//! 1. **cold**: a fresh session prefills the prompt and picks the first token (argmax);
//! 2. **save**: `Store::save` of that state (CRC, write, `fsync`, rename, directory `fsync`);
//! 3. **raw write**: the entry file's bytes written to a plain file with `fsync`;
//! 4. **restored, warm**: a freshly opened store (its index built by a directory scan) looks
//!    the prompt up, reads and verifies the entry, the session takes the state, first token;
//! 5. **restored, cold**: the same after `posix_fadvise(DONTNEED)` on the entry (pages come
//!    from the device, or from the hypervisor's cache on a VM);
//! 6. **raw read**, cold and warm, of the plain file;
//! 7. **restored prefix + suffix** (the usual case: the cold checkpoint is the prompt minus
//!    its tail, aligned to 2048): restore the aligned prefix, prefill the rest, first token.
//!
//! Then, once: **a continued save during decoding**. The session decodes 16 tokens; at the
//! 8th it snapshots and hands the save to the background writer, as `DiskCache::after_token`
//! does. Reported: that step's pause (snapshot copy + submit) next to a normal decode step,
//! and how long the writer took meanwhile.
//!
//! The first token of every restored run must equal the cold run's (the state is restored
//! bit-exactly); the command fails otherwise. Keys are the prompt's token ids as bytes: the
//! benchmark model has no tokenizer, and the lookup only needs a text whose prefixes are the
//! prompt's prefixes.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ds4_kvcache::{
    ModelIdentity, Policy, SaveJob, SaveReason, SaveRequest, Store, StoreConfig, Writer, key_of,
    model_identity,
};
use ds4_model::{Model, Session, SessionState};

fn text_of(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn drop_cache(path: &Path) -> anyhow::Result<()> {
    let f = File::open(path)?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .context("posix_fadvise(DONTNEED)")?;
    Ok(())
}

fn read_all(path: &Path) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    Ok(t.elapsed())
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn range(v: &[Duration]) -> String {
    let mut v = v.to_vec();
    v.sort();
    match (v.first(), v.last()) {
        (Some(a), Some(b)) => format!("{:.3}..{:.3}", a.as_secs_f64(), b.as_secs_f64()),
        _ => String::new(),
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn open_store(dir: &Path, id: ModelIdentity) -> anyhow::Result<Store> {
    let mut cfg = StoreConfig::new(dir, id).with_space_mb(1 << 20);
    cfg.policy = Policy {
        min_tokens: 1,
        ..Policy::default()
    };
    Ok(Store::open(cfg)?)
}

/// Restores the longest stored prefix of `prompt` into a fresh session, prefills the rest and
/// returns the first token and the time taken.
fn restored_ttft(
    dir: &Path,
    id: ModelIdentity,
    model: &Model,
    prompt: &[u32],
    ctx: usize,
) -> anyhow::Result<(u32, usize, Duration)> {
    let t = Instant::now();
    let store = open_store(dir, id)?;
    let Some(l) = store.lookup_load::<SessionState>(&text_of(prompt), ctx)? else {
        bail!("no stored prefix found");
    };
    let n = l.tokens.len();
    let mut s = Session::new(model, ctx);
    s.restore_owned(l.state);
    if n < prompt.len() {
        s.feed(&prompt[n..])?;
    }
    let first = argmax(s.logits()?);
    Ok((first, n, t.elapsed()))
}

/// Runs the benchmark (see the module doc).
pub fn run(model: &Model, n: usize, dir: &Path, reps: usize) -> anyhow::Result<()> {
    let v = model.config().n_vocab;
    let prompt = crate::bench::prompt(n, v);
    let ctx = n + 64;
    let id = model_identity(model);
    let dir = tempfile::Builder::new()
        .prefix("ds4-kv-ttft-")
        .tempdir_in(dir)
        .with_context(|| format!("temp dir in {}", dir.display()))?;
    let entries = dir.path().join("entries");
    let prefix_dir = dir.path().join("prefix");
    let raw = dir.path().join("raw.bin");
    let align = Policy::default();
    let prefix_len = align.store_len(n);
    println!(
        "kv-ttft: {n}-token prompt, ctx {ctx}, {reps} repetitions, dir {}",
        dir.path().display()
    );

    let (mut cold, mut save, mut raw_w) = (Vec::new(), Vec::new(), Vec::new());
    let (mut warm, mut coldr, mut raw_c, mut raw_h, mut part) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut file_bytes = 0u64;
    let mut state_bytes = 0u64;
    for rep in 0..reps {
        // 1. Cold prefill.
        let mut s = Session::new(model, ctx);
        let t = Instant::now();
        s.feed(&prompt)?;
        let first_cold = argmax(s.logits()?);
        cold.push(t.elapsed());
        let state = s.snapshot();
        if rep == 0 {
            // The prefix checkpoint for step 7, written once.
            let mut p = Session::new(model, ctx);
            p.feed(&prompt[..prefix_len])?;
            let ps = open_store(&prefix_dir, id)?;
            ps.save(&SaveRequest {
                text: &text_of(&prompt[..prefix_len]),
                tokens: &prompt[..prefix_len],
                ctx_size: ctx,
                reason: SaveReason::Cold,
                payload: &p.snapshot(),
            })?;
        }

        // 2. Save.
        let _ = std::fs::remove_dir_all(&entries);
        let store = open_store(&entries, id)?;
        let text = text_of(&prompt);
        let t = Instant::now();
        store.save(&SaveRequest {
            text: &text,
            tokens: &prompt,
            ctx_size: ctx,
            reason: SaveReason::Shutdown,
            payload: &state,
        })?;
        save.push(t.elapsed());
        let path = store.entry_path(&key_of(&text));
        let bytes = std::fs::read(&path)?;
        file_bytes = bytes.len() as u64;
        state_bytes = ds4_kvcache::Payload::sections(&state)
            .iter()
            .map(|s| s.bytes.len() as u64)
            .sum();
        drop(store);

        // 3. Raw write of the same bytes.
        let t = Instant::now();
        let mut f = File::create(&raw)?;
        for c in bytes.chunks(8 << 20) {
            f.write_all(c)?;
        }
        f.sync_all()?;
        raw_w.push(t.elapsed());
        drop(f);
        drop(bytes);

        // 4./5. Restored, warm then cold.
        let (tok, _, d) = restored_ttft(&entries, id, model, &prompt, ctx)?;
        if tok != first_cold {
            bail!("restored state gives first token {tok}, the cold prefill {first_cold}");
        }
        warm.push(d);
        drop_cache(&path)?;
        let (tok, _, d) = restored_ttft(&entries, id, model, &prompt, ctx)?;
        if tok != first_cold {
            bail!("restored state (cold read) gives first token {tok}, cold prefill {first_cold}");
        }
        coldr.push(d);

        // 6. Raw reads.
        drop_cache(&raw)?;
        raw_c.push(read_all(&raw)?);
        raw_h.push(read_all(&raw)?);
        std::fs::remove_file(&raw)?;

        // 7. Restored prefix + suffix prefill.
        let (tok, got, d) = restored_ttft(&prefix_dir, id, model, &prompt, ctx)?;
        if got != prefix_len {
            bail!("prefix restore found {got} tokens, expected {prefix_len}");
        }
        // Chunk boundaries differ from the cold prefill, so the first token may differ in
        // principle; report it rather than fail.
        if tok != first_cold {
            println!("note: prefix+suffix first token {tok} != cold {first_cold}");
        }
        part.push(d);
        println!(
            "rep {rep}: cold {:.3} s, restored warm {:.3} s, restored cold-read {:.3} s, prefix {prefix_len} + suffix {:.3} s",
            cold[rep].as_secs_f64(),
            warm[rep].as_secs_f64(),
            coldr[rep].as_secs_f64(),
            part[rep].as_secs_f64()
        );
    }

    let gbps = |d: Duration| file_bytes as f64 / d.as_secs_f64() / 1e9;
    let row = |name: &str, v: &[Duration], rate: bool| {
        let m = median(v);
        let r = if rate {
            format!("{:>8.2}", gbps(m))
        } else {
            format!("{:>8}", "")
        };
        println!(
            "{name:<44} {:>9.3} s {r}   ({} s)",
            m.as_secs_f64(),
            range(v)
        );
    };
    println!(
        "entry file {:.1} MB (state {:.1} MB) for {n} tokens; prefix checkpoint {prefix_len} tokens",
        file_bytes as f64 / 1e6,
        state_bytes as f64 / 1e6
    );
    println!(
        "{:<44} {:>11} {:>8}   (min..max)",
        "measurement", "median", "GB/s"
    );
    row("TTFT cold (prefill + first token)", &cold, false);
    row("TTFT restored, warm (open+lookup+load+swap)", &warm, true);
    row("TTFT restored, cold read", &coldr, true);
    row("TTFT restored prefix + suffix prefill", &part, false);
    row("store save (CRC, write, fsync, rename)", &save, true);
    row("raw write + fsync, same bytes", &raw_w, true);
    row("raw read, cold (fadvise DONTNEED)", &raw_c, true);
    row("raw read, warm (page cache)", &raw_h, true);
    let speedup = median(&cold).as_secs_f64() / median(&warm).as_secs_f64();
    println!("restored (warm) is {speedup:.0}x faster than the cold prefill");
    decode_stall(model, &prompt, ctx, id, dir.path())
}

/// A continued save while decoding: the pause it causes on the decoding thread.
fn decode_stall(
    model: &Model,
    prompt: &[u32],
    ctx: usize,
    id: ModelIdentity,
    dir: &Path,
) -> anyhow::Result<()> {
    let store = std::sync::Arc::new(open_store(&dir.join("decode"), id)?);
    let writer = Writer::spawn(store, 2)?;
    let mut s = Session::new(model, ctx);
    s.feed(&prompt[..prompt.len() - 16])?;
    let mut steps = Vec::new();
    let mut pause = Duration::ZERO;
    let mut snap_bytes = 0u64;
    let mut ticket = None;
    for i in 0..16 {
        let t = Instant::now();
        let next = argmax(s.logits()?);
        s.feed(&[next])?;
        if i == 8 {
            // What `DiskCache::after_token` does at a frontier.
            let t0 = Instant::now();
            let state = s.snapshot();
            snap_bytes = ds4_kvcache::Payload::sections(&state)
                .iter()
                .map(|x| x.bytes.len() as u64)
                .sum();
            let tokens = s.tokens().to_vec();
            let job = SaveJob {
                text: text_of(&tokens),
                tokens,
                ctx_size: ctx,
                reason: SaveReason::Continued,
                payload: Box::new(state),
                supersedes: None,
            };
            ticket = Some((Instant::now(), writer.submit(job).ok()));
            pause = t0.elapsed();
        } else {
            steps.push(t.elapsed());
        }
    }
    let write = match ticket {
        Some((t0, Some(t))) => {
            t.wait()?;
            t0.elapsed()
        }
        _ => bail!("the writer queue was full"),
    };
    writer.finish();
    println!(
        "continued save during decoding: pause {:.1} ms (snapshot of {:.1} MB + submit) vs a decode step {:.1} ms (median); the writer finished {:.1} ms after the submit",
        pause.as_secs_f64() * 1e3,
        snap_bytes as f64 / 1e6,
        median(&steps).as_secs_f64() * 1e3,
        write.as_secs_f64() * 1e3
    );
    Ok(())
}
