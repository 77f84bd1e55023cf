//! Fast CPU dot products with run-time instruction-set dispatch.
//!
//! Every weight format has one dot kernel per instruction set: AVX2+FMA+F16C (the x86-64
//! baseline we ask for), AVX-512 with VNNI (`avx512f`, `avx512bw`, `avx512vl`, `avx512vnni`,
//! plus `bmi2`) and NEON (every aarch64 CPU). The scalar functions in the format modules
//! ([`crate::q8_0::dot`], [`crate::q2_k::dot`], ...) *define* the results; the fast kernels
//! compute the same integer block sums exactly and differ only in the order in which f32
//! partial sums are added (FORMATS.md s2.8). `tests/kernels.rs` checks every kernel the CPU
//! can run against its scalar reference.
//!
//! The best instruction set is detected once and cached; the environment variable
//! `DS4_SIMD` (`scalar`, `avx2`, `avx512`, `avx512vbmi`, `neon`) caps it, so the scalar
//! fallback can be exercised on any machine (`DS4_SIMD=scalar cargo test`). A request for an
//! instruction set the CPU lacks falls back to the best one it has below it. Callers that loop over many
//! rows fetch a [`Kernels`] table once ([`active`]) and call through its function pointers,
//! so the per-call cost of dispatch is one indirect call.
//!
//! Multi-token kernels: every format also has a `*_n` entry ([`DotQ8_0N`] and friends) that
//! runs one weight row against several tokens and returns, for each token, exactly the bits of
//! the single-row kernel of the same table (so batched prefill equals decode). Real ones live
//! in `tiles_x86.rs` (Q8_0, AVX2 Q4_K, F16), `q4k_avx512.rs` (AVX-512 Q4_K) and with the
//! IQ2_XXS / Q2_K kernels; the rest loop over the single kernel (`dot_n_loop!`).
//! `tests/kernels_n.rs` checks the bit identity.
//!
//! Prepared activations: a table may also offer [`Prepared`] kernels for a weight format
//! (the AVX-512 VBMI table does for IQ2_XXS and Q2_K). They read Q8_K activations rearranged
//! once per matrix call ([`BlockQ8KPrep`]) into the order in which that table's kernel
//! decodes weights cheapest; [`crate::gemv`] uses them when present. The table's plain
//! entries give the same bits (they prepare internally on each call).
//!
//! Activation precondition: the quant kernels use the sign trick of ggml (`|w| * sign(x, w)`
//! with `maddubs`/`dpbusd`), which is exact for activation quants in `[-127, 127]`. The
//! quantizers [`crate::q8_k::quantize`] and [`crate::q8_0::quantize`] never emit `-128`, so
//! activations produced by them always qualify.

use std::sync::OnceLock;

use half::{bf16, f16};

use crate::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};

/// Defines `fn $name(w, x, out)`: the multi-token form of the single-row dot `$single`,
/// as a plain loop over the tokens. Every ISA starts from this wrapper (so `out[t]` is
/// trivially the single dot of token `t`); formats with a real multi-token kernel replace it.
macro_rules! dot_n_loop {
    ($name:ident, $single:path, $w:ty, $x:ty) => {
        #[allow(dead_code)]
        pub(crate) fn $name(w: &[$w], x: &[$x], out: &mut [f32]) {
            let nb = w.len();
            assert_eq!(
                x.len(),
                nb * out.len(),
                concat!(stringify!($name), ": activation length mismatch")
            );
            for (t, o) in out.iter_mut().enumerate() {
                *o = $single(w, &x[t * nb..(t + 1) * nb]);
            }
        }
    };
}

/// Runs the caller's `$block!(i, parity)` over blocks `0..$nb` in pairs, `parity` 0 for even
/// and 1 for odd blocks, then the odd last block with parity 0. The parity is a literal, so
/// the kernel's per-parity accumulators stay in registers (indexed by a run-time `i & 1`
/// they lived on the stack, a store-forward on every FMA; docs/BENCH.md).
#[allow(unused_macros)]
macro_rules! for_block_pairs {
    ($nb:expr, $block:ident) => {{
        let nb = $nb;
        let mut i = 0;
        while i + 1 < nb {
            $block!(i, 0);
            $block!(i + 1, 1);
            i += 2;
        }
        if i < nb {
            $block!(i, 0);
        }
    }};
}

