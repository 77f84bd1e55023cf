// ds4-rs CUDA kernels: the model-level operations besides the products (MODEL.md s3).
//
// Each kernel follows the CPU backend (crates/ds4-model/src/cpu.rs) formula for formula.
// Where the CPU computes `a * b + c` as two rounded operations, the kernels use __fmul_rn /
// __fadd_rn so the compiler cannot fuse them into an FMA; what still differs is the order
// of long f32 sums (block reductions instead of sequential loops), and expf/sincosf, which
// are within 2 ulp of the CPU's libm. The tolerances in the tests are set for that.

#define MUL(a, b) __fmul_rn((a), (b))
#define ADD(a, b) __fadd_rn((a), (b))
#define SUB(a, b) __fsub_rn((a), (b))

// In-place RMSNorm of each n-wide row (one CUDA block per row):
// x * (1 / sqrt(mean(x^2) + eps)) * w, the sum of squares in f64 as the CPU does.
extern "C" __global__ void rms_norm(float* __restrict__ x, int n, const float* __restrict__ w,
                                    int has_w, float eps) {
    __shared__ double sh[32];
    float* r = x + (i64)blockIdx.x * n;
    double ss = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        double v = (double)r[i];
        ss += v * v;
    }
    ss = block_sum_f64(ss, sh);
    float s = 1.0f / sqrtf(ADD((float)(ss / (double)n), eps));
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = MUL(r[i], s);
        r[i] = has_w ? MUL(v, w[i]) : v;
    }
}

// Interleaved RoPE on the last 2*nf entries of each n-wide row; angle pos * freqs[i],
// negated when `inverse`. One thread per (row, pair).
extern "C" __global__ void rope_tail(float* __restrict__ x, int n, int rows,
                                     const float* __restrict__ freqs, int nf, float pos,
                                     int inverse) {
    i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)rows * nf) return;
    int row = (int)(idx / nf), i = (int)(idx % nf);
    float* tail = x + (i64)row * n + (n - 2 * nf);
    float phi = MUL(pos, freqs[i]);
    float s, c;
    sincosf(phi, &s, &c);
    if (inverse) s = -s;
    float a = tail[2 * i], b = tail[2 * i + 1];
    tail[2 * i] = SUB(MUL(a, c), MUL(b, s));
    tail[2 * i + 1] = ADD(MUL(b, c), MUL(a, s));
}

#define HC_MAX 16

// The rest of HC pre for one token once `mix = fn @ rms_scaled(state)` is known: the pre and
// post weights, the Sinkhorn-normalised comb, and x = sum_i pre[i] * state[i]. One block;
// thread 0 does the tiny m x m part (m <= HC_MAX, checked by the host) in the CPU's order.
extern "C" __global__ void hc_pre_finish(const float* __restrict__ mix,
                                         const float* __restrict__ state, int m, int d,
                                         const float* __restrict__ scale,
                                         const float* __restrict__ base, float hc_eps,
                                         int n_iter, float* __restrict__ x,
                                         float* __restrict__ post, float* __restrict__ comb) {
    __shared__ float pre[HC_MAX];
    __shared__ float c[HC_MAX * HC_MAX];
    if (threadIdx.x == 0) {
        for (int i = 0; i < m; i++) {
            pre[i] = ADD(sigmoidf_(ADD(MUL(mix[i], scale[0]), base[i])), hc_eps);
            post[i] = MUL(2.0f, sigmoidf_(ADD(MUL(mix[m + i], scale[1]), base[m + i])));
        }
        for (int i = 0; i < m; i++) {
            float* row = c + i * m;
            float mx = neg_inf();
            for (int j = 0; j < m; j++) {
                row[j] = ADD(MUL(mix[2 * m + i * m + j], scale[2]), base[2 * m + i * m + j]);
                mx = fmaxf(mx, row[j]);
            }
            float sum = 0.0f;
            for (int j = 0; j < m; j++) {
                row[j] = expf(SUB(row[j], mx));
                sum = ADD(sum, row[j]);
            }
            for (int j = 0; j < m; j++) row[j] = ADD(row[j] / sum, hc_eps);
        }
        // The CPU normalises the columns once, then (rows, columns) n_iter - 1 more times.
        int iters = n_iter > 1 ? n_iter : 1;
        for (int it = 0; it < iters; it++) {
            if (it > 0) {
                for (int i = 0; i < m; i++) {
                    float sum = 0.0f;
                    for (int j = 0; j < m; j++) sum = ADD(sum, c[i * m + j]);
                    for (int j = 0; j < m; j++) c[i * m + j] = c[i * m + j] / ADD(sum, hc_eps);
                }
            }
            for (int j = 0; j < m; j++) {
                float sum = 0.0f;
                for (int i = 0; i < m; i++) sum = ADD(sum, c[i * m + j]);
                for (int i = 0; i < m; i++) c[i * m + j] = c[i * m + j] / ADD(sum, hc_eps);
            }
        }
        for (int i = 0; i < m * m; i++) comb[i] = c[i];
    }
    __syncthreads();
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < m; i++) acc = ADD(acc, MUL(pre[i], state[(i64)i * d + k]));
        x[k] = acc;
    }
}

