// run_lock.h: one training process per run directory: an flock(2)ed lock file holding the owner's pid.
//
// The kernel drops an flock when its process dies, however it dies (kill -9 included), so a lock file left by
// a dead process is simply taken over; only a live holder refuses a second process.
#ifndef MLM_RUN_LOCK_H
#define MLM_RUN_LOCK_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RUN_LOCK_FILE "lock"

typedef struct {
    int fd;          // -1 when not held
    char path[1100];
} RunLock;

// Take RUN_DIR/lock (creating it) and write this process's pid into it. Returns 0; or nonzero with a message
// naming the holder's pid when another live process holds it, or why the file cannot be used.
int run_lock_acquire(const char *run_dir, RunLock *lk, char *err, size_t errlen);
// Delete the lock file and release the lock (no-op if not held).
void run_lock_release(RunLock *lk);

#ifdef __cplusplus
}
#endif

#endif
