//! [`CudaBackend`]: the `Backend` trait on one NVIDIA GPU.
//!
//! **First version, host round trips.** The trait passes activations as host `&[f32]`
//! slices, so every operation uploads its inputs, runs its kernels and downloads its output
//! (one synchronisation per call). Weights are the exception: [`CudaBackend::upload_weights`]
//! copies every matrix once, in its quantized form, into device memory, and later calls find
//! it by the address of its host bytes. At decode time this costs roughly one PCIe round trip
//! and a few tens of microseconds of launch latency per trait call (about 40 calls per layer,
//! some 1,700 per token at 43 layers), which bounds decode far below the bandwidth limit;
//! docs/CUDA.md describes the
//! trait change a fast version needs (device-resident activations and KV state behind an
//! opaque buffer type, whole-layer calls). The KV state stays on the host, owned by the
//! session in `ds4-model`, exactly as with the CPU backend.
//!
//! Products quantize their activations on the device as the CPU path does (Q8_K for Q2_K,
//! Q4_K and IQ2_XXS; Q8_0 for Q8_0; f32 for F16/BF16/F32), so the integer part of every block dot
//! is identical to the CPU's; `get_row` (the embedding lookup) dequantizes on the host, it
//! is one row per token.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    LaunchConfig, PushKernelArg,
};
use ds4_tensor::backend::{Backend, BackendError, BackendResult, Device, HcParams};
use ds4_tensor::{DType, HostTensor};

use crate::error::{CudaError, CudaResult};
use crate::probe::{check_driver, check_nvrtc, no_panic};

/// Bytes of one Q8_K activation block (`ds4_quant::BlockQ8K`).
const Q8K_BYTES: usize = 292;
/// Bytes of one Q8_0 block.
const Q8_0_BYTES: usize = 34;
/// Output rows per CUDA block of the product kernels (`MM_ROWS` in quant.cu).
const MM_ROWS: u32 = 4;
/// Tokens per CUDA block of the product kernels (`MM_TOK` in quant.cu).
const MM_TOK: u32 = 8;
/// Largest hyper-connection count `hc_pre_finish` handles (`HC_MAX` in ops.cu).
const HC_MAX: usize = 16;
/// Upload granularity: progress is reported after each piece.
const UPLOAD_PIECE: usize = 256 << 20;

/// The launched kernels, loaded once from the compiled module.
struct Kernels {
    quantize_q8_k: CudaFunction,
    quantize_q8_0: CudaFunction,
    mm_iq2_xxs: CudaFunction,
    mm_q2_k: CudaFunction,
    mm_q4_k: CudaFunction,
    mm_q8_0: CudaFunction,
    mm_f32: CudaFunction,
    mm_f16: CudaFunction,
    mm_bf16: CudaFunction,
    rms_norm: CudaFunction,
    rope_tail: CudaFunction,
    hc_pre_finish: CudaFunction,
    hc_post: CudaFunction,
    attention: CudaFunction,
    indexer_scores: CudaFunction,
    swiglu_rows: CudaFunction,
    gather_rows: CudaFunction,
    scatter_add_rows: CudaFunction,
}

impl Kernels {
    fn load(m: &Arc<CudaModule>) -> CudaResult<Kernels> {
        let f = |name: &str| {
            m.load_function(name)
                .map_err(|e| CudaError::driver(format!("loading kernel {name}"), e))
        };
        Ok(Kernels {
            quantize_q8_k: f("quantize_q8_k")?,
            quantize_q8_0: f("quantize_q8_0")?,
            mm_iq2_xxs: f("mm_iq2_xxs")?,
            mm_q2_k: f("mm_q2_k")?,
            mm_q4_k: f("mm_q4_k")?,
            mm_q8_0: f("mm_q8_0")?,
            mm_f32: f("mm_f32")?,
            mm_f16: f("mm_f16")?,
            mm_bf16: f("mm_bf16")?,
            rms_norm: f("rms_norm")?,
            rope_tail: f("rope_tail")?,
            hc_pre_finish: f("hc_pre_finish")?,
            hc_post: f("hc_post")?,
            attention: f("attention")?,
            indexer_scores: f("indexer_scores")?,
            swiglu_rows: f("swiglu_rows")?,
            gather_rows: f("gather_rows")?,
            scatter_add_rows: f("scatter_add_rows")?,
        })
    }
}

