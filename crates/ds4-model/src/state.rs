//! Per-layer decoding state (MODEL.md s4.1): the raw sliding-window ring, the compressor
//! frontiers, and the append-only compressed attention and indexer rows.
//!
//! Rows are stored final (after RoPE and the FP8 / Hadamard+FP4 simulation), so they never
//! need recomputation. Everything is plain `Vec<f32>` so that a snapshot is a `clone()`.

/// A compressor frontier in ds4's layout (`ds4_layer_cache`): `state_kv` and `state_score`,
/// each `[coff*r, coff*w]`.
///
/// For `r == 4` (overlapping) rows `r..2r` hold the current block's tokens (full projection,
/// score with `ape` added) and rows `0..r` the previous complete block's tokens (only their
/// first halves are read); for other ratios `r` rows hold the current block. Rows no token
/// of the open block has written hold the initial values (kv 0, score `-inf`; ds4 writes
/// `-1e30` for `-inf` in its files).
#[derive(Debug, Clone, PartialEq)]
pub struct CompressorState {
    /// Compression ratio `r`.
    pub ratio: usize,
    /// Output row width `w` (`D` or `DI`).
    pub width: usize,
    /// Values `[coff*r, coff*w]`.
    pub state_kv: Vec<f32>,
    /// Gate scores `[coff*r, coff*w]`; `-inf` where no token contributes.
    pub state_score: Vec<f32>,
}

impl CompressorState {
    /// An empty frontier.
    pub fn new(ratio: usize, width: usize) -> CompressorState {
        let coff = Self::coff_of(ratio);
        let n = coff * ratio * coff * width;
        CompressorState {
            ratio,
            width,
            state_kv: vec![0.0; n],
            state_score: vec![f32::NEG_INFINITY; n],
        }
    }

    fn coff_of(ratio: usize) -> usize {
        if ratio == 4 { 2 } else { 1 }
    }

    fn coff(&self) -> usize {
        Self::coff_of(self.ratio)
    }

    /// Adds token `pos` (projection `kv`, gate `score` with `ape` already added, each
    /// `coff*w` wide). When `pos` completes a block, returns the pooled row (before norm,
    /// RoPE and simulation) and advances the frontier.
    pub fn push(&mut self, pos: usize, kv: &[f32], score: &[f32]) -> Option<Vec<f32>> {
        let (r, w, coff) = (self.ratio, self.width, self.coff());
        let row_w = coff * w;
        let slot = if coff == 2 { r + pos % r } else { pos % r };
        self.state_kv[slot * row_w..(slot + 1) * row_w].copy_from_slice(kv);
        self.state_score[slot * row_w..(slot + 1) * row_w].copy_from_slice(score);
        if pos % r != r - 1 {
            return None;
        }
        let mut pooled = vec![0.0f32; w];
        // Candidates per channel j: (row, column) pairs into the state.
        let mut cand: Vec<(usize, usize)> = Vec::with_capacity(coff * r);
        for (j, out) in pooled.iter_mut().enumerate() {
            cand.clear();
            if coff == 2 {
                // Previous block, first half (Ca); current block, second half (Cb).
                cand.extend((0..r).map(|i| (i, j)));
                cand.extend((r..2 * r).map(|i| (i, w + j)));
            } else {
                cand.extend((0..r).map(|i| (i, j)));
            }
            let mx = cand.iter().fold(f32::NEG_INFINITY, |m, &(i, c)| {
                m.max(self.state_score[i * row_w + c])
            });
            let mut den = 0.0f32;
            let mut acc = 0.0f32;
            for &(i, c) in &cand {
                let e = (self.state_score[i * row_w + c] - mx).exp();
                den += e;
                acc += e * self.state_kv[i * row_w + c];
            }
            *out = acc / den;
        }
        // The current block becomes the previous one (ratio 4), and the open block's rows go
        // back to their initial values. Those rows are always rewritten before they are read
        // again, so this changes no number; it makes the frontier a function of the position
        // alone, as ds4's snapshots expect (KVCACHE.md s2.3).
        let open = if coff == 2 {
            let half = r * row_w;
            self.state_kv.copy_within(half.., 0);
            self.state_score.copy_within(half.., 0);
            half..2 * half
        } else {
            0..r * row_w
        };
        self.state_kv[open.clone()].fill(0.0);
        self.state_score[open].fill(f32::NEG_INFINITY);
        Some(pooled)
    }
}

