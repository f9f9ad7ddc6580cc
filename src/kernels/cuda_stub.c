// cuda_stub.c: the CUDA backend's C interface for builds without CUDA (MLM_CUDA=OFF, or AUTO without a toolkit).
//
// cuda_device_count() reports no device, with the reason, so that `--device auto` picks the CPU and
// `--device cuda` says the binary was built without CUDA. The trainer asks for a device before anything
// else, so the other entry points are never reached; they stop with the same message should one be.
#include <stdio.h>

#include "mlm/common.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"

#define MLM_NO_CUDA_REASON                                                                                       \
    "this mlm was built without CUDA (rebuild with the CUDA Toolkit installed, or configure with -DMLM_CUDA=ON "  \
    "to require it)"

static MLM_NORETURN void no_cuda(const char *what) {
    mlm_fatal(MLM_EXIT_FAILURE, "%s: %s", what, MLM_NO_CUDA_REASON);
}

int cuda_device_count(char *why, size_t why_len) {
    if (why && why_len) snprintf(why, why_len, "%s", MLM_NO_CUDA_REASON);
    return 0;
}

void cuda_device_describe(char *out, size_t out_len) {
    if (out && out_len) snprintf(out, out_len, "none (built without CUDA)");
}

size_t cuda_device_total_memory(void) { return 0; }

void cuda_mask_batch_host(const MaskConfig *c, const int *tokens, size_t n, uint64_t philox_seed, uint64_t offset,
                          int *inputs, int *labels) {
    no_cuda("cuda_mask_batch_host");
}

CudaModel *cuda_model_create(const ModelConfig *cfg, int max_B, int precision) { no_cuda("cuda_model_create"); }
void cuda_model_set_bf16_rounding(CudaModel *m, uint64_t round_seed, uint64_t updates_done) {
    no_cuda("cuda_model_set_bf16_rounding");
}
void cuda_model_get_params16(CudaModel *m, float *values) { no_cuda("cuda_model_get_params16"); }
void cuda_model_memory_plan(const ModelConfig *cfg, int max_B, int precision, int accumulate, int whole_word,
                            CudaMemoryPlan *plan) {
    no_cuda("cuda_model_memory_plan");
}
void cuda_model_free(CudaModel *m) {}
size_t cuda_model_num_params(const CudaModel *m) { no_cuda("cuda_model_num_params"); }
void cuda_model_set_graphs(CudaModel *m, int on) { no_cuda("cuda_model_set_graphs"); }
void cuda_model_set_params(CudaModel *m, const float *params) { no_cuda("cuda_model_set_params"); }
void cuda_model_get_params(CudaModel *m, float *params) { no_cuda("cuda_model_get_params"); }
void cuda_model_get_grads(CudaModel *m, float *grads) { no_cuda("cuda_model_get_grads"); }
float *cuda_model_params_device(CudaModel *m) { no_cuda("cuda_model_params_device"); }
void cuda_model_shard_moments(CudaModel *m, size_t lo, size_t len) { no_cuda("cuda_model_shard_moments"); }
void cuda_model_set_adam(CudaModel *m, const float *adam_m, const float *adam_v) { no_cuda("cuda_model_set_adam"); }
void cuda_model_get_adam(CudaModel *m, float *adam_m, float *adam_v) { no_cuda("cuda_model_get_adam"); }
void cuda_model_set_decay_mask(CudaModel *m, const uint8_t *decay_mask) { no_cuda("cuda_model_set_decay_mask"); }
void cuda_model_set_continuation(CudaModel *m, const unsigned char *flags) { no_cuda("cuda_model_set_continuation"); }

void cuda_model_forward(CudaModel *m, const int *tokens, const int *labels, int B, int pad_id,
                        const MaskConfig *mask, const CudaRandom *rnd, CudaStepStats *stats) {
    no_cuda("cuda_model_forward");
}

void cuda_model_get_logits(CudaModel *m, float *logits, int B) { no_cuda("cuda_model_get_logits"); }
void cuda_model_get_batch(CudaModel *m, int *inputs, int *labels, int B) { no_cuda("cuda_model_get_batch"); }
void cuda_model_backward(CudaModel *m) { no_cuda("cuda_model_backward"); }
void cuda_model_set_sparse_prediction(CudaModel *m, int on) { no_cuda("cuda_model_set_sparse_prediction"); }

void cuda_model_train_step(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd,
                           float max_norm, const OptimConfig *oc, long t, double lr, CudaStepStats *stats) {
    no_cuda("cuda_model_train_step");
}

float cuda_model_optimizer_step(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr) {
    no_cuda("cuda_model_optimizer_step");
}

void cuda_model_accumulate(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd,
                           int norm_targets, int first) {
    no_cuda("cuda_model_accumulate");
}

void cuda_model_apply_accumulated(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr,
                                  CudaStepStats *stats) {
    no_cuda("cuda_model_apply_accumulated");
}

void cuda_model_get_accumulated_grads(CudaModel *m, float *grads) { no_cuda("cuda_model_get_accumulated_grads"); }
float *cuda_model_accumulated_grads_device(CudaModel *m) { no_cuda("cuda_model_accumulated_grads_device"); }

void cuda_model_update_accumulated(CudaModel *m, size_t lo, size_t len, float max_norm, const OptimConfig *oc, long t,
                                   double lr) {
    no_cuda("cuda_model_update_accumulated");
}

void cuda_model_read_update(CudaModel *m, float *grad_norm, double sums[3]) { no_cuda("cuda_model_read_update"); }

void cuda_model_set_gemm_limit(CudaModel *m, size_t max_elems) { no_cuda("cuda_model_set_gemm_limit"); }
int cuda_model_linear_gemms(int N, int IC, int OC, size_t max_elems, CudaGemmCall *calls, int max_calls) {
    no_cuda("cuda_model_linear_gemms");
}

void cuda_profiler_start(void) {}
void cuda_profiler_stop(void) {}
