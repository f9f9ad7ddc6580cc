// cpu_isa.h: whether this process may run x86 vector code of an instruction set, the one place the CPU code asks
// (the GEMM's kernels, vexp.c's row loops, the wide Philox and, through it, the dropout masks' passes).
#ifndef MLM_CPU_ISA_H
#define MLM_CPU_ISA_H

typedef enum {
    CPU_ISA_AVX2,      // 256-bit integer and float vectors
    CPU_ISA_AVX2_FMA,  // AVX2 and FMA3 (the GEMM's AVX2 kernel)
    CPU_ISA_AVX512F,   // AVX-512 Foundation
} CpuIsa;

// 1 where the CPU has the instructions and the OS saves their registers (__builtin_cpu_supports checks XCR0 too, so
// an OS or hypervisor that disables AVX-512 answers 0), else 0; always 0 off x86. It reads what the C runtime found
// before main: safe from any thread at any time, with nothing filled lazily (a lazily filled static was a data race
// between the threads that multiply at once). The callers keep their own ways for tests to force a narrower path
// (gemm_force_kernel, dropout_simd_force, philox_raw_path): what they force differs, the question does not.
static inline int cpu_isa_supported(CpuIsa isa) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    switch (isa) {
    case CPU_ISA_AVX2: return __builtin_cpu_supports("avx2") != 0;
    case CPU_ISA_AVX2_FMA: return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
    case CPU_ISA_AVX512F: return __builtin_cpu_supports("avx512f") != 0;
    }
    return 0;
#else
    (void)isa;
    return 0;
#endif
}

#endif
