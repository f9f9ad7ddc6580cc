// test_emu_dp.c: the CUDA backend's data-parallel step, run on the CPU execution layer (mlm_emu: the CUDA sources on
// the CPU, NCCL over MPI) under mpirun -np 2, compared through the checkpoints the runs write:
//   - 2 ranks x 1 micro-batch equal one GPU with train.accum_steps = 2 bit for bit (NCCL's sum of two ranks is one
//     addition, as the one GPU's), through an epoch whose last batch leaves rank 1 without rows (it adds zeros);
//   - 2 ranks x 2 micro-batches (refused before the step had one way through) equal one GPU with accum_steps = 4
//     within float rounding (the sum is associated (g0 + g1) + (g2 + g3) instead of ((g0 + g1) + g2) + g3);
//   - ZeRO-1 over NCCL (sharded Adam moments, the parameters gathered) equals plain NCCL bit for bit, its checkpoint
//     gathering the moment shards;
//   - one rank through NCCL (train.nccl) equals the plain single-GPU step bit for bit (tools/gpu_verify.sh checks
//     the same on a GPU).
// Usage: test_emu_dp MLM_EMU CORPUS MPIRUN. About 1-2 minutes on 2 loaded cores (Release).
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "mlm/optim.h"
#include "test_util.h"

static const char *mlm_emu, *mpirun;
static char tmpdir[256], slice[320];

// A small model with dropout on; 74 training sequences of 16 tokens, batches of 32: each epoch's third batch has 10
// rows, so with micro-batches of 16 (accum 2) or 8 (accum 4) rank 1 has none in it. Four steps cross it.
#define SMALL "--set model.d_model=32 --set model.n_heads=4 --set model.n_layers=2 --set model.d_ff=48 " \
              "--set data.seq_len=16 --set train.batch_size=32 --set data.train_split=0.95 --set train.log_every=1 " \
              "--set train.samples=false --set optim.warmup=10 --set model.dropout=0.1 --device cuda -q"
enum { STEPS = 4 };

static int run(int ranks, const char *name, const char *sets) {
    char dir[400];
    snprintf(dir, sizeof(dir), "%s/%s", tmpdir, name);
    int rc = ranks > 1
        ? test_run("%s -np %d --oversubscribe %s train " SMALL " %s --data %s --steps %d --out %s > %s.log 2>&1",
                   mpirun, ranks, mlm_emu, sets, slice, STEPS, dir, dir)
        : test_run("%s train " SMALL " %s --data %s --steps %d --out %s > %s.log 2>&1", mlm_emu, sets, slice, STEPS,
                   dir, dir);
    CHECK(rc == 0, "%s (%d rank(s), %s) failed with %d; see %s.log", name, ranks, sets, rc, dir);
    return rc;
}

// The checkpoint of run `name` at `step` (0: its newest).
static int load(const char *name, long step, Checkpoint *c) {
    char path[600], err[1024];
    if (step) snprintf(path, sizeof(path), "%s/%s/checkpoints/ckpt-%08ld.safetensors", tmpdir, name, step);
    else snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    int rc = ckpt_load(path, c, err, sizeof(err));
    CHECK(rc == 0, "cannot load %s: %s", path, err);
    return rc;
}

// Weights, Adam moments, validation and every step's training loss of two runs: bit for bit.
static void same_bits(const char *a, const char *b, const char *what) {
    Checkpoint ca, cb;
    if (load(a, 0, &ca)) return;
    if (load(b, 0, &cb)) { ckpt_free(&ca); return; }
    int failures = t_failures;
    size_t bytes = ca.n_params * sizeof(float);
    int eq = ca.st.step == STEPS && cb.st.step == STEPS && ca.n_params == cb.n_params;
    CHECK(eq, "%s: steps %ld / %ld, parameters %zu / %zu", what, ca.st.step, cb.st.step, ca.n_params, cb.n_params);
    if (eq) {
        CHECK(memcmp(ca.params, cb.params, bytes) == 0, "%s: weights differ", what);
        CHECK(memcmp(ca.adam_m, cb.adam_m, bytes) == 0 && memcmp(ca.adam_v, cb.adam_v, bytes) == 0,
              "%s: Adam moments differ", what);
        CHECK(ca.st.last_valid_loss == cb.st.last_valid_loss && ca.st.last_valid_acc == cb.st.last_valid_acc,
              "%s: validation differs: loss %.9g vs %.9g", what, ca.st.last_valid_loss, cb.st.last_valid_loss);
    }
    char dir_a[400], dir_b[400], la[STEPS][32], lb[STEPS][32];
    snprintf(dir_a, sizeof(dir_a), "%s/%s", tmpdir, a);
    snprintf(dir_b, sizeof(dir_b), "%s/%s", tmpdir, b);
    memset(la, 0, sizeof(la));
    memset(lb, 0, sizeof(lb));
    int na = test_train_losses(dir_a, la, STEPS), nb = test_train_losses(dir_b, lb, STEPS);
    int same = na == STEPS && nb == STEPS;
    for (int i = 0; i < STEPS && same; i++) same = la[i][0] && strcmp(la[i], lb[i]) == 0;
    CHECK(same, "%s: the per-step training losses differ (%d and %d lines)", what, na, nb);
    if (t_failures == failures)
        printf("%s: weights, Adam moments, validation and %d step losses equal bit for bit (step %d loss %s)\n", what,
               STEPS, STEPS, la[STEPS - 1]);
    ckpt_free(&ca);
    ckpt_free(&cb);
}

