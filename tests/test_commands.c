// test_commands.c: mlm eval, fill, export and info on a tiny model trained for a few steps: eval repeats
// exactly and reports consistent numbers, fill predicts exactly the marked positions with sorted top-k
// probabilities, export -> train --init (lr 0) -> export reproduces the weights bit for bit, info reports the
// run, and bad input is refused with a nonzero exit.
#define _GNU_SOURCE  // memmem
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/model.h"
#include "mlm/safetensors.h"
#include "test_util.h"

static const char *mlm_bin, *corpus;
static char tmpdir[256], run_dir[300];
static long n_params, n_tokens;  // of the trained checkpoint

#define STEPS 20
#define SMALL "--set model.d_model=32 --set model.n_heads=4 --set model.n_layers=2 --set model.d_ff=48 " \
              "--set data.seq_len=16 --set train.batch_size=8 --set train.log_every=5 --set train.samples=false " \
              "--set train.ckpt_every=0 --set optim.warmup=10 --set train.threads=2 --set model.init=pytorch"


// Contents of tmpdir/name ("" if unreadable; malloc'ed).
static char *slurp(const char *name) {
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", tmpdir, name);
    char *s = mlm_read_file(path, NULL);
    return s ? s : mlm_strdup("");
}

static double field_num(const char *text, const char *key) {
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\":", key);
    const char *p = strstr(text, pat);
    return p ? strtod(p + strlen(pat), NULL) : NAN;
}

// The JSON string value of `key` in text, unescaped (the escapes mlm writes: \" \\ \n \r \t \u00XX).
static char *field_str(const char *text, const char *key) {
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\":\"", key);
    const char *p = strstr(text, pat);
    char *out = mlm_malloc(p ? strlen(p) + 1 : 1, "json string");
    size_t k = 0;
    for (p = p ? p + strlen(pat) : "\""; *p && *p != '"'; p++) {
        if (*p != '\\') { out[k++] = *p; continue; }
        p++;
        if (*p == 'n') out[k++] = '\n';
        else if (*p == 'r') out[k++] = '\r';
        else if (*p == 't') out[k++] = '\t';
        else if (*p == 'u') { out[k++] = (char)strtol((char[]){p[1], p[2], p[3], p[4], 0}, NULL, 16); p += 4; }
        else out[k++] = *p;
    }
    out[k] = '\0';
    return out;
}

static void train_tiny_model(void) {
    snprintf(run_dir, sizeof(run_dir), "%s/run", tmpdir);
    CHECK(test_run("%s train " SMALL " --data %s --steps %d --out %s -q > %s/train.log 2>&1", mlm_bin, corpus, STEPS,
              run_dir, tmpdir) == 0, "training failed (see %s/train.log)", tmpdir);
    Checkpoint ck;
    char err[1024];
    CHECK(ckpt_load(run_dir, &ck, err, sizeof(err)) == 0, "%s", err);
    n_params = (long)ck.n_params;
    n_tokens = ck.vocab.n_tokens;
    ckpt_free(&ck);
}

