//! The model shape: one [`Config`] read from GGUF metadata or a Hugging Face `config.json`,
//! validated in one place ([`Config::validate`]) so that later code can trust it.
//!
//! Nothing about the shape is hard-coded: tiny test models (2-4 layers, hidden 32, 8 experts)
//! and DeepSeek V4 Flash go through the same code. Key names follow MODEL.md s1.1/s1.4; every
//! error names the key at fault.

use serde_json::Value;

use crate::error::{Result, config_err};

/// YaRN parameters of the compressed-layer RoPE (MODEL.md s3.1.2).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    /// Scaling factor `s` (16 for Flash); YaRN is active only when `> 1`.
    pub factor: f32,
    /// Original training context `Lorig` (65536).
    pub original_ctx: u64,
    /// `beta_fast` (32).
    pub beta_fast: f32,
    /// `beta_slow` (1).
    pub beta_slow: f32,
}

/// The DeepSeek V4 model shape and hyperparameters (MODEL.md s1).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Main transformer layers `L`.
    pub n_layer: usize,
    /// Hidden size `d`.
    pub n_embd: usize,
    /// Vocabulary size `V`.
    pub n_vocab: usize,
    /// Query heads `H`.
    pub n_head: usize,
    /// Head dim `D` (K and V share it; one KV head).
    pub head_dim: usize,
    /// RoPE dims `R` at the end of each head.
    pub n_rot: usize,
    /// Query low rank `rq`.
    pub q_lora_rank: usize,
    /// Output groups `G`.
    pub n_out_group: usize,
    /// Per-group output rank `ro`.
    pub o_lora_rank: usize,
    /// Sliding window `W` (raw rows visible, current token included).
    pub sliding_window: usize,
    /// Compression ratio per layer (`0` SWA, `4` CSA, other HCA-style); `n_layer` entries.
    pub compress_ratios: Vec<u32>,
    /// Main RoPE base (sliding layers).
    pub rope_freq_base: f32,
    /// Compressed-layer RoPE base.
    pub compress_rope_freq_base: f32,
    /// YaRN of the compressed-layer RoPE, when active (type yarn and factor > 1).
    pub rope_yarn: Option<Yarn>,
    /// Indexer heads `HI`.
    pub n_indexer_head: usize,
    /// Indexer head dim `DI`.
    pub indexer_head_dim: usize,
    /// Indexer top-k `KI`.
    pub indexer_top_k: usize,
    /// Hyper-connection streams `nhc`.
    pub n_hc: usize,
    /// Sinkhorn-Knopp iterations `T`.
    pub n_hc_sinkhorn_iter: usize,
    /// HC epsilon.
    pub hc_eps: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Routed experts `E`.
    pub n_expert: usize,
    /// Experts per token `k`.
    pub n_expert_used: usize,
    /// Expert FFN width `F`.
    pub n_ff_exp: usize,
    /// Shared experts (shared width is `F * n_expert_shared`).
    pub n_expert_shared: usize,
    /// Leading layers routed by token id (`tid2eid`).
    pub n_hash_layer: usize,
    /// Routed weight scale `lambda`.
    pub expert_weights_scale: f32,
    /// Whether the top-k weights are normalised to sum 1 before scaling.
    pub expert_weights_norm: bool,
    /// SwiGLU clamp of routed experts per layer (`<= 1e-6` means none).
    pub swiglu_clamp_exp: Vec<f32>,
    /// SwiGLU clamp of the shared expert per layer.
    pub swiglu_clamp_shexp: Vec<f32>,
    /// Training context length (informative).
    pub n_ctx_train: usize,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id.
    pub eos_token_id: Option<u32>,
}

/// Typed access to GGUF metadata; implemented over the GGUF reader (see `weights`).
pub trait Metadata {
    /// An integer key (any integer encoding).
    fn get_u64(&self, key: &str) -> Option<u64>;
    /// A float key (any numeric encoding).
    fn get_f32(&self, key: &str) -> Option<f32>;
    /// A boolean key.
    fn get_bool(&self, key: &str) -> Option<bool>;
    /// A string key.
    fn get_str(&self, key: &str) -> Option<String>;
    /// A numeric array key, as f64.
    fn get_array_f64(&self, key: &str) -> Option<Vec<f64>>;
}

