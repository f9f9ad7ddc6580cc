// test_prepare_safety.c: `mlm prepare` never eats files, and reads what it is given once (issue 22, bugs 5-10 and
// the second message of 12), each with the command a user types:
//   5  two prepares into one directory: the second is refused while the first holds the lock (held by this test,
//      and raced for real in background pairs); whatever the race, the directory ends with a set that verifies
//      and is exactly one of the two, and no staging left;
//   6  a directory with the user's own files (train-final-model.bin, valid-results.bin, vocab.txt, a file named
//      lock): untouched by a prepare and a --force prepare; --force with a bad --vocab or invalid UTF-8 leaves the
//      old set whole; a replaced set's shard folder is gone, nothing else;
//   7  a symbolic link back up the tree (and a second link to a file): every file read once;
//   8  a shard set among the inputs is left out (and refused when named), the output directory inside an input is
//      left out; invalid UTF-8 refused by char and wordpiece alike (file and byte named), or with --invalid-utf8
//      skip dropped and counted, giving the shards of the text without those bytes;
//   9  the char tokenizer given a pipe or standard input: the shards of the file itself;
//   10 a FIFO as a shard, vocab.txt linked to /dev/zero, --vocab /dev/zero, a FIFO inside the inputs of `mlm vocab`
//      and `mlm prepare`: refused or left out at once (each command under `timeout`, so a hang fails the test);
//   12 a closed standard input, a directory on standard input: named, and nothing left behind.
// Also kill -9 at random moments of a --force prepare: the directory always holds a whole set (old or new).
// Usage: test_prepare_safety MLM CORPUS (label data; about 20 s).
#define _DEFAULT_SOURCE  // realpath
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/run_lock.h"
#include "mlm/shards.h"
#include "test_util.h"

static const char *mlm;
static char tmp[256];

#define log_has test_file_contains
#define same_bytes test_same_file

// The set at dir opens and every byte verifies; its manifest in *m (caller frees) when m is not NULL.
static int set_ok(const char *dir, Manifest *m, char *err, size_t errlen) {
    ShardSet s;
    if (shard_set_open(&s, dir, err, errlen)) return 0;
    ShardVerifyResult r;
    int ok = shard_set_verify(&s, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, NULL, 0, 1, &r, err, errlen) == 0;
    if (ok && m) manifest_read(m, dir, err, errlen);
    shard_set_close(&s);
    return ok;
}

// The shards a set holds, as "split tokens docs hash" lines (what must be equal for two sets to hold one text).
static void shard_list(const char *dir, char *out, size_t outlen) {
    Manifest m;
    char err[2048];
    out[0] = '\0';
    if (manifest_read(&m, dir, err, sizeof(err))) {
        snprintf(out, outlen, "unreadable: %s", err);
        return;
    }
    size_t k = 0;
    for (int i = 0; i < m.n_shards && k < outlen; i++)
        k += (size_t)snprintf(out + k, outlen - k, "%s %" PRIu64 " %" PRIu64 " %016" PRIx64 "\n", m.shards[i].split,
                              m.shards[i].n_tokens, m.shards[i].n_docs, m.shards[i].payload_hash);
    manifest_free(&m);
}

static int count_entries(const char *dir, const char *prefix) {
    char cmd[1200];
    snprintf(cmd, sizeof(cmd), "ls -A %s | grep -c '^%s' > %s/count.txt", dir, prefix, tmp);
    test_run("%s", cmd);
    char path[400];
    snprintf(path, sizeof(path), "%s/count.txt", tmp);
    size_t len;
    char *t = mlm_read_file(path, &len);
    int n = t ? atoi(t) : -1;
    free(t);
    return n;
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    CHECK(f && fputs(text, f) >= 0 && fclose(f) == 0, "cannot write %s", path);
}

// ---- 5: the lock

