//! Host tensors whose bytes are owned or borrowed straight out of a memory map.
//!
//! An 81 GB model file must never be copied onto the heap: [`TensorBytes::Mapped`] keeps a
//! reference-counted handle on the map and a byte range inside it, so a tensor is as cheap
//! as a pointer and the kernel reads the page cache directly.

use std::ops::Range;
use std::sync::Arc;

use crate::{DType, Shape};

/// Where a tensor's bytes live.
#[derive(Debug, Clone)]
pub enum TensorBytes {
    /// Bytes owned by this process (converted or computed data).
    Owned(Arc<Vec<u8>>),
    /// A byte range of a read-only memory map, shared with every other tensor of the file.
    Mapped {
        /// The whole file's map.
        map: Arc<memmap2::Mmap>,
        /// The tensor's bytes inside it; checked against the map length at construction.
        range: Range<usize>,
    },
}

impl TensorBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            TensorBytes::Owned(v) => v.as_slice(),
            TensorBytes::Mapped { map, range } => &map[range.clone()],
        }
    }

    /// True when the bytes are borrowed from a memory map (zero copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self, TensorBytes::Mapped { .. })
    }
}

/// A named, typed tensor in host memory (owned or memory-mapped).
#[derive(Debug, Clone)]
pub struct HostTensor {
    /// The tensor's name (the GGUF name for weights).
    pub name: String,
    /// Element or block type.
    pub dtype: DType,
    /// Shape in GGUF order.
    pub shape: Shape,
    /// The raw bytes, exactly `dtype.row_bytes(ne[0]) * n_rows` long.
    pub bytes: TensorBytes,
}

impl HostTensor {
    /// The raw bytes.
    pub fn data(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// Bytes of one row (`ne[0]` values).
    pub fn row_bytes(&self) -> usize {
        // The constructor of every HostTensor (the GGUF reader or an owner) has checked that
        // ne[0] is a whole number of blocks and that the size fits in memory.
        self.dtype
            .row_bytes(self.shape.ne(0))
            .expect("tensor row size validated at construction") as usize
    }

    /// Builds an owned F32 tensor from values in numpy order `dims_numpy`.
    pub fn from_f32(name: &str, dims_numpy: &[u64], values: &[f32]) -> HostTensor {
        HostTensor {
            name: name.to_string(),
            dtype: DType::F32,
            shape: Shape::from_numpy(dims_numpy),
            bytes: TensorBytes::Owned(Arc::new(bytemuck::cast_slice(values).to_vec())),
        }
    }
}
