//! The store's public API: round trips, longest-prefix lookup, bad files, model identity,
//! the space cap under churn, orphans, and two stores sharing a directory.

mod common;

use std::fs;

use common::*;
use ds4_kvcache::{
    Error, ModelIdentity, SaveOutcome, SaveReason, SaveRequest, Sections, Store, key_of,
};

fn save(store: &Store, text: &str, size: usize) -> ds4_kvcache::Result<SaveOutcome> {
    let payload = payload_for(text.as_bytes(), size);
    let tokens = tokens_for(text.as_bytes());
    store.save(&SaveRequest {
        text: text.as_bytes(),
        tokens: &tokens,
        ctx_size: 32768,
        reason: SaveReason::Evict,
        payload: &payload,
    })
}

fn check_loaded(l: &ds4_kvcache::Loaded<Sections>, size: usize) {
    assert_eq!(l.tokens, tokens_for(&l.text));
    assert_eq!(l.state, payload_for(&l.text, size));
}

#[test]
fn round_trip_and_longest_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, warnings) = open(config(dir.path(), 64 << 20));
    let a = "<｜begin▁of▁sentence｜>system prompt";
    let ab = "<｜begin▁of▁sentence｜>system prompt<｜User｜>first question";
    assert!(matches!(
        save(&store, a, 200_000),
        Ok(SaveOutcome::Written { .. })
    ));
    assert!(matches!(
        save(&store, ab, 300_000),
        Ok(SaveOutcome::Written { .. })
    ));
    // Saving the same text again writes nothing.
    assert!(matches!(
        save(&store, ab, 300_000),
        Ok(SaveOutcome::AlreadyStored { .. })
    ));

    let prompt = format!("{ab}<｜Assistant｜>answer");
    let hit = store.lookup(prompt.as_bytes(), 32768).expect("lookup");
    assert_eq!(hit.map(|h| h.entry.key), Some(key_of(ab.as_bytes())));
    let other = format!("{a}<｜User｜>another question");
    let hit = store.lookup(other.as_bytes(), 32768).expect("lookup");
    assert_eq!(hit.map(|h| h.entry.key), Some(key_of(a.as_bytes())));
    assert!(store.lookup(b"unrelated", 32768).expect("lookup").is_none());
    // A session with a smaller context cannot take these entries.
    assert!(
        store
            .lookup(prompt.as_bytes(), 4096)
            .expect("lookup")
            .is_none()
    );

    let l = store
        .lookup_load::<Sections>(prompt.as_bytes(), 32768)
        .expect("load")
        .expect("hit");
    assert_eq!(l.text, ab.as_bytes());
    check_loaded(&l, 300_000);
    assert_eq!(l.entry.hits, 1);
    let l2 = store
        .load::<Sections>(&key_of(ab.as_bytes()))
        .expect("load");
    assert_eq!(l2.entry.hits, 2);

    // Hits survive a restart (sidecar), and a fresh index finds both entries.
    drop(store);
    let (store, _) = open(config(dir.path(), 64 << 20));
    let mut entries = store.entries().expect("entries");
    entries.sort_by_key(|e| e.text_bytes);
    assert_eq!(entries.len(), 2);
    assert_eq!((entries[0].hits, entries[1].hits), (0, 2));
    assert_eq!(entries[1].reason, SaveReason::Evict);
    assert!(warnings.lock().expect("lock").is_empty());
}

/// Writes one good entry, damages it with `damage`, and checks that loading it fails with
/// an error `expect` accepts, that the file is gone, and that the store carries on.
fn check_bad_file(name: &str, damage: impl Fn(&mut Vec<u8>), expect: impl Fn(&Error) -> bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, warnings) = open(config(dir.path(), 64 << 20));
    let text = "<｜User｜>a prompt that will be damaged";
    save(&store, text, 100_000).expect("save");
    let key = key_of(text.as_bytes());
    let path = store.entry_path(&key);
    let mut b = fs::read(&path).expect("read");
    damage(&mut b);
    fs::write(&path, &b).expect("write");

    match store.load::<Sections>(&key) {
        Err(Error::BadFile { source, .. }) => {
            assert!(expect(&source), "{name}: unexpected error {source}");
            let msg = Error::BadFile {
                path: path.clone(),
                source,
            }
            .to_string();
            assert!(msg.contains("file deleted"), "{name}: {msg}");
        }
        other => panic!("{name}: expected BadFile, got {other:?}"),
    }
    assert!(!path.exists(), "{name}: bad file kept");
    assert_eq!(
        warnings.lock().expect("lock").len(),
        1,
        "{name}: one warning"
    );
    // Never retried: the lookup no longer offers it.
    assert!(
        store
            .lookup(text.as_bytes(), 32768)
            .expect("lookup")
            .is_none()
    );
    // The store carries on.
    save(&store, text, 100_000).expect("save again");
    let l = store.load::<Sections>(&key).expect("load again");
    check_loaded(&l, 100_000);
}

