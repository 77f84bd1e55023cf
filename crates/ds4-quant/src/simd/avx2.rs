//! AVX2 + FMA + F16C dot kernels (the x86-64 baseline).
//!
//! The integer kernels follow ggml's AVX2 scheme (FORMATS.md s2.8): weights are unsigned
//! bytes (or made unsigned with the sign trick), activations signed bytes, and
//! `vpmaddubsw` (u8 x i8 -> pairwise i16) followed by `vpmaddwd` with the sub-block scales
//! (i16 x i16 -> pairwise i32) gives exact integer sub-block sums. No i16 step can saturate:
//! the largest pair sum is `2 * 128 * 127` (Q8_0), `2 * 15 * 127` (Q4_K), `2 * 3 * 127`
//! (Q2_K) or `2 * 43 * 127` (IQ2_XXS), all below `i16::MAX`, and the scaled i32 sums of a
//! block stay far below `i32::MAX`. Only the per-block f32 scaling differs in rounding
//! order from the scalar references. Checked by `tests/kernels.rs`.
//!
//! IQ2_XXS and Q2_K are written as multi-token kernels (`NT` tokens per pass over the
//! weights, unpacking each weight block or group once; the single-row dot is `NT = 1`), so
//! the `_n` entries are bit-identical per token to the single-row dot.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{IQ2XXS_SIGNS, Isa, Kernels};
use crate::tables::IQ2XXS_GRID;
use crate::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};

/// The AVX2 kernel table; handed out by [`Kernels::for_isa`] only after the CPU was found to
/// support AVX2, FMA and F16C.
pub(super) static KERNELS: Kernels = Kernels {
    isa: Isa::Avx2,
    q8_0_q8_0: dot_q8_0_q8_0,
    q2k_q8k: dot_q2k_q8k,
    q4k_q8k: dot_q4k_q8k,
    iq2xxs_q8k: dot_iq2xxs_q8k,
    f16_f32: dot_f16_f32,
    bf16_f32: dot_bf16_f32,
    f32_f32: dot_f32_f32,
    q8_0_q8_0_n: super::tiles_x86::avx2_q8_0_q8_0_n,
    q2k_q8k_n: dot_q2k_q8k_n,
    q4k_q8k_n: super::tiles_x86::avx2_q4k_q8k_n,
    iq2xxs_q8k_n: dot_iq2xxs_q8k_n,
    f16_f32_n: dot_f16_f32_n,
    bf16_f32_n: dot_bf16_f32_n,
    f32_f32_n: dot_f32_f32_n,
    q8_0_q8_0_g: None,
    q2k_prep: None,
    iq2xxs_prep: None,
};

dot_n_passes!(dot_q2k_q8k_n, q2k_q8k, BlockQ2K, BlockQ8K);
dot_n_passes!(dot_iq2xxs_q8k_n, iq2xxs_q8k, BlockIq2Xxs, BlockQ8K);
dot_n_loop!(dot_f16_f32_n, dot_f16_f32, f16, f32);
dot_n_loop!(dot_bf16_f32_n, dot_bf16_f32, bf16, f32);
dot_n_loop!(dot_f32_f32_n, dot_f32_f32, f32, f32);

// The safe wrappers below are only reachable through `KERNELS`, which `Kernels::for_isa`
// returns only when `Isa::Avx2.is_supported()` (avx2 + fma + f16c detected at run time).

fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q8_0_q8_0: length mismatch");
    // SAFETY: the CPU supports avx2, fma and f16c (see KERNELS); lengths are equal.
    unsafe { q8_0_q8_0(w, x) }
}

fn dot_q2k_q8k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q2k_q8k: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports avx2, fma and f16c (see KERNELS); lengths are equal.
    unsafe { q2k_q8k::<1>(w, x, &mut out) };
    out[0]
}

