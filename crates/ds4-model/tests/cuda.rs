//! The CUDA backend against the CPU backend (the oracle): every trait operation with named
//! tolerances, then whole fixture models (raw bf16 checkpoints and their F16/Q8/Q4/Q2 GGUF
//! conversions) to 1e-3 relative on the logits.
//!
//! All tests are `#[ignore = "needs a CUDA GPU"]`: CI has no GPU. On the GPU machine
//! `kernels/cuda/device_run.sh` runs them with `--ignored` and `DS4_REQUIRE_CUDA=1`. Without a
//! device each test prints "skipped: no CUDA (...)" and returns, unless `DS4_REQUIRE_CUDA` is
//! set, in which case a missing device is a failure (the GPU script must never pass by
//! skipping).
//!
//! Tolerances and why:
//! - `TOL_MATMUL` (1e-5 of the largest |output|): activations are quantized bit-identically on
//!   the device and every block's integer sum is exact, so only the f32 order of adding
//!   block results differs.
//! - `TOL_ELEMENTWISE` (2e-6 relative): norm (f64 sum of squares in a different order), RoPE
//!   and SwiGLU (sincosf/expf within 2 ulp of libm).
//! - `TOL_REDUCE` (1e-5 of the largest |output|): attention, indexer, HC (long f32 sums in
//!   block order instead of sequential order).
//! - `TOL_LOGITS` (1e-3 of the largest |logit| per position): the end-to-end bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ds4_backend_cuda::CudaBackend;
use ds4_model::convert::{self, ConvertOptions, Preset};
use ds4_model::cpu::CpuBackend;
use ds4_model::device::Device;
use ds4_model::{LoadOptions, Model, Session};
use ds4_tensor::backend::{Backend, HcParams};
use ds4_tensor::{DType, HostTensor, Shape, TensorBytes};

const TOL_MATMUL: f32 = 1e-5;
const TOL_ELEMENTWISE: f32 = 2e-6;
const TOL_REDUCE: f32 = 1e-5;
const TOL_LOGITS: f32 = 1e-3;

/// The CUDA backend, or `None` after printing an explicit skip (a failure under
/// `DS4_REQUIRE_CUDA`).
fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) if std::env::var_os("DS4_REQUIRE_CUDA").is_some() => {
            panic!("DS4_REQUIRE_CUDA is set but the CUDA backend failed: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no CUDA ({e})");
            None
        }
    }
}

/// Deterministic values in [-1, 1) (SplitMix64).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A `[rows, cols]` weight (numpy order) in `dtype`.
fn weight(name: &str, dtype: DType, rows: usize, cols: usize, seed: u64) -> HostTensor {
    let x = values(seed, rows * cols);
    let mut bytes = Vec::new();
    ds4_quant::row::quantize(dtype, &x, None, &mut bytes).expect("quantize");
    HostTensor {
        name: name.to_string(),
        dtype,
        shape: Shape::from_numpy(&[rows as u64, cols as u64]),
        bytes: TensorBytes::Owned(Arc::new(bytes)),
    }
}

/// `max |a - b| / max |b|` (absolute when `b` is all zeros).
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let d = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    if d.is_nan() || a.iter().any(|v| v.is_nan()) {
        return f32::INFINITY;
    }
    d / scale
}

fn check(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let r = rel_diff(got, want);
    eprintln!("{what}: rel diff {r:.3e} (tol {tol:.0e})");
    assert!(r <= tol, "{what}: rel diff {r:e} > {tol:e}");
}

const MATMUL_TYPES: [DType; 7] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q8_0,
    DType::Q2K,
    DType::Q4K,
    DType::Iq2Xxs,
];

