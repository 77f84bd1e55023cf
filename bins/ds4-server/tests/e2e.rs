//! End to end: the real binary on 127.0.0.1:0 with the embedded demo model (real
//! tokenizer, random weights), driven over a plain TCP socket: health, a streaming chat
//! request, a non-streaming Anthropic request, auth, and graceful shutdown on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

struct Server {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ds4-server"))
        .args(["--port", "0", "--ctx", "2048"])
        .args(extra)
        .env_remove("DS4_API_KEY")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ds4-server");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("server log line");
        if let Some(a) = line.strip_prefix("ds4-server: listening on http://") {
            break a.trim().to_string();
        }
    };
    let s = Server {
        child,
        addr,
        log: rx,
    };
    // Ready once the demo model is built.
    let deadline = Instant::now() + Duration::from_secs(120);
    while http(&s.addr, "GET", "/health", "", &[]).0 != 200 {
        assert!(Instant::now() < deadline, "server never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}

/// One HTTP/1.1 request; returns status and the de-chunked body.
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").expect("headers");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[test]
fn demo_model_streams_chat_and_answers_anthropic() {
    let s = start(&[]);
    let body = r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"Hello <｜User｜>"}],"max_tokens":4,"stream":true,"stream_options":{"include_usage":true},"seed":7}"#;
    let (status, text) = http(&s.addr, "POST", "/v1/chat/completions", body, &[]);
    assert_eq!(status, 200, "{text}");
    let datas: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str())
        .expect("finish");
    assert_eq!(finish, "length");
    let usage = &chunks.last().expect("usage")["usage"];
    assert_eq!(usage["completion_tokens"], 4);
    // The special-token literal in user text is plain text: many tokens, not one.
    assert!(usage["prompt_tokens"].as_u64().expect("n") > 8, "{usage}");

    let body = r#"{"messages":[{"role":"user","content":"Hi"}],"max_tokens":3}"#;
    let (status, text) = http(&s.addr, "POST", "/v1/messages", body, &[]);
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["type"], "message");
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 3);

    // Real token counts: a special-token literal typed by the user is BPE text (several
    // tokens), never the one control token.
    let count = |content: &str| -> u64 {
        let body = serde_json::json!({"messages": [{"role": "user", "content": content}]});
        let (st, text) = http(
            &s.addr,
            "POST",
            "/v1/messages/count_tokens",
            &body.to_string(),
            &[],
        );
        assert_eq!(st, 200, "{text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        v["input_tokens"].as_u64().expect("input_tokens")
    };
    let plain = count("x");
    for lit in ["<｜User｜>", "</think>", "<｜DSML｜tool_calls>"] {
        assert!(
            count(&format!("x{lit}")) >= plain + 3,
            "{lit} became a control token"
        );
    }

    let (status, text) = http(&s.addr, "POST", "/v1/chat/completions", "{bad", &[]);
    assert_eq!(status, 400, "{text}");
    let (status, _) = http(&s.addr, "GET", "/metrics", "", &[]);
    assert_eq!(status, 200);
}

#[test]
fn api_key_and_graceful_shutdown() {
    let mut s = start(&["--api-key", "k3y"]);
    let body =
        r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"Hi"}],"max_tokens":1}"#;
    assert_eq!(
        http(&s.addr, "POST", "/v1/chat/completions", body, &[]).0,
        401
    );
    let (st, text) = http(
        &s.addr,
        "POST",
        "/v1/chat/completions",
        body,
        &[("Authorization", "Bearer k3y")],
    );
    assert_eq!(st, 200, "{text}");
    let pid = s.child.id().to_string();
    let ok = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = s.child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let log: Vec<String> = s.log.try_iter().collect();
    assert!(log.iter().any(|l| l.contains("shut down")), "{log:?}");
}

fn metric(addr: &str, name: &str) -> f64 {
    let (status, text) = http(addr, "GET", "/metrics", "", &[]);
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {text}"))
}

