//! The fast CPU kernels against the scalar references that define the formats.
//!
//! Every dot kernel of every instruction set this CPU supports ([`Kernels::for_isa`]) is run
//! on random blocks and compared with the scalar `dot` of its format; the matrix products of
//! `gemv` are compared with row-by-row scalar dots, across thread counts, and with the
//! scalar kernel table forced (also through `DS4_SIMD=scalar` in a child process).
//!
//! Tolerance (`TOL`): `|fast - scalar| <= 1e-5 * Σ|products|`. The integer block sums are
//! exact in every kernel; only the f32 accumulation order differs, so the error is bounded
//! by a small multiple of f32 epsilon times the sum of the magnitudes of the terms. For Q2_K
//! and Q4_K the scale part and the min part of each product are counted separately (they
//! can cancel, the rounding does not).
//!
//! Random blocks are random bytes with a finite f16 scale (every byte pattern of these
//! formats is a valid block, FORMATS.md s2.6); activations come from the real quantizers, so
//! their quants lie in `[-127, 127]` as the kernels require.

use ds4_quant::gemv::{self, Gemv};
use ds4_quant::simd::{self, Isa};
use ds4_quant::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, Error, QK_K, QK8_0};
use ds4_tensor::DType;
use half::{bf16, f16};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

mod common;
use common::{random_blocks, random_f32, scale, tables};

/// Relative tolerance against the sum of |products| (see the module docs).
const TOL: f64 = 1e-5;

fn check_close(what: &str, isa: Isa, got: f32, want: f32, mag: f64) {
    let err = (f64::from(got) - f64::from(want)).abs();
    assert!(
        err <= TOL * mag + 1e-30,
        "{what} on {isa:?}: got {got}, scalar {want}, |err| {err:e} > {TOL:e} * {mag:e}"
    );
}

// ---------------------------------------------------------------------------------------
// Random data.

fn q8k(x: &[f32]) -> Vec<BlockQ8K> {
    gemv::quantize_q8k(x).expect("whole blocks")
}

fn q2k_blocks(rng: &mut StdRng, n: usize) -> Vec<BlockQ2K> {
    let mut b: Vec<BlockQ2K> = random_blocks(rng, n);
    for b in &mut b {
        b.d = scale(rng);
        b.dmin = scale(rng);
    }
    b
}

fn q4k_blocks(rng: &mut StdRng, n: usize) -> Vec<BlockQ4K> {
    let mut b: Vec<BlockQ4K> = random_blocks(rng, n);
    for b in &mut b {
        b.d = scale(rng);
        b.dmin = scale(rng);
    }
    b
}

fn iq2_blocks(rng: &mut StdRng, n: usize) -> Vec<BlockIq2Xxs> {
    let mut b: Vec<BlockIq2Xxs> = random_blocks(rng, n);
    for b in &mut b {
        b.d = scale(rng);
    }
    b
}

fn q8_0_blocks(rng: &mut StdRng, n: usize) -> Vec<BlockQ8_0> {
    let mut b: Vec<BlockQ8_0> = random_blocks(rng, n);
    for b in &mut b {
        b.d = scale(rng);
        // Weights may hold -128 (any byte is a valid Q8_0 quant).
    }
    b
}

/// `Σ|a_e · b_e|` in f64.
fn abs_dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs())
        .sum()
}

fn deq_q8k(x: &[BlockQ8K]) -> Vec<f32> {
    let mut out = vec![0.0; x.len() * QK_K];
    ds4_quant::q8_k::dequantize(x, &mut out);
    out
}

/// Σ|products| of a K-quant row: scale part (dmin = 0) plus min part (d = 0).
fn kquant_mag<B: Clone>(
    w: &[B],
    xd: &[f32],
    set: fn(&mut B, f16, f16),
    get: fn(&B) -> (f16, f16),
    deq: fn(&[B], &mut [f32]),
) -> f64 {
    let part = |keep_d: bool| {
        let blocks: Vec<B> = w
            .iter()
            .map(|b| {
                let mut b = b.clone();
                let (d, dmin) = get(&b);
                if keep_d {
                    set(&mut b, d, f16::ZERO)
                } else {
                    set(&mut b, f16::ZERO, dmin)
                }
                b
            })
            .collect();
        let mut out = vec![0.0; xd.len()];
        deq(&blocks, &mut out);
        abs_dot(&out, xd)
    };
    part(true) + part(false)
}