static void test_lock(void) {
    char d[400], err[1400];
    snprintf(d, sizeof(d), "%s/locked", tmp);
    mkdir(d, 0755);
    RunLock lk;
    CHECK(run_lock_acquire(d, &lk, err, sizeof(err)) == 0, "%s", err);
    int rc = test_run("%s prepare -q -t byte --out %s %s/a.txt > %s/lock.log 2>&1", mlm, d, tmp, tmp);
    char want[64], log[400];
    snprintf(log, sizeof(log), "%s/lock.log", tmp);
    snprintf(want, sizeof(want), "in use by another mlm process (pid %d", (int)getpid());
    CHECK(rc == 2 && log_has(log, want), "a locked directory is refused (exit %d)", rc);
    char m[500];
    snprintf(m, sizeof(m), "%s/manifest.txt", d);
    CHECK(access(m, F_OK) != 0 && count_entries(d, "shards-") == 0, "and nothing is written there");
    run_lock_release(&lk);
    // Two prepares racing for one directory (the issue: 1 of 10 char trials left a manifest over the other job's
    // shards, 2 of 10 WordPiece trials a set that is refused). Whatever the order, the directory ends holding one
    // job's whole set.
    char ref_a[4096], ref_b[4096];
    snprintf(d, sizeof(d), "%s/ref_a", tmp);
    CHECK(test_run("%s prepare -q -t char --valid-fraction 0.2 --documents blank --out %s %s/a.txt", mlm, d, tmp) == 0, "ref a");
    shard_list(d, ref_a, sizeof(ref_a));
    snprintf(d, sizeof(d), "%s/ref_b", tmp);
    CHECK(test_run("%s prepare -q -t char --valid-fraction 0.2 --documents blank --out %s %s/b.txt", mlm, d, tmp) == 0, "ref b");
    shard_list(d, ref_b, sizeof(ref_b));
    int wins = 0, refusals = 0;
    for (int trial = 0; trial < 4; trial++) {
        snprintf(d, sizeof(d), "%s/race%d", tmp, trial);
        rc = test_run("cd %s && { (%s prepare -q --force -t char --valid-fraction 0.2 --documents blank --out %s a.txt "
                      "> race%d-a.log 2>&1; echo $? > race%d-a.rc) & (%s prepare -q --force -t char --valid-fraction "
                      "0.2 --documents blank --out %s b.txt > race%d-b.log 2>&1; echo $? > race%d-b.rc) & wait; }",
                      tmp, mlm, d, trial, trial, mlm, d, trial, trial);
        char have[4096];
        CHECK(set_ok(d, NULL, err, sizeof(err)), "race %d: the directory holds a set that verifies: %s", trial, err);
        shard_list(d, have, sizeof(have));
        CHECK(!strcmp(have, ref_a) || !strcmp(have, ref_b), "race %d: the set is one job's, whole", trial);
        CHECK(count_entries(d, "shards-") == 1 && count_entries(d, "\\.prepare") == 0 && count_entries(d, "lock") == 0,
              "race %d: one shard folder, no staging or lock left", trial);
        for (int j = 0; j < 2; j++) {
            char rcp[400], lg[400];
            snprintf(rcp, sizeof(rcp), "%s/race%d-%c.rc", tmp, trial, "ab"[j]);
            snprintf(lg, sizeof(lg), "%s/race%d-%c.log", tmp, trial, "ab"[j]);
            size_t len;
            char *t = mlm_read_file(rcp, &len);
            int code = t ? atoi(t) : -1;
            free(t);
            wins += code == 0;
            refusals += code == 2 && log_has(lg, "in use by another mlm process");
            CHECK(code == 0 || (code == 2 && log_has(lg, "in use by another mlm process")),
                  "race %d job %c: exit %d (0, or refused by the lock)", trial, "ab"[j], code);
        }
    }
    printf("lock: 4 races, %d jobs finished, %d refused by the lock\n", wins, refusals);
}

// ---- 6: the user's files, and --force that fails

