// layernorm.cu: LayerNorm over the channel dimension (biased variance, as PyTorch), forward and backward, and the
// residual add + dropout fused into the LayerNorm that follows it.
//
// One warp per row for the per-row work (any C: each lane walks the row with stride 32, so loads are
// coalesced); the weight/bias gradients are column sums over the N rows, computed without atomics by a
// fixed two-pass reduction (see the backward). Row sums use butterfly shuffles: every lane ends with the
// same bits (a + b == b + a), so the whole warp agrees on mean and rstd.
// Templates over the storage type X of the rows, parameters and input gradients (act.cuh); the statistics (mean,
// rstd) and the weight/bias gradients are FP32 in either. In BF16 a fused kernel's LayerNorm is taken of the
// residual sum as stored (rounded), and dy of the input gradient as stored: the CPU reference's order.
#include <math.h>

#include "act.cuh"
#include "cuda_check.h"
#include "kernels.h"

enum { LN_BLOCK = 256, LN_ROWS_PER_BLOCK = LN_BLOCK / 32 };

static __device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ---- Forward ------------------------------------------------------------------------------------------

// Two passes over the row (mean, then the centred variance) as the CPU, avoiding E[x^2] - E[x]^2
// cancellation; the row is re-read from L1/L2 rather than kept in registers so any C works.
// The output expression ((x - m) * s) * w + b is rounded step by step (no fused multiply-add) as the CPU.
template <typename X>
static __global__ void layernorm_forward_kernel(X *out /* [N, C] */, float *mean /* [N] */, float *rstd /* [N] */,
                                                const X *inp /* [N, C] */, const X *w /* [C] */, const X *b /* [C] */,
                                                int N, int C, float eps) {
    int row = blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;  // whole warps leave together (row is per warp)
    const X *x = inp + (size_t)row * C;  // [C]
    X *y = out + (size_t)row * C;  // [C]
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += ld(x, c);
    float m = __fdiv_rn(warp_sum(sum), (float)C);
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = __fsub_rn(ld(x, c), m);
        sq += d * d;
    }
    float var = __fdiv_rn(warp_sum(sq), (float)C);
    float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));  // 1 / sqrtf(var + eps), correctly rounded
    for (int c = lane; c < C; c += 32)
        st(y, c, __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(ld(x, c), m), s), ld(w, c)), ld(b, c)));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = s;
    }
}

template <typename X>
static void layernorm_forward(X *out, float *mean, float *rstd, const X *inp, const X *w, const X *b, int N, int C,
                              float eps, cudaStream_t stream) {
    if (N <= 0 || C <= 0) return;
    unsigned grid = (unsigned)((N + LN_ROWS_PER_BLOCK - 1) / LN_ROWS_PER_BLOCK);
    layernorm_forward_kernel<X><<<grid, LN_BLOCK, 0, stream>>>(out, mean, rstd, inp, w, b, N, C, eps);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                                       const float *b, int N, int C, float eps, cudaStream_t stream) {
    layernorm_forward(out, mean, rstd, inp, w, b, N, C, eps, stream);
}
void cuda_layernorm_forward(bf16 *out, float *mean, float *rstd, const bf16 *inp, const bf16 *w, const bf16 *b, int N,
                            int C, float eps, cudaStream_t stream) {
    layernorm_forward(out, mean, rstd, inp, w, b, N, C, eps, stream);
}

// ---- Residual add + dropout fused into the following LayerNorm (forward) ---------------------------------
// res_out = res + dropout(y + bias[col]) (as residual_dropout_forward_kernel), then ln_out = LayerNorm(res_out)
// (as layernorm_forward_kernel): one warp per row, the same per-lane sums, so both outputs are bit-identical to
// the two separate kernels. The row is kept in shared memory for the variance and output passes, so it is read
// from global memory once instead of three times (and once more by a separate LayerNorm).

enum { RLN_MAX_SHMEM = 48 * 1024 };

static int rln_rows_per_block(int C) {
    int rows = (int)(RLN_MAX_SHMEM / ((size_t)C * sizeof(float)));
    return rows < LN_ROWS_PER_BLOCK ? rows : LN_ROWS_PER_BLOCK;
}