/// Defines `fn $name(w, x, out)` over `unsafe fn $kernel<const NT: usize>(w, x, out)`, a
/// multi-token kernel that handles exactly `NT` tokens in one pass over the weights (and
/// whose `NT = 1` instance is the table's single-row dot): splits `out` into passes of at
/// most 8 tokens and calls the instance of matching size, so that every token count keeps
/// its accumulators in registers. `$kernel` may only need the features that guard the
/// table the defined function is put in.
#[allow(unused_macros)]
macro_rules! dot_n_passes {
    ($name:ident, $kernel:ident, $w:ty, $x:ty) => {
        fn $name(w: &[$w], x: &[$x], out: &mut [f32]) {
            let nb = w.len();
            assert_eq!(
                x.len(),
                nb * out.len(),
                concat!(stringify!($name), ": activation length mismatch")
            );
            for (p, o) in out.chunks_mut(8).enumerate() {
                let xs = &x[8 * p * nb..(8 * p + o.len()) * nb];
                // SAFETY: only reachable through the kernel table, which is handed out after
                // the CPU was found to support its features; `xs` holds `o.len()` tokens.
                unsafe {
                    match o.len() {
                        1 => $kernel::<1>(w, xs, o),
                        2 => $kernel::<2>(w, xs, o),
                        3 => $kernel::<3>(w, xs, o),
                        4 => $kernel::<4>(w, xs, o),
                        5 => $kernel::<5>(w, xs, o),
                        6 => $kernel::<6>(w, xs, o),
                        7 => $kernel::<7>(w, xs, o),
                        _ => $kernel::<8>(w, xs, o),
                    }
                }
            }
        }
    };
}

/// Distance of the software prefetch in the weight stream, in bytes (x86 kernels that stream
/// weight rows; 1.5-3 KiB measured best on Zen 4).
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 2048;

/// Prefetches the cache lines `PREFETCH_BYTES` past the start of block `b`, as many as the
/// block can touch. Past the end of a row it reaches the next row (or nothing): harmless.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "sse")]
fn prefetch_ahead<B>(b: &B) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let p = (b as *const B).cast::<i8>().wrapping_add(PREFETCH_BYTES);
    // A prefetch is only a hint: it never faults, whatever the address.
    for line in 0..=size_of::<B>() / 64 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * line));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_vbmi;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod q4k_avx512;
#[cfg(target_arch = "x86_64")]
mod quant_x86;
#[cfg(target_arch = "x86_64")]
mod tiles_x86;

/// An instruction set a kernel table is written for, from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// The scalar references of the format modules.
    Scalar,
    /// AArch64 Advanced SIMD (always present on aarch64).
    Neon,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL) with VNNI (and BMI2, which every AVX-512 CPU has).
    Avx512Vnni,
    /// The AVX-512 VNNI set plus VBMI, BITALG and GFNI (Zen 4, Ice Lake and later): the
    /// 2-bit expert formats decode their blocks in registers.
    Avx512Vbmi,
}

impl Isa {
    /// Every instruction set, least capable first.
    pub const ALL: [Isa; 5] = [
        Isa::Scalar,
        Isa::Neon,
        Isa::Avx2,
        Isa::Avx512Vnni,
        Isa::Avx512Vbmi,
    ];

    /// The name `DS4_SIMD` accepts for this instruction set.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512",
            Isa::Avx512Vbmi => "avx512vbmi",
        }
    }

    /// Parses a `DS4_SIMD` value (case-insensitive); `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Whether the CPU this process runs on can execute this instruction set.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Neon => cfg!(target_arch = "aarch64"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                Isa::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("bmi2")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vbmi => {
                Isa::Avx512Vnni.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512vbmi")
                    && std::arch::is_x86_feature_detected!("avx512bitalg")
                    && std::arch::is_x86_feature_detected!("gfni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512Vnni | Isa::Avx512Vbmi => false,
        }
    }
}

