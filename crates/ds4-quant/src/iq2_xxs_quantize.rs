//! The IQ2_XXS quantizer: f32 weights plus an importance vector -> [`BlockIq2Xxs`] blocks.
//!
//! This is a port of llama.cpp's `quantize_row_iq2_xxs_impl` and the lattice set-up of
//! `iq2xs_init_impl` (`ggml/src/ggml-quants.c`), written to give **byte-identical** blocks:
//! every f32 operation happens in the reference's order and precision (Rust never fuses
//! `a * b + c`, matching a C build without FMA contraction). The C-reference fixtures in
//! `tests/fixtures/quant/cref/` pin that down; `tests/iq2_xxs_quantize.rs` checks it.
//! The format itself (layout, dequantizer, dot) lives in [`crate::iq2_xxs`].
//!
//! # Algorithm, per 32-value group
//!
//! 1. Weights `w[i] = importance[i] · sqrt(σ² + x[i]²)`, with `σ²` the block's mean square.
//! 2. Signs are split off; each 8-value chunk may only carry an even number of negatives
//!    (the eighth sign is implied), so when the count is odd the element that costs least
//!    (`w·x²`) keeps the wrong sign.
//! 3. Magnitudes are fitted to the lattice: 13 trial scales around a first estimate; for each,
//!    every chunk is rounded to levels {0, 1, 2} (values 1, 3, 5) and, when that pattern is
//!    not one of the 256 grid points, replaced by the best of its nearest grid points. The
//!    trial with the best weighted fit wins, and its scale is refitted once more.
//! 4. The eight group scales share one f16 block scale `d = max / 31` and are stored as
//!    4-bit `L` with `scale ≈ d·(2L + 1)`.
//!
//! # Importance
//!
//! llama.cpp refuses to quantize IQ2_XXS without an importance vector (it asserts). ds4's
//! converter, lacking an imatrix, synthesizes one per column from the whole matrix:
//! `importance[c] = Σ_rows w[r][c]²` (f32, rows in order; `gguf-tools/deepseek4-quantize.c`,
//! `f32_to_type`). [`quantize_rows`] applies exactly that rule. [`quantize`], which sees no
//! matrix shape, deliberately uses the same rule for a one-row matrix, `importance[i] = x[i]²`,
//! so `quantize(row, None)` equals `quantize_rows(row, row.len(), None)`. On Gaussian data
//! that per-row choice gives a higher plain RMSE than all-ones importance (0.436 vs 0.344 for
//! σ = 1, `docs/QUANT.md`); callers who want the latter pass `Some(&[1.0; n])`.

use std::sync::OnceLock;

use crate::blocks::{BlockIq2Xxs, QK_K};
use crate::f16::f32_to_f16;
use crate::kquant::{for_each_weighted_block, nearest_int, positive_fit};
use crate::tables::KGRID_2BIT_256;

/// Highest level plus one: levels are 0, 1, 2 and stand for the odd values 1, 3, 5.
const K_MAX_Q: i32 = 3;

/// Below this magnitude a group counts as all zero (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Number of 8-value chunk codes: eight 2-bit levels packed little end first. Levels only go
/// up to 2, so the largest code is `0b10_10_10_10_10_10_10_10` = 43690.
const N_CODES: usize = 43692;

// =========================================================================================
// The lattice tables.
//
// A chunk of 8 magnitudes is rounded to levels 0..=2 and packed into a 16-bit code. Only 256
// of the 3^8 = 6561 possible codes are grid points; for every other code the quantizer needs
// the grid points at the two smallest squared distances, in llama.cpp's order (ascending
// distance, then ascending grid index), because ties in the later weighted search are
// resolved by that order.

/// What the quantizer knows about one chunk code.
#[derive(Debug, Clone, Copy)]
enum Code {
    /// A code with a level 3, which the quantizer never produces.
    Unused,
    /// The code is grid point `index`.
    OnGrid(u8),
    /// The code is off the grid; `neighbours[start..start + len]` are the candidate points.
    OffGrid { start: u32, len: u16 },
}

