//! The GGUF reader and writer against gguf-py (PyPI gguf 0.19.0), in both directions.
//!
//! * `pywritten.gguf` was written by gguf-py's `GGUFWriter`; `pywritten.json` is what
//!   gguf-py's `GGUFReader` reads from it. Our reader must read the same, and our writer,
//!   given the same content, must produce the same bytes.
//! * `rswritten.gguf` was written by our writer (rebuilt here; `DS4_BLESS=1` rewrites it);
//!   `rswritten.json` is what gguf-py reads from it, which must be what we wrote.
//!
//! Regenerate: `DS4_BLESS=1 cargo test -p ds4-tests --test gguf_fixtures`, then
//! `/root/venv-ds4/bin/python tests/fixtures/gguf/make_fixtures.py`.

use std::path::PathBuf;

use ds4_tensor::DType;
use ds4_tensor::gguf::{GgufFile, GgufWriter, OwnedArray, OwnedValue};
use serde_json::Value as Json;

fn fixture(name: &str) -> PathBuf {
    ds4_tests::fixtures_dir().join("gguf").join(name)
}

fn load_json(name: &str) -> Json {
    let text = std::fs::read_to_string(fixture(name)).expect("committed fixture");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digits"))
        .collect()
}

/// Builds the owned value that a JSON value of GGUF type `ty` ("UINT32", "ARRAY[STRING]",
/// "ARRAY[ARRAY[INT32]]") stands for.
fn owned_from_json(ty: &str, v: &Json) -> OwnedValue {
    let u = || v.as_u64().expect("unsigned");
    let i = || v.as_i64().expect("signed");
    let f = || v.as_f64().expect("float");
    match ty {
        "UINT8" => OwnedValue::U8(u() as u8),
        "INT8" => OwnedValue::I8(i() as i8),
        "UINT16" => OwnedValue::U16(u() as u16),
        "INT16" => OwnedValue::I16(i() as i16),
        "UINT32" => OwnedValue::U32(u() as u32),
        "INT32" => OwnedValue::I32(i() as i32),
        // gguf-py reports the exact f32 value as a Python float: the cast is exact.
        "FLOAT32" => OwnedValue::F32(f() as f32),
        "BOOL" => OwnedValue::Bool(v.as_bool().expect("bool")),
        "STRING" => OwnedValue::String(v.as_str().expect("string").to_string()),
        "UINT64" => OwnedValue::U64(u()),
        "INT64" => OwnedValue::I64(i()),
        "FLOAT64" => OwnedValue::F64(f()),
        _ => {
            let elem = ty
                .strip_prefix("ARRAY[")
                .and_then(|t| t.strip_suffix(']'))
                .unwrap_or_else(|| panic!("unknown type {ty}"));
            OwnedValue::Array(array_from_json(elem, v))
        }
    }
}

fn array_from_json(elem: &str, v: &Json) -> OwnedArray {
    let items = v.as_array().expect("array");
    macro_rules! typed {
        ($variant:ident) => {
            OwnedArray::$variant(
                items
                    .iter()
                    .map(|x| match owned_from_json(elem, x) {
                        OwnedValue::$variant(y) => y,
                        other => panic!("{other:?} in an array of {elem}"),
                    })
                    .collect(),
            )
        };
    }
    match elem {
        "UINT8" => typed!(U8),
        "INT8" => typed!(I8),
        "UINT16" => typed!(U16),
        "INT16" => typed!(I16),
        "UINT32" => typed!(U32),
        "INT32" => typed!(I32),
        "FLOAT32" => typed!(F32),
        "BOOL" => typed!(Bool),
        "STRING" => typed!(String),
        "UINT64" => typed!(U64),
        "INT64" => typed!(I64),
        "FLOAT64" => typed!(F64),
        _ => {
            let inner = elem
                .strip_prefix("ARRAY[")
                .and_then(|t| t.strip_suffix(']'))
                .unwrap_or_else(|| panic!("unknown type {elem}"));
            OwnedArray::Array(items.iter().map(|x| array_from_json(inner, x)).collect())
        }
    }
}

