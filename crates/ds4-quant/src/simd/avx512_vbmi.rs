//! AVX-512 VBMI + GFNI kernels for the 2-bit expert formats (Zen 4, Ice Lake and later):
//! IQ2_XXS and Q2_K, single row and multi-token, on activations prepared once per matrix
//! call ([`BlockQ8KPrep`]).
//!
//! This table ([`Isa::Avx512Vbmi`]) is the AVX-512 VNNI table with the IQ2_XXS and Q2_K
//! entries replaced; every other entry is taken from [`super::avx512::KERNELS`].
//!
//! Both kernels were compute-bound (IQ2_XXS ~36, Q2_K ~20 cycles per block on Zen 4, where a
//! zmm shuffle or multiply issues once per cycle). What makes them cheaper: the order of the
//! 256 terms of a block's dot product is free, so the weights are decoded in the order that
//! costs least, and the activations are rearranged into that same order once per call
//! (`prepare`, a few `vpermi2b` per block) instead of the weights once per row.
//! The order is chosen so that each i32 lane of the `vpdpbusd` accumulator holds terms of
//! one scale group only, the same group in all four 64-value steps: the four steps chain
//! into one accumulator and the scales are applied once per block with one `vpmulld`,
//! where the previous kernels needed `vpmaddubsw` + `vpdpwssd` + a scale shuffle per step.
//!
//! IQ2_XXS (FORMATS.md s2.6): chunk `p` (values 8p..8p+8) has a 16-bit grid code (2 bits per
//! value, `KGRID_2BIT_256`), 8 signs (7 stored, the 8th their parity) and its group's scale.
//! Qword `g` of a block's 64 `qs` bytes holds group `g`: the grid indices of chunks `4g + c`
//! in bytes 0-3, the sign codes and the scale in the high half.
//! * `vpshufd` copies each qword's four indices into its high half, and four 128-entry
//!   `vpermi2b` lookups (merge-masked by index bit 7, joined by one blend) give byte 0 of
//!   the code (levels of values 0-3) in bytes `c` and byte 1 (values 4-7) in bytes `4 + c`:
//!   byte `8g + 4h + c` holds the levels of values `4h..4h + 4` of chunk `4g + c`;
//! * the sign codes are cut out (`vpmultishiftqb`), completed to `KSIGNS` bytes (bit 7 = the
//!   parity of bits 0-6, one `vgf2p8affineqb`) and moved next to their levels by two more
//!   `vpmultishiftqb`, so that one `vpternlogd` builds bytes holding (level, level, sign,
//!   sign) of two values: a 6-bit index;
//! * four `vpermb` look those indices up in two 64-entry tables that give the signed weight
//!   plus 43 (0..86, unsigned, as `vpdpbusd` wants); the 43 · (sum of the activations) this
//!   adds is taken off by starting each lane at -43 · (the sum of its activations), computed
//!   once by `prepare`;
//! * step `k` (k = 0..3) holds value `4h + k` of chunk `4g + c` in byte `8g + 4h + c`, so
//!   lanes `2g` and `2g + 1` only ever see group `g`, whose scale `2L + 1` is put in both
//!   halves of qword `g` by one shift, one `vpor` and one `vpshufd`;
//! * the decode runs in two stages (codes, signs, scale; then the weight lookups) one and
//!   two blocks ahead of the token math in the one-token row kernel: in plain order the
//!   lookup chain's latency, not the issue rate, set the speed (docs/BENCH.md).
//!
//! Q2_K (FORMATS.md s2.4): lane `j` of every step holds four values of sub-block `j`
//! (values `16j + 4t..16j + 4t + 4` in step `t`): one `vpermb` gathers the weight bytes of
//! step `t` (qword `Q` holds bytes of half `Q / 4`) and one `vgf2p8affineqb` with a
//! per-qword bit-pair matrix extracts bit pair `Q % 4`, i.e. sub-blocks `2Q` and `2Q + 1`;
//! the 16 sub-block scales multiply the lanes once per block (`vpmulld`); the mins use the
//! unpermuted `bsums` as before (`vpmaddwd`).
//!
//! All lane sums are exact integers (IQ2_XXS: |lane| < 2^18, times a scale < 32; Q2_K: <
//! 2^13 times < 16) converted to f32 once per block, so the results equal the scalar
//! references' up to the order of f32 additions. The multi-token kernels decode each
//! weight block once and run every token through exactly the single-token sequence, so
//! `out[t]` is bit-identical to the single-row dot of token `t` (`tests/kernels_n.rs`); the
//! plain entries (natural Q8_K order) prepare their activations and call the same kernels.
//! One f32 accumulator per token: a second chain hides nothing at this block cost and its
//! registers would spill at 8 tokens.

