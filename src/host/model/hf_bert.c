// hf_bert.c: model.arch = bert checkpoints as a Hugging Face transformers directory: export (config.json,
// model.safetensors, the tokenizer files) and import (`mlm train --init DIR`, BertForMaskedLM / BertForPreTraining /
// BertModel). mlm's parameter names for arch = bert are transformers' (model_param_table), so both are copies.
#define _XOPEN_SOURCE 700  // fsync, open_memstream
#include "mlm/hf_bert.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/json.h"
#include "mlm/safetensors.h"

// ---------------------------------------------------------------------------------------------------------
// Export

// text[len] to path through path.tmp, flushed to disk before the rename (as st_write does).
static int write_file_atomic(const char *path, const char *text, size_t len, char *err, size_t errlen) {
    char tmp[1400];
    snprintf(tmp, sizeof(tmp), "%.1300s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        mlm_set_error(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
        return 1;
    }
    int bad = fwrite(text, 1, len, f) != len || fflush(f) != 0 || fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        mlm_set_error(err, errlen, "cannot write %s: %s", path, strerror(errno));
        unlink(tmp);  // ours: the file this function just created
        return 1;
    }
    return 0;
}

// The shortest decimal that reads back as the same float: the value the configuration key was set to (1e-12, not
// the float's exact 9.99999996e-13), which transformers then rounds to the same float.
static void shortest_float(float v, char *buf, size_t n) {
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(buf, n, "%.*g", digits, (double)v);
        if ((float)strtod(buf, NULL) == v) return;
    }
}

// config.json with every field BertConfig has (transformers 5's to_dict, less its bookkeeping).
static char *config_json(const ModelConfig *mc, const Vocab *v) {
    char *buf = NULL, eps[40], drop[40], std[40];
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "out of memory writing config.json");
    shortest_float(mc->ln_eps, eps, sizeof(eps));
    shortest_float(mc->dropout, drop, sizeof(drop));
    shortest_float(mc->init_std, std, sizeof(std));
    fprintf(f,
            "{\n  \"architectures\": [\"BertForMaskedLM\"],\n  \"model_type\": \"bert\",\n"
            "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n  \"num_hidden_layers\": %d,\n"
            "  \"num_attention_heads\": %d,\n  \"intermediate_size\": %d,\n  \"hidden_act\": \"gelu\",\n"
            "  \"hidden_dropout_prob\": %s,\n  \"attention_probs_dropout_prob\": %s,\n"
            "  \"max_position_embeddings\": %d,\n  \"type_vocab_size\": %d,\n  \"initializer_range\": %s,\n"
            "  \"layer_norm_eps\": %s,\n  \"pad_token_id\": %d,\n  \"position_embedding_type\": \"absolute\",\n"
            "  \"use_cache\": true,\n  \"classifier_dropout\": null,\n  \"is_decoder\": false,\n"
            "  \"add_cross_attention\": false,\n  \"bos_token_id\": null,\n  \"eos_token_id\": null,\n"
            "  \"tie_word_embeddings\": true,\n  \"chunk_size_feed_forward\": 0,\n  \"dtype\": \"float32\"\n}\n",
            mc->vocab, mc->d_model, mc->n_layers, mc->n_heads, mc->d_ff, drop, drop, mc->max_positions, mc->type_vocab,
            std, eps, v->pad_id);
    fclose(f);
    return buf;
}

static char *tokenizer_config_json(const ModelConfig *mc, int lowercase) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "out of memory writing tokenizer_config.json");
    fprintf(f,
            "{\n  \"tokenizer_class\": \"BertTokenizer\",\n  \"do_lower_case\": %s,\n  \"model_max_length\": %d,\n"
            "  \"tokenize_chinese_chars\": true,\n  \"strip_accents\": null,\n  \"unk_token\": \"[UNK]\",\n"
            "  \"sep_token\": \"[SEP]\",\n  \"pad_token\": \"[PAD]\",\n  \"cls_token\": \"[CLS]\",\n"
            "  \"mask_token\": \"[MASK]\"\n}\n",
            lowercase ? "true" : "false", mc->max_positions);
    fclose(f);
    return buf;
}

