// matmul.h: row-major single-precision GEMM for the CPU backend (an optimized CBLAS when the build has one,
// else the built-in packed, register-blocked GEMM of gemm.c).
#ifndef MLM_CPU_MATMUL_H
#define MLM_CPU_MATMUL_H

#include <stddef.h>

// C[M, N] = alpha * op(A)[M, K] * op(B)[K, N] + beta * C, all matrices row-major.
// op(A) = A (stored [M, K], lda >= K) or, with trans_a, A^T (A stored [K, M], lda >= M); likewise op(B)
// (stored [K, N] or, with trans_b, [N, K]). With beta == 0 C is not read (it may hold garbage).
// Every output element is produced by one thread with a fixed order over k, so the result does not depend
// on the number of OpenMP threads.
void matmul(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
            const float *B, int ldb, float beta, float *C, int ldc);

// The same product computed by the calling thread alone (one sgemm call, or the built-in GEMM without
// threads): for the many small per-(batch, head) products inside an OpenMP loop.
void matmul_serial(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc);

// C[M, N] = op(A) op(B) + bias[N] on every row: the bits of matmul(..., alpha 1, beta 1) with every row of C
// filled with the bias first, without that pass over C (the built-in GEMM adds the bias where it stores a tile; the
// BLAS path fills each tile's rows just before its sgemm, while they are in cache).
void matmul_bias(int trans_a, int trans_b, int M, int N, int K, const float *A, int lda, const float *B, int ldb,
                 const float *bias, float *C, int ldc);

// The built-in GEMM (gemm.c), always compiled; matmul() and matmul_serial() use it when no optimized BLAS
// runs. Every element is fma(a[k], b[k], acc) over k = 0..K-1 from +0, then alpha * acc (+ beta * C): the same
// bits for any thread count, tiling and kernel.
void matmul_builtin(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc);
void matmul_builtin_bias(int trans_a, int trans_b, int M, int N, int K, const float *A, int lda, const float *B,
                         int ldb, const float *bias, float *C, int ldc);
void matmul_builtin_serial(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                           const float *B, int ldb, float beta, float *C, int ldc);

// The built-in GEMM's micro-kernel: the widest this CPU supports ("avx512", "avx2" or "generic"), and, for
// the tests and the bench, forcing one (NULL: choose per product again); returns 0 when this CPU or build
// lacks it. Not thread-safe: call between products.
const char *gemm_kernel_name(void);
int gemm_force_kernel(const char *name);

// Make the BLAS loaded at run time (OpenBLAS, BLIS or MKL, found by name) single-threaded, so that its own
// threads do not run beside OpenMP's; idempotent and thread-safe. matmul() and matmul_serial() call it.
void matmul_init(void);

// OpenBLAS's thread count as openblas_get_num_threads() reports it (1 after matmul_init), or -1 when no
// OpenBLAS is loaded.
int matmul_blas_threads(void);

// Which implementation matmul() calls in this process: "builtin", or the BLAS's vendor ("OpenBLAS",
// "BLIS", "MKL"; "CBLAS" for an unidentified library named explicitly with MLM_BLAS).
const char *matmul_backend_name(void);

#endif
