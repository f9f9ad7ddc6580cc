// attention.cu: the attention core. For T <= 64, one fused kernel per (batch, head) forward and backward (end of
// the file). For longer sequences, the attention softmax (scale, softmax, dropout of the probabilities) forward
// and backward and the layout shuffles between qkv rows [B,T,3C] and per-head tensors [B,H,T,hs]; there the
// products Q K^T, P V and their gradients are batched cuBLAS calls in cuda_model.cu.
#include <math.h>

#include "cuda_check.h"
#include "kernels.h"

// ---- Softmax over keys: one warp per row of T scores ------------------------------------------------------
// A row of any length T is walked by the 32 lanes with stride 32 (coalesced), in three passes: the max (for
// stability), the sum of exponentials (written back to the row, which only the writing lane re-reads), then
// the normalisation and dropout. Rows never share a warp, so no block-level synchronisation is needed.
// Arithmetic follows attention.c's softmax_rows: e = expf(s * scale - max), p = e * (1 / sum); the products
// are rounded separately (__fmul_rn) where nvcc would otherwise fuse them into the subtraction.

enum { SM_BLOCK = 256, SM_ROWS_PER_BLOCK = SM_BLOCK / 32 };

static __device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

static __device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// The key-padding mask of sequence b for a warp's row (attention.c's sequence_key_mask): its T flags, or NULL when
// there is no mask, or when every key or none is valid (a sequence of nothing but [PAD] attends to every key).
// Every lane of the warp gets the same answer.
static __device__ const uint8_t *warp_key_mask(const uint8_t *key_valid /* [B, T] or NULL */, size_t b, int T,
                                               int lane) {
    if (!key_valid) return NULL;
    const uint8_t *v = key_valid + b * (size_t)T;  // [T]
    float valid = 0.0f;  // a count: exact in float up to 2^24 keys
    for (int j = lane; j < T; j += 32) valid += v[j] != 0;
    valid = warp_sum(valid);
    return valid > 0.0f && valid < (float)T ? v : NULL;
}

static __global__ void softmax_forward_kernel(float *att /* [rows, T] */, float *att_drop /* [rows, T] or NULL */,
                                              const uint8_t *keep /* [rows, T] or NULL */, float drop_scale,
                                              float scale, size_t rows, int T,
                                              const uint8_t *key_valid /* [B, T] or NULL */, int H) {
    size_t row = (size_t)blockIdx.x * SM_ROWS_PER_BLOCK + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps leave together
    float *a = att + row * (size_t)T;  // [T]: unscaled scores in, probabilities out
    const uint8_t *kv = warp_key_mask(key_valid, row / ((size_t)H * T), T, lane);  // masked keys: probability 0
    float maxv = -INFINITY;
    for (int j = lane; j < T; j += 32)
        if (!kv || kv[j]) maxv = fmaxf(maxv, __fmul_rn(a[j], scale));
    maxv = warp_max(maxv);
    float sum = 0.0f;
    for (int j = lane; j < T; j += 32) {
        float e = !kv || kv[j] ? expf(__fsub_rn(__fmul_rn(a[j], scale), maxv)) : 0.0f;
        a[j] = e;
        sum += e;
    }
    float inv = __fdiv_rn(1.0f, warp_sum(sum));
    if (keep) {
        const uint8_t *k = keep + row * (size_t)T;  // [T]
        float *d = att_drop + row * (size_t)T;  // [T]
        for (int j = lane; j < T; j += 32) {
            float p = __fmul_rn(a[j], inv);
            a[j] = p;
            d[j] = __fmul_rn(p, (float)k[j] * drop_scale);  // THE DROPOUT RULE, as the CPU's p * (keep * scale)
        }
    } else {
        for (int j = lane; j < T; j += 32) a[j] = __fmul_rn(a[j], inv);
    }
}

