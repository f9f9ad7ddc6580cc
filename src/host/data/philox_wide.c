// philox_wide.c: philox_raw, consecutive outputs of cuRAND's Philox stream into an array, 16 blocks at a time on
// AVX-512 and 8 on AVX2 (chosen at run time), the portable curand_philox_lanes (philox_cpu.h) being the definition.
//
// Why: the CPU dropout draws one Philox output per element (about 12% of a reference step at 1 thread, most of it
// in the attention tiles), and curand_philox_lanes computes four blocks per SSE2 vector with a bounds check and a
// scattered store per output. Here a 512-bit vector carries 16 blocks (64 outputs), the blocks' counters come
// from one add, and the four outputs of each block are transposed in registers so that they are stored in stream
// order. Integer arithmetic only: every path gives the same bits, which test_cpu_ops checks against the portable one.
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cpu_isa.h"
#include "philox_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#define PHILOX_X86 1
#include <immintrin.h>
#endif

// out[i] = output offset + i for i < n, any offset and n, with curand_philox_lanes.
static void portable_range(uint64_t seed, uint64_t offset, uint32_t *out, size_t n) {
    if (n == 0) return;
    uint64_t first = offset / 4, last = (offset + n - 1) / 4;
    for (uint64_t p0 = first; p0 <= last; p0 += PHILOX_LANES) {
        uint32_t x[4][PHILOX_LANES];
        curand_philox_lanes(seed, p0, x);
        for (int l = 0; l < PHILOX_LANES; l++)
            for (int w = 0; w < 4; w++) {
                uint64_t g = (p0 + (uint64_t)l) * 4 + (uint64_t)w;
                if (g >= offset && g < offset + n) out[g - offset] = x[w][l];
            }
    }
}

// The counters of blocks p0 .. p0 + lanes - 1: {iteration lo, iteration hi, thread, 0} with thread = p % 65536 and
// iteration = p / 65536 (philox_cpu.h), as four arrays of `lanes` words.
static void block_counters(uint64_t p0, int lanes, uint32_t c[4][16]) {
    for (int l = 0; l < lanes; l++) {
        uint64_t p = p0 + (uint64_t)l, iteration = p / CURAND_PHILOX_THREADS;
        c[0][l] = (uint32_t)iteration;
        c[1][l] = (uint32_t)(iteration >> 32);
        c[2][l] = (uint32_t)(p % CURAND_PHILOX_THREADS);
        c[3][l] = 0;
    }
}

#ifdef PHILOX_X86
// hi and lo 32 bits of a[l] * m in each of the 16 lanes: vpmuludq multiplies the even lanes (and, shifted, the
// odd ones) to 64 bits; the low halves are one vpmulld.
static inline __attribute__((always_inline, target("avx512f"))) void mulhilo16(__m512i a, __m512i m, __m512i *hi,
                                                                                 __m512i *lo) {
    __m512i even = _mm512_mul_epu32(a, m);                     // 64-bit products of lanes 0, 2, ...
    __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // of lanes 1, 3, ...: hi already in the odd words
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mullo_epi32(a, m);
}

// out[64 g ..] = the 64 outputs of blocks p0 + 16 g .. p0 + 16 g + 15, for g < groups.
__attribute__((target("avx512f"))) static void blocks_avx512(uint64_t seed, uint64_t p0, size_t groups,
                                                             uint32_t *out) {
    const __m512i m0 = _mm512_set1_epi32((int)PHILOX_M0), m1 = _mm512_set1_epi32((int)PHILOX_M1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (size_t g = 0; g < groups; g++) {
        uint64_t p = p0 + 16 * (uint64_t)g;
        __m512i c0, c1, c2, c3;
        if (p % CURAND_PHILOX_THREADS + 16 <= CURAND_PHILOX_THREADS) {  // one iteration: threads p % 65536 + lane
            uint64_t iteration = p / CURAND_PHILOX_THREADS;
            c0 = _mm512_set1_epi32((int)(uint32_t)iteration);
            c1 = _mm512_set1_epi32((int)(uint32_t)(iteration >> 32));
            c2 = _mm512_add_epi32(_mm512_set1_epi32((int)(p % CURAND_PHILOX_THREADS)), lane);
            c3 = _mm512_setzero_si512();
        } else {  // the group crosses into the next iteration
            uint32_t c[4][16];
            block_counters(p, 16, c);
            c0 = _mm512_loadu_si512(c[0]);
            c1 = _mm512_loadu_si512(c[1]);
            c2 = _mm512_loadu_si512(c[2]);
            c3 = _mm512_loadu_si512(c[3]);
        }
        uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
        for (int r = 0; r < 10; r++) {
            __m512i hi0, lo0, hi1, lo1;
            mulhilo16(c0, m0, &hi0, &lo0);
            mulhilo16(c2, m1, &hi1, &lo1);
            c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32((int)k0), 0x96);  // three-way xor
            c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32((int)k1), 0x96);
            c1 = lo1;
            c3 = lo0;
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        // Transpose to stream order: within each 128-bit lane, u_j holds block 4 q + j's four outputs (q = lane).
        __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
        __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
        __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);  // blocks 0 4 8 12; 1 5 9 13
        __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);  // 2 6 10 14; 3 7 11 15
        __m512i a01 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));  // blocks 0 4 1 5
        __m512i a23 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));  // 2 6 3 7
        __m512i b01 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));  // 8 12 9 13
        __m512i b23 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));  // 10 14 11 15
        uint32_t *o = out + 64 * g;
        _mm512_storeu_si512(o, _mm512_shuffle_i32x4(a01, a23, _MM_SHUFFLE(2, 0, 2, 0)));       // blocks 0 1 2 3
        _mm512_storeu_si512(o + 16, _mm512_shuffle_i32x4(a01, a23, _MM_SHUFFLE(3, 1, 3, 1)));  // 4 5 6 7
        _mm512_storeu_si512(o + 32, _mm512_shuffle_i32x4(b01, b23, _MM_SHUFFLE(2, 0, 2, 0)));  // 8 9 10 11
        _mm512_storeu_si512(o + 48, _mm512_shuffle_i32x4(b01, b23, _MM_SHUFFLE(3, 1, 3, 1)));  // 12 13 14 15
    }
}

