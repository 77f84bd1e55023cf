//! Whole rows of raw tensor bytes, dispatched on a [`DType`].
//!
//! This is the entry point for code that holds bytes from a file or a buffer and a type id:
//! the model loader, the converter and tests. Unlike the typed per-format functions, it
//! checks every length and reports problems as [`Error`]s, and it accepts byte slices at
//! any alignment (a misaligned slice is copied block by block instead of cast).

use bytemuck::Pod;
use ds4_tensor::DType;
use half::f16;

use crate::blocks::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};
use crate::error::{Error, Result};
use crate::kquant::fits_importance;
use crate::{f16 as f16_row, q2_k, q4_k, q8_0, q8_k};

/// Blocks copied per step when the input is misaligned, bounding the temporary buffer.
const UNALIGNED_CHUNK_BLOCKS: usize = 256;

/// Runs `f` over the blocks in `bytes` (a whole number of blocks) and the matching part of
/// `out`, casting in place when aligned and copying chunk by chunk when not.
fn for_blocks<B: Pod>(bytes: &[u8], out: &mut [f32], elems: usize, f: fn(&[B], &mut [f32])) {
    match bytemuck::try_cast_slice::<u8, B>(bytes) {
        Ok(blocks) => f(blocks, out),
        Err(_) => {
            let size = size_of::<B>();
            let mut tmp = Vec::with_capacity(UNALIGNED_CHUNK_BLOCKS);
            for (bytes, out) in bytes
                .chunks(size * UNALIGNED_CHUNK_BLOCKS)
                .zip(out.chunks_mut(elems * UNALIGNED_CHUNK_BLOCKS))
            {
                tmp.clear();
                tmp.extend(
                    bytes
                        .chunks_exact(size)
                        .map(bytemuck::pod_read_unaligned::<B>),
                );
                f(&tmp, out);
            }
        }
    }
}

/// Row `row` of a weight tensor (e.g. an embedding lookup) decoded into `out` (`ne0`
/// values): the body of every backend's `Backend::get_row`, which reads the row straight
/// from the mapped bytes on the host.
///
/// # Errors
/// [`ds4_tensor::backend::BackendError::Shape`] naming the tensor for a row out of range,
/// an `out` of the wrong length, or bytes the decoder refuses.
pub fn tensor_row(
    w: &ds4_tensor::HostTensor,
    row: usize,
    out: &mut [f32],
) -> std::result::Result<(), ds4_tensor::backend::BackendError> {
    let shape_err = |what: String| ds4_tensor::backend::BackendError::Shape {
        name: w.name.clone(),
        what,
    };
    let rb = w.row_bytes();
    let n_rows = w.data().len() / rb.max(1);
    if row >= n_rows || out.len() != w.shape.ne(0) as usize {
        return Err(shape_err(format!("row {row} of {n_rows}")));
    }
    dequantize(w.dtype, &w.data()[row * rb..(row + 1) * rb], out)
        .map_err(|e| shape_err(e.to_string()))
}

