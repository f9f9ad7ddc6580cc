// mask.cu: device uniforms from cuRAND's Philox generator (cuda_uniform), and masking by the shared rule.
#include <curand.h>

#include "cuda_check.h"
#include "kernels.h"
#include "mask_rule.h"
#include "mlm/cuda_backend.h"

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

// u is [4, n]: the same layout and the same rule as mask_apply on the host. The rule is __grid_constant__ so
// that taking its address reads it from the parameter bank instead of copying 120 bytes per thread.
static __global__ void mask_kernel(const __grid_constant__ MaskRule rule, const int *tokens, size_t n,
                                   const float *u, int *inputs, int *labels) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    // Whole words: the selection draw is the U1 of the word's first piece (a short walk back over "##" pieces).
    size_t s = mask_word_start(&rule, tokens, i);
    mask_one(&rule, tokens[i], u[s], u[n + i], u[2 * n + i], u[3 * n + i], &inputs[i], &labels[i]);
}

extern "C" void cuda_mask_launch(const MaskConfig *c, const unsigned char *d_continuation, const int *d_tokens,
                                 size_t n, const float *d_uniforms, int *d_inputs, int *d_labels, cudaStream_t stream) {
    if (n == 0) return;
    if (c->whole_word && c->continuation && !d_continuation)
        mlm_fatal(MLM_EXIT_FAILURE, "whole-word masking on the GPU needs the continuation flags on the device: call "
                                    "cuda_model_set_continuation with the vocabulary's flags before training");
    MaskRule rule = mask_rule_from_config(c);
    rule.cont = c->whole_word && c->continuation ? d_continuation : NULL;  // the device copy of c->continuation
    const int block = 256;
    unsigned grid = (unsigned)((n + block - 1) / block);
    mask_kernel<<<grid, block, 0, stream>>>(rule, d_tokens, n, d_uniforms, d_inputs, d_labels);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_mask_batch_host(const MaskConfig *c, const int *tokens, size_t n, uint64_t philox_seed,
                                     uint64_t offset, int *inputs, int *labels) {
    int *d_tokens, *d_inputs, *d_labels;
    float *d_u;
    unsigned char *d_cont = NULL;
    if (c->whole_word && c->continuation) {
        CUDA_CHECK(cudaMalloc(&d_cont, (size_t)c->n_tokens));
        CUDA_CHECK(cudaMemcpy(d_cont, c->continuation, (size_t)c->n_tokens, cudaMemcpyHostToDevice));
    }
    CUDA_CHECK(cudaMalloc(&d_tokens, n * sizeof(int)));
    CUDA_CHECK(cudaMalloc(&d_inputs, n * sizeof(int)));
    CUDA_CHECK(cudaMalloc(&d_labels, n * sizeof(int)));
    CUDA_CHECK(cudaMalloc(&d_u, 4 * n * sizeof(float)));
    CUDA_CHECK(cudaMemcpy(d_tokens, tokens, n * sizeof(int), cudaMemcpyHostToDevice));
    curandGenerator_t gen;
    CURAND_CHECK(curandCreateGenerator(&gen, CURAND_RNG_PSEUDO_PHILOX4_32_10));
    CURAND_CHECK(curandSetGeneratorOrdering(gen, CURAND_ORDERING_PSEUDO_LEGACY));  // as rng.c and cuda_model.cu
    CURAND_CHECK(curandSetPseudoRandomGeneratorSeed(gen, philox_seed));
    CURAND_CHECK(curandSetGeneratorOffset(gen, offset));
    CURAND_CHECK(curandGenerateUniform(gen, d_u, 4 * n));
    cuda_mask_launch(c, d_cont, d_tokens, n, d_u, d_inputs, d_labels, 0);
    CUDA_CHECK(cudaMemcpy(inputs, d_inputs, n * sizeof(int), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(labels, d_labels, n * sizeof(int), cudaMemcpyDeviceToHost));
    CURAND_CHECK(curandDestroyGenerator(gen));
    CUDA_CHECK(cudaFree(d_tokens));
    CUDA_CHECK(cudaFree(d_inputs));
    CUDA_CHECK(cudaFree(d_labels));
    CUDA_CHECK(cudaFree(d_u));
    CUDA_CHECK(cudaFree(d_cont));
}
