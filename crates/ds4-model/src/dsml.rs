//! DSML, DeepSeek V4's tool-call markup: rendering calls into prompts and parsing them
//! out of generated text, in one piece or incrementally while streaming.
//!
//! PROMPT.md §2.8 defines the format and §2.11 the parse. Rendering follows the official
//! encoder (`encode_arguments_to_dsml`): string values raw, other values as Python
//! `json.dumps`. Parsing is tolerant where models drift (whitespace between elements,
//! attribute order, the `<DSML｜` spelling with the first bar missing) and strict where
//! silence would corrupt data: invalid JSON in a `string="false"` value, a duplicate
//! parameter, a missing name or an unterminated block are errors, never `{}`. String
//! values are not entity-decoded except for the one escape the tools prompt documents,
//! `&lt;/｜DSML｜parameter>` (PROMPT.md GAP-T8).
//!
//! The [`json`] submodule is a small order-preserving JSON reader/writer: tool schemas
//! and arguments must keep their key order and be re-serialised byte-exactly the way
//! Python does, which a generic JSON map does not guarantee.

use crate::tokenizer::{DSML_TEXT, EOS_TEXT, THINK_END_TEXT, THINK_TEXT};

/// Errors of DSML parsing and JSON handling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DsmlError {
    /// Malformed JSON text.
    #[error("invalid JSON at byte {offset}: {reason}")]
    Json {
        /// Byte offset of the problem.
        offset: usize,
        /// What was expected.
        reason: String,
    },
    /// The tool-call block is malformed.
    #[error("malformed tool-call block at byte {offset}: {reason}")]
    Syntax {
        /// Byte offset (in the parsed text) of the problem.
        offset: usize,
        /// What was expected.
        reason: String,
    },
    /// A `string="false"` parameter does not hold valid JSON.
    #[error("tool {tool}: parameter {param} is not valid JSON: {reason}")]
    InvalidParameterJson {
        /// Tool name.
        tool: String,
        /// Parameter name.
        param: String,
        /// The JSON error.
        reason: String,
    },
    /// The same parameter appears twice in one invoke.
    #[error("tool {tool}: duplicate parameter {param}")]
    DuplicateParameter {
        /// Tool name.
        tool: String,
        /// Parameter name.
        param: String,
    },
    /// The block started but its closing tag never came (generation ended inside it).
    #[error("unterminated tool call")]
    Unterminated,
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, DsmlError>;

// ===========================================================================

pub mod json {
    //! Order-preserving JSON: parse (RFC 8259, strict) and write either compactly or
    //! exactly like Python's `json.dumps(value, ensure_ascii=False)`.

    use super::{DsmlError, Result};

    /// A JSON value that keeps object key order and the source text of numbers.
    #[derive(Debug, Clone, PartialEq)]
    pub enum JsonValue {
        /// `null`.
        Null,
        /// `true` / `false`.
        Bool(bool),
        /// A number, as written in the source.
        Number(String),
        /// A string.
        String(String),
        /// An array.
        Array(Vec<JsonValue>),
        /// An object, keys in source order (duplicates kept).
        Object(Vec<(String, JsonValue)>),
    }

