// weights.c: import and export of model weights as safetensors with PyTorch state_dict names.
#include "mlm/weights.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/safetensors.h"

static ParamEntry *param_table(const ModelConfig *mc, int *n) {
    *n = model_param_table(mc, NULL);
    ParamEntry *tab = mlm_malloc((size_t)*n * sizeof(ParamEntry), "parameter table");
    model_param_table(mc, tab);
    return tab;
}

static size_t entry_numel(const ParamEntry *e) { return (size_t)e->shape[0] * (e->ndim == 2 ? (size_t)e->shape[1] : 1); }

// labml_nn's positional-encoding buffer, pe[rows, 1, C] (malloc'ed), as a tensor of the state_dict.
static float *pe_buffer_tensor(const ModelConfig *mc, StTensor *t) {
    int rows = model_pe_buffer_rows(mc);
    float *pe = mlm_malloc((size_t)rows * (size_t)mc->d_model * sizeof(float), "positional-encoding buffer");
    model_positional_encoding(rows, mc->d_model, pe);
    t->name = MODEL_PE_BUFFER_NAME;
    t->dtype = ST_F32;
    t->ndim = 3;
    t->shape[0] = rows;
    t->shape[1] = 1;
    t->shape[2] = mc->d_model;
    t->nbytes = (size_t)rows * (size_t)mc->d_model * sizeof(float);
    t->data = pe;
    return pe;
}

int weights_save(const char *path, const ModelConfig *mc, const Vocab *v, const float *params, char *err, size_t errlen) {
    int n;
    ParamEntry *tab = param_table(mc, &n);
    // Every tensor of the reference's state_dict: the n parameters, then the positional-encoding buffer.
    StTensor *t = mlm_calloc((size_t)n + 1, sizeof(StTensor), "tensor list");
    for (int i = 0; i < n; i++) {
        t[i].name = tab[i].name;
        t[i].dtype = ST_F32;
        t[i].ndim = tab[i].ndim;
        t[i].shape[0] = tab[i].shape[0];
        t[i].shape[1] = tab[i].shape[1];
        t[i].nbytes = entry_numel(&tab[i]) * sizeof(float);
        t[i].data = params + tab[i].offset;
    }
    float *pe = pe_buffer_tensor(mc, &t[n]);
    char d[5][24];
    snprintf(d[0], sizeof(d[0]), "%d", mc->d_model);
    snprintf(d[1], sizeof(d[1]), "%d", mc->n_heads);
    snprintf(d[2], sizeof(d[2]), "%d", mc->n_layers);
    snprintf(d[3], sizeof(d[3]), "%d", mc->d_ff);
    snprintf(d[4], sizeof(d[4]), "%d", mc->max_seq);
    char *chars = mlm_malloc((size_t)v->n_chars * 5 + 1, "vocabulary");
    size_t k = 0;
    for (int i = 0; i < v->n_chars; i++) k += (size_t)utf8_encode(v->chars[i], chars + k);
    chars[k] = '\0';
    const char *meta[] = {"format", "pt", "producer", "mlm " MLM_VERSION, "d_model", d[0], "n_heads", d[1],
                          "n_layers", d[2], "d_ff", d[3], "seq_len", d[4], "vocab", chars};
    int rc = st_write(path, t, n + 1, meta, (int)(sizeof(meta) / sizeof(meta[0]) / 2), err, errlen);
    free(pe);
    free(chars);
    free(t);
    free(tab);
    return rc;
}

static void shape_text(int ndim, long long d0, long long d1, char *out, size_t n) {
    if (ndim == 2) snprintf(out, n, "[%lld, %lld]", d0, d1);
    else snprintf(out, n, "[%lld]", d0);
}

// Tensors beyond the parameter table, among them MODEL_PE_BUFFER_NAME (which mlm recomputes), are not read.
int weights_load(const char *path, const ModelConfig *mc, float *params, char *err, size_t errlen) {
    StFile f;
    if (st_read(path, &f, err, errlen)) return 1;
    int n, rc = 0;
    ParamEntry *tab = param_table(mc, &n);
    for (int i = 0; i < n && !rc; i++) {
        const StTensor *t = st_find(&f, tab[i].name);
        if (!t) {
            snprintf(err, errlen, "%s has no tensor '%s'; it was not written for this model (check model.* keys)",
                     path, tab[i].name);
            rc = 1;
        } else if (t->dtype != ST_F32 || t->ndim != tab[i].ndim || t->shape[0] != tab[i].shape[0] ||
                   (tab[i].ndim == 2 && t->shape[1] != tab[i].shape[1])) {
            char have[64], need[64];
            shape_text(t->ndim, t->shape[0], t->ndim > 1 ? t->shape[1] : 0, have, sizeof(have));
            shape_text(tab[i].ndim, tab[i].shape[0], tab[i].shape[1], need, sizeof(need));
            snprintf(err, errlen, "%s: tensor '%s' is %s %s but this model needs float32 %s", path, tab[i].name,
                     t->dtype == ST_F32 ? "float32" : "not float32,", have, need);
            rc = 1;
        } else {
            memcpy(params + tab[i].offset, t->data, t->nbytes);
        }
    }
    free(tab);
    st_free(&f);
    return rc;
}
