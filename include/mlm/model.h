// model.h: the transformer MLM's hyper-parameters, its parameter layout and the PyTorch name table, for the two
// architectures: labml's pre-LN TransformerMLM (the reference, the default) and Hugging Face's BertForMaskedLM.
//
// Layout is [B, T, ...] (batch-major, like llm.c); the PyTorch reference is [T, B, ...]. All parameters
// live in one float array in the order of ParamTensors below; per-layer tensors are stacked over layers
// so one pointer covers all L of them. Linear weights are [out, in] as in PyTorch. A tensor the
// architecture does not have is empty (size 0), so labml's layout is exactly what it was before BERT.
#ifndef MLM_MODEL_H
#define MLM_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

// model.arch. labml: x + Drop(Sublayer(LN(x))) layers, a final LayerNorm, sinusoidal positions, ReLU, an untied
// generator. bert: transformers' BertForMaskedLM (modeling_bert.py): word + learned position + token-type
// embeddings, LayerNorm, dropout; post-LN layers LN(x + Drop(Sublayer(x))) with erf GELU; no final LayerNorm; the
// head dense -> GELU -> LayerNorm, then a decoder tied to the word embeddings plus its own bias; [PAD] keys
// masked out of attention.
typedef enum { MODEL_ARCH_LABML = 0, MODEL_ARCH_BERT = 1 } ModelArch;

typedef struct {
    int vocab;      // V: n_tokens = characters + [PAD] + [MASK] (67 for Tiny Shakespeare)
    int d_model;    // C
    int n_heads;    // H (head size C / H)
    int n_layers;   // L
    int d_ff;       // F
    int max_seq;    // T: longest sequence the positional table covers (= data.seq_len)
    float dropout;  // p at the four sites of each layer
    float ln_eps;   // LayerNorm epsilon (1e-5; BERT's layer_norm_eps 1e-12)
    // arch = bert only (the fields after ln_eps are zero for labml, so older initializers stay valid):
    int arch;             // ModelArch
    int max_positions;    // P: rows of the learned position table (BertConfig.max_position_embeddings >= T)
    int type_vocab;       // token types (type_vocab_size); every position is type 0 in MLM training
    float init_std;       // initializer_range: N(0, init_std) for every weight and embedding
    int pad_id;           // the [PAD] token: its word-embedding row starts at zero and never changes
} ModelConfig;

// Views into the single parameter (or gradient, or Adam moment) allocation. Names: labml's state_dict, then
// (bert: ...) transformers' BertForMaskedLM names, which are also the names mlm's checkpoints and exports use for
// that architecture (model_param_table), so an export to transformers is a copy.
typedef struct {
    float *tok_emb;  // [V, C]   src_embed.linear.weight (bert: bert.embeddings.word_embeddings.weight)
    float *pos_emb;  // [P, C]   bert: bert.embeddings.position_embeddings.weight (labml: empty)
    float *type_emb; // [TV, C]  bert: bert.embeddings.token_type_embeddings.weight (labml: empty)
    float *emb_ln_w; // [C]      bert: bert.embeddings.LayerNorm.weight (labml: empty)
    float *emb_ln_b; // [C]      bert: bert.embeddings.LayerNorm.bias (labml: empty)
    // Per layer. bert: qkv = attention.self.{query,key,value}, out = attention.output.dense, ln1 =
    // attention.output.LayerNorm (after the attention residual), ff1 = intermediate.dense, ff2 = output.dense,
    // ln2 = output.LayerNorm (after the FFN residual), each under bert.encoder.layer.i.
    float *ln1_w;    // [L, C]   encoder.layers.i.norm_self_attn.weight
    float *ln1_b;    // [L, C]   encoder.layers.i.norm_self_attn.bias
    float *qkv_w;    // [L, 3C, C] rows 0..C-1 query, C..2C-1 key, 2C..3C-1 value (.linear.weight)
    float *qkv_b;    // [L, 3C]  query/key/value .linear.bias
    float *out_w;    // [L, C, C] encoder.layers.i.self_attn.output.weight
    float *out_b;    // [L, C]
    float *ln2_w;    // [L, C]   encoder.layers.i.norm_ff.weight
    float *ln2_b;    // [L, C]
    float *ff1_w;    // [L, F, C] encoder.layers.i.feed_forward.layer1.weight
    float *ff1_b;    // [L, F]
    float *ff2_w;    // [L, C, F] encoder.layers.i.feed_forward.layer2.weight
    float *ff2_b;    // [L, C]
    float *lnf_w;    // [C]      encoder.norm.weight (bert: empty, no final encoder LayerNorm)
    float *lnf_b;    // [C]
    float *head_w;   // [C, C]   bert: cls.predictions.transform.dense.weight (labml: empty)
    float *head_b;   // [C]      bert: cls.predictions.transform.dense.bias
    float *head_ln_w;// [C]      bert: cls.predictions.transform.LayerNorm.weight
    float *head_ln_b;// [C]      bert: cls.predictions.transform.LayerNorm.bias
    float *gen_w;    // [V, C]   generator.projection.weight (bert: empty; the view is tok_emb, the tied decoder)
    float *gen_b;    // [V]      generator.projection.bias (bert: cls.predictions.bias)
} ParamTensors;

