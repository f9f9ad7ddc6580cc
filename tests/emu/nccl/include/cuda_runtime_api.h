// cuda_runtime_api.h (tests/emu/nccl): the CPU execution layer's runtime API for sources that include this name
// (src/host/parallel/nccl_dp.c).
#include "cuda_runtime.h"
