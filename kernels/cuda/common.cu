// ds4-rs CUDA kernels: shared definitions (types, f16 conversion, warp reductions).
//
// Every file in kernels/cuda/ is plain CUDA C++ with no header inclusion: the backend concatenates
// common.cu, iq2xxs_tables.cu, quant.cu and ops.cu (in that order) into one translation unit
// and NVRTC compiles it at run time, so no CUDA include directory is needed (NVRTC 13 ships
// no cuda_fp16.h). Half precision goes through raw u16 bits and the PTX cvt instruction.
//
// Conventions: row-major buffers, outermost dimension first, as in the Rust Backend trait.
// Where the CPU backend's result is bit-reproducible by construction (activation
// quantization), the kernels use explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn)
// so the compiler cannot contract them into an FMA.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

#define QK_K 256
#define QK8_0 32
#define WARP 32
#define FULL_MASK 0xffffffffu

// IEEE half bits -> f32 (exact).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> IEEE half bits, round to nearest even (as ds4-quant's f32_to_f16 and ggml).
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Unaligned-safe little-endian loads from 2-byte aligned block data.
__device__ __forceinline__ u16 ld_u16(const u8* p) {
    return *(const u16*)p;
}
__device__ __forceinline__ u32 ld_u32_a2(const u8* p) {
    return (u32)ld_u16(p) | ((u32)ld_u16(p + 2) << 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over aligned groups of 8 lanes (every lane of the group gets the sum).
__device__ __forceinline__ int group8_sum(int v) {
    v += __shfl_xor_sync(FULL_MASK, v, 1);
    v += __shfl_xor_sync(FULL_MASK, v, 2);
    v += __shfl_xor_sync(FULL_MASK, v, 4);
    return v;
}

__device__ __forceinline__ float neg_inf() {
    return __int_as_float(0xff800000);
}

// ds4's sigmoid: 1 / (1 + exp(-z)), with the accurate expf.
__device__ __forceinline__ float sigmoidf_(float z) {
    return 1.0f / (1.0f + expf(-z));
}

// Block-wide sum of one double per thread (blockDim.x a multiple of 32, at most 1024).
// Every thread gets the total. `sh` holds at least 32 doubles.
__device__ double block_sum_f64(double v, double* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    double t = (l < nw) ? sh[l] : 0.0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(FULL_MASK, t, o);
    return t;
}

__device__ float block_sum_f32(float v, float* sh) {
    v = warp_sum(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    float t = (l < nw) ? sh[l] : 0.0f;
    return warp_sum(t);
}

__device__ float block_max_f32(float v, float* sh) {
    v = warp_max(v);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    __syncthreads();
    if (l == 0) sh[w] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    float t = (l < nw) ? sh[l] : neg_inf();
    return warp_max(t);
}
