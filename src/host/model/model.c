// model.c: parameter layout of both architectures, the state_dict name tables (labml_nn's and transformers'),
// initialisation, the decay mask, the random-draw layout and positional encodings, the model a configuration
// describes and its memory.
#include "mlm/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/rng.h"

// Field order of ParamTensors; every array below follows it.
enum { TOK, POS, TYPE, EMBLNW, EMBLNB, LN1W, LN1B, QKVW, QKVB, OUTW, OUTB, LN2W, LN2B, FF1W, FF1B, FF2W, FF2B, LNFW,
       LNFB, HEADW, HEADB, HEADLNW, HEADLNB, GENW, GENB };

void model_tensor_sizes(const ModelConfig *c, size_t sizes[MODEL_NUM_PARAM_TENSORS]) {
    size_t V = c->vocab, C = c->d_model, L = c->n_layers, F = c->d_ff;
    int bert = c->arch == MODEL_ARCH_BERT;
    size_t P = bert ? (size_t)c->max_positions : 0, TV = bert ? (size_t)c->type_vocab : 0, Cb = bert ? C : 0,
           Cl = bert ? 0 : C;
    size_t s[MODEL_NUM_PARAM_TENSORS] = {
        V * C,                    // tok_emb
        P * C, TV * C, Cb, Cb,    // pos_emb, type_emb, emb_ln_w, emb_ln_b (bert)
        L * C, L * C,             // ln1_w, ln1_b
        L * 3 * C * C, L * 3 * C, // qkv_w, qkv_b
        L * C * C, L * C,         // out_w, out_b
        L * C, L * C,             // ln2_w, ln2_b
        L * F * C, L * F,         // ff1_w, ff1_b
        L * C * F, L * C,         // ff2_w, ff2_b
        Cl, Cl,                   // lnf_w, lnf_b (labml)
        Cb * C, Cb, Cb, Cb,       // head_w, head_b, head_ln_w, head_ln_b (bert)
        Cl * V, V,                // gen_w (labml; bert's decoder is tok_emb), gen_b
    };
    memcpy(sizes, s, sizeof(s));
}

size_t model_num_params(const ModelConfig *cfg) {
    size_t sizes[MODEL_NUM_PARAM_TENSORS], n = 0;
    model_tensor_sizes(cfg, sizes);
    for (int i = 0; i < MODEL_NUM_PARAM_TENSORS; i++) n += sizes[i];
    return n;
}

// Offset (in floats) of each parameter tensor from the start of the parameter array.
static void param_offsets(const ModelConfig *c, size_t off[MODEL_NUM_PARAM_TENSORS]) {
    size_t sizes[MODEL_NUM_PARAM_TENSORS], o = 0;
    model_tensor_sizes(c, sizes);
    for (int i = 0; i < MODEL_NUM_PARAM_TENSORS; i++) {
        off[i] = o;
        o += sizes[i];
    }
}

void model_param_views(const ModelConfig *cfg, float *base, ParamTensors *out) {
    size_t off[MODEL_NUM_PARAM_TENSORS];
    param_offsets(cfg, off);
    float **ptrs[MODEL_NUM_PARAM_TENSORS] = {
        &out->tok_emb, &out->pos_emb, &out->type_emb, &out->emb_ln_w, &out->emb_ln_b, &out->ln1_w, &out->ln1_b,
        &out->qkv_w, &out->qkv_b, &out->out_w, &out->out_b, &out->ln2_w, &out->ln2_b, &out->ff1_w, &out->ff1_b,
        &out->ff2_w, &out->ff2_b, &out->lnf_w, &out->lnf_b, &out->head_w, &out->head_b, &out->head_ln_w,
        &out->head_ln_b, &out->gen_w, &out->gen_b,
    };
    for (int i = 0; i < MODEL_NUM_PARAM_TENSORS; i++) *ptrs[i] = base + off[i];
    // BERT's decoder is the word-embedding matrix itself (tie_word_embeddings): one tensor, two uses, and its
    // gradient is the sum of both.
    if (cfg->arch == MODEL_ARCH_BERT) out->gen_w = out->tok_emb;
}

