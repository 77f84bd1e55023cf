//! The IQ2_XXS quantizer against llama.cpp's `quantize_iq2_xxs`, byte for byte.
//!
//! Expected bytes come from `tests/fixtures/quant/cref/` (written by a harness compiled
//! against llama.cpp's `ggml-quants.c`; its README gives provenance, layout and the
//! regeneration command). Three importance variants are checked on every case:
//! `imp` (a random imatrix-like vector), `colimp` (ds4's column-energy rule, which
//! `quantize_rows(.., None, ..)` applies) and `sq` (each row alone weighed by its own
//! squares, which `quantize(.., None, ..)` applies).
//!
//! The RMSE tests compare the quality of our blocks with the numbers the harness measured
//! for llama.cpp's (`manifest.json` -> `rmse`).

use ds4_quant::BlockIq2Xxs;
use ds4_quant::iq2_xxs;
use ds4_quant::iq2_xxs_quantize::{column_energy, quantize, quantize_rows};

const QK_K: usize = 256;

// ---------------------------------------------------------------------------------------
// Fixture access.

fn fixture_path(name: &str) -> String {
    format!(
        "{}/../../tests/fixtures/quant/cref/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading C-reference fixture {path}: {e}"))
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn manifest() -> String {
    String::from_utf8(fixture("manifest.json")).expect("manifest.json is UTF-8")
}

/// The number after `"key": ` at or after byte `from` of the manifest, parsed as `T` (the
/// harness writes the manifest in a fixed shape, so no JSON parser is needed).
fn number_after<T: std::str::FromStr>(text: &str, from: usize, key: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    let pat = format!("\"{key}\": ");
    let at = text[from..]
        .find(&pat)
        .unwrap_or_else(|| panic!("manifest: no {key} after offset {from}"))
        + from
        + pat.len();
    let end = text[at..]
        .find([',', '}', '\n', ' '])
        .expect("number is followed by a delimiter")
        + at;
    text[at..end]
        .parse()
        .unwrap_or_else(|e| panic!("manifest: {key} = {:?}: {e:?}", &text[at..end]))
}

/// `(name, n_rows, n_cols)` of every case listed in the manifest.
fn cases() -> Vec<(String, usize, usize)> {
    let text = manifest();
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(i) = text[pos..].find("\"name\": \"") {
        let start = pos + i + "\"name\": \"".len();
        let end = start + text[start..].find('"').expect("closing quote");
        let name = text[start..end].to_string();
        let n_rows = number_after(&text, end, "n_rows");
        let n_cols = number_after(&text, end, "n_cols");
        out.push((name, n_rows, n_cols));
        pos = end;
    }
    assert!(out.len() >= 3, "manifest lists {} cases", out.len());
    out
}

/// llama.cpp's RMSE for `variant` in the manifest's `rmse.<section>` block.
fn reference_rmse(section: &str, variant: &str) -> f64 {
    let text = manifest();
    let at = text
        .find(&format!("\"{section}\": {{"))
        .unwrap_or_else(|| panic!("manifest: no rmse section {section}"));
    number_after(&text, at, variant)
}

fn to_bytes(blocks: &[BlockIq2Xxs]) -> &[u8] {
    bytemuck::cast_slice(blocks)
}

fn zeroed(n: usize) -> Vec<BlockIq2Xxs> {
    vec![bytemuck::Zeroable::zeroed(); n]
}

/// Asserts block-by-block equality, naming how many blocks differ and the first one.
fn assert_same_blocks(got: &[BlockIq2Xxs], want_bytes: &[u8], what: &str) {
    let got_bytes = to_bytes(got);
    assert_eq!(got_bytes.len(), want_bytes.len(), "{what}: byte count");
    let differ: Vec<usize> = got_bytes
        .chunks(66)
        .zip(want_bytes.chunks(66))
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: {} of {} blocks differ from llama.cpp (first: block {})",
        differ.len(),
        got.len(),
        differ[0]
    );
}

