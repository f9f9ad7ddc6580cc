// fuzz_util.h: helpers shared by the libFuzzer harnesses: inputs as files (the readers take paths), NUL-
// terminated copies, and a failure that libFuzzer records as a crash with the input that caused it.
#ifndef MLM_FUZZ_UTIL_H
#define MLM_FUZZ_UTIL_H

#define _GNU_SOURCE
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ftw.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/config.h"

// A property of the code under test does not hold: print why and abort, which libFuzzer reports as a crash
// and saves the input (crash-<sha1>) for reproduction: ./fuzz_NAME crash-<sha1>.
__attribute__((noreturn, format(printf, 1, 2))) static inline void fuzz_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("fuzz property failed: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

// The input as a file, for readers that take a path: one in-memory file (memfd) per process, rewritten for
// every input, named /proc/self/fd/N (a regular file to stat and fopen; nothing touches the disk).
static inline const char *fuzz_input_file(const uint8_t *data, size_t size) {
    static int fd = -1;
    static char path[64];
    if (fd < 0) {
        fd = memfd_create("mlm-fuzz-input", 0);
        if (fd < 0) { perror("memfd_create"); abort(); }
        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    }
    if (ftruncate(fd, 0) != 0 || (size && pwrite(fd, data, size, 0) != (ssize_t)size)) { perror("memfd"); abort(); }
    return path;
}

static char fuzz_scratch[64];

static int fuzz_remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

static void fuzz_remove_scratch(void) {
    if (fuzz_scratch[0]) nftw(fuzz_scratch, fuzz_remove_entry, 8, FTW_DEPTH | FTW_PHYS);
}

// A scratch directory for writers (atomic writes need a real directory): under /dev/shm where it exists
// (fsync is free on tmpfs), else /tmp. Created once per process, its files overwritten input after input,
// removed when libFuzzer exits normally (a crash leaves it, beside the crash input).
static inline const char *fuzz_scratch_dir(void) {
    if (!fuzz_scratch[0]) {
        snprintf(fuzz_scratch, sizeof(fuzz_scratch), "%s/mlm-fuzz-XXXXXX",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
        if (!mkdtemp(fuzz_scratch)) { perror("mkdtemp"); abort(); }
        atexit(fuzz_remove_scratch);
    }
    return fuzz_scratch;
}

// data[0..size) as a NUL-terminated string (malloc'ed); an embedded NUL ends it as it would end a C string.
// The config as config_write prints it, every key exactly (malloc'ed): two configs with equal texts mean equal
// settings (the structs themselves can differ in bytes after a string's NUL, which no one reads).
static inline char *fuzz_config_text(const Config *c) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) abort();
    config_write(f, c);
    fclose(f);
    return buf;
}

static inline char *fuzz_cstring(const uint8_t *data, size_t size) {
    char *s = malloc(size + 1);
    if (!s) abort();
    memcpy(s, data, size);
    s[size] = '\0';
    return s;
}

#endif
