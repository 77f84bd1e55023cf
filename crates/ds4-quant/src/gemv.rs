//! Multi-threaded matrix x vector (decode) and matrix x small batch (prefill, MoE) products
//! on raw weight bytes.
//!
//! `y[r] = Σ_c W[r, c] · x[c]` for a row-major weight matrix `W` of `n_rows` rows of
//! `n_cols` values (`// [n_rows, n_cols]`, GGUF `ne = [n_cols, n_rows]`) stored as `dtype`.
//! The activations are quantized once per call to the format the weight type pairs with
//! (FORMATS.md s2.8): Q8_K for Q2_K, Q4_K and IQ2_XXS, Q8_0 for Q8_0, none for F16, BF16
//! and F32. The `*_q8k` / `*_q8_0` variants take activations that are already quantized, so
//! an MoE layer can quantize its input once and reuse it for the gate and up matrices of
//! every selected expert, as ds4 does.
//!
//! Work is split over rows with rayon: each task takes a run of whole rows (at least 16 rows
//! and about 64 KiB of weights, so that task overhead stays small next to the dot products)
//! and every output value is computed by exactly one call of a [`crate::simd`] dot kernel.
//! The result therefore does not depend on the number of threads, bit for bit. The functions
//! run on the current rayon pool: to choose the thread count, build a
//! `rayon::ThreadPool` with `num_threads(n)` and call them inside `pool.install(|| ...)`.
//!
//! For a batch ([`matmul`]) each task runs groups of up to 8 tokens through the multi-token
//! kernels (`Kernels::*_n`, which unpack a weight block once for all tokens of the group and
//! give every value bit for bit as the single-row kernel does), rows innermost, so the group's
//! activations stay in L1 while the task's weight rows stream from L2. Each task writes its
//! outputs straight into its own columns of `ys`, so no step of a batch runs on one thread
//! alone: the activation quantization and the Q8_0 group packing are split over tokens too.
//!
//! Scheduling only changes when work runs, never what is computed: a matrix too small to
//! pay for entering the pool (`SERIAL_BYTES`) runs on the calling thread, and the
//! per-call buffers (quantized activations, packed groups, task tiles) are thread-local
//! scratch reused from call to call.
//!
//! Every length is checked and reported as an [`Error`]; nothing here panics on a bad
//! input. Weight bytes at any alignment are accepted (GGUF data is 32-byte aligned, so the
//! blocks are normally cast in place; a misaligned row is copied first, which is slow).
//!
//! Reference: row-by-row scalar dots; checked by `tests/kernels.rs`.

use std::borrow::Cow;
use std::cell::Cell;

use bytemuck::{Pod, Zeroable};
use ds4_tensor::DType;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::simd::{self, BlockQ8KPrep, Kernels};
use crate::{BlockIq2Xxs, BlockQ2K, BlockQ4K, BlockQ8_0, BlockQ8K, Error, QK_K, QK8_0, Result};

/// Weight bytes a task should cover at least, so that rayon's per-task cost is negligible.
const TASK_BYTES: usize = 64 * 1024;
/// Rows a task should cover at least.
const TASK_ROWS: usize = 16;
/// Tokens per multi-token kernel call in a batch: enough to amortize unpacking a weight
/// block, few enough that the tokens' accumulators stay in registers (the x86 kernels split
/// it further into 4-token register tiles).
const TOKEN_GROUP: usize = 8;
/// Activation bytes of one token group that should stay in L1 next to the weight rows.
const GROUP_BYTES: usize = 24 * 1024;
/// Weight bytes below which a one-token product runs on the calling thread: entering the
/// pool and waking a worker costs about 15 us, what ~200 KiB of weights take to stream.
const SERIAL_BYTES: usize = 192 * 1024;
/// Activation values a quantization or packing task should cover at least.
const PREP_VALUES: usize = 32 * 1024;

/// Per-thread buffers reused across calls, so that a call allocates nothing once warm.
#[derive(Default)]
struct Scratch {
    /// Activations quantized by [`Gemv::matmul`].
    q8k: Vec<BlockQ8K>,
    /// Activations quantized by [`Gemv::matmul`].
    q8_0: Vec<BlockQ8_0>,
    /// What [`Gemv::run`] itself needs.
    run: RunScratch,
}

