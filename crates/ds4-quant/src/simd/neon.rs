//! NEON dot kernels for aarch64 (Advanced SIMD is part of the aarch64 baseline, so no
//! run-time check is needed).
//!
//! Same arithmetic as the scalar references (FORMATS.md s2.8): i8 x i8 products widen to
//! i16 with `vmull_s8` (at most `128 * 127`, and a pair of them still fits), are summed
//! pairwise into i32 lanes, and each sub-block's i32 sum is scaled by its integer scale
//! before the per-block f32 step. Integer parts are exact; only the order of the f32
//! additions differs from the scalar code. IQ2_XXS applies its signs as a `±1` byte vector
//! multiplied into the activations (the NEON approach of ds4). F16 rows are converted in
//! chunks with `half` (which uses the FP16 conversion instructions where present).
//!
//! Verified only by type-checking (`cargo check --target aarch64-unknown-linux-gnu`) on the
//! x86 build machine; `tests/kernels.rs` runs it against the scalar references on aarch64.

use std::arch::aarch64::*;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{IQ2XXS_SIGNS, Isa, Kernels};
use crate::tables::IQ2XXS_GRID;
use crate::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};

/// The NEON kernel table (every aarch64 CPU).
pub(super) static KERNELS: Kernels = Kernels {
    isa: Isa::Neon,
    q8_0_q8_0: dot_q8_0_q8_0,
    q2k_q8k: dot_q2k_q8k,
    q4k_q8k: dot_q4k_q8k,
    iq2xxs_q8k: dot_iq2xxs_q8k,
    f16_f32: dot_f16_f32,
    bf16_f32: dot_bf16_f32,
    f32_f32: dot_f32_f32,
    q8_0_q8_0_n: dot_q8_0_q8_0_n,
    q2k_q8k_n: dot_q2k_q8k_n,
    q4k_q8k_n: dot_q4k_q8k_n,
    iq2xxs_q8k_n: dot_iq2xxs_q8k_n,
    f16_f32_n: dot_f16_f32_n,
    bf16_f32_n: dot_bf16_f32_n,
    f32_f32_n: dot_f32_f32_n,
    q8_0_q8_0_g: None,
    q2k_prep: None,
    iq2xxs_prep: None,
};

dot_n_loop!(dot_q8_0_q8_0_n, dot_q8_0_q8_0, BlockQ8_0, BlockQ8_0);
dot_n_loop!(dot_q2k_q8k_n, dot_q2k_q8k, BlockQ2K, BlockQ8K);
dot_n_loop!(dot_q4k_q8k_n, dot_q4k_q8k, BlockQ4K, BlockQ8K);
dot_n_loop!(dot_iq2xxs_q8k_n, dot_iq2xxs_q8k, BlockIq2Xxs, BlockQ8K);
dot_n_loop!(dot_f16_f32_n, dot_f16_f32, f16, f32);
dot_n_loop!(dot_bf16_f32_n, dot_bf16_f32, bf16, f32);
dot_n_loop!(dot_f32_f32_n, dot_f32_f32, f32, f32);

/// Loads 16 signed bytes at `p[at..at + 16]`.
#[inline]
fn ld_s8<T: Copy, const N: usize>(p: &[T; N], at: usize) -> int8x16_t {
    debug_assert_eq!(size_of::<T>(), 1);
    assert!(at + 16 <= N);
    // SAFETY: bounds checked above; NEON is always enabled on aarch64; vld1q has no
    // alignment requirement beyond the element's.
    unsafe { vld1q_s8(p.as_ptr().add(at).cast()) }
}

/// Loads 16 unsigned bytes at `p[at..at + 16]`.
#[inline]
fn ld_u8<T: Copy, const N: usize>(p: &[T; N], at: usize) -> uint8x16_t {
    debug_assert_eq!(size_of::<T>(), 1);
    assert!(at + 16 <= N);
    // SAFETY: as in `ld_s8`.
    unsafe { vld1q_u8(p.as_ptr().add(at).cast()) }
}

/// `Σ a[i] * b[i]` over 16 i8 lanes, exact in i32 (each product fits i16 and so does a
/// pair of them as long as one factor is at most 127 in magnitude).
#[inline]
fn dot16(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is always enabled on aarch64; these are register-only operations.
    unsafe {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vpadalq_s16(vpaddlq_s16(lo), hi)
    }
}

