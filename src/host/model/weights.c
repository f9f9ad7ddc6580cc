// weights.c: import and export of model weights as safetensors with PyTorch state_dict names.
#include "mlm/weights.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sys/stat.h>

#include "mlm/common.h"
#include "mlm/hf_bert.h"
#include "mlm/safetensors.h"

static ParamEntry *param_table(const ModelConfig *mc, int *n) {
    *n = model_param_table(mc, NULL);
    ParamEntry *tab = mlm_malloc((size_t)*n * sizeof(ParamEntry), "parameter table");
    model_param_table(mc, tab);
    return tab;
}

static size_t entry_numel(const ParamEntry *e) { return (size_t)e->shape[0] * (e->ndim == 2 ? (size_t)e->shape[1] : 1); }

// labml_nn's positional-encoding buffer, pe[rows, 1, C] (malloc'ed), as a tensor of the state_dict.
static float *pe_buffer_tensor(const ModelConfig *mc, StTensor *t) {
    int rows = model_pe_buffer_rows(mc);
    float *pe = mlm_malloc((size_t)rows * (size_t)mc->d_model * sizeof(float), "positional-encoding buffer");
    model_positional_encoding(rows, mc->d_model, pe);
    t->name = MODEL_PE_BUFFER_NAME;
    t->dtype = ST_F32;
    t->ndim = 3;
    t->shape[0] = rows;
    t->shape[1] = 1;
    t->shape[2] = mc->d_model;
    t->nbytes = (size_t)rows * (size_t)mc->d_model * sizeof(float);
    t->data = pe;
    return pe;
}

// The metadata of a byte or WordPiece vocabulary (weights.h) after the model's n_meta pairs in meta[]; the
// numbers are written into num[7][24]. Returns the new pair count.
static int subword_meta(const char **meta, int n_meta, const Vocab *v, const char *vocab_text, int lowercase,
                        char num[7][24]) {
    const char *keys[6] = {"vocab_size", "pad_id", "mask_id", "unk_id", "cls_id", "sep_id"};
    int vals[6] = {v->n_tokens, v->pad_id, v->mask_id, v->unk_id, v->cls_id, v->sep_id};
    meta[2 * n_meta] = "tokenizer";
    meta[2 * n_meta++ + 1] = v->kind == VOCAB_KIND_BYTE ? "byte" : "wordpiece";
    for (int i = 0; i < 6; i++, n_meta++) {
        snprintf(num[i], sizeof(num[i]), "%d", vals[i]);
        meta[2 * n_meta] = keys[i];
        meta[2 * n_meta + 1] = num[i];
    }
    meta[2 * n_meta] = "vocab_md5";
    meta[2 * n_meta++ + 1] = v->md5;
    if (v->kind == VOCAB_KIND_WORDPIECE) {
        meta[2 * n_meta] = "vocab_wordpiece";
        meta[2 * n_meta++ + 1] = vocab_text;
        meta[2 * n_meta] = "lowercase";
        meta[2 * n_meta++ + 1] = lowercase ? "true" : "false";
    }
    return n_meta;
}

int weights_save(const char *path, const ModelConfig *mc, const Vocab *v, const char *vocab_text, int lowercase,
                 const float *params, char *err, size_t errlen) {
    if (v->kind == VOCAB_KIND_WORDPIECE && !vocab_text) {
        snprintf(err, errlen, "the WordPiece vocabulary's text is missing, so the export could not be read back");
        return 1;
    }
    int n;
    ParamEntry *tab = param_table(mc, &n);
    // Every tensor of the reference's state_dict: the n parameters, then the positional-encoding buffer (labml_nn's;
    // BERT's positions are a parameter).
    int has_pe = mc->arch != MODEL_ARCH_BERT;
    StTensor *t = mlm_calloc((size_t)n + 1, sizeof(StTensor), "tensor list");
    for (int i = 0; i < n; i++) {
        t[i].name = tab[i].name;
        t[i].dtype = ST_F32;
        t[i].ndim = tab[i].ndim;
        t[i].shape[0] = tab[i].shape[0];
        t[i].shape[1] = tab[i].shape[1];
        t[i].nbytes = entry_numel(&tab[i]) * sizeof(float);
        t[i].data = params + tab[i].offset;
    }
    float *pe = has_pe ? pe_buffer_tensor(mc, &t[n]) : NULL;
    char d[5][24];
    snprintf(d[0], sizeof(d[0]), "%d", mc->d_model);
    snprintf(d[1], sizeof(d[1]), "%d", mc->n_heads);
    snprintf(d[2], sizeof(d[2]), "%d", mc->n_layers);
    snprintf(d[3], sizeof(d[3]), "%d", mc->d_ff);
    snprintf(d[4], sizeof(d[4]), "%d", mc->max_seq);
    int is_char = v->kind == VOCAB_KIND_CHAR;
    char *chars = mlm_malloc(is_char ? (size_t)v->n_chars * 5 + 1 : 1, "vocabulary");
    size_t k = 0;
    for (int i = 0; is_char && i < v->n_chars; i++) k += (size_t)utf8_encode(v->chars[i], chars + k);
    chars[k] = '\0';
    // The code points too: exact even for a NUL character, which ends the UTF-8 string above.
    char *codes = vocab_codepoints_text(v);
    const char *meta[2 * 24] = {"format", "pt", "producer", "mlm " MLM_VERSION, "d_model", d[0], "n_heads", d[1],
                                "n_layers", d[2], "d_ff", d[3], "seq_len", d[4]};
    int n_meta = 7;
    if (is_char) {  // exactly the keys of before byte and WordPiece vocabularies
        meta[2 * n_meta] = "vocab";
        meta[2 * n_meta++ + 1] = chars;
    }
    meta[2 * n_meta] = "vocab_codepoints";
    meta[2 * n_meta++ + 1] = codes;
    char num[7][24];
    if (!is_char) n_meta = subword_meta(meta, n_meta, v, vocab_text, lowercase, num);
    int rc = st_write(path, t, n + has_pe, meta, n_meta, err, errlen);
    free(pe);
    free(chars);
    free(codes);
    free(t);
    free(tab);
    return rc;
}

