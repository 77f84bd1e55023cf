#!/usr/bin/env bash
# Builds, on the build machine (no GPU needed), everything kernels/cuda/device_run.sh needs
# on the GPU machine, into target-cuda-carry/ (ignored by git through /target-*), and prints
# its size (the device tool carries at most 64 MiB together with the working tree).
#
# Usage (from the repository root): kernels/cuda/prepare_carry.sh
# Then call the device tool with carry ["target-cuda-carry"] (see docs/CUDA.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/targets/cuda}"
out=target-cuda-carry
rm -rf "$out" && mkdir -p "$out"
cargo build --release -p ds4
cp "$CARGO_TARGET_DIR/release/ds4" "$out/ds4"
# The CUDA test binary of ds4-model (ops vs CPU, fixture logits), built with the release
# profile so it is small and fast.
bin=$(cargo test --release -p ds4-model --test cuda --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])' | tail -1)
[[ -n "$bin" ]] || { echo "prepare_carry: cuda test binary not found"; exit 1; }
cp "$bin" "$out/cuda-tests"
strip "$out/ds4" "$out/cuda-tests" 2>/dev/null || true
gen=/work/shared/tools/gen_flash_sparse_gguf.py
[[ -f "$gen" ]] && cp "$gen" "$out/" || echo "prepare_carry: warning: $gen not found; the bench step will be skipped"
du -sh "$out" && ls -la "$out"
total=$(( $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) + $(du -sb "$out" | cut -f1) ))
echo "prepare_carry: working tree + carry = $((total >> 20)) MiB (limit 64)"
