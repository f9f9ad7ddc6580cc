// loss.cu: target counting, fused softmax cross-entropy (loss, accuracy, gradient) with an ignore index, and the
// fixed-order reduction of the per-row losses to the batch's mean loss. The logits, their gradient and the sparse
// head's gathered rows are of the storage type X (act.cuh); the loss, its sums and the statistics are FP32 (the
// log-sum-exp in double) in either.
#include <limits.h>
#include <math.h>

#include "act.cuh"
#include "cuda_check.h"
#include "kernels.h"

// ---- Block reductions (fixed order, identical result in every thread) --------------------------------------
// Butterfly shuffles leave the same bits in every lane (a + b == b + a); the per-warp sums then go through
// shared memory and every warp adds them again with the same butterfly, so all threads hold one value and
// two runs give the same bits. blockDim.x must be a multiple of 32 (at most 1024).

template <typename V>
static __device__ __forceinline__ V warp_sum(V x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <typename V>
static __device__ V block_sum(V x, V *shared /* [32] */) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    x = warp_sum(x);
    __syncthreads();  // `shared` may still be read by an earlier call
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    return warp_sum(lane < warps ? shared[lane] : (V)0);
}

// (value, index) of the largest value, the lowest index on ties (torch.argmax and the CPU's argmax_row).
static __device__ __forceinline__ void argmax_merge(float &val, int &idx, float oval, int oidx) {
    if (oval > val || (oval == val && oidx < idx)) {
        val = oval;
        idx = oidx;
    }
}

// Block-wide argmax; the final pair is broadcast from shared memory so every thread uses the same one.
static __device__ void block_argmax(float &val, int &idx, float *sval /* [32] */, int *sidx /* [32] */) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, val, o);
        int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        argmax_merge(val, idx, ov, oi);
    }
    __syncthreads();
    if (lane == 0) {
        sval[warp] = val;
        sidx[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        val = lane < warps ? sval[lane] : -INFINITY;
        idx = lane < warps ? sidx[lane] : INT_MAX;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, val, o);
            int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            argmax_merge(val, idx, ov, oi);
        }
        if (lane == 0) {
            sval[0] = val;
            sidx[0] = idx;
        }
    }
    __syncthreads();
    val = sval[0];
    idx = sidx[0];
}

// ---- Target count -----------------------------------------------------------------------------------------

enum { REDUCE_BLOCK = 1024 };

// *n_targets = number of labels != ignore_index (one block; integer sums are exact in any order).
static __global__ void count_targets_kernel(int *n_targets, const int *labels /* [N] */, int N, int ignore_index) {
    __shared__ int shared[32];
    int count = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) count += labels[i] != ignore_index;
    count = block_sum(count, shared);
    if (threadIdx.x == 0) *n_targets = count;
}

extern "C" void cuda_count_targets(int *d_n_targets, const int *labels, int N, int ignore_index, cudaStream_t stream) {
    count_targets_kernel<<<1, REDUCE_BLOCK, 0, stream>>>(d_n_targets, labels, N, ignore_index);
    CUDA_CHECK_LAUNCH();
}

// ---- Fused cross-entropy forward + backward: one block per row ---------------------------------------------
// Pass 1: max and argmax (exact, so order-independent). Pass 2: the sums of exponentials, in double for the
// loss (log-sum-exp minus the label's logit is a difference of close numbers; the CPU uses double too) and
// in float for the gradient (as crossentropy_backward). Pass 3: dlogits = e * (dloss / sum), minus dloss at
// the label, rounded as the CPU rounds it. dlogits may alias logits: every logit this row needs is read
// before the barrier inside pass 2's block sums, and in pass 3 each thread rewrites only the elements it
// reads itself. A label outside [0, V) on a target row (the CPU stops with an error) gives a NaN loss and a
// zero gradient row, so the mean loss shows the fault instead of a wild read.

