// cublasLt.h (tests/emu): the cuBLASLt calls the project makes, emulated from their definition in
// tests/emu/emu_cublaslt.cc: D = epilogue(alpha op(A) op(B) + beta C) with column-major layouts, FP32 or BF16
// matrices, CUBLAS_COMPUTE_32F (FP32 accumulation; products summed in double here and rounded once, the exactly
// rounded result that the device's FP32 sums approach) and an FP32 scale, the DEFAULT and BIAS epilogues, strided
// batches, and cuBLASLt's argument checks. Names map to emu_-prefixed functions (see cuda_runtime.h). Types and
// enum values are the toolkit's (cublasLt.h, cublas_api.h, library_types.h of CUDA 12/13).
#ifndef MLM_EMU_CUBLASLT_H
#define MLM_EMU_CUBLASLT_H

#include <stddef.h>
#include <stdint.h>

#include "cublas_v2.h"
#include "cuda_runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

// library_types.h
#ifndef MLM_EMU_CUDA_DATA_TYPE
#define MLM_EMU_CUDA_DATA_TYPE
typedef enum cudaDataType_t {
    CUDA_R_16F = 2,
    CUDA_R_16BF = 14,
    CUDA_R_32F = 0,
    CUDA_R_64F = 1,
    CUDA_R_8I = 3,
    CUDA_R_32I = 10
} cudaDataType;
typedef cudaDataType cudaDataType_t;
#endif

// cublas_api.h
typedef enum {
    CUBLAS_COMPUTE_16F = 64,
    CUBLAS_COMPUTE_16F_PEDANTIC = 65,
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
    CUBLAS_COMPUTE_64F = 70,
    CUBLAS_COMPUTE_64F_PEDANTIC = 71,
    CUBLAS_COMPUTE_32I = 72,
    CUBLAS_COMPUTE_32I_PEDANTIC = 73
} cublasComputeType_t;

typedef struct cublasLtContext *cublasLtHandle_t;
typedef struct {
    uint64_t data[8];
} cublasLtMatrixLayoutOpaque_t;
typedef cublasLtMatrixLayoutOpaque_t *cublasLtMatrixLayout_t;
typedef struct {
    uint64_t data[8];
} cublasLtMatmulAlgo_t;
typedef struct {
    uint64_t data[32];
} cublasLtMatmulDescOpaque_t;
typedef cublasLtMatmulDescOpaque_t *cublasLtMatmulDesc_t;
typedef struct {
    uint64_t data[8];
} cublasLtMatmulPreferenceOpaque_t;
typedef cublasLtMatmulPreferenceOpaque_t *cublasLtMatmulPreference_t;

typedef enum { CUBLASLT_ORDER_COL = 0, CUBLASLT_ORDER_ROW = 1 } cublasLtOrder_t;

typedef enum {
    CUBLASLT_MATRIX_LAYOUT_TYPE = 0,                  // uint32_t (cudaDataType)
    CUBLASLT_MATRIX_LAYOUT_ORDER = 1,                 // int32_t
    CUBLASLT_MATRIX_LAYOUT_ROWS = 2,                  // uint64_t
    CUBLASLT_MATRIX_LAYOUT_COLS = 3,                  // uint64_t
    CUBLASLT_MATRIX_LAYOUT_LD = 4,                    // int64_t
    CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT = 5,           // int32_t
    CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET = 6,  // int64_t (elements)
    CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET = 7           // int64_t
} cublasLtMatrixLayoutAttribute_t;

typedef enum { CUBLASLT_POINTER_MODE_HOST = 0, CUBLASLT_POINTER_MODE_DEVICE = 1 } cublasLtPointerMode_t;

typedef enum {
    CUBLASLT_MATMUL_DESC_COMPUTE_TYPE = 0,   // int32_t (cublasComputeType_t)
    CUBLASLT_MATMUL_DESC_SCALE_TYPE = 1,     // int32_t (cudaDataType)
    CUBLASLT_MATMUL_DESC_POINTER_MODE = 2,   // int32_t
    CUBLASLT_MATMUL_DESC_TRANSA = 3,         // int32_t (cublasOperation_t)
    CUBLASLT_MATMUL_DESC_TRANSB = 4,         // int32_t
    CUBLASLT_MATMUL_DESC_TRANSC = 5,         // int32_t
    CUBLASLT_MATMUL_DESC_FILL_MODE = 6,      // int32_t
    CUBLASLT_MATMUL_DESC_EPILOGUE = 7,       // uint32_t (cublasLtEpilogue_t)
    CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,   // const void *
    CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE = 10,  // int64_t
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
    CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
    CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26  // int32_t (cudaDataType; -1: the type of D)
} cublasLtMatmulDescAttributes_t;

typedef enum {
    CUBLASLT_EPILOGUE_DEFAULT = 1,
    CUBLASLT_EPILOGUE_RELU = 2,
    CUBLASLT_EPILOGUE_BIAS = 4,
    CUBLASLT_EPILOGUE_RELU_BIAS = 6,
    CUBLASLT_EPILOGUE_GELU = 32,
    CUBLASLT_EPILOGUE_GELU_BIAS = 36,
    CUBLASLT_EPILOGUE_BGRADA = 256,
    CUBLASLT_EPILOGUE_BGRADB = 512
} cublasLtEpilogue_t;

typedef enum {
    CUBLASLT_MATMUL_PREF_SEARCH_MODE = 0,          // uint32_t
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1   // uint64_t
} cublasLtMatmulPreferenceAttributes_t;

typedef struct {
    cublasLtMatmulAlgo_t algo;
    size_t workspaceSize;
    cublasStatus_t state;
    float wavesCount;
    int reserved[4];
} cublasLtMatmulHeuristicResult_t;

#define cublasLtCreate emu_cublasLtCreate
#define cublasLtDestroy emu_cublasLtDestroy
#define cublasLtGetStatusName emu_cublasLtGetStatusName
#define cublasLtGetStatusString emu_cublasLtGetStatusString
#define cublasLtMatmulDescCreate emu_cublasLtMatmulDescCreate
#define cublasLtMatmulDescDestroy emu_cublasLtMatmulDescDestroy
#define cublasLtMatmulDescSetAttribute emu_cublasLtMatmulDescSetAttribute
#define cublasLtMatrixLayoutCreate emu_cublasLtMatrixLayoutCreate
#define cublasLtMatrixLayoutDestroy emu_cublasLtMatrixLayoutDestroy
#define cublasLtMatrixLayoutSetAttribute emu_cublasLtMatrixLayoutSetAttribute
#define cublasLtMatmulPreferenceCreate emu_cublasLtMatmulPreferenceCreate
#define cublasLtMatmulPreferenceDestroy emu_cublasLtMatmulPreferenceDestroy
#define cublasLtMatmulPreferenceSetAttribute emu_cublasLtMatmulPreferenceSetAttribute
#define cublasLtMatmulAlgoGetHeuristic emu_cublasLtMatmulAlgoGetHeuristic
#define cublasLtMatmul emu_cublasLtMatmul

cublasStatus_t cublasLtCreate(cublasLtHandle_t *handle);
cublasStatus_t cublasLtDestroy(cublasLtHandle_t handle);
const char *cublasLtGetStatusName(cublasStatus_t status);
const char *cublasLtGetStatusString(cublasStatus_t status);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t sizeInBytes);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout);
cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr,
                                                const void *buf, size_t sizeInBytes);
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t sizeInBytes);
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t pref, int requestedAlgoCount,
                                              cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                              int *returnAlgoCount);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                              cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                              const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspaceSizeInBytes, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif
