// hf_bert.h: model.arch = bert checkpoints to and from a Hugging Face transformers directory (BertForMaskedLM).
#ifndef MLM_HF_BERT_H
#define MLM_HF_BERT_H

#include <stddef.h>

#include "mlm/data.h"
#include "mlm/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// What an export records besides the tensors: the tokenizer (a WordPiece vocab.txt and its lower-casing).
typedef struct {
    const char *vocab_text;  // the vocab.txt itself
    int lowercase;
    const Vocab *vocab;      // its special ids
} HfTokenizer;

// `mlm export --format hf`: write DIR (created; it must not exist or be empty) with config.json (every BertConfig
// field, architectures ["BertForMaskedLM"]), model.safetensors (metadata {"format": "pt"}, transformers' names, the
// tied decoder not written), vocab.txt, tokenizer_config.json (do_lower_case, model_max_length) and
// special_tokens_map.json, each written atomically. Returns 0, or 1 with a message.
int hf_export(const char *dir, const ModelConfig *mc, const float *params, const HfTokenizer *tok, char *err,
              size_t errlen);

// `mlm train --init DIR`: load a transformers BERT directory into params[P] (already initialised by
// model_init_params, so a missing MLM head stays as transformers initialises one). Accepts BertForMaskedLM,
// BertForPreTraining and BertModel checkpoints: keys with or without the "bert." prefix, legacy LayerNorm
// gamma/beta names; the pooler, the next-sentence head and the position_ids buffer are ignored (listed on one
// line on stderr), a saved tied decoder must equal the word embeddings. Refuses, listing every mismatch with the
// --set that fixes it, unless config.json agrees with mc (and, when check_vocab is not NULL, vocab.txt has the md5
// of that WordPiece vocabulary and pad_token_id its [PAD]). params is written only on success.
int hf_import(const char *dir, const ModelConfig *mc, const Vocab *check_vocab, float *params, char *err,
              size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
