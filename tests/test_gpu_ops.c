// test_gpu_ops.c (gpu): every CUDA op kernel of src/kernels/kernels.h against its CPU twin of src/cpu/ops.h (or, where
// the CPU has no standalone twin, a double-precision evaluation of the same formula), on random inputs drawn from
// the project's Philox streams, over several shapes including odd and degenerate ones; plus cuRAND device uniforms
// equal to the host stream's bit for bit, dropout masks equal to THE DROPOUT RULE's, and run-to-run bit identity
// of every reduction.
//
// Error measure: err = max_i |gpu_i - ref_i| / max_i |ref_i| (relative to the tensor's largest magnitude, so values
// near zero do not inflate it). Tolerances and why:
//   - uniforms, keep masks, layout shuffles, ReLU/residual/bias/dropout elementwise ops, embedding forward and
//     backward, the Adam/AdamW update with clipping: BIT-EXACT. The kernels evaluate the CPU's expression with the
//     same roundings (__fmul_rn/__fadd_rn: no fused multiply-add) in the same order; the embedding backward even
//     adds rows in the CPU's position order.
//   - reductions whose order differs from the CPU's serial loop (sums of K terms in float): TOL_SUM(K) =
//     1e-6 + 4e-7 sqrt(K). The CPU's serial sum carries a typical relative error of ~0.3 eps sqrt(K) (eps = 6e-8)
//     and the GPU tree much less, so this is 10-20x the expected difference while a real bug (a missing term, a
//     wrong index or scale) is >= 1/K relative (5e-4 at K = 2053) and usually O(1). Applied to: column sums and
//     LayerNorm dw/db (K = N rows), LayerNorm mean, rstd and dinp (K = C), the attention's bias partials (K = N),
//     cross-entropy gradients (K = V).
//   - LayerNorm output: 2 TOL_SUM(C). The inputs are centred at 2 with spread 1 (so that the centring matters),
//     so a 1-ulp difference in the mean (2.4e-7 at 2) is magnified by |mean| / std ~ 3.5 in x - mean (measured
//     in a CPU emulation of the kernels: 6e-7 at C = 8, 9.6e-7 at C = 130).
//   - the tiled attention against the materialised attention in double: 1e-5 (argued at test_attention_tiled).
//   - cross-entropy losses and the batch mean loss: 1e-6 (log-sum-exp in double on both sides, only the final
//     float rounding differs); correct flags, counts and n_targets exact.
//   - gradient norm: 1e-6 (double sums on both sides; equal up to the float rounding of the result).
// Every reduction kernel is run twice on the same input and must give bit-identical results.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curand.h>

#include "cpu/ops.h"
#include "kernels/cuda_check.h"
#include "kernels/kernels.h"
#include "mlm/bf16.h"
#include "mlm/common.h"
#include "mlm/cpu.h"
#include "mlm/cuda_backend.h"
#include "mlm/curand_check.h"
#include "mlm/optim.h"
#include "mlm/rng.h"
#include "attention_ref.h"
#include "test_util.h"

// --quick (the emu registration, tests/emu): the largest shapes shrink so that the CPU emulation stays fast;
// every kernel path (grid-stride loops, multi-block reductions, unaligned offsets) is still exercised.
static int quick = 0;

static double tol_sum(int K) { return 1e-6 + 4e-7 * sqrt((double)K); }

// ---- Random inputs from the project's Philox streams ------------------------------------------------------

static Rng data_rng;           // test inputs, drawn contiguously (data_pos) so the host generator never seeks
static uint64_t data_pos = 0;
static Rng drop_rng;           // dropout uniforms (host side of the host/device comparison)
static uint64_t drop_pos = 17;  // deliberately not a multiple of 4
static curandGenerator_t dgen;  // device Philox generator seeded with drop_rng.seed
static cudaStream_t st;

static void fill_uniform(float *x, size_t n, float lo, float hi) {
    if (n == 0) return;
    rng_uniform(&data_rng, data_pos, x, n);
    data_pos += n;
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * x[i];
}

static float *host_rand(size_t n, float lo, float hi) {
    float *x = mlm_malloc((n ? n : 1) * sizeof(float), "test tensor");
    fill_uniform(x, n, lo, hi);
    return x;
}

static float *host_copy(const float *x, size_t n) {
    float *y = mlm_malloc((n ? n : 1) * sizeof(float), "test tensor");
    memcpy(y, x, n * sizeof(float));
    return y;
}

static float *host_zeros(size_t n) { return mlm_calloc(n ? n : 1, sizeof(float), "test tensor"); }

// Integers uniform in [lo, hi).
static void fill_ints(int *x, size_t n, int lo, int hi) {
    if (n == 0) return;
    uint32_t *u = mlm_malloc(n * sizeof(uint32_t), "test ints");
    rng_u32(&data_rng, data_pos, u, n);
    data_pos += n;
    for (size_t i = 0; i < n; i++) x[i] = lo + (int)(u[i] % (uint32_t)(hi - lo));
    free(u);
}

// ---- Device helpers -----------------------------------------------------------------------------------

static void *dmalloc(size_t bytes) {
    void *p = NULL;
    CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 16));
    return p;
}

static void *dup_bytes(const void *h, size_t bytes) {
    void *d = dmalloc(bytes);
    if (bytes) CUDA_CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
    return d;
}

static float *dup_f(const float *h, size_t n) { return dup_bytes(h, n * sizeof(float)); }

static void upload(void *d, const void *h, size_t bytes) {
    CUDA_CHECK(cudaStreamSynchronize(st));
    if (bytes) CUDA_CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice));
}

static void download(void *h, const void *d, size_t bytes) {
    CUDA_CHECK(cudaStreamSynchronize(st));  // kernels run on st; surfaces execution errors here
    if (bytes) CUDA_CHECK(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost));
}

static float *fetch_f(const float *d, size_t n) {
    float *h = host_zeros(n);
    download(h, d, n * sizeof(float));
    return h;
}

static void dfree(void *d) { CUDA_CHECK(cudaFree(d)); }

// ---- Comparisons --------------------------------------------------------------------------------------

// Bit-exact: value equality (+0 == -0: the CPU writes -0.0 for a dropped negative value, the GPU may write +0).
static void expect_equal(const char *what, const float *gpu, const float *ref, size_t n) {
    size_t bad = 0, first = 0;
    double worst = 0.0;
    for (size_t i = 0; i < n; i++)
        if (!(gpu[i] == ref[i])) {
            if (bad++ == 0) first = i;
            double e = fabs((double)gpu[i] - (double)ref[i]);
            worst = isnan(e) ? INFINITY : fmax(worst, e);
        }
    printf("  %-58s max abs err %.3g (bit-exact)\n", what, worst);
    CHECK(bad == 0, "%s: %zu of %zu values differ; first at %zu: gpu %.9g, ref %.9g", what, bad, n, first,
          bad ? gpu[first] : 0.0f, bad ? ref[first] : 0.0f);
}

static void expect_close(const char *what, const float *gpu, const float *ref, size_t n, double tol) {
    double mag = 0.0, worst = 0.0;
    size_t at = 0;
    int nan = 0;
    for (size_t i = 0; i < n; i++) {
        mag = fmax(mag, fabs((double)ref[i]));
        double e = fabs((double)gpu[i] - (double)ref[i]);
        if (isnan(e)) nan = 1;
        if (e > worst) {
            worst = e;
            at = i;
        }
    }
    double rel = worst / (mag > 0.0 ? mag : 1.0);
    printf("  %-58s max err %.3g (tol %.3g)\n", what, rel, tol);
    CHECK(!nan && rel <= tol, "%s: max err %.3g > tol %.3g at %zu (gpu %.9g, ref %.9g, max |ref| %.3g)%s", what, rel,
          tol, at, n ? gpu[at] : 0.0f, n ? ref[at] : 0.0f, mag, nan ? " (NaN)" : "");
}

static void expect_identical(const char *what, const void *a, const void *b, size_t bytes) {
    CHECK(memcmp(a, b, bytes) == 0, "%s: two runs on the same input differ (not deterministic)", what);
}

// ---- cuRAND uniforms and the dropout rule -------------------------------------------------------------------

static void test_uniforms(void) {
    printf("cuda_uniform vs rng_uniform (seed %llu):\n", (unsigned long long)drop_rng.seed);
    // Unaligned offsets, one across a 65,536-thread row of cuRAND's Philox layout, one above 2^32.
    const uint64_t offsets[] = {0, 1, 3, 4, 5, 4ull * 65536 - 7, 12345, (1ull << 32) + 3};
    const size_t sizes[] = {1, 7, 1000, 262147};
    size_t total = 0;
    for (size_t a = 0; a < sizeof(offsets) / sizeof(offsets[0]); a++)
        for (size_t b = 0; b < sizeof(sizes) / sizeof(sizes[0]); b++) {
            size_t n = sizes[b];
            float *want = host_zeros(n), *got = host_zeros(n);
            rng_uniform(&drop_rng, offsets[a], want, n);
            float *d = dmalloc(n * sizeof(float));
            cuda_uniform(dgen, offsets[a], d, n, st);
            download(got, d, n * sizeof(float));
            size_t bad = 0;
            for (size_t i = 0; i < n; i++) bad += memcmp(&got[i], &want[i], sizeof(float)) != 0;
            CHECK(bad == 0, "offset %llu, n %zu: %zu of the device uniforms differ from the host's",
                  (unsigned long long)offsets[a], n, bad);
            total += n;
            dfree(d);
            free(want);
            free(got);
        }
    printf("  %zu uniforms at %zu offsets compared bit for bit\n", total, sizeof(offsets) / sizeof(offsets[0]));
}

