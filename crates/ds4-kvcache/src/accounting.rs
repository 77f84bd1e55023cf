//! Memory accounting of a session's state (MODEL.md s4.2): bytes per token and fixed bytes
//! per layer type for a context size, as `ds4_model::SessionState` holds them (every value
//! an `f32`). `ds4 inspect --ctx N` prints it; the README's 100k / 250k / 1M figures come
//! from it.
//!
//! Per layer, by compression ratio `r` (head dim `D`, indexer head dim `DI`, window `W`):
//!
//! | type | grows with the context | fixed |
//! |---|---|---|
//! | sliding (`r = 0`) | nothing | raw ring `W x D` |
//! | CSA (`r = 4`) | `floor(N/4) x (D + DI)` (compressed + indexer rows) | raw ring, frontiers `2 x 8 x 2D` and `2 x 8 x 2DI` |
//! | HCA (other `r`) | `floor(N/r) x D` | raw ring, frontier `2 x r x D` |
//!
//! plus, per session, the token ids (4 bytes per token) and the logits (`4 x vocab`).

use ds4_model::Config;

/// The state cost of one layer type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerTypeMemory {
    /// Compression ratio (0 = sliding window only).
    pub ratio: usize,
    /// Layers of this type.
    pub n_layers: usize,
    /// Bytes one layer holds for `ctx` tokens of context (rows that grow with it).
    pub growing_bytes: u64,
    /// Bytes one layer holds whatever the length (raw ring and frontiers).
    pub fixed_bytes: u64,
    /// Average growing bytes per token of one layer, times 1000 (exact for multiples of `r`).
    pub milli_bytes_per_token: u64,
}

impl LayerTypeMemory {
    /// Name of the type: "sliding", "CSA (r=4)", "HCA (r=128)".
    pub fn name(&self) -> String {
        match self.ratio {
            0 => "sliding".to_string(),
            4 => "CSA (r=4)".to_string(),
            r => format!("HCA (r={r})"),
        }
    }

    /// Bytes of all layers of the type.
    pub fn total_bytes(&self) -> u64 {
        (self.growing_bytes + self.fixed_bytes) * self.n_layers as u64
    }
}

/// The state cost of a whole session at `ctx` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMemory {
    /// Context size.
    pub ctx: usize,
    /// Layer types, in order of first appearance.
    pub types: Vec<LayerTypeMemory>,
    /// Token ids (4 bytes each).
    pub token_bytes: u64,
    /// Next-token logits.
    pub logits_bytes: u64,
}

impl StateMemory {
    /// Everything.
    pub fn total_bytes(&self) -> u64 {
        self.types
            .iter()
            .map(LayerTypeMemory::total_bytes)
            .sum::<u64>()
            + self.token_bytes
            + self.logits_bytes
    }

    /// Bytes per token of context across all layers (growing rows only), times 1000.
    pub fn milli_bytes_per_token(&self) -> u64 {
        self.types
            .iter()
            .map(|t| t.milli_bytes_per_token * t.n_layers as u64)
            .sum()
    }
}

const F32: u64 = 4;

