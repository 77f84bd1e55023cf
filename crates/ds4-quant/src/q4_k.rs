//! Q4_K: 256 values in 8 sub-blocks of 32, 4-bit quants with a 6-bit scale and a 6-bit min
//! per sub-block (FORMATS.md s2.5; 144 bytes, 4.5 bits per weight).
//!
//! `x[e] = f32(d)·sc_j·q[e] - f32(dmin)·m_j` with `j = e / 32`. Byte `qs[32c + l]` holds
//! element `64c + l` in its low nibble and `64c + 32 + l` in its high nibble. The twelve
//! scale bytes pack eight 6-bit scales and eight 6-bit mins ([`scale_min`]).
//!
//! The quantizer reproduces llama.cpp's `quantize_q4_K`: without an importance vector its
//! reference search (`quantize_row_q4_K_ref`: weights `rms(sub-block) + |x|`, then scales
//! and mins linearly quantized to 6 bits); with one, its weighted search
//! (`quantize_row_q4_K_impl`: weights `importance·sqrt(σ² + x²)`, then a weighted fit of
//! the 6-bit scales and mins).

use crate::blocks::{BlockQ4K, BlockQ8K, QK_K};
use crate::f16::f32_to_f16;
use crate::kquant::{AffineSearch, affine_fit, for_each_weighted_block, nearest_int, positive_fit};

/// The 6-bit scale and min of sub-block `j` (0..8) from the packed scale bytes (ggml's
/// `get_scale_min_k4`).
#[inline]
pub fn scale_min(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Packs eight 6-bit scales and mins (inverse of [`scale_min`] for values below 64; the
/// C code's truncating stores are kept for larger ones).
fn pack_scales(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8; 12]) {
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// The quant of element `e` (0..15).
#[inline]
fn quant(b: &BlockQ4K, e: usize) -> u8 {
    let byte = b.qs[32 * (e >> 6) + (e & 31)];
    if e & 32 == 0 { byte & 0xF } else { byte >> 4 }
}

/// Dequantizes whole blocks into `out` (`256 · blocks.len()` values).
///
/// # Panics
/// If `out` does not hold exactly `256 · blocks.len()` values.
pub fn dequantize(blocks: &[BlockQ4K], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        blocks.len() * QK_K,
        "q4_k::dequantize: output length"
    );
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let dmin = b.dmin.to_f32();
        for (j, y) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min(j, &b.scales);
            let dl = d * f32::from(sc);
            let ml = dmin * f32::from(m);
            for (i, y) in y.iter_mut().enumerate() {
                *y = dl * f32::from(quant(b, 32 * j + i)) - ml;
            }
        }
    }
}

/// `Σ dequant(w)·dequant(x)` for a Q4_K row against a Q8_K row, with integer sums per
/// block (FORMATS.md s2.8): `dx·(f32(d)·Σ_j sc_j·Σ q4·q8 - f32(dmin)·Σ_t m_{t/2}·bsums_t)`.
///
/// # Panics
/// If the rows have different numbers of blocks.
pub fn dot(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "q4_k::dot: block count mismatch");
    let mut sum = 0.0f32;
    for (w, x) in w.iter().zip(x) {
        let mut isum = 0i32;
        let mut summs = 0i32;
        for j in 0..QK_K / 32 {
            let (sc, m) = scale_min(j, &w.scales);
            let sub: i32 = (32 * j..32 * j + 32)
                .map(|e| i32::from(quant(w, e)) * i32::from(x.qs[e]))
                .sum();
            isum += i32::from(sc) * sub;
            summs += i32::from(m) * (i32::from(x.bsums[2 * j]) + i32::from(x.bsums[2 * j + 1]));
        }
        let dall = x.d * w.d.to_f32();
        let dmin = x.d * w.dmin.to_f32();
        sum += dall * isum as f32 - dmin * summs as f32;
    }
    sum
}

