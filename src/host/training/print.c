// print.c: what `mlm train` shows: the resolved configuration, vocabulary and model, one masked batch (--dry-run),
// the reference's samples before every epoch, the progress line and the estimate of the whole run.
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/cuda_backend.h"
#include "mlm/cuda_model.h"
#include "mlm/shards.h"
#include "mlm/wordpiece.h"
#include "run.h"

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

void print_header(const Run *r) {
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

// render_tokens with render_shard_tokens's signature, so one loop shows either kind of vocabulary.
static void render_char_tokens(const Run *r, const int *tokens, int n, char *out, size_t outlen) {
    render_tokens(&r->corpus.vocab, tokens, n, out, outlen);
}

void print_masked_batch(const Run *r, int rows) {
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
        render(r, r->train_step.inputs + i * T, T, text, sizeof(text));
        printf("  input:    %s\n", text);
        render(r, r->train_step.labels + i * T, T, text, sizeof(text));
        printf("  labels:   %s\n", text);
    }
}

// The reference's samples: prompts cut to seq_len, padded with PAD, masked, predicted. Correct predictions
// green, wrong red, unmasked characters dimmed.
void print_samples(Run *r, long epoch) {
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
    // Masked on the host as in training (the CUDA backend masks on the device with the same numbers).
    Step *st = &r->train_step;
    step_mask(st, &r->sample_rng, (uint64_t)epoch, r->tokens, n);
    Batch b = step_whole_batch(st, r->tokens, n, &r->sample_rng, (uint64_t)epoch,
                               r->cfg.eval_dropout ? (float)r->cfg.dropout : 0.0f);
    r->be->evaluate(r->be, &b, NULL);
    const float *logits = r->be->logits(r->be, n);
    const int *inputs = st->inputs, *labels = st->labels;
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
            if (labels[pos] != v->pad_id) {
                const float *lg = logits + (size_t)pos * V;
                int best = 0;
                for (int k = 1; k < V; k++)
                    if (lg[k] > lg[best]) best = k;
                const char *s = best < v->n_chars ? vocab_token_text(v, best, buf) : "*";
                if (best < v->n_chars && v->chars[best] == '\n') s = "\xe2\x86\xb5";
                int ok = best == labels[pos];
                printf("%s%s%s", ok ? green : red, s, reset);
                if (f) fputs(s, f);
            } else if (inputs[pos] < v->n_chars) {
                const char *s = vocab_token_text(v, inputs[pos], buf);
                if (v->chars[inputs[pos]] == '\n') s = "\xe2\x86\xb5";
                printf("%s%s%s", dim, s, reset);
                if (f) fputs(s, f);
            }
        }
        putchar('\n');
        if (f) fputc('\n', f);
    }
    if (f) fclose(f);
}

void format_duration(double s, char *out, size_t n) {
    if (!isfinite(s) || s < 0) { snprintf(out, n, "?"); return; }
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(out, n, "%ldh%02ldm", t / 3600, (t % 3600) / 60);
    else if (t >= 60) snprintf(out, n, "%ldm%02lds", t / 60, t % 60);
    else snprintf(out, n, "%lds", t);
}

void print_progress(const Run *r, long epoch, double loss, double acc, double lr, float gnorm, double tps,
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
void maybe_print_estimate(Run *r, double now) {
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

// Which backend runs on what, the run directory, and how a step is cut into micro-batches over the ranks.
void print_device(const Run *r) {
    if (r->gpu) {
        char desc[256];
        cuda_device_describe(desc, sizeof(desc));
        printf("# device: CUDA (%s; train.precision = %s); run directory %s\n", desc,
               precision_name(r->cfg.precision), r->run_dir);
    } else {
        char matmuls[768];
        cpu_matmul_describe(matmuls, sizeof(matmuls));
        printf("# device: CPU (%d OpenMP threads, matmuls: %s%s); run directory %s\n", omp_get_max_threads(), matmuls,
               r->cfg.precision == PRECISION_BF16 ? "; BF16 roundings of the CUDA backend's BF16 step" : "",
               r->run_dir);
    }
    const Config *c = &r->cfg;
    int sharded = r->train_step.len < r->n_params;
    if (c->accum_steps > 1 || r->dist.world > 1)
        printf("# %d micro-batches of %d sequences per step (train.accum_steps), %d per rank on %d rank(s), summed by "
               "the %s reducer%s\n", c->accum_steps, c->batch_size / c->accum_steps, c->accum_steps / r->dist.world,
               r->dist.world, r->rd->name, sharded ? "; Adam moments sharded (train.zero)" : "");
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
void print_device_memory(const Run *r) {
    const Config *c = &r->cfg;
    if (c->device == DEVICE_CPU) return;
    char why[256];
    int devices = cuda_device_count(why, sizeof(why));
    if (!devices && strstr(why, "built without CUDA")) {
        printf("# device memory: not estimated (%s)\n", why);
        return;
    }
    CudaMemoryPlan p;
    cuda_model_memory_plan(&r->mc, r->max_rows, c->precision, c->accum_steps > 1,
                           r->mask.whole_word && r->mask.continuation, &p);
    char b[9][32], copy[64] = "";
    if (p.params16) snprintf(copy, sizeof(copy), ", BF16 copy %s", mib_gib(p.params16, b[8]));
    printf("# device memory (CUDA backend, train.precision = %s, batches of up to %d x %d tokens): %s = parameter "
           "state %s (FP32 parameters %s, gradients %s, Adam moments %s%s, decay mask) + activations %s + cuBLAS "
           "workspace %s", precision_name(c->precision), r->max_rows, c->seq_len, mib_gib(p.total, b[0]),
           mib_gib(p.state_alloc, b[1]), mib_gib(p.params, b[2]), mib_gib(p.grads, b[3]), mib_gib(p.adam, b[4]), copy,
           mib_gib(p.activations, b[5]), mib_gib(p.workspace, b[6]));
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
