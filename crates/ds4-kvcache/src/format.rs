//! The on-disk format of one cache entry (`<sha1>.rkv`), version 1.
//!
//! Layout (all integers little-endian; docs/KVCACHE_FORMAT.md has the full tables):
//!
//! ```text
//! 0            fixed header, 80 bytes, CRC-32 of bytes 0..76 at offset 76
//! 80           section table, n_sections x 48 bytes (name, offset, length, CRC-32)
//! align 64     section data, each section at a 64-byte aligned offset, zero padding between
//! file_bytes   end of the last section = end of the file
//! ```
//!
//! The first two sections are always `text` (the rendered prompt prefix the key hashes) and
//! `tokens` (`u32` ids); the payload's sections follow. Every byte of a file is checked on
//! load: the header and the table by their CRCs, each section by its own CRC, padding must be
//! zero and the file must end exactly at `file_bytes`. This is deliberately not ds4's `KVC`
//! format: that one has no checksum and no model identity (KVCACHE.md s11), and a ds4-rs
//! reader of ds4 files can be added beside this one without touching it.
//!
//! The reader never allocates more than the file it was given holds, and never panics on
//! arbitrary bytes (property test in this module).

use std::io::{Read, Seek, SeekFrom, Write};

use crate::error::{Error, Result};
use crate::payload::{
    MAX_SECTION_NAME, OwnedSection, RESERVED_SECTION_NAMES, Section, Sections, check_section_name,
};

#[cfg(target_endian = "big")]
compile_error!("the kv cache format stores f32/u32 sections in native order: little-endian only");

/// The 8 magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"DS4RSKV\0";
/// Format version written and read by this build.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 80;
/// Size of one section table entry.
pub const TABLE_ENTRY_BYTES: usize = 48;
/// Alignment of section data offsets (lets a future reader map f32 sections in place).
pub const SECTION_ALIGN: u64 = 64;
/// Upper bound on the section count, so a corrupt count cannot ask for a huge table.
pub const MAX_SECTIONS: u32 = 1 << 16;

/// Why an entry was written (the codes are ds4's `ds4_kvstore_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SaveReason {
    /// Not recorded.
    Unknown = 0,
    /// First prefill of a prompt with no cache hit.
    Cold = 1,
    /// Periodic frontier during a long prefill or generation.
    Continued = 2,
    /// The live session is about to be replaced by another conversation.
    Evict = 3,
    /// Clean shutdown.
    Shutdown = 4,
}

impl SaveReason {
    /// The reason for a stored code (unknown codes read as [`SaveReason::Unknown`]).
    pub fn from_code(code: u8) -> SaveReason {
        match code {
            1 => SaveReason::Cold,
            2 => SaveReason::Continued,
            3 => SaveReason::Evict,
            4 => SaveReason::Shutdown,
            _ => SaveReason::Unknown,
        }
    }

    /// Whether this is an explicit checkpoint (cold, evict, shutdown) rather than a frontier.
    pub fn is_checkpoint(self) -> bool {
        matches!(
            self,
            SaveReason::Cold | SaveReason::Evict | SaveReason::Shutdown
        )
    }
}

/// Which model wrote an entry. Both ids are opaque hashes computed by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ModelIdentity {
    /// Hash of everything that decides the state layout and meaning (architecture, shape
    /// metadata, tokenizer). A file with another shape id is never loaded.
    pub shape_id: u64,
    /// Hash of the weight types (quantization). Files with another weights id are loaded
    /// only when the policy allows cross-quant reuse, as ds4 does by default.
    pub weights_id: u64,
}

impl ModelIdentity {
    /// An identity from the caller's canonical bytes: `shape` (architecture metadata and
    /// dimensions, tokenizer) and `weights` (tensor names and types). Each id is the first
    /// 8 bytes of the SHA-1 of its bytes, little-endian.
    pub fn from_bytes(shape: &[u8], weights: &[u8]) -> ModelIdentity {
        use sha1::{Digest, Sha1};
        let id = |b: &[u8]| {
            let d = Sha1::digest(b);
            let mut a = [0u8; 8];
            a.copy_from_slice(&d[..8]);
            u64::from_le_bytes(a)
        };
        ModelIdentity {
            shape_id: id(shape),
            weights_id: id(weights),
        }
    }
}

