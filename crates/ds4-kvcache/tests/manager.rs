//! The engine-facing cache ([`DiskCache`]) on the embedded demo model, with small policy
//! knobs so every save moment happens within a few hundred tokens: continued saves during
//! prefill and during decoding, the evict save (a new conversation, or the engine dropping
//! the session), restore of the longest prefix, and consume-after-load.
//!
//! Expected values are never hand-written: a restored session must continue exactly as the
//! session that was saved (same greedy tokens, bit-identical logits).

use std::sync::Arc;

use ds4_kvcache::{DiskCache, DiskCacheConfig, Policy, SaveReason, model_identity};
use ds4_model::generate::{self, GenOptions, Outcome};
use ds4_model::sampling::SamplingParams;
use ds4_model::tokenizer::Tokenizer;
use ds4_model::{LoadOptions, Model, Session};

fn policy() -> Policy {
    Policy {
        min_tokens: 16,
        cold_max_tokens: 1000,
        continued_interval_tokens: 32,
        boundary_trim_tokens: 4,
        boundary_align_tokens: 16,
        reject_different_quant: false,
    }
}

fn open(dir: &std::path::Path, model: &Model, tok: &Arc<Tokenizer>, policy: Policy) -> DiskCache {
    let cfg = DiskCacheConfig {
        policy,
        fsync: false,
        ..DiskCacheConfig::new(dir)
    };
    DiskCache::open(
        &cfg,
        model_identity(model),
        tok.clone(),
        Arc::new(|m: &str| eprintln!("kv cache: {m}")),
    )
    .expect("open cache")
}

fn greedy(n: usize) -> GenOptions {
    GenOptions {
        sampling: SamplingParams::greedy(),
        max_tokens: n,
        thinking: false,
        prefill_chunk: 16,
        ..GenOptions::default()
    }
}

/// One generation through the cache, as the server and the CLI run it.
fn run(
    cache: &DiskCache,
    session: &mut Session<'_>,
    tok: &Tokenizer,
    prompt: &[u32],
    n: usize,
) -> (ds4_kvcache::Prepared, Outcome) {
    let p = cache
        .before_generate(session, None, prompt, None, &mut |_, _| {})
        .expect("before_generate");
    let out = generate::generate_observed(
        session,
        tok,
        prompt,
        &greedy(n),
        None,
        &mut |_, _| {},
        &mut |_| {},
        &mut |s| {
            cache.after_token(s);
        },
    )
    .expect("generate");
    (p, out)
}

fn text_prompt(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(
        &format!("<｜begin▁of▁sentence｜><｜User｜>{text}<｜Assistant｜></think>"),
        true,
    )
}

fn fixture() -> (Model, Arc<Tokenizer>) {
    let model = ds4_model::demo::model(&LoadOptions::default()).expect("demo model");
    let tok = ds4_model::demo::tokenizer().expect("demo tokenizer");
    (model, tok)
}

fn entries(cache: &DiskCache) -> Vec<(usize, SaveReason)> {
    let mut v: Vec<_> = cache
        .store()
        .entries()
        .expect("entries")
        .iter()
        .map(|e| (e.n_tokens as usize, e.reason))
        .collect();
    v.sort_by_key(|e| e.0);
    v
}

