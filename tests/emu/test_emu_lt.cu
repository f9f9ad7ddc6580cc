// test_emu_lt.cu (emu): the layer's BF16 type and its cuBLASLt. __float2bfloat16 (round to nearest even),
// __float2bfloat16_rz and __bfloat162float against a reference that picks the nearer of the two neighbouring BF16
// values in double arithmetic, over a sweep of every exponent; cublasLtMatmul against a double-precision product
// written here (column-major loops) for BF16 and FP32 matrices, N/T on both sides, odd leading dimensions, strided
// batches, beta 0 (C holding NaN is not read) and beta 1, the BIAS epilogue and the TF32 compute type; cuBLASLt's
// argument checks (types it does not combine, shapes that do not fit, leading dimensions, attribute sizes, an
// algorithm from elsewhere); capture and replay in a graph; the counters; and, in child processes, the misuses the
// layer reports (an operand past its allocation, D overlapping A).
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <cublasLt.h>
#include <cuda_bf16.h>

#include "emu_api.h"
extern "C" {
#include "test_util.h"
}

#define CK(call)                                                                                      \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) {                                                                      \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call, cudaGetErrorName(e_)); \
            exit(1);                                                                                  \
        }                                                                                             \
    } while (0)
#define LT(call) CHECK((call) == CUBLAS_STATUS_SUCCESS, "%s", #call)

static uint64_t lcg = 0x2545F4914F6CDD1Dull;
static uint32_t urand(void) {
    lcg = lcg * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(lcg >> 32);
}
static float frand(void) { return (float)((urand() >> 8) / 16777216.0) * 2.0f - 1.0f; }

static float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bf16_value(uint16_t b) { return bits_float((uint32_t)b << 16); }

// ---- BF16 conversions ------------------------------------------------------------------------------------

// The reference: the two BF16 values around x (truncation and the next one up in magnitude) compared in double;
// the nearer wins, a tie goes to the even mantissa; past the largest finite BF16 (by half an ulp or more) infinity.
static uint16_t ref_round_nearest_even(float x) {
    uint32_t u = float_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);  // hi: next in magnitude (may be +-inf)
    if ((u & 0xffffu) == 0) return lo;
    double dx = fabs((double)x), dlo = fabs((double)bf16_value(lo));
    double dhi = (hi & 0x7fffu) == 0x7f80u ? ldexp(1.0, 128) : fabs((double)bf16_value(hi));  // inf as 2^128
    double a = dx - dlo, b = dhi - dx;
    if (a < b) return lo;
    if (b < a) return hi;
    return (lo & 1u) ? hi : lo;
}

static void test_conversions(void) {
    long checked = 0, bad_rn = 0, bad_rz = 0, bad_back = 0;
    // Every exponent, both signs, and in each a spread of mantissas including the rounding boundaries.
    const uint32_t low_bits[] = {0x0000, 0x0001, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000};
    for (uint32_t sign = 0; sign < 2; sign++)
        for (uint32_t e = 0; e < 256; e++)
            for (int r = 0; r < 64; r++) {
                uint32_t top = (uint32_t)(r < 8 ? r * 0x10 + (r & 1) : urand() & 0x7f);  // 7 kept mantissa bits
                for (uint32_t low : low_bits) {
                    uint32_t u = sign << 31 | e << 23 | top << 16 | low;
                    float x = bits_float(u);
                    uint16_t want = ref_round_nearest_even(x);
                    uint16_t got = __bfloat16_as_ushort(__float2bfloat16(x));
                    uint16_t got_rn = __bfloat16_as_ushort(__float2bfloat16_rn(x));
                    bad_rn += got != want || got_rn != want;
                    uint16_t rz = __bfloat16_as_ushort(__float2bfloat16_rz(x));
                    uint16_t want_rz = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fff : (uint16_t)(u >> 16);
                    bad_rz += rz != want_rz;
                    if (!isnan(x)) bad_back += float_bits(__bfloat162float(__float2bfloat16_rz(x))) != (u & 0xffff0000u);
                    checked++;
                }
            }
    CHECK(bad_rn == 0, "__float2bfloat16 / _rn: %ld of %ld values are not the nearest BF16 (ties to even)", bad_rn,
          checked);
    CHECK(bad_rz == 0, "__float2bfloat16_rz: %ld of %ld values are not the truncation", bad_rz, checked);
    CHECK(bad_back == 0, "__bfloat162float: %ld of %ld values are not the bits shifted up", bad_back, checked);
    // Named cases: a tie rounds to even, the largest finite BF16 plus half an ulp is infinity, NaN is canonical.
    CHECK(__bfloat16_as_ushort(__float2bfloat16(bits_float(0x3f808000u))) == 0x3f80, "1 + 2^-8 (a tie) -> 1");
    CHECK(__bfloat16_as_ushort(__float2bfloat16(bits_float(0x3f818000u))) == 0x3f82, "a tie above an odd mantissa");
    CHECK(__bfloat16_as_ushort(__float2bfloat16(bits_float(0x7f7f8000u))) == 0x7f80, "overflow to infinity");
    CHECK(__bfloat16_as_ushort(__float2bfloat16(bits_float(0xffc00001u))) == 0x7fff, "NaN is canonical");
    __nv_bfloat162 two = __floats2bfloat162_rn(1.5f, -2.25f);
    CHECK(__low2float(two) == 1.5f && __high2float(two) == -2.25f, "__floats2bfloat162_rn / __low2float");
    printf("  BF16 conversions vs nearest-in-double: %ld values over every exponent and sign, round to nearest even, "
           "toward zero and back\n", checked);
}

