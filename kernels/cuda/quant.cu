// ds4-rs CUDA kernels: activation quantization and quantized matrix x activations products.
//
// Activations are quantized on the device exactly as the CPU path does (ds4-quant's gemv):
// Q8_K for Q2_K, Q4_K and IQ2_XXS weights, Q8_0 for Q8_0 weights, plain f32 for F16/F32.
// The quantizers reproduce ds4-quant bit for bit (same max search, same magic-number
// rounding, explicit _rn arithmetic), and the dot products use the same integer sums per
// block, so the only difference from the CPU is the f32 order in which block results are
// added (a few ulp of the result).
//
// Products (IQ2_XXS, Q2_K, Q4_K, Q8_0, F16, BF16, F32): `y[t][o] = sum_i W[o][i] * x[t][i]`, weight rows `row_bytes` apart, `y` is
// [n_tok, n_out]. One warp computes one output row for a tile of up to MM_TOK tokens:
// it decodes its slice of the weight row into registers once and reuses it for every
// token of the tile (the prefill "GEMM" is this multi-token GEMV; a tiled tensor-core
// GEMM is future work). Launch: grid (ceil(n_out / MM_ROWS), ceil(n_tok / MM_TOK)),
// block MM_ROWS * 32 threads.

#define MM_TOK 8
#define MM_ROWS 4

struct block_q8_K {
    float d;
    i8 qs[QK_K];
    i16 bsums[QK_K / 16];
};  // 292 bytes, as ds4_quant::BlockQ8K

#define Q8_0_BYTES 34
#define Q2_K_BYTES 84
#define Q4_K_BYTES 144
#define IQ2_XXS_BYTES 66

// ggml's nearest_int: round half to even through the 1.5 * 2^23 magic number.
__device__ __forceinline__ int nearest_int(float x) {
    float val = __fadd_rn(x, 12582912.0f);
    int i = __float_as_int(val);
    return (i & 0x007fffff) - 0x00400000;
}

// One Q8_K block per CUDA block of 256 threads: x [n_blocks * 256] -> out [n_blocks].
extern "C" __global__ void quantize_q8_k(const float* __restrict__ x,
                                         block_q8_K* __restrict__ out, int n_blocks) {
    __shared__ float s_amax[8];
    __shared__ int s_idx[8];
    __shared__ int s_best;
    int b = blockIdx.x;
    if (b >= n_blocks) return;
    int t = threadIdx.x;
    float v = x[(i64)b * QK_K + t];
    // The element of largest magnitude, the first one on ties (ds4-quant's strict '>').
    float a = fabsf(v);
    int idx = t;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float oa = __shfl_xor_sync(FULL_MASK, a, o);
        int oi = __shfl_xor_sync(FULL_MASK, idx, o);
        if (oa > a || (oa == a && oi < idx)) {
            a = oa;
            idx = oi;
        }
    }
    if ((t & 31) == 0) {
        s_amax[t >> 5] = a;
        s_idx[t >> 5] = idx;
    }
    __syncthreads();
    if (t == 0) {
        float ba = s_amax[0];
        int bi = s_idx[0];
        for (int w = 1; w < 8; w++) {
            if (s_amax[w] > ba) {
                ba = s_amax[w];
                bi = s_idx[w];
            }
        }
        s_best = (ba == 0.0f) ? -1 : bi;
    }
    __syncthreads();
    block_q8_K* ob = out + b;
    int best = s_best;
    if (best < 0) {
        ob->qs[t] = 0;
        if (t < QK_K / 16) ob->bsums[t] = 0;
        if (t == 0) ob->d = 0.0f;
        return;
    }
    float mx = x[(i64)b * QK_K + best];
    float iscale = -127.0f / mx;
    int q = nearest_int(__fmul_rn(iscale, v));
    q = min(q, 127);
    ob->qs[t] = (i8)q;
    // bsums: sums of 16 consecutive quants (half-warp groups).
    int s = q;
    s += __shfl_xor_sync(FULL_MASK, s, 1);
    s += __shfl_xor_sync(FULL_MASK, s, 2);
    s += __shfl_xor_sync(FULL_MASK, s, 4);
    s += __shfl_xor_sync(FULL_MASK, s, 8);
    if ((t & 15) == 0) ob->bsums[t >> 4] = (i16)s;
    if (t == 0) ob->d = 1.0f / iscale;
}