/// Scratch of [`Gemv::run`], whatever the activations came as.
#[derive(Default)]
struct RunScratch {
    /// Q8_0 token groups packed for a `q8_0_q8_0_g` kernel: (quants, scales) per group.
    groups: Vec<(Vec<u8>, Vec<f32>)>,
    /// Q8_K activations prepared for a table's [`simd::Prepared`] kernels.
    prep: Vec<BlockQ8KPrep>,
}

thread_local! {
    /// The calling thread's [`Scratch`]; taken out for a call and put back after it, so a
    /// call nested in the wait of another (rayon work stealing) just starts an empty one.
    static SCRATCH: Cell<Scratch> = Cell::new(Scratch::default());
    /// A task's `[rows, group]` output tile in [`Mat::apply_groups`] (same take/put back).
    static TILE: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's [`Scratch`].
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    ds4_tensor::alloc::with_thread_local(&SCRATCH, f)
}

/// Whether to split work over the pool at all: not when it has one thread.
fn pool_parallel() -> bool {
    rayon::current_num_threads() > 1
}

/// `ys` as a pointer that tasks writing disjoint parts of it may share.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: only used by `Mat::apply_groups`, whose tasks write disjoint elements of a slice
// that outlives them (see the use there).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

/// Tokens per group for activations of `tok_bytes` bytes per token: [`TOKEN_GROUP`], or 4
/// when 8 tokens would not fit [`GROUP_BYTES`] (e.g. the 4096-wide attention output).
fn group_size(tok_bytes: usize) -> usize {
    if TOKEN_GROUP * tok_bytes <= GROUP_BYTES {
        TOKEN_GROUP
    } else {
        TOKEN_GROUP / 2
    }
}

/// The activation format a weight type's fast dot product expects: [`DType::Q8K`] for the
/// K and IQ formats, [`DType::Q8_0`] for Q8_0, [`DType::F32`] for the float types, `None` for
/// types that are not matrix weights.
pub fn activation_dtype(dtype: DType) -> Option<DType> {
    match dtype {
        DType::Q2K | DType::Q4K | DType::Iq2Xxs => Some(DType::Q8K),
        DType::Q8_0 => Some(DType::Q8_0),
        DType::F32 | DType::F16 | DType::BF16 => Some(DType::F32),
        _ => None,
    }
}

/// Quantizes `n_tok` activation rows of `n_cols` values (`xs: [n_tok, n_cols]`) to Q8_K,
/// returning `[n_tok, n_cols / 256]` blocks for [`matvec_q8k`] and [`matmul_q8k`].
///
/// # Errors
/// [`Error::NotWholeBlocks`] if `xs` is not a whole number of 256-value blocks.
pub fn quantize_q8k(xs: &[f32]) -> Result<Vec<BlockQ8K>> {
    if !xs.len().is_multiple_of(QK_K) {
        return Err(Error::NotWholeBlocks {
            dtype: DType::Q8K,
            len: xs.len(),
            block: QK_K,
            unit: "values",
        });
    }
    let mut out = vec![BlockQ8K::zeroed(); xs.len() / QK_K];
    simd::quantize_q8k(xs, &mut out);
    Ok(out)
}

/// Quantizes activations to Q8_0 (`[n_tok, n_cols / 32]` blocks) for [`matvec_q8_0`] and
/// [`matmul_q8_0`].
///
/// # Errors
/// [`Error::NotWholeBlocks`] if `xs` is not a whole number of 32-value blocks.
pub fn quantize_q8_0(xs: &[f32]) -> Result<Vec<BlockQ8_0>> {
    if !xs.len().is_multiple_of(QK8_0) {
        return Err(Error::NotWholeBlocks {
            dtype: DType::Q8_0,
            len: xs.len(),
            block: QK8_0,
            unit: "values",
        });
    }
    let mut out = vec![BlockQ8_0::zeroed(); xs.len() / QK8_0];
    simd::quantize_q8_0(xs, &mut out);
    Ok(out)
}

