//! The DeepSeek V4 tokenizer: byte-level BPE with DeepSeek's three-stage pre-tokenizer.
//!
//! This is an exact re-implementation of the official `tokenizer.json` (Hugging Face
//! `tokenizers` semantics), built either from GGUF metadata
//! ([`Tokenizer::from_gguf_parts`]) or from a `tokenizer.json` ([`Tokenizer::from_tokenizer_json`]).
//! PROMPT.md §1 is the specification; the conformance corpus in
//! `tests/fixtures/tokenizer/` (generated from HF `tokenizers`) is the proof.
//!
//! Encoding runs in three layers:
//!
//! 1. Added-token splitting (only when special recognition is allowed): leftmost-longest
//!    matching of the added-token literals, in HF's two passes (tokens with
//!    `normalized: false` first, then `normalized: true` ones inside the gaps).
//! 2. The pre-tokenizer: three regex splits with "Isolated" behaviour, written here as a
//!    hand scanner over Unicode general categories instead of a backtracking regex engine.
//!    The classes are checked code point by code point against Oniguruma (the engine HF
//!    runs the patterns with) in `tests/tokenizer.rs`.
//! 3. BPE over the GPT-2 byte alphabet: lowest merge rank first, leftmost on ties; a
//!    per-tokenizer cache of piece -> ids makes repeated words cheap.
//!
//! Special tokens are always looked up by their literal text, never by id.

use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, OnceLock};

use aho_corasick::{AhoCorasick, MatchKind};

/// Number of token ids of DeepSeek V4 Flash (the logits width).
pub const DS4_N_VOCAB: usize = 129280;

/// Errors building a tokenizer or decoding ids.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The `tokenizer.json` document is not what we expect.
    #[error("tokenizer.json: {0}")]
    Json(String),
    /// The vocabulary does not have the DeepSeek V4 size.
    #[error("vocabulary has {got} tokens, expected {expected}")]
    VocabSize {
        /// Number of ids found.
        got: usize,
        /// Number of ids required.
        expected: usize,
    },
    /// `token_type` and `tokens` disagree in length.
    #[error("token_type has {got} entries, tokens has {expected}")]
    TokenTypeLen {
        /// Length of the `token_type` array.
        got: usize,
        /// Length of the `tokens` array.
        expected: usize,
    },
    /// A required special token is absent.
    #[error("required tokenizer token is missing: {0}")]
    MissingToken(String),
    /// A vocabulary entry is malformed.
    #[error("token {id}: {reason}")]
    BadToken {
        /// Token id.
        id: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// A merge rule is malformed or names unknown symbols.
    #[error("merge {rank} {merge:?}: {reason}")]
    BadMerge {
        /// Rank (index) of the merge.
        rank: usize,
        /// The merge text.
        merge: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The GGUF declares a tokenizer family this implementation does not reproduce.
    #[error("unsupported tokenizer: {key} = {value:?}")]
    Unsupported {
        /// Metadata key.
        key: &'static str,
        /// Its value.
        value: String,
    },
    /// A token id outside the vocabulary was given to the decoder.
    #[error("token id {0} is out of range")]
    UnknownId(u32),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TokenizerError>;

// ===========================================================================
// GPT-2 byte alphabet (PROMPT.md §1.4).

/// Byte -> code point of the byte-level alphabet.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        let cp = if printable {
            b
        } else {
            extra += 1;
            0x100 + extra - 1
        };
        table[b as usize] = char::from_u32(cp).expect("byte-level code points are valid chars");
    }
    table
}

/// Code point of the byte-level alphabet -> byte (all alphabet code points are < 0x144).
fn char_to_byte(c: char) -> Option<u8> {
    static TABLE: OnceLock<[i16; 0x144]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [-1i16; 0x144];
        for (b, c) in byte_to_char_table().iter().enumerate() {
            t[*c as usize] = b as i16;
        }
        t
    });
    let cp = c as usize;
    if cp < table.len() && table[cp] >= 0 {
        Some(table[cp] as u8)
    } else {
        None
    }
}

/// Converts a token string in the byte-level alphabet to the bytes it stands for.
fn byte_level_to_bytes(s: &str) -> Option<Vec<u8>> {
    s.chars().map(char_to_byte).collect()
}

// ===========================================================================
// Unicode classes of the pre-tokenizer regexes (PROMPT.md §1.5).

const C_L: u8 = 1; // \p{L}
const C_M: u8 = 2; // \p{M}
const C_N: u8 = 4; // \p{N}
const C_P: u8 = 8; // \p{P}
const C_S: u8 = 16; // \p{S}
const C_WS: u8 = 32; // \s (Unicode White_Space)

fn classify(c: char) -> u8 {
    use unicode_general_category::{GeneralCategory as G, get_general_category};
    let mut k = match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => C_L,
        G::NonspacingMark | G::SpacingMark | G::EnclosingMark => C_M,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => C_N,
        G::ConnectorPunctuation
        | G::DashPunctuation
        | G::OpenPunctuation
        | G::ClosePunctuation
        | G::InitialPunctuation
        | G::FinalPunctuation
        | G::OtherPunctuation => C_P,
        G::MathSymbol | G::CurrencySymbol | G::ModifierSymbol | G::OtherSymbol => C_S,
        _ => 0,
    };
    // Oniguruma's \s is the White_Space property (not Python's isspace: U+001C..U+001F
    // are not included).
    if matches!(c, '\t'..='\r' | ' ' | '\u{85}' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}'
        | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
    {
        k |= C_WS;
    }
    k
}

