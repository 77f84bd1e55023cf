//! Token sampling (greedy, temperature, top-k, top-p, min-p) and stop conditions.
//!
//! Follows ds4's order and defaults (PROMPT.md §3: `ds4.c: sample_top_p_min_p`,
//! `sample_full_vocab`, `sample_argmax`): temperature 1, top-p 1, min-p 0.05, top-k off.
//! Each [`Sampler`] owns its RNG (xorshift64*, the same generator as ds4), so a given seed,
//! prompt, build and machine always produce the same tokens; there is no global state.
//! Bit-exactness with ds4 is not a goal, but the arithmetic (f32 weights, walk order,
//! one draw per sampled token) mirrors it.

use crate::tokenizer::SpecialIds;

/// Largest top-k honoured (ds4's cap).
pub const TOP_K_MAX: usize = 1024;

/// Sampling parameters of a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Temperature; `<= 0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k highest logits; 0 = off. Capped at [`TOP_K_MAX`].
    pub top_k: usize,
    /// Nucleus mass; values `<= 0` or `> 1` mean 1 (off).
    pub top_p: f32,
    /// Keep tokens with probability `>= min_p * p_best`; negative means 0.
    pub min_p: f32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.05,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// The thinking-mode override of the server (PROMPT.md §3.4): 1.0 / top-p 1 /
    /// top-k off / min-p 0.05, seed kept.
    pub fn thinking_override(self) -> Self {
        Self {
            seed: self.seed,
            ..Self::default()
        }
    }
}

/// xorshift64* (Vigna), ds4's `sample_rng_next`.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator; seed 0 is replaced by a fixed odd constant (xorshift needs non-zero).
    pub fn new(seed: u64) -> Self {
        Self {
            state: if seed == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                seed
            },
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1): the top 24 bits of the output over 2^24.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32
    }
}

/// Index of the largest logit; the lowest id wins ties, NaNs are ignored. 0 if empty.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if !found || v > best_v {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best as u32
}

/// A seeded sampler with reusable buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler for these parameters, seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        Self {
            params,
            rng: Rng::new(params.seed),
            cand: Vec::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// Samples one token id from `logits` with the sampler's parameters.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_with_temperature(logits, self.params.temperature)
    }

    /// Samples with the given temperature instead of the configured one (forced greedy
    /// steps inside DSML pass 0; such steps draw no random number).
    pub fn sample_with_temperature(&mut self, logits: &[f32], temperature: f32) -> u32 {
        if temperature <= 0.0 || temperature.is_nan() || logits.is_empty() {
            return argmax(logits);
        }
        let p = self.params;
        let top_p = if p.top_p <= 0.0 || p.top_p > 1.0 || p.top_p.is_nan() {
            1.0
        } else {
            p.top_p
        };
        let min_p = if p.min_p.is_nan() {
            0.0
        } else {
            p.min_p.max(0.0)
        };
        let top_k = p.top_k.min(TOP_K_MAX).min(logits.len());
        let l_max = logits
            .iter()
            .copied()
            .filter(|v| v.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if !l_max.is_finite() {
            return argmax(logits);
        }
        let inv_t = 1.0 / temperature;
        let cand = &mut self.cand;
        cand.clear();

        if top_k == 0 && top_p >= 1.0 {
            // Fast path: no sort. w_best = 1, so min-p keeps w >= min_p; walk in id order.
            let mut total = 0.0f32;
            for (i, &l) in logits.iter().enumerate() {
                if !l.is_finite() {
                    continue;
                }
                let w = ((l - l_max) * inv_t).exp();
                if w >= min_p {
                    total += w;
                    cand.push((w, i as u32));
                }
            }
            return draw(&mut self.rng, cand, total, logits);
        }

        // Sorted path: candidates (top-k or all finite), weights, then walk from the best.
        if top_k > 0 {
            cand.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.is_finite())
                    .map(|(i, &l)| (l, i as u32)),
            );
            let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if cand.len() > top_k {
                cand.select_nth_unstable_by(top_k - 1, by_logit);
                cand.truncate(top_k);
            }
            cand.sort_unstable_by(by_logit);
            for c in cand.iter_mut() {
                c.0 = ((c.0 - l_max) * inv_t).exp();
            }
        } else {
            cand.extend(
                logits
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.is_finite())
                    .map(|(i, &l)| (((l - l_max) * inv_t).exp(), i as u32)),
            );
            cand.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        }
        // Probabilities are relative to all candidates.
        let all: f32 = cand.iter().map(|c| c.0).sum();
        if all.is_nan() || all <= 0.0 || !all.is_finite() {
            return argmax(logits);
        }
        let threshold = min_p * cand[0].0;
        let mut kept = 0;
        let mut mass = 0.0f32;
        for (k, c) in cand.iter().enumerate() {
            if k > 0 && c.0 < threshold {
                break;
            }
            kept = k + 1;
            mass += c.0;
            if mass / all >= top_p {
                break;
            }
        }
        cand.truncate(kept);
        draw(&mut self.rng, cand, mass, logits)
    }
}

