//! The CPU implementation of [`Backend`]: plain f32 loops, parallel over rows with rayon.
//!
//! It is the correctness oracle for the GPU backends, so every reduction runs in a fixed,
//! sequential order per output element: a batched `matmul` gives bit-for-bit the same numbers
//! as token-at-a-time calls, which is what makes chunked prefill and decode agree exactly.

use std::ops::Range;

use bytemuck::Zeroable;
use ds4_quant::BlockQ8K;
use ds4_tensor::backend::{Backend, BackendError, BackendResult, Device, HcParams};
use ds4_tensor::{DType, HostTensor};
use rayon::prelude::*;

/// Work below this many multiply-adds stays on one thread (rayon overhead dominates).
const PAR_MIN_WORK: usize = 1 << 18;
/// Element-wise operations (norms, RoPE) go to the pool from this many values on, in tasks
/// of about a quarter of it: a decode step's vectors stay on the calling thread.
const PAR_MIN_ELEMS: usize = 1 << 16;

thread_local! {
    /// This thread's reusable scratch buffer (see [`with_scratch`]).
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on `len` values of this thread's reusable scratch buffer, whose contents are
/// unspecified (`f` writes before it reads). A fresh multi-megabyte allocation per call
/// cost page faults and kernel zeroing on every layer of a prefill; the buffer is kept
/// for the thread's life (as large as the largest request, a chunk's HC state).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    ds4_tensor::alloc::with_thread_local(&SCRATCH, |v| {
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// The CPU backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend;

/// Dot product in a fixed order: 16 interleaved partial sums (lane `i` takes elements
/// `i, i + 16, ...`), added pairwise at the end, then the tail. The order does not depend on
/// the batch or the thread, so results stay reproducible bit for bit, and the fixed-width
/// accumulator array lets LLVM keep the partial sums in vector registers (a plain sequential
/// `sum()` cannot be vectorized and made attention a third of the prefill time).
///
/// Dispatches to an AVX-512 or AVX2 version with the same operations lane for lane (one
/// 16-lane or two 8-lane accumulators, the same pairwise fold, the same scalar tail; Rust
/// never contracts a multiply and an add into an FMA), so the bits never depend on the CPU.
/// LLVM's own vectorization of [`dot_generic`] used 8-byte loads even inside AVX-512 code.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match Simd::get() {
        // SAFETY: avx512f was detected at run time.
        Simd::Avx512 => return unsafe { dot_avx512(a, b) },
        // SAFETY: avx2 was detected at run time.
        Simd::Avx2 => return unsafe { dot_avx2(a, b) },
        Simd::Base => {}
    }
    dot_generic(a, b)
}

/// [`dot`] with one 512-bit accumulator (lane `i` = partial sum `i`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,sse3")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let n16 = n / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    for i in (0..n16).step_by(16) {
        // SAFETY: i + 16 <= n16 <= both lengths; unaligned loads.
        let (x, y) = unsafe {
            (
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
            )
        };
        acc = _mm512_add_ps(acc, _mm512_mul_ps(x, y));
    }
    let v8 = _mm256_add_ps(
        _mm512_castps512_ps256(acc),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc))),
    );
    fold8(v8, &a[n16..n], &b[n16..n])
}

/// [`dot`] with two 256-bit accumulators (partial sums 0-7 and 8-15).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,sse3")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let n16 = n / 16 * 16;
    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..n16).step_by(16) {
        // SAFETY: i + 16 <= n16 <= both lengths; unaligned loads.
        unsafe {
            let (pa, pb) = (a.as_ptr().add(i), b.as_ptr().add(i));
            lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(pa), _mm256_loadu_ps(pb)));
            hi = _mm256_add_ps(
                hi,
                _mm256_mul_ps(_mm256_loadu_ps(pa.add(8)), _mm256_loadu_ps(pb.add(8))),
            );
        }
    }
    fold8(_mm256_add_ps(lo, hi), &a[n16..n], &b[n16..n])
}

/// The rest of [`dot_generic`]'s fold from 8 partial sums (`acc[i] += acc[i + w]` for
/// w = 4, 2, 1), then the sequential tail.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,sse3")]
fn fold8(v8: std::arch::x86_64::__m256, ar: &[f32], br: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
    let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
    let v1 = _mm_add_ss(v2, _mm_movehdup_ps(v2));
    let mut s = _mm_cvtss_f32(v1);
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// The portable definition of [`dot`].
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let mut w = L;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    let mut s = acc[0];
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// The vector instruction set the hot f32 loops of this backend are compiled for, detected
/// once. The workspace builds for baseline x86-64 (SSE2), where LLVM vectorizes [`dot`] into
/// 8-byte loads; the same Rust source compiled inside a `#[target_feature]` function uses
/// AVX2 or AVX-512 registers and gives the same bits (element-wise lanes, explicit order,
/// no FMA contraction), so the choice never changes a result.
// Only x86 dispatches on it; elsewhere every loop takes the baseline path.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Simd {
    fn get() -> Simd {
        static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *SIMD.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    return Simd::Avx512;
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    return Simd::Avx2;
                }
            }
            Simd::Base
        })
    }
}

/// Defines `$name(args) -> R`, which runs the `#[inline(always)]` function `$body` compiled
/// for the best [`Simd`] level of this CPU.
macro_rules! simd_dispatch {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                fn v512($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v256($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match Simd::get() {
                    // SAFETY: the features were detected at run time (Simd::get).
                    Simd::Avx512 => return unsafe { v512($($arg),*) },
                    // SAFETY: as above.
                    Simd::Avx2 => return unsafe { v256($($arg),*) },
                    Simd::Base => {}
                }
            }
            $body($($arg),*)
        }
    };
}

/// Four dot products of one row `k` with four query heads (`q4` = `[4, k.len()]`):
/// `[dot(q_0, k), .., dot(q_3, k)]` with [`dot`]'s bits, loading `k` once for all four.
#[inline]
fn dot4(q4: &[f32], k: &[f32]) -> [f32; 4] {
    let hd = k.len();
    #[cfg(target_arch = "x86_64")]
    if Simd::get() == Simd::Avx512 && q4.len() >= 4 * hd {
        // SAFETY: avx512f was detected at run time; q4 holds four rows of hd values.
        return unsafe { dot4_avx512(q4, k) };
    }
    std::array::from_fn(|j| dot(&q4[j * hd..(j + 1) * hd], k))
}