/// Class bits of every BMP code point, computed once (64 KiB): the hot path is a load.
fn bmp_classes() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..0x10000u32)
            .map(|cp| char::from_u32(cp).map_or(0, classify))
            .collect()
    })
}

#[inline]
fn class_of(c: char, bmp: &[u8]) -> u8 {
    let cp = c as usize;
    if cp < bmp.len() { bmp[cp] } else { classify(c) }
}

/// The regex classes the pre-tokenizer uses for one code point, as a bit set
/// (`L`, `M`, `N`, `P`, `S`, `s`). Exposed for the conformance test.
pub fn unicode_classes(c: char) -> [bool; 6] {
    let k = class_of(c, bmp_classes());
    [
        k & C_L != 0,
        k & C_M != 0,
        k & C_N != 0,
        k & C_P != 0,
        k & C_S != 0,
        k & C_WS != 0,
    ]
}

/// Decodes the char starting at byte `i` of a valid UTF-8 string: (char, byte length).
#[inline]
fn char_at(s: &str, i: usize) -> (char, usize) {
    let b = s.as_bytes()[i];
    if b < 0x80 {
        return (b as char, 1);
    }
    let c = s[i..].chars().next().expect("index is on a char boundary");
    (c, c.len_utf8())
}

/// Stage 1: `\p{N}{1,3}`, Isolated.
fn split_digits(s: &str, bmp: &[u8], f: &mut impl FnMut(&str)) {
    let (mut i, mut gap) = (0, 0);
    while i < s.len() {
        let (c, n) = char_at(s, i);
        if class_of(c, bmp) & C_N == 0 {
            i += n;
            continue;
        }
        let start = i;
        i += n;
        let mut count = 1;
        while count < 3 && i < s.len() {
            let (c, n) = char_at(s, i);
            if class_of(c, bmp) & C_N == 0 {
                break;
            }
            i += n;
            count += 1;
        }
        if gap < start {
            f(&s[gap..start]);
        }
        f(&s[start..i]);
        gap = i;
    }
    if gap < s.len() {
        f(&s[gap..]);
    }
}

#[inline]
fn is_cjk(c: char) -> bool {
    matches!(c, '\u{4e00}'..='\u{9fa5}' | '\u{3040}'..='\u{309f}' | '\u{30a0}'..='\u{30ff}')
}

/// Stage 2: `[一-龥぀-ゟ゠-ヿ]+`, Isolated.
fn split_cjk(s: &str, f: &mut impl FnMut(&str)) {
    // ASCII-only pieces (the common case) cannot contain CJK.
    if s.is_ascii() {
        f(s);
        return;
    }
    let (mut i, mut gap) = (0, 0);
    while i < s.len() {
        let (c, n) = char_at(s, i);
        if !is_cjk(c) {
            i += n;
            continue;
        }
        let start = i;
        i += n;
        while i < s.len() {
            let (c, n) = char_at(s, i);
            if !is_cjk(c) {
                break;
            }
            i += n;
        }
        if gap < start {
            f(&s[gap..start]);
        }
        f(&s[start..i]);
        gap = i;
    }
    if gap < s.len() {
        f(&s[gap..]);
    }
}

/// Stage 3, the alternation
/// ``[!-/:-@\[-`{-~][A-Za-z]+ | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ | ?[\p{P}\p{S}]+[\r\n]*
/// | \s*[\r\n]+ | \s+(?!\S) | \s+``, Isolated. Returns the end of the match at `p`, if any.
/// Branches are tried in order, as a backtracking engine does; each branch's own
/// backtracking is resolved in closed form (see the comments).
fn match_stage3(s: &str, p: usize, bmp: &[u8]) -> Option<usize> {
    let b = s.as_bytes();
    let len = s.len();
    let (c0, n0) = char_at(s, p);
    let k0 = class_of(c0, bmp);
    // a: one ASCII punctuation character, then ASCII letters.
    if c0.is_ascii_punctuation() {
        let mut q = p + 1;
        while q < len && b[q].is_ascii_alphabetic() {
            q += 1;
        }
        if q > p + 1 {
            return Some(q);
        }
    }
    let scan = |mut q: usize, mask: u8| {
        while q < len {
            let (c, n) = char_at(s, q);
            if class_of(c, bmp) & mask == 0 {
                break;
            }
            q += n;
        }
        q
    };
    let scan_crlf = |mut q: usize| {
        while q < len && (b[q] == b'\r' || b[q] == b'\n') {
            q += 1;
        }
        q
    };
    // b: an optional "other" character, then letters/marks. The optional character is
    // tried first (greedy); when it does not lead to a letter/mark, the branch retries
    // without it.
    let other = k0 & (C_L | C_P | C_S) == 0 && c0 != '\r' && c0 != '\n';
    if other && p + n0 < len {
        let (c1, n1) = char_at(s, p + n0);
        if class_of(c1, bmp) & (C_L | C_M) != 0 {
            return Some(scan(p + n0 + n1, C_L | C_M));
        }
    }
    if k0 & (C_L | C_M) != 0 {
        return Some(scan(p + n0, C_L | C_M));
    }
    // c: an optional ASCII space, punctuation/symbols, trailing CR/LF.
    if c0 == ' ' && p + 1 < len {
        let (c1, n1) = char_at(s, p + 1);
        if class_of(c1, bmp) & (C_P | C_S) != 0 {
            return Some(scan_crlf(scan(p + 1 + n1, C_P | C_S)));
        }
    }
    if k0 & (C_P | C_S) != 0 {
        return Some(scan_crlf(scan(p + n0, C_P | C_S)));
    }
    if k0 & C_WS == 0 {
        return None;
    }
    // d, e, f all start with the maximal whitespace run p..q.
    let mut q = p;
    let mut last_start = p;
    let mut after_last_newline = None;
    while q < len {
        let (c, n) = char_at(s, q);
        if class_of(c, bmp) & C_WS == 0 {
            break;
        }
        if c == '\r' || c == '\n' {
            after_last_newline = Some(q + n);
        }
        last_start = q;
        q += n;
    }
    // d: `\s*[\r\n]+` backtracks to the last line break of the run.
    if let Some(end) = after_last_newline {
        return Some(end);
    }
    // e: `\s+(?!\S)`: the whole run at the end of the piece, else the run minus its last
    // character (which then joins the following word), if that leaves anything.
    if q == len {
        return Some(q);
    }
    if last_start > p {
        return Some(last_start);
    }
    // f: `\s+`.
    Some(q)
}

