//! Dequantization of the official Hugging Face checkpoint's quantized tensors to f32.
//!
//! The hub layout of DeepSeek V4 (MODEL.md s2.1, s2.8; docs/MODEL_NOTES.md "Official FP8/FP4
//! checkpoints") stores each quantized weight `X.weight` next to a scale tensor `X.scale`:
//!
//! - **FP8**: `X.weight` is `F8_E4M3` `[rows, cols]`; `X.scale` holds one scale per
//!   `block_rows x block_cols` tile (128x128 in the released checkpoint, the
//!   `quantization_config.weight_block_size` of `config.json`), shape
//!   `[ceil(rows/br), ceil(cols/bc)]`, as `F8_E8M0` (`2^(e-127)`) or as plain floats.
//!   `value[r][c] = e4m3(w[r][c]) * scale[r/br][c/bc]`.
//! - **FP4** (routed experts): `X.weight` is `I8` `[rows, cols/2]`, two E2M1 codes per byte
//!   (element `2j` in the low nibble, `2j+1` in the high one); `X.scale` is `[rows, cols/32]`:
//!   one scale per 32 inputs of a row. `value[r][c] = e2m1(code[r][c]) * scale[r][c/32]`.
//!
//! The product is one f32 multiplication of two exactly decoded values, the same arithmetic as
//! transformers' `Fp8Dequantize` (which promotes both sides to float32), so the result is
//! bit-identical to torch's. Output is f32 because it is exact for every input; it costs 4
//! bytes per weight, fine for small models and for conversion, not for serving the full model
//! from the hub files (convert to GGUF for that).

use crate::error::{Result, tensor_err};
use crate::numerics::{e2m1_to_f32, e4m3_to_f32, e8m0_to_f32};

/// Inputs per FP4 scale along a row (transformers' `FP8Experts`: `sf_gran_k = 32`).
pub const FP4_BLOCK: usize = 32;

/// The FP8 block of the released checkpoint when `config.json` does not name one.
pub const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

/// A decoded scale grid, row-major `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scales {
    /// Grid shape `[rows, cols]`.
    pub dims: [usize; 2],
    /// `rows * cols` scale values.
    pub values: Vec<f32>,
}

/// How a scale tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDtype {
    /// `float8_e8m0fnu` exponent bytes (the released V4 checkpoint).
    E8M0,
    /// Little-endian f32 (V3-style `weight_scale_inv`).
    F32,
    /// Little-endian bf16.
    BF16,
}

impl Scales {
    /// Decodes a 2-D scale tensor; NaN scales (E8M0 byte 255) are an error.
    pub fn decode(name: &str, dtype: ScaleDtype, dims: &[u64], bytes: &[u8]) -> Result<Scales> {
        let dims = dims2(name, dims)?;
        let n = dims[0] * dims[1];
        let size = match dtype {
            ScaleDtype::E8M0 => 1,
            ScaleDtype::F32 => 4,
            ScaleDtype::BF16 => 2,
        };
        if bytes.len() != n * size {
            return Err(tensor_err(
                name,
                format!("scale has {} bytes, expected {}", bytes.len(), n * size),
            ));
        }
        let values: Vec<f32> = match dtype {
            ScaleDtype::E8M0 => bytes.iter().map(|&b| e8m0_to_f32(b)).collect(),
            ScaleDtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            ScaleDtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(tensor_err(name, "scale is NaN or infinite"));
        }
        Ok(Scales { dims, values })
    }
}

fn dims2(name: &str, dims: &[u64]) -> Result<[usize; 2]> {
    match dims {
        &[r, c] => Ok([r as usize, c as usize]),
        _ => Err(tensor_err(
            name,
            format!("expected a 2-D quantized tensor, got shape {dims:?}"),
        )),
    }
}

