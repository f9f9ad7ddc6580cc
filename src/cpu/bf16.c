// bf16.c: the CPU twins of the BF16 conversion kernels (src/kernels/bf16.cu): round to nearest even, widen, and
// THE ROUNDING RULE of include/mlm/bf16.h with cuRAND's Philox stream reproduced on the CPU (philox_cpu.h).
#include "mlm/bf16.h"

#include "ops.h"
#include "philox_cpu.h"

void bf16_round_array(uint16_t *out, const float *in, size_t n) {
#pragma omp parallel for schedule(static) if (n >= MLM_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) out[i] = bf16_round_bits(in[i]);
}

void bf16_to_float_array(float *out, const uint16_t *in, size_t n) {
#pragma omp parallel for schedule(static) if (n >= MLM_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) out[i] = bf16_to_float(in[i]);
}

void bf16_round_in_place(float *x, size_t n) {
#pragma omp parallel for schedule(static) if (n >= MLM_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) x[i] = bf16_round(x[i]);
}

void bf16_stochastic_round_array(uint16_t *out, const float *in, size_t n, uint64_t seed, uint64_t offset) {
    if (n == 0) return;
    FOR_EACH_PHILOX(seed, offset, (uint64_t)n, out[i] = bf16_stochastic_bits(in[i], x));
}

void bf16_stochastic_round_values(float *x_out, const float *in, size_t n, uint64_t seed, uint64_t offset) {
    if (n == 0) return;
    FOR_EACH_PHILOX(seed, offset, (uint64_t)n, x_out[i] = bf16_to_float(bf16_stochastic_bits(in[i], x)));
}
