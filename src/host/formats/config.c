// config.c: the configuration key table, the `key = value` / [section] parser, overrides, checks, printing.
#include "mlm/config.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"

typedef enum { K_INT, K_LONG, K_U64, K_DOUBLE, K_BOOL, K_STR, K_ENUM } KeyType;

typedef struct {
    const char *name;      // dotted key: section.key
    KeyType type;
    size_t offset;         // into Config
    double min, max;       // numeric range (inclusive)
    const char *choices;   // K_ENUM: names separated by '|', index = stored value
    const char *help;
} KeyDesc;

#define OFF(field) offsetof(Config, field)
static const KeyDesc KEYS[] = {
    {"data.path", K_STR, OFF(data_path), 0, 0, NULL, "corpus file (empty: data/, $MLM_DATA_MIRROR, then download), or a shard set from `mlm prepare`"},
    {"data.seq_len", K_INT, OFF(seq_len), 1, 65536, NULL, "characters per sequence"},
    {"data.train_split", K_DOUBLE, OFF(train_split), 0.01, 0.99, NULL, "fraction of the corpus used for training"},
    {"data.sampling", K_ENUM, OFF(sampling), 0, 0, "random|packed", "random: sequences at random offsets (the reference); packed: a shard set's documents, each followed by [SEP], cut into consecutive sequences"},
    {"model.d_model", K_INT, OFF(d_model), 2, 65536, NULL, "embedding width"},
    {"model.n_heads", K_INT, OFF(n_heads), 1, 1024, NULL, "attention heads (must divide d_model)"},
    {"model.n_layers", K_INT, OFF(n_layers), 1, 1024, NULL, "encoder layers"},
    {"model.d_ff", K_INT, OFF(d_ff), 1, 1 << 20, NULL, "feed-forward hidden width"},
    {"model.dropout", K_DOUBLE, OFF(dropout), 0, 0.99, NULL, "dropout probability at the four sites of each layer"},
    {"model.ln_eps", K_DOUBLE, OFF(ln_eps), 1e-12, 1, NULL, "LayerNorm epsilon (BERT's layer_norm_eps is 1e-12, as the bert presets set)"},
    {"model.init", K_ENUM, OFF(init_copy_layers), 0, 0, "pytorch|copy", "pytorch: every layer drawn independently; copy: all layers start as copies of one (the reference)"},
    {"model.arch", K_ENUM, OFF(arch), 0, 0, "labml|bert", "labml: the reference's pre-LN TransformerMLM; bert: Hugging Face's BertForMaskedLM (post-LN, GELU, learned positions, tied MLM head; `mlm export --format hf` writes it for transformers)"},
    {"model.max_positions", K_INT, OFF(max_positions), 1, 1 << 20, NULL, "bert: rows of the learned position table (max_position_embeddings; >= data.seq_len)"},
    {"model.type_vocab_size", K_INT, OFF(type_vocab_size), 1, 1 << 16, NULL, "bert: token types (type_vocab_size; MLM uses type 0 everywhere)"},
    {"model.init_std", K_DOUBLE, OFF(init_std), 1e-9, 10, NULL, "bert: initial weights N(0, init_std) (initializer_range)"},
    {"mask.scheme", K_ENUM, OFF(mask_scheme), 0, 0, "reference|bert", "reference: labml's independent 10%/10% draws; bert: conditional 80/10/10"},
    {"mask.prob", K_DOUBLE, OFF(mask_prob), 0, 1, NULL, "probability that a position is selected for prediction"},
    {"mask.unchanged_prob", K_DOUBLE, OFF(mask_unchanged_prob), 0, 1, NULL, "selected positions left unchanged"},
    {"mask.random_prob", K_DOUBLE, OFF(mask_random_prob), 0, 1, NULL, "selected positions replaced by a random token"},
    {"mask.no_mask", K_STR, OFF(no_mask_chars), 0, 0, NULL, "characters never selected, e.g. \"\\n\""},
    {"mask.whole_word", K_BOOL, OFF(mask_whole_word), 0, 1, NULL, "select all WordPiece pieces of a word together (whole-word masking; with a character vocabulary every token is a word)"},
    {"train.batch_size", K_INT, OFF(batch_size), 1, 1 << 20, NULL, "sequences per optimizer step"},
    {"train.epochs", K_INT, OFF(epochs), 1, 1 << 30, NULL, "passes over the training split"},
    {"train.max_steps", K_LONG, OFF(max_steps), 0, 1e15, NULL, "stop after this many optimizer steps (0: no limit)"},
    {"train.seed", K_U64, OFF(seed), 0, 1.8e19, NULL, "seed of every random stream"},
    {"train.grad_clip", K_DOUBLE, OFF(grad_clip), 0, 1e9, NULL, "global gradient-norm clip (0: off)"},
    {"train.device", K_ENUM, OFF(device), 0, 0, "auto|cpu|cuda", "where to train (auto: the GPU when there is one)"},
    {"train.eval_dropout", K_BOOL, OFF(eval_dropout), 0, 1, NULL, "keep dropout on in validation and samples (the reference does)"},
    {"train.log_every", K_INT, OFF(log_every), 1, 1 << 30, NULL, "progress and metrics every N steps"},
    {"train.ckpt_every", K_INT, OFF(ckpt_every), 0, 1 << 30, NULL, "checkpoint every N steps (0: only at the end)"},
    {"train.ckpt_minutes", K_DOUBLE, OFF(ckpt_minutes), 0, 1e6, NULL, "also checkpoint after this many minutes of wall time since the last one, so a kill loses at most that much (0: off)"},
    {"train.keep_ckpts", K_INT, OFF(keep_ckpts), 1, 1 << 20, NULL, "checkpoints kept"},
    {"train.init_check_vocab", K_BOOL, OFF(init_check_vocab), 0, 1, NULL, "with --init, refuse weights exported for another vocabulary (false: load them anyway, e.g. to fine-tune on a text with as many characters)"},
    {"train.threads", K_INT, OFF(threads), 0, 4096, NULL, "CPU threads (0: OpenMP default)"},
    {"train.precision", K_ENUM, OFF(precision), 0, 0, "fp32|tf32|bf16", "fp32; tf32: the GPU's FP32 matmuls on TF32 tensor cores; bf16: BF16 parameters copy, activations and their gradients with FP32 master weights, Adam moments and accumulation (on the CPU: the same roundings, the GPU's reference). Replaces train.tf32 = true | false (still read as tf32 | fp32)"},
    {"train.cuda_graph", K_BOOL, OFF(cuda_graph), 0, 1, NULL, "GPU: capture the training step and the validation forward as CUDA graphs once per batch shape and replay them (false: plain launches; the same results bit for bit)"},
    {"train.samples", K_BOOL, OFF(samples), 0, 1, NULL, "print the sample predictions every epoch"},
    // ---- gradient accumulation and data parallel (issue 13)
    {"train.accum_steps", K_INT, OFF(accum_steps), 1, 1 << 20, NULL, "micro-batches per optimizer step, over all ranks (must divide train.batch_size and be a multiple of the ranks); gradients summed in a fixed order"},
    {"train.zero", K_BOOL, OFF(zero), 0, 1, NULL, "data parallel: shard the Adam moments and the update over the ranks (ZeRO stage 1); same bits as without"},
    {"train.dist_timeout", K_DOUBLE, OFF(dist_timeout), 1, 1e6, NULL, "data parallel: seconds a rank waits for another before the job stops with a message"},
    {"train.nccl", K_BOOL, OFF(nccl), 0, 1, NULL, "CUDA backend: exchange gradients through NCCL (automatic with several ranks; true forces it on one rank, as tools/gpu_verify.sh checks)"},
    // ---- end of the data-parallel keys
    {"train.sparse_prediction", K_BOOL, OFF(sparse_prediction), 0, 1, NULL, "run the final LayerNorm, the classifier and the loss only at the positions selected for prediction (same loss and gradients within float rounding; faster with a large vocabulary)"},
    {"optim.name", K_ENUM, OFF(optim_kind), 0, 0, "noam|adamw", "noam: labml's Adam (eps before bias correction); adamw: torch AdamW"},
    {"optim.schedule", K_ENUM, OFF(schedule), 0, 0, "noam|cosine|linear|constant", "learning-rate schedule"},
    {"optim.lr", K_DOUBLE, OFF(lr), 0, 1e6, NULL, "Noam factor, or the peak learning rate"},
    {"optim.beta1", K_DOUBLE, OFF(beta1), 0, 0.999999, NULL, "Adam beta1"},
    {"optim.beta2", K_DOUBLE, OFF(beta2), 0, 0.999999999, NULL, "Adam beta2"},
    {"optim.eps", K_DOUBLE, OFF(eps), 0, 1, NULL, "Adam epsilon"},
    {"optim.weight_decay", K_DOUBLE, OFF(weight_decay), 0, 10, NULL, "AdamW decoupled weight decay (2-D weights only)"},
    {"optim.warmup", K_INT, OFF(warmup), 0, 1 << 30, NULL, "warmup steps"},
    {"optim.min_lr", K_DOUBLE, OFF(min_lr), 0, 1e6, NULL, "learning rate at the end of cosine/linear decay"},
};
#undef OFF
#define N_KEYS ((int)(sizeof(KEYS) / sizeof(KEYS[0])))