/// Dot product of a Q8_0 weight row with Q8_0 activations.
pub type DotQ8_0 = fn(&[BlockQ8_0], &[BlockQ8_0]) -> f32;
/// Dot product of a Q2_K weight row with Q8_K activations.
pub type DotQ2K = fn(&[BlockQ2K], &[BlockQ8K]) -> f32;
/// Dot product of a Q4_K weight row with Q8_K activations.
pub type DotQ4K = fn(&[BlockQ4K], &[BlockQ8K]) -> f32;
/// Dot product of an IQ2_XXS weight row with Q8_K activations.
pub type DotIq2Xxs = fn(&[BlockIq2Xxs], &[BlockQ8K]) -> f32;
/// Dot product of an F16 weight row with f32 activations.
pub type DotF16 = fn(&[f16], &[f32]) -> f32;
/// Dot product of a BF16 weight row with f32 activations.
pub type DotBf16 = fn(&[bf16], &[f32]) -> f32;
/// Dot product of two f32 rows.
pub type DotF32 = fn(&[f32], &[f32]) -> f32;

// Multi-token ("_n") kernels: one weight row `w` of `nb = w.len()` blocks (or elements)
// against `out.len()` activation rows stored one after another in `x`
// (`x.len() == out.len() * w.len()`). `out[t]` is bit-identical to the single-row dot of the
// same table on `x[t * nb..(t + 1) * nb]`: the kernels may share the weight unpacking across
// tokens but keep each token's reduction order. They panic on a length mismatch.

/// Q8_0 weight row x `out.len()` Q8_0 activation rows.
pub type DotQ8_0N = fn(w: &[BlockQ8_0], x: &[BlockQ8_0], out: &mut [f32]);
/// Q2_K weight row x `out.len()` Q8_K activation rows.
pub type DotQ2KN = fn(w: &[BlockQ2K], x: &[BlockQ8K], out: &mut [f32]);
/// Q4_K weight row x `out.len()` Q8_K activation rows.
pub type DotQ4KN = fn(w: &[BlockQ4K], x: &[BlockQ8K], out: &mut [f32]);
/// IQ2_XXS weight row x `out.len()` Q8_K activation rows.
pub type DotIq2XxsN = fn(w: &[BlockIq2Xxs], x: &[BlockQ8K], out: &mut [f32]);
/// F16 weight row x `out.len()` f32 activation rows.
pub type DotF16N = fn(w: &[f16], x: &[f32], out: &mut [f32]);
/// BF16 weight row x `out.len()` f32 activation rows.
pub type DotBf16N = fn(w: &[bf16], x: &[f32], out: &mut [f32]);
/// f32 weight row x `out.len()` f32 activation rows.
pub type DotF32N = fn(w: &[f32], x: &[f32], out: &mut [f32]);
/// Q8_0 weight row x up to 8 Q8_0 activation rows (`out.len()` of them) that the caller has
/// packed once per token group with [`pack_q8_0_group`] (`xp`, and the f32 block scales
/// `xd`: `xd[8 * i + t]` is token `t`'s scale in block `i`, `xd.len() == 8 * w.len()`). Same
/// bits as the table's single dot; doing the activation work (scale conversion,
/// pairing two tokens per 512-bit vector, the `+128` offset that lets `vpdpbusd` take signed
/// weights directly) once per token group instead of once per weight row is what makes it
/// faster than [`DotQ8_0N`].
pub type DotQ8_0G = fn(w: &[BlockQ8_0], xp: &[u8], xd: &[f32], out: &mut [f32]);

/// Q8_0 activation quantization with the fastest code this CPU has: the same bytes as
/// [`crate::q8_0::quantize`] (AVX-512 when the active table is an AVX-512 one).
///
/// # Panics
/// If `x.len() != 32 * out.len()`.
pub fn quantize_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    #[cfg(target_arch = "x86_64")]
    if active_isa() >= Isa::Avx512Vnni {
        // SAFETY: an AVX-512 table is only active when the CPU has avx512f and avx512bw.
        unsafe { quant_x86::quantize_q8_0(x, out) };
        return;
    }
    crate::q8_0::quantize(x, out)
}