// One Q8_0 block per warp: x [n_blocks * 32] -> out [n_blocks * 34 bytes].
extern "C" __global__ void quantize_q8_0(const float* __restrict__ x, u8* __restrict__ out,
                                         int n_blocks) {
    int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int l = threadIdx.x & 31;
    if (b >= n_blocks) return;  // whole warps exit together
    float v = x[(i64)b * QK8_0 + l];
    float amax = warp_max(fabsf(v));
    float d = amax / 127.0f;
    float id = (d != 0.0f) ? 1.0f / d : 0.0f;
    u8* ob = out + (i64)b * Q8_0_BYTES;
    if (l == 0) *(u16*)ob = f32_to_f16(d);
    ob[2 + l] = (u8)(i8)(int)roundf(__fmul_rn(v, id));
}

// Loads 32 consecutive int8 quants of a Q8_K block (4-byte aligned) as 8 packed ints.
__device__ __forceinline__ void load_q8(const i8* q, int* v) {
    const int* p = (const int*)q;
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = p[i];
}

__device__ __forceinline__ int dot32(const int* w, const int* x) {
    int s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) s = __dp4a(w[i], x[i], s);
    return s;
}

__device__ __forceinline__ int dot16(const int* w, const int* x) {
    int s = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) s = __dp4a(w[i], x[i], s);
    return s;
}

// Packs 4 bytes into an int (byte 0 least significant).
__device__ __forceinline__ int pack4(int a, int b, int c, int d) {
    return (a & 0xff) | ((b & 0xff) << 8) | ((c & 0xff) << 16) | ((d & 0xff) << 24);
}

// Weight formats for the Q8_K kernel. Each lane of an 8-lane group owns 32 values of a
// 256-value super-block: `decode` unpacks them into 8 packed ints (int8 lanes) plus the
// group's scales; `dot` forms the group's integer sums against Q8_K activations; the group
// sums are added over the 8 lanes and `finish` applies the block's float scales exactly as
// ds4-quant's scalar dot does.
#define T_IQ2_XXS 0
#define T_Q2_K 1
#define T_Q4_K 2

template <int T> struct WGroup {
    int w[8];
    int s0, s1;  // group scales (Q2_K: one per 16-value half; others: s0 only)
    int m0, m1;  // group mins (K-quants)
};

template <int T> __device__ __forceinline__ void decode(const u8* blk, int g, WGroup<T>& o);

template <> __device__ __forceinline__ void decode<T_IQ2_XXS>(const u8* blk, int g,
                                                              WGroup<T_IQ2_XXS>& o) {
    const u8* q = blk + 2 + 8 * g;
    u32 word = ld_u32_a2(q + 4);
    o.s0 = 2 * (int)(word >> 28) + 1;
    o.s1 = 0;
    o.m0 = o.m1 = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        u64 grid = IQ2XXS_GRID[q[k]];
        u32 sg = KSIGNS_IQ2XS[(word >> (7 * k)) & 127];
        int e[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int mag = (int)((grid >> (8 * i)) & 0xff);
            e[i] = (sg & (1u << i)) ? -mag : mag;
        }
        o.w[2 * k] = pack4(e[0], e[1], e[2], e[3]);
        o.w[2 * k + 1] = pack4(e[4], e[5], e[6], e[7]);
    }
}

template <> __device__ __forceinline__ void decode<T_Q2_K>(const u8* blk, int g, WGroup<T_Q2_K>& o) {
    // Elements 32g..32g+32: bytes qs[32*(g/4) + i], bit pair (g % 4).
    const u8* qs = blk + 16 + 32 * (g >> 2);
    int sh = 2 * (g & 3);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        u32 v = *(const u32*)(qs + 4 * i);  // Q2_K blocks are 4-byte aligned
        o.w[i] = (int)((v >> sh) & 0x03030303u);
    }
    u8 sc0 = blk[2 * g], sc1 = blk[2 * g + 1];
    o.s0 = sc0 & 0xF;
    o.s1 = sc1 & 0xF;
    o.m0 = sc0 >> 4;
    o.m1 = sc1 >> 4;
}

template <> __device__ __forceinline__ void decode<T_Q4_K>(const u8* blk, int g, WGroup<T_Q4_K>& o) {
    // Sub-block j = g: bytes qs[32*(g/2) + i], low nibble for even g, high for odd.
    const u8* s = blk + 4;
    const u8* qs = blk + 16 + 32 * (g >> 1);
    int sh = 4 * (g & 1);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        u32 v = *(const u32*)(qs + 4 * i);
        o.w[i] = (int)((v >> sh) & 0x0F0F0F0Fu);
    }
    int sc, m;
    if (g < 4) {
        sc = s[g] & 63;
        m = s[g + 4] & 63;
    } else {
        sc = (s[g + 4] & 0xF) | ((s[g - 4] >> 6) << 4);
        m = (s[g + 4] >> 4) | ((s[g] >> 6) << 4);
    }
    o.s0 = sc;
    o.s1 = 0;
    o.m0 = m;
    o.m1 = 0;
}