static void test_eval(void) {
    CHECK(test_run("%s eval --ckpt %s --json > %s/eval1.json", mlm_bin, run_dir, tmpdir) == 0, "eval --json failed");
    CHECK(test_run("%s eval --ckpt %s --json > %s/eval2.json", mlm_bin, run_dir, tmpdir) == 0, "eval --json failed");
    CHECK(test_run("%s eval --ckpt %s > %s/eval1.txt", mlm_bin, run_dir, tmpdir) == 0, "eval failed");
    CHECK(test_run("%s eval --ckpt %s > %s/eval2.txt", mlm_bin, run_dir, tmpdir) == 0, "eval failed");
    char *a = slurp("eval1.json"), *b = slurp("eval2.json"), *c = slurp("eval1.txt"), *d = slurp("eval2.txt");
    CHECK(a[0] && !strcmp(a, b), "two evaluations differ:\n%s%s", a, b);
    CHECK(c[0] && !strcmp(c, d), "two evaluation summaries differ:\n%s%s", c, d);
    double loss = field_num(a, "loss"), acc = field_num(a, "accuracy"), ppl = field_num(a, "perplexity");
    char *split = field_str(a, "split");
    printf("eval: %s", a);
    CHECK(!strcmp(split, "valid"), "eval without --data should use the validation split, got '%s'", split);
    CHECK(isfinite(loss) && loss > 0, "loss %g", loss);
    CHECK(acc >= 0 && acc <= 1, "accuracy %g", acc);
    CHECK(fabs(ppl - exp(loss)) <= 1e-6 * exp(loss), "perplexity %.17g but exp(loss) = %.17g", ppl, exp(loss));
    CHECK(field_num(a, "masked") > 0 && field_num(a, "step") == STEPS, "masked %g, step %g", field_num(a, "masked"),
          field_num(a, "step"));
    CHECK(strstr(c, "perplexity") != NULL, "the summary should give the perplexity:\n%s", c);
    free(split);
    free(a); free(b); free(c); free(d);

    // Another seed masks other positions; --data evaluates a whole text and warns about dropped characters.
    CHECK(test_run("%s eval --ckpt %s --json --seed 7 > %s/eval3.json", mlm_bin, run_dir, tmpdir) == 0, "eval --seed");
    a = slurp("eval1.json");
    b = slurp("eval3.json");
    CHECK(field_num(b, "seed") == 7 && strcmp(a, b) != 0, "--seed 7 should change the masks:\n%s", b);
    free(a); free(b);
    CHECK(test_run("printf 'First Citizen:\\nWe are accounted poor citizens, the patricians good. \\303\\251\\303\\251\\n' > "
              "%s/text.txt", tmpdir) == 0, "writing a text");
    CHECK(test_run("%s eval --ckpt %s --data %s/text.txt --split all --seed 3 --json > %s/eval4.json 2> %s/eval4.err",
                   mlm_bin, run_dir, tmpdir, tmpdir, tmpdir) == 0, "eval --data failed (see %s/eval4.err)", tmpdir);
    a = slurp("eval4.json");
    b = slurp("eval4.err");
    char *split4 = field_str(a, "split");
    CHECK(!strcmp(split4, "all") && field_num(a, "tokens") == 69, "--data should evaluate all 69 known characters:\n%s", a);
    CHECK(strstr(b, "2 of 71 characters") && strstr(b, "dropped"), "expected a warning about 2 dropped characters:\n%s", b);
    free(split4);
    free(a); free(b);

    // Bug 8: --data does not silently switch to the whole text: it needs --split. --split valid of the run's own
    // corpus is the default evaluation exactly (the same tokens, masks and numbers).
    CHECK(test_run("%s eval --ckpt %s --data %s > /dev/null 2> %s/eval5.err", mlm_bin, run_dir, corpus, tmpdir) ==
          MLM_EXIT_USAGE, "eval --data without --split must be refused with exit 2");
    a = slurp("eval5.err");
    CHECK(strstr(a, "--split valid") && strstr(a, "--split all"), "the refusal should offer both choices: %s", a);
    free(a);
    CHECK(test_run("%s eval --ckpt %s --data %s --split valid --json > %s/eval6.json", mlm_bin, run_dir, corpus,
                   tmpdir) == 0, "eval --data CORPUS --split valid");
    a = slurp("eval1.json");
    b = slurp("eval6.json");
    CHECK(field_num(a, "loss") == field_num(b, "loss") && field_num(a, "masked") == field_num(b, "masked") &&
          field_num(a, "tokens") == field_num(b, "tokens"), "--split valid of the run's corpus differs from the "
          "default evaluation:\n%s%s", a, b);
    free(a); free(b);
    CHECK(test_run("%s eval --ckpt %s --split sideways > /dev/null 2>&1", mlm_bin, run_dir) == MLM_EXIT_USAGE,
          "--split sideways must be refused");
}

// One JSON line of fill: exactly one prediction per mark, other characters unchanged, top-k sorted.
static void check_fill_json(const char *json, const char *text, int k) {
    char *got_text = field_str(json, "text"), *filled = field_str(json, "filled");
    CHECK(!strcmp(got_text, text), "\"text\" is '%s', expected '%s'", got_text, text);
    // Walk the input: each _ or [MASK] becomes one (ASCII-or-not) character of filled; the rest is copied.
    size_t n_marks = 0, i = 0, j = 0, mismatch = 0;
    while (text[i]) {
        int mark = text[i] == '_' || !strncmp(text + i, "[MASK]", 6);
        if (mark) {
            i += text[i] == '_' ? 1 : 6;
            n_marks++;
            if (filled[j]) j++;
            while ((filled[j] & 0xc0) == 0x80) j++;  // rest of a multi-byte prediction
        } else {
            mismatch += text[i++] != filled[j++];
        }
    }
    CHECK(mismatch == 0 && filled[j] == '\0', "filled '%s' does not keep the unmarked characters of '%s'", filled, text);
    // Positions: one object per mark, each with k candidates by decreasing probability.
    size_t n_pos = 0;
    const char *p = strstr(json, "{\"index\":");
    while (p) {
        const char *next = strstr(p + 1, "{\"index\":");
        size_t span = next ? (size_t)(next - p) : strlen(p);
        double sum = 0, prev = 2;
        int n_top = 0, sorted = 1;
        for (const char *q = strstr(p, "\"prob\":"); q && q < p + span; q = strstr(q + 1, "\"prob\":")) {
            double pr = strtod(q + 7, NULL);
            sorted &= pr <= prev && pr >= 0;
            prev = pr;
            sum += pr;
            n_top++;
        }
        CHECK(n_top == k, "position %zu has %d candidates, expected %d", n_pos, n_top, k);
        CHECK(sorted, "position %zu: probabilities are not sorted", n_pos);
        CHECK(sum <= 1 + 1e-6, "position %zu: top-%d probabilities sum to %.9g", n_pos, k, sum);
        if (k == n_tokens) CHECK(fabs(sum - 1) <= 1e-5, "position %zu: all probabilities sum to %.9g", n_pos, sum);
        n_pos++;
        p = next;
    }
    CHECK(n_pos == n_marks, "%zu predictions for %zu marks in '%s'", n_pos, n_marks, text);
    free(got_text);
    free(filled);
}

