// test_vocab_command.c: `mlm vocab` end to end: the same vocab.txt from a file, from standard input, on 1 or 2
// threads, with a block boundary forced inside the text (MLM_VOCAB_BLOCK_BYTES), and from a directory holding
// the corpus in two pieces; --no-lowercase keeps capitals; bad usage exits 2 and bad input 1, each with a message
// naming the problem, and a failed run leaves an existing output file as it was. (~2 s)
// Usage: test_vocab_command MLM CORPUS
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/common.h"
#include "test_util.h"

static char dir[] = "/tmp/mlm_vocab_cmd_XXXXXX";
static const char *mlm, *corpus;

static int same_file(const char *a, const char *b) {
    size_t la, lb;
    char *x = mlm_read_file(a, &la), *y = mlm_read_file(b, &lb);
    int same = x && y && la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

static int file_has(const char *path, const char *needle) {
    size_t n;
    char *x = mlm_read_file(path, &n);
    int has = x && strstr(x, needle) != NULL;
    free(x);
    return has;
}

// Run `mlm vocab ARGS` with stderr to dir/err.txt; the exit status.
static int vocab(const char *args) { return test_run("%s vocab %s 2>%s/err.txt", mlm, args, dir); }

static void expect_error(const char *args, int code, const char *needle) {
    char err[600];
    snprintf(err, sizeof err, "%s/err.txt", dir);
    int rc = vocab(args);
    CHECK(rc == code && file_has(err, needle), "mlm vocab %s: exit %d (want %d), message without \"%s\"", args, rc,
          code, needle);
}

int main(int argc, char **argv) {
    if (argc < 3) return test_skip("usage: test_vocab_command MLM CORPUS");
    mlm = argv[1];
    corpus = argv[2];
    if (access(corpus, R_OK) != 0) return test_skip("the corpus is missing");
    if (!mkdtemp(dir)) return test_skip("mkdtemp failed");
    char a[600], b[600], c[600], d[600], e[600], args[2048];
    snprintf(a, sizeof a, "%s/a.txt", dir);
    snprintf(b, sizeof b, "%s/b.txt", dir);
    snprintf(c, sizeof c, "%s/c.txt", dir);
    snprintf(d, sizeof d, "%s/d.txt", dir);
    snprintf(e, sizeof e, "%s/e.txt", dir);

    snprintf(args, sizeof args, "-q --size 3000 --threads 1 --out %s %s", a, corpus);
    CHECK(vocab(args) == 0, "mlm vocab %s failed", args);
    snprintf(args, sizeof args, "-q --size 3000 --threads 2 --out %s - < %s", b, corpus);
    CHECK(vocab(args) == 0 && same_file(a, b), "standard input on 2 threads gives another vocabulary");
    // 64 KiB blocks: the text is counted in many blocks, each cut at a word end.
    CHECK(test_run("MLM_VOCAB_BLOCK_BYTES=65536 %s vocab -q --size 3000 --threads 2 --out %s %s", mlm, c, corpus) == 0 &&
              same_file(a, c), "counting in 64 KiB blocks gives another vocabulary");
    // A directory with the corpus in two files, cut at a line (sub/, and a hidden file that is skipped).
    CHECK(test_run("mkdir -p %s/in/sub && split -n l/2 %s %s/in/sub/part && echo ZZZZ > %s/in/.hidden", dir, corpus,
                   dir, dir) == 0, "preparing the directory failed");
    snprintf(args, sizeof args, "-q --size 3000 --out %s %s/in", d, dir);
    CHECK(vocab(args) == 0 && same_file(a, d), "the corpus in a directory of two files gives another vocabulary");
    size_t n;
    char *text = mlm_read_file(a, &n);
    CHECK(text && strncmp(text, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", 30) == 0, "the specials do not come first");
    size_t lines = 0;
    for (size_t i = 0; text && i < n; i++) lines += text[i] == '\n';
    CHECK(lines == 3000, "%zu lines, want 3000", lines);
    free(text);
    snprintf(args, sizeof args, "-q --size 3000 --no-lowercase --out %s %s", e, corpus);
    CHECK(vocab(args) == 0 && file_has(e, "\nKING\n") && !file_has(a, "\nKING\n") && file_has(a, "\nking\n"),
          "--no-lowercase should keep capitals (KING) and the default lower-case them");

    // Errors: usage (2) and input (1), with an existing output left alone.
    snprintf(args, sizeof args, "--out %s %s", b, corpus);
    expect_error(args, 2, "--size");
    snprintf(args, sizeof args, "--size 100 %s", corpus);
    expect_error(args, 2, "--out");
    snprintf(args, sizeof args, "--size 100 --out %s", b);
    expect_error(args, 2, "no input");
    snprintf(args, sizeof args, "--size 12x --out %s %s", b, corpus);
    expect_error(args, 2, "whole number");
    snprintf(args, sizeof args, "--size 100 --out %s %s/missing.txt", b, dir);
    expect_error(args, 2, "missing.txt");
    snprintf(args, sizeof args, "--size 100 --out %s %s", dir, corpus);
    expect_error(args, 2, "is a directory");
    snprintf(args, sizeof args, "--size 100 --out %s/nodir/v.txt %s", dir, corpus);
    expect_error(args, 2, "nodir");
    CHECK(test_run("printf '  \\n\\t\\n' > %s/blank.txt", dir) == 0, "blank file");
    snprintf(args, sizeof args, "--size 100 --out %s %s/blank.txt", b, dir);
    expect_error(args, 1, "no words");
    CHECK(same_file(a, b), "a failed run changed the existing output file");

    test_run("rm -rf %s", dir);
    return test_finish("test_vocab_command");
}
