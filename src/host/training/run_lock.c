// run_lock.c: the run directory's lock (flock on RUN_DIR/lock, with the holder's pid inside for messages).
#include "mlm/run_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"

static long read_pid(int fd) {
    char buf[32] = {0};
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
    return n > 0 ? strtol(buf, NULL, 10) : 0;
}

int run_lock_acquire(const char *run_dir, RunLock *lk, char *err, size_t errlen) {
    lk->fd = -1;
    snprintf(lk->path, sizeof(lk->path), "%s/" RUN_LOCK_FILE, run_dir);
    // A releasing process deletes the file while holding the lock; whoever locked the deleted file's inode in
    // the meantime must retry on the new file, or two processes would each hold "the" lock.
    for (int attempt = 0; attempt < 100; attempt++) {
        int fd = open(lk->path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0) {
            snprintf(err, errlen, "cannot create the lock file %s: %s", lk->path, strerror(errno));
            return 1;
        }
        if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
            int e = errno;
            long pid = read_pid(fd);
            close(fd);
            if (e == EWOULDBLOCK)
                snprintf(err, errlen, "%s is in use by another mlm process (pid %ld, lock file %s); wait for it to "
                         "finish or stop it (kill %ld), or use another --out directory", run_dir, pid, lk->path,
                         pid);
            else
                snprintf(err, errlen, "cannot lock %s: %s", lk->path, strerror(e));
            return 1;
        }
        struct stat by_fd, by_name;
        if (fstat(fd, &by_fd) != 0 || stat(lk->path, &by_name) != 0 || by_fd.st_ino != by_name.st_ino ||
            by_fd.st_dev != by_name.st_dev) {
            close(fd);
            continue;
        }
        long stale = read_pid(fd);
        if (stale > 0 && stale != (long)getpid())
            mlm_warn("taking over the lock of %s left by pid %ld, a process that ended without releasing it (killed?)",
                     run_dir, stale);
        char pid[32];
        int n = snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
        if (ftruncate(fd, 0) != 0 || pwrite(fd, pid, (size_t)n, 0) != n) {
            snprintf(err, errlen, "cannot write the lock file %s: %s", lk->path, strerror(errno));
            close(fd);
            return 1;
        }
        lk->fd = fd;
        return 0;
    }
    snprintf(err, errlen, "cannot lock %s: it keeps being replaced", lk->path);
    return 1;
}

void run_lock_release(RunLock *lk) {
    if (lk->fd < 0) return;
    unlink(lk->path);
    close(lk->fd);
    lk->fd = -1;
}
