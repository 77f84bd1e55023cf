//! Encode throughput of `ds4_model::tokenizer` next to Hugging Face's `tokenizers` crate on
//! the same text and the same official DeepSeek V4 `tokenizer.json`.
//!
//! Ids: `tokenizer_encode/<impl>/<whole|per_line>`. Throughput is input UTF-8 bytes, so
//! criterion prints MB/s. Both run single-threaded and neither recognises special tokens
//! in the text: lines containing an added token's text are dropped from the corpus so that
//! both encoders see plain text. Before timing, the token ids of both are compared once
//! and the bench panics if they differ, so the numbers compare equal work.
//!
//! `whole` encodes the ~8 MiB corpus in one call; `per_line` calls the encoder once per
//! line (the shape of chat and API traffic, and the fair one for the HF crate, whose
//! single-huge-string path allocates offsets for every token).
//!
//! ```text
//! TOKENIZERS_PARALLELISM=false cargo bench -p ds4-benches --features peer-tokenizers --bench tokenizer
//! ```

use std::hint::black_box;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ds4_model::tokenizer::Tokenizer;

/// Size the corpus is repeated up to (the ignored `bench` test in ds4-model uses the same).
const CORPUS_BYTES: usize = 8 << 20;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The official V4 `tokenizer.json`, unpacked from the committed fixture.
fn tokenizer_json() -> Vec<u8> {
    let gz = std::fs::read(repo_root().join("tests/fixtures/tokenizer/tokenizer.json.gz"))
        .expect("read tests/fixtures/tokenizer/tokenizer.json.gz");
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut out)
        .expect("gunzip tokenizer.json");
    out
}

/// Mixed text from committed files: English prose (docs), Rust code (the tokenizer's own
/// source) and the conformance cases (CJK, emoji, digits, whitespace runs, accents),
/// repeated to [`CORPUS_BYTES`]. Lines holding an added token's text are dropped.
fn corpus(added: &[String]) -> String {
    let root = repo_root();
    let mut text = String::new();
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("read docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    docs.push(root.join("crates/ds4-model/src/tokenizer.rs"));
    for p in docs {
        text.push_str(&std::fs::read_to_string(&p).expect("read corpus file"));
        text.push('\n');
    }
    let cases = std::fs::read(root.join("tests/fixtures/tokenizer/encode.json"))
        .expect("read tests/fixtures/tokenizer/encode.json");
    let doc: serde_json::Value = serde_json::from_slice(&cases).expect("encode.json parses");
    for c in doc["cases"].as_array().expect("cases array") {
        text.push_str(c["text"].as_str().expect("case text"));
        text.push('\n');
    }
    let text: String = text
        .split_inclusive('\n')
        .filter(|l| !added.iter().any(|a| l.contains(a.as_str())))
        .collect();
    text.repeat(CORPUS_BYTES / text.len().max(1) + 1)
}

fn hf_ids(hf: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    hf.encode_fast(text, false)
        .expect("HF encode")
        .get_ids()
        .to_vec()
}

fn bench_encode(c: &mut Criterion) {
    let json = tokenizer_json();
    let ours = Tokenizer::from_tokenizer_json(&json).expect("load ds4 tokenizer");
    let hf = tokenizers::Tokenizer::from_bytes(&json).expect("load HF tokenizer");
    let added: Vec<String> = hf
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .filter(|s| !s.is_empty())
        .collect();
    let text = corpus(&added);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();

    // Equal work: same ids on the whole text and on every line.
    let a = ours.encode(&text, false);
    let b = hf_ids(&hf, &text);
    assert!(
        a == b,
        "ds4 and HF tokenizers disagree on the whole corpus: {} vs {} tokens",
        a.len(),
        b.len()
    );
    let (mut na, mut nb) = (0usize, 0usize);
    for (i, l) in lines.iter().enumerate() {
        let (x, y) = (ours.encode(l, false), hf_ids(&hf, l));
        assert!(x == y, "ds4 and HF tokenizers disagree on line {i}: {l:?}");
        na += x.len();
        nb += y.len();
    }
    assert_eq!(na, nb);
    eprintln!(
        "corpus: {} bytes, {} lines, {} tokens whole, {} tokens per line; ids agree",
        text.len(),
        lines.len(),
        a.len(),
        na
    );

    let mut g = c.benchmark_group("tokenizer_encode");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("ds4/whole", |bch| {
        bch.iter(|| black_box(ours.encode(black_box(&text), false)).len())
    });
    g.bench_function("hf_tokenizers/whole", |bch| {
        bch.iter(|| black_box(hf.encode_fast(black_box(text.as_str()), false)))
    });
    g.bench_function("ds4/per_line", |bch| {
        let mut out = Vec::new();
        bch.iter(|| {
            let mut n = 0;
            for l in &lines {
                out.clear();
                ours.encode_into(black_box(l), false, &mut out);
                n += out.len();
            }
            n
        })
    });
    g.bench_function("hf_tokenizers/per_line", |bch| {
        bch.iter(|| {
            let mut n = 0;
            for l in &lines {
                n += hf
                    .encode_fast(black_box(*l), false)
                    .expect("HF encode")
                    .len();
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
