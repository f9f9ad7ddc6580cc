// gemm.c: the built-in SGEMM of the CPU backend: packed operands, register-blocked micro-kernels (AVX-512 12 x 32
// and 16 x 16, AVX2 + FMA 6 x 16, portable C 4 x 16) chosen at run time, OpenMP over output tiles.
//
// How a product C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C is computed (the GotoBLAS/BLIS scheme):
//   1. op(B) is packed once, whole, into panels of NR columns, [N / NR][K][NR], zero-padded to a whole panel;
//      op(A) into panels of MR rows, [M / MR][K][MR] (whole too, unless that would take more than
//      GEMM_PACK_A_BYTES: then in chunks of rows, one after another). Packing makes every operand the
//      micro-kernel reads contiguous, whatever the transposes and leading dimensions are.
//   2. The output is cut into tiles of MC x NC (multiples of MR x NR); OpenMP threads take tiles
//      dynamically. Each tile runs over K in blocks of GEMM_KC (so that a B panel block stays in L1 and the
//      tile's A panels in L2), micro-tile by micro-tile: the micro-kernel keeps an MR x NR block of C in
//      registers and adds one rank-1 update per k.
//   Products of at most GEMM_SMALL_WORK multiply-adds on one thread (attention's per-head ones) skip the
//   packing: the same kernels read the operands in place (gemm_small).
//
// THE SUMMATION ORDER, which is what makes results independent of threads, tiles and kernels: every element
// is acc = fma(a[k], b[k], acc) for k = 0, 1, ..., K - 1 starting from acc = +0.0f (a K-block boundary stores
// acc and reloads it, which is exact), then C = alpha * acc (+ beta * C, products rounded separately). Tiles,
// KC, the thread count and the scheduling only decide WHO computes an element and WHEN, never the order of
// its terms, so the result is bit-identical for any number of threads; and since every kernel follows the same
// rule, also for any kernel (a run resumed on a machine without AVX-512 continues the same bits).
//
// Why built-in at all: it is the floor every machine gets (no BLAS, or only a reference one), and it lets the
// CPU backend promise thread-independent results without trusting a library's internals.
//
// No contraction of a * b + c into an fma: the epilogue's alpha * acc + beta * c is rounded as written. GCC
// contracts nothing in ISO C mode (-std=c11, as this project builds); clang needs the pragma.
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif
#include "cpu/matmul.h"

#include <math.h>
#include <stddef.h>
#include <omp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"
#include "cpu_isa.h"
#include "mlm/common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define GEMM_X86 1
#endif

// K block: an NR-wide B panel block of 256 x 32 floats is 32 KiB (L1); an MC-row A block 96 x 256, 96 KiB (L2).
enum { GEMM_KC = 256 };
// Whole op(A) packed up front when it takes at most this much (64 MiB); larger ones go in chunks of rows.
#define GEMM_PACK_A_BYTES ((size_t)64 << 20)

// A micro-kernel: acc[MR][NR] (row-major, ld NR) += sum over k < kc of a(:, k) x b(k, :), one fma per k per
// element, k ascending; the callers zero acc first (a conditional start made GCC keep the accumulators in
// memory). Packed operands: a(i, k) = ap[k * MR + i], b(k, j) = bp[k * NR + j].
typedef void MicroKernel(int kc, const float *ap, const float *bp, float *acc);
// The same over operands in place (small products, where packing would cost more than the arithmetic):
// a(i, k) = a[i * rs_a + k * cs_a], b(k, j) = b[k * rs_b + j].
typedef void StridedKernel(int kc, const float *a, ptrdiff_t rs_a, ptrdiff_t cs_a, const float *b, ptrdiff_t rs_b,
                           float *acc);

// A whole product's register block over all of K (strided operands as StridedKernel), its accumulators starting
// from +0 in registers and stored straight to C[MR][NR] (ld ldc) with the epilogue of store_tile, the same
// roundings: alpha * acc (+ beta * C, or + bias[NR]). For small K (attention's per-head products, K = 16 or 32,
// and the model's K = 128) clearing, filling and re-reading an accumulator buffer cost as much as the arithmetic.
typedef void DirectKernel(int kc, const float *a, ptrdiff_t rs_a, ptrdiff_t cs_a, const float *b, ptrdiff_t rs_b,
                          float *C, ptrdiff_t ldc, float alpha, float beta, const float *bias);

// dst[k * ldd + j] = src[j * lds + k] for j, k < 16: a 16 x 16 block of op(B) = B^T, for packing (a copy).
typedef void Transpose16(const float *src, ptrdiff_t lds, float *dst, ptrdiff_t ldd);

typedef struct {
    const char *name;
    int mr, nr;             // register block
    int mc, nc;             // largest tile a thread takes (multiples of mr and nr)
    MicroKernel *kernel;
    StridedKernel *strided;
    DirectKernel *direct;   // NULL: the kernel has none (AVX2, portable C)
    Transpose16 *transpose16;  // NULL: op(B) = B^T is packed element by element
} GemmKernel;

// Asks for the lines of C[m][n] (ld ldc) that the store will write, for writing, before the micro-kernel runs:
// C is usually a fresh activation, not in any cache, and its lines would otherwise arrive only when the store
// needs them.
static inline void prefetch_c(float *C, ptrdiff_t ldc, int m, int n) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j += 16) __builtin_prefetch(C + i * ldc + j, 1, 3);
}