static double max_abs(const float *x, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)x[i]));
    return m;
}

// Two runs whose gradient sums differ by association alone. After the first step Adam's moments are m = (1 - b1) g
// and v = (1 - b2) g^2 of the clipped summed gradient g: 4 float terms summed in another order differ by at most
// 3 u sum|g_i| <= 12 u max|g| (u = 2^-24: 7.2e-7 of the largest), and the clip coefficient by the norm's rounding
// (~1e-7 relative): m within 2e-6 of max|m|, v (a square) within 4e-6 of max|v|; the bounds used are twice those.
// After all steps each weight has moved by at most about lr per Adam step on either side (a near-zero gradient's
// sign may flip): within 2 x 1.005 x sum(lr), as test_gpu_model's parameters.
static void within_rounding(const char *a, const char *b, const char *what) {
    Checkpoint ca, cb;
    if (load(a, 1, &ca)) return;
    if (load(b, 1, &cb)) { ckpt_free(&ca); return; }
    size_t n = MLM_MIN(ca.n_params, cb.n_params), where = 0;
    double em = max_abs_err(ca.adam_m, cb.adam_m, n, &where) / max_abs(cb.adam_m, n);
    double ev = max_abs_err(ca.adam_v, cb.adam_v, n, &where) / max_abs(cb.adam_v, n);
    printf("%s: step 1's Adam moments (the summed gradient) within %.2e (m) and %.2e (v) of the largest\n", what, em,
           ev);
    CHECK(em <= 4e-6 && ev <= 8e-6, "%s: step 1's moments differ by %.3e (m), %.3e (v) of the largest", what, em, ev);
    ckpt_free(&ca);
    ckpt_free(&cb);
    if (load(a, 0, &ca)) return;
    if (load(b, 0, &cb)) { ckpt_free(&ca); return; }
    OptimConfig oc = optim_config_from(&ca.cfg, 1);
    double lr_sum = 0;
    for (long t = 1; t <= STEPS; t++) lr_sum += optim_lr(&oc, t);
    double moved = max_abs_err(ca.params, cb.params, n, &where);
    printf("%s: weights after %d steps within %.3g (bound %.3g)\n", what, STEPS, moved, 2 * 1.005 * lr_sum);
    CHECK(moved <= 2 * 1.005 * lr_sum, "%s: weights differ by %.3g at %zu (bound %.3g)", what, moved, where,
          2 * 1.005 * lr_sum);
    ckpt_free(&ca);
    ckpt_free(&cb);
}

// Checkpoints hold FP32 masters and moments, so each precision continues the other's run on the device. The first
// step after a switch masks the same batch from the same masters: its loss differs from the unswitched run's by the
// BF16 roundings of one forward alone. Each of the ~12 roundings on a path to the loss (2 layers) moves a value by at
// most 2^-9 of it, so a loss of ~4 moves by less than 12 x 2^-8 relative; equal losses mean the switch did not happen
// (the copy was used in fp32, or no BF16 copy was made from the loaded masters).
static void switch_step(const char *dir, char ref[][32], const char *what) {
    char losses[STEPS][32];
    memset(losses, 0, sizeof(losses));
    int n = test_train_losses(dir, losses, STEPS);
    CHECK(n == STEPS, "%s: %d step losses logged, not %d", what, n, STEPS);
    if (n != STEPS) return;
    double got = atof(losses[2]), want = atof(ref[2]);
    CHECK(got != want && fabs(got - want) <= 12.0 / 256.0 * fabs(want) && isfinite(got),
          "%s: step 3's loss %.6f against %.6f without the switch: equal (no switch) or further apart than BF16 "
          "rounding explains", what, got, want);
    printf("%s: step 3 loss %.6f (without the switch %.6f)\n", what, got, want);
}

