// cpu_model.c: the CPU model instance: one allocation each for parameters, gradients and activations,
// the forward (loss, accuracy) and backward passes composed from ops.h for both architectures (labml's pre-LN
// TransformerMLM and BertForMaskedLM, model.h), and gradient norm / clipping.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"
#include "mlm/bf16.h"
#include "mlm/common.h"
#include "mlm/cpu.h"

// Views into the activation allocation. Per-layer tensors are stacked [L, max_B, T, ...] so that layer l
// starts at l times the full-batch size; a smaller batch uses a prefix of each layer's block. The uint8
// dropout masks are carved out of the same float allocation (rounded up to whole floats).
typedef struct {
    float *pe;                   // [T, C] sinusoidal positions (constant)
    float *encoded;              // [B, T, C] embedding output = residual stream entering layer 0
    float *ln1;                  // [L, B, T, C] LN1 output
    float *ln1_mean, *ln1_rstd;  // [L, B, T]
    float *qkv;                  // [L, B, T, 3C]
    float *att;                  // [L, B, H, T, T] softmax probabilities, before dropout
    float *atty;                 // [L, B, T, C] heads concatenated, input of the output projection
    float *res1;                 // [L, B, T, C] residual stream after the attention block
    float *ln2;                  // [L, B, T, C] LN2 output
    float *ln2_mean, *ln2_rstd;  // [L, B, T]
    float *fch;                  // [L, B, T, F] dropout(ReLU(Linear1)), input of Linear2
    float *res2;                 // [L, B, T, C] residual stream after the FFN block (input of layer l+1)
    float *lnf;                  // [B, T, C] final LayerNorm output
    float *lnf_mean, *lnf_rstd;  // [B, T]
    float *logits;               // [B, T, V]
    float *losses;               // [B, T] per-position loss (0 where ignored)
    uint8_t *keep_att;           // [L, B, H, T, T] dropout masks of the attention probabilities
    uint8_t *keep_res1;          // [L, B, T, C] attention-residual dropout masks
    uint8_t *keep_res2;          // [L, B, T, C] FFN-residual dropout masks
    uint8_t *keep_hidden;        // [B, T, F] FFN-hidden mask (scratch: backward needs only fch)
    float *proj;                 // [B, T, C] scratch: a block's output before the residual add
    // Backward scratch.
    float *dlogits;              // [B, T, V]
    float *dres;                 // [B, T, C] gradient of the residual stream, carried down the layers
    float *dln;                  // [B, T, C] gradient of a LayerNorm output
    float *dproj;                // [B, T, C] gradient of a block output (after undoing its dropout)
    float *datty;                // [B, T, C]
    float *dqkv;                 // [B, T, 3C]
    float *dfch;                 // [B, T, F]
    // arch = bert (empty for labml). There, ln1/ln2 are the LayerNorms AFTER each residual add, so ln2 of layer l
    // is the stream entering layer l + 1, res1/res2 are the sums they normalise, encoded is the embeddings after
    // their LayerNorm and dropout, fch is GELU's output and lnf the head transform's LayerNorm output.
    float *emb_sum;              // [B, T, C] word + type + position, input of the embedding LayerNorm
    float *emb_mean, *emb_rstd;  // [B, T]
    uint8_t *keep_emb;           // [B, T, C] embedding dropout mask
    float *fc_pre;               // [L, B, T, F] intermediate.dense output, GELU's input
    float *head_pre;             // [B, T, C] head transform dense output, GELU's input
    float *head_act;             // [B, T, C] GELU(head_pre), input of the head LayerNorm
    uint8_t *key_valid;          // [B, T] 1 where the input is not [PAD] (the attention's key-padding mask)
    float *dres2;                // [B, T, C] second gradient of the residual stream (post-LN backward)
    // train.precision = bf16 (cpu_model_set_bf16): the CUDA backend's BF16 step on the CPU. The forward and backward
    // read the BF16 copy of the parameters (params_bf: floats holding BF16 values, THE ROUNDING RULE of the FP32
    // masters m->params), and every tensor the CUDA backend stores in BF16 is rounded to a BF16 value where it is
    // written (bf16_point); the rest (LayerNorm statistics, losses, parameter gradients) stays FP32.
    int bf16;
    float *params_bf;            // [P]
    uint64_t round_seed;         // Philox key of the run's ROUND stream
    // State of the last forward.
    int dropout_on;
    float drop_scale;
    int pad_id;
    // Sparse prediction (cpu_model_set_sparse_prediction): the head runs on the n_sel selected rows only,
    // gathered in position order; lnf, lnf_mean/rstd, logits, losses and dlogits then hold n_sel rows.
    int sparse;                  // on: forwards with labels take the sparse head
    int sparse_last;             // the last forward took it
    int n_sel;                   // selected rows of the last sparse forward
    int *sel_rows;               // [B*T] row (b*T + t) of each selected position
    int *sel_labels;             // [B*T] their labels
    float *sel_x;                // [B*T, C] their rows of the last residual stream (input of the final LayerNorm)
    float *sel_dx;               // [B*T, C] gradient of sel_x
} CpuActs;

