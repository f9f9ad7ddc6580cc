// layernorm.c: LayerNorm over the channel dimension (biased variance, as PyTorch), forward and backward.
#include <math.h>
#include <stddef.h>

#include "cpu/ops.h"
#include "mlm/common.h"

// Rows normalised together: each row's sums run over its channels in order, one dependent add after another, so
// a single row waits on the adder's latency; LN_ROWS independent rows in lockstep keep it busy. Every row gets the
// same operations in the same order as alone, so the results do not depend on the grouping (or the threads).
enum { LN_ROWS = 4 };

// Rows n0 .. n0 + rows - 1 of layernorm_forward (rows <= LN_ROWS; a constant where it is inlined).
static inline __attribute__((always_inline)) void layernorm_forward_rows(float *out, float *mean, float *rstd,
                                                                        const float *inp, const float *w,
                                                                        const float *b, int n0, int rows, int C,
                                                                        float eps) {
    const float *x = inp + (size_t)n0 * C;  // [rows, C]
    float *y = out + (size_t)n0 * C;        // [rows, C]
    // Two passes (mean, then centred variance) avoid the cancellation of E[x^2] - E[x]^2.
    float m[LN_ROWS], var[LN_ROWS], s[LN_ROWS];
    for (int k = 0; k < rows; k++) m[k] = 0.0f, var[k] = 0.0f;
    for (int c = 0; c < C; c++)
        for (int k = 0; k < rows; k++) m[k] += x[(size_t)k * C + c];
    for (int k = 0; k < rows; k++) m[k] /= (float)C;
    for (int c = 0; c < C; c++)
        for (int k = 0; k < rows; k++) {
            float d = x[(size_t)k * C + c] - m[k];
            var[k] += d * d;
        }
    for (int k = 0; k < rows; k++) {
        var[k] /= (float)C;
        s[k] = 1.0f / sqrtf(var[k] + eps);
        for (int c = 0; c < C; c++) y[(size_t)k * C + c] = (x[(size_t)k * C + c] - m[k]) * s[k] * w[c] + b[c];
        mean[n0 + k] = m[k];
        rstd[n0 + k] = s[k];
    }
}

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                       int N, int C, float eps) {
    int blocks = N / LN_ROWS;
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int blk = 0; blk < blocks; blk++) layernorm_forward_rows(out, mean, rstd, inp, w, b, blk * LN_ROWS, LN_ROWS, C, eps);
    for (int n = blocks * LN_ROWS; n < N; n++) layernorm_forward_rows(out, mean, rstd, inp, w, b, n, 1, C, eps);
}

void residual_layernorm_forward(float *res_out, float *ln_out, float *mean, float *rstd, const float *res,
                                const float *y, const uint8_t *keep, float scale, const float *w, const float *b,
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

// Rows n0 .. n0 + rows - 1 of layernorm_backward's dinp (rows <= LN_ROWS, in lockstep as layernorm_forward_rows).
static inline __attribute__((always_inline)) void layernorm_backward_rows(float *dinp, const float *dout,
                                                                         const float *inp, const float *w,
                                                                         const float *mean, const float *rstd, int n0,
                                                                         int rows, int C) {
    const float *x = inp + (size_t)n0 * C;   // [rows, C]
    const float *g = dout + (size_t)n0 * C;  // [rows, C]
    float *dx = dinp + (size_t)n0 * C;       // [rows, C]
    float m[LN_ROWS], s[LN_ROWS], sum_dnorm[LN_ROWS], sum_dnorm_norm[LN_ROWS];
    for (int k = 0; k < rows; k++) m[k] = mean[n0 + k], s[k] = rstd[n0 + k], sum_dnorm[k] = 0.0f, sum_dnorm_norm[k] = 0.0f;
    for (int c = 0; c < C; c++)
        for (int k = 0; k < rows; k++) {
            float norm = (x[(size_t)k * C + c] - m[k]) * s[k];
            float dnorm = g[(size_t)k * C + c] * w[c];
            sum_dnorm[k] += dnorm;
            sum_dnorm_norm[k] += dnorm * norm;
        }
    for (int k = 0; k < rows; k++) {
        float mean_dnorm = sum_dnorm[k] / (float)C, mean_dnorm_norm = sum_dnorm_norm[k] / (float)C;
        for (int c = 0; c < C; c++) {
            float norm = (x[(size_t)k * C + c] - m[k]) * s[k];
            dx[(size_t)k * C + c] += s[k] * (g[(size_t)k * C + c] * w[c] - mean_dnorm - norm * mean_dnorm_norm);
        }
    }
}

void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                        const float *mean, const float *rstd, int N, int C) {
    // dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w.
    int blocks = N / LN_ROWS;
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int blk = 0; blk < blocks; blk++) layernorm_backward_rows(dinp, dout, inp, w, mean, rstd, blk * LN_ROWS, LN_ROWS, C);
    for (int n = blocks * LN_ROWS; n < N; n++) layernorm_backward_rows(dinp, dout, inp, w, mean, rstd, n, 1, C);
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
                                 const uint8_t *keep, float scale, float *dbias) {
    layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    residual_dropout_backward(dy, dinp, keep, scale, (size_t)N * C);
    if (dbias) column_sums_accumulate(dbias, dy, N, C);
}
