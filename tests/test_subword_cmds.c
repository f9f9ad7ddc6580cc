// test_subword_cmds.c: `mlm eval`, `fill`, `export` and `info` on byte and WordPiece checkpoints. Two tiny runs
// (configs/bert-tiny.conf, 2 steps at batch 2) on shard sets that `mlm prepare` makes from 100 KB of Tiny
// Shakespeare (bytes; the BERT uncased vocab.txt), then:
//   eval: two evaluations agree exactly; the WordPiece loss equals a recomputation here from the model's dense
//     logits (double log-softmax at the masked positions, masks drawn as eval documents it); the byte set's
//     validation split gives exactly the figures of the same bytes given as a text file (--split all);
//   fill: one prediction per [MASK] at its token position, top-k entries whose ids are in the vocabulary and whose
//     text is that id's line of vocab.txt, the filled text holding the best piece;
//   export: the metadata round trip (tokenizer, ids, vocab_wordpiece byte for byte the vocab.txt), --init of the
//     export accepted on its set and refused on the other vocabulary;
//   info: kind, size and special ids;
//   refusals (non-zero exit and the message): a set of another vocabulary, a text with --split valid, a run whose
//     set has gone, a checkpoint edited in its stored vocabulary, one without it (from before), and ckpt_save of
//     a vocabulary text that is not the recorded one.
// About 13 s. usage: test_subword_cmds MLM CONFIG_DIR VOCAB_TXT CORPUS
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/mask.h"
#include "mlm/rng.h"
#include "mlm/safetensors.h"
#include "mlm/shards.h"
#include "mlm/train.h"
#include "test_util.h"

static const char *mlm, *configs, *vocab_txt;
static char tmp[256];

#define FEW "--set train.batch_size=2 --set train.threads=2 --set optim.warmup=2 --device cpu -q"

static char *slurp(const char *fmt, const char *a) {
    char path[600];
    snprintf(path, sizeof(path), fmt, tmp, a);
    size_t len;
    return mlm_read_file(path, &len);
}

// A JSON number after "key": in s (first occurrence), NAN if absent.
static double json_field(const char *s, const char *key) {
    char k[64];
    snprintf(k, sizeof(k), "\"%s\":", key);
    const char *p = s ? strstr(s, k) : NULL;
    return p ? strtod(p + strlen(k), NULL) : NAN;
}

// The eval loss recomputed from dense logits: sequences of T from the valid stream, masks as eval draws them.
static double recompute_valid_loss(const Checkpoint *ck, const ShardSet *set, long *targets) {
    const Config *c = &ck->cfg;
    int T = c->seq_len, V = ck->vocab.n_tokens, pad = ck->vocab.pad_id;
    MaskConfig mask = train_mask_config(c, &ck->vocab);
    ModelConfig mc = model_config_from(c, ck->vocab.n_tokens, ck->vocab.pad_id);
    CpuModel *m = cpu_model_create(&mc, 1);
    memcpy(m->params, ck->params, ck->n_params * sizeof(float));
    Rng rng;
    rng_init(&rng, c->seed, RNG_DOMAIN_EVAL);
    int *tok = malloc((size_t)T * sizeof(int)), *in = malloc((size_t)T * sizeof(int)), *lab = malloc((size_t)T * sizeof(int));
    float *u = malloc(4 * (size_t)T * sizeof(float));
    size_t n = (size_t)set->valid.n_tokens;
    double sum = 0;
    *targets = 0;
    for (size_t i = 0; i * T < n; i++) {
        size_t have = n - i * T < (size_t)T ? n - i * T : (size_t)T;
        shard_stream_read(&set->valid, i * T, have, tok);
        for (size_t k = have; k < (size_t)T; k++) tok[k] = pad;
        rng_uniform(&rng, 4 * (uint64_t)T * i, u, 4 * (size_t)T);
        mask_apply(&mask, tok, (size_t)T, u, in, lab);
        cpu_model_forward(m, in, NULL, 1, pad, NULL, NULL);
        for (int t = 0; t < T; t++) {
            if (lab[t] == pad) continue;
            const float *z = m->logits + (size_t)t * V;
            double mx = z[0], s = 0;
            for (int v = 1; v < V; v++) mx = z[v] > mx ? z[v] : mx;
            for (int v = 0; v < V; v++) s += exp((double)z[v] - mx);
            sum += mx + log(s) - z[lab[t]];
            ++*targets;
        }
    }
    free(tok); free(in); free(lab); free(u);
    rng_free(&rng);
    cpu_model_free(m);
    return sum / (double)*targets;
}

