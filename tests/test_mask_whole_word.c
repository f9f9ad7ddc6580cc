// test_mask_whole_word.c: whole-word masking on the host (mask_apply with whole_word) against the test's own
// word split: batches of BERT-like sequences ([CLS] words of 1-4 WordPiece pieces [SEP] [PAD]..., some rows
// starting inside a word); every word is selected or not as a whole, exactly when its first piece's U1 < prob;
// specials and padding never; the word selection rate within binomial bounds of prob; the replacement split per
// piece (80/10/10 of the BERT scheme) within bounds too; with whole_word off the rule is the per-token one.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/mask.h"
#include "mlm/rng.h"
#include "test_util.h"

#define Z 5.0  // standard deviations allowed (fails a correct implementation with probability < 1e-6 per check)

// Vocabulary: 0..4 the specials, 5..59 word starts, 60..99 continuation pieces ("##...").
enum { PAD = 0, UNK = 1, CLS = 2, SEP = 3, MASKID = 4, FIRST_START = 5, FIRST_CONT = 60, V = 100 };
enum { B = 32, T = 64, N = B * T, BATCHES = 200 };

static int within(double observed, double p, double n, const char *what) {
    double sd = sqrt(p * (1.0 - p) / n);
    int ok = fabs(observed - p) <= Z * sd;
    printf("  %-40s observed %.5f expected %.5f (n = %.0f, %.2f sd)\n", what, observed, p, n, fabs(observed - p) / sd);
    return ok;
}

// One row: [CLS]? then words of 1..4 pieces until the row is (nearly) full, [SEP], [PAD]s. Rows without [CLS]
// start with a continuation piece or two (a word cut by the sequence start, as random offsets make them).
static void make_row(Rng *r, uint64_t at, int *row) {
    uint32_t x[4 * T];
    rng_u32(r, at, x, 4 * T);
    int k = 0, j = 0;
    int with_cls = x[j++] % 4 != 0;
    if (with_cls) row[k++] = CLS;
    else
        for (int c = 0; c < 1 + (int)(x[j++] % 2); c++) row[k++] = FIRST_CONT + (int)(x[j++] % (V - FIRST_CONT));
    int len = T - 1 - (int)(x[j++] % 12);  // leave room for [SEP] and some padding
    while (k < len) {
        int pieces = 1 + (int)(x[j++] % 4);
        if (x[j++] % 50 == 0) row[k++] = UNK;  // an [UNK] word now and then (selectable, like any word)
        else row[k++] = FIRST_START + (int)(x[j++] % (FIRST_CONT - FIRST_START));
        for (int p = 1; p < pieces && k < len; p++) row[k++] = FIRST_CONT + (int)(x[j++] % (V - FIRST_CONT));
    }
    row[k++] = SEP;
    while (k < T) row[k++] = PAD;
}

static MaskConfig make_config(const unsigned char *cont) {
    MaskConfig c;
    memset(&c, 0, sizeof(c));
    c.scheme = MASK_SCHEME_BERT;
    c.prob = 0.15f;
    c.unchanged_prob = 0.1f;
    c.random_prob = 0.1f;
    c.n_tokens = V;
    c.n_chars = V;
    c.pad_id = PAD;
    c.mask_id = MASKID;
    c.no_mask[0] = CLS;
    c.no_mask[1] = SEP;
    c.n_no_mask = 2;
    c.whole_word = 1;
    c.continuation = cont;
    c.seq_len = T;
    return c;
}

static int is_special(int t) { return t == PAD || t == CLS || t == SEP || t == MASKID; }

