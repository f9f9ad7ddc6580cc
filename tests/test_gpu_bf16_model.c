// test_gpu_bf16_model.c (gpu; under the emu layer: test_emu_bf16_model[_rev]): train.precision = bf16 on the CUDA
// backend against the CPU backend's bf16 mode (the reference: the same tensors rounded to BF16 at the same points,
// src/cpu/cpu_model.c's bf16_point), both architectures, the tiled attention (T 33: three key tiles of the CPU's,
// one of the device's and more at T 65), dropout off and on, [PAD] tails for bert.
//
//  1. Forward and backward from the same FP32 masters. The BF16 copy of the parameters is bit-identical (both are
//     THE ROUNDING RULE at offset 0). Where the two backends round the same FP32 value they store the same BF16 value;
//     their FP32 values differ by float rounding (the products and LayerNorm reductions sum in other orders, a few
//     float ulps), and such a difference crosses a BF16 rounding boundary with probability about (float ulps of the
//     difference) / 2^16 per element and rounding point: with some 10^5 roundings a forward, a handful of BF16 values
//     flip by one BF16 ulp (2^-8 relative), and each flip spreads to what depends on it (a position's logits, a
//     sequence's attention). So: at least 95% of the logits bit-identical (a rounding point one backend lacks or
//     adds changes about half the values it touches and every one after it; a flip early in the network changes at
//     most a sequence's rows: 3% of the logits at B 4); the loss within the bound the differing logits allow (a
//     row's cross-entropy moves by at most 2 max_v |d logit_v|, averaged over the targets) plus 1e-6; every gradient
//     tensor within 4 BF16 ulps (4 x 2^-8) of its largest element (a flip perturbs its element by 2^-8 of itself and
//     the gradients it reaches by no more, summed over the rows it touches).
//  2. Training steps (fused step, graphs on and off): bit-identical with and without graphs; after step t the BF16
//     copy is bit for bit THE ROUNDING RULE of the device's masters at offset t x P (the Adam kernel writes it in the
//     same pass); a model loaded with the masters and moments after step 1 and cuda_model_set_bf16_rounding(.., 1)
//     continues bit for bit as the straight run (a resumed BF16 run re-rounds as the run it continues).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fixture_util.h"
#include "mlm/bf16.h"
#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/cpu.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "test_util.h"

static uint64_t lcg_state = 2023;
static double rand_unit(void) {
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(lcg_state >> 11) / 9007199254740992.0;
}

enum { PAD_ID = 0, MASK_ID = 4 };

typedef struct {
    ModelConfig cfg;
    MaskConfig mask;
    RngLayout layout;
    int max_B;
} Setup;

static Setup setup(int arch, int T) {
    Setup s;
    memset(&s, 0, sizeof(s));
    s.cfg = (ModelConfig){.vocab = 57, .d_model = 32, .n_heads = 2, .n_layers = 2, .d_ff = 64, .max_seq = T,
                          .dropout = 0.1f, .ln_eps = 1e-5f, .arch = arch, .max_positions = T + 5,
                          .type_vocab = 2, .init_std = 0.02f, .pad_id = PAD_ID};
    if (arch != MODEL_ARCH_BERT) s.cfg.ln_eps = 1e-5f;
    s.mask = (MaskConfig){.scheme = MASK_SCHEME_BERT, .prob = 0.2f, .unchanged_prob = 0.1f, .random_prob = 0.1f,
                          .n_tokens = 57, .n_chars = 57, .pad_id = PAD_ID, .mask_id = MASK_ID, .no_mask = {1, 2, 3},
                          .n_no_mask = 3, .seq_len = T};
    s.max_B = 4;
    s.layout = model_rng_layout(&s.cfg, s.max_B);
    return s;
}

static void random_tokens(int *tokens, int B, int T, int pad_tails) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            tokens[b * T + t] = pad_tails && t >= T - (b % 4) * 3 ? PAD_ID : 5 + (int)(rand_unit() * 52);
}

// The BF16 copy of a CUDA model as floats [P], and THE ROUNDING RULE of its masters at offset t x P: equal bit for bit?
static int copy_is_rounding_of_masters(CudaModel *gm, size_t P, uint64_t round_seed, uint64_t t) {
    float *masters = malloc(P * sizeof(float)), *copy = malloc(P * sizeof(float)), *want = malloc(P * sizeof(float));
    cuda_model_get_params(gm, masters);
    cuda_model_get_params16(gm, copy);
    bf16_stochastic_round_values(want, masters, P, round_seed, t * P);
    int same = !memcmp(copy, want, P * sizeof(float));
    free(masters), free(copy), free(want);
    return same;
}

