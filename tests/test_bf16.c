// test_bf16.c (unit): the BF16 rules of include/mlm/bf16.h and their CPU twins (src/cpu/bf16.c).
//   - bf16_round_bits against a reference that takes the nearer of the two neighbouring BF16 values in double (ties
//     to the even mantissa, overflow to infinity, NaN to 0x7fff), over every exponent and sign with the rounding
//     boundaries of each; bf16_to_float exact.
//   - THE ROUNDING RULE (bf16_stochastic_bits): the result is one of the two neighbours, it rounds up (away from
//     zero) exactly when r >= 65536 - dropped, and over all 65,536 values of r the results sum to 65,536 x exactly
//     (the expectation is the value: unbiased, checked in exact double sums).
//   - the array twins: bf16_stochastic_round_array draws the Philox output at offset + i (philox_u32, the stream
//     everything else uses) across cuRAND's thread-row boundary at an unaligned offset, the same for any thread count;
//     the value and in-place forms equal the bits forms.
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/bf16.h"
#include "mlm/common.h"
#include "mlm/rng.h"
#include "test_util.h"

static float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint64_t lcg = 0x853c49e6748fea9bull;
static uint32_t urand(void) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(lcg >> 32);
}

// The nearer of the two BF16 neighbours of x in double; a tie goes to the even mantissa; 2^128 stands for infinity.
static uint16_t ref_nearest(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
    if ((u & 0xffffu) == 0) return lo;
    double dx = fabs((double)x), dlo = fabs((double)bf16_to_float(lo));
    double dhi = (hi & 0x7fffu) == 0x7f80u ? ldexp(1.0, 128) : fabs((double)bf16_to_float(hi));
    if (dx - dlo < dhi - dx) return lo;
    if (dhi - dx < dx - dlo) return hi;
    return (lo & 1u) ? hi : lo;
}

static const uint32_t LOW_BITS[] = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000};

static void test_round_nearest(void) {
    long n = 0, bad = 0, bad_back = 0;
    for (uint32_t sign = 0; sign < 2; sign++)
        for (uint32_t e = 0; e < 256; e++)
            for (int r = 0; r < 32; r++)
                for (size_t l = 0; l < sizeof(LOW_BITS) / sizeof(LOW_BITS[0]); l++) {
                    uint32_t top = r < 4 ? (uint32_t)(r * 0x21) : urand() & 0x7f;
                    uint32_t u = sign << 31 | e << 23 | top << 16 | LOW_BITS[l];
                    float x = bits_float(u);
                    uint16_t got = bf16_round_bits(x);
                    bad += got != ref_nearest(x);
                    if (!isnan(x)) {
                        float back = bf16_to_float(got);
                        bad_back += bf16_round(x) != back && !(isnan(back) && isnan(bf16_round(x)));
                    }
                    n++;
                }
    CHECK(bad == 0, "bf16_round_bits: %ld of %ld values are not the nearest BF16 (ties to even)", bad, n);
    CHECK(bad_back == 0, "bf16_round: %ld values differ from bf16_to_float(bf16_round_bits)", bad_back);
    CHECK(bf16_round_bits(bits_float(0x3f808000u)) == 0x3f80, "1 + 2^-8 is a tie: to 1 (even)");
    CHECK(bf16_round_bits(bits_float(0x7f7f8000u)) == 0x7f80, "the largest finite + half an ulp: infinity");
    CHECK(bf16_round_bits(bits_float(0x80000001u)) == 0x8000, "the smallest negative denormal: -0");
    CHECK(bf16_round_bits(NAN) == 0x7fff, "NaN: 0x7fff");
    printf("  round to nearest even vs nearest-in-double: %ld values over every exponent and sign\n", n);
}

