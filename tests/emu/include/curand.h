// curand.h (tests/emu): cuRAND's device-generator API with the Philox4x32-10 generator in LEGACY ordering,
// emulated on the CPU. Names map to emu_-prefixed functions (see cuda_runtime.h), so the real libcurand host
// generator used by mlm_core (src/host/data/rng.c) stays the real one in the same process. Enum values are
// the real header's (mlm_core's mlm_curand_status_name is compiled against it).
#ifndef MLM_EMU_CURAND_H
#define MLM_EMU_CURAND_H

#include "cuda_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum curandStatus {
    CURAND_STATUS_SUCCESS = 0,
    CURAND_STATUS_VERSION_MISMATCH = 100,
    CURAND_STATUS_NOT_INITIALIZED = 101,
    CURAND_STATUS_ALLOCATION_FAILED = 102,
    CURAND_STATUS_TYPE_ERROR = 103,
    CURAND_STATUS_OUT_OF_RANGE = 104,
    CURAND_STATUS_LENGTH_NOT_MULTIPLE = 105,
    CURAND_STATUS_DOUBLE_PRECISION_REQUIRED = 106,
    CURAND_STATUS_LAUNCH_FAILURE = 201,
    CURAND_STATUS_PREEXISTING_FAILURE = 202,
    CURAND_STATUS_INITIALIZATION_FAILED = 203,
    CURAND_STATUS_ARCH_MISMATCH = 204,
    CURAND_STATUS_INTERNAL_ERROR = 999
} curandStatus_t;

typedef enum curandRngType {
    CURAND_RNG_TEST = 0,
    CURAND_RNG_PSEUDO_DEFAULT = 100,
    CURAND_RNG_PSEUDO_XORWOW = 101,
    CURAND_RNG_PSEUDO_MRG32K3A = 121,
    CURAND_RNG_PSEUDO_MTGP32 = 141,
    CURAND_RNG_PSEUDO_MT19937 = 142,
    CURAND_RNG_PSEUDO_PHILOX4_32_10 = 161
} curandRngType_t;

typedef enum curandOrdering {
    CURAND_ORDERING_PSEUDO_BEST = 100,
    CURAND_ORDERING_PSEUDO_DEFAULT = 101,
    CURAND_ORDERING_PSEUDO_SEEDED = 102,
    CURAND_ORDERING_PSEUDO_LEGACY = 103,
    CURAND_ORDERING_PSEUDO_DYNAMIC = 104,
    CURAND_ORDERING_QUASI_DEFAULT = 201
} curandOrdering_t;

typedef struct curandGenerator_st *curandGenerator_t;

#define curandCreateGenerator emu_curandCreateGenerator
#define curandDestroyGenerator emu_curandDestroyGenerator
#define curandSetStream emu_curandSetStream
#define curandSetPseudoRandomGeneratorSeed emu_curandSetPseudoRandomGeneratorSeed
#define curandSetGeneratorOffset emu_curandSetGeneratorOffset
#define curandSetGeneratorOrdering emu_curandSetGeneratorOrdering
#define curandGenerateUniform emu_curandGenerateUniform
#define curandGenerate emu_curandGenerate
#define curandGetVersion emu_curandGetVersion

curandStatus_t curandCreateGenerator(curandGenerator_t *gen, curandRngType_t type);
curandStatus_t curandDestroyGenerator(curandGenerator_t gen);
curandStatus_t curandSetStream(curandGenerator_t gen, cudaStream_t stream);
curandStatus_t curandSetPseudoRandomGeneratorSeed(curandGenerator_t gen, unsigned long long seed);
curandStatus_t curandSetGeneratorOffset(curandGenerator_t gen, unsigned long long offset);
curandStatus_t curandSetGeneratorOrdering(curandGenerator_t gen, curandOrdering_t order);
curandStatus_t curandGenerateUniform(curandGenerator_t gen, float *out, size_t n);
curandStatus_t curandGenerate(curandGenerator_t gen, unsigned int *out, size_t n);
// The emulated generator reproduces the LEGACY layout of cuRAND 10.4 (CUDA 13); it reports that version.
curandStatus_t curandGetVersion(int *version);

#ifdef __cplusplus
}
#endif

#endif
