//! The forward pass (MODEL.md s3), written once against the [`Backend`] trait.
//!
//! A chunk of tokens is processed layer-major (s3.13): the state-free projections of all
//! tokens of the chunk run as one batched `matmul` per weight; the compressors step token
//! by token in position order; then every query of the chunk attends (one
//! `attention_tokens` call, parallel on the CPU) over exactly the rows token-at-a-time
//! decoding would have shown it (raw rows of the chunk from its own projections, older ones
//! from the ring, which is updated last; the first `n_visible_compressed` compressed rows,
//! or the indexer's selection among them). Because the CPU `matmul` and attention compute
//! every dot product in the same order whatever the batch, decode, one-shot prefill and any
//! chunking give bit-identical logits.

use ds4_tensor::alloc::with_thread_local;
use ds4_tensor::backend::{Backend, HcParams};
use rayon::prelude::*;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::numerics::{self, RopeKind};
use crate::state::{LayerState, first_visible_raw, n_visible_compressed};
use crate::weights::{CompressorWeights, LayerWeights, Weights};

/// Host-side per-token work (routing) of a chunk at least this long runs on the rayon pool.
const PAR_MIN_TOKENS: usize = 32;

thread_local! {
    /// One query's indexer scores over the visible compressed rows, reused per thread (at a
    /// long context a fresh vector per query and layer was a multi-megabyte allocation).
    static INDEXER_SCORES: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Everything the forward pass reads besides the state: shape, weights, RoPE tables, options.
#[derive(Debug)]
pub struct Graph<'a> {
    /// The validated shape.
    pub cfg: &'a Config,
    /// The bound weights.
    pub w: &'a Weights,
    /// The backend.
    pub be: &'a dyn Backend,
    /// RoPE frequencies of sliding layers.
    pub freqs_main: &'a [f32],
    /// RoPE frequencies of compressed layers (YaRN blended).
    pub freqs_comp: &'a [f32],
    /// Whether to simulate FP8 KV rows and the indexer's Hadamard + FP4 (MODEL.md D1/D2).
    pub qat_sim: bool,
}

/// Scratch of one chunk: the HC state of every token, `[n, nhc, d]`, and the buffers
/// that the layers reuse.
struct Chunk<'t> {
    tokens: &'t [u32],
    pos0: usize,
    hc: Vec<f32>,
    bufs: Bufs,
    prof: Option<Phases>,
}

/// Wall time per phase of one [`Graph::eval`] call, summed over the layers and printed to
/// stderr at its end, when the environment variable `DS4_PHASE_TIMES` is set: the way to
/// see which parts of a prefill do not scale with threads (compare `--threads 1` and 2).
struct Phases {
    last: std::time::Instant,
    acc: Vec<(&'static str, f64)>,
}

impl Phases {
    /// `Some` when `DS4_PHASE_TIMES` is set.
    fn new() -> Option<Phases> {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        ON.get_or_init(|| std::env::var_os("DS4_PHASE_TIMES").is_some())
            .then(|| Phases {
                last: std::time::Instant::now(),
                acc: Vec::new(),
            })
    }
}

/// Adds the time since the previous mark to `label` (no-op when profiling is off).
fn mark(p: &mut Option<Phases>, label: &'static str) {
    if let Some(p) = p {
        let now = std::time::Instant::now();
        let dt = (now - p.last).as_secs_f64();
        p.last = now;
        match p.acc.iter_mut().find(|(l, _)| *l == label) {
            Some((_, v)) => *v += dt,
            None => p.acc.push((label, dt)),
        }
    }
}

/// Reusable `f32` buffers of one [`Graph::eval`] call. Every layer needs the same set of
/// activation buffers (a few MiB each for a prefill chunk); allocating them afresh made
/// every layer pay page faults and kernel zeroing, so a layer takes its buffers here and
/// gives them back, and the next layer reuses them.
#[derive(Default)]
struct Bufs {
    free: Vec<Vec<f32>>,
}

impl Bufs {
    /// A buffer of `len` values with unspecified contents: the caller overwrites all of it.
    fn take(&mut self, len: usize) -> Vec<f32> {
        // The smallest free buffer that fits, else the largest one (grown).
        let fit = (0..self.free.len())
            .filter(|&i| self.free[i].capacity() >= len)
            .min_by_key(|&i| self.free[i].capacity())
            .or_else(|| (0..self.free.len()).max_by_key(|&i| self.free[i].capacity()));
        let mut v = match fit {
            Some(i) => self.free.swap_remove(i),
            None => Vec::new(),
        };
        if v.len() > len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    /// Returns buffers for reuse.
    fn give<const N: usize>(&mut self, bufs: [Vec<f32>; N]) {
        self.free.extend(bufs);
    }
}

impl Graph<'_> {
    /// `w @ x` for `n` tokens into a buffer of `bufs`.
    fn mm(
        &self,
        bufs: &mut Bufs,
        w: &ds4_tensor::HostTensor,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        // Rows of the 2-D view: every dim but the contiguous one.
        let n_out = w.shape.dims().iter().skip(1).product::<u64>() as usize;
        let mut y = bufs.take(n * n_out);
        self.be.matmul(w, 0..n_out, x, n, &mut y)?;
        Ok(y)
    }