// The LayerNorm of one row held in shared memory xs[C] whose lanes' partial sum is `sum` (each lane summed its
// columns lane, lane + 32, ... in order), as layernorm_forward_kernel.
template <typename X>
static __device__ void layernorm_row_from_shared(X *y /* [C] */, float *mean, float *rstd, const float *xs /* [C] */,
                                                 float sum, const X *w /* [C] */, const X *b /* [C] */, int C,
                                                 float eps) {
    int lane = threadIdx.x % 32;
    float m = __fdiv_rn(warp_sum(sum), (float)C);
    float sq = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = __fsub_rn(xs[c], m);
        sq += d * d;
    }
    float var = __fdiv_rn(warp_sum(sq), (float)C);
    float s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
    for (int c = lane; c < C; c += 32)
        st(y, c, __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(xs[c], m), s), ld(w, c)), ld(b, c)));
    if (lane == 0) {
        *mean = m;
        *rstd = s;
    }
}

// grid ceil(N / rows), block 32 * rows, dynamic shared memory rows * C floats.
template <typename X>
static __global__ void residual_layernorm_forward_kernel(X *res_out /* [N, C] */, X *ln_out /* [N, C] */,
                                                         float *mean /* [N] */, float *rstd /* [N] */,
                                                         const X *res /* [N, C] */, const X *y /* [N, C] */,
                                                         const X *bias /* [C] or NULL */,
                                                         const KeepWord *keep /* [N, C] bits or NULL */, float scale,
                                                         const X *w /* [C] */, const X *b /* [C] */, int N, int C,
                                                         float eps) {
    extern __shared__ float rln_rows[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= N) return;  // whole warps leave together
    float *xs = rln_rows + (size_t)warp * C;  // [C] this warp's row
    size_t r0 = (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float x = ld(y, r0 + c);
        if (bias) x = __fadd_rn(x, ld(bias, c));
        if (keep) x = __fmul_rn(x, (float)keep_bit(keep, r0 + c) * scale);  // the CPU's y * ((float)keep * scale)
        x = st(res_out, r0 + c, __fadd_rn(ld(res, r0 + c), x));  // the LayerNorm's input: the sum as stored
        xs[c] = x;  // read back by this lane only
        sum += x;
    }
    layernorm_row_from_shared(ln_out + r0, mean + row, rstd + row, xs, sum, w, b, C, eps);
}

// The embedding (embedding_forward_kernel's expression: tok_emb[token] * sqrt(C) + pe[t]) fused with the first
// LayerNorm in the same way. grid, block and shared memory as residual_layernorm_forward_kernel.
template <typename X>
static __global__ void embedding_layernorm_forward_kernel(X *emb_out /* [N, C] */, X *ln_out /* [N, C] */,
                                                          float *mean /* [N] */, float *rstd /* [N] */,
                                                          const int *tokens /* [N] */, const X *tok_emb /* [V, C] */,
                                                          const float *pe /* [T, C] */, float emb_scale,
                                                          const X *w /* [C] */, const X *b /* [C] */, int N, int T,
                                                          int C, float eps) {
    extern __shared__ float rln_rows[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int row = blockIdx.x * (blockDim.x / 32) + warp;
    if (row >= N) return;
    float *xs = rln_rows + (size_t)warp * C;  // [C]
    size_t r0 = (size_t)row * C;
    const X *e = tok_emb + (size_t)tokens[row] * C;  // [C]
    const float *p = pe + (size_t)(row % T) * C;  // [C]
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float x = st(emb_out, r0 + c, __fadd_rn(__fmul_rn(ld(e, c), emb_scale), p[c]));
        xs[c] = x;
        sum += x;
    }
    layernorm_row_from_shared(ln_out + r0, mean + row, rstd + row, xs, sum, w, b, C, eps);
}