static void test_eval(void) {
    // Twice, without --data: the run's data.path names the set.
    CHECK(test_run("%s eval --ckpt %s/runwp --json > %s/e1.json 2> %s/e1.err && %s eval --ckpt %s/runwp --json > "
                   "%s/e2.json", mlm, tmp, tmp, tmp, mlm, tmp, tmp) == 0, "eval of the WordPiece run");
    char *e1 = slurp("%s/e1.json%s", ""), *e2 = slurp("%s/e2.json%s", "");
    CHECK(e1 && e2 && !strcmp(e1, e2), "two evaluations agree exactly");
    double loss = json_field(e1, "loss"), masked = json_field(e1, "masked"), tokens = json_field(e1, "tokens");
    Checkpoint ck;
    char err[1024], path[400];
    snprintf(path, sizeof(path), "%s/runwp", tmp);
    ShardSet set;
    snprintf(err, sizeof(err), "%s/wp", tmp);
    if (ckpt_load(path, &ck, err + 300, sizeof(err) - 300) == 0 && shard_set_open(&set, err, err + 300, 700) == 0) {
        long targets;
        double want = recompute_valid_loss(&ck, &set, &targets);
        CHECK(tokens == (double)set.valid.n_tokens, "eval read the whole validation split (%g of %llu tokens)", tokens,
              (unsigned long long)set.valid.n_tokens);
        CHECK(masked == (double)targets && fabs(loss - want) < 1e-4 * want,
              "eval loss %.9g over %g targets, recomputed from dense logits %.9g over %ld", loss, masked, want, targets);
        printf("WordPiece eval: loss %.6f over %ld masked of %g tokens (recomputed %.6f)\n", loss, targets, tokens, want);
        shard_set_close(&set);
        ckpt_free(&ck);
    } else {
        CHECK(0, "loading the run or its set: %s", err + 300);
    }
    free(e1);
    free(e2);
    // Byte: the validation split of the set, and the same bytes as a text file, evaluate alike.
    snprintf(err, sizeof(err), "%s/byte", tmp);
    if (shard_set_open(&set, err, err + 300, 700) == 0) {
        size_t n = (size_t)set.valid.n_tokens;
        int *ids = malloc(n * sizeof(int));
        shard_stream_read(&set.valid, 0, n, ids);
        snprintf(path, sizeof(path), "%s/valid.txt", tmp);
        FILE *f = fopen(path, "wb");
        for (size_t i = 0; f && i < n; i++) fputc(ids[i], f);
        if (f) fclose(f);
        free(ids);
        shard_set_close(&set);
    }
    CHECK(test_run("%s eval --ckpt %s/runbyte --data %s/byte --json > %s/b1.json && %s eval --ckpt %s/runbyte --data "
                   "%s/valid.txt --split all --json > %s/b2.json", mlm, tmp, tmp, tmp, mlm, tmp, tmp, tmp) == 0,
          "eval of the byte run on its set and on a text");
    char *b1 = slurp("%s/b1.json%s", ""), *b2 = slurp("%s/b2.json%s", "");
    CHECK(b1 && b2 && json_field(b1, "loss") == json_field(b2, "loss") && json_field(b1, "masked") ==
          json_field(b2, "masked") && json_field(b1, "accuracy") == json_field(b2, "accuracy") &&
          json_field(b1, "loss") > 0, "byte: set split and the same text agree (loss %.9g / %.9g)",
          json_field(b1, "loss"), json_field(b2, "loss"));
    free(b1);
    free(b2);
}

