// emu_api.h (tests/emu): what the CPU execution layer offers beyond the CUDA API: its counters (MLM_EMU_COUNT,
// bench/bench_emu_step.c), the scheduling order of the threads of a block (MLM_EMU_ORDER), and launch recording
// with lazily backed device memory (tests/test_launch_resources.c).
#ifndef MLM_EMU_API_H
#define MLM_EMU_API_H

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    uint64_t launches, blocks, threads;           // kernel launches executed (graph replays included)
    uint64_t cublas_calls, cublas_flops;          // sgemm / strided-batched sgemm calls; 2 m n k per product
    uint64_t cublas_bytes_read, cublas_bytes_written;  // operands' sizes (A, B, and C when beta != 0; C)
    uint64_t curand_calls, curand_values;         // device generator calls and values generated
    uint64_t h2d_copies, h2d_bytes, d2h_copies, d2h_bytes, d2d_copies, d2d_bytes;
    uint64_t memsets, memset_bytes;
    uint64_t host_syncs;                          // host waits: stream/event/device sync, sync memcpy/memset, free
    uint64_t kernel_bytes_read, kernel_bytes_written;  // global memory touched by kernel loads/stores (counting build)
    uint64_t graph_launches;                      // cudaGraphLaunch calls; the copies, memsets and cuBLAS calls a
                                                  // graph holds count at each launch, not at its capture
    uint64_t cold_captures;                       // kernel launches and cuBLAS calls captured into a graph before
                                                  // that kernel (or a cuBLAS call of that shape) ever ran outside a
                                                  // capture: a first use inside capture (issue 21, item 5)
    int bytes_counted;                            // 1 when the kernels were built with the access hooks
    uint64_t device_bytes_live, device_bytes_peak;  // cudaMalloc'd bytes now, and the most ever live at once in
                                                  // this process (not reset by emu_counters_reset: a model
                                                  // allocates before the step being counted)
} EmuCounters;

void emu_counters_reset(void);
void emu_counters_get(EmuCounters *out);
// Prints the counters and the per-kernel table (launches, bytes read/written) to f.
void emu_counters_print(FILE *f);
// The same as one JSON object (schema "mlm-emu-count/1"): "totals" (every counter above), "kernels" (name,
// launches, bytes_read, bytes_written) and "gemms" (cuBLAS by NVTX phase and shape: calls, flops, operand
// bytes), for bench/suite.py's roofline (bench_emu_step --json FILE).
void emu_counters_json(FILE *f);

// Thread order inside a block: 0 forward, 1 reverse, 2 seeded random (MLM_EMU_ORDER=forward|reverse|random,
// MLM_EMU_SEED). Returns the previous order.
int emu_set_order(int order, uint64_t seed);

// Launch recording (tests/test_launch_resources.c): from emu_record_launches(1, ...) on, every kernel launch is
// recorded as made (kernel, launch site, grid, block, dynamic shared memory), captured ones at their capture.
// With skip_bodies the launches of more than one block are accepted without the layer's own limits and do not
// run, and cuBLAS and cuRAND validate and count their calls but compute nothing: a training step at a shape far
// too large to emulate costs only its host work. One-block launches still run (they are cheap, and they are the
// counts the host reads back and checks: targets, selected rows, the loss sums).
typedef struct {
    const char *kernel, *file;  // the kernel's name and the launch's source file (string literals)
    int line;
    unsigned grid[3], block[3];
    size_t shmem;               // dynamic shared memory, bytes
} EmuLaunchRecord;
void emu_record_launches(int on, int skip_bodies);
// The records so far (valid until the next launch); returns how many.
size_t emu_launch_records(const EmuLaunchRecord **out);

// From emu_lazy_device_memory(1) on, cudaMalloc reserves address space that is backed when first touched and
// reads as zeros (not the NaN pattern; no redzone), and cudaMemset to 0 frees pages instead of writing them:
// a model at a preset's full shape fits in a test process as long as its kernels are not run. Set
// MLM_EMU_MEM_MIB to the device size the model may assume.
void emu_lazy_device_memory(int on);

#ifdef __cplusplus
}
#endif

#endif
