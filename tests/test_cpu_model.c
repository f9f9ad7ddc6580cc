// test_cpu_model.c: the whole CPU model, both architectures (labml, bert): parameter count, finite-difference
// gradients of every parameter tensor (dropout off and on), bit-identical results for 1 and 2 threads,
// batch-prefix independence, clipping, an all-ignored batch, a short overfitting run, and activations linear in T;
// for bert also the frozen [PAD] row and [PAD] keys masked out of attention.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "test_util.h"

static uint64_t lcg_state = 777;
static double rand_unit(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) / 9007199254740992.0;
}

static const char *tensor_names[MODEL_NUM_PARAM_TENSORS] = {
    "tok_emb", "pos_emb", "type_emb", "emb_ln_w", "emb_ln_b", "ln1_w", "ln1_b", "qkv_w", "qkv_b", "out_w", "out_b",
    "ln2_w", "ln2_b", "ff1_w", "ff1_b", "ff2_w", "ff2_b", "lnf_w", "lnf_b", "head_w", "head_b", "head_ln_w",
    "head_ln_b", "gen_w", "gen_b",
};

// labml's model (the fields after ln_eps zero) and BERT's at the same shapes.
static ModelConfig labml_cfg(int V, int C, int H, int L, int F, int T, float p) {
    ModelConfig c = {.vocab = V, .d_model = C, .n_heads = H, .n_layers = L, .d_ff = F, .max_seq = T, .dropout = p,
                     .ln_eps = 1e-5f};
    return c;
}
static ModelConfig bert_cfg(int V, int C, int H, int L, int F, int T, float p, int pad) {
    ModelConfig c = labml_cfg(V, C, H, L, F, T, p);
    c.ln_eps = 1e-12f;
    c.arch = MODEL_ARCH_BERT;
    c.max_positions = T + 3;
    c.type_vocab = 2;
    c.init_std = 0.02f;
    c.pad_id = pad;
    return c;
}

// Start pointer and size of every parameter tensor, and whether it is stacked over layers (fields 5..16).
static void tensor_table(const ModelConfig *c, const ParamTensors *t, float *ptr[], size_t size[], int per_layer[]) {
    float *p[MODEL_NUM_PARAM_TENSORS] = {t->tok_emb, t->pos_emb, t->type_emb, t->emb_ln_w, t->emb_ln_b, t->ln1_w,
                                         t->ln1_b, t->qkv_w, t->qkv_b, t->out_w, t->out_b, t->ln2_w, t->ln2_b, t->ff1_w,
                                         t->ff1_b, t->ff2_w, t->ff2_b, t->lnf_w, t->lnf_b, t->head_w, t->head_b,
                                         t->head_ln_w, t->head_ln_b, t->gen_w, t->gen_b};
    model_tensor_sizes(c, size);
    for (int i = 0; i < MODEL_NUM_PARAM_TENSORS; i++) {
        ptr[i] = p[i];
        per_layer[i] = i >= 5 && i <= 16;
    }
}

// Mean cross-entropy of the last forward's logits in double (the float the forward returns would add
// ~1e-7 relative noise to every finite difference).
static double loss_double(const CpuModel *m, const int *labels, int pad) {
    int V = m->cfg.vocab, N = m->B * m->T, n = 0;
    double total = 0.0;
    for (int i = 0; i < N; i++) {
        if (labels[i] == pad) continue;
        const float *x = m->logits + (size_t)i * V;
        double mx = x[0], s = 0.0;
        for (int v = 1; v < V; v++) mx = fmax(mx, x[v]);
        for (int v = 0; v < V; v++) s += exp((double)x[v] - mx);
        total += log(s) + mx - x[labels[i]];
        n++;
    }
    return n ? total / n : 0.0;
}

static void random_batch(int *inputs, int *labels, int n, int V, int pad, double labelled) {
    for (int i = 0; i < n; i++) {
        inputs[i] = (int)(rand_unit() * V);
        labels[i] = rand_unit() < labelled ? (int)(rand_unit() * (V - 2)) : pad;
    }
}