static int add_entry(ParamEntry *out, int k, const char *name, size_t offset, int d0, int d1) {
    if (out) {
        ParamEntry *e = &out[k];
        snprintf(e->name, sizeof(e->name), "%s", name);
        e->offset = offset;
        e->ndim = d1 > 0 ? 2 : 1;
        e->shape[0] = d0;
        e->shape[1] = d1 > 0 ? d1 : 0;
        e->is_matrix = d1 > 0;
    }
    return k + 1;
}

// transformers' BertForMaskedLM state_dict names (as save_pretrained writes them: the tied decoder weight is not a
// tensor of its own).
static int bert_param_table(const ModelConfig *cfg, const size_t o[MODEL_NUM_PARAM_TENSORS], ParamEntry *out) {
    int V = cfg->vocab, C = cfg->d_model, F = cfg->d_ff, k = 0;
    char name[96];
    k = add_entry(out, k, "bert.embeddings.word_embeddings.weight", o[TOK], V, C);
    k = add_entry(out, k, "bert.embeddings.position_embeddings.weight", o[POS], cfg->max_positions, C);
    k = add_entry(out, k, "bert.embeddings.token_type_embeddings.weight", o[TYPE], cfg->type_vocab, C);
    k = add_entry(out, k, "bert.embeddings.LayerNorm.weight", o[EMBLNW], C, 0);
    k = add_entry(out, k, "bert.embeddings.LayerNorm.bias", o[EMBLNB], C, 0);
    static const char *qkv_names[3] = {"query", "key", "value"};
    for (int l = 0; l < cfg->n_layers; l++) {
        size_t lc = (size_t)l * C;
        for (int j = 0; j < 3; j++) {
            snprintf(name, sizeof(name), "bert.encoder.layer.%d.attention.self.%s.weight", l, qkv_names[j]);
            k = add_entry(out, k, name, o[QKVW] + (size_t)l * 3 * C * C + (size_t)j * C * C, C, C);
            snprintf(name, sizeof(name), "bert.encoder.layer.%d.attention.self.%s.bias", l, qkv_names[j]);
            k = add_entry(out, k, name, o[QKVB] + (size_t)l * 3 * C + (size_t)j * C, C, 0);
        }
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.attention.output.dense.weight", l);
        k = add_entry(out, k, name, o[OUTW] + (size_t)l * C * C, C, C);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.attention.output.dense.bias", l);
        k = add_entry(out, k, name, o[OUTB] + lc, C, 0);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.attention.output.LayerNorm.weight", l);
        k = add_entry(out, k, name, o[LN1W] + lc, C, 0);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.attention.output.LayerNorm.bias", l);
        k = add_entry(out, k, name, o[LN1B] + lc, C, 0);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.intermediate.dense.weight", l);
        k = add_entry(out, k, name, o[FF1W] + (size_t)l * F * C, F, C);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.intermediate.dense.bias", l);
        k = add_entry(out, k, name, o[FF1B] + (size_t)l * F, F, 0);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.output.dense.weight", l);
        k = add_entry(out, k, name, o[FF2W] + (size_t)l * C * F, C, F);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.output.dense.bias", l);
        k = add_entry(out, k, name, o[FF2B] + lc, C, 0);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.output.LayerNorm.weight", l);
        k = add_entry(out, k, name, o[LN2W] + lc, C, 0);
        snprintf(name, sizeof(name), "bert.encoder.layer.%d.output.LayerNorm.bias", l);
        k = add_entry(out, k, name, o[LN2B] + lc, C, 0);
    }
    k = add_entry(out, k, "cls.predictions.transform.dense.weight", o[HEADW], C, C);
    k = add_entry(out, k, "cls.predictions.transform.dense.bias", o[HEADB], C, 0);
    k = add_entry(out, k, "cls.predictions.transform.LayerNorm.weight", o[HEADLNW], C, 0);
    k = add_entry(out, k, "cls.predictions.transform.LayerNorm.bias", o[HEADLNB], C, 0);
    k = add_entry(out, k, "cls.predictions.bias", o[GENB], V, 0);
    return k;
}