// Carves consecutive tensors out of the activation allocation; with base == NULL it only counts.
typedef struct {
    float *base;
    size_t used;  // floats taken so far
} Carver;

// Every tensor starts on a 64-byte boundary of the allocation (16 floats).
static size_t round_floats(size_t n) { return (n + 15) & ~(size_t)15; }

static float *carve_floats(Carver *cv, size_t n) {
    float *p = cv->base ? cv->base + cv->used : NULL;
    cv->used += round_floats(n);
    return p;
}

static uint8_t *carve_bytes(Carver *cv, size_t bytes) {
    uint8_t *p = cv->base ? (uint8_t *)(cv->base + cv->used) : NULL;
    cv->used += round_floats((bytes + sizeof(float) - 1) / sizeof(float));
    return p;
}

// Point every view of `a` into the allocation (or, with cv->base == NULL, just count its size).
static void carve_acts(CpuActs *a, const ModelConfig *c, int max_B, Carver *cv) {
    size_t B = max_B, T = c->max_seq, C = c->d_model, H = c->n_heads, L = c->n_layers, F = c->d_ff, V = c->vocab;
    size_t BT = B * T;
    a->pe = carve_floats(cv, c->arch == MODEL_ARCH_BERT ? 0 : T * C);  // labml's sinusoids
    a->encoded = carve_floats(cv, BT * C);
    a->ln1 = carve_floats(cv, L * BT * C);
    a->ln1_mean = carve_floats(cv, L * BT);
    a->ln1_rstd = carve_floats(cv, L * BT);
    a->qkv = carve_floats(cv, L * BT * 3 * C);
    a->att = carve_floats(cv, L * BT * H * T);
    a->atty = carve_floats(cv, L * BT * C);
    a->res1 = carve_floats(cv, L * BT * C);
    a->ln2 = carve_floats(cv, L * BT * C);
    a->ln2_mean = carve_floats(cv, L * BT);
    a->ln2_rstd = carve_floats(cv, L * BT);
    a->fch = carve_floats(cv, L * BT * F);
    a->res2 = carve_floats(cv, L * BT * C);
    a->lnf = carve_floats(cv, BT * C);
    a->lnf_mean = carve_floats(cv, BT);
    a->lnf_rstd = carve_floats(cv, BT);
    a->logits = carve_floats(cv, BT * V);
    a->losses = carve_floats(cv, BT);
    a->keep_att = carve_bytes(cv, L * BT * H * T);
    a->keep_res1 = carve_bytes(cv, L * BT * C);
    a->keep_res2 = carve_bytes(cv, L * BT * C);
    a->keep_hidden = carve_bytes(cv, BT * F);
    a->proj = carve_floats(cv, BT * C);
    a->dlogits = carve_floats(cv, BT * V);
    a->dres = carve_floats(cv, BT * C);
    a->dln = carve_floats(cv, BT * C);
    a->dproj = carve_floats(cv, BT * C);
    a->datty = carve_floats(cv, BT * C);
    a->dqkv = carve_floats(cv, BT * 3 * C);
    a->dfch = carve_floats(cv, BT * F);
    a->sel_rows = (int *)carve_bytes(cv, BT * sizeof(int));
    a->sel_labels = (int *)carve_bytes(cv, BT * sizeof(int));
    a->sel_x = carve_floats(cv, BT * C);
    a->sel_dx = carve_floats(cv, BT * C);
    size_t BTb = c->arch == MODEL_ARCH_BERT ? BT : 0;  // bert's tensors are empty for labml
    a->emb_sum = carve_floats(cv, BTb * C);
    a->emb_mean = carve_floats(cv, BTb);
    a->emb_rstd = carve_floats(cv, BTb);
    a->keep_emb = carve_bytes(cv, BTb * C);
    a->fc_pre = carve_floats(cv, L * BTb * F);
    a->head_pre = carve_floats(cv, BTb * C);
    a->head_act = carve_floats(cv, BTb * C);
    a->key_valid = carve_bytes(cv, BTb);
    a->dres2 = carve_floats(cv, BTb * C);
}