template <typename X>
static void embedding_layernorm_forward(X *emb_out, X *ln_out, float *mean, float *rstd, const int *tokens,
                                        const X *tok_emb, const float *pe, const X *w, const X *b, int B, int T, int C,
                                        float eps, cudaStream_t stream) {
    int N = B * T;
    if (N <= 0 || C <= 0) return;
    int rows = rln_rows_per_block(C);
    if (rows < 1) {  // a row longer than shared memory: the two kernels
        cuda_embedding_forward(emb_out, tokens, tok_emb, pe, B, T, C, stream);
        cuda_layernorm_forward(ln_out, mean, rstd, emb_out, w, b, N, C, eps, stream);
        return;
    }
    float emb_scale = sqrtf((float)C);  // as cuda_embedding_forward
    unsigned grid = (unsigned)((N + rows - 1) / rows);
    embedding_layernorm_forward_kernel<X><<<grid, 32 * rows, (size_t)rows * C * sizeof(float), stream>>>(
        emb_out, ln_out, mean, rstd, tokens, tok_emb, pe, emb_scale, w, b, N, T, C, eps);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_embedding_layernorm_forward(float *emb_out, float *ln_out, float *mean, float *rstd,
                                                 const int *tokens, const float *tok_emb, const float *pe,
                                                 const float *w, const float *b, int B, int T, int C, float eps,
                                                 cudaStream_t stream) {
    embedding_layernorm_forward(emb_out, ln_out, mean, rstd, tokens, tok_emb, pe, w, b, B, T, C, eps, stream);
}
void cuda_embedding_layernorm_forward(bf16 *emb_out, bf16 *ln_out, float *mean, float *rstd, const int *tokens,
                                      const bf16 *tok_emb, const float *pe, const bf16 *w, const bf16 *b, int B, int T,
                                      int C, float eps, cudaStream_t stream) {
    embedding_layernorm_forward(emb_out, ln_out, mean, rstd, tokens, tok_emb, pe, w, b, B, T, C, eps, stream);
}

template <typename X>
static void residual_layernorm_forward(X *res_out, X *ln_out, float *mean, float *rstd, const X *res, const X *y,
                                       const X *bias, const KeepWord *keep, float scale, const X *w, const X *b, int N,
                                       int C, float eps, cudaStream_t stream) {
    if (N <= 0 || C <= 0) return;
    int rows = rln_rows_per_block(C);
    if (rows < 1) {  // a row longer than shared memory: the two kernels
        cuda_residual_dropout_forward(res_out, res, y, bias, keep, scale, (size_t)N * C, C, stream);
        cuda_layernorm_forward(ln_out, mean, rstd, res_out, w, b, N, C, eps, stream);
        return;
    }
    unsigned grid = (unsigned)((N + rows - 1) / rows);
    residual_layernorm_forward_kernel<X><<<grid, 32 * rows, (size_t)rows * C * sizeof(float), stream>>>(
        res_out, ln_out, mean, rstd, res, y, bias, keep, scale, w, b, N, C, eps);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_residual_layernorm_forward(float *res_out, float *ln_out, float *mean, float *rstd,
                                                const float *res, const float *y, const float *bias,
                                                const KeepWord *keep, float scale, const float *w, const float *b,
                                                int N, int C, float eps, cudaStream_t stream) {
    residual_layernorm_forward(res_out, ln_out, mean, rstd, res, y, bias, keep, scale, w, b, N, C, eps, stream);
}
void cuda_residual_layernorm_forward(bf16 *res_out, bf16 *ln_out, float *mean, float *rstd, const bf16 *res,
                                     const bf16 *y, const bf16 *bias, const KeepWord *keep, float scale, const bf16 *w,
                                     const bf16 *b, int N, int C, float eps, cudaStream_t stream) {
    residual_layernorm_forward(res_out, ln_out, mean, rstd, res, y, bias, keep, scale, w, b, N, C, eps, stream);
}

// ---- Backward -----------------------------------------------------------------------------------------
// dinp += rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w, norm = (x - mean) * rstd:
// one warp per row. dw += sum_n dout * norm and db += sum_n dout: pass 1 gives each block a fixed chunk of
// LNB_ROWS rows and 32 columns (threads (x, y) sum rows y, y + 8, ... of column x in order, then row y = 0
// adds the 8 partials in order) and writes per-chunk sums to scratch; pass 2 adds the chunks in order to
// dw and db. The partition depends on N only, so the sums are the same on every run and every GPU.

enum { LNB_ROWS = 64, LNB_TX = 32, LNB_TY = 8 };

static int lnb_chunks(int N) { return (N + LNB_ROWS - 1) / LNB_ROWS; }

// scratch = [3][chunks][C]: dw partials, db partials, then the residual branch's bias partials (the unfused
// path's column sums need only [chunks][C]).
extern "C" size_t cuda_layernorm_backward_scratch(int N, int C) { return 3 * (size_t)lnb_chunks(N) * (size_t)C; }

// One row's means of dnorm = g * w and of dnorm * norm over its C columns (a warp per row, lane = column
// offset): the two sums every LayerNorm backward kernel needs before it can write dinp.
template <typename X>
static __device__ __forceinline__ void row_dnorm_means(const X *x /* [C] */, const X *g /* [C] */, const X *w /* [C] */,
                                                       float m, float s, int C, int lane, float *mean_dnorm,
                                                       float *mean_dnorm_norm) {
    float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float norm = __fmul_rn(__fsub_rn(ld(x, c), m), s);
        float dnorm = __fmul_rn(ld(g, c), ld(w, c));
        sum_dnorm += dnorm;
        sum_dnorm_norm += dnorm * norm;
    }
    *mean_dnorm = __fdiv_rn(warp_sum(sum_dnorm), (float)C);
    *mean_dnorm_norm = __fdiv_rn(warp_sum(sum_dnorm_norm), (float)C);
}

template <typename X>
static __global__ void layernorm_backward_dinp_kernel(X *dinp /* [N, C] */, const X *dout /* [N, C] */,
                                                      const X *inp /* [N, C] */, const X *w /* [C] */,
                                                      const float *mean /* [N] */, const float *rstd /* [N] */, int N,
                                                      int C) {
    int row = blockIdx.x * LN_ROWS_PER_BLOCK + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= N) return;
    const X *x = inp + (size_t)row * C;  // [C]
    const X *g = dout + (size_t)row * C;  // [C]
    X *dx = dinp + (size_t)row * C;  // [C]
    float m = mean[row], s = rstd[row];
    float mean_dnorm, mean_dnorm_norm;
    row_dnorm_means(x, g, w, m, s, C, lane, &mean_dnorm, &mean_dnorm_norm);
    for (int c = lane; c < C; c += 32) {
        float norm = __fmul_rn(__fsub_rn(ld(x, c), m), s);
        // The CPU's s * (g * w - mean_dnorm - norm * mean_dnorm_norm), rounded step by step.
        float t = __fsub_rn(__fsub_rn(__fmul_rn(ld(g, c), ld(w, c)), mean_dnorm), __fmul_rn(norm, mean_dnorm_norm));
        st(dx, c, __fadd_rn(ld(dx, c), __fmul_rn(s, t)));
    }
}

