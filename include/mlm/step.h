// step.h: one optimizer step, the one way through for every backend and every parallelism:
//
//   1. mask the whole batch on the host (its count of targets divides every micro-batch's loss);
//   2. for each of this rank's micro-batches: forward + backward, gradients into the backend's sum (after the
//      first, the MPI chain adds in the ranks before this one);
//   3. the reducer sums across ranks: every rank holds the whole summed gradient;
//   4. clip by its norm and update this rank's range of the parameters (all of them, or its ZeRO-1 shard);
//   5. the statistics (and under ZeRO-1 the parameters) from every rank.
//
// Micro-batch j of a step's batch of b rows is rows [j x micro_rows, (j + 1) x micro_rows) (the last ones may be
// short or empty in the last batch of an epoch); rank r runs micro-batches r x k .. r x k + k - 1. Each draws the
// random numbers its rows get in the whole batch, so the masks and dropout do not depend on how the batch is cut.
#ifndef MLM_STEP_H
#define MLM_STEP_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/backend.h"
#include "mlm/mask.h"
#include "mlm/reducer.h"
#include "mlm/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    Backend *be;
    Reducer *rd;
    const MaskConfig *mask;
    RngLayout layout;
    Rng *rng;              // the training stream (masks and dropout)
    float dropout;
    int seq_len;
    int micro_rows;        // rows per micro-batch: train.batch_size / train.accum_steps
    int micro_per_rank;    // k = train.accum_steps / ranks
    int first_micro;       // this rank's first micro-batch: rank x k
    size_t lo, len;        // the parameters this rank updates (ZeRO-1: its shard; else 0, P)
    int *inputs, *labels;  // [max_rows, T] the host's masked batch
    float *uniforms;       // [4 max_rows T]
} Step;

// The host's masking of batches of up to max_rows sequences of seq_len (all step_mask needs: `mlm train --dry-run`).
void step_init(Step *s, const MaskConfig *mask, RngLayout layout, int seq_len, int max_rows);
// The parameters rank rd->dist.rank updates: under ZeRO-1 (zero, several ranks) its shard of n, else all of them.
void step_shard(const Reducer *rd, size_t n, int zero, size_t *lo, size_t *len);
// The step of this rank over be and rd: train.accum_steps micro-batches of batch_size / accum_steps rows over all
// ranks, dropout p from stream rng, ZeRO-1 when zero. Exits with a message when the ranks do not divide accum_steps.
void step_plan(Step *s, Backend *be, Reducer *rd, Rng *rng, float dropout, int batch_size, int accum_steps, int zero);
void step_free(Step *s);

// Mask tokens[b, T] on the host with the uniforms of `index` in stream rng into s->inputs and s->labels (the
// numbers and rule the CUDA mask kernel uses); returns the count of targets (labels != PAD).
int step_mask(Step *s, Rng *rng, uint64_t index, const int *tokens, int b);
// After step_mask: the whole batch as one Batch (validation and samples), with dropout p (0: off).
Batch step_whole_batch(const Step *s, const int *tokens, int b, Rng *rng, uint64_t index, float dropout);

// One step on the batch tokens[b, T] (index: its position in the training stream; t: the optimizer step, from 1,
// with learning rate lr). Every rank returns the same statistics, those of the whole batch.
BatchStats step_run(Step *s, const int *tokens, int b, uint64_t index, long t, double lr);

#ifdef __cplusplus
}
#endif

#endif