// ---------------------------------------------------------------------------------------
// Byte-identity with llama.cpp.

#[test]
fn random_importance_matches_llama_cpp() {
    for (case, _, n_cols) in cases() {
        let x = f32s(&fixture(&format!("{case}.x.bin")));
        let imp = f32s(&fixture(&format!("{case}.imp.bin")));
        assert_eq!(imp.len(), n_cols);
        let mut got = zeroed(x.len() / QK_K);
        quantize(&x, Some(&imp), &mut got);
        assert_same_blocks(
            &got,
            &fixture(&format!("{case}.iq2_xxs.imp.bin")),
            &format!("{case}.iq2_xxs.imp"),
        );
        // quantize_rows with an explicit vector is the same computation.
        let mut rows = zeroed(x.len() / QK_K);
        quantize_rows(&x, n_cols, Some(&imp), &mut rows);
        assert_eq!(got, rows, "{case}: quantize_rows(Some) vs quantize");
    }
}

#[test]
fn column_energy_matches_ds4_rule_and_llama_cpp() {
    for (case, _, n_cols) in cases() {
        let x = f32s(&fixture(&format!("{case}.x.bin")));
        let want_energy = fixture(&format!("{case}.colimp.bin"));
        let energy = column_energy(&x, n_cols);
        assert_eq!(
            bytemuck::cast_slice::<f32, u8>(&energy),
            &want_energy[..],
            "{case}: column energy"
        );
        let mut got = zeroed(x.len() / QK_K);
        quantize_rows(&x, n_cols, None, &mut got);
        assert_same_blocks(
            &got,
            &fixture(&format!("{case}.iq2_xxs.colimp.bin")),
            &format!("{case}.iq2_xxs.colimp"),
        );
    }
}

#[test]
fn no_importance_matches_llama_cpp_with_squares() {
    for (case, _, _) in cases() {
        let x = f32s(&fixture(&format!("{case}.x.bin")));
        let mut got = zeroed(x.len() / QK_K);
        quantize(&x, None, &mut got);
        assert_same_blocks(
            &got,
            &fixture(&format!("{case}.iq2_xxs.sq.bin")),
            &format!("{case}.iq2_xxs.sq"),
        );
    }
}

#[test]
#[should_panic(expected = "does not fit")]
fn importance_of_wrong_length_is_rejected() {
    let x = vec![0.5f32; 2 * QK_K];
    let imp = vec![1.0f32; 3 * QK_K];
    let mut out = zeroed(2);
    quantize(&x, Some(&imp), &mut out);
}

// ---------------------------------------------------------------------------------------
// Quality: RMSE of dequantize(quantize(x)) against llama.cpp's.

fn rmse(x: &[f32], blocks: &[BlockIq2Xxs]) -> f64 {
    let mut y = vec![0.0f32; x.len()];
    iq2_xxs::dequantize(blocks, &mut y);
    let s: f64 = x
        .iter()
        .zip(&y)
        .map(|(&a, &b)| {
            let d = f64::from(b) - f64::from(a);
            d * d
        })
        .sum();
    (s / x.len() as f64).sqrt()
}

/// Asserts our RMSE is within 0.1% of llama.cpp's (it is equal when the bytes are).
fn assert_rmse_close(ours: f64, theirs: f64, what: &str) {
    let rel = (ours - theirs).abs() / theirs;
    assert!(
        rel <= 1e-3,
        "{what}: RMSE ours {ours:.9e} vs llama.cpp {theirs:.9e} (relative {rel:.2e})"
    );
}

#[test]
fn rmse_equals_llama_cpp_on_committed_gaussian_row() {
    let x = f32s(&fixture("gauss_4x4096.x.bin"));
    let imp = f32s(&fixture("gauss_4x4096.imp.bin"));
    let row = &x[..4096];
    let mut q = zeroed(16);
    quantize(row, Some(&imp), &mut q);
    assert_rmse_close(
        rmse(row, &q),
        reference_rmse("gauss_4x4096_row0", "iq2_xxs.imp"),
        "imp",
    );
    quantize(row, None, &mut q);
    assert_rmse_close(
        rmse(row, &q),
        reference_rmse("gauss_4x4096_row0", "iq2_xxs.sq"),
        "sq",
    );
    quantize(row, Some(&[1.0; 4096]), &mut q);
    assert_rmse_close(
        rmse(row, &q),
        reference_rmse("gauss_4x4096_row0", "iq2_xxs.ones"),
        "ones",
    );
}