CpuModel *cpu_model_create(const ModelConfig *cfg, int max_B) {
    char err[256];
    if (model_config_check(cfg, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    if (max_B < 1) mlm_fatal(MLM_EXIT_USAGE, "batch size %d must be >= 1", max_B);
    CpuModel *m = mlm_calloc(1, sizeof(CpuModel), "CPU model");
    m->cfg = *cfg;
    m->max_B = max_B;
    m->n_params = model_num_params(cfg);
    m->params = mlm_calloc(m->n_params, sizeof(float), "parameters");
    m->grads = mlm_calloc(m->n_params, sizeof(float), "gradients");
    model_param_views(cfg, m->params, &m->p);
    model_param_views(cfg, m->grads, &m->g);

    CpuActs *a = mlm_calloc(1, sizeof(CpuActs), "activation views");
    Carver count = {NULL, 0};
    carve_acts(a, cfg, max_B, &count);
    // calloc: the masks and scratch start defined, which keeps sanitizers and valgrind quiet.
    m->acts = mlm_calloc(count.used, sizeof(float), "activations");
    m->n_acts = count.used;
    Carver cv = {m->acts, 0};
    carve_acts(a, cfg, max_B, &cv);
    if (cfg->arch != MODEL_ARCH_BERT) model_positional_encoding(cfg->max_seq, cfg->d_model, a->pe);
    m->logits = a->logits;
    m->internal = a;
    return m;
}

void cpu_model_free(CpuModel *m) {
    if (!m) return;
    free(((CpuActs *)m->internal)->params_bf);
    free(m->params);
    free(m->grads);
    free(m->acts);
    free(m->internal);
    free(m);
}

// ---- train.precision = bf16 ---------------------------------------------------------------------------------

void cpu_model_set_bf16(CpuModel *m, uint64_t round_seed) {
    CpuActs *a = m->internal;
    if (!a->params_bf) a->params_bf = mlm_malloc(m->n_params * sizeof(float), "BF16 parameter copy");
    a->bf16 = 1;
    a->round_seed = round_seed;
    model_param_views(&m->cfg, a->params_bf, &m->p);
    cpu_model_round_params(m, 0);
}

void cpu_model_round_params(CpuModel *m, uint64_t updates_done) {
    CpuActs *a = m->internal;
    if (!a->bf16) return;
    bf16_stochastic_round_values(a->params_bf, m->params, m->n_params, a->round_seed, updates_done * m->n_params);
}

// x[n] becomes BF16 values where the CUDA backend stores this tensor in BF16 (bf16 mode; otherwise nothing).
static void bf16_point(const CpuActs *a, float *x, size_t n) {
    if (a->bf16) bf16_round_in_place(x, n);
}

// The residual add and the LayerNorm after it (post-LN, bert) with the BF16 point between them, where the CUDA
// backend's fused kernel rounds the sum before taking its statistics.
static void residual_ln_forward(const CpuActs *a, float *res_out, float *ln_out, float *mean, float *rstd,
                                const float *res, const float *y, const uint8_t *keep, float scale, const float *w,
                                const float *b, int N, int C, float eps) {
    residual_dropout_forward(res_out, res, y, keep, scale, (size_t)N * C);
    bf16_point(a, res_out, (size_t)N * C);
    layernorm_forward(ln_out, mean, rstd, res_out, w, b, N, C, eps);
    bf16_point(a, ln_out, (size_t)N * C);
}

// Draw the masks of one dropout site, or return NULL when dropout is off for this forward.
static uint8_t *site_mask(CpuActs *a, const DropoutCtx *drop, uint8_t *keep, int layer, DropSite site, size_t n) {
    if (!a->dropout_on) return NULL;
    dropout_keep_mask(keep, drop, layer, site, n);
    return keep;
}

// ---- The head's transform: the rows x[n, C] of the last hidden state into a->lnf[n, C], the decoder's input.
// labml: the encoder's final LayerNorm. bert: cls.predictions.transform, dense -> GELU -> LayerNorm.

static void head_transform_forward(CpuModel *m, const float *x, int n) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    const ParamTensors *p = &m->p;
    int C = c->d_model;
    if (c->arch != MODEL_ARCH_BERT) {
        layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, x, p->lnf_w, p->lnf_b, n, C, c->ln_eps);
        bf16_point(a, a->lnf, (size_t)n * C);
        return;
    }
    linear_forward(a->head_pre, x, p->head_w, p->head_b, n, C, C);
    bf16_point(a, a->head_pre, (size_t)n * C);
    gelu_forward(a->head_act, a->head_pre, (size_t)n * C);
    bf16_point(a, a->head_act, (size_t)n * C);
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, a->head_act, p->head_ln_w, p->head_ln_b, n, C, c->ln_eps);
    bf16_point(a, a->lnf, (size_t)n * C);
}

// dx[n, C] (overwritten) from a->dln = d lnf, and the transform's parameter gradients.
static void head_transform_backward(CpuModel *m, float *dx, const float *x, int n) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    const ParamTensors *p = &m->p, *g = &m->g;
    int C = c->d_model;
    if (c->arch != MODEL_ARCH_BERT) {
        memset(dx, 0, (size_t)n * C * sizeof(float));
        layernorm_backward(dx, g->lnf_w, g->lnf_b, a->dln, x, p->lnf_w, a->lnf_mean, a->lnf_rstd, n, C);
        bf16_point(a, dx, (size_t)n * C);
        return;
    }
    float *dact = a->dproj;  // [n, C] scratch: d head_act, then (in place) d head_pre
    memset(dact, 0, (size_t)n * C * sizeof(float));
    layernorm_backward(dact, g->head_ln_w, g->head_ln_b, a->dln, a->head_act, p->head_ln_w, a->lnf_mean, a->lnf_rstd,
                       n, C);
    bf16_point(a, dact, (size_t)n * C);
    gelu_backward(dact, dact, a->head_pre, (size_t)n * C);
    bf16_point(a, dact, (size_t)n * C);
    linear_backward(dx, g->head_w, g->head_b, dact, x, p->head_w, n, C, C);
    bf16_point(a, dx, (size_t)n * C);
}

// ---- Sparse prediction: the head's transform, decoder and loss on the selected rows only.
// Every op of the head is per row (LayerNorm, the classifier's dot products, the row's softmax), so the
// selected rows' logits and losses are those of the dense head, and the parameter gradients differ only by
// the zero terms the dense sums add for unselected rows (rounding of the matmul's blocking aside).