// The same stream computed inside a kernel (mask.cu's Philox, no cuRAND) against the CPU reproduction, at
// offsets on both sides of thread-row boundaries (4 x 65,536 outputs), in the middle of a Philox block, and
// where the iteration counter needs its high word (offset >= 2^50).
static void test_kernel_philox(void) {
    printf("cuda_philox_uniform vs philox_uniform:\n");
    const uint64_t row = 4ull * 65536;
    const uint64_t offsets[] = {0, 1, 2, 3, 5, row - 1, row - 4, row - 33, row, row + 1, 3 * row - 2, 12345,
                                (1ull << 32) + 3, (1ull << 50) - 5, (1ull << 52) + row - 7};
    const size_t sizes[] = {1, 2, 5, 64, 1001, 2 * 65536 * 4 + 9};
    size_t total = 0;
    for (size_t a = 0; a < sizeof(offsets) / sizeof(offsets[0]); a++)
        for (size_t b = 0; b < sizeof(sizes) / sizeof(sizes[0]); b++) {
            size_t n = sizes[b];
            if (quick && n > 100000 && a % 4 != 0) continue;
            float *want = host_zeros(n), *got = host_zeros(n);
            philox_uniform(drop_rng.seed, offsets[a], want, n);
            float *d = dmalloc(n * sizeof(float));
            cuda_philox_uniform(d, drop_rng.seed, offsets[a], n, st);
            download(got, d, n * sizeof(float));
            size_t bad = 0;
            for (size_t i = 0; i < n; i++) bad += memcmp(&got[i], &want[i], sizeof(float)) != 0;
            CHECK(bad == 0, "offset %llu, n %zu: %zu of the kernel's uniforms differ from the CPU's",
                  (unsigned long long)offsets[a], n, bad);
            total += n;
            dfree(d);
            free(want);
            free(got);
        }
    printf("  %zu uniforms at %zu offsets compared bit for bit\n", total, sizeof(offsets) / sizeof(offsets[0]));
}

// Device keep masks by THE DROPOUT RULE (cuda_uniform + cuda_dropout_keep, and the Philox keep kernel) against
// dropout_keep_mask on the CPU, word for word in the packed layout of keep_bits.h (the padding bits past n
// included; the word after the mask must stay untouched), at the offsets of RngLayout for real sites (the actual
// batch a prefix of the configured one), lengths that are and are not multiples of 32, and micro-batches whose
// rows start inside the whole batch's region (DeviceStep.rng_row0, DropoutCtx.first_row).
static void test_dropout_rule(void) {
    printf("dropout keep masks (packed) vs dropout_keep_mask, word for word:\n");
    int B = 4, T = 33, C = 128, H = 8, F = 256, L = 2;
    RngLayout lay = rng_layout(B, T, C, H, F, L);
    struct {
        int layer;
        DropSite site;
        size_t n;
        int first_row, rows;  // a micro-batch of `rows` rows from first_row (rows 0: the whole batch)
    } cases[] = {{0, DROP_ATTN_PROBS, (size_t)B * H * T * T, 0, 0}, {1, DROP_FFN_HIDDEN, (size_t)3 * T * F, 0, 0},
                 {1, DROP_ATTN_RESID, (size_t)B * T * C, 0, 0},     {0, DROP_FFN_RESID, 7, 0, 0},
                 {1, DROP_FFN_HIDDEN, 1001, 0, 0},                  {0, DROP_ATTN_RESID, 33, 0, 0},
                 {1, DROP_ATTN_RESID, (size_t)T * C - 5, 1, 1},     {0, DROP_FFN_HIDDEN, (size_t)2 * T * F - 31, 2, 2},
                 {1, DROP_ATTN_PROBS, (size_t)H * T * T, 3, 1},     {0, DROP_FFN_RESID, (size_t)2 * T * C, 1, 2}};
    const float ps[] = {0.1f, 0.5f};
    const KeepWord canary = 0xA5A5A5A5u;
    for (size_t pi = 0; pi < 2; pi++)
        for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
            size_t n = cases[k].n, words = keep_words(n), bytes = words * sizeof(KeepWord);
            int rows = cases[k].rows;
            // A micro-batch's rows start first_row * row_len outputs into the site's region (row_len: the site's
            // outputs per row); the shortened cases (n not rows * row_len) draw from the same offset.
            size_t row_len = !rows                             ? 0
                             : cases[k].site == DROP_ATTN_PROBS ? (size_t)H * T * T
                             : cases[k].site == DROP_FFN_HIDDEN ? (size_t)T * F
                                                                : (size_t)T * C;
            DropoutCtx drop = {.rng = &drop_rng, .layout = lay, .step = 5, .p = ps[pi]};
            uint64_t offset = rng_dropout_offset(&lay, 5, cases[k].layer, cases[k].site) + cases[k].first_row * row_len;
            KeepWord *want = mlm_malloc(bytes, "keep"), *got = mlm_malloc(bytes + sizeof(KeepWord), "keep");
            if (rows) {
                // The CPU backend's micro-batch mask (first_row, rows) for whole rows; for the shortened ones, the
                // rule on the uniforms at that offset, packed here.
                drop.first_row = cases[k].first_row, drop.rows = rows;
                if (n % rows == 0 && n / rows == row_len) {
                    dropout_keep_mask(want, &drop, cases[k].layer, cases[k].site, n);
                } else {
                    float *u = host_zeros(n);
                    rng_uniform(&drop_rng, offset, u, n);
                    memset(want, 0, bytes);
                    for (size_t i = 0; i < n; i++) want[i / 32] |= (KeepWord)!(u[i] < ps[pi]) << (i % 32);
                    free(u);
                }
            } else {
                dropout_keep_mask(want, &drop, cases[k].layer, cases[k].site, n);
            }
            float *du = dmalloc(n * sizeof(float));
            KeepWord *dk = dmalloc(bytes + sizeof(KeepWord));
            size_t bad = 0, kept = 0;
            if (!rows) {
                // cuRAND's uniforms, then the rule kernel.
                upload(dk + words, &canary, sizeof(canary));
                cuda_uniform(dgen, offset, du, n, st);
                cuda_dropout_keep(dk, du, ps[pi], n, st);
                download(got, dk, bytes + sizeof(KeepWord));
                for (size_t w = 0; w < words; w++) bad += got[w] != want[w];
                bad += got[words] != canary;
                for (size_t i = 0; i < n; i++) kept += keep_bit(got, i);
                printf("  p %.1f layer %d site %d n %-8zu kept %.4f, %zu words differ\n", ps[pi], cases[k].layer,
                       (int)cases[k].site, n, (double)kept / (double)n, bad);
                CHECK(bad == 0, "p %g layer %d site %d: %zu of %zu words of keep bits (or the word after them) "
                      "differ from the CPU rule", ps[pi], cases[k].layer, (int)cases[k].site, bad, words);
            }
            // The same words from the Philox inside the keep kernel, the step's seed, base offset and micro-batch rows
            // read from device memory as a captured step reads them.
            DeviceStep hs;
            memset(&hs, 0, sizeof(hs));
            hs.philox_seed = drop_rng.seed;
            hs.rng_base = rng_mask_offset(&lay, 5);
            hs.rng_row0 = (uint64_t)cases[k].first_row;
            DeviceStep *ds = dmalloc(sizeof(DeviceStep));
            upload(ds, &hs, sizeof(hs));
            upload(dk + words, &canary, sizeof(canary));
            memset(got, 0xee, bytes);
            cuda_dropout_keep_philox_rows(dk, ds, rng_dropout_offset(&lay, 0, cases[k].layer, cases[k].site), row_len,
                                          ps[pi], n, st);
            download(got, dk, bytes + sizeof(KeepWord));
            bad = 0;
            for (size_t w = 0; w < words; w++) bad += got[w] != want[w];
            bad += got[words] != canary;
            if (rows)
                printf("  p %.1f layer %d site %d n %-8zu rows %d from %d: %zu words differ\n", ps[pi], cases[k].layer,
                       (int)cases[k].site, n, rows, cases[k].first_row, bad);
            CHECK(bad == 0, "p %g layer %d site %d n %zu rows %d from %d: %zu of %zu words of the Philox keep kernel "
                  "(or the word after them) differ from the CPU's", ps[pi], cases[k].layer, (int)cases[k].site, n,
                  rows, cases[k].first_row, bad, words);
            dfree(ds);
            dfree(du);
            dfree(dk);
            free(want);
            free(got);
        }
}

// keep bits on the host (rng_uniform + the rule, packed) and on the device (cuda_uniform + cuda_dropout_keep) from
// the same fresh offset of the dropout stream; checks that they are equal word for word. Returns the host mask,
// *d_keep the device one.
static KeepWord *make_keep(size_t n, float p, KeepWord **d_keep) {
    uint64_t offset = drop_pos;
    drop_pos += n + 3;  // the next mask starts at another residue mod 4
    float *u = host_zeros(n);
    rng_uniform(&drop_rng, offset, u, n);
    size_t bytes = keep_words(n) * sizeof(KeepWord);
    KeepWord *keep = mlm_calloc(bytes ? bytes : 1, 1, "keep");
    for (size_t i = 0; i < n; i++) keep[i / 32] |= (KeepWord)!(u[i] < p) << (i % 32);
    float *du = dmalloc(n * sizeof(float));
    *d_keep = dmalloc(bytes);
    cuda_uniform(dgen, offset, du, n, st);
    cuda_dropout_keep(*d_keep, du, p, n, st);
    KeepWord *check = mlm_malloc(bytes ? bytes : 1, "keep");
    download(check, *d_keep, bytes);
    CHECK(n == 0 || memcmp(check, keep, bytes) == 0, "keep mask of %zu at offset %llu differs between host and device",
          n, (unsigned long long)offset);
    dfree(du);
    free(u);
    free(check);
    return keep;
}

// ---- Feed-forward elementwise ops and column sums --------------------------------------------------------------

