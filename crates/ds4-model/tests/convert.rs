//! `ds4_model::convert` on the tiny fixture models (`tests/fixtures/model/*`, made by the
//! committed `tests/fixtures/model/regenerate.py` with transformers 5.23).
//!
//! - The metadata round-trips through a GGUF to the same [`Config`], carries the value types
//!   FORMATS.md s1.11 asks for, and agrees with the `gguf_metadata` the fixture generator
//!   recorded independently in each `manifest.json`.
//! - Every preset writes every checkpoint tensor under its GGUF name, with the checkpoint's
//!   shape and the type of the preset's map (after the documented row-length fallback); the
//!   data equals the checkpoint values quantized by ds4-quant, bit for bit; the file loads in
//!   the engine.
//! - The official `tokenizer.json` survives our `tokenizer.ggml.*` arrays: the tokenizer built
//!   from them encodes the tokenizer fixtures exactly as HF `tokenizers` did.
//! - The f16 file gives the checkpoint's logits (to 1e-6 of the logit scale; a few weight
//!   values are F16 subnormals) and transformers' reference logits to the fixture bar of 1e-4;
//!   q8/q4/q2 logits stay within a documented KL bound of the checkpoint's. As no fixture row
//!   holds a 256-value block, a random model with d = F = 256 (generated here) exercises the
//!   real Q4_K / IQ2_XXS / Q2_K experts. `presets_kl_table` (ignored) prints the table of
//!   docs/QUANT.md.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use ds4_model::checkpoint::Checkpoint;
use ds4_model::config::Config;
use ds4_model::convert::{self, ConvertOptions, Preset, Role};
use ds4_model::weights::TensorSource;
use ds4_model::{LoadOptions, Model, Session};
use ds4_tensor::gguf::{GgufFile, GgufWriter, Value as GValue, ValueType};
use ds4_tensor::{DType, HostTensor, Shape, TensorBytes};
use serde_json::Value;

fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    dirs.retain(|d| {
        d.join("manifest.json").is_file() && d.join("checkpoint/config.json").is_file()
    });
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no fixture model under tests/fixtures/model"
    );
    dirs
}

fn fixture_name(dir: &Path) -> String {
    dir.file_name()
        .expect("fixture dir name")
        .to_string_lossy()
        .into_owned()
}

fn hf_config(dir: &Path) -> Config {
    let text = std::fs::read_to_string(dir.join("checkpoint/config.json")).expect("config.json");
    let mut cfg = Config::from_hf_json(&text).expect("config parses");
    cfg.validate().expect("config valid");
    cfg
}

/// A fresh scratch directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ds4-convert-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn convert_fixture(
    dir: &Path,
    preset: Preset,
    out_dir: &Path,
) -> (PathBuf, convert::ConvertReport) {
    let out = out_dir.join(format!("{}-{preset}.gguf", fixture_name(dir)));
    let opts = ConvertOptions { preset, name: None };
    let report = convert::convert(&dir.join("checkpoint"), &out, &opts, &mut |_| {})
        .unwrap_or_else(|e| panic!("{} {preset}: {e}", dir.display()));
    (out, report)
}

fn no_sim() -> LoadOptions {
    LoadOptions {
        qat_sim: false,
        ..LoadOptions::default()
    }
}

// =========================================================================================
// Metadata.

#[test]
fn metadata_round_trips_to_the_same_config() {
    let mut configs: Vec<(String, Config)> = fixture_dirs()
        .iter()
        .map(|d| (fixture_name(d), hf_config(d)))
        .collect();
    // Variants the fixtures do not cover: no YaRN, no bos/eos ids, the wide test model.
    let mut plain = configs[0].1.clone();
    plain.rope_yarn = None;
    plain.bos_token_id = None;
    plain.eos_token_id = None;
    configs.push(("no yarn, no bos/eos".into(), plain));
    configs.push(("wide".into(), wide_config()));
    for (dir, cfg) in configs {
        let mut w = GgufWriter::new();
        for (k, v) in convert::config_metadata(&cfg, "tiny") {
            w.add(&k, v).expect("metadata");
        }
        let bytes = w.to_bytes().expect("write");
        let file = GgufFile::from_bytes(&bytes).expect("read back");
        let mut back = Config::from_gguf(&file).expect("from_gguf");
        back.validate().expect("valid");
        assert_eq!(back, cfg, "{dir}");
    }
}

