// nccl_dp.c: the CUDA backend's reducer over NCCL (see nccl_dp.h, reducer.h): the communicator, its unique id
// through MPI or a shared file, the all-reduce of the gradients, the statistics, ZeRO-1's gathers and agreement,
// every operation on NCCL's stream and every wait bounded. Without NCCL in the build the entry points refuse with a
// message.
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

enum { MAX_STATS = 8 };

typedef struct {
    Reducer rd;           // first: a Reducer * is a NcclReducer *
    ncclComm_t comm;
    cudaStream_t stream;  // NCCL's own stream; the model's work is finished (device sync) before each exchange
    double *dstats;       // [MAX_STATS] device staging for statistics
    double *hstats;       // [MAX_STATS] pinned host staging (an asynchronous copy from pageable memory is not ordered)
    int *dint, *hint;     // [1] device and pinned staging for agreement
} NcclReducer;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void fail(const NcclReducer *n, const Dist *d, const char *fmt, const char *a, const char *file, int line) {
    fprintf(stderr, "mlm: error: rank %d of %d: ", d->rank, d->world);
    fprintf(stderr, fmt, a);
    fprintf(stderr, " (%s:%d)\n", file, line);
    if (n && n->comm) ncclCommAbort(n->comm);
    dist_abort(d, MLM_EXIT_FAILURE);
}

#define NCCL_CHECK(n, d, call) nccl_check((n), (d), (call), #call, __FILE__, __LINE__)
#define CUDART_CHECK(n, d, call) cudart_check((n), (d), (call), #call, __FILE__, __LINE__)

static void nccl_check(const NcclReducer *n, const Dist *d, ncclResult_t r, const char *call, const char *file,
                       int line) {
    if (r == ncclSuccess || r == ncclInProgress) return;  // nonblocking communicator: completion is polled
    char msg[512];
    snprintf(msg, sizeof(msg), "%s: %s", call, ncclGetErrorString(r));
    fail(n, d, "NCCL call %s; check NCCL_DEBUG=WARN output and the network between the ranks", msg, file, line);
}

static void cudart_check(const NcclReducer *n, const Dist *d, cudaError_t e, const char *call, const char *file,
                         int line) {
    if (e == cudaSuccess) return;
    char msg[512];
    snprintf(msg, sizeof(msg), "%s: %s", call, cudaGetErrorString(e));
    fail(n, d, "CUDA call %s", msg, file, line);
}

static void stop_after_timeout(NcclReducer *n, double t0, const char *what) {
    const Dist *d = &n->rd.dist;
    fprintf(stderr, "mlm: error: rank %d of %d waited %.0f s for %s; another rank died or hangs. Stopping the job "
            "(train.dist_timeout = %g s); continue from the last checkpoint with --resume\n", d->rank, d->world,
            now_s() - t0, what, d->timeout_s);
    ncclCommAbort(n->comm);
    dist_abort(d, MLM_EXIT_FAILURE);
}

// Poll until the communicator has no operation in progress and (stream_too) NCCL's stream is idle, or stop the job
// after the timeout (ncclCommAbort frees the peers' collectives too): a dead or hung rank never hangs the others.
static void wait_comm(NcclReducer *n, int stream_too, const char *what) {
    const Dist *d = &n->rd.dist;
    double t0 = now_s();
    struct timespec nap = {0, 50 * 1000};
    for (;;) {
        ncclResult_t async = ncclSuccess;
        NCCL_CHECK(n, d, ncclCommGetAsyncError(n->comm, &async));
        NCCL_CHECK(n, d, async);
        if (async == ncclSuccess) {
            if (!stream_too) return;
            cudaError_t e = cudaStreamQuery(n->stream);
            if (e == cudaSuccess) return;
            if (e != cudaErrorNotReady) CUDART_CHECK(n, d, e);
        }
        if (now_s() - t0 > d->timeout_s) stop_after_timeout(n, t0, what);
        nanosleep(&nap, NULL);
    }
}

static void wait_bounded(NcclReducer *n, const char *what) { wait_comm(n, 1, what); }

