#!/usr/bin/env python3
"""Bounded loopback load test of a running ds4-server (stdlib only).

32 clients x 10 requests each, mixed: non-streaming chat, streaming chat, streaming
Anthropic; every 5th streaming request hangs up after the first event (the server must
cancel that generation and free the worker). 429 answers (queue full) are expected under
this load and counted; anything else non-200 is an error. Every loop is bounded.
    DS4_URL=http://127.0.0.1:8000 python3 load_test.py [clients] [requests]
The burst runs twice; with DS4_PID (run.sh sets it) the server's resident memory is read
from /proc before and after each, and growth during the second burst beyond allocator
noise fails the test. Prints a summary line per outcome and the throughput; exits 1 on
errors, growing memory, or if the server is no longer healthy afterwards.
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


def rss_mib():
    """Resident memory of the server (DS4_PID, set by run.sh), or None."""
    pid = os.environ.get("DS4_PID")
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, TypeError, ValueError):
        return None
    return None


def burst():
    threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)


# Two identical bursts: the first warms every buffer and cache up; a leak shows as growth
# during the second.
rss0 = rss_mib()
t0 = time.time()
burst()
wall = time.time() - t0
rss1 = rss_mib()
burst_stats = dict(stats)
burst()
rss2 = rss_mib()
for k in sorted(burst_stats):
    print(f"{burst_stats[k]:5d}  {k}   (first burst)")
lat = sorted(latencies)
if lat:
    print(f"completed latency: p50 {lat[len(lat) // 2]:.2f}s  p95 {lat[int(len(lat) * 0.95)]:.2f}s  max {lat[-1]:.2f}s")
print(f"{CLIENTS * REQUESTS} requests in {wall:.1f}s ({CLIENTS * REQUESTS / wall:.1f} req/s)")
conn = http.client.HTTPConnection(URL.hostname, URL.port, timeout=10)
conn.request("GET", "/health")
healthy = conn.getresponse().status == 200
print("server healthy afterwards" if healthy else "SERVER UNHEALTHY")
errors = sum(v for k, v in stats.items() if k.startswith("error"))
print(f"both bursts: {sum(stats.values())} requests, {errors} errors")
flat = True
if None not in (rss0, rss1, rss2):
    grew = rss2 - rss1
    # Allocator noise on a few hundred MiB; a per-request leak over a whole burst is larger.
    flat = grew <= 0.10 * rss1 + 16
    print(f"server RSS: {rss0:.0f} MiB before, {rss1:.0f} after burst 1, {rss2:.0f} after burst 2 "
          f"({'flat' if flat else 'GROWING'})")
sys.exit(0 if healthy and errors == 0 and flat else 1)
