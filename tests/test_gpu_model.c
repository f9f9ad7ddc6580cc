// test_gpu_model.c (gpu): the device-resident CUDA model (src/kernels/cuda_model.cu) against PyTorch and the
// CPU backend, its determinism, and its host <-> device state copies.
//
// Error measure, per tensor (as test_reference_fixture.c): rel = max_i |a_i - b_i| / max_i |b_i|.
//
//  1. The PyTorch fixture (tests/fixtures/reference_small.safetensors) with TF32 off: logits, loss and every
//     gradient within 1e-5; three forward/backward/clip/Noam-Adam steps: losses and gradient norms within
//     1e-5, parameters with the end-to-end bound of test_reference_fixture.c (see E2E_PARAM_TOL there).
//  2. GPU vs CPU on a small random configuration with dropout, same seed, TF32 off: masked inputs and labels
//     identical (the same Philox numbers through the same rule), loss within 1e-5, every gradient within
//     1e-4, and after three full training steps the losses and norms within 1e-5, every step's gradients
//     within 1e-4 and the parameters within 1e-5 except at the rounding floor (below). The gradient bound
//     is looser than the loss bound because the two backends add in different orders (cuBLAS's blocking
//     and split-k vs the CPU's blocked matmul; the GPU's fixed-partition reductions vs the CPU's row
//     order): each product carries ~1e-7 relative rounding, and the backward chains a dozen
//     of them per layer (through LayerNorm, softmax and dropout's 1/(1-p)), so small tensors whose entries
//     are sums with cancellation (biases, LayerNorm weights) reach ~1e-5 of their max; 1e-4 leaves a 10x
//     margin while still catching any real error (a wrong mask or index moves a tensor by O(1)).
//  3. Two GPU runs of 50 steps (TF32 on, dropout on, partial batches) with one seed: bit-identical losses,
//     norms, parameters and Adam moments. (`test_gpu_model --quick` runs 8 steps, for compute-sanitizer.)
//  4. Parameters and Adam moments set then read back bit for bit (what checkpoints and --init/--resume rely
//     on to move a run between the backends).
//  5. train.cuda_graph on vs off bit for bit, and vs the CPU (see part 5).
//  6. Gradient accumulation on the device vs the CPU's, vs itself without graphs, vs whole batches (see part 6).
//  7. Products split by rows (more than 2^31 logits) against the unsplit ones, and their plan at real shapes.
//  8. The device memory of a model linear in T (the attention stores nothing of size T x T).
//
// The key-attention bias is special everywhere: it adds q . b_k to every score of a query row, which the
// softmax cancels, so its gradient is exactly zero in real arithmetic and both sides hold rounding noise.
// Its gradient is measured against the largest gradient of the whole model, and its parameters only against
// the largest move Adam can make (about lr per step) in either direction.
//
// The rounding floor after three Adam steps. Adam moves an element by about lr x sign(g) whatever |g| is
// (m / sqrt(v) is scale-free), so an element whose gradient is within rounding of zero can move +lr on one
// backend and -lr on the other: 2 lr apart after one step, at most 2 x 1.005 x sum(lr) after three (|m| /
// sqrt(v) times the bias correction stays <= 1.005 for t <= 3). More generally a relative gradient error
// u = |dg| / |g| changes the move by about u x lr. So, per element, with u the largest over the three steps
// of (the tensor's measured max |g_GPU - g_CPU| at that step) / |g_CPU|: an element is at the rounding floor
// when 2 x 1.005 x sum(lr) x min(u, 1) could exceed the relative bound 1e-5 x max |p| of its tensor, and is
// then bounded by 2 x 1.005 x sum(lr); every other element keeps the 1e-5 relative bound. The gradients
// themselves are checked every step (1e-4 of the tensor's largest), so a wrong gradient cannot make elements
// look "at the floor". Likewise the argmax of a target whose two best logits are within the measured logit
// difference can fall either way: the counts of correct predictions may differ by at most the number of
// such near ties (ties go to the lowest index on both sides).
//
// ReLU ties. A hidden unit whose pre-activation is zero within rounding can be on for one backend and off for the
// other (cuBLAS, OpenBLAS's kernel families and the built-in matmul each round the dot product their own way), and
// then one token's gradient through that unit exists on one side only: 4e-3 of the layer's first Linear, 5e-5 of
// the tensors below. So every GPU-vs-CPU comparison of gradients (parts 2, 2b, 5, 6) runs the GPU first and the CPU
// through relu_ties_resolve (relu_ties.h): the CPU records its units within their rounding bound of zero, flips each
// to measure its gradient delta, takes it the GPU's way where the GPU's gradients show that delta, and reruns with
// those decisions; every bound above then applies unchanged to that run. The flips taken are printed.
#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>  // the emulator's defines MLM_CUDA_EMULATION (tests/emu): its counters are checked
#ifdef MLM_CUDA_EMULATION
#include "emu_api.h"
#endif
#include "kernels/cuda_check.h"
#include "cpu/matmul.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "mlm/safetensors.h"
#include "fixture_util.h"
#include "relu_ties.h"
#include "test_util.h"

#define REL_TOL 1e-5
#define GRAD_TOL_VS_CPU 1e-4
#define E2E_PARAM_TOL 1e-2  // GPU vs PyTorch after three steps: as test_reference_fixture.c part 3

// ---------------------------------------------------------------------------------------------------------
// Helpers.

static uint64_t lcg_state = 12345;
static double rand_unit(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) / 9007199254740992.0;
}

static double rel_err_f(const float *a, const float *b, size_t n, size_t *where) {
    double num = 0.0, den = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > num || isnan(d)) { num = isnan(d) ? INFINITY : d; at = i; }
        den = fmax(den, fabs((double)b[i]));
    }
    if (where) *where = at;
    return den > 0.0 ? num / den : num;
}

static double max_abs_f(const float *b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)b[i]));
    return m;
}

static ParamEntry *param_table(const ModelConfig *c, int *n) {
    *n = model_param_table(c, NULL);
    ParamEntry *tab = mlm_malloc((size_t)*n * sizeof(ParamEntry), "parameter table");
    model_param_table(c, tab);
    return tab;
}

// ---------------------------------------------------------------------------------------------------------
// 1. The PyTorch fixture.

static StFile fx;
static char fx_path[1024];

static void test_fixture(void) {
    const char *src = getenv("MLM_SOURCE_DIR");
    snprintf(fx_path, sizeof(fx_path), "%s/tests/fixtures/reference_small.safetensors", src ? src : ".");
    char err[512];
    if (st_read(fx_path, &fx, err, sizeof(err))) {
        CHECK(0, "cannot read the fixture: %s", err);
        return;
    }
    FixtureConfig fc;
    if (fixture_config(&fx, &fc, err, sizeof(err))) {
        CHECK(0, "%s: %s", fx_path, err);
        st_free(&fx);
        return;
    }
    ModelConfig cfg = fc.cfg;
    OptimConfig oc = fc.oc;
    int B = fc.B, T = cfg.max_seq, V = cfg.vocab, pad = fc.pad, steps = fc.steps;
    float max_norm = fc.max_norm;
    printf("part 1: PyTorch fixture on the GPU, TF32 off (vocab %d, d_model %d, heads %d, layers %d, d_ff %d, "
           "seq %d, batch %d)\n", V, cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, T, B);

    int n_tab;
    ParamEntry *tab = param_table(&cfg, &n_tab);
    size_t P = model_num_params(&cfg);
    double *init = fixture_gather(&fx, fx_path, tab, n_tab, P, "");
    double *ref_grad = fixture_gather(&fx, fx_path, tab, n_tab, P, "grad.");
    double *ref_step3 = fixture_gather(&fx, fx_path, tab, n_tab, P, "step3.");
    double *ref_logits = fixture_floats(&fx, fx_path, "logits", (size_t)T * B * V);
    double *ref_loss = fixture_floats(&fx, fx_path, "loss", 1), *ref_losses = fixture_floats(&fx, fx_path, "losses", 3), *ref_norms = fixture_floats(&fx, fx_path, "grad_norms", 3);
    const StTensor *ids = st_find(&fx, "input_ids"), *lab = st_find(&fx, "labels");
    int ids_ok = ids && lab && ids->dtype == ST_I64 && lab->dtype == ST_I64 && fixture_numel(ids) == (size_t)T * B &&
                 fixture_numel(lab) == (size_t)T * B;
    CHECK(ids_ok, "input_ids / labels missing or not int64 [seq, batch]");
    if (!ids_ok || !ref_logits || !ref_loss || !ref_losses || !ref_norms) {
        free(tab), free(init), free(ref_grad), free(ref_step3), free(ref_logits), free(ref_loss), free(ref_losses);
        free(ref_norms);
        st_free(&fx);
        return;
    }
    // PyTorch is [seq, batch]; mlm is [batch, seq].
    int *inputs = mlm_malloc((size_t)B * T * sizeof(int), "inputs"), *labels = mlm_malloc((size_t)B * T * sizeof(int), "labels");
    int n_targets = 0;
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++) {
            inputs[b * T + t] = (int)((const int64_t *)ids->data)[t * B + b];
            labels[b * T + t] = (int)((const int64_t *)lab->data)[t * B + b];
            n_targets += labels[b * T + t] != pad;
        }
    float *params = mlm_malloc(P * sizeof(float), "params"), *grads = mlm_malloc(P * sizeof(float), "grads");
    float *zeros = mlm_calloc(P, sizeof(float), "zeros");
    for (size_t i = 0; i < P; i++) params[i] = (float)init[i];

    CudaModel *m = cuda_model_create(&cfg, B, 0);
    CHECK(cuda_model_num_params(m) == P, "the CUDA model has %zu parameters, the layout %zu", cuda_model_num_params(m), P);
    cuda_model_set_params(m, params);

    // Forward and backward.
    CudaStepStats st;
    cuda_model_forward(m, inputs, labels, B, pad, NULL, NULL, &st);
    CHECK(st.n_targets == n_targets, "GPU counted %d targets, the labels have %d", st.n_targets, n_targets);
    float *logits = mlm_malloc((size_t)B * T * V * sizeof(float), "logits");
    float *logits_tb = mlm_malloc((size_t)B * T * V * sizeof(float), "logits");
    cuda_model_get_logits(m, logits, B);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            memcpy(logits_tb + ((size_t)t * B + b) * V, logits + ((size_t)b * T + t) * V, (size_t)V * sizeof(float));
    double r = fixture_rel_err(logits_tb, ref_logits, (size_t)T * B * V);
    printf("  logits %-48s %.2e\n", "", r);
    CHECK(r <= REL_TOL, "fixture logits: relative error %.3e > %.1e", r, REL_TOL);
    r = fixture_rel_err(&st.loss, ref_loss, 1);
    printf("  loss   %-48s %.2e  (GPU %.7f, torch %.7f)\n", "", r, st.loss, ref_loss[0]);
    CHECK(r <= REL_TOL, "fixture loss: relative error %.3e > %.1e", r, REL_TOL);

    cuda_model_backward(m);
    cuda_model_get_grads(m, grads);
    double grad_scale = 0.0;
    for (size_t i = 0; i < P; i++) grad_scale = fmax(grad_scale, fabs(ref_grad[i]));
    double worst_grad = 0.0;
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e);
        r = fixture_rel_err(grads + e->offset, ref_grad + e->offset, n);
        if (fixture_is_key_bias(e->name)) {
            double a = 0.0;
            for (size_t i = 0; i < n; i++) a = fmax(a, fabs(grads[e->offset + i] - ref_grad[e->offset + i]));
            r = a / grad_scale;
            printf("  grad   %-48s %.2e of the largest gradient (zero in exact arithmetic)\n", e->name, r);
        } else {
            printf("  grad   %-48s %.2e\n", e->name, r);
        }
        CHECK(r <= REL_TOL, "fixture grad %s: relative error %.3e > %.1e", e->name, r, REL_TOL);
        worst_grad = fmax(worst_grad, r);
    }

    // Three steps of forward, backward, clip and Noam-Adam from the initial parameters.
    cuda_model_set_params(m, params);
    cuda_model_set_adam(m, zeros, zeros);
    double worst_loss = 0.0, worst_norm = 0.0;
    for (int s = 0; s < steps; s++) {
        cuda_model_forward(m, inputs, labels, B, pad, NULL, NULL, &st);
        cuda_model_backward(m);
        float norm = cuda_model_optimizer_step(m, max_norm, &oc, s + 1, optim_lr(&oc, s + 1));
        double rl = fixture_rel_err(&st.loss, &ref_losses[s], 1), rn = fixture_rel_err(&norm, &ref_norms[s], 1);
        printf("  step %d: loss %.7f (torch %.7f, rel %.2e), grad norm %.7f (torch %.7f, rel %.2e)\n", s + 1,
               st.loss, ref_losses[s], rl, norm, ref_norms[s], rn);
        CHECK(rl <= REL_TOL, "fixture step %d loss: relative error %.3e", s + 1, rl);
        CHECK(rn <= REL_TOL, "fixture step %d grad norm: relative error %.3e", s + 1, rn);
        worst_loss = fmax(worst_loss, rl);
        worst_norm = fmax(worst_norm, rn);
    }
    cuda_model_get_params(m, params);
    double worst_param = 0.0;
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e), o = e->offset;
        r = fixture_rel_err(params + o, ref_step3 + o, n);
        // The update must be the reference's too (a no-op optimizer would pass the value check): compared
        // with the same bound relative to the largest update, the key bias excepted (its update is noise).
        double num = 0.0, den = 0.0;
        for (size_t i = 0; i < n; i++) {
            double du = ((double)params[o + i] - init[o + i]) - (ref_step3[o + i] - init[o + i]);
            num = fmax(num, fabs(du));
            den = fmax(den, fabs(ref_step3[o + i] - init[o + i]));
        }
        double ru = den > 0 ? num / den : num;
        printf("  e2e %-48s param %.2e  update %.2e%s\n", e->name, r, ru, fixture_is_key_bias(e->name) ? " (not checked)" : "");
        CHECK(r <= E2E_PARAM_TOL, "fixture step 3 %s: parameter relative error %.3e > %.1e", e->name, r, E2E_PARAM_TOL);
        if (!fixture_is_key_bias(e->name))
            CHECK(ru <= E2E_PARAM_TOL, "fixture step 3 %s: update relative error %.3e > %.1e", e->name, ru,
                  E2E_PARAM_TOL);
        worst_param = fmax(worst_param, r);
    }
    printf("  summary: grads worst %.2e; losses %.2e, norms %.2e, params after %d steps %.2e\n", worst_grad,
           worst_loss, worst_norm, steps, worst_param);

    cuda_model_free(m);
    free(inputs), free(labels), free(params), free(grads), free(zeros), free(logits), free(logits_tb), free(tab);
    free(init), free(ref_grad), free(ref_step3), free(ref_logits), free(ref_loss), free(ref_losses), free(ref_norms);
    st_free(&fx);
}