static const char SPECIAL_TOKENS_MAP[] = "{\n  \"unk_token\": \"[UNK]\",\n  \"sep_token\": \"[SEP]\",\n"
                                         "  \"pad_token\": \"[PAD]\",\n  \"cls_token\": \"[CLS]\",\n"
                                         "  \"mask_token\": \"[MASK]\"\n}\n";

// DIR may be new (created here) or an empty directory: an export never replaces files it did not write.
static int prepare_dir(const char *dir, char *err, size_t errlen) {
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (mkdir(dir, 0755) == 0) return 0;
        mlm_set_error(err, errlen, "cannot create the directory %s: %s", dir, strerror(errno));
        return 1;
    }
    if (!S_ISDIR(st.st_mode)) {
        mlm_set_error(err, errlen, "%s exists and is not a directory; --format hf writes a directory: choose a new name",
                      dir);
        return 1;
    }
    DIR *d = opendir(dir);
    if (!d) {
        mlm_set_error(err, errlen, "cannot read the directory %s: %s", dir, strerror(errno));
        return 1;
    }
    struct dirent *e;
    int entries = 0;
    while ((e = readdir(d)))
        entries += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    if (entries) {
        mlm_set_error(err, errlen, "%s is not empty (%d entries); the export writes a new directory and replaces nothing: "
                      "choose a new --out or empty this one", dir, entries);
        return 1;
    }
    return 0;
}

int hf_export(const char *dir, const ModelConfig *mc, const float *params, const HfTokenizer *tok, char *err,
              size_t errlen) {
    if (mc->arch != MODEL_ARCH_BERT) {
        mlm_set_error(err, errlen, "--format hf writes transformers' BertForMaskedLM, which this checkpoint is not: it "
                      "is model.arch = labml (the reference's pre-LN TransformerMLM). Export it with --format "
                      "safetensors (labml_nn's state_dict names), or train with model.arch = bert");
        return 1;
    }
    if (!tok->vocab_text || tok->vocab->kind != VOCAB_KIND_WORDPIECE) {
        mlm_set_error(err, errlen, "--format hf writes a BertTokenizer (vocab.txt), so it needs a WordPiece run "
                      "(`mlm prepare --tokenizer wordpiece`); this checkpoint's vocabulary is %s",
                      tok->vocab->kind == VOCAB_KIND_WORDPIECE ? "WordPiece but not stored in it" : "not WordPiece");
        return 1;
    }
    if (prepare_dir(dir, err, errlen)) return 1;
    int n = model_param_table(mc, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n * sizeof(ParamEntry), "parameter table");
    model_param_table(mc, tab);
    StTensor *t = mlm_calloc((size_t)n, sizeof(StTensor), "tensor list");
    for (int i = 0; i < n; i++)
        t[i] = (StTensor){.name = tab[i].name, .dtype = ST_F32, .ndim = tab[i].ndim,
                          .shape = {tab[i].shape[0], tab[i].ndim == 2 ? tab[i].shape[1] : 0},
                          .nbytes = (size_t)tab[i].shape[0] * (tab[i].ndim == 2 ? (size_t)tab[i].shape[1] : 1) *
                                    sizeof(float),
                          .data = params + tab[i].offset};
    char path[1300];
    const char *meta[2] = {"format", "pt"};
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    int rc = st_write(path, t, n, meta, 1, err, errlen);
    free(t);
    free(tab);
    char *cfg = config_json(mc, tok->vocab), *tcfg = tokenizer_config_json(mc, tok->lowercase);
    const char *names[4] = {"config.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"};
    const char *texts[4] = {cfg, tok->vocab_text, tcfg, SPECIAL_TOKENS_MAP};
    for (int i = 0; i < 4 && !rc; i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        rc = write_file_atomic(path, texts[i], strlen(texts[i]), err, errlen);
    }
    free(cfg);
    free(tcfg);
    return rc;
}

// ---------------------------------------------------------------------------------------------------------
// Import

// Append one line to the list in err (the count goes on past what fits).
static void add_line(char *err, size_t errlen, int *count, const char *fmt, ...) MLM_PRINTF(4, 5);
static void add_line(char *err, size_t errlen, int *count, const char *fmt, ...) {
    size_t k = strlen(err);
    if (++*count > 16 || k + 8 >= errlen) return;
    k += (size_t)snprintf(err + k, errlen - k, "\n  ");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err + k, errlen - k, fmt, ap);
    va_end(ap);
}

