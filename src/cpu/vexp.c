// vexp.c: the attention tiles' row loops, 16 lanes at a time on AVX-512 (chosen at run time) and one at a time
// elsewhere, with the same bits: exp_shifted, y[i] = exp(x[i] - shift), for the probabilities; exp_shifted_sum,
// the same and the row's sum; row_max; row_dot.
//
// Why: the tiled attention takes one exponential per (query, key) pair in the forward and again in the backward,
// about 7% of a reference step at 1 thread as libm calls, which the compiler cannot vectorize; and its per-row
// maximum, sum and dot products, written as one running value, are chains of dependent operations (a 32-key row's
// sum waits 32 times on the adder's latency), about 5% of the step at 1 thread before they had lanes.
//
// THE ROW ORDER of row sums and dot products (exp_shifted_sum, row_dot), which both paths follow, so that the
// result does not depend on the CPU: 16 partial sums p[l], l = 0..15, each starting from +0 and adding the terms
// i = l, l + 16, l + 32, ... in ascending i, one rounding per add (a dot's term a[i] b[i] is rounded before it is
// added: no fma); then the tree p[l] += p[l + h] for h = 8, 4, 2, 1 (l < h); the result is p[0]. The vector path
// adds +0 in the lanes past the row's end, which changes no partial sum: a partial starting from +0 is never -0
// (x + (-x) and +0 + (-0) round to +0 in the default rounding), and p + (+0) = p for every other p. The order
// does not depend on the thread count either (a row is one task's), only on n.
//
// The algorithm (Cephes' expf, evaluated with fused multiply-adds): n = round(d log2 e) with d = x - shift (the
// float subtraction), r = d - n ln2 in two Cody-Waite steps (ln2 = C1 + C2, C1 with 9 significant bits, so n C1 is
// exact for |n| < 2^15 and, with the FMA, r carries one rounding of about 2^-24 |r|, |r| <= ln2 / 2), exp(r) =
// 1 + r + r^2 P(r) with Cephes' degree-5 minimax P (relative error of the approximation about 1e-7 on that
// interval, below one float ulp), and the result p 2^n rounded once, into the subnormals too (vscalefps; ldexpf
// in the scalar twin). The roundings of the Horner steps act on r^2 P(r) <= 0.07 and that of 1 + r is half an ulp,
// so the total stays below 2 ulp of the result (libm's expf: 0.5); measured worst 1.25 ulp. test_cpu_ops checks
// |error| <= 2 ulp against exp in double on every 1031st float of [-104, 89] (and the special values below), and
// the AVX-512 path against the scalar one bit for bit. A probability 2 ulp (2.4e-7 relative) off moves the
// attention's outputs by as much, 40x below the tiled attention's 1e-5 against the double reference and 400x below
// the 1e-4 between the CPU and CUDA backends. Every operation is an IEEE one rounded once (fmaf, rintf, ldexpf, and
// their vector twins), so a run resumed on a CPU without AVX-512 continues with the same bits.
// Range: d < -104 gives +0 exactly (exp(-104) is below half the smallest subnormal), as libm does; d > 89 gives
// +inf; -inf gives +0 (the [PAD] keys), NaN gives NaN.
#include <math.h>
#include <stddef.h>

#include "cpu/ops.h"
#include "cpu_isa.h"

#if defined(__x86_64__) || defined(__i386__)
#define VEXP_X86 1
#include <immintrin.h>

// exp(d) on 16 lanes (the algorithm above); NaN stays NaN.
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp16(__m512 d) {
    const __m512 lo = _mm512_set1_ps(-104.0f), hi = _mm512_set1_ps(89.0f);
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
    const __m512 p0 = _mm512_set1_ps(1.9875691500e-4f), p1 = _mm512_set1_ps(1.3981999507e-3f);
    const __m512 p2 = _mm512_set1_ps(8.3334519073e-3f), p3 = _mm512_set1_ps(4.1665795894e-2f);
    const __m512 p4 = _mm512_set1_ps(1.6666665459e-1f), p5 = _mm512_set1_ps(5.0000001201e-1f);
    const __m512 one = _mm512_set1_ps(1.0f);
    __mmask16 nan = _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
    __m512 dc = _mm512_min_ps(_mm512_max_ps(d, lo), hi);
    __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(dc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(fn, c1, dc);
    r = _mm512_fnmadd_ps(fn, c2, r);
    __m512 p = _mm512_fmadd_ps(p0, r, p1);
    p = _mm512_fmadd_ps(p, r, p2);
    p = _mm512_fmadd_ps(p, r, p3);
    p = _mm512_fmadd_ps(p, r, p4);
    p = _mm512_fmadd_ps(p, r, p5);
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, one));  // 1 + r + r^2 P(r)
    __m512 e = _mm512_scalef_ps(p, fn);
    return _mm512_mask_mov_ps(e, nan, d);  // NaN stays NaN (min/max would have clamped it)
}

// The lanes of the last (partial) group of a row of n from i on.
static inline __attribute__((always_inline, target("avx512f"))) __mmask16 row_mask(int n, int i) {
    return n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
}

// THE ROW ORDER's tree over the 16 partial sums: p[l] += p[l + 8], then + p[l + 4], + p[l + 2], + p[l + 1].
static inline __attribute__((always_inline, target("avx512f"))) float tree_sum16(__m512 p) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(p), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

