// cuda_bf16.h (tests/emu): the BF16 type and conversions the kernels use, written from their definition:
// __nv_bfloat16 is the upper 16 bits of an IEEE float (1 sign, 8 exponent, 7 mantissa bits). float -> BF16
// rounds to nearest, ties to even (__float2bfloat16, __float2bfloat16_rn: the device's cvt.rn.bf16.f32) or
// towards zero (__float2bfloat16_rz); a NaN becomes the canonical 0x7fff, as on the device. BF16 -> float is
// exact (the bits shifted up). No implicit conversions: a kernel converts where it means to, so a kernel that
// compiles here does not rely on a conversion the emulator would not have checked.
#ifndef MLM_EMU_CUDA_BF16_H
#define MLM_EMU_CUDA_BF16_H

#include <stdint.h>
#include <string.h>

#ifndef __cplusplus
#error "cuda_bf16.h (emu) is C++; C code holds BF16 values as uint16_t bits"
#endif

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(const __nv_bfloat16_raw &r) : __x(r.x) {}
    operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
static_assert(sizeof(__nv_bfloat16) == 2, "__nv_bfloat16 is two bytes");

struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
static_assert(sizeof(__nv_bfloat162) == 4, "__nv_bfloat162 is four bytes");

typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

static inline uint32_t emu_bf16_float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline __nv_bfloat16 emu_bf16_from_bits(unsigned short b) { return __nv_bfloat16(__nv_bfloat16_raw{b}); }

// Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate (a carry into the exponent
// is the correct rounding up to the next binade, or to infinity past the largest finite BF16).
static inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = emu_bf16_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return emu_bf16_from_bits(0x7fff);
    u += 0x7fffu + ((u >> 16) & 1u);
    return emu_bf16_from_bits((unsigned short)(u >> 16));
}
static inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
static inline __nv_bfloat16 __float2bfloat16_rz(float f) {
    uint32_t u = emu_bf16_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return emu_bf16_from_bits(0x7fff);
    return emu_bf16_from_bits((unsigned short)(u >> 16));
}

static inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.__x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return emu_bf16_from_bits(b); }

static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
static inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
static inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }

#endif