fn split_stage3(s: &str, bmp: &[u8], f: &mut impl FnMut(&str)) {
    let (mut p, mut gap) = (0, 0);
    while p < s.len() {
        match match_stage3(s, p, bmp) {
            Some(q) => {
                if gap < p {
                    f(&s[gap..p]);
                }
                f(&s[p..q]);
                p = q;
                gap = q;
            }
            None => p += char_at(s, p).1,
        }
    }
    if gap < s.len() {
        f(&s[gap..]);
    }
}

/// Splits text into pre-tokens exactly like the official `pre_tokenizer` (the three
/// Split stages; the final ByteLevel stage does not split). Calls `f` for each piece.
pub fn pre_tokenize_with(text: &str, mut f: impl FnMut(&str)) {
    let bmp = bmp_classes();
    split_digits(text, bmp, &mut |p1| {
        split_cjk(p1, &mut |p2| split_stage3(p2, bmp, &mut f));
    });
}

/// Splits text into pre-tokens (see [`pre_tokenize_with`]).
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    // The callback sees sub-slices of `text`; recover them by offset to keep the lifetime.
    let base = text.as_ptr() as usize;
    pre_tokenize_with(text, |p| {
        let start = p.as_ptr() as usize - base;
        out.push(&text[start..start + p.len()]);
    });
    out
}

// ===========================================================================
// Hashing: FxHash (rustc's), much faster than SipHash for small integer and short
// string keys; the inputs are not adversarial for DoS purposes beyond what the
// bounded cache tolerates.

#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8-byte chunk")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

// ===========================================================================
// The tokenizer.

/// Ids of the special tokens the chat encoding needs (PROMPT.md §1.3), resolved by text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `<｜begin▁of▁sentence｜>`.
    pub bos: u32,
    /// `<｜end▁of▁sentence｜>`.
    pub eos: u32,
    /// `<｜User｜>`.
    pub user: u32,
    /// `<｜Assistant｜>`.
    pub assistant: u32,
    /// `<think>`.
    pub think: u32,
    /// `</think>`.
    pub think_end: u32,
    /// `｜DSML｜`.
    pub dsml: u32,
}

/// Literal text of the BOS token.
pub const BOS_TEXT: &str = "<｜begin▁of▁sentence｜>";
/// Literal text of the EOS token.
pub const EOS_TEXT: &str = "<｜end▁of▁sentence｜>";
/// Literal text of the user-turn token.
pub const USER_TEXT: &str = "<｜User｜>";
/// Literal text of the assistant-turn token.
pub const ASSISTANT_TEXT: &str = "<｜Assistant｜>";
/// Literal text of the reasoning-open token.
pub const THINK_TEXT: &str = "<think>";
/// Literal text of the reasoning-close token.
pub const THINK_END_TEXT: &str = "</think>";
/// Literal text of the DSML marker token.
pub const DSML_TEXT: &str = "｜DSML｜";

/// Pieces longer than this (in bytes) are not cached: long runs are rare and unique.
const CACHE_MAX_PIECE: usize = 64;
/// The cache is cleared when it reaches this many entries (simple and bounded).
const CACHE_MAX_ENTRIES: usize = 1 << 16;

/// An added (special or user-defined) token.
#[derive(Debug, Clone)]
struct AddedToken {
    text: String,
    id: u32,
}

/// Leftmost-longest matcher over a group of added tokens.
#[derive(Debug)]
struct AddedMatcher {
    ac: AhoCorasick,
    ids: Vec<u32>,
}

impl AddedMatcher {
    fn new(tokens: &[&AddedToken]) -> Option<Self> {
        if tokens.is_empty() {
            return None;
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|t| t.text.as_str()))
            .expect("added-token patterns are small and valid");
        Some(Self {
            ac,
            ids: tokens.iter().map(|t| t.id).collect(),
        })
    }
}

/// The DeepSeek V4 byte-level BPE tokenizer. Cheap to share (`&self` methods, internally
/// synchronised cache).
#[derive(Debug)]
pub struct Tokenizer {
    /// Bytes of every token, concatenated; `piece_offsets[id]..piece_offsets[id + 1]`.
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<u32>,
    /// Whether an id is an added token (decoded literally, matched as a special).
    added: Vec<bool>,
    /// Token id of each single byte.
    byte_ids: [u32; 256],
    /// (left id, right id) -> (rank, merged id).
    merges: FxMap<u64, (u32, u32)>,
    /// Literal text -> id for added tokens (also normal tokens' byte strings are in `vocab`).
    added_by_text: HashMap<String, u32>,
    /// Byte form -> id of normal tokens.
    vocab: FxMap<Vec<u8>, u32>,
    /// HF splits on `normalized: false` tokens first, then on `normalized: true` ones in
    /// the remaining gaps. From GGUF (which has no such flag) everything is in `first`.
    first: Option<AddedMatcher>,
    second: Option<AddedMatcher>,
    specials: SpecialIds,
    cache: Mutex<PieceCache>,
}