static void test_stochastic_rule(void) {
    long values = 0, bad_pair = 0, bad_when = 0, bad_mean = 0;
    for (uint32_t sign = 0; sign < 2; sign++)
        for (uint32_t e = 1; e < 255; e += 3)
            for (int t = 0; t < 6; t++) {
                uint32_t low = t < 2 ? LOW_BITS[t * 3] : urand() & 0xffffu;
                uint32_t u = sign << 31 | e << 23 | (urand() & 0x7fu) << 16 | low;
                float x = bits_float(u);
                uint16_t down = (uint16_t)(u >> 16), up = (uint16_t)(down + (low != 0));
                double sum = 0.0;
                for (uint32_t r = 0; r < 65536; r++) {
                    uint16_t got = bf16_stochastic_bits(x, r | (urand() << 16));  // the high 16 bits are not used
                    bad_pair += got != down && got != up;
                    bad_when += (got == up && low != 0) != (r >= 65536 - low);
                    sum += (double)bf16_to_float(got);
                }
                // 65,536 x in double is exact, and so is the sum: each term has 8 significant bits and they share
                // at most two binades, 2^16 of them fit in 53 bits.
                bad_mean += sum != 65536.0 * (double)x && !isinf(bf16_to_float(up));
                values++;
            }
    CHECK(bad_pair == 0, "stochastic rounding gave %ld results that are neither neighbour", bad_pair);
    CHECK(bad_when == 0, "stochastic rounding rounded up %ld times where r < 65536 - dropped or the reverse", bad_when);
    CHECK(bad_mean == 0, "stochastic rounding is biased for %ld of %ld values (sum over all r != 65536 x)", bad_mean,
          values);
    CHECK(bf16_stochastic_bits(NAN, 0xffff) == 0x7fff, "NaN: 0x7fff");
    CHECK(bf16_stochastic_bits(INFINITY, 0xffff) == 0x7f80, "infinity stays infinity");
    CHECK(bf16_stochastic_bits(1.0f, 0xffff) == 0x3f80, "an exact BF16 value never moves");
    printf("  THE ROUNDING RULE: %ld values x all 65,536 r: the two neighbours only, up exactly when r >= 65536 - "
           "dropped, mean = the value exactly\n", values);
}

static void test_arrays(void) {
    const uint64_t seed = rng_domain_seed(1234, RNG_DOMAIN_ROUND);
    const uint64_t offset = 4ull * 65536 - 13;  // across cuRAND's thread-row boundary, not a multiple of 4
    const size_t n = 70001;
    float *x = mlm_malloc(n * sizeof(float), "x"), *v = mlm_malloc(n * sizeof(float), "v");
    uint16_t *bits = mlm_malloc(n * sizeof(uint16_t), "bits"), *bits1 = mlm_malloc(n * sizeof(uint16_t), "bits1");
    uint32_t *r = mlm_malloc(n * sizeof(uint32_t), "r");
    for (size_t i = 0; i < n; i++) x[i] = ldexpf((float)(urand() >> 8) / 16777216.0f - 0.5f, (int)(urand() % 40) - 20);
    philox_u32(seed, offset, r, n);
    bf16_stochastic_round_array(bits, x, n, seed, offset);
    long bad = 0;
    for (size_t i = 0; i < n; i++) bad += bits[i] != bf16_stochastic_bits(x[i], r[i]);
    CHECK(bad == 0, "bf16_stochastic_round_array: %ld of %zu elements do not use the Philox output at offset + i", bad, n);
    int threads = omp_get_max_threads();
    omp_set_num_threads(1);
    bf16_stochastic_round_array(bits1, x, n, seed, offset);
    omp_set_num_threads(threads);
    CHECK(memcmp(bits, bits1, n * sizeof(uint16_t)) == 0, "stochastic rounding depends on the thread count");
    bf16_stochastic_round_values(v, x, n, seed, offset);
    bad = 0;
    for (size_t i = 0; i < n; i++) bad += memcmp(&v[i], &(float){bf16_to_float(bits[i])}, 4) != 0;
    CHECK(bad == 0, "bf16_stochastic_round_values: %ld elements differ from the bits form", bad);
    long ups = 0;
    for (size_t i = 0; i < n; i++) ups += fabsf(v[i]) > fabsf(bf16_to_float((uint16_t)(bf16_float_bits(x[i]) >> 16)));
    bf16_round_array(bits1, x, n);
    memcpy(v, x, n * sizeof(float));
    bf16_round_in_place(v, n);
    bad = 0;
    for (size_t i = 0; i < n; i++) bad += bits1[i] != bf16_round_bits(x[i]) || v[i] != bf16_to_float(bits1[i]);
    CHECK(bad == 0, "bf16_round_array / bf16_round_in_place: %ld elements differ from the scalar rule", bad);
    bf16_to_float_array(v, bits1, n);
    bad = 0;
    for (size_t i = 0; i < n; i++) bad += v[i] != bf16_to_float(bits1[i]);
    CHECK(bad == 0, "bf16_to_float_array: %ld elements differ", bad);
    printf("  array twins: %zu elements at offset %llu (Philox output offset + i, %ld rounded up), thread count "
           "independent, value / in-place forms equal\n", n, (unsigned long long)offset, ups);
    free(x);
    free(v);
    free(bits);
    free(bits1);
    free(r);
}

int main(void) {
    printf("test_bf16: BF16 rounding rules and CPU twins\n");
    test_round_nearest();
    test_stochastic_rule();
    test_arrays();
    return test_finish("test_bf16");
}