/// Decodes `bytes` of type `dtype` into `out` (one f32 per element; I32 values are
/// converted to f32).
///
/// Supported: F32, F16, BF16, I32, Q8_0, Q2_K, Q4_K, IQ2_XXS, Q8_K.
///
/// # Errors
/// [`Error::NotWholeBlocks`] if `bytes` is not a whole number of blocks,
/// [`Error::OutputLength`] if `out` does not have one slot per element, and
/// [`Error::Unsupported`] for a type without a decoder.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let block_bytes = dtype.block_bytes();
    let block_elems = dtype.block_elems();
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(Error::NotWholeBlocks {
            dtype,
            len: bytes.len(),
            block: block_bytes,
            unit: "bytes",
        });
    }
    let expected = bytes.len() / block_bytes * block_elems;
    if out.len() != expected {
        return Err(Error::OutputLength {
            expected,
            got: out.len(),
        });
    }
    match dtype {
        DType::F32 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::I32 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *y = i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32;
            }
        }
        DType::F16 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *y = f16_row::f16_to_f32(f16::from_le_bytes([b[0], b[1]]));
            }
        }
        DType::BF16 => {
            for (y, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *y = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        DType::Q8_0 => for_blocks::<BlockQ8_0>(bytes, out, block_elems, q8_0::dequantize),
        DType::Q2K => for_blocks::<BlockQ2K>(bytes, out, block_elems, q2_k::dequantize),
        DType::Q4K => for_blocks::<BlockQ4K>(bytes, out, block_elems, q4_k::dequantize),
        DType::Iq2Xxs => {
            for_blocks::<BlockIq2Xxs>(bytes, out, block_elems, crate::iq2_xxs::dequantize)
        }
        DType::Q8K => for_blocks::<BlockQ8K>(bytes, out, block_elems, q8_k::dequantize),
        _ => {
            return Err(Error::Unsupported {
                dtype,
                op: "dequantize",
            });
        }
    }
    Ok(())
}

/// Largest |x| accepted for IQ2_XXS. The lattice search, like llama.cpp's, fails on NaN and
/// overflows f32 for |x| of about 1e12 (weights are O(1)); the limit is deliberately far
/// below that and far above any real weight.
const IQ2_XXS_MAX_ABS: f32 = 1e6;
/// Largest importance weight accepted for IQ2_XXS (imatrix entries are mean squared
/// activations; 1e15 passed the overflow probes with |x| up to the limit above).
const IQ2_XXS_MAX_IMPORTANCE: f32 = 1e15;

/// Returns the first value outside `[lo, hi]` (NaN included) as an [`Error::InputRange`].
fn check_range(dtype: DType, what: &'static str, v: &[f32], lo: f32, hi: f32) -> Result<()> {
    match v.iter().position(|&x| !(lo..=hi).contains(&x)) {
        Some(index) => Err(Error::InputRange {
            dtype,
            what,
            index,
            value: v[index],
        }),
        None => Ok(()),
    }
}

/// Quantizes blocks with `f` and appends their bytes to `out`.
fn append_blocks<B: Pod>(n_blocks: usize, out: &mut Vec<u8>, f: impl FnOnce(&mut [B])) {
    let mut blocks = vec![B::zeroed(); n_blocks];
    f(&mut blocks);
    out.extend_from_slice(bytemuck::cast_slice(&blocks));
}

