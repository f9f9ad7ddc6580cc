// philox_cpu.h: cuRAND's host Philox4_32_10 stream reproduced on the CPU (SSE2 lanes, OpenMP), used by
// rng.c once it has checked the reproduction against curandGenerateUniform for the stream.
#ifndef MLM_PHILOX_CPU_H
#define MLM_PHILOX_CPU_H

#include <stddef.h>
#include <stdint.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

// Below this many outputs a draw runs on one thread (an OpenMP fork/join costs microseconds).
#define PHILOX_PARALLEL_MIN 32768

// ---- cuRAND's host Philox4_32_10 stream, reproduced on the CPU.
// curandGenerateUniform on a host Philox generator costs milliseconds per call (it emulates a 65,536-thread
// launch), which would dominate a CPU training step with 24 dropout sites. Its output is a pure function
// of (seed, absolute index g): with block p = g / 4, thread = p % 65536 and iteration = p / 65536,
//   x = Philox4x32-10(counter = {iteration lo, iteration hi, thread, 0}, key = {seed lo, seed hi})[g % 4]
//   u = x * 2^-32 + 2^-33 (float arithmetic, as cuRAND's _curand_uniform), in (0, 1].
// philox_uniform() (rng.c) computes exactly that. rng.c checks it against curandGenerateUniform once per
// stream and falls back to cuRAND if a cuRAND release ever lays its stream out differently; the tests
// compare the two bit for bit.

enum { CURAND_PHILOX_THREADS = 65536 };
#define CURAND_2POW32_INV 2.3283064e-10f

// Philox blocks computed together, as vectors of four blocks when SSE2 is there (always on x86-64):
// 32 x 32 -> 64-bit multiplies of four lanes take two pmuludq, where scalar code does one at a time.
enum { PHILOX_LANES = 8 };
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

#ifdef __SSE2__
// hi and lo 32 bits of a[l] * m for the four lanes.
static inline void mulhilo4(__m128i a, __m128i m, __m128i *hi, __m128i *lo) {
    __m128i even = _mm_mul_epu32(a, m);                     // products of lanes 0 and 2: [lo0 hi0 lo2 hi2]
    __m128i odd = _mm_mul_epu32(_mm_srli_epi64(a, 32), m);  // lanes 1 and 3: [lo1 hi1 lo3 hi3]
    __m128i e = _mm_shuffle_epi32(even, _MM_SHUFFLE(3, 1, 2, 0));  // [lo0 lo2 hi0 hi2]
    __m128i o = _mm_shuffle_epi32(odd, _MM_SHUFFLE(3, 1, 2, 0));   // [lo1 lo3 hi1 hi3]
    *lo = _mm_unpacklo_epi32(e, o);
    *hi = _mm_unpackhi_epi32(e, o);
}
#endif

