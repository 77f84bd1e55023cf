//! Synthetic models: a DeepSeek V4 shape of any size with seeded random weights, written as a
//! ds4 GGUF file through the converter, for benchmarks (`ds4 bench --gen-synthetic`).
//!
//! The file has exactly the layout and type map of a converted model (FORMATS.md s3, via
//! [`crate::convert::convert_source`], so the metadata is [`crate::convert::config_metadata`]
//! and nothing here duplicates it) plus `tokenizer.ggml.model = "none"`, which is what
//! llama.cpp needs to load a file without a vocabulary (ids are fed directly). The weights are
//! uniform random with a standard deviation that keeps activations of order one: matrices
//! `1/sqrt(n_in)`, norms near 1, HC bases small, sinks and selection biases 0. The numbers
//! are meaningless; only the shapes, types and the amount of work are realistic.
//!
//! Generation cost is dominated by the IQ2_XXS quantization of the routed gate/up experts
//! (a few MB/s per thread); it runs rows in parallel on the current rayon pool.

use crate::rng::SplitMix;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ds4_tensor::gguf::OwnedValue;
use ds4_tensor::{DType, HostTensor, Shape, TensorBytes};

use crate::config::{Config, Yarn};
use crate::convert::{ConvertOptions, ConvertReport, Preset, Progress, convert_source};
use crate::error::Result;
use crate::weights::TensorSource;

