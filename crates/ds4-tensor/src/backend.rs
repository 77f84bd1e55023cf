//! The one `Backend` trait of model-level operations, and the device identifier.
//!
//! `ds4-model` writes the DeepSeek V4 forward pass once against [`Backend`]; the CPU
//! implementation lives in `ds4-model` (module `cpu`) and is the correctness oracle, the CUDA
//! and Metal crates implement the same trait without seeing the model (the role `ds4_gpu.h`
//! plays for antirez/ds4). The operations are deliberately model-level (a whole RMSNorm, a
//! whole hyper-connection mix, attention of one query over its visible rows with sinks) rather
//! than tensor algebra: that is the granularity at which a GPU backend fuses kernels.
//!
//! Buffers are host `f32` slices for now; shape comments are row-major, outermost first.
//! Weights are [`HostTensor`]s in any block format, addressed by a range of rows so that one
//! call covers a plain matrix, one expert slab of a stacked `[E, out, in]` tensor, or one
//! output group of `attn_output_a`.

use std::ops::Range;

use crate::{DType, HostTensor};

/// Which compute device a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU (all cores).
    Cpu,
    /// An NVIDIA GPU through CUDA.
    Cuda,
    /// An Apple GPU through Metal.
    Metal,
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "metal" => Ok(Device::Metal),
            other => Err(format!(
                "unknown backend {other:?}: expected cpu, cuda or metal"
            )),
        }
    }
}

/// Errors a backend reports; drivers' errors are converted into these at the crate edge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend has no kernel for this block format.
    #[error("tensor {name}: backend has no matvec for {dtype:?}")]
    UnsupportedDType {
        /// The tensor name.
        name: String,
        /// Its block format.
        dtype: DType,
    },
    /// Operand sizes do not fit the weight.
    #[error("tensor {name}: {what}")]
    Shape {
        /// The tensor name.
        name: String,
        /// What does not fit.
        what: String,
    },
    /// A device or driver failure.
    #[error("device error: {0}")]
    Device(String),
}

/// Result with [`BackendError`].
pub type BackendResult<T> = std::result::Result<T, BackendError>;

/// Hyper-connection weights of one sublayer (`hc_attn_*` or `hc_ffn_*`), MODEL.md s3.4.
#[derive(Debug, Clone, Copy)]
pub struct HcParams<'a> {
    /// `hc_*_fn`: `[(2+nhc)*nhc, nhc*d]`.
    pub fn_weight: &'a HostTensor,
    /// `hc_*_scale`: `[3]`.
    pub scale: &'a [f32],
    /// `hc_*_base`: `[(2+nhc)*nhc]`.
    pub base: &'a [f32],
    /// Number of streams `nhc`.
    pub n_hc: usize,
    /// Sinkhorn-Knopp iterations `T`.
    pub n_sinkhorn_iter: usize,
    /// `hc_eps`.
    pub hc_eps: f32,
    /// `rms_norm_eps` (the flatten norm uses it, not `hc_eps`).
    pub rms_eps: f32,
}