template <int T> __device__ __forceinline__ void group_dot(const WGroup<T>& o,
                                                           const block_q8_K* xb, int g,
                                                           int& is, int& ms) {
    int x[8];
    load_q8(xb->qs + 32 * g, x);
    if (T == T_IQ2_XXS) {
        is = o.s0 * dot32(o.w, x);
        ms = 0;
    } else if (T == T_Q4_K) {
        is = o.s0 * dot32(o.w, x);
        ms = o.m0 * ((int)xb->bsums[2 * g] + (int)xb->bsums[2 * g + 1]);
    } else {
        is = o.s0 * dot16(o.w, x) + o.s1 * dot16(o.w + 4, x + 4);
        ms = o.m0 * (int)xb->bsums[2 * g] + o.m1 * (int)xb->bsums[2 * g + 1];
    }
}

template <int T> __device__ __forceinline__ float block_finish(const u8* blk, float xd, int is,
                                                               int ms) {
    if (T == T_IQ2_XXS) {
        // ds4-quant: sum += d * dx * bsum per block, times 0.125 at the end (exact scaling).
        return 0.125f * (f16_to_f32(ld_u16(blk)) * xd * (float)is);
    } else if (T == T_Q2_K) {
        float d = f16_to_f32(ld_u16(blk + 80)), dmin = f16_to_f32(ld_u16(blk + 82));
        return (xd * d) * (float)is - (xd * dmin) * (float)ms;
    } else {
        float d = f16_to_f32(ld_u16(blk)), dmin = f16_to_f32(ld_u16(blk + 2));
        return (xd * d) * (float)is - (xd * dmin) * (float)ms;
    }
}

template <int T, int BS>
__device__ __forceinline__ void mm_q8k(const u8* __restrict__ w, i64 row_bytes, int n_out,
                                       int nb, const block_q8_K* __restrict__ xq, int n_tok,
                                       float* __restrict__ y) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * MM_ROWS + warp;
    if (row >= n_out) return;  // whole warp
    int t0 = blockIdx.y * MM_TOK;
    int nt = min(MM_TOK, n_tok - t0);
    int sub = lane >> 3, g = lane & 7;
    const u8* wr = w + (i64)row * row_bytes;
    float acc[MM_TOK];
