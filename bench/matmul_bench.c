// matmul_bench.c: the built-in GEMM (src/cpu/gemm.c) against OpenBLAS on the model's own products, side by side.
//
// For each model (shakespeare: B 64, T 32, d 128, d_ff 256, V 67, 6 layers; bert-mini: B 32, T 128, d 256,
// d_ff 1024, V 30522, 4 layers) it times every product of one training step, as src/cpu calls them: each
// Linear's forward, input gradient and weight gradient (matmul), and attention's per-(batch, head) products
// (matmul_serial inside an OpenMP loop over B * H). Implementations, alternated A B A B in one process so that
// a machine whose load drifts slows both alike:
//   builtin   matmul_builtin / matmul_builtin_serial (OpenMP over tiles)
//   openblas  cblas_sgemm of libopenblas.so.0 (dlopen'ed, so any build of mlm can run this) on the whole
//             product, with openblas_set_num_threads(T); the attention products one single-threaded call each
//             inside the same OpenMP loop
// Figures: GFLOP/s per product (median of the repeats) and per step (the step's products weighted by how
// often a step runs them: the sum of their FLOPs over the sum of their median times), and builtin / openblas
// per product and per step. Load averages at start and end are printed: other processes inflate both.
//
// usage: matmul_bench [--threads 1 2] [--repeats 5] [--model shakespeare|bert-mini|all] [--product PREFIX]
//                     [--kernel avx512|avx2|generic]
#include <dlfcn.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cpu/matmul.h"
#include "mlm/common.h"
#include "mlm/cpu_threads.h"

typedef void SgemmFn(int, int, int, int, int, int, float, const float *, int, const float *, int, float, float *,
                     int);
static SgemmFn *openblas_sgemm;
static void (*openblas_threads)(int);

typedef struct {
    const char *what;
    int ta, tb, M, N, K;
    int count;      // times per training step
    int batched;    // > 0: this many independent products per call (attention's B * H), run as matmul_serial
} Shape;

typedef struct {
    const char *name;
    int B, T, C, F, V, L, H;
} Model;

static const Model MODELS[] = {{"shakespeare", 64, 32, 128, 256, 67, 6, 8},
                               {"bert-mini", 32, 128, 256, 1024, 30522, 4, 4}};

