// test_dp.c: gradient accumulation and data parallel over MPI, compared through the checkpoints they write:
//   accum   train.accum_steps = 2 x 32 equals batch 64 without accumulation within float rounding (weights);
//           a micro-batch's dropout draws its rows' sub-range of the whole batch's (a wrong offset fails this);
//   mpi     2 ranks x 32 equal 1 process with accum_steps = 2 bit for bit (weights and Adam moments, 20 steps);
//           ZeRO-1 equals plain data parallel bit for bit; a 2-rank ZeRO checkpoint resumed on 1 rank continues as
//           the straight run; a rank killed (SIGKILL) or hung (SIGSTOP) ends the job non-zero with a message in
//           bounded time.
//   agree   ranks that differ in their configuration, data or starting state all refuse at start-up, naming the
//           key and the ranks' values (only train.threads, train.device and data.path may differ); eval, export
//           and prepare under mpirun -np 2 refuse and write nothing.
// Usage: test_dp MLM CORPUS MPIRUN|none accum|mpi|agree. About 2 s (accum), 14 s (mpi) and 35 s (agree) on 2 cores
// (Release).
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "test_util.h"

static const char *mlm_bin, *corpus, *mpirun;
static char tmpdir[256];

// A small model, dropout on (so that the random offsets of micro-batches matter), 64 sequences a step; 1% of the
// corpus for validation (11 batches) keeps the runs short, the sanitizer build included.
#define SMALL "--set model.d_model=32 --set model.n_heads=4 --set model.n_layers=2 --set model.d_ff=48 " \
              "--set data.seq_len=16 --set train.batch_size=64 --set train.log_every=5 --set train.samples=false " \
              "--set train.ckpt_every=0 --set optim.warmup=10 --set train.threads=1 --set model.dropout=0.1 " \
              "--set data.train_split=0.99 --device cpu -q"

static int load(const char *dir, Checkpoint *c) {
    char err[1024];
    if (ckpt_load(dir, c, err, sizeof(err))) {
        CHECK(0, "cannot load %s: %s", dir, err);
        return 1;
    }
    return 0;
}

// Weights and Adam moments of two runs' last checkpoints: bit for bit (tol < 0) or weights within tol (absolute).
static void compare_runs(const char *a, const char *b, double tol, const char *what) {
    Checkpoint ca, cb;
    if (load(a, &ca)) return;
    if (load(b, &cb)) { ckpt_free(&ca); return; }
    CHECK(ca.st.step == cb.st.step && ca.n_params == cb.n_params, "%s: steps %ld / %ld, params %zu / %zu", what,
          ca.st.step, cb.st.step, ca.n_params, cb.n_params);
    size_t n = MLM_MIN(ca.n_params, cb.n_params), where = 0;
    if (tol < 0) {
        size_t bytes = n * sizeof(float);
        CHECK(memcmp(ca.params, cb.params, bytes) == 0, "%s: weights differ", what);
        CHECK(memcmp(ca.adam_m, cb.adam_m, bytes) == 0, "%s: Adam first moments differ", what);
        CHECK(memcmp(ca.adam_v, cb.adam_v, bytes) == 0, "%s: Adam second moments differ", what);
        // Validation (shared out over the ranks, summed in batch order) gives the one-process figures too.
        CHECK(ca.st.last_valid_step == cb.st.last_valid_step && ca.st.last_valid_loss == cb.st.last_valid_loss &&
              ca.st.last_valid_acc == cb.st.last_valid_acc, "%s: validation differs: loss %.9g vs %.9g", what,
              ca.st.last_valid_loss, cb.st.last_valid_loss);
        printf("%s: weights and Adam moments equal bit for bit after %ld steps\n", what, ca.st.step);
    } else {
        double e = max_rel_err(ca.params, cb.params, n, 1e-2, &where);
        double moved = max_abs_err(ca.params, cb.params, n, &where);
        printf("%s: weights after %ld steps: max relative difference %.3g (max absolute %.3g)\n", what, ca.st.step, e,
               moved);
        CHECK(moved < tol, "%s: weights differ by %.3g (tolerance %.3g) at %zu", what, moved, tol, where);
        CHECK(memcmp(ca.params, cb.params, n * sizeof(float)) != 0,
              "%s: bit-identical weights: the comparison cannot tell accumulation from the big batch", what);
    }
    ckpt_free(&ca);
    ckpt_free(&cb);
}