int model_param_table(const ModelConfig *cfg, ParamEntry *out) {
    size_t o[MODEL_NUM_PARAM_TENSORS];
    param_offsets(cfg, o);
    if (cfg->arch == MODEL_ARCH_BERT) return bert_param_table(cfg, o, out);
    int V = cfg->vocab, C = cfg->d_model, F = cfg->d_ff, k = 0;
    char name[96];
    k = add_entry(out, k, "src_embed.linear.weight", o[TOK], V, C);
    static const char *qkv_names[3] = {"query", "key", "value"};
    for (int l = 0; l < cfg->n_layers; l++) {
        size_t lc = (size_t)l * C;
        for (int j = 0; j < 3; j++) {
            snprintf(name, sizeof(name), "encoder.layers.%d.self_attn.%s.linear.weight", l, qkv_names[j]);
            k = add_entry(out, k, name, o[QKVW] + (size_t)l * 3 * C * C + (size_t)j * C * C, C, C);
            snprintf(name, sizeof(name), "encoder.layers.%d.self_attn.%s.linear.bias", l, qkv_names[j]);
            k = add_entry(out, k, name, o[QKVB] + (size_t)l * 3 * C + (size_t)j * C, C, 0);
        }
        snprintf(name, sizeof(name), "encoder.layers.%d.self_attn.output.weight", l);
        k = add_entry(out, k, name, o[OUTW] + (size_t)l * C * C, C, C);
        snprintf(name, sizeof(name), "encoder.layers.%d.self_attn.output.bias", l);
        k = add_entry(out, k, name, o[OUTB] + lc, C, 0);
        snprintf(name, sizeof(name), "encoder.layers.%d.feed_forward.layer1.weight", l);
        k = add_entry(out, k, name, o[FF1W] + (size_t)l * F * C, F, C);
        snprintf(name, sizeof(name), "encoder.layers.%d.feed_forward.layer1.bias", l);
        k = add_entry(out, k, name, o[FF1B] + (size_t)l * F, F, 0);
        snprintf(name, sizeof(name), "encoder.layers.%d.feed_forward.layer2.weight", l);
        k = add_entry(out, k, name, o[FF2W] + (size_t)l * C * F, C, F);
        snprintf(name, sizeof(name), "encoder.layers.%d.feed_forward.layer2.bias", l);
        k = add_entry(out, k, name, o[FF2B] + lc, C, 0);
        snprintf(name, sizeof(name), "encoder.layers.%d.norm_self_attn.weight", l);
        k = add_entry(out, k, name, o[LN1W] + lc, C, 0);
        snprintf(name, sizeof(name), "encoder.layers.%d.norm_self_attn.bias", l);
        k = add_entry(out, k, name, o[LN1B] + lc, C, 0);
        snprintf(name, sizeof(name), "encoder.layers.%d.norm_ff.weight", l);
        k = add_entry(out, k, name, o[LN2W] + lc, C, 0);
        snprintf(name, sizeof(name), "encoder.layers.%d.norm_ff.bias", l);
        k = add_entry(out, k, name, o[LN2B] + lc, C, 0);
    }
    k = add_entry(out, k, "encoder.norm.weight", o[LNFW], C, 0);
    k = add_entry(out, k, "encoder.norm.bias", o[LNFB], C, 0);
    k = add_entry(out, k, "generator.projection.weight", o[GENW], V, C);
    k = add_entry(out, k, "generator.projection.bias", o[GENB], V, 0);
    return k;
}

int model_pe_buffer_rows(const ModelConfig *cfg) { return MLM_MAX(MODEL_PE_BUFFER_MAX_LEN, cfg->max_seq); }

// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from n uniforms in (0, 1].
static void fill_uniform_fan_in(Rng *rng, uint64_t *offset, float *dst, size_t n, int fan_in) {
    float bound = 1.0f / sqrtf((float)fan_in);
    rng_uniform(rng, *offset, dst, n);
    *offset += n;
    for (size_t i = 0; i < n; i++) dst[i] = (2.0f * dst[i] - 1.0f) * bound;
}

static void fill_const(float *dst, size_t n, float value) {
    for (size_t i = 0; i < n; i++) dst[i] = value;
}