#define MODEL_NUM_PARAM_TENSORS 25

// Number of floats of each ParamTensors field, in field order (0 where the architecture lacks the tensor).
void model_tensor_sizes(const ModelConfig *cfg, size_t sizes[MODEL_NUM_PARAM_TENSORS]);

// Total number of floats in the parameter array (812,355 for the reference configuration).
size_t model_num_params(const ModelConfig *cfg);
// Point every field of `out` into `base` (which holds model_num_params floats).
void model_param_views(const ModelConfig *cfg, float *base, ParamTensors *out);

// One PyTorch state_dict tensor: its name, where it starts in the parameter array, and its shape.
typedef struct {
    char name[96];
    size_t offset;   // in floats, from the start of the parameter array
    int ndim;        // 1 or 2
    int shape[2];    // PyTorch shape ([out, in] for Linear weights)
    int is_matrix;   // 2-D weight (receives weight decay under AdamW)
} ParamEntry;

// Fill `out` (if not NULL) with every state_dict tensor, in a fixed order; return how many there are
// (labml: 2 + 16 * L + 4 entries; bert: 5 + 16 * L + 5, transformers' names). The entries tile the parameter
// array exactly.
int model_param_table(const ModelConfig *cfg, ParamEntry *out);

// The one persistent buffer of the reference's state_dict: labml_nn's EmbeddingsWithPositionalEncoding
// registers its fixed sinusoid table as `src_embed.positional_encodings`, float32 [max_len, 1, d_model] with
// max_len = 5000, so PyTorch's state_dict() holds it and load_state_dict(strict=True) requires it. It is not
// a parameter (never trained, not in the parameter array): `mlm export` writes it (rows as
// model_positional_encoding computes them) and a loader of weights accepts it beside the parameters.
#define MODEL_PE_BUFFER_NAME "src_embed.positional_encodings"
#define MODEL_PE_BUFFER_MAX_LEN 5000
// Rows of that buffer: labml's 5000, or seq_len if longer (labml itself could not run such a model).
int model_pe_buffer_rows(const ModelConfig *cfg);

// Initialisation from the INIT Philox stream. labml: PyTorch's defaults: Embedding N(0,1); Linear weight and
// bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)); LayerNorm weight 1, bias 0. bert: transformers' _init_weights:
// every weight and embedding N(0, init_std), biases 0, LayerNorm weight 1, the [PAD] row of the word
// embeddings 0. With `copy_layers` every layer starts as a copy of layer 0 (the reference deep-copies one
// template layer).
void model_init_params(const ModelConfig *cfg, float *params, uint64_t user_seed, int copy_layers);

// The model a run configuration describes ([model], data.seq_len) over a vocabulary of vocab_size tokens whose
// [PAD] is pad_id (bert masks [PAD] keys and freezes its row): what train, eval, fill, info and checkpoints build
// and check.
struct Config;
ModelConfig model_config_from(const struct Config *c, int vocab_size, int pad_id);
// Validate hyper-parameters; on failure write a message naming the offending setting into `err`.
int model_config_check(const ModelConfig *cfg, char *err, size_t errlen);
// Bytes of the CPU model's parameters, gradients and activations for a batch of B (also `mlm train --dry-run`).
double model_bytes(const ModelConfig *m, int B);

// Where AdamW decays: mask[P] = 1 on every 2-D weight (ParamEntry.is_matrix), except, for bert, the [PAD] row of
// the word embeddings, which is frozen (its gradient is zeroed too, see cpu_model_backward).
void model_decay_mask(const ModelConfig *cfg, uint8_t *mask);

// The offsets of one step's random draws for batches of up to B (rng.h): labml's four dropout sites per layer;
// bert's embedding dropout (DROP_EMBED) before the layers and no FFN-hidden site.
RngLayout model_rng_layout(const ModelConfig *cfg, int B);

// Sinusoidal positional encodings, pe[T, C]: pe[p, 2i] = sin(p * exp(-2i ln(10000) / C)), pe[p, 2i+1] = cos(...).
void model_positional_encoding(int T, int C, float *pe);

// Floating-point operations of one training step (forward + backward, matmuls and attention products)
// for B sequences of length T; used for GFLOP/s and MFU reports.
double model_train_flops(const ModelConfig *cfg, int B, int T);

#ifdef __cplusplus
}
#endif

#endif
