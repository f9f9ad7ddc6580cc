// test_gpu_bert.c (gpu; under the emu layer: test_emu_bert): model.arch = bert on the CUDA backend, TF32 off.
//
//  1. The new kernels against their CPU twins: cuda_bert_embedding_forward / _backward (bit-identical: the same
//     additions in the same order), cuda_bias_gelu_forward / cuda_gelu_backward (within 4 ulp: the device's erff
//     and expf are within 2 ulp of the host's, bit-identical under the emu layer, which calls the host's),
//     cuda_key_valid (exact), and the key-padding mask in both attention paths (the fused kernel, T <= 64, and
//     cuda_softmax_forward, T 70) against attention_forward with the same mask: probabilities within 1e-6, the
//     masked keys' exactly 0, a sequence of nothing but [PAD] attending to every key.
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
    // 4 ulp of the larger of |value| and 1e-30 (the device's erff/expf: within 2 ulp each, then two roundings).
    double worst = 0.0;
    int pre_same = !memcmp(pre_c, pre_g, n * 4);
    for (size_t i = 0; i < n; i++) {
        double e1 = fabs((double)out_c[i] - out_g[i]) / (4 * 1.2e-7 * fmax(fabs((double)out_c[i]), 1e-30));
        double e2 = fabs((double)din_c[i] - din_g[i]) / (4 * 1.2e-7 * fmax(fabs((double)din_c[i]), 1e-30));
        worst = fmax(worst, fmax(e1, e2));
    }
    printf("GELU kernels on %zu values: pre-activation (bias add) bit-identical %d, worst error / 4 ulp %.3f\n", n,
           pre_same, worst);
    CHECK(pre_same && worst <= 1.0, "cuda_bias_gelu_forward / cuda_gelu_backward differ from gelu.c");
    CUDA_CHECK(cudaFree(d_pre)); CUDA_CHECK(cudaFree(d_bias)); CUDA_CHECK(cudaFree(d_out)); CUDA_CHECK(cudaFree(d_dout));
    free(x), free(bias), free(dout), free(pre_c), free(out_c), free(din_c), free(pre_g), free(out_g), free(din_g);
}

// The key-padding mask through both attention paths vs attention_forward with the same mask.
static void test_attention_mask(int T) {
    enum { B = 3, C = 8, H = 2 };
    int hs = C / H, BH = B * H;
    size_t nqkv = (size_t)B * T * 3 * C, natt = (size_t)BH * T * T;
    float *qkv = rand_floats(nqkv, 1.5f);
    int *inputs = mlm_malloc((size_t)B * T * sizeof(int), "inputs");
    const int pad = 0;
    for (int i = 0; i < B * T; i++) inputs[i] = 1 + i % 5;
    for (int t = T - 3; t < T; t++) inputs[T + t] = pad;  // sequence 1: a [PAD] tail
    inputs[T + 1] = pad;                                  // and one inside
    for (int t = 0; t < T; t++) inputs[2 * T + t] = pad;  // sequence 2: nothing but [PAD]
    uint8_t *valid = mlm_malloc((size_t)B * T, "valid"), *valid_g = mlm_malloc((size_t)B * T, "valid");
    for (int i = 0; i < B * T; i++) valid[i] = inputs[i] != pad;
    float *att_c = mlm_malloc(natt * 4, "att"), *out_c = mlm_malloc((size_t)B * T * C * 4, "out");
    attention_forward(out_c, att_c, qkv, NULL, 1.0f, B, T, C, H, valid);
    int *d_in = (int *)dev_copy(inputs, (size_t)B * T * sizeof(int));
    uint8_t *d_valid = (uint8_t *)dev_copy(NULL, 0);
    CUDA_CHECK(cudaFree(d_valid));
    CUDA_CHECK(cudaMalloc((void **)&d_valid, (size_t)B * T));
    cuda_key_valid(d_valid, d_in, (size_t)B * T, pad, 0);
    host_copy(valid_g, d_valid, (size_t)B * T);
    float *att_g = mlm_malloc(natt * 4, "att");
    float *d_att;
    CUDA_CHECK(cudaMalloc((void **)&d_att, natt * 4));
    const char *path;
    if (cuda_attention_fused_fits(T, C, H)) {
        path = "fused kernel";
        float *d_qkv = dev_copy(qkv, nqkv * 4), *d_out;
        CUDA_CHECK(cudaMalloc((void **)&d_out, (size_t)B * T * C * 4));
        cuda_attention_forward(d_out, d_att, d_qkv, NULL, NULL, 1.0f, B, T, C, H, d_valid, 0);
        CUDA_CHECK(cudaFree(d_qkv));
        CUDA_CHECK(cudaFree(d_out));
    } else {
        path = "cuda_softmax_forward";
        // The unscaled scores Q K^T per (b, h) on the host, in double rounded to float (the kernel scales them).
        float *scores = mlm_malloc(natt * 4, "scores");
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < T; i++)
                    for (int j = 0; j < T; j++) {
                        double s = 0.0;
                        for (int d = 0; d < hs; d++)
                            s += (double)qkv[((size_t)b * T + i) * 3 * C + h * hs + d] *
                                 qkv[((size_t)b * T + j) * 3 * C + C + h * hs + d];
                        scores[(((size_t)b * H + h) * T + i) * T + j] = (float)s;
                    }
        CUDA_CHECK(cudaMemcpy(d_att, scores, natt * 4, cudaMemcpyHostToDevice));
        cuda_softmax_forward(d_att, NULL, NULL, 1.0f, 1.0f / sqrtf((float)hs), BH, T, d_valid, H, 0);
        free(scores);
    }
    host_copy(att_g, d_att, natt * 4);
    double worst = 0.0;
    int leaked = 0, uniform_ok = 1;
    for (size_t k = 0; k < natt; k++) {
        worst = fmax(worst, fabs((double)att_c[k] - att_g[k]));
        int b = (int)(k / ((size_t)H * T * T)), j = (int)(k % (size_t)T);
        if (b == 1 && !valid[T + j]) leaked += att_g[k] != 0.0f;
        if (b == 2) uniform_ok &= att_g[k] > 0.0f;  // no valid key: every key attended
    }
    printf("attention key mask, T %d (%s): cuda_key_valid exact %d, probabilities max |CUDA - CPU| %.2e, %d masked "
           "probabilities non-zero, all-[PAD] sequence attends to every key %d\n", T, path,
           !memcmp(valid, valid_g, (size_t)B * T), worst, leaked, uniform_ok);
    CHECK(!memcmp(valid, valid_g, (size_t)B * T), "cuda_key_valid differs");
    CHECK(worst <= 1e-6 && leaked == 0 && uniform_ok, "key-padding mask: CUDA differs from attention_forward");
    CUDA_CHECK(cudaFree(d_in)); CUDA_CHECK(cudaFree(d_valid)); CUDA_CHECK(cudaFree(d_att));
    free(qkv), free(inputs), free(valid), free(valid_g), free(att_c), free(out_c), free(att_g);
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
    test_attention_mask(13);
    test_attention_mask(70);
    for (int pass = 0; pass < 2; pass++) {
        // T 19: the fused attention kernel; T 66: cuda_softmax_forward and the batched products.
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