static void test_user_files(void) {
    char d[400], ref[400], err[2048];
    snprintf(d, sizeof(d), "%s/userdir", tmp);
    snprintf(ref, sizeof(ref), "%s/userref", tmp);
    test_run("mkdir -p %s %s", d, ref);
    static const char *const names[] = {"train-final-model.bin", "valid-results.bin", "vocab.txt", "notes.txt",
                                        "train-00000.bin"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char p[600];
        snprintf(p, sizeof(p), "%s/%s", d, names[i]);
        write_text(p, names[i]);  // each file holds its own name
        snprintf(p, sizeof(p), "%s/%s", ref, names[i]);
        write_text(p, names[i]);
    }
    CHECK(test_run("%s prepare -q -t wordpiece --vocab %s/vocab.txt --documents blank --valid-fraction 0.2 --out %s "
                   "%s/a.txt", mlm, tmp, d, tmp) == 0, "prepare into a directory with other files");
    CHECK(set_ok(d, NULL, err, sizeof(err)), "the set verifies: %s", err);
    char first_folder[64] = "";
    Manifest m;
    if (manifest_read(&m, d, err, sizeof(err)) == 0) {
        snprintf(first_folder, sizeof(first_folder), "%s", m.shard_dir);
        manifest_free(&m);
    }
    CHECK(test_run("%s prepare -q --force -t byte --documents blank --valid-fraction 0.2 --out %s %s/b.txt", mlm, d,
                   tmp) == 0, "--force replaces it");
    char gone[600];
    snprintf(gone, sizeof(gone), "%s/%s", d, first_folder);
    CHECK(first_folder[0] && access(gone, F_OK) != 0 && count_entries(d, "shards-") == 1,
          "the replaced set's shard folder is gone, only the new one is there");
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char a[600], b[600];
        snprintf(a, sizeof(a), "%s/%s", d, names[i]);
        snprintf(b, sizeof(b), "%s/%s", ref, names[i]);
        CHECK(same_bytes(a, b), "the user's %s is untouched (it was deleted or overwritten)", names[i]);
    }
    // --force whose inputs fail: the old set stays, whole.
    char before[4096], after[4096], log[400];
    shard_list(d, before, sizeof(before));
    snprintf(log, sizeof(log), "%s/force.log", tmp);
    int rc = test_run("%s prepare -q --force -t wordpiece --vocab %s/typo.txt --out %s %s/a.txt > %s 2>&1", mlm, tmp, d,
                      tmp, log);
    shard_list(d, after, sizeof(after));
    CHECK(rc == 2 && !strcmp(before, after) && set_ok(d, NULL, err, sizeof(err)),
          "--force --vocab typo.txt: refused (exit %d) and the old set is whole", rc);
    for (int tk = 0; tk < 2; tk++) {
        char vocab[500] = "";
        if (tk) snprintf(vocab, sizeof(vocab), "--vocab %s/vocab.txt", tmp);
        rc = test_run("%s prepare -q --force -t %s %s --out %s %s/a.txt %s/bad.txt > %s 2>&1", mlm,
                      tk ? "wordpiece" : "char", vocab, d, tmp, tmp, log);
        shard_list(d, after, sizeof(after));
        CHECK(rc == 1 && log_has(log, "bad.txt: invalid UTF-8 at byte 9") && !strcmp(before, after) &&
              set_ok(d, NULL, err, sizeof(err)) && count_entries(d, "\\.prepare") == 0,
              "--force with invalid UTF-8 (%s): refused (exit %d) naming the byte, the old set whole, no staging left",
              tk ? "wordpiece" : "char", rc);
    }
    // A file named lock that is not an mlm lock is the user's.
    char lockd[400], lockf[500];
    snprintf(lockd, sizeof(lockd), "%s/userlock", tmp);
    mkdir(lockd, 0755);
    snprintf(lockf, sizeof(lockf), "%s/lock", lockd);
    write_text(lockf, "my lock notes\n");
    rc = test_run("%s prepare -q -t byte --out %s %s/a.txt > %s 2>&1", mlm, lockd, tmp, log);
    CHECK(rc == 2 && log_has(log, "not an mlm lock file") && log_has(lockf, "my lock notes"),
          "a user's file named lock is neither overwritten nor deleted (exit %d)", rc);
}

// ---- 7 and 8: what is read

static uint64_t manifest_u64(const char *dir, const char *key) {
    Manifest m;
    char err[2048];
    if (manifest_read(&m, dir, err, sizeof(err))) return UINT64_MAX;
    uint64_t v = !strcmp(key, "source_bytes") ? m.source_bytes : !strcmp(key, "train_docs") ? m.train_docs
               : !strcmp(key, "invalid_utf8") ? m.invalid_utf8 : !strcmp(key, "train_tokens") ? m.train_tokens
               : UINT64_MAX;
    manifest_free(&m);
    return v;
}

