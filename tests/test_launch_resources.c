// test_launch_resources.c (emu): every kernel launch of the CUDA backend, checked against the limits of sm_80 and
// sm_90 at the shapes of every preset, with each kernel's registers, static shared memory and spills as ptxas
// reports them for that architecture. A kernel edit that makes a launch illegal on real hardware (too many
// registers for its block size, shared memory past 48 KiB, a grid past its limit, a spill) fails here, not on the
// first GPU.
//
//   test_launch_resources CONFIGS_DIR REPORT...
//
// One REPORT per source of src/kernels (tests/emu/ptxas_usage.cmake: nvcc -Xptxas -v for sm_80 and sm_90, the flags
// of the real build). Kernels are found there, and launches are found by running: the device
// model of the CPU execution layer (tests/emu) runs at each preset's shape (configs/*.conf, every one at its
// data.seq_len and again at T 512, BERT's longest, each at its batch_size and at one sequence) through a training
// step with graphs on and off, validation and logits-only forwards, sparse prediction and gradient accumulation,
// with the layer recording every launch (kernel, grid, block, dynamic shared memory) and skipping the kernel
// bodies and cuBLAS arithmetic (emu_api.h: emu_record_launches, emu_lazy_device_memory), so bert-base at B 256 and
// T 512 costs seconds of host work. A kernel the driven paths never launch is listed (its spills are still
// checked); a launched kernel without a report fails.
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu_api.h"
#include "mlm/common.h"
#include "mlm/config.h"
#include "mlm/cuda_model.h"
#include "mlm/data.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "mlm/train.h"
#include "test_util.h"

// libstdc++'s demangler (the test links as C++): ptxas names kernels by their mangled names.
char *__cxa_demangle(const char *mangled, char *out, size_t *len, int *status);

// ---- The architectures: what a launch may ask of one block (CUDA C Programming Guide, "Compute Capabilities").
typedef struct {
    int sm;
    int regs_per_block;     // 64 K 32-bit registers for one block
    int regs_per_thread;    // 255
    int reg_alloc_unit;     // registers are allocated per warp in units of 256
    int smem_default;       // static + dynamic shared memory without cudaFuncSetAttribute: 48 KiB
    int smem_optin;         // the most a block may have after opting in
} Arch;
static const Arch ARCHS[] = {
    {80, 65536, 255, 256, 48 * 1024, 163 * 1024},
    {90, 65536, 255, 256, 48 * 1024, 227 * 1024},
};
enum { N_ARCHS = 2, MAX_GRID_X = 2147483647, MAX_GRID_YZ = 65535, MAX_BLOCK_XY = 1024, MAX_BLOCK_Z = 64,
       MAX_THREADS = 1024 };

// ---- ptxas's reports ---------------------------------------------------------------------------------------

typedef struct {
    char file[64];   // basename of the source
    char name[128];  // the kernel's name as written at its launches (demangled, no parameters)
    int is_entry;    // a __global__ (else a device function ptxas kept as a call)
    int arch;        // index into ARCHS
    int regs, smem, stack, spill_stores, spill_loads;
    int launched;    // launches recorded (entries)
} Func;
static Func funcs[1024];
static int n_funcs;

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s ? s + 1 : path;
}

// "_Z11adam_kernelPfPKf..." -> "adam_kernel"; a template's instantiation keeps its arguments and loses its return
// type ("void k<16>(float*)" -> "k<16>"), so that each instantiation is an entry of its own (its registers and
// spills are its own); a name ptxas did not mangle (extern "C") stays as it is.
static void kernel_name(const char *mangled, char *out, size_t outlen) {
    int status = -1;
    char *d = __cxa_demangle(mangled, NULL, NULL, &status);
    const char *s = status == 0 && d ? d : mangled;
    size_t n = strcspn(s, "(");
    const char *start = s;
    int depth = 0;
    for (const char *p = s; p < s + n; p++) {  // the last component of a qualified name, after any return type
        depth += (*p == '<') - (*p == '>');
        if (depth == 0 && p[0] == ':' && p[1] == ':') start = p + 2;
        if (depth == 0 && p[0] == ' ') start = p + 1;
    }
    snprintf(out, outlen, "%.*s", (int)(s + n - start), start);
    free(d);
}

