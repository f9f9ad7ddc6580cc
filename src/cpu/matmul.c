// matmul.c: row-major SGEMM (a CBLAS wrapper and the built-in blocked OpenMP fallback) and the Linear layer.
#include "cpu/matmul.h"
#include "cpu/ops.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"

#ifdef MLM_HAVE_CBLAS
#include <cblas.h>
#endif

// Tile sizes of the fallback: an A panel [MB, KB] (64 KiB) and a B panel [KB, NB] (128 KiB) stay in L2,
// and the accumulator [MB, NB] (32 KiB) in L1/L2.
enum { MM_MB = 64, MM_NB = 128, MM_KB = 256 };

// Element (i, k) of op(A) and (k, j) of op(B).
static inline float op_a(const float *A, int lda, int trans_a, int i, int k) {
    return trans_a ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
}
static inline float op_b(const float *B, int ldb, int trans_b, int k, int j) {
    return trans_b ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
}

// Copy op(A)[i0:i0+mb, k0:k0+kb] into ap[mb, kb] and op(B)[k0:k0+kb, j0:j0+nb] into bp[kb, nb], so
// that the inner loop below runs over contiguous memory whatever the transposes are.
static void pack_a(float *ap, const float *A, int lda, int trans_a, int i0, int mb, int k0, int kb) {
    for (int i = 0; i < mb; i++)
        for (int k = 0; k < kb; k++) ap[i * kb + k] = op_a(A, lda, trans_a, i0 + i, k0 + k);
}
static void pack_b(float *bp, const float *B, int ldb, int trans_b, int k0, int kb, int j0, int nb) {
    if (!trans_b) {
        for (int k = 0; k < kb; k++) memcpy(bp + k * nb, B + (size_t)(k0 + k) * ldb + j0, (size_t)nb * sizeof(float));
        return;
    }
    for (int k = 0; k < kb; k++)
        for (int j = 0; j < nb; j++) bp[k * nb + j] = B[(size_t)(j0 + j) * ldb + k0 + k];
}

// acc[mb, nb] += ap[mb, kb] * bp[kb, nb]; k ascending for every element (the fixed summation order).
static void tile_multiply(float *acc, const float *ap, const float *bp, int mb, int nb, int kb) {
    for (int i = 0; i < mb; i++) {
        float *row = acc + i * nb;
        for (int k = 0; k < kb; k++) {
            float a = ap[i * kb + k];
            const float *brow = bp + k * nb;
            for (int j = 0; j < nb; j++) row[j] += a * brow[j];
        }
    }
}

void matmul_fallback(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
    int tiles_m = MLM_CEIL_DIV(M, MM_MB), tiles_n = MLM_CEIL_DIV(N, MM_NB);
    int n_tiles = tiles_m * tiles_n;
#pragma omp parallel if ((double)M * N * K >= MLM_PARALLEL_MIN_WORK)
    {
        // Per-thread panels; each output tile is owned by exactly one thread, so no reduction crosses threads.
        float *ap = mlm_malloc(sizeof(float) * MM_MB * MM_KB, "matmul A panel");
        float *bp = mlm_malloc(sizeof(float) * MM_KB * MM_NB, "matmul B panel");
        float *acc = mlm_malloc(sizeof(float) * MM_MB * MM_NB, "matmul accumulator");
#pragma omp for schedule(static)
        for (int tile = 0; tile < n_tiles; tile++) {
            int i0 = (tile / tiles_n) * MM_MB, j0 = (tile % tiles_n) * MM_NB;
            int mb = MLM_MIN(MM_MB, M - i0), nb = MLM_MIN(MM_NB, N - j0);
            memset(acc, 0, sizeof(float) * (size_t)mb * nb);
            for (int k0 = 0; k0 < K; k0 += MM_KB) {
                int kb = MLM_MIN(MM_KB, K - k0);
                pack_a(ap, A, lda, trans_a, i0, mb, k0, kb);
                pack_b(bp, B, ldb, trans_b, k0, kb, j0, nb);
                tile_multiply(acc, ap, bp, mb, nb, kb);
            }
            for (int i = 0; i < mb; i++) {
                float *c = C + (size_t)(i0 + i) * ldc + j0;
                const float *a = acc + i * nb;
                if (beta == 0.0f) {
                    for (int j = 0; j < nb; j++) c[j] = alpha * a[j];
                } else {
                    for (int j = 0; j < nb; j++) c[j] = alpha * a[j] + beta * c[j];
                }
            }
        }
        free(ap);
        free(bp);
        free(acc);
    }
}