// Parameters as initialised, with LayerNorm weights and biases moved off 1 and 0 so that their gradients
// (and those flowing through them) are generic.
static void init_params(CpuModel *m, uint64_t seed) {
    const ModelConfig *c = &m->cfg;
    model_init_params(c, m->params, seed, 0);
    size_t LC = (size_t)c->n_layers * c->d_model;
    for (size_t i = 0; i < LC; i++) {
        m->p.ln1_w[i] += (float)(0.4 * rand_unit() - 0.2);
        m->p.ln1_b[i] = (float)(0.4 * rand_unit() - 0.2);
        m->p.ln2_w[i] += (float)(0.4 * rand_unit() - 0.2);
        m->p.ln2_b[i] = (float)(0.4 * rand_unit() - 0.2);
    }
    float *w[3] = {m->p.lnf_w, m->p.emb_ln_w, m->p.head_ln_w}, *b[3] = {m->p.lnf_b, m->p.emb_ln_b, m->p.head_ln_b};
    size_t sizes[MODEL_NUM_PARAM_TENSORS];
    model_tensor_sizes(c, sizes);
    size_t n[3] = {sizes[17], sizes[3], sizes[21]};  // lnf_w (labml), emb_ln_w and head_ln_w (bert)
    for (int k = 0; k < 3; k++)
        for (size_t i = 0; i < n[k]; i++) {
            w[k][i] += (float)(0.4 * rand_unit() - 0.2);
            b[k][i] = (float)(0.4 * rand_unit() - 0.2);
        }
    // bert: biases start at 0 and weights at N(0, 0.02); larger values make every gradient generic.
    if (c->arch == MODEL_ARCH_BERT)
        for (size_t i = 0; i < m->n_params; i++) m->params[i] += (float)(0.3 * rand_unit() - 0.15);
    if (c->arch == MODEL_ARCH_BERT) memset(m->p.tok_emb + (size_t)c->pad_id * c->d_model, 0, c->d_model * sizeof(float));
}

// Whole-model gradient check. Tolerance: the forward is float through ~20 ops, so logits carry ~1e-6
// relative rounding noise, and the mean loss (~2.4) ~1e-6 absolute; a central difference with h = 1e-2
// turns that into ~5e-5 of gradient noise, and truncation (h^2/6 times third derivatives of order 1..10)
// adds up to ~1e-4. Hence |analytic - fd| <= 3e-4 + 2e-2 |fd|. A perturbation that moves a ReLU across its
// kink makes the difference quotient itself wrong (by up to that unit's share of the gradient), so an
// element failing at h = 1e-2 is re-measured at h = 2.5e-3, where kinks are four times less likely to be
// crossed; a genuinely wrong gradient fails at both steps.
#define MODEL_ATOL 3e-4
#define MODEL_RTOL 2e-2

static double fd_at(CpuModel *m, float *x, float h, const int *in, const int *lab, int B, int pad, const DropoutCtx *d) {
    float x0 = *x, xp = x0 + h, xm = x0 - h;
    *x = xp;
    cpu_model_forward(m, in, lab, B, pad, d, NULL);
    double lp = loss_double(m, lab, pad);
    *x = xm;
    cpu_model_forward(m, in, lab, B, pad, d, NULL);
    double lm = loss_double(m, lab, pad);
    *x = x0;
    return (lp - lm) / ((double)xp - (double)xm);
}

