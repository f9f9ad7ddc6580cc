// bf16.h: BF16 numbers as train.precision = bf16 stores them, and the two ways a float becomes one. A BF16 value is
// the upper 16 bits of an IEEE float (sign, the 8 exponent bits, 7 of the 23 mantissa bits), held here as
// uint16_t bits (C has no BF16 type; the CUDA kernels view the same bits as __nv_bfloat16).
//
// Round to nearest, ties to even (bf16_round_bits): the device's __float2bfloat16 / cvt.rn.bf16.f32, used for
// activations. NaN becomes the canonical 0x7fff; a value past the largest finite BF16 by half an ulp or more
// becomes infinity.
//
// THE ROUNDING RULE (stochastic rounding, bf16_stochastic_bits), used for the BF16 copy of the parameters, so that
// an update smaller than half a BF16 ulp still moves the copy with the right probability (its expectation is the
// FP32 value): element i of a tensor rounded at (seed, offset) takes the 32-bit output x of cuRAND's Philox stream
// with key `seed` at absolute index offset + i, r = x & 0xffff, and rounds up (away from zero) exactly when the
// 16 bits it drops plus r carry into the kept ones: bits = (float bits + r) >> 16, so with probability
// dropped / 65536. NaN becomes 0x7fff. The seed is the ROUND stream of the run (RNG_DOMAIN_ROUND) and the offset
// t * P for the copy made after t optimizer steps of P parameters (0 at the start), so a resumed run rounds
// exactly as the run it continues. The CPU twins below and the kernels of src/kernels/bf16.cu compute the same bits
// from the same functions (MLM_BF16_FN: host and device).
#ifndef MLM_BF16_H
#define MLM_BF16_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

// Host and device wherever the CUDA qualifiers exist (nvcc, and the CPU execution layer's kernel sources).
#if defined(__CUDACC__) || defined(__host__)
#define MLM_BF16_FN static inline __host__ __device__
#else
#define MLM_BF16_FN static inline
#endif

MLM_BF16_FN uint32_t bf16_float_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

MLM_BF16_FN float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

// Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then drop the low 16 bits (a carry into the
// exponent is the rounding up to the next binade, or to infinity).
MLM_BF16_FN uint16_t bf16_round_bits(float x) {
    uint32_t u = bf16_float_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// x rounded to the nearest BF16 value, as a float (the CPU reference's BF16 tensors are floats holding such values).
MLM_BF16_FN float bf16_round(float x) { return bf16_to_float(bf16_round_bits(x)); }

// THE ROUNDING RULE for one value and its Philox output x (only the low 16 bits are used).
MLM_BF16_FN uint16_t bf16_stochastic_bits(float v, uint32_t x) {
    uint32_t u = bf16_float_bits(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (uint16_t)((u + (x & 0xffffu)) >> 16);  // cannot wrap: finite floats are below 0xff800000
}

// ---- CPU twins of the kernels of src/kernels/bf16.cu (src/cpu/bf16.c) --------------------------------------
// out[n] = the BF16 nearest in[n] (ties to even).
void bf16_round_array(uint16_t *out, const float *in, size_t n);
// out[n] = in[n] as floats (exact).
void bf16_to_float_array(float *out, const uint16_t *in, size_t n);
// x[n] = bf16_round(x[n]) in place: where the CUDA backend stores a tensor in BF16, the CPU reference rounds it.
void bf16_round_in_place(float *x, size_t n);
// out[n] = THE ROUNDING RULE of in[n] at (seed, offset).
void bf16_stochastic_round_array(uint16_t *out, const float *in, size_t n, uint64_t seed, uint64_t offset);
// x[n] = the value of THE ROUNDING RULE of in[n] at (seed, offset), as floats (in may alias x).
void bf16_stochastic_round_values(float *x, const float *in, size_t n, uint64_t seed, uint64_t offset);

#ifdef __cplusplus
}
#endif

#endif
