#!/usr/bin/env python3
"""Collects the criterion results of `benches/benches/kernels.rs` into a CSV and a markdown table.

Needs: Python 3 standard library only. Run after the bench commands in docs/BENCH.md:

    python3 benches/results/collect.py $CARGO_TARGET_DIR/criterion <machine> > /tmp/table.md

It writes benches/results/<machine>.csv (one row per benchmark: median time, weight GB/s with
GB = 1e9 bytes) and prints the comparison table (ds4 vs candle vs measured read bandwidth)
that docs/BENCH.md shows.
"""
import csv
import json
import os
import sys


def load(root):
    rows = []
    for dirpath, _dirs, files in os.walk(root):
        if "benchmark.json" not in files or os.path.basename(dirpath) != "new":
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(os.path.join(dirpath, "estimates.json")) as f:
            est = json.load(f)
        tp = (bench.get("throughput") or {}).get("Bytes") or (bench.get("throughput") or {}).get("BytesDecimal")
        median_ns = est["median"]["point_estimate"]
        rows.append({
            "group": bench["group_id"],
            "function": bench["function_id"] or "",
            "param": bench.get("value_str") or "",
            "bytes": tp or 0,
            "median_ns": median_ns,
            "gbps": (tp / median_ns) if tp else 0.0,
        })
    return rows


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main():
    root, machine = sys.argv[1], sys.argv[2]
    rows = load(root)
    cpu = cpu_model()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{machine}.csv")
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["machine", "cpu", "group", "impl", "shape", "weight_bytes", "median_ns", "gb_per_s"])
        for r in sorted(rows, key=lambda r: (r["group"], r["param"], r["function"])):
            w.writerow([machine, cpu, r["group"], r["function"], r["param"], r["bytes"],
                        f"{r['median_ns']:.1f}", f"{r['gbps']:.3f}"])
    by = {(r["group"], r["function"], r["param"]): r["gbps"] for r in rows}
    bw = {t: by.get(("cpu_memory_read", f"stream_t{t}", ""), 0.0) for t in (1, 2)}
    print(f"CPU: {cpu}; measured read bandwidth: {bw[1]:.2f} GB/s (1 thread), {bw[2]:.2f} GB/s (2 threads)\n")
    print("| format | shape | ds4 t1 | candle t1 | ratio t1 | % bw t1 | ds4 t2 | candle t2 | ratio t2 | % bw t2 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    groups = sorted({r["group"] for r in rows if r["group"].startswith("cpu_matvec_")})
    order = ["iq2_xxs", "q2_k", "q4_k", "q8_0", "f16", "bf16", "f32"]
    groups.sort(key=lambda g: order.index(g[len("cpu_matvec_"):]) if g[len("cpu_matvec_"):] in order else 99)
    for g in groups:
        shapes = sorted({r["param"] for r in rows if r["group"] == g})
        for s in shapes:
            cells = [g[len("cpu_matvec_"):].upper(), s]
            for t in (1, 2):
                ours = by.get((g, f"ds4_t{t}", s))
                cand = by.get((g, f"candle_t{t}", s))
                cells.append(f"{ours:.2f}" if ours else "-")
                cells.append(f"{cand:.2f}" if cand else "-")
                cells.append(f"{ours / cand:.2f}x" if ours and cand else "-")
                cells.append(f"{100 * ours / bw[t]:.0f}%" if ours and bw[t] else "-")
            print("| " + " | ".join(cells) + " |")
    print("\nIn-cache dot kernels (one 4096-value row, GB/s of weight bytes):\n")
    dots = sorted({r["group"] for r in rows if r["group"].startswith("cpu_dot_")})
    isas = ["scalar", "avx2", "avx512", "avx512vbmi"]
    print("| format | " + " | ".join(isas) + " |")
    print("|---|" + "---:|" * len(isas))
    for g in sorted(dots, key=lambda g: order.index(g[len("cpu_dot_"):]) if g[len("cpu_dot_"):] in order else 99):
        print("| " + g[len("cpu_dot_"):].upper() + " | " + " | ".join(
            f"{by[(g, i, '')]:.2f}" if (g, i, "") in by else "-" for i in isas) + " |")
    # Multi-token kernels (cpu_dot8_*: one row against 8 tokens, weight bytes counted per token).
    dots8 = sorted({r["group"] for r in rows if r["group"].startswith("cpu_dot8_")})
    if dots8:
        print("\nIn-cache multi-token dot kernels (one 4096-value row x 8 tokens, GB/s of weight bytes per token):\n")
        print("| format | " + " | ".join(isas) + " |")
        print("|---|" + "---:|" * len(isas))
        for g in dots8:
            print("| " + g[len("cpu_dot8_"):].upper() + " | " + " | ".join(
                f"{by[(g, i, '')]:.2f}" if (g, i, "") in by else "-" for i in isas) + " |")
    # New kernels next to the previous ones (ds4avx512_t*: the AVX-512 VNNI table), same run.
    prev = sorted({(r["group"], r["param"]) for r in rows if r["function"].startswith("ds4avx512_t")})
    if prev:
        print("\nds4 (best table) vs the AVX-512 VNNI table (previous kernels), same run, GB/s:\n")
        print("| format | shape | avx512 t1 | ds4 t1 | gain t1 | % bw t1 | avx512 t2 | ds4 t2 | gain t2 | % bw t2 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for g, sh in prev:
            cells = [g[len("cpu_matvec_"):].upper(), sh]
            for t in (1, 2):
                old = by.get((g, f"ds4avx512_t{t}", sh))
                new = by.get((g, f"ds4_t{t}", sh))
                cells.append(f"{old:.2f}" if old else "-")
                cells.append(f"{new:.2f}" if new else "-")
                cells.append(f"{new / old:.2f}x" if old and new else "-")
                cells.append(f"{100 * new / bw[t]:.0f}%" if new and bw[t] else "-")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
