//! Q2_K: 256 values in 16 sub-blocks of 16, 2-bit quants with a 4-bit scale and a 4-bit
//! min per sub-block (FORMATS.md s2.4; 84 bytes, 2.625 bits per weight).
//!
//! `x[e] = f32(d)·sc_s·q[e] - f32(dmin)·m_s` with `s = e / 16`. Byte `qs[32h + l]` packs
//! elements `128h + l`, `+32`, `+64`, `+96` in bit pairs 0-1, 2-3, 4-5, 6-7.
//!
//! The quantizer reproduces llama.cpp's `quantize_q2_K`: without an importance vector its
//! reference search (`quantize_row_q2_K_ref`: per sub-block affine fit weighted by `|x|`,
//! then scales and mins linearly quantized to 4 bits); with one, its weighted search
//! (`quantize_row_q2_K_impl`: weights `importance·sqrt(σ² + x²)`, then the 4-bit scales and
//! mins themselves fitted by a weighted search). ds4's Q2_K experts were made by exactly
//! these two paths (FORMATS.md s2.9).

use crate::blocks::{BlockQ2K, BlockQ8K, QK_K};
use crate::f16::f32_to_f16;
use crate::kquant::{AffineSearch, affine_fit, for_each_weighted_block, nearest_int, positive_fit};

/// The quant of element `e` (0..3).
#[inline]
fn quant(b: &BlockQ2K, e: usize) -> u8 {
    (b.qs[32 * (e >> 7) + (e & 31)] >> (2 * ((e >> 5) & 3))) & 3
}

/// Dequantizes whole blocks into `out` (`256 · blocks.len()` values).
///
/// # Panics
/// If `out` does not hold exactly `256 · blocks.len()` values.
pub fn dequantize(blocks: &[BlockQ2K], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        blocks.len() * QK_K,
        "q2_k::dequantize: output length"
    );
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let dmin = b.dmin.to_f32();
        for (s, y) in y.chunks_exact_mut(16).enumerate() {
            let dl = d * f32::from(b.scales[s] & 0xF);
            let ml = dmin * f32::from(b.scales[s] >> 4);
            for (i, y) in y.iter_mut().enumerate() {
                *y = dl * f32::from(quant(b, 16 * s + i)) - ml;
            }
        }
    }
}

/// `Σ dequant(w)·dequant(x)` for a Q2_K row against a Q8_K row, with integer sums per
/// block (FORMATS.md s2.8): `dx·(f32(d)·Σ_s sc_s·Σ q2·q8 - f32(dmin)·Σ_s m_s·bsums_s)`.
///
/// # Panics
/// If the rows have different numbers of blocks.
pub fn dot(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "q2_k::dot: block count mismatch");
    let mut sum = 0.0f32;
    for (w, x) in w.iter().zip(x) {
        let mut isum = 0i32;
        let mut summs = 0i32;
        for s in 0..QK_K / 16 {
            let sub: i32 = (16 * s..16 * s + 16)
                .map(|e| i32::from(quant(w, e)) * i32::from(x.qs[e]))
                .sum();
            isum += i32::from(w.scales[s] & 0xF) * sub;
            summs += i32::from(w.scales[s] >> 4) * i32::from(x.bsums[s]);
        }
        let dall = x.d * w.d.to_f32();
        let dmin = x.d * w.dmin.to_f32();
        sum += dall * isum as f32 - dmin * summs as f32;
    }
    sum
}

/// Quantizes `x` (whole blocks of 256) into `out`, byte-identical to llama.cpp's
/// `quantize_q2_K`.
///
/// `importance`, if given, holds one non-negative weight per column: `x` must consist of
/// whole rows of `importance.len()` values (a multiple of 256), each weighed by it.
///
/// # Panics
/// If `x.len() != 256 · out.len()` or the importance vector does not fit.
pub fn quantize(x: &[f32], importance: Option<&[f32]>, out: &mut [BlockQ2K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q2_k::quantize: input length");
    match importance {
        None => {
            for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
                quantize_block_ref(x.try_into().expect("chunk of 256"), b);
            }
        }
        Some(imp) => for_each_weighted_block(x, imp, out, quantize_block_weighted),
    }
}

/// Packs 256 levels (0..3) into `qs`.
fn pack(levels: &[u8; QK_K], qs: &mut [u8; QK_K / 4]) {
    for h in 0..2 {
        for l in 0..32 {
            let e = 128 * h + l;
            qs[32 * h + l] =
                levels[e] | (levels[e + 32] << 2) | (levels[e + 64] << 4) | (levels[e + 96] << 6);
        }
    }
}

