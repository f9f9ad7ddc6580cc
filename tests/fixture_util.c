// fixture_util.c: helpers that read the PyTorch reference fixture for the CPU and GPU fixture tests.
#include "fixture_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "test_util.h"

size_t fixture_numel(const StTensor *t) {
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++) n *= (size_t)t->shape[d];
    return n;
}

size_t fixture_entry_numel(const ParamEntry *e) {
    return (size_t)e->shape[0] * (e->ndim == 2 ? (size_t)e->shape[1] : 1);
}

int fixture_is_key_bias(const char *name) {
    return strstr(name, "self_attn.key.linear.bias") != NULL || strstr(name, "attention.self.key.bias") != NULL;
}

double fixture_rel_err(const float *a, const double *b, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > num || isnan(d)) num = isnan(d) ? INFINITY : d;
        den = fmax(den, fabs(b[i]));
    }
    return den > 0.0 ? num / den : num;
}

double fixture_max_abs(const double *b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(b[i]));
    return m;
}

double *fixture_floats(const StFile *fx, const char *path, const char *name, size_t n) {
    const StTensor *t = st_find(fx, name);
    CHECK(t != NULL, "%s: tensor %s missing", path, name);
    if (!t) return NULL;
    CHECK(fixture_numel(t) == n, "%s: %s has %zu elements, expected %zu", path, name, fixture_numel(t), n);
    CHECK(t->dtype == ST_F32 || t->dtype == ST_F64, "%s: %s is not floating point", path, name);
    if (fixture_numel(t) != n || (t->dtype != ST_F32 && t->dtype != ST_F64)) return NULL;
    double *out = mlm_malloc(n * sizeof(double), name);
    for (size_t i = 0; i < n; i++)
        out[i] = t->dtype == ST_F32 ? (double)((const float *)t->data)[i] : ((const double *)t->data)[i];
    return out;
}

int fixture_meta_int(const StFile *fx, const char *key, int fallback) {
    char *v = st_meta_get(fx, key);
    int r = v ? atoi(v) : fallback;
    free(v);
    return r;
}

double fixture_meta_double(const StFile *fx, const char *key, double fallback) {
    char *v = st_meta_get(fx, key);
    double r = v ? atof(v) : fallback;
    free(v);
    return r;
}

double *fixture_gather(const StFile *fx, const char *path, const ParamEntry *tab, int n_tab, size_t P,
                       const char *prefix) {
    double *out = mlm_calloc(P, sizeof(double), "reference vector");
    for (int k = 0; k < n_tab; k++) {
        char name[160];
        snprintf(name, sizeof(name), "%s%s", prefix, tab[k].name);
        size_t n = fixture_entry_numel(&tab[k]);
        const StTensor *t = st_find(fx, name);
        if (t) {
            int shape_ok = t->ndim == tab[k].ndim && t->shape[0] == tab[k].shape[0] &&
                           (tab[k].ndim == 1 || t->shape[1] == tab[k].shape[1]);
            CHECK(shape_ok, "%s: %s has a shape that does not match mlm's table", path, name);
            if (!shape_ok) continue;
        }
        double *v = fixture_floats(fx, path, name, n);
        if (!v) continue;
        memcpy(out + tab[k].offset, v, n * sizeof(double));
        free(v);
    }
    return out;
}

int fixture_config(const StFile *fx, FixtureConfig *out, char *err, size_t errlen) {
    ModelConfig cfg = {
        .vocab = fixture_meta_int(fx, "vocab", 0), .d_model = fixture_meta_int(fx, "d_model", 0),
        .n_heads = fixture_meta_int(fx, "n_heads", 0), .n_layers = fixture_meta_int(fx, "n_layers", 0),
        .d_ff = fixture_meta_int(fx, "d_ff", 0), .max_seq = fixture_meta_int(fx, "seq_len", 0),
        .dropout = 0.0f, .ln_eps = (float)fixture_meta_double(fx, "ln_eps", 1e-5),
    };
    out->cfg = cfg;
    out->B = fixture_meta_int(fx, "batch", 0);
    out->pad = fixture_meta_int(fx, "pad_id", cfg.vocab - 2);
    out->steps = fixture_meta_int(fx, "steps", 3);
    out->max_norm = (float)fixture_meta_double(fx, "max_grad_norm", 1.0);
    OptimConfig oc = {
        .kind = OPTIM_NOAM_ADAM, .schedule = SCHED_NOAM, .lr = (float)fixture_meta_double(fx, "lr_factor", 1.0),
        .beta1 = (float)fixture_meta_double(fx, "beta1", 0.9), .beta2 = (float)fixture_meta_double(fx, "beta2", 0.999),
        .eps = (float)fixture_meta_double(fx, "eps", 1e-8), .weight_decay = 0.0f,
        .warmup = fixture_meta_int(fx, "warmup", 4), .min_lr = 0.0f, .d_model = cfg.d_model,
        .total_steps = out->steps,
    };
    out->oc = oc;
    char msg[256] = "";
    if (model_config_check(&cfg, msg, sizeof(msg)) || out->B < 1 || out->steps < 1 || out->steps > 3) {
        snprintf(err, errlen, "bad config in metadata: %s (batch %d, steps %d)", msg, out->B, out->steps);
        return 1;
    }
    return 0;
}

double fixture_worst_tensor_err(const ModelConfig *c, const float *a, const float *b, char *name) {
    int n_tab = model_param_table(c, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n_tab * sizeof(ParamEntry), "parameter table");
    model_param_table(c, tab);
    double worst = 0.0, largest = 0.0;
    for (size_t i = 0; i < model_num_params(c); i++) largest = fmax(largest, fabs((double)b[i]));
    snprintf(name, 96, "-");
    for (int k = 0; k < n_tab; k++) {
        size_t n = fixture_entry_numel(&tab[k]), o = tab[k].offset;
        double num = 0.0, den = fixture_is_key_bias(tab[k].name) ? largest : 0.0;
        for (size_t i = 0; i < n; i++) {
            double d = fabs((double)a[o + i] - (double)b[o + i]);
            num = isnan(d) ? INFINITY : fmax(num, d);
            den = fmax(den, fabs((double)b[o + i]));
        }
        double r = den > 0 ? num / den : num;
        if (r >= worst) {
            worst = r;
            snprintf(name, 96, "%s", tab[k].name);
        }
    }
    free(tab);
    return worst;
}