// A launch written kernel<HS><<<...>>> inside a template is recorded as "kernel<HS>": which instantiation ran is not
// in the record, so it stands for every instantiation "kernel<...>" of its file, and each is checked.
static int launch_matches(const char *func_name, const char *launch_name) {
    const char *lt = strchr(launch_name, '<');
    if (!lt) return !strcmp(func_name, launch_name);
    size_t base = (size_t)(lt - launch_name);
    return !strncmp(func_name, launch_name, base) && func_name[base] == '<';
}

static int arch_index(int sm) {
    for (int a = 0; a < N_ARCHS; a++)
        if (ARCHS[a].sm == sm) return a;
    return -1;
}

static Func *find_func(const char *file, const char *name, int arch, int is_entry) {
    for (int i = 0; i < n_funcs; i++)
        if (funcs[i].arch == arch && funcs[i].is_entry == is_entry && !strcmp(funcs[i].name, name) &&
            !strcmp(funcs[i].file, file))
            return &funcs[i];
    return NULL;
}

static Func *add_func(const char *file, const char *mangled, int arch, int is_entry) {
    char name[128];
    kernel_name(mangled, name, sizeof(name));
    Func *f = find_func(file, name, arch, is_entry);
    if (f) return f;
    if (n_funcs == (int)(sizeof(funcs) / sizeof(funcs[0]))) {
        fprintf(stderr, "test_launch_resources: more than %d functions in the ptxas reports\n", n_funcs);
        exit(1);
    }
    f = &funcs[n_funcs++];
    memset(f, 0, sizeof(*f));
    snprintf(f->file, sizeof(f->file), "%s", file);
    snprintf(f->name, sizeof(f->name), "%s", name);
    f->arch = arch;
    f->is_entry = is_entry;
    return f;
}

// One report: "Compiling entry function 'M' for 'sm_80'", "Function properties for M" followed by "N bytes stack
// frame, N bytes spill stores, N bytes spill loads", and for an entry "Used N registers, ..., N bytes smem, ...".
static int read_report(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[4096], file[64] = "?", mangled[1024];
    Func *entry = NULL, *props = NULL;
    int arch = -1, entries = 0;
    while (fgets(line, sizeof(line), f)) {
        char *p;
        int sm;
        if (!strncmp(line, "source ", 7)) {
            line[strcspn(line, "\n")] = 0;
            snprintf(file, sizeof(file), "%.63s", base_name(line + 7));
        } else if ((p = strstr(line, "Compiling entry function '")) &&
                   sscanf(p, "Compiling entry function '%1023[^']' for 'sm_%d'", mangled, &sm) == 2) {
            arch = arch_index(sm);
            entry = arch >= 0 ? add_func(file, mangled, arch, 1) : NULL;
            entries += entry != NULL;
        } else if ((p = strstr(line, "Function properties for ")) && arch >= 0) {
            sscanf(p, "Function properties for %1023s", mangled);
            char name[128];
            kernel_name(mangled, name, sizeof(name));
            props = entry && !strcmp(entry->name, name) ? entry : add_func(file, mangled, arch, 0);
        } else if ((p = strstr(line, "bytes stack frame")) && props) {
            sscanf(line, " %d bytes stack frame, %d bytes spill stores, %d bytes spill loads", &props->stack,
                   &props->spill_stores, &props->spill_loads);
        } else if ((p = strstr(line, "Used ")) && strstr(line, "registers") && entry) {
            sscanf(p, "Used %d registers", &entry->regs);
            char *sm_at = strstr(line, " bytes smem");
            if (sm_at) {
                while (sm_at > line && (sm_at[-1] >= '0' && sm_at[-1] <= '9')) sm_at--;
                entry->smem = atoi(sm_at);
            }
        }
    }
    fclose(f);
    return entries;
}


