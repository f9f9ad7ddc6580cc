// vexp.c: exp_shifted, y[i] = exp(x[i] - shift) over a row, for the attention's probabilities: one algorithm,
// 16 lanes at a time on AVX-512 (chosen at run time) and one at a time elsewhere, with the same bits.
//
// Why: the tiled attention takes one exponential per (query, key) pair in the forward and again in the backward,
// about 7% of a reference step at 1 thread as libm calls, which the compiler cannot vectorize.
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

#if defined(__x86_64__) || defined(__i386__)
#define VEXP_X86 1
#include <immintrin.h>

__attribute__((target("avx512f"))) static void exp_shifted_avx512(float *y, const float *x, float shift, int n) {
    const __m512 vshift = _mm512_set1_ps(shift), lo = _mm512_set1_ps(-104.0f), hi = _mm512_set1_ps(89.0f);
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
    const __m512 p0 = _mm512_set1_ps(1.9875691500e-4f), p1 = _mm512_set1_ps(1.3981999507e-3f);
    const __m512 p2 = _mm512_set1_ps(8.3334519073e-3f), p3 = _mm512_set1_ps(4.1665795894e-2f);
    const __m512 p4 = _mm512_set1_ps(1.6666665459e-1f), p5 = _mm512_set1_ps(5.0000001201e-1f);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vshift);
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
        e = _mm512_mask_mov_ps(e, nan, d);  // NaN stays NaN (min/max would have clamped it)
        _mm512_mask_storeu_ps(y + i, k, e);
    }
}
#endif

static int use_avx512(void) {
#ifdef VEXP_X86
    static int chosen = -1;  // a benign race: every thread stores the same value
    if (chosen < 0) chosen = __builtin_cpu_supports("avx512f");
    return chosen;
#else
    return 0;
#endif
}

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

void exp_shifted(float *y, const float *x, float shift, int n) {
#ifdef VEXP_X86
    if (use_avx512()) {
        exp_shifted_avx512(y, x, shift, n);
        return;
    }
#endif
    exp_shifted_scalar(y, x, shift, n);
}

int exp_shifted_vectorized(void) { return use_avx512(); }
