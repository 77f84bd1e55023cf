//! AVX-512 (F, BW, VL) + VNNI dot kernels.
//!
//! Same arithmetic as [`super::avx2`] (FORMATS.md s2.8), twice as wide where a format's
//! layout gives 64 contiguous activation bytes per step: Q2_K's bit pairs 0/1 and 2/3 of one
//! 32-byte run cover 64 consecutive values, and so do two IQ2_XXS groups. Sub-block scales
//! are applied to the exact `vpmaddubsw` i16 pair sums with VNNI's `vpdpwssd` (multiply-add
//! into i32 in one instruction). IQ2_XXS signs become a 64-bit mask (`pdep` plus a parity
//! fold, no table) and a masked negation of the activations; this is the biggest win here
//! (about 1.25x the AVX2 kernel on Zen 4). Q8_0 uses `vpdpbusd` on 256-bit vectors.
//!
//! Kernels where the wider version did not measure faster on Zen 4 (one 4096-value row in
//! L1, best of many runs) reuse the AVX2 ones: BF16 and f32 (bandwidth-bound anyway). Q4_K
//! (single row and multi-token) lives in [`super::q4k_avx512`] (`vpdpbusd` on the raw
//! nibbles, sub-block scales applied to packed i16 sums). An `_mm512_i64gather_epi64`
//! of the IQ2_XXS grid rows was tried and was ~1.8x slower than eight scalar loads.
//!
//! IQ2_XXS and Q2_K are written as multi-token kernels (`NT` tokens per weight pass, the
//! single-row dot is `NT = 1`), so that `out[t]` of the `_n` entries is bit-identical to the
//! single-row dot. CPUs that also have VBMI, BITALG and GFNI use [`super::avx512_vbmi`] for
//! these two formats instead.
//!
//! Checked by `tests/kernels.rs` against the scalar references on CPUs that have these
//! features (the test is skipped for an instruction set the CPU lacks).
//!
//! Note: the AVX-512 intrinsics and target features became stable in Rust 1.89, above the
//! workspace's declared `rust-version` (1.85); building this module needs 1.89 or newer.

// Deliberately allowed rather than raising the workspace MSRV from this module; see above.

use std::arch::x86_64::*;

use half::f16;

use super::avx2::{f16_to_f32, hsum_ps};
use super::{Isa, Kernels};
use crate::tables::IQ2XXS_GRID;
use crate::{BlockIq2Xxs, BlockQ2K, BlockQ8_0, BlockQ8K};

/// The AVX-512 VNNI kernel table; handed out by [`Kernels::for_isa`] only after the CPU was
/// found to support avx512f, avx512bw, avx512vl, avx512vnni and the AVX2 set.
pub(super) static KERNELS: Kernels = Kernels {
    isa: Isa::Avx512Vnni,
    q8_0_q8_0: dot_q8_0_q8_0,
    q2k_q8k: dot_q2k_q8k,
    q4k_q8k: super::q4k_avx512::dot_q4k_q8k,
    iq2xxs_q8k: dot_iq2xxs_q8k,
    f16_f32: dot_f16_f32,
    bf16_f32: super::avx2::KERNELS.bf16_f32,
    f32_f32: super::avx2::KERNELS.f32_f32,
    q8_0_q8_0_n: super::tiles_x86::avx512_q8_0_q8_0_n,
    q2k_q8k_n: dot_q2k_q8k_n,
    q4k_q8k_n: super::q4k_avx512::dot_q4k_q8k_n,
    iq2xxs_q8k_n: dot_iq2xxs_q8k_n,
    f16_f32_n: super::tiles_x86::avx512_f16_f32_n,
    bf16_f32_n: super::avx2::KERNELS.bf16_f32_n,
    f32_f32_n: super::avx2::KERNELS.f32_f32_n,
    q8_0_q8_0_g: Some(super::tiles_x86::avx512_q8_0_q8_0_g),
    q2k_prep: None,
    iq2xxs_prep: None,
};

dot_n_passes!(dot_q2k_q8k_n, q2k_q8k, BlockQ2K, BlockQ8K);
dot_n_passes!(dot_iq2xxs_q8k_n, iq2xxs_q8k, BlockIq2Xxs, BlockQ8K);

