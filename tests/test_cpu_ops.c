// test_cpu_ops.c: every CPU op's backward against central finite differences, matmul paths against a naive
// loop, the dropout rule and its Philox stream against cuRAND, and the optimizer and schedules against
// direct double-precision evaluations of their formulas.
//
// Finite differences (FD): each op's output y is reduced to a scalar L = sum_i y_i * r_i with fixed random
// weights r (accumulated in double), so dL/dy = r is what the backward receives. The central difference
// (L(x + h) - L(x - h)) / (x+ - x-) uses the perturbation actually representable in float. Its error has
// two parts: truncation ~ h^2 |L3| / 6 (L3 the third derivative), about 2e-5 for h = 1e-2 and O(1)
// curvature (inputs, weights and r are O(1)), and the float rounding of the forward: each y_i carries
// ~1 ulp (~1e-7 |y_i|) of error with effectively random sign, so L carries ~1e-7 sqrt(n) max|y r| ~ 1e-6
// for n ~ 100, i.e. ~5e-5 after dividing by 2h. The check is |analytic - fd| <= ATOL + RTOL |fd| with
// ATOL = 2e-4 and RTOL = 5e-3: a few times these bounds, while any wrong term of a backward (a missing
// factor, a transposed index) is off by O(|fd|). Measured errors are printed (typically 1e-6 .. 3e-5).
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/matmul.h"
#include "cpu/ops.h"
#ifdef MLM_HAVE_CUDA
#include "mlm/curand_check.h"
#endif
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "attention_ref.h"
#include "philox_cpu.h"
#include "test_util.h"

// ---- Small deterministic helpers --------------------------------------------------------------------

static uint64_t lcg_state = 12345;
static double rand_unit(void) {  // uniform in [0, 1)
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(lcg_state >> 11) / 9007199254740992.0;
}
static float rand_sym(float a) { return (float)((2.0 * rand_unit() - 1.0) * a); }
static void fill_rand(float *x, size_t n, float a) {
    for (size_t i = 0; i < n; i++) x[i] = rand_sym(a);
}
static float *alloc_rand(size_t n, float a) {
    float *x = mlm_malloc(n * sizeof(float), "test tensor");
    fill_rand(x, n, a);
    return x;
}
static float *alloc_zero(size_t n) { return mlm_calloc(n, sizeof(float), "test tensor"); }

static double dot_double(const float *y, const float *r, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)y[i] * r[i];
    return s;
}

// The scalar being differentiated: runs the op's forward on the current inputs and returns L in double.
typedef double (*LossFn)(void *ctx);

#define FD_ATOL 2e-4
#define FD_RTOL 5e-3

// Compare analytic[i] with the central difference of f over x[i] for every i; print and return the worst
// |analytic - fd| / (ATOL + RTOL |fd|) (<= 1 passes) and the worst absolute error.
static double fd_check(const char *what, LossFn f, void *ctx, float *x, const float *analytic, size_t n, float h,
                       double atol, double rtol) {
    double worst_ratio = 0.0, worst_abs = 0.0, worst_rel = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        float x0 = x[i];
        float xp = x0 + h, xm = x0 - h;
        x[i] = xp;
        double lp = f(ctx);
        x[i] = xm;
        double lm = f(ctx);
        x[i] = x0;
        double fd = (lp - lm) / ((double)xp - (double)xm);
        double err = fabs((double)analytic[i] - fd);
        double ratio = err / (atol + rtol * fabs(fd));
        if (isnan(ratio)) ratio = INFINITY;  // a NaN gradient or loss fails (the comparisons below would skip it)
        double rel = err / fmax(fabs(fd), 1e-3);
        if (ratio > worst_ratio) { worst_ratio = ratio; at = i; }
        if (err > worst_abs) worst_abs = err;
        if (rel > worst_rel) worst_rel = rel;
    }
    printf("  %-44s n=%4zu  max |err| %.2e  max rel err %.2e  (worst/tol %.3f at %zu)\n", what, n, worst_abs,
           worst_rel, worst_ratio, at);
    CHECK(worst_ratio <= 1.0, "%s: FD mismatch, worst error/tolerance %.3f at element %zu", what, worst_ratio, at);
    return worst_ratio;
}

// ---- matmul -----------------------------------------------------------------------------------------

// The exact product in double, and per element the rounding bound of a float computation of it: a sum of K
// products accumulated in float in ANY order (fma or not) is within gamma_K * sum_k |a_k b_k| of the exact
// sum, gamma_n = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability, 3.1); the epilogue alpha * s +
// beta * c adds at most three more roundings of terms bounded by |alpha| sum |a b| + |beta c|. So
// bound = gamma_{K+3} (|alpha| sum_k |a_k b_k| + |beta c|). It is a worst case, K u ~ 2e-5 relative at K = 300,
// while a wrong element, transpose or leading dimension, a term dropped or counted twice, is off by about a
// whole term (1 / K of the sum, ~3e-3 relative at K = 300).
static void reference_matmul(int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                             const float *B, int ldb, float beta, const float *C0, double *want, double *bound,
                             int ldc) {
    const double u = 1.0 / 16777216.0, gamma = (K + 3) * u / (1.0 - (K + 3) * u);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double s = 0.0, abs_sum = 0.0;
            for (int k = 0; k < K; k++) {
                double a = ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                double b = tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                s += a * b;
                abs_sum += fabs(a * b);
            }
            double c = beta != 0.0f ? (double)beta * C0[(size_t)i * ldc + j] : 0.0;
            want[(size_t)i * ldc + j] = alpha * s + c;
            bound[(size_t)i * ldc + j] = gamma * (fabs(alpha) * abs_sum + fabs(c));
        }
}

typedef void MatmulFn(int, int, int, int, int, float, const float *, int, const float *, int, float, float *, int);

// The built-in GEMM's kernels this CPU can run (each forced in turn below).
static const char *const GEMM_KERNELS[] = {"avx512", "avx512n", "avx2", "generic"};

// Worst |got - want| / bound over C[M, N] (INFINITY for a NaN), and whether the padding columns j >= N kept
// their values (beta != 0: C0's; beta == 0: the NaN they started with, since C must not be read or written there).
static double worst_ratio(const float *got, const double *want, const double *bound, const float *C0, float beta,
                          int M, int N, int ldc, int *pad_ok) {
    double worst = 0.0;
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            size_t k = (size_t)i * ldc + j;
            double err = fabs((double)got[k] - want[k]);
            worst = isnan(got[k]) ? INFINITY : fmax(worst, err / fmax(bound[k], 1e-30));
        }
        size_t k = (size_t)i * ldc + N;
        if (!(beta == 0.0f ? isnan(got[k]) : got[k] == C0[k])) *pad_ok = 0;
    }
    return worst;
}

static void test_matmul(void) {
    printf("matmul (%s), matmul_serial and the built-in GEMM (each kernel: %s) vs the exact product, within the "
           "rounding bound\n", matmul_backend_name(), gemm_kernel_name());
    // Odd sizes that cross every kernel's register blocks (12 x 32, 6 x 16, 4 x 16), the tiles and the K
    // block of 256, with padded leading dimensions; K = 0 (C = beta C) and one row or column.
    const int shapes[][3] = {{1, 1, 1}, {5, 7, 3}, {67, 129, 300}, {130, 67, 257}, {33, 260, 17},
                             {13, 33, 513}, {3, 5, 0}, {1, 100, 40}, {100, 1, 40}};
    double worst_all = 0.0;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int M = shapes[s][0], N = shapes[s][1], K = shapes[s][2];
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int bi = 0; bi < 2; bi++) {
                    float alpha = 0.75f, beta = bi ? 0.5f : 0.0f;
                    int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 2, ldc = N + 1;
                    size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
                    float *A = alloc_rand(na, 1.0f), *B = alloc_rand(nb, 1.0f), *C0 = alloc_rand(nc, 1.0f);
                    double *want = mlm_malloc(nc * sizeof(double), "want"), *bound = mlm_malloc(nc * sizeof(double), "bound");
                    reference_matmul(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C0, want, bound, ldc);
                    float *got = mlm_malloc(nc * sizeof(float), "c"), *first = mlm_malloc(nc * sizeof(float), "c");
                    // Every path; the built-in one once per kernel, all of which must give the same bits.
                    MatmulFn *fns[] = {matmul, matmul_serial, matmul_builtin, matmul_builtin_serial};
                    const char *names[] = {"matmul", "matmul_serial", "matmul_builtin", "matmul_builtin_serial"};
                    int n_builtin = 0;
                    for (int f = 0; f < 4; f++)
                        for (int kn = 0; kn < (f == 2 ? 4 : 1); kn++) {  // serial shares the kernels' code
                            if (f == 2 && !gemm_force_kernel(GEMM_KERNELS[kn])) continue;
                            // beta = 0 must not read C: start from NaN there.
                            for (size_t i = 0; i < nc; i++) got[i] = beta != 0.0f ? C0[i] : NAN;
                            fns[f](ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, got, ldc);
                            gemm_force_kernel(NULL);
                            int pad_ok = 1;
                            double r = worst_ratio(got, want, bound, C0, beta, M, N, ldc, &pad_ok);
                            worst_all = fmax(worst_all, r);
                            CHECK(r <= 1.0 && pad_ok, "%s%s%s %dx%dx%d ta=%d tb=%d beta=%g: error %.3g x the rounding "
                                  "bound%s", names[f], f == 2 ? " kernel " : "", f == 2 ? GEMM_KERNELS[kn] : "", M, N,
                                  K, ta, tb, beta, r, pad_ok ? "" : ", and a padding column of C changed");
                            if (f >= 2) {
                                if (n_builtin++ == 0) {
                                    memcpy(first, got, nc * sizeof(float));
                                } else {
                                    size_t differ = 0;
                                    for (int i = 0; i < M; i++)
                                        differ += memcmp(first + (size_t)i * ldc, got + (size_t)i * ldc,
                                                         (size_t)N * sizeof(float)) != 0;
                                    CHECK(differ == 0, "%s kernel %s %dx%dx%d ta=%d tb=%d: %zu rows differ from the "
                                          "first built-in result (every kernel must sum in the same order)", names[f],
                                          f == 2 ? GEMM_KERNELS[kn] : gemm_kernel_name(), M, N, K, ta, tb, differ);
                                }
                            }
                        }
                    free(A); free(B); free(C0); free(want); free(bound); free(got); free(first);
                }
    }
    printf("  worst error / rounding bound over every path, kernel and shape: %.3g\n", worst_all);
}

