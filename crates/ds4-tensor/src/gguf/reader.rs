//! The GGUF parser: walks header, metadata and tensor infos of a byte slice and checks every
//! rule of FORMATS.md s1.10, producing a [`Layout`] of offsets that borrows nothing.
//!
//! Every length and count read from the file is checked against the bytes that remain
//! before anything is allocated or indexed with it, so hostile input costs at most O(file
//! size) time and memory and never panics.

use std::collections::HashMap;
use std::ops::Range;

use super::value::{ArrayValue, MAX_ARRAY_DEPTH, Value, ValueType};
use crate::{DType, Error, Result, Shape};

/// The four magic bytes at offset 0.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Header size: magic, version, tensor count, metadata count.
pub const HEADER_BYTES: usize = 24;
/// The most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Fewest bytes one metadata record can take: a u64 key length and a one-byte key, a type
/// id and a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Fewest bytes one tensor info can take: name (u64 + 1 byte), n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 1 + 4 + 8 + 4 + 8;

/// A parse failure inside a [`Cursor`]: what went wrong and at which byte.
#[derive(Debug, Clone)]
pub(crate) struct ParseError {
    pub(crate) offset: usize,
    pub(crate) what: String,
}

type PResult<T> = std::result::Result<T, ParseError>;

/// A bounds-checked little-endian reader over a byte slice.
#[derive(Debug, Clone)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn err<T>(&self, what: String) -> PResult<T> {
        Err(ParseError {
            offset: self.pos,
            what,
        })
    }

    /// Takes `n` bytes; `what` names them in the truncation error.
    fn take(&mut self, n: u64, what: &str) -> PResult<&'a [u8]> {
        let left = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= left => {
                let out = &self.buf[self.pos..self.pos + n];
                self.pos += n;
                Ok(out)
            }
            _ => self.err(format!("truncated: {what} needs {n} bytes, {left} left")),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> PResult<[u8; N]> {
        let b = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> PResult<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> PResult<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length, then that many bytes of UTF-8.
    pub(crate) fn string(&mut self) -> PResult<&'a str> {
        let start = self.pos;
        let len = self.u64("string length")?;
        let bytes = self.take(len, "string")?;
        std::str::from_utf8(bytes).map_err(|e| ParseError {
            offset: start,
            what: format!("string is not valid UTF-8 ({e})"),
        })
    }

    /// One value of type `ty` at nesting `depth` (0 for a top-level value), validating
    /// arrays completely (every string's length and UTF-8, every nested array).
    pub(crate) fn value(&mut self, ty: ValueType, depth: usize) -> PResult<Value<'a>> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array("UINT8")?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array("INT8")?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array("UINT16")?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array("INT16")?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array("UINT32")?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array("INT32")?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array("FLOAT32")?)),
            ValueType::Bool => Value::Bool(self.array::<1>("BOOL")?[0] != 0),
            ValueType::String => Value::String(self.string()?),
            ValueType::Array => Value::Array(self.array_value(depth)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array("UINT64")?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array("INT64")?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array("FLOAT64")?)),
        })
    }

    fn array_value(&mut self, depth: usize) -> PResult<ArrayValue<'a>> {
        if depth >= MAX_ARRAY_DEPTH {
            return self.err(format!(
                "arrays nested deeper than {MAX_ARRAY_DEPTH} levels"
            ));
        }
        let id = self.u32("array element type")?;
        let Some(elem_type) = ValueType::from_id(id) else {
            return self.err(format!("unknown array element type id {id}"));
        };
        let count = self.u64("array count")?;
        // Bound the count by the bytes left before walking or sizing anything with it.
        let min = elem_type.min_size() as u64;
        let left = self.remaining();
        let len = match count.checked_mul(min).and_then(|n| usize::try_from(n).ok()) {
            Some(n) if n <= left => count as usize,
            _ => {
                return self.err(format!(
                    "array of {count} {elem_type} elements cannot fit in the {left} bytes left"
                ));
            }
        };
        let start = self.pos;
        match elem_type.fixed_size() {
            Some(n) => {
                self.take((len * n) as u64, "array elements")?;
            }
            None => {
                for _ in 0..len {
                    self.value(elem_type, depth + 1)?;
                }
            }
        }
        Ok(ArrayValue {
            elem_type,
            len,
            depth,
            data: &self.buf[start..self.pos],
        })
    }
}

/// How a metadata value is kept after parsing: scalars decoded, strings and arrays as byte
/// ranges into the file, so that nothing borrows and nothing large is copied.
#[derive(Debug, Clone)]
pub(crate) enum Stored {
    /// A scalar (never `String` or `Array`).
    Scalar(Value<'static>),
    /// A string's bytes (validated UTF-8).
    Str(Range<usize>),
    /// An array's encoded elements.
    Array {
        elem_type: ValueType,
        len: usize,
        data: Range<usize>,
    },
}

/// One metadata record.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) key: Box<str>,
    pub(crate) value: Stored,
}

