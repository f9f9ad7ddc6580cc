// weights.h: model weights as safetensors under the reference's PyTorch state_dict names and shapes.
#ifndef MLM_WEIGHTS_H
#define MLM_WEIGHTS_H

#include <stddef.h>

#include "mlm/data.h"
#include "mlm/model.h"

#ifdef __cplusplus
extern "C" {
#endif

// Write every tensor of the reference's state_dict (float32, PyTorch names and shapes: the parameters and
// labml_nn's positional-encoding buffer MODEL_PE_BUFFER_NAME) plus metadata describing the model
// (d_model, n_heads, n_layers, d_ff, seq_len and the vocabulary: "vocab" as UTF-8 text and "vocab_codepoints"
// as comma-separated code points) atomically. A byte or WordPiece vocabulary is described instead by "tokenizer"
// (byte|wordpiece), "vocab_size", "pad_id", "mask_id", "unk_id", "cls_id", "sep_id" (-1: none), "vocab_md5",
// "vocab_codepoints" (its "KIND:N:specials:MD5" form, which --init checks) and, for WordPiece, "vocab_wordpiece"
// (the vocab.txt itself, vocab_text: required) and "lowercase" (true|false); vocab_text is ignored otherwise.
int weights_save(const char *path, const ModelConfig *mc, const Vocab *v, const char *vocab_text, int lowercase,
                 const float *params, char *err, size_t errlen);
// THE way weights enter a model (`mlm train --init`): load every parameter tensor of `mc` from a safetensors
// file with PyTorch names (as `mlm export` or torch's safetensors.save_file write) into params[P]. Refuses,
// listing every mismatch, unless the file holds exactly the model's tensors with its shapes in float32 (the
// positional-encoding buffer of a labml_nn state_dict is allowed and ignored); then, when check_vocab is not
// NULL, unless the vocabulary recorded in the file equals it (a file without one is accepted with a warning);
// then unless every value is finite. params is written only on success. A directory is a transformers model
// (model.arch = bert): hf_import (hf_bert.h).
int weights_load(const char *path, const ModelConfig *mc, const Vocab *check_vocab, float *params, char *err,
                 size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
