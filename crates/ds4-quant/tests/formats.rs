//! The block formats against independent references.
//!
//! * gguf-py fixtures (`tests/fixtures/quant/`, made by `gen_quant_fixtures.py`): every
//!   dequantizer, the Q8_0 quantizer and the F16/BF16 encoders must reproduce gguf-py.
//! * Integer dot products: each `dot` must equal the f64 sum of `dequant(w)·dequant(x)`.
//! * Quantize → dequantize round trips stay within the bounds documented in docs/QUANT.md.

use bytemuck::Zeroable;
use ds4_quant::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, QK_K, q8_k, row};
use ds4_tensor::DType;
use half::f16;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---- fixtures ----------------------------------------------------------------------------

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../tests/fixtures/quant/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading fixture {path}: {e}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Decodes the `dequant_<name>` fixture with `row::dequantize` and compares it with gguf-py.
/// `rel_tol == 0` means bit for bit (NaN must match NaN with the same bits).
fn check_dequant(dtype: DType, name: &str, rel_tol: f32) {
    let input = fixture(&format!("dequant_{name}.in.bin"));
    let want = f32s(&fixture(&format!("dequant_{name}.out.bin")));
    let mut got = vec![0.0f32; want.len()];
    row::dequantize(dtype, &input, &mut got).expect("dequantize fixture");
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if rel_tol == 0.0 {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name} element {i}: got {g:e}, gguf-py {w:e}"
            );
        } else {
            let err = (g - w).abs() / w.abs().max(f32::MIN_POSITIVE);
            assert!(
                err <= rel_tol,
                "{name} element {i}: got {g:e}, gguf-py {w:e}"
            );
            worst = worst.max(err);
        }
    }
    // The misaligned path must give the same values.
    let mut shifted = vec![0u8; input.len() + 1];
    shifted[1..].copy_from_slice(&input);
    let mut again = vec![0.0f32; want.len()];
    row::dequantize(dtype, &shifted[1..], &mut again).expect("misaligned dequantize");
    assert!(
        got.iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    if rel_tol != 0.0 {
        eprintln!("{name}: worst relative difference to gguf-py {worst:e}");
    }
}

#[test]
fn dequantize_q8_0_matches_gguf_py() {
    check_dequant(DType::Q8_0, "Q8_0", 0.0);
}

#[test]
fn dequantize_q2_k_matches_gguf_py() {
    check_dequant(DType::Q2K, "Q2_K", 0.0);
}

#[test]
fn dequantize_q4_k_matches_gguf_py() {
    check_dequant(DType::Q4K, "Q4_K", 1e-6);
}

#[test]
fn dequantize_iq2_xxs_matches_gguf_py() {
    check_dequant(DType::Iq2Xxs, "IQ2_XXS", 0.0);
}

#[test]
fn dequantize_f16_matches_gguf_py() {
    check_dequant(DType::F16, "F16", 0.0);
}

#[test]
fn dequantize_bf16_matches_gguf_py() {
    check_dequant(DType::BF16, "BF16", 0.0);
}

/// Encodes the `quant_<case>` fixture input with `row::quantize` and compares the bytes.
fn check_quant(dtype: DType, case: &str) {
    let x = f32s(&fixture(&format!("quant_{case}.in.bin")));
    let want = fixture(&format!("quant_{case}.out.bin"));
    let mut got = Vec::new();
    row::quantize(dtype, &x, None, &mut got).expect("quantize fixture");
    assert_eq!(got.len(), want.len(), "{case}: byte count");
    let n = dtype.block_bytes();
    for (i, (g, w)) in got.chunks(n).zip(want.chunks(n)).enumerate() {
        assert_eq!(g, w, "{case}: block {i} differs from gguf-py");
    }
}

#[test]
fn quantize_q8_0_gaussian_is_byte_identical_to_gguf_py() {
    check_quant(DType::Q8_0, "Q8_0_gauss");
}

#[test]
fn quantize_q8_0_ties_is_byte_identical_to_gguf_py() {
    check_quant(DType::Q8_0, "Q8_0_ties");
    // The typed entry point agrees with the dispatcher.
    let x = f32s(&fixture("quant_Q8_0_ties.in.bin"));
    let mut blocks = vec![BlockQ8_0::zeroed(); x.len() / 32];
    ds4_quant::q8_0::quantize(&x, &mut blocks);
    assert_eq!(
        bytemuck::cast_slice::<_, u8>(&blocks),
        &fixture("quant_Q8_0_ties.out.bin")[..]
    );
}

#[test]
fn encode_bf16_incl_nan_is_byte_identical_to_gguf_py() {
    check_quant(DType::BF16, "BF16");
}

#[test]
fn encode_f16_is_byte_identical_to_numpy() {
    check_quant(DType::F16, "F16");
}

