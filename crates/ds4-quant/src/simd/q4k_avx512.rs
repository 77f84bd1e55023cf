//! AVX-512 VNNI Q4_K x Q8_K kernels, single row and multi-token (tables `avx512` and
//! `avx512vbmi`).
//!
//! One generic kernel `q4k_q8k::<NT>` runs one weight row against `NT` tokens (1..=8); its
//! `NT = 1` instance is the tables' single-row dot, and the `_n` entry splits a batch into
//! passes of at most 8 tokens (`dot_n_passes!`). Each token goes through exactly the same
//! instruction sequence whatever `NT` is (same integer sums, same f32 operations in the same
//! order, same final reduction), so `out[t]` of the `_n` entry is bit-identical to the
//! single-row dot of token `t` (checked by `tests/kernels_n.rs`).
//!
//! Per weight block, once for all tokens:
//! * the 12 packed scale bytes are unpacked in one xmm (two `vpshufb` gathers, shifts and
//!   masks; no scalar work) into `[sc0..sc7, m0..m7]`, then spread with in-lane `vpshufb`
//!   into the i16 multipliers used below;
//! * each 32-byte run of nibbles is broadcast to both halves of a zmm and the high half
//!   shifted by 4 (`vpsrlvq`), so one masked zmm holds the 64 weights (low nibbles, then high
//!   nibbles) that line up with 64 consecutive activation bytes;
//! * `d` and `dmin` are converted together by one `vcvtph2ps`.
//!
//! Per token and block: four `vpdpbusd` (unsigned nibbles x signed Q8 bytes, four products
//! per i32 lane, exact: at most `4·15·128 < 2^15`), so every i32 lane already fits in i16;
//! two `vpackssdw` (exact, no saturation) put the 64 lane sums into two i16 vectors, which
//! `vpmaddwd`/`vpdpwssd` multiply by their sub-block scales and add to 16 i32 lanes. That is
//! 6 multiply-class zmm instructions per 256 values, against 16 ymm ones (`maddubs` + `madd`)
//! in the AVX2 kernel. The mins use the Q8_K `bsums` (`vpmaddwd` with the mins repeated per
//! pair of 16-value sums gives `m_j · (bsums[2j] + bsums[2j+1])`). f32 work: `dx·d` and
//! `dx·dmin` per token, one FMA into a zmm accumulator (scales) and one FNMA into a ymm one
//! (mins). The row ends with the mins added to the low half of the scale accumulator and
//! the 16 lanes summed in one fixed order; 3 to 8 tokens share the shuffles of that
//! reduction (`reduce_many`, same additions lane for lane as `reduce_one`), which matters
//! for the expert rows of one to four blocks.
//!
//! Measured on Zen 4 (`cargo bench -p ds4-benches --bench kernels -- q4_k`, one 4096-value
//! row in L1): single row about 1.25x the AVX2 kernel (`cpu_dot_q4_k`), 8 tokens about 1.8x
//! (`cpu_dot8_q4_k`). Tried and slower: reducing the scale
//! sums to 8 lanes and joining them with the mins into one zmm before the f32 work (one
//! cvt/mul/FMA per token instead of two of each): 8 tokens no faster, single row 8% slower
//! (a longer dependency chain per block).
//!
//! The integer block sums equal the scalar reference's exactly; only the f32 accumulation
//! order differs (FORMATS.md s2.8), which `tests/kernels.rs` bounds.

use std::arch::x86_64::*;

use super::avx2::hsum_ps;
use crate::{BlockQ4K, BlockQ8K};

// The safe entry points below are only reachable through the kernel tables of `avx512` and
// `avx512_vbmi`, which `Kernels::for_isa` hands out only after run-time detection of the
// AVX-512 VNNI set (avx512f, avx512bw, avx512vl, avx512vnni) and the AVX2 set.