#[test]
fn metadata_has_the_value_types_ds4_checks() {
    let cfg = hf_config(&fixture_dirs()[0]);
    let mut w = GgufWriter::new();
    for (k, v) in convert::config_metadata(&cfg, "tiny") {
        w.add(&k, v).expect("metadata");
    }
    let bytes = w.to_bytes().expect("write");
    let file = GgufFile::from_bytes(&bytes).expect("read back");
    let ty = |k: &str| {
        file.get(k)
            .unwrap_or_else(|| panic!("missing {k}"))
            .value_type()
    };
    // FORMATS.md s1.11: integer keys UINT32 exactly.
    for k in [
        "block_count",
        "embedding_length",
        "vocab_size",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
        "rope.dimension_count",
        "attention.q_lora_rank",
        "attention.output_lora_rank",
        "attention.output_group_count",
        "expert_count",
        "expert_used_count",
        "expert_feed_forward_length",
        "expert_shared_count",
        "hash_layer_count",
        "attention.sliding_window",
        "attention.indexer.head_count",
        "attention.indexer.key_length",
        "attention.indexer.top_k",
        "hyper_connection.count",
        "hyper_connection.sinkhorn_iterations",
        "rope.scaling.original_context_length",
    ] {
        assert_eq!(ty(&format!("deepseek4.{k}")), ValueType::U32, "{k}");
    }
    for k in [
        "rope.freq_base",
        "rope.scaling.factor",
        "rope.scaling.yarn_beta_fast",
        "rope.scaling.yarn_beta_slow",
        "attention.compress_rope_freq_base",
        "expert_weights_scale",
        "attention.layer_norm_rms_epsilon",
        "hyper_connection.epsilon",
    ] {
        assert_eq!(ty(&format!("deepseek4.{k}")), ValueType::F32, "{k}");
    }
    assert_eq!(ty("deepseek4.expert_weights_norm"), ValueType::Bool);
    assert_eq!(ty("general.architecture"), ValueType::String);
    let arr = |k: &str| file.get_array(k).expect("array");
    assert_eq!(
        arr("deepseek4.attention.compress_ratios").elem_type(),
        ValueType::I32
    );
    assert_eq!(
        arr("deepseek4.swiglu_clamp_exp").elem_type(),
        ValueType::F32
    );
    assert_eq!(
        arr("deepseek4.attention.compress_ratios").len(),
        cfg.n_layer
    );
}

/// The fixture generator wrote, independently of this crate, the `deepseek4.*` keys a GGUF
/// of each model must carry (`manifest.json` `gguf_metadata`); ours must hold the same values.
#[test]
fn metadata_matches_the_fixture_manifests() {
    for dir in fixture_dirs() {
        let manifest: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"),
        )
        .expect("json");
        let cfg = hf_config(&dir);
        let mut w = GgufWriter::new();
        for (k, v) in convert::config_metadata(&cfg, "tiny") {
            w.add(&k, v).expect("metadata");
        }
        let bytes = w.to_bytes().expect("write");
        let file = GgufFile::from_bytes(&bytes).expect("read back");
        let expected = manifest["gguf_metadata"]
            .as_object()
            .expect("gguf_metadata");
        for (k, want) in expected {
            let got = file
                .get(k)
                .unwrap_or_else(|| panic!("{}: key {k} not written", dir.display()));
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1e-30);
            let ok = match (want, &got) {
                (Value::Bool(b), GValue::Bool(g)) => b == g,
                (Value::String(s), GValue::String(g)) => s == g,
                (Value::Number(n), g) => g
                    .as_f64()
                    .is_some_and(|g| close(g, n.as_f64().expect("number"))),
                (Value::Array(a), GValue::Array(g)) => {
                    a.len() == g.len()
                        && a.iter().zip(g.iter()).all(|(x, y)| {
                            y.as_f64()
                                .is_some_and(|y| close(y, x.as_f64().expect("number")))
                        })
                }
                _ => false,
            };
            assert!(
                ok,
                "{}: {k}: manifest {want}, written {got:?}",
                dir.display()
            );
        }
    }
}

#[test]
fn tokenizer_json_becomes_gpt2_arrays() {
    let json = br#"{
      "added_tokens": [
        {"id": 0, "content": "<bos>", "special": true},
        {"id": 5, "content": "<user>", "special": false}
      ],
      "model": {"type": "BPE", "vocab": {"a": 1, "b": 2, "ab": 3, "c": 4},
                "merges": ["a b", ["ab", "c"]]}
    }"#;
    let kv = convert::tokenizer_metadata(json, 8).expect("tokenizer");
    let mut w = GgufWriter::new();
    for (k, v) in kv {
        w.add(&k, v).expect("metadata");
    }
    let bytes = w.to_bytes().expect("write");
    let file = GgufFile::from_bytes(&bytes).expect("read back");
    assert_eq!(file.get_str("tokenizer.ggml.model").expect("model"), "gpt2");
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens").expect("tokens"),
        ["<bos>", "a", "b", "ab", "c", "<user>", "[PAD6]", "[PAD7]"]
    );
    assert_eq!(
        file.get_i32_array("tokenizer.ggml.token_type")
            .expect("types"),
        [3, 1, 1, 1, 1, 4, 5, 5]
    );
    assert_eq!(
        file.get_str_array("tokenizer.ggml.merges").expect("merges"),
        ["a b", "ab c"]
    );
    assert!(convert::tokenizer_metadata(b"{\"model\": {\"type\": \"Unigram\"}}", 8).is_err());
}