fn dot_q4k_q8k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q4k_q8k: length mismatch");
    // SAFETY: the CPU supports avx2, fma and f16c (see KERNELS); lengths are equal.
    unsafe { q4k_q8k(w, x) }
}

fn dot_iq2xxs_q8k(w: &[BlockIq2Xxs], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_iq2xxs_q8k: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports avx2, fma and f16c (see KERNELS); lengths are equal.
    unsafe { iq2xxs_q8k::<1>(w, x, &mut out) };
    out[0]
}

fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f16_f32: length mismatch");
    // SAFETY: the CPU supports avx2, fma and f16c (see KERNELS); lengths are equal.
    unsafe { f16_f32(w, x) }
}

fn dot_bf16_f32(w: &[bf16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_bf16_f32: length mismatch");
    // SAFETY: the CPU supports avx2, fma and f16c (see KERNELS); lengths are equal.
    unsafe { bf16_f32(w, x) }
}

fn dot_f32_f32(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f32_f32: length mismatch");
    // SAFETY: the CPU supports avx2, fma and f16c (see KERNELS); lengths are equal.
    unsafe { f32_f32(w, x) }
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// One f16 to f32 with the F16C instruction (exact, like `half::f16::to_f32`, but without
/// `half`'s per-call feature check).
///
/// Written in `asm!` on purpose. With the intrinsics (`_mm_cvtsi32_si128` or
/// `_mm_set1_epi16` into `_mm_cvtph_ps`) LLVM sees that only lane 0 matters and loads the
/// value with `vpinsrw xmm_t, xmm_any, [mem], 0`, merging into whatever register it likes,
/// often a live accumulator: every block's scale then waits for the previous block's FMA, a
/// loop-carried chain (on Zen 4 it halved the AVX-512 Q8_0 dot and cost the Q8_0 group
/// kernel 6-23%, docs/BENCH.md). `vmovd` from a general register writes the whole register,
/// so the conversion depends on nothing but `h`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn f16_to_f32(h: f16) -> f32 {
    let out: f32;
    // SAFETY: two register-only instructions (AVX `vmovd`, F16C `vcvtph2ps`, both enabled
    // here); no memory, stack or flags are touched.
    unsafe {
        std::arch::asm!(
            "vmovd {t}, {b:e}",
            "vcvtph2ps {t}, {t}",
            b = in(reg) u32::from(h.to_bits()),
            t = out(xmm_reg) out,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// Loads 32 bytes from a 32-byte array.
#[inline]
#[target_feature(enable = "avx2")]
fn load32<T>(p: &[T; 32]) -> __m256i
where
    T: Copy,
{
    debug_assert_eq!(size_of::<T>(), 1);
    // SAFETY: `p` points at 32 readable bytes (T is a byte type); loadu has no alignment
    // requirement.
    unsafe { _mm256_loadu_si256(p.as_ptr().cast()) }
}

/// Loads 32 bytes at `p[at..at + 32]`.
#[inline]
#[target_feature(enable = "avx2")]
fn load32_at<T: Copy, const N: usize>(p: &[T; N], at: usize) -> __m256i {
    debug_assert_eq!(size_of::<T>(), 1);
    assert!(at + 32 <= N);
    // SAFETY: bounds checked just above (usually folded away); loadu is unaligned.
    unsafe { _mm256_loadu_si256(p.as_ptr().add(at).cast()) }
}

// ---------------------------------------------------------------------------------------
// Q8_0 x Q8_0: sum_b dw_b * dx_b * sum_e w[e] * x[e].

/// One Q8_0 block pair: the per-block scale and the 8 i32 partial sums as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_block(bw: &BlockQ8_0, bx: &BlockQ8_0) -> (__m256, __m256) {
    let qw = load32(&bw.qs);
    let qx = load32(&bx.qs);
    // |w| as u8 times x with w's sign: the same products, in maddubs' u8 x i8 form.
    let aw = _mm256_sign_epi8(qw, qw);
    let sx = _mm256_sign_epi8(qx, qw);
    let s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
    let d = _mm256_set1_ps(f16_to_f32(bw.d) * f16_to_f32(bx.d));
    (d, _mm256_cvtepi32_ps(s32))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    // Two accumulators so consecutive blocks do not wait on each other's FMA.
    let mut acc = [_mm256_setzero_ps(); 2];
    let n2 = w.len() / 2 * 2;
    for i in (0..n2).step_by(2) {
        let (d0, s0) = q8_0_block(&w[i], &x[i]);
        let (d1, s1) = q8_0_block(&w[i + 1], &x[i + 1]);
        acc[0] = _mm256_fmadd_ps(d0, s0, acc[0]);
        acc[1] = _mm256_fmadd_ps(d1, s1, acc[1]);
    }
    if n2 < w.len() {
        let (d0, s0) = q8_0_block(&w[n2], &x[n2]);
        acc[0] = _mm256_fmadd_ps(d0, s0, acc[0]);
    }
    hsum_ps(_mm256_add_ps(acc[0], acc[1]))
}

// ---------------------------------------------------------------------------------------
// Q2_K x Q8_K: dx * (d * sum_s sc_s * sum q2*q8 - dmin * sum_s m_s * bsums_s).

/// `vpshufb` controls broadcasting i16 lane `2j` of a 128-bit lane into the low 128 bits
/// and lane `2j + 1` into the high 128 bits, for j = 0..3.
static Q2K_SCALE_SHUF: [[u8; 32]; 4] = {
    let mut out = [[0u8; 32]; 4];
    let mut j = 0;
    while j < 4 {
        let mut b = 0;
        while b < 32 {
            let lane = 2 * j + if b < 16 { 0 } else { 1 };
            out[j][b] = (2 * lane + (b % 2)) as u8;
            b += 1;
        }
        j += 1;
    }
    out
};

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens, each weight
/// block unpacked once for all of them; `NT = 1` is the single-row dot.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q2k_q8k<const NT: usize>(w: &[BlockQ2K], x: &[BlockQ8K], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT, "q2k_q8k: lengths");
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0x0F);
    let shuf = Q2K_SCALE_SHUF.map(|s| load32(&s));
    let mut acc = [_mm256_setzero_ps(); NT];
    let mut acc_m = [_mm256_setzero_ps(); NT];
    for (i, bw) in w.iter().enumerate() {
        let (dw, dminw) = (f16_to_f32(bw.d), f16_to_f32(bw.dmin));
        // SAFETY: `scales` is 16 bytes; unaligned load.
        let sm = unsafe { _mm_loadu_si128(bw.scales.as_ptr().cast()) };
        let sc8 = _mm_and_si128(sm, m4);
        let mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4));
        let sc16 = _mm256_cvtepu8_epi16(sc8);
        let sc_half = [
            _mm256_permute2x128_si256::<0x00>(sc16, sc16),
            _mm256_permute2x128_si256::<0x11>(sc16, sc16),
        ];
        // Step k = 4h + j: bit pair j of the 32 bytes of half h, i.e. elements 32k .. 32k + 32
        // (sub-blocks 2k and 2k + 1), and their scales.
        let mut q = [_mm256_setzero_si256(); 8];
        let mut scale = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let q2 = load32_at(&bw.qs, 32 * h);
            q[4 * h] = _mm256_and_si256(q2, m3);
            q[4 * h + 1] = _mm256_and_si256(_mm256_srli_epi16::<2>(q2), m3);
            q[4 * h + 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(q2), m3);
            q[4 * h + 3] = _mm256_and_si256(_mm256_srli_epi16::<6>(q2), m3);
            for (j, sh) in shuf.iter().enumerate() {
                scale[4 * h + j] = _mm256_shuffle_epi8(sc_half[h], *sh);
            }
        }
        for (t, (a, am)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let bx = &x[t * nb + i];
            // SAFETY: `bsums` is 16 i16 = 32 bytes; unaligned load.
            let bsums = unsafe { _mm256_loadu_si256(bx.bsums.as_ptr().cast()) };
            let mins = _mm256_madd_epi16(mn16, bsums);
            *am = _mm256_fmadd_ps(_mm256_set1_ps(-bx.d * dminw), _mm256_cvtepi32_ps(mins), *am);
            let mut sumi = _mm256_setzero_si256();
            for k in 0..8 {
                let p = _mm256_maddubs_epi16(q[k], load32_at(&bx.qs, 32 * k));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scale[k], p));
            }
            *a = _mm256_fmadd_ps(_mm256_set1_ps(bx.d * dw), _mm256_cvtepi32_ps(sumi), *a);
        }
    }
    for ((o, a), am) in out.iter_mut().zip(&acc).zip(&acc_m) {
        *o = hsum_ps(_mm256_add_ps(*a, *am));
    }
}