/// Where a tensor lies and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (unique in the file).
    pub name: String,
    /// Element or block type.
    pub dtype: DType,
    /// Shape in GGUF order (`ne[0]` first); 1 to 4 dimensions, each at least 1.
    pub shape: Shape,
    /// Offset of the data relative to the data section, as stored in the file (a multiple
    /// of the alignment).
    pub offset: u64,
    /// Exact size of the data in bytes (without padding).
    pub n_bytes: u64,
}

/// The parsed, validated structure of a GGUF file: offsets only, no borrowed data.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) version: u32,
    pub(crate) alignment: u64,
    pub(crate) data_start: u64,
    pub(crate) entries: Vec<Entry>,
    pub(crate) key_index: HashMap<Box<str>, usize>,
    pub(crate) tensors: Vec<TensorInfo>,
    pub(crate) tensor_index: HashMap<Box<str>, usize>,
}

fn invalid(what: String) -> Error {
    Error::InvalidGguf { what }
}

fn at(context: impl std::fmt::Display, e: ParseError) -> Error {
    invalid(format!("{context}: {} (at byte {})", e.what, e.offset))
}

/// Parses and validates `bytes` as a GGUF v2/v3 little-endian file.
pub(crate) fn parse(bytes: &[u8]) -> Result<Layout> {
    let file_len = bytes.len();
    if file_len >= 4 && bytes[..4] != MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(&bytes[..4]);
        return Err(Error::BadMagic { found });
    }
    if file_len < HEADER_BYTES {
        return Err(invalid(format!(
            "file is {file_len} bytes, shorter than the {HEADER_BYTES}-byte header"
        )));
    }
    let mut cur = Cursor::new(bytes);
    cur.pos = 4;
    let version = cur.u32("version").map_err(|e| at("header", e))?;
    match version {
        2 | 3 => {}
        v if v & 0xFFFF == 0 => {
            return Err(Error::UnsupportedVersion {
                version: v,
                why: "a big-endian GGUF file (only little-endian files are supported)".into(),
            });
        }
        1 => {
            return Err(Error::UnsupportedVersion {
                version,
                why: "GGUF v1 (32-bit counts) is obsolete".into(),
            });
        }
        v => {
            return Err(Error::UnsupportedVersion {
                version: v,
                why: "only versions 2 and 3 are supported".into(),
            });
        }
    }
    let n_tensors = cur.u64("tensor count").map_err(|e| at("header", e))?;
    let n_kv = cur.u64("metadata count").map_err(|e| at("header", e))?;
    // Bound both counts by the bytes left before allocating for them.
    let left = (file_len - HEADER_BYTES) as u64;
    let need = n_kv.checked_mul(MIN_KV_BYTES).and_then(|a| {
        n_tensors
            .checked_mul(MIN_TENSOR_INFO_BYTES)
            .and_then(|b| a.checked_add(b))
    });
    if need.is_none_or(|n| n > left) {
        return Err(invalid(format!(
            "header: {n_kv} metadata records and {n_tensors} tensor infos cannot fit in the {left} bytes after the header"
        )));
    }
    // Both counts are now below file_len / 14, so they fit in usize.
    let (n_kv, n_tensors) = (n_kv as usize, n_tensors as usize);

    let mut entries = Vec::with_capacity(n_kv);
    let mut key_index = HashMap::with_capacity(n_kv);
    for kv_idx in 0..n_kv {
        let key = cur
            .string()
            .map_err(|e| at(format_args!("metadata record {kv_idx}: key"), e))?;
        if key.is_empty() {
            return Err(invalid(format!("metadata record {kv_idx}: empty key")));
        }
        let type_id = cur
            .u32("value type")
            .map_err(|e| at(format_args!("metadata key {key}"), e))?;
        let Some(ty) = ValueType::from_id(type_id) else {
            return Err(invalid(format!(
                "metadata key {key}: unknown value type id {type_id}"
            )));
        };
        let start = cur.pos;
        let value = cur
            .value(ty, 0)
            .map_err(|e| at(format_args!("metadata key {key}"), e))?;
        let stored = match value {
            Value::String(_) => Stored::Str(start + 8..cur.pos),
            Value::Array(a) => Stored::Array {
                elem_type: a.elem_type,
                len: a.len,
                data: start + 12..cur.pos,
            },
            Value::U8(v) => Stored::Scalar(Value::U8(v)),
            Value::I8(v) => Stored::Scalar(Value::I8(v)),
            Value::U16(v) => Stored::Scalar(Value::U16(v)),
            Value::I16(v) => Stored::Scalar(Value::I16(v)),
            Value::U32(v) => Stored::Scalar(Value::U32(v)),
            Value::I32(v) => Stored::Scalar(Value::I32(v)),
            Value::F32(v) => Stored::Scalar(Value::F32(v)),
            Value::Bool(v) => Stored::Scalar(Value::Bool(v)),
            Value::U64(v) => Stored::Scalar(Value::U64(v)),
            Value::I64(v) => Stored::Scalar(Value::I64(v)),
            Value::F64(v) => Stored::Scalar(Value::F64(v)),
        };
        let key: Box<str> = key.into();
        if key_index.insert(key.clone(), entries.len()).is_some() {
            return Err(Error::DuplicateKey { key: key.into() });
        }
        entries.push(Entry { key, value: stored });
    }

    let alignment = match key_index.get(ALIGNMENT_KEY).map(|&i| &entries[i].value) {
        None => DEFAULT_ALIGNMENT,
        Some(Stored::Scalar(Value::U32(a))) if *a != 0 && a.is_power_of_two() => u64::from(*a),
        Some(Stored::Scalar(Value::U32(a))) => {
            return Err(invalid(format!(
                "{ALIGNMENT_KEY} = {a}: must be a non-zero power of two"
            )));
        }
        Some(_) => return Err(invalid(format!("{ALIGNMENT_KEY}: must be UINT32"))),
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors);
    let mut tensor_index = HashMap::with_capacity(n_tensors);
    for tensor_idx in 0..n_tensors {
        let name = cur
            .string()
            .map_err(|e| at(format_args!("tensor info {tensor_idx}: name"), e))?;
        if name.is_empty() {
            return Err(invalid(format!("tensor info {tensor_idx}: empty name")));
        }
        let ctx = |e| at(format_args!("tensor {name}"), e);
        let n_dims = cur.u32("n_dims").map_err(ctx)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(invalid(format!(
                "tensor {name}: n_dims = {n_dims}, must be 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = [0u64; MAX_DIMS];
        for (i, d) in dims.iter_mut().take(n_dims as usize).enumerate() {
            *d = cur.u64("dimension").map_err(ctx)?;
            if *d == 0 {
                return Err(invalid(format!("tensor {name}: ne[{i}] = 0")));
            }
        }
        let dims = &dims[..n_dims as usize];
        let type_id = cur.u32("type").map_err(ctx)?;
        let Some(dtype) = DType::from_ggml_id(type_id) else {
            return Err(Error::UnknownDType {
                tensor: name.to_string(),
                id: type_id,
            });
        };
        let offset = cur.u64("offset").map_err(ctx)?;
        let shape = Shape::from_gguf(dims);
        if shape.elem_count().is_none() {
            return Err(invalid(format!(
                "tensor {name}: element count of {shape} overflows"
            )));
        }
        let Some(row_bytes) = dtype.row_bytes(dims[0]) else {
            return Err(invalid(format!(
                "tensor {name}: ne[0] = {} is not a multiple of the {dtype} block size {}",
                dims[0],
                dtype.block_elems()
            )));
        };
        let Some(n_bytes) = shape.n_rows().and_then(|r| r.checked_mul(row_bytes)) else {
            return Err(invalid(format!(
                "tensor {name}: byte size of {shape} {dtype} overflows"
            )));
        };
        let name: Box<str> = name.into();
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(Error::DuplicateTensor { name: name.into() });
        }
        tensors.push(TensorInfo {
            name: name.into(),
            dtype,
            shape,
            offset,
            n_bytes,
        });
    }

    let infos_end = cur.pos as u64;
    let data_start = infos_end.div_ceil(alignment) * alignment;
    let file_len = file_len as u64;
    for t in &tensors {
        let name = &t.name;
        if t.offset % alignment != 0 {
            return Err(invalid(format!(
                "tensor {name}: offset {} is not a multiple of the alignment {alignment}",
                t.offset
            )));
        }
        let end = data_start
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        if end.is_none_or(|end| end > file_len) {
            return Err(invalid(format!(
                "tensor {name}: data at offset {} + {} bytes (data section at {data_start}) lies outside the {file_len}-byte file",
                t.offset, t.n_bytes
            )));
        }
    }
    // Tensors may be stored in any order, but no two may share a byte.
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_unstable_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        // Both ends were checked against the file length above: no overflow.
        if pair[0].offset + pair[0].n_bytes > pair[1].offset {
            return Err(invalid(format!(
                "tensors {} and {} overlap (offsets {} + {} bytes and {})",
                pair[0].name, pair[1].name, pair[0].offset, pair[0].n_bytes, pair[1].offset
            )));
        }
    }

    Ok(Layout {
        version,
        alignment,
        data_start,
        entries,
        key_index,
        tensors,
        tensor_index,
    })
}