// ---------------------------------------------------------------------------------------
// Dot kernels against the scalar references.

fn check_q2k(seed: u64, n: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = q2k_blocks(&mut rng, n);
    let x = q8k(&random_f32(&mut rng, n * QK_K));
    let want = ds4_quant::q2_k::dot(&w, &x);
    let mag = kquant_mag(
        &w,
        &deq_q8k(&x),
        |b, d, m| (b.d, b.dmin) = (d, m),
        |b| (b.d, b.dmin),
        ds4_quant::q2_k::dequantize,
    );
    for k in tables() {
        check_close("Q2_K x Q8_K", k.isa, (k.q2k_q8k)(&w, &x), want, mag);
    }
}

fn check_q4k(seed: u64, n: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = q4k_blocks(&mut rng, n);
    let x = q8k(&random_f32(&mut rng, n * QK_K));
    let want = ds4_quant::q4_k::dot(&w, &x);
    let mag = kquant_mag(
        &w,
        &deq_q8k(&x),
        |b, d, m| (b.d, b.dmin) = (d, m),
        |b| (b.d, b.dmin),
        ds4_quant::q4_k::dequantize,
    );
    for k in tables() {
        check_close("Q4_K x Q8_K", k.isa, (k.q4k_q8k)(&w, &x), want, mag);
    }
}

fn check_iq2(seed: u64, n: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = iq2_blocks(&mut rng, n);
    let x = q8k(&random_f32(&mut rng, n * QK_K));
    let want = ds4_quant::iq2_xxs::dot(&w, &x);
    let mut wd = vec![0.0; n * QK_K];
    ds4_quant::iq2_xxs::dequantize(&w, &mut wd);
    let mag = abs_dot(&wd, &deq_q8k(&x));
    for k in tables() {
        check_close("IQ2_XXS x Q8_K", k.isa, (k.iq2xxs_q8k)(&w, &x), want, mag);
    }
}

fn check_q8_0(seed: u64, n: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = q8_0_blocks(&mut rng, n);
    let x = gemv::quantize_q8_0(&random_f32(&mut rng, n * QK8_0)).expect("whole blocks");
    let want = ds4_quant::q8_0::dot(&w, &x);
    let (mut wd, mut xd) = (vec![0.0; n * QK8_0], vec![0.0; n * QK8_0]);
    ds4_quant::q8_0::dequantize(&w, &mut wd);
    ds4_quant::q8_0::dequantize(&x, &mut xd);
    let mag = abs_dot(&wd, &xd);
    for k in tables() {
        check_close("Q8_0 x Q8_0", k.isa, (k.q8_0_q8_0)(&w, &x), want, mag);
    }
}

