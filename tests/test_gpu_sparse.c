// test_gpu_sparse.c (gpu; under the emu layer: test_emu_sparse): sparse prediction on the CUDA backend
// (cuda_model_set_sparse_prediction), masking on the device as in training, TF32 off:
//
//  1. CUDA sparse vs CPU sparse (the same masks, since the device draws the CPU's Philox numbers), dropout off
//     and on, full and partial batches: targets equal, loss within 1e-5, correct within the near ties, every
//     gradient tensor within 1e-4 of its largest element (the bounds of test_gpu_model part 2, for the same
//     reasons: the backends add in different orders), the CPU taking its ReLU ties the CUDA model's way where
//     that explains the CUDA gradients (tests/relu_ties.h, as test_gpu_model).
//  2. CUDA sparse vs CUDA dense on the same batch: targets and correct equal, loss within 1e-6, the selected
//     rows' logits within 1e-6 (NaN in every other row), every gradient within 1e-5 of its tensor's largest.
//  3. A whole cuda_model_train_step sparse and dense from the same state: the same loss, targets, and
//     gradient norm (1e-5), parameters within 1e-5 of their tensor's largest |p| (Adam moves an element whose
//     gradient is rounding noise by up to lr either way, so those elements are bounded by 2 lr instead).
//  4. Batches with no selected position (explicit labels all PAD; tokens all PAD through the mask): loss 0,
//     0 targets, every gradient exactly zero, and a training step that runs.
//  5. The kernels alone on 2,500 rows (three tiles of the selection kernel's block): the selected rows and
//     their count against a host loop, the gathered rows and labels exact, rows past the device count zero
//     with an ignored label (a capacity larger than the count), the scatter exact and the other rows untouched.
// The key-attention bias has a zero gradient in exact arithmetic (the softmax cancels it); it is measured
// against the largest gradient of the model, as in test_gpu_model.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
#include "relu_ties.h"
#include "test_util.h"

static uint64_t lcg_state = 31337;
static double rand_unit(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) / 9007199254740992.0;
}

typedef struct {
    ModelConfig cfg;
    MaskConfig mask;
    OptimConfig oc;
    RngLayout layout;
    int max_B;
    uint64_t seed;
} Setup;

static Setup setup(void) {
    Setup s;
    memset(&s, 0, sizeof(s));
    s.cfg = (ModelConfig){.vocab = 67, .d_model = 32, .n_heads = 2, .n_layers = 2, .d_ff = 48, .max_seq = 17,
                          .dropout = 0.1f, .ln_eps = 1e-5f};
    s.mask = (MaskConfig){.scheme = MASK_SCHEME_REFERENCE, .prob = 0.15f, .unchanged_prob = 0.1f,
                          .random_prob = 0.1f, .n_tokens = 67, .n_chars = 65, .pad_id = 65, .mask_id = 66,
                          .no_mask = {1}, .n_no_mask = 1};
    s.oc = (OptimConfig){.kind = OPTIM_NOAM_ADAM, .schedule = SCHED_NOAM, .lr = 1.0f, .beta1 = 0.9f,
                         .beta2 = 0.999f, .eps = 1e-8f, .warmup = 100, .d_model = 32, .total_steps = 1000};
    s.max_B = 6;
    s.layout = rng_layout(s.max_B, s.cfg.max_seq, s.cfg.d_model, s.cfg.n_heads, s.cfg.d_ff, s.cfg.n_layers);
    s.seed = 99;
    return s;
}

// Selected rows whose label logit and best other logit are within eps (argmax may differ by rounding).
static int near_ties(const float *rows, const int *labels, int n, int V, double eps) {
    int ties = 0;
    for (int i = 0; i < n; i++) {
        const float *l = rows + (size_t)i * V;
        double other = -INFINITY;
        for (int j = 0; j < V; j++)
            if (j != labels[i]) other = fmax(other, (double)l[j]);
        ties += fabs((double)l[labels[i]] - other) <= eps;
    }
    return ties;
}

