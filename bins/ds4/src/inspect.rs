//! `ds4 inspect`: metadata, tensor table and tensor dumps of a GGUF file.
//!
//! Three outputs: a human-readable report (metadata with long arrays summarized, the tensor
//! table, totals per type, the ds4 variant), `--json` (one object: version, metadata,
//! tensors, variant) and `--tensor NAME --npy OUT.npy` (one tensor dequantized to float32,
//! in numpy order). Opening reads only the file's head; only `--npy` touches tensor data.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ds4_tensor::DType;
use ds4_tensor::gguf::{GgufFile, TensorInfo, Value};
use serde_json::{Map, Value as Json, json};

/// Arguments of `ds4 inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Print one JSON object (version, metadata, tensors, variant) instead of the report.
    #[arg(long, conflicts_with = "npy")]
    pub json: bool,
    /// The tensor to dump (with --npy).
    #[arg(long, value_name = "NAME", requires = "npy")]
    pub tensor: Option<String>,
    /// Write the tensor named by --tensor, dequantized to float32, as a .npy file whose
    /// shape is the GGUF dims reversed (rows first).
    #[arg(long, value_name = "OUT.npy", requires = "tensor")]
    pub npy: Option<PathBuf>,
    /// Array elements shown per metadata array in the report.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub array_items: usize,
    /// Also report the session state (KV cache) memory for a context of N tokens: bytes
    /// per token and fixed bytes per layer type (MODEL.md s4.2), as the engine holds it
    /// (f32) and as a disk KV cache checkpoint of N tokens stores it.
    #[arg(long, value_name = "N", conflicts_with_all = ["npy", "json"])]
    pub ctx: Option<usize>,
}

/// Runs `ds4 inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let g =
        GgufFile::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let open_time = started.elapsed();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if let (Some(name), Some(npy)) = (&args.tensor, &args.npy) {
        let info = dump_npy(&g, name, npy)?;
        writeln!(
            out,
            "wrote {} ({} {}, numpy shape {:?}) to {}",
            info.name,
            info.dtype,
            info.shape,
            info.shape.numpy(),
            npy.display()
        )?;
    } else if args.json {
        serde_json::to_writer(&mut out, &to_json(&g))?;
        writeln!(out)?;
    } else {
        out.write_all(report(&g, &args.file, args.array_items, open_time).as_bytes())?;
        if let Some(n) = args.ctx {
            let cfg = ds4_model::Config::from_gguf(&g)
                .context("--ctx needs a ds4 model file (deepseek4 metadata)")?;
            out.write_all(state_report(&cfg, n).as_bytes())?;
        }
    }
    out.flush()?;
    Ok(())
}

// ---- State memory -------------------------------------------------------------------

/// The `--ctx` table: per layer type, bytes per token and at `n` tokens.
pub fn state_report(cfg: &ds4_model::Config, n: usize) -> String {
    let m = ds4_kvcache::accounting::state_memory(cfg, n);
    let mib = |b: u64| b as f64 / 1048576.0;
    let mut s = String::new();
    let _ = writeln!(s, "\nsession state at ctx {n} (f32, MODEL.md s4.2):");
    let _ = writeln!(
        s,
        "  {:<14} {:>6} {:>16} {:>16} {:>14}",
        "layer type", "layers", "B/token/layer", "at ctx (MiB)", "fixed (MiB)"
    );
    for t in &m.types {
        let _ = writeln!(
            s,
            "  {:<14} {:>6} {:>16.1} {:>16.2} {:>14.2}",
            t.name(),
            t.n_layers,
            t.milli_bytes_per_token as f64 / 1000.0,
            mib(t.growing_bytes * t.n_layers as u64),
            mib(t.fixed_bytes * t.n_layers as u64)
        );
    }
    let _ = writeln!(
        s,
        "  token ids 4 B/token ({:.2} MiB), logits {:.2} MiB",
        mib(m.token_bytes),
        mib(m.logits_bytes)
    );
    let _ = writeln!(
        s,
        "  total: {:.1} B/token of context (all layers), {} bytes = {:.2} GiB at ctx {n}",
        m.milli_bytes_per_token() as f64 / 1000.0,
        m.total_bytes(),
        m.total_bytes() as f64 / (1u64 << 30) as f64
    );
    s
}