/// `y = W x` for one activation vector (`x: [n_cols]`, `y: [n_rows]`), with the fastest
/// kernels of this CPU. See the module docs for threading and formats.
///
/// # Errors
/// [`Error::Unsupported`] for a type that is not a matrix weight type,
/// [`Error::NotWholeBlocks`] if `n_cols` is not a whole number of blocks, a shape mismatch
/// ([`Error::Tensor`]) if `w` or `x` has the wrong length, [`Error::OutputLength`] for `y`.
pub fn matvec(
    dtype: DType,
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<()> {
    Gemv::new().matvec(dtype, w, n_rows, n_cols, x, y)
}

/// `Y = X Wᵀ` for a small batch (`xs: [n_tok, n_cols]`, `ys: [n_tok, n_rows]`); each weight
/// row is read once and applied to every token. Errors as [`matvec`].
pub fn matmul(
    dtype: DType,
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    xs: &[f32],
    ys: &mut [f32],
) -> Result<()> {
    Gemv::new().matmul(dtype, w, n_rows, n_cols, xs, ys)
}

/// [`matvec`] with activations already quantized to Q8_K (`xq: [n_cols / 256]`); `dtype`
/// must be Q2_K, Q4_K or IQ2_XXS.
pub fn matvec_q8k(
    dtype: DType,
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    xq: &[BlockQ8K],
    y: &mut [f32],
) -> Result<()> {
    Gemv::new().matmul_q8k(dtype, w, n_rows, n_cols, xq, y)
}

/// [`matmul`] with activations already quantized to Q8_K (`xq: [n_tok, n_cols / 256]`,
/// `ys: [n_tok, n_rows]`); `dtype` must be Q2_K, Q4_K or IQ2_XXS.
pub fn matmul_q8k(
    dtype: DType,
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    xq: &[BlockQ8K],
    ys: &mut [f32],
) -> Result<()> {
    Gemv::new().matmul_q8k(dtype, w, n_rows, n_cols, xq, ys)
}

/// [`matvec`] of Q8_0 weights with activations already quantized to Q8_0
/// (`xq: [n_cols / 32]`).
pub fn matvec_q8_0(
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    xq: &[BlockQ8_0],
    y: &mut [f32],
) -> Result<()> {
    Gemv::new().matmul_q8_0(w, n_rows, n_cols, xq, y)
}

/// [`matmul`] of Q8_0 weights with activations already quantized to Q8_0
/// (`xq: [n_tok, n_cols / 32]`, `ys: [n_tok, n_rows]`).
pub fn matmul_q8_0(
    w: &[u8],
    n_rows: usize,
    n_cols: usize,
    xq: &[BlockQ8_0],
    ys: &mut [f32],
) -> Result<()> {
    Gemv::new().matmul_q8_0(w, n_rows, n_cols, xq, ys)
}

/// The matrix products bound to one kernel table: [`Gemv::new`] uses the fastest one of this
/// CPU (what the free functions of this module use); [`Gemv::with_kernels`] pins one, e.g.
/// the scalar references, for tests and benchmarks.
#[derive(Debug, Clone, Copy)]
pub struct Gemv {
    kernels: &'static Kernels,
}

impl Default for Gemv {
    fn default() -> Self {
        Gemv::new()
    }
}

/// Activations of one call, in the format the weight type pairs with.
#[derive(Clone, Copy)]
enum Act<'a> {
    F32(&'a [f32]),
    Q8K(&'a [BlockQ8K]),
    Q8_0(&'a [BlockQ8_0]),
}

impl Gemv {
    /// Bound to [`simd::active`], the fastest kernels of this CPU (capped by `DS4_SIMD`).
    pub fn new() -> Gemv {
        Gemv {
            kernels: simd::active(),
        }
    }

    /// Bound to a given kernel table (see [`Kernels::for_isa`]).
    pub fn with_kernels(kernels: &'static Kernels) -> Gemv {
        Gemv { kernels }
    }

    /// The kernel table in use.
    pub fn kernels(&self) -> &'static Kernels {
        self.kernels
    }

    /// See [`matvec`].
    pub fn matvec(
        &self,
        dtype: DType,
        w: &[u8],
        n_rows: usize,
        n_cols: usize,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<()> {
        self.matmul(dtype, w, n_rows, n_cols, x, y)
    }

    /// See [`matmul`]. The token count is `xs.len() / n_cols`.
    pub fn matmul(
        &self,
        dtype: DType,
        w: &[u8],
        n_rows: usize,
        n_cols: usize,
        xs: &[f32],
        ys: &mut [f32],
    ) -> Result<()> {
        check_cols(dtype, n_cols)?;
        let n_tok = n_tok(xs.len(), n_cols, 1)?;
        with_scratch(|s| {
            let act = match activation_dtype(dtype) {
                Some(DType::Q8K) => {
                    quantize_rows(xs, n_tok, QK_K, simd::quantize_q8k, &mut s.q8k);
                    Act::Q8K(&s.q8k)
                }
                Some(DType::Q8_0) => {
                    quantize_rows(xs, n_tok, QK8_0, simd::quantize_q8_0, &mut s.q8_0);
                    Act::Q8_0(&s.q8_0)
                }
                _ => Act::F32(xs),
            };
            self.run(dtype, w, n_rows, n_cols, act, ys, &mut s.run)
        })
    }

    /// See [`matmul_q8k`] (and [`matvec_q8k`], the one-token case).
    pub fn matmul_q8k(
        &self,
        dtype: DType,
        w: &[u8],
        n_rows: usize,
        n_cols: usize,
        xq: &[BlockQ8K],
        ys: &mut [f32],
    ) -> Result<()> {
        with_scratch(|s| {
            let act = Act::Q8K(xq);
            self.run(dtype, w, n_rows, n_cols, act, ys, &mut s.run)
        })
    }

    /// See [`matmul_q8_0`] (and [`matvec_q8_0`], the one-token case).
    pub fn matmul_q8_0(
        &self,
        w: &[u8],
        n_rows: usize,
        n_cols: usize,
        xq: &[BlockQ8_0],
        ys: &mut [f32],
    ) -> Result<()> {
        with_scratch(|s| {
            let act = Act::Q8_0(xq);
            self.run(DType::Q8_0, w, n_rows, n_cols, act, ys, &mut s.run)
        })
    }

    /// Validates every length, then dispatches on the weight type once per call (`bufs`:
    /// scratch for packed Q8_0 token groups and prepared Q8_K activations).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        dtype: DType,
        w: &[u8],
        n_rows: usize,
        n_cols: usize,
        act: Act<'_>,
        ys: &mut [f32],
        bufs: &mut RunScratch,
    ) -> Result<()> {
        let RunScratch { groups, prep } = bufs;
        check_cols(dtype, n_cols)?;
        let (act_dtype, op) = match act {
            Act::F32(_) => (DType::F32, "matmul with f32 activations"),
            Act::Q8K(_) => (DType::Q8K, "matmul with Q8_K activations"),
            Act::Q8_0(_) => (DType::Q8_0, "matmul with Q8_0 activations"),
        };
        if activation_dtype(dtype) != Some(act_dtype) {
            return Err(Error::Unsupported { dtype, op });
        }
        let row_bytes = n_cols / dtype.block_elems() * dtype.block_bytes();
        let w_bytes = n_rows
            .checked_mul(row_bytes)
            .ok_or_else(|| shape("weights", usize::MAX, w.len()))?;
        if w.len() != w_bytes {
            return Err(shape("weight bytes", w_bytes, w.len()));
        }
        let n_tok = match act {
            Act::F32(x) => n_tok(x.len(), n_cols, 1)?,
            Act::Q8K(x) => n_tok(x.len(), n_cols / QK_K, QK_K)?,
            Act::Q8_0(x) => n_tok(x.len(), n_cols / QK8_0, QK8_0)?,
        };
        let expected = n_tok.checked_mul(n_rows).ok_or(Error::OutputLength {
            expected: usize::MAX,
            got: ys.len(),
        })?;
        if ys.len() != expected {
            return Err(Error::OutputLength {
                expected,
                got: ys.len(),
            });
        }
        if n_rows == 0 || n_tok == 0 {
            return Ok(());
        }
        let k = self.kernels;
        let m = Mat {
            w,
            n_rows,
            row_bytes,
        };
        match (dtype, act) {
            (DType::Q2K, Act::Q8K(x)) => {
                let plain = (k.q2k_q8k, k.q2k_q8k_n);
                m.apply_q8k::<BlockQ2K>(k.q2k_prep, plain, x, prep, n_tok, ys)
            }
            (DType::Q4K, Act::Q8K(x)) => {
                m.apply_q8k::<BlockQ4K>(None, (k.q4k_q8k, k.q4k_q8k_n), x, prep, n_tok, ys)
            }
            (DType::Iq2Xxs, Act::Q8K(x)) => {
                let plain = (k.iq2xxs_q8k, k.iq2xxs_q8k_n);
                m.apply_q8k::<BlockIq2Xxs>(k.iq2xxs_prep, plain, x, prep, n_tok, ys)
            }
            (DType::Q8_0, Act::Q8_0(x)) => match k.q8_0_q8_0_g {
                Some(g) if n_tok > 1 => {
                    // Each token group's quants packed and scales converted once per call
                    // (lanes past a short last group repeat its last token).
                    let nb = n_cols / QK8_0;
                    let gs = group_size(nb * size_of::<BlockQ8_0>());
                    let n_groups = n_tok.div_ceil(gs);
                    if groups.len() < n_groups {
                        groups.resize_with(n_groups, Default::default);
                    }
                    let groups = &mut groups[..n_groups];
                    let pack = |gi: usize, (packed, scales): &mut (Vec<u8>, Vec<f32>)| {
                        let t0 = gi * gs;
                        let tn = (n_tok - t0).min(gs);
                        let xg = &x[t0 * nb..(t0 + tn) * nb];
                        simd::pack_q8_0_group(xg, nb, tn, packed, scales);
                    };
                    // Groups of a task: at least PREP_VALUES quants.
                    let min_groups = PREP_VALUES.div_ceil(gs * n_cols).max(1);
                    if n_groups > min_groups && pool_parallel() {
                        groups
                            .par_iter_mut()
                            .enumerate()
                            .with_min_len(min_groups)
                            .for_each(|(gi, g)| pack(gi, g));
                    } else {
                        groups
                            .iter_mut()
                            .enumerate()
                            .for_each(|(gi, g)| pack(gi, g));
                    }
                    let groups = &*groups;
                    m.apply_groups::<BlockQ8_0>(n_tok, gs, ys, |row, t0, _tn, out| {
                        let (packed, scales) = &groups[t0 / gs];
                        g(row, packed, scales, out);
                    })
                }
                _ => m.apply::<BlockQ8_0, _>(k.q8_0_q8_0, k.q8_0_q8_0_n, x, n_tok, ys),
            },
            (DType::F16, Act::F32(x)) => m.apply::<f16, _>(k.f16_f32, k.f16_f32_n, x, n_tok, ys),
            (DType::BF16, Act::F32(x)) => {
                m.apply::<bf16, _>(k.bf16_f32, k.bf16_f32_n, x, n_tok, ys)
            }
            (DType::F32, Act::F32(x)) => m.apply::<f32, _>(k.f32_f32, k.f32_f32_n, x, n_tok, ys),
            // Pairs other than the above were refused at the top.
            (dtype, _) => return Err(Error::Unsupported { dtype, op }),
        }
        Ok(())
    }
}

/// `x` rearranged by a table's `prepare` into `buf` (split over the pool for big batches;
/// the blocks are independent, so the split changes no bit).
fn prepare_q8k<'a>(
    prepare: simd::PrepareQ8K,
    x: &[BlockQ8K],
    buf: &'a mut Vec<BlockQ8KPrep>,
) -> &'a [BlockQ8KPrep] {
    buf.clear();
    buf.resize(x.len(), BlockQ8KPrep::zeroed());
    let per_task = PREP_VALUES / QK_K;
    if x.len() > per_task && pool_parallel() {
        buf.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .for_each(|(o, x)| prepare(x, o));
    } else {
        prepare(x, buf);
    }
    buf
}

