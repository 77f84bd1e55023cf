//! DSML rendering/parsing and the Python-compatible JSON writer.
//!
//! `json_dumps.json` comes from `tests/fixtures/tokenizer/regenerate.py` (CPython's
//! `json.dumps(json.loads(text), ensure_ascii=False)`).

use std::path::PathBuf;

use ds4_model::dsml::{
    DsmlEvent, ParseOptions, ToolCall, json, parse_completion, render_tool_calls,
    render_tool_calls_ds4,
};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer")
}

#[test]
fn python_json_dumps_matches_cpython() {
    let raw = std::fs::read(fixture_dir().join("json_dumps.json")).expect("json_dumps.json");
    let doc: Value = serde_json::from_slice(&raw).expect("json");
    assert_eq!(doc["schema"], "ds4-json-dumps-v1");
    let cases = doc["cases"].as_array().expect("cases");
    for c in cases {
        let text = c["json"].as_str().expect("json");
        let want = c["python"].as_str().expect("python");
        let v = json::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(v.to_python(), want, "json.dumps of {text:?}");
    }
    assert!(cases.len() > 200);
}

#[test]
fn rendered_calls_parse_back_to_the_same_arguments() {
    let calls = [
        ToolCall {
            id: None,
            name: "edit".into(),
            arguments: r#"{"path":"a.html","text":"<p>a &amp; b</p>\n  if (x && y) {}\n","line":12,"opts":{"dry":false,"tags":["x","y"]},"none":null}"#.into(),
        },
        ToolCall {
            id: None,
            name: "now".into(),
            arguments: "{}".into(),
        },
        ToolCall {
            id: None,
            name: "ratio".into(),
            arguments: r#"{"v":1e5,"w":-0.5}"#.into(),
        },
    ];
    let block = render_tool_calls(&calls);
    let parsed = parse_completion(
        &format!("Doing it.{block}"),
        ParseOptions {
            tools: true,
            ..ParseOptions::default()
        },
    )
    .expect("parse");
    assert_eq!(parsed.content, "Doing it.");
    assert_eq!(parsed.tool_block.as_deref(), Some(block.as_str()));
    assert_eq!(parsed.tool_calls.len(), calls.len());
    for (got, want) in parsed.tool_calls.iter().zip(&calls) {
        assert_eq!(got.name, want.name);
        // Non-string values went through Python formatting (1e5 -> 100000.0), so
        // compare as JSON values.
        let g: Value = serde_json::from_str(&got.arguments).expect("parsed args are JSON");
        let w: Value = serde_json::from_str(&want.arguments).expect("input args are JSON");
        assert_eq!(g, w, "{}", want.name);
    }
    // Key order is the model's order, not sorted.
    assert!(
        parsed.tool_calls[0]
            .arguments
            .starts_with(r#"{"path":"a.html","text":"#)
    );
}

#[test]
fn parser_never_panics_on_mangled_blocks() {
    // Official rendering (string values raw: the format cannot carry the closing tag).
    check_mangled_and_streamed(&render_tool_calls(&calls(r#""x < y \"q\"\n""#)));
    // ds4 rendering escapes a closing tag inside a string value; it must come back intact.
    let block = render_tool_calls_ds4(&calls(r#""a </｜DSML｜parameter> b""#));
    assert!(block.contains("a &lt;/｜DSML｜parameter> b"));
    check_mangled_and_streamed(&block);
    let opts = ParseOptions {
        tools: true,
        ..ParseOptions::default()
    };
    let parsed = parse_completion(&block, opts).expect("parse");
    let args: Value = serde_json::from_str(&parsed.tool_calls[0].arguments).expect("json");
    assert_eq!(args["s"], "a </｜DSML｜parameter> b");
}

fn calls(string_value: &str) -> Vec<ToolCall> {
    vec![
        ToolCall {
            id: None,
            name: "f".into(),
            arguments: format!(r#"{{"s":{string_value},"n":[1,{{"k":"v"}}]}}"#),
        },
        ToolCall {
            id: None,
            name: "g".into(),
            arguments: "{}".into(),
        },
    ]
}

/// Cuts and corrupts `block` at every position: the parsers must return Ok or Err, never
/// panic; streamed in two parts split anywhere, the stream must agree with the final
/// parse, argument fragments included.
fn check_mangled_and_streamed(block: &str) {
    let text = format!("hi{block}");
    let opts = ParseOptions {
        tools: true,
        ..ParseOptions::default()
    };
    let boundaries: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    for &i in &boundaries {
        let variants = [
            text[..i].to_string(),
            format!("{}{}", &text[..i], &text[i..].replacen('>', "", 1)),
            format!("{}\"{}", &text[..i], &text[i..]),
            format!("{}{}", &text[..i], &text[i..].replacen("｜DSML｜", "", 1)),
        ];
        for v in variants {
            let _ = parse_completion(&v, opts);
            let mut stream = ds4_model::dsml::DsmlStream::new(false);
            let mid = v
                .char_indices()
                .nth(v.chars().count() / 2)
                .map_or(v.len(), |c| c.0);
            let _ = stream.push(&v[..mid]);
            let _ = stream.push(&v[mid..]);
            let _ = stream.finish();
        }
    }
    // Streaming a valid text split at every boundary gives the final parse's calls.
    let full = parse_completion(&text, opts).expect("valid");
    let want: Value = serde_json::from_str(&calls("null")[0].arguments).expect("json");
    let got: Value = serde_json::from_str(&full.tool_calls[0].arguments).expect("json");
    assert_eq!(got["n"], want["n"]);
    for &i in &boundaries {
        let mut stream = ds4_model::dsml::DsmlStream::new(false);
        let mut calls = Vec::new();
        let mut deltas = vec![String::new(); full.tool_calls.len()];
        for part in [&text[..i], &text[i..]] {
            for ev in stream.push(part).expect("stream") {
                match ev {
                    DsmlEvent::ToolCall(c) => calls.push(c),
                    DsmlEvent::ArgumentsDelta { index, fragment } => {
                        deltas[index].push_str(&fragment)
                    }
                    _ => {}
                }
            }
        }
        assert!(stream.is_closed());
        assert_eq!(calls, full.tool_calls, "split at {i}");
        // The streamed argument fragments form the same JSON value.
        for (d, call) in deltas.iter().zip(&full.tool_calls) {
            let streamed: Value = serde_json::from_str(d).unwrap_or_else(|e| panic!("{d:?}: {e}"));
            let whole: Value = serde_json::from_str(&call.arguments).expect("json");
            assert_eq!(streamed, whole, "split at {i}");
        }
    }
}

#[test]
fn streaming_is_linear_in_the_text_length() {
    // 400 KB of answer then a call with a 400 KB string value, fed in 4-byte chunks:
    // quadratic rescanning would take minutes here.
    let body = "lorem ipsum <b>dolor</b> sit amet\n".repeat(12_000);
    let text = format!(
        "{body}\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"write\">\n<｜DSML｜parameter name=\"text\" string=\"true\">{body}</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    );
    let mut stream = ds4_model::dsml::DsmlStream::new(false);
    let (mut content, mut args) = (String::new(), String::new());
    let chars: Vec<char> = text.chars().collect();
    for chunk in chars.chunks(4) {
        for ev in stream
            .push(&chunk.iter().collect::<String>())
            .expect("push")
        {
            match ev {
                DsmlEvent::Content(t) => content.push_str(&t),
                DsmlEvent::ArgumentsDelta { fragment, .. } => args.push_str(&fragment),
                _ => {}
            }
        }
    }
    assert!(stream.is_closed());
    assert_eq!(content, body.trim_end());
    let v: Value = serde_json::from_str(&args).expect("json");
    assert_eq!(v["text"], body.as_str());
}
