//! The dispatched activation quantizers (`simd::quantize_q8_0`, `simd::quantize_q8k`, AVX-512
//! on CPUs that have it) against the scalar references (`q8_0::quantize`, `q8_k::quantize`,
//! themselves byte-identical to ggml's): every byte equal, on random data of many scales and
//! on the awkward cases: exact halves (rounding ties), ties for the largest magnitude with
//! both signs, all-zero blocks, negative zero, NaN and infinities.

use bytemuck::Zeroable;
use ds4_quant::{BlockQ8_0, BlockQ8K, QK_K, QK8_0, q8_0, q8_k, simd};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Blocks of `len` values exercising the cases above, plus plain random ones.
fn inputs(len: usize, n_blocks: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(len * n_blocks);
    for b in 0..n_blocks {
        let scale = 10f32.powf(rng.random_range(-8.0..4.0));
        let mut blk: Vec<f32> = (0..len)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect();
        match b % 8 {
            // Values on rounding ties after scaling: amax 127 makes id 1, so halves stay.
            0 => {
                for (i, v) in blk.iter_mut().enumerate() {
                    *v = (i as f32 - len as f32 / 2.0) + 0.5;
                }
                blk[len - 1] = 127.0;
            }
            // The largest magnitude twice, negative first, then positive.
            1 => {
                let j = rng.random_range(0..len / 2);
                blk[j] = -2.0 * scale;
                blk[len - 1 - j] = 2.0 * scale;
            }
            2 => blk.iter_mut().for_each(|v| *v = 0.0),
            3 => blk.iter_mut().for_each(|v| *v = -0.0),
            4 => blk[rng.random_range(0..len)] = f32::NAN,
            5 => blk[rng.random_range(0..len)] = f32::INFINITY,
            _ => {}
        }
        x.extend(blk);
    }
    x
}

#[test]
fn q8_0_fast_equals_scalar() {
    let x = inputs(QK8_0, 512, 1);
    let (mut want, mut got) = (
        vec![BlockQ8_0::zeroed(); 512],
        vec![BlockQ8_0::zeroed(); 512],
    );
    q8_0::quantize(&x, &mut want);
    simd::quantize_q8_0(&x, &mut got);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            bytemuck::bytes_of(g),
            bytemuck::bytes_of(w),
            "block {i} ({:?} on {:?})",
            &x[i * QK8_0..(i + 1) * QK8_0],
            simd::active_isa()
        );
    }
}

#[test]
fn q8_k_fast_equals_scalar() {
    let x = inputs(QK_K, 256, 2);
    let (mut want, mut got) = (vec![BlockQ8K::zeroed(); 256], vec![BlockQ8K::zeroed(); 256]);
    q8_k::quantize(&x, &mut want);
    simd::quantize_q8k(&x, &mut got);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            bytemuck::bytes_of(g),
            bytemuck::bytes_of(w),
            "block {i} on {:?}",
            simd::active_isa()
        );
    }
}