static void random_tokens(int *tokens, size_t n, int n_chars) {
    for (size_t i = 0; i < n; i++) tokens[i] = rand_unit() < 0.3 ? 3 : (int)(rand_unit() * n_chars);
}

// 1 and 2 on one batch.
static void test_forward_backward(const Setup *s, CpuModel *cm, ReluTies *relu, CudaModel *gm, Rng *rng, int B,
                                  uint64_t step, int dropout) {
    const ModelConfig *c = &s->cfg;
    int T = c->max_seq, V = c->vocab, pad = s->mask.pad_id;
    size_t n = (size_t)B * T, P = model_num_params(c);
    printf("batch of %d (max %d), step %llu, dropout %s\n", B, s->max_B, (unsigned long long)step,
           dropout ? "0.1" : "off");
    int *tokens = mlm_malloc(n * sizeof(int), "tokens"), *inputs = mlm_malloc(n * sizeof(int), "inputs");
    int *labels = mlm_malloc(n * sizeof(int), "labels"), *sel = mlm_malloc(n * sizeof(int), "selected labels");
    float *u = mlm_malloc(4 * n * sizeof(float), "uniforms");
    float *g_sparse = mlm_malloc(P * sizeof(float), "grads"), *g_dense = mlm_malloc(P * sizeof(float), "grads");
    float *logits_s = mlm_malloc(n * V * sizeof(float), "logits"), *logits_d = mlm_malloc(n * V * sizeof(float), "logits");
    random_tokens(tokens, n, s->mask.n_chars);

    // CPU sparse, masked on the host as train.c does.
    rng_uniform(rng, rng_mask_offset(&s->layout, step), u, 4 * n);
    mask_apply(&s->mask, tokens, n, u, inputs, labels);
    DropoutCtx d = {.rng = rng, .layout = s->layout, .step = step, .p = dropout ? c->dropout : 0.0f};
    int n_sel = 0;
    for (size_t i = 0; i < n; i++)
        if (labels[i] != pad) sel[n_sel++] = labels[i];

    // CUDA sparse, masked on the device.
    CudaRandom rnd = {.philox_seed = rng->seed, .layout = s->layout, .step = step, .dropout_p = d.p};
    CudaStepStats ss, sd;
    cuda_model_set_sparse_prediction(gm, 1);
    cuda_model_forward(gm, tokens, NULL, B, pad, &s->mask, &rnd, &ss);
    cuda_model_get_logits(gm, logits_s, B);
    cuda_model_backward(gm);
    cuda_model_get_grads(gm, g_sparse);

    // The CPU's pass, its ReLU ties taken the way the CUDA gradients show (relu_ties.h).
    cpu_model_set_sparse_prediction(cm, 1);
    CpuPass pass = {cm, inputs, labels, B, pad, &d, 0.0f, 0};
    cpu_pass_resolve(&pass, relu, g_sparse, "CPU sparse");
    float loss_c = pass.loss;
    int correct_c = pass.correct, targets_c = cm->n_targets;

    // 1. against the CPU.
    double max_logit_diff = 0.0;
    int row = 0, nan_elsewhere = 1;
    for (size_t i = 0; i < n; i++) {
        if (labels[i] == pad) {
            for (int v = 0; v < V; v++) nan_elsewhere &= isnan(logits_s[i * V + v]);
            continue;
        }
        for (int v = 0; v < V; v++)
            max_logit_diff = fmax(max_logit_diff, fabs((double)logits_s[i * V + v] - cm->logits[(size_t)row * V + v]));
        row++;
    }
    int ties = near_ties(cm->logits, sel, n_sel, V, 2.0 * max_logit_diff);
    char where[96];
    double rg = fixture_worst_tensor_err(c, g_sparse, cm->grads, where);
    double rl = fabs((double)ss.loss - loss_c) / fmax(fabs(loss_c), 1e-30);
    printf("  CUDA sparse vs CPU sparse: targets %d/%d, loss %.7f/%.7f (rel %.1e), correct %d/%d (%d near ties), "
           "logits max diff %.1e, grads %.1e (%s)\n", ss.n_targets, targets_c, ss.loss, loss_c, rl, ss.correct,
           correct_c, ties, max_logit_diff, rg, where);
    CHECK(ss.n_targets == targets_c && targets_c == n_sel, "targets: CUDA %d, CPU %d, labels %d", ss.n_targets,
          targets_c, n_sel);
    CHECK(n_sel > 0, "no position selected: the test batch is degenerate");
    CHECK(rl <= 1e-5, "loss CUDA %.9g CPU %.9g", ss.loss, loss_c);
    CHECK(abs(ss.correct - correct_c) <= ties, "correct: CUDA %d, CPU %d, %d near ties", ss.correct, correct_c, ties);
    CHECK(nan_elsewhere, "cuda_model_get_logits after a sparse forward: an unselected row is not NaN");
    CHECK(rg <= 1e-4, "gradient %s: CUDA sparse vs CPU sparse %.3e > 1e-4", where, rg);

    // 2. against the CUDA dense head on the same batch.
    cuda_model_set_sparse_prediction(gm, 0);
    cuda_model_forward(gm, tokens, NULL, B, pad, &s->mask, &rnd, &sd);
    cuda_model_get_logits(gm, logits_d, B);
    cuda_model_backward(gm);
    cuda_model_get_grads(gm, g_dense);
    double logit_err = 0.0, logit_max = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (labels[i] == pad) continue;
        for (int v = 0; v < V; v++) {
            logit_err = fmax(logit_err, fabs((double)logits_s[i * V + v] - logits_d[i * V + v]));
            logit_max = fmax(logit_max, fabs((double)logits_d[i * V + v]));
        }
    }
    double rd = fixture_worst_tensor_err(c, g_sparse, g_dense, where);
    printf("  CUDA sparse vs CUDA dense: targets %d/%d, loss %.7f/%.7f, correct %d/%d, logits %.1e, grads %.1e (%s)\n",
           ss.n_targets, sd.n_targets, ss.loss, sd.loss, ss.correct, sd.correct, logit_err / fmax(logit_max, 1e-30),
           rd, where);
    CHECK(ss.n_targets == sd.n_targets, "targets sparse %d dense %d", ss.n_targets, sd.n_targets);
    CHECK(fabsf(ss.loss - sd.loss) <= 1e-6f * fabsf(sd.loss), "loss sparse %.9g dense %.9g", ss.loss, sd.loss);
    CHECK(ss.correct == sd.correct, "correct sparse %d dense %d", ss.correct, sd.correct);
    CHECK(logit_err <= 1e-6 * logit_max, "selected logits: sparse vs dense %.3e", logit_err);
    CHECK(rd <= 1e-5, "gradient %s: CUDA sparse vs CUDA dense %.3e > 1e-5", where, rd);

    free(tokens), free(inputs), free(labels), free(sel), free(u), free(g_sparse), free(g_dense), free(logits_s);
    free(logits_d);
}