// ---- Launches, recorded by running the device model at each shape ---------------------------------------

// The distinct launch configurations (kernel, site, grid, block, dynamic shared memory) and where first seen.
typedef struct {
    EmuLaunchRecord r;
    char shape[96];
} Launch;
static Launch *launches;
static size_t n_launches, cap_launches;

static void collect_launches(size_t from, const char *shape) {
    const EmuLaunchRecord *rec;
    size_t n = emu_launch_records(&rec);
    for (size_t i = from; i < n; i++) {
        size_t j = 0;
        for (; j < n_launches; j++)
            if (!memcmp(&launches[j].r.grid, &rec[i].grid, sizeof(rec[i].grid)) &&
                !memcmp(&launches[j].r.block, &rec[i].block, sizeof(rec[i].block)) &&
                launches[j].r.shmem == rec[i].shmem && launches[j].r.line == rec[i].line &&
                !strcmp(launches[j].r.kernel, rec[i].kernel) && !strcmp(launches[j].r.file, rec[i].file))
                break;
        if (j < n_launches) continue;
        if (n_launches == cap_launches) {
            cap_launches = cap_launches ? 2 * cap_launches : 1024;
            launches = realloc(launches, cap_launches * sizeof(*launches));
            if (!launches) exit(1);
        }
        launches[n_launches].r = rec[i];
        snprintf(launches[n_launches].shape, sizeof(launches[n_launches].shape), "%s", shape);
        n_launches++;
    }
}

// A vocabulary of the preset's kind: the reference's characters (67 tokens) for a text corpus, BERT's uncased
// WordPiece vocabulary (30,522 tokens; [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) for a shard set.
static Vocab preset_vocab(const Config *c) {
    Vocab v;
    memset(&v, 0, sizeof(v));
    if (c->data_path[0]) {
        v.kind = VOCAB_KIND_WORDPIECE;
        v.n_tokens = v.n_chars = 30522;
        v.pad_id = 0, v.unk_id = 100, v.cls_id = 101, v.sep_id = 102, v.mask_id = 103;
    } else {
        v.kind = VOCAB_KIND_CHAR;
        v.n_chars = 65;
        for (int i = 0; i < v.n_chars; i++) v.chars[i] = (uint32_t)(32 + i);
        v.pad_id = 65, v.mask_id = 66, v.n_tokens = 67;
        v.unk_id = v.cls_id = v.sep_id = -1;
    }
    return v;
}

static uint64_t lcg_state = 0x853c49e6748fea9bull;
static int random_token(const Vocab *v) {
    for (;;) {
        lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
        int t = (int)((lcg_state >> 33) % (uint64_t)v->n_chars);
        if (t != v->pad_id && t != v->mask_id) return t;
    }
}

