// test_emu_layer.cu (emu): the CPU execution layer itself. cuBLAS sgemm and strided-batched sgemm against
// cblas_sgemm for every transpose combination with odd leading dimensions, and cuBLAS's argument checks; the
// device Philox generator against the real cuRAND host generator; kernels with shared memory, barriers,
// shuffles, ballots and atomics under the three thread orders; launch-configuration errors; NaN-filled
// allocations; deferred stream semantics, events across streams, graph capture and replay; and, each in a
// child process, that the misuses the layer exists to catch are reported (a barrier part of the block never
// reaches, a full-mask shuffle in a partial warp, a lane that exits before a shuffle, barriers in divergent
// code, a host pointer passed to a kernel, an NVTX pop without a push, a cuBLAS operand past its allocation);
// atomics across blocks, and in the parallel-blocks build (MLM_EMU_TSAN) that the blocks ran on several threads
// and that ThreadSanitizer reports a last-block reduction without its fence and a counter without an atomic.
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include <cublas_v2.h>
#include <curand.h>
#include <nvtx3/nvToolsExt.h>

#include "emu_api.h"
extern "C" {
#include "test_util.h"
}
#ifdef MLM_HAVE_CBLAS
#include <cblas.h>
#endif
#ifdef EMU_HAVE_REAL_CURAND
extern "C" int emu_real_curand_uniform(unsigned long long seed, unsigned long long offset, float *out, size_t n);
#endif

#define CK(call)                                                                                      \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) {                                                                      \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorName(e_)); \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)

static uint64_t lcg = 88172645463325252ull;
static float frand(void) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((lcg >> 40) / 16777216.0) * 2.0f - 1.0f;
}

static float *dev_upload(const std::vector<float> &h) {
    float *d;
    CK(cudaMalloc(&d, h.size() * sizeof(float)));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    return d;
}
static std::vector<float> dev_download(const float *d, size_t n) {
    std::vector<float> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

// ---- cuBLAS ---------------------------------------------------------------------------------------------

static void test_sgemm(cublasHandle_t h) {
#ifdef MLM_HAVE_CBLAS
    const cublasOperation_t ops[3] = {CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C};
    const int shapes[][3] = {{1, 1, 1}, {5, 3, 7}, {17, 9, 33}, {4, 13, 1}};
    int combos = 0;
    double worst = 0.0;
    for (auto &sh : shapes)
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 3; b++)
                for (int batch = 1; batch <= 3; batch += 2) {
                    int m = sh[0], n = sh[1], k = sh[2];
                    int ar = ops[a] == CUBLAS_OP_N ? m : k, ac = ops[a] == CUBLAS_OP_N ? k : m;
                    int br = ops[b] == CUBLAS_OP_N ? k : n, bc = ops[b] == CUBLAS_OP_N ? n : k;
                    int lda = ar + 3, ldb = br + 1, ldc = m + 2;  // odd padding on every operand
                    long long sa = (long long)lda * ac + 5, sb = (long long)ldb * bc + 2, sc = (long long)ldc * n + 7;
                    std::vector<float> A(sa * batch), B(sb * batch), C(sc * batch);
                    for (auto &x : A) x = frand();
                    for (auto &x : B) x = frand();
                    for (auto &x : C) x = frand();
                    float alpha = 0.75f, beta = batch == 1 ? 0.0f : -0.5f;
                    float *dA = dev_upload(A), *dB = dev_upload(B), *dC = dev_upload(C);
                    cublasStatus_t st =
                        batch == 1 ? cublasSgemm(h, ops[a], ops[b], m, n, k, &alpha, dA, lda, dB, ldb, &beta, dC, ldc)
                                   : cublasSgemmStridedBatched(h, ops[a], ops[b], m, n, k, &alpha, dA, lda, sa, dB, ldb,
                                                               sb, &beta, dC, ldc, sc, batch);
                    CHECK(st == CUBLAS_STATUS_SUCCESS, "sgemm %d %d: status %d", a, b, (int)st);
                    std::vector<float> got = dev_download(dC, C.size());
                    std::vector<float> want = C;
                    for (int bi = 0; bi < batch; bi++)
                        cblas_sgemm(CblasColMajor, ops[a] == CUBLAS_OP_N ? CblasNoTrans : CblasTrans,
                                    ops[b] == CUBLAS_OP_N ? CblasNoTrans : CblasTrans, m, n, k, alpha, &A[sa * bi], lda,
                                    &B[sb * bi], ldb, beta, &want[sc * bi], ldc);
                    double err = 0.0;
                    for (size_t i = 0; i < want.size(); i++) err = fmax(err, fabs((double)got[i] - want[i]));
                    worst = fmax(worst, err);
                    CHECK(err <= 1e-5 * (k + 1), "sgemm op %d/%d m %d n %d k %d batch %d: max err %.3g vs cblas", a, b,
                          m, n, k, batch, err);
                    combos++;
                    CK(cudaFree(dA));
                    CK(cudaFree(dB));
                    CK(cudaFree(dC));
                }
    printf("  sgemm / strided batched vs cblas_sgemm: %d cases (N/T/C x N/T/C, odd leading dimensions and strides), "
           "max abs err %.3g\n", combos, worst);
#else
    printf("  sgemm vs cblas_sgemm: no CBLAS in this build (MLM_WITH_BLAS off or not found); comparison not run\n");
#endif
}

