// checkpoint.c: saving and loading checkpoints (safetensors with metadata), retention of the last K.
#include "mlm/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/safetensors.h"
#include "mlm/shards.h"
#include "mlm/wordpiece.h"

#define CKPT_PREFIX "ckpt-"
#define CKPT_SUFFIX ".safetensors"

static char *config_text(const Config *c) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "out of memory serialising the config");
    config_write(f, c);
    fclose(f);
    return buf;
}

static int is_ckpt_name(const char *name, long *step) {
    size_t n = strlen(name), pl = strlen(CKPT_PREFIX), sl = strlen(CKPT_SUFFIX);
    if (n <= pl + sl || strncmp(name, CKPT_PREFIX, pl) || strcmp(name + n - sl, CKPT_SUFFIX)) return 0;
    char *end;
    long s = strtol(name + pl, &end, 10);
    if (end != name + n - sl || s < 0) return 0;
    *step = s;
    return 1;
}

// Steps of the checkpoints in dir, ascending (malloc'ed); returns the count.
static int list_checkpoints(const char *dir, long **steps_out) {
    DIR *d = opendir(dir);
    *steps_out = NULL;
    if (!d) return 0;
    int n = 0, cap = 0;
    long *steps = NULL;
    struct dirent *e;
    while ((e = readdir(d))) {
        long s;
        if (!is_ckpt_name(e->d_name, &s)) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            steps = realloc(steps, (size_t)cap * sizeof(long));
            if (!steps) mlm_fatal(MLM_EXIT_FAILURE, "out of memory listing checkpoints");
        }
        steps[n++] = s;
    }
    closedir(d);
    for (int i = 1; i < n; i++)  // insertion sort: a handful of files
        for (int j = i; j > 0 && steps[j - 1] > steps[j]; j--) {
            long t = steps[j];
            steps[j] = steps[j - 1];
            steps[j - 1] = t;
        }
    *steps_out = steps;
    return n;
}

int ckpt_find_latest(const char *run_dir, char *out, size_t outlen) {
    char dir[1100];
    snprintf(dir, sizeof(dir), "%s/checkpoints", run_dir);
    long *steps;
    int n = list_checkpoints(dir, &steps);
    if (n == 0) return 1;
    snprintf(out, outlen, "%s/" CKPT_PREFIX "%08ld" CKPT_SUFFIX, dir, steps[n - 1]);
    free(steps);
    return 0;
}

// Metadata of a version-2 checkpoint in the order md5.header covers them (every key but md5.header itself).
static const char *const META_KEYS[] = {
    "format", "format_version", "mlm_version", "step", "tokens", "valid_epochs", "best_valid_acc", "best_epoch",
    "elapsed_s", "last_valid_step", "last_valid_loss", "last_valid_acc", "n_params", "corpus_md5", "vocab",
    "config", "md5.params", "md5.adam.m", "md5.adam.v",
};
#define N_META_KEYS ((int)(sizeof(META_KEYS) / sizeof(META_KEYS[0])))
// A WordPiece checkpoint's vocabulary, after the rest (absent from character and byte checkpoints, which are thereby
// byte for byte what they were before these keys existed).
static const char *const VOCAB_KEYS[] = {"vocab_text", "vocab_lowercase"};
#define N_VOCAB_KEYS 2
static const char *const TENSOR_NAMES[3] = {"params", "adam.m", "adam.v"};

// md5 of "key\0value\0" for every metadata key in META_KEYS order, then "name\0dtype\0numel\0" for every tensor:
// the whole header except md5.header itself. extra: the VOCAB_KEYS values, or NULL when the file has none.
static void header_md5(const char *const *values, const char *const *extra, const StTensor *const tensors[3],
                       char out[33]) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "out of memory checksumming a checkpoint header");
    for (int i = 0; i < N_META_KEYS; i++) {
        fwrite(META_KEYS[i], 1, strlen(META_KEYS[i]) + 1, f);
        fwrite(values[i], 1, strlen(values[i]) + 1, f);
    }
    for (int i = 0; extra && i < N_VOCAB_KEYS; i++) {
        fwrite(VOCAB_KEYS[i], 1, strlen(VOCAB_KEYS[i]) + 1, f);
        fwrite(extra[i], 1, strlen(extra[i]) + 1, f);
    }
    for (int i = 0; i < 3; i++) {
        const StTensor *t = tensors[i];
        fprintf(f, "%s%c%s%c", TENSOR_NAMES[i], 0, !t ? "missing" : t->dtype == ST_F32 ? "f32" : "other", 0);
        for (int d = 0; t && d < t->ndim; d++) fprintf(f, "%lld,", (long long)t->shape[d]);
        fputc(0, f);
    }
    fclose(f);
    data_md5(buf, len, out);
    free(buf);
}