static void labml_init_params(const ModelConfig *cfg, float *params, uint64_t user_seed, int copy_layers) {
    ParamTensors p;
    model_param_views(cfg, params, &p);
    Rng rng;
    rng_init(&rng, user_seed, RNG_DOMAIN_INIT);
    size_t V = cfg->vocab, C = cfg->d_model, F = cfg->d_ff, L = cfg->n_layers;
    uint64_t off = 0;
    // Even counts keep every draw on a Box-Muller pair boundary.
    rng_normal(&rng, off, p.tok_emb, V * C, 0.0f, 1.0f);
    off += (V * C + 1) & ~(size_t)1;
    size_t init_layers = copy_layers ? 1 : L;
    for (size_t l = 0; l < init_layers; l++) {
        fill_uniform_fan_in(&rng, &off, p.qkv_w + l * 3 * C * C, 3 * C * C, (int)C);
        fill_uniform_fan_in(&rng, &off, p.qkv_b + l * 3 * C, 3 * C, (int)C);
        fill_uniform_fan_in(&rng, &off, p.out_w + l * C * C, C * C, (int)C);
        fill_uniform_fan_in(&rng, &off, p.out_b + l * C, C, (int)C);
        fill_uniform_fan_in(&rng, &off, p.ff1_w + l * F * C, F * C, (int)C);
        fill_uniform_fan_in(&rng, &off, p.ff1_b + l * F, F, (int)C);
        fill_uniform_fan_in(&rng, &off, p.ff2_w + l * C * F, C * F, (int)F);
        fill_uniform_fan_in(&rng, &off, p.ff2_b + l * C, C, (int)F);
    }
    for (size_t l = init_layers; l < L; l++) {  // deep copies of the template layer
        memcpy(p.qkv_w + l * 3 * C * C, p.qkv_w, 3 * C * C * sizeof(float));
        memcpy(p.qkv_b + l * 3 * C, p.qkv_b, 3 * C * sizeof(float));
        memcpy(p.out_w + l * C * C, p.out_w, C * C * sizeof(float));
        memcpy(p.out_b + l * C, p.out_b, C * sizeof(float));
        memcpy(p.ff1_w + l * F * C, p.ff1_w, F * C * sizeof(float));
        memcpy(p.ff1_b + l * F, p.ff1_b, F * sizeof(float));
        memcpy(p.ff2_w + l * C * F, p.ff2_w, C * F * sizeof(float));
        memcpy(p.ff2_b + l * C, p.ff2_b, C * sizeof(float));
    }
    fill_const(p.ln1_w, L * C, 1.0f);
    fill_const(p.ln1_b, L * C, 0.0f);
    fill_const(p.ln2_w, L * C, 1.0f);
    fill_const(p.ln2_b, L * C, 0.0f);
    fill_const(p.lnf_w, C, 1.0f);
    fill_const(p.lnf_b, C, 0.0f);
    fill_uniform_fan_in(&rng, &off, p.gen_w, V * C, (int)C);
    fill_uniform_fan_in(&rng, &off, p.gen_b, V, (int)C);
    rng_free(&rng);
}

// n normals N(0, std) from the stream at *offset; the offset advances by n rounded up to even, which keeps every
// draw on a Box-Muller pair boundary.
static void fill_normal(Rng *rng, uint64_t *offset, float *dst, size_t n, float std) {
    rng_normal(rng, *offset, dst, n, 0.0f, std);
    *offset += (n + 1) & ~(size_t)1;
}

