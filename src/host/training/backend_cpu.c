// backend_cpu.c: the CPU backend (backend.h) over src/cpu's model: micro-batches into a host gradient sum, clip and
// Adam on a range of the parameters, the host's masks as its input.
#include "mlm/backend.h"

#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/cpu.h"

// Where the step's gradient sum lives: after the step's first micro-batch it is the model's own gradient array
// (nothing copied when a step has one micro-batch); a second micro-batch moves it to `sum` before its backward
// overwrites the model's gradients, and later ones add to it there. The MPI chain receives into `sum` too.
typedef enum { SUM_NONE, SUM_IN_MODEL, SUM_IN_SUM } SumPlace;

typedef struct {
    Backend be;             // first: a Backend * is a CpuBackend *
    BackendConfig cfg;
    CpuModel *model;
    float *sum;             // [P] the sum of a step with several micro-batches (or joined); allocated on first use
    SumPlace place;
    float *adam_m, *adam_v; // [moments_len] each, one allocation: the moments of this rank's range
    uint8_t *decay_mask;    // [P] 1 where AdamW decays
    float grad_norm;        // of the last update
    long round_due;         // bf16: the BF16 copy is stale, the parameters having had this many updates (-1: fresh);
                            // made at the next forward, after a ZeRO-1 gather has completed the parameters
    // The last micro-batch, for accumulate.
    float loss;
    int correct;
} CpuBackend;

static CpuBackend *cpu_of(Backend *be) { return (CpuBackend *)be; }

static DropoutCtx dropout_of(const Batch *b) {
    DropoutCtx d = {.rng = b->dropout > 0.0f ? b->rng : NULL, .layout = {0}, .step = b->index, .p = b->dropout,
                    .first_row = b->first_row, .rows = b->rows};
    return d;
}

static float *sum_buffer(CpuBackend *c) {
    if (!c->sum) c->sum = mlm_malloc(c->be.n_params * sizeof(float), "summed gradients");
    return c->sum;
}

// train.precision = bf16: the BF16 copy of parameters that changed since the last forward (cpu_model_round_params).
static void refresh_bf16_copy(CpuBackend *c) {
    if (c->round_due < 0) return;
    cpu_model_round_params(c->model, (uint64_t)c->round_due);
    c->round_due = -1;
}

static void cpu_forward_backward(Backend *be, const Batch *b) {
    CpuBackend *c = cpu_of(be);
    refresh_bf16_copy(c);
    if (c->place == SUM_IN_MODEL) {  // the backward below overwrites the model's gradients: keep the sum
        memcpy(sum_buffer(c), c->model->grads, be->n_params * sizeof(float));
        c->place = SUM_IN_SUM;
    }
    DropoutCtx d = dropout_of(b);
    d.layout = c->cfg.layout;
    c->model->norm_targets = b->batch_targets;  // the whole batch's mean: every micro-batch divides by its targets
    c->loss = cpu_model_forward(c->model, b->inputs, b->labels, b->rows, c->cfg.mask.pad_id, &d, &c->correct);
    cpu_model_backward(c->model);
    c->model->norm_targets = 0;
}

// sum[n] += g, elementwise (one rounding each, in micro-batch order across calls).
static void add_grads(float *sum, const float *g, size_t n) {
    long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= 32768)
    for (long long i = 0; i < count; i++) sum[i] += g[i];
}

static void cpu_accumulate(Backend *be, int first, StepSums *s) {
    CpuBackend *c = cpu_of(be);
    if (first) {
        c->place = SUM_IN_MODEL;
    } else {
        if (c->place == SUM_IN_MODEL) mlm_fatal(MLM_EXIT_FAILURE, "cpu_accumulate: a micro-batch without its forward");
        add_grads(sum_buffer(c), c->model->grads, be->n_params);
        c->place = SUM_IN_SUM;
    }
    s->sums[0] += (double)c->loss * c->model->n_targets;
    s->sums[1] += c->correct;
}

static float *cpu_grads(Backend *be) {
    CpuBackend *c = cpu_of(be);
    return c->place == SUM_IN_MODEL ? c->model->grads : sum_buffer(c);
}

