// optim.h: learning-rate schedules (Noam, warmup + cosine/linear/constant) and the Adam family updates.
#ifndef MLM_OPTIM_H
#define MLM_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/config.h"  // OptimKind, ScheduleKind: the values of optim.name and optim.schedule

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    OptimKind kind;
    ScheduleKind schedule;
    float lr;            // Noam: the factor (1.0 in the reference); others: the peak learning rate
    float beta1, beta2;  // 0.9, 0.999
    float eps;           // 1e-8
    float weight_decay;  // AdamW only (decoupled, on 2-D weights)
    int warmup;          // steps (2000)
    float min_lr;        // floor of cosine/linear decay
    int d_model;         // Noam's d_model^-0.5 factor
    long total_steps;    // length of the run, for cosine/linear decay
} OptimConfig;

// Learning rate of optimizer step t (t counts from 1).
// Noam: lr * d_model^-0.5 * min(t^-0.5, t * warmup^-1.5).
// Others: linear warmup to lr over `warmup` steps, then cosine/linear decay to min_lr at total_steps, or constant.
double optim_lr(const OptimConfig *c, long t);

// The optimizer settings of a configuration ([optim], model.d_model for Noam) for a run of total_steps steps.
OptimConfig optim_config_from(const Config *c, long total_steps);

// One Adam step over n parameters at step t (from 1) with learning rate lr.
// OPTIM_NOAM_ADAM is labml's Adam: step = lr * sqrt(1 - b2^t) / (1 - b1^t); p -= step * m / (sqrt(v) + eps)
// (eps added before bias correction). OPTIM_ADAMW is torch.optim.AdamW: p *= 1 - lr * wd * decay_mask;
// p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps). decay_mask[i] (may be NULL = none) is 1
// where weight decay applies.
void cpu_adam_update(const OptimConfig *c, float *params, const float *grads, float *m, float *v,
                     const uint8_t *decay_mask, size_t n, long t, double lr);

#ifdef __cplusplus
}
#endif

#endif