extern "C" void cuda_softmax_forward(float *att, float *att_drop, const uint8_t *keep, float drop_scale, float scale,
                                     int BH, int T, const uint8_t *key_valid, int H, cudaStream_t stream) {
    size_t rows = (size_t)BH * T;
    if (rows == 0) return;
    if (keep != NULL && att_drop == NULL) mlm_fatal(MLM_EXIT_FAILURE, "cuda_softmax_forward: keep without att_drop");
    unsigned grid = (unsigned)((rows + SM_ROWS_PER_BLOCK - 1) / SM_ROWS_PER_BLOCK);
    softmax_forward_kernel<<<grid, SM_BLOCK, 0, stream>>>(att, att_drop, keep, drop_scale, scale, rows, T, key_valid,
                                                          H > 0 ? H : 1);
    CUDA_CHECK_LAUNCH();
}

// datt = datt_drop * keep * drop_scale; dscores = scale * att * (datt - sum_j att_j datt_j), as
// attention_backward: (att * (datt - dot)) * scale. Pass 1 reduces the dot product, pass 2 recomputes datt
// and writes; dscores may alias datt_drop since each element is read before it is written, by one lane.
static __global__ void softmax_backward_kernel(float *dscores /* [rows, T] */, const float *datt_drop /* [rows, T] */,
                                               const float *att /* [rows, T] */,
                                               const uint8_t *keep /* [rows, T] or NULL */, float drop_scale,
                                               float scale, size_t rows, int T) {
    size_t row = (size_t)blockIdx.x * SM_ROWS_PER_BLOCK + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float *da = datt_drop + row * (size_t)T;  // [T]
    const float *p = att + row * (size_t)T;  // [T]
    const uint8_t *k = keep ? keep + row * (size_t)T : NULL;  // [T]
    float *ds = dscores + row * (size_t)T;  // [T]
    float dot = 0.0f;
    for (int j = lane; j < T; j += 32) {
        float g = k ? __fmul_rn(da[j], (float)k[j] * drop_scale) : da[j];
        dot += p[j] * g;
    }
    dot = warp_sum(dot);
    for (int j = lane; j < T; j += 32) {
        float g = k ? __fmul_rn(da[j], (float)k[j] * drop_scale) : da[j];
        ds[j] = __fmul_rn(__fmul_rn(p[j], __fsub_rn(g, dot)), scale);
    }
}

extern "C" void cuda_softmax_backward(float *dscores, const float *datt_drop, const float *att, const uint8_t *keep,
                                      float drop_scale, float scale, int BH, int T, cudaStream_t stream) {
    size_t rows = (size_t)BH * T;
    if (rows == 0) return;
    unsigned grid = (unsigned)((rows + SM_ROWS_PER_BLOCK - 1) / SM_ROWS_PER_BLOCK);
    softmax_backward_kernel<<<grid, SM_BLOCK, 0, stream>>>(dscores, datt_drop, att, keep, drop_scale, scale, rows, T);
    CUDA_CHECK_LAUNCH();
}

// ---- Layout shuffles ------------------------------------------------------------------------------------
// Head h owns features h*hs .. h*hs+hs-1 of each of q, k, v (hs = C / H). One thread per element of the
// destination, so writes are fully coalesced and reads are contiguous over runs of hs floats.

enum { LAYOUT_BLOCK = 256 };

static unsigned layout_grid(size_t n) {
    size_t g = (n + LAYOUT_BLOCK - 1) / LAYOUT_BLOCK;
    return (unsigned)(g < (1u << 20) ? g : (1u << 20));
}

static int head_size(int C, int H, const char *who) {
    if (H <= 0 || C % H != 0) mlm_fatal(MLM_EXIT_FAILURE, "%s: d_model %d is not a multiple of n_heads %d", who, C, H);
    return C / H;
}