#[test]
fn continued_saves_in_prefill_and_decode_restore_exactly() {
    let (model, tok) = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let prompt = text_prompt(
        &tok,
        &"The quick brown fox jumps over the lazy dog near the river bank. ".repeat(6),
    );
    assert!(prompt.len() > 70 && prompt.len() < 128, "{}", prompt.len());
    let n_gen = 140 - prompt.len();
    let pol = policy();
    let step = pol.continued_step();
    assert_eq!(step, 32);

    let cache = open(dir.path(), &model, &tok, pol.clone());
    let mut s = Session::new(&model, 512);
    let p = cache
        .before_generate(&mut s, None, &prompt, None, &mut |_, _| {})
        .expect("before_generate");
    // The logits of the live session at 128 tokens, for the bit-exact check below.
    let mut at_128 = None;
    let mut stalls = Vec::new();
    let out = generate::generate_observed(
        &mut s,
        &tok,
        &prompt,
        &greedy(n_gen),
        None,
        &mut |_, _| {},
        &mut |_| {},
        &mut |s| {
            if let Some(d) = cache.after_token(s) {
                stalls.push((s.n_past(), d));
            }
            if s.n_past() == 128 {
                at_128 = Some(s.logits().expect("logits").to_vec());
            }
        },
    )
    .expect("generate");
    assert_eq!(out.tokens.len(), n_gen);
    // One save at each frontier crossed while decoding (the session ends at 140 tokens).
    let decode_frontiers: Vec<usize> = (prompt.len() / step + 1..)
        .map(|k| k * step)
        .take_while(|&m| m <= 140)
        .collect();
    assert!(decode_frontiers.contains(&128));
    assert_eq!(
        stalls.iter().map(|e| e.0).collect::<Vec<_>>(),
        decode_frontiers
    );
    assert!(p.restored.is_none());
    // Prefill stopped at every continued frontier inside the prompt, and at the cold point.
    let cold = pol.store_len(prompt.len());
    let mut want: Vec<usize> = (1..=prompt.len() / step).map(|k| k * step).collect();
    want.push(cold);
    want.sort_unstable();
    want.dedup();
    let got: Vec<usize> = p.saves.iter().map(|&(_, n)| n).collect();
    assert_eq!(got, want);
    assert_eq!(p.prefed, *want.last().expect("a save"));
    let live = s.tokens().to_vec();
    let saved = cache.shutdown(&s);
    assert_eq!(saved, Some(live.len()));
    let st = cache.stats();
    assert_eq!(st.saves_failed, 0);
    assert!(st.snapshots as usize >= want.len() + 2);

    // On disk: the prompt frontiers, the decode frontier 128 (reached while generating,
    // reason continued) and the shutdown save of the whole session.
    let on_disk = entries(&cache);
    assert!(
        on_disk.contains(&(128, SaveReason::Continued)),
        "{on_disk:?}"
    );
    assert!(
        on_disk.contains(&(live.len(), SaveReason::Shutdown)),
        "{on_disk:?}"
    );
    for n in &want {
        assert!(
            on_disk.iter().any(|e| e.0 == *n),
            "{n} missing in {on_disk:?}"
        );
    }

    // A new process restores the decode-time checkpoint for a prompt that is the first 128
    // tokens of the session, and continues exactly as the original session did.
    let cache2 = open(dir.path(), &model, &tok, pol);
    let mut s2 = Session::new(&model, 512);
    let head = &live[..128];
    let (p2, out2) = run(&cache2, &mut s2, &tok, head, live.len() - 128);
    let r = p2.restored.expect("restored from disk");
    assert_eq!(r.n_tokens, 128);
    assert_eq!(out2.usage.cached_tokens, 128);
    assert_eq!(out2.timings.prefill_tokens, 0);
    assert_eq!(out2.tokens, live[128..]);
    assert_eq!(cache2.stats().hits, 1);
    assert_eq!(cache2.stats().reused_tokens, 128);

    // And the restored state's logits are bit-identical to the original's at 128 tokens.
    let mut s3 = Session::new(&model, 512);
    let p3 = cache2
        .before_generate(&mut s3, None, head, None, &mut |_, _| {})
        .expect("before_generate");
    assert!(p3.restored.is_some());
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(s3.logits().expect("logits")),
        bits(&at_128.expect("logits at 128"))
    );
}

#[test]
fn evict_saves_the_replaced_conversation_and_it_comes_back() {
    let (model, tok) = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    // No cold or continued saves: only evict and shutdown write here.
    let pol = Policy {
        cold_max_tokens: 0,
        continued_interval_tokens: 0,
        ..policy()
    };
    let cache = open(dir.path(), &model, &tok, pol.clone());
    let mut s = Session::new(&model, 512);
    let a = text_prompt(&tok, &"Tell me about apples and pears, please. ".repeat(3));
    let b = text_prompt(
        &tok,
        &"Completely unrelated: the history of ships. ".repeat(3),
    );
    let (pa, out_a) = run(&cache, &mut s, &tok, &a, 6);
    assert!(pa.saves.is_empty() && pa.evicted.is_none());
    let conv_a = s.tokens().to_vec();
    // Every generated token was fed (the loop stopped on the budget, not on EOS).
    assert_eq!(conv_a.len(), a.len() + out_a.tokens.len());
    let state_a = s.snapshot();

    // An unrelated prompt replaces the live session: it is saved first.
    let (pb, _) = run(&cache, &mut s, &tok, &b, 4);
    assert_eq!(pb.evicted, Some(conv_a.len()));
    assert!(pb.restored.is_none());
    // The engine drops the session itself (`/clear`): evict save too.
    let conv_b = s.tokens().to_vec();
    assert_eq!(cache.evict(&s), Some(conv_b.len()));
    s.reset();
    // Too short to be worth saving: nothing.
    let mut short = Session::new(&model, 512);
    short.feed(&a[..8]).expect("feed");
    assert_eq!(cache.evict(&short), None);
    assert_eq!(cache.shutdown(&s), None);
    let mut want = vec![
        (conv_a.len(), SaveReason::Evict),
        (conv_b.len(), SaveReason::Evict),
    ];
    want.sort_by_key(|e| e.0);
    assert_eq!(entries(&cache), want);

    // Conversation A continues later (another process): restored from the evict save, and
    // the answer equals the one of a session that never stopped.
    let mut next = conv_a.clone();
    next.push(tok.specials().eos);
    next.extend(tok.encode("<｜User｜>And cherries?<｜Assistant｜></think>", true));
    let cache2 = open(dir.path(), &model, &tok, pol);
    let mut s2 = Session::new(&model, 512);
    let (p2, out2) = run(&cache2, &mut s2, &tok, &next, 5);
    assert_eq!(p2.restored.map(|r| r.n_tokens), Some(conv_a.len()));
    let mut fresh = Session::new(&model, 512);
    fresh.restore(&state_a);
    let reference = generate::generate(
        &mut fresh,
        &tok,
        &next,
        &greedy(5),
        None,
        &mut |_, _| {},
        &mut |_| {},
    )
    .expect("generate");
    assert_eq!(out2.tokens, reference.tokens);
}