static void test_feedforward(void) {
    printf("ReLU/residual/bias/dropout elementwise ops (bit-exact):\n");
    const int shapes[][2] = {{1, 8}, {7, 256}, {2053, 130}};  // rows, features
    const float p = 0.1f, scale = dropout_scale(p);
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int R = shapes[s][0], F = shapes[s][1];
        size_t n = (size_t)R * F;
        KeepWord *d_keep_all;
        KeepWord *keep_all = make_keep(n, p, &d_keep_all);
        float *bias = host_rand(F, -0.5f, 0.5f), *d_bias = dup_f(bias, F);
        for (int variant = 0; variant < 4; variant++) {
            int with_bias = variant & 1, with_keep = (variant >> 1) & 1;
            const KeepWord *keep = with_keep ? keep_all : NULL;
            const KeepWord *d_keep = with_keep ? d_keep_all : NULL;
            float sc = with_keep ? scale : 1.0f;
            char what[160];
            // bias + ReLU + dropout forward.
            float *h0 = host_rand(n, -1.0f, 1.0f), *h = host_copy(h0, n);
            if (with_bias)
                for (size_t i = 0; i < n; i++) h[i] = h[i] + bias[i % F];
            relu_dropout_forward(h, keep, sc, n);
            float *d_h = dup_f(h0, n);
            cuda_bias_relu_dropout_forward(d_h, with_bias ? d_bias : NULL, d_keep, sc, n, F, st);
            float *g = fetch_f(d_h, n);
            snprintf(what, sizeof(what), "bias_relu_dropout_forward [%d,%d] bias %d keep %d", R, F, with_bias,
                     with_keep);
            expect_equal(what, g, h, n);
            free(g);
            // ReLU + dropout backward (h from the CPU forward, identical to the GPU's).
            float *dh0 = host_rand(n, -1.0f, 1.0f), *dh = host_copy(dh0, n);
            relu_dropout_backward(dh, h, sc, n);
            float *d_dh = dup_f(dh0, n);
            cuda_relu_dropout_backward(d_dh, d_h, sc, n, st);
            g = fetch_f(d_dh, n);
            snprintf(what, sizeof(what), "relu_dropout_backward [%d,%d] keep %d", R, F, with_keep);
            expect_equal(what, g, dh, n);
            free(g);
            // Residual + dropout forward, into a separate output and in place (out == res).
            float *res = host_rand(n, -2.0f, 2.0f), *y0 = host_rand(n, -1.0f, 1.0f), *y = host_copy(y0, n);
            if (with_bias)
                for (size_t i = 0; i < n; i++) y[i] = y[i] + bias[i % F];
            float *out = host_zeros(n);
            residual_dropout_forward(out, res, y, keep, sc, n);
            float *d_res = dup_f(res, n), *d_y = dup_f(y0, n), *d_out = dmalloc(n * sizeof(float));
            cuda_residual_dropout_forward(d_out, d_res, d_y, with_bias ? d_bias : NULL, d_keep, sc, n, F, st);
            g = fetch_f(d_out, n);
            snprintf(what, sizeof(what), "residual_dropout_forward [%d,%d] bias %d keep %d", R, F, with_bias,
                     with_keep);
            expect_equal(what, g, out, n);
            free(g);
            cuda_residual_dropout_forward(d_res, d_res, d_y, with_bias ? d_bias : NULL, d_keep, sc, n, F, st);
            g = fetch_f(d_res, n);
            snprintf(what, sizeof(what), "residual_dropout_forward in place [%d,%d] bias %d keep %d", R, F, with_bias,
                     with_keep);
            expect_equal(what, g, out, n);
            free(g);
            // Residual + dropout backward; without a mask the CPU copies dout, the GPU multiplies by scale (1 here).
            float *dout = host_rand(n, -1.0f, 1.0f), *dy = host_zeros(n);
            residual_dropout_backward(dy, dout, keep, sc, n);
            float *d_dout = dup_f(dout, n), *d_dy = dmalloc(n * sizeof(float));
            cuda_residual_dropout_backward(d_dy, d_dout, d_keep, sc, n, st);
            g = fetch_f(d_dy, n);
            snprintf(what, sizeof(what), "residual_dropout_backward [%d,%d] keep %d", R, F, with_keep);
            expect_equal(what, g, dy, n);
            free(g);
            if (!with_keep) {  // keep NULL with a scale: dy = dout * scale
                for (size_t i = 0; i < n; i++) dy[i] = dout[i] * scale;
                cuda_residual_dropout_backward(d_dy, d_dout, NULL, scale, n, st);
                g = fetch_f(d_dy, n);
                snprintf(what, sizeof(what), "residual_dropout_backward [%d,%d] no keep, scale %.4f", R, F, scale);
                expect_equal(what, g, dy, n);
                free(g);
            }
            free(h0), free(h), free(dh0), free(dh), free(res), free(y0), free(y), free(out), free(dout), free(dy);
            dfree(d_h), dfree(d_dh), dfree(d_res), dfree(d_y), dfree(d_out), dfree(d_dout), dfree(d_dy);
        }
        // Bias add, separate and in place.
        float *x = host_rand(n, -1.0f, 1.0f), *want = host_zeros(n);
        for (size_t i = 0; i < n; i++) want[i] = x[i] + bias[i % F];
        float *d_x = dup_f(x, n), *d_o = dmalloc(n * sizeof(float));
        cuda_add_bias(d_o, d_x, d_bias, n, F, st);
        float *g = fetch_f(d_o, n);
        char what[160];
        snprintf(what, sizeof(what), "add_bias [%d,%d]", R, F);
        expect_equal(what, g, want, n);
        free(g);
        cuda_add_bias(d_x, d_x, d_bias, n, F, st);
        g = fetch_f(d_x, n);
        snprintf(what, sizeof(what), "add_bias in place [%d,%d]", R, F);
        expect_equal(what, g, want, n);
        free(g), free(x), free(want), free(bias), free(keep_all);
        dfree(d_x), dfree(d_o), dfree(d_bias), dfree(d_keep_all);
    }
}

static void test_column_sums(void) {
    printf("column_sums_accumulate (TOL_SUM(N), deterministic):\n");
    const int Ns[] = {1, 7, 64, 65, 2053}, Cs[] = {8, 67, 130};
    for (size_t a = 0; a < sizeof(Ns) / sizeof(Ns[0]); a++)
        for (size_t b = 0; b < sizeof(Cs) / sizeof(Cs[0]); b++) {
            int N = Ns[a], C = Cs[b];
            size_t n = (size_t)N * C;
            float *x = host_rand(n, -1.0f, 1.0f), *sums0 = host_rand(C, -1.0f, 1.0f), *want = host_copy(sums0, C);
            column_sums_accumulate(want, x, N, C);
            float *d_x = dup_f(x, n), *d_s = dup_f(sums0, C);
            float *d_scratch = dmalloc(cuda_column_sums_scratch(N, C) * sizeof(float));
            cuda_column_sums_accumulate(d_s, d_x, N, C, d_scratch, st);
            float *g1 = fetch_f(d_s, C);
            upload(d_s, sums0, C * sizeof(float));
            cuda_column_sums_accumulate(d_s, d_x, N, C, d_scratch, st);
            float *g2 = fetch_f(d_s, C);
            char what[160];
            snprintf(what, sizeof(what), "column_sums_accumulate N %d C %d", N, C);
            expect_close(what, g1, want, C, tol_sum(N));
            expect_identical(what, g1, g2, C * sizeof(float));
            free(x), free(sums0), free(want), free(g1), free(g2);
            dfree(d_x), dfree(d_s), dfree(d_scratch);
        }
}

// The ReLU/dropout and residual-dropout backward ops fused with the column sums of their result: the elementwise
// result bit-exact against the twins (relu_dropout_backward_sums, residual_dropout_backward_sums), the sums against
// the twins (TOL_SUM(N)) and bit for bit against cuda_column_sums_accumulate of the same result (same partition
// and order); run-to-run bit identity.
static void test_backward_sums(void) {
    printf("relu/residual dropout backward + bias column sums (fused) vs the twins:\n");
    const int shapes[][2] = {{1, 8}, {7, 256}, {65, 67}, {2053, 130}};
    const float p = 0.1f, scale = dropout_scale(p);
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (int with_keep = 0; with_keep < 2; with_keep++) {
            int N = shapes[s][0], C = shapes[s][1];
            size_t n = (size_t)N * C;
            char tag[96], what[200];
            snprintf(tag, sizeof(tag), "N %d C %d keep %d", N, C, with_keep);
            KeepWord *d_keep = NULL, *keep = with_keep ? make_keep(n, p, &d_keep) : NULL;
            float sc = with_keep ? scale : 1.0f;
            float *scratch = dmalloc(cuda_column_sums_scratch(N, C) * sizeof(float));
            for (int relu = 0; relu < 2; relu++) {
                const char *name = relu ? "relu_dropout_backward_sums" : "residual_dropout_backward_sums";
                float *h = host_rand(n, -1.0f, 1.0f);
                relu_dropout_forward(h, keep, sc, n);  // the forward's output: positive exactly where kept
                float *din = host_rand(n, -1.0f, 1.0f), *sums0 = host_rand(C, -1.0f, 1.0f);
                float *want = host_copy(din, n), *want_s = host_copy(sums0, C);
                if (relu) relu_dropout_backward_sums(want, h, sc, N, C, want_s);
                else residual_dropout_backward_sums(want, din, keep, sc, N, C, want_s);
                float *d_h = dup_f(h, n), *d_in = dup_f(din, n), *d_out = dmalloc(n * sizeof(float));
                float *d_s = dmalloc(C * sizeof(float));
                float *g[2], *gs[2];
                for (int run = 0; run < 2; run++) {
                    upload(d_s, sums0, C * sizeof(float));
                    if (relu) {
                        upload(d_out, din, n * sizeof(float));  // in place
                        cuda_relu_dropout_backward_sums(d_out, d_h, sc, N, C, d_s, scratch, st);
                    } else {
                        cuda_residual_dropout_backward_sums(d_out, d_in, d_keep, sc, N, C, d_s, scratch, st);
                    }
                    g[run] = fetch_f(d_out, n);
                    gs[run] = fetch_f(d_s, C);
                }
                snprintf(what, sizeof(what), "%s result %s", name, tag);
                expect_equal(what, g[0], want, n);
                expect_identical(what, g[0], g[1], n * sizeof(float));
                snprintf(what, sizeof(what), "%s sums vs twin %s", name, tag);
                expect_close(what, gs[0], want_s, C, tol_sum(N));
                expect_identical(what, gs[0], gs[1], C * sizeof(float));
                upload(d_s, sums0, C * sizeof(float));
                cuda_column_sums_accumulate(d_s, d_out, N, C, scratch, st);
                float *u = fetch_f(d_s, C);
                snprintf(what, sizeof(what), "%s sums vs column_sums_accumulate %s", name, tag);
                expect_equal(what, gs[0], u, C);
                free(u), free(h), free(din), free(sums0), free(want), free(want_s);
                for (int run = 0; run < 2; run++) free(g[run]), free(gs[run]);
                dfree(d_h), dfree(d_in), dfree(d_out), dfree(d_s);
            }
            free(keep);
            dfree(scratch);
            if (d_keep) dfree(d_keep);
        }
}