static void test_fill(void) {
    // Longer than seq_len (16): three windows, the last one padded.
    const char *text = "Fi_st Citizen:\nBefore we pr[MASK]ceed any furth_r, hear _e.";
    CHECK(test_run("%s fill --ckpt %s --json '%s' > %s/fill1.json", mlm_bin, run_dir, text, tmpdir) == 0, "fill --json");
    char *a = slurp("fill1.json");
    check_fill_json(a, text, 5);
    printf("fill: %s", a);
    free(a);
    CHECK(test_run("%s fill --ckpt %s --json --top-k 1000 '%s' > %s/fill2.json", mlm_bin, run_dir, text, tmpdir) == 0,
          "fill --top-k 1000");
    a = slurp("fill2.json");
    check_fill_json(a, text, (int)n_tokens);
    free(a);
    // Plain output (not a terminal): the filled text itself.
    CHECK(test_run("%s fill --ckpt %s 'the _ing' > %s/fill3.txt", mlm_bin, run_dir, tmpdir) == 0, "fill");
    a = slurp("fill3.txt");
    CHECK(strlen(a) >= 9 && !strncmp(a, "the ", 4) && strstr(a, "ing\n") && !strchr(a, '\x1b'),
          "plain fill output '%s'", a);
    free(a);

    // Standard input: one JSON object per line, in order.
    CHECK(test_run("printf 'a_c\\nthe kin_ of _\\n' | %s fill --ckpt %s --json --top-k 3 - > %s/fill4.json", mlm_bin,
              run_dir, tmpdir) == 0, "fill - (stdin)");
    a = slurp("fill4.json");
    char *second = strchr(a, '\n');
    CHECK(second && second[1] && strchr(second + 1, '\n') && !strchr(strchr(second + 1, '\n') + 1, '\n'),
          "expected two JSON lines:\n%s", a);
    if (second) {
        *second = '\0';
        check_fill_json(a, "a_c", 3);
        check_fill_json(second + 1, "the kin_ of _", 3);
    }
    free(a);
}

static int tensors_equal(const char *pa, const char *pb) {
    StFile a, b;
    char err[1024];
    if (st_read(pa, &a, err, sizeof(err))) { printf("%s\n", err); return 0; }
    if (st_read(pb, &b, err, sizeof(err))) { printf("%s\n", err); st_free(&a); return 0; }
    int same = a.n == b.n && a.n > 0;
    for (int i = 0; same && i < a.n; i++) {
        const StTensor *t = st_find(&b, a.tensors[i].name);
        same = t && t->dtype == a.tensors[i].dtype && t->ndim == a.tensors[i].ndim && t->nbytes == a.tensors[i].nbytes &&
               !memcmp(t->shape, a.tensors[i].shape, sizeof(t->shape)) && !memcmp(t->data, a.tensors[i].data, t->nbytes);
        if (!same) printf("tensor %s differs\n", a.tensors[i].name);
    }
    st_free(&a);
    st_free(&b);
    return same;
}

static void test_export_roundtrip(void) {
    char w1[400], w2[400], run2[400];
    snprintf(w1, sizeof(w1), "%s/w1.safetensors", tmpdir);
    snprintf(w2, sizeof(w2), "%s/w2.safetensors", tmpdir);
    snprintf(run2, sizeof(run2), "%s/run2", tmpdir);
    CHECK(test_run("%s export --ckpt %s --out %s > /dev/null", mlm_bin, run_dir, w1) == 0, "export failed");
    // One step at learning rate 0 leaves the weights as they were loaded.
    CHECK(test_run("%s train " SMALL " --data %s --init %s --steps 1 --set optim.lr=0 --out %s -q > %s/train2.log 2>&1",
              mlm_bin, corpus, w1, run2, tmpdir) == 0, "train --init failed (see %s/train2.log)", tmpdir);
    CHECK(test_run("%s export --ckpt %s --out %s > /dev/null", mlm_bin, run2, w2) == 0, "second export failed");
    CHECK(tensors_equal(w1, w2), "export -> train --init -> export changed the weights");
    StFile f;
    char err[1024];
    if (st_read(w1, &f, err, sizeof(err)) == 0) {
        const StTensor *emb = st_find(&f, "src_embed.linear.weight");
        CHECK(emb && emb->ndim == 2 && emb->shape[0] == n_tokens && emb->shape[1] == 32, "embedding tensor shape");
        CHECK(st_find(&f, "encoder.layers.1.feed_forward.layer2.bias") && st_find(&f, "generator.projection.weight"),
              "PyTorch state_dict names missing");
        st_free(&f);
    }
}