static void test_gradients(int arch, int with_dropout) {
    int B = 3, max_B = 4, pad = 9;
    ModelConfig cfg = arch == MODEL_ARCH_BERT ? bert_cfg(11, 8, 2, 2, 12, 5, 0.1f, pad) : labml_cfg(11, 8, 2, 2, 12, 5, 0.1f);
    int N = B * cfg.max_seq;
    printf("whole-model gradient check (%s), V=11 C=8 H=2 L=2 F=12 T=5 B=3 (max 4), dropout %s\n",
           arch == MODEL_ARCH_BERT ? "bert" : "labml", with_dropout ? "p=0.1 at a fixed step" : "off");
    CpuModel *m = cpu_model_create(&cfg, max_B);
    init_params(m, 3);
    int inputs[15], labels[15];
    random_batch(inputs, labels, N, cfg.vocab, pad, 0.8);
    if (arch == MODEL_ARCH_BERT) {  // [PAD] inputs: their keys are masked out of attention (two in row 1)
        inputs[5 + 1] = pad;
        inputs[5 + 3] = pad;
    }
    Rng rng;
    rng_init(&rng, 99, RNG_DOMAIN_TRAIN);
    DropoutCtx d = {&rng, model_rng_layout(&cfg, max_B), 6, 0.1f, 0, 0};
    const DropoutCtx *drop = with_dropout ? &d : NULL;

    float loss = cpu_model_forward(m, inputs, labels, B, pad, drop, NULL);
    double ld = loss_double(m, labels, pad);
    CHECK(fabs(loss - ld) < 1e-6 * ld, "forward loss %.8f vs double %.8f", loss, ld);
    cpu_model_backward(m);
    float *grads = mlm_malloc(m->n_params * sizeof(float), "grads");
    memcpy(grads, m->grads, m->n_params * sizeof(float));

    float *ptr[MODEL_NUM_PARAM_TENSORS];
    size_t size[MODEL_NUM_PARAM_TENSORS];
    int per_layer[MODEL_NUM_PARAM_TENSORS];
    tensor_table(&cfg, &m->p, ptr, size, per_layer);
    double overall = 0.0;
    for (int t = 0; t < MODEL_NUM_PARAM_TENSORS; t++) {
        if (size[t] == 0) continue;  // not a tensor of this architecture
        // Samples from every layer of a stacked tensor: 5 per layer, or 8 for a single tensor.
        int groups = per_layer[t] ? cfg.n_layers : 1, per_group = per_layer[t] ? 5 : 8;
        size_t group_size = size[t] / groups;
        double worst_ratio = 0.0, worst_abs = 0.0, worst_rel = 0.0;
        int retried = 0;
        for (int gi = 0; gi < groups; gi++)
            for (int s = 0; s < per_group; s++) {
                size_t idx = gi * group_size + (size_t)(rand_unit() * group_size);
                // bert's [PAD] row is frozen: its gradient is 0 by definition (checked below), not the loss's.
                if (arch == MODEL_ARCH_BERT && t == 0 && idx / cfg.d_model == (size_t)pad) idx = (idx + 2 * cfg.d_model) % size[t];
                float *x = ptr[t] + idx;
                float analytic = grads[x - m->params];
                double fd = fd_at(m, x, 1e-2f, inputs, labels, B, pad, drop);
                double err = fabs(analytic - fd);
                if (err > MODEL_ATOL + MODEL_RTOL * fabs(fd)) {
                    retried++;
                    fd = fd_at(m, x, 2.5e-3f, inputs, labels, B, pad, drop);
                    err = fabs(analytic - fd);
                }
                double ratio = err / (MODEL_ATOL + MODEL_RTOL * fabs(fd));
                worst_ratio = fmax(worst_ratio, ratio);
                worst_abs = fmax(worst_abs, err);
                worst_rel = fmax(worst_rel, err / fmax(fabs(fd), 1e-3));
                CHECK(ratio <= 1.0, "%s[%zu]: analytic %.6e vs FD %.6e (dropout %d)", tensor_names[t], idx, analytic, fd,
                      with_dropout);
            }
        printf("  %-8s %3d samples  max |err| %.2e  max rel err %.2e  worst/tol %.3f%s\n", tensor_names[t],
               groups * per_group, worst_abs, worst_rel, worst_ratio, retried ? "  (re-measured at h/4)" : "");
        overall = fmax(overall, worst_ratio);
    }
    printf("  worst error / tolerance over all tensors: %.3f\n", overall);
    if (arch == MODEL_ARCH_BERT) {
        int moved = 0;
        for (int c = 0; c < cfg.d_model; c++) moved += grads[(size_t)pad * cfg.d_model + c] != 0.0f;
        CHECK(moved == 0, "%d gradients of the frozen [PAD] row are not 0", moved);
        // The masked keys: changing a [PAD] input's own key and value changes no other row's output. Its row's
        // query still attends (its logits exist, labels may ask for them), so compare the other rows only.
        cpu_model_forward(m, inputs, labels, B, pad, NULL, NULL);
        size_t NV = (size_t)N * cfg.vocab;
        float *before = mlm_malloc(NV * sizeof(float), "logits");
        memcpy(before, m->logits, NV * sizeof(float));
        float saved = m->p.pos_emb[1 * cfg.d_model];  // position 1 is a [PAD] only in row 1
        m->p.pos_emb[1 * cfg.d_model] += 0.5f;
        cpu_model_forward(m, inputs, labels, B, pad, NULL, NULL);
        int leaked = 0, moved_rows = 0;
        for (int r = 0; r < N; r++)
            for (int v = 0; v < cfg.vocab; v++) {
                int differs = m->logits[(size_t)r * cfg.vocab + v] != before[(size_t)r * cfg.vocab + v];
                if (r / cfg.max_seq == 1 && r % cfg.max_seq != 1) leaked += differs;  // row 1's other positions
                if (r / cfg.max_seq != 1 && r % cfg.max_seq == 1) moved_rows += differs;  // control: not masked
            }
        m->p.pos_emb[1 * cfg.d_model] = saved;
        printf("  [PAD] key of row 1 moved: %d logits of its other positions changed (0 wanted); control rows: %d\n",
               leaked, moved_rows);
        CHECK(leaked == 0 && moved_rows > 0, "the [PAD] key leaks into attention (%d) or the control does not move (%d)",
              leaked, moved_rows);
        free(before);
    }
    free(grads);
    rng_free(&rng);
    cpu_model_free(m);
}

