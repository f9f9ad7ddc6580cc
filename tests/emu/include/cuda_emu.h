// cuda_emu.h (tests/emu): the CUDA built-ins for kernels compiled by the host C++ compiler. Force-included
// (-include cuda_emu.h) into every .cu source the emulator builds; the kernel bodies stay unchanged.
//
// Execution model (tests/emu/emu_runtime.cc): the blocks of a launch run one after another (on a pool of OS
// threads in the parallel-blocks build); the threads of a block run as fibers on one OS thread, switched only at
// __syncthreads and the warp collectives, in the order MLM_EMU_ORDER selects (forward, reverse, random). Device
// memory is host memory (so ASan sees device out-of-bounds accesses). `<<<grid, block, shmem, stream>>>` is
// rewritten at build time (tests/emu/rewrite_launch.cmake) into emu::launcher(kernel, "kernel", emu::cfg(grid,
// block, shmem, stream), __FILE__, __LINE__)(args...).
//
// Precision: __fadd_rn/__fsub_rn/__fmul_rn/__fdiv_rn/__fsqrt_rn/__frcp_rn are IEEE round-to-nearest on both
// and never fused. Where the hardware differs: expf/exp/logf/log/__expf use the host libm (the device's expf is
// within 2 ulp, __expf is a fast approximation; the emulator is more accurate); a*b+c written plainly may be
// fused into an FMA by nvcc, but by the emulator only in a build with MLM_EMU_FP_CONTRACT=ON (by default it is
// compiled with -ffp-contract=off); cuBLAS accumulates in double here (FP32 FMA in an unspecified order on the
// device; TF32 inputs are rounded to TF32 as the tensor cores do when the math mode allows it). Denormals are
// kept (the device flushes them only with -ftz=true, which the project does not use).
#ifndef MLM_EMU_CUDA_EMU_H
#define MLM_EMU_CUDA_EMU_H

#ifndef __cplusplus
#error "cuda_emu.h holds the kernel built-ins and is C++; C code includes cuda_runtime.h"
#endif

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
// A kernel parameter the device reads in place from the constant bank; on the CPU it is an ordinary argument.
#define __grid_constant__
// The parallel-blocks build (EMU_PARALLEL_BLOCKS, MLM_EMU_TSAN) runs the blocks of a grid on several OS threads:
// what belongs to a block (its indices, its static shared memory) is then per thread.
#ifdef EMU_PARALLEL_BLOCKS
#define EMU_TLS __thread
#else
#define EMU_TLS
#endif
#ifndef EMU_PARALLEL_BLOCKS
// Static shared memory: blocks run one at a time, so one static instance serves every block in turn. The
// section lets the runtime refill all of it with the NaN pattern at the start of each block.
#define __shared__ static __attribute__((section("emu_shared")))
#else
// One instance per worker thread, serving the blocks it runs in turn (not refilled with the NaN pattern: the
// sequential builds check reads of unwritten shared memory).
#define __shared__ static __thread
#endif

extern "C" {
extern EMU_TLS uint3 emu_threadIdx;
extern EMU_TLS dim3 emu_blockIdx;
extern dim3 emu_blockDim, emu_gridDim;
void emu_syncthreads(const char *file, int line);
uint64_t emu_warp_op(int op, unsigned mask, uint64_t value, int arg, int width, const char *file, int line);
unsigned emu_activemask(void);
void *emu_dynamic_shared(void);
int emu_check_kernel_pointer(const char *kernel, int index, const void *p);
}
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim
static constexpr int warpSize = 32;

// ---- Block barrier and warp collectives (call sites are recorded for the reports) -------------------------
enum { EMU_SHFL_IDX, EMU_SHFL_UP, EMU_SHFL_DOWN, EMU_SHFL_XOR, EMU_BALLOT, EMU_ANY, EMU_ALL, EMU_SYNCWARP };

static inline void __syncthreads(const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu_syncthreads(file, line);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu, const char *file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    (void)emu_warp_op(EMU_SYNCWARP, mask, 0, 0, 32, file, line);
}
static inline unsigned __activemask(void) { return emu_activemask(); }

template <typename T>
static inline uint64_t emu_to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type wider than 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
static inline T emu_from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

#define EMU_SHFL(NAME, OP, ARGT)                                                                               \
    template <typename T>                                                                                      \
    static inline T NAME(unsigned mask, T var, ARGT arg, int width = 32, const char *file = __builtin_FILE(), \
                         int line = __builtin_LINE()) {                                                        \
        return emu_from_bits<T>(emu_warp_op(OP, mask, emu_to_bits(var), (int)arg, width, file, line));         \
    }
EMU_SHFL(__shfl_sync, EMU_SHFL_IDX, int)
EMU_SHFL(__shfl_up_sync, EMU_SHFL_UP, unsigned)
EMU_SHFL(__shfl_down_sync, EMU_SHFL_DOWN, unsigned)
EMU_SHFL(__shfl_xor_sync, EMU_SHFL_XOR, int)
#undef EMU_SHFL

