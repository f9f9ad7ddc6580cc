// attention.c: the multi-head attention core, tiled (FlashAttention-2's algorithm), forward and backward.
//
// Nothing of size T x T is stored: per (batch, head) the queries are taken in tiles of ATTN_TILE rows and the
// keys in tiles of ATTN_TILE columns. The forward keeps, per query row, the running maximum m and sum l of the
// exponentials (the online softmax: when a key tile raises m, the sum and the output rows accumulated so far are
// rescaled by exp(m_old - m_new)), and saves only the output and lse = m + log(l) per row. The backward
// recomputes each tile's probabilities as P = exp(S - lse) and uses D_i = dO_i . O_i for the softmax's row sum
// (sum_j P_ij dP_ij = dO_i . O_i, dropout included). Attention dropout is regenerated inside each tile from the
// Philox counter of each (batch, head, query, key) element: the same uniform, at the same stream offset, as THE
// DROPOUT RULE of ops.h gives element (b, h, i, j) of the [B, H, T, T] site, so the decisions are those of the
// materialised attention before this file was tiled, and the CUDA kernels' (attention.cu), bit for bit.
//
// Each (batch, head) pair is one task of an OpenMP loop; the tile products are single-threaded sgemm calls on
// the head's strided slices of qkv (matmul_serial). Every sum runs in a fixed order, so the results do not
// depend on the thread count.
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/matmul.h"
#include "cpu/ops.h"
#include "mlm/common.h"
#include "philox_cpu.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

// Rows (queries) and columns (keys) of a tile: a tile's scores, probabilities and masks fit in L1/L2, and at the
// reference shape (T 32) one tile is the whole head, as the materialised attention was.
enum { ATTN_TILE = 64 };

int attention_dropout(AttnDropout *ad, const DropoutCtx *drop, int layer, size_t n) {
    if (!dropout_is_active(drop)) return 0;
    // The tiles compute cuRAND's Philox outputs themselves (philox_cpu.h), which rng.c has checked against the
    // host generator for this stream; a cuRAND whose stream differs would leave them nothing to match.
    if (!rng_reproduced(drop->rng))
        mlm_fatal(MLM_EXIT_FAILURE, "attention dropout regenerates cuRAND's Philox stream inside its tiles, but this "
                  "cuRAND's host generator lays the stream out differently from mlm's reproduction (philox_cpu.h); "
                  "train with model.dropout = 0 or report the CUDA version");
    ad->seed = drop->rng->seed;
    ad->offset = dropout_site_offset(drop, layer, DROP_ATTN_PROBS, n);
    ad->threshold = dropout_keep_threshold(drop->p);
    ad->p = drop->p;
    ad->scale = dropout_scale(drop->p);
    return 1;
}

// Multipliers keep * scale (0 or scale) of the n attention elements at stream offsets [offset, offset + n), in
// rows of row_len: element offset + e goes to z[(e / row_len) * stride + e % row_len]. THE DROPOUT RULE of ops.h
// on cuRAND's Philox outputs, computed here (kept where the raw output reaches the threshold: !(u < p) exactly).
static void dropout_range(float *z, const AttnDropout *d, uint64_t offset, size_t n, int row_len, int stride) {
    uint32_t x[ATTN_TILE * ATTN_TILE];  // the raw outputs in stream order (n: whole rows, at most a tile)
    philox_raw(d->seed, offset, x, n);
    for (size_t r = 0; r * (size_t)row_len < n; r++) {
        const uint32_t *xr = x + r * (size_t)row_len;
        float *zr = z + r * (size_t)stride;
        int c = 0;
#ifdef __SSE2__
        // Four at a time (the scalar loop compiles to a branch per element): x >= threshold as a signed compare of
        // both with the sign bit flipped; a threshold of 2^32 (p = 1) keeps nothing.
        if (d->threshold <= UINT32_MAX) {
            const __m128i flip = _mm_set1_epi32((int)0x80000000u);
            const __m128i t = _mm_xor_si128(_mm_set1_epi32((int)(uint32_t)d->threshold), flip);
            const __m128 scale = _mm_set1_ps(d->scale);
            for (; c + 4 <= row_len; c += 4) {
                __m128i dropped = _mm_cmpgt_epi32(t, _mm_xor_si128(_mm_loadu_si128((const __m128i *)(xr + c)), flip));
                _mm_storeu_ps(zr + c, _mm_andnot_ps(_mm_castsi128_ps(dropped), scale));
            }
        }
#endif
        for (; c < row_len; c++) zr[c] = xr[c] >= d->threshold ? d->scale : 0.0f;
    }
}

