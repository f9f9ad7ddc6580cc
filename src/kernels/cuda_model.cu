// cuda_model.cu: the CUDA backend's model: parameters, gradients, Adam moments and activations resident on
// the device, the forward and backward passes composed from the op kernels of kernels.h and cuBLAS, and a
// whole training step (mask, forward, backward, clip, Adam) with one small read-back of the logged scalars.
//
// It mirrors src/cpu/cpu_model.c op for op: the same parameter layout (model_param_views), the same saved
// activations (stacked [L, max_B, T, ...] per layer, a smaller batch using a prefix of each layer's block),
// and the same random numbers: masking and dropout draw from one device Philox generator at the offsets
// of the RngLayout for the ACTUAL batch (THE DROPOUT RULE of src/cpu/ops.h), so the GPU masks and drops
// exactly the positions the CPU does.
//
// Matmuls: cuBLAS is column-major; a row-major [R, K] matrix is the column-major [K, R] matrix, so every
// row-major product below is written as the column-major product of the transposes (see the helpers).
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <curand.h>
#include <math.h>
#include <nvtx3/nvToolsExt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"

#include "cuda_check.h"
#include "kernels.h"
#include "philox_cpu.h"  // CURAND_PHILOX_THREADS: the row length of cuRAND's Philox layout
#include "mlm/common.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"

// ---------------------------------------------------------------------------------------------------------
// Device memory: two allocations, each carved into tensors.

// Views into the activation allocation (device pointers). Per-layer tensors saved for the backward are
// stacked [L, max_B, T, ...]; everything else is per-batch scratch reused by every layer.
typedef struct {
    float *pe;                   // [T, C] sinusoidal positions (constant)
    int *tokens;                 // [B, T] token ids as copied from the host (before masking)
    int *inputs;                 // [B, T] model inputs (after masking)
    int *labels;                 // [B, T] original token where selected, PAD elsewhere
    float *uniforms;             // [max(4 B T, B H T T, B T C, B T F)] masking or one dropout site's uniforms
    float *encoded;              // [B, T, C] embedding output = residual stream entering layer 0
    float *ln1;                  // [L, B, T, C]
    float *ln1_mean, *ln1_rstd;  // [L, B, T]
    float *qkv;                  // [L, B, T, 3C]
    float *att;                  // [L, B, H, T, T] softmax probabilities, before dropout
    float *atty;                 // [L, B, T, C] heads concatenated, input of the output projection
    float *res1;                 // [L, B, T, C] residual stream after the attention block
    float *ln2;                  // [L, B, T, C]
    float *ln2_mean, *ln2_rstd;  // [L, B, T]
    float *fch;                  // [L, B, T, F] dropout(ReLU(Linear1)), input of Linear2
    float *res2;                 // [L, B, T, C] residual stream after the FFN block
    uint8_t *keep_att;           // [L, B, H, T, T] dropout masks of the attention probabilities
    uint8_t *keep_res1;          // [L, B, T, C]
    uint8_t *keep_res2;          // [L, B, T, C]
    uint8_t *keep_hidden;        // [B, T, F] (scratch: the backward needs only fch)
    float *lnf;                  // [B, T, C]
    float *lnf_mean, *lnf_rstd;  // [B, T]
    float *logits;               // [B, T, V]
    float *losses;               // [B, T] per-position loss (0 where ignored)
    int *correct;                // [B, T] 1 where argmax == label on a target
    int *n_targets;              // [1]
    float *scalars;              // [4] mean loss, correct, n_targets (cuda_loss_reduce), grad norm
    // Forward scratch.
    float *q, *k, *v;            // [B, H, T, hs] each
    float *yh;                   // [B, H, T, hs] P V per head
    float *att_drop;             // [B, H, T, T] dropout(att) of the current layer
    float *proj;                 // [B, T, C] a block's output before bias, dropout and the residual add
    // Backward scratch.
    float *dlogits;              // [B, T, V] (written by the fused cross-entropy in the forward)
    float *dres;                 // [B, T, C] gradient of the residual stream, carried down the layers
    float *dln;                  // [B, T, C] gradient of a LayerNorm output
    float *dproj;                // [B, T, C]
    float *datty;                // [B, T, C]
    float *dyh;                  // [B, H, T, hs]
    float *dq, *dk, *dv;         // [B, H, T, hs] each
    float *dqkv;                 // [B, T, 3C]
    float *dfch;                 // [B, T, F]
    float *datt;                 // [B, H, T, T] d dropout(att), then (in place) d scores
    float *scratch;              // column sums and LayerNorm weight sums
    double *norm_scratch;        // gradient norm partial sums
} DevActs;

struct CudaModel {
    ModelConfig cfg;
    int max_B;
    int allow_tf32;
    size_t n_params;
    cudaStream_t stream;
    cublasHandle_t cublas;
    curandGenerator_t gen;
    uint64_t gen_seed;      // seed the generator holds (valid when gen_seeded)
    int gen_seeded;
    // Parameter-sized state, one allocation: params | grads | adam m | adam v | decay mask (bytes).
    void *state_block;
    float *params, *grads, *adam_m, *adam_v;
    uint8_t *decay_mask;
    int decay_set;          // decay_mask holds a mask (else AdamW decays nothing)
    ParamTensors p, g;      // device views
    void *act_block;
    size_t act_bytes;
    DevActs a;
    // Host side: pinned staging for token/label uploads and the scalar read-back.
    int *h_stage;           // [2, max_B, T] tokens (or inputs), then labels
    float *h_scalars;       // [4]
    cudaEvent_t stage_free; // recorded after the last upload from h_stage
    // State of the last forward, used by the backward.
    int B;
    int has_labels;
    int pad_id;             // the ignored label of the last forward (the vocabulary's [PAD])
    int dropout_on;
    float drop_scale;
};