#pragma unroll
    for (int t = 0; t < MM_TOK; t++) acc[t] = 0.0f;
    // The loop bound is warp-uniform so every lane reaches the shuffles.
    for (int ib0 = 0; ib0 < nb; ib0 += 4) {
        int ib = ib0 + sub;
        bool ok = ib < nb;
        const u8* blk = wr + (i64)(ok ? ib : 0) * BS;
        WGroup<T> o;
        decode<T>(blk, g, o);
#pragma unroll
        for (int t = 0; t < MM_TOK; t++) {
            if (t < nt) {
                const block_q8_K* xb = xq + (i64)(t0 + t) * nb + (ok ? ib : 0);
                int is, ms;
                group_dot<T>(o, xb, g, is, ms);
                is = group8_sum(ok ? is : 0);
                ms = group8_sum(ok ? ms : 0);
                if (ok && g == 0) acc[t] += block_finish<T>(blk, xb->d, is, ms);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOK; t++) {
        if (t < nt) {
            float s = warp_sum(acc[t]);
            if (lane == 0) y[(i64)(t0 + t) * n_out + row] = s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(MM_ROWS * 32)
    mm_iq2_xxs(const u8* __restrict__ w, i64 row_bytes, int n_out, int nb,
               const block_q8_K* __restrict__ xq, int n_tok, float* __restrict__ y) {
    mm_q8k<T_IQ2_XXS, IQ2_XXS_BYTES>(w, row_bytes, n_out, nb, xq, n_tok, y);
}

extern "C" __global__ void __launch_bounds__(MM_ROWS * 32)
    mm_q2_k(const u8* __restrict__ w, i64 row_bytes, int n_out, int nb,
            const block_q8_K* __restrict__ xq, int n_tok, float* __restrict__ y) {
    mm_q8k<T_Q2_K, Q2_K_BYTES>(w, row_bytes, n_out, nb, xq, n_tok, y);
}

extern "C" __global__ void __launch_bounds__(MM_ROWS * 32)
    mm_q4_k(const u8* __restrict__ w, i64 row_bytes, int n_out, int nb,
            const block_q8_K* __restrict__ xq, int n_tok, float* __restrict__ y) {
    mm_q8k<T_Q4_K, Q4_K_BYTES>(w, row_bytes, n_out, nb, xq, n_tok, y);
}

// Loads the 32 quants of a Q8_0 block (2-byte aligned) as 8 packed ints.
__device__ __forceinline__ void load_q8_0(const u8* blk, int* v) {
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = (int)ld_u32_a2(blk + 2 + 4 * i);
}

// Q8_0 weights x Q8_0 activations: each lane takes whole 32-value blocks; per block
// `sumi * (f32(dw) * f32(dx))` as ds4-quant's q8_0::dot.
extern "C" __global__ void __launch_bounds__(MM_ROWS * 32)
    mm_q8_0(const u8* __restrict__ w, i64 row_bytes, int n_out, int nb,
            const u8* __restrict__ xq, int n_tok, float* __restrict__ y) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * MM_ROWS + warp;
    if (row >= n_out) return;
    int t0 = blockIdx.y * MM_TOK;
    int nt = min(MM_TOK, n_tok - t0);
    const u8* wr = w + (i64)row * row_bytes;
    float acc[MM_TOK];
#pragma unroll
    for (int t = 0; t < MM_TOK; t++) acc[t] = 0.0f;
    for (int ib = lane; ib < nb; ib += 32) {
        const u8* blk = wr + (i64)ib * Q8_0_BYTES;
        int wv[8];
        load_q8_0(blk, wv);
        float dw = f16_to_f32(ld_u16(blk));
#pragma unroll
        for (int t = 0; t < MM_TOK; t++) {
            if (t < nt) {
                const u8* xb = xq + ((i64)(t0 + t) * nb + ib) * Q8_0_BYTES;
                int xv[8];
                load_q8_0(xb, xv);
                int s = dot32(wv, xv);
                acc[t] += (float)s * (dw * f16_to_f32(ld_u16(xb)));
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOK; t++) {
        if (t < nt) {
            float s = warp_sum(acc[t]);
            if (lane == 0) y[(i64)(t0 + t) * n_out + row] = s;
        }
    }
}

// F32 / F16 / BF16 weights x f32 activations [n_tok, n_in]: lanes stride over the row.
#define W_F32 0
#define W_F16 1
#define W_BF16 2

template <int WT> __device__ __forceinline__ float wload(const u8* wr, int i) {
    if (WT == W_F16) return f16_to_f32(((const u16*)wr)[i]);
    if (WT == W_BF16) return __int_as_float((int)((u32)((const u16*)wr)[i] << 16));
    return ((const float*)wr)[i];
}

template <int WT>
__device__ __forceinline__ void mm_float(const u8* __restrict__ w, i64 row_bytes, int n_out,
                                         int n_in, const float* __restrict__ x, int n_tok,
                                         float* __restrict__ y) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int row = blockIdx.x * MM_ROWS + warp;
    if (row >= n_out) return;
    int t0 = blockIdx.y * MM_TOK;
    int nt = min(MM_TOK, n_tok - t0);
    const u8* wr = w + (i64)row * row_bytes;
    float acc[MM_TOK];
#pragma unroll
    for (int t = 0; t < MM_TOK; t++) acc[t] = 0.0f;
    for (int i = lane; i < n_in; i += 32) {
        float wv = wload<WT>(wr, i);
#pragma unroll
        for (int t = 0; t < MM_TOK; t++) {
            if (t < nt) acc[t] += wv * x[(i64)(t0 + t) * n_in + i];
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOK; t++) {
        if (t < nt) {
            float s = warp_sum(acc[t]);
            if (lane == 0) y[(i64)(t0 + t) * n_out + row] = s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(MM_ROWS * 32)
    mm_f32(const u8* __restrict__ w, i64 row_bytes, int n_out, int n_in,
           const float* __restrict__ x, int n_tok, float* __restrict__ y) {
    mm_float<W_F32>(w, row_bytes, n_out, n_in, x, n_tok, y);
}

extern "C" __global__ void __launch_bounds__(MM_ROWS * 32)
    mm_f16(const u8* __restrict__ w, i64 row_bytes, int n_out, int n_in,
           const float* __restrict__ x, int n_tok, float* __restrict__ y) {
    mm_float<W_F16>(w, row_bytes, n_out, n_in, x, n_tok, y);
}

extern "C" __global__ void __launch_bounds__(MM_ROWS * 32)
    mm_bf16(const u8* __restrict__ w, i64 row_bytes, int n_out, int n_in,
            const float* __restrict__ x, int n_tok, float* __restrict__ y) {
    mm_float<W_BF16>(w, row_bytes, n_out, n_in, x, n_tok, y);
}
