// input_files.c: expanding `mlm prepare` and `mlm vocab` inputs into the files to read, each once.
//
// Why by (device, inode): a symbolic link back up the tree (`ln -s .. dir/sub/up`) made a walk by names read the
// same files 41 times (and put copies in both the train and the validation split); any two paths to one file are
// one file. Why regular files only inside directories: a FIFO blocks its reader until a writer comes, a device
// such as /dev/zero never ends; pipes are taken only when named on the command line, where they are meant.
#include "mlm/input_files.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"

static uint64_t pair_hash(uint64_t dev, uint64_t ino) {
    uint64_t x = dev * 0x9E3779B97F4A7C15ull ^ ino;
    x ^= x >> 31; x *= 0xBF58476D1CE4E5B9ull; x ^= x >> 29;
    return x;
}

// Insert (dev, ino); returns 1 if it was already there.
static int seen_before(InputFiles *in, uint64_t dev, uint64_t ino) {
    if (2 * (in->n_seen + 1) > in->cap_seen) {  // grow and rehash (load at most 1/2)
        size_t cap = in->cap_seen ? 2 * in->cap_seen : 1024;
        uint64_t *t = mlm_calloc(2 * cap, sizeof(uint64_t), "visited files");
        for (size_t i = 0; i < cap; i++) t[2 * i] = UINT64_MAX;
        for (size_t i = 0; i < in->cap_seen; i++) {
            if (in->seen[2 * i] == UINT64_MAX) continue;
            size_t k = pair_hash(in->seen[2 * i], in->seen[2 * i + 1]) & (cap - 1);
            while (t[2 * k] != UINT64_MAX) k = (k + 1) & (cap - 1);
            t[2 * k] = in->seen[2 * i];
            t[2 * k + 1] = in->seen[2 * i + 1];
        }
        free(in->seen);
        in->seen = t;
        in->cap_seen = cap;
    }
    size_t k = pair_hash(dev, ino) & (in->cap_seen - 1);
    for (; in->seen[2 * k] != UINT64_MAX; k = (k + 1) & (in->cap_seen - 1))
        if (in->seen[2 * k] == dev && in->seen[2 * k + 1] == ino) return 1;
    in->seen[2 * k] = dev;  // st_dev is never UINT64_MAX (the empty mark)
    in->seen[2 * k + 1] = ino;
    in->n_seen++;
    return 0;
}

static void add_path(InputFiles *in, const char *path, int stream) {
    if (in->n == in->cap) {
        in->cap = in->cap ? 2 * in->cap : 64;
        in->paths = realloc(in->paths, in->cap * sizeof(char *));
        in->stream = realloc(in->stream, in->cap);
        if (!in->paths || !in->stream) mlm_fatal(MLM_EXIT_FAILURE, "out of memory listing the inputs");
    }
    in->paths[in->n] = mlm_strdup(path);
    in->stream[in->n++] = (unsigned char)stream;
}

static int same_file(const struct stat *st, const char *other) {
    struct stat o;
    return other && stat(other, &o) == 0 && o.st_dev == st->st_dev && o.st_ino == st->st_ino;
}

static int holds_marker(const char *dir, const char *marker) {
    if (!marker) return 0;
    size_t n = strlen(dir) + strlen(marker) + 2;
    char *p = mlm_malloc(n, "a path");
    snprintf(p, n, "%s/%s", dir, marker);
    int yes = access(p, F_OK) == 0;
    free(p);
    return yes;
}

