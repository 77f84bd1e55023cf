//! Hugging Face checkpoint directories (`config.json` + `*.safetensors`) as a
//! [`TensorSource`] in ds4's GGUF naming.
//!
//! Accepted names (MODEL.md s2 and s2.8): the hub layout that both the official checkpoint and
//! transformers' `save_pretrained` write (`layers.N.attn.wq_a.weight`, per-expert
//! `ffn.experts.E.w1.weight`, ...; with or without a leading `model.`), and transformers'
//! in-memory names (`layers.N.self_attn.q_a_proj.weight`, packed `mlp.experts.gate_up_proj`).
//! The conversion is a rename plus, for experts, stacking on a new leading axis (or
//! splitting transformers' packed gate/up in half): no transposition, because a PyTorch
//! `[out, in]` row-major matrix already is a GGUF `ne = [in, out]` tensor byte for byte.
//!
//! F32/F16/BF16 tensors are borrowed zero-copy from the memory-mapped files; stacked experts
//! and `tid2eid` (I64 -> I32) are copied. The official checkpoint's quantized tensors (FP8 E4M3
//! `X.weight` + `X.scale`, routed experts as packed FP4 `I8` + `X.scale`) are dequantized to
//! f32 first, bit-identically to transformers' loader ([`crate::hub_quant`]); the FP8 block
//! size comes from `config.json` `quantization_config.weight_block_size` (default 128x128).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ds4_tensor::{DType, HostTensor, Shape, TensorBytes};

use crate::error::{Error, Result, tensor_err};
use crate::hub_quant::{DEFAULT_FP8_BLOCK, ScaleDtype, Scales, dequant_fp4, dequant_fp8};
use crate::weights::TensorSource;

/// The tensors of a checkpoint directory, already renamed to GGUF names.
#[derive(Debug, Default)]
pub struct Checkpoint {
    tensors: HashMap<String, HostTensor>,
}

impl Checkpoint {
    /// The GGUF names of all tensors found, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }
}

impl TensorSource for Checkpoint {
    fn tensor(&self, name: &str) -> Option<HostTensor> {
        self.tensors.get(name).cloned()
    }
}

/// Global renames: (checkpoint names, GGUF name).
const GLOBAL: &[(&[&str], &str)] = &[
    (
        &["embed.weight", "embed_tokens.weight"],
        "token_embd.weight",
    ),
    (&["head.weight", "lm_head.weight"], "output.weight"),
    (&["hc_head_fn", "hc_head.hc_fn"], "output_hc_fn.weight"),
    (
        &["hc_head_base", "hc_head.hc_base"],
        "output_hc_base.weight",
    ),
    (
        &["hc_head_scale", "hc_head.hc_scale"],
        "output_hc_scale.weight",
    ),
    (&["norm.weight"], "output_norm.weight"),
];