/// One weight tensor resident in device memory.
struct DeviceWeight {
    /// A clone of the host tensor: it keeps the host bytes (memory map or heap buffer)
    /// alive, so no other tensor can ever appear at the same address while this entry
    /// exists, which is what makes the address a safe lookup key.
    _host: HostTensor,
    dev: CudaSlice<u8>,
}

/// A weight's bytes on the device for one call: resident, or uploaded for this call only.
enum WeightBuf {
    Resident(Arc<DeviceWeight>, Range<usize>),
    Transient(CudaSlice<u8>),
}

impl WeightBuf {
    fn view(&self) -> CudaView<'_, u8> {
        match self {
            WeightBuf::Resident(w, r) => w.dev.slice(r.clone()),
            WeightBuf::Transient(s) => s.slice(..),
        }
    }
}

/// Activations in the format a weight type's product kernel reads.
enum Act {
    /// Quantized blocks (Q8_K or Q8_0).
    Quant(CudaSlice<u8>),
    /// Plain f32 (the input itself).
    F32,
}

/// The CUDA backend on one device. See the module documentation for what runs where.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    arch: String,
    name: String,
    weights: Mutex<HashMap<(usize, usize), Arc<DeviceWeight>>>,
    /// The first failure of an infallible trait method (norm, RoPE, HC post, attention,
    /// indexer, SwiGLU), returned by the next fallible one so it cannot pass unnoticed.
    sticky: Mutex<Option<CudaError>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.name)
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .field("resident_bytes", &self.resident_bytes())
            .finish()
    }
}

/// Key of a host tensor in the resident-weight table: the address and length of its bytes.
fn key(w: &HostTensor) -> (usize, usize) {
    let d = w.data();
    (d.as_ptr() as usize, d.len())
}