    /// Parses one JSON value; surrounding whitespace is allowed, anything else is not.
    pub fn parse(text: &str) -> Result<JsonValue> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
            src: text,
        };
        p.ws();
        let v = p.value(0)?;
        p.ws();
        if p.i != p.s.len() {
            return Err(p.err("trailing characters"));
        }
        Ok(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
        src: &'a str,
    }

    const MAX_DEPTH: usize = 512;

    impl Parser<'_> {
        fn err(&self, reason: &str) -> DsmlError {
            DsmlError::Json {
                offset: self.i,
                reason: reason.to_string(),
            }
        }
        fn ws(&mut self) {
            while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
                self.i += 1;
            }
        }
        fn lit(&mut self, word: &str, v: JsonValue) -> Result<JsonValue> {
            if self.s[self.i..].starts_with(word.as_bytes()) {
                self.i += word.len();
                Ok(v)
            } else {
                Err(self.err("unexpected character"))
            }
        }
        fn value(&mut self, depth: usize) -> Result<JsonValue> {
            if depth > MAX_DEPTH {
                return Err(self.err("nesting too deep"));
            }
            match self.s.get(self.i) {
                None => Err(self.err("unexpected end")),
                Some(b'n') => self.lit("null", JsonValue::Null),
                Some(b't') => self.lit("true", JsonValue::Bool(true)),
                Some(b'f') => self.lit("false", JsonValue::Bool(false)),
                Some(b'"') => Ok(JsonValue::String(self.string()?)),
                Some(b'[') => {
                    self.i += 1;
                    let mut items = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(JsonValue::Array(items));
                    }
                    loop {
                        self.ws();
                        items.push(self.value(depth + 1)?);
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(JsonValue::Array(items));
                            }
                            _ => return Err(self.err("expected , or ]")),
                        }
                    }
                }
                Some(b'{') => {
                    self.i += 1;
                    let mut items = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(JsonValue::Object(items));
                    }
                    loop {
                        self.ws();
                        if self.s.get(self.i) != Some(&b'"') {
                            return Err(self.err("expected a string key"));
                        }
                        let k = self.string()?;
                        self.ws();
                        if self.s.get(self.i) != Some(&b':') {
                            return Err(self.err("expected :"));
                        }
                        self.i += 1;
                        self.ws();
                        let v = self.value(depth + 1)?;
                        items.push((k, v));
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(JsonValue::Object(items));
                            }
                            _ => return Err(self.err("expected , or }")),
                        }
                    }
                }
                Some(b'-' | b'0'..=b'9') => self.number(),
                Some(_) => Err(self.err("unexpected character")),
            }
        }
        fn number(&mut self) -> Result<JsonValue> {
            let start = self.i;
            let digits = |p: &mut Self| {
                let st = p.i;
                while p.i < p.s.len() && p.s[p.i].is_ascii_digit() {
                    p.i += 1;
                }
                p.i - st
            };
            if self.s.get(self.i) == Some(&b'-') {
                self.i += 1;
            }
            match self.s.get(self.i) {
                Some(b'0') => self.i += 1,
                Some(b'1'..=b'9') => {
                    digits(self);
                }
                _ => return Err(self.err("bad number")),
            }
            if self.s.get(self.i) == Some(&b'.') {
                self.i += 1;
                if digits(self) == 0 {
                    return Err(self.err("bad fraction"));
                }
            }
            if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
                self.i += 1;
                if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                    self.i += 1;
                }
                if digits(self) == 0 {
                    return Err(self.err("bad exponent"));
                }
            }
            Ok(JsonValue::Number(self.src[start..self.i].to_string()))
        }
        fn hex4(&mut self) -> Result<u32> {
            let h = self
                .src
                .get(self.i..self.i + 4)
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .filter(|_| self.s[self.i..self.i + 4].iter().all(u8::is_ascii_hexdigit))
                .ok_or_else(|| self.err("bad \\u escape"))?;
            self.i += 4;
            Ok(h)
        }
        fn string(&mut self) -> Result<String> {
            self.i += 1; // opening quote
            let mut out = String::new();
            loop {
                let start = self.i;
                while self.i < self.s.len() && !matches!(self.s[self.i], b'"' | b'\\' | 0..=0x1f) {
                    self.i += 1;
                }
                out.push_str(&self.src[start..self.i]);
                match self.s.get(self.i) {
                    Some(b'"') => {
                        self.i += 1;
                        return Ok(out);
                    }
                    Some(b'\\') => {
                        self.i += 1;
                        let c = *self
                            .s
                            .get(self.i)
                            .ok_or_else(|| self.err("unexpected end"))?;
                        self.i += 1;
                        match c {
                            b'"' => out.push('"'),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'u' => {
                                let hi = self.hex4()?;
                                let cp = if (0xD800..0xDC00).contains(&hi)
                                    && self.s[self.i..].starts_with(b"\\u")
                                {
                                    let save = self.i;
                                    self.i += 2;
                                    let lo = self.hex4()?;
                                    if (0xDC00..0xE000).contains(&lo) {
                                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                    } else {
                                        self.i = save;
                                        hi
                                    }
                                } else {
                                    hi
                                };
                                // Lone surrogates cannot live in a Rust string.
                                out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                            }
                            _ => return Err(self.err("bad escape")),
                        }
                    }
                    Some(_) => return Err(self.err("control character in string")),
                    None => return Err(self.err("unterminated string")),
                }
            }
        }
    }

    /// Appends `s` as a JSON string literal, escaping like Python with
    /// `ensure_ascii=False` (also what compact output uses).
    pub fn write_string(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
    }

    /// Python `repr(float)` of a JSON number, or the integer as Python prints it.
    fn python_number(raw: &str) -> String {
        if !raw.contains(['.', 'e', 'E']) {
            // Python ints print as written, except that "-0" is 0.
            return if raw == "-0" { "0".into() } else { raw.into() };
        }
        let x: f64 = raw.parse().unwrap_or(f64::NAN);
        if x.is_infinite() {
            return if x > 0.0 {
                "Infinity".into()
            } else {
                "-Infinity".into()
            };
        }
        if x == 0.0 {
            return if x.is_sign_negative() {
                "-0.0".into()
            } else {
                "0.0".into()
            };
        }
        // Shortest round-trip digits from Rust, laid out with CPython's `repr` rules
        // (`format_float_short`, mode 'r'): exponent form when decpt <= -4 or > 16.
        let sci = format!("{:e}", x.abs());
        let (mant, exp) = sci.split_once('e').expect("{:e} has an exponent");
        let exp: i32 = exp.parse().expect("exponent is an integer");
        let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
        let n = digits.len() as i32;
        let decpt = exp + 1;
        let mut out = String::new();
        if x < 0.0 {
            out.push('-');
        }
        if decpt <= -4 || decpt > 16 {
            out.push_str(&digits[..1]);
            if n > 1 {
                out.push('.');
                out.push_str(&digits[1..]);
            }
            out.push_str(&format!(
                "e{}{:02}",
                if exp < 0 { '-' } else { '+' },
                exp.abs()
            ));
        } else if decpt <= 0 {
            out.push_str("0.");
            out.push_str(&"0".repeat((-decpt) as usize));
            out.push_str(&digits);
        } else if decpt < n {
            out.push_str(&digits[..decpt as usize]);
            out.push('.');
            out.push_str(&digits[decpt as usize..]);
        } else {
            out.push_str(&digits);
            out.push_str(&"0".repeat((decpt - n) as usize));
            out.push_str(".0");
        }
        out
    }

    impl JsonValue {
        /// `json.dumps(self, ensure_ascii=False)`: separators `", "` and `": "`.
        pub fn to_python(&self) -> String {
            let mut out = String::new();
            self.write(&mut out, true);
            out
        }

        /// Minified JSON (`,` and `:` without spaces), numbers as written.
        pub fn to_compact(&self) -> String {
            let mut out = String::new();
            self.write(&mut out, false);
            out
        }

        fn write(&self, out: &mut String, python: bool) {
            let (comma, colon) = if python { (", ", ": ") } else { (",", ":") };
            match self {
                JsonValue::Null => out.push_str("null"),
                JsonValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                JsonValue::Number(n) if python => out.push_str(&python_number(n)),
                JsonValue::Number(n) => out.push_str(n),
                JsonValue::String(s) => write_string(out, s),
                JsonValue::Array(items) => {
                    out.push('[');
                    for (i, v) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(comma);
                        }
                        v.write(out, python);
                    }
                    out.push(']');
                }
                JsonValue::Object(items) => {
                    out.push('{');
                    for (i, (k, v)) in items.iter().enumerate() {
                        if i > 0 {
                            out.push_str(comma);
                        }
                        write_string(out, k);
                        out.push_str(colon);
                        v.write(out, python);
                    }
                    out.push('}');
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_preserve_order() {
            let v =
                parse(r#" {"b": [1, 2.5, "x\n\u00e9\ud83d\ude00"], "a": {"z": null, "y": true}} "#)
                    .expect("parses");
            assert_eq!(
                v.to_python(),
                "{\"b\": [1, 2.5, \"x\\né😀\"], \"a\": {\"z\": null, \"y\": true}}"
            );
            assert_eq!(
                v.to_compact(),
                "{\"b\":[1,2.5,\"x\\né😀\"],\"a\":{\"z\":null,\"y\":true}}"
            );
            for bad in [
                "",
                "{",
                "[1,]",
                "{\"a\" 1}",
                "01",
                "1.",
                "\"\u{1}\"",
                "tru",
                "1 2",
                "{'a':1}",
            ] {
                assert!(parse(bad).is_err(), "{bad:?}");
            }
        }
    }
}

use json::JsonValue;

// ===========================================================================
// Rendering (official form, PROMPT.md §2.8).

/// A tool call as the chat history stores it: a name and its JSON arguments text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ToolCall {
    /// Client-visible call id (used to order tool results; never rendered).
    pub id: Option<String>,
    /// Function name.
    pub name: String,
    /// Arguments as JSON text (normally an object).
    pub arguments: String,
}