/// Per-layer renames (after `layers.N.`): (checkpoint names, GGUF suffix).
#[rustfmt::skip]
const LAYER: &[(&[&str], &str)] = &[
    (&["hc_attn_fn", "attn_hc.fn"],                                 "hc_attn_fn.weight"),
    (&["hc_attn_base", "attn_hc.base"],                             "hc_attn_base.weight"),
    (&["hc_attn_scale", "attn_hc.scale"],                           "hc_attn_scale.weight"),
    (&["hc_ffn_fn", "ffn_hc.fn"],                                   "hc_ffn_fn.weight"),
    (&["hc_ffn_base", "ffn_hc.base"],                               "hc_ffn_base.weight"),
    (&["hc_ffn_scale", "ffn_hc.scale"],                             "hc_ffn_scale.weight"),
    (&["attn_norm.weight", "input_layernorm.weight"],               "attn_norm.weight"),
    (&["ffn_norm.weight", "post_attention_layernorm.weight"],       "ffn_norm.weight"),
    (&["attn.wq_a.weight", "self_attn.q_a_proj.weight"],            "attn_q_a.weight"),
    (&["attn.q_norm.weight", "self_attn.q_a_norm.weight"],          "attn_q_a_norm.weight"),
    (&["attn.wq_b.weight", "self_attn.q_b_proj.weight"],            "attn_q_b.weight"),
    (&["attn.wkv.weight", "self_attn.kv_proj.weight"],              "attn_kv.weight"),
    (&["attn.kv_norm.weight", "attn.norm.weight", "self_attn.kv_norm.weight"], "attn_kv_a_norm.weight"),
    (&["attn.attn_sink", "self_attn.sinks"],                        "attn_sinks.weight"),
    (&["attn.wo_a.weight", "self_attn.o_a_proj.weight"],            "attn_output_a.weight"),
    (&["attn.wo_b.weight", "self_attn.o_b_proj.weight"],            "attn_output_b.weight"),
    (&["attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"],     "attn_compressor_kv.weight"),
    (&["attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"], "attn_compressor_gate.weight"),
    (&["attn.compressor.ape", "self_attn.compressor.position_bias"],             "attn_compressor_ape.weight"),
    (&["attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"],    "attn_compressor_norm.weight"),
    (&["attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"], "indexer.attn_q_b.weight"),
    (&["attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"], "indexer.proj.weight"),
    (&["attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"],     "indexer_compressor_kv.weight"),
    (&["attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"], "indexer_compressor_gate.weight"),
    (&["attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"],             "indexer_compressor_ape.weight"),
    (&["attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"],    "indexer_compressor_norm.weight"),
    (&["ffn.gate.weight", "mlp.gate.weight"],                       "ffn_gate_inp.weight"),
    (&["ffn.gate.bias", "mlp.gate.e_score_correction_bias"],        "exp_probs_b.bias"),
    (&["ffn.gate.tid2eid", "mlp.gate.tid2eid"],                     "ffn_gate_tid2eid.weight"),
    (&["ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"], "ffn_gate_shexp.weight"),
    (&["ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"],   "ffn_up_shexp.weight"),
    (&["ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"], "ffn_down_shexp.weight"),
];

/// One raw tensor of a safetensors file, before renaming.
struct Raw {
    dtype: DType,
    dims: Vec<u64>,
    /// Set for I64 tensors, which HostTensor cannot carry: the values, already narrowed.
    i64_as_i32: Option<Vec<u8>>,
    bytes: TensorBytes,
}