// ---------------------------------------------------------------------------------------------------------
// 2. GPU vs CPU on a random configuration with dropout.

typedef struct {
    ModelConfig cfg;
    MaskConfig mask;
    OptimConfig oc;
    RngLayout layout;
    int max_B;
    uint64_t seed;
    float max_norm;
} Setup;

static Setup small_setup(void) {
    Setup s;
    memset(&s, 0, sizeof(s));
    s.cfg = (ModelConfig){.vocab = 67, .d_model = 64, .n_heads = 4, .n_layers = 2, .d_ff = 96, .max_seq = 33,
                          .dropout = 0.1f, .ln_eps = 1e-5f};
    s.mask = (MaskConfig){.scheme = MASK_SCHEME_REFERENCE, .prob = 0.15f, .unchanged_prob = 0.1f,
                          .random_prob = 0.1f, .n_tokens = 67, .n_chars = 65, .pad_id = 65, .mask_id = 66,
                          .no_mask = {1}, .n_no_mask = 1};
    // Noam with a short warmup: learning rates 1.25e-4, 2.5e-4, 3.75e-4 in steps 1-3, so the parameters
    // move visibly (1e-3 of their size) but a stray Adam step cannot hide in the tolerance.
    s.oc = (OptimConfig){.kind = OPTIM_NOAM_ADAM, .schedule = SCHED_NOAM, .lr = 1.0f, .beta1 = 0.9f,
                         .beta2 = 0.999f, .eps = 1e-8f, .warmup = 100, .d_model = 64, .total_steps = 1000};
    s.max_B = 8;  // batches of 5 (and 3) use a prefix of every buffer and of every RNG site
    s.layout = rng_layout(s.max_B, s.cfg.max_seq, s.cfg.d_model, s.cfg.n_heads, s.cfg.d_ff, s.cfg.n_layers);
    s.seed = 4242;
    s.max_norm = 1.0f;
    return s;
}

// Fresh parameters with the LayerNorm weights and biases moved off 1 and 0 (generic gradients through them).
static void init_params(const ModelConfig *c, float *params, uint64_t seed) {
    model_init_params(c, params, seed, 0);
    ParamTensors p;
    model_param_views(c, params, &p);
    size_t LC = (size_t)c->n_layers * c->d_model;
    for (size_t i = 0; i < LC; i++) {
        p.ln1_w[i] += (float)(0.4 * rand_unit() - 0.2);
        p.ln1_b[i] = (float)(0.4 * rand_unit() - 0.2);
        p.ln2_w[i] += (float)(0.4 * rand_unit() - 0.2);
        p.ln2_b[i] = (float)(0.4 * rand_unit() - 0.2);
    }
    for (int i = 0; i < c->d_model; i++) {
        p.lnf_w[i] += (float)(0.4 * rand_unit() - 0.2);
        p.lnf_b[i] = (float)(0.4 * rand_unit() - 0.2);
    }
}

static void random_tokens(int *tokens, size_t n, int n_chars) {
    for (size_t i = 0; i < n; i++) tokens[i] = (int)(rand_unit() * n_chars);
}

// One batch through both backends, the GPU first: masked on the device, forward and backward, its gradients into
// grads_g and its stats into *st; then the CPU on the same batch masked on the host (in_c, lab_c), with dropout,
// its ReLU ties taken the GPU's way (relu, attached to cm): *pass holds its loss and correct count, cm its
// gradients and logits.
static void gpu_then_cpu(const Setup *s, CudaModel *gm, CpuModel *cm, ReluTies *relu, Rng *rng, const int *tokens,
                         const int *in_c, const int *lab_c, int B, uint64_t step, float *grads_g, CudaStepStats *st,
                         CpuPass *pass, const char *what) {
    CudaRandom rnd = {.philox_seed = rng->seed, .layout = s->layout, .step = step, .dropout_p = s->cfg.dropout};
    cuda_model_forward(gm, tokens, NULL, B, s->mask.pad_id, &s->mask, &rnd, st);
    cuda_model_backward(gm);
    cuda_model_get_grads(gm, grads_g);
    DropoutCtx d = {.rng = rng, .layout = s->layout, .step = step, .p = s->cfg.dropout};
    *pass = (CpuPass){cm, in_c, lab_c, B, s->mask.pad_id, &d, 0.0f, 0};
    cpu_pass_resolve(pass, relu, grads_g, what);
    pass->drop = NULL;  // d ends here
}

// One CPU training step exactly as src/host/training/train.c runs it (host masking, dropout from the stream, clip,
// Adam), its ReLU ties taken the GPU's way where ties and g_gpu (the GPU's gradients of the step) are given.
// Returns the loss; *norm, *correct, *n_targets as logged.
static float cpu_train_step(const Setup *s, CpuModel *cm, ReluTies *ties, const float *g_gpu, Rng *rng,
                            const int *tokens, int B, uint64_t step, float *adam_m, float *adam_v, int *inputs,
                            int *labels, float *norm, int *correct, int *n_targets, float *grads_before_clip) {
    size_t n = (size_t)B * s->cfg.max_seq;
    float *u = mlm_malloc(4 * n * sizeof(float), "uniforms");
    rng_uniform(rng, rng_mask_offset(&s->layout, step), u, 4 * n);
    mask_apply(&s->mask, tokens, n, u, inputs, labels);
    free(u);
    DropoutCtx d = {.rng = rng, .layout = s->layout, .step = step, .p = s->cfg.dropout};
    CpuPass pass = {cm, inputs, labels, B, s->mask.pad_id, &d, 0.0f, 0};
    char what[32];
    snprintf(what, sizeof(what), "step %llu", (unsigned long long)step + 1);
    cpu_pass_resolve(&pass, ties, g_gpu, what);
    float loss = pass.loss;
    *correct = pass.correct;
    *n_targets = cm->n_targets;
    if (grads_before_clip) memcpy(grads_before_clip, cm->grads, cm->n_params * sizeof(float));
    *norm = cpu_clip_grads(cm->grads, cm->n_params, s->max_norm);
    cpu_adam_update(&s->oc, cm->params, cm->grads, adam_m, adam_v, NULL, cm->n_params, (long)step + 1,
                    optim_lr(&s->oc, (long)step + 1));
    return loss;
}

// Compare two gradient vectors per tensor with the measure above; the key bias by its absolute error
// against key_abs_bound (why: key_why). Returns the worst error.
static double compare_tensors(const char *what, const ParamEntry *tab, int n_tab, const float *gpu,
                              const float *cpu, double tol, double key_abs_bound, const char *key_why) {
    double worst = 0.0;
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e), o = e->offset, at;
        if (fixture_is_key_bias(e->name)) {
            size_t where;
            double a = max_abs_err(gpu + o, cpu + o, n, &where);
            printf("  %s %-48s max |GPU - CPU| %.2e (bound %.2e: %s)\n", what, e->name, a, key_abs_bound, key_why);
            CHECK(a <= key_abs_bound, "%s %s: |GPU - CPU| %.3e > %.3e", what, e->name, a, key_abs_bound);
            continue;
        }
        double r = rel_err_f(gpu + o, cpu + o, n, &at);
        printf("  %s %-48s %.2e", what, e->name, r);
        if (r > tol) printf("  <- element %zu: GPU %.9g CPU %.9g", at, gpu[o + at], cpu[o + at]);
        printf("\n");
        CHECK(r <= tol, "%s %s: relative error %.3e > %.1e", what, e->name, r, tol);
        worst = fmax(worst, r);
    }
    return worst;
}

// Targets (label != pad) whose label logit and best other logit (CPU) are within tie_eps: there the argmax
// may differ between backends by rounding alone.
static int near_ties(const float *logits, const int *labels, size_t n, int V, int pad, double tie_eps) {
    int ties = 0;
    for (size_t i = 0; i < n; i++) {
        if (labels[i] == pad) continue;
        const float *l = logits + i * (size_t)V;
        double other = -INFINITY;
        for (int j = 0; j < V; j++)
            if (j != labels[i]) other = fmax(other, (double)l[j]);
        ties += fabs((double)l[labels[i]] - other) <= tie_eps;
    }
    return ties;
}

// Per step of the three-step comparison: check each tensor's gradients (GPU vs CPU, before clipping) and
// raise u[i], the element's relative gradient uncertainty (tensor noise / |g_CPU|), for the floor rule above.
static double track_grad_noise(const ParamEntry *tab, int n_tab, const float *g_gpu, const float *g_cpu,
                               double key_bound, double *u, int step) {
    double worst = 0.0;
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e), o = e->offset;
        double noise = max_abs_err(g_gpu + o, g_cpu + o, n, NULL), scale = max_abs_f(g_cpu + o, n);
        if (fixture_is_key_bias(e->name)) {
            CHECK(noise <= key_bound, "step %d grad %s: |GPU - CPU| %.3e > %.3e", step, e->name, noise, key_bound);
        } else {
            double r = scale > 0 ? noise / scale : noise;
            CHECK(r <= GRAD_TOL_VS_CPU, "step %d grad %s: relative error %.3e > %.1e", step, e->name, r,
                  GRAD_TOL_VS_CPU);
            worst = fmax(worst, r);
        }
        for (size_t i = 0; i < n; i++) {
            double g = fabs((double)g_cpu[o + i]);
            u[o + i] = fmax(u[o + i], g > 0 ? noise / g : noise > 0 ? INFINITY : 0.0);
        }
    }
    return worst;
}

