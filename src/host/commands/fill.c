// fill.c: `mlm fill`: predict the characters marked with _ or [MASK] in a text, window by window, and print
// the filled text (highlighted on a terminal) or, with --json, the top-k candidates of every marked position.
// Byte and WordPiece checkpoints: the text is tokenized with the checkpoint's tokenizer (the bytes of the text, or
// BERT's WordPiece with the vocab.txt the checkpoint stores) and only [MASK] marks a position (one token); a
// WordPiece text is shown as its pieces joined by spaces, ## pieces glued to the one before.
//
// A text is encoded with the checkpoint's vocabulary and cut into consecutive windows of seq_len tokens; the
// last window is padded with PAD, as the reference pads its sample prompts. The model runs with dropout off
// and sees exactly the text given: nothing besides the marked positions is masked, so no randomness is used.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/commands.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/train.h"
#include "mlm/wordpiece.h"

#define FILL_MAX_WINDOWS 8  // windows per forward pass

// One masked position's prediction.
typedef struct {
    size_t index;   // token position in the line (a [MASK] counts as one token)
    int best_char;  // most probable real token (never a special): what the filled text shows
    int *top;       // [k] token ids by decreasing probability
    double *prob;   // [k]
    float *logits;  // [V] raw logits, only with --logits
} Prediction;

typedef struct {
    const FillOptions *opt;
    const Vocab *vocab;
    WordPiece *wp;  // WordPiece checkpoints: the tokenizer of its stored vocab.txt (NULL otherwise)
    CpuModel *model;
    int T, V, k;
    int color;
    int *inputs;  // [FILL_MAX_WINDOWS, T]
    long line_no;
} Filler;

static int use_color(void) {
    const char *nc = getenv("NO_COLOR");
    return isatty(STDOUT_FILENO) && !(nc && nc[0]);
}

// Byte vocabulary: one id per byte, the literal "[MASK]" one MASK token.
static size_t encode_line_bytes(const Filler *f, const char *line, int **ids_out) {
    size_t n = strlen(line), k = 0;
    int *ids = mlm_malloc((n + 1) * sizeof(int), "input tokens");
    for (size_t i = 0; i < n; i++) {
        if (!strncmp(line + i, "[MASK]", 6)) {
            ids[k++] = f->vocab->mask_id;
            i += 5;
        } else {
            ids[k++] = (unsigned char)line[i];
        }
    }
    *ids_out = ids;
    return k;
}

// WordPiece: BERT's tokenization, which keeps a "[MASK]" written in the text as the MASK token.
static size_t encode_line_wordpiece(const Filler *f, const char *line, int **ids_out) {
    size_t len = strlen(line), cap = len + 1;
    int32_t *ids = mlm_malloc(cap * sizeof(int32_t), "input tokens");
    size_t n = wp_encode(f->wp, line, len, ids, cap);
    if (n > cap) {  // cannot happen (a piece is at least one byte), but the API allows it
        ids = realloc(ids, n * sizeof(int32_t));
        if (!ids) mlm_fatal(MLM_EXIT_FAILURE, "out of memory tokenizing input line %ld", f->line_no);
        wp_encode(f->wp, line, len, ids, n);
    }
    *ids_out = ids;  // int32_t is int on every platform mlm builds for
    return n;
}

