//! End-to-end tests of `ds4 inspect`, run as a process, against the gguf-py fixtures in
//! `tests/fixtures/gguf/` (see the README there for their provenance).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ds4_tensor::DType;
use ds4_tensor::gguf::GgufWriter;
use serde_json::{Map, Value as Json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gguf")
        .join(name)
}

fn load_json(name: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).expect("fixture")).expect("JSON")
}

fn ds4(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ds4"))
        .args(args)
        .output()
        .expect("ds4 runs")
}

fn inspect(args: &[&str]) -> Output {
    let args: Vec<&std::ffi::OsStr> = std::iter::once("inspect")
        .chain(args.iter().copied())
        .map(AsRef::as_ref)
        .collect();
    ds4(&args)
}

/// A scratch directory unique to this test process and `tag`.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ds4-inspect-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Asserts a clean failure: exit status 1, a `ds4: error:` message with `fragment`, no panic.
#[track_caller]
fn assert_fails(out: &Output, fragment: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.starts_with("ds4: error:"), "{stderr}");
    assert!(stderr.contains(fragment), "{stderr:?} lacks {fragment:?}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// `ds4 inspect --json` must say exactly what gguf-py read from the same file.
fn check_json(gguf: &str, description: &str, variant: Json) {
    let out = inspect(&["--json", fixture(gguf).to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "one JSON object on one line"
    );
    let got: Json = serde_json::from_str(&text).expect("stdout is JSON");
    let d = load_json(description);

    assert_eq!(got["version"], d["version"]);
    assert_eq!(got["variant"], variant);
    let expected_meta: Map<String, Json> = d["metadata"]
        .as_array()
        .expect("list")
        .iter()
        .map(|m| {
            (
                m["key"].as_str().expect("key").to_string(),
                m["value"].clone(),
            )
        })
        .collect();
    assert_eq!(got["metadata"], Json::Object(expected_meta));
    let expected_tensors: Vec<Json> = d["tensors"]
        .as_array()
        .expect("list")
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t["name"], "type": t["type"], "dims": t["dims"],
                "offset": t["offset"], "bytes": t["bytes"],
            })
        })
        .collect();
    assert_eq!(got["tensors"], Json::Array(expected_tensors));
    assert_eq!(got.as_object().expect("object").len(), 4);
}

#[test]
fn json_matches_gguf_py_for_its_own_file() {
    check_json("pywritten.gguf", "pywritten.json", "q2".into());
}

#[test]
fn json_matches_gguf_py_for_our_writer_file() {
    check_json("rswritten.gguf", "rswritten.json", "q4".into());
}

/// Reads a float32 .npy file as numpy writes it: returns (shape, values).
fn read_npy(path: &Path) -> (Vec<u64>, Vec<f32>) {
    let b = std::fs::read(path).expect("npy written");
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    assert_eq!((10 + hlen) % 64, 0, "data aligned to 64 like numpy");
    let header = std::str::from_utf8(&b[10..10 + hlen]).expect("ascii header");
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'fortran_order': False"),
        "{header}"
    );
    let tuple = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("shape");
    let shape: Vec<u64> = tuple
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("dim"))
        .collect();
    let values = b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (shape, values)
}

#[test]
fn npy_matches_gguf_py_dequantization() {
    let dir = scratch("npy");
    let mut seen = Vec::new();
    for description in ["pywritten.json", "rswritten.json"] {
        let d = load_json(description);
        let gguf = fixture(d["file"].as_str().expect("file"));
        for t in d["tensors"].as_array().expect("tensors") {
            let name = t["name"].as_str().expect("name");
            let ty = t["type"].as_str().expect("type");
            let npy = dir.join(format!("{name}.npy"));
            let out = ds4(&[
                "inspect".as_ref(),
                "--tensor".as_ref(),
                name.as_ref(),
                "--npy".as_ref(),
                npy.as_os_str(),
                gguf.as_os_str(),
            ]);
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let (shape, got) = read_npy(&npy);
            let want_shape: Vec<u64> = t["numpy_shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|x| x.as_u64().expect("dim"))
                .collect();
            assert_eq!(shape, want_shape, "{name}");
            let want: Vec<f32> = t["dequant_f32_bits"]
                .as_array()
                .expect("bits")
                .iter()
                .map(|x| f32::from_bits(x.as_u64().expect("bits") as u32))
                .collect();
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if ty == "Q4_K" {
                    // gguf-py computes Q4_K in a different order of operations: a few ulp.
                    let tol = 1e-6 * w.abs().max(1e-3);
                    assert!((g - w).abs() <= tol, "{name}[{i}]: {g} vs gguf-py {w}");
                } else {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{name}[{i}] ({ty}): {g} vs gguf-py {w}"
                    );
                }
            }
            seen.push(ty.to_string());
        }
    }
    for ty in [
        "F32", "F16", "BF16", "Q8_0", "Q2_K", "Q4_K", "IQ2_XXS", "I32",
    ] {
        assert!(seen.iter().any(|s| s == ty), "no {ty} tensor checked");
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn report_lists_metadata_tensors_totals_and_variant() {
    let out = inspect(&[fixture("pywritten.gguf").to_str().expect("utf-8")]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        text.contains("GGUF v3, alignment 32, tensor data at byte 2432"),
        "{text}"
    );
    assert!(text.contains("variant: q2"));
    assert!(text.contains("metadata (29 records):"));
    // Long arrays are summarized: type, count, first values.
    let ratios = text
        .lines()
        .find(|l| l.contains("deepseek4.attention.compress_ratios"))
        .expect("listed");
    assert!(
        ratios.contains("ARRAY[UINT32]")
            && ratios.contains("43 items: [0, 0, 4, 128,")
            && ratios.ends_with("...]"),
        "{ratios}"
    );
    let down = text
        .lines()
        .find(|l| l.contains("blk.0.ffn_down_exps.weight"))
        .expect("listed");
    let cols: Vec<&str> = down.split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "blk.0.ffn_down_exps.weight",
            "Q2_K",
            "[256,",
            "1,",
            "2]",
            "168",
            "960"
        ]
    );
    let iq2 = text
        .lines()
        .find(|l| l.trim_start().starts_with("IQ2_XXS "))
        .expect("totals");
    assert!(
        iq2.contains("2 tensors") && iq2.contains("264 bytes"),
        "{iq2}"
    );
    assert!(text.lines().any(|l| l.trim_start().starts_with("all ")
        && l.contains("10 tensors")
        && l.contains("1336 bytes")));
}

