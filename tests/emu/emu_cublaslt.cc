// emu_cublaslt.cc (tests/emu): cuBLASLt's matmul emulated from its definition (cublasLt.h of the layer):
//   D = epilogue(alpha op(A) op(B) + beta C)    (column-major; op = N or T; BIAS adds bias[row] to every column)
// with A, B of type FP32 or BF16 and C, D of type FP32 or BF16 under CUBLAS_COMPUTE_32F and an FP32 scale (and FP32
// matrices under the TF32 and BF16 "fast" compute types, whose inputs are rounded first), strided batches, and the
// argument checks cuBLASLt makes: a combination of types it does not offer is CUBLAS_STATUS_NOT_SUPPORTED, shapes
// that do not fit together or leading dimensions below the row count are CUBLAS_STATUS_INVALID_VALUE. What the
// hardware would turn into undefined behaviour (an operand outside its allocation, D overlapping A or B, a bias
// that is not device memory) is reported and aborts, as everywhere in the layer.
//
// Arithmetic: each product of op(A) and op(B) elements is exact in double (BF16 x BF16 has 16 significant bits,
// FP32 x FP32 48), the k products are summed in double and alpha acc + beta C + bias is rounded once to float (the
// scale type), then to D's type (round to nearest even for BF16). The device sums in FP32 in an order of its own,
// so its result differs from this one by the FP32 rounding of the sum (about k ulp of FP32 at worst, in practice
// sqrt(k)); when D is BF16 that difference decides a rounding only where the exact value lies that close to a
// rounding boundary of BF16.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "cublasLt.h"
#include "cuda_bf16.h"
#include "emu_internal.h"

using emu_internal::describe;
using emu_internal::fail;
using emu_internal::warn;