// The line as token ids: _ and [MASK] become MASK, everything else must be in the vocabulary.
// Returns the count; ids is malloc'ed.
static size_t encode_line(const Filler *f, const char *line, int **ids_out) {
    if (f->vocab->kind == VOCAB_KIND_BYTE) return encode_line_bytes(f, line, ids_out);
    if (f->vocab->kind == VOCAB_KIND_WORDPIECE) return encode_line_wordpiece(f, line, ids_out);
    uint32_t *cps;
    char err[256];
    long n = utf8_decode(line, strlen(line), &cps, err, sizeof(err));
    if (n < 0) mlm_fatal(MLM_EXIT_USAGE, "input line %ld: %s; give UTF-8 text", f->line_no, err);
    static const uint32_t mask_word[6] = {'[', 'M', 'A', 'S', 'K', ']'};
    int *ids = mlm_malloc(((size_t)n + 1) * sizeof(int), "input tokens");
    size_t k = 0;
    for (long i = 0; i < n; i++) {
        if (cps[i] == '_') {
            ids[k++] = f->vocab->mask_id;
        } else if (i + 6 <= n && memcmp(cps + i, mask_word, sizeof(mask_word)) == 0) {
            ids[k++] = f->vocab->mask_id;
            i += 5;
        } else {
            int id = vocab_id(f->vocab, cps[i]);
            if (id < 0) {
                char ch[8];
                utf8_encode(cps[i], ch);
                mlm_fatal(MLM_EXIT_USAGE, "input line %ld, character %ld: '%s' (U+%04X) is not in the checkpoint's "
                          "vocabulary of %d characters; the model cannot read it, so remove or replace it",
                          f->line_no, i + 1, cps[i] < 0x20 ? "?" : ch, (unsigned)cps[i], f->vocab->n_chars);
            }
            ids[k++] = id;
        }
    }
    free(cps);
    *ids_out = ids;
    return k;
}

// Softmax in double over one position's logits.
static void softmax(const float *logits, int V, double *p) {
    double mx = logits[0], sum = 0;
    for (int i = 1; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    for (int i = 0; i < V; i++) sum += p[i] = exp((double)logits[i] - mx);
    for (int i = 0; i < V; i++) p[i] /= sum;
}

// The k most probable ids, by decreasing probability (lower id first on ties). k is small: selection.
static void top_k(const double *p, int V, int k, int *top, double *prob) {
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < V; i++) {
            int taken = 0;
            for (int q = 0; q < j && !taken; q++) taken = top[q] == i;
            if (!taken && (best < 0 || p[i] > p[best])) best = i;
        }
        top[j] = best;
        prob[j] = p[best];
    }
}

static int is_special(const Vocab *v, int id) {
    return id == v->pad_id || id == v->mask_id || id == v->unk_id || id == v->cls_id || id == v->sep_id;
}

// The most probable token the filled text can show: a character or byte (ids below n_chars), or any WordPiece
// token but the specials.
static int best_real_token(const Vocab *v, const double *p) {
    int best = -1;
    for (int i = 0; i < v->n_chars; i++)
        if (!(v->kind == VOCAB_KIND_WORDPIECE && is_special(v, i)) && (best < 0 || p[i] > p[best])) best = i;
    return best;
}

// The text of one token: a character; a byte as itself when it is printable ASCII, else <0xNN>; a WordPiece
// token as in vocab.txt (## kept); the specials by name.
static const char *token_text(const Filler *f, int id, char *buf, size_t buflen) {
    const Vocab *v = f->vocab;
    if (v->kind == VOCAB_KIND_CHAR) return vocab_token_text(v, id, buf);
    if (v->kind == VOCAB_KIND_WORDPIECE) return wp_token(f->wp, id);
    static const char *const names[5] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
    if (id >= 256) return id - 256 < 5 ? names[id - 256] : "[?]";
    if (id >= 0x20 && id < 0x7f) snprintf(buf, buflen, "%c", id);
    else snprintf(buf, buflen, "<0x%02X>", id);
    return buf;
}

static void predict_position(const Filler *f, const float *logits, size_t index, Prediction *out) {
    double *p = mlm_malloc((size_t)f->V * sizeof(double), "probabilities");
    softmax(logits, f->V, p);
    out->index = index;
    out->best_char = best_real_token(f->vocab, p);
    out->top = mlm_malloc((size_t)f->k * sizeof(int), "top-k ids");
    out->prob = mlm_malloc((size_t)f->k * sizeof(double), "top-k probabilities");
    top_k(p, f->V, f->k, out->top, out->prob);
    out->logits = NULL;
    if (f->opt->logits) {
        out->logits = mlm_malloc((size_t)f->V * sizeof(float), "logits");
        memcpy(out->logits, logits, (size_t)f->V * sizeof(float));
    }
    free(p);
}

