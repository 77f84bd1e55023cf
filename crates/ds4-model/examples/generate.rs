//! Greedy generation from token ids, with timings: the smallest complete use of the API.
//!
//! ```text
//! cargo run --release -p ds4-model --example generate -- MODEL [N_GEN] [TOKEN_ID ...] [--no-qat-sim]
//! ```
//! `MODEL` is a `.gguf` file or a Hugging Face checkpoint directory. Tiny test models need
//! `--no-qat-sim` when their indexer head dim is not a power of two.

use std::time::Instant;

use ds4_model::{LoadOptions, Model, Session};

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let qat_sim = !args.iter().any(|a| a == "--no-qat-sim");
    args.retain(|a| a != "--no-qat-sim");
    let Some(path) = args.first() else {
        eprintln!("usage: generate MODEL [N_GEN] [TOKEN_ID ...] [--no-qat-sim]");
        std::process::exit(2);
    };
    let n_gen: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let mut prompt: Vec<u32> = args
        .iter()
        .skip(2)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;

    let t0 = Instant::now();
    let model = Model::load(
        path.as_ref(),
        &LoadOptions {
            qat_sim,
            ..LoadOptions::default()
        },
    )?;
    let cfg = model.config();
    println!(
        "loaded {path} in {:.2}s: {} layers, d={}, vocab={}, ratios={:?}",
        t0.elapsed().as_secs_f64(),
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_vocab,
        cfg.compress_ratios
    );
    if prompt.is_empty() {
        prompt = vec![cfg.bos_token_id.unwrap_or(0)];
    }
    let mut session = Session::new(&model, prompt.len() + n_gen);
    let t1 = Instant::now();
    session.feed(&prompt)?;
    let dt = t1.elapsed().as_secs_f64();
    println!(
        "prefill: {} tokens in {dt:.3}s ({:.2} tok/s)",
        prompt.len(),
        prompt.len() as f64 / dt
    );
    let t2 = Instant::now();
    let mut out = Vec::new();
    for _ in 0..n_gen {
        let next = argmax(session.logits()?);
        out.push(next);
        session.feed(&[next])?;
    }
    let dt = t2.elapsed().as_secs_f64();
    println!(
        "decode: {n_gen} tokens in {dt:.3}s ({:.2} tok/s)",
        n_gen as f64 / dt
    );
    println!("tokens: {out:?}");
    Ok(())
}
