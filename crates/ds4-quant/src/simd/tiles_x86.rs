//! Multi-token ("_n") dot kernels for x86-64: one weight row against several tokens.
//!
//! Prefill runs every weight row against a chunk of tokens. The single-row kernels of
//! [`super::avx2`] and [`super::avx512`] redo the weight work (load, `|w|`, sign mask, nibble
//! unpacking, scale decoding) for every token; the kernels here do it once per weight block
//! and apply it to 2-8 tokens held in registers.
//!
//! Contract (see [`super::DotQ8_0N`]): `out[t]` is **bit-identical** to the single-row kernel
//! of the same table on token `t`. The integer block sums are exact whatever the method, so
//! the kernels are free there; every f32 operation of the single kernel (the scale product,
//! the FMA into the accumulator of the same parity, the final horizontal sum) is repeated
//! lane for lane in the same order. With AVX-512 two tokens share one 512-bit vector: its
//! low and high 256-bit halves run exactly the 256-bit arithmetic of the single kernel.
//!
//! Checked bit for bit against the single kernels by `tests/kernels_n.rs` (n = 1..=9).

use std::arch::x86_64::*;

use super::avx2::{f16_to_f32, hsum_ps};
use crate::{BlockQ4K, BlockQ8_0, BlockQ8K};

// The safe entry points below are only reachable through the kernel tables of `avx2` /
// `avx512`, which `Kernels::for_isa` hands out only after run-time feature detection.

/// AVX-512 VNNI Q8_0 x Q8_0 for `out.len()` tokens (table `avx512`): the group kernel on
/// groups of up to 8 tokens, packed here. `gemv` calls the group kernel directly and packs
/// once per call instead of once per row; this entry serves callers of the `_n` contract.
pub(super) fn avx512_q8_0_q8_0_n(w: &[BlockQ8_0], x: &[BlockQ8_0], out: &mut [f32]) {
    let nb = w.len();
    assert_eq!(
        x.len(),
        nb * out.len(),
        "q8_0_q8_0_n: activation length mismatch"
    );
    let (mut packed, mut scales) = (Vec::new(), Vec::new());
    for (g, o) in out.chunks_mut(8).enumerate() {
        let xg = &x[8 * g * nb..(8 * g + o.len()) * nb];
        super::pack_q8_0_group(xg, nb, o.len(), &mut packed, &mut scales);
        avx512_q8_0_q8_0_g(w, &packed, &scales, o);
    }
}

/// AVX-512 VNNI Q8_0 x Q8_0 for up to 8 tokens packed by [`super::pack_q8_0_group`], with
/// pre-converted scales (see [`super::DotQ8_0G`]; table `avx512`).
pub(super) fn avx512_q8_0_q8_0_g(w: &[BlockQ8_0], xp: &[u8], xd: &[f32], out: &mut [f32]) {
    let nb = w.len();
    let n = out.len();
    assert!(n <= 8, "q8_0_q8_0_g: at most 8 tokens");
    assert_eq!(
        xp.len(),
        super::q8_0_group_packed_len(nb, n),
        "q8_0_q8_0_g: packed activation length mismatch"
    );
    assert_eq!(xd.len(), 8 * nb, "q8_0_q8_0_g: scale length mismatch");
    if n == 0 {
        return;
    }
    // SAFETY: the CPU supports the AVX-512 VNNI set (see above); xp holds P * 64 bytes per
    // block and xd 8 scales per block (checked above).
    unsafe {
        match n.div_ceil(2) {
            4 => q8_0_pairs_g_512::<4>(w, xp, xd, out),
            3 => q8_0_pairs_g_512::<3>(w, xp, xd, out),
            2 => q8_0_pairs_g_512::<2>(w, xp, xd, out),
            _ => q8_0_pairs_g_512::<1>(w, xp, xd, out),
        }
    }
}