// Carves consecutive tensors out of an allocation; with base == NULL it only counts. Every tensor starts
// on a 256-byte boundary (cudaMalloc's own alignment).
typedef struct {
    char *base;
    size_t used;  // bytes taken so far
} Carver;

static void *carve(Carver *cv, size_t bytes) {
    void *p = cv->base ? cv->base + cv->used : NULL;
    cv->used += (bytes + 255) & ~(size_t)255;
    return p;
}
static float *carve_f(Carver *cv, size_t n) { return (float *)carve(cv, n * sizeof(float)); }
static int *carve_i(Carver *cv, size_t n) { return (int *)carve(cv, n * sizeof(int)); }
static uint8_t *carve_b(Carver *cv, size_t n) { return (uint8_t *)carve(cv, n); }

// Largest scratch the reduction kernels ask for over every batch size this model runs.
static size_t scratch_floats(const ModelConfig *c, int max_B) {
    size_t most = 0;
    int ocs[4] = {3 * c->d_model, c->d_model, c->d_ff, c->vocab};
    for (int b = 1; b <= max_B; b++) {
        int N = b * c->max_seq;
        for (int i = 0; i < 4; i++) most = MLM_MAX(most, cuda_column_sums_scratch(N, ocs[i]));
        most = MLM_MAX(most, cuda_layernorm_backward_scratch(N, c->d_model));
        most = MLM_MAX(most, cuda_attention_bias_scratch(b, c->d_model));  // fused attention's bias partials
    }
    return MLM_MAX(most, (size_t)1);
}

static void carve_acts(DevActs *a, const ModelConfig *c, int max_B, size_t n_params, Carver *cv) {
    size_t B = max_B, T = c->max_seq, C = c->d_model, H = c->n_heads, L = c->n_layers, F = c->d_ff, V = c->vocab;
    size_t BT = B * T, BHTT = B * H * T * T;
    a->pe = carve_f(cv, T * C);
    a->tokens = carve_i(cv, BT);
    a->inputs = carve_i(cv, BT);
    a->labels = carve_i(cv, BT);
    a->uniforms = carve_f(cv, MLM_MAX(MLM_MAX(4 * BT, BHTT), BT * MLM_MAX(C, F)));
    a->encoded = carve_f(cv, BT * C);
    a->ln1 = carve_f(cv, L * BT * C);
    a->ln1_mean = carve_f(cv, L * BT);
    a->ln1_rstd = carve_f(cv, L * BT);
    a->qkv = carve_f(cv, L * BT * 3 * C);
    a->att = carve_f(cv, L * BHTT);
    a->atty = carve_f(cv, L * BT * C);
    a->res1 = carve_f(cv, L * BT * C);
    a->ln2 = carve_f(cv, L * BT * C);
    a->ln2_mean = carve_f(cv, L * BT);
    a->ln2_rstd = carve_f(cv, L * BT);
    a->fch = carve_f(cv, L * BT * F);
    a->res2 = carve_f(cv, L * BT * C);
    a->keep_att = carve_b(cv, L * BHTT);
    a->keep_res1 = carve_b(cv, L * BT * C);
    a->keep_res2 = carve_b(cv, L * BT * C);
    a->keep_hidden = carve_b(cv, BT * F);
    a->lnf = carve_f(cv, BT * C);
    a->lnf_mean = carve_f(cv, BT);
    a->lnf_rstd = carve_f(cv, BT);
    a->logits = carve_f(cv, BT * V);
    a->losses = carve_f(cv, BT);
    a->correct = carve_i(cv, BT);
    a->n_targets = carve_i(cv, 1);
    a->scalars = carve_f(cv, 4);
    a->q = carve_f(cv, BT * C);
    a->k = carve_f(cv, BT * C);
    a->v = carve_f(cv, BT * C);
    a->yh = carve_f(cv, BT * C);
    a->att_drop = carve_f(cv, BHTT);
    a->proj = carve_f(cv, BT * C);
    a->dlogits = carve_f(cv, BT * V);
    a->dres = carve_f(cv, BT * C);
    a->dln = carve_f(cv, BT * C);
    a->dproj = carve_f(cv, BT * C);
    a->datty = carve_f(cv, BT * C);
    a->dyh = carve_f(cv, BT * C);
    a->dq = carve_f(cv, BT * C);
    a->dk = carve_f(cv, BT * C);
    a->dv = carve_f(cv, BT * C);
    a->dqkv = carve_f(cv, BT * 3 * C);
    a->dfch = carve_f(cv, BT * F);
    a->datt = carve_f(cv, BHTT);
    a->scratch = carve_f(cv, scratch_floats(c, max_B));
    a->norm_scratch = (double *)carve(cv, MLM_MAX(cuda_grad_norm_scratch(n_params), (size_t)1) * sizeof(double));
}

static double mib(size_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

// cudaMalloc with an out-of-memory message that says what was asked for, what the device has, and which
// settings to shrink.
static void *device_alloc(size_t bytes, const char *what, const ModelConfig *c, int max_B) {
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    void *p = NULL;
    cudaError_t e = bytes <= free_b ? cudaMalloc(&p, bytes) : cudaErrorMemoryAllocation;
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();  // not sticky; clear it
        mlm_fatal(MLM_EXIT_FAILURE,
                  "CUDA out of memory: %zu bytes (%.1f MiB) requested for %s, but the device has %.1f MiB free of "
                  "%.1f MiB; shrink train.batch_size (the model holds batches of up to %d sequences), data.seq_len "
                  "(%d) or the model (model.d_model %d, model.d_ff %d, model.n_layers %d, model.n_heads %d)",
                  bytes, mib(bytes), what, mib(free_b), mib(total_b), max_B, c->max_seq, c->d_model, c->d_ff,
                  c->n_layers, c->n_heads);
    }
    CUDA_CHECK(e);
    return p;
}