// config.json against the model: each field BertConfig and mlm share, with the --set that makes mlm agree.
static void compare_config(const JsonObject *o, const ModelConfig *mc, const Vocab *v, char *err, size_t errlen,
                           int *problems) {
    const char *type = json_str(o, "model_type");
    if (!type || strcmp(type, "bert"))
        add_line(err, errlen, problems, "model_type is %s%s%s, not \"bert\": mlm imports BERT checkpoints only",
                 type ? "\"" : "", type ? type : "missing", type ? "\"" : "");
    const char *act = json_str(o, "hidden_act");
    if (act && strcmp(act, "gelu"))
        add_line(err, errlen, problems, "hidden_act is \"%s\"; model.arch = bert computes the exact erf GELU (\"gelu\") "
                 "only", act);
    const char *pos = json_str(o, "position_embedding_type");
    if (pos && strcmp(pos, "absolute"))
        add_line(err, errlen, problems, "position_embedding_type is \"%s\"; mlm has absolute positions only", pos);
    const struct { const char *field, *key; double have; } ints[] = {
        {"hidden_size", "model.d_model", mc->d_model},
        {"num_hidden_layers", "model.n_layers", mc->n_layers},
        {"num_attention_heads", "model.n_heads", mc->n_heads},
        {"intermediate_size", "model.d_ff", mc->d_ff},
        {"max_position_embeddings", "model.max_positions", mc->max_positions},
        {"type_vocab_size", "model.type_vocab_size", mc->type_vocab},
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++) {
        double want = json_num(o, ints[i].field, NAN);
        if (isnan(want)) add_line(err, errlen, problems, "config.json has no %s", ints[i].field);
        else if (want != ints[i].have)
            add_line(err, errlen, problems, "%s is %.0f, %s = %.0f: --set %s=%.0f", ints[i].field, want, ints[i].key,
                     ints[i].have, ints[i].key, want);
    }
    // Float settings: config.json's double against the float mlm computes with, compared as floats.
    const struct { const char *field, *key; float have; double fallback; } reals[] = {
        {"layer_norm_eps", "model.ln_eps", mc->ln_eps, 1e-12},
        {"hidden_dropout_prob", "model.dropout", mc->dropout, 0.1},
        {"attention_probs_dropout_prob", "model.dropout", mc->dropout, 0.1},
        {"initializer_range", "model.init_std", mc->init_std, 0.02},
    };
    for (size_t i = 0; i < sizeof(reals) / sizeof(reals[0]); i++) {
        double want = json_num(o, reals[i].field, reals[i].fallback);
        if ((float)want != reals[i].have)
            add_line(err, errlen, problems, "%s is %g, %s = %g: --set %s=%g", reals[i].field, want, reals[i].key,
                     (double)reals[i].have, reals[i].key, want);
    }
    double vocab = json_num(o, "vocab_size", NAN);
    if (vocab != mc->vocab)
        add_line(err, errlen, problems, "vocab_size is %.0f, the shard set's vocabulary has %d tokens: prepare the set "
                 "with this directory's vocab.txt (mlm prepare --tokenizer wordpiece --vocab DIR/vocab.txt)", vocab,
                 mc->vocab);
    double pad = json_num(o, "pad_token_id", 0);
    if (v && pad != v->pad_id)
        add_line(err, errlen, problems, "pad_token_id is %.0f, the shard set's [PAD] is %d: prepare the set with this "
                 "directory's vocab.txt", pad, v->pad_id);
}

// transformers' name of a checkpoint key: "bert." added where a BertModel lacks it, LayerNorm gamma/beta renamed.
static void canonical_name(const char *in, char *out, size_t n) {
    const char *s = !strncmp(in, "bert.", 5) ? in + 5 : in;
    if (!strncmp(s, "cls.", 4)) snprintf(out, n, "%s", s);
    else snprintf(out, n, "bert.%s", s);
    size_t len = strlen(out);
    if (len > 6 && !strcmp(out + len - 6, ".gamma")) snprintf(out + len - 6, n - (len - 6), ".weight");
    else if (len > 5 && !strcmp(out + len - 5, ".beta")) snprintf(out + len - 5, n - (len - 5), ".bias");
}