static void test_accumulation(void) {
    char big[300], acc[300], shifted[300];
    snprintf(big, sizeof(big), "%s/big", tmpdir);
    snprintf(acc, sizeof(acc), "%s/accum2", tmpdir);
    snprintf(shifted, sizeof(shifted), "%s/accum4", tmpdir);
    CHECK(test_run("%s train " SMALL " --data %s --steps 20 --out %s > %s.log 2>&1", mlm_bin, corpus, big, big) == 0,
          "batch 64 failed (%s.log)", big);
    CHECK(test_run("%s train " SMALL " --set train.accum_steps=2 --data %s --steps 20 --out %s > %s.log 2>&1", mlm_bin,
                   corpus, acc, acc) == 0, "accum_steps=2 failed (%s.log)", acc);
    CHECK(test_run("%s train " SMALL " --set train.accum_steps=4 --data %s --steps 20 --out %s > %s.log 2>&1", mlm_bin,
                   corpus, shifted, shifted) == 0, "accum_steps=4 failed (%s.log)", shifted);
    // 20 Adam steps amplify float rounding differences of the summation order (Adam's early steps move a weight by
    // about lr whatever the gradient's size, so a near-zero gradient's rounding can flip a step): measured 1.0e-3
    // and 8.7e-4 absolute. Dropout drawn from the wrong rows (first_row ignored) measured 0.64 and 0.72; a wrong
    // loss normalisation scales every gradient.
    compare_runs(big, acc, 0.01, "batch 64 vs accum_steps=2 x 32");
    compare_runs(big, shifted, 0.01, "batch 64 vs accum_steps=4 x 16");
    // A batch size the steps do not divide is refused with a message.
    CHECK(test_run("%s train " SMALL " --set train.accum_steps=3 --data %s --steps 1 --out %s/bad > /dev/null 2>&1",
                   mlm_bin, corpus, tmpdir) == 2, "accum_steps=3 with batch 64 should be refused (exit 2)");
}

static int mpi_run(int ranks, const char *sets, const char *dir, int steps) {
    return test_run("%s -np %d --oversubscribe %s train " SMALL " %s --data %s --steps %d --out %s > %s.log 2>&1",
                    mpirun, ranks, mlm_bin, sets, corpus, steps, dir, dir);
}

static void test_data_parallel(void) {
    char one[300], two[300], zero[300];
    snprintf(one, sizeof(one), "%s/one", tmpdir);
    snprintf(two, sizeof(two), "%s/two", tmpdir);
    snprintf(zero, sizeof(zero), "%s/zero", tmpdir);
    CHECK(test_run("%s train " SMALL " --set train.accum_steps=2 --data %s --steps 20 --out %s > %s.log 2>&1",
                   mlm_bin, corpus, one, one) == 0, "1 process accum_steps=2 failed (%s.log)", one);
    CHECK(mpi_run(2, "--set train.accum_steps=2", two, 20) == 0, "2 ranks failed (%s.log)", two);
    CHECK(mpi_run(2, "--set train.accum_steps=2 --set train.zero=true", zero, 20) == 0, "2 ranks ZeRO-1 failed (%s.log)",
          zero);
    compare_runs(one, two, -1, "2 ranks x 32 vs 1 process accum_steps=2 x 32");
    char big[300];
    snprintf(big, sizeof(big), "%s/big", tmpdir);
    CHECK(test_run("%s train " SMALL " --data %s --steps 20 --out %s > %s.log 2>&1", mlm_bin, corpus, big, big) == 0,
          "batch 64 failed (%s.log)", big);
    compare_runs(big, two, 0.01, "2 ranks x 32 vs 1 process batch 64 (tolerance as test_dp accum)");
    compare_runs(two, zero, -1, "ZeRO-1 vs plain data parallel (2 ranks)");
    // The same training losses, logged by rank 0 alone (one line per log interval).
    char la[20][32], lb[20][32];
    memset(la, 0, sizeof(la));
    memset(lb, 0, sizeof(lb));
    CHECK(test_train_losses(one, la, 20) == 4 && test_train_losses(two, lb, 20) == 4, "expected 4 train lines each");
    CHECK(strcmp(la[19], lb[19]) == 0 && la[19][0], "step-20 losses differ: %s vs %s", la[19], lb[19]);
}

