// test_mask.c: statistics of both masking schemes over many batches, against binomial bounds, plus the
// exact invariants (labels, never-selected tokens) and Philox offset addressing.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/mask.h"
#include "mlm/rng.h"
#include "test_util.h"

// Tolerance: Z standard deviations of a binomial proportion; with Z = 5 a correct implementation fails with
// probability below 1e-6 per check (the streams are seeded, so the outcome is fixed anyway).
#define Z 5.0

static int within(double observed, double p, double n, const char *what) {
    double sd = sqrt(p * (1.0 - p) / n);
    int ok = fabs(observed - p) <= Z * sd;
    printf("  %-34s observed %.5f expected %.5f (n = %.0f, %.2f sd)\n", what, observed, p, n, fabs(observed - p) / sd);
    return ok;
}

enum { V = 67, NCHARS = 65, PAD = 65, MASKID = 66, B = 64, T = 32, N = B * T, BATCHES = 300 };

static MaskConfig make_config(MaskScheme scheme) {
    MaskConfig c;
    memset(&c, 0, sizeof(c));
    c.scheme = scheme;
    c.prob = 0.15f;
    c.unchanged_prob = 0.1f;
    c.random_prob = 0.1f;
    c.n_tokens = V;
    c.n_chars = NCHARS;
    c.pad_id = PAD;
    c.mask_id = MASKID;
    c.no_mask[0] = 0;  // never select '\n' (id 0) in this test
    c.n_no_mask = 1;
    return c;
}

static void run_scheme(MaskScheme scheme) {
    MaskConfig mc = make_config(scheme);
    Rng rng;
    rng_init(&rng, 7, RNG_DOMAIN_TRAIN);
    RngLayout layout = rng_layout(B, T, 16, 2, 32, 2);
    int *tok = malloc(N * sizeof(int)), *in = malloc(N * sizeof(int)), *lab = malloc(N * sizeof(int));
    float *u = malloc(4 * N * sizeof(float));
    double eligible = 0, selected = 0, as_mask = 0, as_same = 0, as_other = 0;
    double random_hist[V] = {0};
    long label_errors = 0, forbidden_selected = 0;
    Rng tokrng;
    rng_init(&tokrng, 99, RNG_DOMAIN_DATA);
    uint32_t *raw = malloc(N * sizeof(uint32_t));
    for (int bi = 0; bi < BATCHES; bi++) {
        // Tokens uniform over all 67 ids, so PAD, MASK and the no-mask id 0 all occur in the input.
        rng_u32(&tokrng, (uint64_t)bi * N, raw, N);
        for (int i = 0; i < N; i++) tok[i] = (int)(((uint64_t)raw[i] * V) >> 32);
        rng_uniform(&rng, rng_mask_offset(&layout, (uint64_t)bi), u, 4 * N);
        mask_apply(&mc, tok, N, u, in, lab);
        for (int i = 0; i < N; i++) {
            int t = tok[i];
            int never = t == PAD || t == MASKID || t == 0;
            if (!never) eligible++;
            if (lab[i] != PAD) {
                if (never) forbidden_selected++;
                if (lab[i] != t) label_errors++;
                selected++;
                if (in[i] == MASKID) as_mask++;
                else if (in[i] == t) as_same++;
                else as_other++;
                if (in[i] != MASKID && in[i] != t) random_hist[in[i]]++;
            } else if (in[i] != t) {
                label_errors++;  // an unselected position must keep its token
            }
        }
    }
    printf("%s scheme, %d batches of %dx%d:\n", scheme == MASK_SCHEME_REFERENCE ? "reference" : "bert", BATCHES, B, T);
    CHECK(label_errors == 0, "%ld label/input errors", label_errors);
    CHECK(forbidden_selected == 0, "%ld PAD/MASK/no-mask positions selected", forbidden_selected);
    CHECK(within(selected / eligible, 0.15, eligible, "selected / eligible"), "selection rate");
    double p_mask, p_same, p_other;
    if (scheme == MASK_SCHEME_REFERENCE) {
        // random (10%) draws any of 67 ids: 1/67 of them is [MASK], 1/67 the original token.
        p_mask = 0.9 * 0.9 + 0.1 / V;
        p_same = 0.9 * 0.1 + 0.1 / V;
    } else {
        // 80% [MASK]; 10% a random real character (1/65 of them the original); 10% unchanged.
        p_mask = 0.8;
        p_same = 0.1 + 0.1 / NCHARS;
    }
    p_other = 1.0 - p_mask - p_same;
    CHECK(within(as_mask / selected, p_mask, selected, "[MASK] / selected"), "mask share");
    CHECK(within(as_same / selected, p_same, selected, "unchanged / selected"), "unchanged share");
    CHECK(within(as_other / selected, p_other, selected, "other token / selected"), "random share");
    // Random tokens: reference draws all 67 ids (PAD and MASK included); BERT only real characters.
    int range = scheme == MASK_SCHEME_REFERENCE ? V : NCHARS;
    double total = 0;
    for (int k = 0; k < V; k++) total += random_hist[k];
    int worst = 0;
    double worst_z = 0;
    for (int k = 0; k < V; k++) {
        if (k >= range) { CHECK(random_hist[k] == 0, "random token %d drawn under the BERT scheme", k); continue; }
        if (k == MASKID) continue;  // a random draw of [MASK] reads as [MASK]; counted in p_mask above
        // Each id is missing from the "other" histogram when it equals the original token; with uniform
        // tokens that removes the same share from every id, so each bin is still 1/bins of the total.
        int bins = range == V ? V - 1 : range;
        double p = 1.0 / bins, sd = sqrt(p * (1 - p) / total), z = fabs(random_hist[k] / total - p) / sd;
        if (z > worst_z) { worst_z = z; worst = k; }
    }
    printf("  random-token histogram: worst bin %d at %.2f sd\n", worst, worst_z);
    CHECK(worst_z <= Z, "random token %d frequency off by %.2f sd", worst, worst_z);
    if (scheme == MASK_SCHEME_REFERENCE)
        CHECK(random_hist[PAD] > 0, "reference random tokens include PAD");
    free(tok); free(in); free(lab); free(u); free(raw);
    rng_free(&rng);
    rng_free(&tokrng);
}