// Tensors a BERT checkpoint may hold that BertForMaskedLM does not: ignored.
static int is_ignored(const char *name) {
    return !strncmp(name, "bert.pooler.", 12) || !strncmp(name, "cls.seq_relationship.", 21) ||
           !strcmp(name, "bert.embeddings.position_ids");
}

static int is_head(const char *name) { return !strncmp(name, "cls.predictions.", 16); }

static size_t entry_numel(const ParamEntry *e) { return (size_t)e->shape[0] * (e->ndim == 2 ? (size_t)e->shape[1] : 1); }

static int same_shape(const StTensor *t, const ParamEntry *e) {
    return t->dtype == ST_F32 && t->ndim == e->ndim && t->shape[0] == e->shape[0] &&
           (e->ndim == 1 || t->shape[1] == e->shape[1]);
}

// The model's file: model.safetensors, or a message naming what the directory holds instead.
static int model_file(const char *dir, char *path, size_t n, char *err, size_t errlen) {
    snprintf(path, n, "%s/model.safetensors", dir);
    if (access(path, R_OK) == 0) return 0;
    char other[1300];
    snprintf(other, sizeof(other), "%s/model.safetensors.index.json", dir);
    if (access(other, R_OK) == 0) {
        mlm_set_error(err, errlen, "%s holds a sharded checkpoint (model.safetensors.index.json); save it as one file "
                      "(save_pretrained(DIR, max_shard_size=\"100GB\")) and pass that directory", dir);
        return 1;
    }
    snprintf(other, sizeof(other), "%s/pytorch_model.bin", dir);
    mlm_set_error(err, errlen, "%s has no model.safetensors%s; mlm reads safetensors only: load it in transformers and "
                  "save_pretrained it again", dir, access(other, R_OK) == 0 ? " (only a pytorch_model.bin)" : "");
    return 1;
}