/// `P` pairs of tokens (pair `p` is tokens `2p` and `2p + 1`), packed by
/// [`super::pack_q8_0_group`] (two tokens per 64 bytes, offset by 128) with the tokens'
/// scales read from `xd` (8 per block), against one Q8_0 row; writes `out[k]` for
/// `k < out.len()`. Per 256-bit half this is `avx512::q8_0_q8_0`.
///
/// The integer lanes are the single kernel's: it computes `Σ |w|·sign(x, w)` per group of 4
/// bytes, this computes `Σ (x + 128)·w - 128·Σ w` (the correction is `vpdpbusd`'s
/// accumulator input, computed once per weight block), both equal to `Σ w·x` exactly. The
/// f32 part is the single kernel's, lane for lane: `d = dw * dx`, FMA into the accumulator
/// of the block's parity, then `hsum(acc0 + acc1)`. Per token pair and block that is one
/// `vpdpbusd` with a memory operand, one permute, one convert and one FMA.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
fn q8_0_pairs_g_512<const P: usize>(w: &[BlockQ8_0], xp: &[u8], xd: &[f32], out: &mut [f32]) {
    let nb = w.len();
    let xd = &xd[..8 * nb];
    let xp = &xp[..nb * P * 64];
    let zero = _mm512_setzero_si512();
    let bias = _mm512_set1_epi8(0x80u8 as i8);
    let idx: [__m512i; P] = std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a)
    });
    let mut acc = [[_mm512_setzero_ps(); 2]; P];
    // One block into the accumulators of its parity: a macro so that the parity is a
    // constant and the accumulators stay in registers.
    macro_rules! block {
        ($i:expr, $par:literal) => {{
            let i = $i;
            let bw = &w[i];
            let qw = _mm512_broadcast_i64x4(load_qs(bw));
            // -128 * (sum of each lane's 4 weights), the offset the packed +128 adds.
            let corr = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, bias, qw));
            let dxs: &[f32; 8] = xd[8 * i..8 * i + 8].try_into().expect("8 scales");
            // SAFETY: 8 f32 = 32 bytes; unaligned load.
            let dx = unsafe { _mm256_loadu_ps(dxs.as_ptr()) };
            let d8 = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_set1_ps(f16_to_f32(bw.d)), dx));
            let base = &xp[i * P * 64..(i + 1) * P * 64];
            for p in 0..P {
                // SAFETY: base holds P * 64 bytes; loadu has no alignment requirement.
                let qx = unsafe { _mm512_loadu_si512(base[p * 64..].as_ptr().cast()) };
                let s32 = _mm512_dpbusd_epi32(corr, qx, qw);
                let d = _mm512_permutexvar_ps(idx[p], d8);
                acc[p][$par] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(s32), acc[p][$par]);
            }
        }};
    }
    for_block_pairs!(nb, block);
    for p in 0..P {
        let s = _mm512_add_ps(acc[p][0], acc[p][1]);
        out[2 * p] = hsum_ps(_mm512_castps512_ps256(s));
        if 2 * p + 1 < out.len() {
            out[2 * p + 1] = hsum_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
                _mm512_castps_pd(s),
            )));
        }
    }
}

/// Loads the 32 quants of a Q8_0 block.
#[inline]
#[target_feature(enable = "avx2")]
fn load_qs(b: &BlockQ8_0) -> __m256i {
    // SAFETY: `qs` is 32 readable bytes; loadu has no alignment requirement.
    unsafe { _mm256_loadu_si256(b.qs.as_ptr().cast()) }
}

/// AVX2 Q8_0 x Q8_0 for `out.len()` tokens (table `avx2`).
pub(super) fn avx2_q8_0_q8_0_n(w: &[BlockQ8_0], x: &[BlockQ8_0], out: &mut [f32]) {
    // SAFETY: the CPU supports avx2, fma and f16c (see above).
    unsafe { by_quads(w, x, out, "q8_0_q8_0_n", q8_0_quad_256) }
}

/// A kernel of four tokens (block offsets into `x`) against one weight row.
type QuadKernel<B, X> = unsafe fn(&[B], &[X], [usize; 4], &mut [f32]);

/// Runs a four-token kernel over `out.len()` tokens (`x` holds them one after another),
/// four at a time; a short last quad repeats its last token (computed, not written).
///
/// # Safety
/// The CPU must support the instruction sets `quad` is compiled for.
unsafe fn by_quads<B, X>(w: &[B], x: &[X], out: &mut [f32], what: &str, quad: QuadKernel<B, X>) {
    let nb = w.len();
    assert_eq!(
        x.len(),
        nb * out.len(),
        "{what}: activation length mismatch"
    );
    let n = out.len();
    let mut t = 0;
    while t < n {
        let take = (n - t).min(4);
        let tok = |k: usize| (t + k.min(take - 1)) * nb;
        // SAFETY: the caller vouches for the CPU; every offset plus nb lies within x.
        unsafe {
            quad(
                w,
                x,
                [tok(0), tok(1), tok(2), tok(3)],
                &mut out[t..t + take],
            )
        };
        t += take;
    }
}

