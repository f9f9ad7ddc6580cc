// mask.h: BERT-style masking of a token batch (the reference scheme and the HuggingFace/BERT scheme).
#ifndef MLM_MASK_H
#define MLM_MASK_H

#include <stddef.h>

#include "mlm/config.h"  // MaskScheme, MASK_MAX_NO_MASK: the values of mask.scheme and the size of mask.no_mask

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    MaskScheme scheme;
    float prob;            // selection probability (0.15)
    float unchanged_prob;  // reference: independent P(keep original); BERT: conditional share kept
    float random_prob;     // reference: independent P(random token); BERT: conditional share randomised
    int n_tokens;          // V (67)
    int n_chars;           // real characters, ids [0, n_chars) (65)
    int pad_id, mask_id;   // V - 2, V - 1
    int no_mask[MASK_MAX_NO_MASK];  // token ids never selected (besides PAD and MASK)
    int n_no_mask;
    // Whole-word masking (WordPiece): a word is a token that does not continue one, with the continuation
    // pieces ("##...") that follow it; all its pieces are selected together, by the U1 of its first piece
    // (BERT's whole-word release, Hugging Face's DataCollatorForWholeWordMask). Words never span two sequences
    // of seq_len tokens, and a continuation after a never-selected token (a special) starts a word of its own.
    int whole_word;                      // 0: every position draws its own selection (the default)
    const unsigned char *continuation;   // [n_tokens] 1 where the token continues a word; NULL: every token is a word
    int seq_len;                         // tokens per sequence in the batch (0: the n tokens are one sequence)
} MaskConfig;

// Apply masking to n tokens using uniforms u[4 * n] (U1 = u[0..n), U2 = u[n..2n), U3 = u[2n..3n),
// U4 = u[3n..4n)). Writes the model input and the labels (original token where selected, PAD elsewhere).
//
// With whole_word, a position's U1 is the U1 of its word's first piece (mask_word_start); U2..U4 stay its own.
//
// Reference scheme (labml): full = U1 < prob and token not PAD/MASK/no_mask; unchanged = full & U2 <
// unchanged_prob; random = full & U3 < random_prob; [MASK] where full & !random & !unchanged; random
// positions get floor(U4 * n_tokens) (any id, PAD and MASK included).
// BERT scheme: full as above; then U2 < 1 - unchanged_prob - random_prob -> [MASK]; else
// U2 < 1 - unchanged_prob -> random character floor(U4 * n_chars); else unchanged. U3 is unused.
void mask_apply(const MaskConfig *c, const int *tokens, size_t n, const float *u, int *inputs, int *labels);

// Whole-word masking's continuation flags of a WordPiece vocabulary: flags[id] = 1 where the token starts with
// "##" (as Hugging Face's whole-word collator decides), for id < wp_vocab_size(wp).
struct WordPiece;
void mask_wordpiece_continuation(const struct WordPiece *wp, unsigned char *flags);

#ifdef __cplusplus
}
#endif

#endif