impl Checkpoint {
    /// Memory-maps every `*.safetensors` file of `dir` and renames its tensors.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let mut files: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::Load {
                path: dir.display().to_string(),
                what: "no *.safetensors file".into(),
            });
        }
        let mut raw: HashMap<String, Raw> = HashMap::new();
        let mut quant: HashMap<String, QuantRaw> = HashMap::new();
        for path in &files {
            read_file(path, &mut raw, &mut quant)?;
        }
        if quant
            .values()
            .any(|q| matches!(q.kind, QuantKind::E4M3 | QuantKind::Fp4))
        {
            let block = fp8_block(dir)?;
            dequantize_hub(&mut raw, quant, block)?;
        }
        let mut ck = Checkpoint::default();
        let mut experts: HashMap<(usize, &'static str), Vec<(usize, Raw)>> = HashMap::new();
        for (name, t) in raw {
            let short = name.strip_prefix("model.").unwrap_or(&name);
            if let Some(&(_, gguf)) = GLOBAL.iter().find(|(alts, _)| alts.contains(&short)) {
                ck.insert(gguf.to_string(), t)?;
                continue;
            }
            let Some(rest) = short.strip_prefix("layers.") else {
                continue;
            };
            let Some((idx, suffix)) = rest.split_once('.') else {
                continue;
            };
            let Ok(il) = idx.parse::<usize>() else {
                continue;
            };
            if let Some(&(_, gguf)) = LAYER.iter().find(|(alts, _)| alts.contains(&suffix)) {
                ck.insert(format!("blk.{il}.{gguf}"), t)?;
            } else if let Some(e) = suffix.strip_prefix("ffn.experts.") {
                // Per-expert hub tensors: ffn.experts.{e}.w{1,2,3}.weight.
                let Some((e, w)) = e.split_once('.') else {
                    continue;
                };
                let Ok(e) = e.parse::<usize>() else { continue };
                let which = match w {
                    "w1.weight" => "ffn_gate_exps.weight",
                    "w3.weight" => "ffn_up_exps.weight",
                    "w2.weight" => "ffn_down_exps.weight",
                    _ => continue,
                };
                experts.entry((il, which)).or_default().push((e, t));
            } else if suffix == "mlp.experts.gate_up_proj" {
                // transformers packs [E, 2F, d] = concat(w1, w3) along the output axis.
                let (gate, up) = split_gate_up(&name, &t)?;
                ck.tensors.insert(
                    format!("blk.{il}.ffn_gate_exps.weight"),
                    named(gate, &format!("blk.{il}.ffn_gate_exps.weight")),
                );
                ck.tensors.insert(
                    format!("blk.{il}.ffn_up_exps.weight"),
                    named(up, &format!("blk.{il}.ffn_up_exps.weight")),
                );
            } else if suffix == "mlp.experts.down_proj" {
                ck.insert(format!("blk.{il}.ffn_down_exps.weight"), t)?;
            }
        }
        for ((il, which), mut list) in experts {
            let name = format!("blk.{il}.{which}");
            list.sort_by_key(|(e, _)| *e);
            if list.iter().enumerate().any(|(i, (e, _))| i != *e) {
                return Err(tensor_err(
                    &name,
                    "expert indices are not 0..E without gaps",
                ));
            }
            let (dtype, dims) = (list[0].1.dtype, list[0].1.dims.clone());
            let mut bytes = Vec::new();
            for (e, t) in &list {
                if t.dtype != dtype || t.dims != dims {
                    return Err(tensor_err(
                        &name,
                        format!("expert {e} differs in dtype or shape from expert 0"),
                    ));
                }
                bytes.extend_from_slice(t.bytes.as_slice());
            }
            let mut numpy = vec![list.len() as u64];
            numpy.extend(&dims);
            ck.tensors.insert(
                name.clone(),
                HostTensor {
                    name,
                    dtype,
                    shape: Shape::from_numpy(&numpy),
                    bytes: TensorBytes::Owned(Arc::new(bytes)),
                },
            );
        }
        Ok(ck)
    }

    fn insert(&mut self, gguf: String, t: Raw) -> Result<()> {
        let bytes = match t.i64_as_i32 {
            Some(b) => TensorBytes::Owned(Arc::new(b)),
            None => t.bytes,
        };
        let ht = HostTensor {
            name: gguf.clone(),
            dtype: t.dtype,
            shape: Shape::from_numpy(&t.dims),
            bytes,
        };
        self.tensors.insert(gguf, ht);
        Ok(())
    }
}

fn named(mut t: HostTensor, name: &str) -> HostTensor {
    t.name = name.to_string();
    t
}

fn split_gate_up(name: &str, t: &Raw) -> Result<(HostTensor, HostTensor)> {
    let [e, two_f, d] = t.dims[..] else {
        return Err(tensor_err(
            name,
            format!("expected 3 dims, got {:?}", t.dims),
        ));
    };
    if two_f % 2 != 0 {
        return Err(tensor_err(name, "odd packed gate/up width"));
    }
    let f = two_f / 2;
    let elem = t.dtype.block_bytes();
    let half = (f * d) as usize * elem;
    let src = t.bytes.as_slice();
    let (mut gate, mut up) = (
        Vec::with_capacity(half * e as usize),
        Vec::with_capacity(half * e as usize),
    );
    for ie in 0..e as usize {
        let base = ie * 2 * half;
        gate.extend_from_slice(&src[base..base + half]);
        up.extend_from_slice(&src[base + half..base + 2 * half]);
    }
    let mk = |b: Vec<u8>| HostTensor {
        name: String::new(),
        dtype: t.dtype,
        shape: Shape::from_numpy(&[e, f, d]),
        bytes: TensorBytes::Owned(Arc::new(b)),
    };
    Ok((mk(gate), mk(up)))
}

/// The storage types of the hub checkpoint's quantized tensors and their scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuantKind {
    /// `F8_E4M3` weight.
    E4M3,
    /// `I8` weight: packed FP4 E2M1, two codes per byte.
    Fp4,
    /// `F8_E8M0` (or `U8`) scale exponents.
    E8M0,
}

