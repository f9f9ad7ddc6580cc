// rng.c: Philox streams on cuRAND's host generator (or, built without CUDA, on its CPU reproduction alone),
// and the per-step offset layout of masks and dropout.
#include "mlm/rng.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "philox_cpu.h"

#ifdef MLM_HAVE_CUDA
#include <curand.h>

#include "mlm/curand_check.h"
#endif

static uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

uint64_t rng_domain_seed(uint64_t user_seed, RngDomain domain) {
    return splitmix64(user_seed ^ splitmix64((uint64_t)domain + 1));
}

void philox_uniform(uint64_t seed, uint64_t offset, float *out, size_t n) {
    if (n == 0) return;
    FOR_EACH_PHILOX(seed, offset, (uint64_t)n, out[i] = curand_uniform_of(x));
}

void philox_u32(uint64_t seed, uint64_t offset, uint32_t *out, size_t n) {
    if (n == 0) return;
    FOR_EACH_PHILOX(seed, offset, (uint64_t)n, out[i] = x);
}

// cuRAND's Box-Muller (curand_normal.h, _curand_box_muller, host branch): the raw outputs 2j and 2j + 1 of
// the stream give normals 2j (sine) and 2j + 1 (cosine). Separate statements keep the compiler from fusing
// a multiply and an add that cuRAND rounds separately.
void philox_normal(uint64_t seed, uint64_t offset, float *out, size_t n, float mean, float std) {
    if (n == 0) return;
    size_t pairs = (n + 1) / 2;
    uint32_t *raw = mlm_malloc(2 * pairs * sizeof(uint32_t), "normal samples");  // [2 * pairs]
    philox_u32(seed, offset, raw, 2 * pairs);
    const float inv_2pi = CURAND_2POW32_INV * 6.2831855f;
    for (size_t j = 0; j < pairs; j++) {
        float u = (float)raw[2 * j] * CURAND_2POW32_INV;
        u = u + CURAND_2POW32_INV / 2.0f;
        float v = (float)raw[2 * j + 1] * inv_2pi;
        v = v + inv_2pi / 2.0f;
        float s = sqrtf(-2.0f * logf(u));
        float z[2] = {sinf(v) * s, cosf(v) * s};
        for (int t = 0; t < 2 && 2 * j + t < n; t++) {
            float scaled = z[t] * std;
            out[2 * j + t] = scaled + mean;
        }
    }
    free(raw);
}

#ifdef MLM_HAVE_CUDA
void rng_init(Rng *rng, uint64_t user_seed, RngDomain domain) {
    curandGenerator_t g;
    CURAND_CHECK(curandCreateGeneratorHost(&g, CURAND_RNG_PSEUDO_PHILOX4_32_10));
    // Pinned: DEFAULT is documented only as "same as BEST" and may change between releases; LEGACY is the
    // layout philox_cpu.h reproduces and the device generator (cuda_model.cu) uses too.
    CURAND_CHECK(curandSetGeneratorOrdering(g, CURAND_ORDERING_PSEUDO_LEGACY));
    rng->seed = rng_domain_seed(user_seed, domain);
    CURAND_CHECK(curandSetPseudoRandomGeneratorSeed(g, rng->seed));
    rng->gen = g;
    rng->pos = 0;
    rng->reproduced = -1;
}

void rng_free(Rng *rng) {
    if (rng->gen) CURAND_CHECK(curandDestroyGenerator((curandGenerator_t)rng->gen));
    rng->gen = NULL;
}

// Position the generator at `offset` unless it is already there (a seek costs milliseconds).
static void seek(Rng *rng, uint64_t offset) {
    if (rng->pos == offset) return;
    CURAND_CHECK(curandSetGeneratorOffset((curandGenerator_t)rng->gen, offset));
    rng->pos = offset;
}

static void curand_uniform_at(Rng *rng, uint64_t offset, float *out, size_t n) {
    seek(rng, offset);
    CURAND_CHECK(curandGenerateUniform((curandGenerator_t)rng->gen, out, n));
    rng->pos = offset + n;
}

int rng_reproduced(Rng *rng) {
    if (rng->reproduced < 0) {
        enum { SAMPLE = 64 };
        float want[SAMPLE], got[SAMPLE];
        // Crosses a thread-row boundary of cuRAND's layout, from an offset that is not a multiple of 4.
        uint64_t offset = (uint64_t)CURAND_PHILOX_THREADS * 4 * 3 - 2 * SAMPLE + 1;
        curand_uniform_at(rng, offset, want, SAMPLE);
        philox_uniform(rng->seed, offset, got, SAMPLE);
        rng->reproduced = memcmp(want, got, sizeof(want)) == 0;
        if (!rng->reproduced)
            mlm_warn("this cuRAND lays out its host Philox stream differently from mlm's CPU copy; drawing from "
                     "cuRAND directly (slower, same results)");
    }
    return rng->reproduced;
}