/// Renders the parameters of one call like the official `encode_arguments_to_dsml`:
/// one line per key in object order; strings raw, everything else Python JSON.
/// Arguments that are not a JSON object become a single `arguments` string parameter.
pub fn render_arguments(arguments: &str) -> String {
    let items = match json::parse(arguments) {
        Ok(JsonValue::Object(items)) => items,
        _ => vec![(
            "arguments".to_string(),
            JsonValue::String(arguments.to_string()),
        )],
    };
    let mut lines = Vec::with_capacity(items.len());
    for (k, v) in items {
        let (is_str, value) = match v {
            JsonValue::String(s) => ("true", s),
            other => ("false", other.to_python()),
        };
        lines.push(format!(
            "<{DSML_TEXT}parameter name=\"{k}\" string=\"{is_str}\">{value}</{DSML_TEXT}parameter>"
        ));
    }
    lines.join("\n")
}

/// Renders a tool-call block exactly like the official encoder, including the leading
/// `\n\n`: `\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="…">\n…\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>`.
pub fn render_tool_calls(calls: &[ToolCall]) -> String {
    let invokes: Vec<String> = calls
        .iter()
        .map(|c| {
            format!(
                "<{DSML_TEXT}invoke name=\"{}\">\n{}\n</{DSML_TEXT}invoke>",
                c.name,
                render_arguments(&c.arguments)
            )
        })
        .collect();
    format!(
        "\n\n<{DSML_TEXT}tool_calls>\n{}\n</{DSML_TEXT}tool_calls>",
        invokes.join("\n")
    )
}

/// ds4's canonical block (`ds4_server.c: append_dsml_tool_calls_text`, PROMPT.md §2.10):
/// one line per element, names XML-escaped, strings raw except the closing-tag escape,
/// other values minified JSON, no empty line for an invoke without arguments.
pub fn render_tool_calls_ds4(calls: &[ToolCall]) -> String {
    let close = format!("</{DSML_TEXT}parameter>");
    let mut out = format!("\n\n<{DSML_TEXT}tool_calls>\n");
    for c in calls {
        out.push_str(&format!(
            "<{DSML_TEXT}invoke name=\"{}\">\n",
            xml_escape(&c.name)
        ));
        let items = match json::parse(&c.arguments) {
            Ok(JsonValue::Object(items)) => items,
            _ => vec![(
                "arguments".to_string(),
                JsonValue::String(c.arguments.clone()),
            )],
        };
        for (k, v) in items {
            let (is_str, value) = match v {
                JsonValue::String(s) => (
                    "true",
                    s.replace(&close, &format!("&lt;/{DSML_TEXT}parameter>")),
                ),
                other => (
                    "false",
                    other
                        .to_compact()
                        .replace(&close, &format!("\\u003c/{DSML_TEXT}parameter>")),
                ),
            };
            out.push_str(&format!(
                "<{DSML_TEXT}parameter name=\"{}\" string=\"{is_str}\">{value}{close}\n",
                xml_escape(&k)
            ));
        }
        out.push_str(&format!("</{DSML_TEXT}invoke>\n"));
    }
    out.push_str(&format!("</{DSML_TEXT}tool_calls>"));
    out
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

// ===========================================================================
// Parsing.

/// A tool call parsed from generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    /// Function name.
    pub name: String,
    /// Arguments as a compact JSON object, keys in the order the model wrote them.
    pub arguments: String,
}

