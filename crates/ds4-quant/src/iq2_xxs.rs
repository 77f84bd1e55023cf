//! IQ2_XXS: 256 values in 8 groups of 32, each 8-value chunk one of 256 lattice points with
//! 7 sign bits (FORMATS.md s2.6; 66 bytes, 2.06 bits per weight).
//!
//! Group `g` is the 8 bytes at `qs[8g..8g+8]`: four grid indices, then a little-endian u32
//! whose bits 0-27 are four 7-bit sign codes and bits 28-31 the group scale `L`.
//! `x = f32(d)·(0.5 + L)·0.25 · grid[a_k][i] · sign`. The eighth sign of a chunk is implied
//! (an even number of negatives), which [`KSIGNS_IQ2XS`] expands.
//!
//! The quantizer lives in its own module (it needs large search tables); this one only
//! defines the format.

use crate::blocks::{BlockIq2Xxs, BlockQ8K, QK_K};
use crate::tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};

/// The grid indices and the packed signs/scale word of group `g`.
#[inline]
fn group(b: &BlockIq2Xxs, g: usize) -> ([u8; 4], u32) {
    let q = &b.qs[8 * g..8 * g + 8];
    (
        [q[0], q[1], q[2], q[3]],
        u32::from_le_bytes([q[4], q[5], q[6], q[7]]),
    )
}

/// Magnitude (8, 25 or 43) of element `i` of grid point `a`.
#[inline]
fn grid_byte(a: u8, i: usize) -> u8 {
    (IQ2XXS_GRID[usize::from(a)] >> (8 * i)) as u8
}

/// Sign bits of chunk `k` from the packed word (bit `i` set: element `i` negative).
#[inline]
fn signs(word: u32, k: usize) -> u8 {
    KSIGNS_IQ2XS[((word >> (7 * k)) & 127) as usize]
}

/// Dequantizes whole blocks into `out` (`256 · blocks.len()` values).
///
/// # Panics
/// If `out` does not hold exactly `256 · blocks.len()` values.
pub fn dequantize(blocks: &[BlockIq2Xxs], out: &mut [f32]) {
    assert_eq!(
        out.len(),
        blocks.len() * QK_K,
        "iq2_xxs::dequantize: output length"
    );
    for (b, y) in blocks.iter().zip(out.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        for (g, y) in y.chunks_exact_mut(32).enumerate() {
            let (idx, word) = group(b, g);
            let db = d * (0.5 + (word >> 28) as f32) * 0.25;
            for (k, y) in y.chunks_exact_mut(8).enumerate() {
                let sg = signs(word, k);
                for (i, y) in y.iter_mut().enumerate() {
                    let sign = if sg & (1 << i) != 0 { -1.0 } else { 1.0 };
                    *y = db * f32::from(grid_byte(idx[k], i)) * sign;
                }
            }
        }
    }
}

/// `Σ dequant(w)·dequant(x)` for an IQ2_XXS row against a Q8_K row (FORMATS.md s2.8): per
/// group the integer sum of signed grid values times quants, weighted by `2L + 1`, and per
/// block `0.125·f32(d)·dx` times that.
///
/// # Panics
/// If the rows have different numbers of blocks.
pub fn dot(w: &[BlockIq2Xxs], x: &[BlockQ8K]) -> f32 {
    assert_eq!(w.len(), x.len(), "iq2_xxs::dot: block count mismatch");
    let mut sum = 0.0f32;
    for (w, x) in w.iter().zip(x) {
        let mut bsum = 0i32;
        for g in 0..QK_K / 32 {
            let (idx, word) = group(w, g);
            let mut sumi = 0i32;
            for (k, &a) in idx.iter().enumerate() {
                let sg = signs(word, k);
                for i in 0..8 {
                    let mag = i32::from(grid_byte(a, i));
                    let v = if sg & (1 << i) != 0 { -mag } else { mag };
                    sumi += v * i32::from(x.qs[32 * g + 8 * k + i]);
                }
            }
            bsum += (2 * (word >> 28) as i32 + 1) * sumi;
        }
        sum += w.d.to_f32() * x.d * bsum as f32;
    }
    0.125 * sum
}
