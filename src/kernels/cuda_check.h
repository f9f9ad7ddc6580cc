// cuda_check.h: CUDA_CHECK and CUBLAS_CHECK, which stop with the call, file, line and the library's message.
#ifndef MLM_CUDA_CHECK_H
#define MLM_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "mlm/common.h"
#include "mlm/curand_check.h"

#define CUDA_CHECK(call)                                                                        \
    do {                                                                                        \
        cudaError_t mlm_e_ = (call);                                                            \
        if (mlm_e_ != cudaSuccess) {                                                            \
            if (mlm_e_ == cudaErrorMemoryAllocation)                                            \
                mlm_fatal(MLM_EXIT_FAILURE, "CUDA out of memory in %s at %s:%d; reduce "        \
                          "train.batch_size, data.seq_len or the model size", #call, __FILE__,  \
                          __LINE__);                                                            \
            mlm_fatal(MLM_EXIT_FAILURE, "CUDA call %s failed at %s:%d: %s (%s)", #call, __FILE__, \
                      __LINE__, cudaGetErrorString(mlm_e_), cudaGetErrorName(mlm_e_));           \
        }                                                                                       \
    } while (0)

#define CUBLAS_CHECK(call)                                                                      \
    do {                                                                                        \
        cublasStatus_t mlm_s_ = (call);                                                         \
        if (mlm_s_ != CUBLAS_STATUS_SUCCESS)                                                    \
            mlm_fatal(MLM_EXIT_FAILURE, "cuBLAS call %s failed at %s:%d: %s (%s)", #call, __FILE__, \
                      __LINE__, cublasGetStatusString(mlm_s_), cublasGetStatusName(mlm_s_));    \
    } while (0)

// Check the last kernel launch (launch errors surface here, execution errors at the next sync).
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

#endif
