// test_gpu_mask.c (gpu): the CUDA masking (device Philox generator + kernel) equals the host path exactly, per
// token and with whole-word masking (continuation flags on ids 30..59, sequences of 32 tokens or one sequence).
#include <stdlib.h>
#include <string.h>

#include "mlm/cuda_backend.h"
#include "mlm/mask.h"
#include "mlm/rng.h"
#include "test_util.h"

int main(void) {
    char why[256];
    if (cuda_device_count(why, sizeof(why)) == 0) return test_skip(why);
    const size_t sizes[] = {1, 7, 2048, 64 * 32 + 5, 100003};
    unsigned char cont[67] = {0};
    for (int i = 30; i < 60; i++) cont[i] = 1;
    // Cases: 0, 1 per-token (reference, BERT); 2, 3 whole words with sequences of 32; 4 whole words, one sequence.
    for (int cs = 0; cs < 5; cs++) {
        int scheme = cs % 2, whole = cs >= 2;
        MaskConfig c = {.scheme = (MaskScheme)scheme, .prob = 0.15f, .unchanged_prob = 0.1f, .random_prob = 0.1f,
                        .n_tokens = 67, .n_chars = 65, .pad_id = 65, .mask_id = 66, .no_mask = {1}, .n_no_mask = 1,
                        .whole_word = whole, .continuation = whole ? cont : NULL, .seq_len = cs == 4 ? 0 : 32};
        for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
            size_t n = sizes[k];
            int *tok = malloc(n * sizeof(int)), *in_h = malloc(n * sizeof(int)), *lab_h = malloc(n * sizeof(int));
            int *in_d = malloc(n * sizeof(int)), *lab_d = malloc(n * sizeof(int));
            float *u = malloc(4 * n * sizeof(float));
            for (size_t i = 0; i < n; i++) tok[i] = (int)((i * 2654435761u) % 67);
            // Runs of continuation pieces (up to 5 long) so that whole words of several pieces occur.
            for (size_t i = 0; whole && i < n; i++)
                if ((i * 40503u) % 7 < 5 && tok[i] < 30) tok[i] = 30 + (int)((i * 97u) % 30);
            Rng rng;
            rng_init(&rng, 2024, RNG_DOMAIN_TRAIN);
            uint64_t offset = 12345 + 3 * k;  // unaligned offsets too
            rng_uniform(&rng, offset, u, 4 * n);
            mask_apply(&c, tok, n, u, in_h, lab_h);
            cuda_mask_batch_host(&c, tok, n, rng.seed, offset, in_d, lab_d);
            size_t diff = 0;
            for (size_t i = 0; i < n; i++) diff += in_h[i] != in_d[i] || lab_h[i] != lab_d[i];
            size_t selected = 0;
            for (size_t i = 0; i < n; i++) selected += lab_h[i] != c.pad_id;
            CHECK(diff == 0, "scheme %d, whole words %d (seq_len %d), n = %zu: %zu positions differ between CPU and GPU "
                  "masking (%zu selected)", scheme, whole, c.seq_len, n, diff, selected);
            rng_free(&rng);
            free(tok); free(in_h); free(lab_h); free(in_d); free(lab_d); free(u);
        }
    }
    return test_finish("test_gpu_mask");
}