static void test_info(void) {
    CHECK(test_run("%s info --ckpt %s > %s/info.txt", mlm_bin, run_dir, tmpdir) == 0, "info failed");
    char *a = slurp("info.txt"), want[64];
    snprintf(want, sizeof(want), "%ld", n_params);
    CHECK(strstr(a, want) != NULL, "info does not mention the parameter count %s:\n%s", want, a);
    snprintf(want, sizeof(want), "step                 %d", STEPS);
    CHECK(strstr(a, want) != NULL, "info does not give step %d:\n%s", STEPS, a);
    CHECK(strstr(a, "last valid metrics   step") != NULL, "info should show the last valid metrics:\n%s", a);
    free(a);
}

static void test_errors(void) {
    CHECK(test_run("%s eval > /dev/null 2>&1", mlm_bin) == MLM_EXIT_USAGE, "eval without --ckpt must exit 2");
    CHECK(test_run("%s info > /dev/null 2>&1", mlm_bin) == MLM_EXIT_USAGE, "info without --ckpt must exit 2");
    CHECK(test_run("%s fill --ckpt %s/missing.safetensors 'a_' > /dev/null 2>&1", mlm_bin, tmpdir) != 0, "missing file");
    CHECK(test_run("%s eval --ckpt %s > /dev/null 2>&1", mlm_bin, corpus) != 0, "a text file is not a checkpoint");
    CHECK(test_run("%s info --ckpt %s/w1.safetensors > /dev/null 2>&1", mlm_bin, tmpdir) != 0,
          "exported weights are not a checkpoint");
    CHECK(test_run("%s fill --ckpt %s \"$(printf 'caf\\303\\251 _')\" > /dev/null 2> %s/fill.err", mlm_bin, run_dir,
              tmpdir) == MLM_EXIT_USAGE, "a character outside the vocabulary must be refused with exit 2");
    char *e = slurp("fill.err");
    CHECK(strstr(e, "U+00E9") != NULL, "the error should name the character: %s", e);
    free(e);
    CHECK(test_run("%s export --ckpt %s > /dev/null 2>&1", mlm_bin, run_dir) == MLM_EXIT_USAGE, "export without --out");
    CHECK(test_run("%s fill --ckpt %s > /dev/null 2>&1", mlm_bin, run_dir) == MLM_EXIT_USAGE, "fill without TEXT");
}

// A checkpoint written field by field as version 1 wrote them (no header checksum), with `n_params` floats
// in each tensor but `config` describing whatever the caller wants: the crafted files of bug 1.
static void write_v1_checkpoint(const char *path, const char *config, const char *vocab, size_t count, float fill) {
    float *x = mlm_malloc(count * sizeof(float), "crafted tensor");
    for (size_t i = 0; i < count; i++) x[i] = fill;
    char md5[33], np[32];
    data_md5(x, count * sizeof(float), md5);
    snprintf(np, sizeof(np), "%zu", count);
    StTensor t[3] = {
        {.name = "params", .dtype = ST_F32, .ndim = 1, .shape = {(int64_t)count}, .nbytes = count * 4, .data = x},
        {.name = "adam.m", .dtype = ST_F32, .ndim = 1, .shape = {(int64_t)count}, .nbytes = count * 4, .data = x},
        {.name = "adam.v", .dtype = ST_F32, .ndim = 1, .shape = {(int64_t)count}, .nbytes = count * 4, .data = x},
    };
    const char *meta[] = {"format", "mlm-checkpoint", "format_version", "1", "mlm_version", "0.1.0", "step", "20",
                          "tokens", "2560", "valid_epochs", "0", "best_valid_acc", "0", "best_epoch", "-1",
                          "elapsed_s", "1.000", "n_params", np, "corpus_md5", "5817707cc0906798f633225c5c9d812b",
                          "vocab", vocab, "config", config, "md5.params", md5, "md5.adam.m", md5, "md5.adam.v", md5};
    char err[1024];
    CHECK(st_write(path, t, 3, meta, (int)(sizeof(meta) / sizeof(meta[0]) / 2), err, sizeof(err)) == 0, "%s", err);
    free(x);
}