// ---- Embedding ------------------------------------------------------------------------------------------

static void test_embedding(void) {
    printf("embedding forward and backward (bit-exact, deterministic):\n");
    const int shapes[][4] = {{1, 1, 8, 67}, {3, 33, 130, 67}, {64, 32, 128, 67}, {2, 1027, 128, 1000}, {1, 2053, 8, 3}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int B = shapes[s][0], T = shapes[s][1], C = shapes[s][2], V = shapes[s][3], N = B * T;
        size_t NC = (size_t)N * C, VC = (size_t)V * C;
        int *tok = mlm_malloc(N * sizeof(int), "tokens");
        fill_ints(tok, N, 0, V);
        float *emb = host_rand(VC, -1.0f, 1.0f), *pe = host_rand((size_t)T * C, -1.0f, 1.0f);
        float *out = host_zeros(NC);
        embedding_forward(out, tok, emb, pe, B, T, C, V);
        int *d_tok = dup_bytes(tok, N * sizeof(int));
        float *d_emb = dup_f(emb, VC), *d_pe = dup_f(pe, (size_t)T * C), *d_out = dmalloc(NC * sizeof(float));
        cuda_embedding_forward(d_out, d_tok, d_emb, d_pe, B, T, C, st);
        float *g = fetch_f(d_out, NC);
        char what[160];
        snprintf(what, sizeof(what), "embedding_forward B %d T %d C %d V %d", B, T, C, V);
        expect_equal(what, g, out, NC);
        free(g);
        float *dout = host_rand(NC, -1.0f, 1.0f), *demb0 = host_rand(VC, -1.0f, 1.0f), *demb = host_copy(demb0, VC);
        embedding_backward(demb, dout, tok, B, T, C);
        float *d_dout = dup_f(dout, NC), *d_demb = dup_f(demb0, VC);
        cuda_embedding_backward(d_demb, d_dout, d_tok, B, T, C, V, st);
        float *g1 = fetch_f(d_demb, VC);
        upload(d_demb, demb0, VC * sizeof(float));
        cuda_embedding_backward(d_demb, d_dout, d_tok, B, T, C, V, st);
        float *g2 = fetch_f(d_demb, VC);
        snprintf(what, sizeof(what), "embedding_backward B %d T %d C %d V %d", B, T, C, V);
        expect_equal(what, g1, demb, VC);
        expect_identical(what, g1, g2, VC * sizeof(float));
        free(tok), free(emb), free(pe), free(out), free(dout), free(demb0), free(demb), free(g1), free(g2);
        dfree(d_tok), dfree(d_emb), dfree(d_pe), dfree(d_out), dfree(d_dout), dfree(d_demb);
    }
}

// The embedding fused with the first LayerNorm: the embedding bit-exact against embedding_forward, every output
// bit-exact against cuda_embedding_forward + cuda_layernorm_forward, the LayerNorm against the twin
// embedding_layernorm_forward with test_layernorm's tolerances. C 2000: 6 rows per block; C 12300: the fallback.
static void test_embedding_layernorm(void) {
    printf("embedding + layernorm forward (fused) vs embedding_layernorm_forward and the unfused kernels:\n");
    const int shapes[][4] = {{1, 1, 8, 67}, {3, 33, 130, 67}, {64, 32, 128, 67}, {2, 5, 2000, 11}, {1, 2, 12300, 3}};
    const float eps = 1e-5f;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int B = shapes[s][0], T = shapes[s][1], C = shapes[s][2], V = shapes[s][3], N = B * T;
        size_t NC = (size_t)N * C, VC = (size_t)V * C;
        char tag[96], what[200];
        snprintf(tag, sizeof(tag), "B %d T %d C %d V %d", B, T, C, V);
        int *tok = mlm_malloc(N * sizeof(int), "tokens");
        fill_ints(tok, N, 0, V);
        float *emb = host_rand(VC, -1.0f, 1.0f), *pe = host_rand((size_t)T * C, -1.0f, 1.0f);
        float *w = host_rand(C, 0.5f, 1.5f), *bb = host_rand(C, -0.5f, 0.5f);
        float *out = host_zeros(NC), *ln = host_zeros(NC), *mean = host_zeros(N), *rstd = host_zeros(N);
        embedding_layernorm_forward(out, ln, mean, rstd, tok, emb, pe, w, bb, B, T, C, V, eps);
        int *d_tok = dup_bytes(tok, N * sizeof(int));
        float *d_emb = dup_f(emb, VC), *d_pe = dup_f(pe, (size_t)T * C), *d_w = dup_f(w, C), *d_b = dup_f(bb, C);
        float *d_out = dmalloc(NC * sizeof(float)), *d_ln = dmalloc(NC * sizeof(float));
        float *d_mean = dmalloc(N * sizeof(float)), *d_rstd = dmalloc(N * sizeof(float));
        cuda_embedding_forward(d_out, d_tok, d_emb, d_pe, B, T, C, st);
        cuda_layernorm_forward(d_ln, d_mean, d_rstd, d_out, d_w, d_b, N, C, eps, st);
        float *u_out = fetch_f(d_out, NC), *u_ln = fetch_f(d_ln, NC), *u_mean = fetch_f(d_mean, N);
        float *u_rstd = fetch_f(d_rstd, N);
        CUDA_CHECK(cudaMemset(d_out, 0, NC * sizeof(float)));
        CUDA_CHECK(cudaMemset(d_ln, 0, NC * sizeof(float)));
        cuda_embedding_layernorm_forward(d_out, d_ln, d_mean, d_rstd, d_tok, d_emb, d_pe, d_w, d_b, B, T, C, eps, st);
        float *g_out = fetch_f(d_out, NC), *g_ln = fetch_f(d_ln, NC), *g_mean = fetch_f(d_mean, N);
        float *g_rstd = fetch_f(d_rstd, N);
        snprintf(what, sizeof(what), "embedding_layernorm embedding vs twin %s", tag);
        expect_equal(what, g_out, out, NC);
        snprintf(what, sizeof(what), "embedding_layernorm vs unfused kernels %s", tag);
        expect_equal(what, g_out, u_out, NC);
        expect_equal(what, g_ln, u_ln, NC);
        expect_equal(what, g_mean, u_mean, N);
        expect_equal(what, g_rstd, u_rstd, N);
        snprintf(what, sizeof(what), "embedding_layernorm out vs twin %s", tag);
        expect_close(what, g_ln, ln, NC, 2 * tol_sum(C));
        snprintf(what, sizeof(what), "embedding_layernorm mean, rstd vs twin %s", tag);
        expect_close(what, g_mean, mean, N, tol_sum(C));
        expect_close(what, g_rstd, rstd, N, tol_sum(C));
        free(tok), free(emb), free(pe), free(w), free(bb), free(out), free(ln), free(mean), free(rstd);
        free(u_out), free(u_ln), free(u_mean), free(u_rstd), free(g_out), free(g_ln), free(g_mean), free(g_rstd);
        dfree(d_tok), dfree(d_emb), dfree(d_pe), dfree(d_w), dfree(d_b), dfree(d_out), dfree(d_ln), dfree(d_mean);
        dfree(d_rstd);
    }
}

// ---- LayerNorm ------------------------------------------------------------------------------------------

static void test_layernorm(void) {
    printf("layernorm forward and backward (TOL_SUM, deterministic):\n");
    const int Ns[] = {1, 7, 2053}, Cs[] = {8, 128, 130};
    const float eps = 1e-5f;
    for (size_t a = 0; a < sizeof(Ns) / sizeof(Ns[0]); a++)
        for (size_t b = 0; b < sizeof(Cs) / sizeof(Cs[0]); b++) {
            int N = Ns[a], C = Cs[b];
            size_t n = (size_t)N * C;
            char what[160];
            // Inputs off-centre (mean ~2) so that the centring matters.
            float *x = host_rand(n, 1.0f, 3.0f), *w = host_rand(C, 0.5f, 1.5f), *bb = host_rand(C, -0.5f, 0.5f);
            float *out = host_zeros(n), *mean = host_zeros(N), *rstd = host_zeros(N);
            layernorm_forward(out, mean, rstd, x, w, bb, N, C, eps);
            float *d_x = dup_f(x, n), *d_w = dup_f(w, C), *d_b = dup_f(bb, C);
            float *d_out = dmalloc(n * sizeof(float)), *d_mean = dmalloc(N * sizeof(float));
            float *d_rstd = dmalloc(N * sizeof(float));
            cuda_layernorm_forward(d_out, d_mean, d_rstd, d_x, d_w, d_b, N, C, eps, st);
            float *g_out = fetch_f(d_out, n), *g_mean = fetch_f(d_mean, N), *g_rstd = fetch_f(d_rstd, N);
            snprintf(what, sizeof(what), "layernorm_forward out N %d C %d", N, C);
            expect_close(what, g_out, out, n, 2 * tol_sum(C));
            snprintf(what, sizeof(what), "layernorm_forward mean N %d C %d", N, C);
            expect_close(what, g_mean, mean, N, tol_sum(C));
            snprintf(what, sizeof(what), "layernorm_forward rstd N %d C %d", N, C);
            expect_close(what, g_rstd, rstd, N, tol_sum(C));
            // Backward from the CPU's mean and rstd (isolates the backward), accumulating into random buffers.
            float *dout = host_rand(n, -1.0f, 1.0f), *dinp0 = host_rand(n, -1.0f, 1.0f);
            float *dw0 = host_rand(C, -1.0f, 1.0f), *db0 = host_rand(C, -1.0f, 1.0f);
            float *dinp = host_copy(dinp0, n), *dw = host_copy(dw0, C), *db = host_copy(db0, C);
            layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, N, C);
            upload(d_mean, mean, N * sizeof(float));
            upload(d_rstd, rstd, N * sizeof(float));
            float *d_dout = dup_f(dout, n), *d_dinp = dup_f(dinp0, n), *d_dw = dup_f(dw0, C), *d_db = dup_f(db0, C);
            float *d_scratch = dmalloc(cuda_layernorm_backward_scratch(N, C) * sizeof(float));
            float *g[2][3];
            for (int run = 0; run < 2; run++) {
                upload(d_dinp, dinp0, n * sizeof(float));
                upload(d_dw, dw0, C * sizeof(float));
                upload(d_db, db0, C * sizeof(float));
                cuda_layernorm_backward(d_dinp, d_dw, d_db, d_dout, d_x, d_w, d_mean, d_rstd, N, C, d_scratch, st);
                g[run][0] = fetch_f(d_dinp, n);
                g[run][1] = fetch_f(d_dw, C);
                g[run][2] = fetch_f(d_db, C);
            }
            snprintf(what, sizeof(what), "layernorm_backward dinp N %d C %d", N, C);
            expect_close(what, g[0][0], dinp, n, tol_sum(C));
            expect_identical(what, g[0][0], g[1][0], n * sizeof(float));
            snprintf(what, sizeof(what), "layernorm_backward dw N %d C %d", N, C);
            expect_close(what, g[0][1], dw, C, tol_sum(N));
            expect_identical(what, g[0][1], g[1][1], C * sizeof(float));
            snprintf(what, sizeof(what), "layernorm_backward db N %d C %d", N, C);
            expect_close(what, g[0][2], db, C, tol_sum(N));
            expect_identical(what, g[0][2], g[1][2], C * sizeof(float));
            for (int run = 0; run < 2; run++)
                for (int k = 0; k < 3; k++) free(g[run][k]);
            free(x), free(w), free(bb), free(out), free(mean), free(rstd), free(g_out), free(g_mean), free(g_rstd);
            free(dout), free(dinp0), free(dw0), free(db0), free(dinp), free(dw), free(db);
            dfree(d_x), dfree(d_w), dfree(d_b), dfree(d_out), dfree(d_mean), dfree(d_rstd);
            dfree(d_dout), dfree(d_dinp), dfree(d_dw), dfree(d_db), dfree(d_scratch);
        }
}

