// eval.c: `mlm eval`: masked loss, accuracy and perplexity of a checkpoint on the validation split of its
// corpus or on any text, with masks from a fixed seed and dropout off so that two evaluations agree exactly.
//
// The text is cut into consecutive sequences of seq_len tokens (the last one padded with PAD, which is never
// masked), so every token is a candidate exactly once; sequence i draws its 4 * seq_len masking uniforms at
// offset 4 * seq_len * i of the EVAL stream, which makes the masks independent of the batch size.
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/commands.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/mask.h"
#include "mlm/rng.h"
#include "mlm/train.h"

typedef struct {
    int *ids;           // token ids of the evaluated text
    size_t n;
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
    char *text = mlm_read_file(path, &len);
    if (!text) mlm_fatal(MLM_EXIT_USAGE, "--data %s: %s", path, strerror(errno));
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

// Sequences first..first+b-1 of the text into tokens[b, T], padding past the end with PAD.
static void gather_sequences(const EvalText *t, size_t first, int b, int T, int pad_id, int *tokens) {
    for (int j = 0; j < b; j++)
        for (int k = 0; k < T; k++) {
            size_t pos = (first + (size_t)j) * (size_t)T + (size_t)k;
            tokens[j * T + k] = pos < t->n ? t->ids[pos] : pad_id;
        }
}

static EvalResult evaluate(const Checkpoint *ck, const EvalText *t, uint64_t seed) {
    const Config *c = &ck->cfg;
    MaskConfig mask = train_mask_config(c, &ck->vocab);
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
    free(tokens); free(inputs); free(labels); free(u);
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
    if (ck.vocab.kind != VOCAB_KIND_CHAR)  // a shard set's byte/WordPiece vocabulary (issue 11): not read here yet
        mlm_fatal(MLM_EXIT_USAGE, "%s was trained on a byte or WordPiece shard set; `mlm eval` handles character-level "
                  "checkpoints only so far", file);
    cmd_set_threads(&ck.cfg);
    EvalText t;
    memset(&t, 0, sizeof(t));
    // The run's own corpus (md5-checked) unless --data names a text; --data needs an explicit --split, since
    // evaluating the whole of a text and its validation part are different questions.
    if (o->data && o->split == EVAL_SPLIT_UNSET)
        mlm_fatal(MLM_EXIT_USAGE, "--data %s: say which part to evaluate: --split valid (its last %.0f%%, cut as the "
                  "run's validation split is cut) or --split all (the whole text)", o->data,
                  100.0 * (1.0 - ck.cfg.train_split));
    char path[1100];
    if (o->data) snprintf(path, sizeof(path), "%s", o->data);
    else locate_run_corpus(&ck, path, sizeof(path));
    load_text(path, o->split != EVAL_SPLIT_ALL, &ck, &t);
    uint64_t seed = o->has_seed ? o->seed : ck.cfg.seed;
    EvalResult r = evaluate(&ck, &t, seed);
    if (o->json) print_json(file, &ck, &t, seed, &r);
    else print_summary(file, &ck, &t, seed, &r);
    free(t.ids);
    ckpt_free(&ck);
    return 0;
}