/// A completion split into its parts (PROMPT.md §2.11).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedMessage {
    /// Reasoning text (thinking modes), without the `<think>`/`</think>` markers.
    pub reasoning: Option<String>,
    /// Visible answer, without the tool block and without trailing whitespace before it.
    pub content: String,
    /// Tool calls in order.
    pub tool_calls: Vec<ParsedToolCall>,
    /// Exact bytes of the tool block as generated, from the end of the trimmed content
    /// (separator whitespace included) through the closing tag: store it for exact replay
    /// (PROMPT.md §2.10, fixing GAP-T6).
    pub tool_block: Option<String>,
}

/// Options of the parser.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// The prompt ended with `<think>`: the text starts inside the reasoning.
    pub thinking: bool,
    /// Tools were offered: look for a tool block at all.
    pub tools: bool,
    /// Also accept plain-XML `<tool_calls>` blocks (ds4 does; it can misfire on prose,
    /// PROMPT.md GAP-T7).
    pub accept_plain_xml: bool,
}

/// The three spellings of the marker in tags, longest first.
const MARKERS: [&str; 3] = ["｜DSML｜", "DSML｜", ""];
/// Block open tags, one per marker spelling (same order as [`MARKERS`]).
const OPEN_BLOCK: [&str; 3] = ["<｜DSML｜tool_calls>", "<DSML｜tool_calls>", "<tool_calls>"];
/// Parameter close tags, one per marker spelling.
const CLOSE_PARAM: [&str; 3] = ["</｜DSML｜parameter>", "</DSML｜parameter>", "</parameter>"];

/// Finds the start of a tool block in `text`: (offset of `<`, byte length of the open tag).
fn find_block_start(text: &str, plain_xml: bool) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    for tag in OPEN_BLOCK {
        if tag == OPEN_BLOCK[2] && !plain_xml {
            continue;
        }
        if let Some(i) = text.find(tag)
            && best.is_none_or(|b| i < b.0)
        {
            best = Some((i, tag.len()));
        }
    }
    best
}

/// Splits a completion into reasoning, content and tool calls.
pub fn parse_completion(text: &str, opts: ParseOptions) -> Result<ParsedMessage> {
    let mut msg = ParsedMessage::default();
    // EOS ends generation and is never part of the text.
    let text = text.strip_suffix(EOS_TEXT).unwrap_or(text);
    let mut answer = text;
    if opts.thinking {
        let body = text.strip_prefix(THINK_TEXT).unwrap_or(text);
        match body.find(THINK_END_TEXT) {
            Some(i) => {
                msg.reasoning = Some(body[..i].to_string());
                answer = &body[i + THINK_END_TEXT.len()..];
            }
            None => {
                // Truncated reasoning: it is reasoning, not content (API.md GAP-S14).
                msg.reasoning = Some(body.to_string());
                return Ok(msg);
            }
        }
    }
    if !opts.tools {
        msg.content = answer.to_string();
        return Ok(msg);
    }
    let Some((start, _)) = find_block_start(answer, opts.accept_plain_xml) else {
        msg.content = answer.to_string();
        return Ok(msg);
    };
    let content = answer[..start].trim_end();
    let (calls, end) = parse_block(answer, start)?;
    let rest = &answer[end..];
    if !rest.trim().is_empty() {
        return Err(DsmlError::Syntax {
            offset: end,
            reason: "text after the tool-call block".into(),
        });
    }
    msg.content = content.to_string();
    msg.tool_calls = calls;
    msg.tool_block = Some(answer[content.len()..end].to_string());
    Ok(msg)
}

/// Cursor over the block text.
struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: &str) -> DsmlError {
        if self.i >= self.s.len() {
            return DsmlError::Unterminated;
        }
        DsmlError::Syntax {
            offset: self.i,
            reason: reason.to_string(),
        }
    }
    fn ws(&mut self) {
        let rest = &self.s[self.i..];
        self.i += rest.len() - rest.trim_start_matches([' ', '\t', '\n', '\r']).len();
    }
    /// Matches `<` [`/`] marker `name` at the cursor (any marker spelling); returns the
    /// length matched, without the end of the tag.
    fn tag(&self, close: bool, name: &str) -> Option<usize> {
        let rest = &self.s[self.i..];
        let rest = rest.strip_prefix('<')?;
        let rest = if close { rest.strip_prefix('/')? } else { rest };
        for m in MARKERS {
            if let Some(r) = rest.strip_prefix(m)
                && r.starts_with(name)
            {
                return Some(1 + usize::from(close) + m.len() + name.len());
            }
        }
        None
    }
    /// Reads the attributes of an open tag (after its name) up to `>`.
    fn attrs(&mut self) -> Result<Vec<(&'a str, &'a str)>> {
        let start = self.i;
        let end = self.s[start..].find('>').ok_or(DsmlError::Unterminated)? + start;
        let mut attrs = Vec::new();
        let mut rest = &self.s[start..end];
        loop {
            rest = rest.trim_start();
            if rest.is_empty() {
                break;
            }
            let eq = rest
                .find('=')
                .ok_or_else(|| self.err("attribute without value"))?;
            let key = rest[..eq].trim();
            let after = rest[eq + 1..].trim_start();
            let Some(after) = after.strip_prefix('"') else {
                return Err(self.err("attribute value must be quoted"));
            };
            let close = after
                .find('"')
                .ok_or_else(|| self.err("unterminated attribute"))?;
            attrs.push((key, &after[..close]));
            rest = &after[close + 1..];
        }
        self.i = end + 1;
        Ok(attrs)
    }
}

