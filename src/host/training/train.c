// train.c: `mlm train`: the run directory, the epoch loop (samples, a training epoch, a validation epoch),
// progress lines and metrics.
#include "mlm/train.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "mlm/agree_ranks.h"
#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/weights.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"
#include "mlm/dist.h"
#include "mlm/nccl_dp.h"
#include "mlm/json.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "mlm/run_lock.h"
#include "mlm/shards.h"
#include "mlm/wordpiece.h"

const char *const SAMPLE_PROMPTS[N_PROMPTS] = {
    "We are accounted poor citizens, the patricians good.",
    "What authority surfeits on would relieve us: if they",
    "would yield us but the superfluity, while it were",
    "wholesome, we might guess they relieved us humanely;",
    "but they think we are too dear: the leanness that",
    "afflicts us, the object of our misery, is as an",
    "inventory to particularise their abundance; our",
    "sufferance is a gain to them Let us revenge this with",
    "our pikes, ere we become rakes: for the gods know I",
    "speak this in hunger for bread, not in thirst for revenge.",
};

ModelConfig train_model_config(const Config *c, const Vocab *v) {
    ModelConfig m = {.vocab = v->n_tokens, .d_model = c->d_model, .n_heads = c->n_heads, .n_layers = c->n_layers,
                     .d_ff = c->d_ff, .max_seq = c->seq_len, .dropout = (float)c->dropout, .ln_eps = (float)c->ln_eps,
                     .arch = c->arch, .max_positions = c->max_positions, .type_vocab = c->type_vocab_size,
                     .init_std = (float)c->init_std, .pad_id = v->pad_id};
    return m;
}

// A shard set's byte or WordPiece vocabulary: its own [UNK], [CLS] and [SEP] are never selected either (PAD and
// MASK never are), as Hugging Face's collator leaves out every special token; mask.no_mask names characters,
// which such a vocabulary does not have.
static MaskConfig subword_mask_config(const Config *c, const Vocab *v, MaskConfig m) {
    int specials[3] = {v->unk_id, v->cls_id, v->sep_id};
    for (int i = 0; i < 3; i++)
        if (specials[i] >= 0) m.no_mask[m.n_no_mask++] = specials[i];
    if (c->no_mask_chars[0])
        mlm_warn("mask.no_mask names characters; the %s vocabulary of this shard set has none, so it is ignored",
                 v->kind == VOCAB_KIND_BYTE ? "byte" : "WordPiece");
    return m;
}

MaskConfig train_mask_config(const Config *c, const Vocab *v) {
    MaskConfig m;
    memset(&m, 0, sizeof(m));
    m.scheme = (MaskScheme)c->mask_scheme;
    m.prob = (float)c->mask_prob;
    m.unchanged_prob = (float)c->mask_unchanged_prob;
    m.random_prob = (float)c->mask_random_prob;
    m.n_tokens = v->n_tokens;
    m.n_chars = v->n_chars;
    m.pad_id = v->pad_id;
    m.mask_id = v->mask_id;
    m.whole_word = c->mask_whole_word;  // continuation flags come with a WordPiece vocabulary (none for characters)
    m.seq_len = c->seq_len;
    if (v->kind != VOCAB_KIND_CHAR) return subword_mask_config(c, v, m);
    for (const char *s = c->no_mask_chars; *s && m.n_no_mask < MASK_MAX_NO_MASK; s++) {
        int id = vocab_id(v, (unsigned char)*s);
        if (id < 0) mlm_warn("mask.no_mask: '%c' is not in the vocabulary; ignored", *s);
        else m.no_mask[m.n_no_mask++] = id;
    }
    return m;
}

void render_tokens(const Vocab *v, const int *tokens, int n, char *out, size_t outlen) {
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        char buf[16];
        const char *s;
        if (v->kind != VOCAB_KIND_CHAR) {  // ids (train.c shows a shard set's tokens with render_shard_tokens)
            snprintf(buf, sizeof(buf), "%s%d", i ? " " : "", tokens[i]);
            s = buf;
        } else
        if (tokens[i] == v->pad_id) s = "\xc2\xb7";              // ·
        else if (tokens[i] == v->mask_id) s = "_";
        else if (v->chars[tokens[i]] == '\n') s = "\xe2\x86\xb5";  // ↵
        else s = vocab_token_text(v, tokens[i], buf);
        size_t l = strlen(s);
        if (k + l + 1 >= outlen) break;
        memcpy(out + k, s, l);
        k += l;
    }
    out[k] = '\0';
}

// ---------------------------------------------------------------------------------------------------------
// The run: everything one training process holds.

typedef struct {
    Config cfg;
    TrainOptions opt;
    Corpus corpus;
    ModelConfig mc;
    MaskConfig mask;
    OptimConfig oc;
    RngLayout layout;
    Batcher train_b, valid_b;
    Rng train_rng, valid_rng, sample_rng;
    // The backend: the CPU model, or the device-resident CUDA model (exactly one is set).
    CpuModel *model;
    CudaModel *gpu;
    size_t n_params;
    float *params;         // [P] the CPU model's parameters, or the host copy of the device's
    float *gpu_logits;     // [B, T, V] host copy of the GPU's logits (samples)
    int profiling;         // between cudaProfilerStart and Stop (--profile-steps)
    float *opt_state;      // [2P] Adam first and second moments, one allocation (host copy on the GPU)
    float *adam_m, *adam_v;
    uint8_t *decay_mask;   // [P] 1 where AdamW decays (2-D weights)
    int *tokens, *inputs, *labels;  // [B, T]
    float *uniforms;       // [4 * B * T]
    long step;             // optimizer steps done
    TrainState st;         // what a checkpoint records besides the tensors (st.step mirrors step)
    char corpus_md5[33];
    long total_steps;
    char run_dir[1024];
    RunLock lock;          // one process per run directory
    FILE *metrics;
    int color;             // ANSI colours on stdout
    int tty;               // progress line rewritten in place
    double t_start;        // when elapsed_s was last brought up to date
    double t_last_ckpt;    // wall clock of the last checkpoint (train.ckpt_minutes)
    double t_progress;     // wall clock of the last progress line
    long first_step;       // step at which this process started training
    double t_first_step;   // wall clock after this process's first step (the estimate leaves out its warm-up)
    int estimate_shown;
    // Gradient accumulation and data parallel (issue 13; see train_step_accumulated).
    Dist dist;             // this process's rank among the job's (world 1 without mpirun)
    float *grad_acc;       // [P] the running sum of micro-batch gradients (accumulating only)
    float *grad_shard;     // [P / world + 1] this rank's shard of the summed gradients (train.zero)
    NcclDp *nccl;          // the CUDA backend's gradient exchange (several ranks, or train.nccl)
    float *zero_m, *zero_v;  // [shard] train.zero: this rank's shard of the Adam moments (adam_m/v are then NULL)
    unsigned char *continuation;  // [V] mask.whole_word: 1 where a WordPiece token continues a word (## pieces)
} Run;

// ---- The data source: the reference's text file, or a shard set written by `mlm prepare`.

// data.path naming a shard set opens it (memory-mapped; its manifest's md5 identifies it in checkpoints);
// anything else is the text corpus, located and loaded as the reference does.
static void load_data(Run *r) {
    const Config *cfg = &r->cfg;
    if (cfg->data_path[0] && shards_is_set(cfg->data_path)) {
        corpus_load_shards(&r->corpus, cfg->data_path, cfg->seq_len);
        memcpy(r->corpus_md5, r->corpus.shards->md5, sizeof(r->corpus_md5));
        if (cfg->sampling == 1 && r->corpus.vocab.sep_id < 0)
            mlm_fatal(MLM_EXIT_USAGE, "data.sampling = packed separates documents with [SEP], which the %s vocabulary "
                      "of %s lacks; prepare it with --tokenizer byte or wordpiece, or use data.sampling = random",
                      tokenizer_name(r->corpus.shards->m.tokenizer), cfg->data_path);
        return;
    }
    if (cfg->data_path[0] && shards_interrupted(cfg->data_path))
        mlm_fatal(MLM_EXIT_FAILURE, "data.path %s holds shards but no %s: `mlm prepare` was interrupted before it "
                  "finished; run it again", cfg->data_path, SHARD_MANIFEST);
    if (cfg->sampling == 1)
        mlm_fatal(MLM_EXIT_USAGE, "data.sampling = packed needs data.path to name a shard set (`mlm prepare`)");
    char path[1024];
    data_locate_corpus(cfg->data_path, path, sizeof(path));
    corpus_load(&r->corpus, path, cfg->train_split, cfg->seq_len);
    if (data_md5_file(path, r->corpus_md5)) mlm_fatal(MLM_EXIT_FAILURE, "cannot read corpus %s", path);
}

// Train and valid batchers (streams 0 and 1 of the DATA Philox domain) over the text's splits or the set's.
static void init_batchers(Run *r) {
    const Config *cfg = &r->cfg;
    ShardSet *s = r->corpus.shards;
    if (s) {
        int packed = cfg->sampling == 1, sep = r->corpus.vocab.sep_id;
        batcher_init_stream(&r->train_b, &s->train, packed, sep, cfg->seq_len, cfg->batch_size, 1, cfg->seed, 0);
        batcher_init_stream(&r->valid_b, &s->valid, packed, sep, cfg->seq_len, cfg->batch_size, 1, cfg->seed, 1);
        return;
    }
    batcher_init(&r->train_b, r->corpus.train, r->corpus.n_train, cfg->seq_len, cfg->batch_size, 1, cfg->seed, 0);
    batcher_init(&r->valid_b, r->corpus.valid, r->corpus.n_valid, cfg->seq_len, cfg->batch_size, 1, cfg->seed, 1);
}