// Each kernel's body is written once, over strided operands, and instantiated twice: with the packed layout's
// strides as constants (the compiler folds them) and with strides given at run time.
#define GEMM_INSTANTIATE(body, target_attr, MR_, NR_)                                                          \
    target_attr static void body##_packed(int kc, const float *ap, const float *bp, float *acc) {  \
        body(kc, ap, 1, MR_, bp, NR_, acc);                                                                  \
    }                                                                                                        \
    target_attr static void body##_strided(int kc, const float *a, ptrdiff_t rs_a, ptrdiff_t cs_a,           \
                                           const float *b, ptrdiff_t rs_b, float *acc) {          \
        body(kc, a, rs_a, cs_a, b, rs_b, acc);                                                               \
    }

// ---- Portable C: any CPU. fmaf keeps the summation rule (and compiles to one instruction where the CPU
// has FMA; elsewhere it is a library call, slow but exact).

enum { GEN_MR = 4, GEN_NR = 16 };

static inline __attribute__((always_inline)) void generic_body(int kc, const float *a, ptrdiff_t rs_a,
                                                                ptrdiff_t cs_a, const float *b, ptrdiff_t rs_b,
                                                                float *acc) {
    float c[GEN_MR][GEN_NR];
    for (int i = 0; i < GEN_MR; i++)
        for (int j = 0; j < GEN_NR; j++) c[i][j] = acc[i * GEN_NR + j];
    for (int k = 0; k < kc; k++, a += cs_a, b += rs_b)
        for (int i = 0; i < GEN_MR; i++)
            for (int j = 0; j < GEN_NR; j++) c[i][j] = fmaf(a[i * rs_a], b[j], c[i][j]);
    for (int i = 0; i < GEN_MR; i++)
        for (int j = 0; j < GEN_NR; j++) acc[i * GEN_NR + j] = c[i][j];
}
GEMM_INSTANTIATE(generic_body, , GEN_MR, GEN_NR)

#ifdef GEMM_X86
// ---- AVX2 + FMA (Haswell, Zen and later): 6 x 16, twelve ymm accumulators, two B loads and six broadcasts
// per k (15 of the 16 ymm registers).

enum { AVX2_MR = 6, AVX2_NR = 16 };

static inline __attribute__((always_inline, target("avx2,fma"))) void avx2_body(int kc, const float *a,
                                                                                 ptrdiff_t rs_a, ptrdiff_t cs_a,
                                                                                 const float *b, ptrdiff_t rs_b,
                                                                                 float *acc) {
    __m256 c[AVX2_MR][2];
    for (int i = 0; i < AVX2_MR; i++)
        for (int j = 0; j < 2; j++) c[i][j] = _mm256_loadu_ps(acc + i * AVX2_NR + 8 * j);
    for (int k = 0; k < kc; k++, a += cs_a, b += rs_b) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        for (int i = 0; i < AVX2_MR; i++) {
            __m256 ai = _mm256_broadcast_ss(a + i * rs_a);
            c[i][0] = _mm256_fmadd_ps(ai, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(ai, b1, c[i][1]);
        }
    }
    for (int i = 0; i < AVX2_MR; i++)
        for (int j = 0; j < 2; j++) _mm256_storeu_ps(acc + i * AVX2_NR + 8 * j, c[i][j]);
}
GEMM_INSTANTIATE(avx2_body, __attribute__((target("avx2,fma"))), AVX2_MR, AVX2_NR)

// ---- AVX-512 (Skylake-X, Ice Lake, Zen 4 and later): 12 x 32, twenty-four zmm accumulators, two B loads and
// twelve broadcasts (folded into the fma as {1to16} operands) per k.

enum { AVX512_MR = 12, AVX512_NR = 32 };

// c[MR][2] += one rank-1 update per k < kc (the loop both avx512_body and avx512_direct run).
static inline __attribute__((always_inline, target("avx512f"))) void avx512_updates(int kc, const float *a,
                                                                                     ptrdiff_t rs_a, ptrdiff_t cs_a,
                                                                                     const float *b, ptrdiff_t rs_b,
                                                                                     __m512 c[AVX512_MR][2]) {
    // Row i's value at a4[i / 4][(i % 4) * rs_a]: three row pointers and the offsets rs, 2 rs, 3 rs, which x86
    // addressing forms from two registers. Offsets i * rs_a for twelve rows took more general registers than
    // there are, and GCC kept them in vector registers and on the stack, moved back for every load.
    const float *a4[AVX512_MR / 4];
    for (int g = 0; g < AVX512_MR / 4; g++) a4[g] = a + 4 * g * rs_a;
    ptrdiff_t rs3 = 3 * rs_a;
    for (int k = 0; k < kc; k++, b += rs_b) {
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
        for (int g = 0; g < AVX512_MR / 4; g++) {
            const float *r = a4[g];
            const ptrdiff_t off[4] = {0, rs_a, 2 * rs_a, rs3};
            for (int i = 0; i < 4; i++) {  // one broadcast live at a time: 24 + 2 + 1 of the 32 zmm registers
                __m512 x = _mm512_set1_ps(r[off[i]]);
                c[4 * g + i][0] = _mm512_fmadd_ps(x, b0, c[4 * g + i][0]);
                c[4 * g + i][1] = _mm512_fmadd_ps(x, b1, c[4 * g + i][1]);
            }
            a4[g] += cs_a;
        }
    }
}