// The same with 8 lanes of 32 bits.
static inline __attribute__((always_inline, target("avx2"))) void mulhilo8(__m256i a, __m256i m, __m256i *hi,
                                                                             __m256i *lo) {
    __m256i even = _mm256_mul_epu32(a, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_mullo_epi32(a, m);
}

// out[32 g ..] = the 32 outputs of blocks p0 + 8 g .. p0 + 8 g + 7, for g < groups.
__attribute__((target("avx2"))) static void blocks_avx2(uint64_t seed, uint64_t p0, size_t groups, uint32_t *out) {
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (size_t g = 0; g < groups; g++) {
        uint64_t p = p0 + 8 * (uint64_t)g;
        __m256i c0, c1, c2, c3;
        if (p % CURAND_PHILOX_THREADS + 8 <= CURAND_PHILOX_THREADS) {
            uint64_t iteration = p / CURAND_PHILOX_THREADS;
            c0 = _mm256_set1_epi32((int)(uint32_t)iteration);
            c1 = _mm256_set1_epi32((int)(uint32_t)(iteration >> 32));
            c2 = _mm256_add_epi32(_mm256_set1_epi32((int)(p % CURAND_PHILOX_THREADS)), lane);
            c3 = _mm256_setzero_si256();
        } else {
            uint32_t c[4][16];
            block_counters(p, 8, c);
            c0 = _mm256_loadu_si256((const __m256i *)c[0]);
            c1 = _mm256_loadu_si256((const __m256i *)c[1]);
            c2 = _mm256_loadu_si256((const __m256i *)c[2]);
            c3 = _mm256_loadu_si256((const __m256i *)c[3]);
        }
        uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
        for (int r = 0; r < 10; r++) {
            __m256i hi0, lo0, hi1, lo1;
            mulhilo8(c0, m0, &hi0, &lo0);
            mulhilo8(c2, m1, &hi1, &lo1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)k0));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)k1));
            c1 = lo1;
            c3 = lo0;
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
        __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
        __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);  // blocks 0 4; 1 5
        __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);  // 2 6; 3 7
        __m256i *o = (__m256i *)(out + 32 * g);
        _mm256_storeu_si256(o, _mm256_permute2x128_si256(u0, u1, 0x20));      // blocks 0 1
        _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(u2, u3, 0x20));  // 2 3
        _mm256_storeu_si256(o + 2, _mm256_permute2x128_si256(u0, u1, 0x31));  // 4 5
        _mm256_storeu_si256(o + 3, _mm256_permute2x128_si256(u2, u3, 0x31));  // 6 7
    }
}
#endif

int philox_path_supported(PhiloxPath path) {
    switch (path) {
    case PHILOX_PATH_AUTO:
    case PHILOX_PATH_PORTABLE: return 1;
    case PHILOX_PATH_AVX2: return cpu_isa_supported(CPU_ISA_AVX2);
    case PHILOX_PATH_AVX512: return cpu_isa_supported(CPU_ISA_AVX512F);
    }
    return 0;
}

// Asked at every call (cpu_isa_supported reads what the C runtime found before main; nothing is cached).
static PhiloxPath best_path(void) {
    return philox_path_supported(PHILOX_PATH_AVX512) ? PHILOX_PATH_AVX512
           : philox_path_supported(PHILOX_PATH_AVX2) ? PHILOX_PATH_AVX2
                                                     : PHILOX_PATH_PORTABLE;
}

void philox_raw_path(PhiloxPath path, uint64_t seed, uint64_t offset, uint32_t *out, size_t n) {
    if (path == PHILOX_PATH_AUTO) path = best_path();
    size_t blocks = path == PHILOX_PATH_AVX512 ? 16 : path == PHILOX_PATH_AVX2 ? 8 : 0;
    if (blocks == 0 || !philox_path_supported(path)) {
        portable_range(seed, offset, out, n);
        return;
    }
    // Head up to the first whole block, whole groups of blocks, then the tail, each output written once.
    size_t head = (size_t)((4 - offset % 4) % 4);
    if (head > n) head = n;
    portable_range(seed, offset, out, head);
    uint64_t p0 = (offset + head) / 4;
    size_t groups = (n - head) / (4 * blocks), done = head + groups * 4 * blocks;
#ifdef PHILOX_X86
    if (path == PHILOX_PATH_AVX512) blocks_avx512(seed, p0, groups, out + head);
    else blocks_avx2(seed, p0, groups, out + head);
#endif
    portable_range(seed, offset + done, out + done, n - done);
}