void cpu_model_set_sparse_prediction(CpuModel *m, int on) { ((CpuActs *)m->internal)->sparse = on != 0; }

// Gather the rows whose label != pad_id, in position order: sel_x[n, C] from x[N, C], their row indices and
// labels. Returns n. A label outside the vocabulary stops with its position, as crossentropy_forward would.
static int gather_selected_rows(CpuActs *a, const float *x, const int *labels, int N, int C, int V, int pad_id) {
    int n = 0;
    for (int r = 0; r < N; r++) {
        if (labels[r] == pad_id) continue;
        if (labels[r] < 0 || labels[r] >= V)
            mlm_fatal(MLM_EXIT_FAILURE, "label %d at position %d is outside the vocabulary [0, %d)", labels[r], r, V);
        a->sel_rows[n] = r;
        a->sel_labels[n] = labels[r];
        memcpy(a->sel_x + (size_t)n * C, x + (size_t)r * C, (size_t)C * sizeof(float));
        n++;
    }
    return n;
}

static float sparse_head_forward(CpuModel *m, const float *x, const int *labels, int N, int pad_id, int *correct) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    const ParamTensors *p = &m->p;
    int C = c->d_model, V = c->vocab;
    int n = a->n_sel = gather_selected_rows(a, x, labels, N, C, V, pad_id);
    if (n == 0) return 0.0f;  // nothing to predict: loss 0, n_targets 0 (the dense path's result)
    head_transform_forward(m, a->sel_x, n);
    linear_forward(a->logits, a->lnf, p->gen_w, p->gen_b, n, C, V);
    bf16_point(a, a->logits, (size_t)n * V);
    // The gradient of the mean loss (1 / n per row, as cpu_model_backward's dense start) comes in the same pass.
    m->n_targets = n;
    float loss = crossentropy_forward_backward(a->losses, a->dlogits, a->logits, a->sel_labels, n, V, 1.0f / (float)n,
                                               correct);
    bf16_point(a, a->dlogits, (size_t)n * V);
    return loss;
}

// Gradient of the sparse head into its parameters' gradients and a->dres[N, C] (zero on the unselected rows).
// n_norm: the target count the mean loss divides by (the whole batch's when accumulating micro-batches).
static void sparse_head_backward(CpuModel *m, int N, int n_norm) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    const ParamTensors *p = &m->p, *g = &m->g;
    int C = c->d_model, V = c->vocab, n = a->n_sel;
    // dlogits was written by the forward's fused cross-entropy with 1 / n; a micro-batch needs 1 / n_norm.
    if (n_norm != n) {
        crossentropy_backward(a->dlogits, a->logits, a->sel_labels, n, V, a->pad_id, 1.0f / (float)n_norm);
        bf16_point(a, a->dlogits, (size_t)n * V);
    }
    linear_backward(a->dln, g->gen_w, g->gen_b, a->dlogits, a->lnf, p->gen_w, n, C, V);
    bf16_point(a, a->dln, (size_t)n * C);
    head_transform_backward(m, a->sel_dx, a->sel_x, n);
    memset(a->dres, 0, (size_t)N * C * sizeof(float));
    for (int i = 0; i < n; i++)
        memcpy(a->dres + (size_t)a->sel_rows[i] * C, a->sel_dx + (size_t)i * C, (size_t)C * sizeof(float));
}

// y[n] += x[n].
static void add_inplace(float *y, const float *x, size_t n) {
    long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
    for (long long i = 0; i < count; i++) y[i] += x[i];
}

// One layer's saved activations and dropout masks: its slices of the stacked [L, max_B, T, ...] tensors.
typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd;  // [B, T, C], [B, T], [B, T]
    float *qkv;                        // [B, T, 3C]
    float *att;                        // [B, H, T, T]
    float *atty, *res1;                // [B, T, C]
    float *ln2, *ln2_mean, *ln2_rstd;  // [B, T, C], [B, T], [B, T]
    float *fc_pre, *fch;               // [B, T, F] (fc_pre: bert)
    float *res2;                       // [B, T, C]
    uint8_t *keep_att, *keep_res1, *keep_res2;  // the masks (NULL when the last forward had no dropout)
} LayerActs;

static LayerActs layer_acts(const CpuModel *m, int l) {
    const ModelConfig *c = &m->cfg;
    const CpuActs *a = m->internal;
    size_t maxBT = (size_t)m->max_B * c->max_seq, C = c->d_model, H = c->n_heads, T = c->max_seq, F = c->d_ff;
    size_t rows = l * maxBT;
    int drop = a->dropout_on;
    LayerActs y = {
        a->ln1 + rows * C, a->ln1_mean + rows, a->ln1_rstd + rows, a->qkv + rows * 3 * C, a->att + rows * H * T,
        a->atty + rows * C, a->res1 + rows * C, a->ln2 + rows * C, a->ln2_mean + rows, a->ln2_rstd + rows,
        c->arch == MODEL_ARCH_BERT ? a->fc_pre + rows * F : NULL, a->fch + rows * F, a->res2 + rows * C,
        drop ? a->keep_att + rows * H * T : NULL, drop ? a->keep_res1 + rows * C : NULL,
        drop ? a->keep_res2 + rows * C : NULL,
    };
    return y;
}

