// bert_mini_cpu.c: training steps of the CPU backend at BERT-mini's shape on random token batches, with the
// dense head or sparse prediction; prints one JSON line (bench/bert_mini_cpu.py compares it with PyTorch, and with
// --arch bert with transformers' own BertForMaskedLM).
//
// One step is what `mlm train` does on the CPU: masking (BERT scheme, 15%) with the run's Philox stream,
// forward with dropout 0.1, backward, global-norm clip at 1.0 and labml's Noam-Adam update. The model is
// built from a ModelConfig (default: 4 layers x 256, 4 heads, d_ff 1024, seq 128, vocab 30,522, batch 32),
// so no corpus or tokenizer is involved. After --warmup untimed steps, --steps steps are timed; tokens/s is
// from the median step (a shared machine slows single steps many times over), and the process CPU time per
// step is given beside it (what a loaded machine inflates least). --arch bert: model.arch = bert (BertForMaskedLM,
// 512 positions, LayerNorm eps 1e-12) with BERT's AdamW (lr 1e-4, eps 1e-6, weight decay 0.01 on 2-D weights).
//
// usage: bert_mini_cpu [--arch labml|bert] [--sparse] [--threads N] [--batch B] [--seq T] [--layers L]
//                      [--d-model C] [--heads H] [--d-ff F] [--vocab V] [--steps N] [--warmup N] [--seed S]
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/cpu_threads.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"

typedef struct {
    int bert;
    int sparse, threads, batch, seq, layers, d_model, heads, d_ff, vocab, steps, warmup;
    unsigned long long seed;
} Args;

static int int_arg(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) mlm_fatal(MLM_EXIT_USAGE, "%s needs a value", argv[*i]);
    char *end;
    long v = strtol(argv[++*i], &end, 10);
    if (*end || v < 0 || v > 1 << 30) mlm_fatal(MLM_EXIT_USAGE, "%s: '%s' is not a count", argv[*i - 1], argv[*i]);
    return (int)v;
}

static Args parse_args(int argc, char **argv) {
    Args a = {0, 0, 0, 32, 128, 4, 256, 4, 1024, 30522, 5, 1, 1};
    for (int i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--sparse")) a.sparse = 1;
        else if (!strcmp(s, "--arch") && i + 1 < argc) {
            a.bert = !strcmp(argv[++i], "bert");
            if (!a.bert && strcmp(argv[i], "labml")) mlm_fatal(MLM_EXIT_USAGE, "--arch %s: labml or bert", argv[i]);
        }
        else if (!strcmp(s, "--threads")) a.threads = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--batch")) a.batch = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--seq")) a.seq = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--layers")) a.layers = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--d-model")) a.d_model = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--heads")) a.heads = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--d-ff")) a.d_ff = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--vocab")) a.vocab = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--steps")) a.steps = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--warmup")) a.warmup = int_arg(argc, argv, &i);
        else if (!strcmp(s, "--seed")) a.seed = (unsigned long long)int_arg(argc, argv, &i);
        else mlm_fatal(MLM_EXIT_USAGE, "unknown option %s (see the comment at the top of bench/bert_mini_cpu.c)", s);
    }
    if (a.steps < 1) mlm_fatal(MLM_EXIT_USAGE, "--steps must be >= 1");
    return a;
}

static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