/// Horizontal sum of 4 i32 lanes.
#[inline]
fn hsum_s32(v: int32x4_t) -> i32 {
    // SAFETY: NEON is always enabled on aarch64; register-only.
    unsafe { vaddvq_s32(v) }
}

fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q8_0_q8_0: length mismatch");
    let mut sum = 0.0f32;
    for (bw, bx) in w.iter().zip(x) {
        let s = {
            // SAFETY: NEON is always enabled on aarch64; register-only.
            unsafe {
                vaddq_s32(
                    dot16(ld_s8(&bw.qs, 0), ld_s8(&bx.qs, 0)),
                    dot16(ld_s8(&bw.qs, 16), ld_s8(&bx.qs, 16)),
                )
            }
        };
        sum += hsum_s32(s) as f32 * (bw.d.to_f32() * bx.d.to_f32());
    }
    sum
}

fn dot_q2k_q8k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q2k_q8k: length mismatch");
    let mut sum = 0.0f32;
    for (bw, bx) in w.iter().zip(x) {
        let mut summs = 0i32;
        for (s, &b) in bx.bsums.iter().enumerate() {
            summs += i32::from(bw.scales[s] >> 4) * i32::from(b);
        }
        let mut isum = 0i32;
        for h in 0..2 {
            // SAFETY: NEON is always enabled on aarch64; register-only.
            let m3 = unsafe { vdupq_n_u8(3) };
            let qa = ld_u8(&bw.qs, 32 * h);
            let qb = ld_u8(&bw.qs, 32 * h + 16);
            for j in 0..4 {
                // SAFETY: NEON is always enabled on aarch64; register-only. The shift
                // count is a constant per arm.
                let (a, b) = unsafe {
                    let (a, b) = match j {
                        0 => (qa, qb),
                        1 => (vshrq_n_u8::<2>(qa), vshrq_n_u8::<2>(qb)),
                        2 => (vshrq_n_u8::<4>(qa), vshrq_n_u8::<4>(qb)),
                        _ => (vshrq_n_u8::<6>(qa), vshrq_n_u8::<6>(qb)),
                    };
                    (
                        vreinterpretq_s8_u8(vandq_u8(a, m3)),
                        vreinterpretq_s8_u8(vandq_u8(b, m3)),
                    )
                };
                let at = 128 * h + 32 * j;
                let s = 8 * h + 2 * j;
                isum += i32::from(bw.scales[s] & 15) * hsum_s32(dot16(a, ld_s8(&bx.qs, at)));
                isum +=
                    i32::from(bw.scales[s + 1] & 15) * hsum_s32(dot16(b, ld_s8(&bx.qs, at + 16)));
            }
        }
        sum += bx.d * (bw.d.to_f32() * isum as f32 - bw.dmin.to_f32() * summs as f32);
    }
    sum
}

fn dot_q4k_q8k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q4k_q8k: length mismatch");
    let mut sum = 0.0f32;
    for (bw, bx) in w.iter().zip(x) {
        let (sc, mn) = super::q4k_scales_mins(&bw.scales);
        let mut summs = 0i32;
        for (t, &b) in bx.bsums.iter().enumerate() {
            summs += i32::from(mn[t / 2]) * i32::from(b);
        }
        let mut isum = 0i32;
        for c in 0..4 {
            // SAFETY: NEON is always enabled on aarch64; register-only.
            let m4 = unsafe { vdupq_n_u8(0x0F) };
            let mut lo = [0i32; 2];
            let mut hi = [0i32; 2];
            for half in 0..2 {
                let q = ld_u8(&bw.qs, 32 * c + 16 * half);
                // SAFETY: NEON is always enabled on aarch64; register-only.
                let (l, h) = unsafe {
                    (
                        vreinterpretq_s8_u8(vandq_u8(q, m4)),
                        vreinterpretq_s8_u8(vshrq_n_u8::<4>(q)),
                    )
                };
                lo[half] = hsum_s32(dot16(l, ld_s8(&bx.qs, 64 * c + 16 * half)));
                hi[half] = hsum_s32(dot16(h, ld_s8(&bx.qs, 64 * c + 32 + 16 * half)));
            }
            isum += i32::from(sc[2 * c]) * (lo[0] + lo[1]);
            isum += i32::from(sc[2 * c + 1]) * (hi[0] + hi[1]);
        }
        sum += bx.d * (bw.d.to_f32() * isum as f32 - bw.dmin.to_f32() * summs as f32);
    }
    sum
}