// ---- labml's encoder: x = x + Drop(Sublayer(LN(x))) per block. Returns the last residual stream [B, T, C].
static const float *labml_encoder_forward(CpuModel *m, const int *inputs, int B, const DropoutCtx *drop) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    int T = c->max_seq, C = c->d_model, H = c->n_heads, F = c->d_ff, V = c->vocab, L = c->n_layers;
    size_t BT = (size_t)B * T;
    int N = (int)BT;
    float ds = a->drop_scale;
    const ParamTensors *p = &m->p;

    embedding_forward(a->encoded, inputs, p->tok_emb, a->pe, B, T, C, V);
    bf16_point(a, a->encoded, BT * C);
    const float *x = a->encoded;  // [B, T, C] residual stream entering the layer
    for (int l = 0; l < L; l++) {
        size_t lc = (size_t)l * C;
        LayerActs y = layer_acts(m, l);
        // x = x + Drop(OutProj(MHA(LN1(x))))
        layernorm_forward(y.ln1, y.ln1_mean, y.ln1_rstd, x, p->ln1_w + lc, p->ln1_b + lc, N, C, c->ln_eps);
        bf16_point(a, y.ln1, BT * C);
        linear_forward(y.qkv, y.ln1, p->qkv_w + (size_t)l * 3 * C * C, p->qkv_b + 3 * lc, N, C, 3 * C);
        bf16_point(a, y.qkv, BT * 3 * C);
        uint8_t *keep = site_mask(a, drop, y.keep_att, l, DROP_ATTN_PROBS, BT * H * T);
        attention_forward(y.atty, y.att, y.qkv, keep, ds, B, T, C, H, NULL);
        bf16_point(a, y.atty, BT * C);
        linear_forward(a->proj, y.atty, p->out_w + (size_t)l * C * C, p->out_b + lc, N, C, C);
        bf16_point(a, a->proj, BT * C);
        keep = site_mask(a, drop, y.keep_res1, l, DROP_ATTN_RESID, BT * C);
        residual_dropout_forward(y.res1, x, a->proj, keep, ds, BT * C);
        bf16_point(a, y.res1, BT * C);
        // x = x + Drop(Linear2(Drop(ReLU(Linear1(LN2(x))))))
        layernorm_forward(y.ln2, y.ln2_mean, y.ln2_rstd, y.res1, p->ln2_w + lc, p->ln2_b + lc, N, C, c->ln_eps);
        bf16_point(a, y.ln2, BT * C);
        linear_forward(y.fch, y.ln2, p->ff1_w + (size_t)l * F * C, p->ff1_b + (size_t)l * F, N, C, F);
        bf16_point(a, y.fch, BT * F);
        keep = site_mask(a, drop, a->keep_hidden, l, DROP_FFN_HIDDEN, BT * F);
        relu_dropout_forward(y.fch, keep, ds, BT * F);
        bf16_point(a, y.fch, BT * F);
        linear_forward(a->proj, y.fch, p->ff2_w + (size_t)l * C * F, p->ff2_b + lc, N, F, C);
        bf16_point(a, a->proj, BT * C);
        keep = site_mask(a, drop, y.keep_res2, l, DROP_FFN_RESID, BT * C);
        residual_dropout_forward(y.res2, y.res1, a->proj, keep, ds, BT * C);
        bf16_point(a, y.res2, BT * C);
        x = y.res2;
    }
    return x;
}

