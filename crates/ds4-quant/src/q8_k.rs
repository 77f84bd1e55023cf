//! Q8_K: the 256-value activation format paired with Q2_K, Q4_K and IQ2_XXS weights
//! (FORMATS.md s2.7). It is never stored in model files.
//!
//! `x = d · q` with an f32 `d`; `bsums[t]` caches the sum of quants `16t..16t+16` so that
//! the K-quant dot products can apply the sub-block mins with one multiply per sub-block.
//! The quantizer is ggml's `quantize_row_q8_K_ref`: the scale comes from the element of
//! largest magnitude with its *sign*, `iscale = -127 / max`, so `d` is negative when that
//! element is positive. The products come out right either way; this keeps the quants in
//! `[-127, 127]`, which the IQ2_XXS kernels rely on.

use crate::blocks::{BlockQ8K, QK_K};
use crate::kquant::nearest_int;

/// Quantizes `x` (whole blocks of 256) into `out`. An all-zero block gets `d = 0` and zero
/// quants and sums.
///
/// # Panics
/// If `x.len() != 256 · out.len()`.
pub fn quantize(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q8_k::quantize: input length");
    for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut max, mut amax) = (0.0f32, 0.0f32);
        for &v in x {
            // Strictly greater: the first element of largest magnitude wins.
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            // ggml leaves `bsums` unwritten here; zeros are what they would sum to.
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(x) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, q) in b.bsums.iter_mut().zip(b.qs.chunks_exact(16)) {
            *s = q.iter().map(|&q| i16::from(q)).sum();
        }
        b.d = 1.0 / iscale;
    }
}

/// Dequantizes whole blocks into `out` (`256 · blocks.len()` values).
///
/// # Panics
/// If `out` does not hold exactly `256 · blocks.len()` values.
pub fn dequantize(blocks: &[BlockQ8K], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        blocks.len() * QK_K,
        "q8_k::dequantize: output length"
    );
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        for (y, &q) in y.iter_mut().zip(&b.qs) {
            *y = b.d * f32::from(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    #[test]
    fn positive_extreme_gives_negative_scale() {
        let mut x = [0.0f32; QK_K];
        x[3] = 2.0;
        x[7] = -2.0; // same magnitude, later: does not win
        x[20] = 1.0;
        let mut b = [BlockQ8K::zeroed()];
        quantize(&x, &mut b);
        assert_eq!(b[0].d, 2.0 / -127.0);
        assert_eq!((b[0].qs[3], b[0].qs[7], b[0].qs[20]), (-127, 127, -64));
        assert_eq!(b[0].bsums[0], 0);
        assert_eq!(b[0].bsums[1], -64);
    }

    #[test]
    fn zero_block() {
        let mut b = [BlockQ8K {
            d: 1.0,
            qs: [1; QK_K],
            bsums: [1; 16],
        }];
        quantize(&[0.0; QK_K], &mut b);
        assert_eq!(b[0], BlockQ8K::zeroed());
    }
}
