// embedding.c: token embedding scaled by sqrt(d_model) plus fixed sinusoidal positions, forward and backward.
#include <math.h>
#include <stddef.h>

#include "cpu/ops.h"
#include "mlm/common.h"

void embedding_forward(float *out, const int *tokens, const float *tok_emb, const float *pe, int B, int T,
                       int C, int V) {
    // As the reference: Linear-free embedding lookup times math.sqrt(d_model), cast to float.
    float scale = sqrtf((float)C);
    int N = B * T;
    for (int n = 0; n < N; n++)
        if (tokens[n] < 0 || tokens[n] >= V)
            mlm_fatal(MLM_EXIT_FAILURE, "token id %d at position %d is outside the vocabulary [0, %d)", tokens[n], n, V);
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * C;                        // [C]
        const float *e = tok_emb + (size_t)tokens[n] * C;      // [C]
        const float *p = pe + (size_t)(n % T) * C;             // [C]
        for (int c = 0; c < C; c++) o[c] = e[c] * scale + p[c];
    }
}

// Channels handled by one parallel task of the backward: each task owns whole columns of dtok_emb, so
// every (token, channel) sum runs over the positions in order whatever the thread count.
enum { EMB_CHANNEL_BLOCK = 16 };

void embedding_backward(float *dtok_emb, const float *dout, const int *tokens, int B, int T, int C) {
    float scale = sqrtf((float)C);
    int N = B * T;
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int c0 = 0; c0 < C; c0 += EMB_CHANNEL_BLOCK) {
        int c1 = MLM_MIN(c0 + EMB_CHANNEL_BLOCK, C);
        for (int n = 0; n < N; n++) {
            float *d = dtok_emb + (size_t)tokens[n] * C;       // [C]
            const float *g = dout + (size_t)n * C;             // [C]
            for (int c = c0; c < c1; c++) d[c] += g[c] * scale;
        }
    }
}

void embedding_layernorm_forward(float *out, float *ln_out, float *mean, float *rstd, const int *tokens,
                                 const float *tok_emb, const float *pe, const float *w, const float *b, int B, int T,
                                 int C, int V, float eps) {
    embedding_forward(out, tokens, tok_emb, pe, B, T, C, V);
    layernorm_forward(ln_out, mean, rstd, out, w, b, B * T, C, eps);
}