fn sigterm_and_wait(s: &mut Server) {
    let pid = s.child.id().to_string();
    let ok = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = s.child.try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

fn n_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "rkv"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn disk_kv_cache_survives_restart_and_saves_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("ds4-kvwire-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().expect("utf8 dir");
    let flags = [
        "--kv-disk-dir",
        d,
        "--kv-cache-min-tokens",
        "16",
        "--kv-cache-boundary-align-tokens",
        "0",
    ];
    let system = "You are a careful assistant. ".repeat(12);
    let body = serde_json::json!({
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Say something."}
        ],
        "max_tokens": 6,
        // Thinking mode ignores temperature; a fixed seed makes the sampler reproducible,
        // so equal outputs mean equal logits after the restored prefix.
        "temperature": 0,
        "seed": 7
    })
    .to_string();
    let content = |text: &str| -> String {
        let v: Value = serde_json::from_str(text).expect("json");
        v["choices"][0]["message"].to_string()
    };

    // Uncached run: a cold save of the stable prefix.
    let mut a = start(&flags);
    let (st, first) = http(&a.addr, "POST", "/v1/chat/completions", &body, &[]);
    assert_eq!(st, 200, "{first}");
    assert_eq!(metric(&a.addr, "ds4_kv_cache_misses_total"), 1.0);
    assert_eq!(metric(&a.addr, "ds4_kv_cache_hits_total"), 0.0);
    sigterm_and_wait(&mut a);
    drop(a);
    let after_first = n_files(&dir);
    // The cold save of the prompt prefix and the shutdown save of the live session.
    assert!(after_first >= 2, "{after_first} cache files in {d}");

    // Restarted server, same directory: the prefix comes from disk, same greedy output.
    let mut b = start(&flags);
    let (st, second) = http(&b.addr, "POST", "/v1/chat/completions", &body, &[]);
    assert_eq!(st, 200, "{second}");
    assert_eq!(content(&first), content(&second));
    assert_eq!(metric(&b.addr, "ds4_kv_cache_hits_total"), 1.0);
    assert!(metric(&b.addr, "ds4_kv_cache_reused_tokens_total") > 0.0);
    assert!(metric(&b.addr, "ds4_kv_cache_disk_bytes") > 0.0);
    assert!(
        metric(&b.addr, "ds4_kv_cache_budget_bytes") > metric(&b.addr, "ds4_kv_cache_disk_bytes")
    );
    let v: Value = serde_json::from_str(&second).expect("json");
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{second}"
    );
    sigterm_and_wait(&mut b);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// JSON payloads of the `data:` lines of an SSE body (`[DONE]` skipped).
fn sse_data(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("event json"))
        .collect()
}

const OA_TOOLS: &str = r#"[{"type":"function","function":{"name":"get_weather","description":"Weather for a city.","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}},{"type":"function","function":{"name":"get_time","parameters":{"type":"object","properties":{}}}}]"#;
const AN_TOOLS: &str = r#"[{"name":"get_weather","description":"Weather for a city.","input_schema":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}},{"name":"get_time","input_schema":{"type":"object","properties":{}}}]"#;
const RS_TOOLS: &str = r#"[{"type":"function","name":"get_weather","description":"Weather for a city.","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}},{"type":"function","name":"get_time","parameters":{"type":"object","properties":{}}}]"#;

fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    http(addr, "POST", path, body, &[])
}