/// The knobs of a synthetic shape; everything else follows DeepSeek V4 Flash's proportions.
#[derive(Debug, Clone)]
pub struct SyntheticShape {
    /// Hidden size `d` (a multiple of 256).
    pub n_embd: usize,
    /// Layers (layers 0-1 sliding, then alternating ratio 4 and 128, as Flash).
    pub n_layer: usize,
    /// Routed experts.
    pub n_expert: usize,
    /// Experts per token.
    pub n_expert_used: usize,
    /// Expert FFN width (a multiple of 256 so that Q2_K/IQ2_XXS/Q4_K apply).
    pub n_ff_exp: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Leading hash-routed layers.
    pub n_hash_layer: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for SyntheticShape {
    fn default() -> SyntheticShape {
        SyntheticShape {
            n_embd: 1024,
            n_layer: 8,
            n_expert: 64,
            n_expert_used: 6,
            n_ff_exp: 256,
            n_vocab: 16384,
            n_hash_layer: 3,
            seed: 42,
        }
    }
}

impl SyntheticShape {
    /// The full model config: Flash's ratios of head sizes to `d` (16 query heads of 256 with
    /// 64 RoPE dims, 4 output groups, window 128, indexer 16 x 128 with top-k 128, hc 4).
    pub fn config(&self) -> Result<Config> {
        let d = self.n_embd;
        let n_layer = self.n_layer;
        let compress_ratios = (0..n_layer)
            .map(|il| match il {
                0 | 1 => 0,
                _ if il % 2 == 0 => 4,
                _ => 128,
            })
            .collect();
        let mut cfg = Config {
            n_layer,
            n_embd: d,
            n_vocab: self.n_vocab,
            n_head: 16,
            head_dim: 256,
            n_rot: 64,
            q_lora_rank: d / 2,
            n_out_group: 4,
            o_lora_rank: d / 4,
            sliding_window: 128,
            compress_ratios,
            rope_freq_base: 10000.0,
            compress_rope_freq_base: 160000.0,
            rope_yarn: Some(Yarn {
                factor: 16.0,
                original_ctx: 65536,
                beta_fast: 32.0,
                beta_slow: 1.0,
            }),
            n_indexer_head: 16,
            indexer_head_dim: 128,
            indexer_top_k: 128,
            n_hc: 4,
            n_hc_sinkhorn_iter: 20,
            hc_eps: 1e-6,
            rms_eps: 1e-6,
            n_expert: self.n_expert,
            n_expert_used: self.n_expert_used,
            n_ff_exp: self.n_ff_exp,
            n_expert_shared: 1,
            n_hash_layer: self.n_hash_layer,
            expert_weights_scale: 1.5,
            expert_weights_norm: true,
            swiglu_clamp_exp: vec![10.0; n_layer],
            swiglu_clamp_shexp: vec![10.0; n_layer],
            n_ctx_train: 1 << 20,
            bos_token_id: Some(0),
            eos_token_id: Some(1),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// How a tensor's random values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Uniform with this standard deviation around 0.
    Std(f32),
    /// Uniform with this standard deviation around 1 (norm weights).
    One(f32),
    /// Constant.
    Const(f32),
    /// Expert ids in `[0, E)` (`ffn_gate_tid2eid`).
    Ids(usize),
}

/// A [`TensorSource`] that makes every tensor of a [`Config`] on demand, deterministically
/// from the seed and the tensor's name.
#[derive(Debug)]
pub struct SyntheticSource {
    tensors: BTreeMap<String, (Vec<u64>, Init)>,
    seed: u64,
}

impl SyntheticSource {
    /// Every tensor name and shape `Weights::bind` asks for with `cfg`.
    pub fn new(cfg: &Config, seed: u64) -> SyntheticSource {
        let mut t: BTreeMap<String, (Vec<u64>, Init)> = BTreeMap::new();
        let (d, v, nhc, mix) = (cfg.n_embd, cfg.n_vocab, cfg.n_hc, cfg.n_hc_mix());
        let (h, hd, rq) = (cfg.n_head, cfg.head_dim, cfg.q_lora_rank);
        let (g, ro) = (cfg.n_out_group, cfg.o_lora_rank);
        let (e, f, fs, k) = (
            cfg.n_expert,
            cfg.n_ff_exp,
            cfg.n_ff_shexp(),
            cfg.n_expert_used,
        );
        let mut add = |name: String, dims: &[usize], init: Init| {
            t.insert(name, (dims.iter().map(|&x| x as u64).collect(), init));
        };
        // A matrix `[out, in]`: values of std 1/sqrt(in) keep the output at the input's scale.
        let mat = |n_in: usize| Init::Std(1.0 / (n_in as f32).sqrt());
        for il in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}");
            let ratio = cfg.compress_ratio(il);
            let mut compressor = |prefix: &str, width: usize| {
                let coff = if ratio == 4 { 2 } else { 1 };
                add(
                    n(&format!("{prefix}_kv.weight")),
                    &[coff * width, d],
                    mat(d),
                );
                add(
                    n(&format!("{prefix}_gate.weight")),
                    &[coff * width, d],
                    mat(d),
                );
                add(
                    n(&format!("{prefix}_ape.weight")),
                    &[ratio, coff * width],
                    Init::Std(0.1),
                );
                add(
                    n(&format!("{prefix}_norm.weight")),
                    &[width],
                    Init::One(0.05),
                );
            };
            if ratio > 0 {
                compressor("attn_compressor", hd);
            }
            if ratio == 4 {
                let (hi, di) = (cfg.n_indexer_head, cfg.indexer_head_dim);
                compressor("indexer_compressor", di);
                add(n("indexer.attn_q_b.weight"), &[hi * di, rq], mat(rq));
                add(n("indexer.proj.weight"), &[hi, d], mat(d));
            }
            if cfg.is_hash_layer(il) {
                add(n("ffn_gate_tid2eid.weight"), &[v, k], Init::Ids(e));
            } else {
                add(n("exp_probs_b.bias"), &[e], Init::Const(0.0));
            }
            for s in ["attn", "ffn"] {
                add(
                    n(&format!("hc_{s}_fn.weight")),
                    &[mix, nhc * d],
                    mat(nhc * d),
                );
                add(n(&format!("hc_{s}_base.weight")), &[mix], Init::Std(0.1));
                add(n(&format!("hc_{s}_scale.weight")), &[3], Init::Const(0.5));
            }
            add(n("attn_norm.weight"), &[d], Init::One(0.05));
            add(n("ffn_norm.weight"), &[d], Init::One(0.05));
            add(n("attn_q_a.weight"), &[rq, d], mat(d));
            add(n("attn_q_a_norm.weight"), &[rq], Init::One(0.05));
            add(n("attn_q_b.weight"), &[h * hd, rq], mat(rq));
            add(n("attn_kv.weight"), &[hd, d], mat(d));
            add(n("attn_kv_a_norm.weight"), &[hd], Init::One(0.05));
            add(n("attn_sinks.weight"), &[h], Init::Const(0.0));
            add(
                n("attn_output_a.weight"),
                &[g * ro, h * hd / g],
                mat(h * hd / g),
            );
            add(n("attn_output_b.weight"), &[d, g * ro], mat(g * ro));
            add(n("ffn_gate_inp.weight"), &[e, d], mat(d));
            add(n("ffn_gate_exps.weight"), &[e, f, d], mat(d));
            add(n("ffn_up_exps.weight"), &[e, f, d], mat(d));
            add(n("ffn_down_exps.weight"), &[e, d, f], mat(f));
            add(n("ffn_gate_shexp.weight"), &[fs, d], mat(d));
            add(n("ffn_up_shexp.weight"), &[fs, d], mat(d));
            add(n("ffn_down_shexp.weight"), &[d, fs], mat(fs));
        }
        add("token_embd.weight".into(), &[v, d], Init::Std(1.0));
        add("output_hc_fn.weight".into(), &[nhc, nhc * d], mat(nhc * d));
        add("output_hc_base.weight".into(), &[nhc], Init::Std(0.1));
        add("output_hc_scale.weight".into(), &[1], Init::Const(0.5));
        add("output_norm.weight".into(), &[d], Init::One(0.05));
        add("output.weight".into(), &[v, d], mat(d));
        SyntheticSource { tensors: t, seed }
    }