/// Four tokens (block offsets `tk`, repeated when fewer are real) against one Q8_0 row;
/// writes `out[..out.len()]`. Per token this is `avx2::q8_0_q8_0` operation for operation.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_0_quad_256(w: &[BlockQ8_0], x: &[BlockQ8_0], tk: [usize; 4], out: &mut [f32]) {
    let nb = w.len();
    let xs: [&[BlockQ8_0]; 4] = std::array::from_fn(|p| &x[tk[p]..tk[p] + nb]);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; 4];
    // One block into the accumulators of its parity: a macro so that the parity is a
    // constant and the accumulators stay in registers (indexing with `i & 1` kept
    // them on the stack, a store and a load on every FMA).
    macro_rules! block {
        ($i:expr, $par:literal) => {{
            let i = $i;
            let bw = &w[i];
            let qw = load_qs(bw);
            let aw = _mm256_sign_epi8(qw, qw);
            let dw = _mm_set1_ps(f16_to_f32(bw.d));
            let bits = |p: usize| i64::from(xs[p][i].d.to_bits());
            let hx = _mm_cvtsi64_si128(bits(0) | bits(1) << 16 | bits(2) << 32 | bits(3) << 48);
            let d4 = _mm256_castps128_ps256(_mm_mul_ps(dw, _mm_cvtph_ps(hx)));
            for p in 0..4 {
                let sx = _mm256_sign_epi8(load_qs(&xs[p][i]), qw);
                let s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                let d = _mm256_permutevar8x32_ps(d4, _mm256_set1_epi32(p as i32));
                acc[p][$par] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s32), acc[p][$par]);
            }
        }};
    }
    for_block_pairs!(nb, block);
    for (p, o) in out.iter_mut().enumerate() {
        *o = hsum_ps(_mm256_add_ps(acc[p][0], acc[p][1]));
    }
}

/// AVX2 Q4_K x Q8_K for `out.len()` tokens (table `avx2`).
pub(super) fn avx2_q4k_q8k_n(w: &[BlockQ4K], x: &[BlockQ8K], out: &mut [f32]) {
    // SAFETY: the CPU supports avx2, fma and f16c (see above).
    unsafe { by_quads(w, x, out, "q4k_q8k_n", q4k_quad_256) }
}

/// Four tokens against one Q4_K row; per token this is `avx2::q4k_q8k` with the scale
/// decoding and nibble unpacking shared.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4k_quad_256(w: &[BlockQ4K], x: &[BlockQ8K], tk: [usize; 4], out: &mut [f32]) {
    let nb = w.len();
    let xs: [&[BlockQ8K]; 4] = std::array::from_fn(|p| &x[tk[p]..tk[p] + nb]);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut acc_m = [_mm_setzero_ps(); 4];
    for (i, bw) in w.iter().enumerate() {
        let dwf = f16_to_f32(bw.d);
        let dmf = f16_to_f32(bw.dmin);
        let (sc, mn) = super::q4k_scales_mins(&bw.scales);
        // SAFETY: `mn` is 8 bytes; unaligned load.
        let mn16 = unsafe { _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr().cast())) };
        for p in 0..4 {
            let bx = &xs[p][i];
            let dmin = -bx.d * dmf;
            // SAFETY: `bsums` is 16 i16 = 32 bytes; unaligned load.
            let bs = unsafe { _mm256_loadu_si256(bx.bsums.as_ptr().cast()) };
            let bs = _mm_hadd_epi16(
                _mm256_castsi256_si128(bs),
                _mm256_extracti128_si256::<1>(bs),
            );
            let prod = _mm_madd_epi16(mn16, bs);
            acc_m[p] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[p]);
        }
        let mut sumi = [_mm256_setzero_si256(); 4];
        for c in 0..4 {
            // SAFETY: 32 * c + 32 <= 128 bytes of `qs`; unaligned load.
            let q4 = unsafe { _mm256_loadu_si256(bw.qs.as_ptr().add(32 * c).cast()) };
            let lo = _mm256_and_si256(q4, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
            let sl = _mm256_set1_epi16(i16::from(sc[2 * c]));
            let sh = _mm256_set1_epi16(i16::from(sc[2 * c + 1]));
            for p in 0..4 {
                let q8 = &xs[p][i].qs;
                // SAFETY: 64 * c + 64 <= 256 bytes of `qs`; unaligned loads.
                let (xl, xh) = unsafe {
                    (
                        _mm256_loadu_si256(q8.as_ptr().add(64 * c).cast()),
                        _mm256_loadu_si256(q8.as_ptr().add(64 * c + 32).cast()),
                    )
                };
                let pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), sl);
                let ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), sh);
                sumi[p] = _mm256_add_epi32(sumi[p], _mm256_add_epi32(pl, ph));
            }
        }
        for p in 0..4 {
            let d = xs[p][i].d * dwf;
            acc[p] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[p]), acc[p]);
        }
    }
    for (p, o) in out.iter_mut().enumerate() {
        let m = _mm_add_ps(acc_m[p], _mm_movehl_ps(acc_m[p], acc_m[p]));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        *o = hsum_ps(acc[p]) + _mm_cvtss_f32(m);
    }
}

