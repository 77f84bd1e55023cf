#!/usr/bin/env python3
"""Bounded loopback load test of a running ds4-server (stdlib only).

32 clients x 10 requests each, mixed: non-streaming chat, streaming chat, streaming
Anthropic; every 5th streaming request hangs up after the first event (the server must
cancel that generation and free the worker). 429 answers (queue full) are expected under
this load and counted; anything else non-200 is an error. Every loop is bounded.
    DS4_URL=http://127.0.0.1:8000 python3 load_test.py [clients] [requests]
Prints a summary line per outcome and the overall throughput; exits 1 on errors or if
the server is no longer healthy afterwards.
"""
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse

URL = urllib.parse.urlparse(os.environ.get("DS4_URL", "http://127.0.0.1:8000"))
KEY = os.environ.get("DS4_API_KEY", "dsv4-local")
CLIENTS = int(sys.argv[1]) if len(sys.argv) > 1 else 32
REQUESTS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
lock = threading.Lock()
stats = {}
latencies = []


def count(key, dt=None):
    with lock:
        stats[key] = stats.get(key, 0) + 1
        if dt is not None:
            latencies.append(dt)


def one(client, i):
    kind = (client + i) % 3
    stream = kind != 0
    hang_up = stream and (client * REQUESTS + i) % 5 == 0
    if kind == 2:
        path = "/v1/messages"
        body = {"model": "deepseek-chat", "max_tokens": 4, "stream": True,
                "messages": [{"role": "user", "content": f"client {client} request {i}"}]}
    else:
        path = "/v1/chat/completions"
        body = {"model": "deepseek-chat", "max_tokens": 4, "stream": stream,
                "messages": [{"role": "user", "content": f"client {client} request {i}"}]}
    t0 = time.time()
    conn = http.client.HTTPConnection(URL.hostname, URL.port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {KEY}"})
        r = conn.getresponse()
        if r.status == 429:
            r.read()
            count("429 queue full")
            return
        if r.status != 200:
            count(f"error {r.status}: {r.read()[:200]!r}")
            return
        if hang_up:
            r.fp.readline()
            conn.close()
            count("200 hung up early")
            return
        data = r.read().decode()
        ok = ("[DONE]" in data) if (stream and kind == 1) else ("message_stop" in data if kind == 2 else '"choices"' in data)
        count("200 complete" if ok else "error: truncated body", time.time() - t0)
    except Exception as e:  # noqa: BLE001 - any client-side failure is an error outcome
        count(f"error {type(e).__name__}")
    finally:
        conn.close()


def client(c):
    for i in range(REQUESTS):
        one(c, i)


t0 = time.time()
threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=600)
wall = time.time() - t0
for k in sorted(stats):
    print(f"{stats[k]:5d}  {k}")
lat = sorted(latencies)
if lat:
    print(f"completed latency: p50 {lat[len(lat) // 2]:.2f}s  p95 {lat[int(len(lat) * 0.95)]:.2f}s  max {lat[-1]:.2f}s")
print(f"{CLIENTS * REQUESTS} requests in {wall:.1f}s ({CLIENTS * REQUESTS / wall:.1f} req/s)")
conn = http.client.HTTPConnection(URL.hostname, URL.port, timeout=10)
conn.request("GET", "/health")
healthy = conn.getresponse().status == 200
print("server healthy afterwards" if healthy else "SERVER UNHEALTHY")
errors = sum(v for k, v in stats.items() if k.startswith("error"))
sys.exit(0 if healthy and errors == 0 else 1)