// Every path a run takes, at a model of max_B sequences of T tokens: the captured training step (capture and
// replay), plain launches, a partial batch, validation (masked) and logits-only forwards, sparse prediction
// with every position selected (the largest head) and two micro-batches of gradient accumulation.
static void drive(const Config *preset, const Vocab *v, int max_B, int T) {
    Config cfg = *preset;
    cfg.seq_len = T;
    cfg.batch_size = max_B;
    ModelConfig mc = model_config_from(&cfg, v->n_tokens, v->pad_id);
    MaskConfig mask = train_mask_config(&cfg, v);
    OptimConfig oc = optim_config_from(&cfg, 100);
    Rng rng;
    rng_init(&rng, cfg.seed, RNG_DOMAIN_TRAIN);
    CudaRandom rnd = {.philox_seed = rng.seed,
                      .layout = rng_layout(max_B, T, mc.d_model, mc.n_heads, mc.d_ff, mc.n_layers),
                      .step = 0, .dropout_p = mc.dropout};
    size_t N = (size_t)max_B * T;
    int *tokens = malloc(N * sizeof(int)), *labels = malloc(N * sizeof(int));
    if (!tokens || !labels) exit(1);
    for (size_t i = 0; i < N; i++) labels[i] = tokens[i] = random_token(v);
    CudaStepStats st;

    emu_record_launches(1, 0);  // the model's creation runs its kernels (the device Philox self-check)
    CudaModel *m = cuda_model_create(&mc, max_B, cfg.precision);
    emu_record_launches(1, 1);
    for (int graphs = 1; graphs >= 0; graphs--) {
        cuda_model_set_graphs(m, graphs);
        for (int s = 0; s < 2; s++) {  // with graphs: the capture, then a replay
            rnd.step = (uint64_t)s;
            cuda_model_train_step(m, tokens, max_B, &mask, &rnd, (float)cfg.grad_clip, &oc, s + 1, optim_lr(&oc, s + 1),
                                  &st);
        }
        cuda_model_train_step(m, tokens, 1, &mask, &rnd, (float)cfg.grad_clip, &oc, 3, optim_lr(&oc, 3), &st);
        cuda_model_forward(m, tokens, NULL, max_B, mask.pad_id, &mask, &rnd, &st);
        cuda_model_forward(m, tokens, NULL, 1, mask.pad_id, &mask, &rnd, &st);
    }
    cuda_model_forward(m, tokens, NULL, max_B, mask.pad_id, NULL, NULL, NULL);
    cuda_model_set_sparse_prediction(m, 1);
    cuda_model_forward(m, tokens, labels, max_B, mask.pad_id, NULL, &rnd, &st);
    cuda_model_backward(m);
    cuda_model_set_sparse_prediction(m, 0);
    if (max_B >= 2) {
        cuda_model_set_graphs(m, 1);
        int half = max_B / 2;
        CudaRandom micro = rnd;
        micro.batch_rows = 2 * half;
        for (int k = 0; k < 2; k++) {
            micro.first_row = k * half;
            cuda_model_accumulate(m, tokens + (size_t)k * half * T, half, &mask, &micro, (int)(N / 7) + 1, k == 0);
        }
        cuda_model_apply_accumulated(m, (float)cfg.grad_clip, &oc, 4, optim_lr(&oc, 4), &st);
    }
    cuda_model_free(m);
    emu_record_launches(0, 0);
    rng_free(&rng);
    free(tokens);
    free(labels);
}

static int conf_cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

// configs/*.conf, sorted.
static int list_presets(const char *dir, char names[][256], int max) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)) && n < max) {
        size_t len = strlen(e->d_name);
        if (len > 5 && !strcmp(e->d_name + len - 5, ".conf")) snprintf(names[n++], 256, "%s", e->d_name);
    }
    closedir(d);
    char *ptrs[64];
    for (int i = 0; i < n; i++) ptrs[i] = names[i];
    qsort(ptrs, (size_t)n, sizeof(char *), conf_cmp);
    char sorted[64][256];
    for (int i = 0; i < n; i++) snprintf(sorted[i], 256, "%s", ptrs[i]);
    memcpy(names, sorted, (size_t)n * 256);
    return n;
}

// ---- The checks ------------------------------------------------------------------------------------------

// Registers a block of `threads` threads takes: per warp, regs x 32 rounded up to the allocation unit.
static long block_registers(const Arch *a, int regs, long threads) {
    long warps = (threads + 31) / 32, per_warp = ((long)regs * 32 + a->reg_alloc_unit - 1) / a->reg_alloc_unit;
    return warps * per_warp * a->reg_alloc_unit;
}

// The launch closest to each limit, per architecture (printed: how much room the kernels leave).
typedef struct {
    double frac;
    char what[256];
} Closest;
static Closest closest_regs[N_ARCHS], closest_smem[N_ARCHS];

static void note_closest(Closest *c, double frac, const char *kernel, const char *shape, long used, long limit) {
    if (frac <= c->frac) return;
    c->frac = frac;
    snprintf(c->what, sizeof(c->what), "%s at %s: %ld of %ld", kernel, shape, used, limit);
}

