// optim.cu: global gradient L2 norm (fixed-order, double, one launch) and the fused clip + Adam / AdamW update over
// all parameters, with the step's constants by value or from device memory (a captured step).
#include <math.h>
#include <string.h>

#include "cuda_check.h"
#include "kernels.h"
#include "mlm/bf16.h"
#include "mlm/optim.h"
#include "philox.cuh"

// ---- Global gradient norm -------------------------------------------------------------------------------
// NB blocks (NB a function of n only) each sum the squares of a fixed set of elements in double (block b
// takes every element i with (i / NORM_BLOCK) % NB == b: coalesced, grid-stride), reduce in a fixed tree and
// write one partial. The last block to finish (a ticket counter in the scratch) then adds the NB partials and
// takes the square root, in the tree of the former second pass (one block of NORM_FINISH_BLOCK threads, each
// holding one partial or 0, butterfly sums per warp, then over the warps), so the result is bit-identical to
// the two launches it replaces. Double sums make the result agree with cpu_grad_norm (also double) to the
// final float rounding; the fixed partition makes it bit-identical from run to run and across GPUs.

enum { NORM_BLOCK = 256, NORM_PER_BLOCK = 8192, NORM_MAX_BLOCKS = 1024, NORM_FINISH_BLOCK = 1024 };

static unsigned norm_blocks(size_t n) {
    size_t b = (n + NORM_PER_BLOCK - 1) / NORM_PER_BLOCK;
    if (b < 1) b = 1;
    if (b > NORM_MAX_BLOCKS) b = NORM_MAX_BLOCKS;
    return (unsigned)b;
}

// NB partials, then one slot holding the ticket counter (an unsigned int, zero between launches).
extern "C" size_t cuda_grad_norm_scratch(size_t n) { return norm_blocks(n) + 1; }

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

// What warp_sum returns in warp w of a NORM_FINISH_BLOCK-thread block whose thread i holds partial[i] (0
// past nb), computed by one thread: the butterfly leaves lane 0 with ((x0 + x16) + (x8 + x24)) + ..., i.e.
// x[k] += x[k + o] for o = 16, 8, 4, 2, 1 (addition is commutative, so every lane has these bits).
static __device__ double finish_warp_sum(const volatile double *partial, int nb, int w) {
    double x[32];
    for (int k = 0; k < 32; k++) x[k] = w * 32 + k < nb ? partial[w * 32 + k] : 0.0;
    for (int o = 16; o > 0; o >>= 1)
        for (int k = 0; k < o; k++) x[k] += x[k + o];
    return x[0];
}

static __global__ void grad_norm_kernel(float *norm /* [1] */, double *partial /* [NB + 1] */,
                                        const float *grads /* [n] */, size_t n) {
    __shared__ double shared[32];
    __shared__ bool last;
    double s = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double g = (double)grads[i];
        s += g * g;
    }
    s = block_sum(s, shared);
    unsigned int *ticket = (unsigned int *)(partial + gridDim.x);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s;
        __threadfence();  // the partial is visible device-wide before the ticket counts this block
        unsigned int done = atomicAdd(ticket, 1u);
        last = done == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    // The last block: warp 0 adds the partials in the former finishing block's tree (NORM_FINISH_BLOCK / 32
    // == 32 warps: lane w computes warp w's sum, then one butterfly over the warps), with 0.0 + p == p.
    __threadfence();
    if (threadIdx.x < 32) {
        double w = finish_warp_sum(partial, (int)gridDim.x, (int)threadIdx.x);
        w = warp_sum(w);
        if (threadIdx.x == 0) {
            norm[0] = (float)sqrt(w);
            *ticket = 0;  // ready for the next launch (and the next replay of a captured step)
        }
    }
}

