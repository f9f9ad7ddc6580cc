// real_curand_ref.c (tests/emu): uniforms from the REAL cuRAND host generator (Philox4x32-10, LEGACY ordering),
// the reference test_emu_layer checks the emulated device generator against. Compiled against the toolkit's
// curand.h, never the emulator's (it needs no GPU: the host generator runs on the CPU).
#include <curand.h>
#include <stddef.h>

int emu_real_curand_uniform(unsigned long long seed, unsigned long long offset, float *out, size_t n) {
    curandGenerator_t g;
    if (curandCreateGeneratorHost(&g, CURAND_RNG_PSEUDO_PHILOX4_32_10) != CURAND_STATUS_SUCCESS) return 1;
    int rc = curandSetGeneratorOrdering(g, CURAND_ORDERING_PSEUDO_LEGACY) != CURAND_STATUS_SUCCESS ||
             curandSetPseudoRandomGeneratorSeed(g, seed) != CURAND_STATUS_SUCCESS ||
             curandSetGeneratorOffset(g, offset) != CURAND_STATUS_SUCCESS ||
             curandGenerateUniform(g, out, n) != CURAND_STATUS_SUCCESS;
    curandDestroyGenerator(g);
    return rc;
}
