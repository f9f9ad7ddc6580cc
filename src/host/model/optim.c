// optim.c: learning-rate schedules (Noam; warmup + cosine/linear/constant), the Adam / AdamW updates, and the
// optimizer settings a configuration describes.
#include "mlm/optim.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "mlm/common.h"

static const double OPTIM_PI = 3.14159265358979323846;  // M_PI is not in strict C11
// Below this many parameters the update runs on one thread (a fork/join would cost more than it saves).
enum { OPTIM_PARALLEL_MIN = 32768 };

double optim_lr(const OptimConfig *c, long t) {
    if (t < 1) t = 1;  // steps count from 1; t = 0 would make Noam's t^-0.5 infinite
    double td = (double)t;
    if (c->schedule == SCHED_NOAM) {
        // With warmup = 0, warmup^-1.5 is +inf and the min picks t^-0.5 (pure inverse square root).
        double warm = pow((double)c->warmup, -1.5);
        return (double)c->lr * pow((double)c->d_model, -0.5) * fmin(pow(td, -0.5), td * warm);
    }
    double peak = c->lr, floor_lr = c->min_lr;
    if (c->warmup > 0 && t <= c->warmup) return peak * td / (double)c->warmup;
    if (c->schedule == SCHED_CONSTANT) return peak;
    // Decay from the end of warmup to total_steps, then hold min_lr.
    double span = (double)(c->total_steps - c->warmup);
    double progress = span > 0.0 ? (td - (double)c->warmup) / span : 1.0;
    progress = fmin(fmax(progress, 0.0), 1.0);
    if (c->schedule == SCHED_COSINE) return floor_lr + 0.5 * (peak - floor_lr) * (1.0 + cos(OPTIM_PI * progress));
    return peak + (floor_lr - peak) * progress;  // SCHED_LINEAR
}

// labml's Adam (the reference's "Noam" optimizer): eps is added to sqrt(v) before the bias correction,
// which is folded into the step size.
static void noam_adam_update(const OptimConfig *c, float *params, const float *grads, float *m, float *v, size_t n,
                             long t, double lr) {
    double bc1 = 1.0 - pow((double)c->beta1, (double)t), bc2 = 1.0 - pow((double)c->beta2, (double)t);
    float step = (float)(lr * sqrt(bc2) / bc1);
    float b1 = c->beta1, b2 = c->beta2, eps = c->eps;
    long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= OPTIM_PARALLEL_MIN)
    for (long long i = 0; i < count; i++) {
        float gi = grads[i];
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        params[i] -= step * m[i] / (sqrtf(v[i]) + eps);
    }
}

// torch.optim.AdamW: decoupled weight decay first, then the bias-corrected Adam step
// (denominator sqrt(v) / sqrt(1 - b2^t) + eps, step size lr / (1 - b1^t), as torch computes them).
static void adamw_update(const OptimConfig *c, float *params, const float *grads, float *m, float *v,
                         const uint8_t *decay_mask, size_t n, long t, double lr) {
    double bc1 = 1.0 - pow((double)c->beta1, (double)t), bc2 = 1.0 - pow((double)c->beta2, (double)t);
    float step = (float)(lr / bc1), inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
    float decay = (float)(1.0 - lr * (double)c->weight_decay);
    float b1 = c->beta1, b2 = c->beta2, eps = c->eps;
    long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= OPTIM_PARALLEL_MIN)
    for (long long i = 0; i < count; i++) {
        float gi = grads[i];
        if (decay_mask != NULL && decay_mask[i]) params[i] *= decay;
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        params[i] -= step * m[i] / (sqrtf(v[i]) * inv_sqrt_bc2 + eps);
    }
}

void cpu_adam_update(const OptimConfig *c, float *params, const float *grads, float *m, float *v,
                     const uint8_t *decay_mask, size_t n, long t, double lr) {
    if (t < 1) mlm_fatal(MLM_EXIT_FAILURE, "Adam step %ld: steps count from 1", t);
    if (c->kind == OPTIM_ADAMW) adamw_update(c, params, grads, m, v, decay_mask, n, t, lr);
    else noam_adam_update(c, params, grads, m, v, n, t, lr);
}

OptimConfig optim_config_from(const Config *c, long total_steps) {
    OptimConfig o;
    memset(&o, 0, sizeof(o));
    o.kind = (OptimKind)c->optim_kind;
    o.schedule = (ScheduleKind)c->schedule;
    o.lr = (float)c->lr;
    o.beta1 = (float)c->beta1;
    o.beta2 = (float)c->beta2;
    o.eps = (float)c->eps;
    o.weight_decay = (float)c->weight_decay;
    o.warmup = c->warmup;
    o.min_lr = (float)c->min_lr;
    o.d_model = c->d_model;
    o.total_steps = total_steps;
    return o;
}
