//! The converter: a Hugging Face checkpoint directory (or a ds4 GGUF, re-typed) to a
//! ds4-layout GGUF file.
//!
//! It writes what ds4 (`ds4.c: config_validate_model`, `weights_validate_layout`) and our
//! loader ([`crate::gguf`]) read: the `deepseek4.*` metadata of MODEL.md s1.4 with the value
//! types of FORMATS.md s1.11 ([`config_metadata`], the inverse of [`Config::from_gguf`]), the
//! tokenizer arrays when the directory has a `tokenizer.json` ([`tokenizer_metadata`]), and
//! every tensor under its GGUF name in the type a [`Preset`] assigns (FORMATS.md s3.2/s3.3):
//!
//! | role ([`Role`]) | f16 | q8 | q4 | q2 |
//! |---|---|---|---|---|
//! | norms, biases, sinks, HC base/scale (1-D) | F32 | F32 | F32 | F32 |
//! | `ffn_gate_tid2eid` | I32 | I32 | I32 | I32 |
//! | embedding, router, HC fn, compressor, indexer | F16 | F16 | F16 | F16 |
//! | attention, shared experts, `output` | F16 | Q8_0 | Q8_0 | Q8_0 |
//! | routed `ffn_gate_exps`, `ffn_up_exps` | F16 | Q8_0 | Q4_K | IQ2_XXS |
//! | routed `ffn_down_exps` | F16 | Q8_0 | Q4_K | Q2_K |
//!
//! q4 and q2 are ds4's published maps; q8 is ds4's map with Q8_0 experts; f16 stores every
//! matrix as F16 and keeps the 1-D tensors F32 and the hash table I32 (so f16 is the
//! lossless preset for BF16 checkpoints whose values lie in F16's normal range).
//!
//! A block type needs a row length (`ne[0]`) that is a multiple of its block: 32 for Q8_0,
//! 256 for Q2_K, Q4_K and IQ2_XXS. Tiny test models have rows of 24 to 128 values, so a tensor
//! whose row does not fit falls back along K/IQ -> Q8_0 -> F16 ([`fit_dtype`]); every fallback
//! is reported in [`ConvertReport::fallbacks`] (and printed by `ds4 convert`), deliberately not
//! recorded in the file: the tensor types in the file already say what was written.
//!
//! Quantization is ds4's imatrix-less path (FORMATS.md s2.9): Q8_0, and the reference
//! (unweighted) Q2_K/Q4_K search; IQ2_XXS weighs each column by ds4's synthetic importance,
//! the column energy `Σ_rows w[row][col]²` of each expert matrix
//! ([`ds4_quant::iq2_xxs_quantize::column_energy`]). Rows are quantized in parallel on the
//! current rayon pool; the bytes do not depend on the thread count.
//!
//! The file is streamed: the header is laid out first by [`GgufWriter`] (from the planned
//! types and shapes alone), then each tensor is converted and appended, so memory stays at
//! about one tensor (plus whatever the source holds: [`Checkpoint`] stacks the per-expert
//! tensors in memory). It is written to `OUT.tmp` and renamed at the end, so an error never
//! leaves a partial `OUT`.
//!
//! Not handled: the FP8/FP4 tensors of the official hub checkpoint (the [`Checkpoint`] reader
//! takes F32/F16/BF16/I32/I64 only), imatrix files, and MTP tensors (`mtp.*`).

use std::io::Write;
use std::path::{Path, PathBuf};

use ds4_tensor::gguf::{GgufFile, GgufWriter, OwnedArray, OwnedValue};
use ds4_tensor::{DType, HostTensor};
use rayon::prelude::*;
use serde_json::Value;

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::error::{Error, Result, tensor_err};
use crate::weights::{TensorSource, Weights};

// =========================================================================================
// Presets and the type map.

/// A conversion preset: which type each tensor role gets (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    /// Every matrix F16; 1-D tensors F32; `tid2eid` I32.
    F16,
    /// ds4's map with routed experts in Q8_0.
    Q8,
    /// ds4's q4 map: routed experts Q4_K.
    Q4,
    /// ds4's q2 map: routed gate/up IQ2_XXS, routed down Q2_K.
    Q2,
}

impl Preset {
    /// All presets, from most to least precise.
    pub const ALL: [Preset; 4] = [Preset::F16, Preset::Q8, Preset::Q4, Preset::Q2];

