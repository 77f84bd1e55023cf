#!/usr/bin/env bash
# Compile-checks the CUDA kernels without a GPU: nvcc -> PTX, then ptxas -v for the register,
# stack and spill report. Fails on any error, any warning, or any spill.
#
# The backend compiles the same translation unit at run time with NVRTC: common.cu,
# iq2xxs_tables.cu, quant.cu, ops.cu concatenated in this order (ds4_backend_cuda::kernels).
#
# Usage: kernels/cuda/check.sh [ARCH]   (default sm_90; needs nvcc and ptxas on PATH, or
# NVCC=/path/to/nvcc). Skips with a message and exit 0 when nvcc is absent, so CI without a
# CUDA toolkit stays green. The CUDA 13.0 compiler installs from PyPI:
#   python3 -m venv /work/targets/cuda-venv
#   /work/targets/cuda-venv/bin/pip install 'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' \
#       'nvidia-nvvm==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-cuda-runtime==13.0.*'
#   PATH=/work/targets/cuda-venv/lib/python3.11/site-packages/nvidia/cu13/bin:$PATH kernels/cuda/check.sh
set -euo pipefail
arch="${1:-sm_90}"
here="$(cd "$(dirname "$0")" && pwd)"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$nvcc" ]]; then
    for c in /work/targets/cuda-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc /usr/local/cuda/bin/nvcc; do
        [[ -x "$c" ]] && nvcc="$c" && break
    done
fi
if [[ -z "$nvcc" ]]; then
    echo "check.sh: skipped: nvcc not found (set NVCC or PATH; see the header of this script)"
    exit 0
fi
ptxas="$(dirname "$nvcc")/ptxas"
[[ -x "$ptxas" ]] || ptxas="$(command -v ptxas)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat "$here/common.cu" "$here/iq2xxs_tables.cu" "$here/quant.cu" "$here/ops.cu" > "$tmp/ds4.cu"
grep -q '#include' "$tmp/ds4.cu" && { echo "check.sh: kernels must not #include (NVRTC has no headers)"; exit 1; }
"$nvcc" -arch="$arch" --ptx -std=c++17 -Werror all-warnings "$tmp/ds4.cu" -o "$tmp/ds4.ptx" 2> "$tmp/nvcc.log" || {
    cat "$tmp/nvcc.log"; echo "check.sh: nvcc failed"; exit 1; }
"$ptxas" -arch="$arch" -v --warning-as-error "$tmp/ds4.ptx" -o "$tmp/ds4.cubin" 2> "$tmp/ptxas.log" || {
    cat "$tmp/ptxas.log"; echo "check.sh: ptxas failed"; exit 1; }
# One line per kernel: name, registers, stack, spills, shared memory.
awk '
/Compiling entry function/ { match($0, /'"'"'[^'"'"']*'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
/bytes stack frame/ { stack = $1; spill = $5 + $9 }
/Used [0-9]+ registers/ {
    regs = $5; smem = "0"
    if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
    printf "%-18s regs %3d  stack %3d B  spills %d B  smem %s B\n", name, regs, stack, spill, smem
    if (spill > 0) bad = 1
}
END { exit bad }
' "$tmp/ptxas.log" | sort || { echo "check.sh: register spills (see above)"; exit 1; }
echo "check.sh: OK ($("$nvcc" --version | tail -2 | head -1), $arch)"