// A shard set's tokens as text: WordPiece pieces joined (## continuations glued on), bytes as characters (others
// as \xNN), the specials by name.
static void render_shard_tokens(const Run *r, const int *tokens, int n, char *out, size_t outlen) {
    const Vocab *v = &r->corpus.vocab;
    const struct WordPiece *wp = r->corpus.shards ? r->corpus.shards->wp : NULL;
    size_t k = 0;
    out[0] = '\0';
    for (int i = 0; i < n; i++) {
        char buf[32];
        const char *t = buf;
        int id = tokens[i];
        if (id == v->pad_id) t = "\xc2\xb7";
        else if (id == v->mask_id) t = "_";
        else if (wp) {
            t = wp_token(wp, id);
            if (!t) t = "?";
            if (!strncmp(t, "##", 2)) t += 2;
            else if (i) { snprintf(buf, sizeof(buf), " %.28s", t); t = buf; }
        } else if (id == '\n') t = "\xe2\x86\xb5";
        else if (id >= 32 && id < 127) snprintf(buf, sizeof(buf), "%c", id);
        else if (id < 256) snprintf(buf, sizeof(buf), "\\x%02x", id);
        else snprintf(buf, sizeof(buf), "[%d]", id);
        size_t l = strlen(t);
        if (k + l + 1 >= outlen) break;
        memcpy(out + k, t, l);
        k += l;
        out[k] = '\0';
    }
}

static int use_color(void) {
    const char *nc = getenv("NO_COLOR");
    return isatty(STDOUT_FILENO) && !(nc && nc[0]);
}

// mkdir -p: `--out runs/x` in a fresh checkout creates runs/ too.
static void make_dir(const char *path) {
    char parent[1024];
    snprintf(parent, sizeof(parent), "%s", path);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = '\0';
        if (access(parent, F_OK) != 0) make_dir(parent);
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot create directory %s: %s", path, strerror(errno));
}

// On resume, metrics logged after the checkpoint (the run went on before it died) are dropped so that the
// resumed run's lines follow the checkpoint without duplicates; so are lines that do not parse. A valid line
// stays when the checkpoint records its validation as done: at or before last_valid_step, or (version-1
// checkpoints, which lack it) in a completed epoch.
static int metrics_line_before(const char *line, const TrainState *st) {
    JsonObject o;
    char err[128];
    if (json_parse_object(line, strlen(line), &o, err, sizeof(err))) return 0;
    const char *kind = json_str(&o, "kind");
    double step = json_num(&o, "step", 1e300), epoch = json_num(&o, "epoch", 1e300);
    int keep = kind && !strcmp(kind, "valid")
                   ? step <= (double)st->last_valid_step || (epoch < (double)st->valid_epochs && step <= (double)st->step)
                   : step <= (double)st->step;
    json_free(&o);
    return keep;
}

static void trim_metrics(const char *path, const TrainState *st) {
    size_t len;
    char *text = mlm_read_file(path, &len);
    if (!text) return;
    char tmp[1200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", tmp, strerror(errno));
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        if (!nl) break;  // a torn last line (killed mid-write) is dropped
        *nl = '\0';
        if (metrics_line_before(line, st)) fprintf(f, "%s\n", line);
        line = nl + 1;
    }
    free(text);
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot rewrite %s: %s", path, strerror(errno));
}

// RUN_DIR: --out, or runs/<config name>-<timestamp>; created if needed.
static void choose_run_dir(Run *r) {
    if (r->opt.out_dir) {
        snprintf(r->run_dir, sizeof(r->run_dir), "%s", r->opt.out_dir);
    } else {
        const char *base = r->opt.config_path ? strrchr(r->opt.config_path, '/') : NULL;
        base = base ? base + 1 : r->opt.config_path ? r->opt.config_path : "default";
        char name[128];
        snprintf(name, sizeof(name), "%s", base);
        char *dot = strrchr(name, '.');
        if (dot) *dot = '\0';
        char stamp[32];
        time_t now = time(NULL);
        strftime(stamp, sizeof(stamp), "%Y%m%d-%H%M%S", localtime(&now));
        make_dir("runs");
        snprintf(r->run_dir, sizeof(r->run_dir), "runs/%s-%s", name, stamp);
    }
    make_dir(r->run_dir);
}

// The lock is released (and its file deleted) at exit, error exits included; a killed process leaves the
// file behind, and the next run takes it over.
static RunLock *held_lock;
static void release_lock_at_exit(void) {
    if (held_lock) run_lock_release(held_lock);
}

// A checkpoint is written as NAME.tmp and renamed; a writer killed in between (kill -9, power loss) leaves the
// .tmp behind. Once this process holds the lock nobody else writes here, so any .tmp is such a leftover: an
// incomplete file that no loader reads, removed so that it neither fills the disk nor looks like work.
static void remove_stale_checkpoint_temporaries(const char *run_dir) {
    char dir[1100];
    snprintf(dir, sizeof(dir), "%s/checkpoints", run_dir);
    DIR *d = opendir(dir);
    if (!d) return;  // no checkpoints yet
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        static const char suffix[] = ".safetensors.tmp";
        if (n <= sizeof(suffix) - 1 || strcmp(e->d_name + n - (sizeof(suffix) - 1), suffix) != 0) continue;
        char path[1400];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        if (unlink(path) == 0) mlm_warn("removed %s, an unfinished checkpoint of a run that was killed while writing it", path);
    }
    closedir(d);
}

