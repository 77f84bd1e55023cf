//! Tiny-model logits against transformers 5.23 (`tests/fixtures/model/*`, made by
//! `tests/fixtures/model/regenerate.py`).
//!
//! For every fixture model: one-shot prefill, token-by-token decode and chunked prefill with odd
//! chunk sizes must all give, at every position, `max|logit diff| / max|logit| <= 1e-4` against
//! the reference (parity mode: FP8/FP4 simulation off, as transformers does not simulate), and
//! the 32-token greedy continuation must be identical.

use std::path::{Path, PathBuf};

use ds4_model::{LoadOptions, Model, Session};

/// The bar of MODEL.md Appendix C: 1e-4 of the logit scale.
const TOL_REL: f32 = 1e-4;

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model")
}

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_root())
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.retain(|d| {
        d.join("manifest.json").is_file() && d.join("checkpoint/config.json").is_file()
    });
    dirs.sort();
    dirs
}

/// A minimal `.npy` reader (little-endian f4/i4/i8, C order): returns (shape, values as f64).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
    let (hlen, hstart) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[hstart..hstart + hlen]).expect("ascii npy header");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let descr = header
        .split("'descr': '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .expect("descr");
    let shape_s = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<usize> = shape_s
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data = &b[hstart + hlen..];
    let vals = match descr {
        "<f4" => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        "<i4" => data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect(),
        "<i8" => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f64)
            .collect(),
        other => panic!("{}: unsupported dtype {other}", path.display()),
    };
    (shape, vals)
}

struct Fixture {
    name: String,
    model: Model,
    prompt: Vec<u32>,
    logits: Vec<f32>,
    greedy: Vec<u32>,
}

fn load(dir: &Path) -> Fixture {
    let opts = LoadOptions {
        qat_sim: false,
        ..LoadOptions::default()
    };
    let model = Model::load(&dir.join("checkpoint"), &opts)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let (_, prompt) = read_npy(&dir.join("prompt.npy"));
    let (shape, logits) = read_npy(&dir.join("logits.npy"));
    assert_eq!(shape, vec![prompt.len(), model.config().n_vocab]);
    let (_, greedy) = read_npy(&dir.join("greedy.npy"));
    Fixture {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        model,
        prompt: prompt.iter().map(|&t| t as u32).collect(),
        logits: logits.iter().map(|&v| v as f32).collect(),
        greedy: greedy.iter().map(|&t| t as u32).collect(),
    }
}

/// Worst per-position `max|diff| / max|ref|` over all positions, and where it happens.
fn max_rel_diff(got: &[f32], want: &[f32], n_vocab: usize) -> (f32, usize) {
    assert_eq!(got.len(), want.len());
    let mut worst = (0.0f32, 0usize);
    for (pos, (g, w)) in got.chunks(n_vocab).zip(want.chunks(n_vocab)).enumerate() {
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let rel = diff / scale;
        if rel > worst.0 || rel.is_nan() {
            worst = (rel, pos);
        }
    }
    worst
}

fn run_chunks(f: &Fixture, sizes: &[usize]) -> Vec<f32> {
    let mut s = Session::new(&f.model, f.prompt.len() + 64);
    let mut out = Vec::new();
    let (mut i, mut k) = (0, 0);
    while i < f.prompt.len() {
        let n = sizes[k % sizes.len()].min(f.prompt.len() - i);
        out.extend(s.feed_all_logits(&f.prompt[i..i + n]).expect("feed"));
        i += n;
        k += 1;
    }
    out
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

fn check_mode(f: &Fixture, mode: &str, sizes: &[usize]) {
    let got = run_chunks(f, sizes);
    let (rel, pos) = max_rel_diff(&got, &f.logits, f.model.config().n_vocab);
    println!(
        "{}: {mode}: max rel diff {rel:.3e} (position {pos})",
        f.name
    );
    assert!(
        rel <= TOL_REL,
        "{}: {mode}: max rel diff {rel:.3e} at position {pos} > {TOL_REL:e}",
        f.name
    );
}

#[test]
fn fixtures_exist() {
    assert!(
        !fixture_dirs().is_empty(),
        "no fixture under {}",
        fixtures_root().display()
    );
}

#[test]
fn one_shot_prefill_matches_reference() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        check_mode(&f, "prefill", &[usize::MAX]);
    }
}