/// Checks that `dtype` is a matrix weight type and `n_cols` a whole number of its blocks.
fn check_cols(dtype: DType, n_cols: usize) -> Result<()> {
    if activation_dtype(dtype).is_none() {
        return Err(Error::Unsupported {
            dtype,
            op: "matmul",
        });
    }
    if !n_cols.is_multiple_of(dtype.block_elems()) {
        return Err(Error::NotWholeBlocks {
            dtype,
            len: n_cols,
            block: dtype.block_elems(),
            unit: "values",
        });
    }
    Ok(())
}

/// The number of tokens in `len` activation items of `per_tok` items each (`elems` values
/// per item, for the error message).
fn n_tok(len: usize, per_tok: usize, elems: usize) -> Result<usize> {
    if per_tok == 0 {
        // Zero columns: only an empty activation slice makes sense, and it holds no tokens.
        return if len == 0 {
            Ok(0)
        } else {
            Err(shape("activations", 0, len))
        };
    }
    if !len.is_multiple_of(per_tok) || len == 0 {
        return Err(shape("activations", per_tok * elems, len * elems));
    }
    Ok(len / per_tok)
}

/// A length error for the operand `what` (lengths in values or bytes, as named).
fn shape(what: &str, expected: usize, got: usize) -> Error {
    Error::Tensor(ds4_tensor::Error::ShapeMismatch {
        name: format!("matmul {what}"),
        expected: vec![expected as u64],
        got: vec![got as u64],
    })
}