/// The state of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerState {
    /// Raw rows, a ring of `W` rows of `D`: position `u` lives in slot `u mod W`.
    pub raw: Vec<f32>,
    /// Compressed attention rows `[n_comp, D]` (layers with `r > 0`).
    pub comp_rows: Vec<f32>,
    /// Attention compressor frontier (layers with `r > 0`).
    pub attn_compressor: Option<CompressorState>,
    /// Indexer rows `[n_comp, DI]` (layers with `r == 4`).
    pub index_rows: Vec<f32>,
    /// Indexer compressor frontier (layers with `r == 4`).
    pub indexer_compressor: Option<CompressorState>,
}

impl LayerState {
    /// Empty state for a layer of ratio `ratio`.
    pub fn new(
        ratio: usize,
        window: usize,
        head_dim: usize,
        indexer_head_dim: usize,
    ) -> LayerState {
        LayerState {
            raw: vec![0.0; window * head_dim],
            comp_rows: Vec::new(),
            attn_compressor: (ratio > 0).then(|| CompressorState::new(ratio, head_dim)),
            index_rows: Vec::new(),
            indexer_compressor: (ratio == 4).then(|| CompressorState::new(ratio, indexer_head_dim)),
        }
    }
}

/// Number of compressed rows of ratio `r` visible to query position `pos`:
/// `floor((pos+1)/r)` (MODEL.md s3.7).
pub fn n_visible_compressed(pos: usize, ratio: usize) -> usize {
    (pos + 1) / ratio
}

/// First raw position visible to query `pos` with window `w`.
pub fn first_visible_raw(pos: usize, window: usize) -> usize {
    (pos + 1).saturating_sub(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pos: usize, ratio: usize, expected: usize) {
        assert_eq!(
            n_visible_compressed(pos, ratio),
            expected,
            "pos {pos} ratio {ratio}"
        );
    }

    #[test]
    fn visibility_counts() {
        check(0, 4, 0);
        check(2, 4, 0);
        check(3, 4, 1);
        check(6, 4, 1);
        check(7, 4, 2);
        check(127, 128, 1);
        check(126, 128, 0);
        assert_eq!(first_visible_raw(0, 8), 0);
        assert_eq!(first_visible_raw(7, 8), 0);
        assert_eq!(first_visible_raw(8, 8), 1);
    }

    #[test]
    fn non_overlapping_pool_is_softmax_weighted_mean() {
        let mut c = CompressorState::new(2, 1);
        assert!(c.push(0, &[1.0], &[0.0]).is_none());
        let row = c.push(1, &[3.0], &[0.0]).expect("block complete");
        assert_eq!(row, vec![2.0]);
        assert!(c.push(2, &[5.0], &[f32::NEG_INFINITY]).is_none());
        assert_eq!(c.push(3, &[7.0], &[0.0]), Some(vec![7.0]));
    }

    #[test]
    fn overlapping_pool_uses_previous_block_first_half() {
        let mut c = CompressorState::new(4, 1);
        // Block 0: only its own second halves (value 1.0) count.
        for pos in 0..3 {
            assert!(c.push(pos, &[100.0, 1.0], &[0.0, 0.0]).is_none());
        }
        assert_eq!(c.push(3, &[100.0, 1.0], &[0.0, 0.0]), Some(vec![1.0]));
        // Block 1: previous first halves (100.0) and own second halves (0.0), equal scores.
        for pos in 4..7 {
            assert!(c.push(pos, &[5.0, 0.0], &[0.0, 0.0]).is_none());
        }
        assert_eq!(c.push(7, &[5.0, 0.0], &[0.0, 0.0]), Some(vec![50.0]));
    }
}