static void test_links_and_sets(void) {
    char dd[400], out[400], log[400];
    snprintf(dd, sizeof(dd), "%s/dd", tmp);
    snprintf(out, sizeof(out), "%s/loopset", tmp);
    snprintf(log, sizeof(log), "%s/loop.log", tmp);
    test_run("mkdir -p %s/sub && printf 'alpha\\n' > %s/a.txt && printf 'beta\\n' > %s/sub/b.txt && ln -s .. %s/sub/up && "
             "ln -s ../a.txt %s/sub/a-again.txt", dd, dd, dd, dd, dd);
    int rc = test_run("timeout 60 %s prepare -t byte --valid-fraction 0 --out %s %s > %s 2>&1", mlm, out, dd, log);
    CHECK(rc == 0 && manifest_u64(out, "source_bytes") == 11 && manifest_u64(out, "train_docs") == 2 &&
          log_has(log, "already taken"), "a link loop: each file once (exit %d, %" PRIu64 " bytes, %" PRIu64 " documents; "
          "the issue read them 41 times)", rc, manifest_u64(out, "source_bytes"), manifest_u64(out, "train_docs"));
    // A shard set inside an input directory is left out; named as an input it is refused; the output directory
    // inside an input is left out too, also when it already holds a set.
    char corpus[400];
    snprintf(corpus, sizeof(corpus), "%s/corpus", tmp);
    test_run("mkdir -p %s && cp %s/a.txt %s/t.txt", corpus, tmp, corpus);
    CHECK(test_run("%s prepare -q -t byte --out %s/set %s/t.txt", mlm, corpus, corpus) == 0, "a set inside the corpus");
    struct stat st;
    char ta[500];
    snprintf(ta, sizeof(ta), "%s/a.txt", tmp);
    stat(ta, &st);
    uint64_t text_bytes = (uint64_t)st.st_size;
    rc = test_run("%s prepare -t byte --valid-fraction 0 --out %s/outside %s > %s 2>&1", mlm, tmp, corpus, log);
    char outside[500];
    snprintf(outside, sizeof(outside), "%s/outside", tmp);
    CHECK(rc == 0 && manifest_u64(outside, "source_bytes") == text_bytes && log_has(log, "left out 1 prepared shard set"),
          "the set among the inputs is left out (exit %d, %" PRIu64 " bytes read, the text has %" PRIu64 ")", rc,
          manifest_u64(outside, "source_bytes"), text_bytes);
    rc = test_run("%s prepare -q -t byte --out %s/o2 %s/set > %s 2>&1", mlm, tmp, corpus, log);
    CHECK(rc == 2 && log_has(log, "is a prepared shard set"), "a set named as input is refused (exit %d)", rc);
    for (int again = 0; again < 2; again++) {
        rc = test_run("%s prepare -q --force -t byte --valid-fraction 0 --out %s/inner %s > %s 2>&1", mlm, corpus, corpus,
                      log);
        char inner[500];
        snprintf(inner, sizeof(inner), "%s/inner", corpus);
        CHECK(rc == 0 && manifest_u64(inner, "source_bytes") == text_bytes,
              "the output directory inside the input is left out (run %d: exit %d, %" PRIu64 " bytes)", again, rc,
              manifest_u64(inner, "source_bytes"));
    }
}

// Found by fuzz_prepare_input: in blank mode a file whose last document ends in blanks without a newline (read
// whole before its end was seen) left that document open, and the next file's first document was merged into it.
static void test_documents_end_with_files(void) {
    char d[400];
    snprintf(d, sizeof(d), "%s/twofiles", tmp);
    test_run("printf 'alpha beta ' > %s/f1.txt && printf 'gamma\n' > %s/f2.txt", tmp, tmp);
    CHECK(test_run("%s prepare -q -t byte --documents blank --valid-fraction 0 --out %s %s/f1.txt %s/f2.txt", mlm, d, tmp,
                   tmp) == 0 && manifest_u64(d, "train_docs") == 2, "two files, two documents (%" PRIu64 ")",
          manifest_u64(d, "train_docs"));
}

// ---- 8: invalid UTF-8, one policy

