// backend_cuda.c: the CUDA backend (backend.h) over src/kernels' device-resident model: micro-batches masked and run on
// the device into a device gradient sum, clip and Adam on the device, the step's one read-back.
//
// A micro-batch is launched at the backend's next call, not at once: a step with one micro-batch and nothing to
// exchange (one GPU, train.accum_steps = 1) then runs as one captured graph with its update (cuda_model_train_step:
// mask, forward, backward, clip, Adam, one read-back), the launches it ran as before there were several ways through
// a step. Any other call (another micro-batch, the gradient sum for NCCL, a ZeRO-1 range) first launches it as a
// micro-batch of gradient accumulation (cuda_model_accumulate), whose bits are those of the fused step: its gradients
// are divided by the whole batch's targets (the same count), copied into the sum exactly, and updated by the same
// kernels.
#include "mlm/backend.h"

#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/cuda_model.h"

typedef struct {
    Backend be;           // first: a Backend * is a CudaBackend *
    BackendConfig cfg;
    CudaModel *gm;
    int sharded;          // the moments cover a ZeRO-1 range, not all P
    // The micro-batch not yet launched (its host arrays stay valid until the step ends).
    int pending;
    Batch pb;
    int pending_first;
    int micro_batches;    // accumulated in this step (0: this rank had no rows; its statistics are zero)
    long round_due;       // bf16 under ZeRO-1: the BF16 copy is stale after an update of this rank's range (the
                          // gather completes the masters later): made again before the next forward (-1: fresh)
    int fused;            // the last update ran with its micro-batch as one step (fused_stats holds its read-back)
    CudaStepStats fused_stats;
    float *h_logits;      // [max_rows, T, V] host copy for the samples
    float *h_state;       // [P + 2 moments] host copy of the parameters and moments (checkpoints; first save)
} CudaBackend;

static CudaBackend *cuda_of(Backend *be) { return (CudaBackend *)be; }

static CudaRandom random_of(const CudaBackend *c, const Batch *b, int part_of_batch) {
    CudaRandom r = {.philox_seed = b->rng->seed, .layout = c->cfg.layout, .step = b->index, .dropout_p = b->dropout,
                    .first_row = part_of_batch ? b->first_row : 0, .batch_rows = part_of_batch ? b->batch_rows : 0};
    return r;
}

// Launch the pending micro-batch as one of gradient accumulation.
static void launch_pending(CudaBackend *c) {
    if (!c->pending) return;
    CudaRandom rnd = random_of(c, &c->pb, 1);
    cuda_model_accumulate(c->gm, c->pb.tokens, c->pb.rows, &c->cfg.mask, &rnd, c->pb.batch_targets, c->pending_first);
    c->pending = 0;
}

// bf16 under ZeRO-1: the BF16 copy of the parameters the other ranks updated, once the gather has brought them.
static void refresh_bf16_copy(CudaBackend *c) {
    if (c->round_due < 0) return;
    cuda_model_set_bf16_rounding(c->gm, c->cfg.round_seed, (uint64_t)c->round_due);
    c->round_due = -1;
}

static void cuda_forward_backward(Backend *be, const Batch *b) {
    CudaBackend *c = cuda_of(be);
    launch_pending(c);
    refresh_bf16_copy(c);
    c->pb = *b;
    c->pending = 1;
    c->pending_first = -1;  // set by accumulate
}

static void cuda_accumulate(Backend *be, int first, StepSums *s) {
    CudaBackend *c = cuda_of(be);
    (void)s;  // the device sums the statistics; finish reads them
    if (!c->pending || c->pending_first != -1)
        mlm_fatal(MLM_EXIT_FAILURE, "cuda_accumulate: a micro-batch without its forward");
    c->pending_first = first != 0;
    c->micro_batches = first ? 1 : c->micro_batches + 1;
}

static float *cuda_grads(Backend *be) {
    CudaBackend *c = cuda_of(be);
    launch_pending(c);
    return cuda_model_accumulated_grads_device(c->gm);
}

static void cuda_update(Backend *be, size_t lo, size_t len, long t, double lr) {
    CudaBackend *c = cuda_of(be);
    const BackendConfig *k = &c->cfg;
    // A lone micro-batch that is the whole batch, updating every parameter.
    c->fused = c->pending && c->pending_first == 1 && c->pb.first_row == 0 && c->pb.rows == c->pb.batch_rows &&
               lo == 0 && len == be->n_params && !c->sharded;
    if (c->fused) {
        CudaRandom rnd = random_of(c, &c->pb, 0);  // the micro-batch is the whole batch
        cuda_model_train_step(c->gm, c->pb.tokens, c->pb.rows, &k->mask, &rnd, k->max_norm, &k->oc, t, lr,
                              &c->fused_stats);
        c->pending = 0;
        return;
    }
    launch_pending(c);
    cuda_model_update_accumulated(c->gm, lo, len, k->max_norm, &k->oc, t, lr);
    // The update wrote the BF16 copy of [lo, lo + len) only; the rest comes with the gather of the other ranges.
    if (k->precision == PRECISION_BF16 && len < be->n_params) c->round_due = t;
}