// Parameters after the three steps: elements at the rounding floor within adam_bound (absolute), the others
// within REL_TOL of their tensor's largest |p|. The key bias is all floor (its gradient is noise). Returns
// the worst relative error of the non-floor elements.
static double compare_params_after_steps(const ParamEntry *tab, int n_tab, const float *gpu, const float *cpu,
                                         const double *u, double adam_bound) {
    double worst = 0.0;
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e), o = e->offset, n_floor = 0, at = 0, at_floor = 0;
        double rel_bound = REL_TOL * max_abs_f(cpu + o, n), worst_rel = 0.0, worst_floor = 0.0;
        int key = fixture_is_key_bias(e->name);
        for (size_t i = 0; i < n; i++) {
            double d = fabs((double)gpu[o + i] - (double)cpu[o + i]);
            if (isnan(d)) d = INFINITY;
            if (key || adam_bound * fmin(u[o + i], 1.0) > rel_bound) {
                n_floor++;
                if (d >= worst_floor) worst_floor = d, at_floor = i;
            } else if (d >= worst_rel) {
                worst_rel = d, at = i;
            }
        }
        double r = rel_bound > 0 ? worst_rel / (rel_bound / REL_TOL) : worst_rel;
        printf("  param %-48s %.2e; %zu of %zu at the rounding floor, max |GPU - CPU| there %.2e (bound %.2e)\n",
               e->name, r, n_floor, n, worst_floor, adam_bound);
        CHECK(worst_rel <= rel_bound, "param %s: element %zu differs by %.3e > %.1e x max|p| (GPU %.9g CPU %.9g, "
              "gradient uncertainty %.2e)", e->name, at, worst_rel, REL_TOL, gpu[o + at], cpu[o + at], u[o + at]);
        CHECK(worst_floor <= adam_bound, "param %s: floor element %zu differs by %.3e > %.3e (GPU %.9g CPU %.9g)",
              e->name, at_floor, worst_floor, adam_bound, gpu[o + at_floor], cpu[o + at_floor]);
        worst = fmax(worst, r);
    }
    return worst;
}

static void test_vs_cpu(void) {
    Setup s = small_setup();
    const ModelConfig *c = &s.cfg;
    int B = 5, T = c->max_seq, V = c->vocab;
    size_t n = (size_t)B * T, P = model_num_params(c);
    printf("part 2: GPU vs CPU, TF32 off (V %d, C %d, H %d, L %d, F %d, T %d, B %d of %d, dropout %.2f)\n", V,
           c->d_model, c->n_heads, c->n_layers, c->d_ff, T, B, s.max_B, c->dropout);
    int n_tab;
    ParamEntry *tab = param_table(c, &n_tab);
    float *init = mlm_malloc(P * sizeof(float), "init");
    init_params(c, init, s.seed);
    CpuModel *cm = cpu_model_create(c, s.max_B);
    CudaModel *gm = cuda_model_create(c, s.max_B, 0);
    memcpy(cm->params, init, P * sizeof(float));
    cuda_model_set_params(gm, init);

    int *tokens = mlm_malloc(n * sizeof(int), "tokens");
    int *in_c = mlm_malloc(n * sizeof(int), "inputs"), *lab_c = mlm_malloc(n * sizeof(int), "labels");
    int *in_g = mlm_malloc(n * sizeof(int), "inputs"), *lab_g = mlm_malloc(n * sizeof(int), "labels");
    float *grads = mlm_malloc(P * sizeof(float), "grads"), *params = mlm_malloc(P * sizeof(float), "params");
    float *logits = mlm_malloc(n * V * sizeof(float), "logits");
    random_tokens(tokens, n, s.mask.n_chars);
    Rng rng;
    rng_init(&rng, s.seed, RNG_DOMAIN_TRAIN);

    // A forward and backward at step 7 (nonzero offsets), dropout on.
    uint64_t step = 7;
    float *u = mlm_malloc(4 * n * sizeof(float), "uniforms");
    rng_uniform(&rng, rng_mask_offset(&s.layout, step), u, 4 * n);
    mask_apply(&s.mask, tokens, n, u, in_c, lab_c);
    free(u);
    ReluTies relu;
    relu_ties_attach(&relu, cm);
    CudaStepStats st;
    CpuPass pass;
    gpu_then_cpu(&s, gm, cm, &relu, &rng, tokens, in_c, lab_c, B, step, grads, &st, &pass, "step 7");
    cuda_model_get_batch(gm, in_g, lab_g, B);
    cuda_model_get_logits(gm, logits, B);
    float loss_c = pass.loss;
    int correct_c = pass.correct;
    size_t diff = 0, selected = 0;
    for (size_t i = 0; i < n; i++) {
        diff += in_c[i] != in_g[i] || lab_c[i] != lab_g[i];
        selected += lab_c[i] != s.mask.pad_id;
    }
    printf("  masking: %zu of %zu positions selected, %zu differ between CPU and GPU\n", selected, n, diff);
    CHECK(diff == 0, "masked inputs/labels differ at %zu of %zu positions", diff, n);
    CHECK(selected > 0, "no position selected: the test batch is degenerate");
    CHECK(st.n_targets == cm->n_targets, "targets: GPU %d, CPU %d", st.n_targets, cm->n_targets);
    double r = rel_err_f(&st.loss, &loss_c, 1, NULL);
    printf("  loss: GPU %.7f CPU %.7f (rel %.2e)\n", st.loss, loss_c, r);
    CHECK(r <= REL_TOL, "loss with dropout: relative error %.3e > %.1e", r, REL_TOL);
    r = rel_err_f(logits, cm->logits, n * V, NULL);
    printf("  logits (dropout on): rel %.2e\n", r);
    CHECK(r <= REL_TOL, "logits with dropout: relative error %.3e > %.1e", r, REL_TOL);
    int ties = near_ties(cm->logits, lab_c, n, V, s.mask.pad_id, 2.0 * max_abs_err(logits, cm->logits, n * V, NULL));
    printf("  correct: GPU %d CPU %d (%d near ties)\n", st.correct, correct_c, ties);
    CHECK(abs(st.correct - correct_c) <= ties, "correct: GPU %d, CPU %d, only %d near ties", st.correct, correct_c,
          ties);
    double key_bound = GRAD_TOL_VS_CPU * max_abs_f(cm->grads, P);
    double worst_grad = compare_tensors("grad", tab, n_tab, grads, cm->grads, GRAD_TOL_VS_CPU, key_bound,
                                        "1e-4 of the largest gradient; zero in exact arithmetic");

    // Logits only (the samples path: no labels, no dropout), on the same masked inputs.
    cpu_model_forward(cm, in_c, NULL, B, s.mask.pad_id, NULL, NULL);
    cuda_model_forward(gm, in_c, NULL, B, s.mask.pad_id, NULL, NULL, &st);
    cuda_model_get_logits(gm, logits, B);
    r = rel_err_f(logits, cm->logits, n * V, NULL);
    printf("  logits (no labels, no dropout): rel %.2e\n", r);
    CHECK(r <= REL_TOL, "logits without dropout: relative error %.3e > %.1e", r, REL_TOL);

    // Three full training steps from the same start: train.c's CPU step vs cuda_model_train_step.
    CudaRandom rnd = {.philox_seed = rng.seed, .layout = s.layout, .step = 0, .dropout_p = c->dropout};
    float *adam_m = mlm_calloc(P, sizeof(float), "m"), *adam_v = mlm_calloc(P, sizeof(float), "v");
    float *zeros = mlm_calloc(P, sizeof(float), "zeros");
    memcpy(cm->params, init, P * sizeof(float));
    cuda_model_set_params(gm, init);
    cuda_model_set_adam(gm, zeros, zeros);
    double worst_loss = 0.0, worst_norm = 0.0, worst_step_grad = 0.0, lr_sum = 0.0;
    double *unc = mlm_calloc(P, sizeof(double), "gradient uncertainty");
    float *g_cpu = mlm_malloc(P * sizeof(float), "CPU grads");
    float *logits_c = mlm_malloc(n * V * sizeof(float), "CPU logits");
    for (int k = 0; k < 3; k++) {
        random_tokens(tokens, n, s.mask.n_chars);
        rnd.step = (uint64_t)k;
        lr_sum += optim_lr(&s.oc, k + 1);
        cuda_model_train_step(gm, tokens, B, &s.mask, &rnd, s.max_norm, &s.oc, k + 1, optim_lr(&s.oc, k + 1), &st);
        cuda_model_get_grads(gm, grads);  // the step's gradients (the optimizer clips on the fly, grads stay)
        cuda_model_get_logits(gm, logits, B);
        float norm_c;
        int correct, targets;
        loss_c = cpu_train_step(&s, cm, &relu, grads, &rng, tokens, B, (uint64_t)k, adam_m, adam_v, in_c, lab_c,
                                &norm_c, &correct, &targets, g_cpu);
        memcpy(logits_c, cm->logits, n * V * sizeof(float));
        double tie_eps = 2.0 * max_abs_err(logits, logits_c, n * V, NULL);
        int step_ties = near_ties(logits_c, lab_c, n, V, s.mask.pad_id, tie_eps);
        double rl = rel_err_f(&st.loss, &loss_c, 1, NULL), rn = rel_err_f(&st.grad_norm, &norm_c, 1, NULL);
        printf("  step %d: loss GPU %.7f CPU %.7f (rel %.2e), norm GPU %.7f CPU %.7f (rel %.2e), correct %d/%d "
               "(%d near ties), targets %d/%d\n", k + 1, st.loss, loss_c, rl, st.grad_norm, norm_c, rn, st.correct,
               correct, step_ties, st.n_targets, targets);
        CHECK(rl <= REL_TOL, "train step %d loss: relative error %.3e", k + 1, rl);
        CHECK(rn <= REL_TOL, "train step %d grad norm: relative error %.3e", k + 1, rn);
        CHECK(st.n_targets == targets, "train step %d: targets GPU %d CPU %d", k + 1, st.n_targets, targets);
        CHECK(abs(st.correct - correct) <= step_ties, "train step %d: correct GPU %d CPU %d, only %d near ties",
              k + 1, st.correct, correct, step_ties);
        worst_step_grad = fmax(worst_step_grad, track_grad_noise(tab, n_tab, grads, g_cpu,
                                                                 GRAD_TOL_VS_CPU * max_abs_f(g_cpu, P), unc, k + 1));
        worst_loss = fmax(worst_loss, rl);
        worst_norm = fmax(worst_norm, rn);
    }
    cuda_model_get_params(gm, params);
    double worst_param = compare_params_after_steps(tab, n_tab, params, cm->params, unc, 2.0 * 1.005 * lr_sum);
    printf("  summary: grads worst %.2e, in the 3 steps %.2e (bound %.0e); after 3 steps: losses %.2e, norms %.2e, "
           "params %.2e (off the floor)\n", worst_grad, worst_step_grad, GRAD_TOL_VS_CPU, worst_loss, worst_norm,
           worst_param);
    relu_ties_print(&relu, "GPU");
    free(unc), free(g_cpu), free(logits_c);

    rng_free(&rng);
    cpu_model_free(cm);
    relu_ties_free(&relu);
    cuda_model_free(gm);
    free(tab), free(init), free(tokens), free(in_c), free(lab_c), free(in_g), free(lab_g), free(grads), free(params);
    free(logits), free(adam_m), free(adam_v), free(zeros);
}

// 2b. A sequence longer than one tile of keys (T 65: three tiles of the GPU's tiled attention, two of the CPU's):
// one forward and backward with dropout against the CPU, with the bounds of part 2 (loss 1e-5, gradients 1e-4 of
// the largest).

