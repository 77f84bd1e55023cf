//! The multi-token ("_n") kernels against the single-row kernels of the same table, bit for
//! bit, and `gemv::matmul` of a batch against one `matvec` per token, bit for bit.
//!
//! Bit identity (not a tolerance) is the contract: prefill computes a chunk of tokens with the
//! `_n` kernels, decode one token with the single kernels, and the model promises that both
//! give the same logits. Every table this CPU can run is checked (scalar, AVX2, AVX-512 on
//! x86-64; `DS4_SIMD` is not needed because `Kernels::for_isa` hands out each table),
//! n = 0..=9 tokens, random blocks of random lengths.

use ds4_quant::gemv::Gemv;
use ds4_quant::simd::{self, Kernels};
use ds4_quant::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, QK_K, QK8_0};
use ds4_tensor::DType;
use half::{bf16, f16};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::{random_blocks, random_f32, scale, tables};

fn q8k(rng: &mut StdRng, n_blocks: usize) -> Vec<BlockQ8K> {
    let x = random_f32(rng, n_blocks * QK_K);
    let mut out = vec![bytemuck::Zeroable::zeroed(); n_blocks];
    ds4_quant::q8_k::quantize(&x, &mut out);
    out
}

fn q8_0(rng: &mut StdRng, n_blocks: usize) -> Vec<BlockQ8_0> {
    let x = random_f32(rng, n_blocks * QK8_0);
    let mut out = vec![bytemuck::Zeroable::zeroed(); n_blocks];
    ds4_quant::q8_0::quantize(&x, &mut out);
    out
}

/// `kn(w, x, out)` must equal `k1(w, x[t])` bit for bit for every token.
fn check_n<W, X>(
    what: &str,
    kernels: &Kernels,
    k1: fn(&[W], &[X]) -> f32,
    kn: fn(&[W], &[X], &mut [f32]),
    w: &[W],
    x: &[X],
    n: usize,
) {
    let nb = w.len();
    assert_eq!(x.len(), nb * n);
    let mut out = vec![f32::NAN; n];
    kn(w, x, &mut out);
    for (t, &got) in out.iter().enumerate() {
        let want = k1(w, &x[t * nb..(t + 1) * nb]);
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{what} on {:?}: token {t} of {n}, {nb} blocks: _n gave {got}, single {want}",
            kernels.isa
        );
    }
}

/// A table's prepared-activation kernels give exactly the bits of its plain single-row
/// kernel `k1`, one token at a time and `n` at once (the matrix calls use the prepared ones).
fn check_prepared<W: Clone>(
    what: &str,
    kernels: &Kernels,
    p: simd::Prepared<W>,
    k1: fn(&[W], &[BlockQ8K]) -> f32,
    w: &[W],
    x: &[BlockQ8K],
    n: usize,
) {
    let nb = w.len();
    let mut xp = vec![bytemuck::Zeroable::zeroed(); x.len()];
    (p.prepare)(x, &mut xp);
    let mut out = vec![f32::NAN; n];
    (p.dot_n)(w, &xp, &mut out);
    if n > 0 {
        // Three rows (the row, reversed, the row) against token 0, in one call.
        let mut rows = w.to_vec();
        rows.extend(w.iter().rev().cloned());
        rows.extend_from_slice(w);
        let mut got = [f32::NAN; 3];
        (p.dot_rows)(&rows, &xp[..nb], &mut got);
        for (r, row) in rows.chunks(nb.max(1)).enumerate().take(3) {
            let want = k1(row, &x[..nb]).to_bits();
            assert_eq!(
                got[r].to_bits(),
                want,
                "{what} dot_rows on {:?}: row {r}",
                kernels.isa
            );
        }
    }
    for (t, &got_n) in out.iter().enumerate() {
        let want = k1(w, &x[t * nb..(t + 1) * nb]).to_bits();
        let got = (p.dot)(w, &xp[t * nb..(t + 1) * nb]).to_bits();
        assert_eq!(got, want, "{what} prepared on {:?}: token {t}", kernels.isa);
        assert_eq!(
            got_n.to_bits(),
            want,
            "{what} prepared _n on {:?}: token {t} of {n}",
            kernels.isa
        );
    }
}