#[test]
#[ignore = "needs a CUDA GPU"]
fn matmul_matches_cpu_for_every_type() {
    let Some(be) = gpu() else { return };
    let (rows, cols) = (37, 768);
    for (k, dtype) in MATMUL_TYPES.into_iter().enumerate() {
        let w = weight("w", dtype, rows, cols, 10 + k as u64);
        for n_tok in [1, 3, 9, 20] {
            for range in [0..rows, 5..30] {
                let x = values(100 + n_tok as u64, n_tok * cols);
                let mut want = vec![0.0; n_tok * range.len()];
                CpuBackend
                    .matmul(&w, range.clone(), &x, n_tok, &mut want)
                    .expect("cpu");
                let mut got = vec![0.0; want.len()];
                be.matmul(&w, range.clone(), &x, n_tok, &mut got)
                    .expect("cuda");
                check(
                    &format!("matmul {dtype:?} tokens {n_tok} rows {range:?} (transient)"),
                    &got,
                    &want,
                    TOL_MATMUL,
                );
            }
        }
        // Resident copy: same numbers.
        be.upload_weights(&[&w], &mut |_, _| {}).expect("upload");
        let x = values(7, 4 * cols);
        let mut want = vec![0.0; 4 * rows];
        CpuBackend
            .matmul(&w, 0..rows, &x, 4, &mut want)
            .expect("cpu");
        let mut got = vec![0.0; want.len()];
        be.matmul(&w, 0..rows, &x, 4, &mut got).expect("cuda");
        check(
            &format!("matmul {dtype:?} (resident)"),
            &got,
            &want,
            TOL_MATMUL,
        );
    }
    assert!(be.resident_bytes() > 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn get_row_is_exact() {
    let Some(be) = gpu() else { return };
    for (k, dtype) in MATMUL_TYPES.into_iter().enumerate() {
        let w = weight("emb", dtype, 5, 512, 50 + k as u64);
        let (mut a, mut b) = (vec![0.0; 512], vec![0.0; 512]);
        CpuBackend.get_row(&w, 3, &mut a).expect("cpu");
        be.get_row(&w, 3, &mut b).expect("cuda");
        assert_eq!(a, b, "{dtype:?}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn norm_rope_swiglu_match_cpu() {
    let Some(be) = gpu() else { return };
    let n = 576;
    let x = values(1, 3 * n);
    let w: Vec<f32> = values(2, n).iter().map(|v| v + 1.0).collect();
    for weight in [None, Some(&w[..])] {
        let (mut a, mut b) = (x.clone(), x.clone());
        CpuBackend.rms_norm(&mut a, n, weight, 1e-6);
        be.rms_norm(&mut b, n, weight, 1e-6);
        check(
            &format!("rms_norm weight={}", weight.is_some()),
            &b,
            &a,
            TOL_ELEMENTWISE,
        );
    }
    let freqs: Vec<f32> = (0..32).map(|i| 10000f32.powf(-(i as f32) / 32.0)).collect();
    for pos in [0u32, 7, 4095, 100_000] {
        for inverse in [false, true] {
            let (mut a, mut b) = (x.clone(), x.clone());
            CpuBackend.rope_tail(&mut a, n, &freqs, pos, inverse);
            be.rope_tail(&mut b, n, &freqs, pos, inverse);
            check(
                &format!("rope_tail pos {pos} inverse {inverse}"),
                &b,
                &a,
                TOL_ELEMENTWISE,
            );
        }
    }
    let u: Vec<f32> = values(3, 3 * n).iter().map(|v| v * 12.0).collect();
    let g0: Vec<f32> = x.iter().map(|v| v * 12.0).collect();
    for (clamp, wgt) in [(0.0, 1.0), (7.0, 0.37)] {
        let (mut a, mut b) = (g0.clone(), g0.clone());
        CpuBackend.swiglu(&mut a, &u, clamp, wgt);
        be.swiglu(&mut b, &u, clamp, wgt);
        check(&format!("swiglu clamp {clamp}"), &b, &a, TOL_ELEMENTWISE);
    }
    // The infallible ops left no sticky error behind.
    let w1 = weight("w", DType::F32, 4, 256, 9);
    let mut y = vec![0.0; 4];
    be.matmul(&w1, 0..4, &values(4, 256), 1, &mut y)
        .expect("no sticky error");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn hc_pre_post_match_cpu() {
    let Some(be) = gpu() else { return };
    for (m, d) in [(4usize, 256usize), (2, 512)] {
        let mix = (2 + m) * m;
        for dtype in [DType::F32, DType::F16] {
            let fn_w = weight("hc_fn", dtype, mix, m * d, 21);
            let base = values(22, mix);
            let scale = [0.5f32, 0.7, 1.3];
            let p = HcParams {
                fn_weight: &fn_w,
                scale: &scale,
                base: &base,
                n_hc: m,
                n_sinkhorn_iter: 20,
                hc_eps: 1e-6,
                rms_eps: 1e-6,
            };
            let state: Vec<f32> = values(23, m * d).iter().map(|v| v * 3.0).collect();
            let mut a = (vec![0.0; d], vec![0.0; m], vec![0.0; m * m]);
            let mut b = a.clone();
            CpuBackend
                .hc_pre(&p, &state, &mut a.0, &mut a.1, &mut a.2)
                .expect("cpu");
            be.hc_pre(&p, &state, &mut b.0, &mut b.1, &mut b.2)
                .expect("cuda");
            check(&format!("hc_pre x m={m} {dtype:?}"), &b.0, &a.0, TOL_REDUCE);
            check(
                &format!("hc_pre post m={m} {dtype:?}"),
                &b.1,
                &a.1,
                TOL_REDUCE,
            );
            check(
                &format!("hc_pre comb m={m} {dtype:?}"),
                &b.2,
                &a.2,
                TOL_REDUCE,
            );
            let o = values(24, d);
            let (mut sa, mut sb) = (state.clone(), state.clone());
            CpuBackend.hc_post(&mut sa, &o, &a.1, &a.2, m);
            be.hc_post(&mut sb, &o, &a.1, &a.2, m);
            check(&format!("hc_post m={m}"), &sb, &sa, TOL_REDUCE);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_and_indexer_match_cpu() {
    let Some(be) = gpu() else { return };
    let (n_head, hd) = (8, 128);
    let q: Vec<f32> = values(31, n_head * hd).iter().map(|v| v * 2.0).collect();
    let sinks = values(32, n_head);
    for n_rows in [0usize, 1, 5, 300, 2100] {
        let kv = values(33 + n_rows as u64, n_rows * hd);
        let rows: Vec<&[f32]> = kv.chunks(hd).collect();
        let (mut a, mut b) = (vec![0.0; n_head * hd], vec![1.0; n_head * hd]);
        let scale = 1.0 / (hd as f32).sqrt();
        CpuBackend.attention(&q, &rows, &sinks, scale, &mut a);
        be.attention(&q, &rows, &sinks, scale, &mut b);
        check(&format!("attention rows {n_rows}"), &b, &a, TOL_REDUCE);
    }
    let (hi, di) = (16, 64);
    let qi = values(41, hi * di);
    let wi: Vec<f32> = values(42, hi).iter().map(|v| v * 0.1).collect();
    for n_rows in [1usize, 7, 1000] {
        let rows = values(43 + n_rows as u64, n_rows * di);
        let (mut a, mut b) = (vec![0.0; n_rows], vec![0.0; n_rows]);
        CpuBackend.indexer_scores(&qi, &wi, &rows, &mut a);
        be.indexer_scores(&qi, &wi, &rows, &mut b);
        check(&format!("indexer_scores rows {n_rows}"), &b, &a, TOL_REDUCE);
    }
}

/// A stacked `[E, rows, cols]` expert tensor in `dtype`.
fn experts(name: &str, dtype: DType, e: usize, rows: usize, cols: usize, seed: u64) -> HostTensor {
    let mut t = weight(name, dtype, e * rows, cols, seed);
    t.shape = Shape::from_numpy(&[e as u64, rows as u64, cols as u64]);
    t
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn moe_routed_matches_cpu() {
    let Some(be) = gpu() else { return };
    let (e_n, d, f, n) = (6, 512, 256, 5);
    for (gate_t, down_t) in [
        (DType::Iq2Xxs, DType::Q2K),
        (DType::Q4K, DType::Q4K),
        (DType::Q8_0, DType::Q8_0),
        (DType::F16, DType::F32),
    ] {
        let gate = experts("gate_exps", gate_t, e_n, f, d, 61);
        let up = experts("up_exps", gate_t, e_n, f, d, 62);
        let down = experts("down_exps", down_t, e_n, d, f, 63);
        let x = values(64, n * d);
        // Every token to 2 or 3 experts; expert 4 unused; token 2 to expert 1 twice.
        let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_n];
        routes[0] = vec![(0, 0.5), (3, 0.25)];
        routes[1] = vec![(1, 0.7), (2, 0.1), (2, 0.2), (4, 0.9)];
        routes[2] = vec![(0, 0.3), (1, 0.3), (3, 0.3), (4, 0.1)];
        routes[3] = vec![(2, 1.5)];
        routes[5] = vec![(0, 0.2), (3, 0.45), (4, 0.05)];
        for (resident, clamp) in [(false, 0.0), (true, 10.0)] {
            if resident {
                be.upload_weights(&[&gate, &up, &down], &mut |_, _| {})
                    .expect("upload");
            }
            let y0 = values(65, n * d);
            let (mut a, mut b) = (y0.clone(), y0.clone());
            CpuBackend
                .moe_routed(&gate, &up, &down, &routes, clamp, &x, &mut a)
                .expect("cpu");
            be.moe_routed(&gate, &up, &down, &routes, clamp, &x, &mut b)
                .expect("cuda");
            check(
                &format!("moe_routed {gate_t:?}/{down_t:?} resident={resident} clamp={clamp}"),
                &b,
                &a,
                TOL_MATMUL,
            );
        }
    }
}

fn fixture_dirs() -> Vec<PathBuf> {
    // DS4_FIXTURES: the fixture directory when the test binary runs away from its build
    // tree (the GPU machine gets a copy of the repository at another path).
    let root = match std::env::var_os("DS4_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model"),
    };
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("checkpoint").is_dir() && p.join("prompt.npy").is_file())
        .collect();
    v.sort();
    v
}

/// The int32 prompt of a fixture (`prompt.npy`, little-endian `<i4`, 1-D).
fn prompt(dir: &Path) -> Vec<u32> {
    let bytes = std::fs::read(dir.join("prompt.npy")).expect("prompt.npy");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + hlen]);
    assert!(header.contains("'<i4'"), "{header}");
    bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
        .collect()
}

fn load(path: &Path, device: Device) -> Model {
    let opts = LoadOptions {
        qat_sim: false,
        prefill_chunk: 7,
        device,
        ..LoadOptions::default()
    };
    Model::load(path, &opts).unwrap_or_else(|e| panic!("{} on {device:?}: {e}", path.display()))
}

/// Prefill logits of every position, then 4 greedy decode steps' logits.
fn run(model: &Model, prompt: &[u32]) -> Vec<f32> {
    let mut s = Session::new(model, prompt.len() + 8);
    let mut out = s.feed_all_logits(prompt).expect("prefill");
    for _ in 0..4 {
        let l = s.logits().expect("logits");
        let next = l
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0 as u32;
        s.feed(&[next]).expect("decode");
        out.extend_from_slice(s.logits().expect("logits"));
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fixture_logits_match_cpu() {
    if gpu().is_none() {
        return;
    }
    let scratch = std::env::temp_dir().join(format!("ds4-cuda-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch dir");
    for dir in fixture_dirs() {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        let p = prompt(&dir);
        let mut paths = vec![("bf16".to_string(), dir.join("checkpoint"))];
        for preset in [Preset::F16, Preset::Q8, Preset::Q4, Preset::Q2] {
            let out = scratch.join(format!("{name}-{preset}.gguf"));
            convert::convert(
                &dir.join("checkpoint"),
                &out,
                &ConvertOptions { preset, name: None },
                &mut |_| {},
            )
            .unwrap_or_else(|e| panic!("convert {name} {preset}: {e}"));
            paths.push((preset.to_string(), out));
        }
        for (tag, path) in paths {
            let cpu = run(&load(&path, Device::Cpu), &p);
            let cuda = run(&load(&path, Device::Cuda), &p);
            let n_vocab = cpu.len() / (p.len() + 4);
            let mut worst = 0.0f32;
            for (g, w) in cuda.chunks(n_vocab).zip(cpu.chunks(n_vocab)) {
                worst = worst.max(rel_diff(g, w));
            }
            eprintln!("fixture {name} {tag}: worst per-position rel diff {worst:.3e}");
            assert!(
                worst <= TOL_LOGITS,
                "fixture {name} {tag}: CUDA vs CPU logits rel diff {worst:e} > {TOL_LOGITS:e}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
