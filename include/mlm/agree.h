// agree.h: the ranks of a data-parallel job check at start-up that they run the same thing (issue 22, bug 2):
// named values (configuration keys, the data set's identity, the state a run starts from) are hashed, every
// rank's hashes are gathered on every rank, and when any rank's differ from rank 0's all ranks refuse together,
// rank 0 naming each differing key with its value on rank 0 and on the ranks that differ.
//
// Without the check, ranks with another learning rate, seed, dropout or sparse prediction trained silently to a
// worse model, another train.max_steps hung until train.dist_timeout, and another batch size or train.zero
// aborted inside the MPI library.
#ifndef MLM_AGREE_H
#define MLM_AGREE_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/dist.h"

#ifdef __cplusplus
extern "C" {
#endif

// 64-bit hash of bytes (FNV-1a over 8-byte words, then a final mix): for values and whole parameter arrays.
uint64_t agree_hash(const void *data, size_t bytes, uint64_t seed);

// `what` names the set in the message ("configuration", "starting state"), `advice` ends it (what to do).
// names[n] must be the same list on every rank (a different list, e.g. another mlm build, is refused too).
// values[i] is the text compared (by its hash) and shown (its first 44 characters). Returns 1 when every rank
// holds rank 0's values, 0 when nothing was checked: one process, or ranks without MPI to exchange them (RANK /
// WORLD_SIZE without mpirun). Otherwise rank 0 prints why to stderr and every rank leaves MPI and exits with 2.
int dist_require_same(const Dist *d, const char *what, const char *advice, int n, const char *const *names,
                      const char *const *values);

#ifdef __cplusplus
}
#endif

#endif