static void remember(char *slot, const char *path) {
    if (!slot[0]) snprintf(slot, 512, "%s", path);
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void walk(InputFiles *in, const char *dir, const InputRules *r) {
    DIR *d = opendir(dir);
    if (!d) mlm_fatal(MLM_EXIT_USAGE, "cannot read directory %s: %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;  // hidden names, "." and ".."
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            names = realloc(names, cap * sizeof(char *));
            if (!names) mlm_fatal(MLM_EXIT_FAILURE, "out of memory listing %s", dir);
        }
        names[n++] = mlm_strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof(char *), by_name);  // name order: the inputs do not depend on the file system's order
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(dir) + strlen(names[i]) + 2;
        char *path = mlm_malloc(len, "a path");
        snprintf(path, len, "%s/%s", dir, names[i]);
        struct stat st;
        if (stat(path, &st) != 0) {
            in->unreadable++;  // a dangling link, or gone meanwhile
        } else if (S_ISDIR(st.st_mode)) {
            if (same_file(&st, r->skip_dir)) {
                // the output directory inside an input: its files are not text
            } else if (holds_marker(path, r->set_marker)) {
                in->sets++;
                remember(in->first_set, path);
            } else if (seen_before(in, (uint64_t)st.st_dev, (uint64_t)st.st_ino)) {
                in->again++;
            } else {
                walk(in, path, r);
            }
        } else if (S_ISREG(st.st_mode)) {
            if (seen_before(in, (uint64_t)st.st_dev, (uint64_t)st.st_ino)) in->again++;
            else add_path(in, path, 0);
        } else {
            in->special++;
            remember(in->first_special, path);
        }
        free(path);
        free(names[i]);
    }
    free(names);
}

void input_files_add(InputFiles *in, const char *arg, const InputRules *r) {
    if (!strcmp(arg, "-")) {
        for (size_t i = 0; i < in->n; i++)
            if (!strcmp(in->paths[i], "-")) mlm_fatal(MLM_EXIT_USAGE, "standard input (-) given twice");
        add_path(in, "-", 1);
        return;
    }
    struct stat st;
    if (stat(arg, &st) != 0) mlm_fatal(MLM_EXIT_USAGE, "cannot read input %s: %s", arg, strerror(errno));
    if (S_ISDIR(st.st_mode)) {
        if (same_file(&st, r->skip_dir))
            mlm_fatal(MLM_EXIT_USAGE, "input %s is the output directory; give the text files or directories to read",
                      arg);
        if (holds_marker(arg, r->set_marker))
            mlm_fatal(MLM_EXIT_USAGE, "input %s is a prepared shard set (it holds %s), not text; give the text it was "
                      "made from", arg, r->set_marker);
        if (!seen_before(in, (uint64_t)st.st_dev, (uint64_t)st.st_ino)) walk(in, arg, r);
        else in->again++;
    } else if (S_ISREG(st.st_mode)) {
        if (!seen_before(in, (uint64_t)st.st_dev, (uint64_t)st.st_ino)) add_path(in, arg, 0);
        else in->again++;
    } else if (S_ISFIFO(st.st_mode)) {
        add_path(in, arg, 1);  // a pipe named on purpose, e.g. <(zcat corpus.gz)
    } else {
        mlm_fatal(MLM_EXIT_USAGE, "input %s is %s, not text; give regular files, directories, pipes or - for standard "
                  "input", arg, mlm_file_kind(st.st_mode));
    }
}

void input_files_report(const InputFiles *in, const char *cmd) {
    if (in->again)
        fprintf(stderr, "%s: %zu paths led to files or directories already taken (links, or an input named twice); "
                "each file is read once\n", cmd, in->again);
    if (in->special)
        fprintf(stderr, "%s: left out %zu entries that are not regular files (FIFOs, devices, sockets), e.g. %s\n", cmd,
                in->special, in->first_special);
    if (in->sets)
        fprintf(stderr, "%s: left out %zu prepared shard sets found among the inputs (their files are not text), e.g. "
                "%s\n", cmd, in->sets, in->first_set);
    if (in->unreadable)
        fprintf(stderr, "%s: left out %zu entries that could not be read (dangling links?)\n", cmd, in->unreadable);
}

void input_files_free(InputFiles *in) {
    for (size_t i = 0; i < in->n; i++) free(in->paths[i]);
    free(in->paths);
    free(in->stream);
    free(in->seen);
    memset(in, 0, sizeof(*in));
}