/// [`dot4`] on AVX-512: each head has [`dot_avx512`]'s single accumulator, element order
/// and fold (the multiplication commutes exactly, so `k * q` is `q * k`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,sse3")]
fn dot4_avx512(q4: &[f32], k: &[f32]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = k.len();
    let n16 = n / 16 * 16;
    let q: [&[f32]; 4] = std::array::from_fn(|j| &q4[j * n..(j + 1) * n]);
    let mut acc = [_mm512_setzero_ps(); 4];
    for i in (0..n16).step_by(16) {
        // SAFETY: i + 16 <= n16 <= the length of k and of every q[j]; unaligned loads.
        unsafe {
            let kv = _mm512_loadu_ps(k.as_ptr().add(i));
            for j in 0..4 {
                let qv = _mm512_loadu_ps(q[j].as_ptr().add(i));
                acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(qv, kv));
            }
        }
    }
    std::array::from_fn(|j| {
        let a = acc[j];
        let v8 = _mm256_add_ps(
            _mm512_castps512_ps256(a),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
        );
        fold8(v8, &q[j][n16..n], &k[n16..n])
    })
}

/// The logits pass of [`attend_heads`] on AVX-512: `w[h * nr + u] = dot(q_h, k_u) * scale`
/// in tiles of 4 heads x 4 rows (16 accumulators; each 16-float chunk of q and k is loaded
/// once per tile instead of once per dot), every dot with [`dot_avx512`]'s accumulator,
/// order and fold. Heads and rows left over use [`dot4`] and [`dot`].
///
/// # Safety
/// Needs avx512f; `q` holds `nh * hd` values and every row at least `hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,sse3")]
unsafe fn logits_avx512(
    q: &[f32],
    rows: &[&[f32]],
    nh: usize,
    hd: usize,
    scale: f32,
    w: &mut [f32],
) {
    use std::arch::x86_64::*;
    let nr = rows.len();
    let n16 = hd / 16 * 16;
    let (nh4, nr4) = (nh / 4 * 4, nr / 4 * 4);
    for h0 in (0..nh4).step_by(4) {
        let qh: [&[f32]; 4] = std::array::from_fn(|j| &q[(h0 + j) * hd..(h0 + j + 1) * hd]);
        for u0 in (0..nr4).step_by(4) {
            let kr: [&[f32]; 4] = std::array::from_fn(|r| &rows[u0 + r][..hd]);
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for i in (0..n16).step_by(16) {
                // SAFETY: i + 16 <= n16 <= hd, the length of every slice; unaligned loads.
                unsafe {
                    let kv: [__m512; 4] =
                        std::array::from_fn(|r| _mm512_loadu_ps(kr[r].as_ptr().add(i)));
                    for j in 0..4 {
                        let qv = _mm512_loadu_ps(qh[j].as_ptr().add(i));
                        for r in 0..4 {
                            acc[j][r] = _mm512_add_ps(acc[j][r], _mm512_mul_ps(qv, kv[r]));
                        }
                    }
                }
            }
            for j in 0..4 {
                for r in 0..4 {
                    let a = acc[j][r];
                    let v8 = _mm256_add_ps(
                        _mm512_castps512_ps256(a),
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
                    );
                    let l = fold8(v8, &qh[j][n16..hd], &kr[r][n16..hd]);
                    w[(h0 + j) * nr + u0 + r] = l * scale;
                }
            }
        }
        for u in nr4..nr {
            let l4 = dot4(&q[h0 * hd..(h0 + 4) * hd], &rows[u][..hd]);
            for j in 0..4 {
                w[(h0 + j) * nr + u] = l4[j] * scale;
            }
        }
    }
    for h in nh4..nh {
        for (u, k) in rows.iter().enumerate() {
            w[h * nr + u] = dot(&q[h * hd..(h + 1) * hd], &k[..hd]) * scale;
        }
    }
}

/// The weighted-sum pass of [`attend_heads`] on AVX-512: `out_h = sum_u w[h][u] * k_u`,
/// summed in row order from zero, with a tile of 4 heads x 64 columns kept in registers
/// over all rows (the plain loop loaded and stored `out` for every row). Heads and columns
/// left over run the same sums one value at a time.
///
/// # Safety
/// Needs avx512f; `out` holds `nh * hd` values, `w` `nh * rows.len()`, every row `hd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,sse3")]
unsafe fn wsum_avx512(rows: &[&[f32]], w: &[f32], nh: usize, hd: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let nr = rows.len();
    let (nh4, hd64) = (nh / 4 * 4, hd / 64 * 64);
    for h0 in (0..nh4).step_by(4) {
        for c0 in (0..hd64).step_by(64) {
            let mut acc = [[_mm512_setzero_ps(); 4]; 4];
            for (u, k) in rows.iter().enumerate() {
                // SAFETY: c0 + 64 <= hd <= the row's length; unaligned loads.
                unsafe {
                    let kp = k.as_ptr().add(c0);
                    let kv: [__m512; 4] = std::array::from_fn(|c| _mm512_loadu_ps(kp.add(16 * c)));
                    for j in 0..4 {
                        let wv = _mm512_set1_ps(w[(h0 + j) * nr + u]);
                        for c in 0..4 {
                            acc[j][c] = _mm512_add_ps(acc[j][c], _mm512_mul_ps(wv, kv[c]));
                        }
                    }
                }
            }
            for (j, acc_j) in acc.iter().enumerate() {
                let o = &mut out[(h0 + j) * hd + c0..(h0 + j) * hd + c0 + 64];
                for (c, &a) in acc_j.iter().enumerate() {
                    // SAFETY: 16 * c + 16 <= 64 = o.len(); unaligned store.
                    unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), a) };
                }
            }
        }
    }
    // Leftover heads (all columns) and columns (of the tiled heads), value by value.
    for h in 0..nh {
        let cols = if h < nh4 { hd64..hd } else { 0..hd };
        for col in cols {
            let mut acc = 0.0f32;
            for (u, k) in rows.iter().enumerate() {
                acc += w[h * nr + u] * k[col];
            }
            out[h * hd + col] = acc;
        }
    }
}