template <typename X>
static __global__ void crossentropy_kernel(float *losses /* [N] */, int *correct /* [N] */, X *dlogits /* [N, V] */,
                                           const X *logits /* [N, V] */, const int *labels /* [N] */,
                                           const int *d_n_targets, int V, int ignore_index) {
    __shared__ float sval[32];
    __shared__ int sidx[32];
    __shared__ float ssum[32];
    __shared__ double dsum[32];
    size_t row = blockIdx.x;
    const X *x = logits + row * (size_t)V;  // [V]
    X *g = dlogits + row * (size_t)V;  // [V]
    int tid = threadIdx.x, nt = blockDim.x;
    int label = labels[row];
    if (label == ignore_index || label < 0 || label >= V) {  // block-uniform branch: the whole block returns
        for (int v = tid; v < V; v += nt) st(g, v, 0.0f);
        if (tid == 0) {
            losses[row] = label == ignore_index ? 0.0f : __int_as_float(0x7fc00000);  // quiet NaN
            correct[row] = 0;
        }
        return;
    }
    // Pass 1. Each thread starts from its first element, so an all -inf row still gives index 0 like the CPU.
    float best = -INFINITY;
    int best_i = INT_MAX;
    for (int v = tid; v < V; v += nt) {
        float xv = ld(x, v);
        if (best_i == INT_MAX || xv > best) {  // strictly greater: the first (lowest) index wins ties
            best = xv;
            best_i = v;
        }
    }
    float x_label = ld(x, label);
    block_argmax(best, best_i, sval, sidx);
    float maxv = best;
    // Pass 2.
    float fsum = 0.0f;
    double lsum = 0.0;
    for (int v = tid; v < V; v += nt) {
        float xv = ld(x, v);
        fsum += expf(__fsub_rn(xv, maxv));
        lsum += exp((double)xv - (double)maxv);
    }
    fsum = block_sum(fsum, ssum);
    lsum = block_sum(lsum, dsum);
    // Pass 3. dloss = 1 / n_targets as cpu_model_backward computes it; no targets: zero gradients.
    int n_targets = *d_n_targets;
    float dloss = n_targets > 0 ? __fdiv_rn(1.0f, (float)n_targets) : 0.0f;
    float inv = __fdiv_rn(dloss, fsum);
    for (int v = tid; v < V; v += nt) {
        float gv = __fmul_rn(expf(__fsub_rn(ld(x, v), maxv)), inv);
        if (v == label) gv = __fsub_rn(gv, dloss);
        st(g, v, gv);
    }
    if (tid == 0) {
        losses[row] = (float)(log(lsum) + (double)maxv - (double)x_label);
        correct[row] = best_i == label;
    }
}

template <typename X>
static void crossentropy_forward_backward(float *losses, int *correct, X *dlogits, const X *logits, const int *labels,
                                          const int *d_n_targets, int N, int V, int ignore_index, cudaStream_t stream) {
    if (N <= 0) return;
    if (V <= 0) mlm_fatal(MLM_EXIT_FAILURE, "cuda_crossentropy_forward_backward: empty vocabulary");
    // Whole warps, one thread per logit up to 512 (V = 67 takes 96 threads); larger V loops.
    int threads = ((V + 31) / 32) * 32;
    if (threads > 512) threads = 512;
    crossentropy_kernel<X><<<(unsigned)N, threads, 0, stream>>>(losses, correct, dlogits, logits, labels, d_n_targets,
                                                                V, ignore_index);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_crossentropy_forward_backward(float *losses, int *correct, float *dlogits, const float *logits,
                                                   const int *labels, const int *d_n_targets, int N, int V,
                                                   int ignore_index, cudaStream_t stream) {
    crossentropy_forward_backward(losses, correct, dlogits, logits, labels, d_n_targets, N, V, ignore_index, stream);
}
void cuda_crossentropy_forward_backward(float *losses, int *correct, bf16 *dlogits, const bf16 *logits,
                                        const int *labels, const int *d_n_targets, int N, int V, int ignore_index,
                                        cudaStream_t stream) {
    crossentropy_forward_backward(losses, correct, dlogits, logits, labels, d_n_targets, N, V, ignore_index, stream);
}

// ---- Batch loss: one block, fixed order -------------------------------------------------------------------
// out = {mean loss over targets, correct, n_targets}. Ignored rows hold loss 0 and correct 0, so summing all
// rows equals summing the targets (x + 0.0 == x). The sum is in double like crossentropy_forward's, so the
// mean agrees with the CPU to the float rounding of the result.
static __global__ void loss_reduce_kernel(float *out /* [3] */, const float *losses /* [N] */,
                                          const int *correct /* [N] */, const int *d_n_targets, int N) {
    __shared__ double dshared[32];
    __shared__ int ishared[32];
    double total = 0.0;
    int hits = 0;
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        total += (double)losses[i];
        hits += correct[i];
    }
    total = block_sum(total, dshared);
    hits = block_sum(hits, ishared);
    if (threadIdx.x == 0) {
        int n_targets = *d_n_targets;
        out[0] = n_targets > 0 ? (float)(total / (double)n_targets) : 0.0f;
        out[1] = (float)hits;
        out[2] = (float)n_targets;
    }
}

extern "C" void cuda_loss_reduce(float *d_out, const float *losses, const int *correct, const int *d_n_targets, int N,
                                 cudaStream_t stream) {
    loss_reduce_kernel<<<1, REDUCE_BLOCK, 0, stream>>>(d_out, losses, correct, d_n_targets, N);
    CUDA_CHECK_LAUNCH();
}

// ---- Sparse prediction: the selected rows (label != ignore_index) gathered, and their gradient scattered ----
// The host launches the sparse head with a row capacity `cap` (cuda_model.cu computes it on the host, exactly,
// from the batch); the number of selected rows itself is counted here, on the device, and read by every
// kernel from d_n_sel, so nothing waits for the device. Rows at or past the device count (none when host and
// device agree) are gathered as zero rows with an ignored label, which the head turns into zero loss and
// zero gradient.

