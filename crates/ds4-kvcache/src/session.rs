//! `ds4_model::SessionState` as a cache payload.
//!
//! Sections (f32 and u32 little-endian, the in-memory layout of the state, so saving
//! borrows and loading costs one copy per section):
//!
//! | name | content |
//! |---|---|
//! | `layout` | `u32 n_layer`, then per layer `attn_ratio, attn_width, index_ratio, index_width` (0 = no compressor) |
//! | `logits` | `f32[n_vocab]` next-token logits (may be empty) |
//! | `L<il>.raw` | the raw sliding-window ring, as the session keeps it |
//! | `L<il>.comp` | compressed attention rows |
//! | `L<il>.akv`, `L<il>.ascore` | attention compressor frontier (layers with one) |
//! | `L<il>.index` | indexer rows |
//! | `L<il>.ikv`, `L<il>.iscore` | indexer compressor frontier (layers with one) |
//!
//! The tokens are not a payload section: the store keeps them in its own `tokens` section.
//! Only shapes are checked here; that the state fits the running model's config is the
//! caller's check (the model identity in the header guards it first).

use ds4_model::SessionState;
use ds4_model::state::{CompressorState, LayerState};

use crate::error::{Error, Result};
use crate::payload::{FromSections, Payload, Section, Sections};

fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

fn layer_name(il: usize, what: &str) -> String {
    format!("L{il:02}.{what}")
}

fn payload_err(reason: impl Into<String>) -> Error {
    Error::Payload {
        reason: reason.into(),
    }
}

/// ds4's `coff`: ratio-4 compressors keep two overlapping lanes.
fn coff(ratio: usize) -> usize {
    if ratio == 4 { 2 } else { 1 }
}

impl Payload for SessionState {
    fn sections(&self) -> Vec<Section<'_>> {
        let mut layout = vec![self.layers.len() as u32];
        for l in &self.layers {
            for c in [&l.attn_compressor, &l.indexer_compressor] {
                match c {
                    Some(c) => layout.extend([c.ratio as u32, c.width as u32]),
                    None => layout.extend([0, 0]),
                }
            }
        }
        let layout: Vec<u8> = layout.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut out = vec![
            Section::new("layout", layout),
            Section::new("logits", f32_bytes(&self.logits)),
        ];
        for (il, l) in self.layers.iter().enumerate() {
            out.push(Section::new(layer_name(il, "raw"), f32_bytes(&l.raw)));
            out.push(Section::new(
                layer_name(il, "comp"),
                f32_bytes(&l.comp_rows),
            ));
            if let Some(c) = &l.attn_compressor {
                out.push(Section::new(layer_name(il, "akv"), f32_bytes(&c.state_kv)));
                out.push(Section::new(
                    layer_name(il, "ascore"),
                    f32_bytes(&c.state_score),
                ));
            }
            out.push(Section::new(
                layer_name(il, "index"),
                f32_bytes(&l.index_rows),
            ));
            if let Some(c) = &l.indexer_compressor {
                out.push(Section::new(layer_name(il, "ikv"), f32_bytes(&c.state_kv)));
                out.push(Section::new(
                    layer_name(il, "iscore"),
                    f32_bytes(&c.state_score),
                ));
            }
        }
        out
    }
}

fn take_f32(sections: &mut Sections, name: &str) -> Result<Vec<f32>> {
    let bytes = sections
        .take(name)
        .ok_or_else(|| payload_err(format!("missing section {name}")))?;
    if bytes.len() % 4 != 0 {
        return Err(payload_err(format!(
            "section {name}: {} bytes",
            bytes.len()
        )));
    }
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}

fn take_compressor(
    sections: &mut Sections,
    il: usize,
    kv: &str,
    score: &str,
    ratio: usize,
    width: usize,
) -> Result<Option<CompressorState>> {
    if ratio == 0 {
        return Ok(None);
    }
    let n = coff(ratio) * ratio * coff(ratio) * width;
    let state_kv = take_f32(sections, &layer_name(il, kv))?;
    let state_score = take_f32(sections, &layer_name(il, score))?;
    if state_kv.len() != n || state_score.len() != n {
        return Err(payload_err(format!(
            "layer {il}: compressor frontier of {} / {} floats, expected {n}",
            state_kv.len(),
            state_score.len()
        )));
    }
    Ok(Some(CompressorState {
        ratio,
        width,
        state_kv,
        state_score,
    }))
}