// A 2-rank ZeRO-1 run checkpointed at step 10 (shards gathered), resumed on 1 rank to step 20: the straight run's bits.
static void test_resume_on_fewer_ranks(void) {
    char one[300], part[300];
    snprintf(one, sizeof(one), "%s/one", tmpdir);
    snprintf(part, sizeof(part), "%s/part", tmpdir);
    CHECK(mpi_run(2, "--set train.accum_steps=2 --set train.zero=true", part, 10) == 0, "2 ranks, 10 steps failed");
    CHECK(test_run("%s train --resume %s --steps 20 -q >> %s.log 2>&1", mlm_bin, part, part) == 0,
          "resume on 1 rank failed (%s.log)", part);
    compare_runs(one, part, -1, "2 ranks (ZeRO-1) to step 10, 1 rank to 20 vs 1 process straight");
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Start a long 2-rank run, wait for its first metrics, send `sig` to rank 1, and time the job's end.
static void test_fault(int sig, const char *name) {
    char dir[300], log[320], args[2048];
    snprintf(dir, sizeof(dir), "%s/fault-%s", tmpdir, name);
    snprintf(log, sizeof(log), "%s.log", dir);
    snprintf(args, sizeof(args), "-np 2 --oversubscribe %s train " SMALL " --set train.accum_steps=2 "
             "--set train.dist_timeout=3 --set train.log_every=1 --data %s --steps 100000 --out %s", mlm_bin, corpus, dir);
    pid_t pid = test_spawn(mpirun, args, log, 0);
    char losses[8][32];
    struct timespec tick = {0, 20 * 1000 * 1000};
    for (int i = 0; i < 3000 && test_train_losses(dir, losses, 8) < 3; i++) nanosleep(&tick, NULL);
    // Rank 1 is mpirun's second child (both ranks are children of mpirun on one node).
    char cmd[128], line[64];
    snprintf(cmd, sizeof(cmd), "ps --ppid %d -o pid= | tail -1", (int)pid);
    FILE *p = popen(cmd, "r");
    pid_t victim = p && fgets(line, sizeof(line), p) ? (pid_t)atol(line) : 0;
    if (p) pclose(p);
    CHECK(victim > 0, "%s: no rank process found under mpirun %d", name, (int)pid);
    double t0 = now_s();
    if (victim > 0) kill(victim, sig);
    // Bounded: the job must end within 60 s (kill: mpirun notices at once; hang: train.dist_timeout = 3 s).
    int code = -1;
    for (int i = 0; i < 3000; i++) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) {
            code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            break;
        }
        nanosleep(&tick, NULL);
    }
    double took = now_s() - t0;
    if (code == -1) {
        kill(pid, SIGKILL);
        if (victim > 0) kill(victim, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    size_t len = 0;
    char *text = mlm_read_file(log, &len);
    const char *want = sig == SIGKILL ? "exited on signal 9" : "another rank died or hangs";
    printf("%s of rank 1: the job ended with exit code %d after %.1f s\n", name, code, took);
    CHECK(code > 0, "%s: the job should end non-zero within 60 s (code %d after %.1f s)", name, code, took);
    CHECK(text && strstr(text, want), "%s: no message \"%s\" in %s", name, want, log);
    free(text);
}

// ---- agree: ranks that do not run the same thing all refuse at start-up (issue 22, bug 2), and the one-process
// commands refuse under mpirun (issue 22, item 12). Before, rank 1 with another learning rate, seed, dropout or
// sparse prediction trained (exit 0, a worse model); another train.max_steps hung until train.dist_timeout and
// blamed a dead rank; another batch size or train.zero aborted inside Open MPI; eval, export and prepare ran once
// per rank.

// mpirun -np 1 mlm train ... SET0 : -np 1 mlm train ... SET1 (MPMD: each rank its own command line) for 3 steps of
// the small model (with a resume, the command lines are SET0 and SET1 alone); returns the job's exit status, *took
// its wall time.
static int mpmd(const char *set0, const char *set1, const char *dir, double *took);

static int text_has(const char *path, const char *want) {
    size_t len = 0;
    char *text = mlm_read_file(path, &len);
    int found = text && strstr(text, want);
    free(text);
    return found;
}

// A refusal: exit 2, within 60 s, before any step (no metrics), and every `want` in the log.
static void expect_refusal(const char *name, const char *set0, const char *set1, const char *const *want, int n_want) {
    char dir[300], log[320], metrics[340];
    snprintf(dir, sizeof(dir), "%s/agree-%s", tmpdir, name);
    snprintf(log, sizeof(log), "%s.log", dir);
    snprintf(metrics, sizeof(metrics), "%s/metrics.jsonl", dir);
    double took = 0;
    int code = mpmd(set0, set1, dir, &took);
    printf("%s: rank 0 %s | rank 1 %s: exit %d after %.1f s\n", name, set0, set1, code, took);
    CHECK(code == 2, "%s: the job should refuse with exit status 2, not %d (%s)", name, code, log);
    CHECK(took < 60, "%s: the refusal took %.0f s", name, took);
    CHECK(access(metrics, F_OK) != 0, "%s: a step was trained before the refusal (%s exists)", name, metrics);
    for (int i = 0; i < n_want; i++) CHECK(text_has(log, want[i]), "%s: no \"%s\" in %s", name, want[i], log);
}

static void test_agreement(void) {
    // Learning rate, seed, dropout and sparse prediction on rank 1 at once: each is named with both values.
    const char *four[] = {"do not run the same configuration", "optim.lr is 1 on rank 0, 2 on rank 1",
                          "train.seed is 1234 on rank 0, 99 on rank 1", "model.dropout is 0.1 on rank 0, 0.2 on rank 1",
                          "train.sparse_prediction is false on rank 0, true on rank 1"};
    expect_refusal("lr-seed-dropout-sparse", "", "--set optim.lr=2 --set train.seed=99 --set model.dropout=0.2 "
                   "--set train.sparse_prediction=true", four, 5);
    // Another max_steps: before, a hang until train.dist_timeout (30 s here, 600 by default).
    const char *steps[] = {"train.max_steps is 3 on rank 0, 5 on rank 1"};
    expect_refusal("max-steps", "--set train.dist_timeout=30", "--set train.dist_timeout=30 --steps 5", steps, 1);
    // Another batch size and train.zero: before, an abort inside Open MPI.
    const char *batch[] = {"train.batch_size is 64 on rank 0, 32 on rank 1", "train.zero is false on rank 0, true on rank 1"};
    expect_refusal("batch-zero", "", "--set train.batch_size=32 --set train.zero=true", batch, 2);
    // Other data: the first 400 KB of the corpus on rank 1 (before: an abort inside Open MPI).
    char part[300];
    snprintf(part, sizeof(part), "%s/part.txt", tmpdir);
    CHECK(test_run("head -c 400000 %s > %s", corpus, part) == 0, "cannot write %s", part);
    char other_data[400];
    snprintf(other_data, sizeof(other_data), "--data %s", part);
    const char *data[] = {"the data set's md5 is"};
    expect_refusal("data", "", other_data, data, 1);
    // Resumed from two different checkpoints (steps 3 and 4 of one process with accum_steps = 2).
    char a[300], b[300], ra[400], rb[400];
    snprintf(a, sizeof(a), "%s/agree-ckpt3", tmpdir);
    snprintf(b, sizeof(b), "%s/agree-ckpt4", tmpdir);
    CHECK(test_run("%s train " SMALL " --set train.accum_steps=2 --data %s --steps 3 --out %s > %s.log 2>&1", mlm_bin,
                   corpus, a, a) == 0, "3 steps failed (%s.log)", a);
    CHECK(test_run("%s train " SMALL " --set train.accum_steps=2 --data %s --steps 4 --out %s > %s.log 2>&1", mlm_bin,
                   corpus, b, b) == 0, "4 steps failed (%s.log)", b);
    // (Before, this hung for train.dist_timeout; 30 s here instead of 600.)
    snprintf(ra, sizeof(ra), "--resume %s --steps 6 --set train.dist_timeout=30", a);
    snprintf(rb, sizeof(rb), "--resume %s --steps 6 --set train.dist_timeout=30", b);
    const char *state[] = {"do not run the same starting state", "the starting state is resumed, step 3",
                           "resumed, step 4"};
    expect_refusal("resume", ra, rb, state, 3);
    // What may differ: the threads, and the path of the same data (a copy elsewhere).
    char copy[300], dir[300], same[700];
    snprintf(copy, sizeof(copy), "%s/copy.txt", tmpdir);
    snprintf(dir, sizeof(dir), "%s/agree-threads-path", tmpdir);
    CHECK(test_run("cp %s %s", corpus, copy) == 0, "cannot copy the corpus");
    snprintf(same, sizeof(same), "--set train.threads=2 --data %s", copy);
    double took;
    int code = mpmd("", same, dir, &took);
    printf("threads and data path differ: exit %d after %.1f s\n", code, took);
    CHECK(code == 0, "ranks that differ only in train.threads and data.path should train (exit %d, %s.log)", code, dir);
}

// The other commands under mpirun -np 2: refused with exit 2, nothing written; under -np 1 they run.
static void test_commands_one_rank(void) {
    char ckpt[300], out[300];
    snprintf(ckpt, sizeof(ckpt), "%s/agree-ckpt3", tmpdir);
    struct { const char *name, *args, *written; } cmds[] = {
        {"eval", "eval --ckpt %s", NULL},
        {"export", "export --ckpt %s --out %s/exported.safetensors", "exported.safetensors"},
        {"prepare", "prepare --tokenizer char --out %s/prepared %s", "prepared"},
    };
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        char args[800], log[400];
        if (i == 2) snprintf(args, sizeof(args), cmds[i].args, tmpdir, corpus);
        else if (i == 1) snprintf(args, sizeof(args), cmds[i].args, ckpt, tmpdir);
        else snprintf(args, sizeof(args), cmds[i].args, ckpt);
        snprintf(log, sizeof(log), "%s/cmd-%s.log", tmpdir, cmds[i].name);
        int code = test_run("%s -np 2 --oversubscribe %s %s > %s 2>&1", mpirun, mlm_bin, args, log);
        printf("mpirun -np 2 mlm %s: exit %d\n", cmds[i].name, code);
        CHECK(code == 2, "mlm %s under 2 ranks: exit %d, expected 2 (%s)", cmds[i].name, code, log);
        CHECK(text_has(log, "runs as one process, but it was started as rank"), "mlm %s: no refusal in %s",
              cmds[i].name, log);
        if (cmds[i].written) {
            snprintf(out, sizeof(out), "%s/%s", tmpdir, cmds[i].written);
            CHECK(access(out, F_OK) != 0, "mlm %s under 2 ranks wrote %s", cmds[i].name, out);
        }
    }
    CHECK(test_run("%s -np 1 %s eval --ckpt %s > %s/cmd-eval1.log 2>&1", mpirun, mlm_bin, ckpt, tmpdir) == 0,
          "mlm eval under mpirun -np 1 should run (%s/cmd-eval1.log)", tmpdir);
}