/// OpenAI chat: the tool names called (non-streaming or streaming) and the finish reason.
fn openai_calls(addr: &str, choice: &str, stream: bool, model: &str) -> (Vec<String>, String) {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Weather in Rome?"}}],"max_tokens":64,"seed":11,"tools":{OA_TOOLS},"tool_choice":{choice},"stream":{stream}}}"#
    );
    let (st, text) = post(addr, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{text}");
    if !stream {
        let v: Value = serde_json::from_str(&text).expect("json");
        let msg = &v["choices"][0]["message"];
        let names = msg["tool_calls"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        let args: Value = serde_json::from_str(
                            c["function"]["arguments"].as_str().expect("arguments"),
                        )
                        .expect("arguments are JSON");
                        assert!(args.is_object(), "{args}");
                        c["function"]["name"].as_str().expect("name").to_string()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let finish = v["choices"][0]["finish_reason"].as_str().expect("finish");
        return (names, finish.to_string());
    }
    let chunks = sse_data(&text);
    // No `stream_options.include_usage`: no usage chunk.
    assert!(
        chunks.iter().all(|c| c["usage"].is_null()),
        "usage sent without include_usage"
    );
    let mut names = Vec::new();
    let mut finish = String::new();
    for c in &chunks {
        if let Some(calls) = c["choices"][0]["delta"]["tool_calls"].as_array() {
            for call in calls {
                if let Some(n) = call["function"]["name"].as_str() {
                    names.push(n.to_string());
                }
            }
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (names, finish)
}

/// Anthropic messages: tool_use names and the stop reason.
fn anthropic_calls(addr: &str, choice: &str, stream: bool, model: &str) -> (Vec<String>, String) {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":64,"messages":[{{"role":"user","content":"Weather in Rome?"}}],"tools":{AN_TOOLS},"tool_choice":{choice},"stream":{stream}}}"#
    );
    let (st, text) = post(addr, "/v1/messages", &body);
    assert_eq!(st, 200, "{text}");
    if !stream {
        let v: Value = serde_json::from_str(&text).expect("json");
        let names = v["content"]
            .as_array()
            .expect("content")
            .iter()
            .filter(|b| b["type"] == "tool_use")
            .map(|b| {
                assert!(b["input"].is_object(), "{b}");
                assert!(b["id"].as_str().is_some_and(|i| i.starts_with("toolu_")));
                b["name"].as_str().expect("name").to_string()
            })
            .collect();
        return (names, v["stop_reason"].as_str().expect("stop").to_string());
    }
    let mut names = Vec::new();
    let mut stop = String::new();
    for e in sse_data(&text) {
        if e["type"] == "content_block_start" && e["content_block"]["type"] == "tool_use" {
            names.push(
                e["content_block"]["name"]
                    .as_str()
                    .expect("name")
                    .to_string(),
            );
        }
        if e["type"] == "message_delta" {
            stop = e["delta"]["stop_reason"].as_str().unwrap_or("").to_string();
        }
    }
    (names, stop)
}

/// Responses: function_call names and the final status.
fn responses_calls(addr: &str, choice: &str, stream: bool, model: &str) -> (Vec<String>, String) {
    let body = format!(
        r#"{{"model":"{model}","input":"Weather in Rome?","max_output_tokens":64,"tools":{RS_TOOLS},"tool_choice":{choice},"stream":{stream}}}"#
    );
    let (st, text) = post(addr, "/v1/responses", &body);
    assert_eq!(st, 200, "{text}");
    let calls = |resp: &Value| -> Vec<String> {
        resp["output"]
            .as_array()
            .expect("output")
            .iter()
            .filter(|i| i["type"] == "function_call")
            .map(|i| {
                assert!(
                    i["call_id"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("call_"))
                );
                i["name"].as_str().expect("name").to_string()
            })
            .collect()
    };
    if !stream {
        let v: Value = serde_json::from_str(&text).expect("json");
        return (calls(&v), v["status"].as_str().expect("status").to_string());
    }
    let events = sse_data(&text);
    let last = events.last().expect("events");
    // What Codex CLI's SSE reader relies on: `response.created` carries the response,
    // every `output_item.done` a complete item, the terminal event the id and usage.
    assert_eq!(events[0]["type"], "response.created");
    assert!(events[0]["response"]["id"].is_string());
    for e in events
        .iter()
        .filter(|e| e["type"] == "response.output_item.done")
    {
        let item = &e["item"];
        if item["type"] == "function_call" {
            for k in ["call_id", "name", "arguments"] {
                assert!(item[k].is_string(), "{item}");
            }
        }
    }
    for k in ["input_tokens", "output_tokens", "total_tokens"] {
        assert!(last["response"]["usage"][k].is_u64(), "{last}");
    }
    let seq: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().expect("sequence_number"))
        .collect();
    assert_eq!(seq, (0..events.len() as u64).collect::<Vec<_>>());
    // Streamed items agree with the final response.
    let added: Vec<String> = events
        .iter()
        .filter(|e| {
            e["type"] == "response.output_item.added" && e["item"]["type"] == "function_call"
        })
        .map(|e| e["item"]["name"].as_str().expect("name").to_string())
        .collect();
    let resp = &last["response"];
    assert_eq!(added, calls(resp), "{text}");
    (
        calls(resp),
        resp["status"].as_str().expect("status").to_string(),
    )
}

#[test]
fn tool_choice_required_and_named_are_enforced_on_every_api() {
    // The demo model has random weights: it never calls a tool by itself, so every call
    // below comes from the constrained decoding.
    let s = start(&[]);
    let a = &s.addr;
    let any = ["get_weather".to_string(), "get_time".to_string()];
    for stream in [false, true] {
        let (names, finish) = openai_calls(a, r#""required""#, stream, "deepseek-chat");
        assert!(names.len() == 1 && any.contains(&names[0]), "{names:?}");
        assert_eq!(finish, "tool_calls");
        let named = r#"{"type":"function","function":{"name":"get_weather"}}"#;
        let (names, finish) = openai_calls(a, named, stream, "deepseek-chat");
        assert_eq!(names, ["get_weather"], "stream={stream}");
        assert_eq!(finish, "tool_calls");
        // Thinking on: the reasoning is ended by force within the budget.
        let (names, _) = openai_calls(a, named, stream, "deepseek-reasoner");
        assert_eq!(names, ["get_weather"], "thinking, stream={stream}");
        let (names, _) = openai_calls(a, r#""none""#, stream, "deepseek-chat");
        assert!(names.is_empty());

        let (names, stop) = anthropic_calls(a, r#"{"type":"any"}"#, stream, "deepseek-chat");
        assert!(names.len() == 1 && any.contains(&names[0]), "{names:?}");
        assert_eq!(stop, "tool_use");
        let named = r#"{"type":"tool","name":"get_time"}"#;
        let (names, stop) = anthropic_calls(a, named, stream, "deepseek-reasoner");
        assert_eq!(names, ["get_time"], "stream={stream}");
        assert_eq!(stop, "tool_use");
        let (names, _) = anthropic_calls(a, r#"{"type":"none"}"#, stream, "deepseek-chat");
        assert!(names.is_empty());

        let (names, status) = responses_calls(a, r#""required""#, stream, "deepseek-chat");
        assert!(names.len() == 1 && any.contains(&names[0]), "{names:?}");
        assert_eq!(status, "completed");
        let named = r#"{"type":"function","name":"get_weather"}"#;
        let (names, _) = responses_calls(a, named, stream, "deepseek-v4-flash");
        assert_eq!(names, ["get_weather"], "stream={stream}");
        let (names, _) = responses_calls(a, r#""none""#, stream, "deepseek-chat");
        assert!(names.is_empty());
    }

    // An unknown named tool, or a mandatory call without tools: 400 in each shape.
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"x"}}],"tools":{OA_TOOLS},"tool_choice":{{"type":"function","function":{{"name":"nope"}}}}}}"#
    );
    let (st, text) = post(a, "/v1/chat/completions", &body);
    assert_eq!(st, 400, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "tool_choice");
    let body = r#"{"messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#;
    assert_eq!(post(a, "/v1/chat/completions", body).0, 400);
    let body = format!(
        r#"{{"max_tokens":8,"messages":[{{"role":"user","content":"x"}}],"tools":{AN_TOOLS},"tool_choice":{{"type":"tool","name":"nope"}}}}"#
    );
    let (st, text) = post(a, "/v1/messages", &body);
    assert_eq!(st, 400, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let body = format!(
        r#"{{"input":"x","tools":{RS_TOOLS},"tool_choice":{{"type":"function","name":"nope"}}}}"#
    );
    let (st, text) = post(a, "/v1/responses", &body);
    assert_eq!(st, 400, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

/// `(rendered prompt, generated text)` of every request in a `--trace` file.
fn trace_entries(path: &std::path::Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).expect("trace file");
    text.split("===== request ")
        .skip(1)
        .map(|e| {
            let between = |a: &str, b: &str| -> String {
                let start = e.find(a).expect("section") + a.len();
                let end = start + e[start..].find(b).expect("section end");
                // Each section ends with the newline the trace adds.
                e[start..end]
                    .strip_suffix('\n')
                    .unwrap_or(&e[start..end])
                    .to_string()
            };
            (
                between("--- rendered prompt ---\n", "--- generated text ---"),
                between("--- generated text ---\n", "--- parsed message ---"),
            )
        })
        .collect()
}

/// Turn 2 of a tool loop must re-render turn 1's prompt and sampled DSML byte for byte
/// and reuse the whole live session: cached tokens = turn-1 prompt + generated tokens
/// (but the last, never fed).
fn check_turn2(trace: &std::path::Path, turn1: (u64, u64), turn2_cached: u64, what: &str) {
    let entries = trace_entries(trace);
    let (p1, g1) = &entries[entries.len() - 2];
    let (p2, _) = &entries[entries.len() - 1];
    assert!(g1.contains("<｜DSML｜tool_calls>"), "{what}: {g1:?}");
    if std::env::var("DS4_KEEP_TRACE").is_ok() {
        let _ = std::fs::copy(trace, "/tmp/ds4-trace-debug.txt");
    }
    assert!(
        p2.starts_with(&format!("{p1}{g1}<｜end▁of▁sentence｜>")),
        "{what}: turn 2 does not replay turn 1 exactly:\n{p1}{g1}\n---\n{p2}"
    );
    // The token that closed the block ended generation before being fed; turn 2's
    // prompt supplies it, so everything else is reused.
    assert_eq!(turn2_cached, turn1.0 + turn1.1 - 1, "{what}: reused tokens");
}

#[test]
fn multi_turn_tool_history_reuses_the_live_prefix_on_every_api() {
    let trace = std::env::temp_dir().join(format!("ds4-e2e-trace-{}.txt", std::process::id()));
    let _ = std::fs::remove_file(&trace);
    let s = start(&["--trace", trace.to_str().expect("utf8")]);
    let a = &s.addr;
    let u = |v: &Value, k: &str| v.pointer(k).and_then(Value::as_u64).expect(k);

    // OpenAI chat completions.
    let q = r#"{"role":"user","content":"Weather in Rome?"}"#;
    let body = format!(
        r#"{{"model":"deepseek-chat","messages":[{q}],"max_tokens":48,"seed":5,"tools":{OA_TOOLS},"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}}}"#
    );
    let (st, text) = post(a, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let turn1 = (
        u(&v, "/usage/prompt_tokens"),
        u(&v, "/usage/completion_tokens"),
    );
    let msg = v["choices"][0]["message"].clone();
    let id = msg["tool_calls"][0]["id"].as_str().expect("id").to_string();
    let body = format!(
        r#"{{"model":"deepseek-chat","messages":[{q},{msg},{{"role":"tool","tool_call_id":"{id}","content":"21 C, sunny"}}],"max_tokens":2,"tools":{OA_TOOLS}}}"#
    );
    let (st, text) = post(a, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let cached = u(&v, "/usage/prompt_tokens_details/cached_tokens");
    check_turn2(&trace, turn1, cached, "openai");

    // Anthropic messages: tool_use / tool_result blocks.
    let body = format!(
        r#"{{"model":"deepseek-chat","max_tokens":48,"messages":[{q}],"tools":{AN_TOOLS},"tool_choice":{{"type":"tool","name":"get_weather"}}}}"#
    );
    let (st, text) = post(a, "/v1/messages", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    // Anthropic input_tokens counts the prompt tokens not read from the cache.
    let p1 = u(&v, "/usage/input_tokens") + u(&v, "/usage/cache_read_input_tokens");
    let turn1 = (p1, u(&v, "/usage/output_tokens"));
    let content = v["content"].clone();
    let tool = content
        .as_array()
        .expect("content")
        .iter()
        .find(|b| b["type"] == "tool_use")
        .expect("tool_use");
    let id = tool["id"].as_str().expect("id");
    let body = format!(
        r#"{{"model":"deepseek-chat","max_tokens":2,"messages":[{q},{{"role":"assistant","content":{content}}},{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"{id}","content":"21 C, sunny"}}]}}],"tools":{AN_TOOLS}}}"#
    );
    let (st, text) = post(a, "/v1/messages", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let cached = u(&v, "/usage/cache_read_input_tokens");
    check_turn2(&trace, turn1, cached, "anthropic");
    assert!(
        u(&v, "/usage/input_tokens") > 0,
        "the tool result is new input"
    );

    // Anthropic with thinking: the thinking block goes back with the tool_use block and
    // is rendered where the model wrote it (tools keep the reasoning in the history).
    let body = format!(
        r#"{{"model":"deepseek-v4-flash","max_tokens":80,"messages":[{q}],"tools":{AN_TOOLS},"tool_choice":{{"type":"tool","name":"get_weather"}}}}"#
    );
    let (st, text) = post(a, "/v1/messages", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let p1 = u(&v, "/usage/input_tokens") + u(&v, "/usage/cache_read_input_tokens");
    let turn1 = (p1, u(&v, "/usage/output_tokens"));
    let content = v["content"].clone();
    assert_eq!(content[0]["type"], "thinking", "{content}");
    let id = content
        .as_array()
        .expect("content")
        .iter()
        .find(|b| b["type"] == "tool_use")
        .and_then(|b| b["id"].as_str())
        .expect("tool_use id");
    let body = format!(
        r#"{{"model":"deepseek-v4-flash","max_tokens":2,"messages":[{q},{{"role":"assistant","content":{content}}},{{"role":"user","content":[{{"type":"tool_result","tool_use_id":"{id}","content":"21 C, sunny"}}]}}],"tools":{AN_TOOLS}}}"#
    );
    let (st, text) = post(a, "/v1/messages", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let cached = u(&v, "/usage/cache_read_input_tokens");
    check_turn2(&trace, turn1, cached, "anthropic thinking");

    // Responses: function_call / function_call_output items.
    let body = format!(
        r#"{{"model":"deepseek-chat","input":"Weather in Rome?","max_output_tokens":48,"tools":{RS_TOOLS},"tool_choice":{{"type":"function","name":"get_weather"}}}}"#
    );
    let (st, text) = post(a, "/v1/responses", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let turn1 = (u(&v, "/usage/input_tokens"), u(&v, "/usage/output_tokens"));
    let call = v["output"]
        .as_array()
        .expect("output")
        .iter()
        .find(|i| i["type"] == "function_call")
        .expect("function_call")
        .clone();
    let call_id = call["call_id"].as_str().expect("call_id");
    let body = format!(
        r#"{{"model":"deepseek-chat","input":[{{"type":"message","role":"user","content":"Weather in Rome?"}},{call},{{"type":"function_call_output","call_id":"{call_id}","output":"21 C, sunny"}}],"max_output_tokens":2,"tools":{RS_TOOLS}}}"#
    );
    let (st, text) = post(a, "/v1/responses", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let cached = u(&v, "/usage/input_tokens_details/cached_tokens");
    check_turn2(&trace, turn1, cached, "responses");
    let _ = std::fs::remove_file(&trace);
}

#[test]
fn body_limit_and_cors_flags_reach_the_server() {
    let s = start(&["--max-body-mb", "1", "--cors"]);
    let big = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}],"max_tokens":1}}"#,
        "x".repeat(3 << 19)
    );
    let (st, text) = post(&s.addr, "/v1/chat/completions", &big);
    assert_eq!(st, 413, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert!(v["error"]["message"].is_string(), "{text}");
    let (st, text) = post(&s.addr, "/v1/messages", &big);
    assert_eq!(st, 413, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["type"], "error");
    // CORS headers on every response, preflight without a body.
    let mut c = TcpStream::connect(&s.addr).expect("connect");
    let req = format!(
        "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nOrigin: http://x\r\nConnection: close\r\n\r\n",
        s.addr
    );
    c.write_all(req.as_bytes()).expect("write");
    let mut raw = String::new();
    c.read_to_string(&mut raw).expect("read");
    assert!(raw.starts_with("HTTP/1.1 204"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("access-control-allow-origin: *"),
        "{raw}"
    );
}

#[test]
fn exact_dsml_replay_survives_a_restart_with_the_disk_cache() {
    let dir = std::env::temp_dir().join(format!("ds4-replay-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let trace = dir.with_extension("trace");
    let d = dir.to_str().expect("utf8");
    let t = trace.to_str().expect("utf8");
    let q = r#"{"role":"user","content":"Weather in Rome?"}"#;
    let mut a = start(&["--kv-disk-dir", d, "--trace", t]);
    let body = format!(
        r#"{{"model":"deepseek-chat","messages":[{q}],"max_tokens":48,"tools":{OA_TOOLS},"tool_choice":"required"}}"#
    );
    let (st, text) = post(&a.addr, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let mut msg = v["choices"][0]["message"].clone();
    let id = msg["tool_calls"][0]["id"].as_str().expect("id").to_string();
    let generated = trace_entries(&trace).pop().expect("entry").1;
    sigterm_and_wait(&mut a);
    drop(a);
    let saved = std::fs::read_to_string(dir.join("tool-memory.jsonl")).expect("tool memory");
    assert!(saved.contains(&id), "{saved}");
    // Replay goes by id: the client's JSON (here deliberately different) is not used,
    // so finding the sampled block in the prompt proves the map survived.
    msg["tool_calls"][0]["function"]["arguments"] = Value::from(r#"{"city":"CHANGED"}"#);

    // A new process: the replay map comes back from the cache directory.
    let b = start(&["--kv-disk-dir", d, "--trace", t]);
    let body = format!(
        r#"{{"model":"deepseek-chat","messages":[{q},{msg},{{"role":"tool","tool_call_id":"{id}","content":"21 C"}}],"max_tokens":1,"tools":{OA_TOOLS}}}"#
    );
    let (st, text) = post(&b.addr, "/v1/chat/completions", &body);
    assert_eq!(st, 200, "{text}");
    let (prompt, _) = trace_entries(&trace).pop().expect("entry");
    assert!(
        prompt.contains(&format!("{generated}<｜end▁of▁sentence｜>")),
        "the sampled DSML was not replayed after the restart:\n{generated}\n---\n{prompt}"
    );
    assert!(!prompt.contains("CHANGED"));
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&trace);
}