// ---------------------------------------------------------------------------------------
// Q4_K x Q8_K: dx * (d * sum_j sc_j * sum q4*q8 - dmin * sum_t m_{t/2} * bsums_t).

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_q8k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm_setzero_ps();
    for (bw, bx) in w.iter().zip(x) {
        let d = bx.d * f16_to_f32(bw.d);
        let dmin = -bx.d * f16_to_f32(bw.dmin);
        let (sc, mn) = super::q4k_scales_mins(&bw.scales);

        // Mins: the bsums of the 32-value sub-block j are bsums[2j] + bsums[2j + 1].
        // SAFETY: `bsums` is 16 i16 = 32 bytes; `mn` is 8 bytes; unaligned loads.
        let (bs, mn16) = unsafe {
            (
                _mm256_loadu_si256(bx.bsums.as_ptr().cast()),
                _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr().cast())),
            )
        };
        let bs = _mm_hadd_epi16(
            _mm256_castsi256_si128(bs),
            _mm256_extracti128_si256::<1>(bs),
        );
        let prod = _mm_madd_epi16(mn16, bs);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let q4 = load32_at(&bw.qs, 32 * c);
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
            let pl = _mm256_maddubs_epi16(lo, load32_at(&bx.qs, 64 * c));
            let ph = _mm256_maddubs_epi16(hi, load32_at(&bx.qs, 64 * c + 32));
            let pl = _mm256_madd_epi16(pl, _mm256_set1_epi16(i16::from(sc[2 * c])));
            let ph = _mm256_madd_epi16(ph, _mm256_set1_epi16(i16::from(sc[2 * c + 1])));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    let m = _mm_add_ss(m, _mm_movehdup_ps(m));
    hsum_ps(acc) + _mm_cvtss_f32(m)
}