/// Parses a block whose open tag starts at `start`; returns the calls and the end offset
/// (just after the closing tag).
fn parse_block(text: &str, start: usize) -> Result<(Vec<ParsedToolCall>, usize)> {
    let mut c = Cursor { s: text, i: start };
    let n = c
        .tag(false, "tool_calls>")
        .ok_or_else(|| c.err("expected <｜DSML｜tool_calls>"))?;
    c.i += n;
    let mut calls = Vec::new();
    loop {
        c.ws();
        if c.i >= text.len() {
            return Err(DsmlError::Unterminated);
        }
        if let Some(n) = c.tag(true, "tool_calls>") {
            c.i += n;
            return Ok((calls, c.i));
        }
        let Some(n) = c.tag(false, "invoke") else {
            if is_prefix_of_any_tag(&text[c.i..]) {
                return Err(DsmlError::Unterminated);
            }
            return Err(c.err("expected an invoke or the end of the block"));
        };
        c.i += n;
        calls.push(parse_invoke(&mut c)?);
    }
}

/// Whether `s` could be the beginning of a tag the block grammar accepts (the
/// generation was cut in the middle of it).
fn is_prefix_of_any_tag(s: &str) -> bool {
    MARKERS.iter().any(|m| {
        ["tool_calls>", "invoke", "parameter"].iter().any(|name| {
            [format!("<{m}{name}"), format!("</{m}{name}")]
                .iter()
                .any(|t| t.starts_with(s))
        })
    })
}

fn parse_invoke(c: &mut Cursor<'_>) -> Result<ParsedToolCall> {
    let attrs = c.attrs()?;
    let name = attrs
        .iter()
        .find(|a| a.0 == "name")
        .map(|a| a.1.to_string())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| c.err("invoke without a name"))?;
    let mut params: Vec<(String, JsonValue)> = Vec::new();
    loop {
        c.ws();
        if c.i >= c.s.len() {
            return Err(DsmlError::Unterminated);
        }
        if let Some(n) = c.tag(true, "invoke>") {
            c.i += n;
            break;
        }
        let Some(n) = c.tag(false, "parameter") else {
            if is_prefix_of_any_tag(&c.s[c.i..]) {
                return Err(DsmlError::Unterminated);
            }
            return Err(c.err("expected a parameter or the end of the invoke"));
        };
        c.i += n;
        let attrs = c.attrs()?;
        let key = attrs
            .iter()
            .find(|a| a.0 == "name")
            .map(|a| a.1.to_string())
            .ok_or_else(|| c.err("parameter without a name"))?;
        // A missing `string` attribute means a string (ds4's reading).
        let is_string = attrs
            .iter()
            .find(|a| a.0 == "string")
            .is_none_or(|a| a.1 != "false");
        let body_start = c.i;
        let (body_len, close_len) =
            find_param_close(&c.s[body_start..]).ok_or(DsmlError::Unterminated)?;
        let raw = &c.s[body_start..body_start + body_len];
        c.i = body_start + body_len + close_len;
        let value = if is_string {
            JsonValue::String(unescape_value(raw))
        } else {
            json::parse(raw).map_err(|e| DsmlError::InvalidParameterJson {
                tool: name.clone(),
                param: key.clone(),
                reason: e.to_string(),
            })?
        };
        if params.iter().any(|p| p.0 == key) {
            return Err(DsmlError::DuplicateParameter {
                tool: name,
                param: key,
            });
        }
        params.push((key, value));
    }
    Ok(ParsedToolCall {
        name,
        arguments: JsonValue::Object(params).to_compact(),
    })
}

/// Finds the first closing parameter tag (any spelling): (offset, tag length).
fn find_param_close(s: &str) -> Option<(usize, usize)> {
    CLOSE_PARAM
        .iter()
        .filter_map(|tag| s.find(tag).map(|i| (i, tag.len())))
        .min_by_key(|&(i, len)| (i, std::cmp::Reverse(len)))
}

/// The only escape in string values: the documented `&lt;/｜DSML｜parameter>`.
fn unescape_value(raw: &str) -> String {
    raw.replace("&lt;/｜DSML｜parameter>", "</｜DSML｜parameter>")
}

// ===========================================================================
// Streaming.

/// What the streaming parser produced for a chunk of generated text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DsmlEvent {
    /// Visible answer text (never contains the beginning of a tool block).
    Content(String),
    /// A tool call started (its invoke tag is complete). `index` counts calls from 0.
    ToolCallBegin {
        /// Position of the call in the block.
        index: usize,
        /// Function name.
        name: String,
    },
    /// A fragment of the call's arguments as JSON text (OpenAI `function.arguments` /
    /// Anthropic `input_json_delta`): `{`, `"key":`, value bytes (JSON-escaped for
    /// string parameters, verbatim for JSON ones), `"`, `,`, `}`. The concatenation of a
    /// call's fragments is a JSON object equal in value to [`ParsedToolCall::arguments`].
    ArgumentsDelta {
        /// Position of the call in the block.
        index: usize,
        /// JSON text to append.
        fragment: String,
    },
    /// A complete, validated tool call (emitted when its invoke closes).
    ToolCall(ParsedToolCall),
    /// The tool-call block closed: generation should stop here.
    BlockClosed,
}

/// Where the streaming parser is inside the block.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum StreamState {
    /// Before the block open tag.
    #[default]
    Content,
    /// Between invokes.
    Between,
    /// Inside an invoke, between parameters.
    Invoke,
    /// Inside a parameter value that starts at `start`; bytes up to `sent` were emitted.
    Value {
        start: usize,
        sent: usize,
        json: bool,
    },
    /// After the block close tag.
    Closed,
}