// ---- Keeping the BLAS on the calling thread.
//
// matmul() runs one single-threaded sgemm per tile inside its own OpenMP loop. A multithreaded BLAS
// (OpenBLAS's pthread build starts a pool of nproc - 1 threads when it loads) must be told to stay on
// the caller, or its threads spin beside OpenMP's. This is asked of whatever library is loaded at run
// time, by name: the cblas.h seen at compile time need not belong to the library that runs (on Debian
// the netlib cblas.h and an OpenBLAS libblas.so.3 picked by update-alternatives go together), so an
// #ifdef OPENBLAS_VERSION test can miss it.
static const char *const BLAS_THREAD_SETTERS[] = {"openblas_set_num_threads", "bli_thread_set_num_threads",
                                                  "MKL_Set_Num_Threads"};

static void blas_use_one_thread(void) {
    for (size_t i = 0; i < sizeof(BLAS_THREAD_SETTERS) / sizeof(BLAS_THREAD_SETTERS[0]); i++) {
        void (*set_threads)(int);
        *(void **)&set_threads = dlsym(RTLD_DEFAULT, BLAS_THREAD_SETTERS[i]);
        if (set_threads) set_threads(1);
    }
}

void matmul_init(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, blas_use_one_thread);
}

int matmul_blas_threads(void) {
    int (*get_threads)(void);
    *(void **)&get_threads = dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
    return get_threads ? get_threads() : -1;
}

#ifdef MLM_HAVE_CBLAS
// ---- The BLAS path: a fixed grid of tiles over C, one single-threaded sgemm per tile.
//
// The grid depends only on (M, N, K), never on the thread count, and each element of C is computed by one
// sgemm call, so the results are the same for any number of threads, whichever thread takes which tile
// (tiles are handed out dynamically, which evens out a core slowed by another process). Each call packs its
// panels of op(A) (mb x K) and op(B) (K x nb) again, mb * K + K * nb floats per mb * nb * K multiply-adds,
// so the grid is as coarse as the parallelism allows: a power-of-two tile count near work / MM_TILE_WORK
// and at least MM_MIN_TILES (shared evenly by 1, 2, 4 threads), cut into the tiles that pack the least.
// The former grid of 64-row tiles repacked each weight matrix 32 times per product at 2,048 rows (21% of a
// 1-thread training step in packing); this one stays within a few percent of one whole-matrix sgemm at
// 1 thread on the reference shapes (measured with a per-shape loop, see bench/README.md).
enum { MM_TILE_WORK = 32 << 20, MM_MIN_TILES = 4, MM_MAX_TILES = 64, MM_ALIGN = 16 };

typedef struct {
    int rows, cols;     // tile size (the last row / column of tiles may be smaller)
    int tiles_m, tiles_n;
} TileGrid;

static int round_up(int x, int to) { return MLM_CEIL_DIV(x, to) * to; }

// The grid of `want` tiles (tm x tn = want) with the least packing per multiply-add; 0 when none fits.
static int best_grid(int M, int N, int want, TileGrid *best) {
    double best_cost = 1e300;
    for (int tm = 1; tm <= want; tm *= 2) {
        int tn = want / tm;
        int rows = MLM_MIN(round_up(MLM_CEIL_DIV(M, tm), MM_ALIGN), M);
        int cols = MLM_MIN(round_up(MLM_CEIL_DIV(N, tn), MM_ALIGN), N);
        TileGrid g = {rows, cols, MLM_CEIL_DIV(M, rows), MLM_CEIL_DIV(N, cols)};
        if (g.tiles_m * g.tiles_n != want) continue;  // too thin to cut that way
        double cost = 1.0 / rows + 1.0 / cols;
        if (cost < best_cost) best_cost = cost, *best = g;
    }
    return best_cost < 1e300;
}

