// mask.c: BERT-style masking of a token batch on the host (the reference scheme and the BERT scheme).
#include "mlm/mask.h"

#include "mask_rule.h"

void mask_apply(const MaskConfig *c, const int *tokens, size_t n, const float *u, int *inputs, int *labels) {
    MaskRule r = mask_rule_from_config(c);
    for (size_t i = 0; i < n; i++)
        mask_one(&r, tokens[i], u[i], u[n + i], u[2 * n + i], u[3 * n + i], &inputs[i], &labels[i]);
}