void config_defaults(Config *c) {
    memset(c, 0, sizeof(*c));
    c->seq_len = 32;
    c->train_split = 0.9;
    c->d_model = 128;
    c->n_heads = 8;
    c->n_layers = 6;
    c->d_ff = 256;
    c->dropout = 0.1;
    c->ln_eps = 1e-5;
    c->init_copy_layers = 1;
    c->arch = 0;  // labml
    c->max_positions = 512;
    c->type_vocab_size = 2;
    c->init_std = 0.02;
    c->mask_scheme = MASK_SCHEME_REFERENCE;
    c->mask_prob = 0.15;
    c->mask_unchanged_prob = 0.1;
    c->mask_random_prob = 0.1;
    c->batch_size = 64;
    c->epochs = 1024;
    c->seed = 1234;
    c->grad_clip = 1.0;
    c->device = DEVICE_AUTO;
    c->log_every = 50;
    c->ckpt_every = 5000;
    c->ckpt_minutes = 30;
    c->keep_ckpts = 3;
    c->init_check_vocab = 1;
    c->precision = PRECISION_TF32;
    c->cuda_graph = 1;
    c->samples = 1;
    c->accum_steps = 1;      // data-parallel block (issue 13)
    c->dist_timeout = 600;
    c->optim_kind = OPTIM_NOAM_ADAM;
    c->schedule = SCHED_NOAM;
    c->lr = 1.0;
    c->beta1 = 0.9;
    c->beta2 = 0.999;
    c->eps = 1e-8;
    c->warmup = 2000;
}

