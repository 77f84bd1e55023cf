//! The embedded demo model: a tiny DeepSeek V4 with random weights and the real tokenizer.
//!
//! `ds4` and `ds4-server` fall back to it when no model file is given, so that every code
//! path above the forward pass (chat rendering, tokenization, sampling, streaming, DSML,
//! the CLI and the HTTP API) can be tried and tested without a 100 GiB download. It is
//! **not** a language model: its weights are random, so its answers are gibberish; its
//! name, [`NAME`], says so wherever a model name is shown.
//!
//! Shape ([`CONFIG_JSON`]): the real V4 architecture at toy size — hidden 64, 4 layers
//! (sliding window, CSA ratio 4 with its indexer, HCA ratio 8, CSA), hyper-connections
//! with 4 streams, 2 hash-routed then 2 score-routed MoE layers (8 experts, 2 per token,
//! one shared), and the full V4 vocabulary (129280 ids) so the real tokenizer's ids are
//! all valid.
//!
//! Weights are f32, built deterministically from [`SEED`] at first use (a few hundred
//! milliseconds; ~70 MB, mostly the embedding and output matrices) and cached for the
//! process: [`model`] clones the cached tensors cheaply (they are reference-counted).
//! Initialisation follows the fixture generator (`tests/fixtures/model/regenerate.py`):
//! matrices `N(0, 1/sqrt(fan_in))`, norms and HC scales in `[0.5, 1.5]`, sinks `N(0, 1)`,
//! compressor position biases and HC bases `N(0, 0.5)`, selection bias `N(0, 0.25)`.
//!
//! The tokenizer is DeepSeek's official `tokenizer.json` (MIT; see
//! `tests/fixtures/tokenizer/README.md`), embedded with `include_bytes!` from its one
//! committed copy in `tests/fixtures/tokenizer/tokenizer.json.gz` and unpacked at first
//! use ([`tokenizer`]). The file lives in the workspace's fixture folder (shared with the
//! tokenizer conformance tests) rather than inside the crate: the crate is not published,
//! and one copy is easier to keep right than two.
//!
//! API (stable; used by the CLI and the server):
//! - [`NAME`], [`SEED`], [`CONFIG_JSON`]: identity and shape;
//! - [`config`]: the validated [`Config`];
//! - [`model`]: a [`Model`] on the CPU backend with the given [`LoadOptions`];
//! - [`tokenizer`]: the shared real V4 [`Tokenizer`]; [`tokenizer_json`]: its source text.
//!
//! Most callers want [`crate::engine::Engine::demo`], which bundles both.

use crate::rng::SplitMix;
use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, OnceLock};

use ds4_tensor::{DType, HostTensor, Shape, TensorBytes};
use rayon::prelude::*;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::session::{LoadOptions, Model};
use crate::tokenizer::Tokenizer;
use crate::weights::{TensorSource, Weights};

/// Display name of the demo model (what `general.name` would hold).
pub const NAME: &str = "ds4-demo (random weights)";

/// Seed of the demo weights; changing it changes every demo output.
pub const SEED: u64 = 0x0D54_DE30;

/// The demo model's shape as a Hugging Face `config.json`.
pub const CONFIG_JSON: &str = r#"{
  "model_type": "deepseek_v4",
  "architectures": ["DeepseekV4ForCausalLM"],
  "vocab_size": 129280,
  "bos_token_id": 0,
  "eos_token_id": 1,
  "hidden_size": 64,
  "num_hidden_layers": 4,
  "num_attention_heads": 4,
  "num_key_value_heads": 1,
  "head_dim": 64,
  "qk_rope_head_dim": 16,
  "partial_rotary_factor": 0.25,
  "q_lora_rank": 32,
  "o_groups": 2,
  "o_lora_rank": 32,
  "sliding_window": 16,
  "layer_types": [
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
    "compressed_sparse_attention"
  ],
  "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
  "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe"],
  "n_routed_experts": 8,
  "num_experts_per_tok": 2,
  "moe_intermediate_size": 32,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "routed_scaling_factor": 1.5,
  "scoring_func": "sqrtsoftplus",
  "swiglu_limit": 10.0,
  "index_n_heads": 16,
  "index_head_dim": 32,
  "index_topk": 4,
  "hc_mult": 4,
  "hc_sinkhorn_iters": 20,
  "hc_eps": 1e-06,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "compress_rope_theta": 160000.0,
  "rope_parameters": {
    "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 4.0,
                 "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                 "attention_factor": 1.0, "partial_rotary_factor": 0.25}
  },
  "max_position_embeddings": 16384
}"#;

/// The official tokenizer, gzip-compressed (one copy in the repository).
static TOKENIZER_GZ: &[u8] = include_bytes!("../../../tests/fixtures/tokenizer/tokenizer.json.gz");

/// The validated demo config.
pub fn config() -> Result<Config> {
    let mut cfg = Config::from_hf_json(CONFIG_JSON)?;
    cfg.validate()?;
    Ok(cfg)
}

