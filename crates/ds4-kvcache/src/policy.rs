//! When to save a checkpoint, how long it is, and which entry to evict: pure functions.
//!
//! These are ds4-server's decisions (KVCACHE.md s5 and s6; `ds4_kvstore.c`:
//! `ds4_kvstore_store_len`, `ds4_kvstore_chat_anchor_pos`,
//! `ds4_kvstore_continued_store_target`, `ds4_kvstore_file_size_fits`,
//! `ds4_kvstore_entry_eviction_score`), kept free of I/O so they are unit tested here and
//! the server only wires them to its request loop.
//!
//! * **cold**: the first prefill of a request with no cache hit saves the stable chat prefix
//!   (everything before the last `<｜User｜>` preceding the first `<｜Assistant｜>`), or
//!   else the prompt minus a 32-token tail rounded down to 2048;
//! * **continued**: during long prefills and generation, at absolute multiples of
//!   `ceil(interval/align)*align` tokens beyond the last stored frontier;
//! * **evict**: the live session, when another conversation is about to replace it;
//! * **shutdown**: the live session on a clean exit.

/// ds4's hit half-life: a hit counts half as much after 6 hours without use.
pub const HIT_HALF_LIFE_SECS: f64 = 6.0 * 3600.0;
/// Effective hits below this count as zero (`KV_CACHE_MIN_EFFECTIVE_HITS`).
pub const MIN_EFFECTIVE_HITS: f64 = 0.01;

/// The cache policy knobs, with ds4-server's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Never save or load checkpoints shorter than this (`--kv-cache-min-tokens`, 512).
    pub min_tokens: usize,
    /// Cold-save prompts up to this length; 0 disables cold saves. Loaded entries longer
    /// than this are "consumed" (`--kv-cache-cold-max-tokens`, 30000).
    pub cold_max_tokens: usize,
    /// Continued saves every ~N tokens; 0 disables (`--kv-cache-continued-interval-tokens`).
    /// ds4's default is 10000, which the 2048 alignment turns into a 10240-token step.
    pub continued_interval_tokens: usize,
    /// Tokens trimmed from the tail of cold saves (`--kv-cache-boundary-trim-tokens`, 32).
    pub boundary_trim_tokens: usize,
    /// Cold and continued lengths are multiples of this; 0 disables
    /// (`--kv-cache-boundary-align-tokens`, 2048, the prefill chunk).
    pub boundary_align_tokens: usize,
    /// Only reuse entries written with the same weights id (`--kv-cache-reject-different-quant`).
    pub reject_different_quant: bool,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            min_tokens: 512,
            cold_max_tokens: 30000,
            continued_interval_tokens: 10000,
            boundary_trim_tokens: 32,
            boundary_align_tokens: 2048,
            reject_different_quant: false,
        }
    }
}