/// Asserts that our reading of `g` is exactly gguf-py's description `d` of the same file.
fn check_against_gguf_py(g: &GgufFile, d: &Json) {
    assert_eq!(g.file_len(), d["file_bytes"].as_u64().expect("size"));
    assert_eq!(
        u64::from(g.version()),
        d["version"].as_u64().expect("version")
    );
    assert_eq!(g.alignment(), d["alignment"].as_u64().expect("alignment"));
    assert_eq!(
        g.data_start(),
        d["data_offset"].as_u64().expect("data offset")
    );

    let meta = d["metadata"].as_array().expect("metadata list");
    assert_eq!(g.metadata_len(), meta.len());
    for ((key, value), m) in g.metadata().zip(meta) {
        let ty = m["type"].as_str().expect("type");
        assert_eq!(key, m["key"].as_str().expect("key"));
        assert_eq!(value.type_name(), ty, "type of {key}");
        assert_eq!(
            value.to_owned_value(),
            owned_from_json(ty, &m["value"]),
            "value of {key}"
        );
    }

    let tensors = d["tensors"].as_array().expect("tensor list");
    assert_eq!(g.tensors().len(), tensors.len());
    for (info, t) in g.tensors().iter().zip(tensors) {
        let name = t["name"].as_str().expect("name");
        assert_eq!(info.name, name);
        assert_eq!(
            info.dtype.name(),
            t["type"].as_str().expect("type"),
            "{name}"
        );
        assert_eq!(
            u64::from(info.dtype.ggml_id()),
            t["type_id"].as_u64().expect("id"),
            "{name}"
        );
        let dims: Vec<u64> = t["dims"]
            .as_array()
            .expect("dims")
            .iter()
            .map(|x| x.as_u64().expect("dim"))
            .collect();
        assert_eq!(info.shape.dims(), dims.as_slice(), "{name}");
        assert_eq!(info.offset, t["offset"].as_u64().expect("offset"), "{name}");
        assert_eq!(info.n_bytes, t["bytes"].as_u64().expect("bytes"), "{name}");
        assert_eq!(
            g.tensor_range(info).start as u64,
            t["data_offset"].as_u64().expect("abs"),
            "{name}"
        );
        let tensor = g.tensor(name).expect("listed tensor");
        assert!(tensor.bytes.is_mapped());
        assert_eq!(
            tensor.data(),
            hex(t["data_hex"].as_str().expect("hex")).as_slice(),
            "{name}"
        );
    }
}

#[test]
fn our_reader_reads_what_gguf_py_wrote() {
    let g = GgufFile::open(fixture("pywritten.gguf")).expect("gguf-py's file opens");
    check_against_gguf_py(&g, &load_json("pywritten.json"));
    // A few typed accessors on real gguf-py output.
    assert_eq!(g.get_u32("deepseek4.block_count").expect("u32"), 43);
    assert_eq!(
        g.get_f32("deepseek4.attention.layer_norm_rms_epsilon")
            .expect("f32"),
        1e-6
    );
    assert!(g.get_bool("deepseek4.expert_weights_norm").expect("bool"));
    assert_eq!(
        g.get_u32_array("deepseek4.attention.compress_ratios")
            .expect("ratios")
            .len(),
        43
    );
    assert_eq!(
        g.get_f32_array("deepseek4.swiglu_clamp_exp")
            .expect("clamp"),
        vec![10.0; 43]
    );
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens").expect("tokens")[2],
        "<｜User｜>"
    );
}

#[test]
fn our_writer_writes_what_gguf_py_writes() {
    let d = load_json("pywritten.json");
    let mut w = GgufWriter::new();
    for m in d["metadata"].as_array().expect("metadata") {
        let ty = m["type"].as_str().expect("type");
        w.add(
            m["key"].as_str().expect("key"),
            owned_from_json(ty, &m["value"]),
        )
        .expect("valid record");
    }
    for t in d["tensors"].as_array().expect("tensors") {
        let dtype = DType::from_name(t["type"].as_str().expect("type")).expect("known type");
        let dims: Vec<u64> = t["dims"]
            .as_array()
            .expect("dims")
            .iter()
            .map(|x| x.as_u64().expect("dim"))
            .collect();
        w.add_tensor(
            t["name"].as_str().expect("name"),
            dtype,
            &dims,
            hex(t["data_hex"].as_str().expect("hex")),
        )
        .expect("valid tensor");
    }
    let ours = w.to_bytes().expect("in memory");
    let theirs = std::fs::read(fixture("pywritten.gguf")).expect("committed fixture");
    assert_eq!(ours.len(), theirs.len());
    assert!(
        ours == theirs,
        "our writer's bytes differ from gguf-py's for the same content"
    );
}