int ckpt_save(const char *run_dir, const Checkpoint *c, int keep, char *path_out, size_t path_len, char *err,
              size_t errlen) {
    char dir[1100], path[1200];
    snprintf(dir, sizeof(dir), "%s/checkpoints", run_dir);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "cannot create %s: %s", dir, strerror(errno));
        return 1;
    }
    snprintf(path, sizeof(path), "%s/" CKPT_PREFIX "%08ld" CKPT_SUFFIX, dir, c->st.step);
    size_t bytes = c->n_params * sizeof(float);
    StTensor t[3] = {
        {.name = "params", .dtype = ST_F32, .ndim = 1, .shape = {(int64_t)c->n_params}, .nbytes = bytes, .data = c->params},
        {.name = "adam.m", .dtype = ST_F32, .ndim = 1, .shape = {(int64_t)c->n_params}, .nbytes = bytes, .data = c->adam_m},
        {.name = "adam.v", .dtype = ST_F32, .ndim = 1, .shape = {(int64_t)c->n_params}, .nbytes = bytes, .data = c->adam_v},
    };
    char md5s[3][33], step[32], tokens[40], valid_epochs[32], best_acc[40], best_epoch[32], elapsed[40], n_params[32],
        ver[16], lv_step[32], lv_loss[40], lv_acc[40], hdr[33];
    for (int i = 0; i < 3; i++) data_md5(t[i].data, bytes, md5s[i]);
    snprintf(step, sizeof(step), "%ld", c->st.step);
    snprintf(tokens, sizeof(tokens), "%.0f", c->st.tokens);
    snprintf(valid_epochs, sizeof(valid_epochs), "%ld", c->st.valid_epochs);
    snprintf(best_acc, sizeof(best_acc), "%.17g", c->st.best_valid_acc);
    snprintf(best_epoch, sizeof(best_epoch), "%ld", c->st.best_epoch);
    snprintf(elapsed, sizeof(elapsed), "%.3f", c->st.elapsed_s);
    snprintf(lv_step, sizeof(lv_step), "%ld", c->st.last_valid_step);
    snprintf(lv_loss, sizeof(lv_loss), "%.17g", c->st.last_valid_loss);
    snprintf(lv_acc, sizeof(lv_acc), "%.17g", c->st.last_valid_acc);
    snprintf(n_params, sizeof(n_params), "%zu", c->n_params);
    snprintf(ver, sizeof(ver), "%d", CKPT_FORMAT_VERSION);
    char *cfg = config_text(&c->cfg), *voc = vocab_codepoints_text(&c->vocab);
    const char *values[N_META_KEYS] = {
        CKPT_FORMAT, ver, MLM_VERSION, step, tokens, valid_epochs, best_acc, best_epoch, elapsed, lv_step, lv_loss,
        lv_acc, n_params, c->corpus_md5, voc, cfg, md5s[0], md5s[1], md5s[2],
    };
    const StTensor *const tp[3] = {&t[0], &t[1], &t[2]};
    // WordPiece: the vocab.txt itself, checked against the md5 the vocabulary records (a mismatch here is a bug).
    const char *extra[N_VOCAB_KEYS] = {c->vocab_text, c->lowercase ? "true" : "false"};
    int has_extra = c->vocab.kind == VOCAB_KIND_WORDPIECE && c->vocab_text;
    if (has_extra) {
        char md5[33];
        data_md5(c->vocab_text, strlen(c->vocab_text), md5);
        if (strcmp(md5, c->vocab.md5) != 0) {
            snprintf(err, errlen, "the vocabulary text to store has md5 %s, the run's vocabulary %s", md5, c->vocab.md5);
            free(cfg);
            free(voc);
            return 1;
        }
    }
    header_md5(values, has_extra ? extra : NULL, tp, hdr);
    const char *meta[2 * (N_META_KEYS + N_VOCAB_KEYS + 1)];
    int n_meta = 0;
    for (int i = 0; i < N_META_KEYS; i++, n_meta++) {
        meta[2 * n_meta] = META_KEYS[i];
        meta[2 * n_meta + 1] = values[i];
    }
    for (int i = 0; has_extra && i < N_VOCAB_KEYS; i++, n_meta++) {
        meta[2 * n_meta] = VOCAB_KEYS[i];
        meta[2 * n_meta + 1] = extra[i];
    }
    meta[2 * n_meta] = "md5.header";
    meta[2 * n_meta + 1] = hdr;
    int rc = st_write(path, t, 3, meta, n_meta + 1, err, errlen);
    free(cfg);
    free(voc);
    if (rc) return rc;
    if (path_out) snprintf(path_out, path_len, "%s", path);
    long *steps;
    int n = list_checkpoints(dir, &steps);
    for (int i = 0; i < n - keep; i++) {
        snprintf(path, sizeof(path), "%s/" CKPT_PREFIX "%08ld" CKPT_SUFFIX, dir, steps[i]);
        if (unlink(path) != 0) mlm_warn("cannot delete old checkpoint %s: %s", path, strerror(errno));
    }
    free(steps);
    return 0;
}

