// test_sparse_cpu.c: sparse prediction on the CPU backend (cpu_model_set_sparse_prediction) against the dense
// head of the same model: loss, accuracy, target count, the selected rows' logits and every gradient tensor,
// with dropout off and on, on full and partial batches, with no selected position and with all of them
// selected; and a forward without labels keeps every position's logits.
//
// Reference: the dense path (itself checked against finite differences and PyTorch in test_cpu_model and
// test_reference_fixture). The sparse head runs the same per-row operations on fewer rows, so the loss,
// accuracy and logits agree to float rounding, and the gradients differ only by the zero terms the dense
// sums add for unselected rows (the matmul's blocking may round differently): per tensor,
// max |sparse - dense| <= 1e-5 x max |dense| (a wrong scatter, row or scale moves a tensor by O(1)). The
// key-attention bias is the exception (as in test_gpu_model): the softmax cancels it, its gradient is zero
// in exact arithmetic and rounding noise on both sides, so it is measured against the largest gradient of
// the whole model.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/model.h"
#include "mlm/rng.h"
#include "fixture_util.h"
#include "test_util.h"

#define SPARSE_TOL 1e-5

static uint64_t lcg_state = 2024;
static double rand_unit(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) / 9007199254740992.0;
}

// Fresh parameters with the final LayerNorm moved off 1 and 0 (generic gradients through it).
static void init_params(CpuModel *m, uint64_t seed) {
    model_init_params(&m->cfg, m->params, seed, 0);
    for (int i = 0; i < m->cfg.d_model; i++) {
        m->p.lnf_w[i] += (float)(0.4 * rand_unit() - 0.2);
        m->p.lnf_b[i] = (float)(0.4 * rand_unit() - 0.2);
    }
    // A classifier bias that favours id 3, and labels of which a third are 3 (random_batch), so that about a
    // third of the predictions are right and the accuracy comparison counts something.
    m->p.gen_b[3] = 4.0f;
}

// Per parameter tensor: max |a - b| / max |b| (the absolute difference where b is all zero).
// worst_name[96] receives the tensor's name.
static double worst_tensor_err(const ModelConfig *c, const float *a, const float *b, char *worst_name) {
    int n_tab = model_param_table(c, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n_tab * sizeof(ParamEntry), "parameter table");
    model_param_table(c, tab);
    double worst = 0.0, largest = 0.0;
    for (size_t i = 0; i < model_num_params(c); i++) largest = fmax(largest, fabs((double)b[i]));
    for (int k = 0; k < n_tab; k++) {
        size_t n = fixture_entry_numel(&tab[k]);
        double num = 0.0, den = fixture_is_key_bias(tab[k].name) ? largest : 0.0;
        for (size_t i = 0; i < n; i++) {
            double d = fabs((double)a[tab[k].offset + i] - (double)b[tab[k].offset + i]);
            num = isnan(d) ? INFINITY : fmax(num, d);
            den = fmax(den, fabs((double)b[tab[k].offset + i]));
        }
        double r = den > 0 ? num / den : num;
        if (r >= worst) {
            worst = r;
            snprintf(worst_name, 96, "%s", tab[k].name);
        }
    }
    free(tab);
    return worst;
}