static TileGrid tile_grid(int M, int N, int K) {
    double work = (double)M * N * (K > 0 ? K : 1);
    int want = 1;  // the power of two nearest (in ratio) to work / MM_TILE_WORK, at least MM_MIN_TILES
    while (want < MM_MAX_TILES && work / (2.0 * want) >= MM_TILE_WORK * 0.7071) want *= 2;
    if (work >= MLM_PARALLEL_MIN_WORK) want = MLM_MAX(want, MM_MIN_TILES);
    TileGrid g = {M, N, 1, 1};
    while (want > 1 && !best_grid(M, N, want, &g)) want /= 2;
    return g;
}

static void matmul_blas(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                        const float *B, int ldb, float beta, float *C, int ldc) {
    matmul_init();
    TileGrid g = tile_grid(M, N, K);
    int n_tiles = g.tiles_m * g.tiles_n;
#pragma omp parallel for schedule(dynamic, 1) if (n_tiles > 1 && (double)M * N * K >= MLM_PARALLEL_MIN_WORK)
    for (int tile = 0; tile < n_tiles; tile++) {
        int i0 = (tile / g.tiles_n) * g.rows, j0 = (tile % g.tiles_n) * g.cols;
        int mb = MLM_MIN(g.rows, M - i0), nb = MLM_MIN(g.cols, N - j0);
        // Rows i0.. of op(A) and columns j0.. of op(B), wherever the transposes put them.
        const float *a = trans_a ? A + i0 : A + (size_t)i0 * lda;
        const float *b = trans_b ? B + (size_t)j0 * ldb : B + j0;
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    mb, nb, K, alpha, a, lda, b, ldb, beta, C + (size_t)i0 * ldc + j0, ldc);
    }
}
#endif

void matmul(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
            const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
#ifdef MLM_HAVE_CBLAS
    matmul_blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
    matmul_fallback(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

void matmul_serial(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
#ifdef MLM_HAVE_CBLAS
    matmul_init();
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float acc = 0.0f;
            for (int k = 0; k < K; k++) acc += op_a(A, lda, trans_a, i, k) * op_b(B, ldb, trans_b, k, j);
            float *c = C + (size_t)i * ldc + j;
            *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
        }
#endif
}

const char *matmul_backend_name(void) {
#ifdef MLM_HAVE_CBLAS
    return MLM_BLAS_NAME;
#else
    return "builtin";
#endif
}

// ---- Linear layer: y = x W^T + b with W [out, in], as torch.nn.Linear.

void linear_forward(float *out, const float *inp, const float *w, const float *b, int N, int IC, int OC) {
    if (b != NULL) {
        // Start from the bias and let the GEMM accumulate onto it (beta = 1): one pass over out fewer.
#pragma omp parallel for schedule(static) if ((long long)N * OC >= MLM_PARALLEL_MIN_WORK)
        for (int n = 0; n < N; n++) memcpy(out + (size_t)n * OC, b, (size_t)OC * sizeof(float));
    }
    matmul(0, 1, N, OC, IC, 1.0f, inp, IC, w, IC, b != NULL ? 1.0f : 0.0f, out, OC);
}

// Columns per task of column_sums_accumulate: a task owns whole columns and adds the rows in order.
enum { COLSUM_BLOCK = 16 };

void column_sums_accumulate(float *sums, const float *x, int N, int C) {
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int c0 = 0; c0 < C; c0 += COLSUM_BLOCK) {
        int c1 = MLM_MIN(c0 + COLSUM_BLOCK, C);
        for (int n = 0; n < N; n++) {
            const float *row = x + (size_t)n * C;  // [C]
            for (int c = c0; c < c1; c++) sums[c] += row[c];
        }
    }
}

void linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                     int N, int IC, int OC) {
    if (dinp != NULL) matmul(0, 0, N, IC, OC, 1.0f, dout, OC, w, IC, 0.0f, dinp, IC);  // [N,OC] x [OC,IC]
    matmul(1, 0, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dw, IC);                     // [OC,N] x [N,IC]
    if (db != NULL) column_sums_accumulate(db, dout, N, OC);
}