int hf_import(const char *dir, const ModelConfig *mc, const Vocab *check_vocab, float *params, char *err,
              size_t errlen) {
    if (mc->arch != MODEL_ARCH_BERT) {
        mlm_set_error(err, errlen, "%s is a transformers model directory, which starts only a model.arch = bert run "
                      "(this run is labml's architecture): --set model.arch=bert, or pass weights exported with "
                      "`mlm export` as FILE.safetensors", dir);
        return 1;
    }
    char path[1300];
    snprintf(path, sizeof(path), "%s/config.json", dir);
    size_t len;
    char *text = mlm_read_file(path, &len);
    if (!text) {
        mlm_set_error(err, errlen, "%s has no readable config.json (%s): not a transformers model directory", dir,
                      strerror(errno));
        return 1;
    }
    JsonObject cfg;
    char msg[256];
    if (json_parse_object(text, len, &cfg, msg, sizeof(msg))) {
        mlm_set_error(err, errlen, "%s: %s", path, msg);
        free(text);
        return 1;
    }
    free(text);
    int problems = 0;
    snprintf(err, errlen, "%s does not match this model:", dir);
    compare_config(&cfg, mc, check_vocab, err, errlen, &problems);
    json_free(&cfg);
    if (check_vocab) {
        char vpath[1300], md5[33];
        snprintf(vpath, sizeof(vpath), "%s/vocab.txt", dir);
        if (check_vocab->kind != VOCAB_KIND_WORDPIECE)
            add_line(err, errlen, &problems, "the run's data is not a WordPiece shard set: prepare it with mlm prepare "
                     "--tokenizer wordpiece --vocab %s", vpath);
        else if (data_md5_file(vpath, md5))
            add_line(err, errlen, &problems, "vocab.txt is missing: its rows could not be checked against the shard set "
                     "(--set train.init_check_vocab=false loads the weights anyway)");
        else if (strcmp(md5, check_vocab->md5))
            add_line(err, errlen, &problems, "vocab.txt has md5 %s, the shard set's vocabulary %s: prepare the set "
                     "with mlm prepare --tokenizer wordpiece --vocab %s", md5, check_vocab->md5, vpath);
    }
    if (problems) {
        if (problems > 16) {
            size_t k = strlen(err);
            snprintf(err + k, errlen - k, "\n  ... %d mismatches in all", problems);
        }
        return 1;
    }
    if (model_file(dir, path, sizeof(path), err, errlen)) return 1;
    StFile f;
    if (st_read(path, &f, err, errlen)) return 1;
    int n = model_param_table(mc, NULL);
    ParamEntry *tab = mlm_malloc((size_t)n * sizeof(ParamEntry), "parameter table");
    model_param_table(mc, tab);
    const float **src = mlm_calloc((size_t)n, sizeof(float *), "tensor sources");
    const StTensor *decoder_w = NULL, *decoder_b = NULL;
    char ignored[1024] = "";
    snprintf(err, errlen, "%s does not hold this model's tensors (model.* keys: d_model %d, %d heads, %d layers, "
             "d_ff %d; vocabulary %d tokens):", path, mc->d_model, mc->n_heads, mc->n_layers, mc->d_ff, mc->vocab);
    for (int i = 0; i < f.n; i++) {
        const StTensor *t = &f.tensors[i];
        char name[256];
        canonical_name(t->name, name, sizeof(name));
        if (is_ignored(name)) {
            size_t k = strlen(ignored);
            snprintf(ignored + k, sizeof(ignored) - k, "%s%s", k ? ", " : "", t->name);
            continue;
        }
        if (!strcmp(name, "cls.predictions.decoder.weight")) { decoder_w = t; continue; }
        if (!strcmp(name, "cls.predictions.decoder.bias")) { decoder_b = t; continue; }
        int e = -1;
        for (int j = 0; j < n && e < 0; j++)
            if (!strcmp(name, tab[j].name)) e = j;
        if (e < 0) add_line(err, errlen, &problems, "not in BertForMaskedLM: %s", t->name);
        else if (!same_shape(t, &tab[e]))
            add_line(err, errlen, &problems, "%s is not float32 [%d%s%.0d]", t->name, tab[e].shape[0],
                     tab[e].ndim == 2 ? ", " : "", tab[e].ndim == 2 ? tab[e].shape[1] : 0);
        else src[e] = t->data;
    }
    // transformers ties decoder.bias to cls.predictions.bias: either name carries it.
    int bias_entry = n - 1;  // cls.predictions.bias is the table's last entry
    if (decoder_b && !src[bias_entry] && same_shape(decoder_b, &tab[bias_entry])) src[bias_entry] = decoder_b->data;
    const float *word = src[0];
    if (decoder_w && (!word || !same_shape(decoder_w, &tab[0]) || memcmp(decoder_w->data, word, decoder_w->nbytes)))
        add_line(err, errlen, &problems, "cls.predictions.decoder.weight differs from the word embeddings: mlm's decoder "
                 "is tied to them (tie_word_embeddings), an untied one cannot be loaded");
    int head_missing = 0, head_total = 0;
    for (int j = 0; j < n; j++) {
        head_total += is_head(tab[j].name);
        if (src[j]) continue;
        if (is_head(tab[j].name)) head_missing++;
        else add_line(err, errlen, &problems, "missing: %s", tab[j].name);
    }
    if (head_missing && head_missing < head_total)
        add_line(err, errlen, &problems, "the MLM head is incomplete (%d of its %d tensors); a head is loaded whole or "
                 "initialised whole", head_total - head_missing, head_total);
    for (int j = 0; j < n && !problems; j++)
        for (size_t k = 0; src[j] && k < entry_numel(&tab[j]) && !problems; k++)
            if (!isfinite(src[j][k])) {
                mlm_set_error(err, errlen, "%s: tensor '%s' holds a non-finite value at index %zu; these weights are not "
                              "usable", path, tab[j].name, k);
                problems = 1;
            }
    if (problems > 16) {
        size_t k = strlen(err);
        snprintf(err + k, errlen - k, "\n  ... %d mismatches in all", problems);
    }
    int rc = problems > 0;
    if (!rc) {
        for (int j = 0; j < n; j++)
            if (src[j]) memcpy(params + tab[j].offset, src[j], entry_numel(&tab[j]) * sizeof(float));
        if (ignored[0]) mlm_warn("--init %s: not part of BertForMaskedLM, ignored: %s", dir, ignored);
        if (head_missing)
            mlm_warn("--init %s: no MLM head (a BertModel checkpoint): cls.predictions initialised as transformers "
                     "does (transform N(0, %g), biases 0, LayerNorm 1, decoder tied to the word embeddings)", dir,
                     (double)mc->init_std);
    }
    free(src);
    free(tab);
    st_free(&f);
    return rc;
}
