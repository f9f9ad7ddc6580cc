// layernorm.c: LayerNorm over the channel dimension (biased variance, as PyTorch), forward and backward.
#include <math.h>
#include <stddef.h>

#include "cpu/ops.h"
#include "mlm/common.h"

void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                       int N, int C, float eps) {
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;  // [C]
        float *y = out + (size_t)n * C;        // [C]
        // Two passes (mean, then centred variance) avoid the cancellation of E[x^2] - E[x]^2.
        float m = 0.0f;
        for (int c = 0; c < C; c++) m += x[c];
        m /= (float)C;
        float var = 0.0f;
        for (int c = 0; c < C; c++) {
            float d = x[c] - m;
            var += d * d;
        }
        var /= (float)C;
        float s = 1.0f / sqrtf(var + eps);
        for (int c = 0; c < C; c++) y[c] = (x[c] - m) * s * w[c] + b[c];
        mean[n] = m;
        rstd[n] = s;
    }
}

void residual_layernorm_forward(float *res_out, float *ln_out, float *mean, float *rstd, const float *res,
                                const float *y, const uint8_t *keep, float scale, const float *w, const float *b,
                                int N, int C, float eps) {
    residual_dropout_forward(res_out, res, y, keep, scale, (size_t)N * C);
    layernorm_forward(ln_out, mean, rstd, res_out, w, b, N, C, eps);
}

// Columns per task of the weight/bias gradient: each task owns whole columns and sums the rows in order.
enum { LN_CHANNEL_BLOCK = 16 };

void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                        const float *mean, const float *rstd, int N, int C) {
    // dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)), dnorm = dout * w.
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;   // [C]
        const float *g = dout + (size_t)n * C;  // [C]
        float *dx = dinp + (size_t)n * C;       // [C]
        float m = mean[n], s = rstd[n];
        float sum_dnorm = 0.0f, sum_dnorm_norm = 0.0f;
        for (int c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            float dnorm = g[c] * w[c];
            sum_dnorm += dnorm;
            sum_dnorm_norm += dnorm * norm;
        }
        float mean_dnorm = sum_dnorm / (float)C, mean_dnorm_norm = sum_dnorm_norm / (float)C;
        for (int c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            dx[c] += s * (g[c] * w[c] - mean_dnorm - norm * mean_dnorm_norm);
        }
    }
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int c0 = 0; c0 < C; c0 += LN_CHANNEL_BLOCK) {
        int c1 = MLM_MIN(c0 + LN_CHANNEL_BLOCK, C);
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C;
            const float *g = dout + (size_t)n * C;
            float m = mean[n], s = rstd[n];
            for (int c = c0; c < c1; c++) {
                dw[c] += g[c] * ((x[c] - m) * s);
                db[c] += g[c];
            }
        }
    }
}

void layernorm_residual_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                 const float *w, const float *mean, const float *rstd, int N, int C, float *dy,
                                 const uint8_t *keep, float scale, float *dbias) {
    layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    residual_dropout_backward(dy, dinp, keep, scale, (size_t)N * C);
    if (dbias) column_sums_accumulate(dbias, dy, N, C);
}