// ---------------------------------------------------------------------------------------
// IQ2_XXS x Q8_K: dx * d / 8 * sum_g (2 L_g + 1) * sum_{k,i} grid * sign * q8.

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens, each weight
/// block unpacked once for all of them; `NT = 1` is the single-row dot.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn iq2xxs_q8k<const NT: usize>(w: &[BlockIq2Xxs], x: &[BlockQ8K], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT, "iq2xxs_q8k: lengths");
    let mut acc = [_mm256_setzero_ps(); NT];
    for (i, bw) in w.iter().enumerate() {
        let dw = 0.125 * f16_to_f32(bw.d);
        // Group by group (keeps the registers of one group live, not of eight), each group
        // applied to every token; per token the same instructions as the single-row dot.
        let mut sumi = [[_mm256_setzero_si256(); 2]; NT];
        for g in 0..8 {
            let gb = &bw.qs[8 * g..8 * g + 8];
            let signs = u32::from_le_bytes([gb[4], gb[5], gb[6], gb[7]]);
            // The four 8-value magnitude rows, and their signs as +-1 bytes applied to
            // the activations: the grid stays unsigned for maddubs.
            let grid = _mm256_set_epi64x(
                IQ2XXS_GRID[usize::from(gb[3])] as i64,
                IQ2XXS_GRID[usize::from(gb[2])] as i64,
                IQ2XXS_GRID[usize::from(gb[1])] as i64,
                IQ2XXS_GRID[usize::from(gb[0])] as i64,
            );
            let sgn = _mm256_set_epi64x(
                IQ2XXS_SIGNS[((signs >> 21) & 127) as usize] as i64,
                IQ2XXS_SIGNS[((signs >> 14) & 127) as usize] as i64,
                IQ2XXS_SIGNS[((signs >> 7) & 127) as usize] as i64,
                IQ2XXS_SIGNS[(signs & 127) as usize] as i64,
            );
            let ls = _mm256_set1_epi16((2 * (signs >> 28) + 1) as i16);
            for (t, s) in sumi.iter_mut().enumerate() {
                let q8 = _mm256_sign_epi8(load32_at(&x[t * nb + i].qs, 32 * g), sgn);
                let p = _mm256_maddubs_epi16(grid, q8);
                s[g & 1] = _mm256_add_epi32(s[g & 1], _mm256_madd_epi16(p, ls));
            }
        }
        for (t, (a, s)) in acc.iter_mut().zip(&sumi).enumerate() {
            let sumi = _mm256_add_epi32(s[0], s[1]);
            let d = _mm256_set1_ps(x[t * nb + i].d * dw);
            *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), *a);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = hsum_ps(*a);
    }
}