static const KeyDesc *find_key(const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (strcmp(KEYS[i].name, name) == 0) return &KEYS[i];
    return NULL;
}

// Levenshtein distance, for "did you mean" suggestions on unknown keys.
static int edit_distance(const char *a, const char *b) {
    int la = (int)strlen(a), lb = (int)strlen(b);
    if (la > 63 || lb > 63) return 99;
    int d[64][64];
    for (int i = 0; i <= la; i++) d[i][0] = i;
    for (int j = 0; j <= lb; j++) d[0][j] = j;
    for (int i = 1; i <= la; i++)
        for (int j = 1; j <= lb; j++) {
            int sub = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            int del = d[i - 1][j] + 1, ins = d[i][j - 1] + 1;
            d[i][j] = MLM_MIN(sub, MLM_MIN(del, ins));
        }
    return d[la][lb];
}

static void unknown_key_message(const char *key, char *err, size_t errlen) {
    const char *best = NULL;
    int best_d = 1 << 30;
    for (int i = 0; i < N_KEYS; i++) {
        int d = edit_distance(key, KEYS[i].name);
        const char *dot = strchr(KEYS[i].name, '.');
        if (dot && strcmp(dot + 1, key) == 0) d = 0;  // key given without its section
        if (d < best_d) { best_d = d; best = KEYS[i].name; }
    }
    if (best && best_d <= 3)
        snprintf(err, errlen, "unknown key '%s' (did you mean '%s'? `mlm train --help` lists every key)", key, best);
    else
        snprintf(err, errlen, "unknown key '%s' (`mlm train --help` lists every key)", key);
}