static void test_vs_cpu_attention_tiles(void) {
    Setup s = small_setup();
    s.cfg.max_seq = 65;
    s.cfg.n_layers = 1;
    s.max_B = 3;
    s.layout = rng_layout(s.max_B, s.cfg.max_seq, s.cfg.d_model, s.cfg.n_heads, s.cfg.d_ff, s.cfg.n_layers);
    const ModelConfig *c = &s.cfg;
    int B = 2, T = c->max_seq;
    size_t n = (size_t)B * T, P = model_num_params(c);
    printf("part 2b: GPU vs CPU, several attention tiles (T %d, C %d, H %d, L %d, B %d of %d, dropout %.2f)\n", T,
           c->d_model, c->n_heads, c->n_layers, B, s.max_B, c->dropout);
    int n_tab;
    ParamEntry *tab = param_table(c, &n_tab);
    float *init = mlm_malloc(P * sizeof(float), "init"), *grads = mlm_malloc(P * sizeof(float), "grads");
    init_params(c, init, s.seed);
    CpuModel *cm = cpu_model_create(c, s.max_B);
    CudaModel *gm = cuda_model_create(c, s.max_B, 0);
    memcpy(cm->params, init, P * sizeof(float));
    cuda_model_set_params(gm, init);
    int *tokens = mlm_malloc(n * sizeof(int), "tokens");
    int *in_c = mlm_malloc(n * sizeof(int), "inputs"), *lab_c = mlm_malloc(n * sizeof(int), "labels");
    random_tokens(tokens, n, s.mask.n_chars);
    Rng rng;
    rng_init(&rng, s.seed, RNG_DOMAIN_TRAIN);
    uint64_t step = 3;
    float *u = mlm_malloc(4 * n * sizeof(float), "uniforms");
    rng_uniform(&rng, rng_mask_offset(&s.layout, step), u, 4 * n);
    mask_apply(&s.mask, tokens, n, u, in_c, lab_c);
    free(u);
    ReluTies relu;
    relu_ties_attach(&relu, cm);
    CudaStepStats st;
    CpuPass pass;
    gpu_then_cpu(&s, gm, cm, &relu, &rng, tokens, in_c, lab_c, B, step, grads, &st, &pass, "several tiles");
    float loss_c = pass.loss;
    CHECK(st.n_targets == cm->n_targets && st.n_targets > 0, "targets: GPU %d, CPU %d", st.n_targets, cm->n_targets);
    double r = rel_err_f(&st.loss, &loss_c, 1, NULL);
    printf("  loss: GPU %.7f CPU %.7f (rel %.2e)\n", st.loss, loss_c, r);
    CHECK(r <= REL_TOL, "several attention tiles, loss: relative error %.3e > %.1e", r, REL_TOL);
    compare_tensors("grad (several attention tiles)", tab, n_tab, grads, cm->grads, GRAD_TOL_VS_CPU,
                    GRAD_TOL_VS_CPU * max_abs_f(cm->grads, P), "1e-4 of the largest gradient; zero in exact arithmetic");
    relu_ties_print(&relu, "GPU");
    rng_free(&rng);
    cpu_model_free(cm);
    relu_ties_free(&relu);
    cuda_model_free(gm);
    free(tab), free(init), free(grads), free(tokens), free(in_c), free(lab_c);
}

// ---------------------------------------------------------------------------------------------------------
// 3. Determinism: two runs, one seed, bit-identical.

enum { MAX_RUN_STEPS = 50 };
static int run_steps = MAX_RUN_STEPS;

typedef struct {
    float loss[MAX_RUN_STEPS], norm[MAX_RUN_STEPS];
    float *params, *adam_m, *adam_v;
} RunResult;

static void gpu_run(const Setup *s, const float *init, RunResult *out) {
    const ModelConfig *c = &s->cfg;
    size_t P = model_num_params(c), BT = (size_t)s->max_B * c->max_seq;
    CudaModel *gm = cuda_model_create(c, s->max_B, 1);  // TF32 on: the default training path
    cuda_model_set_params(gm, init);
    int *tokens = mlm_malloc(BT * sizeof(int), "tokens");
    Rng rng;
    rng_init(&rng, s->seed, RNG_DOMAIN_TRAIN);
    CudaRandom rnd = {.philox_seed = rng.seed, .layout = s->layout, .step = 0, .dropout_p = c->dropout};
    lcg_state = 999;
    for (int k = 0; k < run_steps; k++) {
        int B = k % 7 == 6 ? 3 : s->max_B;  // some partial batches
        random_tokens(tokens, (size_t)B * c->max_seq, s->mask.n_chars);
        rnd.step = (uint64_t)k;
        CudaStepStats st;
        cuda_model_train_step(gm, tokens, B, &s->mask, &rnd, s->max_norm, &s->oc, k + 1, optim_lr(&s->oc, k + 1), &st);
        out->loss[k] = st.loss;
        out->norm[k] = st.grad_norm;
    }
    out->params = mlm_malloc(P * sizeof(float), "params");
    out->adam_m = mlm_malloc(P * sizeof(float), "m");
    out->adam_v = mlm_malloc(P * sizeof(float), "v");
    cuda_model_get_params(gm, out->params);
    cuda_model_get_adam(gm, out->adam_m, out->adam_v);
    rng_free(&rng);
    free(tokens);
    cuda_model_free(gm);
}

static void test_determinism(void) {
    Setup s = small_setup();
    size_t P = model_num_params(&s.cfg);
    printf("part 3: two GPU runs of %d steps, one seed, TF32 on\n", run_steps);
    float *init = mlm_malloc(P * sizeof(float), "init");
    init_params(&s.cfg, init, s.seed);
    RunResult a, b;
    gpu_run(&s, init, &a);
    gpu_run(&s, init, &b);
    int same_steps = 0, finite = 1;
    for (int k = 0; k < run_steps; k++) {
        same_steps += memcmp(&a.loss[k], &b.loss[k], sizeof(float)) == 0 && memcmp(&a.norm[k], &b.norm[k], sizeof(float)) == 0;
        finite &= isfinite(a.loss[k]) && isfinite(a.norm[k]);
    }
    printf("  losses: step 1 %.6f, step %d %.6f; %d of %d steps bit-identical\n", a.loss[0], run_steps,
           a.loss[run_steps - 1], same_steps, run_steps);
    CHECK(finite, "a loss or gradient norm is not finite");
    CHECK(same_steps == run_steps, "only %d of %d steps have bit-identical loss and norm", same_steps, run_steps);
    CHECK(memcmp(a.params, b.params, P * sizeof(float)) == 0, "parameters differ after %d steps", run_steps);
    CHECK(memcmp(a.adam_m, b.adam_m, P * sizeof(float)) == 0 && memcmp(a.adam_v, b.adam_v, P * sizeof(float)) == 0,
          "Adam moments differ after %d steps", run_steps);
    free(init), free(a.params), free(a.adam_m), free(a.adam_v), free(b.params), free(b.adam_m), free(b.adam_v);
}

// ---------------------------------------------------------------------------------------------------------
// 4. State round trip.

static void test_roundtrip(void) {
    Setup s = small_setup();
    size_t P = model_num_params(&s.cfg);
    printf("part 4: parameters and Adam moments set/get\n");
    float *a = mlm_malloc(P * sizeof(float), "a"), *m = mlm_malloc(P * sizeof(float), "m");
    float *v = mlm_malloc(P * sizeof(float), "v"), *back = mlm_malloc(3 * P * sizeof(float), "back");
    for (size_t i = 0; i < P; i++) {
        a[i] = (float)(rand_unit() * 2 - 1) * 1e3f;
        m[i] = (float)(rand_unit() * 2 - 1) * 1e-3f;
        v[i] = (float)rand_unit() * 1e-7f;
    }
    a[0] = -0.0f, a[1] = FLT_MIN / 2, a[2] = FLT_MAX;  // signed zero, a subnormal, the largest float
    CudaModel *gm = cuda_model_create(&s.cfg, s.max_B, 1);
    cuda_model_set_params(gm, a);
    cuda_model_set_adam(gm, m, v);
    cuda_model_get_params(gm, back);
    cuda_model_get_adam(gm, back + P, back + 2 * P);
    CHECK(memcmp(back, a, P * sizeof(float)) == 0, "parameters changed in a set/get round trip");
    CHECK(memcmp(back + P, m, P * sizeof(float)) == 0, "Adam m changed in a set/get round trip");
    CHECK(memcmp(back + 2 * P, v, P * sizeof(float)) == 0, "Adam v changed in a set/get round trip");
    cuda_model_free(gm);
    free(a), free(m), free(v), free(back);
}

// ---------------------------------------------------------------------------------------------------------
// 5. train.cuda_graph: captured and replayed steps equal the plain launches bit for bit, and the CPU.

// A shape's first step runs as plain launches (the warm-up before any capture, issue 21 item 5), its second is
// captured and launched, later ones replay the graph. Five shapes (GRAPH_KEYS), each run plain, then captured:
// training batches of 8 (steps 1, 3, 5, 7, 8: two replays and more) and 3 (2, 4, 6), validation forwards of 8
// (after steps 1, 3, 5) and 3 (after 2 and 6), and of 8 with dropout on (the samples' train.eval_dropout, after 7
// and 8).
enum { GRAPH_STEPS = 8, GRAPH_FORWARDS = 7, GRAPH_KEYS = 5 };
static const int graph_batch[GRAPH_STEPS] = {8, 3, 8, 3, 8, 3, 8, 8};
// A validation forward after each step: its batch (0: none) and dropout.
static const int graph_valid_batch[GRAPH_STEPS] = {8, 3, 8, 0, 8, 3, 8, 8};
static const float graph_valid_dropout[GRAPH_STEPS] = {0, 0, 0, 0, 0, 0, 0.1f, 0.1f};

typedef struct {
    float loss[GRAPH_STEPS], norm[GRAPH_STEPS], valid_loss[GRAPH_STEPS];
    int correct[GRAPH_STEPS], valid_correct[GRAPH_STEPS];
    float *params, *adam_m, *adam_v, *grads;  // grads: [GRAPH_STEPS, P] each step's gradients
} GraphRun;

static void graph_run(const Setup *s, const float *init, int use_graphs, GraphRun *out) {
    const ModelConfig *c = &s->cfg;
    size_t P = model_num_params(c), BT = (size_t)s->max_B * c->max_seq;
    CudaModel *gm = cuda_model_create(c, s->max_B, 0);
    cuda_model_set_graphs(gm, use_graphs);
    cuda_model_set_params(gm, init);
    float *zeros = mlm_calloc(P, sizeof(float), "zeros");
    cuda_model_set_adam(gm, zeros, zeros);
    int *tokens = mlm_malloc(BT * sizeof(int), "tokens");
    Rng train, valid;
    rng_init(&train, s->seed, RNG_DOMAIN_TRAIN);
    rng_init(&valid, s->seed, RNG_DOMAIN_VALID);
    CudaRandom rnd = {.philox_seed = train.seed, .layout = s->layout, .step = 0, .dropout_p = c->dropout};
    out->grads = mlm_malloc(GRAPH_STEPS * P * sizeof(float), "grads");
    lcg_state = 4711;
    for (int k = 0; k < GRAPH_STEPS; k++) {
        int B = graph_batch[k];
        random_tokens(tokens, (size_t)B * c->max_seq, s->mask.n_chars);
        rnd.step = (uint64_t)k;
        CudaStepStats st;
        cuda_model_train_step(gm, tokens, B, &s->mask, &rnd, s->max_norm, &s->oc, k + 1, optim_lr(&s->oc, k + 1), &st);
        out->loss[k] = st.loss;
        out->norm[k] = st.grad_norm;
        out->correct[k] = st.correct;
        cuda_model_get_grads(gm, out->grads + (size_t)k * P);
        out->valid_loss[k] = 0.0f;
        out->valid_correct[k] = 0;
        if (graph_valid_batch[k]) {
            int VB = graph_valid_batch[k];
            random_tokens(tokens, (size_t)VB * c->max_seq, s->mask.n_chars);
            CudaRandom vr = {.philox_seed = valid.seed, .layout = s->layout, .step = (uint64_t)k,
                             .dropout_p = graph_valid_dropout[k]};
            cuda_model_forward(gm, tokens, NULL, VB, s->mask.pad_id, &s->mask, &vr, &st);
            out->valid_loss[k] = st.loss;
            out->valid_correct[k] = st.correct;
        }
    }
    out->params = mlm_malloc(P * sizeof(float), "params");
    out->adam_m = mlm_malloc(P * sizeof(float), "m");
    out->adam_v = mlm_malloc(P * sizeof(float), "v");
    cuda_model_get_params(gm, out->params);
    cuda_model_get_adam(gm, out->adam_m, out->adam_v);
    rng_free(&train), rng_free(&valid);
    free(tokens), free(zeros);
    cuda_model_free(gm);
}

