// mask.c: BERT-style masking of a token batch on the host (the reference scheme and the BERT scheme).
#include "mlm/mask.h"

#include "mask_rule.h"
#include "mlm/wordpiece.h"

void mask_apply(const MaskConfig *c, const int *tokens, size_t n, const float *u, int *inputs, int *labels) {
    MaskRule r = mask_rule_from_config(c);
    for (size_t i = 0; i < n; i++)
        mask_one(&r, tokens[i], u[mask_word_start(&r, tokens, i)], u[n + i], u[2 * n + i], u[3 * n + i], &inputs[i],
                 &labels[i]);
}

void mask_wordpiece_continuation(const WordPiece *wp, unsigned char *flags) {
    for (size_t i = 0; i < wp_vocab_size(wp); i++) {
        const char *t = wp_token(wp, (int32_t)i);
        flags[i] = t[0] == '#' && t[1] == '#';
    }
}