/// The official DeepSeek V4 `tokenizer.json` (committed, gzipped, by the tokenizer fixtures)
/// through our GGUF arrays must tokenize exactly as HF `tokenizers` did (`encode.json`).
#[test]
fn real_tokenizer_survives_the_gguf_arrays() {
    use std::io::Read;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer");
    let gz = std::fs::File::open(root.join("tokenizer.json.gz")).expect("tokenizer.json.gz");
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut json)
        .expect("gunzip");
    let n_vocab = ds4_model::tokenizer::DS4_N_VOCAB;
    let mut w = GgufWriter::new();
    for (k, v) in convert::tokenizer_metadata(&json, n_vocab).expect("tokenizer metadata") {
        w.add(&k, v).expect("metadata");
    }
    let bytes = w.to_bytes().expect("write");
    let file = GgufFile::from_bytes(&bytes).expect("read back");
    let tokens: Vec<String> = file
        .get_str_array("tokenizer.ggml.tokens")
        .expect("tokens")
        .into_iter()
        .map(str::to_string)
        .collect();
    assert_eq!(tokens.len(), n_vocab);
    let merges: Vec<String> = file
        .get_str_array("tokenizer.ggml.merges")
        .expect("merges")
        .into_iter()
        .map(str::to_string)
        .collect();
    let types = file
        .get_i32_array("tokenizer.ggml.token_type")
        .expect("types");
    ds4_model::tokenizer::check_gguf_kind(
        file.get_str("tokenizer.ggml.model").expect("model"),
        file.get_str("tokenizer.ggml.pre").ok(),
    )
    .expect("gpt2 / joyai-llm");
    let tok = ds4_model::tokenizer::Tokenizer::from_gguf_parts(tokens, merges, types)
        .expect("tokenizer from our arrays");
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("encode.json")).expect("encode.json"),
    )
    .expect("json");
    let cases = cases["cases"].as_array().expect("cases");
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids_special"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(tok.encode(text, true), want, "{text:?}");
    }
    assert!(cases.len() > 100);
}

/// A checkpoint directory with a `tokenizer.json` gets the tokenizer records; the file
/// still loads in the engine.
#[test]
fn tokenizer_json_in_the_checkpoint_is_written() {
    let scratch = Scratch::new("tok");
    let dir = &fixture_dirs()[0];
    let ck_dir = scratch.0.join("ck");
    std::fs::create_dir_all(&ck_dir).expect("mkdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join("checkpoint").join(f), ck_dir.join(f)).expect("copy");
    }
    std::fs::write(
        ck_dir.join("tokenizer.json"),
        r#"{"added_tokens": [{"id": 0, "content": "<bos>", "special": true},
                              {"id": 1, "content": "<eos>", "special": true}],
            "model": {"type": "BPE", "vocab": {"a": 2, "b": 3, "ab": 4}, "merges": ["a b"]}}"#,
    )
    .expect("write tokenizer.json");
    let out = scratch.0.join("t.gguf");
    let opts = ConvertOptions {
        preset: Preset::Q8,
        name: Some("tiny-tok".into()),
    };
    let report = convert::convert(&ck_dir, &out, &opts, &mut |_| {}).expect("convert");
    assert!(report.tokenizer);
    let file = GgufFile::open(&out).expect("open");
    let n_vocab = hf_config(dir).n_vocab;
    assert_eq!(
        file.get_str_array("tokenizer.ggml.tokens")
            .expect("tokens")
            .len(),
        n_vocab
    );
    assert_eq!(file.get_str("general.name").expect("name"), "tiny-tok");
    assert_eq!(file.get_u32("tokenizer.ggml.bos_token_id").expect("bos"), 0);
    Model::load(&out, &no_sim()).expect("engine load");
}

// =========================================================================================
// Tensors.

/// The expected bytes of one tensor: the checkpoint values through ds4-quant, one row at a
/// time, IQ2_XXS rows weighed by their expert matrix's column energy.
fn expected_bytes(src: &ds4_tensor::HostTensor, dtype: DType) -> Vec<u8> {
    if dtype == DType::I32 {
        return src.data().to_vec();
    }
    let dims = src.shape.dims();
    let n_cols = dims[0] as usize;
    let n = src.shape.elem_count().expect("count") as usize;
    let mut x = vec![0.0f32; n];
    ds4_quant::row::dequantize(src.dtype, src.data(), &mut x).expect("decode source");
    let per_matrix = if dims.len() == 3 {
        n_cols * dims[1] as usize
    } else {
        n
    };
    let mut out = Vec::new();
    for m in x.chunks(per_matrix) {
        let imp =
            (dtype == DType::Iq2Xxs).then(|| ds4_quant::iq2_xxs_quantize::column_energy(m, n_cols));
        for row in m.chunks(n_cols) {
            ds4_quant::row::quantize(dtype, row, imp.as_deref(), &mut out).expect("quantize");
        }
    }
    out
}

fn dequant(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    ds4_quant::row::dequantize(dtype, bytes, &mut v).expect("dequantize");
    v
}