#[test]
fn variant_is_null_without_consistent_experts() {
    let dir = scratch("variant");
    let write = |file: &str, down: DType| {
        let mut w = GgufWriter::new();
        w.add("general.architecture", "deepseek4").expect("key");
        w.add_tensor(
            "blk.0.ffn_gate_exps.weight",
            DType::Iq2Xxs,
            &[256, 1, 1],
            vec![0u8; 66],
        )
        .expect("tensor");
        let n = down.row_bytes(256).expect("blocks") as usize;
        w.add_tensor(
            "blk.0.ffn_down_exps.weight",
            down,
            &[256, 1, 1],
            vec![0u8; n],
        )
        .expect("tensor");
        let path = dir.join(file);
        w.write_file(&path).expect("write");
        path
    };
    let variant = |path: &Path| {
        let out = inspect(&["--json", path.to_str().expect("utf-8")]);
        assert!(out.status.success());
        serde_json::from_slice::<Json>(&out.stdout).expect("JSON")["variant"].clone()
    };
    assert_eq!(variant(&write("q2.gguf", DType::Q2K)), Json::from("q2"));
    assert_eq!(variant(&write("mixed.gguf", DType::Q4K)), Json::Null);
    let mut w = GgufWriter::new();
    w.add_tensor("output_norm.weight", DType::F32, &[4], vec![0u8; 16])
        .expect("tensor");
    let none = dir.join("none.gguf");
    w.write_file(&none).expect("write");
    assert_eq!(variant(&none), Json::Null);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn bad_files_exit_1_with_a_message() {
    let dir = scratch("bad");
    let good = std::fs::read(fixture("pywritten.gguf")).expect("fixture");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.gguf", vec![], "shorter than the 24-byte header"),
        (
            "text.gguf",
            b"hello, this is not a model file at all".to_vec(),
            "not a GGUF file",
        ),
        (
            "truncated.gguf",
            good[..good.len() - 100].to_vec(),
            "outside",
        ),
        ("head.gguf", good[..1500].to_vec(), "truncated"),
        (
            "bigendian.gguf",
            [&good[..4], &[0, 0, 0, 3], &good[8..]].concat(),
            "big-endian",
        ),
    ];
    for (file, bytes, fragment) in cases {
        let path = dir.join(file);
        std::fs::write(&path, bytes).expect("write");
        for json in [false, true] {
            let mut args = vec![path.to_str().expect("utf-8")];
            if json {
                args.insert(0, "--json");
            }
            assert_fails(&inspect(&args), fragment);
        }
    }
    assert_fails(
        &inspect(&[dir.join("missing.gguf").to_str().expect("utf-8")]),
        "No such file",
    );
    let npy = dir.join("x.npy");
    let out = inspect(&[
        "--tensor",
        "nope",
        "--npy",
        npy.to_str().expect("utf-8"),
        fixture("pywritten.gguf").to_str().expect("utf-8"),
    ]);
    assert_fails(&out, "no tensor named \"nope\"");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// The full-shape q2 file from `/work/shared/tools/gen_flash_sparse_gguf.py` (sparse,
/// 80.76 GiB of tensor data). Set `DS4_FLASH_SPARSE` to its path.
#[test]
#[ignore = "slow"]
fn flash_sparse_file() {
    let Some(path) = std::env::var_os("DS4_FLASH_SPARSE") else {
        eprintln!("DS4_FLASH_SPARSE not set: skipping");
        return;
    };
    let started = std::time::Instant::now();
    let g = ds4_tensor::gguf::GgufFile::open(&path).expect("opens");
    eprintln!("opened in {:?}", started.elapsed());
    assert_eq!(g.tensors().len(), 1328);
    let total: u64 = g.tensors().iter().map(|t| t.n_bytes).sum();
    assert_eq!(
        total, 86_714_775_900,
        "FORMATS.md s3.4: q2 tensor data bytes"
    );
    assert_eq!(
        g.get_str_array("tokenizer.ggml.tokens")
            .expect("tokens")
            .len(),
        129_280
    );

    let out = ds4(&["inspect".as_ref(), "--json".as_ref(), path.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Json = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(j["variant"], "q2");
    assert_eq!(j["tensors"].as_array().expect("tensors").len(), 1328);
    let out = ds4(&["inspect".as_ref(), path.as_os_str()]);
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.contains("variant: q2"));
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("all ")
            && l.contains("1328 tensors")
            && l.contains("80.76 GiB")),
        "{text}"
    );
}
