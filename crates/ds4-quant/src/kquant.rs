//! The scale searches shared by the Q2_K and Q4_K quantizers.
//!
//! These follow the algorithms of llama.cpp's `ggml-quants.c` (`nearest_int`,
//! `make_qkx2_quants`, `make_qkx3_quants`, `make_qp_quants`) step for step, including the
//! order of every f32 operation, because the goal is byte-identical blocks (FORMATS.md s2.9:
//! llama.cpp's quantizers are the oracle ds4's weights were checked against). Rust does not
//! contract `a * b + c` into a fused multiply-add, which matches a C build without FMA
//! contraction; the cref fixtures record the C flags used.
//!
//! A "min" in these searches is the additive offset of an affine quantizer
//! `x ≈ scale·l + min` with `min ≤ 0`; callers store `-min` (a non-negative number), as the
//! K-quant blocks subtract `dmin·m`.

/// Below this magnitude a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Round to nearest, ties to even, with ggml's bit trick: adding 1.5·2^23 leaves the
/// integer in the low mantissa bits.
///
/// Exact for `|x| ≤ 2^22 - 1`; outside that range (and for NaN) it returns the same
/// meaningless value as ggml instead of panicking, which keeps byte-identical output even
/// for garbage input.
#[inline]
pub(crate) fn nearest_int(x: f32) -> i32 {
    let val = x + 12_582_912.0;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// Search parameters of an affine (scale + min) fit: the candidate inverse scales are
/// `(nmax + rmin + rdelta·is) / (max - min)` for `is = 0..=nstep`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AffineSearch {
    /// Largest quant level (3 for 2-bit, 15 for 4-bit).
    pub nmax: i32,
    /// Offset of the first candidate.
    pub rmin: f32,
    /// Step between candidates.
    pub rdelta: f32,
    /// Number of steps after the first candidate.
    pub nstep: i32,
    /// Weigh absolute instead of squared errors when comparing candidates.
    pub use_mad: bool,
}

/// Weighted affine fit `x ≈ scale·l + min` with `l` in `0..=nmax` and `min ≤ 0`: start from
/// the min/max fit, then try every candidate scale of `p`, solve the weighted least-squares
/// scale and min for its levels, and keep the candidate with the lowest weighted error.
///
/// Writes the levels to `levels` and returns `(scale, -min)`. This is ggml's
/// `make_qkx2_quants`; its `make_qkx3_quants` with explicit weights differs only in writing
/// `max <= min` for the degenerate test, which is the same condition once `min` has been
/// clamped to at most zero (and equally false for NaN), so one function serves both.
pub(crate) fn affine_fit(
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    p: AffineSearch,
) -> (f32, f32) {
    let n = x.len();
    debug_assert!(n <= 32 && weights.len() == n && levels.len() == n);
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        levels.fill(0);
        return (0.0, -min);
    }
    let nmax_f = p.nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        let diff = if p.use_mad { diff.abs() } else { diff * diff };
        best_error += weights[i] * diff;
    }
    if p.nstep < 1 {
        return (scale, -min);
    }
    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for is in 0..=p.nstep {
        iscale = (p.rmin + p.rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, p.nmax);
            aux[i] = l as u8;
            let (w, lf) = (weights[i], l as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * aux[i] as f32 + this_min - x[i];
                let diff = if p.use_mad { diff.abs() } else { diff * diff };
                cur_error += weights[i] * diff;
            }
            if cur_error < best_error {
                levels.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Quantizes non-negative values (the sub-block scales or mins of a super-block) to levels
/// `0..=nmax` with one shared scale, minimising the `weights`-weighted squared error: try
/// nine inverse scales around `nmax / max`, then refine levels one at a time for up to five
/// rounds. Writes the levels to `levels` and returns the scale. This is ggml's
/// `make_qp_quants`.
pub(crate) fn positive_fit(nmax: i32, x: &[f32], levels: &mut [u8], weights: &[f32]) -> f32 {
    let n = x.len();
    debug_assert!(weights.len() == n && levels.len() == n);
    let mut max = 0.0f32;
    for &v in x {
        // ggml's MAX(a, b) macro, written out so that a NaN behaves exactly as there.
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / max;
    for (l, &v) in levels.iter_mut().zip(x) {
        // Deliberately truncating, as the C code stores an int into a uint8_t.
        *l = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..n {
        let diff = x[i] - scale * levels[i] as f32;
        best_mse += weights[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax_f) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..n {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += weights[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).min(nmax);
        levels[i] = l as u8;
        let (w, lf) = (weights[i], l as f32);
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..n {
            let w = weights[i];
            let cur = levels[i] as f32;
            let mut slx = sumlx - w * x[i] * cur;
            let mut sl2 = suml2 - w * cur * cur;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != i32::from(levels[i]) {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        levels[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Checks an importance vector against the data it weighs: one weight per column, and `x`
/// must hold whole rows of `importance.len()` values.
///
/// # Panics
/// If the lengths do not fit (the byte-level [`crate::row::quantize`] checks first and
/// returns an error instead).
pub(crate) fn check_importance(x_len: usize, importance: &[f32]) {
    assert!(
        fits_importance(x_len, importance.len()),
        "importance vector of {} values does not fit {} values",
        importance.len(),
        x_len
    );
}

/// Calls `quantize_block(x_block, importance_block, out_block)` for every 256-value block of
/// `x`, pairing each block with the importance weights of its columns (`x` holds whole rows of
/// `importance.len()` values). The one block loop of every importance-weighted quantizer.
///
/// # Panics
/// If the importance vector does not fit (see [`check_importance`]).
pub(crate) fn for_each_weighted_block<B>(
    x: &[f32],
    importance: &[f32],
    out: &mut [B],
    mut quantize_block: impl FnMut(&[f32; crate::QK_K], &[f32; crate::QK_K], &mut B),
) {
    use crate::QK_K;
    check_importance(x.len(), importance);
    let blocks_per_row = importance.len() / QK_K;
    for (idx, (x, b)) in x.chunks_exact(QK_K).zip(out.iter_mut()).enumerate() {
        let col = (idx % blocks_per_row) * QK_K;
        quantize_block(
            x.try_into().expect("chunk of 256"),
            importance[col..col + QK_K]
                .try_into()
                .expect("slice of 256"),
            b,
        );
    }
}

/// Whether an importance vector of `imp_len` weights can weigh `x_len` values: one weight
/// per column, whole rows of whole 256-value blocks.
pub(crate) fn fits_importance(x_len: usize, imp_len: usize) -> bool {
    imp_len > 0 && imp_len.is_multiple_of(crate::QK_K) && x_len.is_multiple_of(imp_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for (x, want) in [
            (0.5f32, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (-2.5, -2),
            (2.4999998, 2),
            (126.7, 127),
            (-4_194_303.0, -4_194_303),
        ] {
            assert_eq!(nearest_int(x), want, "nearest_int({x})");
            assert_eq!(nearest_int(x), x.round_ties_even() as i32);
        }
    }
}