// Metadata numbers are written by ckpt_save as plain decimal (integers) or %.17g (doubles); anything else
// is corruption, not a format to be lenient about.
static int meta_long(const char *s, const char *key, long min, long *out, const char *path, char *err, size_t errlen) {
    int rc = s ? mlm_parse_long(s, min, LONG_MAX, out) : 3;
    if (rc)
        snprintf(err, errlen, "checkpoint %s: metadata '%s' is %s", path, key,
                 rc == 3 ? "missing" : rc == 1 ? "not a whole number" : "out of range");
    return rc != 0;
}

static int meta_double(const char *s, const char *key, int finite, double *out, const char *path, char *err,
                       size_t errlen) {
    char *end = NULL;
    if (s) *out = strtod(s, &end);
    int bad = !s || end == s || *end || (finite && !isfinite(*out));
    if (bad) snprintf(err, errlen, "checkpoint %s: metadata '%s' is %s", path, key, s ? "not a finite number" : "missing");
    return bad;
}

static float *load_tensor(const StFile *f, const char *name, size_t n, const char *want, const char *path, char *err,
                          size_t errlen) {
    const StTensor *t = st_find(f, name);
    if (!t || t->dtype != ST_F32 || t->ndim != 1 || (uint64_t)t->shape[0] != (uint64_t)n) {
        snprintf(err, errlen, "checkpoint %s: tensor '%s' is missing or not float32 [%zu] (n_params)", path, name, n);
        return NULL;
    }
    char md5[33];
    data_md5(t->data, t->nbytes, md5);
    if (!want || strcmp(want, md5) != 0) {
        snprintf(err, errlen, "checkpoint %s: tensor '%s' fails its checksum (stored %s, computed %s); the file is "
                 "corrupt: use an earlier checkpoint", path, name, want ? want : "none", md5);
        return NULL;
    }
    float *out = mlm_malloc(t->nbytes, name);
    memcpy(out, t->data, t->nbytes);
    return out;
}

static int all_finite(const float *x, size_t n, int nonnegative) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i]) || (nonnegative && x[i] < 0)) return 0;
    return 1;
}