static void test_invalid_utf8(void) {
    char log[400], out[400], clean[400];
    snprintf(log, sizeof(log), "%s/utf8.log", tmp);
    for (int tk = 0; tk < 2; tk++) {
        const char *name = tk ? "wordpiece" : "char";
        char vocab[500] = "";
        if (tk) snprintf(vocab, sizeof(vocab), "--vocab %s/vocab.txt", tmp);
        snprintf(out, sizeof(out), "%s/u8-%s", tmp, name);
        int rc = test_run("%s prepare -q -t %s %s --out %s %s/bad.txt > %s 2>&1", mlm, name, vocab, out, tmp, log);
        CHECK(rc == 1 && log_has(log, "bad.txt: invalid UTF-8 at byte 9") && log_has(log, "--invalid-utf8 skip"),
              "%s: invalid UTF-8 refused by default, naming the file and byte (exit %d)", name, rc);
        rc = test_run("%s prepare -t %s %s --invalid-utf8 skip --valid-fraction 0 --out %s %s/bad.txt > %s 2>&1", mlm,
                      name, vocab, out, tmp, log);
        snprintf(clean, sizeof(clean), "%s/u8-%s-clean", tmp, name);
        CHECK(test_run("%s prepare -q -t %s %s --valid-fraction 0 --out %s %s/clean.txt", mlm, name, vocab, clean, tmp) == 0,
              "the clean text");
        char a[4096], b[4096];
        shard_list(out, a, sizeof(a));
        shard_list(clean, b, sizeof(b));
        CHECK(rc == 0 && manifest_u64(out, "invalid_utf8") == 3 && log_has(log, "skipped 3 bytes of invalid UTF-8 in 1 file") &&
              !strcmp(a, b), "%s --invalid-utf8 skip: 3 bytes dropped and counted, the shards of the clean text (exit %d)",
              name, rc);
    }
    int rc = test_run("%s prepare -q -t byte --invalid-utf8 skip --out %s/u8-byte %s/bad.txt > %s 2>&1", mlm, tmp, tmp, log);
    CHECK(rc == 2 && log_has(log, "the byte tokenizer takes any bytes"), "--invalid-utf8 with bytes is a usage error");
}

// ---- 9: pipes and standard input for the two-pass char tokenizer

static void test_pipes(void) {
    char ref[400], a[4096], b[4096];
    snprintf(ref, sizeof(ref), "%s/pipe-ref", tmp);
    CHECK(test_run("%s prepare -q -t char --valid-fraction 0.2 --documents blank --out %s %s/a.txt", mlm, ref, tmp) == 0, "ref");
    shard_list(ref, a, sizeof(a));
    CHECK(test_run("bash -c '%s prepare -q -t char --valid-fraction 0.2 --documents blank --out %s/pipe1 <(cat %s/a.txt)'",
                   mlm, tmp, tmp) == 0, "a pipe");
    char d[400];
    snprintf(d, sizeof(d), "%s/pipe1", tmp);
    shard_list(d, b, sizeof(b));
    CHECK(!strcmp(a, b) && manifest_u64(d, "train_tokens") > 0, "char from a pipe: the file's shards (it wrote 0 tokens)");
    CHECK(test_run("%s prepare -q -t char --valid-fraction 0.2 --documents blank --out %s/pipe2 - < %s/a.txt", mlm, tmp,
                   tmp) == 0, "stdin");
    snprintf(d, sizeof(d), "%s/pipe2", tmp);
    shard_list(d, b, sizeof(b));
    CHECK(!strcmp(a, b) && count_entries(d, "\\.") == 0, "char from standard input: the file's shards, no spool left");
}

// ---- 10: hangs