#[test]
fn every_preset_writes_the_type_map_and_loads() {
    let scratch = Scratch::new("types");
    for dir in fixture_dirs() {
        let ck = Checkpoint::open(&dir.join("checkpoint")).expect("checkpoint");
        let names = ck.names();
        for preset in Preset::ALL {
            let (path, report) = convert_fixture(&dir, preset, &scratch.0);
            let file = GgufFile::open(&path).expect("open written gguf");
            let ctx = format!("{} {preset}", fixture_name(&dir));
            assert_eq!(
                file.get_str("general.architecture").expect("arch"),
                "deepseek4"
            );
            assert_eq!(file.tensors().len(), names.len(), "{ctx}: tensor count");
            assert!(!report.tokenizer, "{ctx}: fixtures have no tokenizer.json");
            assert!(file.get("tokenizer.ggml.tokens").is_none());
            for name in &names {
                let src = ck.tensor(name).expect("listed");
                let info = file
                    .tensor_info(name)
                    .unwrap_or_else(|| panic!("{ctx}: {name} missing"));
                assert_eq!(info.shape.dims(), src.shape.dims(), "{ctx}: {name} shape");
                let role = convert::role(name).expect("known name");
                let want = preset.dtype(role);
                let ne0 = src.shape.dims()[0];
                let fitted = convert::fit_dtype(want, ne0);
                assert_eq!(info.dtype, fitted, "{ctx}: {name} type");
                // The fallback chain is exactly: the preset's type when its block divides
                // the row, else Q8_0 when 32 divides it, else F16.
                let first_fit = if want.is_quantized() {
                    [want, DType::Q8_0, DType::F16]
                        .into_iter()
                        .find(|t| !t.is_quantized() || ne0 % t.block_elems() as u64 == 0)
                        .expect("F16 always fits")
                } else {
                    want
                };
                assert_eq!(fitted, first_fit, "{ctx}: {name} fallback");
                match role {
                    Role::Vector => assert_eq!(info.dtype, DType::F32),
                    Role::Ids => assert_eq!(info.dtype, DType::I32),
                    Role::F16Matrix => assert_eq!(info.dtype, DType::F16),
                    _ if preset == Preset::F16 => assert_eq!(info.dtype, DType::F16),
                    _ => {}
                }
                let got = file.tensor_data(name).expect("data");
                let expect = expected_bytes(&src, info.dtype);
                assert!(got == expect.as_slice(), "{ctx}: {name} bytes differ");
                if matches!(preset, Preset::F16 | Preset::Q8) && info.dtype != DType::I32 {
                    let n = src.shape.elem_count().expect("count") as usize;
                    assert_eq!(
                        dequant(info.dtype, got, n),
                        dequant(info.dtype, &expect, n),
                        "{ctx}: {name} values"
                    );
                }
            }
            let fallbacks: Vec<_> = report.fallbacks().map(|t| t.name.as_str()).collect();
            if preset != Preset::F16 {
                // Tiny rows (24..128 values) never hold a 256-value block.
                assert!(
                    report
                        .tensors
                        .iter()
                        .filter(|t| t.wanted.block_elems() == 256)
                        .all(|t| t.dtype != t.wanted),
                    "{ctx}: a K/IQ type fit a tiny row"
                );
            } else {
                assert!(fallbacks.is_empty(), "{ctx}: f16 never falls back");
            }
            Model::load(&path, &no_sim()).unwrap_or_else(|e| panic!("{ctx}: engine load: {e}"));
        }
    }
}

/// A GGUF can be re-typed: f16 file -> q8 file gives the direct q8 conversion's types and
/// shapes, keeps the metadata, and loads.
#[test]
fn gguf_input_is_re_typed() {
    let scratch = Scratch::new("regguf");
    let dir = &fixture_dirs()[0];
    let (f16, _) = convert_fixture(dir, Preset::F16, &scratch.0);
    let (direct, _) = convert_fixture(dir, Preset::Q8, &scratch.0);
    let out = scratch.0.join("re.gguf");
    let opts = ConvertOptions {
        preset: Preset::Q8,
        name: None,
    };
    let report = convert::convert(&f16, &out, &opts, &mut |_| {}).expect("re-type");
    assert_eq!(report.config, hf_config(dir));
    let (a, b) = (
        GgufFile::open(&out).expect("open"),
        GgufFile::open(&direct).expect("open"),
    );
    assert_eq!(a.tensors().len(), b.tensors().len());
    for t in b.tensors() {
        let u = a.tensor_info(&t.name).expect("same names");
        assert_eq!((u.dtype, &u.shape), (t.dtype, &t.shape), "{}", t.name);
    }
    assert_eq!(
        a.get_str("general.name").expect("name"),
        fixture_name(dir),
        "general.name carried over"
    );
    Model::load(&out, &no_sim()).expect("engine load");
}

#[test]
fn failed_conversion_leaves_no_file() {
    let scratch = Scratch::new("fail");
    let out = scratch.0.join("x.gguf");
    let opts = ConvertOptions {
        preset: Preset::Q8,
        name: None,
    };
    let err = convert::convert(&scratch.0, &out, &opts, &mut |_| {});
    assert!(err.is_err(), "an empty directory is not a checkpoint");
    assert!(!out.exists());
    assert!(!scratch.0.join("x.gguf.tmp").exists());
}