// ---- random data ---------------------------------------------------------------------------

/// Standard normal samples (Box-Muller), so no distribution crate is needed.
fn gaussian(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>();
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Random bytes for `n` blocks of type `B`, with the f16 fields at `scale_offsets` set to
/// random finite scales in `[2^-12, 2^-2)` (as real weights have).
fn random_blocks<B: bytemuck::Pod>(rng: &mut StdRng, n: usize, scale_offsets: &[usize]) -> Vec<B> {
    let size = size_of::<B>();
    let mut bytes: Vec<u8> = (0..n * size).map(|_| rng.random()).collect();
    for block in bytes.chunks_exact_mut(size) {
        for &off in scale_offsets {
            let s = f16::from_f32(2f32.powf(rng.random_range(-12.0..-2.0)));
            block[off..off + 2].copy_from_slice(&s.to_le_bytes());
        }
    }
    bytes
        .chunks_exact(size)
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

fn q8k_of(x: &[f32]) -> Vec<BlockQ8K> {
    let mut b = vec![BlockQ8K::zeroed(); x.len() / QK_K];
    q8_k::quantize(x, &mut b);
    b
}

/// The reference dot product in f64, and the scale for the tolerance: `Σ|w·x|`.
fn f64_dot(w: &[f32], x: &[f32]) -> (f64, f64) {
    let dot = w
        .iter()
        .zip(x)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum();
    let abs = w
        .iter()
        .zip(x)
        .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
        .sum();
    (dot, abs)
}

fn assert_dot_close(name: &str, got: f32, w: &[f32], x: &[f32]) {
    let (want, abs) = f64_dot(w, x);
    let err = (f64::from(got) - want).abs();
    assert!(
        err <= 1e-5 * abs + 1e-30,
        "{name}: dot {got:e} vs f64 reference {want:e} (error {err:e}, Σ|w·x| {abs:e})"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn dot_q8_0_matches_f64_reference(seed in any::<u64>(), n_blocks in 1usize..24) {
        let mut rng = StdRng::seed_from_u64(seed);
        let w: Vec<BlockQ8_0> = random_blocks(&mut rng, n_blocks, &[0]);
        let mut x = vec![BlockQ8_0::zeroed(); n_blocks];
        ds4_quant::q8_0::quantize(&gaussian(&mut rng, n_blocks * 32), &mut x);
        let (mut wf, mut xf) = (vec![0.0; n_blocks * 32], vec![0.0; n_blocks * 32]);
        ds4_quant::q8_0::dequantize(&w, &mut wf);
        ds4_quant::q8_0::dequantize(&x, &mut xf);
        assert_dot_close("q8_0", ds4_quant::q8_0::dot(&w, &x), &wf, &xf);
    }

    #[test]
    fn dot_q2_k_matches_f64_reference(seed in any::<u64>(), n_blocks in 1usize..6) {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = n_blocks * QK_K;
        let w: Vec<BlockQ2K> = random_blocks(&mut rng, n_blocks, &[80, 82]);
        let x = q8k_of(&gaussian(&mut rng, n));
        let (mut wf, mut xf) = (vec![0.0; n], vec![0.0; n]);
        ds4_quant::q2_k::dequantize(&w, &mut wf);
        q8_k::dequantize(&x, &mut xf);
        assert_dot_close("q2_k", ds4_quant::q2_k::dot(&w, &x), &wf, &xf);
    }

    #[test]
    fn dot_q4_k_matches_f64_reference(seed in any::<u64>(), n_blocks in 1usize..6) {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = n_blocks * QK_K;
        let w: Vec<BlockQ4K> = random_blocks(&mut rng, n_blocks, &[0, 2]);
        let x = q8k_of(&gaussian(&mut rng, n));
        let (mut wf, mut xf) = (vec![0.0; n], vec![0.0; n]);
        ds4_quant::q4_k::dequantize(&w, &mut wf);
        q8_k::dequantize(&x, &mut xf);
        assert_dot_close("q4_k", ds4_quant::q4_k::dot(&w, &x), &wf, &xf);
    }

    #[test]
    fn dot_iq2_xxs_matches_f64_reference(seed in any::<u64>(), n_blocks in 1usize..6) {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = n_blocks * QK_K;
        let w: Vec<BlockIq2Xxs> = random_blocks(&mut rng, n_blocks, &[0]);
        let x = q8k_of(&gaussian(&mut rng, n));
        let (mut wf, mut xf) = (vec![0.0; n], vec![0.0; n]);
        ds4_quant::iq2_xxs::dequantize(&w, &mut wf);
        q8_k::dequantize(&x, &mut xf);
        assert_dot_close("iq2_xxs", ds4_quant::iq2_xxs::dot(&w, &x), &wf, &xf);
    }

    /// Q8_K: every element within half a step of its input, and `bsums` consistent.
    #[test]
    fn q8_k_round_trip_within_half_step(seed in any::<u64>(), scale_exp in -30i32..30) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x: Vec<f32> = gaussian(&mut rng, 2 * QK_K).iter().map(|v| v * 2f32.powi(scale_exp)).collect();
        let b = q8k_of(&x);
        let mut y = vec![0.0; x.len()];
        q8_k::dequantize(&b, &mut y);
        for (blk, (xs, ys)) in b.iter().zip(x.chunks(QK_K).zip(y.chunks(QK_K))) {
            for (a, c) in xs.iter().zip(ys) {
                prop_assert!((a - c).abs() <= 0.5001 * blk.d.abs());
            }
            for (t, s) in blk.bsums.iter().enumerate() {
                prop_assert_eq!(i32::from(*s), blk.qs[16 * t..16 * t + 16].iter().map(|&q| i32::from(q)).sum::<i32>());
            }
        }
    }
}

// ---- round-trip bounds (documented in docs/QUANT.md) ----------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// F16 and BF16 encoding is round to nearest: relative error at most 2^-11 and 2^-8 in
    /// the normal range.
    #[test]
    fn f16_bf16_round_trip_within_half_ulp(x in -60000.0f32..60000.0) {
        prop_assume!(x.abs() >= 1e-4);
        let h = ds4_quant::f16::f32_to_f16(x).to_f32();
        prop_assert!((h - x).abs() <= x.abs() * 2f32.powi(-11));
        let mut b = [half::bf16::ZERO];
        ds4_quant::f16::f32_to_bf16_row(&[x], &mut b);
        prop_assert!((b[0].to_f32() - x).abs() <= x.abs() * 2f32.powi(-8));
    }
}

#[test]
fn importance_applies_per_column_of_every_row() {
    // Two rows quantized together with one row of importance equal each row on its own.
    let mut rng = StdRng::seed_from_u64(4);
    let x = gaussian(&mut rng, 2 * 512);
    let imp: Vec<f32> = (0..512).map(|_| rng.random_range(0.0f32..3.0)).collect();
    for dtype in [DType::Q2K, DType::Q4K] {
        let mut both = Vec::new();
        row::quantize(dtype, &x, Some(&imp), &mut both).expect("two rows");
        let mut each = Vec::new();
        row::quantize(dtype, &x[..512], Some(&imp), &mut each).expect("row 0");
        row::quantize(dtype, &x[512..], Some(&imp), &mut each).expect("row 1");
        assert_eq!(both, each, "{dtype:?}");
        let mut plain = Vec::new();
        row::quantize(dtype, &x, None, &mut plain).expect("no importance");
        assert_ne!(
            both, plain,
            "{dtype:?}: importance must select the weighted search"
        );
    }
}

/// Relative RMSE `sqrt(Σ(x - x')² / Σx²)` of quantizing `x` as `dtype` and back.
fn round_trip_rel_rmse(dtype: DType, x: &[f32], importance: Option<&[f32]>) -> f64 {
    let mut bytes = Vec::new();
    row::quantize(dtype, x, importance, &mut bytes).expect("quantize");
    let mut y = vec![0.0; x.len()];
    row::dequantize(dtype, &bytes, &mut y).expect("dequantize");
    let err: f64 = x
        .iter()
        .zip(&y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let sig: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum();
    (err / sig).sqrt()
}

#[test]
fn q8_0_round_trip_error_within_bound() {
    // Per element: |x - x'| <= d/2 + 127·|d - f16(d)| <= (0.5 + 127·2^-11)·amax/127 for a
    // normal f16 scale.
    let mut rng = StdRng::seed_from_u64(1);
    let x = gaussian(&mut rng, 64 * 32);
    let mut b = vec![BlockQ8_0::zeroed(); 64];
    ds4_quant::q8_0::quantize(&x, &mut b);
    let mut y = vec![0.0; x.len()];
    ds4_quant::q8_0::dequantize(&b, &mut y);
    for (xs, ys) in x.chunks(32).zip(y.chunks(32)) {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (a, c) in xs.iter().zip(ys) {
            assert!((a - c).abs() <= (0.5 + 127.0 / 2048.0) * amax / 127.0 * 1.0001);
        }
    }
}

#[test]
fn k_quant_round_trip_error_within_bound() {
    // Bounds on Gaussian data from docs/QUANT.md (measured values have a wide margin).
    let mut rng = StdRng::seed_from_u64(2);
    let x = gaussian(&mut rng, 16 * QK_K);
    let imp: Vec<f32> = (0..4 * QK_K)
        .map(|_| rng.random_range(0.1f32..2.0))
        .collect();
    for (dtype, importance, bound) in [
        (DType::Q4K, None, 0.085),
        (DType::Q4K, Some(&imp[..]), 0.09),
        (DType::Q2K, None, 0.33),
        (DType::Q2K, Some(&imp[..]), 0.33),
    ] {
        let e = round_trip_rel_rmse(dtype, &x, importance);
        assert!(
            e <= bound,
            "{dtype:?} (importance: {}): relative RMSE {e}",
            importance.is_some()
        );
    }
}

// ---- quality table (docs/QUANT.md) ------------------------------------------------------------

/// The C harness's input generator (tests/fixtures/quant/cref/README.md): splitmix64,
/// uniform `(next >> 11)·2^-53`, Box-Muller cosine branch in f64.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 * 2f64.powi(-53)
    }

    fn gauss(&mut self) -> f64 {
        let u1 = self.uniform();
        let u2 = self.uniform();
        (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// The C harness's RMSE for `key` in the `"gaussian"` block of the cref manifest.
fn cref_rmse(manifest: &str, key: &str) -> Option<f64> {
    let block = &manifest[manifest.find("\"gaussian\": {")?..];
    let block = &block[..block.find('}')?];
    let at = block.find(&format!("\"{key}\": "))? + key.len() + 4;
    let end = block[at..]
        .find([',', '\n'])
        .map_or(block.len(), |e| at + e);
    block[at..end].trim().parse().ok()
}

/// Prints the RMSE table of docs/QUANT.md and checks that every K-quant RMSE equals the one
/// llama.cpp's C quantizer gets on the same data (recorded in the cref manifest):
/// `cargo test -p ds4-quant --release --test formats quality_table -- --ignored --nocapture`.
///
/// Data: the cref harness's RMSE set, 64 rows × 4096 standard-normal values (splitmix64,
/// seed "rmse-gss"), then the random importance `0.1 + 1.9u` per column; `colimp` is ds4's
/// synthetic importance, the column energy `Σ_rows x²` (f32, row order).
#[test]
#[ignore = "slow"]
fn quality_table() {
    let (n_rows, n_cols) = (64, 4096);
    let mut rng = SplitMix64(0x726d_7365_2d67_7373);
    let x: Vec<f32> = (0..n_rows * n_cols).map(|_| rng.gauss() as f32).collect();
    let imp: Vec<f32> = (0..n_cols)
        .map(|_| (0.1 + 1.9 * rng.uniform()) as f32)
        .collect();
    let mut colimp = vec![0.0f32; n_cols];
    for row in x.chunks(n_cols) {
        for (e, v) in colimp.iter_mut().zip(row) {
            *e += v * v;
        }
    }
    let manifest = String::from_utf8(fixture("cref/manifest.json")).expect("utf-8 manifest");
    println!(
        "| format | importance | bits/weight | RMSE | llama.cpp RMSE | relative RMSE | importance-weighted relative RMSE |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for (dtype, key, importance) in [
        (DType::Q8_0, "q8_0", None),
        (DType::Q4K, "q4_k", None),
        (DType::Q4K, "q4_k.imp", Some(&imp[..])),
        (DType::Q4K, "q4_k.colimp", Some(&colimp[..])),
        (DType::Q2K, "q2_k", None),
        (DType::Q2K, "q2_k.imp", Some(&imp[..])),
        (DType::Q2K, "q2_k.colimp", Some(&colimp[..])),
    ] {
        let mut bytes = Vec::new();
        row::quantize(dtype, &x, importance, &mut bytes).expect("quantize");
        let mut y = vec![0.0; x.len()];
        row::dequantize(dtype, &bytes, &mut y).expect("dequantize");
        let (mut err, mut sig, mut werr, mut wsig) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
            let w = importance.map_or(1.0, |imp| f64::from(imp[i % n_cols]));
            let e = (f64::from(b) - f64::from(a)).powi(2);
            err += e;
            sig += f64::from(a).powi(2);
            werr += w * e;
            wsig += w * f64::from(a).powi(2);
        }
        let rmse = (err / x.len() as f64).sqrt();
        let c_rmse = cref_rmse(&manifest, key);
        if dtype != DType::Q8_0 {
            let c = c_rmse.unwrap_or_else(|| panic!("cref manifest has no RMSE for {key}"));
            assert!(
                (rmse - c).abs() <= 1e-6 * c,
                "{key}: RMSE {rmse} vs llama.cpp {c}"
            );
        }
        let bpw = 8.0 * dtype.block_bytes() as f64 / dtype.block_elems() as f64;
        let imp_name = key.split_once('.').map_or("none", |(_, k)| k);
        println!(
            "| {} | {imp_name} | {bpw:.4} | {rmse:.6} | {} | {:.6} | {:.6} |",
            dtype.name(),
            c_rmse.map_or("–".to_string(), |c| format!("{c:.6}")),
            (err / sig).sqrt(),
            (werr / wsig).sqrt(),
        );
    }
}
