// agree_ranks.h: what the ranks of a data-parallel `mlm train` must share, checked at start-up through
// dist_require_same (agree.h): the configuration, the data set, the backend, and the state training starts from.
#ifndef MLM_AGREE_RANKS_H
#define MLM_AGREE_RANKS_H

#include <stddef.h>

#include "mlm/config.h"
#include "mlm/dist.h"

#ifdef __cplusplus
extern "C" {
#endif

// 1 for the keys that may differ between ranks: train.threads (a machine's cores; the arithmetic does not depend on
// them) and data.path (each node may hold its own copy of the data: its identity is compared instead); and
// train.device, whose resolved backend is compared instead (auto on a GPU node and cuda elsewhere is the same run).
int train_key_per_rank(const char *key);
// Every other key, the data's md5 (a text's or a shard set's manifest) and the backend (gpu: CUDA). Before anything
// collective: on a mismatch every rank exits 2, rank 0 naming each key with the ranks' values.
void train_agree_setup(const Dist *d, const Config *cfg, const char *data_md5, int gpu);
// The parameters (and, resuming, the Adam moments and step) training starts from: a resume from different
// checkpoints, or --init with different weights, is refused the same way. adam_m, adam_v: NULL unless resuming;
// source says where the state came from ("resumed", "--init", "seeded").
void train_agree_state(const Dist *d, long step, const float *params, const float *adam_m, const float *adam_v,
                       size_t n_params, const char *source);

#ifdef __cplusplus
}
#endif

#endif
