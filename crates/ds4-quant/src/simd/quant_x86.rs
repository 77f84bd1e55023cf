//! AVX-512 activation quantizers: the same bytes as the scalar [`crate::q8_0::quantize`]
//! and [`crate::q8_k::quantize`], sixteen values per instruction.
//!
//! Every matrix product quantizes its activations first, once per token; scalar, that was
//! ~7% of prefill (the `roundf` of Q8_0 is a libm call per value). The arithmetic here is the
//! scalar one value for value: the same f32 products, the same scalar scale computations,
//! and roundings that are exact equivalents (`roundf` = truncate, then step away from zero
//! when the exact remainder is at least 1/2; ggml's `nearest_int` = round to nearest even,
//! the CPU's default, for the |x| <= 127 seen here). A block containing a NaN or an infinity
//! goes to the scalar code, whose behaviour there is ggml's. `tests/quantize_fast.rs` checks byte equality.

use std::arch::x86_64::*;

use crate::blocks::{BlockQ8_0, BlockQ8K, QK_K, QK8_0};
use crate::f16::f32_to_f16;

/// Q8_0 quantization (see [`crate::q8_0::quantize`]), AVX-512.
///
/// # Safety
/// The CPU must support `avx512f` and `avx512bw`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK8_0, "q8_0::quantize: input length");
    let sign = _mm512_set1_ps(-0.0);
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_set1_ps(1.0);
    for (x, b) in x.chunks_exact(QK8_0).zip(out.iter_mut()) {
        // SAFETY: 32 values = two 16-lane loads; loadu has no alignment requirement.
        let (v0, v1) = unsafe {
            (
                _mm512_loadu_ps(x.as_ptr()),
                _mm512_loadu_ps(x.as_ptr().add(16)),
            )
        };
        let nan =
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v0, v0) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v1, v1);
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        if nan != 0 || amax.is_infinite() {
            crate::q8_0::quantize(x, std::slice::from_mut(b));
            continue;
        }
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f32_to_f16(d);
        let idv = _mm512_set1_ps(id);
        let round = |v: __m512| {
            let p = _mm512_mul_ps(v, idv);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(p);
            // p - t is exact (same sign, |p - t| < 1), so this is C's roundf.
            let frac = _mm512_abs_ps(_mm512_sub_ps(p, t));
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, half);
            let step = _mm512_castsi512_ps(_mm512_or_si512(
                _mm512_castps_si512(one),
                _mm512_and_si512(_mm512_castps_si512(p), _mm512_castps_si512(sign)),
            ));
            _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, step))
        };
        let (q0, q1) = (round(v0), round(v1));
        // SAFETY: 16 + 16 bytes into the block's 32 quants; storeu has no alignment need.
        unsafe {
            _mm_storeu_si128(b.qs.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(q0));
            _mm_storeu_si128(b.qs.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(q1));
        }
    }
}

/// Q8_K quantization (see [`crate::q8_k::quantize`]), AVX-512.
///
/// # Safety
/// The CPU must support `avx512f` and `avx512bw`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "q8_k::quantize: input length");
    const L: usize = QK_K / 16;
    for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        // SAFETY: 256 values = 16 loads of 16 lanes; loadu has no alignment requirement.
        let v: [__m512; L] =
            std::array::from_fn(|j| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * j)) });
        let mut nan = 0u16;
        let mut m = _mm512_setzero_ps();
        for &vj in &v {
            nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(vj, vj);
            m = _mm512_max_ps(m, _mm512_abs_ps(vj));
        }
        let amax = _mm512_reduce_max_ps(m);
        if nan != 0 || amax.is_infinite() {
            crate::q8_k::quantize(x, std::slice::from_mut(b));
            continue;
        }
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        // The scalar loop keeps the first value of largest magnitude (strictly greater).
        let av = _mm512_set1_ps(amax);
        let first = v
            .iter()
            .enumerate()
            .find_map(|(j, &vj)| {
                let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(vj), av);
                (hit != 0).then(|| 16 * j + hit.trailing_zeros() as usize)
            })
            .expect("amax is one of the values");
        let max = x[first];
        let iscale = -127.0 / max;
        let isv = _mm512_set1_ps(iscale);
        let lim = _mm512_set1_epi32(127);
        for (j, &vj) in v.iter().enumerate() {
            // Round to nearest even (the MXCSR default) = ggml's nearest_int for |x| < 2^22.
            let q = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(isv, vj)), lim);
            // SAFETY: 16 bytes at 16 * j within the block's 256 quants.
            unsafe {
                _mm_storeu_si128(
                    b.qs.as_mut_ptr().add(16 * j).cast(),
                    _mm512_cvtsepi32_epi8(q),
                )
            };
            b.bsums[j] = _mm512_reduce_add_epi32(q) as i16;
        }
        b.d = 1.0 / iscale;
    }
}