/// Q8_K activation quantization with the fastest code this CPU has: the same bytes as
/// [`crate::q8_k::quantize`] (AVX-512 when the active table is an AVX-512 one).
///
/// # Panics
/// If `x.len() != 256 * out.len()`.
pub fn quantize_q8k(x: &[f32], out: &mut [BlockQ8K]) {
    #[cfg(target_arch = "x86_64")]
    if active_isa() >= Isa::Avx512Vnni {
        // SAFETY: an AVX-512 table is only active when the CPU has avx512f and avx512bw.
        unsafe { quant_x86::quantize_q8k(x, out) };
        return;
    }
    crate::q8_k::quantize(x, out)
}

/// Bytes [`pack_q8_0_group`] writes for `n` tokens (1..=8) of `nb` blocks each.
pub fn q8_0_group_packed_len(nb: usize, n: usize) -> usize {
    nb * n.div_ceil(2) * 64
}

/// Packs `n` tokens (1..=8) of `nb` Q8_0 blocks each (`x: [n, nb]`) for a [`DotQ8_0G`]
/// kernel. `packed` gets, for block `i` and token pair `p`, 64 bytes at `(i * P + p) * 64`
/// (`P = n / 2` rounded up): the 32 quants of token `2p` then those of token `2p + 1` (the
/// last token again when `n` is odd), each offset by 128 (`q ^ 0x80`, i.e. `q + 128` as an
/// unsigned byte), so the kernel can use them as `vpdpbusd`'s unsigned operand; its length is
/// [`q8_0_group_packed_len`]. `scales` gets `8 * nb` values: `scales[8 * i + t]` is token
/// `t`'s block-`i` scale as f32, lanes `t >= n` repeating the last token's.
///
/// # Panics
/// If `n` is not in 1..=8 or `x.len() != n * nb`.
pub fn pack_q8_0_group(
    x: &[BlockQ8_0],
    nb: usize,
    n: usize,
    packed: &mut Vec<u8>,
    scales: &mut Vec<f32>,
) {
    assert!((1..=8).contains(&n), "pack_q8_0_group: 1..=8 tokens");
    assert_eq!(
        x.len(),
        n * nb,
        "pack_q8_0_group: activation length mismatch"
    );
    let pairs = n.div_ceil(2);
    packed.clear();
    packed.resize(q8_0_group_packed_len(nb, n), 0);
    for (i, dst) in packed.chunks_exact_mut(pairs * 64).enumerate() {
        for (k, half) in dst.chunks_exact_mut(32).enumerate() {
            let src = &x[k.min(n - 1) * nb + i].qs;
            for (d, &q) in half.iter_mut().zip(src) {
                *d = (q as u8) ^ 0x80;
            }
        }
    }
    scales.clear();
    scales.extend((0..8 * nb).map(|j| x[(j % 8).min(n - 1) * nb + j / 8].d.to_f32()));
}

/// One Q8_K activation block rearranged, once per matrix call, into the order that a kernel
/// table's prepared kernels read ([`Prepared`]); 384 bytes, runtime only.
///
/// A dot product does not depend on the order of its terms, so a kernel may read the
/// weights in whatever order decodes cheapest if the activations come in the same order.
/// Rearranging the activations costs a few instructions per block once per call; every
/// weight row of the matrix then saves them.
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub struct BlockQ8KPrep {
    /// The 256 quants of the Q8_K block, in the kernel's order.
    pub qs: [i8; crate::QK_K],
    /// Start values of the kernel's 16 i32 lane sums (a per-block correction term).
    pub bias: [i32; 16],
    /// The Q8_K block's sums of 16 consecutive quants, in their natural order.
    pub bsums: [i16; crate::QK_K / 16],
    /// The Q8_K block's scale.
    pub d: f32,
    /// Padding to a whole number of cache lines.
    pad: [u32; 7],
}

const _: () = assert!(size_of::<BlockQ8KPrep>() == 384);