#define LAYOUT_LOOP(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// q, k, v [B,H,T,hs] from qkv [B,T,3C].
static __global__ void qkv_split_heads_kernel(float *q /* [B,H,T,hs] */, float *k /* [B,H,T,hs] */,
                                              float *v /* [B,H,T,hs] */, const float *qkv /* [B,T,3C] */, int B, int T,
                                              int C, int H, int hs) {
    size_t n = (size_t)B * H * T * hs;
    LAYOUT_LOOP(i, n) {
        int d = (int)(i % hs);
        size_t r = i / hs;  // (b, h, t)
        int t = (int)(r % T);
        r /= T;
        int h = (int)(r % H);
        size_t b = r / H;
        const float *src = qkv + (b * T + t) * (size_t)(3 * C) + (size_t)h * hs + d;
        q[i] = src[0];
        k[i] = src[C];
        v[i] = src[2 * C];
    }
}

// dqkv [B,T,3C] (overwritten) from dq, dk, dv [B,H,T,hs].
static __global__ void qkv_merge_heads_kernel(float *dqkv /* [B,T,3C] */, const float *dq /* [B,H,T,hs] */,
                                              const float *dk /* [B,H,T,hs] */, const float *dv /* [B,H,T,hs] */, int B,
                                              int T, int C, int H, int hs) {
    size_t n = (size_t)B * T * 3 * C;
    LAYOUT_LOOP(i, n) {
        int c3 = (int)(i % (size_t)(3 * C));
        size_t bt = i / (size_t)(3 * C);
        int t = (int)(bt % T);
        size_t b = bt / T;
        int which = c3 / C, c = c3 % C;
        int h = c / hs, d = c % hs;
        size_t j = ((b * H + h) * T + t) * (size_t)hs + d;
        dqkv[i] = which == 0 ? dq[j] : which == 1 ? dk[j] : dv[j];
    }
}

// out [B,T,C] (heads concatenated) from y [B,H,T,hs].
static __global__ void heads_to_rows_kernel(float *out /* [B,T,C] */, const float *y /* [B,H,T,hs] */, int B, int T,
                                            int C, int H, int hs) {
    size_t n = (size_t)B * T * C;
    LAYOUT_LOOP(i, n) {
        int c = (int)(i % (size_t)C);
        size_t bt = i / (size_t)C;
        int t = (int)(bt % T);
        size_t b = bt / T;
        int h = c / hs, d = c % hs;
        out[i] = y[((b * H + h) * T + t) * (size_t)hs + d];
    }
}

// y [B,H,T,hs] from in [B,T,C].
static __global__ void rows_to_heads_kernel(float *y /* [B,H,T,hs] */, const float *in /* [B,T,C] */, int B, int T,
                                            int C, int H, int hs) {
    size_t n = (size_t)B * H * T * hs;
    LAYOUT_LOOP(i, n) {
        int d = (int)(i % hs);
        size_t r = i / hs;
        int t = (int)(r % T);
        r /= T;
        int h = (int)(r % H);
        size_t b = r / H;
        y[i] = in[(b * T + t) * (size_t)C + (size_t)h * hs + d];
    }
}