// Every command that reads a checkpoint must refuse it (exit 2, the message saying why), not crash or run.
static void check_all_commands_refuse(const char *file, const char *why, const char *what) {
    static const char *const cmds[] = {"fill --ckpt %s 'a_'", "eval --ckpt %s", "info --ckpt %s",
                                       "export --ckpt %s --out %s.exported", "train --resume %s --out %s.resumed"};
    for (int i = 0; i < 5; i++) {
        char sub[1500], errfile[400];
        snprintf(sub, sizeof(sub), cmds[i], file, file);
        snprintf(errfile, sizeof(errfile), "%s/refuse.err", tmpdir);
        int rc = test_run("%s %s > /dev/null 2> %s", mlm_bin, sub, errfile);
        char *e = slurp("refuse.err");
        CHECK(rc == MLM_EXIT_USAGE && strstr(e, why), "%s: `mlm %s` exited %d (expected 2, naming '%s'):\n%s", what,
              sub, rc, why, e);
        free(e);
    }
}

// Bug 1: fill and eval copied the checkpoint's n_params floats into a model sized from its config. A crafted
// checkpoint with 100,000 parameters and a config of d_model=2, n_layers=1 overflowed the heap; a smaller
// count ran on garbage. Now ckpt_load (ckpt_validate) refuses both, and non-finite weights, for every command.
static void test_crafted_checkpoints(void) {
    const char *tiny = "[model]\nd_model = 2\nn_heads = 1\nn_layers = 1\nd_ff = 2\n[data]\nseq_len = 4\n"
                       "[train]\nbatch_size = 2\n";
    // Vocabulary: 3 characters + PAD + MASK; the model this describes has a few hundred parameters.
    char path[400];
    snprintf(path, sizeof(path), "%s/crafted-big.safetensors", tmpdir);
    write_v1_checkpoint(path, tiny, "32,97,98", 100000, 0.5f);
    check_all_commands_refuse(path, "100000 parameters", "more parameters than the config describes");
    Checkpoint ck;
    char err[1024];
    CHECK(ckpt_load(path, &ck, err, sizeof(err)) != 0, "ckpt_load accepted the crafted checkpoint");
    snprintf(path, sizeof(path), "%s/crafted-small.safetensors", tmpdir);
    write_v1_checkpoint(path, tiny, "32,97,98", 7, 0.5f);
    check_all_commands_refuse(path, "7 parameters", "fewer parameters than the config describes");
    // The right count, but NaN weights; then the right count and finite weights, which must load.
    ModelConfig mc = {.vocab = 5, .d_model = 2, .n_heads = 1, .n_layers = 1, .d_ff = 2, .max_seq = 4,
                      .dropout = 0.1f, .ln_eps = 1e-5f};
    snprintf(path, sizeof(path), "%s/crafted-nan.safetensors", tmpdir);
    write_v1_checkpoint(path, tiny, "32,97,98", model_num_params(&mc), NAN);
    check_all_commands_refuse(path, "non-finite", "NaN weights");
    snprintf(path, sizeof(path), "%s/crafted-ok.safetensors", tmpdir);
    write_v1_checkpoint(path, tiny, "32,97,98", model_num_params(&mc), 0.01f);
    CHECK(test_run("%s fill --ckpt %s 'a_b' > /dev/null 2> %s/v1.err", mlm_bin, path, tmpdir) == 0,
          "a consistent version-1 checkpoint must still load (with a warning)");
    char *e = slurp("v1.err");
    CHECK(strstr(e, "format version 1") != NULL, "a version-1 checkpoint should be loaded with a warning:\n%s", e);
    free(e);
    // ckpt_validate on the trained checkpoint: it passes; more validated epochs than train.epochs (lowered on a
    // resume) still pass; one parameter made infinite, or a count off by one, does not.
    if (ckpt_load(run_dir, &ck, err, sizeof(err)) == 0) {
        CHECK(ckpt_validate(&ck, err, sizeof(err)) == 0, "the trained checkpoint: %s", err);
        ck.st.valid_epochs = ck.cfg.epochs + 3;
        CHECK(ckpt_validate(&ck, err, sizeof(err)) == 0, "valid_epochs above a lowered train.epochs: %s", err);
        ck.params[ck.n_params / 2] = INFINITY;
        CHECK(ckpt_validate(&ck, err, sizeof(err)) != 0 && strstr(err, "non-finite"), "an infinite weight: %s", err);
        ck.params[ck.n_params / 2] = 0;
        ck.n_params--;
        CHECK(ckpt_validate(&ck, err, sizeof(err)) != 0 && strstr(err, "parameters"), "a count off by one: %s", err);
        ck.n_params++;
        ckpt_free(&ck);
    }
}

// Replace the first occurrence of `from` by `to` (same length) in a file: an edit that keeps every offset.
static int patch_file(const char *path, const char *from, const char *to) {
    size_t len;
    char *buf = mlm_read_file(path, &len);
    if (!buf || strlen(from) != strlen(to)) { free(buf); return 1; }
    char *hit = memmem(buf, len, from, strlen(from));
    if (hit) memcpy(hit, to, strlen(to));
    FILE *f = hit ? fopen(path, "wb") : NULL;
    int rc = !f || fwrite(buf, 1, len, f) != len;
    if (f) rc |= fclose(f) != 0;
    free(buf);
    return rc;
}

