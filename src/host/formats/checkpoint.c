// checkpoint.c: saving and loading checkpoints (safetensors with metadata), retention of the last K.
#include "mlm/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/safetensors.h"

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

static char *vocab_text(const Vocab *v) {
    size_t cap = (size_t)v->n_chars * 12 + 1, k = 0;
    char *s = mlm_malloc(cap, "vocabulary text");
    s[0] = '\0';
    for (int i = 0; i < v->n_chars; i++) k += (size_t)snprintf(s + k, cap - k, i ? ",%u" : "%u", v->chars[i]);
    return s;
}

static int parse_vocab(const char *s, Vocab *v) {
    memset(v, 0, sizeof(*v));
    int n = 0;
    while (*s) {
        char *end;
        unsigned long cp = strtoul(s, &end, 10);
        if (end == s || cp > 0x10ffff || n >= VOCAB_MAX_CHARS || (n > 0 && cp <= v->chars[n - 1])) return 1;
        v->chars[n++] = (uint32_t)cp;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return 1;
    }
    if (n == 0) return 1;
    v->n_chars = n;
    v->pad_id = n;
    v->mask_id = n + 1;
    v->n_tokens = n + 2;
    return 0;
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
    char md5s[3][33], step[32], tokens[40], valid_epochs[32], best_acc[40], best_epoch[32], elapsed[40], n_params[32], ver[16];
    for (int i = 0; i < 3; i++) data_md5(t[i].data, bytes, md5s[i]);
    snprintf(step, sizeof(step), "%ld", c->st.step);
    snprintf(tokens, sizeof(tokens), "%.0f", c->st.tokens);
    snprintf(valid_epochs, sizeof(valid_epochs), "%ld", c->st.valid_epochs);
    snprintf(best_acc, sizeof(best_acc), "%.17g", c->st.best_valid_acc);
    snprintf(best_epoch, sizeof(best_epoch), "%ld", c->st.best_epoch);
    snprintf(elapsed, sizeof(elapsed), "%.3f", c->st.elapsed_s);
    snprintf(n_params, sizeof(n_params), "%zu", c->n_params);
    snprintf(ver, sizeof(ver), "%d", CKPT_FORMAT_VERSION);
    char *cfg = config_text(&c->cfg), *voc = vocab_text(&c->vocab);
    const char *meta[] = {
        "format", CKPT_FORMAT, "format_version", ver, "mlm_version", MLM_VERSION, "step", step, "tokens", tokens,
        "valid_epochs", valid_epochs, "best_valid_acc", best_acc, "best_epoch", best_epoch, "elapsed_s", elapsed,
        "n_params", n_params, "corpus_md5", c->corpus_md5, "vocab", voc, "config", cfg,
        "md5.params", md5s[0], "md5.adam.m", md5s[1], "md5.adam.v", md5s[2],
    };
    int rc = st_write(path, t, 3, meta, (int)(sizeof(meta) / sizeof(meta[0])) / 2, err, errlen);
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

static int meta_long(const StFile *f, const char *key, long *out, const char *path, char *err, size_t errlen) {
    char *s = st_meta_get(f, key);
    char *end = NULL;
    if (s) *out = strtol(s, &end, 10);
    int bad = !s || end == s || *end;
    if (bad) snprintf(err, errlen, "checkpoint %s: metadata '%s' is %s", path, key, s ? "not a number" : "missing");
    free(s);
    return bad;
}

static int meta_double(const StFile *f, const char *key, double *out, const char *path, char *err, size_t errlen) {
    char *s = st_meta_get(f, key);
    char *end = NULL;
    if (s) *out = strtod(s, &end);
    int bad = !s || end == s || *end;
    if (bad) snprintf(err, errlen, "checkpoint %s: metadata '%s' is %s", path, key, s ? "not a number" : "missing");
    free(s);
    return bad;
}

static float *load_tensor(const StFile *f, const char *name, size_t n, const char *path, char *err, size_t errlen) {
    const StTensor *t = st_find(f, name);
    if (!t || t->dtype != ST_F32 || t->ndim != 1 || (size_t)t->shape[0] != n) {
        snprintf(err, errlen, "checkpoint %s: tensor '%s' is missing or not float32 [%zu]", path, name, n);
        return NULL;
    }
    char key[64], md5[33];
    snprintf(key, sizeof(key), "md5.%s", name);
    char *want = st_meta_get(f, key);
    data_md5(t->data, t->nbytes, md5);
    if (!want || strcmp(want, md5) != 0) {
        snprintf(err, errlen, "checkpoint %s: tensor '%s' fails its checksum (stored %s, computed %s); the file is "
                 "corrupt: use an earlier checkpoint", path, name, want ? want : "none", md5);
        free(want);
        return NULL;
    }
    free(want);
    float *out = mlm_malloc(t->nbytes, name);
    memcpy(out, t->data, t->nbytes);
    return out;
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
    char *format = st_meta_get(&f, "format"), *cfg = NULL, *voc = NULL, *md5 = NULL;
    long version = 0, n_params = 0;
    if (!format || strcmp(format, CKPT_FORMAT) != 0) {
        snprintf(err, errlen, "%s is not an mlm checkpoint (its metadata has no format = %s); for weights exported "
                 "with `mlm export`, use `mlm train --init`", path, CKPT_FORMAT);
        goto done;
    }
    if (meta_long(&f, "format_version", &version, path, err, errlen)) goto done;
    if (version != CKPT_FORMAT_VERSION) {
        snprintf(err, errlen, "checkpoint %s has format version %ld; this mlm reads version %d", path, version,
                 CKPT_FORMAT_VERSION);
        goto done;
    }
    if (meta_long(&f, "step", &out->st.step, path, err, errlen) ||
        meta_double(&f, "tokens", &out->st.tokens, path, err, errlen) ||
        meta_long(&f, "valid_epochs", &out->st.valid_epochs, path, err, errlen) ||
        meta_double(&f, "best_valid_acc", &out->st.best_valid_acc, path, err, errlen) ||
        meta_long(&f, "best_epoch", &out->st.best_epoch, path, err, errlen) ||
        meta_double(&f, "elapsed_s", &out->st.elapsed_s, path, err, errlen) ||
        meta_long(&f, "n_params", &n_params, path, err, errlen))
        goto done;
    cfg = st_meta_get(&f, "config");
    voc = st_meta_get(&f, "vocab");
    md5 = st_meta_get(&f, "corpus_md5");
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
    if (parse_vocab(voc, &out->vocab)) {
        snprintf(err, errlen, "checkpoint %s: malformed vocabulary", path);
        goto done;
    }
    snprintf(out->corpus_md5, sizeof(out->corpus_md5), "%s", md5);
    out->n_params = (size_t)n_params;
    if (!(out->params = load_tensor(&f, "params", out->n_params, path, err, errlen)) ||
        !(out->adam_m = load_tensor(&f, "adam.m", out->n_params, path, err, errlen)) ||
        !(out->adam_v = load_tensor(&f, "adam.v", out->n_params, path, err, errlen)))
        goto done;
    rc = 0;
done:
    free(format);
    free(cfg);
    free(voc);
    free(md5);
    st_free(&f);
    if (rc) ckpt_free(out);
    return rc;
}

void ckpt_free(Checkpoint *c) {
    free(c->params);
    free(c->adam_m);
    free(c->adam_v);
    c->params = c->adam_m = c->adam_v = NULL;
}