static void cpu_update(Backend *be, size_t lo, size_t len, long t, double lr) {
    CpuBackend *c = cpu_of(be);
    const BackendConfig *k = &c->cfg;
    if (lo < k->moments_lo || lo + len > k->moments_lo + k->moments_len)
        mlm_fatal(MLM_EXIT_FAILURE, "cpu_update: parameters %zu..%zu lie outside this rank's moments %zu..%zu", lo,
                  lo + len, k->moments_lo, k->moments_lo + k->moments_len);
    float *g = cpu_grads(be);
    c->grad_norm = cpu_grad_norm(g, be->n_params);
    if (k->max_norm > 0) cpu_scale_grads(g + lo, len, c->grad_norm, k->max_norm);
    size_t at = lo - k->moments_lo;
    cpu_adam_update(&k->oc, c->model->params + lo, g + lo, c->adam_m + at, c->adam_v + at, c->decay_mask + lo, len,
                    t, lr);
    c->place = SUM_NONE;  // the next step starts a new sum
    c->round_due = t;
}

static void cpu_finish(Backend *be, StepSums *s) { s->grad_norm = cpu_of(be)->grad_norm; }

static float *cpu_params(Backend *be) { return cpu_of(be)->model->params; }

static void cpu_evaluate(Backend *be, const Batch *b, BatchStats *st) {
    CpuBackend *c = cpu_of(be);
    refresh_bf16_copy(c);
    DropoutCtx d = dropout_of(b);
    d.layout = c->cfg.layout;
    int correct = 0;
    // Logits only for samples: every position's row (a sparse head computes the selected rows alone).
    float loss = cpu_model_forward(c->model, b->inputs, st ? b->labels : NULL, b->rows, c->cfg.mask.pad_id, &d,
                                   st ? &correct : NULL);
    if (!st) return;
    st->loss = loss;
    st->correct = correct;
    st->n_targets = c->model->n_targets;
    st->grad_norm = 0.0f;
}

static const float *cpu_logits(Backend *be, int rows) {
    (void)rows;
    return cpu_of(be)->model->logits;
}

static void cpu_load(Backend *be, const float *params, const float *adam_m, const float *adam_v, long updates_done) {
    CpuBackend *c = cpu_of(be);
    const BackendConfig *k = &c->cfg;
    size_t bytes = k->moments_len * sizeof(float);
    memcpy(c->model->params, params, be->n_params * sizeof(float));
    if (adam_m) memcpy(c->adam_m, adam_m + k->moments_lo, bytes);
    else memset(c->adam_m, 0, bytes);
    if (adam_v) memcpy(c->adam_v, adam_v + k->moments_lo, bytes);
    else memset(c->adam_v, 0, bytes);
    c->round_due = updates_done;
}

static void cpu_save(Backend *be, const float **params, const float **adam_m, const float **adam_v) {
    CpuBackend *c = cpu_of(be);
    *params = c->model->params;
    *adam_m = c->adam_m;
    *adam_v = c->adam_v;
}

static void cpu_free(Backend *be) {
    CpuBackend *c = cpu_of(be);
    cpu_model_free(c->model);
    free(c->sum);
    free(c->adam_m);
    free(c->decay_mask);
    free(c);
}

Backend *backend_cpu(const BackendConfig *cfg) {
    CpuBackend *c = mlm_calloc(1, sizeof(CpuBackend), "CPU backend");
    c->cfg = *cfg;
    c->model = cpu_model_create(&cfg->mc, cfg->max_rows);
    cpu_model_set_sparse_prediction(c->model, cfg->sparse_prediction);
    if (cfg->precision == PRECISION_BF16) cpu_model_set_bf16(c->model, cfg->round_seed);
    c->round_due = -1;
    size_t P = c->model->n_params;
    if (cfg->moments_lo + cfg->moments_len > P)
        mlm_fatal(MLM_EXIT_FAILURE, "backend_cpu: moments %zu..%zu of %zu parameters", cfg->moments_lo,
                  cfg->moments_lo + cfg->moments_len, P);
    c->adam_m = mlm_calloc_large(2 * MLM_MAX(cfg->moments_len, (size_t)1), sizeof(float), "Adam moments");
    c->adam_v = c->adam_m + MLM_MAX(cfg->moments_len, (size_t)1);
    c->decay_mask = mlm_malloc(P, "weight-decay mask");
    model_decay_mask(&cfg->mc, c->decay_mask);
    Backend *be = &c->be;
    be->name = "CPU";
    be->n_params = P;
    be->on_device = 0;
    be->forward_backward = cpu_forward_backward;
    be->accumulate = cpu_accumulate;
    be->grads = cpu_grads;
    be->update = cpu_update;
    be->finish = cpu_finish;
    be->params = cpu_params;
    be->evaluate = cpu_evaluate;
    be->logits = cpu_logits;
    be->load = cpu_load;
    be->save = cpu_save;
    be->free = cpu_free;
    return be;
}