/// Deterministic bytes (a 64-bit LCG): the fixture must be reproducible without a crate.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Raw bytes of a tensor with finite values: f16/bf16/f32 exponents kept away from inf/NaN,
/// block scales set to finite f16 values.
fn tensor_bytes(rng: &mut Lcg, dtype: DType, n_bytes: usize) -> Vec<u8> {
    let mut b = rng.bytes(n_bytes);
    let scale = |b: &mut [u8], at: usize, rng: &mut Lcg| {
        // f16 with exponent 8..=11 (about 2^-7 .. 2^-4) and a random mantissa and sign.
        let bits = (u16::from(rng.next() & 0x80) << 8)
            | ((8 + u16::from(rng.next() % 4)) << 10)
            | u16::from(rng.next());
        b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
    };
    match dtype {
        DType::F32 => b.chunks_exact_mut(4).for_each(|c| c[3] &= 0xBF), // exponent < 0x80
        DType::F16 => b.chunks_exact_mut(2).for_each(|c| c[1] &= 0xBB), // exponent < 0x1F
        DType::BF16 => b.chunks_exact_mut(2).for_each(|c| c[1] &= 0xBF),
        DType::Q8_0 => (0..n_bytes / 34).for_each(|i| scale(&mut b, i * 34, rng)),
        DType::Q4K => (0..n_bytes / 144).for_each(|i| {
            scale(&mut b, i * 144, rng);
            scale(&mut b, i * 144 + 2, rng);
        }),
        DType::I32 => b.chunks_exact_mut(4).for_each(|c| c[2..].fill(0)),
        other => panic!("no fixture bytes for {other}"),
    }
    b
}

/// The metadata of `rswritten.gguf`: every value type, arrays of each, one nested array.
fn rs_metadata() -> Vec<(&'static str, OwnedValue)> {
    vec![
        ("general.architecture", "deepseek4".into()),
        ("general.alignment", 64u32.into()),
        (
            "general.name",
            "written by ds4-rs GgufWriter ｜DSML｜".into(),
        ),
        ("test.uint8", 7u8.into()),
        ("test.int8", (-7i8).into()),
        ("test.uint16", 7000u16.into()),
        ("test.int16", (-7000i16).into()),
        ("deepseek4.expert_count", 256u32.into()),
        ("test.int32", (-70000i32).into()),
        ("deepseek4.expert_weights_scale", 1.5f32.into()),
        ("deepseek4.hyper_connection.epsilon", 1e-6f32.into()),
        ("deepseek4.expert_weights_norm", true.into()),
        ("test.uint64", (1u64 << 63).into()),
        ("test.int64", (-(1i64 << 40)).into()),
        ("test.float64", 1e-300f64.into()),
        ("test.array.uint8", vec![1u8, 2, 3].into()),
        ("test.array.int8", vec![-1i8, 1].into()),
        ("test.array.uint16", vec![1u16, 65535].into()),
        ("test.array.int16", vec![-1i16].into()),
        (
            "deepseek4.attention.compress_ratios",
            vec![0u32, 0, 4, 128, 4].into(),
        ),
        ("test.array.int32", vec![i32::MIN, 0, i32::MAX].into()),
        ("test.array.float32", vec![0.1f32, -2.5, 1e-6].into()),
        ("test.array.bool", vec![false, true].into()),
        ("tokenizer.ggml.merges", vec!["Ġ t", "h e", "▁ ｜"].into()),
        ("test.array.uint64", vec![u64::MAX].into()),
        ("test.array.int64", vec![i64::MIN, -1].into()),
        ("test.array.float64", vec![0.25f64, 1e300].into()),
        (
            "test.array.nested",
            vec![OwnedArray::U32(vec![1, 2]), OwnedArray::U32(vec![3])].into(),
        ),
    ]
}

