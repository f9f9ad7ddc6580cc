// bench_cpu_step.c: times mlm training steps (mask, forward, backward, clip, Noam-Adam) on the CPU backend
// for the reference configuration (or --set overrides) and prints one JSON object.
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/cpu.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    Config cfg;
    config_defaults(&cfg);
    int warmup = 5, steps = 30;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) config_set(&cfg, argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else mlm_fatal(MLM_EXIT_USAGE, "usage: bench_cpu_step [--set KEY=VALUE]... [--steps N] [--warmup N]");
    }
    if (steps < 1) mlm_fatal(MLM_EXIT_USAGE, "--steps must be >= 1");
    config_validate(&cfg, "bench_cpu_step");
    if (cfg.threads > 0) omp_set_num_threads(cfg.threads);
    const int V = 67, B = cfg.batch_size, T = cfg.seq_len;
    ModelConfig mc = {.vocab = V, .d_model = cfg.d_model, .n_heads = cfg.n_heads, .n_layers = cfg.n_layers,
                      .d_ff = cfg.d_ff, .max_seq = T, .dropout = (float)cfg.dropout, .ln_eps = (float)cfg.ln_eps};
    CpuModel *m = cpu_model_create(&mc, B);
    model_init_params(&mc, m->params, cfg.seed, cfg.init_copy_layers);
    size_t P = m->n_params, N = (size_t)B * T;
    float *state = mlm_calloc(2 * P, sizeof(float), "Adam moments");
    OptimConfig oc = config_optim(&cfg, warmup + steps);
    MaskConfig mk = {.scheme = MASK_SCHEME_REFERENCE, .prob = 0.15f, .unchanged_prob = 0.1f, .random_prob = 0.1f,
                     .n_tokens = V, .n_chars = V - 2, .pad_id = V - 2, .mask_id = V - 1};
    Rng rng, data;
    rng_init(&rng, cfg.seed, RNG_DOMAIN_TRAIN);
    rng_init(&data, cfg.seed, RNG_DOMAIN_DATA);
    RngLayout layout = rng_layout(B, T, mc.d_model, mc.n_heads, mc.d_ff, mc.n_layers);
    int *tok = mlm_malloc(N * sizeof(int), "tokens"), *in = mlm_malloc(N * sizeof(int), "inputs");
    int *lab = mlm_malloc(N * sizeof(int), "labels");
    uint32_t *raw = mlm_malloc(N * sizeof(uint32_t), "raw");
    float *u = mlm_malloc(4 * N * sizeof(float), "uniforms");
    double *ms = mlm_malloc((size_t)steps * sizeof(double), "timings");
    double t_rng = 0;
    for (int s = 0; s < warmup + steps; s++) {
        rng_u32(&data, (uint64_t)s * N, raw, N);  // random characters, as the PyTorch peer uses
        for (size_t i = 0; i < N; i++) tok[i] = (int)(((uint64_t)raw[i] * (V - 2)) >> 32);
        double t0 = mlm_now();
        rng_uniform(&rng, rng_mask_offset(&layout, (uint64_t)s), u, 4 * N);
        mask_apply(&mk, tok, N, u, in, lab);
        double t1 = mlm_now();
        DropoutCtx d = {.rng = &rng, .layout = layout, .step = (uint64_t)s, .p = (float)cfg.dropout};
        float loss = cpu_model_forward(m, in, lab, B, mk.pad_id, &d, NULL);
        cpu_model_backward(m);
        cpu_clip_grads(m->grads, P, (float)cfg.grad_clip);
        cpu_adam_update(&oc, m->params, m->grads, state, state + P, NULL, P, s + 1, optim_lr(&oc, s + 1));
        double t2 = mlm_now();
        if (!isfinite(loss)) mlm_fatal(MLM_EXIT_FAILURE, "loss is not finite at step %d", s);
        if (s >= warmup) {
            ms[s - warmup] = 1e3 * (t2 - t0);
            t_rng += t1 - t0;
        }
    }
    double *sorted = mlm_malloc((size_t)steps * sizeof(double), "sorted");
    memcpy(sorted, ms, (size_t)steps * sizeof(double));
    qsort(sorted, (size_t)steps, sizeof(double), cmp_double);
    double median = sorted[steps / 2], mean = 0;
    for (int i = 0; i < steps; i++) mean += ms[i];
    mean /= steps;
    double flops = model_train_flops(&mc, B, T);
    printf("{\"impl\":\"mlm-cpu\",\"threads\":%d,\"blas\":\"%s\",\"batch\":%d,\"seq_len\":%d,\"d_model\":%d,"
           "\"n_layers\":%d,\"params\":%zu,\"steps\":%d,\"step_ms\":%.3f,\"step_ms_mean\":%.3f,\"step_ms_min\":%.3f,"
           "\"tokens_per_s\":%.1f,\"gflops_per_s\":%.2f,\"step_gflop\":%.4f,\"mask_ms_mean\":%.3f}\n",
           omp_get_max_threads(), MLM_BLAS_NAME, B, T, mc.d_model, mc.n_layers, P, steps, median, mean, sorted[0],
           N / (median * 1e-3), flops / (median * 1e-3) * 1e-9, flops * 1e-9, 1e3 * t_rng / steps);
    rng_free(&rng);
    rng_free(&data);
    cpu_model_free(m);
    free(state); free(tok); free(in); free(lab); free(raw); free(u); free(ms); free(sorted);
    return 0;
}
