// nccl_dp.c: data parallel for the CUDA backend over NCCL (see nccl_dp.h): the communicator, its unique id through
// MPI or a shared file, the weighted gradient sum, statistics and agreement, every wait bounded. Without NCCL in the
// build the entry points refuse with a message.
#include "mlm/nccl_dp.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "mlm/common.h"

#ifdef MLM_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

struct NcclDp {
    Dist dist;            // rank, world, local rank, timeout (and MPI, when the job has it)
    ncclComm_t comm;
    cudaStream_t stream;  // NCCL's own stream; the model's work is finished (device sync) before each exchange
    float *zeros;         // [zeros_n] device zeros: what a rank without rows in a step contributes
    size_t zeros_n;
    double *dstats;       // [8] device staging for statistics
    double *hstats;       // [8] pinned host staging (an asynchronous copy from pageable memory is not ordered)
    int *dint, *hint;     // [1] device and pinned staging for agreement
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void fail(const NcclDp *n, const Dist *d, const char *fmt, const char *a, const char *file, int line) {
    fprintf(stderr, "mlm: error: rank %d of %d: ", d->rank, d->world);
    fprintf(stderr, fmt, a);
    fprintf(stderr, " (%s:%d)\n", file, line);
    if (n && n->comm) ncclCommAbort(n->comm);
    dist_abort(d, MLM_EXIT_FAILURE);
}

#define NCCL_CHECK(n, d, call) nccl_check((n), (d), (call), #call, __FILE__, __LINE__)
#define CUDART_CHECK(n, d, call) cudart_check((n), (d), (call), #call, __FILE__, __LINE__)

static void nccl_check(const NcclDp *n, const Dist *d, ncclResult_t r, const char *call, const char *file, int line) {
    if (r == ncclSuccess || r == ncclInProgress) return;  // nonblocking communicator: completion is polled
    char msg[512];
    snprintf(msg, sizeof(msg), "%s: %s", call, ncclGetErrorString(r));
    fail(n, d, "NCCL call %s; check NCCL_DEBUG=WARN output and the network between the ranks", msg, file, line);
}

static void cudart_check(const NcclDp *n, const Dist *d, cudaError_t e, const char *call, const char *file, int line) {
    if (e == cudaSuccess) return;
    char msg[512];
    snprintf(msg, sizeof(msg), "%s: %s", call, cudaGetErrorString(e));
    fail(n, d, "CUDA call %s", msg, file, line);
}

// Poll until the communicator has no operation in progress and (stream_too) the stream is idle, or stop the job
// after the timeout (ncclCommAbort frees the peers' collectives too): a dead or hung rank never hangs the others.
static void wait_comm(NcclDp *n, int stream_too, const char *what) {
    const Dist *d = &n->dist;
    double t0 = now_s();
    struct timespec nap = {0, 50 * 1000};
    for (;;) {
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(n->comm, &async);
        if (async != ncclSuccess && async != ncclInProgress) NCCL_CHECK(n, d, async);
        if (async == ncclSuccess) {
            if (!stream_too) return;
            cudaError_t e = cudaStreamQuery(n->stream);
            if (e == cudaSuccess) return;
            if (e != cudaErrorNotReady) CUDART_CHECK(n, d, e);
        }
        if (now_s() - t0 > d->timeout_s) {
            fprintf(stderr, "mlm: error: rank %d of %d waited %.0f s for %s; another rank died or hangs. Stopping the "
                    "job (train.dist_timeout = %g s); continue from the last checkpoint with --resume\n", d->rank,
                    d->world, now_s() - t0, what, d->timeout_s);
            ncclCommAbort(n->comm);
            dist_abort(d, MLM_EXIT_FAILURE);
        }
        nanosleep(&nap, NULL);
    }
}

static void wait_bounded(NcclDp *n, const char *what) { wait_comm(n, 1, what); }

// The unique id through a file every rank can read: rank 0 writes it (atomically: temporary file, rename), the
// others wait for it within the timeout. The path must be new for each job (a stale id would join a dead job).
static void exchange_id_by_file(const Dist *d, ncclUniqueId *id) {
    const char *path = getenv("MLM_NCCL_ID_FILE");
    if (!path || !*path)
        mlm_fatal(MLM_EXIT_USAGE, "rank %d of %d started without MPI: set MLM_NCCL_ID_FILE to a new path on a filesystem "
                  "every rank sees (rank 0 writes NCCL's unique id there), or start the ranks with mpirun%s", d->rank,
                  d->world, getenv("MASTER_ADDR") ? " (a TCP exchange through MASTER_ADDR/MASTER_PORT is not "
                  "implemented)" : "");
    if (d->rank == 0) {
        char tmp[4096];
        snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long)getpid());
        FILE *f = fopen(tmp, "wb");
        if (!f || fwrite(id, sizeof(*id), 1, f) != 1 || fclose(f) != 0 || rename(tmp, path) != 0)
            mlm_fatal(MLM_EXIT_FAILURE, "cannot write NCCL's unique id to %s: %s", path, strerror(errno));
        return;
    }
    double t0 = now_s();
    struct timespec nap = {0, 20 * 1000 * 1000};
    for (;;) {
        FILE *f = fopen(path, "rb");
        if (f) {
            size_t got = fread(id, sizeof(*id), 1, f);
            fclose(f);
            if (got == 1) return;
        }
        if (now_s() - t0 > d->timeout_s)
            mlm_fatal(MLM_EXIT_FAILURE, "rank %d waited %.0f s for rank 0 to write NCCL's unique id to %s; is rank 0 "
                      "running, and is the path on a filesystem both see?", d->rank, now_s() - t0, path);
        nanosleep(&nap, NULL);
    }
}

