// mask_rule.h: the per-position masking rule, shared verbatim by the host (mask.c) and CUDA (mask.cu)
// so that both backends mask the same positions given the same uniforms.
#ifndef MLM_MASK_RULE_H
#define MLM_MASK_RULE_H

#include "mlm/mask.h"

#ifdef __CUDACC__
#define MASK_FN __host__ __device__ static inline
#else
#define MASK_FN static inline
#endif

typedef struct {
    int scheme;
    float prob, unchanged_prob, random_prob;
    int n_tokens, n_chars, pad_id, mask_id;
    unsigned long long no_mask_bits[2];  // ids < 128 that are never selected (bitset)
    int no_mask_hi[MASK_MAX_NO_MASK];    // ids >= 128 that are never selected
    int n_no_mask_hi;
    const unsigned char *cont;           // [n_tokens] continuation flags (host or device copy); NULL: no whole words
    int seq_len;                         // tokens per sequence (0: one sequence)
} MaskRule;

MASK_FN MaskRule mask_rule_from_config(const MaskConfig *c) {
    MaskRule r;
    r.scheme = (int)c->scheme;
    r.prob = c->prob;
    r.unchanged_prob = c->unchanged_prob;
    r.random_prob = c->random_prob;
    r.n_tokens = c->n_tokens;
    r.n_chars = c->n_chars;
    r.pad_id = c->pad_id;
    r.mask_id = c->mask_id;
    r.no_mask_bits[0] = r.no_mask_bits[1] = 0;
    r.n_no_mask_hi = 0;
    for (int i = 0; i < c->n_no_mask; i++) {
        int t = c->no_mask[i];
        if (t >= 0 && t < 128) r.no_mask_bits[t >> 6] |= 1ull << (t & 63);
        else r.no_mask_hi[r.n_no_mask_hi++] = t;
    }
    r.cont = c->whole_word ? c->continuation : NULL;  // the CUDA side puts its device copy here
    r.seq_len = c->seq_len;
    return r;
}

MASK_FN int mask_never_selected(const MaskRule *r, int t) {
    if (t == r->pad_id || t == r->mask_id) return 1;
    if (t >= 0 && t < 128) return (int)((r->no_mask_bits[t >> 6] >> (t & 63)) & 1ull);
    for (int i = 0; i < r->n_no_mask_hi; i++)
        if (r->no_mask_hi[i] == t) return 1;
    return 0;
}

MASK_FN int mask_is_continuation(const MaskRule *r, int t) { return t >= 0 && t < r->n_tokens && r->cont[t]; }

// Whole-word masking: the position whose U1 decides position i's selection, the first piece of i's word. Walk
// back over continuation pieces, not past the start of i's sequence; a never-selected token (a special) before
// them is no part of the word, so the pieces after it form their own. Without whole words, i itself.
MASK_FN size_t mask_word_start(const MaskRule *r, const int *tokens, size_t i) {
    if (!r->cont) return i;
    size_t row0 = r->seq_len > 0 ? i - i % (size_t)r->seq_len : 0;
    size_t s = i;
    while (s > row0 && mask_is_continuation(r, tokens[s])) s--;
    if (s < i && !mask_is_continuation(r, tokens[s]) && mask_never_selected(r, tokens[s])) s++;
    return s;
}

// floor(u * n) for u in (0, 1]; u == 1 would give n, which is clamped to n - 1.
MASK_FN int mask_uniform_index(float u, int n) {
    int k = (int)(u * (float)n);
    return k < n ? k : n - 1;
}

// One position: token t and its four uniforms (u1 select, u2 unchanged/branch, u3 random, u4 token).
MASK_FN void mask_one(const MaskRule *r, int t, float u1, float u2, float u3, float u4, int *input, int *label) {
    int selected = u1 < r->prob && !mask_never_selected(r, t);
    *label = selected ? t : r->pad_id;
    *input = t;
    if (!selected) return;
    if (r->scheme == MASK_SCHEME_REFERENCE) {
        // labml: unchanged and random are drawn independently; random wins the input if both are set.
        int unchanged = u2 < r->unchanged_prob;
        int randomise = u3 < r->random_prob;
        if (randomise) *input = mask_uniform_index(u4, r->n_tokens);  // any id, PAD and MASK included
        else if (!unchanged) *input = r->mask_id;
    } else {
        // BERT: one draw splits the selected positions into [MASK] / random character / unchanged.
        float p_mask = 1.0f - r->unchanged_prob - r->random_prob;
        if (u2 < p_mask) *input = r->mask_id;
        else if (u2 < p_mask + r->random_prob) *input = mask_uniform_index(u4, r->n_chars);
    }
}

#endif