/// Attention of the heads `q` (`[nh, hd]`, `nh = sinks.len()`) of one query over shared
/// K=V `rows` (see [`Backend::attention`]), heads innermost: every row is read once and
/// used by all heads, instead of once per head. `w` is scratch for the `[nh, rows]` weights.
///
/// Each head computes what a head-by-head loop computes, in the same order: the logits
/// `dot(q_h, k_u) * scale`, the max starting from the sink, `den = exp(sink - max)` plus the
/// weights `exp(l_u - max)` in row order, the weighted sum of the rows in row order from
/// zero, then the division. So the bits do not depend on how heads or queries are grouped.
#[inline(always)]
fn attend_heads(
    q: &[f32],
    rows: &[&[f32]],
    sinks: &[f32],
    scale: f32,
    out: &mut [f32],
    w: &mut Vec<f32>,
) {
    let nh = sinks.len();
    let hd = q.len() / nh.max(1);
    let nr = rows.len();
    w.clear();
    w.resize(nh * nr, 0.0);
    #[cfg(target_arch = "x86_64")]
    let tiled = Simd::get() == Simd::Avx512 && rows.iter().all(|k| k.len() >= hd);
    #[cfg(not(target_arch = "x86_64"))]
    let tiled = false;
    if tiled {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: avx512f was detected at run time; every row holds hd values.
        unsafe {
            logits_avx512(q, rows, nh, hd, scale, w)
        };
    } else {
        // Plain loops rather than iterator adapters: an adapter's `fold` is a separate
        // generic function that is not inlined here and so would not get this function's
        // features.
        for (u, k) in rows.iter().enumerate() {
            let k = &k[..hd];
            let mut h = 0;
            while h + 4 <= nh {
                let l4 = dot4(&q[h * hd..(h + 4) * hd], k);
                for j in 0..4 {
                    w[(h + j) * nr + u] = l4[j] * scale;
                }
                h += 4;
            }
            while h < nh {
                w[h * nr + u] = dot(&q[h * hd..(h + 1) * hd], k) * scale;
                h += 1;
            }
        }
    }
    let mut den = [0.0f32; 64];
    let mut den_big = Vec::new();
    let den: &mut [f32] = if nh <= den.len() {
        &mut den[..nh]
    } else {
        den_big.resize(nh, 0.0);
        &mut den_big
    };
    for h in 0..nh {
        let wh = &mut w[h * nr..(h + 1) * nr];
        let mut mx = sinks[h];
        for &l in wh.iter() {
            mx = mx.max(l);
        }
        let mut dh = (sinks[h] - mx).exp();
        for l in wh.iter_mut() {
            *l = (*l - mx).exp();
            dh += *l;
        }
        den[h] = dh;
    }
    if tiled {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        unsafe {
            wsum_avx512(rows, w, nh, hd, out)
        };
    } else {
        out.fill(0.0);
        for (u, k) in rows.iter().enumerate() {
            let k = &k[..hd];
            for h in 0..nh {
                let wu = w[h * nr + u];
                for (o, &kv) in out[h * hd..(h + 1) * hd].iter_mut().zip(k) {
                    *o += wu * kv;
                }
            }
        }
    }
    for h in 0..nh {
        let dh = den[h];
        out[h * hd..(h + 1) * hd].iter_mut().for_each(|o| *o /= dh);
    }
}

simd_dispatch!(attend_heads_simd, attend_heads, (q: &[f32], rows: &[&[f32]], sinks: &[f32], scale: f32, out: &mut [f32], w: &mut Vec<f32>));

/// One indexer score (see [`Backend::indexer_scores`]).
#[inline(always)]
fn index_score(q: &[f32], weights: &[f32], k: &[f32]) -> f32 {
    let di = k.len();
    // `Iterator::sum` of f32 starts from -0.0; kept so the bits match the earlier
    // `map(..).sum()`, written as a loop so that it inlines (see `attend_head`).
    let mut s = -0.0f32;
    for (h, &wh) in weights.iter().enumerate() {
        s += wh * dot(&q[h * di..(h + 1) * di], k).max(0.0);
    }
    s
}

simd_dispatch!(index_score_simd, index_score, (q: &[f32], weights: &[f32], k: &[f32]) -> f32);

/// The body of [`Backend::hc_post`]. Each output value is `post[j] * o[k]` plus
/// `comb[i][j] * old[i][k]` for `i = 0, 1, ..` in that order; the loops run over `k`
/// innermost so that they vectorize, which does not change the order of any sum.
///
/// Columns go in blocks of [`HC_BLOCK`]: the old values of a block are copied to the stack
/// before the block is overwritten (a copy of the whole state per token was a large part
/// of this function's memory traffic).
#[inline(always)]
fn hc_post_body(state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], m: usize) {
    let d = o.len();
    let mut buf = [0.0f32; HC_BLOCK * 16];
    let mut heap = Vec::new();
    let old: &mut [f32] = if m <= 16 {
        &mut buf[..m * HC_BLOCK]
    } else {
        heap.resize(m * HC_BLOCK, 0.0);
        &mut heap
    };
    for k0 in (0..d).step_by(HC_BLOCK) {
        let bw = HC_BLOCK.min(d - k0);
        for i in 0..m {
            old[i * HC_BLOCK..i * HC_BLOCK + bw]
                .copy_from_slice(&state[i * d + k0..i * d + k0 + bw]);
        }
        for j in 0..m {
            let dst = &mut state[j * d + k0..j * d + k0 + bw];
            let pj = post[j];
            for (v, &ok) in dst.iter_mut().zip(&o[k0..k0 + bw]) {
                *v = pj * ok;
            }
            for i in 0..m {
                let c = comb[i * m + j];
                for (v, &ov) in dst.iter_mut().zip(&old[i * HC_BLOCK..i * HC_BLOCK + bw]) {
                    *v += c * ov;
                }
            }
        }
    }
}

