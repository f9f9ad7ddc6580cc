// test_gpu_bert.c (gpu; under the emu layer: test_emu_bert): model.arch = bert on the CUDA backend, TF32 off.
//
//  1. The new kernels against their CPU twins: cuda_bert_embedding_forward / _backward (bit-identical: the same
//     additions in the same order), cuda_bias_gelu_forward / cuda_gelu_backward (within 4 ulp: the device's erff
//     and expf are within 2 ulp of the host's, bit-identical under the emu layer, which calls the host's),
//     cuda_key_valid (exact), and the key-padding mask in the tiled attention (T 13 and 70: one key tile and three)
//     against attention_forward / attention_backward with the same mask: outputs and gradients within 1e-5 of their
//     largest, the masked keys' k and v gradients exactly 0, a sequence of nothing but [PAD] attending to every key
//     (bit for bit the unmasked attention).
//  2. The whole model, CUDA vs CPU, masking on the device as in training (the CPU masks with the same Philox
//     numbers), batches whose sequences end in [PAD] runs (masked out of attention): dropout off and on, full and
//     partial batches, dense and sparse heads: targets equal, loss within 1e-5, correct within the near ties,
//     every gradient tensor within 1e-4 of its largest element (test_gpu_model's bounds: the backends sum in
//     different orders), and the frozen [PAD] row's gradient exactly 0 on the device.
//  3. Training steps: graphs on vs off bit for bit; two accumulated micro-batches (cuda_model_accumulate) vs the
//     CPU's accumulation of the same micro-batches (gradients within 1e-4 of each tensor's largest); whole-word
//     masking (continuation flags) CUDA vs CPU.
// The key-attention bias has a zero gradient in exact arithmetic (the softmax cancels it, masked keys or not); it
// is measured against the largest gradient of the model, as in test_gpu_model.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"
#include "kernels/cuda_check.h"
#include "kernels/kernels.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "fixture_util.h"
#include "test_util.h"

static uint64_t lcg_state = 2020;
static double rand_unit(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) / 9007199254740992.0;
}
static float rand_sym(float a) { return (float)((2.0 * rand_unit() - 1.0) * a); }

static float *dev_copy(const void *host, size_t bytes) {
    void *d = NULL;
    CUDA_CHECK(cudaMalloc(&d, bytes ? bytes : 1));
    if (bytes) CUDA_CHECK(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
    return (float *)d;
}
static float *dev_alloc(size_t bytes) {
    void *d = NULL;
    CUDA_CHECK(cudaMalloc(&d, bytes ? bytes : 1));
    return (float *)d;
}
static void host_copy(void *host, const void *dev, size_t bytes) {
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost));
}
static float *rand_floats(size_t n, float a) {
    float *x = mlm_malloc(n * sizeof(float), "test tensor");
    for (size_t i = 0; i < n; i++) x[i] = rand_sym(a);
    return x;
}

// ---- 1. Kernels -----------------------------------------------------------------------------------------