// ---------------------------------------------------------------------------------------
// Float rows: four independent 8-lane FMA chains hide the FMA latency.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_f32(w: &[f16], x: &[f32]) -> f32 {
    let n = w.len();
    let n32 = n / 32 * 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    let (pw, px) = (w.as_ptr().cast::<u16>(), x.as_ptr());
    for i in (0..n32).step_by(32) {
        for (k, a) in acc.iter_mut().enumerate() {
            let o = i + 8 * k;
            // SAFETY: o + 8 <= n32 <= n for both slices (equal lengths); unaligned loads.
            let (wv, xv) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(pw.add(o).cast())),
                    _mm256_loadu_ps(px.add(o)),
                )
            };
            *a = _mm256_fmadd_ps(wv, xv, *a);
        }
    }
    let mut sum = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for i in n32..n {
        sum += f16_to_f32(w[i]) * x[i];
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bf16_f32(w: &[bf16], x: &[f32]) -> f32 {
    let n = w.len();
    let n32 = n / 32 * 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    let (pw, px) = (w.as_ptr().cast::<u16>(), x.as_ptr());
    for i in (0..n32).step_by(32) {
        for (k, a) in acc.iter_mut().enumerate() {
            let o = i + 8 * k;
            // SAFETY: o + 8 <= n32 <= n for both slices (equal lengths); unaligned loads.
            let (wv, xv) = unsafe {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(pw.add(o).cast()));
                (
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)),
                    _mm256_loadu_ps(px.add(o)),
                )
            };
            *a = _mm256_fmadd_ps(wv, xv, *a);
        }
    }
    let mut sum = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for i in n32..n {
        sum += w[i].to_f32() * x[i];
    }
    sum
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len();
    let n32 = n / 32 * 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    for i in (0..n32).step_by(32) {
        for (k, a) in acc.iter_mut().enumerate() {
            let o = i + 8 * k;
            // SAFETY: o + 8 <= n32 <= n for both slices (equal lengths); unaligned loads.
            let (wv, xv) = unsafe { (_mm256_loadu_ps(pw.add(o)), _mm256_loadu_ps(px.add(o))) };
            *a = _mm256_fmadd_ps(wv, xv, *a);
        }
    }
    let mut sum = hsum_ps(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    for i in n32..n {
        sum += w[i] * x[i];
    }
    sum
}