// Any step's uniforms can be regenerated from its offset alone, identical to a contiguous draw.
static void test_offsets(void) {
    Rng rng;
    rng_init(&rng, 1234, RNG_DOMAIN_TRAIN);
    enum { M = 1000 };
    float all[3 * M], part[M];
    rng_uniform(&rng, 0, all, 3 * M);
    rng_uniform(&rng, 2 * M + 3, part, M - 3);
    CHECK(memcmp(all + 2 * M + 3, part, (M - 3) * sizeof(float)) == 0, "offset draw differs from the contiguous one");
    rng_uniform(&rng, 17, part, 5);
    CHECK(memcmp(all + 17, part, 5 * sizeof(float)) == 0, "unaligned offset draw differs");
    Rng other;
    rng_init(&other, 1234, RNG_DOMAIN_VALID);
    rng_uniform(&other, 0, part, M);
    CHECK(memcmp(all, part, M * sizeof(float)) != 0, "domains must give different streams");
    int in_range = 1;
    for (int i = 0; i < 3 * M; i++) in_range &= all[i] > 0.0f && all[i] <= 1.0f;
    CHECK(in_range, "uniforms outside (0, 1]");
    RngLayout l = rng_layout(64, 32, 128, 8, 256, 6);
    CHECK(rng_dropout_offset(&l, 0, 0, DROP_ATTN_PROBS) == l.mask, "first dropout site follows the mask uniforms");
    CHECK(rng_dropout_offset(&l, 1, 0, DROP_ATTN_PROBS) == l.per_step + l.mask, "step stride");
    CHECK(rng_dropout_offset(&l, 0, 5, DROP_FFN_RESID) + l.ffn_resid <= l.per_step, "last site inside the step");
    CHECK(l.per_step == l.mask + 6 * l.per_layer, "steps are adjacent in the stream");
    // Contiguous draws of any size continue the stream exactly (what the seek-avoidance relies on).
    float pieces[3 * M];
    rng_uniform(&rng, 0, pieces, 5);
    rng_uniform(&rng, 5, pieces + 5, 7);
    rng_uniform(&rng, 12, pieces + 12, 3 * M - 12);
    CHECK(memcmp(all, pieces, sizeof(pieces)) == 0, "piecewise contiguous draws differ from one draw");
    rng_free(&rng);
    rng_free(&other);
}

int main(void) {
    run_scheme(MASK_SCHEME_REFERENCE);
    run_scheme(MASK_SCHEME_BERT);
    test_offsets();
    return test_finish("test_mask");
}
