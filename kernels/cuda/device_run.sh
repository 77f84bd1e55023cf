#!/usr/bin/env bash
# The one GPU check of the CUDA backend, for the borrowed H100/H200 (the device tool).
# Runs from the repository root of the copied working tree with target-cuda-carry/ carried
# (made by kernels/cuda/prepare_carry.sh on the build machine), writes at most 8 files
# under $OUT, and stays within about 8 minutes:
#   1. nvidia-smi                                    -> $OUT/gpu.txt
#   2. the ignored CUDA tests (every op vs the CPU,   -> $OUT/cuda_tests.log
#      fixture logits CUDA vs CPU to 1e-3)
#   3. the full-shape sparse Flash q2 GGUF           -> $OUT/bench.txt, $OUT/bench.csv
#      (gen_flash_sparse_gguf.py) and `ds4 bench --backend cuda` at 512 and 2048 context
#   4. a summary of what passed                      -> $OUT/summary.txt
# Each step has its own timeout, so a hang in one still leaves the others' results.
# The full Flash shape needs ~81 GiB of device memory: on an H100 (78 GiB) step 3 fails
# cleanly with an out-of-memory message; use kind nvidia-h200 for the benchmark.
set -u
C=target-cuda-carry
OUT="${OUT:-/tmp/ds4-out}"
mkdir -p "$OUT"
S="$OUT/summary.txt"
: > "$S"
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$S"; }

nvidia-smi > "$OUT/gpu.txt" 2>&1 || true
nvcc --version >> "$OUT/gpu.txt" 2>&1 || true
say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
chmod +x "$C/ds4" "$C/cuda-tests" 2>/dev/null || true
export DS4_CUDA_CACHE=/tmp/ds4-cuda-cache
# NVRTC is loaded at run time: make sure the loader finds it.
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    lib=$(find /usr/local /usr/lib /opt -name 'libnvrtc.so*' 2>/dev/null | head -1)
    [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}"
fi
say "libnvrtc: $(ldconfig -p 2>/dev/null | grep -m1 'libnvrtc\.so' || echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}")"

# 2. Tests. DS4_REQUIRE_CUDA turns a missing device into a failure instead of a skip.
DS4_REQUIRE_CUDA=1 DS4_FIXTURES="$PWD/tests/fixtures/model" \
    timeout 180 "$C/cuda-tests" --ignored --test-threads=1 --nocapture > "$OUT/cuda_tests.log" 2>&1
rc=$?
say "cuda tests: rc=$rc ($(grep -E '^test result' "$OUT/cuda_tests.log" | tail -1))"
# Fixture results, and each failure with its message (the line after "panicked at").
grep -E '^fixture .*rel diff' "$OUT/cuda_tests.log" >> "$S" || true
grep -A1 'panicked at' "$OUT/cuda_tests.log" | grep -v -E '^(--|thread )' | sed 's/^/FAIL: /' >> "$S" || true

# 3. Benchmark at the real shape.
gen="$C/gen_flash_sparse_gguf.py"
if [[ -f "$gen" ]]; then
    tok=/tmp/tokenizer.json
    gunzip -c tests/fixtures/tokenizer/tokenizer.json.gz > "$tok"
    timeout 60 python3 "$gen" "$tok" /tmp/flash-q2.gguf > /tmp/gen.log 2>&1
    say "gen_flash_sparse_gguf: rc=$? ($(tail -1 /tmp/gen.log))"
    # Prefill 512 and 2048 tokens, then 8 greedy decode steps each; the table is printed
    # after each frontier, so a timeout still leaves the finished rows.
    timeout 270 "$C/ds4" bench --backend cuda -m /tmp/flash-q2.gguf --ctx-list 512,2048 \
        --gen 8 --csv "$OUT/bench.csv" > "$OUT/bench.txt" 2>&1
    say "bench: rc=$? (124 = timeout)"
    grep -E '^ +[0-9]+ ' "$OUT/bench.txt" >> "$S" || true
    rm -f /tmp/flash-q2.gguf
else
    say "bench: skipped ($gen not carried)"
fi
say "done"
