//! GGUF metadata values: the type table, values borrowed from the file, and owned values for
//! the writer.
//!
//! The reader never copies a string or an array out of the file: [`Value`] and [`ArrayValue`]
//! borrow from the mapped bytes, and an array is decoded element by element only when it is
//! iterated. That keeps opening a model with a 129 280-entry token array and its merges cheap.
//! [`OwnedValue`] is what the writer takes (and what a round-trip test compares).

use super::reader::Cursor;

/// The deepest nesting of arrays the reader accepts (an array of arrays is depth 2).
///
/// DeepSeek V4 files never nest arrays; the limit only bounds the recursion on hostile input.
/// It is the limit ds4 uses when it skips values.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// A metadata value type, numbered as in the GGUF specification (FORMATS.md s1.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// `u8`.
    U8 = 0,
    /// `i8`.
    I8 = 1,
    /// `u16`.
    U16 = 2,
    /// `i16`.
    I16 = 3,
    /// `u32`.
    U32 = 4,
    /// `i32`.
    I32 = 5,
    /// `f32`.
    F32 = 6,
    /// One byte, nonzero = true.
    Bool = 7,
    /// `u64` length + UTF-8 bytes.
    String = 8,
    /// `u32` element type + `u64` count + elements.
    Array = 9,
    /// `u64`.
    U64 = 10,
    /// `i64`.
    I64 = 11,
    /// `f64`.
    F64 = 12,
}

impl ValueType {
    /// Looks a GGUF value type id up; `None` for an unknown id.
    pub const fn from_id(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The id stored in the file.
    pub const fn id(self) -> u32 {
        self as u32
    }

    /// The name gguf-py uses (`"UINT32"`, `"FLOAT32"`, `"STRING"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "UINT8",
            ValueType::I8 => "INT8",
            ValueType::U16 => "UINT16",
            ValueType::I16 => "INT16",
            ValueType::U32 => "UINT32",
            ValueType::I32 => "INT32",
            ValueType::F32 => "FLOAT32",
            ValueType::Bool => "BOOL",
            ValueType::String => "STRING",
            ValueType::Array => "ARRAY",
            ValueType::U64 => "UINT64",
            ValueType::I64 => "INT64",
            ValueType::F64 => "FLOAT64",
        }
    }

    /// Encoded size of a fixed-size type; `None` for strings and arrays.
    pub const fn fixed_size(self) -> Option<usize> {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
            ValueType::U16 | ValueType::I16 => Some(2),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
            ValueType::String | ValueType::Array => None,
        }
    }

    /// The fewest bytes one value of this type can take: what bounds an untrusted count.
    pub(crate) const fn min_size(self) -> usize {
        match self.fixed_size() {
            Some(n) => n,
            // A u64 length; an element type and a u64 count.
            None => match self {
                ValueType::String => 8,
                _ => 12,
            },
        }
    }
}

impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value borrowed from the file's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// UINT8.
    U8(u8),
    /// INT8.
    I8(i8),
    /// UINT16.
    U16(u16),
    /// INT16.
    I16(i16),
    /// UINT32.
    U32(u32),
    /// INT32.
    I32(i32),
    /// FLOAT32.
    F32(f32),
    /// BOOL.
    Bool(bool),
    /// STRING (validated UTF-8).
    String(&'a str),
    /// ARRAY, decoded lazily.
    Array(ArrayValue<'a>),
    /// UINT64.
    U64(u64),
    /// INT64.
    I64(i64),
    /// FLOAT64.
    F64(f64),
}

impl<'a> Value<'a> {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The full type as error messages and fixtures spell it: `"UINT32"`,
    /// `"ARRAY[STRING]"`, `"ARRAY[ARRAY[INT32]]"` (the inner type of a nested array is the
    /// first element's; an empty nested array prints as `ARRAY[ARRAY]`).
    pub fn type_name(&self) -> String {
        match self {
            Value::Array(a) => a.type_name(),
            v => v.value_type().name().to_string(),
        }
    }

    /// Converts to an owned value (copies strings and arrays).
    pub fn to_owned_value(&self) -> OwnedValue {
        match *self {
            Value::U8(v) => OwnedValue::U8(v),
            Value::I8(v) => OwnedValue::I8(v),
            Value::U16(v) => OwnedValue::U16(v),
            Value::I16(v) => OwnedValue::I16(v),
            Value::U32(v) => OwnedValue::U32(v),
            Value::I32(v) => OwnedValue::I32(v),
            Value::F32(v) => OwnedValue::F32(v),
            Value::Bool(v) => OwnedValue::Bool(v),
            Value::String(s) => OwnedValue::String(s.to_string()),
            Value::Array(a) => OwnedValue::Array(a.to_owned_array()),
            Value::U64(v) => OwnedValue::U64(v),
            Value::I64(v) => OwnedValue::I64(v),
            Value::F64(v) => OwnedValue::F64(v),
        }
    }

    /// The value widened to `f64` for any numeric type (not bool, string or array).
    pub fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::F32(v) => v.into(),
            Value::U64(v) => v as f64,
            Value::I64(v) => v as f64,
            Value::F64(v) => v,
            Value::Bool(_) | Value::String(_) | Value::Array(_) => return None,
        })
    }

    /// The value as `u64` for any unsigned integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as `i64` for any integer type that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }
}

