//! Element and block types, numbered as in the ggml type table (FORMATS.md s1.8).
//!
//! Only the types that DeepSeek V4 files or our runtime use are listed; any other ggml id is
//! refused by [`DType::from_ggml_id`] with the id in the error, so a reader can name it.

/// An element or quantization-block type, with its ggml type id as discriminant.
///
/// The enum is `#[non_exhaustive]` so that later formats can be added without breaking
/// matches in other crates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
#[repr(u32)]
pub enum DType {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16.
    F16 = 1,
    /// 32 values: f16 scale + 32 x i8 (34 bytes).
    Q8_0 = 8,
    /// 256 values: 2-bit quants with 4-bit scales and mins (84 bytes).
    Q2K = 10,
    /// 256 values: 4-bit quants with 6-bit scales and mins (144 bytes).
    Q4K = 12,
    /// 256 values: f32 scale + 256 x i8 + 16 x i16 sums (292 bytes); activations only.
    Q8K = 15,
    /// 256 values: 2.06-bit lattice quants (66 bytes).
    Iq2Xxs = 16,
    /// Little-endian i32 (the hash-routing table).
    I32 = 26,
    /// bfloat16: the upper half of a binary32.
    BF16 = 30,
}

impl DType {
    /// Every type this crate knows, in id order.
    pub const ALL: [DType; 9] = [
        DType::F32,
        DType::F16,
        DType::Q8_0,
        DType::Q2K,
        DType::Q4K,
        DType::Q8K,
        DType::Iq2Xxs,
        DType::I32,
        DType::BF16,
    ];

    /// The ggml type id stored in GGUF tensor infos.
    pub const fn ggml_id(self) -> u32 {
        self as u32
    }

    /// Looks a ggml type id up; `None` for ids this engine does not support.
    pub fn from_ggml_id(id: u32) -> Option<DType> {
        DType::ALL.iter().copied().find(|t| t.ggml_id() == id)
    }

    /// The ggml name, as gguf-py and llama.cpp print it (`"Q2_K"`, `"IQ2_XXS"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::Q8_0 => "Q8_0",
            DType::Q2K => "Q2_K",
            DType::Q4K => "Q4_K",
            DType::Q8K => "Q8_K",
            DType::Iq2Xxs => "IQ2_XXS",
            DType::I32 => "I32",
            DType::BF16 => "BF16",
        }
    }

    /// Parses a ggml name (case-insensitive).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Values per block (1 for plain element types).
    pub const fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 | DType::I32 => 1,
            DType::Q8_0 => 32,
            DType::Q2K | DType::Q4K | DType::Q8K | DType::Iq2Xxs => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q2K => 84,
            DType::Q4K => 144,
            DType::Q8K => 292,
            DType::Iq2Xxs => 66,
        }
    }

    /// True for block-quantized formats (more than one value per block).
    pub const fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }

    /// Bytes taken by one row of `n` values, or `None` when `n` is not a whole number of
    /// blocks or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let be = self.block_elems() as u64;
        if !n.is_multiple_of(be) {
            return None;
        }
        (n / be).checked_mul(self.block_bytes() as u64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for t in DType::ALL {
            assert_eq!(DType::from_ggml_id(t.ggml_id()), Some(t));
            assert_eq!(DType::from_name(t.name()), Some(t));
        }
        assert_eq!(DType::from_ggml_id(2), None, "Q4_0 is not supported");
        assert_eq!(DType::from_ggml_id(31), None, "removed Q4_0_4_4");
    }

    #[test]
    fn row_bytes_checks_blocks() {
        assert_eq!(DType::Q2K.row_bytes(4096), Some(16 * 84));
        assert_eq!(DType::Iq2Xxs.row_bytes(4096), Some(16 * 66));
        assert_eq!(DType::Q8_0.row_bytes(33), None);
        assert_eq!(DType::F16.row_bytes(3), Some(6));
    }
}