// Decode a value: surrounding double quotes are removed and \n \t \\ \" escapes resolved.
static int decode_string(const char *in, char *out, size_t outlen) {
    size_t n = strlen(in), k = 0;
    int quoted = n >= 2 && in[0] == '"' && in[n - 1] == '"';
    const char *s = quoted ? in + 1 : in;
    const char *end = quoted ? in + n - 1 : in + n;
    for (; s < end; s++) {
        char ch = *s;
        if (ch == '\\' && s + 1 < end) {
            s++;
            switch (*s) {
            case 'n': ch = '\n'; break;
            case 't': ch = '\t'; break;
            case '\\': ch = '\\'; break;
            case '"': ch = '"'; break;
            default: return -1;
            }
        }
        if (k + 1 >= outlen) return -2;
        out[k++] = ch;
    }
    out[k] = '\0';
    return 0;
}

static int parse_number(const KeyDesc *k, const char *value, double *out, char *err, size_t errlen) {
    char *end;
    errno = 0;
    double v = strtod(value, &end);
    while (*end && isspace((unsigned char)*end)) end++;
    if (end == value || *end || errno == ERANGE || !isfinite(v)) {
        snprintf(err, errlen, "%s = '%s' is not a number", k->name, value);
        return 1;
    }
    if (v < k->min || v > k->max) {
        snprintf(err, errlen, "%s = %s is out of range [%g, %g]", k->name, value, k->min, k->max);
        return 1;
    }
    *out = v;
    return 0;
}

// Integer keys: plain decimal digits in the key's range, nothing else (0x20, 1e3, 3.0, +5 and -1 for an
// unsigned seed are refused rather than reinterpreted).
static int parse_integer(const KeyDesc *k, const char *value, long *out, char *err, size_t errlen) {
    int rc = mlm_parse_long(value, (long)k->min, (long)k->max, out);
    if (rc == 1)
        snprintf(err, errlen, "%s = '%s' must be a whole number written in decimal digits (e.g. %ld)", k->name, value,
                 (long)k->min > 0 ? (long)k->min : 1L);
    else if (rc == 2)
        snprintf(err, errlen, "%s = %s is out of range [%ld, %ld]", k->name, value, (long)k->min, (long)k->max);
    return rc != 0;
}

// true/1/yes/on or false/0/no/off into *out; 1 for anything else.
static int parse_bool(const char *value, int *out) {
    if (!strcmp(value, "true") || !strcmp(value, "1") || !strcmp(value, "yes") || !strcmp(value, "on")) {
        *out = 1;
        return 0;
    }
    if (!strcmp(value, "false") || !strcmp(value, "0") || !strcmp(value, "no") || !strcmp(value, "off")) {
        *out = 0;
        return 0;
    }
    return 1;
}

// train.tf32 (before train.precision): configuration files and checkpoints of earlier runs hold it.
static int set_old_tf32(Config *c, const char *value, char *err, size_t errlen) {
    int on;
    if (parse_bool(value, &on)) {
        snprintf(err, errlen, "train.tf32 = '%s' must be true or false (train.tf32 is now train.precision = tf32 | "
                 "fp32 | bf16)", value);
        return 1;
    }
    c->precision = on ? PRECISION_TF32 : PRECISION_FP32;
    return 0;
}