/// Rearranges Q8_K blocks, any number, into a table's prepared order (`out` has `x.len()`
/// blocks); see [`Prepared`].
pub type PrepareQ8K = fn(x: &[BlockQ8K], out: &mut [BlockQ8KPrep]);

/// A weight format's kernels that read [`BlockQ8KPrep`] activations. `prepare` runs once per
/// matrix call on every token's Q8_K blocks; `dot` and `dot_n` then give exactly the bits of
/// the table's plain entries (which prepare internally on each call).
#[derive(Debug, Clone, Copy)]
pub struct Prepared<B: 'static> {
    /// Rearranges Q8_K blocks, any number, into `out` (same length).
    pub prepare: PrepareQ8K,
    /// One weight row against one token's prepared blocks.
    pub dot: fn(w: &[B], x: &[BlockQ8KPrep]) -> f32,
    /// One weight row against several tokens' prepared blocks (`x.len() == w.len() *
    /// out.len()`, tokens one after another).
    pub dot_n: fn(w: &[B], x: &[BlockQ8KPrep], out: &mut [f32]),
    /// Several consecutive weight rows against one token: `out[r] = dot(w[r * nb..(r + 1) *
    /// nb], x)` with `nb = x.len()`, each bit for bit as `dot` (one call per run of rows
    /// saves the per-call start and lets a row's last block overlap the next row's first).
    pub dot_rows: fn(w: &[B], x: &[BlockQ8KPrep], out: &mut [f32]),
}

/// One instruction set's dot kernels, as plain function pointers.
///
/// A table is only handed out ([`Kernels::for_isa`], [`active`]) when the CPU supports its
/// instruction set, which is what makes the function pointers safe to call. Every function
/// panics if its two slices differ in length, as the scalar references do.
#[derive(Debug, Clone, Copy)]
pub struct Kernels {
    /// The instruction set these kernels use.
    pub isa: Isa,
    /// Q8_0 x Q8_0.
    pub q8_0_q8_0: DotQ8_0,
    /// Q2_K x Q8_K.
    pub q2k_q8k: DotQ2K,
    /// Q4_K x Q8_K.
    pub q4k_q8k: DotQ4K,
    /// IQ2_XXS x Q8_K.
    pub iq2xxs_q8k: DotIq2Xxs,
    /// F16 x f32.
    pub f16_f32: DotF16,
    /// BF16 x f32.
    pub bf16_f32: DotBf16,
    /// f32 x f32.
    pub f32_f32: DotF32,
    /// Q8_0 x Q8_0, one weight row against several tokens (bit-identical to `q8_0_q8_0`).
    pub q8_0_q8_0_n: DotQ8_0N,
    /// Q2_K x Q8_K, several tokens (bit-identical to `q2k_q8k`).
    pub q2k_q8k_n: DotQ2KN,
    /// Q4_K x Q8_K, several tokens (bit-identical to `q4k_q8k`).
    pub q4k_q8k_n: DotQ4KN,
    /// IQ2_XXS x Q8_K, several tokens (bit-identical to `iq2xxs_q8k`).
    pub iq2xxs_q8k_n: DotIq2XxsN,
    /// F16 x f32, several tokens (bit-identical to `f16_f32`).
    pub f16_f32_n: DotF16N,
    /// BF16 x f32, several tokens (bit-identical to `bf16_f32`).
    pub bf16_f32_n: DotBf16N,
    /// f32 x f32, several tokens (bit-identical to `f32_f32`).
    pub f32_f32_n: DotF32N,
    /// Q8_0 x Q8_0 for up to 8 tokens with pre-converted scales, where an instruction set
    /// has such a kernel (bit-identical to `q8_0_q8_0`); `None` means use `q8_0_q8_0_n`.
    pub q8_0_q8_0_g: Option<DotQ8_0G>,
    /// Q2_K kernels on prepared activations, where this table has them (bit-identical to
    /// `q2k_q8k` / `q2k_q8k_n`); matrix calls use them when present.
    pub q2k_prep: Option<Prepared<BlockQ2K>>,
    /// IQ2_XXS kernels on prepared activations, where this table has them (bit-identical
    /// to `iq2xxs_q8k` / `iq2xxs_q8k_n`); matrix calls use them when present.
    pub iq2xxs_prep: Option<Prepared<BlockIq2Xxs>>,
}