    /// The preset's command-line name (`f16`, `q8`, `q4`, `q2`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::F16 => "f16",
            Preset::Q8 => "q8",
            Preset::Q4 => "q4",
            Preset::Q2 => "q2",
        }
    }

    /// Parses a command-line name.
    pub fn from_name(name: &str) -> Option<Preset> {
        Preset::ALL.into_iter().find(|p| p.name() == name)
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`) of the preset's dominant type:
    /// MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7, MOSTLY_Q4_K_M = 15, MOSTLY_IQ2_XXS = 19.
    /// Informative only; neither ds4 nor our loader reads it.
    pub fn file_type(self) -> u32 {
        match self {
            Preset::F16 => 1,
            Preset::Q8 => 7,
            Preset::Q4 => 15,
            Preset::Q2 => 19,
        }
    }

    /// The type this preset wants for a tensor of role `role`, before the row-length check.
    pub fn dtype(self, role: Role) -> DType {
        match (self, role) {
            (_, Role::Vector) => DType::F32,
            (_, Role::Ids) => DType::I32,
            (_, Role::F16Matrix) | (Preset::F16, _) => DType::F16,
            (_, Role::Q8Matrix) | (Preset::Q8, _) => DType::Q8_0,
            (Preset::Q4, Role::RoutedGateUp | Role::RoutedDown) => DType::Q4K,
            (Preset::Q2, Role::RoutedGateUp) => DType::Iq2Xxs,
            (Preset::Q2, Role::RoutedDown) => DType::Q2K,
        }
    }
}

impl std::fmt::Display for Preset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a tensor is, as far as its storage type goes (FORMATS.md s3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Norm weights, biases, sinks, HC bases and scales: always F32.
    Vector,
    /// The hash-routing table `ffn_gate_tid2eid`: always I32.
    Ids,
    /// Tensors ds4 keeps in F16 in every variant: embedding, router, HC `fn`, compressor and
    /// indexer projections and `ape`.
    F16Matrix,
    /// Tensors ds4 stores as Q8_0: attention projections, shared experts, `output`.
    Q8Matrix,
    /// Routed `ffn_gate_exps` / `ffn_up_exps`.
    RoutedGateUp,
    /// Routed `ffn_down_exps`.
    RoutedDown,
}

/// The role of the tensor called `name` (GGUF naming), or `None` for a name ds4 does not have.
pub fn role(name: &str) -> Option<Role> {
    let short = match name.strip_prefix("blk.") {
        Some(rest) => rest.split_once('.')?.1,
        None => name,
    };
    let role = match short {
        "output_norm.weight"
        | "output_hc_base.weight"
        | "output_hc_scale.weight"
        | "hc_attn_base.weight"
        | "hc_attn_scale.weight"
        | "hc_ffn_base.weight"
        | "hc_ffn_scale.weight"
        | "attn_norm.weight"
        | "ffn_norm.weight"
        | "attn_q_a_norm.weight"
        | "attn_kv_a_norm.weight"
        | "attn_sinks.weight"
        | "attn_compressor_norm.weight"
        | "indexer_compressor_norm.weight"
        | "exp_probs_b.bias" => Role::Vector,
        "ffn_gate_tid2eid.weight" => Role::Ids,
        "token_embd.weight"
        | "output_hc_fn.weight"
        | "hc_attn_fn.weight"
        | "hc_ffn_fn.weight"
        | "attn_compressor_ape.weight"
        | "attn_compressor_kv.weight"
        | "attn_compressor_gate.weight"
        | "indexer.attn_q_b.weight"
        | "indexer.proj.weight"
        | "indexer_compressor_ape.weight"
        | "indexer_compressor_kv.weight"
        | "indexer_compressor_gate.weight"
        | "ffn_gate_inp.weight" => Role::F16Matrix,
        "output.weight"
        | "attn_q_a.weight"
        | "attn_q_b.weight"
        | "attn_kv.weight"
        | "attn_output_a.weight"
        | "attn_output_b.weight"
        | "ffn_gate_shexp.weight"
        | "ffn_up_shexp.weight"
        | "ffn_down_shexp.weight" => Role::Q8Matrix,
        "ffn_gate_exps.weight" | "ffn_up_exps.weight" => Role::RoutedGateUp,
        "ffn_down_exps.weight" => Role::RoutedDown,
        _ => return None,
    };
    Some(role)
}

/// The type actually written for a row of `ne0` values when `want` is asked for: `want` if
/// `ne0` is a whole number of its blocks, else the next type along K/IQ -> Q8_0 -> F16.
pub fn fit_dtype(want: DType, ne0: u64) -> DType {
    let fits = |t: DType| ne0.is_multiple_of(t.block_elems() as u64);
    if fits(want) {
        want
    } else if want != DType::Q8_0 && want.is_quantized() && fits(DType::Q8_0) {
        DType::Q8_0
    } else {
        DType::F16
    }
}

// =========================================================================================
// Metadata.

const P: &str = "deepseek4.";

/// The `general.*` and `deepseek4.*` metadata of `cfg` (MODEL.md s1.4, FORMATS.md s1.11),
/// plus `tokenizer.ggml.bos/eos_token_id` when the config knows them.
///
/// Integers are UINT32, floats FLOAT32, `compress_ratios` an INT32 array (as llama.cpp
/// writes it; ds4 accepts INT32 and UINT32), the clamps FLOAT32 arrays and
/// `expert_weights_norm` a BOOL. [`Config::from_gguf`] of the result gives `cfg` back.
/// Without YaRN the scaling keys are still written (ds4 requires them) with type `none` and
/// factor 1.
pub fn config_metadata(cfg: &Config, name: &str) -> Vec<(String, OwnedValue)> {
    let u = |v: usize| OwnedValue::U32(v as u32);
    let f = OwnedValue::F32;
    let (yarn_type, factor, orig, fast, slow) = match &cfg.rope_yarn {
        Some(y) => ("yarn", y.factor, y.original_ctx, y.beta_fast, y.beta_slow),
        None => ("none", 1.0, cfg.n_ctx_train as u64, 32.0, 1.0),
    };
    let orig = match u32::try_from(orig) {
        Ok(v) => OwnedValue::U32(v),
        Err(_) => OwnedValue::U64(orig),
    };
    let mut kv: Vec<(String, OwnedValue)> = vec![
        ("general.architecture".into(), "deepseek4".into()),
        ("general.name".into(), name.into()),
    ];
    let mut add = |k: &str, v: OwnedValue| kv.push((format!("{P}{k}"), v));
    add("block_count", u(cfg.n_layer));
    add("context_length", u(cfg.n_ctx_train));
    add("embedding_length", u(cfg.n_embd));
    add("vocab_size", u(cfg.n_vocab));
    add("attention.head_count", u(cfg.n_head));
    add("attention.head_count_kv", u(1));
    add("attention.key_length", u(cfg.head_dim));
    add("attention.value_length", u(cfg.head_dim));
    add("rope.dimension_count", u(cfg.n_rot));
    add("attention.q_lora_rank", u(cfg.q_lora_rank));
    add("attention.output_lora_rank", u(cfg.o_lora_rank));
    add("attention.output_group_count", u(cfg.n_out_group));
    add("attention.sliding_window", u(cfg.sliding_window));
    add("attention.layer_norm_rms_epsilon", f(cfg.rms_eps));
    add("attention.indexer.head_count", u(cfg.n_indexer_head));
    add("attention.indexer.key_length", u(cfg.indexer_head_dim));
    add("attention.indexer.top_k", u(cfg.indexer_top_k));
    add(
        "attention.compress_ratios",
        OwnedArray::I32(cfg.compress_ratios.iter().map(|&r| r as i32).collect()).into(),
    );
    add(
        "attention.compress_rope_freq_base",
        f(cfg.compress_rope_freq_base),
    );
    add("rope.freq_base", f(cfg.rope_freq_base));
    add("rope.scaling.type", yarn_type.into());
    add("rope.scaling.factor", f(factor));
    add("rope.scaling.original_context_length", orig);
    add("rope.scaling.yarn_beta_fast", f(fast));
    add("rope.scaling.yarn_beta_slow", f(slow));
    add("expert_count", u(cfg.n_expert));
    add("expert_used_count", u(cfg.n_expert_used));
    add("expert_feed_forward_length", u(cfg.n_ff_exp));
    add("expert_shared_count", u(cfg.n_expert_shared));
    add("expert_weights_scale", f(cfg.expert_weights_scale));
    add(
        "expert_weights_norm",
        OwnedValue::Bool(cfg.expert_weights_norm),
    );
    add("expert_gating_func", u(4));
    add("hash_layer_count", u(cfg.n_hash_layer));
    add("swiglu_clamp_exp", cfg.swiglu_clamp_exp.clone().into());
    add("swiglu_clamp_shexp", cfg.swiglu_clamp_shexp.clone().into());
    add("hyper_connection.count", u(cfg.n_hc));
    add(
        "hyper_connection.sinkhorn_iterations",
        u(cfg.n_hc_sinkhorn_iter),
    );
    add("hyper_connection.epsilon", f(cfg.hc_eps));
    if let Some(id) = cfg.bos_token_id {
        kv.push(("tokenizer.ggml.bos_token_id".into(), OwnedValue::U32(id)));
    }
    if let Some(id) = cfg.eos_token_id {
        kv.push(("tokenizer.ggml.eos_token_id".into(), OwnedValue::U32(id)));
    }
    kv
}

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// The `tokenizer.ggml.*` arrays of a Hugging Face byte-level BPE `tokenizer.json`, as
/// llama.cpp's converter writes them for `gpt2` models (`_set_vocab_gpt2`).
///
/// `tokens` has `max(n_vocab, largest id + 1)` entries; ids that no token uses become
/// `[PAD{id}]` of type UNUSED. Added tokens are CONTROL when `special`, USER_DEFINED
/// otherwise; all others NORMAL. `tokenizer.ggml.pre` is `joyai-llm`, as in ds4's files. Merges are written as `"left right"` (either JSON form of
/// `model.merges` is accepted). `add_bos_token` is true, as the llama.cpp converter asserts
/// for this model. The bos/eos ids come from [`config_metadata`], not from here.
pub fn tokenizer_metadata(json: &[u8], n_vocab: usize) -> Result<Vec<(String, OwnedValue)>> {
    let bad = |what: String| Error::Load {
        path: "tokenizer.json".into(),
        what,
    };
    let v: Value = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let model = v
        .get("model")
        .ok_or_else(|| bad("no \"model\" object".into()))?;
    if let Some(t) = model.get("type").and_then(Value::as_str)
        && t != "BPE"
    {
        return Err(bad(format!("model type {t:?}, expected BPE")));
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no model.vocab object".into()))?;
    let mut entries: Vec<(usize, String, i32)> = Vec::with_capacity(vocab.len());
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry {tok:?}: id is not an integer")))?;
        entries.push((id as usize, tok.clone(), TOKEN_NORMAL));
    }
    for a in v
        .get("added_tokens")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let (Some(id), Some(content)) = (
            a.get("id").and_then(Value::as_u64),
            a.get("content").and_then(Value::as_str),
        ) else {
            return Err(bad(format!("malformed added token {a}")));
        };
        let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
        let ty = if special {
            TOKEN_CONTROL
        } else {
            TOKEN_USER_DEFINED
        };
        entries.push((id as usize, content.to_string(), ty));
    }
    let size = entries
        .iter()
        .map(|e| e.0 + 1)
        .max()
        .unwrap_or(0)
        .max(n_vocab);
    let mut tokens: Vec<Option<String>> = vec![None; size];
    let mut types = vec![TOKEN_UNUSED; size];
    for (id, tok, ty) in entries {
        // An added token may restate a vocab entry; the added-token type wins, as in llama.cpp.
        tokens[id] = Some(tok);
        if ty != TOKEN_NORMAL || types[id] == TOKEN_UNUSED {
            types[id] = ty;
        }
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) => match (
                p.first().and_then(Value::as_str),
                p.get(1).and_then(Value::as_str),
            ) {
                (Some(a), Some(b)) if p.len() == 2 => Ok(format!("{a} {b}")),
                _ => Err(bad(format!("malformed merge {m}"))),
            },
            _ => Err(bad(format!("malformed merge {m}"))),
        })
        .collect::<Result<_>>()?;
    Ok(vec![
        ("tokenizer.ggml.model".into(), "gpt2".into()),
        // The name the DS4 GGUFs declare (PROMPT.md s1.2); llama.cpp treats it as deepseek-v3.
        ("tokenizer.ggml.pre".into(), "joyai-llm".into()),
        (
            "tokenizer.ggml.tokens".into(),
            OwnedArray::String(tokens).into(),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            OwnedArray::I32(types).into(),
        ),
        (
            "tokenizer.ggml.merges".into(),
            OwnedArray::String(merges).into(),
        ),
        ("tokenizer.ggml.add_bos_token".into(), true.into()),
    ])
}

// =========================================================================================
// The plan: one entry per tensor, in file order.

/// One tensor of the output file.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    /// GGUF name.
    pub name: String,
    /// GGUF-order dims (`ne[0]` first).
    pub dims: Vec<u64>,
    /// The type the preset asked for.
    pub wanted: DType,
    /// The type written ([`fit_dtype`] of `wanted`).
    pub dtype: DType,
}

impl PlannedTensor {
    /// Bytes of the tensor's data in the file (before alignment padding).
    pub fn n_bytes(&self) -> u64 {
        let rows: u64 = self.dims[1..].iter().product();
        self.dtype
            .row_bytes(self.dims[0])
            .expect("fit_dtype chose a type whose block divides ne[0]")
            * rows
    }
}

/// File order: global input tensors, then the layers in order (each in MODEL.md s2 order),
/// then the output head. The order does not matter to any loader; it is fixed for
/// reproducible files.
fn order_key(name: &str) -> (usize, usize, usize) {
    const LAYER_ORDER: &[&str] = &[
        "hc_attn_fn",
        "hc_attn_base",
        "hc_attn_scale",
        "attn_norm",
        "attn_q_a",
        "attn_q_a_norm",
        "attn_q_b",
        "attn_kv",
        "attn_kv_a_norm",
        "attn_sinks",
        "attn_output_a",
        "attn_output_b",
        "attn_compressor_kv",
        "attn_compressor_gate",
        "attn_compressor_ape",
        "attn_compressor_norm",
        "indexer.attn_q_b",
        "indexer.proj",
        "indexer_compressor_kv",
        "indexer_compressor_gate",
        "indexer_compressor_ape",
        "indexer_compressor_norm",
        "hc_ffn_fn",
        "hc_ffn_base",
        "hc_ffn_scale",
        "ffn_norm",
        "ffn_gate_inp",
        "exp_probs_b",
        "ffn_gate_tid2eid",
        "ffn_gate_exps",
        "ffn_up_exps",
        "ffn_down_exps",
        "ffn_gate_shexp",
        "ffn_up_shexp",
        "ffn_down_shexp",
    ];
    const GLOBAL_ORDER: &[&str] = &[
        "output_hc_fn",
        "output_hc_base",
        "output_hc_scale",
        "output_norm",
        "output",
    ];
    let stem = |s: &str| {
        s.strip_suffix(".weight")
            .or_else(|| s.strip_suffix(".bias"))
            .unwrap_or(s)
            .to_string()
    };
    if name == "token_embd.weight" {
        return (0, 0, 0);
    }
    if let Some((il, rest)) = name
        .strip_prefix("blk.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)))
    {
        let pos = LAYER_ORDER
            .iter()
            .position(|s| *s == stem(rest))
            .unwrap_or(LAYER_ORDER.len());
        return (1, il, pos);
    }
    let pos = GLOBAL_ORDER
        .iter()
        .position(|s| *s == stem(name))
        .unwrap_or(GLOBAL_ORDER.len());
    (2, 0, pos)
}

/// Plans the output tensors of `src` for `preset`: every tensor `names` lists, in file order,
/// with its role's type fitted to its row length.
pub fn plan(src: &dyn TensorSource, names: &[&str], preset: Preset) -> Result<Vec<PlannedTensor>> {
    let mut names: Vec<&str> = names.to_vec();
    names.sort_by_key(|n| (order_key(n), n.to_string()));
    names
        .into_iter()
        .map(|name| {
            let t = src
                .tensor(name)
                .ok_or_else(|| tensor_err(name, "listed but not found"))?;
            let role = role(name).ok_or_else(|| tensor_err(name, "not a ds4 tensor name"))?;
            let dims = t.shape.dims().to_vec();
            let wanted = preset.dtype(role);
            let dtype = fit_dtype(wanted, dims[0]);
            if role == Role::Ids && t.dtype != DType::I32 {
                return Err(tensor_err(
                    name,
                    format!("expected integer ids, found {}", t.dtype),
                ));
            }
            Ok(PlannedTensor {
                name: name.to_string(),
                dims,
                wanted,
                dtype,
            })
        })
        .collect()
}

// =========================================================================================
// Encoding one tensor.

/// Rows converted to f32 at a time for 2-D tensors (64 Mi values: 256 MiB of f32), so that
/// memory stays bounded for the embedding and output head of the full model.
const SLAB_VALUES: u64 = 64 << 20;

/// The largest finite F16 value.
const F16_MAX: f32 = 65504.0;

/// Encodes the values of `t` as `dtype`, exactly as ds4's imatrix-less converter does.
///
/// Each expert matrix of a 3-D tensor (and each bounded group of rows of a 2-D one) is decoded
/// to f32 and quantized row by row, rows in parallel. IQ2_XXS rows are weighed by the column
/// energy of their whole expert matrix (ds4's synthetic importance); Q2_K and Q4_K use the
/// unweighted reference search. I32 is copied as is. A value that F16 cannot hold (NaN,
/// infinite, or beyond 65504) is an error naming the tensor when F16 is asked for.
pub fn encode_tensor(t: &HostTensor, dtype: DType) -> Result<Vec<u8>> {
    let err = |e: ds4_quant::Error| tensor_err(&t.name, e.to_string());
    if dtype == DType::I32 || t.dtype == DType::I32 {
        if dtype != t.dtype {
            return Err(tensor_err(
                &t.name,
                format!("cannot convert {} to {dtype}", t.dtype),
            ));
        }
        return Ok(t.data().to_vec());
    }
    let dims = t.shape.dims();
    let n_cols = dims[0];
    let n_rows = t.shape.n_rows().unwrap_or(0);
    let slab_rows = if dims.len() >= 3 {
        dims[1]
    } else {
        (SLAB_VALUES / n_cols.max(1)).clamp(1, n_rows.max(1))
    };
    let src_row = t.dtype.row_bytes(n_cols).ok_or_else(|| {
        tensor_err(
            &t.name,
            format!("ne[0] = {n_cols} is not whole {} blocks", t.dtype),
        )
    })? as usize;
    let out_row = dtype.row_bytes(n_cols).ok_or_else(|| {
        tensor_err(
            &t.name,
            format!("ne[0] = {n_cols} is not whole {dtype} blocks"),
        )
    })? as usize;
    let data = t.data();
    if data.len() != src_row * n_rows as usize {
        return Err(tensor_err(
            &t.name,
            format!(
                "{} bytes, expected {}",
                data.len(),
                src_row * n_rows as usize
            ),
        ));
    }
    let n_cols = n_cols as usize;
    let mut out = Vec::with_capacity(out_row * n_rows as usize);
    let mut x = Vec::new();
    for slab in data.chunks(src_row * slab_rows as usize) {
        x.resize(slab.len() / src_row * n_cols, 0.0f32);
        ds4_quant::row::dequantize(t.dtype, slab, &mut x).map_err(err)?;
        if dtype == DType::F16 {
            // A value beyond F16's range would silently become infinite.
            if let Some(v) = x.iter().find(|v| !v.is_finite() || v.abs() > F16_MAX) {
                return Err(tensor_err(
                    &t.name,
                    format!("value {v} does not fit F16 (|x| <= {F16_MAX})"),
                ));
            }
        }
        let importance = (dtype == DType::Iq2Xxs)
            .then(|| ds4_quant::iq2_xxs_quantize::column_energy(&x, n_cols));
        // Groups of rows per rayon task: enough work to amortize the task, few enough
        // groups to keep both cores busy on small tensors.
        let group = (4096 / n_cols).max(1) * n_cols;
        let parts: Vec<Result<Vec<u8>>> = x
            .par_chunks(group)
            .map(|rows| {
                let mut buf = Vec::with_capacity(rows.len() / n_cols * out_row);
                for row in rows.chunks_exact(n_cols) {
                    ds4_quant::row::quantize(dtype, row, importance.as_deref(), &mut buf)
                        .map_err(err)?;
                }
                Ok(buf)
            })
            .collect();
        for p in parts {
            out.extend_from_slice(&p?);
        }
    }
    Ok(out)
}

// =========================================================================================
// The whole conversion.

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The type map.
    pub preset: Preset,
    /// `general.name`; the checkpoint directory's name when `None`.
    pub name: Option<String>,
}

/// What [`convert`] reports as it goes.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// Planning done; the data is about to be written.
    Start {
        /// Number of tensors.
        n_tensors: usize,
        /// Bytes of tensor data to write (without padding).
        data_bytes: u64,
    },
    /// One tensor was written.
    Tensor {
        /// The tensor just written.
        tensor: &'a PlannedTensor,
    },
}

/// The outcome of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The model shape written.
    pub config: Config,
    /// Every tensor, in file order.
    pub tensors: Vec<PlannedTensor>,
    /// Whether tokenizer metadata was written (the directory had a `tokenizer.json`).
    pub tokenizer: bool,
    /// The file size in bytes.
    pub file_bytes: u64,
}

impl ConvertReport {
    /// The tensors written in another type than the preset asked for (row length not a
    /// multiple of the block).
    pub fn fallbacks(&self) -> impl Iterator<Item = &PlannedTensor> {
        self.tensors.iter().filter(|t| t.dtype != t.wanted)
    }
}

/// Converts `src` into the GGUF file `out`, calling `progress` along the way.
///
/// `src` is a checkpoint directory (`config.json`, `*.safetensors`, optional
/// `tokenizer.json`) or a ds4 GGUF file (re-typed to the preset; its `tokenizer.*` records
/// are carried over). The source is first bound and shape-checked exactly as the engine binds
/// it, so a file is only written for a model the engine can run. The data goes to `out` +
/// `.tmp`, which is renamed to `out` on success and removed on failure.
pub fn convert(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport> {
    if src.is_file() {
        return convert_gguf(src, out, opts, progress);
    }
    let src_dir = src;
    let load_err = |what: String| Error::Load {
        path: src_dir.display().to_string(),
        what,
    };
    let text = std::fs::read_to_string(src_dir.join("config.json"))
        .map_err(|e| load_err(format!("config.json: {e}")))?;
    let mut cfg = Config::from_hf_json(&text)?;
    cfg.validate()?;
    let ck = Checkpoint::open(src_dir)?;
    let name = opts.name.clone().unwrap_or_else(|| model_name(src_dir));
    let tok_path = src_dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        let json = std::fs::read(&tok_path)?;
        tokenizer_metadata(&json, cfg.n_vocab)?
    } else {
        Vec::new()
    };
    let opts = ConvertOptions {
        name: Some(name),
        ..opts.clone()
    };
    convert_source(&cfg, &ck, &ck.names(), tokenizer, out, &opts, progress)
}

/// Converts the tensors `names` of any [`TensorSource`] (GGUF naming, shapes of `cfg`) into
/// the GGUF file `out`; [`convert`] is this plus reading a checkpoint directory.
///
/// `tokenizer` holds the `tokenizer.*` records to add (possibly none: the engine loads
/// without them). The source is first bound and shape-checked as the engine binds it.
pub fn convert_source(
    cfg: &Config,
    src: &dyn TensorSource,
    names: &[&str],
    tokenizer: Vec<(String, OwnedValue)>,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport> {
    Weights::bind(cfg, src)?;
    let name = opts.name.as_deref().unwrap_or("deepseek4");
    let mut metadata = config_metadata(cfg, name);
    metadata.push((
        "general.file_type".into(),
        OwnedValue::U32(opts.preset.file_type()),
    ));
    metadata.push(("general.quantization_version".into(), OwnedValue::U32(2)));
    let has_tokenizer = tokenizer.iter().any(|(k, _)| k == "tokenizer.ggml.tokens");
    for (k, v) in tokenizer {
        // The bos/eos ids come from the config (already written); skip restatements.
        if !metadata.iter().any(|(have, _)| *have == k) {
            metadata.push((k, v));
        }
    }
    let tensors = plan(src, names, opts.preset)?;

    let tmp = tmp_path(out);
    let result = write_file(src, &metadata, &tensors, &tmp, progress);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, out)?;
    let file_bytes = std::fs::metadata(out)?.len();
    Ok(ConvertReport {
        config: cfg.clone(),
        tensors,
        tokenizer: has_tokenizer,
        file_bytes,
    })
}

/// [`convert`] from a GGUF file.
fn convert_gguf(
    src: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport> {
    let file = GgufFile::open(src)?;
    let mut cfg = Config::from_gguf(&file)?;
    if cfg.n_vocab == 0 {
        // As the loader does: llama.cpp conversions may omit vocab_size.
        if let Some(t) = TensorSource::tensor(&file, "token_embd.weight") {
            cfg.n_vocab = t.shape.numpy().first().copied().unwrap_or(0) as usize;
        }
    }
    cfg.validate()?;
    let tokenizer: Vec<(String, OwnedValue)> = file
        .metadata()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.to_string(), v.to_owned_value()))
        .collect();
    let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    let opts = ConvertOptions {
        name: opts
            .name
            .clone()
            .or_else(|| crate::config::Metadata::get_str(&file, "general.name")),
        ..opts.clone()
    };
    convert_source(&cfg, &file, &names, tokenizer, out, &opts, progress)
}

/// `general.name` default: the directory's name, or its parent's when the directory is
/// called `checkpoint` (the fixtures' layout).
fn model_name(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let base = |p: &Path| p.file_name().map(|s| s.to_string_lossy().into_owned());
    match base(&dir) {
        Some(n) if n == "checkpoint" => dir.parent().and_then(base).unwrap_or(n),
        Some(n) => n,
        None => "deepseek4".into(),
    }
}

fn tmp_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// A sink that keeps the first `keep` bytes written to it and counts the rest.
struct HeadSink {
    keep: u64,
    head: Vec<u8>,
    seen: u64,
}

impl Write for HeadSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.keep.saturating_sub(self.seen) as usize;
        self.head.extend_from_slice(&buf[..room.min(buf.len())]);
        self.seen += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The file's bytes before the tensor data (header, metadata, tensor infos, padding), laid
/// out by [`GgufWriter`] from the planned shapes and types alone.
///
/// The writer wants data for every tensor; it gets views of one zeroed buffer, never touched
/// (a zeroed allocation is lazily mapped), and the sink drops everything past the head.
fn layout_head(metadata: &[(String, OwnedValue)], tensors: &[PlannedTensor]) -> Result<Vec<u8>> {
    let largest = tensors
        .iter()
        .map(PlannedTensor::n_bytes)
        .max()
        .unwrap_or(0);
    let zeros = vec![0u8; largest as usize];
    let mut w = GgufWriter::new();
    for (k, v) in metadata {
        w.add(k, v.clone())?;
    }
    for t in tensors {
        w.add_tensor(&t.name, t.dtype, &t.dims, &zeros[..t.n_bytes() as usize])?;
    }
    let align = w.alignment();
    let data_len: u64 = tensors
        .iter()
        .map(|t| t.n_bytes().div_ceil(align) * align)
        .sum();
    let mut count = HeadSink {
        keep: 0,
        head: Vec::new(),
        seen: 0,
    };
    w.write_to(&mut count)?;
    let mut sink = HeadSink {
        keep: count.seen - data_len,
        head: Vec::new(),
        seen: 0,
    };
    w.write_to(&mut sink)?;
    Ok(sink.head)
}

fn write_file(
    ck: &dyn TensorSource,
    metadata: &[(String, OwnedValue)],
    tensors: &[PlannedTensor],
    path: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<()> {
    let head = layout_head(metadata, tensors)?;
    let align = ds4_tensor::gguf::DEFAULT_ALIGNMENT;
    let file = std::fs::File::create(path).map_err(|e| Error::Load {
        path: path.display().to_string(),
        what: format!("cannot create the output file: {e}"),
    })?;
    let mut file = std::io::BufWriter::with_capacity(8 << 20, file);
    file.write_all(&head)?;
    progress(Progress::Start {
        n_tensors: tensors.len(),
        data_bytes: tensors.iter().map(PlannedTensor::n_bytes).sum(),
    });
    let zeros = [0u8; 256];
    for t in tensors {
        let src = ck
            .tensor(&t.name)
            .ok_or_else(|| tensor_err(&t.name, "vanished from the checkpoint"))?;
        let bytes = encode_tensor(&src, t.dtype)?;
        if bytes.len() as u64 != t.n_bytes() {
            return Err(tensor_err(
                &t.name,
                format!("encoded {} bytes, planned {}", bytes.len(), t.n_bytes()),
            ));
        }
        file.write_all(&bytes)?;
        let pad = (t.n_bytes().div_ceil(align) * align - t.n_bytes()) as usize;
        file.write_all(&zeros[..pad])?;
        progress(Progress::Tensor { tensor: t });
    }
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    // Re-read the layout: the reader checks every offset, so a head that does not match the
    // data written is caught here and not at load time.
    let check = GgufFile::open(path)?;
    for t in tensors {
        let info = check
            .tensor_info(&t.name)
            .ok_or_else(|| tensor_err(&t.name, "missing from the written file"))?;
        if info.dtype != t.dtype || info.n_bytes != t.n_bytes() {
            return Err(tensor_err(&t.name, "written with a different layout"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_fit(want: DType, ne0: u64, expected: DType) {
        assert_eq!(fit_dtype(want, ne0), expected, "{want} with ne[0] = {ne0}");
    }

    #[test]
    fn fallback_chain() {
        check_fit(DType::Iq2Xxs, 4096, DType::Iq2Xxs);
        check_fit(DType::Iq2Xxs, 2048, DType::Iq2Xxs);
        check_fit(DType::Q2K, 96, DType::Q8_0);
        check_fit(DType::Q4K, 24, DType::F16);
        check_fit(DType::Q8_0, 64, DType::Q8_0);
        check_fit(DType::Q8_0, 48, DType::F16);
        check_fit(DType::F16, 3, DType::F16);
        check_fit(DType::F32, 3, DType::F32);
        check_fit(DType::I32, 6, DType::I32);
    }

    #[test]
    fn roles_follow_formats_s3() {
        let check = |name: &str, role: Role| assert_eq!(super::role(name), Some(role), "{name}");
        check("token_embd.weight", Role::F16Matrix);
        check("output.weight", Role::Q8Matrix);
        check("output_hc_scale.weight", Role::Vector);
        check("blk.12.hc_attn_fn.weight", Role::F16Matrix);
        check("blk.2.indexer.attn_q_b.weight", Role::F16Matrix);
        check("blk.2.indexer_compressor_norm.weight", Role::Vector);
        check("blk.0.ffn_gate_tid2eid.weight", Role::Ids);
        check("blk.7.exp_probs_b.bias", Role::Vector);
        check("blk.42.ffn_up_exps.weight", Role::RoutedGateUp);
        check("blk.42.ffn_down_exps.weight", Role::RoutedDown);
        check("blk.3.ffn_down_shexp.weight", Role::Q8Matrix);
        assert_eq!(role("blk.3.unknown.weight"), None);
        assert_eq!(role("mtp.0.e_proj.weight"), None);
    }

    #[test]
    fn preset_types() {
        use Role::*;
        let row = |p: Preset| {
            [Vector, Ids, F16Matrix, Q8Matrix, RoutedGateUp, RoutedDown].map(|r| p.dtype(r))
        };
        assert_eq!(
            row(Preset::F16),
            [
                DType::F32,
                DType::I32,
                DType::F16,
                DType::F16,
                DType::F16,
                DType::F16
            ]
        );
        assert_eq!(
            row(Preset::Q8),
            [
                DType::F32,
                DType::I32,
                DType::F16,
                DType::Q8_0,
                DType::Q8_0,
                DType::Q8_0
            ]
        );
        assert_eq!(
            row(Preset::Q4),
            [
                DType::F32,
                DType::I32,
                DType::F16,
                DType::Q8_0,
                DType::Q4K,
                DType::Q4K
            ]
        );
        assert_eq!(
            row(Preset::Q2),
            [
                DType::F32,
                DType::I32,
                DType::F16,
                DType::Q8_0,
                DType::Iq2Xxs,
                DType::Q2K
            ]
        );
    }

    #[test]
    fn f16_overflow_is_an_error() {
        let t = HostTensor::from_f32(
            "blk.0.ffn_gate_inp.weight",
            &[2, 2],
            &[1.0, 7.0e4, 0.0, 1.0],
        );
        let e = encode_tensor(&t, DType::F16).expect_err("70000 does not fit F16");
        assert!(e.to_string().contains("ffn_gate_inp"), "{e}");
        let ok = HostTensor::from_f32("x", &[2, 2], &[1.0, 6.0e4, 0.0, -1.0]);
        assert_eq!(encode_tensor(&ok, DType::F16).expect("fits").len(), 8);
    }
}
