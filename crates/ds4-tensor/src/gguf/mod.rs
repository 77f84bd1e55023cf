//! The GGUF v3 container: a strict, zero-copy reader over a memory map, and a writer.
//!
//! A GGUF file (FORMATS.md s1) is a 24-byte little-endian header (`"GGUF"`, version, tensor
//! count, metadata count), then the metadata records (key string, value type, value; arrays
//! carry an element type and a count), then one info record per tensor (name, GGUF-order
//! dims with `ne[0]` contiguous, ggml type id, offset), then zero padding up to the
//! alignment (`general.alignment`, default 32), then the tensor data, each tensor at
//! `data_start + offset` and padded to the alignment. [`GgufFile`] maps the file and walks
//! everything but the tensor data once, at open. When `open` returns `Ok`, the reader
//! guarantees: the version is 2 or 3 and the file little-endian; every count and length fit
//! in the file; every value type is known, strings are UTF-8, arrays nest at most
//! [`MAX_ARRAY_DEPTH`] deep; keys and tensor names are non-empty and unique; the alignment
//! is a UINT32 power of two; every tensor has 1 to 4 dimensions, each at least 1, a
//! supported [`DType`], `ne[0]` a whole number of blocks, a byte size that does not
//! overflow, an aligned offset, data entirely inside the file, and no byte shared with
//! another tensor. Any other input is an [`Error`] naming the key, tensor or byte offset;
//! no input makes the reader panic, and what it allocates is bounded by a small multiple of
//! the file's size (every count is checked against the bytes left before it sizes anything).
//! Metadata strings and arrays are borrowed from the map and decoded lazily, and tensor data
//! is never read at open: [`GgufFile::tensor`] hands out the mapped bytes without a copy.
//!
//! The reader is deliberately stricter than ds4 (which tolerates nested arrays and does not
//! check overlaps) and a little looser than llama.cpp (which also requires offsets to be the
//! running padded sum; we accept any non-overlapping aligned placement, and read nested
//! arrays). [`GgufWriter`] writes exactly the layout llama.cpp and gguf-py write.

mod reader;
mod value;
mod writer;

use std::path::Path;
use std::sync::Arc;

pub use reader::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, HEADER_BYTES, MAGIC, MAX_DIMS, TensorInfo};
pub use value::{ArrayIter, ArrayValue, MAX_ARRAY_DEPTH, OwnedArray, OwnedValue, Value, ValueType};
pub use writer::GgufWriter;

use reader::{Layout, Stored};

use crate::{DType, Error, HostTensor, Result, TensorBytes};

/// An open GGUF file: the memory map plus its validated layout.
///
/// Cheap to share: tensors handed out by [`GgufFile::tensor`] hold their own reference to
/// the map, so they outlive this value.
#[derive(Debug)]
pub struct GgufFile {
    map: Arc<memmap2::Mmap>,
    layout: Layout,
}

