// dist.h: the ranks of a data-parallel run (MPI for the CPU backend) and the few exchanges training needs:
// a gradient sum in one fixed global order (a chain in rank order), its broadcast, gathers, and
// agreement on rank 0's decisions; every wait is bounded by a timeout so that a dead or hung rank stops the job.
//
// Why a chain and not MPI_Allreduce: an allreduce's summation order depends on the library, the algorithm and
// the number of ranks, so its result is not the one-process result. Rank r adds its micro-batch gradients one by
// one to the running sum it receives from rank r - 1, which is exactly the order one process with
// train.accum_steps = N x k adds them in; the last rank then holds the sum, bit for bit the one-process sum.
#ifndef MLM_DIST_H
#define MLM_DIST_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int rank, world, local_rank;  // 0, 1, 0 in a single process
    int mpi;                      // 1 when MPI is initialised (by dist_init); 0 with world > 1: ranks from RANK and
                                  // WORLD_SIZE alone (no MPI launcher), which only the NCCL path can use
    double timeout_s;             // how long any wait may last before the job is stopped
} Dist;

// 1 when this binary was built with MPI.
int dist_have_mpi(void);
// Find out whether this process is one rank of several (mpirun, or RANK/WORLD_SIZE), initialise MPI if so.
// Exits with a message that says what to do when the launch cannot work (RANK/WORLD_SIZE that disagree with
// mpirun's, or a RANK outside WORLD_SIZE).
void dist_init(Dist *d, double timeout_s);
void dist_finalize(Dist *d);
// How many ranks the launcher started (mpirun's, a PMI launcher's, or WORLD_SIZE), from the environment alone,
// without initialising MPI, and this process's rank: 1 and 0 for a plain process.
int dist_launch_size(int *rank);
// Stop every rank of the job now with exit status `code` (after the caller printed why).
void dist_abort(const Dist *d, int code);

// The chain: the running sum sum[n] and stats[n_stats] from rank - 1 (rank 0: *have = 0, nothing received);
// *have = 0 means no micro-batch before this rank had rows (sum is then not yet defined).
void dist_chain_recv(const Dist *d, float *sum, size_t n, double *stats, int n_stats, int *have);
// ... and on to rank + 1 (nothing on the last rank).
void dist_chain_send(const Dist *d, const float *sum, size_t n, const double *stats, int n_stats, int have);
// buf[n] from the last rank (which holds the chain's sum) to every rank.
void dist_bcast_last(const Dist *d, void *buf, size_t bytes);
// Shards: rank i owns elements [dist_shard_start(i), dist_shard_start(i + 1)) of an n-vector.
size_t dist_shard_start(const Dist *d, size_t n, int rank);
// Every rank's shard of full[n_items] (items of item_bytes, in place at its offset) to every rank: the ZeRO-1
// parameter all-gather, and per-batch validation results.
void dist_allgather_items(const Dist *d, void *full, size_t n_items, size_t item_bytes);
// Every rank's shard (its part of an n-vector) into full[n] on rank 0 alone (full: NULL elsewhere); checkpoints of
// sharded Adam moments.
void dist_gather_root(const Dist *d, const float *shard, float *full, size_t n);
// buf (bytes) from rank 0 to every rank (MPI jobs only; NCCL's unique id).
void dist_bcast_root(const Dist *d, void *buf, size_t bytes);
// Rank 0's value of v, on every rank (decisions only rank 0 may take: stop, checkpoint now).
int dist_agree(const Dist *d, int v);

#ifdef __cplusplus
}
#endif

#endif