// Bug 2: the md5s covered tensor data only; the step, the seed or the learning rate could be edited and every
// command took the edit. Now md5.header covers the whole header and every load checks it.
static void test_header_checksum(void) {
    char latest[600], path[700];
    CHECK(ckpt_find_latest(run_dir, latest, sizeof(latest)) == 0, "no checkpoint in %s", run_dir);
    static const char *const edits[][2] = {{"\"step\":\"20\"", "\"step\":\"90\""},
                                           {"seed = 1234", "seed = 1235"},
                                           {"\"best_epoch\":\"0\"", "\"best_epoch\":\"1\""}};
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof(path), "%s/edited-%d.safetensors", tmpdir, i);
        CHECK(test_run("cp %s %s", latest, path) == 0, "copy");
        CHECK(patch_file(path, edits[i][0], edits[i][1]) == 0, "cannot edit %s in %s", edits[i][0], path);
        CHECK(test_run("cmp -s %s %s", latest, path) != 0, "the edit %s did not change the file", edits[i][0]);
        check_all_commands_refuse(path, "header", edits[i][0]);
    }
}

// Bug 5: --init loaded six-layer weights into a two-layer model and weights of another vocabulary silently.
static void test_init_checks(void) {
    char w1[400];
    snprintf(w1, sizeof(w1), "%s/w1.safetensors", tmpdir);
    // Fewer layers: the file has tensors the model lacks; more layers: it lacks some.
    CHECK(test_run("%s train " SMALL " --set model.n_layers=1 --data %s --init %s --steps 1 --out %s/init-l1 -q "
                   "> /dev/null 2> %s/init1.err", mlm_bin, corpus, w1, tmpdir, tmpdir) == MLM_EXIT_USAGE,
          "two-layer weights must not load into a one-layer model");
    char *e = slurp("init1.err");
    CHECK(strstr(e, "not in this model: encoder.layers.1.") != NULL, "the extra tensors should be listed:\n%s", e);
    free(e);
    CHECK(test_run("%s train " SMALL " --set model.n_layers=3 --data %s --init %s --steps 1 --out %s/init-l3 -q "
                   "> /dev/null 2> %s/init3.err", mlm_bin, corpus, w1, tmpdir, tmpdir) == MLM_EXIT_USAGE,
          "two-layer weights must not load into a three-layer model");
    e = slurp("init3.err");
    CHECK(strstr(e, "missing: encoder.layers.2.") != NULL, "the missing tensors should be listed:\n%s", e);
    free(e);
    CHECK(test_run("%s train " SMALL " --set model.d_ff=40 --data %s --init %s --steps 1 --out %s/init-ff -q "
                   "> /dev/null 2> %s/initff.err", mlm_bin, corpus, w1, tmpdir, tmpdir) == MLM_EXIT_USAGE,
          "weights of another d_ff must be refused");
    e = slurp("initff.err");
    CHECK(strstr(e, "feed_forward.layer1.weight is float32 [48, 32], this model needs float32 [40, 32]") != NULL,
          "the shape mismatch should be spelled out:\n%s", e);
    free(e);
    // Another vocabulary of the same size: 'z' replaced by '#' (absent from Tiny Shakespeare).
    CHECK(test_run("tr z '#' < %s > %s/other-vocab.txt", corpus, tmpdir) == 0, "tr");
    CHECK(test_run("%s train " SMALL " --data %s/other-vocab.txt --init %s --steps 1 --out %s/init-voc -q > /dev/null "
                   "2> %s/initv.err", mlm_bin, tmpdir, w1, tmpdir, tmpdir) == MLM_EXIT_USAGE,
          "weights exported for another vocabulary must be refused");
    e = slurp("initv.err");
    CHECK(strstr(e, "only in the weights: 'z'") && strstr(e, "only in the corpus: '#'") &&
          strstr(e, "train.init_check_vocab=false"), "the vocabulary difference and the way out should be named:\n%s", e);
    free(e);
    CHECK(test_run("%s train " SMALL " --data %s/other-vocab.txt --init %s --steps 1 --out %s/init-voc2 -q --set "
                   "train.init_check_vocab=false > /dev/null 2>&1", mlm_bin, tmpdir, w1, tmpdir) == 0,
          "train.init_check_vocab=false must load them anyway");
}

