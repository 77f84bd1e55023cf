//! The GGUF path: a fixture checkpoint re-written as a ds4-layout GGUF (GGUF names, the
//! `deepseek4.*` metadata recorded in the fixture's manifest, the same BF16 bytes) must load
//! through `ds4_tensor::gguf` and give bit-identical logits to the checkpoint path.

use std::path::{Path, PathBuf};

use ds4_model::checkpoint::Checkpoint;
use ds4_model::weights::TensorSource;
use ds4_model::{LoadOptions, Model, Session};
use ds4_tensor::gguf::{GgufWriter, OwnedArray, OwnedValue};
use serde_json::Value;

fn first_fixture() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/model");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.retain(|d| {
        d.join("manifest.json").is_file() && d.join("checkpoint/config.json").is_file()
    });
    dirs.sort();
    dirs.into_iter().next()
}

fn to_value(v: &Value) -> OwnedValue {
    match v {
        Value::Bool(b) => OwnedValue::Bool(*b),
        Value::String(s) => OwnedValue::String(s.clone()),
        Value::Number(n) if n.is_u64() => OwnedValue::U32(n.as_u64().expect("u64") as u32),
        Value::Number(n) => OwnedValue::F32(n.as_f64().expect("number") as f32),
        Value::Array(a) if a.iter().all(Value::is_u64) => OwnedValue::Array(OwnedArray::I32(
            a.iter().map(|x| x.as_u64().expect("u64") as i32).collect(),
        )),
        Value::Array(a) => OwnedValue::Array(OwnedArray::F32(
            a.iter()
                .map(|x| x.as_f64().expect("number") as f32)
                .collect(),
        )),
        other => panic!("unexpected metadata value {other}"),
    }
}

#[test]
fn gguf_and_checkpoint_give_identical_logits() {
    let Some(dir) = first_fixture() else {
        println!("no fixture: skipped");
        return;
    };
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("manifest.json")).expect("manifest"),
    )
    .expect("json");
    let ck = Checkpoint::open(&dir.join("checkpoint")).expect("checkpoint");
    let mut w = GgufWriter::new();
    for (k, v) in manifest["gguf_metadata"]
        .as_object()
        .expect("gguf_metadata object")
    {
        w.add(k, to_value(v)).expect("metadata");
    }
    let tensors: Vec<_> = ck
        .names()
        .iter()
        .map(|n| ck.tensor(n).expect("listed"))
        .collect();
    for t in &tensors {
        w.add_tensor(&t.name, t.dtype, t.shape.dims(), t.data())
            .expect("tensor");
    }
    let path =
        std::env::temp_dir().join(format!("ds4-model-gguf-load-{}.gguf", std::process::id()));
    w.write_file(&path).expect("write gguf");

    let opts = LoadOptions {
        qat_sim: false,
        ..LoadOptions::default()
    };
    let from_gguf = Model::load(&path, &opts).expect("load gguf");
    let from_ck = Model::load(&dir.join("checkpoint"), &opts).expect("load checkpoint");
    assert_eq!(from_gguf.config(), from_ck.config());
    let prompt: Vec<u32> = (0..40u32)
        .map(|i| (i * 37 + 5) % from_ck.config().n_vocab as u32)
        .collect();
    let mut a = Session::new(&from_gguf, 64);
    let mut b = Session::new(&from_ck, 64);
    let la = a.feed_all_logits(&prompt).expect("gguf feed");
    let lb = b.feed_all_logits(&prompt).expect("checkpoint feed");
    let _ = std::fs::remove_file(&path);
    assert_eq!(la, lb);
}