fn check_all(seed: u64, nb: usize, n: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    // Weights: random bytes with finite scales (every byte pattern is a valid block).
    let mut wq8: Vec<BlockQ8_0> = random_blocks(&mut rng, nb * 4);
    wq8.iter_mut().for_each(|b| b.d = scale(&mut rng));
    let mut wq2: Vec<BlockQ2K> = random_blocks(&mut rng, nb);
    let mut wq4: Vec<BlockQ4K> = random_blocks(&mut rng, nb);
    for b in &mut wq2 {
        (b.d, b.dmin) = (scale(&mut rng), scale(&mut rng));
    }
    for b in &mut wq4 {
        (b.d, b.dmin) = (scale(&mut rng), scale(&mut rng));
    }
    let mut wiq: Vec<BlockIq2Xxs> = random_blocks(&mut rng, nb);
    wiq.iter_mut().for_each(|b| b.d = scale(&mut rng));
    let nf = nb * 37; // float rows of odd lengths, to hit every tail
    let wf: Vec<f32> = random_f32(&mut rng, nf);
    let wh: Vec<f16> = wf.iter().map(|&v| f16::from_f32(v)).collect();
    let wb: Vec<bf16> = wf.iter().map(|&v| bf16::from_f32(v)).collect();

    let xq8 = q8_0(&mut rng, nb * 4 * n);
    let xk = q8k(&mut rng, nb * n);
    let xf = random_f32(&mut rng, nf * n);
    for k in tables() {
        if let (Some(g), 1..=8) = (k.q8_0_q8_0_g, n) {
            // Pre-converted scales, lanes past the last token repeating it.
            let nb8 = wq8.len();
            let xd: Vec<f32> = (0..nb8 * 8)
                .map(|j| xq8[(j % 8).min(n - 1) * nb8 + j / 8].d.to_f32())
                .collect();
            let mut out = vec![f32::NAN; n];
            let (mut xp, mut scales) = (Vec::new(), Vec::new());
            simd::pack_q8_0_group(&xq8[..n * nb8], nb8, n, &mut xp, &mut scales);
            assert_eq!(scales, xd, "pack_q8_0_group scales, {n} tokens");
            g(&wq8, &xp, &scales, &mut out);
            for (t, &got) in out.iter().enumerate() {
                let want = (k.q8_0_q8_0)(&wq8, &xq8[t * nb8..(t + 1) * nb8]);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "q8_0_g on {:?}: token {t} of {n}",
                    k.isa
                );
            }
        }
        check_n("q8_0", k, k.q8_0_q8_0, k.q8_0_q8_0_n, &wq8, &xq8, n);
        check_n("q2_k", k, k.q2k_q8k, k.q2k_q8k_n, &wq2, &xk, n);
        check_n("q4_k", k, k.q4k_q8k, k.q4k_q8k_n, &wq4, &xk, n);
        check_n("iq2_xxs", k, k.iq2xxs_q8k, k.iq2xxs_q8k_n, &wiq, &xk, n);
        if let Some(p) = k.q2k_prep {
            check_prepared("q2_k", k, p, k.q2k_q8k, &wq2, &xk, n);
        }
        if let Some(p) = k.iq2xxs_prep {
            check_prepared("iq2_xxs", k, p, k.iq2xxs_q8k, &wiq, &xk, n);
        }
        check_n("f16", k, k.f16_f32, k.f16_f32_n, &wh, &xf, n);
        check_n("bf16", k, k.bf16_f32, k.bf16_f32_n, &wb, &xf, n);
        check_n("f32", k, k.f32_f32, k.f32_f32_n, &wf, &xf, n);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn n_kernels_equal_single_kernels(seed: u64, nb in 0usize..6, n in 0usize..=9) {
        check_all(seed, nb, n);
    }
}

/// Every n from 1 to 9 at a size like the model's rows (exhaustive over n, fixed seeds).
#[test]
fn every_token_count_is_bit_identical() {
    for n in 1..=9 {
        check_all(1000 + n as u64, 4, n);
    }
}

