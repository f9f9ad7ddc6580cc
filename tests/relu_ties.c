// relu_ties.c: ReLU ties between two backends (tests): the record, pin and flip passes over the CPU model's
// feed-forward pre-activations (cpu_model_set_relu_hook), and the choice of each tie's side from the other
// backend's gradients.
#include "relu_ties.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fixture_util.h"
#include "keep_bits.h"
#include "mlm/common.h"

// The rounding bound of a pre-activation z = sum_c x_c w_c + b (C terms and the bias), in units of u S, with
// u = 2^-24 (float's unit roundoff) and S = sum_c |x_c w_c| + |b|. z and S are computed in double from the CPU's
// float inputs (their own error, ~1e-16 S, is nothing here). The two backends can decide a unit differently only
// where their float pre-activations lie on opposite sides of zero, so only where |z| is at most the larger of their
// distances from z:
//   - the CPU's rounding of its dot product plus bias: at most gamma_{C+1} S ~ (C + 1) u S, whatever the order of
//     summation and with or without FMA (Higham, Accuracy and Stability of Numerical Algorithms, 3.1): OpenBLAS's
//     kernels and the built-in matmul differ in order only. The GPU's: the same bound (cuBLAS adds in float in an
//     unspecified order; the emulated cuBLAS in double, then the bias in float).
//   - the GPU's inputs x' are not the CPU's x: LN2 of a residual stream that every layer below rounded in its
//     own order. That adds |sum_c w_c (x'_c - x_c)|. Measured with the emulated device (a temporary capture of its
//     pre-activations, not kept) on every unit of parts 2, 2b and 6 (272,256), OpenBLAS under each core type of
//     tools/relu_tie_matrix.sh: |z_GPU - z| <= 3.2 u S, of which the device's own rounding (its double dot product
//     rounded once, the bias added in float) is at most 2 u S; |z_GPU - z_CPU| <= 5.5 u S.
//     RELU_TIE_INPUT_ULPS allows ten times that input term (a real GPU's forward rounds more).
// The bound, (2 (C + 1) + RELU_TIE_INPUT_ULPS) u S (162 u S at C = 64), is thirty times the largest disagreement
// measured, and still small: 16 of the ~420,000 kept units of test_gpu_model fall within it. A wider bound would
// only add candidates, each taken the other way only where the other backend's gradients show its flip; the
// comparison keeps its bounds either way.
#define RELU_TIE_INPUT_ULPS 32.0
#define UNIT_ROUNDOFF 5.9604644775390625e-08  // 2^-24

static void add_tie(ReluTies *t, const ReluTie *tie) {
    if (t->n == t->cap) {
        t->cap = t->cap ? 2 * t->cap : 16;
        t->ties = realloc(t->ties, (size_t)t->cap * sizeof(ReluTie));
        if (!t->ties) mlm_fatal(MLM_EXIT_FAILURE, "out of memory for %d ReLU ties", t->cap);
    }
    t->ties[t->n++] = *tie;
}

// Record every kept unit of this layer whose pre-activation is within its bound of zero.
static void record_site(ReluTies *t, const CpuReluSite *s) {
    for (int n = 0; n < s->N; n++) {
        const float *x = s->x + (size_t)n * s->C;
        for (int f = 0; f < s->F; f++) {
            if (s->keep && !keep_bit(s->keep, (size_t)n * s->F + f)) continue;  // dropped: zero on both backends
            const float *w = s->w + (size_t)f * s->C;
            double z = s->b[f], S = fabs((double)s->b[f]);
            for (int c = 0; c < s->C; c++) {
                double term = (double)x[c] * w[c];
                z += term;
                S += fabs(term);
            }
            double bound = (2.0 * (s->C + 1) + RELU_TIE_INPUT_ULPS) * UNIT_ROUNDOFF * S;
            if (fabs(z) > bound) continue;
            ReluTie tie = {t->forward, s->layer, n, f, z, bound, s->h[(size_t)n * s->F + f], 0, 0.0};
            add_tie(t, &tie);
        }
    }
}