static void test_embedding_kernels(void) {
    enum { B = 3, T = 7, C = 37, V = 11, P = 9 };
    int tok[B * T];
    for (int i = 0; i < B * T; i++) tok[i] = (int)(rand_unit() * V);
    tok[4] = tok[5] = tok[6] = 2;  // repeated tokens: their rows' sums in position order
    float *word = rand_floats((size_t)V * C, 1.0f), *pos = rand_floats((size_t)P * C, 1.0f), *type = rand_floats(2 * C, 1.0f);
    float *dout = rand_floats((size_t)B * T * C, 1.0f);
    float *out_c = mlm_malloc((size_t)B * T * C * sizeof(float), "out"), *out_g = mlm_malloc((size_t)B * T * C * sizeof(float), "out");
    bert_embedding_forward(out_c, tok, word, pos, type, B, T, C, V);
    int *d_tok = (int *)dev_copy(tok, sizeof(tok));
    float *d_word = dev_copy(word, (size_t)V * C * 4), *d_pos = dev_copy(pos, (size_t)P * C * 4), *d_type = dev_copy(type, 2 * C * 4);
    float *d_out = dev_copy(NULL, 0);
    CUDA_CHECK(cudaFree(d_out));
    CUDA_CHECK(cudaMalloc((void **)&d_out, (size_t)B * T * C * 4));
    cuda_bert_embedding_forward(d_out, d_tok, d_word, d_pos, d_type, B, T, C, 0);
    host_copy(out_g, d_out, (size_t)B * T * C * 4);
    int fwd_same = memcmp(out_c, out_g, (size_t)B * T * C * 4) == 0;
    // Backward into gradients that already hold something (they accumulate, as after the tied decoder's product).
    float *gw = rand_floats((size_t)V * C, 0.5f), *gp = rand_floats((size_t)P * C, 0.5f), *gt = rand_floats(2 * C, 0.5f);
    float *d_gw = dev_copy(gw, (size_t)V * C * 4), *d_gp = dev_copy(gp, (size_t)P * C * 4), *d_gt = dev_copy(gt, 2 * C * 4);
    float *d_dout = dev_copy(dout, (size_t)B * T * C * 4);
    bert_embedding_backward(gw, gp, gt, dout, tok, B, T, C);
    cuda_bert_embedding_backward(d_gw, d_gp, d_gt, d_dout, d_tok, B, T, C, V, 0);
    float *hw = mlm_malloc((size_t)V * C * 4, "w"), *hp = mlm_malloc((size_t)P * C * 4, "p"), *ht = mlm_malloc(2 * C * 4, "t");
    host_copy(hw, d_gw, (size_t)V * C * 4);
    host_copy(hp, d_gp, (size_t)P * C * 4);
    host_copy(ht, d_gt, 2 * C * 4);
    int bwd_same = !memcmp(hw, gw, (size_t)V * C * 4) && !memcmp(hp, gp, (size_t)P * C * 4) && !memcmp(ht, gt, 2 * C * 4);
    printf("bert embeddings B %d T %d C %d V %d: forward bit-identical %d, backward (word, position, type) %d\n", B, T,
           C, V, fwd_same, bwd_same);
    CHECK(fwd_same && bwd_same, "cuda_bert_embedding_* differ from their CPU twins");
    CUDA_CHECK(cudaFree(d_tok)); CUDA_CHECK(cudaFree(d_word)); CUDA_CHECK(cudaFree(d_pos)); CUDA_CHECK(cudaFree(d_type));
    CUDA_CHECK(cudaFree(d_out)); CUDA_CHECK(cudaFree(d_gw)); CUDA_CHECK(cudaFree(d_gp)); CUDA_CHECK(cudaFree(d_gt));
    CUDA_CHECK(cudaFree(d_dout));
    free(word), free(pos), free(type), free(dout), free(out_c), free(out_g), free(gw), free(gp), free(gt), free(hw);
    free(hp), free(ht);
}

// The spacing of floats at |y| (the ulp of a float of that magnitude).
static double ulpf(double y) {
    float f = fabsf((float)y);
    return (double)nextafterf(f, INFINITY) - f;
}

