// cuda_model.h: the CUDA backend's model: parameters, gradients, Adam state and activations resident on the
// device (one allocation each), a whole training step on the GPU, and transfers for checkpoints and tests.
#ifndef MLM_CUDA_MODEL_H
#define MLM_CUDA_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CudaModel CudaModel;

typedef struct {
    float loss;       // mean cross-entropy over target positions
    int correct;      // argmax == label among targets
    int n_targets;
    float grad_norm;  // before clipping (training steps only)
} CudaStepStats;

// precision: train.precision (PrecisionKind of config.h: 0 fp32, 1 tf32 (cuBLAS may use TF32 tensor cores for the
// FP32 products), 2 bf16 (BF16 activations, gradients of activations and parameter copy; FP32 masters, moments
// and accumulations; the products through cuBLASLt). cuda_model_set_bf16_rounding then names the rounding stream.
CudaModel *cuda_model_create(const ModelConfig *cfg, int max_B, int precision);

// The device memory a model needs, computed from the layout cuda_model_create allocates (no device is touched, so
// `mlm train --dry-run` prints it anywhere): bytes of each part and the total of the allocations a training run
// makes. precision: train.precision (PrecisionKind); accumulate: train.accum_steps > 1 (the summed gradients);
// whole_word: mask.whole_word with a WordPiece vocabulary (its flags on the device). Not counted: the CUDA
// context, cuBLAS's and cuBLASLt's own handles (a few hundred MiB the driver reserves) and NCCL's buffers.
typedef struct {
    size_t params, grads, adam;  // FP32 parameters (the master weights), gradients, the two Adam moments
    size_t params16;             // the BF16 copy of the parameters (train.precision = bf16)
    size_t state_alloc;          // their allocation (with the weight-decay mask and 256-byte alignment)
    size_t activations;          // saved activations, scratch and the step's upload region, for max_B sequences
    size_t workspace;            // the cuBLAS / cuBLASLt workspace
    size_t accumulation;         // summed gradients of gradient accumulation
    size_t other;                // whole-word flags
    size_t total;                // state_alloc + activations + workspace + accumulation + other
    int precision;
} CudaMemoryPlan;
void cuda_model_memory_plan(const ModelConfig *cfg, int max_B, int precision, int accumulate, int whole_word,
                            CudaMemoryPlan *plan);
void cuda_model_free(CudaModel *m);
size_t cuda_model_num_params(const CudaModel *m);

// Host <-> device copies of the parameter array, the gradients and the Adam moments (layout of model.h).
void cuda_model_set_params(CudaModel *m, const float *params);
// train.precision = bf16: the Philox key of THE ROUNDING RULE's stream (include/mlm/bf16.h) and how many optimizer
// steps the masters have had; the BF16 copy is made again from the masters now (cuda_model_set_params makes it
// with these too, and every update of a training step writes it for its step t). Call after loading a run's
// parameters, with its step, so a resumed run rounds as the one it continues.
void cuda_model_set_bf16_rounding(CudaModel *m, uint64_t round_seed, uint64_t updates_done);
// The BF16 copy as floats [P] (tests; bf16 models only).
void cuda_model_get_params16(CudaModel *m, float *values);
void cuda_model_get_params(CudaModel *m, float *params);
void cuda_model_get_grads(CudaModel *m, float *grads);
// The Adam moments: P values each, or after cuda_model_shard_moments the len values of its range.
void cuda_model_set_adam(CudaModel *m, const float *adam_m, const float *adam_v);
void cuda_model_get_adam(CudaModel *m, float *adam_m, float *adam_v);
// ZeRO-1 (train.zero): keep Adam moments for parameters [lo, lo + len) alone (2 len floats on the device instead of
// 2 P); updates then cover that range (cuda_model_update_accumulated). Call before the first step.
void cuda_model_shard_moments(CudaModel *m, size_t lo, size_t len);
// The device's parameter array [P] (ZeRO-1: NCCL gathers every rank's updated range into it).
float *cuda_model_params_device(CudaModel *m);
// decay_mask[P] (1 where AdamW decays); NULL: none.
void cuda_model_set_decay_mask(CudaModel *m, const uint8_t *decay_mask);
// flags[V]: MaskConfig.continuation of whole-word masking (1 where a token continues a word), copied to the device.
void cuda_model_set_continuation(CudaModel *m, const unsigned char *flags);

// train.cuda_graph: on (the default), a masked step (cuda_model_train_step, and cuda_model_forward with a mask)
// runs as plain launches the first time its shape is seen (batch size, configuration: a warm-up outside any
// capture), is captured as one CUDA graph the second time and replayed afterwards; off, the same launches are
// issued one by one. Both give bit-identical results.
void cuda_model_set_graphs(CudaModel *m, int on);

// Masking and dropout use cuRAND's Philox stream with key `philox_seed` (Rng.seed of the stream), computed
// inside the kernels, at the offsets of `layout` for index `step`: the same numbers, so the same masks, as
// the CPU. The seed and the step's base offset reach the device in the step's one upload.
// A micro-batch (gradient accumulation) or a data-parallel rank's share runs rows [first_row, first_row + B) of
// a whole batch of batch_rows rows and draws exactly the numbers those rows get in the whole batch, on the mask
// and on every dropout site (as the CPU's DropoutCtx.first_row / rows). batch_rows 0: the batch is the whole
// batch (first_row must then be 0).
typedef struct {
    uint64_t philox_seed;
    RngLayout layout;
    uint64_t step;
    float dropout_p;  // 0: no dropout
    int first_row, batch_rows;
} CudaRandom;