/// Q4_K x Q8_K, one row (tables `avx512` and `avx512vbmi`).
pub(super) fn dot_q4k_q8k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q4k_q8k: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports the AVX-512 VNNI set and AVX2 (see above); equal lengths.
    unsafe { q4k_q8k::<1>(w, x, &mut out) };
    out[0]
}

dot_n_passes!(q4k_passes, q4k_q8k, BlockQ4K, BlockQ8K);

/// Q4_K x Q8_K for `out.len()` tokens (tables `avx512` and `avx512vbmi`); bit-identical to
/// [`dot_q4k_q8k`] per token.
pub(super) fn dot_q4k_q8k_n(w: &[BlockQ4K], x: &[BlockQ8K], out: &mut [f32]) {
    q4k_passes(w, x, out)
}

/// `vpshufb` control that gathers the scale bytes of a Q4_K block from its first 16 bytes
/// (`d`, `dmin`, then `s = scales[0..12]` at bytes 4..16): output bytes 0..4 get `s[0..4]`
/// (low six bits: `sc0..3`), 4..8 `s[8..12]` (low nibbles: `sc4..7`), 8..12 `s[4..8]` (low
/// six bits: `m0..3`) and 12..16 `s[8..12]` again (high nibbles: `m4..7`).
const GATHER_A: [u8; 16] = [4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15];
/// `vpshufb` control for the two high bits of `sc4..7` (from `s[0..4]`, output bytes 4..8)
/// and of `m4..7` (from `s[4..8]`, output bytes 12..16); other bytes zero.
const GATHER_B: [u8; 16] = [
    0x80, 0x80, 0x80, 0x80, 4, 5, 6, 7, 0x80, 0x80, 0x80, 0x80, 8, 9, 10, 11,
];
/// Keeps the bits of the [`GATHER_A`] bytes that are used in place.
const MASK_A: [u8; 16] = [63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0];
/// Keeps the high nibbles of [`GATHER_A`] bytes 12..16, shifted down by 4.
const MASK_A4: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15];
/// Keeps bits 6..8 of the [`GATHER_B`] bytes, shifted down by 2 (to bits 4..6).
const MASK_B: [u8; 16] = [
    0, 0, 0, 0, 0x30, 0x30, 0x30, 0x30, 0, 0, 0, 0, 0x30, 0x30, 0x30, 0x30,
];

/// `vpshufb` controls (on the unpacked `[sc0..sc7, m0..m7]` broadcast to every 128-bit lane)
/// for the i16 sub-block scales of the two packed product vectors of a block. Packed vector
/// `p` is `vpackssdw(s[2p], s[2p + 1])`, where `s[c]` holds the 4-product sums of values
/// `64c .. 64c + 64`: i32 lanes 0..8 of sub-block `2c`, lanes 8..16 of sub-block `2c + 1`.
/// Per 128-bit lane `L`, i16 positions 0..4 come from `s[2p]` and 4..8 from `s[2p + 1]`, so
/// position `k` of lane `L` belongs to sub-block `2·(2p + k/4) + L/2`.
static SCALE_CTRL: [[u8; 64]; 2] = {
    let mut out = [[0u8; 64]; 2];
    let mut p = 0;
    while p < 2 {
        let mut b = 0;
        while b < 64 {
            let (lane, k) = (b / 16, (b % 16) / 2);
            out[p][b] = if b % 2 == 1 {
                0x80
            } else {
                (2 * (2 * p + k / 4) + lane / 2) as u8
            };
            b += 1;
        }
        p += 1;
    }
    out
};

/// `vpshufb` control (on the same broadcast) for the i16 mins repeated per pair:
/// `[m0, m0, m1, m1, .., m7, m7]`, the multipliers of the 16 Q8_K `bsums` (i16 position
/// `i` takes `m[i / 2]`, byte `8 + i / 2` of every 128-bit lane).
static MIN_CTRL: [u8; 32] = {
    let mut out = [0u8; 32];
    let mut b = 0;
    while b < 32 {
        out[b] = if b % 2 == 1 { 0x80 } else { 8 + (b / 4) as u8 };
        b += 1;
    }
    out
};

