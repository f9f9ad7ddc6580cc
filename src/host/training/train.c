// train.c: `mlm train`, top to bottom: the masking a configuration describes; setup (data, the ranks, the backend,
// the step); restore or initial weights; the epoch loop (samples, training steps, validation); checkpoints (when, and
// agreed by the ranks) and signals; teardown. One training step is step.c's over backend.h and reducer.h; printing is
// print.c's, the run directory run_dir.c's.
#include "mlm/train.h"

#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/agree_ranks.h"
#include "mlm/checkpoint.h"
#include "mlm/common.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"
#include "mlm/nccl_dp.h"
#include "mlm/shards.h"
#include "mlm/weights.h"
#include "mlm/wordpiece.h"
#include "run.h"

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

// ---------------------------------------------------------------------------------------------------------
// Setup: the data, the masking and the random streams; then the ranks, the backend and the step over them.

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

static int use_color(void) {
    const char *nc = getenv("NO_COLOR");
    return isatty(STDOUT_FILENO) && !(nc && nc[0]);
}
// Everything that needs neither the ranks nor a backend: data, masking, batchers, streams (also the dry run's).
static void setup(Run *r, const Config *cfg, const TrainOptions *opt) {
    memset(r, 0, sizeof(*r));
    r->cfg = *cfg;
    r->opt = *opt;
    r->lock.fd = -1;
    r->color = use_color();
    r->tty = isatty(STDOUT_FILENO);
    if (cfg->threads > 0) omp_set_num_threads(cfg->threads);
    load_data(r);
    r->mc = model_config_from(cfg, r->corpus.vocab.n_tokens, r->corpus.vocab.pad_id);
    char err[256];
    if (model_config_check(&r->mc, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
    r->mask = train_mask_config(cfg, &r->corpus.vocab);
    attach_word_continuations(r);
    init_batchers(r);
    long per_epoch = (long)r->train_b.n_batches;
    r->total_steps = per_epoch * cfg->epochs;
    if (cfg->max_steps > 0 && cfg->max_steps < r->total_steps) r->total_steps = cfg->max_steps;
    r->oc = optim_config_from(cfg, r->total_steps);
    r->max_rows = MLM_MAX(cfg->batch_size, N_PROMPTS);
    r->layout = model_rng_layout(&r->mc, r->max_rows);
    rng_init(&r->train_rng, cfg->seed, RNG_DOMAIN_TRAIN);
    rng_init(&r->valid_rng, cfg->seed, RNG_DOMAIN_VALID);
    rng_init(&r->sample_rng, cfg->seed, RNG_DOMAIN_SAMPLE);
    r->tokens = mlm_malloc((size_t)r->max_rows * cfg->seq_len * sizeof(int), "batch tokens");
    step_init(&r->train_step, &r->mask, r->layout, cfg->seq_len, r->max_rows);
    r->st.best_epoch = -1;
    r->st.last_valid_step = -1;
    r->st.last_valid_loss = r->st.last_valid_acc = NAN;
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

// The reducer (reducer.h says which backend goes with which): the CUDA backend's ranks over NCCL (created before the
// model: it selects the rank's device), the CPU backend's over MPI, one process none.
static void setup_reducer(Run *r) {
    const Dist *d = &r->dist;
    if (r->gpu && (d->world > 1 || r->cfg.nccl)) {
        r->rd = reducer_nccl(d);
    } else if (d->world > 1) {
        if (!d->mpi)
            mlm_fatal(MLM_EXIT_USAGE, "WORLD_SIZE=%d without an MPI launcher: the CPU backend's ranks exchange "
                      "gradients through MPI; start them with mpirun -np %d mlm train ...", d->world, d->world);
        r->rd = reducer_mpi(d);
    } else {
        r->rd = reducer_none(d);
    }
}

static void setup_backend(Run *r) {
    const Config *cfg = &r->cfg;
    r->n_params = model_num_params(&r->mc);
    BackendConfig bc = {.mc = r->mc, .max_rows = r->max_rows, .mask = r->mask, .layout = r->layout, .oc = r->oc,
                        .max_norm = (float)cfg->grad_clip, .sparse_prediction = cfg->sparse_prediction,
                        .precision = cfg->precision,
                        .round_seed = rng_domain_seed(cfg->seed, RNG_DOMAIN_ROUND), .cuda_graph = cfg->cuda_graph};
    step_shard(r->rd, r->n_params, cfg->zero, &bc.moments_lo, &bc.moments_len);
    r->be = r->gpu ? backend_cuda(&bc) : backend_cpu(&bc);
    step_plan(&r->train_step, r->be, r->rd, &r->train_rng, (float)cfg->dropout, cfg->batch_size, cfg->accum_steps,
              cfg->zero);
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

// The weights the run starts from: a checkpoint (--resume: tensors, step and bookkeeping; a different corpus or
// vocabulary is refused), a safetensors file (--init), or the initialisation of the seed.
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
    r->st = c->st;
    r->step = c->st.step;
    train_agree_state(&r->dist, r->step, c->params, c->adam_m, c->adam_v, r->n_params, "resumed");
    r->be->load(r->be, c->params, c->adam_m, c->adam_v, c->st.step);
}

// --init: the weights of a safetensors file into params[P], refused (listing every mismatch) unless they are exactly
// this model's tensors, and, unless train.init_check_vocab = false, exported for this vocabulary.
static void load_init_weights(Run *r, float *params) {
    char err[4096];
    const Vocab *check = r->cfg.init_check_vocab ? &r->corpus.vocab : NULL;
    if (weights_load(r->opt.init_path, &r->mc, check, params, err, sizeof(err)))
        mlm_fatal(MLM_EXIT_USAGE, "--init: %s", err);
    if (!check) mlm_warn("--init %s: vocabulary not checked (train.init_check_vocab = false)", r->opt.init_path);
}

static void load_start(Run *r) {
    if (r->opt.resume_path) {
        Checkpoint c;
        char err[1024];
        if (ckpt_load(r->opt.resume_path, &c, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "cannot resume: %s", err);
        restore(r, &c);
        ckpt_free(&c);
        return;
    }
    float *params = mlm_malloc(r->n_params * sizeof(float), "initial parameters");
    // Seeded first also under --init: a BertModel directory has no MLM head, and hf_import leaves the seeded one.
    model_init_params(&r->mc, params, r->cfg.seed, r->cfg.init_copy_layers);
    if (r->opt.init_path) load_init_weights(r, params);
    // Several ranks: the same starting weights everywhere (agree_ranks.h), or none trains.
    train_agree_state(&r->dist, r->step, params, NULL, NULL, r->n_params, r->opt.init_path ? "--init" : "seeded");
    r->be->load(r->be, params, NULL, NULL, 0);  // Adam moments start at zero
    free(params);
}

static void teardown(Run *r) {
    if (r->metrics) fclose(r->metrics);
    run_dir_unlock(r);
    if (r->profiling) cuda_profiler_stop();
    if (r->be) r->be->free(r->be);
    if (r->rd) r->rd->free(r->rd);
    step_free(&r->train_step);
    free(r->tokens);
    free(r->continuation);
    rng_free(&r->train_rng); rng_free(&r->valid_rng); rng_free(&r->sample_rng);
    batcher_free(&r->train_b); batcher_free(&r->valid_b);
    corpus_free(&r->corpus);
}

// ---------------------------------------------------------------------------------------------------------
// Signals and checkpoints.

// SIGINT/SIGTERM only set a flag; the loop saves a checkpoint at the next step boundary and exits. Data parallel:
// rank 0 alone decides from its clock and signals (checkpoint now, stop); the others follow, so that every rank
// checkpoints, validates and stops at the same step.
static volatile sig_atomic_t stop_signal = 0;
static volatile sig_atomic_t pending_signal = 0;
static int signals_deferred;  // data parallel: the signal waits in pending_signal for agreed_checkpoint
static void on_signal(int sig) {
    if (signals_deferred) pending_signal = sig;
    else stop_signal = sig;
}

// A checkpoint every train.ckpt_every steps and, so that a kill never loses much wall time, every
// train.ckpt_minutes minutes.
static int checkpoint_due(const Run *r, double now) {
    if (r->cfg.ckpt_every > 0 && r->step % r->cfg.ckpt_every == 0) return 1;
    return r->cfg.ckpt_minutes > 0 && now - r->t_last_ckpt >= 60.0 * r->cfg.ckpt_minutes;
}

static int agreed_checkpoint(Run *r, double now) {
    int due = checkpoint_due(r, now);
    if (r->dist.world == 1) return due;
    int v = r->rd->agree(r->rd, due | (int)pending_signal << 1);
    stop_signal = v >> 1;
    return v & 1;
}

static void save_checkpoint(Run *r) {
    r->st.step = r->step;
    r->st.elapsed_s += mlm_now() - r->t_start;
    r->t_start = r->t_last_ckpt = mlm_now();
    // Data parallel: rank 0 writes; under ZeRO-1 it first gathers every rank's shard of the Adam moments into a whole
    // copy that lives only while it writes.
    size_t P = r->n_params, len = r->train_step.len;
    const float *params, *adam_m, *adam_v;
    r->be->save(r->be, &params, &adam_m, &adam_v);
    float *gathered = NULL;
    if (len < P) {
        if (r->dist.rank == 0) gathered = mlm_malloc(2 * P * sizeof(float), "gathered Adam moments");
        r->rd->gather_to_root(r->rd, adam_m, gathered, P);
        r->rd->gather_to_root(r->rd, adam_v, gathered ? gathered + P : NULL, P);
    }
    if (r->dist.rank != 0) return;
    // (ckpt_save only reads the tensors; Checkpoint's pointers are not const because ckpt_load owns what it fills.)
    Checkpoint c = {.cfg = r->cfg, .vocab = r->corpus.vocab, .st = r->st, .n_params = P, .params = (float *)params,
                    .adam_m = gathered ? gathered : (float *)adam_m,
                    .adam_v = gathered ? gathered + P : (float *)adam_v};
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

static void check_finite(const Run *r, float loss, const char *where) {
    if (!isfinite(loss))
        mlm_fatal(MLM_EXIT_FAILURE, "the %s loss is %f at step %ld; training diverged: lower optim.lr, keep "
                  "train.grad_clip on, or check the data", where, loss, r->step);
}

// ---------------------------------------------------------------------------------------------------------
// Training: one epoch of steps (step.c's), with the progress lines, metrics and checkpoints between them.

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
        BatchStats s = step_run(&r->train_step, r->tokens, b, (uint64_t)r->step, r->step + 1, lr);
        check_finite(r, s.loss, "training");
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

// ---------------------------------------------------------------------------------------------------------
// Validation: one pass over the validation split with fresh masks; dropout off unless train.eval_dropout.

// Mask the batch in r->tokens with stream `rng` at `index` and run the forward (loss and accuracy only).
static BatchStats eval_batch(Run *r, Rng *rng, uint64_t index, int b) {
    Step *s = &r->train_step;
    step_mask(s, rng, index, r->tokens, b);
    Batch batch = step_whole_batch(s, r->tokens, b, rng, index, r->cfg.eval_dropout ? (float)r->cfg.dropout : 0.0f);
    BatchStats st;
    r->be->evaluate(r->be, &batch, &st);
    return st;
}

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
        BatchStats s = eval_batch(r, &r->valid_rng, index, b);
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
        BatchStats s = eval_batch(r, &r->valid_rng, (uint64_t)epoch * nb + bi, b);
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

// ---------------------------------------------------------------------------------------------------------
// The run.

// --dry-run: the configuration, the vocabulary and one masked batch; nothing trained.
static int dry_run(Run *r) {
    corpus_verify_shards(&r->corpus, NULL, 0, r->opt.quiet);
    print_header(r);
    batcher_set_epoch(&r->train_b, 0);
    int b = batcher_get(&r->train_b, 0, r->tokens);
    long sel = step_mask(&r->train_step, &r->train_rng, 0, r->tokens, b);
    print_masked_batch(r, MLM_MIN(b, 4));
    print_device_memory(r);
    int n = b * r->cfg.seq_len;
    printf("# %ld of %d positions selected for prediction (%.1f%%); dry run: nothing trained\n", sel, n,
           100.0 * sel / n);
    teardown(r);
    return 0;
}

int train_run(const Config *cfg, const TrainOptions *opt) {
    Run r;
    setup(&r, cfg, opt);
    if (opt->dry_run) return dry_run(&r);
    dist_init(&r.dist, cfg->dist_timeout);
    if (r.dist.rank != 0) r.opt.quiet = 1;  // rank 0 alone prints, writes metrics, samples and checkpoints
    r.gpu = choose_gpu(cfg);
    train_agree_setup(&r.dist, cfg, r.corpus_md5, r.gpu);  // several ranks: the same run everywhere, or none
    // The run directory is locked before anything in it is read for the run or written (by rank 0 alone).
    if (r.dist.rank == 0) {
        run_dir_choose(&r);
        run_dir_lock(&r);
    }
    // Every byte of a shard set is read once per run before training trusts it (rank 0 records that in the run
    // directory, so a resume skips it while the files are unchanged; other ranks check their own view of the files).
    corpus_verify_shards(&r.corpus, r.dist.rank == 0 ? r.run_dir : r.opt.out_dir, r.dist.rank == 0, r.opt.quiet);
    if (opt->profile && !r.gpu)
        mlm_warn("--profile-steps has no effect on the CPU backend (it brackets CUDA work for nsys and ncu)");
    setup_reducer(&r);
    setup_backend(&r);
    load_start(&r);
    if (r.dist.rank == 0) {
        run_dir_open_files(&r, opt->resume_path != NULL);
        print_header(&r);
        print_device(&r);
        if (opt->resume_path) printf("# resumed at step %ld\n", r.step);
    }
    signals_deferred = r.dist.world > 1;
    mlm_on_stop_signals(on_signal);
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