static inline unsigned __ballot_sync(unsigned mask, int pred, const char *file = __builtin_FILE(),
                                     int line = __builtin_LINE()) {
    return (unsigned)emu_warp_op(EMU_BALLOT, mask, pred != 0, 0, 32, file, line);
}
static inline int __any_sync(unsigned mask, int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (int)emu_warp_op(EMU_ANY, mask, pred != 0, 0, 32, file, line);
}
static inline int __all_sync(unsigned mask, int pred, const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    return (int)emu_warp_op(EMU_ALL, mask, pred != 0, 0, 32, file, line);
}

// ---- Memory fences and atomics -----------------------------------------------------------------------------
// Atomics are C11 atomics (GCC's __atomic builtins) on the device word, so that in the parallel-blocks build
// ThreadSanitizer sees how blocks synchronise. The model of CUDA's memory order: every device atomic acquires
// (reads after it see what was published through that word), and it releases (publishes the thread's earlier
// writes) only when the thread executed __threadfence before it. A block that publishes a result and then takes
// a ticket without the fence is reported as a race by the block that reads the result; a reader that relies on
// its atomic and a __syncthreads (the Programming Guide's last-block pattern) is accepted. The threads of a block
// are ordered among themselves by the fiber switches, so __threadfence_block changes nothing. In the sequential
// builds blocks never overlap, and the same code is merely atomic.
extern "C" void emu_threadfence(void);
extern "C" int emu_thread_fenced(void);
static inline void __threadfence(void) { emu_threadfence(); }
static inline void __threadfence_system(void) { emu_threadfence(); }
static inline void __threadfence_block(void) {}
template <typename T>
static inline T __ldg(const T *p) { return *p; }

