// cuda_profiler_api.h (tests/emu): cudaProfilerStart/Stop, declared with the runtime (no-ops in the emulator).
#include "cuda_runtime.h"