static inline __attribute__((always_inline, target("avx512f"))) void avx512_body(int kc, const float *a,
                                                                                  ptrdiff_t rs_a, ptrdiff_t cs_a,
                                                                                  const float *b, ptrdiff_t rs_b,
                                                                                  float *acc) {
    __m512 c[AVX512_MR][2];
    for (int i = 0; i < AVX512_MR; i++)
        for (int j = 0; j < 2; j++)
            c[i][j] = _mm512_loadu_ps(acc + i * AVX512_NR + 16 * j);
    avx512_updates(kc, a, rs_a, cs_a, b, rs_b, c);
    for (int i = 0; i < AVX512_MR; i++)
        for (int j = 0; j < 2; j++) _mm512_storeu_ps(acc + i * AVX512_NR + 16 * j, c[i][j]);
}
GEMM_INSTANTIATE(avx512_body, __attribute__((target("avx512f"))), AVX512_MR, AVX512_NR)

// c = alpha * acc (+ beta * C, or + bias) for one vector of a register block, rounded as store_tile rounds it.
static inline __attribute__((always_inline, target("avx512f"))) __m512 epilogue16(__m512 acc, const float *c,
                                                                                   float alpha, float beta,
                                                                                   const float *bias) {
    __m512 v = _mm512_mul_ps(_mm512_set1_ps(alpha), acc);
    if (bias != NULL) return _mm512_add_ps(v, _mm512_loadu_ps(bias));
    if (beta == 0.0f) return v;
    return _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(beta), _mm512_loadu_ps(c)));
}

__attribute__((target("avx512f"))) static void avx512_direct(int kc, const float *a, ptrdiff_t rs_a, ptrdiff_t cs_a,
                                                             const float *b, ptrdiff_t rs_b, float *C,
                                                             ptrdiff_t ldc, float alpha, float beta,
                                                             const float *bias) {
    __m512 c[AVX512_MR][2];
    prefetch_c(C, ldc, AVX512_MR, AVX512_NR);
    for (int i = 0; i < AVX512_MR; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
    avx512_updates(kc, a, rs_a, cs_a, b, rs_b, c);
    for (int i = 0; i < AVX512_MR; i++)
        for (int j = 0; j < 2; j++) {
            float *cij = C + i * ldc + 16 * j;
            _mm512_storeu_ps(cij, epilogue16(c[i][j], cij, alpha, beta, bias ? bias + 16 * j : NULL));
        }
}

// ---- AVX-512, one vector wide: 16 x 16, sixteen zmm accumulators, for products 16 columns wide (attention's
// [T, hs] with hs = 16), which would leave half of every 32-wide panel empty.

enum { AVX512N_MR = 16, AVX512N_NR = 16 };

// c[MR] += one rank-1 update per k < kc (avx512n_body and avx512n_direct).
static inline __attribute__((always_inline, target("avx512f"))) void avx512n_updates(int kc, const float *a,
                                                                                      ptrdiff_t rs_a, ptrdiff_t cs_a,
                                                                                      const float *b, ptrdiff_t rs_b,
                                                                                      __m512 c[AVX512N_MR]) {
    const float *a4[AVX512N_MR / 4];  // four row pointers, as in avx512_updates
    for (int g = 0; g < AVX512N_MR / 4; g++) a4[g] = a + 4 * g * rs_a;
    ptrdiff_t rs3 = 3 * rs_a;
    for (int k = 0; k < kc; k++, b += rs_b) {
        __m512 b0 = _mm512_loadu_ps(b);
        for (int g = 0; g < AVX512N_MR / 4; g++) {
            const float *r = a4[g];
            c[4 * g] = _mm512_fmadd_ps(_mm512_set1_ps(r[0]), b0, c[4 * g]);
            c[4 * g + 1] = _mm512_fmadd_ps(_mm512_set1_ps(r[rs_a]), b0, c[4 * g + 1]);
            c[4 * g + 2] = _mm512_fmadd_ps(_mm512_set1_ps(r[2 * rs_a]), b0, c[4 * g + 2]);
            c[4 * g + 3] = _mm512_fmadd_ps(_mm512_set1_ps(r[rs3]), b0, c[4 * g + 3]);
            a4[g] += cs_a;
        }
    }
}

static inline __attribute__((always_inline, target("avx512f"))) void avx512n_body(int kc, const float *a,
                                                                                   ptrdiff_t rs_a, ptrdiff_t cs_a,
                                                                                   const float *b, ptrdiff_t rs_b,
                                                                                   float *acc) {
    __m512 c[AVX512N_MR];
    for (int i = 0; i < AVX512N_MR; i++) c[i] = _mm512_loadu_ps(acc + i * AVX512N_NR);
    avx512n_updates(kc, a, rs_a, cs_a, b, rs_b, c);
    for (int i = 0; i < AVX512N_MR; i++) _mm512_storeu_ps(acc + i * AVX512N_NR, c[i]);
}
GEMM_INSTANTIATE(avx512n_body, __attribute__((target("avx512f"))), AVX512N_MR, AVX512N_NR)

__attribute__((target("avx512f"))) static void avx512n_direct(int kc, const float *a, ptrdiff_t rs_a, ptrdiff_t cs_a,
                                                              const float *b, ptrdiff_t rs_b, float *C,
                                                              ptrdiff_t ldc, float alpha, float beta,
                                                              const float *bias) {
    __m512 c[AVX512N_MR];
    prefetch_c(C, ldc, AVX512N_MR, AVX512N_NR);
    for (int i = 0; i < AVX512N_MR; i++) c[i] = _mm512_setzero_ps();
    avx512n_updates(kc, a, rs_a, cs_a, b, rs_b, c);
    for (int i = 0; i < AVX512N_MR; i++) _mm512_storeu_ps(C + i * ldc, epilogue16(c[i], C + i * ldc, alpha, beta, bias));
}

// The 16 x 16 transpose in registers (rows in, columns out): pairs of rows interleaved as floats, then as float
// pairs, then 128-bit lanes twice.
__attribute__((target("avx512f"))) static void avx512_transpose16(const float *src, ptrdiff_t lds, float *dst,
                                                                  ptrdiff_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * lds);
    for (int i = 0; i < 16; i += 2) {  // t[i] = r[i][0] r[i+1][0] r[i][1] r[i+1][1] per 128-bit lane
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + c] = rows i..i+3 of column c (+4, +8, +12 in the other lanes)
        __m512d a0 = _mm512_castps_pd(t[i]), a1 = _mm512_castps_pd(t[i + 1]);
        __m512d a2 = _mm512_castps_pd(t[i + 2]), a3 = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    for (int h = 0; h < 16; h += 8)  // t[h + c]: rows h..h+7 of columns c, c + 8; t[h + 4 + c]: of c + 4, c + 12
        for (int c = 0; c < 4; c++) {
            t[h + c] = _mm512_shuffle_f32x4(r[h + c], r[h + 4 + c], 0x88);
            t[h + 4 + c] = _mm512_shuffle_f32x4(r[h + c], r[h + 4 + c], 0xdd);
        }
    for (int c = 0; c < 8; c++) {  // column c, and column c + 8
        _mm512_storeu_ps(dst + c * ldd, _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88));
        _mm512_storeu_ps(dst + (c + 8) * ldd, _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd));
    }
}
#endif

