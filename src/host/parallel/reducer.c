// reducer.c: the reducers of one process (none) and of the CPU backend's MPI ranks (see reducer.h): the ordered
// chain of gradient sums, its broadcast from the last rank, and ZeRO-1's gathers, over dist.c's exchanges.
#include "mlm/reducer.h"

#include <stdlib.h>

#include "mlm/common.h"

size_t reducer_shard_start(const Reducer *rd, size_t n, int rank) { return dist_shard_start(&rd->dist, n, rank); }

static int agree_local(Reducer *rd, int v) {
    (void)rd;
    return v;
}

static void free_reducer(Reducer *rd) { free(rd); }

Reducer *reducer_none(const Dist *d) {
    Reducer *rd = mlm_calloc(1, sizeof(Reducer), "reducer");
    rd->name = "none";
    rd->dist = *d;
    rd->agree = agree_local;
    rd->free = free_reducer;
    return rd;
}

// ---- MPI: rank r receives the running sum of ranks 0..r-1 after computing its first micro-batch (so that the ranks
// compute at once and only the additions wait), adds its micro-batches in order and passes the sum on; the last
// rank holds the sum of one process with accum_steps = N x k, bit for bit, and broadcasts it with the statistics.

static int mpi_join(Reducer *rd, float *grads, size_t n, double *stats, int n_stats) {
    int have;
    dist_chain_recv(&rd->dist, grads, n, stats, n_stats, &have);
    return have;
}

static void mpi_sum(Reducer *rd, float *grads, size_t n, double *stats, int n_stats, int have) {
    dist_chain_send(&rd->dist, grads, n, stats, n_stats, have);
    dist_bcast_last(&rd->dist, grads, n * sizeof(float));
    dist_bcast_last(&rd->dist, stats, (size_t)n_stats * sizeof(double));
}

static void mpi_gather_params(Reducer *rd, float *params, size_t n) {
    dist_allgather_items(&rd->dist, params, n, sizeof(float));
}

static void mpi_gather_to_root(Reducer *rd, const float *shard, float *full, size_t n) {
    dist_gather_root(&rd->dist, shard, full, n);
}

static int mpi_agree(Reducer *rd, int v) { return dist_agree(&rd->dist, v); }

Reducer *reducer_mpi(const Dist *d) {
    Reducer *rd = reducer_none(d);
    rd->name = "MPI";
    rd->join = mpi_join;
    rd->sum = mpi_sum;
    rd->gather_params = mpi_gather_params;
    rd->gather_to_root = mpi_gather_to_root;
    rd->agree = mpi_agree;
    return rd;
}