static void test_gelu_kernels(void) {
    enum { ROWS = 33, F = 29 };
    size_t n = (size_t)ROWS * F;
    float *x = rand_floats(n, 5.0f), *bias = rand_floats(F, 1.0f), *dout = rand_floats(n, 1.0f);
    x[0] = 0.0f, x[1] = -12.0f, x[2] = 12.0f;
    float *pre_c = mlm_malloc(n * 4, "pre"), *out_c = mlm_malloc(n * 4, "out"), *din_c = mlm_malloc(n * 4, "din");
    for (size_t i = 0; i < n; i++) pre_c[i] = x[i] + bias[i % F];
    gelu_forward(out_c, pre_c, n);
    gelu_backward(din_c, dout, pre_c, n);
    float *d_pre = dev_copy(x, n * 4), *d_bias = dev_copy(bias, F * 4), *d_out = dev_copy(x, n * 4), *d_dout = dev_copy(dout, n * 4);
    cuda_bias_gelu_forward(d_pre, d_out, d_bias, n, F, 0);
    cuda_gelu_backward(d_dout, d_dout, d_pre, n, 0);  // in place, as the model calls it
    float *pre_g = mlm_malloc(n * 4, "pre"), *out_g = mlm_malloc(n * 4, "out"), *din_g = mlm_malloc(n * 4, "din");
    host_copy(pre_g, d_pre, n * 4);
    host_copy(out_g, d_out, n * 4);
    host_copy(din_g, d_dout, n * 4);
    // The two sides evaluate the same float expressions with explicit roundings (gelu.c, gelu.cu); they differ only
    // in erff and expf: the device's are within 2 ulp (CUDA C Programming Guide), the host's within 1, so 3 ulp
    // apart. That difference is carried through the later operations, each of which may round differently once
    // its inputs differ (one more ulp of its result). A relative bound will not do: Phi(x) + x phi(x) cancels near
    // x = -0.75 and 1 + erf(x / sqrt 2) for large negative x. Bound per value, computed in double from the CPU's
    // intermediates; x / 2, 0.5 * and -0.5 * are exact. Factor 2: ulpf of the exact value may be half the ulp of
    // the float next to it.
    double worst = 0.0;
    int pre_same = !memcmp(pre_c, pre_g, n * 4);
    for (size_t i = 0; i < n; i++) {
        double v = pre_c[i], e = erf(v * (float)0.70710678118654752440), onepe = 1.0 + e;
        double d_onepe = 3 * ulpf(e) + ulpf(onepe);
        double d_gelu = fabs(v) / 2 * d_onepe + ulpf(v / 2 * onepe);
        double ex = exp((-0.5 * v) * v), pdf = ex * 0.39894228040143267794, xp = v * pdf, s = 0.5 * onepe + xp;
        double d_xp = fabs(v) * (0.4 * 3 * ulpf(ex) + ulpf(pdf)) + ulpf(xp);
        double d_s = 0.5 * d_onepe + d_xp + ulpf(s);
        double d_din = fabs(dout[i]) * d_s + ulpf(dout[i] * s);
        worst = fmax(worst, fabs((double)out_c[i] - out_g[i]) / (2 * d_gelu));
        worst = fmax(worst, fabs((double)din_c[i] - din_g[i]) / (2 * d_din));
    }
    printf("GELU kernels on %zu values: pre-activation (bias add) bit-identical %d, worst error / bound %.3f\n", n,
           pre_same, worst);
    CHECK(pre_same && worst <= 1.0, "cuda_bias_gelu_forward / cuda_gelu_backward differ from gelu.c");
    CUDA_CHECK(cudaFree(d_pre)); CUDA_CHECK(cudaFree(d_bias)); CUDA_CHECK(cudaFree(d_out)); CUDA_CHECK(cudaFree(d_dout));
    free(x), free(bias), free(dout), free(pre_c), free(out_c), free(din_c), free(pre_g), free(out_g), free(din_g);
}

// Relative error max |got - want| / max |want| over n floats (+inf for a NaN, which fmax would drop).
static double rel_max_err(const float *got, const float *want, size_t n) {
    double e = 0.0, m = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (isnan(d)) return INFINITY;
        e = fmax(e, d);
        m = fmax(m, fabs((double)want[i]));
    }
    return m > 0.0 ? e / m : e;
}

