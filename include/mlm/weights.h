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
// (d_model, n_heads, n_layers, d_ff, vocab size, seq_len and the vocabulary) atomically.
int weights_save(const char *path, const ModelConfig *mc, const Vocab *v, const float *params, char *err, size_t errlen);
// Load every parameter tensor of `mc` from a safetensors file with PyTorch names (as `mlm export` or
// torch's safetensors.save_file write). Fails, naming the tensor, on a missing tensor or a shape mismatch.
int weights_load(const char *path, const ModelConfig *mc, float *params, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