// matmul() and the built-in GEMM on the model's shapes (tiled in one and two dimensions) give the same bits for
// 1, 2 and 3 threads (the CPU backend's promise: a run resumed with another thread count continues the same
// bits), and the BLAS it calls runs on the calling thread only (OpenBLAS's own pool stays idle).
static void test_matmul_threads(void) {
    printf("matmul and the built-in GEMM: model shapes bit-identical for 1, 2 and 3 threads; BLAS single-threaded\n");
    const int shapes[][5] = {{0, 1, 2048, 384, 128}, {0, 0, 2048, 128, 384}, {1, 0, 384, 128, 2048},
                             {1, 0, 65, 128, 2048},  {0, 1, 2048, 65, 128},  {0, 1, 300, 1000, 64},
                             {0, 1, 200, 300, 256},  {1, 0, 100, 200, 520},  {0, 0, 77, 30, 600}};
    MatmulFn *fns[] = {matmul, matmul_builtin};
    const char *names[] = {"matmul", "matmul_builtin"};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int ta = shapes[s][0], tb = shapes[s][1], M = shapes[s][2], N = shapes[s][3], K = shapes[s][4];
        int lda = ta ? M : K, ldb = tb ? K : N;
        float *A = alloc_rand((size_t)M * K, 1.0f), *B = alloc_rand((size_t)K * N, 1.0f);
        float *C0 = alloc_rand((size_t)M * N, 1.0f), *C[3];  // beta = 1: the tiles must also read C right
        for (int f = 0; f < 2; f++) {
            for (int t = 0; t < 3; t++) {
                C[t] = mlm_malloc((size_t)M * N * sizeof(float), "C");
                memcpy(C[t], C0, (size_t)M * N * sizeof(float));
                omp_set_num_threads(t + 1);
                fns[f](ta, tb, M, N, K, 1.0f, A, lda, B, ldb, 1.0f, C[t], N);
            }
            omp_set_num_threads(2);
            size_t differ = 0;
            for (size_t i = 0; i < (size_t)M * N; i++)
                differ += memcmp(&C[0][i], &C[1][i], sizeof(float)) != 0 || memcmp(&C[0][i], &C[2][i], sizeof(float)) != 0;
            CHECK(differ == 0, "%s %dx%dx%d ta=%d tb=%d: %zu of %d elements differ between 1, 2 and 3 threads",
                  names[f], M, N, K, ta, tb, differ, M * N);
            for (int t = 0; t < 3; t++) free(C[t]);
        }
        free(A); free(B); free(C0);
    }
    int blas_threads = matmul_blas_threads();
    printf("  OpenBLAS threads after matmul_init: %d (-1: no OpenBLAS loaded)\n", blas_threads);
    CHECK(blas_threads == -1 || blas_threads == 1, "OpenBLAS runs %d threads of its own beside OpenMP's", blas_threads);
}

// ---- Linear -------------------------------------------------------------------------------------------

typedef struct {
    int N, IC, OC;
    float *x, *w, *b, *y, *r;
} LinearCtx;

static double linear_loss(void *p) {
    LinearCtx *c = p;
    linear_forward(c->y, c->x, c->w, c->b, c->N, c->IC, c->OC);
    return dot_double(c->y, c->r, (size_t)c->N * c->OC);
}

static void test_linear(void) {
    printf("linear (matmul + bias), N=15 IC=7 OC=5\n");
    LinearCtx c = {15, 7, 5, NULL, NULL, NULL, NULL, NULL};
    size_t nx = (size_t)c.N * c.IC, nw = (size_t)c.OC * c.IC, ny = (size_t)c.N * c.OC;
    c.x = alloc_rand(nx, 1.0f); c.w = alloc_rand(nw, 1.0f); c.b = alloc_rand(c.OC, 1.0f);
    c.y = alloc_zero(ny); c.r = alloc_rand(ny, 1.0f);
    // Forward against the definition y = x W^T + b.
    linear_loss(&c);
    double e = 0.0;
    for (int n = 0; n < c.N; n++)
        for (int o = 0; o < c.OC; o++) {
            double s = c.b[o];
            for (int i = 0; i < c.IC; i++) s += (double)c.x[n * c.IC + i] * c.w[o * c.IC + i];
            e = fmax(e, fabs(s - c.y[n * c.OC + o]));
        }
    printf("  forward vs definition: max |err| %.2e\n", e);
    CHECK(e < 1e-5, "linear forward error %.2e", e);
    // Weight and bias gradients accumulate: start from 1 and subtract it afterwards.
    float *dx = alloc_zero(nx), *dw = alloc_zero(nw), *db = alloc_zero(c.OC);
    for (size_t i = 0; i < nw; i++) dw[i] = 1.0f;
    for (int i = 0; i < c.OC; i++) db[i] = 1.0f;
    linear_backward(dx, dw, db, c.r, c.x, c.w, c.N, c.IC, c.OC);
    for (size_t i = 0; i < nw; i++) dw[i] -= 1.0f;
    for (int i = 0; i < c.OC; i++) db[i] -= 1.0f;
    fd_check("linear d input", linear_loss, &c, c.x, dx, nx, 1e-2f, FD_ATOL, FD_RTOL);
    fd_check("linear d weight (accumulated)", linear_loss, &c, c.w, dw, nw, 1e-2f, FD_ATOL, FD_RTOL);
    fd_check("linear d bias (accumulated)", linear_loss, &c, c.b, db, c.OC, 1e-2f, FD_ATOL, FD_RTOL);
    free(c.x); free(c.w); free(c.b); free(c.y); free(c.r); free(dx); free(dw); free(db);
}

// matmul_bias (the bias added at the GEMM's store, or each BLAS tile's rows filled just before its sgemm) against
// its definition, matmul with every row of C set to the bias and alpha = beta = 1, bit for bit: every transpose,
// a small product (gemm_small), partial register blocks, and a product large enough for threads and the BLAS
// tile grid; with the built-in GEMM and with the matmul this build runs.
static void test_matmul_bias(void) {
    printf("matmul_bias vs matmul over C filled with the bias, bit for bit (%s)\n", matmul_backend_name());
    const int shapes[3][3] = {{7, 5, 3}, {67, 129, 33}, {2051, 131, 128}};
    size_t differ = 0, compared = 0;
    for (int sh = 0; sh < 3; sh++)
        for (int ta = 0; ta < 2; ta++)
            for (int tb = 0; tb < 2; tb++)
                for (int impl = 0; impl < 2; impl++) {
                    int M = shapes[sh][0], N = shapes[sh][1], K = shapes[sh][2];
                    float *A = alloc_rand((size_t)M * K, 1.0f), *B = alloc_rand((size_t)K * N, 1.0f);
                    float *bias = alloc_rand(N, 1.0f), *got = alloc_zero((size_t)M * N), *want = alloc_zero((size_t)M * N);
                    int lda = ta ? M : K, ldb = tb ? K : N;
                    for (int i = 0; i < M; i++) memcpy(want + (size_t)i * N, bias, N * sizeof(float));
                    for (size_t i = 0; i < (size_t)M * N; i++) got[i] = NAN;  // must not be read
                    if (impl == 0) {
                        matmul_builtin(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, 1.0f, want, N);
                        matmul_builtin_bias(ta, tb, M, N, K, A, lda, B, ldb, bias, got, N);
                    } else {
                        matmul(ta, tb, M, N, K, 1.0f, A, lda, B, ldb, 1.0f, want, N);
                        matmul_bias(ta, tb, M, N, K, A, lda, B, ldb, bias, got, N);
                    }
                    for (size_t i = 0; i < (size_t)M * N; i++) differ += memcmp(&got[i], &want[i], sizeof(float)) != 0;
                    compared += (size_t)M * N;
                    free(A); free(B); free(bias); free(got); free(want);
                }
    printf("  %zu outputs compared, %zu differ\n", compared, differ);
    CHECK(differ == 0, "matmul_bias differs from matmul over C = bias in %zu of %zu outputs", differ, compared);
}

// ---- Embedding ------------------------------------------------------------------------------------------

typedef struct {
    int B, T, C, V;
    int *tok;
    float *emb, *pe, *y, *r;
} EmbCtx;

static double emb_loss(void *p) {
    EmbCtx *c = p;
    embedding_forward(c->y, c->tok, c->emb, c->pe, c->B, c->T, c->C, c->V);
    return dot_double(c->y, c->r, (size_t)c->B * c->T * c->C);
}

static void test_embedding(void) {
    printf("embedding * sqrt(C) + positions, B=3 T=5 C=6 V=11\n");
    EmbCtx c = {3, 5, 6, 11, NULL, NULL, NULL, NULL, NULL};
    size_t N = (size_t)c.B * c.T, ne = (size_t)c.V * c.C;
    c.tok = mlm_malloc(N * sizeof(int), "tokens");
    for (size_t i = 0; i < N; i++) c.tok[i] = (int)(rand_unit() * 7);  // tokens 7..10 unused: zero gradient
    c.tok[4] = c.tok[9] = 3;                                            // repeated token: sums
    c.emb = alloc_rand(ne, 1.0f); c.pe = alloc_zero((size_t)c.T * c.C);
    model_positional_encoding(c.T, c.C, c.pe);
    c.y = alloc_zero(N * c.C); c.r = alloc_rand(N * c.C, 1.0f);
    emb_loss(&c);
    double e = 0.0;
    for (size_t n = 0; n < N; n++)
        for (int k = 0; k < c.C; k++) {
            double want = c.emb[c.tok[n] * c.C + k] * sqrt(6.0) + c.pe[(n % c.T) * c.C + k];
            e = fmax(e, fabs(want - c.y[n * c.C + k]));
        }
    // PE row 1, feature 0 is sin(1), feature 1 is cos(1).
    double pe_err = fmax(fabs(c.pe[c.C] - sin(1.0)), fabs(c.pe[c.C + 1] - cos(1.0)));
    printf("  forward vs definition: max |err| %.2e, PE err %.2e\n", e, pe_err);
    CHECK(e < 1e-5 && pe_err < 1e-6, "embedding forward error %.2e, PE %.2e", e, pe_err);
    float *demb = alloc_zero(ne);
    embedding_backward(demb, c.r, c.tok, c.B, c.T, c.C);
    fd_check("embedding d table", emb_loss, &c, c.emb, demb, ne, 1e-2f, FD_ATOL, FD_RTOL);
    free(c.tok); free(c.emb); free(c.pe); free(c.y); free(c.r); free(demb);
}

// ---- LayerNorm --------------------------------------------------------------------------------------------

typedef struct {
    int N, C;
    float *x, *w, *b, *y, *mean, *rstd, *r;
} LnCtx;

static double ln_loss(void *p) {
    LnCtx *c = p;
    layernorm_forward(c->y, c->mean, c->rstd, c->x, c->w, c->b, c->N, c->C, 1e-5f);
    return dot_double(c->y, c->r, (size_t)c->N * c->C);
}