// Forward + backward + clip + Adam with the given thread count; returns the loss and copies out the state.
static float run_step(int threads, const ModelConfig *cfg, int B, const int *in, const int *lab, int pad,
                      float *grads_out, float *params_out, float *logits_out) {
    omp_set_num_threads(threads);
    CpuModel *m = cpu_model_create(cfg, B + 1);
    model_init_params(cfg, m->params, 42, 0);
    Rng rng;
    rng_init(&rng, 5, RNG_DOMAIN_TRAIN);
    DropoutCtx d = {&rng, model_rng_layout(cfg, B + 1), 3, 0.1f, 0, 0};
    int correct = 0;
    float loss = cpu_model_forward(m, in, lab, B, pad, &d, &correct);
    memcpy(logits_out, m->logits, (size_t)B * cfg->max_seq * cfg->vocab * sizeof(float));
    cpu_model_backward(m);
    memcpy(grads_out, m->grads, m->n_params * sizeof(float));
    cpu_clip_grads(m->grads, m->n_params, 1.0f);
    OptimConfig oc = {OPTIM_NOAM_ADAM, SCHED_NOAM, 1.0f, 0.9f, 0.999f, 1e-8f, 0.0f, 2000, 0.0f, cfg->d_model, 1000};
    float *mo = mlm_calloc(m->n_params, sizeof(float), "m"), *vo = mlm_calloc(m->n_params, sizeof(float), "v");
    cpu_adam_update(&oc, m->params, m->grads, mo, vo, NULL, m->n_params, 1, optim_lr(&oc, 1));
    memcpy(params_out, m->params, m->n_params * sizeof(float));
    free(mo);
    free(vo);
    rng_free(&rng);
    cpu_model_free(m);
    return loss;
}

static void test_thread_determinism(int arch) {
    // Large enough that every op's loop passes MLM_PARALLEL_MIN_WORK and really runs on both threads.
    int B = 9, pad = 65;
    ModelConfig cfg = arch == MODEL_ARCH_BERT ? bert_cfg(67, 128, 4, 2, 160, 32, 0.1f, pad)
                                              : labml_cfg(67, 128, 4, 2, 160, 32, 0.1f);
    int N = B * cfg.max_seq;
    printf("determinism (%s): one training step (dropout on) with 1 and 2 threads, V=67 C=128 H=4 L=2 F=160 T=32 B=9\n",
           arch == MODEL_ARCH_BERT ? "bert" : "labml");
    size_t P = model_num_params(&cfg), NL = (size_t)N * cfg.vocab;
    int *in = mlm_malloc(N * sizeof(int), "in"), *lab = mlm_malloc(N * sizeof(int), "lab");
    random_batch(in, lab, N, cfg.vocab, pad, 0.15);
    for (int i = N - 7; i < N; i++) in[i] = pad;  // a padded tail: bert masks those keys
    float *g1 = mlm_malloc(P * 4, "g"), *g2 = mlm_malloc(P * 4, "g"), *p1 = mlm_malloc(P * 4, "p"), *p2 = mlm_malloc(P * 4, "p");
    float *l1 = mlm_malloc(NL * 4, "l"), *l2 = mlm_malloc(NL * 4, "l");
    float loss1 = run_step(1, &cfg, B, in, lab, pad, g1, p1, l1);
    float loss2 = run_step(2, &cfg, B, in, lab, pad, g2, p2, l2);
    int same_loss = memcmp(&loss1, &loss2, sizeof(float)) == 0, same_logits = memcmp(l1, l2, NL * 4) == 0;
    int same_grads = memcmp(g1, g2, P * 4) == 0, same_params = memcmp(p1, p2, P * 4) == 0;
    printf("  loss %.7f / %.7f; bit-identical: loss %d, logits %d, grads %d, updated params %d\n", loss1, loss2,
           same_loss, same_logits, same_grads, same_params);
    CHECK(same_loss && same_logits && same_grads && same_params, "results depend on the thread count");
    omp_set_num_threads(2);
    free(in); free(lab); free(g1); free(g2); free(p1); free(p2); free(l1); free(l2);
}