/// Loads 16 bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn load128(p: &[u8; 16]) -> __m128i {
    // SAFETY: 16 readable bytes; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128(p.as_ptr().cast()) }
}

/// The first 16 bytes of a Q4_K block: `d`, `dmin` and the 12 scale bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn load_head(b: &BlockQ4K) -> __m128i {
    // SAFETY: the block is 144 bytes (`repr(C)`: d, dmin, scales, qs), so its first 16 are
    // readable; loadu has no alignment requirement.
    unsafe { _mm_loadu_si128((b as *const BlockQ4K).cast()) }
}

/// The 8 scales and 8 mins of a block from its first 16 bytes (see [`load_head`]) as
/// bytes `[sc0..sc7, m0..m7]`; the same values as [`super::q4k_scales_mins`]:
/// `sc[j] = s[j] & 63`, `m[j] = s[j+4] & 63` (j < 4), and for j < 4
/// `sc[j+4] = (s[j+8] & 15) | (s[j] >> 6) << 4`, `m[j+4] = (s[j+8] >> 4) | (s[j+4] >> 6) << 4`.
#[inline]
#[target_feature(enable = "avx2")]
fn unpack_scales(head: __m128i) -> __m128i {
    let a = _mm_shuffle_epi8(head, load128(&GATHER_A));
    let b = _mm_shuffle_epi8(head, load128(&GATHER_B));
    // The 16-bit shifts move bits across bytes; every mask keeps only bits that came from
    // the same byte.
    let lo = _mm_and_si128(a, load128(&MASK_A));
    let lo4 = _mm_and_si128(_mm_srli_epi16::<4>(a), load128(&MASK_A4));
    let hi = _mm_and_si128(_mm_srli_epi16::<2>(b), load128(&MASK_B));
    _mm_or_si128(_mm_or_si128(lo, lo4), hi)
}

/// The 64 weights of values `64c .. 64c + 64` as bytes: the low nibbles of
/// `qs[32c .. 32c + 32]` (low half), then their high nibbles (high half).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
fn nibbles(bw: &BlockQ4K, c: usize, shift_hi: __m512i, m4: __m512i) -> __m512i {
    assert!(c < 4);
    // SAFETY: 32 * c + 32 <= 128 bytes of `qs`; unaligned load.
    let q4 = unsafe { _mm256_loadu_si256(bw.qs.as_ptr().add(32 * c).cast()) };
    let q4 = _mm512_broadcast_i64x4(q4);
    _mm512_and_si512(_mm512_srlv_epi64(q4, shift_hi), m4)
}