// The safe wrappers below are only reachable through `KERNELS`, which `Kernels::for_isa`
// returns only when `Isa::Avx512Vnni.is_supported()` (all features detected at run time).

fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q8_0_q8_0: length mismatch");
    // SAFETY: the CPU supports the AVX-512 VNNI set and AVX2 (see KERNELS); equal lengths.
    unsafe { q8_0_q8_0(w, x) }
}

fn dot_q2k_q8k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q2k_q8k: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports the AVX-512 VNNI set and AVX2 (see KERNELS); equal lengths.
    unsafe { q2k_q8k::<1>(w, x, &mut out) };
    out[0]
}

fn dot_iq2xxs_q8k(w: &[BlockIq2Xxs], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_iq2xxs_q8k: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports the AVX-512 VNNI set and AVX2 (see KERNELS); equal lengths.
    unsafe { iq2xxs_q8k::<1>(w, x, &mut out) };
    out[0]
}

fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f16_f32: length mismatch");
    // SAFETY: the CPU supports the AVX-512 VNNI set and AVX2 (see KERNELS); equal lengths.
    unsafe { f16_f32(w, x) }
}

/// Loads 32 bytes at `p[at..at + 32]`.
#[inline]
#[target_feature(enable = "avx2")]
fn load256<T: Copy, const N: usize>(p: &[T; N], at: usize) -> __m256i {
    debug_assert_eq!(size_of::<T>(), 1);
    assert!(at + 32 <= N);
    // SAFETY: bounds checked just above; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(p.as_ptr().add(at).cast()) }
}

/// Loads 64 bytes at `p[at..at + 64]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn load512<T: Copy, const N: usize>(p: &[T; N], at: usize) -> __m512i {
    debug_assert_eq!(size_of::<T>(), 1);
    assert!(at + 64 <= N);
    // SAFETY: bounds checked just above; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(p.as_ptr().add(at).cast()) }
}

/// `[lo, hi]` as one 512-bit vector.
#[inline]
#[target_feature(enable = "avx512f")]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

// ---------------------------------------------------------------------------------------
// Q8_0 x Q8_0 with vpdpbusd: |w| (u8) x sign(x, w) (i8), four products per i32 lane.

/// Q8_0 dot of one row. Two accumulators, even and odd blocks; the loop takes blocks in
/// pairs so that the parity is a constant and both stay in registers (indexed by `i & 1`
/// they lived on the stack, a store-forward on every FMA), and the scales are converted from
/// a general register (`vmovd`), not merged into a live register by `vpinsrw` (see
/// [`f16_to_f32`]): 2x faster on Zen 4 (docs/BENCH.md). The f32 operations are unchanged,
/// so the group kernel (`tiles_x86`) still gives the same bits per token.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 2];
    let nb = w.len().min(x.len());
    macro_rules! block {
        ($i:expr, $par:literal) => {{
            let (bw, bx) = (&w[$i], &x[$i]);
            let qw = load256(&bw.qs, 0);
            let qx = load256(&bx.qs, 0);
            let s32 = _mm256_dpbusd_epi32(
                _mm256_setzero_si256(),
                _mm256_sign_epi8(qw, qw),
                _mm256_sign_epi8(qx, qw),
            );
            // Both scales in one conversion (lanes 0 and 1), the same exact values and
            // product as `f16_to_f32(bw.d) * f16_to_f32(bx.d)`, one instruction fewer.
            let bits = i32::from(bw.d.to_bits()) | i32::from(bx.d.to_bits()) << 16;
            let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
            let d = _mm256_broadcastss_ps(_mm_mul_ss(dd, _mm_movehdup_ps(dd)));
            acc[$par] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32), acc[$par]);
        }};
    }
    for_block_pairs!(nb, block);
    hsum_ps(_mm256_add_ps(acc[0], acc[1]))
}

// ---------------------------------------------------------------------------------------
// Q2_K x Q8_K.

