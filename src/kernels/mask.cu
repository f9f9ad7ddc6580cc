// mask.cu: device uniforms from cuRAND's Philox generator (cuda_uniform), the same stream computed inside the
// kernels (cuda_philox_uniform, the dropout keep masks) and masking by the shared rule.
#include <curand.h>
#include <string.h>

#include "cuda_check.h"
#include "kernels.h"
#include "mask_rule.h"
#include "mlm/cuda_backend.h"
#include "philox.cuh"

// Uniforms in (0, 1] at absolute `offset` of the stream of a device Philox generator: the same numbers the
// host generator (rng_uniform) gives for the same seed and offset. Setting the offset is cheap on a device
// generator (Philox is counter-based: the next launch starts from the counter), so every draw seeks.
extern "C" void cuda_uniform(void *curand_gen, uint64_t offset, float *d_out, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    curandGenerator_t gen = (curandGenerator_t)curand_gen;
    CURAND_CHECK(curandSetStream(gen, stream));
    CURAND_CHECK(curandSetGeneratorOffset(gen, offset));
    CURAND_CHECK(curandGenerateUniform(gen, d_out, n));
}

// ---- Philox inside the kernels (philox.cuh) ----------------------------------------------------------------

// Distance between the mask's four blocks of uniforms (U1..U4): the WHOLE batch's token count, n when the batch
// is the whole batch.
static __device__ __forceinline__ uint64_t step_mask_stride(const DeviceStep *s, uint64_t row_len, uint64_t n) {
    return row_len > 0 && s->rng_rows > 0 ? s->rng_rows * row_len : n;
}

// Threads per Philox block of work: each thread computes whole blocks (4 outputs) and stores the ones inside
// [offset, offset + n); a grid-stride loop over the n / 4 + 1 blocks the range can touch.
enum { PHILOX_BLOCK_THREADS = 256, PHILOX_MAX_GRID = 4096 };

static unsigned philox_grid(size_t n) {
    size_t blocks = n / 4 + 2;  // [offset, offset + n) touches at most n / 4 + 2 Philox blocks
    size_t grid = (blocks + PHILOX_BLOCK_THREADS - 1) / PHILOX_BLOCK_THREADS;
    return (unsigned)(grid < (size_t)PHILOX_MAX_GRID ? grid : (size_t)PHILOX_MAX_GRID);
}

// The grid-stride walk over the Philox blocks that [offset, offset + n) touches: store(i, u) for each uniform u
// at offset + i, i in [0, n).
template <typename Store>
static __device__ __forceinline__ void for_each_philox_uniform(uint64_t seed, uint64_t offset, size_t n, Store store) {
    uint64_t first = offset / 4, count = (offset + n - 1) / 4 - first + 1;
    for (uint64_t j = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; j < count; j += (uint64_t)gridDim.x * blockDim.x) {
        uint32_t x[4];
        philox_block(seed, first + j, x);
        for (int k = 0; k < 4; k++) {
            uint64_t g = (first + j) * 4 + k;
            if (g >= offset && g - offset < n) store(g - offset, philox_to_uniform(x[k]));
        }
    }
}

static __global__ void philox_uniform_kernel(float *out /* [n] */, uint64_t seed, uint64_t offset, size_t n) {
    for_each_philox_uniform(seed, offset, n, [=](uint64_t i, float u) { out[i] = u; });
}

extern "C" void cuda_philox_uniform(float *d_out, uint64_t seed, uint64_t offset, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    philox_uniform_kernel<<<philox_grid(n), PHILOX_BLOCK_THREADS, 0, stream>>>(d_out, seed, offset, n);
    CUDA_CHECK_LAUNCH();
}

// Word w of a packed keep mask (keep_bits.h): bit j = !(u < p) for the uniform u at offset + 32 w + j, j < bits.
// The word's outputs span 8 or 9 Philox blocks (9 when offset is not a multiple of 4); each is computed once.
static __device__ __forceinline__ KeepWord philox_keep_word(uint64_t seed, uint64_t offset, size_t w, size_t bits,
                                                            float p) {
    uint64_t g0 = offset + (uint64_t)w * KEEP_WORD_BITS, g1 = g0 + bits;  // the word's outputs [g0, g1)
    KeepWord word = 0;
    for (uint64_t blk = g0 / 4; blk * 4 < g1; blk++) {
        uint32_t x[4];
        philox_block(seed, blk, x);
        for (int k = 0; k < 4; k++) {
            uint64_t g = blk * 4 + k;
            if (g >= g0 && g < g1) word |= (KeepWord)!(philox_to_uniform(x[k]) < p) << (g - g0);
        }
    }
    return word;
}

// keep[keep_words(n)]: bit i = !(u < p) for the uniform u at offset + i (THE DROPOUT RULE, as dropout_keep_kernel).
// A thread owns whole words (a grid-stride loop over them), so no word has two writers and no atomics are needed.
static __global__ void dropout_keep_philox_kernel(KeepWord *keep /* [keep_words(n)] */, const DeviceStep *step,
                                                  uint64_t offset_in_step, uint64_t row_len, float p, size_t n) {
    __shared__ uint64_t s_seed, s_offset;  // read once per block
    if (threadIdx.x == 0) s_seed = step->philox_seed, s_offset = step_rng_offset(step, offset_in_step, row_len);
    __syncthreads();
    size_t words = keep_words(n);
    for (size_t w = (size_t)blockIdx.x * blockDim.x + threadIdx.x; w < words; w += (size_t)gridDim.x * blockDim.x) {
        size_t bits = min((size_t)KEEP_WORD_BITS, n - w * KEEP_WORD_BITS);
        keep[w] = philox_keep_word(s_seed, s_offset, w, bits, p);
    }
}