// The key-padding mask through the tiled attention vs attention_forward / attention_backward with the same mask.
static void test_attention_mask(int T) {
    enum { B = 3, C = 8, H = 2 };
    size_t N = (size_t)B * T, nqkv = N * 3 * C, ny = N * C, nl = N * H;
    float *qkv = rand_floats(nqkv, 1.5f), *dout = rand_floats(ny, 1.0f);
    int *inputs = mlm_malloc(N * sizeof(int), "inputs");
    const int pad = 0;
    for (size_t i = 0; i < N; i++) inputs[i] = 1 + (int)(i % 5);
    for (int t = T - 3; t < T; t++) inputs[T + t] = pad;  // sequence 1: a [PAD] tail
    inputs[T + 1] = pad;                                  // and one inside
    for (int t = 0; t < T; t++) inputs[2 * T + t] = pad;  // sequence 2: nothing but [PAD]
    uint8_t *valid = mlm_malloc(N, "valid"), *valid_g = mlm_malloc(N, "valid");
    for (size_t i = 0; i < N; i++) valid[i] = inputs[i] != pad;
    float *out_c = mlm_malloc(ny * 4, "out"), *lse_c = mlm_malloc(nl * 4, "lse");
    float *dqkv_c = mlm_malloc(nqkv * 4, "dqkv");
    attention_forward(out_c, lse_c, qkv, valid, NULL, B, T, C, H);
    attention_backward(dqkv_c, dout, qkv, out_c, lse_c, valid, NULL, B, T, C, H);
    int *d_in = (int *)dev_copy(inputs, N * sizeof(int));
    uint8_t *d_valid = (uint8_t *)dev_copy(valid, N);  // overwritten by cuda_key_valid
    CUDA_CHECK(cudaMemset(d_valid, 0xff, N));
    cuda_key_valid(d_valid, d_in, N, pad, 0);
    host_copy(valid_g, d_valid, N);
    float *d_qkv = dev_copy(qkv, nqkv * 4), *d_dout = dev_copy(dout, ny * 4);
    float *d_out = dev_alloc(ny * 4), *d_out_nomask = dev_alloc(ny * 4), *d_lse = dev_alloc(nl * 4);
    float *d_dqkv = dev_alloc(nqkv * 4), *d_delta = dev_alloc(cuda_attention_delta_scratch(B, T, H) * 4);
    const CudaAttnDropout none = {NULL, 0, 0.0f, 1.0f};
    cuda_attention_forward(d_out, d_lse, d_qkv, NULL, d_valid, none, B, T, C, H, 0);
    cuda_attention_backward(d_dqkv, NULL, d_delta, d_dout, d_qkv, NULL, d_out, d_lse, d_valid, none, B, T, C, H, 0);
    cuda_attention_forward(d_out_nomask, d_lse, d_qkv, NULL, NULL, none, B, T, C, H, 0);
    float *out_g = mlm_malloc(ny * 4, "out"), *out_nomask = mlm_malloc(ny * 4, "out");
    float *dqkv_g = mlm_malloc(nqkv * 4, "dqkv");
    host_copy(out_g, d_out, ny * 4);
    host_copy(out_nomask, d_out_nomask, ny * 4);
    host_copy(dqkv_g, d_dqkv, nqkv * 4);
    double e_out = rel_max_err(out_g, out_c, ny), e_dqkv = rel_max_err(dqkv_g, dqkv_c, nqkv);
    int leaked = 0;  // sequence 1's masked keys: their k and v get no gradient, exactly (probability exactly 0)
    for (int j = 0; j < T; j++)
        for (int k = C; k < 3 * C && !valid[T + j]; k++) leaked += dqkv_g[((size_t)T + j) * 3 * C + k] != 0.0f;
    // Sequence 2 (no valid key) attends to every key: the same computation as without a mask, bit for bit.
    int all_pad_same = !memcmp(out_g + 2 * (size_t)T * C, out_nomask + 2 * (size_t)T * C, (size_t)T * C * 4);
    int masked_differs = memcmp(out_g + (size_t)T * C, out_nomask + (size_t)T * C, (size_t)T * C * 4) != 0;
    printf("attention key mask, T %d (tiled): cuda_key_valid exact %d, out / dqkv vs CPU %.2e / %.2e of the largest, "
           "%d masked k, v gradients non-zero, all-[PAD] sequence = unmasked %d, masked sequence differs %d\n", T,
           !memcmp(valid, valid_g, N), e_out, e_dqkv, leaked, all_pad_same, masked_differs);
    CHECK(!memcmp(valid, valid_g, N), "cuda_key_valid differs");
    // Both sides are tiled FP32 attention with different tiles (32 and 64 keys): test_gpu_ops' ATT_TILED_TOL
    // argument (about 140 roundings, 7e-7 of the magnitudes) bounds each against the exact result by 1e-5.
    CHECK(e_out <= 1e-5 && e_dqkv <= 1e-5, "key-padding mask: CUDA attention differs from attention.c's");
    CHECK(leaked == 0 && all_pad_same && masked_differs, "key-padding mask: masked keys leak, or the all-[PAD] "
          "sequence does not attend to every key, or the mask does nothing");
    CUDA_CHECK(cudaFree(d_in)); CUDA_CHECK(cudaFree(d_valid)); CUDA_CHECK(cudaFree(d_qkv));
    CUDA_CHECK(cudaFree(d_dout)); CUDA_CHECK(cudaFree(d_out)); CUDA_CHECK(cudaFree(d_out_nomask));
    CUDA_CHECK(cudaFree(d_lse)); CUDA_CHECK(cudaFree(d_dqkv)); CUDA_CHECK(cudaFree(d_delta));
    free(qkv), free(dout), free(inputs), free(valid), free(valid_g), free(out_c), free(lse_c), free(dqkv_c);
    free(out_g), free(out_nomask), free(dqkv_g);
}

