// attention.c: the multi-head attention core (scaled dot products, softmax over keys, dropout, P V), forward and backward.
//
// Each (batch, head) pair is one task of an OpenMP loop; its products (Q K^T, P V and the four of the
// backward) are single-threaded sgemm calls on the head's strided slices of qkv. Measured on the
// reference shapes (T = 32, hs = 16), 512 such calls cost ~1 ms per product on one core, several times
// less than hand-written loops over such short rows.
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "cpu/matmul.h"
#include "cpu/ops.h"
#include "mlm/common.h"

// Softmax of each of the T rows of s[T, T], in place, over the keys j with valid[j] (valid == NULL: all).
static void softmax_rows(float *s, int T, const uint8_t *valid) {
    for (int i = 0; i < T; i++) {
        float *row = s + (size_t)i * T;
        float maxv = -INFINITY;
        for (int j = 0; j < T; j++) maxv = (!valid || valid[j]) && row[j] > maxv ? row[j] : maxv;
        for (int j = 0; j < T; j++) row[j] = !valid || valid[j] ? expf(row[j] - maxv) : 0.0f;
        float sum = 0.0f;
        for (int j = 0; j < T; j++) sum += row[j];
        float inv = 1.0f / sum;
        for (int j = 0; j < T; j++) row[j] *= inv;
    }
}

// pd[n] = dropout(p) by the rule in ops.h (as a product, which vectorizes; see feedforward.c).
static void apply_dropout(float *pd, const float *p, const uint8_t *keep, float scale, size_t n) {
    for (size_t i = 0; i < n; i++) pd[i] = p[i] * ((float)keep[i] * scale);
}

// The sequence's key mask for softmax_rows: NULL when every key is valid, and when none is (see ops.h).
static const uint8_t *sequence_key_mask(const uint8_t *key_valid, int b, int T) {
    if (!key_valid) return NULL;
    const uint8_t *v = key_valid + (size_t)b * T;
    int any = 0, all = 1;
    for (int j = 0; j < T; j++) {
        any |= v[j] != 0;
        all &= v[j] != 0;
    }
    return any && !all ? v : NULL;
}

void attention_forward(float *out, float *att, const float *qkv, const uint8_t *keep, float drop_scale, int B,
                       int T, int C, int H, const uint8_t *key_valid) {
    int hs = C / H, C3 = 3 * C;
    size_t TT = (size_t)T * T;
    float scale = 1.0f / sqrtf((float)hs);
    matmul_init();
#pragma omp parallel if ((long long)B * H * T * T * hs >= MLM_PARALLEL_MIN_WORK)
    {
        float *pd = keep ? mlm_malloc(TT * sizeof(float), "attention dropout(P)") : NULL;  // [T, T]
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H;
            const float *q = qkv + (size_t)b * T * C3 + h * hs;  // [T, hs], row stride 3C
            const float *k = q + C, *v = q + 2 * C;               // [T, hs], row stride 3C
            float *p = att + (size_t)bh * TT;                     // [T, T]
            // Scores (Q K^T) * scale, then the softmax over keys, saved for the backward.
            matmul_serial(0, 1, T, T, hs, scale, q, C3, k, C3, 0.0f, p, T);
            softmax_rows(p, T, sequence_key_mask(key_valid, b, T));
            const float *pv = p;
            if (keep) {
                apply_dropout(pd, p, keep + (size_t)bh * TT, drop_scale, TT);
                pv = pd;
            }
            matmul_serial(0, 0, T, hs, T, 1.0f, pv, T, v, C3, 0.0f, out + (size_t)b * T * C + h * hs, C);
        }
        free(pd);
    }
}

void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *att, const uint8_t *keep,
                        float drop_scale, int B, int T, int C, int H) {
    int hs = C / H, C3 = 3 * C;
    size_t TT = (size_t)T * T;
    float scale = 1.0f / sqrtf((float)hs);
    matmul_init();
#pragma omp parallel if ((long long)B * H * T * T * hs >= MLM_PARALLEL_MIN_WORK)
    {
        float *dp = mlm_malloc(TT * sizeof(float), "attention dP");                    // [T, T]
        float *pd = keep ? mlm_malloc(TT * sizeof(float), "attention dropout(P)") : NULL;  // [T, T]
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            int b = bh / H, h = bh % H;
            const float *q = qkv + (size_t)b * T * C3 + h * hs;  // [T, hs], row stride 3C
            const float *k = q + C, *v = q + 2 * C;
            float *dq = dqkv + (size_t)b * T * C3 + h * hs;      // this task owns the head's q, k, v slices
            float *dk = dq + C, *dv = dq + 2 * C;
            const float *go = dout + (size_t)b * T * C + h * hs;  // [T, hs], row stride C
            const float *p = att + (size_t)bh * TT;               // [T, T]
            const uint8_t *kp = keep ? keep + (size_t)bh * TT : NULL;
            // out = dropout(P) V: dV = dropout(P)^T dO, d dropout(P) = dO V^T.
            const float *pv = p;
            if (kp) {
                apply_dropout(pd, p, kp, drop_scale, TT);
                pv = pd;
            }
            matmul_serial(1, 0, T, hs, T, 1.0f, pv, T, go, C, 0.0f, dv, C3);
            matmul_serial(0, 1, T, T, hs, 1.0f, go, C, v, C3, 0.0f, dp, T);
            // Undo dropout (dP = d dropout(P) * keep * scale), then the softmax:
            // dS = P * (dP - sum_j P dP) per row, times the score scale.
            for (int i = 0; i < T; i++) {
                float *g = dp + (size_t)i * T;
                const float *pr = p + (size_t)i * T;
                if (kp) {
                    const uint8_t *kr = kp + (size_t)i * T;
                    for (int j = 0; j < T; j++) g[j] *= (float)kr[j] * drop_scale;
                }
                float dot = 0.0f;
                for (int j = 0; j < T; j++) dot += pr[j] * g[j];
                for (int j = 0; j < T; j++) g[j] = pr[j] * (g[j] - dot) * scale;
            }
            // scores = Q K^T: dQ = dS K, dK = dS^T Q.
            matmul_serial(0, 0, T, hs, T, 1.0f, dp, T, k, C3, 0.0f, dq, C3);
            matmul_serial(1, 0, T, hs, T, 1.0f, dp, T, q, C3, 0.0f, dk, C3);
        }
        free(dp);
        free(pd);
    }
}
