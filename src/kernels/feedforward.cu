// feedforward.cu: dropout keep masks, bias+ReLU+dropout, residual add+dropout, bias add, bias-gradient column sums
// (alone, or fused into the ReLU/dropout and residual-dropout backward).
//
// Every elementwise kernel reproduces the CPU expression of src/cpu/feedforward.c bit for bit. nvcc contracts
// a * b + c into one fused multiply-add by default (one rounding instead of two), which would differ from the
// CPU in the last bit, so products that feed a sum are written with __fmul_rn / __fadd_rn (never contracted).
// The kernels are templates over the storage type X of their tensors (act.cuh): float, or BF16 under
// train.precision = bf16 (computing in FP32, rounding where they store; the bias gradients stay FP32).
#include "act.cuh"
#include "cuda_check.h"
#include "kernels.h"

enum { EW_BLOCK = 256 };  // threads per block of the elementwise kernels
static const size_t EW_MAX_GRID = 1u << 20;  // grid-stride loops cover larger n with this many blocks

static unsigned ew_grid(size_t n) {
    size_t g = (n + EW_BLOCK - 1) / EW_BLOCK;
    return (unsigned)(g < EW_MAX_GRID ? g : EW_MAX_GRID);
}

#define GRID_STRIDE_LOOP(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// ---- Dropout keep mask ----------------------------------------------------------------------------------

// keep = !(u < p) in bits: THE DROPOUT RULE of src/cpu/ops.h (u in (0, 1] from cuRAND; dropped when u < p). A
// thread owns whole words (keep_bits.h), so no two threads write one word.
static __global__ void dropout_keep_kernel(KeepWord *keep /* [keep_words(n)] */, const float *u /* [n] */, float p,
                                           size_t n) {
    GRID_STRIDE_LOOP(w, keep_words(n)) {
        size_t i0 = w * KEEP_WORD_BITS, bits = min((size_t)KEEP_WORD_BITS, n - i0);
        KeepWord word = 0;
        for (size_t j = 0; j < bits; j++) word |= (KeepWord)!(u[i0 + j] < p) << j;
        keep[w] = word;
    }
}

extern "C" void cuda_dropout_keep(KeepWord *keep, const float *u, float p, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    dropout_keep_kernel<<<ew_grid(keep_words(n)), EW_BLOCK, 0, stream>>>(keep, u, p, n);
    CUDA_CHECK_LAUNCH();
}

// ---- FFN hidden: bias + ReLU + dropout, and its backward -------------------------------------------------

// h = ReLU(h + bias[col]) then dropout, as linear_forward's bias add followed by relu_dropout_forward:
// the CPU multiplies by (float)(positive & keep) * scale rather than selecting, so a dropped negative value
// becomes -0.0 there and here alike.
template <typename X>
static __global__ void bias_relu_dropout_forward_kernel(X *h /* [n/F, F] */, const X *bias /* [F] or NULL */,
                                                        const KeepWord *keep /* [n] bits or NULL */, float scale,
                                                        size_t n, int F) {
    GRID_STRIDE_LOOP(i, n) {
        float x = ld(h, i);
        if (bias) x = __fadd_rn(x, ld(bias, i % (size_t)F));
        if (keep)
            x = __fmul_rn(x, (float)((x > 0.0f) & keep_bit(keep, i)) * scale);
        else
            x = x > 0.0f ? x : 0.0f;
        st(h, i, x);
    }
}