// Once per process: the device generator's uniforms around a thread-row boundary of cuRAND's Philox layout
// (4 x 65,536 outputs per row: philox_cpu.h) must equal the CPU reproduction bit for bit, or the GPU would
// mask and drop other positions than the CPU (and a run could not move between the backends). Cheap: one
// launch of 64 numbers. The model's seed bookkeeping starts unset afterwards, so use_seed reseeds.
static void check_device_philox(curandGenerator_t gen, cudaStream_t stream) {
    static int checked = 0;
    if (checked) return;
    enum { SAMPLE = 64 };
    const uint64_t seed = 0x5eed5eed12345ull;
    // From 33 before the boundary (not a multiple of 4) to 31 past it.
    const uint64_t offset = (uint64_t)CURAND_PHILOX_THREADS * 4 - 33;
    float dev[SAMPLE], cpu[SAMPLE], *d_u = NULL;
    CUDA_CHECK(cudaMalloc(&d_u, SAMPLE * sizeof(float)));
    CURAND_CHECK(curandSetPseudoRandomGeneratorSeed(gen, seed));
    cuda_uniform(gen, offset, d_u, SAMPLE, stream);
    CUDA_CHECK(cudaMemcpyAsync(dev, d_u, sizeof(dev), cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    CUDA_CHECK(cudaFree(d_u));
    philox_uniform(seed, offset, cpu, SAMPLE);
    for (int i = 0; i < SAMPLE; i++) {
        if (memcmp(&dev[i], &cpu[i], sizeof(float)) != 0) {
            int ver = 0;
            curandGetVersion(&ver);
            mlm_fatal(MLM_EXIT_FAILURE,
                      "cuRAND %d lays out its device Philox stream differently from mlm's CPU reproduction: at "
                      "offset %llu the device gives %.9g, the CPU %.9g. GPU masks and dropout would not match "
                      "the CPU backend; train with --device cpu, or use the cuRAND this build was tested with "
                      "and report the version",
                      ver, (unsigned long long)(offset + (uint64_t)i), dev[i], cpu[i]);
        }
    }
    checked = 1;
}

CudaModel *cuda_model_create(const ModelConfig *cfg, int max_B, int allow_tf32) {
    char err[256];
    if (model_config_check(cfg, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    if (max_B < 1) mlm_fatal(MLM_EXIT_USAGE, "batch size %d must be >= 1", max_B);
    if (cuda_device_count(err, sizeof(err)) == 0) mlm_fatal(MLM_EXIT_FAILURE, "CUDA model: %s", err);
    CudaModel *m = (CudaModel *)mlm_calloc(1, sizeof(CudaModel), "CUDA model");
    m->cfg = *cfg;
    m->max_B = max_B;
    m->allow_tf32 = allow_tf32;
    m->n_params = model_num_params(cfg);
    size_t P = m->n_params;

    CUDA_CHECK(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&m->cublas));
    CUBLAS_CHECK(cublasSetStream(m->cublas, m->stream));
    CUBLAS_CHECK(cublasSetMathMode(m->cublas, allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    CURAND_CHECK(curandCreateGenerator(&m->gen, CURAND_RNG_PSEUDO_PHILOX4_32_10));
    // LEGACY, as the host generator (rng.c): DEFAULT is only "same as BEST" and free to change.
    CURAND_CHECK(curandSetGeneratorOrdering(m->gen, CURAND_ORDERING_PSEUDO_LEGACY));
    CURAND_CHECK(curandSetStream(m->gen, m->stream));
    check_device_philox(m->gen, m->stream);

    // Parameters, gradients, Adam moments and the weight-decay mask.
    Carver count = {NULL, 0};
    carve(&count, P * sizeof(float));
    carve(&count, P * sizeof(float));
    carve(&count, P * sizeof(float));
    carve(&count, P * sizeof(float));
    carve(&count, P);
    m->state_block = device_alloc(count.used, "parameters, gradients and Adam moments", cfg, max_B);
    Carver cv = {(char *)m->state_block, 0};
    m->params = carve_f(&cv, P);
    m->grads = carve_f(&cv, P);
    m->adam_m = carve_f(&cv, P);
    m->adam_v = carve_f(&cv, P);
    m->decay_mask = carve_b(&cv, P);
    CUDA_CHECK(cudaMemsetAsync(m->state_block, 0, count.used, m->stream));
    model_param_views(cfg, m->params, &m->p);
    model_param_views(cfg, m->grads, &m->g);

    // Activations.
    Carver acount = {NULL, 0};
    carve_acts(&m->a, cfg, max_B, P, &acount);
    char what[160];
    snprintf(what, sizeof(what), "activations of a batch of %d x %d tokens", max_B, cfg->max_seq);
    m->act_block = device_alloc(acount.used, what, cfg, max_B);
    m->act_bytes = acount.used;
    Carver acv = {(char *)m->act_block, 0};
    carve_acts(&m->a, cfg, max_B, P, &acv);
    // Zeroed once: the masks and scratch start defined (compute-sanitizer initcheck stays quiet).
    CUDA_CHECK(cudaMemsetAsync(m->act_block, 0, m->act_bytes, m->stream));

    // Host staging (pinned, so the uploads are truly asynchronous) and the positional table.
    size_t BT = (size_t)max_B * cfg->max_seq;
    CUDA_CHECK(cudaMallocHost((void **)&m->h_stage, 2 * BT * sizeof(int)));
    CUDA_CHECK(cudaMallocHost((void **)&m->h_scalars, 4 * sizeof(float)));
    CUDA_CHECK(cudaEventCreateWithFlags(&m->stage_free, cudaEventDisableTiming));
    float *pe = (float *)mlm_malloc((size_t)cfg->max_seq * cfg->d_model * sizeof(float), "positional table");
    model_positional_encoding(cfg->max_seq, cfg->d_model, pe);
    CUDA_CHECK(cudaMemcpyAsync(m->a.pe, pe, (size_t)cfg->max_seq * cfg->d_model * sizeof(float),
                               cudaMemcpyHostToDevice, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    free(pe);
    return m;
}

void cuda_model_free(CudaModel *m) {
    if (!m) return;
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    CUDA_CHECK(cudaFree(m->state_block));
    CUDA_CHECK(cudaFree(m->act_block));
    CUDA_CHECK(cudaFreeHost(m->h_stage));
    CUDA_CHECK(cudaFreeHost(m->h_scalars));
    CUDA_CHECK(cudaEventDestroy(m->stage_free));
    CURAND_CHECK(curandDestroyGenerator(m->gen));
    CUBLAS_CHECK(cublasDestroy(m->cublas));
    CUDA_CHECK(cudaStreamDestroy(m->stream));
    free(m);
}

size_t cuda_model_num_params(const CudaModel *m) { return m->n_params; }

// ---------------------------------------------------------------------------------------------------------
// Host <-> device copies (outside training steps; each waits for the stream).

static void copy_sync(CudaModel *m, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
}

void cuda_model_set_params(CudaModel *m, const float *params) {
    copy_sync(m, m->params, params, m->n_params * sizeof(float), cudaMemcpyHostToDevice);
}
void cuda_model_get_params(CudaModel *m, float *params) {
    copy_sync(m, params, m->params, m->n_params * sizeof(float), cudaMemcpyDeviceToHost);
}
void cuda_model_get_grads(CudaModel *m, float *grads) {
    copy_sync(m, grads, m->grads, m->n_params * sizeof(float), cudaMemcpyDeviceToHost);
}
void cuda_model_set_adam(CudaModel *m, const float *adam_m, const float *adam_v) {
    copy_sync(m, m->adam_m, adam_m, m->n_params * sizeof(float), cudaMemcpyHostToDevice);
    copy_sync(m, m->adam_v, adam_v, m->n_params * sizeof(float), cudaMemcpyHostToDevice);
}
void cuda_model_get_adam(CudaModel *m, float *adam_m, float *adam_v) {
    copy_sync(m, adam_m, m->adam_m, m->n_params * sizeof(float), cudaMemcpyDeviceToHost);
    copy_sync(m, adam_v, m->adam_v, m->n_params * sizeof(float), cudaMemcpyDeviceToHost);
}
void cuda_model_set_decay_mask(CudaModel *m, const uint8_t *decay_mask) {
    m->decay_set = decay_mask != NULL;
    if (decay_mask) copy_sync(m, m->decay_mask, decay_mask, m->n_params, cudaMemcpyHostToDevice);
}

static void check_batch(const CudaModel *m, int B, const char *what) {
    if (B < 1 || B > m->max_B)
        mlm_fatal(MLM_EXIT_FAILURE, "%s: batch of %d sequences (this model holds 1..%d)", what, B, m->max_B);
}

void cuda_model_get_logits(CudaModel *m, float *logits, int B) {
    check_batch(m, B, "cuda_model_get_logits");
    copy_sync(m, logits, m->a.logits, (size_t)B * m->cfg.max_seq * m->cfg.vocab * sizeof(float),
              cudaMemcpyDeviceToHost);
}

void cuda_model_get_batch(CudaModel *m, int *inputs, int *labels, int B) {
    check_batch(m, B, "cuda_model_get_batch");
    size_t bytes = (size_t)B * m->cfg.max_seq * sizeof(int);
    if (inputs) CUDA_CHECK(cudaMemcpyAsync(inputs, m->a.inputs, bytes, cudaMemcpyDeviceToHost, m->stream));
    if (labels) CUDA_CHECK(cudaMemcpyAsync(labels, m->a.labels, bytes, cudaMemcpyDeviceToHost, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
}

// ---------------------------------------------------------------------------------------------------------
// cuBLAS products (row-major views; no bias: bias adds are fused into the following elementwise kernel).

static const float ONE = 1.0f, ZERO = 0.0f;

// out[N, OC] = inp[N, IC] w[OC, IC]^T. Column-major, out is [OC, N], inp is [IC, N] and w is [IC, OC], so
// out = op_T(w) inp.
static void matmul_forward(CudaModel *m, float *out, const float *inp, const float *w, int N, int IC, int OC) {
    CUBLAS_CHECK(cublasSgemm(m->cublas, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &ONE, w, IC, inp, IC, &ZERO, out, OC));
}

// dinp[N, IC] = dout[N, OC] w[OC, IC] (skipped when dinp is NULL); dw[OC, IC] = dout^T inp (overwritten: each
// weight receives one product per backward); db[OC] += column sums of dout (skipped when db is NULL).
static void linear_backward(CudaModel *m, float *dinp, float *dw, float *db, const float *dout, const float *inp,
                            const float *w, int N, int IC, int OC) {
    if (dinp)
        CUBLAS_CHECK(cublasSgemm(m->cublas, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &ONE, w, IC, dout, OC, &ZERO, dinp,
                                 IC));
    CUBLAS_CHECK(cublasSgemm(m->cublas, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &ONE, inp, IC, dout, OC, &ZERO, dw, IC));
    if (db) cuda_column_sums_accumulate(db, dout, N, OC, m->a.scratch, m->stream);
}

// One product per (batch, head), all [T, hs] or [T, T] row-major blocks, batched over BH. Arguments as
// cublasSgemmStridedBatched (column-major).
static void gemm_batched(CudaModel *m, cublasOperation_t ta, cublasOperation_t tb, int M, int N, int K,
                         const float *A, int lda, long long sa, const float *B, int ldb, long long sb, float *C,
                         int ldc, long long sc, int batch) {
    CUBLAS_CHECK(cublasSgemmStridedBatched(m->cublas, ta, tb, M, N, K, &ONE, A, lda, sa, B, ldb, sb, &ZERO, C, ldc,
                                           sc, batch));
}

// ---------------------------------------------------------------------------------------------------------
// Random numbers.

static void use_seed(CudaModel *m, uint64_t seed) {
    if (m->gen_seeded && m->gen_seed == seed) return;
    CURAND_CHECK(curandSetPseudoRandomGeneratorSeed(m->gen, seed));
    m->gen_seed = seed;
    m->gen_seeded = 1;
}

// keep[n] for one dropout site of the actual batch (THE DROPOUT RULE), or NULL when dropout is off.
static uint8_t *site_mask(CudaModel *m, const CudaRandom *rnd, uint8_t *keep, int layer, DropSite site, size_t n) {
    if (!m->dropout_on) return NULL;
    cuda_uniform(m->gen, rng_dropout_offset(&rnd->layout, rnd->step, layer, site), m->a.uniforms, n, m->stream);
    cuda_dropout_keep(keep, m->a.uniforms, rnd->dropout_p, n, m->stream);
    return keep;
}

// ---------------------------------------------------------------------------------------------------------
// Uploads through the pinned staging buffer.

// Copy tokens[B, T] (and labels, if not NULL) from the host to d_tokens / d_labels asynchronously.
static void upload_batch(CudaModel *m, int *d_tokens, const int *tokens, const int *labels, int B) {
    size_t n = (size_t)B * m->cfg.max_seq;
    // The previous upload may still be reading the staging buffer.
    CUDA_CHECK(cudaEventSynchronize(m->stage_free));
    memcpy(m->h_stage, tokens, n * sizeof(int));
    CUDA_CHECK(cudaMemcpyAsync(d_tokens, m->h_stage, n * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    if (labels) {
        int *stage_labels = m->h_stage + (size_t)m->max_B * m->cfg.max_seq;
        memcpy(stage_labels, labels, n * sizeof(int));
        CUDA_CHECK(cudaMemcpyAsync(m->a.labels, stage_labels, n * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    }
    CUDA_CHECK(cudaEventRecord(m->stage_free, m->stream));
}

// Upload host tokens and mask them on the device with the uniforms of (rnd->philox_seed, rnd->step).
static void upload_and_mask(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd) {
    size_t n = (size_t)B * m->cfg.max_seq;
    upload_batch(m, m->a.tokens, tokens, NULL, B);
    use_seed(m, rnd->philox_seed);
    cuda_uniform(m->gen, rng_mask_offset(&rnd->layout, rnd->step), m->a.uniforms, 4 * n, m->stream);
    cuda_mask_launch(mask, m->a.tokens, n, m->a.uniforms, m->a.inputs, m->a.labels, m->stream);
}

// ---------------------------------------------------------------------------------------------------------
// Forward and backward (asynchronous on the model's stream; nothing here waits for the device).

static void forward_impl(CudaModel *m, int B, const CudaRandom *rnd) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    int T = c->max_seq, C = c->d_model, H = c->n_heads, F = c->d_ff, V = c->vocab, L = c->n_layers;
    int hs = C / H, BH = B * H;
    size_t BT = (size_t)B * T, maxBT = (size_t)m->max_B * T, BHTT = (size_t)BH * T * T;
    int N = (int)BT;
    float ds = m->drop_scale;
    float att_scale = 1.0f / sqrtf((float)hs);
    long long sT = (long long)T * hs, sTT = (long long)T * T;
    int fused_att = cuda_attention_fused_fits(T, C, H);  // short sequences: the one-kernel attention
    char name[64];

    nvtxRangePushA("forward");
    // The embedding fused with layer 0's LN1; a later layer's LN1 is fused into the residual add before it.
    cuda_embedding_layernorm_forward(a->encoded, a->ln1, a->ln1_mean, a->ln1_rstd, a->inputs, p->tok_emb, a->pe,
                                     p->ln1_w, p->ln1_b, B, T, C, c->ln_eps, m->stream);
    const float *x = a->encoded;  // [B, T, C] residual stream entering the layer
    for (int l = 0; l < L; l++) {
        snprintf(name, sizeof(name), "forward layer %d", l);
        nvtxRangePushA(name);
        size_t lc = (size_t)l * C;
        float *ln1 = a->ln1 + l * maxBT * C;  // with its mean and rstd, written before the layer (see above)
        float *qkv = a->qkv + l * maxBT * 3 * C;
        float *att = a->att + l * maxBT * H * T;
        float *atty = a->atty + l * maxBT * C;
        float *res1 = a->res1 + l * maxBT * C;
        float *ln2 = a->ln2 + l * maxBT * C, *ln2_mean = a->ln2_mean + l * maxBT, *ln2_rstd = a->ln2_rstd + l * maxBT;
        float *fch = a->fch + l * maxBT * F;
        float *res2 = a->res2 + l * maxBT * C;

        // x = x + Drop(OutProj(MHA(LN1(x)))); LN1 (ln1, ln1_mean, ln1_rstd) was written by the kernel before.
        matmul_forward(m, qkv, ln1, p->qkv_w + (size_t)l * 3 * C * C, N, C, 3 * C);
        uint8_t *keep;
        if (fused_att) {
            // One kernel per (batch, head); qkv stays without its bias (the kernels add it when they load).
            keep = site_mask(m, rnd, a->keep_att + l * maxBT * H * T, l, DROP_ATTN_PROBS, BHTT);
            cuda_attention_forward(atty, att, qkv, p->qkv_b + 3 * lc, keep, ds, B, T, C, H, m->stream);
        } else {
            cuda_add_bias(qkv, qkv, p->qkv_b + 3 * lc, BT * 3 * C, 3 * C, m->stream);
            cuda_qkv_split_heads(a->q, a->k, a->v, qkv, B, T, C, H, m->stream);
            // scores[bh] = Q K^T (row-major [T, T]) = column-major K^T' Q: op(K) = T.
            gemm_batched(m, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, a->k, hs, sT, a->q, hs, sT, att, T, sTT, BH);
            keep = site_mask(m, rnd, a->keep_att + l * maxBT * H * T, l, DROP_ATTN_PROBS, BHTT);
            cuda_softmax_forward(att, keep ? a->att_drop : NULL, keep, ds, att_scale, BH, T, m->stream);
            const float *pv = keep ? a->att_drop : att;
            // yh[bh] = P V (row-major [T, hs]) = column-major V' P'.
            gemm_batched(m, CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, a->v, hs, sT, pv, T, sTT, a->yh, hs, sT, BH);
            cuda_heads_to_rows(atty, a->yh, B, T, C, H, m->stream);
        }
        matmul_forward(m, a->proj, atty, p->out_w + (size_t)l * C * C, N, C, C);
        keep = site_mask(m, rnd, a->keep_res1 + l * maxBT * C, l, DROP_ATTN_RESID, BT * C);
        // The residual add fused with the LN2 that reads it.
        cuda_residual_layernorm_forward(res1, ln2, ln2_mean, ln2_rstd, x, a->proj, p->out_b + lc, keep, ds,
                                        p->ln2_w + lc, p->ln2_b + lc, N, C, c->ln_eps, m->stream);

        // x = x + Drop(Linear2(Drop(ReLU(Linear1(LN2(x))))))
        matmul_forward(m, fch, ln2, p->ff1_w + (size_t)l * F * C, N, C, F);
        keep = site_mask(m, rnd, a->keep_hidden, l, DROP_FFN_HIDDEN, BT * F);
        cuda_bias_relu_dropout_forward(fch, p->ff1_b + (size_t)l * F, keep, ds, BT * F, F, m->stream);
        matmul_forward(m, a->proj, fch, p->ff2_w + (size_t)l * C * F, N, F, C);
        keep = site_mask(m, rnd, a->keep_res2 + l * maxBT * C, l, DROP_FFN_RESID, BT * C);
        if (l + 1 < L) {  // the residual add fused with the next layer's LN1
            size_t nc = lc + C, nb = (size_t)(l + 1) * maxBT;
            cuda_residual_layernorm_forward(res2, a->ln1 + nb * C, a->ln1_mean + nb, a->ln1_rstd + nb, res1, a->proj,
                                            p->ff2_b + lc, keep, ds, p->ln1_w + nc, p->ln1_b + nc, N, C, c->ln_eps,
                                            m->stream);
        } else {  // the final LayerNorm below reads it
            cuda_residual_dropout_forward(res2, res1, a->proj, p->ff2_b + lc, keep, ds, BT * C, C, m->stream);
        }
        x = res2;
        nvtxRangePop();
    }
    cuda_layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, x, p->lnf_w, p->lnf_b, N, C, c->ln_eps, m->stream);
    matmul_forward(m, a->logits, a->lnf, p->gen_w, N, C, V);
    cuda_add_bias(a->logits, a->logits, p->gen_b, BT * V, V, m->stream);

    if (m->has_labels) {
        // Labels equal to pad_id are ignored (as cpu_model_forward). Loss, accuracy and dlogits (the
        // backward's starting point) in one pass; the count of targets stays on the device so nothing waits.
        cuda_count_targets(a->n_targets, a->labels, N, m->pad_id, m->stream);
        cuda_crossentropy_forward_backward(a->losses, a->correct, a->dlogits, a->logits, a->labels, a->n_targets, N,
                                           V, m->pad_id, m->stream);
        cuda_loss_reduce(a->scalars, a->losses, a->correct, a->n_targets, N, m->stream);
    }
    nvtxRangePop();
}

static void backward_impl(CudaModel *m) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    const ParamTensors *g = &m->g;
    int B = m->B, T = c->max_seq, C = c->d_model, H = c->n_heads, F = c->d_ff, V = c->vocab, L = c->n_layers;
    int hs = C / H, BH = B * H;
    size_t BT = (size_t)B * T, maxBT = (size_t)m->max_B * T, BHTT = (size_t)BH * T * T;
    int N = (int)BT;
    float ds = m->drop_scale;
    float att_scale = 1.0f / sqrtf((float)hs);
    long long sT = (long long)T * hs, sTT = (long long)T * T;
    int fused_att = cuda_attention_fused_fits(T, C, H);  // as the forward
    char name[64];

    nvtxRangePushA("backward");
    // Weight gradients are overwritten by their one product; biases, LayerNorm and the embedding accumulate.
    CUDA_CHECK(cudaMemsetAsync(m->grads, 0, m->n_params * sizeof(float), m->stream));
    // dlogits = (softmax - onehot) / n_targets was written by the forward's fused cross-entropy.
    linear_backward(m, a->dln, g->gen_w, g->gen_b, a->dlogits, a->lnf, p->gen_w, N, C, V);
    const float *x_last = a->res2 + (size_t)(L - 1) * maxBT * C;  // input of the final LayerNorm
    CUDA_CHECK(cudaMemsetAsync(a->dres, 0, BT * C * sizeof(float), m->stream));
    cuda_layernorm_backward(a->dres, g->lnf_w, g->lnf_b, a->dln, x_last, p->lnf_w, a->lnf_mean, a->lnf_rstd, N, C,
                            a->scratch, m->stream);

    for (int l = L - 1; l >= 0; l--) {
        snprintf(name, sizeof(name), "backward layer %d", l);
        nvtxRangePushA(name);
        size_t lc = (size_t)l * C;
        const float *x = l > 0 ? a->res2 + (size_t)(l - 1) * maxBT * C : a->encoded;  // layer input
        const float *ln1 = a->ln1 + l * maxBT * C, *ln1_mean = a->ln1_mean + l * maxBT, *ln1_rstd = a->ln1_rstd + l * maxBT;
        const float *qkv = a->qkv + l * maxBT * 3 * C;
        const float *att = a->att + l * maxBT * H * T;
        const float *atty = a->atty + l * maxBT * C;
        const float *res1 = a->res1 + l * maxBT * C;
        const float *ln2 = a->ln2 + l * maxBT * C, *ln2_mean = a->ln2_mean + l * maxBT, *ln2_rstd = a->ln2_rstd + l * maxBT;
        const float *fch = a->fch + l * maxBT * F;
        const uint8_t *keep_att = m->dropout_on ? a->keep_att + l * maxBT * H * T : NULL;
        const uint8_t *keep_res1 = m->dropout_on ? a->keep_res1 + l * maxBT * C : NULL;
        const uint8_t *keep_res2 = m->dropout_on ? a->keep_res2 + l * maxBT * C : NULL;

        // FFN block: dres is d(res2); the skip path passes it on unchanged to d(res1). dproj = d(FFN output),
        // its column sums in the ff2 bias gradient: here for the top layer, below it by the LN1 backward of the
        // layer above.
        if (l == L - 1)
            cuda_residual_dropout_backward_sums(a->dproj, a->dres, keep_res2, ds, N, C, g->ff2_b + lc, a->scratch,
                                                m->stream);
        linear_backward(m, a->dfch, g->ff2_w + (size_t)l * C * F, NULL, a->dproj, fch, p->ff2_w + (size_t)l * C * F,
                        N, F, C);
        // The ReLU/dropout backward also sums the ff1 bias gradient as it goes.
        cuda_relu_dropout_backward_sums(a->dfch, fch, ds, N, F, g->ff1_b + (size_t)l * F, a->scratch, m->stream);
        linear_backward(m, a->dln, g->ff1_w + (size_t)l * F * C, NULL, a->dfch, ln2, p->ff1_w + (size_t)l * F * C, N,
                        C, F);
        // LN2's backward also writes dproj = d(attention output) = dropout backward of d(res1), and its column
        // sums into the output projection's bias gradient.
        cuda_layernorm_backward_residual(a->dres, g->ln2_w + lc, g->ln2_b + lc, a->dln, res1, p->ln2_w + lc, ln2_mean,
                                         ln2_rstd, N, C, a->dproj, keep_res1, ds, g->out_b + lc, a->scratch,
                                         m->stream);

        // Attention block: dres is now d(res1); the skip path passes it on to d(x).
        linear_backward(m, a->datty, g->out_w + (size_t)l * C * C, NULL, a->dproj, atty,
                        p->out_w + (size_t)l * C * C, N, C, C);
        float *dqkv_b = g->qkv_b + 3 * lc;  // summed by linear_backward unless the fused kernel did it
        if (fused_att) {
            // One kernel per (batch, head) from the saved qkv (without bias) and probabilities; the qkv bias
            // gradient from its per-sequence partial sums.
            cuda_attention_backward(a->dqkv, a->scratch, a->datty, qkv, p->qkv_b + 3 * lc, att, keep_att, ds, B, T,
                                    C, H, m->stream);
            cuda_column_sums_finish(dqkv_b, a->scratch, B, 3 * C, m->stream);
            dqkv_b = NULL;
        } else {
            // Per head: dyh from the concatenated rows; Q, K, V again from the saved qkv (a cheap shuffle instead
            // of three more saved tensors per layer); the dropped probabilities again from att and the mask
            // (att * keep * scale, bit-identical to the forward's: keep is 0 or 1 and att >= 0).
            cuda_rows_to_heads(a->dyh, a->datty, B, T, C, H, m->stream);
            cuda_qkv_split_heads(a->q, a->k, a->v, qkv, B, T, C, H, m->stream);
            const float *pv = att;
            if (keep_att) {
                cuda_residual_dropout_backward(a->att_drop, att, keep_att, ds, BHTT, m->stream);
                pv = a->att_drop;
            }
            // datt[bh] = dY V^T ([T, T]); dV[bh] = P^T dY ([T, hs]).
            gemm_batched(m, CUBLAS_OP_T, CUBLAS_OP_N, T, T, hs, a->v, hs, sT, a->dyh, hs, sT, a->datt, T, sTT, BH);
            gemm_batched(m, CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, a->dyh, hs, sT, pv, T, sTT, a->dv, hs, sT, BH);
            // d scores (in place): undo the dropout, the softmax and the 1/sqrt(hs) scale.
            cuda_softmax_backward(a->datt, a->datt, att, keep_att, ds, att_scale, BH, T, m->stream);
            // dQ[bh] = dS K; dK[bh] = dS^T Q.
            gemm_batched(m, CUBLAS_OP_N, CUBLAS_OP_N, hs, T, T, a->k, hs, sT, a->datt, T, sTT, a->dq, hs, sT, BH);
            gemm_batched(m, CUBLAS_OP_N, CUBLAS_OP_T, hs, T, T, a->q, hs, sT, a->datt, T, sTT, a->dk, hs, sT, BH);
            cuda_qkv_merge_heads(a->dqkv, a->dq, a->dk, a->dv, B, T, C, H, m->stream);
        }
        linear_backward(m, a->dln, g->qkv_w + (size_t)l * 3 * C * C, dqkv_b, a->dqkv, ln1,
                        p->qkv_w + (size_t)l * 3 * C * C, N, C, 3 * C);
        if (l > 0) {  // LN1's backward also starts the FFN block of the layer below (as LN2's above)
            const uint8_t *keep_below = m->dropout_on ? a->keep_res2 + (size_t)(l - 1) * maxBT * C : NULL;
            cuda_layernorm_backward_residual(a->dres, g->ln1_w + lc, g->ln1_b + lc, a->dln, x, p->ln1_w + lc, ln1_mean,
                                             ln1_rstd, N, C, a->dproj, keep_below, ds, g->ff2_b + lc - C, a->scratch,
                                             m->stream);
        } else {
            cuda_layernorm_backward(a->dres, g->ln1_w + lc, g->ln1_b + lc, a->dln, x, p->ln1_w + lc, ln1_mean,
                                    ln1_rstd, N, C, a->scratch, m->stream);
        }
        nvtxRangePop();
    }
    cuda_embedding_backward(g->tok_emb, a->dres, a->inputs, B, T, C, V, m->stream);
    nvtxRangePop();
}

// Gradient norm into scalars[3], then clip + Adam over all parameters in one launch.
static void optimizer_impl(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr) {
    nvtxRangePushA("optimizer");
    float *d_norm = m->a.scalars + 3;
    cuda_grad_norm(d_norm, m->grads, m->n_params, m->a.norm_scratch, m->stream);
    cuda_adam_update(m->params, m->grads, m->adam_m, m->adam_v, m->decay_set ? m->decay_mask : NULL, d_norm, max_norm,
                     m->n_params, (int)oc->kind, oc->beta1, oc->beta2, oc->eps, oc->weight_decay, t, lr, m->stream);
    nvtxRangePop();
}

// Set up the state of a forward over B sequences: the dropout switch and scale.
static void begin_forward(CudaModel *m, int B, const CudaRandom *rnd, int has_labels, int pad_id) {
    m->B = B;
    m->has_labels = has_labels;
    m->pad_id = pad_id;
    m->dropout_on = rnd != NULL && rnd->dropout_p > 0.0f;
    // THE DROPOUT RULE's scale, evaluated in float as on the CPU.
    m->drop_scale = m->dropout_on ? 1.0f / (1.0f - rnd->dropout_p) : 1.0f;
    if (m->dropout_on) use_seed(m, rnd->philox_seed);
}

// Read scalars[0..n) back (one small copy) and wait for the stream.
static void read_scalars(CudaModel *m, int n, CudaStepStats *stats) {
    CUDA_CHECK(cudaMemcpyAsync(m->h_scalars, m->a.scalars, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost,
                               m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    if (!stats) return;
    stats->loss = m->h_scalars[0];
    stats->correct = (int)lrintf(m->h_scalars[1]);
    stats->n_targets = (int)lrintf(m->h_scalars[2]);
    stats->grad_norm = n > 3 ? m->h_scalars[3] : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// Public entry points.

void cuda_model_forward(CudaModel *m, const int *tokens, const int *labels, int B, int pad_id,
                        const MaskConfig *mask, const CudaRandom *rnd, CudaStepStats *stats) {
    check_batch(m, B, "cuda_model_forward");
    if (mask && !rnd) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_forward: masking needs a random stream");
    if (mask && mask->pad_id != pad_id)
        mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_forward: pad_id %d differs from the mask's [PAD] %d", pad_id,
                  mask->pad_id);
    if (mask) {
        upload_and_mask(m, tokens, B, mask, rnd);
    } else {
        upload_batch(m, m->a.inputs, tokens, labels, B);
    }
    begin_forward(m, B, rnd, mask != NULL || labels != NULL, pad_id);
    forward_impl(m, B, rnd);
    if (m->has_labels) {
        read_scalars(m, 3, stats);
    } else if (stats) {
        memset(stats, 0, sizeof(*stats));
    }
}

void cuda_model_backward(CudaModel *m) {
    if (!m->has_labels) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_backward needs a forward with labels first");
    backward_impl(m);
}

float cuda_model_optimizer_step(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr) {
    optimizer_impl(m, max_norm, oc, t, lr);
    CUDA_CHECK(cudaMemcpyAsync(m->h_scalars + 3, m->a.scalars + 3, sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    return m->h_scalars[3];
}

void cuda_model_train_step(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd,
                           float max_norm, const OptimConfig *oc, long t, double lr, CudaStepStats *stats) {
    check_batch(m, B, "cuda_model_train_step");
    if (!mask || !rnd) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_train_step needs a mask config and a random stream");
    nvtxRangePushA("train_step");
    upload_and_mask(m, tokens, B, mask, rnd);
    begin_forward(m, B, rnd, 1, mask->pad_id);
    forward_impl(m, B, rnd);
    backward_impl(m);
    optimizer_impl(m, max_norm, oc, t, lr);
    read_scalars(m, 4, stats);  // the step's only wait for the device
    nvtxRangePop();
}

void cuda_profiler_start(void) { CUDA_CHECK(cudaProfilerStart()); }
void cuda_profiler_stop(void) { CUDA_CHECK(cudaProfilerStop()); }