// One launch against one compiled kernel's resources on one architecture.
static void check_launch_on(const Arch *A, int a, Func *f, const Launch *L, long threads, const char *where) {
    const EmuLaunchRecord *r = &L->r;
    f->launched++;
    long regs = block_registers(A, f->regs, threads);
    CHECK(f->regs <= A->regs_per_thread && regs <= A->regs_per_block,
          "%s: sm_%d: %s: %d registers per thread take %ld registers for the block, more than the %d a block may "
          "have: the launch would fail with cudaErrorLaunchOutOfResources (use fewer threads per block or "
          "__launch_bounds__(%ld))", where, A->sm, f->name, f->regs, regs, A->regs_per_block, threads);
    note_closest(&closest_regs[a], (double)regs / A->regs_per_block, f->name, L->shape, regs, A->regs_per_block);
    long smem = (long)f->smem + (long)r->shmem;
    note_closest(&closest_smem[a], (double)smem / A->smem_default, f->name, L->shape, smem, A->smem_default);
    CHECK(smem <= A->smem_default,
          "%s: sm_%d: %s: %d bytes of static and %zu of dynamic shared memory make %ld, more than the %d a launch "
          "may use without cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize) (the device "
          "allows %d after it)", where, A->sm, f->name, f->smem, r->shmem, smem, A->smem_default, A->smem_optin);
}