// =========================================================================================
// Logits.

/// A deterministic prompt: BOS, then ids spread over the vocabulary.
fn prompt(n_vocab: usize, n: usize) -> Vec<u32> {
    std::iter::once(0)
        .chain((1..n as u32).map(|i| (i * 7919 + 13) % n_vocab as u32))
        .collect()
}

fn logits(path: &Path, tokens: &[u32]) -> (Vec<f32>, usize) {
    let model = Model::load(path, &no_sim()).expect("load");
    let v = model.config().n_vocab;
    let mut s = Session::new(&model, tokens.len() + 1);
    (s.feed_all_logits(tokens).expect("feed"), v)
}

/// Per-position KL(softmax(reference) || softmax(test)) in nats.
fn kl_per_position(reference: &[f32], test: &[f32], n_vocab: usize) -> Vec<f64> {
    let log_softmax = |row: &[f32]| {
        let m = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        row.iter().map(|&x| x as f64 - lse).collect::<Vec<f64>>()
    };
    reference
        .chunks(n_vocab)
        .zip(test.chunks(n_vocab))
        .map(|(r, t)| {
            let (lp, lq) = (log_softmax(r), log_softmax(t));
            lp.iter()
                .zip(&lq)
                .map(|(p, q)| p.exp() * (p - q))
                .sum::<f64>()
        })
        .collect()
}

/// Mean over positions of KL(softmax(reference) || softmax(test)), in nats.
fn mean_kl(reference: &[f32], test: &[f32], n_vocab: usize) -> f64 {
    let kl = kl_per_position(reference, test, n_vocab);
    kl.iter().sum::<f64>() / kl.len() as f64
}

/// (median, max) of the per-position KL.
fn kl_median_max(reference: &[f32], test: &[f32], n_vocab: usize) -> (f64, f64) {
    let mut kl = kl_per_position(reference, test, n_vocab);
    kl.sort_by(f64::total_cmp);
    (kl[kl.len() / 2], kl[kl.len() - 1])
}

/// One row of the KL table.
struct KlRow {
    model: String,
    preset: Preset,
    mean: f64,
    median: f64,
    max: f64,
    /// Types of the routed gate/up/down tensors, when reported.
    experts: Vec<String>,
}

impl KlRow {
    fn new(
        model: &str,
        preset: Preset,
        want: &[f32],
        got: &[f32],
        n_vocab: usize,
        experts: Vec<String>,
    ) -> KlRow {
        let (median, max) = kl_median_max(want, got, n_vocab);
        KlRow {
            model: model.to_string(),
            preset,
            mean: mean_kl(want, got, n_vocab),
            median,
            max,
            experts,
        }
    }
}

const PROMPT_LEN: usize = 48;

/// Shorter for the wide model, whose forward pass is four times the work.
const WIDE_PROMPT_LEN: usize = 32;

/// BF16 -> F16 is exact for a value in F16's normal range (|x| in [2^-14, 65504], or 0) and
/// for a subnormal with few enough significant bits; the test checks every value of every
/// matrix the f16 preset stores as F16, so exact equality of logits is the expectation.
#[test]
fn f16_preset_gives_the_checkpoint_logits() {
    let scratch = Scratch::new("f16");
    for dir in fixture_dirs() {
        let ck = Checkpoint::open(&dir.join("checkpoint")).expect("checkpoint");
        let mut inexact = 0usize;
        for name in ck.names() {
            let t = ck.tensor(name).expect("listed");
            if t.dtype == DType::I32 || convert::role(name) == Some(Role::Vector) {
                continue;
            }
            let n = t.shape.elem_count().expect("count") as usize;
            let x = dequant(t.dtype, t.data(), n);
            let mut h = Vec::new();
            ds4_quant::row::quantize(DType::F16, &x, None, &mut h).expect("f16");
            let y = dequant(DType::F16, &h, n);
            inexact += x.iter().zip(&y).filter(|(a, b)| a != b).count();
        }
        let (path, _) = convert_fixture(&dir, Preset::F16, &scratch.0);
        let ck_dir = dir.join("checkpoint");
        let cfg = hf_config(&dir);
        let tokens = prompt(cfg.n_vocab, PROMPT_LEN);
        let (want, v) = logits(&ck_dir, &tokens);
        let (got, _) = logits(&path, &tokens);
        let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = want
            .iter()
            .zip(&got)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        println!(
            "{}: {inexact} values not exact in F16; max |dlogit| / max |logit| = {:.3e}",
            fixture_name(&dir),
            diff / scale
        );
        assert!(
            diff <= 1e-4 * scale,
            "{}: {diff} > 1e-4 * {scale}",
            dir.display()
        );
        if inexact == 0 {
            assert_eq!(got, want, "{}: exact weights, logits differ", dir.display());
        }
        assert_eq!(got.len(), tokens.len() * v);
    }
}

