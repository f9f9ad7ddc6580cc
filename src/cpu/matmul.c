// matmul.c: row-major SGEMM entry points (an optimized CBLAS when the build has one, else the built-in GEMM
// of gemm.c), which matmul runs and why, and the Linear layer.
#define _GNU_SOURCE  // dladdr (blas_id.h), before any header
#include "cpu/matmul.h"
#include "cpu/ops.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/blas_id.h"
#include "mlm/common.h"
#include "mlm/cpu.h"

#ifdef MLM_HAVE_CBLAS
// The CBLAS interface is declared here rather than taken from a cblas.h: the header found at build time need
// not belong to the library that runs (Debian's alternatives switch them separately), and the interface
// (enum values and the sgemm signature) is fixed by the CBLAS standard.
enum { CblasRowMajor = 101, CblasNoTrans = 111, CblasTrans = 112 };
void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);
#endif

// Why CMake chose what it chose (the status line of its "CBLAS for the CPU backend" block).
#ifndef MLM_BLAS_WHY
#define MLM_BLAS_WHY "built without CMake's BLAS selection"
#endif
#ifdef MLM_HAVE_CBLAS
#define MLM_BLAS_LINKED 1
#else
#define MLM_BLAS_LINKED 0
#endif

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

// bias (or NULL): each tile's rows of C are set to it just before the tile's sgemm (beta 1).
static void matmul_blas(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                        const float *B, int ldb, float beta, float *C, int ldc, const float *bias) {
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
        if (bias != NULL)
            for (int i = 0; i < mb; i++) memcpy(C + (size_t)(i0 + i) * ldc + j0, bias + j0, (size_t)nb * sizeof(float));
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    mb, nb, K, alpha, a, lda, b, ldb, beta, C + (size_t)i0 * ldc + j0, ldc);
    }
}
#endif

// ---- Which matmul runs, decided once per process.
//
// A CBLAS build calls the library only when it identifies itself as an optimized BLAS (blas_id.h) or when it
// was named explicitly at configure time (MLM_BLAS=path-or-name: MLM_BLAS_FORCED); otherwise (the reference
// BLAS that an alternatives switch put behind libblas.so.3 after the build, say) the built-in GEMM runs,
// which is several times faster than a reference BLAS.
typedef struct {
    int use_blas;
    BlasId id;
} MatmulChoice;

static MatmulChoice choice;

static void choose_matmul(void) {
#ifdef MLM_HAVE_CBLAS
    blas_identify(&choice.id, (void *)cblas_sgemm);
#ifdef MLM_BLAS_FORCED
    choice.use_blas = 1;
#else
    choice.use_blas = choice.id.vendor != NULL;
#endif
#endif
}

static const MatmulChoice *matmul_choice(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, choose_matmul);
    return &choice;
}

void matmul(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
            const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
#ifdef MLM_HAVE_CBLAS
    if (matmul_choice()->use_blas) {
        matmul_blas(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, NULL);
        return;
    }
#endif
    matmul_builtin(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void matmul_bias(int trans_a, int trans_b, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                 const float *bias, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
#ifdef MLM_HAVE_CBLAS
    if (matmul_choice()->use_blas) {
        matmul_blas(trans_a, trans_b, M, N, K, 1.0f, A, lda, B, ldb, 1.0f, C, ldc, bias);
        return;
    }
#endif
    matmul_builtin_bias(trans_a, trans_b, M, N, K, A, lda, B, ldb, bias, C, ldc);
}

void matmul_serial(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc) {
    if (M <= 0 || N <= 0) return;
#ifdef MLM_HAVE_CBLAS
    if (matmul_choice()->use_blas) {
        matmul_init();
        cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
#endif
    matmul_builtin_serial(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

const char *matmul_backend_name(void) {
    const MatmulChoice *c = matmul_choice();
    if (!c->use_blas) return "builtin";
    return c->id.vendor ? c->id.vendor : "CBLAS";
}

void cpu_matmul_describe(char *buf, size_t n) {
    const MatmulChoice *c = matmul_choice();
    if (c->use_blas && c->id.vendor) {
        char core[96] = "";
        if (c->id.core[0]) snprintf(core, sizeof(core), ", %.63s kernels", c->id.core);
        snprintf(buf, n, "%s%s (%s)", c->id.version[0] ? c->id.version : c->id.vendor, core,
                 c->id.file[0] ? c->id.file : "linked statically");
    } else if (c->use_blas) {
        snprintf(buf, n, "CBLAS %s, named by MLM_BLAS at configure time; it is no known optimized BLAS",
                 c->id.file[0] ? c->id.file : "(linked statically)");
    } else if (MLM_BLAS_LINKED) {
        snprintf(buf, n, "built-in, %s kernel: the linked CBLAS %s is no optimized BLAS (OpenBLAS, BLIS or MKL), "
                 "so it is not used", gemm_kernel_name(), c->id.file[0] ? c->id.file : "(linked statically)");
    } else {
        snprintf(buf, n, "built-in, %s kernel (%s)", gemm_kernel_name(), MLM_BLAS_WHY);
    }
}

// ---- Linear layer: y = x W^T + b with W [out, in], as torch.nn.Linear.

void linear_forward(float *out, const float *inp, const float *w, const float *b, int N, int IC, int OC) {
    // The bias added by the GEMM (as a start it accumulates onto, beta = 1): no separate pass over out.
    if (b != NULL) matmul_bias(0, 1, N, OC, IC, inp, IC, w, IC, b, out, OC);
    else matmul(0, 1, N, OC, IC, 1.0f, inp, IC, w, IC, 0.0f, out, OC);
}

// Columns per task of column_sums_accumulate: a task owns whole columns and adds the rows in order. 64 columns are
// four AVX-512 registers of independent sums: each column's sum is a chain of dependent adds, one per row, so one
// register's worth (16 columns) waited on the adder's latency at every row.
enum { COLSUM_BLOCK = 64 };

// acc[width] += the rows of x[N, C] from column c0, in row order.
static inline __attribute__((always_inline)) void column_block_sums(float *acc, const float *x, int N, int C, int c0,
                                                                    int width) {
    for (int n = 0; n < N; n++) {
        const float *row = x + (size_t)n * C + c0;  // [width]
        for (int c = 0; c < width; c++) acc[c] += row[c];
    }
}

void column_sums_accumulate(float *sums, const float *x, int N, int C) {
#pragma omp parallel for schedule(static) if ((long long)N * C >= MLM_PARALLEL_MIN_WORK)
    for (int c0 = 0; c0 < C; c0 += COLSUM_BLOCK) {
        int width = MLM_MIN(COLSUM_BLOCK, C - c0);
        // The running sums in a local array, not in sums[] (which may alias x for all the compiler knows, so it
        // would load and store them on every row): the same additions in the same order. A whole block with the
        // width a constant, so that the sums stay in registers.
        float acc[COLSUM_BLOCK];
        for (int c = 0; c < width; c++) acc[c] = sums[c0 + c];
        if (width == COLSUM_BLOCK) column_block_sums(acc, x, N, C, c0, COLSUM_BLOCK);
        else column_block_sums(acc, x, N, C, c0, width);
        for (int c = 0; c < width; c++) sums[c0 + c] = acc[c];
    }
}

void linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                     int N, int IC, int OC) {
    if (dinp != NULL) matmul(0, 0, N, IC, OC, 1.0f, dout, OC, w, IC, 0.0f, dinp, IC);  // [N,OC] x [OC,IC]
    matmul(1, 0, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dw, IC);                     // [OC,N] x [N,IC]
    if (db != NULL) column_sums_accumulate(db, dout, N, OC);
}