// sel_rows[0..n) = the positions with label != ignore_index in increasing order; *d_n_sel = n. One block,
// tiles of blockDim.x positions: a ballot per warp, the warp totals through shared memory, so each selected
// position knows how many selected positions precede it (a stable compaction, no atomics).
static __global__ void select_rows_kernel(int *sel_rows /* [N] */, int *d_n_sel, const int *labels /* [N] */, int N,
                                          int ignore_index) {
    __shared__ int warp_count[32];
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    int base = 0;  // selected positions in earlier tiles (the same in every thread)
    for (int start = 0; start < N; start += blockDim.x) {
        int i = start + threadIdx.x;
        int sel = i < N && labels[i] != ignore_index;
        unsigned bits = __ballot_sync(0xffffffffu, sel);
        __syncthreads();  // warp_count may still be read for the previous tile
        if (lane == 0) warp_count[warp] = __popc(bits);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < warps; w++) {
            if (w < warp) before += warp_count[w];
            total += warp_count[w];
        }
        if (sel) sel_rows[base + before + __popc(bits & ((1u << lane) - 1u))] = i;
        base += total;
    }
    if (threadIdx.x == 0) *d_n_sel = base;
}

extern "C" void cuda_select_rows(int *sel_rows, int *d_n_sel, const int *labels, int N, int ignore_index,
                                 cudaStream_t stream) {
    select_rows_kernel<<<1, REDUCE_BLOCK, 0, stream>>>(sel_rows, d_n_sel, labels, N, ignore_index);
    CUDA_CHECK_LAUNCH();
}

// One block per output row i < cap: out[i] = x[sel_rows[i]] and out_labels[i] = labels[sel_rows[i]] for
// i < *d_n_sel; a zero row and ignore_index past it.
template <typename X>
static __global__ void gather_rows_kernel(X *out /* [cap, C] */, int *out_labels /* [cap] */, const X *x /* [N, C] */,
                                          const int *labels /* [N] */, const int *sel_rows /* [cap] */,
                                          const int *d_n_sel, int C, int ignore_index) {
    size_t i = blockIdx.x;
    int live = (int)i < *d_n_sel;
    int r = live ? sel_rows[i] : 0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) st(out, i * C + c, live ? ld(x, (size_t)r * C + c) : 0.0f);
    if (threadIdx.x == 0) out_labels[i] = live ? labels[r] : ignore_index;
}

template <typename X>
static void gather_rows(X *out, int *out_labels, const X *x, const int *labels, const int *sel_rows, const int *d_n_sel,
                        int cap, int C, int ignore_index, cudaStream_t stream) {
    if (cap <= 0) return;
    int threads = C < 256 ? ((C + 31) / 32) * 32 : 256;
    gather_rows_kernel<X><<<(unsigned)cap, threads, 0, stream>>>(out, out_labels, x, labels, sel_rows, d_n_sel, C,
                                                                ignore_index);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_gather_rows(float *out, int *out_labels, const float *x, const int *labels, const int *sel_rows,
                                 const int *d_n_sel, int cap, int C, int ignore_index, cudaStream_t stream) {
    gather_rows(out, out_labels, x, labels, sel_rows, d_n_sel, cap, C, ignore_index, stream);
}
void cuda_gather_rows(bf16 *out, int *out_labels, const bf16 *x, const int *labels, const int *sel_rows,
                      const int *d_n_sel, int cap, int C, int ignore_index, cudaStream_t stream) {
    gather_rows(out, out_labels, x, labels, sel_rows, d_n_sel, cap, C, ignore_index, stream);
}

// One block per row i < cap: dx[sel_rows[i]] = drows[i] for i < *d_n_sel (dx's other rows are left as they are).
template <typename X>
static __global__ void scatter_rows_kernel(X *dx /* [N, C] */, const X *drows /* [cap, C] */,
                                           const int *sel_rows /* [cap] */, const int *d_n_sel, int C) {
    size_t i = blockIdx.x;
    if ((int)i >= *d_n_sel) return;  // block-uniform
    size_t r = (size_t)sel_rows[i];
    for (int c = threadIdx.x; c < C; c += blockDim.x) dx[r * C + c] = drows[i * C + c];
}

template <typename X>
static void scatter_rows(X *dx, const X *drows, const int *sel_rows, const int *d_n_sel, int cap, int C,
                         cudaStream_t stream) {
    if (cap <= 0) return;
    int threads = C < 256 ? ((C + 31) / 32) * 32 : 256;
    scatter_rows_kernel<X><<<(unsigned)cap, threads, 0, stream>>>(dx, drows, sel_rows, d_n_sel, C);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_scatter_rows(float *dx, const float *drows, const int *sel_rows, const int *d_n_sel, int cap, int C,
                                  cudaStream_t stream) {
    scatter_rows(dx, drows, sel_rows, d_n_sel, cap, C, stream);
}
void cuda_scatter_rows(bf16 *dx, const bf16 *drows, const int *sel_rows, const int *d_n_sel, int cap, int C,
                       cudaStream_t stream) {
    scatter_rows(dx, drows, sel_rows, d_n_sel, cap, C, stream);
}