int main(void) {
    unsigned char cont[V];
    for (int i = 0; i < V; i++) cont[i] = i >= FIRST_CONT;
    MaskConfig mc = make_config(cont);
    Rng rng, tokrng;
    rng_init(&rng, 11, RNG_DOMAIN_TRAIN);
    rng_init(&tokrng, 12, RNG_DOMAIN_DATA);
    int *tok = malloc(N * sizeof(int)), *in = malloc(N * sizeof(int)), *lab = malloc(N * sizeof(int));
    int *in0 = malloc(N * sizeof(int)), *lab0 = malloc(N * sizeof(int));
    float *u = malloc(4 * N * sizeof(float));
    long split_words = 0, wrong_words = 0, special_selected = 0, label_errors = 0, per_token_diff = 0;
    double words = 0, words_selected = 0, multi = 0, multi_selected = 0, pieces_selected = 0, as_mask = 0;
    for (int bi = 0; bi < BATCHES; bi++) {
        for (int b = 0; b < B; b++) make_row(&tokrng, ((uint64_t)bi * B + b) * 4 * T, tok + b * T);
        rng_uniform(&rng, (uint64_t)bi * 4 * N, u, 4 * N);
        mask_apply(&mc, tok, N, u, in, lab);
        for (int b = 0; b < B; b++) {
            const int *t = tok + b * T;
            const int *l = lab + b * T;
            for (int i = 0; i < T;) {
                if (is_special(t[i])) {  // specials: never selected, input unchanged
                    special_selected += l[i] != PAD;
                    label_errors += in[b * T + i] != t[i];
                    i++;
                    continue;
                }
                // The test's own word: this token and the continuation pieces after it, within the row.
                int e = i + 1;
                while (e < T && cont[t[e]]) e++;
                int want = u[b * T + i] < mc.prob, n_sel = 0;
                for (int k = i; k < e; k++) {
                    int sel = l[k] != PAD;
                    n_sel += sel;
                    if (sel) {
                        label_errors += l[k] != t[k];
                        pieces_selected++;
                        as_mask += in[b * T + k] == MASKID;
                    } else {
                        label_errors += in[b * T + k] != t[k];
                    }
                }
                split_words += n_sel != 0 && n_sel != e - i;
                wrong_words += (n_sel == e - i) != want || (n_sel == 0) == want;
                words++;
                words_selected += want;
                if (e - i > 1) multi++, multi_selected += n_sel == e - i;
                i = e;
            }
        }
        // whole_word off: each position by its own U1 (the per-token rule), continuation flags ignored.
        MaskConfig off = mc;
        off.whole_word = 0;
        mask_apply(&off, tok, N, u, in0, lab0);
        for (int i = 0; i < N; i++) {
            int sel = u[i] < mc.prob && !is_special(tok[i]);
            per_token_diff += (lab0[i] != PAD) != sel;
        }
    }
    printf("whole-word masking, %d batches of %dx%d: %.0f words (%.0f of several pieces)\n", BATCHES, B, T, words, multi);
    CHECK(split_words == 0, "%ld words with some pieces selected and others not", split_words);
    CHECK(wrong_words == 0, "%ld words selected otherwise than by their first piece's U1", wrong_words);
    CHECK(special_selected == 0, "%ld specials or pads selected", special_selected);
    CHECK(label_errors == 0, "%ld label/input errors", label_errors);
    CHECK(per_token_diff == 0, "%ld positions differ from the per-token rule with whole_word off", per_token_diff);
    CHECK(within(words_selected / words, 0.15, words, "selected words / words"), "word selection rate");
    CHECK(within(multi_selected / multi, 0.15, multi, "selected multi-piece words"), "multi-piece word rate");
    // The replacement draws stay per piece: [MASK] for 80% of the selected pieces (the binomial bound is loose
    // here since pieces of one word are not independent in selection, but their U2 draws are).
    CHECK(within(as_mask / pieces_selected, 0.8, pieces_selected, "[MASK] / selected pieces"), "mask share");

    // A sequence boundary splits a word: with seq_len 2, "w ##a | ##b ##c" is two words, the second drawn by
    // position 2's U1; as one sequence (seq_len 0) it is one word drawn by position 0's U1.
    {
        int t4[8] = {10, 61, 62, 63, 10, 61, SEP, 62};
        float u4[32];
        for (int i = 0; i < 32; i++) u4[i] = 0.5f;
        u4[0] = 0.01f;  // position 0 selected, position 2 not
        int i4[8], l4[8];
        MaskConfig c4 = mc;
        c4.seq_len = 2;
        mask_apply(&c4, t4, 8, u4, i4, l4);
        CHECK(l4[0] != PAD && l4[1] != PAD && l4[2] == PAD && l4[3] == PAD, "seq_len 2: labels %d %d %d %d", l4[0],
              l4[1], l4[2], l4[3]);
        c4.seq_len = 0;
        mask_apply(&c4, t4, 8, u4, i4, l4);
        CHECK(l4[0] != PAD && l4[1] != PAD && l4[2] != PAD && l4[3] != PAD, "one sequence: labels %d %d %d %d", l4[0],
              l4[1], l4[2], l4[3]);
        // After [SEP] (never selected) the piece ##b at 7 is a word of its own: drawn by its own U1.
        u4[7] = 0.01f;
        mask_apply(&c4, t4, 8, u4, i4, l4);
        CHECK(l4[6] == PAD && l4[7] != PAD && l4[4] == PAD, "after [SEP]: labels %d %d %d", l4[4], l4[6], l4[7]);
    }
    free(tok); free(in); free(lab); free(in0); free(lab0); free(u);
    rng_free(&rng);
    rng_free(&tokrng);
    return test_finish("test_mask_whole_word");
}