// x[j][l] = output j of Philox4x32-10 block p0 + l of cuRAND's stream (constants as Random123 and cuRAND).
static inline void curand_philox_lanes(uint64_t seed, uint64_t p0, uint32_t x[4][PHILOX_LANES]) {
    for (int l = 0; l < PHILOX_LANES; l++) {
        uint64_t p = p0 + (uint64_t)l, iteration = p / CURAND_PHILOX_THREADS;
        x[0][l] = (uint32_t)iteration;
        x[1][l] = (uint32_t)(iteration >> 32);
        x[2][l] = (uint32_t)(p % CURAND_PHILOX_THREADS);
        x[3][l] = 0;
    }
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#ifdef __SSE2__
    const __m128i m0 = _mm_set1_epi32((int)PHILOX_M0), m1 = _mm_set1_epi32((int)PHILOX_M1);
    for (int v = 0; v < PHILOX_LANES; v += 4) {
        __m128i c0 = _mm_loadu_si128((const __m128i *)&x[0][v]), c1 = _mm_loadu_si128((const __m128i *)&x[1][v]);
        __m128i c2 = _mm_loadu_si128((const __m128i *)&x[2][v]), c3 = _mm_loadu_si128((const __m128i *)&x[3][v]);
        uint32_t r0 = k0, r1 = k1;
        for (int r = 0; r < 10; r++) {
            __m128i hi0, lo0, hi1, lo1;
            mulhilo4(c0, m0, &hi0, &lo0);
            mulhilo4(c2, m1, &hi1, &lo1);
            c0 = _mm_xor_si128(_mm_xor_si128(hi1, c1), _mm_set1_epi32((int)r0));
            c2 = _mm_xor_si128(_mm_xor_si128(hi0, c3), _mm_set1_epi32((int)r1));
            c1 = lo1;
            c3 = lo0;
            r0 += PHILOX_W0;
            r1 += PHILOX_W1;
        }
        _mm_storeu_si128((__m128i *)&x[0][v], c0);
        _mm_storeu_si128((__m128i *)&x[1][v], c1);
        _mm_storeu_si128((__m128i *)&x[2][v], c2);
        _mm_storeu_si128((__m128i *)&x[3][v], c3);
    }
#else
    for (int r = 0; r < 10; r++) {
        for (int l = 0; l < PHILOX_LANES; l++) {
            uint64_t a = (uint64_t)PHILOX_M0 * x[0][l], b = (uint64_t)PHILOX_M1 * x[2][l];
            uint32_t n0 = (uint32_t)(b >> 32) ^ x[1][l] ^ k0, n2 = (uint32_t)(a >> 32) ^ x[3][l] ^ k1;
            x[1][l] = (uint32_t)b;
            x[3][l] = (uint32_t)a;
            x[0][l] = n0;
            x[2][l] = n2;
        }
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
#endif
}

// out[i] = the raw output at absolute index offset + i of the stream of `seed`, i < n, on the calling thread:
// whole groups of blocks on AVX-512 (16 blocks) or AVX2 (8), chosen at run time, and the rest with
// curand_philox_lanes, which defines the stream (philox_wide.c; every path gives the same bits).
typedef enum { PHILOX_PATH_AUTO, PHILOX_PATH_PORTABLE, PHILOX_PATH_AVX2, PHILOX_PATH_AVX512 } PhiloxPath;
#ifdef __cplusplus
extern "C" {
#endif
// 1 when this CPU runs `path` (AUTO and PORTABLE always); philox_raw_path falls back to PORTABLE otherwise.
int philox_path_supported(PhiloxPath path);
void philox_raw_path(PhiloxPath path, uint64_t seed, uint64_t offset, uint32_t *out, size_t n);
#ifdef __cplusplus
}
#endif
static inline void philox_raw(uint64_t seed, uint64_t offset, uint32_t *out, size_t n) {
    philox_raw_path(PHILOX_PATH_AUTO, seed, offset, out, n);
}

static inline float curand_uniform_of(uint32_t x) {
    float scaled = (float)x * CURAND_2POW32_INV;  // separate statements: no fused multiply-add
    return scaled + CURAND_2POW32_INV / 2.0f;
}

// Runs BODY with i and x = the raw 32-bit output at absolute index offset + i, for every i in [0, n);
// parallel over groups of PHILOX_LANES blocks, each output visited by exactly one iteration.
#define FOR_EACH_PHILOX(seed, offset, n, BODY)                                                     \
    do {                                                                                          \
        uint64_t first_ = (offset) / 4, last_ = ((offset) + (n) - 1) / 4;                        \
        long long groups_ = (long long)((last_ - first_) / PHILOX_LANES + 1);                     \
        _Pragma("omp parallel for schedule(static) if (groups_ * 4 * PHILOX_LANES >= PHILOX_PARALLEL_MIN)") \
        for (long long grp_ = 0; grp_ < groups_; grp_++) {                                        \
            uint32_t x_[4][PHILOX_LANES];                                                         \
            uint64_t p0_ = first_ + (uint64_t)grp_ * PHILOX_LANES;                                \
            curand_philox_lanes((seed), p0_, x_);                                                 \
            if (p0_ * 4 >= (offset) && (p0_ + PHILOX_LANES) * 4 <= (offset) + (n)) {              \
                /* the whole group is inside [offset, offset + n): no bounds checks */            \
                size_t base_ = (size_t)(p0_ * 4 - (offset));                                      \
                for (int l_ = 0; l_ < PHILOX_LANES; l_++)                                         \
                    for (int j_ = 0; j_ < 4; j_++) {                                              \
                        size_t i = base_ + (size_t)(l_ * 4 + j_);                                 \
                        uint32_t x = x_[j_][l_];                                                  \
                        BODY;                                                                     \
                    }                                                                             \
                continue;                                                                         \
            }                                                                                     \
            for (int l_ = 0; l_ < PHILOX_LANES && p0_ + (uint64_t)l_ <= last_; l_++) {            \
                for (int j_ = 0; j_ < 4; j_++) {                                                  \
                    uint64_t g_ = (p0_ + (uint64_t)l_) * 4 + (uint64_t)j_;                        \
                    if (g_ < (offset) || g_ >= (offset) + (n)) continue;                          \
                    size_t i = (size_t)(g_ - (offset));                                           \
                    uint32_t x = x_[j_][l_];                                                      \
                    BODY;                                                                         \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    } while (0)

#endif