// Residual add + dropout fused into LayerNorm: res_out bit-exact against the CPU twin's residual, every output
// bit-exact against the two unfused kernels (the same per-lane arithmetic), and LN outputs against the twin with
// the LayerNorm tolerances above. C 2000 runs 6 rows per block (shared memory), C 12300 the unfused fallback.
static void test_residual_layernorm(void) {
    printf("residual add + dropout + layernorm forward (fused) vs residual_layernorm_forward and the unfused kernels:\n");
    const int shapes[][2] = {{1, 8}, {7, 128}, {2053, 130}, {13, 2000}, {2, 12300}};
    const float p = 0.1f, scale = dropout_scale(p), eps = 1e-5f;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++)
        for (int variant = 0; variant < 2; variant++) {  // 0: no bias, no dropout; 1: both
            int N = shapes[s][0], C = shapes[s][1];
            size_t n = (size_t)N * C;
            char tag[96], what[200];
            snprintf(tag, sizeof(tag), "N %d C %d bias+keep %d", N, C, variant);
            KeepWord *d_keep = NULL, *keep = variant ? make_keep(n, p, &d_keep) : NULL;
            float sc = variant ? scale : 1.0f;
            float *res = host_rand(n, 1.0f, 3.0f), *y0 = host_rand(n, -1.0f, 1.0f), *bias = host_rand(C, -0.5f, 0.5f);
            float *w = host_rand(C, 0.5f, 1.5f), *bb = host_rand(C, -0.5f, 0.5f), *y = host_copy(y0, n);
            if (variant)
                for (size_t i = 0; i < n; i++) y[i] = y[i] + bias[i % C];
            float *res_out = host_zeros(n), *ln = host_zeros(n), *mean = host_zeros(N), *rstd = host_zeros(N);
            residual_layernorm_forward(res_out, ln, mean, rstd, res, y, keep, sc, w, bb, N, C, eps);
            float *d_res = dup_f(res, n), *d_y = dup_f(y0, n), *d_bias = variant ? dup_f(bias, C) : NULL;
            float *d_w = dup_f(w, C), *d_b = dup_f(bb, C);
            float *d_ro = dmalloc(n * sizeof(float)), *d_ln = dmalloc(n * sizeof(float));
            float *d_mean = dmalloc(N * sizeof(float)), *d_rstd = dmalloc(N * sizeof(float));
            // The unfused pair first, as the reference for bit identity.
            cuda_residual_dropout_forward(d_ro, d_res, d_y, d_bias, d_keep, sc, n, C, st);
            cuda_layernorm_forward(d_ln, d_mean, d_rstd, d_ro, d_w, d_b, N, C, eps, st);
            float *u_ro = fetch_f(d_ro, n), *u_ln = fetch_f(d_ln, n), *u_mean = fetch_f(d_mean, N);
            float *u_rstd = fetch_f(d_rstd, N);
            CUDA_CHECK(cudaMemset(d_ro, 0, n * sizeof(float)));
            CUDA_CHECK(cudaMemset(d_ln, 0, n * sizeof(float)));
            cuda_residual_layernorm_forward(d_ro, d_ln, d_mean, d_rstd, d_res, d_y, d_bias, d_keep, sc, d_w, d_b, N, C,
                                            eps, st);
            float *g_ro = fetch_f(d_ro, n), *g_ln = fetch_f(d_ln, n), *g_mean = fetch_f(d_mean, N);
            float *g_rstd = fetch_f(d_rstd, N);
            snprintf(what, sizeof(what), "residual_layernorm res_out vs twin %s", tag);
            expect_equal(what, g_ro, res_out, n);
            snprintf(what, sizeof(what), "residual_layernorm vs unfused kernels %s", tag);
            expect_equal(what, g_ro, u_ro, n);
            expect_equal(what, g_ln, u_ln, n);
            expect_equal(what, g_mean, u_mean, N);
            expect_equal(what, g_rstd, u_rstd, N);
            snprintf(what, sizeof(what), "residual_layernorm out vs twin %s", tag);
            expect_close(what, g_ln, ln, n, 2 * tol_sum(C));
            snprintf(what, sizeof(what), "residual_layernorm mean, rstd vs twin %s", tag);
            expect_close(what, g_mean, mean, N, tol_sum(C));
            expect_close(what, g_rstd, rstd, N, tol_sum(C));
            free(keep), free(res), free(y0), free(bias), free(w), free(bb), free(y), free(res_out), free(ln);
            free(mean), free(rstd), free(u_ro), free(u_ln), free(u_mean), free(u_rstd), free(g_ro), free(g_ln);
            free(g_mean), free(g_rstd);
            dfree(d_res), dfree(d_y), dfree(d_w), dfree(d_b), dfree(d_ro), dfree(d_ln), dfree(d_mean), dfree(d_rstd);
            if (d_bias) dfree(d_bias);
            if (d_keep) dfree(d_keep);
        }
}

// LayerNorm backward fused with the residual-dropout backward of its result: dinp, dw, db against the twin
// layernorm_residual_backward (tolerances of test_layernorm); dy bit-exact against the kernel's own dinp times
// keep * scale (THE DROPOUT RULE's product, evaluated here); the bias gradient against double column sums of the
// kernel's own dy (TOL_SUM(N)) and the twin's (2 TOL_SUM(N)); run-to-run bit identity. C 600 takes the unfused
// fallback (more than 512 columns).
static void test_layernorm_residual_backward(void) {
    printf("layernorm backward + residual-dropout backward + bias sums (fused) vs layernorm_residual_backward:\n");
    const int Ns[] = {1, 7, 65, 2053}, Cs[] = {8, 128, 130, 600};
    const float p = 0.1f, scale = dropout_scale(p), eps = 1e-5f;
    for (size_t a = 0; a < sizeof(Ns) / sizeof(Ns[0]); a++)
        for (size_t b = 0; b < sizeof(Cs) / sizeof(Cs[0]); b++)
            for (int variant = 0; variant < 3; variant++) {  // 0: no dy; 1: dy, keep, bias; 2: dy, scale 1, no bias
                int N = Ns[a], C = Cs[b];
                if (quick && N == 2053 && C != 130) continue;  // the emu registration: one large shape
                size_t n = (size_t)N * C;
                char tag[96], what[200];
                snprintf(tag, sizeof(tag), "N %d C %d variant %d", N, C, variant);
                KeepWord *d_keep = NULL, *keep = variant == 1 ? make_keep(n, p, &d_keep) : NULL;
                float sc = variant == 1 ? scale : 1.0f;
                int with_dy = variant > 0, with_bias = variant == 1;
                float *x = host_rand(n, 1.0f, 3.0f), *w = host_rand(C, 0.5f, 1.5f), *bb = host_rand(C, -0.5f, 0.5f);
                float *out = host_zeros(n), *mean = host_zeros(N), *rstd = host_zeros(N);
                layernorm_forward(out, mean, rstd, x, w, bb, N, C, eps);
                float *dout = host_rand(n, -1.0f, 1.0f), *dinp0 = host_rand(n, -1.0f, 1.0f);
                float *dw0 = host_rand(C, -1.0f, 1.0f), *db0 = host_rand(C, -1.0f, 1.0f), *dbias0 = host_rand(C, -1.0f, 1.0f);
                float *dinp = host_copy(dinp0, n), *dw = host_copy(dw0, C), *db = host_copy(db0, C);
                float *dbias = host_copy(dbias0, C), *dy = host_zeros(n);
                if (with_dy)
                    layernorm_residual_backward(dinp, dw, db, dout, x, w, mean, rstd, N, C, dy, keep, sc,
                                                with_bias ? dbias : NULL);
                else
                    layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd, N, C);
                float *d_x = dup_f(x, n), *d_w = dup_f(w, C), *d_mean = dup_f(mean, N), *d_rstd = dup_f(rstd, N);
                float *d_dout = dup_f(dout, n), *d_dinp = dmalloc(n * sizeof(float)), *d_dw = dmalloc(C * sizeof(float));
                float *d_db = dmalloc(C * sizeof(float)), *d_dbias = dmalloc(C * sizeof(float));
                float *d_dy = with_dy ? dmalloc(n * sizeof(float)) : NULL;
                float *d_scratch = dmalloc(cuda_layernorm_backward_scratch(N, C) * sizeof(float));
                float *g[2][5];
                for (int run = 0; run < 2; run++) {
                    upload(d_dinp, dinp0, n * sizeof(float));
                    upload(d_dw, dw0, C * sizeof(float));
                    upload(d_db, db0, C * sizeof(float));
                    upload(d_dbias, dbias0, C * sizeof(float));
                    cuda_layernorm_backward_residual(d_dinp, d_dw, d_db, d_dout, d_x, d_w, d_mean, d_rstd, N, C, d_dy,
                                                     d_keep, sc, with_bias ? d_dbias : NULL, d_scratch, st);
                    g[run][0] = fetch_f(d_dinp, n);
                    g[run][1] = fetch_f(d_dw, C);
                    g[run][2] = fetch_f(d_db, C);
                    g[run][3] = fetch_f(d_dbias, C);
                    g[run][4] = with_dy ? fetch_f(d_dy, n) : host_zeros(n);
                }
                snprintf(what, sizeof(what), "layernorm_residual_backward dinp %s", tag);
                expect_close(what, g[0][0], dinp, n, tol_sum(C));
                expect_identical(what, g[0][0], g[1][0], n * sizeof(float));
                snprintf(what, sizeof(what), "layernorm_residual_backward dw, db %s", tag);
                expect_close(what, g[0][1], dw, C, tol_sum(N));
                expect_close(what, g[0][2], db, C, tol_sum(N));
                expect_identical(what, g[0][1], g[1][1], C * sizeof(float));
                expect_identical(what, g[0][2], g[1][2], C * sizeof(float));
                if (with_dy) {
                    float *want = host_zeros(n);
                    for (size_t i = 0; i < n; i++) want[i] = g[0][0][i] * (keep ? (float)keep_bit(keep, i) * sc : sc);
                    snprintf(what, sizeof(what), "layernorm_residual_backward dy = dinp * keep * scale %s", tag);
                    expect_equal(what, g[0][4], want, n);
                    expect_identical(what, g[0][4], g[1][4], n * sizeof(float));
                    free(want);
                }
                if (with_bias) {
                    float *want = host_zeros(C);
                    for (int c = 0; c < C; c++) {
                        double sum = dbias0[c];
                        for (int r = 0; r < N; r++) sum += g[0][4][(size_t)r * C + c];
                        want[c] = (float)sum;
                    }
                    snprintf(what, sizeof(what), "layernorm_residual_backward dbias vs own dy %s", tag);
                    expect_close(what, g[0][3], want, C, tol_sum(N));
                    snprintf(what, sizeof(what), "layernorm_residual_backward dbias vs twin %s", tag);
                    expect_close(what, g[0][3], dbias, C, 2 * tol_sum(N));
                    expect_identical(what, g[0][3], g[1][3], C * sizeof(float));
                    free(want);
                } else {
                    snprintf(what, sizeof(what), "layernorm_residual_backward dbias untouched %s", tag);
                    expect_equal(what, g[0][3], dbias0, C);
                }
                for (int run = 0; run < 2; run++)
                    for (int k = 0; k < 5; k++) free(g[run][k]);
                free(keep), free(x), free(w), free(bb), free(out), free(mean), free(rstd), free(dout), free(dinp0);
                free(dw0), free(db0), free(dbias0), free(dinp), free(dw), free(db), free(dbias), free(dy);
                dfree(d_x), dfree(d_w), dfree(d_mean), dfree(d_rstd), dfree(d_dout), dfree(d_dinp), dfree(d_dw);
                dfree(d_db), dfree(d_dbias), dfree(d_scratch);
                if (d_dy) dfree(d_dy);
                if (d_keep) dfree(d_keep);
            }
}