// ---- 2. and 3. The model ----------------------------------------------------------------------------------

typedef struct {
    ModelConfig cfg;
    MaskConfig mask;
    OptimConfig oc;
    RngLayout layout;
    int max_B;
    uint64_t seed;
} Setup;

enum { PAD_ID = 0, MASK_ID = 4 };

static Setup setup(int T) {
    Setup s;
    memset(&s, 0, sizeof(s));
    s.cfg = (ModelConfig){.vocab = 57, .d_model = 16, .n_heads = 2, .n_layers = 2, .d_ff = 40, .max_seq = T,
                          .dropout = 0.1f, .ln_eps = 1e-12f, .arch = MODEL_ARCH_BERT, .max_positions = T + 5,
                          .type_vocab = 2, .init_std = 0.02f, .pad_id = PAD_ID};
    // A WordPiece-like vocabulary: ids 0..4 [PAD] [UNK] [CLS] [SEP] [MASK], never selected (PAD and MASK never are).
    s.mask = (MaskConfig){.scheme = MASK_SCHEME_BERT, .prob = 0.2f, .unchanged_prob = 0.1f, .random_prob = 0.1f,
                          .n_tokens = 57, .n_chars = 57, .pad_id = PAD_ID, .mask_id = MASK_ID, .no_mask = {1, 2, 3},
                          .n_no_mask = 3, .seq_len = T};
    s.oc = (OptimConfig){.kind = OPTIM_ADAMW, .schedule = SCHED_LINEAR, .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f,
                         .eps = 1e-6f, .weight_decay = 0.01f, .warmup = 2, .d_model = 16, .total_steps = 100};
    s.max_B = 6;
    s.layout = model_rng_layout(&s.cfg, s.max_B);
    s.seed = 77;
    return s;
}

// Sequences of random tokens (30% id 7) with [PAD] tails of various lengths (row r: r % 4 * 3 trailing PADs).
static void random_tokens(int *tokens, int B, int T) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            tokens[b * T + t] = t >= T - (b % 4) * 3 ? PAD_ID : rand_unit() < 0.3 ? 7 : 5 + (int)(rand_unit() * 52);
}