/// The 4-product sums (i32 lanes, each within i16 range) of the 64 weights `q[c]` with
/// activation bytes `64c .. 64c + 64` of `bx`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn dot64(q: &[__m512i; 4], bx: &BlockQ8K, c: usize) -> __m512i {
    assert!(c < 4);
    // SAFETY: 64 * c + 64 <= 256 bytes of `qs`; unaligned load.
    let q8 = unsafe { _mm512_loadu_si512(bx.qs.as_ptr().add(64 * c).cast()) };
    _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[c], q8)
}

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens, each weight
/// block decoded once for all of them; `NT = 1` is the single-row dot.
///
/// # Safety
/// The CPU must support the AVX-512 VNNI set and AVX2.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
unsafe fn q4k_q8k<const NT: usize>(w: &[BlockQ4K], x: &[BlockQ8K], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT, "q4k_q8k: lengths");
    let m4 = _mm512_set1_epi8(0x0F);
    let shift_hi = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
    // SAFETY: 64 and 32 readable bytes; unaligned loads.
    let (sc_ctrl, min_ctrl) = unsafe {
        (
            [
                _mm512_loadu_si512(SCALE_CTRL[0].as_ptr().cast()),
                _mm512_loadu_si512(SCALE_CTRL[1].as_ptr().cast()),
            ],
            _mm256_loadu_si256(MIN_CTRL.as_ptr().cast()),
        )
    };
    let mut acc = [_mm512_setzero_ps(); NT];
    let mut acc_m = [_mm256_setzero_ps(); NT];
    for (i, bw) in w.iter().enumerate() {
        super::prefetch_ahead(bw);
        let head = load_head(bw);
        let dd = _mm_cvtph_ps(head); // [d, dmin, -, -]
        let dw = _mm512_broadcastss_ps(dd);
        let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
        let sm = _mm512_broadcast_i32x4(unpack_scales(head));
        let sc = [
            _mm512_shuffle_epi8(sm, sc_ctrl[0]),
            _mm512_shuffle_epi8(sm, sc_ctrl[1]),
        ];
        let mins = _mm256_shuffle_epi8(_mm512_castsi512_si256(sm), min_ctrl);
        // Plain calls, no `array::from_fn`: its closure is a separate function that the
        // intrinsics would have to be inlined into.
        let q = [
            nibbles(bw, 0, shift_hi, m4),
            nibbles(bw, 1, shift_hi, m4),
            nibbles(bw, 2, shift_hi, m4),
            nibbles(bw, 3, shift_hi, m4),
        ];
        for (t, (a, am)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let bx = &x[t * nb + i];
            let s0 = dot64(&q, bx, 0);
            let s1 = dot64(&q, bx, 1);
            let s2 = dot64(&q, bx, 2);
            let s3 = dot64(&q, bx, 3);
            let p0 = _mm512_packs_epi32(s0, s1);
            let p1 = _mm512_packs_epi32(s2, s3);
            let sumi = _mm512_dpwssd_epi32(_mm512_madd_epi16(p0, sc[0]), p1, sc[1]);
            // SAFETY: `bsums` is 16 i16 = 32 bytes; unaligned load.
            let bs = unsafe { _mm256_loadu_si256(bx.bsums.as_ptr().cast()) };
            let mm = _mm256_madd_epi16(bs, mins);
            let dx = _mm512_set1_ps(bx.d);
            *a = _mm512_fmadd_ps(_mm512_mul_ps(dx, dw), _mm512_cvtepi32_ps(sumi), *a);
            let dmx = _mm256_mul_ps(_mm512_castps512_ps256(dx), dmin);
            *am = _mm256_fnmadd_ps(dmx, _mm256_cvtepi32_ps(mm), *am);
        }
    }
    // The mins join the low half of the scale accumulator, then each token's 16 lanes are
    // summed in the fixed order of `reduce_one` (see `reduce_many`).
    let mut v = [_mm512_setzero_ps(); NT];
    for ((v, a), am) in v.iter_mut().zip(&acc).zip(&acc_m) {
        *v = _mm512_add_ps(*a, _mm512_zextps256_ps512(*am));
    }
    if NT <= 2 {
        for (o, v) in out.iter_mut().zip(&v) {
            *o = reduce_one(*v);
        }
    } else {
        let mut all = [_mm512_setzero_ps(); 8];
        all[..NT].copy_from_slice(&v);
        let sums = reduce_many(&all);
        // SAFETY: `out` holds NT <= 8 f32 (checked at the top); the mask writes exactly NT.
        unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), (1u16 << NT) - 1, sums) };
    }
}

/// The sum of the 16 lanes of `v` as `hsum(v[0..8] + v[8..16])`: halves, then quarters of
/// the 8-lane sum (`s[0..4] + s[4..8]`), then `[s0 + s2, s1 + s3]`, then their sum.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn reduce_one(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    hsum_ps(_mm256_add_ps(lo, hi))
}

/// `[a.lo + a.hi | b.lo + b.hi]`: 128-bit lanes `a0 + a2, a1 + a3, b0 + b2, b1 + b3`.
#[inline]
#[target_feature(enable = "avx512f")]
fn halves(a: __m512, b: __m512) -> __m512 {
    let x = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
    let y = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
    _mm512_add_ps(x, y)
}