/// Incremental tool-call parser for the answer part of a generation (feed it the text
/// after `</think>`). Content is released as soon as it cannot be the start of a block
/// marker; arguments stream as JSON fragments while values are generated (holding back
/// what may be the start of a closing tag); each call is also released whole and
/// validated when its invoke closes. The final [`parse_completion`] remains
/// authoritative.
#[derive(Debug, Clone, Default)]
pub struct DsmlStream {
    buf: String,
    state: StreamState,
    /// Offset in `buf` up to which the block was consumed.
    pos: usize,
    released_content: usize,
    plain_xml: bool,
    /// The call being parsed: index, name, parameters so far, current parameter.
    n_calls: usize,
    name: String,
    params: Vec<(String, JsonValue)>,
    key: String,
}

impl DsmlStream {
    /// A parser; `accept_plain_xml` as in [`ParseOptions`].
    pub fn new(accept_plain_xml: bool) -> Self {
        Self {
            plain_xml: accept_plain_xml,
            ..Self::default()
        }
    }

    /// Whether the block has closed.
    pub fn is_closed(&self) -> bool {
        self.state == StreamState::Closed
    }

    /// Whether a tool block has started.
    pub fn in_block(&self) -> bool {
        !matches!(self.state, StreamState::Content | StreamState::Closed)
    }

    /// Feeds generated text; returns the events it completes.
    pub fn push(&mut self, chunk: &str) -> Result<Vec<DsmlEvent>> {
        let mut events = Vec::new();
        if self.state == StreamState::Closed {
            return Ok(events);
        }
        self.buf.push_str(chunk);
        if self.state == StreamState::Content && !self.scan_content(&mut events) {
            return Ok(events);
        }
        while self.step(&mut events)? {}
        Ok(events)
    }

    /// Releases safe content; true when the block open tag was found.
    fn scan_content(&mut self, events: &mut Vec<DsmlEvent>) -> bool {
        // A block cannot start inside released content (see the hold-back rule below),
        // so only the unreleased tail is searched: linear over a long answer.
        let from = self.released_content;
        match find_block_start(&self.buf[from..], self.plain_xml).map(|(i, n)| (from + i, n)) {
            Some((start, open_len)) => {
                // Content before the block, trailing whitespace dropped.
                let end = self.buf[..start]
                    .trim_end()
                    .len()
                    .max(self.released_content);
                if end > self.released_content {
                    events.push(DsmlEvent::Content(
                        self.buf[self.released_content..end].to_string(),
                    ));
                }
                self.released_content = end;
                self.state = StreamState::Between;
                self.pos = start + open_len;
                true
            }
            None => {
                // Hold back trailing whitespace (it may precede a block) and any suffix
                // that could be the start of an open tag.
                let mut safe = self.buf.trim_end().len();
                if let Some(lt) = self.buf[..safe].rfind('<')
                    && is_block_open_prefix(&self.buf[lt..safe], self.plain_xml)
                {
                    safe = lt;
                }
                let safe = self.buf[..safe].trim_end().len().max(self.released_content);
                if safe > self.released_content {
                    events.push(DsmlEvent::Content(
                        self.buf[self.released_content..safe].to_string(),
                    ));
                    self.released_content = safe;
                }
                false
            }
        }
    }