// Widest first (gemm_kernel_name() names the first this CPU supports). Tiles: MC x NC of 96 x 256 (AVX-512),
// 96 x 128 (AVX-512 16 wide, AVX2), 64 x 64 (C): a thread's accumulators for one tile stay in L2 between K blocks.
static const GemmKernel KERNELS[] = {
#ifdef GEMM_X86
    {"avx512", AVX512_MR, AVX512_NR, 8 * AVX512_MR, 8 * AVX512_NR, avx512_body_packed, avx512_body_strided,
     avx512_direct, avx512_transpose16},
    {"avx512n", AVX512N_MR, AVX512N_NR, 6 * AVX512N_MR, 8 * AVX512N_NR, avx512n_body_packed, avx512n_body_strided,
     avx512n_direct, avx512_transpose16},
    {"avx2", AVX2_MR, AVX2_NR, 16 * AVX2_MR, 8 * AVX2_NR, avx2_body_packed, avx2_body_strided, NULL, NULL},
#endif
    {"generic", GEN_MR, GEN_NR, 16 * GEN_MR, 4 * GEN_NR, generic_body_packed, generic_body_strided, NULL, NULL},
};
enum { N_KERNELS = sizeof(KERNELS) / sizeof(KERNELS[0]) };

static int kernel_supported_now(const GemmKernel *k) {
    if (strncmp(k->name, "avx512", 6) == 0) return cpu_isa_supported(CPU_ISA_AVX512F);
    if (strcmp(k->name, "avx2") == 0) return cpu_isa_supported(CPU_ISA_AVX2_FMA);
    return strcmp(k->name, "generic") == 0;
}

// Whether KERNELS[i] runs on this CPU, asked once (pthread_once: a lazily filled static would be a data race between
// the threads that multiply at the same time; the answers are looked up for every small product).
static int kernel_support[N_KERNELS];
static pthread_once_t kernel_support_once = PTHREAD_ONCE_INIT;

static void find_kernel_support(void) {
    for (int i = 0; i < N_KERNELS; i++) kernel_support[i] = kernel_supported_now(&KERNELS[i]);
}

static int kernel_supported(const GemmKernel *k) {
    pthread_once(&kernel_support_once, find_kernel_support);
    return kernel_support[k - KERNELS];
}

// The kernel the tests or the bench forced (gemm_force_kernel), or NULL: choose per product.
static const GemmKernel *forced_kernel;

int gemm_force_kernel(const char *name) {
    if (name == NULL) {
        forced_kernel = NULL;
        return 1;
    }
    for (int i = 0; i < N_KERNELS; i++)
        if (strcmp(KERNELS[i].name, name) == 0 && kernel_supported(&KERNELS[i])) {
            forced_kernel = &KERNELS[i];
            return 1;
        }
    return 0;
}

const char *gemm_kernel_name(void) {
    for (int i = 0; i < N_KERNELS; i++)
        if (kernel_supported(&KERNELS[i])) return KERNELS[i].name;
    return "generic";
}