static unsigned keep_word_grid(size_t n) {
    size_t grid = (keep_words(n) + PHILOX_BLOCK_THREADS - 1) / PHILOX_BLOCK_THREADS;
    return (unsigned)(grid < (size_t)PHILOX_MAX_GRID ? grid : (size_t)PHILOX_MAX_GRID);
}

extern "C" void cuda_dropout_keep_philox_rows(KeepWord *keep, const DeviceStep *d_step, uint64_t offset_in_step,
                                              size_t row_len, float p, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    dropout_keep_philox_kernel<<<keep_word_grid(n), PHILOX_BLOCK_THREADS, 0, stream>>>(keep, d_step, offset_in_step,
                                                                                        row_len, p, n);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_dropout_keep_philox(KeepWord *keep, const DeviceStep *d_step, uint64_t offset_in_step, float p,
                                         size_t n, cudaStream_t stream) {
    cuda_dropout_keep_philox_rows(keep, d_step, offset_in_step, 0, p, n, stream);
}

// ---- Masking ---------------------------------------------------------------------------------------------
// u is [4, n] at the step's offset: the same layout and the same rule as mask_apply on the host. The rule is
// __grid_constant__ so that taking its address reads it from the parameter bank instead of copying 120 bytes
// per thread.
static __global__ void mask_kernel(const __grid_constant__ MaskRule rule, const int *tokens, size_t n,
                                   uint64_t row_len, const DeviceStep *step, uint64_t offset_in_step, int *inputs,
                                   int *labels) {
    __shared__ uint64_t s_seed, s_offset, s_stride;  // read once per block
    if (threadIdx.x == 0) {
        s_seed = step->philox_seed;
        s_offset = step_rng_offset(step, offset_in_step, row_len);
        s_stride = step_mask_stride(step, row_len, n);
    }
    __syncthreads();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint64_t seed = s_seed, o = s_offset + i, stride = s_stride;
    // Whole words: the selection draw is the U1 of the word's first piece (a short walk back over "##" pieces).
    size_t s = mask_word_start(&rule, tokens, i);
    float u1 = philox_uniform_at(seed, s_offset + s), u2 = philox_uniform_at(seed, o + stride);
    float u3 = philox_uniform_at(seed, o + 2 * stride), u4 = philox_uniform_at(seed, o + 3 * stride);
    mask_one(&rule, tokens[i], u1, u2, u3, u4, &inputs[i], &labels[i]);
}

extern "C" void cuda_mask_philox(const MaskConfig *c, const unsigned char *d_continuation, const int *d_tokens,
                                 size_t n, const DeviceStep *d_step, uint64_t offset_in_step, int *d_inputs,
                                 int *d_labels, cudaStream_t stream) {
    cuda_mask_philox_rows(c, d_continuation, d_tokens, n, 0, d_step, offset_in_step, d_inputs, d_labels, stream);
}

extern "C" void cuda_mask_philox_rows(const MaskConfig *c, const unsigned char *d_continuation, const int *d_tokens,
                                      size_t n, size_t row_len, const DeviceStep *d_step, uint64_t offset_in_step,
                                      int *d_inputs, int *d_labels, cudaStream_t stream) {
    if (n == 0) return;
    if (c->whole_word && c->continuation && !d_continuation)
        mlm_fatal(MLM_EXIT_FAILURE, "whole-word masking on the GPU needs the continuation flags on the device: call "
                                    "cuda_model_set_continuation with the vocabulary's flags before training");
    MaskRule rule = mask_rule_from_config(c);
    rule.cont = c->whole_word && c->continuation ? d_continuation : NULL;  // the device copy of c->continuation
    const int block = 256;
    unsigned grid = (unsigned)((n + block - 1) / block);
    mask_kernel<<<grid, block, 0, stream>>>(rule, d_tokens, n, row_len, d_step, offset_in_step, d_inputs,
                                            d_labels);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_mask_batch_host(const MaskConfig *c, const int *tokens, size_t n, uint64_t philox_seed,
                                     uint64_t offset, int *inputs, int *labels) {
    int *d_tokens, *d_inputs, *d_labels;
    DeviceStep *d_step, step;
    memset(&step, 0, sizeof(step));
    step.philox_seed = philox_seed;
    step.rng_base = offset;
    unsigned char *d_cont = NULL;
    if (c->whole_word && c->continuation) {
        CUDA_CHECK(cudaMalloc(&d_cont, (size_t)c->n_tokens));
        CUDA_CHECK(cudaMemcpy(d_cont, c->continuation, (size_t)c->n_tokens, cudaMemcpyHostToDevice));
    }
    CUDA_CHECK(cudaMalloc(&d_tokens, n * sizeof(int)));
    CUDA_CHECK(cudaMalloc(&d_inputs, n * sizeof(int)));
    CUDA_CHECK(cudaMalloc(&d_labels, n * sizeof(int)));
    CUDA_CHECK(cudaMalloc(&d_step, sizeof(DeviceStep)));
    CUDA_CHECK(cudaMemcpy(d_step, &step, sizeof(step), cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(d_tokens, tokens, n * sizeof(int), cudaMemcpyHostToDevice));
    cuda_mask_philox(c, d_cont, d_tokens, n, d_step, 0, d_inputs, d_labels, 0);
    CUDA_CHECK(cudaMemcpy(inputs, d_inputs, n * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(labels, d_labels, n * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaFree(d_tokens));
    CUDA_CHECK(cudaFree(d_inputs));
    CUDA_CHECK(cudaFree(d_labels));
    CUDA_CHECK(cudaFree(d_step));
    CUDA_CHECK(cudaFree(d_cont));
}