int nccl_dp_available(void) { return 1; }

NcclDp *nccl_dp_create(const Dist *d) {
    NcclDp *n = mlm_calloc(1, sizeof(NcclDp), "NCCL state");
    n->dist = *d;
    int devices = 0;
    CUDART_CHECK(n, d, cudaGetDeviceCount(&devices));
    if (devices < 1) mlm_fatal(MLM_EXIT_USAGE, "NCCL data parallel needs a CUDA device on each rank");
    // One GPU per rank: the rank's local index on its node picks the device.
    CUDART_CHECK(n, d, cudaSetDevice(d->local_rank % devices));
    ncclUniqueId id;
    if (d->rank == 0) NCCL_CHECK(n, d, ncclGetUniqueId(&id));
    if (d->mpi) dist_bcast_root(d, &id, sizeof(id));
    else if (d->world > 1) exchange_id_by_file(d, &id);
    CUDART_CHECK(n, d, cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking));
    // Nonblocking initialisation, so that a rank that never joins is a timeout with a message, not a hang.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    NCCL_CHECK(n, d, ncclCommInitRankConfig(&n->comm, d->world, id, d->rank, &config));
    wait_bounded(n, "every rank to join the NCCL communicator");
    CUDART_CHECK(n, d, cudaMalloc((void **)&n->dstats, 8 * sizeof(double)));
    CUDART_CHECK(n, d, cudaMalloc((void **)&n->dint, sizeof(int)));
    CUDART_CHECK(n, d, cudaMallocHost((void **)&n->hstats, 8 * sizeof(double)));
    CUDART_CHECK(n, d, cudaMallocHost((void **)&n->hint, sizeof(int)));
    return n;
}

// A nonblocking communicator is finalized (its operations flushed, polled until quiescent) before it is destroyed;
// destroying it while NCCL still works would leave the peers waiting for this rank.
void nccl_dp_free(NcclDp *n) {
    if (!n) return;
    if (n->comm) {
        NCCL_CHECK(n, &n->dist, ncclCommFinalize(n->comm));
        wait_comm(n, 0, "the other ranks to finish with the NCCL communicator");
        NCCL_CHECK(n, &n->dist, ncclCommDestroy(n->comm));
    }
    cudaFree(n->zeros);
    cudaFree(n->dstats);
    cudaFree(n->dint);
    cudaFreeHost(n->hstats);
    cudaFreeHost(n->hint);
    if (n->stream) cudaStreamDestroy(n->stream);
    free(n);
}