    /// Every tensor name, in no particular order (the converter orders them).
    pub fn names(&self) -> Vec<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }
}

/// FNV-1a of the name: each tensor's values depend only on the seed and its name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl TensorSource for SyntheticSource {
    fn tensor(&self, name: &str) -> Option<HostTensor> {
        let (dims, init) = self.tensors.get(name)?;
        let n: u64 = dims.iter().product();
        let mut rng = SplitMix(self.seed ^ name_hash(name));
        // Uniform on [-a, a] has standard deviation a / sqrt(3).
        let sqrt3 = 3f32.sqrt();
        let t = match *init {
            Init::Ids(n_expert) => {
                let ids: Vec<i32> = (0..n)
                    .map(|_| (rng.next() % n_expert as u64) as i32)
                    .collect();
                HostTensor {
                    name: name.to_string(),
                    dtype: DType::I32,
                    shape: Shape::from_numpy(dims),
                    bytes: TensorBytes::Owned(Arc::new(bytemuck::cast_slice(&ids).to_vec())),
                }
            }
            Init::Std(s) => {
                let v: Vec<f32> = (0..n).map(|_| rng.unit() * s * sqrt3).collect();
                HostTensor::from_f32(name, dims, &v)
            }
            Init::One(s) => {
                let v: Vec<f32> = (0..n).map(|_| 1.0 + rng.unit() * s * sqrt3).collect();
                HostTensor::from_f32(name, dims, &v)
            }
            Init::Const(c) => HostTensor::from_f32(name, dims, &vec![c; n as usize]),
        };
        Some(t)
    }
}

/// Writes a synthetic model of `shape` in `preset`'s type map to `out` (via `OUT.tmp`).
pub fn write_synthetic(
    shape: &SyntheticShape,
    preset: Preset,
    out: &Path,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport> {
    let cfg = shape.config()?;
    let src = SyntheticSource::new(&cfg, shape.seed);
    let tokenizer = vec![("tokenizer.ggml.model".to_string(), OwnedValue::from("none"))];
    let opts = ConvertOptions {
        preset,
        name: Some(format!(
            "ds4-rs synthetic d{} L{} E{} F{} {}",
            shape.n_embd, shape.n_layer, shape.n_expert, shape.n_ff_exp, preset
        )),
    };
    convert_source(&cfg, &src, &src.names(), tokenizer, out, &opts, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_synthetic_model_loads_and_runs() {
        // Smallest shape the block types allow: d = F = 256.
        let shape = SyntheticShape {
            n_embd: 256,
            n_layer: 4,
            n_expert: 8,
            n_expert_used: 2,
            n_ff_exp: 256,
            n_vocab: 64,
            n_hash_layer: 1,
            seed: 7,
        };
        let dir = std::env::temp_dir().join(format!("ds4-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("s.gguf");
        let report = write_synthetic(&shape, Preset::Q2, &path, &mut |_| {}).expect("written");
        assert_eq!(
            report.fallbacks().count(),
            0,
            "every tensor in its preset type"
        );
        let gate = report
            .tensors
            .iter()
            .find(|t| t.name == "blk.1.ffn_gate_exps.weight")
            .expect("gate experts");
        assert_eq!(gate.dtype, DType::Iq2Xxs);
        let model = crate::Model::load(&path, &crate::LoadOptions::default()).expect("loads");
        let mut s = crate::Session::new(&model, 64);
        s.feed(&[0, 5, 9, 3]).expect("runs");
        let logits = s.logits().expect("logits");
        assert_eq!(logits.len(), 64);
        assert!(logits.iter().all(|v| v.is_finite()));
        // Activations stay sane: logits of order one, not exploding.
        let mx = logits.iter().fold(0f32, |a, &b| a.max(b.abs()));
        assert!(mx > 1e-3 && mx < 1e3, "max |logit| {mx}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
