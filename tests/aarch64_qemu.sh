#!/usr/bin/env bash
# Runs the NEON kernels and the model's golden tests on aarch64 under user-mode QEMU, so the
# Apple Silicon / ARM code paths are executed (not only type-checked) on an x86-64 machine.
#
# Needs (Debian): apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
# and the Rust std for the target: rustup target add aarch64-unknown-linux-gnu
#
# Usage: tests/aarch64_qemu.sh [extra cargo test args]
# Slow (QEMU runs the model ~50x slower than native): the golden tests take ~3 min.
# `ds4_simd_scalar_forces_fallback` is skipped: it re-executes its own test binary, which the
# kernel cannot run without a binfmt_misc registration for QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in qemu-aarch64 aarch64-linux-gnu-gcc; do
    command -v "$tool" >/dev/null || { echo "skipped: $tool not installed (see header)"; exit 0; }
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}/aarch64-qemu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --target aarch64-unknown-linux-gnu -p ds4-quant "$@" -- --skip ds4_simd_scalar_forces_fallback
cargo test --target aarch64-unknown-linux-gnu -p ds4-model --test golden --test gguf_load "$@"