// Run every window of the line through the model; one Prediction per MASK token, in order.
static size_t predict_line(Filler *f, const int *ids, size_t n, Prediction *preds) {
    size_t T = (size_t)f->T, n_win = MLM_CEIL_DIV(n, T), n_pred = 0;
    for (size_t w0 = 0; w0 < n_win; w0 += FILL_MAX_WINDOWS) {
        int b = (int)MLM_MIN((size_t)FILL_MAX_WINDOWS, n_win - w0);
        for (size_t i = 0; i < (size_t)b * T; i++) {
            size_t pos = w0 * T + i;
            f->inputs[i] = pos < n ? ids[pos] : f->vocab->pad_id;
        }
        cpu_model_forward(f->model, f->inputs, NULL, b, f->vocab->pad_id, NULL, NULL);
        for (size_t i = 0; i < (size_t)b * T; i++) {
            size_t pos = w0 * T + i;
            if (pos < n && ids[pos] == f->vocab->mask_id)
                predict_position(f, f->model->logits + i * (size_t)f->V, pos, &preds[n_pred++]);
        }
    }
    return n_pred;
}

// WordPiece: a space goes before a piece unless it is the first or a ## continuation (outside the highlighting).
static int space_before(const Filler *f, int id, size_t i) {
    const Vocab *v = f->vocab;
    return v->kind == VOCAB_KIND_WORDPIECE && i > 0 && (is_special(v, id) || strncmp(wp_token(f->wp, id), "##", 2));
}

// One token of the filled text into out: a character, a byte, or a WordPiece piece (## dropped; specials shown by
// name).
static void put_token(const Filler *f, FILE *out, int id, int pretty, int predicted) {
    const Vocab *v = f->vocab;
    char buf[16];
    if (v->kind == VOCAB_KIND_CHAR) {
        if (pretty && predicted && v->chars[id] == '\n') fputs("\xe2\x86\xb5", out);
        else if (pretty) fputs(vocab_token_text(v, id, buf), out);
        else fwrite(buf, 1, (size_t)utf8_encode(v->chars[id], buf), out);
    } else if (v->kind == VOCAB_KIND_BYTE) {
        if (id < 256) fputc(id, out);
        else fputs(token_text(f, id, buf, sizeof(buf)), out);
    } else {
        const char *t = wp_token(f->wp, id);
        fputs(!strncmp(t, "##", 2) && !is_special(v, id) ? t + 2 : t, out);
    }
}

// The line with every MASK replaced by its prediction (malloc'ed); `pretty` marks predictions (green and underlined
// on a terminal, so that a predicted space shows) and shows a predicted newline as ↵ so that one input line stays
// one output line.
static char *render_filled(const Filler *f, const int *ids, size_t n, const Prediction *preds, int pretty) {
    const char *on = pretty && f->color ? "\x1b[1;4;32m" : "", *off = pretty && f->color ? "\x1b[0m" : "";
    char *s = NULL;
    size_t len = 0, q = 0;
    FILE *out = open_memstream(&s, &len);
    if (!out) mlm_fatal(MLM_EXIT_FAILURE, "out of memory rendering the filled text");
    for (size_t i = 0; i < n; i++) {
        int predicted = ids[i] == f->vocab->mask_id, id = predicted ? preds[q++].best_char : ids[i];
        if (space_before(f, id, i)) fputc(' ', out);
        fputs(predicted ? on : "", out);
        put_token(f, out, id, pretty, predicted);
        fputs(predicted ? off : "", out);
    }
    fclose(out);
    return s;
}

static void print_filled(const Filler *f, const int *ids, size_t n, const Prediction *preds, int pretty) {
    char *s = render_filled(f, ids, n, preds, pretty);
    fputs(s, stdout);
    free(s);
}

// The filled text as a malloc'ed string (for JSON).
static char *filled_string(const Filler *f, const int *ids, size_t n, const Prediction *preds) {
    return render_filled(f, ids, n, preds, 0);
}

