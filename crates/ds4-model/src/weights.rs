//! Weight binding: every tensor of the model bound once, by its ds4 GGUF name.
//!
//! Fields are named after the GGUF name without `blk.N.` and `.weight` (MODEL.md s2), so
//! `grep ffn_gate_exps` finds the binding, the forward pass and the kernels. Matrices stay
//! [`HostTensor`]s in whatever block format the file has (zero copy from the memory map);
//! the small 1-D tensors (norms, sinks, HC bases and scales, `ape`, the selection bias) are
//! converted to `Vec<f32>` once at load because every backend wants them as plain floats.
//!
//! A [`TensorSource`] hands out tensors by GGUF name: the GGUF file does so directly, the
//! Hugging Face checkpoint (`checkpoint`) after renaming and stacking. Shapes are checked
//! here against the [`Config`], naming the tensor, so a wrong file fails at load.

use ds4_tensor::{DType, HostTensor};

use crate::config::Config;
use crate::error::{Result, tensor_err};

/// Something that hands out tensors by their GGUF name.
pub trait TensorSource {
    /// The tensor called `name` (GGUF naming), if present.
    fn tensor(&self, name: &str) -> Option<HostTensor>;
}

/// Weights of one compressor (attention or indexer), MODEL.md s2.4/s2.5.
#[derive(Debug, Clone)]
pub struct CompressorWeights {
    /// `*_compressor_kv`: `[coff*w, d]`.
    pub kv: HostTensor,
    /// `*_compressor_gate`: `[coff*w, d]`.
    pub gate: HostTensor,
    /// `*_compressor_ape`: `[r, coff*w]`, row-major.
    pub ape: Vec<f32>,
    /// `*_compressor_norm`: `[w]`.
    pub norm: Vec<f32>,
}

/// Indexer weights of a CSA layer (MODEL.md s2.5).
#[derive(Debug, Clone)]
pub struct IndexerWeights {
    /// `indexer.attn_q_b`: `[HI*DI, rq]`.
    pub attn_q_b: HostTensor,
    /// `indexer.proj`: `[HI, d]`.
    pub proj: HostTensor,
    /// `indexer_compressor_{kv,gate,ape,norm}` with `w = DI`.
    pub compressor: CompressorWeights,
}

/// All tensors of one layer.
///
/// Each field is the GGUF tensor `blk.N.<field>.weight` (MODEL.md s2.3-s2.6), with its
/// row-major logical shape in the trailing comment; the block is deliberately vertical so the
/// binding reads as a table.
#[derive(Debug, Clone)]
#[rustfmt::skip]
#[allow(missing_docs)]
pub struct LayerWeights {
    pub hc_attn_fn:      HostTensor,       // [mix, nhc*d]
    pub hc_attn_base:    Vec<f32>,         // [mix]
    pub hc_attn_scale:   Vec<f32>,         // [3]
    pub attn_norm:       Vec<f32>,         // [d]
    pub attn_q_a:        HostTensor,       // [rq, d]
    pub attn_q_a_norm:   Vec<f32>,         // [rq]
    pub attn_q_b:        HostTensor,       // [H*D, rq]
    pub attn_kv:         HostTensor,       // [D, d]
    pub attn_kv_a_norm:  Vec<f32>,         // [D]
    pub attn_sinks:      Vec<f32>,         // [H]
    pub attn_output_a:   HostTensor,       // [G*ro, H*D/G]
    pub attn_output_b:   HostTensor,       // [d, G*ro]
    pub attn_compressor: Option<CompressorWeights>,
    pub indexer:         Option<IndexerWeights>,
    pub hc_ffn_fn:       HostTensor,       // [mix, nhc*d]
    pub hc_ffn_base:     Vec<f32>,         // [mix]
    pub hc_ffn_scale:    Vec<f32>,         // [3]
    pub ffn_norm:        Vec<f32>,         // [d]
    pub ffn_gate_inp:    HostTensor,       // [E, d]
    pub exp_probs_b:     Option<Vec<f32>>, // [E], scored layers only
    pub ffn_gate_tid2eid: Option<Vec<u32>>, // [V, k], hash layers only
    pub ffn_gate_exps:   HostTensor,       // [E, F, d]
    pub ffn_up_exps:     HostTensor,       // [E, F, d]
    pub ffn_down_exps:   HostTensor,       // [E, d, F]
    pub ffn_gate_shexp:  HostTensor,       // [Fs, d]
    pub ffn_up_shexp:    HostTensor,       // [Fs, d]
    pub ffn_down_shexp:  HostTensor,       // [d, Fs]
}