int config_set_value(Config *c, const char *key, const char *value, char *err, size_t errlen) {
    if (!strcmp(key, "train.tf32")) return set_old_tf32(c, value, err, errlen);
    const KeyDesc *k = find_key(key);
    if (!k) { unknown_key_message(key, err, errlen); return 1; }
    char *field = (char *)c + k->offset;
    double num = 0;
    switch (k->type) {
    case K_INT: {
        long v;
        if (parse_integer(k, value, &v, err, errlen)) return 1;
        *(int *)field = (int)v;
        return 0;
    }
    case K_LONG: {
        long v;
        if (parse_integer(k, value, &v, err, errlen)) return 1;
        *(long *)field = v;
        return 0;
    }
    case K_U64: {
        uint64_t v;
        int rc = mlm_parse_u64(value, UINT64_MAX, &v);
        if (rc) {
            snprintf(err, errlen, "%s = '%s' must be a whole number in [0, %llu] written in decimal digits", k->name,
                     value, (unsigned long long)UINT64_MAX);
            return 1;
        }
        *(uint64_t *)field = v;
        return 0;
    }
    case K_DOUBLE:
        if (parse_number(k, value, &num, err, errlen)) return 1;
        *(double *)field = num;
        return 0;
    case K_BOOL:
        if (parse_bool(value, (int *)field)) {
            snprintf(err, errlen, "%s = '%s' must be true or false", k->name, value);
            return 1;
        }
        return 0;
    case K_STR: {
        int r = decode_string(value, field, k->name[0] == 'm' ? sizeof(c->no_mask_chars) : CONFIG_STR);
        if (r == -1) { snprintf(err, errlen, "%s: unknown escape in '%s' (use \\n, \\t, \\\\ or \\\")", k->name, value); return 1; }
        if (r == -2) { snprintf(err, errlen, "%s: value '%s' is too long", k->name, value); return 1; }
        return 0;
    }
    case K_ENUM: {
        int idx = 0;
        const char *p = k->choices;
        size_t vl = strlen(value);
        while (p && *p) {
            const char *bar = strchr(p, '|');
            size_t len = bar ? (size_t)(bar - p) : strlen(p);
            if (len == vl && strncmp(p, value, len) == 0) { *(int *)field = idx; return 0; }
            idx++;
            p = bar ? bar + 1 : NULL;
        }
        snprintf(err, errlen, "%s = '%s' must be one of %s", k->name, value, k->choices);
        return 1;
    }
    }
    return 1;
}

static char *trim(char *s) {
    while (isspace((unsigned char)*s)) s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = '\0';
    return s;
}

// Remove a trailing '#' or ';' comment that is not inside double quotes.
static void strip_comment(char *s) {
    int in_quotes = 0;
    for (char *p = s; *p; p++) {
        if (*p == '\\' && in_quotes && p[1]) { p++; continue; }
        if (*p == '"') in_quotes = !in_quotes;
        else if (!in_quotes && (*p == '#' || *p == ';')) { *p = '\0'; return; }
    }
}

int config_parse_text(Config *c, const char *text, const char *origin, char *err, size_t errlen) {
    char section[64] = "";
    int lineno = 0;
    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        lineno++;
        char line[1024];
        if (len >= sizeof(line)) { snprintf(err, errlen, "%s:%d: line is too long", origin, lineno); return 1; }
        memcpy(line, p, len);
        line[len] = '\0';
        p = nl ? nl + 1 : p + len;
        strip_comment(line);
        char *s = trim(line);
        if (!*s) continue;
        if (*s == '[') {
            char *close = strchr(s, ']');
            if (!close || close[1] != '\0' || close == s + 1 || (size_t)(close - s - 1) >= sizeof(section)) {
                snprintf(err, errlen, "%s:%d: malformed section header '%s' (expected [name])", origin, lineno, s);
                return 1;
            }
            *close = '\0';
            snprintf(section, sizeof(section), "%s", trim(s + 1));
            continue;
        }
        char *eq = strchr(s, '=');
        if (!eq) { snprintf(err, errlen, "%s:%d: malformed line '%s' (expected key = value)", origin, lineno, s); return 1; }
        *eq = '\0';
        char *key = trim(s), *value = trim(eq + 1);
        if (!*key) { snprintf(err, errlen, "%s:%d: missing key before '='", origin, lineno); return 1; }
        char full[192];
        if (section[0] && !strchr(key, '.')) snprintf(full, sizeof(full), "%s.%s", section, key);
        else snprintf(full, sizeof(full), "%s", key);
        char msg[512];
        if (config_set_value(c, full, value, msg, sizeof(msg))) {
            snprintf(err, errlen, "%s:%d: %s", origin, lineno, msg);
            return 1;
        }
    }
    return 0;
}

void config_load_file(Config *c, const char *path) {
    size_t len;
    char *text = mlm_read_file(path, &len);
    if (!text) mlm_fatal(MLM_EXIT_USAGE, "cannot read config file %s: %s", path, strerror(errno));
    if (strlen(text) != len) mlm_fatal(MLM_EXIT_USAGE, "config file %s contains a NUL byte; is it a text file?", path);
    char err[1024];
    if (config_parse_text(c, text, path, err, sizeof(err))) {
        free(text);
        mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    }
    free(text);
}

