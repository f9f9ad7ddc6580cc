// attention_ref.c: the materialised multi-head attention in double precision (see attention_ref.h): per (batch,
// head) the scores, probabilities and every gradient matrix [T, T] are formed whole, as the attention was computed
// before it was tiled, with none of the tiled code's structure (no tiles, no online softmax, no lse in the
// backward, no D = dO . O: the softmax backward's row sum is sum_j P dP).
#include "attention_ref.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"

// Per (b, h): P[T, T] (probabilities, before dropout) and Z[T, T] (dropout multipliers), and the row lse.
static void probabilities(double *P, double *Z, double *lse, const float *qkv, const uint8_t *key_valid,
                          const uint8_t *keep, float drop_scale, int b, int h, int T, int C, int H) {
    int hs = C / H, C3 = 3 * C;
    double scale = (double)(1.0f / sqrtf((float)hs));
    // A sequence with no valid key attends to every key (ops.h): the mask applies only when some key is valid.
    const uint8_t *valid = key_valid ? key_valid + (size_t)b * T : NULL;
    int any = 0;
    for (int j = 0; valid && j < T; j++) any |= valid[j] != 0;
    if (!any) valid = NULL;
    for (int i = 0; i < T; i++) {
        double *p = P + (size_t)i * T, mx = -INFINITY;
        const float *q = qkv + ((size_t)b * T + i) * C3 + (size_t)h * hs;
        for (int j = 0; j < T; j++) {
            const float *k = qkv + ((size_t)b * T + j) * C3 + C + (size_t)h * hs;
            double s = 0.0;
            for (int d = 0; d < hs; d++) s += (double)q[d] * k[d];
            p[j] = valid && !valid[j] ? -INFINITY : s * scale;
            mx = fmax(mx, p[j]);
        }
        double sum = 0.0;
        for (int j = 0; j < T; j++) sum += (p[j] = exp(p[j] - mx));  // mx is finite: a key is valid
        for (int j = 0; j < T; j++) {
            p[j] /= sum;
            size_t e = (((size_t)b * H + h) * T + i) * T + j;
            Z[(size_t)i * T + j] = keep ? (double)keep[e] * (double)drop_scale : 1.0;
        }
        if (lse) lse[i] = mx + log(sum);
    }
}

void attention_ref_forward(double *out, double *lse, const float *qkv, const uint8_t *key_valid, const uint8_t *keep,
                           float drop_scale, int B, int T, int C, int H) {
    int hs = C / H, C3 = 3 * C;
    double *P = mlm_malloc(2 * (size_t)T * T * sizeof(double), "reference attention"), *Z = P + (size_t)T * T;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            probabilities(P, Z, lse ? lse + ((size_t)b * H + h) * T : NULL, qkv, key_valid, keep, drop_scale, b, h, T,
                          C, H);
            if (!out) continue;
            for (int i = 0; i < T; i++)
                for (int d = 0; d < hs; d++) {
                    double o = 0.0;
                    for (int j = 0; j < T; j++)
                        o += P[(size_t)i * T + j] * Z[(size_t)i * T + j] *
                             qkv[((size_t)b * T + j) * C3 + 2 * C + (size_t)h * hs + d];
                    out[((size_t)b * T + i) * C + (size_t)h * hs + d] = o;
                }
        }
    free(P);
}

void attention_ref_backward(double *dqkv, const float *dout, const float *qkv, const uint8_t *key_valid,
                            const uint8_t *keep, float drop_scale, int B, int T, int C, int H) {
    int hs = C / H, C3 = 3 * C;
    double scale = (double)(1.0f / sqrtf((float)hs));
    size_t TT = (size_t)T * T;
    double *P = mlm_malloc(3 * TT * sizeof(double), "reference attention"), *Z = P + TT, *dS = Z + TT;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            probabilities(P, Z, NULL, qkv, key_valid, keep, drop_scale, b, h, T, C, H);
            const float *go = dout + (size_t)b * T * C + (size_t)h * hs;      // [T, hs], row stride C
            const float *q = qkv + (size_t)b * T * C3 + (size_t)h * hs;       // [T, hs], row stride 3C
            const float *k = q + C, *v = q + 2 * C;
            double *dq = dqkv + (size_t)b * T * C3 + (size_t)h * hs, *dk = dq + C, *dv = dq + 2 * C;
            // dP = (dO V^T) * Z; dS = P * (dP - sum_j P dP), times the score scale.
            for (int i = 0; i < T; i++) {
                double rowdot = 0.0;
                for (int j = 0; j < T; j++) {
                    double g = 0.0;
                    for (int d = 0; d < hs; d++) g += (double)go[(size_t)i * C + d] * v[(size_t)j * C3 + d];
                    dS[(size_t)i * T + j] = g * Z[(size_t)i * T + j];
                    rowdot += P[(size_t)i * T + j] * dS[(size_t)i * T + j];
                }
                for (int j = 0; j < T; j++) {
                    size_t e = (size_t)i * T + j;
                    dS[e] = P[e] * (dS[e] - rowdot) * scale;
                }
            }
            for (int t = 0; t < T; t++)
                for (int d = 0; d < hs; d++) {
                    double sq = 0.0, sk = 0.0, sv = 0.0;
                    for (int u = 0; u < T; u++) {
                        sq += dS[(size_t)t * T + u] * k[(size_t)u * C3 + d];                        // dQ = dS K
                        sk += dS[(size_t)u * T + t] * q[(size_t)u * C3 + d];                        // dK = dS^T Q
                        sv += P[(size_t)u * T + t] * Z[(size_t)u * T + t] * go[(size_t)u * C + d];  // dV = (P Z)^T dO
                    }
                    dq[(size_t)t * C3 + d] = sq;
                    dk[(size_t)t * C3 + d] = sk;
                    dv[(size_t)t * C3 + d] = sv;
                }
        }
    free(P);
}

double attention_ref_error(const float *got, const double *want, size_t n, size_t first, size_t stride, size_t width) {
    double err = 0.0, mx = 0.0;
    for (size_t r = 0; r < n; r++)
        for (size_t c = 0; c < width; c++) {
            size_t e = first + r * stride + c;
            double d = fabs((double)got[e] - want[e]);
            if (isnan(d)) return INFINITY;  // fmax would drop a NaN
            err = fmax(err, d);
            mx = fmax(mx, fabs(want[e]));
        }
    return mx > 0.0 ? err / mx : err;
}

uint8_t *attention_ref_key_valid(int B, int T) {
    uint8_t *v = mlm_malloc((size_t)B * T, "key_valid");
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            v[(size_t)b * T + t] = b == 0 ? (t % 5 != 4 && t != T - 1) : b == 1 ? t >= T / 3 && t < T - T / 4 : 0;
    return v;
}
