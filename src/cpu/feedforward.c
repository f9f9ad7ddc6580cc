// feedforward.c: dropout masks (the rule shared with CUDA, on a CPU copy of cuRAND's Philox stream),
// ReLU + dropout, and residual add + dropout.
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"
#include "mlm/common.h"
#include "philox_cpu.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif

// The dropout uniforms are cuRAND's host Philox stream; rng.c reproduces it on the CPU (philox_cpu.h)
// after checking the reproduction against curandGenerateUniform, since a host-generator call costs
// milliseconds (it emulates a 65,536-thread launch) and a step has 24 dropout sites.

// The smallest raw output x with uniform(x) >= p (2^32 if there is none). uniform() is monotonic in x
// (a conversion, a product and a sum by positive constants, each rounding monotonically), so
// !(uniform(x) < p) is exactly x >= threshold, an integer compare instead of a conversion per element.
uint64_t dropout_keep_threshold(float p) {
    uint64_t lo = 0, hi = (uint64_t)1 << 32;  // invariant: uniform(x) < p for x < lo; >= p at hi (virtually)
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (curand_uniform_of((uint32_t)mid) < p) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

int dropout_is_active(const DropoutCtx *drop) {
    return drop != NULL && drop->p > 0.0f && drop->rng != NULL;
}

float dropout_scale(float p) { return 1.0f / (1.0f - p); }

uint64_t dropout_site_offset(const DropoutCtx *drop, int layer, DropSite site, size_t n) {
    // The uniforms of one site are a prefix (the actual batch) of the region RngLayout reserves for it.
    uint64_t offset = rng_dropout_offset(&drop->layout, drop->step, layer, site);
    // A micro-batch's rows are a contiguous sub-range of the whole batch's [B, ...] region (n / rows per row).
    if (drop->rows > 0) offset += (uint64_t)drop->first_row * ((uint64_t)n / (uint64_t)drop->rows);
    return offset;
}

// Outputs per task of dropout_keep_mask (16 KB of raw outputs on the stack): a multiple of KEEP_WORD_BITS, so each
// task owns whole words of the packed mask.
enum { KEEP_CHUNK = 4096 };
_Static_assert(KEEP_CHUNK % KEEP_WORD_BITS == 0, "a task of dropout_keep_mask must own whole mask words");

// keep[keep_words(len)] = the packed decisions kept[0..len) (bits past len zero).
static void pack_keep_bits(KeepWord *keep, const uint8_t *kept, size_t len) {
    for (size_t w = 0; w < keep_words(len); w++) {
        size_t i0 = w * KEEP_WORD_BITS, bits = MLM_MIN((size_t)KEEP_WORD_BITS, len - i0);
        KeepWord word = 0;
        for (size_t j = 0; j < bits; j++) word |= (KeepWord)kept[i0 + j] << j;
        keep[w] = word;
    }
}

void dropout_keep_mask(KeepWord *keep, const DropoutCtx *drop, int layer, DropSite site, size_t n) {
    if (n == 0) return;
    uint64_t offset = dropout_site_offset(drop, layer, site, n);
    float p = drop->p;
    // Chunks of consecutive outputs, each a pure function of its offsets, so the mask does not depend on how the
    // chunks are shared among threads; each chunk's decisions are made a byte each (a compare the compiler
    // vectorizes), then packed into the chunk's own words.
    uint64_t threshold = dropout_keep_threshold(p), seed = drop->rng->seed;
    int reproduced = rng_reproduced(drop->rng);  // else rng_uniform's host generator, one thread at a time
    long long chunks = (long long)((n + KEEP_CHUNK - 1) / KEEP_CHUNK);
#pragma omp parallel for schedule(static) if (reproduced && n >= PHILOX_PARALLEL_MIN)
    for (long long ch = 0; ch < chunks; ch++) {
        uint8_t kept[KEEP_CHUNK];
        size_t i0 = (size_t)ch * KEEP_CHUNK, len = MLM_MIN((size_t)KEEP_CHUNK, n - i0);
        if (reproduced) {
            // Integer compare on the raw outputs (philox_raw: AVX-512 or AVX2): the same decisions as
            // !(uniform < p), without conversions.
            uint32_t x[KEEP_CHUNK];
            philox_raw(seed, offset + i0, x, len);
            if (threshold > UINT32_MAX) {  // p so close to 1 that nothing is kept
                memset(kept, 0, len);
            } else {
                uint32_t t = (uint32_t)threshold;  // a 32-bit compare, which the compiler vectorizes
                for (size_t i = 0; i < len; i++) kept[i] = x[i] >= t;
            }
        } else {
            float u[KEEP_CHUNK];
            rng_uniform(drop->rng, offset + i0, u, len);
            for (size_t i = 0; i < len; i++) kept[i] = !(u[i] < p);
        }
        pack_keep_bits(keep + i0 / KEEP_WORD_BITS, kept, len);
    }
}

// The masked loops multiply by (keep * scale) instead of selecting: the compiler vectorizes the product
// (a float select is not vectorized under the default -ftrapping-math), and x * (1 * scale) == x * scale
// exactly, x * 0 == 0 (a dropped negative x becomes -0.0, equal to 0 in every later use). They run over the
// mask's words, 32 elements a word with the word's bits shifted out in turn.

void relu_dropout_forward(float *h, const KeepWord *keep, float scale, size_t n) {
    long long count = (long long)n;
    if (keep == NULL) {
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
        for (long long i = 0; i < count; i++) h[i] = h[i] > 0.0f ? h[i] : 0.0f;
        return;
    }
    long long words = (long long)keep_words(n);
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long w = 0; w < words; w++) {
        size_t i0 = (size_t)w * KEEP_WORD_BITS, len = MLM_MIN((size_t)KEEP_WORD_BITS, n - i0);
        KeepWord bits = keep[w];
        float *hw = h + i0;
        for (size_t j = 0; j < len; j++) hw[j] *= (float)((hw[j] > 0.0f) & (bits >> j) & 1u) * scale;
    }
}