/// The IQ2_XXS search tables, built once on first use.
#[derive(Debug)]
struct Lattice {
    /// Level (0, 1, 2) of each element of each grid point.
    levels: [[u8; 8]; 256],
    /// The same as the odd values `2l + 1` (1, 3, 5) the search fits, as f32.
    values: [[f32; 8]; 256],
    /// Indexed by chunk code.
    codes: Vec<Code>,
    /// Concatenated neighbour lists of the off-grid codes (grid indices).
    neighbours: Vec<u8>,
}

fn lattice() -> &'static Lattice {
    static LATTICE: OnceLock<Lattice> = OnceLock::new();
    LATTICE.get_or_init(Lattice::build)
}

impl Lattice {
    /// Builds the tables as `iq2xs_init_impl(GGML_TYPE_IQ2_XXS)` does. llama.cpp also fills
    /// in codes containing a level 3; they can never be looked up, so they are skipped here,
    /// which cuts the build to a seventh (~6300 codes x 256 distances).
    fn build() -> Lattice {
        let mut levels = [[0u8; 8]; 256];
        for (lv, &packed) in levels.iter_mut().zip(KGRID_2BIT_256.iter()) {
            for (i, l) in lv.iter_mut().enumerate() {
                *l = ((packed >> (2 * i)) & 3) as u8;
            }
        }
        let values = levels.map(|lv| lv.map(|l| f32::from(2 * l + 1)));
        let mut codes = vec![Code::Unused; N_CODES];
        for (k, &packed) in KGRID_2BIT_256.iter().enumerate() {
            codes[usize::from(packed)] = Code::OnGrid(k as u8);
        }

        // llama.cpp keeps the points at the `nwant = 2` smallest distinct distances.
        const N_WANT: usize = 2;
        let mut neighbours = Vec::new();
        let mut dist = Vec::with_capacity(256);
        for (code, slot) in codes.iter_mut().enumerate() {
            let pos: [u8; 8] = std::array::from_fn(|i| ((code >> (2 * i)) & 3) as u8);
            if matches!(slot, Code::OnGrid(_)) || pos.contains(&3) {
                continue;
            }
            dist.clear();
            for (j, lv) in levels.iter().enumerate() {
                // Distances in the odd-value domain (2l + 1), as in the reference.
                let d2: i32 = (0..8)
                    .map(|i| {
                        let d = 2 * (i32::from(lv[i]) - i32::from(pos[i]));
                        d * d
                    })
                    .sum();
                dist.push((d2, j as u8));
            }
            // (distance, index) is a total order, so this equals the reference's qsort.
            dist.sort_unstable();
            let start = neighbours.len();
            let mut n_have = 1;
            let mut d2_cur = dist[0].0;
            for &(d2, j) in &dist {
                if d2 > d2_cur {
                    if n_have == N_WANT {
                        break;
                    }
                    d2_cur = d2;
                    n_have += 1;
                }
                neighbours.push(j);
            }
            *slot = Code::OffGrid {
                start: start as u32,
                len: (neighbours.len() - start) as u16,
            };
        }
        Lattice {
            levels,
            values,
            codes,
            neighbours,
        }
    }