// Forward only (validation, samples, eval): tokens[B,T] host ids are masked on the device (mask != NULL)
// or used as given with labels (mask == NULL; labels may be NULL for logits only). Labels equal to pad_id
// are ignored (as cpu_model_forward; with a mask it must be mask->pad_id). Fills stats (not grad_norm).
void cuda_model_forward(CudaModel *m, const int *tokens, const int *labels, int B, int pad_id,
                        const MaskConfig *mask, const CudaRandom *rnd, CudaStepStats *stats);
// Copy the logits [B,T,V] of the last forward to the host (after a sparse forward: NaN rows except at the
// selected positions).
void cuda_model_get_logits(CudaModel *m, float *logits, int B);
// Copy the model inputs and labels of the last forward (after masking) to the host.
void cuda_model_get_batch(CudaModel *m, int *inputs, int *labels, int B);
// Backward of the last forward (gradients overwritten).
void cuda_model_backward(CudaModel *m);
// A whole training step: mask, forward, backward, global-norm clip (max_norm <= 0: off), Adam update at
// step t (from 1) with learning rate lr. tokens[B,T] host ids are copied asynchronously.
void cuda_model_train_step(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd,
                           float max_norm, const OptimConfig *oc, long t, double lr, CudaStepStats *stats);
// Gradient accumulation (train.accum_steps): a step's batch runs as micro-batches, each one call of
// cuda_model_accumulate with its tokens[B,T] (host ids, masked on the device) and rnd->first_row / batch_rows
// naming its rows in the whole batch; norm_targets is the whole batch's count of targets (the host's, from the
// same masking), by which each micro-batch's gradient is divided, so that the sum is the whole batch's mean.
// first: 1 on the step's first micro-batch. The gradients are summed on the device in call order, and the loss
// (x targets) and correct predictions with them; nothing is read back. cuda_model_apply_accumulated then clips
// and updates once with the sum (as cuda_model_optimizer_step) and fills stats over the whole batch (one
// read-back). A micro-batch is captured as a CUDA graph like a training step (train.cuda_graph).
void cuda_model_accumulate(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd,
                           int norm_targets, int first);
void cuda_model_apply_accumulated(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr,
                                  CudaStepStats *stats);
// The summed gradients [P] of the micro-batches so far (after cuda_model_accumulate; tests).
void cuda_model_get_accumulated_grads(CudaModel *m, float *grads);
// The same sum in device memory (allocated on first use): data parallel sums it across ranks in place (NCCL).
float *cuda_model_accumulated_grads_device(CudaModel *m);
// cuda_model_apply_accumulated in two parts, for a step over ranks (step.c): the clip (by the norm of all P summed
// gradients) and Adam update of parameters [lo, lo + len), asynchronous; then the step's one read-back: the norm
// before clipping and the sums since the step's first micro-batch (loss x targets, correct predictions, targets).
void cuda_model_update_accumulated(CudaModel *m, size_t lo, size_t len, float max_norm, const OptimConfig *oc, long t,
                                   double lr);
void cuda_model_read_update(CudaModel *m, float *grad_norm, double sums[3]);

// The optimizer part of a step on the gradients of the last backward: global-norm clip (max_norm <= 0: off)
// and the Adam update at step t with learning rate lr. Returns the norm before clipping. (train_step does
// the same inside the step; this is for callers that run forward and backward themselves, like the tests.)
float cuda_model_optimizer_step(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr);

// Sparse prediction (train.sparse_prediction; off by default): forwards with labels or a mask, and training
// steps, run the final LayerNorm, the classifier and the loss on the selected positions (label != PAD) only,
// with the dense head's loss, accuracy and gradients (within float rounding). Not inside a CUDA graph capture.
void cuda_model_set_sparse_prediction(CudaModel *m, int on);

// More than 2^31 elements (issue 21, item 4): no cuBLAS call gets an operand of more than max_elems elements
// (INT_MAX unless lowered): a product over N rows runs as blocks of rows (cuda_model.cu says why). Tests lower the
// limit with cuda_model_set_gemm_limit (0 restores INT_MAX) so that small shapes take the split path, and list
// with cuda_model_linear_gemms, without a device, the calls one linear layer of N rows, IC inputs and OC outputs
// makes (its forward, then dinp and dw of its backward) under a limit, to check their arithmetic at real shapes.
// It returns the number of calls and writes the first max_calls.
typedef struct {
    int transa, transb;                   // 1: the operand is transposed (CUBLAS_OP_T)
    int m, n, k, lda, ldb, ldc;           // as passed to cublasSgemm
    size_t a_offset, b_offset, c_offset;  // where each operand starts, in elements from its tensor's start
    float beta;                           // 0: C overwritten, 1: added to
} CudaGemmCall;
void cuda_model_set_gemm_limit(CudaModel *m, size_t max_elems);
int cuda_model_linear_gemms(int N, int IC, int OC, size_t max_elems, CudaGemmCall *calls, int max_calls);

// cudaProfilerStart / cudaProfilerStop, for `--profile-steps` (nsys --capture-range=cudaProfilerApi, ncu
// --profile-from-start off).
void cuda_profiler_start(void);
void cuda_profiler_stop(void);

#ifdef __cplusplus
}
#endif

#endif
