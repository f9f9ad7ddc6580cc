// common.c: fatal errors, warnings, checked allocation, whole-file reads and the wall clock.
#define _DEFAULT_SOURCE  // madvise, posix_memalign
#include "mlm/common.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

void mlm_fatal(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);
    fputs("mlm: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

void mlm_warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fflush(stdout);
    fputs("mlm: warning: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void mlm_set_error(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void *mlm_malloc(size_t bytes, const char *what) {
    void *p = malloc(bytes ? bytes : 1);
    if (!p)
        mlm_fatal(MLM_EXIT_FAILURE, "out of host memory allocating %zu bytes for %s; reduce train.batch_size, "
                  "data.seq_len or the model size", bytes, what);
    return p;
}

void *mlm_calloc(size_t count, size_t size, const char *what) {
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        mlm_fatal(MLM_EXIT_FAILURE, "out of host memory allocating %zu x %zu bytes for %s; reduce "
                  "train.batch_size, data.seq_len or the model size", count, size, what);
    return p;
}

void *mlm_calloc_large(size_t count, size_t size, const char *what) {
    const size_t huge = (size_t)2 << 20;
    if (size != 0 && count > SIZE_MAX / size)
        mlm_fatal(MLM_EXIT_FAILURE, "%zu x %zu bytes for %s do not fit in memory; reduce train.batch_size, "
                  "data.seq_len or the model size", count, size, what);
    size_t bytes = count * size;
    if (bytes == 0) bytes = 1;
    size_t align = bytes >= huge ? huge : 64;
    bytes = (bytes + align - 1) / align * align;  // whole pages for madvise, whole lines for vector loads
    void *p = NULL;
    if (posix_memalign(&p, align, bytes) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "out of host memory allocating %zu bytes for %s; reduce train.batch_size, "
                  "data.seq_len or the model size", bytes, what);
#ifdef MADV_HUGEPAGE
    if (align == huge) (void)madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without huge pages it still works
#endif
    memset(p, 0, bytes);
    return p;
}

char *mlm_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = mlm_malloc(n, "a string");
    memcpy(d, s, n);
    return d;
}

char *mlm_read_file(const char *path, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        fclose(f);
        errno = EISDIR;
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf) { fclose(f); errno = ENOMEM; return NULL; }
    for (;;) {
        if (len + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) { free(buf); fclose(f); errno = ENOMEM; return NULL; }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - len - 1, f);
        len += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) { free(buf); errno = EIO; return NULL; }
    buf[len] = '\0';
    if (len_out) *len_out = len;
    return buf;
}
const char *mlm_file_kind(unsigned mode) {
    return S_ISREG(mode) ? "a regular file" : S_ISDIR(mode) ? "a directory" : S_ISFIFO(mode) ? "a FIFO (named pipe)"
         : S_ISCHR(mode) ? "a character device" : S_ISBLK(mode) ? "a block device" : S_ISSOCK(mode) ? "a socket"
         : "not a regular file";
}

int mlm_open_regular(const char *path, const char *what, uint64_t max_bytes, uint64_t *size_out, char *err,
                     size_t errlen) {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before fstat could refuse it.
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        mlm_set_error(err, errlen, "%s: cannot open the %s: %s", path, what, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        mlm_set_error(err, errlen, "%s: cannot read the %s: %s", path, what, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        mlm_set_error(err, errlen, "%s: the %s is %s, not a regular file; give the file itself", path, what,
                      mlm_file_kind(st.st_mode));
        close(fd);
        return -1;
    }
    if (max_bytes && (uint64_t)st.st_size > max_bytes) {
        mlm_set_error(err, errlen, "%s: the %s is %llu bytes, more than the %llu a %s may have; is it the right file?",
                      path, what, (unsigned long long)st.st_size, (unsigned long long)max_bytes, what);
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    if (size_out) *size_out = (uint64_t)st.st_size;
    return fd;
}

char *mlm_read_regular(const char *path, const char *what, uint64_t max_bytes, size_t *len_out, char *err,
                       size_t errlen) {
    uint64_t size;
    int fd = mlm_open_regular(path, what, max_bytes, &size, err, errlen);
    if (fd < 0) return NULL;
    // Read to the end, not just st_size bytes: a file that grows meanwhile is still held to the limit.
    size_t cap = (size_t)size + 1, len = 0;
    char *buf = malloc(cap + 1);
    for (;;) {
        if (!buf) {
            mlm_set_error(err, errlen, "%s: out of memory reading the %s", path, what);
            break;
        }
        if (len == cap) {
            char *nb = realloc(buf, (cap *= 2) + 1);
            if (!nb) { free(buf); buf = NULL; continue; }
            buf = nb;
        }
        ssize_t got = read(fd, buf + len, cap - len);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            mlm_set_error(err, errlen, "%s: cannot read the %s: %s", path, what, strerror(errno));
            free(buf);
            buf = NULL;
            break;
        }
        if (got == 0) break;
        len += (size_t)got;
        if (max_bytes && len > max_bytes) {
            mlm_set_error(err, errlen, "%s: the %s grew past the %llu bytes a %s may have while it was read", path,
                          what, (unsigned long long)max_bytes, what);
            free(buf);
            buf = NULL;
            break;
        }
    }
    close(fd);
    if (!buf) return NULL;
    buf[len] = '\0';
    if (len_out) *len_out = len;
    return buf;
}

// Digits only after an optional '-': strtoll and friends also take spaces, '+', 0x and overflow quietly.
static int plain_decimal(const char *s) {
    const char *p = s + (*s == '-');
    if (!*p) return 0;
    for (; *p; p++)
        if (*p < '0' || *p > '9') return 0;
    return 1;
}

int mlm_parse_long(const char *s, long min, long max, long *out) {
    if (!s || !plain_decimal(s)) return 1;
    errno = 0;
    long long v = strtoll(s, NULL, 10);
    if (errno == ERANGE || v < min || v > max) return 2;
    *out = (long)v;
    return 0;
}

int mlm_parse_u64(const char *s, uint64_t max, uint64_t *out) {
    if (!s || !plain_decimal(s)) return 1;
    if (s[0] == '-') return 2;
    errno = 0;
    unsigned long long v = strtoull(s, NULL, 10);
    if (errno == ERANGE || v > max) return 2;
    *out = (uint64_t)v;
    return 0;
}

void mlm_on_stop_signals(void (*handler)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

double mlm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