/// `vpermw` indices spreading the 16 sub-block scales (i16) over the 32 i16 pair sums of
/// one 64-value step: step `t` (0..3) covers sub-blocks `4t .. 4t + 4`, 8 pair sums each.
static Q2K_SCALE_IDX: [[u16; 32]; 4] = {
    let mut out = [[0u16; 32]; 4];
    let mut t = 0;
    while t < 4 {
        let mut k = 0;
        while k < 32 {
            out[t][k] = (4 * t + k / 8) as u16;
            k += 1;
        }
        t += 1;
    }
    out
};

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens, each weight
/// block unpacked once for all of them; `NT = 1` is the single-row dot.
///
/// # Safety
/// The CPU must support the AVX-512 VNNI set and AVX2.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn q2k_q8k<const NT: usize>(w: &[BlockQ2K], x: &[BlockQ8K], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT, "q2k_q8k: lengths");
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0F);
    // SAFETY: each table row is 32 u16 = 64 bytes; unaligned loads.
    let idx = Q2K_SCALE_IDX.map(|r| unsafe { _mm512_loadu_si512(r.as_ptr().cast()) });
    let mut acc = [_mm512_setzero_ps(); NT];
    let mut acc_m = [_mm256_setzero_ps(); NT];
    for (i, bw) in w.iter().enumerate() {
        let (dw, dminw) = (f16_to_f32(bw.d), f16_to_f32(bw.dmin));
        // SAFETY: `scales` is 16 bytes; unaligned load.
        let sm = unsafe { _mm_loadu_si128(bw.scales.as_ptr().cast()) };
        let sc8 = _mm_and_si128(sm, m4);
        let mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4));
        let sc = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(sc8));
        // Step 2h + k: values 128h + 64k .. + 64 (bit pairs 2k and 2k + 1 of half h).
        let mut q = [_mm512_setzero_si512(); 4];
        for h in 0..2 {
            let q2 = load256(&bw.qs, 32 * h);
            q[2 * h] = join(
                _mm256_and_si256(q2, m3),
                _mm256_and_si256(_mm256_srli_epi16::<2>(q2), m3),
            );
            q[2 * h + 1] = join(
                _mm256_and_si256(_mm256_srli_epi16::<4>(q2), m3),
                _mm256_and_si256(_mm256_srli_epi16::<6>(q2), m3),
            );
        }
        let scale: [__m512i; 4] = std::array::from_fn(|t| _mm512_permutexvar_epi16(idx[t], sc));
        for (t, (a, am)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let bx = &x[t * nb + i];
            // SAFETY: `bsums` is 16 i16 = 32 bytes; unaligned load.
            let bsums = unsafe { _mm256_loadu_si256(bx.bsums.as_ptr().cast()) };
            let mins = _mm256_madd_epi16(mn16, bsums);
            *am = _mm256_fmadd_ps(_mm256_set1_ps(-bx.d * dminw), _mm256_cvtepi32_ps(mins), *am);
            let mut sumi = _mm512_setzero_si512();
            for k in 0..4 {
                let p = _mm512_maddubs_epi16(q[k], load512(&bx.qs, 64 * k));
                sumi = _mm512_dpwssd_epi32(sumi, p, scale[k]);
            }
            *a = _mm512_fmadd_ps(_mm512_set1_ps(bx.d * dw), _mm512_cvtepi32_ps(sumi), *a);
        }
    }
    for ((o, a), am) in out.iter_mut().zip(&acc).zip(&acc_m) {
        *o = _mm512_reduce_add_ps(*a) + hsum_ps(*am);
    }
}

// ---------------------------------------------------------------------------------------
// IQ2_XXS x Q8_K: two groups (64 values) per step; signs as a mask.

