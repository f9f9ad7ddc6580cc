// bench_emu_step.c: the CPU-side measure of one CUDA training step of the reference configuration (or --set
// overrides) as the trainer runs it (step.h over the CUDA backend, one process), run through the CPU execution layer
// (tests/emu) in counting mode: kernel launches, cuBLAS calls, cuRAND calls, host<->device copies, host
// synchronisations, the bytes the kernels' loads and stores touch in device memory, and the device memory the
// model takes (peak of the layer's cudaMalloc'd bytes). Built only against the layer (target bench_emu_step,
// tests/emu/CMakeLists.txt).
// --memory-only: create the backend and print its device memory, without running a step (seconds, where a step of
// a large shape takes many minutes on the layer).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu_api.h"
#include "mlm/backend.h"
#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/dist.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/reducer.h"
#include "mlm/rng.h"
#include "mlm/step.h"

// The counters as JSON (emu_counters_json) inside an object that also names the configuration counted, written
// to a temporary name and renamed (the model is created with TF32 on, as below) so that a reader never sees half a file.
static void write_counts_json(const char *path, const Config *cfg, const ModelConfig *mc, size_t P,
                              const BatchStats *st) {
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "bench_emu_step: cannot write %s: check that its folder exists", tmp);
    fprintf(f, "{\"config\": {\"batch_size\": %d, \"seq_len\": %d, \"d_model\": %d, \"n_heads\": %d, "
            "\"n_layers\": %d, \"d_ff\": %d, \"vocab\": %d, \"dropout\": %g, \"tf32\": %s, \"precision\": \"%s\", "
            "\"params\": %zu},\n"
            "\"loss\": %.6f, \"grad_norm\": %.6f,\n\"counts\": ",
            cfg->batch_size, cfg->seq_len, mc->d_model, mc->n_heads, mc->n_layers, mc->d_ff, mc->vocab, mc->dropout,
            cfg->precision == PRECISION_TF32 ? "true" : "false", precision_name(cfg->precision), P,
            st->loss, st->grad_norm);
    emu_counters_json(f);
    fprintf(f, "}\n");
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "bench_emu_step: cannot write %s (disk full?)", path);
}

