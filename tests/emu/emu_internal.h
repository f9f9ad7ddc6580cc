// emu_internal.h (tests/emu): what emu_runtime.cc shares with the other parts of the CPU execution layer
// (emu_cublaslt.cc): the device-memory registry, the reports, stream work and the cuBLAS counters. Not for kernels
// or tests (they see the CUDA API and emu_api.h only).
#ifndef MLM_EMU_INTERNAL_H
#define MLM_EMU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <string>

#include "cuda_runtime.h"

namespace emu_internal {

// 1 when [p, p + bytes) lies inside one live device allocation (cudaMalloc).
bool is_device_range(const void *p, size_t bytes);
// A sentence saying where p points (which allocation, freed, or no device memory), for reports.
std::string describe(const void *p);
// "emu: error: ..." on stderr (with the kernel being run, if any), then abort: a misuse the hardware would turn
// into undefined behaviour.
[[noreturn]] void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
// "emu: ..." on stderr: an API misuse the library answers with an error code (the caller returns that code).
void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
// 0 unless MLM_EMU_QUIET: notes about what is emulated differently.
bool quiet(void);
// Queue run() on stream s in order with its other work (or add it to the graph s captures); false (after a
// report naming api) when s is not a live stream.
bool enqueue_on(cudaStream_t s, const char *api, std::function<void()> run);
// A cuBLAS-family product made now: the call-time counters (calls, FLOPs, operand bytes) and the key of its
// family for the per-phase breakdown (the innermost NVTX range); gemm_executed counts the family when the
// product runs (graph replays included). api: the family's name in the breakdown ("lt_bf16", ...).
std::string gemm_called(const char *api, char ta, char tb, int m, int n, int k, int batch, uint64_t flops,
                        uint64_t bytes_read, uint64_t bytes_written);
void gemm_executed(const std::string &key, uint64_t flops, uint64_t bytes_read, uint64_t bytes_written);

}  // namespace emu_internal

#endif
