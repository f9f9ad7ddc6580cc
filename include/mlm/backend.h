// backend.h: what the training loop needs from a backend (the CPU reference in src/cpu, the CUDA model in
// src/kernels): forward + backward of a micro-batch, its gradients accumulated into a sum, that sum, clip + optimizer
// update of a range of the parameters, the step's statistics; and a forward for validation and samples, and the
// state that checkpoints carry. step.h runs a training step over it; a new backend implements these functions.
#ifndef MLM_BACKEND_H
#define MLM_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

// What a backend is built for.
typedef struct {
    ModelConfig mc;
    int max_rows;                // the largest batch it runs (training, validation and the samples' batch)
    MaskConfig mask;             // the CUDA backend masks on the device with it (the CPU takes the host's masks)
    RngLayout layout;            // where masks and dropout sit in a step's random numbers
    OptimConfig oc;
    float max_norm;              // train.grad_clip: global-norm clip (<= 0: off)
    int sparse_prediction;       // train.sparse_prediction
    size_t moments_lo, moments_len;  // the parameters this rank updates, the only ones it keeps Adam moments for
                                     // (ZeRO-1: its shard; else 0, P)
    int precision;               // train.precision (PrecisionKind): fp32, tf32 (CUDA only) or bf16
    uint64_t round_seed;         // bf16: the Philox key of the run's ROUND stream (the BF16 copy of the parameters
                                 // after t updates is THE ROUNDING RULE of include/mlm/bf16.h at offset t x P)
    int cuda_graph;              // CUDA only: train.cuda_graph
} BackendConfig;

// Rows of a batch with their masking and random numbers.
typedef struct {
    const int *tokens;            // [rows, T] before masking (the CUDA backend masks them on the device)
    const int *inputs, *labels;   // [rows, T] the host's masking of the same rows (the CPU backend's input)
    int rows;
    int first_row, batch_rows;    // rows [first_row, first_row + rows) of a batch of batch_rows: they draw the
                                  // random numbers those rows get in the whole batch
    int batch_targets;            // training: the whole batch's targets, by which every micro-batch's loss is divided
    Rng *rng;                     // the stream masks and dropout draw from (training, validation or samples) ...
    uint64_t index;               // ... at this step or batch
    float dropout;                // p; 0: off
} Batch;

// What a step's micro-batches add up to: sums[0] = mean loss x targets and sums[1] = correct predictions, summed in
// micro-batch order (then across ranks); grad_norm = the norm of the whole summed gradient before clipping.
typedef struct {
    double sums[2];
    float grad_norm;
} StepSums;

// What one step or one validation batch reports.
typedef struct {
    float loss;        // mean cross-entropy over the batch's targets (0 when there are none)
    int correct, n_targets;
    float grad_norm;   // training steps only
} BatchStats;

typedef struct Backend Backend;
struct Backend {
    const char *name;  // "CPU", "CUDA"
    size_t n_params;
    int on_device;     // grads() and params() are device memory (the reducer must be NCCL)
    // ---- A training step (step.c calls them in this order).
    // Forward + backward of one micro-batch (the whole batch when there is one).
    void (*forward_backward)(Backend *, const Batch *);
    // Its gradients into the step's gradient sum (first: the sum becomes them; else they are added) and its loss x
    // targets and correct predictions into s->sums (a device backend may hold them until finish). A backend may
    // defer the micro-batch's work until the next call (the CUDA backend runs a lone micro-batch and its update as
    // one captured graph).
    void (*accumulate)(Backend *, int first, StepSums *s);
    // The gradient sum [P] (device memory when on_device); what the reducer sums across ranks in place.
    float *(*grads)(Backend *);
    // Clip by the norm of the whole sum (every rank holds all of it), then the optimizer update of parameters
    // [lo, lo + len) at step t with learning rate lr.
    void (*update)(Backend *, size_t lo, size_t len, long t, double lr);
    // After update: s->grad_norm, and whatever statistics the backend still held (the CUDA step's one read-back).
    void (*finish)(Backend *, StepSums *s);
    // The parameters [P] (device memory when on_device); ZeRO-1 gathers the ranks' updated shards into them.
    float *(*params)(Backend *);
    // ---- Validation and samples: a forward without gradients. stats NULL: logits only (samples).
    void (*evaluate)(Backend *, const Batch *, BatchStats *stats);
    // Host copy of the last evaluate's logits [rows, T, V] (rows it did not compute, if any, are NaN).
    const float *(*logits)(Backend *, int rows);
    // ---- State (checkpoints, --init, --resume): load takes host arrays of all P parameters and moments (NULL:
    // zeros), of which the backend keeps its moment range, and the count of updates the parameters have had (a BF16
    // copy of them is rounded as the run that made them rounded it); save points at host arrays of the parameters [P] and of
    // its range of the moments, valid until the backend's next call (the CPU backend's own; the CUDA backend's copies).
    void (*load)(Backend *, const float *params, const float *adam_m, const float *adam_v, long updates_done);
    void (*save)(Backend *, const float **params, const float **adam_m, const float **adam_v);
    void (*free)(Backend *);
};

// The backends (backend_cpu.c, backend_cuda.c; a CPU-only build's CUDA model refuses at creation, cuda_stub.c).
Backend *backend_cpu(const BackendConfig *c);
Backend *backend_cuda(const BackendConfig *c);

#ifdef __cplusplus
}
#endif

#endif
