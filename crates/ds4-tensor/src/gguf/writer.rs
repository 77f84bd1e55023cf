//! The GGUF writer: metadata in insertion order, tensor infos with running padded offsets,
//! and tensor data padded to the alignment, exactly as FORMATS.md s1.7 and gguf-py's
//! `GGUFWriter` lay a file out (so both produce the same bytes for the same content).

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use super::reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS};
use super::value::{MAX_ARRAY_DEPTH, OwnedValue, encode_str};
use crate::{DType, Error, Result, Shape};

/// A tensor waiting to be written.
#[derive(Debug, Clone)]
struct PendingTensor<'a> {
    name: String,
    dtype: DType,
    dims: Vec<u64>,
    data: Cow<'a, [u8]>,
}

/// Builds a GGUF file: add metadata and tensors, then write.
///
/// Tensor data may be borrowed (`&'a [u8]`, for example from another file's map) or owned.
/// The writer checks what the reader checks, so whatever it writes, [`super::GgufFile`]
/// opens.
#[derive(Debug, Clone)]
pub struct GgufWriter<'a> {
    version: u32,
    alignment: u64,
    kvs: Vec<(String, OwnedValue)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor<'a>>,
    names: HashSet<String>,
}

impl Default for GgufWriter<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> GgufWriter<'a> {
    /// An empty GGUF v3 file with the default alignment (32).
    pub fn new() -> GgufWriter<'a> {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            kvs: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// Writes version 2 instead of 3 (same layout; for reader tests).
    pub fn set_version(&mut self, version: u32) -> Result<&mut Self> {
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion {
                version,
                why: "the writer writes versions 2 and 3".into(),
            });
        }
        self.version = version;
        Ok(self)
    }

    /// The alignment the file will use (32, or `general.alignment` once added).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Adds a metadata record. Keys must be non-empty and unique; `general.alignment` must
    /// be a UINT32 power of two and sets the alignment; arrays may nest at most
    /// [`MAX_ARRAY_DEPTH`] deep.
    pub fn add(&mut self, key: &str, value: impl Into<OwnedValue>) -> Result<&mut Self> {
        let value = value.into();
        if key.is_empty() {
            return Err(Error::InvalidGguf {
                what: "metadata key is empty".into(),
            });
        }
        if self.keys.contains(key) {
            return Err(Error::DuplicateKey {
                key: key.to_string(),
            });
        }
        if matches!(&value, OwnedValue::Array(a) if a.depth() > MAX_ARRAY_DEPTH) {
            return Err(Error::KeyValue {
                key: key.to_string(),
                what: format!("arrays nested deeper than {MAX_ARRAY_DEPTH} levels"),
            });
        }
        if key == ALIGNMENT_KEY {
            match value {
                OwnedValue::U32(a) if a != 0 && a.is_power_of_two() => {
                    self.alignment = u64::from(a)
                }
                _ => {
                    return Err(Error::KeyValue {
                        key: key.to_string(),
                        what: "must be a UINT32 non-zero power of two".into(),
                    });
                }
            }
        }
        self.keys.insert(key.to_string());
        self.kvs.push((key.to_string(), value));
        Ok(self)
    }

    /// Adds a tensor: raw bytes of type `dtype` with GGUF-order `dims` (`ne[0]` first).
    /// The byte count must be exactly what the type and shape need.
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: DType,
        dims: &[u64],
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Result<&mut Self> {
        let data = data.into();
        let bad = |what: String| {
            Err(Error::InvalidGguf {
                what: format!("tensor {name}: {what}"),
            })
        };
        if name.is_empty() {
            return Err(Error::InvalidGguf {
                what: "tensor name is empty".into(),
            });
        }
        if self.names.contains(name) {
            return Err(Error::DuplicateTensor {
                name: name.to_string(),
            });
        }
        if dims.is_empty() || dims.len() > MAX_DIMS || dims.contains(&0) {
            return bad(format!(
                "dims {dims:?}: need 1 to {MAX_DIMS} dimensions, each at least 1"
            ));
        }
        let shape = Shape::from_gguf(dims);
        let n_bytes = dtype
            .row_bytes(dims[0])
            .and_then(|r| shape.n_rows().and_then(|n| n.checked_mul(r)));
        match n_bytes {
            None => {
                return bad(format!(
                    "ne[0] = {} is not a whole number of {dtype} blocks",
                    dims[0]
                ));
            }
            Some(n) if n != data.len() as u64 => {
                return bad(format!(
                    "{shape} {dtype} needs {n} bytes, got {}",
                    data.len()
                ));
            }
            Some(_) => {}
        }
        self.names.insert(name.to_string());
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dtype,
            dims: dims.to_vec(),
            data,
        });
        Ok(self)
    }

    /// Header, metadata and tensor infos, padded to the alignment: everything before the
    /// tensor data.
    fn head(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (key, value) in &self.kvs {
            encode_str(key, &mut out);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            value.encode(&mut out);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            encode_str(&t.name, &mut out);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.dtype.ggml_id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += self.padded(t.data.len());
        }
        // gguf-py pads here even when there is no tensor; llama.cpp does not require it.
        out.resize(self.padded(out.len()) as usize, 0);
        out
    }

    fn padded(&self, n: usize) -> u64 {
        (n as u64).div_ceil(self.alignment) * self.alignment
    }

    /// Writes the file to `w`.
    pub fn write_to(&self, mut w: impl Write) -> Result<()> {
        w.write_all(&self.head())?;
        let zeros = vec![0u8; self.alignment as usize];
        for t in &self.tensors {
            w.write_all(&t.data)?;
            let pad = self.padded(t.data.len()) as usize - t.data.len();
            w.write_all(&zeros[..pad])?;
        }
        w.flush()?;
        Ok(())
    }

    /// The whole file in memory.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out)?;
        Ok(out)
    }

    /// Writes the file at `path` (created or truncated).
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<()> {
        let file = std::fs::File::create(path.as_ref())?;
        self.write_to(std::io::BufWriter::new(file))
    }
}
