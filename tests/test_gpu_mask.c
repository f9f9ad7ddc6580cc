// test_gpu_mask.c (gpu): the CUDA masking (device Philox generator + kernel) equals the host path exactly.
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
    for (int scheme = 0; scheme < 2; scheme++) {
        MaskConfig c = {.scheme = (MaskScheme)scheme, .prob = 0.15f, .unchanged_prob = 0.1f, .random_prob = 0.1f,
                        .n_tokens = 67, .n_chars = 65, .pad_id = 65, .mask_id = 66, .no_mask = {1}, .n_no_mask = 1};
        for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
            size_t n = sizes[k];
            int *tok = malloc(n * sizeof(int)), *in_h = malloc(n * sizeof(int)), *lab_h = malloc(n * sizeof(int));
            int *in_d = malloc(n * sizeof(int)), *lab_d = malloc(n * sizeof(int));
            float *u = malloc(4 * n * sizeof(float));
            for (size_t i = 0; i < n; i++) tok[i] = (int)((i * 2654435761u) % 67);
            Rng rng;
            rng_init(&rng, 2024, RNG_DOMAIN_TRAIN);
            uint64_t offset = 12345 + 3 * k;  // unaligned offsets too
            rng_uniform(&rng, offset, u, 4 * n);
            mask_apply(&c, tok, n, u, in_h, lab_h);
            cuda_mask_batch_host(&c, tok, n, rng.seed, offset, in_d, lab_d);
            size_t diff = 0;
            for (size_t i = 0; i < n; i++) diff += in_h[i] != in_d[i] || lab_h[i] != lab_d[i];
            CHECK(diff == 0, "scheme %d, n = %zu: %zu positions differ between CPU and GPU masking", scheme, n, diff);
            rng_free(&rng);
            free(tok); free(in_h); free(lab_h); free(in_d); free(lab_d); free(u);
        }
    }
    return test_finish("test_gpu_mask");
}
