//! Block layouts, byte for byte as FORMATS.md s2 gives them.
//!
//! Every struct is `#[repr(C)]`, has no padding (checked at compile time) and is
//! [`bytemuck::Pod`], so a slice of raw tensor bytes from a memory map is cast to a slice of
//! blocks without copying. GGUF aligns tensor data to 32 bytes, which satisfies the 2-byte
//! alignment of the weight blocks.

use bytemuck::{Pod, Zeroable};
use half::f16;

/// Values per K-quant and IQ super-block.
pub const QK_K: usize = 256;
/// Values per Q8_0 block.
pub const QK8_0: usize = 32;

/// Q8_0: 32 values, `x = d * q` (34 bytes).
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quants.
    pub qs: [i8; QK8_0],
}

/// Q2_K: 256 values in 16 sub-blocks of 16, 2-bit quants with 4-bit scale and min (84 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ2K {
    /// Low nibble: scale of sub-block s; high nibble: its min.
    pub scales: [u8; QK_K / 16],
    /// 2-bit quants, four per byte (FORMATS.md s2.4 for the element order).
    pub qs: [u8; QK_K / 4],
    /// Super-scale of the scales.
    pub d: f16,
    /// Super-scale of the mins.
    pub dmin: f16,
}

/// Q4_K: 256 values in 8 sub-blocks of 32, 4-bit quants with 6-bit scale and min (144 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ4K {
    /// Super-scale of the scales.
    pub d: f16,
    /// Super-scale of the mins.
    pub dmin: f16,
    /// Eight 6-bit scales and eight 6-bit mins, packed (FORMATS.md s2.5).
    pub scales: [u8; 12],
    /// 4-bit quants, two per byte.
    pub qs: [u8; QK_K / 2],
}

/// IQ2_XXS: 256 values in 8 groups of 32, lattice indices, sign codes, 4-bit scales (66 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockIq2Xxs {
    /// Block scale.
    pub d: f16,
    /// 8 groups of 8 bytes: 4 grid indices, then a u32 LE with four 7-bit sign codes and
    /// the 4-bit group scale in bits 28..32.
    pub qs: [u8; QK_K / 4],
}

/// Q8_K: the activation format paired with Q2_K, Q4_K and IQ2_XXS (292 bytes, runtime only).
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale (f32; negative when the extreme value is positive, FORMATS.md s2.7).
    pub d: f32,
    /// Quants.
    pub qs: [i8; QK_K],
    /// Sums of each 16 consecutive quants.
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(size_of::<BlockQ8_0>() == 34);
const _: () = assert!(size_of::<BlockQ2K>() == 84);
const _: () = assert!(size_of::<BlockQ4K>() == 144);
const _: () = assert!(size_of::<BlockIq2Xxs>() == 66);
const _: () = assert!(size_of::<BlockQ8K>() == 292);