    /// The grid point for chunk `levels_in` (levels 0..=2, rewritten in place to the chosen
    /// point's levels when the chunk is off the grid): the chunk itself if it is a grid
    /// point, else the neighbour with the smallest `Σ w·(scale·q - x)²`, first one on ties
    /// (`iq2_find_best_neighbour`).
    fn snap(&self, levels_in: &mut [i8; 8], xval: &[f32; 8], waux: &[f32; 8], scale: f32) -> u8 {
        match self.codes[chunk_code(levels_in)] {
            Code::OnGrid(index) => index,
            Code::OffGrid { start, len } => {
                let list = &self.neighbours[start as usize..start as usize + usize::from(len)];
                let mut best_d2 = f32::MAX;
                let mut best = None;
                for &j in list {
                    let q = &self.values[usize::from(j)];
                    let mut d2 = 0.0f32;
                    for i in 0..8 {
                        let diff = scale * q[i] - xval[i];
                        d2 += waux[i] * diff * diff;
                    }
                    if d2 < best_d2 {
                        best_d2 = d2;
                        best = Some(j);
                    }
                }
                // Only a NaN distance never compares smaller (non-finite input, or squares
                // overflowing f32). llama.cpp aborts there; we deliberately take the first
                // candidate so that garbage input gives a valid block instead of a panic.
                let j = best.unwrap_or(list[0]);
                for (l, &g) in levels_in.iter_mut().zip(&self.levels[usize::from(j)]) {
                    *l = g as i8;
                }
                j
            }
            Code::Unused => unreachable!("chunk levels are clamped to 0..=2"),
        }
    }

    /// The grid index of a chunk that the search has put on the grid.
    ///
    /// Every path that leaves a finite group scale has snapped the chunks to the grid (see
    /// the non-finite check in [`quantize_block`]), so a miss here is a bug.
    fn index_on_grid(&self, levels: &[i8]) -> u8 {
        match self.codes.get(chunk_code(levels)) {
            Some(Code::OnGrid(index)) => *index,
            _ => panic!("iq2_xxs: internal error: chunk {levels:?} is not on the grid"),
        }
    }
}

/// Packs 8 levels (0..=2) into a chunk code, element 0 in the low bits.
#[inline]
fn chunk_code(levels: &[i8]) -> usize {
    levels
        .iter()
        .enumerate()
        .fold(0, |u, (i, &l)| u | (l as usize) << (2 * i))
}

// =========================================================================================
// The public entry points.

/// Quantizes `x` (whole blocks of 256) into `out`, byte-identical to llama.cpp's
/// `quantize_iq2_xxs`.
///
/// `importance`, if given, holds one non-negative weight per column: `x` must consist of whole
/// rows of `importance.len()` values (a multiple of 256), each weighed by it. Without one,
/// each value is weighed by its own square (ds4's column-energy rule for a single row; see the
/// module doc).
///
/// Input that llama.cpp aborts on (NaN or infinity, or values above ~1.8e19 whose squares
/// overflow f32) gives valid but unspecified blocks; it never panics.
///
/// # Panics
/// If `x.len() != 256 · out.len()` or the importance vector does not fit.
pub fn quantize(x: &[f32], importance: Option<&[f32]>, out: &mut [BlockIq2Xxs]) {
    assert_eq!(x.len(), out.len() * QK_K, "iq2_xxs::quantize: input length");
    let lattice = lattice();
    match importance {
        None => {
            let mut sq = [0.0f32; QK_K];
            for (x, b) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
                let x: &[f32; QK_K] = x.try_into().expect("chunk of 256");
                for (s, &v) in sq.iter_mut().zip(x) {
                    *s = v * v;
                }
                *b = quantize_block(lattice, x, &sq);
            }
        }
        Some(imp) => for_each_weighted_block(x, imp, out, |x, w, b| {
            *b = quantize_block(lattice, x, w);
        }),
    }
}