/// Encodes `x` as `dtype` and **appends** the bytes to `out` (so that rows can be written
/// one after another into one buffer), byte-identical to llama.cpp's quantizers.
///
/// Supported: F32, F16, BF16, Q8_0, Q2_K, Q4_K, IQ2_XXS, Q8_K. `importance` (one weight per
/// column; `x` must be whole rows of `importance.len()` values) selects the weighted search
/// of Q2_K and Q4_K and weighs the IQ2_XXS search (without it, IQ2_XXS weighs each value by
/// its square, see [`crate::iq2_xxs_quantize`]); the other types ignore it, as llama.cpp
/// does.
///
/// # Errors
/// [`Error::NotWholeBlocks`] if `x` is not a whole number of blocks,
/// [`Error::ImportanceLength`] if the importance vector does not fit,
/// [`Error::InputRange`] for IQ2_XXS input that is not finite or beyond `|x| <= 1e6`, or
/// importance outside `[0, 1e15]`, and [`Error::Unsupported`] for I32.
pub fn quantize(
    dtype: DType,
    x: &[f32],
    importance: Option<&[f32]>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let block_elems = dtype.block_elems();
    if !x.len().is_multiple_of(block_elems) {
        return Err(Error::NotWholeBlocks {
            dtype,
            len: x.len(),
            block: block_elems,
            unit: "values",
        });
    }
    let n_blocks = x.len() / block_elems;
    let weighted = matches!(dtype, DType::Q2K | DType::Q4K | DType::Iq2Xxs);
    if let (true, Some(imp)) = (weighted, importance)
        && !fits_importance(x.len(), imp.len())
    {
        return Err(Error::ImportanceLength {
            got: imp.len(),
            len: x.len(),
        });
    }
    if dtype == DType::Iq2Xxs {
        check_range(dtype, "value", x, -IQ2_XXS_MAX_ABS, IQ2_XXS_MAX_ABS)?;
        if let Some(imp) = importance {
            check_range(dtype, "importance", imp, 0.0, IQ2_XXS_MAX_IMPORTANCE)?;
        }
    }
    out.reserve(n_blocks * dtype.block_bytes());
    match dtype {
        DType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        DType::F16 => out.extend(x.iter().flat_map(|&v| f16_row::f32_to_f16(v).to_le_bytes())),
        DType::BF16 => {
            out.extend(
                x.iter()
                    .flat_map(|&v| f16_row::f32_to_bf16(v).to_le_bytes()),
            );
        }
        DType::Q8_0 => append_blocks::<BlockQ8_0>(n_blocks, out, |b| q8_0::quantize(x, b)),
        DType::Q2K => {
            append_blocks::<BlockQ2K>(n_blocks, out, |b| q2_k::quantize(x, importance, b))
        }
        DType::Q4K => {
            append_blocks::<BlockQ4K>(n_blocks, out, |b| q4_k::quantize(x, importance, b))
        }
        DType::Iq2Xxs => append_blocks::<BlockIq2Xxs>(n_blocks, out, |b| {
            crate::iq2_xxs_quantize::quantize(x, importance, b)
        }),
        DType::Q8K => append_blocks::<BlockQ8K>(n_blocks, out, |b| q8_k::quantize(x, b)),
        _ => {
            return Err(Error::Unsupported {
                dtype,
                op: "quantize",
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misaligned_bytes_decode_like_aligned_ones() {
        // Q8_K blocks need 4-byte alignment; offset the slice by one byte.
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let mut bytes = vec![0u8];
        quantize(DType::Q8K, &x, None, &mut bytes).expect("quantize");
        let mut a = vec![0.0; 512];
        let mut b = vec![0.0; 512];
        dequantize(DType::Q8K, &bytes[1..], &mut a).expect("misaligned");
        let aligned = bytes[1..].to_vec();
        dequantize(DType::Q8K, &aligned, &mut b).expect("aligned");
        assert_eq!(a, b);
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut out = vec![0.0; 32];
        assert!(matches!(
            dequantize(DType::Q8_0, &[0; 33], &mut out),
            Err(Error::NotWholeBlocks { .. })
        ));
        assert!(matches!(
            dequantize(DType::Q8_0, &[0; 68], &mut out),
            Err(Error::OutputLength {
                expected: 64,
                got: 32
            })
        ));
        let mut bytes = Vec::new();
        assert!(matches!(
            quantize(DType::Q2K, &[0.0; 300], None, &mut bytes),
            Err(Error::NotWholeBlocks { .. })
        ));
        assert!(matches!(
            quantize(DType::Q4K, &[0.0; 512], Some(&[1.0; 100]), &mut bytes),
            Err(Error::ImportanceLength { .. })
        ));
        assert!(matches!(
            quantize(DType::I32, &[0.0; 4], None, &mut bytes),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            quantize(DType::Iq2Xxs, &[f32::NAN; 256], None, &mut bytes),
            Err(Error::InputRange { index: 0, .. })
        ));
        let mut x = [0.5f32; 256];
        x[9] = 1e12;
        assert!(matches!(
            quantize(DType::Iq2Xxs, &x, None, &mut bytes),
            Err(Error::InputRange { index: 9, .. })
        ));
        let mut imp = [1.0f32; 256];
        imp[3] = -1.0;
        assert!(matches!(
            quantize(DType::Iq2Xxs, &[0.5; 256], Some(&imp), &mut bytes),
            Err(Error::InputRange {
                what: "importance",
                index: 3,
                ..
            })
        ));
        assert!(bytes.is_empty());
    }
}
