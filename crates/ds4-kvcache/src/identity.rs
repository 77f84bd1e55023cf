//! The identity of a loaded model, as stored in every cache entry (docs/KVCACHE_FORMAT.md s5).
//!
//! A saved state only means something to the model that computed it. Two ids are derived
//! from the whole bound weight set, not a sample (issue 5: "hash of shape metadata and
//! weight types"):
//!
//! * `shape_id` — entries with another one are never loaded. It covers the config (every
//!   dimension, ratio, RoPE and MoE setting), whether the FP8/FP4 cache-row simulation is
//!   on (it changes the stored values), the name and shape of **every** weight tensor, and
//!   a fingerprint of the values of the model's 1-D tensors (norms, sinks, hyper-connection
//!   bases and scales, selection biases) and of the hash-routing table. Those are F32/I32 in
//!   every preset (`ds4_model::convert`), so the 2-bit and 4-bit files of one model share a
//!   `shape_id`, while another model of the same shape (other weights) does not.
//! * `weights_id` — the name and type of every weight tensor (the quantization). Entries
//!   with another one are loaded by default, as ds4 reuses 2-bit checkpoints with 4-bit
//!   weights, and refused with `--kv-cache-reject-different-quant`.
//!
//! Hashing reads a few MB of 1-D values (about 20 ms for the real Flash model); the big
//! matrices are never touched.

use std::fmt::Write as _;

use ds4_model::Model;
use ds4_model::weights::{CompressorWeights, LayerWeights};
use ds4_tensor::HostTensor;
use sha1::{Digest, Sha1};

use crate::format::ModelIdentity;

/// Accumulates the canonical bytes of both ids.
struct Builder {
    shape: Vec<u8>,
    weights: Vec<u8>,
    values: Sha1,
}

impl Builder {
    fn tensor(&mut self, t: &HostTensor) {
        // `writeln!` into a String cannot fail.
        let mut s = String::new();
        let _ = writeln!(s, "{} {:?}", t.name, t.shape.dims());
        self.shape.extend_from_slice(s.as_bytes());
        let mut w = String::new();
        let _ = writeln!(w, "{} {:?}", t.name, t.dtype);
        self.weights.extend_from_slice(w.as_bytes());
    }

    /// A 1-D float tensor bound as plain values: its length goes into the shape text, its
    /// bits into the value fingerprint.
    fn values(&mut self, name: &str, v: &[f32]) {
        let mut s = String::new();
        let _ = writeln!(s, "{name} [{}]", v.len());
        self.shape.extend_from_slice(s.as_bytes());
        self.values.update(name.as_bytes());
        self.values.update(bytemuck::cast_slice::<f32, u8>(v));
    }

    /// A float table kept as plain values but stored as a matrix in GGUF (its type depends
    /// on the preset, so only its length is part of the identity).
    fn len_only(&mut self, name: &str, n: usize) {
        let mut s = String::new();
        let _ = writeln!(s, "{name} [{n}]");
        self.shape.extend_from_slice(s.as_bytes());
    }

    fn compressor(&mut self, il: usize, what: &str, c: &CompressorWeights) {
        self.tensor(&c.kv);
        self.tensor(&c.gate);
        self.len_only(&format!("blk.{il}.{what}_compressor_ape"), c.ape.len());
        self.values(&format!("blk.{il}.{what}_compressor_norm"), &c.norm);
    }