/// The decoded fixed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Model that wrote the file.
    pub identity: ModelIdentity,
    /// Unix seconds at creation.
    pub created_at: u64,
    /// Total file size.
    pub file_bytes: u64,
    /// Number of token ids in the `tokens` section.
    pub n_tokens: u32,
    /// Context size of the session that wrote it.
    pub ctx_size: u32,
    /// Number of section table entries.
    pub n_sections: u32,
    /// Why it was written.
    pub reason: SaveReason,
    /// CRC-32 of the section table.
    pub table_crc: u32,
}

/// One entry of the section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    /// Section name.
    pub name: String,
    /// Offset of the data from the start of the file.
    pub offset: u64,
    /// Length of the data.
    pub len: u64,
    /// CRC-32 of the data.
    pub crc: u32,
}

/// What the writer needs besides the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryMeta {
    /// Model that writes the file.
    pub identity: ModelIdentity,
    /// Unix seconds.
    pub created_at: u64,
    /// Context size of the session.
    pub ctx_size: u32,
    /// Why it is written.
    pub reason: SaveReason,
}

/// A fully read and verified entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// The header.
    pub header: Header,
    /// The key text.
    pub text: Vec<u8>,
    /// The token ids.
    pub tokens: Vec<u32>,
    /// The payload sections, in file order.
    pub sections: Sections,
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn corrupt(reason: impl Into<String>) -> Error {
    Error::Corrupt {
        reason: reason.into(),
    }
}

// ===== Layout ====================================================================================
// Offsets depend only on names and lengths, so the file size is known before any byte is
// hashed or written (the store reserves budget with it).

/// Offsets of every section and the total file size for sections of the given lengths.
pub fn layout(lens: &[u64]) -> Result<(Vec<u64>, u64)> {
    if lens.len() > MAX_SECTIONS as usize {
        return Err(Error::Invalid {
            reason: format!("{} sections (max {MAX_SECTIONS})", lens.len()),
        });
    }
    let mut pos = align_up((HEADER_BYTES + TABLE_ENTRY_BYTES * lens.len()) as u64);
    let mut offsets = Vec::with_capacity(lens.len());
    let mut end = pos;
    for &len in lens {
        offsets.push(pos);
        end = pos.checked_add(len).ok_or_else(|| Error::Invalid {
            reason: "section sizes overflow u64".into(),
        })?;
        pos = align_up(end);
    }
    Ok((offsets, end))
}

/// The size of the file an entry with this text, token count and payload would have.
pub fn file_bytes_for(text_len: usize, n_tokens: usize, payload: &[Section<'_>]) -> Result<u64> {
    let mut lens = vec![text_len as u64, 4 * n_tokens as u64];
    lens.extend(payload.iter().map(|s| s.bytes.len() as u64));
    Ok(layout(&lens)?.1)
}

// ===== Writing ===================================================================================

fn encode_header(h: &Header) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.identity.shape_id.to_le_bytes());
    b[24..32].copy_from_slice(&h.identity.weights_id.to_le_bytes());
    b[32..40].copy_from_slice(&h.created_at.to_le_bytes());
    b[40..48].copy_from_slice(&h.file_bytes.to_le_bytes());
    b[48..52].copy_from_slice(&h.n_tokens.to_le_bytes());
    b[52..56].copy_from_slice(&h.ctx_size.to_le_bytes());
    b[56..60].copy_from_slice(&h.n_sections.to_le_bytes());
    b[60] = h.reason as u8;
    b[64..68].copy_from_slice(&h.table_crc.to_le_bytes());
    let crc = crc32(&b[..76]);
    b[76..80].copy_from_slice(&crc.to_le_bytes());
    b
}

fn encode_table(table: &[TableEntry]) -> Vec<u8> {
    let mut out = vec![0u8; table.len() * TABLE_ENTRY_BYTES];
    for (e, b) in table.iter().zip(out.chunks_exact_mut(TABLE_ENTRY_BYTES)) {
        b[..e.name.len()].copy_from_slice(e.name.as_bytes());
        b[24..32].copy_from_slice(&e.offset.to_le_bytes());
        b[32..40].copy_from_slice(&e.len.to_le_bytes());
        b[40..44].copy_from_slice(&e.crc.to_le_bytes());
    }
    out
}

