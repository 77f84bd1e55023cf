//! AVX-512 VBMI + GFNI + BITALG kernels for the 2-bit expert formats (Zen 4, Ice Lake and
//! later): IQ2_XXS and Q2_K, single row and multi-token.
//!
//! This table ([`Isa::Avx512Vbmi`]) is the AVX-512 VNNI table with the IQ2_XXS and Q2_K
//! entries replaced; every other entry is taken from [`super::avx512::KERNELS`].
//!
//! IQ2_XXS without scalar work per 8-value chunk. The previous kernels spent most of their
//! time on 32 scalar table loads per block (address arithmetic plus lane inserts). Here a
//! whole block is decoded in registers:
//! * the 32 grid indices of the block are spread to 16-bit lanes with one `vpermb`, and
//!   looked up in the 256 **compact** grid codes (`KGRID_2BIT_256`: 2 bits per value, 16
//!   bits per grid point, 8 zmm) with four `vpermi2w` and three mask blends;
//! * each 64-value step expands its eight codes to bytes with `vpmultishiftqb` (bit pair
//!   `2i` of a code into byte `i`) and maps the level to its magnitude 8/25/43 with one
//!   `vgf2p8affineqb`: the map `l -> {8, 25, 43}` is affine over GF(2) in the two level
//!   bits (`8 ^ 17·b0 ^ 35·b1`), so it needs no table;
//! * the 7-bit sign codes are cut out with `vpmultishiftqb`, completed to `KSIGNS` bytes
//!   (bit 7 = parity of bits 0-6) with a second `vgf2p8affineqb`, regrouped with `vpermb`,
//!   and turned into one 64-bit mask per step with `vpshufbitqmb`; the mask negates the
//!   activations (`vpsubb` masked);
//! * `vpmaddubsw` and `vpdpwssd` with the group scales `2L + 1` (spread with `vpermb`) give
//!   exact i32 sums, as in [`super::avx512`].
//!
//! About 1.8x the AVX-512 VNNI kernel on Zen 4 (docs/BENCH.md), and still compute-bound:
//! ~50 vector instructions per 256-value block. Tried and slower: looking the codes up as
//! bytes for two blocks at once (`vpermi2b` low/high code bytes + `vpunpck[lh]bw`, 0.83x).
//!
//! Q2_K: the four bit pairs of the 64 weight bytes are extracted straight into contiguous
//! 64-value runs by `vgf2p8affineqb` with a different bit-select matrix in each 256-bit half
//! (one instruction per 64 weights, no shift/mask/join); sub-block scales spread by in-lane
//! `vpshufb` from a broadcast of the 16 scale bytes (no `vpermw`, no widening) and applied
//! with `vpdpwssd`; `d` and `dmin` converted by one `vcvtph2ps`; two independent integer
//! chains per block.
//!
//! The multi-token kernels decode each weight block once (everything above except the
//! activation side) and apply it to up to 8 tokens; each token goes through exactly
//! the same instruction sequence as in the single-row kernel (same partial sums, same
//! f32 accumulation, same final reduction), so `out[t]` is bit-identical to the
//! single-row dot of token `t`. Checked by `tests/kernels_n.rs`.
//!
//! One f32 accumulator per token (one pair for Q2_K: scales and mins), not two alternating
//! ones: a block costs 20 (Q2_K) to 35 (IQ2_XXS) cycles on Zen 4, far more than the FMA
//! latency, so a second chain hides nothing, and at 8 tokens its registers spilled (the
//! 8-token kernels got ~5-14% faster without it). It also makes both kernels add the same
//! exact i32 lanes in the same f32 order as the AVX-512 VNNI table's, so the two tables
//! give the same bits (unit test `same_bits_as_the_vnni_table`).

use std::arch::x86_64::*;

use half::f16;

use super::avx2::{f16_to_f32, hsum_ps};
use super::{Isa, Kernels};
use crate::tables::KGRID_2BIT_256;
use crate::{BlockIq2Xxs, BlockQ2K, BlockQ8K};