int ckpt_validate(const Checkpoint *c, char *err, size_t errlen) {
    char msg[512];
    const Vocab *v = &c->vocab;
    if (config_check(&c->cfg, msg, sizeof(msg))) {
        snprintf(err, errlen, "its configuration is inconsistent: %s", msg);
        return 1;
    }
    if (vocab_check(v, err, errlen)) return 1;  // char, byte or WordPiece (data.c)
    ModelConfig mc = model_config_from(&c->cfg, v->n_tokens, v->pad_id);
    if (model_config_check(&mc, msg, sizeof(msg))) {
        snprintf(err, errlen, "its model is invalid: %s", msg);
        return 1;
    }
    int B = MLM_MAX(c->cfg.batch_size, N_PROMPTS);
    double bytes = model_bytes(&mc, B);
    if (bytes > 1099511627776.0) {
        snprintf(err, errlen, "its configuration asks for %.3g bytes of model memory at batch %d (more than 2^40); "
                 "the file is corrupt or not usable on any machine", bytes, B);
        return 1;
    }
    size_t want = model_num_params(&mc);
    if (c->n_params != want) {
        snprintf(err, errlen, "it holds %zu parameters but its configuration (d_model %d, %d heads, %d layers, d_ff %d, "
                 "seq_len %d) and vocabulary (%d tokens) describe %zu; the file is corrupt or was edited",
                 c->n_params, mc.d_model, mc.n_heads, mc.n_layers, mc.d_ff, mc.max_seq, mc.vocab, want);
        return 1;
    }
    const TrainState *s = &c->st;
    // (train.epochs may be lowered on resume, so valid_epochs and best_epoch are not bounded by it.)
    if (s->step < 0 || !(s->tokens >= 0) || s->valid_epochs < 0 || s->best_epoch < -1 || !(s->elapsed_s >= 0) ||
        s->last_valid_step < -1 || s->last_valid_step > s->step || !(s->best_valid_acc >= 0 && s->best_valid_acc <= 1)) {
        snprintf(err, errlen, "its progress is out of range (step %ld, valid_epochs %ld, best_epoch %ld, "
                 "last_valid_step %ld)", s->step, s->valid_epochs, s->best_epoch, s->last_valid_step);
        return 1;
    }
    if (!all_finite(c->params, c->n_params, 0) || !all_finite(c->adam_m, c->n_params, 0) ||
        !all_finite(c->adam_v, c->n_params, 1)) {
        snprintf(err, errlen, "it holds non-finite parameters or Adam moments (training diverged before it was "
                 "saved?); use an earlier checkpoint");
        return 1;
    }
    return 0;
}

// A WordPiece checkpoint's vocab_text and vocab_lowercase: the text must have the vocabulary's md5 and parse as a
// vocab.txt of its size whose specials are the recorded ids.
static int load_vocab_text(Checkpoint *out, char *const extra[N_VOCAB_KEYS], const char *path, char *err,
                           size_t errlen) {
    const Vocab *v = &out->vocab;
    if (v->kind != VOCAB_KIND_WORDPIECE) {
        snprintf(err, errlen, "checkpoint %s: holds a vocab_text but its vocabulary is not WordPiece; the file is "
                 "corrupt or was edited", path);
        return 1;
    }
    char md5[33];
    data_md5(extra[0], strlen(extra[0]), md5);
    if (strcmp(md5, v->md5) != 0) {
        snprintf(err, errlen, "checkpoint %s: its stored vocabulary text has md5 %s, but its vocabulary records %s; "
                 "the file is corrupt or was edited: use an earlier checkpoint", path, md5, v->md5);
        return 1;
    }
    if (strcmp(extra[1], "true") && strcmp(extra[1], "false")) {
        snprintf(err, errlen, "checkpoint %s: metadata 'vocab_lowercase' is '%s', not true or false", path, extra[1]);
        return 1;
    }
    out->lowercase = !strcmp(extra[1], "true");
    char msg[512];
    WordPiece *wp = wp_load_text(extra[0], strlen(extra[0]), "vocab_text", out->lowercase, msg, sizeof(msg));
    if (!wp) {
        snprintf(err, errlen, "checkpoint %s: its stored vocabulary is unusable: %s", path, msg);
        return 1;
    }
    int sp[5] = {v->pad_id, v->mask_id, v->unk_id, v->cls_id, v->sep_id};
    static const char *const names[5] = {"[PAD]", "[MASK]", "[UNK]", "[CLS]", "[SEP]"};
    int bad = (long)wp_vocab_size(wp) != v->n_tokens;
    for (int i = 0; i < 5 && !bad; i++) bad = sp[i] != wp_id(wp, names[i]);
    if (bad)
        snprintf(err, errlen, "checkpoint %s: its stored vocabulary (%zu tokens) does not match the recorded size %d "
                 "and special ids; the file is corrupt", path, wp_vocab_size(wp), v->n_tokens);
    wp_free(wp);
    if (bad) return 1;
    out->vocab_text = mlm_malloc(strlen(extra[0]) + 1, "vocabulary text");
    memcpy(out->vocab_text, extra[0], strlen(extra[0]) + 1);
    return 0;
}

