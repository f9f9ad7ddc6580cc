// optim.cu: global gradient L2 norm (fixed-order, double) and the fused clip + Adam / AdamW update over all parameters.
#include <math.h>

#include "cuda_check.h"
#include "kernels.h"
#include "mlm/optim.h"

// ---- Global gradient norm -------------------------------------------------------------------------------
// Pass 1: NB blocks (NB a function of n only) each sum the squares of a fixed set of elements in double
// (block b takes every element i with (i / NORM_BLOCK) % NB == b: coalesced, grid-stride), reduce in a fixed
// tree and write one partial. Pass 2: one block adds the NB partials in a fixed tree and takes the square
// root. Double sums make the result agree with cpu_grad_norm (also double) to the final float rounding; the
// fixed partition makes it bit-identical from run to run and across GPUs.

enum { NORM_BLOCK = 256, NORM_PER_BLOCK = 8192, NORM_MAX_BLOCKS = 1024, NORM_FINISH_BLOCK = 1024 };

static unsigned norm_blocks(size_t n) {
    size_t b = (n + NORM_PER_BLOCK - 1) / NORM_PER_BLOCK;
    if (b < 1) b = 1;
    if (b > NORM_MAX_BLOCKS) b = NORM_MAX_BLOCKS;
    return (unsigned)b;
}

extern "C" size_t cuda_grad_norm_scratch(size_t n) { return norm_blocks(n); }

static __device__ __forceinline__ double warp_sum(double x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Fixed-order block sum (blockDim.x a multiple of 32); every thread gets the same bits.
static __device__ double block_sum(double x, double *shared /* [32] */) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    return warp_sum(lane < warps ? shared[lane] : 0.0);
}

static __global__ void grad_norm_partial_kernel(double *partial /* [NB] */, const float *grads /* [n] */, size_t n) {
    __shared__ double shared[32];
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double g = (double)grads[i];
        s += g * g;
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

static __global__ void grad_norm_finish_kernel(float *norm /* [1] */, const double *partial /* [NB] */, int nb) {
    __shared__ double shared[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) s += partial[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) norm[0] = (float)sqrt(s);
}

extern "C" void cuda_grad_norm(float *d_norm, const float *grads, size_t n, double *scratch, cudaStream_t stream) {
    unsigned nb = norm_blocks(n);  // at least one block, so n == 0 gives a norm of 0
    grad_norm_partial_kernel<<<nb, NORM_BLOCK, 0, stream>>>(scratch, grads, n);
    CUDA_CHECK_LAUNCH();
    grad_norm_finish_kernel<<<1, NORM_FINISH_BLOCK, 0, stream>>>(d_norm, scratch, (int)nb);
    CUDA_CHECK_LAUNCH();
}

// ---- Clip + Adam ----------------------------------------------------------------------------------------
// The clip coefficient is computed by every thread from d_norm (no host round trip), exactly as
// cpu_clip_grads: coef = (float)(max_norm / (norm + 1e-6)) in double, applied only when < 1. The update is
// the CPU's expression for expression (src/host/optim.c), each product and sum rounded on its own
// (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn: no fused multiply-add, IEEE division and square root), and
// the step constants are the host's double computations rounded to float, so given the same gradients and
// norm the parameters and moments are bit-identical to cpu_clip_grads + cpu_adam_update.

typedef struct {
    float b1, omb1;  // beta1 and 1 - beta1 (float, as the CPU evaluates 1.0f - b1)
    float b2, omb2;  // beta2 and 1 - beta2
    float eps;
    float step;  // Noam: lr * sqrt(1 - b2^t) / (1 - b1^t); AdamW: lr / (1 - b1^t)
    float inv_sqrt_bc2;  // AdamW: 1 / sqrt(1 - b2^t)
    float decay;  // AdamW: 1 - lr * weight_decay
    int adamw;  // 0: labml's Adam (eps before bias correction), 1: AdamW
} AdamConsts;

enum { ADAM_BLOCK = 256, ADAM_MAX_GRID = 4096 };

static __global__ void adam_kernel(float *params /* [n] */, const float *grads /* [n] */, float *m /* [n] */,
                                   float *v /* [n] */, const uint8_t *decay_mask /* [n] or NULL */,
                                   const float *d_norm /* [1] */, float max_norm, size_t n, AdamConsts k) {
    float coef = 1.0f;
    if (max_norm > 0.0f) coef = (float)((double)max_norm / ((double)d_norm[0] + 1e-6));
    bool clip = coef < 1.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = grads[i];
        if (clip) gi = __fmul_rn(gi, coef);
        float p = params[i];
        if (k.adamw && decay_mask != NULL && decay_mask[i]) p = __fmul_rn(p, k.decay);
        // m = b1 m + (1 - b1) g; v = b2 v + ((1 - b2) g) g.
        float mi = __fadd_rn(__fmul_rn(k.b1, m[i]), __fmul_rn(k.omb1, gi));
        float vi = __fadd_rn(__fmul_rn(k.b2, v[i]), __fmul_rn(__fmul_rn(k.omb2, gi), gi));
        m[i] = mi;
        v[i] = vi;
        // Noam: p -= step m / (sqrt(v) + eps); AdamW: p -= step m / (sqrt(v) / sqrt(1 - b2^t) + eps).
        float denom =
            k.adamw ? __fadd_rn(__fmul_rn(__fsqrt_rn(vi), k.inv_sqrt_bc2), k.eps) : __fadd_rn(__fsqrt_rn(vi), k.eps);
        params[i] = __fsub_rn(p, __fdiv_rn(__fmul_rn(k.step, mi), denom));
    }
}

extern "C" void cuda_adam_update(float *params, const float *grads, float *m, float *v, const uint8_t *decay_mask,
                                 const float *d_norm, float max_norm, size_t n, int kind, float beta1, float beta2,
                                 float eps, float weight_decay, long t, double lr, cudaStream_t stream) {
    if (t < 1) mlm_fatal(MLM_EXIT_FAILURE, "Adam step %ld: steps count from 1", t);
    if (kind != OPTIM_NOAM_ADAM && kind != OPTIM_ADAMW) mlm_fatal(MLM_EXIT_FAILURE, "unknown optimizer kind %d", kind);
    if (n == 0) return;
    // Bias corrections in double on the host, rounded to float as optim.c rounds them.
    double bc1 = 1.0 - pow((double)beta1, (double)t), bc2 = 1.0 - pow((double)beta2, (double)t);
    AdamConsts k;
    k.b1 = beta1;
    k.omb1 = 1.0f - beta1;
    k.b2 = beta2;
    k.omb2 = 1.0f - beta2;
    k.eps = eps;
    k.adamw = kind == OPTIM_ADAMW;
    if (k.adamw) {
        k.step = (float)(lr / bc1);
        k.inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
        k.decay = (float)(1.0 - lr * (double)weight_decay);
    } else {
        k.step = (float)(lr * sqrt(bc2) / bc1);
        k.inv_sqrt_bc2 = 1.0f;
        k.decay = 1.0f;
    }
    size_t blocks = (n + ADAM_BLOCK - 1) / ADAM_BLOCK;
    unsigned grid = (unsigned)(blocks < (size_t)ADAM_MAX_GRID ? blocks : (size_t)ADAM_MAX_GRID);
    adam_kernel<<<grid, ADAM_BLOCK, 0, stream>>>(params, grads, m, v, decay_mask, d_norm, max_norm, n, k);
    CUDA_CHECK_LAUNCH();
}