/// The AVX-512 VBMI kernel table; handed out by [`Kernels::for_isa`] only after the CPU was
/// found to support the AVX-512 VNNI set plus avx512vbmi, avx512bitalg and gfni.
pub(super) static KERNELS: Kernels = Kernels {
    isa: Isa::Avx512Vbmi,
    q2k_q8k: dot_q2k_q8k,
    iq2xxs_q8k: dot_iq2xxs_q8k,
    q2k_q8k_n: dot_q2k_q8k_n,
    iq2xxs_q8k_n: dot_iq2xxs_q8k_n,
    ..super::avx512::KERNELS
};

// The safe wrappers below are only reachable through `KERNELS`, which `Kernels::for_isa`
// returns only when `Isa::Avx512Vbmi.is_supported()` (all features detected at run time).

fn dot_q2k_q8k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q2k_q8k: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports the features of this table (see KERNELS); x holds exactly
    // one token of w.len() blocks.
    unsafe { q2k_q8k_n::<1>(w, x, &mut out) };
    out[0]
}

fn dot_iq2xxs_q8k(w: &[BlockIq2Xxs], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_iq2xxs_q8k: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports the features of this table (see KERNELS); x holds exactly
    // one token of w.len() blocks.
    unsafe { iq2xxs_q8k_n::<1>(w, x, &mut out) };
    out[0]
}

dot_n_passes!(dot_q2k_q8k_n, q2k_q8k_n, BlockQ2K, BlockQ8K);
dot_n_passes!(dot_iq2xxs_q8k_n, iq2xxs_q8k_n, BlockIq2Xxs, BlockQ8K);

/// Loads 64 bytes at `p[at..at + 64]`.
#[inline]
#[target_feature(enable = "avx512f")]
fn load512<T: Copy, const N: usize>(p: &[T; N], at: usize) -> __m512i {
    debug_assert_eq!(size_of::<T>(), 1);
    assert!(at + 64 <= N);
    // SAFETY: bounds checked just above; loadu has no alignment requirement.
    unsafe { _mm512_loadu_si512(p.as_ptr().add(at).cast()) }
}

/// Loads a 64-byte constant table.
#[inline]
#[target_feature(enable = "avx512f")]
fn table<T: Copy, const N: usize>(t: &[T; N]) -> __m512i {
    assert_eq!(size_of::<[T; N]>(), 64);
    // SAFETY: the table is exactly 64 bytes (checked above); unaligned load.
    unsafe { _mm512_loadu_si512(t.as_ptr().cast()) }
}

