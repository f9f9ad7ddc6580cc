// embedding.c: the embeddings, forward and backward: labml's token embedding scaled by sqrt(d_model) plus fixed
// sinusoidal positions, and BERT's word + learned position + token-type embeddings.
#include <math.h>
#include <stddef.h>

#include "cpu/ops.h"
#include "mlm/common.h"

static void check_tokens(const int *tokens, int N, int V) {
    for (int n = 0; n < N; n++)
        if (tokens[n] < 0 || tokens[n] >= V)
            mlm_fatal(MLM_EXIT_FAILURE, "token id %d at position %d is outside the vocabulary [0, %d)", tokens[n], n, V);
}

void embedding_forward(float *out, const int *tokens, const float *tok_emb, const float *pe, int B, int T,
                       int C, int V) {
    // As the reference: Linear-free embedding lookup times math.sqrt(d_model), cast to float.
    float scale = sqrtf((float)C);
    int N = B * T;
    check_tokens(tokens, N, V);
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

void bert_embedding_forward(float *out, const int *tokens, const float *word, const float *pos, const float *type,
                            int B, int T, int C, int V) {
    int N = B * T;
    check_tokens(tokens, N, V);
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * C;                    // [C]
        const float *e = word + (size_t)tokens[n] * C;     // [C]
        const float *p = pos + (size_t)(n % T) * C;        // [C]
        // transformers' order: (word + type) + position.
        for (int c = 0; c < C; c++) o[c] = (e[c] + type[c]) + p[c];
    }
}

void bert_embedding_backward(float *dword, float *dpos, float *dtype, const float *dout, const int *tokens, int B,
                             int T, int C) {
    int N = B * T;
    // Whole columns per task, rows summed in order (as embedding_backward): the same bits for any thread count.
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int c0 = 0; c0 < C; c0 += EMB_CHANNEL_BLOCK) {
        int c1 = MLM_MIN(c0 + EMB_CHANNEL_BLOCK, C);
        for (int n = 0; n < N; n++) {
            const float *g = dout + (size_t)n * C;             // [C]
            float *dw = dword + (size_t)tokens[n] * C;         // [C]
            float *dp = dpos + (size_t)(n % T) * C;            // [C]
            for (int c = c0; c < c1; c++) {
                dw[c] += g[c];
                dp[c] += g[c];
                dtype[c] += g[c];
            }
        }
    }
}
