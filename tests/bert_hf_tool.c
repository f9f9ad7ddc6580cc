// bert_hf_tool.c: runs mlm's CPU BertForMaskedLM on a batch for tests/test_bert_hf.py: the forward's logits and
// loss, the first backward's gradients, and `steps` training steps (forward, backward, clip, AdamW on mlm's
// schedule), writing everything to a safetensors file the Python test compares with transformers.
// Usage: bert_hf_tool MODEL.safetensors BATCH.safetensors OUT.safetensors
//   MODEL: transformers' save_pretrained weights of a BertForMaskedLM (loaded by weights_load, by name).
//   BATCH: int32 "inputs" and "labels" [B, T] (labels: pad_id where ignored) and metadata: vocab, d_model, n_heads,
//   n_layers, d_ff, max_positions, type_vocab, ln_eps, pad_id, steps, lr, warmup, total_steps, weight_decay,
//   beta1, beta2, adam_eps, max_norm.
// OUT: "logits" [B*T, V], "loss" [steps + 1] (the loss of each step's forward, then after the last step),
// "lr" [steps], "grad.<name>" (the first backward, before clipping) and "step<k>.<name>" (parameters after step k)
// for every parameter name of the model.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fixture_util.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/optim.h"
#include "mlm/safetensors.h"
#include "mlm/weights.h"

