//! Prometheus counters for `/metrics` (API.md GAP-S19).
//!
//! Plain atomics and one small map, rendered as Prometheus text exposition format
//! (version 0.0.4). Disk KV-cache counters are not wired yet: `ds4-kvcache` is not
//! connected to the serving path, so they are deliberately absent rather than zero.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Server-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    reasoning_tokens: AtomicU64,
    prefill_tokens: AtomicU64,
    prefill_micros: AtomicU64,
    decode_tokens: AtomicU64,
    decode_micros: AtomicU64,
    last_prefill_tps: AtomicU64,
    last_decode_tps: AtomicU64,
    generations: AtomicU64,
    cancelled: AtomicU64,
    rejected_queue_full: AtomicU64,
    queue_wait_micros: AtomicU64,
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((endpoint, status)).or_default() += 1;
    }

    /// Records a finished generation.
    pub fn generation(&self, out: &ds4_model::generate::Outcome, queue_wait_secs: f64) {
        let u = out.usage;
        let t = out.timings;
        self.generations.fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(u.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(u.cached_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(u.completion_tokens as u64, Ordering::Relaxed);
        self.reasoning_tokens
            .fetch_add(u.reasoning_tokens as u64, Ordering::Relaxed);
        self.prefill_tokens
            .fetch_add(t.prefill_tokens as u64, Ordering::Relaxed);
        self.prefill_micros
            .fetch_add((t.prefill_secs * 1e6) as u64, Ordering::Relaxed);
        self.decode_tokens
            .fetch_add(t.decode_tokens as u64, Ordering::Relaxed);
        self.decode_micros
            .fetch_add((t.decode_secs * 1e6) as u64, Ordering::Relaxed);
        if t.prefill_tokens > 0 {
            self.last_prefill_tps
                .store(t.prefill_tps().to_bits(), Ordering::Relaxed);
        }
        if t.decode_tokens > 0 {
            self.last_decode_tps
                .store(t.decode_tps().to_bits(), Ordering::Relaxed);
        }
        self.queue_wait_micros
            .fetch_add((queue_wait_secs * 1e6) as u64, Ordering::Relaxed);
        if out.finish_reason == Some(ds4_model::generate::FinishReason::Cancelled) {
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request refused because the queue was full.
    pub fn queue_full(&self) {
        self.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a job dropped before it ran (client gone while queued).
    pub fn cancelled_in_queue(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text with the current gauges.
    pub fn render(
        &self,
        queue_depth: usize,
        live_tokens: usize,
        n_ctx: usize,
        ready: bool,
    ) -> String {
        let mut s = String::new();
        let g = |o: &AtomicU64| o.load(Ordering::Relaxed);
        let f = |o: &AtomicU64| f64::from_bits(o.load(Ordering::Relaxed));
        let _ = writeln!(
            s,
            "# HELP ds4_requests_total HTTP requests answered, by endpoint and status."
        );
        let _ = writeln!(s, "# TYPE ds4_requests_total counter");
        for ((ep, st), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "ds4_requests_total{{endpoint=\"{ep}\",status=\"{st}\"}} {n}"
            );
        }
        let counters: [(&str, &str, u64); 9] = [
            (
                "ds4_generations_total",
                "Generations run by the worker.",
                g(&self.generations),
            ),
            (
                "ds4_generations_cancelled_total",
                "Generations cancelled (client gone, shutdown).",
                g(&self.cancelled),
            ),
            (
                "ds4_queue_rejected_total",
                "Requests refused with 429 because the queue was full.",
                g(&self.rejected_queue_full),
            ),
            (
                "ds4_prompt_tokens_total",
                "Prompt tokens of finished generations.",
                g(&self.prompt_tokens),
            ),
            (
                "ds4_prompt_cached_tokens_total",
                "Prompt tokens reused from the live session.",
                g(&self.cached_tokens),
            ),
            (
                "ds4_completion_tokens_total",
                "Generated tokens (reasoning included).",
                g(&self.completion_tokens),
            ),
            (
                "ds4_reasoning_tokens_total",
                "Generated reasoning tokens.",
                g(&self.reasoning_tokens),
            ),
            (
                "ds4_prefill_tokens_total",
                "Prompt tokens actually prefilled.",
                g(&self.prefill_tokens),
            ),
            (
                "ds4_decode_tokens_total",
                "Tokens decoded.",
                g(&self.decode_tokens),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let secs: [(&str, &str, u64); 3] = [
            (
                "ds4_prefill_seconds_total",
                "Seconds spent in prefill.",
                g(&self.prefill_micros),
            ),
            (
                "ds4_decode_seconds_total",
                "Seconds spent decoding.",
                g(&self.decode_micros),
            ),
            (
                "ds4_queue_wait_seconds_total",
                "Seconds jobs waited in the queue.",
                g(&self.queue_wait_micros),
            ),
        ];
        for (name, help, v) in secs {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {:.6}",
                v as f64 / 1e6
            );
        }
        let gauges: [(&str, &str, f64); 6] = [
            (
                "ds4_prefill_tokens_per_second",
                "Prefill speed of the last generation.",
                f(&self.last_prefill_tps),
            ),
            (
                "ds4_decode_tokens_per_second",
                "Decode speed of the last generation.",
                f(&self.last_decode_tps),
            ),
            (
                "ds4_queue_depth",
                "Jobs waiting for the worker.",
                queue_depth as f64,
            ),
            (
                "ds4_live_context_tokens",
                "Tokens held by the live session.",
                live_tokens as f64,
            ),
            (
                "ds4_context_size_tokens",
                "Configured context size.",
                n_ctx as f64,
            ),
            (
                "ds4_ready",
                "1 when the model is loaded.",
                if ready { 1.0 } else { 0.0 },
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        s
    }
}

/// Prometheus text for the disk KV cache counters and gauges.
pub fn render_kv(kv: &crate::kvdisk::KvStats) -> String {
    let mut s = String::new();
    for (name, kind, help, v) in [
        (
            "ds4_kv_cache_hits_total",
            "counter",
            "Requests whose prompt prefix was restored from the disk KV cache.",
            kv.hits,
        ),
        (
            "ds4_kv_cache_misses_total",
            "counter",
            "Requests that found neither a live nor a stored prefix.",
            kv.misses,
        ),
        (
            "ds4_kv_cache_reused_tokens_total",
            "counter",
            "Prompt tokens restored from disk instead of prefilled.",
            kv.reused_tokens,
        ),
        (
            "ds4_kv_cache_disk_bytes",
            "gauge",
            "Bytes held by the disk KV cache directory.",
            kv.disk_bytes,
        ),
        (
            "ds4_kv_cache_budget_bytes",
            "gauge",
            "Space budget of the disk KV cache.",
            kv.budget_bytes,
        ),
        (
            "ds4_kv_cache_saves_written_total",
            "counter",
            "Checkpoints the background writer stored (cold, continued, evict, shutdown).",
            kv.saves_written,
        ),
        (
            "ds4_kv_cache_saves_failed_total",
            "counter",
            "Checkpoints dropped (writer busy) or failed.",
            kv.saves_failed,
        ),
        (
            "ds4_kv_cache_snapshot_microseconds_total",
            "counter",
            "Time inference paused to copy state for checkpoints.",
            kv.snapshot_us_total,
        ),
        (
            "ds4_kv_cache_snapshot_microseconds_max",
            "gauge",
            "Longest single pause to copy state for a checkpoint.",
            kv.snapshot_us_max,
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    s
}