/// A `vgf2p8affineqb` matrix from its eight rows: output bit `i` of each byte is the parity
/// of `input & rows[i]` (the instruction reads row `i` from byte `7 - i` of the qword).
const fn gf2_matrix(rows: [u8; 8]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < 8 {
        m |= (rows[i] as u64) << (8 * (7 - i));
        i += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------
// IQ2_XXS x Q8_K.
//
// Layout of the looked-up codes: 16-bit lane `p = 4q + r` holds the grid code of chunk
// `n = 8r + q` (chunk n = values 8n..8n+8 of the block), so that qword `q` holds the codes
// of chunks q, 8+q, 16+q, 24+q: step `r` (values 64r..64r+64) finds chunk 8r+q in qword q,
// which is what the qword-local `vpmultishiftqb` needs.

/// `vpermb` indices (16-bit lanes, high byte masked to zero) from the 64 `qs` bytes to the
/// grid index of each code lane (chunk `n` of group `n / 4` sits at byte `8(n / 4) + n % 4`).
static IQ2_IDX_PERM: [u8; 64] = {
    let mut out = [0u8; 64];
    let mut p = 0;
    while p < 32 {
        let n = 8 * (p % 4) + p / 4;
        out[2 * p] = (8 * (n / 4) + n % 4) as u8;
        p += 1;
    }
    out
};

/// `vpmultishiftqb` controls of step `r`: byte `i` of qword `q` starts at bit `2i` of code
/// lane `r` of that qword (the level of value `i` lands in bits 0-1).
static IQ2_EXP_CTRL: [[u8; 64]; 4] = {
    let mut out = [[0u8; 64]; 4];
    let mut r = 0;
    while r < 4 {
        let mut b = 0;
        while b < 64 {
            out[r][b] = (16 * r + 2 * (b % 8)) as u8;
            b += 1;
        }
        r += 1;
    }
    out
};

/// Level bits (b0, b1) -> magnitude `8 ^ 17·b0 ^ 35·b1` (0 -> 8, 1 -> 25, 2 -> 43), with
/// the constant 8 as the instruction's immediate. Bits 2-7 of the input are ignored.
const IQ2_LEVEL_MATRIX: u64 = gf2_matrix([0b11, 0b10, 0, 0, 0b01, 0b10, 0, 0]);

/// `vpmultishiftqb` control cutting the four 7-bit sign codes of a group (bits 32 + 7c of
/// its qword) into bytes 0-3; bytes 4-7 are unused.
static IQ2_SIGN_CTRL: [u8; 64] = {
    let mut out = [0u8; 64];
    let mut b = 0;
    while b < 64 {
        let c = b % 8;
        out[b] = if c < 4 { (32 + 7 * c) as u8 } else { 32 };
        b += 1;
    }
    out
};

/// Keeps bits 0-6 and sets bit 7 to their parity: a 7-bit sign code becomes its `KSIGNS`
/// byte (FORMATS.md s2.6: the eighth sign makes the count of negatives even).
const IQ2_PARITY_MATRIX: u64 = gf2_matrix([1, 2, 4, 8, 16, 32, 64, 0x7F]);

/// `vpermb` regrouping the sign bytes (byte `8g + c`: chunk c of group g) so that byte
/// `8q + r` holds the sign byte of chunk `8r + q`; bytes `8q + 4..8q + 8` are unused.
static IQ2_SIGN_PERM: [u8; 64] = {
    let mut out = [0u8; 64];
    let mut q = 0;
    while q < 8 {
        let mut r = 0;
        while r < 4 {
            out[8 * q + r] = (8 * (2 * r + q / 4) + q % 4) as u8;
            r += 1;
        }
        q += 1;
    }
    out
};

/// `vpshufbitqmb` controls of step `r`: mask bit `8q + i` = bit `i` of byte `r` of qword q.
static IQ2_SIGN_BITS: [[u8; 64]; 4] = {
    let mut out = [[0u8; 64]; 4];
    let mut r = 0;
    while r < 4 {
        let mut b = 0;
        while b < 64 {
            out[r][b] = (8 * r + b % 8) as u8;
            b += 1;
        }
        r += 1;
    }
    out
};

/// `vpermb` indices spreading the group scales (byte 0 of qword g, byte 1 is zero) as i16
/// over the 32 pair sums of step `r` (groups 2r and 2r + 1, 16 pair sums each).
static IQ2_SCALE_PERM: [[u16; 32]; 4] = {
    let mut out = [[0u16; 32]; 4];
    let mut r = 0;
    while r < 4 {
        let mut w = 0;
        while w < 32 {
            let g = 2 * r + w / 16;
            out[r][w] = ((8 * g) | ((8 * g + 1) << 8)) as u16;
            w += 1;
        }
        r += 1;
    }
    out
};

/// The constants of the IQ2_XXS kernel, loaded once per call.
#[derive(Clone, Copy)]
struct Iq2Consts {
    grid: [__m512i; 8],
    idx_perm: __m512i,
    exp_ctrl: [__m512i; 4],
    level: __m512i,
    sign_ctrl: __m512i,
    parity: __m512i,
    sign_perm: __m512i,
    sign_bits: [__m512i; 4],
    scale_perm: [__m512i; 4],
}

impl Iq2Consts {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load() -> Self {
        let grid = std::array::from_fn(|k| {
            let codes: &[u16; 32] = KGRID_2BIT_256[32 * k..32 * k + 32]
                .try_into()
                .expect("32 codes");
            table(codes)
        });
        Iq2Consts {
            grid,
            idx_perm: table(&IQ2_IDX_PERM),
            exp_ctrl: IQ2_EXP_CTRL.map(|t| table(&t)),
            level: _mm512_set1_epi64(IQ2_LEVEL_MATRIX as i64),
            sign_ctrl: table(&IQ2_SIGN_CTRL),
            parity: _mm512_set1_epi64(IQ2_PARITY_MATRIX as i64),
            sign_perm: table(&IQ2_SIGN_PERM),
            sign_bits: IQ2_SIGN_BITS.map(|t| table(&t)),
            scale_perm: IQ2_SCALE_PERM.map(|t| table(&t)),
        }
    }
}

/// One IQ2_XXS block decoded for the activation side: magnitudes (u8) of the four 64-value
/// steps, their sign masks, and the group scales `2L + 1` spread over the pair sums.
#[derive(Clone, Copy)]
struct Iq2Block {
    mag: [__m512i; 4],
    neg: [__mmask64; 4],
    scale: [__m512i; 4],
    d: f32,
}

/// The 32 grid codes of a block (16-bit lanes in the order the steps need, see above).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn iq2_codes(c: &Iq2Consts, qs: __m512i) -> __m512i {
    // Grid indices to 16-bit lanes, then four 64-entry `vpermi2w` lookups (index bits 0-5)
    // chosen by index bits 6 and 7.
    let idx = _mm512_maskz_permutexvar_epi8(0x5555_5555_5555_5555, c.idx_perm, qs);
    let r0 = _mm512_permutex2var_epi16(c.grid[0], idx, c.grid[1]);
    let r1 = _mm512_permutex2var_epi16(c.grid[2], idx, c.grid[3]);
    let r2 = _mm512_permutex2var_epi16(c.grid[4], idx, c.grid[5]);
    let r3 = _mm512_permutex2var_epi16(c.grid[6], idx, c.grid[7]);
    let b6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
    let b7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
    let lo = _mm512_mask_mov_epi16(r0, b6, r1);
    let hi = _mm512_mask_mov_epi16(r2, b6, r3);
    _mm512_mask_mov_epi16(lo, b7, hi)
}

/// Decodes one block from its `qs` and its grid codes (from [`iq2_codes`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bitalg,gfni,avx2,f16c")]
fn iq2_decode(c: &Iq2Consts, qs: __m512i, codes: __m512i, d: f16) -> Iq2Block {
    let mag = std::array::from_fn(|r| {
        _mm512_gf2p8affine_epi64_epi8::<8>(
            _mm512_multishift_epi64_epi8(c.exp_ctrl[r], codes),
            c.level,
        )
    });

    // Signs: KSIGNS bytes of all 32 chunks, regrouped per step, then bit masks.
    let sb =
        _mm512_gf2p8affine_epi64_epi8::<0>(_mm512_multishift_epi64_epi8(c.sign_ctrl, qs), c.parity);
    let sb = _mm512_permutexvar_epi8(c.sign_perm, sb);
    let neg = std::array::from_fn(|r| _mm512_bitshuffle_epi64_mask(sb, c.sign_bits[r]));

    // Group scales 2L + 1 (L = the top 4 bits of each group's qword): bits 59-63, with
    // bit 0 (a sign bit) forced to 1.
    let s = _mm512_or_si512(_mm512_srli_epi64::<59>(qs), _mm512_set1_epi64(1));
    let scale = std::array::from_fn(|r| _mm512_permutexvar_epi8(c.scale_perm[r], s));
    Iq2Block {
        mag,
        neg,
        scale,
        d: 0.125 * f16_to_f32(d),
    }
}

/// The exact i32 partial sums of one decoded block against one activation block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn iq2_token(b: &Iq2Block, bx: &BlockQ8K) -> __m512i {
    let zero = _mm512_setzero_si512();
    let mut s = [zero; 2];
    for r in 0..4 {
        let q8 = load512(&bx.qs, 64 * r);
        let q8 = _mm512_mask_sub_epi8(q8, b.neg[r], zero, q8);
        let p = _mm512_maddubs_epi16(b.mag[r], q8);
        s[r & 1] = _mm512_dpwssd_epi32(s[r & 1], p, b.scale[r]);
    }
    _mm512_add_epi32(s[0], s[1])
}

