// cuda_model.cu: the CUDA backend's model: parameters, gradients, Adam moments and activations resident on
// the device, the forward and backward passes composed from the op kernels of kernels.h and cuBLAS, and a
// whole training step (mask, forward, backward, clip, Adam) with one small read-back of the logged scalars.
// A step is captured once per shape as a CUDA graph and replayed (train.cuda_graph): what changes from step
// to step (Philox seed and offsets, Adam's t and lr, the batch) is uploaded by one copy into fixed device
// memory that the kernels read, and random numbers are computed inside the kernels (no cuRAND call).
// Gradient accumulation (train.accum_steps) runs a step's micro-batches as such units too (cuda_model_accumulate):
// each draws its rows' numbers of the whole batch, divides by the whole batch's targets, and adds its gradients
// to a device sum in call order; one clip + Adam on the sum follows (cuda_model_apply_accumulated).
//
// Both architectures (model.h): labml's pre-LN encoder with its fused LayerNorm kernels, and model.arch = bert
// (BertForMaskedLM: learned positions, post-LN layers whose residual adds are fused with the LayerNorm after them,
// GELU, the head transform and the decoder tied to the word embeddings, [PAD] keys masked out of attention).
// It mirrors src/cpu/cpu_model.c op for op: the same parameter layout (model_param_views), the same saved
// activations (stacked [L, max_B, T, ...] per layer, a smaller batch using a prefix of each layer's block),
// and the same random numbers: masking and dropout compute cuRAND's Philox stream inside the kernels
// (mask.cu) at the offsets of the RngLayout for the ACTUAL batch (THE DROPOUT RULE of src/cpu/ops.h), so the
// GPU masks and drops exactly the positions the CPU does.
//
// train.precision = bf16: the same forward and backward on BF16 activations with FP32 masters, moments and
// accumulations, the products through cuBLASLt (matmul.cu); what stays FP32 is listed at the templates below.
//
// Matmuls: cuBLAS is column-major; a row-major [R, K] matrix is the column-major [K, R] matrix, so every
// row-major product below is written as the column-major product of the transposes (see the helpers).
#include <cublas_v2.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <nvtx3/nvToolsExt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "mlm/bf16.h"
#include "mlm/config.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"

#include "act.cuh"
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
    DeviceStep *step;            // [1] the step's scalars (upload region: step, tokens, labels)
    int *tokens;                 // [B, T] token ids as copied from the host (before masking)
    int *inputs;                 // [B, T] model inputs (after masking)
    int *labels;                 // [B, T] original token where selected, PAD elsewhere
    float *encoded;              // [B, T, C] embedding output = residual stream entering layer 0
    float *ln1;                  // [L, B, T, C]
    float *ln1_mean, *ln1_rstd;  // [L, B, T]
    float *qkv;                  // [L, B, T, 3C]
    float *lse;                  // [L, B, H, T] log-sum-exp of each attention row (the tiled backward's softmax)
    float *atty;                 // [L, B, T, C] heads concatenated, input of the output projection
    float *res1;                 // [L, B, T, C] residual stream after the attention block
    float *ln2;                  // [L, B, T, C]
    float *ln2_mean, *ln2_rstd;  // [L, B, T]
    float *fch;                  // [L, B, T, F] dropout(ReLU(Linear1)), input of Linear2
    float *res2;                 // [L, B, T, C] residual stream after the FFN block
    // Dropout keep masks in bits (keep_bits.h: 1 bit an element, 32-bit words); a layer's slot is keep_words(B*T*C)
    // words, so each mask starts on a word and the keep kernel's threads own whole words.
    KeepWord *keep_res1;         // [L, keep_words(B*T*C)]
    KeepWord *keep_res2;         // [L, keep_words(B*T*C)]
    KeepWord *keep_hidden;       // [keep_words(B*T*F)] (scratch: the backward needs only fch)
    float *lnf;                  // [B, T, C]
    float *lnf_mean, *lnf_rstd;  // [B, T]
    float *logits;               // [B, T, V]
    float *losses;               // [B, T] per-position loss (0 where ignored)
    int *correct;                // [B, T] 1 where argmax == label on a target
    int *n_targets;              // [1]
    float *scalars;              // [4] mean loss, correct, n_targets (cuda_loss_reduce), grad norm
    // Forward scratch.
    float *proj;                 // [B, T, C] a block's output before bias, dropout and the residual add
    // Backward scratch.
    float *dlogits;              // [B, T, V] (written by the fused cross-entropy in the forward)
    float *dres;                 // [B, T, C] gradient of the residual stream, carried down the layers
    float *dln;                  // [B, T, C] gradient of a LayerNorm output
    float *dproj;                // [B, T, C]
    float *datty;                // [B, T, C]
    float *att_delta;            // [B, H, T] the attention backward's D = rowsum(dO * O)
    float *dqkv;                 // [B, T, 3C]
    float *dfch;                 // [B, T, F]
    float *scratch;              // column sums and LayerNorm weight sums
    double *norm_scratch;        // gradient norm partial sums
    // Sparse prediction (cuda_model_set_sparse_prediction): the head on the selected rows, in position order;
    // lnf, lnf_mean/rstd, logits, losses, correct and dlogits then hold sparse_cap rows.
    int *sel_rows;               // [B*T] row (b*T + t) of each selected position (device count: n_targets)
    int *sel_labels;             // [B*T] their labels (ignored past the device count)
    float *sel_x;                // [B*T, C] their rows of the last residual stream
    float *sel_dx;               // [B*T, C] gradient of sel_x
    // model.arch = bert (empty for labml; cpu_model.c's CpuActs says what each holds).
    float *emb_sum;              // [B, T, C] word + type + position
    float *emb_mean, *emb_rstd;  // [B, T]
    KeepWord *keep_emb;          // [keep_words(B*T*C)]
    float *fc_pre;               // [L, B, T, F] GELU's inputs
    float *head_pre, *head_act;  // [B, T, C] each: the head transform's dense output and GELU of it
    uint8_t *key_valid;          // [B, T] inputs != [PAD]
    float *dres2;                // [B, T, C]
    // train.precision = bf16 (empty otherwise): FP32 copies for the attention kernels, which compute in FP32.
    float *qkv32;                // [B, T, 3C] a layer's qkv
    float *atty32;               // [B, T, C] its output
    float *datty32;              // [B, T, C] the output's gradient
    float *dqkv32;               // [B, T, 3C] the gradient of qkv
} DevActs;

// Everything a captured step bakes into its launches: sizes, which kernels run, and the constants passed by
// value. A graph is replayed only for an equal key (memcmp: keys are zeroed before they are filled); what
// changes every step lives in the DeviceStep instead.
// STEP_MICRO: a micro-batch of gradient accumulation (mask, forward, backward, add to the sums; no update).
typedef enum { STEP_TRAIN = 1, STEP_FORWARD = 2, STEP_MICRO = 3 } StepKind;
typedef struct {
    int kind, B, pad_id, decay_set;
    MaskConfig mask;
    RngLayout layout;
    float dropout_p, max_norm;
    int optim_kind;
    float beta1, beta2, eps;
} StepKey;

// A key's first step runs as plain launches and is only remembered here (seen); its second step is captured and
// every later one replays the graph (step_graph says why).
typedef struct {
    StepKey key;
    int seen;              // 0: slot free
    cudaGraphExec_t exec;  // NULL until the key's second step
    uint64_t last_used;
} StepGraph;

// Full and last partial batch of training and of validation, the samples' batch, and room to spare.
enum { MAX_STEP_GRAPHS = 8 };
// cuBLAS's recommended workspace on Hopper (32 MiB; 4 MiB suffice on earlier GPUs).
enum { CUBLAS_WORKSPACE_BYTES = 32 << 20 };

