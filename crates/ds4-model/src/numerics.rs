//! Scalar numerics the model is defined by: RoPE/YaRN frequencies, the FP8 (E4M3) KV
//! round trip, the indexer's Hadamard + FP4 (E2M1) step, and top-k with a fixed tie order.
//!
//! These follow MODEL.md s3.1.2-s3.1.4 and s6 literally (power-of-two block scales from
//! `ceil(log2(amax/qmax))`, clamp before rounding, round-to-nearest-even on the grids), because
//! the simulations change discrete decisions (indexer top-k) and must be bit-exact to be the
//! model's behaviour.

use crate::config::{Config, Yarn};

/// Which RoPE a layer uses: `Main` (plain, `rope.freq_base`) on sliding layers, `Comp`
/// (`compress_rope_freq_base`, with YaRN when active) on compressed layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// Sliding-window layers (`r == 0`) and the MTP block.
    Main,
    /// Compressed layers (`r > 0`): q, raw rows, compressed rows, indexer.
    Comp,
}

/// The `R/2` RoPE frequencies of one kind (MODEL.md s3.1.2), computed in f32 as the official
/// code and transformers do: `f_i = 1 / theta^(2i/R)`, then the YaRN blend of frequencies.
pub fn rope_freqs(n_rot: usize, theta: f32, yarn: Option<&Yarn>) -> Vec<f32> {
    let half = n_rot / 2;
    let pos_freqs: Vec<f32> = (0..half)
        .map(|i| theta.powf((2 * i) as f32 / n_rot as f32))
        .collect();
    let mut f: Vec<f32> = pos_freqs.iter().map(|pf| 1.0 / pf).collect();
    if let Some(y) = yarn
        && y.factor > 1.0
    {
        // The correction range is computed in f64 like Python's math module does.
        let corr = |rot: f64| {
            n_rot as f64 * (y.original_ctx as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * (theta as f64).ln())
        };
        let low = corr(y.beta_fast as f64).floor().max(0.0);
        let high = corr(y.beta_slow as f64).ceil().min(n_rot as f64 - 1.0);
        let (low, mut high) = (low as f32, high as f32);
        if low == high {
            high += 0.001;
        }
        for (i, fi) in f.iter_mut().enumerate() {
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            // Same operation order as transformers' `_compute_yarn_parameters`.
            let interpolation = 1.0 / (y.factor * pos_freqs[i]);
            *fi = interpolation * (1.0 - extrapolation) + *fi * extrapolation;
        }
    }
    f
}

/// Frequencies of both kinds for a config.
pub fn rope_freqs_for(cfg: &Config, kind: RopeKind) -> Vec<f32> {
    match kind {
        RopeKind::Main => rope_freqs(cfg.n_rot, cfg.rope_freq_base, None),
        RopeKind::Comp => rope_freqs(
            cfg.n_rot,
            cfg.compress_rope_freq_base,
            cfg.rope_yarn.as_ref(),
        ),
    }
}

/// `2^k` built exactly from its bits (normal range only; callers stay inside it).
fn exp2i(k: i32) -> f32 {
    debug_assert!((-126..=127).contains(&k));
    f32::from_bits(((k + 127) as u32) << 23)
}

/// Rounds `y` (already clamped to `[-448, 448]`) to the nearest E4M3FN value, ties to even.
pub fn round_e4m3(y: f32) -> f32 {
    let a = y.abs();
    let q = if a < exp2i(-6) {
        // Subnormals: a uniform grid of step 2^-9.
        (a / exp2i(-9)).round_ties_even() * exp2i(-9)
    } else {
        // Normals: 8 steps per binade; division by a power of two is exact.
        let e = a.log2().floor() as i32;
        // log2 of a value just below a power of two may round up; fix the binade.
        let e = if exp2i(e) > a { e - 1 } else { e };
        let step = exp2i(e - 3);
        ((a / step).round_ties_even() * step).min(448.0)
    };
    q.copysign(y)
}

/// The non-negative E2M1 values, indexed by code.
const E2M1_GRID: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Rounds `y` (already clamped to `[-6, 6]`) to the nearest E2M1 value, ties to the even code.
pub fn round_e2m1(y: f32) -> f32 {
    let a = y.abs();
    let mut best = 0usize;
    for (code, &v) in E2M1_GRID.iter().enumerate().skip(1) {
        let d = (a - v).abs();
        let db = (a - E2M1_GRID[best]).abs();
        if d < db || (d == db && code % 2 == 0) {
            best = code;
        }
    }
    E2M1_GRID[best].copysign(y)
}