// ---- cuBLASLt -------------------------------------------------------------------------------------------------

struct Mat {
    cudaDataType type;
    int rows, cols, ld, batch;
    long long stride;
    std::vector<float> v;  // values (BF16 ones are exactly representable)
    size_t elems() const { return (size_t)(stride * (batch - 1) + (long long)ld * cols); }
};

static Mat make(cudaDataType t, int rows, int cols, int pad, int batch, long long extra) {
    Mat m{t, rows, cols, rows + pad, batch, 0, {}};
    m.stride = (long long)m.ld * cols + extra;
    m.v.resize(m.elems());
    for (auto &x : m.v) {
        x = frand();
        if (t == CUDA_R_16BF) x = bf16_value(__bfloat16_as_ushort(__float2bfloat16(x)));
    }
    return m;
}

static void *upload(const Mat &m) {
    size_t es = m.type == CUDA_R_16BF ? 2 : 4;
    std::vector<char> raw(m.v.size() * es);
    for (size_t i = 0; i < m.v.size(); i++) {
        if (es == 2) {
            uint16_t b = __bfloat16_as_ushort(__float2bfloat16(m.v[i]));
            memcpy(&raw[i * 2], &b, 2);
        } else {
            memcpy(&raw[i * 4], &m.v[i], 4);
        }
    }
    void *d;
    CK(cudaMalloc(&d, raw.size()));
    CK(cudaMemcpy(d, raw.data(), raw.size(), cudaMemcpyHostToDevice));
    return d;
}

static std::vector<float> download(const void *d, cudaDataType t, size_t n) {
    size_t es = t == CUDA_R_16BF ? 2 : 4;
    std::vector<char> raw(n * es);
    CK(cudaMemcpy(raw.data(), d, raw.size(), cudaMemcpyDeviceToHost));
    std::vector<float> out(n);
    for (size_t i = 0; i < n; i++) {
        if (es == 2) {
            uint16_t b;
            memcpy(&b, &raw[i * 2], 2);
            out[i] = bf16_value(b);
        } else {
            memcpy(&out[i], &raw[i * 4], 4);
        }
    }
    return out;
}

static cublasLtMatrixLayout_t layout(const Mat &m) {
    cublasLtMatrixLayout_t l;
    LT(cublasLtMatrixLayoutCreate(&l, m.type, (uint64_t)m.rows, (uint64_t)m.cols, (int64_t)m.ld));
    int32_t batch = m.batch;
    int64_t stride = m.stride;
    LT(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)));
    LT(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
    return l;
}