int ckpt_load(const char *path_in, Checkpoint *out, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    char path[1200];
    struct stat st;
    if (stat(path_in, &st) == 0 && S_ISDIR(st.st_mode)) {
        if (ckpt_find_latest(path_in, path, sizeof(path))) {
            snprintf(err, errlen, "%s holds no checkpoint (expected %s/checkpoints/" CKPT_PREFIX "*" CKPT_SUFFIX ")",
                     path_in, path_in);
            return 1;
        }
    } else {
        snprintf(path, sizeof(path), "%s", path_in);
    }
    StFile f;
    if (st_read(path, &f, err, errlen)) return 1;
    int rc = 1;
    char *values[N_META_KEYS] = {0}, *stored_hdr = st_meta_get(&f, "md5.header");
    for (int i = 0; i < N_META_KEYS; i++) values[i] = st_meta_get(&f, META_KEYS[i]);
    char *extra[N_VOCAB_KEYS];
    for (int i = 0; i < N_VOCAB_KEYS; i++) extra[i] = st_meta_get(&f, VOCAB_KEYS[i]);
    int has_extra = extra[0] || extra[1];
    const char *format = values[0], *cfg = values[15], *voc = values[14], *md5 = values[13];
    long version = 0, n_params = 0;
    if (!format || strcmp(format, CKPT_FORMAT) != 0) {
        snprintf(err, errlen, "%s is not an mlm checkpoint (its metadata has no format = %s); for weights exported "
                 "with `mlm export`, use `mlm train --init`", path, CKPT_FORMAT);
        goto done;
    }
    if (meta_long(values[1], "format_version", 0, &version, path, err, errlen)) goto done;
    if (version != CKPT_FORMAT_VERSION && version != 1) {
        snprintf(err, errlen, "checkpoint %s has format version %ld; this mlm reads versions 1 and %d", path, version,
                 CKPT_FORMAT_VERSION);
        goto done;
    }
    if (version >= 2) {
        for (int i = 0; i < N_META_KEYS; i++)
            if (!values[i]) {
                snprintf(err, errlen, "checkpoint %s: metadata '%s' is missing; the file is corrupt", path, META_KEYS[i]);
                goto done;
            }
        char hdr[33];
        const StTensor *const tp[3] = {st_find(&f, "params"), st_find(&f, "adam.m"), st_find(&f, "adam.v")};
        if (has_extra && !(extra[0] && extra[1])) {
            snprintf(err, errlen, "checkpoint %s: metadata '%s' is missing; the file is corrupt", path,
                     VOCAB_KEYS[extra[0] ? 1 : 0]);
            goto done;
        }
        header_md5((const char *const *)values, has_extra ? (const char *const *)extra : NULL, tp, hdr);
        if (!stored_hdr || strcmp(stored_hdr, hdr) != 0) {
            snprintf(err, errlen, "checkpoint %s: its header (step, configuration, vocabulary, ...) fails its checksum "
                     "(stored %s, computed %s); the file is corrupt or was edited: use an earlier checkpoint", path,
                     stored_hdr ? stored_hdr : "none", hdr);
            goto done;
        }
    } else {
        mlm_warn("checkpoint %s has format version 1, whose metadata (step, configuration, ...) no checksum covers; "
                 "it is accepted after the checks of its parts, and the next checkpoint of the run is version %d", path,
                 CKPT_FORMAT_VERSION);
    }
    if (f.n != 3) {
        snprintf(err, errlen, "checkpoint %s holds %d tensors; a checkpoint holds exactly params, adam.m and adam.v",
                 path, f.n);
        goto done;
    }
    out->st.last_valid_step = -1;
    out->st.last_valid_loss = out->st.last_valid_acc = NAN;
    if (meta_long(values[3], "step", 0, &out->st.step, path, err, errlen) ||
        meta_double(values[4], "tokens", 1, &out->st.tokens, path, err, errlen) ||
        meta_long(values[5], "valid_epochs", 0, &out->st.valid_epochs, path, err, errlen) ||
        meta_double(values[6], "best_valid_acc", 1, &out->st.best_valid_acc, path, err, errlen) ||
        meta_long(values[7], "best_epoch", -1, &out->st.best_epoch, path, err, errlen) ||
        meta_double(values[8], "elapsed_s", 1, &out->st.elapsed_s, path, err, errlen) ||
        meta_long(values[12], "n_params", 1, &n_params, path, err, errlen))
        goto done;
    if (version >= 2 &&
        (meta_long(values[9], "last_valid_step", -1, &out->st.last_valid_step, path, err, errlen) ||
         meta_double(values[10], "last_valid_loss", 0, &out->st.last_valid_loss, path, err, errlen) ||
         meta_double(values[11], "last_valid_acc", 0, &out->st.last_valid_acc, path, err, errlen)))
        goto done;
    if (!cfg || !voc || !md5 || strlen(md5) != 32) {
        snprintf(err, errlen, "checkpoint %s: metadata lacks its config, vocabulary or corpus checksum", path);
        goto done;
    }
    config_defaults(&out->cfg);
    char msg[512];
    if (config_parse_text(&out->cfg, cfg, "checkpoint config", msg, sizeof(msg))) {
        snprintf(err, errlen, "checkpoint %s: %s", path, msg);
        goto done;
    }
    if (vocab_from_codepoints(voc, &out->vocab)) {
        snprintf(err, errlen, "checkpoint %s: malformed vocabulary", path);
        goto done;
    }
    snprintf(out->corpus_md5, sizeof(out->corpus_md5), "%s", md5);
    out->n_params = (size_t)n_params;
    if (has_extra && load_vocab_text(out, extra, path, err, errlen)) goto done;
    // Sizes first (a tensor the metadata does not describe is never copied), then the tensors, then the rest.
    char want_md5[3][33];
    for (int i = 0; i < 3; i++) {
        char key[32];
        snprintf(key, sizeof(key), "md5.%s", TENSOR_NAMES[i]);
        char *m = st_meta_get(&f, key);
        snprintf(want_md5[i], sizeof(want_md5[i]), "%s", m ? m : "");
        free(m);
    }
    if (!(out->params = load_tensor(&f, "params", out->n_params, want_md5[0], path, err, errlen)) ||
        !(out->adam_m = load_tensor(&f, "adam.m", out->n_params, want_md5[1], path, err, errlen)) ||
        !(out->adam_v = load_tensor(&f, "adam.v", out->n_params, want_md5[2], path, err, errlen)))
        goto done;
    if (ckpt_validate(out, msg, sizeof(msg))) {
        snprintf(err, errlen, "checkpoint %s is refused: %s", path, msg);
        goto done;
    }
    rc = 0;
done:
    for (int i = 0; i < N_META_KEYS; i++) free(values[i]);
    for (int i = 0; i < N_VOCAB_KEYS; i++) free(extra[i]);
    free(stored_hdr);
    st_free(&f);
    if (rc) ckpt_free(out);
    return rc;
}

