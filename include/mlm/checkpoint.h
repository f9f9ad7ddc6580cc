// checkpoint.h: checkpoints that continue a run exactly: model, Adam state, step, config, vocabulary,
// corpus checksum, a format version and per-tensor checksums, written atomically, the last K kept.
//
// Format: a safetensors file (tensors "params", "adam.m", "adam.v", float32 [P]) whose __metadata__ holds
// format = "mlm-checkpoint", format_version, step, tokens, valid_epochs, best_valid_acc, best_epoch, elapsed_s,
// n_params, corpus_md5, vocab (comma-separated code points), config (the resolved config text) and
// md5.<tensor> for every tensor. Data order and every RNG offset derive from (config seed, step), so the
// step is the whole position of the run.
#ifndef MLM_CHECKPOINT_H
#define MLM_CHECKPOINT_H

#include <stddef.h>

#include "mlm/config.h"
#include "mlm/data.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CKPT_FORMAT "mlm-checkpoint"
#define CKPT_FORMAT_VERSION 1

typedef struct {
    long step;             // optimizer steps done
    double tokens;         // training tokens seen (partial last batches counted as they are)
    long valid_epochs;     // epochs whose validation has run
    double best_valid_acc;
    long best_epoch;       // -1 if none
    double elapsed_s;      // training wall time so far
} TrainState;

typedef struct {
    Config cfg;
    Vocab vocab;
    TrainState st;
    char corpus_md5[33];
    size_t n_params;
    float *params, *adam_m, *adam_v;  // [P] each, owned
} Checkpoint;

// Write RUN_DIR/checkpoints/ckpt-<step>.safetensors atomically and delete all but the newest `keep`.
// Writes the path into path_out (may be NULL). Returns nonzero with a message on failure.
int ckpt_save(const char *run_dir, const Checkpoint *c, int keep, char *path_out, size_t path_len, char *err,
              size_t errlen);
// Load a checkpoint file, or the newest checkpoint of a run directory. Verifies format, version, shapes
// and checksums; a truncated, corrupt or mismatched file is refused with a message saying what is wrong.
int ckpt_load(const char *path, Checkpoint *out, char *err, size_t errlen);
void ckpt_free(Checkpoint *c);
// Path of the newest checkpoint in RUN_DIR/checkpoints; nonzero if there is none.
int ckpt_find_latest(const char *run_dir, char *out, size_t outlen);

#ifdef __cplusplus
}
#endif

#endif
