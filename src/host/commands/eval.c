// eval.c: `mlm eval`: masked loss, accuracy and perplexity of a checkpoint on the validation split of its
// corpus or on any text, with masks from a fixed seed and dropout off so that two evaluations agree exactly.
//
// The text is cut into consecutive sequences of seq_len tokens (the last one padded with PAD, which is never
// masked), so every token is a candidate exactly once; sequence i draws its 4 * seq_len masking uniforms at
// offset 4 * seq_len * i of the EVAL stream, which makes the masks independent of the batch size.
//
// Byte and WordPiece checkpoints evaluate on a shard set prepared with their vocabulary (--data SET, or the run's
// data.path): its validation split (--split valid, the default) or train and valid together (--split all), read in
// place from the memory-mapped shards; or on the whole of a text file (--split all), tokenized with the
// checkpoint's tokenizer.
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/commands.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/mask.h"
#include "mlm/rng.h"
#include "mlm/shards.h"
#include "mlm/train.h"
#include "mlm/wordpiece.h"

typedef struct {
    int *ids;           // token ids of the evaluated text (NULL for a shard set)
    size_t n;
    const ShardStream *streams[2];  // a shard set's split(s), read in place, one after the other
    int n_streams;
    char source[1100];  // the file they came from
    int whole_file;     // 1: all of the text; 0: its validation split
} EvalText;

typedef struct {
    double loss, accuracy, perplexity;
    long targets, sequences;
} EvalResult;

// PATH (any UTF-8 text), whole or its validation part (the last 1 - data.train_split of its characters, cut
// as training cuts the run's corpus), encoded with the checkpoint's vocabulary. Unknown characters are dropped
// (as the reference drops them) with a warning so that a mostly foreign text does not pass unnoticed.
static void load_text(const char *path, int valid_only, const Checkpoint *ck, EvalText *t) {
    size_t len;
    char why[1400];
    char *text = mlm_read_regular(path, "text", 0, &len, why, sizeof(why));  // not a FIFO or /dev/zero
    if (!text) mlm_fatal(MLM_EXIT_USAGE, "--data %s", why);
    uint32_t *cps;
    char err[256];
    long n = utf8_decode(text, len, &cps, err, sizeof(err));
    free(text);
    if (n < 0) mlm_fatal(MLM_EXIT_USAGE, "--data %s: %s; give a UTF-8 text file", path, err);
    size_t first = valid_only ? (size_t)(ck->cfg.train_split * (double)n) : 0;  // floor, as in corpus_load
    size_t count = (size_t)n - first;
    t->ids = mlm_malloc((count + 1) * sizeof(int), "evaluation tokens");
    t->n = vocab_encode(&ck->vocab, cps + first, count, t->ids);
    free(cps);
    size_t dropped = count - t->n;
    if (dropped)
        mlm_warn("%zu of %zu characters of %s%s are not in the checkpoint's vocabulary and were dropped", dropped,
                 count, valid_only ? "the validation split of " : "", path);
    if (t->n == 0)
        mlm_fatal(MLM_EXIT_USAGE, "--data %s has no characters of the checkpoint's vocabulary to evaluate on", path);
    snprintf(t->source, sizeof(t->source), "%s", path);
    t->whole_file = !valid_only;
}

// The run's corpus: data.path if it can be read, else the usual lookup (data/, $MLM_DATA_MIRROR, download)
// when the run trained on Tiny Shakespeare. Either way its md5 must be the checkpoint's.
static void locate_run_corpus(const Checkpoint *ck, char *path, size_t len) {
    const char *configured = ck->cfg.data_path;
    if (configured[0] && access(configured, R_OK) != 0) {
        if (strcmp(ck->corpus_md5, CORPUS_MD5) != 0)
            mlm_fatal(MLM_EXIT_USAGE, "the run's corpus %s (data.path) cannot be read: %s; restore it there, or "
                      "evaluate on another text with --data PATH", configured, strerror(errno));
        configured = "";
    }
    data_locate_corpus(configured, path, len);
    char md5[33];
    if (data_md5_file(path, md5)) mlm_fatal(MLM_EXIT_FAILURE, "cannot read the corpus %s: %s", path, strerror(errno));
    if (strcmp(md5, ck->corpus_md5) != 0)
        mlm_fatal(MLM_EXIT_USAGE, "the corpus %s has md5 %s but the checkpoint was trained on a corpus with md5 %s; "
                  "its validation split would be a different text. Evaluate on a text of your choice with --data "
                  "PATH instead", path, md5, ck->corpus_md5);
}

