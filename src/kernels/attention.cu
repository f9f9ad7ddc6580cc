// attention.cu: the attention softmax (scale, softmax, dropout of the probabilities) forward and backward, and the
// layout shuffles between qkv rows [B,T,3C] and per-head tensors [B,H,T,hs]. The products Q K^T, P V and
// their gradients are batched cuBLAS calls in cuda_model.cu.
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

static __global__ void softmax_forward_kernel(float *att /* [rows, T] */, float *att_drop /* [rows, T] or NULL */,
                                              const uint8_t *keep /* [rows, T] or NULL */, float drop_scale,
                                              float scale, size_t rows, int T) {
    size_t row = (size_t)blockIdx.x * SM_ROWS_PER_BLOCK + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;  // whole warps leave together
    float *a = att + row * (size_t)T;  // [T]: unscaled scores in, probabilities out
    float maxv = -INFINITY;
    for (int j = lane; j < T; j += 32) maxv = fmaxf(maxv, __fmul_rn(a[j], scale));
    maxv = warp_max(maxv);
    float sum = 0.0f;
    for (int j = lane; j < T; j += 32) {
        float e = expf(__fsub_rn(__fmul_rn(a[j], scale), maxv));
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
                                     int BH, int T, cudaStream_t stream) {
    size_t rows = (size_t)BH * T;
    if (rows == 0) return;
    if (keep != NULL && att_drop == NULL) mlm_fatal(MLM_EXIT_FAILURE, "cuda_softmax_forward: keep without att_drop");
    unsigned grid = (unsigned)((rows + SM_ROWS_PER_BLOCK - 1) / SM_ROWS_PER_BLOCK);
    softmax_forward_kernel<<<grid, SM_BLOCK, 0, stream>>>(att, att_drop, keep, drop_scale, scale, rows, T);
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
