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