/// The state cost of a session of `cfg` holding `ctx` tokens.
pub fn state_memory(cfg: &Config, ctx: usize) -> StateMemory {
    let d = cfg.head_dim as u64;
    let di = cfg.indexer_head_dim as u64;
    // The ring always has `W` rows (`Session::new`), even for a shorter context.
    let raw = cfg.sliding_window as u64 * d * F32;
    let n = ctx as u64;
    let mut types: Vec<LayerTypeMemory> = Vec::new();
    for il in 0..cfg.n_layer {
        let r = cfg.compress_ratio(il);
        if let Some(t) = types.iter_mut().find(|t| t.ratio == r) {
            t.n_layers += 1;
            continue;
        }
        let (growing, fixed, milli) = match r {
            0 => (0, raw, 0),
            4 => (
                n / 4 * (d + di) * F32,
                // Two lanes: [2*4, 2*D] and [2*4, 2*DI], kv and score each.
                raw + 2 * (8 * 2 * d) * F32 + 2 * (8 * 2 * di) * F32,
                (d + di) * F32 * 1000 / 4,
            ),
            r => {
                let r = r as u64;
                (n / r * d * F32, raw + 2 * r * d * F32, d * F32 * 1000 / r)
            }
        };
        types.push(LayerTypeMemory {
            ratio: r,
            n_layers: 1,
            growing_bytes: growing,
            fixed_bytes: fixed,
            milli_bytes_per_token: milli,
        });
    }
    StateMemory {
        ctx,
        types,
        token_bytes: n * 4,
        logits_bytes: cfg.n_vocab as u64 * F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ds4_model::synthetic::SyntheticShape;
    use ds4_model::{LoadOptions, Session};

    /// DeepSeek V4 Flash's state shape: 43 layers (2 sliding, then CSA/HCA alternating),
    /// head dim 512, indexer 128, window 128, vocabulary 129280.
    fn flash() -> Config {
        let mut cfg = SyntheticShape {
            n_embd: 4096,
            n_layer: 43,
            ..SyntheticShape::default()
        }
        .config()
        .expect("config");
        cfg.head_dim = 512;
        cfg.indexer_head_dim = 128;
        cfg.sliding_window = 128;
        cfg.n_vocab = 129_280;
        cfg
    }

    #[test]
    fn flash_matches_model_md_4_2() {
        let m = state_memory(&flash(), 1 << 20);
        let names: Vec<(usize, usize)> = m.types.iter().map(|t| (t.ratio, t.n_layers)).collect();
        assert_eq!(names, vec![(0, 2), (4, 21), (128, 20)]);
        // MODEL.md s4.2: 13,760 B/token in f32 (CSA 160 values, HCA 4 values per token).
        assert_eq!(m.milli_bytes_per_token(), 13_760_000);
        assert_eq!(m.types[1].milli_bytes_per_token, 640_000);
        assert_eq!(m.types[2].milli_bytes_per_token, 16_000);
        // MODEL.md s4.3 at N = 1,048,576: CSA attention 11.27 GB + indexer 2.82 GB, HCA
        // 0.34 GB, raw windows 11.3 MB, frontiers 12.2 MB; total 14.4 GB.
        let gb = |b: u64| b as f64 / 1e9;
        let csa = &m.types[1];
        assert!((gb(csa.growing_bytes * 21) - (11.27 + 2.82)).abs() < 0.01);
        assert!((gb(m.types[2].growing_bytes * 20) - 0.34).abs() < 0.01);
        let raw: u64 = 43 * 128 * 512 * 4;
        assert!((raw as f64 / 1e6 - 11.3).abs() < 0.05);
        let fixed: u64 = m
            .types
            .iter()
            .map(|t| t.fixed_bytes * t.n_layers as u64)
            .sum();
        assert!(((fixed - raw) as f64 / 1e6 - 12.2).abs() < 0.05);
        // "14.4 GB (13.4 GiB)" of persistent state (rows, windows, frontiers), rounded.
        let persistent = m.total_bytes() - m.token_bytes - m.logits_bytes;
        assert!((gb(persistent) - 14.4).abs() < 0.06);
        assert!((persistent as f64 / (1u64 << 30) as f64 - 13.4).abs() < 0.06);
    }

    #[test]
    fn matches_a_real_session_state() {
        // The demo model's session after n tokens holds exactly what the formula says.
        let model = ds4_model::demo::model(&LoadOptions::default()).expect("demo");
        let tok: Vec<u32> = (0..37u32).map(|i| 1000 + i * 7).collect();
        let mut s = Session::new(&model, 256);
        s.feed(&tok).expect("feed");
        let st = s.snapshot();
        let held: u64 = st
            .layers
            .iter()
            .map(|l| {
                let c = |c: &Option<ds4_model::state::CompressorState>| {
                    c.as_ref()
                        .map_or(0, |c| (c.state_kv.len() + c.state_score.len()) as u64)
                };
                (l.raw.len() + l.comp_rows.len() + l.index_rows.len()) as u64
                    + c(&l.attn_compressor)
                    + c(&l.indexer_compressor)
            })
            .sum::<u64>()
            * 4
            + st.tokens.len() as u64 * 4
            + st.logits.len() as u64 * 4;
        let m = state_memory(model.config(), tok.len());
        assert_eq!(m.total_bytes(), held);
    }
}