/// Of two [`halves`] results (tokens a, b and c, d): 128-bit lanes `A0 + A1, B0 + B1,
/// C0 + C1, D0 + D1`, where `A0` and `A1` are the two 128-bit lanes of token a's half sum.
#[inline]
#[target_feature(enable = "avx512f")]
fn quarters(ab: __m512, cd: __m512) -> __m512 {
    let x = _mm512_shuffle_f32x4::<0b10_00_10_00>(ab, cd);
    let y = _mm512_shuffle_f32x4::<0b11_01_11_01>(ab, cd);
    _mm512_add_ps(x, y)
}

/// [`reduce_one`] of 8 vectors at once, in lanes 0..8 of the result, with the same additions
/// lane for lane (so each sum is bit-identical to `reduce_one` of its vector), but shared
/// shuffles: about 20 instructions instead of 8 separate reductions of ~8. Matters for short
/// rows (the expert down projections are one block per row).
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
fn reduce_many(v: &[__m512; 8]) -> __m512 {
    // Halves: [a.lo + a.hi | b.lo + b.hi] (128-bit lanes a0 + a2, a1 + a3, b0 + b2, b1 + b3).
    let h = [
        halves(v[0], v[1]),
        halves(v[2], v[3]),
        halves(v[4], v[5]),
        halves(v[6], v[7]),
    ];
    // Quarters: 128-bit lane k of `q[j]` is token 4j + k's `s[0..4] + s[4..8]`.
    let q = [quarters(h[0], h[1]), quarters(h[2], h[3])];
    // Per 128-bit lane k: [s0 + s2, s1 + s3] of token k, then of token k + 4.
    let x = _mm512_shuffle_ps::<0b01_00_01_00>(q[0], q[1]);
    let y = _mm512_shuffle_ps::<0b11_10_11_10>(q[0], q[1]);
    let u = _mm512_add_ps(x, y);
    // Lane 4k: token k's sum; lane 4k + 2: token k + 4's. Gathered into lanes 0..8.
    let s = _mm512_add_ps(u, _mm512_movehdup_ps(u));
    let idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 14, 10, 6, 2, 12, 8, 4, 0);
    _mm512_permutexvar_ps(idx, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Isa;

    #[test]
    fn unpack_scales_matches_scalar() {
        if !Isa::Avx512Vnni.is_supported() {
            return;
        }
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            let mut b: BlockQ4K = bytemuck::Zeroable::zeroed();
            for s in &mut b.scales {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *s = rng as u8;
            }
            let (sc, m) = crate::simd::q4k_scales_mins(&b.scales);
            let mut got = [0u8; 16];
            // SAFETY: the CPU supports AVX2 (implied by the AVX-512 VNNI set, checked above).
            unsafe {
                _mm_storeu_si128(got.as_mut_ptr().cast(), unpack_scales(load_head(&b)));
            }
            assert_eq!(got[..8], sc, "scales of {:?}", b.scales);
            assert_eq!(got[8..], m, "mins of {:?}", b.scales);
        }
    }

    #[test]
    fn scale_controls_pick_the_right_sub_blocks() {
        // Lane 0 of packed vector 0 starts with sub-block 0 (s[0], low lanes), then 2 (s[1]).
        assert_eq!(SCALE_CTRL[0][0], 0);
        assert_eq!(SCALE_CTRL[0][8], 2);
        // Lane 2 (i32 lanes 8..12 of s[c]) is the odd sub-block of each pair.
        assert_eq!(SCALE_CTRL[0][32], 1);
        assert_eq!(SCALE_CTRL[1][40], 7);
        assert_eq!(MIN_CTRL[..4], [8, 0x80, 8, 0x80]);
        assert_eq!(MIN_CTRL[30], 15);
    }
}