static void graph_run_free(GraphRun *r) { free(r->params), free(r->adam_m), free(r->adam_v), free(r->grads); }

// The same steps on the CPU backend (train.c's step and validation forward), each step's ReLU ties taken the way
// g_gpu[GRAPH_STEPS, P] (the GPU run's gradients) shows.
static void graph_run_cpu(const Setup *s, const float *init, const float *g_gpu, GraphRun *out) {
    const ModelConfig *c = &s->cfg;
    size_t P = model_num_params(c), BT = (size_t)s->max_B * c->max_seq;
    CpuModel *cm = cpu_model_create(c, s->max_B);
    ReluTies relu;
    relu_ties_attach(&relu, cm);
    memcpy(cm->params, init, P * sizeof(float));
    out->adam_m = mlm_calloc(P, sizeof(float), "m");
    out->adam_v = mlm_calloc(P, sizeof(float), "v");
    out->grads = mlm_malloc(GRAPH_STEPS * P * sizeof(float), "grads");
    int *tokens = mlm_malloc(BT * sizeof(int), "tokens"), *inputs = mlm_malloc(BT * sizeof(int), "inputs");
    int *labels = mlm_malloc(BT * sizeof(int), "labels");
    float *u = mlm_malloc(4 * BT * sizeof(float), "uniforms");
    Rng train, valid;
    rng_init(&train, s->seed, RNG_DOMAIN_TRAIN);
    rng_init(&valid, s->seed, RNG_DOMAIN_VALID);
    lcg_state = 4711;
    for (int k = 0; k < GRAPH_STEPS; k++) {
        int B = graph_batch[k], targets;
        random_tokens(tokens, (size_t)B * c->max_seq, s->mask.n_chars);
        out->loss[k] = cpu_train_step(s, cm, &relu, g_gpu + (size_t)k * P, &train, tokens, B, (uint64_t)k, out->adam_m,
                                      out->adam_v, inputs, labels, &out->norm[k], &out->correct[k], &targets,
                                      out->grads + (size_t)k * P);
        out->valid_loss[k] = 0.0f;
        out->valid_correct[k] = 0;
        if (graph_valid_batch[k]) {
            int VB = graph_valid_batch[k];
            size_t n = (size_t)VB * c->max_seq;
            random_tokens(tokens, n, s->mask.n_chars);
            rng_uniform(&valid, rng_mask_offset(&s->layout, (uint64_t)k), u, 4 * n);
            mask_apply(&s->mask, tokens, n, u, inputs, labels);
            DropoutCtx d = {.rng = &valid, .layout = s->layout, .step = (uint64_t)k, .p = graph_valid_dropout[k]};
            out->valid_loss[k] = cpu_model_forward(cm, inputs, labels, VB, s->mask.pad_id,
                                                   graph_valid_dropout[k] > 0 ? &d : NULL, &out->valid_correct[k]);
        }
    }
    out->params = mlm_malloc(P * sizeof(float), "params");
    memcpy(out->params, cm->params, P * sizeof(float));
    relu_ties_print(&relu, "GPU");
    rng_free(&train), rng_free(&valid);
    free(tokens), free(inputs), free(labels), free(u);
    cpu_model_free(cm);
    relu_ties_free(&relu);
}

static void test_graphs(void) {
    Setup s = small_setup();
    size_t P = model_num_params(&s.cfg);
    printf("part 5: %d steps (batches of 8 and 3) and %d validation forwards, train.cuda_graph on vs off vs CPU\n",
           GRAPH_STEPS, GRAPH_FORWARDS);
    float *init = mlm_malloc(P * sizeof(float), "init");
    init_params(&s.cfg, init, s.seed);
    GraphRun on, off, cpu;
#ifdef MLM_CUDA_EMULATION
    EmuCounters before, after;
    emu_counters_get(&before);
#endif
    graph_run(&s, init, 1, &on);
#ifdef MLM_CUDA_EMULATION
    emu_counters_get(&after);
    // Every step and forward with graphs is one graph launch but the first of each shape (plain launches), no
    // kernel and no cuBLAS shape is first used inside a capture, and no cuRAND call is made.
    printf("  graphs on: %llu graph launches, %llu cold captures, %llu cuRAND calls\n",
           (unsigned long long)(after.graph_launches - before.graph_launches),
           (unsigned long long)(after.cold_captures - before.cold_captures),
           (unsigned long long)(after.curand_calls - before.curand_calls));
    CHECK(after.graph_launches - before.graph_launches == GRAPH_STEPS + GRAPH_FORWARDS - GRAPH_KEYS,
          "graph launches: %llu, expected one per step and forward but the first of each of the %d shapes (%d)",
          (unsigned long long)(after.graph_launches - before.graph_launches), GRAPH_KEYS,
          GRAPH_STEPS + GRAPH_FORWARDS - GRAPH_KEYS);
    CHECK(after.cold_captures == before.cold_captures,
          "%llu kernel launches or cuBLAS calls were captured before their first use outside a capture",
          (unsigned long long)(after.cold_captures - before.cold_captures));
    CHECK(after.curand_calls == before.curand_calls, "cuRAND was called during the steps");
    emu_counters_get(&before);
#endif
    graph_run(&s, init, 0, &off);
#ifdef MLM_CUDA_EMULATION
    emu_counters_get(&after);
    CHECK(after.graph_launches == before.graph_launches, "graphs were launched with train.cuda_graph off");
#endif
    int same = 0;
    for (int k = 0; k < GRAPH_STEPS; k++) {
        int eq = memcmp(&on.loss[k], &off.loss[k], sizeof(float)) == 0 &&
                 memcmp(&on.norm[k], &off.norm[k], sizeof(float)) == 0 && on.correct[k] == off.correct[k] &&
                 memcmp(&on.valid_loss[k], &off.valid_loss[k], sizeof(float)) == 0 &&
                 on.valid_correct[k] == off.valid_correct[k];
        same += eq;
        printf("  step %d (B %d): loss %.7f norm %.7f%s; valid %.7f (B %d)%s\n", k + 1, graph_batch[k], on.loss[k],
               on.norm[k], eq ? "" : " DIFFERS", on.valid_loss[k], graph_valid_batch[k], eq ? "" : " DIFFERS");
    }
    CHECK(same == GRAPH_STEPS, "only %d of %d steps are bit-identical with and without graphs", same, GRAPH_STEPS);
    CHECK(memcmp(on.grads, off.grads, GRAPH_STEPS * P * sizeof(float)) == 0, "gradients differ with and without graphs");
    CHECK(memcmp(on.params, off.params, P * sizeof(float)) == 0, "parameters differ with and without graphs");
    CHECK(memcmp(on.adam_m, off.adam_m, P * sizeof(float)) == 0 && memcmp(on.adam_v, off.adam_v, P * sizeof(float)) == 0,
          "Adam moments differ with and without graphs");

    // Against the CPU backend, with test_vs_cpu's tolerances.
    graph_run_cpu(&s, init, on.grads, &cpu);
    int n_tab;
    ParamEntry *tab = param_table(&s.cfg, &n_tab);
    double *unc = mlm_calloc(P, sizeof(double), "gradient uncertainty"), lr_sum = 0.0, worst = 0.0;
    for (int k = 0; k < GRAPH_STEPS; k++) {
        const float *gg = on.grads + (size_t)k * P, *gc = cpu.grads + (size_t)k * P;
        track_grad_noise(tab, n_tab, gg, gc, GRAD_TOL_VS_CPU * max_abs_f(gc, P), unc, k + 1);
        lr_sum += optim_lr(&s.oc, k + 1);
        double rl = rel_err_f(&on.loss[k], &cpu.loss[k], 1, NULL), rn = rel_err_f(&on.norm[k], &cpu.norm[k], 1, NULL);
        double rv = rel_err_f(&on.valid_loss[k], &cpu.valid_loss[k], 1, NULL);
        CHECK(rl <= REL_TOL && rn <= REL_TOL && rv <= REL_TOL,
              "step %d vs CPU: loss rel %.3e, norm rel %.3e, validation loss rel %.3e > %.1e", k + 1, rl, rn, rv,
              REL_TOL);
        worst = fmax(worst, fmax(rl, fmax(rn, rv)));
    }
    printf("  vs CPU: losses, norms and validation losses within %.2e\n", worst);
    compare_params_after_steps(tab, n_tab, on.params, cpu.params, unc, 2.0 * 1.005 * lr_sum);
    free(unc), free(tab), free(init);
    graph_run_free(&on), graph_run_free(&off), graph_run_free(&cpu);
}

// ---------------------------------------------------------------------------------------------------------
// 6. Gradient accumulation (train.accum_steps = 2) on the device: each micro-batch draws the random numbers its
// rows get in the whole batch (mask and every dropout site), its gradient is divided by the whole batch's target
// count, the sums run on the device and one clip + Adam follows. Three steps with batches of 8, 5 (a partial
// last batch: micro-batches of 4 and 1 rows) and 8, dropout on, against (a) the CPU backend accumulating the same
// way (train.c's train_step_accumulated): masks identical, losses and norms within 1e-5, the summed gradients
// within 1e-4, parameters as part 2; (b) the same steps with train.cuda_graph off: bit for bit; (c) the CUDA
// step without accumulation (whole batches of 8): the same masks, and gradients, losses and parameters within
// the same float tolerances (the sums run in other orders); (d) with sparse prediction against (a)'s dense run.
// And a data-parallel rank's rows draw their own dropout (test_rank_rows_dropout).

enum { ACC_STEPS = 3, ACC_K = 2, ACC_BATCH = 8 };
static const int acc_batch[ACC_STEPS] = {8, 5, 8};

typedef struct {
    float loss[ACC_STEPS], norm[ACC_STEPS];
    int correct[ACC_STEPS], targets[ACC_STEPS];
    int *inputs, *labels;  // [ACC_STEPS, ACC_BATCH * T] each step's masked batch
    float *logits;         // [ACC_STEPS, ACC_BATCH * T, V]
    float *grads;          // [ACC_STEPS, P] each step's summed gradients (before clipping)
    float *params, *adam_m, *adam_v;
} AccumRun;

// The whole batch's masking on the host (as train.c's mask_batch): inputs, labels and the count of targets.
static int host_mask_whole_batch(const Setup *s, Rng *rng, const int *tokens, int B, uint64_t step, int *inputs,
                                 int *labels) {
    size_t n = (size_t)B * s->cfg.max_seq;
    float *u = mlm_malloc(4 * n * sizeof(float), "uniforms");
    rng_uniform(rng, rng_mask_offset(&s->layout, step), u, 4 * n);
    mask_apply(&s->mask, tokens, n, u, inputs, labels);
    free(u);
    int count = 0;
    for (size_t i = 0; i < n; i++) count += labels[i] != s->mask.pad_id;
    return count;
}

static void accum_run_alloc(const Setup *s, AccumRun *out) {
    size_t P = model_num_params(&s->cfg), BT = (size_t)ACC_BATCH * s->cfg.max_seq;
    out->inputs = mlm_malloc(ACC_STEPS * BT * sizeof(int), "inputs");
    out->labels = mlm_malloc(ACC_STEPS * BT * sizeof(int), "labels");
    out->logits = mlm_malloc(ACC_STEPS * BT * s->cfg.vocab * sizeof(float), "logits");
    out->grads = mlm_malloc(ACC_STEPS * P * sizeof(float), "grads");
    out->params = mlm_malloc(P * sizeof(float), "params");
    out->adam_m = mlm_malloc(P * sizeof(float), "m");
    out->adam_v = mlm_malloc(P * sizeof(float), "v");
}

static void accum_run_free(AccumRun *r) {
    free(r->inputs), free(r->labels), free(r->logits), free(r->grads), free(r->params), free(r->adam_m);
    free(r->adam_v);
}