// The unique id through a file every rank can read: rank 0 writes it (atomically: temporary file, rename), the
// others wait for it within the timeout. The path must be new for each job (a stale id would join a dead job).
static void exchange_id_by_file(const Dist *d, ncclUniqueId *id) {
    const char *path = getenv("MLM_NCCL_ID_FILE");
    if (!path || !*path)
        mlm_fatal(MLM_EXIT_USAGE, "rank %d of %d started without MPI: set MLM_NCCL_ID_FILE to a new path on a "
                  "filesystem every rank sees (rank 0 writes NCCL's unique id there), or start the ranks with mpirun%s", d->rank,
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

// The model's work runs on its own stream; an exchange starts once the device has finished it.
static void finish_model_work(NcclReducer *n) { CUDART_CHECK(n, &n->rd.dist, cudaDeviceSynchronize()); }

static void nccl_sum(Reducer *rd, float *grads, size_t count, double *stats, int n_stats, int have) {
    NcclReducer *n = (NcclReducer *)rd;
    const Dist *d = &rd->dist;
    (void)stats, (void)n_stats;  // summed after the update (nccl_sum_stats), once the device's read-back has them
    finish_model_work(n);
    // A rank without rows in this step (a short last batch) adds zeros; cleared on NCCL's stream, so the all-reduce
    // that follows on the same stream reads them cleared.
    if (!have) CUDART_CHECK(n, d, cudaMemsetAsync(grads, 0, count * sizeof(float), n->stream));
    NCCL_CHECK(n, d, ncclAllReduce(grads, grads, count, ncclFloat, ncclSum, n->comm, n->stream));
    wait_bounded(n, "the gradients of the other ranks (NCCL all-reduce)");
}

static void nccl_sum_stats(Reducer *rd, double *stats, int n_stats) {
    NcclReducer *n = (NcclReducer *)rd;
    const Dist *d = &rd->dist;
    if (n_stats > MAX_STATS) mlm_fatal(MLM_EXIT_FAILURE, "nccl_sum_stats: %d values (at most %d)", n_stats, MAX_STATS);
    size_t bytes = (size_t)n_stats * sizeof(double);
    memcpy(n->hstats, stats, bytes);
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->dstats, n->hstats, bytes, cudaMemcpyHostToDevice, n->stream));
    NCCL_CHECK(n, d, ncclAllReduce(n->dstats, n->dstats, (size_t)n_stats, ncclDouble, ncclSum, n->comm, n->stream));
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->hstats, n->dstats, bytes, cudaMemcpyDeviceToHost, n->stream));
    wait_bounded(n, "the step statistics of the other ranks");
    memcpy(stats, n->hstats, bytes);
}

// Every rank's shard to every rank: one broadcast per rank from its shard, in place (an all-gather with shards of
// unequal length), in one group.
static void nccl_gather_params(Reducer *rd, float *params, size_t count) {
    NcclReducer *n = (NcclReducer *)rd;
    const Dist *d = &rd->dist;
    finish_model_work(n);
    NCCL_CHECK(n, d, ncclGroupStart());
    for (int r = 0; r < d->world; r++) {
        size_t a = dist_shard_start(d, count, r), len = dist_shard_start(d, count, r + 1) - a;
        NCCL_CHECK(n, d, ncclBroadcast(params + a, params + a, len, ncclFloat, r, n->comm, n->stream));
    }
    NCCL_CHECK(n, d, ncclGroupEnd());
    wait_bounded(n, "the parameter shards of the other ranks (ZeRO-1 gather)");
}