static cublasLtMatmulDesc_t make_desc(cublasComputeType_t compute, cublasOperation_t ta, cublasOperation_t tb,
                                      const void *bias) {
    cublasLtMatmulDesc_t d;
    LT(cublasLtMatmulDescCreate(&d, compute, CUDA_R_32F));
    int32_t a = ta, b = tb;
    LT(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSA, &a, sizeof(a)));
    LT(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_TRANSB, &b, sizeof(b)));
    if (bias) {
        uint32_t epi = CUBLASLT_EPILOGUE_BIAS;
        LT(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
        LT(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    return d;
}

static float tf32(float x) {
    uint32_t u = float_bits(x);
    u += 0x1000u + ((u >> 13) & 1u);
    return bits_float(u & ~0x1fffu);
}

// One case: D = alpha op(A) op(B) + beta C (+ bias) against the double reference. Returns the worst error in units
// of the tolerance (<= 1 passes).
static double run_case(cublasLtHandle_t h, cublasComputeType_t compute, cudaDataType ab, cudaDataType cd,
                       cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, int batch, float beta,
                       bool with_bias) {
    Mat A = make(ab, ta == CUBLAS_OP_N ? m : k, ta == CUBLAS_OP_N ? k : m, 3, batch, 5);
    Mat B = make(ab, tb == CUBLAS_OP_N ? k : n, tb == CUBLAS_OP_N ? n : k, 1, batch, 2);
    Mat C = make(cd, m, n, 2, batch, 7);
    Mat bias = make(cd, m, 1, 0, 1, 0);
    void *dA = upload(A), *dB = upload(B), *dC = upload(C), *dbias = with_bias ? upload(bias) : nullptr;
    if (beta == 0.0f) CK(cudaMemset(dC, 0xff, C.v.size() * (cd == CUDA_R_16BF ? 2 : 4)));  // NaN: must not be read
    cublasLtMatmulDesc_t desc = make_desc(compute, ta, tb, dbias);
    cublasLtMatrixLayout_t la = layout(A), lb = layout(B), lc = layout(C);
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = 0;
    LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    LT(cublasLtMatmulAlgoGetHeuristic(h, desc, la, lb, lc, lc, pref, 1, &res, &found));
    CHECK(found == 1 && res.state == CUBLAS_STATUS_SUCCESS, "no algorithm");
    float alpha = 0.75f;
    // In place: C is D (one layout), as the model's accumulating products use it.
    LT(cublasLtMatmul(h, desc, &alpha, dA, la, dB, lb, &beta, dC, lc, dC, lc, &res.algo, nullptr, 0, 0));
    std::vector<float> got = download(dC, cd, C.v.size());
    double worst = 0.0;
    for (int bi = 0; bi < batch; bi++)
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                double acc = 0.0, mag = 0.0;
                for (int p = 0; p < k; p++) {
                    float a = A.v[bi * A.stride + (ta == CUBLAS_OP_N ? i + (long long)p * A.ld : p + (long long)i * A.ld)];
                    float b = B.v[bi * B.stride + (tb == CUBLAS_OP_N ? p + (long long)j * B.ld : j + (long long)p * B.ld)];
                    if (compute == CUBLAS_COMPUTE_32F_FAST_TF32) a = tf32(a), b = tf32(b);
                    acc += (double)a * b;
                    mag += fabs((double)a * b);
                }
                size_t ci = (size_t)(bi * C.stride + i + (long long)j * C.ld);
                double want = alpha * acc + (beta != 0.0f ? (double)beta * C.v[ci] : 0.0) + (with_bias ? bias.v[i] : 0.0);
                double scale = alpha * mag + fabs(beta * (double)C.v[ci]) + (with_bias ? fabs(bias.v[i]) : 0.0);
                // FP32 D: the sum in double is exact to 2^-52 relative per term; one rounding to float gives half an
                // ulp of the result (2^-24 relative: 24 significant bits), so 2^-24 |want| plus 2^-40 of the
                // magnitude of the terms bounds it. BF16 D: the float rounding first, then half a BF16 ulp (2^-8
                // relative: 8 significant bits), 2^-8 |want| plus 2^-23 of the terms.
                double tol = cd == CUDA_R_16BF ? ldexp(fabs(want), -8) + ldexp(scale, -23)
                                               : ldexp(fabs(want), -24) + ldexp(scale, -40);
                double err = fabs((double)got[ci] - want);
                if (!(err <= tol)) err = INFINITY;  // NaN too
                worst = fmax(worst, tol > 0 ? err / tol : err);
            }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(desc);
    CK(cudaFree(dA));
    CK(cudaFree(dB));
    CK(cudaFree(dC));
    if (dbias) CK(cudaFree(dbias));
    return worst;
}

static void test_matmul(cublasLtHandle_t h) {
    struct Types {
        cublasComputeType_t compute;
        cudaDataType ab, cd;
        const char *name;
    } types[] = {{CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_16BF, "BF16 -> BF16"},
                 {CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_32F, "BF16 -> FP32"},
                 {CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_32F, "FP32 -> FP32"},
                 {CUBLAS_COMPUTE_32F_FAST_TF32, CUDA_R_32F, CUDA_R_32F, "TF32 -> FP32"}};
    const int shapes[][3] = {{1, 1, 1}, {5, 3, 7}, {17, 9, 33}, {4, 13, 1}, {8, 6, 200}};
    const cublasOperation_t ops[2] = {CUBLAS_OP_N, CUBLAS_OP_T};
    int cases = 0;
    for (auto &t : types) {
        double worst = 0.0;
        for (auto &s : shapes)
            for (int a = 0; a < 2; a++)
                for (int b = 0; b < 2; b++)
                    for (int v = 0; v < 2; v++) {
                        int batch = v ? 3 : 1;
                        float beta = v ? 1.0f : 0.0f;
                        bool bias = (a + b + v) % 2 == 0;
                        double w = run_case(h, t.compute, t.ab, t.cd, ops[a], ops[b], s[0], s[1], s[2], batch, beta,
                                            bias);
                        CHECK(w <= 1.0, "%s %c%c m %d n %d k %d batch %d beta %g bias %d: error %.3g x tolerance",
                              t.name, a ? 'T' : 'N', b ? 'T' : 'N', s[0], s[1], s[2], batch, beta, (int)bias, w);
                        worst = fmax(worst, w);
                        cases++;
                    }
        printf("  cublasLtMatmul %s vs double: worst error %.3f of its tolerance\n", t.name, worst);
    }
    printf("  (%d cases: N/T x N/T, odd leading dimensions and batch strides, beta 0 over NaN and beta 1, BIAS)\n", cases);
}

static void test_validation(cublasLtHandle_t h) {
    void *d;
    CK(cudaMalloc(&d, 1 << 16));
    char *base = (char *)d;
    float one = 1.0f, zero = 0.0f;
    struct Case {
        const char *what;
        cublasComputeType_t compute;
        cudaDataType a, b, c, dd;
        int m, n, k, ldd;
        uint32_t epilogue;
        cublasStatus_t want;
    } cases[] = {
        {"BF16 -> BF16", CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, 4, 5, 6, 4,
         CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_SUCCESS},
        {"A BF16, B FP32", CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, 4, 5, 6, 4,
         CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_NOT_SUPPORTED},
        {"C FP32, D BF16", CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_32F, CUDA_R_16BF, 4, 5, 6, 4,
         CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_NOT_SUPPORTED},
        {"FP32 in, BF16 out", CUBLAS_COMPUTE_32F, CUDA_R_32F, CUDA_R_32F, CUDA_R_16BF, CUDA_R_16BF, 4, 5, 6, 4,
         CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_NOT_SUPPORTED},
        {"BF16 under TF32 compute", CUBLAS_COMPUTE_32F_FAST_TF32, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, 4,
         5, 6, 4, CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_NOT_SUPPORTED},
        {"BF16 under 64F compute", CUBLAS_COMPUTE_64F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, 4, 5, 6, 4,
         CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_NOT_SUPPORTED},
        {"D rows != op(A) rows", CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, 3, 5, 6, 4,
         CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_INVALID_VALUE},
        {"ld of D < rows", CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, 4, 5, 6, 3,
         CUBLASLT_EPILOGUE_DEFAULT, CUBLAS_STATUS_INVALID_VALUE},
        {"BIAS without a pointer", CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, 4, 5, 6, 4,
         CUBLASLT_EPILOGUE_BIAS, CUBLAS_STATUS_INVALID_VALUE},
        {"GELU epilogue (not emulated)", CUBLAS_COMPUTE_32F, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, CUDA_R_16BF, 4, 5, 6,
         4, CUBLASLT_EPILOGUE_GELU, CUBLAS_STATUS_NOT_SUPPORTED},
    };
    int ok = 0;
    for (auto &c : cases) {
        cublasLtMatmulDesc_t desc;
        LT(cublasLtMatmulDescCreate(&desc, c.compute, CUDA_R_32F));
        LT(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &c.epilogue, sizeof(c.epilogue)));
        cublasLtMatrixLayout_t la, lb, lc, ld;
        LT(cublasLtMatrixLayoutCreate(&la, c.a, 4, 6, 4));  // A: m x k = 4 x 6 (N)
        LT(cublasLtMatrixLayoutCreate(&lb, c.b, 6, 5, 6));  // B: k x n = 6 x 5
        LT(cublasLtMatrixLayoutCreate(&lc, c.c, c.m, c.n, 4));
        LT(cublasLtMatrixLayoutCreate(&ld, c.dd, c.m, c.n, c.ldd));
        cublasStatus_t s = cublasLtMatmul(h, desc, &one, base, la, base + 4096, lb, &zero, base + 8192, lc,
                                          base + 8192, ld, nullptr, nullptr, 0, 0);
        CHECK(s == c.want, "%s: status %s, want %s", c.what, cublasLtGetStatusName(s), cublasLtGetStatusName(c.want));
        ok += s == c.want;
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatrixLayoutDestroy(ld);
        cublasLtMatmulDescDestroy(desc);
    }
    // Attribute sizes, handles, algorithms and heuristic requests.
    cublasLtMatmulDesc_t desc;
    LT(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    int64_t wrong = 1;
    CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &wrong, sizeof(wrong)) ==
              CUBLAS_STATUS_INVALID_VALUE, "an 8-byte TRANSA (int32_t) accepted");
    cublasLtMatrixLayout_t l;
    LT(cublasLtMatrixLayoutCreate(&l, CUDA_R_32F, 4, 4, 4));
    int32_t ld32 = 4;
    CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_LD, &ld32, sizeof(ld32)) ==
              CUBLAS_STATUS_INVALID_VALUE, "a 4-byte LD (int64_t) accepted");
    CHECK(cublasLtMatmul(nullptr, desc, &one, base, l, base + 4096, l, &zero, base, l, base + 8192, l, nullptr, nullptr,
                         0, 0) == CUBLAS_STATUS_NOT_INITIALIZED, "a null handle accepted");
    cublasLtMatmulAlgo_t foreign;
    memset(&foreign, 0, sizeof(foreign));
    CHECK(cublasLtMatmul(h, desc, &one, base, l, base + 4096, l, &zero, base, l, base + 8192, l, &foreign, nullptr, 0,
                         0) == CUBLAS_STATUS_INVALID_VALUE, "an algorithm the heuristic did not return accepted");
    cublasLtMatmulPreference_t pref;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    cublasLtMatmulHeuristicResult_t res;
    int n = -1;
    CHECK(cublasLtMatmulAlgoGetHeuristic(h, desc, l, l, l, l, pref, 0, &res, &n) == CUBLAS_STATUS_INVALID_VALUE,
          "a request for 0 algorithms accepted");
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulDescDestroy(desc);
    CK(cudaDeviceSynchronize());
    CK(cudaFree(d));
    printf("  cuBLASLt argument checks: %d of %zu combinations return cuBLASLt's status; attribute sizes, null handle, "
           "foreign algorithm, empty request refused\n", ok, sizeof(cases) / sizeof(cases[0]));
}