// Tokens [pos, pos + n) of a shard set's text (its streams one after the other) into out.
static void read_streams(const EvalText *t, size_t pos, size_t n, int *out) {
    for (int s = 0; s < t->n_streams && n > 0; s++) {
        size_t len = (size_t)t->streams[s]->n_tokens;
        if (pos >= len) {
            pos -= len;
            continue;
        }
        size_t take = MLM_MIN(n, len - pos);
        shard_stream_read(t->streams[s], pos, take, out);
        out += take;
        n -= take;
        pos = 0;
    }
}

// Sequences first..first+b-1 of the text into tokens[b, T], padding past the end with PAD.
static void gather_sequences(const EvalText *t, size_t first, int b, int T, int pad_id, int *tokens) {
    for (int j = 0; j < b; j++) {
        size_t start = (first + (size_t)j) * (size_t)T, have = start < t->n ? MLM_MIN((size_t)T, t->n - start) : 0;
        int *row = tokens + (size_t)j * T;
        if (t->ids) memcpy(row, t->ids + start, have * sizeof(int));
        else read_streams(t, start, have, row);
        for (size_t k = have; k < (size_t)T; k++) row[k] = pad_id;
    }
}

// ---- Byte and WordPiece checkpoints: shard sets, or a text tokenized with the checkpoint's tokenizer.

// The whole of a text file as the checkpoint's byte or WordPiece tokens.
static void load_text_subword(const char *path, const Checkpoint *ck, EvalText *t) {
    size_t len;
    char err[1400];
    char *text = mlm_read_regular(path, "text", 0, &len, err, sizeof(err));  // not a FIFO or /dev/zero
    if (!text) mlm_fatal(MLM_EXIT_USAGE, "--data %s", err);
    t->ids = mlm_malloc((len + 1) * sizeof(int), "evaluation tokens");
    if (ck->vocab.kind == VOCAB_KIND_BYTE) {
        for (size_t i = 0; i < len; i++) t->ids[i] = (unsigned char)text[i];
        t->n = len;
    } else {
        WordPiece *wp = ckpt_wordpiece(ck, err, sizeof(err));
        if (!wp) mlm_fatal(MLM_EXIT_USAGE, "eval: %s", err);
        t->n = wp_encode(wp, text, len, t->ids, len + 1);  // at most one token per byte
        wp_free(wp);
    }
    free(text);
    if (t->n == 0) mlm_fatal(MLM_EXIT_USAGE, "--data %s has no tokens to evaluate on", path);
    snprintf(t->source, sizeof(t->source), "%s", path);
    t->whole_file = 1;
}