extern "C" void cuda_grad_norm(float *d_norm, const float *grads, size_t n, double *scratch, cudaStream_t stream) {
    static_assert(NORM_FINISH_BLOCK == 32 * 32 && NORM_MAX_BLOCKS <= NORM_FINISH_BLOCK,
                  "the finish reproduces a block of 32 full warps, one partial per thread");
    unsigned nb = norm_blocks(n);  // at least one block, so n == 0 gives a norm of 0
    grad_norm_kernel<<<nb, NORM_BLOCK, 0, stream>>>(d_norm, scratch, grads, n);
    CUDA_CHECK_LAUNCH();
}

// ---- Clip + Adam ----------------------------------------------------------------------------------------
// The clip coefficient is computed by every thread from d_norm (no host round trip), exactly as
// cpu_clip_grads: coef = (float)(max_norm / (norm + 1e-6)) in double, applied only when < 1. The update is
// the CPU's expression for expression (src/host/optim.c), each product and sum rounded on its own
// (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn: no fused multiply-add, IEEE division and square root), and
// the step constants are the host's double computations rounded to float, so given the same gradients and
// norm the parameters and moments are bit-identical to cpu_clip_grads + cpu_adam_update.

// The constants every step shares; the ones of (t, lr) come as an AdamStep (kernels.h), by value or from
// device memory.
typedef struct {
    float b1, omb1;  // beta1 and 1 - beta1 (float, as the CPU evaluates 1.0f - b1)
    float b2, omb2;  // beta2 and 1 - beta2
    float eps;
    int adamw;  // 0: labml's Adam (eps before bias correction), 1: AdamW
} AdamConsts;

enum { ADAM_BLOCK = 256, ADAM_MAX_GRID = 4096 };

// d_step (device, may be NULL: use `step`) holds the constants of this step's t and lr. copy (train.precision =
// bf16; NULL otherwise) receives the BF16 copy of the updated parameters by THE ROUNDING RULE (include/mlm/bf16.h)
// with the Philox key step.round_seed, element i at offset step.round_offset + copy_first + i (copy_first: the index of
// params[0] among all the parameters, when the update covers a range of them).
static __global__ void adam_kernel(float *params /* [n] */, const float *grads /* [n] */, float *m /* [n] */,
                                   float *v /* [n] */, const uint8_t *decay_mask /* [n] or NULL */,
                                   const float *d_norm /* [1] */, float max_norm, size_t n, AdamConsts k,
                                   AdamStep step, const AdamStep *d_step, uint16_t *copy /* [n] or NULL */,
                                   uint64_t copy_first) {
    // The step's constants and the clip coefficient are the same for every thread: read once per block.
    __shared__ AdamStep s_step;
    __shared__ float s_coef;
    if (threadIdx.x == 0) {
        s_step = d_step ? *d_step : step;
        s_coef = max_norm > 0.0f ? (float)((double)max_norm / ((double)d_norm[0] + 1e-6)) : 1.0f;
    }
    __syncthreads();
    step = s_step;
    float coef = s_coef;
    bool clip = coef < 1.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = grads[i];
        if (clip) gi = __fmul_rn(gi, coef);
        float p = params[i];
        if (k.adamw && decay_mask != NULL && decay_mask[i]) p = __fmul_rn(p, step.decay);
        // m = b1 m + (1 - b1) g; v = b2 v + ((1 - b2) g) g.
        float mi = __fadd_rn(__fmul_rn(k.b1, m[i]), __fmul_rn(k.omb1, gi));
        float vi = __fadd_rn(__fmul_rn(k.b2, v[i]), __fmul_rn(__fmul_rn(k.omb2, gi), gi));
        m[i] = mi;
        v[i] = vi;
        // Noam: p -= step m / (sqrt(v) + eps); AdamW: p -= step m / (sqrt(v) / sqrt(1 - b2^t) + eps).
        float denom = k.adamw ? __fadd_rn(__fmul_rn(__fsqrt_rn(vi), step.inv_sqrt_bc2), k.eps)
                              : __fadd_rn(__fsqrt_rn(vi), k.eps);
        float updated = __fsub_rn(p, __fdiv_rn(__fmul_rn(step.step, mi), denom));
        params[i] = updated;
        if (copy) {
            uint64_t g = step.round_offset + copy_first + i;
            uint32_t x[4];
            philox_block(step.round_seed, g / 4, x);
            copy[i] = bf16_stochastic_bits(updated, x[g % 4]);
        }
    }
}