/// AVX-512 F16 x f32 for `out.len()` tokens (table `avx512`): groups of 8 tokens (5-8 left
/// over: one padded group of 8), then one padded group of 4 for 1-4 left over.
pub(super) fn avx512_f16_f32_n(w: &[half::f16], x: &[f32], out: &mut [f32]) {
    let n = w.len();
    assert_eq!(
        x.len(),
        n * out.len(),
        "f16_f32_n: activation length mismatch"
    );
    let mut t = 0;
    while t < out.len() {
        let take = (out.len() - t).min(8);
        // Tokens past `take` repeat the last one (their results are dropped), so the kernel
        // always runs a full group and every offset stays inside `x`.
        let mut tk = [0; 8];
        for (k, o) in tk.iter_mut().enumerate() {
            *o = (t + k.min(take - 1)) * n;
        }
        let o = &mut out[t..t + take];
        // SAFETY: the CPU supports the AVX-512 set (see above); the kernel checks that
        // every token offset + n <= x.len().
        unsafe {
            if take > 4 {
                f16_group_512::<8, 2>(w, x, tk, o);
            } else {
                f16_group_512::<4, 4>(w, x, [tk[0], tk[1], tk[2], tk[3]], o);
            }
        }
        t += take;
    }
}

/// `T` tokens (token `p` at `x[tk[p]..tk[p] + w.len()]`) against one F16 row, writing
/// `out[p]` for `p < out.len()`; per token this is `avx512::f16_f32`: four FMA chains (chain
/// `k` takes the 16 values at offset `16k` of every 64-value step), `reduce_add((a0 + a1) +
/// (a2 + a3))`, then the scalar tail. Each 16-value conversion of the weights is shared by
/// the `T` tokens.
///
/// The chains are independent sums, so they run `C` at a time (`T * C` accumulators, at most
/// 16 of the 32 registers): with 8 tokens, chains 0 and 1 over the whole row, then 2 and 3.
/// Every chain still adds its products in the single kernel's order, and `a0 + a1` and
/// `a2 + a3` are formed as there, so each result is bit for bit the single kernel's.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
// `c` and `p` index the accumulators, the 16-value offsets and the token pointers at once.
#[allow(clippy::needless_range_loop)]
fn f16_group_512<const T: usize, const C: usize>(
    w: &[half::f16],
    x: &[f32],
    tk: [usize; T],
    out: &mut [f32],
) {
    const { assert!(C == 2 || C == 4) };
    let n = w.len();
    let n64 = n / 64 * 64;
    for &t in &tk {
        assert!(t + n <= x.len(), "f16_group_512: token offset out of range");
    }
    // A plain loop, not `array::from_fn`: its closure was left as a call in the profile.
    let mut px = [x.as_ptr(); T];
    for p in 0..T {
        px[p] = x[tk[p]..].as_ptr();
    }
    let pw = w.as_ptr().cast::<u16>();
    // Per token: `a0 + a1` and `a2 + a3`.
    let mut halves = [[_mm512_setzero_ps(); 2]; T];
    for k0 in (0..4).step_by(C) {
        let mut acc = [[_mm512_setzero_ps(); C]; T];
        for i in (0..n64).step_by(64) {
            for c in 0..C {
                let o = i + 16 * (k0 + c);
                // SAFETY: o + 16 <= n64 <= n; unaligned load.
                let wv = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(pw.add(o).cast())) };
                for p in 0..T {
                    // SAFETY: o + 16 <= n and tk[p] + n <= x.len() (checked above).
                    let xv = unsafe { _mm512_loadu_ps(px[p].add(o)) };
                    acc[p][c] = _mm512_fmadd_ps(wv, xv, acc[p][c]);
                }
            }
        }
        for p in 0..T {
            for c in (0..C).step_by(2) {
                halves[p][(k0 + c) / 2] = _mm512_add_ps(acc[p][c], acc[p][c + 1]);
            }
        }
    }
    for (p, o) in out.iter_mut().enumerate() {
        let s = _mm512_add_ps(halves[p][0], halves[p][1]);
        let mut sum = _mm512_reduce_add_ps(s);
        let xs = &x[tk[p]..tk[p] + n];
        for i in n64..n {
            sum += f16_to_f32(w[i]) * xs[i];
        }
        *o = sum;
    }
}