/// Block `i` (decoded) against block `i` of every token: `acc[t] += d · sumi`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn iq2_tokens<const NT: usize>(
    b: &Iq2Block,
    x: &[BlockQ8K],
    nb: usize,
    i: usize,
    acc: &mut [__m512; NT],
) {
    for (t, a) in acc.iter_mut().enumerate() {
        let bx = &x[t * nb + i];
        let sumi = iq2_token(b, bx);
        let d = _mm512_set1_ps(b.d * bx.d);
        *a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), *a);
    }
}

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens.
///
/// # Safety
/// The CPU must support the features of this table; `x.len() == w.len() * out.len()`.
#[target_feature(
    enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512bitalg,gfni,avx2,fma,f16c"
)]
unsafe fn iq2xxs_q8k_n<const NT: usize>(w: &[BlockIq2Xxs], x: &[BlockQ8K], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT);
    let c = Iq2Consts::load();
    // One accumulator per token: a block costs ~35 cycles, far more than the FMA latency,
    // so a second (parity) chain buys nothing and its registers spill at 8 tokens.
    let mut acc = [_mm512_setzero_ps(); NT];
    for (i, bw) in w.iter().enumerate() {
        let qs = load512(&bw.qs, 0);
        let b = iq2_decode(&c, qs, iq2_codes(&c, qs), bw.d);
        iq2_tokens(&b, x, nb, i, &mut acc);
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(*a);
    }
}