fn check_floats(seed: u64, n: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let wf = random_f32(&mut rng, n);
    let x = random_f32(&mut rng, n);
    let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();
    let wh32: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
    let wb32: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
    let want_h = ds4_quant::f16::dot_f16_f32(&wh, &x);
    let want_b = ds4_quant::f16::dot_bf16_f32(&wb, &x);
    let want_f = ds4_quant::f16::dot_f32(&wf, &x);
    for k in tables() {
        check_close(
            "F16 x f32",
            k.isa,
            (k.f16_f32)(&wh, &x),
            want_h,
            abs_dot(&wh32, &x),
        );
        check_close(
            "BF16 x f32",
            k.isa,
            (k.bf16_f32)(&wb, &x),
            want_b,
            abs_dot(&wb32, &x),
        );
        check_close(
            "f32 x f32",
            k.isa,
            (k.f32_f32)(&wf, &x),
            want_f,
            abs_dot(&wf, &x),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 48,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("proptest-regressions/kernels.txt"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn q2k_matches_scalar(seed: u64, n in 1usize..20) { check_q2k(seed, n); }

    #[test]
    fn q4k_matches_scalar(seed: u64, n in 1usize..20) { check_q4k(seed, n); }

    #[test]
    fn iq2xxs_matches_scalar(seed: u64, n in 1usize..20) { check_iq2(seed, n); }

    #[test]
    fn q8_0_matches_scalar(seed: u64, n in 1usize..130) { check_q8_0(seed, n); }

    #[test]
    fn floats_match_scalar(seed: u64, n in 0usize..300) { check_floats(seed, n); }
}

/// Multi-token kernels of the 2-bit expert formats: `out[t]` must equal the single-row dot
/// of the same table bit for bit, for every token count 1..=9 (9 crosses a pass boundary of
/// the AVX-512 VBMI kernels, which take 8 tokens at a time).
fn check_multi_token_2bit(seed: u64, nb: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let q2 = q2k_blocks(&mut rng, nb);
    let iq = iq2_blocks(&mut rng, nb);
    for n in 1..=9 {
        let x = q8k(&random_f32(&mut rng, n * nb * QK_K));
        for k in tables() {
            let mut out = vec![f32::NAN; n];
            (k.q2k_q8k_n)(&q2, &x, &mut out);
            for (t, &o) in out.iter().enumerate() {
                let single = (k.q2k_q8k)(&q2, &x[t * nb..(t + 1) * nb]);
                assert_eq!(
                    o.to_bits(),
                    single.to_bits(),
                    "Q2_K {:?} n={n} t={t}",
                    k.isa
                );
            }
            let mut out = vec![f32::NAN; n];
            (k.iq2xxs_q8k_n)(&iq, &x, &mut out);
            for (t, &o) in out.iter().enumerate() {
                let single = (k.iq2xxs_q8k)(&iq, &x[t * nb..(t + 1) * nb]);
                assert_eq!(
                    o.to_bits(),
                    single.to_bits(),
                    "IQ2_XXS {:?} n={n} t={t}",
                    k.isa
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 16,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("proptest-regressions/kernels.txt"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn multi_token_2bit_match_single(seed: u64, nb in 1usize..6) { check_multi_token_2bit(seed, nb); }
}

/// Multi-token Q4_K kernels of every table: each `out[t]` within the tolerance of the scalar
/// reference for token `t`, and bit-identical to the same table's single-row dot, for token
/// counts 1..=17 (the AVX-512 kernels run passes of up to 8 tokens and reduce 3..=8 tokens
/// with shared shuffles, 1..=2 one by one; 17 covers two full passes and a single).
fn check_multi_token_q4k(seed: u64, nb: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = q4k_blocks(&mut rng, nb);
    for n in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17] {
        let x = q8k(&random_f32(&mut rng, n * nb * QK_K));
        for k in tables() {
            let mut out = vec![f32::NAN; n];
            (k.q4k_q8k_n)(&w, &x, &mut out);
            for (t, &o) in out.iter().enumerate() {
                let xt = &x[t * nb..(t + 1) * nb];
                let single = (k.q4k_q8k)(&w, xt);
                assert_eq!(
                    o.to_bits(),
                    single.to_bits(),
                    "Q4_K {:?} n={n} t={t}",
                    k.isa
                );
                let mag = kquant_mag(
                    &w,
                    &deq_q8k(xt),
                    |b, d, m| (b.d, b.dmin) = (d, m),
                    |b| (b.d, b.dmin),
                    ds4_quant::q4_k::dequantize,
                );
                let what = format!("Q4_K x Q8_K _n (n={n}, t={t})");
                check_close(&what, k.isa, o, ds4_quant::q4_k::dot(&w, xt), mag);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 12,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("proptest-regressions/kernels.txt"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn multi_token_q4k_match_scalar_and_single(seed: u64, nb in 1usize..6) {
        check_multi_token_q4k(seed, nb);
    }
}

/// Extreme quants: every weight byte at its maximum and the activations at ±127, where an
/// i16 intermediate would saturate if a kernel got the bounds wrong.
#[test]
fn extreme_blocks_are_exact() {
    let mut x = vec![0.0f32; 4 * QK_K];
    for (i, v) in x.iter_mut().enumerate() {
        *v = if i % 3 == 0 { -1.0 } else { 1.0 };
    }
    let xq = q8k(&x);
    assert!(xq.iter().all(|b| b.qs.iter().all(|&q| q.abs() == 127)));
    let x0 = gemv::quantize_q8_0(&x).expect("whole blocks");
    let one = f16::ONE;
    let q2 = vec![
        BlockQ2K {
            scales: [0xFF; 16],
            qs: [0xFF; 64],
            d: one,
            dmin: one
        };
        4
    ];
    let q4 = vec![
        BlockQ4K {
            d: one,
            dmin: one,
            scales: [0xFF; 12],
            qs: [0xFF; 128]
        };
        4
    ];
    let iq = vec![
        BlockIq2Xxs {
            d: one,
            qs: [0xFF; 64]
        };
        4
    ];
    let q8 = vec![
        BlockQ8_0 {
            d: one,
            qs: [-128; 32]
        };
        32
    ];
    for k in tables() {
        // Small integers times powers of two: every path is exact, so compare exactly.
        assert_eq!(
            (k.q2k_q8k)(&q2, &xq),
            ds4_quant::q2_k::dot(&q2, &xq),
            "{:?}",
            k.isa
        );
        assert_eq!(
            (k.q4k_q8k)(&q4, &xq),
            ds4_quant::q4_k::dot(&q4, &xq),
            "{:?}",
            k.isa
        );
        assert_eq!(
            (k.iq2xxs_q8k)(&iq, &xq),
            ds4_quant::iq2_xxs::dot(&iq, &xq),
            "{:?}",
            k.isa
        );
        assert_eq!(
            (k.q8_0_q8_0)(&q8, &x0),
            ds4_quant::q8_0::dot(&q8, &x0),
            "{:?}",
            k.isa
        );
    }
}

// ---------------------------------------------------------------------------------------
// Matrix products.

/// A random weight matrix of `dtype` as raw bytes.
fn random_matrix(rng: &mut StdRng, dtype: DType, n_rows: usize, n_cols: usize) -> Vec<u8> {
    let n = n_rows * n_cols / dtype.block_elems();
    match dtype {
        DType::Q2K => bytemuck::cast_slice(&q2k_blocks(rng, n)).to_vec(),
        DType::Q4K => bytemuck::cast_slice(&q4k_blocks(rng, n)).to_vec(),
        DType::Iq2Xxs => bytemuck::cast_slice(&iq2_blocks(rng, n)).to_vec(),
        DType::Q8_0 => bytemuck::cast_slice(&q8_0_blocks(rng, n)).to_vec(),
        DType::F16 => {
            let v: Vec<f16> = random_f32(rng, n)
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::BF16 => {
            let v: Vec<bf16> = random_f32(rng, n)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::F32 => bytemuck::cast_slice(&random_f32(rng, n)).to_vec(),
        other => panic!("no random matrices of {other}"),
    }
}

const MATRIX_TYPES: [DType; 7] = [
    DType::Q2K,
    DType::Q4K,
    DType::Iq2Xxs,
    DType::Q8_0,
    DType::F16,
    DType::BF16,
    DType::F32,
];

/// The scalar reference of `ys[t, r]`: quantize each token as gemv does, then the format's
/// scalar dot per row; also returns Σ|products| per output for the tolerance.
fn reference(
    dtype: DType,
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    xs: &[f32],
) -> (Vec<f32>, Vec<f64>) {
    let n_tok = xs.len() / n_cols;
    let rb = w.len() / n_rows;
    let mut ys = vec![0.0; n_tok * n_rows];
    let mut mags = vec![0.0; n_tok * n_rows];
    for t in 0..n_tok {
        let x = &xs[t * n_cols..(t + 1) * n_cols];
        for r in 0..n_rows {
            let row = &w[r * rb..(r + 1) * rb];
            let mut wd = vec![0.0; n_cols];
            ds4_quant::row::dequantize(dtype, row, &mut wd).expect("valid row");
            let (y, xd) = match dtype {
                DType::Q2K => {
                    let xq = q8k(x);
                    (
                        ds4_quant::q2_k::dot(bytemuck::cast_slice(row), &xq),
                        deq_q8k(&xq),
                    )
                }
                DType::Q4K => {
                    let xq = q8k(x);
                    (
                        ds4_quant::q4_k::dot(bytemuck::cast_slice(row), &xq),
                        deq_q8k(&xq),
                    )
                }
                DType::Iq2Xxs => {
                    let xq = q8k(x);
                    (
                        ds4_quant::iq2_xxs::dot(bytemuck::cast_slice(row), &xq),
                        deq_q8k(&xq),
                    )
                }
                DType::Q8_0 => {
                    let xq = gemv::quantize_q8_0(x).expect("whole blocks");
                    let mut xd = vec![0.0; n_cols];
                    ds4_quant::q8_0::dequantize(&xq, &mut xd);
                    (ds4_quant::q8_0::dot(bytemuck::cast_slice(row), &xq), xd)
                }
                DType::F16 => (
                    ds4_quant::f16::dot_f16_f32(bytemuck::cast_slice(row), x),
                    x.to_vec(),
                ),
                DType::BF16 => (
                    ds4_quant::f16::dot_bf16_f32(bytemuck::cast_slice(row), x),
                    x.to_vec(),
                ),
                DType::F32 => (
                    ds4_quant::f16::dot_f32(bytemuck::cast_slice(row), x),
                    x.to_vec(),
                ),
                other => panic!("no reference for {other}"),
            };
            ys[t * n_rows + r] = y;
            // K-quant min parts can cancel against scale parts: bound them generously by
            // counting |w|·|x| of the dequantized row twice.
            mags[t * n_rows + r] = 2.0 * abs_dot(&wd, &xd) + 1e-30;
        }
    }
    (ys, mags)
}

fn check_matmul(dtype: DType, gemv: Gemv, n_rows: usize, n_cols: usize, n_tok: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let w = random_matrix(&mut rng, dtype, n_rows, n_cols);
    let xs = random_f32(&mut rng, n_tok * n_cols);
    let (want, mags) = reference(dtype, &w, n_rows, n_cols, &xs);
    let mut ys = vec![f32::NAN; n_tok * n_rows];
    gemv.matmul(dtype, &w, n_rows, n_cols, &xs, &mut ys)
        .expect("valid shapes");
    for (i, ((&g, &r), &m)) in ys.iter().zip(&want).zip(&mags).enumerate() {
        let err = (f64::from(g) - f64::from(r)).abs();
        assert!(
            err <= TOL * m,
            "{dtype} {:?} out {i}: got {g}, want {r}",
            gemv.kernels().isa
        );
        if gemv.kernels().isa == Isa::Scalar {
            assert_eq!(
                g.to_bits(),
                r.to_bits(),
                "scalar table must equal the references"
            );
        }
    }
}

#[test]
fn matvec_and_matmul_match_row_by_row_scalar() {
    for (i, dtype) in MATRIX_TYPES.into_iter().enumerate() {
        for k in tables() {
            let g = Gemv::with_kernels(k);
            check_matmul(dtype, g, 37, 512, 1, 10 + i as u64);
            check_matmul(dtype, g, 21, 256, 3, 20 + i as u64);
        }
    }
}

#[test]
fn prequantized_variants_match() {
    let mut rng = StdRng::seed_from_u64(7);
    let (n_rows, n_cols, n_tok) = (40, 512, 2);
    let xs = random_f32(&mut rng, n_tok * n_cols);
    for dtype in [DType::Q2K, DType::Q4K, DType::Iq2Xxs] {
        let w = random_matrix(&mut rng, dtype, n_rows, n_cols);
        let (mut a, mut b) = (vec![0.0; n_tok * n_rows], vec![0.0; n_tok * n_rows]);
        gemv::matmul(dtype, &w, n_rows, n_cols, &xs, &mut a).expect("valid");
        let xq = gemv::quantize_q8k(&xs).expect("valid");
        gemv::matmul_q8k(dtype, &w, n_rows, n_cols, &xq, &mut b).expect("valid");
        assert_eq!(a, b);
        let mut y = vec![0.0; n_rows];
        gemv::matvec_q8k(dtype, &w, n_rows, n_cols, &xq[..n_cols / QK_K], &mut y).expect("valid");
        assert_eq!(y, a[..n_rows]);
    }
    let w = random_matrix(&mut rng, DType::Q8_0, n_rows, n_cols);
    let (mut a, mut b) = (vec![0.0; n_tok * n_rows], vec![0.0; n_tok * n_rows]);
    gemv::matmul(DType::Q8_0, &w, n_rows, n_cols, &xs, &mut a).expect("valid");
    let xq = gemv::quantize_q8_0(&xs).expect("valid");
    gemv::matmul_q8_0(&w, n_rows, n_cols, &xq, &mut b).expect("valid");
    assert_eq!(a, b);
    let mut y = vec![0.0; n_rows];
    gemv::matvec_q8_0(&w, n_rows, n_cols, &xq[..n_cols / QK8_0], &mut y).expect("valid");
    assert_eq!(y, a[..n_rows]);
}

/// Every output is one kernel call whatever the split, so results are bit-identical.
#[test]
fn thread_count_does_not_change_results() {
    let mut rng = StdRng::seed_from_u64(99);
    let (n_rows, n_cols) = (300, 1024);
    for dtype in MATRIX_TYPES {
        let w = random_matrix(&mut rng, dtype, n_rows, n_cols);
        for n_tok in [1, 4] {
            let xs = random_f32(&mut rng, n_tok * n_cols);
            let mut first: Option<Vec<f32>> = None;
            for threads in [1, 2, 3, 8] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let mut ys = vec![0.0; n_tok * n_rows];
                pool.install(|| gemv::matmul(dtype, &w, n_rows, n_cols, &xs, &mut ys))
                    .expect("valid");
                match &first {
                    None => first = Some(ys),
                    Some(f) => assert!(
                        f.iter().zip(&ys).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype}: {threads} threads differ"
                    ),
                }
            }
        }
    }
}

/// Misaligned weight bytes are accepted and give the same result.
#[test]
fn misaligned_weights_give_same_result() {
    let mut rng = StdRng::seed_from_u64(5);
    let (n_rows, n_cols) = (8, 256);
    for dtype in MATRIX_TYPES {
        let w = random_matrix(&mut rng, dtype, n_rows, n_cols);
        let mut shifted = vec![0u8; w.len() + 1];
        shifted[1..].copy_from_slice(&w);
        let x = random_f32(&mut rng, n_cols);
        let (mut a, mut b) = (vec![0.0; n_rows], vec![0.0; n_rows]);
        gemv::matvec(dtype, &w, n_rows, n_cols, &x, &mut a).expect("valid");
        gemv::matvec(dtype, &shifted[1..], n_rows, n_cols, &x, &mut b).expect("valid");
        assert_eq!(a, b, "{dtype}");
    }
}

#[test]
fn length_errors_are_errors() {
    let mut rng = StdRng::seed_from_u64(3);
    let (n_rows, n_cols) = (4, 512);
    let w = random_matrix(&mut rng, DType::Q4K, n_rows, n_cols);
    let x = random_f32(&mut rng, n_cols);
    let mut y = vec![0.0; n_rows];
    let q4 = DType::Q4K;
    // Weight bytes short, activations short, output short.
    assert!(matches!(
        gemv::matvec(q4, &w[1..], n_rows, n_cols, &x, &mut y),
        Err(Error::Tensor(_))
    ));
    assert!(matches!(
        gemv::matvec(q4, &w, n_rows, n_cols, &x[1..], &mut y),
        Err(Error::Tensor(_))
    ));
    assert!(matches!(
        gemv::matvec(q4, &w, n_rows, n_cols, &x, &mut y[1..]),
        Err(Error::OutputLength { .. })
    ));
    // Batch output must be [n_tok, n_rows].
    let xs2 = random_f32(&mut rng, 2 * n_cols);
    assert!(matches!(
        gemv::matmul(q4, &w, n_rows, n_cols, &xs2, &mut y),
        Err(Error::OutputLength { .. })
    ));
    // Columns not a whole number of blocks.
    assert!(matches!(
        gemv::matvec(q4, &w, n_rows, 100, &x[..100], &mut y),
        Err(Error::NotWholeBlocks { .. })
    ));
    // Types that are not matrix weights, and activations of the wrong format.
    assert!(matches!(
        gemv::matvec(DType::Q8K, &w, n_rows, n_cols, &x, &mut y),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        gemv::matvec(DType::I32, &w, n_rows, n_cols, &x, &mut y),
        Err(Error::Unsupported { .. })
    ));
    let xq = gemv::quantize_q8k(&x).expect("valid");
    assert!(matches!(
        gemv::matvec_q8k(DType::Q8_0, &w, n_rows, n_cols, &xq, &mut y),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        gemv::matvec_q8k(q4, &w, n_rows, n_cols, &xq[1..], &mut y),
        Err(Error::Tensor(_))
    ));
    assert!(gemv::quantize_q8k(&x[1..]).is_err());
    assert!(gemv::quantize_q8_0(&x[1..]).is_err());
    // Empty matrices are fine.
    gemv::matvec(q4, &[], 0, n_cols, &x, &mut []).expect("zero rows");
    // Zero columns: no token can be inferred, so only an empty output is consistent; no
    // panic (division by zero) either way.
    gemv::matvec(q4, &[], n_rows, 0, &[], &mut []).expect("zero columns, zero tokens");
    gemv::matvec(DType::Q8_0, &[], n_rows, 0, &[], &mut []).expect("zero columns, zero tokens");
    assert!(gemv::matvec(q4, &[], n_rows, 0, &[], &mut y).is_err());
    // The valid call succeeds.
    gemv::matvec(q4, &w, n_rows, n_cols, &x, &mut y).expect("valid");
}

/// With `DS4_SIMD=scalar` the dispatcher picks the scalar references, and the public
/// entry points agree with them bit for bit. Runs itself as a child process so that the
/// cached detection of this process is not disturbed.
#[test]
fn ds4_simd_scalar_forces_fallback() {
    if std::env::var("DS4_SIMD").as_deref() == Ok("scalar") {
        assert_eq!(simd::active_isa(), Isa::Scalar);
        for (i, dtype) in MATRIX_TYPES.into_iter().enumerate() {
            check_matmul(dtype, Gemv::new(), 19, 512, 2, 40 + i as u64);
        }
        let mut rng = StdRng::seed_from_u64(1);
        let w = q4k_blocks(&mut rng, 3);
        let x = q8k(&random_f32(&mut rng, 3 * QK_K));
        assert_eq!(simd::dot_q4k_q8k(&w, &x), ds4_quant::q4_k::dot(&w, &x));
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args(["ds4_simd_scalar_forces_fallback", "--exact", "--nocapture"])
        .env("DS4_SIMD", "scalar")
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "child did not run the test:\n{stdout}"
    );
}

/// The dispatched free functions use the best supported table.
#[test]
fn dispatch_picks_best_supported() {
    if std::env::var("DS4_SIMD").is_ok() {
        return;
    }
    let best = *simd::supported()
        .last()
        .expect("scalar is always supported");
    assert_eq!(simd::active_isa(), best);
    eprintln!("kernel tables tested: {:?}", simd::supported());
}