fn dot_iq2xxs_q8k(w: &[BlockIq2Xxs], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_iq2xxs_q8k: length mismatch");
    let mut sum = 0.0f32;
    for (bw, bx) in w.iter().zip(x) {
        let mut bsum = 0i32;
        for g in 0..8 {
            let gb = &bw.qs[8 * g..8 * g + 8];
            let aux = u32::from_le_bytes([gb[4], gb[5], gb[6], gb[7]]);
            let grid = |k: usize| IQ2XXS_GRID[usize::from(gb[k])];
            let sign = |k: usize| IQ2XXS_SIGNS[((aux >> (7 * k)) & 127) as usize];
            // SAFETY: NEON is always enabled on aarch64; register-only. Grid bytes are at
            // most 43, so reading them as i8 is lossless.
            let s = unsafe {
                let g01 =
                    vreinterpretq_s8_u8(vcombine_u8(vcreate_u8(grid(0)), vcreate_u8(grid(1))));
                let g23 =
                    vreinterpretq_s8_u8(vcombine_u8(vcreate_u8(grid(2)), vcreate_u8(grid(3))));
                let s01 = vcombine_s8(vcreate_s8(sign(0)), vcreate_s8(sign(1)));
                let s23 = vcombine_s8(vcreate_s8(sign(2)), vcreate_s8(sign(3)));
                let q01 = vmulq_s8(ld_s8(&bx.qs, 32 * g), s01);
                let q23 = vmulq_s8(ld_s8(&bx.qs, 32 * g + 16), s23);
                vaddq_s32(dot16(g01, q01), dot16(g23, q23))
            };
            bsum += (2 * (aux >> 28) as i32 + 1) * hsum_s32(s);
        }
        sum += 0.125 * bw.d.to_f32() * bx.d * bsum as f32;
    }
    sum
}

fn dot_f32_f32(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f32_f32: length mismatch");
    let n16 = w.len() / 16 * 16;
    // SAFETY: NEON is always enabled on aarch64; every load reads 4 floats at o + 4k with
    // o + 16 <= n16 <= len of both slices.
    let mut sum = unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        for o in (0..n16).step_by(16) {
            for (k, a) in acc.iter_mut().enumerate() {
                let wv = vld1q_f32(w.as_ptr().add(o + 4 * k));
                let xv = vld1q_f32(x.as_ptr().add(o + 4 * k));
                *a = vfmaq_f32(*a, wv, xv);
            }
        }
        vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ))
    };
    for i in n16..w.len() {
        sum += w[i] * x[i];
    }
    sum
}

fn dot_bf16_f32(w: &[bf16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_bf16_f32: length mismatch");
    let n16 = w.len() / 16 * 16;
    let pw = w.as_ptr().cast::<u16>();
    // SAFETY: NEON is always enabled on aarch64; every load reads 4 values at o + 4k with
    // o + 16 <= n16 <= len of both slices. bf16 is the upper half of an f32.
    let mut sum = unsafe {
        let mut acc = [vdupq_n_f32(0.0); 4];
        for o in (0..n16).step_by(16) {
            for (k, a) in acc.iter_mut().enumerate() {
                let wv = vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(pw.add(o + 4 * k))));
                let xv = vld1q_f32(x.as_ptr().add(o + 4 * k));
                *a = vfmaq_f32(*a, wv, xv);
            }
        }
        vaddvq_f32(vaddq_f32(
            vaddq_f32(acc[0], acc[1]),
            vaddq_f32(acc[2], acc[3]),
        ))
    };
    for i in n16..w.len() {
        sum += w[i].to_f32() * x[i];
    }
    sum
}

fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f16_f32: length mismatch");
    // Converted 64 at a time into a stack buffer, then the f32 kernel.
    let mut buf = [0.0f32; 64];
    let mut sum = 0.0f32;
    for (wc, xc) in w.chunks(64).zip(x.chunks(64)) {
        let b = &mut buf[..wc.len()];
        wc.convert_to_f32_slice(b);
        sum += dot_f32_f32(b, xc);
    }
    sum
}