/// The sign mask of two IQ2_XXS groups (bit `8k + i`: element `i` of chunk `k` is
/// negative; chunks 0..3 from `aux_a`, 4..7 from `aux_b`), computed without a table:
/// `pdep` spreads the eight 7-bit sign codes into bytes, and the implied eighth sign is the
/// parity of each byte's seven bits (FORMATS.md s2.6: `KSIGNS[s] = s | parity(s) << 7`).
/// The parity folds only ever move bits down within a byte into bit 0, so neighbouring
/// bytes never mix.
#[inline]
#[target_feature(enable = "bmi2")]
fn iq2xxs_sign_mask(aux_a: u32, aux_b: u32) -> u64 {
    let codes = u64::from(aux_a & 0x0FFF_FFFF) | u64::from(aux_b & 0x0FFF_FFFF) << 28;
    let y = _pdep_u64(codes, 0x7F7F_7F7F_7F7F_7F7F);
    let mut p = y ^ (y >> 4);
    p ^= p >> 2;
    p ^= p >> 1;
    y | (p & 0x0101_0101_0101_0101) << 7
}

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens, each weight
/// step unpacked once for all of them; `NT = 1` is the single-row dot.
///
/// # Safety
/// The CPU must support the AVX-512 VNNI set, AVX2 and BMI2.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn iq2xxs_q8k<const NT: usize>(w: &[BlockIq2Xxs], x: &[BlockQ8K], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT, "iq2xxs_q8k: lengths");
    let mut acc = [_mm512_setzero_ps(); NT];
    let zero = _mm512_setzero_si512();
    for (i, bw) in w.iter().enumerate() {
        let dw = 0.125 * f16_to_f32(bw.d);
        let mut sumi = [_mm512_setzero_si512(); NT];
        for t in 0..4 {
            let q: &[u8; 16] = bw.qs[16 * t..16 * t + 16].try_into().expect("16 bytes");
            let aux_a = u32::from_le_bytes([q[4], q[5], q[6], q[7]]);
            let aux_b = u32::from_le_bytes([q[12], q[13], q[14], q[15]]);
            let g = |b: u8| IQ2XXS_GRID[usize::from(b)] as i64;
            let grid = _mm512_set_epi64(
                g(q[11]),
                g(q[10]),
                g(q[9]),
                g(q[8]),
                g(q[3]),
                g(q[2]),
                g(q[1]),
                g(q[0]),
            );
            let neg: __mmask64 = iq2xxs_sign_mask(aux_a, aux_b);
            let ls = join(
                _mm256_set1_epi16((2 * (aux_a >> 28) + 1) as i16),
                _mm256_set1_epi16((2 * (aux_b >> 28) + 1) as i16),
            );
            for (tok, s) in sumi.iter_mut().enumerate() {
                let q8 = load512(&x[tok * nb + i].qs, 64 * t);
                let q8 = _mm512_mask_sub_epi8(q8, neg, zero, q8);
                let p = _mm512_maddubs_epi16(grid, q8);
                *s = _mm512_dpwssd_epi32(*s, p, ls);
            }
        }
        for (tok, (a, s)) in acc.iter_mut().zip(&sumi).enumerate() {
            let d = _mm512_set1_ps(x[tok * nb + i].d * dw);
            *a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(*s), *a);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(*a);
    }
}

// ---------------------------------------------------------------------------------------
// F16 x f32: 16 values per conversion, four FMA chains.

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn f16_f32(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len();
    let n64 = n / 64 * 64;
    let mut acc = [_mm512_setzero_ps(); 4];
    let (pw, px) = (w.as_ptr().cast::<u16>(), x.as_ptr());
    for i in (0..n64).step_by(64) {
        for (k, a) in acc.iter_mut().enumerate() {
            let o = i + 16 * k;
            // SAFETY: o + 16 <= n64 <= n for both slices (equal lengths); unaligned loads.
            let (wv, xv) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(o).cast())),
                    _mm512_loadu_ps(px.add(o)),
                )
            };
            *a = _mm512_fmadd_ps(wv, xv, *a);
        }
    }
    let acc = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut sum = _mm512_reduce_add_ps(acc);
    for i in n64..n {
        sum += f16_to_f32(w[i]) * x[i];
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::KSIGNS_IQ2XS;

    #[test]
    fn sign_mask_matches_ksigns() {
        if !Isa::Avx512Vnni.is_supported() {
            return;
        }
        for code_a in 0..128u32 {
            let code_b = 127 - code_a;
            let aux_a = code_a | (code_a ^ 0x55) << 7 | 0x3 << 14 | code_b << 21 | 0xF << 28;
            let aux_b = code_b | code_a << 7 | 0x7F << 14 | 0x1 << 21;
            let want = (0..4)
                .map(|k| u64::from(KSIGNS_IQ2XS[((aux_a >> (7 * k)) & 127) as usize]) << (8 * k))
                .chain((0..4).map(|k| {
                    u64::from(KSIGNS_IQ2XS[((aux_b >> (7 * k)) & 127) as usize]) << (8 * k + 32)
                }))
                .fold(0, |m, v| m | v);
            // SAFETY: avx512 support (checked above) implies bmi2 here (see Isa::is_supported).
            assert_eq!(unsafe { iq2xxs_sign_mask(aux_a, aux_b) }, want, "{code_a}");
        }
    }
}