// ---------------------------------------------------------------------------------------
// Q2_K x Q8_K: dx * (d * sum_s sc_s * sum q2*q8 - dmin * sum_s m_s * bsums_s).

/// Bit pair `2k` of every byte into bits 0-1 (other bits cleared).
const fn q2k_pair(k: usize) -> u64 {
    gf2_matrix([1 << (2 * k), 1 << (2 * k + 1), 0, 0, 0, 0, 0, 0])
}

/// Per-qword `vgf2p8affineqb` matrices: with the 32 bytes of one half block in both 256-bit
/// halves, `[0]` extracts bit pair 0 (low half) and 1 (high half): values 128h .. 128h + 64;
/// `[1]` bit pairs 2 and 3: values 128h + 64 .. 128h + 128.
static Q2K_PAIR_MATRIX: [[u64; 8]; 2] = {
    let mut out = [[0u64; 8]; 2];
    let mut s = 0;
    while s < 2 {
        let mut q = 0;
        while q < 8 {
            out[s][q] = q2k_pair(2 * s + q / 4);
            q += 1;
        }
        s += 1;
    }
    out
};

/// `vpshufb` controls spreading the sub-block scales as i16 over the 32 pair sums of step
/// `t` (values 64t .. 64t + 64): 128-bit lane `L` holds the 8 pair sums of sub-block
/// `4t + L`, and every lane of the source holds all 16 scale bytes (high bytes zeroed).
static Q2K_SCALE_SHUF: [[u8; 64]; 4] = {
    let mut out = [[0u8; 64]; 4];
    let mut t = 0;
    while t < 4 {
        let mut b = 0;
        while b < 64 {
            out[t][b] = if b % 2 == 0 {
                (4 * t + b / 16) as u8
            } else {
                0x80
            };
            b += 1;
        }
        t += 1;
    }
    out
};