static void test_layernorm(void) {
    printf("layernorm, N=15 C=7\n");
    LnCtx c = {15, 7, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    size_t n = (size_t)c.N * c.C;
    c.x = alloc_rand(n, 2.0f); c.w = alloc_rand(c.C, 1.5f); c.b = alloc_rand(c.C, 1.0f);
    c.y = alloc_zero(n); c.mean = alloc_zero(c.N); c.rstd = alloc_zero(c.N); c.r = alloc_rand(n, 1.0f);
    ln_loss(&c);
    double e = 0.0;
    for (int i = 0; i < c.N; i++) {
        double m = 0, v = 0;
        for (int k = 0; k < c.C; k++) m += c.x[i * c.C + k];
        m /= c.C;
        for (int k = 0; k < c.C; k++) v += (c.x[i * c.C + k] - m) * (c.x[i * c.C + k] - m);
        v /= c.C;  // biased, as PyTorch
        for (int k = 0; k < c.C; k++) {
            double want = (c.x[i * c.C + k] - m) / sqrt(v + 1e-5) * c.w[k] + c.b[k];
            e = fmax(e, fabs(want - c.y[i * c.C + k]));
        }
    }
    printf("  forward vs definition: max |err| %.2e\n", e);
    CHECK(e < 1e-5, "layernorm forward error %.2e", e);
    float *dx = alloc_zero(n), *dw = alloc_zero(c.C), *db = alloc_zero(c.C);
    layernorm_backward(dx, dw, db, c.r, c.x, c.w, c.mean, c.rstd, c.N, c.C);
    // LayerNorm is scale invariant in x: curvature ~ 1/std^2 with std ~ 1, so h = 1e-2 keeps truncation small.
    fd_check("layernorm d input", ln_loss, &c, c.x, dx, n, 1e-2f, FD_ATOL, FD_RTOL);
    fd_check("layernorm d weight", ln_loss, &c, c.w, dw, c.C, 1e-2f, FD_ATOL, FD_RTOL);
    fd_check("layernorm d bias", ln_loss, &c, c.b, db, c.C, 1e-2f, FD_ATOL, FD_RTOL);
    free(c.x); free(c.w); free(c.b); free(c.y); free(c.mean); free(c.rstd); free(c.r); free(dx); free(dw); free(db);
}

// ---- GELU and BERT's embeddings (arch = bert) ---------------------------------------------------------

typedef struct {
    size_t n;
    float *x, *y, *r;
} GeluCtx;

static double gelu_loss(void *p) {
    GeluCtx *c = p;
    gelu_forward(c->y, c->x, c->n);
    return dot_double(c->y, c->r, c->n);
}

static void test_gelu(void) {
    printf("GELU (erf form), n=41 over [-6, 6] and 0\n");
    GeluCtx c = {41, NULL, NULL, NULL};
    c.x = alloc_zero(c.n); c.y = alloc_zero(c.n); c.r = alloc_rand(c.n, 1.0f);
    for (size_t i = 0; i < c.n; i++) c.x[i] = -6.0f + 12.0f * (float)i / (float)(c.n - 1);  // x[20] == 0
    gelu_loss(&c);
    // Against the definition in double: erff and the product each round once or twice (~2 ulp of |y| <= 6).
    double e = 0.0;
    for (size_t i = 0; i < c.n; i++) {
        double x = c.x[i], want = 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
        e = fmax(e, fabs(want - c.y[i]) / fmax(1.0, fabs(want)));
    }
    printf("  forward vs double definition: max rel err %.2e\n", e);
    CHECK(e < 1e-6, "GELU forward error %.2e", e);
    float *dx = alloc_zero(c.n);
    gelu_backward(dx, c.r, c.x, c.n);
    fd_check("gelu d input", gelu_loss, &c, c.x, dx, c.n, 1e-2f, FD_ATOL, FD_RTOL);
    free(c.x); free(c.y); free(c.r); free(dx);
}

typedef struct {
    int B, T, C, V;
    const int *tok;
    float *word, *pos, *type, *y, *r;
} BertEmbCtx;

static double bert_emb_loss(void *p) {
    BertEmbCtx *c = p;
    bert_embedding_forward(c->y, c->tok, c->word, c->pos, c->type, c->B, c->T, c->C, c->V);
    return dot_double(c->y, c->r, (size_t)c->B * c->T * c->C);
}

static void test_bert_embedding(void) {
    printf("BERT embeddings (word + type 0 + learned position), B=2 T=4 C=3 V=6, position table of 5 rows\n");
    static const int tok[8] = {3, 0, 5, 3, 1, 1, 4, 0};  // repeated tokens: their gradients must add up
    BertEmbCtx c = {2, 4, 3, 6, tok, NULL, NULL, NULL, NULL, NULL};
    size_t ny = (size_t)c.B * c.T * c.C;
    c.word = alloc_rand((size_t)c.V * c.C, 1.0f); c.pos = alloc_rand(5 * (size_t)c.C, 1.0f);
    c.type = alloc_rand(2 * (size_t)c.C, 1.0f); c.y = alloc_zero(ny); c.r = alloc_rand(ny, 1.0f);
    bert_emb_loss(&c);
    double e = 0.0;
    for (int n = 0; n < c.B * c.T; n++)
        for (int k = 0; k < c.C; k++)
            e = fmax(e, fabs((double)c.word[tok[n] * c.C + k] + c.type[k] + c.pos[(n % c.T) * c.C + k] - c.y[n * c.C + k]));
    printf("  forward vs definition: max |err| %.2e\n", e);
    CHECK(e < 1e-6, "BERT embedding forward error %.2e", e);  // two float adds of O(1) terms: <= 2 ulp
    float *dw = alloc_zero((size_t)c.V * c.C), *dp = alloc_zero(5 * (size_t)c.C), *dt = alloc_zero(2 * (size_t)c.C);
    bert_embedding_backward(dw, dp, dt, c.r, tok, c.B, c.T, c.C);
    // The loss is linear: FD is exact up to rounding, with any h. Rows never used (word 2, position 4, type 1)
    // must get exactly 0.
    fd_check("bert embedding d word", bert_emb_loss, &c, c.word, dw, (size_t)c.V * c.C, 1e-2f, FD_ATOL, FD_RTOL);
    fd_check("bert embedding d position", bert_emb_loss, &c, c.pos, dp, 5 * (size_t)c.C, 1e-2f, FD_ATOL, FD_RTOL);
    fd_check("bert embedding d type", bert_emb_loss, &c, c.type, dt, 2 * (size_t)c.C, 1e-2f, FD_ATOL, FD_RTOL);
    int unused_nonzero = 0;
    for (int k = 0; k < c.C; k++) unused_nonzero += dw[2 * c.C + k] != 0 || dp[4 * c.C + k] != 0 || dt[c.C + k] != 0;
    CHECK(unused_nonzero == 0, "rows no position uses got a gradient");
    free(c.word); free(c.pos); free(c.type); free(c.y); free(c.r); free(dw); free(dp); free(dt);
}

// ---- Attention core (tiled) --------------------------------------------------------------------------------
// attention_forward / attention_backward tile the queries and keys (ATTN_TILE = 64) and never store T x T. Two
// independent references: central finite differences of the forward (small shape, every element of dqkv), and the
// materialised attention in double precision (tests/attention_ref.c) at T in {8, 33, 64, 65, 128, 512} (one tile,
// one tile exactly, one past it, two, eight), with and without dropout and [PAD] keys.

typedef struct {
    int B, T, C, H;
    float *qkv, *y, *lse, *r;
    const uint8_t *key_valid;
    const AttnDropout *drop;
} AttCtx;

static double att_loss(void *p) {
    AttCtx *c = p;
    attention_forward(c->y, c->lse, c->qkv, c->key_valid, c->drop, c->B, c->T, c->C, c->H);
    return dot_double(c->y, c->r, (size_t)c->B * c->T * c->C);
}

// THE DROPOUT RULE of the attention site, as its definition states it: keep[n] = !(u < p) for the uniforms
// rng_uniform gives at the site's offset (the layout the trainer uses; layer `layer` of step `step`), and the
// tiled op's view of the same site (attention_dropout). n = B*H*T*T.
typedef struct {
    Rng rng;
    DropoutCtx ctx;
    AttnDropout ad;
    uint8_t *keep;
} AttDrop;

static void att_drop_init(AttDrop *d, float p, int B, int T, int C, int H, size_t n) {
    rng_init(&d->rng, 7, RNG_DOMAIN_TRAIN);
    d->ctx = (DropoutCtx){&d->rng, rng_layout(B + 1, T, C, H, 9, 3), 5, p, 0, 0};
    const int layer = 2;
    float *u = mlm_malloc(n * sizeof(float), "uniforms");
    rng_uniform(&d->rng, rng_dropout_offset(&d->ctx.layout, d->ctx.step, layer, DROP_ATTN_PROBS), u, n);
    d->keep = mlm_malloc(n, "keep");
    for (size_t i = 0; i < n; i++) d->keep[i] = !(u[i] < p);
    free(u);
    CHECK(attention_dropout(&d->ad, &d->ctx, layer, n) == 1, "attention_dropout: dropout active");
}

static void att_drop_free(AttDrop *d) {
    rng_free(&d->rng);
    free(d->keep);
}

static void test_attention_fd(int with_dropout, int key_padding) {
    printf("attention core vs finite differences, B=3 T=5 C=6 H=2, dropout %s, %s\n", with_dropout ? "p=0.3" : "off",
           key_padding ? "[PAD] keys masked: row 0 none, row 1 two, row 2 all" : "no mask");
    // Row 2 has no valid key: it attends to every key (ops.h), as transformers' additive mask does in effect.
    static const uint8_t valid[15] = {1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0};
    AttCtx c = {3, 5, 6, 2, NULL, NULL, NULL, NULL, key_padding ? valid : NULL, NULL};
    size_t nqkv = (size_t)c.B * c.T * 3 * c.C, ny = (size_t)c.B * c.T * c.C, natt = (size_t)c.B * c.H * c.T * c.T;
    c.qkv = alloc_rand(nqkv, 1.5f); c.y = alloc_zero(ny); c.lse = alloc_zero((size_t)c.B * c.H * c.T);
    c.r = alloc_rand(ny, 1.0f);
    AttDrop d = {0};
    if (with_dropout) {
        // FD evaluations regenerate the same decisions, as a fixed step would.
        att_drop_init(&d, 0.3f, c.B, c.T, c.C, c.H, natt);
        c.drop = &d.ad;
    }
    att_loss(&c);
    float *dqkv = alloc_rand(nqkv, 1.0f);  // overwritten by the backward
    attention_backward(dqkv, c.r, c.qkv, c.y, c.lse, c.key_valid, c.drop, c.B, c.T, c.C, c.H);
    const char *what = key_padding ? "attention d qkv (key padding)"
                       : with_dropout ? "attention d qkv (dropout)" : "attention d qkv";
    fd_check(what, att_loss, &c, c.qkv, dqkv, nqkv, 1e-2f, FD_ATOL, FD_RTOL);
    if (key_padding) {  // masked keys' probabilities are exactly 0: their k and v get exactly no gradient
        int nonzero = 0;
        for (int j = 0; j < c.T; j++)
            for (int k = c.C; k < 3 * c.C && !valid[c.T + j]; k++)  // sequence 1's masked keys: k and v columns
                nonzero += dqkv[(size_t)(c.T + j) * 3 * c.C + k] != 0.0f;
        CHECK(nonzero == 0, "%d gradients of masked keys and values are not exactly 0", nonzero);
    }
    if (with_dropout) att_drop_free(&d);
    free(c.qkv); free(c.y); free(c.lse); free(c.r); free(dqkv);
}

// Tolerance of the tiled FP32 attention against the double reference, relative to the tensor's largest magnitude
// (out, and each of dq, dk, dv on its own; lse absolute): 1e-5. Every output is a sum of products in FP32 whose
// longest chain of roundings is a score (hs <= 64 terms), a tile's sum (<= 64 terms, the matmul's) and the
// accumulation over the T / 64 <= 8 key tiles (a rescale and an add each), plus a few roundings of exp, log and the
// division: about 140 roundings. Rounding errors of random sign grow as sqrt(140) u = 7e-7 of the magnitudes
// summed (measured: 1e-7 .. 1e-6); 1e-5 leaves that a margin of 14, while a wrong tile bound, a missing rescale
// or a dropout counter off by one moves the results by 1e-3 or more.
#define ATT_TILED_TOL 1e-5

static void test_attention_tiled(void) {
    printf("tiled attention vs the materialised attention in double (tests/attention_ref.c):\n");
    const int shapes[][4] = {{3, 8, 32, 2}, {2, 33, 48, 2}, {2, 64, 128, 2}, {2, 65, 64, 4}, {2, 128, 32, 2},
                             {1, 512, 32, 2}};
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
        for (int with_drop = 0; with_drop < 2; with_drop++)
            for (int with_pad = 0; with_pad < 2; with_pad++) {
                int B = shapes[si][0], T = shapes[si][1], C = shapes[si][2], H = shapes[si][3];
                size_t N = (size_t)B * T, nqkv = N * 3 * C, ny = N * C, nl = N * H, natt = nl * T;
                float *qkv = alloc_rand(nqkv, 1.5f), *dout = alloc_rand(ny, 1.0f);
                float *y = alloc_zero(ny), *lse = alloc_zero(nl), *dqkv = alloc_rand(nqkv, 1.0f);
                double *y_ref = mlm_malloc(ny * sizeof(double), "ref");
                double *lse_ref = mlm_malloc(nl * sizeof(double), "ref");
                double *dqkv_ref = mlm_malloc(nqkv * sizeof(double), "ref");
                uint8_t *valid = with_pad ? attention_ref_key_valid(B, T) : NULL;
                AttDrop d = {0};
                if (with_drop) att_drop_init(&d, 0.2f, B, T, C, H, natt);
                attention_forward(y, lse, qkv, valid, with_drop ? &d.ad : NULL, B, T, C, H);
                attention_backward(dqkv, dout, qkv, y, lse, valid, with_drop ? &d.ad : NULL, B, T, C, H);
                attention_ref_forward(y_ref, lse_ref, qkv, valid, d.keep, with_drop ? d.ad.scale : 1.0f, B, T, C, H);
                attention_ref_backward(dqkv_ref, dout, qkv, valid, d.keep, with_drop ? d.ad.scale : 1.0f, B, T, C, H);
                double e_lse = 0.0;
                for (size_t i = 0; i < nl; i++)
                    e_lse = fmax(e_lse, isnan(lse[i]) ? INFINITY : fabs(lse[i] - lse_ref[i]));
                double e_out = attention_ref_error(y, y_ref, N, 0, C, C);
                double e_dq = attention_ref_error(dqkv, dqkv_ref, N, 0, 3 * C, C);
                double e_dk = attention_ref_error(dqkv, dqkv_ref, N, C, 3 * C, C);
                double e_dv = attention_ref_error(dqkv, dqkv_ref, N, 2 * C, 3 * C, C);
                printf("  B %d T %3d C %3d H %d drop %d pad %d: out %.1e lse %.1e dq %.1e dk %.1e dv %.1e\n", B, T, C,
                       H, with_drop, with_pad, e_out, e_lse, e_dq, e_dk, e_dv);
                CHECK(e_out <= ATT_TILED_TOL && e_lse <= ATT_TILED_TOL,
                      "tiled attention forward T %d drop %d pad %d: out %.2e lse %.2e", T, with_drop, with_pad, e_out,
                      e_lse);
                CHECK(e_dq <= ATT_TILED_TOL && e_dk <= ATT_TILED_TOL && e_dv <= ATT_TILED_TOL,
                      "tiled attention backward T %d drop %d pad %d: dq %.2e dk %.2e dv %.2e", T, with_drop, with_pad,
                      e_dq, e_dk, e_dv);
                if (with_drop) att_drop_free(&d);
                free(qkv), free(dout), free(y), free(lse), free(dqkv), free(y_ref), free(lse_ref), free(dqkv_ref);
                free(valid);
            }
}

// ---- ReLU FFN with dropout, and the residual dropout ---------------------------------------------------

typedef struct {
    int N, C, F;
    float *x, *w1, *b1, *w2, *b2, *h, *y, *r;
    const KeepWord *keep;
    float scale;
    uint64_t pattern;  // hash of which hidden units were positive: FD across a ReLU kink is skipped
} FfnCtx;

static double ffn_loss(void *p) {
    FfnCtx *c = p;
    linear_forward(c->h, c->x, c->w1, c->b1, c->N, c->C, c->F);
    uint64_t hsh = 1469598103934665603ull;
    for (int i = 0; i < c->N * c->F; i++) hsh = (hsh ^ (uint64_t)(c->h[i] > 0.0f)) * 1099511628211ull;
    c->pattern = hsh;
    relu_dropout_forward(c->h, c->keep, c->scale, (size_t)c->N * c->F);
    linear_forward(c->y, c->h, c->w2, c->b2, c->N, c->F, c->C);
    return dot_double(c->y, c->r, (size_t)c->N * c->C);
}

// fd_check for the FFN, skipping elements whose perturbation flips a ReLU (FD is meaningless across a kink).
static void ffn_fd(const char *what, FfnCtx *c, float *x, const float *analytic, size_t n, float h) {
    double worst = 0.0, worst_abs = 0.0;
    int skipped = 0;
    for (size_t i = 0; i < n; i++) {
        float x0 = x[i], xp = x0 + h, xm = x0 - h;
        x[i] = xp;
        double lp = ffn_loss(c);
        uint64_t pp = c->pattern;
        x[i] = xm;
        double lm = ffn_loss(c);
        uint64_t pm = c->pattern;
        x[i] = x0;
        if (pp != pm) { skipped++; continue; }
        double fd = (lp - lm) / ((double)xp - (double)xm);
        double err = fabs(analytic[i] - fd);
        worst = fmax(worst, err / (FD_ATOL + FD_RTOL * fabs(fd)));
        worst_abs = fmax(worst_abs, err);
    }
    printf("  %-44s n=%4zu  max |err| %.2e  (worst/tol %.3f, %d skipped at a ReLU kink)\n", what, n, worst_abs, worst,
           skipped);
    CHECK(worst <= 1.0 && skipped * 2 < (int)n, "%s: worst/tol %.3f, %d skipped", what, worst, skipped);
}

static void test_ffn(int with_dropout) {
    printf("FFN Linear(C,F) -> ReLU -> dropout -> Linear(F,C), N=15 C=6 F=9, dropout %s\n", with_dropout ? "p=0.25" : "off");
    FfnCtx c = {15, 6, 9, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1.0f, 0};
    size_t nx = (size_t)c.N * c.C, nh = (size_t)c.N * c.F;
    c.x = alloc_rand(nx, 1.0f); c.w1 = alloc_rand((size_t)c.F * c.C, 0.8f); c.b1 = alloc_rand(c.F, 0.3f);
    c.w2 = alloc_rand((size_t)c.C * c.F, 0.8f); c.b2 = alloc_rand(c.C, 0.3f);
    c.h = alloc_zero(nh); c.y = alloc_zero(nx); c.r = alloc_rand(nx, 1.0f);
    KeepWord *keep = NULL;
    Rng rng = {0};
    if (with_dropout) {
        rng_init(&rng, 11, RNG_DOMAIN_TRAIN);
        DropoutCtx d = {&rng, rng_layout(3, 5, c.C, 2, c.F, 2), 2, 0.25f, 0, 0};
        keep = mlm_malloc(keep_words(nh) * sizeof(KeepWord), "keep");
        dropout_keep_mask(keep, &d, 0, DROP_FFN_HIDDEN, nh);
        c.keep = keep;
        c.scale = dropout_scale(0.25f);
    }
    ffn_loss(&c);
    // Backward: Linear2, ReLU + dropout (from the saved output), Linear1.
    float *dh = alloc_zero(nh), *dx = alloc_zero(nx), *dw1 = alloc_zero((size_t)c.F * c.C), *db1 = alloc_zero(c.F);
    float *dw2 = alloc_zero((size_t)c.C * c.F), *db2 = alloc_zero(c.C);
    linear_backward(dh, dw2, db2, c.r, c.h, c.w2, c.N, c.F, c.C);
    relu_dropout_backward(dh, c.h, c.scale, nh);
    linear_backward(dx, dw1, db1, dh, c.x, c.w1, c.N, c.C, c.F);
    // A smaller step than elsewhere: fewer perturbations cross a ReLU kink (those are skipped); the FFN is
    // piecewise linear, so there is no truncation error and the rounding term (5e-5 at h = 1e-2) grows to
    // ~2e-4 at h = 3e-3, still within the tolerance.
    ffn_fd("ffn d input", &c, c.x, dx, nx, 3e-3f);
    ffn_fd("ffn d W1", &c, c.w1, dw1, (size_t)c.F * c.C, 3e-3f);
    ffn_fd("ffn d b1", &c, c.b1, db1, c.F, 3e-3f);
    ffn_fd("ffn d W2", &c, c.w2, dw2, (size_t)c.C * c.F, 3e-3f);
    ffn_fd("ffn d b2", &c, c.b2, db2, c.C, 3e-3f);
    if (with_dropout) {
        rng_free(&rng);
        free(keep);
    }
    free(c.x); free(c.w1); free(c.b1); free(c.w2); free(c.b2); free(c.h); free(c.y); free(c.r);
    free(dh); free(dx); free(dw1); free(db1); free(dw2); free(db2);
}

typedef struct {
    size_t n;
    float *res, *y, *out, *r;
    const KeepWord *keep;
    float scale;
} ResCtx;

static double res_loss(void *p) {
    ResCtx *c = p;
    residual_dropout_forward(c->out, c->res, c->y, c->keep, c->scale, c->n);
    return dot_double(c->out, c->r, c->n);
}

static void test_residual_dropout(void) {
    printf("residual add + dropout, n=90, p=0.2\n");
    ResCtx c = {90, NULL, NULL, NULL, NULL, NULL, 1.0f};
    c.res = alloc_rand(c.n, 1.0f); c.y = alloc_rand(c.n, 1.0f); c.out = alloc_zero(c.n); c.r = alloc_rand(c.n, 1.0f);
    Rng rng;
    rng_init(&rng, 5, RNG_DOMAIN_TRAIN);
    DropoutCtx d = {&rng, rng_layout(3, 5, 6, 2, 9, 2), 1, 0.2f, 0, 0};
    KeepWord *keep = mlm_malloc(keep_words(c.n) * sizeof(KeepWord), "keep");
    dropout_keep_mask(keep, &d, 1, DROP_ATTN_RESID, c.n);
    c.keep = keep;
    c.scale = dropout_scale(0.2f);
    res_loss(&c);
    int exact = 1;
    for (size_t i = 0; i < c.n; i++) exact &= c.out[i] == c.res[i] + (keep_bit(keep, i) ? c.y[i] * c.scale : 0.0f);
    CHECK(exact, "residual dropout forward is not res + keep * y * scale");
    float *dy = alloc_zero(c.n);
    residual_dropout_backward(dy, c.r, keep, c.scale, c.n);
    fd_check("residual dropout d branch", res_loss, &c, c.y, dy, c.n, 1e-2f, FD_ATOL, FD_RTOL);
    fd_check("residual dropout d skip (= dout)", res_loss, &c, c.res, c.r, c.n, 1e-2f, FD_ATOL, FD_RTOL);
    rng_free(&rng);
    free(keep); free(c.res); free(c.y); free(c.out); free(c.r); free(dy);
}

// The hand-vectorised and restructured elementwise loops against their definitions, bit for bit: ReLU + dropout
// backward (dh *= (float)(h > 0) * scale, SSE2 with a scalar tail) over n = 100,003 (parallel, with a tail of 3),
// h drawn among +-0, negatives, positives, subnormals and NaN; column_sums_accumulate against sums[c] += x[n][c]
// in row order, with C not a multiple of its 16-column tasks.
static void test_elementwise_exact(void) {
    printf("relu_dropout_backward and column_sums_accumulate vs their definitions, bit for bit\n");
    size_t n = 100003;
    float *h = alloc_rand(n, 1.0f), *dh = alloc_rand(n, 2.0f), *want = mlm_malloc(n * sizeof(float), "want");
    for (size_t i = 0; i < n; i += 7) h[i] = (i / 7) % 4 == 0 ? 0.0f : (i / 7) % 4 == 1 ? -0.0f : (i / 7) % 4 == 2 ? 1e-42f : NAN;
    float scale = dropout_scale(0.1f);
    for (size_t i = 0; i < n; i++) want[i] = dh[i] * ((float)(h[i] > 0.0f) * scale);
    relu_dropout_backward(dh, h, scale, n);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += memcmp(&dh[i], &want[i], sizeof(float)) != 0;
    printf("  relu_dropout_backward: %zu of %zu differ\n", differ, n);
    CHECK(differ == 0, "relu_dropout_backward differs from dh * ((float)(h > 0) * scale) in %zu of %zu", differ, n);
    free(h); free(dh); free(want);

    // A partial block of columns only, two whole blocks (large enough to run in parallel), whole and partial blocks.
    const int shapes[3][2] = {{257, 37}, {600, 128}, {99, 150}};
    for (int k = 0; k < 3; k++) {
        int N = shapes[k][0], C = shapes[k][1];
        float *x = alloc_rand((size_t)N * C, 1.0f), *sums = alloc_rand(C, 1.0f), *ref = mlm_malloc(C * sizeof(float), "ref");
        memcpy(ref, sums, C * sizeof(float));
        for (int r = 0; r < N; r++)
            for (int c = 0; c < C; c++) ref[c] += x[(size_t)r * C + c];
        column_sums_accumulate(sums, x, N, C);
        CHECK(memcmp(sums, ref, C * sizeof(float)) == 0, "column_sums_accumulate [%d, %d] differs from row-order sums", N, C);
        free(x); free(sums); free(ref);
    }
}

// The vector paths of the keep masks (feedforward.c: AVX-512, AVX2, portable), each forced in turn where this CPU
// runs it, against definitions written out here, bit for bit: the masked passes over n = 100,003 (parallel, a
// partial last word of 3) with random keep words and inputs among +-0, negatives, subnormals, infinities and NaN
// (the residual forward also in place, out = res); the packed masks of dropout_keep_mask against the portable
// path's words, at lengths with and without a partial word and a chunk boundary (4,096), the word after untouched.
static void test_dropout_simd(void) {
    static const char *const names[] = {"portable", "avx2", "avx512"};
    size_t n = 100003, words = keep_words(n);
    float *h0 = alloc_rand(n, 1.0f), *y = alloc_rand(n, 2.0f), *res = alloc_rand(n, 1.0f);
    float *out = alloc_zero(n), *want = alloc_zero(n);
    static const float special[] = {0.0f, -0.0f, 1e-42f, -1e-42f, INFINITY, -INFINITY, NAN, -3.0f};
    for (size_t i = 0; i < n; i += 5) h0[i] = special[(i / 5) % 8], y[i] = special[(i / 5 + 3) % 8];
    KeepWord *keep = mlm_malloc(words * sizeof(KeepWord), "keep");
    uint64_t state = 0x9e3779b97f4a7c15ull;
    for (size_t w = 0; w < words; w++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        keep[w] = (KeepWord)(state >> 32);
    }
    keep[words - 1] &= (1u << (n % KEEP_WORD_BITS)) - 1;  // bits past n are 0, as dropout_keep_mask leaves them
    float scale = dropout_scale(0.1f);
    Rng rng;
    rng_init(&rng, 11, RNG_DOMAIN_TRAIN);
    DropoutCtx d = {&rng, rng_layout(64, 33, 128, 4, 256, 3), 7, 0.1f, 0, 0};
    static const size_t lens[] = {7, 32, 33, 4096, 4127, 40000};
    KeepWord *mask = mlm_malloc((keep_words(40000) + 1) * sizeof(KeepWord), "mask");
    KeepWord *ref = mlm_malloc((keep_words(40000) + 1) * sizeof(KeepWord), "ref");
    int ran = 0;
    for (int isa = DROPOUT_SIMD_PORTABLE; isa <= DROPOUT_SIMD_AVX512; isa++) {
        if (!dropout_simd_force(isa)) {
            printf("  %s: not on this CPU, skipped\n", names[isa]);
            continue;
        }
        ran++;
        size_t differ[4] = {0, 0, 0, 0};
        memcpy(out, h0, n * sizeof(float));
        relu_dropout_forward(out, keep, scale, n);
        for (size_t i = 0; i < n; i++) want[i] = h0[i] * ((float)((h0[i] > 0.0f) & keep_bit(keep, i)) * scale);
        for (size_t i = 0; i < n; i++) differ[0] += memcmp(&out[i], &want[i], sizeof(float)) != 0;
        residual_dropout_forward(out, res, y, keep, scale, n);
        for (size_t i = 0; i < n; i++) want[i] = res[i] + y[i] * ((float)keep_bit(keep, i) * scale);
        for (size_t i = 0; i < n; i++) differ[1] += memcmp(&out[i], &want[i], sizeof(float)) != 0;
        memcpy(out, res, n * sizeof(float));
        residual_dropout_forward(out, out, y, keep, scale, n);  // in place, as the model calls it
        for (size_t i = 0; i < n; i++) differ[1] += memcmp(&out[i], &want[i], sizeof(float)) != 0;
        residual_dropout_backward(out, y, keep, scale, n);
        for (size_t i = 0; i < n; i++) want[i] = y[i] * ((float)keep_bit(keep, i) * scale);
        for (size_t i = 0; i < n; i++) differ[2] += memcmp(&out[i], &want[i], sizeof(float)) != 0;
        for (int k = 0; k < 6; k++) {
            size_t m = lens[k], mw = keep_words(m);
            dropout_simd_force(DROPOUT_SIMD_PORTABLE);
            dropout_keep_mask(ref, &d, 2, DROP_FFN_HIDDEN, m);
            dropout_simd_force(isa);
            mask[mw] = 0xdeadbeefu;
            dropout_keep_mask(mask, &d, 2, DROP_FFN_HIDDEN, m);
            for (size_t w = 0; w < mw; w++) differ[3] += mask[w] != ref[w];
            differ[3] += mask[mw] != 0xdeadbeefu;
        }
        printf("  %s: ReLU+dropout %zu, residual forward %zu, backward %zu values differ; %zu mask words differ\n",
               names[isa], differ[0], differ[1], differ[2], differ[3]);
        CHECK(differ[0] == 0, "%s relu_dropout_forward differs from h * ((float)((h > 0) & keep) * scale) in %zu of %zu",
              names[isa], differ[0], n);
        CHECK(differ[1] == 0, "%s residual_dropout_forward differs from res + y * ((float)keep * scale) in %zu of %zu",
              names[isa], differ[1], 2 * n);
        CHECK(differ[2] == 0, "%s residual_dropout_backward differs from dout * ((float)keep * scale) in %zu of %zu",
              names[isa], differ[2], n);
        CHECK(differ[3] == 0, "%s dropout_keep_mask: %zu words differ from the portable path's (or the word after "
              "was written)", names[isa], differ[3]);
    }
    dropout_simd_force(-1);
    CHECK(ran >= 1, "no path of the keep masks ran");
    rng_free(&rng);
    free(h0); free(y); free(res); free(out); free(want); free(keep); free(mask); free(ref);
}

// layernorm_forward / layernorm_backward (each row's sums in THE ROW ORDER of vexp.c, the dw/db sums in local arrays)
// against the row-at-a-time loops that define them, bit for bit, at N = 39 rows and C = 37 (a partial
// 64-channel task), at [2051, 128] (parallel, whole tasks) and at [45, 150] (whole and partial tasks).
static float row_order_sum(const float *t, int n);

static void layernorm_rows_reference(float *out, float *mean, float *rstd, float *dinp, float *dw, float *db,
                                     const float *inp, const float *dout, const float *w, const float *b, int N, int C) {
    float *t = mlm_malloc((size_t)C * sizeof(float), "terms");
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
        float m = row_order_sum(x, C) / (float)C;
        for (int c = 0; c < C; c++) {
            float d = x[c] - m;
            t[c] = d * d;
        }
        float var = row_order_sum(t, C) / (float)C;
        float s = 1.0f / sqrtf(var + 1e-5f);
        for (int c = 0; c < C; c++) out[(size_t)n * C + c] = (x[c] - m) * s * w[c] + b[c];
        mean[n] = m;
        rstd[n] = s;
        for (int c = 0; c < C; c++) t[c] = g[c] * w[c];
        float sum_dnorm = row_order_sum(t, C);
        for (int c = 0; c < C; c++) t[c] = (g[c] * w[c]) * ((x[c] - m) * s);
        float sum_dnorm_norm = row_order_sum(t, C);
        float mean_dnorm = sum_dnorm / (float)C, mean_dnorm_norm = sum_dnorm_norm / (float)C;
        for (int c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            dinp[(size_t)n * C + c] += s * (g[c] * w[c] - mean_dnorm - norm * mean_dnorm_norm);
        }
    }
    free(t);
    for (int n = 0; n < N; n++)
        for (int c = 0; c < C; c++) {
            const float *x = inp + (size_t)n * C, *g = dout + (size_t)n * C;
            dw[c] += g[c] * ((x[c] - mean[n]) * rstd[n]);
            db[c] += g[c];
        }
}

