//! The forward pass (MODEL.md s3), written once against the [`Backend`] trait.
//!
//! A chunk of tokens is processed layer-major (s3.13): the state-free projections of all
//! tokens of the chunk run as one batched `matmul` per weight, and the stateful part
//! (append the raw row, step the compressors, run the indexer, attend) runs token by token
//! inside the layer, in position order. Each token therefore sees exactly the state that
//! token-at-a-time decoding would have given it, and because the CPU `matmul` computes every
//! dot product in the same order whatever the batch, decode, one-shot prefill and any chunking
//! give bit-identical logits.

use ds4_tensor::backend::{Backend, HcParams};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::numerics::{self, RopeKind};
use crate::state::{LayerState, first_visible_raw, n_visible_compressed};
use crate::weights::{CompressorWeights, LayerWeights, Weights};

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

/// Scratch of one chunk: the HC state of every token, `[n, nhc, d]`.
struct Chunk<'t> {
    tokens: &'t [u32],
    pos0: usize,
    hc: Vec<f32>,
}

impl Graph<'_> {
    fn mm(&self, w: &ds4_tensor::HostTensor, x: &[f32], n: usize) -> Result<Vec<f32>> {
        // Rows of the 2-D view: every dim but the contiguous one.
        let n_out = w.shape.dims().iter().skip(1).product::<u64>() as usize;
        let mut y = vec![0.0f32; n * n_out];
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
        p: &HcParams<'_>,
        hc: &[f32],
        n: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (d, m) = (self.cfg.n_embd, self.cfg.n_hc);
        let (mut x, mut post, mut comb) =
            (vec![0.0; n * d], vec![0.0; n * m], vec![0.0; n * m * m]);
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
        for (il, (lw, ls)) in self.w.layers.iter().zip(state.iter_mut()).enumerate() {
            self.attention_sublayer(il, lw, ls, &mut chunk)?;
            self.ffn_sublayer(il, lw, &mut chunk)?;
        }
        self.output_head(&chunk.hc[(n - n_out) * m * d..], n_out)
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
        self.mm(&self.w.output, &z, n)
    }

    /// Projects `a [n, d]` through one compressor: `(kv, score)`, each `[n, coff*w]`, with
    /// `ape[pos mod r]` added to the scores.
    fn compressor_inputs(
        &self,
        cw: &CompressorWeights,
        a: &[f32],
        n: usize,
        pos0: usize,
        ratio: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let kv = self.mm(&cw.kv, a, n)?;
        let mut score = self.mm(&cw.gate, a, n)?;
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
        let (mut a, post, comb) = self.hc_pre_all(&p, &c.hc, n)?;
        self.be
            .rms_norm(&mut a, d, Some(&lw.attn_norm), cfg.rms_eps);

        // Queries: low rank, norm, per-head norm, RoPE on the last R dims of each head.
        let mut qn = self.mm(&lw.attn_q_a, &a, n)?; // [n, rq]
        self.be.rms_norm(
            &mut qn,
            cfg.q_lora_rank,
            Some(&lw.attn_q_a_norm),
            cfg.rms_eps,
        );
        let mut q = self.mm(&lw.attn_q_b, &qn, n)?; // [n, H*D]
        self.be.rms_norm(&mut q, hd, None, cfg.rms_eps);
        // Shared key/value row: norm, RoPE, FP8 round trip of the nope part.
        let mut kv = self.mm(&lw.attn_kv, &a, n)?; // [n, D]
        self.be
            .rms_norm(&mut kv, hd, Some(&lw.attn_kv_a_norm), cfg.rms_eps);
        for t in 0..n {
            let pos = (c.pos0 + t) as u32;
            self.be
                .rope_tail(&mut q[t * h * hd..(t + 1) * h * hd], hd, freqs, pos, false);
            let row = &mut kv[t * hd..(t + 1) * hd];
            self.be.rope_tail(row, hd, freqs, pos, false);
            if self.qat_sim {
                numerics::fp8_sim(&mut row[..cfg.n_nope()]);
            }
        }

        // State-free compressor and indexer projections of the whole chunk.
        let comp_in = match &lw.attn_compressor {
            Some(cw) => Some(self.compressor_inputs(cw, &a, n, c.pos0, ratio)?),
            None => None,
        };
        let (hi, di) = (cfg.n_indexer_head, cfg.indexer_head_dim);
        let idx_in = match &lw.indexer {
            Some(iw) => {
                let comp = self.compressor_inputs(&iw.compressor, &a, n, c.pos0, ratio)?;
                let mut qi = self.mm(&iw.attn_q_b, &qn, n)?; // [n, HI*DI]
                for t in 0..n {
                    let qt = &mut qi[t * hi * di..(t + 1) * hi * di];
                    self.be
                        .rope_tail(qt, di, self.freqs_comp, (c.pos0 + t) as u32, false);
                    if self.qat_sim {
                        qt.chunks_mut(di).for_each(numerics::had_fp4);
                    }
                }
                let mut wi = self.mm(&iw.proj, &a, n)?; // [n, HI]
                let s = 1.0 / ((di * hi) as f32).sqrt();
                wi.iter_mut().for_each(|v| *v *= s);
                Some((comp, qi, wi))
            }
            None => None,
        };

        // Stateful part, token by token in position order.
        let w_raw = cfg.sliding_window;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0.0f32; n * h * hd];
        let mut scores = Vec::new();
        for t in 0..n {
            let pos = c.pos0 + t;
            let slot = pos % w_raw;
            ls.raw[slot * hd..(slot + 1) * hd].copy_from_slice(&kv[t * hd..(t + 1) * hd]);
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
            let mut rows: Vec<&[f32]> = (first_visible_raw(pos, w_raw)..=pos)
                .map(|u| &ls.raw[(u % w_raw) * hd..(u % w_raw + 1) * hd])
                .collect();
            if ratio > 0 {
                let n_vis = n_visible_compressed(pos, ratio);
                let comp_row = |b: usize| &ls.comp_rows[b * hd..(b + 1) * hd];
                match &idx_in {
                    Some((_, qi, wi)) if n_vis > cfg.indexer_top_k => {
                        let qt = &qi[t * hi * di..(t + 1) * hi * di];
                        let wt = &wi[t * hi..(t + 1) * hi];
                        scores.resize(n_vis, 0.0);
                        self.be
                            .indexer_scores(qt, wt, &ls.index_rows[..n_vis * di], &mut scores);
                        let mut sel = numerics::top_k(&scores, cfg.indexer_top_k);
                        sel.sort_unstable();
                        rows.extend(sel.into_iter().map(comp_row));
                    }
                    _ => rows.extend((0..n_vis).map(comp_row)),
                }
            }
            let ot = &mut o[t * h * hd..(t + 1) * h * hd];
            self.be.attention(
                &q[t * h * hd..(t + 1) * h * hd],
                &rows,
                &lw.attn_sinks,
                scale,
                ot,
            );
            // Values carry the key's rotation: undo it at the query position.
            self.be.rope_tail(ot, hd, freqs, pos as u32, true);
        }

        // Grouped low-rank output projection.
        let (g, ro) = (cfg.n_out_group, cfg.o_lora_rank);
        let gw = h * hd / g;
        let mut low = vec![0.0f32; n * g * ro];
        let mut gin = vec![0.0f32; n * gw];
        let mut gout = vec![0.0f32; n * ro];
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
        let out = self.mm(&lw.attn_output_b, &low, n)?; // [n, d]
        self.hc_post_all(&mut c.hc, &out, &post, &comb, n);
        Ok(())
    }

    fn ffn_sublayer(&self, il: usize, lw: &LayerWeights, c: &mut Chunk<'_>) -> Result<()> {
        let cfg = self.cfg;
        let n = c.tokens.len();
        let (d, e_n, k) = (cfg.n_embd, cfg.n_expert, cfg.n_expert_used);
        let p = self.hc_params(&lw.hc_ffn_fn, &lw.hc_ffn_scale, &lw.hc_ffn_base);
        let (mut x, post, comb) = self.hc_pre_all(&p, &c.hc, n)?;
        self.be.rms_norm(&mut x, d, Some(&lw.ffn_norm), cfg.rms_eps);

        // Shared expert, batched.
        let mut g = self.mm(&lw.ffn_gate_shexp, &x, n)?;
        let u = self.mm(&lw.ffn_up_shexp, &x, n)?;
        self.be.swiglu(&mut g, &u, cfg.swiglu_clamp_shexp[il], 1.0);
        let mut y = self.mm(&lw.ffn_down_shexp, &g, n)?; // [n, d]

        // Router (f32 logits and scores) per token.
        let logits = self.mm(&lw.ffn_gate_inp, &x, n)?; // [n, E]
        // routes[e] = the (token, route weight) pairs sent to expert e, one per table slot.
        let mut routes: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e_n];
        for t in 0..n {
            let s: Vec<f32> = logits[t * e_n..(t + 1) * e_n]
                .iter()
                .map(|&z| numerics::sqrt_softplus(z))
                .collect();
            let sel: Vec<usize> = match &lw.ffn_gate_tid2eid {
                Some(table) => {
                    let tok = c.tokens[t] as usize;
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
            for &e in &sel {
                let wgt = if cfg.expert_weights_norm {
                    s[e] / sum
                } else {
                    s[e]
                };
                routes[e].push((t, wgt * cfg.expert_weights_scale));
            }
        }
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
        self.hc_post_all(&mut c.hc, &y, &post, &comb, n);
        Ok(())
    }
}