// The widest supported kernel, unless a product's N fits a narrower one's panels with much less padding
// (attention's [T, hs] outputs with hs = 16 would waste half of every 32-wide panel). Any choice gives the
// same bits (the summation rule above), so this is about speed only.
static const GemmKernel *choose_kernel(int N) {
    if (forced_kernel) return forced_kernel;
    const GemmKernel *best = NULL;
    for (int i = 0; i < N_KERNELS; i++) {
        const GemmKernel *k = &KERNELS[i];
        if (!kernel_supported(k)) continue;
        if (best == NULL) {
            best = k;
        } else if (k->nr < best->nr &&
                   4 * MLM_CEIL_DIV(N, best->nr) * best->nr > 5 * MLM_CEIL_DIV(N, k->nr) * k->nr) {
            best = k;
        }
    }
    return best;
}

// For a small product (gemm_small), the kernel with direct stores whose register blocks pad M x N the least, if it
// pads less than `k` (the choice by N alone): attention's 32 x 32 score tiles are two whole 16 x 16 blocks of rows
// for avx512n but two 12-row blocks and a partial one of 8 for avx512 (packed, computed in an accumulator buffer,
// stored, a third of the product's time for 4 rows of nothing). Speed only: every kernel gives the same bits.
static const GemmKernel *choose_small_kernel(const GemmKernel *k, int M, int N) {
    if (forced_kernel) return k;
    const GemmKernel *best = k;
    long long best_area = (long long)MLM_CEIL_DIV(M, k->mr) * k->mr * MLM_CEIL_DIV(N, k->nr) * k->nr;
    for (int i = 0; i < N_KERNELS; i++) {
        const GemmKernel *c = &KERNELS[i];
        if (!c->direct || !kernel_supported(c)) continue;
        long long area = (long long)MLM_CEIL_DIV(M, c->mr) * c->mr * MLM_CEIL_DIV(N, c->nr) * c->nr;
        if (area < best_area) best = c, best_area = area;
    }
    return best;
}

// ---- Packing.

// Panels p0 <= p < p1 of op(B): panel p is op(B)[0:K, p*nr : p*nr + nr] as [K][nr], zero-padded past N.
static void pack_b(const GemmKernel *kern, float *bp, const float *B, int ldb, int trans_b, int K, int N, int p0,
                   int p1) {
    int nr = kern->nr;
    if (!trans_b) {
        // Row k of B feeds row k of every panel: k outer reads B once, row by row (a fresh activation comes
        // from memory; panel by panel, each panel's pass would fetch every row's lines again).
        for (int k = 0; k < K; k++) {
            const float *src = B + (size_t)k * ldb;
            for (int p = p0; p < p1; p++) {
                float *d = bp + (size_t)p * K * nr + (size_t)k * nr;
                int j0 = p * nr, nb = MLM_MIN(nr, N - j0);
                for (int j = 0; j < nb; j++) d[j] = src[j0 + j];  // a loop, not memcpy: rows are short
                for (int j = nb; j < nr; j++) d[j] = 0.0f;
            }
        }
        return;
    }
    for (int p = p0; p < p1; p++) {
        float *dst = bp + (size_t)p * K * nr;
        int j0 = p * nr, nb = MLM_MIN(nr, N - j0), k_done = 0;
        // op(B)[k][j] = B[j][k]: whole 16 x 16 blocks transposed in registers where the kernel has it (the
        // panel's columns in 16s, K in 16s); the rest gathered row by row below.
        if (kern->transpose16 != NULL && nb == nr && nr % 16 == 0) {
            k_done = K / 16 * 16;
            for (int k = 0; k < k_done; k += 16)
                for (int j = 0; j < nr; j += 16)
                    kern->transpose16(B + (size_t)(j0 + j) * ldb + k, ldb, dst + (size_t)k * nr + j, nr);
        }
        // The panel's rows written whole, each gathered from nb rows of B (a cache line of each serves 16 k);
        // writing the panel column by column instead stored every float to a new line and cost more than the
        // arithmetic of the small products.
        for (int k = k_done; k < K; k++) {
            float *d = dst + (size_t)k * nr;
            const float *src = B + (size_t)j0 * ldb + k;
            for (int j = 0; j < nb; j++) d[j] = src[(size_t)j * ldb];
            for (int j = nb; j < nr; j++) d[j] = 0.0f;
        }
    }
}

// Panels p0 <= p < p1 of op(A) rows [i0, i0 + rows): panel p is op(A)[i0 + p*mr : +mr, 0:K] as [K][mr],
// zero-padded past the last row.
static void pack_a(float *ap, const float *A, int lda, int trans_a, int K, int i0, int rows, int mr, int p0, int p1) {
    if (trans_a) {
        // op(A)[i][k] = A[k][i]: row k of A holds every panel's k-th values, so k outer reads A once, row by
        // row (see pack_b).
        for (int k = 0; k < K; k++) {
            const float *src = A + (size_t)k * lda + i0;
            for (int p = p0; p < p1; p++) {
                float *d = ap + (size_t)p * K * mr + (size_t)k * mr;
                int mb = MLM_MIN(mr, rows - p * mr);
                for (int i = 0; i < mb; i++) d[i] = src[p * mr + i];
                for (int i = mb; i < mr; i++) d[i] = 0.0f;
            }
        }
        return;
    }
    for (int p = p0; p < p1; p++) {
        float *dst = ap + (size_t)p * K * mr;
        int r0 = i0 + p * mr, mb = MLM_MIN(mr, i0 + rows - r0);
        for (int i = 0; i < mr; i++) {
            if (i < mb) {
                const float *src = A + (size_t)(r0 + i) * lda;
                for (int k = 0; k < K; k++) dst[(size_t)k * mr + i] = src[k];
            } else {
                for (int k = 0; k < K; k++) dst[(size_t)k * mr + i] = 0.0f;
            }
        }
    }
}