struct CudaModel {
    ModelConfig cfg;
    int max_B;
    int allow_tf32;
    // train.precision = bf16: activations and their gradients in BF16 (the views of DevActs marked so carve 2-byte
    // elements), the products through cuBLASLt, and a BF16 copy of the parameters (params16, in the state
    // block) that the step computes with, made from the FP32 masters by THE ROUNDING RULE (round_seed; after
    // round_updates optimizer steps at offset round_updates * P) and rewritten by every Adam update.
    int bf16;
    void *params16;         // [P] bf16
    uint64_t round_seed, round_updates;
    CudaLt lt;
    size_t n_params;
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *cublas_workspace;  // [CUBLAS_WORKSPACE_BYTES]
    // Parameter-sized state, one allocation: params | grads | adam m | adam v | decay mask (bytes).
    void *state_block;
    float *params, *grads, *adam_m, *adam_v;
    uint8_t *decay_mask;
    size_t moments_lo, moments_len;  // the moments cover parameters [lo, lo + len): all P, or a ZeRO-1 shard
    int decay_set;          // decay_mask holds a mask (else AdamW decays nothing)
    ParamTensors p, g;      // device views
    void *act_block;
    size_t act_bytes;
    DevActs a;
    // Host side: pinned staging of the upload region (the layout of the device's: upload_offsets) and the
    // scalar read-back.
    char *h_upload;         // DeviceStep | tokens [max_B, T] | labels [max_B, T]
    DeviceStep *h_step;
    int *h_tokens, *h_labels;
    float *h_scalars;       // [4]
    cudaEvent_t stage_free; // recorded after the last upload from h_upload
    // Captured steps (train.cuda_graph): one executable graph per StepKey, replayed every step.
    int use_graphs;
    StepGraph graphs[MAX_STEP_GRAPHS];
    uint64_t graph_clock;   // counts lookups, for replacing the least recently used graph
    unsigned char *continuation;  // [V] whole-word masking's continuation flags (cuda_model_set_continuation), or NULL
    // State of the last forward, used by the backward.
    int B;
    int has_labels;
    int pad_id;             // the ignored label of the last forward (the vocabulary's [PAD])
    int dropout_on;
    float drop_scale;
    float drop_p;           // dropout_on: the probability, and where its draws lie in a step, for the attention
    RngLayout drop_layout;  // backward, which regenerates the forward's attention dropout
    // Gradient accumulation (cuda_model_accumulate): the sums, allocated on first use.
    void *accum_block;      // grad_acc | acc_stats
    float *grad_acc;        // [P] the running sum of the micro-batches' gradients
    double *acc_stats;      // [3] sums of loss x targets, correct predictions, targets (the device's counts)
    double *h_acc_stats;    // [3] pinned read-back of acc_stats
    int accum_last;         // the last forward was a micro-batch: dlogits divide by the step's norm_targets
    int accum_norm;         // the whole batch's target count of the current step (host copy)
    long accum_sparse_cap;  // sum of the host's sparse row counts over the step's micro-batches
    int accum_sparse;       // some micro-batch of the step took the sparse head
    // Sparse prediction (see sparse_plan).
    int sparse;             // on: forwards with labels run the head on the selected rows only
    int sparse_last;        // the last forward did
    int sparse_cap;         // rows of its head: the host's exact count of selected positions
    // cuBLAS products (sgemm): no operand of one call spans more than gemm_max_elems elements. gemm_recording: the
    // calls are counted (gemm_log_n) and the first gemm_log_cap written to gemm_log instead of made
    // (cuda_model_linear_gemms).
    size_t gemm_max_elems;
    int gemm_recording;
    CudaGemmCall *gemm_log;
    int gemm_log_n, gemm_log_cap;
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
// An activation tensor of n elements of es bytes (4, or 2 in BF16), viewed as float * until act<X> re-types it.
static float *carve_x(Carver *cv, size_t n, size_t es) { return (float *)carve(cv, n * es); }
static int *carve_i(Carver *cv, size_t n) { return (int *)carve(cv, n * sizeof(int)); }
static uint8_t *carve_b(Carver *cv, size_t n) { return (uint8_t *)carve(cv, n); }
// `masks` dropout keep masks of n elements each, each on its own words (keep_bits.h).
static KeepWord *carve_keep(Carver *cv, size_t masks, size_t n) {
    return (KeepWord *)carve(cv, masks * keep_words(n) * sizeof(KeepWord));
}

// Largest scratch the reduction kernels ask for over every batch size this model runs.
static size_t scratch_floats(const ModelConfig *c, int max_B) {
    size_t most = 0;
    int ocs[4] = {3 * c->d_model, c->d_model, c->d_ff, c->vocab};
    for (int b = 1; b <= max_B; b++) {
        int N = b * c->max_seq;
        for (int i = 0; i < 4; i++) most = MLM_MAX(most, cuda_column_sums_scratch(N, ocs[i]));
        most = MLM_MAX(most, cuda_layernorm_backward_scratch(N, c->d_model));
        most = MLM_MAX(most, cuda_attention_bias_scratch(b, c->d_model));  // the attention's bias partials
    }
    return MLM_MAX(most, (size_t)1);
}

// The upload region, laid out alike in pinned host memory and on the device so that one copy moves a step's
// scalars and its batch: DeviceStep, tokens [maxBT], labels [maxBT], each on a 256-byte boundary. Returns
// its size.
enum { STEP_HEADER_BYTES = 256 };
static size_t upload_offsets(size_t maxBT, size_t *tokens_at, size_t *labels_at) {
    static_assert(sizeof(DeviceStep) <= STEP_HEADER_BYTES, "DeviceStep outgrew its header");
    size_t tok_bytes = (maxBT * sizeof(int) + 255) & ~(size_t)255;
    *tokens_at = STEP_HEADER_BYTES;
    *labels_at = STEP_HEADER_BYTES + tok_bytes;
    return *labels_at + maxBT * sizeof(int);
}

// es: bytes of an activation element (sizeof(float), or 2 in BF16).
static void carve_acts(DevActs *a, const ModelConfig *c, int max_B, size_t n_params, size_t es, Carver *cv) {
    size_t B = max_B, T = c->max_seq, C = c->d_model, H = c->n_heads, L = c->n_layers, F = c->d_ff, V = c->vocab;
    size_t BT = B * T;
    a->pe = carve_f(cv, T * C);
    size_t tokens_at, labels_at;
    char *up = (char *)carve(cv, upload_offsets(BT, &tokens_at, &labels_at));
    a->step = (DeviceStep *)up;
    a->tokens = up ? (int *)(up + tokens_at) : NULL;
    a->labels = up ? (int *)(up + labels_at) : NULL;
    a->inputs = carve_i(cv, BT);
    a->encoded = carve_x(cv, BT * C, es);
    a->ln1 = carve_x(cv, L * BT * C, es);
    a->ln1_mean = carve_f(cv, L * BT);
    a->ln1_rstd = carve_f(cv, L * BT);
    a->qkv = carve_x(cv, L * BT * 3 * C, es);
    a->lse = carve_f(cv, L * BT * H);
    a->atty = carve_x(cv, L * BT * C, es);
    a->res1 = carve_x(cv, L * BT * C, es);
    a->ln2 = carve_x(cv, L * BT * C, es);
    a->ln2_mean = carve_f(cv, L * BT);
    a->ln2_rstd = carve_f(cv, L * BT);
    a->fch = carve_x(cv, L * BT * F, es);
    a->res2 = carve_x(cv, L * BT * C, es);
    a->keep_res1 = carve_keep(cv, L, BT * C);
    a->keep_res2 = carve_keep(cv, L, BT * C);
    a->keep_hidden = carve_keep(cv, 1, BT * F);
    a->lnf = carve_x(cv, BT * C, es);
    a->lnf_mean = carve_f(cv, BT);
    a->lnf_rstd = carve_f(cv, BT);
    a->logits = carve_x(cv, BT * V, es);
    a->losses = carve_f(cv, BT);
    a->correct = carve_i(cv, BT);
    a->n_targets = carve_i(cv, 1);
    a->scalars = carve_f(cv, 4);
    a->proj = carve_x(cv, BT * C, es);
    a->dlogits = carve_x(cv, BT * V, es);
    a->dres = carve_x(cv, BT * C, es);
    a->dln = carve_x(cv, BT * C, es);
    a->dproj = carve_x(cv, BT * C, es);
    a->datty = carve_x(cv, BT * C, es);
    a->att_delta = carve_f(cv, cuda_attention_delta_scratch((int)B, (int)T, (int)H));
    a->dqkv = carve_x(cv, BT * 3 * C, es);
    a->dfch = carve_x(cv, BT * F, es);
    a->scratch = carve_f(cv, scratch_floats(c, max_B));
    a->norm_scratch = (double *)carve(cv, MLM_MAX(cuda_grad_norm_scratch(n_params), (size_t)1) * sizeof(double));
    a->sel_rows = carve_i(cv, BT);
    a->sel_labels = carve_i(cv, BT);
    a->sel_x = carve_x(cv, BT * C, es);
    a->sel_dx = carve_x(cv, BT * C, es);
    size_t BTb = c->arch == MODEL_ARCH_BERT ? BT : 0;
    a->emb_sum = carve_x(cv, BTb * C, es);
    a->emb_mean = carve_f(cv, BTb);
    a->emb_rstd = carve_f(cv, BTb);
    a->keep_emb = carve_keep(cv, 1, BTb * C);
    a->fc_pre = carve_x(cv, L * BTb * F, es);
    a->head_pre = carve_x(cv, BTb * C, es);
    a->head_act = carve_x(cv, BTb * C, es);
    a->key_valid = carve_b(cv, BTb);
    a->dres2 = carve_x(cv, BTb * C, es);
    size_t BTh = es == 2 ? BT : 0;
    a->qkv32 = carve_f(cv, BTh * 3 * C);
    a->atty32 = carve_f(cv, BTh * C);
    a->datty32 = carve_f(cv, BTh * C);
    a->dqkv32 = carve_f(cv, BTh * 3 * C);
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

// Once per process: the uniforms the kernels compute (mask.cu's Philox) around a thread-row boundary of
// cuRAND's Philox layout (4 x 65,536 outputs per row: philox_cpu.h) must equal the CPU reproduction bit for
// bit, or the GPU would mask and drop other positions than the CPU (and a run could not move between the
// backends). Cheap: one launch of 64 numbers.
static void check_device_philox(cudaStream_t stream) {
    static int checked = 0;
    if (checked) return;
    enum { SAMPLE = 64 };
    const uint64_t seed = 0x5eed5eed12345ull;
    // From 33 before the boundary (not a multiple of 4) to 31 past it.
    const uint64_t offset = (uint64_t)CURAND_PHILOX_THREADS * 4 - 33;
    float dev[SAMPLE], cpu[SAMPLE], *d_u = NULL;
    CUDA_CHECK(cudaMalloc(&d_u, SAMPLE * sizeof(float)));
    cuda_philox_uniform(d_u, seed, offset, SAMPLE, stream);
    CUDA_CHECK(cudaMemcpyAsync(dev, d_u, sizeof(dev), cudaMemcpyDeviceToHost, stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    CUDA_CHECK(cudaFree(d_u));
    philox_uniform(seed, offset, cpu, SAMPLE);
    for (int i = 0; i < SAMPLE; i++) {
        if (memcmp(&dev[i], &cpu[i], sizeof(float)) != 0) {
            mlm_fatal(MLM_EXIT_FAILURE,
                      "the device's Philox (src/kernels/mask.cu) differs from mlm's CPU reproduction of cuRAND's "
                      "stream: at offset %llu the device gives %.9g, the CPU %.9g. GPU masks and dropout would not "
                      "match the CPU backend; train with --device cpu and report the GPU and CUDA version",
                      (unsigned long long)(offset + (uint64_t)i), dev[i], cpu[i]);
        }
    }
    checked = 1;
}

// The state block's tensors (params | grads | adam m | adam v | decay mask | BF16 copy) at `base`, or (base NULL) only
// its size. The copy (train.precision = bf16) is the parameters the step computes with, made from the FP32 masters.
static size_t carve_state(CudaModel *m, void *base) {
    size_t P = m->n_params, M = m->moments_len;
    Carver cv = {(char *)base, 0};
    float *params = carve_f(&cv, P), *grads = carve_f(&cv, P), *adam_m = carve_f(&cv, M), *adam_v = carve_f(&cv, M);
    uint8_t *decay = carve_b(&cv, P);
    void *params16 = carve(&cv, m->bf16 ? P * sizeof(uint16_t) : 0);
    if (base) {
        m->params = params, m->grads = grads, m->adam_m = adam_m, m->adam_v = adam_v, m->decay_mask = decay;
        m->params16 = m->bf16 ? params16 : NULL;  // (a carve of 0 bytes still returns a pointer)
        model_param_views(&m->cfg, m->params, &m->p);
        model_param_views(&m->cfg, m->grads, &m->g);
    }
    return cv.used;
}

static size_t act_elem_bytes(const CudaModel *m) { return m->bf16 ? sizeof(uint16_t) : sizeof(float); }

static size_t accumulation_bytes(size_t P) { return ((P * sizeof(float) + 255) & ~(size_t)255) + 3 * sizeof(double); }

void cuda_model_memory_plan(const ModelConfig *cfg, int max_B, int precision, int accumulate, int whole_word,
                            CudaMemoryPlan *plan) {
    memset(plan, 0, sizeof(*plan));
    size_t P = model_num_params(cfg);
    CudaModel shape;  // counting only: the sizes carve_state and carve_acts read
    memset(&shape, 0, sizeof(shape));
    shape.cfg = *cfg;
    shape.n_params = P;
    shape.moments_len = P;  // every parameter's moments (a ZeRO-1 rank keeps a shard of them)
    shape.bf16 = precision == PRECISION_BF16;
    plan->params = P * sizeof(float);
    plan->params16 = shape.bf16 ? P * sizeof(uint16_t) : 0;
    plan->grads = P * sizeof(float);
    plan->adam = 2 * P * sizeof(float);
    plan->state_alloc = carve_state(&shape, NULL);
    Carver acv = {NULL, 0};
    carve_acts(&shape.a, cfg, max_B, P, act_elem_bytes(&shape), &acv);
    plan->activations = acv.used;
    plan->workspace = CUBLAS_WORKSPACE_BYTES;
    plan->accumulation = accumulate ? accumulation_bytes(P) : 0;
    plan->other = whole_word ? (size_t)cfg->vocab : 0;
    plan->precision = precision;
    plan->total = plan->state_alloc + plan->activations + plan->workspace + plan->accumulation + plan->other;
}

CudaModel *cuda_model_create(const ModelConfig *cfg, int max_B, int precision) {
    char err[256];
    if (model_config_check(cfg, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    if (max_B < 1) mlm_fatal(MLM_EXIT_USAGE, "batch size %d must be >= 1", max_B);
    if (!cuda_attention_supported(cfg->d_model, cfg->n_heads))
        mlm_fatal(MLM_EXIT_USAGE, "the CUDA attention kernels take head sizes (model.d_model / model.n_heads) up to "
                  "128, and d_model %d with %d heads is %d: use more heads or --device cpu", cfg->d_model,
                  cfg->n_heads, cfg->d_model / cfg->n_heads);
    if (cuda_device_count(err, sizeof(err)) == 0) mlm_fatal(MLM_EXIT_FAILURE, "CUDA model: %s", err);
    CudaModel *m = (CudaModel *)mlm_calloc(1, sizeof(CudaModel), "CUDA model");
    m->cfg = *cfg;
    m->max_B = max_B;
    m->allow_tf32 = precision == PRECISION_TF32;
    m->bf16 = precision == PRECISION_BF16;
    m->n_params = model_num_params(cfg);
    size_t P = m->n_params;

    CUDA_CHECK(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&m->cublas));
    CUBLAS_CHECK(cublasSetStream(m->cublas, m->stream));
    CUBLAS_CHECK(cublasSetMathMode(m->cublas, m->allow_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    // A workspace of our own (after cublasSetStream, which resets it): captured and plain products then see the
    // same workspace, so cuBLAS picks the same algorithms with and without graphs.
    m->cublas_workspace = device_alloc(CUBLAS_WORKSPACE_BYTES, "the cuBLAS workspace", cfg, max_B);
    CUBLAS_CHECK(cublasSetWorkspace(m->cublas, m->cublas_workspace, CUBLAS_WORKSPACE_BYTES));
    // cuBLASLt (the BF16 products) shares it: both run on the model's one stream, one product at a time.
    if (m->bf16) cuda_lt_create(&m->lt, m->cublas_workspace, CUBLAS_WORKSPACE_BYTES, 0);
    check_device_philox(m->stream);
    m->use_graphs = 1;
    cuda_model_set_gemm_limit(m, (size_t)INT_MAX);
    // A weight matrix is one operand of every product that reads it, never split: it must fit the 32-bit API.
    size_t C = (size_t)cfg->d_model, widest = MLM_MAX(MLM_MAX((size_t)cfg->vocab, (size_t)cfg->d_ff), 3 * C);
    if (widest * C > (size_t)INT_MAX)
        mlm_fatal(MLM_EXIT_USAGE, "a weight matrix of %zu x %zu elements exceeds cuBLAS's 32-bit sizes (2^31 - 1); "
                  "shrink model.d_model, model.d_ff or the vocabulary, or train with --device cpu", widest, C);

    // Parameters, gradients, Adam moments and the weight-decay mask.
    m->moments_len = P;
    size_t state_bytes = carve_state(m, NULL);
    m->state_block = device_alloc(state_bytes, "parameters, gradients and Adam moments", cfg, max_B);
    carve_state(m, m->state_block);
    CUDA_CHECK(cudaMemsetAsync(m->state_block, 0, state_bytes, m->stream));

    // Activations.
    Carver acount = {NULL, 0};
    carve_acts(&m->a, cfg, max_B, P, act_elem_bytes(m), &acount);
    char what[160];
    snprintf(what, sizeof(what), "activations of a batch of %d x %d tokens", max_B, cfg->max_seq);
    m->act_block = device_alloc(acount.used, what, cfg, max_B);
    m->act_bytes = acount.used;
    Carver acv = {(char *)m->act_block, 0};
    carve_acts(&m->a, cfg, max_B, P, act_elem_bytes(m), &acv);
    // Zeroed once: the masks and scratch start defined (compute-sanitizer initcheck stays quiet).
    CUDA_CHECK(cudaMemsetAsync(m->act_block, 0, m->act_bytes, m->stream));

    // Host staging (pinned, so the uploads are truly asynchronous) and the positional table.
    size_t BT = (size_t)max_B * cfg->max_seq, tokens_at, labels_at;
    size_t up_bytes = upload_offsets(BT, &tokens_at, &labels_at);
    CUDA_CHECK(cudaMallocHost((void **)&m->h_upload, up_bytes));
    memset(m->h_upload, 0, up_bytes);
    m->h_step = (DeviceStep *)m->h_upload;
    m->h_tokens = (int *)(m->h_upload + tokens_at);
    m->h_labels = (int *)(m->h_upload + labels_at);
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
    for (int i = 0; i < MAX_STEP_GRAPHS; i++)
        if (m->graphs[i].exec) CUDA_CHECK(cudaGraphExecDestroy(m->graphs[i].exec));
    CUDA_CHECK(cudaFreeHost(m->h_upload));
    CUDA_CHECK(cudaFreeHost(m->h_scalars));
    CUDA_CHECK(cudaFree(m->continuation));
    CUDA_CHECK(cudaFree(m->accum_block));
    if (m->h_acc_stats) CUDA_CHECK(cudaFreeHost(m->h_acc_stats));
    CUDA_CHECK(cudaEventDestroy(m->stage_free));
    if (m->bf16) cuda_lt_destroy(&m->lt);
    CUBLAS_CHECK(cublasDestroy(m->cublas));
    CUDA_CHECK(cudaFree(m->cublas_workspace));
    CUDA_CHECK(cudaStreamDestroy(m->stream));
    free(m);
}

size_t cuda_model_num_params(const CudaModel *m) { return m->n_params; }

void cuda_model_set_graphs(CudaModel *m, int on) { m->use_graphs = on != 0; }

// ---------------------------------------------------------------------------------------------------------
// Host <-> device copies (outside training steps; each waits for the stream).

static void copy_sync(CudaModel *m, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
}

static void activations_to_host(CudaModel *m, float *dst, const float *src, size_t n);  // below

// train.precision = bf16: the copy of the masters the step computes with (THE ROUNDING RULE at the model's offset).
static void round_params(CudaModel *m) {
    if (!m->bf16) return;
    cuda_bf16_stochastic_round((uint16_t *)m->params16, m->params, m->n_params, m->round_seed,
                               m->round_updates * m->n_params, m->stream);
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
}

void cuda_model_set_params(CudaModel *m, const float *params) {
    copy_sync(m, m->params, params, m->n_params * sizeof(float), cudaMemcpyHostToDevice);
    round_params(m);
}

void cuda_model_set_bf16_rounding(CudaModel *m, uint64_t round_seed, uint64_t updates_done) {
    m->round_seed = round_seed;
    m->round_updates = updates_done;
    round_params(m);
}

void cuda_model_get_params16(CudaModel *m, float *values) {
    if (!m->bf16) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_get_params16: the model is not train.precision = bf16");
    activations_to_host(m, values, (const float *)m->params16, m->n_params);
}
void cuda_model_get_params(CudaModel *m, float *params) {
    copy_sync(m, params, m->params, m->n_params * sizeof(float), cudaMemcpyDeviceToHost);
}
void cuda_model_get_grads(CudaModel *m, float *grads) {
    copy_sync(m, grads, m->grads, m->n_params * sizeof(float), cudaMemcpyDeviceToHost);
}
void cuda_model_set_adam(CudaModel *m, const float *adam_m, const float *adam_v) {
    copy_sync(m, m->adam_m, adam_m, m->moments_len * sizeof(float), cudaMemcpyHostToDevice);
    copy_sync(m, m->adam_v, adam_v, m->moments_len * sizeof(float), cudaMemcpyHostToDevice);
}
void cuda_model_get_adam(CudaModel *m, float *adam_m, float *adam_v) {
    copy_sync(m, adam_m, m->adam_m, m->moments_len * sizeof(float), cudaMemcpyDeviceToHost);
    copy_sync(m, adam_v, m->adam_v, m->moments_len * sizeof(float), cudaMemcpyDeviceToHost);
}

void cuda_model_shard_moments(CudaModel *m, size_t lo, size_t len) {
    if (lo + len > m->n_params || len == 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_shard_moments: parameters %zu..%zu of %zu", lo, lo + len, m->n_params);
    void *old = m->state_block;
    float *old_params = m->params, *old_grads = m->grads;
    uint8_t *old_decay = m->decay_mask;
    m->moments_lo = lo;
    m->moments_len = len;
    size_t bytes = carve_state(m, NULL);
    m->state_block = device_alloc(bytes, "parameters, gradients and a shard of the Adam moments", &m->cfg, m->max_B);
    carve_state(m, m->state_block);
    CUDA_CHECK(cudaMemsetAsync(m->state_block, 0, bytes, m->stream));
    size_t P = m->n_params;
    CUDA_CHECK(cudaMemcpyAsync(m->params, old_params, P * sizeof(float), cudaMemcpyDeviceToDevice, m->stream));
    CUDA_CHECK(cudaMemcpyAsync(m->grads, old_grads, P * sizeof(float), cudaMemcpyDeviceToDevice, m->stream));
    CUDA_CHECK(cudaMemcpyAsync(m->decay_mask, old_decay, P, cudaMemcpyDeviceToDevice, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    CUDA_CHECK(cudaFree(old));
}

float *cuda_model_params_device(CudaModel *m) { return m->params; }
void cuda_model_set_decay_mask(CudaModel *m, const uint8_t *decay_mask) {
    m->decay_set = decay_mask != NULL;
    if (decay_mask) copy_sync(m, m->decay_mask, decay_mask, m->n_params, cudaMemcpyHostToDevice);
}
void cuda_model_set_continuation(CudaModel *m, const unsigned char *flags) {
    if (!m->continuation) CUDA_CHECK(cudaMalloc(&m->continuation, (size_t)m->cfg.vocab));
    copy_sync(m, m->continuation, flags, (size_t)m->cfg.vocab, cudaMemcpyHostToDevice);
}

static void check_batch(const CudaModel *m, int B, const char *what) {
    if (B < 1 || B > m->max_B)
        mlm_fatal(MLM_EXIT_FAILURE, "%s: batch of %d sequences (this model holds 1..%d)", what, B, m->max_B);
}

static void sparse_logits_to_host(CudaModel *m, float *logits, int B);  // sparse prediction, below

void cuda_model_get_logits(CudaModel *m, float *logits, int B) {
    check_batch(m, B, "cuda_model_get_logits");
    if (m->sparse_last) {
        sparse_logits_to_host(m, logits, B);
        return;
    }
    activations_to_host(m, logits, m->a.logits, (size_t)B * m->cfg.max_seq * m->cfg.vocab);
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
//
// More than 2^31 elements (issue 21, item 4). cublasSgemm takes sizes and leading dimensions as int, and GEMMs
// whose operands span 2^31 elements or more have failed on real GPUs (illegal addresses in cuBLAS's gemv/gemm,
// PyTorch #17897; a cuBLASLt 13.6 algorithm at exactly 2^31, RAFT #3097), while the classifier's logits
// [B*T, V] pass 2^31 at T 512, V 30,522 from B 138 on, which an H200 holds. So no call is made with an operand
// of more than m->gemm_max_elems elements (INT_MAX; cuda_model_set_gemm_limit lowers it for the tests): a
// product over N rows runs as blocks of rows, each block's operands addressed by element offsets computed
// here in size_t. Rows are independent in the forward and in dinp, so a block computes exactly the rows the
// whole product would (the same bits where cuBLAS picks the same kernel for both shapes: always on tests/emu);
// dw sums over the rows, so the blocks add into it in order (beta 1 after the first): a different summation
// order, within float rounding of the whole product. The kernels that index the logits and dlogits do it in
// 64 bits (cuda_add_bias: size_t n and i; the cross-entropy: size_t row * V; the column sums: (size_t)r * C;
// cuda_model_get_logits: size_t), one block per row keeps every grid below 2^31, and the scratch of the
// column sums is N / 64 x V (54 M floats at B 224, T 512).
//
// Why the small tests cover the real case: test_gpu_model part 7 lowers the limit so that every product of a
// small model (the classifier included) takes the block loop below, forward and backward, dense and sparse,
// and checks it against the unsplit products on tests/emu (bit for bit where rows are independent); at the
// real shapes only the numbers in this loop change, and part 7 also runs the loop itself without a device
// (cuda_model_linear_gemms) at T 512, V 30,522 for B 137 to 224, 300 and 512, and at V 250,002: every call's int
// arguments are the exact values, every operand spans at most INT_MAX elements, the blocks tile the rows, and the
// offsets are the exact products in 64 bits where they pass 2^31.

static const float ONE = 1.0f, ZERO = 0.0f;

// One cublasSgemm on operands that start a_off, b_off, c_off elements into A, B and C; or, when the model only
// records (cuda_model_linear_gemms), the call's arguments instead (no device, no pointer arithmetic).
static void sgemm(CudaModel *m, cublasOperation_t ta, cublasOperation_t tb, int M, int N, int K, const float *A,
                  size_t a_off, int lda, const float *B, size_t b_off, int ldb, const float *beta, float *C,
                  size_t c_off, int ldc) {
    if (m->gemm_recording) {
        if (m->gemm_log && m->gemm_log_n < m->gemm_log_cap) {
            CudaGemmCall *g = &m->gemm_log[m->gemm_log_n];
            g->transa = ta == CUBLAS_OP_T, g->transb = tb == CUBLAS_OP_T;
            g->m = M, g->n = N, g->k = K, g->lda = lda, g->ldb = ldb, g->ldc = ldc;
            g->a_offset = a_off, g->b_offset = b_off, g->c_offset = c_off;
            g->beta = *beta;
        }
        m->gemm_log_n++;
        return;
    }
    CUBLAS_CHECK(cublasSgemm(m->cublas, ta, tb, M, N, K, &ONE, A + a_off, lda, B + b_off, ldb, beta, C + c_off, ldc));
}

// Rows per call of a product whose row-split operands are [N, IC] and [N, OC]: as many as keep both within the
// limit (at least one).
static long gemm_rows_per_call(const CudaModel *m, int IC, int OC) {
    size_t rows = m->gemm_max_elems / (size_t)MLM_MAX(IC, OC);
    return (long)MLM_MIN(MLM_MAX(rows, (size_t)1), (size_t)INT_MAX);
}

// out[N, OC] = inp[N, IC] w[OC, IC]^T. Column-major, out is [OC, N], inp is [IC, N] and w is [IC, OC], so
// out = op_T(w) inp; a block of rows is a block of columns of out and inp.
static void matmul_forward(CudaModel *m, float *out, const float *inp, const float *w, const float *gemm_bias, int N,
                           int IC, int OC) {
    if (gemm_bias) mlm_fatal(MLM_EXIT_FAILURE, "matmul_forward: the FP32 products add no bias (the next kernel does)");
    long step = gemm_rows_per_call(m, IC, OC);
    for (long r0 = 0; r0 < N; r0 += step) {
        int rows = (int)MLM_MIN(step, N - r0);
        sgemm(m, CUBLAS_OP_T, CUBLAS_OP_N, OC, rows, IC, w, 0, IC, inp, (size_t)r0 * IC, IC, &ZERO, out,
              (size_t)r0 * OC, OC);
    }
}

// dinp[N, IC] = dout[N, OC] w[OC, IC] (skipped when dinp is NULL); dw[OC, IC] = dout^T inp (overwritten: each
// weight receives one product per backward, its row blocks added in order); db[OC] += column sums of dout
// (skipped when db is NULL). dinp = beta dinp + dout w: beta 0 overwrites, beta 1 adds (a post-LN sublayer's input
// gradient added to the skip path's, model.arch = bert).
static void linear_backward_beta(CudaModel *m, float *dinp, const float *beta, float *dw, float *db, const float *dout,
                                 const float *inp, const float *w, int N, int IC, int OC) {
    long step = gemm_rows_per_call(m, IC, OC);
    for (long r0 = 0; dinp && r0 < N; r0 += step) {
        int rows = (int)MLM_MIN(step, N - r0);
        sgemm(m, CUBLAS_OP_N, CUBLAS_OP_N, IC, rows, OC, w, 0, IC, dout, (size_t)r0 * OC, OC, beta, dinp,
              (size_t)r0 * IC, IC);
    }
    for (long r0 = 0; r0 < N; r0 += step) {
        int rows = (int)MLM_MIN(step, N - r0);
        sgemm(m, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, rows, inp, (size_t)r0 * IC, IC, dout, (size_t)r0 * OC, OC,
              r0 == 0 ? &ZERO : &ONE, dw, 0, IC);
    }
    if (db) cuda_column_sums_accumulate(db, dout, N, OC, m->a.scratch, m->stream);
}
static void linear_backward(CudaModel *m, float *dinp, float *dw, float *db, const float *dout, const float *inp,
                            const float *w, int N, int IC, int OC) {
    linear_backward_beta(m, dinp, &ZERO, dw, db, dout, inp, w, N, IC, OC);
}
// linear_backward with dinp += dout w instead of = (cuBLAS beta 1): a post-LN sublayer's input gradient added to
// the skip path's (model.arch = bert).
static void linear_backward_acc(CudaModel *m, float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                const float *w, int N, int IC, int OC) {
    linear_backward_beta(m, dinp, &ONE, dw, db, dout, inp, w, N, IC, OC);
}

// The same products on BF16 operands through cuBLASLt (matmul.cu: FP32 accumulation), in the same blocks of rows:
// out and dinp BF16 (rounded once, bias included by the epilogue), dw FP32 (its row blocks accumulated in FP32).
static void matmul_forward(CudaModel *m, bf16 *out, const bf16 *inp, const bf16 *w, const bf16 *bias, int N, int IC,
                           int OC) {
    long step = gemm_rows_per_call(m, IC, OC);
    for (long r0 = 0; r0 < N; r0 += step) {
        int rows = (int)MLM_MIN(step, N - r0);
        cuda_lt_linear_forward(&m->lt, out + (size_t)r0 * OC, MLM_DTYPE_BF16, inp + (size_t)r0 * IC, w, MLM_DTYPE_BF16,
                               bias, rows, IC, OC, 0.0f, m->stream);
    }
}
static void linear_backward_beta(CudaModel *m, bf16 *dinp, float beta, float *dw, float *db, const bf16 *dout,
                                 const bf16 *inp, const bf16 *w, int N, int IC, int OC) {
    long step = gemm_rows_per_call(m, IC, OC);
    for (long r0 = 0; dinp && r0 < N; r0 += step) {
        int rows = (int)MLM_MIN(step, N - r0);
        cuda_lt_linear_backward_input(&m->lt, dinp + (size_t)r0 * IC, MLM_DTYPE_BF16, dout + (size_t)r0 * OC, w,
                                      MLM_DTYPE_BF16, rows, IC, OC, beta, m->stream);
    }
    for (long r0 = 0; r0 < N; r0 += step) {
        int rows = (int)MLM_MIN(step, N - r0);
        cuda_lt_linear_backward_weight(&m->lt, dw, MLM_DTYPE_F32, dout + (size_t)r0 * OC, inp + (size_t)r0 * IC,
                                       MLM_DTYPE_BF16, rows, IC, OC, r0 == 0 ? 0.0f : 1.0f, m->stream);
    }
    if (db) cuda_column_sums_accumulate(db, dout, N, OC, m->a.scratch, m->stream);
}
static void linear_backward(CudaModel *m, bf16 *dinp, float *dw, float *db, const bf16 *dout, const bf16 *inp,
                            const bf16 *w, int N, int IC, int OC) {
    linear_backward_beta(m, dinp, 0.0f, dw, db, dout, inp, w, N, IC, OC);
}
static void linear_backward_acc(CudaModel *m, bf16 *dinp, float *dw, float *db, const bf16 *dout, const bf16 *inp,
                                const bf16 *w, int N, int IC, int OC) {
    linear_backward_beta(m, dinp, 1.0f, dw, db, dout, inp, w, N, IC, OC);
}

void cuda_model_set_gemm_limit(CudaModel *m, size_t max_elems) {
    m->gemm_max_elems = max_elems > 0 && max_elems < (size_t)INT_MAX ? max_elems : (size_t)INT_MAX;
}

int cuda_model_linear_gemms(int N, int IC, int OC, size_t max_elems, CudaGemmCall *calls, int max_calls) {
    CudaModel rec;
    memset(&rec, 0, sizeof(rec));
    cuda_model_set_gemm_limit(&rec, max_elems);
    rec.gemm_recording = 1;
    rec.gemm_log = calls;
    rec.gemm_log_cap = max_calls;
    float not_written;  // linear_backward skips dinp when it is NULL; recording never touches it
    matmul_forward(&rec, (float *)NULL, NULL, NULL, NULL, N, IC, OC);
    linear_backward(&rec, &not_written, NULL, NULL, (const float *)NULL, NULL, NULL, N, IC, OC);
    return rec.gemm_log_n;
}

// ---------------------------------------------------------------------------------------------------------
// Random numbers.

// Where a step's draws start in its stream, and where each draw sits inside the step (the RngLayout of the
// configured batch); the kernels add the two (mask.cu's step_rng_offset). rng_dropout_offset(l, s, ...) is
// s * per_step plus its value at step 0, so the in-step part is the same every step and can be captured.
// A micro-batch's rows (CudaRandom.first_row, batch_rows) reach the kernels in the DeviceStep (stage_step); each
// launch passes its region's outputs per row (T for the mask, n / B for a dropout site), and step_rng_offset
// starts first_row rows into the region, so one captured graph serves every micro-batch of a shape.
static uint64_t step_rng_base(const CudaRandom *rnd) { return rng_mask_offset(&rnd->layout, rnd->step); }
static uint64_t mask_offset_in_step(const CudaRandom *rnd) { return rng_mask_offset(&rnd->layout, 0); }
static uint64_t dropout_offset_in_step(const CudaRandom *rnd, int layer, DropSite site) {
    return rng_dropout_offset(&rnd->layout, 0, layer, site);
}

// keep[keep_words(n)] in bits for one dropout site of the actual batch (THE DROPOUT RULE), or NULL when dropout is
// off. The uniforms are computed in the keep kernel from the step's seed and offset in device memory.
static KeepWord *site_mask(CudaModel *m, const CudaRandom *rnd, KeepWord *keep, int layer, DropSite site, size_t n) {
    if (!m->dropout_on) return NULL;
    cuda_dropout_keep_philox_rows(keep, m->a.step, dropout_offset_in_step(rnd, layer, site), n / (size_t)m->B,
                                  rnd->dropout_p, n, m->stream);
    return keep;
}

// Layer l's attention dropout of the current forward (drawn inside the attention kernels), or none.
static CudaAttnDropout attention_dropout(const CudaModel *m, int layer) {
    CudaAttnDropout d = {NULL, 0, 0.0f, 1.0f};
    if (!m->dropout_on) return d;
    d.step = m->a.step;
    d.offset_in_step = rng_dropout_offset(&m->drop_layout, 0, layer, DROP_ATTN_PROBS);
    d.p = m->drop_p;
    d.scale = m->drop_scale;
    return d;
}

// The rows of a (micro-)batch of B sequences must lie inside its whole batch.
static void check_rows(const CudaRandom *rnd, int B, const char *what) {
    if (!rnd) return;
    int whole = rnd->batch_rows > 0 ? rnd->batch_rows : B;
    if (rnd->first_row < 0 || (rnd->batch_rows == 0 && rnd->first_row != 0) || rnd->first_row + B > whole)
        mlm_fatal(MLM_EXIT_FAILURE, "%s: rows %d..%d of a whole batch of %d rows (CudaRandom.first_row, batch_rows)",
                  what, rnd->first_row, rnd->first_row + B - 1, rnd->batch_rows);
}

// The host's copy of the masking uniforms u[4, n] of a (micro-)batch of n tokens, as the mask kernel draws them:
// each block starts first_row rows into its block of the whole batch (sparse_plan needs them on the host).
static void host_mask_uniforms(const CudaRandom *rnd, int T, size_t n, float *u) {
    uint64_t row0 = (uint64_t)rnd->first_row * (uint64_t)T;
    uint64_t stride = rnd->batch_rows > 0 ? (uint64_t)rnd->batch_rows * (uint64_t)T : (uint64_t)n;
    uint64_t o = rng_mask_offset(&rnd->layout, rnd->step) + row0;
    for (int k = 0; k < 4; k++) philox_uniform(rnd->philox_seed, o + (uint64_t)k * stride, u + (size_t)k * n, n);
}

// ---------------------------------------------------------------------------------------------------------
// Uploads through the pinned staging buffer.

// The previous upload may still be reading the staging buffer.
static void wait_stage(CudaModel *m) { CUDA_CHECK(cudaEventSynchronize(m->stage_free)); }

// Fill the staged DeviceStep: the random stream's seed and the step's base offset (rnd may be NULL), Adam's
// constants for step t with learning rate lr (oc may be NULL). Call after wait_stage.
static void stage_step(CudaModel *m, const CudaRandom *rnd, const OptimConfig *oc, long t, double lr) {
    DeviceStep *s = m->h_step;
    memset(s, 0, sizeof(*s));
    if (rnd) {
        s->philox_seed = rnd->philox_seed;
        s->rng_base = step_rng_base(rnd);
        s->rng_row0 = (uint64_t)rnd->first_row;
        s->rng_rows = (uint64_t)rnd->batch_rows;
    }
    if (oc) {
        s->adam = cuda_adam_step((int)oc->kind, oc->beta1, oc->beta2, oc->weight_decay, t, lr);
        s->adam.round_seed = m->round_seed;  // bf16: the copy after update t (optimizer step t, from 1)
        s->adam.round_offset = (uint64_t)t * m->n_params;
        s->t = t;
        s->lr = lr;
    }
}

// The step's one upload: the staged DeviceStep and the first n_tokens tokens (captured with the step).
static void upload_step(CudaModel *m, size_t n_tokens) {
    size_t bytes = (size_t)((char *)m->h_tokens - m->h_upload) + n_tokens * sizeof(int);
    CUDA_CHECK(cudaMemcpyAsync(m->a.step, m->h_upload, bytes, cudaMemcpyHostToDevice, m->stream));
}

// Copy tokens[B, T] (and labels, if not NULL) from the host to d_tokens / d_labels asynchronously, with the
// staged DeviceStep (outside captured steps: forwards without masking).
static void upload_batch(CudaModel *m, int *d_tokens, const int *tokens, const int *labels, int B) {
    size_t n = (size_t)B * m->cfg.max_seq;
    memcpy(m->h_tokens, tokens, n * sizeof(int));
    upload_step(m, 0);
    CUDA_CHECK(cudaMemcpyAsync(d_tokens, m->h_tokens, n * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    if (labels) {
        memcpy(m->h_labels, labels, n * sizeof(int));
        CUDA_CHECK(cudaMemcpyAsync(m->a.labels, m->h_labels, n * sizeof(int), cudaMemcpyHostToDevice, m->stream));
    }
    CUDA_CHECK(cudaEventRecord(m->stage_free, m->stream));
}

// Mask the uploaded tokens on the device with the uniforms of the step (seed and offset in m->a.step).
static void mask_on_device(CudaModel *m, int B, const MaskConfig *mask, const CudaRandom *rnd) {
    size_t n = (size_t)B * m->cfg.max_seq;
    cuda_mask_philox_rows(mask, m->continuation, m->a.tokens, n, (size_t)m->cfg.max_seq, m->a.step,
                          mask_offset_in_step(rnd), m->a.inputs, m->a.labels, m->stream);
}

// ---------------------------------------------------------------------------------------------------------
// Sparse prediction: the final LayerNorm, the classifier and the loss on the selected rows only (label !=
// PAD, about 15% of them), the gradient scattered back into the residual stream (zero elsewhere).
//
// The classifier's GEMM needs its row count on the host when it is launched, but the labels come out of the
// mask kernel on the device, and reading a count back would stall the stream in the middle of the step.
// The host therefore recomputes the selection from what it already holds (sparse_plan): the tokens, the
// same Philox uniforms (philox_uniform, the CPU reproduction that check_device_philox proved equal to the
// device generator) and the same rule (mask_apply, the host twin of the mask kernel; it follows any change of
// the rule), or the labels themselves when the caller passes them. That count is exact, not a bound; the
// device counts again (cuda_select_rows) and every kernel of the head reads the device's count, with the
// host's as the capacity (rows past the device count are zero rows with an ignored label: zero loss, zero
// gradient). The step's one read-back compares the two (sparse_check_count), so a disagreement stops the run
// instead of dropping rows. Cost on the host: 4 B T uniforms and the rule per step, microseconds.
//
// A CUDA graph fixes every launch's shape when it is captured, and this head's shape changes every step:
// a step that takes the sparse head runs as plain launches (run_step), and the head still refuses to run
// inside a capture, should one reach it.

void cuda_model_set_sparse_prediction(CudaModel *m, int on) { m->sparse = on != 0; }

// The device count dlogits divide by: the batch's own targets, or (a micro-batch of gradient accumulation) the
// whole batch's, uploaded with the step (DeviceStep.norm_targets), so that the summed gradient is its mean.
static const int *loss_divisor(const CudaModel *m) {
    return m->accum_last ? &m->a.step->norm_targets : m->a.n_targets;
}

// Decide whether the coming forward takes the sparse head, and with how many rows.
static void sparse_plan(CudaModel *m, const int *tokens, const int *labels, int B, const MaskConfig *mask,
                        const CudaRandom *rnd) {
    m->sparse_last = m->sparse && m->has_labels;
    if (!m->sparse_last) return;
    size_t n = (size_t)B * m->cfg.max_seq;
    int count = 0;
    if (mask) {
        float *u = (float *)mlm_malloc(4 * n * sizeof(float), "masking uniforms (sparse prediction)");
        int *inputs = (int *)mlm_malloc(2 * n * sizeof(int), "masked batch (sparse prediction)");
        int *sel_labels = inputs + n;
        host_mask_uniforms(rnd, m->cfg.max_seq, n, u);
        mask_apply(mask, tokens, n, u, inputs, sel_labels);
        for (size_t i = 0; i < n; i++) count += sel_labels[i] != mask->pad_id;
        free(u);
        free(inputs);
    } else {
        for (size_t i = 0; i < n; i++) count += labels[i] != m->pad_id;
    }
    m->sparse_cap = count;
}

// The device's count of the last sparse forward (read back with the step's scalars) against the host's.
static void sparse_check_count(const CudaModel *m, int device_count) {
    if (m->sparse_last && device_count != m->sparse_cap)
        mlm_fatal(MLM_EXIT_FAILURE,
                  "sparse prediction: the device selected %d positions, the host's reproduction of the masking %d; "
                  "the masking kernel and mask_apply disagree. Set train.sparse_prediction = false and report it",
                  device_count, m->sparse_cap);
}

// ---- train.precision = bf16: the tensors a step reads and writes -------------------------------------------------
// The forward and backward below are templates over the storage type X of the activations, their gradients and the
// parameter copy they compute with: float, or bf16 (act.cuh). What stays FP32 in BF16 (and where): the masters, the
// gradients of the parameters (cuBLASLt accumulates the weight gradients in FP32 and writes them FP32; the bias,
// LayerNorm and embedding gradient sums are FP32) and the Adam moments (optim.cu); LayerNorm means and rstd
// (layernorm.cu); the loss, its log-sum-exp (double) and the batch statistics (loss.cu); the gradient norm (double,
// optim.cu); the attention's scores, softmax max, sum and per-row log-sum-exp (the tiled kernels of attention.cu run
// in FP32 on FP32 copies of qkv, of its output and of the output's gradient, attention_layer_forward / _backward; the
// saved lse is FP32). Every BF16 tensor is rounded to nearest even where it is written, and the kernels go on from
// the rounded value: the CPU reference's bf16_point list. The BF16 copy of the parameters is written by the Adam
// kernel in the same pass as the masters, by THE ROUNDING RULE (stochastic, Philox stream RNG_DOMAIN_ROUND at offset
// t x P + i), so a run loaded at step t (cuda_model_set_bf16_rounding) rounds as the run it continues. Dropout masks
// are still one byte an element (bits: owed).
// The activation views of DevActs are float pointers carved with the element size of X (2 bytes in BF16): act<X>
// re-types one before any offset is taken; prm<X> maps a pointer into the FP32 masters to the same parameter in the
// BF16 copy.

template <typename X>
static X *act(float *p) {
    return (X *)(void *)p;
}
template <typename X>
static const X *act(const float *p) {
    return (const X *)(const void *)p;
}

template <typename X>
static const X *prm(const CudaModel *m, const float *master);
template <>
const float *prm<float>(const CudaModel *m, const float *master) {
    return master;
}
template <>
const bf16 *prm<bf16>(const CudaModel *m, const float *master) {
    return (const bf16 *)m->params16 + (master - m->params);
}

// A Linear's bias where the BF16 step adds it (the cuBLASLt epilogue: one rounding of product + bias, as the CPU's
// linear_forward then bf16_point) or where the FP32 step adds it (fused into the kernel after the product).
template <typename X>
static const X *gemm_bias(const CudaModel *m, const float *b) {
    return std::is_same<X, bf16>::value ? prm<X>(m, b) : (const X *)NULL;
}
template <typename X>
static const X *kernel_bias(const CudaModel *m, const float *b) {
    return std::is_same<X, bf16>::value ? (const X *)NULL : prm<X>(m, b);
}

// ---- The head's transform: rows x[n, C] of the last hidden state into a->lnf[n, C], the decoder's input (as
// cpu_model.c): labml's final LayerNorm, or BERT's cls.predictions.transform (dense -> GELU -> LayerNorm).

template <typename X>
static void head_transform_forward(CudaModel *m, const X *x, int n) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    int C = c->d_model;
    X *lnf = act<X>(a->lnf), *head_pre = act<X>(a->head_pre), *head_act = act<X>(a->head_act);
    if (c->arch != MODEL_ARCH_BERT) {
        cuda_layernorm_forward(lnf, a->lnf_mean, a->lnf_rstd, x, prm<X>(m, p->lnf_w), prm<X>(m, p->lnf_b), n, C,
                               c->ln_eps, m->stream);
        return;
    }
    matmul_forward(m, head_pre, x, prm<X>(m, p->head_w), gemm_bias<X>(m, p->head_b), n, C, C);
    cuda_bias_gelu_forward(head_pre, head_act, kernel_bias<X>(m, p->head_b), (size_t)n * C, C, m->stream);
    cuda_layernorm_forward(lnf, a->lnf_mean, a->lnf_rstd, head_act, prm<X>(m, p->head_ln_w), prm<X>(m, p->head_ln_b),
                           n, C, c->ln_eps, m->stream);
}

// dx[n, C] (overwritten) from a->dln = d lnf, and the transform's parameter gradients.
template <typename X>
static void head_transform_backward(CudaModel *m, X *dx, const X *x, int n) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p, *g = &m->g;
    int C = c->d_model;
    X *dln = act<X>(a->dln);
    if (c->arch != MODEL_ARCH_BERT) {
        CUDA_CHECK(cudaMemsetAsync(dx, 0, (size_t)n * C * sizeof(X), m->stream));
        cuda_layernorm_backward(dx, g->lnf_w, g->lnf_b, dln, x, prm<X>(m, p->lnf_w), a->lnf_mean, a->lnf_rstd, n, C,
                                a->scratch, m->stream);
        return;
    }
    X *dact = act<X>(a->dproj);  // [n, C] scratch: d head_act, then (in place) d head_pre
    CUDA_CHECK(cudaMemsetAsync(dact, 0, (size_t)n * C * sizeof(X), m->stream));
    cuda_layernorm_backward(dact, g->head_ln_w, g->head_ln_b, dln, act<X>(a->head_act), prm<X>(m, p->head_ln_w),
                            a->lnf_mean, a->lnf_rstd, n, C, a->scratch, m->stream);
    cuda_gelu_backward(dact, dact, act<X>(a->head_pre), (size_t)n * C, m->stream);
    linear_backward(m, dx, g->head_w, g->head_b, dact, x, prm<X>(m, p->head_w), n, C, C);
}

// Forward of the sparse head from the last residual stream x[N, C]: loss, accuracy and dlogits of the
// selected rows, and the scalars, as the dense head's.
template <typename X>
static void sparse_head_forward(CudaModel *m, const X *x, int N) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    int C = c->d_model, V = c->vocab, cap = m->sparse_cap;
    cudaStreamCaptureStatus capture;
    CUDA_CHECK(cudaStreamIsCapturing(m->stream, &capture));
    if (capture != cudaStreamCaptureStatusNone)
        mlm_fatal(MLM_EXIT_USAGE, "sparse prediction cannot be captured in a CUDA graph (its classifier's row count "
                  "changes every step); set train.cuda_graph = false or train.sparse_prediction = false");
    cuda_select_rows(a->sel_rows, a->n_targets, a->labels, N, m->pad_id, m->stream);
    if (cap > 0) {
        X *sel_x = act<X>(a->sel_x), *logits = act<X>(a->logits);
        cuda_gather_rows(sel_x, a->sel_labels, x, a->labels, a->sel_rows, a->n_targets, cap, C, m->pad_id, m->stream);
        head_transform_forward(m, (const X *)sel_x, cap);
        matmul_forward(m, logits, act<X>(a->lnf), prm<X>(m, p->gen_w), gemm_bias<X>(m, p->gen_b), cap, C, V);
        if (const X *b = kernel_bias<X>(m, p->gen_b)) cuda_add_bias(logits, logits, b, (size_t)cap * V, V, m->stream);
        // dlogits apart from logits, so that cuda_model_get_logits can still return them.
        cuda_crossentropy_forward_backward(a->losses, a->correct, act<X>(a->dlogits), (const X *)logits, a->sel_labels,
                                           loss_divisor(m), cap, V, m->pad_id, m->stream);
    }
    cuda_loss_reduce(a->scalars, a->losses, a->correct, a->n_targets, cap, m->stream);
}

// Backward of the sparse head: g->gen_*, g->lnf_* and a->dres[N, C] (zero on the unselected rows).
template <typename X>
static void sparse_head_backward(CudaModel *m, int N) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p, *g = &m->g;
    int C = c->d_model, V = c->vocab, cap = m->sparse_cap;
    CUDA_CHECK(cudaMemsetAsync(a->dres, 0, (size_t)N * C * sizeof(X), m->stream));
    if (cap == 0) return;  // no target: every gradient is zero, as the dense head's
    linear_backward(m, act<X>(a->dln), g->gen_w, g->gen_b, (const X *)act<X>(a->dlogits), (const X *)act<X>(a->lnf),
                    prm<X>(m, p->gen_w), cap, C, V);
    head_transform_backward(m, act<X>(a->sel_dx), (const X *)act<X>(a->sel_x), cap);
    cuda_scatter_rows(act<X>(a->dres), (const X *)act<X>(a->sel_dx), a->sel_rows, a->n_targets, cap, C, m->stream);
}

// n elements of a device tensor of the model's storage type, as floats on the host.
static void activations_to_host(CudaModel *m, float *dst, const float *src, size_t n) {
    if (!m->bf16) {
        CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
        CUDA_CHECK(cudaStreamSynchronize(m->stream));
        return;
    }
    uint16_t *bits = (uint16_t *)mlm_malloc(MLM_MAX(n, (size_t)1) * sizeof(uint16_t), "BF16 read-back");
    CUDA_CHECK(cudaMemcpyAsync(bits, src, n * sizeof(uint16_t), cudaMemcpyDeviceToHost, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    bf16_to_float_array(dst, bits, n);
    free(bits);
}

// cuda_model_get_logits after a sparse forward: logits[B, T, V] with the selected positions' rows and NaN
// in every other row (their logits were not computed).
static void sparse_logits_to_host(CudaModel *m, float *logits, int B) {
    size_t V = m->cfg.vocab, N = (size_t)B * m->cfg.max_seq, cap = (size_t)m->sparse_cap;
    int n = 0;
    int *rows = (int *)mlm_malloc(MLM_MAX(cap, (size_t)1) * sizeof(int), "selected rows");
    float *compact = (float *)mlm_malloc(MLM_MAX(cap * V, (size_t)1) * sizeof(float), "selected logits");
    CUDA_CHECK(cudaMemcpyAsync(&n, m->a.n_targets, sizeof(int), cudaMemcpyDeviceToHost, m->stream));
    if (cap > 0) CUDA_CHECK(cudaMemcpyAsync(rows, m->a.sel_rows, cap * sizeof(int), cudaMemcpyDeviceToHost, m->stream));
    activations_to_host(m, compact, m->a.logits, cap * V);  // (synchronises)
    for (size_t i = 0; i < N * V; i++) logits[i] = NAN;
    for (size_t i = 0; i < MLM_MIN((size_t)n, cap); i++)
        if ((size_t)rows[i] < N) memcpy(logits + (size_t)rows[i] * V, compact + i * V, V * sizeof(float));
    free(rows);
    free(compact);
}

// ---------------------------------------------------------------------------------------------------------
// Forward and backward (asynchronous on the model's stream; nothing here waits for the device).

// One layer's saved activations and dropout masks: its slices of the stacked [L, max_B, T, ...] tensors (as
// cpu_model.c's LayerActs).
template <typename X>
struct LayerActs {
    X *ln1, *qkv, *atty, *res1, *ln2, *fc_pre, *fch, *res2;
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd, *lse;
    KeepWord *keep_res1, *keep_res2;  // NULL in the backward when the forward had no dropout
};

template <typename X>
static LayerActs<X> layer_acts(const CudaModel *m, int l) {
    const ModelConfig *c = &m->cfg;
    const DevActs *a = &m->a;
    size_t maxBT = (size_t)m->max_B * c->max_seq, C = c->d_model, H = c->n_heads, F = c->d_ff;
    size_t rows = l * maxBT;
    LayerActs<X> y;
    y.ln1 = act<X>(a->ln1) + rows * C, y.qkv = act<X>(a->qkv) + rows * 3 * C, y.atty = act<X>(a->atty) + rows * C;
    y.res1 = act<X>(a->res1) + rows * C, y.ln2 = act<X>(a->ln2) + rows * C, y.fch = act<X>(a->fch) + rows * F;
    y.fc_pre = c->arch == MODEL_ARCH_BERT ? act<X>(a->fc_pre) + rows * F : NULL, y.res2 = act<X>(a->res2) + rows * C;
    y.ln1_mean = a->ln1_mean + rows, y.ln1_rstd = a->ln1_rstd + rows, y.ln2_mean = a->ln2_mean + rows;
    y.ln2_rstd = a->ln2_rstd + rows, y.lse = a->lse + rows * H;
    y.keep_res1 = a->keep_res1 + l * keep_words(maxBT * C), y.keep_res2 = a->keep_res2 + l * keep_words(maxBT * C);
    if (!m->dropout_on) y.keep_res1 = y.keep_res2 = NULL;
    return y;
}

// The attention core of layer l (as attention.c): atty[B, T, C] and lse[B, H, T] from qkv, tiled, its dropout drawn
// inside the kernel; [PAD] keys masked out for arch = bert. FP32: on the layer's qkv without its bias, which the
// kernels add as they load. BF16: the product already added the bias (its epilogue, one rounding, as the CPU's
// linear_forward + bf16_point); the kernels run in FP32 on an FP32 copy of qkv and the output is rounded to BF16
// once (the CPU's bf16_point on atty). The softmax max, sum and log-sum-exp stay FP32 in both.
template <typename X>
static void attention_layer_forward(CudaModel *m, int l, int B);
template <>
void attention_layer_forward<float>(CudaModel *m, int l, int B) {
    const ModelConfig *c = &m->cfg;
    const LayerActs<float> y = layer_acts<float>(m, l);
    const uint8_t *key_valid = c->arch == MODEL_ARCH_BERT ? m->a.key_valid : NULL;
    cuda_attention_forward(y.atty, y.lse, y.qkv, m->p.qkv_b + (size_t)l * 3 * c->d_model, key_valid,
                           attention_dropout(m, l), B, c->max_seq, c->d_model, c->n_heads, m->stream);
}
template <>
void attention_layer_forward<bf16>(CudaModel *m, int l, int B) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const LayerActs<bf16> y = layer_acts<bf16>(m, l);
    size_t BT = (size_t)B * c->max_seq, C = c->d_model;
    const uint8_t *key_valid = c->arch == MODEL_ARCH_BERT ? a->key_valid : NULL;
    cuda_bf16_to_float(a->qkv32, (const uint16_t *)y.qkv, BT * 3 * C, m->stream);
    cuda_attention_forward(a->atty32, y.lse, a->qkv32, NULL, key_valid, attention_dropout(m, l), B, c->max_seq,
                           c->d_model, c->n_heads, m->stream);
    cuda_bf16_round((uint16_t *)y.atty, a->atty32, BT * C, m->stream);
}

// labml's encoder: x = x + Drop(Sublayer(LN(x))), each residual add fused with the LayerNorm that reads it. Returns
// the last residual stream [B, T, C].
template <typename X>
static const X *labml_layers_forward(CudaModel *m, int B, const CudaRandom *rnd) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    int T = c->max_seq, C = c->d_model, F = c->d_ff, L = c->n_layers;
    size_t BT = (size_t)B * T, maxBT = (size_t)m->max_B * T;
    int N = (int)BT;
    float ds = m->drop_scale;
    char name[64];
    X *proj = act<X>(a->proj);
    // The embedding fused with layer 0's LN1; a later layer's LN1 is fused into the residual add before it.
    cuda_embedding_layernorm_forward(act<X>(a->encoded), act<X>(a->ln1), a->ln1_mean, a->ln1_rstd, a->inputs,
                                     prm<X>(m, p->tok_emb), a->pe, prm<X>(m, p->ln1_w), prm<X>(m, p->ln1_b), B, T, C,
                                     c->ln_eps, m->stream);
    const X *x = act<X>(a->encoded);  // [B, T, C] residual stream entering the layer
    for (int l = 0; l < L; l++) {
        snprintf(name, sizeof(name), "forward layer %d", l);
        nvtxRangePushA(name);
        size_t lc = (size_t)l * C;
        LayerActs<X> y = layer_acts<X>(m, l);  // y.ln1 with its mean and rstd was written before the layer (see above)

        // x = x + Drop(OutProj(MHA(LN1(x)))); LN1 (ln1, ln1_mean, ln1_rstd) was written by the kernel before.
        matmul_forward(m, y.qkv, y.ln1, prm<X>(m, p->qkv_w + (size_t)l * 3 * C * C), gemm_bias<X>(m, p->qkv_b + 3 * lc),
                       N, C, 3 * C);
        attention_layer_forward<X>(m, l, B);
        matmul_forward(m, proj, y.atty, prm<X>(m, p->out_w + (size_t)l * C * C), gemm_bias<X>(m, p->out_b + lc), N, C,
                       C);
        KeepWord *keep = site_mask(m, rnd, a->keep_res1 + l * keep_words(maxBT * C), l, DROP_ATTN_RESID, BT * C);
        // The residual add fused with the LN2 that reads it.
        cuda_residual_layernorm_forward(y.res1, y.ln2, y.ln2_mean, y.ln2_rstd, x, proj, kernel_bias<X>(m, p->out_b + lc),
                                        keep, ds, prm<X>(m, p->ln2_w + lc), prm<X>(m, p->ln2_b + lc), N, C, c->ln_eps,
                                        m->stream);

        // x = x + Drop(Linear2(Drop(ReLU(Linear1(LN2(x))))))
        matmul_forward(m, y.fch, y.ln2, prm<X>(m, p->ff1_w + (size_t)l * F * C), gemm_bias<X>(m, p->ff1_b + (size_t)l * F),
                       N, C, F);
        keep = site_mask(m, rnd, a->keep_hidden, l, DROP_FFN_HIDDEN, BT * F);
        cuda_bias_relu_dropout_forward(y.fch, kernel_bias<X>(m, p->ff1_b + (size_t)l * F), keep, ds, BT * F, F,
                                       m->stream);
        matmul_forward(m, proj, y.fch, prm<X>(m, p->ff2_w + (size_t)l * C * F), gemm_bias<X>(m, p->ff2_b + lc), N, F,
                       C);
        keep = site_mask(m, rnd, a->keep_res2 + l * keep_words(maxBT * C), l, DROP_FFN_RESID, BT * C);
        if (l + 1 < L) {  // the residual add fused with the next layer's LN1
            LayerActs<X> next = layer_acts<X>(m, l + 1);
            cuda_residual_layernorm_forward(y.res2, next.ln1, next.ln1_mean, next.ln1_rstd, y.res1, proj,
                                            kernel_bias<X>(m, p->ff2_b + lc), keep, ds, prm<X>(m, p->ln1_w + lc + C),
                                            prm<X>(m, p->ln1_b + lc + C), N, C, c->ln_eps, m->stream);
        } else {  // the final LayerNorm below reads it
            cuda_residual_dropout_forward(y.res2, y.res1, proj, kernel_bias<X>(m, p->ff2_b + lc), keep, ds, BT * C, C,
                                          m->stream);
        }
        x = y.res2;
        nvtxRangePop();
    }
    return x;
}

// BERT's encoder (cpu_model.c's bert_encoder_forward): Drop(LN(word + type + position)), then per layer
// h = LN1(x + Drop(Dense(Attn(x)))), x = LN2(h + Drop(Dense2(GELU(Dense1(h))))), each residual add fused with its
// LayerNorm. Returns the last hidden state [B, T, C].
template <typename X>
static const X *bert_layers_forward(CudaModel *m, int B, const CudaRandom *rnd) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    int T = c->max_seq, C = c->d_model, F = c->d_ff, L = c->n_layers;
    size_t BT = (size_t)B * T, maxBT = (size_t)m->max_B * T;
    int N = (int)BT;
    float ds = m->drop_scale;
    char name[64];
    X *encoded = act<X>(a->encoded), *emb_sum = act<X>(a->emb_sum), *proj = act<X>(a->proj);
    cuda_key_valid(a->key_valid, a->inputs, BT, m->pad_id, m->stream);
    cuda_bert_embedding_forward(emb_sum, a->inputs, prm<X>(m, p->tok_emb), prm<X>(m, p->pos_emb),
                                prm<X>(m, p->type_emb), B, T, C, m->stream);
    cuda_layernorm_forward(encoded, a->emb_mean, a->emb_rstd, emb_sum, prm<X>(m, p->emb_ln_w), prm<X>(m, p->emb_ln_b),
                           N, C, c->ln_eps, m->stream);
    KeepWord *keep = site_mask(m, rnd, a->keep_emb, 0, DROP_EMBED, BT * C);
    if (keep) cuda_residual_dropout_backward(encoded, encoded, keep, ds, BT * C, m->stream);  // y = x keep scale
    const X *x = encoded;  // [B, T, C] hidden state entering the layer
    for (int l = 0; l < L; l++) {
        snprintf(name, sizeof(name), "forward layer %d", l);
        nvtxRangePushA(name);
        size_t lc = (size_t)l * C;
        LayerActs<X> y = layer_acts<X>(m, l);
        matmul_forward(m, y.qkv, x, prm<X>(m, p->qkv_w + (size_t)l * 3 * C * C), gemm_bias<X>(m, p->qkv_b + 3 * lc), N,
                       C, 3 * C);
        attention_layer_forward<X>(m, l, B);
        matmul_forward(m, proj, y.atty, prm<X>(m, p->out_w + (size_t)l * C * C), gemm_bias<X>(m, p->out_b + lc), N, C,
                       C);
        keep = site_mask(m, rnd, a->keep_res1 + l * keep_words(maxBT * C), l, DROP_ATTN_RESID, BT * C);
        cuda_residual_layernorm_forward(y.res1, y.ln1, y.ln1_mean, y.ln1_rstd, x, proj, kernel_bias<X>(m, p->out_b + lc),
                                        keep, ds, prm<X>(m, p->ln1_w + lc), prm<X>(m, p->ln1_b + lc), N, C, c->ln_eps,
                                        m->stream);
        matmul_forward(m, y.fc_pre, y.ln1, prm<X>(m, p->ff1_w + (size_t)l * F * C),
                       gemm_bias<X>(m, p->ff1_b + (size_t)l * F), N, C, F);
        cuda_bias_gelu_forward(y.fc_pre, y.fch, kernel_bias<X>(m, p->ff1_b + (size_t)l * F), BT * F, F, m->stream);
        matmul_forward(m, proj, y.fch, prm<X>(m, p->ff2_w + (size_t)l * C * F), gemm_bias<X>(m, p->ff2_b + lc), N, F,
                       C);
        keep = site_mask(m, rnd, a->keep_res2 + l * keep_words(maxBT * C), l, DROP_FFN_RESID, BT * C);
        cuda_residual_layernorm_forward(y.res2, y.ln2, y.ln2_mean, y.ln2_rstd, y.ln1, proj,
                                        kernel_bias<X>(m, p->ff2_b + lc), keep, ds, prm<X>(m, p->ln2_w + lc),
                                        prm<X>(m, p->ln2_b + lc), N, C, c->ln_eps, m->stream);
        x = y.ln2;
        nvtxRangePop();
    }
    return x;
}

// The last hidden state [B, T, C] of the forward (the head's input).
template <typename X>
static const X *last_hidden(const CudaModel *m) {
    size_t off = (size_t)(m->cfg.n_layers - 1) * m->max_B * m->cfg.max_seq * m->cfg.d_model;
    return act<X>(m->cfg.arch == MODEL_ARCH_BERT ? m->a.ln2 : m->a.res2) + off;
}

template <typename X>
static void forward_layers_and_head(CudaModel *m, int B, const CudaRandom *rnd) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    int T = c->max_seq, C = c->d_model, V = c->vocab;
    size_t BT = (size_t)B * T;
    int N = (int)BT;
    const X *x = c->arch == MODEL_ARCH_BERT ? bert_layers_forward<X>(m, B, rnd) : labml_layers_forward<X>(m, B, rnd);
    if (m->sparse_last) {
        sparse_head_forward(m, x, N);
        return;
    }
    X *logits = act<X>(a->logits);
    head_transform_forward(m, x, N);
    matmul_forward(m, logits, (const X *)act<X>(a->lnf), prm<X>(m, p->gen_w), gemm_bias<X>(m, p->gen_b), N, C, V);
    if (const X *b = kernel_bias<X>(m, p->gen_b)) cuda_add_bias(logits, logits, b, BT * V, V, m->stream);

    if (m->has_labels) {
        // Labels equal to pad_id are ignored (as cpu_model_forward). Loss, accuracy and dlogits (the
        // backward's starting point) in one pass; the count of targets stays on the device so nothing waits.
        cuda_count_targets(a->n_targets, a->labels, N, m->pad_id, m->stream);
        cuda_crossentropy_forward_backward(a->losses, a->correct, act<X>(a->dlogits), (const X *)logits, a->labels,
                                           loss_divisor(m), N, V, m->pad_id, m->stream);
        cuda_loss_reduce(a->scalars, a->losses, a->correct, a->n_targets, N, m->stream);
    }
}

static void forward_impl(CudaModel *m, int B, const CudaRandom *rnd) {
    nvtxRangePushA("forward");
    if (m->bf16) forward_layers_and_head<bf16>(m, B, rnd);
    else forward_layers_and_head<float>(m, B, rnd);
    nvtxRangePop();
}

// dqkv[B, T, 3C] of layer l from datty (the attention core's backward, as attention.c), tiled: the probabilities
// recomputed from the saved qkv, output and lse, the dropout regenerated inside the kernel. Returns the qkv bias
// gradient for the product's backward to sum, or NULL when it is summed here. FP32: from the kernels' per-sequence
// partial sums (qkv is saved without its bias). BF16: on FP32 copies of qkv (bias included), of the output as the
// forward rounded it and of datty; dqkv rounded once (the CPU's bf16_point), its bias gradient summed from the
// rounded values by the product's backward, as the CPU's linear_backward does.
template <typename X>
static float *attention_layer_backward(CudaModel *m, int l);
template <>
float *attention_layer_backward<float>(CudaModel *m, int l) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const LayerActs<float> y = layer_acts<float>(m, l);
    int B = m->B, C = c->d_model;
    size_t l3c = (size_t)l * 3 * C;
    const uint8_t *key_valid = c->arch == MODEL_ARCH_BERT ? a->key_valid : NULL;
    cuda_attention_backward(a->dqkv, a->scratch, a->att_delta, a->datty, y.qkv, m->p.qkv_b + l3c, y.atty, y.lse,
                            key_valid, attention_dropout(m, l), B, c->max_seq, C, c->n_heads, m->stream);
    cuda_column_sums_finish(m->g.qkv_b + l3c, a->scratch, B, 3 * C, m->stream);
    return NULL;
}
template <>
float *attention_layer_backward<bf16>(CudaModel *m, int l) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const LayerActs<bf16> y = layer_acts<bf16>(m, l);
    int B = m->B, C = c->d_model;
    size_t BT = (size_t)B * c->max_seq;
    const uint8_t *key_valid = c->arch == MODEL_ARCH_BERT ? a->key_valid : NULL;
    cuda_bf16_to_float(a->qkv32, (const uint16_t *)y.qkv, BT * 3 * C, m->stream);
    cuda_bf16_to_float(a->atty32, (const uint16_t *)y.atty, BT * C, m->stream);
    cuda_bf16_to_float(a->datty32, (const uint16_t *)a->datty, BT * C, m->stream);
    cuda_attention_backward(a->dqkv32, NULL, a->att_delta, a->datty32, a->qkv32, NULL, a->atty32, y.lse, key_valid,
                            attention_dropout(m, l), B, c->max_seq, C, c->n_heads, m->stream);
    cuda_bf16_round((uint16_t *)a->dqkv, a->dqkv32, BT * 3 * C, m->stream);
    return m->g.qkv_b + (size_t)l * 3 * C;
}

// labml's layers from the top down: a->dres holds d(last residual stream) (the head's backward wrote it).
template <typename X>
static void labml_layers_backward(CudaModel *m) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    const ParamTensors *g = &m->g;
    int B = m->B, T = c->max_seq, C = c->d_model, F = c->d_ff, V = c->vocab, L = c->n_layers;
    int N = B * T;
    float ds = m->drop_scale;
    char name[64];
    X *dres = act<X>(a->dres), *dproj = act<X>(a->dproj), *dfch = act<X>(a->dfch), *dln = act<X>(a->dln);
    X *datty = act<X>(a->datty), *dqkv = act<X>(a->dqkv);
    for (int l = L - 1; l >= 0; l--) {
        snprintf(name, sizeof(name), "backward layer %d", l);
        nvtxRangePushA(name);
        size_t lc = (size_t)l * C;
        LayerActs<X> y = layer_acts<X>(m, l);
        const X *x = l > 0 ? layer_acts<X>(m, l - 1).res2 : act<X>(a->encoded);  // layer input

        // FFN block: dres is d(res2); the skip path passes it on unchanged to d(res1). dproj = d(FFN output),
        // its column sums in the ff2 bias gradient: here for the top layer, below it by the LN1 backward of the
        // layer above.
        if (l == L - 1)
            cuda_residual_dropout_backward_sums(dproj, dres, y.keep_res2, ds, N, C, g->ff2_b + lc, a->scratch,
                                                m->stream);
        linear_backward(m, dfch, g->ff2_w + (size_t)l * C * F, NULL, (const X *)dproj, (const X *)y.fch,
                        prm<X>(m, p->ff2_w + (size_t)l * C * F), N, F, C);
        // The ReLU/dropout backward also sums the ff1 bias gradient as it goes.
        cuda_relu_dropout_backward_sums(dfch, y.fch, ds, N, F, g->ff1_b + (size_t)l * F, a->scratch, m->stream);
        linear_backward(m, dln, g->ff1_w + (size_t)l * F * C, NULL, (const X *)dfch, (const X *)y.ln2,
                        prm<X>(m, p->ff1_w + (size_t)l * F * C), N, C, F);
        // LN2's backward also writes dproj = d(attention output) = dropout backward of d(res1), and its column
        // sums into the output projection's bias gradient.
        cuda_layernorm_backward_residual(dres, g->ln2_w + lc, g->ln2_b + lc, dln, y.res1, prm<X>(m, p->ln2_w + lc),
                                         y.ln2_mean, y.ln2_rstd, N, C, dproj, y.keep_res1, ds, g->out_b + lc,
                                         a->scratch, m->stream);

        // Attention block: dres is now d(res1); the skip path passes it on to d(x).
        linear_backward(m, datty, g->out_w + (size_t)l * C * C, NULL, (const X *)dproj, (const X *)y.atty,
                        prm<X>(m, p->out_w + (size_t)l * C * C), N, C, C);
        float *dqkv_b = attention_layer_backward<X>(m, l);
        linear_backward(m, dln, g->qkv_w + (size_t)l * 3 * C * C, dqkv_b, (const X *)dqkv, (const X *)y.ln1,
                        prm<X>(m, p->qkv_w + (size_t)l * 3 * C * C), N, C, 3 * C);
        if (l > 0) {  // LN1's backward also starts the FFN block of the layer below (as LN2's above)
            cuda_layernorm_backward_residual(dres, g->ln1_w + lc, g->ln1_b + lc, dln, x, prm<X>(m, p->ln1_w + lc),
                                             y.ln1_mean, y.ln1_rstd, N, C, dproj, layer_acts<X>(m, l - 1).keep_res2, ds,
                                             g->ff2_b + lc - C, a->scratch, m->stream);
        } else {
            cuda_layernorm_backward(dres, g->ln1_w + lc, g->ln1_b + lc, dln, x, prm<X>(m, p->ln1_w + lc), y.ln1_mean,
                                    y.ln1_rstd, N, C, a->scratch, m->stream);
        }
        nvtxRangePop();
    }
    cuda_embedding_backward(g->tok_emb, (const X *)dres, a->inputs, B, T, C, V, m->stream);
}

// BERT's layers from the top down (cpu_model.c's bert_encoder_backward): a->dres holds d(last hidden state). Each
// post-LN LayerNorm's input gradient reaches the skip path and the sublayer, whose input gradient cuBLAS adds on
// (beta = 1).
template <typename X>
static void bert_layers_backward(CudaModel *m) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    const ParamTensors *g = &m->g;
    int B = m->B, T = c->max_seq, C = c->d_model, F = c->d_ff, V = c->vocab, L = c->n_layers;
    size_t BT = (size_t)B * T;
    int N = (int)BT;
    float ds = m->drop_scale;
    char name[64];
    X *dres = act<X>(a->dres), *dres2 = act<X>(a->dres2), *dproj = act<X>(a->dproj), *dfch = act<X>(a->dfch);
    X *datty = act<X>(a->datty), *dqkv = act<X>(a->dqkv);
    for (int l = L - 1; l >= 0; l--) {
        snprintf(name, sizeof(name), "backward layer %d", l);
        nvtxRangePushA(name);
        size_t lc = (size_t)l * C;
        LayerActs<X> y = layer_acts<X>(m, l);
        const X *x = l > 0 ? layer_acts<X>(m, l - 1).ln2 : act<X>(a->encoded);  // layer input

        // FFN block: dres2 = d(res2) from LN2's backward; then the FFN's input gradient is added to it: d h.
        CUDA_CHECK(cudaMemsetAsync(dres2, 0, BT * C * sizeof(X), m->stream));
        cuda_layernorm_backward(dres2, g->ln2_w + lc, g->ln2_b + lc, (const X *)dres, y.res2, prm<X>(m, p->ln2_w + lc),
                                y.ln2_mean, y.ln2_rstd, N, C, a->scratch, m->stream);
        cuda_residual_dropout_backward(dproj, dres2, y.keep_res2, ds, BT * C, m->stream);
        linear_backward(m, dfch, g->ff2_w + (size_t)l * C * F, g->ff2_b + lc, (const X *)dproj, (const X *)y.fch,
                        prm<X>(m, p->ff2_w + (size_t)l * C * F), N, F, C);
        cuda_gelu_backward(dfch, dfch, y.fc_pre, BT * F, m->stream);
        linear_backward_acc(m, dres2, g->ff1_w + (size_t)l * F * C, g->ff1_b + (size_t)l * F, (const X *)dfch,
                            (const X *)y.ln1, prm<X>(m, p->ff1_w + (size_t)l * F * C), N, C, F);

        // Attention block: dres = d(res1) from LN1's backward, plus the attention's input gradient: d x.
        CUDA_CHECK(cudaMemsetAsync(dres, 0, BT * C * sizeof(X), m->stream));
        cuda_layernorm_backward(dres, g->ln1_w + lc, g->ln1_b + lc, (const X *)dres2, y.res1, prm<X>(m, p->ln1_w + lc),
                                y.ln1_mean, y.ln1_rstd, N, C, a->scratch, m->stream);
        cuda_residual_dropout_backward(dproj, dres, y.keep_res1, ds, BT * C, m->stream);
        linear_backward(m, datty, g->out_w + (size_t)l * C * C, g->out_b + lc, (const X *)dproj, (const X *)y.atty,
                        prm<X>(m, p->out_w + (size_t)l * C * C), N, C, C);
        float *dqkv_b = attention_layer_backward<X>(m, l);
        linear_backward_acc(m, dres, g->qkv_w + (size_t)l * 3 * C * C, dqkv_b, (const X *)dqkv, x,
                            prm<X>(m, p->qkv_w + (size_t)l * 3 * C * C), N, C, 3 * C);
        nvtxRangePop();
    }
    // Embeddings: undo their dropout and LayerNorm, then the three lookups; the [PAD] row is frozen (model.h).
    cuda_residual_dropout_backward(dres, dres, m->dropout_on ? a->keep_emb : NULL, ds, BT * C, m->stream);
    CUDA_CHECK(cudaMemsetAsync(dres2, 0, BT * C * sizeof(X), m->stream));
    cuda_layernorm_backward(dres2, g->emb_ln_w, g->emb_ln_b, (const X *)dres, act<X>(a->emb_sum),
                            prm<X>(m, p->emb_ln_w), a->emb_mean, a->emb_rstd, N, C, a->scratch, m->stream);
    cuda_bert_embedding_backward(g->tok_emb, g->pos_emb, g->type_emb, (const X *)dres2, a->inputs, B, T, C, V,
                                 m->stream);
    CUDA_CHECK(cudaMemsetAsync(g->tok_emb + (size_t)c->pad_id * C, 0, (size_t)C * sizeof(float), m->stream));
}

template <typename X>
static void backward_head_and_layers(CudaModel *m) {
    const ModelConfig *c = &m->cfg;
    DevActs *a = &m->a;
    const ParamTensors *p = &m->p;
    const ParamTensors *g = &m->g;
    int B = m->B, T = c->max_seq, C = c->d_model, V = c->vocab;
    int N = B * T;
    if (m->sparse_last) {
        sparse_head_backward<X>(m, N);
    } else {
        // dlogits = (softmax - onehot) / n_targets was written by the forward's fused cross-entropy.
        linear_backward(m, act<X>(a->dln), g->gen_w, g->gen_b, (const X *)act<X>(a->dlogits), (const X *)act<X>(a->lnf),
                        prm<X>(m, p->gen_w), N, C, V);
        head_transform_backward(m, act<X>(a->dres), last_hidden<X>(m), N);
    }
    if (c->arch == MODEL_ARCH_BERT) bert_layers_backward<X>(m);
    else labml_layers_backward<X>(m);
}

static void backward_impl(CudaModel *m) {
    nvtxRangePushA("backward");
    // Weight gradients are overwritten by their one product; biases, LayerNorm and the embedding accumulate
    // (bert's tied decoder writes the word embeddings' gradient first, the lookups add to it).
    CUDA_CHECK(cudaMemsetAsync(m->grads, 0, m->n_params * sizeof(float), m->stream));
    if (m->bf16) backward_head_and_layers<bf16>(m);
    else backward_head_and_layers<float>(m);
    nvtxRangePop();
}

// Gradient norm of all P gradients into scalars[3], then clip + Adam over parameters [lo, lo + len) with the step's
// t and lr from m->a.step (two launches).
static void optimizer_impl(CudaModel *m, float *grads, size_t lo, size_t len, float max_norm, const OptimConfig *oc) {
    if (lo < m->moments_lo || lo + len > m->moments_lo + m->moments_len)
        mlm_fatal(MLM_EXIT_FAILURE, "CUDA update of parameters %zu..%zu: this model keeps Adam moments for %zu..%zu "
                  "only (cuda_model_shard_moments)", lo, lo + len, m->moments_lo, m->moments_lo + m->moments_len);
    nvtxRangePushA("optimizer");
    float *d_norm = m->a.scalars + 3;
    size_t at = lo - m->moments_lo;
    cuda_grad_norm(d_norm, grads, m->n_params, m->a.norm_scratch, m->stream);
    cuda_adam_update_dev(m->params + lo, grads + lo, m->adam_m + at, m->adam_v + at,
                         m->decay_set ? m->decay_mask + lo : NULL, d_norm, max_norm, len, (int)oc->kind, oc->beta1,
                         oc->beta2, oc->eps, &m->a.step->adam, m->params16 ? (uint16_t *)m->params16 + lo : NULL,
                         lo, m->stream);
    nvtxRangePop();
}

// Set up the state of a forward over B sequences: the dropout switch and scale.
static void begin_forward(CudaModel *m, int B, const CudaRandom *rnd, int has_labels, int pad_id) {
    m->B = B;
    m->has_labels = has_labels;
    m->pad_id = pad_id;
    m->dropout_on = rnd != NULL && rnd->dropout_p > 0.0f;
    m->accum_last = 0;  // run_step sets it for a micro-batch
    // THE DROPOUT RULE's scale, evaluated in float as on the CPU.
    m->drop_scale = m->dropout_on ? 1.0f / (1.0f - rnd->dropout_p) : 1.0f;
    m->drop_p = m->dropout_on ? rnd->dropout_p : 0.0f;
    if (m->dropout_on) m->drop_layout = rnd->layout;
}

// Read scalars[0..n) back (one small copy) and wait for the stream.
static void read_scalars(CudaModel *m, int n, CudaStepStats *stats) {
    CUDA_CHECK(cudaMemcpyAsync(m->h_scalars, m->a.scalars, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost,
                               m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    sparse_check_count(m, (int)lrintf(m->h_scalars[2]));
    if (!stats) return;
    stats->loss = m->h_scalars[0];
    stats->correct = (int)lrintf(m->h_scalars[1]);
    stats->n_targets = (int)lrintf(m->h_scalars[2]);
    stats->grad_norm = n > 3 ? m->h_scalars[3] : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// Gradient accumulation: the micro-batches' gradients and statistics summed on the device, in call order.

// acc[i] = g[i] on the step's first micro-batch, acc[i] + g[i] after (one rounding, as the CPU's sum += g).
static __global__ void accumulate_grads_kernel(float *acc /* [n] */, const float *g /* [n] */, size_t n,
                                               const DeviceStep *step) {
    int first = step->accum_first;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        acc[i] = first ? g[i] : __fadd_rn(acc[i], g[i]);
}

// acc[3] (+)= {loss x targets, correct, targets} of the micro-batch from cuda_loss_reduce's scalars (one thread:
// three numbers, in call order).
static __global__ void accumulate_stats_kernel(double *acc, const float *scalars, const DeviceStep *step) {
    if (step->accum_first) acc[0] = acc[1] = acc[2] = 0.0;
    acc[0] += (double)scalars[0] * (double)scalars[2];
    acc[1] += (double)scalars[1];
    acc[2] += (double)scalars[2];
}

// The sums, once per model (outside any capture).
static void accumulation_buffers(CudaModel *m) {
    if (m->accum_block) return;
    size_t grad_bytes = (m->n_params * sizeof(float) + 255) & ~(size_t)255, bytes = accumulation_bytes(m->n_params);
    m->accum_block = device_alloc(bytes, "summed gradients (train.accum_steps)", &m->cfg, m->max_B);
    m->grad_acc = (float *)m->accum_block;
    m->acc_stats = (double *)((char *)m->accum_block + grad_bytes);
    CUDA_CHECK(cudaMemsetAsync(m->accum_block, 0, bytes, m->stream));
    CUDA_CHECK(cudaMallocHost((void **)&m->h_acc_stats, 3 * sizeof(double)));
}

// After a micro-batch's backward: its gradients and statistics into the sums.
static void accumulate_impl(CudaModel *m) {
    nvtxRangePushA("accumulate");
    const int block = 256;
    size_t blocks = (m->n_params + block - 1) / block;
    unsigned grid = (unsigned)MLM_MIN(blocks, (size_t)4096);
    accumulate_grads_kernel<<<grid, block, 0, m->stream>>>(m->grad_acc, m->grads, m->n_params, m->a.step);
    CUDA_CHECK_LAUNCH();
    accumulate_stats_kernel<<<1, 1, 0, m->stream>>>(m->acc_stats, m->a.scalars, m->a.step);
    CUDA_CHECK_LAUNCH();
    nvtxRangePop();
}

// ---------------------------------------------------------------------------------------------------------
// A masked step as one unit of launches, run plainly or captured once per StepKey and replayed.

typedef struct {
    StepKind kind;
    int B;
    const MaskConfig *mask;
    const CudaRandom *rnd;
    float max_norm;           // STEP_TRAIN only
    const OptimConfig *oc;    // STEP_TRAIN only
    int norm_targets;         // STEP_MICRO only: the whole batch's targets
    int accum_first;          // STEP_MICRO only: the step's first micro-batch
} StepArgs;

static StepKey step_key(const CudaModel *m, const StepArgs *s) {
    StepKey k;
    memset(&k, 0, sizeof(k));
    k.kind = (int)s->kind;
    k.B = s->B;
    k.pad_id = s->mask->pad_id;
    k.decay_set = m->decay_set;
    k.mask = *s->mask;
    k.layout = s->rnd->layout;
    k.dropout_p = s->rnd->dropout_p;
    if (s->kind == STEP_TRAIN) {
        k.max_norm = s->max_norm;
        k.optim_kind = (int)s->oc->kind;
        k.beta1 = s->oc->beta1;
        k.beta2 = s->oc->beta2;
        k.eps = s->oc->eps;
    }
    return k;
}

// The step's work on the stream, nothing here waits: upload of the staged scalars and tokens, masking, the
// forward, and for training the backward and the optimizer.
static void enqueue_step(CudaModel *m, const StepArgs *s) {
    upload_step(m, (size_t)s->B * m->cfg.max_seq);
    mask_on_device(m, s->B, s->mask, s->rnd);
    forward_impl(m, s->B, s->rnd);
    if (s->kind == STEP_TRAIN) {
        backward_impl(m);
        optimizer_impl(m, m->grads, 0, m->n_params, s->max_norm, s->oc);
    }
    if (s->kind == STEP_MICRO) {
        backward_impl(m);
        accumulate_impl(m);
    }
}

// Capture the step's launches into g's executable graph (nothing runs until it is launched).
static void capture_step(CudaModel *m, const StepArgs *s, StepGraph *g) {
    cudaGraph_t graph;
    CUDA_CHECK(cudaStreamBeginCapture(m->stream, cudaStreamCaptureModeThreadLocal));
    enqueue_step(m, s);
    CUDA_CHECK(cudaStreamEndCapture(m->stream, &graph));
    CUDA_CHECK(cudaGraphInstantiate(&g->exec, graph, 0));
    CUDA_CHECK(cudaGraphDestroy(graph));
}

// The executable graph of this key: found, or captured now (in the slot used least recently); NULL the first time
// the key is seen, and the caller then runs the step as plain launches.
//
// Why the first step of each key is not captured (issue 21, item 5): inside cudaStreamBeginCapture nothing runs,
// yet the first launch of a kernel loads its module (lazy loading, the default since CUDA 12.2) and the first
// cuBLAS call of a shape picks its kernel, may set up its own state and loads that kernel in turn; work like that
// inside a capture is what real GPUs have refused or captured wrongly where tests/emu cannot look. One plain step
// per key first has every kernel, every cuBLAS shape and the handle used once outside any capture, at the cost of
// nothing (the plain step is the step, bit for bit the graph's: test_gpu_model part 5), and tests/emu counts
// launches and cuBLAS calls captured before their first plain use (EmuCounters.cold_captures, checked zero there).
static cudaGraphExec_t step_graph(CudaModel *m, const StepArgs *s) {
    StepKey key = step_key(m, s);
    StepGraph *slot = &m->graphs[0];
    m->graph_clock++;
    for (int i = 0; i < MAX_STEP_GRAPHS; i++) {
        StepGraph *g = &m->graphs[i];
        if (g->seen && memcmp(&g->key, &key, sizeof(key)) == 0) {
            g->last_used = m->graph_clock;
            if (!g->exec) capture_step(m, s, g);
            return g->exec;
        }
        if (!g->seen || (slot->seen && g->last_used < slot->last_used)) slot = g;
    }
    if (slot->exec) CUDA_CHECK(cudaGraphExecDestroy(slot->exec));
    slot->exec = NULL;
    slot->seen = 1;
    slot->key = key;
    slot->last_used = m->graph_clock;
    return NULL;
}

// Stage the tokens and the step's scalars, then run the step: one graph launch (train.cuda_graph) or the
// plain launches. The staging buffer is free again once the step's upload has run.
static void run_step(CudaModel *m, const StepArgs *s, const int *tokens, long t, double lr) {
    wait_stage(m);
    memcpy(m->h_tokens, tokens, (size_t)s->B * m->cfg.max_seq * sizeof(int));
    stage_step(m, s->rnd, s->kind == STEP_TRAIN ? s->oc : NULL, t, lr);
    if (s->kind == STEP_MICRO) {
        m->h_step->norm_targets = s->norm_targets;
        m->h_step->accum_first = s->accum_first;
    }
    begin_forward(m, s->B, s->rnd, 1, s->mask->pad_id);
    m->accum_last = s->kind == STEP_MICRO;
    sparse_plan(m, tokens, NULL, s->B, s->mask, s->rnd);
    // The sparse head's row count changes every step, so a step that takes it runs as plain launches.
    cudaGraphExec_t graph = m->use_graphs && !m->sparse_last ? step_graph(m, s) : NULL;
    if (graph) {
        CUDA_CHECK(cudaGraphLaunch(graph, m->stream));
    } else {
        enqueue_step(m, s);
    }
    CUDA_CHECK(cudaEventRecord(m->stage_free, m->stream));
}

// ---------------------------------------------------------------------------------------------------------
// Public entry points.

void cuda_model_forward(CudaModel *m, const int *tokens, const int *labels, int B, int pad_id,
                        const MaskConfig *mask, const CudaRandom *rnd, CudaStepStats *stats) {
    check_batch(m, B, "cuda_model_forward");
    check_rows(rnd, B, "cuda_model_forward");
    if (mask && !rnd) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_forward: masking needs a random stream");
    if (mask && mask->pad_id != pad_id)
        mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_forward: pad_id %d differs from the mask's [PAD] %d", pad_id,
                  mask->pad_id);
    if (mask) {
        // Validation and samples: a captured forward like the training step.
        StepArgs s = {STEP_FORWARD, B, mask, rnd, 0.0f, NULL, 0, 0};
        run_step(m, &s, tokens, 0, 0.0);
        read_scalars(m, 3, stats);
        return;
    }
    wait_stage(m);
    stage_step(m, rnd, NULL, 0, 0.0);
    upload_batch(m, m->a.inputs, tokens, labels, B);
    begin_forward(m, B, rnd, labels != NULL, pad_id);
    sparse_plan(m, tokens, labels, B, NULL, rnd);
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

// Clip (by the norm of all of grads[P]) + Adam over parameters [lo, lo + len) with the constants of (t, lr),
// uploaded alone through the staging buffer.
static void optimizer_on_device(CudaModel *m, float *grads, size_t lo, size_t len, float max_norm,
                                const OptimConfig *oc, long t, double lr) {
    wait_stage(m);
    stage_step(m, NULL, oc, t, lr);
    upload_step(m, 0);
    CUDA_CHECK(cudaEventRecord(m->stage_free, m->stream));
    optimizer_impl(m, grads, lo, len, max_norm, oc);
}

float cuda_model_optimizer_step(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr) {
    optimizer_on_device(m, m->grads, 0, m->n_params, max_norm, oc, t, lr);
    CUDA_CHECK(cudaMemcpyAsync(m->h_scalars + 3, m->a.scalars + 3, sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    return m->h_scalars[3];
}

void cuda_model_train_step(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd,
                           float max_norm, const OptimConfig *oc, long t, double lr, CudaStepStats *stats) {
    check_batch(m, B, "cuda_model_train_step");
    if (!mask || !rnd) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_train_step needs a mask config and a random stream");
    check_rows(rnd, B, "cuda_model_train_step");
    nvtxRangePushA("train_step");
    StepArgs s = {STEP_TRAIN, B, mask, rnd, max_norm, oc, 0, 0};
    run_step(m, &s, tokens, t, lr);
    read_scalars(m, 4, stats);  // the step's only wait for the device
    nvtxRangePop();
}

void cuda_model_accumulate(CudaModel *m, const int *tokens, int B, const MaskConfig *mask, const CudaRandom *rnd,
                           int norm_targets, int first) {
    check_batch(m, B, "cuda_model_accumulate");
    if (!mask || !rnd) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_accumulate needs a mask config and a random stream");
    if (norm_targets < 0) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_accumulate: negative target count %d", norm_targets);
    check_rows(rnd, B, "cuda_model_accumulate");
    accumulation_buffers(m);
    nvtxRangePushA("micro_batch");
    if (first) {
        m->accum_sparse_cap = 0;
        m->accum_sparse = 0;
    }
    m->accum_norm = norm_targets;
    StepArgs s = {STEP_MICRO, B, mask, rnd, 0.0f, NULL, norm_targets, first != 0};
    run_step(m, &s, tokens, 0, 0.0);
    if (m->sparse_last) m->accum_sparse = 1, m->accum_sparse_cap += m->sparse_cap;
    nvtxRangePop();
}

float *cuda_model_accumulated_grads_device(CudaModel *m) {
    accumulation_buffers(m);
    return m->grad_acc;
}

void cuda_model_update_accumulated(CudaModel *m, size_t lo, size_t len, float max_norm, const OptimConfig *oc, long t,
                                   double lr) {
    if (!m->accum_block) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_update_accumulated: no micro-batch accumulated");
    optimizer_on_device(m, m->grad_acc, lo, len, max_norm, oc, t, lr);
}

void cuda_model_read_update(CudaModel *m, float *grad_norm, double sums[3]) {
    // The step's one read-back: the norm and the sums.
    CUDA_CHECK(cudaMemcpyAsync(m->h_scalars + 3, m->a.scalars + 3, sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    CUDA_CHECK(cudaMemcpyAsync(m->h_acc_stats, m->acc_stats, 3 * sizeof(double), cudaMemcpyDeviceToHost, m->stream));
    CUDA_CHECK(cudaStreamSynchronize(m->stream));
    long device_count = lrint(m->h_acc_stats[2]);
    if (m->accum_sparse && device_count != m->accum_sparse_cap)
        mlm_fatal(MLM_EXIT_FAILURE,
                  "sparse prediction: the device selected %ld positions over the step's micro-batches, the host's "
                  "reproduction of the masking %ld; the masking kernel and mask_apply disagree. Set "
                  "train.sparse_prediction = false and report it", device_count, m->accum_sparse_cap);
    *grad_norm = m->h_scalars[3];
    memcpy(sums, m->h_acc_stats, 3 * sizeof(double));
}

void cuda_model_apply_accumulated(CudaModel *m, float max_norm, const OptimConfig *oc, long t, double lr,
                                  CudaStepStats *stats) {
    if (!m->accum_block) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_apply_accumulated: no micro-batch accumulated");
    cuda_model_update_accumulated(m, 0, m->n_params, max_norm, oc, t, lr);
    float norm;
    double sums[3];
    cuda_model_read_update(m, &norm, sums);
    if (!stats) return;
    int n = m->accum_norm;
    stats->loss = n > 0 ? (float)(sums[0] / n) : 0.0f;
    stats->correct = (int)lrint(sums[1]);
    stats->n_targets = n;
    stats->grad_norm = norm;
}

void cuda_model_get_accumulated_grads(CudaModel *m, float *grads) {
    if (!m->accum_block) mlm_fatal(MLM_EXIT_FAILURE, "cuda_model_get_accumulated_grads: no micro-batch accumulated");
    copy_sync(m, grads, m->grad_acc, m->n_params * sizeof(float), cudaMemcpyDeviceToHost);
}

void cuda_profiler_start(void) { CUDA_CHECK(cudaProfilerStart()); }
void cuda_profiler_stop(void) { CUDA_CHECK(cudaProfilerStop()); }