/// Quantizes a row-major matrix of `n_cols` columns (a multiple of 256) into `out`, row after
/// row, as ds4's converter does.
///
/// With `importance = None` every column is weighed by its energy over the whole matrix,
/// `Σ_rows x[r][c]²`, accumulated in f32 in row order exactly as ds4 does, so the blocks
/// match ds4's imatrix-less GGUFs. With `Some(imp)`, `imp` holds one weight per column.
///
/// # Panics
/// If `n_cols` is not a positive multiple of 256, `x` is not whole rows, `out` does not hold
/// `x.len() / 256` blocks, or `imp.len() != n_cols`.
pub fn quantize_rows(
    x: &[f32],
    n_cols: usize,
    importance: Option<&[f32]>,
    out: &mut [BlockIq2Xxs],
) {
    assert!(
        n_cols > 0 && n_cols.is_multiple_of(QK_K) && x.len().is_multiple_of(n_cols),
        "iq2_xxs::quantize_rows: {} values are not whole rows of {n_cols} (a multiple of 256)",
        x.len()
    );
    match importance {
        Some(imp) => {
            assert_eq!(
                imp.len(),
                n_cols,
                "iq2_xxs::quantize_rows: importance length"
            );
            quantize(x, Some(imp), out);
        }
        None => {
            let energy = column_energy(x, n_cols);
            quantize(x, Some(&energy), out);
        }
    }
}

/// ds4's synthetic importance: `Σ_rows x[r][c]²` per column, f32, rows in order.
///
/// # Panics
/// If `x` is not whole rows of `n_cols` values.
pub fn column_energy(x: &[f32], n_cols: usize) -> Vec<f32> {
    assert!(
        n_cols > 0 && x.len().is_multiple_of(n_cols),
        "column_energy: {} values are not whole rows of {n_cols}",
        x.len()
    );
    let mut energy = vec![0.0f32; n_cols];
    for row in x.chunks_exact(n_cols) {
        for (e, &v) in energy.iter_mut().zip(row) {
            *e += v * v;
        }
    }
    energy
}

// =========================================================================================
// One block.

