// train.h: a training run: data, masking, model, optimizer and the epoch loop (samples, train, valid).
#ifndef MLM_TRAIN_H
#define MLM_TRAIN_H

#include "mlm/config.h"
#include "mlm/data.h"
#include "mlm/mask.h"
#include "mlm/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    const char *config_path;  // for the run name and messages (may be NULL)
    const char *out_dir;      // run directory (NULL: runs/<config>-<timestamp>)
    const char *init_path;    // safetensors weights to start from (NULL: fresh init)
    const char *resume_path;  // run directory (or checkpoint file) to continue exactly
    int dry_run;
    int quiet;
    // --profile-steps A:B: cudaProfilerStart before step A, cudaProfilerStop after step B (step s is the one
    // that runs when s steps are done; CUDA backend only).
    int profile;
    long profile_first, profile_last;
} TrainOptions;

// The masking a configuration describes over a vocabulary (shared by train and eval; model_config_from in model.h
// gives the model).
MaskConfig train_mask_config(const Config *c, const Vocab *v);

// Keys that may change when a run is resumed: they bound or report the run, never its arithmetic.
int train_key_resumable(const char *key);

// Run `mlm train`; returns the process exit status.
int train_run(const Config *cfg, const TrainOptions *opt);

// Render tokens[n] as text (PAD shown as '·', MASK as '_', newline as '↵') into out.
void render_tokens(const Vocab *v, const int *tokens, int n, char *out, size_t outlen);

#ifdef __cplusplus
}
#endif

#endif