// Give every recorded tie of this forward and layer its decision: the CPU's own, or the other one where flipped.
// Pinning the unflipped ones keeps a flip below from moving a tie above across zero (the forward changes by the
// flipped unit's value, within the bound).
static void pin_site(ReluTies *t, const CpuReluSite *s) {
    for (int i = 0; i < t->n; i++) {
        const ReluTie *tie = &t->ties[i];
        if (tie->forward != t->forward || tie->layer != s->layer) continue;
        float *h = &s->h[(size_t)tie->row * s->F + tie->unit];
        int on = (tie->h > 0.0f) != tie->flipped;
        // On: the unit's own magnitude (or the smallest normal float where the CPU rounded it to zero); off: <= 0.
        *h = on ? (fabsf(*h) > 0.0f ? fabsf(*h) : FLT_MIN) : -fabsf(*h);
    }
}

static void relu_ties_hook(void *ctx, const CpuReluSite *s) {
    ReluTies *t = ctx;
    if (t->mode == RELU_TIES_RECORD) record_site(t, s);
    else if (t->mode == RELU_TIES_PIN) pin_site(t, s);
}

void relu_ties_attach(ReluTies *t, CpuModel *m) {
    memset(t, 0, sizeof(*t));
    t->n_tab = model_param_table(&m->cfg, NULL);
    t->tab = mlm_malloc((size_t)t->n_tab * sizeof(ParamEntry), "parameter table");
    model_param_table(&m->cfg, t->tab);
    t->P = m->n_params;
    cpu_model_set_relu_hook(m, relu_ties_hook, t);
}

void relu_ties_free(ReluTies *t) {
    free(t->ties), free(t->tab);
    t->ties = NULL, t->tab = NULL;
    t->n = t->cap = t->n_tab = 0;
}

// Each tensor's scale: its largest |gradient| (the key bias, whose gradient is rounding noise, the model's largest).
static void tensor_scales(const ParamEntry *tab, int n_tab, const float *g, size_t P, double *scale) {
    double all = 0.0;
    for (size_t i = 0; i < P; i++) all = fmax(all, fabs((double)g[i]));
    for (int k = 0; k < n_tab; k++) {
        size_t n = fixture_entry_numel(&tab[k]), o = tab[k].offset;
        double m = 0.0;
        for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)g[o + i]));
        scale[k] = fixture_is_key_bias(tab[k].name) || m == 0.0 ? all : m;
    }
}

// <a, b> with each tensor's elements weighted by 1 / scale_t^2, so that every tensor counts by its relative error as
// the comparisons do (the size of a flip, sqrt(<d, d>), is at least its largest relative change of an element).
static double weighted_dot(const ParamEntry *tab, int n_tab, const double *scale, const double *a, const double *b) {
    double dot = 0.0;
    for (int k = 0; k < n_tab; k++) {
        size_t n = fixture_entry_numel(&tab[k]), o = tab[k].offset;
        double s = 0.0;
        for (size_t i = o; i < o + n; i++) s += a[i] * b[i];
        dot += s / (scale[k] * scale[k]);
    }
    return dot;
}