// A head's view of qkv, out and their gradients: [T, hs] slices with row strides 3C (q, k, v) and C (out).
typedef struct {
    int T, hs, C3, C, bh, b;
    float scale;                // 1 / sqrt(hs)
    const float *q, *k, *v;     // [T, hs], row stride C3
    const uint8_t *key_valid;   // [T] of sequence b, or NULL
    const AttnDropout *drop;    // NULL: no dropout
} AttnHead;

// The key mask of sequence b: NULL when every key is valid, and when none is (ops.h: such a sequence attends to
// every key), so that every query row has a valid key.
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

// Where head bh's [T, hs] slice starts in a [B, T, width] array whose rows hold the heads' slices side by side
// (qkv's q part with width 3C, the attention output and its gradient with width C).
static size_t head_start(int bh, int T, int H, int hs, int width) {
    return (size_t)(bh / H) * T * width + (size_t)(bh % H) * hs;
}

static AttnHead attn_head(const float *qkv, const uint8_t *key_valid, const AttnDropout *drop, int bh, int T, int C,
                          int H) {
    int hs = C / H, b = bh / H;
    const float *q = qkv + head_start(bh, T, H, hs, 3 * C);
    return (AttnHead){T, hs, 3 * C, C, bh, b, 1.0f / sqrtf((float)hs), q, q + C, q + 2 * C,
                      sequence_key_mask(key_valid, b, T), drop};
}

// Asks for rows [T][hs] (row stride `stride`) into L2, for reading or writing (rw): the next head's slices while
// this head computes. A head reads one cache line or two of each row (hs floats of a 3C-float row): too few per
// row for the hardware prefetcher to learn the stride, so each head otherwise waits for its rows from L3 or memory.
static void prefetch_rows(const float *x, int T, size_t stride, int hs, int rw) {
    for (int i = 0; i < T; i++)
        for (int d = 0; d < hs; d += 16) {
            if (rw) __builtin_prefetch(x + (size_t)i * stride + d, 1, 2);
            else __builtin_prefetch(x + (size_t)i * stride + d, 0, 2);
        }
}

// s[br, ATTN_TILE] = (Q[i0..] K[j0..]^T) * scale over a br x bc tile, -inf at [PAD] keys (exp gives them 0).
static void tile_scores(float *s, const AttnHead *a, int i0, int br, int j0, int bc) {
    matmul_serial(0, 1, br, bc, a->hs, a->scale, a->q + (size_t)i0 * a->C3, a->C3, a->k + (size_t)j0 * a->C3, a->C3,
                  0.0f, s, ATTN_TILE);
    if (!a->key_valid) return;
    for (int r = 0; r < br; r++)
        for (int c = 0; c < bc; c++)
            if (!a->key_valid[j0 + c]) s[(size_t)r * ATTN_TILE + c] = -INFINITY;
}

// z[br, ATTN_TILE] = the dropout multipliers (keep * scale) of the tile's elements (b, h, i0 + r, j0 + c), whose
// index in the site's [B, H, T, T] order is (bh T + i) T + j: one range when the tile holds whole rows (T <= the
// tile), else one range per row.
static void tile_dropout(float *z, const AttnHead *a, int i0, int br, int j0, int bc) {
    uint64_t e0 = a->drop->offset + ((uint64_t)a->bh * (uint64_t)a->T + (uint64_t)i0) * (uint64_t)a->T + (uint64_t)j0;
    if (bc == a->T) {
        dropout_range(z, a->drop, e0, (size_t)br * bc, bc, ATTN_TILE);
        return;
    }
    for (int r = 0; r < br; r++)
        dropout_range(z + (size_t)r * ATTN_TILE, a->drop, e0 + (uint64_t)r * a->T, bc, bc, ATTN_TILE);
}