// =========================================================================================
// A wider random model, so that q4/q2 really write Q4_K, Q2_K and IQ2_XXS.
//
// No fixture row holds a 256-value block, so on the fixtures q4 and q2 fall back to the q8
// types. This model takes m2_lcpp's shape with d = F = 256 and the fixture generator's
// initialisation rules (tests/fixtures/model/regenerate.py `randomize`), in f32.

struct MapSource(HashMap<String, HostTensor>);

impl TensorSource for MapSource {
    fn tensor(&self, name: &str) -> Option<HostTensor> {
        self.0.get(name).cloned()
    }
}

/// SplitMix64 with Box-Muller: deterministic, dependency-free random numbers.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

enum Init {
    Normal(f64),
    /// N(0, 1/fan_in), fan_in = the last numpy dim.
    Linear,
    Uniform(f64, f64),
}

fn wide_config() -> Config {
    let dir = fixture_dirs()
        .into_iter()
        .find(|d| fixture_name(d) == "m2_lcpp")
        .expect("m2_lcpp fixture");
    let mut cfg = hf_config(&dir);
    cfg.n_embd = 256;
    cfg.n_ff_exp = 256;
    cfg.validate().expect("wide config valid");
    cfg
}

fn random_model(cfg: &Config, seed: u64) -> MapSource {
    let mut rng = Rng(seed);
    let mut map = HashMap::new();
    let mut add = |name: String, dims: &[usize], init: Init| {
        let n: usize = dims.iter().product();
        let fan_in = *dims.last().expect("dims") as f64;
        let v: Vec<f32> = (0..n)
            .map(|_| match init {
                Init::Normal(std) => (rng.normal() * std) as f32,
                Init::Linear => (rng.normal() / fan_in.sqrt()) as f32,
                Init::Uniform(lo, hi) => (lo + (hi - lo) * rng.uniform()) as f32,
            })
            .collect();
        let dims: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        map.insert(name.clone(), HostTensor::from_f32(&name, &dims, &v));
    };
    let (d, v, nhc, mix) = (cfg.n_embd, cfg.n_vocab, cfg.n_hc, cfg.n_hc_mix());
    let (h, hd, rq) = (cfg.n_head, cfg.head_dim, cfg.q_lora_rank);
    let (g, ro) = (cfg.n_out_group, cfg.o_lora_rank);
    let (e, f, fs) = (cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp());
    let norm = || Init::Uniform(0.5, 1.5);
    add("token_embd.weight".into(), &[v, d], Init::Normal(1.0));
    add("output_hc_fn.weight".into(), &[nhc, nhc * d], Init::Linear);
    add("output_hc_base.weight".into(), &[nhc], Init::Normal(0.5));
    add("output_hc_scale.weight".into(), &[1], norm());
    add("output_norm.weight".into(), &[d], norm());
    add("output.weight".into(), &[v, d], Init::Linear);
    let mut tid2eid = Vec::new();
    for il in 0..cfg.n_layer {
        let n = |s: &str| format!("blk.{il}.{s}");
        for hc in ["hc_attn", "hc_ffn"] {
            add(n(&format!("{hc}_fn.weight")), &[mix, nhc * d], Init::Linear);
            add(n(&format!("{hc}_base.weight")), &[mix], Init::Normal(0.5));
            add(n(&format!("{hc}_scale.weight")), &[3], norm());
        }
        add(n("attn_norm.weight"), &[d], norm());
        add(n("ffn_norm.weight"), &[d], norm());
        add(n("attn_q_a.weight"), &[rq, d], Init::Linear);
        add(n("attn_q_a_norm.weight"), &[rq], norm());
        add(n("attn_q_b.weight"), &[h * hd, rq], Init::Linear);
        add(n("attn_kv.weight"), &[hd, d], Init::Linear);
        add(n("attn_kv_a_norm.weight"), &[hd], norm());
        add(n("attn_sinks.weight"), &[h], Init::Normal(1.0));
        add(
            n("attn_output_a.weight"),
            &[g * ro, h * hd / g],
            Init::Linear,
        );
        add(n("attn_output_b.weight"), &[d, g * ro], Init::Linear);
        let ratio = cfg.compress_ratio(il);
        let coff = if ratio == 4 { 2 } else { 1 };
        let mut compressor = |prefix: &str, w: usize| {
            add(
                n(&format!("{prefix}_kv.weight")),
                &[coff * w, d],
                Init::Linear,
            );
            add(
                n(&format!("{prefix}_gate.weight")),
                &[coff * w, d],
                Init::Linear,
            );
            add(
                n(&format!("{prefix}_ape.weight")),
                &[ratio, coff * w],
                Init::Normal(0.5),
            );
            add(n(&format!("{prefix}_norm.weight")), &[w], norm());
        };
        if ratio > 0 {
            compressor("attn_compressor", hd);
        }
        if ratio == 4 {
            let (hi, di) = (cfg.n_indexer_head, cfg.indexer_head_dim);
            compressor("indexer_compressor", di);
            add(n("indexer.attn_q_b.weight"), &[hi * di, rq], Init::Linear);
            add(n("indexer.proj.weight"), &[hi, d], Init::Linear);
        }
        add(n("ffn_gate_inp.weight"), &[e, d], Init::Linear);
        if cfg.is_hash_layer(il) {
            tid2eid.push(n("ffn_gate_tid2eid.weight"));
        } else {
            add(n("exp_probs_b.bias"), &[e], Init::Normal(0.25));
        }
        add(n("ffn_gate_exps.weight"), &[e, f, d], Init::Linear);
        add(n("ffn_up_exps.weight"), &[e, f, d], Init::Linear);
        add(n("ffn_down_exps.weight"), &[e, d, f], Init::Linear);
        add(n("ffn_gate_shexp.weight"), &[fs, d], Init::Linear);
        add(n("ffn_up_shexp.weight"), &[fs, d], Init::Linear);
        add(n("ffn_down_shexp.weight"), &[d, fs], Init::Linear);
    }
    for name in tid2eid {
        let k = cfg.n_expert_used;
        let bytes: Vec<u8> = (0..v * k)
            .flat_map(|_| ((rng.next_u64() % e as u64) as i32).to_le_bytes())
            .collect();
        let t = HostTensor {
            name: name.clone(),
            dtype: DType::I32,
            shape: Shape::from_numpy(&[v as u64, k as u64]),
            bytes: TensorBytes::Owned(std::sync::Arc::new(bytes)),
        };
        map.insert(name, t);
    }
    MapSource(map)
}