// old = *p; *p = update(old) as one compare-and-swap loop; returns old.
template <typename T, typename F>
static inline T emu_atomic_update(T *p, F update) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "device atomics on 4- and 8-byte words only");
    bool release = emu_thread_fenced() != 0;
    T old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    for (;;) {
        T next = update(old);
        if (release ? __atomic_compare_exchange(p, &old, &next, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
                    : __atomic_compare_exchange(p, &old, &next, false, __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE))
            return old;
    }
}
template <typename T>
static inline T atomicAdd(T *p, T v) { return emu_atomic_update(p, [v](T o) { return (T)(o + v); }); }
template <typename T>
static inline T atomicSub(T *p, T v) { return emu_atomic_update(p, [v](T o) { return (T)(o - v); }); }
template <typename T>
static inline T atomicExch(T *p, T v) { return emu_atomic_update(p, [v](T) { return v; }); }
template <typename T>
static inline T atomicMax(T *p, T v) { return emu_atomic_update(p, [v](T o) { return v > o ? v : o; }); }
template <typename T>
static inline T atomicMin(T *p, T v) { return emu_atomic_update(p, [v](T o) { return v < o ? v : o; }); }
template <typename T>
static inline T atomicAnd(T *p, T v) { return emu_atomic_update(p, [v](T o) { return (T)(o & v); }); }
template <typename T>
static inline T atomicOr(T *p, T v) { return emu_atomic_update(p, [v](T o) { return (T)(o | v); }); }
template <typename T>
static inline T atomicXor(T *p, T v) { return emu_atomic_update(p, [v](T o) { return (T)(o ^ v); }); }
template <typename T>
static inline T atomicCAS(T *p, T cmp, T v) { return emu_atomic_update(p, [cmp, v](T o) { return o == cmp ? v : o; }); }
// atomicInc / atomicDec with CUDA's wrap-around.
static inline unsigned atomicInc(unsigned *p, unsigned limit) {
    return emu_atomic_update(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
static inline unsigned atomicDec(unsigned *p, unsigned limit) {
    return emu_atomic_update(p, [limit](unsigned o) { return o == 0u || o > limit ? limit : o - 1u; });
}

// ---- Arithmetic intrinsics (see the precision note at the top) -------------------------------------------
// nvcc never fuses an _rn intrinsic into an FMA, neither with the operation that produced its operand nor with
// the one that consumes its result. In a build with contraction on (MLM_EMU_FP_CONTRACT) the host compiler would
// fuse the inlined `a * b` and `+` all the same: emu_rounded makes it materialise a value rounded to its type (an
// empty asm that takes the value in a register and may change it), so each intrinsic rounds on its own there too.
template <typename T>
static inline T emu_rounded(T x) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__("" : "+x"(x));
#elif defined(__aarch64__)
    __asm__("" : "+w"(x));
#else
    __asm__("" : "+m"(x));
#endif
    return x;
}
static inline float __fadd_rn(float a, float b) { return emu_rounded(emu_rounded(a) + emu_rounded(b)); }
static inline float __fsub_rn(float a, float b) { return emu_rounded(emu_rounded(a) - emu_rounded(b)); }
static inline float __fmul_rn(float a, float b) { return emu_rounded(emu_rounded(a) * emu_rounded(b)); }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return emu_rounded(emu_rounded(a) + emu_rounded(b)); }
static inline double __dmul_rn(double a, double b) { return emu_rounded(emu_rounded(a) * emu_rounded(b)); }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
// The device's expf, exp, logf, log and erff are not correctly rounded: within 2, 1, 1, 1 and 2 ulp of the true value
// (CUDA C Programming Guide, "Mathematical Functions"). The build with MLM_EMU_FP_CONTRACT (EMU_DEVICE_MATH)
// moves the host's result (itself within a fraction of an ulp) by a pseudo-random amount inside those bounds,
// fixed by the argument's bits so that two kernels given one argument agree: a test whose tolerance leaves no
// room for the device's exp and log fails there.
#ifdef EMU_DEVICE_MATH
template <typename T>
static inline T emu_ulps_away(T r, T x, int max_ulps) {
    uint64_t h = emu_to_bits(x) * 0x9E3779B97F4A7C15ull;
    int k = (int)((h >> 32) % (uint64_t)(2 * max_ulps + 1)) - max_ulps;
    for (; k > 0; k--) r = nextafter(r, (T)INFINITY);
    for (; k < 0; k++) r = nextafter(r, -(T)INFINITY);
    return r;
}
static inline float emu_device_expf(float x) { return emu_ulps_away(::expf(x), x, 2); }
static inline double emu_device_exp(double x) { return emu_ulps_away(::exp(x), x, 1); }
static inline float emu_device_logf(float x) { return emu_ulps_away(::logf(x), x, 1); }
static inline double emu_device_log(double x) { return emu_ulps_away(::log(x), x, 1); }
static inline float emu_device_erff(float x) { return emu_ulps_away(::erff(x), x, 2); }
#define expf emu_device_expf
#define erff emu_device_erff
#define exp emu_device_exp
#define logf emu_device_logf
#define log emu_device_log
#endif
// glibc declares __expf and __logf itself: the device's fast intrinsics get other names here.
static inline float emu_fast_expf(float a) { return expf(a); }
static inline float emu_fast_logf(float a) { return logf(a); }
#define __expf emu_fast_expf
#define __logf emu_fast_logf
static inline float __fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
static inline float __saturatef(float a) { return a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
static inline float __int_as_float(int x) { return emu_from_bits<float>((uint32_t)x); }
static inline int __float_as_int(float x) { return (int)(uint32_t)emu_to_bits(x); }
static inline float __uint_as_float(unsigned x) { return emu_from_bits<float>(x); }
static inline unsigned __float_as_uint(float x) { return (unsigned)emu_to_bits(x); }
static inline double __longlong_as_double(long long x) { return emu_from_bits<double>((uint64_t)x); }
static inline long long __double_as_longlong(double x) { return (long long)emu_to_bits(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

// ---- Launches ---------------------------------------------------------------------------------------------
namespace emu {

struct LaunchCfg {
    dim3 grid, block;
    size_t shmem;
    cudaStream_t stream;
};
static inline LaunchCfg cfg(dim3 grid, dim3 block, size_t shmem = 0, cudaStream_t stream = 0) {
    return LaunchCfg{grid, block, shmem, stream};
}

struct Body {
    virtual ~Body() {}
    virtual void run() = 0;
};

}  // namespace emu

extern "C++" void emu_launch(const char *kernel, const char *file, int line, const emu::LaunchCfg &c,
                             std::shared_ptr<emu::Body> body);

namespace emu {

template <typename... P>
struct KernelBody : Body {
    void (*kernel)(P...);
    std::tuple<typename std::decay<P>::type...> args;  // copied at launch, as the hardware copies parameters
    template <typename... A>
    KernelBody(void (*k)(P...), A &&...a) : kernel(k), args(std::forward<A>(a)...) {}
    void run() override { std::apply(kernel, args); }
};

template <typename T>
static inline int check_arg(const char *name, int index, const T &v) {
    if constexpr (std::is_pointer<T>::value) return emu_check_kernel_pointer(name, index, (const void *)v);
    return 0;
}

template <typename... P>
struct Launcher {
    void (*kernel)(P...);
    const char *name;
    LaunchCfg c;
    const char *file;
    int line;
    template <typename... A>
    void operator()(A &&...a) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        auto body = std::make_shared<KernelBody<P...>>(kernel, std::forward<A>(a)...);
        std::apply([&](const auto &...v) {
            int i = 0;
            (void)i;
            ((void)check_arg(name, i++, v), ...);
        }, body->args);
        emu_launch(name, file, line, c, body);
    }
};

template <typename... P>
static inline Launcher<P...> launcher(void (*kernel)(P...), const char *name, LaunchCfg c, const char *file, int line) {
    return Launcher<P...>{kernel, name, c, file, line};
}

}  // namespace emu

#endif