/// Quantizes the `n_tok` rows of `xs` with `f` into `out` (resized to the blocks of `elems`
/// values), split over rayon tasks of whole tokens when there are enough of them. Blocks
/// never span two tokens, so one call over several tokens gives the same bytes as one call
/// per token.
fn quantize_rows<B: Pod + Send>(
    xs: &[f32],
    n_tok: usize,
    elems: usize,
    f: fn(&[f32], &mut [B]),
    out: &mut Vec<B>,
) {
    out.clear();
    out.resize(xs.len() / elems, B::zeroed());
    // Tokens of a task: at least PREP_VALUES values.
    let n_cols = xs.len() / n_tok.max(1);
    let task_tok = PREP_VALUES.div_ceil(n_cols.max(1)).max(1);
    if n_tok <= task_tok || !pool_parallel() {
        // One task's worth (or zero columns): a single call covers it.
        f(xs, out);
    } else {
        out.par_chunks_mut(task_tok * (n_cols / elems))
            .zip(xs.par_chunks(task_tok * n_cols))
            .for_each(|(q, x)| f(x, q));
    }
}

/// A table's plain single-row and multi-token kernels of one Q8_K weight format.
type PlainQ8k<B> = (
    fn(&[B], &[BlockQ8K]) -> f32,
    fn(&[B], &[BlockQ8K], &mut [f32]),
);