// 3. One whole training step, sparse and dense, from the same parameters and moments.
static void test_train_step(const Setup *s, CudaModel *gm, const float *init, uint64_t seed) {
    const ModelConfig *c = &s->cfg;
    int B = s->max_B, T = c->max_seq;
    size_t n = (size_t)B * T, P = model_num_params(c);
    int *tokens = mlm_malloc(n * sizeof(int), "tokens");
    random_tokens(tokens, n, s->mask.n_chars);
    float *zeros = mlm_calloc(P, sizeof(float), "zeros");
    float *p_sparse = mlm_malloc(P * sizeof(float), "params"), *p_dense = mlm_malloc(P * sizeof(float), "params");
    CudaRandom rnd = {.philox_seed = seed, .layout = s->layout, .step = 3, .dropout_p = c->dropout};
    double lr = optim_lr(&s->oc, 4);
    CudaStepStats st[2];
    for (int sparse = 1; sparse >= 0; sparse--) {
        cuda_model_set_params(gm, init);
        cuda_model_set_adam(gm, zeros, zeros);
        cuda_model_set_sparse_prediction(gm, sparse);
        cuda_model_train_step(gm, tokens, B, &s->mask, &rnd, 1.0f, &s->oc, 4, lr, &st[sparse]);
        cuda_model_get_params(gm, sparse ? p_sparse : p_dense);
    }
    // Parameters: within 1e-5 of the tensor's largest |p|, or 2 lr where Adam's sign may flip on noise.
    int n_tab = model_param_table(c, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n_tab * sizeof(ParamEntry), "parameter table");
    model_param_table(c, tab);
    int bad = 0;
    for (int k = 0; k < n_tab; k++) {
        size_t m = fixture_entry_numel(&tab[k]), o = tab[k].offset;
        double big = 0.0;
        for (size_t i = 0; i < m; i++) big = fmax(big, fabs((double)p_dense[o + i]));
        for (size_t i = 0; i < m; i++) {
            double dlt = fabs((double)p_sparse[o + i] - p_dense[o + i]);
            bad += !(dlt <= fmax(1e-5 * big, 2.0 * lr * 1.005));
        }
    }
    printf("one training step, sparse vs dense: loss %.7f/%.7f, targets %d/%d, norm %.7f/%.7f, %d parameters out of "
           "bounds\n", st[1].loss, st[0].loss, st[1].n_targets, st[0].n_targets, st[1].grad_norm, st[0].grad_norm, bad);
    CHECK(st[1].n_targets == st[0].n_targets && st[1].n_targets > 0, "train step targets %d/%d", st[1].n_targets,
          st[0].n_targets);
    CHECK(fabsf(st[1].loss - st[0].loss) <= 1e-6f * st[0].loss, "train step loss %.9g/%.9g", st[1].loss, st[0].loss);
    CHECK(fabsf(st[1].grad_norm - st[0].grad_norm) <= 1e-5f * st[0].grad_norm, "train step norm %.9g/%.9g",
          st[1].grad_norm, st[0].grad_norm);
    CHECK(bad == 0, "%d parameters differ after one sparse and one dense step", bad);
    free(tab), free(tokens), free(zeros), free(p_sparse), free(p_dense);
}