/// The demo model on the backend `opts.device` names. The weights are built at the first call and shared
/// by later ones.
pub fn model(opts: &LoadOptions) -> Result<Model> {
    static CACHE: OnceLock<std::result::Result<(Config, Weights), String>> = OnceLock::new();
    let built = CACHE.get_or_init(|| build().map_err(|e| e.to_string()));
    match built {
        Ok((cfg, weights)) => {
            let backend = crate::device::backend_for(opts, weights)?;
            Model::from_parts(cfg.clone(), weights.clone(), backend, opts)
        }
        Err(what) => Err(Error::Load {
            path: NAME.to_string(),
            what: what.clone(),
        }),
    }
}

/// The embedded official `tokenizer.json`, unpacked (6.4 MB).
pub fn tokenizer_json() -> Result<Vec<u8>> {
    let mut json = Vec::with_capacity(7 << 20);
    flate2::read::GzDecoder::new(TOKENIZER_GZ)
        .read_to_end(&mut json)
        .map_err(|e| Error::Load {
            path: "embedded tokenizer.json.gz".to_string(),
            what: e.to_string(),
        })?;
    Ok(json)
}

/// The real DeepSeek V4 tokenizer, unpacked and built at the first call, then shared.
pub fn tokenizer() -> Result<Arc<Tokenizer>> {
    static CACHE: OnceLock<std::result::Result<Arc<Tokenizer>, String>> = OnceLock::new();
    let built = CACHE.get_or_init(|| {
        let json = tokenizer_json().map_err(|e| e.to_string())?;
        Tokenizer::from_tokenizer_json(&json)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    });
    built.clone().map_err(|what| Error::Load {
        path: "embedded tokenizer".to_string(),
        what,
    })
}

/// Builds the config and random weights.
fn build() -> Result<(Config, Weights)> {
    let cfg = config()?;
    let src = RandomSource::new(&cfg);
    let weights = Weights::bind(&cfg, &src)?;
    Ok((cfg, weights))
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// `N(0, std)`.
    Normal(f32),
    /// Uniform in `[lo, hi)`.
    Uniform(f32, f32),
    /// Expert ids uniform in `[0, n)` (I32).
    Ids(u32),
}

/// A tensor source holding every demo tensor, generated eagerly by name.
struct RandomSource {
    tensors: HashMap<String, HostTensor>,
}

impl TensorSource for RandomSource {
    fn tensor(&self, name: &str) -> Option<HostTensor> {
        self.tensors.get(name).cloned()
    }
}

impl RandomSource {
    fn new(cfg: &Config) -> RandomSource {
        let mut specs: Vec<(String, Vec<usize>, Init)> = Vec::new();
        let (d, v, nhc, mix) = (cfg.n_embd, cfg.n_vocab, cfg.n_hc, cfg.n_hc_mix());
        let (h, hd, rq) = (cfg.n_head, cfg.head_dim, cfg.q_lora_rank);
        let (g, ro) = (cfg.n_out_group, cfg.o_lora_rank);
        let (e, f, fs, k) = (
            cfg.n_expert,
            cfg.n_ff_exp,
            cfg.n_ff_shexp(),
            cfg.n_expert_used,
        );
        // A matrix [rows, cols] (or [n, rows, cols]) scaled by its fan-in, the last dim.
        let mat = |dims: &[usize]| Init::Normal(1.0 / (dims[dims.len() - 1] as f32).sqrt());
        let norm = Init::Uniform(0.5, 1.5);
        let mut push = |name: String, dims: Vec<usize>, init: Option<Init>| {
            let init = init.unwrap_or_else(|| mat(&dims));
            specs.push((name, dims, init));
        };
        for il in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}.weight");
            let ratio = cfg.compress_ratio(il);
            push(n("hc_attn_fn"), vec![mix, nhc * d], None);
            push(n("hc_attn_base"), vec![mix], Some(Init::Normal(0.5)));
            push(n("hc_attn_scale"), vec![3], Some(norm));
            push(n("attn_norm"), vec![d], Some(norm));
            push(n("attn_q_a"), vec![rq, d], None);
            push(n("attn_q_a_norm"), vec![rq], Some(norm));
            push(n("attn_q_b"), vec![h * hd, rq], None);
            push(n("attn_kv"), vec![hd, d], None);
            push(n("attn_kv_a_norm"), vec![hd], Some(norm));
            push(n("attn_sinks"), vec![h], Some(Init::Normal(1.0)));
            push(n("attn_output_a"), vec![g * ro, h * hd / g], None);
            push(n("attn_output_b"), vec![d, g * ro], None);
            let mut compressor = |prefix: &str, width: usize| {
                let coff = if ratio == 4 { 2 } else { 1 };
                push(n(&format!("{prefix}_kv")), vec![coff * width, d], None);
                push(n(&format!("{prefix}_gate")), vec![coff * width, d], None);
                let ape = Some(Init::Normal(0.5));
                push(n(&format!("{prefix}_ape")), vec![ratio, coff * width], ape);
                push(n(&format!("{prefix}_norm")), vec![width], Some(norm));
            };
            if ratio > 0 {
                compressor("attn_compressor", hd);
            }
            if ratio == 4 {
                let (hi, di) = (cfg.n_indexer_head, cfg.indexer_head_dim);
                compressor("indexer_compressor", di);
                push(n("indexer.attn_q_b"), vec![hi * di, rq], None);
                push(n("indexer.proj"), vec![hi, d], None);
            }
            push(n("hc_ffn_fn"), vec![mix, nhc * d], None);
            push(n("hc_ffn_base"), vec![mix], Some(Init::Normal(0.5)));
            push(n("hc_ffn_scale"), vec![3], Some(norm));
            push(n("ffn_norm"), vec![d], Some(norm));
            push(n("ffn_gate_inp"), vec![e, d], None);
            if cfg.is_hash_layer(il) {
                push(n("ffn_gate_tid2eid"), vec![v, k], Some(Init::Ids(e as u32)));
            } else {
                let name = format!("blk.{il}.exp_probs_b.bias");
                push(name, vec![e], Some(Init::Normal(0.25)));
            }
            push(n("ffn_gate_exps"), vec![e, f, d], None);
            push(n("ffn_up_exps"), vec![e, f, d], None);
            push(n("ffn_down_exps"), vec![e, d, f], None);
            push(n("ffn_gate_shexp"), vec![fs, d], None);
            push(n("ffn_up_shexp"), vec![fs, d], None);
            push(n("ffn_down_shexp"), vec![d, fs], None);
        }
        push(
            "token_embd.weight".into(),
            vec![v, d],
            Some(Init::Normal(1.0)),
        );
        push("output_hc_fn.weight".into(), vec![nhc, nhc * d], None);
        let base = Some(Init::Normal(0.5));
        push("output_hc_base.weight".into(), vec![nhc], base);
        push("output_hc_scale.weight".into(), vec![1], Some(norm));
        push("output_norm.weight".into(), vec![d], Some(norm));
        push("output.weight".into(), vec![v, d], None);

        let tensors = specs
            .into_par_iter()
            .map(|(name, dims, init)| {
                let t = generate(&name, &dims, init);
                (name, t)
            })
            .collect();
        RandomSource { tensors }
    }
}