static SCALAR: Kernels = Kernels {
    isa: Isa::Scalar,
    q8_0_q8_0: crate::q8_0::dot,
    q2k_q8k: crate::q2_k::dot,
    q4k_q8k: crate::q4_k::dot,
    iq2xxs_q8k: crate::iq2_xxs::dot,
    f16_f32: crate::f16::dot_f16_f32,
    bf16_f32: crate::f16::dot_bf16_f32,
    f32_f32: crate::f16::dot_f32,
    q8_0_q8_0_n: scalar_n::q8_0_q8_0_n,
    q2k_q8k_n: scalar_n::q2k_q8k_n,
    q4k_q8k_n: scalar_n::q4k_q8k_n,
    iq2xxs_q8k_n: scalar_n::iq2xxs_q8k_n,
    f16_f32_n: scalar_n::f16_f32_n,
    bf16_f32_n: scalar_n::bf16_f32_n,
    f32_f32_n: scalar_n::f32_f32_n,
    q8_0_q8_0_g: None,
    q2k_prep: None,
    iq2xxs_prep: None,
};

/// The scalar table's multi-token entries: loops over the scalar references.
mod scalar_n {
    use half::{bf16, f16};

    use crate::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K};

    dot_n_loop!(q8_0_q8_0_n, crate::q8_0::dot, BlockQ8_0, BlockQ8_0);
    dot_n_loop!(q2k_q8k_n, crate::q2_k::dot, BlockQ2K, BlockQ8K);
    dot_n_loop!(q4k_q8k_n, crate::q4_k::dot, BlockQ4K, BlockQ8K);
    dot_n_loop!(iq2xxs_q8k_n, crate::iq2_xxs::dot, BlockIq2Xxs, BlockQ8K);
    dot_n_loop!(f16_f32_n, crate::f16::dot_f16_f32, f16, f32);
    dot_n_loop!(bf16_f32_n, crate::f16::dot_bf16_f32, bf16, f32);
    dot_n_loop!(f32_f32_n, crate::f16::dot_f32, f32, f32);
}

impl Kernels {
    /// The kernel table of `isa`, or `None` when this CPU (or this build's target) cannot
    /// run it.
    pub fn for_isa(isa: Isa) -> Option<&'static Kernels> {
        if !isa.is_supported() {
            return None;
        }
        match isa {
            Isa::Scalar => Some(&SCALAR),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => Some(&avx2::KERNELS),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => Some(&avx512::KERNELS),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vbmi => Some(&avx512_vbmi::KERNELS),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => Some(&neon::KERNELS),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The scalar reference kernels (always available).
    pub fn scalar() -> &'static Kernels {
        &SCALAR
    }
}

/// The instruction sets this CPU can run, least capable first (always includes
/// [`Isa::Scalar`]).
pub fn supported() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|isa| isa.is_supported())
        .collect()
}

/// The best instruction set of this CPU, capped by `DS4_SIMD` when it is set.
///
/// Read once per process; later changes of the environment variable have no effect.
pub fn active_isa() -> Isa {
    active().isa
}

/// The kernel table the fast paths use: the best one this CPU supports, capped by
/// `DS4_SIMD`. Detected on the first call and cached.
pub fn active() -> &'static Kernels {
    static ACTIVE: OnceLock<&'static Kernels> = OnceLock::new();
    ACTIVE.get_or_init(|| {
        let cap = std::env::var("DS4_SIMD")
            .ok()
            .and_then(|v| Isa::from_name(&v));
        best_below(cap)
    })
}

/// The most capable supported kernel table at or below `cap` (any when `cap` is `None`).
fn best_below(cap: Option<Isa>) -> &'static Kernels {
    Isa::ALL
        .into_iter()
        .rev()
        .filter(|&isa| cap.is_none_or(|cap| isa <= cap))
        .find_map(Kernels::for_isa)
        .unwrap_or(&SCALAR)
}