static void test_model(const Setup *s, CpuModel *cm, CudaModel *gm, Rng *rng, int B, uint64_t step, int dropout,
                       int sparse) {
    const ModelConfig *c = &s->cfg;
    int T = c->max_seq, V = c->vocab;
    size_t n = (size_t)B * T, P = model_num_params(c);
    int *tokens = mlm_malloc(n * sizeof(int), "tokens"), *inputs = mlm_malloc(n * sizeof(int), "inputs");
    int *labels = mlm_malloc(n * sizeof(int), "labels");
    float *u = mlm_malloc(4 * n * sizeof(float), "uniforms"), *grads = mlm_malloc(P * sizeof(float), "grads");
    random_tokens(tokens, B, T);
    rng_uniform(rng, rng_mask_offset(&s->layout, step), u, 4 * n);
    mask_apply(&s->mask, tokens, n, u, inputs, labels);
    DropoutCtx d = {.rng = rng, .layout = s->layout, .step = step, .p = dropout ? c->dropout : 0.0f};
    cpu_model_set_sparse_prediction(cm, sparse);
    int correct_c = 0;
    float loss_c = cpu_model_forward(cm, inputs, labels, B, PAD_ID, &d, &correct_c);
    int targets_c = cm->n_targets;
    cpu_model_backward(cm);
    CudaRandom rnd = {.philox_seed = rng->seed, .layout = s->layout, .step = step, .dropout_p = d.p};
    CudaStepStats st;
    cuda_model_set_sparse_prediction(gm, sparse);
    cuda_model_forward(gm, tokens, NULL, B, PAD_ID, &s->mask, &rnd, &st);
    cuda_model_backward(gm);
    cuda_model_get_grads(gm, grads);
    int *g_in = mlm_malloc(n * sizeof(int), "inputs"), *g_lab = mlm_malloc(n * sizeof(int), "labels");
    cuda_model_get_batch(gm, g_in, g_lab, B);
    int same_batch = !memcmp(g_in, inputs, n * sizeof(int)) && !memcmp(g_lab, labels, n * sizeof(int));
    char where[96];
    double rg = fixture_worst_tensor_err(c, grads, cm->grads, where);
    double rl = fabs((double)st.loss - loss_c) / fmax(fabs(loss_c), 1e-30);
    int pad_row_zero = 1;
    for (int k = 0; k < c->d_model; k++) pad_row_zero &= grads[(size_t)PAD_ID * c->d_model + k] == 0.0f;
    printf("  batch %d (max %d), step %llu, dropout %s, %s head: masks equal %d, targets %d/%d, loss %.7f/%.7f (rel "
           "%.1e), correct %d/%d, grads %.1e (%s), [PAD] row frozen %d\n", B, s->max_B, (unsigned long long)step,
           dropout ? "0.1" : "off", sparse ? "sparse" : "dense", same_batch, st.n_targets, targets_c, st.loss, loss_c,
           rl, st.correct, correct_c, rg, where, pad_row_zero);
    CHECK(same_batch, "the device masked other positions than the CPU");
    CHECK(st.n_targets == targets_c && targets_c > 0, "targets CUDA %d CPU %d", st.n_targets, targets_c);
    CHECK(rl <= 1e-5, "loss CUDA %.9g CPU %.9g", st.loss, loss_c);
    // Near ties: with a random model, logits are close; one flip per 2 targets would be a bug, a couple is rounding.
    CHECK(abs(st.correct - correct_c) <= 1, "correct CUDA %d CPU %d", st.correct, correct_c);
    CHECK(rg <= 1e-4, "gradient %s: CUDA vs CPU %.3e > 1e-4", where, rg);
    CHECK(pad_row_zero, "the [PAD] row's gradient on the device is not 0");
    (void)V;
    free(tokens), free(inputs), free(labels), free(u), free(grads), free(g_in), free(g_lab);
}