impl Policy {
    /// Checks ds4's option rules: `min_tokens > 0`, `cold_max_tokens` 0 or `>= min_tokens`.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_tokens == 0 {
            return Err("min_tokens must be > 0".into());
        }
        if self.cold_max_tokens != 0 && self.cold_max_tokens < self.min_tokens {
            return Err(format!(
                "cold_max_tokens {} must be 0 or >= min_tokens {}",
                self.cold_max_tokens, self.min_tokens
            ));
        }
        Ok(())
    }

    /// The length to store for a prompt of `n` tokens: drop the fragile tail (BPE may merge
    /// it with the next message) and round down to the alignment, unless that falls below
    /// `min_tokens`, in which case the whole prompt is stored.
    pub fn store_len(&self, n: usize) -> usize {
        let trim = self.boundary_trim_tokens;
        let align = self.boundary_align_tokens;
        if n > self.min_tokens + trim {
            let mut stable = n - trim;
            if align > 0 {
                stable -= stable % align;
            }
            if stable >= self.min_tokens {
                return stable;
            }
        }
        n
    }

    /// Position of the last `user` token before the first `assistant` token, if it is at
    /// least `min_tokens`: storing `prompt[..pos]` keeps everything before the current task,
    /// which other sessions with the same system prompt and tools can reuse.
    pub fn chat_anchor_pos(&self, prompt: &[u32], user: u32, assistant: u32) -> Option<usize> {
        let mut last_user = None;
        for (idx, &t) in prompt.iter().enumerate() {
            if t == assistant {
                break;
            }
            if t == user {
                last_user = Some(idx);
            }
        }
        last_user.filter(|&p| p >= self.min_tokens)
    }

    /// Cold save: the length to store after the first prefill of a request that had no
    /// cache hit, or `None` when no cold save is due.
    pub fn cold_target(&self, prompt: &[u32], user: u32, assistant: u32) -> Option<usize> {
        let n = prompt.len();
        if self.cold_max_tokens == 0 || n < self.min_tokens || n > self.cold_max_tokens {
            return None;
        }
        Some(
            self.chat_anchor_pos(prompt, user, assistant)
                .unwrap_or_else(|| self.store_len(n)),
        )
    }

    /// The continued-save step: the interval rounded up to the alignment (0 = disabled).
    pub fn continued_step(&self) -> usize {
        let interval = self.continued_interval_tokens;
        let align = self.boundary_align_tokens;
        if interval == 0 {
            return 0;
        }
        if align > 0 {
            interval.div_ceil(align) * align
        } else {
            interval
        }
    }

    /// Continued save: `Some(live)` when the live length is an absolute multiple of the step
    /// beyond the last stored frontier (absolute positions make restart points independent
    /// of where the cold checkpoint landed).
    pub fn continued_target(&self, live: usize, frontier: &Frontier) -> Option<usize> {
        let step = self.continued_step();
        (step > 0 && live >= self.min_tokens && live.is_multiple_of(step) && live > frontier.last)
            .then_some(live)
    }

    /// Evict save: the full live length, before another conversation replaces the session.
    pub fn evict_target(&self, live: usize) -> Option<usize> {
        (live >= self.min_tokens).then_some(live)
    }

    /// Shutdown save: the full live length, on a clean exit.
    pub fn shutdown_target(&self, live: usize) -> Option<usize> {
        (live >= self.min_tokens).then_some(live)
    }

    /// Whether an entry of `n_tokens` should be removed once a replacement for it is durable
    /// (ds4 deletes it right after loading; see KVCACHE.md s11.13 for why we wait).
    pub fn consume_after_load(&self, n_tokens: usize) -> bool {
        self.cold_max_tokens != 0 && n_tokens > self.cold_max_tokens
    }

    /// Whether a lookup may return an entry: long enough and from a compatible context.
    pub fn loadable(&self, n_tokens: usize, entry_ctx: usize, current_ctx: usize) -> bool {
        n_tokens >= self.min_tokens && entry_ctx <= current_ctx
    }
}

/// The continued-save schedule's memory: the longest length stored or loaded so far in the
/// current conversation (`continued_last_store_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Frontier {
    /// Longest stored or loaded length.
    pub last: usize,
}

impl Frontier {
    /// Records a store or load of `n` tokens.
    pub fn note(&mut self, n: usize) {
        self.last = self.last.max(n);
    }

    /// Forgets the schedule (a request missed the live session).
    pub fn reset(&mut self) {
        self.last = 0;
    }
}

/// Bytes the budget must have for a file of `file_bytes`: 1 % headroom, as ds4 reserves.
pub fn budget_required(file_bytes: u64) -> u64 {
    file_bytes.saturating_add(file_bytes.div_ceil(100))
}

/// Whether a file of `file_bytes` may be written at all under `budget` bytes.
pub fn fits_budget(file_bytes: u64, budget: u64) -> bool {
    budget_required(file_bytes) <= budget
}

/// What eviction needs to know about an entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreInput {
    /// Stored tokens (prefill saved by a hit).
    pub n_tokens: u64,
    /// File size.
    pub file_bytes: u64,
    /// Times it was loaded.
    pub hits: u32,
    /// Unix seconds of the last load (0 = never).
    pub last_used: u64,
    /// Unix seconds of creation.
    pub created_at: u64,
}

