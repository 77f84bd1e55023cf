//! Property tests of the GGUF reader: arbitrary and mutated bytes never panic, and whatever
//! the writer writes the reader reads back exactly.

use ds4_tensor::DType;
use ds4_tensor::gguf::{GgufFile, GgufWriter, OwnedArray, OwnedValue, Value};
use proptest::prelude::*;

/// Parses `bytes` and, when they are accepted, touches every value and tensor byte the way
/// a loader would. Any panic fails the property.
fn exercise(bytes: &[u8]) {
    let Ok(g) = GgufFile::from_bytes(bytes) else {
        return;
    };
    for (key, value) in g.metadata() {
        assert!(!key.is_empty());
        let _ = value.type_name();
        if let Value::Array(a) = value {
            assert_eq!(a.iter().count(), a.len());
            let _ = a.to_owned_array();
            let _ = a.get(a.len().saturating_sub(1));
        }
    }
    for t in g.tensors() {
        let data = g.tensor(&t.name).expect("listed tensor").data().len() as u64;
        assert_eq!(data, t.n_bytes);
    }
}

/// A small valid file with strings, arrays and tensors: the seed the mutations start from.
fn seed() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.add("general.architecture", "deepseek4")
        .expect("fresh key");
    w.add("a.u32", 43u32).expect("fresh key");
    w.add("a.f32", 1e-6f32).expect("fresh key");
    w.add("a.tokens", vec!["<｜User｜>", "a", "▁b"])
        .expect("fresh key");
    w.add("a.ratios", vec![0u32, 0, 4, 128]).expect("fresh key");
    w.add(
        "a.nested",
        vec![OwnedArray::I32(vec![-1]), OwnedArray::Bool(vec![true])],
    )
    .expect("fresh key");
    w.add_tensor("blk.0.attn_norm.weight", DType::F32, &[4], vec![0u8; 16])
        .expect("valid");
    w.add_tensor(
        "blk.0.ffn_down_exps.weight",
        DType::Q2K,
        &[256, 1, 1],
        vec![1u8; 84],
    )
    .expect("valid");
    w.add_tensor(
        "blk.0.ffn_gate_exps.weight",
        DType::Iq2Xxs,
        &[256, 1, 1],
        vec![2u8; 66],
    )
    .expect("valid");
    w.to_bytes().expect("in memory")
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Set { at: usize, byte: u8 },
    Truncate { len: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, n: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..16usize).prop_map(|(at, n)| Mutation::Remove { at, n }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len().max(1);
    match m {
        Mutation::Flip { at, mask } => {
            if let Some(b) = bytes.get_mut(at % len) {
                *b ^= mask;
            }
        }
        Mutation::Set { at, byte } => {
            if let Some(b) = bytes.get_mut(at % len) {
                *b = *byte;
            }
        }
        Mutation::Truncate { len: n } => bytes.truncate(n % len),
        Mutation::Insert { at, bytes: ins } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, ins.iter().copied());
        }
        Mutation::Remove { at, n } => {
            let at = at % len;
            let end = (at + n).min(bytes.len());
            if at < end {
                bytes.drain(at..end);
            }
        }
    }
}

/// Metadata values of every type, arrays nested up to three levels.
fn owned_array(depth: u32) -> BoxedStrategy<OwnedArray> {
    use prop::collection::vec as v;
    let leaf = prop_oneof![
        v(any::<u8>(), 0..8).prop_map(OwnedArray::U8),
        v(any::<i8>(), 0..8).prop_map(OwnedArray::I8),
        v(any::<u16>(), 0..8).prop_map(OwnedArray::U16),
        v(any::<i16>(), 0..8).prop_map(OwnedArray::I16),
        v(any::<u32>(), 0..8).prop_map(OwnedArray::U32),
        v(any::<i32>(), 0..8).prop_map(OwnedArray::I32),
        v(any::<f32>(), 0..8).prop_map(OwnedArray::F32),
        v(any::<bool>(), 0..8).prop_map(OwnedArray::Bool),
        v(".{0,6}", 0..8).prop_map(OwnedArray::String),
        v(any::<u64>(), 0..8).prop_map(OwnedArray::U64),
        v(any::<i64>(), 0..8).prop_map(OwnedArray::I64),
        v(any::<f64>(), 0..8).prop_map(OwnedArray::F64),
    ];
    if depth == 0 {
        leaf.boxed()
    } else {
        prop_oneof![3 => leaf, 1 => v(owned_array(depth - 1), 0..4).prop_map(OwnedArray::Array)]
            .boxed()
    }
}

