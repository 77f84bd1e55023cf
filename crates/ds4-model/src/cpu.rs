//! The CPU implementation of [`Backend`]: plain f32 loops, parallel over rows with rayon.
//!
//! It is the correctness oracle for the GPU backends, so every reduction runs in a fixed,
//! sequential order per output element: a batched `matmul` gives bit-for-bit the same numbers
//! as token-at-a-time calls, which is what makes chunked prefill and decode agree exactly.

use std::ops::Range;

use ds4_tensor::HostTensor;
use ds4_tensor::backend::{Backend, BackendError, BackendResult, Device, HcParams};
use rayon::prelude::*;

/// Work below this many multiply-adds stays on one thread (rayon overhead dominates).
const PAR_MIN_WORK: usize = 1 << 18;

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
#[derive(Clone, Copy, PartialEq, Eq)]
enum Simd {
    Base,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

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

/// One attention head (see [`Backend::attention`]): softmax over `rows` with a sink,
/// weighted sum of the rows into `oh`.
#[inline(always)]
fn attend_head(qh: &[f32], rows: &[&[f32]], sink: f32, scale: f32, oh: &mut [f32]) {
    // Plain loops rather than iterator adapters: an adapter's `fold` is a separate generic
    // function that is not inlined here and so would not get this function's features.
    let mut logits = Vec::with_capacity(rows.len());
    for k in rows {
        logits.push(dot(qh, k) * scale);
    }
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

simd_dispatch!(attend_head_simd, attend_head, (qh: &[f32], rows: &[&[f32]], sink: f32, scale: f32, oh: &mut [f32]));

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

/// The body of [`Backend::hc_post`].
#[inline(always)]
fn hc_post_body(state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], m: usize) {
    let d = o.len();
    let old = state.to_vec();
    for j in 0..m {
        let dst = &mut state[j * d..(j + 1) * d];
        for (k, v) in dst.iter_mut().enumerate() {
            let mut acc = post[j] * o[k];
            for i in 0..m {
                acc += comb[i * m + j] * old[i * d + k];
            }
            *v = acc;
        }
    }
}

simd_dispatch!(hc_post_simd, hc_post_body, (state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], m: usize));

/// Numerically plain `1/sqrt(mean(x^2) + eps)`, accumulating the sum of squares in f64 as
/// ds4's CPU reference does (MODEL.md s6).
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    1.0 / ((ss / x.len() as f64) as f32 + eps).sqrt()
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
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
        let shape_err = |what: String| BackendError::Shape {
            name: w.name.clone(),
            what,
        };
        let row_bytes = w.row_bytes();
        let n_rows_total = w.data().len() / row_bytes.max(1);
        if rows.end > n_rows_total {
            return Err(shape_err(format!("rows {rows:?} out of {n_rows_total}")));
        }
        if x.len() != n_tokens * n_in || y.len() != n_tokens * n_out {
            return Err(shape_err(format!(
                "x {} / y {} values for {n_tokens} tokens of {n_in} -> {n_out}",
                x.len(),
                y.len()
            )));
        }
        let data = &w.data()[rows.start * row_bytes..rows.end * row_bytes];
        // The only weight x activation product of the CPU path: ds4-quant's kernels compute
        // every output with one dot call whatever the batch, so batched prefill and decode
        // give the same bits.
        ds4_quant::gemv::matmul(w.dtype, data, n_out, n_in, x, y).map_err(|e| match e {
            ds4_quant::Error::Unsupported { .. } => BackendError::UnsupportedDType {
                name: w.name.clone(),
                dtype: w.dtype,
            },
            other => shape_err(other.to_string()),
        })?;
        Ok(())
    }

    fn get_row(&self, w: &HostTensor, row: usize, out: &mut [f32]) -> BackendResult<()> {
        ds4_quant::row::tensor_row(w, row, out)
    }

    fn rms_norm(&self, x: &mut [f32], n: usize, w: Option<&[f32]>, eps: f32) {
        for row in x.chunks_mut(n) {
            let s = rms_scale(row, eps);
            match w {
                Some(w) => row.iter_mut().zip(w).for_each(|(v, &wi)| *v = *v * s * wi),
                None => row.iter_mut().for_each(|v| *v *= s),
            }
        }
    }

    fn rope_tail(&self, x: &mut [f32], n: usize, freqs: &[f32], pos: u32, inverse: bool) {
        let n_rot = 2 * freqs.len();
        let p = pos as f32;
        for row in x.chunks_mut(n) {
            let tail = &mut row[n - n_rot..];
            for (i, &f) in freqs.iter().enumerate() {
                let phi = p * f;
                let (s, c) = phi.sin_cos();
                let s = if inverse { -s } else { s };
                let (a, b) = (tail[2 * i], tail[2 * i + 1]);
                tail[2 * i] = a * c - b * s;
                tail[2 * i + 1] = b * c + a * s;
            }
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
        let d = state.len() / m;
        let s = rms_scale(state, p.rms_eps);
        let u: Vec<f32> = state.iter().map(|v| v * s).collect();
        let mut mix = vec![0.0f32; (2 + m) * m];
        self.matmul(p.fn_weight, 0..mix.len(), &u, 1, &mut mix)?;
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
        Ok(())
    }

    fn hc_post(&self, state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], m: usize) {
        hc_post_simd(state, o, post, comb, m);
    }

    /// The trait's body with the tokens of a chunk on the rayon pool: each token runs the
    /// same `hc_pre` as alone, so the numbers do not change (this was a sequential ~5% of a
    /// 2-thread prefill).
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
        x.par_chunks_mut(d)
            .zip(post.par_chunks_mut(m))
            .zip(comb.par_chunks_mut(m * m))
            .zip(states.par_chunks(m * d))
            .try_for_each(|(((x, post), comb), state)| self.hc_pre(p, state, x, post, comb))
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
        let hd = q.len() / n_head;
        // Heads are independent: split them over threads when there is enough work. Each
        // head's arithmetic is the same sequential loop either way.
        let head = |(h, oh): (usize, &mut [f32])| {
            attend_head_simd(&q[h * hd..(h + 1) * hd], rows, sinks[h], scale, oh);
        };
        if n_head * rows.len() * hd >= PAR_MIN_WORK {
            out.par_chunks_mut(hd).enumerate().for_each(head);
        } else {
            out.chunks_mut(hd).enumerate().for_each(head);
        }
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
        let expert = |&(e, route): &(usize, &[(usize, f32)])| {
            self.moe_expert(gate_exps, up_exps, down_exps, e, route, clamp, x)
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
