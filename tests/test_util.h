// test_util.h: assertion helpers for the test executables (they count checks and print the failures).
#ifndef MLM_TEST_UTIL_H
#define MLM_TEST_UTIL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#define TEST_SKIP 77

extern int t_checks, t_failures;

#define CHECK(cond, ...)                                                          \
    do {                                                                          \
        t_checks++;                                                               \
        if (!(cond)) {                                                            \
            t_failures++;                                                         \
            fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                         \
            fputc('\n', stderr);                                                  \
        }                                                                         \
    } while (0)

// Relative error |a - b| / max(|b|, floor) elementwise; returns the largest and records where.
double max_rel_err(const float *a, const float *b, size_t n, double floor, size_t *where);
double max_abs_err(const float *a, const float *b, size_t n, size_t *where);

// Print "name: N checks, F failed" and return the process exit code (0 or 1).
int test_finish(const char *name);
// Print "SKIP: <why>" and return TEST_SKIP.
int test_skip(const char *why);

// Run a shell command built like printf; returns its exit status (128 + signal if it was killed).
int test_run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// Start `bin ARGS` (ARGS split on spaces) as a direct child, no shell in between, so that a signal sent to the
// returned pid reaches the program itself; its stdout and stderr go to `log`, appended to or truncated.
pid_t test_spawn(const char *bin, const char *args, const char *log, int append);
// Wait for a child; its exit status, or 128 + the signal that ended it.
int test_wait(pid_t pid);

// Train-loss strings of RUN_DIR/metrics.jsonl by step: losses[step - 1] for steps 1..max (metrics print losses
// with %.9g, so equal strings mean equal floats). Returns how many train lines there are in that range (a step
// logged twice counts twice), or -1 without a metrics file.
int test_train_losses(const char *run_dir, char losses[][32], int max);

// 1 if the file at path contains `needle` (0 if it cannot be read); 1 if two files hold the same bytes.
int test_file_contains(const char *path, const char *needle);
int test_same_file(const char *a, const char *b);

// Rewrite token i (2-byte ids) of the shard file at path to `id` with its payload and header checksums made valid
// again, as a buggy writer or a crafted file would leave it; returns the new payload hash (the manifest's entry).
uint64_t test_shard_set_token(const char *path, uint64_t i, uint32_t id);

// Path of the corpus for tests: $MLM_TEST_CORPUS or argv[1]; NULL (and a printed reason) if unreadable.
const char *test_corpus_path(int argc, char **argv);

#endif
