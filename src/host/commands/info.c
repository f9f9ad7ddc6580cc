// info.c: `mlm info` and `mlm export`, and the helpers the checkpoint commands share (loading, JSON strings).
#define _XOPEN_SOURCE 700  // realpath
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "mlm/checkpoint.h"
#include "mlm/commands.h"
#include "mlm/common.h"
#include "mlm/hf_bert.h"
#include "mlm/json.h"
#include "mlm/train.h"
#include "mlm/weights.h"
#include "mlm/wordpiece.h"

// ---------------------------------------------------------------------------------------------------------
// Shared helpers

static int is_directory(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

void cmd_resolve_ckpt(const char *path, char *out, size_t outlen) {
    if (!is_directory(path)) {
        snprintf(out, outlen, "%s", path);
        return;
    }
    if (ckpt_find_latest(path, out, outlen))
        mlm_fatal(MLM_EXIT_USAGE, "%s holds no checkpoint (expected %s/checkpoints/ckpt-*.safetensors); pass a run "
                  "directory that `mlm train` wrote, or a checkpoint file", path, path);
}

void cmd_load_ckpt(const char *path, Checkpoint *ck) {
    struct stat st;
    if (stat(path, &st) != 0)
        mlm_fatal(MLM_EXIT_USAGE, "--ckpt %s: %s; pass a run directory or a file from its checkpoints/ folder",
                  path, strerror(errno));
    char err[1024];
    if (ckpt_load(path, ck, err, sizeof(err)))
        mlm_fatal(MLM_EXIT_USAGE, "--ckpt: %s%s", err,
                  strstr(err, "checkpoint") ? "" : "; --ckpt takes a run directory or a checkpoint file in its checkpoints/");
}

CpuModel *cmd_cpu_model(const Checkpoint *ck, int max_B) {
    ModelConfig mc = model_config_from(&ck->cfg, ck->vocab.n_tokens, ck->vocab.pad_id);
    CpuModel *m = cpu_model_create(&mc, max_B);
    if (m->n_params != ck->n_params)  // ckpt_load refuses such a file; never copy past the model
        mlm_fatal(MLM_EXIT_FAILURE, "internal error: the checkpoint holds %zu parameters, its model %zu", ck->n_params,
                  m->n_params);
    memcpy(m->params, ck->params, ck->n_params * sizeof(float));
    return m;
}

void cmd_set_threads(const Config *c) {
    if (c->threads > 0) omp_set_num_threads(c->threads);
}

void json_write_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (*p < 0x20) fprintf(f, "\\u%04x", *p);
            else fputc(*p, f);  // UTF-8 bytes are valid inside JSON strings as they are
        }
    }
    fputc('"', f);
}

// ---------------------------------------------------------------------------------------------------------
// mlm export

int export_run(const char *ckpt, const char *out_path, int hf) {
    char file[1200];
    cmd_resolve_ckpt(ckpt, file, sizeof(file));
    // Writing over the checkpoint (out == ckpt) would replace the run's state by a weights-only file.
    char a[PATH_MAX], b[PATH_MAX];
    if (realpath(file, a) && realpath(out_path, b) && !strcmp(a, b))
        mlm_fatal(MLM_EXIT_USAGE, "--out %s is the checkpoint itself; choose another file name", out_path);
    Checkpoint ck;
    cmd_load_ckpt(file, &ck);
    char err[1024];
    if (ck.vocab.kind == VOCAB_KIND_WORDPIECE && !ck.vocab_text) {  // the export must carry its vocabulary
        struct WordPiece *wp = ckpt_wordpiece(&ck, err, sizeof(err));
        if (!wp) mlm_fatal(MLM_EXIT_USAGE, "export: %s: %s", file, err);
        wp_free(wp);
    }
    // ckpt_load checked that the sizes agree.
    ModelConfig mc = model_config_from(&ck.cfg, ck.vocab.n_tokens, ck.vocab.pad_id);
    int rc;
    if (hf) {
        HfTokenizer tok = {.vocab_text = ck.vocab_text, .lowercase = ck.lowercase, .vocab = &ck.vocab};
        rc = hf_export(out_path, &mc, ck.params, &tok, err, sizeof(err));
        if (rc == 0)
            printf("wrote %s: transformers' BertForMaskedLM (config.json, model.safetensors with %d tensors and %zu "
                   "parameters, vocab.txt, tokenizer_config.json, special_tokens_map.json) from step %ld of %s; load it "
                   "with BertForMaskedLM.from_pretrained(\"%s\")\n", out_path, model_param_table(&mc, NULL), ck.n_params,
                   ck.st.step, file, out_path);
    } else {
        rc = weights_save(out_path, &mc, &ck.vocab, ck.vocab_text, ck.lowercase, ck.params, err, sizeof(err));
        int bert = mc.arch == MODEL_ARCH_BERT;
        if (rc == 0)
            printf("wrote %s: %d tensors (%s: %zu parameters%s) from step %ld of %s\n", out_path,
                   model_param_table(&mc, NULL) + !bert,
                   bert ? "BertForMaskedLM's state_dict, tied decoder once" : "the state_dict of labml_nn's TransformerMLM",
                   ck.n_params, bert ? "" : " and the positional-encoding buffer", ck.st.step, file);
    }
    ckpt_free(&ck);
    if (rc) mlm_fatal(hf ? MLM_EXIT_USAGE : MLM_EXIT_FAILURE, "export: %s", err);
    return 0;
}