static void shape_text(int ndim, const int64_t *shape, char *out, size_t n) {
    size_t k = (size_t)snprintf(out, n, "[");
    for (int d = 0; d < ndim && k < n; d++) k += (size_t)snprintf(out + k, n - k, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (k < n) snprintf(out + k, n - k, "]");
}

// Buffers a PyTorch state_dict may hold besides parameters (labml_nn registers the positional encodings as a
// persistent buffer); mlm computes them itself, so they are accepted and not loaded.
static int is_known_buffer(const char *name) { return !strcmp(name, MODEL_PE_BUFFER_NAME); }

// Append one mismatch line to err (keeping the text NUL-terminated when it fills up).
static void add_problem(char *err, size_t errlen, int *count, const char *fmt, ...) MLM_PRINTF(4, 5);
static void add_problem(char *err, size_t errlen, int *count, const char *fmt, ...) {
    size_t k = strlen(err);
    if (++*count > 12 || k + 8 >= errlen) return;  // the count is reported in full below
    k += (size_t)snprintf(err + k, errlen - k, "\n  ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + k, errlen - k, fmt, ap);
    va_end(ap);
}

// The vocabulary the file was exported for: "vocab_codepoints" (comma-separated, exact), else "vocab" (the
// characters as UTF-8, as older exports wrote it). Returns 0 if found and well formed.
static int stored_vocab(const StFile *f, Vocab *v) {
    memset(v, 0, sizeof(*v));
    char *s = st_meta_get(f, "vocab_codepoints");
    int rc = 1;
    if (s) {
        rc = vocab_from_codepoints(s, v);
    } else if ((s = st_meta_get(f, "vocab"))) {
        uint32_t *cps;
        char err[128];
        long n = utf8_decode(s, strlen(s), &cps, err, sizeof(err));
        if (n >= 0 && n <= VOCAB_MAX_CHARS) {
            for (long i = 0; i < n; i++) v->chars[i] = cps[i];
            v->n_chars = (int)n;
            rc = 0;
        }
        if (n >= 0) free(cps);
    }
    free(s);
    if (!rc && v->kind != VOCAB_KIND_CHAR) return 0;  // byte/WordPiece: checked by vocab_from_codepoints
    for (int i = 1; !rc && i < v->n_chars; i++) rc = v->chars[i] <= v->chars[i - 1];
    if (!rc && v->n_chars == 0) rc = 1;
    return rc;
}

static void char_text(uint32_t cp, char *buf) {
    if (cp < 0x20 || cp == 0x7f) snprintf(buf, 16, "U+%04X", (unsigned)cp);
    else { buf[0] = '\''; int n = utf8_encode(cp, buf + 1); buf[n + 1] = '\''; buf[n + 2] = '\0'; }
}

// Characters of `a` that `b` lacks, as text (at most a dozen, then a count).
static void vocab_minus(const Vocab *a, const Vocab *b, char *out, size_t n) {
    size_t k = 0;
    int shown = 0, total = 0;
    out[0] = '\0';
    for (int i = 0; i < a->n_chars; i++) {
        if (vocab_id(b, a->chars[i]) >= 0) continue;
        if (++total > 12 || k + 20 >= n) continue;
        char c[16];
        char_text(a->chars[i], c);
        k += (size_t)snprintf(out + k, n - k, "%s%s", shown++ ? " " : "", c);
    }
    if (total > shown && k + 20 < n) snprintf(out + k, n - k, " and %d more", total - shown);
    if (total == 0) snprintf(out, n, "none");
}

static int vocab_mismatch(const StFile *f, const char *path, const Vocab *want, char *err, size_t errlen) {
    Vocab have;
    if (stored_vocab(f, &have)) {
        mlm_warn("%s records no vocabulary (not written by `mlm export`?), so it cannot be checked against this "
                 "corpus; make sure the embedding rows mean the same characters", path);
        return 0;
    }
    if (have.kind != VOCAB_KIND_CHAR || want->kind != VOCAB_KIND_CHAR) {
        // A byte or WordPiece vocabulary is its kind, size, specials and the md5 of its vocab.txt.
        if (have.kind == want->kind && have.n_tokens == want->n_tokens && have.pad_id == want->pad_id &&
            have.mask_id == want->mask_id && have.unk_id == want->unk_id && have.cls_id == want->cls_id &&
            have.sep_id == want->sep_id && !strcmp(have.md5, want->md5))
            return 0;
        char *a = vocab_codepoints_text(&have), *b = vocab_codepoints_text(want);
        snprintf(err, errlen, "%s was exported for the vocabulary %.200s, but this corpus has %.200s; its embedding "
                 "rows would mean other tokens: train on a shard set prepared with the weights' vocabulary, or --set "
                 "train.init_check_vocab=false to load them anyway", path, a, b);
        free(a);
        free(b);
        return 1;
    }
    if (have.n_chars == want->n_chars && !memcmp(have.chars, want->chars, (size_t)have.n_chars * sizeof(uint32_t)))
        return 0;
    char extra[256], missing[256];
    vocab_minus(&have, want, extra, sizeof(extra));
    vocab_minus(want, &have, missing, sizeof(missing));
    snprintf(err, errlen, "%s was exported for a vocabulary of %d characters, but this corpus has %d: only in the "
             "weights: %s; only in the corpus: %s. Its embedding rows would mean other characters; train on the corpus "
             "the weights came from, or --set train.init_check_vocab=false to load them anyway", path, have.n_chars,
             want->n_chars, extra, missing);
    return 1;
}

int weights_load(const char *path, const ModelConfig *mc, const Vocab *check_vocab, float *params, char *err,
                 size_t errlen) {
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return hf_import(path, mc, check_vocab, params, err, errlen);
    StFile f;
    if (st_read(path, &f, err, errlen)) return 1;
    int n, problems = 0;
    ParamEntry *tab = param_table(mc, &n);
    snprintf(err, errlen, "%s does not hold this model's tensors (model.* keys: d_model %d, %d heads, %d layers, "
             "d_ff %d; vocabulary %d tokens):", path, mc->d_model, mc->n_heads, mc->n_layers, mc->d_ff, mc->vocab);
    for (int i = 0; i < n; i++) {
        const StTensor *t = st_find(&f, tab[i].name);
        int64_t need_shape[2] = {tab[i].shape[0], tab[i].shape[1]};
        char have[96], need[96];
        shape_text(tab[i].ndim, need_shape, need, sizeof(need));
        if (!t) {
            add_problem(err, errlen, &problems, "missing: %s %s", tab[i].name, need);
        } else if (t->dtype != ST_F32 || t->ndim != tab[i].ndim || t->shape[0] != tab[i].shape[0] ||
                   (tab[i].ndim == 2 && t->shape[1] != tab[i].shape[1])) {
            shape_text(t->ndim, t->shape, have, sizeof(have));
            add_problem(err, errlen, &problems, "%s is %s %s, this model needs float32 %s", tab[i].name,
                        t->dtype == ST_F32 ? "float32" : "not float32:", have, need);
        }
    }
    for (int i = 0; i < f.n; i++) {
        int known = is_known_buffer(f.tensors[i].name);
        for (int k = 0; k < n && !known; k++) known = !strcmp(f.tensors[i].name, tab[k].name);
        if (!known) {
            char have[96];
            shape_text(f.tensors[i].ndim, f.tensors[i].shape, have, sizeof(have));
            add_problem(err, errlen, &problems, "not in this model: %s %s", f.tensors[i].name, have);
        }
    }
    if (problems > 12) {
        size_t k = strlen(err);
        snprintf(err + k, errlen - k, "\n  ... %d mismatches in all", problems);
    }
    int rc = problems > 0;
    if (!rc && check_vocab) rc = vocab_mismatch(&f, path, check_vocab, err, errlen);
    for (int i = 0; i < n && !rc; i++) {
        const StTensor *t = st_find(&f, tab[i].name);
        const float *x = t->data;
        for (size_t j = 0; j < entry_numel(&tab[i]) && !rc; j++)
            if (!isfinite(x[j])) {
                snprintf(err, errlen, "%s: tensor '%s' holds a non-finite value (%g at index %zu); these weights are "
                         "not usable", path, tab[i].name, (double)x[j], j);
                rc = 1;
            }
    }
    for (int i = 0; i < n && !rc; i++) memcpy(params + tab[i].offset, st_find(&f, tab[i].name)->data, entry_numel(&tab[i]) * sizeof(float));
    free(tab);
    st_free(&f);
    return rc;
}