/// Dequantizes an FP8 E4M3 weight `[rows, cols]` (one byte per value) with per-block scales;
/// partial blocks at the right and bottom edges use their tile's scale, as the official
/// `weight_dequant` does.
pub fn dequant_fp8(
    name: &str,
    dims: &[u64],
    weight: &[u8],
    scales: &Scales,
    block: [usize; 2],
) -> Result<Vec<f32>> {
    let [rows, cols] = dims2(name, dims)?;
    if weight.len() != rows * cols {
        return Err(tensor_err(
            name,
            format!(
                "FP8 weight has {} bytes, expected {}",
                weight.len(),
                rows * cols
            ),
        ));
    }
    if block[0] == 0 || block[1] == 0 {
        return Err(tensor_err(name, "FP8 block size is zero"));
    }
    let grid = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
    if scales.dims != grid {
        return Err(tensor_err(
            name,
            format!(
                "scale grid {:?} does not match {rows}x{cols} in {}x{} blocks (expected {grid:?})",
                scales.dims, block[0], block[1]
            ),
        ));
    }
    let mut out = Vec::with_capacity(rows * cols);
    for (r, row) in weight.chunks_exact(cols.max(1)).enumerate().take(rows) {
        let srow = &scales.values[(r / block[0]) * grid[1]..][..grid[1]];
        out.extend(
            row.iter()
                .enumerate()
                .map(|(c, &b)| e4m3_to_f32(b) * srow[c / block[1]]),
        );
    }
    if out.iter().any(|v| v.is_nan()) {
        return Err(tensor_err(name, "FP8 weight holds NaN codes"));
    }
    Ok(out)
}

/// Dequantizes packed FP4 E2M1 weights `[rows, cols/2]` (stored dims, bytes) to f32
/// `[rows, cols]` with one scale per [`FP4_BLOCK`] inputs of each row. Returns the values and
/// the logical dims `[rows, cols]`.
pub fn dequant_fp4(
    name: &str,
    dims: &[u64],
    packed: &[u8],
    scales: &Scales,
) -> Result<(Vec<f32>, [u64; 2])> {
    let [rows, half] = dims2(name, dims)?;
    let cols = 2 * half;
    if packed.len() != rows * half {
        return Err(tensor_err(
            name,
            format!(
                "FP4 weight has {} bytes, expected {}",
                packed.len(),
                rows * half
            ),
        ));
    }
    let grid = [rows, cols.div_ceil(FP4_BLOCK)];
    if scales.dims != grid {
        return Err(tensor_err(
            name,
            format!(
                "FP4 scale grid {:?} does not match {rows}x{cols} in 1x{FP4_BLOCK} blocks (expected {grid:?})",
                scales.dims
            ),
        ));
    }
    let mut out = Vec::with_capacity(rows * cols);
    for (r, row) in packed.chunks_exact(half.max(1)).enumerate().take(rows) {
        let srow = &scales.values[r * grid[1]..][..grid[1]];
        for (j, &b) in row.iter().enumerate() {
            out.push(e2m1_to_f32(b & 0xF) * srow[(2 * j) / FP4_BLOCK]);
            out.push(e2m1_to_f32(b >> 4) * srow[(2 * j + 1) / FP4_BLOCK]);
        }
    }
    Ok((out, [rows as u64, cols as u64]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::round_e4m3;

    #[test]
    fn e4m3_decode_agrees_with_the_rounding_grid() {
        // Every finite code is a fixed point of the independent rounding helper, and the
        // non-negative codes are 127 distinct, increasing values up to 448.
        let pos: Vec<f32> = (0u8..0x7F).map(e4m3_to_f32).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(pos[126], 448.0);
        for b in (0u8..=255).filter(|b| b & 0x7F != 0x7F) {
            let v = e4m3_to_f32(b);
            assert_eq!(round_e4m3(v).to_bits(), v.to_bits(), "code {b:#x}");
        }
        assert!(e4m3_to_f32(0xFF).is_nan());
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn bad_scale_grids_are_rejected_with_the_tensor_name() {
        let s = Scales {
            dims: [1, 1],
            values: vec![1.0],
        };
        let e = dequant_fp8("w", &[130, 4], &[0; 520], &s, [128, 128]).expect_err("grid");
        assert!(
            e.to_string().contains("w") && e.to_string().contains("[2, 1]"),
            "{e}"
        );
        let e = dequant_fp4("x", &[1, 32], &[0; 32], &s).expect_err("grid");
        assert!(e.to_string().contains("[1, 2]"), "{e}");
    }
}