static void test_sgemm_validation(cublasHandle_t h) {
    float *d;
    CK(cudaMalloc(&d, 4096 * sizeof(float)));
    const float one = 1.0f, zero = 0.0f;
    struct Case {
        const char *what;
        cublasOperation_t ta, tb;
        int m, n, k, lda, ldb, ldc, batch;
        cublasStatus_t want;
    } cases[] = {
        {"valid", CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, 6, 4, 6, 4, 1, CUBLAS_STATUS_SUCCESS},
        {"m < 0", CUBLAS_OP_N, CUBLAS_OP_N, -1, 5, 6, 4, 6, 4, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"n < 0", CUBLAS_OP_N, CUBLAS_OP_N, 4, -5, 6, 4, 6, 4, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"k < 0", CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, -6, 4, 6, 4, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"lda < m (A not transposed)", CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, 6, 3, 6, 4, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"lda < k (A transposed)", CUBLAS_OP_T, CUBLAS_OP_N, 4, 5, 6, 5, 6, 4, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"lda = k (A transposed)", CUBLAS_OP_T, CUBLAS_OP_N, 4, 5, 6, 6, 6, 4, 1, CUBLAS_STATUS_SUCCESS},
        {"ldb < k (B not transposed)", CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, 6, 4, 5, 4, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"ldb < n (B transposed)", CUBLAS_OP_N, CUBLAS_OP_T, 4, 5, 6, 4, 4, 4, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"ldc < m", CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, 6, 4, 6, 3, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"lda = 0 with m = 0", CUBLAS_OP_N, CUBLAS_OP_N, 0, 5, 6, 0, 6, 1, 1, CUBLAS_STATUS_INVALID_VALUE},
        {"batch < 0", CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, 6, 4, 6, 4, -1, CUBLAS_STATUS_INVALID_VALUE},
        {"batch = 0", CUBLAS_OP_N, CUBLAS_OP_N, 4, 5, 6, 4, 6, 4, 0, CUBLAS_STATUS_SUCCESS},
    };
    int ok = 0;
    for (auto &c : cases) {
        cublasStatus_t s = c.batch == 1 ? cublasSgemm(h, c.ta, c.tb, c.m, c.n, c.k, &one, d, c.lda, d + 1024, c.ldb,
                                                      &zero, d + 2048, c.ldc)
                                        : cublasSgemmStridedBatched(h, c.ta, c.tb, c.m, c.n, c.k, &one, d, c.lda, 0,
                                                                    d + 1024, c.ldb, 0, &zero, d + 2048, c.ldc, 0,
                                                                    c.batch);
        CHECK(s == c.want, "sgemm %s: status %s, want %s", c.what, cublasGetStatusName(s), cublasGetStatusName(c.want));
        ok += s == c.want;
    }
    cublasStatus_t s = cublasSgemm(nullptr, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, d, 1, d, 1, &zero, d, 1);
    CHECK(s == CUBLAS_STATUS_NOT_INITIALIZED, "sgemm with a null handle: %s", cublasGetStatusName(s));
    CHECK(cublasSetMathMode(h, CUBLAS_TF32_TENSOR_OP_MATH) == CUBLAS_STATUS_SUCCESS, "TF32 math mode refused");
    CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH) == CUBLAS_STATUS_SUCCESS, "default math mode refused");
    CK(cudaDeviceSynchronize());
    CK(cudaFree(d));
    printf("  cuBLAS argument checks: %d of %zu cases return cuBLAS's status\n", ok, sizeof(cases) / sizeof(cases[0]));
}

// ---- cuRAND -----------------------------------------------------------------------------------------------