/// Writes one entry to `w` (positioned at its start) and returns the file size.
///
/// The data is written in one pass and hashed while it is still in cache; the header and
/// table, which hold the CRCs, are written last by seeking back. A crash in between leaves
/// a file whose header CRC fails, and the store only ever writes into a temp file anyway.
pub fn write_entry<W: Write + Seek>(
    w: &mut W,
    meta: &EntryMeta,
    text: &[u8],
    tokens: &[u32],
    payload: &[Section<'_>],
) -> Result<u64> {
    if tokens.is_empty() {
        return Err(Error::Invalid {
            reason: "an entry needs at least one token".into(),
        });
    }
    let n_tokens = u32::try_from(tokens.len()).map_err(|_| Error::Invalid {
        reason: "more than u32::MAX tokens".into(),
    })?;
    let mut names: Vec<&str> = Vec::with_capacity(payload.len() + 2);
    names.extend(RESERVED_SECTION_NAMES);
    for s in payload {
        check_section_name(&s.name)?;
        if names.contains(&s.name.as_ref()) {
            return Err(Error::Invalid {
                reason: format!("duplicate or reserved section name {:?}", s.name),
            });
        }
        names.push(&s.name);
    }
    let token_bytes: &[u8] = bytemuck::cast_slice(tokens);
    let mut datas: Vec<&[u8]> = vec![text, token_bytes];
    datas.extend(payload.iter().map(|s| s.bytes.as_ref()));
    let lens: Vec<u64> = datas.iter().map(|d| d.len() as u64).collect();
    let (offsets, file_bytes) = layout(&lens)?;

    let start = w.stream_position()?;
    let data_start = offsets[0];
    // Placeholder header and table: zeros fail the magic check if we never come back.
    w.write_all(&vec![0u8; data_start as usize])?;
    let mut pos = data_start;
    let mut table = Vec::with_capacity(datas.len());
    const CHUNK: usize = 4 << 20;
    let zeros = [0u8; SECTION_ALIGN as usize];
    for ((name, data), &offset) in names.iter().zip(&datas).zip(&offsets) {
        let pad = (offset - pos) as usize;
        w.write_all(&zeros[..pad])?;
        let mut hasher = crc32fast::Hasher::new();
        for chunk in data.chunks(CHUNK) {
            hasher.update(chunk);
            w.write_all(chunk)?;
        }
        pos = offset + data.len() as u64;
        table.push(TableEntry {
            name: (*name).to_string(),
            offset,
            len: data.len() as u64,
            crc: hasher.finalize(),
        });
    }
    debug_assert_eq!(pos, file_bytes);
    let table_bytes = encode_table(&table);
    let header = Header {
        identity: meta.identity,
        created_at: meta.created_at,
        file_bytes,
        n_tokens,
        ctx_size: meta.ctx_size,
        n_sections: table.len() as u32,
        reason: meta.reason,
        table_crc: crc32(&table_bytes),
    };
    w.seek(SeekFrom::Start(start))?;
    w.write_all(&encode_header(&header))?;
    w.write_all(&table_bytes)?;
    w.seek(SeekFrom::Start(start + file_bytes))?;
    Ok(file_bytes)
}

/// Encodes one entry into memory (tests, and small entries).
pub fn encode(
    meta: &EntryMeta,
    text: &[u8],
    tokens: &[u32],
    payload: &[Section<'_>],
) -> Result<Vec<u8>> {
    let mut cur = std::io::Cursor::new(Vec::new());
    write_entry(&mut cur, meta, text, tokens, payload)?;
    Ok(cur.into_inner())
}

// ===== Reading ===================================================================================

/// Decodes and checks the fixed header (`b` must hold at least [`HEADER_BYTES`]).
pub fn parse_header(b: &[u8]) -> Result<Header> {
    if b.len() < HEADER_BYTES {
        if b.len() < 8 || b[..8] == MAGIC {
            return Err(Error::Truncated {
                what: "header",
                needed: HEADER_BYTES as u64,
                available: b.len() as u64,
            });
        }
        return Err(Error::BadMagic);
    }
    if b[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = le_u32(b, 8);
    if version != VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            expected: VERSION,
        });
    }
    let stored = le_u32(b, 76);
    let computed = crc32(&b[..76]);
    if stored != computed {
        return Err(Error::Checksum {
            what: "header".into(),
            stored,
            computed,
        });
    }
    let header_bytes = le_u32(b, 12);
    if header_bytes as usize != HEADER_BYTES {
        return Err(corrupt(format!("header size {header_bytes}")));
    }
    let h = Header {
        identity: ModelIdentity {
            shape_id: le_u64(b, 16),
            weights_id: le_u64(b, 24),
        },
        created_at: le_u64(b, 32),
        file_bytes: le_u64(b, 40),
        n_tokens: le_u32(b, 48),
        ctx_size: le_u32(b, 52),
        n_sections: le_u32(b, 56),
        reason: SaveReason::from_code(b[60]),
        table_crc: le_u32(b, 64),
    };
    if h.n_tokens == 0 {
        return Err(corrupt("zero tokens"));
    }
    if h.n_sections < 2 || h.n_sections > MAX_SECTIONS {
        return Err(corrupt(format!("{} sections", h.n_sections)));
    }
    Ok(h)
}