// ---- BERT's encoder (BertModel without the pooler): Drop(LN(word + type + position)), then per layer
// h = LN1(x + Drop(Dense(Attn(x)))), x = LN2(h + Drop(Dense2(GELU(Dense1(h))))). Returns the last hidden state.
static const float *bert_encoder_forward(CpuModel *m, const int *inputs, int B, const DropoutCtx *drop) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    int T = c->max_seq, C = c->d_model, H = c->n_heads, F = c->d_ff, V = c->vocab, L = c->n_layers;
    size_t BT = (size_t)B * T;
    int N = (int)BT;
    float ds = a->drop_scale;
    const ParamTensors *p = &m->p;

    // transformers' attention_mask = (input_ids != pad): [PAD] keys are masked out wherever a batch has them.
    for (size_t i = 0; i < BT; i++) a->key_valid[i] = inputs[i] != a->pad_id;
    bert_embedding_forward(a->emb_sum, inputs, p->tok_emb, p->pos_emb, p->type_emb, B, T, C, V);
    bf16_point(a, a->emb_sum, BT * C);
    layernorm_forward(a->encoded, a->emb_mean, a->emb_rstd, a->emb_sum, p->emb_ln_w, p->emb_ln_b, N, C, c->ln_eps);
    bf16_point(a, a->encoded, BT * C);
    uint8_t *keep = site_mask(a, drop, a->keep_emb, 0, DROP_EMBED, BT * C);
    if (keep) residual_dropout_backward(a->encoded, a->encoded, keep, ds, BT * C);  // y = x * keep * scale: dropout
    if (keep) bf16_point(a, a->encoded, BT * C);
    const float *x = a->encoded;  // [B, T, C] hidden state entering the layer
    for (int l = 0; l < L; l++) {
        size_t lc = (size_t)l * C;
        LayerActs y = layer_acts(m, l);
        // h = LN1(x + Drop(OutProj(MHA(x)))), attention dropout on the probabilities.
        linear_forward(y.qkv, x, p->qkv_w + (size_t)l * 3 * C * C, p->qkv_b + 3 * lc, N, C, 3 * C);
        bf16_point(a, y.qkv, BT * 3 * C);
        keep = site_mask(a, drop, y.keep_att, l, DROP_ATTN_PROBS, BT * H * T);
        attention_forward(y.atty, y.att, y.qkv, keep, ds, B, T, C, H, a->key_valid);
        bf16_point(a, y.atty, BT * C);
        linear_forward(a->proj, y.atty, p->out_w + (size_t)l * C * C, p->out_b + lc, N, C, C);
        bf16_point(a, a->proj, BT * C);
        keep = site_mask(a, drop, y.keep_res1, l, DROP_ATTN_RESID, BT * C);
        residual_ln_forward(a, y.res1, y.ln1, y.ln1_mean, y.ln1_rstd, x, a->proj, keep, ds, p->ln1_w + lc,
                            p->ln1_b + lc, N, C, c->ln_eps);
        // x = LN2(h + Drop(Dense2(GELU(Dense1(h))))), no dropout inside the feed-forward block.
        linear_forward(y.fc_pre, y.ln1, p->ff1_w + (size_t)l * F * C, p->ff1_b + (size_t)l * F, N, C, F);
        bf16_point(a, y.fc_pre, BT * F);
        gelu_forward(y.fch, y.fc_pre, BT * F);
        bf16_point(a, y.fch, BT * F);
        linear_forward(a->proj, y.fch, p->ff2_w + (size_t)l * C * F, p->ff2_b + lc, N, F, C);
        bf16_point(a, a->proj, BT * C);
        keep = site_mask(a, drop, y.keep_res2, l, DROP_FFN_RESID, BT * C);
        residual_ln_forward(a, y.res2, y.ln2, y.ln2_mean, y.ln2_rstd, y.ln1, a->proj, keep, ds, p->ln2_w + lc,
                            p->ln2_b + lc, N, C, c->ln_eps);
        x = y.ln2;
    }
    return x;
}

// The last hidden state [B, T, C] of the last forward (the head's input).
static const float *last_hidden(const CpuModel *m) {
    const CpuActs *a = m->internal;
    size_t off = (size_t)(m->cfg.n_layers - 1) * m->max_B * m->cfg.max_seq * m->cfg.d_model;
    return (m->cfg.arch == MODEL_ARCH_BERT ? a->ln2 : a->res2) + off;
}

float cpu_model_forward(CpuModel *m, const int *inputs, const int *labels, int B, int pad_id,
                        const DropoutCtx *drop, int *correct) {
    const ModelConfig *c = &m->cfg;
    if (B < 1 || B > m->max_B) mlm_fatal(MLM_EXIT_FAILURE, "batch of %d sequences (this model holds 1..%d)", B, m->max_B);
    CpuActs *a = m->internal;
    int T = c->max_seq, C = c->d_model, V = c->vocab;
    int N = B * T;
    m->B = B;
    m->T = T;
    m->last_inputs = inputs;
    m->last_labels = labels;
    a->dropout_on = dropout_is_active(drop);
    a->drop_scale = a->dropout_on ? dropout_scale(drop->p) : 1.0f;
    a->pad_id = pad_id;
    const ParamTensors *p = &m->p;

    const float *x = c->arch == MODEL_ARCH_BERT ? bert_encoder_forward(m, inputs, B, drop)
                                                : labml_encoder_forward(m, inputs, B, drop);
    m->n_targets = 0;
    if (correct) *correct = 0;
    a->sparse_last = a->sparse && labels != NULL;
    if (a->sparse_last) return sparse_head_forward(m, x, labels, N, pad_id, correct);
    head_transform_forward(m, x, N);
    linear_forward(a->logits, a->lnf, p->gen_w, p->gen_b, N, C, V);
    bf16_point(a, a->logits, (size_t)N * V);
    if (labels == NULL) return 0.0f;
    return crossentropy_forward(a->losses, a->logits, labels, N, V, pad_id, &m->n_targets, correct);
}