/// Decodes one E4M3FN byte (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no
/// infinities, `0x7F`/`0xFF` are NaN), the value set of MODEL.md s3.1.3. Exact in f32; `0x80` is
/// `-0.0`, as torch's `float8_e4m3fn -> float32` cast gives.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = u32::from(b >> 7) << 31;
    let exp = u32::from((b >> 3) & 0xF);
    let man = u32::from(b & 7);
    if exp == 15 && man == 7 {
        return f32::NAN;
    }
    let mag = if exp == 0 {
        // Subnormals: man * 2^-9, exact.
        man as f32 * exp2i(-9)
    } else {
        // (1 + man/8) * 2^(exp-7): rebias the exponent, move the mantissa to the top.
        f32::from_bits(((exp + 127 - 7) << 23) | (man << 20))
    };
    f32::from_bits(mag.to_bits() | sign)
}

/// Decodes one E2M1 code (low 4 bits: sign in bit 3, then the index into
/// `{0, 0.5, 1, 1.5, 2, 3, 4, 6}`, MODEL.md s3.1.4). Code 8 is `-0.0`.
pub fn e2m1_to_f32(code: u8) -> f32 {
    let v = E2M1_GRID[usize::from(code & 7)];
    if code & 8 != 0 { -v } else { v }
}

/// Decodes one UE8M0 (`float8_e8m0fnu`) scale byte: `2^(b - 127)`, exact in f32 (byte 0 is the
/// subnormal `2^-127`); byte 255 is NaN.
pub fn e8m0_to_f32(b: u8) -> f32 {
    match b {
        255 => f32::NAN,
        0 => f32::from_bits(1 << 22),
        _ => f32::from_bits(u32::from(b) << 23),
    }
}

/// Power-of-two block scale `2^ceil(log2(amax/qmax))` with an amax floor.
fn block_scale(block: &[f32], floor: f32, qmax: f32) -> f32 {
    let amax = block.iter().fold(floor, |m, v| m.max(v.abs()));
    let k = (amax / qmax).log2().ceil() as i32;
    exp2i(k.clamp(-126, 127))
}

/// FP8 simulation of KV nope dims (MODEL.md s3.1.3): blocks of 64, E4M3, UE8M0 scale.
pub fn fp8_sim(v: &mut [f32]) {
    for block in v.chunks_mut(64) {
        let scale = block_scale(block, 1e-4, 448.0);
        for x in block.iter_mut() {
            *x = round_e4m3((*x / scale).clamp(-448.0, 448.0)) * scale;
        }
    }
}

/// In-place Sylvester-ordered Walsh-Hadamard transform scaled by `1/sqrt(n)`.
pub fn hadamard(v: &mut [f32]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    v.iter_mut().for_each(|x| *x *= s);
}

/// Indexer QAT (MODEL.md s3.1.4): Hadamard, then FP4 in blocks of 32.
pub fn had_fp4(v: &mut [f32]) {
    hadamard(v);
    for block in v.chunks_mut(32) {
        let scale = block_scale(block, 6.0 * exp2i(-126), 6.0);
        for x in block.iter_mut() {
            *x = round_e2m1((*x / scale).clamp(-6.0, 6.0)) * scale;
        }
    }
}

/// Indices of the `k` largest scores, larger first; ties go to the lower index (MODEL.md D16).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    // A total order (score descending, then index ascending), so selecting the k smallest
    // under it gives exactly the set a full sort would, in O(n) instead of O(n log n).
    let order = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, order);
        idx.truncate(k);
    }
    idx.sort_unstable_by(order);
    idx
}