// Capture one product in a graph, then replay it on new inputs: the replay computes with the values at replay time,
// and each launch counts one cuBLAS call with its FLOPs.
static void test_graph_and_counters(cublasLtHandle_t h) {
    const int m = 8, n = 4, k = 16;
    Mat A = make(CUDA_R_16BF, k, m, 0, 1, 0), B = make(CUDA_R_16BF, k, n, 0, 1, 0);  // op(A) = A^T
    void *dA = upload(A), *dB = upload(B), *dD;
    CK(cudaMalloc(&dD, m * n * 2));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cublasLtMatmulDesc_t desc = make_desc(CUBLAS_COMPUTE_32F, CUBLAS_OP_T, CUBLAS_OP_N, nullptr);
    Mat D{CUDA_R_16BF, m, n, m, 1, (long long)m * n, {}};
    cublasLtMatrixLayout_t la = layout(A), lb = layout(B), ld = layout(D);
    float one = 1.0f, zero = 0.0f;
    emu_counters_reset();
    cudaGraph_t g;
    cudaGraphExec_t x;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    LT(cublasLtMatmul(h, desc, &one, dA, la, dB, lb, &zero, dD, ld, dD, ld, nullptr, nullptr, 0, s));
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&x, g, 0));
    std::vector<float> twice = A.v;
    for (auto &v : twice) v *= 2.0f;  // exact in BF16
    Mat A2 = A;
    A2.v = twice;
    void *dA2 = upload(A2);
    CK(cudaMemcpy(dA, dA2, A.v.size() * 2, cudaMemcpyDeviceToDevice));
    CK(cudaGraphLaunch(x, s));
    CK(cudaStreamSynchronize(s));
    std::vector<float> got = download(dD, CUDA_R_16BF, (size_t)m * n);
    int bad = 0;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            double acc = 0.0;
            for (int p = 0; p < k; p++) acc += (double)twice[p + (size_t)i * k] * B.v[p + (size_t)j * k];
            bad += fabs(got[i + (size_t)j * m] - acc) > ldexp(fabs(acc), -8) + 1e-6;
        }
    CHECK(bad == 0, "graph replay: %d of %d outputs not from the inputs at replay time", bad, m * n);
    EmuCounters c;
    emu_counters_get(&c);
    CHECK(c.cublas_calls == 1 && c.cublas_flops == 2ull * m * n * k, "counters: %llu calls, %llu FLOPs (want 1, %d)",
          (unsigned long long)c.cublas_calls, (unsigned long long)c.cublas_flops, 2 * m * n * k);
    CHECK(c.cublas_bytes_written == (uint64_t)m * n * 2, "BF16 output counted as %llu bytes, want %d",
          (unsigned long long)c.cublas_bytes_written, m * n * 2);
    CK(cudaGraphExecDestroy(x));
    CK(cudaGraphDestroy(g));
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(desc);
    CK(cudaStreamDestroy(s));
    CK(cudaFree(dA));
    CK(cudaFree(dA2));
    CK(cudaFree(dB));
    CK(cudaFree(dD));
    printf("  capture and replay: the replay reads the inputs of its time; counters: 1 call, 2 m n k FLOPs, 2-byte "
           "BF16 elements\n");
}

