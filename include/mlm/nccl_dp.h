// nccl_dp.h: the CUDA backend's reducer (reducer.h) over NCCL: one communicator per job (one GPU per rank), its unique
// id handed out through MPI or a file on a shared filesystem, every exchange on NCCL's own stream and every wait
// bounded by train.dist_timeout.
//
// Started from MPI (mpirun -np N: the id goes out by MPI_Bcast) or without it: RANK, WORLD_SIZE (and LOCAL_RANK for
// the device) from the scheduler and MLM_NCCL_ID_FILE, a path every rank can read, where rank 0 writes the id.
#ifndef MLM_NCCL_DP_H
#define MLM_NCCL_DP_H

#include "mlm/dist.h"
#include "mlm/reducer.h"

#ifdef __cplusplus
extern "C" {
#endif

// 1 when this binary was built with NCCL (and CUDA).
int nccl_dp_available(void);
// The reducer of the job described by d (its rank, world and local rank; selects device local_rank, so call it
// before the CUDA model is created): sum (an all-reduce of the device gradients), sum_stats, ZeRO-1's gathers and
// agreement. Exits with a message when NCCL is missing or the id cannot be exchanged.
Reducer *reducer_nccl(const Dist *d);

#ifdef __cplusplus
}
#endif

#endif