// 4. No selected position.
static void test_none_selected(const Setup *s, CudaModel *gm, uint64_t seed) {
    const ModelConfig *c = &s->cfg;
    int B = 3, T = c->max_seq, pad = s->mask.pad_id;
    size_t n = (size_t)B * T, P = model_num_params(c);
    int *tokens = mlm_malloc(n * sizeof(int), "tokens"), *labels = mlm_malloc(n * sizeof(int), "labels");
    float *grads = mlm_malloc(P * sizeof(float), "grads");
    random_tokens(tokens, n, s->mask.n_chars);
    for (size_t i = 0; i < n; i++) labels[i] = pad;
    cuda_model_set_sparse_prediction(gm, 1);
    CudaStepStats st;
    cuda_model_forward(gm, tokens, labels, B, pad, NULL, NULL, &st);
    cuda_model_backward(gm);
    cuda_model_get_grads(gm, grads);
    size_t nonzero = 0;
    for (size_t i = 0; i < P; i++) nonzero += grads[i] != 0.0f;
    printf("no selected position (labels all PAD): loss %g, targets %d, %zu non-zero gradients\n", st.loss,
           st.n_targets, nonzero);
    CHECK(st.loss == 0.0f && st.n_targets == 0 && st.correct == 0, "empty batch: loss %g targets %d correct %d",
          st.loss, st.n_targets, st.correct);
    CHECK(nonzero == 0, "empty batch: %zu non-zero gradients", nonzero);
    // Through the mask: PAD tokens are never selected.
    for (size_t i = 0; i < n; i++) tokens[i] = pad;
    CudaRandom rnd = {.philox_seed = seed, .layout = s->layout, .step = 5, .dropout_p = c->dropout};
    cuda_model_train_step(gm, tokens, B, &s->mask, &rnd, 1.0f, &s->oc, 6, optim_lr(&s->oc, 6), &st);
    printf("no selected position (tokens all PAD), a training step: loss %g, targets %d, norm %g\n", st.loss,
           st.n_targets, st.grad_norm);
    CHECK(st.loss == 0.0f && st.n_targets == 0 && st.grad_norm == 0.0f, "empty step: loss %g targets %d norm %g",
          st.loss, st.n_targets, st.grad_norm);
    free(tokens), free(labels), free(grads);
}