void nccl_dp_weighted_sum(NcclDp *n, float *grads, size_t count, float weight, int zero_rows) {
    const Dist *d = &n->dist;
    CUDART_CHECK(n, d, cudaDeviceSynchronize());  // the model's backward, on its own stream, is done
    const float *send = grads;
    if (zero_rows) {
        if (n->zeros_n < count) {
            cudaFree(n->zeros);
            CUDART_CHECK(n, d, cudaMalloc((void **)&n->zeros, count * sizeof(float)));
            // On NCCL's stream: the legacy default stream (cudaMemset) is not ordered with this non-blocking one,
            // so the all-reduce below could read memory not yet cleared (a NaN there becomes NaN on every rank).
            CUDART_CHECK(n, d, cudaMemsetAsync(n->zeros, 0, count * sizeof(float), n->stream));
            n->zeros_n = count;
        }
        send = n->zeros;
    }
    ncclRedOp_t op;
    NCCL_CHECK(n, d, ncclRedOpCreatePreMulSum(&op, &weight, ncclFloat, ncclScalarHostImmediate, n->comm));
    wait_bounded(n, "NCCL to create the weighted sum");
    NCCL_CHECK(n, d, ncclAllReduce(send, grads, count, ncclFloat, op, n->comm, n->stream));
    wait_bounded(n, "the gradients of the other ranks (NCCL all-reduce)");
    NCCL_CHECK(n, d, ncclRedOpDestroy(op, n->comm));
}

void nccl_dp_sum_stats(NcclDp *n, double *stats, int k) {
    const Dist *d = &n->dist;
    if (k > 8) mlm_fatal(MLM_EXIT_FAILURE, "nccl_dp_sum_stats: %d values (at most 8)", k);
    // Pinned memory and NCCL's stream: cudaMemcpy from pageable memory may return before the data reaches the device
    // and is not ordered with the non-blocking stream, so NCCL could reduce the previous step's statistics.
    size_t bytes = (size_t)k * sizeof(double);
    memcpy(n->hstats, stats, bytes);
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->dstats, n->hstats, bytes, cudaMemcpyHostToDevice, n->stream));
    NCCL_CHECK(n, d, ncclAllReduce(n->dstats, n->dstats, (size_t)k, ncclDouble, ncclSum, n->comm, n->stream));
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->hstats, n->dstats, bytes, cudaMemcpyDeviceToHost, n->stream));
    wait_bounded(n, "the step statistics of the other ranks");
    memcpy(stats, n->hstats, bytes);
}

int nccl_dp_agree(NcclDp *n, int v) {
    const Dist *d = &n->dist;
    *n->hint = v;  // pinned, on NCCL's stream (as the statistics)
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->dint, n->hint, sizeof(int), cudaMemcpyHostToDevice, n->stream));
    NCCL_CHECK(n, d, ncclBroadcast(n->dint, n->dint, 1, ncclInt32, 0, n->comm, n->stream));
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->hint, n->dint, sizeof(int), cudaMemcpyDeviceToHost, n->stream));
    wait_bounded(n, "rank 0's decision to go on, stop or checkpoint");
    return *n->hint;
}

#else  // built without NCCL

static void no_nccl(void) {
    mlm_fatal(MLM_EXIT_USAGE, "data parallel on the CUDA backend needs NCCL, and this mlm was built without it (CMake "
              "looks for nccl.h and libnccl beside the CUDA Toolkit, or under -DMLM_NCCL_ROOT=...); rebuild with NCCL, "
              "or train data parallel on the CPU backend (--device cpu, mpirun)");
}

int nccl_dp_available(void) { return 0; }
NcclDp *nccl_dp_create(const Dist *d) { (void)d; no_nccl(); return NULL; }
void nccl_dp_free(NcclDp *n) { (void)n; }
void nccl_dp_weighted_sum(NcclDp *n, float *grads, size_t count, float weight, int zero_rows) {
    (void)n, (void)grads, (void)count, (void)weight, (void)zero_rows;
    no_nccl();
}
void nccl_dp_sum_stats(NcclDp *n, double *stats, int k) { (void)n, (void)stats, (void)k; no_nccl(); }
int nccl_dp_agree(NcclDp *n, int v) { (void)n; no_nccl(); return v; }

#endif
