// cuda_backend.h: the C interface of the CUDA backend (implemented in src/kernels/*.cu).
#ifndef MLM_CUDA_BACKEND_H
#define MLM_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/mask.h"

#ifdef __cplusplus
extern "C" {
#endif

// Number of usable CUDA devices; 0 with the reason in `why` when there is none (no driver, no device).
int cuda_device_count(char *why, size_t why_len);
// "NVIDIA H100 80GB HBM3, compute 9.0, 79.1 GiB" for device 0.
void cuda_device_describe(char *out, size_t out_len);
// Bytes of memory device 0 has (its totalGlobalMem).
size_t cuda_device_total_memory(void);

// Mask n tokens on the device with uniforms from a cuRAND device Philox generator seeded with
// `philox_seed` at `offset` (the same numbers the host generator gives), as mask_apply does on the host.
// Host pointers in and out; used by tests and by the CUDA trainer's masking step.
void cuda_mask_batch_host(const MaskConfig *c, const int *tokens, size_t n, uint64_t philox_seed,
                          uint64_t offset, int *inputs, int *labels);

#ifdef __cplusplus
}
#endif

#endif