// C[m, n] (ld ldc) = alpha * acc (+ beta * C); acc is [m][ld_acc]. Two roundings when beta != 0, as the
// summation rule says; with beta == 0 C is not read. Cloned for AVX-512 (chosen at load time): at the baseline's
// four lanes the epilogue took a sixth of the micro-kernel's time at K = 128. The same products and sums in any
// width (ISO C mode contracts nothing into an fma, see the top).
#ifdef GEMM_X86
__attribute__((target_clones("avx512f", "default")))
#endif
// With bias (bias[n], beta 1): C = alpha * acc + bias, the bits of beta * C = 1 * bias with C holding the bias.
static void store_tile(float *C, int ldc, const float *acc, int ld_acc, int m, int n, float alpha, float beta,
                       const float *bias) {
    for (int i = 0; i < m; i++) {
        float *c = C + (size_t)i * ldc;
        const float *a = acc + (size_t)i * ld_acc;
        if (bias != NULL) {
            for (int j = 0; j < n; j++) c[j] = alpha * a[j] + bias[j];
        } else if (beta == 0.0f) {
            for (int j = 0; j < n; j++) c[j] = alpha * a[j];
        } else {
            for (int j = 0; j < n; j++) c[j] = alpha * a[j] + beta * c[j];
        }
    }
}

// ---- Workspace: grow-only buffers of the calling thread (matmul_serial runs inside OpenMP loops, one
// product per thread at a time; matmul from the main thread), so a product allocates nothing in the steady
// state. 64-byte aligned for the vector loads.

typedef struct {
    float *ptr;
    size_t cap;  // floats
} Buffer;

static float *buffer_get(Buffer *b, size_t n, const char *what) {
    if (n > b->cap) {
        free(b->ptr);
        b->ptr = mlm_calloc_large(n, sizeof(float), what);
        b->cap = n;
    }
    return b->ptr;
}

static _Thread_local Buffer ws_a, ws_b, ws_acc;

// ---- The product.

typedef struct {
    const GemmKernel *k;
    int M, N, K;
    float alpha, beta;
    float *C;
    int ldc;
    const float *ap;   // packed rows [row0, row0 + rows) of op(A): panels [rows / mr][K][mr]; with a_in_place,
                       // only the last panel when it is partial, as panel 0
    int row0, rows;
    const float *A;    // op(A) = A (no trans_a), row stride lda: read in place when a_in_place
    int lda, a_in_place;
    const float *bias;  // [N] added to every row at the store (beta 1), or NULL
    const float *bp;   // packed op(B): panels [N / nr][K][nr]
    int tile_rows, tile_cols;  // mc x nc of this product (multiples of mr x nr)
} Product;

// One tile: rows [row0 + ti * tile_rows, ...) x columns [tj * tile_cols, ...), all of K.
static void run_tile(const Product *p, int ti, int tj, float *acc) {
    const GemmKernel *k = p->k;
    int mr = k->mr, nr = k->nr, K = p->K;
    int i_begin = ti * p->tile_rows, i_end = MLM_MIN(i_begin + p->tile_rows, p->rows);  // rows of the chunk
    int j_begin = tj * p->tile_cols, j_end = MLM_MIN(j_begin + p->tile_cols, p->N);
    int tile_panels_j = MLM_CEIL_DIV(j_end - j_begin, nr);
    for (int k0 = 0; k0 < K || k0 == 0; k0 += GEMM_KC) {
        int kc = MLM_MIN(GEMM_KC, K - k0), last = k0 + GEMM_KC >= K;
        for (int j = j_begin; j < j_end; j += nr) {
            const float *b = p->bp + (size_t)(j / nr) * K * nr + (size_t)k0 * nr;
            for (int i = i_begin; i < i_end; i += mr) {
                if (k->direct && kc > 0 && kc == K && i + mr <= p->rows && j + nr <= p->N) {
                    // All of K in one block and a whole register block: straight to C.
                    int in_place = p->a_in_place;  // (a whole block is never the packed partial panel)
                    const float *a = in_place ? p->A + (size_t)(p->row0 + i) * p->lda
                                              : p->ap + (size_t)(i / mr) * K * mr;
                    k->direct(kc, a, in_place ? p->lda : 1, in_place ? 1 : mr, b, nr,
                              p->C + (size_t)(p->row0 + i) * p->ldc + j, p->ldc, p->alpha, p->beta,
                              p->bias ? p->bias + j : NULL);
                    continue;
                }
                // This micro-tile's accumulators in the tile's buffer (they persist between K blocks).
                float *t = acc + ((size_t)((i - i_begin) / mr) * tile_panels_j + (j - j_begin) / nr) * mr * nr;
                if (k0 == 0) memset(t, 0, sizeof(float) * (size_t)mr * nr);  // +0 (K == 0: C = beta * C)
                if (last)
                    prefetch_c(p->C + (size_t)(p->row0 + i) * p->ldc + j, p->ldc, MLM_MIN(mr, i_end - i),
                               MLM_MIN(nr, j_end - j));
                if (kc > 0 && p->a_in_place && i + mr <= p->rows) {
                    k->strided(kc, p->A + (size_t)(p->row0 + i) * p->lda + k0, p->lda, 1, b, nr, t);
                } else if (kc > 0) {
                    const float *a = p->ap + (size_t)(p->a_in_place ? 0 : i / mr) * K * mr + (size_t)k0 * mr;
                    k->kernel(kc, a, b, t);
                }
                if (last)
                    store_tile(p->C + (size_t)(p->row0 + i) * p->ldc + j, p->ldc, t, nr, MLM_MIN(mr, i_end - i),
                               MLM_MIN(nr, j_end - j), p->alpha, p->beta, p->bias ? p->bias + j : NULL);
            }
        }
        if (K == 0) break;
    }
}