// HC post for one token: out[j][k] = post[j] * o[k] + sum_i comb[i][j] * old[i][k].
extern "C" __global__ void hc_post(float* __restrict__ out, const float* __restrict__ old,
                                   const float* __restrict__ o, const float* __restrict__ post,
                                   const float* __restrict__ comb, int m, int d) {
    i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)m * d) return;
    int j = (int)(idx / d), k = (int)(idx % d);
    float acc = MUL(post[j], o[k]);
    for (int i = 0; i < m; i++) acc = ADD(acc, MUL(comb[i * m + j], old[(i64)i * d + k]));
    out[idx] = acc;
}

// Attention of one query [n_head, hd] over shared K=V rows [n_rows, hd] with per-head sink
// logits: out_h = sum_u softmax_u(q_h . k_u * scale ; sink_h) k_u. One block per head;
// `scratch` holds [n_head, n_rows] logits then weights.
extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ rows,
                                     int n_rows, int hd, const float* __restrict__ sinks,
                                     float scale, float* __restrict__ scratch,
                                     float* __restrict__ out) {
    __shared__ float sh[32];
    int h = blockIdx.x;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    const float* qh = q + (i64)h * hd;
    float* lg = scratch + (i64)h * n_rows;
    for (int u = warp; u < n_rows; u += nw) {
        const float* k = rows + (i64)u * hd;
        float s = 0.0f;
        for (int i = lane; i < hd; i += 32) s += qh[i] * k[i];
        s = warp_sum(s);
        if (lane == 0) lg[u] = MUL(s, scale);
    }
    __syncthreads();
    float mx = sinks[h];
    for (int u = threadIdx.x; u < n_rows; u += blockDim.x) mx = fmaxf(mx, lg[u]);
    mx = block_max_f32(mx, sh);
    float part = 0.0f;
    for (int u = threadIdx.x; u < n_rows; u += blockDim.x) {
        float wv = expf(SUB(lg[u], mx));
        lg[u] = wv;
        part += wv;
    }
    float den = block_sum_f32(part, sh) + expf(SUB(sinks[h], mx));
    __syncthreads();
    for (int k = threadIdx.x; k < hd; k += blockDim.x) {
        float acc = 0.0f;
        for (int u = 0; u < n_rows; u++) acc = ADD(acc, MUL(lg[u], rows[(i64)u * hd + k]));
        out[(i64)h * hd + k] = acc / den;
    }
}

// Lightning-indexer scores: scores[b] = sum_h weights[h] * relu(q_h . rows[b]). One warp per
// row; q [n_head, di], rows [n_rows, di].
extern "C" __global__ void indexer_scores(const float* __restrict__ q,
                                          const float* __restrict__ weights, int n_head, int di,
                                          const float* __restrict__ rows, int n_rows,
                                          float* __restrict__ scores) {
    int b = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (b >= n_rows) return;  // whole warp
    const float* k = rows + (i64)b * di;
    float total = 0.0f;
    for (int h = 0; h < n_head; h++) {
        const float* qh = q + (i64)h * di;
        float s = 0.0f;
        for (int i = lane; i < di; i += 32) s += qh[i] * k[i];
        s = warp_sum(s);
        total = ADD(total, MUL(weights[h], fmaxf(s, 0.0f)));
    }
    if (lane == 0) scores[b] = total;
}

// SwiGLU of m rows of f values: g <- silu(min(g, c)) * clamp(u, -c, c) * w_row (no clamp when
// c <= 1e-6); w_row = weights[row] when weights is non-null, else weight_all.
extern "C" __global__ void swiglu_rows(float* __restrict__ g, const float* __restrict__ u, int f,
                                       int m, const float* __restrict__ weights, float weight_all,
                                       float clamp) {
    i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)m * f) return;
    float wgt = weights ? weights[idx / f] : weight_all;
    float gv = g[idx], uv = u[idx];
    if (clamp > 1e-6f) {
        gv = fminf(gv, clamp);
        uv = fminf(fmaxf(uv, -clamp), clamp);
    }
    g[idx] = MUL(MUL(MUL(gv, sigmoidf_(gv)), uv), wgt);
}

// xe[i] = x[tok[i]] for m rows of d values.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ tok,
                                       int m, int d, float* __restrict__ xe) {
    i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)m * d) return;
    int i = (int)(idx / d), k = (int)(idx % d);
    xe[idx] = x[(i64)tok[i] * d + k];
}

// y[tok[i]] += ye[i] for i = 0..m in order (one thread per column, so a token that appears
// twice is added twice, deterministically).
extern "C" __global__ void scatter_add_rows(float* __restrict__ y, const float* __restrict__ ye,
                                            const int* __restrict__ tok, int m, int d) {
    int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= d) return;
    for (int i = 0; i < m; i++) {
        i64 o = (i64)tok[i] * d + k;
        y[o] = ADD(y[o], ye[(i64)i * d + k]);
    }
}