static void test_layernorm_exact(void) {
    printf("layernorm_forward / layernorm_backward vs the row-at-a-time loops, bit for bit\n");
    const int shapes[3][2] = {{4 * 9 + 3, 37}, {2051, 128}, {45, 150}};
    for (int k = 0; k < 3; k++) {
        int N = shapes[k][0], C = shapes[k][1];
        size_t nc = (size_t)N * C;
        float *x = alloc_rand(nc, 2.0f), *g = alloc_rand(nc, 1.0f), *w = alloc_rand(C, 1.0f), *b = alloc_rand(C, 1.0f);
        for (size_t i = 0; i < nc; i++) x[i] += 0.5f;  // a mean away from 0
        float *out = alloc_zero(nc), *mean = alloc_zero(N), *rstd = alloc_zero(N), *dinp = alloc_rand(nc, 1.0f);
        float *dw = alloc_rand(C, 1.0f), *db = alloc_rand(C, 1.0f);
        float *out_r = alloc_zero(nc), *mean_r = alloc_zero(N), *rstd_r = alloc_zero(N);
        float *dinp_r = mlm_malloc(nc * sizeof(float), "dinp"), *dw_r = mlm_malloc(C * sizeof(float), "dw");
        float *db_r = mlm_malloc(C * sizeof(float), "db");
        memcpy(dinp_r, dinp, nc * sizeof(float));  // both accumulate (+=) into the same starting values
        memcpy(dw_r, dw, C * sizeof(float));
        memcpy(db_r, db, C * sizeof(float));
        layernorm_forward(out, mean, rstd, x, w, b, N, C, 1e-5f);
        layernorm_backward(dinp, dw, db, g, x, w, mean, rstd, N, C);
        layernorm_rows_reference(out_r, mean_r, rstd_r, dinp_r, dw_r, db_r, x, g, w, b, N, C);
        int same_fwd = !memcmp(out, out_r, nc * sizeof(float)) && !memcmp(mean, mean_r, N * sizeof(float)) &&
                       !memcmp(rstd, rstd_r, N * sizeof(float));
        int same_bwd = !memcmp(dinp, dinp_r, nc * sizeof(float)) && !memcmp(dw, dw_r, C * sizeof(float)) &&
                       !memcmp(db, db_r, C * sizeof(float));
        printf("  [%d, %d]: forward %s, backward %s\n", N, C, same_fwd ? "identical" : "DIFFERS", same_bwd ? "identical" : "DIFFERS");
        CHECK(same_fwd && same_bwd, "layernorm [%d, %d] differs from its row-at-a-time definition", N, C);
        free(x); free(g); free(w); free(b); free(out); free(mean); free(rstd); free(dinp); free(dw); free(db);
        free(out_r); free(mean_r); free(rstd_r); free(dinp_r); free(dw_r); free(db_r);
    }
}