// ---- Variant ------------------------------------------------------------------------

/// Which published ds4 file this is, from the types of its routed experts (FORMATS.md s3.3):
/// `"q2"` when every `ffn_gate_exps`/`ffn_up_exps` is IQ2_XXS and every `ffn_down_exps` is
/// Q2_K, `"q4"` when all of them are Q4_K, `None` otherwise (no experts, or a mix).
pub fn variant(g: &GgufFile) -> Option<&'static str> {
    let mut gate_up = Vec::new();
    let mut down = Vec::new();
    for t in g.tensors() {
        if t.name.contains("ffn_gate_exps") || t.name.contains("ffn_up_exps") {
            gate_up.push(t.dtype);
        } else if t.name.contains("ffn_down_exps") {
            down.push(t.dtype);
        }
    }
    if gate_up.is_empty() || down.is_empty() {
        return None;
    }
    let all = |v: &[DType], d: DType| v.iter().all(|&t| t == d);
    if all(&gate_up, DType::Iq2Xxs) && all(&down, DType::Q2K) {
        Some("q2")
    } else if all(&gate_up, DType::Q4K) && all(&down, DType::Q4K) {
        Some("q4")
    } else {
        None
    }
}

// ---- JSON ---------------------------------------------------------------------------

/// A metadata value as JSON: numbers (u64/i64 exact, floats as f64; NaN and infinities,
/// which JSON lacks, become null), booleans, strings and (nested) arrays.
fn value_json(v: &Value<'_>) -> Json {
    match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::F32(x) => f64::from(x).into(),
        Value::Bool(x) => x.into(),
        Value::String(s) => s.into(),
        Value::Array(a) => Json::Array(a.iter().map(|e| value_json(&e)).collect()),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        Value::F64(x) => x.into(),
    }
}

fn to_json(g: &GgufFile) -> Json {
    let metadata: Map<String, Json> = g
        .metadata()
        .map(|(k, v)| (k.to_string(), value_json(&v)))
        .collect();
    let tensors: Vec<Json> = g
        .tensors()
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "type": t.dtype.name(),
                "dims": t.shape.dims(),
                "offset": t.offset,
                "bytes": t.n_bytes,
            })
        })
        .collect();
    json!({
        "version": g.version(),
        "metadata": metadata,
        "tensors": tensors,
        "variant": variant(g),
    })
}

// ---- Report -------------------------------------------------------------------------

/// Longest string shown whole in the report.
const MAX_STR_CHARS: usize = 80;

fn short_str(s: &str) -> String {
    if s.chars().count() <= MAX_STR_CHARS {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX_STR_CHARS).collect();
        format!("{head:?}... ({} bytes)", s.len())
    }
}