/// The model-level operations the forward pass needs.
///
/// Every method is pure with respect to the backend (no hidden state): caches belong to the
/// session in `ds4-model`.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// The device this backend drives.
    fn device(&self) -> Device;

    /// `y[t][o] = sum_i W[rows.start + o][i] * x[t][i]` for `t < n_tokens`: rows `rows` of
    /// the weight (a 2-D view `[n_rows_total, ne0]` of any tensor) times a batch of vectors.
    /// `x` is `[n_tokens, ne0]`, `y` is `[n_tokens, rows.len()]`. Accumulates in f32.
    fn matmul(
        &self,
        w: &HostTensor,
        rows: Range<usize>,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> BackendResult<()>;

    /// Row `row` of a weight (an embedding lookup), converted to f32 in `out` (`ne0` values).
    fn get_row(&self, w: &HostTensor, row: usize, out: &mut [f32]) -> BackendResult<()>;

    /// In-place RMSNorm of each `n`-wide row of `x`: `x * (1/sqrt(mean(x^2) + eps)) * w`
    /// (no weight when `w` is `None`).
    fn rms_norm(&self, x: &mut [f32], n: usize, w: Option<&[f32]>, eps: f32);

    /// Interleaved RoPE on the last `2 * freqs.len()` entries of each `n`-wide row of `x`,
    /// angle `pos * freqs[i]` (f32), or its inverse (`-angle`).
    fn rope_tail(&self, x: &mut [f32], n: usize, freqs: &[f32], pos: u32, inverse: bool);

    /// HC pre for one token: from the state `[nhc, d]` returns the mixed input `x` `[d]`
    /// (written to `x`), `post` `[nhc]` and the Sinkhorn-normalised `comb` `[nhc, nhc]`.
    fn hc_pre(
        &self,
        p: &HcParams<'_>,
        state: &[f32],
        x: &mut [f32],
        post: &mut [f32],
        comb: &mut [f32],
    ) -> BackendResult<()>;

    /// HC post for one token: `state[j] = post[j] * o + sum_i comb[i][j] * old_state[i]`.
    fn hc_post(&self, state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], n_hc: usize);

    /// [`Backend::hc_pre`] for `n` tokens: `states` `[n, nhc, d]`, `x` `[n, d]`, `post`
    /// `[n, nhc]`, `comb` `[n, nhc, nhc]`; each token computed exactly as by `hc_pre`. The
    /// provided body loops over the tokens; a backend overrides it to run them in parallel.
    fn hc_pre_batch(
        &self,
        p: &HcParams<'_>,
        states: &[f32],
        n: usize,
        x: &mut [f32],
        post: &mut [f32],
        comb: &mut [f32],
    ) -> BackendResult<()> {
        let m = p.n_hc;
        let d = x.len() / n.max(1);
        for t in 0..n {
            self.hc_pre(
                p,
                &states[t * m * d..(t + 1) * m * d],
                &mut x[t * d..(t + 1) * d],
                &mut post[t * m..(t + 1) * m],
                &mut comb[t * m * m..(t + 1) * m * m],
            )?;
        }
        Ok(())
    }

    /// [`Backend::hc_post`] for `n` tokens: `states` `[n, nhc, d]`, `o` `[n, d]`, `post`
    /// `[n, nhc]`, `comb` `[n, nhc, nhc]`; each token computed exactly as by `hc_post`. The
    /// provided body loops over the tokens; a backend overrides it to run them in parallel.
    fn hc_post_batch(
        &self,
        states: &mut [f32],
        o: &[f32],
        post: &[f32],
        comb: &[f32],
        n_hc: usize,
        n: usize,
    ) {
        let m = n_hc;
        let d = o.len() / n.max(1);
        for t in 0..n {
            self.hc_post(
                &mut states[t * m * d..(t + 1) * m * d],
                &o[t * d..(t + 1) * d],
                &post[t * m..(t + 1) * m],
                &comb[t * m * m..(t + 1) * m * m],
                m,
            );
        }
    }

    /// Attention of one query (`[n_head, head_dim]`) over shared K=V rows with per-head sink
    /// logits: `out_h = sum_u softmax_u(q_h . k_u * scale ; sink_h) k_u`.
    fn attention(&self, q: &[f32], rows: &[&[f32]], sinks: &[f32], scale: f32, out: &mut [f32]);

    /// [`Backend::rope_tail`] for the `n_tok` consecutive tokens of a chunk: token `t` is the
    /// `x[t * tok_width..(t + 1) * tok_width]` slice (rows of `n` values) at position
    /// `pos0 + t`. Each token is rotated exactly as by `rope_tail`; the provided body loops
    /// over the tokens, a backend overrides it to run them in parallel.
    fn rope_tail_tokens(
        &self,
        x: &mut [f32],
        n_tok: usize,
        n: usize,
        freqs: &[f32],
        pos0: usize,
        inverse: bool,
    ) {
        let tok_width = x.len() / n_tok.max(1);
        for (t, xt) in x.chunks_mut(tok_width.max(1)).take(n_tok).enumerate() {
            self.rope_tail(xt, n, freqs, (pos0 + t) as u32, inverse);
        }
    }

    /// [`Backend::attention`] for the `n_tok` queries of a chunk: `q` and `out` are
    /// `[n_tok, n_head, head_dim]`, and `rows_of(t, rows)` appends the visible rows of query
    /// `t` to the empty `rows`. Every query is computed exactly as by `attention`, so the
    /// result does not depend on how a chunk is split. The provided body loops over the
    /// queries; a backend overrides it to run them in parallel.
    fn attention_tokens<'r>(
        &self,
        q: &[f32],
        n_tok: usize,
        rows_of: &(dyn Fn(usize, &mut Vec<&'r [f32]>) + Sync),
        sinks: &[f32],
        scale: f32,
        out: &mut [f32],
    ) {
        let width = q.len() / n_tok.max(1);
        let mut rows = Vec::new();
        for t in 0..n_tok {
            rows.clear();
            rows_of(t, &mut rows);
            self.attention(
                &q[t * width..(t + 1) * width],
                &rows,
                sinks,
                scale,
                &mut out[t * width..(t + 1) * width],
            );
        }
    }

    /// Lightning-indexer scores of one query over compressed indexer rows (MODEL.md s3.8):
    /// `scores[b] = sum_h weights[h] * relu(q_h . rows[b])`, `q` `[n_head, head_dim]`,
    /// `weights` `[n_head]` (scale already folded in), `rows` `[n_rows, head_dim]`.
    fn indexer_scores(&self, q: &[f32], weights: &[f32], rows: &[f32], scores: &mut [f32]);

    /// One routed expert `e` over the tokens routed to it (`route`, as in
    /// [`Backend::moe_routed`]): returns `[route.len(), d]`, row `i` being
    /// `W2[e] @ (w_i * SwiGLU(W1[e] @ x[t_i], W3[e] @ x[t_i]))`. The building block of every
    /// `moe_routed` body, sequential or parallel, so they all compute each expert the same way.
    #[allow(clippy::too_many_arguments)]
    fn moe_expert(
        &self,
        gate_exps: &HostTensor,
        up_exps: &HostTensor,
        down_exps: &HostTensor,
        e: usize,
        route: &[(usize, f32)],
        clamp: f32,
        x: &[f32],
    ) -> BackendResult<Vec<f32>> {
        let d = gate_exps.shape.ne(0) as usize;
        let f = gate_exps.shape.ne(1) as usize;
        let m = route.len();
        let mut xe = vec![0.0f32; m * d];
        for (i, &(t, _)) in route.iter().enumerate() {
            xe[i * d..(i + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
        }
        let (mut g, mut u) = (vec![0.0f32; m * f], vec![0.0f32; m * f]);
        self.matmul(gate_exps, e * f..(e + 1) * f, &xe, m, &mut g)?;
        self.matmul(up_exps, e * f..(e + 1) * f, &xe, m, &mut u)?;
        expert_swiglu_down(self, down_exps, e, route, clamp, g, &u)
    }

    /// Routed experts of a chunk (MODEL.md s3.11): for every expert `e`, the tokens routed to
    /// it are `routes[e]` as `(token, route_weight)` pairs (one pair per selection slot), and
    /// `y[t] += W2[e] @ (route_weight * SwiGLU(W1[e] @ x[t], W3[e] @ x[t]))`.
    ///
    /// `gate_exps`/`up_exps` are `[E, F, d]`, `down_exps` `[E, d, F]`, `x` and `y` `[n, d]`.
    /// Each token's sum runs in ascending expert order whatever the chunk, so decode and
    /// prefill add the same numbers in the same order. The provided body composes
    /// [`Backend::matmul`] and [`Backend::swiglu`]; a GPU backend overrides it with a fused
    /// kernel.
    #[allow(clippy::too_many_arguments)]
    fn moe_routed(
        &self,
        gate_exps: &HostTensor,
        up_exps: &HostTensor,
        down_exps: &HostTensor,
        routes: &[Vec<(usize, f32)>],
        clamp: f32,
        x: &[f32],
        y: &mut [f32],
    ) -> BackendResult<()> {
        let d = gate_exps.shape.ne(0) as usize;
        for (e, route) in routes.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let ye = self.moe_expert(gate_exps, up_exps, down_exps, e, route, clamp, x)?;
            add_expert_rows(y, &ye, route, d);
        }
        Ok(())
    }

    /// `gate <- silu(min(gate, c)) * clamp(up, -c, c) * weight` (no clamp when `c <= 1e-6`).
    fn swiglu(&self, gate: &mut [f32], up: &[f32], clamp: f32, weight: f32);
}

/// The tail of one routed expert `e`, shared by [`Backend::moe_expert`] and by backends that
/// compute the gate and up products their own way: `g[i] = w_i * SwiGLU(g[i], u[i])` for every
/// routed token `i` (the route weight multiplies before the down projection, MODEL.md D5),
/// then `W2[e] @ g`, returned as `[route.len(), d]`. `g` and `u` are `[route.len(), F]`.
pub fn expert_swiglu_down<B: Backend + ?Sized>(
    b: &B,
    down_exps: &HostTensor,
    e: usize,
    route: &[(usize, f32)],
    clamp: f32,
    mut g: Vec<f32>,
    u: &[f32],
) -> BackendResult<Vec<f32>> {
    let f = down_exps.shape.ne(0) as usize;
    let d = down_exps.shape.ne(1) as usize;
    let m = route.len();
    for (i, &(_, w)) in route.iter().enumerate() {
        b.swiglu(&mut g[i * f..(i + 1) * f], &u[i * f..(i + 1) * f], clamp, w);
    }
    let mut ye = vec![0.0f32; m * d];
    b.matmul(down_exps, e * d..(e + 1) * d, &g, m, &mut ye)?;
    Ok(ye)
}

/// Adds one expert's output rows into the chunk's MoE output: row `i` of `ye` (`[route.len(),
/// d]`, as [`Backend::moe_expert`] returns it) into row `route[i].0` of `y` (`[n, d]`), in
/// route order. Every `moe_routed` body calls this once per expert in ascending expert order,
/// so each token's sum has the same order on every backend and chunking.
pub fn add_expert_rows(y: &mut [f32], ye: &[f32], route: &[(usize, f32)], d: usize) {
    for (i, &(t, _)) in route.iter().enumerate() {
        y[t * d..(t + 1) * d]
            .iter_mut()
            .zip(&ye[i * d..(i + 1) * d])
            .for_each(|(a, b)| *a += b);
    }
}