/// All tensors of the model; global fields are the GGUF tensors `<field>.weight` (MODEL.md s2.2).
#[derive(Debug, Clone)]
#[rustfmt::skip]
#[allow(missing_docs)]
pub struct Weights {
    pub token_embd:      HostTensor,       // [V, d]
    pub layers:          Vec<LayerWeights>,
    pub output_hc_fn:    HostTensor,       // [nhc, nhc*d]
    pub output_hc_base:  Vec<f32>,         // [nhc]
    pub output_hc_scale: Vec<f32>,         // [1]
    pub output_norm:     Vec<f32>,         // [d]
    pub output:          HostTensor,       // [V, d]
}

/// Converts a small tensor's values (any format ds4-quant decodes) to f32.
pub fn to_f32_vec(t: &HostTensor) -> Result<Vec<f32>> {
    let n = t.shape.elem_count().unwrap_or(0) as usize;
    let mut out = vec![0.0f32; n];
    ds4_quant::row::dequantize(t.dtype, t.data(), &mut out)
        .map_err(|e| tensor_err(&t.name, e.to_string()))?;
    Ok(out)
}

struct Binder<'a> {
    src: &'a dyn TensorSource,
}

impl Binder<'_> {
    fn opt(&self, name: &str, dims: &[usize]) -> Result<Option<HostTensor>> {
        let Some(t) = self.src.tensor(name) else {
            return Ok(None);
        };
        let got: Vec<u64> = t.shape.numpy();
        let want: Vec<u64> = dims.iter().map(|&d| d as u64).collect();
        if got != want {
            return Err(tensor_err(
                name,
                format!("expected shape {want:?}, got {got:?}"),
            ));
        }
        Ok(Some(t))
    }

    fn req(&self, name: &str, dims: &[usize]) -> Result<HostTensor> {
        self.opt(name, dims)?
            .ok_or_else(|| tensor_err(name, "missing"))
    }

    fn vec(&self, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
        to_f32_vec(&self.req(name, dims)?)
    }

    fn compressor(
        &self,
        prefix: &str,
        ratio: usize,
        width: usize,
        n_embd: usize,
    ) -> Result<CompressorWeights> {
        let coff = if ratio == 4 { 2 } else { 1 };
        Ok(CompressorWeights {
            kv: self.req(&format!("{prefix}_kv.weight"), &[coff * width, n_embd])?,
            gate: self.req(&format!("{prefix}_gate.weight"), &[coff * width, n_embd])?,
            ape: self.vec(&format!("{prefix}_ape.weight"), &[ratio, coff * width])?,
            norm: self.vec(&format!("{prefix}_norm.weight"), &[width])?,
        })
    }
}

