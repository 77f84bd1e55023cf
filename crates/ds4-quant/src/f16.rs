//! The 16-bit float element types, F16 and BF16, and plain f32 (FORMATS.md s2.1).
//!
//! Decoding is exact for both formats. Encoding rounds to nearest, ties to even, and
//! treats NaN the way ggml does, so that a row written here is byte-identical to one written
//! by llama.cpp, ds4's quantizer or gguf-py: an f16 NaN becomes the quiet NaN `0x7E00` with
//! the input's sign; a bf16 NaN keeps its upper 16 bits with the quiet bit (`0x40`) forced.
//!
//! The dot products accumulate in f32 in element order; they are the references the SIMD
//! kernels are compared against, not the fast path.

use half::{bf16, f16};

/// Decodes one f16 exactly, NaN payloads included (a signalling NaN stays signalling, as in
/// NumPy and ggml's portable conversion; `half` and the F16C instruction would quiet it).
#[inline]
pub fn f16_to_f32(h: f16) -> f32 {
    if h.is_nan() {
        let bits = u32::from(h.to_bits());
        return f32::from_bits(((bits & 0x8000) << 16) | 0x7F80_0000 | ((bits & 0x03FF) << 13));
    }
    h.to_f32()
}

/// Decodes a row of f16 values with [`f16_to_f32`]; every f16 is exactly representable as
/// f32.
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn f16_to_f32_row(src: &[f16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32_row: length mismatch");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16_to_f32(s);
    }
}

/// Encodes one f32 as f16: round to nearest even, overflow to ±inf, NaN to `0x7E00 | sign`.
pub fn f32_to_f16(x: f32) -> f16 {
    if x.is_nan() {
        // ggml's conversion returns one canonical quiet NaN (sign kept); half would keep
        // payload bits, which would make NaN rows differ from ggml's byte for byte.
        let sign = ((x.to_bits() >> 16) & 0x8000) as u16;
        return f16::from_bits(sign | 0x7E00);
    }
    f16::from_f32(x)
}

/// Encodes a row of f32 values as f16 with [`f32_to_f16`].
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn f32_to_f16_row(src: &[f32], dst: &mut [f16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_f16_row: length mismatch");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_f16(s);
    }
}

/// Decodes a row of bf16 values (the 16 bits become the upper half of an f32).
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn bf16_to_f32_row(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16_to_f32_row: length mismatch");
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// Encodes one f32 as bf16 exactly as ggml's `ggml_compute_fp32_to_bf16` and gguf-py do.
pub fn f32_to_bf16(x: f32) -> bf16 {
    let bits = x.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        // NaN: truncate, and force the quiet bit so that truncation cannot turn a
        // signalling NaN with only low payload bits into infinity.
        return bf16::from_bits(((bits >> 16) | 0x40) as u16);
    }
    // Round to nearest, ties to even; u64 so that values near f32::MAX carry into inf
    // instead of wrapping.
    let rounded = (u64::from(bits) + 0x7fff + u64::from((bits >> 16) & 1)) >> 16;
    bf16::from_bits(rounded as u16)
}

/// Encodes a row of f32 values as bf16 with [`f32_to_bf16`].
///
/// # Panics
/// If `src` and `dst` differ in length.
pub fn f32_to_bf16_row(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "f32_to_bf16_row: length mismatch");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f32_to_bf16(s);
    }
}

/// `Σ w[i]·x[i]` with f16 weights, accumulated in f32 in element order.
///
/// # Panics
/// If `w` and `x` differ in length.
pub fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f16_f32: length mismatch");
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

/// `Σ w[i]·x[i]` with bf16 weights, accumulated in f32 in element order.
///
/// # Panics
/// If `w` and `x` differ in length.
pub fn dot_bf16_f32(w: &[bf16], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_bf16_f32: length mismatch");
    w.iter()
        .zip(x)
        .map(|(w, x)| f32::from_bits(u32::from(w.to_bits()) << 16) * x)
        .sum()
}

/// `Σ w[i]·x[i]`, accumulated in f32 in element order.
///
/// # Panics
/// If `w` and `x` differ in length.
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    assert_eq!(w.len(), x.len(), "dot_f32: length mismatch");
    w.iter().zip(x).map(|(w, x)| w * x).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_f16(x: f32, bits: u16) {
        assert_eq!(f32_to_f16(x).to_bits(), bits, "f16 of {x:e}");
    }

    fn check_bf16(x: u32, bits: u16) {
        assert_eq!(
            f32_to_bf16(f32::from_bits(x)).to_bits(),
            bits,
            "bf16 of {x:#010x}"
        );
    }

    #[test]
    fn f16_encoding_rounds_to_even_and_canonicalises_nan() {
        check_f16(1.0, 0x3C00);
        check_f16(65504.0, 0x7BFF);
        check_f16(65520.0, 0x7C00); // halfway to the next binade: ties to even is inf
        check_f16(-1e9, 0xFC00);
        check_f16(f32::from_bits(0x7F80_0001), 0x7E00);
        check_f16(f32::from_bits(0xFFC1_2345), 0xFE00);
        // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: even mantissa wins.
        check_f16(1.0 + 2f32.powi(-11), 0x3C00);
        check_f16(1.0 + 3.0 * 2f32.powi(-11), 0x3C02);
        check_f16(2f32.powi(-24), 0x0001);
        check_f16(2f32.powi(-25), 0x0000);
    }

    #[test]
    fn bf16_encoding_matches_ggml_rule() {
        check_bf16(0x3F80_0000, 0x3F80);
        check_bf16(0x3F80_8000, 0x3F80); // tie, even stays
        check_bf16(0x3F81_8000, 0x3F82); // tie, odd rounds up
        check_bf16(0x3F80_8001, 0x3F81);
        check_bf16(0x7F7F_FFFF, 0x7F80); // rounds into inf
        check_bf16(0x7F80_0001, 0x7FC0); // signalling NaN with low payload stays NaN
        check_bf16(0xFFC1_2345, 0xFFC1);
    }

    #[test]
    fn decode_then_encode_is_identity_for_non_nan() {
        for bits in 0..=u16::MAX {
            let mut out = [0f32];
            let h = f16::from_bits(bits);
            if !h.is_nan() {
                f16_to_f32_row(&[h], &mut out);
                assert_eq!(f32_to_f16(out[0]).to_bits(), bits);
            }
            let b = bf16::from_bits(bits);
            if !b.is_nan() {
                bf16_to_f32_row(&[b], &mut out);
                assert_eq!(f32_to_bf16(out[0]).to_bits(), bits);
            }
        }
    }
}