fn cfg1(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn drv<T>(what: &str, r: Result<T, cudarc::driver::DriverError>) -> CudaResult<T> {
    r.map_err(|e| CudaError::driver(what, e))
}

impl CudaBackend {
    /// Opens device `ordinal`: checks the driver, the device and NVRTC (clean errors, never a
    /// panic), compiles the kernels for the device's architecture (or reads them from the
    /// disk cache, see [`crate::kernels`]) and loads them.
    pub fn new(ordinal: usize) -> CudaResult<CudaBackend> {
        check_driver(ordinal)?;
        check_nvrtc()?;
        no_panic(|| Self::open(ordinal), CudaError::NoDriver)
    }

    fn open(ordinal: usize) -> CudaResult<CudaBackend> {
        let ctx = drv("creating the context", CudaContext::new(ordinal))?;
        // One stream and one thread of use at a time: cudarc's per-buffer event tracking
        // (for multi-stream safety) would only add two event records per kernel argument.
        // SAFETY: no buffer of this context is ever used on a second stream.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = drv("reading the compute capability", ctx.compute_capability())?;
        let arch = format!("sm_{major}{minor}");
        let name = drv("reading the device name", ctx.name())?;
        let ptx = crate::kernels::ptx_for(&arch)?;
        let module = drv(
            "loading the kernel module",
            ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx)),
        )?;
        let k = Kernels::load(&module)?;
        let stream = ctx.default_stream();
        Ok(CudaBackend {
            ctx,
            stream,
            k,
            arch,
            name,
            weights: Mutex::new(HashMap::new()),
            sticky: Mutex::new(None),
        })
    }

    /// The device name, e.g. "NVIDIA H200".
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The architecture the kernels were compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> CudaResult<(usize, usize)> {
        drv("reading memory info", self.ctx.mem_get_info())
    }

    /// Bytes of weights resident on the device.
    pub fn resident_bytes(&self) -> usize {
        self.weights
            .lock()
            .map(|m| m.values().map(|w| w.dev.len()).sum())
            .unwrap_or(0)
    }

    /// Copies `tensors` (quantized, as stored) into device memory once; later products find
    /// them by the address of their host bytes. Tensors already resident are skipped.
    /// `progress(done_bytes, total_bytes)` is called after every piece of at most 256 MiB.
    /// Fails before allocating anything when the device lacks the memory.
    pub fn upload_weights(
        &self,
        tensors: &[&HostTensor],
        progress: &mut dyn FnMut(u64, u64),
    ) -> CudaResult<()> {
        let mut todo: Vec<&HostTensor> = Vec::new();
        {
            let map = self.lock_weights();
            let mut seen = std::collections::HashSet::new();
            for &t in tensors {
                if !t.data().is_empty() && !map.contains_key(&key(t)) && seen.insert(key(t)) {
                    todo.push(t);
                }
            }
        }
        let total: u64 = todo.iter().map(|t| t.data().len() as u64).sum();
        let (free, _) = self.mem_info()?;
        // Keep 1 GiB for activations, scratch and the kernels.
        let headroom = 1u64 << 30;
        if total + headroom > free as u64 {
            return Err(CudaError::driver(
                "uploading the weights",
                format!(
                    "the weights need {:.2} GiB (+1 GiB working memory) but {} has {:.2} GiB free",
                    total as f64 / (1u64 << 30) as f64,
                    self.name,
                    free as f64 / (1u64 << 30) as f64
                ),
            ));
        }
        let mut done = 0u64;
        progress(0, total);
        for t in todo {
            let bytes = t.data();
            // SAFETY: every byte is written by the copies below before any kernel reads it.
            let mut dev = drv("allocating weight memory", unsafe {
                self.stream.alloc::<u8>(bytes.len())
            })?;
            let mut off = 0;
            while off < bytes.len() {
                let end = (off + UPLOAD_PIECE).min(bytes.len());
                let mut dst = dev.slice_mut(off..end);
                drv(
                    "copying weights to the device",
                    self.stream.memcpy_htod(&bytes[off..end], &mut dst),
                )?;
                done += (end - off) as u64;
                off = end;
                progress(done, total);
            }
            let w = Arc::new(DeviceWeight {
                _host: t.clone(),
                dev,
            });
            self.lock_weights().insert(key(t), w);
        }
        drv("finishing the weight upload", self.stream.synchronize())?;
        Ok(())
    }

    /// Keeps the first failure of an infallible trait method for [`Self::check_sticky`].
    fn record(&self, op: &str, e: CudaError) {
        let mut s = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        if s.is_none() {
            *s = Some(CudaError::driver(op, e));
        }
    }

    /// Returns (and clears) an earlier failure of an infallible trait method: every fallible
    /// method calls this first, and the output head is a fallible `matmul`, so logits are
    /// never returned after a failed step.
    fn check_sticky(&self) -> BackendResult<()> {
        let mut s = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        match s.take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn lock_weights(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(usize, usize), Arc<DeviceWeight>>> {
        // A poisoned lock only means another thread panicked while inserting; the map itself
        // is always consistent (inserts are single operations).
        self.weights.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes `range` of `w` on the device: the resident copy, or a transient upload.
    fn weight_buf(&self, w: &HostTensor, range: Range<usize>) -> CudaResult<WeightBuf> {
        if let Some(dw) = self.lock_weights().get(&key(w)) {
            return Ok(WeightBuf::Resident(dw.clone(), range));
        }
        let s = drv(
            "uploading a weight",
            self.stream.clone_htod(&w.data()[range]),
        )?;
        Ok(WeightBuf::Transient(s))
    }

    fn up(&self, x: &[f32]) -> CudaResult<CudaSlice<f32>> {
        if x.is_empty() {
            // cudarc rejects empty allocations; a 1-element buffer is never read.
            return drv("allocating", self.stream.alloc_zeros::<f32>(1));
        }
        drv("copying to the device", self.stream.clone_htod(x))
    }

    fn zeros(&self, n: usize) -> CudaResult<CudaSlice<f32>> {
        drv("allocating", self.stream.alloc_zeros::<f32>(n.max(1)))
    }

    fn down(&self, src: &CudaSlice<f32>, dst: &mut [f32]) -> CudaResult<()> {
        if dst.is_empty() {
            return Ok(());
        }
        drv(
            "copying to the host",
            self.stream.memcpy_dtoh(&src.slice(..dst.len()), dst),
        )?;
        drv("synchronizing", self.stream.synchronize())
    }

    /// Quantizes `n_tok` rows of `n_in` activations for a `dtype` weight.
    fn quantize_act(
        &self,
        dtype: DType,
        x: &CudaView<'_, f32>,
        n_tok: usize,
        n_in: usize,
    ) -> CudaResult<Act> {
        match dtype {
            DType::Q2K | DType::Q4K | DType::Iq2Xxs => {
                let nb = (n_tok * n_in / 256) as i32;
                let out = drv(
                    "allocating",
                    self.stream
                        .alloc_zeros::<u8>(nb.max(1) as usize * Q8K_BYTES),
                )?;
                let cfg = LaunchConfig {
                    grid_dim: (nb.max(1) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut b = self.stream.launch_builder(&self.k.quantize_q8_k);
                b.arg(x).arg(&out).arg(&nb);
                // SAFETY: x holds nb * 256 floats, out nb * 292 bytes (quantize_q8_k's contract).
                drv("quantize_q8_k", unsafe { b.launch(cfg) })?;
                Ok(Act::Quant(out))
            }
            DType::Q8_0 => {
                let nb = (n_tok * n_in / 32) as i32;
                let out = drv(
                    "allocating",
                    self.stream
                        .alloc_zeros::<u8>(nb.max(1) as usize * Q8_0_BYTES),
                )?;
                let mut b = self.stream.launch_builder(&self.k.quantize_q8_0);
                b.arg(x).arg(&out).arg(&nb);
                // SAFETY: x holds nb * 32 floats, out nb * 34 bytes; one warp per block.
                drv("quantize_q8_0", unsafe {
                    b.launch(cfg1(nb as usize * 32, 256))
                })?;
                Ok(Act::Quant(out))
            }
            _ => Ok(Act::F32),
        }
    }

    /// `y [n_tok, n_out] = W [n_out, n_in] @ x [n_tok, n_in]` on device buffers.
    #[allow(clippy::too_many_arguments)]
    fn mm_dev(
        &self,
        name: &str,
        dtype: DType,
        w: &CudaView<'_, u8>,
        n_out: usize,
        n_in: usize,
        x: &CudaView<'_, f32>,
        n_tok: usize,
        y: &mut CudaViewMut<'_, f32>,
    ) -> BackendResult<()> {
        let unsupported = || BackendError::UnsupportedDType {
            name: name.to_string(),
            dtype,
        };
        let (f, block) = match dtype {
            DType::Iq2Xxs => (&self.k.mm_iq2_xxs, 256),
            DType::Q2K => (&self.k.mm_q2_k, 256),
            DType::Q4K => (&self.k.mm_q4_k, 256),
            DType::Q8_0 => (&self.k.mm_q8_0, 32),
            DType::F32 => (&self.k.mm_f32, 1),
            DType::F16 => (&self.k.mm_f16, 1),
            DType::BF16 => (&self.k.mm_bf16, 1),
            _ => return Err(unsupported()),
        };
        if !n_in.is_multiple_of(block) {
            return Err(BackendError::Shape {
                name: name.to_string(),
                what: format!("{n_in} columns is not a whole number of {block}-value blocks"),
            });
        }
        if n_out == 0 || n_tok == 0 {
            return Ok(());
        }
        let row_bytes = dtype
            .row_bytes(n_in as u64)
            .ok_or_else(|| BackendError::Shape {
                name: name.to_string(),
                what: format!("{n_in} columns do not make whole {dtype:?} rows"),
            })? as i64;
        let act = self.quantize_act(dtype, x, n_tok, n_in)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (n_out as u32).div_ceil(MM_ROWS),
                (n_tok as u32).div_ceil(MM_TOK),
                1,
            ),
            block_dim: (MM_ROWS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // The fourth argument is blocks per row for the quantized kernels, values per row
        // for the float ones.
        let (n_out_i, n_tok_i) = (n_out as i32, n_tok as i32);
        let nb = (n_in / block) as i32;
        let mut b = self.stream.launch_builder(f);
        b.arg(w).arg(&row_bytes).arg(&n_out_i).arg(&nb);
        match &act {
            Act::Quant(q) => b.arg(q),
            Act::F32 => b.arg(x),
        };
        b.arg(&n_tok_i).arg(y);
        // SAFETY: w holds n_out rows of row_bytes, the activations n_tok rows of n_in values
        // in the format this kernel reads, y n_tok * n_out floats.
        drv(name, unsafe { b.launch(cfg) })?;
        Ok(())
    }

    /// The CPU backend's checks of a `matmul` call.
    fn check_matmul(
        w: &HostTensor,
        rows: &Range<usize>,
        x: &[f32],
        n_tokens: usize,
        y: &[f32],
    ) -> BackendResult<()> {
        let n_in = w.shape.ne(0) as usize;
        let shape_err = |what: String| BackendError::Shape {
            name: w.name.clone(),
            what,
        };
        let row_bytes = w.row_bytes();
        let n_rows_total = w.data().len() / row_bytes.max(1);
        if rows.end > n_rows_total || rows.start > rows.end {
            return Err(shape_err(format!("rows {rows:?} out of {n_rows_total}")));
        }
        if x.len() != n_tokens * n_in || y.len() != n_tokens * rows.len() {
            return Err(shape_err(format!(
                "x {} / y {} values for {n_tokens} tokens of {n_in} -> {}",
                x.len(),
                y.len(),
                rows.len()
            )));
        }
        Ok(())
    }

    fn try_rms_norm(&self, x: &mut [f32], n: usize, w: Option<&[f32]>, eps: f32) -> CudaResult<()> {
        if x.is_empty() || n == 0 {
            return Ok(());
        }
        let mut d = self.up(x)?;
        self.rms_norm_dev(&mut d, x.len() / n, n, w, eps)?;
        self.down(&d, x)
    }

    fn rms_norm_dev(
        &self,
        d: &mut CudaSlice<f32>,
        rows: usize,
        n: usize,
        w: Option<&[f32]>,
        eps: f32,
    ) -> CudaResult<()> {
        let wd = match w {
            Some(w) => Some(self.up(&w[..n])?),
            None => None,
        };
        let (n_i, has_w) = (n as i32, w.is_some() as i32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.k.rms_norm);
        b.arg(&*d).arg(&n_i);
        match &wd {
            Some(wd) => b.arg(wd),
            // Never read when has_w == 0; any device pointer will do.
            None => b.arg(&*d),
        };
        b.arg(&has_w).arg(&eps);
        // SAFETY: d holds rows * n floats, wd (when present) n floats.
        drv("rms_norm", unsafe { b.launch(cfg) }).map(|_| ())
    }

    fn try_rope(
        &self,
        x: &mut [f32],
        n: usize,
        freqs: &[f32],
        pos: u32,
        inverse: bool,
    ) -> CudaResult<()> {
        if x.is_empty() || freqs.is_empty() {
            return Ok(());
        }
        let d = self.up(x)?;
        let f = self.up(freqs)?;
        let rows = x.len() / n;
        let (n_i, rows_i, nf_i) = (n as i32, rows as i32, freqs.len() as i32);
        let (p, inv) = (pos as f32, inverse as i32);
        let mut b = self.stream.launch_builder(&self.k.rope_tail);
        b.arg(&d)
            .arg(&n_i)
            .arg(&rows_i)
            .arg(&f)
            .arg(&nf_i)
            .arg(&p)
            .arg(&inv);
        // SAFETY: d holds rows * n floats, f nf floats, 2 * nf <= n (the caller's contract).
        drv("rope_tail", unsafe {
            b.launch(cfg1(rows * freqs.len(), 256))
        })?;
        self.down(&d, x)
    }

    fn try_hc_pre(
        &self,
        p: &HcParams<'_>,
        state: &[f32],
        x: &mut [f32],
        post: &mut [f32],
        comb: &mut [f32],
    ) -> BackendResult<()> {
        let m = p.n_hc;
        if m == 0 || m > HC_MAX {
            return Err(BackendError::Shape {
                name: p.fn_weight.name.clone(),
                what: format!(
                    "{m} hyper-connection streams (the CUDA kernel handles 1..={HC_MAX})"
                ),
            });
        }
        let d = state.len() / m;
        let n_mix = (2 + m) * m;
        let st = self.up(state)?;
        let mut u = drv("copying on the device", self.stream.clone_dtod(&st))?;
        self.rms_norm_dev(&mut u, 1, m * d, None, p.rms_eps)?;
        let mut mix = self.zeros(n_mix)?;
        let n_in = p.fn_weight.shape.ne(0) as usize;
        let wb = self.weight_buf(p.fn_weight, 0..n_mix * p.fn_weight.row_bytes())?;
        self.mm_dev(
            &p.fn_weight.name,
            p.fn_weight.dtype,
            &wb.view(),
            n_mix,
            n_in,
            &u.slice(..),
            1,
            &mut mix.slice_mut(..),
        )?;
        let scale = self.up(&p.scale[..3])?;
        let base = self.up(&p.base[..n_mix])?;
        let (xd, pd, cd) = (self.zeros(d)?, self.zeros(m)?, self.zeros(m * m)?);
        let (m_i, d_i, it_i) = (m as i32, d as i32, p.n_sinkhorn_iter as i32);
        let mut b = self.stream.launch_builder(&self.k.hc_pre_finish);
        b.arg(&mix)
            .arg(&st)
            .arg(&m_i)
            .arg(&d_i)
            .arg(&scale)
            .arg(&base)
            .arg(&p.hc_eps)
            .arg(&it_i)
            .arg(&xd)
            .arg(&pd)
            .arg(&cd);
        // SAFETY: buffer sizes as allocated above; m <= HC_MAX.
        drv("hc_pre_finish", unsafe { b.launch(cfg1(256, 256)) })?;
        self.down(&xd, x)?;
        self.down(&pd, post)?;
        self.down(&cd, comb)?;
        Ok(())
    }

    fn try_hc_post(
        &self,
        state: &mut [f32],
        o: &[f32],
        post: &[f32],
        comb: &[f32],
        m: usize,
    ) -> CudaResult<()> {
        let d = o.len();
        if d == 0 || m == 0 {
            return Ok(());
        }
        let old = self.up(state)?;
        let out = self.zeros(m * d)?;
        let (od, pd, cd) = (self.up(o)?, self.up(&post[..m])?, self.up(&comb[..m * m])?);
        let (m_i, d_i) = (m as i32, d as i32);
        let mut b = self.stream.launch_builder(&self.k.hc_post);
        b.arg(&out)
            .arg(&old)
            .arg(&od)
            .arg(&pd)
            .arg(&cd)
            .arg(&m_i)
            .arg(&d_i);
        // SAFETY: out/old hold m * d floats, o d, post m, comb m * m.
        drv("hc_post", unsafe { b.launch(cfg1(m * d, 256)) })?;
        self.down(&out, state)
    }

    fn try_attention(
        &self,
        q: &[f32],
        rows: &[&[f32]],
        sinks: &[f32],
        scale: f32,
        out: &mut [f32],
    ) -> CudaResult<()> {
        let n_head = sinks.len();
        if n_head == 0 {
            return Ok(());
        }
        let hd = q.len() / n_head;
        let mut packed = Vec::with_capacity(rows.len() * hd);
        for r in rows {
            packed.extend_from_slice(&r[..hd]);
        }
        let (qd, kd, sd) = (self.up(q)?, self.up(&packed)?, self.up(sinks)?);
        let scratch = self.zeros(n_head * rows.len())?;
        let od = self.zeros(n_head * hd)?;
        let (nr_i, hd_i) = (rows.len() as i32, hd as i32);
        let cfg = LaunchConfig {
            grid_dim: (n_head as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.k.attention);
        b.arg(&qd)
            .arg(&kd)
            .arg(&nr_i)
            .arg(&hd_i)
            .arg(&sd)
            .arg(&scale)
            .arg(&scratch)
            .arg(&od);
        // SAFETY: q/out hold n_head * hd floats, rows n_rows * hd, scratch n_head * n_rows.
        drv("attention", unsafe { b.launch(cfg) })?;
        self.down(&od, out)
    }

    fn try_indexer(
        &self,
        q: &[f32],
        weights: &[f32],
        rows: &[f32],
        scores: &mut [f32],
    ) -> CudaResult<()> {
        let n_head = weights.len();
        if n_head == 0 || scores.is_empty() {
            return Ok(());
        }
        let di = q.len() / n_head;
        let n_rows = scores.len();
        let (qd, wd, rd) = (
            self.up(q)?,
            self.up(weights)?,
            self.up(&rows[..n_rows * di])?,
        );
        let sd = self.zeros(n_rows)?;
        let (nh_i, di_i, nr_i) = (n_head as i32, di as i32, n_rows as i32);
        let mut b = self.stream.launch_builder(&self.k.indexer_scores);
        b.arg(&qd)
            .arg(&wd)
            .arg(&nh_i)
            .arg(&di_i)
            .arg(&rd)
            .arg(&nr_i)
            .arg(&sd);
        // SAFETY: q holds n_head * di floats, rows n_rows * di, scores n_rows; 8 warps per
        // block, one row per warp.
        drv("indexer_scores", unsafe {
            b.launch(cfg1(n_rows * 32, 256))
        })?;
        self.down(&sd, scores)
    }

    /// SwiGLU of `m` rows of `f` values on the device; per-row weights or one weight.
    #[allow(clippy::too_many_arguments)]
    fn swiglu_dev(
        &self,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        f: usize,
        m: usize,
        weights: Option<&CudaSlice<f32>>,
        weight_all: f32,
        clamp: f32,
    ) -> CudaResult<()> {
        let (f_i, m_i) = (f as i32, m as i32);
        let null = 0u64;
        let mut b = self.stream.launch_builder(&self.k.swiglu_rows);
        b.arg(g).arg(u).arg(&f_i).arg(&m_i);
        match weights {
            Some(w) => b.arg(w),
            // A null pointer selects weight_all (the kernel tests it).
            None => b.arg(&null),
        };
        b.arg(&weight_all).arg(&clamp);
        // SAFETY: g and u hold m * f floats, weights (when given) m.
        drv("swiglu_rows", unsafe { b.launch(cfg1(m * f, 256)) }).map(|_| ())
    }

    fn try_swiglu(&self, gate: &mut [f32], up: &[f32], clamp: f32, weight: f32) -> CudaResult<()> {
        if gate.is_empty() {
            return Ok(());
        }
        let (g, u) = (self.up(gate)?, self.up(&up[..gate.len()])?);
        self.swiglu_dev(&g, &u, gate.len(), 1, None, weight, clamp)?;
        self.down(&g, gate)
    }

    /// Routed experts with the activations on the device: per active expert, in ascending
    /// order, gather its tokens, gate and up products, SwiGLU with the route weights, down
    /// product, and add the rows into `y` in route order (the CPU's order).
    #[allow(clippy::too_many_arguments)]
    fn try_moe(
        &self,
        gate_exps: &HostTensor,
        up_exps: &HostTensor,
        down_exps: &HostTensor,
        routes: &[Vec<(usize, f32)>],
        clamp: f32,
        x: &[f32],
        y: &mut [f32],
    ) -> BackendResult<()> {
        let d = gate_exps.shape.ne(0) as usize;
        let f = gate_exps.shape.ne(1) as usize;
        let n = x.len() / d.max(1);
        if y.len() != n * d || down_exps.shape.ne(0) as usize != f {
            return Err(BackendError::Shape {
                name: down_exps.name.clone(),
                what: format!("x {} / y {} values for d = {d}, F = {f}", x.len(), y.len()),
            });
        }
        let xd = self.up(x)?;
        let mut yd = self.up(y)?;
        let gb = self.weight_buf(gate_exps, 0..gate_exps.data().len())?;
        let ub = self.weight_buf(up_exps, 0..up_exps.data().len())?;
        let db = self.weight_buf(down_exps, 0..down_exps.data().len())?;
        let (grb, urb, drb) = (
            gate_exps.row_bytes(),
            up_exps.row_bytes(),
            down_exps.row_bytes(),
        );
        for (e, route) in routes.iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let m = route.len();
            if (e + 1) * f * grb > gate_exps.data().len()
                || (e + 1) * f * urb > up_exps.data().len()
                || (e + 1) * d * drb > down_exps.data().len()
                || route.iter().any(|&(t, _)| t >= n)
            {
                return Err(BackendError::Shape {
                    name: gate_exps.name.clone(),
                    what: format!("expert {e} or a routed token out of range"),
                });
            }
            let toks: Vec<i32> = route.iter().map(|&(t, _)| t as i32).collect();
            let wts: Vec<f32> = route.iter().map(|&(_, w)| w).collect();
            let td = drv("copying to the device", self.stream.clone_htod(&toks))?;
            let wd = self.up(&wts)?;
            let xe = self.zeros(m * d)?;
            let (m_i, d_i) = (m as i32, d as i32);
            let mut b = self.stream.launch_builder(&self.k.gather_rows);
            b.arg(&xd).arg(&td).arg(&m_i).arg(&d_i).arg(&xe);
            // SAFETY: x holds n * d floats and every token index is < n; xe m * d.
            drv("gather_rows", unsafe { b.launch(cfg1(m * d, 256)) })?;
            let (mut g, mut u) = (self.zeros(m * f)?, self.zeros(m * f)?);
            let gv = gb.view();
            let uv = ub.view();
            let dv = db.view();
            self.mm_dev(
                &gate_exps.name,
                gate_exps.dtype,
                &gv.slice(e * f * grb..(e + 1) * f * grb),
                f,
                d,
                &xe.slice(..),
                m,
                &mut g.slice_mut(..),
            )?;
            self.mm_dev(
                &up_exps.name,
                up_exps.dtype,
                &uv.slice(e * f * urb..(e + 1) * f * urb),
                f,
                d,
                &xe.slice(..),
                m,
                &mut u.slice_mut(..),
            )?;
            self.swiglu_dev(&g, &u, f, m, Some(&wd), 1.0, clamp)?;
            let mut ye = self.zeros(m * d)?;
            self.mm_dev(
                &down_exps.name,
                down_exps.dtype,
                &dv.slice(e * d * drb..(e + 1) * d * drb),
                d,
                f,
                &g.slice(..),
                m,
                &mut ye.slice_mut(..),
            )?;
            let mut b = self.stream.launch_builder(&self.k.scatter_add_rows);
            b.arg(&mut yd).arg(&ye).arg(&td).arg(&m_i).arg(&d_i);
            // SAFETY: y holds n * d floats, ye m * d, every token index < n.
            drv("scatter_add_rows", unsafe { b.launch(cfg1(d, 256)) })?;
        }
        self.down(&yd, y)?;
        Ok(())
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda
    }

    fn matmul(
        &self,
        w: &HostTensor,
        rows: Range<usize>,
        x: &[f32],
        n_tokens: usize,
        y: &mut [f32],
    ) -> BackendResult<()> {
        self.check_sticky()?;
        Self::check_matmul(w, &rows, x, n_tokens, y)?;
        let rb = w.row_bytes();
        let n_in = w.shape.ne(0) as usize;
        let wb = self.weight_buf(w, rows.start * rb..rows.end * rb)?;
        let xd = self.up(x)?;
        let mut yd = self.zeros(y.len())?;
        self.mm_dev(
            &w.name,
            w.dtype,
            &wb.view(),
            rows.len(),
            n_in,
            &xd.slice(..),
            n_tokens,
            &mut yd.slice_mut(..),
        )?;
        self.down(&yd, y)?;
        Ok(())
    }

    fn get_row(&self, w: &HostTensor, row: usize, out: &mut [f32]) -> BackendResult<()> {
        self.check_sticky()?;
        // Dequantized on the host from the mapped bytes, bit-identical to the CPU backend.
        ds4_quant::row::tensor_row(w, row, out)
    }

    fn rms_norm(&self, x: &mut [f32], n: usize, w: Option<&[f32]>, eps: f32) {
        if let Err(e) = self.try_rms_norm(x, n, w, eps) {
            self.record("rms_norm", e);
        }
    }

    fn rope_tail(&self, x: &mut [f32], n: usize, freqs: &[f32], pos: u32, inverse: bool) {
        if let Err(e) = self.try_rope(x, n, freqs, pos, inverse) {
            self.record("rope_tail", e);
        }
    }

    fn hc_pre(
        &self,
        p: &HcParams<'_>,
        state: &[f32],
        x: &mut [f32],
        post: &mut [f32],
        comb: &mut [f32],
    ) -> BackendResult<()> {
        self.check_sticky()?;
        self.try_hc_pre(p, state, x, post, comb)
    }

    fn hc_post(&self, state: &mut [f32], o: &[f32], post: &[f32], comb: &[f32], n_hc: usize) {
        if let Err(e) = self.try_hc_post(state, o, post, comb, n_hc) {
            self.record("hc_post", e);
        }
    }

    fn attention(&self, q: &[f32], rows: &[&[f32]], sinks: &[f32], scale: f32, out: &mut [f32]) {
        if let Err(e) = self.try_attention(q, rows, sinks, scale, out) {
            self.record("attention", e);
        }
    }

    fn indexer_scores(&self, q: &[f32], weights: &[f32], rows: &[f32], scores: &mut [f32]) {
        if let Err(e) = self.try_indexer(q, weights, rows, scores) {
            self.record("indexer_scores", e);
        }
    }

    fn moe_routed(
        &self,
        gate_exps: &HostTensor,
        up_exps: &HostTensor,
        down_exps: &HostTensor,
        routes: &[Vec<(usize, f32)>],
        clamp: f32,
        x: &[f32],
        y: &mut [f32],
    ) -> BackendResult<()> {
        self.check_sticky()?;
        self.try_moe(gate_exps, up_exps, down_exps, routes, clamp, x, y)
    }

    fn swiglu(&self, gate: &mut [f32], up: &[f32], clamp: f32, weight: f32) {
        if let Err(e) = self.try_swiglu(gate, up, clamp, weight) {
            self.record("swiglu", e);
        }
    }
}
