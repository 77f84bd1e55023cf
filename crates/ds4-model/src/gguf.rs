//! Loading a ds4 GGUF: metadata through [`Metadata`], tensors borrowed zero-copy from the map.
//!
//! The container itself is parsed by `ds4_tensor::gguf`; this module only adapts it to the
//! model's [`Config`] and [`TensorSource`].

use std::path::Path;

use ds4_tensor::HostTensor;
use ds4_tensor::gguf::{GgufFile, Value};

use crate::config::{Config, Metadata};
use crate::error::Result;
use crate::weights::{TensorSource, Weights};

impl Metadata for GgufFile {
    fn get_u64(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        v.as_u64()
            .or_else(|| v.as_i64().and_then(|x| u64::try_from(x).ok()))
    }

    fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f64().map(|x| x as f32)
    }

    fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get(key)? {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn get_str(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.to_string()),
            _ => None,
        }
    }

    fn get_array_f64(&self, key: &str) -> Option<Vec<f64>> {
        match self.get(key)? {
            Value::Array(a) => a.iter().map(|v| v.as_f64()).collect(),
            _ => None,
        }
    }
}

impl TensorSource for GgufFile {
    fn tensor(&self, name: &str) -> Option<HostTensor> {
        GgufFile::tensor(self, name).ok()
    }
}

/// Opens a GGUF file and binds its config and weights.
pub fn load(path: &Path) -> Result<(Config, Weights)> {
    let file = GgufFile::open(path)?;
    let mut cfg = Config::from_gguf(&file)?;
    if cfg.n_vocab == 0 {
        // llama.cpp conversions may omit vocab_size: the embedding has one row per token.
        if let Some(t) = TensorSource::tensor(&file, "token_embd.weight") {
            cfg.n_vocab = t.shape.numpy().first().copied().unwrap_or(0) as usize;
        }
    }
    cfg.validate()?;
    let weights = Weights::bind(&cfg, &file)?;
    Ok((cfg, weights))
}