// labml's layers from the top down: a->dres holds d(last residual stream) and ends as d(embedding output).
static void labml_encoder_backward(CpuModel *m) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    int B = m->B, T = c->max_seq, C = c->d_model, H = c->n_heads, F = c->d_ff, L = c->n_layers;
    size_t BT = (size_t)B * T;
    int N = (int)BT;
    float ds = a->drop_scale;
    const ParamTensors *p = &m->p;
    const ParamTensors *g = &m->g;
    for (int l = L - 1; l >= 0; l--) {
        size_t lc = (size_t)l * C;
        LayerActs y = layer_acts(m, l);
        const float *x = l > 0 ? layer_acts(m, l - 1).res2 : a->encoded;  // layer input

        // FFN block: dres is d(res2); the skip path passes it on unchanged to d(res1).
        residual_dropout_backward(a->dproj, a->dres, y.keep_res2, ds, BT * C);
        bf16_point(a, a->dproj, BT * C);
        linear_backward(a->dfch, g->ff2_w + (size_t)l * C * F, g->ff2_b + lc, a->dproj, y.fch,
                        p->ff2_w + (size_t)l * C * F, N, F, C);
        bf16_point(a, a->dfch, BT * F);
        relu_dropout_backward(a->dfch, y.fch, ds, BT * F);
        bf16_point(a, a->dfch, BT * F);
        linear_backward(a->dln, g->ff1_w + (size_t)l * F * C, g->ff1_b + (size_t)l * F, a->dfch, y.ln2,
                        p->ff1_w + (size_t)l * F * C, N, C, F);
        bf16_point(a, a->dln, BT * C);
        layernorm_backward(a->dres, g->ln2_w + lc, g->ln2_b + lc, a->dln, y.res1, p->ln2_w + lc, y.ln2_mean, y.ln2_rstd,
                           N, C);
        bf16_point(a, a->dres, BT * C);

        // Attention block: dres is now d(res1); the skip path passes it on to d(x).
        residual_dropout_backward(a->dproj, a->dres, y.keep_res1, ds, BT * C);
        bf16_point(a, a->dproj, BT * C);
        linear_backward(a->datty, g->out_w + (size_t)l * C * C, g->out_b + lc, a->dproj, y.atty,
                        p->out_w + (size_t)l * C * C, N, C, C);
        bf16_point(a, a->datty, BT * C);
        attention_backward(a->dqkv, a->datty, y.qkv, y.att, y.keep_att, ds, B, T, C, H);
        bf16_point(a, a->dqkv, BT * 3 * C);
        linear_backward(a->dln, g->qkv_w + (size_t)l * 3 * C * C, g->qkv_b + 3 * lc, a->dqkv, y.ln1,
                        p->qkv_w + (size_t)l * 3 * C * C, N, C, 3 * C);
        bf16_point(a, a->dln, BT * C);
        layernorm_backward(a->dres, g->ln1_w + lc, g->ln1_b + lc, a->dln, x, p->ln1_w + lc, y.ln1_mean, y.ln1_rstd, N,
                           C);
        bf16_point(a, a->dres, BT * C);
    }
    embedding_backward(g->tok_emb, a->dres, m->last_inputs, B, T, C);
}

// BERT's layers from the top down: a->dres holds d(last hidden state). Post-LN: each LayerNorm's input gradient
// goes to both its residual sum's terms, the skip (dres2 / dres) and the sublayer, whose input gradient is added.
static void bert_encoder_backward(CpuModel *m) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    int B = m->B, T = c->max_seq, C = c->d_model, H = c->n_heads, F = c->d_ff, L = c->n_layers;
    size_t BT = (size_t)B * T;
    int N = (int)BT;
    float ds = a->drop_scale;
    const ParamTensors *p = &m->p;
    const ParamTensors *g = &m->g;
    for (int l = L - 1; l >= 0; l--) {
        size_t lc = (size_t)l * C;
        LayerActs y = layer_acts(m, l);
        const float *x = l > 0 ? layer_acts(m, l - 1).ln2 : a->encoded;  // layer input

        // FFN block: dres is d(LN2 output); dres2 = d(res2) = d(h) through the skip, plus the FFN's input gradient.
        memset(a->dres2, 0, BT * C * sizeof(float));
        layernorm_backward(a->dres2, g->ln2_w + lc, g->ln2_b + lc, a->dres, y.res2, p->ln2_w + lc, y.ln2_mean,
                           y.ln2_rstd, N, C);
        bf16_point(a, a->dres2, BT * C);
        residual_dropout_backward(a->dproj, a->dres2, y.keep_res2, ds, BT * C);
        bf16_point(a, a->dproj, BT * C);
        linear_backward(a->dfch, g->ff2_w + (size_t)l * C * F, g->ff2_b + lc, a->dproj, y.fch,
                        p->ff2_w + (size_t)l * C * F, N, F, C);
        bf16_point(a, a->dfch, BT * F);
        gelu_backward(a->dfch, a->dfch, y.fc_pre, BT * F);
        bf16_point(a, a->dfch, BT * F);
        linear_backward(a->dln, g->ff1_w + (size_t)l * F * C, g->ff1_b + (size_t)l * F, a->dfch, y.ln1,
                        p->ff1_w + (size_t)l * F * C, N, C, F);
        add_inplace(a->dres2, a->dln, BT * C);  // d h (the CUDA backend adds the product in one rounding: beta 1)
        bf16_point(a, a->dres2, BT * C);

        // Attention block: dres = d(res1) = d(x) through the skip, plus the attention's input gradient.
        memset(a->dres, 0, BT * C * sizeof(float));
        layernorm_backward(a->dres, g->ln1_w + lc, g->ln1_b + lc, a->dres2, y.res1, p->ln1_w + lc, y.ln1_mean,
                           y.ln1_rstd, N, C);
        bf16_point(a, a->dres, BT * C);
        residual_dropout_backward(a->dproj, a->dres, y.keep_res1, ds, BT * C);
        bf16_point(a, a->dproj, BT * C);
        linear_backward(a->datty, g->out_w + (size_t)l * C * C, g->out_b + lc, a->dproj, y.atty,
                        p->out_w + (size_t)l * C * C, N, C, C);
        bf16_point(a, a->datty, BT * C);
        attention_backward(a->dqkv, a->datty, y.qkv, y.att, y.keep_att, ds, B, T, C, H);
        bf16_point(a, a->dqkv, BT * 3 * C);
        linear_backward(a->dln, g->qkv_w + (size_t)l * 3 * C * C, g->qkv_b + 3 * lc, a->dqkv, x,
                        p->qkv_w + (size_t)l * 3 * C * C, N, C, 3 * C);
        add_inplace(a->dres, a->dln, BT * C);  // d x (one rounding, as above)
        bf16_point(a, a->dres, BT * C);
    }
    // Embeddings: undo their dropout, then their LayerNorm, then the three lookups.
    residual_dropout_backward(a->dres, a->dres, a->dropout_on ? a->keep_emb : NULL, ds, BT * C);
    bf16_point(a, a->dres, BT * C);
    memset(a->dres2, 0, BT * C * sizeof(float));
    layernorm_backward(a->dres2, g->emb_ln_w, g->emb_ln_b, a->dres, a->emb_sum, p->emb_ln_w, a->emb_mean, a->emb_rstd,
                       N, C);
    bf16_point(a, a->dres2, BT * C);
    bert_embedding_backward(g->tok_emb, g->pos_emb, g->type_emb, a->dres2, m->last_inputs, B, T, C);
    // The [PAD] row is frozen (model.h): neither its lookups nor the tied decoder move it.
    memset(g->tok_emb + (size_t)c->pad_id * C, 0, (size_t)C * sizeof(float));
}