// One batch through the dense and the sparse head of one model; every check of the header.
static void compare(const char *what, CpuModel *m, const int *inputs, const int *labels, int B, int pad,
                    const DropoutCtx *drop) {
    const ModelConfig *c = &m->cfg;
    size_t N = (size_t)B * c->max_seq, V = c->vocab, P = m->n_params;
    int expect = 0;
    for (size_t i = 0; i < N; i++) expect += labels[i] != pad;

    cpu_model_set_sparse_prediction(m, 0);
    int correct_d = -1;
    float loss_d = cpu_model_forward(m, inputs, labels, B, pad, drop, &correct_d);
    int targets_d = m->n_targets;
    float *logits_d = mlm_malloc(N * V * sizeof(float), "dense logits");
    memcpy(logits_d, m->logits, N * V * sizeof(float));
    cpu_model_backward(m);
    float *grads_d = mlm_malloc(P * sizeof(float), "dense grads");
    memcpy(grads_d, m->grads, P * sizeof(float));

    cpu_model_set_sparse_prediction(m, 1);
    int correct_s = -1;
    float loss_s = cpu_model_forward(m, inputs, labels, B, pad, drop, &correct_s);
    int targets_s = m->n_targets;
    // The selected rows' logits, in position order, against the dense rows.
    double logit_err = 0.0, logit_max = 0.0;
    int row = 0;
    for (size_t i = 0; i < N; i++) {
        if (labels[i] == pad) continue;
        for (size_t v = 0; v < V; v++) {
            logit_err = fmax(logit_err, fabs((double)m->logits[row * V + v] - logits_d[i * V + v]));
            logit_max = fmax(logit_max, fabs((double)logits_d[i * V + v]));
        }
        row++;
    }
    cpu_model_backward(m);
    char worst_name[96] = "-";
    double grad_err = worst_tensor_err(c, m->grads, grads_d, worst_name);
    int all_zero = 1;
    for (size_t i = 0; i < P; i++) all_zero &= m->grads[i] == 0.0f && grads_d[i] == 0.0f;

    printf("  %-44s targets %3d  loss dense %.7f sparse %.7f  correct %d/%d  logits %.1e  grads %.1e (%s)\n",
           what, targets_s, loss_d, loss_s, correct_d, correct_s, logit_max > 0 ? logit_err / logit_max : 0.0,
           grad_err, worst_name);
    CHECK(targets_d == expect && targets_s == expect, "%s: targets dense %d sparse %d, labels have %d", what,
          targets_d, targets_s, expect);
    CHECK(fabsf(loss_s - loss_d) <= 1e-6f * fmaxf(1.0f, fabsf(loss_d)), "%s: loss sparse %.9g dense %.9g", what,
          loss_s, loss_d);
    CHECK(correct_s == correct_d, "%s: correct sparse %d dense %d", what, correct_s, correct_d);
    CHECK(logit_err <= 1e-6 * fmax(logit_max, 1.0), "%s: selected logits differ by %.3e", what, logit_err);
    CHECK(grad_err <= SPARSE_TOL, "%s: gradient %s differs by %.3e of its largest element", what, worst_name,
          grad_err);
    if (expect == 0) {
        CHECK(loss_s == 0.0f && loss_d == 0.0f, "%s: no target but loss sparse %g dense %g", what, loss_s, loss_d);
        CHECK(all_zero, "%s: no target but a gradient is non-zero", what);
    } else {
        CHECK(!all_zero, "%s: every gradient is zero", what);
    }
    free(logits_d);
    free(grads_d);
}

static void random_batch(int *inputs, int *labels, size_t n, int V, int pad, double selected) {
    for (size_t i = 0; i < n; i++) {
        inputs[i] = (int)(rand_unit() * V);
        labels[i] = rand_unit() < selected ? (rand_unit() < 0.3 ? 3 : (int)(rand_unit() * (V - 2))) : pad;
    }
}

static void test_fused_crossentropy(void) {
    enum { N = 23, V = 1001 };
    float *logits = mlm_malloc((size_t)N * V * sizeof(float), "logits");
    float *g1 = mlm_malloc((size_t)N * V * sizeof(float), "dlogits"), *g2 = mlm_malloc((size_t)N * V * sizeof(float), "dlogits");
    float l1[N], l2[N];
    int labels[N];
    for (int n = 0; n < N; n++) {
        labels[n] = n % 3 == 0 ? 7 : (int)(rand_unit() * V);
        for (int v = 0; v < V; v++) logits[(size_t)n * V + v] = (float)(8.0 * rand_unit() - 4.0) + (v == 7 ? 3.0f : 0.0f);
    }
    int t1 = 0, c1 = -1, c2 = -1;
    float dloss = 1.0f / N;
    float loss1 = crossentropy_forward(l1, logits, labels, N, V, -1, &t1, &c1);
    crossentropy_backward(g1, logits, labels, N, V, -1, dloss);
    float loss2 = crossentropy_forward_backward(l2, g2, logits, labels, N, V, dloss, &c2);
    int same = memcmp(g1, g2, (size_t)N * V * sizeof(float)) == 0;
    printf("  fused cross-entropy, %d x %d: loss %.7f vs %.7f, correct %d vs %d, gradient %s\n", N, V, loss2, loss1, c2,
           c1, same ? "bit-identical" : "DIFFERENT");
    CHECK(same, "fused cross-entropy gradient differs from crossentropy_backward");
    CHECK(fabsf(loss2 - loss1) <= 1e-6f * loss1, "fused loss %.9g vs %.9g", loss2, loss1);
    CHECK(c1 == c2 && c1 > 0, "correct: fused %d, separate %d", c2, c1);
    free(logits), free(g1), free(g2);
}