#[test]
fn truncated_file_is_rejected_and_deleted() {
    check_bad_file(
        "truncated",
        |b| b.truncate(b.len() - 1000),
        |e| matches!(e, Error::Truncated { .. }),
    );
}

#[test]
fn bit_flipped_payload_is_rejected_and_deleted() {
    check_bad_file(
        "bit flip",
        |b| {
            let at = b.len() - 5000;
            b[at] ^= 0x10;
        },
        |e| matches!(e, Error::Checksum { what, .. } if what.contains("state")),
    );
}

#[test]
fn bit_flipped_header_is_rejected_and_deleted() {
    check_bad_file(
        "header flip",
        |b| b[20] ^= 1,
        |e| matches!(e, Error::Checksum { what, .. } if what == "header"),
    );
}

#[test]
fn wrong_version_is_rejected_and_deleted() {
    check_bad_file(
        "version",
        |b| b[8] = 9,
        |e| matches!(e, Error::UnsupportedVersion { found: 9, .. }),
    );
}

#[test]
fn garbage_is_rejected_and_deleted() {
    check_bad_file(
        "garbage",
        |b| *b = b"KVC\x01 a ds4 file or anything else".to_vec(),
        |e| matches!(e, Error::BadMagic),
    );
}

#[test]
fn bad_files_found_at_open_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 64 << 20));
    save(&store, "good entry text", 50_000).expect("save");
    save(&store, "soon truncated", 50_000).expect("save");
    drop(store);
    let bad = dir.path().join(format!(
        "{}.rkv",
        ds4_kvcache::store::key_hex(&key_of(b"soon truncated"))
    ));
    let b = fs::read(&bad).expect("read");
    fs::write(&bad, &b[..40]).expect("truncate");
    let empty = dir.path().join(format!("{}.rkv", "ab".repeat(20)));
    fs::write(&empty, b"").expect("empty");
    let (store, warnings) = open(config(dir.path(), 64 << 20));
    assert!(!bad.exists() && !empty.exists());
    assert_eq!(warnings.lock().expect("lock").len(), 2);
    assert_eq!(store.entries().expect("entries").len(), 1);
    assert_eq!(store.stats().n_bad_deleted, 2);
}

#[test]
fn other_model_is_refused_but_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 64 << 20));
    let text = "shared prefix text";
    save(&store, text, 10_000).expect("save");
    drop(store);
    let key = key_of(text.as_bytes());

    let mut other = config(dir.path(), 64 << 20);
    other.identity = ModelIdentity {
        shape_id: ID.shape_id + 1,
        ..ID
    };
    let (store, _) = open(other);
    assert!(
        store
            .lookup(text.as_bytes(), 32768)
            .expect("lookup")
            .is_none()
    );
    let e = store.load::<Sections>(&key).expect_err("other model");
    assert!(matches!(e, Error::ModelMismatch { .. }), "{e}");
    assert!(e.to_string().contains("another model"));
    assert!(store.entry_path(&key).exists(), "a foreign file is kept");
    drop(store);

    // Other weights: accepted by default (ds4's cross-quant reuse) ...
    let mut quant = config(dir.path(), 64 << 20);
    quant.identity = ModelIdentity {
        weights_id: ID.weights_id + 1,
        ..ID
    };
    let (store, _) = open(quant.clone());
    assert!(
        store
            .lookup(text.as_bytes(), 32768)
            .expect("lookup")
            .is_some()
    );
    check_loaded(
        &store.load::<Sections>(&key).expect("cross-quant load"),
        10_000,
    );
    drop(store);
    // ... and refused with reject_different_quant.
    quant.policy.reject_different_quant = true;
    let (store, _) = open(quant);
    assert!(
        store
            .lookup(text.as_bytes(), 32768)
            .expect("lookup")
            .is_none()
    );
    let e = store.load::<Sections>(&key).expect_err("other quant");
    assert!(matches!(e, Error::WeightsMismatch { .. }), "{e}");
    assert!(store.entry_path(&key).exists());
}

#[test]
fn entry_larger_than_budget_is_not_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 1 << 20));
    let e = save(&store, "too big", 2 << 20).expect_err("too large");
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    assert!(names_with(dir.path(), ".rkv").is_empty());
    // Just under the budget (with the 1 % headroom) fits.
    save(&store, "fits", 1_000_000).expect("fits");
}