static void check_adam_kind(int kind) {
    if (kind != OPTIM_NOAM_ADAM && kind != OPTIM_ADAMW) mlm_fatal(MLM_EXIT_FAILURE, "unknown optimizer kind %d", kind);
}

extern "C" AdamStep cuda_adam_step(int kind, float beta1, float beta2, float weight_decay, long t, double lr) {
    if (t < 1) mlm_fatal(MLM_EXIT_FAILURE, "Adam step %ld: steps count from 1", t);
    check_adam_kind(kind);
    // Bias corrections in double on the host, rounded to float as optim.c rounds them.
    double bc1 = 1.0 - pow((double)beta1, (double)t), bc2 = 1.0 - pow((double)beta2, (double)t);
    AdamStep s;
    memset(&s, 0, sizeof(s));  // no BF16 copy unless the caller sets round_seed / round_offset
    if (kind == OPTIM_ADAMW) {
        s.step = (float)(lr / bc1);
        s.inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2));
        s.decay = (float)(1.0 - lr * (double)weight_decay);
    } else {
        s.step = (float)(lr * sqrt(bc2) / bc1);
        s.inv_sqrt_bc2 = 1.0f;
        s.decay = 1.0f;
    }
    return s;
}

static void adam_launch(float *params, const float *grads, float *m, float *v, const uint8_t *decay_mask,
                        const float *d_norm, float max_norm, size_t n, int kind, float beta1, float beta2, float eps,
                        AdamStep step, const AdamStep *d_step, uint16_t *copy, uint64_t copy_first,
                        cudaStream_t stream) {
    check_adam_kind(kind);
    if (n == 0) return;
    AdamConsts k;
    k.b1 = beta1;
    k.omb1 = 1.0f - beta1;
    k.b2 = beta2;
    k.omb2 = 1.0f - beta2;
    k.eps = eps;
    k.adamw = kind == OPTIM_ADAMW;
    size_t blocks = (n + ADAM_BLOCK - 1) / ADAM_BLOCK;
    unsigned grid = (unsigned)(blocks < (size_t)ADAM_MAX_GRID ? blocks : (size_t)ADAM_MAX_GRID);
    adam_kernel<<<grid, ADAM_BLOCK, 0, stream>>>(params, grads, m, v, decay_mask, d_norm, max_norm, n, k, step, d_step,
                                                 copy, copy_first);
    CUDA_CHECK_LAUNCH();
}

extern "C" void cuda_adam_update(float *params, const float *grads, float *m, float *v, const uint8_t *decay_mask,
                                 const float *d_norm, float max_norm, size_t n, int kind, float beta1, float beta2,
                                 float eps, float weight_decay, long t, double lr, cudaStream_t stream) {
    AdamStep step = cuda_adam_step(kind, beta1, beta2, weight_decay, t, lr);
    adam_launch(params, grads, m, v, decay_mask, d_norm, max_norm, n, kind, beta1, beta2, eps, step, NULL, NULL, 0, stream);
}

extern "C" void cuda_adam_update_dev(float *params, const float *grads, float *m, float *v, const uint8_t *decay_mask,
                                     const float *d_norm, float max_norm, size_t n, int kind, float beta1, float beta2,
                                     float eps, const AdamStep *d_step, uint16_t *copy, uint64_t copy_first,
                                     cudaStream_t stream) {
    AdamStep unused;
    memset(&unused, 0, sizeof(unused));
    adam_launch(params, grads, m, v, decay_mask, d_norm, max_norm, n, kind, beta1, beta2, eps, unused, d_step, copy,
                copy_first, stream);
}