static void test_forward_backward(int arch, int T, int dropout) {
    Setup s = setup(arch, T);
    const ModelConfig *c = &s.cfg;
    int B = s.max_B, V = c->vocab;
    size_t n = (size_t)B * T, P = model_num_params(c);
    uint64_t round_seed = rng_domain_seed(99, RNG_DOMAIN_ROUND);
    CpuModel *cm = cpu_model_create(c, B);
    model_init_params(c, cm->params, 1234, 0);
    cpu_model_set_bf16(cm, round_seed);
    CudaModel *gm = cuda_model_create(c, B, PRECISION_BF16);
    cuda_model_set_params(gm, cm->params);
    cuda_model_set_bf16_rounding(gm, round_seed, 0);
    CHECK(copy_is_rounding_of_masters(gm, P, round_seed, 0), "the device's BF16 copy is not THE ROUNDING RULE");
    Rng rng;
    rng_init(&rng, 5, RNG_DOMAIN_TRAIN);
    int *tokens = malloc(n * sizeof(int)), *inputs = malloc(n * sizeof(int)), *labels = malloc(n * sizeof(int));
    float *u = malloc(4 * n * sizeof(float)), *grads = malloc(P * sizeof(float));
    random_tokens(tokens, B, T, arch == MODEL_ARCH_BERT);
    uint64_t step = 3;
    rng_uniform(&rng, rng_mask_offset(&s.layout, step), u, 4 * n);
    mask_apply(&s.mask, tokens, n, u, inputs, labels);
    DropoutCtx d = {.rng = &rng, .layout = s.layout, .step = step, .p = dropout ? c->dropout : 0.0f};
    int correct_c = 0;
    float loss_c = cpu_model_forward(cm, inputs, labels, B, PAD_ID, &d, &correct_c);
    int targets = cm->n_targets;
    cpu_model_backward(cm);
    CudaRandom rnd = {.philox_seed = rng.seed, .layout = s.layout, .step = step, .dropout_p = d.p};
    CudaStepStats st;
    cuda_model_forward(gm, tokens, NULL, B, PAD_ID, &s.mask, &rnd, &st);
    float *logits = malloc(n * V * sizeof(float));
    cuda_model_get_logits(gm, logits, B);
    // Logits: bit-identical share, and the loss bound from the differing ones (per target row).
    size_t same = 0, nl = n * V;
    double loss_bound = 0.0;
    for (size_t r = 0; r < n; r++) {
        double worst = 0.0;
        for (int v = 0; v < V; v++) {
            size_t i = r * V + v;
            same += logits[i] == cm->logits[i];
            worst = fmax(worst, fabs((double)logits[i] - cm->logits[i]));
        }
        if (labels[r] != PAD_ID) loss_bound += 2.0 * worst;
    }
    loss_bound = loss_bound / (targets > 0 ? targets : 1) + 1e-6;
    cuda_model_backward(gm);
    cuda_model_get_grads(gm, grads);
    char where[96];
    double rg = fixture_worst_tensor_err(c, grads, cm->grads, where);
    printf("  %s T %d dropout %s: targets %d/%d, loss %.7f / %.7f (bound %.1e), correct %d/%d; logits bit-identical "
           "%zu of %zu; gradients %.2e (%s)\n", arch == MODEL_ARCH_BERT ? "bert " : "labml", T, dropout ? "0.1" : "off",
           st.n_targets, targets, st.loss, loss_c, loss_bound, st.correct, correct_c, same, nl, rg, where);
    CHECK(st.n_targets == targets && targets > 0, "targets CUDA %d CPU %d", st.n_targets, targets);
    CHECK((double)same >= 0.95 * (double)nl, "only %zu of %zu logits equal the CPU's bf16 ones", same, nl);
    CHECK(fabs((double)st.loss - loss_c) <= loss_bound, "loss CUDA %.9g CPU %.9g, beyond %.3g", st.loss, loss_c,
          loss_bound);
    CHECK(rg <= 4.0 / 256.0, "gradient %s: CUDA vs CPU %.3e > 4 BF16 ulps", where, rg);
    cuda_model_free(gm);
    cpu_model_free(cm);
    rng_free(&rng);
    free(tokens), free(inputs), free(labels), free(u), free(grads), free(logits);
}

