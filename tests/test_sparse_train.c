// test_sparse_train.c: `mlm train --set train.sparse_prediction=true` on the CPU gives the per-step training
// losses of the dense run (the default) within 1e-5 relative over 8 steps, the key reaches the model through
// the configuration, and the resolved config records it. About 2 s.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "test_util.h"

#define STEPS 8
#define SMALL "--device cpu --set model.d_model=32 --set model.n_heads=4 --set model.n_layers=2 --set model.d_ff=48 " \
              "--set data.seq_len=32 --set train.batch_size=8 --set train.log_every=1 --set train.samples=false " \
              "--set train.ckpt_every=0 --set optim.warmup=10 --set train.threads=2"

int main(int argc, char **argv) {
    if (argc < 3) return test_skip("usage: test_sparse_train MLM_BINARY CORPUS");
    const char *mlm_bin = argv[1];
    const char *full = test_corpus_path(argc - 1, argv + 1);
    if (!full) return test_skip("corpus not available");
    char tmpdir[256], slice[300], dense[300], sparse[300];
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/mlm-test-sparse-XXXXXX");
    if (!mkdtemp(tmpdir)) return test_skip("cannot create a temporary directory");
    snprintf(slice, sizeof(slice), "%s/slice.txt", tmpdir);
    snprintf(dense, sizeof(dense), "%s/dense", tmpdir);
    snprintf(sparse, sizeof(sparse), "%s/sparse", tmpdir);
    if (test_run("head -c 30000 %s > %s", full, slice) != 0) return test_skip("cannot slice the corpus");
    CHECK(test_run("%s train " SMALL " --data %s --steps %d --out %s -q > %s.log 2>&1", mlm_bin, slice, STEPS, dense,
                   dense) == 0, "dense run failed (see %s.log)", dense);
    CHECK(test_run("%s train " SMALL " --set train.sparse_prediction=true --data %s --steps %d --out %s -q > %s.log "
                   "2>&1", mlm_bin, slice, STEPS, sparse, sparse) == 0, "sparse run failed (see %s.log)", sparse);
    static char ld[STEPS][32], ls[STEPS][32];
    int nd = test_train_losses(dense, ld, STEPS), ns = test_train_losses(sparse, ls, STEPS);
    CHECK(nd == STEPS && ns == STEPS, "train lines: dense %d, sparse %d, expected %d", nd, ns, STEPS);
    double worst = 0.0;
    for (int i = 0; i < STEPS && nd == STEPS && ns == STEPS; i++) {
        double a = atof(ld[i]), b = atof(ls[i]);
        double r = fabs(a - b) / fabs(a);
        printf("  step %d: loss dense %s sparse %s (rel %.1e)\n", i + 1, ld[i], ls[i], r);
        CHECK(a > 0 && r <= 1e-5, "step %d: loss dense %s sparse %s", i + 1, ld[i], ls[i]);
        worst = fmax(worst, r);
    }
    printf("worst relative loss difference over %d steps: %.1e\n", STEPS, worst);
    // The resolved configuration names the setting (so a resumed run keeps it).
    CHECK(test_run("grep -rqs 'sparse_prediction = true' %s", sparse) == 0,
          "the sparse run's files do not record sparse_prediction = true");
    int rc = test_finish("test_sparse_train");
    if (rc == 0) test_run("rm -rf %s", tmpdir);
    else printf("files kept in %s\n", tmpdir);
    return rc;
}
