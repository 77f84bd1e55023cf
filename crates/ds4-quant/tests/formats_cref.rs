//! Our quantizers against llama.cpp's C quantizers, byte for byte.
//!
//! The expected bytes in `tests/fixtures/quant/cref/` were written by a harness compiled
//! against llama.cpp's `ggml-quants.c` (see that folder's README for provenance, layout and
//! the regeneration command). Every case is a matrix `x` of f32 rows plus one importance
//! vector `imp` per column; each variant file is the C quantizer's output for the whole
//! matrix, row after row.

use ds4_quant::{BlockQ8K, row};
use ds4_tensor::DType;

const CASES: [&str; 3] = ["gauss_4x4096", "edge_8x256", "mixed_4x512"];

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../tests/fixtures/quant/cref/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading C-reference fixture {path}: {e}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Quantizes every case with `dtype` and compares with the `<case>.<variant>.bin` bytes.
fn check(dtype: DType, variant: &str, with_importance: bool) {
    for case in CASES {
        let x = f32s(&fixture(&format!("{case}.x.bin")));
        let imp = f32s(&fixture(&format!("{case}.imp.bin")));
        let want = fixture(&format!("{case}.{variant}.bin"));
        let mut got = Vec::new();
        row::quantize(dtype, &x, with_importance.then_some(&imp[..]), &mut got).expect("quantize");
        assert_eq!(got.len(), want.len(), "{case}.{variant}: byte count");
        let bb = dtype.block_bytes();
        let differ: Vec<usize> = got
            .chunks(bb)
            .zip(want.chunks(bb))
            .enumerate()
            .filter(|(_, (g, w))| !same_block(dtype, g, w))
            .map(|(i, _)| i)
            .collect();
        assert!(
            differ.is_empty(),
            "{case}.{variant}: {} of {} blocks differ from llama.cpp (first: block {})",
            differ.len(),
            got.len() / bb,
            differ[0]
        );
    }
}

/// Byte equality, except that ggml leaves a zero Q8_K block's `bsums` unwritten (whatever
/// the buffer held); ours must be zero there.
fn same_block(dtype: DType, got: &[u8], want: &[u8]) -> bool {
    if dtype == DType::Q8K {
        let w: BlockQ8K = bytemuck::pod_read_unaligned(want);
        if w.d == 0.0 {
            let g: BlockQ8K = bytemuck::pod_read_unaligned(got);
            return g.d == 0.0 && g.qs == w.qs && g.bsums == [0; 16];
        }
    }
    got == want
}

#[test]
fn q8_0_matches_llama_cpp() {
    check(DType::Q8_0, "q8_0", false);
}

#[test]
fn q8_k_matches_llama_cpp() {
    check(DType::Q8K, "q8_k", false);
}

#[test]
fn q2_k_reference_search_matches_llama_cpp() {
    check(DType::Q2K, "q2_k", false);
}

#[test]
fn q2_k_weighted_search_matches_llama_cpp() {
    check(DType::Q2K, "q2_k.imp", true);
}

#[test]
fn q4_k_reference_search_matches_llama_cpp() {
    check(DType::Q4K, "q4_k", false);
}

#[test]
fn q4_k_weighted_search_matches_llama_cpp() {
    check(DType::Q4K, "q4_k.imp", true);
}

/// The IQ2_XXS quantizer itself is tested in `iq2_xxs_quantize.rs`; this checks that the
/// byte-level dispatcher reaches it with the importance vector intact.
#[test]
fn iq2_xxs_through_row_quantize_matches_llama_cpp() {
    check(DType::Iq2Xxs, "iq2_xxs.imp", true);
}