// ---------------------------------------------------------------------------------------------------------
// mlm info

// The run directory of a checkpoint: the path itself if it is a directory, else RUN_DIR for
// RUN_DIR/checkpoints/FILE; "" when the file lies elsewhere.
static void run_dir_of(const char *ckpt, char *out, size_t outlen) {
    out[0] = '\0';
    if (is_directory(ckpt)) {
        snprintf(out, outlen, "%s", ckpt);
        return;
    }
    char dir[1200];
    snprintf(dir, sizeof(dir), "%s", ckpt);
    char *slash = strrchr(dir, '/');
    if (!slash) return;  // a bare file name in the current directory
    *slash = '\0';
    const char *base = strrchr(dir, '/');
    base = base ? base + 1 : dir;
    if (strcmp(base, "checkpoints") != 0) return;
    if (base == dir) snprintf(out, outlen, ".");
    else snprintf(out, outlen, "%.*s", (int)(base - 1 - dir), dir);
}

// The last train and valid records of metrics.jsonl at or before `step` (a run may have logged past an
// older checkpoint); n == 0 in an object when there is none. Release both with json_free.
static void last_metrics(const char *path, long step, JsonObject *train, JsonObject *valid) {
    memset(train, 0, sizeof(*train));
    memset(valid, 0, sizeof(*valid));
    size_t len;
    char *text = mlm_read_file(path, &len);
    if (!text) return;
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        if (!nl) break;  // a torn last line
        *nl = '\0';
        JsonObject o;
        char err[128];
        if (json_parse_object(line, strlen(line), &o, err, sizeof(err)) == 0) {
            const char *kind = json_str(&o, "kind");
            JsonObject *slot = !kind || json_num(&o, "step", 1e300) > (double)step ? NULL
                               : !strcmp(kind, "train")                            ? train
                               : !strcmp(kind, "valid")                            ? valid
                                                                                   : NULL;
            if (slot) {
                json_free(slot);
                *slot = o;
            } else {
                json_free(&o);
            }
        }
        line = nl + 1;
    }
    free(text);
}

static void format_elapsed(double s, char *out, size_t n) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(out, n, "%ldh%02ldm%02lds (%.1f s)", t / 3600, (t % 3600) / 60, t % 60, s);
    else if (t >= 60) snprintf(out, n, "%ldm%02lds (%.1f s)", t / 60, t % 60, s);
    else snprintf(out, n, "%.1f s", s);
}

static void print_metrics_line(const char *label, const JsonObject *line) {
    if (line->n == 0) {
        printf("%-20s none logged\n", label);
        return;
    }
    printf("%-20s step %.0f, epoch %.0f: loss %.4f, accuracy %.4f", label, json_num(line, "step", NAN),
           json_num(line, "epoch", NAN) + 1, json_num(line, "loss", NAN), json_num(line, "accuracy", NAN));
    double lr = json_num(line, "lr", NAN), tps = json_num(line, "tokens_per_s", NAN);
    if (!isnan(lr)) printf(", lr %.3e, |g| %.3f, %.0f tok/s", lr, json_num(line, "grad_norm", NAN), tps);
    putchar('\n');
}