/// Picks the first candidate whose cumulative weight reaches `u * total`.
fn draw(rng: &mut Rng, cand: &[(f32, u32)], total: f32, logits: &[f32]) -> u32 {
    let Some(last) = cand.last() else {
        return argmax(logits);
    };
    if total.is_nan() || total <= 0.0 || !total.is_finite() {
        return argmax(logits);
    }
    let target = rng.next_f32() * total;
    let mut acc = 0.0f32;
    for c in cand {
        acc += c.0;
        if acc >= target {
            return c.1;
        }
    }
    last.1
}

// ===========================================================================
// Stop conditions (PROMPT.md §3.5).

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS was sampled (not emitted).
    Eos,
    /// A tool-call block closed.
    ToolCalls,
    /// A stop string appeared (text truncated at its start).
    StopString,
    /// Token budget or context exhausted.
    Length,
    /// The model emitted a turn marker or BOS, which a correct prompt never causes;
    /// stopped defensively.
    UnexpectedSpecial,
}

/// Whether a sampled token ends generation: EOS, or (defensively) `<｜User｜>`,
/// `<｜Assistant｜>` or BOS.
pub fn end_token_reason(id: u32, specials: &SpecialIds) -> Option<FinishReason> {
    if id == specials.eos {
        Some(FinishReason::Eos)
    } else if id == specials.user || id == specials.assistant || id == specials.bos {
        Some(FinishReason::UnexpectedSpecial)
    } else {
        None
    }
}

/// Streams generated text while watching for stop strings: text that could be the start
/// of a stop string is held back until it is known not to be one.
#[derive(Debug, Clone, Default)]
pub struct StopScanner {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopScanner {
    /// A scanner for these stop strings (empty strings are ignored).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds text; returns what may be emitted now. After a stop string is found this
    /// returns the text before it and then nothing.
    pub fn push(&mut self, text: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices().rev().take(s.len()) {
                let suffix = &self.held[i..];
                if suffix.len() < s.len() && s.starts_with(suffix) {
                    keep = keep.max(suffix.len());
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        out
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift_matches_reference_recurrence() {
        // The recurrence written out independently, one step at a time.
        let mut x: u64 = 42;
        let mut rng = Rng::new(42);
        for _ in 0..100 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            assert_eq!(rng.next_u64(), x.wrapping_mul(0x2545F4914F6CDD1D));
        }
        let mut z = Rng::new(0);
        assert_ne!(z.next_u64(), 0);
        let f = Rng::new(7).next_f32();
        assert!((0.0..1.0).contains(&f));
    }

    #[test]
    fn greedy_takes_lowest_id_on_ties_and_draws_nothing() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            seed: 1,
            ..Default::default()
        });
        let mut before = s.rng.clone();
        assert_eq!(s.sample(&[1.0, 3.0, f32::NAN, 3.0]), 1);
        assert_eq!(s.rng.next_u64(), before.next_u64());
    }

    #[test]
    fn min_p_cuts_the_tail() {
        // With T = 1, token 1 has weight e^-10 relative to the best: below min_p 0.05.
        let logits = [0.0, -10.0, -0.1];
        let mut s = Sampler::new(SamplingParams {
            seed: 3,
            ..Default::default()
        });
        for _ in 0..200 {
            assert_ne!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_small_keeps_best() {
        let logits = [0.5, 2.0, 1.9, -1.0];
        let mut k1 = Sampler::new(SamplingParams {
            top_k: 1,
            seed: 5,
            ..Default::default()
        });
        let mut p0 = Sampler::new(SamplingParams {
            top_p: 0.01,
            seed: 5,
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(k1.sample(&logits), 1);
            assert_eq!(p0.sample(&logits), 1);
        }
    }

    #[test]
    fn sampling_is_reproducible_and_roughly_calibrated() {
        let logits = [0.0f32, (2.0f32).ln(), -100.0];
        let params = SamplingParams {
            min_p: 0.0,
            seed: 99,
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params);
            (0..3000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        // p(1) = 2/3 of the mass (token 2 is negligible).
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / a.len() as f64;
        assert!((ones - 2.0 / 3.0).abs() < 0.05, "{ones}");
        // The sorted path (top-k on) gives the same distribution.
        let mut s = Sampler::new(SamplingParams { top_k: 3, ..params });
        let b: Vec<u32> = (0..3000).map(|_| s.sample(&logits)).collect();
        let ones = b.iter().filter(|&&t| t == 1).count() as f64 / b.len() as f64;
        assert!((ones - 2.0 / 3.0).abs() < 0.05, "{ones}");
    }

    #[test]
    fn stop_scanner_holds_back_partial_matches() {
        let mut s = StopScanner::new(["END".to_string(), "\n\n".to_string()]);
        assert_eq!(s.push("hello E"), "hello ");
        assert_eq!(s.push("Nx"), "ENx");
        assert_eq!(s.push(" a\n"), " a");
        assert_eq!(s.push("b EN"), "\nb ");
        assert_eq!(s.push("D tail"), "");
        assert!(s.stopped());
        assert_eq!(s.push("more"), "");
        let mut t = StopScanner::new(["stop".to_string()]);
        assert_eq!(t.push("xs"), "x");
        assert_eq!(t.finish(), "s");
    }
}
