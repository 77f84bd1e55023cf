#!/usr/bin/env python3
"""Line-by-line Python emulation of the lane decomposition in kernels/cuda/quant.cu.

No GPU needed. For random IQ2_XXS, Q2_K and Q4_K blocks (random bytes with finite f16
scales) and random Q8_K activations, it computes each block's dot product the way the
kernel does (8 lanes per 256-value block, `decode` -> packed int8 lanes, `group_dot` with
dp4a, group sums over 8 lanes, `block_finish`) and compares with an independent reference:
gguf-py's dequantization (PyPI gguf 0.19.0) of the weight block times the dequantized
activations, in float64. It catches byte-offset, shift, scale-unpacking and sign mistakes
in the kernels' decoders; it does not check the CUDA code itself (that needs the GPU run).

Usage: /root/venv-ds4/bin/python kernels/cuda/emulate_mm.py   (needs numpy and gguf)
"""
import re
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

HERE = Path(__file__).resolve().parent
rng = np.random.default_rng(1234)


def tables():
    src = (HERE / "iq2xxs_tables.cu").read_text()
    grid_txt = src.split("IQ2XXS_GRID[256] = {")[1].split("};")[0]
    grid = [int(v, 16) for v in re.findall(r"0x([0-9a-f]+)ull", grid_txt)]
    signs_txt = src.split("KSIGNS_IQ2XS[128] = {")[1].split("};")[0]
    signs = [int(v) for v in re.findall(r"\d+", signs_txt)]
    assert len(grid) == 256 and len(signs) == 128
    return grid, signs


GRID, KSIGNS = tables()


def f16(b, off):
    return float(np.frombuffer(bytes(b[off:off + 2]), dtype=np.float16)[0])


def u16(b, off):
    return b[off] | (b[off + 1] << 8)


def u32(b, off):
    return b[off] | (b[off + 1] << 8) | (b[off + 2] << 16) | (b[off + 3] << 24)


def s8(v):
    v &= 0xFF
    return v - 256 if v >= 128 else v


def unpack4(w):
    return [s8(w >> (8 * i)) for i in range(4)]


def dp4a(a, b, c):
    return c + sum(x * y for x, y in zip(unpack4(a), unpack4(b)))


def pack4(e):
    return (e[0] & 0xFF) | ((e[1] & 0xFF) << 8) | ((e[2] & 0xFF) << 16) | ((e[3] & 0xFF) << 24)


def decode(t, blk, g):
    """Mirror of decode<T> in quant.cu: (w[8], s0, s1, m0, m1)."""
    if t == "iq2_xxs":
        q = 2 + 8 * g
        word = u16(blk, q + 4) | (u16(blk, q + 6) << 16)
        w = []
        for k in range(4):
            grid = GRID[blk[q + k]]
            sg = KSIGNS[(word >> (7 * k)) & 127]
            e = []
            for i in range(8):
                mag = (grid >> (8 * i)) & 0xFF
                e.append(-mag if sg & (1 << i) else mag)
            w += [pack4(e[0:4]), pack4(e[4:8])]
        return w, 2 * (word >> 28) + 1, 0, 0, 0
    if t == "q2_k":
        qs = 16 + 32 * (g >> 2)
        sh = 2 * (g & 3)
        w = [(u32(blk, qs + 4 * i) >> sh) & 0x03030303 for i in range(8)]
        sc0, sc1 = blk[2 * g], blk[2 * g + 1]
        return w, sc0 & 0xF, sc1 & 0xF, sc0 >> 4, sc1 >> 4
    if t == "q4_k":
        s = 4
        qs = 16 + 32 * (g >> 1)
        sh = 4 * (g & 1)
        w = [(u32(blk, qs + 4 * i) >> sh) & 0x0F0F0F0F for i in range(8)]
        if g < 4:
            sc, m = blk[s + g] & 63, blk[s + g + 4] & 63
        else:
            sc = (blk[s + g + 4] & 0xF) | ((blk[s + g - 4] >> 6) << 4)
            m = (blk[s + g + 4] >> 4) | ((blk[s + g] >> 6) << 4)
        return w, sc, 0, m, 0
    raise ValueError(t)


def group_dot(t, o, xqs, bsums, g):
    w, s0, s1, m0, m1 = o
    x = [u32(xqs, 32 * g + 4 * i) for i in range(8)]
    if t == "iq2_xxs":
        return s0 * sum(dp4a(w[i], x[i], 0) for i in range(8)), 0
    if t == "q4_k":
        return s0 * sum(dp4a(w[i], x[i], 0) for i in range(8)), m0 * (bsums[2 * g] + bsums[2 * g + 1])
    is_ = s0 * sum(dp4a(w[i], x[i], 0) for i in range(4)) + s1 * sum(dp4a(w[i], x[i], 0) for i in range(4, 8))
    return is_, m0 * bsums[2 * g] + m1 * bsums[2 * g + 1]


def block_finish(t, blk, xd, is_, ms):
    if t == "iq2_xxs":
        return 0.125 * (f16(blk, 0) * xd * is_)
    if t == "q2_k":
        d, dmin = f16(blk, 80), f16(blk, 82)
    else:
        d, dmin = f16(blk, 0), f16(blk, 2)
    return (xd * d) * is_ - (xd * dmin) * ms


SIZES = {"iq2_xxs": (66, T.IQ2_XXS), "q2_k": (84, T.Q2_K), "q4_k": (144, T.Q4_K)}
D_OFFS = {"iq2_xxs": [0], "q2_k": [80, 82], "q4_k": [0, 2]}


def random_block(t):
    size, _ = SIZES[t]
    b = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    for off in D_OFFS[t]:
        b[off:off + 2] = np.float16(rng.uniform(-0.05, 0.05)).tobytes()
    return b


def main():
    worst = 0.0
    for t, (size, qtype) in SIZES.items():
        for trial in range(200):
            blk = random_block(t)
            xq = rng.integers(-127, 128, 256).astype(np.int8)
            xd = float(np.float32(rng.uniform(-0.02, 0.02)))
            bsums = [int(xq[16 * i:16 * i + 16].astype(np.int32).sum()) for i in range(16)]
            xqs = xq.tobytes()
            # Each lane g computes its group's integer sums; the kernel adds them over the 8
            # lanes (group8_sum) and one lane applies the block's float scales.
            is_tot = sum(group_dot(t, decode(t, blk, g), xqs, bsums, g)[0] for g in range(8))
            ms_tot = sum(group_dot(t, decode(t, blk, g), xqs, bsums, g)[1] for g in range(8))
            got = block_finish(t, blk, xd, is_tot, ms_tot)
            w = dequantize(np.frombuffer(bytes(blk), dtype=np.uint8), qtype).astype(np.float64).ravel()
            want = float(np.dot(w, xq.astype(np.float64) * xd))
            scale = float(np.abs(w).sum() * abs(xd) * 127) or 1.0
            rel = abs(got - want) / scale
            worst = max(worst, rel)
            # gguf-py dequantizes in float32: agreement to ~1e-7 is exact up to its rounding;
            # a wrong offset, shift or scale gives errors of order 1.
            if rel > 1e-6:
                print(f"{t} trial {trial}: kernel-emulated {got!r} vs gguf-py {want!r} (rel {rel:e})")
                return 1
        print(f"{t}: 200 random blocks agree with gguf-py (worst rel {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
