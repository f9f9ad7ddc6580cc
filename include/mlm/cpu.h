// cpu.h: the CPU reference backend: a model instance with parameters, gradients and activations,
// forward (with loss and accuracy) and backward, gradient norm and clipping, and the optimizers.
#ifndef MLM_CPU_H
#define MLM_CPU_H

#include <stdint.h>

#include "mlm/model.h"
#include "mlm/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

// Dropout for one forward pass. rng == NULL or p == 0 means no dropout (evaluation).
typedef struct {
    Rng *rng;          // stream the masks are drawn from
    RngLayout layout;  // offsets inside a step
    uint64_t step;     // index of this step in the stream (optimizer step for training)
    float p;
    // Gradient accumulation: this forward runs rows [first_row, first_row + rows) of the step's whole batch and
    // draws each site's uniforms from that sub-range of the whole batch's (rows = 0: the whole batch itself).
    int first_row, rows;
} DropoutCtx;

typedef struct {
    ModelConfig cfg;
    int max_B;                // largest batch this instance can run
    size_t n_params;
    float *params;            // [P] one allocation
    float *grads;             // [P] one allocation
    ParamTensors p, g;        // views into params and grads
    float *acts;              // one allocation for every activation saved for backward
    size_t n_acts;
    float *logits;            // [B, T, V] of the last forward (points into acts)
    // State of the last forward, used by backward.
    int B, T;
    int n_targets;            // labels != PAD in the last forward
    int norm_targets;         // > 0: backward divides by this count instead (accumulation: the whole batch's)
    const int *last_inputs;   // [B, T] (borrowed)
    const int *last_labels;   // [B, T] (borrowed)
    void *internal;           // backend-private views (see cpu_model.c)
} CpuModel;

CpuModel *cpu_model_create(const ModelConfig *cfg, int max_B);

// Which matmul the CPU backend runs in this process and why, for the device line: the optimized BLAS (vendor,
// version, kernels, file) or the built-in GEMM with its micro-kernel and the reason no BLAS is used.
void cpu_matmul_describe(char *buf, size_t n);
void cpu_model_free(CpuModel *m);

// Forward over inputs[B, T] (T = cfg.max_seq). With labels != NULL computes the mean cross-entropy over
// positions whose label != pad_id (returned; 0 if there are none) and, if `correct` is not NULL, the
// number of those positions whose argmax equals the label. Logits are left in m->logits.
float cpu_model_forward(CpuModel *m, const int *inputs, const int *labels, int B, int pad_id,
                        const DropoutCtx *drop, int *correct);
// Gradients of the last forward's mean loss into m->grads (overwritten, not accumulated).
void cpu_model_backward(CpuModel *m);

// Sparse prediction (train.sparse_prediction; off by default): forwards WITH labels run the final LayerNorm,
// the classifier and the loss on the selected positions (label != pad_id) only, with the loss, accuracy and
// gradients of the dense head (within float rounding). m->logits then holds [n_targets, V]: the rows of the
// selected positions in position order. Forwards without labels always compute every position's logits.
void cpu_model_set_sparse_prediction(CpuModel *m, int on);

// train.precision = bf16 on the CPU: the reference of the CUDA backend's BF16 step. The forward and backward read a
// BF16 copy of the parameters (m->p points at it; m->params stays the FP32 masters the optimizer updates and
// checkpoints hold) made by THE ROUNDING RULE (include/mlm/bf16.h) with the Philox stream round_seed, and round
// every tensor the CUDA backend stores in BF16 to a BF16 value where it is written; gradients, LayerNorm statistics
// and the losses stay FP32. cpu_model_set_bf16 makes the copy of the masters as they are (0 updates);
// cpu_model_round_params makes it again after the masters changed, updates_done being the optimizer steps they
// have had (the copy after step t uses offset t * P: a resumed run rounds as the run it continues).
void cpu_model_set_bf16(CpuModel *m, uint64_t round_seed);
void cpu_model_round_params(CpuModel *m, uint64_t updates_done);

// Tests only: a view of the ReLU decisions (tests/relu_ties.c, docs/testing.md). When a hook is set, every
// forward calls it once per layer, after the feed-forward pre-activation h[N, F] = x[N, C] w[F, C]^T + b[F] is
// computed and the hidden dropout mask keep[N, F] (NULL without dropout) is drawn, before ReLU + dropout read h.
// The hook may rewrite h to force a decision (ReLU passes h > 0). No hook (the default, and always in
// production): one test of a pointer per layer and forward.
typedef struct {
    int layer, N, C, F;
    float *h;                 // [N, F] the pre-activation as this backend computed it (bias included)
    const float *x;           // [N, C] the layer's LN2 output
    const float *w, *b;       // [F, C], [F] the first Linear's weight and bias
    const uint32_t *keep;     // [N, F] in bits (src/keep_bits.h: keep_bit(keep, n * F + f) = 1 kept), or NULL
} CpuReluSite;
typedef void (*CpuReluHook)(void *ctx, const CpuReluSite *site);
void cpu_model_set_relu_hook(CpuModel *m, CpuReluHook hook, void *ctx);

// Global L2 norm over all gradients, and in-place scaling by min(1, max_norm / (norm + 1e-6)).
float cpu_grad_norm(const float *grads, size_t n);
float cpu_clip_grads(float *grads, size_t n, float max_norm);  // returns the norm before clipping
// The scaling of cpu_clip_grads with a norm taken over a longer vector (a range of the whole gradient, ZeRO-1).
void cpu_scale_grads(float *grads, size_t n, float norm, float max_norm);

#ifdef __cplusplus
}
#endif

#endif