template <typename X>
static void bias_relu_dropout_forward(X *h, const X *bias, const KeepWord *keep, float scale, size_t n, int F,
                                      cudaStream_t stream) {
    if (n == 0) return;
    bias_relu_dropout_forward_kernel<X><<<ew_grid(n), EW_BLOCK, 0, stream>>>(h, bias, keep, scale, n, F);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_bias_relu_dropout_forward(float *h, const float *bias, const KeepWord *keep, float scale,
                                               size_t n, int F, cudaStream_t stream) {
    bias_relu_dropout_forward(h, bias, keep, scale, n, F, stream);
}
void cuda_bias_relu_dropout_forward(bf16 *h, const bf16 *bias, const KeepWord *keep, float scale, size_t n, int F,
                                    cudaStream_t stream) {
    bias_relu_dropout_forward(h, bias, keep, scale, n, F, stream);
}

// dh = h > 0 ? dh * scale : 0. The forward's output h is positive exactly where the unit was positive and
// kept (scale >= 1 keeps it positive), so the mask is not needed; ReLU'(0) = 0 as in PyTorch.
template <typename X>
static __global__ void relu_dropout_backward_kernel(X *dh /* [n] */, const X *h /* [n] */, float scale, size_t n) {
    GRID_STRIDE_LOOP(i, n) st(dh, i, __fmul_rn(ld(dh, i), (float)(ld(h, i) > 0.0f) * scale));
}

template <typename X>
static void relu_dropout_backward(X *dh, const X *h, float scale, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    relu_dropout_backward_kernel<X><<<ew_grid(n), EW_BLOCK, 0, stream>>>(dh, h, scale, n);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_relu_dropout_backward(float *dh, const float *h, float scale, size_t n, cudaStream_t stream) {
    relu_dropout_backward(dh, h, scale, n, stream);
}
void cuda_relu_dropout_backward(bf16 *dh, const bf16 *h, float scale, size_t n, cudaStream_t stream) {
    relu_dropout_backward(dh, h, scale, n, stream);
}

// ---- Residual add + dropout, and its backward ------------------------------------------------------------

// out = res + dropout(y + bias[col]). out may alias res (no __restrict__): each element is read, then
// written, by the same thread.
template <typename X>
static __global__ void residual_dropout_forward_kernel(X *out /* [n] */, const X *res /* [n] */,
                                                       const X *y /* [n/C, C] */, const X *bias /* [C] or NULL */,
                                                       const KeepWord *keep /* [n] bits or NULL */, float scale,
                                                       size_t n, int C) {
    GRID_STRIDE_LOOP(i, n) {
        float x = ld(y, i);
        if (bias) x = __fadd_rn(x, ld(bias, i % (size_t)C));
        if (keep) x = __fmul_rn(x, (float)keep_bit(keep, i) * scale);  // the CPU's y * ((float)keep * scale)
        st(out, i, __fadd_rn(ld(res, i), x));
    }
}

template <typename X>
static void residual_dropout_forward(X *out, const X *res, const X *y, const X *bias, const KeepWord *keep,
                                     float scale, size_t n, int C, cudaStream_t stream) {
    if (n == 0) return;
    residual_dropout_forward_kernel<X><<<ew_grid(n), EW_BLOCK, 0, stream>>>(out, res, y, bias, keep, scale, n, C);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_residual_dropout_forward(float *out, const float *res, const float *y, const float *bias,
                                              const KeepWord *keep, float scale, size_t n, int C,
                                              cudaStream_t stream) {
    residual_dropout_forward(out, res, y, bias, keep, scale, n, C, stream);
}
void cuda_residual_dropout_forward(bf16 *out, const bf16 *res, const bf16 *y, const bf16 *bias, const KeepWord *keep,
                                   float scale, size_t n, int C, cudaStream_t stream) {
    residual_dropout_forward(out, res, y, bias, keep, scale, n, C, stream);
}

// dy = dout * keep * scale (keep NULL: dout * scale; the caller passes scale 1 without dropout). The skip
// path's gradient is dout itself, so the caller keeps dout.
template <typename X>
static __global__ void residual_dropout_backward_kernel(X *dy /* [n] */, const X *dout /* [n] */,
                                                        const KeepWord *keep /* [n] bits or NULL */, float scale,
                                                        size_t n) {
    GRID_STRIDE_LOOP(i, n) st(dy, i, __fmul_rn(ld(dout, i), keep ? (float)keep_bit(keep, i) * scale : scale));
}

template <typename X>
static void residual_dropout_backward(X *dy, const X *dout, const KeepWord *keep, float scale, size_t n,
                                      cudaStream_t stream) {
    if (n == 0) return;
    residual_dropout_backward_kernel<X><<<ew_grid(n), EW_BLOCK, 0, stream>>>(dy, dout, keep, scale, n);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_residual_dropout_backward(float *dy, const float *dout, const KeepWord *keep, float scale,
                                               size_t n, cudaStream_t stream) {
    residual_dropout_backward(dy, dout, keep, scale, n, stream);
}
void cuda_residual_dropout_backward(bf16 *dy, const bf16 *dout, const KeepWord *keep, float scale, size_t n,
                                    cudaStream_t stream) {
    residual_dropout_backward(dy, dout, keep, scale, n, stream);
}

// ---- Bias add (after cuBLAS matmuls without bias) ----------------------------------------------------------

// out = x + bias[col]; out may alias x.
template <typename X>
static __global__ void add_bias_kernel(X *out /* [n/C, C] */, const X *x /* [n/C, C] */, const X *bias /* [C] */,
                                       size_t n, int C) {
    GRID_STRIDE_LOOP(i, n) st(out, i, __fadd_rn(ld(x, i), ld(bias, i % (size_t)C)));
}

template <typename X>
static void add_bias(X *out, const X *x, const X *bias, size_t n, int C, cudaStream_t stream) {
    if (n == 0) return;
    add_bias_kernel<X><<<ew_grid(n), EW_BLOCK, 0, stream>>>(out, x, bias, n, C);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_add_bias(float *out, const float *x, const float *bias, size_t n, int C, cudaStream_t stream) {
    add_bias(out, x, bias, n, C, stream);
}
void cuda_add_bias(bf16 *out, const bf16 *x, const bf16 *bias, size_t n, int C, cudaStream_t stream) {
    add_bias(out, x, bias, n, C, stream);
}

// ---- Column sums (bias gradients) in a fixed order ---------------------------------------------------------
// No atomics: pass 1 gives each block a fixed chunk of COLSUM_ROWS rows and 32 columns; its 32 x 8 threads
// read the chunk coalesced (a warp reads 32 consecutive columns of one row), thread (x, y) summing rows
// y, y + 8, ... of column x in order, and row y = 0 then adds the 8 partial sums in order. Pass 2 adds
// the chunks' sums of each column in chunk order. The partition depends on N only, so every run (and any
// GPU) sums in the same order. The result differs from the CPU's serial row-order sum by rounding only.

enum { COLSUM_ROWS = 64, COLSUM_TX = 32, COLSUM_TY = 8 };

static int colsum_chunks(int N) { return (N + COLSUM_ROWS - 1) / COLSUM_ROWS; }

extern "C" size_t cuda_column_sums_scratch(int N, int C) { return (size_t)colsum_chunks(N) * (size_t)C; }

// grid (chunks, ceil(C / 32)), block (32, 8): partial[chunk, c] = sum of x[r, c] over the chunk's rows.
template <typename X>
static __global__ void column_sums_partial_kernel(float *partial /* [chunks, C] */, const X *x /* [N, C] */, int N,
                                                  int C) {
    __shared__ float part[COLSUM_TY][COLSUM_TX];
    int c = blockIdx.y * COLSUM_TX + threadIdx.x;
    int r0 = blockIdx.x * COLSUM_ROWS, r1 = min(r0 + COLSUM_ROWS, N);
    float s = 0.0f;
    if (c < C)
        for (int r = r0 + (int)threadIdx.y; r < r1; r += COLSUM_TY) s += ld(x, (size_t)r * C + c);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = part[0][threadIdx.x];
        for (int k = 1; k < COLSUM_TY; k++) t += part[k][threadIdx.x];
        partial[(size_t)blockIdx.x * C + c] = t;
    }
}

// sums[c] += sum over chunks, in chunk order (one thread per column; reads of a chunk row are coalesced).
static __global__ void column_sums_finish_kernel(float *sums /* [C] */, const float *partial /* [chunks, C] */,
                                                 int chunks, int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float t = 0.0f;
    for (int k = 0; k < chunks; k++) t += partial[(size_t)k * C + c];
    sums[c] += t;
}

template <typename X>
static void column_sums_accumulate(float *sums, const X *x, int N, int C, float *scratch, cudaStream_t stream) {
    if (N <= 0 || C <= 0) return;
    int chunks = colsum_chunks(N);
    dim3 grid((unsigned)chunks, (unsigned)((C + COLSUM_TX - 1) / COLSUM_TX));
    column_sums_partial_kernel<X><<<grid, dim3(COLSUM_TX, COLSUM_TY), 0, stream>>>(scratch, x, N, C);
    CUDA_CHECK_LAUNCH();
    column_sums_finish_kernel<<<(unsigned)((C + 255) / 256), 256, 0, stream>>>(sums, scratch, chunks, C);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_column_sums_accumulate(float *sums, const float *x, int N, int C, float *scratch,
                                            cudaStream_t stream) {
    column_sums_accumulate(sums, x, N, C, scratch, stream);
}
void cuda_column_sums_accumulate(float *sums, const bf16 *x, int N, int C, float *scratch, cudaStream_t stream) {
    column_sums_accumulate(sums, x, N, C, scratch, stream);
}

extern "C" void cuda_column_sums_finish(float *sums, const float *partial, int chunks, int C, cudaStream_t stream) {
    if (chunks <= 0 || C <= 0) return;
    column_sums_finish_kernel<<<(unsigned)((C + 255) / 256), 256, 0, stream>>>(sums, partial, chunks, C);
    CUDA_CHECK_LAUNCH();
}

// ---- Backward elementwise ops fused with the column sums of their result (bias gradients) -------------------
// The layout and summation order of column_sums_partial_kernel (block (32, 8) over a chunk of COLSUM_ROWS rows
// and 32 columns), each element transformed as it is read: with h, the ReLU + dropout backward in place
// (relu_dropout_backward_kernel: out = in * (h > 0) * scale); without, the residual-dropout backward
// (residual_dropout_backward_kernel: out = in * keep * scale). The bias gradient is then the same sum as a
// separate column-sum pass over out would give, without that pass reading out again (in BF16, the sum of the
// rounded values out holds).
template <typename X>
static __global__ void backward_column_sums_partial_kernel(float *partial /* [chunks, C] */, X *out /* [N, C] */,
                                                           const X *in /* [N, C] */, const X *h /* [N, C] or NULL */,
                                                           const KeepWord *keep /* [N, C] bits or NULL */, float scale,
                                                           int N, int C) {
    __shared__ float part[COLSUM_TY][COLSUM_TX];
    int c = blockIdx.y * COLSUM_TX + threadIdx.x;
    int r0 = blockIdx.x * COLSUM_ROWS, r1 = min(r0 + COLSUM_ROWS, N);
    float s = 0.0f;
    if (c < C)
        for (int r = r0 + (int)threadIdx.y; r < r1; r += COLSUM_TY) {
            size_t i = (size_t)r * C + c;
            float v;
            if (h) v = __fmul_rn(ld(in, i), (float)(ld(h, i) > 0.0f) * scale);
            else v = __fmul_rn(ld(in, i), keep ? (float)keep_bit(keep, i) * scale : scale);
            s += st(out, i, v);
        }
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = part[0][threadIdx.x];
        for (int k = 1; k < COLSUM_TY; k++) t += part[k][threadIdx.x];
        partial[(size_t)blockIdx.x * C + c] = t;
    }
}

template <typename X>
static void backward_column_sums(X *out, const X *in, const X *h, const KeepWord *keep, float scale, int N, int C,
                                 float *dbias, float *scratch, cudaStream_t stream) {
    if (N <= 0 || C <= 0) return;
    int chunks = colsum_chunks(N);
    dim3 grid((unsigned)chunks, (unsigned)((C + COLSUM_TX - 1) / COLSUM_TX));
    backward_column_sums_partial_kernel<X><<<grid, dim3(COLSUM_TX, COLSUM_TY), 0, stream>>>(scratch, out, in, h, keep,
                                                                                        scale, N, C);
    CUDA_CHECK_LAUNCH();
    cuda_column_sums_finish(dbias, scratch, chunks, C, stream);
}

extern "C" void cuda_relu_dropout_backward_sums(float *dh, const float *h, float scale, int N, int F, float *dbias,
                                                float *scratch, cudaStream_t stream) {
    backward_column_sums(dh, dh, h, (const KeepWord *)NULL, scale, N, F, dbias, scratch, stream);
}
void cuda_relu_dropout_backward_sums(bf16 *dh, const bf16 *h, float scale, int N, int F, float *dbias, float *scratch,
                                     cudaStream_t stream) {
    backward_column_sums(dh, dh, h, (const KeepWord *)NULL, scale, N, F, dbias, scratch, stream);
}

extern "C" void cuda_residual_dropout_backward_sums(float *dy, const float *dout, const KeepWord *keep, float scale,
                                                    int N, int C, float *dbias, float *scratch, cudaStream_t stream) {
    backward_column_sums(dy, dout, (const float *)NULL, keep, scale, N, C, dbias, scratch, stream);
}
void cuda_residual_dropout_backward_sums(bf16 *dy, const bf16 *dout, const KeepWord *keep, float scale, int N, int C,
                                         float *dbias, float *scratch, cudaStream_t stream) {
    backward_column_sums(dy, dout, (const bf16 *)NULL, keep, scale, N, C, dbias, scratch, stream);
}