/// A metadata array borrowed from the file: element type, count and the encoded elements.
///
/// The reader has validated every element when it opened the file, so iteration cannot fail
/// on an unchanged file; fixed-size elements are also reachable by index in O(1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArrayValue<'a> {
    pub(crate) elem_type: ValueType,
    pub(crate) len: usize,
    pub(crate) depth: usize,
    /// The encoded elements, exactly.
    pub(crate) data: &'a [u8],
}

impl<'a> ArrayValue<'a> {
    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        self.elem_type
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The encoded elements as they lie in the file.
    pub fn raw_bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Iterates over the elements, decoding each on the fly.
    pub fn iter(&self) -> ArrayIter<'a> {
        ArrayIter {
            cur: Cursor::new(self.data),
            elem_type: self.elem_type,
            left: self.len,
            depth: self.depth,
        }
    }

    /// Element `i`: O(1) for fixed-size elements, O(i) for strings and arrays.
    pub fn get(&self, i: usize) -> Option<Value<'a>> {
        if i >= self.len {
            return None;
        }
        match self.elem_type.fixed_size() {
            Some(n) => {
                let mut cur = Cursor::new(self.data.get(i * n..)?);
                cur.value(self.elem_type, self.depth + 1).ok()
            }
            None => self.iter().nth(i),
        }
    }

    /// The full type, such as `"ARRAY[UINT32]"` (see [`Value::type_name`]).
    pub fn type_name(&self) -> String {
        match self.elem_type {
            ValueType::Array => match self.iter().next() {
                Some(first) => format!("ARRAY[{}]", first.type_name()),
                None => "ARRAY[ARRAY]".to_string(),
            },
            t => format!("ARRAY[{}]", t.name()),
        }
    }

    /// Iterates over the strings of an array of strings; `None` for another element type.
    pub fn strings(&self) -> Option<impl ExactSizeIterator<Item = &'a str> + 'a> {
        if self.elem_type != ValueType::String {
            return None;
        }
        Some(StrIter {
            cur: Cursor::new(self.data),
            left: self.len,
        })
    }

    /// Copies the array into an owned one.
    pub fn to_owned_array(&self) -> OwnedArray {
        fn collect<'a, T>(a: &ArrayValue<'a>, f: impl Fn(Value<'a>) -> Option<T>) -> Vec<T> {
            a.iter().filter_map(f).collect()
        }
        macro_rules! typed {
            ($variant:ident) => {
                OwnedArray::$variant(collect(self, |v| match v {
                    Value::$variant(x) => Some(x),
                    _ => None,
                }))
            };
        }
        match self.elem_type {
            ValueType::U8 => typed!(U8),
            ValueType::I8 => typed!(I8),
            ValueType::U16 => typed!(U16),
            ValueType::I16 => typed!(I16),
            ValueType::U32 => typed!(U32),
            ValueType::I32 => typed!(I32),
            ValueType::F32 => typed!(F32),
            ValueType::Bool => typed!(Bool),
            ValueType::U64 => typed!(U64),
            ValueType::I64 => typed!(I64),
            ValueType::F64 => typed!(F64),
            ValueType::String => OwnedArray::String(collect(self, |v| match v {
                Value::String(s) => Some(s.to_string()),
                _ => None,
            })),
            ValueType::Array => OwnedArray::Array(collect(self, |v| match v {
                Value::Array(a) => Some(a.to_owned_array()),
                _ => None,
            })),
        }
    }
}

