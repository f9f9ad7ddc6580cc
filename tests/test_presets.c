// test_presets.c: the BERT presets (configs/bert-{tiny,mini,small,medium,base}.conf) over a WordPiece shard set that
// `mlm prepare` makes from 200 KB of Tiny Shakespeare with the BERT uncased vocab.txt: each dry-runs, printing its parameter
// count (checked against the closed form of BertForMaskedLM) and memory; tiny and mini train a few
// steps; a tiny run resumed from its step-2 checkpoint ends bit-identical (weights and Adam moments) to the
// straight run; a shard set without manifest (an interrupted prepare) and a truncated shard are refused.
// usage: test_presets MLM CONFIG_DIR VOCAB_TXT CORPUS
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "test_util.h"

static const char *mlm, *configs;
static char tmp[256], set[300];

// Parameters of BertForMaskedLM (model.arch = bert): word embeddings V x C, 512 positions and 2 token types, the
// embedding LayerNorm (2 C); per layer the attention's q, k, v and output projections (4 C^2 + 4 C), the feed-forward
// (2 C F + F + C) and two LayerNorms (4 C); the head's transform (C^2 + C) and LayerNorm (2 C); the decoder tied to the
// word embeddings plus its bias V. bert-base with the uncased vocabulary: 109,514,298, as transformers counts it.
static long closed_form_params(long V, long C, long L) {
    long F = 4 * C;
    return V * C + 512 * C + 2 * C + 2 * C + L * (4 * C * C + 4 * C + 2 * C * F + F + C + 4 * C) + C * C + C + 2 * C + V;
}

static void test_dry_runs(void) {
    static const struct { const char *name; long L, C; } presets[] = {
        {"tiny", 2, 128}, {"mini", 4, 256}, {"small", 4, 512}, {"medium", 8, 512}, {"base", 12, 768}};
    for (int i = 0; i < 5; i++) {
        char out[400];
        snprintf(out, sizeof(out), "%s/dry-%s.txt", tmp, presets[i].name);
        int rc = test_run("%s train --config %s/bert-%s.conf --set data.path=%s --dry-run > %s 2>&1", mlm, configs,
                          presets[i].name, set, out);
        CHECK(rc == 0, "bert-%s dry run failed (see %s)", presets[i].name, out);
        size_t len;
        char *text = mlm_read_file(out, &len);
        const char *m = text ? strstr(text, "# model: ") : NULL;
        long params = -1;
        double mem = -1;
        if (m) sscanf(m, "# model: %ld parameters", &params);
        const char *e = m ? strstr(m, " MB Adam moments = ") : NULL;
        if (e) sscanf(e, " MB Adam moments = %lf MB", &mem);
        long want = closed_form_params(30522, presets[i].C, presets[i].L);
        CHECK(params == want, "bert-%s: %ld parameters printed, %ld by the closed form", presets[i].name, params, want);
        CHECK(mem > 4.0 * 4 * (double)want / 1e6, "bert-%s: memory %.1f MB printed", presets[i].name, mem);
        CHECK(text && strstr(text, "seq_len = 128") && strstr(text, "wordpiece, 30522 tokens ([PAD]=0 [MASK]=103"),
              "bert-%s: seq_len 128 and the vocabulary's own specials", presets[i].name);
        printf("bert-%-6s %11ld parameters, %9.1f MB at batch 256\n", presets[i].name, params, mem);
        free(text);
    }
}

static int load_tensors(const char *path, Checkpoint *c) {
    char err[1024];
    int rc = ckpt_load(path, c, err, sizeof(err));
    CHECK(rc == 0, "%s: %s", path, err);
    return rc == 0;
}

#define FEW "--set train.batch_size=2 --set train.log_every=1 --set train.threads=2 --set optim.warmup=2 --device cpu -q"

