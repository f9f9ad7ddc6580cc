// test_resume.c: N + N steps with an interruption (SIGINT) and a resume equal 2N uninterrupted steps, byte
// for byte (weights, Adam moments, per-step losses); corrupt, truncated and mismatched checkpoints are refused.
#include <fcntl.h>
#include <math.h>
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

// train.precision = bf16 (CPU reference): a run continued from its checkpoint equals the straight run byte for byte
// (its BF16 copy is made again from the FP32 masters with the step's rounding offset); the checkpoint holds FP32
// masters (values no BF16 copy could hold); and it continues in fp32, as an fp32 checkpoint continues in bf16.
static void test_bf16_resume_and_crossload(void) {
    enum { HALF = 15, STEPS = 30 };
    char a[300], b[300], c[300];
    snprintf(a, sizeof(a), "%s/bf16-straight", tmpdir);
    snprintf(b, sizeof(b), "%s/bf16-halves", tmpdir);
    snprintf(c, sizeof(c), "%s/fp32-halves", tmpdir);
    const char *bf = "--device cpu --set train.precision=bf16";
    CHECK(test_run("%s train " SMALL " %s --data %s --steps %d --out %s -q > %s.log 2>&1", mlm_bin, bf, corpus, STEPS, a,
                   a) == 0, "bf16 straight run failed (see %s.log)", a);
    CHECK(test_run("%s train " SMALL " %s --data %s --steps %d --out %s -q > %s.log 2>&1", mlm_bin, bf, corpus, HALF, b,
                   b) == 0, "bf16 first half failed (see %s.log)", b);
    Checkpoint half;
    char err[1024];
    CHECK(ckpt_load(b, &half, err, sizeof(err)) == 0, "%s", err);
    size_t not_bf16 = 0;
    for (size_t i = 0; i < half.n_params; i++) {
        uint32_t u;
        memcpy(&u, &half.params[i], 4);
        not_bf16 += (u & 0xffffu) != 0;
    }
    CHECK(not_bf16 > half.n_params / 2, "the bf16 run's checkpoint holds BF16 values (%zu of %zu parameters are not), "
          "not its FP32 masters", not_bf16, half.n_params);
    ckpt_free(&half);
    CHECK(test_run("cp -r %s %s-fp32", b, b) == 0, "cannot copy %s", b);  // the half-way run, continued in fp32 below
    CHECK(test_run("%s train --resume %s --set train.max_steps=%d -q >> %s.log 2>&1", mlm_bin, b, STEPS, b) == 0,
          "bf16 resume failed (see %s.log)", b);
    Checkpoint ca, cb;
    CHECK(ckpt_load(a, &ca, err, sizeof(err)) == 0 && ckpt_load(b, &cb, err, sizeof(err)) == 0, "%s", err);
    size_t bytes = ca.n_params * sizeof(float);
    CHECK(ca.st.step == STEPS && cb.st.step == STEPS && memcmp(ca.params, cb.params, bytes) == 0 &&
              memcmp(ca.adam_m, cb.adam_m, bytes) == 0 && memcmp(ca.adam_v, cb.adam_v, bytes) == 0,
          "a resumed bf16 run differs from the straight one (steps %ld, %ld)", ca.st.step, cb.st.step);
    char la[STEPS][32], lb[STEPS][32], lc[STEPS][32];
    memset(la, 0, sizeof(la)), memset(lb, 0, sizeof(lb)), memset(lc, 0, sizeof(lc));
    test_train_losses(a, la, STEPS);
    test_train_losses(b, lb, STEPS);
    int same = 1;
    for (int i = 0; i < STEPS; i++) same &= strcmp(la[i], lb[i]) == 0 && la[i][0];
    CHECK(same, "per-step losses of the resumed bf16 run differ from the straight run's");
    ckpt_free(&ca);
    ckpt_free(&cb);

    // The bf16 run's half-way checkpoint continues in fp32, and an fp32 checkpoint in bf16. The first step after
    // the switch masks the same batch from the same masters, so its loss differs only by the BF16 roundings of one
    // forward: each of the ~12 roundings on a path to the loss (2 layers) moves a value by at most 2^-9 of it, a
    // loss of ~4 by less than 12 x 2^-8 relative.
    CHECK(test_run("%s train --resume %s-fp32 --set train.max_steps=%d --set train.precision=fp32 -q > %s-fp32.log "
                   "2>&1", mlm_bin, b, STEPS, b) == 0,
          "the bf16 checkpoint did not continue in fp32 (see %s-fp32.log)", b);
    CHECK(test_run("%s train " SMALL " --device cpu --set train.precision=fp32 --data %s --steps %d --out %s -q > "
                   "%s.log 2>&1 && %s train --resume %s --set train.max_steps=%d --set train.precision=bf16 -q >> "
                   "%s.log 2>&1", mlm_bin, corpus, HALF, c, c, mlm_bin, c, STEPS, c) == 0,
          "the fp32 checkpoint did not continue in bf16 (see %s.log)", c);
    char path[400];
    snprintf(path, sizeof(path), "%s-fp32", b);
    memset(lc, 0, sizeof(lc));
    CHECK(test_train_losses(path, lc, STEPS) == STEPS, "the fp32 continuation logged too few steps");
    double l_bf16 = atof(la[HALF]), l_fp32 = atof(lc[HALF]);
    CHECK(l_fp32 != l_bf16 && fabs(l_fp32 - l_bf16) <= 12.0 / 256.0 * fabs(l_bf16),
          "step %d: fp32 continuation loss %.6f, bf16 %.6f: equal (the switch did not happen) or further apart than "
          "BF16 rounding explains", HALF + 1, l_fp32,
          l_bf16);
    printf("bf16: resumed == straight over %d steps; step %d after the switch to fp32: loss %.6f (bf16 %.6f)\n", STEPS,
           HALF + 1, l_fp32, l_bf16);
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
    test_bf16_resume_and_crossload();
    int rc = test_finish("test_resume");
    if (rc == 0) test_run("rm -rf %s", tmpdir);
    else printf("files kept in %s\n", tmpdir);
    return rc;
}