impl<'a> IntoIterator for ArrayValue<'a> {
    type Item = Value<'a>;
    type IntoIter = ArrayIter<'a>;

    fn into_iter(self) -> ArrayIter<'a> {
        self.iter()
    }
}

/// Iterator over the elements of an [`ArrayValue`].
#[derive(Debug, Clone)]
pub struct ArrayIter<'a> {
    cur: Cursor<'a>,
    elem_type: ValueType,
    left: usize,
    depth: usize,
}

impl<'a> Iterator for ArrayIter<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // The bytes were validated when the file was opened; an error here means the file
        // changed under the map. Stop rather than panic.
        match self.cur.value(self.elem_type, self.depth + 1) {
            Ok(v) => Some(v),
            Err(_) => {
                self.left = 0;
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// Iterator over an array of strings (see [`ArrayValue::strings`]).
#[derive(Debug, Clone)]
struct StrIter<'a> {
    cur: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for StrIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        match self.cur.string() {
            Ok(s) => Some(s),
            Err(_) => {
                // Only if the file changed under the map: yield empty strings so the count
                // stays what the header promised.
                Some("")
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for StrIter<'_> {}

/// An owned metadata value, as the writer takes it.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedValue {
    /// UINT8.
    U8(u8),
    /// INT8.
    I8(i8),
    /// UINT16.
    U16(u16),
    /// INT16.
    I16(i16),
    /// UINT32.
    U32(u32),
    /// INT32.
    I32(i32),
    /// FLOAT32.
    F32(f32),
    /// BOOL.
    Bool(bool),
    /// STRING.
    String(String),
    /// ARRAY.
    Array(OwnedArray),
    /// UINT64.
    U64(u64),
    /// INT64.
    I64(i64),
    /// FLOAT64.
    F64(f64),
}

impl OwnedValue {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            OwnedValue::U8(_) => ValueType::U8,
            OwnedValue::I8(_) => ValueType::I8,
            OwnedValue::U16(_) => ValueType::U16,
            OwnedValue::I16(_) => ValueType::I16,
            OwnedValue::U32(_) => ValueType::U32,
            OwnedValue::I32(_) => ValueType::I32,
            OwnedValue::F32(_) => ValueType::F32,
            OwnedValue::Bool(_) => ValueType::Bool,
            OwnedValue::String(_) => ValueType::String,
            OwnedValue::Array(_) => ValueType::Array,
            OwnedValue::U64(_) => ValueType::U64,
            OwnedValue::I64(_) => ValueType::I64,
            OwnedValue::F64(_) => ValueType::F64,
        }
    }

    /// Appends the encoded value (without its type id) to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            OwnedValue::U8(v) => out.push(*v),
            OwnedValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::Bool(v) => out.push(u8::from(*v)),
            OwnedValue::String(s) => encode_str(s, out),
            OwnedValue::Array(a) => a.encode(out),
            OwnedValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            OwnedValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        }
    }
}

/// Appends a GGUF string (u64 length + bytes) to `out`.
pub(crate) fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An owned, homogeneous metadata array.
///
/// One variant per element type keeps arrays homogeneous by construction; only an array of
/// arrays may mix inner element types, as the format allows.
#[derive(Debug, Clone, PartialEq)]
pub enum OwnedArray {
    /// ARRAY of UINT8.
    U8(Vec<u8>),
    /// ARRAY of INT8.
    I8(Vec<i8>),
    /// ARRAY of UINT16.
    U16(Vec<u16>),
    /// ARRAY of INT16.
    I16(Vec<i16>),
    /// ARRAY of UINT32.
    U32(Vec<u32>),
    /// ARRAY of INT32.
    I32(Vec<i32>),
    /// ARRAY of FLOAT32.
    F32(Vec<f32>),
    /// ARRAY of BOOL.
    Bool(Vec<bool>),
    /// ARRAY of STRING.
    String(Vec<String>),
    /// ARRAY of ARRAY.
    Array(Vec<OwnedArray>),
    /// ARRAY of UINT64.
    U64(Vec<u64>),
    /// ARRAY of INT64.
    I64(Vec<i64>),
    /// ARRAY of FLOAT64.
    F64(Vec<f64>),
}