/// `sqrt(softplus(z))`, with torch's softplus threshold (`z > 20` returns `z`).
pub fn sqrt_softplus(z: f32) -> f32 {
    let sp = if z > 20.0 { z } else { z.exp().ln_1p() };
    sp.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: fn(f32) -> f32, input: f32, expected: f32) {
        assert_eq!(f(input), expected, "f({input})");
    }

    #[test]
    fn e4m3_rounding() {
        check(round_e4m3, 0.0, 0.0);
        check(round_e4m3, 448.0, 448.0);
        check(round_e4m3, -448.0, -448.0);
        // 1.0625 is halfway between 1.0 (m=0) and 1.125 (m=1): ties to even -> 1.0.
        check(round_e4m3, 1.0625, 1.0);
        // 1.1875 is halfway between 1.125 (m=1) and 1.25 (m=2): ties to even -> 1.25.
        check(round_e4m3, 1.1875, 1.25);
        check(round_e4m3, -1.1875, -1.25);
        // Subnormal grid step 2^-9; half a step ties to 0.
        check(round_e4m3, 0.0009765625, 0.0);
        check(round_e4m3, 0.0029296875, 0.00390625);
        // Largest binade: 416 (m=5), 448 (m=6); 432 ties to even m=6.
        check(round_e4m3, 432.0, 448.0);
        check(round_e4m3, 420.0, 416.0);
        // Every E4M3 value maps to itself.
        for e in 1..16 {
            for m in 0..8 {
                if e == 15 && m == 7 {
                    continue;
                }
                let v = (1.0 + m as f32 / 8.0) * exp2i(e - 7);
                assert_eq!(round_e4m3(v), v);
            }
        }
    }

    #[test]
    fn e2m1_rounding() {
        check(round_e2m1, 0.25, 0.0);
        check(round_e2m1, 0.75, 1.0);
        check(round_e2m1, 1.25, 1.0);
        check(round_e2m1, 1.75, 2.0);
        check(round_e2m1, 2.5, 2.0);
        check(round_e2m1, 3.5, 4.0);
        check(round_e2m1, 5.0, 4.0);
        check(round_e2m1, 5.5, 6.0);
        check(round_e2m1, -2.6, -3.0);
    }

    #[test]
    fn fp8_block_scale_is_power_of_two() {
        let mut v: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.37).collect();
        let orig = v.clone();
        fp8_sim(&mut v);
        // amax = 11.655 -> scale 2^ceil(log2(11.655/448)) = 2^-5; all values on the grid.
        for (a, b) in v.iter().zip(&orig) {
            assert_eq!(round_e4m3(a * 32.0) / 32.0, *a);
            assert!((a - b).abs() <= b.abs() / 16.0 + 1e-6);
        }
    }

    #[test]
    fn hadamard_is_orthogonal_and_sylvester_ordered() {
        let mut v = vec![0.0f32; 8];
        v[1] = 1.0;
        hadamard(&mut v);
        let s = 1.0 / 8f32.sqrt();
        // Column 1 of the Sylvester matrix: (-1)^popcount(i & 1).
        let expected: Vec<f32> = (0..8).map(|i| if i % 2 == 0 { s } else { -s }).collect();
        assert_eq!(v, expected);
        let mut w: Vec<f32> = (0..16).map(|i| (i as f32).sin()).collect();
        let n0: f32 = w.iter().map(|x| x * x).sum();
        hadamard(&mut w);
        hadamard(&mut w);
        let expected: Vec<f32> = (0..16).map(|i| (i as f32).sin()).collect();
        for (a, b) in w.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-5);
        }
        let n1: f32 = w.iter().map(|x| x * x).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn yarn_frequencies_match_flash_worked_example() {
        // MODEL.md Appendix B: R = 64, theta = 160000, Lorig = 65536, s = 16.
        let y = Yarn {
            factor: 16.0,
            original_ctx: 65536,
            beta_fast: 32.0,
            beta_slow: 1.0,
        };
        let f = rope_freqs(64, 160000.0, Some(&y));
        let check = |i: usize, want: f32| {
            assert!(
                (f[i] - want).abs() <= want * 2e-4,
                "pair {i}: {} vs {want}",
                f[i]
            );
        };
        check(0, 1.0);
        check(15, 3.6355e-3);
        check(20, 2.9698e-4);
        check(25, 5.3723e-6);
        check(31, 5.6805e-7);
        let plain = rope_freqs(64, 10000.0, None);
        assert_eq!(plain[0], 1.0);
        assert!((plain[31] - 10000f32.powf(-62.0 / 64.0)).abs() < 1e-9);
    }

    #[test]
    fn top_k_prefers_lower_index_on_ties() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 2), vec![1, 2]);
        assert_eq!(top_k(&[0.0, 0.0, 0.0], 2), vec![0, 1]);
        assert_eq!(top_k(&[f32::NEG_INFINITY, 1.0], 1), vec![1]);
        assert_eq!(top_k(&[5.0, 1.0, 5.0, 7.0, 5.0], 3), vec![3, 0, 2]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![1, 0]);
        assert!(top_k(&[1.0], 0).is_empty());
    }
}