int main(int argc, char **argv) {
    cpu_threads_prepare(argv);
    Args a = parse_args(argc, argv);
    if (a.threads > 0) omp_set_num_threads(a.threads);
    ModelConfig cfg = {.vocab = a.vocab, .d_model = a.d_model, .n_heads = a.heads, .n_layers = a.layers,
                       .d_ff = a.d_ff, .max_seq = a.seq, .dropout = 0.1f, .ln_eps = 1e-5f};
    if (a.bert)
        cfg = (ModelConfig){.vocab = a.vocab, .d_model = a.d_model, .n_heads = a.heads, .n_layers = a.layers,
                            .d_ff = a.d_ff, .max_seq = a.seq, .dropout = 0.1f, .ln_eps = 1e-12f,
                            .arch = MODEL_ARCH_BERT, .max_positions = a.seq > 512 ? a.seq : 512, .type_vocab = 2,
                            .init_std = 0.02f, .pad_id = a.vocab - 2};
    int B = a.batch, T = a.seq, V = a.vocab;
    size_t n = (size_t)B * T;
    CpuModel *m = cpu_model_create(&cfg, B);
    cpu_model_set_sparse_prediction(m, a.sparse);
    model_init_params(&cfg, m->params, a.seed, 0);
    // The specials at the end of the vocabulary, as the reference lays them out (the model does not care).
    MaskConfig mask = {.scheme = MASK_SCHEME_BERT, .prob = 0.15f, .unchanged_prob = 0.1f, .random_prob = 0.1f,
                       .n_tokens = V, .n_chars = V - 2, .pad_id = V - 2, .mask_id = V - 1};
    OptimConfig oc = {.kind = OPTIM_NOAM_ADAM, .schedule = SCHED_NOAM, .lr = 1.0f, .beta1 = 0.9f, .beta2 = 0.999f,
                      .eps = 1e-8f, .warmup = 2000, .d_model = a.d_model, .total_steps = 1000000};
    if (a.bert)
        oc = (OptimConfig){.kind = OPTIM_ADAMW, .schedule = SCHED_LINEAR, .lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.999f,
                           .eps = 1e-6f, .weight_decay = 0.01f, .warmup = 10000, .d_model = a.d_model,
                           .total_steps = 1000000};
    uint8_t *decay = mlm_malloc(m->n_params, "weight-decay mask");
    model_decay_mask(&cfg, decay);
    float *adam_m = mlm_calloc(m->n_params, sizeof(float), "Adam m");
    float *adam_v = mlm_calloc(m->n_params, sizeof(float), "Adam v");
    int *tokens = mlm_malloc(n * sizeof(int), "tokens");
    int *inputs = mlm_malloc(n * sizeof(int), "inputs"), *labels = mlm_malloc(n * sizeof(int), "labels");
    float *u = mlm_malloc(4 * n * sizeof(float), "masking uniforms");
    Rng data, train;
    rng_init(&data, a.seed, RNG_DOMAIN_DATA);
    rng_init(&train, a.seed, RNG_DOMAIN_TRAIN);
    RngLayout layout = model_rng_layout(&cfg, B);
    uint32_t *raw = mlm_malloc(n * sizeof(uint32_t), "random tokens");

    int total = a.warmup + a.steps;
    double *wall = mlm_malloc((size_t)a.steps * sizeof(double), "times"), *cpu = mlm_malloc((size_t)a.steps * sizeof(double), "cpu times");
    double targets = 0.0, last_loss = 0.0;
    for (int s = 0; s < total; s++) {
        rng_u32(&data, (uint64_t)s * n, raw, n);  // random ids below the specials (not timed)
        for (size_t i = 0; i < n; i++) tokens[i] = (int)(raw[i] % (uint32_t)(V - 2));
        double t0 = mlm_now(), c0 = cpu_seconds();
        rng_uniform(&train, rng_mask_offset(&layout, (uint64_t)s), u, 4 * n);
        mask_apply(&mask, tokens, n, u, inputs, labels);
        DropoutCtx d = {.rng = &train, .layout = layout, .step = (uint64_t)s, .p = cfg.dropout};
        last_loss = cpu_model_forward(m, inputs, labels, B, mask.pad_id, &d, NULL);
        cpu_model_backward(m);
        cpu_clip_grads(m->grads, m->n_params, 1.0f);
        cpu_adam_update(&oc, m->params, m->grads, adam_m, adam_v, a.bert ? decay : NULL, m->n_params, s + 1,
                        optim_lr(&oc, s + 1));
        double t1 = mlm_now(), c1 = cpu_seconds();
        if (s >= a.warmup) {
            wall[s - a.warmup] = t1 - t0;
            cpu[s - a.warmup] = c1 - c0;
            targets += m->n_targets;
        }
        fprintf(stderr, "step %d: %.3f s wall, %.3f s CPU, loss %.4f, %d targets\n", s + 1, t1 - t0, c1 - c0,
                last_loss, m->n_targets);
    }
    double mean = 0.0;
    for (int i = 0; i < a.steps; i++) mean += wall[i] / a.steps;
    qsort(wall, (size_t)a.steps, sizeof(double), cmp_double);
    qsort(cpu, (size_t)a.steps, sizeof(double), cmp_double);
    double median = wall[a.steps / 2], cpu_median = cpu[a.steps / 2];
    printf("{\"impl\":\"mlm\",\"arch\":\"%s\",\"sparse\":%s,\"tokens_per_s\":%.1f,\"step_ms\":%.1f,\"step_ms_mean\":%.1f,"
           "\"step_ms_min\":%.1f,\"cpu_ms_per_step\":%.1f,\"threads\":%d,\"steps\":%d,\"warmup\":%d,\"batch\":%d,"
           "\"seq_len\":%d,\"d_model\":%d,\"n_layers\":%d,\"n_heads\":%d,\"d_ff\":%d,\"vocab\":%d,"
           "\"targets_per_step\":%.1f,\"last_loss\":%.4f,\"params\":%zu}\n",
           a.bert ? "bert" : "labml", a.sparse ? "true" : "false", (double)n / median, 1e3 * median, 1e3 * mean, 1e3 * wall[0],
           1e3 * cpu_median, omp_get_max_threads(), a.steps, a.warmup, B, T, a.d_model, a.layers, a.heads, a.d_ff,
           V, targets / a.steps, last_loss, m->n_params);
    free(decay), free(wall), free(cpu), free(raw), free(tokens), free(inputs), free(labels), free(u), free(adam_m), free(adam_v);
    rng_free(&data);
    rng_free(&train);
    cpu_model_free(m);
    return 0;
}