static void test_philox(void) {
#ifdef EMU_HAVE_REAL_CURAND
    curandGenerator_t g;
    CHECK(curandCreateGenerator(&g, CURAND_RNG_PSEUDO_PHILOX4_32_10) == CURAND_STATUS_SUCCESS, "create");
    CHECK(curandSetGeneratorOrdering(g, CURAND_ORDERING_PSEUDO_LEGACY) == CURAND_STATUS_SUCCESS, "ordering");
    const unsigned long long seeds[] = {0, 1234, 0x123456789abcdefull};
    const unsigned long long offsets[] = {0, 3, 4ull * 65536 - 5, (1ull << 32) + 1};
    const size_t n = 70001;
    float *d;
    CK(cudaMalloc(&d, n * sizeof(float)));
    std::vector<float> want(n);
    size_t bad_total = 0;
    for (auto seed : seeds)
        for (auto off : offsets) {
            curandSetPseudoRandomGeneratorSeed(g, seed);
            curandSetGeneratorOffset(g, off);
            CHECK(curandGenerateUniform(g, d, n) == CURAND_STATUS_SUCCESS, "generate");
            std::vector<float> got = dev_download(d, n);
            if (emu_real_curand_uniform(seed, off, want.data(), n) != 0) {
                CHECK(0, "the real cuRAND host generator failed");
                continue;
            }
            size_t bad = 0;
            for (size_t i = 0; i < n; i++) bad += memcmp(&got[i], &want[i], 4) != 0;
            CHECK(bad == 0, "seed %llu offset %llu: %zu of %zu uniforms differ from cuRAND's host generator", seed, off,
                  bad, n);
            bad_total += bad;
        }
    // Consecutive calls continue the stream.
    curandSetPseudoRandomGeneratorSeed(g, 99);
    curandSetGeneratorOffset(g, 10);
    curandGenerateUniform(g, d, 100);
    curandGenerateUniform(g, d + 100, 100);
    std::vector<float> got = dev_download(d, 200);
    emu_real_curand_uniform(99, 10, want.data(), 200);
    CHECK(memcmp(got.data(), want.data(), 200 * sizeof(float)) == 0, "two calls do not continue one stream");
    CHECK(curandSetGeneratorOrdering(g, CURAND_ORDERING_PSEUDO_SEEDED) == CURAND_STATUS_OUT_OF_RANGE,
          "SEEDED ordering accepted for Philox");
    CK(cudaFree(d));
    curandDestroyGenerator(g);
    printf("  device Philox4x32-10 (LEGACY) vs the real cuRAND host generator: %zu seeds x offsets x %zu values, %zu "
           "differ\n", sizeof(seeds) / sizeof(seeds[0]) * (sizeof(offsets) / sizeof(offsets[0])), n, bad_total);
#else
    printf("  device Philox vs cuRAND host: no cuRAND in this build; comparison not run\n");
#endif
}

// ---- Kernels ------------------------------------------------------------------------------------------------

// Block sum through static shared memory (a tree with a barrier per level) and a warp-shuffle sum.
static __global__ void block_sum_kernel(float *out /* [gridDim.x, 2] */, const float *x /* [n] */, int n) {
    __shared__ float buf[256];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    buf[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
        __syncthreads();
    }
    float w = v;
    for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(0xffffffffu, w, o);
    __shared__ float warp_sums[8];
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = w;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int k = 0; k < (int)blockDim.x / 32; k++) t += warp_sums[k];
        out[2 * blockIdx.x] = buf[0];
        out[2 * blockIdx.x + 1] = t;
    }
}

// Dynamic shared memory (reversal within the block), shuffles up/down/idx with width 16, ballot, atomics.
static __global__ void misc_kernel(float *rev /* [n] */, int *info /* [blockDim.x, 4] */, int *counter, const float *x,
                                   int n) {
    extern __shared__ float tile[];
    int t = threadIdx.x;
    tile[t] = x[t];
    __syncthreads();
    rev[t] = tile[blockDim.x - 1 - t];
    int up = __shfl_up_sync(0xffffffffu, t, 1, 16);
    int down = __shfl_down_sync(0xffffffffu, t, 2, 16);
    int idx = __shfl_sync(0xffffffffu, t, 5, 16);
    unsigned ballot = __ballot_sync(0xffffffffu, t % 3 == 0);
    info[4 * t] = up;
    info[4 * t + 1] = down;
    info[4 * t + 2] = idx;
    info[4 * t + 3] = (int)ballot;
    atomicAdd(counter, t);
}

