// test_run_dir.c: the life of a run directory: one process at a time (the lock, a stale lock taken over after
// kill -9), wall-time checkpoints, a run killed during its final validation validates when resumed, a finished
// run resumed keeps its validation, a directory without a checkpoint can be started afresh, and what a new
// user sees first (progress from step 1, the whole run's estimate with a short-run hint, labelled samples).
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "test_util.h"

static const char *mlm_bin, *corpus;
static char tmpdir[256];

#define SMALL "--set model.d_model=32 --set model.n_heads=4 --set model.n_layers=2 --set model.d_ff=48 " \
              "--set data.seq_len=16 --set train.batch_size=8 --set train.samples=false --set optim.warmup=10 " \
              "--set train.threads=2"

static char *slurp(const char *path) {
    char *s = mlm_read_file(path, NULL);
    return s ? s : mlm_strdup("");
}

static int file_exists(const char *path) { return access(path, F_OK) == 0; }

// Poll every 2 ms for up to `seconds` until cond(arg) holds; returns whether it did.
static int wait_for(int (*cond)(const char *), const char *arg, double seconds) {
    struct timespec tick = {0, 2 * 1000 * 1000};
    for (double waited = 0; waited < seconds; waited += 0.002) {
        if (cond(arg)) return 1;
        nanosleep(&tick, NULL);
    }
    return cond(arg);
}

static int has_checkpoint(const char *run) {
    char latest[600];
    return ckpt_find_latest(run, latest, sizeof(latest)) == 0;
}

static int count_lines_with(const char *path, const char *needle) {
    char *s = slurp(path);
    int n = 0;
    for (char *p = strstr(s, needle); p; p = strstr(p + 1, needle)) n++;
    free(s);
    return n;
}

static int log_has_hint(const char *log) { return count_lines_with(log, "--steps") > 0; }
static int has_metrics(const char *run) {
    char path[600];
    snprintf(path, sizeof(path), "%s/metrics.jsonl", run);
    return count_lines_with(path, "\"kind\":\"train\"") >= 3;
}

// Files ending in .tmp left anywhere under dir (atomic writes leave none behind, even after kill -9 + resume).
static int tmp_files(const char *dir) {
    char cmd[700];
    snprintf(cmd, sizeof(cmd), "test -z \"$(find %s -name '*.tmp')\"", dir);
    return test_run("%s", cmd) != 0;
}

// Bug 4: a second process on a locked run directory is refused with the holder's pid; after kill -9 the lock
// is stale and the next run takes it over. train.ckpt_minutes writes checkpoints by wall time (ckpt_every = 0).
static void test_lock_and_wall_time_checkpoints(void) {
    char run[400], log[450], args[2048];
    snprintf(run, sizeof(run), "%s/locked", tmpdir);
    snprintf(log, sizeof(log), "%s.log", run);
    snprintf(args, sizeof(args), "train " SMALL " --set train.ckpt_every=0 --set train.ckpt_minutes=0.002 "
             "--set train.keep_ckpts=2 --data %s --steps 1000000 --out %s -q", corpus, run);
    pid_t holder = test_spawn(mlm_bin, args, log, 0);
    CHECK(wait_for(has_checkpoint, run, 120), "no wall-time checkpoint within 2 minutes (train.ckpt_minutes)");
    char lockfile[500], want[64];
    snprintf(lockfile, sizeof(lockfile), "%s/lock", run);
    CHECK(file_exists(lockfile), "no lock file %s while training", lockfile);
    snprintf(want, sizeof(want), "pid %ld", (long)holder);
    // A fresh start and a resume into the same directory are both refused, naming the holder.
    CHECK(test_run("%s train " SMALL " --data %s --steps 5 --out %s -q > /dev/null 2> %s/second.err", mlm_bin, corpus, run,
                   tmpdir) == MLM_EXIT_USAGE, "a second training process in a locked directory must exit 2");
    char path[600];
    snprintf(path, sizeof(path), "%s/second.err", tmpdir);
    char *e = slurp(path);
    CHECK(strstr(e, want) != NULL, "the refusal should name the holder's %s: %s", want, e);
    free(e);
    CHECK(test_run("%s train --resume %s -q > /dev/null 2> %s/third.err", mlm_bin, run, tmpdir) == MLM_EXIT_USAGE,
          "a resume of a locked directory must exit 2");
    snprintf(path, sizeof(path), "%s/third.err", tmpdir);
    e = slurp(path);
    CHECK(strstr(e, want) != NULL, "the refusal should name the holder's %s: %s", want, e);
    free(e);
    kill(holder, SIGKILL);
    CHECK(test_wait(holder) == 128 + SIGKILL, "the holder should have died of SIGKILL");
    CHECK(file_exists(lockfile), "kill -9 leaves the lock file behind (this is what the takeover is for)");
    // A writer killed between writing NAME.tmp and renaming it leaves the .tmp behind (the kill above may or may
    // not have landed there); plant one so the takeover's cleanup is always exercised.
    char stale_tmp[600];
    snprintf(stale_tmp, sizeof(stale_tmp), "%s/checkpoints/ckpt-99999999.safetensors.tmp", run);
    FILE *st = fopen(stale_tmp, "w");
    CHECK(st != NULL, "cannot plant %s", stale_tmp);
    if (st) fclose(st);

    Checkpoint ck;
    char err[1024];
    long step = -1;
    if (ckpt_load(run, &ck, err, sizeof(err)) == 0) {
        step = ck.st.step;
        ckpt_free(&ck);
    }
    CHECK(step > 0, "the wall-time checkpoint should load: %s", err);
    CHECK(test_run("%s train --resume %s --set train.max_steps=%ld --set train.ckpt_minutes=0 -q > /dev/null 2> "
                   "%s/takeover.err", mlm_bin, run, step + 2, tmpdir) == 0, "resume after kill -9 failed");
    snprintf(path, sizeof(path), "%s/takeover.err", tmpdir);
    e = slurp(path);
    CHECK(strstr(e, want) && strstr(e, "taking over"), "the stale lock of %s should be taken over with a note: %s", want,
          e);
    free(e);
    CHECK(!file_exists(lockfile), "a run that ends releases (deletes) its lock file");
    CHECK(!tmp_files(run), "temporary files left in %s", run);
    CHECK(ckpt_load(run, &ck, err, sizeof(err)) == 0 && ck.st.step == step + 2, "resumed run: %s", err);
    ckpt_free(&ck);
}