// grid (chunks, ceil(C / 32)), block (32, 8).
template <typename X>
static __global__ void layernorm_backward_partial_kernel(float *scratch /* [2, chunks, C] */,
                                                         const X *dout /* [N, C] */, const X *inp /* [N, C] */,
                                                         const float *mean /* [N] */, const float *rstd /* [N] */,
                                                         int N, int C) {
    __shared__ float pw[LNB_TY][LNB_TX], pb[LNB_TY][LNB_TX];
    int chunks = gridDim.x;
    int c = blockIdx.y * LNB_TX + threadIdx.x;
    int r0 = blockIdx.x * LNB_ROWS, r1 = min(r0 + LNB_ROWS, N);
    float sw = 0.0f, sb = 0.0f;
    if (c < C)
        for (int r = r0 + (int)threadIdx.y; r < r1; r += LNB_TY) {
            float g = ld(dout, (size_t)r * C + c);
            float norm = __fmul_rn(__fsub_rn(ld(inp, (size_t)r * C + c), mean[r]), rstd[r]);
            sw += g * norm;
            sb += g;
        }
    pw[threadIdx.y][threadIdx.x] = sw;
    pb[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float tw = pw[0][threadIdx.x], tb = pb[0][threadIdx.x];
        for (int k = 1; k < LNB_TY; k++) {
            tw += pw[k][threadIdx.x];
            tb += pb[k][threadIdx.x];
        }
        scratch[(size_t)blockIdx.x * C + c] = tw;
        scratch[((size_t)chunks + blockIdx.x) * C + c] = tb;
    }
}

// dw[c] += sum of the dw partials of column c in chunk order, db likewise (and dbias, when not NULL, from the
// third plane).
static __global__ void layernorm_backward_finish_kernel(float *dw /* [C] */, float *db /* [C] */,
                                                        float *dbias /* [C] or NULL */,
                                                        const float *scratch /* [2 or 3, chunks, C] */, int chunks,
                                                        int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float tw = 0.0f, tb = 0.0f, tr = 0.0f;
    for (int k = 0; k < chunks; k++) {
        tw += scratch[(size_t)k * C + c];
        tb += scratch[((size_t)chunks + k) * C + c];
        if (dbias) tr += scratch[(2 * (size_t)chunks + k) * C + c];
    }
    dw[c] += tw;
    db[c] += tb;
    if (dbias) dbias[c] += tr;
}