/// One quantized tensor or E8M0 scale, before dequantization.
struct QuantRaw {
    kind: QuantKind,
    dims: Vec<u64>,
    bytes: TensorBytes,
}

/// The FP8 block of `config.json`'s `quantization_config.weight_block_size`, if any.
fn fp8_block(dir: &Path) -> Result<[usize; 2]> {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return Ok(DEFAULT_FP8_BLOCK);
    };
    let bad = |what: &str| Error::Config {
        key: "quantization_config.weight_block_size".into(),
        what: what.into(),
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(&format!("config.json: {e}")))?;
    let Some(b) = json
        .get("quantization_config")
        .and_then(|q| q.get("weight_block_size"))
    else {
        return Ok(DEFAULT_FP8_BLOCK);
    };
    match b
        .as_array()
        .map(|a| a.iter().map(serde_json::Value::as_u64).collect::<Vec<_>>())
    {
        Some(v) if v.len() == 2 && v.iter().all(|x| x.is_some_and(|x| x > 0)) => {
            Ok([v[0].unwrap_or(0) as usize, v[1].unwrap_or(0) as usize])
        }
        _ => Err(bad(&format!("expected two positive integers, got {b}"))),
    }
}

/// Replaces every quantized `X.weight` (with its `X.scale`) by its f32 dequantization.
fn dequantize_hub(
    raw: &mut HashMap<String, Raw>,
    mut quant: HashMap<String, QuantRaw>,
    block: [usize; 2],
) -> Result<()> {
    let mut weights: Vec<String> = quant
        .iter()
        .filter(|(_, q)| q.kind != QuantKind::E8M0)
        .map(|(n, _)| n.clone())
        .collect();
    weights.sort();
    for name in weights {
        let Some(w) = quant.remove(&name) else {
            continue;
        };
        let Some(base) = name.strip_suffix(".weight") else {
            return Err(tensor_err(&name, "quantized tensor not named *.weight"));
        };
        // The hub names the scale `X.scale`; transformers' own files say `X.weight_scale_inv`.
        let candidates = [format!("{base}.scale"), format!("{base}.weight_scale_inv")];
        let scales = if let Some(sn) = candidates.iter().find(|n| quant.contains_key(*n)) {
            let s = quant
                .remove(sn)
                .ok_or_else(|| tensor_err(sn, "scale vanished"))?;
            Scales::decode(sn, ScaleDtype::E8M0, &s.dims, s.bytes.as_slice())?
        } else if let Some(sn) = candidates.iter().find(|n| raw.contains_key(*n)) {
            let s = raw
                .remove(sn)
                .ok_or_else(|| tensor_err(sn, "scale vanished"))?;
            let dtype = match s.dtype {
                DType::F32 => ScaleDtype::F32,
                DType::BF16 => ScaleDtype::BF16,
                other => {
                    return Err(tensor_err(sn, format!("unsupported scale dtype {other:?}")));
                }
            };
            Scales::decode(sn, dtype, &s.dims, s.bytes.as_slice())?
        } else {
            return Err(tensor_err(
                &name,
                format!("{:?} weight without a sibling {base}.scale", w.kind),
            ));
        };
        let (values, dims) = match w.kind {
            QuantKind::E4M3 => (
                dequant_fp8(&name, &w.dims, w.bytes.as_slice(), &scales, block)?,
                w.dims.clone(),
            ),
            _ => {
                let (v, d) = dequant_fp4(&name, &w.dims, w.bytes.as_slice(), &scales)?;
                (v, d.to_vec())
            }
        };
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw.insert(
            name,
            Raw {
                dtype: DType::F32,
                dims,
                i64_as_i32: None,
                bytes: TensorBytes::Owned(Arc::new(bytes)),
            },
        );
    }
    Ok(())
}

