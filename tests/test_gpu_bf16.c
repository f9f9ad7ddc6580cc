// test_gpu_bf16.c (gpu; emu as test_emu_bf16): the BF16 kernels of src/kernels/bf16.cu against their CPU twins
// (src/cpu/bf16.c) and the cuBLASLt products of src/kernels/matmul.cu against the CPU's linear_forward /
// linear_backward (src/cpu/matmul.c) on the same values.
//
// Tolerances and why:
//   - round to nearest even, widening, THE ROUNDING RULE: BIT-EXACT (the kernels compute the twins' rule on the same
//     Philox outputs; rounding is a function of its input).
//   - products with an FP32 output: TOL_SUM(K) = 1e-6 + 4e-7 sqrt(K) of the output's largest magnitude, as
//     test_gpu_ops (both sides multiply the same BF16 values exactly and sum K products in another order).
//   - products with a BF16 output: the CPU's FP32 result rounded to BF16 (bf16_round) against the GPU's. Where the
//     two FP32 sums straddle a rounding boundary of BF16 they differ by one BF16 ulp (2^-7 relative), elsewhere not
//     at all; the sums differ by ~sqrt(K) 2^-24 relative and a boundary is 2^-8 away on average, so about
//     sqrt(K) 2^-16 of the elements (< 0.1% here) may be one ulp apart: every element within one ulp plus
//     TOL_SUM(K), at least 99% of them equal.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"
#include "kernels/cuda_check.h"
#include "kernels/kernels.h"
#include "mlm/bf16.h"
#include "mlm/common.h"
#include "mlm/cuda_backend.h"
#include "mlm/rng.h"
#include "test_util.h"

static cudaStream_t st;
static Rng data_rng;
static uint64_t data_pos = 0;
static int quick = 0;

static double tol_sum(int K) { return 1e-6 + 4e-7 * sqrt((double)K); }

static float *host_rand(size_t n, float lo, float hi) {
    float *x = mlm_malloc((n ? n : 1) * sizeof(float), "test tensor");
    if (n) rng_uniform(&data_rng, data_pos, x, n);
    data_pos += n;
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * x[i];
    return x;
}

static void *dev_alloc(size_t bytes) {
    void *d = NULL;
    CUDA_CHECK(cudaMalloc(&d, bytes ? bytes : 1));
    return d;
}
static void *dev_upload(const void *h, size_t bytes) {
    void *d = dev_alloc(bytes);
    CUDA_CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}
static void download(void *h, const void *d, size_t bytes) {
    CUDA_CHECK(cudaStreamSynchronize(st));
    CUDA_CHECK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}

// ---- Conversions -------------------------------------------------------------------------------------------

static void test_conversions(void) {
    const size_t n = quick ? 5003 : 1000003;
    float *x = host_rand(n, -3.0f, 3.0f);
    // Specials and the rounding boundaries: ties, values just around them, denormals, overflow, NaN, infinities.
    const uint32_t special[] = {0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x3f808001u, 0x00000001u, 0x807fffffu,
                                0x7f7f8000u, 0x7f7fffffu, 0x7fc00000u, 0xff800001u, 0x7f800000u, 0xff800000u, 0, 0x80000000u};
    for (size_t i = 0; i < sizeof(special) / sizeof(special[0]); i++) memcpy(&x[i * 7], &special[i], 4);
    uint16_t *want = mlm_malloc(n * sizeof(uint16_t), "want"), *got = mlm_malloc(n * sizeof(uint16_t), "got");
    float *back = mlm_malloc(n * sizeof(float), "back"), *back_want = mlm_malloc(n * sizeof(float), "back_want");
    float *dx = dev_upload(x, n * sizeof(float));
    uint16_t *db = dev_alloc(n * sizeof(uint16_t));
    float *dback = dev_alloc(n * sizeof(float));
    cuda_bf16_round(db, dx, n, st);
    cuda_bf16_to_float(dback, db, n, st);
    download(got, db, n * sizeof(uint16_t));
    download(back, dback, n * sizeof(float));
    bf16_round_array(want, x, n);
    bf16_to_float_array(back_want, want, n);
    size_t bad = 0, bad_back = 0;
    for (size_t i = 0; i < n; i++) bad += got[i] != want[i], bad_back += memcmp(&back[i], &back_want[i], 4) != 0;
    CHECK(bad == 0, "cuda_bf16_round: %zu of %zu differ from bf16_round_array", bad, n);
    CHECK(bad_back == 0, "cuda_bf16_to_float: %zu of %zu differ from bf16_to_float_array", bad_back, n);

    // THE ROUNDING RULE at offsets across cuRAND's thread-row boundary, unaligned, and at a large step's offset.
    const uint64_t seed = rng_domain_seed(99, RNG_DOMAIN_ROUND);
    const uint64_t offsets[] = {0, 3, 4ull * 65536 - 13, 812355ull * 1000001ull};
    for (size_t o = 0; o < sizeof(offsets) / sizeof(offsets[0]); o++) {
        size_t m = n - o;  // also lengths that are not multiples of 4
        cuda_bf16_stochastic_round(db, dx, m, seed, offsets[o], st);
        download(got, db, m * sizeof(uint16_t));
        bf16_stochastic_round_array(want, x, m, seed, offsets[o]);
        bad = 0;
        for (size_t i = 0; i < m; i++) bad += got[i] != want[i];
        CHECK(bad == 0, "cuda_bf16_stochastic_round at offset %llu, n %zu: %zu differ from the CPU twin",
              (unsigned long long)offsets[o], m, bad);
    }
    printf("  conversions: round to nearest even, widening and stochastic rounding (4 offsets) bit-identical to the "
           "CPU twins over %zu values\n", n);
    CUDA_CHECK(cudaFree(dx));
    CUDA_CHECK(cudaFree(db));
    CUDA_CHECK(cudaFree(dback));
    free(x);
    free(want);
    free(got);
    free(back);
    free(back_want);
}