/// A weight matrix as raw bytes: `n_rows` rows of `row_bytes` each.
struct Mat<'a> {
    w: &'a [u8],
    n_rows: usize,
    row_bytes: usize,
}

impl Mat<'_> {
    /// `ys[t, r] = kernel(row r, x[t])` for every row and token, rows split over rayon tasks.
    ///
    /// One token (decode) calls the single-row `kernel`. A batch calls `kernel_n` on groups of
    /// up to [`TOKEN_GROUP`] tokens: within a task, token groups outermost and rows innermost,
    /// so the group's activations stay in L1 while the task's rows stream from L2, and each
    /// weight block is unpacked once per group. `kernel_n` gives every value bit for bit as
    /// `kernel` does, so the grouping (like the thread count) never changes a result.
    fn apply<B: Pod + Sync, A: Sync>(
        &self,
        kernel: fn(&[B], &[A]) -> f32,
        kernel_n: fn(&[B], &[A], &mut [f32]),
        x: &[A],
        n_tok: usize,
        ys: &mut [f32],
    ) {
        let per_tok = x.len() / n_tok;
        if n_tok == 1 {
            let rows = |first: usize, out: &mut [f32]| {
                for (i, y) in out.iter_mut().enumerate() {
                    let start = (first + i) * self.row_bytes;
                    let row = cast_row::<B>(&self.w[start..start + self.row_bytes]);
                    *y = kernel(&row, x);
                }
            };
            self.split_rows(ys, rows);
        } else {
            let gs = group_size(per_tok * size_of::<A>());
            self.apply_groups::<B>(n_tok, gs, ys, |row, t0, tn, out| {
                kernel_n(row, &x[t0 * per_tok..(t0 + tn) * per_tok], out);
            });
        }
    }

    /// [`Mat::apply`] for a weight format with Q8_K activations: through the table's
    /// prepared kernels when it has them (the activations rearranged once into `prep`; one
    /// token by the row kernel), else through its plain single and multi-token kernels.
    fn apply_q8k<B: Pod + Sync>(
        &self,
        prepared: Option<simd::Prepared<B>>,
        (kernel, kernel_n): PlainQ8k<B>,
        x: &[BlockQ8K],
        prep: &mut Vec<BlockQ8KPrep>,
        n_tok: usize,
        ys: &mut [f32],
    ) {
        match prepared {
            Some(p) => {
                let xp = prepare_q8k(p.prepare, x, prep);
                if n_tok == 1 {
                    self.apply_rows::<B, _>(p.dot_rows, xp, ys)
                } else {
                    self.apply::<B, _>(p.dot, p.dot_n, xp, n_tok, ys)
                }
            }
            None => self.apply::<B, _>(kernel, kernel_n, x, n_tok, ys),
        }
    }

    /// One token through a kernel that takes a run of consecutive rows (`kernel(rows, x,
    /// out)`, `out[r]` for row `r`): [`Mat::apply`] with one call per task instead of one
    /// per row. Same split of rows over tasks.
    fn apply_rows<B: Pod + Sync, A: Sync>(
        &self,
        kernel: fn(&[B], &[A], &mut [f32]),
        x: &[A],
        ys: &mut [f32],
    ) {
        let rows = |first: usize, out: &mut [f32]| {
            let start = first * self.row_bytes;
            let w = cast_row::<B>(&self.w[start..start + out.len() * self.row_bytes]);
            kernel(&w, x, out);
        };
        self.split_rows(ys, rows);
    }

    /// The one-token split of the rows: `rows(first, out)` must write the outputs of rows
    /// `first..first + out.len()`; called once for all rows on this thread when the matrix
    /// is too small to pay for the pool, else once per task of [`Mat::task_rows`] rows.
    fn split_rows(&self, ys: &mut [f32], rows: impl Fn(usize, &mut [f32]) + Sync) {
        if self.w.len() <= SERIAL_BYTES || !pool_parallel() {
            rows(0, ys);
            return;
        }
        let chunk_rows = self.task_rows();
        ys.par_chunks_mut(chunk_rows)
            .enumerate()
            .for_each(|(c, out)| rows(c * chunk_rows, out));
    }

    /// The batch part of [`Mat::apply`]: `group(row, t0, tn, out)` must write the outputs of
    /// tokens `t0..t0 + tn` (`tn <= gs`, groups of `gs` tokens) for one weight row into `out`.
    fn apply_groups<B: Pod + Sync>(
        &self,
        n_tok: usize,
        gs: usize,
        ys: &mut [f32],
        group: impl Fn(&[B], usize, usize, &mut [f32]) + Sync,
    ) {
        let chunk_rows = self.task_rows();
        let n_chunks = self.n_rows.div_ceil(chunk_rows);
        let n_rows_all = self.n_rows;
        let out = OutPtr(ys.as_mut_ptr());
        // One task: rows `first..first + nr`. Each token group is computed into a
        // `[nr, gs]` tile (rows innermost, as before), then copied to the task's columns of
        // `ys` token by token: each copy is one contiguous run of `nr` values.
        let task = |c: usize| {
            let first = c * chunk_rows;
            let nr = chunk_rows.min(n_rows_all - first);
            let task_w = &self.w[first * self.row_bytes..(first + nr) * self.row_bytes];
            let task_w = cast_row::<B>(task_w);
            let per_row = task_w.len() / nr;
            ds4_tensor::alloc::with_thread_local(&TILE, |tile| {
                tile.clear();
                tile.resize(nr * gs, 0.0);
                for t0 in (0..n_tok).step_by(gs) {
                    let tn = (n_tok - t0).min(gs);
                    for (row, tile_row) in
                        task_w.chunks_exact(per_row).zip(tile.chunks_exact_mut(gs))
                    {
                        group(row, t0, tn, &mut tile_row[..tn]);
                    }
                    for t in 0..tn {
                        // SAFETY: `ys` has `n_tok * n_rows` values (checked by `Gemv::run`) and
                        // outlives every task (the parallel loop below returns only when all
                        // are done); this task alone writes rows `first..first + nr` of each
                        // token, so the slices of different tasks never overlap, and nothing
                        // reads `ys` meanwhile.
                        let dst = unsafe {
                            std::slice::from_raw_parts_mut(
                                { out }.0.add((t0 + t) * n_rows_all + first),
                                nr,
                            )
                        };
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d = tile[i * gs + t];
                        }
                    }
                }
            });
        };
        if n_chunks > 1 && pool_parallel() {
            (0..n_chunks).into_par_iter().for_each(task);
        } else {
            (0..n_chunks).for_each(task);
        }
    }

    /// Rows per rayon task: at least [`TASK_ROWS`] rows and [`TASK_BYTES`] of weights, but
    /// no more than an even share per thread, so that small matrices still use every thread.
    fn task_rows(&self) -> usize {
        let by_bytes = TASK_BYTES.div_ceil(self.row_bytes.max(1));
        let share = self.n_rows.div_ceil(rayon::current_num_threads().max(1));
        by_bytes.max(TASK_ROWS).min(share).max(1)
    }
}