__attribute__((target("avx512f"))) static void exp_shifted_avx512(float *y, const float *x, float shift, int n) {
    const __m512 vshift = _mm512_set1_ps(shift);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = row_mask(n, i);
        _mm512_mask_storeu_ps(y + i, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vshift)));
    }
}

__attribute__((target("avx512f"))) static float exp_shifted_sum_avx512(float *y, const float *x, float shift,
                                                                      const float *mult, int n) {
    const __m512 vshift = _mm512_set1_ps(shift);
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = row_mask(n, i);
        __m512 e = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vshift)));
        sum = _mm512_add_ps(sum, e);
        if (mult) e = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(k, mult + i));
        _mm512_mask_storeu_ps(y + i, k, e);
    }
    return tree_sum16(sum);
}

// Lane-wise "b if b > a, else a", the running maximum's step (a NaN b is skipped, as the scalar loop skips it).
static inline __attribute__((always_inline, target("avx512f"))) __m512 max_step16(__m512 a, __m512 b) {
    return _mm512_mask_mov_ps(a, _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ), b);
}

__attribute__((target("avx512f"))) static float row_max_avx512(const float *x, int n) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 m = ninf;
    for (int i = 0; i < n; i += 16) m = max_step16(m, _mm512_mask_loadu_ps(ninf, row_mask(n, i), x + i));
    // The same tree as the sums, with the maximum's step for the add.
    float p[16];
    _mm512_storeu_ps(p, m);
    for (int h = 8; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) p[l] = p[l + h] > p[l] ? p[l + h] : p[l];
    return p[0];
}

__attribute__((target("avx512f"))) static float row_sum_avx512(const float *x, int n) {
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(row_mask(n, i), x + i));
    return tree_sum16(sum);
}

__attribute__((target("avx512f"))) static float row_dot_avx512(const float *a, const float *b, int n) {
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = row_mask(n, i);
        sum = _mm512_add_ps(sum, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i)));
    }
    return tree_sum16(sum);
}
#endif

static int use_avx512(void) { return cpu_isa_supported(CPU_ISA_AVX512F); }

// The algorithm one value at a time, each operation as its vector twin rounds it (no contraction in ISO C; the
// FMAs are fmaf's).
static float exp_one(float x, float shift) {
    float d = x - shift;
    if (d != d) return d;
    float dc = d < -104.0f ? -104.0f : d > 89.0f ? 89.0f : d;
    float t = dc * 1.44269504088896341f;
    float fn = rintf(t);  // to nearest, ties to even (the default rounding), as vroundscaleps
    float r = fmaf(-fn, 0.693359375f, dc);
    r = fmaf(-fn, -2.12194440e-4f, r);
    float p = fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    float pr = p * r, r1 = r + 1.0f;
    p = fmaf(pr, r, r1);
    return ldexpf(p, (int)fn);
}

void exp_shifted_scalar(float *y, const float *x, float shift, int n) {
    for (int i = 0; i < n; i++) y[i] = exp_one(x[i], shift);
}

// THE ROW ORDER's tree over the partial sums p[16].
static float tree_sum(float *p) {
    for (int h = 8; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) p[l] += p[l + h];
    return p[0];
}

float exp_shifted_sum_scalar(float *y, const float *x, float shift, const float *mult, int n) {
    float p[16] = {0};
    for (int i = 0; i < n; i++) {
        float e = exp_one(x[i], shift);
        p[i % 16] += e;
        y[i] = mult ? e * mult[i] : e;
    }
    return tree_sum(p);
}

float row_max_scalar(const float *x, int n) {
    float p[16];
    for (int l = 0; l < 16; l++) p[l] = -INFINITY;
    for (int i = 0; i < n; i++) p[i % 16] = x[i] > p[i % 16] ? x[i] : p[i % 16];
    for (int h = 8; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) p[l] = p[l + h] > p[l] ? p[l + h] : p[l];
    return p[0];
}

float row_sum_scalar(const float *x, int n) {
    float p[16] = {0};
    for (int i = 0; i < n; i++) p[i % 16] += x[i];
    return tree_sum(p);
}

float row_dot_scalar(const float *a, const float *b, int n) {
    float p[16] = {0};
    for (int i = 0; i < n; i++) {
        float t = a[i] * b[i];  // rounded, then added (ISO C contracts nothing)
        p[i % 16] += t;
    }
    return tree_sum(p);
}

void exp_shifted(float *y, const float *x, float shift, int n) {
#ifdef VEXP_X86
    if (use_avx512()) {
        exp_shifted_avx512(y, x, shift, n);
        return;
    }
#endif
    exp_shifted_scalar(y, x, shift, n);
}

float exp_shifted_sum(float *y, const float *x, float shift, const float *mult, int n) {
#ifdef VEXP_X86
    if (use_avx512()) return exp_shifted_sum_avx512(y, x, shift, mult, n);
#endif
    return exp_shifted_sum_scalar(y, x, shift, mult, n);
}

float row_max(const float *x, int n) {
#ifdef VEXP_X86
    if (use_avx512()) return row_max_avx512(x, n);
#endif
    return row_max_scalar(x, n);
}

float row_sum(const float *x, int n) {
#ifdef VEXP_X86
    if (use_avx512()) return row_sum_avx512(x, n);
#endif
    return row_sum_scalar(x, n);
}

float row_dot(const float *a, const float *b, int n) {
#ifdef VEXP_X86
    if (use_avx512()) return row_dot_avx512(a, b, n);
#endif
    return row_dot_scalar(a, b, n);
}

int exp_shifted_vectorized(void) { return use_avx512(); }