    fn hc_params<'b>(
        &'b self,
        fn_weight: &'b ds4_tensor::HostTensor,
        scale: &'b [f32],
        base: &'b [f32],
    ) -> HcParams<'b> {
        HcParams {
            fn_weight,
            scale,
            base,
            n_hc: self.cfg.n_hc,
            n_sinkhorn_iter: self.cfg.n_hc_sinkhorn_iter,
            hc_eps: self.cfg.hc_eps,
            rms_eps: self.cfg.rms_eps,
        }
    }

    /// HCPre for every token of the chunk: returns `x [n, d]`, `post [n, nhc]`, `comb [n, nhc, nhc]`.
    fn hc_pre_all(
        &self,
        bufs: &mut Bufs,
        p: &HcParams<'_>,
        hc: &[f32],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (d, m) = (self.cfg.n_embd, self.cfg.n_hc);
        let (mut x, mut post, mut comb) =
            (bufs.take(n * d), bufs.take(n * m), bufs.take(n * m * m));
        self.be
            .hc_pre_batch(p, &hc[..n * m * d], n, &mut x, &mut post, &mut comb)?;
        Ok((x, post, comb))
    }

    fn hc_post_all(&self, hc: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], n: usize) {
        let (d, m) = (self.cfg.n_embd, self.cfg.n_hc);
        self.be
            .hc_post_batch(&mut hc[..n * m * d], &o[..n * d], post, comb, m, n);
    }

    /// Runs `tokens` at positions `pos0..` through all layers, updating `state`; returns the
    /// logits `[n_out, V]` of the last `n_out` tokens.
    pub fn eval(
        &self,
        state: &mut [LayerState],
        tokens: &[u32],
        pos0: usize,
        n_out: usize,
    ) -> Result<Vec<f32>> {
        let (d, m, n) = (self.cfg.n_embd, self.cfg.n_hc, tokens.len());
        let mut chunk = Chunk {
            tokens,
            pos0,
            hc: vec![0.0; n * m * d],
            bufs: Bufs::default(),
            prof: Phases::new(),
        };
        let mut e = vec![0.0f32; d];
        for (t, &tok) in tokens.iter().enumerate() {
            if tok as usize >= self.cfg.n_vocab {
                return Err(Error::TokenOutOfRange {
                    token: tok,
                    n_vocab: self.cfg.n_vocab,
                });
            }
            self.be.get_row(&self.w.token_embd, tok as usize, &mut e)?;
            for s in 0..m {
                chunk.hc[(t * m + s) * d..(t * m + s + 1) * d].copy_from_slice(&e);
            }
        }
        mark(&mut chunk.prof, "embed");
        for (il, (lw, ls)) in self.w.layers.iter().zip(state.iter_mut()).enumerate() {
            self.attention_sublayer(il, lw, ls, &mut chunk)?;
            self.ffn_sublayer(il, lw, &mut chunk)?;
        }
        let logits = self.output_head(&chunk.hc[(n - n_out) * m * d..], n_out)?;
        mark(&mut chunk.prof, "head");
        if let Some(p) = &chunk.prof {
            let total: f64 = p.acc.iter().map(|(_, v)| v).sum();
            let parts: Vec<String> = p
                .acc
                .iter()
                .map(|(l, v)| format!("{l} {:.1}", v * 1e3))
                .collect();
            eprintln!(
                "ds4 phases (ms) n={n} total {:.1}: {}",
                total * 1e3,
                parts.join(", ")
            );
        }
        Ok(logits)
    }

    fn output_head(&self, hc: &[f32], n: usize) -> Result<Vec<f32>> {
        let (d, m, cfg) = (self.cfg.n_embd, self.cfg.n_hc, self.cfg);
        let mut z = vec![0.0f32; n * d];
        for t in 0..n {
            let s = &hc[t * m * d..(t + 1) * m * d];
            // HCHead (MODEL.md s3.12): HCPre's `pre` weights only, no Sinkhorn.
            let mut u = s.to_vec();
            self.be.rms_norm(&mut u, m * d, None, cfg.rms_eps);
            let mut mix = vec![0.0f32; m];
            self.be
                .matmul(&self.w.output_hc_fn, 0..m, &u, 1, &mut mix)?;
            let zt = &mut z[t * d..(t + 1) * d];
            for i in 0..m {
                let pre = 1.0
                    / (1.0
                        + (-(mix[i] * self.w.output_hc_scale[0] + self.w.output_hc_base[i])).exp())
                    + cfg.hc_eps;
                zt.iter_mut()
                    .zip(&s[i * d..(i + 1) * d])
                    .for_each(|(o, &v)| *o += pre * v);
            }
        }
        self.be
            .rms_norm(&mut z, d, Some(&self.w.output_norm), cfg.rms_eps);
        let n_vocab = self.w.output.shape.dims().iter().skip(1).product::<u64>() as usize;
        let mut logits = vec![0.0f32; n * n_vocab];
        self.be
            .matmul(&self.w.output, 0..n_vocab, &z, n, &mut logits)?;
        Ok(logits)
    }

    /// Projects `a [n, d]` through one compressor: `(kv, score)`, each `[n, coff*w]`, with
    /// `ape[pos mod r]` added to the scores.
    fn compressor_inputs(
        &self,
        bufs: &mut Bufs,
        cw: &CompressorWeights,
        a: &[f32],
        n: usize,
        pos0: usize,
        ratio: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let kv = self.mm(bufs, &cw.kv, a, n)?;
        let mut score = self.mm(bufs, &cw.gate, a, n)?;
        let width = score.len() / n;
        for t in 0..n {
            let r = (pos0 + t) % ratio;
            score[t * width..(t + 1) * width]
                .iter_mut()
                .zip(&cw.ape[r * width..(r + 1) * width])
                .for_each(|(s, &b)| *s += b);
        }
        Ok((kv, score))
    }

    /// Finishes a pooled compressor row: norm, RoPE at the block's first position, simulation.
    fn finish_row(
        &self,
        mut row: Vec<f32>,
        cw: &CompressorWeights,
        block_pos: usize,
        indexer: bool,
    ) -> Vec<f32> {
        let w = row.len();
        self.be
            .rms_norm(&mut row, w, Some(&cw.norm), self.cfg.rms_eps);
        self.be
            .rope_tail(&mut row, w, self.freqs_comp, block_pos as u32, false);
        if self.qat_sim {
            if indexer {
                numerics::had_fp4(&mut row);
            } else {
                numerics::fp8_sim(&mut row[..self.cfg.n_nope()]);
            }
        }
        row
    }

    fn attention_sublayer(
        &self,
        il: usize,
        lw: &LayerWeights,
        ls: &mut LayerState,
        c: &mut Chunk<'_>,
    ) -> Result<()> {
        let cfg = self.cfg;
        let n = c.tokens.len();
        let (d, h, hd, ratio) = (cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.compress_ratio(il));
        let kind = if ratio == 0 {
            RopeKind::Main
        } else {
            RopeKind::Comp
        };
        let freqs = if kind == RopeKind::Main {
            self.freqs_main
        } else {
            self.freqs_comp
        };

        let p = self.hc_params(&lw.hc_attn_fn, &lw.hc_attn_scale, &lw.hc_attn_base);
        let bufs = &mut c.bufs;
        let (mut a, post, comb) = self.hc_pre_all(bufs, &p, &c.hc, n)?;
        mark(&mut c.prof, "hc_pre");
        self.be
            .rms_norm(&mut a, d, Some(&lw.attn_norm), cfg.rms_eps);

        // Queries: low rank, norm, per-head norm, RoPE on the last R dims of each head.
        let mut qn = self.mm(bufs, &lw.attn_q_a, &a, n)?; // [n, rq]
        self.be.rms_norm(
            &mut qn,
            cfg.q_lora_rank,
            Some(&lw.attn_q_a_norm),
            cfg.rms_eps,
        );
        let mut q = self.mm(bufs, &lw.attn_q_b, &qn, n)?; // [n, H*D]
        self.be.rms_norm(&mut q, hd, None, cfg.rms_eps);
        self.be
            .rope_tail_tokens(&mut q, n, hd, freqs, c.pos0, false);
        // Shared key/value row: norm, RoPE, FP8 round trip of the nope part.
        let mut kv = self.mm(bufs, &lw.attn_kv, &a, n)?; // [n, D]
        self.be
            .rms_norm(&mut kv, hd, Some(&lw.attn_kv_a_norm), cfg.rms_eps);
        self.be
            .rope_tail_tokens(&mut kv, n, hd, freqs, c.pos0, false);
        if self.qat_sim {
            for row in kv.chunks_mut(hd) {
                numerics::fp8_sim(&mut row[..cfg.n_nope()]);
            }
        }

        mark(&mut c.prof, "q_kv");
        // State-free compressor and indexer projections of the whole chunk.
        let comp_in = match &lw.attn_compressor {
            Some(cw) => Some(self.compressor_inputs(bufs, cw, &a, n, c.pos0, ratio)?),
            None => None,
        };
        let (hi, di) = (cfg.n_indexer_head, cfg.indexer_head_dim);
        let idx_in = match &lw.indexer {
            Some(iw) => {
                let comp = self.compressor_inputs(bufs, &iw.compressor, &a, n, c.pos0, ratio)?;
                let mut qi = self.mm(bufs, &iw.attn_q_b, &qn, n)?; // [n, HI*DI]
                self.be
                    .rope_tail_tokens(&mut qi, n, di, self.freqs_comp, c.pos0, false);
                if self.qat_sim {
                    qi.chunks_mut(di).for_each(numerics::had_fp4);
                }
                let mut wi = self.mm(bufs, &iw.proj, &a, n)?; // [n, HI]
                let s = 1.0 / ((di * hi) as f32).sqrt();
                wi.iter_mut().for_each(|v| *v *= s);
                Some((comp, qi, wi))
            }
            None => None,
        };

        mark(&mut c.prof, "comp_idx_proj");
        // Stateful part. The compressors step token by token in position order; their
        // rows only grow, and a token sees just the first `n_visible_compressed` of them.
        for t in 0..n {
            let pos = c.pos0 + t;
            if let (Some(cs), Some((ckv, cscore)), Some(cw)) =
                (&mut ls.attn_compressor, &comp_in, &lw.attn_compressor)
            {
                let wd = ckv.len() / n;
                if let Some(row) = cs.push(
                    pos,
                    &ckv[t * wd..(t + 1) * wd],
                    &cscore[t * wd..(t + 1) * wd],
                ) {
                    let row = self.finish_row(row, cw, pos + 1 - ratio, false);
                    ls.comp_rows.extend_from_slice(&row);
                }
            }
            if let (Some(cs), Some(((ikv, iscore), _, _)), Some(iw)) =
                (&mut ls.indexer_compressor, &idx_in, &lw.indexer)
            {
                let wd = ikv.len() / n;
                if let Some(row) = cs.push(
                    pos,
                    &ikv[t * wd..(t + 1) * wd],
                    &iscore[t * wd..(t + 1) * wd],
                ) {
                    let row = self.finish_row(row, &iw.compressor, pos + 1 - ratio, true);
                    ls.index_rows.extend_from_slice(&row);
                }
            }
        }
        // Attention of every query of the chunk, each over exactly the rows it would see
        // token by token: raw positions of this chunk come from `kv`, earlier ones from
        // the ring, which is updated only afterwards (a chunk position overwrites the slot
        // of a position `window` earlier, which no later query of the chunk sees).
        mark(&mut c.prof, "compressor_steps");
        let w_raw = cfg.sliding_window;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = bufs.take(n * h * hd);
        {
            let (ls, kv, pos0) = (&*ls, &kv[..], c.pos0);
            let idx_in = &idx_in;
            // Typed through `visible_rows` so that the rows may borrow the state and `kv`.
            let rows_of = visible_rows(|t, rows| {
                let pos = pos0 + t;
                rows.extend((first_visible_raw(pos, w_raw)..=pos).map(|u| {
                    if u >= pos0 {
                        &kv[(u - pos0) * hd..(u - pos0 + 1) * hd]
                    } else {
                        &ls.raw[(u % w_raw) * hd..(u % w_raw + 1) * hd]
                    }
                }));
                if ratio > 0 {
                    let n_vis = n_visible_compressed(pos, ratio);
                    let comp_row = |b: usize| &ls.comp_rows[b * hd..(b + 1) * hd];
                    match idx_in {
                        Some((_, qi, wi)) if n_vis > cfg.indexer_top_k => {
                            let qt = &qi[t * hi * di..(t + 1) * hi * di];
                            let wt = &wi[t * hi..(t + 1) * hi];
                            let index_rows = &ls.index_rows[..n_vis * di];
                            let mut sel = with_thread_local(&INDEXER_SCORES, |scores| {
                                scores.clear();
                                scores.resize(n_vis, 0.0);
                                self.be.indexer_scores(qt, wt, index_rows, scores);
                                numerics::top_k(scores, cfg.indexer_top_k)
                            });
                            sel.sort_unstable();
                            rows.extend(sel.into_iter().map(comp_row));
                        }
                        _ => rows.extend((0..n_vis).map(comp_row)),
                    }
                }
            });
            self.be
                .attention_tokens(&q, n, &rows_of, &lw.attn_sinks, scale, &mut o);
        }
        // Values carry the key's rotation: undo it at the query position.
        self.be.rope_tail_tokens(&mut o, n, hd, freqs, c.pos0, true);
        // The ring keeps the last `window` raw rows (the same final ring as writing every
        // position in order).
        for t in n.saturating_sub(w_raw)..n {
            let slot = (c.pos0 + t) % w_raw;
            ls.raw[slot * hd..(slot + 1) * hd].copy_from_slice(&kv[t * hd..(t + 1) * hd]);
        }

        mark(&mut c.prof, "attention");
        // Grouped low-rank output projection.
        let (g, ro) = (cfg.n_out_group, cfg.o_lora_rank);
        let gw = h * hd / g;
        let mut low = bufs.take(n * g * ro);
        let mut gin = bufs.take(n * gw);
        let mut gout = bufs.take(n * ro);
        for gi in 0..g {
            for t in 0..n {
                gin[t * gw..(t + 1) * gw]
                    .copy_from_slice(&o[t * h * hd + gi * gw..t * h * hd + (gi + 1) * gw]);
            }
            self.be.matmul(
                &lw.attn_output_a,
                gi * ro..(gi + 1) * ro,
                &gin,
                n,
                &mut gout,
            )?;
            for t in 0..n {
                low[t * g * ro + gi * ro..t * g * ro + (gi + 1) * ro]
                    .copy_from_slice(&gout[t * ro..(t + 1) * ro]);
            }
        }
        let out = self.mm(bufs, &lw.attn_output_b, &low, n)?; // [n, d]
        mark(&mut c.prof, "attn_out");
        self.hc_post_all(&mut c.hc, &out, &post, &comb, n);
        mark(&mut c.prof, "hc_post");
        let bufs = &mut c.bufs;
        bufs.give([a, post, comb, qn, q, kv, o, low, gin, gout, out]);
        if let Some((ckv, cscore)) = comp_in {
            bufs.give([ckv, cscore]);
        }
        if let Some(((ikv, iscore), qi, wi)) = idx_in {
            bufs.give([ikv, iscore, qi, wi]);
        }
        Ok(())
    }

    fn ffn_sublayer(&self, il: usize, lw: &LayerWeights, c: &mut Chunk<'_>) -> Result<()> {
        let cfg = self.cfg;
        let n = c.tokens.len();
        let (d, e_n, k) = (cfg.n_embd, cfg.n_expert, cfg.n_expert_used);
        let p = self.hc_params(&lw.hc_ffn_fn, &lw.hc_ffn_scale, &lw.hc_ffn_base);
        let bufs = &mut c.bufs;
        let (mut x, post, comb) = self.hc_pre_all(bufs, &p, &c.hc, n)?;
        mark(&mut c.prof, "hc_pre");
        self.be.rms_norm(&mut x, d, Some(&lw.ffn_norm), cfg.rms_eps);

        // Shared expert, batched.
        let mut g = self.mm(bufs, &lw.ffn_gate_shexp, &x, n)?;
        let u = self.mm(bufs, &lw.ffn_up_shexp, &x, n)?;
        self.be.swiglu(&mut g, &u, cfg.swiglu_clamp_shexp[il], 1.0);
        let mut y = self.mm(bufs, &lw.ffn_down_shexp, &g, n)?; // [n, d]

        mark(&mut c.prof, "shared_expert");
        // Router (f32 logits and scores) per token.
        let logits = self.mm(bufs, &lw.ffn_gate_inp, &x, n)?; // [n, E]
        // The experts and route weights of token `t`, in selection order.
        let tokens = c.tokens;
        let route_token = |t: usize| -> Vec<(usize, f32)> {
            let s: Vec<f32> = logits[t * e_n..(t + 1) * e_n]
                .iter()
                .map(|&z| numerics::sqrt_softplus(z))
                .collect();
            let sel: Vec<usize> = match &lw.ffn_gate_tid2eid {
                Some(table) => {
                    let tok = tokens[t] as usize;
                    table[tok * k..(tok + 1) * k]
                        .iter()
                        .map(|&e| e as usize)
                        .collect()
                }
                None => {
                    let biased: Vec<f32> = match &lw.exp_probs_b {
                        Some(b) => s.iter().zip(b).map(|(x, y)| x + y).collect(),
                        None => s.clone(),
                    };
                    numerics::top_k(&biased, k)
                }
            };
            // A tiny floor instead of transformers' `+ 1e-20` (MODEL.md D6): equal for any
            // realistic sum, and never a division by zero.
            let sum: f32 = sel
                .iter()
                .map(|&e| s[e])
                .sum::<f32>()
                .max(f32::MIN_POSITIVE);
            sel.iter()
                .map(|&e| {
                    let wgt = if cfg.expert_weights_norm {
                        s[e] / sum
                    } else {
                        s[e]
                    };
                    (e, wgt * cfg.expert_weights_scale)
                })
                .collect()
        };
        // Tokens are independent here; a prefill chunk routes them on the rayon pool (host
        // work whatever the backend), a decode step on this thread.
        let picks: Vec<Vec<(usize, f32)>> = if n >= PAR_MIN_TOKENS {
            (0..n).into_par_iter().map(route_token).collect()
        } else {
            (0..n).map(route_token).collect()
        };
        // routes[e] = the (token, route weight) pairs sent to expert e, one per table slot,
        // in token order.
        let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_n];
        for (t, pick) in picks.iter().enumerate() {
            for &(e, w) in pick {
                routes[e].push((t, w));
            }
        }
        mark(&mut c.prof, "router");
        // Routed experts, one batched product per expert over the tokens routed to it.
        self.be.moe_routed(
            &lw.ffn_gate_exps,
            &lw.ffn_up_exps,
            &lw.ffn_down_exps,
            &routes,
            cfg.swiglu_clamp_exp[il],
            &x,
            &mut y,
        )?;
        mark(&mut c.prof, "experts");
        self.hc_post_all(&mut c.hc, &y, &post, &comb, n);
        mark(&mut c.prof, "hc_post");
        c.bufs.give([x, post, comb, g, u, y, logits]);
        Ok(())
    }
}

/// Identity that gives a closure the signature [`Backend::attention_tokens`] takes, with the
/// rows' lifetime `'r` fixed rather than higher-ranked.
fn visible_rows<'r, F: Fn(usize, &mut Vec<&'r [f32]>) + Sync>(f: F) -> F {
    f
}