// Bugs 7 and 8 on the command line: plain decimal integers only, and messages that say what is wrong.
static void test_messages(void) {
    CHECK(test_run("%s train --data %s --dry-run > /dev/null 2> %s/dir.err", mlm_bin, tmpdir, tmpdir) == MLM_EXIT_USAGE,
          "--data DIRECTORY must be refused with exit 2");
    char *e = slurp("dir.err");
    CHECK(strstr(e, "is a directory") && !strstr(e, "Input/output"), "--data DIRECTORY: %s", e);
    free(e);
    CHECK(test_run("%s fill --ckpt %s --top-k 1000000 'a_' > /dev/null 2> %s/topk.err", mlm_bin, run_dir, tmpdir) ==
          MLM_EXIT_USAGE, "--top-k 1000000 must be refused");
    e = slurp("topk.err");
    CHECK(strstr(e, "100000") != NULL, "--top-k should give its maximum: %s", e);
    free(e);
    CHECK(test_run("%s fill --ckpt %s \"$(printf 'a_\\377')\" > /dev/null 2> %s/utf8.err", mlm_bin, run_dir, tmpdir) ==
          MLM_EXIT_USAGE, "invalid UTF-8 input to fill must be refused");
    e = slurp("utf8.err");
    CHECK(strstr(e, "input line 1") && !strstr(e, "corpus"), "fill's input is not the corpus: %s", e);
    free(e);
    static const char *const bad_numbers[] = {"--set model.d_model=0x20", "--set train.seed=-1", "--set train.epochs=+3",
                                              "--set train.batch_size=1e1", "--steps 0x10", "--set data.seq_len=' 16'",
                                              "--set train.max_steps=99999999999999999999"};
    for (int i = 0; i < 7; i++)
        CHECK(test_run("%s train %s --data %s --dry-run > /dev/null 2>&1", mlm_bin, bad_numbers[i], corpus) ==
              MLM_EXIT_USAGE, "%s must be refused with exit 2", bad_numbers[i]);
    CHECK(test_run("%s eval --ckpt %s --seed -1 > /dev/null 2>&1", mlm_bin, run_dir) == MLM_EXIT_USAGE, "--seed -1");
    CHECK(test_run("%s eval --ckpt %s --seed 0x10 > /dev/null 2>&1", mlm_bin, run_dir) == MLM_EXIT_USAGE, "--seed 0x10");
    // A cross-key error caused by an override is blamed on the override, not on the config file.
    char conf[400];
    snprintf(conf, sizeof(conf), "%s/ok.conf", tmpdir);
    CHECK(test_run("printf '[model]\\nd_model = 32\\nn_heads = 4\\n' > %s", conf) == 0, "writing a config");
    CHECK(test_run("%s train --config %s --set model.n_heads=3 --data %s --dry-run > /dev/null 2> %s/set.err", mlm_bin,
                   conf, corpus, tmpdir) == MLM_EXIT_USAGE, "d_model 32 with --set model.n_heads=3 must be refused");
    e = slurp("set.err");
    CHECK(!strncmp(e, "mlm: error: --set model.n_heads=3:", 34) && strstr(e, "not divisible"),
          "the error should be blamed on the override: %s", e);
    free(e);
}

// A text a model can learn nothing from is trained on, but with a warning.
static void test_corpus_warnings(void) {
    CHECK(test_run("head -c 4000 /dev/zero > %s/nul.txt", tmpdir) == 0, "writing NULs");
    CHECK(test_run("%s train --data %s/nul.txt --dry-run > /dev/null 2> %s/nul.err", mlm_bin, tmpdir, tmpdir) == 0,
          "a corpus of NULs still dry-runs");
    char *e = slurp("nul.err");
    CHECK(strstr(e, "single distinct character") != NULL, "expected a warning about one distinct character:\n%s", e);
    free(e);
    CHECK(test_run("(head -c 3000 /dev/zero; head -c 1000 %s) > %s/binary.txt", corpus, tmpdir) == 0, "writing");
    CHECK(test_run("%s train --data %s/binary.txt --dry-run > /dev/null 2> %s/bin.err", mlm_bin, tmpdir, tmpdir) == 0,
          "a mostly-NUL corpus still dry-runs");
    e = slurp("bin.err");
    CHECK(strstr(e, "75% control characters") != NULL, "expected a warning about control characters:\n%s", e);
    free(e);
    CHECK(test_run("%s train --data %s --dry-run > %s/ok.out 2> %s/ok.err", mlm_bin, corpus, tmpdir, tmpdir) == 0,
          "dry run");
    e = slurp("ok.err");
    CHECK(!strstr(e, "warning"), "Shakespeare should not be warned about:\n%s", e);
    free(e);
    // The device memory the CUDA backend would need (test_gpu_memory checks the figures against the allocations),
    // or, built without CUDA, why there is none.
    e = slurp("ok.out");
    CHECK(strstr(e, "# device memory (CUDA backend, train.precision = tf32, batches of up to 64 x 32 tokens)") ||
              strstr(e, "# device memory: not estimated (this mlm was built without CUDA"),
          "the dry run does not print the device memory:\n%s", e);
    free(e);
}