    /// Advances by one element if the buffer holds it; false when more text is needed.
    fn step(&mut self, events: &mut Vec<DsmlEvent>) -> Result<bool> {
        let index = self.n_calls;
        match self.state.clone() {
            StreamState::Content | StreamState::Closed => Ok(false),
            StreamState::Between => {
                let mut c = Cursor {
                    s: &self.buf,
                    i: self.pos,
                };
                c.ws();
                if c.i >= self.buf.len() {
                    return Ok(false);
                }
                if let Some(n) = c.tag(true, "tool_calls>") {
                    self.pos = c.i + n;
                    self.state = StreamState::Closed;
                    events.push(DsmlEvent::BlockClosed);
                    return Ok(false);
                }
                let Some(n) = c.tag(false, "invoke") else {
                    if is_prefix_of_any_tag(&self.buf[c.i..]) {
                        return Ok(false);
                    }
                    return Err(c.err("expected an invoke or the end of the block"));
                };
                c.i += n;
                let attrs = match c.attrs() {
                    Err(DsmlError::Unterminated) => return Ok(false),
                    other => other?,
                };
                let name = attrs
                    .iter()
                    .find(|a| a.0 == "name")
                    .map(|a| a.1.to_string())
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| c.err("invoke without a name"))?;
                self.pos = c.i;
                self.name = name.clone();
                self.params.clear();
                self.state = StreamState::Invoke;
                events.push(DsmlEvent::ToolCallBegin { index, name });
                Ok(true)
            }
            StreamState::Invoke => {
                let mut c = Cursor {
                    s: &self.buf,
                    i: self.pos,
                };
                c.ws();
                if c.i >= self.buf.len() {
                    return Ok(false);
                }
                if let Some(n) = c.tag(true, "invoke>") {
                    self.pos = c.i + n;
                    let fragment = if self.params.is_empty() { "{}" } else { "}" };
                    events.push(DsmlEvent::ArgumentsDelta {
                        index,
                        fragment: fragment.to_string(),
                    });
                    let params = std::mem::take(&mut self.params);
                    events.push(DsmlEvent::ToolCall(ParsedToolCall {
                        name: std::mem::take(&mut self.name),
                        arguments: JsonValue::Object(params).to_compact(),
                    }));
                    self.n_calls += 1;
                    self.state = StreamState::Between;
                    return Ok(true);
                }
                let Some(n) = c.tag(false, "parameter") else {
                    if is_prefix_of_any_tag(&self.buf[c.i..]) {
                        return Ok(false);
                    }
                    return Err(c.err("expected a parameter or the end of the invoke"));
                };
                c.i += n;
                let attrs = match c.attrs() {
                    Err(DsmlError::Unterminated) => return Ok(false),
                    other => other?,
                };
                let key = attrs
                    .iter()
                    .find(|a| a.0 == "name")
                    .map(|a| a.1.to_string())
                    .ok_or_else(|| c.err("parameter without a name"))?;
                let json = attrs
                    .iter()
                    .find(|a| a.0 == "string")
                    .is_some_and(|a| a.1 == "false");
                if self.params.iter().any(|p| p.0 == key) {
                    return Err(DsmlError::DuplicateParameter {
                        tool: self.name.clone(),
                        param: key,
                    });
                }
                let mut fragment = String::from(if self.params.is_empty() { "{" } else { "," });
                json::write_string(&mut fragment, &key);
                fragment.push(':');
                if !json {
                    fragment.push('"');
                }
                events.push(DsmlEvent::ArgumentsDelta { index, fragment });
                self.key = key;
                self.pos = c.i;
                self.state = StreamState::Value {
                    start: c.i,
                    sent: c.i,
                    json,
                };
                Ok(true)
            }
            StreamState::Value { start, sent, json } => {
                // Text before `sent` was released, so it holds no closing tag: search on.
                if let Some((len, close_len)) = find_param_close(&self.buf[sent..]) {
                    let end = sent + len;
                    let raw = &self.buf[start..end];
                    let value = if json {
                        json::parse(raw).map_err(|e| DsmlError::InvalidParameterJson {
                            tool: self.name.clone(),
                            param: self.key.clone(),
                            reason: e.to_string(),
                        })?
                    } else {
                        JsonValue::String(unescape_value(raw))
                    };
                    let mut fragment = value_fragment(&self.buf[sent..end], json);
                    if !json {
                        fragment.push('"');
                    }
                    events.push(DsmlEvent::ArgumentsDelta { index, fragment });
                    self.params.push((std::mem::take(&mut self.key), value));
                    self.pos = end + close_len;
                    self.state = StreamState::Invoke;
                    return Ok(true);
                }
                // Hold back what may begin the closing tag (or, in strings, the escape).
                let tail_len = self.buf[sent..]
                    .char_indices()
                    .map(|(i, _)| &self.buf[sent + i..])
                    .find(|t| {
                        CLOSE_PARAM.iter().any(|tag| tag.starts_with(t))
                            || (!json && "&lt;/｜DSML｜parameter>".starts_with(t))
                    })
                    .map_or(0, str::len);
                let safe = self.buf.len() - tail_len;
                if safe > sent {
                    events.push(DsmlEvent::ArgumentsDelta {
                        index,
                        fragment: value_fragment(&self.buf[sent..safe], json),
                    });
                    self.state = StreamState::Value {
                        start,
                        sent: safe,
                        json,
                    };
                }
                Ok(false)
            }
        }
    }

    /// Ends the stream: releases held-back content, or reports an unterminated block.
    pub fn finish(&mut self) -> Result<Vec<DsmlEvent>> {
        match self.state {
            StreamState::Content => {
                let mut events = Vec::new();
                if self.buf.len() > self.released_content {
                    events.push(DsmlEvent::Content(
                        self.buf[self.released_content..].to_string(),
                    ));
                    self.released_content = self.buf.len();
                }
                Ok(events)
            }
            StreamState::Closed => Ok(Vec::new()),
            _ => Err(DsmlError::Unterminated),
        }
    }
}

/// A value chunk as JSON text: strings unescaped (the one documented escape) and
/// JSON-escaped without quotes; JSON values verbatim.
fn value_fragment(raw: &str, json: bool) -> String {
    if json {
        return raw.to_string();
    }
    let mut quoted = String::new();
    json::write_string(&mut quoted, &unescape_value(raw));
    quoted[1..quoted.len() - 1].to_string()
}

fn is_block_open_prefix(s: &str, plain_xml: bool) -> bool {
    OPEN_BLOCK
        .iter()
        .take(if plain_xml { 3 } else { 2 })
        .any(|tag| tag.starts_with(s))
}

// ===========================================================================
// Forced greedy decoding inside DSML (PROMPT.md §3.3).

/// Where generated text stands relative to a DSML tool block, for sampling decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsmlRegion {
    /// No block started, or the block finished: request settings.
    Outside,
    /// Inside the block's markup (tags, attributes, between elements) or at a possible
    /// closing tag: greedy.
    Structural,
    /// Inside a `string="true"` value: request settings.
    StringBody,
    /// Inside a JSON value outside string literals: greedy.
    JsonStructural,
    /// Inside a string literal of a JSON value: request settings.
    JsonString,
}