static __global__ void fill_kernel(float *y, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = v + (float)i;
}

static void test_kernels(void) {
    const char *names[3] = {"forward", "reverse", "random"};
    int n = 1000;
    std::vector<float> x(n);
    double want = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = (float)((i * 37) % 101) - 50.0f;
        want += x[i];
    }
    float *dx = dev_upload(x), *dout;
    int blocks = (n + 255) / 256;
    CK(cudaMalloc(&dout, 2 * blocks * sizeof(float)));
    for (int order = 0; order < 3; order++) {
        int old = emu_set_order(order, 42);
        block_sum_kernel<<<blocks, 256>>>(dout, dx, n);
        CK(cudaGetLastError());
        std::vector<float> out = dev_download(dout, 2 * blocks);
        double tree = 0.0, shfl = 0.0;
        for (int b = 0; b < blocks; b++) tree += out[2 * b], shfl += out[2 * b + 1];
        CHECK(tree == want && shfl == want, "order %s: block sums %g (tree), %g (shuffles), want %g", names[order], tree,
              shfl, want);
        emu_set_order(old, 7);
    }
    // Dynamic shared memory, shuffles with width 16, ballot, atomics.
    float *drev;
    int *dinfo, *dcount;
    CK(cudaMalloc(&drev, 64 * sizeof(float)));
    CK(cudaMalloc(&dinfo, 64 * 4 * sizeof(int)));
    CK(cudaMalloc(&dcount, sizeof(int)));
    CK(cudaMemset(dcount, 0, sizeof(int)));
    misc_kernel<<<1, 64, 64 * sizeof(float)>>>(drev, dinfo, dcount, dx, n);
    CK(cudaGetLastError());
    std::vector<float> rev = dev_download(drev, 64);
    std::vector<int> info(64 * 4);
    int count = 0;
    CK(cudaMemcpy(info.data(), dinfo, info.size() * sizeof(int), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&count, dcount, sizeof(int), cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int t = 0; t < 64; t++) {
        int seg = t & ~15, lane = t % 32;
        unsigned ballot = 0;
        for (int l = 0; l < 32; l++)
            if (((t & ~31) + l) % 3 == 0) ballot |= 1u << l;
        bad += rev[t] != x[63 - t];
        bad += info[4 * t] != (t - 1 >= seg ? t - 1 : t);
        bad += info[4 * t + 1] != (t + 2 < seg + 16 ? t + 2 : t);
        bad += info[4 * t + 2] != seg + 5;
        bad += info[4 * t + 3] != (int)ballot;
        (void)lane;
    }
    CHECK(bad == 0, "dynamic shared memory / shuffles / ballot: %d wrong values", bad);
    CHECK(count == 63 * 64 / 2, "atomicAdd: %d, want %d", count, 63 * 64 / 2);
    // Launch-configuration errors come back from cudaGetLastError and clear.
    fill_kernel<<<1, 1025>>>(drev, 0.0f, 64);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "1025 threads per block accepted");
    CHECK(cudaGetLastError() == cudaSuccess, "the launch error is sticky");
    fill_kernel<<<0, 32>>>(drev, 0.0f, 64);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "an empty grid accepted");
    fill_kernel<<<dim3(1, 65536), 32>>>(drev, 0.0f, 64);
    CHECK(cudaGetLastError() == cudaErrorInvalidConfiguration, "gridDim.y 65536 accepted");
    CK(cudaFree(dx));
    CK(cudaFree(dout));
    CK(cudaFree(drev));
    CK(cudaFree(dinfo));
    CK(cudaFree(dcount));
    printf("  kernels: shared-memory/shuffle block sums under forward, reverse and random order; dynamic shared "
           "memory, shuffles of width 16, ballot, atomics; launch-configuration errors\n");
}

// ---- Atomics and blocks in parallel --------------------------------------------------------------------------

// Every block adds its partial sum to a float total, takes the maximum of an int, counts itself with atomicInc and
// swaps a flag with atomicCAS; and says which OS thread ran it.
static __global__ void atomics_kernel(float *total, int *maxv, unsigned *count, int *flag, long *ran_on) {
    if (threadIdx.x != 0) return;
    atomicAdd(total, (float)(blockIdx.x + 1));
    atomicMax(maxv, (int)(blockIdx.x * 7 % 13));
    atomicInc(count, 1000u);
    atomicCAS(flag, 0, (int)blockIdx.x + 1);
    ran_on[blockIdx.x] = (long)pthread_self();
}

