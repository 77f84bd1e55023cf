//! Opening the full-shape DeepSeek V4 Flash q2 GGUF (the sparse file written by
//! `/work/shared/tools/gen_flash_sparse_gguf.py`): counts, sizes and the time to open it.
//!
//! `DS4_FLASH_SPARSE=/path/flash-q2-sparse.gguf cargo test --release -p ds4-tensor \
//!  --test gguf_flash_sparse -- --ignored --nocapture`

use std::time::{Duration, Instant};

use ds4_tensor::DType;
use ds4_tensor::gguf::GgufFile;

#[test]
#[ignore = "slow"]
fn open_flash_sparse() {
    let Some(path) = std::env::var_os("DS4_FLASH_SPARSE") else {
        eprintln!("DS4_FLASH_SPARSE not set: skipping");
        return;
    };
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let started = Instant::now();
        let g = GgufFile::open(&path).expect("opens");
        best = best.min(started.elapsed());
        drop(g);
    }
    let g = GgufFile::open(&path).expect("opens");
    eprintln!("open (header, 49 records, 1328 tensor infos; warm page cache): best of 5 {best:?}");

    assert_eq!(g.version(), 3);
    assert_eq!(g.tensors().len(), 1328);
    let total: u64 = g.tensors().iter().map(|t| t.n_bytes).sum();
    assert_eq!(
        total, 86_714_775_900,
        "FORMATS.md s3.4: q2 tensor data bytes"
    );
    let by_type = g.totals_by_type();
    let count = |d: DType| by_type.iter().find(|e| e.0 == d).map_or(0, |e| e.1);
    assert_eq!(
        (count(DType::Iq2Xxs), count(DType::Q2K), count(DType::Q8_0)),
        (86, 43, 345)
    );
    assert_eq!(
        (count(DType::F16), count(DType::F32), count(DType::I32)),
        (359, 492, 3)
    );

    let started = Instant::now();
    let tokens = g.get_str_array("tokenizer.ggml.tokens").expect("tokens");
    let merges = g.get_str_array("tokenizer.ggml.merges").expect("merges");
    eprintln!(
        "tokens ({}) and merges ({}) as &str: {:?}",
        tokens.len(),
        merges.len(),
        started.elapsed()
    );
    assert_eq!(tokens.len(), 129_280);
    assert!(tokens.contains(&"<｜begin▁of▁sentence｜>"));
    assert_eq!(g.get_u32("deepseek4.block_count").expect("block_count"), 43);
    assert!(
        g.get_u32_array("deepseek4.attention.compress_ratios")
            .expect("ratios")
            .len()
            >= 43
    );
    let t = g
        .tensor("blk.0.ffn_gate_exps.weight")
        .expect("expert tensor");
    assert!(t.bytes.is_mapped());
    assert_eq!(t.dtype, DType::Iq2Xxs);
    assert_eq!(t.shape.dims(), [4096, 2048, 256]);
}