/// ds4's eviction score: higher survives. Tokens saved per byte, weighted by hits that decay
/// with a 6-hour half-life: `(hits * 2^(-age/6h) + 1) * tokens / bytes`.
pub fn eviction_score(e: &ScoreInput, now: u64) -> f64 {
    if e.file_bytes == 0 {
        return 0.0;
    }
    let used_at = if e.last_used != 0 {
        e.last_used
    } else {
        e.created_at
    };
    let mut hits = f64::from(e.hits);
    if used_at == 0 {
        hits = 0.0;
    } else if now > used_at {
        hits *= (-((now - used_at) as f64) / HIT_HALF_LIFE_SECS).exp2();
        if hits < MIN_EFFECTIVE_HITS {
            hits = 0.0;
        }
    }
    (hits + 1.0) * e.n_tokens as f64 / e.file_bytes as f64
}

/// Picks the victim among `entries`: lowest score, ties broken by the older last use.
pub fn pick_victim(entries: &[ScoreInput], now: u64) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (idx, e) in entries.iter().enumerate() {
        let s = eviction_score(e, now);
        let better = match best {
            None => true,
            Some((b, bs)) => s < bs || (s == bs && e.last_used < entries[b].last_used),
        };
        if better {
            best = Some((idx, s));
        }
    }
    best.map(|(idx, _)| idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_store_len(p: &Policy, n: usize, expected: usize) {
        assert_eq!(p.store_len(n), expected, "store_len({n})");
    }

    #[test]
    fn store_len_matches_ds4() {
        let p = Policy::default();
        // KVCACHE.md s5 examples.
        check_store_len(&p, 11_011, 10_240);
        check_store_len(&p, 1_695, 1_695);
        // At or below min + trim: whole prompt.
        check_store_len(&p, 544, 544);
        check_store_len(&p, 512, 512);
        // Trimmed and aligned.
        check_store_len(&p, 2_048 + 32, 2_048);
        check_store_len(&p, 2_048 + 31, 2_079);
        check_store_len(&p, 4_096 + 100, 4_096);
        let no_align = Policy {
            boundary_align_tokens: 0,
            ..Policy::default()
        };
        check_store_len(&no_align, 1_695, 1_663);
    }

    const USER: u32 = 128803;
    const ASSISTANT: u32 = 128804;

    fn prompt(n: usize, marks: &[(usize, u32)]) -> Vec<u32> {
        let mut p = vec![7u32; n];
        for &(at, t) in marks {
            p[at] = t;
        }
        p
    }

    #[test]
    fn chat_anchor_is_last_user_before_first_assistant() {
        let pol = Policy::default();
        let p = prompt(
            3000,
            &[(10, USER), (600, USER), (900, ASSISTANT), (1200, USER)],
        );
        assert_eq!(pol.chat_anchor_pos(&p, USER, ASSISTANT), Some(600));
        // Below min_tokens: no anchor.
        let p = prompt(3000, &[(100, USER), (900, ASSISTANT)]);
        assert_eq!(pol.chat_anchor_pos(&p, USER, ASSISTANT), None);
        // No assistant at all: the last user counts.
        let p = prompt(3000, &[(700, USER), (2000, USER)]);
        assert_eq!(pol.chat_anchor_pos(&p, USER, ASSISTANT), Some(2000));
    }

    #[test]
    fn cold_decisions() {
        let pol = Policy::default();
        // Too short / too long / disabled.
        assert_eq!(pol.cold_target(&prompt(511, &[]), USER, ASSISTANT), None);
        assert_eq!(pol.cold_target(&prompt(30_001, &[]), USER, ASSISTANT), None);
        let off = Policy {
            cold_max_tokens: 0,
            ..Policy::default()
        };
        assert_eq!(off.cold_target(&prompt(5000, &[]), USER, ASSISTANT), None);
        // Anchor wins when it is long enough.
        let p = prompt(5000, &[(3000, USER), (4000, ASSISTANT)]);
        assert_eq!(pol.cold_target(&p, USER, ASSISTANT), Some(3000));
        // Otherwise the trimmed, aligned length.
        assert_eq!(
            pol.cold_target(&prompt(11_011, &[]), USER, ASSISTANT),
            Some(10_240)
        );
        assert_eq!(
            pol.cold_target(&prompt(512, &[]), USER, ASSISTANT),
            Some(512)
        );
        assert_eq!(
            pol.cold_target(&prompt(30_000, &[]), USER, ASSISTANT),
            Some(28_672)
        );
    }

    #[test]
    fn continued_schedule() {
        let pol = Policy::default();
        assert_eq!(pol.continued_step(), 10_240);
        let mut f = Frontier::default();
        assert_eq!(pol.continued_target(10_239, &f), None);
        assert_eq!(pol.continued_target(10_240, &f), Some(10_240));
        f.note(10_240);
        assert_eq!(pol.continued_target(10_240, &f), None);
        assert_eq!(pol.continued_target(20_480, &f), Some(20_480));
        // A loaded 25 000-token entry moves the frontier past 20 480.
        f.note(25_000);
        assert_eq!(pol.continued_target(20_480, &f), None);
        assert_eq!(pol.continued_target(30_720, &f), Some(30_720));
        f.reset();
        assert_eq!(pol.continued_target(20_480, &f), Some(20_480));
        let off = Policy {
            continued_interval_tokens: 0,
            ..Policy::default()
        };
        assert_eq!(off.continued_target(10_240, &Frontier::default()), None);
        let unaligned = Policy {
            boundary_align_tokens: 0,
            ..Policy::default()
        };
        assert_eq!(unaligned.continued_step(), 10_000);
        // The step never stores below min_tokens.
        let tiny = Policy {
            continued_interval_tokens: 100,
            boundary_align_tokens: 0,
            ..Policy::default()
        };
        assert_eq!(tiny.continued_target(300, &Frontier::default()), None);
        assert_eq!(tiny.continued_target(600, &Frontier::default()), Some(600));
    }

    #[test]
    fn evict_shutdown_consume() {
        let pol = Policy::default();
        assert_eq!(pol.evict_target(511), None);
        assert_eq!(pol.evict_target(512), Some(512));
        assert_eq!(pol.evict_target(40_001), Some(40_001));
        assert_eq!(pol.shutdown_target(100), None);
        assert_eq!(pol.shutdown_target(12_345), Some(12_345));
        assert!(!pol.consume_after_load(30_000));
        assert!(pol.consume_after_load(30_001));
        assert!(pol.loadable(512, 32768, 32768));
        assert!(!pol.loadable(511, 32768, 32768));
        assert!(!pol.loadable(600, 65536, 32768));
    }

    #[test]
    fn validate_rules() {
        assert!(Policy::default().validate().is_ok());
        let bad = Policy {
            min_tokens: 0,
            ..Policy::default()
        };
        assert!(bad.validate().is_err());
        let bad = Policy {
            cold_max_tokens: 100,
            ..Policy::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn budget_headroom() {
        assert_eq!(budget_required(100), 101);
        assert_eq!(budget_required(101), 103);
        assert!(fits_budget(99, 100));
        assert!(!fits_budget(100, 100));
    }

    fn input(n_tokens: u64, file_bytes: u64, hits: u32, last_used: u64) -> ScoreInput {
        ScoreInput {
            n_tokens,
            file_bytes,
            hits,
            last_used,
            created_at: 1000,
        }
    }

    #[test]
    fn scores() {
        let now = 1_000_000;
        // No hits: tokens per byte.
        assert_eq!(eviction_score(&input(100, 1000, 0, now), now), 0.1);
        // One fresh hit doubles it; after one half-life it counts half.
        assert_eq!(eviction_score(&input(100, 1000, 1, now), now), 0.2);
        let half = now - HIT_HALF_LIFE_SECS as u64;
        assert!((eviction_score(&input(100, 1000, 1, half), now) - 0.15).abs() < 1e-12);
        // Very old hits vanish.
        assert_eq!(eviction_score(&input(100, 1000, 1, 1), now), 0.1);
        // The victim is the lowest score; ties go to the older last use.
        let es = [
            input(100, 1000, 3, now),
            input(100, 1000, 0, now - 5),
            input(100, 1000, 0, now - 10),
            input(500, 1000, 0, now - 100),
        ];
        assert_eq!(pick_victim(&es, now), Some(2));
        assert_eq!(pick_victim(&[], now), None);
    }
}