// The lines of vocab.txt (ids = line numbers).
static char **vocab_lines(char *text, int *n) {
    char **lines = malloc(40000 * sizeof(char *));
    *n = 0;
    for (char *p = text; *p && *n < 40000;) {
        char *nl = strchr(p, '\n');
        lines[(*n)++] = p;
        if (!nl) break;
        *nl = '\0';
        p = nl + 1;
    }
    return lines;
}

static void test_fill(void) {
    CHECK(test_run("%s fill --ckpt %s/runwp --json --top-k 5 'the [MASK] of denmark, [MASK]' > %s/f.json", mlm, tmp,
                   tmp) == 0, "fill with the WordPiece run");
    char *js = slurp("%s/f.json%s", ""), *vt = mlm_read_file(vocab_txt, &(size_t){0});
    int n_lines = 0;
    char **lines = vt ? vocab_lines(vt, &n_lines) : NULL;
    // the [MASK] of denmark , [MASK] -> ids 0 1 2 3 4 5: masks at 1 and 5
    const char *p = js ? strstr(js, "\"positions\":") : NULL;
    int idx[2] = {-1, -1}, n_pos = 0, n_top = 0, ok_text = 1, best = -1;
    for (const char *q = p; q && (q = strstr(q, "\"index\":")); q++) {
        if (n_pos < 2) idx[n_pos] = atoi(q + 8);
        n_pos++;
    }
    for (const char *q = p; q && (q = strstr(q, "{\"char\":\"")); q++) {
        const char *s = q + 9, *e = strchr(s, '"');
        const char *idp = strstr(q, "\"id\":");
        int id = idp ? atoi(idp + 5) : -1;
        if (n_top == 0) best = id;
        n_top++;
        int plain = id >= 0 && id < n_lines && !strpbrk(lines[id], "\"\\");  // no JSON escape to undo
        ok_text &= id >= 0 && id < n_lines && (!plain || (e && (size_t)(e - s) == strlen(lines[id]) &&
                                                           !strncmp(s, lines[id], (size_t)(e - s))));
    }
    CHECK(n_pos == 2 && idx[0] == 1 && idx[1] == 5, "predictions at token positions 1 and 5 (%d positions: %d %d)", n_pos,
          idx[0], idx[1]);
    CHECK(n_top == 10 && ok_text, "5 candidates per mask, each the text of its id in vocab.txt (%d)", n_top);
    if (best >= 0 && best < n_lines && strncmp(lines[best], "[", 1) && strncmp(lines[best], "##", 2) &&
        !strpbrk(lines[best], "\"\\")) {
        char want[200];
        snprintf(want, sizeof(want), "\"filled\":\"the %s of denmark", lines[best]);
        CHECK(strstr(js, want) != NULL, "the filled text holds the best piece (%s)", want);
    }
    free(lines);
    free(vt);
    free(js);
    CHECK(test_run("%s fill --ckpt %s/runbyte --json --top-k 3 'ab[MASK]c' > %s/fb.json", mlm, tmp, tmp) == 0,
          "fill with the byte run");
    js = slurp("%s/fb.json%s", "");
    n_top = 0;
    int ids_ok = 1;
    for (const char *q = js; q && (q = strstr(q, "\"id\":")); q++, n_top++) ids_ok &= atoi(q + 5) >= 0 && atoi(q + 5) < 261;
    CHECK(js && strstr(js, "\"index\":2,") && n_top == 3 && ids_ok, "byte: [MASK] is one token at position 2, 3 "
          "candidates with byte-vocabulary ids");
    free(js);
}

