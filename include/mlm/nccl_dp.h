// nccl_dp.h: data parallel for the CUDA backend over NCCL: one communicator per job (one GPU per rank), its unique
// id handed out through MPI or a file on a shared filesystem, and the exchanges a training step needs (a weighted
// gradient sum, the step's statistics, rank 0's decisions), each wait bounded by train.dist_timeout.
//
// Started from MPI (mpirun -np N: the id goes out by MPI_Bcast) or without it: RANK, WORLD_SIZE (and LOCAL_RANK for
// the device) from the scheduler and MLM_NCCL_ID_FILE, a path every rank can read, where rank 0 writes the id.
#ifndef MLM_NCCL_DP_H
#define MLM_NCCL_DP_H

#include <stddef.h>

#include "mlm/dist.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct NcclDp NcclDp;

// 1 when this binary was built with NCCL (and CUDA).
int nccl_dp_available(void);
// The communicator of the job described by d (its rank, world and local rank; selects device local_rank).
// Exits with a message when NCCL is missing or the id cannot be exchanged.
NcclDp *nccl_dp_create(const Dist *d);
void nccl_dp_free(NcclDp *n);
// grads[n] (device memory) = sum over ranks of weight_r x grads_r, in place, where weight_r is this rank's `weight`
// (NCCL's pre-multiplied sum); zero_rows = 1 sends zeros instead (a rank with no rows in this step).
void nccl_dp_weighted_sum(NcclDp *n, float *grads, size_t count, float weight, int zero_rows);
// host stats[k] = their sum over ranks (k <= 8).
void nccl_dp_sum_stats(NcclDp *n, double *stats, int k);
// Rank 0's value of v on every rank.
int nccl_dp_agree(NcclDp *n, int v);

#ifdef __cplusplus
}
#endif

#endif