static void test_batch_prefix_and_edge_cases(void) {
    ModelConfig cfg = labml_cfg(11, 8, 2, 2, 12, 5, 0.1f);
    int pad = 9, B = 3, N = B * cfg.max_seq;
    printf("batch prefix, all-ignored batch, forward without labels, clipping\n");
    int inputs[15], labels[15];
    random_batch(inputs, labels, N, cfg.vocab, pad, 0.5);
    labels[0] = 2;
    // The same batch in a model sized for 3 and one sized for 6 gives identical results (dropout included:
    // the layout, hence the offsets, is the caller's, not the model's).
    CpuModel *a = cpu_model_create(&cfg, 3), *b = cpu_model_create(&cfg, 6);
    model_init_params(&cfg, a->params, 8, 1);
    memcpy(b->params, a->params, a->n_params * sizeof(float));
    Rng rng;
    rng_init(&rng, 1, RNG_DOMAIN_TRAIN);
    DropoutCtx d = {&rng, rng_layout(6, cfg.max_seq, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers), 2, 0.2f, 0, 0};
    int ca = -1, cb = -2;
    float la = cpu_model_forward(a, inputs, labels, B, pad, &d, &ca);
    float lb = cpu_model_forward(b, inputs, labels, B, pad, &d, &cb);
    cpu_model_backward(a);
    cpu_model_backward(b);
    CHECK(la == lb && ca == cb && memcmp(a->grads, b->grads, a->n_params * sizeof(float)) == 0,
          "batch of 3 differs between models sized 3 and 6: loss %g / %g", la, lb);
    CHECK(a->n_targets > 0 && ca >= 0 && ca <= a->n_targets, "correct %d of %d targets", ca, a->n_targets);

    // Clipping the real gradients.
    float norm = cpu_grad_norm(a->grads, a->n_params);
    float max_norm = norm * 0.25f;
    float before = cpu_clip_grads(a->grads, a->n_params, max_norm);
    float after = cpu_grad_norm(a->grads, a->n_params);
    printf("  grad norm %.6f clipped to max_norm %.6f: %.6f\n", before, max_norm, after);
    CHECK(before == norm && fabs(after - max_norm) < 1e-5 * max_norm, "clip: before %g after %g (max %g)", before, after, max_norm);

    // No labelled position: loss 0, no hits, all gradients zero.
    int none[15];
    for (int i = 0; i < N; i++) none[i] = pad;
    int c0 = -1;
    float l0 = cpu_model_forward(a, inputs, none, B, pad, &d, &c0);
    cpu_model_backward(a);
    int zero = 1;
    for (size_t i = 0; i < a->n_params; i++) zero &= a->grads[i] == 0.0f;
    CHECK(l0 == 0.0f && c0 == 0 && a->n_targets == 0 && zero, "all-ignored batch: loss %g correct %d zero grads %d", l0, c0, zero);

    // Evaluation forward without labels: logits only.
    int cz = -1;
    float lz = cpu_model_forward(a, inputs, NULL, B, pad, NULL, &cz);
    int finite = 1;
    for (int i = 0; i < N * cfg.vocab; i++) finite &= isfinite(a->logits[i]);
    CHECK(lz == 0.0f && cz == 0 && finite, "forward without labels: loss %g correct %d finite %d", lz, cz, finite);
    rng_free(&rng);
    cpu_model_free(a);
    cpu_model_free(b);
}

