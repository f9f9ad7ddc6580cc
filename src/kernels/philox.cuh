// philox.cuh: cuRAND's Philox4x32-10 LEGACY stream computed inside kernels, and where a step's draws lie in it
// (device functions shared by mask.cu and attention.cu).
#ifndef MLM_KERNELS_PHILOX_CUH
#define MLM_KERNELS_PHILOX_CUH

#include <stdint.h>

#include "kernels.h"     // DeviceStep
#include "philox_cpu.h"  // CURAND_PHILOX_THREADS, the Philox constants and CURAND_2POW32_INV

// cuRAND's Philox4x32-10 LEGACY stream as philox_cpu.h reproduces it: output g of the stream with key `seed`
// is word g % 4 of the Philox block p = g / 4, whose counter is {iteration lo, iteration hi, thread, 0} with
// thread = p % CURAND_PHILOX_THREADS and iteration = p / CURAND_PHILOX_THREADS; the uniform is
// x * 2^-32 + 2^-33 in float. Computing it in the kernel that consumes it removes the cuRAND call (and the
// uniforms buffer) per draw, and the offsets can come from device memory, so a step is capturable.

// Philox4x32-10 of block p (Random123's constants, as curand_philox_lanes).
static __device__ __forceinline__ void philox_block(uint64_t seed, uint64_t p, uint32_t x[4]) {
    uint64_t iteration = p / CURAND_PHILOX_THREADS;
    uint32_t c0 = (uint32_t)iteration, c1 = (uint32_t)(iteration >> 32);
    uint32_t c2 = (uint32_t)(p % CURAND_PHILOX_THREADS), c3 = 0;
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t a = (uint64_t)PHILOX_M0 * c0, b = (uint64_t)PHILOX_M1 * c2;
        c0 = (uint32_t)(b >> 32) ^ c1 ^ k0;
        c2 = (uint32_t)(a >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)b;
        c3 = (uint32_t)a;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    x[0] = c0, x[1] = c1, x[2] = c2, x[3] = c3;
}

// cuRAND's _curand_uniform, rounded as the CPU rounds it: the product is exact (a power-of-two scale of a
// float), so one rounding in the add whether or not the device fuses them; _rn keeps nvcc from reordering.
static __device__ __forceinline__ float philox_to_uniform(uint32_t x) {
    return __fadd_rn(__fmul_rn((float)x, CURAND_2POW32_INV), CURAND_2POW32_INV / 2.0f);
}

// The uniform at absolute output index g (one Philox block per call: for scattered indices).
static __device__ __forceinline__ float philox_uniform_at(uint64_t seed, uint64_t g) {
    uint32_t x[4];
    philox_block(seed, g / 4, x);
    return philox_to_uniform(x[g % 4]);
}

// Absolute offset of a draw of the step *s whose region holds row_len outputs per row of the whole batch: the
// one place that maps a step's draws to stream offsets on the device. A micro-batch (gradient accumulation, a
// data-parallel rank) starts s->rng_row0 rows into the region, so it draws exactly the numbers its rows get in
// the whole batch (as the CPU's dropout_keep_mask with DropoutCtx.first_row).
static __device__ __forceinline__ uint64_t step_rng_offset(const DeviceStep *s, uint64_t offset_in_step,
                                                           uint64_t row_len) {
    return s->rng_base + offset_in_step + s->rng_row0 * row_len;
}

#endif