impl GgufFile {
    /// Maps and parses the file at `path`. Reads the header, metadata and tensor infos only.
    ///
    /// The file must not be modified while it is open (as for every memory-mapped model
    /// loader); the reader re-validates what it decodes later, so a modified file yields
    /// wrong values, not undefined behaviour in this crate's safe code.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = std::fs::File::open(path)?;
        // SAFETY: the map is read-only and private to this process; like llama.cpp and ds4
        // we rely on the model file not being truncated or rewritten while it is mapped.
        let map = unsafe { memmap2::MmapOptions::new().map(&file)? };
        let layout = reader::parse(&map)?;
        Ok(GgufFile {
            map: Arc::new(map),
            layout,
        })
    }

    /// Parses a file held in memory (tests, fuzzing). The bytes are validated first, then
    /// copied once into an anonymous map so that tensors borrow from it as from a file.
    pub fn from_bytes(bytes: &[u8]) -> Result<GgufFile> {
        let layout = reader::parse(bytes)?;
        let mut anon = memmap2::MmapMut::map_anon(bytes.len())?;
        anon.copy_from_slice(bytes);
        Ok(GgufFile {
            map: Arc::new(anon.make_read_only()?),
            layout,
        })
    }

    /// Validates `bytes` as a GGUF file without keeping anything (the fuzz entry point).
    pub fn validate(bytes: &[u8]) -> Result<()> {
        reader::parse(bytes).map(|_| ())
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.layout.version
    }

    /// The data alignment (32 unless `general.alignment` says otherwise).
    pub fn alignment(&self) -> u64 {
        self.layout.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_start(&self) -> u64 {
        self.layout.data_start
    }

    /// The whole file's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.map
    }

    /// The file size in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    // ---- Metadata -------------------------------------------------------------------

    /// Number of metadata records.
    pub fn metadata_len(&self) -> usize {
        self.layout.entries.len()
    }

    /// The metadata records in file order.
    pub fn metadata(&self) -> impl ExactSizeIterator<Item = (&str, Value<'_>)> + '_ {
        self.layout
            .entries
            .iter()
            .map(|e| (&*e.key, self.decode(&e.value)))
    }

    fn decode(&self, stored: &Stored) -> Value<'_> {
        match stored {
            Stored::Scalar(v) => *v,
            Stored::Str(range) => Value::String(utf8_prefix(&self.map[range.clone()])),
            Stored::Array {
                elem_type,
                len,
                data,
            } => Value::Array(ArrayValue {
                elem_type: *elem_type,
                len: *len,
                depth: 0,
                data: &self.map[data.clone()],
            }),
        }
    }

    /// True when the file has `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.layout.key_index.contains_key(key)
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<Value<'_>> {
        let &i = self.layout.key_index.get(key)?;
        Some(self.decode(&self.layout.entries[i].value))
    }

    /// The value of `key`, or [`Error::MissingKey`].
    pub fn value(&self, key: &str) -> Result<Value<'_>> {
        self.get(key).ok_or_else(|| Error::MissingKey {
            key: key.to_string(),
        })
    }

    /// A UINT32 value (exactly that type, as ds4 requires of integer keys).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        match self.value(key)? {
            Value::U32(v) => Ok(v),
            v => Err(key_type(key, "UINT32", &v)),
        }
    }

    /// An unsigned integer value (UINT8/16/32/64) as `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.value(key)?;
        v.as_u64()
            .ok_or_else(|| key_type(key, "an unsigned integer", &v))
    }

    /// A float value: FLOAT32, FLOAT64 (rounded), UINT32 or INT32 (converted), the types
    /// ds4 accepts for float keys (FORMATS.md s1.11).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.value(key)? {
            Value::F32(v) => Ok(v),
            Value::F64(v) => Ok(v as f32),
            Value::U32(v) => Ok(v as f32),
            Value::I32(v) => Ok(v as f32),
            v => Err(key_type(key, "FLOAT32, FLOAT64, UINT32 or INT32", &v)),
        }
    }

    /// A BOOL value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.value(key)? {
            Value::Bool(v) => Ok(v),
            v => Err(key_type(key, "BOOL", &v)),
        }
    }

    /// A STRING value, borrowed from the map.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.value(key)? {
            Value::String(s) => Ok(s),
            v => Err(key_type(key, "STRING", &v)),
        }
    }

    /// An ARRAY value of any element type, decoded lazily.
    pub fn get_array(&self, key: &str) -> Result<ArrayValue<'_>> {
        match self.value(key)? {
            Value::Array(a) => Ok(a),
            v => Err(key_type(key, "ARRAY", &v)),
        }
    }

    /// An ARRAY of UINT32, or of INT32 with no negative element.
    pub fn get_u32_array(&self, key: &str) -> Result<Vec<u32>> {
        let a = self.get_array(key)?;
        match a.elem_type() {
            ValueType::U32 => Ok(a
                .iter()
                .filter_map(|v| if let Value::U32(x) = v { Some(x) } else { None })
                .collect()),
            ValueType::I32 => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::I32(x) => u32::try_from(x)
                        .map_err(|_| key_value(key, format!("element {i} = {x} is negative"))),
                    _ => Err(key_value(key, format!("element {i} is not INT32"))),
                })
                .collect(),
            _ => Err(key_type(
                key,
                "ARRAY[UINT32] or ARRAY[INT32]",
                &Value::Array(a),
            )),
        }
    }

    /// An ARRAY of INT32, or of UINT32 with every element at most `i32::MAX`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        let a = self.get_array(key)?;
        match a.elem_type() {
            ValueType::I32 => Ok(a
                .iter()
                .filter_map(|v| if let Value::I32(x) = v { Some(x) } else { None })
                .collect()),
            ValueType::U32 => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::U32(x) => i32::try_from(x)
                        .map_err(|_| key_value(key, format!("element {i} = {x} exceeds i32"))),
                    _ => Err(key_value(key, format!("element {i} is not UINT32"))),
                })
                .collect(),
            _ => Err(key_type(
                key,
                "ARRAY[INT32] or ARRAY[UINT32]",
                &Value::Array(a),
            )),
        }
    }

    /// An ARRAY of FLOAT32, or of FLOAT64 (rounded to f32).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let a = self.get_array(key)?;
        match a.elem_type() {
            ValueType::F32 | ValueType::F64 => Ok(a
                .iter()
                .filter_map(|v| match v {
                    Value::F32(x) => Some(x),
                    Value::F64(x) => Some(x as f32),
                    _ => None,
                })
                .collect()),
            _ => Err(key_type(
                key,
                "ARRAY[FLOAT32] or ARRAY[FLOAT64]",
                &Value::Array(a),
            )),
        }
    }

    /// An ARRAY of STRING, each borrowed from the map.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let a = self.get_array(key)?;
        match a.strings() {
            Some(it) => Ok(it.collect()),
            None => Err(key_type(key, "ARRAY[STRING]", &Value::Array(a))),
        }
    }

    // ---- Tensors --------------------------------------------------------------------

    /// The tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.layout.tensors
    }

    /// The info of tensor `name`, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.layout
            .tensor_index
            .get(name)
            .map(|&i| &self.layout.tensors[i])
    }

    /// Absolute byte range of a tensor's data in the file.
    pub fn tensor_range(&self, info: &TensorInfo) -> std::ops::Range<usize> {
        // The parser checked data_start + offset + n_bytes <= file length, so these fit.
        let start = (self.layout.data_start + info.offset) as usize;
        start..start + info.n_bytes as usize
    }

    /// The raw bytes of tensor `name`, borrowed from the map.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        Ok(&self.map[self.tensor_range(info)])
    }

    /// Tensor `name` as a [`HostTensor`] whose bytes borrow the map (no copy).
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        Ok(HostTensor {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: TensorBytes::Mapped {
                map: Arc::clone(&self.map),
                range: self.tensor_range(info),
            },
        })
    }

    /// Total tensor bytes per type, in [`DType`] order: `(dtype, count, bytes)`.
    pub fn totals_by_type(&self) -> Vec<(DType, usize, u64)> {
        let mut out: Vec<(DType, usize, u64)> = Vec::new();
        for t in &self.layout.tensors {
            match out.iter_mut().find(|(d, _, _)| *d == t.dtype) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += t.n_bytes;
                }
                None => out.push((t.dtype, 1, t.n_bytes)),
            }
        }
        out.sort_by_key(|e| e.0);
        out
    }
}

/// The longest valid UTF-8 prefix. The parser validated every string, so this is the whole
/// string unless the file changed under the map.
fn utf8_prefix(bytes: &[u8]) -> &str {
    match std::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

fn key_type(key: &str, expected: &str, found: &Value<'_>) -> Error {
    Error::KeyType {
        key: key.to_string(),
        expected: expected.to_string(),
        found: found.type_name(),
    }
}

fn key_value(key: &str, what: String) -> Error {
    Error::KeyValue {
        key: key.to_string(),
        what,
    }
}