// The row loops of vexp.c (exp_shifted_sum, row_max, row_sum, row_dot) against THE ROW ORDER as vexp.c states it,
// written out here (16 lane sums of the terms i = l, l + 16, ... in order, then p[l] += p[l + h] for h = 8, 4, 2, 1),
// bit for bit, on the AVX-512 path where the CPU has it and on the scalar twins: the order is the definition, so
// any lane or tree out of place differs. Also: y equal to exp_shifted's (times the multipliers) bit for bit, the
// maximum equal to the plain running maximum, NaN skipped, -inf ([PAD] keys) giving 0; no write past the row; and
// each sum within its rounding bound of the exact sum in double (a term passes through at most ceil(n / 16) - 1
// lane adds and 4 tree adds, each a relative rounding of at most 2^-24 of a partial sum <= sum |terms|:
// |error| <= (ceil(n / 16) + 4) 2^-24 sum |terms|, the products of row_dot one more rounding each).
static float row_order_sum(const float *t, int n) {
    float p[16] = {0};
    for (int i = 0; i < n; i++) p[i % 16] += t[i];
    for (int h = 8; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) p[l] += p[l + h];
    return p[0];
}

static int same_bits(float a, float b) { return memcmp(&a, &b, sizeof(float)) == 0; }

static void test_row_loops(void) {
    printf("row loops (%s): exp_shifted_sum, row_max, row_dot vs THE ROW ORDER and the scalar twins\n",
           exp_shifted_vectorized() ? "AVX-512" : "no AVX-512 here: the scalar path");
    enum { MAXN = 200 };
    const int lens[] = {1, 2, 7, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 100, 128, 200};
    float x[MAXN], x2[MAXN], z[MAXN], y[MAXN + 1], ys[MAXN], e[MAXN], t[MAXN];
    int checked = 0;
    for (size_t li = 0; li < sizeof(lens) / sizeof(lens[0]); li++)
        for (int rep = 0; rep < 20; rep++) {
            int n = lens[li];
            fill_rand(x, n, 8.0f);
            fill_rand(x2, n, 3.0f);
            for (int i = 0; i < n; i++) z[i] = rand_unit() < 0.1 ? 0.0f : 1.0f / 0.9f;  // dropout multipliers
            if (rep % 4 == 1) x[(int)(rand_unit() * n)] = -INFINITY;                     // a [PAD] key
            if (rep % 4 == 2 && n > 1) x[(int)(rand_unit() * n)] = NAN;                  // skipped by the maximum
            float mx = -INFINITY;
            for (int i = 0; i < n; i++) mx = x[i] > mx ? x[i] : mx;
            CHECK(row_max(x, n) == mx && same_bits(row_max(x, n), row_max_scalar(x, n)),
                  "row_max of %d values: %g (scalar %g), the running maximum is %g", n, row_max(x, n),
                  row_max_scalar(x, n), mx);
            if (rep % 4 == 2) fill_rand(x, n, 8.0f);  // no NaN in the sums below
            float shift = rep % 2 && isfinite(mx) ? mx : 1.5f;  // (a row of one [PAD] key has no finite maximum)
            exp_shifted(e, x, shift, n);
            const float *mult = rep % 3 ? z : NULL;
            y[n] = 12345.0f;
            float sum = exp_shifted_sum(y, x, shift, mult, n);
            float sum_s = exp_shifted_sum_scalar(ys, x, shift, mult, n);
            CHECK(y[n] == 12345.0f, "exp_shifted_sum wrote past its row of %d", n);
            float want = row_order_sum(e, n);
            double exact = 0.0;
            for (int i = 0; i < n; i++) exact += e[i];
            double bound = (MLM_CEIL_DIV(n, 16) + 4) * 0x1p-24 * exact;
            CHECK(same_bits(sum, want) && same_bits(sum_s, want) && fabs(sum - exact) <= bound,
                  "exp_shifted_sum of %d: %.9g (scalar %.9g), THE ROW ORDER gives %.9g, exact %.9g (bound %.3g)", n,
                  sum, sum_s, want, exact, bound);
            int y_differ = 0;
            for (int i = 0; i < n; i++) {
                float w = mult ? e[i] * mult[i] : e[i];
                y_differ += !same_bits(y[i], w) || !same_bits(ys[i], w);
            }
            CHECK(y_differ == 0, "exp_shifted_sum's y differs from exp_shifted's (times the multipliers) in %d of %d",
                  y_differ, n);
            double dexact = 0.0, dabs = 0.0;
            fill_rand(x, n, 8.0f);  // finite
            for (int i = 0; i < n; i++) {
                t[i] = x[i] * x2[i];
                dexact += (double)x[i] * x2[i];
                dabs += fabs((double)x[i] * x2[i]);
            }
            CHECK(same_bits(row_sum(x, n), row_order_sum(x, n)) && same_bits(row_sum_scalar(x, n), row_order_sum(x, n)),
                  "row_sum of %d: %.9g (scalar %.9g), THE ROW ORDER gives %.9g", n, row_sum(x, n), row_sum_scalar(x, n),
                  row_order_sum(x, n));
            float dot = row_dot(x, x2, n), dot_want = row_order_sum(t, n);
            double dbound = (MLM_CEIL_DIV(n, 16) + 5) * 0x1p-24 * dabs;
            CHECK(same_bits(dot, dot_want) && same_bits(row_dot_scalar(x, x2, n), dot_want) && fabs(dot - dexact) <= dbound,
                  "row_dot of %d: %.9g (scalar %.9g), THE ROW ORDER gives %.9g, exact %.9g (bound %.3g)", n, dot,
                  row_dot_scalar(x, x2, n), dot_want, dexact, dbound);
            checked++;
        }
    // All keys [PAD] but one: its p is exp(0) = 1 and the rest 0, so the sum is exactly 1.
    for (int i = 0; i < 33; i++) x[i] = -INFINITY;
    x[20] = 2.0f;
    CHECK(row_max(x, 33) == 2.0f && exp_shifted_sum(y, x, 2.0f, NULL, 33) == 1.0f && y[0] == 0.0f && y[20] == 1.0f,
          "a row of [PAD] keys with one valid key: max %g, sum %g", row_max(x, 33), exp_shifted_sum(y, x, 2.0f, NULL, 33));
    printf("  %d rows of 1 - 200: identical to THE ROW ORDER, within the rounding bound\n", checked);
}