// 5.
static void test_kernels(void) {
    enum { N = 2500, C = 7, EXTRA = 3, PAD = -5 };
    int *labels = mlm_malloc(N * sizeof(int), "labels"), *rows = mlm_malloc(N * sizeof(int), "rows");
    float *x = mlm_malloc((size_t)N * C * sizeof(float), "x");
    int n = 0;
    for (int i = 0; i < N; i++) {
        labels[i] = rand_unit() < 0.15 ? (int)(rand_unit() * 100) : PAD;
        if (labels[i] != PAD) rows[n++] = i;
        for (int c = 0; c < C; c++) x[(size_t)i * C + c] = (float)(rand_unit() * 2.0 - 1.0);
    }
    int cap = n + EXTRA;
    int *d_labels, *d_rows, *d_n, *d_sel_labels;
    float *d_x, *d_sel, *d_dx;
    CUDA_CHECK(cudaMalloc((void **)&d_labels, N * sizeof(int)));
    CUDA_CHECK(cudaMalloc((void **)&d_rows, N * sizeof(int)));
    CUDA_CHECK(cudaMalloc((void **)&d_n, sizeof(int)));
    CUDA_CHECK(cudaMalloc((void **)&d_sel_labels, (size_t)cap * sizeof(int)));
    CUDA_CHECK(cudaMalloc((void **)&d_x, (size_t)N * C * sizeof(float)));
    CUDA_CHECK(cudaMalloc((void **)&d_sel, (size_t)cap * C * sizeof(float)));
    CUDA_CHECK(cudaMalloc((void **)&d_dx, (size_t)N * C * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(d_labels, labels, N * sizeof(int), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_x, x, (size_t)N * C * sizeof(float), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemset(d_dx, 0, (size_t)N * C * sizeof(float)));
    cuda_select_rows(d_rows, d_n, d_labels, N, PAD, 0);
    cuda_gather_rows(d_sel, d_sel_labels, d_x, d_labels, d_rows, d_n, cap, C, PAD, 0);
    // Scattering the gathered rows back gives dx = x on the selected rows and 0 elsewhere.
    cuda_scatter_rows(d_dx, d_sel, d_rows, d_n, cap, C, 0);
    int dn = -1;
    int *g_rows = mlm_malloc(N * sizeof(int), "rows"), *g_labels = mlm_malloc((size_t)cap * sizeof(int), "labels");
    float *g_sel = mlm_malloc((size_t)cap * C * sizeof(float), "rows"), *g_dx = mlm_malloc((size_t)N * C * sizeof(float), "dx");
    CUDA_CHECK(cudaMemcpy(&dn, d_n, sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(g_rows, d_rows, (size_t)n * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(g_labels, d_sel_labels, (size_t)cap * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(g_sel, d_sel, (size_t)cap * C * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(g_dx, d_dx, (size_t)N * C * sizeof(float), cudaMemcpyDeviceToHost));
    int bad_rows = 0, bad_gather = 0, bad_tail = 0, bad_scatter = 0;
    for (int i = 0; i < n && dn == n; i++) {
        bad_rows += g_rows[i] != rows[i];
        bad_gather += g_labels[i] != labels[rows[i]] ||
                      memcmp(g_sel + (size_t)i * C, x + (size_t)rows[i] * C, C * sizeof(float)) != 0;
    }
    for (int i = n; i < cap; i++) {
        bad_tail += g_labels[i] != PAD;
        for (int c = 0; c < C; c++) bad_tail += g_sel[(size_t)i * C + c] != 0.0f;
    }
    for (int i = 0; i < N; i++)
        for (int c = 0; c < C; c++)
            bad_scatter += g_dx[(size_t)i * C + c] != (labels[i] != PAD ? x[(size_t)i * C + c] : 0.0f);
    printf("kernels on %d rows: %d selected (device %d), capacity %d: %d wrong rows, %d wrong gathers, %d wrong tail "
           "values, %d wrong scatter values\n", N, n, dn, cap, bad_rows, bad_gather, bad_tail, bad_scatter);
    CHECK(dn == n, "device count %d, host %d", dn, n);
    CHECK(bad_rows == 0 && bad_gather == 0 && bad_tail == 0 && bad_scatter == 0, "selection kernels wrong");
    CUDA_CHECK(cudaFree(d_labels));
    CUDA_CHECK(cudaFree(d_rows));
    CUDA_CHECK(cudaFree(d_n));
    CUDA_CHECK(cudaFree(d_sel_labels));
    CUDA_CHECK(cudaFree(d_x));
    CUDA_CHECK(cudaFree(d_sel));
    CUDA_CHECK(cudaFree(d_dx));
    free(labels), free(rows), free(x), free(g_rows), free(g_labels), free(g_sel), free(g_dx);
}

int main(int argc, char **argv) {
    (void)argc, (void)argv;
    char why[256];
    if (cuda_device_count(why, sizeof(why)) == 0) return test_skip(why);
    Setup s = setup();
    const ModelConfig *c = &s.cfg;
    size_t P = model_num_params(c);
    printf("sparse prediction on CUDA, TF32 off (V %d, C %d, H %d, L %d, F %d, T %d, max batch %d)\n", c->vocab,
           c->d_model, c->n_heads, c->n_layers, c->d_ff, c->max_seq, s.max_B);
    float *init = mlm_malloc(P * sizeof(float), "init");
    model_init_params(c, init, s.seed, 0);
    ParamTensors pv;
    model_param_views(c, init, &pv);
    for (int i = 0; i < c->d_model; i++) {  // the final LayerNorm off 1 and 0: generic gradients through it
        pv.lnf_w[i] += (float)(0.4 * rand_unit() - 0.2);
        pv.lnf_b[i] = (float)(0.4 * rand_unit() - 0.2);
    }
    // A classifier bias that favours id 3, and batches where a third of the tokens are 3 (random_tokens), so
    // that about a third of the predictions are right and the accuracy comparisons count something.
    pv.gen_b[3] = 4.0f;
    CpuModel *cm = cpu_model_create(c, s.max_B);
    CudaModel *gm = cuda_model_create(c, s.max_B, 0);
    memcpy(cm->params, init, P * sizeof(float));
    cuda_model_set_params(gm, init);
    Rng rng;
    rng_init(&rng, s.seed, RNG_DOMAIN_TRAIN);

    ReluTies relu;
    relu_ties_attach(&relu, cm);
    test_forward_backward(&s, cm, &relu, gm, &rng, s.max_B, 7, 0);
    test_forward_backward(&s, cm, &relu, gm, &rng, s.max_B, 8, 1);
    test_forward_backward(&s, cm, &relu, gm, &rng, 4, 9, 1);
    relu_ties_print(&relu, "CUDA model");
    test_train_step(&s, gm, init, rng.seed);
    test_none_selected(&s, gm, rng.seed);
    test_kernels();

    rng_free(&rng);
    cpu_model_free(cm);
    relu_ties_free(&relu);
    cuda_model_free(gm);
    free(init);
    return test_finish("test_gpu_sparse");
}