const P: &str = "deepseek4.";

impl Config {
    /// Compression ratio of layer `layer_idx`.
    pub fn compress_ratio(&self, layer_idx: usize) -> usize {
        self.compress_ratios[layer_idx] as usize
    }

    /// Non-RoPE dims of a head, `D - R`.
    pub fn n_nope(&self) -> usize {
        self.head_dim - self.n_rot
    }

    /// HC mix width `(2 + nhc) * nhc`.
    pub fn n_hc_mix(&self) -> usize {
        (2 + self.n_hc) * self.n_hc
    }

    /// Shared expert width `F * n_expert_shared`.
    pub fn n_ff_shexp(&self) -> usize {
        self.n_ff_exp * self.n_expert_shared
    }

    /// Whether layer `layer_idx` routes by token id.
    pub fn is_hash_layer(&self, layer_idx: usize) -> bool {
        layer_idx < self.n_hash_layer
    }

    /// Reads the shape from GGUF metadata (`deepseek4.*` keys, MODEL.md s1.4) and validates it.
    pub fn from_gguf(md: &dyn Metadata) -> Result<Config> {
        let arch = md.get_str("general.architecture");
        if arch.as_deref() != Some("deepseek4") {
            return Err(config_err(
                "general.architecture",
                format!("expected \"deepseek4\", found {arch:?}"),
            ));
        }
        let req_u = |k: &str| -> Result<usize> {
            md.get_u64(&format!("{P}{k}"))
                .map(|v| v as usize)
                .ok_or_else(|| config_err(&format!("{P}{k}"), "missing or not an integer"))
        };
        let req_f = |k: &str| -> Result<f32> {
            md.get_f32(&format!("{P}{k}"))
                .ok_or_else(|| config_err(&format!("{P}{k}"), "missing or not a number"))
        };
        let n_layer = req_u("block_count")?;
        let n_mtp = md.get_u64(&format!("{P}nextn_predict_layers")).unwrap_or(0) as usize;
        // llama.cpp MTP files count the MTP block in block_count; main layers exclude it.
        let n_layer = n_layer.saturating_sub(n_mtp);
        let head_dim = req_u("attention.key_length")?;
        let value_length = req_u("attention.value_length")?;
        if value_length != head_dim {
            return Err(config_err(
                &format!("{P}attention.value_length"),
                format!("{value_length} != key_length {head_dim}"),
            ));
        }
        let kv_heads = req_u("attention.head_count_kv")?;
        if kv_heads != 1 {
            return Err(config_err(
                &format!("{P}attention.head_count_kv"),
                format!("{kv_heads}, must be 1"),
            ));
        }
        let ratios = md
            .get_array_f64(&format!("{P}attention.compress_ratios"))
            .ok_or_else(|| config_err(&format!("{P}attention.compress_ratios"), "missing"))?;
        let compress_ratios = ratios.iter().map(|&r| r as u32).collect();
        let clamp_exp = md
            .get_array_f64(&format!("{P}swiglu_clamp_exp"))
            .ok_or_else(|| config_err(&format!("{P}swiglu_clamp_exp"), "missing"))?;
        let clamp_shexp = md
            .get_array_f64(&format!("{P}swiglu_clamp_shexp"))
            .unwrap_or_else(|| clamp_exp.clone());
        if let Some(g) = md.get_u64(&format!("{P}expert_group_count"))
            && g > 1
        {
            return Err(config_err(
                &format!("{P}expert_group_count"),
                format!("{g}: group-limited routing does not exist in V4"),
            ));
        }
        if let Some(f) = md.get_u64(&format!("{P}expert_gating_func"))
            && f != 4
        {
            return Err(config_err(
                &format!("{P}expert_gating_func"),
                format!("{f}, expected 4 (sqrt-softplus)"),
            ));
        }
        let scaling_type = md.get_str(&format!("{P}rope.scaling.type"));
        let factor = md
            .get_f32(&format!("{P}rope.scaling.factor"))
            .unwrap_or(1.0);
        let rope_yarn = if scaling_type.as_deref().unwrap_or("yarn") == "yarn" && factor > 1.0 {
            Some(Yarn {
                factor,
                original_ctx: req_u("rope.scaling.original_context_length")? as u64,
                beta_fast: md
                    .get_f32(&format!("{P}rope.scaling.yarn_beta_fast"))
                    .unwrap_or(32.0),
                beta_slow: md
                    .get_f32(&format!("{P}rope.scaling.yarn_beta_slow"))
                    .unwrap_or(1.0),
            })
        } else {
            None
        };
        let cfg = Config {
            n_layer,
            n_embd: req_u("embedding_length")?,
            // Fall back to the embedding rows later when absent (llama.cpp conversions).
            n_vocab: md.get_u64(&format!("{P}vocab_size")).unwrap_or(0) as usize,
            n_head: req_u("attention.head_count")?,
            head_dim,
            n_rot: req_u("rope.dimension_count")?,
            q_lora_rank: req_u("attention.q_lora_rank")?,
            n_out_group: req_u("attention.output_group_count")?,
            o_lora_rank: req_u("attention.output_lora_rank")?,
            sliding_window: req_u("attention.sliding_window")?,
            compress_ratios,
            rope_freq_base: req_f("rope.freq_base")?,
            compress_rope_freq_base: req_f("attention.compress_rope_freq_base")?,
            rope_yarn,
            n_indexer_head: req_u("attention.indexer.head_count")?,
            indexer_head_dim: req_u("attention.indexer.key_length")?,
            indexer_top_k: req_u("attention.indexer.top_k")?,
            n_hc: req_u("hyper_connection.count")?,
            n_hc_sinkhorn_iter: req_u("hyper_connection.sinkhorn_iterations")?,
            hc_eps: req_f("hyper_connection.epsilon")?,
            rms_eps: req_f("attention.layer_norm_rms_epsilon")?,
            n_expert: req_u("expert_count")?,
            n_expert_used: req_u("expert_used_count")?,
            n_ff_exp: req_u("expert_feed_forward_length")?,
            n_expert_shared: req_u("expert_shared_count")?,
            n_hash_layer: req_u("hash_layer_count")?,
            expert_weights_scale: req_f("expert_weights_scale")?,
            expert_weights_norm: md
                .get_bool(&format!("{P}expert_weights_norm"))
                .unwrap_or(true),
            swiglu_clamp_exp: clamp_exp.iter().map(|&c| c as f32).collect(),
            swiglu_clamp_shexp: clamp_shexp.iter().map(|&c| c as f32).collect(),
            n_ctx_train: md.get_u64(&format!("{P}context_length")).unwrap_or(0) as usize,
            bos_token_id: md.get_u64("tokenizer.ggml.bos_token_id").map(|v| v as u32),
            eos_token_id: md.get_u64("tokenizer.ggml.eos_token_id").map(|v| v as u32),
        };
        Ok(cfg)
    }