// Host shards to rank 0's host full[n] through a device buffer one shard long, one rank after another (checkpoints).
static void nccl_gather_to_root(Reducer *rd, const float *shard, float *full, size_t count) {
    NcclReducer *n = (NcclReducer *)rd;
    const Dist *d = &rd->dist;
    size_t most = dist_shard_start(d, count, 1);  // the first shard is the longest
    float *dev = NULL, *pinned = NULL;
    CUDART_CHECK(n, d, cudaMalloc((void **)&dev, MLM_MAX(most, (size_t)1) * sizeof(float)));
    CUDART_CHECK(n, d, cudaMallocHost((void **)&pinned, MLM_MAX(most, (size_t)1) * sizeof(float)));
    size_t mine = dist_shard_start(d, count, d->rank + 1) - dist_shard_start(d, count, d->rank);
    if (d->rank == 0) {
        memcpy(full, shard, mine * sizeof(float));
        for (int r = 1; r < d->world; r++) {
            size_t a = dist_shard_start(d, count, r), len = dist_shard_start(d, count, r + 1) - a;
            NCCL_CHECK(n, d, ncclRecv(dev, len, ncclFloat, r, n->comm, n->stream));
            CUDART_CHECK(n, d, cudaMemcpyAsync(pinned, dev, len * sizeof(float), cudaMemcpyDeviceToHost, n->stream));
            wait_bounded(n, "an optimizer-state shard for the checkpoint");
            memcpy(full + a, pinned, len * sizeof(float));
        }
    } else {
        memcpy(pinned, shard, mine * sizeof(float));
        CUDART_CHECK(n, d, cudaMemcpyAsync(dev, pinned, mine * sizeof(float), cudaMemcpyHostToDevice, n->stream));
        NCCL_CHECK(n, d, ncclSend(dev, mine, ncclFloat, 0, n->comm, n->stream));
        wait_bounded(n, "rank 0 to take this rank's optimizer-state shard for the checkpoint");
    }
    CUDART_CHECK(n, d, cudaFree(dev));
    CUDART_CHECK(n, d, cudaFreeHost(pinned));
}

static int nccl_agree(Reducer *rd, int v) {
    NcclReducer *n = (NcclReducer *)rd;
    const Dist *d = &rd->dist;
    *n->hint = v;
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->dint, n->hint, sizeof(int), cudaMemcpyHostToDevice, n->stream));
    NCCL_CHECK(n, d, ncclBroadcast(n->dint, n->dint, 1, ncclInt32, 0, n->comm, n->stream));
    CUDART_CHECK(n, d, cudaMemcpyAsync(n->hint, n->dint, sizeof(int), cudaMemcpyDeviceToHost, n->stream));
    wait_bounded(n, "rank 0's decision to go on, stop or checkpoint");
    return *n->hint;
}

// A nonblocking communicator is finalized (its operations flushed, polled until quiescent) before it is destroyed;
// destroying it while NCCL still works would leave the peers waiting for this rank.
static void nccl_free(Reducer *rd) {
    NcclReducer *n = (NcclReducer *)rd;
    const Dist *d = &rd->dist;
    if (n->comm) {
        NCCL_CHECK(n, d, ncclCommFinalize(n->comm));
        wait_comm(n, 0, "the other ranks to finish with the NCCL communicator");
        NCCL_CHECK(n, d, ncclCommDestroy(n->comm));
    }
    cudaFree(n->dstats);
    cudaFree(n->dint);
    cudaFreeHost(n->hstats);
    cudaFreeHost(n->hint);
    if (n->stream) cudaStreamDestroy(n->stream);
    free(n);
}

int nccl_dp_available(void) { return 1; }

Reducer *reducer_nccl(const Dist *d) {
    NcclReducer *n = mlm_calloc(1, sizeof(NcclReducer), "NCCL reducer");
    n->rd.name = "NCCL";
    n->rd.dist = *d;
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
    CUDART_CHECK(n, d, cudaMalloc((void **)&n->dstats, MAX_STATS * sizeof(double)));
    CUDART_CHECK(n, d, cudaMalloc((void **)&n->dint, sizeof(int)));
    CUDART_CHECK(n, d, cudaMallocHost((void **)&n->hstats, MAX_STATS * sizeof(double)));
    CUDART_CHECK(n, d, cudaMallocHost((void **)&n->hint, sizeof(int)));
    n->rd.sum = nccl_sum;
    n->rd.sum_stats = nccl_sum_stats;
    n->rd.gather_params = nccl_gather_params;
    n->rd.gather_to_root = nccl_gather_to_root;
    n->rd.agree = nccl_agree;
    n->rd.free = nccl_free;
    return &n->rd;
}

#else  // built without NCCL

int nccl_dp_available(void) { return 0; }

Reducer *reducer_nccl(const Dist *d) {
    (void)d;
    mlm_fatal(MLM_EXIT_USAGE, "data parallel on the CUDA backend needs NCCL, and this mlm was built without it (CMake "
              "looks for nccl.h and libnccl beside the CUDA Toolkit, or under -DMLM_NCCL_ROOT=...); rebuild with NCCL, "
              "or train data parallel on the CPU backend (--device cpu, mpirun)");
    return NULL;
}

#endif