/// Quantizes one 256-value block with per-value importance `qw`
/// (`quantize_row_iq2_xxs_impl`, one iteration of its block loop).
fn quantize_block(lat: &Lattice, x: &[f32; QK_K], qw: &[f32; QK_K]) -> BlockIq2Xxs {
    // q2[2g] holds group g's four grid indices, q2[2g + 1] its signs and 4-bit scale.
    let mut q2 = [0u32; 2 * QK_K / 32];
    let mut scales = [0.0f32; QK_K / 32];
    let mut max_scale = 0.0f32;

    let mut sumx2 = 0.0f32;
    for &v in x {
        sumx2 += v * v;
    }
    let sigma2 = sumx2 / QK_K as f32;

    let mut weight = [0.0f32; 32];
    let mut waux = [0.0f32; 32];
    let mut xval = [0.0f32; 32];
    let mut levels = [0i8; 32];
    let mut laux = [0i8; 32];
    let mut qp_levels = [0u8; 32];
    let mut block_signs = [0u8; 4];

    for ib in 0..QK_K / 32 {
        let xb = &x[32 * ib..32 * ib + 32];
        let qwb = &qw[32 * ib..32 * ib + 32];
        for i in 0..32 {
            weight[i] = qwb[i] * (sigma2 + xb[i] * xb[i]).sqrt();
        }
        for i in 0..32 {
            waux[i] = weight[i].sqrt();
        }

        // Signs: an odd count of negatives in a chunk cannot be stored, so the element with
        // the smallest w·x² is given the wrong sign.
        for k in 0..4 {
            let mut n_flip = 0;
            let mut s = 0u8;
            for i in 0..8 {
                let v = xb[8 * k + i];
                if v >= 0.0 {
                    xval[8 * k + i] = v;
                } else {
                    xval[8 * k + i] = -v;
                    n_flip += 1;
                    s |= 1 << i;
                }
            }
            if n_flip % 2 == 1 {
                let cost = |i: usize| weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
                let mut i_min = 0;
                let mut min = cost(0);
                for i in 1..8 {
                    let c = cost(i);
                    if c < min {
                        min = c;
                        i_min = i;
                    }
                }
                xval[8 * k + i_min] = -xval[8 * k + i_min];
                s ^= 1 << i_min;
            }
            block_signs[k] = s & 127;
        }

        // ggml's MAX(a, b) is `a > b ? a : b`; spelled out so NaN behaves the same.
        let mut max = xval[0];
        for &v in &xval[1..] {
            max = if max > v { max } else { v };
        }
        if max < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }

        // First estimate of the scale; its levels are discarded (they are 0..=4, not the
        // lattice's 0..=2), only the effective maximum seeds the search below.
        let mut scale = positive_fit(K_MAX_Q + 1, &xval, &mut qp_levels, &weight);
        let eff_max = scale * K_MAX_Q as f32;
        if eff_max <= 0.0 {
            scales[ib] = 0.0;
            continue;
        }
        // (The reference also leaves these levels in `L`; they are never packed, since either
        // a trial below wins and replaces them or the refit after the trials does.)

        let mut best = 0.0f32;
        for is in -6i32..=6 {
            let id = ((2 * K_MAX_Q - 1) as f32 + is as f32 * 0.1) / eff_max;
            let this_scale = 1.0 / id;
            for k in 0..4 {
                for i in 8 * k..8 * k + 8 {
                    let l = nearest_int(0.5 * (id * xval[i] - 1.0));
                    laux[i] = l.clamp(0, K_MAX_Q - 1) as i8;
                }
                lat.snap(
                    chunk8_mut(&mut laux, k),
                    chunk8(&xval, k),
                    chunk8(&waux, k),
                    this_scale,
                );
            }
            let (sumqx, sumq2) = weighted_sums(&weight, &xval, &laux);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                levels = laux;
            }
        }

        if scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..4 {
                for i in 8 * k..8 * k + 8 {
                    let l = nearest_int(0.5 * (id * xval[i] - 1.0));
                    levels[i] = l.clamp(0, K_MAX_Q - 1) as i8;
                }
                lat.snap(
                    chunk8_mut(&mut levels, k),
                    chunk8(&xval, k),
                    chunk8(&waux, k),
                    scale,
                );
            }
            let (sumqx, sumq2) = weighted_sums(&weight, &xval, &levels);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        if !scale.is_finite() {
            // Only non-finite input gets here (the scale search then never converges and
            // llama.cpp aborts on an off-grid chunk). Deliberately store the group as zero.
            scales[ib] = 0.0;
            continue;
        }
        if scale < 0.0 {
            // Never seen in practice; the reference flips scale and signs to keep the stored
            // scale unsigned, and so do we.
            scale = -scale;
            for s in &mut block_signs {
                *s = !*s & 127;
            }
        }
        for k in 0..4 {
            let index = lat.index_on_grid(&levels[8 * k..8 * k + 8]);
            q2[2 * ib] |= u32::from(index) << (8 * k);
            q2[2 * ib + 1] |= u32::from(block_signs[k]) << (7 * k);
        }
        scales[ib] = scale;
        max_scale = if max_scale > scale { max_scale } else { scale };
    }

    let mut block = BlockIq2Xxs {
        d: f32_to_f16(0.0),
        qs: [0; QK_K / 4],
    };
    if max_scale == 0.0 {
        return block;
    }
    let d = max_scale / 31.0;
    block.d = f32_to_f16(d);
    let id = 1.0 / d;
    for ib in 0..QK_K / 32 {
        let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
        q2[2 * ib + 1] |= (l as u32) << 28;
    }
    for (dst, word) in block.qs.chunks_exact_mut(4).zip(q2) {
        dst.copy_from_slice(&word.to_le_bytes());
    }
    block
}

/// Chunk `k` (8 values) of a 32-value group.
#[inline]
fn chunk8<T>(group: &[T; 32], k: usize) -> &[T; 8] {
    group[8 * k..8 * k + 8].try_into().expect("8 of 32")
}

/// Chunk `k` (8 values) of a 32-value group, mutable.
#[inline]
fn chunk8_mut<T>(group: &mut [T; 32], k: usize) -> &mut [T; 8] {
    (&mut group[8 * k..8 * k + 8]).try_into().expect("8 of 32")
}