static void test_no_hangs(void) {
    char d[400], log[400], err[2048];
    snprintf(log, sizeof(log), "%s/hang.log", tmp);
    snprintf(d, sizeof(d), "%s/fifoset", tmp);
    CHECK(test_run("%s prepare -q -t wordpiece --vocab %s/vocab.txt --documents blank --valid-fraction 0.2 --out %s "
                   "%s/a.txt", mlm, tmp, d, tmp) == 0, "set");
    Manifest m;
    if (manifest_read(&m, d, err, sizeof(err))) {
        CHECK(0, "the set for the hang checks: %s", err);
        return;
    }
    const char *tiny = "--set model.n_layers=1 --set model.d_model=8 --set model.n_heads=2 --set model.d_ff=8 "
                       "--set data.seq_len=8 --set train.batch_size=2 --device cpu -q";
    test_run("cp -r %s %s-v && rm %s-v/%s/vocab.txt && ln -s /dev/zero %s-v/%s/vocab.txt", d, d, d, m.shard_dir, d, m.shard_dir);
    int rc = test_run("timeout 60 %s train --set data.path=%s-v %s --steps 1 -o %s/hang-run1 > %s 2>&1", mlm, d, tiny, tmp, log);
    CHECK(rc == 1 && log_has(log, "character device"), "vocab.txt linked to /dev/zero: refused at once (exit %d; it spun "
          "forever)", rc);
    manifest_free(&m);
    test_run("cd %s/shards-* && rm train-00000.bin && mkfifo train-00000.bin", d);
    rc = test_run("timeout 60 %s train --set data.path=%s %s --steps 1 -o %s/hang-run2 > %s 2>&1", mlm, d, tiny, tmp, log);
    CHECK(rc == 1 && log_has(log, "FIFO"), "a FIFO as a shard: refused at once (exit %d; train blocked)", rc);
    rc = test_run("timeout 60 %s prepare -q -t wordpiece --vocab /dev/zero --out %s/z %s/a.txt > %s 2>&1", mlm, tmp, tmp, log);
    CHECK(rc == 2 && log_has(log, "character device"), "--vocab /dev/zero refused (exit %d)", rc);
    char in[400];
    snprintf(in, sizeof(in), "%s/fifo-in", tmp);
    test_run("mkdir -p %s && cp %s/a.txt %s/ && mkfifo %s/pipe", in, tmp, in, in);
    rc = test_run("timeout 60 %s vocab --size 60 --out %s/v.txt %s > %s 2>&1", mlm, tmp, in, log);
    CHECK(rc == 0 && log_has(log, "left out 1 entries that are not regular files"),
          "mlm vocab DIR with a FIFO inside: the FIFO left out (exit %d; it hung)", rc);
    rc = test_run("timeout 60 %s prepare -t byte --out %s/fifo-prep %s > %s 2>&1", mlm, tmp, in, log);
    CHECK(rc == 0 && log_has(log, "left out 1 entries that are not regular files"),
          "mlm prepare DIR with a FIFO inside: the FIFO left out (exit %d)", rc);
    // A pipe named as an input with no writer: prepare waits for it, as it should, and SIGTERM still stops it at once
    // (the handler used to let the blocked open restart, so only SIGKILL ended it), leaving nothing behind.
    char fifo[500];
    snprintf(fifo, sizeof(fifo), "%s/lonely-fifo", tmp);
    mkfifo(fifo, 0644);
    rc = test_run("timeout -k 10 2 %s prepare -q -t byte --out %s/fifo-out %s > %s 2>&1", mlm, tmp, fifo, log);
    char fo[500];
    snprintf(fo, sizeof(fo), "%s/fifo-out", tmp);
    CHECK(rc == 124 && log_has(log, "interrupted by SIGTERM") && access(fo, F_OK) != 0,
          "SIGTERM while waiting on a pipe: stopped cleanly (exit %d), nothing left", rc);
    rc = test_run("timeout 60 %s train --data /dev/zero %s --steps 1 -o %s/zero-run > %s 2>&1", mlm, tiny, tmp, log);
    CHECK(rc == 1 && log_has(log, "character device"), "/dev/zero as the text corpus: refused at once (exit %d; it "
          "filled the memory)", rc);
    rc = test_run("timeout 60 %s prepare -q -t byte --out %s/zero /dev/zero > %s 2>&1", mlm, tmp, log);
    CHECK(rc == 2 && log_has(log, "character device"), "/dev/zero as an input refused (exit %d)", rc);
}

// ---- 12: standard input that cannot be read

static void test_stdin_errors(void) {
    char log[400], d[400], dir[400];
    snprintf(log, sizeof(log), "%s/stdin.log", tmp);
    snprintf(dir, sizeof(dir), "%s/adir", tmp);
    mkdir(dir, 0755);
    for (int tk = 0; tk < 2; tk++) {
        const char *name = tk ? "byte" : "char";
        snprintf(d, sizeof(d), "%s/closed-%s", tmp, name);
        int rc = test_run("bash -c '%s prepare -q -t %s --out %s - <&-' > %s 2>&1", mlm, name, d, log);
        CHECK(rc == 1 && log_has(log, "cannot read standard input: Bad file descriptor") && access(d, F_OK) != 0,
              "%s, closed stdin: named (exit %d), and the directory it created removed", name, rc);
        snprintf(d, sizeof(d), "%s/dirin-%s", tmp, name);
        mkdir(d, 0755);
        rc = test_run("%s prepare -q -t %s --out %s - < %s > %s 2>&1", mlm, name, d, dir, log);
        CHECK(rc == 1 && log_has(log, "cannot read standard input: Is a directory") && count_entries(d, "") == 0, "%s, a directory on stdin: named (exit %d), nothing left in DIR (no .stdin.part)",
              name, rc);
    }
}