#[test]
fn decode_matches_reference() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        check_mode(&f, "decode", &[1]);
    }
}

#[test]
fn chunked_prefill_matches_reference() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        check_mode(&f, "chunks 1,7,13", &[1, 7, 13]);
    }
}

#[test]
fn greedy_continuation_matches_reference() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        let mut s = Session::new(&f.model, f.prompt.len() + f.greedy.len());
        s.feed(&f.prompt).expect("prefill");
        let mut got = Vec::new();
        for _ in 0..f.greedy.len() {
            let t = argmax(s.logits().expect("logits"));
            got.push(t);
            s.feed(&[t]).expect("decode");
        }
        assert_eq!(got, f.greedy, "{}: greedy continuation", f.name);
    }
}

#[test]
fn snapshot_restore_reproduces_logits() {
    let Some(dir) = fixture_dirs().into_iter().next() else {
        return;
    };
    let f = load(&dir);
    let mut s = Session::new(&f.model, f.prompt.len());
    let half = f.prompt.len() / 2;
    s.feed(&f.prompt[..half]).expect("feed");
    let snap = s.snapshot();
    s.feed(&f.prompt[half..]).expect("feed");
    let first = s.logits().expect("logits").to_vec();
    s.restore(&snap);
    s.feed(&f.prompt[half..]).expect("feed");
    assert_eq!(s.logits().expect("logits"), &first[..]);
}

#[test]
fn context_limit_is_an_error() {
    let Some(dir) = fixture_dirs().into_iter().next() else {
        return;
    };
    let f = load(&dir);
    let mut s = Session::new(&f.model, 4);
    s.feed(&f.prompt[..3]).expect("fits");
    let e = s.feed(&f.prompt[3..5]).expect_err("over the context");
    assert!(e.to_string().contains("context full"), "{e}");
    assert_eq!(s.n_past(), 3);
}

#[test]
fn decode_and_prefill_are_bit_identical() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        assert_eq!(
            run_chunks(&f, &[1]),
            run_chunks(&f, &[usize::MAX]),
            "{}",
            f.name
        );
        // The whole decoding state (rows and compressor frontiers) agrees too.
        let mut a = Session::new(&f.model, f.prompt.len());
        let mut b = Session::new(&f.model, f.prompt.len());
        a.feed(&f.prompt).expect("prefill");
        for &t in &f.prompt {
            b.feed(&[t]).expect("decode");
        }
        assert!(
            a.snapshot() == b.snapshot(),
            "{}: prefill and decode states differ",
            f.name
        );
    }
}

/// With the FP8/FP4 simulation on (the default) the logits move away from transformers (which
/// does not simulate), but decode, prefill and chunking still agree bit for bit.
#[test]
fn qat_sim_changes_logits_but_not_chunking_invariance() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        let model =
            Model::load(&dir.join("checkpoint"), &LoadOptions::default()).expect("qat_sim load");
        let sim = Fixture {
            model,
            prompt: f.prompt.clone(),
            logits: f.logits.clone(),
            greedy: Vec::new(),
            name: f.name.clone(),
        };
        let one_shot = run_chunks(&sim, &[usize::MAX]);
        assert_eq!(
            one_shot,
            run_chunks(&sim, &[1, 7, 13]),
            "{}: qat_sim chunked",
            f.name
        );
        assert!(one_shot.iter().all(|v| v.is_finite()));
        let (rel, pos) = max_rel_diff(&one_shot, &f.logits, sim.model.config().n_vocab);
        println!(
            "{}: qat_sim on vs transformers: max rel diff {rel:.3e} (position {pos})",
            f.name
        );
        assert!(
            rel > TOL_REL,
            "{}: the simulation should change the logits",
            f.name
        );
    }
}