/// Size of the section table announced by `h`.
pub fn table_bytes(h: &Header) -> usize {
    h.n_sections as usize * TABLE_ENTRY_BYTES
}

/// Decodes and checks the section table of `h` (`b` must be exactly its bytes).
pub fn parse_table(h: &Header, b: &[u8]) -> Result<Vec<TableEntry>> {
    if b.len() != table_bytes(h) {
        return Err(Error::Truncated {
            what: "section table",
            needed: (HEADER_BYTES + table_bytes(h)) as u64,
            available: (HEADER_BYTES + b.len()) as u64,
        });
    }
    let computed = crc32(b);
    if computed != h.table_crc {
        return Err(Error::Checksum {
            what: "section table".into(),
            stored: h.table_crc,
            computed,
        });
    }
    let mut table: Vec<TableEntry> = Vec::with_capacity(h.n_sections as usize);
    let mut min_offset = align_up(HEADER_BYTES as u64 + b.len() as u64);
    for (idx, e) in b.chunks_exact(TABLE_ENTRY_BYTES).enumerate() {
        let raw_name = &e[..MAX_SECTION_NAME];
        let name_len = raw_name
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(MAX_SECTION_NAME);
        if raw_name[name_len..].iter().any(|&c| c != 0) {
            return Err(corrupt(format!(
                "section {idx}: bytes after the name's NUL"
            )));
        }
        let name = std::str::from_utf8(&raw_name[..name_len])
            .map_err(|_| corrupt(format!("section {idx}: name is not UTF-8")))?;
        check_section_name(name).map_err(|_| corrupt(format!("section {idx}: bad name")))?;
        if table.iter().any(|t| t.name == name) {
            return Err(corrupt(format!("duplicate section {name:?}")));
        }
        let expected_name = RESERVED_SECTION_NAMES.get(idx).copied();
        let reserved = RESERVED_SECTION_NAMES.contains(&name);
        if expected_name.is_some_and(|n| n != name) || (expected_name.is_none() && reserved) {
            return Err(corrupt(format!("section {idx} is named {name:?}")));
        }
        let offset = le_u64(e, 24);
        let len = le_u64(e, 32);
        let crc = le_u32(e, 40);
        if le_u32(e, 44) != 0 {
            return Err(corrupt(format!("section {name:?}: reserved field set")));
        }
        if !offset.is_multiple_of(SECTION_ALIGN) || offset < min_offset {
            return Err(corrupt(format!("section {name:?}: bad offset {offset}")));
        }
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= h.file_bytes)
            .ok_or_else(|| corrupt(format!("section {name:?} extends past the end of file")))?;
        min_offset = align_up(end);
        table.push(TableEntry {
            name: name.to_string(),
            offset,
            len,
            crc,
        });
    }
    let last_end = table.last().map_or(0, |t| t.offset + t.len);
    if last_end != h.file_bytes {
        return Err(corrupt(format!(
            "sections end at {last_end}, header says the file ends at {}",
            h.file_bytes
        )));
    }
    if table[1].len != 4 * u64::from(h.n_tokens) {
        return Err(corrupt(format!(
            "tokens section holds {} bytes for {} tokens",
            table[1].len, h.n_tokens
        )));
    }
    Ok(table)
}