fn owned_value() -> impl Strategy<Value = OwnedValue> {
    prop_oneof![
        any::<u8>().prop_map(OwnedValue::U8),
        any::<i8>().prop_map(OwnedValue::I8),
        any::<u16>().prop_map(OwnedValue::U16),
        any::<i16>().prop_map(OwnedValue::I16),
        any::<u32>().prop_map(OwnedValue::U32),
        any::<i32>().prop_map(OwnedValue::I32),
        any::<f32>().prop_map(OwnedValue::F32),
        any::<bool>().prop_map(OwnedValue::Bool),
        ".{0,12}".prop_map(OwnedValue::String),
        owned_array(2).prop_map(OwnedValue::Array),
        any::<u64>().prop_map(OwnedValue::U64),
        any::<i64>().prop_map(OwnedValue::I64),
        any::<f64>().prop_map(OwnedValue::F64),
    ]
}

/// A tensor: type, GGUF dims (ne[0] a whole number of blocks) and random bytes.
fn tensor() -> impl Strategy<Value = (DType, Vec<u64>, Vec<u8>)> {
    (
        prop::sample::select(DType::ALL.to_vec()),
        prop::collection::vec(1..4u64, 0..4),
        1..3u64,
    )
        .prop_flat_map(|(dtype, outer, blocks)| {
            let mut dims = vec![blocks * dtype.block_elems() as u64];
            dims.extend(outer);
            let n = (dtype.row_bytes(dims[0]).expect("whole blocks")
                * dims[1..].iter().product::<u64>()) as usize;
            (
                Just(dtype),
                Just(dims),
                prop::collection::vec(any::<u8>(), n),
            )
        })
}

proptest! {
    // Cheap cases (a few hundred bytes each): many of them.
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        version in prop_oneof![Just(2u32), Just(3u32)],
        n_tensors in 0..4u64,
        n_kv in 0..4u64,
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&n_tensors.to_le_bytes());
        bytes.extend_from_slice(&n_kv.to_le_bytes());
        bytes.extend_from_slice(&body);
        exercise(&bytes);
    }

    #[test]
    fn mutated_valid_files_never_panic(mutations in prop::collection::vec(mutation(), 1..6)) {
        let mut bytes = seed();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        exercise(&bytes);
    }

}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn writer_reader_round_trip(
        kvs in prop::collection::btree_map("[a-z.]{1,12}", owned_value(), 0..8),
        tensors in prop::collection::vec(tensor(), 0..5),
        align_pow in prop::option::of(0..8u32),
    ) {
        let mut w = GgufWriter::new();
        if let Some(p) = align_pow {
            w.add("general.alignment", 1u32 << p).expect("power of two");
        }
        for (k, v) in &kvs {
            if k != "general.alignment" {
                w.add(k, v.clone()).expect("unique key");
            }
        }
        for (i, (dtype, dims, data)) in tensors.iter().enumerate() {
            w.add_tensor(&format!("t{i}"), *dtype, dims, data.as_slice()).expect("valid tensor");
        }
        let bytes = w.to_bytes().expect("in memory");
        let g = GgufFile::from_bytes(&bytes).expect("the writer's output opens");
        prop_assert_eq!(g.alignment(), w.alignment());
        // Metadata: same keys in the same order, same encoded values (compared through a
        // rewrite, which is NaN-proof).
        let mut w2 = GgufWriter::new();
        for (k, v) in g.metadata() {
            w2.add(k, v.to_owned_value()).expect("unique key");
        }
        for ((dtype, dims, data), t) in tensors.iter().zip(g.tensors()) {
            prop_assert_eq!(t.dtype, *dtype);
            prop_assert_eq!(t.shape.dims(), dims.as_slice());
            prop_assert_eq!(t.offset % g.alignment(), 0);
            let got = g.tensor(&t.name).expect("listed");
            prop_assert!(got.bytes.is_mapped());
            prop_assert_eq!(got.data(), data.as_slice());
            w2.add_tensor(&t.name, t.dtype, t.shape.dims(), got.data().to_vec()).expect("valid");
        }
        prop_assert_eq!(w2.to_bytes().expect("in memory"), bytes);
        for (k, v) in &kvs {
            if k == "general.alignment" {
                continue;
            }
            let got = g.get(k).expect("written key").to_owned_value();
            // Floats may be NaN: compare what is comparable.
            if !format!("{v:?}").contains("NaN") {
                prop_assert_eq!(&got, v);
            }
        }
    }
}