// ---- cuBLASLt products ---------------------------------------------------------------------------------------

// A device copy of x[n] in type t; for BF16 x is first rounded in place, so the CPU computes on the same values.
static void *to_device(float *x, size_t n, MlmDtype t) {
    if (t == MLM_DTYPE_F32) return dev_upload(x, n * sizeof(float));
    uint16_t *b = mlm_malloc((n ? n : 1) * sizeof(uint16_t), "bf16");
    bf16_round_array(b, x, n);
    bf16_to_float_array(x, b, n);
    void *d = dev_upload(b, n * sizeof(uint16_t));
    free(b);
    return d;
}

static float *from_device(const void *d, size_t n, MlmDtype t) {
    float *x = mlm_malloc((n ? n : 1) * sizeof(float), "result");
    if (t == MLM_DTYPE_F32) {
        download(x, d, n * sizeof(float));
    } else {
        uint16_t *b = mlm_malloc((n ? n : 1) * sizeof(uint16_t), "bf16");
        download(b, d, n * sizeof(uint16_t));
        bf16_to_float_array(x, b, n);
        free(b);
    }
    return x;
}

// got against the CPU's want (FP32) by the rule of the output type (see the top); returns 1 when it passes.
static int compare(const char *what, const float *got, float *want, size_t n, int K, MlmDtype t) {
    double scale = 0.0;
    for (size_t i = 0; i < n; i++) scale = fmax(scale, fabs(want[i]));
    double tol = tol_sum(K) * fmax(scale, 1e-30);
    if (t == MLM_DTYPE_BF16) bf16_round_in_place(want, n);
    size_t bad = 0, equal = 0, worst_at = 0;
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - want[i]);
        double allowed = t == MLM_DTYPE_BF16 ? ldexp(fabs(want[i]), -7) + tol : tol;
        if (!(err <= allowed)) bad++;
        if (err > worst || isnan(err)) worst = isnan(err) ? INFINITY : err, worst_at = i;
        equal += got[i] == want[i];
    }
    int ok = bad == 0 && (t == MLM_DTYPE_F32 || equal >= n - n / 100);
    CHECK(ok, "%s: %zu of %zu outside the tolerance, %zu equal; worst |err| %.3g at %zu (got %.9g, want %.9g)", what,
          bad, n, equal, worst, worst_at, got[worst_at], want[worst_at]);
    return ok;
}