void relu_dropout_backward(float *dh, const float *h, float scale, size_t n) {
    // ReLU'(0) = 0 as in PyTorch; a positive unit stays positive after scaling by scale >= 1.
    long long count = (long long)n;
#ifdef __SSE2__
    // The compiler leaves the loop below scalar with a branch per element, mispredicted at every other unit of a
    // ReLU layer (3.6% of a step). The same products four at a time: the compare's mask selects scale or +0.0f,
    // exactly the factor (float)(h > 0) * scale.
    long long quads = count / 4;
    const __m128 vscale = _mm_set1_ps(scale), zero = _mm_setzero_ps();
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long q = 0; q < quads; q++) {
        __m128 factor = _mm_and_ps(_mm_cmpgt_ps(_mm_loadu_ps(h + 4 * q), zero), vscale);
        _mm_storeu_ps(dh + 4 * q, _mm_mul_ps(_mm_loadu_ps(dh + 4 * q), factor));
    }
    for (long long i = 4 * quads; i < count; i++) dh[i] *= (float)(h[i] > 0.0f) * scale;
#else
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long i = 0; i < count; i++) dh[i] *= (float)(h[i] > 0.0f) * scale;
#endif
}

void residual_dropout_forward(float *out, const float *res, const float *y, const KeepWord *keep, float scale,
                              size_t n) {
    long long count = (long long)n;
    if (keep == NULL) {
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
        for (long long i = 0; i < count; i++) out[i] = res[i] + y[i];
        return;
    }
    long long words = (long long)keep_words(n);
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long w = 0; w < words; w++) {
        size_t i0 = (size_t)w * KEEP_WORD_BITS, len = MLM_MIN((size_t)KEEP_WORD_BITS, n - i0);
        KeepWord bits = keep[w];
        for (size_t j = 0; j < len; j++) out[i0 + j] = res[i0 + j] + y[i0 + j] * ((float)((bits >> j) & 1u) * scale);
    }
}

void residual_dropout_backward(float *dy, const float *dout, const KeepWord *keep, float scale, size_t n) {
    long long count = (long long)n;
    if (keep == NULL) {
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
        for (long long i = 0; i < count; i++) dy[i] = dout[i];
        return;
    }
    long long words = (long long)keep_words(n);
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long w = 0; w < words; w++) {
        size_t i0 = (size_t)w * KEEP_WORD_BITS, len = MLM_MIN((size_t)KEEP_WORD_BITS, n - i0);
        KeepWord bits = keep[w];
        for (size_t j = 0; j < len; j++) dy[i0 + j] = dout[i0 + j] * ((float)((bits >> j) & 1u) * scale);
    }
}

void relu_dropout_backward_sums(float *dh, const float *h, float scale, int N, int C, float *dbias) {
    relu_dropout_backward(dh, h, scale, (size_t)N * C);
    column_sums_accumulate(dbias, dh, N, C);
}

void residual_dropout_backward_sums(float *dy, const float *dout, const KeepWord *keep, float scale, int N, int C,
                                    float *dbias) {
    residual_dropout_backward(dy, dout, keep, scale, (size_t)N * C);
    column_sums_accumulate(dbias, dy, N, C);
}