/// FNV-1a of the tensor name: the per-tensor stream id (independent of generation order).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Values are drawn in chunks of this many, each chunk from its own stream, so large
/// tensors fill in parallel and the result does not depend on the thread count.
const CHUNK: usize = 1 << 16;

fn generate(name: &str, dims: &[usize], init: Init) -> HostTensor {
    let n: usize = dims.iter().product();
    let dims_u64: Vec<u64> = dims.iter().map(|&x| x as u64).collect();
    let stream = SEED ^ name_hash(name);
    let fill = |out: &mut [f32], chunk: usize| {
        let mut rng =
            SplitMix(stream.wrapping_add((chunk as u64).wrapping_mul(0xA24B_AED4_963E_E407)));
        for x in out.iter_mut() {
            *x = match init {
                Init::Normal(std) => rng.normal() * std,
                Init::Uniform(lo, hi) => lo + (hi - lo) * rng.uniform(),
                Init::Ids(_) => 0.0,
            };
        }
    };
    if let Init::Ids(n_ids) = init {
        let mut rng = SplitMix(stream);
        let ids: Vec<i32> = (0..n).map(|_| (rng.next() % n_ids as u64) as i32).collect();
        return HostTensor {
            name: name.to_string(),
            dtype: DType::I32,
            shape: Shape::from_numpy(&dims_u64),
            bytes: TensorBytes::Owned(Arc::new(bytemuck::cast_slice(&ids).to_vec())),
        };
    }
    let mut values = vec![0.0f32; n];
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, c)| fill(c, i));
    HostTensor::from_f32(name, &dims_u64, &values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Session;

    #[test]
    fn demo_model_runs_and_is_deterministic() {
        let m = model(&LoadOptions::default()).expect("demo model");
        let c = m.config();
        assert_eq!(c.n_vocab, crate::tokenizer::DS4_N_VOCAB);
        // Every layer kind of the real architecture is present.
        assert_eq!(c.compress_ratios, vec![0, 4, 8, 4]);
        assert!(c.is_hash_layer(0) && !c.is_hash_layer(3));
        let mut s = Session::new(&m, 64);
        s.feed(&[0, 100, 2000, 129_279]).expect("feed");
        let a = s.logits().expect("logits").to_vec();
        assert!(a.iter().all(|x| x.is_finite()));
        // Not all equal: the model is not degenerate.
        assert!(a.iter().any(|&x| x != a[0]));
        let m2 = model(&LoadOptions::default()).expect("demo model");
        let mut s2 = Session::new(&m2, 64);
        s2.feed(&[0, 100, 2000, 129_279]).expect("feed");
        assert_eq!(a, s2.logits().expect("logits"));
    }

    #[test]
    fn demo_tokenizer_is_the_real_one() {
        let t = tokenizer().expect("tokenizer");
        assert_eq!(t.n_vocab(), crate::tokenizer::DS4_N_VOCAB);
        assert_eq!(t.specials().bos, 0);
        assert_eq!(t.specials().eos, 1);
    }
}