// The three kernels above, then (dy != NULL) the residual-dropout backward and its column sums as separate
// launches: rows too long for the fused kernel's shared memory.
template <typename X>
static void layernorm_backward_unfused(X *dinp, float *dw, float *db, const X *dout, const X *inp, const X *w,
                                       const float *mean, const float *rstd, int N, int C, X *dy,
                                       const KeepWord *keep, float scale, float *dbias, float *scratch,
                                       cudaStream_t stream) {
    unsigned grid = (unsigned)((N + LN_ROWS_PER_BLOCK - 1) / LN_ROWS_PER_BLOCK);
    layernorm_backward_dinp_kernel<X><<<grid, LN_BLOCK, 0, stream>>>(dinp, dout, inp, w, mean, rstd, N, C);
    CUDA_CHECK_LAUNCH();
    int chunks = lnb_chunks(N);
    dim3 pgrid((unsigned)chunks, (unsigned)((C + LNB_TX - 1) / LNB_TX));
    layernorm_backward_partial_kernel<X><<<pgrid, dim3(LNB_TX, LNB_TY), 0, stream>>>(scratch, dout, inp, mean, rstd, N,
                                                                                    C);
    CUDA_CHECK_LAUNCH();
    layernorm_backward_finish_kernel<<<(unsigned)((C + 255) / 256), 256, 0, stream>>>(dw, db, (float *)NULL, scratch, chunks, C);
    CUDA_CHECK_LAUNCH();
    if (!dy) return;
    cuda_residual_dropout_backward(dy, dinp, keep, scale, (size_t)N * C, stream);
    if (dbias) cuda_column_sums_accumulate(dbias, dy, N, C, scratch, stream);
}

// ---- Backward fused with the residual-dropout backward of its output ---------------------------------------
// One block per chunk of LNB_ROWS rows, LNB_TY warps: warp y walks rows y, y + 8, ... of the chunk, computing
// dinp as layernorm_backward_dinp_kernel and, if dy is wanted, dy = dinp * keep * scale (the residual branch's
// gradient, as residual_dropout_backward_kernel) for the block below. Lane x accumulates the dw, db (and dy)
// column sums of its columns x, x + 32, ... over the warp's rows in shared memory; the warps' sums are then
// added in warp order. That is the summation order of layernorm_backward_partial_kernel and
// column_sums_partial_kernel (LNB_ROWS == COLSUM_ROWS), with the same roundings, so the sums are those of the
// unfused kernels; layernorm_backward_finish_kernel adds the chunks. Replaces four to five launches (dinp,
// partials, finish, residual backward, column-sum partials) by one, plus the finish.

enum { LNF_MAX_C = (48 * 1024) / (3 * LNB_TY * (int)sizeof(float)) };  // 512 columns: 3 x 8 partial rows