// Graphs on vs off: two training steps each from the same state, bit for bit.
static void test_graphs(const Setup *s, CudaModel *gm, const float *init, uint64_t seed) {
    const ModelConfig *c = &s->cfg;
    int B = s->max_B, T = c->max_seq;
    size_t n = (size_t)B * T, P = model_num_params(c);
    int *tokens = mlm_malloc(n * sizeof(int), "tokens");
    random_tokens(tokens, B, T);
    float *zeros = mlm_calloc(P, sizeof(float), "zeros"), *out[2];
    uint8_t *decay = mlm_malloc(P, "decay");
    model_decay_mask(c, decay);
    cuda_model_set_decay_mask(gm, decay);
    cuda_model_set_sparse_prediction(gm, 0);
    float loss[2][2];
    for (int graphs = 0; graphs < 2; graphs++) {
        cuda_model_set_graphs(gm, graphs);
        cuda_model_set_params(gm, init);
        cuda_model_set_adam(gm, zeros, zeros);
        for (int t = 1; t <= 2; t++) {
            CudaRandom rnd = {.philox_seed = seed, .layout = s->layout, .step = (uint64_t)t - 1, .dropout_p = c->dropout};
            CudaStepStats st;
            cuda_model_train_step(gm, tokens, B, &s->mask, &rnd, 1.0f, &s->oc, t, optim_lr(&s->oc, t), &st);
            loss[graphs][t - 1] = st.loss;
        }
        out[graphs] = mlm_malloc(P * sizeof(float), "params");
        cuda_model_get_params(gm, out[graphs]);
    }
    int same = !memcmp(out[0], out[1], P * sizeof(float)) && !memcmp(loss[0], loss[1], sizeof(loss[0]));
    printf("two training steps, graphs off vs on: losses %.7f %.7f / %.7f %.7f, parameters bit-identical %d\n",
           loss[0][0], loss[0][1], loss[1][0], loss[1][1], same);
    CHECK(same, "graphs on and off differ");
    cuda_model_set_graphs(gm, 1);
    free(tokens), free(zeros), free(decay), free(out[0]), free(out[1]);
}

// Two micro-batches (rows 0..2 and 3..5 of one batch) accumulated on the device vs the CPU's accumulation.
static void test_accumulation(const Setup *s, CpuModel *cm, CudaModel *gm, Rng *rng, const float *init) {
    const ModelConfig *c = &s->cfg;
    int B = s->max_B, T = c->max_seq, half = B / 2;
    size_t n = (size_t)B * T, P = model_num_params(c);
    int *tokens = mlm_malloc(n * sizeof(int), "tokens"), *inputs = mlm_malloc(n * sizeof(int), "inputs");
    int *labels = mlm_malloc(n * sizeof(int), "labels");
    float *u = mlm_malloc(4 * n * sizeof(float), "u"), *acc = mlm_calloc(P, sizeof(float), "acc");
    float *g = mlm_malloc(P * sizeof(float), "grads");
    random_tokens(tokens, B, T);
    uint64_t step = 11;
    rng_uniform(rng, rng_mask_offset(&s->layout, step), u, 4 * n);
    mask_apply(&s->mask, tokens, n, u, inputs, labels);
    int targets = 0;
    for (size_t i = 0; i < n; i++) targets += labels[i] != PAD_ID;
    cuda_model_set_params(gm, init);
    memcpy(cm->params, init, P * sizeof(float));
    cpu_model_set_sparse_prediction(cm, 0);
    cuda_model_set_sparse_prediction(gm, 0);
    for (int k = 0; k < 2; k++) {
        int r0 = k * half;
        DropoutCtx d = {.rng = rng, .layout = s->layout, .step = step, .p = c->dropout, .first_row = r0, .rows = half};
        cm->norm_targets = targets;
        cpu_model_forward(cm, inputs + (size_t)r0 * T, labels + (size_t)r0 * T, half, PAD_ID, &d, NULL);
        cpu_model_backward(cm);
        for (size_t i = 0; i < P; i++) acc[i] += cm->grads[i];
        CudaRandom rnd = {.philox_seed = rng->seed, .layout = s->layout, .step = step, .dropout_p = c->dropout,
                          .first_row = r0, .batch_rows = B};
        cuda_model_accumulate(gm, tokens + (size_t)r0 * T, half, &s->mask, &rnd, targets, k == 0);
    }
    cm->norm_targets = 0;
    cuda_model_get_accumulated_grads(gm, g);
    char where[96];
    double rg = fixture_worst_tensor_err(c, g, acc, where);
    printf("two accumulated micro-batches (dropout 0.1), CUDA vs CPU: %d targets, grads %.1e (%s)\n", targets, rg, where);
    CHECK(rg <= 1e-4, "accumulated gradient %s: CUDA vs CPU %.3e > 1e-4", where, rg);
    free(tokens), free(inputs), free(labels), free(u), free(acc), free(g);
}

