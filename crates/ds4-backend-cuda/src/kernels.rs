//! The kernel sources (`kernels/cuda/*.cu`), their NVRTC compilation for the device's
//! architecture, and the on-disk PTX cache.
//!
//! The `.cu` files are embedded with `include_str!` and concatenated into one translation
//! unit ([`source`]); none of them includes a header, so NVRTC needs no CUDA include
//! directory. The PTX is cached under `$DS4_CUDA_CACHE`, else `$XDG_CACHE_HOME/ds4/cuda`,
//! else `~/.cache/ds4/cuda`, in a file named by the SHA-256 of the source, the target
//! architecture, the NVRTC version and the compile options: a changed kernel, GPU or
//! toolkit never picks up stale code. A cache that cannot be read or written is skipped
//! silently (compiling takes a few seconds, it is never wrong).

use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::error::{CudaError, CudaResult};

/// Shared types, f16 conversion and reductions.
pub const COMMON_CU: &str = include_str!("../../../kernels/cuda/common.cu");
/// The IQ2_XXS grid and sign tables, generated from `ds4_quant::tables` ([`iq2xxs_tables_cu`]).
pub const IQ2XXS_TABLES_CU: &str = include_str!("../../../kernels/cuda/iq2xxs_tables.cu");
/// Activation quantizers and the quantized products.
pub const QUANT_CU: &str = include_str!("../../../kernels/cuda/quant.cu");
/// Norms, RoPE, hyper-connections, attention, indexer, SwiGLU, MoE gather/scatter.
pub const OPS_CU: &str = include_str!("../../../kernels/cuda/ops.cu");

/// The whole kernel translation unit, in the order `kernels/cuda/check.sh` concatenates it.
pub fn source() -> String {
    [COMMON_CU, IQ2XXS_TABLES_CU, QUANT_CU, OPS_CU].concat()
}

/// NVRTC options besides the architecture. Default precision (IEEE division and square
/// root, no flush to zero): the CPU reference is plain IEEE f32.
const OPTIONS: &[&str] = &["--std=c++17"];

/// Every `extern "C"` kernel the backend launches.
pub const KERNEL_NAMES: &[&str] = &[
    "quantize_q8_k",
    "quantize_q8_0",
    "mm_iq2_xxs",
    "mm_q2_k",
    "mm_q4_k",
    "mm_q8_0",
    "mm_f32",
    "mm_f16",
    "mm_bf16",
    "rms_norm",
    "rope_tail",
    "hc_pre_finish",
    "hc_post",
    "attention",
    "indexer_scores",
    "swiglu_rows",
    "gather_rows",
    "scatter_add_rows",
];

/// The cache directory, if one can be named.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DS4_CUDA_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("ds4").join("cuda"))
}

/// NVRTC's version `(major, minor)`.
fn nvrtc_version() -> CudaResult<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through the valid pointers we pass.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::NoNvrtc);
    }
    Ok((major, minor))
}

/// The cache key: source, architecture, NVRTC version and options.
pub fn cache_key(src: &str, arch: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(src.as_bytes());
    h.update(format!("\0{arch}\0{}.{}\0{}", nvrtc.0, nvrtc.1, OPTIONS.join(" ")).as_bytes());
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("{arch}-nvrtc{}.{}-{}", nvrtc.0, nvrtc.1, &hex[..24])
}

/// PTX for `arch` (e.g. `sm_90`): from the disk cache, else compiled by NVRTC and cached.
pub fn ptx_for(arch: &str) -> CudaResult<String> {
    ptx_cached_in(arch, cache_dir().as_deref())
}

/// [`ptx_for`] with an explicit cache directory (`None`: no cache).
pub fn ptx_cached_in(arch: &str, dir: Option<&std::path::Path>) -> CudaResult<String> {
    let src = source();
    let nv = crate::probe::no_panic(nvrtc_version, CudaError::NoNvrtc)?;
    let key = cache_key(&src, arch, nv);
    let path = dir.map(|d| d.join(format!("{key}.ptx")));
    if let Some(p) = &path
        && let Ok(ptx) = std::fs::read_to_string(p)
        && ptx.contains(".entry")
    {
        return Ok(ptx);
    }
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions {
        options,
        name: Some("ds4.cu".to_string()),
        ..Default::default()
    };
    let ptx = crate::probe::no_panic(
        || {
            cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| CudaError::Compile {
                arch: arch.to_string(),
                log: match e {
                    cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                        log.to_string_lossy().into_owned()
                    }
                    other => other.to_string(),
                },
            })
        },
        CudaError::NoNvrtc,
    )?;
    let text = ptx.to_src();
    if let Some(p) = &path {
        // Write to a temporary name and rename, so a concurrent reader never sees half a file.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let ok = p
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, &text).is_ok();
        if ok {
            let _ = std::fs::rename(&tmp, p);
        } else {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(text)
}

/// The text of `kernels/cuda/iq2xxs_tables.cu`, rendered from `ds4_quant::tables`. A test
/// checks the committed file equals it, so the GPU tables cannot drift from the Rust ones
/// (run the test with `DS4_BLESS=1` to rewrite the file).
pub fn iq2xxs_tables_cu() -> String {
    use ds4_quant::tables::{IQ2XXS_GRID, KSIGNS_IQ2XS};
    let mut s = String::from(
        "// GENERATED from crates/ds4-quant/src/tables.rs by ds4_backend_cuda::kernels::iq2xxs_tables_cu;\n\
         // do not edit (the test `iq2xxs_tables_file_matches_rust` rewrites it with DS4_BLESS=1).\n\n",
    );
    s.push_str("__constant__ u64 IQ2XXS_GRID[256] = {\n");
    for chunk in IQ2XXS_GRID.chunks(4) {
        let items: Vec<String> = chunk.iter().map(|v| format!("0x{v:016x}ull")).collect();
        s.push_str(&format!("    {},\n", items.join(", ")));
    }
    s.push_str("};\n\n__constant__ u8 KSIGNS_IQ2XS[128] = {\n");
    for chunk in KSIGNS_IQ2XS.chunks(16) {
        let items: Vec<String> = chunk.iter().map(|v| v.to_string()).collect();
        s.push_str(&format!("    {},\n", items.join(", ")));
    }
    s.push_str("};\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iq2xxs_tables_file_matches_rust() {
        let want = iq2xxs_tables_cu();
        if std::env::var_os("DS4_BLESS").is_some() {
            let p = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../kernels/cuda/iq2xxs_tables.cu"
            );
            std::fs::write(p, &want).expect("write iq2xxs_tables.cu");
            return;
        }
        assert_eq!(
            IQ2XXS_TABLES_CU, want,
            "kernels/cuda/iq2xxs_tables.cu differs from ds4_quant::tables: rerun with DS4_BLESS=1"
        );
    }

    #[test]
    fn every_kernel_name_is_defined_in_the_source() {
        let src = source();
        for name in KERNEL_NAMES {
            assert!(
                src.contains(&format!(" {name}(")),
                "kernel {name} not found in kernels/cuda/*.cu"
            );
        }
        assert!(
            !src.contains("#include"),
            "kernels must not include headers (NVRTC has none)"
        );
    }

    #[test]
    fn cache_key_changes_with_source_arch_and_version() {
        let k = cache_key("a", "sm_90", (13, 0));
        assert_ne!(k, cache_key("b", "sm_90", (13, 0)));
        assert_ne!(k, cache_key("a", "sm_80", (13, 0)));
        assert_ne!(k, cache_key("a", "sm_90", (13, 1)));
        assert!(k.starts_with("sm_90-nvrtc13.0-"));
    }
}