/// One Q2_K block decoded for the activation side.
#[derive(Clone, Copy)]
struct Q2kBlock {
    /// Quants 0..3 (u8) of the four 64-value steps.
    q: [__m512i; 4],
    /// Sub-block scales spread over the pair sums of each step.
    scale: [__m512i; 4],
    /// The 16 mins as i16.
    mins: __m256i,
    /// `[d, dmin, 0, 0]` as f32.
    dd: __m128,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,gfni,avx2,f16c")]
fn q2k_decode(pair: &[__m512i; 2], shuf: &[__m512i; 4], bw: &BlockQ2K) -> Q2kBlock {
    let m4 = _mm_set1_epi8(0x0F);
    // SAFETY: `scales` is 16 bytes, each half of `qs` 32 bytes; unaligned loads.
    let (sm, h0, h1) = unsafe {
        (
            _mm_loadu_si128(bw.scales.as_ptr().cast()),
            _mm256_loadu_si256(bw.qs.as_ptr().cast()),
            _mm256_loadu_si256(bw.qs.as_ptr().add(32).cast()),
        )
    };
    let sc = _mm512_and_si512(_mm512_broadcast_i32x4(sm), _mm512_set1_epi8(0x0F));
    let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4));
    let (t0, t1) = (_mm512_broadcast_i64x4(h0), _mm512_broadcast_i64x4(h1));
    Q2kBlock {
        q: [
            _mm512_gf2p8affine_epi64_epi8::<0>(t0, pair[0]),
            _mm512_gf2p8affine_epi64_epi8::<0>(t0, pair[1]),
            _mm512_gf2p8affine_epi64_epi8::<0>(t1, pair[0]),
            _mm512_gf2p8affine_epi64_epi8::<0>(t1, pair[1]),
        ],
        scale: std::array::from_fn(|t| _mm512_shuffle_epi8(sc, shuf[t])),
        mins,
        dd: _mm_cvtph_ps(_mm_cvtsi32_si128(
            i32::from(bw.d.to_bits()) | i32::from(bw.dmin.to_bits()) << 16,
        )),
    }
}

