//! Real-shape smoke test: loads the GGUF named by `DS4_TEST_MODEL` (a ds4 Flash file, or the
//! sparse full-shape file of `gen_flash_sparse_gguf.py`), prefills a few tokens with the
//! simulation on, decodes two more, and checks the logits are finite and that chunked prefill
//! and decode agree. Slow; skipped without the variable.

use ds4_model::{LoadOptions, Model, Session};

#[test]
#[ignore = "slow"]
fn real_model_prefill_and_decode() {
    let Ok(path) = std::env::var("DS4_TEST_MODEL") else {
        println!("DS4_TEST_MODEL not set: skipped");
        return;
    };
    let model = Model::load(path.as_ref(), &LoadOptions::default()).expect("load DS4_TEST_MODEL");
    let bos = model.config().bos_token_id.unwrap_or(0);
    let prompt = [bos, 100, 2000, 30000];
    let mut a = Session::new(&model, 16);
    a.feed(&prompt).expect("prefill");
    let mut b = Session::new(&model, 16);
    for &t in &prompt {
        b.feed(&[t]).expect("decode");
    }
    let la = a.logits().expect("logits");
    assert!(la.iter().all(|v| v.is_finite()));
    assert_eq!(la, b.logits().expect("logits"));
}
