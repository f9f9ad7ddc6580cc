// matmul.h: row-major single-precision GEMM for the CPU backend (CBLAS when available, else a blocked OpenMP loop).
#ifndef MLM_CPU_MATMUL_H
#define MLM_CPU_MATMUL_H

// C[M, N] = alpha * op(A)[M, K] * op(B)[K, N] + beta * C, all matrices row-major.
// op(A) = A (stored [M, K], lda >= K) or, with trans_a, A^T (A stored [K, M], lda >= M); likewise op(B)
// (stored [K, N] or, with trans_b, [N, K]). With beta == 0 C is not read (it may hold garbage).
// Every output element is produced by one thread with a fixed order over k, so the result does not depend
// on the number of OpenMP threads.
void matmul(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
            const float *B, int ldb, float beta, float *C, int ldc);

// The built-in blocked OpenMP implementation, always compiled (matmul() uses it when there is no CBLAS);
// exposed so the tests can compare it with a naive loop and with the BLAS path.
void matmul_fallback(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc);

// Make the BLAS loaded at run time (OpenBLAS, BLIS or MKL, found by name) single-threaded, so that its own
// threads do not run beside OpenMP's; idempotent and thread-safe. matmul() and matmul_serial() call it.
void matmul_init(void);

// OpenBLAS's thread count as openblas_get_num_threads() reports it (1 after matmul_init), or -1 when no
// OpenBLAS is loaded.
int matmul_blas_threads(void);

// The same product computed by the calling thread alone (one sgemm call, or a plain loop without CBLAS):
// for the many small per-(batch, head) products inside an OpenMP loop.
void matmul_serial(int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc);

// "OpenBLAS", "CBLAS" or "builtin": which implementation matmul() calls.
const char *matmul_backend_name(void);

#endif
