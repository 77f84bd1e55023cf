//! Fuzz target: the GGUF reader must never panic, and whatever it accepts must be readable
//! in full (every metadata value decoded, every tensor's bytes in range).

#![no_main]

use ds4_tensor::gguf::{GgufFile, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes(data) else {
        return;
    };
    for (_key, value) in g.metadata() {
        let _ = value.type_name();
        if let Value::Array(a) = value {
            assert_eq!(a.iter().count(), a.len());
            let _ = a.to_owned_array();
        }
    }
    for t in g.tensors() {
        let tensor = g.tensor(&t.name).expect("listed tensor");
        assert_eq!(tensor.data().len() as u64, t.n_bytes);
    }
});