static void lock_run_dir(Run *r) {
    char err[1400];
    if (run_lock_acquire(r->run_dir, &r->lock, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    held_lock = &r->lock;
    atexit(release_lock_at_exit);
    remove_stale_checkpoint_temporaries(r->run_dir);
}

// metrics.jsonl (trimmed to the checkpoint on resume) and config.conf. A fresh start is refused in a directory
// with checkpoints (that run can be continued), and allowed in one without: a run stopped before its first
// checkpoint has nothing to continue, and its metrics are replaced.
static void prepare_run_files(Run *r, int resuming) {
    char path[1100], ckpt[1200];
    snprintf(path, sizeof(path), "%s/metrics.jsonl", r->run_dir);
    struct stat st;
    if (resuming) {
        trim_metrics(path, &r->st);
    } else if (ckpt_find_latest(r->run_dir, ckpt, sizeof(ckpt)) == 0) {
        mlm_fatal(MLM_EXIT_USAGE, "%s already holds a run with checkpoints (%s); continue it with --resume %s or "
                  "choose another --out directory", r->run_dir, ckpt, r->run_dir);
    } else if (stat(path, &st) == 0 && st.st_size > 0) {
        mlm_warn("%s holds a run that stopped before its first checkpoint; starting afresh (its metrics.jsonl is "
                 "replaced)", r->run_dir);
    }
    r->metrics = fopen(path, resuming ? "a" : "w");
    if (!r->metrics) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
    snprintf(path, sizeof(path), "%s/config.conf", r->run_dir);
    FILE *f = fopen(path, "w");
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
    fprintf(f, "# resolved configuration of this run (mlm %s)\n", MLM_VERSION);
    config_write(f, &r->cfg);
    fclose(f);
}

// The vocabulary, sampling, model size and memory of a run over a shard set.
static void print_shard_header(const Run *r) {
    const Vocab *v = &r->corpus.vocab;
    const ShardSet *s = r->corpus.shards;
    printf("# vocabulary: %s, %d tokens ([PAD]=%d [MASK]=%d [UNK]=%d [CLS]=%d [SEP]=%d)%s; sampling: %s\n",
           tokenizer_name(s->m.tokenizer), v->n_tokens, v->pad_id, v->mask_id, v->unk_id, v->cls_id, v->sep_id,
           s->m.tokenizer == TOKENIZER_WORDPIECE ? (s->m.lowercase ? ", lower-cased" : ", cased") : "",
           r->cfg.sampling ? "packed documents + [SEP]" : "random offsets");
    size_t P = model_num_params(&r->mc);
    int B = MLM_MAX(r->cfg.batch_size, N_PROMPTS);
    double model = model_bytes(&r->mc, B), adam = 2.0 * 4 * (double)P;
    printf("# model: %zu parameters (%.1f MB); memory at batch %d: %.1f MB for parameters, gradients and "
           "activations + %.1f MB Adam moments = %.1f MB\n", P, 4e-6 * (double)P, B, model / 1e6, adam / 1e6,
           (model + adam) / 1e6);
    printf("# %zu train sequences in %zu batches, %zu valid in %zu; %ld steps\n", r->train_b.n_items,
           r->train_b.n_batches, r->valid_b.n_items, r->valid_b.n_batches, r->total_steps);
}

static void print_header(const Run *r) {
    printf("# mlm %s, resolved configuration\n", MLM_VERSION);
    config_write(stdout, &r->cfg);
    printf("\n# corpus %s: %zu characters, %zu train / %zu valid tokens\n", r->corpus.path, r->corpus.n_chars_total,
           r->corpus.n_train, r->corpus.n_valid);
    if (r->corpus.vocab.kind != VOCAB_KIND_CHAR) {
        print_shard_header(r);
        return;
    }
    printf("# vocabulary: %d characters + [PAD]=%d + [MASK]=%d = %d tokens: ", r->corpus.vocab.n_chars,
           r->corpus.vocab.pad_id, r->corpus.vocab.mask_id, r->corpus.vocab.n_tokens);
    char text[VOCAB_MAX_CHARS * 5];
    int ids[VOCAB_MAX_CHARS];
    for (int i = 0; i < r->corpus.vocab.n_chars; i++) ids[i] = i;
    render_tokens(&r->corpus.vocab, ids, r->corpus.vocab.n_chars, text, sizeof(text));
    printf("%s\n", text);
    printf("# model: %zu parameters; %zu train sequences in %zu batches, %zu valid in %zu; %ld steps\n",
           model_num_params(&r->mc), r->train_b.n_items, r->train_b.n_batches, r->valid_b.n_items, r->valid_b.n_batches,
           r->total_steps);
}

// Mask one batch: uniforms for `index` of stream `rng` at the layout's mask offset.
static void mask_batch(Run *r, Rng *rng, uint64_t index, int b) {
    size_t n = (size_t)b * r->cfg.seq_len;
    rng_uniform(rng, rng_mask_offset(&r->layout, index), r->uniforms, 4 * n);
    mask_apply(&r->mask, r->tokens, n, r->uniforms, r->inputs, r->labels);
}

// render_tokens with render_shard_tokens's signature, so one loop shows either kind of vocabulary.
static void render_char_tokens(const Run *r, const int *tokens, int n, char *out, size_t outlen) {
    render_tokens(&r->corpus.vocab, tokens, n, out, outlen);
}

static void print_masked_batch(const Run *r, int rows) {
    const Vocab *v = &r->corpus.vocab;
    int T = r->cfg.seq_len;
    char text[4096];
    printf("# one masked batch (first %d of %d sequences; _ = [MASK], \xc2\xb7 = [PAD], \xe2\x86\xb5 = newline):\n",
           rows, r->cfg.batch_size);
    // Characters as the reference shows them; a shard set's byte or WordPiece tokens as their text.
    void (*render)(const Run *, const int *, int, char *, size_t) =
        v->kind == VOCAB_KIND_CHAR ? render_char_tokens : render_shard_tokens;
    for (int i = 0; i < rows; i++) {
        render(r, r->tokens + i * T, T, text, sizeof(text));
        printf("  original: %s\n", text);
        render(r, r->inputs + i * T, T, text, sizeof(text));
        printf("  input:    %s\n", text);
        render(r, r->labels + i * T, T, text, sizeof(text));
        printf("  labels:   %s\n", text);
    }
}

static DropoutCtx dropout_ctx(Run *r, Rng *rng, uint64_t index, int enabled) {
    DropoutCtx d = {.rng = enabled ? rng : NULL, .layout = r->layout, .step = index,
                    .p = enabled ? (float)r->cfg.dropout : 0.0f};
    return d;
}

// The same stream position for the CUDA backend (masks always; dropout when enabled).
static CudaRandom cuda_random(Run *r, Rng *rng, uint64_t index, int dropout) {
    CudaRandom c = {.philox_seed = rng->seed, .layout = r->layout, .step = index,
                    .dropout_p = dropout ? (float)r->cfg.dropout : 0.0f};
    return c;
}

// The reference's samples: prompts cut to seq_len, padded with PAD, masked, predicted. Correct predictions
// green, wrong red, unmasked characters dimmed.
static void print_samples(Run *r, long epoch) {
    const Vocab *v = &r->corpus.vocab;
    if (v->kind != VOCAB_KIND_CHAR) return;  // the prompts are character-level text
    int T = r->cfg.seq_len;
    int n = N_PROMPTS;
    for (int i = 0; i < n; i++) {
        uint32_t cps[256];
        int ids[256];
        size_t len = strlen(SAMPLE_PROMPTS[i]);
        for (size_t k = 0; k < len; k++) cps[k] = (unsigned char)SAMPLE_PROMPTS[i][k];
        size_t m = vocab_encode(v, cps, len, ids);
        for (int t = 0; t < T; t++) r->tokens[i * T + t] = (size_t)t < m ? ids[t] : v->pad_id;
    }
    const float *logits;
    if (r->gpu) {
        CudaRandom rnd = cuda_random(r, &r->sample_rng, (uint64_t)epoch, r->cfg.eval_dropout);
        cuda_model_forward(r->gpu, r->tokens, NULL, n, r->corpus.vocab.pad_id, &r->mask, &rnd, NULL);
        cuda_model_get_batch(r->gpu, r->inputs, r->labels, n);
        cuda_model_get_logits(r->gpu, r->gpu_logits, n);
        logits = r->gpu_logits;
    } else {
        mask_batch(r, &r->sample_rng, (uint64_t)epoch, n);
        DropoutCtx d = dropout_ctx(r, &r->sample_rng, (uint64_t)epoch, r->cfg.eval_dropout);
        cpu_model_forward(r->model, r->inputs, NULL, n, v->pad_id, &d, NULL);
        logits = r->model->logits;
    }
    char path[1100];
    snprintf(path, sizeof(path), "%s/samples.txt", r->run_dir);
    FILE *f = fopen(path, "w");
    if (f) fprintf(f, "epoch %ld step %ld\n", epoch, r->step);
    const char *green = r->color ? "\x1b[32m" : "", *red = r->color ? "\x1b[31m" : "";
    const char *dim = r->color ? "\x1b[2m" : "", *reset = r->color ? "\x1b[0m" : "";
    if (r->tty && !r->opt.quiet) printf("\r\x1b[2K");
    printf("samples before epoch %ld (step %ld): %d of the reference's prompts, masked as in training; each masked "
           "character is replaced by the model's guess%s\n", epoch + 1, r->step, n,
           r->color ? " (green: right, red: wrong; the rest dimmed)" : " (* = [PAD] or [MASK] guessed)");
    for (int i = 0; i < n; i++) {
        for (int t = 0; t < T; t++) {
            int pos = i * T + t, V = r->mc.vocab;
            char buf[8];
            if (r->labels[pos] != v->pad_id) {
                const float *lg = logits + (size_t)pos * V;
                int best = 0;
                for (int k = 1; k < V; k++)
                    if (lg[k] > lg[best]) best = k;
                const char *s = best < v->n_chars ? vocab_token_text(v, best, buf) : "*";
                if (best < v->n_chars && v->chars[best] == '\n') s = "\xe2\x86\xb5";
                int ok = best == r->labels[pos];
                printf("%s%s%s", ok ? green : red, s, reset);
                if (f) fputs(s, f);
            } else if (r->inputs[pos] < v->n_chars) {
                const char *s = vocab_token_text(v, r->inputs[pos], buf);
                if (v->chars[r->inputs[pos]] == '\n') s = "\xe2\x86\xb5";
                printf("%s%s%s", dim, s, reset);
                if (f) fputs(s, f);
            }
        }
        putchar('\n');
        if (f) fputc('\n', f);
    }
    if (f) fclose(f);
}

static void format_duration(double s, char *out, size_t n) {
    if (!isfinite(s) || s < 0) { snprintf(out, n, "?"); return; }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(out, n, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
    else if (t >= 60) snprintf(out, n, "%ldm%02lds", t / 60, t % 60);
    else snprintf(out, n, "%lds", t);
}

static void log_metrics(Run *r, const char *kind, long epoch, double loss, double acc, double lr, double gnorm,
                        double tok_per_s) {
    if (!r->metrics) return;  // ranks other than 0 of a data-parallel job
    // A validation split without targets has no loss or accuracy: null (mlm report skips it).
    char loss_s[32] = "null", acc_s[32] = "null";
    if (isfinite(loss)) snprintf(loss_s, sizeof(loss_s), "%.9g", loss);
    if (isfinite(acc)) snprintf(acc_s, sizeof(acc_s), "%.9g", acc);
    fprintf(r->metrics, "{\"kind\":\"%s\",\"step\":%ld,\"epoch\":%ld,\"tokens\":%.0f,\"loss\":%s,\"accuracy\":%s",
            kind, r->step, epoch, r->st.tokens, loss_s, acc_s);
    if (lr >= 0) fprintf(r->metrics, ",\"lr\":%.6g,\"grad_norm\":%.6g,\"tokens_per_s\":%.6g", lr, gnorm, tok_per_s);
    // time_s: training wall time of the whole run, across checkpoints and resumes.
    fprintf(r->metrics, ",\"time_s\":%.3f}\n", r->st.elapsed_s + (mlm_now() - r->t_start));
    fflush(r->metrics);
}

static void check_finite(const Run *r, float loss, const char *where) {
    if (!isfinite(loss))
        mlm_fatal(MLM_EXIT_FAILURE, "the %s loss is %f at step %ld; training diverged: lower optim.lr, keep "
                  "train.grad_clip on, or check the data", where, loss, r->step);
}

// What one batch reports.
typedef struct {
    float loss;
    int correct, n_targets;
    float grad_norm;  // training steps
} BatchStats;

// ---- Gradient accumulation and data parallel (issue 13) ---------------------------------------------------
// The step's batch of b rows is cut into train.accum_steps micro-batches of batch_size / accum_steps rows (the last
// batch of an epoch may leave some short or empty); rank i of N takes micro-batches i*k..i*k+k-1 (k = accum_steps
// / N). Each micro-batch draws exactly the random numbers its rows get in the whole batch: masking is done for the
// whole batch (cheap, and it gives the whole batch's target count), dropout from the sub-range of each site's
// region (DropoutCtx.first_row). Its loss is normalised by the whole batch's target count, so the summed gradient
// equals the whole batch's within float rounding, and the sum runs in one fixed order across ranks (dist.h), so N
// ranks with k micro-batches each give the bits of one process with accum_steps = N x k.

static int accumulating(const Run *r) { return r->cfg.accum_steps > 1 || r->dist.world > 1; }

// sum[n] = g (first micro-batch) or sum + g, elementwise (the order across micro-batches is the caller's).
static void accumulate_grads(float *sum, const float *g, size_t n, int *have) {
    if (!*have) {
        memcpy(sum, g, n * sizeof(float));
        *have = 1;
        return;
    }
    long long count = (long long)n;
#pragma omp parallel for schedule(static) if (count >= 32768)
    for (long long i = 0; i < count; i++) sum[i] += g[i];
}

// Clip and Adam on the summed gradients: every rank on the whole vector, or (train.zero) the last rank clips the
// whole vector, each rank updates its shard of parameters and Adam moments, and the shards are gathered.
static float apply_summed_grads(Run *r, double lr, double *stats, int n_stats) {
    size_t P = r->n_params;
    float clip = (float)r->cfg.grad_clip;
    double norm = 0;
    if (!r->cfg.zero || r->dist.world == 1) {
        dist_bcast_last(&r->dist, r->grad_acc, P * sizeof(float));
        dist_bcast_last(&r->dist, stats, (size_t)n_stats * sizeof(double));
        norm = clip > 0 ? cpu_clip_grads(r->grad_acc, P, clip) : cpu_grad_norm(r->grad_acc, P);
        cpu_adam_update(&r->oc, r->params, r->grad_acc, r->adam_m, r->adam_v, r->decay_mask, P, r->step + 1, lr);
        cpu_model_round_params(r->model, (uint64_t)r->step + 1);
        return (float)norm;
    }
    const Dist *d = &r->dist;
    if (d->rank == d->world - 1) norm = clip > 0 ? cpu_clip_grads(r->grad_acc, P, clip) : cpu_grad_norm(r->grad_acc, P);
    dist_scatter_last(d, r->grad_acc, r->grad_shard, P);
    stats[n_stats] = norm;
    dist_bcast_last(d, stats, (size_t)(n_stats + 1) * sizeof(double));
    size_t a = dist_shard_start(d, P, d->rank), len = dist_shard_start(d, P, d->rank + 1) - a;
    cpu_adam_update(&r->oc, r->params + a, r->grad_shard, r->zero_m, r->zero_v, r->decay_mask + a, len, r->step + 1,
                    lr);
    dist_allgather_items(d, r->params, P, sizeof(float));
    cpu_model_round_params(r->model, (uint64_t)r->step + 1);  // every rank from the gathered masters: the same bits
    return (float)stats[n_stats];
}

static BatchStats train_step_accumulated(Run *r, int b, double lr) {
    CpuModel *m = r->model;
    int T = r->cfg.seq_len, pad = r->corpus.vocab.pad_id;
    int k = r->cfg.accum_steps / r->dist.world, mb = r->cfg.batch_size / r->cfg.accum_steps;
    size_t P = r->n_params;
    mask_batch(r, &r->train_rng, (uint64_t)r->step, b);
    int n_total = 0;
    for (int i = 0; i < b * T; i++) n_total += r->labels[i] != pad;
    m->norm_targets = n_total;
    double stats[3] = {0, 0, 0};  // sum of micro-batch loss x targets, correct predictions; (zero) the norm
    int have = 0;
    for (int j = r->dist.rank * k; j < (r->dist.rank + 1) * k; j++) {
        int r0 = j * mb, rows = MLM_MIN(mb, b - r0), correct = 0;
        float loss = 0;
        if (rows > 0) {
            DropoutCtx d = dropout_ctx(r, &r->train_rng, (uint64_t)r->step, 1);
            d.first_row = r0;
            d.rows = rows;
            loss = cpu_model_forward(m, r->inputs + (size_t)r0 * T, r->labels + (size_t)r0 * T, rows, pad, &d, &correct);
            cpu_model_backward(m);
        }
        // The running sum of the ranks before this one arrives while this rank computes its first micro-batch.
        if (j == r->dist.rank * k) dist_chain_recv(&r->dist, r->grad_acc, P, stats, 2, &have);
        if (rows > 0) {
            stats[0] += (double)loss * m->n_targets;
            stats[1] += correct;
            accumulate_grads(r->grad_acc, m->grads, P, &have);
        }
    }
    m->norm_targets = 0;
    dist_chain_send(&r->dist, r->grad_acc, P, stats, 2, have);
    BatchStats s = {0};
    s.grad_norm = apply_summed_grads(r, lr, stats, 2);
    s.loss = n_total ? (float)(stats[0] / n_total) : 0.0f;
    s.correct = (int)stats[1];
    s.n_targets = n_total;
    check_finite(r, s.loss, "training");
    return s;
}

// The CUDA backend on one GPU with train.accum_steps = k: the micro-batches run on the device one after another
// (cuda_model_accumulate), each masking its rows and drawing its dropout from its rows' sub-range of the whole
// batch's draws (CudaRandom.first_row / batch_rows), its gradient divided by the whole batch's target count; the
// device sums them in micro-batch order, then clips and updates once (cuda_model_apply_accumulated). The host
// masks the whole batch too, with the same numbers and rule, for that count alone (as the CPU path does).
static BatchStats train_step_cuda_accumulated(Run *r, int b, double lr) {
    int T = r->cfg.seq_len, k = r->cfg.accum_steps, mb = r->cfg.batch_size / r->cfg.accum_steps;
    mask_batch(r, &r->train_rng, (uint64_t)r->step, b);
    int n_total = 0;
    for (int i = 0; i < b * T; i++) n_total += r->labels[i] != r->corpus.vocab.pad_id;
    int first = 1;
    for (int j = 0; j < k; j++) {
        int r0 = j * mb, rows = MLM_MIN(mb, b - r0);
        if (rows <= 0) break;  // a short last batch leaves the last micro-batches empty
        CudaRandom rnd = cuda_random(r, &r->train_rng, (uint64_t)r->step, 1);
        rnd.first_row = r0;
        rnd.batch_rows = b;
        cuda_model_accumulate(r->gpu, r->tokens + (size_t)r0 * T, rows, &r->mask, &rnd, n_total, first);
        first = 0;
    }
    CudaStepStats st;
    cuda_model_apply_accumulated(r->gpu, (float)r->cfg.grad_clip, &r->oc, r->step + 1, lr, &st);
    check_finite(r, st.loss, "training");
    BatchStats s = {st.loss, st.correct, st.n_targets, st.grad_norm};
    return s;
}

// The CUDA backend over NCCL: rank i of N runs rows [i * B/N, (i+1) * B/N) of the step's batch (train.accum_steps
// must be N: one micro-batch per GPU), its backward averages over its own targets, and NCCL sums the ranks'
// gradients weighted by their share of the batch's targets, which gives the whole batch's mean. The batch is
// masked on the host (the same numbers and rule as the device's), so each rank's rows get their own masks, and
// each rank draws its rows' own dropout (CudaRandom.first_row / batch_rows: the sub-range of each site's draws that
// its rows get in the whole batch). N GPUs then differ from one GPU with train.accum_steps = N by the float
// rounding of the weighted sum alone; one rank (train.nccl) gives the plain step's bits, which gpu_verify checks.
static BatchStats train_step_nccl(Run *r, int b, double lr) {
    int T = r->cfg.seq_len, mb = r->cfg.batch_size / r->dist.world, pad = r->corpus.vocab.pad_id;
    int r0 = r->dist.rank * mb, rows = MLM_MIN(mb, b - r0);
    CudaStepStats st = {0};
    if (rows > 0) {
        mask_batch(r, &r->train_rng, (uint64_t)r->step, b);
        CudaRandom rnd = cuda_random(r, &r->train_rng, (uint64_t)r->step, 1);
        rnd.first_row = r0;
        rnd.batch_rows = b;
        cuda_model_forward(r->gpu, r->inputs + (size_t)r0 * T, r->labels + (size_t)r0 * T, rows, pad, NULL, &rnd, &st);
        cuda_model_backward(r->gpu);
    }
    double stats[3] = {(double)st.loss * st.n_targets, st.correct, st.n_targets};
    nccl_dp_sum_stats(r->nccl, stats, 3);
    float weight = stats[2] > 0 ? (float)(st.n_targets / stats[2]) : 0.0f;  // 1 exactly on one rank
    nccl_dp_weighted_sum(r->nccl, cuda_model_grads_device(r->gpu), r->n_params, weight, rows <= 0);
    BatchStats s = {0};
    s.grad_norm = cuda_model_optimizer_step(r->gpu, (float)r->cfg.grad_clip, &r->oc, r->step + 1, lr);
    s.loss = stats[2] > 0 ? (float)(stats[0] / stats[2]) : 0.0f;
    s.correct = (int)stats[1];
    s.n_targets = (int)stats[2];
    check_finite(r, s.loss, "training");
    return s;
}

// The CUDA backend's communicator, before the model is created (it selects the rank's device).
static void setup_nccl(Run *r, int gpu) {
    if (!gpu || (r->dist.world == 1 && !r->cfg.nccl)) return;
    if (r->cfg.accum_steps != r->dist.world)
        mlm_fatal(MLM_EXIT_USAGE, "the CUDA backend over NCCL runs one micro-batch per rank: set train.accum_steps = "
                  "%d (the number of ranks); several micro-batches per GPU are implemented on one GPU only so far "
                  "(without train.nccl), and on the CPU backend", r->dist.world);
    if (r->cfg.zero)
        mlm_fatal(MLM_EXIT_USAGE, "train.zero is implemented on the CPU backend only; set train.zero = false");
    r->nccl = nccl_dp_create(&r->dist);
}

// train.zero: keep only this rank's shard of the Adam moments (loaded whole, from a checkpoint or zeros), so that
// each rank holds 2P / N of them instead of 2P.
static void shard_adam_moments(Run *r) {
    const Dist *d = &r->dist;
    size_t a = dist_shard_start(d, r->n_params, d->rank), len = dist_shard_start(d, r->n_params, d->rank + 1) - a;
    r->grad_shard = mlm_calloc(len + 1, sizeof(float), "gradient shard");
    r->zero_m = mlm_malloc(2 * (len + 1) * sizeof(float), "Adam moment shards");
    r->zero_v = r->zero_m + len + 1;
    memcpy(r->zero_m, r->adam_m + a, len * sizeof(float));
    memcpy(r->zero_v, r->adam_v + a, len * sizeof(float));
    free(r->opt_state);
    r->opt_state = NULL;
    r->adam_m = r->adam_v = NULL;
}

// Checks and buffers once the model exists.
static void setup_accumulation(Run *r) {
    if (!accumulating(r) || r->nccl) return;
    if (r->gpu) return;  // one GPU: the device holds the sums (cuda_model_accumulate)
    if (r->dist.world > 1 && !r->dist.mpi)
        mlm_fatal(MLM_EXIT_USAGE, "WORLD_SIZE=%d without an MPI launcher: the CPU backend's ranks exchange gradients "
                  "through MPI; start them with mpirun -np %d mlm train ...", r->dist.world, r->dist.world);
    if (r->cfg.accum_steps % r->dist.world != 0)
        mlm_fatal(MLM_EXIT_USAGE, "train.accum_steps = %d is not a multiple of the %d ranks: each rank takes "
                  "accum_steps / ranks micro-batches of a step; set train.accum_steps to a multiple of %d",
                  r->cfg.accum_steps, r->dist.world, r->dist.world);
    r->grad_acc = mlm_calloc(r->n_params, sizeof(float), "summed gradients");
    if (r->cfg.zero && r->dist.world > 1) shard_adam_moments(r);
}

// Data parallel: rank 0 alone decides from its clock and signals (checkpoint now, stop); the others follow, so
// that every rank checkpoints, validates and stops at the same step.
static volatile sig_atomic_t pending_signal = 0;

static int agreed_checkpoint(Run *r, double now);
static int checkpoint_due(const Run *r, double now);

// One optimizer step on the batch in r->tokens: mask, forward, backward, clip, Adam at step r->step + 1.
static BatchStats train_step(Run *r, int b, double lr) {
    BatchStats s = {0};
    if (r->gpu && r->nccl) return train_step_nccl(r, b, lr);
    if (r->gpu && accumulating(r)) return train_step_cuda_accumulated(r, b, lr);
    if (r->gpu) {
        CudaRandom rnd = cuda_random(r, &r->train_rng, (uint64_t)r->step, 1);
        CudaStepStats st;
        cuda_model_train_step(r->gpu, r->tokens, b, &r->mask, &rnd, (float)r->cfg.grad_clip, &r->oc, r->step + 1, lr,
                              &st);
        check_finite(r, st.loss, "training");
        s.loss = st.loss, s.correct = st.correct, s.n_targets = st.n_targets, s.grad_norm = st.grad_norm;
        return s;
    }
    if (accumulating(r)) return train_step_accumulated(r, b, lr);
    mask_batch(r, &r->train_rng, (uint64_t)r->step, b);
    DropoutCtx d = dropout_ctx(r, &r->train_rng, (uint64_t)r->step, 1);
    s.loss = cpu_model_forward(r->model, r->inputs, r->labels, b, r->corpus.vocab.pad_id, &d, &s.correct);
    check_finite(r, s.loss, "training");
    cpu_model_backward(r->model);
    s.grad_norm = r->cfg.grad_clip > 0 ? cpu_clip_grads(r->model->grads, r->model->n_params, (float)r->cfg.grad_clip)
                                       : cpu_grad_norm(r->model->grads, r->model->n_params);
    cpu_adam_update(&r->oc, r->model->params, r->model->grads, r->adam_m, r->adam_v, r->decay_mask,
                    r->model->n_params, r->step + 1, lr);
    cpu_model_round_params(r->model, (uint64_t)r->step + 1);  // train.precision = bf16: the copy the next step reads
    s.n_targets = r->model->n_targets;
    return s;
}

// Mask the batch in r->tokens with stream `rng` at `index` and run the forward (loss and accuracy only).
static BatchStats eval_batch(Run *r, Rng *rng, uint64_t index, int b, int dropout) {
    BatchStats s = {0};
    if (r->gpu) {
        CudaRandom rnd = cuda_random(r, rng, index, dropout);
        CudaStepStats st;
        cuda_model_forward(r->gpu, r->tokens, NULL, b, r->corpus.vocab.pad_id, &r->mask, &rnd, &st);
        s.loss = st.loss, s.correct = st.correct, s.n_targets = st.n_targets;
        return s;
    }
    mask_batch(r, rng, index, b);
    DropoutCtx d = dropout_ctx(r, rng, index, dropout);
    s.loss = cpu_model_forward(r->model, r->inputs, r->labels, b, r->corpus.vocab.pad_id, &d, &s.correct);
    s.n_targets = r->model->n_targets;
    return s;
}

// The GPU's parameters and Adam moments to and from the host copies (checkpoints, --init, --resume); the CPU
// backend works on the host arrays directly.
static void upload_state(Run *r) {
    if (r->model) cpu_model_round_params(r->model, (uint64_t)r->step);  // bf16: the copy of the loaded masters
    if (!r->gpu) return;
    cuda_model_set_params(r->gpu, r->params);
    cuda_model_set_adam(r->gpu, r->adam_m, r->adam_v);
    cuda_model_set_decay_mask(r->gpu, r->decay_mask);
}

static void download_state(Run *r) {
    if (!r->gpu) return;
    cuda_model_get_params(r->gpu, r->params);
    cuda_model_get_adam(r->gpu, r->adam_m, r->adam_v);
}

// SIGINT/SIGTERM only set a flag; the loop saves a checkpoint at the next step boundary and exits.
static volatile sig_atomic_t stop_signal = 0;
static int signals_deferred;  // data parallel: the signal waits in pending_signal for agreed_checkpoint
static void on_signal(int sig) {
    if (signals_deferred) pending_signal = sig;
    else stop_signal = sig;
}

static int agreed_checkpoint(Run *r, double now) {
    int due = checkpoint_due(r, now);
    if (r->dist.world == 1) return due;
    int mine = due | (int)pending_signal << 1;
    int v = r->nccl ? nccl_dp_agree(r->nccl, mine) : dist_agree(&r->dist, mine);
    stop_signal = v >> 1;
    return v & 1;
}

static void install_signal_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static void save_checkpoint(Run *r) {
    r->st.step = r->step;
    r->st.elapsed_s += mlm_now() - r->t_start;
    r->t_start = r->t_last_ckpt = mlm_now();
    download_state(r);
    // Data parallel: rank 0 writes; with train.zero it first gathers every rank's shard of the Adam moments into a
    // whole copy that lives only while it writes.
    float *gathered = NULL;
    if (r->zero_m) {
        size_t P = r->n_params;
        if (r->dist.rank == 0) gathered = mlm_malloc(2 * P * sizeof(float), "gathered Adam moments");
        dist_gather_root(&r->dist, r->zero_m, gathered, P);
        dist_gather_root(&r->dist, r->zero_v, gathered ? gathered + P : NULL, P);
    }
    if (r->dist.rank != 0) return;
    Checkpoint c = {.cfg = r->cfg, .vocab = r->corpus.vocab, .st = r->st, .n_params = r->n_params,
                    .params = r->params, .adam_m = gathered ? gathered : r->adam_m,
                    .adam_v = gathered ? gathered + r->n_params : r->adam_v};
    memcpy(c.corpus_md5, r->corpus_md5, sizeof(c.corpus_md5));
    char err[1024], path[1200];
    // WordPiece: the vocab.txt goes into the checkpoint (eval, fill and export decode with it); if it changed under
    // the run, the checkpoint is still written, without it.
    if (ckpt_attach_vocab(&c, r->corpus.shards, err, sizeof(err)))
        mlm_warn("%s; this checkpoint will not store its vocabulary (eval, fill and export need it)", err);
    if (ckpt_save(r->run_dir, &c, r->cfg.keep_ckpts, path, sizeof(path), err, sizeof(err)))
        mlm_fatal(MLM_EXIT_FAILURE, "saving a checkpoint failed: %s; the previous checkpoint is intact", err);
    free(c.vocab_text);
    free(gathered);
    if (!r->opt.quiet && r->tty) printf("\r\x1b[2K");
    if (!r->opt.quiet) printf("checkpoint %s\n", path);
}

static void print_progress(const Run *r, long epoch, double loss, double acc, double lr, float gnorm, double tps,
                           double eta_s) {
    char eta[32];
    format_duration(eta_s, eta, sizeof(eta));
    printf("%sepoch %ld/%d step %ld/%ld loss %.4f acc %.4f lr %.3e |g| %.3f %.0f tok/s, %s left%s",
           r->tty ? "\r\x1b[2K" : "", epoch + 1, r->cfg.epochs, r->step, r->total_steps, loss, acc, lr, gnorm, tps,
           eta, r->tty ? "" : "\n");
    fflush(stdout);
}

// A round number of steps near `steps` (two significant digits, at least 100).
static long round_steps(double steps) {
    if (!(steps > 100)) return 100;
    double scale = pow(10.0, floor(log10(steps)) - 1);
    return (long)(floor(steps / scale) * scale);
}

// Once the first steps are timed (a few, over two seconds, after the first one's warm-up): what the whole run
// will take, and on a CPU, when that is long, how to run a short version that still shows learning.
static void maybe_print_estimate(Run *r, double now) {
    long timed = r->step - r->first_step - 1;
    if (r->estimate_shown || r->opt.quiet || timed < 3 || (now - r->t_first_step < 2.0 && timed < 50)) return;
    r->estimate_shown = 1;
    double per_step = (now - r->t_first_step) / (double)timed;
    long left = r->total_steps - r->step;
    char whole[32], pace[32];
    format_duration(per_step * (double)left, whole, sizeof(whole));
    format_duration(per_step * 1000, pace, sizeof(pace));
    printf("%sestimate: %ld steps left of %ld at %.3f s a step (%s per 1000 steps): about %s of training, plus "
           "validation at the end of each epoch\n", r->tty ? "\r\x1b[2K" : "", left, r->total_steps, per_step, pace,
           whole);
    if (!r->gpu && per_step * (double)left > 3600) {
        long short_steps = round_steps(600 / per_step);
        printf("that is long for a CPU. For a short run that shows the model learning in about 10 minutes, stop this "
               "one (Ctrl-C saves a checkpoint) and run the same command with --steps %ld and another --out, e.g.\n"
               "  mlm train%s%s --steps %ld --out runs/short\nor continue this one later with: mlm train --resume %s\n",
               short_steps, r->opt.config_path ? " --config " : "", r->opt.config_path ? r->opt.config_path : "",
               short_steps, r->run_dir);
    }
    fflush(stdout);
}

// A checkpoint every train.ckpt_every steps and, so that a kill never loses much wall time, every
// train.ckpt_minutes minutes.
static int checkpoint_due(const Run *r, double now) {
    if (r->cfg.ckpt_every > 0 && r->step % r->cfg.ckpt_every == 0) return 1;
    return r->cfg.ckpt_minutes > 0 && now - r->t_last_ckpt >= 60.0 * r->cfg.ckpt_minutes;
}

// One epoch of training (from wherever the run stands in it); returns 1 when train.max_steps was reached.
static int train_epoch(Run *r, long epoch) {
    batcher_set_epoch(&r->train_b, epoch);
    int T = r->cfg.seq_len, log_every = r->cfg.log_every;
    double loss_sum = 0, t_log = mlm_now();
    long correct_sum = 0, target_sum = 0, tokens_since = 0, steps_since = 0;
    size_t first = (size_t)(r->step - epoch * (long)r->train_b.n_batches);  // > 0 when resuming mid-epoch
    for (size_t bi = first; bi < r->train_b.n_batches; bi++) {
        // break, not return: the progress line on a terminal still needs its newline.
        if ((r->cfg.max_steps > 0 && r->step >= r->cfg.max_steps) || stop_signal) break;
        int b = batcher_get(&r->train_b, bi, r->tokens);
        // --profile-steps A:B: the profiler captures steps A..B (step s runs when s steps are done).
        if (r->gpu && r->opt.profile && r->step == r->opt.profile_first) {
            cuda_profiler_start();
            r->profiling = 1;
        }
        double lr = optim_lr(&r->oc, r->step + 1);
        BatchStats s = train_step(r, b, lr);
        float gnorm = s.grad_norm;
        if (r->profiling && r->step == r->opt.profile_last) {
            cuda_profiler_stop();
            r->profiling = 0;
        }
        r->step++;
        r->st.tokens += (double)b * T;  // partial last batches count as they are
        loss_sum += s.loss;
        correct_sum += s.correct;
        target_sum += s.n_targets;
        tokens_since += (long)b * T;
        steps_since++;
        int last = bi + 1 == r->train_b.n_batches || (r->cfg.max_steps > 0 && r->step >= r->cfg.max_steps);
        double now = mlm_now(), tps = tokens_since / (now - t_log);
        double acc = target_sum ? (double)correct_sum / target_sum : 0;
        double eta_s = (double)(r->total_steps - r->step) * (now - t_log) / steps_since;
        if (r->step == r->first_step + 1) r->t_first_step = now;
        if (r->step % log_every == 0 || last) {
            // metrics.jsonl: every log_every steps, the means since the previous line.
            log_metrics(r, "train", epoch, loss_sum / steps_since, acc, lr, gnorm, tps);
            if (!r->opt.quiet) print_progress(r, epoch, loss_sum / steps_since, acc, lr, gnorm, tps, eta_s);
            r->t_progress = now;
            loss_sum = 0;
            correct_sum = target_sum = tokens_since = steps_since = 0;
            t_log = now;
        } else if (!r->opt.quiet && (r->step == r->first_step + 1 || (r->tty && now - r->t_progress >= 2.0))) {
            // The terminal hears from the run from its first step on and every two seconds, between metrics lines.
            print_progress(r, epoch, loss_sum / steps_since, acc, lr, gnorm, tps, eta_s);
            r->t_progress = now;
        }
        maybe_print_estimate(r, now);
        if (agreed_checkpoint(r, now)) save_checkpoint(r);
    }
    if (r->tty && !r->opt.quiet) putchar('\n');
    return r->cfg.max_steps > 0 && r->step >= r->cfg.max_steps;
}

// One pass over the validation split with fresh masks; dropout off unless train.eval_dropout.
static void valid_epoch_shared(Run *r, long epoch, double *loss_out, double *acc_out);

static void valid_epoch(Run *r, long epoch, double *loss_out, double *acc_out) {
    if (r->dist.world > 1 && r->dist.mpi) {  // without MPI (NCCL ranks from RANK/WORLD_SIZE) each rank validates all
        valid_epoch_shared(r, epoch, loss_out, acc_out);
        return;
    }
    batcher_set_epoch(&r->valid_b, epoch);
    double loss_sum = 0;
    long correct_sum = 0, target_sum = 0;
    for (size_t bi = 0; bi < r->valid_b.n_batches; bi++) {
        if (stop_signal) return;
        int b = batcher_get(&r->valid_b, bi, r->tokens);
        uint64_t index = (uint64_t)epoch * r->valid_b.n_batches + bi;
        BatchStats s = eval_batch(r, &r->valid_rng, index, b, r->cfg.eval_dropout);
        check_finite(r, s.loss, "validation");
        // Weight by targets so the epoch loss is the mean over all masked positions.
        loss_sum += (double)s.loss * s.n_targets;
        correct_sum += s.correct;
        target_sum += s.n_targets;
    }
    if (stop_signal) return;
    *loss_out = target_sum ? loss_sum / target_sum : NAN;  // no target, no loss (validate says so)
    *acc_out = target_sum ? (double)correct_sum / target_sum : NAN;
    log_metrics(r, "valid", epoch, *loss_out, *acc_out, -1, 0, 0);
}

// Data parallel: each rank evaluates a contiguous share of the validation batches, the per-batch results are
// gathered on every rank and summed in batch order, as one process sums them: the same figures on every rank,
// bit for bit those of one process (which keeps TrainState, and so checkpoints, identical).
static void valid_epoch_shared(Run *r, long epoch, double *loss_out, double *acc_out) {
    batcher_set_epoch(&r->valid_b, epoch);
    size_t nb = r->valid_b.n_batches;
    double *per = mlm_calloc(3 * nb, sizeof(double), "validation results");  // [nb][loss x targets, correct, targets]
    for (size_t bi = dist_shard_start(&r->dist, nb, r->dist.rank); bi < dist_shard_start(&r->dist, nb, r->dist.rank + 1);
         bi++) {
        int b = batcher_get(&r->valid_b, bi, r->tokens);
        BatchStats s = eval_batch(r, &r->valid_rng, (uint64_t)epoch * nb + bi, b, r->cfg.eval_dropout);
        per[3 * bi] = (double)s.loss * s.n_targets;
        per[3 * bi + 1] = s.correct;
        per[3 * bi + 2] = s.n_targets;
    }
    dist_allgather_items(&r->dist, per, nb, 3 * sizeof(double));
    double loss_sum = 0;
    long correct_sum = 0, target_sum = 0;
    for (size_t bi = 0; bi < nb; bi++) {
        check_finite(r, (float)per[3 * bi], "validation");
        loss_sum += per[3 * bi];
        correct_sum += (long)per[3 * bi + 1];
        target_sum += (long)per[3 * bi + 2];
    }
    free(per);
    *loss_out = target_sum ? loss_sum / target_sum : NAN;
    *acc_out = target_sum ? (double)correct_sum / target_sum : NAN;
    log_metrics(r, "valid", epoch, *loss_out, *acc_out, -1, 0, 0);
}

// Validate at the current step and record it: an epoch counts as validated only once its training is
// complete (a max_steps stop mid-epoch validates for the report, and a resume finishes the epoch and validates
// again); last_valid_* make the result survive a checkpoint, so a resumed run neither loses nor repeats it.
static void validate(Run *r, long epoch) {
    double vloss = NAN, vacc = NAN;
    valid_epoch(r, epoch, &vloss, &vacc);
    if (stop_signal) return;
    if (r->step == (epoch + 1) * (long)r->train_b.n_batches) r->st.valid_epochs = epoch + 1;
    if (vacc > r->st.best_valid_acc) { r->st.best_valid_acc = vacc; r->st.best_epoch = epoch; }
    r->st.last_valid_step = r->step;
    r->st.last_valid_loss = vloss;
    r->st.last_valid_acc = vacc;
    if (r->opt.quiet) return;
    char best[64] = "no best yet";
    if (r->st.best_epoch >= 0)
        snprintf(best, sizeof(best), "best %.4f at epoch %ld", r->st.best_valid_acc, r->st.best_epoch + 1);
    if (isnan(vloss))  // a split in which masking selected nothing (all [PAD], or every token exempt)
        printf("epoch %ld: the validation split has no position selected for prediction, so it has no loss or "
               "accuracy (%s)\n", epoch + 1, best);
    else
        printf("epoch %ld: valid loss %.4f acc %.4f (%s)\n", epoch + 1, vloss, vacc, best);
}

// mask.whole_word needs to know which tokens continue a word: a WordPiece shard set's "##" pieces. Any other
// vocabulary has no such pieces, so every token is a word of its own (the switch changes nothing; say so).
static void attach_word_continuations(Run *r) {
    if (!r->mask.whole_word) return;
    const ShardSet *s = r->corpus.shards;
    if (!s || !s->wp) {
        mlm_warn("mask.whole_word: this vocabulary has no word pieces (only a WordPiece shard set from `mlm prepare "
                 "--tokenizer wordpiece` does), so every token is a word of its own and masking is unchanged");
        return;
    }
    r->continuation = mlm_malloc((size_t)r->mask.n_tokens, "whole-word continuation flags");
    mask_wordpiece_continuation(s->wp, r->continuation);
    r->mask.continuation = r->continuation;
}

static void setup(Run *r, const Config *cfg, const TrainOptions *opt) {
    memset(r, 0, sizeof(*r));
    r->cfg = *cfg;
    r->opt = *opt;
    r->color = use_color();
    r->tty = isatty(STDOUT_FILENO);
    if (cfg->threads > 0) omp_set_num_threads(cfg->threads);
    load_data(r);
    r->mc = train_model_config(cfg, &r->corpus.vocab);
    char err[256];
    if (model_config_check(&r->mc, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    r->mask = train_mask_config(cfg, &r->corpus.vocab);
    attach_word_continuations(r);
    init_batchers(r);
    long per_epoch = (long)r->train_b.n_batches;
    r->total_steps = per_epoch * cfg->epochs;
    if (cfg->max_steps > 0 && cfg->max_steps < r->total_steps) r->total_steps = cfg->max_steps;
    r->oc = config_optim(cfg, r->total_steps);
    int max_b = MLM_MAX(cfg->batch_size, N_PROMPTS);
    r->layout = model_rng_layout(&r->mc, max_b);
    rng_init(&r->train_rng, cfg->seed, RNG_DOMAIN_TRAIN);
    rng_init(&r->valid_rng, cfg->seed, RNG_DOMAIN_VALID);
    rng_init(&r->sample_rng, cfg->seed, RNG_DOMAIN_SAMPLE);
    size_t bt = (size_t)max_b * cfg->seq_len;
    r->tokens = mlm_malloc(bt * sizeof(int), "batch tokens");
    r->inputs = mlm_malloc(bt * sizeof(int), "batch inputs");
    r->labels = mlm_malloc(bt * sizeof(int), "batch labels");
    r->uniforms = mlm_malloc(4 * bt * sizeof(float), "masking uniforms");
}

// The largest batch the CUDA model of this configuration holds (what setup_model passes to cuda_model_create).
static int gpu_max_batch(const Config *cfg) { return MLM_MAX(cfg->batch_size, N_PROMPTS); }

static void setup_model(Run *r, int gpu) {
    int max_b = gpu_max_batch(&r->cfg);
    if (gpu) {
        if (r->cfg.precision == PRECISION_BF16)
            mlm_fatal(MLM_EXIT_USAGE, "train.precision = bf16 is not on the CUDA backend yet; train it with --device cpu "
                      "(the CPU reference of the BF16 step) or set train.precision = tf32");
        r->gpu = cuda_model_create(&r->mc, max_b, r->cfg.precision == PRECISION_TF32);
        cuda_model_set_graphs(r->gpu, r->cfg.cuda_graph);
        if (r->mask.whole_word && r->mask.continuation) cuda_model_set_continuation(r->gpu, r->mask.continuation);
        r->n_params = cuda_model_num_params(r->gpu);
        r->params = mlm_calloc(r->n_params, sizeof(float), "parameters (host copy)");
        r->gpu_logits = mlm_malloc((size_t)max_b * r->mc.max_seq * r->mc.vocab * sizeof(float), "logits (host copy)");
        cuda_model_set_sparse_prediction(r->gpu, r->cfg.sparse_prediction);
    } else {
        r->model = cpu_model_create(&r->mc, max_b);
        r->n_params = r->model->n_params;
        r->params = r->model->params;
        cpu_model_set_sparse_prediction(r->model, r->cfg.sparse_prediction);
        if (r->cfg.precision == PRECISION_BF16)
            cpu_model_set_bf16(r->model, rng_domain_seed(r->cfg.seed, RNG_DOMAIN_ROUND));
    }
    model_init_params(&r->mc, r->params, r->cfg.seed, r->cfg.init_copy_layers);
    size_t P = r->n_params;
    r->opt_state = mlm_calloc(2 * P, sizeof(float), "Adam moments");
    r->adam_m = r->opt_state;
    r->adam_v = r->opt_state + P;
    r->decay_mask = mlm_malloc(P, "weight-decay mask");
    model_decay_mask(&r->mc, r->decay_mask);
    r->st.best_epoch = -1;
    r->st.last_valid_step = -1;
    r->st.last_valid_loss = r->st.last_valid_acc = NAN;
}

static void teardown(Run *r) {
    if (r->metrics) fclose(r->metrics);
    run_lock_release(&r->lock);
    held_lock = NULL;
    if (r->profiling) cuda_profiler_stop();
    if (r->model) cpu_model_free(r->model);
    if (r->gpu) {
        cuda_model_free(r->gpu);
        free(r->params);
        free(r->gpu_logits);
    }
    free(r->opt_state);
    free(r->decay_mask);
    free(r->grad_acc);
    free(r->grad_shard);
    free(r->zero_m);
    free(r->continuation);
    nccl_dp_free(r->nccl);
    free(r->tokens); free(r->inputs); free(r->labels); free(r->uniforms);
    rng_free(&r->train_rng); rng_free(&r->valid_rng); rng_free(&r->sample_rng);
    batcher_free(&r->train_b); batcher_free(&r->valid_b);
    corpus_free(&r->corpus);
}

// train.device: cpu, cuda (refused without a device), or auto (the GPU when there is one). 1: CUDA.
static int choose_gpu(const Config *cfg) {
    if (cfg->device == DEVICE_CPU) return 0;
    char why[256];
    int gpus = cuda_device_count(why, sizeof(why));
    if (cfg->device == DEVICE_CUDA && gpus == 0)
        mlm_fatal(MLM_EXIT_USAGE, "train.device = cuda, but %s; use --device cpu or --device auto", why);
    return gpus > 0;
}

int train_key_resumable(const char *key) {
    static const char *const keys[] = {"train.epochs", "train.max_steps", "train.device", "train.log_every",
                                       "train.ckpt_every", "train.keep_ckpts", "train.threads", "train.samples",
                                       "data.path", "train.ckpt_minutes", "train.init_check_vocab",
                                       "train.zero", "train.dist_timeout",  // these two: same bits either way
                                       // checkpoints hold FP32 masters and moments in every precision, so a run
                                       // may continue in another (as on another device: rounding changes, not the run)
                                       "train.precision", "train.tf32"};
    for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
        if (!strcmp(key, keys[i])) return 1;
    return 0;
}

// Continue from a checkpoint: tensors, step and bookkeeping; refuse a different corpus or vocabulary.
static void restore(Run *r, const Checkpoint *c) {
    if (r->corpus.shards && !shard_set_identity_matches(r->corpus.shards, c->corpus_md5))
        mlm_fatal(MLM_EXIT_USAGE, "the shard set %s (identity %s) is not the one this run trained on (identity %s): its "
                  "manifest or shards differ. Pass the original set with --set data.path=DIR; a set of format version "
                  "1 prepared again keeps the run's identity only when it is prepared with --force over the old one",
                  r->corpus.path, r->corpus_md5, c->corpus_md5);
    if (!r->corpus.shards && strcmp(c->corpus_md5, r->corpus_md5) != 0)
        mlm_fatal(MLM_EXIT_USAGE, "the corpus %s (md5 %s) is not the one this run trained on (md5 %s); pass the "
                  "original with --data", r->corpus.path, r->corpus_md5, c->corpus_md5);
    if (memcmp(&c->vocab, &r->corpus.vocab, sizeof(Vocab)) != 0)
        mlm_fatal(MLM_EXIT_USAGE, "the checkpoint's vocabulary differs from the corpus'");
    if (c->n_params != r->n_params)
        mlm_fatal(MLM_EXIT_USAGE, "the checkpoint holds %zu parameters but the model has %zu", c->n_params,
                  r->n_params);
    size_t bytes = c->n_params * sizeof(float);
    memcpy(r->params, c->params, bytes);
    memcpy(r->adam_m, c->adam_m, bytes);
    memcpy(r->adam_v, c->adam_v, bytes);
    r->st = c->st;
    r->step = c->st.step;
}

// --init: the weights of a safetensors file, refused (listing every mismatch) unless they are exactly this
// model's tensors, and, unless train.init_check_vocab = false, exported for this vocabulary.
static void load_init_weights(Run *r) {
    char err[4096];
    const Vocab *check = r->cfg.init_check_vocab ? &r->corpus.vocab : NULL;
    if (weights_load(r->opt.init_path, &r->mc, check, r->params, err, sizeof(err)))
        mlm_fatal(MLM_EXIT_USAGE, "--init: %s", err);
    if (!check) mlm_warn("--init %s: vocabulary not checked (train.init_check_vocab = false)", r->opt.init_path);
}

// bytes as "12.3 MiB" or "4.56 GiB" into buf[32].
static const char *mib_gib(size_t bytes, char *buf) {
    double mib = (double)bytes / (1024.0 * 1024.0);
    if (mib < 1024.0) snprintf(buf, 32, "%.1f MiB", mib);
    else snprintf(buf, 32, "%.2f GiB", mib / 1024.0);
    return buf;
}

// --dry-run: the device memory the CUDA backend would allocate for this configuration (cuda_model_memory_plan,
// the layout cuda_model_create carves), before anything is allocated; with a GPU here, whether it fits.
static void print_device_memory(const Run *r) {
    const Config *c = &r->cfg;
    if (c->device == DEVICE_CPU) return;
    char why[256];
    int devices = cuda_device_count(why, sizeof(why));
    if (!devices && strstr(why, "built without CUDA")) {
        printf("# device memory: not estimated (%s)\n", why);
        return;
    }
    static const char *const names[] = {"fp32", "tf32", "bf16"};
    CudaMemoryPlan p;
    int B = gpu_max_batch(c);
    cuda_model_memory_plan(&r->mc, B, c->precision, c->accum_steps > 1, r->mask.whole_word && r->mask.continuation,
                           &p);
    char b[8][32];
    printf("# device memory (CUDA backend, train.precision = %s, batches of up to %d x %d tokens): %s = parameter "
           "state %s (parameters %s, gradients %s, Adam moments %s, decay mask) + activations %s + cuBLAS workspace %s",
           names[c->precision], B, c->seq_len, mib_gib(p.total, b[0]), mib_gib(p.state_alloc, b[1]),
           mib_gib(p.params, b[2]), mib_gib(p.grads, b[3]), mib_gib(p.adam, b[4]), mib_gib(p.activations, b[5]),
           mib_gib(p.workspace, b[6]));
    if (p.accumulation) printf(" + summed gradients %s", mib_gib(p.accumulation, b[7]));
    if (p.other) printf(" + whole-word flags %zu bytes", p.other);
    printf("; the CUDA context and library handles take a few hundred MiB more\n");
    if (devices) {
        char desc[256];
        cuda_device_describe(desc, sizeof(desc));
        size_t have = cuda_device_total_memory();
        printf("# device memory: %s on this machine's GPU (%s)\n", p.total < have ? "fits" : "does NOT fit", desc);
    }
}

int train_run(const Config *cfg, const TrainOptions *opt) {
    Run r;
    setup(&r, cfg, opt);
    r.lock.fd = -1;
    if (opt->dry_run) {
        corpus_verify_shards(&r.corpus, NULL, 0, r.opt.quiet);
        print_header(&r);
        batcher_set_epoch(&r.train_b, 0);
        int b = batcher_get(&r.train_b, 0, r.tokens);
        mask_batch(&r, &r.train_rng, 0, b);
        print_masked_batch(&r, MLM_MIN(b, 4));
        print_device_memory(&r);
        long sel = 0;
        for (int i = 0; i < b * cfg->seq_len; i++) sel += r.labels[i] != r.corpus.vocab.pad_id;
        printf("# %ld of %d positions selected for prediction (%.1f%%); dry run: nothing trained\n", sel,
               b * cfg->seq_len, 100.0 * sel / (b * cfg->seq_len));
        teardown(&r);
        return 0;
    }
    dist_init(&r.dist, cfg->dist_timeout);
    if (r.dist.rank != 0) r.opt.quiet = 1;  // rank 0 alone prints, writes metrics, samples and checkpoints
    int gpu = choose_gpu(cfg);
    train_agree_setup(&r.dist, cfg, r.corpus_md5, gpu);  // several ranks: the same run everywhere, or none
    // The run directory is locked before anything in it is read for the run or written (by rank 0 alone).
    if (r.dist.rank == 0) {
        choose_run_dir(&r);
        lock_run_dir(&r);
    }
    // Every byte of a shard set is read once per run before training trusts it (rank 0 records that in the run
    // directory, so a resume skips it while the files are unchanged; other ranks check their own view of the files).
    corpus_verify_shards(&r.corpus, r.dist.rank == 0 ? r.run_dir : r.opt.out_dir, r.dist.rank == 0, r.opt.quiet);
    if (opt->profile && !gpu)
        mlm_warn("--profile-steps has no effect on the CPU backend (it brackets CUDA work for nsys and ncu)");
    setup_nccl(&r, gpu);
    setup_model(&r, gpu);
    char err[1024];
    if (opt->resume_path) {
        Checkpoint c;
        if (ckpt_load(opt->resume_path, &c, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "cannot resume: %s", err);
        restore(&r, &c);
        ckpt_free(&c);
    } else if (opt->init_path) {
        load_init_weights(&r);
    }
    train_agree_state(&r.dist, r.step, r.params, opt->resume_path ? r.adam_m : NULL, opt->resume_path ? r.adam_v : NULL,
                      r.n_params, opt->resume_path ? "resumed" : opt->init_path ? "--init" : "seeded");
    upload_state(&r);
    setup_accumulation(&r);
    if (r.dist.rank == 0) prepare_run_files(&r, opt->resume_path != NULL);
    if (r.dist.rank == 0) print_header(&r);
    if (r.dist.rank != 0) {
        // the other ranks print nothing
    } else if (r.gpu) {
        char desc[256];
        cuda_device_describe(desc, sizeof(desc));
        printf("# device: CUDA (%s; TF32 matmuls %s); run directory %s\n", desc, cfg->precision == PRECISION_TF32 ? "on" : "off", r.run_dir);
    } else {
        char matmuls[768];
        cpu_matmul_describe(matmuls, sizeof(matmuls));
        printf("# device: CPU (%d OpenMP threads, matmuls: %s%s); run directory %s\n", omp_get_max_threads(), matmuls,
               cfg->precision == PRECISION_BF16 ? "; BF16 roundings of the CUDA backend's BF16 step" : "", r.run_dir);
    }
    if (accumulating(&r) && r.dist.rank == 0)
        printf("# %d micro-batches of %d sequences per step (train.accum_steps), %d per rank on %d rank(s)%s\n",
               cfg->accum_steps, cfg->batch_size / cfg->accum_steps, cfg->accum_steps / r.dist.world, r.dist.world,
               cfg->zero && r.dist.world > 1 ? "; Adam moments sharded (train.zero)" : "");
    if (opt->resume_path && r.dist.rank == 0) printf("# resumed at step %ld\n", r.step);
    signals_deferred = r.dist.world > 1;
    install_signal_handlers();
    r.t_start = r.t_last_ckpt = r.t_progress = mlm_now();
    r.first_step = r.step;
    long nb = (long)r.train_b.n_batches;
    for (long epoch = r.st.valid_epochs; epoch < cfg->epochs && !stop_signal; epoch++) {
        if (cfg->max_steps > 0 && r.step >= cfg->max_steps) break;
        if (cfg->samples && r.step == epoch * nb && r.dist.rank == 0) print_samples(&r, epoch);
        int done = train_epoch(&r, epoch);
        if (stop_signal) break;
        validate(&r, epoch);
        if (done) break;
    }
    // The last step is always validated: also when it was reached before a kill, or by an earlier process that
    // stopped during this very validation (the loop above then has nothing left to train).
    if (!stop_signal && r.step > 0 && r.st.last_valid_step != r.step) validate(&r, (r.step - 1) / nb);
    save_checkpoint(&r);
    int rc = 0;
    if (stop_signal) {
        if (r.dist.rank == 0) printf("interrupted by %s at step %ld; continue with: mlm train --resume %s\n",
               stop_signal == SIGINT ? "SIGINT" : "SIGTERM", r.step, r.run_dir);
        rc = 128 + stop_signal;
    } else if (r.dist.rank == 0) {
        char dur[32];
        format_duration(r.st.elapsed_s, dur, sizeof(dur));
        char last[96] = "the last validation had no target, so no loss";
        if (!isnan(r.st.last_valid_loss))
            snprintf(last, sizeof(last), "last valid loss %.4f, accuracy %.4f (best %.4f)", r.st.last_valid_loss,
                     r.st.last_valid_acc, r.st.best_valid_acc);
        printf("done: %ld steps, %.0f tokens in %s; %s; run directory %s\n", r.step, r.st.tokens, dur, last, r.run_dir);
    }
    teardown(&r);
    dist_finalize(&r.dist);
    return rc;
}