static int mpmd(const char *set0, const char *set1, const char *dir, double *took) {
    double t0 = now_s();
    int code = strstr(set0, "--resume") ?
        test_run("%s --oversubscribe -np 1 %s train %s -q : -np 1 %s train %s -q > %s.log 2>&1", mpirun, mlm_bin, set0,
                 mlm_bin, set1, dir) :
        test_run("%s --oversubscribe -np 1 %s train " SMALL " --set train.accum_steps=2 --data %s --steps 3 %s "
                        "--out %s : -np 1 %s train " SMALL " --set train.accum_steps=2 --data %s --steps 3 %s --out %s "
                        "> %s.log 2>&1", mpirun, mlm_bin, corpus, set0, dir, mlm_bin, corpus, set1, dir, dir);
    *took = now_s() - t0;
    return code;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: test_dp MLM CORPUS MPIRUN|none accum|mpi|agree\n");
        return 1;
    }
    mlm_bin = argv[1];
    corpus = argv[2];
    mpirun = argv[3];
    if (access(corpus, R_OK) != 0) return test_skip("the corpus is not readable (MLM_TEST_CORPUS)");
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/mlm_test_dp_%s_XXXXXX", argv[4]);
    if (!mkdtemp(tmpdir)) return 1;
    if (!strcmp(argv[4], "accum")) {
        test_accumulation();
    } else if (!strcmp(argv[4], "agree")) {
        if (!strcmp(mpirun, "none") || !*mpirun)
            return test_skip("mlm was built without MPI or mpirun is missing (tools/test.sh installs openmpi-bin and "
                             "libopenmpi-dev)");
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
        test_agreement();
        test_commands_one_rank();
    } else {
        if (!strcmp(mpirun, "none") || !*mpirun)
            return test_skip("mlm was built without MPI or mpirun is missing (tools/test.sh installs openmpi-bin and "
                             "libopenmpi-dev)");
        // Open MPI refuses root without these, and oversubscribes the 2 cores of CI only when told (--oversubscribe).
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
        test_data_parallel();
        test_resume_on_fewer_ranks();
        test_fault(SIGKILL, "kill");
        test_fault(SIGSTOP, "hang");
    }
    if (t_failures == 0) test_run("rm -rf %s", tmpdir);
    return test_finish(!strcmp(argv[4], "accum") ? "test_dp accum" : !strcmp(argv[4], "agree") ? "test_dp agree"
                                                                                          : "test_dp mpi");
}
