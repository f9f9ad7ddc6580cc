// test_util.c: assertion helpers and tolerances shared by the tests.
#include "test_util.h"

#include "mlm/common.h"
#include "mlm/shards.h"

#include <math.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int t_checks = 0, t_failures = 0;

double max_rel_err(const float *a, const float *b, size_t n, double floor, size_t *where) {
    double worst = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double denom = fabs((double)b[i]);
        if (denom < floor) denom = floor;
        double e = fabs((double)a[i] - (double)b[i]) / denom;
        if (e > worst || isnan(e)) { worst = isnan(e) ? INFINITY : e; at = i; }
    }
    if (where) *where = at;
    return worst;
}

double max_abs_err(const float *a, const float *b, size_t n, size_t *where) {
    double worst = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)b[i]);
        if (e > worst || isnan(e)) { worst = isnan(e) ? INFINITY : e; at = i; }
    }
    if (where) *where = at;
    return worst;
}

int test_finish(const char *name) {
    printf("%s: %d checks, %d failed\n", name, t_checks, t_failures);
    return t_failures ? 1 : 0;
}

int test_skip(const char *why) {
    printf("SKIP: %s\n", why);
    return TEST_SKIP;
}

const char *test_corpus_path(int argc, char **argv) {
    const char *p = argc > 1 ? argv[1] : getenv("MLM_TEST_CORPUS");
    if (!p) { printf("no corpus path given (argv[1] or MLM_TEST_CORPUS)\n"); return NULL; }
    if (access(p, R_OK) != 0) { printf("corpus %s is not readable\n", p); return NULL; }
    return p;
}

int test_run(const char *fmt, ...) {
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof(cmd), fmt, ap);
    va_end(ap);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

pid_t test_spawn(const char *bin, const char *args, const char *log, int append) {
    char buf[4096];
    snprintf(buf, sizeof(buf), "%s", args);
    char *argv[128];
    int n = 0;
    argv[n++] = (char *)bin;
    for (char *tok = strtok(buf, " "); tok && n < 127; tok = strtok(NULL, " ")) argv[n++] = tok;
    argv[n] = NULL;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0644);
        if (fd >= 0) { dup2(fd, 1); dup2(fd, 2); }
        execv(bin, argv);
        _exit(127);
    }
    return pid;
}

int test_wait(pid_t pid) {
    int st;
    if (waitpid(pid, &st, 0) != pid) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

int test_train_losses(const char *run_dir, char losses[][32], int max) {
    char path[512];
    snprintf(path, sizeof(path), "%s/metrics.jsonl", run_dir);
    char *text = mlm_read_file(path, NULL);
    if (!text) return -1;
    int n = 0;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        const char *s = strstr(line, "\"step\":"), *l = strstr(line, "\"loss\":");
        if (!strstr(line, "\"kind\":\"train\"") || !s || !l) continue;
        long step = strtol(s + 7, NULL, 10);
        if (step < 1 || step > max) continue;
        snprintf(losses[step - 1], 32, "%.*s", (int)strcspn(l + 7, ",}"), l + 7);
        n++;
    }
    free(text);
    return n;
}

int test_file_contains(const char *path, const char *needle) {
    size_t len;
    char *t = mlm_read_file(path, &len);
    int yes = t && strstr(t, needle) != NULL;
    free(t);
    return yes;
}

int test_same_file(const char *a, const char *b) {
    size_t la, lb;
    char *x = mlm_read_file(a, &la), *y = mlm_read_file(b, &lb);
    int same = x && y && la == lb && !memcmp(x, y, la);
    free(x);
    free(y);
    return same;
}

uint64_t test_shard_set_token(const char *path, uint64_t i, uint32_t id) {
    size_t len;
    unsigned char *d = (unsigned char *)mlm_read_file(path, &len);
    if (!d || len < SHARD_HEADER_BYTES + 2 * (i + 1)) {
        fprintf(stderr, "test_shard_set_token: cannot read token %llu of %s\n", (unsigned long long)i, path);
        exit(1);
    }
    uint16_t v = (uint16_t)id;
    memcpy(d + SHARD_HEADER_BYTES + 2 * i, &v, 2);
    uint64_t h = shard_fnv1a(SHARD_FNV_INIT, d + SHARD_HEADER_BYTES, len - SHARD_HEADER_BYTES);
    memcpy(d + 56, &h, 8);  // header: payload hash at 56, the header's own hash (of bytes 0..63) at 64
    uint64_t hh = shard_fnv1a(SHARD_FNV_INIT, d, 64);
    memcpy(d + 64, &hh, 8);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(d, 1, len, f) != len || fclose(f) != 0) {
        fprintf(stderr, "test_shard_set_token: cannot write %s\n", path);
        exit(1);
    }
    free(d);
    return h;
}