int main(void) {
    test_fused_crossentropy();
    // Vocabulary larger than d_model, as in BERT; two layers so dres crosses the layer loop.
    ModelConfig cfg = {.vocab = 37, .d_model = 16, .n_heads = 2, .n_layers = 2, .d_ff = 24, .max_seq = 9,
                       .dropout = 0.1f, .ln_eps = 1e-5f};
    int max_B = 5, pad = 35, T = cfg.max_seq;
    size_t NB = (size_t)max_B * T;
    CpuModel *m = cpu_model_create(&cfg, max_B);
    init_params(m, 11);
    int *inputs = mlm_malloc(NB * sizeof(int), "inputs"), *labels = mlm_malloc(NB * sizeof(int), "labels");
    Rng rng;
    rng_init(&rng, 77, RNG_DOMAIN_TRAIN);
    DropoutCtx d = {&rng, rng_layout(max_B, T, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers), 4, 0.1f, 0, 0};
    printf("sparse vs dense head, V=%d C=%d H=%d L=%d F=%d T=%d (max batch %d)\n", cfg.vocab, cfg.d_model,
           cfg.n_heads, cfg.n_layers, cfg.d_ff, T, max_B);

    for (int with_dropout = 0; with_dropout <= 1; with_dropout++) {
        const DropoutCtx *drop = with_dropout ? &d : NULL;
        const char *dn = with_dropout ? "dropout 0.1" : "no dropout";
        char what[96];
        random_batch(inputs, labels, NB, cfg.vocab, pad, 0.15);
        snprintf(what, sizeof(what), "full batch of %d, 15%% selected, %s", max_B, dn);
        compare(what, m, inputs, labels, max_B, pad, drop);
        random_batch(inputs, labels, NB, cfg.vocab, pad, 0.5);
        snprintf(what, sizeof(what), "partial batch of 3, 50%% selected, %s", dn);
        compare(what, m, inputs, labels, 3, pad, drop);
        random_batch(inputs, labels, NB, cfg.vocab, pad, 1.0);
        snprintf(what, sizeof(what), "batch of 2, all selected, %s", dn);
        compare(what, m, inputs, labels, 2, pad, drop);
        random_batch(inputs, labels, NB, cfg.vocab, pad, 0.0);
        snprintf(what, sizeof(what), "batch of 4, none selected, %s", dn);
        compare(what, m, inputs, labels, 4, pad, drop);
    }

    // Without labels the sparse setting changes nothing: every position's logits, as dense.
    random_batch(inputs, labels, NB, cfg.vocab, pad, 0.15);
    size_t NV = NB * cfg.vocab;
    float *dense = mlm_malloc(NV * sizeof(float), "logits");
    cpu_model_set_sparse_prediction(m, 0);
    cpu_model_forward(m, inputs, NULL, max_B, pad, NULL, NULL);
    memcpy(dense, m->logits, NV * sizeof(float));
    cpu_model_set_sparse_prediction(m, 1);
    cpu_model_forward(m, inputs, NULL, max_B, pad, NULL, NULL);
    CHECK(memcmp(dense, m->logits, NV * sizeof(float)) == 0, "a forward without labels changed with sparse on");
    printf("  forward without labels, sparse on: all %zu logits bit-identical to dense\n", NV);

    free(dense);
    free(inputs);
    free(labels);
    rng_free(&rng);
    cpu_model_free(m);
    return test_finish("test_sparse_cpu");
}