// Forward of one query tile: out rows [i0, i0 + br) of the head (row stride C) and their lse.
// Scratch: s, z [ATTN_TILE, ATTN_TILE], o [ATTN_TILE, hs], m, l [ATTN_TILE].
static void forward_query_tile(float *out, float *lse, const AttnHead *a, int i0, int br, float *s, float *z,
                               float *o, float *m, float *l) {
    int hs = a->hs;
    memset(o, 0, (size_t)br * hs * sizeof(float));
    for (int r = 0; r < br; r++) m[r] = -INFINITY, l[r] = 0.0f;
    for (int j0 = 0; j0 < a->T; j0 += ATTN_TILE) {
        int bc = MLM_MIN(ATTN_TILE, a->T - j0);
        tile_scores(s, a, i0, br, j0, bc);
        if (a->drop) tile_dropout(z, a, i0, br, j0, bc);
        for (int r = 0; r < br; r++) {
            float *sr = s + (size_t)r * ATTN_TILE;
            float mx = row_max(sr, bc);
            float m_new = m[r] > mx ? m[r] : mx;
            if (m_new == -INFINITY) {  // every key so far is [PAD] (keys of a later tile are valid): nothing to add
                for (int c = 0; c < bc; c++) sr[c] = 0.0f;
                continue;
            }
            // exp(-inf) = 0: a [PAD] key's p, and the rescale of a row whose earlier keys were all [PAD].
            // The row's sum in THE ROW ORDER of vexp.c; THE DROPOUT RULE applied to the probabilities after it.
            float corr = expf(m[r] - m_new);
            float sum = exp_shifted_sum(sr, sr, m_new, a->drop ? z + (size_t)r * ATTN_TILE : NULL, bc);
            // Rescale what the earlier key tiles accumulated (nothing before the first).
            l[r] = l[r] * corr + sum;
            m[r] = m_new;
            if (j0 > 0)
                for (int d = 0; d < hs; d++) o[(size_t)r * hs + d] *= corr;
        }
        // o += dropout(P~) V over the tile's keys (P~ = exp(S - m), normalised by l at the end).
        matmul_serial(0, 0, br, hs, bc, 1.0f, s, ATTN_TILE, a->v + (size_t)j0 * a->C3, a->C3, 1.0f, o, hs);
    }
    for (int r = 0; r < br; r++) {  // every row has a valid key (sequence_key_mask), so l > 0
        float inv = 1.0f / l[r];
        float *y = out + (size_t)(i0 + r) * a->C;
        for (int d = 0; d < hs; d++) y[d] = o[(size_t)r * hs + d] * inv;
        lse[i0 + r] = m[r] + logf(l[r]);
    }
}

void attention_forward(float *out, float *lse, const float *qkv, const uint8_t *key_valid, const AttnDropout *drop,
                       int B, int T, int C, int H) {
    int hs = C / H;
    matmul_init();
#pragma omp parallel if ((long long)B * H * T * T * hs >= MLM_PARALLEL_MIN_WORK)
    {
        // Per-thread tile scratch: s, z [ATTN_TILE, ATTN_TILE], o [ATTN_TILE, hs], m, l [ATTN_TILE].
        size_t tt = (size_t)ATTN_TILE * ATTN_TILE;
        float *s = mlm_malloc((2 * tt + (size_t)ATTN_TILE * (hs + 2)) * sizeof(float), "attention tile scratch");
        float *z = s + tt, *o = z + tt, *m = o + (size_t)ATTN_TILE * hs, *l = m + ATTN_TILE;
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            AttnHead a = attn_head(qkv, key_valid, drop, bh, T, C, H);
            if (bh + 1 < B * H) {  // the next head's q, k, v (this thread's next, unless its share ends here)
                const float *next = qkv + head_start(bh + 1, T, H, hs, 3 * C);
                for (int x = 0; x < 3; x++) prefetch_rows(next + (size_t)x * C, T, (size_t)3 * C, hs, 0);
            }
            float *y = out + head_start(bh, T, H, hs, C);  // [T, hs], row stride C
            for (int i0 = 0; i0 < T; i0 += ATTN_TILE)
                forward_query_tile(y, lse + (size_t)bh * T, &a, i0, MLM_MIN(ATTN_TILE, T - i0), s, z, o, m, l);
        }
        free(s);
    }
}