// The vocabulary's kind, size and special ids (and for WordPiece its lower-casing and whether the checkpoint stores
// the vocab.txt that decoding needs).
static void print_vocabulary(const Checkpoint *ck) {
    const Vocab *v = &ck->vocab;
    if (v->kind == VOCAB_KIND_CHAR) {
        printf("%-20s char: %d characters + [PAD] %d + [MASK] %d\n", "vocabulary", v->n_chars, v->pad_id, v->mask_id);
        return;
    }
    printf("%-20s %s: %d tokens; [PAD] %d, [MASK] %d, [UNK] %d, [CLS] %d, [SEP] %d (-1: none)\n", "vocabulary",
           v->kind == VOCAB_KIND_BYTE ? "byte (256 byte values + specials)" : "wordpiece", v->n_tokens, v->pad_id,
           v->mask_id, v->unk_id, v->cls_id, v->sep_id);
    if (v->kind == VOCAB_KIND_WORDPIECE)
        printf("%-20s md5 %s, %s, %s\n", "vocab.txt", v->md5, ck->lowercase ? "lower-cased" : "cased",
               ck->vocab_text ? "stored in the checkpoint" : "NOT stored (an older checkpoint: eval, fill and export "
               "refuse it until its run writes a new one)");
    else
        printf("%-20s %s\n", "vocabulary md5", v->md5);
}

int info_run(const char *ckpt) {
    char file[1200], run_dir[1200];
    cmd_resolve_ckpt(ckpt, file, sizeof(file));
    run_dir_of(ckpt, run_dir, sizeof(run_dir));
    Checkpoint ck;
    cmd_load_ckpt(file, &ck);
    const Config *c = &ck.cfg;
    ModelConfig mc = model_config_from(c, ck.vocab.n_tokens, ck.vocab.pad_id);
    char elapsed[64];
    format_elapsed(ck.st.elapsed_s, elapsed, sizeof(elapsed));
    printf("%-20s %s\n", "checkpoint", file);
    printf("%-20s %s\n", "run directory", run_dir[0] ? run_dir : "(unknown: the file is not in RUN_DIR/checkpoints)");
    printf("%-20s %zu\n", "parameters", ck.n_params);
    printf("%-20s %s: d_model %d, %d heads, %d layers, d_ff %d, seq_len %d, vocabulary %d", "model",
           mc.arch == MODEL_ARCH_BERT ? "bert (BertForMaskedLM)" : "labml (TransformerMLM)", mc.d_model, mc.n_heads,
           mc.n_layers, mc.d_ff, mc.max_seq, mc.vocab);
    if (mc.arch == MODEL_ARCH_BERT) printf(", %d positions, LayerNorm eps %g", mc.max_positions, (double)mc.ln_eps);
    putchar('\n');
    print_vocabulary(&ck);
    printf("%-20s %ld\n", "step", ck.st.step);
    printf("%-20s %ld completed and validated (of %d)\n", "epochs", ck.st.valid_epochs, c->epochs);
    // The same count metrics.jsonl reports: steps x batch x seq_len (the last batch of an epoch is smaller).
    printf("%-20s %.0f\n", "tokens seen", ck.st.tokens);
    printf("%-20s %s\n", "elapsed (training)", elapsed);
    if (ck.st.best_epoch >= 0)
        printf("%-20s %.4f (epoch %ld)\n", "best valid accuracy", ck.st.best_valid_acc, ck.st.best_epoch + 1);
    else
        printf("%-20s none yet (no validation has run)\n", "best valid accuracy");
    if (ck.st.last_valid_step >= 0)
        printf("%-20s step %ld: loss %.4f, accuracy %.4f\n", "last validation", ck.st.last_valid_step,
               ck.st.last_valid_loss, ck.st.last_valid_acc);
    printf("%-20s %s\n", "corpus md5", ck.corpus_md5);
    if (run_dir[0]) {
        char path[1300];
        JsonObject train, valid;
        snprintf(path, sizeof(path), "%s/metrics.jsonl", run_dir);
        last_metrics(path, ck.st.step, &train, &valid);
        if (train.n || valid.n) {
            print_metrics_line("last train metrics", &train);
            print_metrics_line("last valid metrics", &valid);
        } else {
            printf("%-20s none (%s is missing or empty)\n", "metrics", path);
        }
        json_free(&train);
        json_free(&valid);
    }
    printf("\n# configuration\n");
    config_write(stdout, c);
    ckpt_free(&ck);
    return 0;
}