// exp_shifted (vexp.c) against exp in double: at most 2 ulp (the bound argued at the top of vexp.c; libm's expf is
// within 0.5), on every 1031st float of [-104, 89] and around the subnormal and overflow edges, with a shift whose
// subtraction rounds as the scalar code's; exactly +0 for -inf and below -104, 1 at 0, +inf above 89, NaN for NaN;
// rows whose length is not a multiple of the 16 lanes, without writing past them. And the AVX-512 path against
// exp_shifted_scalar, the same algorithm one value at a time, bit for bit (a resumed run may change CPUs).
static double ulps_from_exact(float got, double exact) {
    double ulp = exact < 0x1p-126 ? 0x1p-149 : ldexp(1.0, ilogb(exact) - 23);
    return fabs((double)got - exact) / ulp;
}

static void test_exp_shifted(void) {
    printf("exp_shifted (%s) vs exp in double and vs exp_shifted_scalar\n",
           exp_shifted_vectorized() ? "AVX-512" : "no AVX-512 here: the scalar path");
    enum { ROW = 1000 };
    float x[ROW + 1], y[ROW + 1], ys[ROW];
    size_t scalar_differ = 0;
    double worst = 0.0;
    float worst_at = 0.0f;
    size_t checked = 0;
    const float shifts[2] = {0.0f, -3.25f};
    for (int k = 0; k < 2; k++) {
        float shift = shifts[k];
        // Every 1031st float from -104 to 89 in order: key(v) = its bits if v >= +0, -(its magnitude's bits) if not.
        float a = -104.0f + shift, b = 89.0f + shift;
        uint32_t abits, bbits;
        memcpy(&abits, &a, 4);
        memcpy(&bbits, &b, 4);
        int64_t key_lo = -(int64_t)(abits & 0x7FFFFFFFu), key_hi = (int64_t)bbits;
        int len = 0;
        for (int64_t key = key_lo; key <= key_hi; key += 1031) {
            uint32_t bits = key >= 0 ? (uint32_t)key : 0x80000000u | (uint32_t)(-key);
            float v;
            memcpy(&v, &bits, 4);
            x[len++] = v;
            if (len == ROW) {
                y[ROW] = 12345.0f;
                exp_shifted(y, x, shift, ROW);
                CHECK(y[ROW] == 12345.0f, "exp_shifted wrote past its row");
                exp_shifted_scalar(ys, x, shift, ROW);
                for (int i = 0; i < ROW; i++) scalar_differ += memcmp(&y[i], &ys[i], sizeof(float)) != 0;
                for (int i = 0; i < ROW; i++) {
                    double e = ulps_from_exact(y[i], exp((double)(x[i] - shift)));
                    if (e > worst) worst = e, worst_at = x[i] - shift;
                }
                checked += ROW;
                len = 0;
            }
        }
    }
    printf("  %zu values: worst error %.3f ulp at x = %.9g; %zu differ from exp_shifted_scalar\n", checked, worst,
           worst_at, scalar_differ);
    CHECK(scalar_differ == 0, "exp_shifted differs from exp_shifted_scalar in %zu of %zu values", scalar_differ, checked);
    CHECK(checked > 4000000 && worst <= 2.0, "exp_shifted: %.3f ulp from exp at %.9g (bound 2)", worst, worst_at);
    // Special values, in a row of 21 (a partial vector after 16).
    const float sx[21] = {-INFINITY, -1000.0f, -104.5f, -104.0f, 0.0f, -0.0f, 100.0f, INFINITY, NAN, 88.5f,
                          -87.5f, -100.0f, -103.9f, 1.0f, -1.0f, 0.5f, 10.0f, -10.0f, 88.0f, -0.1f, 0.1f};
    float sy[22];
    sy[21] = 12345.0f;
    exp_shifted(sy, sx, 0.0f, 21);
    float ss[21];
    exp_shifted_scalar(ss, sx, 0.0f, 21);
    int special_same = 1;
    for (int i = 0; i < 21; i++) special_same &= isnan(sy[i]) ? isnan(ss[i]) : !memcmp(&sy[i], &ss[i], sizeof(float));
    CHECK(special_same, "exp_shifted and exp_shifted_scalar differ on the special values");
    CHECK(sy[0] == 0.0f && !signbit(sy[0]) && sy[1] == 0.0f && sy[2] == 0.0f && sy[3] == 0.0f,
          "exp_shifted of -inf and below -104 is not +0");
    CHECK(sy[4] == 1.0f && sy[5] == 1.0f, "exp_shifted(0) = %.9g, (-0) = %.9g, not 1", sy[4], sy[5]);
    CHECK(isinf(sy[6]) && sy[6] > 0 && isinf(sy[7]) && sy[7] > 0, "exp_shifted of 100 and inf is not +inf");
    CHECK(isnan(sy[8]), "exp_shifted(NaN) = %g, not NaN", sy[8]);
    double special_worst = 0.0;
    for (int i = 9; i < 21; i++) {
        double e = ulps_from_exact(sy[i], exp((double)sx[i]));
        special_worst = e > special_worst ? e : special_worst;
    }
    CHECK(special_worst <= 2.0, "exp_shifted: %.3f ulp on the finite special values", special_worst);
    CHECK(sy[21] == 12345.0f, "exp_shifted wrote past a row of 21");
}

// ---- Dropout rule and the CPU Philox stream ----------------------------------------------------------