// ---- Tiled attention --------------------------------------------------------------------------------------
// cuda_attention_forward / cuda_attention_backward (tiles of 32 queries and 32 keys, 16 at head size 128) against
// the materialised attention in double (tests/attention_ref.c) at T in {8, 33, 64, 65, 128, 512}, with and without
// dropout and [PAD] keys, head sizes 16, 24 (padded to 32), 64 and 128: out, lse, dq, dk, dv within ATT_TILED_TOL
// = 1e-5 of each tensor's largest magnitude (lse absolute). The argument is test_cpu_ops.c's: about 140 roundings
// on the longest chain (a score of hs <= 128 fused multiply-adds, a tile's 32 terms, the accumulation over T / 32
// key tiles, exp, log, a division), so random-sign errors of ~sqrt(140) u = 7e-7 against a wrong tile bound, a
// missing rescale or a dropout counter off by one at 1e-3 or more. The dropout decisions of the reference are THE
// DROPOUT RULE as stated (rng_uniform at the site's offset, !(u < p)); the kernels draw them from the DeviceStep as
// the model does. Also: the qkv bias added on load (the reference gets qkv + bias); the bias partials + finish
// against double column sums of the kernel's own dqkv (TOL_SUM(N)); run-to-run bit identity; and a micro-batch (rows
// 1.. of the whole batch, DeviceStep.rng_row0 = 1) equal to those rows of the whole batch's forward bit for bit.
#define ATT_TILED_TOL 1e-5

typedef struct {
    float *out, *lse, *dqkv, *db;  // host copies of one run's results
} AttRun;

static void att_run_free(AttRun *r) { free(r->out), free(r->lse), free(r->dqkv), free(r->db); }

static void test_attention_tiled(void) {
    printf("tiled attention vs the materialised attention in double (tests/attention_ref.c):\n");
    const int shapes[][4] = {{3, 8, 32, 2}, {2, 33, 48, 2}, {2, 64, 128, 2}, {2, 65, 64, 4}, {1, 128, 128, 1},
                             {1, 512, 32, 2}};
    const float p = 0.2f, drop_scale = dropout_scale(p);
    const int layer = 1;
    const uint64_t step = 3;
    CHECK(!cuda_attention_supported(256, 1) && cuda_attention_supported(256, 2) && !cuda_attention_supported(100, 3),
          "cuda_attention_supported: head sizes up to 128, d_model a multiple of the heads");
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++)
        for (int with_drop = 0; with_drop < 2; with_drop++)
            for (int with_pad = 0; with_pad < 2; with_pad++) {
                int B = shapes[si][0], T = shapes[si][1], C = shapes[si][2], H = shapes[si][3];
                size_t N = (size_t)B * T, nqkv = N * 3 * C, ny = N * C, nl = N * H, natt = nl * T;
                int with_bias = (si + with_drop) % 2 == 0;  // half the cases with a bias, the others NULL
                char tag[96], what[200];
                snprintf(tag, sizeof(tag), "B %d T %d C %d H %d drop %d pad %d bias %d", B, T, C, H, with_drop,
                         with_pad, with_bias);
                float *qkv = host_rand(nqkv, -1.5f, 1.5f), *bias = host_rand(3 * C, -0.5f, 0.5f);
                float *dout = host_rand(ny, -1.0f, 1.0f), *qkvb = host_copy(qkv, nqkv);
                if (with_bias)
                    for (size_t i = 0; i < nqkv; i++) qkvb[i] = qkv[i] + bias[i % (3 * C)];
                uint8_t *valid = with_pad ? attention_ref_key_valid(B, T) : NULL, *keep = NULL;
                // The step's draws as the model lays them out (a layout for a larger batch: this one is a prefix).
                RngLayout lay = rng_layout(B + 1, T, C, H, 2 * C, 2);
                DeviceStep hstep;
                memset(&hstep, 0, sizeof(hstep));
                hstep.philox_seed = drop_rng.seed;
                hstep.rng_base = rng_mask_offset(&lay, step);
                DeviceStep *d_step = dup_bytes(&hstep, sizeof(hstep));
                CudaAttnDropout drop = {NULL, 0, 0.0f, 1.0f};
                if (with_drop) {
                    uint64_t in_step = rng_dropout_offset(&lay, 0, layer, DROP_ATTN_PROBS);
                    drop = (CudaAttnDropout){d_step, in_step, p, drop_scale};
                    float *u = host_zeros(natt);
                    rng_uniform(&drop_rng, rng_dropout_offset(&lay, step, layer, DROP_ATTN_PROBS), u, natt);
                    keep = mlm_malloc(natt, "keep");
                    for (size_t i = 0; i < natt; i++) keep[i] = !(u[i] < p);
                    free(u);
                }
                double *y_ref = mlm_malloc(ny * sizeof(double), "ref");
                double *lse_ref = mlm_malloc(nl * sizeof(double), "ref");
                double *dqkv_ref = mlm_malloc(nqkv * sizeof(double), "ref");
                attention_ref_forward(y_ref, lse_ref, qkvb, valid, keep, drop_scale, B, T, C, H);
                attention_ref_backward(dqkv_ref, dout, qkvb, valid, keep, drop_scale, B, T, C, H);

                float *d_qkv = dup_f(qkv, nqkv), *d_bias = with_bias ? dup_f(bias, 3 * C) : NULL;
                uint8_t *d_valid = valid ? dup_bytes(valid, N) : NULL;
                float *d_out = dmalloc(ny * sizeof(float)), *d_lse = dmalloc(nl * sizeof(float));
                float *d_dout = dup_f(dout, ny), *d_dqkv = dmalloc(nqkv * sizeof(float));
                float *d_delta = dmalloc(cuda_attention_delta_scratch(B, T, H) * sizeof(float));
                float *d_part = dmalloc(cuda_attention_bias_scratch(B, C) * sizeof(float));
                float *d_db = dmalloc(3 * C * sizeof(float));
                AttRun run[2];
                for (int r = 0; r < 2; r++) {
                    cuda_attention_forward(d_out, d_lse, d_qkv, d_bias, d_valid, drop, B, T, C, H, st);
                    CUDA_CHECK(cudaMemsetAsync(d_db, 0, 3 * C * sizeof(float), st));
                    cuda_attention_backward(d_dqkv, d_part, d_delta, d_dout, d_qkv, d_bias, d_out, d_lse, d_valid, drop,
                                            B, T, C, H, st);
                    cuda_column_sums_finish(d_db, d_part, B, 3 * C, st);
                    run[r] = (AttRun){fetch_f(d_out, ny), fetch_f(d_lse, nl), fetch_f(d_dqkv, nqkv),
                                      fetch_f(d_db, 3 * C)};
                }
                double e_lse = 0.0;
                for (size_t i = 0; i < nl; i++)
                    e_lse = fmax(e_lse, isnan(run[0].lse[i]) ? INFINITY : fabs(run[0].lse[i] - lse_ref[i]));
                double e_out = attention_ref_error(run[0].out, y_ref, N, 0, C, C);
                double e_dq = attention_ref_error(run[0].dqkv, dqkv_ref, N, 0, 3 * C, C);
                double e_dk = attention_ref_error(run[0].dqkv, dqkv_ref, N, C, 3 * C, C);
                double e_dv = attention_ref_error(run[0].dqkv, dqkv_ref, N, 2 * C, 3 * C, C);
                printf("  %-44s out %.1e lse %.1e dq %.1e dk %.1e dv %.1e\n", tag, e_out, e_lse, e_dq, e_dk, e_dv);
                CHECK(e_out <= ATT_TILED_TOL && e_lse <= ATT_TILED_TOL, "tiled attention forward %s: out %.2e lse %.2e",
                      tag, e_out, e_lse);
                CHECK(e_dq <= ATT_TILED_TOL && e_dk <= ATT_TILED_TOL && e_dv <= ATT_TILED_TOL,
                      "tiled attention backward %s: dq %.2e dk %.2e dv %.2e", tag, e_dq, e_dk, e_dv);
                snprintf(what, sizeof(what), "attention (out, lse, dqkv, bias) %s", tag);
                expect_identical(what, run[0].out, run[1].out, ny * sizeof(float));
                expect_identical(what, run[0].lse, run[1].lse, nl * sizeof(float));
                expect_identical(what, run[0].dqkv, run[1].dqkv, nqkv * sizeof(float));
                expect_identical(what, run[0].db, run[1].db, 3 * C * sizeof(float));
                float *db_ref = host_zeros(3 * C);
                for (int c = 0; c < 3 * C; c++) {
                    double sum = 0.0;
                    for (size_t r = 0; r < N; r++) sum += run[0].dqkv[r * 3 * C + c];
                    db_ref[c] = (float)sum;
                }
                snprintf(what, sizeof(what), "attention bias partials + finish %s", tag);
                expect_close(what, run[0].db, db_ref, 3 * C, tol_sum((int)N));
                if (B > 1) {
                    // Rows 1..B-1 as a micro-batch of the whole batch: the same numbers, drawn rng_row0 rows in.
                    hstep.rng_row0 = 1;
                    hstep.rng_rows = (uint64_t)B;
                    upload(d_step, &hstep, sizeof(hstep));
                    float *d_out1 = dmalloc((ny - (size_t)T * C) * sizeof(float));
                    float *d_lse1 = dmalloc((nl - (size_t)T * H) * sizeof(float));
                    cuda_attention_forward(d_out1, d_lse1, d_qkv + (size_t)T * 3 * C, d_bias,
                                           d_valid ? d_valid + T : NULL, drop, B - 1, T, C, H, st);
                    float *out1 = fetch_f(d_out1, ny - (size_t)T * C);
                    snprintf(what, sizeof(what), "attention micro-batch rows 1.. %s", tag);
                    expect_identical(what, out1, run[0].out + (size_t)T * C, (ny - (size_t)T * C) * sizeof(float));
                    free(out1);
                    dfree(d_out1), dfree(d_lse1);
                }
                for (int r = 0; r < 2; r++) att_run_free(&run[r]);
                free(qkv), free(bias), free(dout), free(qkvb), free(valid), free(keep), free(y_ref), free(lse_ref);
                free(dqkv_ref), free(db_ref);
                dfree(d_qkv), dfree(d_out), dfree(d_lse), dfree(d_dout), dfree(d_dqkv), dfree(d_delta), dfree(d_part);
                dfree(d_db), dfree(d_step);
                if (d_bias) dfree(d_bias);
                if (d_valid) dfree(d_valid);
            }
}

