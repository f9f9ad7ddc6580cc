// cuda.h (tests/emu): the runtime declarations (the emulator has no driver API).
#include "cuda_runtime.h"