#ifdef MLM_HAVE_CUDA
// The CPU reproduction of the stream (philox_uniform, philox_u32, philox_normal) against cuRAND's own host
// generator, called directly (rng_uniform itself uses the CPU copy once it has matched a sample, so it is no
// independent reference). Builds without CUDA use the reproduction alone; this is what makes that safe.
static void compare_with_curand(Rng *rng) {
    curandGenerator_t gen;
    CURAND_CHECK(curandCreateGeneratorHost(&gen, CURAND_RNG_PSEUDO_PHILOX4_32_10));
    CURAND_CHECK(curandSetGeneratorOrdering(gen, CURAND_ORDERING_PSEUDO_LEGACY));  // as rng.c
    CURAND_CHECK(curandSetPseudoRandomGeneratorSeed(gen, rng->seed));
    CHECK(rng_reproduced(rng) == 1, "the CPU copy of cuRAND's stream is not in use");
    // Offsets not multiples of 4, across the 65,536-block rows of cuRAND's layout, and far out.
    const uint64_t offsets[] = {0, 1, 3, 262143, 1000003, 123456789013ull};
    const size_t sizes[] = {1, 7, 262150, 4099};
    size_t total = 0, mismatches = 0, raw_total = 0, raw_mismatches = 0, normal_total = 0, normal_mismatches = 0;
    for (size_t o = 0; o < sizeof(offsets) / sizeof(offsets[0]); o++)
        for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
            size_t n = sizes[s];
            float *want = mlm_malloc(n * sizeof(float), "u"), *got = mlm_malloc(n * sizeof(float), "u");
            CURAND_CHECK(curandSetGeneratorOffset(gen, offsets[o]));
            CURAND_CHECK(curandGenerateUniform(gen, want, n));
            philox_uniform(rng->seed, offsets[o], got, n);
            for (size_t i = 0; i < n; i++) mismatches += memcmp(&want[i], &got[i], sizeof(float)) != 0;
            total += n;
            uint32_t *raw_want = mlm_malloc(n * sizeof(uint32_t), "x"), *raw_got = mlm_malloc(n * sizeof(uint32_t), "x");
            CURAND_CHECK(curandSetGeneratorOffset(gen, offsets[o]));
            CURAND_CHECK(curandGenerate(gen, raw_want, n));
            philox_u32(rng->seed, offsets[o], raw_got, n);
            for (size_t i = 0; i < n; i++) raw_mismatches += raw_want[i] != raw_got[i];
            raw_total += n;
            free(raw_want);
            free(raw_got);
            // Normals come in Box-Muller pairs from even offsets (as model_init_params draws them).
            uint64_t even_offset = offsets[o] & ~(uint64_t)1;
            size_t even_n = n & ~(size_t)1;
            if (even_n > 0) {
                CURAND_CHECK(curandSetGeneratorOffset(gen, even_offset));
                CURAND_CHECK(curandGenerateNormal(gen, want, even_n, 0.25f, 1.5f));
                philox_normal(rng->seed, even_offset, got, even_n, 0.25f, 1.5f);
                for (size_t i = 0; i < even_n; i++) normal_mismatches += memcmp(&want[i], &got[i], sizeof(float)) != 0;
                normal_total += even_n;
            }
            free(want);
            free(got);
        }
    printf("  %zu uniforms, %zu raw outputs, %zu normals compared; %zu, %zu, %zu differ\n", total, raw_total,
           normal_total, mismatches, raw_mismatches, normal_mismatches);
    CHECK(mismatches == 0, "philox_uniform differs from curandGenerateUniform in %zu of %zu values", mismatches, total);
    CHECK(raw_mismatches == 0, "philox_u32 differs from curandGenerate in %zu of %zu values", raw_mismatches, raw_total);
    CHECK(normal_mismatches == 0, "philox_normal differs from curandGenerateNormal in %zu of %zu values",
          normal_mismatches, normal_total);
    CURAND_CHECK(curandDestroyGenerator(gen));
}
#endif

// philox_raw_path (philox_wide.c: the AVX-512 and AVX2 groups of blocks) against philox_u32, which reproduces
// cuRAND's stream with curand_philox_lanes, one block at a time (compared with cuRAND itself above): every path
// this CPU runs must give the same bits at offsets inside a block, at the edge of cuRAND's 65,536-block rows (a
// group whose counters cross into the next iteration), where the iteration's high word is set, and for lengths
// around the groups' 32 and 64 outputs.
static void test_philox_paths(void) {
    printf("philox_raw: AVX-512 / AVX2 / portable paths vs philox_u32, bit for bit\n");
    const uint64_t seed = 0x243F6A8885A308D3ull;
    const uint64_t row = 4ull * CURAND_PHILOX_THREADS;  // outputs per iteration of cuRAND's layout
    const uint64_t offsets[] = {0, 1, 2, 3, row - 4 * 5 - 1, row - 4 * 16, 3 * row - 7, 1000003,
                                (1ull << 50) - 4 * 3 - 2, 123456789013ull};
    const size_t sizes[] = {0, 1, 5, 31, 32, 33, 63, 64, 65, 127, 1000, 4099};
    const PhiloxPath paths[] = {PHILOX_PATH_PORTABLE, PHILOX_PATH_AVX2, PHILOX_PATH_AVX512, PHILOX_PATH_AUTO};
    const char *names[] = {"portable", "avx2", "avx512", "auto"};
    size_t nmax = 4099 + 2;
    uint32_t *want = mlm_malloc(nmax * sizeof(uint32_t), "want"), *got = mlm_malloc(nmax * sizeof(uint32_t), "got");
    for (int k = 0; k < 4; k++) {
        if (!philox_path_supported(paths[k])) {
            printf("  %s: not run on this CPU\n", names[k]);
            continue;
        }
        size_t compared = 0, differ = 0, overrun = 0;
        for (size_t o = 0; o < sizeof(offsets) / sizeof(offsets[0]); o++)
            for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
                size_t n = sizes[s];
                philox_u32(seed, offsets[o], want, n);
                for (size_t i = 0; i < nmax; i++) got[i] = 0xDEADBEEFu;  // a guard word after the n outputs
                philox_raw_path(paths[k], seed, offsets[o], got, n);
                for (size_t i = 0; i < n; i++) differ += got[i] != want[i];
                overrun += got[n] != 0xDEADBEEFu;
                compared += n;
            }
        printf("  %s: %zu outputs compared, %zu differ, %zu writes past the end\n", names[k], compared, differ, overrun);
        CHECK(differ == 0, "philox_raw_path(%s) differs from philox_u32 in %zu of %zu outputs", names[k], differ,
              compared);
        CHECK(overrun == 0, "philox_raw_path(%s) wrote past its n outputs %zu times", names[k], overrun);
    }
    free(want);
    free(got);
}

static void test_dropout_rule(void) {
    printf("dropout rule: CPU Philox stream vs cuRAND's host generator, masks vs u < p\n");
    Rng rng;
    rng_init(&rng, 2024, RNG_DOMAIN_TRAIN);
#ifdef MLM_HAVE_CUDA
    compare_with_curand(&rng);
#else
    printf("  not compared with cuRAND: built without CUDA (the CUDA builds compare the two bit for bit)\n");
#endif

    // dropout_keep_mask's bits == !(u < p) for every site's offset, for several p, for the whole batch and for
    // micro-batches starting inside it (first_row), and the kept fraction is 1 - p. The masks are packed
    // (keep_bits.h); the counts below are not multiples of 32, so each mask's last word is partial: its bits past n
    // must be 0, and the word after the mask (the next layer's slot) must not be written.
    int B = 3, T = 7, C = 10, H = 2, F = 14, L = 3;
    const DropSite sites[4] = {DROP_ATTN_PROBS, DROP_ATTN_RESID, DROP_FFN_HIDDEN, DROP_FFN_RESID};
    const size_t counts[4] = {(size_t)B * H * T * T, (size_t)B * T * C, (size_t)B * T * F, (size_t)B * T * C};
    const float ps[3] = {0.1f, 0.25f, 0.5f};
    const KeepWord canary = 0xA5A5A5A5u;
    size_t bad = 0, checked = 0, bad_pad = 0;
    for (int k = 0; k < 3; k++)
        for (int first_row = 0; first_row < B; first_row++) {
            int rows = first_row == 0 ? 0 : B - first_row;  // 0: the whole batch; else rows [first_row, B)
            DropoutCtx d = {&rng, rng_layout(5, T, C, H, F, L), 4 + (uint64_t)k, ps[k], first_row, rows};
            for (int l = 0; l < L; l++)
                for (int s = 0; s < 4; s++) {
                    size_t n = rows ? counts[s] / B * rows : counts[s], words = keep_words(n);
                    float *u = mlm_malloc(n * sizeof(float), "u");
                    KeepWord *keep = mlm_malloc((words + 1) * sizeof(KeepWord), "keep");
                    for (size_t w = 0; w <= words; w++) keep[w] = canary;
                    rng_uniform(&rng, dropout_site_offset(&d, l, sites[s], n), u, n);
                    dropout_keep_mask(keep, &d, l, sites[s], n);
                    for (size_t i = 0; i < n; i++) bad += keep_bit(keep, i) != !(u[i] < d.p);
                    for (size_t i = n; i < words * KEEP_WORD_BITS; i++) bad_pad += keep_bit(keep, i);
                    bad_pad += keep[words] != canary;
                    checked += n;
                    free(u);
                    free(keep);
                }
        }
    // The micro-batch offsets themselves: rows [first_row, B) draw what the whole batch draws at those rows.
    DropoutCtx whole = {&rng, rng_layout(5, T, C, H, F, L), 9, 0.25f, 0, 0};
    DropoutCtx part = {&rng, rng_layout(5, T, C, H, F, L), 9, 0.25f, 2, 1};
    size_t row = (size_t)T * C, tail_bad = 0;
    KeepWord *all = mlm_malloc(keep_words(3 * row) * sizeof(KeepWord), "keep");
    KeepWord *tail = mlm_malloc(keep_words(row) * sizeof(KeepWord), "keep");
    dropout_keep_mask(all, &whole, 1, DROP_FFN_RESID, 3 * row);
    dropout_keep_mask(tail, &part, 1, DROP_FFN_RESID, row);
    for (size_t i = 0; i < row; i++) tail_bad += keep_bit(tail, i) != keep_bit(all, 2 * row + i);
    free(all);
    free(tail);
    size_t n = 1 << 20, kept = 0;
    KeepWord *keep = mlm_malloc(keep_words(n) * sizeof(KeepWord), "keep");
    float *u = mlm_malloc(n * sizeof(float), "u");
    DropoutCtx big = {&rng, rng_layout(64, 32, 128, 8, 256, 6), 17, 0.1f, 0, 0};
    dropout_keep_mask(keep, &big, 5, DROP_FFN_HIDDEN, n);
    rng_uniform(&rng, rng_dropout_offset(&big.layout, big.step, 5, DROP_FFN_HIDDEN), u, n);
    for (size_t i = 0; i < n; i++) {
        kept += keep_bit(keep, i);
        bad += keep_bit(keep, i) != !(u[i] < big.p);
    }
    checked += n;
    printf("  %zu packed mask bits compared with !(u < p) for p = 0.1, 0.25, 0.5 (whole batch and micro-batches): "
           "%zu differ, %zu padding bits or next words written; a micro-batch's last row vs the whole batch's: %zu "
           "differ\n",
           checked, bad, bad_pad, tail_bad);
    CHECK(bad == 0, "%zu dropout mask bits differ from !(u < p)", bad);
    CHECK(bad_pad == 0, "%zu dropout mask bits past n are set, or the word after the mask was written", bad_pad);
    CHECK(tail_bad == 0, "%zu bits of a micro-batch's mask differ from the whole batch's at its rows", tail_bad);
    double frac = (double)kept / n, sd = sqrt(0.09 / n);
    printf("  kept fraction %.5f (expected 0.9, sd %.5f)\n", frac, sd);
    CHECK(fabs(frac - 0.9) < 5 * sd, "kept fraction %.5f is not 0.9 within 5 sd", frac);
    free(u);
    CHECK(dropout_scale(0.1f) == 1.0f / 0.9f, "dropout scale");
    free(keep);
    rng_free(&rng);
}

// ---- Cross-entropy with ignore index -------------------------------------------------------------------

typedef struct {
    int N, V, ignore;
    float *logits, *losses;
    const int *labels;
} CeCtx;

static double ce_loss(void *p) {
    CeCtx *c = p;
    int nt;
    crossentropy_forward(c->losses, c->logits, c->labels, c->N, c->V, c->ignore, &nt, NULL);
    double s = 0.0;  // the mean in double (the returned float mean would add 1e-7 relative noise)
    for (int i = 0; i < c->N; i++) s += c->losses[i];
    return nt ? s / nt : 0.0;
}