/// One vocabulary entry as the builders collect it.
struct Entry {
    bytes: Vec<u8>,
    added: Option<bool>, // Some(normalized) for added tokens
}

/// Checks the GGUF keys `tokenizer.ggml.model` (must be `gpt2`) and
/// `tokenizer.ggml.pre` (`joyai-llm` or `deepseek-v3`, the two names llama.cpp gives
/// this pre-tokenizer; absent is accepted). Call before [`Tokenizer::from_gguf_parts`].
pub fn check_gguf_kind(model: &str, pre: Option<&str>) -> Result<()> {
    if model != "gpt2" {
        return Err(TokenizerError::Unsupported {
            key: "tokenizer.ggml.model",
            value: model.to_string(),
        });
    }
    match pre {
        None | Some("joyai-llm" | "deepseek-v3") => Ok(()),
        Some(other) => Err(TokenizerError::Unsupported {
            key: "tokenizer.ggml.pre",
            value: other.to_string(),
        }),
    }
}

impl Tokenizer {
    /// Builds the tokenizer from the GGUF metadata arrays `tokenizer.ggml.tokens`,
    /// `tokenizer.ggml.merges` and `tokenizer.ggml.token_type` (PROMPT.md §1.2).
    ///
    /// Tokens of type 3 (control) and 4 (user-defined) are added tokens: their strings are
    /// literal UTF-8 and they are recognised in text when specials are allowed. Other
    /// tokens are in the byte-level alphabet.
    pub fn from_gguf_parts(
        tokens: Vec<String>,
        merges: Vec<String>,
        token_types: Vec<i32>,
    ) -> Result<Self> {
        if token_types.len() != tokens.len() {
            return Err(TokenizerError::TokenTypeLen {
                got: token_types.len(),
                expected: tokens.len(),
            });
        }
        let mut entries = Vec::with_capacity(tokens.len());
        for (id, (text, ty)) in tokens.into_iter().zip(token_types).enumerate() {
            let entry = if ty == 3 || ty == 4 {
                Entry {
                    bytes: text.into_bytes(),
                    added: Some(false),
                }
            } else if let Some(bytes) = byte_level_to_bytes(&text) {
                Entry { bytes, added: None }
            } else if ty == 1 {
                return Err(TokenizerError::BadToken {
                    id,
                    reason: format!("normal token {text:?} is not in the byte-level alphabet"),
                });
            } else {
                // Unused / unknown entries decode literally and are never produced by BPE.
                Entry {
                    bytes: text.into_bytes(),
                    added: None,
                }
            };
            entries.push(entry);
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(rank, m)| match m.split_once(' ') {
                Some((l, r)) if !l.is_empty() && !r.is_empty() && !r.contains(' ') => {
                    Ok((l.to_string(), r.to_string()))
                }
                _ => Err(TokenizerError::BadMerge {
                    rank,
                    merge: m.clone(),
                    reason: "expected two symbols separated by one space".into(),
                }),
            })
            .collect::<Result<Vec<_>>>()?;
        Self::build(entries, merges)
    }