/// Columns per block of [`hc_post_body`].
const HC_BLOCK: usize = 256;

simd_dispatch!(hc_post_simd, hc_post_body, (state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], m: usize));

/// Numerically plain `1/sqrt(mean(x^2) + eps)`, accumulating the sum of squares in f64 as
/// ds4's CPU reference does (MODEL.md s6).
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    scale_of(ss, x.len(), eps)
}

/// `1/sqrt(mean + eps)` from a sum of squares of `n` values.
#[inline(always)]
fn scale_of(ss: f64, n: usize, eps: f32) -> f32 {
    1.0 / ((ss / n as f64) as f32 + eps).sqrt()
}

/// Rows whose sums of squares [`rms_scales`] runs together.
const RMS_ROWS: usize = 8;

/// [`rms_scale`] of each `n`-wide row of `x` (at most [`RMS_ROWS`] rows) into `scales`.
/// Each row's f64 sum still adds its squares one at a time in element order, so the bits
/// are [`rms_scale`]'s; running the rows' sums side by side lets eight independent chains
/// fill the pipeline, where one sum waits an add latency per element (this was ~4% of a
/// prefill).
#[inline(always)]
fn rms_scales(x: &[f32], n: usize, eps: f32, scales: &mut [f32]) {
    let g = x.len() / n.max(1);
    if g == RMS_ROWS && n > 0 {
        let rows: [&[f32]; RMS_ROWS] = std::array::from_fn(|r| &x[r * n..(r + 1) * n]);
        // A sum of squares never sees -0.0 (a square is +0.0 at least), so starting from
        // +0.0 gives `Iterator::sum`'s bits whatever its start value.
        let mut ss = [0.0f64; RMS_ROWS];
        // One element index across all rows per step (so not an iterator over one row).
        #[allow(clippy::needless_range_loop)]
        for i in 0..n {
            for r in 0..RMS_ROWS {
                let v = rows[r][i] as f64;
                ss[r] += v * v;
            }
        }
        for (s, &v) in scales.iter_mut().zip(&ss) {
            *s = scale_of(v, n, eps);
        }
    } else {
        for (s, row) in scales.iter_mut().zip(x.chunks(n.max(1))) {
            *s = rms_scale(row, eps);
        }
    }
}

simd_dispatch!(rms_scales_simd, rms_scales, (x: &[f32], n: usize, eps: f32, scales: &mut [f32]));

/// [`Backend::rope_tail`] of every `n`-wide row of `x` at one position: the angles' sines
/// and cosines are computed once for all rows (the same values a per-row loop computes).
#[inline(always)]
fn rope_rows_body(x: &mut [f32], n: usize, freqs: &[f32], pos: u32, inverse: bool) {
    let n_rot = 2 * freqs.len();
    let p = pos as f32;
    let mut buf = [(0.0f32, 0.0f32); 64];
    let mut big = Vec::new();
    let sc: &mut [(f32, f32)] = if freqs.len() <= buf.len() {
        &mut buf[..freqs.len()]
    } else {
        big.resize(freqs.len(), (0.0, 0.0));
        &mut big
    };
    for (o, &f) in sc.iter_mut().zip(freqs) {
        let (s, c) = (p * f).sin_cos();
        *o = (if inverse { -s } else { s }, c);
    }
    for row in x.chunks_mut(n.max(1)) {
        let tail = &mut row[n - n_rot..];
        for (i, &(s, c)) in sc.iter().enumerate() {
            let (a, b) = (tail[2 * i], tail[2 * i + 1]);
            tail[2 * i] = a * c - b * s;
            tail[2 * i + 1] = b * c + a * s;
        }
    }
}

simd_dispatch!(rope_rows, rope_rows_body, (x: &mut [f32], n: usize, freqs: &[f32], pos: u32, inverse: bool));

/// HCPre's flatten norm: `u = state / rms(state)` (MODEL.md s3.4).
fn hc_flatten_norm(state: &[f32], eps: f32, u: &mut [f32]) {
    let s = rms_scale(state, eps);
    u.iter_mut().zip(state).for_each(|(u, &v)| *u = v * s);
}