static void test_crossentropy(void) {
    printf("cross-entropy with ignore index, B=3 T=5 V=7 (sequence 1 fully ignored)\n");
    int B = 3, T = 5, V = 7, N = B * T, ignore = 5;
    int labels[15];
    for (int i = 0; i < N; i++) labels[i] = (int)(rand_unit() * V);
    for (int t = 0; t < T; t++) labels[T + t] = ignore;  // a whole sequence without targets
    labels[0] = ignore;
    labels[2] = 6;
    labels[3] = 0;
    CeCtx c = {N, V, ignore, alloc_rand((size_t)N * V, 3.0f), alloc_zero(N), labels};
    // Row 3: a tie at the maximum between index 1 and 4 -> argmax 1; label 0 -> wrong. Row 2: label 6 is the max.
    for (int v = 0; v < V; v++) c.logits[3 * V + v] = 0.0f;
    c.logits[3 * V + 1] = c.logits[3 * V + 4] = 2.0f;
    for (int v = 0; v < V; v++) c.logits[2 * V + v] = v == 6 ? 5.0f : 0.0f;
    int nt = -1, correct = -1;
    float loss = crossentropy_forward(c.losses, c.logits, labels, N, V, ignore, &nt, &correct);
    double want = 0.0;
    int want_n = 0, want_correct = 0;
    for (int i = 0; i < N; i++) {
        if (labels[i] == ignore) continue;
        const float *x = c.logits + (size_t)i * V;
        double mx = x[0], s = 0.0;
        int am = 0;
        for (int v = 1; v < V; v++) {
            if (x[v] > mx) mx = x[v];
            if (x[v] > x[am]) am = v;
        }
        for (int v = 0; v < V; v++) s += exp(x[v] - mx);
        want += log(s) + mx - x[labels[i]];
        want_n++;
        want_correct += am == labels[i];
    }
    want /= want_n;
    printf("  loss %.7f (double %.7f), targets %d, correct %d (expected %d)\n", loss, want, nt, correct, want_correct);
    CHECK(fabs(loss - want) < 1e-6 * fmax(1.0, want), "loss %.7f vs %.7f", loss, want);
    CHECK(nt == want_n && correct == want_correct, "targets %d/%d correct %d/%d", nt, want_n, correct, want_correct);
    CHECK(correct >= 1, "row 2 (label = unique max) must count as correct");
    for (int i = 0; i < N; i++)
        if (labels[i] == ignore) CHECK(c.losses[i] == 0.0f, "ignored row %d has loss %g", i, c.losses[i]);
    float *dlogits = alloc_rand((size_t)N * V, 1.0f);
    crossentropy_backward(dlogits, c.logits, labels, N, V, ignore, 1.0f / (float)nt);
    int ignored_zero = 1;
    for (int i = 0; i < N; i++)
        for (int v = 0; v < V; v++)
            if (labels[i] == ignore && dlogits[i * V + v] != 0.0f) ignored_zero = 0;
    CHECK(ignored_zero, "ignored rows must have zero gradient");
    fd_check("cross-entropy d logits", ce_loss, &c, c.logits, dlogits, (size_t)N * V, 1e-2f, 1e-4, FD_RTOL);

    // An all-ignored batch: loss 0, no targets, no hits, zero gradient.
    int none[15];
    for (int i = 0; i < N; i++) none[i] = ignore;
    loss = crossentropy_forward(c.losses, c.logits, none, N, V, ignore, &nt, &correct);
    crossentropy_backward(dlogits, c.logits, none, N, V, ignore, 0.0f);
    int all_zero = 1;
    for (int i = 0; i < N * V; i++) all_zero &= dlogits[i] == 0.0f;
    CHECK(loss == 0.0f && nt == 0 && correct == 0 && all_zero, "all-ignored batch: loss %g targets %d correct %d zero grad %d",
          loss, nt, correct, all_zero);
    free(c.logits); free(c.losses); free(dlogits);
}

// ---- Optimizer and schedules ----------------------------------------------------------------------------

static const double PI_D = 3.14159265358979323846;  // M_PI is not in strict C11

static void test_optim_lr(void) {
    printf("learning-rate schedules\n");
    OptimConfig n = {OPTIM_NOAM_ADAM, SCHED_NOAM, 1.0f, 0.9f, 0.999f, 1e-8f, 0.0f, 2000, 0.0f, 128, 502784};
    double peak = pow(128.0, -0.5) * pow(2000.0, -0.5);
    double got = optim_lr(&n, 2000);
    printf("  Noam peak at t=2000: %.9e (expected %.9e = 1.976e-3)\n", got, peak);
    CHECK(fabs(got - peak) <= 1e-9 * peak, "Noam peak %.12e vs %.12e", got, peak);
    CHECK(fabs(peak - 1.976e-3) < 1e-6, "Noam peak %.6e is not 1.976e-3", peak);
    double t1 = pow(128.0, -0.5) * 1.0 * pow(2000.0, -1.5), t8000 = pow(128.0, -0.5) * pow(8000.0, -0.5);
    CHECK(fabs(optim_lr(&n, 1) - t1) <= 1e-12 * t1, "Noam t=1: %.12e vs %.12e", optim_lr(&n, 1), t1);
    CHECK(fabs(optim_lr(&n, 8000) - t8000) <= 1e-12 * t8000, "Noam t=8000");
    CHECK(optim_lr(&n, 1999) < got && optim_lr(&n, 2001) < got, "Noam peaks at t = warmup");

    OptimConfig c = {OPTIM_ADAMW, SCHED_COSINE, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.01f, 100, 1e-5f, 0, 1100};
    double lr = (double)1e-3f, mn = (double)1e-5f;
    CHECK(fabs(optim_lr(&c, 1) - lr / 100) < 1e-15, "cosine warmup t=1: %g", optim_lr(&c, 1));
    CHECK(fabs(optim_lr(&c, 50) - lr / 2) < 1e-15, "cosine warmup t=50");
    CHECK(fabs(optim_lr(&c, 100) - lr) < 1e-15, "cosine end of warmup");
    CHECK(fabs(optim_lr(&c, 600) - (mn + lr) / 2) < 1e-15, "cosine midpoint %g", optim_lr(&c, 600));
    CHECK(fabs(optim_lr(&c, 350) - (mn + 0.5 * (lr - mn) * (1 + cos(PI_D * 0.25)))) < 1e-15, "cosine quarter");
    CHECK(fabs(optim_lr(&c, 1100) - mn) < 1e-15 && fabs(optim_lr(&c, 5000) - mn) < 1e-15, "cosine end / after");
    c.schedule = SCHED_LINEAR;
    CHECK(fabs(optim_lr(&c, 600) - (mn + lr) / 2) < 1e-15, "linear midpoint");
    CHECK(fabs(optim_lr(&c, 350) - (lr + (mn - lr) * 0.25)) < 1e-15, "linear quarter");
    CHECK(fabs(optim_lr(&c, 1100) - mn) < 1e-15, "linear end");
    c.schedule = SCHED_CONSTANT;
    CHECK(fabs(optim_lr(&c, 10) - lr / 10) < 1e-15 && optim_lr(&c, 100) == lr && optim_lr(&c, 5000) == lr, "constant");
    c.warmup = 0;
    CHECK(optim_lr(&c, 1) == lr, "constant without warmup");
    printf("  cosine/linear/constant values at warmup, quarter, midpoint and end match\n");
}

static void test_adam(OptimKind kind) {
    printf("%s update vs double-precision formulas, 5 steps\n", kind == OPTIM_ADAMW ? "AdamW" : "Noam (labml) Adam");
    OptimConfig c = {kind, SCHED_NOAM, 1.0f, 0.9f, 0.999f, 1e-8f, kind == OPTIM_ADAMW ? 0.1f : 0.0f, 2000, 0.0f, 128, 10000};
    enum { P = 1001 };
    float *p = alloc_rand(P, 1.0f), *g = alloc_zero(P), *m = alloc_zero(P), *v = alloc_zero(P);
    double pd[P], md[P] = {0}, vd[P] = {0};
    uint8_t mask[P];
    for (int i = 0; i < P; i++) {
        pd[i] = p[i];
        mask[i] = i % 3 != 0;
    }
    double worst = 0.0, worst_abs = 0.0;
    for (long t = 1; t <= 5; t++) {
        fill_rand(g, P, 0.5f);
        g[7] = 0.0f;  // a zero gradient: the update must stay finite
        double lr = kind == OPTIM_ADAMW ? 3e-3 : 1e-2;
        cpu_adam_update(&c, p, g, m, v, kind == OPTIM_ADAMW ? mask : NULL, P, t, lr);
        double b1 = c.beta1, b2 = c.beta2, eps = c.eps, bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t);
        for (int i = 0; i < P; i++) {
            md[i] = b1 * md[i] + (1 - b1) * g[i];
            vd[i] = b2 * vd[i] + (1 - b2) * (double)g[i] * g[i];
            if (kind == OPTIM_ADAMW) {
                if (mask[i]) pd[i] *= 1 - lr * c.weight_decay;
                pd[i] -= lr * (md[i] / bc1) / (sqrt(vd[i] / bc2) + eps);
            } else {
                pd[i] -= lr * sqrt(bc2) / bc1 * md[i] / (sqrt(vd[i]) + eps);
            }
        }
        // Float state against double: each step rounds p to float up to twice (the decay product, then the
        // update: 6e-8 |p| each) with a decay factor that is itself a rounded float (6e-8 relative), and computes
        // the update (<= ~lr in size) to a few float ulps, so after t steps |p - p_double| <= t (2.4e-7 |p| + 1e-6 lr).
        for (int i = 0; i < P; i++) {
            double err = fabs(p[i] - pd[i]);
            worst = fmax(worst, err / (t * (2.4e-7 * fabs(pd[i]) + 1e-6 * lr)));
            worst_abs = fmax(worst_abs, err);
        }
    }
    printf("  max |p - p_double| after 5 steps: %.2e (worst/tol %.3f)\n", worst_abs, worst);
    CHECK(worst <= 1.0, "Adam (%d) deviates from the formula: worst/tol %.3f", (int)kind, worst);
    free(p); free(g); free(m); free(v);
}

static void test_grad_norm_and_clip(void) {
    printf("gradient norm and clipping\n");
    size_t n = 300007;
    float *g = alloc_rand(n, 0.01f);
    double want = 0.0;
    for (size_t i = 0; i < n; i++) want += (double)g[i] * g[i];
    want = sqrt(want);
    omp_set_num_threads(1);
    float n1 = cpu_grad_norm(g, n);
    omp_set_num_threads(2);
    float n2 = cpu_grad_norm(g, n);
    printf("  norm %.7f (double %.7f), 1 vs 2 threads identical: %s\n", n2, want, n1 == n2 ? "yes" : "no");
    CHECK(fabs(n2 - want) < 1e-6 * want && n1 == n2, "grad norm %.9g / %.9g vs %.9g", n1, n2, want);
    float before = cpu_clip_grads(g, n, 1.0f);
    float after = cpu_grad_norm(g, n);
    printf("  clip to 1.0: returned %.6f, norm after %.7f\n", before, after);
    CHECK(before == n2 && fabs(after - 1.0) < 1e-5, "clip returned %g, norm after %g", before, after);
    float again = cpu_clip_grads(g, n, 10.0f);
    CHECK(fabs(again - after) < 1e-6 && fabs(cpu_grad_norm(g, n) - after) < 1e-7, "no scaling below max_norm");
    free(g);
}

int main(void) {
    omp_set_num_threads(2);
    test_matmul();
    test_matmul_threads();
    test_linear();
    test_matmul_bias();
    test_embedding();
    test_layernorm();
    test_attention_fd(0, 0);
    test_attention_fd(1, 0);
    test_attention_fd(1, 1);
    test_attention_tiled();
    test_gelu();
    test_bert_embedding();
    test_ffn(0);
    test_ffn(1);
    test_residual_dropout();
    test_elementwise_exact();
    test_dropout_simd();
    test_exp_shifted();
    test_row_loops();
    test_layernorm_exact();
    test_philox_paths();
    test_dropout_rule();
    test_crossentropy();
    test_optim_lr();
    test_adam(OPTIM_NOAM_ADAM);
    test_adam(OPTIM_ADAMW);
    test_grad_norm_and_clip();
    return test_finish("test_cpu_ops");
}