// The Programming Guide's last-block reduction: each block publishes a partial, fences, takes a ticket; the last
// one adds every partial and resets the ticket. fence 0 leaves out the __threadfence (the race ThreadSanitizer
// must report in the parallel-blocks build).
static __global__ void last_block_sum_kernel(float *out, float *partial /* [gridDim.x] */, unsigned *ticket,
                                             int fence) {
    __shared__ bool last;
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = (float)(blockIdx.x + 1);
        if (fence) __threadfence();
        last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {
        float s = 0.0f;
        for (unsigned b = 0; b < gridDim.x; b++) s += partial[b];
        *out = s;
        *ticket = 0;
    }
}

// A counter every block increments without an atomic.
static __global__ void plain_counter_kernel(int *counter) {
    if (threadIdx.x == 0) *counter += 1;
}

static void test_atomics(void) {
    const int blocks = 24;
    float *total, *sum, *partial;
    int *maxv, *flag;
    unsigned *count, *ticket;
    long *ran_on;
    CK(cudaMalloc(&total, sizeof(float)));
    CK(cudaMalloc(&sum, sizeof(float)));
    CK(cudaMalloc(&partial, blocks * sizeof(float)));
    CK(cudaMalloc(&maxv, sizeof(int)));
    CK(cudaMalloc(&flag, sizeof(int)));
    CK(cudaMalloc(&count, sizeof(unsigned)));
    CK(cudaMalloc(&ticket, sizeof(unsigned)));
    CK(cudaMalloc(&ran_on, blocks * sizeof(long)));
    CK(cudaMemset(total, 0, sizeof(float)));
    CK(cudaMemset(maxv, 0, sizeof(int)));
    CK(cudaMemset(flag, 0, sizeof(int)));
    CK(cudaMemset(count, 0, sizeof(unsigned)));
    CK(cudaMemset(ticket, 0, sizeof(unsigned)));
    atomics_kernel<<<blocks, 64>>>(total, maxv, count, flag, ran_on);
    CK(cudaGetLastError());
    float h_total = 0.0f;
    int h_max = 0, h_flag = 0;
    unsigned h_count = 0;
    std::vector<long> h_ran(blocks);
    CK(cudaMemcpy(&h_total, total, sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&h_max, maxv, sizeof(int), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&h_flag, flag, sizeof(int), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(&h_count, count, sizeof(unsigned), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h_ran.data(), ran_on, blocks * sizeof(long), cudaMemcpyDeviceToHost));
    // 1 + ... + 24 = 300 is exact in float whatever the order of the additions.
    CHECK(h_total == 300.0f, "atomicAdd(float) over %d blocks: %g, want 300", blocks, h_total);
    CHECK(h_max == 12, "atomicMax: %d, want 12", h_max);
    CHECK(h_count == (unsigned)blocks, "atomicInc: %u, want %d", h_count, blocks);
    CHECK(h_flag >= 1 && h_flag <= blocks, "atomicCAS: flag %d, want the id of the first block to swap", h_flag);
    std::sort(h_ran.begin(), h_ran.end());
    int threads = (int)(std::unique(h_ran.begin(), h_ran.end()) - h_ran.begin());
#ifdef EMU_PARALLEL_BLOCKS
    CHECK(threads >= 2, "parallel-blocks build: the %d blocks ran on %d OS thread(s), want several", blocks, threads);
#else
    CHECK(threads == 1, "sequential build: the %d blocks ran on %d OS threads, want 1", blocks, threads);
#endif
    // The last-block reduction, launched twice (the ticket must be back at 0 for the second).
    for (int rep = 0; rep < 2; rep++) {
        last_block_sum_kernel<<<blocks, 32>>>(sum, partial, ticket, 1);
        CK(cudaGetLastError());
        float h_sum = 0.0f;
        CK(cudaMemcpy(&h_sum, sum, sizeof(float), cudaMemcpyDeviceToHost));
        CHECK(h_sum == 300.0f, "last-block reduction, launch %d: %g, want 300", rep + 1, h_sum);
    }
    for (void *p : {(void *)total, (void *)sum, (void *)partial, (void *)maxv, (void *)flag, (void *)count,
                    (void *)ticket, (void *)ran_on})
        CK(cudaFree(p));
    printf("  atomics (float add, max, inc, CAS) over %d blocks, which ran on %d OS thread%s; a last-block reduction "
           "with its fence, twice\n", blocks, threads, threads == 1 ? "" : "s");
}

// ---- Runtime: memory, streams, events, graphs -----------------------------------------------------------

static void test_runtime(void) {
    const size_t n = 333;
    float *d;
    CK(cudaMalloc(&d, n * sizeof(float)));
    std::vector<uint32_t> raw(n);
    CK(cudaMemcpy(raw.data(), d, n * 4, cudaMemcpyDeviceToHost));
    size_t nan = 0;
    for (auto w : raw) nan += w == 0x7fffffffu;
    CHECK(nan == n, "cudaMalloc: %zu of %zu words hold the NaN pattern", nan, n);

    // Deferred execution: an async copy into pinned memory is not there before the host waits.
    cudaStream_t s1, s2;
    CK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    float *pinned;
    CK(cudaMallocHost(&pinned, n * sizeof(float)));
    fill_kernel<<<2, 256, 0, s1>>>(d, 1.0f, (int)n);
    CK(cudaMemcpyAsync(pinned, d, n * sizeof(float), cudaMemcpyDeviceToHost, s1));
    CHECK(isnan(pinned[0]) && isnan(pinned[n - 1]), "pinned destination readable before the stream was synchronised");
    CK(cudaStreamSynchronize(s1));
    CHECK(pinned[0] == 1.0f && pinned[n - 1] == (float)n, "copy after synchronisation: %g %g", pinned[0], pinned[n - 1]);

    // Events order two streams: s2 waits for s1's kernel before its copy.
    cudaEvent_t ev;
    CK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    fill_kernel<<<2, 256, 0, s1>>>(d, 5.0f, (int)n);
    CK(cudaEventRecord(ev, s1));
    CK(cudaStreamWaitEvent(s2, ev, 0));
    CK(cudaMemcpyAsync(pinned, d, n * sizeof(float), cudaMemcpyDeviceToHost, s2));
    CK(cudaStreamSynchronize(s2));
    CHECK(pinned[0] == 5.0f && pinned[n - 1] == 4.0f + (float)n, "cudaStreamWaitEvent did not order the streams");

    // Graph: capture a kernel and a copy, replay twice; an upload from pinned memory reads it at replay time.
    float *src;
    CK(cudaMallocHost(&src, sizeof(float)));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
    CK(cudaMemcpyAsync(d, src, sizeof(float), cudaMemcpyHostToDevice, s1));
    fill_kernel<<<1, 32, 0, s1>>>(d + 1, 100.0f, 8);
    CK(cudaMemcpyAsync(pinned, d, 9 * sizeof(float), cudaMemcpyDeviceToHost, s1));
    CHECK(cudaStreamSynchronize(s1) == cudaErrorStreamCaptureUnsupported, "synchronising a capturing stream");
    (void)cudaGetLastError();
    cudaError_t e = cudaStreamEndCapture(s1, &graph);
    CHECK(e == cudaErrorStreamCaptureInvalidated, "a capture with a sync in it: %s", cudaGetErrorName(e));
    (void)cudaGetLastError();
    CK(cudaStreamBeginCapture(s1, cudaStreamCaptureModeGlobal));
    CK(cudaMemcpyAsync(d, src, sizeof(float), cudaMemcpyHostToDevice, s1));
    fill_kernel<<<1, 32, 0, s1>>>(d + 1, 100.0f, 8);
    CK(cudaMemcpyAsync(pinned, d, 9 * sizeof(float), cudaMemcpyDeviceToHost, s1));
    CK(cudaStreamEndCapture(s1, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    int replay_ok = 0;
    for (int r = 0; r < 2; r++) {
        *src = -1.0f - r;
        CK(cudaGraphLaunch(exec, s1));
        CK(cudaStreamSynchronize(s1));
        replay_ok += pinned[0] == -1.0f - r && pinned[8] == 107.0f;
    }
    CHECK(replay_ok == 2, "graph replays: %d of 2 correct", replay_ok);
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));

    // Invalid and freed pointers are refused with cudaErrorInvalidValue.
    float *tmp;
    CK(cudaMalloc(&tmp, 64));
    CK(cudaFree(tmp));
    float host[4];
    CHECK(cudaMemcpy(tmp, host, 16, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "copy into freed memory");
    CHECK(cudaMemcpy(d + n - 2, host, 16, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "copy past the end");
    CHECK(cudaFree(host) == cudaErrorInvalidValue, "cudaFree of a host pointer");
    CHECK(cudaMemcpy(host, d, 16, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "copy kind contradicts pointers");
    (void)cudaGetLastError();
    CK(cudaEventDestroy(ev));
    CK(cudaStreamDestroy(s1));
    CK(cudaStreamDestroy(s2));
    CK(cudaFreeHost(pinned));
    CK(cudaFreeHost(src));
    CK(cudaFree(d));
    printf("  runtime: NaN-filled allocations, deferred async copies, events across streams, graph capture and "
           "replay, invalid and freed pointers refused\n");
}

// ---- Misuse reports, each in a child process ------------------------------------------------------------

static __global__ void early_return_barrier_kernel(float *y, int n) {
    int i = threadIdx.x;
    if (i >= n) return;  // BUG: part of the block leaves before the barrier
    y[i] = 1.0f;
    __syncthreads();
    y[i] += y[(i + 1) % n];
}

static __global__ void partial_warp_shuffle_kernel(float *y) {
    float v = (float)threadIdx.x;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);  // BUG: block of 48 threads
    y[threadIdx.x] = v;
}

static __global__ void exited_lane_shuffle_kernel(float *y) {
    if (threadIdx.x == 3) return;  // BUG: lane 3 is named in the mask below
    float v = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
    y[threadIdx.x] = v;
}

static __global__ void divergent_barrier_kernel(float *y) {
    if (threadIdx.x < 16) {
        y[threadIdx.x] = 1.0f;
        __syncthreads();  // BUG: two different barriers
    } else {
        __syncthreads();
        y[threadIdx.x] = 2.0f;
    }
}

typedef void (*Misuse)(void);

static void misuse_barrier(void) {
    float *y;
    cudaMalloc(&y, 64 * sizeof(float));
    early_return_barrier_kernel<<<1, 64>>>(y, 40);
    cudaDeviceSynchronize();
}
static void misuse_partial_warp(void) {
    float *y;
    cudaMalloc(&y, 64 * sizeof(float));
    partial_warp_shuffle_kernel<<<1, 48>>>(y);
    cudaDeviceSynchronize();
}
static void misuse_exited_lane(void) {
    float *y;
    cudaMalloc(&y, 64 * sizeof(float));
    exited_lane_shuffle_kernel<<<1, 32>>>(y);
    cudaDeviceSynchronize();
}
static void misuse_divergent_barrier(void) {
    float *y;
    cudaMalloc(&y, 64 * sizeof(float));
    divergent_barrier_kernel<<<1, 32>>>(y);
    cudaDeviceSynchronize();
}
static void misuse_host_pointer(void) {
    static float host[64];
    fill_kernel<<<1, 64>>>(host, 0.0f, 64);
    cudaDeviceSynchronize();
}
static void misuse_freed_pointer(void) {
    float *y;
    cudaMalloc(&y, 64 * sizeof(float));
    cudaFree(y);
    fill_kernel<<<1, 64>>>(y, 0.0f, 64);
    cudaDeviceSynchronize();
}
static void misuse_nvtx(void) {
    nvtxRangePushA("a");
    nvtxRangePop();
    nvtxRangePop();
}
static void misuse_gemm_extent(void) {
    cublasHandle_t h;
    cublasCreate(&h);
    float *a;
    cudaMalloc(&a, 16 * sizeof(float));
    const float one = 1.0f, zero = 0.0f;
    cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, a, 5, a, 4, &zero, a, 4);  // A needs 19 floats
    cudaDeviceSynchronize();
}

// A store one element past the end (the layer's redzone check in Release, ASan in the sanitizer build).
static void misuse_write_past_end(void) {
    float *y;
    cudaMalloc(&y, 40 * sizeof(float));
    fill_kernel<<<1, 64>>>(y, 0.0f, 41);
    cudaDeviceSynchronize();
}

#ifdef EMU_PARALLEL_BLOCKS
// Inter-block races, which only the parallel-blocks build (ThreadSanitizer) reports.
static void misuse_missing_fence(void) {
    float *sum, *partial;
    unsigned *ticket;
    cudaMalloc(&sum, sizeof(float));
    cudaMalloc(&partial, 64 * sizeof(float));
    cudaMalloc(&ticket, sizeof(unsigned));
    cudaMemset(ticket, 0, sizeof(unsigned));
    last_block_sum_kernel<<<64, 32>>>(sum, partial, ticket, 0);
    cudaDeviceSynchronize();
}
static void misuse_plain_counter(void) {
    int *counter;
    cudaMalloc(&counter, sizeof(int));
    cudaMemset(counter, 0, sizeof(int));
    plain_counter_kernel<<<64, 32>>>(counter);
    cudaDeviceSynchronize();
}
#endif

// needle: alternatives separated by '|'.
static void expect_report(const char *what, Misuse f, const char *needle) {
    int fds[2];
    if (pipe(fds) != 0) {
        CHECK(0, "pipe failed");
        return;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
#ifdef EMU_PARALLEL_BLOCKS
        // A child forked from a process with threads (the block workers) runs ThreadSanitizer with everything
        // ignored: start afresh instead (main's --misuse).
        execl("/proc/self/exe", "test_emu_layer", "--misuse", what, (char *)NULL);
        _exit(127);
#endif
        f();
        _exit(0);  // not reached when the layer reports
    }
    close(fds[1]);
    std::string out;
    char buf[4096];
    ssize_t r;
    while ((r = read(fds[0], buf, sizeof(buf))) > 0 || (r < 0 && errno == EINTR))
        if (r > 0) out.append(buf, (size_t)r);
    int rerr = r < 0 ? errno : 0;
    close(fds[0]);
    int status = 0;
    pid_t w;
    while ((w = waitpid(pid, &status, 0)) < 0 && errno == EINTR) {}
    CHECK(w == pid && rerr == 0, "%s: reading the child's report: read errno %d, waitpid %d", what, rerr, (int)w);
    bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    bool found = false;
    std::string alts = needle;
    for (size_t a = 0, b; a <= alts.size(); a = b + 1) {
        b = alts.find('|', a);
        if (b == std::string::npos) b = alts.size();
        found |= out.find(alts.substr(a, b - a)) != std::string::npos;
    }
    CHECK(failed && found, "%s: child %s, report %s\n--- child stderr ---\n%s", what,
          failed ? "failed" : "exited 0", found ? "found" : "missing", out.c_str());
    if (failed && found) {
        size_t at = out.find("emu: error");
        if (at == std::string::npos) at = out.find("ERROR: AddressSanitizer");
        size_t frame = std::string::npos;  // ThreadSanitizer: where the first of the two accesses was made
        if (at == std::string::npos && (at = out.find("WARNING: ThreadSanitizer")) != std::string::npos)
            frame = out.find("#0 ", at);
        if (at == std::string::npos) at = 0;
        size_t eol = out.find('\n', at);
        std::string line = out.substr(at, eol == std::string::npos ? std::string::npos : eol - at);
        if (frame != std::string::npos) line += ": " + out.substr(frame, out.find('\n', frame) - frame);
        printf("    %-28s -> %s\n", what, line.c_str());
    }
}

static const struct {
    const char *what;
    Misuse f;
    const char *needle;
} MISUSES[] = {
    {"early return + barrier", misuse_barrier, "reached by only part of the block"},
    {"full mask, 48-thread block", misuse_partial_warp, "which does not exist"},
    {"lane exits before shuffle", misuse_exited_lane, "lane 3"},
    {"divergent barriers", misuse_divergent_barrier, "different __syncthreads"},
    {"host pointer to a kernel", misuse_host_pointer, "is not device memory"},
    {"freed pointer to a kernel", misuse_freed_pointer, "FREED device allocation"},
    {"NVTX pop without push", misuse_nvtx, "nvtxRangePop without an open range"},
    {"sgemm lda past allocation", misuse_gemm_extent, "operand A spans"},
    {"store one past the end", misuse_write_past_end, "past the end of the device allocation|heap-buffer-overflow"},
#ifdef EMU_PARALLEL_BLOCKS
    {"ticket without __threadfence", misuse_missing_fence, "ThreadSanitizer: data race"},
    {"counter without an atomic", misuse_plain_counter, "ThreadSanitizer: data race"},
#endif
};

static void test_misuse(void) {
    printf("  misuse reports (each in a child process):\n");
    for (const auto &m : MISUSES) expect_report(m.what, m.f, m.needle);
}

// test_emu_layer --misuse WHAT: one misuse alone (the child of expect_report in the parallel-blocks build).
static int run_misuse(const char *what) {
    for (const auto &m : MISUSES)
        if (!strcmp(m.what, what)) {
            m.f();
            return 0;
        }
    fprintf(stderr, "test_emu_layer: no misuse named \"%s\"\n", what);
    return 2;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--misuse")) return run_misuse(argv[2]);
    printf("test_emu_layer: the CPU execution layer (tests/emu)\n");
    cublasHandle_t h;
    CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
    test_sgemm(h);
    test_sgemm_validation(h);
    cublasDestroy(h);
    test_philox();
    test_kernels();
    test_atomics();
    test_runtime();
    test_misuse();
    return test_finish("test_emu_layer");
}