// Tile size for this product: the kernel's MC x NC, cut down (in whole register blocks) until there are at
// least 4 tiles per thread when the product is big enough to share, so that dynamic scheduling can even out
// a thread slowed by another process. Any tiling gives the same bits.
static void choose_tiles(Product *p, int threads) {
    const GemmKernel *k = p->k;
    int mc = MLM_MIN(k->mc, MLM_CEIL_DIV(p->rows, k->mr) * k->mr);
    int nc = MLM_MIN(k->nc, MLM_CEIL_DIV(p->N, k->nr) * k->nr);
    int want = threads > 1 ? 4 * threads : 1;
    while (MLM_CEIL_DIV(p->rows, mc) * MLM_CEIL_DIV(p->N, nc) < want) {
        if (mc >= nc / 2 && mc > k->mr) {
            mc = MLM_MAX(k->mr, (mc / 2 / k->mr) * k->mr);
        } else if (nc > k->nr) {
            nc = MLM_MAX(k->nr, (nc / 2 / k->nr) * k->nr);
        } else if (mc > k->mr) {
            mc = MLM_MAX(k->mr, (mc / 2 / k->mr) * k->mr);
        } else {
            break;
        }
    }
    p->tile_rows = mc;
    p->tile_cols = nc;
}

// This thread's share [*q0, *q1) of n panels inside a parallel region: contiguous, so that the packing loops
// read each source row once per thread.
static void thread_share(int n, int *q0, int *q1) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *q0 = (int)((long)n * t / nt);
    *q1 = (int)((long)n * (t + 1) / nt);
}

// Packs the operands and runs the tiles: the body of the parallel region (parallel: every thread of the team
// calls it, and the loops are shared out), or the whole product on the calling thread (matmul_serial, often
// inside another parallel region, where a worksharing loop would bind to that region's team).
static void gemm_body(const Product *p, const float *A, int lda, int trans_a, const float *B, int ldb, int trans_b,
                      int chunk_rows, float *acc, int parallel) {
    const GemmKernel *k = p->k;
    float *bp = (float *)p->bp, *ap = (float *)p->ap;
    int panels_b = MLM_CEIL_DIV(p->N, k->nr);
    if (parallel) {
        int q0, q1;
        thread_share(panels_b, &q0, &q1);
        pack_b(k, bp, B, ldb, trans_b, p->K, p->N, q0, q1);
#pragma omp barrier
    } else {
        pack_b(k, bp, B, ldb, trans_b, p->K, p->N, 0, panels_b);
    }
    for (int row0 = 0; row0 < p->M; row0 += chunk_rows) {
        Product chunk = *p;  // this chunk's rows (the tiling was chosen for a whole chunk)
        chunk.row0 = row0;
        chunk.rows = MLM_MIN(chunk_rows, p->M - row0);
        int panels_a = MLM_CEIL_DIV(chunk.rows, k->mr);
        int tiles_m = MLM_CEIL_DIV(chunk.rows, p->tile_rows), tiles_n = MLM_CEIL_DIV(p->N, p->tile_cols);
        if (p->a_in_place) {
            // Only a partial last panel is packed (zero-padded), as panel 0, by one thread; the barrier at the
            // end of `single` publishes it before any tile reads it.
            int last = chunk.rows / k->mr;
            if (chunk.rows % k->mr != 0) {
                if (parallel) {
#pragma omp single
                    pack_a(ap, A, lda, trans_a, p->K, row0 + last * k->mr, chunk.rows - last * k->mr, k->mr, 0, 1);
                } else {
                    pack_a(ap, A, lda, trans_a, p->K, row0 + last * k->mr, chunk.rows - last * k->mr, k->mr, 0, 1);
                }
            }
        } else if (parallel) {
            int q0, q1;
            thread_share(panels_a, &q0, &q1);
            pack_a(ap, A, lda, trans_a, p->K, row0, chunk.rows, k->mr, q0, q1);
#pragma omp barrier
        } else {
            pack_a(ap, A, lda, trans_a, p->K, row0, chunk.rows, k->mr, 0, panels_a);
        }
        if (parallel) {
#pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < tiles_m * tiles_n; t++) run_tile(&chunk, t / tiles_n, t % tiles_n, acc);
        } else {
            for (int t = 0; t < tiles_m * tiles_n; t++) run_tile(&chunk, t / tiles_n, t % tiles_n, acc);
        }
    }
}