/// The blocks of one row, cast in place when aligned (the normal case) or copied.
fn cast_row<B: Pod>(bytes: &[u8]) -> Cow<'_, [B]> {
    match bytemuck::try_cast_slice::<u8, B>(bytes) {
        Ok(blocks) => Cow::Borrowed(blocks),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(bytes)),
    }
}

#[cfg(test)]
mod tests {
    //! The scheduling paths of this module (split or serial quantization and packing, tiles
    //! scattered straight into the output, serial small matrices) against the one-token path:
    //! every batch output must equal, bit for bit, the same token run alone, at 1 and 2
    //! threads. `tests/kernels.rs` checks the values against scalar references.

    use super::*;

    /// Q8_0 weights `[n_rows, n_cols]` with finite scales and pseudo-random quants.
    fn q8_0_weights(n_rows: usize, n_cols: usize, seed: u32) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 24) as u8
        };
        let mut w = Vec::new();
        for _ in 0..n_rows * n_cols / QK8_0 {
            let d = f16::from_f32(0.001 + f32::from(next()) * 1e-4);
            w.extend_from_slice(&d.to_le_bytes());
            w.extend((0..QK8_0).map(|_| next()));
        }
        w
    }

    fn activations(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.731).sin() * 3.0).collect()
    }

    /// `matmul` of `n_tok` tokens equals `matvec` of each token alone, in pools of 1 and 2.
    fn check_batch_equals_tokens(n_rows: usize, n_cols: usize, n_tok: usize) {
        let w = q8_0_weights(n_rows, n_cols, (n_rows * 31 + n_tok) as u32);
        let xs = activations(n_tok * n_cols);
        let mut per_token = vec![0.0f32; n_tok * n_rows];
        for (x, y) in xs.chunks(n_cols).zip(per_token.chunks_mut(n_rows)) {
            matvec(DType::Q8_0, &w, n_rows, n_cols, x, y).expect("matvec");
        }
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            // Twice, so the second call runs on reused scratch.
            for _ in 0..2 {
                let mut ys = vec![f32::NAN; n_tok * n_rows];
                pool.install(|| matmul(DType::Q8_0, &w, n_rows, n_cols, &xs, &mut ys))
                    .expect("matmul");
                let same = ys
                    .iter()
                    .zip(&per_token)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{n_rows}x{n_cols}, {n_tok} tokens, {threads} threads");
            }
        }
    }

    #[test]
    fn split_quantization_and_packing_keep_bits() {
        // 256 columns: tasks of 128 tokens quantize and 16 groups pack, so 300 tokens
        // split both; 1000 rows leave a short last row chunk.
        check_batch_equals_tokens(1000, 256, 300);
    }

    #[test]
    fn small_batches_and_matrices_keep_bits() {
        check_batch_equals_tokens(40, 64, 3);
        check_batch_equals_tokens(17, 1024, 9);
    }
}