/// `(Σ w·x·q, Σ w·q²)` with `q = 2l + 1`, accumulated in order as the reference does.
#[inline]
fn weighted_sums(weight: &[f32; 32], xval: &[f32; 32], levels: &[i8; 32]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    for i in 0..32 {
        let w = weight[i];
        let q = (2 * i32::from(levels[i]) + 1) as f32;
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::IQ2XXS_GRID;

    #[test]
    fn lattice_levels_match_the_format_grid() {
        // Level l of the quantizer is magnitude 8, 25 or 43 in the format's grid.
        const MAG: [u64; 3] = [0x08, 0x19, 0x2b];
        let lat = lattice();
        for (k, lv) in lat.levels.iter().enumerate() {
            let packed = lv
                .iter()
                .enumerate()
                .fold(0u64, |acc, (i, &l)| acc | MAG[usize::from(l)] << (8 * i));
            assert_eq!(packed, IQ2XXS_GRID[k], "grid point {k}");
        }
    }

    #[test]
    fn every_reachable_code_has_a_grid_point_or_neighbours() {
        let lat = lattice();
        let mut on = 0;
        let mut off = 0;
        for code in 0..N_CODES {
            let has_three = (0..8).any(|i| (code >> (2 * i)) & 3 == 3);
            match lat.codes[code] {
                Code::OnGrid(_) => on += 1,
                Code::OffGrid { len, .. } => {
                    assert!(len > 0 && !has_three, "code {code}");
                    off += 1;
                }
                Code::Unused => assert!(has_three, "code {code} reachable but unused"),
            }
        }
        assert_eq!((on, off), (256, 6561 - 256));
    }

    #[test]
    fn zero_block_is_all_zero() {
        let x = [0.0f32; QK_K];
        let mut out = [BlockIq2Xxs {
            d: f32_to_f16(1.0),
            qs: [0xff; QK_K / 4],
        }];
        quantize(&x, None, &mut out);
        assert_eq!(out[0].d.to_bits(), 0);
        assert!(out[0].qs.iter().all(|&b| b == 0));
    }

    #[test]
    fn garbage_input_gives_blocks_not_panics() {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.0e38,
            -2.0e19,
            1.0e-45,
            0.0,
            -0.0,
        ];
        let mut state = 0x5eed_u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 33) as usize
        };
        for trial in 0..64 {
            let x: Vec<f32> = (0..QK_K)
                .map(|_| {
                    if next() % 4 == 0 {
                        specials[next() % specials.len()]
                    } else {
                        (next() % 2001) as f32 / 1000.0 - 1.0
                    }
                })
                .collect();
            let imp: Vec<f32> = (0..QK_K)
                .map(|_| specials[next() % specials.len()].abs())
                .collect();
            for w in [None, Some(&imp[..])] {
                let mut a: Vec<BlockIq2Xxs> = vec![bytemuck::Zeroable::zeroed(); 1];
                let mut b = a.clone();
                quantize(&x, w, &mut a);
                quantize(&x, w, &mut b);
                // Deterministic, and the block scale is a number (the group search never
                // lets a NaN through).
                assert_eq!(
                    bytemuck::bytes_of(&a[0]),
                    bytemuck::bytes_of(&b[0]),
                    "trial {trial}"
                );
                assert!(!a[0].d.is_nan(), "trial {trial}: d is NaN");
            }
        }
    }

    #[test]
    fn no_importance_equals_one_row_column_energy() {
        let x: Vec<f32> = (0..2 * QK_K)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.1)
            .collect();
        let mut a: Vec<BlockIq2Xxs> = vec![bytemuck::Zeroable::zeroed(); 2];
        let mut b = a.clone();
        quantize(&x, None, &mut a);
        quantize_rows(&x, x.len(), None, &mut b);
        assert_eq!(a, b);
    }
}