/// Logits of the random wide model in f32 (the reference) and through each preset's file.
fn wide_kl(presets: &[Preset]) -> Vec<KlRow> {
    let scratch = Scratch::new("wide");
    let cfg = wide_config();
    let src = random_model(&cfg, 4000);
    let names: Vec<&str> = src.0.keys().map(String::as_str).collect();
    let tokens = prompt(cfg.n_vocab, WIDE_PROMPT_LEN);
    let weights = ds4_model::weights::Weights::bind(&cfg, &src).expect("bind random model");
    let model = Model::from_parts(
        cfg.clone(),
        weights,
        std::sync::Arc::new(ds4_model::cpu::CpuBackend),
        &no_sim(),
    )
    .expect("model");
    let want = Session::new(&model, tokens.len() + 1)
        .feed_all_logits(&tokens)
        .expect("feed");
    let mut rows = Vec::new();
    for &preset in presets {
        let out = scratch.0.join(format!("wide-{preset}.gguf"));
        let opts = ConvertOptions {
            preset,
            name: Some("wide".into()),
        };
        let report =
            convert::convert_source(&cfg, &src, &names, Vec::new(), &out, &opts, &mut |_| {})
                .expect("convert random model");
        let expert_types: Vec<String> = ["ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
            .iter()
            .map(|s| {
                let t = report
                    .tensors
                    .iter()
                    .find(|t| t.name == format!("blk.1.{s}.weight"))
                    .expect("expert tensor");
                t.dtype.name().to_string()
            })
            .collect();
        if let Some(keep) = std::env::var_os("DS4_CONVERT_KEEP") {
            // For one-off checks with other readers (gguf-py): keep the files.
            std::fs::copy(&out, Path::new(&keep).join(format!("wide-{preset}.gguf")))
                .expect("copy to DS4_CONVERT_KEEP");
        }
        let (got, v) = logits(&out, &tokens);
        rows.push(KlRow::new(
            "w256 (random)",
            preset,
            &want,
            &got,
            v,
            expert_types,
        ));
    }
    rows
}

/// q4 and q2 on the wide model write ds4's real routed types and degrade in the expected
/// order; bounds are generous (measured values in docs/QUANT.md).
#[test]
fn wide_model_uses_k_and_iq_types() {
    let rows = wide_kl(&[Preset::Q8, Preset::Q4, Preset::Q2]);
    for r in &rows {
        println!(
            "{} {}: mean KL {:.3e}, experts {:?}",
            r.model, r.preset, r.mean, r.experts
        );
    }
    assert_eq!(rows[0].experts, ["Q8_0", "Q8_0", "Q8_0"]);
    assert_eq!(rows[1].experts, ["Q4_K", "Q4_K", "Q4_K"]);
    assert_eq!(rows[2].experts, ["IQ2_XXS", "IQ2_XXS", "Q2_K"]);
    let (q8, q4, q2) = (rows[0].mean, rows[1].mean, rows[2].mean);
    assert!(
        q8 < q4 && q4 < q2,
        "KL not ordered: q8 {q8}, q4 {q4}, q2 {q2}"
    );
    assert!(
        q8 < KL_BOUND && q4 < 0.1 && q2 < 1.0,
        "q8 {q8}, q4 {q4}, q2 {q2}"
    );
}

/// A minimal `.npy` reader for the fixtures' little-endian `<f4` / `<i4` C-order arrays.
fn read_npy(path: &Path) -> Vec<f64> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY", "{}", path.display());
    let (hlen, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[start..start + hlen]).expect("ascii header");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let data = b[start + hlen..].chunks_exact(4);
    if header.contains("'<f4'") {
        data.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect()
    } else if header.contains("'<i4'") {
        data.map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
            .collect()
    } else {
        panic!("{}: unsupported dtype in {header}", path.display())
    }
}