static int has_step3_checkpoint(const char *run) {
    char path[600];
    snprintf(path, sizeof(path), "%s/checkpoints/ckpt-00000003.safetensors", run);
    return file_exists(path);
}

static double done_valid_loss(const char *log) {
    char *s = slurp(log), *p = strstr(s, "last valid loss ");
    double v = p ? strtod(p + 16, NULL) : NAN;
    free(s);
    return v;
}

// Bug 3: the final validation is never lost. A run killed during its final validation (its step-3 checkpoint
// was written just before) validates when resumed; resuming the finished run keeps that one valid line and
// reports its loss.
static void test_final_validation(void) {
    char run[400], log[450], args[2048], metrics[500];
    snprintf(run, sizeof(run), "%s/final", tmpdir);
    snprintf(log, sizeof(log), "%s.log", run);
    snprintf(metrics, sizeof(metrics), "%s/metrics.jsonl", run);
    // 99% of the text for validation at 1 sequence a batch: about 1,850 forwards, so the kill lands inside it.
    snprintf(args, sizeof(args), "train " SMALL " --set train.batch_size=1 --set data.train_split=0.01 "
             "--set train.ckpt_every=3 --data %s --steps 3 --out %s -q", corpus, run);
    pid_t pid = test_spawn(mlm_bin, args, log, 0);
    int seen = wait_for(has_step3_checkpoint, run, 120);
    kill(pid, SIGKILL);
    test_wait(pid);
    CHECK(seen, "no step-3 checkpoint within 2 minutes");
    CHECK(count_lines_with(metrics, "\"kind\":\"valid\"") == 0,
          "the kill should land during the final validation (it landed after it; the test proves nothing)");
    char out1[500], out2[500];
    snprintf(out1, sizeof(out1), "%s/resume1.out", tmpdir);
    snprintf(out2, sizeof(out2), "%s/resume2.out", tmpdir);
    CHECK(test_run("%s train --resume %s > %s 2>&1", mlm_bin, run, out1) == 0, "resume after the kill failed");
    CHECK(count_lines_with(metrics, "\"kind\":\"valid\",\"step\":3,") == 1,
          "the resumed run should validate step 3 exactly once");
    double loss1 = done_valid_loss(out1);
    CHECK(isfinite(loss1), "the resumed run should report its last valid loss (got %g)", loss1);
    CHECK(test_run("%s info --ckpt %s | grep -q 'last validation      step 3: loss'", mlm_bin, run) == 0 &&
              test_run("%s info --ckpt %s | grep -q 'best valid accuracy  0\\.'", mlm_bin, run) == 0,
          "info should report the validation, not 'none yet'");
    // A finished run resumed: nothing to train, the validation line stays, the same loss is reported.
    CHECK(test_run("%s train --resume %s > %s 2>&1", mlm_bin, run, out2) == 0, "resuming the finished run failed");
    CHECK(count_lines_with(metrics, "\"kind\":\"valid\"") == 1, "resuming the finished run should keep its valid line");
    double loss2 = done_valid_loss(out2);
    CHECK(loss2 == loss1, "resuming the finished run reports last valid loss %g, the run's was %g", loss2, loss1);
}