#[test]
fn space_cap_holds_under_churn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = 4u64 << 20;
    let mut cfg = config(dir.path(), budget);
    cfg.fsync = false; // Speed only: the cap does not depend on it.
    let (store, _) = open(cfg);
    let mut n_evicted = 0;
    let mut last = String::new();
    for i in 0..80u64 {
        let text = format!("session {i} {}", "x".repeat((i % 7) as usize));
        let size = 100_000 + ((i * 7919) % 9) as usize * 100_000;
        match save(&store, &text, size).expect("save") {
            SaveOutcome::Written { n_evicted: n, .. } => n_evicted += n,
            SaveOutcome::AlreadyStored { .. } => panic!("distinct texts"),
        }
        // Loads create sidecars, which must fit as well.
        if i % 3 == 0 {
            let l = store
                .lookup_load::<Sections>(text.as_bytes(), 32768)
                .expect("load");
            assert!(l.is_some(), "the newest entry is never the victim");
        }
        let usage = store.usage_bytes().expect("usage");
        assert!(usage <= budget, "iteration {i}: {usage} > {budget}");
        assert!(dir_bytes(dir.path()) <= budget);
        last = text;
    }
    assert!(n_evicted > 40, "churn evicted only {n_evicted}");
    assert!(
        store
            .lookup(last.as_bytes(), 32768)
            .expect("lookup")
            .is_some()
    );
    assert!(names_with(dir.path(), ".tmp.").is_empty());
}

#[test]
fn eviction_prefers_cheap_unused_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), 1_000_000);
    cfg.fsync = false;
    let (store, _) = open(cfg);
    // Same tokens and sizes: only the hits differ.
    let save = |text: &str| {
        let payload = payload_for(text.as_bytes(), 400_000);
        store.save(&SaveRequest {
            text: text.as_bytes(),
            tokens: &[1; 100],
            ctx_size: 32768,
            reason: SaveReason::Cold,
            payload: &payload,
        })
    };
    save("popular").expect("save");
    save("unused").expect("save");
    for _ in 0..3 {
        store.load::<Sections>(&key_of(b"popular")).expect("load");
    }
    save("newcomer").expect("save");
    let keys: Vec<_> = store
        .entries()
        .expect("entries")
        .iter()
        .map(|e| e.key)
        .collect();
    assert!(keys.contains(&key_of(b"popular")));
    assert!(keys.contains(&key_of(b"newcomer")));
    assert!(!keys.contains(&key_of(b"unused")));
}

#[test]
fn orphans_are_cleaned_at_open_but_live_temps_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 64 << 20));
    save(&store, "kept", 10_000).expect("save");
    drop(store);
    let hex = "cd".repeat(20);
    let dead = dir.path().join(format!("{hex}.rkv.tmp.4242.0"));
    fs::write(&dead, vec![7u8; 5000]).expect("dead temp");
    let meta_tmp = dir.path().join(format!("{hex}.meta.tmp.4242.1"));
    fs::write(&meta_tmp, b"x").expect("meta temp");
    let orphan_meta = dir.path().join(format!("{hex}.meta"));
    fs::write(&orphan_meta, [0u8; 32]).expect("orphan meta");
    // A temp file whose writer is alive holds a flock on it.
    let live = dir.path().join(format!("{}.rkv.tmp.1.2", "ef".repeat(20)));
    let live_file = fs::File::create(&live).expect("live temp");
    rustix::fs::flock(&live_file, rustix::fs::FlockOperation::LockExclusive).expect("flock");
    let foreign = dir.path().join("notes.txt");
    fs::write(&foreign, b"not ours").expect("foreign");

    let (store, _) = open(config(dir.path(), 64 << 20));
    assert!(!dead.exists() && !meta_tmp.exists() && !orphan_meta.exists());
    assert!(live.exists(), "a temp file being written must survive");
    assert!(foreign.exists(), "files that are not ours are left alone");
    assert_eq!(store.stats().n_orphans_deleted, 3);
    assert_eq!(store.entries().expect("entries").len(), 1);
}