namespace {

struct LtHandle {};
struct LtLayout {
    cudaDataType type = CUDA_R_32F;
    int32_t order = CUBLASLT_ORDER_COL;
    uint64_t rows = 0, cols = 0;
    int64_t ld = 0;
    int32_t batch = 1;
    int64_t stride = 0;
};
struct LtDesc {
    cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    cudaDataType scale = CUDA_R_32F;
    int32_t pointer_mode = CUBLASLT_POINTER_MODE_HOST;
    int32_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N, transc = CUBLAS_OP_N;
    uint32_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    const void *bias = nullptr;
    int64_t bias_stride = 0;
    int32_t bias_type = -1;
};
struct LtPref {
    uint32_t search = 0;
    uint64_t max_workspace = 0;
};

std::set<LtHandle *> g_lt_handles;
std::set<LtLayout *> g_lt_layouts;
std::set<LtDesc *> g_lt_descs;
std::set<LtPref *> g_lt_prefs;

// The algorithm the heuristic hands out (its data[0]): an algo from elsewhere is refused.
const uint64_t ALGO_MAGIC = 0x656d752d6c742d31ull;  // "emu-lt-1"

LtHandle *handle_of(cublasLtHandle_t h) {
    LtHandle *p = (LtHandle *)h;
    return p && g_lt_handles.count(p) ? p : nullptr;
}
LtLayout *layout_of(cublasLtMatrixLayout_t l) {
    LtLayout *p = (LtLayout *)l;
    return p && g_lt_layouts.count(p) ? p : nullptr;
}
LtDesc *desc_of(cublasLtMatmulDesc_t d) {
    LtDesc *p = (LtDesc *)d;
    return p && g_lt_descs.count(p) ? p : nullptr;
}

size_t type_bytes(cudaDataType t) {
    switch (t) {
    case CUDA_R_32F: return 4;
    case CUDA_R_16BF: return 2;
    case CUDA_R_16F: return 2;
    default: return 0;
    }
}

const char *type_name(cudaDataType t) {
    switch (t) {
    case CUDA_R_32F: return "CUDA_R_32F";
    case CUDA_R_16BF: return "CUDA_R_16BF";
    case CUDA_R_16F: return "CUDA_R_16F";
    default: return "another cudaDataType";
    }
}

// Sets *dst from buf when sizeInBytes is the attribute's size, as cuBLASLt checks it.
template <typename T>
cublasStatus_t set_attr(T *dst, const void *buf, size_t size) {
    if (!buf || size != sizeof(T)) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(dst, buf, sizeof(T));
    return CUBLAS_STATUS_SUCCESS;
}

// How op(A) and op(B) feed the FP32 accumulator under a compute type (0 if the combination is not offered).
enum InputRounding { IN_NONE = 1, IN_TF32, IN_BF16 };
int input_rounding(cublasComputeType_t compute, cudaDataType ab, cudaDataType cd, cudaDataType scale) {
    if (scale != CUDA_R_32F) return 0;
    bool f32 = ab == CUDA_R_32F && cd == CUDA_R_32F;
    bool bf16 = ab == CUDA_R_16BF && (cd == CUDA_R_16BF || cd == CUDA_R_32F);
    switch (compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC: return f32 || bf16 ? IN_NONE : 0;
    case CUBLAS_COMPUTE_32F_FAST_TF32: return f32 ? IN_TF32 : 0;
    case CUBLAS_COMPUTE_32F_FAST_16BF: return f32 ? IN_BF16 : 0;
    default: return 0;
    }
}

float tf32_round(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;
    u += 0x1000u + ((u >> 13) & 1u);
    u &= ~0x1fffu;
    memcpy(&x, &u, 4);
    return x;
}

double load(const void *base, cudaDataType t, size_t i, int rounding) {
    float v;
    if (t == CUDA_R_16BF) {
        v = __bfloat162float(((const __nv_bfloat16 *)base)[i]);
    } else {
        v = ((const float *)base)[i];
        if (rounding == IN_TF32) v = tf32_round(v);
        if (rounding == IN_BF16) v = __bfloat162float(__float2bfloat16_rn(v));
    }
    return (double)v;
}

void store(void *base, cudaDataType t, size_t i, float v) {
    if (t == CUDA_R_16BF)
        ((__nv_bfloat16 *)base)[i] = __float2bfloat16_rn(v);
    else
        ((float *)base)[i] = v;
}

// Elements a layout's batches span, from the lowest to the highest address they touch.
struct Span {
    const char *lo;
    size_t bytes;
};
Span span_of(const void *p, const LtLayout &l) {
    size_t es = type_bytes(l.type);
    size_t one = l.rows == 0 || l.cols == 0 ? 0 : (size_t)((l.cols - 1) * (uint64_t)l.ld + l.rows);
    long long last = l.stride * (long long)(l.batch - 1);
    long long first = std::min(0ll, last);
    last = std::max(0ll, last);
    return Span{(const char *)p + first * (long long)es, one == 0 ? 0 : ((size_t)(last - first) + one) * es};
}

void check_inside(const char *name, const void *p, const LtLayout &l) {
    Span s = span_of(p, l);
    if (s.bytes == 0) return;
    if (!emu_internal::is_device_range(s.lo, s.bytes))
        fail("cublasLtMatmul: matrix %s (%s, %llu x %llu, ld %lld, %d batch%s, stride %lld) spans [%p, +%zu bytes) "
             "outside one live device allocation: %s", name, type_name(l.type), (unsigned long long)l.rows,
             (unsigned long long)l.cols, (long long)l.ld, l.batch, l.batch == 1 ? "" : "es", (long long)l.stride,
             (const void *)s.lo, s.bytes, describe(s.lo).c_str());
}

bool overlap(Span a, Span b) { return a.bytes && b.bytes && a.lo < b.lo + b.bytes && b.lo < a.lo + a.bytes; }

// The checks cuBLASLt makes before it runs (or answers a heuristic query): CUBLAS_STATUS_SUCCESS when the product
// can run. `why` receives the reason otherwise.
cublasStatus_t validate(const LtDesc &d, const LtLayout &a, const LtLayout &b, const LtLayout &c, const LtLayout &dd,
                        std::string *why) {
    char buf[512];
    auto no = [&](cublasStatus_t s, const char *fmt, auto... args) {
        snprintf(buf, sizeof(buf), fmt, args...);
        *why = buf;
        return s;
    };
    if (d.pointer_mode != CUBLASLT_POINTER_MODE_HOST)
        return no(CUBLAS_STATUS_NOT_SUPPORTED, "device pointer mode is not emulated");
    auto op_ok = [](int32_t t) { return t == CUBLAS_OP_N || t == CUBLAS_OP_T; };
    if (!op_ok(d.transa) || !op_ok(d.transb)) return no(CUBLAS_STATUS_NOT_SUPPORTED, "transa/transb must be N or T");
    if (d.transc != CUBLAS_OP_N) return no(CUBLAS_STATUS_NOT_SUPPORTED, "transc must be CUBLAS_OP_N");
    for (const LtLayout *l : {&a, &b, &c, &dd})
        if (l->order != CUBLASLT_ORDER_COL)
            return no(CUBLAS_STATUS_NOT_SUPPORTED, "only CUBLASLT_ORDER_COL layouts are emulated");
    if (a.type != b.type) return no(CUBLAS_STATUS_NOT_SUPPORTED, "A is %s, B %s", type_name(a.type), type_name(b.type));
    if (c.type != dd.type) return no(CUBLAS_STATUS_NOT_SUPPORTED, "C is %s, D %s", type_name(c.type), type_name(dd.type));
    if (!input_rounding(d.compute, a.type, dd.type, d.scale))
        return no(CUBLAS_STATUS_NOT_SUPPORTED, "compute type %d, scale %s with A/B %s and C/D %s is not a cuBLASLt "
                  "combination", (int)d.compute, type_name(d.scale), type_name(a.type), type_name(dd.type));
    uint64_t m = d.transa == CUBLAS_OP_N ? a.rows : a.cols, k = d.transa == CUBLAS_OP_N ? a.cols : a.rows;
    uint64_t kb = d.transb == CUBLAS_OP_N ? b.rows : b.cols, n = d.transb == CUBLAS_OP_N ? b.cols : b.rows;
    if (k != kb) return no(CUBLAS_STATUS_INVALID_VALUE, "op(A) has %llu columns, op(B) %llu rows", (unsigned long long)k,
                           (unsigned long long)kb);
    if (c.rows != m || c.cols != n || dd.rows != m || dd.cols != n)
        return no(CUBLAS_STATUS_INVALID_VALUE, "C is %llu x %llu and D %llu x %llu, op(A) op(B) is %llu x %llu",
                  (unsigned long long)c.rows, (unsigned long long)c.cols, (unsigned long long)dd.rows,
                  (unsigned long long)dd.cols, (unsigned long long)m, (unsigned long long)n);
    for (const LtLayout *l : {&a, &b, &c, &dd})
        if (l->ld < (int64_t)std::max<uint64_t>(1, l->rows))
            return no(CUBLAS_STATUS_INVALID_VALUE, "leading dimension %lld below the %llu rows", (long long)l->ld,
                      (unsigned long long)l->rows);
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX)
        return no(CUBLAS_STATUS_NOT_SUPPORTED, "dimensions beyond int32_t are not emulated");
    if (a.batch < 1 || a.batch != b.batch || a.batch != c.batch || a.batch != dd.batch)
        return no(CUBLAS_STATUS_INVALID_VALUE, "batch counts %d, %d, %d, %d must be equal and positive", a.batch,
                  b.batch, c.batch, dd.batch);
    if (d.epilogue != CUBLASLT_EPILOGUE_DEFAULT && d.epilogue != CUBLASLT_EPILOGUE_BIAS)
        return no(CUBLAS_STATUS_NOT_SUPPORTED, "epilogue %u is not emulated (DEFAULT and BIAS are)", d.epilogue);
    if (d.epilogue == CUBLASLT_EPILOGUE_BIAS) {
        if (d.bias_type != -1 && d.bias_type != (int32_t)dd.type)
            return no(CUBLAS_STATUS_NOT_SUPPORTED, "the bias must have D's type (%s) here", type_name(dd.type));
        if (!d.bias) return no(CUBLAS_STATUS_INVALID_VALUE, "the BIAS epilogue without CUBLASLT_MATMUL_DESC_BIAS_POINTER");
    }
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

cublasStatus_t emu_cublasLtCreate(cublasLtHandle_t *handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    LtHandle *h = new LtHandle();
    g_lt_handles.insert(h);
    *handle = (cublasLtHandle_t)h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtDestroy(cublasLtHandle_t handle) {
    LtHandle *h = handle_of(handle);
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    g_lt_handles.erase(h);
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}

const char *emu_cublasLtGetStatusName(cublasStatus_t s) { return cublasGetStatusName(s); }
const char *emu_cublasLtGetStatusString(cublasStatus_t s) { return cublasGetStatusString(s); }

cublasStatus_t emu_cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *desc, cublasComputeType_t compute,
                                            cudaDataType_t scale) {
    if (!desc) return CUBLAS_STATUS_INVALID_VALUE;
    LtDesc *d = new LtDesc();
    d->compute = compute;
    d->scale = scale;
    g_lt_descs.insert(d);
    *desc = (cublasLtMatmulDesc_t)d;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t desc) {
    LtDesc *d = desc_of(desc);
    if (!d) return CUBLAS_STATUS_INVALID_VALUE;
    g_lt_descs.erase(d);
    delete d;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                                  const void *buf, size_t size) {
    LtDesc *d = desc_of(desc);
    if (!d) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: {
        int32_t v;
        cublasStatus_t s = set_attr(&v, buf, size);
        if (s == CUBLAS_STATUS_SUCCESS) d->compute = (cublasComputeType_t)v;
        return s;
    }
    case CUBLASLT_MATMUL_DESC_SCALE_TYPE: {
        int32_t v;
        cublasStatus_t s = set_attr(&v, buf, size);
        if (s == CUBLAS_STATUS_SUCCESS) d->scale = (cudaDataType)v;
        return s;
    }
    case CUBLASLT_MATMUL_DESC_POINTER_MODE: return set_attr(&d->pointer_mode, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSA: return set_attr(&d->transa, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSB: return set_attr(&d->transb, buf, size);
    case CUBLASLT_MATMUL_DESC_TRANSC: return set_attr(&d->transc, buf, size);
    case CUBLASLT_MATMUL_DESC_EPILOGUE: return set_attr(&d->epilogue, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return set_attr(&d->bias, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE: return set_attr(&d->bias_stride, buf, size);
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return set_attr(&d->bias_type, buf, size);
    default:
        warn("error: cublasLtMatmulDescSetAttribute: attribute %d is not emulated", (int)attr);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
}

cublasStatus_t emu_cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *layout, cudaDataType type, uint64_t rows,
                                              uint64_t cols, int64_t ld) {
    if (!layout) return CUBLAS_STATUS_INVALID_VALUE;
    LtLayout *l = new LtLayout();
    l->type = type;
    l->rows = rows;
    l->cols = cols;
    l->ld = ld;
    g_lt_layouts.insert(l);
    *layout = (cublasLtMatrixLayout_t)l;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t layout) {
    LtLayout *l = layout_of(layout);
    if (!l) return CUBLAS_STATUS_INVALID_VALUE;
    g_lt_layouts.erase(l);
    delete l;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr,
                                                    const void *buf, size_t size) {
    LtLayout *l = layout_of(layout);
    if (!l) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_TYPE: {
        uint32_t v;
        cublasStatus_t s = set_attr(&v, buf, size);
        if (s == CUBLAS_STATUS_SUCCESS) l->type = (cudaDataType)v;
        return s;
    }
    case CUBLASLT_MATRIX_LAYOUT_ORDER: return set_attr(&l->order, buf, size);
    case CUBLASLT_MATRIX_LAYOUT_ROWS: return set_attr(&l->rows, buf, size);
    case CUBLASLT_MATRIX_LAYOUT_COLS: return set_attr(&l->cols, buf, size);
    case CUBLASLT_MATRIX_LAYOUT_LD: return set_attr(&l->ld, buf, size);
    case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: return set_attr(&l->batch, buf, size);
    case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: return set_attr(&l->stride, buf, size);
    default:
        warn("error: cublasLtMatrixLayoutSetAttribute: attribute %d is not emulated", (int)attr);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
}

cublasStatus_t emu_cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) {
    if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
    LtPref *p = new LtPref();
    g_lt_prefs.insert(p);
    *pref = (cublasLtMatmulPreference_t)p;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    LtPref *p = (LtPref *)pref;
    if (!p || !g_lt_prefs.count(p)) return CUBLAS_STATUS_INVALID_VALUE;
    g_lt_prefs.erase(p);
    delete p;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                        cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                        size_t size) {
    LtPref *p = (LtPref *)pref;
    if (!p || !g_lt_prefs.count(p)) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATMUL_PREF_SEARCH_MODE: return set_attr(&p->search, buf, size);
    case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return set_attr(&p->max_workspace, buf, size);
    default:
        warn("error: cublasLtMatmulPreferenceSetAttribute: attribute %d is not emulated", (int)attr);
        return CUBLAS_STATUS_INVALID_VALUE;
    }
}

// One algorithm, needing no workspace, for every product the emulation can run.
cublasStatus_t emu_cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                  cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                                  cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                                  cublasLtMatmulPreference_t pref, int requested,
                                                  cublasLtMatmulHeuristicResult_t results[], int *returned) {
    if (!handle_of(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    LtDesc *d = desc_of(desc);
    LtLayout *a = layout_of(Adesc), *b = layout_of(Bdesc), *c = layout_of(Cdesc), *dd = layout_of(Ddesc);
    if (!d || !a || !b || !c || !dd || !pref || !g_lt_prefs.count((LtPref *)pref) || !results || !returned)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (requested <= 0) return CUBLAS_STATUS_INVALID_VALUE;
    std::string why;
    cublasStatus_t s = validate(*d, *a, *b, *c, *dd, &why);
    if (s != CUBLAS_STATUS_SUCCESS) {
        *returned = 0;
        return s == CUBLAS_STATUS_INVALID_VALUE ? s : CUBLAS_STATUS_NOT_SUPPORTED;
    }
    memset(&results[0], 0, sizeof(results[0]));
    results[0].algo.data[0] = ALGO_MAGIC;
    results[0].workspaceSize = 0;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasLtMatmul(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void *alpha, const void *A,
                                  cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                                  const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                                  cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *workspace,
                                  size_t workspace_bytes, cudaStream_t stream) {
    if (!handle_of(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    LtDesc *dp = desc_of(desc);
    LtLayout *ap = layout_of(Adesc), *bp = layout_of(Bdesc), *cp = layout_of(Cdesc), *dl = layout_of(Ddesc);
    if (!dp || !ap || !bp || !cp || !dl || !alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    if (algo && algo->data[0] != ALGO_MAGIC) {
        warn("error: cublasLtMatmul: the algorithm was not returned by cublasLtMatmulAlgoGetHeuristic");
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    std::string why;
    cublasStatus_t st = validate(*dp, *ap, *bp, *cp, *dl, &why);
    if (st != CUBLAS_STATUS_SUCCESS) {
        warn("error: cublasLtMatmul: %s (%s)", why.c_str(), cublasGetStatusName(st));
        return st;
    }
    if (workspace_bytes > 0 && !emu_internal::is_device_range(workspace, workspace_bytes))
        fail("cublasLtMatmul: workspace [%p, +%zu bytes) is not inside one live device allocation: %s", workspace,
             workspace_bytes, describe(workspace).c_str());
    // Descriptors may be changed or destroyed once the call returns: the product runs from copies.
    const LtDesc d = *dp;
    const LtLayout a = *ap, b = *bp, c = *cp, dd = *dl;
    float al = *(const float *)alpha, be = *(const float *)beta;  // host pointer mode: read at the call
    int m = (int)dd.rows, n = (int)dd.cols, k = (int)(d.transa == CUBLAS_OP_N ? a.cols : a.rows);
    bool reads_ab = k > 0 && al != 0.0f, reads_c = be != 0.0f;
    if (reads_ab) {
        check_inside("A", A, a);
        check_inside("B", B, b);
    }
    if (reads_c) check_inside("C", C, c);
    check_inside("D", D, dd);
    Span sd = span_of(D, dd);
    if (reads_ab && (overlap(sd, span_of(A, a)) || overlap(sd, span_of(B, b))))
        fail("cublasLtMatmul: D [%p, +%zu bytes) overlaps A or B; the product reads them while it writes D", D,
             sd.bytes);
    if (reads_c && C != D && overlap(sd, span_of(C, c)))
        fail("cublasLtMatmul: D overlaps C without being C (in place needs C == D with one layout)");
    size_t es_d = type_bytes(dd.type);
    if (d.epilogue == CUBLASLT_EPILOGUE_BIAS) {
        long long bias_last = d.bias_stride * (long long)(dd.batch - 1);
        if (!emu_internal::is_device_range(d.bias, ((size_t)bias_last + (size_t)m) * es_d))
            fail("cublasLtMatmul: the bias (%d elements of %s per batch) is not inside one live device allocation: %s",
                 m, type_name(dd.type), describe(d.bias).c_str());
    }
    int batch = dd.batch;
    uint64_t flops = 2ull * (uint64_t)m * n * k * batch;
    uint64_t rd = (uint64_t)batch * ((reads_ab ? type_bytes(a.type) * ((uint64_t)m * k + (uint64_t)k * n) : 0) +
                                     (reads_c ? es_d * (uint64_t)m * n : 0));
    uint64_t wr = (uint64_t)batch * es_d * (uint64_t)m * n;
    char family[32];
    snprintf(family, sizeof(family), "lt_%s_%s", a.type == CUDA_R_16BF ? "bf16" : "f32",
             dd.type == CUDA_R_16BF ? "bf16" : "f32");
    std::string key = emu_internal::gemm_called(family, d.transa == CUBLAS_OP_N ? 'N' : 'T',
                                                d.transb == CUBLAS_OP_N ? 'N' : 'T', m, n, k, batch, flops, rd, wr);
    int rounding = input_rounding(d.compute, a.type, dd.type, d.scale);
    bool ok = emu_internal::enqueue_on(stream, "cublasLtMatmul", [=] {
        emu_internal::gemm_executed(key, flops, rd, wr);
        size_t ea = type_bytes(a.type);
        std::vector<double> ap2((size_t)m * k), bp2((size_t)n * k);  // op(A) by rows, op(B) by columns
        for (int bi = 0; bi < batch; bi++) {
            const char *Ab = (const char *)A + (long long)bi * a.stride * (long long)ea;
            const char *Bb = (const char *)B + (long long)bi * b.stride * (long long)ea;
            const char *Cb = (const char *)C + (long long)bi * c.stride * (long long)es_d;
            char *Db = (char *)D + (long long)bi * dd.stride * (long long)es_d;
            const char *bias = (const char *)d.bias + (long long)bi * d.bias_stride * (long long)es_d;
            if (reads_ab) {
                for (int i = 0; i < m; i++)
                    for (int p = 0; p < k; p++)
                        ap2[(size_t)i * k + p] = load(Ab, a.type,
                                                      d.transa == CUBLAS_OP_N ? i + (size_t)p * a.ld : p + (size_t)i * a.ld,
                                                      rounding);
                for (int j = 0; j < n; j++)
                    for (int p = 0; p < k; p++)
                        bp2[(size_t)j * k + p] = load(Bb, b.type,
                                                      d.transb == CUBLAS_OP_N ? p + (size_t)j * b.ld : j + (size_t)p * b.ld,
                                                      rounding);
            }
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    double acc = 0.0;
                    if (reads_ab) {
                        const double *x = &ap2[(size_t)i * k], *y = &bp2[(size_t)j * k];
                        for (int p = 0; p < k; p++) acc += x[p] * y[p];
                    }
                    double v = (double)al * acc;
                    // beta == 0: C is not read (it may hold NaN), as BLAS specifies.
                    if (reads_c) v += (double)be * load(Cb, c.type, i + (size_t)j * c.ld, IN_NONE);
                    if (d.epilogue == CUBLASLT_EPILOGUE_BIAS) v += load(bias, dd.type, (size_t)i, IN_NONE);
                    store(Db, dd.type, i + (size_t)j * dd.ld, (float)v);
                }
        }
    });
    return ok ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}

}  // extern "C"
