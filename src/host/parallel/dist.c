// dist.c: the ranks of a data-parallel run over MPI (see dist.h): launch detection, the ordered gradient chain,
// broadcast and gathers, each wait bounded by train.dist_timeout. Without MPI in the build every
// function is the single-process case, and a multi-rank launch is refused with a message.
#include "mlm/dist.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mlm/common.h"

#ifdef MLM_HAVE_MPI
#include <mpi.h>
#endif

// An integer from the environment, or -1 when the variable is unset or not a number.
static long env_long(const char *name) {
    const char *s = getenv(name);
    if (!s || !*s) return -1;
    char *end;
    long v = strtol(s, &end, 10);
    return *end ? -1 : v;
}

// Set by the launchers that start MPI ranks (Open MPI's mpirun, PMI-2 launchers such as srun and MPICH's).
static int launched_by_mpi(void) {
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

// Ranks from the scheduler's environment alone (torchrun style, no MPI launcher): RANK, WORLD_SIZE, LOCAL_RANK.
static void ranks_from_env(Dist *d, long env_rank, long env_world) {
    if (env_rank < 0 || env_rank >= env_world)
        mlm_fatal(MLM_EXIT_USAGE, "WORLD_SIZE=%ld needs RANK in 0..%ld (RANK is %s)", env_world, env_world - 1,
                  getenv("RANK") ? getenv("RANK") : "unset");
    d->rank = (int)env_rank;
    d->world = (int)env_world;
    long local = env_long("LOCAL_RANK");
    d->local_rank = local < 0 ? 0 : (int)local;
}

int dist_launch_size(int *rank) {
    long size = env_long("OMPI_COMM_WORLD_SIZE"), r = env_long("OMPI_COMM_WORLD_RANK");
    if (size < 0) size = env_long("PMI_SIZE"), r = env_long("PMI_RANK");
    if (size < 0) size = env_long("WORLD_SIZE"), r = env_long("RANK");
    if (rank) *rank = r < 0 ? 0 : (int)r;
    return size < 1 ? 1 : (int)size;
}

size_t dist_shard_start(const Dist *d, size_t n, int rank) {
    // Equal shards, the first n % world one element longer: rank i starts at i * q + min(i, r).
    size_t q = n / (size_t)d->world, r = n % (size_t)d->world, i = (size_t)rank;
    return i * q + (i < r ? i : r);
}

#ifdef MLM_HAVE_MPI

int dist_have_mpi(void) { return 1; }

void dist_init(Dist *d, double timeout_s) {
    memset(d, 0, sizeof(*d));
    d->world = 1;
    d->timeout_s = timeout_s;
    long env_rank = env_long("RANK"), env_world = env_long("WORLD_SIZE");
    if (!launched_by_mpi()) {
        if (env_world > 1) ranks_from_env(d, env_rank, env_world);
        return;
    }
    int provided;
    if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        mlm_fatal(MLM_EXIT_FAILURE, "MPI_Init failed: check the MPI installation and the mpirun command line");
    // Errors come back as codes (every call is checked) instead of aborting inside the library without a word.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->world);
    d->mpi = 1;
    long local = env_long("OMPI_COMM_WORLD_LOCAL_RANK");
    if (local < 0) local = env_long("LOCAL_RANK");
    d->local_rank = local < 0 ? 0 : (int)local;
    if ((env_rank >= 0 && env_rank != d->rank) || (env_world >= 0 && env_world != d->world)) {
        fprintf(stderr, "mlm: error: RANK=%ld WORLD_SIZE=%ld disagree with the MPI launch (rank %d of %d); unset them "
                "or make them match\n", env_rank, env_world, d->rank, d->world);
        MPI_Abort(MPI_COMM_WORLD, MLM_EXIT_USAGE);
    }
}

void dist_finalize(Dist *d) {
    if (d->mpi) MPI_Finalize();
    d->mpi = 0;
}

void dist_abort(const Dist *d, int code) {
    fflush(stdout);
    fflush(stderr);
    if (d->mpi) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

static void check_mpi(const Dist *d, int rc, const char *what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    fprintf(stderr, "mlm: error: rank %d of %d: %s failed: %s; stopping the job\n", d->rank, d->world, what, msg);
    dist_abort(d, MLM_EXIT_FAILURE);
}

// Wait for requests, polling with short sleeps (the other ranks on the same cores keep computing), and stop the
// whole job with a message when they take longer than the timeout: a dead or hung rank never hangs the others.
static void wait_bounded(const Dist *d, MPI_Request *req, int n, const char *what) {
    double t0 = MPI_Wtime();
    struct timespec nap = {0, 50 * 1000};
    for (;;) {
        int done = 0;
        check_mpi(d, MPI_Testall(n, req, &done, MPI_STATUSES_IGNORE), what);
        if (done) return;
        if (MPI_Wtime() - t0 > d->timeout_s) {
            fprintf(stderr, "mlm: error: rank %d of %d waited %.0f s for %s; another rank died or hangs. Stopping the "
                    "job (train.dist_timeout = %g s); continue from the last checkpoint with --resume\n", d->rank,
                    d->world, MPI_Wtime() - t0, what, d->timeout_s);
            dist_abort(d, MLM_EXIT_FAILURE);
        }
        nanosleep(&nap, NULL);
    }
}

// MPI counts are int: large buffers go in pieces of at most 1 GiB.
enum { PIECE_BYTES = 1 << 30 };

static void send_bytes(const Dist *d, const void *buf, size_t bytes, int to, int tag, const char *what) {
    for (size_t o = 0; o == 0 || o < bytes; o += PIECE_BYTES) {
        int len = (int)MLM_MIN((size_t)PIECE_BYTES, bytes - o);
        MPI_Request req;
        check_mpi(d, MPI_Isend((const char *)buf + o, len, MPI_BYTE, to, tag, MPI_COMM_WORLD, &req), what);
        wait_bounded(d, &req, 1, what);
        if (bytes == 0) break;
    }
}

static void recv_bytes(const Dist *d, void *buf, size_t bytes, int from, int tag, const char *what) {
    for (size_t o = 0; o == 0 || o < bytes; o += PIECE_BYTES) {
        int len = (int)MLM_MIN((size_t)PIECE_BYTES, bytes - o);
        MPI_Request req;
        check_mpi(d, MPI_Irecv((char *)buf + o, len, MPI_BYTE, from, tag, MPI_COMM_WORLD, &req), what);
        wait_bounded(d, &req, 1, what);
        if (bytes == 0) break;
    }
}

enum { TAG_CHAIN_HEAD = 11, TAG_CHAIN_SUM = 12 };

void dist_chain_recv(const Dist *d, float *sum, size_t n, double *stats, int n_stats, int *have) {
    *have = 0;
    if (d->rank == 0) {
        memset(stats, 0, (size_t)n_stats * sizeof(double));
        return;
    }
    // stats[n_stats] then the have flag, then (when have) the sum.
    double head[17];
    if (n_stats > 16) mlm_fatal(MLM_EXIT_FAILURE, "dist_chain_recv: %d stats (at most 16)", n_stats);
    recv_bytes(d, head, (size_t)(n_stats + 1) * sizeof(double), d->rank - 1, TAG_CHAIN_HEAD,
               "the running gradient sum from the previous rank");
    memcpy(stats, head, (size_t)n_stats * sizeof(double));
    *have = head[n_stats] != 0;
    if (*have) recv_bytes(d, sum, n * sizeof(float), d->rank - 1, TAG_CHAIN_SUM, "the running gradient sum");
}

void dist_chain_send(const Dist *d, const float *sum, size_t n, const double *stats, int n_stats, int have) {
    if (d->rank == d->world - 1) return;
    double head[17];
    memcpy(head, stats, (size_t)n_stats * sizeof(double));
    head[n_stats] = have;
    send_bytes(d, head, (size_t)(n_stats + 1) * sizeof(double), d->rank + 1, TAG_CHAIN_HEAD,
               "the next rank to take the running gradient sum");
    if (have) send_bytes(d, sum, n * sizeof(float), d->rank + 1, TAG_CHAIN_SUM, "the next rank to take the sum");
}

void dist_bcast_last(const Dist *d, void *buf, size_t bytes) {
    if (d->world == 1) return;
    for (size_t o = 0; o < bytes; o += PIECE_BYTES) {
        int len = (int)MLM_MIN((size_t)PIECE_BYTES, bytes - o);
        MPI_Request req;
        check_mpi(d, MPI_Ibcast((char *)buf + o, len, MPI_BYTE, d->world - 1, MPI_COMM_WORLD, &req), "MPI_Ibcast");
        wait_bounded(d, &req, 1, "the summed gradients from the last rank");
    }
}

// Counts and displacements of the shards of an n-vector, in floats (int, as MPI wants: n < 2^31 here).
static void shard_layout(const Dist *d, size_t n, int *counts, int *displs) {
    if (n > (size_t)0x7fffffff) mlm_fatal(MLM_EXIT_USAGE, "train.zero: %zu parameters exceed MPI's int counts", n);
    for (int i = 0; i < d->world; i++) {
        size_t a = dist_shard_start(d, n, i), b = dist_shard_start(d, n, i + 1);
        displs[i] = (int)a;
        counts[i] = (int)(b - a);
    }
}

void dist_allgather_items(const Dist *d, void *full, size_t n_items, size_t item_bytes) {
    if (d->world == 1) return;
    if (n_items * item_bytes > (size_t)0x7fffffff)
        mlm_fatal(MLM_EXIT_USAGE, "all-gather of %zu bytes exceeds MPI's int counts", n_items * item_bytes);
    int *counts = mlm_malloc(2 * (size_t)d->world * sizeof(int), "shard layout"), *displs = counts + d->world;
    for (int i = 0; i < d->world; i++) {
        size_t a = dist_shard_start(d, n_items, i), b = dist_shard_start(d, n_items, i + 1);
        displs[i] = (int)(a * item_bytes);
        counts[i] = (int)((b - a) * item_bytes);
    }
    MPI_Request req;
    check_mpi(d, MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_BYTE, full, counts, displs, MPI_BYTE, MPI_COMM_WORLD, &req),
              "MPI_Iallgatherv");
    wait_bounded(d, &req, 1, "the shards of every rank (all-gather)");
    free(counts);
}

void dist_gather_root(const Dist *d, const float *shard, float *full, size_t n) {
    int *counts = mlm_malloc(2 * (size_t)d->world * sizeof(int), "shard layout"), *displs = counts + d->world;
    shard_layout(d, n, counts, displs);
    MPI_Request req;
    check_mpi(d, MPI_Igatherv(shard, counts[d->rank], MPI_FLOAT, full, counts, displs, MPI_FLOAT, 0, MPI_COMM_WORLD,
                              &req), "MPI_Igatherv");
    wait_bounded(d, &req, 1, "the optimizer-state shards for the checkpoint");
    free(counts);
}

void dist_bcast_root(const Dist *d, void *buf, size_t bytes) {
    if (!d->mpi || d->world == 1) return;
    MPI_Request req;
    check_mpi(d, MPI_Ibcast(buf, (int)bytes, MPI_BYTE, 0, MPI_COMM_WORLD, &req), "MPI_Ibcast");
    wait_bounded(d, &req, 1, "rank 0's broadcast");
}

int dist_agree(const Dist *d, int v) {
    if (d->world == 1) return v;
    MPI_Request req;
    check_mpi(d, MPI_Ibcast(&v, 1, MPI_INT, 0, MPI_COMM_WORLD, &req), "MPI_Ibcast");
    wait_bounded(d, &req, 1, "rank 0's decision to go on, stop or checkpoint");
    return v;
}

#else  // built without MPI: one process

int dist_have_mpi(void) { return 0; }

void dist_init(Dist *d, double timeout_s) {
    memset(d, 0, sizeof(*d));
    d->world = 1;
    d->timeout_s = timeout_s;
    long env_world = env_long("WORLD_SIZE");
    if (launched_by_mpi())
        mlm_fatal(MLM_EXIT_USAGE, "this process was started by mpirun, but mlm was built without MPI: install Open MPI "
                  "(apt-get install libopenmpi-dev openmpi-bin) and rebuild, or run one process with train.accum_steps "
                  "for the same result");
    if (env_world > 1) ranks_from_env(d, env_long("RANK"), env_world);
}

void dist_finalize(Dist *d) { (void)d; }
void dist_abort(const Dist *d, int code) { (void)d; exit(code); }

void dist_chain_recv(const Dist *d, float *sum, size_t n, double *stats, int n_stats, int *have) {
    (void)d, (void)sum, (void)n;
    memset(stats, 0, (size_t)n_stats * sizeof(double));
    *have = 0;
}
void dist_chain_send(const Dist *d, const float *sum, size_t n, const double *stats, int n_stats, int have) {
    (void)d, (void)sum, (void)n, (void)stats, (void)n_stats, (void)have;
}
void dist_bcast_last(const Dist *d, void *buf, size_t bytes) { (void)d, (void)buf, (void)bytes; }
void dist_allgather_items(const Dist *d, void *full, size_t n_items, size_t item_bytes) {
    (void)d, (void)full, (void)n_items, (void)item_bytes;
}
void dist_gather_root(const Dist *d, const float *shard, float *full, size_t n) {
    (void)d;
    if (full) memcpy(full, shard, n * sizeof(float));
}
void dist_bcast_root(const Dist *d, void *buf, size_t bytes) { (void)d, (void)buf, (void)bytes; }
int dist_agree(const Dist *d, int v) { (void)d; return v; }

#endif