extern "C" void cuda_qkv_split_heads(float *q, float *k, float *v, const float *qkv, int B, int T, int C, int H,
                                     cudaStream_t stream) {
    int hs = head_size(C, H, "cuda_qkv_split_heads");
    size_t n = (size_t)B * T * C;
    if (n == 0) return;
    qkv_split_heads_kernel<<<layout_grid(n), LAYOUT_BLOCK, 0, stream>>>(q, k, v, qkv, B, T, C, H, hs);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_qkv_merge_heads(float *dqkv, const float *dq, const float *dk, const float *dv, int B, int T,
                                     int C, int H, cudaStream_t stream) {
    int hs = head_size(C, H, "cuda_qkv_merge_heads");
    size_t n = (size_t)B * T * 3 * C;
    if (n == 0) return;
    qkv_merge_heads_kernel<<<layout_grid(n), LAYOUT_BLOCK, 0, stream>>>(dqkv, dq, dk, dv, B, T, C, H, hs);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_heads_to_rows(float *out, const float *y, int B, int T, int C, int H, cudaStream_t stream) {
    int hs = head_size(C, H, "cuda_heads_to_rows");
    size_t n = (size_t)B * T * C;
    if (n == 0) return;
    heads_to_rows_kernel<<<layout_grid(n), LAYOUT_BLOCK, 0, stream>>>(out, y, B, T, C, H, hs);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_rows_to_heads(float *y, const float *in, int B, int T, int C, int H, cudaStream_t stream) {
    int hs = head_size(C, H, "cuda_rows_to_heads");
    size_t n = (size_t)B * T * C;
    if (n == 0) return;
    rows_to_heads_kernel<<<layout_grid(n), LAYOUT_BLOCK, 0, stream>>>(y, in, B, T, C, H, hs);
    CUDA_CHECK_LAUNCH();
}

// ---- Fused attention for short sequences (T <= ATTN_FUSED_MAX_T) -------------------------------------------
// One block per (batch, head) pair holds the head's Q, K, V [T, hs] and its [T, T] probabilities in shared
// memory, so the whole core (bias add of qkv, scores, softmax, dropout, P V, the heads' concatenation) is one
// launch and one pass over qkv instead of a bias add, a head split, two batched products, the softmax and a
// head merge. The backward likewise: dV, d dropout(P), the softmax backward, dQ and dK, written straight into
// dqkv's rows, plus the per-batch partial column sums of dqkv (the qkv bias gradient; cuda_column_sums_finish
// adds them). The CPU twin is linear_forward's bias add followed by attention_forward / attention_backward
// (attention.c); the arithmetic is the same except for the order of the dot products' sums.
//
// K and V rows are padded to hs + 1 floats where it fits, so that threads of a warp reading K[j][d] (or V[j][d])
// for consecutive j hit different shared-memory banks.

enum { ATTN_FUSED_MAX_T = 64, ATTN_BLOCK = 128, ATTN_MAX_SHMEM = 48 * 1024 };

typedef struct {
    int T, hs, ldkv;          // ldkv: row stride of K and V in shared memory (hs or hs + 1)
    size_t fwd_floats, bwd_floats;
} AttnShape;

// forward: Q [T, hs], K, V [T, ldkv], P [T, T]; backward adds dY [T, hs] and dP [T, T].
static size_t attn_fwd_floats(int T, int hs, int ldkv) { return (size_t)T * hs + 2 * (size_t)T * ldkv + (size_t)T * T; }
static size_t attn_bwd_floats(int T, int hs, int ldkv) { return attn_fwd_floats(T, hs, ldkv) + (size_t)T * hs + (size_t)T * T; }

// The layout of both kernels, or 0 when the fused kernels do not apply (T too long, shared memory too small).
static int attn_shape(AttnShape *s, int T, int C, int H) {
    if (T < 1 || T > ATTN_FUSED_MAX_T || H <= 0 || C % H != 0) return 0;
    int hs = C / H;
    const size_t most = ATTN_MAX_SHMEM / sizeof(float);
    int ld = attn_bwd_floats(T, hs, hs + 1) <= most ? hs + 1 : hs;
    if (attn_bwd_floats(T, hs, ld) > most) return 0;
    *s = (AttnShape){T, hs, ld, attn_fwd_floats(T, hs, ld), attn_bwd_floats(T, hs, ld)};
    return 1;
}

extern "C" int cuda_attention_fused_fits(int T, int C, int H) {
    AttnShape s;
    return attn_shape(&s, T, C, H);
}

extern "C" size_t cuda_attention_bias_scratch(int B, int C) { return (size_t)B * 3 * (size_t)C; }

// Q, K, V of head h of sequence b from qkv rows (+ bias), into shared memory.
static __device__ void attn_load_qkv(float *q /* [T, hs] */, float *k /* [T, ldkv] */, float *v /* [T, ldkv] */,
                                     const float *qkv /* [B, T, 3C] */, const float *bias /* [3C] or NULL */, int b,
                                     int h, int T, int C, int hs, int ldkv) {
    for (int idx = threadIdx.x; idx < T * hs; idx += blockDim.x) {
        int t = idx / hs, d = idx % hs, c = h * hs + d;
        const float *row = qkv + ((size_t)b * T + t) * 3 * (size_t)C;  // [3C]
        float xq = row[c], xk = row[C + c], xv = row[2 * C + c];
        if (bias) {
            xq = __fadd_rn(xq, bias[c]);
            xk = __fadd_rn(xk, bias[C + c]);
            xv = __fadd_rn(xv, bias[2 * C + c]);
        }
        q[t * hs + d] = xq;
        k[t * ldkv + d] = xk;
        v[t * ldkv + d] = xv;
    }
}

// grid B * H, block ATTN_BLOCK, dynamic shared memory fwd_floats.
static __global__ void attention_forward_kernel(float *out /* [B, T, C] */, float *att /* [B, H, T, T] */,
                                                const float *qkv /* [B, T, 3C] */, const float *bias /* [3C] or NULL */,
                                                const uint8_t *keep /* [B, H, T, T] or NULL */, float drop_scale,
                                                float scale, int T, int C, int H, int hs, int ldkv,
                                                const uint8_t *key_valid /* [B, T] or NULL */) {
    extern __shared__ float attn_sh[];
    float *q = attn_sh;  // [T, hs]
    float *k = q + T * hs;  // [T, ldkv]
    float *v = k + T * ldkv;  // [T, ldkv]
    float *p = v + T * ldkv;  // [T, T]: scores, then probabilities, then dropout(probabilities)
    int bh = blockIdx.x, b = bh / H, h = bh % H;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    attn_load_qkv(q, k, v, qkv, bias, b, h, T, C, hs, ldkv);
    __syncthreads();
    // Scores, scaled after the sum as the CPU's sgemm(alpha = scale).
    for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) {
        int i = idx / T, j = idx % T;
        float s = 0.0f;
        for (int d = 0; d < hs; d++) s += q[i * hs + d] * k[j * ldkv + d];
        p[idx] = __fmul_rn(s, scale);
    }
    __syncthreads();
    // Softmax over keys, one warp per row (as softmax_forward_kernel); the probabilities are saved for the
    // backward, the dropped ones stay in shared memory for P V.
    float *att_bh = att + (size_t)bh * T * T;  // [T, T]
    const uint8_t *keep_bh = keep ? keep + (size_t)bh * T * T : NULL;  // [T, T]
    for (int i = warp; i < T; i += warps) {  // warp-uniform: whole warps enter and leave together
        float *r = p + i * T;
        const uint8_t *kv = warp_key_mask(key_valid, (size_t)b, T, lane);  // masked keys: probability 0
        float maxv = -INFINITY;
        for (int j = lane; j < T; j += 32)
            if (!kv || kv[j]) maxv = fmaxf(maxv, r[j]);
        maxv = warp_max(maxv);
        float sum = 0.0f;
        for (int j = lane; j < T; j += 32) {
            float e = !kv || kv[j] ? expf(__fsub_rn(r[j], maxv)) : 0.0f;
            r[j] = e;
            sum += e;
        }
        float inv = __fdiv_rn(1.0f, warp_sum(sum));
        for (int j = lane; j < T; j += 32) {
            float pr = __fmul_rn(r[j], inv);
            att_bh[i * T + j] = pr;
            r[j] = keep_bh ? __fmul_rn(pr, (float)keep_bh[i * T + j] * drop_scale) : pr;  // THE DROPOUT RULE
        }
    }
    __syncthreads();
    // out[b, i, h*hs + d] = sum_j P[i, j] V[j, d]: the heads concatenated directly.
    for (int idx = threadIdx.x; idx < T * hs; idx += blockDim.x) {
        int i = idx / hs, d = idx % hs;
        float y = 0.0f;
        for (int j = 0; j < T; j++) y += p[i * T + j] * v[j * ldkv + d];
        out[((size_t)b * T + i) * C + (size_t)h * hs + d] = y;
    }
}

extern "C" void cuda_attention_forward(float *out, float *att, const float *qkv, const float *qkv_bias,
                                       const uint8_t *keep, float drop_scale, int B, int T, int C, int H,
                                       const uint8_t *key_valid, cudaStream_t stream) {
    AttnShape s;
    if (!attn_shape(&s, T, C, H))
        mlm_fatal(MLM_EXIT_FAILURE, "cuda_attention_forward: T %d, d_model %d, %d heads do not fit the fused kernel "
                  "(T <= %d and 48 KiB of shared memory); use the unfused path", T, C, H, ATTN_FUSED_MAX_T);
    if (B <= 0) return;
    float scale = 1.0f / sqrtf((float)s.hs);
    attention_forward_kernel<<<(unsigned)(B * H), ATTN_BLOCK, s.fwd_floats * sizeof(float), stream>>>(
        out, att, qkv, qkv_bias, keep, drop_scale, scale, T, C, H, s.hs, s.ldkv, key_valid);
    CUDA_CHECK_LAUNCH();
}

// grid B * H, block ATTN_BLOCK, dynamic shared memory bwd_floats. dqkv's slices of head h are overwritten;
// bias_partial[b, 3C] (if not NULL) receives the column sums of the block's rows of dqkv over t, in order.
static __global__ void attention_backward_kernel(float *dqkv /* [B, T, 3C] */, float *bias_partial /* [B, 3C] */,
                                                 const float *dout /* [B, T, C] */, const float *qkv /* [B, T, 3C] */,
                                                 const float *bias /* [3C] or NULL */, const float *att /* [B,H,T,T] */,
                                                 const uint8_t *keep /* [B, H, T, T] or NULL */, float drop_scale,
                                                 float scale, int T, int C, int H, int hs, int ldkv) {
    extern __shared__ float attn_sh[];
    float *q = attn_sh;  // [T, hs]
    float *k = q + T * hs;  // [T, ldkv]
    float *v = k + T * ldkv;  // [T, ldkv]
    float *p = v + T * ldkv;  // [T, T] probabilities (before dropout)
    float *dy = p + T * T;  // [T, hs] gradient of the head's output
    float *dp = dy + T * hs;  // [T, T] d dropout(P), then d scores
    int bh = blockIdx.x, b = bh / H, h = bh % H;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const uint8_t *keep_bh = keep ? keep + (size_t)bh * T * T : NULL;  // [T, T]
    size_t row0 = (size_t)b * T;  // first row of sequence b
    attn_load_qkv(q, k, v, qkv, bias, b, h, T, C, hs, ldkv);
    for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) p[idx] = att[(size_t)bh * T * T + idx];
    for (int idx = threadIdx.x; idx < T * hs; idx += blockDim.x) {
        int t = idx / hs, d = idx % hs;
        dy[idx] = dout[(row0 + t) * C + (size_t)h * hs + d];
    }
    __syncthreads();
    // dV = dropout(P)^T dY, with dropout(P) recomputed as the forward's (bit-identical) into dp first, so
    // that the mask is read once rather than once per output column.
    for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x)
        dp[idx] = keep_bh ? __fmul_rn(p[idx], (float)keep_bh[idx] * drop_scale) : p[idx];
    __syncthreads();
    for (int idx = threadIdx.x; idx < T * hs; idx += blockDim.x) {
        int j = idx / hs, d = idx % hs;
        float s = 0.0f;
        for (int i = 0; i < T; i++) s += dp[i * T + j] * dy[i * hs + d];
        dqkv[(row0 + j) * 3 * C + 2 * (size_t)C + (size_t)h * hs + d] = s;
    }
    __syncthreads();
    // d dropout(P) = dY V^T, over dropout(P).
    for (int idx = threadIdx.x; idx < T * T; idx += blockDim.x) {
        int i = idx / T, j = idx % T;
        float s = 0.0f;
        for (int d = 0; d < hs; d++) s += dy[i * hs + d] * v[j * ldkv + d];
        dp[idx] = s;
    }
    __syncthreads();
    // Undo the dropout, then the softmax and the score scale, one warp per row (as softmax_backward_kernel).
    for (int i = warp; i < T; i += warps) {
        float *g = dp + i * T;
        const float *pr = p + i * T;
        float dot = 0.0f;
        for (int j = lane; j < T; j += 32) {
            if (keep_bh) g[j] = __fmul_rn(g[j], (float)keep_bh[i * T + j] * drop_scale);
            dot += pr[j] * g[j];
        }
        dot = warp_sum(dot);
        for (int j = lane; j < T; j += 32) g[j] = __fmul_rn(__fmul_rn(pr[j], __fsub_rn(g[j], dot)), scale);
    }
    __syncthreads();
    // dQ = dS K, dK = dS^T Q.
    for (int idx = threadIdx.x; idx < T * hs; idx += blockDim.x) {
        int i = idx / hs, d = idx % hs;
        float sq = 0.0f, sk = 0.0f;
        for (int j = 0; j < T; j++) {
            sq += dp[i * T + j] * k[j * ldkv + d];
            sk += dp[j * T + i] * q[j * hs + d];
        }
        float *row = dqkv + (row0 + i) * 3 * C + (size_t)h * hs + d;
        row[0] = sq;
        row[C] = sk;
    }
    if (!bias_partial) return;
    __syncthreads();  // the block's own global writes above are visible to the block after the barrier
    for (int idx = threadIdx.x; idx < 3 * hs; idx += blockDim.x) {
        int which = idx / hs, d = idx % hs;
        size_t c = (size_t)which * C + (size_t)h * hs + d;
        float s = 0.0f;
        for (int t = 0; t < T; t++) s += dqkv[(row0 + t) * 3 * C + c];
        bias_partial[(size_t)b * 3 * C + c] = s;
    }
}