use std::arch::x86_64::*;
use std::cell::Cell;

use bytemuck::Zeroable;

use super::avx2::{f16_to_f32, hsum_ps};
use super::{BlockQ8KPrep, Isa, Kernels, Prepared, prefetch_ahead};
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
    q2k_prep: Some(Prepared {
        prepare: prepare_q2k,
        dot: dot_q2k_prep,
        dot_n: dot_q2k_prep_n,
        dot_rows: dot_q2k_rows,
    }),
    iq2xxs_prep: Some(Prepared {
        prepare: prepare_iq2xxs,
        dot: dot_iq2xxs_prep,
        dot_n: dot_iq2xxs_prep_n,
        dot_rows: dot_iq2xxs_rows,
    }),
    ..super::avx512::KERNELS
};

// The safe wrappers below are only reachable through `KERNELS`, which `Kernels::for_isa`
// returns only when `Isa::Avx512Vbmi.is_supported()` (all features detected at run time).

fn prepare_q2k(x: &[BlockQ8K], out: &mut [BlockQ8KPrep]) {
    assert_eq!(x.len(), out.len(), "prepare_q2k: length mismatch");
    for (b, o) in x.iter().zip(out) {
        // SAFETY: the CPU supports the features of this table (see KERNELS).
        unsafe { prep_block(b, &Q2K_PREP, 0, o) };
    }
}

fn prepare_iq2xxs(x: &[BlockQ8K], out: &mut [BlockQ8KPrep]) {
    assert_eq!(x.len(), out.len(), "prepare_iq2xxs: length mismatch");
    for (b, o) in x.iter().zip(out) {
        // SAFETY: the CPU supports the features of this table (see KERNELS).
        unsafe { prep_block(b, &IQ2_PREP, -IQ2_OFFSET, o) };
    }
}

fn dot_q2k_prep(w: &[BlockQ2K], x: &[BlockQ8KPrep]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q2k_prep: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports the features of this table (see KERNELS); one row of
    // x.len() blocks. The row kernel (deeper pipeline) gives the `_n` kernel's bits.
    unsafe { q2k_rows(w, x, &mut out) };
    out[0]
}

fn dot_iq2xxs_prep(w: &[BlockIq2Xxs], x: &[BlockQ8KPrep]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_iq2xxs_prep: length mismatch");
    let mut out = [0.0];
    // SAFETY: the CPU supports the features of this table (see KERNELS); one row of
    // x.len() blocks. The row kernel (deeper pipeline) gives the `_n` kernel's bits.
    unsafe { iq2xxs_rows(w, x, &mut out) };
    out[0]
}

fn dot_q2k_rows(w: &[BlockQ2K], x: &[BlockQ8KPrep], out: &mut [f32]) {
    assert_eq!(
        w.len(),
        x.len() * out.len(),
        "dot_q2k_rows: length mismatch"
    );
    // SAFETY: the CPU supports the features of this table (see KERNELS); lengths checked.
    unsafe { q2k_rows(w, x, out) };
}

fn dot_iq2xxs_rows(w: &[BlockIq2Xxs], x: &[BlockQ8KPrep], out: &mut [f32]) {
    assert_eq!(
        w.len(),
        x.len() * out.len(),
        "dot_iq2xxs_rows: length mismatch"
    );
    // SAFETY: the CPU supports the features of this table (see KERNELS); lengths checked.
    unsafe { iq2xxs_rows(w, x, out) };
}

dot_n_passes!(dot_q2k_prep_n, q2k_n, BlockQ2K, BlockQ8KPrep);
dot_n_passes!(dot_iq2xxs_prep_n, iq2xxs_n, BlockIq2Xxs, BlockQ8KPrep);