/// The exact i32 partial sums (scale part, min part) of one decoded block against one
/// activation block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
fn q2k_token(b: &Q2kBlock, bx: &BlockQ8K) -> (__m512i, __m256i) {
    // SAFETY: `bsums` is 16 i16 = 32 bytes; unaligned load.
    let bsums = unsafe { _mm256_loadu_si256(bx.bsums.as_ptr().cast()) };
    let mins = _mm256_madd_epi16(b.mins, bsums);
    let mut s = [_mm512_setzero_si512(); 2];
    for t in 0..4 {
        let p = _mm512_maddubs_epi16(b.q[t], load512(&bx.qs, 64 * t));
        s[t & 1] = _mm512_dpwssd_epi32(s[t & 1], p, b.scale[t]);
    }
    (_mm512_add_epi32(s[0], s[1]), mins)
}

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens.
///
/// # Safety
/// The CPU must support the features of this table; `x.len() == w.len() * out.len()`.
#[target_feature(
    enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512bitalg,gfni,avx2,fma,f16c"
)]
unsafe fn q2k_q8k_n<const NT: usize>(w: &[BlockQ2K], x: &[BlockQ8K], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT);
    let pair = Q2K_PAIR_MATRIX.map(|m| table(&m));
    let shuf = Q2K_SCALE_SHUF.map(|m| table(&m));
    // One accumulator pair per token: a block costs ~20 cycles, far more than the FMA
    // latency, so parity chains buy nothing and their registers spill at 8 tokens.
    let mut acc = [_mm512_setzero_ps(); NT];
    let mut acc_m = [_mm256_setzero_ps(); NT];
    for (i, bw) in w.iter().enumerate() {
        let b = q2k_decode(&pair, &shuf, bw);
        for (t, (a, am)) in acc.iter_mut().zip(&mut acc_m).enumerate() {
            let bx = &x[t * nb + i];
            let (sumi, mins) = q2k_token(&b, bx);
            // [dx · d, dx · dmin]; the min part is subtracted (fnmadd).
            let dd = _mm_mul_ps(b.dd, _mm_set1_ps(bx.d));
            let d = _mm512_broadcastss_ps(dd);
            let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
            *a = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), *a);
            *am = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(mins), *am);
        }
    }
    for ((o, a), am) in out.iter_mut().zip(&acc).zip(&acc_m) {
        *o = _mm512_reduce_add_ps(*a) + hsum_ps(*am);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};

    /// The GF(2) level map and parity matrices, checked on every byte in plain Rust.
    #[test]
    fn gf2_matrices_do_what_they_say() {
        fn affine(m: u64, x: u8, imm: u8) -> u8 {
            (0..8).fold(0u8, |acc, i| {
                let row = (m >> (8 * (7 - i))) as u8;
                acc | ((((row & x).count_ones() & 1) as u8) << i)
            }) ^ imm
        }
        for x in 0..=255u8 {
            // Level 3 never occurs in a grid code.
            if let Some(&want) = [8u8, 25, 43].get(usize::from(x & 3)) {
                assert_eq!(affine(IQ2_LEVEL_MATRIX, x, 8), want, "level {x}");
            }
            assert_eq!(
                affine(IQ2_PARITY_MATRIX, x, 0),
                KSIGNS_IQ2XS[usize::from(x & 127)],
                "parity {x}"
            );
            for k in 0..4 {
                assert_eq!(
                    affine(q2k_pair(k), x, 0),
                    (x >> (2 * k)) & 3,
                    "pair {k} {x}"
                );
            }
        }
        // And the level map agrees with the byte grid it replaces.
        for (k, &code) in KGRID_2BIT_256.iter().enumerate() {
            for i in 0..8 {
                let l = ((code >> (2 * i)) & 3) as u8;
                assert_eq!(
                    affine(IQ2_LEVEL_MATRIX, l, 8),
                    (IQ2XXS_GRID[k] >> (8 * i)) as u8
                );
            }
        }
    }

    /// With one accumulator per token these kernels add the same exact i32 lanes, in the same
    /// f32 order, as the AVX-512 VNNI table's Q2_K and IQ2_XXS kernels, so the two tables give
    /// the same bits (and a model the same logits under `DS4_SIMD=avx512`), single row and
    /// multi-token alike.
    #[test]
    fn same_bits_as_the_vnni_table() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let (Some(vbmi), Some(vnni)) = (
            Kernels::for_isa(Isa::Avx512Vbmi),
            Kernels::for_isa(Isa::Avx512Vnni),
        ) else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let scale = |rng: &mut StdRng| {
            let mag = 10f32.powf(rng.random_range(-6.0..1.0));
            f16::from_f32(if rng.random::<bool>() { mag } else { -mag })
        };
        for (nb, n) in [(1, 1), (2, 3), (5, 8), (16, 1), (16, 8), (3, 11)] {
            let mut bytes = vec![0u8; nb * size_of::<BlockQ2K>()];
            rng.fill(&mut bytes[..]);
            let mut wq2: Vec<BlockQ2K> = bytemuck::pod_collect_to_vec(&bytes);
            for b in &mut wq2 {
                (b.d, b.dmin) = (scale(&mut rng), scale(&mut rng));
            }
            let mut bytes = vec![0u8; nb * size_of::<BlockIq2Xxs>()];
            rng.fill(&mut bytes[..]);
            let mut wiq: Vec<BlockIq2Xxs> = bytemuck::pod_collect_to_vec(&bytes);
            wiq.iter_mut().for_each(|b| b.d = scale(&mut rng));
            let xf: Vec<f32> = (0..nb * n * 256)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let mut x = vec![bytemuck::Zeroable::zeroed(); nb * n];
            crate::q8_k::quantize(&xf, &mut x);
            let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
            (vbmi.q2k_q8k_n)(&wq2, &x, &mut a);
            (vnni.q2k_q8k_n)(&wq2, &x, &mut b);
            assert_eq!(bits(&a), bits(&b), "q2_k _n, {nb} blocks, {n} tokens");
            (vbmi.iq2xxs_q8k_n)(&wiq, &x, &mut a);
            (vnni.iq2xxs_q8k_n)(&wiq, &x, &mut b);
            assert_eq!(bits(&a), bits(&b), "iq2_xxs _n, {nb} blocks, {n} tokens");
            let x0 = &x[..nb];
            assert_eq!(
                (vbmi.q2k_q8k)(&wq2, x0).to_bits(),
                (vnni.q2k_q8k)(&wq2, x0).to_bits(),
                "q2_k, {nb} blocks"
            );
            assert_eq!(
                (vbmi.iq2xxs_q8k)(&wiq, x0).to_bits(),
                (vnni.iq2xxs_q8k)(&wiq, x0).to_bits(),
                "iq2_xxs, {nb} blocks"
            );
        }
    }

    /// The bit patterns of a slice of f32, for exact comparisons with a readable diff.
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }
}
