//! Helpers shared by the store tests: deterministic payloads derived from the key text, so
//! any process can check that a file holds exactly what was saved under its name.

#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use ds4_kvcache::{ModelIdentity, Policy, Sections, Store, StoreConfig};

/// The identity every test store uses unless it wants a mismatch.
pub const ID: ModelIdentity = ModelIdentity {
    shape_id: 0x0d54_0001,
    weights_id: 0x0002,
};

/// A policy that loads short test entries (min 4 tokens, no cold limit).
pub fn policy() -> Policy {
    Policy {
        min_tokens: 4,
        cold_max_tokens: 0,
        ..Policy::default()
    }
}

/// A config for `dir` with a budget in bytes.
pub fn config(dir: &Path, budget_bytes: u64) -> StoreConfig {
    StoreConfig {
        budget_bytes,
        policy: policy(),
        ..StoreConfig::new(dir, ID)
    }
}

/// Warnings collected from a store.
pub type Warnings = Arc<Mutex<Vec<String>>>;

/// Opens a store whose warnings are collected instead of printed.
pub fn open(cfg: StoreConfig) -> (Store, Warnings) {
    let w: Warnings = Arc::default();
    let sink = w.clone();
    let store = Store::open_with_warn(
        cfg,
        Box::new(move |m| sink.lock().expect("warnings lock").push(m.to_string())),
    )
    .expect("open store");
    (store, w)
}

fn seed_of(text: &[u8]) -> u64 {
    // FNV-1a: a fixed, dependency-free function of the text.
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in text {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

/// Pseudo-random bytes from a seed (xorshift64).
pub fn bytes(mut x: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The tokens stored for a text.
pub fn tokens_for(text: &[u8]) -> Vec<u32> {
    let n = 8 + (seed_of(text) % 64) as usize;
    (0..n as u32)
        .map(|i| i.wrapping_mul(2654435761) % 129280)
        .collect()
}

/// The payload stored for a text: two sections, `size` bytes in all.
pub fn payload_for(text: &[u8], size: usize) -> Sections {
    let s = seed_of(text);
    let mut p = Sections::default();
    p.push("logits", bytes(s, 1000.min(size)));
    p.push("state", bytes(s.rotate_left(17), size.saturating_sub(1000)));
    p
}

/// Sum of the sizes of the store's files (everything but foreign names) in `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Names in `dir` that contain `pat`.
pub fn names_with(dir: &Path, pat: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(pat))
        .collect()
}