// ---- kill -9 during a --force prepare

static void test_kill9(void) {
    char d[400], big[400], err[2048], a[4096], ref_new[4096], have[4096];
    snprintf(d, sizeof(d), "%s/k9", tmp);
    snprintf(big, sizeof(big), "%s/big.txt", tmp);
    test_run("for i in $(seq 40); do cat %s/a.txt; done > %s", tmp, big);
    CHECK(test_run("%s prepare -q -t char --documents blank --out %s %s/a.txt", mlm, d, tmp) == 0, "old set");
    shard_list(d, a, sizeof(a));
    char r[400];
    snprintf(r, sizeof(r), "%s/k9-new", tmp);
    CHECK(test_run("%s prepare -q -t char --documents blank --out %s %s", mlm, r, big) == 0, "new set");
    shard_list(r, ref_new, sizeof(ref_new));
    srand(2207);
    for (int trial = 0; trial < 4; trial++) {
        int ms = 20 + rand() % 400;
        test_run("%s prepare -q --force -t char --documents blank --out %s %s & p=$!; sleep %d.%03d; kill -9 $p 2>/dev/null;"
                 " wait $p 2>/dev/null; true", mlm, d, big, ms / 1000, ms % 1000);
        shard_list(d, have, sizeof(have));
        CHECK(set_ok(d, NULL, err, sizeof(err)) && (!strcmp(have, a) || !strcmp(have, ref_new)),
              "kill -9 after %d ms: the directory holds the old or the new set, whole: %s", ms, err);
        if (!strcmp(have, ref_new)) {  // it finished: put the old one back for the next trial
            CHECK(test_run("%s prepare -q --force -t char --documents blank --out %s %s/a.txt", mlm, d, tmp) == 0, "old");
        }
    }
    CHECK(test_run("%s prepare -q --force -t char --documents blank --out %s %s/a.txt", mlm, d, tmp) == 0 &&
          count_entries(d, "\\.prepare") == 0 && count_entries(d, "shards-") == 1,
          "the next prepare clears what a killed one left");
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: test_prepare_safety MLM CORPUS\n");
        return 2;
    }
    static char mlm_abs[4096];
    mlm = realpath(argv[1], mlm_abs) ? mlm_abs : argv[1];  // the races run in another directory
    if (access(argv[2], R_OK) != 0) return test_skip("the corpus is missing");
    setenv("OMP_WAIT_POLICY", "passive", 0);  // mlm then starts once (it re-executes itself to set it otherwise)
    signal(SIGPIPE, SIG_IGN);
    // tmpfs where there is one: prepare fsyncs every shard and manifest.
    snprintf(tmp, sizeof(tmp), "%s/mlm_test_prepare_safety_%d", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp",
             (int)getpid());
    test_run("rm -rf %s && mkdir -p %s", tmp, tmp);
    // Two texts of blank-line documents; a vocab.txt made from the first; text with 3 invalid bytes (the first at
    // byte 9) and the same text without them.
    test_run("head -c 30000 %s > %s/a.txt && tail -c 30000 %s > %s/b.txt", argv[2], tmp, argv[2], tmp);
    CHECK(test_run("%s vocab -q --size 200 --out %s/vocab.txt %s/a.txt", mlm, tmp, tmp) == 0, "mlm vocab");
    test_run("printf 'First Cit\\377izen:\\nBefore we\\200 proceed\\n\\nany further,\\376 hear me.\\n' > %s/bad.txt && "
             "printf 'First Citizen:\\nBefore we proceed\\n\\nany further, hear me.\\n' > %s/clean.txt", tmp, tmp);
    struct { void (*run)(void); const char *name; } parts[] = {
        {test_lock, "lock"}, {test_user_files, "user files"}, {test_links_and_sets, "links and sets"}, {test_documents_end_with_files, "documents end with files"},
        {test_invalid_utf8, "invalid UTF-8"}, {test_pipes, "pipes"}, {test_no_hangs, "no hangs"},
        {test_stdin_errors, "stdin errors"}, {test_kill9, "kill -9"}};
    for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
        double t0 = mlm_now();
        parts[i].run();
        printf("%s: %.1f s\n", parts[i].name, mlm_now() - t0);
    }
    if (!t_failures) test_run("rm -rf %s", tmp);
    return test_finish("test_prepare_safety");
}