    fn layer(&mut self, il: usize, l: &LayerWeights) {
        let v = |n: &str| format!("blk.{il}.{n}");
        self.tensor(&l.hc_attn_fn);
        self.values(&v("hc_attn_base"), &l.hc_attn_base);
        self.values(&v("hc_attn_scale"), &l.hc_attn_scale);
        self.values(&v("attn_norm"), &l.attn_norm);
        self.tensor(&l.attn_q_a);
        self.values(&v("attn_q_a_norm"), &l.attn_q_a_norm);
        self.tensor(&l.attn_q_b);
        self.tensor(&l.attn_kv);
        self.values(&v("attn_kv_a_norm"), &l.attn_kv_a_norm);
        self.values(&v("attn_sinks"), &l.attn_sinks);
        self.tensor(&l.attn_output_a);
        self.tensor(&l.attn_output_b);
        if let Some(c) = &l.attn_compressor {
            self.compressor(il, "attn", c);
        }
        if let Some(ix) = &l.indexer {
            self.tensor(&ix.attn_q_b);
            self.tensor(&ix.proj);
            self.compressor(il, "indexer", &ix.compressor);
        }
        self.tensor(&l.hc_ffn_fn);
        self.values(&v("hc_ffn_base"), &l.hc_ffn_base);
        self.values(&v("hc_ffn_scale"), &l.hc_ffn_scale);
        self.values(&v("ffn_norm"), &l.ffn_norm);
        self.tensor(&l.ffn_gate_inp);
        if let Some(b) = &l.exp_probs_b {
            self.values(&v("exp_probs_b"), b);
        }
        if let Some(t) = &l.ffn_gate_tid2eid {
            let mut s = String::new();
            let _ = writeln!(s, "{} [{}]", v("ffn_gate_tid2eid"), t.len());
            self.shape.extend_from_slice(s.as_bytes());
            self.values.update(v("ffn_gate_tid2eid").as_bytes());
            self.values.update(bytemuck::cast_slice::<u32, u8>(t));
        }
        self.tensor(&l.ffn_gate_exps);
        self.tensor(&l.ffn_up_exps);
        self.tensor(&l.ffn_down_exps);
        self.tensor(&l.ffn_gate_shexp);
        self.tensor(&l.ffn_up_shexp);
        self.tensor(&l.ffn_down_shexp);
    }
}

/// The identity of `model` (see the module doc for what each id covers).
pub fn model_identity(model: &Model) -> ModelIdentity {
    let mut b = Builder {
        shape: Vec::new(),
        weights: Vec::new(),
        values: Sha1::new(),
    };
    let mut head = String::new();
    let _ = writeln!(head, "ds4-rs model identity 1");
    let _ = writeln!(head, "config {:?}", model.config());
    let _ = writeln!(head, "qat_sim {}", model.options().qat_sim);
    b.shape.extend_from_slice(head.as_bytes());
    let w = model.weights();
    b.tensor(&w.token_embd);
    for (il, l) in w.layers.iter().enumerate() {
        b.layer(il, l);
    }
    b.tensor(&w.output_hc_fn);
    b.values("output_hc_base", &w.output_hc_base);
    b.values("output_hc_scale", &w.output_hc_scale);
    b.values("output_norm", &w.output_norm);
    b.tensor(&w.output);
    let fingerprint: [u8; 20] = b.values.finalize().into();
    b.shape.extend_from_slice(b"values ");
    b.shape.extend_from_slice(&fingerprint);
    ModelIdentity::from_bytes(&b.shape, &b.weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_model::LoadOptions;
    use ds4_tensor::DType;

    #[test]
    fn identity_covers_every_tensor_and_the_values() {
        let opts = LoadOptions::default();
        let base = ds4_model::demo::model(&opts).expect("demo");
        let id = model_identity(&base);
        // Deterministic.
        assert_eq!(
            id,
            model_identity(&ds4_model::demo::model(&opts).expect("demo"))
        );

        let rebuild = |edit: &dyn Fn(&mut ds4_model::weights::Weights), opts: &LoadOptions| {
            let mut w = base.weights().clone();
            edit(&mut w);
            let m = Model::from_parts(
                base.config().clone(),
                w,
                std::sync::Arc::new(ds4_model::cpu::CpuBackend),
                opts,
            )
            .expect("model");
            model_identity(&m)
        };
        // The type of one tensor of the last layer (not a sample of the first ones):
        // same shape id, other weights id.
        let last = base.weights().layers.len() - 1;
        let quant = rebuild(&|w| w.layers[last].ffn_down_shexp.dtype = DType::F16, &opts);
        assert_eq!(quant.shape_id, id.shape_id);
        assert_ne!(quant.weights_id, id.weights_id);
        // Other values of a norm: another model of the same shape.
        let other = rebuild(&|w| w.layers[last].ffn_norm[0] += 1.0, &opts);
        assert_ne!(other.shape_id, id.shape_id);
        assert_eq!(other.weights_id, id.weights_id);
        // The routing table is part of it too.
        let routed = rebuild(
            &|w| {
                if let Some(t) = w.layers[0].ffn_gate_tid2eid.as_mut() {
                    t[0] ^= 1;
                }
            },
            &opts,
        );
        assert!(base.weights().layers[0].ffn_gate_tid2eid.is_some());
        assert_ne!(routed.shape_id, id.shape_id);
        // The cache-row simulation changes the stored values.
        let no_sim = rebuild(
            &|_| {},
            &LoadOptions {
                qat_sim: false,
                ..LoadOptions::default()
            },
        );
        assert_ne!(no_sim.shape_id, id.shape_id);
    }
}
