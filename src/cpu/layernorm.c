// layernorm.c: LayerNorm over the channel dimension (biased variance, as PyTorch), forward and backward.
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "cpu/ops.h"
#include "mlm/common.h"

// Each row's sums (mean, centred variance; the backward's two) in THE ROW ORDER of vexp.c (16 lane sums, then a
// fixed tree), on 16 lanes where the CPU has AVX-512 (row_dot, with the same bits elsewhere): a row's sum as one
// running value was a chain of C dependent adds. Rows are independent, so the results do not depend on the threads.
static void layernorm_forward_row(float *out, float *mean, float *rstd, const float *inp, const float *w,
                                  const float *b, int n, int C, float eps, float *d) {
    const float *x = inp + (size_t)n * C;  // [C]
    float *y = out + (size_t)n * C;        // [C]
    // Two passes (mean, then centred variance) avoid the cancellation of E[x^2] - E[x]^2.
    float m = row_sum(x, C) / (float)C;
    for (int c = 0; c < C; c++) d[c] = x[c] - m;
    float var = row_dot(d, d, C) / (float)C;
    float s = 1.0f / sqrtf(var + eps);
    for (int c = 0; c < C; c++) y[c] = d[c] * s * w[c] + b[c];
    mean[n] = m;
    rstd[n] = s;
}

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                       int N, int C, float eps) {
#pragma omp parallel if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    {
        float *d = mlm_malloc((size_t)C * sizeof(float), "layernorm row scratch");  // [C] per thread
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) layernorm_forward_row(out, mean, rstd, inp, w, b, n, C, eps, d);
        free(d);
    }
}

void residual_layernorm_forward(float *res_out, float *ln_out, float *mean, float *rstd, const float *res,
                                const float *y, const KeepWord *keep, float scale, const float *w, const float *b,
                                int N, int C, float eps) {
    residual_dropout_forward(res_out, res, y, keep, scale, (size_t)N * C);
    layernorm_forward(ln_out, mean, rstd, res_out, w, b, N, C, eps);
}

// Columns per task of the weight/bias gradient: each task owns whole columns and sums the rows in order. 64: each
// column's two sums are chains of dependent adds, one per row; 16 columns (one AVX-512 register each) waited on
// the adder's latency at every row, 64 keep four registers' chains going side by side.
enum { LN_CHANNEL_BLOCK = 64 };

// sw[width] += dout * norm and sb[width] += dout over rows 0 .. N - 1 in order, columns c0 .. c0 + width - 1.
static inline __attribute__((always_inline)) void layernorm_channel_sums(float *sw, float *sb, const float *dout,
                                                                        const float *inp, const float *mean,
                                                                        const float *rstd, int N, int C, int c0,
                                                                        int width) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C + c0;
        const float *g = dout + (size_t)n * C + c0;
        float m = mean[n], s = rstd[n];
        for (int c = 0; c < width; c++) {
            sw[c] += g[c] * ((x[c] - m) * s);
            sb[c] += g[c];
        }
    }
}

// Row n of layernorm_backward's dinp. Scratch: t, u [C].
static void layernorm_backward_row(float *dinp, const float *dout, const float *inp, const float *w, const float *mean,
                                   const float *rstd, int n, int C, float *t, float *u) {
    const float *x = inp + (size_t)n * C;   // [C]
    const float *g = dout + (size_t)n * C;  // [C]
    float *dx = dinp + (size_t)n * C;       // [C]
    float m = mean[n], s = rstd[n];
    for (int c = 0; c < C; c++) {
        t[c] = g[c] * w[c];        // dnorm
        u[c] = (x[c] - m) * s;     // norm
    }
    float mean_dnorm = row_sum(t, C) / (float)C, mean_dnorm_norm = row_dot(t, u, C) / (float)C;
    for (int c = 0; c < C; c++) dx[c] += s * (t[c] - mean_dnorm - u[c] * mean_dnorm_norm);
}

void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                        const float *mean, const float *rstd, int N, int C) {
    // dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w.
#pragma omp parallel if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    {
        float *t = mlm_malloc(2 * (size_t)C * sizeof(float), "layernorm row scratch"), *u = t + C;  // [C] each, per thread
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) layernorm_backward_row(dinp, dout, inp, w, mean, rstd, n, C, t, u);
        free(t);
    }
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int c0 = 0; c0 < C; c0 += LN_CHANNEL_BLOCK) {
        int width = MLM_MIN(LN_CHANNEL_BLOCK, C - c0);
        // The sums in local arrays (dw and db may alias the inputs for all the compiler knows, which would load and
        // store them on every row): the same additions in the same order.
        float sw[LN_CHANNEL_BLOCK], sb[LN_CHANNEL_BLOCK];
        for (int c = 0; c < width; c++) sw[c] = dw[c0 + c], sb[c] = db[c0 + c];
        // A whole block with its width a constant, so that the sums stay in registers.
        if (width == LN_CHANNEL_BLOCK) layernorm_channel_sums(sw, sb, dout, inp, mean, rstd, N, C, c0, LN_CHANNEL_BLOCK);
        else layernorm_channel_sums(sw, sb, dout, inp, mean, rstd, N, C, c0, width);
        for (int c = 0; c < width; c++) dw[c0 + c] = sw[c], db[c0 + c] = sb[c];
    }
}

void layernorm_residual_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                 const float *w, const float *mean, const float *rstd, int N, int C, float *dy,
                                 const KeepWord *keep, float scale, float *dbias) {
    layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    residual_dropout_backward(dy, dinp, keep, scale, (size_t)N * C);
    if (dbias) column_sums_accumulate(dbias, dy, N, C);
}