int main(int argc, char **argv) {
    Config cfg;
    config_defaults(&cfg);
    // A batch shape's first step runs as plain launches (the warm-up of every kernel and cuBLAS shape before any
    // capture, issue 21 item 5), its second is captured: the counted step after two is a steady-state replay.
    int warmup = 2;
    const char *json_path = NULL;  // --json FILE: the counters and the per-family breakdown for bench/suite.py
    int memory_only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--set") && i + 1 < argc) config_set(&cfg, argv[++i]);
        else if (!strcmp(argv[i], "--warmup") && i + 1 < argc) warmup = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) json_path = argv[++i];
        else if (!strcmp(argv[i], "--memory-only")) memory_only = 1;
        else
            mlm_fatal(MLM_EXIT_USAGE,
                      "usage: bench_emu_step [--set KEY=VALUE]... [--warmup N] [--json FILE] [--memory-only]");
    }
    config_validate(&cfg, "bench_emu_step");
    const int V = 67, B = cfg.batch_size, T = cfg.seq_len;
    ModelConfig mc = model_config_from(&cfg, V, V - 2);  // [PAD] = V - 2, as in mk below
    size_t P = model_num_params(&mc), N = (size_t)B * T;
    float *params = mlm_malloc(P * sizeof(float), "params");
    model_init_params(&mc, params, cfg.seed, cfg.init_copy_layers);
    MaskConfig mk = {.scheme = MASK_SCHEME_REFERENCE, .prob = 0.15f, .unchanged_prob = 0.1f, .random_prob = 0.1f,
                     .n_tokens = V, .n_chars = V - 2, .pad_id = V - 2, .mask_id = V - 1};
    RngLayout layout = model_rng_layout(&mc, B);
    // The trainer's CUDA backend (TF32 on) and step over one process's reducer.
    BackendConfig bc = {.mc = mc, .max_rows = B, .mask = mk, .layout = layout, .oc = optim_config_from(&cfg, warmup + 1),
                        .max_norm = (float)cfg.grad_clip, .sparse_prediction = cfg.sparse_prediction,
                        .moments_lo = 0, .moments_len = P, .precision = cfg.precision,
                        .round_seed = rng_domain_seed(cfg.seed, RNG_DOMAIN_ROUND), .cuda_graph = cfg.cuda_graph};
    Backend *be = backend_cuda(&bc);
    be->load(be, params, NULL, NULL, 0);
    if (memory_only) {
        EmuCounters c;
        emu_counters_get(&c);
        printf("model B %d x T %d, d_model %d, heads %d, layers %d, d_ff %d, vocab %d (%zu params): device memory "
               "%llu bytes (%.2f MiB) after the backend's creation, peak %llu bytes\n", B, T, mc.d_model, mc.n_heads,
               mc.n_layers, mc.d_ff, V, P, (unsigned long long)c.device_bytes_live, c.device_bytes_live / 1048576.0,
               (unsigned long long)c.device_bytes_peak);
        be->free(be);
        free(params);
        return 0;
    }
    Dist one = {.rank = 0, .world = 1, .local_rank = 0, .mpi = 0, .timeout_s = cfg.dist_timeout};
    Reducer *rd = reducer_none(&one);
    Rng rng, data;
    rng_init(&rng, cfg.seed, RNG_DOMAIN_TRAIN);
    rng_init(&data, cfg.seed, RNG_DOMAIN_DATA);
    Step step;
    step_init(&step, &mk, layout, T, B);
    step_plan(&step, be, rd, &rng, mc.dropout, B, cfg.accum_steps, 0);
    int *tok = mlm_malloc(N * sizeof(int), "tokens");
    uint32_t *raw = mlm_malloc(N * sizeof(uint32_t), "raw");
    BatchStats st = {0};
    EmuCounters first = {0};  // the first step alone: the warm-up's cost, shown apart from the steady state
    for (int s = 0; s <= warmup; s++) {
        if (s == 0 || s == warmup) emu_counters_reset();  // count the last step only (creation and warm-up excluded)
        rng_u32(&data, (uint64_t)s * N, raw, N);
        for (size_t i = 0; i < N; i++) tok[i] = (int)(((uint64_t)raw[i] * (V - 2)) >> 32);
        double t0 = mlm_now();
        st = step_run(&step, tok, B, (uint64_t)s, s + 1, optim_lr(&bc.oc, s + 1));
        if (s == 0 && warmup > 0) emu_counters_get(&first);
        if (s == 0 && warmup > 0)
            printf("first step (the warm-up: plain launches, once per batch shape, before any capture): %llu kernel "
                   "launches, %llu cuBLAS calls, %llu host synchronisations, %llu graph launches\n",
                   (unsigned long long)first.launches, (unsigned long long)first.cublas_calls,
                   (unsigned long long)first.host_syncs, (unsigned long long)first.graph_launches);
        if (s == warmup)
            printf("one training step, B %d x T %d, d_model %d, heads %d, layers %d, d_ff %d, vocab %d (%zu params); "
                   "loss %.4f, grad norm %.4f; %.1f s on the CPU layer\n",
                   B, T, mc.d_model, mc.n_heads, mc.n_layers, mc.d_ff, V, P, st.loss, st.grad_norm, mlm_now() - t0);
    }
    if (!isfinite(st.loss)) mlm_fatal(MLM_EXIT_FAILURE, "the step's loss is not finite");
    emu_counters_print(stdout);
    if (json_path) write_counts_json(json_path, &cfg, &mc, P, &st);
    step_free(&step);
    rd->free(rd);
    be->free(be);
    rng_free(&rng);
    rng_free(&data);
    free(params), free(tok), free(raw);
    return 0;
}