/// Recomputes the levels from the final (f16-rounded, 4-bit) scales and mins; sub-blocks
/// with a zero scale keep the levels of the search, as in ggml.
fn requantize(x: &[f32; QK_K], b: &BlockQ2K, levels: &mut [u8; QK_K]) {
    for s in 0..QK_K / 16 {
        let d = b.d.to_f32() * f32::from(b.scales[s] & 0xF);
        if d == 0.0 {
            continue;
        }
        let m = b.dmin.to_f32() * f32::from(b.scales[s] >> 4);
        for i in 16 * s..16 * s + 16 {
            levels[i] = nearest_int((x[i] + m) / d).clamp(0, 3) as u8;
        }
    }
}

/// ggml's reference search: fit each sub-block (weights `|x|`, mean absolute error), then
/// quantize scales and mins linearly against their maxima.
fn quantize_block_ref(x: &[f32; QK_K], b: &mut BlockQ2K) {
    const SEARCH: AffineSearch = AffineSearch {
        nmax: 3,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for s in 0..16 {
        let xs = &x[16 * s..16 * s + 16];
        let mut weights = [0.0f32; 16];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        (scales[s], mins[s]) = affine_fit(xs, &weights, &mut levels[16 * s..16 * s + 16], SEARCH);
        if scales[s] > max_scale {
            max_scale = scales[s];
        }
        if mins[s] > max_min {
            max_min = mins[s];
        }
    }
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (sc, &v) in b.scales.iter_mut().zip(&scales) {
            // Deliberately truncating to u8, as the C code stores an int into a uint8_t.
            *sc = nearest_int(iscale * v) as u8;
        }
        b.d = f32_to_f16(max_scale / 15.0);
    } else {
        b.scales = [0; 16];
        b.d = f32_to_f16(0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (sc, &v) in b.scales.iter_mut().zip(&mins) {
            let l = nearest_int(iscale * v);
            *sc = (i32::from(*sc) | (l << 4)) as u8;
        }
        b.dmin = f32_to_f16(max_min / 15.0);
    } else {
        b.dmin = f32_to_f16(0.0);
    }
    requantize(x, b, &mut levels);
    pack(&levels, &mut b.qs);
}

/// ggml's weighted search: per-element weights `importance·sqrt(σ² + x²)`, least-squares
/// sub-block fits, and a weighted fit of the 4-bit scales and mins themselves.
fn quantize_block_weighted(x: &[f32; QK_K], importance: &[f32; QK_K], b: &mut BlockQ2K) {
    const SEARCH: AffineSearch = AffineSearch {
        nmax: 3,
        rmin: -0.9,
        rdelta: 0.05,
        nstep: 36,
        use_mad: false,
    };
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let mut sumx2 = 0.0f32;
    for v in x {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;
    for s in 0..16 {
        let xs = &x[16 * s..16 * s + 16];
        let mut weights = [0.0f32; 16];
        for i in 0..16 {
            weights[i] = importance[16 * s + i] * (sigma2 + xs[i] * xs[i]).sqrt();
        }
        for w in weights {
            sw[s] += w;
        }
        (scales[s], mins[s]) = affine_fit(xs, &weights, &mut levels[16 * s..16 * s + 16], SEARCH);
    }
    let mut ls = [0u8; 16];
    let mut lm = [0u8; 16];
    let dm = positive_fit(15, &scales, &mut ls, &sw);
    let mm = positive_fit(15, &mins, &mut lm, &sw);
    b.d = f32_to_f16(dm);
    b.dmin = f32_to_f16(mm);
    for s in 0..16 {
        b.scales[s] = ls[s] | (lm[s] << 4);
    }
    requantize(x, b, &mut levels);
    pack(&levels, &mut b.qs);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    #[test]
    fn element_order_matches_spec() {
        // Element 128h + 32j + l sits in byte 32h + l, bits 2j..2j+2.
        let mut b = BlockQ2K::zeroed();
        b.qs[32 + 5] = 0b11_10_01_00;
        assert_eq!(quant(&b, 128 + 5), 0);
        assert_eq!(quant(&b, 128 + 32 + 5), 1);
        assert_eq!(quant(&b, 128 + 64 + 5), 2);
        assert_eq!(quant(&b, 128 + 96 + 5), 3);
        let mut levels = [0u8; QK_K];
        for (e, l) in levels.iter_mut().enumerate() {
            *l = (e * 7 % 4) as u8;
        }
        pack(&levels, &mut b.qs);
        for (e, &l) in levels.iter().enumerate() {
            assert_eq!(quant(&b, e), l);
        }
    }

    #[test]
    fn zero_input_gives_zero_block() {
        let mut b = [BlockQ2K {
            scales: [0xFF; 16],
            ..BlockQ2K::zeroed()
        }];
        quantize(&[0.0; QK_K], None, &mut b);
        assert_eq!(b[0], BlockQ2K::zeroed());
        quantize(&[0.0; QK_K], Some(&[1.0; QK_K]), &mut b);
        assert_eq!(b[0], BlockQ2K::zeroed());
    }
}