void rng_uniform(Rng *rng, uint64_t offset, float *out, size_t n) {
    if (n == 0) return;
    if (rng_reproduced(rng)) {
        philox_uniform(rng->seed, offset, out, n);
        return;
    }
    seek(rng, offset);
    CURAND_CHECK(curandGenerateUniform((curandGenerator_t)rng->gen, out, n));
    rng->pos = offset + n;
}

void rng_u32(Rng *rng, uint64_t offset, uint32_t *out, size_t n) {
    if (n == 0) return;
    seek(rng, offset);
    CURAND_CHECK(curandGenerate((curandGenerator_t)rng->gen, out, n));
    rng->pos = offset + n;
}

void rng_normal(Rng *rng, uint64_t offset, float *out, size_t n, float mean, float std) {
    if (n == 0) return;
    CURAND_CHECK(curandSetGeneratorOffset((curandGenerator_t)rng->gen, offset));
    rng->pos = UINT64_MAX;  // how many outputs Box-Muller consumed is the library's business: seek next time
    if (n % 2 == 0) {
        CURAND_CHECK(curandGenerateNormal((curandGenerator_t)rng->gen, out, n, mean, std));
        return;
    }
    // cuRAND generates normals in pairs (Box-Muller); draw one extra and drop it.
    float *tmp = mlm_malloc((n + 1) * sizeof(float), "normal samples");
    CURAND_CHECK(curandGenerateNormal((curandGenerator_t)rng->gen, tmp, n + 1, mean, std));
    for (size_t i = 0; i < n; i++) out[i] = tmp[i];
    free(tmp);
}

#else
// Built without CUDA: the CPU reproduction is the generator (the CUDA builds test it bit for bit against
// cuRAND's host generator: test_cpu_ops), so runs draw the same numbers in either build.
void rng_init(Rng *rng, uint64_t user_seed, RngDomain domain) {
    rng->seed = rng_domain_seed(user_seed, domain);
    rng->gen = NULL;
    rng->pos = 0;
    rng->reproduced = 1;
}

void rng_free(Rng *rng) { rng->gen = NULL; }

int rng_reproduced(Rng *rng) { return rng->reproduced; }

void rng_uniform(Rng *rng, uint64_t offset, float *out, size_t n) { philox_uniform(rng->seed, offset, out, n); }

void rng_u32(Rng *rng, uint64_t offset, uint32_t *out, size_t n) { philox_u32(rng->seed, offset, out, n); }

void rng_normal(Rng *rng, uint64_t offset, float *out, size_t n, float mean, float std) {
    philox_normal(rng->seed, offset, out, n, mean, std);
}
#endif

RngLayout rng_layout_sites(int B, int T, int C, int H, uint64_t ffn_hidden, uint64_t embed, int n_layers) {
    RngLayout l;
    uint64_t bt = (uint64_t)B * (uint64_t)T;
    l.mask = 4 * bt;
    l.embed = embed;
    l.attn_probs = bt * (uint64_t)H * (uint64_t)T;
    l.attn_resid = bt * (uint64_t)C;
    l.ffn_hidden = ffn_hidden;
    l.ffn_resid = bt * (uint64_t)C;
    l.per_layer = l.attn_probs + l.attn_resid + l.ffn_hidden + l.ffn_resid;
    // No padding between steps: consecutive steps must stay adjacent in the stream (see rng_uniform).
    l.per_step = l.mask + l.embed + (uint64_t)n_layers * l.per_layer;
    return l;
}

RngLayout rng_layout(int B, int T, int C, int H, int F, int n_layers) {
    return rng_layout_sites(B, T, C, H, (uint64_t)B * (uint64_t)T * (uint64_t)F, 0, n_layers);
}

uint64_t rng_mask_offset(const RngLayout *l, uint64_t step) { return step * l->per_step; }

uint64_t rng_dropout_offset(const RngLayout *l, uint64_t step, int layer, DropSite site) {
    if (site == DROP_EMBED) return step * l->per_step + l->mask;
    uint64_t o = step * l->per_step + l->mask + l->embed + (uint64_t)layer * l->per_layer;
    if (site > DROP_ATTN_PROBS) o += l->attn_probs;
    if (site > DROP_ATTN_RESID) o += l->attn_resid;
    if (site > DROP_FFN_HIDDEN) o += l->ffn_hidden;
    return o;
}