    /// Builds the tokenizer from a Hugging Face `tokenizer.json` (the official DeepSeek V4
    /// file). Only the parts this tokenizer family uses are read: the BPE vocabulary and
    /// merges and the added tokens; the pre-tokenizer is checked to be DeepSeek's.
    pub fn from_tokenizer_json(bytes: &[u8]) -> Result<Self> {
        use serde_json::Value;
        let bad = |m: &str| TokenizerError::Json(m.to_string());
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| bad(&e.to_string()))?;
        let model = doc.get("model").ok_or_else(|| bad("no model"))?;
        if model.get("type").and_then(Value::as_str) != Some("BPE") {
            return Err(bad("model.type is not BPE"));
        }
        let pre = doc
            .get("pre_tokenizer")
            .map(|v| v.to_string())
            .unwrap_or_default();
        if !pre.contains(r"\\p{N}{1,3}") || !pre.contains("ByteLevel") {
            return Err(bad("pre_tokenizer is not DeepSeek's digit/CJK/word split"));
        }
        let vocab = model
            .get("vocab")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no model.vocab"))?;
        let mut added: Vec<(usize, String, bool)> = Vec::new();
        for t in doc
            .get("added_tokens")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let id = t
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("added token without id"))?;
            let text = t
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("added token without content"))?;
            let normalized = t
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            added.push((id as usize, text.to_string(), normalized));
        }
        let n = vocab
            .values()
            .filter_map(Value::as_u64)
            .map(|id| id as usize + 1)
            .chain(added.iter().map(|a| a.0 + 1))
            .max()
            .unwrap_or(0);
        let mut slots: Vec<Option<Entry>> = (0..n).map(|_| None).collect();
        for (text, id) in vocab {
            let id = id
                .as_u64()
                .ok_or_else(|| bad("vocab id is not an integer"))? as usize;
            // Added tokens override the model entry with the same id (BOS/EOS/pad are in both).
            if added.iter().any(|a| a.0 == id) {
                continue;
            }
            let bytes = byte_level_to_bytes(text).ok_or_else(|| TokenizerError::BadToken {
                id,
                reason: format!("{text:?} is not in the byte-level alphabet"),
            })?;
            slots[id] = Some(Entry { bytes, added: None });
        }
        for (id, text, normalized) in added {
            slots[id] = Some(Entry {
                bytes: text.into_bytes(),
                added: Some(normalized),
            });
        }
        let entries = slots
            .into_iter()
            .enumerate()
            .map(|(id, e)| {
                e.ok_or_else(|| TokenizerError::BadToken {
                    id,
                    reason: "id has no token".into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let merges = model
            .get("merges")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no model.merges"))?
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                let pair = match m {
                    Value::String(s) => s
                        .split_once(' ')
                        .map(|(l, r)| (l.to_string(), r.to_string())),
                    Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                        (Some(l), Some(r)) => Some((l.to_string(), r.to_string())),
                        _ => None,
                    },
                    _ => None,
                };
                pair.ok_or_else(|| TokenizerError::BadMerge {
                    rank,
                    merge: m.to_string(),
                    reason: "expected \"LEFT RIGHT\" or [LEFT, RIGHT]".into(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Self::build(entries, merges)
    }

    fn build(entries: Vec<Entry>, merges: Vec<(String, String)>) -> Result<Self> {
        if entries.len() != DS4_N_VOCAB {
            return Err(TokenizerError::VocabSize {
                got: entries.len(),
                expected: DS4_N_VOCAB,
            });
        }
        let mut piece_bytes = Vec::new();
        let mut piece_offsets = Vec::with_capacity(entries.len() + 1);
        let mut added_flags = Vec::with_capacity(entries.len());
        let mut vocab: FxMap<Vec<u8>, u32> = FxMap::default();
        let mut added_tokens: Vec<(AddedToken, bool)> = Vec::new();
        piece_offsets.push(0u32);
        for (id, e) in entries.into_iter().enumerate() {
            piece_bytes.extend_from_slice(&e.bytes);
            piece_offsets.push(piece_bytes.len() as u32);
            added_flags.push(e.added.is_some());
            match e.added {
                Some(normalized) => {
                    let text =
                        String::from_utf8(e.bytes).map_err(|_| TokenizerError::BadToken {
                            id,
                            reason: "added token is not UTF-8".into(),
                        })?;
                    added_tokens.push((
                        AddedToken {
                            text,
                            id: id as u32,
                        },
                        normalized,
                    ));
                }
                None => {
                    // First id wins for duplicate byte strings (none in the official file).
                    vocab.entry(e.bytes).or_insert(id as u32);
                }
            }
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *vocab
                .get(&[b as u8][..])
                .ok_or_else(|| TokenizerError::BadToken {
                    id: 0,
                    reason: format!("no token for byte 0x{b:02x}"),
                })?;
        }
        let mut merge_map: FxMap<u64, (u32, u32)> = FxMap::default();
        merge_map.reserve(merges.len());
        for (rank, (l, r)) in merges.iter().enumerate() {
            let err = |reason: &str| TokenizerError::BadMerge {
                rank,
                merge: format!("{l} {r}"),
                reason: reason.into(),
            };
            let lb = byte_level_to_bytes(l).ok_or_else(|| err("left symbol not byte-level"))?;
            let rb = byte_level_to_bytes(r).ok_or_else(|| err("right symbol not byte-level"))?;
            let li = *vocab
                .get(&lb)
                .ok_or_else(|| err("left symbol not in vocabulary"))?;
            let ri = *vocab
                .get(&rb)
                .ok_or_else(|| err("right symbol not in vocabulary"))?;
            let mut joined = lb;
            joined.extend_from_slice(&rb);
            let mi = *vocab
                .get(&joined)
                .ok_or_else(|| err("merged symbol not in vocabulary"))?;
            // HF keeps the first occurrence of a duplicated pair.
            merge_map
                .entry(pair_key(li, ri))
                .or_insert((rank as u32, mi));
        }
        let first: Vec<&AddedToken> = added_tokens.iter().filter(|t| !t.1).map(|t| &t.0).collect();
        let second: Vec<&AddedToken> = added_tokens.iter().filter(|t| t.1).map(|t| &t.0).collect();
        let (first, second) = (AddedMatcher::new(&first), AddedMatcher::new(&second));
        let added_by_text: HashMap<String, u32> = added_tokens
            .into_iter()
            .map(|(t, _)| (t.text, t.id))
            .collect();
        let find = |text: &str| {
            added_by_text
                .get(text)
                .copied()
                .ok_or_else(|| TokenizerError::MissingToken(text.to_string()))
        };
        let specials = SpecialIds {
            bos: find(BOS_TEXT)?,
            eos: find(EOS_TEXT)?,
            user: find(USER_TEXT)?,
            assistant: find(ASSISTANT_TEXT)?,
            think: find(THINK_TEXT)?,
            think_end: find(THINK_END_TEXT)?,
            dsml: find(DSML_TEXT)?,
        };
        Ok(Self {
            piece_bytes,
            piece_offsets,
            added: added_flags,
            byte_ids,
            merges: merge_map,
            added_by_text,
            vocab,
            first,
            second,
            specials,
            cache: Mutex::new(PieceCache::default()),
        })
    }

    /// Number of token ids (129280).
    pub fn n_vocab(&self) -> usize {
        self.added.len()
    }

    /// Ids of the special tokens of the chat format.
    pub fn specials(&self) -> SpecialIds {
        self.specials
    }

    /// Id of an added token given its literal text (`"<｜User｜>"`), or of a normal token
    /// whose bytes are exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.added_by_text
            .get(text)
            .or_else(|| self.vocab.get(text.as_bytes()))
            .copied()
    }

    /// Whether `id` is an added (control or user-defined) token.
    pub fn is_added(&self, id: u32) -> bool {
        self.added.get(id as usize).copied().unwrap_or(false)
    }

    /// The bytes a token stands for (literal text for added tokens). `None` if out of range.
    pub fn token_to_piece(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if i + 1 >= self.piece_offsets.len() {
            return None;
        }
        Some(&self.piece_bytes[self.piece_offsets[i] as usize..self.piece_offsets[i + 1] as usize])
    }

    /// The vocabulary string of a token as stored in `tokenizer.json` / GGUF: literal text
    /// for added tokens, the byte-level alphabet (`Ġ` for a space, `Ċ` for a newline)
    /// otherwise. `None` if out of range.
    pub fn vocab_string(&self, id: u32) -> Option<String> {
        let bytes = self.token_to_piece(id)?;
        if self.is_added(id) {
            return Some(String::from_utf8_lossy(bytes).into_owned());
        }
        static TABLE: OnceLock<[char; 256]> = OnceLock::new();
        let table = TABLE.get_or_init(byte_to_char_table);
        Some(bytes.iter().map(|&b| table[b as usize]).collect())
    }

    /// Decodes ids to bytes (may be invalid UTF-8 if the ids split a character).
    pub fn decode(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(
                self.token_to_piece(id)
                    .ok_or(TokenizerError::UnknownId(id))?,
            );
        }
        Ok(out)
    }

    /// Encodes text. With `allow_special`, added-token literals (`<｜User｜>`, `｜DSML｜`,
    /// …) become their control ids, as the official tokenizer does; without it they are
    /// ordinary text (the safe mode for untrusted input, PROMPT.md §1.6).
    /// No BOS is added.
    pub fn encode(&self, text: &str, allow_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_into(text, allow_special, &mut out);
        out
    }

    /// Like [`Tokenizer::encode`], appending to `out`.
    pub fn encode_into(&self, text: &str, allow_special: bool, out: &mut Vec<u32>) {
        // One lock per call, not per piece; a concurrent caller encodes without the cache
        // rather than waiting.
        let mut guard = self.cache.try_lock().ok();
        let cache = guard.as_deref_mut();
        let mut enc = PieceEncoder {
            tok: self,
            cache,
            scratch: Scratch::default(),
        };
        if !allow_special {
            enc.encode_text(text, out);
            return;
        }
        let rest_first = |span: &str, out: &mut Vec<u32>, enc: &mut PieceEncoder<'_>| {
            split_added(self.second.as_ref(), span, out, &mut |t, o| {
                enc.encode_text(t, o)
            });
        };
        match &self.first {
            Some(m) => {
                let mut last = 0;
                for mat in m.ac.find_iter(text) {
                    rest_first(&text[last..mat.start()], out, &mut enc);
                    out.push(m.ids[mat.pattern().as_usize()]);
                    last = mat.end();
                }
                rest_first(&text[last..], out, &mut enc);
            }
            None => rest_first(text, out, &mut enc),
        }
    }

    /// Encodes a rendered prompt given as parts `(text, allow_special)`.
    ///
    /// Added-token literals are recognised only inside parts that allow them, so text
    /// from untrusted parts can never become a control token. Everything between two
    /// recognised tokens is pre-tokenized as **one** span even when it crosses part
    /// boundaries: with no special literal in the untrusted parts, the result is exactly
    /// `encode(concat(parts), true)`, the official pipeline (PROMPT.md §1.6).
    pub fn encode_parts<'p>(&self, parts: impl IntoIterator<Item = (&'p str, bool)>) -> Vec<u32> {
        let mut out = Vec::new();
        let mut pending = String::new();
        let mut guard = self.cache.try_lock().ok();
        let mut enc = PieceEncoder {
            tok: self,
            cache: guard.as_deref_mut(),
            scratch: Scratch::default(),
        };
        for (text, allow_special) in parts {
            if !allow_special {
                pending.push_str(text);
                continue;
            }
            let mut specials: Vec<(usize, usize, u32)> = Vec::new();
            let collect = |m: &AddedMatcher, base: usize, span: &str, found: &mut Vec<_>| {
                for mat in m.ac.find_iter(span) {
                    found.push((
                        base + mat.start(),
                        base + mat.end(),
                        m.ids[mat.pattern().as_usize()],
                    ));
                }
            };
            // Same two passes as `encode_into`: first group on the whole part, second
            // group inside the gaps.
            let mut first_hits = Vec::new();
            if let Some(m) = &self.first {
                collect(m, 0, text, &mut first_hits);
            }
            let mut last = 0;
            for hit in first_hits.iter().copied().chain(std::iter::once((
                text.len(),
                text.len(),
                u32::MAX,
            ))) {
                if let Some(m) = &self.second {
                    collect(m, last, &text[last..hit.0], &mut specials);
                }
                if hit.2 != u32::MAX {
                    specials.push(hit);
                }
                last = hit.1;
            }
            specials.sort_unstable_by_key(|s| s.0);
            let mut last = 0;
            for (start, end, id) in specials {
                pending.push_str(&text[last..start]);
                enc.encode_text(&pending, &mut out);
                pending.clear();
                out.push(id);
                last = end;
            }
            pending.push_str(&text[last..]);
        }
        enc.encode_text(&pending, &mut out);
        out
    }

    /// Encodes one pre-token piece with BPE, without the cache, forcing the quadratic
    /// (`heap == false`) or the heap merge loop. For the test that checks they agree.
    #[doc(hidden)]
    pub fn bpe_piece(&self, piece: &[u8], heap: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if heap {
            bpe_heap(self, piece, &mut Scratch::default(), &mut out);
        } else {
            bpe_small(self, piece, &mut out);
        }
        out
    }
}

