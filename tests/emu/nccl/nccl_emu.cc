// nccl_emu.cc (tests/emu/nccl): NCCL's calls of nccl.h over MPI in host memory, for the emulated CUDA backend's
// data-parallel step (mlm_emu under mpirun -np N). A collective first runs the work queued on its stream (the layer
// runs a stream's work at host waits), then exchanges in MPI_COMM_WORLD's rank order; a communicator of one rank
// needs no MPI. What it cannot show: NCCL's own summation order (MPI's, for two ranks the one addition either way),
// and a host that reads a collective's result without waiting for its stream (the exchange is done at the call).
#include "nccl.h"

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

struct ncclComm {
    MPI_Comm comm;  // a duplicate of MPI_COMM_WORLD (MPI_COMM_NULL for one rank without MPI)
    int rank, nranks;
};

static int group_depth = 0;

static MPI_Datatype mpi_type(ncclDataType_t t, size_t *bytes) {
    switch (t) {
    case ncclInt8: *bytes = 1; return MPI_INT8_T;
    case ncclUint8: *bytes = 1; return MPI_UINT8_T;
    case ncclInt32: *bytes = 4; return MPI_INT32_T;
    case ncclUint32: *bytes = 4; return MPI_UINT32_T;
    case ncclInt64: *bytes = 8; return MPI_INT64_T;
    case ncclUint64: *bytes = 8; return MPI_UINT64_T;
    case ncclFloat32: *bytes = 4; return MPI_FLOAT;
    case ncclFloat64: *bytes = 8; return MPI_DOUBLE;
    default: *bytes = 0; return MPI_DATATYPE_NULL;
    }
}

static ncclResult_t fail(const char *what) {
    fprintf(stderr, "emu NCCL: %s\n", what);
    return ncclInvalidUsage;
}

// The work queued on the collective's stream runs first (it wrote what the collective reads).
static ncclResult_t run_stream(cudaStream_t stream) {
    return cudaStreamSynchronize(stream) == cudaSuccess ? ncclSuccess : ncclUnhandledCudaError;
}

// MPI counts are int: large buffers go in pieces; exchange(offset in elements, count) moves one.
enum { PIECE = 1 << 28 };
template <typename Exchange>
static ncclResult_t in_pieces(size_t count, Exchange exchange) {
    for (size_t o = 0; o < count; o += PIECE) {
        int n = (int)(count - o < (size_t)PIECE ? count - o : (size_t)PIECE);
        if (exchange(o, n) != MPI_SUCCESS) return ncclSystemError;
    }
    return ncclSuccess;
}

extern "C" {

const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (emulated)";
    case ncclInvalidArgument: return "invalid argument (emulated)";
    case ncclInvalidUsage: return "invalid usage (emulated)";
    case ncclInProgress: return "operation in progress";
    default: return "NCCL error (emulated)";
    }
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    memset(id, 0, sizeof(*id));
    snprintf(id->internal, sizeof(id->internal), "emu-nccl %ld", (long)getpid());
    return ncclSuccess;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t *config) {
    (void)id, (void)config;
    int mpi = 0;
    MPI_Initialized(&mpi);
    if (!mpi) {
        if (nranks != 1) return fail("a communicator of several ranks needs them started by mpirun");
        *comm = new ncclComm{MPI_COMM_NULL, 0, 1};
        return ncclSuccess;
    }
    int world = 0, me = 0;
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    if (world != nranks || me != rank) return fail("the communicator's ranks must be MPI_COMM_WORLD's");
    ncclComm *c = new ncclComm{MPI_COMM_NULL, rank, nranks};
    MPI_Comm_dup(MPI_COMM_WORLD, &c->comm);
    *comm = c;
    return ncclSuccess;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *async_error) {
    (void)comm;
    *async_error = ncclSuccess;
    return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    if (comm->comm != MPI_COMM_NULL) MPI_Barrier(comm->comm);
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (comm->comm != MPI_COMM_NULL) MPI_Comm_free(&comm->comm);
    delete comm;
    return ncclSuccess;
}

ncclResult_t ncclCommAbort(ncclComm_t comm) {
    delete comm;  // the job is being stopped; its communicator is not freed collectively
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, ncclRedOp_t op,
                           ncclComm_t comm, cudaStream_t stream) {
    size_t bytes;
    MPI_Datatype t = mpi_type(datatype, &bytes);
    if (t == MPI_DATATYPE_NULL || op != ncclSum) return fail("ncclAllReduce: only sums of the listed types");
    ncclResult_t r = run_stream(stream);
    if (r != ncclSuccess) return r;
    if (sendbuff != recvbuff) memmove(recvbuff, sendbuff, count * bytes);
    if (comm->comm == MPI_COMM_NULL) return ncclSuccess;
    return in_pieces(count, [&](size_t o, int n) {
        return MPI_Allreduce(MPI_IN_PLACE, (char *)recvbuff + o * bytes, n, t, MPI_SUM, comm->comm);
    });
}

ncclResult_t ncclBroadcast(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype, int root,
                           ncclComm_t comm, cudaStream_t stream) {
    size_t bytes;
    MPI_Datatype t = mpi_type(datatype, &bytes);
    if (t == MPI_DATATYPE_NULL) return fail("ncclBroadcast: type");
    ncclResult_t r = run_stream(stream);
    if (r != ncclSuccess) return r;
    if (comm->rank == root && sendbuff != recvbuff) memmove(recvbuff, sendbuff, count * bytes);
    if (comm->comm == MPI_COMM_NULL) return ncclSuccess;
    return in_pieces(count, [&](size_t o, int n) {
        return MPI_Bcast((char *)recvbuff + o * bytes, n, t, root, comm->comm);
    });
}

ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
    size_t bytes;
    MPI_Datatype t = mpi_type(datatype, &bytes);
    if (t == MPI_DATATYPE_NULL || comm->comm == MPI_COMM_NULL) return fail("ncclSend: type or peer");
    ncclResult_t r = run_stream(stream);
    if (r != ncclSuccess) return r;
    return in_pieces(count, [&](size_t o, int n) {
        return MPI_Send((const char *)sendbuff + o * bytes, n, t, peer, 77, comm->comm);
    });
}

ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
    size_t bytes;
    MPI_Datatype t = mpi_type(datatype, &bytes);
    if (t == MPI_DATATYPE_NULL || comm->comm == MPI_COMM_NULL) return fail("ncclRecv: type or peer");
    ncclResult_t r = run_stream(stream);
    if (r != ncclSuccess) return r;
    return in_pieces(count, [&](size_t o, int n) {
        return MPI_Recv((char *)recvbuff + o * bytes, n, t, peer, 77, comm->comm, MPI_STATUS_IGNORE);
    });
}

// A group's operations run as they are issued, in the same order on every rank (the project's groups hold
// collectives only, which need no fusing to progress).
ncclResult_t ncclGroupStart(void) {
    group_depth++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
    if (group_depth == 0) return fail("ncclGroupEnd without ncclGroupStart");
    group_depth--;
    return ncclSuccess;
}

}  // extern "C"
