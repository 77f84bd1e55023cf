//! The official hub layout with FP8 E4M3 dense weights (block scales) and packed FP4 E2M1 routed
//! experts: `Checkpoint::open` must dequantize bit-identically to transformers'
//! `Fp8Dequantize`, and the model loaded from it must reproduce transformers' logits.
//! Fixtures: tests/fixtures/hub_fp8 (`regenerate.py` there; m0_mixed quantized).

use std::path::{Path, PathBuf};

use ds4_model::checkpoint::Checkpoint;
use ds4_model::weights::TensorSource;
use ds4_model::{LoadOptions, Model, Session};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hub_fp8")
}

/// A little-endian npy array (`<f4` or `<i4`) as its shape and raw 4-byte values.
fn read_npy(path: &Path) -> (Vec<usize>, Vec<[u8; 4]>) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}: not an npy file", path.display());
    let (hlen, hstart) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[hstart..hstart + hlen]).expect("ascii npy header");
    assert!(header.contains("'fortran_order': False"), "{header}");
    assert!(
        header.contains("'<f4'") || header.contains("'<i4'"),
        "{header}"
    );
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let vals = b[hstart + hlen..]
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    (shape, vals)
}

/// Compares every reference tensor whose name starts with `prefix` (renamed by `rename`) with
/// the checkpoint's, byte for byte. Returns how many were compared.
fn compare_dequant(ck: &Checkpoint, prefix: &str, rename: impl Fn(&str) -> String) -> usize {
    let bytes = std::fs::read(fixture().join("ref_dequant.safetensors")).expect("ref_dequant");
    let refs = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut n = 0;
    for (name, view) in refs.tensors() {
        if !name.starts_with(prefix) {
            continue;
        }
        let gguf = rename(&name);
        let t = ck
            .tensor(&gguf)
            .unwrap_or_else(|| panic!("{gguf} missing from the checkpoint"));
        assert_eq!(t.dtype, ds4_tensor::DType::F32, "{gguf}");
        let want: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        assert_eq!(t.shape.numpy(), want, "{gguf}: shape");
        if t.data() != view.data() {
            let pos = t
                .data()
                .chunks_exact(4)
                .zip(view.data().chunks_exact(4))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("{gguf}: first differing f32 at element {pos}");
        }
        n += 1;
    }
    n
}

#[test]
fn fp8_and_fp4_tensors_dequantize_bit_identically_to_transformers() {
    let ck = Checkpoint::open(&fixture().join("checkpoint")).expect("open hub checkpoint");
    // Layer 1: every FP8 tensor (E8M0 scales, 32x32 blocks) and the three stacked FP4 expert
    // tensors; layer 3: ffn_down_shexp with F32 scales.
    let n = compare_dequant(&ck, "blk.", str::to_string);
    assert_eq!(n, 13, "reference tensors compared");
    // No scale tensor leaks into the GGUF names.
    assert!(
        ck.names()
            .iter()
            .all(|n| !n.contains("scale") || n.contains("hc_"))
    );
}

#[test]
fn default_128_blocks_with_partial_edges_match_weight_dequant() {
    // [144, 272] with a [2, 3] scale grid, no config.json: the released 128x128 blocks.
    let ck = Checkpoint::open(&fixture().join("partial")).expect("open partial");
    let n = compare_dequant(&ck, "partial.", |n| n.replacen("partial.", "blk.0.", 1));
    assert_eq!(n, 1);
}

#[test]
fn model_from_fp8_fp4_checkpoint_matches_transformers_logits() {
    let dir = fixture();
    let (_, prompt) = read_npy(&dir.join("prompt.npy"));
    let prompt: Vec<u32> = prompt
        .iter()
        .map(|b| u32::try_from(i32::from_le_bytes(*b)).expect("token id"))
        .collect();
    let (shape, want) = read_npy(&dir.join("logits.npy"));
    let want: Vec<f32> = want.iter().map(|b| f32::from_le_bytes(*b)).collect();
    assert_eq!(shape[0], prompt.len());
    let opts = LoadOptions {
        qat_sim: false,
        ..LoadOptions::default()
    };
    let model = Model::load(&dir.join("checkpoint"), &opts).expect("load FP8/FP4 checkpoint");
    let n_vocab = model.config().n_vocab;
    assert_eq!(shape[1], n_vocab);
    let mut s = Session::new(&model, prompt.len() + 8);
    let got = s.feed_all_logits(&prompt).expect("feed");
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("max |logit diff| / max |logit| = {:.3e}", worst / scale);
    assert!(
        worst / scale <= 1e-4,
        "relative logit error {}",
        worst / scale
    );
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0
    };
    for (i, (g, w)) in got
        .chunks_exact(n_vocab)
        .zip(want.chunks_exact(n_vocab))
        .enumerate()
    {
        assert_eq!(argmax(g), argmax(w), "argmax at position {i}");
    }
}

#[test]
fn fp8_weight_without_scale_is_an_error_naming_it() {
    let dir = std::env::temp_dir().join(format!("ds4-hub-fp8-noscale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let data = [0x38u8; 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F8_E4M3, vec![2, 2], &data)
        .expect("view");
    safetensors::serialize_to_file(
        vec![("layers.0.attn.wkv.weight", view)],
        None,
        &dir.join("model.safetensors"),
    )
    .expect("write");
    let err = Checkpoint::open(&dir).expect_err("must fail");
    let _ = std::fs::remove_dir_all(&dir);
    let msg = err.to_string();
    assert!(
        msg.contains("layers.0.attn.wkv.weight") && msg.contains("scale"),
        "{msg}"
    );
}
