// blas_probe.c: what a candidate CBLAS is (CMake's try_run, "CBLAS for the CPU backend" in CMakeLists.txt).
// Linked against the candidate exactly as mlm would be; checks that cblas_sgemm computes a product right and
// prints what the loaded library says it is (src/cpu/blas_id.h, the same code mlm runs at start-up).
#include <stdio.h>

#include "blas_id.h"

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);

int main(void) {
    // [2, 3] x [3, 2], row-major (CblasRowMajor = 101, CblasNoTrans = 111), beta = 0 over NaN-free garbage.
    const float A[6] = {1, 2, 3, 4, 5, 6}, B[6] = {7, 8, 9, 10, 11, 12}, want[4] = {58, 64, 139, 154};
    float C[4] = {-1, -1, -1, -1};
    cblas_sgemm(101, 111, 111, 2, 2, 3, 1.0f, A, 3, B, 2, 0.0f, C, 2);
    for (int i = 0; i < 4; i++)
        if (C[i] != want[i]) {
            printf("product=wrong\n");
            return 2;
        }
    BlasId id;
    blas_identify(&id, (void *)cblas_sgemm);
    printf("product=ok\nvendor=%s\nversion=%s\ncore=%s\nfile=%s\n", id.vendor ? id.vendor : "", id.version, id.core,
           id.file);
    return 0;
}