// ---- Misuse, each in a child process -----------------------------------------------------------------------

static void misuse_extent(void) {
    cublasLtHandle_t h;
    cublasLtCreate(&h);
    void *d;
    cudaMalloc(&d, 64 * 2);
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatrixLayout_t big, small;
    cublasLtMatrixLayoutCreate(&big, CUDA_R_16BF, 8, 8, 9);  // 8 columns of leading dimension 9: 71 elements > 64
    cublasLtMatrixLayoutCreate(&small, CUDA_R_16BF, 8, 8, 8);
    void *o;
    cudaMalloc(&o, 64 * 2 * 2);
    float one = 1.0f, zero = 0.0f;
    cublasLtMatmul(h, desc, &one, d, big, o, small, &zero, (char *)o + 128, small, (char *)o + 128, small, nullptr,
                   nullptr, 0, 0);
    cudaDeviceSynchronize();
}

static void misuse_overlap(void) {
    cublasLtHandle_t h;
    cublasLtCreate(&h);
    void *d;
    cudaMalloc(&d, 4096);
    cublasLtMatmulDesc_t desc;
    cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasLtMatrixLayout_t l;
    cublasLtMatrixLayoutCreate(&l, CUDA_R_16BF, 8, 8, 8);
    float one = 1.0f, zero = 0.0f;
    cublasLtMatmul(h, desc, &one, d, l, (char *)d + 1024, l, &zero, (char *)d + 64, l, (char *)d + 64, l, nullptr,
                   nullptr, 0, 0);
    cudaDeviceSynchronize();
}