    /// Reads the shape from a Hugging Face `config.json` (transformers 5.23 `DeepseekV4Config`
    /// names, including the legacy keys of the hub checkpoint) and validates it.
    pub fn from_hf_json(text: &str) -> Result<Config> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| config_err("config.json", e.to_string()))?;
        let get = |k: &str| v.get(k).filter(|x| !x.is_null());
        let req_u = |k: &str| -> Result<usize> {
            get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| config_err(k, "missing or not an integer"))
        };
        let opt_u = |k: &str, d: usize| -> Result<usize> {
            match get(k) {
                None => Ok(d),
                Some(x) => x
                    .as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| config_err(k, "not an integer")),
            }
        };
        let opt_f = |k: &str, d: f32| -> Result<f32> {
            match get(k) {
                None => Ok(d),
                Some(x) => x
                    .as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| config_err(k, "not a number")),
            }
        };
        if let Some(mt) = get("model_type").and_then(Value::as_str)
            && mt != "deepseek_v4"
        {
            return Err(config_err(
                "model_type",
                format!("expected \"deepseek_v4\", found {mt:?}"),
            ));
        }
        let n_layer = req_u("num_hidden_layers")?;
        let head_dim = req_u("head_dim")?;
        let kv_heads = opt_u("num_key_value_heads", 1)?;
        if kv_heads != 1 {
            return Err(config_err(
                "num_key_value_heads",
                format!("{kv_heads}, must be 1"),
            ));
        }
        let n_rot = match get("qk_rope_head_dim").and_then(Value::as_u64) {
            Some(r) => r as usize,
            None => {
                let f = opt_f("partial_rotary_factor", 64.0 / 512.0)?;
                (head_dim as f32 * f) as usize
            }
        };
        // Schedule: layer_types + compress_rates (transformers), else legacy compress_ratios.
        let compress_ratios: Vec<u32> = if let Some(types) =
            get("layer_types").and_then(Value::as_array)
        {
            let rates = get("compress_rates");
            let rate = |name: &str, default: u64| -> Result<u32> {
                match rates.and_then(|r| r.get(name)) {
                    None => Ok(default as u32),
                    Some(x) => x.as_u64().map(|x| x as u32).ok_or_else(|| {
                        config_err(&format!("compress_rates.{name}"), "not an integer")
                    }),
                }
            };
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(0),
                    Some("compressed_sparse_attention") => rate("compressed_sparse_attention", 4),
                    Some("heavily_compressed_attention") => {
                        rate("heavily_compressed_attention", 128)
                    }
                    other => Err(config_err(
                        "layer_types",
                        format!("unknown layer type {other:?}"),
                    )),
                })
                .collect::<Result<_>>()?
        } else if let Some(r) = get("compress_ratios").and_then(Value::as_array) {
            r.iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| config_err("compress_ratios", "not an integer"))
                })
                .collect::<Result<_>>()?
        } else {
            return Err(config_err(
                "layer_types",
                "missing (and no compress_ratios); the default schedule is not Flash's",
            ));
        };
        let n_hash_layer = if let Some(types) = get("mlp_layer_types").and_then(Value::as_array) {
            let n = types
                .iter()
                .take_while(|t| t.as_str() == Some("hash_moe"))
                .count();
            if types[n..].iter().any(|t| t.as_str() == Some("hash_moe")) {
                return Err(config_err(
                    "mlp_layer_types",
                    "hash_moe layers must be a prefix",
                ));
            }
            n
        } else {
            opt_u("num_hash_layers", 3)?
        };
        let scoring = get("scoring_func")
            .and_then(Value::as_str)
            .unwrap_or("sqrtsoftplus");
        if scoring != "sqrtsoftplus" {
            return Err(config_err(
                "scoring_func",
                format!("{scoring:?}, only sqrtsoftplus is supported"),
            ));
        }
        // RoPE: nested rope_parameters {main, compress} (transformers) or flat rope_theta,
        // compress_rope_theta and rope_scaling (hub).
        let rp = get("rope_parameters");
        let main = rp.and_then(|r| r.get("main"));
        let comp = rp.and_then(|r| r.get("compress"));
        let num = |o: Option<&Value>, k: &str| o.and_then(|o| o.get(k)).and_then(Value::as_f64);
        let rope_freq_base = num(main, "rope_theta")
            .map(|x| x as f32)
            .map_or_else(|| opt_f("rope_theta", 10000.0), Ok)?;
        let compress_rope_freq_base = num(comp, "rope_theta")
            .map(|x| x as f32)
            .map_or_else(|| opt_f("compress_rope_theta", 160000.0), Ok)?;
        let scaling = comp.or_else(|| get("rope_scaling"));
        let yarn_type = scaling
            .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_yarn = if yarn_type == "yarn" {
            let factor = num(scaling, "factor").unwrap_or(1.0) as f32;
            let original_ctx =
                num(scaling, "original_max_position_embeddings").ok_or_else(|| {
                    config_err("rope_scaling.original_max_position_embeddings", "missing")
                })? as u64;
            let fast = num(scaling, "beta_fast").unwrap_or(32.0) as f32;
            let slow = num(scaling, "beta_slow").unwrap_or(1.0) as f32;
            (factor > 1.0).then_some(Yarn {
                factor,
                original_ctx,
                beta_fast: fast,
                beta_slow: slow,
            })
        } else {
            None
        };
        let swiglu = opt_f("swiglu_limit", 10.0)?;
        let id = |k: &str| get(k).and_then(Value::as_u64).map(|x| x as u32);
        let cfg = Config {
            n_layer,
            n_embd: req_u("hidden_size")?,
            n_vocab: req_u("vocab_size")?,
            n_head: req_u("num_attention_heads")?,
            head_dim,
            n_rot,
            q_lora_rank: req_u("q_lora_rank")?,
            n_out_group: req_u("o_groups")?,
            o_lora_rank: req_u("o_lora_rank")?,
            sliding_window: req_u("sliding_window")?,
            compress_ratios,
            rope_freq_base,
            compress_rope_freq_base,
            rope_yarn,
            n_indexer_head: req_u("index_n_heads")?,
            indexer_head_dim: req_u("index_head_dim")?,
            indexer_top_k: req_u("index_topk")?,
            n_hc: opt_u("hc_mult", 4)?,
            n_hc_sinkhorn_iter: opt_u("hc_sinkhorn_iters", 20)?,
            hc_eps: opt_f("hc_eps", 1e-6)?,
            rms_eps: opt_f("rms_norm_eps", 1e-6)?,
            n_expert: req_u("n_routed_experts")?,
            n_expert_used: req_u("num_experts_per_tok")?,
            n_ff_exp: req_u("moe_intermediate_size")?,
            n_expert_shared: opt_u("n_shared_experts", 1)?,
            n_hash_layer,
            expert_weights_scale: opt_f("routed_scaling_factor", 1.0)?,
            expert_weights_norm: get("norm_topk_prob")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            swiglu_clamp_exp: vec![swiglu; n_layer],
            swiglu_clamp_shexp: vec![swiglu; n_layer],
            n_ctx_train: opt_u("max_position_embeddings", 0)?,
            bos_token_id: id("bos_token_id"),
            eos_token_id: id("eos_token_id"),
        };
        Ok(cfg)
    }

    /// Checks the shape constraints of MODEL.md s1.6; every later step relies on them.
    pub fn validate(&mut self) -> Result<()> {
        let pos = |k: &str, v: usize| {
            if v == 0 {
                Err(config_err(k, "must be positive"))
            } else {
                Ok(())
            }
        };
        pos("n_layer", self.n_layer)?;
        pos("n_embd", self.n_embd)?;
        pos("n_vocab", self.n_vocab)?;
        pos("n_head", self.n_head)?;
        pos("head_dim", self.head_dim)?;
        pos("q_lora_rank", self.q_lora_rank)?;
        pos("n_out_group", self.n_out_group)?;
        pos("o_lora_rank", self.o_lora_rank)?;
        pos("sliding_window", self.sliding_window)?;
        pos("n_hc", self.n_hc)?;
        pos("n_hc_sinkhorn_iter", self.n_hc_sinkhorn_iter)?;
        pos("n_expert", self.n_expert)?;
        pos("n_ff_exp", self.n_ff_exp)?;
        if !self.n_rot.is_multiple_of(2) || self.n_rot > self.head_dim {
            return Err(config_err(
                "n_rot",
                format!(
                    "{} must be even and <= head_dim {}",
                    self.n_rot, self.head_dim
                ),
            ));
        }
        if !self.n_head.is_multiple_of(self.n_out_group) {
            return Err(config_err(
                "n_out_group",
                format!(
                    "{} does not divide n_head {}",
                    self.n_out_group, self.n_head
                ),
            ));
        }
        if self.compress_ratios.len() < self.n_layer {
            return Err(config_err(
                "compress_ratios",
                format!(
                    "{} entries < n_layer {}",
                    self.compress_ratios.len(),
                    self.n_layer
                ),
            ));
        }
        // Entries past n_layer belong to MTP blocks; the main model uses the first n_layer.
        let has_csa = self.compress_ratios[..self.n_layer].contains(&4);
        if has_csa {
            pos("n_indexer_head", self.n_indexer_head)?;
            pos("indexer_head_dim", self.indexer_head_dim)?;
            pos("indexer_top_k", self.indexer_top_k)?;
            if self.n_rot > self.indexer_head_dim {
                return Err(config_err(
                    "indexer_head_dim",
                    format!(
                        "{} < n_rot {} (the indexer rotates its last n_rot dims)",
                        self.indexer_head_dim, self.n_rot
                    ),
                ));
            }
        }
        if self.n_expert_used == 0 || self.n_expert_used > self.n_expert {
            return Err(config_err(
                "n_expert_used",
                format!("{} not in 1..={}", self.n_expert_used, self.n_expert),
            ));
        }
        if self.n_hash_layer > self.n_layer {
            return Err(config_err(
                "n_hash_layer",
                format!("{} > n_layer {}", self.n_hash_layer, self.n_layer),
            ));
        }
        for (key, v) in [
            ("swiglu_clamp_exp", &mut self.swiglu_clamp_exp),
            ("swiglu_clamp_shexp", &mut self.swiglu_clamp_shexp),
        ] {
            if v.len() < self.n_layer {
                return Err(config_err(
                    key,
                    format!("{} entries < n_layer {}", v.len(), self.n_layer),
                ));
            }
            v.truncate(self.n_layer);
        }
        Ok(())
    }

    /// Whether the quantisation simulation (FP8 KV, indexer Hadamard + FP4) fits this shape.
    ///
    /// MODEL.md s1.6 item 9 asks for `Dn % 64 == 0` and `DI % 32 == 0`; Flash has whole
    /// blocks. For tiny test shapes a trailing partial block is deliberately simulated as a
    /// shorter block (its own amax and scale), so only the Hadamard's power-of-two `DI` is a
    /// hard requirement.
    pub fn supports_qat_sim(&self) -> bool {
        let has_csa = self.compress_ratios[..self.n_layer].contains(&4);
        !has_csa || self.indexer_head_dim.is_power_of_two()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{
      "model_type": "deepseek_v4", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3,
      "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32, "q_lora_rank": 16,
      "qk_rope_head_dim": 8, "o_groups": 2, "o_lora_rank": 8, "sliding_window": 8,
      "layer_types": ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
      "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
      "mlp_layer_types": ["hash_moe", "moe", "moe"], "index_n_heads": 16, "index_head_dim": 16,
      "index_topk": 2, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
      "swiglu_limit": 1.5, "routed_scaling_factor": 1.5,
      "rope_parameters": {"main": {"rope_theta": 10000.0, "rope_type": "default"},
        "compress": {"rope_theta": 160000.0, "rope_type": "yarn", "factor": 4.0,
                     "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}}
    }"#;

    #[test]
    fn hf_config_reads_schedule_and_yarn() {
        let mut c = Config::from_hf_json(TINY).expect("tiny config parses");
        c.validate().expect("tiny config is valid");
        assert_eq!(c.compress_ratios, vec![0, 4, 8]);
        assert_eq!(c.n_hash_layer, 1);
        assert_eq!(c.n_rot, 8);
        assert_eq!(c.swiglu_clamp_exp, vec![1.5; 3]);
        assert_eq!(c.rope_yarn.as_ref().map(|y| y.original_ctx), Some(32));
    }

    /// GGUF-style metadata from (key, value) pairs; arrays as f64 lists.
    struct Md(Vec<(&'static str, Value)>);

    impl Metadata for Md {
        fn get_u64(&self, key: &str) -> Option<u64> {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.as_u64())
        }
        fn get_f32(&self, key: &str) -> Option<f32> {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.as_f64())
                .map(|x| x as f32)
        }
        fn get_bool(&self, key: &str) -> Option<bool> {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.as_bool())
        }
        fn get_str(&self, key: &str) -> Option<String> {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.as_str().map(str::to_string))
        }
        fn get_array_f64(&self, key: &str) -> Option<Vec<f64>> {
            let a = self.0.iter().find(|(k, _)| *k == key)?.1.as_array()?;
            a.iter().map(Value::as_f64).collect()
        }
    }

    fn tiny_gguf_md() -> Md {
        let u = |k: &'static str, v: u64| (k, Value::from(v));
        let f = |k: &'static str, v: f64| (k, Value::from(v));
        Md(vec![
            ("general.architecture", Value::from("deepseek4")),
            u("deepseek4.block_count", 3),
            u("deepseek4.embedding_length", 32),
            u("deepseek4.vocab_size", 64),
            u("deepseek4.attention.head_count", 4),
            u("deepseek4.attention.head_count_kv", 1),
            u("deepseek4.attention.key_length", 32),
            u("deepseek4.attention.value_length", 32),
            u("deepseek4.rope.dimension_count", 8),
            u("deepseek4.attention.q_lora_rank", 16),
            u("deepseek4.attention.output_group_count", 2),
            u("deepseek4.attention.output_lora_rank", 8),
            u("deepseek4.attention.sliding_window", 8),
            (
                "deepseek4.attention.compress_ratios",
                serde_json::json!([0, 4, 8, 0]),
            ),
            f("deepseek4.rope.freq_base", 10000.0),
            f("deepseek4.attention.compress_rope_freq_base", 160000.0),
            f("deepseek4.rope.scaling.factor", 4.0),
            u("deepseek4.rope.scaling.original_context_length", 32),
            u("deepseek4.attention.indexer.head_count", 16),
            u("deepseek4.attention.indexer.key_length", 16),
            u("deepseek4.attention.indexer.top_k", 2),
            u("deepseek4.hyper_connection.count", 4),
            u("deepseek4.hyper_connection.sinkhorn_iterations", 20),
            f("deepseek4.hyper_connection.epsilon", 1e-6),
            f("deepseek4.attention.layer_norm_rms_epsilon", 1e-6),
            u("deepseek4.expert_count", 8),
            u("deepseek4.expert_used_count", 2),
            u("deepseek4.expert_feed_forward_length", 16),
            u("deepseek4.expert_shared_count", 1),
            u("deepseek4.hash_layer_count", 1),
            f("deepseek4.expert_weights_scale", 1.5),
            (
                "deepseek4.swiglu_clamp_exp",
                serde_json::json!([1.5, 1.5, 1.5, 1.5]),
            ),
        ])
    }

    #[test]
    fn gguf_metadata_matches_hf_config() {
        let mut g = Config::from_gguf(&tiny_gguf_md()).expect("tiny metadata parses");
        g.validate().expect("valid");
        let mut h = Config::from_hf_json(TINY).expect("parses");
        h.validate().expect("valid");
        assert_eq!(g.compress_ratios[..3], h.compress_ratios[..]);
        assert_eq!(g.rope_yarn, h.rope_yarn);
        assert_eq!(
            (g.n_rot, g.n_hash_layer, g.swiglu_clamp_shexp.clone()),
            (h.n_rot, h.n_hash_layer, h.swiglu_clamp_exp.clone())
        );
    }

    #[test]
    fn gguf_errors_name_the_key() {
        let check = |drop: &str, want: &str| {
            let mut md = tiny_gguf_md();
            md.0.retain(|(k, _)| *k != drop);
            let e = Config::from_gguf(&md).expect_err(drop);
            assert!(e.to_string().contains(want), "{e}");
        };
        check(
            "deepseek4.attention.key_length",
            "deepseek4.attention.key_length",
        );
        check("deepseek4.expert_count", "deepseek4.expert_count");
        check(
            "deepseek4.attention.compress_ratios",
            "deepseek4.attention.compress_ratios",
        );
        check("general.architecture", "general.architecture");
        let mut md = tiny_gguf_md();
        md.0.push(("deepseek4.expert_gating_func", Value::from(1u64)));
        let e = Config::from_gguf(&md).expect_err("softmax gating");
        assert!(e.to_string().contains("expert_gating_func"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let bad = TINY.replace("\"o_groups\": 2", "\"o_groups\": 3");
        let mut c = Config::from_hf_json(&bad).expect("parses");
        let e = c.validate().expect_err("3 groups do not divide 4 heads");
        assert!(e.to_string().contains("n_out_group"), "{e}");
        let missing = TINY.replace("\"head_dim\": 32,", "");
        let e = Config::from_hf_json(&missing).expect_err("head_dim missing");
        assert!(e.to_string().contains("head_dim"), "{e}");
    }
}