static void print_json(const Filler *f, const char *line, const int *ids, size_t n, const Prediction *preds,
                       size_t n_pred) {
    char *filled = filled_string(f, ids, n, preds);
    fputs("{\"text\":", stdout);
    json_write_string(stdout, line);
    fputs(",\"filled\":", stdout);
    json_write_string(stdout, filled);
    fputs(",\"positions\":[", stdout);
    char buf[16];
    for (size_t q = 0; q < n_pred; q++) {
        const Prediction *p = &preds[q];
        printf("%s{\"index\":%zu,\"top\":[", q ? "," : "", p->index);
        for (int j = 0; j < f->k; j++) {
            fputs(j ? ",{\"char\":" : "{\"char\":", stdout);
            json_write_string(stdout, token_text(f, p->top[j], buf, sizeof(buf)));
            if (f->vocab->kind != VOCAB_KIND_CHAR) printf(",\"id\":%d", p->top[j]);  // a token's text may repeat
            printf(",\"prob\":%.9g}", p->prob[j]);
        }
        putchar(']');
        if (p->logits) {
            fputs(",\"logits\":[", stdout);
            for (int i = 0; i < f->V; i++) printf(i ? ",%.9g" : "%.9g", p->logits[i]);
            putchar(']');
        }
        putchar('}');
    }
    fputs("]}\n", stdout);
    free(filled);
}

static void fill_line(Filler *f, const char *line) {
    int *ids;
    size_t n = encode_line(f, line, &ids);
    size_t n_mask = 0;
    for (size_t i = 0; i < n; i++) n_mask += ids[i] == f->vocab->mask_id;
    Prediction *preds = mlm_calloc(n_mask + 1, sizeof(Prediction), "predictions");
    size_t n_pred = predict_line(f, ids, n, preds);
    if (f->opt->json) {
        print_json(f, line, ids, n, preds, n_pred);
    } else {
        print_filled(f, ids, n, preds, 1);
        putchar('\n');
    }
    fflush(stdout);
    for (size_t q = 0; q < n_pred; q++) {
        free(preds[q].top);
        free(preds[q].prob);
        free(preds[q].logits);
    }
    free(preds);
    free(ids);
}

// Standard input, one text per line (a trailing \r\n or \n is not part of the text).
static void fill_stdin(Filler *f) {
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while ((len = getline(&line, &cap, stdin)) >= 0) {
        f->line_no++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if ((size_t)len != strlen(line))
            mlm_fatal(MLM_EXIT_USAGE, "input line %ld contains a NUL byte; give UTF-8 text", f->line_no);
        fill_line(f, line);
    }
    free(line);
}

int fill_run(const FillOptions *o) {
    char file[1200];
    cmd_resolve_ckpt(o->ckpt, file, sizeof(file));
    Checkpoint ck;
    cmd_load_ckpt(file, &ck);
    cmd_set_threads(&ck.cfg);
    ModelConfig mc = model_config_from(&ck.cfg, ck.vocab.n_tokens, ck.vocab.pad_id);
    Filler f = {.opt = o, .vocab = &ck.vocab, .T = mc.max_seq, .V = mc.vocab, .color = use_color()};
    if (ck.vocab.kind == VOCAB_KIND_WORDPIECE) {
        char err[1024];
        if (!(f.wp = ckpt_wordpiece(&ck, err, sizeof(err)))) mlm_fatal(MLM_EXIT_USAGE, "fill: %s: %s", file, err);
    }
    f.k = MLM_MIN(o->top_k, f.V);
    f.model = cmd_cpu_model(&ck, FILL_MAX_WINDOWS);
    f.inputs = mlm_malloc((size_t)FILL_MAX_WINDOWS * f.T * sizeof(int), "window tokens");
    if (!strcmp(o->text, "-")) {
        fill_stdin(&f);
    } else {
        f.line_no = 1;
        fill_line(&f, o->text);
    }
    free(f.inputs);
    wp_free(f.wp);
    cpu_model_free(f.model);
    ckpt_free(&ck);
    return 0;
}
