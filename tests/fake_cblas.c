// fake_cblas.c: a CBLAS that is no optimized BLAS, for test_blas_select.sh and test_blas_runtime.sh (issue 18).
// cblas_sgemm by its definition (row-major only, as mlm calls it); with -DVENDOR it also exports OpenBLAS's
// vendor function, and so says it is OpenBLAS (the control: a check that refused everything would fail it).
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);
void cblas_sgemm(int order, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc) {
    (void)order;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++)
                s += (ta == 112 ? A[k * lda + i] : A[i * lda + k]) * (tb == 112 ? B[j * ldb + k] : B[k * ldb + j]);
            C[i * ldc + j] = alpha * s + (beta != 0.0f ? beta * C[i * ldc + j] : 0.0f);
        }
}
#ifdef VENDOR
char *openblas_get_config(void);
char *openblas_get_config(void) { return "OpenBLAS 9.9.9 (fake, for test_blas_select and test_blas_runtime)"; }
#endif