/// The rest of HCPre for one token from its mixing logits `mix` (`[(2+m)*m]`): `pre`,
/// `post`, the Sinkhorn-normalised `comb`, and the mixed input `x`.
fn hc_mix(
    p: &HcParams<'_>,
    mix: &[f32],
    state: &[f32],
    x: &mut [f32],
    post: &mut [f32],
    comb: &mut [f32],
) {
    let m = p.n_hc;
    let d = state.len() / m;
    let mut pre = vec![0.0f32; m];
    for i in 0..m {
        pre[i] = sigmoid(mix[i] * p.scale[0] + p.base[i]) + p.hc_eps;
        post[i] = 2.0 * sigmoid(mix[m + i] * p.scale[1] + p.base[m + i]);
    }
    for i in 0..m {
        let row = &mut comb[i * m..(i + 1) * m];
        for j in 0..m {
            row[j] = mix[2 * m + i * m + j] * p.scale[2] + p.base[2 * m + i * m + j];
        }
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        row.iter_mut().for_each(|v| *v = (*v - mx).exp());
        let sum: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v = *v / sum + p.hc_eps);
    }
    sinkhorn_columns(comb, m, p.hc_eps);
    for _ in 1..p.n_sinkhorn_iter {
        for i in 0..m {
            let row = &mut comb[i * m..(i + 1) * m];
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum + p.hc_eps);
        }
        sinkhorn_columns(comb, m, p.hc_eps);
    }
    x.fill(0.0);
    for i in 0..m {
        let stream = &state[i * d..(i + 1) * d];
        x.iter_mut()
            .zip(stream)
            .for_each(|(xo, &sv)| *xo += pre[i] * sv);
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl CpuBackend {
    /// [`Backend::moe_expert`] from activations already quantized to Q8_K (`xq`, `[n,
    /// d / 256]` blocks): the gate and up products read the gathered blocks of the routed
    /// tokens, which are the blocks `matmul` would have made from their f32 rows.
    #[allow(clippy::too_many_arguments)]
    fn moe_expert_q8k(
        &self,
        gate_exps: &HostTensor,
        up_exps: &HostTensor,
        down_exps: &HostTensor,
        e: usize,
        route: &[(usize, f32)],
        clamp: f32,
        xq: &[BlockQ8K],
    ) -> BackendResult<Vec<f32>> {
        let d = gate_exps.shape.ne(0) as usize;
        let f = gate_exps.shape.ne(1) as usize;
        let bpt = d / ds4_quant::QK_K;
        let m = route.len();
        let mut xe = Vec::with_capacity(m * bpt);
        for &(t, _) in route {
            xe.extend_from_slice(&xq[t * bpt..(t + 1) * bpt]);
        }
        let (mut g, mut u) = (vec![0.0f32; m * f], vec![0.0f32; m * f]);
        for (w, y) in [(gate_exps, &mut g), (up_exps, &mut u)] {
            let data = weight_rows(w, e * f..(e + 1) * f)?;
            ds4_quant::gemv::matmul_q8k(w.dtype, data, f, d, &xe, y)
                .map_err(|err| quant_err(w, err))?;
        }
        ds4_tensor::backend::expert_swiglu_down(self, down_exps, e, route, clamp, g, &u)
    }
}

/// The bytes of rows `rows` of a weight's 2-D view, or a shape error naming it.
fn weight_rows(w: &HostTensor, rows: Range<usize>) -> BackendResult<&[u8]> {
    let row_bytes = w.row_bytes();
    let n_rows_total = w.data().len() / row_bytes.max(1);
    if rows.end > n_rows_total {
        return Err(BackendError::Shape {
            name: w.name.clone(),
            what: format!("rows {rows:?} out of {n_rows_total}"),
        });
    }
    Ok(&w.data()[rows.start * row_bytes..rows.end * row_bytes])
}

/// A kernel error of `ds4-quant` as a backend error naming the weight.
fn quant_err(w: &HostTensor, e: ds4_quant::Error) -> BackendError {
    match e {
        ds4_quant::Error::Unsupported { .. } => BackendError::UnsupportedDType {
            name: w.name.clone(),
            dtype: w.dtype,
        },
        other => BackendError::Shape {
            name: w.name.clone(),
            what: other.to_string(),
        },
    }
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn matmul(
        &self,
        w: &HostTensor,
        rows: Range<usize>,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> BackendResult<()> {
        let n_in = w.shape.ne(0) as usize;
        let n_out = rows.len();
        if x.len() != n_tokens * n_in || y.len() != n_tokens * n_out {
            return Err(BackendError::Shape {
                name: w.name.clone(),
                what: format!(
                    "x {} / y {} values for {n_tokens} tokens of {n_in} -> {n_out}",
                    x.len(),
                    y.len()
                ),
            });
        }
        let data = weight_rows(w, rows)?;
        // The only weight x activation product of the CPU path: ds4-quant's kernels compute
        // every output with one dot call whatever the batch, so batched prefill and decode
        // give the same bits.
        ds4_quant::gemv::matmul(w.dtype, data, n_out, n_in, x, y).map_err(|e| quant_err(w, e))
    }

    fn get_row(&self, w: &HostTensor, row: usize, out: &mut [f32]) -> BackendResult<()> {
        ds4_quant::row::tensor_row(w, row, out)
    }

    fn rms_norm(&self, x: &mut [f32], n: usize, w: Option<&[f32]>, eps: f32) {
        if n == 0 {
            return;
        }
        // Groups of rows: their sums of squares run side by side (see `rms_scales`).
        let norm = |rows: &mut [f32]| {
            let mut scales = [0.0f32; RMS_ROWS];
            let scales = &mut scales[..rows.len() / n];
            rms_scales_simd(rows, n, eps, scales);
            for (row, &s) in rows.chunks_mut(n).zip(scales.iter()) {
                match w {
                    Some(w) => row.iter_mut().zip(w).for_each(|(v, &wi)| *v = *v * s * wi),
                    None => row.iter_mut().for_each(|v| *v *= s),
                }
            }
        };
        // Rows are independent: a chunk's rows go to the pool (same numbers per row).
        if x.len() >= PAR_MIN_ELEMS {
            x.par_chunks_mut(RMS_ROWS * n)
                .with_min_len(PAR_MIN_ELEMS.div_ceil(4 * RMS_ROWS * n))
                .for_each(norm);
        } else {
            x.chunks_mut(RMS_ROWS * n).for_each(norm);
        }
    }

    fn rope_tail(&self, x: &mut [f32], n: usize, freqs: &[f32], pos: u32, inverse: bool) {
        rope_rows(x, n, freqs, pos, inverse);
    }

    /// The tokens go to the pool when the chunk is large enough (same numbers per token).
    fn rope_tail_tokens(
        &self,
        x: &mut [f32],
        n_tok: usize,
        n: usize,
        freqs: &[f32],
        pos0: usize,
        inverse: bool,
    ) {
        if n_tok == 0 {
            return;
        }
        let tok_width = x.len() / n_tok;
        let one = |(t, xt): (usize, &mut [f32])| {
            rope_rows(xt, n, freqs, (pos0 + t) as u32, inverse);
        };
        if x.len() >= PAR_MIN_ELEMS {
            x.par_chunks_mut(tok_width)
                .enumerate()
                .with_min_len(PAR_MIN_ELEMS.div_ceil(4 * tok_width))
                .for_each(one);
        } else {
            x.chunks_mut(tok_width).enumerate().for_each(one);
        }
    }

    fn hc_pre(
        &self,
        p: &HcParams<'_>,
        state: &[f32],
        x: &mut [f32],
        post: &mut [f32],
        comb: &mut [f32],
    ) -> BackendResult<()> {
        let m = p.n_hc;
        let mut u = vec![0.0f32; state.len()];
        hc_flatten_norm(state, p.rms_eps, &mut u);
        let mut mix = vec![0.0f32; (2 + m) * m];
        self.matmul(p.fn_weight, 0..mix.len(), &u, 1, &mut mix)?;
        hc_mix(p, &mix, state, x, post, comb);
        Ok(())
    }

    fn hc_post(&self, state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], m: usize) {
        hc_post_simd(state, o, post, comb, m);
    }

    /// [`Backend::hc_pre`] with the tokens of a chunk on the rayon pool and one batched
    /// `matmul` for the mixing logits of all tokens (the multi-token kernels give each
    /// token the single-token bits), so each token gets the same numbers as alone.
    fn hc_pre_batch(
        &self,
        p: &HcParams<'_>,
        states: &[f32],
        n: usize,
        x: &mut [f32],
        post: &mut [f32],
        comb: &mut [f32],
    ) -> BackendResult<()> {
        let m = p.n_hc;
        if n == 0 {
            return Ok(());
        }
        let d = x.len() / n;
        let md = m * d;
        let n_mix = (2 + m) * m;
        let mut mix = vec![0.0f32; n * n_mix];
        with_scratch(n * md, |u| {
            // Groups of tokens: their flatten norms' sums run side by side (`rms_scales`).
            u.par_chunks_mut(RMS_ROWS * md)
                .zip(states.par_chunks(RMS_ROWS * md))
                .for_each(|(u, states)| {
                    let mut scales = [0.0f32; RMS_ROWS];
                    let scales = &mut scales[..states.len() / md];
                    rms_scales_simd(states, md, p.rms_eps, scales);
                    for ((u, state), &s) in u.chunks_mut(md).zip(states.chunks(md)).zip(&*scales) {
                        u.iter_mut().zip(state).for_each(|(u, &v)| *u = v * s);
                    }
                });
            self.matmul(p.fn_weight, 0..n_mix, u, n, &mut mix)
        })?;
        x.par_chunks_mut(d)
            .zip(post.par_chunks_mut(m))
            .zip(comb.par_chunks_mut(m * m))
            .zip(states.par_chunks(md))
            .zip(mix.par_chunks(n_mix))
            .for_each(|((((x, post), comb), state), mix)| hc_mix(p, mix, state, x, post, comb));
        Ok(())
    }

    /// The trait's body with the tokens of a chunk on the rayon pool (same numbers).
    fn hc_post_batch(
        &self,
        states: &mut [f32],
        o: &[f32],
        post: &[f32],
        comb: &[f32],
        n_hc: usize,
        n: usize,
    ) {
        let m = n_hc;
        if n == 0 {
            return;
        }
        let d = o.len() / n;
        states
            .par_chunks_mut(m * d)
            .zip(o.par_chunks(d))
            .zip(post.par_chunks(m))
            .zip(comb.par_chunks(m * m))
            .for_each(|(((state, o), post), comb)| hc_post_simd(state, o, post, comb, m));
    }

    fn attention(&self, q: &[f32], rows: &[&[f32]], sinks: &[f32], scale: f32, out: &mut [f32]) {
        let n_head = sinks.len();
        let hd = q.len() / n_head.max(1);
        // Heads are independent: with enough work, split them into one group per thread
        // (each group reads every row once). The grouping does not change a bit.
        let threads = rayon::current_num_threads();
        if threads > 1 && n_head > 1 && n_head * rows.len() * hd >= PAR_MIN_WORK {
            // At least 4 heads per group, the width of the kernels' head tiles.
            let per = n_head.div_ceil(threads).max(4);
            out.par_chunks_mut(per * hd)
                .zip(q.par_chunks(per * hd))
                .zip(sinks.par_chunks(per))
                .for_each_init(Vec::new, |w, ((oh, qh), sh)| {
                    attend_heads_simd(qh, rows, sh, scale, oh, w)
                });
        } else {
            attend_heads_simd(q, rows, sinks, scale, out, &mut Vec::new());
        }
    }

    /// One rayon task per query (a decode-sized call keeps [`Backend::attention`]'s split
    /// over heads): the queries of a prefill chunk are independent once the state they
    /// read is fixed, and each is computed exactly as alone.
    fn attention_tokens<'r>(
        &self,
        q: &[f32],
        n_tok: usize,
        rows_of: &(dyn Fn(usize, &mut Vec<&'r [f32]>) + Sync),
        sinks: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        if n_tok == 0 {
            return;
        }
        let width = q.len() / n_tok;
        if n_tok < rayon::current_num_threads() {
            let mut rows = Vec::new();
            for t in 0..n_tok {
                rows.clear();
                rows_of(t, &mut rows);
                let span = t * width..(t + 1) * width;
                self.attention(&q[span.clone()], &rows, sinks, scale, &mut out[span]);
            }
            return;
        }
        out.par_chunks_mut(width)
            .zip(q.par_chunks(width))
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(rows, w), (t, (ot, qt))| {
                    rows.clear();
                    rows_of(t, rows);
                    attend_heads_simd(qt, rows, sinks, scale, ot, w);
                },
            );
    }

    fn indexer_scores(&self, q: &[f32], weights: &[f32], rows: &[f32], scores: &mut [f32]) {
        let n_head = weights.len();
        let di = q.len() / n_head;
        let score = |(b, out): (usize, &mut f32)| {
            let k = &rows[b * di..(b + 1) * di];
            *out = index_score_simd(q, weights, k);
        };
        // Rows are independent (1M context: 262k rows x 64 heads x 128 dims per query).
        if scores.len() * q.len() >= PAR_MIN_WORK {
            scores.par_iter_mut().enumerate().for_each(score);
        } else {
            scores.iter_mut().enumerate().for_each(score);
        }
    }

    /// The trait's body, with the experts computed in parallel: one expert's gate/up/down
    /// slabs are too small (tens of KiB in IQ2_XXS) for `matmul` to split them over threads,
    /// so a decode step ran its 6 experts one after another on one core. Each expert's output
    /// is computed exactly as before and the outputs are added to `y` in ascending expert
    /// order afterwards, so the numbers are bit-identical to the sequential body.
    fn moe_routed(
        &self,
        gate_exps: &HostTensor,
        up_exps: &HostTensor,
        down_exps: &HostTensor,
        routes: &[Vec<(usize, f32)>],
        clamp: f32,
        x: &[f32],
        y: &mut [f32],
    ) -> BackendResult<()> {
        let d = gate_exps.shape.ne(0) as usize;
        let active: Vec<(usize, &[(usize, f32)])> = routes
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(e, r)| (e, r.as_slice()))
            .collect();
        // Gate and up read the same Q8_K activations: quantize each token once here rather
        // than twice per selected expert inside `matmul` (the same blocks, so the same bits).
        let q8k = ds4_quant::gemv::activation_dtype(gate_exps.dtype) == Some(DType::Q8K)
            && up_exps.dtype == gate_exps.dtype
            && d > 0
            && d.is_multiple_of(ds4_quant::QK_K)
            && x.len().is_multiple_of(d);
        let xq: Vec<BlockQ8K> = if q8k {
            let bpt = d / ds4_quant::QK_K;
            let mut xq = vec![BlockQ8K::zeroed(); x.len() / ds4_quant::QK_K];
            xq.par_chunks_mut(bpt)
                .zip(x.par_chunks(d))
                .for_each(|(q, xt)| ds4_quant::simd::quantize_q8k(xt, q));
            xq
        } else {
            Vec::new()
        };
        let expert = |&(e, route): &(usize, &[(usize, f32)])| {
            if q8k {
                self.moe_expert_q8k(gate_exps, up_exps, down_exps, e, route, clamp, &xq)
            } else {
                self.moe_expert(gate_exps, up_exps, down_exps, e, route, clamp, x)
            }
        };
        let outs: Vec<BackendResult<Vec<f32>>> = active.par_iter().map(expert).collect();
        for (&(_, route), ye) in active.iter().zip(outs) {
            ds4_tensor::backend::add_expert_rows(y, &ye?, route, d);
        }
        Ok(())
    }

    fn swiglu(&self, gate: &mut [f32], up: &[f32], clamp: f32, weight: f32) {
        for (g, &u) in gate.iter_mut().zip(up) {
            let (gv, uv) = if clamp > 1e-6 {
                (g.min(clamp), u.clamp(-clamp, clamp))
            } else {
                (*g, u)
            };
            *g = gv * sigmoid(gv) * uv * weight;
        }
    }
}

