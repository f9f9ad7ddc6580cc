// gelu.c: the exact GELU of BERT (transformers' hidden_act = "gelu", erf form), forward and backward.
#include <math.h>
#include <stddef.h>

#include "cpu/ops.h"

// C11 has no M_SQRT1_2: 1/sqrt(2) and 1/sqrt(2 pi), rounded to float where they are used.
#define GELU_INV_SQRT2 0.70710678118654752440
#define GELU_INV_SQRT_2PI 0.39894228040143267794

// As PyTorch's CPU kernel (approximate = 'none'), in float: x * 0.5 * (1 + erf(x / sqrt(2))).
static float gelu(float x) { return (x * 0.5f) * (1.0f + erff(x * (float)GELU_INV_SQRT2)); }

// d gelu / dx = Phi(x) + x phi(x): the normal CDF plus x times the normal density (as PyTorch's backward).
// Written as gelu.cu's kernel rounds it, one operation at a time.
static float gelu_grad(float x) {
    float cdf = 0.5f * (1.0f + erff(x * (float)GELU_INV_SQRT2));
    float pdf = expf((-0.5f * x) * x) * (float)GELU_INV_SQRT_2PI;
    return cdf + x * pdf;
}

void gelu_forward(float *out, const float *inp, size_t n) {
    long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long i = 0; i < count; i++) out[i] = gelu(inp[i]);
}

void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n) {
    long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long i = 0; i < count; i++) dinp[i] = dout[i] * gelu_grad(inp[i]);
}