// Backward of one (query tile, key tile) pair, accumulating into the head's dq (rows [i0, i0 + br)), dk and dv
// (rows [j0, j0 + bc)), all of row stride 3C. go: the head's dO (row stride C); lse and dsum: the head's lse and
// D = rowsum(dO * O). Scratch: s, z, pd, dp [ATTN_TILE, ATTN_TILE].
static void backward_tile(float *dq, float *dk, float *dv, const AttnHead *a, const float *go, const float *lse,
                          const float *dsum, int i0, int br, int j0, int bc, float *s, float *z, float *pd, float *dp) {
    int hs = a->hs, C3 = a->C3;
    const float *gi = go + (size_t)i0 * a->C;
    // P = exp(S - lse): the forward's probabilities, recomputed (into s; 0 at [PAD] keys, S = -inf).
    tile_scores(s, a, i0, br, j0, bc);
    for (int r = 0; r < br; r++) exp_shifted(s + (size_t)r * ATTN_TILE, s + (size_t)r * ATTN_TILE, lse[i0 + r], bc);
    // out = dropout(P) V: dV += dropout(P)^T dO.
    if (a->drop) {
        tile_dropout(z, a, i0, br, j0, bc);
        for (int r = 0; r < br; r++)
            for (int c = 0; c < bc; c++) {
                size_t e = (size_t)r * ATTN_TILE + c;
                pd[e] = s[e] * z[e];
            }
    } else {
        pd = s;
    }
    matmul_serial(1, 0, bc, hs, br, 1.0f, pd, ATTN_TILE, gi, a->C, 1.0f, dv + (size_t)j0 * C3, C3);
    // d dropout(P) = dO V^T; undo the dropout (dP = d dropout(P) * keep * scale), then the softmax with the score
    // scale: dS = P (dP - D) * scale (into dp). D = sum_j P dP over ALL keys of the row, which is dO . O.
    matmul_serial(0, 1, br, bc, hs, 1.0f, gi, a->C, a->v + (size_t)j0 * C3, C3, 0.0f, dp, ATTN_TILE);
    for (int r = 0; r < br; r++) {
        // Per row, with D and the scale in registers (dp could alias them for all the compiler knows, which kept
        // the loop from being vectorized): the same operations in the same order.
        const float *sr = s + (size_t)r * ATTN_TILE, *zr = z + (size_t)r * ATTN_TILE;
        float *dpr = dp + (size_t)r * ATTN_TILE;
        float d = dsum[i0 + r], scale = a->scale;
        if (a->drop)
            for (int c = 0; c < bc; c++) dpr[c] = sr[c] * (dpr[c] * zr[c] - d) * scale;
        else
            for (int c = 0; c < bc; c++) dpr[c] = sr[c] * (dpr[c] - d) * scale;
    }
    // scores = Q K^T * scale: dQ += dS K, dK += dS^T Q.
    matmul_serial(0, 0, br, hs, bc, 1.0f, dp, ATTN_TILE, a->k + (size_t)j0 * C3, C3, 1.0f, dq + (size_t)i0 * C3, C3);
    matmul_serial(1, 0, bc, hs, br, 1.0f, dp, ATTN_TILE, a->q + (size_t)i0 * C3, C3, 1.0f, dk + (size_t)j0 * C3, C3);
}

void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                        const uint8_t *key_valid, const AttnDropout *drop, int B, int T, int C, int H) {
    int hs = C / H, C3 = 3 * C;
    matmul_init();
#pragma omp parallel if ((long long)B * H * T * T * hs >= MLM_PARALLEL_MIN_WORK)
    {
        // Per-thread scratch: s, z, pd, dp [ATTN_TILE, ATTN_TILE], dsum [T].
        size_t tt = (size_t)ATTN_TILE * ATTN_TILE;
        float *s = mlm_malloc((4 * tt + (size_t)T) * sizeof(float), "attention tile scratch");
        float *z = s + tt, *pd = z + tt, *dp = pd + tt, *dsum = dp + tt;
#pragma omp for schedule(static)
        for (int bh = 0; bh < B * H; bh++) {
            AttnHead a = attn_head(qkv, key_valid, drop, bh, T, C, H);
            size_t at_qkv = head_start(bh, T, H, hs, C3), at_out = head_start(bh, T, H, hs, C);
            float *dq = dqkv + at_qkv, *dk = dq + C, *dv = dq + 2 * C;  // this task's slices
            const float *go = dout + at_out, *y = out + at_out;          // [T, hs], row stride C
            const float *lse_h = lse + (size_t)bh * T;
            if (bh + 1 < B * H) {  // the next head's slices (see attention_forward)
                size_t next_qkv = head_start(bh + 1, T, H, hs, C3), next_out = head_start(bh + 1, T, H, hs, C);
                for (int x = 0; x < 3; x++) {
                    prefetch_rows(qkv + next_qkv + (size_t)x * C, T, C3, hs, 0);
                    prefetch_rows(dqkv + next_qkv + (size_t)x * C, T, C3, hs, 1);
                }
                prefetch_rows(dout + next_out, T, C, hs, 0);
                prefetch_rows(out + next_out, T, C, hs, 0);
            }
            for (int i = 0; i < T; i++) {
                dsum[i] = row_dot(go + (size_t)i * C, y + (size_t)i * C, hs);  // THE ROW ORDER of vexp.c
                memset(dq + (size_t)i * C3, 0, (size_t)hs * sizeof(float));
                memset(dk + (size_t)i * C3, 0, (size_t)hs * sizeof(float));
                memset(dv + (size_t)i * C3, 0, (size_t)hs * sizeof(float));
            }
            for (int i0 = 0; i0 < T; i0 += ATTN_TILE)
                for (int j0 = 0; j0 < T; j0 += ATTN_TILE)
                    backward_tile(dq, dk, dv, &a, go, lse_h, dsum, i0, MLM_MIN(ATTN_TILE, T - i0), j0,
                                  MLM_MIN(ATTN_TILE, T - j0), s, z, pd, dp);
        }
        free(s);
    }
}