// Steps 1..2 of a BF16 model from init with graphs on or off (params_out [P], losses[2]); with resume, step 2 runs on
// a second model loaded with step 1's masters and moments and the rounding of step 1.
static void two_steps(const Setup *s, const float *init, uint64_t round_seed, int graphs, int resume, float *params_out,
                      float *losses, int *copies_exact) {
    const ModelConfig *c = &s->cfg;
    int B = s->max_B, T = c->max_seq;
    size_t P = model_num_params(c), n = (size_t)B * T;
    OptimConfig oc = {.kind = OPTIM_ADAMW, .schedule = SCHED_LINEAR, .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f,
                      .eps = 1e-6f, .weight_decay = 0.01f, .warmup = 2, .d_model = c->d_model, .total_steps = 100};
    int *tokens = malloc(n * sizeof(int));
    lcg_state = 7;
    random_tokens(tokens, B, T, c->arch == MODEL_ARCH_BERT);
    float *zeros = calloc(P, sizeof(float)), *am = malloc(P * sizeof(float)), *av = malloc(P * sizeof(float));
    uint8_t *decay = malloc(P);
    model_decay_mask(c, decay);
    CudaModel *gm = cuda_model_create(c, B, PRECISION_BF16);
    cuda_model_set_graphs(gm, graphs);
    cuda_model_set_decay_mask(gm, decay);
    cuda_model_set_params(gm, init);
    cuda_model_set_adam(gm, zeros, zeros);
    cuda_model_set_bf16_rounding(gm, round_seed, 0);
    *copies_exact = 1;
    for (int t = 1; t <= 2; t++) {
        if (t == 2 && resume) {
            float *masters = malloc(P * sizeof(float));
            cuda_model_get_params(gm, masters);
            cuda_model_get_adam(gm, am, av);
            cuda_model_free(gm);
            gm = cuda_model_create(c, B, PRECISION_BF16);
            cuda_model_set_graphs(gm, graphs);
            cuda_model_set_decay_mask(gm, decay);
            cuda_model_set_params(gm, masters);
            cuda_model_set_adam(gm, am, av);
            cuda_model_set_bf16_rounding(gm, round_seed, 1);
            free(masters);
        }
        CudaRandom rnd = {.philox_seed = 4242, .layout = s->layout, .step = (uint64_t)t - 1, .dropout_p = c->dropout};
        CudaStepStats st;
        cuda_model_train_step(gm, tokens, B, &s->mask, &rnd, 1.0f, &oc, t, optim_lr(&oc, t), &st);
        losses[t - 1] = st.loss;
        *copies_exact &= copy_is_rounding_of_masters(gm, P, round_seed, (uint64_t)t);
    }
    cuda_model_get_params(gm, params_out);
    cuda_model_free(gm);
    free(tokens), free(zeros), free(am), free(av), free(decay);
}

static void test_training(int arch) {
    Setup s = setup(arch, 33);
    size_t P = model_num_params(&s.cfg);
    float *init = malloc(P * sizeof(float)), *out[3], loss[3][2];
    model_init_params(&s.cfg, init, 1234, 0);
    uint64_t round_seed = rng_domain_seed(99, RNG_DOMAIN_ROUND);
    int exact[3];
    for (int k = 0; k < 3; k++) {
        out[k] = malloc(P * sizeof(float));
        two_steps(&s, init, round_seed, k != 1, k == 2, out[k], loss[k], &exact[k]);
    }
    int graphs_same = !memcmp(out[0], out[1], P * sizeof(float)) && !memcmp(loss[0], loss[1], sizeof(loss[0]));
    int resume_same = !memcmp(out[0], out[2], P * sizeof(float)) && !memcmp(loss[0], loss[2], sizeof(loss[0]));
    printf("  %s: two steps, losses %.7f %.7f; graphs on == off %d; resumed after step 1 == straight %d; the BF16 copy "
           "after each step is THE ROUNDING RULE of the masters at t x P: %d %d %d\n",
           arch == MODEL_ARCH_BERT ? "bert " : "labml", loss[0][0], loss[0][1], graphs_same, resume_same, exact[0],
           exact[1], exact[2]);
    CHECK(graphs_same, "bf16 training steps differ with graphs on and off");
    CHECK(resume_same, "a bf16 run resumed after step 1 differs from the straight run");
    CHECK(exact[0] && exact[1] && exact[2], "the BF16 copy after an update is not THE ROUNDING RULE at t x P");
    for (int k = 0; k < 3; k++) free(out[k]);
    free(init);
}

int main(int argc, char **argv) {
    (void)argc, (void)argv;
    char why[256];
    if (cuda_device_count(why, sizeof(why)) == 0) return test_skip(why);
    printf("test_gpu_bf16_model: train.precision = bf16, CUDA vs the CPU's bf16 mode\n");
    static const int Ts[] = {33, 65};
    for (int arch = MODEL_ARCH_LABML; arch <= MODEL_ARCH_BERT; arch++)
        for (size_t k = 0; k < sizeof(Ts) / sizeof(Ts[0]); k++)
            for (int dropout = 0; dropout < 2; dropout++) test_forward_backward(arch, Ts[k], dropout);
    for (int arch = MODEL_ARCH_LABML; arch <= MODEL_ARCH_BERT; arch++) test_training(arch);
    return test_finish("test_gpu_bf16_model");
}
