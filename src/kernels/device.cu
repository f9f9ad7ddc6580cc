// device.cu: CUDA device discovery and description for the host code.
#include <stdio.h>

#include "cuda_check.h"
#include "mlm/cuda_backend.h"

extern "C" int cuda_device_count(char *why, size_t why_len) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        // Without an NVIDIA driver the runtime says "driver version is insufficient": name the real cause.
        if (why)
            snprintf(why, why_len, "no usable CUDA device (no NVIDIA GPU or driver here; cudaGetDeviceCount: %s)",
                     cudaGetErrorString(e));
        (void)cudaGetLastError();  // clear the sticky error so later CPU-only work is unaffected
        return 0;
    }
    if (n == 0 && why) snprintf(why, why_len, "no CUDA device found");
    return n;
}

extern "C" void cuda_device_describe(char *out, size_t out_len) {
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    snprintf(out, out_len, "%s, compute %d.%d, %.1f GiB", prop.name, prop.major, prop.minor,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
}

extern "C" size_t cuda_device_total_memory(void) {
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    return prop.totalGlobalMem;
}