/// A value for the report: arrays show type, count and the first `items` elements.
fn value_text(v: &Value<'_>, items: usize) -> String {
    match v {
        Value::String(s) => short_str(s),
        Value::Array(a) => {
            let shown: Vec<String> = a
                .iter()
                .take(items)
                .map(|e| value_text(&e, items))
                .collect();
            let more = if a.len() > items { ", ..." } else { "" };
            if a.len() > items {
                format!("{} items: [{}{more}]", a.len(), shown.join(", "))
            } else {
                format!("[{}]", shown.join(", "))
            }
        }
        Value::F32(x) => format!("{x:?}"),
        Value::F64(x) => format!("{x:?}"),
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn report(g: &GgufFile, path: &Path, items: usize, open_time: std::time::Duration) -> String {
    // Writing to a String cannot fail.
    let mut s = String::new();
    let _ = writeln!(
        s,
        "file: {} ({} bytes, opened in {:.1} ms)",
        path.display(),
        g.file_len(),
        open_time.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        s,
        "GGUF v{}, alignment {}, tensor data at byte {}",
        g.version(),
        g.alignment(),
        g.data_start()
    );
    let _ = writeln!(s, "variant: {}", variant(g).unwrap_or("other"));

    let _ = writeln!(s, "\nmetadata ({} records):", g.metadata_len());
    let key_w = g.metadata().map(|(k, _)| k.len()).max().unwrap_or(0);
    let types: Vec<String> = g.metadata().map(|(_, v)| v.type_name()).collect();
    let type_w = types.iter().map(String::len).max().unwrap_or(0);
    for ((k, v), ty) in g.metadata().zip(&types) {
        let _ = writeln!(s, "  {k:key_w$}  {ty:type_w$}  {}", value_text(&v, items));
    }

    let _ = writeln!(s, "\ntensors ({}):", g.tensors().len());
    let name_w = g
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        s,
        "  {:name_w$}  {:7}  {:24}  {:>14}  {:>14}",
        "name", "type", "dims", "bytes", "offset"
    );
    for t in g.tensors() {
        let _ = writeln!(
            s,
            "  {:name_w$}  {:7}  {:24}  {:>14}  {:>14}",
            t.name,
            t.dtype.name(),
            t.shape.to_string(),
            t.n_bytes,
            t.offset
        );
    }

    let _ = writeln!(s, "\ntotals per type:");
    let mut all_bytes = 0;
    for (dtype, count, bytes) in g.totals_by_type() {
        all_bytes += bytes;
        let _ = writeln!(
            s,
            "  {:7}  {count:5} tensors  {bytes:>14} bytes  {:>11}",
            dtype.name(),
            gib(bytes)
        );
    }
    let _ = writeln!(
        s,
        "  {:7}  {:5} tensors  {all_bytes:>14} bytes  {:>11}",
        "all",
        g.tensors().len(),
        gib(all_bytes)
    );
    s
}

// ---- .npy ---------------------------------------------------------------------------

/// Rows dequantized per step, bounding memory for multi-GiB expert tensors.
const NPY_CHUNK_ELEMS: usize = 1 << 22;

/// Writes tensor `name` dequantized to float32 as a version 1.0 .npy file with the numpy
/// shape (GGUF dims reversed). Streams row chunks so a 2^31-element tensor needs no 8 GiB
/// buffer.
fn dump_npy(g: &GgufFile, name: &str, path: &Path) -> Result<TensorInfo> {
    let Some(info) = g.tensor_info(name) else {
        bail!(
            "no tensor named {name:?} in the file ({} tensors; `ds4 inspect FILE` lists them)",
            g.tensors().len()
        );
    };
    let data = g.tensor_data(name)?;
    let ne0 = info.shape.ne(0) as usize;
    let row_bytes = info.dtype.row_bytes(info.shape.ne(0)).context("row size")? as usize;
    let rows_per_chunk = (NPY_CHUNK_ELEMS / ne0).max(1);

    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    w.write_all(&npy_header(&info.shape.numpy()))?;
    let mut values = Vec::new();
    for chunk in data.chunks(rows_per_chunk * row_bytes) {
        values.resize(chunk.len() / row_bytes * ne0, 0f32);
        ds4_quant::row::dequantize(info.dtype, chunk, &mut values)
            .with_context(|| format!("dequantizing {name} ({})", info.dtype))?;
        for v in &values {
            w.write_all(&v.to_le_bytes())?;
        }
    }
    w.flush()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(info.clone())
}

/// The .npy v1.0 header for little-endian float32 data of `shape` (C order), padded with
/// spaces and a newline so that the data starts at a multiple of 64 bytes, as numpy does.
fn npy_header(shape: &[u64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    // A shape of at most four u64 keeps the dict far below 65535 bytes.
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}