// The table's tensors of `values` [P], named prefix + name (the names are malloc'ed into names[]).
static int add_tensors(StTensor *t, int k, char **names, const ParamEntry *tab, int n, const float *values,
                       const char *prefix) {
    for (int i = 0; i < n; i++, k++) {
        size_t len = strlen(prefix) + strlen(tab[i].name) + 1;
        names[k] = mlm_malloc(len, "tensor name");
        snprintf(names[k], len, "%s%s", prefix, tab[i].name);
        t[k] = (StTensor){.name = names[k], .dtype = ST_F32, .ndim = tab[i].ndim,
                          .shape = {tab[i].shape[0], tab[i].ndim == 2 ? tab[i].shape[1] : 0},
                          .nbytes = fixture_entry_numel(&tab[i]) * sizeof(float), .data = values + tab[i].offset};
    }
    return k;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.safetensors BATCH.safetensors OUT.safetensors\n", argv[0]);
        return 2;
    }
    char err[4096];
    StFile batch;
    if (st_read(argv[2], &batch, err, sizeof(err))) mlm_fatal(1, "%s", err);
    ModelConfig mc = {.vocab = fixture_meta_int(&batch, "vocab", 0), .d_model = fixture_meta_int(&batch, "d_model", 0),
                      .n_heads = fixture_meta_int(&batch, "n_heads", 0), .n_layers = fixture_meta_int(&batch, "n_layers", 0),
                      .d_ff = fixture_meta_int(&batch, "d_ff", 0), .dropout = 0.0f,
                      .ln_eps = (float)fixture_meta_double(&batch, "ln_eps", 1e-12), .arch = MODEL_ARCH_BERT,
                      .max_positions = fixture_meta_int(&batch, "max_positions", 0),
                      .type_vocab = fixture_meta_int(&batch, "type_vocab", 2), .init_std = 0.02f,
                      .pad_id = fixture_meta_int(&batch, "pad_id", 0)};
    const StTensor *in = st_find(&batch, "inputs"), *lab = st_find(&batch, "labels");
    if (!in || !lab || in->dtype != ST_I32 || lab->dtype != ST_I32 || in->ndim != 2 || lab->nbytes != in->nbytes)
        mlm_fatal(1, "%s: needs int32 inputs and labels [B, T] of one shape", argv[2]);
    int B = (int)in->shape[0], steps = fixture_meta_int(&batch, "steps", 1);
    mc.max_seq = (int)in->shape[1];
    if (model_config_check(&mc, err, sizeof(err))) mlm_fatal(1, "%s", err);
    OptimConfig oc = {.kind = OPTIM_ADAMW, .schedule = SCHED_LINEAR, .lr = (float)fixture_meta_double(&batch, "lr", 1e-3),
                      .beta1 = (float)fixture_meta_double(&batch, "beta1", 0.9),
                      .beta2 = (float)fixture_meta_double(&batch, "beta2", 0.999),
                      .eps = (float)fixture_meta_double(&batch, "adam_eps", 1e-6),
                      .weight_decay = (float)fixture_meta_double(&batch, "weight_decay", 0.01),
                      .warmup = fixture_meta_int(&batch, "warmup", 0), .min_lr = 0.0f, .d_model = mc.d_model,
                      .total_steps = fixture_meta_int(&batch, "total_steps", steps)};
    float max_norm = (float)fixture_meta_double(&batch, "max_norm", 1.0);

    CpuModel *m = cpu_model_create(&mc, B);
    if (weights_load(argv[1], &mc, NULL, m->params, err, sizeof(err))) mlm_fatal(1, "%s", err);
    size_t P = m->n_params, NV = (size_t)B * mc.max_seq * mc.vocab;
    int n_tab = model_param_table(&mc, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n_tab * sizeof(ParamEntry), "table");
    model_param_table(&mc, tab);
    uint8_t *decay = mlm_malloc(P, "decay mask");
    model_decay_mask(&mc, decay);
    float *adam_m = mlm_calloc(P, sizeof(float), "m"), *adam_v = mlm_calloc(P, sizeof(float), "v");
    float *logits = mlm_malloc(NV * sizeof(float), "logits"), *grads = mlm_malloc(P * sizeof(float), "grads");
    float *after = mlm_malloc((size_t)steps * P * sizeof(float), "parameters after each step");
    float *losses = mlm_calloc((size_t)steps + 1, sizeof(float), "losses"), *lrs = mlm_calloc((size_t)steps, sizeof(float), "lr");
    const int *inputs = in->data, *labels = lab->data;
    for (int t = 1; t <= steps; t++) {
        losses[t - 1] = cpu_model_forward(m, inputs, labels, B, mc.pad_id, NULL, NULL);
        if (t == 1) memcpy(logits, m->logits, NV * sizeof(float));
        cpu_model_backward(m);
        if (t == 1) memcpy(grads, m->grads, P * sizeof(float));
        cpu_clip_grads(m->grads, P, max_norm);
        double lr = optim_lr(&oc, t);
        lrs[t - 1] = (float)lr;
        cpu_adam_update(&oc, m->params, m->grads, adam_m, adam_v, decay, P, t, lr);
        memcpy(after + (size_t)(t - 1) * P, m->params, P * sizeof(float));
    }
    losses[steps] = cpu_model_forward(m, inputs, labels, B, mc.pad_id, NULL, NULL);

    int n_out = 3 + n_tab * (1 + steps), k = 3;
    StTensor *t = mlm_calloc((size_t)n_out, sizeof(StTensor), "tensors");
    char **names = mlm_calloc((size_t)n_out, sizeof(char *), "names");
    t[0] = (StTensor){.name = "logits", .dtype = ST_F32, .ndim = 2, .shape = {(int64_t)B * mc.max_seq, mc.vocab},
                      .nbytes = NV * sizeof(float), .data = logits};
    t[1] = (StTensor){.name = "loss", .dtype = ST_F32, .ndim = 1, .shape = {steps + 1},
                      .nbytes = (size_t)(steps + 1) * sizeof(float), .data = losses};
    t[2] = (StTensor){.name = "lr", .dtype = ST_F32, .ndim = 1, .shape = {steps}, .nbytes = (size_t)steps * sizeof(float),
                      .data = lrs};
    k = add_tensors(t, k, names, tab, n_tab, grads, "grad.");
    for (int s = 0; s < steps; s++) {
        char prefix[32];
        snprintf(prefix, sizeof(prefix), "step%d.", s + 1);
        k = add_tensors(t, k, names, tab, n_tab, after + (size_t)s * P, prefix);
    }
    if (st_write(argv[3], t, k, NULL, 0, err, sizeof(err))) mlm_fatal(1, "%s", err);
    for (int i = 0; i < k; i++) free(names[i]);
    free(names); free(t); free(after); free(losses); free(lrs); free(grads); free(logits); free(adam_m); free(adam_v);
    free(decay); free(tab);
    cpu_model_free(m);
    st_free(&batch);
    return 0;
}
