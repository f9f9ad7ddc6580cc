// test_cpu_bf16.c (unit): the CPU model's train.precision = bf16 mode (cpu_model_set_bf16), both architectures, with
// dropout and [PAD] positions:
//   - the BF16 copy the forward reads is THE ROUNDING RULE of the masters at offset updates x P (computed here from
//     philox_u32 and the scalar rule), and cpu_model_round_params(t) makes it again for step t;
//   - the logits (a tensor the CUDA backend stores in BF16) are BF16 values, the parameter gradients FP32 values (most
//     of them are not BF16 values);
//   - the loss is the FP32 model's on the same (BF16) parameters within what the roundings explain: each of the K
//     roundings on a path to the loss moves a value by at most 2^-9 of it; with K <= 8 per layer plus 4 in the head
//     the loss moves by less than K 2^-8 of its size (loose: errors of a random net's layers do not all add up);
//   - bit-identical results for 1 and 2 threads, and masters untouched by the forward and backward.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/bf16.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/model.h"
#include "mlm/rng.h"
#include "test_util.h"

static ModelConfig config(int bert) {
    ModelConfig c = {.vocab = 37, .d_model = 24, .n_heads = 4, .n_layers = 2, .d_ff = 40, .max_seq = 11,
                     .dropout = 0.1f, .ln_eps = 1e-5f};
    if (bert) {
        c.ln_eps = 1e-12f, c.arch = MODEL_ARCH_BERT, c.max_positions = 14, c.type_vocab = 2, c.init_std = 0.02f;
        c.pad_id = 35;
    }
    return c;
}

static int is_bf16_value(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (u & 0xffffu) == 0;
}

typedef struct {
    float loss;
    int correct;
    float *logits, *grads;
} Result;

static Result run(CpuModel *m, const int *inputs, const int *labels, int B, int pad, Rng *rng) {
    const ModelConfig *c = &m->cfg;
    DropoutCtx d = {rng, model_rng_layout(c, m->max_B), 4, c->dropout, 0, 0};
    Result r;
    r.loss = cpu_model_forward(m, inputs, labels, B, pad, &d, &r.correct);
    size_t nl = (size_t)B * c->max_seq * c->vocab;
    r.logits = mlm_malloc(nl * sizeof(float), "logits");
    memcpy(r.logits, m->logits, nl * sizeof(float));
    cpu_model_backward(m);
    r.grads = mlm_malloc(m->n_params * sizeof(float), "grads");
    memcpy(r.grads, m->grads, m->n_params * sizeof(float));
    return r;
}

static void test_arch(int bert) {
    const char *name = bert ? "bert" : "labml";
    ModelConfig c = config(bert);
    const int B = 3, T = c.max_seq, V = c.vocab, pad = bert ? c.pad_id : V - 2;
    const uint64_t seed = rng_domain_seed(77, RNG_DOMAIN_ROUND);
    CpuModel *m = cpu_model_create(&c, B), *ref = cpu_model_create(&c, B);
    model_init_params(&c, m->params, 11, 0);
    size_t P = m->n_params;
    float *masters = mlm_malloc(P * sizeof(float), "masters");
    memcpy(masters, m->params, P * sizeof(float));
    cpu_model_set_bf16(m, seed);

    // The copy: THE ROUNDING RULE at offset 0, then at step 5's offset 5 P.
    uint32_t *r = mlm_malloc(P * sizeof(uint32_t), "philox");
    for (int pass = 0; pass < 2; pass++) {
        uint64_t t = pass ? 5 : 0;
        if (pass) cpu_model_round_params(m, t);
        philox_u32(seed, t * P, r, P);
        size_t bad = 0;
        for (size_t i = 0; i < P; i++) bad += m->p.tok_emb[i] != bf16_to_float(bf16_stochastic_bits(masters[i], r[i]));
        CHECK(bad == 0, "%s: %zu of %zu parameters of the copy after %llu updates are not THE ROUNDING RULE's", name, bad,
              P, (unsigned long long)t);
    }
    CHECK(memcmp(m->params, masters, P * sizeof(float)) == 0, "%s: making the copy changed the masters", name);

    int *inputs = mlm_malloc((size_t)B * T * sizeof(int), "inputs"), *labels = mlm_malloc((size_t)B * T * sizeof(int),
                                                                                           "labels");
    for (int i = 0; i < B * T; i++) {
        inputs[i] = (i * 7 + 3) % (V - 2);
        labels[i] = i % 4 == 0 ? (i * 5 + 1) % (V - 2) : pad;
        if (bert && i % T >= T - 2) inputs[i] = pad;  // [PAD] keys at the end of each sequence
    }
    Rng rng;
    rng_init(&rng, 3, RNG_DOMAIN_TRAIN);
    Result h = run(m, inputs, labels, B, pad, &rng);
    size_t nl = (size_t)B * T * V, not_bf16 = 0, bad_logits = 0;
    for (size_t i = 0; i < nl; i++) bad_logits += !is_bf16_value(h.logits[i]);
    for (size_t i = 0; i < P; i++) not_bf16 += h.grads[i] != 0.0f && !is_bf16_value(h.grads[i]);
    CHECK(bad_logits == 0, "%s: %zu of %zu logits are not BF16 values", name, bad_logits, nl);
    CHECK(not_bf16 > P / 4, "%s: only %zu of %zu parameter gradients are not BF16 values (they accumulate in FP32)",
          name, not_bf16, P);
    CHECK(memcmp(m->params, masters, P * sizeof(float)) == 0, "%s: the forward or backward changed the masters", name);

    // The FP32 model on the same BF16-valued parameters: only the activations' roundings differ.
    memcpy(ref->params, m->p.tok_emb, P * sizeof(float));
    Result f = run(ref, inputs, labels, B, pad, &rng);
    int K = 8 * c.n_layers + 4;
    double bound = K / 256.0 * fabs(f.loss);
    CHECK(fabs(h.loss - f.loss) <= bound && h.loss != f.loss,
          "%s: bf16 loss %.7f, fp32 loss %.7f on the same parameters (bound %.2g; equal means nothing was rounded)", name,
          h.loss, f.loss, bound);

    // One thread against two: the same bits.
    int threads = omp_get_max_threads();
    omp_set_num_threads(threads > 1 ? 1 : 2);
    Result h1 = run(m, inputs, labels, B, pad, &rng);
    omp_set_num_threads(threads);
    CHECK(memcmp(&h1.loss, &h.loss, sizeof(float)) == 0 && memcmp(h1.logits, h.logits, nl * sizeof(float)) == 0 &&
              memcmp(h1.grads, h.grads, P * sizeof(float)) == 0,
          "%s: bf16 results depend on the thread count", name);
    printf("  %s: copy = THE ROUNDING RULE (0 and 5 updates); logits BF16, %zu of %zu gradients FP32-only; loss bf16 "
           "%.6f vs fp32 %.6f on the same parameters (bound %.3f); thread count independent\n", name, not_bf16, P,
           h.loss, f.loss, bound);
    free(h.logits), free(h.grads), free(f.logits), free(f.grads), free(h1.logits), free(h1.grads);
    free(inputs), free(labels), free(masters), free(r);
    rng_free(&rng);
    cpu_model_free(m);
    cpu_model_free(ref);
}

int main(void) {
    printf("test_cpu_bf16: the CPU model's train.precision = bf16 mode\n");
    test_arch(0);
    test_arch(1);
    return test_finish("test_cpu_bf16");
}