template <typename X>
static __global__ void layernorm_backward_fused_kernel(X *dinp /* [N, C] */, float *scratch /* [3, chunks, C] */,
                                                       X *dy /* [N, C] or NULL */,
                                                       const KeepWord *keep /* [N, C] bits or NULL */, float scale,
                                                       const X *dout /* [N, C] */, const X *inp /* [N, C] */,
                                                       const X *w /* [C] */, const float *mean /* [N] */,
                                                       const float *rstd /* [N] */, int N, int C) {
    extern __shared__ float lnf_part[];
    int y = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *pw = lnf_part + (size_t)y * C;  // [C] this warp's dw sums; pb, pr likewise
    float *pb = lnf_part + (size_t)(LNB_TY + y) * C;
    float *pr = lnf_part + (size_t)(2 * LNB_TY + y) * C;
    for (int c = lane; c < C; c += 32) pw[c] = pb[c] = pr[c] = 0.0f;
    int chunks = gridDim.x;
    int r0 = blockIdx.x * LNB_ROWS, r1 = min(r0 + LNB_ROWS, N);
    for (int r = r0 + y; r < r1; r += LNB_TY) {  // warp-uniform
        const X *x = inp + (size_t)r * C;  // [C]
        const X *g = dout + (size_t)r * C;  // [C]
        X *dx = dinp + (size_t)r * C;  // [C]
        float m = mean[r], s = rstd[r];
        float mean_dnorm, mean_dnorm_norm;
        row_dnorm_means(x, g, w, m, s, C, lane, &mean_dnorm, &mean_dnorm_norm);
        for (int c = lane; c < C; c += 32) {
            float gc = ld(g, c);
            float norm = __fmul_rn(__fsub_rn(ld(x, c), m), s);
            float t = __fsub_rn(__fsub_rn(__fmul_rn(gc, ld(w, c)), mean_dnorm), __fmul_rn(norm, mean_dnorm_norm));
            float d = st(dx, c, __fadd_rn(ld(dx, c), __fmul_rn(s, t)));
            pw[c] += gc * norm;
            pb[c] += gc;
            if (dy) {
                size_t i = (size_t)r * C + c;
                pr[c] += st(dy, i, __fmul_rn(d, keep ? (float)keep_bit(keep, i) * scale : scale));
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float tw = lnf_part[c], tb = lnf_part[(size_t)LNB_TY * C + c], tr = lnf_part[(size_t)2 * LNB_TY * C + c];
        for (int k = 1; k < LNB_TY; k++) {
            tw += lnf_part[(size_t)k * C + c];
            tb += lnf_part[(size_t)(LNB_TY + k) * C + c];
            tr += lnf_part[(size_t)(2 * LNB_TY + k) * C + c];
        }
        scratch[(size_t)blockIdx.x * C + c] = tw;
        scratch[((size_t)chunks + blockIdx.x) * C + c] = tb;
        scratch[(2 * (size_t)chunks + blockIdx.x) * C + c] = tr;
    }
}

template <typename X>
static void layernorm_backward_residual(X *dinp, float *dw, float *db, const X *dout, const X *inp, const X *w,
                                        const float *mean, const float *rstd, int N, int C, X *dy,
                                        const KeepWord *keep, float scale, float *dbias, float *scratch,
                                        cudaStream_t stream) {
    if (N <= 0 || C <= 0) return;
    if (!dy && dbias) mlm_fatal(MLM_EXIT_FAILURE, "cuda_layernorm_backward_residual: a bias gradient needs dy");
    if (C > LNF_MAX_C) {
        layernorm_backward_unfused(dinp, dw, db, dout, inp, w, mean, rstd, N, C, dy, keep, scale, dbias, scratch,
                                   stream);
        return;
    }
    int chunks = lnb_chunks(N);
    size_t shmem = 3 * (size_t)LNB_TY * C * sizeof(float);
    layernorm_backward_fused_kernel<X><<<(unsigned)chunks, 32 * LNB_TY, shmem, stream>>>(dinp, scratch, dy, keep, scale,
                                                                                          dout, inp, w, mean, rstd, N,
                                                                                          C);
    CUDA_CHECK_LAUNCH();
    layernorm_backward_finish_kernel<<<(unsigned)((C + 255) / 256), 256, 0, stream>>>(dw, db, dbias, scratch, chunks,
                                                                                      C);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_layernorm_backward_residual(float *dinp, float *dw, float *db, const float *dout,
                                                 const float *inp, const float *w, const float *mean,
                                                 const float *rstd, int N, int C, float *dy, const KeepWord *keep,
                                                 float scale, float *dbias, float *scratch, cudaStream_t stream) {
    layernorm_backward_residual(dinp, dw, db, dout, inp, w, mean, rstd, N, C, dy, keep, scale, dbias, scratch, stream);
}
void cuda_layernorm_backward_residual(bf16 *dinp, float *dw, float *db, const bf16 *dout, const bf16 *inp,
                                      const bf16 *w, const float *mean, const float *rstd, int N, int C, bf16 *dy,
                                      const KeepWord *keep, float scale, float *dbias, float *scratch,
                                      cudaStream_t stream) {
    layernorm_backward_residual(dinp, dw, db, dout, inp, w, mean, rstd, N, C, dy, keep, scale, dbias, scratch, stream);
}

extern "C" void cuda_layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                        const float *w, const float *mean, const float *rstd, int N, int C,
                                        float *scratch, cudaStream_t stream) {
    layernorm_backward_residual(dinp, dw, db, dout, inp, w, mean, rstd, N, C, (float *)NULL, NULL, 1.0f, NULL, scratch,
                                stream);
}
void cuda_layernorm_backward(bf16 *dinp, float *dw, float *db, const bf16 *dout, const bf16 *inp, const bf16 *w,
                             const float *mean, const float *rstd, int N, int C, float *scratch, cudaStream_t stream) {
    layernorm_backward_residual(dinp, dw, db, dout, inp, w, mean, rstd, N, C, (bf16 *)NULL, NULL, 1.0f, NULL, scratch,
                                stream);
}