impl DsmlRegion {
    /// Whether the next token should be sampled greedily.
    pub fn force_greedy(self) -> bool {
        matches!(self, DsmlRegion::Structural | DsmlRegion::JsonStructural)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrackState {
    WaitThinkEnd,
    Outside,
    Markup,
    Value {
        json: bool,
        in_str: bool,
        escape: bool,
    },
    Done,
}

/// Tracks generated text and says, before each token, whether it is inside DSML markup
/// (sample greedily so calls stay parseable) or inside a payload (sample normally so
/// long payloads do not loop). Unlike ds4 (GAP-T9), with `thinking` it only starts
/// after `</think>`, so DSML quoted in the reasoning does not switch it on.
#[derive(Debug, Clone)]
pub struct DsmlGreedyTracker {
    state: TrackState,
    /// Text not yet fully classified (the tail that may hold a partial marker), or the
    /// current tag / value in the block.
    buf: String,
}

impl DsmlGreedyTracker {
    /// A tracker; `thinking` = the prompt ended with `<think>`.
    pub fn new(thinking: bool) -> Self {
        Self {
            state: if thinking {
                TrackState::WaitThinkEnd
            } else {
                TrackState::Outside
            },
            buf: String::new(),
        }
    }

    /// The region the next token will be generated in.
    pub fn region(&self) -> DsmlRegion {
        match self.state {
            TrackState::WaitThinkEnd | TrackState::Outside | TrackState::Done => {
                DsmlRegion::Outside
            }
            TrackState::Markup => DsmlRegion::Structural,
            TrackState::Value { json, in_str, .. } => {
                // Two or more bytes that may begin the closing tag: let the model close
                // it deterministically.
                let tail = self.buf.rfind("</").map(|i| &self.buf[i..]);
                if tail.is_some_and(is_close_param_prefix) {
                    DsmlRegion::Structural
                } else if !json {
                    DsmlRegion::StringBody
                } else if in_str {
                    DsmlRegion::JsonString
                } else {
                    DsmlRegion::JsonStructural
                }
            }
        }
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, text: &str) {
        for c in text.chars() {
            self.push_char(c);
        }
    }

    fn push_char(&mut self, c: char) {
        match self.state {
            TrackState::Done => {}
            TrackState::WaitThinkEnd => {
                self.buf.push(c);
                if self.buf.ends_with(THINK_END_TEXT) {
                    self.buf.clear();
                    self.state = TrackState::Outside;
                } else {
                    keep_tail(&mut self.buf, THINK_END_TEXT.len());
                }
            }
            TrackState::Outside => {
                self.buf.push(c);
                if OPEN_BLOCK[..2].iter().any(|tag| self.buf.ends_with(tag)) {
                    self.buf.clear();
                    self.state = TrackState::Markup;
                } else {
                    keep_tail(&mut self.buf, 32);
                }
            }
            TrackState::Markup => {
                self.buf.push(c);
                if c != '>' {
                    return;
                }
                let tag = self.buf.rfind('<').map_or("", |i| &self.buf[i..]);
                let close = MARKERS
                    .iter()
                    .any(|m| tag.starts_with(&format!("</{m}tool_calls")));
                let param = MARKERS
                    .iter()
                    .filter(|m| !m.is_empty())
                    .any(|m| tag.starts_with(&format!("<{m}parameter")));
                if close {
                    self.state = TrackState::Done;
                } else if param {
                    // Only an explicit string="true" is a raw string; anything else is JSON.
                    let json = !tag.contains("string=\"true\"");
                    self.state = TrackState::Value {
                        json,
                        in_str: false,
                        escape: false,
                    };
                }
                self.buf.clear();
            }
            TrackState::Value {
                json,
                mut in_str,
                mut escape,
            } => {
                self.buf.push(c);
                if let Some(i) = self.buf.rfind("</")
                    && CLOSE_PARAM.contains(&&self.buf[i..])
                {
                    self.buf.clear();
                    self.state = TrackState::Markup;
                    return;
                }
                if json {
                    if in_str {
                        if escape {
                            escape = false;
                        } else if c == '\\' {
                            escape = true;
                        } else if c == '"' {
                            in_str = false;
                        }
                    } else if c == '"' {
                        in_str = true;
                    }
                }
                self.state = TrackState::Value {
                    json,
                    in_str,
                    escape,
                };
                keep_tail(&mut self.buf, 32);
            }
        }
    }
}

fn is_close_param_prefix(tail: &str) -> bool {
    tail.len() >= 2 && CLOSE_PARAM.iter().any(|tag| tag.starts_with(tail))
}

/// Keeps at most the last `n` bytes of `buf` (on a char boundary).
fn keep_tail(buf: &mut String, n: usize) {
    if buf.len() > n * 2 {
        let mut cut = buf.len() - n;
        while !buf.is_char_boundary(cut) {
            cut += 1;
        }
        buf.drain(..cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_empty_and_non_object_arguments() {
        assert_eq!(render_arguments("{}"), "");
        assert_eq!(
            render_arguments("[1,2]"),
            "<｜DSML｜parameter name=\"arguments\" string=\"true\">[1,2]</｜DSML｜parameter>"
        );
        let block = render_tool_calls(&[ToolCall {
            id: None,
            name: "now".into(),
            arguments: "{}".into(),
        }]);
        assert_eq!(
            block,
            "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
        );
    }

    #[test]
    fn greedy_tracker_follows_the_block() {
        let mut t = DsmlGreedyTracker::new(true);
        let mut regions = Vec::new();
        for piece in [
            "I will call <｜DSML｜tool_calls> in reasoning",
            "</think>",
            "Ok.\n\n<｜DSML｜tool_calls>",
            "\n<｜DSML｜invoke name=\"f\">\n<｜DSML｜parameter name=\"s\" string=\"true\">",
            "text",
            "<",
            "/",
            "｜DSML｜parameter>",
            "\n<｜DSML｜parameter name=\"j\" string=\"false\">",
            "{\"a\": \"",
            "x\\\"y",
            "\"}",
            "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
        ] {
            t.push(piece);
            regions.push(t.region());
        }
        use DsmlRegion::*;
        assert_eq!(
            regions,
            [
                Outside,
                Outside,
                Structural,
                StringBody,
                StringBody,
                StringBody,
                Structural,
                Structural,
                JsonStructural,
                JsonString,
                JsonString,
                JsonStructural,
                Outside
            ]
        );
    }
}