// Open the shard set at `path` for the checkpoint: its vocabulary must be the checkpoint's. Exits otherwise.
static void open_eval_set(ShardSet *set, const char *path, const Checkpoint *ck) {
    char err[2048];
    Vocab v;
    if (shard_set_open(set, path, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "--data %s: %s", path, err);
    if (manifest_vocab(&set->m, &v, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "--data %s: %s", path, err);
    char *have = vocab_codepoints_text(&v), *want = vocab_codepoints_text(&ck->vocab);
    if (strcmp(have, want) != 0)
        mlm_fatal(MLM_EXIT_USAGE, "--data %s was prepared with the %s vocabulary %.120s, but the checkpoint was "
                  "trained with %.120s; its token ids would mean other tokens. Prepare the text again with the "
                  "checkpoint's vocabulary (`mlm prepare --tokenizer %s%s ...`), or evaluate the whole of a text file "
                  "with --data FILE --split all", path, tokenizer_name(set->m.tokenizer), have, want,
                  tokenizer_name(ck->vocab.kind),  // VocabKind and TokenizerKind number the kinds alike
                  ck->vocab.kind == VOCAB_KIND_WORDPIECE ? " --vocab VOCAB.TXT (the one with that md5; `mlm export` "
                  "writes it as vocab_wordpiece)" : "");
    free(have);
    free(want);
}

static void use_set(ShardSet *set, const char *path, int split_all, EvalText *t) {
    t->n_streams = 0;
    if (split_all) t->streams[t->n_streams++] = &set->train;
    t->streams[t->n_streams++] = &set->valid;
    t->n = 0;
    for (int s = 0; s < t->n_streams; s++) t->n += (size_t)t->streams[s]->n_tokens;
    if (t->n == 0) mlm_fatal(MLM_EXIT_USAGE, "the shard set %s has no %s tokens to evaluate on", path,
                             split_all ? "" : "validation");
    snprintf(t->source, sizeof(t->source), "%s", path);
    t->whole_file = split_all;
}

// A byte or WordPiece checkpoint without --data: its run's shard set (data.path), if it is still the same set.
static void locate_run_set(const Checkpoint *ck, const char *file, char *path, size_t len) {
    const char *configured = ck->cfg.data_path;
    if (!configured[0] || !shards_is_set(configured))
        mlm_fatal(MLM_EXIT_USAGE, "%s was trained on the shard set %s (manifest md5 %s), which is not there; pass a "
                  "shard set prepared with its vocabulary: --data SET [--split valid|all], or a text: --data FILE "
                  "--split all", file, configured[0] ? configured : "(data.path unset)", ck->corpus_md5);
    snprintf(path, len, "%s", configured);
}

// The run's own set must still be the one it trained on (checked once it is open: a set prepared again from a
// version-1 one with the same shards keeps the run's identity, Manifest.replaces).
static void check_run_set(const ShardSet *set, const Checkpoint *ck, const char *path) {
    if (!shard_set_identity_matches(set, ck->corpus_md5))
        mlm_fatal(MLM_EXIT_USAGE, "the shard set %s (data.path) has identity %s but the run trained on one with "
                  "identity %s: it was prepared again, so its validation split is another text. Evaluate on it anyway "
                  "with --data %s --split valid", path, set->md5, ck->corpus_md5, path);
}

// Every byte of the splits evaluated is read once (checksums, token ids) unless the run directory's stamp says the
// run verified these very files (--ckpt naming a run directory; eval only reads the stamp, the run owns it).
static void verify_eval_set(ShardSet *set, const char *path, int split_all, const char *ckpt_arg) {
    struct stat st;
    const char *run_dir = stat(ckpt_arg, &st) == 0 && S_ISDIR(st.st_mode) ? ckpt_arg : NULL;
    ShardVerifyResult res;
    char err[2048];
    if (shard_set_verify(set, SHARD_VERIFY_VALID | (split_all ? SHARD_VERIFY_TRAIN : 0), run_dir, 0, 0, &res, err,
                         sizeof(err)))
        mlm_fatal(MLM_EXIT_FAILURE, "--data %s: %s", path, err);
}

static EvalResult evaluate(const Checkpoint *ck, const EvalText *t, uint64_t seed) {
    const Config *c = &ck->cfg;
    MaskConfig mask = train_mask_config(c, &ck->vocab);
    unsigned char *continuation = NULL;  // whole-word masking over WordPiece: the ## pieces, as training has them
    if (mask.whole_word && ck->vocab.kind == VOCAB_KIND_WORDPIECE) {
        char err[1024];
        WordPiece *wp = ckpt_wordpiece(ck, err, sizeof(err));
        if (!wp) mlm_fatal(MLM_EXIT_USAGE, "eval (mask.whole_word): %s", err);
        continuation = mlm_malloc((size_t)mask.n_tokens, "whole-word continuation flags");
        mask_wordpiece_continuation(wp, continuation);
        mask.continuation = continuation;
        wp_free(wp);
    }
    int T = c->seq_len, B = c->batch_size, pad = ck->vocab.pad_id;
    CpuModel *model = cmd_cpu_model(ck, B);
    cpu_model_set_sparse_prediction(model, c->sparse_prediction);  // loss and accuracy only: no logits needed
    Rng rng;
    rng_init(&rng, seed, RNG_DOMAIN_EVAL);
    size_t bt = (size_t)B * T;
    int *tokens = mlm_malloc(bt * sizeof(int), "tokens");
    int *inputs = mlm_malloc(bt * sizeof(int), "inputs");
    int *labels = mlm_malloc(bt * sizeof(int), "labels");
    float *u = mlm_malloc(4 * bt * sizeof(float), "masking uniforms");
    size_t n_seq = MLM_CEIL_DIV(t->n, (size_t)T);
    double loss_sum = 0;
    long correct_sum = 0, target_sum = 0;
    for (size_t first = 0; first < n_seq; first += (size_t)B) {
        int b = (int)MLM_MIN((size_t)B, n_seq - first);
        gather_sequences(t, first, b, T, pad, tokens);
        rng_uniform(&rng, 4 * (uint64_t)T * first, u, 4 * (size_t)b * T);
        for (int j = 0; j < b; j++)
            mask_apply(&mask, tokens + j * T, (size_t)T, u + 4 * (size_t)j * T, inputs + j * T, labels + j * T);
        int correct = 0;
        float loss = cpu_model_forward(model, inputs, labels, b, pad, NULL, &correct);
        if (!isfinite(loss))
            mlm_fatal(MLM_EXIT_FAILURE, "the loss is %f on sequences %zu..%zu; the checkpoint's weights are not "
                      "usable (did its training diverge?)", loss, first, first + (size_t)b - 1);
        // Weight by targets so the result is the mean over all masked positions, not over batches.
        loss_sum += (double)loss * model->n_targets;
        correct_sum += correct;
        target_sum += model->n_targets;
    }
    free(tokens); free(inputs); free(labels); free(u); free(continuation);
    rng_free(&rng);
    cpu_model_free(model);
    if (target_sum == 0)
        mlm_fatal(MLM_EXIT_USAGE, "no position of the %zu tokens was selected for masking; evaluate on a longer text "
                  "or with another --seed", t->n);
    EvalResult r = {.loss = loss_sum / target_sum, .accuracy = (double)correct_sum / target_sum,
                    .targets = target_sum, .sequences = (long)n_seq};
    r.perplexity = exp(r.loss);
    return r;
}

static void print_json(const char *ckpt, const Checkpoint *ck, const EvalText *t, uint64_t seed, const EvalResult *r) {
    fputs("{\"checkpoint\":", stdout);
    json_write_string(stdout, ckpt);
    printf(",\"step\":%ld,\"data\":", ck->st.step);
    json_write_string(stdout, t->source);
    printf(",\"split\":\"%s\",\"seed\":%llu,\"tokens\":%zu,\"sequences\":%ld,\"masked\":%ld,"
           "\"loss\":%.17g,\"accuracy\":%.17g,\"perplexity\":%.17g}\n",
           t->whole_file ? "all" : "valid", (unsigned long long)seed, t->n, r->sequences, r->targets, r->loss,
           r->accuracy, r->perplexity);
}

static void print_summary(const char *ckpt, const Checkpoint *ck, const EvalText *t, uint64_t seed,
                          const EvalResult *r) {
    printf("checkpoint %s (step %ld)\n", ckpt, ck->st.step);
    printf("%s %s: %zu tokens in %ld sequences of %d, %ld masked (seed %llu)\n",
           t->whole_file ? "all of" : "validation split of", t->source, t->n, r->sequences, ck->cfg.seq_len,
           r->targets, (unsigned long long)seed);
    printf("loss %.4f  accuracy %.4f  perplexity %.3f\n", r->loss, r->accuracy, r->perplexity);
}

int eval_run(const EvalOptions *o) {
    if (o->device == DEVICE_CUDA)
        mlm_fatal(MLM_EXIT_USAGE, "--device cuda: evaluation on the GPU is not implemented yet; use --device cpu");
    char file[1200];
    cmd_resolve_ckpt(o->ckpt, file, sizeof(file));
    Checkpoint ck;
    cmd_load_ckpt(file, &ck);
    cmd_set_threads(&ck.cfg);
    EvalText t;
    memset(&t, 0, sizeof(t));
    ShardSet set;
    int have_set = 0;
    memset(&set, 0, sizeof(set));
    char path[1100];
    // A shard set: --data naming one, or the run's own (byte and WordPiece runs always train on one; a char run may).
    int run_set = ck.vocab.kind != VOCAB_KIND_CHAR || (ck.cfg.data_path[0] && shards_is_set(ck.cfg.data_path));
    if (o->data ? shards_is_set(o->data) : run_set) {
        if (o->data) snprintf(path, sizeof(path), "%s", o->data);
        else locate_run_set(&ck, file, path, sizeof(path));
        open_eval_set(&set, path, &ck);
        have_set = 1;
        if (!o->data) check_run_set(&set, &ck, path);
        verify_eval_set(&set, path, o->split == EVAL_SPLIT_ALL, o->ckpt);
        use_set(&set, path, o->split == EVAL_SPLIT_ALL, &t);
    } else if (ck.vocab.kind != VOCAB_KIND_CHAR) {  // --data FILE: a text, tokenized here
        if (o->split != EVAL_SPLIT_ALL)
            mlm_fatal(MLM_EXIT_USAGE, "--data %s is a text, which has no validation split for a run on a shard set; "
                      "evaluate all of it with --split all, or pass a shard set prepared with the checkpoint's "
                      "vocabulary", o->data);
        load_text_subword(o->data, &ck, &t);
    } else {
        // The run's own corpus (md5-checked) unless --data names a text; --data needs an explicit --split, since
        // evaluating the whole of a text and its validation part are different questions.
        if (o->data && o->split == EVAL_SPLIT_UNSET)
            mlm_fatal(MLM_EXIT_USAGE, "--data %s: say which part to evaluate: --split valid (its last %.0f%%, cut as "
                      "the run's validation split is cut) or --split all (the whole text)", o->data,
                      100.0 * (1.0 - ck.cfg.train_split));
        if (o->data) snprintf(path, sizeof(path), "%s", o->data);
        else locate_run_corpus(&ck, path, sizeof(path));
        load_text(path, o->split != EVAL_SPLIT_ALL, &ck, &t);
    }
    uint64_t seed = o->has_seed ? o->seed : ck.cfg.seed;
    EvalResult r = evaluate(&ck, &t, seed);
    if (o->json) print_json(file, &ck, &t, seed, &r);
    else print_summary(file, &ck, &t, seed, &r);
    free(t.ids);
    if (have_set) shard_set_close(&set);
    ckpt_free(&ck);
    return 0;
}