// The steps on the device: k = ACC_K micro-batches of ACC_BATCH / k rows per step (the model holds one
// micro-batch), or k = 1, the plain training step on whole batches.
static void accum_run_gpu(const Setup *s, const float *init, int k, int use_graphs, int sparse, AccumRun *out) {
    const ModelConfig *c = &s->cfg;
    int T = c->max_seq, V = c->vocab, mb = ACC_BATCH / k;
    size_t P = model_num_params(c), BT = (size_t)ACC_BATCH * T;
    accum_run_alloc(s, out);
    CudaModel *gm = cuda_model_create(c, mb, 0);
    cuda_model_set_graphs(gm, use_graphs);
    cuda_model_set_sparse_prediction(gm, sparse);
    cuda_model_set_params(gm, init);
    float *zeros = mlm_calloc(P, sizeof(float), "zeros");
    cuda_model_set_adam(gm, zeros, zeros);
    int *tokens = mlm_malloc(BT * sizeof(int), "tokens"), *inputs = mlm_malloc(BT * sizeof(int), "host inputs");
    int *labels = mlm_malloc(BT * sizeof(int), "host labels");
    Rng rng;
    rng_init(&rng, s->seed, RNG_DOMAIN_TRAIN);
    lcg_state = 5150;
    for (int step = 0; step < ACC_STEPS; step++) {
        int B = acc_batch[step];
        random_tokens(tokens, (size_t)B * T, s->mask.n_chars);
        CudaRandom rnd = {.philox_seed = rng.seed, .layout = s->layout, .step = (uint64_t)step,
                          .dropout_p = c->dropout};
        int *in = out->inputs + step * BT, *lab = out->labels + step * BT;
        float *lg = out->logits + step * BT * V, *grads = out->grads + step * P;
        CudaStepStats st;
        long t = step + 1;
        if (k == 1) {
            cuda_model_train_step(gm, tokens, B, &s->mask, &rnd, s->max_norm, &s->oc, t, optim_lr(&s->oc, t), &st);
            cuda_model_get_batch(gm, in, lab, B);
            cuda_model_get_logits(gm, lg, B);
            cuda_model_get_grads(gm, grads);
        } else {
            int n_total = host_mask_whole_batch(s, &rng, tokens, B, (uint64_t)step, inputs, labels);
            for (int j = 0; j < k; j++) {
                int r0 = j * mb, rows = MLM_MIN(mb, B - r0);
                if (rows <= 0) continue;
                rnd.first_row = r0;
                rnd.batch_rows = B;
                cuda_model_accumulate(gm, tokens + (size_t)r0 * T, rows, &s->mask, &rnd, n_total, j == 0);
                cuda_model_get_batch(gm, in + (size_t)r0 * T, lab + (size_t)r0 * T, rows);
                cuda_model_get_logits(gm, lg + (size_t)r0 * T * V, rows);
            }
            cuda_model_apply_accumulated(gm, s->max_norm, &s->oc, t, optim_lr(&s->oc, t), &st);
            cuda_model_get_accumulated_grads(gm, grads);
        }
        out->loss[step] = st.loss;
        out->norm[step] = st.grad_norm;
        out->correct[step] = st.correct;
        out->targets[step] = st.n_targets;
    }
    cuda_model_get_params(gm, out->params);
    cuda_model_get_adam(gm, out->adam_m, out->adam_v);
    rng_free(&rng);
    free(tokens), free(inputs), free(labels), free(zeros);
    cuda_model_free(gm);
}

// One step's micro-batches on the CPU, their gradients summed in order: the run relu_ties_resolve repeats.
typedef struct {
    const Setup *s;
    CpuModel *cm;
    Rng *rng;
    int B, step;
    const int *inputs, *labels;  // [B, T] the whole batch, masked
    float *logits;               // [B, T, V] out
    double loss_sum;             // out: sum of the micro-batches' loss x targets
    int correct;                 // out
} AccumPass;

static void accum_pass_run(void *ctx, ReluTies *t, float *grads) {
    AccumPass *a = ctx;
    const ModelConfig *c = &a->s->cfg;
    int T = c->max_seq, V = c->vocab, mb = ACC_BATCH / ACC_K;
    size_t P = model_num_params(c);
    a->loss_sum = 0.0;
    a->correct = 0;
    for (int j = 0; j < ACC_K; j++) {
        int r0 = j * mb, rows = MLM_MIN(mb, a->B - r0), correct = 0;
        if (rows <= 0) continue;
        DropoutCtx d = {.rng = a->rng, .layout = a->s->layout, .step = (uint64_t)a->step, .p = c->dropout,
                        .first_row = r0, .rows = rows};
        if (t) t->forward = j;
        float loss = cpu_model_forward(a->cm, a->inputs + (size_t)r0 * T, a->labels + (size_t)r0 * T, rows,
                                       a->s->mask.pad_id, &d, &correct);
        cpu_model_backward(a->cm);
        memcpy(a->logits + (size_t)r0 * T * V, a->cm->logits, (size_t)rows * T * V * sizeof(float));
        a->loss_sum += (double)loss * a->cm->n_targets;
        a->correct += correct;
        for (size_t i = 0; i < P; i++) grads[i] = j == 0 ? a->cm->grads[i] : grads[i] + a->cm->grads[i];
    }
}

// The CPU backend's accumulation as train.c's train_step_accumulated runs it (one process), each step's ReLU ties
// taken the way g_gpu[ACC_STEPS, P] (the device's summed gradients) shows.
static void accum_run_cpu(const Setup *s, const float *init, const float *g_gpu, AccumRun *out) {
    const ModelConfig *c = &s->cfg;
    int T = c->max_seq, V = c->vocab, mb = ACC_BATCH / ACC_K;
    size_t P = model_num_params(c), BT = (size_t)ACC_BATCH * T;
    accum_run_alloc(s, out);
    CpuModel *cm = cpu_model_create(c, mb);
    ReluTies relu;
    relu_ties_attach(&relu, cm);
    memcpy(cm->params, init, P * sizeof(float));
    memset(out->adam_m, 0, P * sizeof(float));
    memset(out->adam_v, 0, P * sizeof(float));
    int *tokens = mlm_malloc(BT * sizeof(int), "tokens");
    Rng rng;
    rng_init(&rng, s->seed, RNG_DOMAIN_TRAIN);
    lcg_state = 5150;
    for (int step = 0; step < ACC_STEPS; step++) {
        int B = acc_batch[step];
        random_tokens(tokens, (size_t)B * T, s->mask.n_chars);
        int *in = out->inputs + step * BT, *lab = out->labels + step * BT;
        float *lg = out->logits + step * BT * V, *grads = out->grads + step * P;
        int n_total = host_mask_whole_batch(s, &rng, tokens, B, (uint64_t)step, in, lab);
        cm->norm_targets = n_total;
        AccumPass pass = {s, cm, &rng, B, step, in, lab, lg, 0.0, 0};
        char what[32];
        snprintf(what, sizeof(what), "accum step %d", step + 1);
        relu_ties_resolve(&relu, accum_pass_run, &pass, g_gpu + (size_t)step * P, grads, what);
        double loss_sum = pass.loss_sum;
        int correct_sum = pass.correct;
        cm->norm_targets = 0;
        float *clipped = mlm_malloc(P * sizeof(float), "clipped");
        memcpy(clipped, grads, P * sizeof(float));
        out->norm[step] = cpu_clip_grads(clipped, P, s->max_norm);
        cpu_adam_update(&s->oc, cm->params, clipped, out->adam_m, out->adam_v, NULL, P, step + 1,
                        optim_lr(&s->oc, step + 1));
        free(clipped);
        out->loss[step] = n_total ? (float)(loss_sum / n_total) : 0.0f;
        out->correct[step] = correct_sum;
        out->targets[step] = n_total;
    }
    memcpy(out->params, cm->params, P * sizeof(float));
    relu_ties_print(&relu, "GPU");
    rng_free(&rng);
    free(tokens);
    cpu_model_free(cm);
    relu_ties_free(&relu);
}

// a against the reference b: masks identical, losses, norms and targets, correct within near ties, every step's
// gradients within 1e-4 (track_grad_noise), then the parameters (compare_params_after_steps).
static void accum_compare(const Setup *s, const AccumRun *a, const AccumRun *b, const char *what) {
    int T = s->cfg.max_seq, V = s->cfg.vocab, n_tab;
    size_t P = model_num_params(&s->cfg), BT = (size_t)ACC_BATCH * T;
    ParamEntry *tab = param_table(&s->cfg, &n_tab);
    double *unc = mlm_calloc(P, sizeof(double), "gradient uncertainty"), lr_sum = 0.0, worst = 0.0, worst_g = 0.0;
    for (int k = 0; k < ACC_STEPS; k++) {
        size_t n = (size_t)acc_batch[k] * T, diff = 0;
        const int *ia = a->inputs + k * BT, *la = a->labels + k * BT, *ib = b->inputs + k * BT, *lb = b->labels + k * BT;
        for (size_t i = 0; i < n; i++) diff += ia[i] != ib[i] || la[i] != lb[i];
        CHECK(diff == 0, "%s step %d: masked inputs/labels differ at %zu of %zu positions", what, k + 1, diff, n);
        const float *lga = a->logits + k * BT * V, *lgb = b->logits + k * BT * V;
        double tie_eps = 0.0;  // over the targets' rows (a sparse head leaves the others NaN)
        for (size_t i = 0; i < n; i++)
            if (lb[i] != s->mask.pad_id) tie_eps = fmax(tie_eps, 2.0 * max_abs_err(lga + i * V, lgb + i * V, V, NULL));
        int ties = near_ties(lgb, lb, n, V, s->mask.pad_id, tie_eps);
        double rl = rel_err_f(&a->loss[k], &b->loss[k], 1, NULL), rn = rel_err_f(&a->norm[k], &b->norm[k], 1, NULL);
        printf("  %s step %d (B %d): masks equal, loss %.7f vs %.7f (rel %.2e), norm %.7f vs %.7f (rel %.2e), correct "
               "%d/%d (%d near ties), targets %d/%d\n", what, k + 1, acc_batch[k], a->loss[k], b->loss[k], rl,
               a->norm[k], b->norm[k], rn, a->correct[k], b->correct[k], ties, a->targets[k], b->targets[k]);
        CHECK(rl <= REL_TOL && rn <= REL_TOL, "%s step %d: loss rel %.3e, norm rel %.3e > %.1e", what, k + 1, rl, rn,
              REL_TOL);
        CHECK(a->targets[k] == b->targets[k], "%s step %d: targets %d vs %d", what, k + 1, a->targets[k], b->targets[k]);
        CHECK(abs(a->correct[k] - b->correct[k]) <= ties, "%s step %d: correct %d vs %d, only %d near ties", what,
              k + 1, a->correct[k], b->correct[k], ties);
        const float *gb = b->grads + (size_t)k * P;
        worst_g = fmax(worst_g, track_grad_noise(tab, n_tab, a->grads + (size_t)k * P, gb,
                                                 GRAD_TOL_VS_CPU * max_abs_f(gb, P), unc, k + 1));
        lr_sum += optim_lr(&s->oc, k + 1);
        worst = fmax(worst, fmax(rl, rn));
    }
    double wp = compare_params_after_steps(tab, n_tab, a->params, b->params, unc, 2.0 * 1.005 * lr_sum);
    printf("  %s: losses and norms within %.2e, summed gradients %.2e, parameters %.2e (off the floor)\n", what,
           worst, worst_g, wp);
    free(unc), free(tab);
}