/// Reads and checks the header and section table of a file of `file_len` bytes, leaving
/// `r` positioned after the table. This is all the index needs.
pub fn read_head<R: Read>(r: &mut R, file_len: u64) -> Result<(Header, Vec<TableEntry>)> {
    let mut hb = [0u8; HEADER_BYTES];
    let n = read_full(r, &mut hb)?;
    let header = parse_header(&hb[..n])?;
    check_file_len(&header, file_len)?;
    let tb_len = table_bytes(&header);
    if (HEADER_BYTES + tb_len) as u64 > file_len {
        return Err(Error::Truncated {
            what: "section table",
            needed: (HEADER_BYTES + tb_len) as u64,
            available: file_len,
        });
    }
    let mut tb = vec![0u8; tb_len];
    r.read_exact(&mut tb)?;
    let table = parse_table(&header, &tb)?;
    Ok((header, table))
}

fn check_file_len(h: &Header, file_len: u64) -> Result<()> {
    if file_len < h.file_bytes {
        return Err(Error::Truncated {
            what: "file",
            needed: h.file_bytes,
            available: file_len,
        });
    }
    if file_len > h.file_bytes {
        return Err(corrupt(format!(
            "{} trailing bytes after the last section",
            file_len - h.file_bytes
        )));
    }
    Ok(())
}

/// Reads until `buf` is full or EOF; returns the number of bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Reads the section data after [`read_head`], verifying padding and every CRC.
pub fn read_body<R: Read>(r: &mut R, header: Header, table: Vec<TableEntry>) -> Result<Decoded> {
    let mut pos = (HEADER_BYTES + table_bytes(&header)) as u64;
    let mut sections = Sections::default();
    let mut text = Vec::new();
    let mut tokens = Vec::new();
    const CHUNK: usize = 4 << 20;
    for (idx, e) in table.into_iter().enumerate() {
        let mut pad = [0u8; SECTION_ALIGN as usize];
        let pad = &mut pad[..(e.offset - pos) as usize];
        read_exact_or_truncated(r, pad, pos, header.file_bytes)?;
        if pad.iter().any(|&c| c != 0) {
            return Err(corrupt(format!("non-zero padding before {:?}", e.name)));
        }
        let mut data = vec![0u8; e.len as usize];
        let mut hasher = crc32fast::Hasher::new();
        for (k, chunk) in data.chunks_mut(CHUNK).enumerate() {
            read_exact_or_truncated(r, chunk, e.offset + (k * CHUNK) as u64, header.file_bytes)?;
            hasher.update(chunk);
        }
        let computed = hasher.finalize();
        if computed != e.crc {
            return Err(Error::Checksum {
                what: format!("section {:?}", e.name),
                stored: e.crc,
                computed,
            });
        }
        pos = e.offset + e.len;
        match idx {
            0 => text = data,
            1 => tokens = data.chunks_exact(4).map(|c| le_u32(c, 0)).collect(),
            _ => sections.0.push(OwnedSection {
                name: e.name,
                bytes: data,
            }),
        }
    }
    Ok(Decoded {
        header,
        text,
        tokens,
        sections,
    })
}

fn read_exact_or_truncated<R: Read>(r: &mut R, buf: &mut [u8], at: u64, file: u64) -> Result<()> {
    let n = read_full(r, buf)?;
    if n < buf.len() {
        return Err(Error::Truncated {
            what: "section data",
            needed: file,
            available: at + n as u64,
        });
    }
    Ok(())
}

/// Reads and verifies a whole entry of `file_len` bytes from `r`.
pub fn read_entry<R: Read>(r: &mut R, file_len: u64) -> Result<Decoded> {
    let (header, table) = read_head(r, file_len)?;
    read_body(r, header, table)
}