// A directory whose run stopped before its first checkpoint: --resume says how to start it afresh, and that
// start (into the same directory) is allowed.
static void test_fresh_start_without_checkpoint(void) {
    char run[400], log[450], args[2048];
    snprintf(run, sizeof(run), "%s/nockpt", tmpdir);
    snprintf(log, sizeof(log), "%s.log", run);
    snprintf(args, sizeof(args), "train " SMALL " --set train.ckpt_every=0 --set train.ckpt_minutes=0 "
             "--set train.log_every=1 --data %s --steps 1000000 --out %s -q", corpus, run);
    pid_t pid = test_spawn(mlm_bin, args, log, 0);
    CHECK(wait_for(has_metrics, run, 120), "no metrics within 2 minutes");
    kill(pid, SIGKILL);
    test_wait(pid);
    CHECK(!has_checkpoint(run), "the run should have no checkpoint yet");
    CHECK(test_run("%s train --resume %s > /dev/null 2> %s/nockpt.err", mlm_bin, run, tmpdir) == MLM_EXIT_USAGE,
          "--resume of a directory without a checkpoint must exit 2");
    char path[600], want[1000];
    snprintf(path, sizeof(path), "%s/nockpt.err", tmpdir);
    snprintf(want, sizeof(want), "mlm train --config %s/config.conf --out %s", run, run);
    char *e = slurp(path);
    CHECK(strstr(e, want) != NULL, "the refusal should give the command that starts afresh (%s): %s", want, e);
    free(e);
    CHECK(test_run("%s %s --steps 2 -q > /dev/null 2> %s/afresh.err", mlm_bin, want + 4, tmpdir) == 0,
          "starting afresh in a directory without a checkpoint must work");
    snprintf(path, sizeof(path), "%s/afresh.err", tmpdir);
    e = slurp(path);
    CHECK(strstr(e, "stopped before its first checkpoint") != NULL, "starting afresh should say so: %s", e);
    free(e);
    CHECK(has_checkpoint(run), "the fresh start should have written a checkpoint");
    // A directory with checkpoints is not started afresh: that run can be continued.
    CHECK(test_run("%s %s --steps 2 -q > /dev/null 2>&1", mlm_bin, want + 4) == MLM_EXIT_USAGE,
          "a fresh start over checkpoints must be refused");
}

// What a new user sees on a run far too long for a CPU (10^6 epochs of the slice, so that it is long however
// fast the CPU): progress at step 1, then an estimate of the whole run and the command for a short run;
// samples come with a label.
static void test_first_minutes(void) {
    char run[400], log[450], args[2048];
    snprintf(run, sizeof(run), "%s/first", tmpdir);
    snprintf(log, sizeof(log), "%s.log", run);
    snprintf(args, sizeof(args), "train --set model.d_model=32 --set model.n_heads=4 --set model.n_layers=2 "
             "--set model.d_ff=48 --set data.seq_len=16 --set train.batch_size=8 --set train.threads=2 "
             "--set train.device=cpu --set train.epochs=1000000 --data %s --out %s", corpus, run);
    pid_t pid = test_spawn(mlm_bin, args, log, 0);
    int hinted = wait_for(log_has_hint, log, 120);
    kill(pid, SIGINT);
    CHECK(test_wait(pid) == 130, "SIGINT should stop the run with exit 130");
    CHECK(hinted, "no short-run hint within 2 minutes");
    char *s = slurp(log);
    CHECK(strstr(s, "samples before epoch 1 (step 0)") != NULL, "the samples should be labelled:\n%s", s);
    CHECK(strstr(s, "epoch 1/1000000 step 1/") != NULL, "progress should start at step 1:\n%s", s);
    CHECK(strstr(s, "estimate: ") && strstr(s, " steps left of "), "the run's estimate is missing:\n%s", s);
    CHECK(strstr(s, "that is long for a CPU") && strstr(s, "mlm train --steps "), "the short-run hint is missing:\n%s",
          s);
    free(s);
}

int main(int argc, char **argv) {
    if (argc < 3) return test_skip("usage: test_run_dir MLM_BINARY CORPUS");
    mlm_bin = argv[1];
    const char *full = test_corpus_path(argc - 1, argv + 1);
    if (!full) return test_skip("corpus not available");
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/mlm-test-run-dir-XXXXXX");
    if (!mkdtemp(tmpdir)) return test_skip("cannot create a temporary directory");
    static char slice[400];
    snprintf(slice, sizeof(slice), "%s/slice.txt", tmpdir);
    if (test_run("head -c 30000 %s > %s", full, slice) != 0) return test_skip("cannot slice the corpus");
    corpus = slice;
    test_lock_and_wall_time_checkpoints();
    test_final_validation();
    test_fresh_start_without_checkpoint();
    test_first_minutes();
    int rc = test_finish("test_run_dir");
    if (rc == 0) test_run("rm -rf %s", tmpdir);
    else printf("files kept in %s\n", tmpdir);
    return rc;
}