void cpu_model_backward(CpuModel *m) {
    const ModelConfig *c = &m->cfg;
    CpuActs *a = m->internal;
    if (m->last_inputs == NULL || m->last_labels == NULL)
        mlm_fatal(MLM_EXIT_FAILURE, "cpu_model_backward needs a forward with labels first");
    int B = m->B, T = c->max_seq, C = c->d_model, V = c->vocab;
    int N = B * T;
    const ParamTensors *p = &m->p;
    const ParamTensors *g = &m->g;
    memset(m->grads, 0, m->n_params * sizeof(float));
    if (m->n_targets == 0) return;  // no position carries a label: the loss is the constant 0

    // Mean over the labelled positions: each contributes 1 / n_targets (of the whole batch when accumulating).
    int n_norm = m->norm_targets > 0 ? m->norm_targets : m->n_targets;
    if (a->sparse_last) {
        sparse_head_backward(m, N, n_norm);
    } else {
        crossentropy_backward(a->dlogits, a->logits, m->last_labels, N, V, a->pad_id, 1.0f / (float)n_norm);
        bf16_point(a, a->dlogits, (size_t)N * V);
        linear_backward(a->dln, g->gen_w, g->gen_b, a->dlogits, a->lnf, p->gen_w, N, C, V);
        bf16_point(a, a->dln, (size_t)N * C);
        head_transform_backward(m, a->dres, last_hidden(m), N);
    }
    if (c->arch == MODEL_ARCH_BERT) bert_encoder_backward(m);
    else labml_encoder_backward(m);
}

// Fixed partition of the gradient vector for the norm: the chunk boundaries depend only on n, and the
// per-chunk sums are added in chunk order, so the norm is the same for any thread count.
enum { NORM_MAX_CHUNKS = 256, NORM_MIN_CHUNK = 16384 };

float cpu_grad_norm(const float *grads, size_t n) {
    double partial[NORM_MAX_CHUNKS];
    size_t n_chunks = MLM_CEIL_DIV(n, (size_t)NORM_MIN_CHUNK);
    if (n_chunks > NORM_MAX_CHUNKS) n_chunks = NORM_MAX_CHUNKS;
    if (n_chunks == 0) return 0.0f;
    size_t chunk = MLM_CEIL_DIV(n, n_chunks);
    int nc = (int)n_chunks;
#pragma omp parallel for schedule(static) if (nc > 1)
    for (int i = 0; i < nc; i++) {
        size_t lo = (size_t)i * chunk, hi = MLM_MIN(lo + chunk, n);
        double s = 0.0;
        for (size_t j = lo; j < hi; j++) s += (double)grads[j] * grads[j];
        partial[i] = s;
    }
    double total = 0.0;
    for (int i = 0; i < nc; i++) total += partial[i];
    return (float)sqrt(total);
}

float cpu_clip_grads(float *grads, size_t n, float max_norm) {
    float norm = cpu_grad_norm(grads, n);
    // As torch.nn.utils.clip_grad_norm_: coefficient max_norm / (norm + 1e-6), clamped to 1.
    float coef = (float)((double)max_norm / ((double)norm + 1e-6));
    if (coef < 1.0f) {
        long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= MLM_PARALLEL_MIN_WORK)
        for (long long i = 0; i < count; i++) grads[i] *= coef;
    }
    return norm;
}
