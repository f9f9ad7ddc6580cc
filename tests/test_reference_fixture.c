// test_reference_fixture.c: mlm's CPU forward, backward, clipping and Noam-Adam against the PyTorch fixture.
//
// The fixture (tests/fixtures/reference_small.safetensors, written by tools/reference/make_fixture.py) holds
// a small model's initial weights under PyTorch state_dict names, one masked batch, PyTorch's logits, loss
// and gradients, and the parameters after three clipped Noam-Adam steps on that batch.
//
// Error measure, per tensor: rel = max_i |a_i - b_i| / max_i |b_i| (a = mlm, b = PyTorch). Normalising
// by the tensor's largest magnitude rather than elementwise keeps tiny entries (which carry the float32
// rounding of large sums) from dominating. Requirement: rel <= 1e-5 except where stated below.
//
// Three parts:
//  1. forward/backward: logits, loss and every gradient from mlm's own forward and backward.
//  2. optimizer on the reference gradients: clip + Noam-Adam fed PyTorch's gradients of steps 1-3, compared
//     with PyTorch's parameters after step 3, and the update (step3 - initial) likewise, so a no-op or
//     wrong-sign optimizer fails.
//  3. end to end: three steps of mlm's own forward/backward/clip/Adam. Losses and gradient norms must meet
//     1e-5; the parameters get a looser bound because Adam's m / (sqrt(v) + eps) turns float32 rounding in
//     small gradients into visible update differences (PyTorch's own float32 run differs from its float64
//     run by up to ~2e-3 here), which is why part 2 exists.
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/safetensors.h"
#include "fixture_util.h"
#include "test_util.h"

#define REL_TOL 1e-5
// Part 3 parameters: see the header comment. Measured: mlm vs PyTorch float32 up to 2e-4 (5e-4 on updates),
// 2e-3 on the key biases, whose updates are pure rounding noise; PyTorch's own float32 run differs as much
// from its float64 run, and mlm is closer to the float64 run (4e-5) than PyTorch float32 is.
#define E2E_PARAM_TOL 1e-2

static StFile fx;
static const char *fx_path;

// Compare updated parameters per tensor: the values and the update (value - initial) with the measure
// above. The update check allows 2 float32 ulps of the tensor's largest parameter on top of
// REL_TOL * max|update| because a stored parameter, and hence its update, is only known to that precision.
static void compare_params(const char *part, const ParamEntry *tab, int n_tab, const float *got,
                           const double *ref, const double *init, double tol, int skip_key_bias_update,
                           double *worst_param, double *worst_update) {
    float *upd = mlm_malloc(sizeof(float), "update");
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e), o = e->offset;
        double r = fixture_rel_err(got + o, ref + o, n);
        double *dref = mlm_malloc(n * sizeof(double), "update");
        free(upd);
        upd = mlm_malloc(n * sizeof(float), "update");
        for (size_t i = 0; i < n; i++) {
            dref[i] = ref[o + i] - init[o + i];
            upd[i] = (float)((double)got[o + i] - init[o + i]);
        }
        double ru = fixture_rel_err(upd, dref, n), maxu = fixture_max_abs(dref, n), maxp = fixture_max_abs(ref + o, n);
        double ulp_allow = maxu > 0 ? 2.0 * FLT_EPSILON * maxp / maxu : INFINITY;
        int exempt = skip_key_bias_update && fixture_is_key_bias(e->name);
        printf("  %s %-48s param %.2e  update %.2e (max|update| %.2e%s)\n", part, e->name, r, ru, maxu,
               exempt ? ", float32 noise: not checked" : "");
        CHECK(r <= tol, "%s %s: parameter relative error %.3e > %.1e", part, e->name, r, tol);
        CHECK(maxu > 0.0, "%s %s: the reference parameters did not move", part, e->name);
        if (!exempt)
            CHECK(ru <= tol + ulp_allow, "%s %s: update relative error %.3e > %.1e (+%.1e ulp allowance)", part,
                  e->name, ru, tol, ulp_allow);
        if (r > *worst_param) *worst_param = r;
        if (!exempt && ru > *worst_update) *worst_update = ru;
        free(dref);
    }
    free(upd);
}