impl Weights {
    /// Binds and shape-checks every tensor the config calls for.
    #[rustfmt::skip]
    pub fn bind(cfg: &Config, src: &dyn TensorSource) -> Result<Weights> {
        let b = Binder { src };
        let (d, v, nhc, mix) = (cfg.n_embd, cfg.n_vocab, cfg.n_hc, cfg.n_hc_mix());
        let (h, hd, rq) = (cfg.n_head, cfg.head_dim, cfg.q_lora_rank);
        let (g, ro) = (cfg.n_out_group, cfg.o_lora_rank);
        let (e, f, fs, k) = (cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_shexp(), cfg.n_expert_used);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for il in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{il}.{s}");
            let ratio = cfg.compress_ratio(il);
            let attn_compressor = if ratio > 0 {
                Some(b.compressor(&n("attn_compressor"), ratio, hd, d)?)
            } else {
                None
            };
            let indexer = if ratio == 4 {
                let (hi, di) = (cfg.n_indexer_head, cfg.indexer_head_dim);
                Some(IndexerWeights {
                    attn_q_b:   b.req(&n("indexer.attn_q_b.weight"), &[hi * di, rq])?,
                    proj:       b.req(&n("indexer.proj.weight"), &[hi, d])?,
                    compressor: b.compressor(&n("indexer_compressor"), ratio, di, d)?,
                })
            } else {
                None
            };
            let hash = cfg.is_hash_layer(il);
            let tid2eid = if hash {
                let t = b.req(&n("ffn_gate_tid2eid.weight"), &[v, k])?;
                Some(tid2eid_ids(&t, e)?)
            } else {
                None
            };
            // The selection bias does nothing on hash layers (MODEL.md D19); ds4 treats a
            // missing bias on scored layers as zero.
            let exp_probs_b = if hash { None } else {
                b.opt(&n("exp_probs_b.bias"), &[e])?.map(|t| to_f32_vec(&t)).transpose()?
            };
            layers.push(LayerWeights {
                hc_attn_fn:      b.req(&n("hc_attn_fn.weight"), &[mix, nhc * d])?,
                hc_attn_base:    b.vec(&n("hc_attn_base.weight"), &[mix])?,
                hc_attn_scale:   b.vec(&n("hc_attn_scale.weight"), &[3])?,
                attn_norm:       b.vec(&n("attn_norm.weight"), &[d])?,
                attn_q_a:        b.req(&n("attn_q_a.weight"), &[rq, d])?,
                attn_q_a_norm:   b.vec(&n("attn_q_a_norm.weight"), &[rq])?,
                attn_q_b:        b.req(&n("attn_q_b.weight"), &[h * hd, rq])?,
                attn_kv:         b.req(&n("attn_kv.weight"), &[hd, d])?,
                attn_kv_a_norm:  b.vec(&n("attn_kv_a_norm.weight"), &[hd])?,
                attn_sinks:      b.vec(&n("attn_sinks.weight"), &[h])?,
                attn_output_a:   b.req(&n("attn_output_a.weight"), &[g * ro, h * hd / g])?,
                attn_output_b:   b.req(&n("attn_output_b.weight"), &[d, g * ro])?,
                attn_compressor,
                indexer,
                hc_ffn_fn:       b.req(&n("hc_ffn_fn.weight"), &[mix, nhc * d])?,
                hc_ffn_base:     b.vec(&n("hc_ffn_base.weight"), &[mix])?,
                hc_ffn_scale:    b.vec(&n("hc_ffn_scale.weight"), &[3])?,
                ffn_norm:        b.vec(&n("ffn_norm.weight"), &[d])?,
                ffn_gate_inp:    b.req(&n("ffn_gate_inp.weight"), &[e, d])?,
                exp_probs_b,
                ffn_gate_tid2eid: tid2eid,
                ffn_gate_exps:   b.req(&n("ffn_gate_exps.weight"), &[e, f, d])?,
                ffn_up_exps:     b.req(&n("ffn_up_exps.weight"), &[e, f, d])?,
                ffn_down_exps:   b.req(&n("ffn_down_exps.weight"), &[e, d, f])?,
                ffn_gate_shexp:  b.req(&n("ffn_gate_shexp.weight"), &[fs, d])?,
                ffn_up_shexp:    b.req(&n("ffn_up_shexp.weight"), &[fs, d])?,
                ffn_down_shexp:  b.req(&n("ffn_down_shexp.weight"), &[d, fs])?,
            });
        }
        Ok(Weights {
            token_embd:      b.req("token_embd.weight", &[v, d])?,
            layers,
            output_hc_fn:    b.req("output_hc_fn.weight", &[nhc, nhc * d])?,
            output_hc_base:  b.vec("output_hc_base.weight", &[nhc])?,
            output_hc_scale: b.vec("output_hc_scale.weight", &[1])?,
            output_norm:     b.vec("output_norm.weight", &[d])?,
            output:          b.req("output.weight", &[v, d])?,
        })
    }
}

/// Reads a `tid2eid` table (I32, or I64 from a checkpoint) and checks ids are in `[0, E)`.
fn tid2eid_ids(t: &HostTensor, n_expert: usize) -> Result<Vec<u32>> {
    let b = t.data();
    let ids: Vec<i64> = match t.dtype {
        DType::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        other => {
            return Err(tensor_err(
                &t.name,
                format!("expected I32 ids, found {other:?}"),
            ));
        }
    };
    ids.iter()
        .map(|&id| {
            if id < 0 || id as usize >= n_expert {
                Err(tensor_err(
                    &t.name,
                    format!("expert id {id} not in [0, {n_expert})"),
                ))
            } else {
                Ok(id as u32)
            }
        })
        .collect()
}
