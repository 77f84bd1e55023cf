//! Shared set-up for the criterion benchmarks: random weights at the real expert shapes,
//! activations, and a STREAM-like memory read to put kernel throughput next to.
//!
//! Weights are random bytes with finite, moderate f16 scales (every byte pattern of these
//! formats is a valid block, FORMATS.md s2.6); the kernels' speed does not depend on the
//! values, and the scales keep the arithmetic away from subnormals and infinities.
//! A benchmark cycles through enough copies of a matrix to exceed the last-level cache
//! ([`copies_for`]), so that it measures weights streamed from DRAM, as in MoE decode where
//! each expert's matrices are read once per token, and not a matrix parked in L3.

#![warn(missing_docs)]

use ds4_quant::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0};
use ds4_tensor::DType;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A weight-matrix shape: `n_rows` outputs of `n_cols` inputs (`// [n_rows, n_cols]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatShape {
    /// Short name used in bench ids.
    pub name: &'static str,
    /// Output rows.
    pub n_rows: usize,
    /// Input columns (the reduced dimension).
    pub n_cols: usize,
}

/// The routed-expert shapes of DeepSeek V4 Flash (gate/up: 2048 x 4096, down: 4096 x 2048)
/// and a square 4096 x 4096 matrix.
pub const SHAPES: [MatShape; 3] = [
    MatShape {
        name: "gate_up_r2048_c4096",
        n_rows: 2048,
        n_cols: 4096,
    },
    MatShape {
        name: "down_r4096_c2048",
        n_rows: 4096,
        n_cols: 2048,
    },
    MatShape {
        name: "square_r4096_c4096",
        n_rows: 4096,
        n_cols: 4096,
    },
];

/// Bytes the benchmarks stream at least per pass over their matrix copies: four times a
/// 32 MiB L3, so that no copy is still cached when it comes round again.
pub const STREAM_BYTES: usize = 128 << 20;

/// How many copies of a `bytes`-sized matrix make up [`STREAM_BYTES`] (at least 2).
pub fn copies_for(bytes: usize) -> usize {
    STREAM_BYTES.div_ceil(bytes.max(1)).max(2)
}

/// Bytes of a `dtype` matrix of `shape`.
pub fn matrix_bytes(dtype: DType, shape: MatShape) -> usize {
    shape.n_rows * shape.n_cols / dtype.block_elems() * dtype.block_bytes()
}

/// A scale between 1e-3 and 1e-2 of either sign.
fn scale(rng: &mut StdRng) -> f16 {
    let m: f32 = rng.random_range(1e-3..1e-2);
    f16::from_f32(if rng.random::<bool>() { m } else { -m })
}

/// Overwrites the f16 scale fields of every block in `bytes` with [`scale`] values.
fn fix_scales<B: bytemuck::Pod>(bytes: &mut [u8], rng: &mut StdRng, fix: fn(&mut B, &mut StdRng)) {
    for chunk in bytes.chunks_exact_mut(size_of::<B>()) {
        let mut b: B = bytemuck::pod_read_unaligned(chunk);
        fix(&mut b, rng);
        chunk.copy_from_slice(bytemuck::bytes_of(&b));
    }
}

/// A random `dtype` weight matrix of `shape` as raw GGUF-layout bytes.
///
/// # Panics
/// For types that are not matrix weights (Q8_K, I32).
pub fn random_matrix(dtype: DType, shape: MatShape, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.n_rows * shape.n_cols;
    let mut bytes = vec![0u8; matrix_bytes(dtype, shape)];
    match dtype {
        DType::F32 => {
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05..0.05)).collect();
            bytes.copy_from_slice(bytemuck::cast_slice(&v));
        }
        DType::F16 => {
            let v: Vec<f16> = (0..n)
                .map(|_| f16::from_f32(rng.random_range(-0.05..0.05)))
                .collect();
            bytes.copy_from_slice(bytemuck::cast_slice(&v));
        }
        DType::BF16 => {
            let v: Vec<bf16> = (0..n)
                .map(|_| bf16::from_f32(rng.random_range(-0.05..0.05)))
                .collect();
            bytes.copy_from_slice(bytemuck::cast_slice(&v));
        }
        DType::Q8_0 => {
            rng.fill(&mut bytes[..]);
            fix_scales::<BlockQ8_0>(&mut bytes, &mut rng, |b, r| b.d = scale(r));
        }
        DType::Q2K => {
            rng.fill(&mut bytes[..]);
            fix_scales::<BlockQ2K>(&mut bytes, &mut rng, |b, r| {
                (b.d, b.dmin) = (scale(r), scale(r))
            });
        }
        DType::Q4K => {
            rng.fill(&mut bytes[..]);
            fix_scales::<BlockQ4K>(&mut bytes, &mut rng, |b, r| {
                (b.d, b.dmin) = (scale(r), scale(r))
            });
        }
        DType::Iq2Xxs => {
            rng.fill(&mut bytes[..]);
            fix_scales::<BlockIq2Xxs>(&mut bytes, &mut rng, |b, r| b.d = scale(r));
        }
        other => panic!("{other} is not a matrix weight type"),
    }
    bytes
}

/// `n` activations, roughly unit scale.
pub fn random_activations(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// Sums a buffer of u64 with 8 independent accumulators: a read-only memory stream that the
/// compiler vectorizes, used as the measured bandwidth ceiling ("STREAM-like read-sum").
pub fn read_sum(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = buf.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(v);
        }
    }
    let mut s = acc.iter().fold(0u64, |s, &a| s.wrapping_add(a));
    for &v in tail {
        s = s.wrapping_add(v);
    }
    s
}

/// [`read_sum`] split evenly over the threads of the current rayon pool.
pub fn read_sum_parallel(buf: &[u64]) -> u64 {
    use rayon::prelude::*;
    let per = buf
        .len()
        .div_ceil(rayon::current_num_threads().max(1))
        .max(1);
    buf.par_chunks(per)
        .map(read_sum)
        .reduce(|| 0, u64::wrapping_add)
}

/// The ggml type name in lower case with `_` kept (`q4_k`, `iq2_xxs`), for bench ids.
pub fn type_id(dtype: DType) -> String {
    dtype.name().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_have_gguf_sizes_and_finite_scales() {
        let shape = MatShape {
            name: "t",
            n_rows: 4,
            n_cols: 512,
        };
        for dtype in [
            DType::Q2K,
            DType::Q4K,
            DType::Iq2Xxs,
            DType::Q8_0,
            DType::F16,
        ] {
            let w = random_matrix(dtype, shape, 1);
            assert_eq!(
                w.len(),
                dtype.row_bytes(512).expect("whole blocks") as usize * 4
            );
            let mut out = vec![0.0; 4 * 512];
            ds4_quant::row::dequantize(dtype, &w, &mut out).expect("valid blocks");
            assert!(out.iter().all(|v| v.is_finite()), "{dtype}");
        }
    }

    #[test]
    fn read_sum_matches_iterator_sum() {
        let buf: Vec<u64> = (0..1003).map(|i| i * 7919).collect();
        let want = buf.iter().fold(0u64, |s, &v| s.wrapping_add(v));
        assert_eq!(read_sum(&buf), want);
        assert_eq!(read_sum_parallel(&buf), want);
    }
}