int main(int argc, char **argv) {
    char path_buf[1024];
    if (argc > 1) {
        fx_path = argv[1];
    } else {
        const char *src = getenv("MLM_SOURCE_DIR");
        snprintf(path_buf, sizeof(path_buf), "%s/tests/fixtures/reference_small.safetensors", src ? src : ".");
        fx_path = path_buf;
    }
    char err[512];
    if (st_read(fx_path, &fx, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    char *dtype = st_meta_get(&fx, "dtype");
    printf("fixture %s (%s, written by %s)\n", fx_path, dtype ? dtype : "float32", "tools/reference/make_fixture.py");
    free(dtype);

    FixtureConfig fc;
    if (fixture_config(&fx, &fc, err, sizeof(err))) {
        fprintf(stderr, "%s: %s\n", fx_path, err);
        return 1;
    }
    ModelConfig cfg = fc.cfg;
    OptimConfig oc = fc.oc;
    int B = fc.B, T = cfg.max_seq, V = cfg.vocab, pad = fc.pad, steps = fc.steps;
    float max_norm = fc.max_norm;
    printf("config: vocab %d, d_model %d, heads %d, layers %d, d_ff %d, seq %d, batch %d, warmup %d\n", V,
           cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, T, B, oc.warmup);

    int n_tab = model_param_table(&cfg, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n_tab * sizeof(ParamEntry), "parameter table");
    model_param_table(&cfg, tab);
    size_t P = model_num_params(&cfg);
    double *init = fixture_gather(&fx, fx_path, tab, n_tab, P, "");
    double *ref_grad[3] = {fixture_gather(&fx, fx_path, tab, n_tab, P, "grad."), fixture_gather(&fx, fx_path, tab, n_tab, P, "grad2."), fixture_gather(&fx, fx_path, tab, n_tab, P, "grad3.")};
    double *ref_step3 = fixture_gather(&fx, fx_path, tab, n_tab, P, "step3.");
    double *ref_logits = fixture_floats(&fx, fx_path, "logits", (size_t)T * B * V);
    double *ref_loss = fixture_floats(&fx, fx_path, "loss", 1), *ref_losses = fixture_floats(&fx, fx_path, "losses", 3), *ref_norms = fixture_floats(&fx, fx_path, "grad_norms", 3);
    const StTensor *ids = st_find(&fx, "input_ids"), *lab = st_find(&fx, "labels");
    CHECK(ids && lab && ids->dtype == ST_I64 && lab->dtype == ST_I64 && fixture_numel(ids) == (size_t)T * B &&
              fixture_numel(lab) == (size_t)T * B, "input_ids / labels missing or not int64 [seq, batch]");
    if (t_failures || !ref_logits || !ref_loss || !ref_losses || !ref_norms) return test_finish("test_reference_fixture");

    // PyTorch is [seq, batch]; mlm is [batch, seq].
    int *inputs = mlm_malloc((size_t)B * T * sizeof(int), "inputs"), *labels = mlm_malloc((size_t)B * T * sizeof(int), "labels");
    int n_targets = 0;
    for (int t = 0; t < T; t++)
        for (int b = 0; b < B; b++) {
            inputs[b * T + t] = (int)((const int64_t *)ids->data)[t * B + b];
            labels[b * T + t] = (int)((const int64_t *)lab->data)[t * B + b];
            n_targets += labels[b * T + t] != pad;
        }

    CpuModel *m = cpu_model_create(&cfg, B);
    for (size_t i = 0; i < P; i++) m->params[i] = (float)init[i];
    double worst_grad = 0.0, worst_param = 0.0, worst_update = 0.0;

    // ---- Part 1: forward and backward.
    printf("part 1: forward and backward (rel = max|mlm - torch| / max|torch| per tensor)\n");
    float loss = cpu_model_forward(m, inputs, labels, B, pad, NULL, NULL);
    CHECK(m->n_targets == n_targets, "mlm counted %d targets, the labels have %d", m->n_targets, n_targets);
    float *logits_tb = mlm_malloc((size_t)T * B * V * sizeof(float), "logits");
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            memcpy(logits_tb + ((size_t)t * B + b) * V, m->logits + ((size_t)b * T + t) * V, (size_t)V * sizeof(float));
    double r = fixture_rel_err(logits_tb, ref_logits, (size_t)T * B * V);
    printf("  logits %-48s %.2e\n", "", r);
    CHECK(r <= REL_TOL, "logits: relative error %.3e > %.1e", r, REL_TOL);
    r = fixture_rel_err(&loss, ref_loss, 1);
    printf("  loss   %-48s %.2e  (mlm %.7f, torch %.7f)\n", "", r, loss, ref_loss[0]);
    CHECK(r <= REL_TOL, "loss: relative error %.3e > %.1e", r, REL_TOL);

    cpu_model_backward(m);
    double grad_scale = fixture_max_abs(ref_grad[0], P);
    for (int k = 0; k < n_tab; k++) {
        const ParamEntry *e = &tab[k];
        size_t n = fixture_entry_numel(e);
        r = fixture_rel_err(m->grads + e->offset, ref_grad[0] + e->offset, n);
        if (fixture_is_key_bias(e->name)) {
            // The key bias adds q . b_k to every score of a query row, which the softmax cancels: its gradient
            // is exactly zero in real arithmetic and both sides hold rounding noise. Compare against the
            // largest gradient element of the whole model instead.
            double a = 0.0;
            for (size_t i = 0; i < n; i++) a = fmax(a, fabs(m->grads[e->offset + i] - ref_grad[0][e->offset + i]));
            double rg = a / grad_scale;
            printf("  grad   %-48s %.2e of the largest gradient (zero in exact arithmetic; per-tensor %.1e)\n",
                   e->name, rg, r);
            CHECK(rg <= REL_TOL, "grad %s: error %.3e of the largest gradient > %.1e", e->name, rg, REL_TOL);
            if (rg > worst_grad) worst_grad = rg;
            continue;
        }
        printf("  grad   %-48s %.2e\n", e->name, r);
        CHECK(r <= REL_TOL, "grad %s: relative error %.3e > %.1e", e->name, r, REL_TOL);
        if (r > worst_grad) worst_grad = r;
    }

    // ---- Part 2: clipping and Noam-Adam on PyTorch's gradients.
    printf("part 2: clip + Noam-Adam on the reference gradients, %d steps\n", steps);
    float *params = mlm_malloc(P * sizeof(float), "params"), *g = mlm_malloc(P * sizeof(float), "grads");
    float *mom = mlm_calloc(P, sizeof(float), "m"), *vel = mlm_calloc(P, sizeof(float), "v");
    for (size_t i = 0; i < P; i++) params[i] = (float)init[i];
    for (int s = 0; s < steps; s++) {
        for (size_t i = 0; i < P; i++) g[i] = (float)ref_grad[s][i];
        float norm = cpu_clip_grads(g, P, max_norm);
        r = fixture_rel_err(&norm, &ref_norms[s], 1);
        double lr = optim_lr(&oc, s + 1);
        printf("  step %d: grad norm %.7f (torch %.7f, rel %.2e), lr %.6e\n", s + 1, norm, ref_norms[s], r, lr);
        CHECK(r <= REL_TOL, "step %d grad norm: relative error %.3e", s + 1, r);
        cpu_adam_update(&oc, params, g, mom, vel, NULL, P, s + 1, lr);
    }
    compare_params("opt", tab, n_tab, params, ref_step3, init, REL_TOL, 0, &worst_param, &worst_update);
    double opt_param = worst_param, opt_update = worst_update;

    // ---- Part 3: three full steps of mlm's own forward, backward, clip and Adam.
    printf("part 3: %d steps of mlm forward/backward/clip/Noam-Adam\n", steps);
    memset(mom, 0, P * sizeof(float));
    memset(vel, 0, P * sizeof(float));
    double worst_loss = 0.0, worst_norm = 0.0;
    for (int s = 0; s < steps; s++) {
        float l = cpu_model_forward(m, inputs, labels, B, pad, NULL, NULL);
        cpu_model_backward(m);
        float norm = cpu_clip_grads(m->grads, P, max_norm);
        double rl = fixture_rel_err(&l, &ref_losses[s], 1), rn = fixture_rel_err(&norm, &ref_norms[s], 1);
        printf("  step %d: loss %.7f (torch %.7f, rel %.2e), grad norm %.7f (torch %.7f, rel %.2e)\n", s + 1, l,
               ref_losses[s], rl, norm, ref_norms[s], rn);
        CHECK(rl <= REL_TOL, "step %d loss: relative error %.3e", s + 1, rl);
        CHECK(rn <= REL_TOL, "step %d grad norm: relative error %.3e", s + 1, rn);
        worst_loss = fmax(worst_loss, rl);
        worst_norm = fmax(worst_norm, rn);
        cpu_adam_update(&oc, m->params, m->grads, mom, vel, NULL, P, s + 1, optim_lr(&oc, s + 1));
    }
    worst_param = worst_update = 0.0;
    compare_params("e2e", tab, n_tab, m->params, ref_step3, init, E2E_PARAM_TOL, 1, &worst_param, &worst_update);

    printf("summary: logits/loss/grads worst %.2e; optimizer on reference grads: params %.2e, updates %.2e; "
           "end to end: losses %.2e, norms %.2e, params %.2e, updates %.2e (key bias excluded)\n",
           worst_grad, opt_param, opt_update, worst_loss, worst_norm, worst_param, worst_update);

    cpu_model_free(m);
    free(params), free(g), free(mom), free(vel), free(logits_tb), free(inputs), free(labels), free(tab);
    free(init), free(ref_step3), free(ref_logits), free(ref_loss), free(ref_losses), free(ref_norms);
    for (int s = 0; s < 3; s++) free(ref_grad[s]);
    st_free(&fx);
    return test_finish("test_reference_fixture");
}