/// One Sinkhorn column normalisation: `C[:, j] /= sum_i C[i][j] + eps`.
fn sinkhorn_columns(c: &mut [f32], m: usize, eps: f32) {
    for j in 0..m {
        let sum: f32 = (0..m).map(|i| c[i * m + j]).sum();
        for i in 0..m {
            c[i * m + j] /= sum + eps;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_is_doubly_stochastic() {
        let fn_w = HostTensor::from_f32(
            "fn",
            &[24, 8],
            &(0..24 * 8)
                .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
                .collect::<Vec<_>>(),
        );
        let base: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = HcParams {
            fn_weight: &fn_w,
            scale: &[0.5, 0.7, 1.3],
            base: &base,
            n_hc: 4,
            n_sinkhorn_iter: 20,
            hc_eps: 1e-6,
            rms_eps: 1e-6,
        };
        let state: Vec<f32> = (0..8).map(|i| i as f32 - 3.0).collect();
        let (mut x, mut post, mut comb) = (vec![0.0; 2], vec![0.0; 4], vec![0.0; 16]);
        CpuBackend
            .hc_pre(&p, &state, &mut x, &mut post, &mut comb)
            .expect("f32 matmul");
        for i in 0..4 {
            let row: f32 = comb[i * 4..i * 4 + 4].iter().sum();
            let col: f32 = (0..4).map(|r| comb[r * 4 + i]).sum();
            assert!((row - 1.0).abs() < 1e-3, "row {i}: {row}");
            assert!((col - 1.0).abs() < 1e-4, "col {i}: {col}");
        }
        assert!(post.iter().all(|&v| (0.0..=2.0).contains(&v)));
    }

    /// The AVX-512 / AVX2 dots (whichever this CPU runs) give `dot_generic`'s bits.
    #[test]
    fn dot_dispatch_is_bit_identical() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        for n in 0..300 {
            let a: Vec<f32> = (0..n).map(|_| next() * 3.0).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            assert_eq!(
                dot(&a, &b).to_bits(),
                dot_generic(&a, &b).to_bits(),
                "n = {n}"
            );
        }
    }

    /// A small deterministic generator of values in [-1, 1).
    fn values(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// The head-by-head definition the heads-inner kernels must reproduce bit for bit.
    fn attend_head_reference(qh: &[f32], rows: &[&[f32]], sink: f32, scale: f32, oh: &mut [f32]) {
        let logits: Vec<f32> = rows.iter().map(|k| dot_generic(qh, k) * scale).collect();
        let mx = logits.iter().fold(sink, |a, &b| a.max(b));
        let mut den = (sink - mx).exp();
        oh.fill(0.0);
        for (l, k) in logits.iter().zip(rows) {
            let w = (l - mx).exp();
            den += w;
            oh.iter_mut()
                .zip(k.iter())
                .for_each(|(o, &kv)| *o += w * kv);
        }
        oh.iter_mut().for_each(|o| *o /= den);
    }

    /// Every head grouping, tile leftover and query batching gives the reference's bits.
    #[test]
    fn attention_heads_inner_is_bit_identical() {
        let mut next = values(0x1234_5678);
        for &(nh, hd, nr) in &[
            (16, 256, 37),
            (16, 256, 0),
            (5, 80, 9),
            (4, 64, 4),
            (3, 20, 5),
            (8, 128, 130),
            (1, 16, 1),
        ] {
            let n_tok = 3;
            let q: Vec<f32> = (0..n_tok * nh * hd).map(|_| next() * 2.0).collect();
            let kv: Vec<f32> = (0..(nr + n_tok) * hd).map(|_| next()).collect();
            let sinks: Vec<f32> = (0..nh).map(|_| next()).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            // Query t sees rows t..t + nr (so that the queries differ).
            let rows_of = |t: usize| -> Vec<&[f32]> {
                (t..t + nr).map(|u| &kv[u * hd..(u + 1) * hd]).collect()
            };
            let mut want = vec![0.0f32; n_tok * nh * hd];
            for t in 0..n_tok {
                let rows = rows_of(t);
                for (h, &sink) in sinks.iter().enumerate() {
                    let o = (t * nh + h) * hd;
                    attend_head_reference(&q[o..o + hd], &rows, sink, scale, &mut want[o..o + hd]);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            // One query at a time (decode), then a chunk, on one and on two threads.
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                pool.install(|| {
                    let mut got = vec![0.0f32; n_tok * nh * hd];
                    for t in 0..n_tok {
                        let span = t * nh * hd..(t + 1) * nh * hd;
                        CpuBackend.attention(
                            &q[span.clone()],
                            &rows_of(t),
                            &sinks,
                            scale,
                            &mut got[span],
                        );
                    }
                    assert_eq!(bits(&got), bits(&want), "attention {nh}x{hd}, {nr} rows");
                    let mut got = vec![0.0f32; n_tok * nh * hd];
                    fn typed<'r, F: Fn(usize, &mut Vec<&'r [f32]>) + Sync>(f: F) -> F {
                        f
                    }
                    let rows_fn = typed(|t, rows| rows.extend(rows_of(t)));
                    CpuBackend.attention_tokens(&q, n_tok, &rows_fn, &sinks, scale, &mut got);
                    assert_eq!(bits(&got), bits(&want), "tokens {nh}x{hd}, {nr} rows");
                });
            }
        }
    }

    /// The batched HC pre/post and RoPE give each token the bits of the one-token calls.
    #[test]
    fn batched_hc_and_rope_match_one_token_calls() {
        let mut next = values(0xDEAD_BEEF);
        let (m, d, n) = (4usize, 64usize, 19usize);
        let fn_w: Vec<f32> = (0..(2 + m) * m * m * d).map(|_| next() * 0.1).collect();
        let fn_w = HostTensor::from_f32("fn", &[((2 + m) * m) as u64, (m * d) as u64], &fn_w);
        let base: Vec<f32> = (0..(2 + m) * m).map(|_| next()).collect();
        let p = HcParams {
            fn_weight: &fn_w,
            scale: &[0.5, 0.7, 1.3],
            base: &base,
            n_hc: m,
            n_sinkhorn_iter: 20,
            hc_eps: 1e-6,
            rms_eps: 1e-6,
        };
        let states: Vec<f32> = (0..n * m * d).map(|_| next() * 3.0).collect();
        let (mut x, mut post, mut comb) =
            (vec![0.0; n * d], vec![0.0; n * m], vec![0.0; n * m * m]);
        CpuBackend
            .hc_pre_batch(&p, &states, n, &mut x, &mut post, &mut comb)
            .expect("f32 matmul");
        let o: Vec<f32> = (0..n * d).map(|_| next()).collect();
        let mut hc = states.clone();
        CpuBackend.hc_post_batch(&mut hc, &o, &post, &comb, m, n);
        let freqs = [1.0f32, 0.3, 0.01];
        let mut roped = states.clone();
        CpuBackend.rope_tail_tokens(&mut roped, n, d, &freqs, 17, false);
        for t in 0..n {
            let st = &states[t * m * d..(t + 1) * m * d];
            let (mut x1, mut post1, mut comb1) = (vec![0.0; d], vec![0.0; m], vec![0.0; m * m]);
            CpuBackend
                .hc_pre(&p, st, &mut x1, &mut post1, &mut comb1)
                .expect("f32 matmul");
            assert_eq!(x1, x[t * d..(t + 1) * d]);
            assert_eq!(post1, post[t * m..(t + 1) * m]);
            assert_eq!(comb1, comb[t * m * m..(t + 1) * m * m]);
            // hc_post against its definition, value by value.
            for j in 0..m {
                for k in 0..d {
                    let mut acc = post1[j] * o[t * d + k];
                    for i in 0..m {
                        acc += comb1[i * m + j] * st[i * d + k];
                    }
                    assert_eq!(acc.to_bits(), hc[t * m * d + j * d + k].to_bits());
                }
            }
            let mut r1 = st.to_vec();
            for row in r1.chunks_mut(d) {
                CpuBackend.rope_tail(row, d, &freqs, 17 + t as u32, false);
            }
            assert_eq!(r1, roped[t * m * d..(t + 1) * m * d]);
        }
    }

    /// Grouped and parallel RMSNorm gives each row the bits of the one-row definition.
    #[test]
    fn rms_norm_groups_match_one_row() {
        let mut next = values(0x5EED);
        for &(rows, n) in &[(19usize, 37usize), (8, 4096), (3, 5), (2000, 64)] {
            let x: Vec<f32> = (0..rows * n).map(|_| next() * 4.0).collect();
            let w: Vec<f32> = (0..n).map(|_| next()).collect();
            let mut got = x.clone();
            CpuBackend.rms_norm(&mut got, n, Some(&w), 1e-6);
            for (r, row) in x.chunks(n).enumerate() {
                let s = rms_scale(row, 1e-6);
                for (i, (&v, &wi)) in row.iter().zip(&w).enumerate() {
                    assert_eq!(
                        (v * s * wi).to_bits(),
                        got[r * n + i].to_bits(),
                        "{rows}x{n}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_then_inverse_is_identity() {
        let freqs = [1.0f32, 0.1];
        let orig = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut x = orig;
        CpuBackend.rope_tail(&mut x, 6, &freqs, 7, false);
        assert_eq!(&x[..2], &orig[..2]);
        assert!((x[2] - (3.0 * 7f32.cos() - 4.0 * 7f32.sin())).abs() < 1e-6);
        CpuBackend.rope_tail(&mut x, 6, &freqs, 7, true);
        for (a, b) in x.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn attention_sink_takes_probability_mass() {
        // One head of dim 1, one row: weight = e^l / (e^l + e^sink).
        let (q, k) = ([2.0f32], [3.0f32]);
        let mut out = [0.0f32];
        CpuBackend.attention(&q, &[&k], &[0.0], 1.0, &mut out);
        let w = 6f32.exp() / (6f32.exp() + 1.0);
        assert!((out[0] - 3.0 * w).abs() < 1e-6);
    }
}
