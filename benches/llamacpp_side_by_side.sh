#!/usr/bin/env bash
# ds4-rs vs llama.cpp on the same GGUF, same prompt, same frontiers, same thread count.
#
#   benches/llamacpp_side_by_side.sh [MODEL.gguf]
#
# Environment (defaults in brackets):
#   CTX_LIST [512,2048]  GEN [32]  THREADS [2]  REPEATS [3]  PRESET [q2]
#   DS4        ds4 binary [$CARGO_TARGET_DIR/release/ds4, built with `cargo build --release -p ds4`]
#   LCPP_BUILD llama.cpp CMake build dir holding bin/libllama.so [/work/targets/oracle/lcpp-build]
#   LCPP_SRC   llama.cpp source (include/llama.h) [/work/targets/oracle/llama_cpp_python-0.3.36/vendor/llama.cpp]
#   OUT        results CSV, appended to [benches/results/$(hostname)-model.csv]
#   BATCH      batch id written in column 1 [next number@HH:MMZ]
#
# Without MODEL it writes (once) a synthetic model with `ds4 bench --gen-synthetic` (PRESET, the
# default 1024-hidden / 8-layer / 64-expert shape; ~3 min on 2 cores, most of it IQ2_XXS
# quantization) to $WORK/synth-$PRESET.gguf. llama.cpp loads that file as is: the synthetic
# file carries exactly the converter's deepseek4.* metadata plus tokenizer.ggml.model = "none".
#
# Builds nothing heavy: it compiles benches/llamacpp_bench.cpp (one file, seconds) against an
# existing libllama. To reproduce libllama from scratch (what LCPP_BUILD holds):
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36   # the PyPI sdist
#   tar xf llama_cpp_python-0.3.36.tar.gz
#   cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B lcpp-build -DCMAKE_BUILD_TYPE=Release \
#         -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF \
#         -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF
#   cmake --build lcpp-build --target llama -j2          # ~20-40 min on a 2-core box
#
# Each repeat runs ds4-rs then llama.cpp, so both see similar machine load; the CSV keeps every
# run (column `run`), and the summary prints the median per engine and frontier and the ratios
# ours / llama.cpp. Note `uptime` before and after: the numbers are only as quiet as the box.
set -euo pipefail
cd "$(dirname "$0")/.."
CTX_LIST=${CTX_LIST:-512,2048}
GEN=${GEN:-32}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-3}
PRESET=${PRESET:-q2}
TARGET=${CARGO_TARGET_DIR:-target}
DS4=${DS4:-$TARGET/release/ds4}
LCPP_BUILD=${LCPP_BUILD:-/work/targets/oracle/lcpp-build}
LCPP_SRC=${LCPP_SRC:-/work/targets/oracle/llama_cpp_python-0.3.36/vendor/llama.cpp}
WORK=${WORK:-$TARGET/bench-work}
OUT=${OUT:-benches/results/$(hostname)-model.csv}
mkdir -p "$WORK" "$(dirname "$OUT")"

[ -x "$DS4" ] || { echo "build ds4 first: cargo build --release -p ds4 (or set DS4)"; exit 1; }
MODEL=${1:-$WORK/synth-$PRESET.gguf}
if [ ! -f "$MODEL" ]; then
  "$DS4" bench --gen-synthetic "$MODEL" --preset "$PRESET" --threads "$THREADS"
fi

LB="$WORK/llamacpp_bench"
if [ ! -x "$LB" ] || [ benches/llamacpp_bench.cpp -nt "$LB" ]; then
  g++ -O2 -std=c++17 -I"$LCPP_SRC/include" -I"$LCPP_SRC/ggml/include" benches/llamacpp_bench.cpp \
      -L"$LCPP_BUILD/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$LCPP_BUILD/bin" -o "$LB"
fi

echo "# $(date -u +%FT%TZ) $(hostname) threads=$THREADS model=$MODEL"
echo "# load before: $(uptime)"
# OUT keeps every batch ever run (column `batch`, default `<n>@<HH:MM>Z`); the summary
# below is computed from this batch only.
if [ ! -s "$OUT" ]; then
  echo "batch,run,engine,model,threads,ctx,prefill_s,prefill_tps,gen,decode_s,decode_tps" > "$OUT"
fi
BATCH=${BATCH:-$(( $(tail -n +2 "$OUT" | cut -d, -f1 | cut -d@ -f1 | sort -n | tail -1) + 1 ))@$(date -u +%H:%MZ)}
echo "# batch $BATCH -> $OUT"
for r in $(seq 1 "$REPEATS"); do
  "$DS4" bench -m "$MODEL" --ctx-list "$CTX_LIST" --gen "$GEN" --threads "$THREADS" \
      --no-qat-sim --csv "$WORK/ours.csv"
  "$LB" "$MODEL" "$CTX_LIST" "$GEN" "$THREADS" "$WORK/lcpp.csv" 2> "$WORK/lcpp.log"
  tail -n +2 "$WORK/ours.csv" | sed "s/^/$BATCH,$r,/" >> "$OUT"
  tail -n +2 "$WORK/lcpp.csv" | sed "s/^/$BATCH,$r,/" >> "$OUT"
done
echo "# load after: $(uptime)"

python3 - "$OUT" "$BATCH" <<'EOF'
import csv, statistics, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["batch"] == sys.argv[2]]
med = {}
for key in sorted({(r["engine"], int(r["ctx"])) for r in rows}):
    sel = [r for r in rows if (r["engine"], int(r["ctx"])) == key]
    med[key] = (statistics.median(float(r["prefill_tps"]) for r in sel),
                statistics.median(float(r["decode_tps"]) for r in sel), len(sel))
print(f"{'ctx':>6} {'engine':>10} {'prefill t/s':>12} {'decode t/s':>11} runs")
for (eng, ctx), (p, d, n) in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"{ctx:>6} {eng:>10} {p:>12.2f} {d:>11.2f} {n}")
for ctx in sorted({c for _, c in med}):
    o, l = med.get(("ds4-rs", ctx)), med.get(("llama.cpp", ctx))
    if o and l:
        print(f"ctx {ctx}: ours/llama.cpp prefill {o[0] / l[0]:.2f}x, decode {o[1] / l[1]:.2f}x")
EOF