// A data-parallel rank's share (train.c's NCCL step): rows [4, 8) of a host-masked batch of 8 through
// cuda_model_forward with labels and CudaRandom.first_row = 4, against the CPU forward with DropoutCtx.first_row:
// loss and logits within 1e-5 (the rows' own dropout), and not the dropout of rows 0..3.
static void test_rank_rows_dropout(const Setup *s, const float *init) {
    const ModelConfig *c = &s->cfg;
    int T = c->max_seq, V = c->vocab, B = ACC_BATCH, r0 = 4, rows = 4;
    size_t n = (size_t)B * T, nr = (size_t)rows * T;
    CudaModel *gm = cuda_model_create(c, rows, 0);
    CpuModel *cm = cpu_model_create(c, rows);
    cuda_model_set_params(gm, init);
    memcpy(cm->params, init, model_num_params(c) * sizeof(float));
    int *tokens = mlm_malloc(n * sizeof(int), "tokens"), *inputs = mlm_malloc(n * sizeof(int), "inputs");
    int *labels = mlm_malloc(n * sizeof(int), "labels");
    float *logits = mlm_malloc(nr * V * sizeof(float), "logits");
    Rng rng;
    rng_init(&rng, s->seed, RNG_DOMAIN_TRAIN);
    lcg_state = 99;
    random_tokens(tokens, n, s->mask.n_chars);
    host_mask_whole_batch(s, &rng, tokens, B, 3, inputs, labels);
    DropoutCtx d = {.rng = &rng, .layout = s->layout, .step = 3, .p = c->dropout, .first_row = r0, .rows = rows};
    int correct;
    float loss_c = cpu_model_forward(cm, inputs + (size_t)r0 * T, labels + (size_t)r0 * T, rows, s->mask.pad_id, &d,
                                     &correct);
    CudaRandom rnd = {.philox_seed = rng.seed, .layout = s->layout, .step = 3, .dropout_p = c->dropout,
                      .first_row = r0, .batch_rows = B};
    CudaStepStats st;
    cuda_model_forward(gm, inputs + (size_t)r0 * T, labels + (size_t)r0 * T, rows, s->mask.pad_id, NULL, &rnd, &st);
    cuda_model_get_logits(gm, logits, rows);
    double rl = rel_err_f(&st.loss, &loss_c, 1, NULL), rg = rel_err_f(logits, cm->logits, nr * V, NULL);
    // The same rows with the dropout of rows 0..3 (what ranks > 0 drew before): other numbers.
    rnd.first_row = 0;
    rnd.batch_rows = 0;
    cuda_model_forward(gm, inputs + (size_t)r0 * T, labels + (size_t)r0 * T, rows, s->mask.pad_id, NULL, &rnd, &st);
    cuda_model_get_logits(gm, logits, rows);
    double rw = rel_err_f(logits, cm->logits, nr * V, NULL);
    printf("  a rank's rows %d..%d of %d: loss rel %.2e, logits rel %.2e vs the CPU's (rows 0..%d's dropout: %.2e)\n",
           r0, r0 + rows - 1, B, rl, rg, rows - 1, rw);
    CHECK(rl <= REL_TOL && rg <= REL_TOL, "a rank's rows: loss rel %.3e, logits rel %.3e > %.1e", rl, rg, REL_TOL);
    CHECK(rw > 100 * REL_TOL, "the rows' own dropout and that of rows 0..%d give the same logits", rows - 1);
    rng_free(&rng);
    free(tokens), free(inputs), free(labels), free(logits);
    cuda_model_free(gm);
    cpu_model_free(cm);
}

static void test_accumulation(void) {
    Setup s = small_setup();
    size_t P = model_num_params(&s.cfg);
    printf("part 6: gradient accumulation, %d micro-batches of %d, %d steps (batches 8, 5, 8), dropout %.2f\n", ACC_K,
           ACC_BATCH / ACC_K, ACC_STEPS, s.cfg.dropout);
    float *init = mlm_malloc(P * sizeof(float), "init");
    init_params(&s.cfg, init, s.seed + 6);
    AccumRun on, off, plain, cpu;
#ifdef MLM_CUDA_EMULATION
    EmuCounters before, after;
    emu_counters_get(&before);
#endif
    accum_run_gpu(&s, init, ACC_K, 1, 0, &on);
#ifdef MLM_CUDA_EMULATION
    emu_counters_get(&after);
    // One graph launch per micro-batch, 2 + 2 + 2 (the batch of 5 is micro-batches of 4 and 1), but the first of
    // each of the two shapes (4 rows, 1 row), which runs as plain launches before any capture.
    CHECK(after.graph_launches - before.graph_launches == 2 * ACC_STEPS - 2,
          "graph launches with accumulation: %llu, expected one per micro-batch but the first of each shape (%d)",
          (unsigned long long)(after.graph_launches - before.graph_launches), 2 * ACC_STEPS - 2);
    CHECK(after.cold_captures == before.cold_captures, "accumulation: %llu first uses inside a capture",
          (unsigned long long)(after.cold_captures - before.cold_captures));
#endif
    accum_run_gpu(&s, init, ACC_K, 0, 0, &off);
    int same = 1;
    for (int k = 0; k < ACC_STEPS; k++)
        same &= memcmp(&on.loss[k], &off.loss[k], sizeof(float)) == 0 &&
                memcmp(&on.norm[k], &off.norm[k], sizeof(float)) == 0 && on.correct[k] == off.correct[k];
    same &= memcmp(on.grads, off.grads, ACC_STEPS * P * sizeof(float)) == 0;
    same &= memcmp(on.params, off.params, P * sizeof(float)) == 0;
    same &= memcmp(on.adam_m, off.adam_m, P * sizeof(float)) == 0 && memcmp(on.adam_v, off.adam_v, P * sizeof(float)) == 0;
    printf("  graphs on vs off: %s\n", same ? "bit-identical (losses, norms, summed gradients, parameters, Adam)"
                                            : "DIFFER");
    CHECK(same, "accumulation with and without graphs differs");
    accum_run_cpu(&s, init, on.grads, &cpu);
    accum_compare(&s, &on, &cpu, "CUDA accum 2 vs CPU accum 2");
    accum_run_gpu(&s, init, 1, 1, 0, &plain);
    accum_compare(&s, &on, &plain, "CUDA accum 2 vs CUDA batch");
    // Sparse prediction (its micro-batches run as plain launches; the host's row counts from the mapped uniforms).
    AccumRun sparse;
    accum_run_gpu(&s, init, ACC_K, 1, 1, &sparse);
    accum_compare(&s, &sparse, &on, "CUDA accum 2 sparse vs dense");
    accum_run_free(&on), accum_run_free(&off), accum_run_free(&plain), accum_run_free(&cpu), accum_run_free(&sparse);
    test_rank_rows_dropout(&s, init);
    free(init);
}

// 8. Device memory linear in T: the attention stores nothing of size T x T (attention.cu), so the memory a model
// takes (cudaMemGetInfo before and after cuda_model_create) grows as much from T 256 to 512 as twice from 128 to
// 256: ratio 2, within the 2 MiB granularity of a real device's allocations (7 MiB a step here); a [B, H, T, T]
// tensor back in the layout would make it about 4 (at this shape it would dominate: H T = 8192 floats a row
// against about 25 C + F = 864).
static void test_memory_linear_in_T(void) {
    printf("part 8: device memory of a model linear in T (no T x T storage)\n");
    size_t used[3];
    for (int k = 0; k < 3; k++) {
        ModelConfig c = {.vocab = 67, .d_model = 32, .n_heads = 16, .n_layers = 2, .d_ff = 64, .max_seq = 128 << k,
                         .dropout = 0.1f, .ln_eps = 1e-5f};
        size_t free0, free1, total;
        CUDA_CHECK(cudaMemGetInfo(&free0, &total));
        CudaModel *m = cuda_model_create(&c, 16, 0);
        CUDA_CHECK(cudaMemGetInfo(&free1, &total));
        used[k] = free0 - free1;
        cuda_model_free(m);
    }
    double ratio = (double)(used[2] - used[1]) / (double)(used[1] - used[0]);
    printf("  device bytes at T 128, 256, 512: %zu, %zu, %zu (growth ratio %.3f)\n", used[0], used[1], used[2], ratio);
    CHECK(used[0] < used[1] && used[1] < used[2] && ratio < 2.5,
          "device memory grows %.3f x from T 256 to 512 against 128 to 256: a T x T term", ratio);
}

// ---------------------------------------------------------------------------------------------------------
// 7. More than 2^31 logits (issue 21, item 4): no cuBLAS call gets an operand of more than 2^31 - 1 elements, a
// product over N rows running as blocks of rows (cuda_model.cu, "cuBLAS products", says why and why these checks
// cover the real case).
//  (a) The split path at a small shape: the limit lowered so that every product of the small model splits (the
//      classifier into blocks of 100, 100 and 64 rows; the sparse head's into blocks of 16), one forward and
//      backward with dropout, dense and sparse, against the same model unsplit. The forward and the backward's
//      dinp products compute each row from that row alone, so on tests/emu (one kernel for any shape) the logits,
//      loss, accuracy and every gradient that is not a weight's product are bit for bit the unsplit ones. A weight
//      gradient dw = dout^T inp sums over the rows, and the blocks add into it in order: the split re-associates
//      the sum, adding at most (blocks + 1) roundings of u = 2^-24 times the sum of |terms| to it, less than the
//      N u of one float product of N terms, which part 2 accepts between two correct backends: part 2's bound
//      (1e-4 of the tensor's largest gradient) applies. On a GPU cuBLAS may pick other kernels for the smaller
//      shapes (split-k among them), so there every tensor is held to part 2's bounds only. On tests/emu the
//      number of cuBLAS calls must also be the one cuda_model_linear_gemms plans, which ties (b) to this path.
//  (b) The plan at real shapes without a device: bert-base's classifier (C 768, V 30,522) at T 512 for B from 137
//      (the last batch below 2^31 logits: one call each) to 224, and 300 and 512 (offsets past 2^31), and a
//      vocabulary of 250,002 at B 64: every call's arguments as passed equal the exact values, every operand spans at most 2^31 - 1 elements, the blocks tile the rows in order, and each
//      offset equals the exact product (computed here in 128 bits) although the last ones pass 2^31.

typedef struct {
    float *logits, *grads;
    CudaStepStats st;
    unsigned long long cublas_calls;
} SplitRun;

enum { SPLIT_B = 8 };

static void split_run(const Setup *s, const float *init, const int *inputs, const int *labels, size_t limit,
                      int sparse, SplitRun *out) {
    const ModelConfig *c = &s->cfg;
    size_t P = model_num_params(c), BTV = (size_t)SPLIT_B * c->max_seq * c->vocab;
    CudaModel *gm = cuda_model_create(c, SPLIT_B, 0);
    cuda_model_set_params(gm, init);
    cuda_model_set_gemm_limit(gm, limit);
    cuda_model_set_sparse_prediction(gm, sparse);
    Rng train;
    rng_init(&train, s->seed, RNG_DOMAIN_TRAIN);
    CudaRandom rnd = {.philox_seed = train.seed, .layout = s->layout, .step = 3, .dropout_p = c->dropout};
#ifdef MLM_CUDA_EMULATION
    EmuCounters before, after;
    emu_counters_get(&before);
#endif
    cuda_model_forward(gm, inputs, labels, SPLIT_B, s->mask.pad_id, NULL, &rnd, &out->st);
    cuda_model_backward(gm);
    out->logits = mlm_malloc(BTV * sizeof(float), "logits");
    out->grads = mlm_malloc(P * sizeof(float), "grads");
    cuda_model_get_logits(gm, out->logits, SPLIT_B);
    cuda_model_get_grads(gm, out->grads);
    out->cublas_calls = 0;
#ifdef MLM_CUDA_EMULATION
    emu_counters_get(&after);
    out->cublas_calls = (unsigned long long)(after.cublas_calls - before.cublas_calls);
#endif
    rng_free(&train);
    cuda_model_free(gm);
}

#ifdef MLM_CUDA_EMULATION
// The cuBLAS calls of one forward and backward of the small model under a limit, from the plan: four linear
// layers per layer (qkv, output, FFN 1 and 2; the attention itself is the tiled kernels, no cuBLAS call) and the
// classifier over `head_rows` rows.
static unsigned long long planned_calls(const ModelConfig *c, int N, int head_rows, size_t limit) {
    int C = c->d_model, F = c->d_ff;
    unsigned long long per_layer = (unsigned long long)cuda_model_linear_gemms(N, C, 3 * C, limit, NULL, 0) +
                                   (unsigned long long)cuda_model_linear_gemms(N, C, C, limit, NULL, 0) +
                                   (unsigned long long)cuda_model_linear_gemms(N, C, F, limit, NULL, 0) +
                                   (unsigned long long)cuda_model_linear_gemms(N, F, C, limit, NULL, 0);
    unsigned long long head = head_rows > 0 ? (unsigned long long)cuda_model_linear_gemms(head_rows, C, c->vocab, limit,
                                                                                         NULL, 0) : 0;
    return per_layer * (unsigned long long)c->n_layers + head;
}
#endif