// The products of one training step of model m (src/cpu/cpu_model.c, attention.c).
static int model_shapes(const Model *m, Shape *s) {
    int N = m->B * m->T, C = m->C, F = m->F, V = m->V, L = m->L, T = m->T, hs = m->C / m->H, BH = m->B * m->H;
    struct { const char *what; int in, out, count; } lin[] = {
        {"qkv", C, 3 * C, L}, {"attn-out", C, C, L}, {"ff1", C, F, L}, {"ff2", F, C, L}, {"generator", C, V, 1}};
    int n = 0;
    for (int i = 0; i < 5; i++) {
        s[n++] = (Shape){lin[i].what, 0, 1, N, lin[i].out, lin[i].in, lin[i].count, 0};  // forward: x W^T
        s[n++] = (Shape){lin[i].what, 0, 0, N, lin[i].in, lin[i].out, lin[i].count, 0};  // d input: dy W
        s[n++] = (Shape){lin[i].what, 1, 0, lin[i].out, lin[i].in, N, lin[i].count, 0};  // d weight: dy^T x
    }
    s[n++] = (Shape){"att QK^T", 0, 1, T, T, hs, 2 * L, BH};  // forward scores, backward dP = dY V^T
    s[n++] = (Shape){"att PV", 0, 0, T, hs, T, 2 * L, BH};    // forward P V, backward dQ = dS K
    s[n++] = (Shape){"att P^T dY", 1, 0, T, hs, T, 2 * L, BH}; // backward dV = P^T dY, dK = dS^T Q
    return n;
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

typedef struct {
    float *A, *B, *C;
    int lda, ldb;
    size_t a_stride, b_stride, c_stride;  // between the batched products
} Operands;

static float *random_floats(size_t n) {
    float *x = mlm_malloc(n * sizeof(float), "bench operand");
    unsigned s = 12345;
    for (size_t i = 0; i < n; i++) x[i] = ((s = s * 1103515245u + 12345u) >> 9) * (2.0f / 8388608.0f) - 1.0f;
    return x;
}

static Operands operands(const Shape *s) {
    int nb = s->batched > 0 ? s->batched : 1;
    Operands o;
    o.lda = s->ta ? s->M : s->K;
    o.ldb = s->tb ? s->K : s->N;
    o.a_stride = (size_t)s->M * s->K, o.b_stride = (size_t)s->K * s->N, o.c_stride = (size_t)s->M * s->N;
    o.A = random_floats(o.a_stride * nb);
    o.B = random_floats(o.b_stride * nb);
    o.C = random_floats(o.c_stride * nb);
    return o;
}

// One run of the product (all of its batch) by implementation impl (0 builtin, 1 openblas).
static void run_once(int impl, const Shape *s, const Operands *o) {
    if (s->batched > 0) {
#pragma omp parallel for schedule(static)
        for (int b = 0; b < s->batched; b++) {
            const float *A = o->A + b * o->a_stride, *B = o->B + b * o->b_stride;
            float *C = o->C + b * o->c_stride;
            if (impl == 0)
                matmul_builtin_serial(s->ta, s->tb, s->M, s->N, s->K, 1.0f, A, o->lda, B, o->ldb, 0.0f, C, s->N);
            else
                openblas_sgemm(101, s->ta ? 112 : 111, s->tb ? 112 : 111, s->M, s->N, s->K, 1.0f, A, o->lda, B,
                               o->ldb, 0.0f, C, s->N);
        }
    } else if (impl == 0) {
        matmul_builtin(s->ta, s->tb, s->M, s->N, s->K, 1.0f, o->A, o->lda, o->B, o->ldb, 0.0f, o->C, s->N);
    } else {
        openblas_sgemm(101, s->ta ? 112 : 111, s->tb ? 112 : 111, s->M, s->N, s->K, 1.0f, o->A, o->lda, o->B, o->ldb,
                       0.0f, o->C, s->N);
    }
}

// Seconds per run: enough runs to take about 50 ms, after one warm-up run.
static double time_runs(int impl, const Shape *s, const Operands *o, int threads) {
    if (openblas_threads) openblas_threads(impl == 1 && s->batched == 0 ? threads : 1);
    run_once(impl, s, o);
    int runs = 0;
    double t0 = now(), t;
    do {
        run_once(impl, s, o);
        runs++;
    } while ((t = now() - t0) < 0.05);
    return t / runs;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *x, int n) {
    qsort(x, n, sizeof(double), cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

static const char *only;  // --product: time only the products whose name starts with this

static void bench_model(const Model *m, int threads, int repeats) {
    Shape shapes[32];
    int n = model_shapes(m, shapes);
    omp_set_num_threads(threads);
    printf("\n%s, %d thread%s (%s kernel); GFLOP/s, median of %d alternated repeats\n\n", m->name, threads,
           threads > 1 ? "s" : "", gemm_kernel_name(), repeats);
    printf("| product | op | M x N x K | per step | builtin | OpenBLAS | builtin / OpenBLAS |\n");
    printf("| --- | --- | --- | ---: | ---: | ---: | ---: |\n");
    double step_time[2] = {0, 0}, step_flops = 0;
    for (int i = 0; i < n; i++) {
        const Shape *s = &shapes[i];
        if (only && strncmp(s->what, only, strlen(only)) != 0) continue;
        Operands o = operands(s);
        double t[2][64], ratio[64];
        for (int r = 0; r < repeats; r++) {
            for (int impl = 0; impl < 2; impl++) t[impl][r] = time_runs(impl, s, &o, threads);
            ratio[r] = t[1][r] / t[0][r];
        }
        double flops = 2.0 * s->M * s->N * s->K * (s->batched > 0 ? s->batched : 1);
        double med[2] = {median(t[0], repeats), median(t[1], repeats)};
        for (int impl = 0; impl < 2; impl++) step_time[impl] += s->count * med[impl];
        step_flops += s->count * flops;
        const char *op = s->ta ? (s->tb ? "TT" : "TN") : (s->tb ? "NT" : "NN");
        char dims[64];
        if (s->batched > 0)
            snprintf(dims, sizeof(dims), "%d x (%d x %d x %d)", s->batched, s->M, s->N, s->K);
        else
            snprintf(dims, sizeof(dims), "%d x %d x %d", s->M, s->N, s->K);
        printf("| %s | %s | %s | %d | %.1f | %.1f | %.2f |\n", s->what, op, dims, s->count, flops / med[0] / 1e9,
               flops / med[1] / 1e9, median(ratio, repeats));
        free(o.A); free(o.B); free(o.C);
    }
    printf("| **step** | | | | **%.1f** | **%.1f** | **%.2f** |\n", step_flops / step_time[0] / 1e9,
           step_flops / step_time[1] / 1e9, step_time[1] / step_time[0]);
    printf("\n%s %d thread(s): one step's products take %.1f ms built-in, %.1f ms OpenBLAS\n", m->name, threads,
           1e3 * step_time[0], 1e3 * step_time[1]);
}

int main(int argc, char **argv) {
    cpu_threads_prepare(argv);  // OpenMP waits as in mlm train (passive unless the environment says otherwise)
    int threads[8] = {1, 2}, n_threads = 2, repeats = 5;
    const char *model = "all", *kernel = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--threads") == 0) {
            n_threads = 0;
            while (i + 1 < argc && argv[i + 1][0] != '-' && n_threads < 8) threads[n_threads++] = atoi(argv[++i]);
        } else if (strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
            repeats = atoi(argv[++i]);
            repeats = MLM_MAX(1, MLM_MIN(64, repeats));
        } else if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
            model = argv[++i];
        } else if (strcmp(argv[i], "--product") == 0 && i + 1 < argc) {
            only = argv[++i];
        } else if (strcmp(argv[i], "--kernel") == 0 && i + 1 < argc) {
            kernel = argv[++i];
        } else {
            fprintf(stderr, "usage: %s [--threads 1 2] [--repeats 5] [--model shakespeare|bert-mini|all] "
                    "[--product NAME-PREFIX] [--kernel avx512|avx2|generic]\n", argv[0]);
            return 2;
        }
    }
    void *h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_GLOBAL);
    if (h == NULL) h = dlopen("libopenblas.so", RTLD_NOW | RTLD_GLOBAL);
    if (h == NULL) {
        fprintf(stderr, "matmul_bench: OpenBLAS not found (%s): apt-get install libopenblas-dev (or bash "
                "tools/install_deps.sh), then run again\n", dlerror());
        return 1;
    }
    *(void **)&openblas_sgemm = dlsym(h, "cblas_sgemm");
    *(void **)&openblas_threads = dlsym(h, "openblas_set_num_threads");
    char *(*config)(void);
    *(void **)&config = dlsym(h, "openblas_get_config");
    if (openblas_sgemm == NULL || openblas_threads == NULL) {
        fprintf(stderr, "matmul_bench: the OpenBLAS found lacks cblas_sgemm or openblas_set_num_threads\n");
        return 1;
    }
    if (kernel && !gemm_force_kernel(kernel)) {
        fprintf(stderr, "matmul_bench: this CPU or build has no %s kernel\n", kernel);
        return 1;
    }
    double load[3];
    FILE *f = fopen("/proc/loadavg", "r");
    if (!f || fscanf(f, "%lf %lf %lf", &load[0], &load[1], &load[2]) != 3) load[0] = -1;
    if (f) fclose(f);
    printf("matmul_bench: built-in GEMM (%s kernel) vs %s; load average %.2f at the start\n", gemm_kernel_name(),
           config ? config() : "OpenBLAS", load[0]);
    for (size_t mi = 0; mi < sizeof(MODELS) / sizeof(MODELS[0]); mi++) {
        if (strcmp(model, "all") != 0 && strcmp(model, MODELS[mi].name) != 0) continue;
        for (int t = 0; t < n_threads; t++) bench_model(&MODELS[mi], threads[t], repeats);
    }
    f = fopen("/proc/loadavg", "r");
    if (f && fscanf(f, "%lf", &load[0]) == 1) printf("\nload average %.2f at the end\n", load[0]);
    if (f) fclose(f);
    return 0;
}