fn read_file(
    path: &Path,
    out: &mut HashMap<String, Raw>,
    quant: &mut HashMap<String, QuantRaw>,
) -> Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: the map is read-only and the file is not modified while the model is loaded;
    // that is the contract of every memory-mapped model loader (ds4, llama.cpp).
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file)? });
    let load_err = |what: String| Error::Load {
        path: path.display().to_string(),
        what,
    };
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| load_err(e.to_string()))?;
    let base = map.as_ptr() as usize;
    for (name, view) in st.tensors() {
        let dims: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        let data = view.data();
        let start = data.as_ptr() as usize - base;
        let range = start..start + data.len();
        let kind = match view.dtype() {
            safetensors::Dtype::F8_E4M3 => Some(QuantKind::E4M3),
            safetensors::Dtype::I8 => Some(QuantKind::Fp4),
            safetensors::Dtype::F8_E8M0 | safetensors::Dtype::U8 => Some(QuantKind::E8M0),
            _ => None,
        };
        if let Some(kind) = kind {
            let bytes = TensorBytes::Mapped {
                map: map.clone(),
                range,
            };
            quant.insert(name, QuantRaw { kind, dims, bytes });
            continue;
        }
        let (dtype, i64_as_i32) = match view.dtype() {
            safetensors::Dtype::F32 => (DType::F32, None),
            safetensors::Dtype::F16 => (DType::F16, None),
            safetensors::Dtype::BF16 => (DType::BF16, None),
            safetensors::Dtype::I32 => (DType::I32, None),
            safetensors::Dtype::I64 => {
                let mut narrowed = Vec::with_capacity(data.len() / 2);
                for c in data.chunks_exact(8) {
                    let v = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                    let v = i32::try_from(v)
                        .map_err(|_| tensor_err(&name, format!("value {v} does not fit i32")))?;
                    narrowed.extend_from_slice(&v.to_le_bytes());
                }
                (DType::I32, Some(narrowed))
            }
            other => {
                return Err(tensor_err(
                    &name,
                    format!("unsupported checkpoint dtype {other:?}"),
                ));
            }
        };
        out.insert(
            name,
            Raw {
                dtype,
                dims,
                i64_as_i32,
                bytes: TensorBytes::Mapped {
                    map: map.clone(),
                    range,
                },
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn transformers_names_and_packed_experts_are_converted() {
        // [E=2, 2F=4, d=3]: gate rows are the first F=2 of each expert, up rows the last 2.
        let gate_up: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let down: Vec<f32> = (0..12).map(|i| 100.0 + i as f32).collect();
        let tid: Vec<u8> = [3i64, 1].iter().flat_map(|x| x.to_le_bytes()).collect();
        let (gu, dn) = (f32_bytes(&gate_up), f32_bytes(&down));
        let views = vec![
            (
                "model.layers.0.mlp.experts.gate_up_proj",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4, 3], &gu)
                    .expect("view"),
            ),
            (
                "model.layers.0.mlp.experts.down_proj",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 3, 2], &dn)
                    .expect("view"),
            ),
            (
                "model.layers.0.mlp.gate.tid2eid",
                safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 2], &tid)
                    .expect("view"),
            ),
        ];
        let dir = std::env::temp_dir().join(format!("ds4-model-ck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
        let ck = Checkpoint::open(&dir).expect("open");
        let _ = std::fs::remove_dir_all(&dir);
        let values = |name: &str| {
            let t = ck.tensor(name).unwrap_or_else(|| panic!("{name} missing"));
            (
                t.shape.numpy(),
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect::<Vec<_>>(),
            )
        };
        let (shape, gate) = values("blk.0.ffn_gate_exps.weight");
        assert_eq!(shape, vec![2, 2, 3]);
        assert_eq!(
            gate,
            vec![
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0
            ]
        );
        let (_, up) = values("blk.0.ffn_up_exps.weight");
        assert_eq!(
            up,
            vec![
                6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 18.0, 19.0, 20.0, 21.0, 22.0, 23.0
            ]
        );
        let (shape, _) = values("blk.0.ffn_down_exps.weight");
        assert_eq!(shape, vec![2, 3, 2]);
        let tid = ck.tensor("blk.0.ffn_gate_tid2eid.weight").expect("tid2eid");
        assert_eq!(tid.dtype, DType::I32);
        assert_eq!(tid.data(), &[3, 0, 0, 0, 1, 0, 0, 0]);
    }
}