static void split_compare(const Setup *s, const SplitRun *a, const SplitRun *b, int sparse, const char *what) {
    const ModelConfig *c = &s->cfg;
    size_t N = (size_t)SPLIT_B * c->max_seq, V = (size_t)c->vocab;
    int n_tab;
    ParamEntry *tab = param_table(c, &n_tab);
#ifdef MLM_CUDA_EMULATION
    const int exact = 1;
#else
    const int exact = 0;
#endif
    CHECK(memcmp(&a->st.loss, &b->st.loss, sizeof(float)) == 0 || (!exact && rel_err_f(&a->st.loss, &b->st.loss, 1,
          NULL) <= REL_TOL), "%s: loss %.9g vs %.9g unsplit", what, a->st.loss, b->st.loss);
    CHECK(a->st.n_targets == b->st.n_targets && (a->st.correct == b->st.correct || !exact),
          "%s: %d of %d correct vs %d of %d unsplit", what, a->st.correct, a->st.n_targets, b->st.correct,
          b->st.n_targets);
    // Logits: the dense head's every row; the sparse head's selected rows (the rest are NaN on both).
    size_t differ = 0, rows = 0;
    double worst = 0.0;
    for (size_t r = 0; r < N; r++) {
        const float *x = a->logits + r * V, *y = b->logits + r * V;
        if (sparse && isnan(y[0])) continue;
        rows++;
        differ += memcmp(x, y, V * sizeof(float)) != 0;
        worst = fmax(worst, rel_err_f(x, y, V, NULL));
    }
    printf("  %s: loss %.7f, %zu rows of logits, %zu differ from the unsplit (max relative %.2e)\n", what, a->st.loss,
           rows, differ, worst);
    CHECK(rows > 0 && (exact ? differ == 0 : worst <= REL_TOL), "%s: %zu of %zu logit rows differ (max relative "
          "%.3e)", what, differ, rows, worst);
    int bitwise = 0, within = 0;
    double worst_grad = 0.0;
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e), o = e->offset;
        if (exact && !e->is_matrix) {
            int same = memcmp(a->grads + o, b->grads + o, n * sizeof(float)) == 0;
            CHECK(same, "%s: gradient of %s differs from the unsplit (it sums no product over rows)", what, e->name);
            bitwise += same;
            continue;
        }
        double scale = max_abs_f(b->grads + o, n), noise = max_abs_err(a->grads + o, b->grads + o, n, NULL);
        double r = scale > 0 ? noise / scale : noise;
        CHECK(r <= GRAD_TOL_VS_CPU, "%s: gradient of %s differs from the unsplit by %.3e of its largest > %.1e", what,
              e->name, r, GRAD_TOL_VS_CPU);
        within += r <= GRAD_TOL_VS_CPU;
        worst_grad = fmax(worst_grad, r);
    }
    printf("  %s: %d gradients bit for bit, %d within %.0e of their largest (worst %.2e)\n", what, bitwise, within,
           GRAD_TOL_VS_CPU, worst_grad);
    free(tab);
}

// The plan at one real shape (b). Returns the number of calls.
static int check_split_plan(int N, int C, int V) {
    enum { MAX_CALLS = 64 };
    CudaGemmCall calls[MAX_CALLS];
    int n = cuda_model_linear_gemms(N, C, V, 0, calls, MAX_CALLS);  // 0: the default limit, INT_MAX
    CHECK(n > 0 && n <= MAX_CALLS && n % 3 == 0, "N %d: %d calls planned", N, n);
    if (n <= 0 || n > MAX_CALLS || n % 3) return n;
    int blocks = n / 3;
    typedef unsigned __int128 u128;
    const u128 limit = 0x7fffffff;
    // Forward, dinp and dw, each over the same row blocks: rows [r0, r0 + rows) in order, covering [0, N).
    for (int part = 0; part < 3; part++) {
        u128 r0 = 0;
        for (int b = 0; b < blocks; b++) {
            const CudaGemmCall *g = &calls[part * blocks + b];
            int rows = part == 2 ? g->k : g->n;
            // The exact operands of this block (128 bits): [stored rows, stored columns, leading dimension].
            u128 a_rows = g->transa ? (u128)g->k : (u128)g->m, a_cols = g->transa ? (u128)g->m : (u128)g->k;
            u128 b_rows = g->transb ? (u128)g->n : (u128)g->k, b_cols = g->transb ? (u128)g->k : (u128)g->n;
            u128 a_span = (a_cols - 1) * (u128)g->lda + a_rows, b_span = (b_cols - 1) * (u128)g->ldb + b_rows;
            u128 c_span = ((u128)g->n - 1) * (u128)g->ldc + (u128)g->m;
            // What the call must be (row-major views, column-major calls): part 0 out[N, V] = inp[N, C] w^T;
            // part 1 dinp[N, C] = dout[N, V] w; part 2 dw[V, C] += dout[N, V]^T inp[N, C].
            u128 want_a = part == 2 ? r0 * (u128)C : 0, want_b = part == 0 ? r0 * (u128)C : r0 * (u128)V;
            u128 want_c = part == 0 ? r0 * (u128)V : part == 1 ? r0 * (u128)C : 0;
            int args_ok = part == 0 ? (g->transa && !g->transb && g->m == V && g->k == C && g->lda == C &&
                                       g->ldb == C && g->ldc == V && g->beta == 0.0f)
                        : part == 1 ? (!g->transa && !g->transb && g->m == C && g->k == V && g->lda == C &&
                                       g->ldb == V && g->ldc == C && g->beta == 0.0f)
                                    : (!g->transa && g->transb && g->m == C && g->n == V && g->lda == C &&
                                       g->ldb == V && g->ldc == C && g->beta == (b == 0 ? 0.0f : 1.0f));
            CHECK(args_ok && rows > 0, "N %d part %d block %d: m %d n %d k %d lda %d ldb %d ldc %d beta %g", N, part, b,
                  g->m, g->n, g->k, g->lda, g->ldb, g->ldc, g->beta);
            CHECK(a_span <= limit && b_span <= limit && c_span <= limit,
                  "N %d part %d block %d: an operand spans more than 2^31 - 1 elements (%.0f, %.0f, %.0f)", N, part, b,
                  (double)a_span, (double)b_span, (double)c_span);
            CHECK((u128)g->a_offset == want_a && (u128)g->b_offset == want_b && (u128)g->c_offset == want_c,
                  "N %d part %d block %d (row %.0f): offsets %zu %zu %zu, exact %.0f %.0f %.0f", N, part, b, (double)r0,
                  g->a_offset, g->b_offset, g->c_offset, (double)want_a, (double)want_b, (double)want_c);
            r0 += (u128)rows;
        }
        CHECK(r0 == (u128)N, "N %d part %d: the blocks cover %.0f rows", N, part, (double)r0);
    }
    return n;
}

static void test_split_gemms(void) {
    Setup s = small_setup();
    const ModelConfig *c = &s.cfg;
    size_t P = model_num_params(c), N = (size_t)SPLIT_B * c->max_seq;
    int V = c->vocab;
    printf("part 7: products split by rows (more than 2^31 logits), B %d x T %d, V %d\n", SPLIT_B, c->max_seq, V);
    float *init = mlm_malloc(P * sizeof(float), "init");
    init_params(c, init, s.seed + 7);
    int *tokens = mlm_malloc(N * sizeof(int), "tokens"), *inputs = mlm_malloc(N * sizeof(int), "inputs");
    int *labels = mlm_malloc(N * sizeof(int), "labels");
    float *u = mlm_malloc(4 * N * sizeof(float), "uniforms");
    lcg_state = 777;
    random_tokens(tokens, N, s.mask.n_chars);
    Rng rng;
    rng_init(&rng, s.seed, RNG_DOMAIN_TRAIN);
    rng_uniform(&rng, rng_mask_offset(&s.layout, 3), u, 4 * N);
    mask_apply(&s.mask, tokens, N, u, inputs, labels);
    int targets = 0;
    for (size_t i = 0; i < N; i++) targets += labels[i] != s.mask.pad_id;
    const size_t dense_limit = (size_t)100 * V, sparse_limit = (size_t)16 * V;  // classifier blocks of 100 / 16 rows
    SplitRun whole, split, swhole, ssplit;
    split_run(&s, init, inputs, labels, 0, 0, &whole);
    split_run(&s, init, inputs, labels, dense_limit, 0, &split);
    split_compare(&s, &split, &whole, 0, "dense, blocks of 100 logit rows");
    split_run(&s, init, inputs, labels, 0, 1, &swhole);
    split_run(&s, init, inputs, labels, sparse_limit, 1, &ssplit);
    split_compare(&s, &ssplit, &swhole, 1, "sparse, blocks of 16 logit rows");
#ifdef MLM_CUDA_EMULATION
    unsigned long long want[4] = {planned_calls(c, (int)N, (int)N, 0), planned_calls(c, (int)N, (int)N, dense_limit),
                                  planned_calls(c, (int)N, targets, 0), planned_calls(c, (int)N, targets, sparse_limit)};
    unsigned long long got[4] = {whole.cublas_calls, split.cublas_calls, swhole.cublas_calls, ssplit.cublas_calls};
    printf("  cuBLAS calls (dense whole, dense split, sparse whole, sparse split): %llu %llu %llu %llu, planned %llu "
           "%llu %llu %llu\n", got[0], got[1], got[2], got[3], want[0], want[1], want[2], want[3]);
    for (int i = 0; i < 4; i++) CHECK(got[i] == want[i], "run %d made %llu cuBLAS calls, the plan %llu", i, got[i], want[i]);
    CHECK(got[1] > got[0] && got[3] > got[2], "the lowered limit did not split the products");
#endif
    // (b) bert-base's classifier at T 512: every B the issue names, and B 300 and 512 (three and four blocks, so
    // that offsets pass 2^31 too); and a vocabulary of 250,002 (XLM-R's) at B 64.
    const int T = 512, C = 768;
    for (int B = 137; B <= 512; B += B < 224 ? 1 : B < 300 ? 76 : 212) {
        for (int big_vocab = 0; big_vocab < 2; big_vocab++) {
            if (big_vocab && B != 137) continue;
            int BV = big_vocab ? 250002 : 30522, rows = big_vocab ? 64 * T : B * T;
            long long elems = (long long)rows * BV;
            int calls = check_split_plan(rows, C, BV);
            if (B == 137 || B == 138 || B >= 224)
                printf("  plan at %d rows (T %d), V %d (%lld logits, %s 2^31): %d calls\n", rows, T, BV, elems,
                       elems > 0x7fffffffLL ? "above" : "below", calls);
            CHECK((elems > 0x7fffffffLL) == (calls > 3), "%d rows, V %d: %d calls for %lld logits", rows, BV, calls,
                  elems);
        }
    }
    rng_free(&rng);
    free(init), free(tokens), free(inputs), free(labels), free(u);
    free(whole.logits), free(whole.grads), free(split.logits), free(split.grads);
    free(swhole.logits), free(swhole.grads), free(ssplit.logits), free(ssplit.grads);
}

// The CPU matmul the comparisons run against, with OpenBLAS's kernel family (which OPENBLAS_CORETYPE forces;
// tools/relu_tie_matrix.sh checks it): each rounds the CPU's pre-activations its own way.
static void print_cpu_matmul(void) {
    char *(*corename)(void);
    *(void **)&corename = dlsym(RTLD_DEFAULT, "openblas_get_corename");
    printf("CPU matmul: %s", matmul_backend_name());
    if (corename) printf(" (OpenBLAS core %s)", corename());
    printf("\n");
}

int main(int argc, char **argv) {
    char why[256];
    if (cuda_device_count(why, sizeof(why)) == 0) return test_skip(why);
    if (argc > 1 && !strcmp(argv[1], "--quick")) run_steps = 8;
    char desc[256];
    cuda_device_describe(desc, sizeof(desc));
    printf("device: %s\n", desc);
    print_cpu_matmul();
    test_fixture();
    test_vs_cpu();
    test_vs_cpu_attention_tiles();
    test_determinism();
    test_roundtrip();
    test_graphs();
    test_accumulation();
    test_split_gemms();
    test_memory_linear_in_T();
    return test_finish("test_gpu_model");
}
