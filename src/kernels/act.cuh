// act.cuh: the storage type of the tensors a kernel reads and writes: float, or BF16 (__nv_bfloat16, `bf16`) under
// train.precision = bf16, where the activations, their gradients and the parameter copy the step computes with are
// BF16 while LayerNorm statistics, softmax statistics, losses and parameter gradients stay FP32. Kernels are templates
// over the storage type X, reading through ld() and writing through st(), which returns the value memory now holds
// (the rounded one in BF16), so that whatever a kernel goes on computing from its output (a column sum of it, the
// LayerNorm of a residual sum) uses that value, as the CPU reference does (src/cpu/cpu_model.c, bf16_point). With
// X = float both are plain loads and stores: the FP32 kernels are what they were, bit for bit.
#ifndef MLM_KERNELS_ACT_CUH
#define MLM_KERNELS_ACT_CUH

#include <cuda_bf16.h>
#include <stddef.h>

typedef __nv_bfloat16 bf16;

static __device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
static __device__ __forceinline__ float ld(const bf16 *p, size_t i) { return __bfloat162float(p[i]); }

static __device__ __forceinline__ float st(float *p, size_t i, float v) {
    p[i] = v;
    return v;
}
static __device__ __forceinline__ float st(bf16 *p, size_t i, float v) {
    bf16 b = __float2bfloat16_rn(v);
    p[i] = b;
    return __bfloat162float(b);
}

// v as a tensor of type X would hold it (kernels that keep a value in registers after "storing" it elsewhere).
template <typename X>
static __device__ __forceinline__ float as_stored(float v) {
    return v;
}
template <>
__device__ __forceinline__ float as_stored<bf16>(float v) {
    return __bfloat162float(__float2bfloat16_rn(v));
}

#endif