/// `Gemv::matvec` (which runs the prepared-activation kernels where a table has them) gives
/// exactly the plain single-row kernel's bits on the activations it quantizes.
#[test]
fn matvec_equals_plain_row_kernels() {
    let mut rng = StdRng::seed_from_u64(11);
    let (n_rows, n_cols) = (19, 1024);
    let nb = n_cols / QK_K;
    let mut wq2: Vec<BlockQ2K> = random_blocks(&mut rng, n_rows * nb);
    for b in &mut wq2 {
        (b.d, b.dmin) = (scale(&mut rng), scale(&mut rng));
    }
    let mut wiq: Vec<BlockIq2Xxs> = random_blocks(&mut rng, n_rows * nb);
    wiq.iter_mut().for_each(|b| b.d = scale(&mut rng));
    let xs = random_f32(&mut rng, n_cols);
    let mut xq = vec![bytemuck::Zeroable::zeroed(); nb];
    simd::quantize_q8k(&xs, &mut xq);
    for k in tables() {
        let g = Gemv::with_kernels(k);
        let mut y = vec![f32::NAN; n_rows];
        g.matvec(
            DType::Q2K,
            bytemuck::cast_slice(&wq2),
            n_rows,
            n_cols,
            &xs,
            &mut y,
        )
        .expect("matvec");
        for (r, row) in wq2.chunks_exact(nb).enumerate() {
            let want = (k.q2k_q8k)(row, &xq);
            assert_eq!(
                y[r].to_bits(),
                want.to_bits(),
                "q2_k on {:?}: row {r}",
                k.isa
            );
        }
        g.matvec(
            DType::Iq2Xxs,
            bytemuck::cast_slice(&wiq),
            n_rows,
            n_cols,
            &xs,
            &mut y,
        )
        .expect("matvec");
        for (r, row) in wiq.chunks_exact(nb).enumerate() {
            let want = (k.iq2xxs_q8k)(row, &xq);
            assert_eq!(
                y[r].to_bits(),
                want.to_bits(),
                "iq2_xxs on {:?}: row {r}",
                k.isa
            );
        }
    }
}

/// `Gemv::matmul` of a batch equals one `matvec` per token, bit for bit, for every weight
/// type and table, so prefill (batched) and decode (one token) agree exactly.
#[test]
fn matmul_batch_equals_matvec_per_token() {
    let mut rng = StdRng::seed_from_u64(7);
    let (n_rows, n_cols) = (37, 512);
    for dtype in [
        DType::Q8_0,
        DType::Q2K,
        DType::Q4K,
        DType::Iq2Xxs,
        DType::F16,
        DType::BF16,
        DType::F32,
    ] {
        let row_bytes = n_cols / dtype.block_elems() * dtype.block_bytes();
        let mut w = vec![0u8; n_rows * row_bytes];
        rng.fill(&mut w[..]);
        // Make every scale finite: rebuild the rows from typed random blocks.
        let w: Vec<u8> = match dtype {
            DType::Q8_0 => {
                let mut b: Vec<BlockQ8_0> = bytemuck::pod_collect_to_vec(&w);
                b.iter_mut().for_each(|b| b.d = scale(&mut rng));
                bytemuck::cast_slice(&b).to_vec()
            }
            DType::Q2K => {
                let mut b: Vec<BlockQ2K> = bytemuck::pod_collect_to_vec(&w);
                for b in &mut b {
                    (b.d, b.dmin) = (scale(&mut rng), scale(&mut rng));
                }
                bytemuck::cast_slice(&b).to_vec()
            }
            DType::Q4K => {
                let mut b: Vec<BlockQ4K> = bytemuck::pod_collect_to_vec(&w);
                for b in &mut b {
                    (b.d, b.dmin) = (scale(&mut rng), scale(&mut rng));
                }
                bytemuck::cast_slice(&b).to_vec()
            }
            DType::Iq2Xxs => {
                let mut b: Vec<BlockIq2Xxs> = bytemuck::pod_collect_to_vec(&w);
                b.iter_mut().for_each(|b| b.d = scale(&mut rng));
                bytemuck::cast_slice(&b).to_vec()
            }
            DType::F16 => {
                let v: Vec<f16> = random_f32(&mut rng, n_rows * n_cols)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            DType::BF16 => {
                let v: Vec<bf16> = random_f32(&mut rng, n_rows * n_cols)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            _ => bytemuck::cast_slice(&random_f32(&mut rng, n_rows * n_cols)).to_vec(),
        };
        for k in tables() {
            let g = Gemv::with_kernels(k);
            for n_tok in [1, 2, 5, 8, 13, 17] {
                let xs = random_f32(&mut rng, n_tok * n_cols);
                let mut ys = vec![f32::NAN; n_tok * n_rows];
                g.matmul(dtype, &w, n_rows, n_cols, &xs, &mut ys)
                    .expect("matmul");
                for t in 0..n_tok {
                    let mut y = vec![f32::NAN; n_rows];
                    g.matvec(
                        dtype,
                        &w,
                        n_rows,
                        n_cols,
                        &xs[t * n_cols..][..n_cols],
                        &mut y,
                    )
                    .expect("matvec");
                    for r in 0..n_rows {
                        assert_eq!(
                            ys[t * n_rows + r].to_bits(),
                            y[r].to_bits(),
                            "{dtype:?} on {:?}: token {t} of {n_tok}, row {r}",
                            k.isa
                        );
                    }
                }
            }
        }
    }
}