#[test]
fn a_consumed_entry_goes_once_its_successor_is_durable() {
    let (model, tok) = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    // Entries longer than 40 tokens are consumed after loading.
    let pol = Policy {
        cold_max_tokens: 40,
        continued_interval_tokens: 0,
        ..policy()
    };
    let prompt = text_prompt(&tok, &"A long shared document about rivers. ".repeat(9));
    assert!(prompt.len() > 40);
    let cache = open(dir.path(), &model, &tok, pol.clone());
    let mut s = Session::new(&model, 512);
    run(&cache, &mut s, &tok, &prompt, 3);
    let first = s.tokens().to_vec();
    assert_eq!(cache.shutdown(&s), Some(first.len()));
    assert_eq!(entries(&cache), vec![(first.len(), SaveReason::Shutdown)]);

    // Restored (longer than cold_max: to be consumed), but kept until a successor exists.
    let cache2 = open(dir.path(), &model, &tok, pol);
    let mut s2 = Session::new(&model, 512);
    let mut next = first.clone();
    next.extend(tok.encode(" more", false));
    let (p, _) = run(&cache2, &mut s2, &tok, &next, 3);
    assert_eq!(p.restored.map(|r| r.n_tokens), Some(first.len()));
    assert!(entries(&cache2).iter().any(|e| e.0 == first.len()));
    // The shutdown save extends it: once written, the consumed entry is gone.
    let second = s2.tokens().to_vec();
    assert_eq!(cache2.shutdown(&s2), Some(second.len()));
    assert_eq!(entries(&cache2), vec![(second.len(), SaveReason::Shutdown)]);
}

#[test]
fn entries_of_another_model_or_quant_are_refused_by_the_engine_path() {
    let (model, tok) = fixture();
    let dir = tempfile::tempdir().expect("tempdir");
    let pol = Policy {
        cold_max_tokens: 0,
        continued_interval_tokens: 0,
        ..policy()
    };
    let prompt = text_prompt(&tok, &"Shared context for identity checks. ".repeat(4));
    let cache = open(dir.path(), &model, &tok, pol.clone());
    let mut s = Session::new(&model, 512);
    s.feed(&prompt).expect("feed");
    assert_eq!(cache.shutdown(&s), Some(prompt.len()));

    // Variants of the demo model built from its weights: another quantization (one tensor's
    // type, in the last layer) and another model of the same shape (one norm value).
    let variant = |edit: &dyn Fn(&mut ds4_model::weights::Weights)| {
        let mut w = model.weights().clone();
        edit(&mut w);
        Model::from_parts(
            model.config().clone(),
            w,
            Arc::new(ds4_model::cpu::CpuBackend),
            &LoadOptions::default(),
        )
        .expect("model")
    };
    let last = model.weights().layers.len() - 1;
    let quant = variant(&|w| w.layers[last].ffn_up_shexp.dtype = ds4_tensor::DType::Q8_0);
    let other = variant(&|w| w.output_norm[3] *= 1.5);
    let restored = |m: &Model, reject_quant: bool| {
        let p = Policy {
            reject_different_quant: reject_quant,
            ..pol.clone()
        };
        let c = open(dir.path(), m, &tok, p);
        let mut s = Session::new(m, 512);
        let r = c
            .before_generate(&mut s, None, &prompt, None, &mut |_, _| {})
            .expect("before_generate")
            .restored
            .map(|r| r.n_tokens);
        (r, c.stats())
    };
    // Same model: restored.
    assert_eq!(restored(&model, true).0, Some(prompt.len()));
    // Another quantization: reused by default (as ds4), refused when asked to.
    assert_eq!(restored(&quant, false).0, Some(prompt.len()));
    let (r, st) = restored(&quant, true);
    assert_eq!(r, None);
    assert_eq!((st.hits, st.misses), (0, 1));
    // Another model of the same shape: never.
    assert_eq!(restored(&other, false).0, None);
    // Refused files are kept (a process running that model may share the directory).
    assert_eq!(entries(&cache).len(), 1);
}