/// The converted f16 file against the independent oracle: transformers' logits over the
/// fixture prompt (`logits.npy`), with the fixture bar of 1e-4 of the logit scale at every
/// position and the same argmax everywhere.
#[test]
fn f16_file_matches_transformers() {
    let scratch = Scratch::new("oracle");
    for dir in fixture_dirs() {
        let (path, _) = convert_fixture(&dir, Preset::F16, &scratch.0);
        let tokens: Vec<u32> = read_npy(&dir.join("prompt.npy"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        let want = read_npy(&dir.join("logits.npy"));
        let (got, v) = logits(&path, &tokens);
        assert_eq!(got.len(), want.len());
        let mut worst = 0.0f64;
        for (pos, (g, w)) in got.chunks(v).zip(want.chunks(v)).enumerate() {
            let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let diff = g
                .iter()
                .zip(w)
                .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            worst = worst.max(diff / scale);
            let argmax = |r: &mut dyn Iterator<Item = f64>| {
                r.enumerate()
                    .fold(
                        (0, f64::NEG_INFINITY),
                        |b, (i, x)| if x > b.1 { (i, x) } else { b },
                    )
                    .0
            };
            assert_eq!(
                argmax(&mut g.iter().map(|&x| x as f64)),
                argmax(&mut w.iter().copied()),
                "{}: argmax at {pos}",
                dir.display()
            );
        }
        println!(
            "{}: worst relative logit error vs transformers {worst:.2e}",
            fixture_name(&dir)
        );
        assert!(worst <= 1e-4, "{}: {worst}", dir.display());
    }
}

/// The bytes do not depend on the thread count (rows are independent; IQ2_XXS importance is
/// computed per expert matrix before the rows are split).
#[test]
fn output_does_not_depend_on_threads() {
    let mut rng = Rng(4001);
    let dims = [4u64, 64, 256]; // 4 experts of 64 rows x 256 columns
    let v: Vec<f32> = (0..4 * 64 * 256)
        .map(|_| rng.normal() as f32 / 16.0)
        .collect();
    let t = HostTensor::from_f32("blk.0.ffn_gate_exps.weight", &dims, &v);
    for dtype in [DType::Iq2Xxs, DType::Q2K, DType::Q4K, DType::Q8_0] {
        let files: Vec<Vec<u8>> = [1, 3]
            .iter()
            .map(|&threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                pool.install(|| convert::encode_tensor(&t, dtype))
                    .expect("encode")
            })
            .collect();
        assert!(files[0] == files[1], "{dtype}: 1 and 3 threads differ");
        assert_eq!(files[0], expected_bytes(&t, dtype), "{dtype}");
    }
}

/// Mean KL per preset and model against the checkpoint (BF16 weights, f32 compute).
fn kl_table(presets: &[Preset]) -> Vec<KlRow> {
    let scratch = Scratch::new("kl");
    let mut rows = Vec::new();
    for dir in fixture_dirs() {
        let cfg = hf_config(&dir);
        let tokens = prompt(cfg.n_vocab, PROMPT_LEN);
        let (want, v) = logits(&dir.join("checkpoint"), &tokens);
        for &preset in presets {
            let (path, _) = convert_fixture(&dir, preset, &scratch.0);
            let (got, _) = logits(&path, &tokens);
            rows.push(KlRow::new(
                &fixture_name(&dir),
                preset,
                &want,
                &got,
                v,
                Vec::new(),
            ));
            let _ = std::fs::remove_file(&path);
        }
    }
    rows
}

/// A generous bound: a 4-layer random model with Q8_0 attention and experts stays below
/// 0.01 nats per token (measured: 1.5e-3 to 6.0e-3, docs/QUANT.md); a wrong type, a
/// transposed tensor or a mixed-up expert gives KL of order 1.
const KL_BOUND: f64 = 0.01;

#[test]
fn quantized_presets_stay_close_to_the_checkpoint() {
    for KlRow {
        model,
        preset,
        mean: kl,
        ..
    } in kl_table(&[Preset::Q8, Preset::Q2])
    {
        println!("{model} {preset}: mean KL {kl:.3e}");
        assert!(kl.is_finite() && kl >= -1e-12, "{model} {preset}: KL {kl}");
        assert!(
            kl < KL_BOUND,
            "{model} {preset}: mean KL {kl} >= {KL_BOUND}"
        );
    }
}

#[test]
#[ignore = "slow"]
fn presets_kl_table() {
    println!("| model | preset | routed gate/up/down | mean KL | median KL | max KL |");
    println!("|---|---|---|---:|---:|---:|");
    for r in kl_table(&Preset::ALL)
        .into_iter()
        .chain(wide_kl(&Preset::ALL))
    {
        let experts = if r.experts.is_empty() {
            "(see text)".to_string()
        } else {
            r.experts.join("/")
        };
        println!(
            "| {} | {} | {experts} | {:.2e} | {:.2e} | {:.2e} |",
            r.model, r.preset, r.mean, r.median, r.max
        );
    }
}