int main(int argc, char **argv) {
    (void)argc, (void)argv;
    char why[256];
    if (cuda_device_count(why, sizeof(why)) == 0) return test_skip(why);
    test_embedding_kernels();
    test_gelu_kernels();
    test_attention_mask(13);   // one key tile
    test_attention_mask(70);   // three
    for (int pass = 0; pass < 2; pass++) {
        // T 19: one tile of the tiled attention; T 66: three.
        int T = pass == 0 ? 19 : 66;
        Setup s = setup(T);
        const ModelConfig *c = &s.cfg;
        size_t P = model_num_params(c);
        printf("model.arch = bert on CUDA, TF32 off (V %d, C %d, H %d, L %d, F %d, T %d, max batch %d)\n", c->vocab,
               c->d_model, c->n_heads, c->n_layers, c->d_ff, T, s.max_B);
        float *init = mlm_malloc(P * sizeof(float), "init");
        model_init_params(c, init, s.seed, 0);
        // Off the init (biases 0, LayerNorms 1, weights 0.02): every gradient generic; the [PAD] row stays 0.
        for (size_t i = 0; i < P; i++) init[i] += rand_sym(0.15f);
        memset(init + (size_t)PAD_ID * c->d_model, 0, (size_t)c->d_model * sizeof(float));
        // A decoder bias that favours id 7, which is 30% of the tokens (random_tokens): about a third of the
        // predictions are right, so the accuracy comparison counts something.
        ParamTensors pv;
        model_param_views(c, init, &pv);
        pv.gen_b[7] = 4.0f;
        CpuModel *cm = cpu_model_create(c, s.max_B);
        CudaModel *gm = cuda_model_create(c, s.max_B, 0);
        memcpy(cm->params, init, P * sizeof(float));
        cuda_model_set_params(gm, init);
        Rng rng;
        rng_init(&rng, s.seed, RNG_DOMAIN_TRAIN);
        test_model(&s, cm, gm, &rng, s.max_B, 3, 0, 0);
        test_model(&s, cm, gm, &rng, s.max_B, 4, 1, 0);
        if (pass == 0) {
            test_model(&s, cm, gm, &rng, 4, 5, 1, 0);
            test_model(&s, cm, gm, &rng, s.max_B, 6, 1, 1);
            // Whole-word masking: ids 30..56 continue a word (## pieces).
            unsigned char cont[57] = {0};
            for (int i = 30; i < 57; i++) cont[i] = 1;
            s.mask.whole_word = 1;
            s.mask.continuation = cont;
            cuda_model_set_continuation(gm, cont);
            printf("  whole-word masking:\n");
            test_model(&s, cm, gm, &rng, s.max_B, 7, 1, 0);
            s.mask.whole_word = 0;
            s.mask.continuation = NULL;
            test_graphs(&s, gm, init, rng.seed);
            test_accumulation(&s, cm, gm, &rng, init);
        }
        rng_free(&rng);
        cpu_model_free(cm);
        cuda_model_free(gm);
        free(init);
    }
    return test_finish("test_gpu_bert");
}