// transformers' BertPreTrainedModel._init_weights: Linear and Embedding weights N(0, initializer_range), biases
// (cls.predictions.bias included) 0, LayerNorm weight 1 and bias 0, the padding_idx row of the word embeddings 0.
static void bert_init_params(const ModelConfig *cfg, float *params, uint64_t user_seed, int copy_layers) {
    ParamTensors p;
    model_param_views(cfg, params, &p);
    memset(params, 0, model_num_params(cfg) * sizeof(float));  // every bias, and the [PAD] row below
    Rng rng;
    rng_init(&rng, user_seed, RNG_DOMAIN_INIT);
    size_t V = cfg->vocab, C = cfg->d_model, F = cfg->d_ff, L = cfg->n_layers;
    float sd = cfg->init_std;
    uint64_t off = 0;
    fill_normal(&rng, &off, p.tok_emb, V * C, sd);
    if (cfg->pad_id >= 0 && (size_t)cfg->pad_id < V) memset(p.tok_emb + (size_t)cfg->pad_id * C, 0, C * sizeof(float));
    fill_normal(&rng, &off, p.pos_emb, (size_t)cfg->max_positions * C, sd);
    fill_normal(&rng, &off, p.type_emb, (size_t)cfg->type_vocab * C, sd);
    size_t init_layers = copy_layers ? 1 : L;
    for (size_t l = 0; l < init_layers; l++) {
        fill_normal(&rng, &off, p.qkv_w + l * 3 * C * C, 3 * C * C, sd);
        fill_normal(&rng, &off, p.out_w + l * C * C, C * C, sd);
        fill_normal(&rng, &off, p.ff1_w + l * F * C, F * C, sd);
        fill_normal(&rng, &off, p.ff2_w + l * C * F, C * F, sd);
    }
    for (size_t l = init_layers; l < L; l++) {  // copies of the template layer (model.init = copy)
        memcpy(p.qkv_w + l * 3 * C * C, p.qkv_w, 3 * C * C * sizeof(float));
        memcpy(p.out_w + l * C * C, p.out_w, C * C * sizeof(float));
        memcpy(p.ff1_w + l * F * C, p.ff1_w, F * C * sizeof(float));
        memcpy(p.ff2_w + l * C * F, p.ff2_w, C * F * sizeof(float));
    }
    fill_normal(&rng, &off, p.head_w, C * C, sd);
    fill_const(p.emb_ln_w, C, 1.0f);
    fill_const(p.ln1_w, L * C, 1.0f);
    fill_const(p.ln2_w, L * C, 1.0f);
    fill_const(p.head_ln_w, C, 1.0f);
    rng_free(&rng);
}

void model_init_params(const ModelConfig *cfg, float *params, uint64_t user_seed, int copy_layers) {
    if (cfg->arch == MODEL_ARCH_BERT) bert_init_params(cfg, params, user_seed, copy_layers);
    else labml_init_params(cfg, params, user_seed, copy_layers);
}

void model_decay_mask(const ModelConfig *cfg, uint8_t *mask) {
    memset(mask, 0, model_num_params(cfg));
    int n = model_param_table(cfg, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n * sizeof(ParamEntry), "parameter table");
    model_param_table(cfg, tab);
    for (int i = 0; i < n; i++)
        if (tab[i].is_matrix) memset(mask + tab[i].offset, 1, (size_t)tab[i].shape[0] * tab[i].shape[1]);
    free(tab);
    if (cfg->arch == MODEL_ARCH_BERT && cfg->pad_id >= 0 && cfg->pad_id < cfg->vocab)
        memset(mask + (size_t)cfg->pad_id * cfg->d_model, 0, (size_t)cfg->d_model);  // tok_emb is first
}

RngLayout model_rng_layout(const ModelConfig *c, int B) {
    if (c->arch != MODEL_ARCH_BERT) return rng_layout(B, c->max_seq, c->d_model, c->n_heads, c->d_ff, c->n_layers);
    uint64_t btc = (uint64_t)B * (uint64_t)c->max_seq * (uint64_t)c->d_model;
    return rng_layout_sites(B, c->max_seq, c->d_model, c->n_heads, 0, btc, c->n_layers);
}

int model_config_check(const ModelConfig *c, char *err, size_t errlen) {
    if (c->vocab < 3) { snprintf(err, errlen, "vocabulary of %d tokens is too small (need at least 1 character + PAD + MASK)", c->vocab); return 1; }
    if (c->arch != MODEL_ARCH_LABML && c->arch != MODEL_ARCH_BERT) { snprintf(err, errlen, "model.arch = %d is neither labml (0) nor bert (1)", c->arch); return 1; }
    int bert = c->arch == MODEL_ARCH_BERT;
    if (!bert && (c->d_model < 2 || c->d_model % 2)) { snprintf(err, errlen, "model.d_model = %d must be even and >= 2 (sinusoidal positions pair features)", c->d_model); return 1; }
    if (bert && c->d_model < 1) { snprintf(err, errlen, "model.d_model = %d must be >= 1", c->d_model); return 1; }
    if (c->n_heads < 1 || c->d_model % c->n_heads) { snprintf(err, errlen, "model.d_model = %d is not divisible by model.n_heads = %d", c->d_model, c->n_heads); return 1; }
    if (c->n_layers < 1) { snprintf(err, errlen, "model.n_layers = %d must be >= 1", c->n_layers); return 1; }
    if (c->d_ff < 1) { snprintf(err, errlen, "model.d_ff = %d must be >= 1", c->d_ff); return 1; }
    if (c->max_seq < 1) { snprintf(err, errlen, "data.seq_len = %d must be >= 1", c->max_seq); return 1; }
    if (!(c->dropout >= 0.0f && c->dropout < 1.0f)) { snprintf(err, errlen, "model.dropout = %g must be in [0, 1)", c->dropout); return 1; }
    if (!(c->ln_eps > 0.0f)) { snprintf(err, errlen, "model.ln_eps = %g must be > 0", c->ln_eps); return 1; }
    if (!bert) return 0;
    if (c->max_positions < c->max_seq) { snprintf(err, errlen, "data.seq_len = %d exceeds model.max_positions = %d (the learned position table has one row per position); lower data.seq_len or raise model.max_positions", c->max_seq, c->max_positions); return 1; }
    if (c->type_vocab < 1) { snprintf(err, errlen, "model.type_vocab_size = %d must be >= 1 (every position is token type 0)", c->type_vocab); return 1; }
    if (!(c->init_std > 0.0f)) { snprintf(err, errlen, "model.init_std = %g must be > 0", c->init_std); return 1; }
    if (c->pad_id < 0 || c->pad_id >= c->vocab) { snprintf(err, errlen, "the [PAD] id %d is outside the vocabulary [0, %d)", c->pad_id, c->vocab); return 1; }
    return 0;
}

