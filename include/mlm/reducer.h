// reducer.h: what a training step needs from the other ranks of a data-parallel job: a reducer sums the ranks'
// gradient sums and step statistics, and under ZeRO-1 gathers the ranks' updated shards of the parameters and
// (for checkpoints) of the Adam moments. Three of them: none (one process), MPI (the CPU backend; host memory)
// and NCCL (the CUDA backend; device memory, nccl_dp.h). step.h says when the step calls each function.
//
// Every rank ends the reduction holding the WHOLE summed gradient (an all-reduce), so every rank takes the same
// global norm from the same numbers and clips alike; ZeRO-1 (train.zero) then updates each rank's shard of the
// parameters with its shard of the Adam moments and gathers the parameters. That keeps ZeRO-1 bit for bit equal to
// plain data parallel, and costs the parameter all-gather on top of the all-reduce (a reduce-scatter would save
// communication but take the norm from partial sums in another order).
//
// Which combinations exist, in one place:
//  - CPU backend: none, MPI (mpirun). The MPI chain adds micro-batches in one global order, so N ranks x k
//    micro-batches equal one process with train.accum_steps = N x k bit for bit.
//  - CUDA backend: none, NCCL (mpirun, or RANK/WORLD_SIZE with MLM_NCCL_ID_FILE; train.nccl on one rank). NCCL
//    all-reduces in an order of its own: N GPUs x k equal one GPU with accum_steps = N x k within float rounding
//    (bit for bit for 2 ranks x 1 micro-batch, whose sum is one addition either way, and for one rank).
//  - Not built: CUDA over MPI without NCCL (its gradients would travel through host memory every step), and the
//    CPU backend over NCCL (NCCL moves device memory only); train.c refuses both, saying what to use instead.
#ifndef MLM_REDUCER_H
#define MLM_REDUCER_H

#include <stddef.h>

#include "mlm/dist.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct Reducer Reducer;

// A function a reducer has nothing to do for is NULL (none: every one; NCCL: join), and the step skips it.
struct Reducer {
    const char *name;  // "none", "MPI", "NCCL"
    Dist dist;         // this rank, the world, the timeout of every wait
    // The MPI chain, after this rank's first micro-batch ran: the running sum of the ranks before it into grads[n]
    // and stats[n_stats]; returns 1 if anything arrived (the micro-batches then add to it, in order).
    int (*join)(Reducer *, float *grads, size_t n, double *stats, int n_stats);
    // After this rank's micro-batches (have = 0: none had rows and nothing was joined): every rank ends holding the
    // whole sum in grads[n]. The MPI chain carries stats[n_stats] with the gradients (in micro-batch order, as one
    // process adds them), so they must be complete here (the CPU backend's are); NCCL leaves them to sum_stats.
    void (*sum)(Reducer *, float *grads, size_t n, double *stats, int n_stats, int have);
    // After the update, once the backend's statistics are read back: their sum over ranks (NCCL).
    void (*sum_stats)(Reducer *, double *stats, int n_stats);
    // ZeRO-1, after each rank updated its shard [shard_start(rank), shard_start(rank + 1)) of params[n]: every
    // rank's shard to every rank (host memory for MPI, device memory for NCCL).
    void (*gather_params)(Reducer *, float *params, size_t n);
    // Checkpoints of sharded Adam moments: every rank's shard (host memory) into full[n] on rank 0 (full: NULL on
    // the others).
    void (*gather_to_root)(Reducer *, const float *shard, float *full, size_t n);
    // Rank 0's value of v on every rank (decisions only rank 0 takes: stop, checkpoint now).
    int (*agree)(Reducer *, int v);
    void (*free)(Reducer *);
};

// One process: nothing to exchange (every function NULL but agree and free).
Reducer *reducer_none(const Dist *d);
// The CPU backend's ranks over MPI (dist.h): the chain of partial sums in rank order, then a broadcast from the
// last rank; world 1 gives the none reducer's results.
Reducer *reducer_mpi(const Dist *d);
// ZeRO-1 shards: rank i owns elements [reducer_shard_start(i), reducer_shard_start(i + 1)) of an n-vector.
size_t reducer_shard_start(const Reducer *rd, size_t n, int rank);

#ifdef __cplusplus
}
#endif

#endif
