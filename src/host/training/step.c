// step.c: one optimizer step over a backend and a reducer (see step.h), whatever the backend and the parallelism.
#include "mlm/step.h"

#include <stdlib.h>

#include "mlm/common.h"

void step_init(Step *s, const MaskConfig *mask, RngLayout layout, int seq_len, int max_rows) {
    *s = (Step){.mask = mask, .layout = layout, .seq_len = seq_len};
    size_t bt = (size_t)max_rows * seq_len;
    s->inputs = mlm_malloc(bt * sizeof(int), "masked batch inputs");
    s->labels = mlm_malloc(bt * sizeof(int), "masked batch labels");
    s->uniforms = mlm_malloc(4 * bt * sizeof(float), "masking uniforms");
}

void step_shard(const Reducer *rd, size_t n, int zero, size_t *lo, size_t *len) {
    *lo = 0;
    *len = n;
    if (!zero || rd->dist.world == 1) return;
    *lo = reducer_shard_start(rd, n, rd->dist.rank);
    *len = reducer_shard_start(rd, n, rd->dist.rank + 1) - *lo;
}

void step_plan(Step *s, Backend *be, Reducer *rd, Rng *rng, float dropout, int batch_size, int accum_steps, int zero) {
    int world = rd->dist.world;  // (config_check holds batch_size to a multiple of accum_steps)
    if (accum_steps % world != 0)
        mlm_fatal(MLM_EXIT_USAGE, "train.accum_steps = %d is not a multiple of the %d ranks: each rank takes "
                  "accum_steps / ranks micro-batches of a step; set train.accum_steps to a multiple of %d", accum_steps,
                  world, world);
    s->be = be;
    s->rd = rd;
    s->rng = rng;
    s->dropout = dropout;
    s->micro_rows = batch_size / accum_steps;
    s->micro_per_rank = accum_steps / world;
    s->first_micro = rd->dist.rank * s->micro_per_rank;
    step_shard(rd, be->n_params, zero, &s->lo, &s->len);
}

void step_free(Step *s) {
    free(s->inputs);
    free(s->labels);
    free(s->uniforms);
}

int step_mask(Step *s, Rng *rng, uint64_t index, const int *tokens, int b) {
    size_t n = (size_t)b * s->seq_len;
    rng_uniform(rng, rng_mask_offset(&s->layout, index), s->uniforms, 4 * n);
    mask_apply(s->mask, tokens, n, s->uniforms, s->inputs, s->labels);
    int targets = 0;
    for (size_t i = 0; i < n; i++) targets += s->labels[i] != s->mask->pad_id;
    return targets;
}

Batch step_whole_batch(const Step *s, const int *tokens, int b, Rng *rng, uint64_t index, float dropout) {
    Batch whole = {.tokens = tokens, .inputs = s->inputs, .labels = s->labels, .rows = b, .first_row = 0,
                   .batch_rows = b, .rng = rng, .index = index, .dropout = dropout};
    return whole;
}

// Micro-batch j of this rank (rows may be <= 0: past the end of a short last batch).
static Batch micro_batch(const Step *s, const int *tokens, int b, int j, int targets, uint64_t index) {
    int T = s->seq_len, r0 = (s->first_micro + j) * s->micro_rows;
    size_t at = (size_t)r0 * T;
    Batch mb = {.tokens = tokens + at, .inputs = s->inputs + at, .labels = s->labels + at,
                .rows = MLM_MIN(s->micro_rows, b - r0), .first_row = r0, .batch_rows = b, .batch_targets = targets,
                .rng = s->rng, .index = index, .dropout = s->dropout};
    return mb;
}

BatchStats step_run(Step *s, const int *tokens, int b, uint64_t index, long t, double lr) {
    Backend *be = s->be;
    Reducer *rd = s->rd;
    int targets = step_mask(s, s->rng, index, tokens, b);
    StepSums sums = {{0.0, 0.0}, 0.0f};
    int have = 0;  // this rank's sum holds something: its own micro-batches, or the ranks' before it
    for (int j = 0; j < s->micro_per_rank; j++) {
        Batch mb = micro_batch(s, tokens, b, j, targets, index);
        if (mb.rows > 0) be->forward_backward(be, &mb);
        // The MPI chain: the running sum of the ranks before this one, which arrives while its first micro-batch runs.
        if (j == 0 && rd->join) have = rd->join(rd, be->grads(be), be->n_params, sums.sums, 2);
        if (mb.rows > 0) {
            be->accumulate(be, !have, &sums);
            have = 1;
        }
    }
    if (rd->sum) rd->sum(rd, be->grads(be), be->n_params, sums.sums, 2, have);
    be->update(be, s->lo, s->len, t, lr);
    be->finish(be, &sums);
    if (rd->sum_stats) rd->sum_stats(rd, sums.sums, 2);
    if (s->len < be->n_params) rd->gather_params(rd, be->params(be), be->n_params);
    BatchStats st = {.loss = targets ? (float)(sums.sums[0] / targets) : 0.0f, .correct = (int)sums.sums[1],
                     .n_targets = targets, .grad_norm = sums.grad_norm};
    return st;
}