impl FromSections for SessionState {
    fn from_sections(tokens: &[u32], sections: &mut Sections) -> Result<Self> {
        let layout = sections
            .take("layout")
            .ok_or_else(|| payload_err("missing section layout"))?;
        let layout: Vec<u32> = layout
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let n_layer = *layout.first().ok_or_else(|| payload_err("empty layout"))? as usize;
        if layout.len() != 1 + 4 * n_layer {
            return Err(payload_err("layout length does not match its layer count"));
        }
        let logits = take_f32(sections, "logits")?;
        let mut layers = Vec::with_capacity(n_layer);
        for il in 0..n_layer {
            let f = &layout[1 + 4 * il..5 + 4 * il];
            let (ar, aw, ir, iw) = (f[0] as usize, f[1] as usize, f[2] as usize, f[3] as usize);
            let raw = take_f32(sections, &layer_name(il, "raw"))?;
            let comp_rows = take_f32(sections, &layer_name(il, "comp"))?;
            let attn_compressor = take_compressor(sections, il, "akv", "ascore", ar, aw)?;
            let index_rows = take_f32(sections, &layer_name(il, "index"))?;
            let indexer_compressor = take_compressor(sections, il, "ikv", "iscore", ir, iw)?;
            if (aw != 0 && comp_rows.len() % aw != 0) || (iw != 0 && index_rows.len() % iw != 0) {
                return Err(payload_err(format!("layer {il}: partial compressed rows")));
            }
            layers.push(LayerState {
                raw,
                comp_rows,
                attn_compressor,
                index_rows,
                indexer_compressor,
            });
        }
        Ok(SessionState {
            tokens: tokens.to_vec(),
            layers,
            logits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SessionState {
        let ratios = [0usize, 0, 4, 128, 4];
        let (window, d, di) = (8, 16, 4);
        let layers = ratios
            .iter()
            .enumerate()
            .map(|(il, &r)| {
                let mut l = LayerState::new(r, window, d, di);
                for (k, v) in l.raw.iter_mut().enumerate() {
                    *v = (il * 1000 + k) as f32 * 0.5;
                }
                if r > 0 {
                    l.comp_rows = (0..3 * d).map(|k| k as f32 - 7.0).collect();
                }
                if r == 4 {
                    l.index_rows = (0..2 * di).map(|k| -(k as f32)).collect();
                }
                l
            })
            .collect();
        SessionState {
            tokens: vec![5, 6, 7],
            layers,
            logits: vec![1.0, f32::NEG_INFINITY, f32::NAN, -0.0],
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn session_state_round_trips_bit_exactly() {
        let s = state();
        let mut owned = Sections::default();
        for sec in s.sections() {
            owned.push(sec.name.into_owned(), sec.bytes.into_owned());
        }
        let back = SessionState::from_sections(&s.tokens, &mut owned).expect("rebuild");
        assert!(owned.0.is_empty(), "every section used");
        assert_eq!(back.tokens, s.tokens);
        assert_eq!(bits(&back.logits), bits(&s.logits));
        assert_eq!(back.layers.len(), s.layers.len());
        for (a, b) in back.layers.iter().zip(&s.layers) {
            assert_eq!(bits(&a.raw), bits(&b.raw));
            assert_eq!(bits(&a.comp_rows), bits(&b.comp_rows));
            assert_eq!(bits(&a.index_rows), bits(&b.index_rows));
            for (ca, cb) in [
                (&a.attn_compressor, &b.attn_compressor),
                (&a.indexer_compressor, &b.indexer_compressor),
            ] {
                match (ca, cb) {
                    (Some(x), Some(y)) => {
                        assert_eq!((x.ratio, x.width), (y.ratio, y.width));
                        assert_eq!(bits(&x.state_kv), bits(&y.state_kv));
                        assert_eq!(bits(&x.state_score), bits(&y.state_score));
                    }
                    (None, None) => {}
                    _ => panic!("compressor presence differs"),
                }
            }
        }
    }

    #[test]
    fn missing_sections_are_errors_and_extra_ones_are_left() {
        let s = state();
        let mut owned = Sections::default();
        for sec in s.sections() {
            owned.push(sec.name.into_owned(), sec.bytes.into_owned());
        }
        let mut missing = owned.clone();
        missing.take("L02.akv");
        assert!(matches!(
            SessionState::from_sections(&[1], &mut missing),
            Err(Error::Payload { .. })
        ));
        let mut extra = owned;
        extra.push("ktm", vec![0; 4]);
        SessionState::from_sections(&[1], &mut extra).expect("rebuild");
        assert_eq!(extra.0.len(), 1);
        assert_eq!(extra.get("ktm"), Some(&[0u8; 4][..]));
    }
}