// ---- Cross-entropy ---------------------------------------------------------------------------------------

static int argmax_first(const float *x, int V) {  // the CPU's rule: lowest index on ties
    int best = 0;
    for (int v = 1; v < V; v++)
        if (x[v] > x[best]) best = v;
    return best;
}

static void test_crossentropy(void) {
    printf("cross-entropy, target count and loss reduction:\n");
    const int shapes[][3] = {{1, 67, 0}, {7, 67, 0}, {2053, 67, 0}, {64, 1000, 0}, {3, 65536, 0}, {5, 67, 1}};
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int N = shapes[s][0], V = shapes[s][1], all_ignored = shapes[s][2], ignore = V - 2;
        size_t NV = (size_t)N * V;
        char tag[64], what[160];
        snprintf(tag, sizeof(tag), "N %d V %d%s", N, V, all_ignored ? " all ignored" : "");
        float *logits = host_rand(NV, -4.0f, 4.0f);
        int *labels = mlm_malloc(N * sizeof(int), "labels"), *pick = mlm_malloc(2 * N * sizeof(int), "picks");
        float *coin = host_rand(N, 0.0f, 1.0f);
        fill_ints(labels, N, 0, V);
        fill_ints(pick, 2 * (size_t)N, 0, V);
        for (int n = 0; n < N; n++) {
            float *x = logits + (size_t)n * V;
            int a = MLM_MIN(pick[2 * n], pick[2 * n + 1]), b = MLM_MAX(pick[2 * n], pick[2 * n + 1]);
            if (n % 4 == 1 && a != b) {  // a tie for the max: argmax must be a (the lower index)
                x[a] = x[b] = 6.0f;
                labels[n] = n % 8 == 1 ? a : b;
            } else if (n % 4 == 2) {
                labels[n] = argmax_first(x, V);  // a correct prediction
            }
            if (all_ignored || (n > 0 && coin[n] < 0.4f)) labels[n] = ignore;
        }
        // CPU.
        float *loss_c = host_zeros(N), *dl_c = host_zeros(NV);
        int nt_c = 0, corr_c = 0;
        float mean_c = crossentropy_forward(loss_c, logits, labels, N, V, ignore, &nt_c, &corr_c);
        if (nt_c > 0) crossentropy_backward(dl_c, logits, labels, N, V, ignore, 1.0f / (float)nt_c);
        float *corr_ref = host_zeros(N);
        for (int n = 0; n < N; n++)
            corr_ref[n] = labels[n] != ignore && argmax_first(logits + (size_t)n * V, V) == labels[n];
        // GPU, twice; the second time in place (dlogits == logits).
        float *d_logits = dup_f(logits, NV), *d_logits2 = dup_f(logits, NV), *d_dl = dmalloc(NV * sizeof(float));
        int *d_labels = dup_bytes(labels, N * sizeof(int)), *d_nt = dmalloc(sizeof(int));
        float *d_loss = dmalloc(N * sizeof(float)), *d_red = dmalloc(3 * sizeof(float));
        int *d_corr = dmalloc(N * sizeof(int));
        float *g_loss[2], *g_dl[2], g_red[2][3], *g_corr = host_zeros(N);
        int *g_corr_i[2], g_nt = -1;
        for (int run = 0; run < 2; run++) {
            float *dst = run == 0 ? d_dl : d_logits2;
            const float *src = run == 0 ? d_logits : d_logits2;
            cuda_count_targets(d_nt, d_labels, N, ignore, st);
            cuda_crossentropy_forward_backward(d_loss, d_corr, dst, src, d_labels, d_nt, N, V, ignore, st);
            cuda_loss_reduce(d_red, d_loss, d_corr, d_nt, N, st);
            g_loss[run] = fetch_f(d_loss, N);
            g_dl[run] = fetch_f(dst, NV);
            g_corr_i[run] = mlm_malloc(N * sizeof(int), "correct");
            download(g_corr_i[run], d_corr, N * sizeof(int));
            download(g_red[run], d_red, 3 * sizeof(float));
            download(&g_nt, d_nt, sizeof(int));
        }
        for (int n = 0; n < N; n++) g_corr[n] = (float)g_corr_i[0][n];
        CHECK(g_nt == nt_c, "%s: count_targets %d, CPU %d", tag, g_nt, nt_c);
        snprintf(what, sizeof(what), "crossentropy losses %s", tag);
        expect_close(what, g_loss[0], loss_c, N, 1e-6);
        snprintf(what, sizeof(what), "crossentropy correct flags %s", tag);
        expect_equal(what, g_corr, corr_ref, N);
        snprintf(what, sizeof(what), "crossentropy dlogits %s", tag);
        if (nt_c > 0) expect_close(what, g_dl[0], dl_c, NV, tol_sum(V));
        else expect_equal(what, g_dl[0], dl_c, NV);  // no targets: all zero
        snprintf(what, sizeof(what), "crossentropy (in place == separate, deterministic) %s", tag);
        expect_identical(what, g_dl[0], g_dl[1], NV * sizeof(float));
        expect_identical(what, g_loss[0], g_loss[1], N * sizeof(float));
        expect_identical(what, g_corr_i[0], g_corr_i[1], N * sizeof(int));
        expect_identical(what, g_red[0], g_red[1], sizeof(g_red[0]));
        snprintf(what, sizeof(what), "loss_reduce mean loss %s", tag);
        expect_close(what, &g_red[0][0], &mean_c, 1, 1e-6);
        CHECK(g_red[0][1] == (float)corr_c && g_red[0][2] == (float)nt_c, "%s: loss_reduce correct %g / %g, CPU %d / %d",
              tag, g_red[0][1], g_red[0][2], corr_c, nt_c);
        printf("  %-58s %d targets, %d correct (CPU %d, %d)\n", tag, (int)g_red[0][2], (int)g_red[0][1], nt_c, corr_c);
        for (int run = 0; run < 2; run++) free(g_loss[run]), free(g_dl[run]), free(g_corr_i[run]);
        free(logits), free(labels), free(pick), free(coin), free(loss_c), free(dl_c), free(corr_ref), free(g_corr);
        dfree(d_logits), dfree(d_logits2), dfree(d_dl), dfree(d_labels), dfree(d_nt), dfree(d_loss), dfree(d_red);
        dfree(d_corr);
    }
}

// ---- Gradient norm and Adam --------------------------------------------------------------------------------

