//! Tests of the GGUF reader and writer through the public API: round trips, typed accessors,
//! and one case per validation rule of FORMATS.md s1.10, built byte by byte.

use ds4_tensor::gguf::{GgufFile, GgufWriter, OwnedArray, OwnedValue, Value, ValueType};
use ds4_tensor::{DType, Error};

/// A hand-assembled GGUF byte stream, for files the writer refuses to produce.
struct Raw(Vec<u8>);

impl Raw {
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw(b"GGUF".to_vec());
        r.u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    fn u32(&mut self, v: u32) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Raw {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Raw {
        self.bytes_str(s.as_bytes())
    }
    fn bytes_str(&mut self, s: &[u8]) -> &mut Raw {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s);
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Raw {
        self.0.extend_from_slice(b);
        self
    }
    /// A tensor info record.
    fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Raw {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }
    /// Zero padding to `align`, then `n` data bytes.
    fn data(&mut self, align: usize, n: usize) -> &mut Raw {
        let padded = self.0.len().div_ceil(align) * align;
        self.0.resize(padded + n, 0);
        self
    }
    fn parse(&self) -> Result<GgufFile, Error> {
        GgufFile::from_bytes(&self.0)
    }
}

/// Asserts that `bytes` is refused with a message containing every fragment.
#[track_caller]
fn check_err(result: Result<GgufFile, Error>, fragments: &[&str]) {
    match result {
        Ok(_) => panic!("expected an error containing {fragments:?}, the file was accepted"),
        Err(e) => {
            let msg = e.to_string();
            for f in fragments {
                assert!(msg.contains(f), "error {msg:?} does not contain {f:?}");
            }
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A writer with one record of every value type and a few tensors of several types.
fn sample_writer() -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "deepseek4")
        .expect("valid test input");
    w.add("t.u8", 200u8).expect("valid test input");
    w.add("t.i8", -100i8).expect("valid test input");
    w.add("t.u16", 60000u16).expect("valid test input");
    w.add("t.i16", -30000i16).expect("valid test input");
    w.add("t.u32", 4_000_000_000u32).expect("valid test input");
    w.add("t.i32", -2_000_000_000i32).expect("valid test input");
    w.add("t.f32", 0.1f32).expect("valid test input");
    w.add("t.bool", true).expect("valid test input");
    w.add("t.str", "<｜begin▁of▁sentence｜>")
        .expect("valid test input");
    w.add("t.u64", u64::MAX).expect("valid test input");
    w.add("t.i64", i64::MIN).expect("valid test input");
    w.add("t.f64", -1e-300f64).expect("valid test input");
    w.add("t.empty_str", "").expect("valid test input");
    w.add("t.arr_u32", vec![0u32, 4, 128])
        .expect("valid test input");
    w.add("t.arr_i32", vec![1i32, -1])
        .expect("valid test input");
    w.add("t.arr_f32", vec![10.0f32, 10.0])
        .expect("valid test input");
    w.add("t.arr_f64", vec![1.5f64]).expect("valid test input");
    w.add("t.arr_str", vec!["a", "", "ｂ"])
        .expect("valid test input");
    w.add("t.arr_bool", vec![true, false])
        .expect("valid test input");
    w.add("t.arr_empty", OwnedArray::U8(vec![]))
        .expect("valid test input");
    w.add(
        "t.nested",
        vec![
            OwnedArray::U32(vec![1, 2]),
            OwnedArray::String(vec!["x".into()]),
        ],
    )
    .expect("valid test input");
    w.add_tensor(
        "a.f32",
        DType::F32,
        &[3, 2],
        f32_bytes(&[1., 2., 3., 4., 5., 6.]),
    )
    .expect("valid test input");
    w.add_tensor("b.q8_0", DType::Q8_0, &[32, 2, 1], vec![7u8; 68])
        .expect("valid test input");
    w.add_tensor("c.q2k", DType::Q2K, &[256, 1, 2, 1], vec![9u8; 168])
        .expect("valid test input");
    w.add_tensor("d.i32", DType::I32, &[6], vec![1u8; 24])
        .expect("valid test input");
    w
}

#[test]
fn round_trip_every_value_type_and_tensor() {
    let w = sample_writer();
    let bytes = w.to_bytes().expect("valid test input");
    let g = GgufFile::from_bytes(&bytes).expect("valid test input");
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_start() % 32, 0);
    assert_eq!(g.metadata_len(), 22);

    // File order is insertion order.
    let keys: Vec<&str> = g.metadata().map(|(k, _)| k).collect();
    assert_eq!(keys[0], "general.architecture");
    assert_eq!(keys[21], "t.nested");

    assert_eq!(g.get("t.u8"), Some(Value::U8(200)));
    assert_eq!(g.get("t.i8"), Some(Value::I8(-100)));
    assert_eq!(g.get("t.u16"), Some(Value::U16(60000)));
    assert_eq!(g.get("t.i16"), Some(Value::I16(-30000)));
    assert_eq!(g.get_u32("t.u32").expect("valid test input"), 4_000_000_000);
    assert_eq!(g.get("t.i32"), Some(Value::I32(-2_000_000_000)));
    assert_eq!(g.get_f32("t.f32").expect("valid test input"), 0.1f32);
    assert!(g.get_bool("t.bool").expect("valid test input"));
    assert_eq!(
        g.get_str("t.str").expect("valid test input"),
        "<｜begin▁of▁sentence｜>"
    );
    assert_eq!(g.get_u64("t.u64").expect("valid test input"), u64::MAX);
    assert_eq!(g.get("t.i64"), Some(Value::I64(i64::MIN)));
    assert_eq!(g.get("t.f64"), Some(Value::F64(-1e-300)));
    assert_eq!(g.get_str("t.empty_str").expect("valid test input"), "");
    assert_eq!(
        g.get_u32_array("t.arr_u32").expect("valid test input"),
        vec![0, 4, 128]
    );
    assert_eq!(
        g.get_i32_array("t.arr_i32").expect("valid test input"),
        vec![1, -1]
    );
    assert_eq!(
        g.get_f32_array("t.arr_f32").expect("valid test input"),
        vec![10.0, 10.0]
    );
    assert_eq!(
        g.get_f32_array("t.arr_f64").expect("valid test input"),
        vec![1.5]
    );
    assert_eq!(
        g.get_str_array("t.arr_str").expect("valid test input"),
        vec!["a", "", "ｂ"]
    );
    let a = g.get_array("t.arr_bool").expect("valid test input");
    assert_eq!(
        a.iter().collect::<Vec<_>>(),
        vec![Value::Bool(true), Value::Bool(false)]
    );
    assert!(
        g.get_array("t.arr_empty")
            .expect("valid test input")
            .is_empty()
    );
    let nested = g.get_array("t.nested").expect("valid test input");
    assert_eq!(nested.elem_type(), ValueType::Array);
    assert_eq!(
        nested.to_owned_array(),
        OwnedArray::Array(vec![
            OwnedArray::U32(vec![1, 2]),
            OwnedArray::String(vec!["x".into()])
        ])
    );
    assert_eq!(Value::Array(nested).type_name(), "ARRAY[ARRAY[UINT32]]");
    assert_eq!(
        g.get_array("t.arr_u32").expect("valid test input").get(2),
        Some(Value::U32(128))
    );
    assert_eq!(
        g.get_array("t.arr_str").expect("valid test input").get(2),
        Some(Value::String("ｂ"))
    );

    // Tensors: file order, running padded offsets, zero-copy data.
    let infos = g.tensors();
    let names: Vec<&str> = infos.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a.f32", "b.q8_0", "c.q2k", "d.i32"]);
    let offsets: Vec<u64> = infos.iter().map(|t| t.offset).collect();
    assert_eq!(offsets, [0, 32, 32 + 96, 32 + 96 + 192]);
    let sizes: Vec<u64> = infos.iter().map(|t| t.n_bytes).collect();
    assert_eq!(sizes, [24, 68, 168, 24]);
    assert_eq!(g.file_len(), g.data_start() + 32 + 96 + 192 + 32);
    let t = g.tensor("a.f32").expect("valid test input");
    assert!(t.bytes.is_mapped());
    assert_eq!(t.dtype, DType::F32);
    assert_eq!(t.shape.dims(), [3, 2]);
    assert_eq!(t.data(), f32_bytes(&[1., 2., 3., 4., 5., 6.]).as_slice());
    assert_eq!(
        g.tensor_data("c.q2k").expect("valid test input"),
        vec![9u8; 168].as_slice()
    );
    assert_eq!(
        g.tensor_info("b.q8_0")
            .expect("valid test input")
            .shape
            .dims(),
        [32, 2, 1]
    );
    assert_eq!(
        g.totals_by_type(),
        vec![
            (DType::F32, 1, 24),
            (DType::Q8_0, 1, 68),
            (DType::Q2K, 1, 168),
            (DType::I32, 1, 24)
        ]
    );

    // Rewriting what was read gives the same bytes.
    let mut w2 = GgufWriter::new();
    for (k, v) in g.metadata() {
        w2.add(k, v.to_owned_value()).expect("valid test input");
    }
    for t in g.tensors() {
        w2.add_tensor(
            &t.name,
            t.dtype,
            t.shape.dims(),
            g.tensor_data(&t.name).expect("valid test input"),
        )
        .expect("valid test input");
    }
    assert_eq!(w2.to_bytes().expect("valid test input"), bytes);
}

#[test]
fn open_maps_a_file() {
    let dir = std::env::temp_dir().join(format!("ds4-gguf-open-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("valid test input");
    let path = dir.join("sample.gguf");
    sample_writer().write_file(&path).expect("valid test input");
    let g = GgufFile::open(&path).expect("valid test input");
    assert_eq!(
        g.as_bytes(),
        sample_writer()
            .to_bytes()
            .expect("valid test input")
            .as_slice()
    );
    let t = g.tensor("d.i32").expect("valid test input");
    drop(g);
    // The tensor keeps the map alive.
    assert_eq!(t.data(), vec![1u8; 24].as_slice());
    std::fs::remove_dir_all(&dir).expect("valid test input");
    assert!(matches!(
        GgufFile::open(dir.join("missing.gguf")),
        Err(Error::Io(_))
    ));
}

#[test]
fn accessors_name_the_key() {
    let g = GgufFile::from_bytes(&sample_writer().to_bytes().expect("valid test input"))
        .expect("valid test input");
    let msg = g
        .get_u32("deepseek4.block_count")
        .expect_err("must be refused")
        .to_string();
    assert_eq!(msg, "metadata key deepseek4.block_count: missing");
    match g.get_u32("t.u16") {
        Err(Error::KeyType {
            key,
            expected,
            found,
        }) => {
            assert_eq!(
                (key.as_str(), expected.as_str(), found.as_str()),
                ("t.u16", "UINT32", "UINT16")
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        g.get_str("t.arr_str")
            .expect_err("must be refused")
            .to_string()
            .contains("ARRAY[STRING]")
    );
    assert!(matches!(g.get_bool("t.u8"), Err(Error::KeyType { .. })));
    assert!(matches!(g.get_f32("t.str"), Err(Error::KeyType { .. })));
    assert!(matches!(g.get_u64("t.i64"), Err(Error::KeyType { .. })));
    assert!(matches!(
        g.get_str_array("t.arr_u32"),
        Err(Error::KeyType { .. })
    ));
    assert!(matches!(
        g.get_f32_array("t.arr_u32"),
        Err(Error::KeyType { .. })
    ));
    assert!(matches!(g.get_array("t.u8"), Err(Error::KeyType { .. })));
    // Widening and the float rule of FORMATS s1.11.
    assert_eq!(g.get_u64("t.u32").expect("valid test input"), 4_000_000_000);
    assert_eq!(g.get_u64("t.u8").expect("valid test input"), 200);
    assert_eq!(g.get_f32("t.u32").expect("valid test input"), 4e9);
    assert_eq!(g.get_f32("t.i32").expect("valid test input"), -2e9);
    assert_eq!(
        g.get_f32("t.f64").expect("valid test input"),
        -1e-300f64 as f32
    );
    // INT32 arrays serve as u32 arrays when no element is negative.
    let msg = g
        .get_u32_array("t.arr_i32")
        .expect_err("must be refused")
        .to_string();
    assert!(
        msg.contains("t.arr_i32") && msg.contains("element 1 = -1"),
        "{msg}"
    );
    assert_eq!(
        g.get_i32_array("t.arr_u32").expect("valid test input"),
        vec![0, 4, 128]
    );
    assert!(matches!(g.tensor("nope"), Err(Error::MissingTensor { .. })));
    assert!(g.contains_key("t.u8") && !g.contains_key("t.u9"));
}

#[test]
fn version_2_is_read() {
    let mut w = sample_writer();
    w.set_version(2).expect("valid test input");
    let g =
        GgufFile::from_bytes(&w.to_bytes().expect("valid test input")).expect("valid test input");
    assert_eq!(g.version(), 2);
    assert!(w.set_version(1).is_err());
}

#[test]
fn custom_alignment() {
    let mut w = GgufWriter::new();
    w.add("general.alignment", 64u32).expect("valid test input");
    w.add_tensor("a", DType::F16, &[3], vec![0u8; 6])
        .expect("valid test input");
    w.add_tensor("b", DType::F16, &[5], vec![1u8; 10])
        .expect("valid test input");
    let g =
        GgufFile::from_bytes(&w.to_bytes().expect("valid test input")).expect("valid test input");
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_start() % 64, 0);
    assert_eq!(g.tensor_info("b").expect("valid test input").offset, 64);
    assert!(GgufWriter::new().add("general.alignment", 48u32).is_err());
    assert!(GgufWriter::new().add("general.alignment", 64u64).is_err());
}

#[test]
fn writer_refuses_what_the_reader_refuses() {
    let mut w = GgufWriter::new();
    w.add("k", 1u8).expect("valid test input");
    assert!(matches!(w.add("k", 2u8), Err(Error::DuplicateKey { .. })));
    assert!(w.add("", 2u8).is_err());
    w.add_tensor("t", DType::F32, &[1], vec![0u8; 4])
        .expect("valid test input");
    assert!(matches!(
        w.add_tensor("t", DType::F32, &[1], vec![0u8; 4]),
        Err(Error::DuplicateTensor { .. })
    ));
    assert!(
        w.add_tensor("u", DType::F32, &[2], vec![0u8; 4]).is_err(),
        "wrong byte count"
    );
    assert!(
        w.add_tensor("u", DType::Q8_0, &[16], vec![0u8; 17])
            .is_err(),
        "partial block"
    );
    assert!(
        w.add_tensor("u", DType::F32, &[], vec![]).is_err(),
        "no dims"
    );
    assert!(
        w.add_tensor("u", DType::F32, &[1, 1, 1, 1, 1], vec![0u8; 4])
            .is_err(),
        "5 dims"
    );
    assert!(
        w.add_tensor("u", DType::F32, &[0], vec![]).is_err(),
        "zero dim"
    );
    let mut deep = OwnedArray::U8(vec![1]);
    for _ in 0..8 {
        deep = OwnedArray::Array(vec![deep]);
    }
    assert!(w.add("deep", deep).is_err(), "9 levels of arrays");
}

#[test]
fn header_errors() {
    check_err(GgufFile::from_bytes(b""), &["0 bytes", "24-byte header"]);
    check_err(GgufFile::from_bytes(b"GGUF\x03\0\0\0"), &["8 bytes"]);
    check_err(
        GgufFile::from_bytes(b"PK\x03\x04 this is a zip file......"),
        &["not a GGUF file", "50, 4b, 03, 04"],
    );
    check_err(Raw::header(1, 0, 0).parse(), &["version 0x1", "obsolete"]);
    check_err(Raw::header(4, 0, 0).parse(), &["version 0x4"]);
    check_err(Raw::header(0x0300_0000, 0, 0).parse(), &["big-endian"]);
    // Counts that cannot fit in the file are refused before anything is allocated.
    check_err(
        Raw::header(3, 0, 1 << 60).parse(),
        &["1152921504606846976 metadata records"],
    );
    check_err(
        Raw::header(3, u64::MAX, 0).parse(),
        &["18446744073709551615 tensor infos"],
    );
    check_err(Raw::header(3, 1 << 62, 1 << 62).parse(), &["cannot fit"]);
    // A claimed record that is simply not there.
    let mut r = Raw::header(3, 0, 1);
    r.u64(100).bytes(&[0u8; 20]);
    check_err(r.parse(), &["metadata record 0", "truncated"]);
    // An empty, valid file.
    assert_eq!(
        Raw::header(3, 0, 0)
            .parse()
            .expect("valid test input")
            .tensors()
            .len(),
        0
    );
}

#[test]
fn metadata_errors() {
    let kv = |build: &dyn Fn(&mut Raw)| {
        let mut r = Raw::header(3, 0, 1);
        build(&mut r);
        r.bytes(&[0u8; 16]);
        r.parse()
    };
    check_err(
        kv(&|r| {
            r.u64(1 << 60).bytes(b"k");
        }),
        &["metadata record 0: key", "truncated"],
    );
    check_err(
        kv(&|r| {
            r.str("").u32(0).bytes(&[1]);
        }),
        &["empty key"],
    );
    check_err(
        kv(&|r| {
            r.bytes_str(b"\xff\xfe").u32(0).bytes(&[1]);
        }),
        &["UTF-8"],
    );
    check_err(
        kv(&|r| {
            r.str("k").u32(13);
        }),
        &["metadata key k: unknown value type id 13"],
    );
    check_err(
        kv(&|r| {
            r.str("k").u32(8).u64(1 << 40);
        }),
        &["metadata key k", "truncated", "string"],
    );
    check_err(
        kv(&|r| {
            r.str("k").u32(8).bytes_str(b"a\x80b");
        }),
        &["metadata key k", "UTF-8"],
    );
    check_err(
        kv(&|r| {
            r.str("k").u32(9).u32(99).u64(1);
        }),
        &["metadata key k", "unknown array element type id 99"],
    );
    check_err(
        kv(&|r| {
            r.str("k").u32(9).u32(0).u64(1 << 60);
        }),
        &["metadata key k", "array of 1152921504606846976 UINT8"],
    );
    check_err(
        kv(&|r| {
            r.str("k").u32(9).u32(8).u64(u64::MAX);
        }),
        &["metadata key k", "STRING elements cannot fit"],
    );
    check_err(
        kv(&|r| {
            r.str("k").u32(9).u32(9).u64(1 << 59);
        }),
        &["metadata key k", "ARRAY elements cannot fit"],
    );
    // Each string of an array is checked.
    check_err(
        kv(&|r| {
            r.str("k").u32(9).u32(8).u64(2).str("ok").u64(1000);
        }),
        &["metadata key k", "truncated"],
    );

    // Nesting: 8 levels of arrays are read, 9 are refused.
    let nest = |levels: usize| {
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(9);
        for _ in 1..levels {
            r.u32(9).u64(1);
        }
        r.u32(4).u64(1).u32(7);
        r.parse()
    };
    let g = nest(8).expect("valid test input");
    assert_eq!(
        g.get("k").expect("valid test input").type_name(),
        "ARRAY[ARRAY[ARRAY[ARRAY[ARRAY[ARRAY[ARRAY[ARRAY[UINT32]]]]]]]]"
    );
    check_err(nest(9), &["nested deeper than 8"]);

    // Duplicate keys.
    let mut r = Raw::header(3, 0, 2);
    r.str("k").u32(0).bytes(&[1]).str("k").u32(4).u32(2);
    assert!(matches!(r.parse(), Err(Error::DuplicateKey { key }) if key == "k"));

    // general.alignment must be a UINT32 non-zero power of two.
    for (ty, val, frag) in [(4u32, 0u32, "= 0"), (4, 48, "= 48"), (5, 64, "UINT32")] {
        let mut r = Raw::header(3, 0, 1);
        r.str("general.alignment").u32(ty).u32(val);
        check_err(r.parse(), &["general.alignment", frag]);
    }
}

/// A file with one tensor info and `data` bytes of data at alignment 32.
fn one_tensor(
    name: &str,
    dims: &[u64],
    type_id: u32,
    offset: u64,
    data: usize,
) -> Result<GgufFile, Error> {
    let mut r = Raw::header(3, 1, 0);
    r.tensor(name, dims, type_id, offset).data(32, data);
    r.parse()
}

#[test]
fn tensor_errors() {
    assert!(one_tensor("w", &[4, 2], 0, 0, 32).is_ok());
    check_err(
        one_tensor("", &[4], 0, 0, 32),
        &["tensor info 0: empty name"],
    );
    check_err(one_tensor("w", &[], 0, 0, 32), &["tensor w: n_dims = 0"]);
    check_err(
        one_tensor("w", &[1, 1, 1, 1, 1], 0, 0, 32),
        &["tensor w: n_dims = 5"],
    );
    check_err(one_tensor("w", &[4, 0], 0, 0, 32), &["tensor w: ne[1] = 0"]);
    check_err(
        one_tensor("w", &[1 << 32, 1 << 32], 0, 0, 32),
        &["tensor w", "overflows"],
    );
    check_err(
        one_tensor("w", &[1 << 40, 1 << 22], 0, 0, 32),
        &["tensor w", "byte size", "overflows"],
    );
    check_err(
        one_tensor("w", &[33, 2], 8, 0, 128),
        &["tensor w: ne[0] = 33", "Q8_0 block size 32"],
    );
    for id in [2u32, 31, 39, 1000] {
        match one_tensor("blk.0.w", &[32], id, 0, 128) {
            Err(Error::UnknownDType { tensor, id: got }) => {
                assert_eq!((tensor.as_str(), got), ("blk.0.w", id))
            }
            other => panic!("{other:?}"),
        }
    }
    check_err(
        one_tensor("w", &[4], 0, 16, 64),
        &["tensor w: offset 16", "alignment 32"],
    );
    check_err(one_tensor("w", &[4, 2], 0, 0, 31), &["tensor w", "outside"]);
    check_err(
        one_tensor("w", &[4], 0, u64::MAX - 31, 32),
        &["tensor w", "outside"],
    );
    check_err(one_tensor("w", &[4], 0, 32, 32), &["tensor w", "outside"]);
    // Truncated tensor info.
    let mut r = Raw::header(3, 1, 0);
    r.str("w").u32(4).u64(4).u64(4).bytes(&[1; 4]);
    check_err(r.parse(), &["tensor w", "truncated"]);

    // Duplicate names and overlapping data.
    let two = |n2: &str, off2: u64| {
        let mut r = Raw::header(3, 2, 0);
        r.tensor("a", &[16], 0, 0)
            .tensor(n2, &[8], 0, off2)
            .data(32, 128);
        r.parse()
    };
    assert!(two("b", 64).is_ok());
    assert!(matches!(two("a", 64), Err(Error::DuplicateTensor { name }) if name == "a"));
    check_err(two("b", 32), &["tensors a and b overlap"]);
    check_err(two("b", 0), &["overlap"]);
    // Out-of-order placement is fine.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[8], 0, 32)
        .tensor("b", &[8], 0, 0)
        .data(32, 64);
    assert!(r.parse().is_ok());
    // The unpadded last tensor may end exactly at EOF.
    assert!(one_tensor("w", &[3], 0, 0, 12).is_ok());
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let bytes = sample_writer().to_bytes().expect("valid test input");
    let last = GgufFile::from_bytes(&bytes)
        .expect("valid test input")
        .tensor_info("d.i32")
        .expect("valid test input")
        .clone();
    let min_len = GgufFile::from_bytes(&bytes)
        .expect("valid test input")
        .data_start()
        + last.offset
        + last.n_bytes;
    for n in 0..bytes.len() {
        let r = GgufFile::from_bytes(&bytes[..n]);
        assert_eq!(r.is_ok(), n as u64 >= min_len, "prefix of {n} bytes");
    }
}

#[test]
fn value_helpers() {
    assert_eq!(ValueType::from_id(9), Some(ValueType::Array));
    assert_eq!(ValueType::from_id(13), None);
    assert_eq!(ValueType::F64.name(), "FLOAT64");
    assert_eq!(Value::U32(7).as_i64(), Some(7));
    assert_eq!(Value::U64(u64::MAX).as_i64(), None);
    assert_eq!(Value::I8(-3).as_f64(), Some(-3.0));
    assert_eq!(Value::String("x").as_f64(), None);
    assert_eq!(OwnedValue::from(vec![1u8]).value_type(), ValueType::Array);
}