static void expect_report(const char *what, void (*f)(void), const char *needle) {
    int fds[2];
    if (pipe(fds) != 0) {
        CHECK(0, "pipe failed");
        return;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        f();
        _exit(0);  // not reached when the layer reports
    }
    close(fds[1]);
    std::string out;
    char buf[4096];
    ssize_t r;
    while ((r = read(fds[0], buf, sizeof(buf))) > 0) out.append(buf, (size_t)r);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    bool failed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    bool found = out.find(needle) != std::string::npos;
    CHECK(failed && found, "%s: child %s, report %s\n--- child stderr ---\n%s", what, failed ? "failed" : "exited 0",
          found ? "found" : "missing", out.c_str());
    if (failed && found) {
        size_t at = out.find("emu: error");
        size_t eol = out.find('\n', at == std::string::npos ? 0 : at);
        printf("    %-24s -> %s\n", what, out.substr(at == std::string::npos ? 0 : at, eol - at).c_str());
    }
}

int main(void) {
    printf("test_emu_lt: BF16 and cuBLASLt of the CPU execution layer (tests/emu)\n");
    test_conversions();
    cublasLtHandle_t h;
    CHECK(cublasLtCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasLtCreate");
    test_matmul(h);
    test_validation(h);
    test_graph_and_counters(h);
    cublasLtDestroy(h);
    printf("  misuse reports (each in a child process):\n");
    expect_report("A past its allocation", misuse_extent, "matrix A (CUDA_R_16BF, 8 x 8, ld 9");
    expect_report("D overlaps A", misuse_overlap, "overlaps A or B");
    return test_finish("test_emu_lt");
}