static void test_export_and_info(void) {
    char path[400], err[512];
    CHECK(test_run("%s export --ckpt %s/runwp --out %s/wp.safetensors > /dev/null && %s export --ckpt %s/runbyte --out "
                   "%s/byte.safetensors > /dev/null", mlm, tmp, tmp, mlm, tmp, tmp) == 0, "export");
    StFile f;
    snprintf(path, sizeof(path), "%s/wp.safetensors", tmp);
    if (st_read(path, &f, err, sizeof(err)) == 0) {
        size_t len;
        char *want = mlm_read_file(vocab_txt, &len), *have = st_meta_get(&f, "vocab_wordpiece");
        char *kind = st_meta_get(&f, "tokenizer"), *mask = st_meta_get(&f, "mask_id"), *lc = st_meta_get(&f, "lowercase");
        CHECK(want && have && !strcmp(want, have), "vocab_wordpiece is the vocab.txt byte for byte");
        CHECK(kind && mask && lc && !strcmp(kind, "wordpiece") && !strcmp(mask, "103") && !strcmp(lc, "true"),
              "tokenizer, mask_id and lowercase recorded");
        free(want); free(have); free(kind); free(mask); free(lc);
        st_free(&f);
    } else {
        CHECK(0, "%s", err);
    }
    snprintf(path, sizeof(path), "%s/byte.safetensors", tmp);
    if (st_read(path, &f, err, sizeof(err)) == 0) {
        char *kind = st_meta_get(&f, "tokenizer"), *size = st_meta_get(&f, "vocab_size"), *wp = st_meta_get(&f, "vocab_wordpiece");
        CHECK(kind && size && !strcmp(kind, "byte") && !strcmp(size, "261") && !wp, "byte export metadata");
        free(kind); free(size); free(wp);
        st_free(&f);
    }
    CHECK(test_run("%s train --config %s/bert-tiny.conf --set data.path=%s/wp " FEW " --steps 1 --init %s/wp.safetensors "
                   "-o %s/init > %s/init.log 2>&1", mlm, configs, tmp, tmp, tmp, tmp) == 0, "--init of the export");
    CHECK(test_run("%s train --config %s/bert-tiny.conf --set data.path=%s/byte " FEW " --steps 1 --init "
                   "%s/wp.safetensors -o %s/init2 > %s/init2.log 2>&1", mlm, configs, tmp, tmp, tmp, tmp) != 0,
          "--init of WordPiece weights on a byte set refused");
    CHECK(test_run("%s info --ckpt %s/runwp > %s/i1.txt && grep -q 'wordpiece: 30522 tokens; \\[PAD\\] 0, \\[MASK\\] 103, "
                   "\\[UNK\\] 100, \\[CLS\\] 101, \\[SEP\\] 102' %s/i1.txt && grep -q 'lower-cased, stored' %s/i1.txt",
                   mlm, tmp, tmp, tmp, tmp) == 0, "info of the WordPiece run");
    CHECK(test_run("%s info --ckpt %s/runbyte | grep -q 'byte (256 byte values + specials): 261 tokens; \\[PAD\\] 256, "
                   "\\[MASK\\] 260'", mlm, tmp) == 0, "info of the byte run");
}

// A command that must fail with `msg` in its message.
static void refused(const char *what, const char *msg, const char *fmt, const char *a, const char *b) {
    char cmd[1200], log[400];
    snprintf(log, sizeof(log), "%s/refused.log", tmp);
    snprintf(cmd, sizeof(cmd), fmt, a, b);
    int rc = test_run("%s %s > %s 2>&1", mlm, cmd, log);
    int has = test_run("grep -q '%s' %s", msg, log) == 0;
    CHECK(rc != 0 && rc < 128 && has, "%s: exit %d, message '%s' %s", what, rc, msg, has ? "given" : "missing");
}

