// gelu.cu: the exact GELU of BERT (erf form) on the device, bias add fused into the forward, and its backward.
// Twins: src/cpu/gelu.c (gelu_forward after linear_forward's bias add; gelu_backward), with the same float
// expressions; products are rounded separately (__fmul_rn) so that nvcc does not contract them into FMAs. Templates
// over the storage type X (act.cuh): in BF16 GELU is taken of its input as stored.
#include "act.cuh"
#include "cuda_check.h"
#include "kernels.h"

enum { GELU_BLOCK = 256 };
static const size_t GELU_MAX_GRID = 1u << 20;

static unsigned gelu_grid(size_t n) {
    size_t g = (n + GELU_BLOCK - 1) / GELU_BLOCK;
    return (unsigned)(g < GELU_MAX_GRID ? g : GELU_MAX_GRID);
}

// 1/sqrt(2) and 1/sqrt(2 pi) rounded to float, as gelu.c's constants.
#define GELU_INV_SQRT2_F 0.70710678118654752440f
#define GELU_INV_SQRT_2PI_F 0.39894228040143267794f

static __device__ __forceinline__ float gelu_cdf(float x) {
    return __fmul_rn(0.5f, __fadd_rn(1.0f, erff(__fmul_rn(x, GELU_INV_SQRT2_F))));
}

// pre[i] += bias[i % F] (pre is kept: the backward's input), out[i] = pre * Phi(pre), as gelu.c's
// x * 0.5f * (1.0f + erff(x * K)) (left to right: (x * 0.5) * (1 + erf)).
template <typename X>
static __global__ void bias_gelu_forward_kernel(X *pre /* [n/F, F] */, X *out /* [n] */, const X *bias /* [F] or NULL */,
                                                size_t n, int F) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = ld(pre, i);
        if (bias) x = st(pre, i, __fadd_rn(x, ld(bias, i % (size_t)F)));
        st(out, i, __fmul_rn(__fmul_rn(x, 0.5f), __fadd_rn(1.0f, erff(__fmul_rn(x, GELU_INV_SQRT2_F)))));
    }
}

template <typename X>
static void bias_gelu_forward(X *pre, X *out, const X *bias, size_t n, int F, cudaStream_t stream) {
    if (n == 0) return;
    bias_gelu_forward_kernel<X><<<gelu_grid(n), GELU_BLOCK, 0, stream>>>(pre, out, bias, n, F);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_bias_gelu_forward(float *pre, float *out, const float *bias, size_t n, int F, cudaStream_t stream) {
    bias_gelu_forward(pre, out, bias, n, F, stream);
}
void cuda_bias_gelu_forward(bf16 *pre, bf16 *out, const bf16 *bias, size_t n, int F, cudaStream_t stream) {
    bias_gelu_forward(pre, out, bias, n, F, stream);
}

// dinp = dout * (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi). dinp may alias dout.
template <typename X>
static __global__ void gelu_backward_kernel(X *dinp, const X *dout, const X *inp, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = ld(inp, i);
        float pdf = __fmul_rn(expf(__fmul_rn(__fmul_rn(-0.5f, x), x)), GELU_INV_SQRT_2PI_F);
        st(dinp, i, __fmul_rn(ld(dout, i), __fadd_rn(gelu_cdf(x), __fmul_rn(x, pdf))));
    }
}

template <typename X>
static void gelu_backward(X *dinp, const X *dout, const X *inp, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    gelu_backward_kernel<X><<<gelu_grid(n), GELU_BLOCK, 0, stream>>>(dinp, dout, inp, n);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n, cudaStream_t stream) {
    gelu_backward(dinp, dout, inp, n, stream);
}
void cuda_gelu_backward(bf16 *dinp, const bf16 *dout, const bf16 *inp, size_t n, cudaStream_t stream) {
    gelu_backward(dinp, dout, inp, n, stream);
}
