// fixture_util.h: reading the PyTorch reference fixture (safetensors) in the tests: tensors as doubles,
// metadata numbers, and state_dict tensors gathered into mlm's parameter layout.
#ifndef MLM_FIXTURE_UTIL_H
#define MLM_FIXTURE_UTIL_H

#include <stddef.h>

#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/safetensors.h"

// Element count of a tensor.
size_t fixture_numel(const StTensor *t);
// Elements of a parameter table entry.
size_t fixture_entry_numel(const ParamEntry *e);
// The attention key bias (labml's or BERT's): its gradient is zero in exact arithmetic (softmax ignores a constant shift of the
// scores), so tests compare it against the model's largest gradient instead of its own.
int fixture_is_key_bias(const char *name);
// The fixture tests' error measure: max|a - b| / max|b| over n elements (the absolute error when max|b| is
// 0); a NaN difference counts as infinite.
double fixture_rel_err(const float *a, const double *b, size_t n);
double fixture_max_abs(const double *b, size_t n);
// Per parameter tensor of c, max |a - b| / max |b| (the key bias: / the largest |b| of the model); returns the worst
// and writes its tensor's name into name[96] (the CUDA tests' gradient comparisons).
double fixture_worst_tensor_err(const ModelConfig *c, const float *a, const float *b, char *name);
// Fetch a floating tensor (F32 or F64) as doubles (malloc'ed); a failed CHECK and NULL if it is missing or
// has the wrong size. `path` names the file in messages.
double *fixture_floats(const StFile *fx, const char *path, const char *name, size_t n);
int fixture_meta_int(const StFile *fx, const char *key, int fallback);
double fixture_meta_double(const StFile *fx, const char *key, double fallback);
// "<prefix><state_dict name>" for every table entry, shape-checked and gathered into one vector in mlm's
// parameter layout (calloc'ed; entries that fail a CHECK stay 0).
double *fixture_gather(const StFile *fx, const char *path, const ParamEntry *tab, int n_tab, size_t P,
                       const char *prefix);

// The fixture's configuration from its metadata: the model (dropout off), the batch, the PAD id, the number of
// optimizer steps (1..3), the clip norm and the Noam-Adam settings. Nonzero with a message if inconsistent.
typedef struct {
    ModelConfig cfg;
    OptimConfig oc;
    int B, pad, steps;
    float max_norm;
} FixtureConfig;
int fixture_config(const StFile *fx, FixtureConfig *out, char *err, size_t errlen);

#endif