fn dot_q2k_q8k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_q2k_q8k: length mismatch");
    with_prepared(x, prepare_q2k, |xp| dot_q2k_prep(w, xp))
}

fn dot_iq2xxs_q8k(w: &[BlockIq2Xxs], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_iq2xxs_q8k: length mismatch");
    with_prepared(x, prepare_iq2xxs, |xp| dot_iq2xxs_prep(w, xp))
}

fn dot_q2k_q8k_n(w: &[BlockQ2K], x: &[BlockQ8K], out: &mut [f32]) {
    assert_eq!(
        x.len(),
        w.len() * out.len(),
        "dot_q2k_q8k_n: length mismatch"
    );
    with_prepared(x, prepare_q2k, |xp| dot_q2k_prep_n(w, xp, out))
}

fn dot_iq2xxs_q8k_n(w: &[BlockIq2Xxs], x: &[BlockQ8K], out: &mut [f32]) {
    assert_eq!(
        x.len(),
        w.len() * out.len(),
        "dot_iq2xxs_q8k_n: length mismatch"
    );
    with_prepared(x, prepare_iq2xxs, |xp| dot_iq2xxs_prep_n(w, xp, out))
}

thread_local! {
    /// Prepared activations of the plain (natural Q8_K order) entries, reused across calls;
    /// taken out for a call and put back after it.
    static PREP: Cell<Vec<BlockQ8KPrep>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on `x` prepared by `prepare` (the plain entries: tests and one-off dots; matrix
/// calls prepare once per call instead, see `gemv`).
fn with_prepared<R>(
    x: &[BlockQ8K],
    prepare: super::PrepareQ8K,
    f: impl FnOnce(&[BlockQ8KPrep]) -> R,
) -> R {
    ds4_tensor::alloc::with_thread_local(&PREP, |buf| {
        buf.clear();
        buf.resize(x.len(), BlockQ8KPrep::zeroed());
        prepare(x, buf);
        f(buf)
    })
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
// Activation preparation.

/// The weight magnitude offset of the IQ2_XXS kernel: signed grid values (-43..43) plus 43
/// are unsigned bytes, as `vpdpbusd` needs.
const IQ2_OFFSET: i32 = 43;

/// Source positions of the IQ2_XXS order: step `k`, byte `b = 8g + 4h + c` holds value
/// `4h + k` of chunk `4g + c` (chunk `p` = values `8p..8p + 8`, group `g` = chunks
/// `4g..4g + 4`).
static IQ2_PREP: [[u8; 64]; 4] = {
    let mut out = [[0u8; 64]; 4];
    let mut k = 0;
    while k < 4 {
        let mut b = 0;
        while b < 64 {
            let (g, h, c) = (b / 8, (b % 8) / 4, b % 4);
            out[k][b] = (8 * (4 * g + c) + 4 * h + k) as u8;
            b += 1;
        }
        k += 1;
    }
    out
};

/// Source positions of the Q2_K order: step `t`, lane `j` (bytes `4j..4j + 4`) holds values
/// `16j + 4t..16j + 4t + 4` (four values of sub-block `j`).
static Q2K_PREP: [[u8; 64]; 4] = {
    let mut out = [[0u8; 64]; 4];
    let mut t = 0;
    while t < 4 {
        let mut b = 0;
        while b < 64 {
            out[t][b] = (16 * (b / 4) + 4 * t + b % 4) as u8;
            b += 1;
        }
        t += 1;
    }
    out
};

/// One block in a kernel's order: `qs[64s + b] = x.qs[idx[s][b]]`, lane `j`'s bias
/// `bias_per_value ·` (the sum of the 16 values it sees over the four steps), `bsums` and
/// `d` copied.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
fn prep_block(x: &BlockQ8K, idx: &[[u8; 64]; 4], bias_per_value: i32, out: &mut BlockQ8KPrep) {
    let v = [0, 64, 128, 192].map(|at| load512(&x.qs, at));
    let mut sums = _mm512_setzero_si512();
    for (s, ix) in idx.iter().enumerate() {
        // Index bits 0-6 pick one of 128 bytes of a source pair, bit 7 the pair.
        let i = table(ix);
        let lo = _mm512_permutex2var_epi8(v[0], i, v[1]);
        let hi = _mm512_permutex2var_epi8(v[2], i, v[3]);
        let r = _mm512_mask_mov_epi8(lo, _mm512_movepi8_mask(i), hi);
        sums = _mm512_dpbusd_epi32(sums, _mm512_set1_epi8(1), r);
        // SAFETY: `out.qs` has 256 bytes, this stores 64 at `64s`; no alignment needed.
        unsafe { _mm512_storeu_si512(out.qs.as_mut_ptr().add(64 * s).cast(), r) };
    }
    let bias = _mm512_mullo_epi32(sums, _mm512_set1_epi32(bias_per_value));
    // SAFETY: `out.bias` is 16 i32 = 64 bytes; no alignment needed.
    unsafe { _mm512_storeu_si512(out.bias.as_mut_ptr().cast(), bias) };
    out.bsums = x.bsums;
    out.d = x.d;
}

// ---------------------------------------------------------------------------------------
// IQ2_XXS.

/// The grid codes as bytes for `vpermi2b`: `[h][q]` holds byte `h` (levels of values
/// `4h..4h + 4`) of the codes of grid points `64q..64q + 64`.
static IQ2_GRID_BYTES: [[[u8; 64]; 4]; 2] = {
    let mut out = [[[0u8; 64]; 4]; 2];
    let mut k = 0;
    while k < 256 {
        let code = KGRID_2BIT_256[k];
        out[0][k / 64][k % 64] = code as u8;
        out[1][k / 64][k % 64] = (code >> 8) as u8;
        k += 1;
    }
    out
};

/// Bytes `4..8` of every qword: where the code layout keeps byte 1 of each code.
const IQ2_HIGH_HALF: u64 = 0xF0F0_F0F0_F0F0_F0F0;

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

/// `vpmultishiftqb` controls moving sign bits next to the levels: byte `4h + c` of a qword
/// (chunk `c` of the group, half `h`) gets, in bits 4 and 5, the signs of values `4h + e`
/// and `4h + e + 1` of the chunk (`KSIGNS` byte `c` of the qword, bits `4h + e`), for
/// `e = 0` (`[0]`) and `e = 2` (`[1]`). Bits 0-3 (and 6-7) are don't-care.
static IQ2_SIGN_MOVE: [[u8; 64]; 2] = {
    let mut out = [[0u8; 64]; 2];
    let mut s = 0;
    while s < 2 {
        let mut b = 0;
        while b < 64 {
            let (c, h) = (b % 4, (b % 8) / 4);
            out[s][b] = ((8 * c + 4 * h + 2 * s + 64 - 4) % 64) as u8;
            b += 1;
        }
        s += 1;
    }
    out
};

/// The two 64-entry weight tables: index bits 0-1 (`[0]`) or 2-3 (`[1]`) are a level
/// (0, 1, 2 -> 8, 25, 43), bit 4 (`[0]`) or 5 (`[1]`) its sign; the entry is the signed
/// value plus [`IQ2_OFFSET`]. Level 3 never occurs in a grid code.
static IQ2_WEIGHT_LUT: [[u8; 64]; 2] = {
    const MAG: [i32; 4] = [8, 25, 43, 0];
    let mut out = [[0u8; 64]; 2];
    let mut s = 0;
    while s < 2 {
        let mut i = 0;
        while i < 64 {
            let mag = MAG[(i >> (2 * s)) & 3];
            let v = if (i >> (4 + s)) & 1 == 1 { -mag } else { mag };
            out[s][i] = (v + IQ2_OFFSET) as u8;
            i += 1;
        }
        s += 1;
    }
    out
};

/// The constants of the IQ2_XXS kernel, loaded once per call.
#[derive(Clone, Copy)]
struct Iq2Consts {
    grid: [[__m512i; 4]; 2],
    sign_ctrl: __m512i,
    parity: __m512i,
    sign_move: [__m512i; 2],
    lut: [__m512i; 2],
}

impl Iq2Consts {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load() -> Self {
        Iq2Consts {
            grid: IQ2_GRID_BYTES.map(|h| h.map(|q| table(&q))),
            sign_ctrl: table(&IQ2_SIGN_CTRL),
            parity: _mm512_set1_epi64(IQ2_PARITY_MATRIX as i64),
            sign_move: IQ2_SIGN_MOVE.map(|t| table(&t)),
            lut: IQ2_WEIGHT_LUT.map(|t| table(&t)),
        }
    }
}

/// One IQ2_XXS block decoded for the activation side: the four steps' weights plus 43
/// (u8), the group scale `2L + 1` of each i32 lane, and `d / 8`.
#[derive(Clone, Copy)]
struct Iq2Block {
    w: [__m512i; 4],
    scale: __m512i,
    d: f32,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni,avx2,f16c")]
fn iq2_decode(c: &Iq2Consts, bw: &BlockIq2Xxs) -> Iq2Block {
    iq2_stage2(c, iq2_stage1(c, bw))
}

/// The first half of [`iq2_decode`]: grid codes, sign bits, scales.
#[derive(Clone, Copy)]
struct Iq2Pre {
    code: __m512i,
    sa: __m512i,
    sb: __m512i,
    scale: __m512i,
    d: f32,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni,avx2,f16c")]
fn iq2_stage1(c: &Iq2Consts, bw: &BlockIq2Xxs) -> Iq2Pre {
    let qs = load512(&bw.qs, 0);
    // Grid codes: each qword's four grid indices copied to its high half, then looked up
    // as bytes (byte 0 of the code in the low half, byte 1 in the high half) with four
    // 128-entry `vpermi2b`, chosen by index bit 7 and the half.
    let idx = _mm512_shuffle_epi32::<0xA0>(qs);
    let [lo, hi] = c.grid;
    // Each lookup writes only its quarter of the bytes (index bit 7, half) and leaves the
    // others untouched (merge into the index operand): the bytes not yet looked up still
    // hold their index for the next lookup, and no blends are needed.
    let b7 = _mm512_movepi8_mask(idx);
    let c0 = _mm512_mask2_permutex2var_epi8(lo[0], idx, !b7, lo[1]);
    let c0 = _mm512_mask2_permutex2var_epi8(lo[2], c0, b7, lo[3]);
    let c1 = _mm512_mask2_permutex2var_epi8(hi[0], idx, !b7, hi[1]);
    let c1 = _mm512_mask2_permutex2var_epi8(hi[2], c1, b7, hi[3]);
    let code = _mm512_mask_mov_epi8(c0, IQ2_HIGH_HALF, c1);

    // KSIGNS bytes of the group's chunks in bytes 0-3 of each qword, then moved into
    // bits 4-5 next to the levels of the same values.
    let signs =
        _mm512_gf2p8affine_epi64_epi8::<0>(_mm512_multishift_epi64_epi8(c.sign_ctrl, qs), c.parity);
    let sa = _mm512_multishift_epi64_epi8(c.sign_move[0], signs);
    let sb = _mm512_multishift_epi64_epi8(c.sign_move[1], signs);
    let s = _mm512_or_si512(_mm512_srli_epi64::<59>(qs), _mm512_set1_epi64(1));
    Iq2Pre {
        code,
        sa,
        sb,
        scale: _mm512_shuffle_epi32::<0xA0>(s),
        d: 0.125 * f16_to_f32(bw.d),
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni,avx2,f16c")]
fn iq2_stage2(c: &Iq2Consts, p: Iq2Pre) -> Iq2Block {
    let Iq2Pre {
        code,
        sa,
        sb,
        scale,
        d,
    } = p;
    // Bits 0-3 from the levels (values 4h, 4h + 1 / 4h + 2, 4h + 3), bits 4-7 from signs.
    let low4 = _mm512_set1_epi8(0x0F);
    let ia = _mm512_ternarylogic_epi32::<0xCA>(low4, code, sa);
    let ib = _mm512_ternarylogic_epi32::<0xCA>(low4, _mm512_srli_epi16::<4>(code), sb);
    let w = [
        _mm512_permutexvar_epi8(ia, c.lut[0]),
        _mm512_permutexvar_epi8(ia, c.lut[1]),
        _mm512_permutexvar_epi8(ib, c.lut[0]),
        _mm512_permutexvar_epi8(ib, c.lut[1]),
    ];

    Iq2Block { w, scale, d }
}

/// The exact i32 lane sums (scaled) of one decoded block against one prepared block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn iq2_token(b: &Iq2Block, bx: &BlockQ8KPrep) -> __m512i {
    let mut acc = table(&bx.bias);
    for (k, w) in b.w.iter().enumerate() {
        acc = _mm512_dpbusd_epi32(acc, *w, load512(&bx.qs, 64 * k));
    }
    _mm512_mullo_epi32(acc, b.scale)
}

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens.
///
/// # Safety
/// The CPU must support the features of this table; `x.len() == w.len() * out.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")]
unsafe fn iq2xxs_n<const NT: usize>(w: &[BlockIq2Xxs], x: &[BlockQ8KPrep], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT);
    let c = Iq2Consts::load();
    let mut acc = [_mm512_setzero_ps(); NT];
    let Some(first) = w.first() else {
        out.fill(0.0);
        return;
    };
    // Software-pipelined: block i + 1 is decoded (a long dependent chain) before block i's
    // token math is issued, so the two overlap; in plain order the scheduler filled up
    // with one block's chain and the kernel ran at its latency.
    let mut next = iq2_decode(&c, first);
    for i in 0..nb {
        let b = next;
        if i + 1 < nb {
            next = iq2_decode(&c, &w[i + 1]);
        }
        prefetch_ahead(&w[i]);
        for (t, a) in acc.iter_mut().enumerate() {
            let bx = &x[t * nb + i];
            let sumi = iq2_token(&b, bx);
            *a = _mm512_fmadd_ps(_mm512_set1_ps(b.d * bx.d), _mm512_cvtepi32_ps(sumi), *a);
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = _mm512_reduce_add_ps(*a);
    }
}

/// `out[r] = dot(w[r * nb..(r + 1) * nb], x)`, `nb = x.len()`: [`iq2xxs_n`] with one token
/// over consecutive rows, the decode pipeline running across row ends; each row gets exactly
/// the single-token sequence (zeroed accumulator, same FMAs, same reduction).
///
/// # Safety
/// The CPU must support the features of this table; `w.len() == x.len() * out.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")]
unsafe fn iq2xxs_rows(w: &[BlockIq2Xxs], x: &[BlockQ8KPrep], out: &mut [f32]) {
    let nb = x.len();
    assert_eq!(w.len(), nb * out.len());
    let (Some(first), true) = (w.first(), nb > 0) else {
        out.fill(0.0);
        return;
    };
    let c = Iq2Consts::load();
    let mut next = iq2_decode(&c, first);
    let mut pre = iq2_stage1(&c, w.get(1).unwrap_or(first));
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = _mm512_setzero_ps();
        for (i, bx) in x.iter().enumerate() {
            let g = r * nb + i;
            let b = next;
            next = iq2_stage2(&c, pre);
            if g + 2 < w.len() {
                pre = iq2_stage1(&c, &w[g + 2]);
            }
            prefetch_ahead(&w[g]);
            let sumi = iq2_token(&b, bx);
            acc = _mm512_fmadd_ps(_mm512_set1_ps(b.d * bx.d), _mm512_cvtepi32_ps(sumi), acc);
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

// ---------------------------------------------------------------------------------------
// Q2_K: dx * (d * sum_j sc_j * sum q2*q8 - dmin * sum_j m_j * bsums_j).

/// Bit pair `2k` of every byte into bits 0-1 (other bits cleared).
const fn q2k_pair(k: usize) -> u64 {
    gf2_matrix([1 << (2 * k), 1 << (2 * k + 1), 0, 0, 0, 0, 0, 0])
}

/// `vpermb` of step `t`: qword `Q` gets the weight bytes `32h + 4t..32h + 4t + 4` and
/// `32h + 16 + 4t..32h + 16 + 4t + 4` of half `h = Q / 4`.
static Q2K_STEP_PERM: [[u8; 64]; 4] = {
    let mut out = [[0u8; 64]; 4];
    let mut t = 0;
    while t < 4 {
        let mut b = 0;
        while b < 64 {
            let (q, i) = (b / 8, b % 8);
            out[t][b] = (32 * (q / 4) + 16 * (i / 4) + 4 * t + i % 4) as u8;
            b += 1;
        }
        t += 1;
    }
    out
};

/// Per-qword `vgf2p8affineqb` matrices: qword `Q` extracts bit pair `Q % 4`, so lane
/// `2Q + e` holds values of sub-block `8 (Q / 4) + 2 (Q % 4) + e = 2Q + e`.
static Q2K_LANE_MATRIX: [u64; 8] = {
    let mut out = [0u64; 8];
    let mut q = 0;
    while q < 8 {
        out[q] = q2k_pair(q % 4);
        q += 1;
    }
    out
};

/// One Q2_K block decoded for the activation side.
#[derive(Clone, Copy)]
struct Q2kBlock {
    /// Quants 0..3 (u8) of the four steps.
    q: [__m512i; 4],
    /// The 16 sub-block scales, one per i32 lane.
    scale: __m512i,
    /// The 16 mins as i16.
    mins: __m256i,
    /// `[d, dmin, 0, 0]` as f32.
    dd: __m128,
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni,avx2,f16c")]
fn q2k_decode(perm: &[__m512i; 4], lanes: __m512i, bw: &BlockQ2K) -> Q2kBlock {
    let m4 = _mm_set1_epi8(0x0F);
    // SAFETY: `scales` is 16 bytes; unaligned load.
    let sm = unsafe { _mm_loadu_si128(bw.scales.as_ptr().cast()) };
    let qs = load512(&bw.qs, 0);
    Q2kBlock {
        q: std::array::from_fn(|t| {
            _mm512_gf2p8affine_epi64_epi8::<0>(_mm512_permutexvar_epi8(perm[t], qs), lanes)
        }),
        scale: _mm512_cvtepu8_epi32(_mm_and_si128(sm, m4)),
        mins: _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sm), m4)),
        dd: _mm_cvtph_ps(_mm_cvtsi32_si128(
            i32::from(bw.d.to_bits()) | i32::from(bw.dmin.to_bits()) << 16,
        )),
    }
}

/// The exact i32 partial sums (scale part per sub-block lane, min part) of one decoded
/// block against one prepared block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2")]
fn q2k_token(b: &Q2kBlock, bx: &BlockQ8KPrep) -> (__m512i, __m256i) {
    // SAFETY: `bsums` is 16 i16 = 32 bytes; unaligned load.
    let bsums = unsafe { _mm256_loadu_si256(bx.bsums.as_ptr().cast()) };
    let mins = _mm256_madd_epi16(b.mins, bsums);
    let mut acc = _mm512_setzero_si512();
    for (t, q) in b.q.iter().enumerate() {
        acc = _mm512_dpbusd_epi32(acc, *q, load512(&bx.qs, 64 * t));
    }
    (_mm512_mullo_epi32(acc, b.scale), mins)
}

/// `out[t] = dot(w, x[t * nb..(t + 1) * nb])` for `NT == out.len()` tokens.
///
/// # Safety
/// The CPU must support the features of this table; `x.len() == w.len() * out.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")]
unsafe fn q2k_n<const NT: usize>(w: &[BlockQ2K], x: &[BlockQ8KPrep], out: &mut [f32]) {
    let nb = w.len();
    assert!(out.len() == NT && x.len() == nb * NT);
    let perm = Q2K_STEP_PERM.map(|m| table(&m));
    let lanes = table(&Q2K_LANE_MATRIX);
    let mut acc = [_mm512_setzero_ps(); NT];
    let mut acc_m = [_mm256_setzero_ps(); NT];
    let Some(first) = w.first() else {
        out.fill(0.0);
        return;
    };
    // Software-pipelined as in `iq2xxs_n`.
    let mut next = q2k_decode(&perm, lanes, first);
    for i in 0..nb {
        let b = next;
        if i + 1 < nb {
            next = q2k_decode(&perm, lanes, &w[i + 1]);
        }
        prefetch_ahead(&w[i]);
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

/// `out[r] = dot(w[r * nb..(r + 1) * nb], x)`, `nb = x.len()`: [`q2k_n`] with one token over
/// consecutive rows, as [`iq2xxs_rows`].
///
/// # Safety
/// The CPU must support the features of this table; `w.len() == x.len() * out.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")]
unsafe fn q2k_rows(w: &[BlockQ2K], x: &[BlockQ8KPrep], out: &mut [f32]) {
    let nb = x.len();
    assert_eq!(w.len(), nb * out.len());
    let (Some(first), true) = (w.first(), nb > 0) else {
        out.fill(0.0);
        return;
    };
    let perm = Q2K_STEP_PERM.map(|m| table(&m));
    let lanes = table(&Q2K_LANE_MATRIX);
    let mut next = q2k_decode(&perm, lanes, first);
    for (r, o) in out.iter_mut().enumerate() {
        let mut acc = _mm512_setzero_ps();
        let mut acc_m = _mm256_setzero_ps();
        for (i, bx) in x.iter().enumerate() {
            let g = r * nb + i;
            let b = next;
            if g + 1 < w.len() {
                next = q2k_decode(&perm, lanes, &w[g + 1]);
            }
            prefetch_ahead(&w[g]);
            let (sumi, mins) = q2k_token(&b, bx);
            let dd = _mm_mul_ps(b.dd, _mm_set1_ps(bx.d));
            let d = _mm512_broadcastss_ps(dd);
            let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
            acc = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi), acc);
            acc_m = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(mins), acc_m);
        }
        *o = _mm512_reduce_add_ps(acc) + hsum_ps(acc_m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};

    /// A `vgf2p8affineqb` on one byte, in plain Rust.
    fn affine(m: u64, x: u8, imm: u8) -> u8 {
        (0..8).fold(0u8, |acc, i| {
            let row = (m >> (8 * (7 - i))) as u8;
            acc | ((((row & x).count_ones() & 1) as u8) << i)
        }) ^ imm
    }

    /// The GF(2) parity and bit-pair matrices, checked on every byte.
    #[test]
    fn gf2_matrices_do_what_they_say() {
        for x in 0..=255u8 {
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
    }

    /// The weight tables give the byte grid's value with its sign, plus the offset, for
    /// every grid point, value and sign.
    #[test]
    fn weight_tables_match_the_grid() {
        for (k, &code) in KGRID_2BIT_256.iter().enumerate() {
            for i in 0..8 {
                let level = usize::from((code >> (2 * i)) as u8 & 3);
                let want = i32::from((IQ2XXS_GRID[k] >> (8 * i)) as u8);
                for (s, lut) in IQ2_WEIGHT_LUT.iter().enumerate() {
                    for neg in [0, 1] {
                        let idx = (level << (2 * s)) | (neg << (4 + s));
                        let v = i32::from(lut[idx]) - IQ2_OFFSET;
                        assert_eq!(v, if neg == 1 { -want } else { want });
                    }
                }
            }
        }
    }

    /// Every prepared order is a permutation of the 256 values, and in every order each
    /// accumulator lane only ever sees one scale group (IQ2_XXS: 32 values, Q2_K: 16).
    #[test]
    fn prepared_orders_are_permutations_with_one_group_per_lane() {
        for (order, group) in [(&IQ2_PREP, 32), (&Q2K_PREP, 16)] {
            let mut seen = [false; 256];
            for step in order {
                for (b, &v) in step.iter().enumerate() {
                    assert!(!seen[usize::from(v)], "value {v} twice");
                    seen[usize::from(v)] = true;
                    let lane_group = usize::from(order[0][4 * (b / 4)]) / group;
                    assert_eq!(usize::from(v) / group, lane_group, "lane {}", b / 4);
                }
            }
        }
        // Q2_K step gathers: lane 2Q + e of step t takes weight bytes holding values
        // 16 (2Q + e) + 4t + i in bit pair Q % 4.
        for t in 0..4 {
            for b in 0..64 {
                let (q, i) = (b / 8, b % 8);
                let byte = usize::from(Q2K_STEP_PERM[t][b]);
                let value = 128 * (byte / 32) + 32 * (q % 4) + byte % 32;
                assert_eq!(
                    value,
                    usize::from(Q2K_PREP[t][b]),
                    "step {t} byte {b} ({i})"
                );
            }
        }
    }
}