#[test]
fn two_stores_share_a_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = 2u64 << 20;
    let (a, _) = open(config(dir.path(), budget));
    let (b, _) = open(config(dir.path(), budget));
    save(&a, "written by a", 600_000).expect("save");
    // b sees a's entry through the generation counter, without reopening.
    let l = b
        .lookup_load::<Sections>(b"written by a, continued", 32768)
        .expect("load")
        .expect("hit");
    check_loaded(&l, 600_000);
    // b fills the budget; a's index follows the evictions.
    for i in 0..4 {
        save(&b, &format!("written by b {i}"), 600_000).expect("save");
    }
    assert!(dir_bytes(dir.path()) <= budget);
    let a_entries = a.entries().expect("entries");
    let on_disk = names_with(dir.path(), ".rkv").len();
    assert_eq!(a_entries.len(), on_disk);
    assert!(a.stats().n_rescans >= 2);
    // A stale hit (entry evicted after the lookup) is a clean miss, not an error.
    let hit = a
        .lookup(b"written by b 3", 32768)
        .expect("lookup")
        .expect("hit");
    b.remove(&hit.entry.key).expect("remove");
    assert!(matches!(
        a.load::<Sections>(&hit.entry.key),
        Err(Error::NotFound { .. })
    ));
    assert!(
        a.lookup_load::<Sections>(b"written by b 3", 32768)
            .expect("load")
            .is_none()
    );
}

#[test]
fn lookup_falls_back_to_a_shorter_prefix_when_the_longest_is_bad() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, warnings) = open(config(dir.path(), 64 << 20));
    let short = "<｜User｜>shared system prompt";
    let long = "<｜User｜>shared system prompt and a long conversation";
    save(&store, short, 50_000).expect("save");
    save(&store, long, 50_000).expect("save");
    let path = store.entry_path(&key_of(long.as_bytes()));
    let mut b = fs::read(&path).expect("read");
    let at = b.len() / 2;
    b[at] ^= 0x80;
    fs::write(&path, &b).expect("write");

    let prompt = format!("{long}<｜Assistant｜>");
    let l = store
        .lookup_load::<Sections>(prompt.as_bytes(), 32768)
        .expect("load")
        .expect("the shorter entry");
    assert_eq!(l.text, short.as_bytes());
    check_loaded(&l, 50_000);
    assert!(!path.exists());
    assert_eq!(
        warnings.lock().expect("lock").len(),
        2,
        "delete + skip warnings"
    );
}

#[test]
fn session_state_round_trips_through_a_file() {
    use ds4_model::SessionState;
    use ds4_model::state::LayerState;

    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = open(config(dir.path(), 64 << 20));
    let ratios = [0usize, 0, 4, 128, 4, 128];
    let layers = ratios
        .iter()
        .enumerate()
        .map(|(il, &r)| {
            let mut l = LayerState::new(r, 16, 32, 8);
            for (k, v) in l.raw.iter_mut().enumerate() {
                *v = ((il * 7919 + k) as f32).sin();
            }
            if let Some(c) = l.attn_compressor.as_mut() {
                c.state_kv[3] = 1.5;
                c.state_score[0] = -2.0;
            }
            if r == 4 {
                l.comp_rows = vec![0.25; 2 * 32];
                l.index_rows = vec![-0.5; 2 * 8];
            }
            l
        })
        .collect();
    let state = SessionState {
        tokens: (0..600).collect(),
        layers,
        logits: (0..1000).map(|i| i as f32 * 0.001).collect(),
    };
    let text = "<｜begin▁of▁sentence｜>rendered prompt";
    // A protocol layer's extra section (ds4's tool-id map) travels beside the state.
    let mut ktm = Sections::default();
    ktm.push("ktm", b"call_1 -> <dsml>".to_vec());
    store
        .save(&SaveRequest {
            text: text.as_bytes(),
            tokens: &state.tokens,
            ctx_size: 4096,
            reason: SaveReason::Cold,
            payload: &(&state, &ktm),
        })
        .expect("save");
    let l = store
        .lookup_load::<SessionState>(format!("{text} more").as_bytes(), 4096)
        .expect("load")
        .expect("hit");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(l.state.tokens, state.tokens);
    assert_eq!(l.extra, ktm);
    assert_eq!(bits(&l.state.logits), bits(&state.logits));
    for (a, b) in l.state.layers.iter().zip(&state.layers) {
        assert_eq!(bits(&a.raw), bits(&b.raw));
        assert_eq!(bits(&a.comp_rows), bits(&b.comp_rows));
        assert_eq!(bits(&a.index_rows), bits(&b.index_rows));
        assert_eq!(
            a.attn_compressor.as_ref().map(|c| bits(&c.state_kv)),
            b.attn_compressor.as_ref().map(|c| bits(&c.state_kv))
        );
        assert_eq!(
            a.indexer_compressor.as_ref().map(|c| bits(&c.state_score)),
            b.indexer_compressor.as_ref().map(|c| bits(&c.state_score))
        );
    }
}
