// test_resume.c: N + N steps with an interruption (SIGINT) and a resume equal 2N uninterrupted steps, byte
// for byte (weights, Adam moments, per-step losses); corrupt, truncated and mismatched checkpoints are refused.
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "test_util.h"

static const char *mlm_bin, *corpus;
static char tmpdir[256];

#define SMALL "--set model.d_model=32 --set model.n_heads=4 --set model.n_layers=2 --set model.d_ff=48 " \
              "--set data.seq_len=16 --set train.batch_size=8 --set train.log_every=1 --set train.samples=false " \
              "--set train.ckpt_every=0 --set optim.warmup=10 --set train.threads=2"


static void test_resume_equals_straight_run(void) {
    enum { STEPS = 120 };
    char a[300], b[300];
    snprintf(a, sizeof(a), "%s/straight", tmpdir);
    snprintf(b, sizeof(b), "%s/interrupted", tmpdir);
    CHECK(test_run("%s train " SMALL " --data %s --steps %d --out %s -q > %s.log 2>&1", mlm_bin, corpus, STEPS, a, a) == 0,
          "straight run failed (see %s.log)", a);

    // Interrupted run: SIGINT once a few steps are logged; it must checkpoint and exit with 130.
    // Run mlm itself as the child (no shell in between) so that the signal reaches it.
    char cmd[2048], logpath[400], steps[16];
    snprintf(cmd, sizeof(cmd), "train " SMALL " --data %s --out %s -q --steps", corpus, b);
    snprintf(logpath, sizeof(logpath), "%s.log", b);
    snprintf(steps, sizeof(steps), "%d", STEPS);
    size_t len = strlen(cmd);
    snprintf(cmd + len, sizeof(cmd) - len, " %s", steps);
    pid_t pid = test_spawn(mlm_bin, cmd, logpath, 0);
    char losses[STEPS][32];
    memset(losses, 0, sizeof(losses));
    struct timespec tick = {0, 10 * 1000 * 1000};
    for (int tries = 0; tries < 30000; tries++) {  // up to 5 minutes
        if (test_train_losses(b, losses, STEPS) >= 5) break;
        nanosleep(&tick, NULL);
    }
    kill(pid, SIGINT);
    int code = test_wait(pid);
    Checkpoint mid;
    char err[1024];
    int loaded = ckpt_load(b, &mid, err, sizeof(err)) == 0;
    CHECK(loaded, "no checkpoint after SIGINT: %s", err);
    long mid_step = loaded ? mid.st.step : -1;
    if (loaded) ckpt_free(&mid);
    printf("interrupted at step %ld with exit code %d\n", mid_step, code);
    CHECK(code == 130, "exit code after SIGINT %d", code);
    CHECK(mid_step > 0 && mid_step < STEPS, "the interruption should land mid-run (step %ld of %d)", mid_step, STEPS);
    CHECK(test_run("%s train --resume %s -q >> %s.log 2>&1", mlm_bin, b, b) == 0, "resume failed (see %s.log)", b);

    Checkpoint ca, cb;
    CHECK(ckpt_load(a, &ca, err, sizeof(err)) == 0, "%s", err);
    CHECK(ckpt_load(b, &cb, err, sizeof(err)) == 0, "%s", err);
    CHECK(ca.st.step == STEPS && cb.st.step == STEPS, "steps %ld %ld", ca.st.step, cb.st.step);
    size_t bytes = ca.n_params * sizeof(float);
    CHECK(ca.n_params == cb.n_params && memcmp(ca.params, cb.params, bytes) == 0, "weights differ after resume");
    CHECK(memcmp(ca.adam_m, cb.adam_m, bytes) == 0 && memcmp(ca.adam_v, cb.adam_v, bytes) == 0,
          "Adam moments differ after resume");
    char la[STEPS][32], lb[STEPS][32];
    memset(la, 0, sizeof(la));
    memset(lb, 0, sizeof(lb));
    int na = test_train_losses(a, la, STEPS), nb = test_train_losses(b, lb, STEPS);
    CHECK(na == STEPS && nb == STEPS, "logged %d and %d train steps (duplicates or gaps after resume?)", na, nb);
    int same = 1;
    for (int i = 0; i < STEPS; i++) same &= strcmp(la[i], lb[i]) == 0 && la[i][0];
    CHECK(same, "per-step losses differ after resume");
    printf("step %d loss: straight %s, resumed %s\n", STEPS, la[STEPS - 1], lb[STEPS - 1]);

    ckpt_free(&ca);
    ckpt_free(&cb);

    // Refusals. A truncated copy, a flipped data byte, a mismatched resume.
    char latest[600], bad[700];
    ckpt_find_latest(b, latest, sizeof(latest));
    snprintf(bad, sizeof(bad), "%s/truncated.safetensors", tmpdir);
    test_run("head -c 5000 %s > %s", latest, bad);
    CHECK(ckpt_load(bad, &cb, err, sizeof(err)) != 0, "truncated checkpoint accepted");
    printf("truncated: %s\n", err);
    snprintf(bad, sizeof(bad), "%s/flipped.safetensors", tmpdir);
    test_run("cp %s %s && printf '\\377' | dd of=%s bs=1 seek=$(( $(stat -c %%s %s) - 100 )) conv=notrunc 2>/dev/null",
        latest, bad, bad, bad);
    CHECK(ckpt_load(bad, &cb, err, sizeof(err)) != 0 && strstr(err, "checksum"), "corrupt checkpoint accepted: %s", err);
    printf("corrupt: %s\n", err);
    CHECK(test_run("%s train --resume %s --set model.d_model=64 > /dev/null 2>&1", mlm_bin, b) == MLM_EXIT_USAGE,
          "a resume that changes the model must be refused with exit 2");
    CHECK(test_run("%s train --resume %s/nowhere > /dev/null 2>&1", mlm_bin, tmpdir) == MLM_EXIT_USAGE,
          "resume from a missing directory must be refused");
}

int main(int argc, char **argv) {
    if (argc < 3) return test_skip("usage: test_resume MLM_BINARY CORPUS");
    mlm_bin = argv[1];
    const char *full = test_corpus_path(argc - 1, argv + 1);
    if (!full) return test_skip("corpus not available");
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/mlm-test-resume-XXXXXX");
    if (!mkdtemp(tmpdir)) return test_skip("cannot create a temporary directory");
    // A 30 kB slice keeps each validation pass short (24 batches); --data takes any text.
    static char slice[400];
    snprintf(slice, sizeof(slice), "%s/slice.txt", tmpdir);
    if (test_run("head -c 30000 %s > %s", full, slice) != 0) return test_skip("cannot slice the corpus");
    corpus = slice;
    test_resume_equals_straight_run();
    int rc = test_finish("test_resume");
    if (rc == 0) test_run("rm -rf %s", tmpdir);
    else printf("files kept in %s\n", tmpdir);
    return rc;
}