// The fixed summation order optim.cu documents, on the host: NB = clamp(ceil(n / 8192), 1, 1024) blocks of
// 256 threads, thread t of block b summing g[i]^2 in double for i = b 256 + t, + NB 256, ...; per block the
// warps' butterfly sums, then a butterfly over the 8 warp sums (the other lanes 0); then the NB partials as
// one block of 1024 threads holding one partial each (0 past NB): 32 warp butterflies, then one over those.
static double butterfly32(const double *v, int valid) {
    double x[32];
    for (int k = 0; k < 32; k++) x[k] = k < valid ? v[k] : 0.0;
    for (int o = 16; o > 0; o >>= 1)
        for (int k = 0; k < o; k++) x[k] += x[k + o];
    return x[0];
}

static float grad_norm_fixed_order(const float *g, size_t n) {
    size_t nb = (n + 8191) / 8192;
    nb = nb < 1 ? 1 : nb > 1024 ? 1024 : nb;
    double partial[1024], t[256], w[32];
    for (size_t b = 0; b < nb; b++) {
        for (size_t th = 0; th < 256; th++) {
            double s = 0.0;
            for (size_t i = b * 256 + th; i < n; i += nb * 256) s += (double)g[i] * (double)g[i];
            t[th] = s;
        }
        for (int k = 0; k < 8; k++) w[k] = butterfly32(t + 32 * k, 32);
        partial[b] = butterfly32(w, 8);
    }
    for (int k = 0; k < 32; k++) w[k] = 32 * k < (int)nb ? butterfly32(partial + 32 * k, (int)nb - 32 * k) : 0.0;
    return (float)sqrt(butterfly32(w, 32));
}

static void test_grad_norm(void) {
    printf("grad norm (1e-6, deterministic):\n");
    const size_t sizes[] = {0, 1, 7, 4097, 812355, quick ? 300007 : 3000007};
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
        size_t n = sizes[s];
        float *g = host_rand(n, -1e-2f, 1e-2f);
        if (n > 3) g[n / 3] = 3.0f;  // one large entry among small ones
        float want = cpu_grad_norm(g, n);
        float *d_g = dup_f(g, n), *d_norm = dmalloc(sizeof(float));
        double *d_scratch = dmalloc(cuda_grad_norm_scratch(n) * sizeof(double));
        CUDA_CHECK(cudaMemset(d_scratch, 0, cuda_grad_norm_scratch(n) * sizeof(double)));  // its block counter
        float got[2];
        for (int run = 0; run < 2; run++) {
            cuda_grad_norm(d_norm, d_g, n, d_scratch, st);
            download(&got[run], d_norm, sizeof(float));
        }
        char what[160];
        snprintf(what, sizeof(what), "grad_norm n %zu (%.6g)", n, (double)want);
        expect_close(what, &got[0], &want, 1, 1e-6);
        expect_identical(what, &got[0], &got[1], sizeof(float));
        // One launch (the last block adds the partials) in the order of the former two: bit-identical.
        float order = grad_norm_fixed_order(g, n);
        CHECK(memcmp(&got[0], &order, sizeof(float)) == 0, "grad_norm n %zu: %.9g, the fixed order gives %.9g", n,
              (double)got[0], (double)order);
        free(g);
        dfree(d_g), dfree(d_norm), dfree(d_scratch);
    }
}

static void test_adam(void) {
    printf("clip + Adam / AdamW (bit-exact vs cpu_clip_grads + cpu_adam_update, 3 steps; the BF16 copy vs THE ROUNDING "
           "RULE):\n");
    const size_t sizes[] = {1, 7, quick ? 40009 : 812355};
    const float max_norms[] = {0.0f, 1.0f, 1e9f};  // off, clipping, a coefficient >= 1 (no clipping)
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++)
        for (int kind = 0; kind < 2; kind++)
            for (size_t mi = 0; mi < sizeof(max_norms) / sizeof(max_norms[0]); mi++)
                for (int with_mask = 0; with_mask < 2; with_mask++) {
                    if (kind == OPTIM_NOAM_ADAM && with_mask) continue;  // labml's Adam has no weight decay
                    size_t n = sizes[s];
                    float max_norm = max_norms[mi];
                    long t0 = s == 1 ? 1 : 3999;  // bias corrections far from and close to 1
                    OptimConfig oc = {.kind = (OptimKind)kind, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                                      .weight_decay = 0.1f};
                    float *p = host_rand(n, -1.0f, 1.0f), *m = host_rand(n, -1e-3f, 1e-3f);
                    float *v = host_rand(n, 0.0f, 1e-5f);
                    uint8_t *mask = NULL, *d_mask = NULL;
                    if (with_mask) {
                        int *bits = mlm_malloc(n * sizeof(int), "mask bits");
                        fill_ints(bits, n, 0, 2);
                        mask = mlm_malloc(n, "decay mask");
                        for (size_t i = 0; i < n; i++) mask[i] = (uint8_t)bits[i];
                        free(bits);
                        d_mask = dup_bytes(mask, n);
                    }
                    float *d_p = dup_f(p, n), *d_m = dup_f(m, n), *d_v = dup_f(v, n);
                    float *d_g = dmalloc(n * sizeof(float)), *d_norm = dmalloc(sizeof(float));
                    float a = 4.0f * sqrtf(3.0f / (float)n);  // gradient norm ~4
                    for (long t = t0; t < t0 + 3; t++) {
                        float *g = host_rand(n, -a, a);
                        upload(d_g, g, n * sizeof(float));
                        // The CPU clips in place and returns the norm; the GPU gets that norm so that both
                        // compute the same coefficient (the norm itself is tested above).
                        float norm = max_norm > 0.0f ? cpu_clip_grads(g, n, max_norm) : cpu_grad_norm(g, n);
                        upload(d_norm, &norm, sizeof(float));
                        double lr = kind == OPTIM_NOAM_ADAM ? 1.976e-3 * (double)t / 2000.0 : 3e-4;
                        cpu_adam_update(&oc, p, g, m, v, mask, n, t, lr);
                        if (t % 2) {
                            cuda_adam_update(d_p, d_g, d_m, d_v, d_mask, d_norm, max_norm, n, kind, oc.beta1,
                                             oc.beta2, oc.eps, oc.weight_decay, t, lr, st);
                        } else {  // the step constants from device memory, as a captured step reads them
                            // With the BF16 copy (train.precision = bf16) of a range that starts at parameter
                            // 5 of the model: THE ROUNDING RULE of the updated values at t x P + 5 + i, bit for bit.
                            AdamStep k = cuda_adam_step(kind, oc.beta1, oc.beta2, oc.weight_decay, t, lr);
                            k.round_seed = 0x5eed0fb16ULL, k.round_offset = (uint64_t)t * 1000003u;
                            AdamStep *d_k = dmalloc(sizeof(AdamStep));
                            upload(d_k, &k, sizeof(k));
                            uint16_t *d_copy = dmalloc(n * sizeof(uint16_t));
                            cuda_adam_update_dev(d_p, d_g, d_m, d_v, d_mask, d_norm, max_norm, n, kind, oc.beta1,
                                                 oc.beta2, oc.eps, d_k, d_copy, 5, st);
                            uint16_t *copy = mlm_malloc(n * sizeof(uint16_t), "BF16 copy");
                            uint16_t *want = mlm_malloc(n * sizeof(uint16_t), "BF16 copy (CPU)");
                            CUDA_CHECK(cudaMemcpy(copy, d_copy, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
                            bf16_stochastic_round_array(want, p, n, k.round_seed, k.round_offset + 5);
                            size_t differ = 0;
                            for (size_t i = 0; i < n; i++) differ += copy[i] != want[i];
                            CHECK(differ == 0, "adam kind %d n %zu t %ld: %zu of the BF16 copy's values are not THE "
                                  "ROUNDING RULE of the updated parameters at offset t P + 5 + i", kind, n, t, differ);
                            free(copy), free(want);
                            dfree(d_copy);
                            dfree(d_k);
                        }
                        free(g);
                    }
                    float *gp = fetch_f(d_p, n), *gm = fetch_f(d_m, n), *gv = fetch_f(d_v, n);
                    char what[160];
                    snprintf(what, sizeof(what), "adam kind %d n %zu max_norm %g mask %d params", kind, n,
                             (double)max_norm, with_mask);
                    expect_equal(what, gp, p, n);
                    snprintf(what, sizeof(what), "adam kind %d n %zu max_norm %g mask %d m, v", kind, n,
                             (double)max_norm, with_mask);
                    expect_equal(what, gm, m, n);
                    expect_equal(what, gv, v, n);
                    free(p), free(m), free(v), free(mask), free(gp), free(gm), free(gv);
                    dfree(d_p), dfree(d_m), dfree(d_v), dfree(d_g), dfree(d_norm);
                    if (d_mask) dfree(d_mask);
                }
}

int main(int argc, char **argv) {
    char why[256];
    // Before any other CUDA call: a host without a device skips.
    if (cuda_device_count(why, sizeof(why)) == 0) return test_skip(why);
    quick = argc > 1 && !strcmp(argv[1], "--quick");
    char desc[256];
    cuda_device_describe(desc, sizeof(desc));
    printf("device: %s\n", desc);
    rng_init(&data_rng, 20240607, RNG_DOMAIN_INIT);
    rng_init(&drop_rng, 20240607, RNG_DOMAIN_TRAIN);
    CUDA_CHECK(cudaStreamCreate(&st));
    CURAND_CHECK(curandCreateGenerator(&dgen, CURAND_RNG_PSEUDO_PHILOX4_32_10));
    CURAND_CHECK(curandSetGeneratorOrdering(dgen, CURAND_ORDERING_PSEUDO_LEGACY));  // as the model's
    CURAND_CHECK(curandSetPseudoRandomGeneratorSeed(dgen, drop_rng.seed));

    test_uniforms();
    test_kernel_philox();
    test_dropout_rule();
    test_feedforward();
    test_column_sums();
    test_backward_sums();
    test_embedding();
    test_layernorm();
    test_residual_layernorm();
    test_embedding_layernorm();
    test_layernorm_residual_backward();
    test_attention_tiled();
    test_crossentropy();
    test_grad_norm();
    test_adam();

    CURAND_CHECK(curandDestroyGenerator(dgen));
    CUDA_CHECK(cudaStreamDestroy(st));
    rng_free(&data_rng);
    rng_free(&drop_rng);
    return test_finish("test_gpu_ops");
}