static void check_launch(const Launch *L) {
    const EmuLaunchRecord *r = &L->r;
    long threads = (long)r->block[0] * r->block[1] * r->block[2];
    char where[512];
    snprintf(where, sizeof(where), "%s at %s:%d (%s): grid (%u,%u,%u), block (%u,%u,%u), %zu bytes of dynamic shared "
             "memory", r->kernel, base_name(r->file), r->line, L->shape, r->grid[0], r->grid[1], r->grid[2],
             r->block[0], r->block[1], r->block[2], r->shmem);
    CHECK(r->grid[0] >= 1 && r->grid[1] >= 1 && r->grid[2] >= 1 && r->grid[0] <= (unsigned)MAX_GRID_X &&
              r->grid[1] <= MAX_GRID_YZ && r->grid[2] <= MAX_GRID_YZ,
          "%s: the grid is outside 1..2^31-1 x 1..65535 x 1..65535", where);
    CHECK(threads >= 1 && threads <= MAX_THREADS && r->block[0] <= MAX_BLOCK_XY && r->block[1] <= MAX_BLOCK_XY &&
              r->block[2] <= MAX_BLOCK_Z,
          "%s: a block may have 1..1024 threads, at most 1024 x 1024 x 64", where);
    for (int a = 0; a < N_ARCHS; a++) {
        const Arch *A = &ARCHS[a];
        int found = 0;
        for (int i = 0; i < n_funcs; i++) {
            Func *f = &funcs[i];
            int same_kernel = !strcmp(f->file, base_name(r->file)) && launch_matches(f->name, r->kernel);
            if (f->arch != a || !f->is_entry || !same_kernel) continue;
            found++;
            check_launch_on(A, a, f, L, threads, where);
        }
        CHECK(found > 0, "%s: sm_%d: ptxas reported no kernel %s in %s (is the kernel defined in src/kernels, and "
              "does the report hold it?)", where, A->sm, r->kernel, base_name(r->file));
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: test_launch_resources CONFIGS_DIR REPORT...\n");
        return 2;
    }
    // The model's memory is address space here (emu_lazy_device_memory); the device size it may assume is not
    // what this test checks.
    setenv("MLM_EMU_MEM_MIB", "16777216", 1);
    setenv("MLM_EMU_QUIET", "1", 1);
    int entries = 0;
    for (int i = 2; i < argc; i++) {
        int n = read_report(argv[i]);  // (a source without kernels, device.cu, has an empty report)
        CHECK(n >= 0, "ptxas report %s is missing (tests/emu/ptxas_usage.cmake writes it at build time)", argv[i]);
        entries += n > 0 ? n : 0;
    }
    CHECK(entries > 0, "the ptxas reports name no kernel");
    if (entries <= 0) return test_finish("test_launch_resources");
    const char *configs = argv[1];
    static char presets[64][256];
    int n_presets = list_presets(configs, presets, 64);
    CHECK(n_presets > 0, "no configs/*.conf in %s", configs);

    emu_lazy_device_memory(1);
    for (int i = 0; i < n_presets; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%.3800s/%.255s", configs, presets[i]);
        Config cfg;
        config_defaults(&cfg);
        config_load_file(&cfg, path);
        Vocab v = preset_vocab(&cfg);
        int shapes[2][2] = {{cfg.batch_size, cfg.seq_len}, {cfg.batch_size, 512}};
        for (int s = 0; s < (cfg.seq_len == 512 ? 1 : 2); s++) {
            char shape[96];
            snprintf(shape, sizeof(shape), "%.48s B %d T %d V %d", presets[i], shapes[s][0], shapes[s][1], v.n_tokens);
            const EmuLaunchRecord *rec;
            size_t before = emu_launch_records(&rec), distinct = n_launches;
            double t0 = mlm_now();
            drive(&cfg, &v, shapes[s][0], shapes[s][1]);
            collect_launches(before, shape);
            printf("  %-42s %5zu launches, %3zu new configurations (%.1f s)\n", shape,
                   emu_launch_records(&rec) - before, n_launches - distinct, mlm_now() - t0);
        }
    }

    for (size_t i = 0; i < n_launches; i++) check_launch(&launches[i]);

    // Per kernel and architecture: its resources, the largest block and dynamic shared memory it was launched
    // with; spills anywhere fail; kernels never launched are listed.
    printf("  %-40s %-16s %5s %6s %6s %6s %7s %9s\n", "kernel", "file", "arch", "regs", "smem", "stack", "threads",
           "dyn smem");
    int unlaunched = 0;
    for (int i = 0; i < n_funcs; i++) {
        Func *f = &funcs[i];
        CHECK(f->spill_stores == 0 && f->spill_loads == 0,
              "%s (%s) spills on sm_%d: %d bytes of spill stores, %d of spill loads (local memory in the inner loop: "
              "fewer live values, or no __launch_bounds__ that caps its registers)", f->name, f->file,
              ARCHS[f->arch].sm, f->spill_stores, f->spill_loads);
        if (!f->is_entry) continue;
        long most_threads = 0;
        size_t most_shmem = 0;
        for (size_t j = 0; j < n_launches; j++) {
            const EmuLaunchRecord *r = &launches[j].r;
            if (strcmp(r->kernel, f->name) || strcmp(base_name(r->file), f->file)) continue;
            long t = (long)r->block[0] * r->block[1] * r->block[2];
            if (t > most_threads) most_threads = t;
            if (r->shmem > most_shmem) most_shmem = r->shmem;
        }
        if (!f->launched) {
            unlaunched += f->arch == 0;
            continue;
        }
        printf("  %-40s %-16s sm_%d %6d %6d %6d %7ld %9zu\n", f->name, f->file, ARCHS[f->arch].sm, f->regs, f->smem,
               f->stack, most_threads, most_shmem);
    }
    if (unlaunched) {
        printf("  not launched by any driven path (their spills are checked, their launches are not):");
        for (int i = 0; i < n_funcs; i++)
            if (funcs[i].is_entry && funcs[i].arch == 0 && !funcs[i].launched)
                printf(" %s (%s)", funcs[i].name, funcs[i].file);
        printf("\n");
    }
    for (int a = 0; a < N_ARCHS; a++)
        printf("  sm_%d, closest to the limits: registers of a block %s; shared memory %s bytes\n", ARCHS[a].sm,
               closest_regs[a].what, closest_smem[a].what);
    int kernels = 0;
    for (int i = 0; i < n_funcs; i++) kernels += funcs[i].is_entry && funcs[i].arch == 0;
    printf("  %d kernels (ptxas, sm_80 and sm_90), %zu distinct launch configurations at %d presets\n", kernels,
           n_launches, n_presets);
    return test_finish("test_launch_resources");
}
