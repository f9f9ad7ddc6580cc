// no_cuda.c: link-time stand-ins for the CUDA backend's functions in the fuzz build, which compiles the host
// and CPU sources with clang and no nvcc. train.c refers to them (train_model_config, which the checkpoint
// harness uses, lives there); no harness reaches them, and a call aborts with the function's name.
//
// Declared without parameters on purpose: only the symbols matter, never a call. When the project gains a
// CPU-only build (MLM_CUDA=OFF) with its own stand-ins, use those instead of this file.
#include <stdio.h>
#include <stdlib.h>

#define NO_CUDA(name) \
    void name(void);  \
    void name(void) { fprintf(stderr, "fuzz build: %s called, but there is no CUDA backend\n", #name); abort(); }

NO_CUDA(cuda_device_count)
NO_CUDA(cuda_device_describe)
NO_CUDA(cuda_model_create)
NO_CUDA(cuda_model_forward)
NO_CUDA(cuda_model_free)
NO_CUDA(cuda_model_get_adam)
NO_CUDA(cuda_model_get_batch)
NO_CUDA(cuda_model_get_logits)
NO_CUDA(cuda_model_get_params)
NO_CUDA(cuda_model_num_params)
NO_CUDA(cuda_model_set_adam)
NO_CUDA(cuda_model_set_decay_mask)
NO_CUDA(cuda_model_set_params)
NO_CUDA(cuda_model_train_step)
NO_CUDA(cuda_profiler_start)
NO_CUDA(cuda_profiler_stop)
NO_CUDA(cuda_mask_batch_host)