// ---- Small products (attention's per-head [T, hs] x [hs, T] and the like): packing both operands costs more
// than the arithmetic, so the kernel reads op(A) where it lies (rows i.. at A + i * lda, or columns at A + i
// with trans_a) and op(B)'s rows in place when they are contiguous (no trans_b); only a partial register block
// at an edge, and op(B) with trans_b, are packed. Same kernels, same summation order, same bits.
enum { GEMM_SMALL_WORK = 64 * 64 * 64 };

static void gemm_small(const GemmKernel *k, int trans_a, int trans_b, int M, int N, int K, float alpha,
                       const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc,
                       const float *bias) {
    int mr = k->mr, nr = k->nr;
    float *bp = buffer_get(&ws_b, (size_t)MLM_MAX(K, 1) * nr, "the matmul's packed B");
    float *ap = buffer_get(&ws_a, (size_t)MLM_MAX(K, 1) * mr, "the matmul's packed A");
    float *acc = buffer_get(&ws_acc, (size_t)mr * nr, "the matmul's accumulators");
    ptrdiff_t rs_a = trans_a ? 1 : lda, cs_a = trans_a ? lda : 1;
    for (int j = 0; j < N; j += nr) {
        const float *b = B + j;
        ptrdiff_t rs_b = ldb;
        if (trans_b || j + nr > N) {
            pack_b(k, bp, B + (trans_b ? (size_t)j * ldb : (size_t)j), ldb, trans_b, K, N - j, 0, 1);
            b = bp, rs_b = nr;
        }
        for (int i = 0; i < M; i += mr) {
            if (k->direct && K > 0 && i + mr <= M && j + nr <= N) {
                k->direct(K, A + (size_t)i * rs_a, rs_a, cs_a, b, rs_b, C + (size_t)i * ldc + j, ldc, alpha, beta,
                          bias ? bias + j : NULL);
                continue;
            }
            memset(acc, 0, sizeof(float) * (size_t)mr * nr);
            if (K > 0 && i + mr <= M) {
                k->strided(K, A + (size_t)i * rs_a, rs_a, cs_a, b, rs_b, acc);
            } else if (K > 0) {
                pack_a(ap, A, lda, trans_a, K, i, M - i, mr, 0, 1);
                k->strided(K, ap, 1, mr, b, rs_b, acc);
            }
            store_tile(C + (size_t)i * ldc + j, ldc, acc, nr, MLM_MIN(mr, M - i), MLM_MIN(nr, N - j), alpha, beta,
                       bias ? bias + j : NULL);
        }
    }
}

static void gemm(int parallel, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc, const float *bias) {
    if (M <= 0 || N <= 0) return;
    if (K < 0) K = 0;
    const GemmKernel *k = choose_kernel(N);
    int mr = k->mr, nr = k->nr;
    // Rows of op(A) packed at a time: all of them unless that passes GEMM_PACK_A_BYTES.
    size_t chunk_panels = MLM_MAX(GEMM_PACK_A_BYTES / (sizeof(float) * (size_t)mr * MLM_MAX(K, 1)), (size_t)1);
    int chunk_rows = (int)MLM_MIN((size_t)MLM_CEIL_DIV(M, mr), chunk_panels) * mr;
    int threads = parallel && (double)M * N * K >= MLM_PARALLEL_MIN_WORK ? omp_get_max_threads() : 1;
    if (threads == 1 && (double)M * N * K <= GEMM_SMALL_WORK) {
        gemm_small(choose_small_kernel(k, M, N), trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias);
        return;
    }

    // op(A) = A is read where it lies (each micro-kernel call reads mr rows along k: mr sequential streams that
    // stay in L1 while the tile's column panels reuse them); packing it cost about a quarter of the arithmetic
    // at the model's K of 128 - 256 (a strided copy per element). op(A) = A^T is packed: in place its k-th values
    // would be lda apart.
    int a_in_place = !trans_a;
    Product p = {k, M, N, K, alpha, beta, C, ldc, NULL, 0, MLM_MIN(chunk_rows, M), A, lda, a_in_place, bias, NULL, 0, 0};
    choose_tiles(&p, threads);
    p.bp = buffer_get(&ws_b, (size_t)MLM_CEIL_DIV(N, nr) * MLM_MAX(K, 1) * nr, "the matmul's packed B");
    p.ap = buffer_get(&ws_a, (a_in_place ? (size_t)mr : (size_t)chunk_rows) * MLM_MAX(K, 1), "the matmul's packed A");
    size_t acc_per_thread = (size_t)p.tile_rows * p.tile_cols;
    float *acc = buffer_get(&ws_acc, acc_per_thread * threads, "the matmul's accumulators");
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        gemm_body(&p, A, lda, trans_a, B, ldb, trans_b, chunk_rows, acc + acc_per_thread * omp_get_thread_num(), 1);
    } else {
        gemm_body(&p, A, lda, trans_a, B, ldb, trans_b, chunk_rows, acc, 0);
    }
}

void matmul_builtin(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    gemm(1, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
}

void matmul_builtin_serial(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                           const float *B, int ldb, float beta, float *C, int ldc) {
    gemm(0, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
}

void matmul_builtin_bias(int trans_a, int trans_b, int M, int N, int K, const float *A, int lda, const float *B,
                         int ldb, const float *bias, float *C, int ldc) {
    gemm(1, trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, 1.0f, C, ldc, bias);
}