void model_positional_encoding(int T, int C, float *pe) {
    for (int p = 0; p < T; p++) {
        for (int i = 0; i < C; i += 2) {
            // As the reference: div_term = exp(arange(0, C, 2) * -(ln(10000) / C)), computed in float32.
            float div = expf((float)i * -(logf(10000.0f) / (float)C));
            float angle = (float)p * div;
            pe[(size_t)p * C + i] = sinf(angle);
            if (i + 1 < C) pe[(size_t)p * C + i + 1] = cosf(angle);
        }
    }
}

double model_train_flops(const ModelConfig *c, int B, int T) {
    double BT = (double)B * T, C = c->d_model, F = c->d_ff, V = c->vocab, L = c->n_layers;
    // Forward matmuls per token: QKV 3C*C, output C*C, FFN 2*C*F, generator C*V (2 flops per MAC);
    // attention: QK^T and PV, 2 * T * C MACs per token per layer.
    double fwd = 2.0 * BT * (L * (4.0 * C * C + 2.0 * C * F + 2.0 * T * C) + C * V);
    if (c->arch == MODEL_ARCH_BERT) fwd += 2.0 * BT * C * C;  // the head's transform
    return 3.0 * fwd;  // backward costs twice the forward
}

ModelConfig model_config_from(const Config *c, int vocab_size, int pad_id) {
    ModelConfig m = {.vocab = vocab_size, .d_model = c->d_model, .n_heads = c->n_heads, .n_layers = c->n_layers,
                     .d_ff = c->d_ff, .max_seq = c->seq_len, .dropout = (float)c->dropout, .ln_eps = (float)c->ln_eps,
                     .arch = c->arch, .max_positions = c->max_positions, .type_vocab = c->type_vocab_size,
                     .init_std = (float)c->init_std, .pad_id = pad_id};
    return m;
}

// Bytes of the CPU model's parameters, gradients and activations for a batch of B (the layout of
// cpu_model.c's carve_acts, rounded up), in double so that absurd configurations cannot wrap around.
double model_bytes(const ModelConfig *m, int B) {
    double BT = (double)B * m->max_seq, C = m->d_model, H = m->n_heads, T = m->max_seq, F = m->d_ff, V = m->vocab;
    double L = m->n_layers, P = (double)model_num_params(m);
    // Per layer and position: 9C (8.5 rounded up), the attention's log-sum-exp per head (the tiled attention stores
    // nothing of size T x T), F, 4 statistics.
    double acts = L * BT * (9 * C + H + F + 4) + BT * (2 * V + 10 * C + 2 * F + 3) + T * C;
    // arch = bert: GELU's inputs per layer, the embedding sum, its statistics and dropout mask, the head's two
    // transform tensors, the key mask and a second residual gradient.
    if (m->arch == MODEL_ARCH_BERT) acts += L * BT * F + BT * (4.5 * C + 3);
    return 4 * (2 * P + acts) + 64.0 * 36 * (L + 2);
}
