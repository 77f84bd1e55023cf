//! Q8_0: blocks of 32 values, one f16 scale and 32 signed bytes (FORMATS.md s2.3).
//!
//! `x = f32(d) · q`. The quantizer is ggml's reference `quantize_row_q8_0_ref`, which
//! gguf-py reproduces bit for bit: `d = amax / 127` in f32, `q = round(x / d)` half away
//! from zero using the *unrounded* f32 `d`, and only the stored scale rounded to f16.

use crate::blocks::{BlockQ8_0, QK8_0};
use crate::f16::f32_to_f16;

/// Dequantizes whole blocks into `out` (`32 · blocks.len()` values).
///
/// # Panics
/// If `out` does not hold exactly `32 · blocks.len()` values.
pub fn dequantize(blocks: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        blocks.len() * QK8_0,
        "q8_0::dequantize: output length"
    );
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = b.d.to_f32();
        for (y, &q) in y.iter_mut().zip(&b.qs) {
            *y = d * f32::from(q);
        }
    }
}

/// Quantizes `x` (whole blocks of 32) into `out`, byte-identical to ggml and gguf-py.
///
/// # Panics
/// If `x.len() != 32 · out.len()`.
pub fn quantize(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK8_0, "q8_0::quantize: input length");
    for (x, b) in x.chunks_exact(QK8_0).zip(out.iter_mut()) {
        // ggml's `MAX(amax, fabsf(v))`, written out so that NaN behaves as there.
        let amax = x
            .iter()
            .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        for (q, &v) in b.qs.iter_mut().zip(x) {
            // `f32::round` rounds half away from zero, as C's `roundf`; the float-to-int
            // cast saturates where C would be undefined, and |v·id| <= 127 anyway.
            *q = (v * id).round() as i8;
        }
    }
}

/// `Σ dequant(w)·dequant(x)` for two Q8_0 rows: per block, the integer sum of products
/// times `f32(dw)·f32(dx)`, accumulated in f32 (ggml's `ggml_vec_dot_q8_0_q8_0_generic`).
///
/// # Panics
/// If the rows have different numbers of blocks.
pub fn dot(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len(), x.len(), "q8_0::dot: block count mismatch");
    let mut sum = 0.0f32;
    for (w, x) in w.iter().zip(x) {
        let sumi: i32 =
            w.qs.iter()
                .zip(&x.qs)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
        sum += sumi as f32 * (w.d.to_f32() * x.d.to_f32());
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    #[test]
    fn ties_round_away_from_zero_and_zero_block_is_zero() {
        // amax = 127 makes d = 1 exactly, so x·id keeps its .5 fractions.
        let mut x = [0.0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.5;
        x[4] = -0.5;
        let mut b = [BlockQ8_0::zeroed()];
        quantize(&x, &mut b);
        assert_eq!(b[0].d.to_f32(), 1.0);
        assert_eq!(&b[0].qs[..5], &[127, 3, -3, 1, -1]);

        quantize(&[0.0; 32], &mut b);
        assert_eq!(b[0], BlockQ8_0::zeroed());
    }
}