/// Decodes and verifies an entry held in memory.
pub fn decode(bytes: &[u8]) -> Result<Decoded> {
    read_entry(&mut &bytes[..], bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta() -> EntryMeta {
        EntryMeta {
            identity: ModelIdentity {
                shape_id: 0x1122_3344_5566_7788,
                weights_id: 0x99,
            },
            created_at: 1_700_000_000,
            ctx_size: 32768,
            reason: SaveReason::Cold,
        }
    }

    fn sample() -> Vec<u8> {
        let a: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let b = vec![0xabu8; 3];
        let payload = [
            Section::new("logits", a.as_slice()),
            Section::new("layer.00.raw", b.as_slice()),
        ];
        encode(
            &meta(),
            "hello <｜User｜>".as_bytes(),
            &[1, 2, 3, 129279],
            &payload,
        )
        .expect("encode")
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let d = decode(&bytes).expect("decode");
        assert_eq!(d.text, "hello <｜User｜>".as_bytes());
        assert_eq!(d.tokens, vec![1, 2, 3, 129279]);
        assert_eq!(d.header.identity, meta().identity);
        assert_eq!(d.header.reason, SaveReason::Cold);
        assert_eq!(d.header.ctx_size, 32768);
        assert_eq!(d.header.file_bytes, bytes.len() as u64);
        assert_eq!(d.sections.0.len(), 2);
        assert_eq!(d.sections.get("logits").map(<[u8]>::len), Some(1000));
        assert_eq!(
            d.sections.get("layer.00.raw"),
            Some(&[0xab, 0xab, 0xab][..])
        );
        let lens = [16, 16, 1000, 3];
        assert_eq!(layout(&lens).expect("layout").1, bytes.len() as u64);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let bytes = sample();
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&b).is_err(), "bit {bit} flip accepted");
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(
                decode(&bytes[..len]).is_err(),
                "truncation to {len} accepted"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn identity_from_bytes() {
        let a = ModelIdentity::from_bytes(b"n_layer=43", b"ffn_gate_exps=IQ2_XXS");
        let b = ModelIdentity::from_bytes(b"n_layer=43", b"ffn_gate_exps=Q4_K");
        assert_eq!(a.shape_id, b.shape_id);
        assert_ne!(a.weights_id, b.weights_id);
        // SHA-1("abc") starts a9 99 3e 36 47 06 81 6a.
        assert_eq!(
            ModelIdentity::from_bytes(b"abc", b"").shape_id,
            0x6a81_0647_363e_99a9
        );
    }

    #[test]
    fn wrong_version_and_magic() {
        let mut b = sample();
        b[8] = 2;
        assert!(matches!(
            decode(&b),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
        let mut b = sample();
        b[0] = b'X';
        assert!(matches!(decode(&b), Err(Error::BadMagic)));
    }

    #[test]
    fn bad_names_are_refused_by_the_writer() {
        let x = [0u8; 4];
        for name in ["", "text", "tokens", "a\0b", "this-name-is-longer-than-24"] {
            let r = encode(&meta(), b"t", &[1], &[Section::new(name, &x[..])]);
            assert!(r.is_err(), "{name:?} accepted");
        }
        let r = encode(&meta(), b"t", &[], &[]);
        assert!(r.is_err());
        let dup = [Section::new("a", &x[..]), Section::new("a", &x[..])];
        assert!(encode(&meta(), b"t", &[1], &dup).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parser_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn parser_never_panics_on_mutated_files(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let mut b = sample();
            for (at, v) in edits {
                let at = at % b.len();
                b[at] = v;
            }
            let cut = cut % (b.len() + 1);
            let _ = decode(&b[..cut]);
            let _ = decode(&b);
        }

        #[test]
        fn round_trip_any_payload(
            text in proptest::collection::vec(any::<u8>(), 0..100),
            tokens in proptest::collection::vec(any::<u32>(), 1..50),
            datas in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..5),
        ) {
            let names: Vec<String> = (0..datas.len()).map(|i| format!("s{i}")).collect();
            let payload: Vec<Section<'_>> =
                names.iter().zip(&datas).map(|(n, d)| Section::new(n.as_str(), d.as_slice())).collect();
            let bytes = encode(&meta(), &text, &tokens, &payload).expect("encode");
            let d = decode(&bytes).expect("decode");
            prop_assert_eq!(d.text, text);
            prop_assert_eq!(d.tokens, tokens);
            let got: Vec<Vec<u8>> = d.sections.0.into_iter().map(|s| s.bytes).collect();
            prop_assert_eq!(got, datas);
        }
    }
}
