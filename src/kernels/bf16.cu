// bf16.cu: BF16 copies of FP32 tensors (train.precision = bf16): round to nearest even, THE ROUNDING RULE
// (stochastic rounding with the Philox stream, include/mlm/bf16.h) and back to FP32. Twins: src/cpu/bf16.c.
#include <cuda_bf16.h>

#include "cuda_check.h"
#include "kernels.h"
#include "mlm/bf16.h"
#include "philox.cuh"

enum { BF16_BLOCK = 256, BF16_MAX_GRID = 4096 };

static unsigned grid_for(size_t n) {
    size_t blocks = (n + BF16_BLOCK - 1) / BF16_BLOCK;
    return (unsigned)(blocks < (size_t)BF16_MAX_GRID ? blocks : (size_t)BF16_MAX_GRID);
}

static __global__ void bf16_round_kernel(uint16_t *out /* [n] */, const float *in /* [n] */, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}

static __global__ void bf16_widen_kernel(float *out /* [n] */, const uint16_t *in /* [n] */, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}

// Each thread takes whole Philox blocks (4 outputs, so 4 elements) and rounds the elements of [offset, offset + n)
// they cover.
static __global__ void bf16_stochastic_kernel(uint16_t *out /* [n] */, const float *in /* [n] */, size_t n,
                                              uint64_t seed, uint64_t offset) {
    uint64_t first = offset / 4, count = (offset + n - 1) / 4 - first + 1;
    for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < count; j += (uint64_t)gridDim.x * blockDim.x) {
        uint32_t x[4];
        philox_block(seed, first + j, x);
        for (int k = 0; k < 4; k++) {
            uint64_t g = (first + j) * 4 + k;
            if (g >= offset && g - offset < n) out[g - offset] = bf16_stochastic_bits(in[g - offset], x[k]);
        }
    }
}

extern "C" void cuda_bf16_round(uint16_t *out, const float *in, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    bf16_round_kernel<<<grid_for(n), BF16_BLOCK, 0, stream>>>(out, in, n);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_bf16_to_float(float *out, const uint16_t *in, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    bf16_widen_kernel<<<grid_for(n), BF16_BLOCK, 0, stream>>>(out, in, n);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_bf16_stochastic_round(uint16_t *out, const float *in, size_t n, uint64_t seed, uint64_t offset,
                                           cudaStream_t stream) {
    if (n == 0) return;
    bf16_stochastic_kernel<<<grid_for(n / 4 + 2), BF16_BLOCK, 0, stream>>>(out, in, n, seed, offset);
    CUDA_CHECK_LAUNCH();
}