int relu_ties_resolve(ReluTies *t, ReluTiesRun run, void *ctx, const float *g_ref, float *grads, const char *what) {
    const ParamEntry *tab = t->tab;
    int n_tab = t->n_tab;
    size_t P = t->P;
    t->n = 0;
    t->mode = RELU_TIES_RECORD;
    run(ctx, t, grads);
    t->comparisons++;
    t->total_ties += t->n;
    if (t->n == 0) {
        t->mode = RELU_TIES_OFF;
        return 0;
    }
    // Each flip's delta on its own, against the CPU's decisions. The deltas of different units add (a flip moves
    // the forward by one unit's value, within its bound, so the other units' gradients stay), so with r = g_ref - g0:
    // share_i = <r - sum of the other kept flips' deltas, delta_i> / <delta_i, delta_i> is how much of flip i g_ref
    // shows: 1 where the other backend took the tie the other way (within rounding), 0 where it did not. A flip is
    // kept when its share is within (1/2, 3/2): closer to 1 than to 0, and not a fraction of something larger (a real
    // error whose gradient happens to overlap the flip's). Passes over the ties until no decision changes settle
    // flips whose deltas overlap (two ties of one unit in different rows).
    int k = t->n;
    float *g0 = mlm_malloc(P * sizeof(float), "gradients without flips");
    float *deltas = mlm_malloc((size_t)k * P * sizeof(float), "flips' deltas");
    double *r = mlm_malloc(P * sizeof(double), "difference"), *di = mlm_malloc(P * sizeof(double), "delta");
    double *dj = mlm_malloc(P * sizeof(double), "delta"), *scale = mlm_malloc((size_t)n_tab * sizeof(double), "scales");
    double *gram = mlm_malloc((size_t)k * k * sizeof(double), "Gram matrix");
    double *rd = mlm_malloc((size_t)k * sizeof(double), "<r, delta>");
    int *keep = mlm_calloc((size_t)k, sizeof(int), "kept flips");
    memcpy(g0, grads, P * sizeof(float));
    tensor_scales(tab, n_tab, g0, P, scale);
    for (size_t j = 0; j < P; j++) r[j] = (double)g_ref[j] - (double)g0[j];
    t->mode = RELU_TIES_PIN;
    for (int i = 0; i < k; i++) {
        t->ties[i].flipped = 1;
        run(ctx, t, grads);
        t->ties[i].flipped = 0;
        for (size_t j = 0; j < P; j++) deltas[(size_t)i * P + j] = grads[j] - g0[j];
    }
    for (int i = 0; i < k; i++) {
        for (size_t j = 0; j < P; j++) di[j] = deltas[(size_t)i * P + j];
        rd[i] = weighted_dot(tab, n_tab, scale, r, di);
        for (int l = 0; l <= i; l++) {
            for (size_t j = 0; j < P; j++) dj[j] = deltas[(size_t)l * P + j];
            gram[(size_t)i * k + l] = gram[(size_t)l * k + i] = weighted_dot(tab, n_tab, scale, di, dj);
        }
    }
    int n_kept = 0;
    for (int pass = 0, changed = 1; changed && pass <= k; pass++) {
        changed = 0;
        for (int i = 0; i < k; i++) {
            double dd = gram[(size_t)i * k + i], num = rd[i];
            for (int l = 0; l < k; l++)
                if (l != i && keep[l]) num -= gram[(size_t)i * k + l];
            t->ties[i].share = dd > 0.0 ? num / dd : 0.0;
            int want = t->ties[i].share > 0.5 && t->ties[i].share < 1.5;
            if (want != keep[i]) keep[i] = want, n_kept += want ? 1 : -1, changed = 1;
        }
    }
    for (int i = 0; i < k; i++) {
        ReluTie *tie = &t->ties[i];
        tie->flipped = keep[i];
        if (tie->flipped || tie->share > 0.5)  // taken, or not taken though the gradients lean that way
            printf("  %s: ReLU tie %s: forward %d layer %d row %d unit %d, pre-activation %.3e (CPU %.3e, bound %.2e); "
                   "the other backend's gradients show %.3f of the flip (its size %.1e)\n", what,
                   tie->flipped ? "taken the other way" : "not taken", tie->forward, tie->layer, tie->row, tie->unit,
                   tie->z, tie->h, tie->bound, tie->share, sqrt(gram[(size_t)i * k + i]));
    }
    run(ctx, t, grads);  // the kept flips together (or none: the CPU's own decisions again)
    t->mode = RELU_TIES_OFF;
    t->total_flipped += n_kept;
    free(g0), free(deltas), free(r), free(di), free(dj), free(scale), free(gram), free(rd), free(keep);
    return n_kept;
}

void cpu_pass_run(void *ctx, ReluTies *t, float *grads) {
    CpuPass *p = ctx;
    if (t) t->forward = 0;
    p->loss = cpu_model_forward(p->cm, p->inputs, p->labels, p->B, p->pad, p->drop, &p->correct);
    cpu_model_backward(p->cm);
    memcpy(grads, p->cm->grads, p->cm->n_params * sizeof(float));
}

void cpu_pass_resolve(CpuPass *p, ReluTies *t, const float *g_ref, const char *what) {
    float *g = mlm_malloc(p->cm->n_params * sizeof(float), "CPU gradients");
    if (t && g_ref) relu_ties_resolve(t, cpu_pass_run, p, g_ref, g, what);
    else cpu_pass_run(p, NULL, g);
    free(g);
}

void relu_ties_print(const ReluTies *t, const char *other) {
    printf("  ReLU ties: %ld hidden units within their rounding bound of zero in %ld comparisons, %ld taken the %s's "
           "way\n", t->total_ties, t->comparisons, t->total_flipped, other);
}