static void test_training_and_resume(void) {
    char a[400], c2[500], c4[500];
    snprintf(a, sizeof(a), "%s/tiny", tmp);
    CHECK(test_run("%s train --config %s/bert-tiny.conf --set data.path=%s " FEW " --set train.ckpt_every=2 --steps 4 "
                   "-o %s > %s.log 2>&1", mlm, configs, set, a, a) == 0, "bert-tiny training failed (see %s.log)", a);
    snprintf(c2, sizeof(c2), "%s/checkpoints/ckpt-00000002.safetensors", a);
    snprintf(c4, sizeof(c4), "%s/checkpoints/ckpt-00000004.safetensors", a);
    Checkpoint straight, resumed;
    if (!load_tensors(c4, &straight)) return;
    CHECK(straight.vocab.kind == VOCAB_KIND_WORDPIECE && straight.vocab.n_tokens == 30522 && straight.vocab.mask_id == 103,
          "the checkpoint records the WordPiece vocabulary");
    CHECK(straight.st.step == 4 && isfinite(straight.st.last_valid_loss) && straight.st.last_valid_loss > 0,
          "4 steps and a finite validation loss (%g)", straight.st.last_valid_loss);
    // Resume from step 2: drop the step-4 checkpoint and continue the same run.
    unlink(c4);
    CHECK(test_run("%s train --resume %s --steps 4 -q >> %s.log 2>&1", mlm, a, a) == 0, "resume failed (see %s.log)", a);
    if (load_tensors(c4, &resumed)) {
        size_t bytes = straight.n_params * sizeof(float);
        CHECK(resumed.n_params == straight.n_params && !memcmp(resumed.params, straight.params, bytes) &&
              !memcmp(resumed.adam_m, straight.adam_m, bytes) && !memcmp(resumed.adam_v, straight.adam_v, bytes),
              "resumed run over shards bit-identical to the straight one");
        CHECK(resumed.st.last_valid_loss == straight.st.last_valid_loss, "same validation loss");
        ckpt_free(&resumed);
    }
    ckpt_free(&straight);
    (void)c2;
    char b[400];
    snprintf(b, sizeof(b), "%s/mini", tmp);
    CHECK(test_run("%s train --config %s/bert-mini.conf --set data.path=%s " FEW " --steps 2 -o %s > %s.log 2>&1", mlm,
                   configs, set, b, b) == 0, "bert-mini training failed (see %s.log)", b);
}

static void test_damaged_sets(void) {
    char d[400];
    snprintf(d, sizeof(d), "%s/damaged", tmp);
    test_run("cp -r %s %s && truncate -s -3 %s/shards-*/train-00000.bin", set, d, d);
    CHECK(test_run("%s train --config %s/bert-tiny.conf --set data.path=%s --dry-run > %s.log 2>&1", mlm, configs, d,
                   d) == 1 && test_run("grep -q 'truncated' %s.log", d) == 0, "truncated shard refused");
    test_run("rm %s/manifest.txt", d);
    CHECK(test_run("%s train --config %s/bert-tiny.conf --set data.path=%s --dry-run > %s.log 2>&1", mlm, configs, d,
                   d) != 0, "a set without manifest refused");
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: test_presets MLM CONFIG_DIR VOCAB_TXT CORPUS\n");
        return 2;
    }
    mlm = argv[1];
    configs = argv[2];
    if (access(argv[3], R_OK) != 0) return test_skip("the BERT vocab.txt (../shared/data) is missing");
    if (access(argv[4], R_OK) != 0) return test_skip("the corpus is missing");
    snprintf(tmp, sizeof(tmp), "/tmp/mlm_test_presets_%d", (int)getpid());
    snprintf(set, sizeof(set), "%s/set", tmp);
    test_run("rm -rf %s && mkdir -p %s", tmp, tmp);
    // The first 200 KB of the corpus (about 50,000 tokens) keep the test short, under the sanitizers too.
    CHECK(test_run("head -c 200000 %s > %s/text.txt && %s prepare -q --tokenizer wordpiece --vocab %s --documents blank "
                   "--valid-fraction 0.03 -o %s %s/text.txt", argv[4], tmp, mlm, argv[3], set, tmp) == 0,
          "mlm prepare failed");
    test_dry_runs();
    test_training_and_resume();
    test_damaged_sets();
    if (!t_failures) test_run("rm -rf %s", tmp);
    return test_finish("test_presets");
}