/// Quantizes `x` (whole blocks of 256) into `out`, byte-identical to llama.cpp's
/// `quantize_q4_K`.
///
/// `importance`, if given, holds one non-negative weight per column: `x` must consist of
/// whole rows of `importance.len()` values (a multiple of 256), each weighed by it.
///
/// # Panics
/// If `x.len() != 256 · out.len()` or the importance vector does not fit.
pub fn quantize(x: &[f32], importance: Option<&[f32]>, out: &mut [BlockQ4K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q4_k::quantize: input length");
    match importance {
        None => {
            for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
                quantize_block_ref(x.try_into().expect("chunk of 256"), b);
            }
        }
        Some(imp) => for_each_weighted_block(x, imp, out, quantize_block_weighted),
    }
}

/// Recomputes the levels from the final (f16-rounded, 6-bit) scales and mins; sub-blocks
/// with a zero scale keep the levels of the search, as in ggml. Then packs them.
fn requantize_and_pack(x: &[f32; QK_K], b: &mut BlockQ4K, levels: &mut [u8; QK_K]) {
    for j in 0..QK_K / 32 {
        let (sc, m) = scale_min(j, &b.scales);
        let d = b.d.to_f32() * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = b.dmin.to_f32() * f32::from(m);
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    for c in 0..QK_K / 64 {
        for l in 0..32 {
            b.qs[32 * c + l] = levels[64 * c + l] | (levels[64 * c + l + 32] << 4);
        }
    }
}

/// ggml's reference search.
fn quantize_block_ref(x: &[f32; QK_K], b: &mut BlockQ4K) {
    const SEARCH: AffineSearch = AffineSearch {
        nmax: 15,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        use_mad: false,
    };
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0.0f32; 32];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (scales[j], mins[j]) = affine_fit(xs, &weights, &mut levels[32 * j..32 * j + 32], SEARCH);
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // Deliberately truncating to u8 before the clamp, as the C code does.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    pack_scales(&ls, &lm, &mut b.scales);
    b.d = f32_to_f16(max_scale / 63.0);
    b.dmin = f32_to_f16(max_min / 63.0);
    requantize_and_pack(x, b, &mut levels);
}

/// ggml's weighted search.
fn quantize_block_weighted(x: &[f32; QK_K], importance: &[f32; QK_K], b: &mut BlockQ4K) {
    const SEARCH: AffineSearch = AffineSearch {
        nmax: 15,
        rmin: -0.9,
        rdelta: 0.05,
        nstep: 36,
        use_mad: false,
    };
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    let mut sw = [0.0f32; 8];
    let mut sum_x2 = 0.0f32;
    for v in x {
        sum_x2 += v * v;
    }
    let sigma2 = 2.0 * sum_x2 / QK_K as f32;
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut weights = [0.0f32; 32];
        for i in 0..32 {
            weights[i] = importance[32 * j + i] * (sigma2 + xs[i] * xs[i]).sqrt();
        }
        let mut sumw = 0.0f32;
        for w in weights {
            sumw += w;
        }
        sw[j] = sumw;
        (scales[j], mins[j]) = affine_fit(xs, &weights, &mut levels[32 * j..32 * j + 32], SEARCH);
    }
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = positive_fit(63, &scales, &mut ls, &sw);
    let m_block = positive_fit(63, &mins, &mut lm, &sw);
    pack_scales(&ls, &lm, &mut b.scales);
    b.d = f32_to_f16(d_block);
    b.dmin = f32_to_f16(m_block);
    requantize_and_pack(x, b, &mut levels);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_packing_roundtrips() {
        let ls = [0, 1, 17, 63, 32, 5, 48, 62];
        let lm = [63, 2, 33, 0, 15, 16, 47, 1];
        let mut s = [0u8; 12];
        pack_scales(&ls, &lm, &mut s);
        for j in 0..8 {
            assert_eq!(scale_min(j, &s), (ls[j], lm[j]), "sub-block {j}");
        }
    }
}