void config_set(Config *c, const char *assignment) {
    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment)
        mlm_fatal(MLM_EXIT_USAGE, "--set %s: expected KEY=VALUE, e.g. --set train.batch_size=32", assignment);
    char key[192];
    size_t kl = (size_t)(eq - assignment);
    if (kl >= sizeof(key)) mlm_fatal(MLM_EXIT_USAGE, "--set %s: key too long", assignment);
    memcpy(key, assignment, kl);
    key[kl] = '\0';
    char err[1024];
    if (config_set_value(c, trim(key), eq + 1, err, sizeof(err)))
        mlm_fatal(MLM_EXIT_USAGE, "--set %s: %s", assignment, err);
}

int config_check(const Config *c, char *err, size_t errlen) {
    if (c->accum_steps > 1 && c->batch_size % c->accum_steps != 0) {  // data-parallel block (issue 13)
        snprintf(err, errlen, "train.accum_steps = %d does not divide train.batch_size = %d (micro-batches are equal)",
                 c->accum_steps, c->batch_size);
        return 1;
    }
    if (c->d_model % c->n_heads) {
        snprintf(err, errlen, "model.d_model = %d is not divisible by model.n_heads = %d", c->d_model, c->n_heads);
        return 1;
    }
    if (c->arch == 0 && c->d_model % 2) {
        snprintf(err, errlen, "model.d_model = %d must be even (sinusoidal positions pair features)", c->d_model);
        return 1;
    }
    if (c->arch == 1 && c->seq_len > c->max_positions) {
        snprintf(err, errlen, "data.seq_len = %d exceeds model.max_positions = %d under model.arch = bert (one learned "
                 "position per token); lower data.seq_len or raise model.max_positions", c->seq_len, c->max_positions);
        return 1;
    }
    if (c->mask_scheme == MASK_SCHEME_BERT && c->mask_unchanged_prob + c->mask_random_prob > 1.0) {
        snprintf(err, errlen, "mask.unchanged_prob + mask.random_prob = %g exceeds 1 under mask.scheme = bert",
                 c->mask_unchanged_prob + c->mask_random_prob);
        return 1;
    }
    if (c->optim_kind == OPTIM_NOAM_ADAM && c->schedule == SCHED_NOAM && c->warmup < 1) {
        snprintf(err, errlen, "optim.warmup = %d must be >= 1 under the noam schedule", c->warmup);
        return 1;
    }
    if (c->schedule != SCHED_NOAM && c->min_lr > c->lr) {
        snprintf(err, errlen, "optim.min_lr = %g exceeds optim.lr = %g", c->min_lr, c->lr);
        return 1;
    }
    if (strlen(c->no_mask_chars) > MASK_MAX_NO_MASK) {
        snprintf(err, errlen, "mask.no_mask lists %zu characters; at most %d are supported", strlen(c->no_mask_chars),
                 MASK_MAX_NO_MASK);
        return 1;
    }
    return 0;
}

// Settings under which nothing can train (issue 22, bug 11), refused with the reason instead of a NaN blamed on the
// learning rate or a loss of 0 reported as the best; checked for training only, so that the checkpoints of such
// runs still evaluate and export.
int config_check_trainable(const Config *c, char *err, size_t errlen) {
    // The optimizers compute in float: a positive eps below half the smallest float rounds to 0 there.
    if (!((float)c->eps > 0.0f)) {
        snprintf(err, errlen, "optim.eps = %g is 0 in float: Adam divides by sqrt(v) + eps, and v is 0 for every "
                 "weight whose gradient is 0 (the embedding row of a token absent from the batch, for one), so 0 / 0 "
                 "makes those weights NaN at the first step; use a positive value of at least %g, e.g. 1e-8, the "
                 "default", c->eps, (double)FLT_TRUE_MIN);
        return 1;
    }
    if (c->mask_prob <= 0.0) {
        snprintf(err, errlen, "mask.prob = %g selects no position for prediction, so there is no loss to train on or "
                 "to validate; use a probability in (0, 1], e.g. 0.15, the default", c->mask_prob);
        return 1;
    }
    // optim.lr = 0 stays allowed: a step at rate 0 turns --init weights into a checkpoint unchanged (test_commands).
    return 0;
}

