// rng.h: seeded Philox random streams (cuRAND host generator) and the layout of offsets within a step.
//
// Every random number mlm draws comes from cuRAND's Philox4_32_10 generator. A stream is identified by
// (seed, domain); within a stream a draw is addressed by an absolute 64-bit offset, counted in 32-bit
// outputs, so any step's masks and dropout can be regenerated without replaying earlier steps. The CUDA
// backend uses a device generator with the same seed and offsets and therefore draws the same numbers.
#ifndef MLM_RNG_H
#define MLM_RNG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Independent streams derived from the one user seed.
typedef enum {
    RNG_DOMAIN_INIT = 0,   // parameter initialisation
    RNG_DOMAIN_DATA = 1,   // sequence offsets and epoch shuffles
    RNG_DOMAIN_TRAIN = 2,  // masks and dropout of training steps, indexed by optimizer step
    RNG_DOMAIN_VALID = 3,  // masks (and optional dropout) of validation batches
    RNG_DOMAIN_SAMPLE = 4, // masks of the printed samples, indexed by epoch
    RNG_DOMAIN_EVAL = 5,   // `mlm eval` / `mlm fill`
    RNG_DOMAIN_ROUND = 6,  // stochastic rounding of the BF16 parameter copy (train.precision = bf16), by step
} RngDomain;

typedef struct {
    void *gen;      // curandGenerator_t (host generator; NULL in builds without CUDA); opaque: no cuRAND in headers
    uint64_t seed;  // the derived Philox seed of this stream
    uint64_t pos;   // offset the generator will produce next (UINT64_MAX: unknown)
    int reproduced; // -1 unchecked; 1: the CPU reproduction of the stream matched cuRAND; 0: it did not
} Rng;

// Derive a stream's Philox seed from the user seed and a domain (splitmix64 mixing).
uint64_t rng_domain_seed(uint64_t user_seed, RngDomain domain);
void rng_init(Rng *rng, uint64_t user_seed, RngDomain domain);
void rng_free(Rng *rng);
// n uniforms in (0, 1], starting at absolute `offset` of the stream.
// Performance: the host generator spends ~6 ms re-positioning after any seek, and ~6 ns per number drawn
// contiguously, so rng_* seek only when `offset` is not where the previous draw ended. Draw a stream's
// regions in increasing, adjacent order (as the training step does) to avoid seeks.
void rng_uniform(Rng *rng, uint64_t offset, float *out, size_t n);
// 1 when this stream's uniforms can be computed by the CPU reproduction of cuRAND's host Philox stream
// (philox_cpu.h): checked once per stream against curandGenerateUniform (one sample crossing a thread
// boundary at an unaligned offset). rng_uniform then uses the reproduction, which runs at memory speed in
// parallel instead of ~6 ms per seek plus ~6 ns per number on one thread; both give the same bits.
int rng_reproduced(Rng *rng);
// out[n] = the uniforms of the stream whose Philox seed is `seed` (Rng.seed) from absolute `offset`,
// computed by the CPU reproduction (no check; use rng_uniform unless you have checked rng_reproduced).
void philox_uniform(uint64_t seed, uint64_t offset, float *out, size_t n);
// The same stream's raw 32-bit outputs and Box-Muller normals (as rng_u32 and rng_normal), computed by the
// CPU reproduction: the generator itself in builds without CUDA; compared with cuRAND in the others.
void philox_u32(uint64_t seed, uint64_t offset, uint32_t *out, size_t n);
void philox_normal(uint64_t seed, uint64_t offset, float *out, size_t n, float mean, float std);
// n raw 32-bit outputs, starting at absolute `offset` of the stream.
void rng_u32(Rng *rng, uint64_t offset, uint32_t *out, size_t n);
// n normals N(mean, std) starting at `offset`; n is rounded up to even internally (cuRAND needs pairs).
void rng_normal(Rng *rng, uint64_t offset, float *out, size_t n, float mean, float std);

// Where each random draw of one step lives. A step owns `per_step` consecutive outputs starting at
// step * per_step; inside it the masking uniforms come first, then the embedding dropout (bert only; empty for
// labml), then per layer the dropout sites in forward order, so a training run consumes its stream contiguously
// (no seeks; see rng_uniform). Sizes are for the configured (maximum) batch, so a partial last batch uses a
// prefix of each site. model_rng_layout (model.h) makes the layout of an architecture.
typedef struct {
    uint64_t mask;        // 4 * B * T: U1 (select), U2 (unchanged), U3 (random), U4 (random token)
    uint64_t embed;       // B * T * C: the embedding output's dropout (bert); 0 for labml
    uint64_t attn_probs;  // B * H * T * T per layer
    uint64_t attn_resid;  // B * T * C per layer
    uint64_t ffn_hidden;  // B * T * F per layer
    uint64_t ffn_resid;   // B * T * C per layer
    uint64_t per_layer;   // sum of the four dropout sites
    uint64_t per_step;    // mask + embed + n_layers * per_layer
} RngLayout;

// DROP_EMBED is the one site outside the layers (its `layer` argument is ignored).
typedef enum { DROP_ATTN_PROBS = 0, DROP_ATTN_RESID = 1, DROP_FFN_HIDDEN = 2, DROP_FFN_RESID = 3, DROP_EMBED = 4 } DropSite;

// labml's layout: four sites per layer, no embedding site.
RngLayout rng_layout(int B, int T, int C, int H, int F, int n_layers);
// The same with an embedding site of `embed` outputs and an FFN-hidden site of `ffn_hidden` per layer (bert: B * T
// * C and 0).
RngLayout rng_layout_sites(int B, int T, int C, int H, uint64_t ffn_hidden, uint64_t embed, int n_layers);
// Absolute offset of the masking uniforms of step `step`.
uint64_t rng_mask_offset(const RngLayout *l, uint64_t step);
// Absolute offset of dropout site `site` of layer `layer` in step `step`.
uint64_t rng_dropout_offset(const RngLayout *l, uint64_t step, int layer, DropSite site);

#ifdef __cplusplus
}
#endif

#endif