/// The tensors of `rswritten.gguf`: name, type, GGUF dims. Routed experts are Q4_K (a q4 file).
const RS_TENSORS: &[(&str, DType, &[u64])] = &[
    ("token_embd.weight", DType::F16, &[8, 3]),
    ("output_norm.weight", DType::F32, &[5]),
    ("test.bf16.weight", DType::BF16, &[4, 2]),
    ("blk.0.attn_kv.weight", DType::Q8_0, &[32, 3]),
    ("blk.0.ffn_gate_tid2eid.weight", DType::I32, &[6, 3]),
    ("blk.0.ffn_gate_exps.weight", DType::Q4K, &[256, 1, 2]),
    ("blk.0.ffn_up_exps.weight", DType::Q4K, &[256, 1, 2]),
    ("blk.0.ffn_down_exps.weight", DType::Q4K, &[256, 1, 2]),
];

fn rs_writer() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    for (k, v) in rs_metadata() {
        w.add(k, v).expect("valid record");
    }
    let mut rng = Lcg(0x0d54_2026);
    for &(name, dtype, dims) in RS_TENSORS {
        let n = dtype.row_bytes(dims[0]).expect("whole blocks") * dims[1..].iter().product::<u64>();
        w.add_tensor(name, dtype, dims, tensor_bytes(&mut rng, dtype, n as usize))
            .expect("valid tensor");
    }
    w
}

#[test]
fn rswritten_fixture_is_what_our_writer_writes() {
    let bytes = rs_writer().to_bytes().expect("in memory");
    let path = fixture("rswritten.gguf");
    if std::env::var_os("DS4_BLESS").is_some() {
        std::fs::write(&path, &bytes).expect("write fixture");
        eprintln!(
            "blessed {}: now rerun tests/fixtures/gguf/make_fixtures.py",
            path.display()
        );
    }
    let committed = std::fs::read(&path).expect("committed fixture");
    assert!(
        bytes == committed,
        "the writer's output changed; if intended, bless and rerun make_fixtures.py"
    );
}

#[test]
fn gguf_py_reads_what_our_writer_wrote() {
    let d = load_json("rswritten.json");
    // gguf-py's reading equals what we put in...
    let meta = d["metadata"].as_array().expect("metadata");
    let expected = rs_metadata();
    assert_eq!(meta.len(), expected.len());
    for (m, (key, value)) in meta.iter().zip(&expected) {
        assert_eq!(m["key"].as_str(), Some(*key));
        let ty = m["type"].as_str().expect("type");
        assert_eq!(
            &owned_from_json(ty, &m["value"]),
            value,
            "{key} as gguf-py read it"
        );
    }
    let tensors = d["tensors"].as_array().expect("tensors");
    assert_eq!(tensors.len(), RS_TENSORS.len());
    let mut offset = 0;
    for (t, &(name, dtype, dims)) in tensors.iter().zip(RS_TENSORS) {
        assert_eq!(t["name"].as_str(), Some(name));
        assert_eq!(t["type"].as_str(), Some(dtype.name()));
        let got: Vec<u64> = t["dims"]
            .as_array()
            .expect("dims")
            .iter()
            .map(|x| x.as_u64().expect("dim"))
            .collect();
        assert_eq!(got, dims);
        // Offsets are the running sum padded to general.alignment = 64.
        assert_eq!(t["offset"].as_u64(), Some(offset), "{name}");
        offset += t["bytes"].as_u64().expect("bytes").div_ceil(64) * 64;
    }
    // ...and everything else gguf-py saw (offsets, bytes) equals our own reading.
    let g = GgufFile::from_bytes(&rs_writer().to_bytes().expect("in memory")).expect("opens");
    assert_eq!(g.alignment(), 64);
    check_against_gguf_py(&g, &d);
}