static void cuda_finish(Backend *be, StepSums *s) {
    CudaBackend *c = cuda_of(be);
    if (c->fused) {
        const CudaStepStats *f = &c->fused_stats;
        s->sums[0] += (double)f->loss * f->n_targets;
        s->sums[1] += f->correct;
        s->grad_norm = f->grad_norm;
    } else {
        double sums[3];
        cuda_model_read_update(c->gm, &s->grad_norm, sums);
        if (c->micro_batches > 0) {  // else the device's sums are an earlier step's
            s->sums[0] += sums[0];
            s->sums[1] += sums[1];
        }
    }
    c->micro_batches = 0;
}

static float *cuda_params(Backend *be) { return cuda_model_params_device(cuda_of(be)->gm); }

static void cuda_evaluate(Backend *be, const Batch *b, BatchStats *st) {
    CudaBackend *c = cuda_of(be);
    refresh_bf16_copy(c);
    CudaRandom rnd = random_of(c, b, 0);
    CudaStepStats s;
    // Masked on the device with the host's numbers and rule (b->inputs and labels are the same), as one graph.
    cuda_model_forward(c->gm, b->tokens, NULL, b->rows, c->cfg.mask.pad_id, &c->cfg.mask, &rnd, &s);
    if (!st) return;
    st->loss = s.loss;
    st->correct = s.correct;
    st->n_targets = s.n_targets;
    st->grad_norm = 0.0f;
}

static const float *cuda_logits(Backend *be, int rows) {
    CudaBackend *c = cuda_of(be);
    cuda_model_get_logits(c->gm, c->h_logits, rows);
    return c->h_logits;
}

static void cuda_load(Backend *be, const float *params, const float *adam_m, const float *adam_v, long updates_done) {
    CudaBackend *c = cuda_of(be);
    size_t lo = c->cfg.moments_lo, len = c->cfg.moments_len;
    float *zeros = (!adam_m || !adam_v) ? mlm_calloc(len, sizeof(float), "zero Adam moments") : NULL;
    cuda_model_set_params(c->gm, params);
    cuda_model_set_adam(c->gm, adam_m ? adam_m + lo : zeros, adam_v ? adam_v + lo : zeros);
    free(zeros);
    // bf16: the copy of the loaded masters, rounded as the run that made them rounded it (offset updates x P).
    if (c->cfg.precision == PRECISION_BF16)
        cuda_model_set_bf16_rounding(c->gm, c->cfg.round_seed, (uint64_t)updates_done);
}

static void cuda_save(Backend *be, const float **params, const float **adam_m, const float **adam_v) {
    CudaBackend *c = cuda_of(be);
    size_t P = be->n_params, M = MLM_MAX(c->cfg.moments_len, (size_t)1);
    if (!c->h_state) c->h_state = mlm_malloc((P + 2 * M) * sizeof(float), "parameters and Adam moments (host copy)");
    cuda_model_get_params(c->gm, c->h_state);
    cuda_model_get_adam(c->gm, c->h_state + P, c->h_state + P + M);
    *params = c->h_state;
    *adam_m = c->h_state + P;
    *adam_v = c->h_state + P + M;
}

static void cuda_free(Backend *be) {
    CudaBackend *c = cuda_of(be);
    cuda_model_free(c->gm);
    free(c->h_logits);
    free(c->h_state);
    free(c);
}

Backend *backend_cuda(const BackendConfig *cfg) {
    CudaBackend *c = mlm_calloc(1, sizeof(CudaBackend), "CUDA backend");
    c->cfg = *cfg;
    c->round_due = -1;
    c->gm = cuda_model_create(&cfg->mc, cfg->max_rows, cfg->precision);
    cuda_model_set_graphs(c->gm, cfg->cuda_graph);
    cuda_model_set_sparse_prediction(c->gm, cfg->sparse_prediction);
    if (cfg->mask.whole_word && cfg->mask.continuation) cuda_model_set_continuation(c->gm, cfg->mask.continuation);
    size_t P = cuda_model_num_params(c->gm);
    c->sharded = cfg->moments_lo != 0 || cfg->moments_len != P;
    if (c->sharded) cuda_model_shard_moments(c->gm, cfg->moments_lo, cfg->moments_len);
    uint8_t *decay = mlm_malloc(P, "weight-decay mask");
    model_decay_mask(&cfg->mc, decay);
    cuda_model_set_decay_mask(c->gm, decay);
    free(decay);
    c->h_logits = mlm_malloc((size_t)cfg->max_rows * cfg->mc.max_seq * cfg->mc.vocab * sizeof(float),
                             "logits (host copy)");
    Backend *be = &c->be;
    be->name = "CUDA";
    be->n_params = P;
    be->on_device = 1;
    be->forward_backward = cuda_forward_backward;
    be->accumulate = cuda_accumulate;
    be->grads = cuda_grads;
    be->update = cuda_update;
    be->finish = cuda_finish;
    be->params = cuda_params;
    be->evaluate = cuda_evaluate;
    be->logits = cuda_logits;
    be->load = cuda_load;
    be->save = cuda_save;
    be->free = cuda_free;
    return be;
}