impl OwnedArray {
    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        match self {
            OwnedArray::U8(_) => ValueType::U8,
            OwnedArray::I8(_) => ValueType::I8,
            OwnedArray::U16(_) => ValueType::U16,
            OwnedArray::I16(_) => ValueType::I16,
            OwnedArray::U32(_) => ValueType::U32,
            OwnedArray::I32(_) => ValueType::I32,
            OwnedArray::F32(_) => ValueType::F32,
            OwnedArray::Bool(_) => ValueType::Bool,
            OwnedArray::String(_) => ValueType::String,
            OwnedArray::Array(_) => ValueType::Array,
            OwnedArray::U64(_) => ValueType::U64,
            OwnedArray::I64(_) => ValueType::I64,
            OwnedArray::F64(_) => ValueType::F64,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            OwnedArray::U8(v) => v.len(),
            OwnedArray::I8(v) => v.len(),
            OwnedArray::U16(v) => v.len(),
            OwnedArray::I16(v) => v.len(),
            OwnedArray::U32(v) => v.len(),
            OwnedArray::I32(v) => v.len(),
            OwnedArray::F32(v) => v.len(),
            OwnedArray::Bool(v) => v.len(),
            OwnedArray::String(v) => v.len(),
            OwnedArray::Array(v) => v.len(),
            OwnedArray::U64(v) => v.len(),
            OwnedArray::I64(v) => v.len(),
            OwnedArray::F64(v) => v.len(),
        }
    }

    /// True when the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How deeply arrays nest in this one (1 for an array of scalars).
    pub fn depth(&self) -> usize {
        match self {
            OwnedArray::Array(v) => 1 + v.iter().map(OwnedArray::depth).max().unwrap_or(0),
            _ => 1,
        }
    }

    /// Appends element type, count and elements to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.elem_type().id().to_le_bytes());
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        fn each<T: Copy, const N: usize>(v: &[T], out: &mut Vec<u8>, f: impl Fn(T) -> [u8; N]) {
            for &x in v {
                out.extend_from_slice(&f(x));
            }
        }
        match self {
            OwnedArray::U8(v) => out.extend_from_slice(v),
            OwnedArray::I8(v) => each(v, out, i8::to_le_bytes),
            OwnedArray::U16(v) => each(v, out, u16::to_le_bytes),
            OwnedArray::I16(v) => each(v, out, i16::to_le_bytes),
            OwnedArray::U32(v) => each(v, out, u32::to_le_bytes),
            OwnedArray::I32(v) => each(v, out, i32::to_le_bytes),
            OwnedArray::F32(v) => each(v, out, f32::to_le_bytes),
            OwnedArray::Bool(v) => each(v, out, |b| [u8::from(b)]),
            OwnedArray::String(v) => v.iter().for_each(|s| encode_str(s, out)),
            OwnedArray::Array(v) => v.iter().for_each(|a| a.encode(out)),
            OwnedArray::U64(v) => each(v, out, u64::to_le_bytes),
            OwnedArray::I64(v) => each(v, out, i64::to_le_bytes),
            OwnedArray::F64(v) => each(v, out, f64::to_le_bytes),
        }
    }
}

macro_rules! from_scalar {
    ($($t:ty => $variant:ident),* $(,)?) => {$(
        impl From<$t> for OwnedValue {
            fn from(v: $t) -> OwnedValue {
                OwnedValue::$variant(v)
            }
        }
        impl From<Vec<$t>> for OwnedArray {
            fn from(v: Vec<$t>) -> OwnedArray {
                OwnedArray::$variant(v)
            }
        }
        impl From<Vec<$t>> for OwnedValue {
            fn from(v: Vec<$t>) -> OwnedValue {
                OwnedValue::Array(OwnedArray::$variant(v))
            }
        }
    )*};
}

from_scalar!(
    u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64,
);

impl From<&str> for OwnedValue {
    fn from(v: &str) -> OwnedValue {
        OwnedValue::String(v.to_string())
    }
}

impl From<Vec<&str>> for OwnedValue {
    fn from(v: Vec<&str>) -> OwnedValue {
        OwnedValue::Array(OwnedArray::String(
            v.into_iter().map(str::to_string).collect(),
        ))
    }
}

impl From<OwnedArray> for OwnedValue {
    fn from(v: OwnedArray) -> OwnedValue {
        OwnedValue::Array(v)
    }
}

impl From<Vec<OwnedArray>> for OwnedValue {
    fn from(v: Vec<OwnedArray>) -> OwnedValue {
        OwnedValue::Array(OwnedArray::Array(v))
    }
}