fn split_added(
    m: Option<&AddedMatcher>,
    text: &str,
    out: &mut Vec<u32>,
    f: &mut impl FnMut(&str, &mut Vec<u32>),
) {
    if text.is_empty() {
        return;
    }
    let Some(m) = m else {
        f(text, out);
        return;
    };
    let mut last = 0;
    for mat in m.ac.find_iter(text) {
        f(&text[last..mat.start()], out);
        out.push(m.ids[mat.pattern().as_usize()]);
        last = mat.end();
    }
    f(&text[last..], out);
}

#[inline]
fn pair_key(l: u32, r: u32) -> u64 {
    (u64::from(l) << 32) | u64::from(r)
}

/// Reusable buffers for BPE.
#[derive(Default)]
struct Scratch {
    syms: Vec<Sym>,
    heap: BinaryHeap<std::cmp::Reverse<(u32, u32, u32)>>,
}

#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    prev: u32,
    next: u32,
    len: u32, // 0 = merged away
}

const NONE: u32 = u32::MAX;

/// Small pieces: repeatedly scan for the lowest-rank adjacent pair (leftmost on ties).
/// Quadratic, but for a handful of symbols it beats the heap.
const BPE_SMALL: usize = 24;

fn bpe(tok: &Tokenizer, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
    if piece.len() <= BPE_SMALL {
        bpe_small(tok, piece, out);
    } else {
        bpe_heap(tok, piece, scratch, out);
    }
}