static void test_products(void) {
    CudaLt lt;
    void *ws = dev_alloc(1 << 20);
    cuda_lt_create(&lt, ws, 1 << 20, 0);
    const int shapes[][3] = {{1, 1, 1}, {37, 70, 29}, {64, 48, 96}, {5, 257, 3}};  // N, IC, OC
    int cases = 0, passed = 0;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (int in_bf16 = 0; in_bf16 < 2; in_bf16++)
            for (int out_bf16 = 0; out_bf16 <= in_bf16; out_bf16++) {
                int N = shapes[s][0], IC = shapes[s][1], OC = shapes[s][2];
                MlmDtype it = in_bf16 ? MLM_DTYPE_BF16 : MLM_DTYPE_F32, ot = out_bf16 ? MLM_DTYPE_BF16 : MLM_DTYPE_F32;
                size_t esz = ot == MLM_DTYPE_BF16 ? 2 : 4;
                char what[160];
                float *inp = host_rand((size_t)N * IC, -1, 1), *w = host_rand((size_t)OC * IC, -1, 1);
                float *bias = host_rand((size_t)OC, -1, 1), *dout = host_rand((size_t)N * OC, -1, 1);
                void *d_inp = to_device(inp, (size_t)N * IC, it), *d_w = to_device(w, (size_t)OC * IC, it);
                void *d_dout = to_device(dout, (size_t)N * OC, it), *d_bias = to_device(bias, (size_t)OC, ot);
                // Forward with the bias epilogue.
                void *d_out = dev_alloc((size_t)N * OC * esz);
                cuda_lt_linear_forward(&lt, d_out, ot, d_inp, d_w, it, d_bias, N, IC, OC, 0.0f, st);
                float *got = from_device(d_out, (size_t)N * OC, ot);
                float *want = mlm_malloc((size_t)N * OC * sizeof(float), "want");
                linear_forward(want, inp, w, bias, N, IC, OC);
                snprintf(what, sizeof(what), "forward %s->%s N %d IC %d OC %d", in_bf16 ? "bf16" : "f32",
                         out_bf16 ? "bf16" : "f32", N, IC, OC);
                passed += compare(what, got, want, (size_t)N * OC, IC, ot);
                free(got);
                free(want);
                // dinp = dout w, then beta 1 adds a second one: 2 dout w.
                void *d_dinp = dev_alloc((size_t)N * IC * esz);
                cuda_lt_linear_backward_input(&lt, d_dinp, ot, d_dout, d_w, it, N, IC, OC, 0.0f, st);
                if (!out_bf16) cuda_lt_linear_backward_input(&lt, d_dinp, ot, d_dout, d_w, it, N, IC, OC, 1.0f, st);
                got = from_device(d_dinp, (size_t)N * IC, ot);
                want = calloc((size_t)N * IC, sizeof(float));
                float *dw_unused = calloc((size_t)OC * IC, sizeof(float));
                linear_backward(want, dw_unused, NULL, dout, inp, w, N, IC, OC);
                if (!out_bf16)
                    for (size_t i = 0; i < (size_t)N * IC; i++) want[i] *= 2.0f;
                snprintf(what, sizeof(what), "backward input %s->%s%s N %d IC %d OC %d", in_bf16 ? "bf16" : "f32",
                         out_bf16 ? "bf16" : "f32", out_bf16 ? "" : " (beta 1)", N, IC, OC);
                passed += compare(what, got, want, (size_t)N * IC, OC, ot);
                free(got);
                free(want);
                // dw: the weight gradient in FP32 (the model's accumulation), once and then accumulated (beta 1).
                float *d_dw = dev_alloc((size_t)OC * IC * sizeof(float));
                cuda_lt_linear_backward_weight(&lt, d_dw, MLM_DTYPE_F32, d_dout, d_inp, it, N, IC, OC, 0.0f, st);
                cuda_lt_linear_backward_weight(&lt, d_dw, MLM_DTYPE_F32, d_dout, d_inp, it, N, IC, OC, 1.0f, st);
                got = from_device(d_dw, (size_t)OC * IC, MLM_DTYPE_F32);
                for (size_t i = 0; i < (size_t)OC * IC; i++) dw_unused[i] *= 2.0f;  // linear_backward's dw, twice
                snprintf(what, sizeof(what), "backward weight %s->f32 (beta 1) N %d IC %d OC %d",
                         in_bf16 ? "bf16" : "f32", N, IC, OC);
                passed += compare(what, got, dw_unused, (size_t)OC * IC, N, MLM_DTYPE_F32);
                cases += 3;
                free(got);
                free(dw_unused);
                free(inp);
                free(w);
                free(bias);
                free(dout);
                CUDA_CHECK(cudaFree(d_inp));
                CUDA_CHECK(cudaFree(d_w));
                CUDA_CHECK(cudaFree(d_dout));
                CUDA_CHECK(cudaFree(d_bias));
                CUDA_CHECK(cudaFree(d_out));
                CUDA_CHECK(cudaFree(d_dinp));
                CUDA_CHECK(cudaFree(d_dw));
            }
    cuda_lt_destroy(&lt);
    CUDA_CHECK(cudaFree(ws));
    printf("  cuBLASLt products vs linear_forward / linear_backward: %d of %d cases within tolerance (FP32 and BF16 "
           "inputs, FP32 and BF16 outputs, bias epilogue, beta 1)\n", passed, cases);
}

int main(int argc, char **argv) {
    char why[256];
    if (cuda_device_count(why, sizeof(why)) == 0) return test_skip(why);
    quick = argc > 1 && !strcmp(argv[1], "--quick");
    char desc[256];
    cuda_device_describe(desc, sizeof(desc));
    printf("test_gpu_bf16: BF16 kernels and cuBLASLt products against their CPU twins (device: %s)\n", desc);
    rng_init(&data_rng, 20261203, RNG_DOMAIN_INIT);
    CUDA_CHECK(cudaStreamCreate(&st));
    test_conversions();
    test_products();
    CUDA_CHECK(cudaStreamDestroy(st));
    rng_free(&data_rng);
    return test_finish("test_gpu_bf16");
}