static void test_refusals(void) {
    char byte_run[400], wp_set[400], wp_run[400], text[400];
    snprintf(byte_run, sizeof(byte_run), "%s/runbyte", tmp);
    snprintf(wp_set, sizeof(wp_set), "%s/wp", tmp);
    snprintf(wp_run, sizeof(wp_run), "%s/runwp", tmp);
    snprintf(text, sizeof(text), "%s/valid.txt", tmp);
    refused("a set of another vocabulary", "prepared with the wordpiece vocabulary", "eval --ckpt %s --data %s", byte_run,
            wp_set);
    refused("a text with --split valid", "has no validation split", "eval --ckpt %s --data %s --split valid", wp_run,
            text);
    // The run's set gone.
    test_run("mv %s/byte %s/byte.away", tmp, tmp);
    refused("the run's set gone", "which is not there", "eval --ckpt %s%s", byte_run, "");
    test_run("mv %s/byte.away %s/byte", tmp, tmp);
    // One byte of the stored vocabulary changed ("denmark" -> "denmarj"): the header checksum catches it.
    char ck[500], bad[500];
    snprintf(ck, sizeof(ck), "%s/runwp/checkpoints/ckpt-00000002.safetensors", tmp);
    snprintf(bad, sizeof(bad), "%s/bad.safetensors", tmp);
    test_run("cp %s %s && sed -i 's/\\\\ndenmark\\\\n/\\\\ndenmarj\\\\n/' %s", ck, bad, bad);
    CHECK(test_run("cmp -s %s %s", ck, bad) != 0, "the edit changed the file");
    refused("an edited stored vocabulary (fill)", "fails its checksum", "fill --ckpt %s 'a [MASK]'%s", bad, "");
    refused("an edited stored vocabulary (info)", "fails its checksum", "info --ckpt %s%s", bad, "");
    // A WordPiece checkpoint without its vocabulary (as written before): loads, but decoding says what to do.
    Checkpoint c;
    char err[1024], old_run[400];
    if (ckpt_load(ck, &c, err, sizeof(err)) == 0) {
        snprintf(old_run, sizeof(old_run), "%s/oldrun", tmp);
        test_run("mkdir -p %s", old_run);
        char *text_keep = c.vocab_text;
        c.vocab_text[0] ^= 1;  // not the recorded vocabulary: refused
        CHECK(ckpt_save(old_run, &c, 1, NULL, 0, err, sizeof(err)) != 0 && strstr(err, "md5"),
              "ckpt_save refuses a vocabulary text that is not the recorded one (%s)", err);
        c.vocab_text[0] ^= 1;
        c.vocab_text = NULL;
        CHECK(ckpt_save(old_run, &c, 1, NULL, 0, err, sizeof(err)) == 0, "saving without the text: %s", err);
        c.vocab_text = text_keep;
        ckpt_free(&c);
        refused("fill of a checkpoint without its vocabulary", "before mlm stored", "fill --ckpt %s 'a [MASK]'%s", old_run, "");
        refused("export of a checkpoint without its vocabulary", "before mlm stored", "export --ckpt %s --out %s/x.st",
                old_run, tmp);
        CHECK(test_run("%s info --ckpt %s | grep -q 'NOT stored'", mlm, old_run) == 0, "info says it is not stored");
    } else {
        CHECK(0, "%s", err);
    }
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: test_subword_cmds MLM CONFIG_DIR VOCAB_TXT CORPUS\n");
        return 2;
    }
    mlm = argv[1];
    configs = argv[2];
    vocab_txt = argv[3];
    if (access(argv[3], R_OK) != 0) return test_skip("the BERT vocab.txt (../shared/data) is missing");
    if (access(argv[4], R_OK) != 0) return test_skip("the corpus is missing");
    snprintf(tmp, sizeof(tmp), "/tmp/mlm_test_subword_%d", (int)getpid());
    test_run("rm -rf %s && mkdir -p %s", tmp, tmp);
    CHECK(test_run("head -c 100000 %s > %s/text.txt && %s prepare -q --tokenizer wordpiece --vocab %s --documents blank "
                   "--valid-fraction 0.03 -o %s/wp %s/text.txt && %s prepare -q --tokenizer byte --documents blank "
                   "--valid-fraction 0.03 -o %s/byte %s/text.txt", argv[4], tmp, mlm, argv[3], tmp, tmp, mlm, tmp, tmp) == 0,
          "mlm prepare failed");
    CHECK(test_run("%s train --config %s/bert-tiny.conf --set data.path=%s/wp " FEW " --steps 2 -o %s/runwp > %s/wp.log "
                   "2>&1 && %s train --config %s/bert-tiny.conf --set data.path=%s/byte " FEW " --steps 2 -o %s/runbyte > "
                   "%s/byte.log 2>&1", mlm, configs, tmp, tmp, tmp, mlm, configs, tmp, tmp, tmp) == 0,
          "the tiny runs failed (see %s/*.log)", tmp);
    if (!t_failures) {
        test_eval();
        test_fill();
        test_export_and_info();
        test_refusals();
    }
    if (!t_failures) test_run("rm -rf %s", tmp);
    return test_finish("test_subword_cmds");
}