void ckpt_free(Checkpoint *c) {
    free(c->params);
    free(c->adam_m);
    free(c->adam_v);
    c->params = c->adam_m = c->adam_v = NULL;
    free(c->vocab_text);
    c->vocab_text = NULL;
}

int ckpt_attach_vocab(Checkpoint *c, const ShardSet *s, char *err, size_t errlen) {
    c->vocab_text = NULL;
    c->lowercase = 0;
    if (!s || c->vocab.kind != VOCAB_KIND_WORDPIECE) return 0;
    size_t len;
    char *text = mlm_read_file(s->m.vocab, &len), md5[33];
    if (!text) {
        snprintf(err, errlen, "cannot read the shard set's vocabulary %s: %s", s->m.vocab, strerror(errno));
        return 1;
    }
    data_md5(text, len, md5);
    if (strlen(text) != len || strcmp(md5, c->vocab.md5) != 0) {
        snprintf(err, errlen, "the shard set's vocabulary %s has changed since the run started (md5 %s, the set "
                 "records %s)", s->m.vocab, md5, c->vocab.md5);
        free(text);
        return 1;
    }
    c->vocab_text = text;
    c->lowercase = s->m.lowercase;
    return 0;
}

WordPiece *ckpt_wordpiece(const Checkpoint *c, char *err, size_t errlen) {
    if (c->vocab.kind != VOCAB_KIND_WORDPIECE) {
        snprintf(err, errlen, "the checkpoint's vocabulary is not WordPiece");
        return NULL;
    }
    if (!c->vocab_text) {
        snprintf(err, errlen, "the checkpoint was written before mlm stored WordPiece vocabularies in checkpoints; "
                 "continue its run for a step with this mlm (`mlm train --resume RUN_DIR --steps N+1`, with its shard "
                 "set in place) to write one that does");
        return NULL;
    }
    return wp_load_text(c->vocab_text, strlen(c->vocab_text), "the checkpoint's vocab_text", c->lowercase, err, errlen);
}