// The attention stores nothing of size T x T (tiled; attention.c): the activation allocation is linear in T. Its
// growth from T to 2T is compared with the growth from T/2 to T: 2 for a linear size, 4 if a [B, H, T, T] tensor
// were back (at this shape it would be most of the allocation: H T = 4096 floats per row against ~20 C + F = 720).
static void test_activations_linear_in_T(int arch) {
    printf("%s: activation memory linear in T (no T x T storage)\n", arch == MODEL_ARCH_BERT ? "bert" : "labml");
    size_t n[3];
    for (int k = 0; k < 3; k++) {
        ModelConfig cfg = arch == MODEL_ARCH_BERT ? bert_cfg(11, 32, 16, 2, 64, 128 << k, 0.1f, 9)
                                                  : labml_cfg(11, 32, 16, 2, 64, 128 << k, 0.1f);
        CpuModel *m = cpu_model_create(&cfg, 2);
        n[k] = m->n_acts;
        cpu_model_free(m);
    }
    double ratio = (double)(n[2] - n[1]) / (double)(n[1] - n[0]);
    printf("  activation floats at T 128, 256, 512: %zu, %zu, %zu (growth ratio %.3f)\n", n[0], n[1], n[2], ratio);
    CHECK(ratio < 2.1, "activations grow %.3f x from T 256 to 512 against 128 to 256: a T x T term", ratio);
}

static void test_overfit(int arch) {
    ModelConfig cfg = arch == MODEL_ARCH_BERT ? bert_cfg(11, 16, 2, 2, 32, 8, 0.0f, 9) : labml_cfg(11, 16, 2, 2, 32, 8, 0.0f);
    int B = 4, pad = 9, N = B * cfg.max_seq;
    CpuModel *m = cpu_model_create(&cfg, B);
    model_init_params(&cfg, m->params, 4, 1);
    int inputs[32], labels[32];
    random_batch(inputs, labels, N, cfg.vocab, pad, 0.5);
    OptimConfig oc = {OPTIM_ADAMW, SCHED_CONSTANT, 3e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 0, 0.0f, cfg.d_model, 200};
    float *mo = mlm_calloc(m->n_params, sizeof(float), "m"), *vo = mlm_calloc(m->n_params, sizeof(float), "v");
    float first = 0.0f, last = 0.0f;
    int correct = 0;
    for (long t = 1; t <= 200; t++) {
        last = cpu_model_forward(m, inputs, labels, B, pad, NULL, &correct);
        if (t == 1) first = last;
        cpu_model_backward(m);
        cpu_clip_grads(m->grads, m->n_params, 1.0f);
        cpu_adam_update(&oc, m->params, m->grads, mo, vo, NULL, m->n_params, t, optim_lr(&oc, t));
    }
    printf("overfitting one batch (%s): loss %.4f -> %.4f after 200 AdamW steps, %d of %d correct\n",
           arch == MODEL_ARCH_BERT ? "bert" : "labml", first, last, correct,
           m->n_targets);
    CHECK(last < 0.1f * first && correct == m->n_targets, "the model does not learn one batch: %g -> %g", first, last);
    free(mo);
    free(vo);
    cpu_model_free(m);
}

int main(void) {
    omp_set_num_threads(2);
    ModelConfig ref = labml_cfg(67, 128, 8, 6, 256, 32, 0.1f);
    size_t n = model_num_params(&ref);
    printf("reference configuration: %zu parameters\n", n);
    CHECK(n == 812355, "model_num_params = %zu, expected 812355", n);
    // bert-base as transformers counts BertForMaskedLM.num_parameters() (the tied decoder once): 109,514,298.
    ModelConfig base = bert_cfg(30522, 768, 12, 12, 3072, 128, 0.1f, 0);
    base.max_positions = 512;
    n = model_num_params(&base);
    printf("bert-base (BertForMaskedLM): %zu parameters\n", n);
    CHECK(n == 109514298, "model_num_params = %zu, expected 109514298", n);
    for (int arch = MODEL_ARCH_LABML; arch <= MODEL_ARCH_BERT; arch++) {
        test_gradients(arch, 0);
        test_gradients(arch, 1);
        test_thread_determinism(arch);
        test_overfit(arch);
        test_activations_linear_in_T(arch);
    }
    test_batch_prefix_and_edge_cases();
    return test_finish("test_cpu_model");
}