/// The harness's input generator (README "Inputs"): splitmix64, 53-bit uniforms,
/// Box-Muller with the cosine branch.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    fn gauss(&mut self) -> f64 {
        let u1 = self.uniform();
        let u2 = self.uniform();
        (-2.0 * (1.0 - u1).ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn importance(&mut self) -> f32 {
        (0.1 + 1.9 * self.uniform()) as f32
    }
}

/// The 64 x 4096 N(0, 1) matrix and random importance of the manifest's `rmse.gaussian`.
fn rmse_gaussian_inputs() -> (Vec<f32>, Vec<f32>, usize) {
    let text = manifest();
    let seed: u64 = number_after(&text, 0, "seed_rmse");
    let n_rows: usize = number_after(&text, 0, "gaussian_n_rows");
    let n_cols: usize = number_after(&text, 0, "gaussian_n_cols");
    let mut g = Generator(seed);
    let x: Vec<f32> = (0..n_rows * n_cols).map(|_| g.gauss() as f32).collect();
    let imp: Vec<f32> = (0..n_cols).map(|_| g.importance()).collect();
    (x, imp, n_cols)
}

/// Each row on its own, as the harness measures (one shared importance vector per column).
fn rmse_per_row(x: &[f32], n_cols: usize, imp: Option<&[f32]>) -> f64 {
    let mut q = zeroed(x.len() / QK_K);
    for (row, out) in x.chunks(n_cols).zip(q.chunks_mut(n_cols / QK_K)) {
        quantize(row, imp, out);
    }
    rmse(x, &q)
}

#[test]
#[ignore = "slow"]
fn rmse_matches_llama_cpp_on_large_gaussian() {
    let (x, imp, n_cols) = rmse_gaussian_inputs();
    let energy = column_energy(&x, n_cols);
    let ones = vec![1.0f32; n_cols];
    for (variant, w) in [
        ("iq2_xxs.imp", Some(&imp[..])),
        ("iq2_xxs.colimp", Some(&energy[..])),
        ("iq2_xxs.sq", None),
        ("iq2_xxs.ones", Some(&ones[..])),
    ] {
        let ours = rmse_per_row(&x, n_cols, w);
        let theirs = reference_rmse("gaussian", variant);
        println!("{variant}: RMSE ours {ours:.9e}, llama.cpp {theirs:.9e}");
        assert_rmse_close(ours, theirs, variant);
    }
}

#[test]
#[ignore = "slow"]
fn quantizer_throughput() {
    let (x, imp, _) = rmse_gaussian_inputs();
    let mut q = zeroed(x.len() / QK_K);
    // The first call builds the lattice tables (unless another test in this process did).
    let first = std::time::Instant::now();
    quantize(&x[..QK_K], Some(&imp[..QK_K]), &mut q[..1]);
    println!(
        "first one-block call (lattice build): {:.1} ms",
        first.elapsed().as_secs_f64() * 1e3
    );
    let start = std::time::Instant::now();
    let mut reps = 0;
    while start.elapsed().as_secs_f64() < 2.0 {
        quantize(&x, Some(&imp), &mut q);
        reps += 1;
    }
    let per = start.elapsed().as_secs_f64() / f64::from(reps);
    let mb_s = (x.len() * 4) as f64 / per / 1e6;
    println!(
        "iq2_xxs_quantize::quantize: {mb_s:.2} MB/s of f32 input ({:.1} ms per {} values)",
        per * 1e3,
        x.len()
    );
    assert!(mb_s > 0.0);
}
