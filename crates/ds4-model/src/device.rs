//! Choosing the compute backend a model runs on ([`crate::LoadOptions::device`]).
//!
//! The CPU backend needs nothing. The CUDA backend opens device 0, compiles or loads its
//! kernels, and copies every matrix the products read into device memory once, in its
//! quantized form (the embedding table stays on the host: the lookup is one row per token).
//! A machine without a usable GPU gets the backend's error (naming CUDA and what is missing),
//! never a panic.

use std::sync::Arc;

use ds4_backend_cuda::CudaBackend;
use ds4_tensor::HostTensor;
use ds4_tensor::backend::{Backend, BackendError};

/// Which compute device a model runs on (re-exported so callers need not name ds4-tensor).
pub use ds4_tensor::backend::Device;

use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::session::LoadOptions;
use crate::weights::Weights;

/// A weight-upload progress callback, `(done_bytes, total_bytes)`.
#[derive(Clone)]
pub struct UploadProgress(pub Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for UploadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UploadProgress(..)")
    }
}

/// The backend `opts.device` names, with `weights` made ready for it.
pub fn backend_for(opts: &LoadOptions, weights: &Weights) -> Result<Arc<dyn Backend>> {
    match opts.device {
        Device::Cpu => Ok(Arc::new(CpuBackend)),
        Device::Cuda => {
            let be = CudaBackend::new(0).map_err(BackendError::from)?;
            let tensors = matrices(weights);
            let mut report = |done: u64, total: u64| {
                if let Some(p) = &opts.upload_progress {
                    (p.0)(done, total);
                }
            };
            be.upload_weights(&tensors, &mut report)
                .map_err(BackendError::from)?;
            Ok(Arc::new(be))
        }
        Device::Metal => Err(BackendError::Device(
            "Metal backend unavailable: not implemented in this build".to_string(),
        )
        .into()),
    }
}

/// Every tensor the forward pass hands to `matmul`/`moe_routed`/`hc_pre` (all but the
/// embedding table).
pub fn matrices(w: &Weights) -> Vec<&HostTensor> {
    let mut v: Vec<&HostTensor> = vec![&w.output_hc_fn, &w.output];
    for l in &w.layers {
        v.extend([
            &l.hc_attn_fn,
            &l.attn_q_a,
            &l.attn_q_b,
            &l.attn_kv,
            &l.attn_output_a,
            &l.attn_output_b,
            &l.hc_ffn_fn,
            &l.ffn_gate_inp,
            &l.ffn_gate_exps,
            &l.ffn_up_exps,
            &l.ffn_down_exps,
            &l.ffn_gate_shexp,
            &l.ffn_up_shexp,
            &l.ffn_down_shexp,
        ]);
        if let Some(c) = &l.attn_compressor {
            v.extend([&c.kv, &c.gate]);
        }
        if let Some(i) = &l.indexer {
            v.extend([&i.attn_q_b, &i.proj, &i.compressor.kv, &i.compressor.gate]);
        }
    }
    v
}
