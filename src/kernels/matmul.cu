// matmul.cu: the Linear layers' products through cuBLASLt (cublasLtMatmul): FP32 or BF16 matrices with FP32
// accumulation (CUBLAS_COMPUTE_32F, an FP32 scale; FP32 inputs may use TF32 tensor cores), the bias added by the
// BIAS epilogue, beta 1 to accumulate into the output. llm.c's llmc/matmul.cuh is the model: one descriptor per
// call (cheap on the host, and captured into a CUDA graph with the step), the heuristic's first algorithm within
// the workspace.
//
// cuBLASLt is column-major: a row-major [R, K] matrix is the column-major [K, R] one, so every row-major product
// below is the column-major product of the transposes (as cuda_model.cu's cuBLAS calls).
#include <cublasLt.h>

#include "cuda_check.h"
#include "kernels.h"

static cudaDataType lt_type(MlmDtype t) { return t == MLM_DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_32F; }

extern "C" void cuda_lt_create(CudaLt *lt, void *workspace, size_t workspace_bytes, int tf32) {
    cublasLtHandle_t h;
    CUBLAS_CHECK(cublasLtCreate(&h));
    lt->handle = h;
    lt->workspace = workspace;
    lt->workspace_bytes = workspace_bytes;
    lt->tf32 = tf32 != 0;
}

extern "C" void cuda_lt_destroy(CudaLt *lt) {
    if (lt->handle) CUBLAS_CHECK(cublasLtDestroy((cublasLtHandle_t)lt->handle));
    lt->handle = NULL;
}

// D[m, n] = beta D + op(A)[m, k] op(B)[k, n] (+ bias[m]), column-major; A and B of type ab, D (and the bias) of
// type d.
static void lt_gemm(const CudaLt *lt, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *A,
                    int lda, const void *B, int ldb, MlmDtype ab, void *D, int ldd, MlmDtype d, const void *bias,
                    float beta, cudaStream_t stream) {
    cublasComputeType_t compute = ab == MLM_DTYPE_F32 && lt->tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    cublasLtMatmulDesc_t desc;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, compute, CUDA_R_32F));
    int32_t opa = ta, opb = tb;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
    uint32_t epilogue = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    if (bias) CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    cublasLtMatrixLayout_t la, lb, ld;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, lt_type(ab), ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, lt_type(ab), tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&ld, lt_type(d), m, n, ldd));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = lt->workspace_bytes;
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic((cublasLtHandle_t)lt->handle, desc, la, lb, ld, ld, pref, 1, &heur,
                                                &found));
    if (found == 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cuBLASLt has no algorithm for a %s product (m %d, n %d, k %d, %c%c, bias %s) on "
                  "this GPU; train with train.precision = fp32 or tf32 and report the GPU and CUDA version",
                  ab == MLM_DTYPE_BF16 ? "BF16" : "FP32", m, n, k, ta == CUBLAS_OP_N ? 'N' : 'T',
                  tb == CUBLAS_OP_N ? 'N' : 'T', bias ? "yes" : "no");
    const float one = 1.0f;
    // In place: C is D (one layout), read only when beta != 0.
    CUBLAS_CHECK(cublasLtMatmul((cublasLtHandle_t)lt->handle, desc, &one, A, la, B, lb, &beta, D, ld, D, ld,
                                &heur.algo, lt->workspace, lt->workspace_bytes, stream));
    CUBLAS_CHECK(cublasLtMatmulPreferenceDestroy(pref));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(la));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(lb));
    CUBLAS_CHECK(cublasLtMatrixLayoutDestroy(ld));
    CUBLAS_CHECK(cublasLtMatmulDescDestroy(desc));
}

// out[N, OC] = inp[N, IC] w[OC, IC]^T: column-major out is [OC, N] = op_T(w [IC, OC]) inp [IC, N].
extern "C" void cuda_lt_linear_forward(const CudaLt *lt, void *out, MlmDtype out_t, const void *inp, const void *w,
                                       MlmDtype in_t, const void *bias, int N, int IC, int OC, float beta,
                                       cudaStream_t stream) {
    lt_gemm(lt, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, w, IC, inp, IC, in_t, out, OC, out_t, bias, beta, stream);
}

// dinp[N, IC] = dout[N, OC] w[OC, IC]: column-major dinp is [IC, N] = w [IC, OC] dout [OC, N].
extern "C" void cuda_lt_linear_backward_input(const CudaLt *lt, void *dinp, MlmDtype dinp_t, const void *dout,
                                              const void *w, MlmDtype in_t, int N, int IC, int OC, float beta,
                                              cudaStream_t stream) {
    lt_gemm(lt, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, w, IC, dout, OC, in_t, dinp, IC, dinp_t, NULL, beta, stream);
}

// dw[OC, IC] = dout[N, OC]^T inp[N, IC]: column-major dw is [IC, OC] = inp [IC, N] op_T(dout [OC, N]).
extern "C" void cuda_lt_linear_backward_weight(const CudaLt *lt, void *dw, MlmDtype dw_t, const void *dout,
                                               const void *inp, MlmDtype in_t, int N, int IC, int OC, float beta,
                                               cudaStream_t stream) {
    lt_gemm(lt, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, inp, IC, dout, OC, in_t, dw, IC, dw_t, NULL, beta, stream);
}
