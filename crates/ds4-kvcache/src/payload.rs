//! The state payload as a list of named byte sections.
//!
//! The store deliberately knows nothing about what a session's state *means*: a producer
//! hands it named byte slices ([`Payload::sections`]) and a consumer rebuilds itself from
//! the sections read back ([`FromSections`]). Wiring a new state type in is one impl of each
//! trait; `session.rs` does it for `ds4_model::SessionState`.
//!
//! Section names are 1 to [`MAX_SECTION_NAME`] bytes of UTF-8 without NUL; `text` and
//! `tokens` are reserved for the key text and the token ids, which the store writes itself.

use std::borrow::Cow;

use crate::error::{Error, Result};

/// Longest section name, in bytes (the width of the name field in the section table).
pub const MAX_SECTION_NAME: usize = 24;

/// Names the store writes itself; payloads may not use them.
pub const RESERVED_SECTION_NAMES: [&str; 2] = ["text", "tokens"];

/// One named byte slice of a payload.
#[derive(Debug, Clone)]
pub struct Section<'a> {
    /// Section name (see the module doc for the rules).
    pub name: Cow<'a, str>,
    /// The bytes, stored verbatim (borrowed from the state, or owned for small derived
    /// sections such as a layout table).
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> Section<'a> {
    /// A section borrowing its name and bytes.
    pub fn new(name: impl Into<Cow<'a, str>>, bytes: impl Into<Cow<'a, [u8]>>) -> Section<'a> {
        Section {
            name: name.into(),
            bytes: bytes.into(),
        }
    }
}

/// Something that can be stored as the payload of a cache entry.
pub trait Payload {
    /// The sections, in the order they are written. Names must be unique.
    fn sections(&self) -> Vec<Section<'_>>;
}

/// A section read back from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSection {
    /// Section name.
    pub name: String,
    /// The bytes (their CRC-32 has been verified).
    pub bytes: Vec<u8>,
}

/// Owned sections: the simplest [`Payload`], and what a load returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sections(pub Vec<OwnedSection>);

impl Sections {
    /// Appends a section.
    pub fn push(&mut self, name: impl Into<String>, bytes: Vec<u8>) {
        self.0.push(OwnedSection {
            name: name.into(),
            bytes,
        });
    }

    /// The bytes of the section called `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.bytes.as_slice())
    }

    /// Removes and returns the section called `name`.
    pub fn take(&mut self, name: &str) -> Option<Vec<u8>> {
        let idx = self.0.iter().position(|s| s.name == name)?;
        Some(self.0.remove(idx).bytes)
    }

    /// Total payload bytes.
    pub fn n_bytes(&self) -> u64 {
        self.0.iter().map(|s| s.bytes.len() as u64).sum()
    }
}

impl Payload for Sections {
    fn sections(&self) -> Vec<Section<'_>> {
        self.0
            .iter()
            .map(|s| Section::new(s.name.as_str(), s.bytes.as_slice()))
            .collect()
    }
}

/// Two payloads stored side by side (e.g. the session state plus a protocol layer's
/// tool-id map); their section names must not collide.
impl<A: Payload, B: Payload> Payload for (A, B) {
    fn sections(&self) -> Vec<Section<'_>> {
        let mut v = self.0.sections();
        v.extend(self.1.sections());
        v
    }
}

impl<P: Payload + ?Sized> Payload for &P {
    fn sections(&self) -> Vec<Section<'_>> {
        (**self).sections()
    }
}

/// A state that can be rebuilt from the sections of a loaded entry.
pub trait FromSections: Sized {
    /// Rebuilds the state from the entry's token ids and payload sections, taking the
    /// sections it uses out of `sections`; the rest reach the caller as
    /// [`crate::store::Loaded::extra`].
    fn from_sections(tokens: &[u32], sections: &mut Sections) -> Result<Self>;
}

/// Takes every section.
impl FromSections for Sections {
    fn from_sections(_tokens: &[u32], sections: &mut Sections) -> Result<Self> {
        Ok(std::mem::take(sections))
    }
}

/// Checks a section name against the rules of the module doc.
pub fn check_section_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_SECTION_NAME || name.contains('\0') {
        return Err(Error::Invalid {
            reason: format!("section name {name:?} must be 1..={MAX_SECTION_NAME} bytes, no NUL"),
        });
    }
    Ok(())
}
