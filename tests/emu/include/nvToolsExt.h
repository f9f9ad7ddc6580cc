// nvToolsExt.h (tests/emu, old include path): NVTX ranges as no-ops that check the push/pop balance (a pop without a push, or
// ranges left open at exit, is reported; with MLM_EMU_COUNT the ranges also label the counters).
#ifndef MLM_EMU_NVTX_H
#define MLM_EMU_NVTX_H

#ifdef __cplusplus
extern "C" {
#endif

#define nvtxRangePushA emu_nvtxRangePushA
#define nvtxRangePop emu_nvtxRangePop
#define nvtxMarkA emu_nvtxMarkA

int nvtxRangePushA(const char *message);
int nvtxRangePop(void);
void nvtxMarkA(const char *message);

#ifdef __cplusplus
}
#endif

#endif