/// Q8_0 weights x Q8_0 activations, with the fastest kernel this CPU has.
///
/// # Panics
/// If the slices differ in length.
pub fn dot_q8_0_q8_0(w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    (active().q8_0_q8_0)(w, x)
}

/// Q2_K weights x Q8_K activations, with the fastest kernel this CPU has.
///
/// # Panics
/// If the slices differ in length.
pub fn dot_q2k_q8k(w: &[BlockQ2K], x: &[BlockQ8K]) -> f32 {
    (active().q2k_q8k)(w, x)
}

/// Q4_K weights x Q8_K activations, with the fastest kernel this CPU has.
///
/// # Panics
/// If the slices differ in length.
pub fn dot_q4k_q8k(w: &[BlockQ4K], x: &[BlockQ8K]) -> f32 {
    (active().q4k_q8k)(w, x)
}

/// IQ2_XXS weights x Q8_K activations, with the fastest kernel this CPU has.
///
/// # Panics
/// If the slices differ in length.
pub fn dot_iq2xxs_q8k(w: &[BlockIq2Xxs], x: &[BlockQ8K]) -> f32 {
    (active().iq2xxs_q8k)(w, x)
}

/// F16 weights x f32 activations, with the fastest kernel this CPU has.
///
/// # Panics
/// If the slices differ in length.
pub fn dot_f16_f32(w: &[f16], x: &[f32]) -> f32 {
    (active().f16_f32)(w, x)
}

/// BF16 weights x f32 activations, with the fastest kernel this CPU has.
///
/// # Panics
/// If the slices differ in length.
pub fn dot_bf16_f32(w: &[bf16], x: &[f32]) -> f32 {
    (active().bf16_f32)(w, x)
}

/// f32 x f32, with the fastest kernel this CPU has.
///
/// # Panics
/// If the slices differ in length.
pub fn dot_f32_f32(w: &[f32], x: &[f32]) -> f32 {
    (active().f32_f32)(w, x)
}

/// The IQ2_XXS sign codes expanded to byte multipliers: byte `i` of entry `s` is `-1`
/// (`0xFF`) when element `i` of a chunk with sign code `s` is negative, else `+1`. Built at
/// compile time from [`crate::tables::KSIGNS_IQ2XS`] so it cannot drift from it; the SIMD
/// kernels apply it to the activations with one `sign`/multiply per 8 values.
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) static IQ2XXS_SIGNS: [u64; 128] = {
    let mut out = [0u64; 128];
    let mut s = 0;
    while s < 128 {
        let bits = crate::tables::KSIGNS_IQ2XS[s];
        let mut v = 0u64;
        let mut i = 0;
        while i < 8 {
            let byte: u64 = if (bits >> i) & 1 == 1 { 0xFF } else { 0x01 };
            v |= byte << (8 * i);
            i += 1;
        }
        out[s] = v;
        s += 1;
    }
    out
};

/// The 8 scales (low 6 bits) and 8 mins of a Q4_K block (FORMATS.md s2.5), unpacked.
#[inline]
#[cfg_attr(
    not(any(target_arch = "x86_64", target_arch = "aarch64")),
    allow(dead_code)
)]
pub(crate) fn q4k_scales_mins(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name(" AVX2 "), Some(Isa::Avx2));
        assert_eq!(Isa::from_name("sse"), None);
    }

    #[test]
    fn cap_never_exceeds_request() {
        assert_eq!(best_below(Some(Isa::Scalar)).isa, Isa::Scalar);
        for isa in supported() {
            assert_eq!(best_below(Some(isa)).isa, isa);
        }
        assert_eq!(
            best_below(None).isa,
            *supported().last().expect("scalar is always supported")
        );
    }

    #[test]
    fn sign_table_matches_ksigns() {
        for (s, &v) in IQ2XXS_SIGNS.iter().enumerate() {
            for i in 0..8 {
                let neg = crate::tables::KSIGNS_IQ2XS[s] & crate::tables::KMASK_IQ2XS[i] != 0;
                let byte = (v >> (8 * i)) as u8 as i8;
                assert_eq!(byte, if neg { -1 } else { 1 }, "code {s} element {i}");
            }
        }
    }
}