void config_validate(const Config *c, const char *origin) {
    char err[512];
    if (config_check(c, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s: %s", origin, err);
}

// s in double quotes with \n \t \\ \" escaped, as decode_string reads it back (out holds 2 x strlen(s) + 3).
static void escape_string(const char *s, char *out, size_t outlen) {
    size_t k = 0;
    out[k++] = '"';
    for (; *s && k + 4 < outlen; s++) {
        const char *e = *s == '\n' ? "\\n" : *s == '\t' ? "\\t" : *s == '\\' ? "\\\\" : *s == '"' ? "\\\"" : NULL;
        if (e) {
            memcpy(out + k, e, 2);
            k += 2;
        } else {
            out[k++] = *s;
        }
    }
    out[k++] = '"';
    out[k] = '\0';
}

// A key's value in c as the config file writes it.
static void format_value(const KeyDesc *k, const Config *c, char *out, size_t outlen) {
    const char *field = (const char *)c + k->offset;
    switch (k->type) {
    case K_INT: snprintf(out, outlen, "%d", *(const int *)field); break;
    case K_LONG: snprintf(out, outlen, "%ld", *(const long *)field); break;
    case K_U64: snprintf(out, outlen, "%llu", (unsigned long long)*(const uint64_t *)field); break;
    case K_DOUBLE: {
        // The shortest of %.15g / %.17g that reads back to the same double (0.9, not 0.90000000000000002).
        double v = *(const double *)field;
        snprintf(out, outlen, "%.15g", v);
        if (strtod(out, NULL) != v) snprintf(out, outlen, "%.17g", v);
        break;
    }
    case K_BOOL: snprintf(out, outlen, "%s", *(const int *)field ? "true" : "false"); break;
    case K_STR: escape_string(field, out, outlen); break;
    case K_ENUM: {
        int idx = *(const int *)field;
        const char *p = k->choices;
        for (int i = 0; i < idx && p; i++) {
            p = strchr(p, '|');
            if (p) p++;
        }
        const char *bar = p ? strchr(p, '|') : NULL;
        snprintf(out, outlen, "%.*s", p ? (bar ? (int)(bar - p) : (int)strlen(p)) : 0, p ? p : "");
        break;
    }
    }
}

static void write_value(FILE *f, const KeyDesc *k, const Config *c) {
    char text[CONFIG_VALUE_TEXT];
    format_value(k, c, text, sizeof(text));
    fputs(text, f);
}

int config_key_count(void) { return N_KEYS; }
const char *config_key_name(int i) { return i >= 0 && i < N_KEYS ? KEYS[i].name : NULL; }
void config_value_text(const Config *c, int i, char *out, size_t outlen) {
    if (i < 0 || i >= N_KEYS) {
        snprintf(out, outlen, "?");
        return;
    }
    format_value(&KEYS[i], c, out, outlen);
}

void config_write(FILE *f, const Config *c) {
    char section[64] = "";
    for (int i = 0; i < N_KEYS; i++) {
        const char *dot = strchr(KEYS[i].name, '.');
        size_t sl = (size_t)(dot - KEYS[i].name);
        if (strlen(section) != sl || strncmp(section, KEYS[i].name, sl) != 0) {
            snprintf(section, sizeof(section), "%.*s", (int)sl, KEYS[i].name);
            fprintf(f, "%s[%s]\n", i ? "\n" : "", section);
        }
        fprintf(f, "%s = ", dot + 1);
        write_value(f, &KEYS[i], c);
        fputc('\n', f);
    }
}

void config_print_keys(FILE *f) {
    for (int i = 0; i < N_KEYS; i++) {
        Config d;
        config_defaults(&d);
        fprintf(f, "  %-22s %s (default: ", KEYS[i].name, KEYS[i].help);
        write_value(f, &KEYS[i], &d);
        fputs(")\n", f);
    }
}

const char *precision_name(int precision) {
    static const char *const names[] = {"fp32", "tf32", "bf16"};
    return precision >= 0 && precision <= PRECISION_BF16 ? names[precision] : "?";
}
