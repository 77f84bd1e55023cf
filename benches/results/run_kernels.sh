#!/usr/bin/env bash
# Runs the CPU kernel benchmarks of docs/BENCH.md and writes benches/results/<machine>.csv.
#
# Usage: benches/results/run_kernels.sh <machine-name>
# ds4 (1 and all threads, rayon pools), the memory read and the in-cache dot kernels run in
# one process; candle runs once per thread count because it sizes its worker pool once per
# process from CANDLE_NUM_THREADS.
set -euo pipefail
machine=${1:?usage: run_kernels.sh <machine-name>}
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
all=$(nproc)
rm -rf "$target/criterion"
uptime
cargo bench -p ds4-benches --bench kernels -- 'stream|ds4_|cpu_dot'
for t in 1 "$all"; do
    CANDLE_NUM_THREADS=$t cargo bench -p ds4-benches --bench kernels -- "candle_t$t/"
done
uptime
python3 benches/results/collect.py "$target/criterion" "$machine"