// Settings under which nothing trains (issue 22, bug 11). Before: optim.eps = 0 trained into NaN at step 1 and blamed
// the learning rate (exit 1, after creating the run), mask.prob = 0 trained to loss 0 and reported validation loss
// 0.0000 as its best (exit 0). Now both are refused before anything is written (exit 2, naming the key and why);
// and a validation split in which masking selects nothing (here a probability so small that no position is drawn)
// reports no loss (null in metrics.jsonl) and stays out of "best".
static void test_degenerate_settings(void) {
    struct { const char *set, *want; } refused[] = {
        {"--set optim.eps=0", "optim.eps = 0 is 0 in float: Adam divides by sqrt(v) + eps"},
        {"--set optim.eps=1e-46", "optim.eps = 1e-46 is 0 in float"},  // a positive double whose float is 0
        {"--set mask.prob=0", "mask.prob = 0 selects no position for prediction"},
    };
    for (size_t i = 0; i < sizeof(refused) / sizeof(refused[0]); i++) {
        char dir[400];
        snprintf(dir, sizeof(dir), "%s/degenerate%zu", tmpdir, i);
        int code = test_run("%s train " SMALL " --data %s %s --steps 2 --out %s > %s/degenerate.log 2>&1", mlm_bin,
                            corpus, refused[i].set, dir, tmpdir);
        char *log = slurp("degenerate.log");
        CHECK(code == 2 && strstr(log, refused[i].want), "%s: exit %d, expected 2 with \"%s\":\n%s", refused[i].set,
              code, refused[i].want, log);
        CHECK(test_run("test -e %s", dir) != 0, "%s: the refused run created %s", refused[i].set, dir);
        free(log);
    }
    char dir[400], metrics[500];
    snprintf(dir, sizeof(dir), "%s/no-targets", tmpdir);
    snprintf(metrics, sizeof(metrics), "no-targets/metrics.jsonl");
    CHECK(test_run("%s train " SMALL " --data %s --set mask.prob=1e-12 --steps 3 --out %s > %s/no-targets.log 2>&1",
                   mlm_bin, corpus, dir, tmpdir) == 0, "training without targets failed (%s/no-targets.log)", tmpdir);
    char *log = slurp("no-targets.log"), *m = slurp(metrics);
    CHECK(strstr(log, "the validation split has no position selected for prediction, so it has no loss") &&
          !strstr(log, "valid loss 0.0000"), "the output should say the validation has no loss:\n%s", log);
    CHECK(strstr(m, "\"kind\":\"valid\"") && strstr(m, "\"loss\":null,\"accuracy\":null") &&
          !strstr(m, "\"kind\":\"valid\",\"step\":3,\"epoch\":0,\"tokens\":96,\"loss\":0,"),
          "metrics.jsonl should record validation without targets as null:\n%s", m);
    Checkpoint ck;
    char err[1024];
    CHECK(ckpt_load(dir, &ck, err, sizeof(err)) == 0, "%s", err);
    if (t_failures == 0) {
        CHECK(ck.st.best_epoch == -1 && ck.st.best_valid_acc == 0.0 && isnan(ck.st.last_valid_loss),
              "no best without targets: best epoch %ld, best accuracy %g, last loss %g", ck.st.best_epoch,
              ck.st.best_valid_acc, ck.st.last_valid_loss);
        ckpt_free(&ck);
    }
    CHECK(test_run("%s report %s > /dev/null 2>&1", mlm_bin, dir) == 0, "mlm report on a run without validation "
          "targets failed");
    free(log);
    free(m);
}

int main(int argc, char **argv) {
    if (argc < 3) return test_skip("usage: test_commands MLM_BINARY CORPUS");
    mlm_bin = argv[1];
    const char *full = test_corpus_path(argc - 1, argv + 1);
    if (!full) return test_skip("corpus not available");
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/mlm-test-commands-XXXXXX");
    if (!mkdtemp(tmpdir)) return test_skip("cannot create a temporary directory");
    static char slice[400];
    snprintf(slice, sizeof(slice), "%s/slice.txt", tmpdir);
    if (test_run("head -c 30000 %s > %s", full, slice) != 0) return test_skip("cannot slice the corpus");
    corpus = slice;
    train_tiny_model();
    if (t_failures == 0) {
        test_eval();
        test_fill();
        test_export_roundtrip();
        test_info();
        test_errors();
        test_crafted_checkpoints();
        test_header_checksum();
        test_init_checks();
        test_messages();
        test_corpus_warnings();
        test_degenerate_settings();
    }
    int rc = test_finish("test_commands");
    if (rc == 0) test_run("rm -rf %s", tmpdir);
    else printf("files kept in %s\n", tmpdir);
    return rc;
}
