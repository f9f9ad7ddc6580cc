// nvToolsExt.h (tests/emu, the old include path): the same NVTX no-ops as nvtx3/nvToolsExt.h.
#include "nvtx3/nvToolsExt.h"