fn bpe_small(tok: &Tokenizer, piece: &[u8], out: &mut Vec<u32>) {
    let start = out.len();
    out.extend(piece.iter().map(|&b| tok.byte_ids[b as usize]));
    loop {
        let syms = &out[start..];
        let mut best: Option<(u32, usize, u32)> = None;
        for i in 0..syms.len().saturating_sub(1) {
            if let Some(&(rank, id)) = tok.merges.get(&pair_key(syms[i], syms[i + 1]))
                && best.is_none_or(|b| rank < b.0)
            {
                best = Some((rank, i, id));
            }
        }
        let Some((_, i, id)) = best else { break };
        out[start + i] = id;
        out.remove(start + i + 1);
    }
}

/// Linked list of symbols plus a min-heap of candidate merges keyed by (rank, position):
/// the same algorithm as HF `tokenizers` (`Word::merge_all`), O(n log n).
fn bpe_heap(tok: &Tokenizer, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<u32>) {
    use std::cmp::Reverse;
    let syms = &mut scratch.syms;
    let heap = &mut scratch.heap;
    syms.clear();
    heap.clear();
    let n = piece.len();
    for (i, &b) in piece.iter().enumerate() {
        syms.push(Sym {
            id: tok.byte_ids[b as usize],
            prev: if i == 0 { NONE } else { i as u32 - 1 },
            next: if i + 1 == n { NONE } else { i as u32 + 1 },
            len: 1,
        });
    }
    for i in 0..n.saturating_sub(1) {
        if let Some(&(rank, id)) = tok.merges.get(&pair_key(syms[i].id, syms[i + 1].id)) {
            heap.push(Reverse((rank, i as u32, id)));
        }
    }
    while let Some(Reverse((rank, pos, new_id))) = heap.pop() {
        let p = pos as usize;
        let s = syms[p];
        if s.len == 0 || s.next == NONE {
            continue;
        }
        let nx = s.next as usize;
        // The pair may have changed since it was queued: check it still merges to new_id
        // with this rank.
        match tok.merges.get(&pair_key(s.id, syms[nx].id)) {
            Some(&(r, id)) if r == rank && id == new_id => {}
            _ => continue,
        }
        let right = syms[nx];
        syms[p].id = new_id;
        syms[p].len += right.len;
        syms[p].next = right.next;
        syms[nx].len = 0;
        if right.next != NONE {
            syms[right.next as usize].prev = pos;
        }
        if s.prev != NONE {
            let pv = s.prev as usize;
            if let Some(&(r, id)) = tok.merges.get(&pair_key(syms[pv].id, new_id)) {
                heap.push(Reverse((r, s.prev, id)));
            }
        }
        if right.next != NONE
            && let Some(&(r, id)) = tok
                .merges
                .get(&pair_key(new_id, syms[right.next as usize].id))
        {
            heap.push(Reverse((r, pos, id)));
        }
    }
    let mut i = 0u32;
    while i != NONE {
        out.push(syms[i as usize].id);
        i = syms[i as usize].next;
    }
}

/// Per-call encoding state: the (optional) cache and scratch buffers.
struct PieceEncoder<'a> {
    tok: &'a Tokenizer,
    cache: Option<&'a mut PieceCache>,
    scratch: Scratch,
}