static void crossload(const char *bf16_half) {
    char straight[400], plain[400], bf16_ref[STEPS][32], fp32_ref[STEPS][32];
    snprintf(straight, sizeof(straight), "%s/bf16-straight", tmpdir);
    snprintf(plain, sizeof(plain), "%s/fp32-halves", tmpdir);
    memset(bf16_ref, 0, sizeof(bf16_ref));
    memset(fp32_ref, 0, sizeof(fp32_ref));
    CHECK(test_train_losses(straight, bf16_ref, STEPS) == STEPS, "bf16-straight logged too few steps");
    // bf16's step-2 checkpoint continued in fp32.
    CHECK(test_run("%s train --resume %s-fp32 --set train.max_steps=%d --set train.precision=fp32 -q > %s-fp32.log "
                   "2>&1", mlm_emu, bf16_half, STEPS, bf16_half) == 0,
          "the bf16 checkpoint did not continue in fp32 on the device; see %s-fp32.log", bf16_half);
    char path[420];
    snprintf(path, sizeof(path), "%s-fp32", bf16_half);
    switch_step(path, bf16_ref, "bf16 checkpoint continued in fp32 (device)");
    // An fp32 run's step-2 checkpoint continued in bf16, against the fp32 run continued in fp32.
    CHECK(test_run("%s train " SMALL " --set train.precision=fp32 --data %s --steps 2 --out %s > %s.log 2>&1 && "
                   "cp -r %s %s-bf16 && %s train --resume %s --set train.max_steps=%d -q >> %s.log 2>&1 && "
                   "%s train --resume %s-bf16 --set train.max_steps=%d --set train.precision=bf16 -q >> %s.log 2>&1",
                   mlm_emu, slice, plain, plain, plain, plain, mlm_emu, plain, STEPS, plain, mlm_emu, plain, STEPS,
                   plain) == 0,
          "the fp32 checkpoint did not continue in bf16 on the device; see %s.log", plain);
    CHECK(test_train_losses(plain, fp32_ref, STEPS) == STEPS, "fp32-halves logged too few steps");
    snprintf(path, sizeof(path), "%s-bf16", plain);
    switch_step(path, fp32_ref, "fp32 checkpoint continued in bf16 (device)");
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: test_emu_dp MLM_EMU CORPUS MPIRUN\n");
        return 1;
    }
    mlm_emu = argv[1];
    mpirun = argv[3];
    if (access(argv[2], R_OK) != 0) return test_skip("the corpus is not readable (MLM_TEST_CORPUS)");
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/mlm_test_emu_dp_XXXXXX");
    if (!mkdtemp(tmpdir)) return 1;
    snprintf(slice, sizeof(slice), "%s/slice.txt", tmpdir);
    if (test_run("head -c 1250 %s > %s", argv[2], slice) != 0) return test_skip("cannot slice the corpus");
    // Open MPI refuses root without these, and oversubscribes the 2 cores of CI only when told (--oversubscribe).
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);

    run(1, "one-accum2", "--set train.accum_steps=2");
    run(2, "two-accum2", "--set train.accum_steps=2");
    same_bits("one-accum2", "two-accum2", "2 ranks x 1 (NCCL) vs 1 GPU accum_steps=2");

    const char *keep = "--set train.ckpt_every=1 --set train.keep_ckpts=8";
    char sets[256];
    snprintf(sets, sizeof(sets), "--set train.accum_steps=4 %s", keep);
    run(1, "one-accum4", sets);
    run(2, "two-accum4", sets);
    within_rounding("two-accum4", "one-accum4", "2 ranks x 2 (NCCL) vs 1 GPU accum_steps=4");
    snprintf(sets, sizeof(sets), "--set train.accum_steps=4 --set train.zero=true %s", keep);
    run(2, "zero-accum4", sets);
    same_bits("two-accum4", "zero-accum4", "ZeRO-1 vs plain data parallel (NCCL, 2 ranks x 2)");

    // train.precision = bf16: under ZeRO-1 each rank's Adam writes the BF16 copy of its own range and the copy of the
    // others' is made again once the gather has brought their masters (backend_cuda.c): bit for bit as without ZeRO.
    snprintf(sets, sizeof(sets), "--set train.precision=bf16 --set train.accum_steps=4 %s", keep);
    run(2, "bf16-two-accum4", sets);
    snprintf(sets, sizeof(sets), "--set train.precision=bf16 --set train.accum_steps=4 --set train.zero=true %s", keep);
    run(2, "bf16-zero-accum4", sets);
    same_bits("bf16-two-accum4", "bf16-zero-accum4", "bf16: ZeRO-1 vs plain data parallel (NCCL, 2 ranks x 2)");
    // A BF16 run resumed from its checkpoint after step 2 continues as the straight run (the copy of the loaded
    // masters is rounded at offset 2 x P, as the straight run's Adam wrote it).
    run(1, "bf16-straight", "--set train.precision=bf16");
    char halves[400];
    snprintf(halves, sizeof(halves), "%s/bf16-halves", tmpdir);
    CHECK(test_run("%s train " SMALL " --set train.precision=bf16 --data %s --steps 2 --out %s > %s.log 2>&1 && "
                   "cp -r %s %s-fp32 && %s train --resume %s --set train.max_steps=%d -q >> %s.log 2>&1", mlm_emu,
                   slice, halves, halves, halves, halves, mlm_emu, halves, STEPS, halves) == 0,
          "bf16: the run in two halves failed; see %s.log", halves);
    same_bits("bf16-straight", "bf16-halves", "bf16: resumed after step 2 vs the straight run");
    crossload(halves);

    run(1, "plain", "");
    run(1, "nccl-one-rank", "--set train.nccl=true");
    same_bits("plain", "nccl-one-rank", "one rank through NCCL vs the plain step");

    int rc = test_finish("test_emu_dp");
    if (rc == 0) test_run("rm -rf %s", tmpdir);
    else printf("files kept in %s\n", tmpdir);
    return rc;
}