extern "C" void cuda_attention_backward(float *dqkv, float *bias_partial, const float *dout, const float *qkv,
                                        const float *qkv_bias, const float *att, const uint8_t *keep,
                                        float drop_scale, int B, int T, int C, int H, cudaStream_t stream) {
    AttnShape s;
    if (!attn_shape(&s, T, C, H))
        mlm_fatal(MLM_EXIT_FAILURE, "cuda_attention_backward: T %d, d_model %d, %d heads do not fit the fused "
                  "kernel (T <= %d and 48 KiB of shared memory); use the unfused path", T, C, H, ATTN_FUSED_MAX_T);
    if (B <= 0) return;
    float scale = 1.0f / sqrtf((float)s.hs);
    attention_backward_kernel<<<(unsigned)(B * H), ATTN_BLOCK, s.bwd_floats * sizeof(float), stream>>>(
        dqkv, bias_partial, dout, qkv, qkv_bias, att, keep, drop_scale, scale, T, C, H, s.hs, s.ldkv);
    CUDA_CHECK_LAUNCH();
}

// ---- The key-padding mask (model.arch = bert) -------------------------------------------------------------
// valid[n] = inputs[n] != pad_id: transformers' attention_mask, as cpu_model.c derives it.
static __global__ void key_valid_kernel(uint8_t *valid /* [n] */, const int *inputs /* [n] */, size_t n, int pad_id) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        valid[i] = inputs[i] != pad_id;
}

extern "C" void cuda_key_valid(uint8_t *valid, const int *inputs, size_t n, int pad_id, cudaStream_t stream) {
    if (n == 0) return;
    size_t blocks = (n + 255) / 256;
    key_valid_kernel<<<(unsigned)(blocks < (1u << 20) ? blocks : (1u << 20)), 256, 0, stream>>>(valid, inputs, n, pad_id);
    CUDA_CHECK_LAUNCH();
}