impl PieceEncoder<'_> {
    fn encode_text(&mut self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        pre_tokenize_with(text, |piece| self.encode_piece(piece.as_bytes(), out));
    }

    fn encode_piece(&mut self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() == 1 {
            out.push(self.tok.byte_ids[piece[0] as usize]);
            return;
        }
        match self.cache.as_deref_mut() {
            Some(cache) if piece.len() <= CACHE_MAX_PIECE => {
                if cache.get(piece, out) {
                    return;
                }
                let start = out.len();
                bpe(self.tok, piece, &mut self.scratch, out);
                cache.insert(piece, &out[start..]);
            }
            _ => bpe(self.tok, piece, &mut self.scratch, out),
        }
    }
}

/// Piece -> ids cache. Pieces of up to 16 bytes (nearly all of them) are keyed by two
/// integers, so a lookup is a hash and two compares instead of a `memcmp` call; ids live
/// in one arena instead of one allocation per entry.
#[derive(Debug, Default)]
struct PieceCache {
    short: FxMap<(u64, u64), (u32, u32)>,
    long: FxMap<Vec<u8>, (u32, u32)>,
    arena: Vec<u32>,
}

impl PieceCache {
    /// Packs a piece of up to 15 bytes and its length into two words.
    #[inline]
    fn short_key(piece: &[u8]) -> Option<(u64, u64)> {
        // Up to 15 bytes: 8 + 7 bytes of data, length in the top byte of the second word.
        if piece.len() > 15 {
            return None;
        }
        let mut buf = [0u8; 16];
        buf[..piece.len()].copy_from_slice(piece);
        buf[15] = piece.len() as u8;
        let a = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(buf[8..].try_into().expect("8 bytes"));
        Some((a, b))
    }

    /// Appends the cached ids of `piece` to `out`; false on a miss.
    #[inline]
    fn get(&self, piece: &[u8], out: &mut Vec<u32>) -> bool {
        let hit = match Self::short_key(piece) {
            Some(k) => self.short.get(&k),
            None => self.long.get(piece),
        };
        match hit {
            Some(&(off, len)) => {
                out.extend_from_slice(&self.arena[off as usize..(off + len) as usize]);
                true
            }
            None => false,
        }
    }

    fn insert(&mut self, piece: &[u8], ids: &[u32]) {
        if self.short.len() + self.long.len() >= CACHE_MAX_ENTRIES {
            self.short.clear();
            self.long.clear();
            self.arena.clear();
        }
        let slot = (self.arena.len() as u32, ids.len() as u32);
        self.arena.extend_from_slice(ids);
        match Self::short_key(piece) {
            Some(k) => {
                self.short.insert(k, slot);
            }
            None => {
                self.long.insert(piece.to_vec(), slot);
            }
        }
    }
}

// ===========================================================================
// Streaming decode.

/// Turns a stream of token ids into UTF-8 text, holding back a trailing incomplete
/// character until the next token completes it (PROMPT.md §1.7). Invalid sequences are
/// replaced by U+FFFD; use [`Tokenizer::decode`] for raw bytes.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.pending.extend_from_slice(
            tok.token_to_piece(id)
                .ok_or(TokenizerError::UnknownId(id))?,
        );
        Ok(self.take_complete())
    }

    /// Appends raw bytes and returns the text that is now complete.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    /// Bytes held back (an incomplete character).
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Flushes what is held back (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[start..valid]).expect("validated prefix"),
                    );
                    match e.error_len() {
                        // Incomplete at the end: hold it back.
                        None => {
                            start = valid;
                            break;
                        }
                        Some(n) => {
                            out.push('\u{fffd}');
                            start = valid + n;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Tokenizer>();
    }

    #[test]
    fn byte_alphabet_matches_spec_examples() {
        let t = byte_to_char_table();
        assert_eq!(t[0x00], 'Ā');
        assert_eq!(t[0x09], 'ĉ');
        assert_eq!(t[0x0A], 'Ċ');
        assert_eq!(t[0x20], 'Ġ');
        assert_eq!(t[0x7F], 'ġ');
        assert_eq!(t[0xA0], 'ł');
        assert_eq!(t[0xAD], 'Ń');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(
            byte_level_to_bytes("ĠcittÃł").as_deref(),
            Some(" città".as_bytes())
        );
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(t[b as usize]), Some(b));
        }
    }

    fn check(input: &str, expected: &[&str]) {
        assert_eq!(pre_tokenize(input), expected, "input {input:?}");
    }

    #[test]
    fn pre_tokenizer_spec_examples() {
        check("Hello world!", &["Hello", " world", "!"]);
        check(
            "    int x = 42;\n",
            &["   ", " int", " x", " =", " ", "42", ";\n"],
        );
        check("foo.bar(baz)", &["foo", ".bar", "(baz", ")"]);
        check("12345678", &["123", "456", "78"]);
        check("   \n\n  foo", &["   \n\n", " ", " foo"]);
        check("Ω² ½ ① ٣", &["Ω", "²", " ", "½", " ", "①", " ", "٣"]);
        check("a\u{a0}b", &["a", "\u{a0}b"]);
    }

    #[test]
    fn stream_decoder_holds_partial_utf8() {
        let mut d = StreamDecoder::new();
        let bytes = "é中".as_bytes();
        assert_eq!(d.push_bytes(&bytes[..1]), "");
        assert_eq!(d.push_bytes(&bytes[1..3]), "é");
        assert_eq!(d.pending(), &bytes[2..3]);
        assert_eq!(d.push_bytes(&bytes[3..]), "中");
        assert_eq!(d.push_bytes(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(d.push_bytes(&[0xe4]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }
}
