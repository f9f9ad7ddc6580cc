// emu_runtime.cc (tests/emu): the CPU execution layer behind cuda_emu.h, cuda_runtime.h, cublas_v2.h, curand.h
// and nvToolsExt.h: fibers for the threads of a block (barrier and warp collectives with misuse reports), the
// device-memory registry (NaN-filled allocations, invalid and freed pointers reported), streams, events and
// graphs (deferred, in-order execution), cuBLAS sgemm from the BLAS definition, cuRAND's Philox4x32-10 in
// LEGACY ordering, NVTX balance checks, and the counters of MLM_EMU_COUNT.
//
// Every misuse the hardware would turn into undefined behaviour (a barrier that part of the block never
// reaches, a shuffle whose mask names a lane that does not arrive, a host pointer passed to a kernel, a copy
// outside an allocation) is reported on stderr as "emu: error: ..." with the kernel and the source line, and
// the process aborts: the test fails where the bug is. API misuse the real runtime refuses with an error code
// (a launch of more than 1024 threads, a cuBLAS leading dimension that is too small) returns that code.
//
// Stream semantics: work is queued per stream and executed in order when the host waits (stream, event or
// device synchronisation, a synchronous copy, cudaFree) or when another stream waits on an event of it. This
// is the latest a GPU could run it, so a host read without a wait sees the NaN pattern that asynchronous
// device-to-host copies leave in their pinned destination until they run, and a host write to a pinned source
// before the copy ran is seen by the copy. The legacy default stream synchronises with blocking streams; a
// non-blocking stream does not. MLM_EMU_EAGER=1 runs work at enqueue instead.
#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cublas_v2.h"
#include "cuda_emu.h"
#include "emu_internal.h"
#include "curand.h"
#include "emu_api.h"
#include "nvtx3/nvToolsExt.h"

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old, size_t *size_old);
#else
#define EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_THREAD__)
// MLM_EMU_TSAN: the host thread's accesses are not watched (emu_init) except while it runs its share of a grid's
// blocks (pool_run). Everything else it does (copies, memsets, cuBLAS and cuRAND arithmetic, NaN fills, one-block
// launches) happens before a launch is dispatched to the workers or after they all finished, so it cannot race
// with a block; watching it only made the tests several times slower. Every block of a multi-block grid is
// watched.
extern "C" void __tsan_ignore_thread_begin(void);
extern "C" void __tsan_ignore_thread_end(void);
static void tsan_watch_host_at_exit(void) { __tsan_ignore_thread_end(); }  // ThreadSanitizer checks it ended
#endif

// The build's variant, in the device name every GPU test prints.
#ifdef EMU_FP_CONTRACT
#define EMU_MODE_NAME ", kernels with FMA contraction"
#else
#define EMU_MODE_NAME ""
#endif

// ---------------------------------------------------------------------------------------------------------
// Reports.

static const char *g_kernel = nullptr;  // kernel being executed (for reports)
static const char *g_kernel_file = nullptr;
static int g_kernel_line = 0;

[[noreturn]] static void emu_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emu_fail(const char *fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "emu: error: ");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    if (g_kernel)
        fprintf(stderr, "\n  in kernel %s (block %u,%u,%u of %u,%u,%u; %u x %u x %u threads) launched at %s:%d",
                g_kernel,
                emu_blockIdx.x, emu_blockIdx.y, emu_blockIdx.z, emu_gridDim.x, emu_gridDim.y, emu_gridDim.z,
                emu_blockDim.x, emu_blockDim.y, emu_blockDim.z, g_kernel_file, g_kernel_line);
    fprintf(stderr, "\n");
    fflush(stderr);
    abort();
}

static void emu_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void emu_warn(const char *fmt, ...) {
    fflush(stdout);
    fprintf(stderr, "emu: ");
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
}

static int env_int(const char *name, int dflt) {
    const char *s = getenv(name);
    return s && *s ? atoi(s) : dflt;
}

// ---------------------------------------------------------------------------------------------------------
// Counters.

static EmuCounters g_cnt;
struct KernelStats {
    uint64_t launches = 0, bytes_read = 0, bytes_written = 0;
};
static std::map<std::string, KernelStats> *g_kstats;  // leaked on purpose: read by atexit reporting
static KernelStats *g_cur_kstats = nullptr;
static bool g_counting_accesses = false;  // true while a kernel body runs in the counting build
// The per-family breakdown of bench/ (emu_counters_json): cuBLAS calls by NVTX phase and shape, counted when
// the call executes (so graph replays count too). Defined with the JSON writer at the end of this file.
static void gemm_family_reset(void);
static std::string gemm_family_key(const char *api, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   int batch);
static void gemm_family_count(const std::string &key, uint64_t flops, uint64_t bytes_read, uint64_t bytes_written);

// First use inside a stream capture (EmuCounters.cold_captures): what has run outside any capture so far, kernels
// by name and cuBLAS calls by shape. Process state, not a counter: emu_counters_reset leaves it.
static std::set<std::string> *g_warm_uses;  // leaked on purpose, like g_kstats

static void note_use(const std::string &what, bool capturing) {
    if (!g_warm_uses) g_warm_uses = new std::set<std::string>();
    if (!capturing) g_warm_uses->insert(what);
    else if (!g_warm_uses->count(what)) g_cnt.cold_captures++;
}

extern "C" void emu_counters_reset(void) {
    memset(&g_cnt, 0, sizeof(g_cnt));
    if (g_kstats) g_kstats->clear();
    gemm_family_reset();
}

static size_t g_device_bytes = 0, g_device_bytes_peak = 0;  // live cudaMalloc bytes; their maximum so far

extern "C" void emu_counters_get(EmuCounters *out) {
    *out = g_cnt;
    out->device_bytes_live = g_device_bytes;
    out->device_bytes_peak = g_device_bytes_peak;
#ifdef EMU_COUNT_ACCESSES
    out->bytes_counted = 1;
#endif
}

extern "C" void emu_counters_print(FILE *f) {
    EmuCounters c;
    emu_counters_get(&c);
    fprintf(f, "kernel launches        %llu (%llu blocks, %llu threads)\n", (unsigned long long)c.launches,
            (unsigned long long)c.blocks, (unsigned long long)c.threads);
    fprintf(f, "cuBLAS calls           %llu (%.3f GFLOP; operands %.2f MB read, %.2f MB written)\n",
            (unsigned long long)c.cublas_calls, c.cublas_flops / 1e9, c.cublas_bytes_read / 1e6,
            c.cublas_bytes_written / 1e6);
    fprintf(f, "cuRAND generate calls  %llu (%llu values)\n", (unsigned long long)c.curand_calls,
            (unsigned long long)c.curand_values);
    fprintf(f, "host->device copies    %llu (%llu bytes)\n", (unsigned long long)c.h2d_copies,
            (unsigned long long)c.h2d_bytes);
    fprintf(f, "device->host copies    %llu (%llu bytes)\n", (unsigned long long)c.d2h_copies,
            (unsigned long long)c.d2h_bytes);
    fprintf(f, "device->device copies  %llu (%llu bytes)\n", (unsigned long long)c.d2d_copies,
            (unsigned long long)c.d2d_bytes);
    fprintf(f, "memsets                %llu (%llu bytes)\n", (unsigned long long)c.memsets,
            (unsigned long long)c.memset_bytes);
    fprintf(f, "host synchronisations  %llu\n", (unsigned long long)c.host_syncs);
    fprintf(f, "device memory          %.2f MiB live, %.2f MiB peak (cudaMalloc, whole process)\n",
            c.device_bytes_live / 1048576.0, c.device_bytes_peak / 1048576.0);
    fprintf(f, "graph launches         %llu (copies, memsets and cuBLAS calls above include those inside)\n",
            (unsigned long long)c.graph_launches);
    if (c.cold_captures)
        fprintf(f, "cold captures          %llu (kernels or cuBLAS shapes first used inside a stream capture)\n",
                (unsigned long long)c.cold_captures);
    if (c.bytes_counted)
        fprintf(f, "kernel global memory   %.2f MB read, %.2f MB written\n", c.kernel_bytes_read / 1e6,
                c.kernel_bytes_written / 1e6);
    else
        fprintf(f, "kernel global memory   not counted (build with the access hooks: bench_emu_step)\n");
    if (!g_kstats) return;
    std::vector<std::pair<std::string, KernelStats>> rows(g_kstats->begin(), g_kstats->end());
    std::sort(rows.begin(), rows.end(), [](const auto &a, const auto &b) {
        return a.second.bytes_read + a.second.bytes_written > b.second.bytes_read + b.second.bytes_written;
    });
    fprintf(f, "%-40s %8s %12s %12s\n", "kernel", "launches", "MB read", "MB written");
    for (const auto &r : rows)
        fprintf(f, "%-40s %8llu %12.3f %12.3f\n", r.first.c_str(), (unsigned long long)r.second.launches,
                r.second.bytes_read / 1e6, r.second.bytes_written / 1e6);
}

// ---------------------------------------------------------------------------------------------------------
// Device memory registry.

enum AllocKind { ALLOC_DEVICE, ALLOC_PINNED };
struct Alloc {
    size_t size;
    AllocKind kind;
    bool lazy = false;  // emu_lazy_device_memory: reserved address space, zero until touched, no redzone
};
static std::map<uintptr_t, Alloc> g_live;        // base -> allocation
static std::map<uintptr_t, size_t> g_freed;      // base -> size of freed device allocations (most recent kept)
static uintptr_t g_dev_lo = UINTPTR_MAX, g_dev_hi = 0;  // bounds of all device allocations ever made

// Without ASan (which puts its own redzones around every allocation), each device allocation is followed by
// EMU_REDZONE bytes of the NaN pattern: a kernel reading just past the end reads NaN, and a write past the end
// is found by the check after every kernel and at cudaFree.
#if EMU_ASAN
enum { EMU_REDZONE = 0 };
#else
enum { EMU_REDZONE = 1024 };
#endif

static size_t total_device_bytes() { return (size_t)env_int("MLM_EMU_MEM_MIB", 16384) << 20; }

// The live allocation holding [p, p + bytes) (bytes 0: p may be one past the end); nullptr if none.
static const Alloc *find_live(const void *p, size_t bytes, uintptr_t *base_out) {
    uintptr_t a = (uintptr_t)p;
    auto it = g_live.upper_bound(a);
    if (it == g_live.begin()) return nullptr;
    --it;
    uintptr_t base = it->first;
    size_t size = it->second.size;
    if (a < base || a - base > size || bytes > size - (a - base)) return nullptr;
    if (bytes > 0 && a - base == size) return nullptr;
    if (base_out) *base_out = base;
    return &it->second;
}

static bool in_freed(const void *p, uintptr_t *base_out, size_t *size_out) {
    uintptr_t a = (uintptr_t)p;
    auto it = g_freed.upper_bound(a);
    if (it == g_freed.begin()) return false;
    --it;
    if (a < it->first || a >= it->first + it->second) return false;
    *base_out = it->first;
    *size_out = it->second;
    return true;
}

// A sentence describing where p points, for reports.
static std::string describe_ptr(const void *p) {
    char buf[256];
    uintptr_t a = (uintptr_t)p, base;
    size_t size;
    auto it = g_live.upper_bound(a);
    if (it != g_live.begin()) {
        --it;
        if (a >= it->first && a <= it->first + it->second.size) {
            snprintf(buf, sizeof(buf), "%p is byte %zu of a live %s allocation of %zu bytes at %p", p,
                     (size_t)(a - it->first), it->second.kind == ALLOC_DEVICE ? "device" : "pinned host",
                     it->second.size, (void *)it->first);
            return buf;
        }
    }
    if (in_freed(p, &base, &size)) {
        snprintf(buf, sizeof(buf), "%p is inside a FREED device allocation of %zu bytes at %p", p, size, (void *)base);
        return buf;
    }
    snprintf(buf, sizeof(buf), "%p is not device memory (no cudaMalloc allocation holds it)", p);
    return buf;
}

// 0x7fffffff in every aligned word: a NaN as float (and, doubled, as double), INT_MAX as int, so a read of
// memory nothing wrote shows up in the results (or as a wild index).
#if defined(__SANITIZE_THREAD__)
__attribute__((no_sanitize_thread))  // a worker's refill of its own dynamic shared memory races with nobody
#endif
static void fill_nan_pattern(void *p, size_t bytes) {
    uint8_t *b = (uint8_t *)p;
    size_t i = 0;
    for (; i + 4 <= bytes; i += 4) {
        uint32_t w = 0x7fffffffu;
        memcpy(b + i, &w, 4);
    }
    for (; i < bytes; i++) b[i] = 0xff;
}

// The redzone after a device allocation still holds the NaN pattern (nothing wrote past the end).
static void check_redzone(uintptr_t base, const Alloc &a, const char *when) {
    if (EMU_REDZONE == 0 || a.kind != ALLOC_DEVICE || a.lazy) return;
    const uint8_t *z = (const uint8_t *)(base + a.size);
    size_t total = a.size + EMU_REDZONE;
    for (size_t i = 0; i < (size_t)EMU_REDZONE; i++) {
        size_t j = a.size + i;  // fill_nan_pattern's layout, counted from the start of the block
        uint8_t want = (j < total / 4 * 4 && j % 4 == 3) ? 0x7f : 0xff;
        if (z[i] != want)
            emu_fail("%s: byte %zu past the end of the device allocation of %zu bytes at %p was written (a store "
                     "past the end of a buffer)", when, i, a.size, (void *)base);
    }
}

static void check_all_redzones(const char *when) {
    if (EMU_REDZONE == 0) return;
    for (const auto &kv : g_live) check_redzone(kv.first, kv.second, when);
}

// ---------------------------------------------------------------------------------------------------------
// Last error (as the runtime: launch-configuration errors and failed calls are returned by cudaGetLastError).

static cudaError_t g_last_error = cudaSuccess;
static cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) g_last_error = e;
    return e;
}

// ---------------------------------------------------------------------------------------------------------
// Fibers: the threads of a block.

enum FiberState { F_READY, F_DONE, F_WAIT_BAR, F_WAIT_WARP };

struct Fiber {
    void *sp = nullptr;  // saved stack pointer (x86-64) while switched out
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    char *stack = nullptr;  // lowest usable address
    size_t stack_size = 0;
    void *fake_stack = nullptr;  // ASan's fake stack of this fiber while switched out
    int linear = 0;              // thread index in the block
    uint3 tid{0, 0, 0};
    FiberState state = F_DONE;
    const char *wait_file = nullptr;
    int wait_line = 0;
    uint64_t warp_result = 0;
    bool fenced = false;  // executed __threadfence since its block started: its atomics publish (release)
};

struct WarpState {
    unsigned arrived = 0;  // lanes waiting at the current collective
    int op = 0;
    unsigned mask = 0;
    int width = 32;
    const char *file = nullptr;
    int line = 0;
    uint64_t val[32];
    int arg[32];
};

// The state of one OS thread that runs blocks: the fibers of a block (one per thread, reused by every block and
// launch), the block's barrier and warp collectives, its dynamic shared memory and the scheduler's context. The
// host thread has one; in the parallel-blocks build (EMU_PARALLEL_BLOCKS) so has every worker of the pool, and
// g_run, thread-local there, names the calling thread's. Runners live as long as the process (never destroyed,
// so LeakSanitizer sees their fibers reachable at exit).
struct BlockRunner {
    std::vector<Fiber *> fibers;
    std::vector<WarpState> warps;
    Fiber *cur = nullptr;  // the fiber running now (nullptr: the scheduler)
    int nthreads = 0, done = 0;
    int bar_arrived = 0;  // threads waiting at the current __syncthreads, first arrived at bar_file:bar_line
    const char *bar_file = nullptr;
    int bar_line = 0, bar_first = 0;
    void *dyn_shared = nullptr;  // the launch's dynamic shared memory (one block at a time)
    size_t dyn_shared_bytes = 0;
    std::mt19937_64 rng;  // MLM_EMU_ORDER=random
#if defined(__x86_64__)
    void *sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
    const void *sched_stack_bottom = nullptr;  // (ASan's view of the scheduler's stack)
    size_t sched_stack_size = 0;
};
static EMU_TLS BlockRunner *g_run = nullptr;
static emu::Body *g_body = nullptr;  // the launch being executed (its LaunchRec owns it)

static Fiber *current_fiber() { return g_run ? g_run->cur : nullptr; }

static BlockRunner *host_runner() {
    static BlockRunner *r = new BlockRunner();
    return r;
}

EMU_TLS uint3 emu_threadIdx;
EMU_TLS dim3 emu_blockIdx;
dim3 emu_blockDim, emu_gridDim;

#if defined(__x86_64__)
// emu_ctx_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control word on the current
// stack, stores the stack pointer in *save and continues on stack `to` (the reverse of the same sequence).
extern "C" void emu_ctx_switch(void **save, void *to);
extern "C" void emu_fiber_trampoline(void);
asm(R"(
    .text
    .globl emu_ctx_switch
    .type emu_ctx_switch,@function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch,.-emu_ctx_switch

    .globl emu_fiber_trampoline
    .type emu_fiber_trampoline,@function
emu_fiber_trampoline:
    movq %rbx, %rdi
    call emu_fiber_main
    ud2
    .size emu_fiber_trampoline,.-emu_fiber_trampoline
)");
#endif

static void switch_to_fiber(Fiber *f) {
    BlockRunner *r = g_run;
#if EMU_ASAN
    void *fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f->stack, f->stack_size);
#endif
#if defined(__x86_64__)
    emu_ctx_switch(&r->sched_sp, f->sp);
#else
    swapcontext(&r->sched_uc, &f->uc);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

static void switch_to_scheduler(Fiber *f) {
    BlockRunner *r = g_run;
#if EMU_ASAN
    __sanitizer_start_switch_fiber(&f->fake_stack, r->sched_stack_bottom, r->sched_stack_size);
#endif
#if defined(__x86_64__)
    emu_ctx_switch(&f->sp, r->sched_sp);
#else
    swapcontext(&f->uc, &r->sched_uc);
#endif
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, &r->sched_stack_bottom, &r->sched_stack_size);
#endif
}

static void thread_exited(Fiber *f);

// Each fiber runs the body of the current launch for its thread, then reports that it finished; it is reused
// for the same thread index of the next block and launch.
extern "C" void emu_fiber_main(Fiber *f) {
#if EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_run->sched_stack_bottom, &g_run->sched_stack_size);
#endif
    for (;;) {
        g_body->run();
        thread_exited(f);
        switch_to_scheduler(f);
    }
}

#if !defined(__x86_64__)
static void fiber_entry_uc(unsigned hi, unsigned lo) {
    emu_fiber_main((Fiber *)(((uintptr_t)hi << 32) | lo));
}
#endif

static size_t fiber_stack_bytes() {
    size_t kib = (size_t)env_int("MLM_EMU_STACK_KIB", EMU_ASAN ? 512 : 128);
    return kib << 10;
}

static Fiber *fiber_create(int linear) {
    Fiber *f = new Fiber();
    size_t page = (size_t)sysconf(_SC_PAGESIZE), size = fiber_stack_bytes();
    char *mem = (char *)mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) emu_fail("cannot map a fiber stack of %zu bytes: %s", size, strerror(errno));
    mprotect(mem, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting memory
    f->stack = mem + page;
    f->stack_size = size;
    f->linear = linear;
#if defined(__x86_64__)
    // Initial frame for emu_ctx_switch: [mxcsr, fpucw][r15 r14 r13 r12 rbx rbp][return address].
    uintptr_t top = ((uintptr_t)f->stack + size) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)(top - 64);
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    memset(sp, 0, 64);
    memcpy(&sp[0], &mxcsr, 4);
    memcpy((char *)&sp[0] + 4, &fpucw, 2);
    sp[5] = (uint64_t)(uintptr_t)f;  // rbx: the trampoline's argument
    sp[7] = (uint64_t)(uintptr_t)&emu_fiber_trampoline;
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = size;
    f->uc.uc_link = nullptr;
    uintptr_t fp = (uintptr_t)f;
    makecontext(&f->uc, (void (*)())fiber_entry_uc, 2, (unsigned)(fp >> 32), (unsigned)fp);
#endif
    return f;
}

// ---- Scheduling order -----------------------------------------------------------------------------------

static int g_order = -1;  // 0 forward, 1 reverse, 2 random
static uint64_t g_seed = 1;

static void init_order() {
    if (g_order >= 0) return;
    const char *o = getenv("MLM_EMU_ORDER");
    g_order = 0;
    if (o && !strcmp(o, "reverse")) g_order = 1;
    else if (o && !strcmp(o, "random")) g_order = 2;
    else if (o && *o && strcmp(o, "forward"))
        emu_warn("MLM_EMU_ORDER=%s is not forward, reverse or random; using forward", o);
    const char *s = getenv("MLM_EMU_SEED");
    g_seed = s && *s ? strtoull(s, nullptr, 10) : 1;
    host_runner()->rng.seed(g_seed);
}

extern "C" int emu_set_order(int order, uint64_t seed) {
    init_order();
    int old = g_order;
    g_order = order;
    g_seed = seed;
    host_runner()->rng.seed(seed);
    return old;
}

// ---- Shared memory ----------------------------------------------------------------------------------------

extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

extern "C" void *emu_dynamic_shared(void) {
    if (!current_fiber()) emu_fail("extern __shared__ memory used outside a kernel");
    return g_run->dyn_shared;
}

// ---- Fences (the memory-order model of cuda_emu.h's atomics) -------------------------------------------------

extern "C" void emu_threadfence(void) {
    if (Fiber *f = current_fiber()) f->fenced = true;
}
extern "C" int emu_thread_fenced(void) {
    Fiber *f = current_fiber();
    return f && f->fenced;
}

// ---- Barrier and warp collectives -----------------------------------------------------------------------

static const char *op_name(int op) {
    switch (op) {
    case EMU_SHFL_IDX: return "__shfl_sync";
    case EMU_SHFL_UP: return "__shfl_up_sync";
    case EMU_SHFL_DOWN: return "__shfl_down_sync";
    case EMU_SHFL_XOR: return "__shfl_xor_sync";
    case EMU_BALLOT: return "__ballot_sync";
    case EMU_ANY: return "__any_sync";
    case EMU_ALL: return "__all_sync";
    case EMU_SYNCWARP: return "__syncwarp";
    }
    return "?";
}

static std::string thread_name(const Fiber *f) {
    char b[64];
    snprintf(b, sizeof(b), "thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
    return b;
}

static std::string where_waiting(const Fiber *f) {
    char b[512];
    switch (f->state) {
    case F_DONE: return "has exited";
    case F_READY: return "is running";
    case F_WAIT_BAR: snprintf(b, sizeof(b), "waits at __syncthreads at %s:%d", f->wait_file, f->wait_line); return b;
    case F_WAIT_WARP: {
        const WarpState &w = g_run->warps[f->linear / 32];
        snprintf(b, sizeof(b), "waits at %s (mask 0x%08x) at %s:%d", op_name(w.op), w.mask, f->wait_file, f->wait_line);
        return b;
    }
    }
    return "?";
}

static int count_exited_report(std::string *first) {
    int n = 0;
    for (int i = 0; i < g_run->nthreads; i++)
        if (g_run->fibers[i]->state == F_DONE) {
            if (n++ == 0) *first = thread_name(g_run->fibers[i]);
        }
    return n;
}

// A barrier that some thread can no longer reach: report who waits where and who exited.
[[noreturn]] static void barrier_partial(const char *file, int line) {
    std::string first;
    int exited = count_exited_report(&first);
    emu_fail("__syncthreads at %s:%d reached by only part of the block: %d of %d threads wait there, %d threads "
             "exited without reaching it (first: %s); every thread of the block must reach every __syncthreads "
             "(move the early return after the barrier or make the condition block-uniform)",
             file, line, g_run->bar_arrived, g_run->nthreads, exited, first.c_str());
}

extern "C" void emu_syncthreads(const char *file, int line) {
    Fiber *f = current_fiber();
    if (!f) emu_fail("__syncthreads called outside a kernel (at %s:%d)", file, line);
    if (g_run->bar_arrived == 0) {
        g_run->bar_file = file;
        g_run->bar_line = line;
        g_run->bar_first = f->linear;
    } else if (g_run->bar_line != line || (g_run->bar_file != file && strcmp(g_run->bar_file, file) != 0)) {
        emu_fail("threads of one block wait at different __syncthreads: %s at %s:%d, %s at %s:%d (a barrier in "
                 "divergent code)", thread_name(g_run->fibers[g_run->bar_first]).c_str(), g_run->bar_file,
                 g_run->bar_line, thread_name(f).c_str(), file, line);
    }
    g_run->bar_arrived++;
    f->state = F_WAIT_BAR;
    f->wait_file = file;
    f->wait_line = line;
    if (g_run->done > 0) barrier_partial(file, line);
    if (g_run->bar_arrived == g_run->nthreads) {
        for (int i = 0; i < g_run->nthreads; i++)
            if (g_run->fibers[i]->state == F_WAIT_BAR) g_run->fibers[i]->state = F_READY;
        g_run->bar_arrived = 0;
    }
    switch_to_scheduler(f);
}

static int lanes_in_warp(int warp) { return std::min(32, g_run->nthreads - warp * 32); }

static void complete_warp_op(int warp) {
    WarpState &w = g_run->warps[warp];
    int width = w.width;
    uint64_t ballot = 0;
    for (int l = 0; l < 32; l++)
        if (w.mask >> l & 1u) ballot |= (uint64_t)(w.val[l] != 0) << l;
    for (int l = 0; l < 32; l++) {
        if (!(w.mask >> l & 1u)) continue;
        Fiber *f = g_run->fibers[warp * 32 + l];
        int seg = l & ~(width - 1), src = l;
        uint64_t r = 0;
        switch (w.op) {
        case EMU_SHFL_IDX: src = seg + (w.arg[l] & (width - 1)); break;
        case EMU_SHFL_UP: src = l - w.arg[l] >= seg ? l - w.arg[l] : l; break;
        case EMU_SHFL_DOWN: src = l + w.arg[l] < seg + width ? l + w.arg[l] : l; break;
        case EMU_SHFL_XOR: src = (l ^ w.arg[l]) < seg + width && (l ^ w.arg[l]) >= seg ? l ^ w.arg[l] : l; break;
        default: break;
        }
        switch (w.op) {
        case EMU_SHFL_IDX:
        case EMU_SHFL_UP:
        case EMU_SHFL_DOWN:
        case EMU_SHFL_XOR:
            // A source lane outside the mask gives an undefined value on the device: all ones here (NaN, -1).
            r = (w.mask >> src & 1u) ? w.val[src] : ~(uint64_t)0;
            break;
        case EMU_BALLOT: r = ballot; break;
        case EMU_ANY: r = ballot != 0; break;
        case EMU_ALL: r = ballot == (uint64_t)w.mask; break;
        default: r = 0;
        }
        f->warp_result = r;
        f->state = F_READY;
    }
    w.arrived = 0;
}

extern "C" uint64_t emu_warp_op(int op, unsigned mask, uint64_t value, int arg, int width, const char *file, int line) {
    Fiber *f = current_fiber();
    if (!f) emu_fail("%s called outside a kernel (at %s:%d)", op_name(op), file, line);
    int warp = f->linear / 32, lane = f->linear % 32, nl = lanes_in_warp(warp);
    if (width < 1 || width > 32 || (width & (width - 1)))
        emu_fail("%s at %s:%d: width %d is not a power of two in 1..32", op_name(op), file, line, width);
    if (!(mask >> lane & 1u))
        emu_fail("%s at %s:%d: lane %d of warp %d calls it with mask 0x%08x, which does not name the lane itself",
                 op_name(op), file, line, lane, warp, mask);
    if (nl < 32 && (mask >> nl) != 0)
        emu_fail("%s at %s:%d: mask 0x%08x names lane %d, which does not exist: the block has %d threads, so warp %d "
                 "has lanes 0..%d only (a full mask in a partial warp; round the block size up to a multiple of 32 "
                 "or use the mask of the existing lanes)",
                 op_name(op), file, line, mask, 31 - __builtin_clz(mask), g_run->nthreads, warp, nl - 1);
    WarpState &w = g_run->warps[warp];
    if (w.arrived == 0) {
        w.op = op;
        w.mask = mask;
        w.width = width;
        w.file = file;
        w.line = line;
        // A lane that exits later is caught by thread_exited.
        for (int l = 0; l < 32; l++)
            if ((mask >> l & 1u) && g_run->fibers[warp * 32 + l]->state == F_DONE)
                emu_fail("%s at %s:%d: mask 0x%08x names lane %d of warp %d, which has exited and will never arrive",
                         op_name(op), file, line, mask, l, warp);
    } else if (w.op != op || w.mask != mask || w.line != line || (w.file != file && strcmp(w.file, file) != 0)) {
        emu_fail("lanes of warp %d disagree: %s with mask 0x%08x at %s:%d, but lane %d calls %s with mask 0x%08x at "
                 "%s:%d", warp, op_name(w.op), w.mask, w.file, w.line, lane, op_name(op), mask, file, line);
    }
    w.arrived |= 1u << lane;
    w.val[lane] = value;
    w.arg[lane] = arg;
    f->state = F_WAIT_WARP;
    f->wait_file = file;
    f->wait_line = line;
    if (w.arrived == mask) complete_warp_op(warp);
    switch_to_scheduler(f);
    return f->warp_result;
}

extern "C" unsigned emu_activemask(void) {
    Fiber *f = current_fiber();
    if (!f) return 0;
    int warp = f->linear / 32;
    unsigned m = 0;
    for (int l = 0; l < lanes_in_warp(warp); l++)
        if (g_run->fibers[warp * 32 + l]->state != F_DONE) m |= 1u << l;
    return m;
}

static void thread_exited(Fiber *f) {
    f->state = F_DONE;
    g_run->done++;
    if (g_run->bar_arrived > 0) barrier_partial(g_run->bar_file, g_run->bar_line);
    int warp = f->linear / 32, lane = f->linear % 32;
    const WarpState &w = g_run->warps[warp];
    if (w.arrived && (w.mask >> lane & 1u))
        emu_fail("%s at %s:%d: mask 0x%08x names lane %d of warp %d, which exited without arriving (lanes waiting: "
                 "0x%08x)", op_name(w.op), w.file, w.line, w.mask, lane, warp, w.arrived);
}

[[noreturn]] static void deadlock() {
    std::string msg;
    int shown = 0;
    for (int i = 0; i < g_run->nthreads && shown < 8; i++) {
        Fiber *f = g_run->fibers[i];
        if (f->state == F_DONE) continue;
        msg += "\n    " + thread_name(f) + " " + where_waiting(f);
        shown++;
    }
    emu_fail("the block cannot make progress: %d of %d threads exited, the others wait for threads that never "
             "arrive:%s", g_run->done, g_run->nthreads, msg.c_str());
}

static void run_block(std::vector<int> &order) {
    if (__start_emu_shared && __stop_emu_shared)
        fill_nan_pattern(__start_emu_shared, (size_t)(__stop_emu_shared - __start_emu_shared));
    if (g_run->dyn_shared) fill_nan_pattern(g_run->dyn_shared, g_run->dyn_shared_bytes);
    g_run->done = 0;
    g_run->bar_arrived = 0;
    for (auto &w : g_run->warps) w.arrived = 0;
    for (int i = 0; i < g_run->nthreads; i++) {
        g_run->fibers[i]->state = F_READY;
        g_run->fibers[i]->fenced = false;
    }
    while (g_run->done < g_run->nthreads) {
        if (g_order == 2) std::shuffle(order.begin(), order.end(), g_run->rng);
        bool progress = false;
        for (int idx : order) {
            Fiber *f = g_run->fibers[idx];
            if (f->state != F_READY) continue;
            g_run->cur = f;
            emu_threadIdx = f->tid;
            switch_to_fiber(f);
            g_run->cur = nullptr;
            progress = true;
        }
        if (!progress) deadlock();
    }
}

// ---------------------------------------------------------------------------------------------------------
// Streams, events and graphs.

struct Op {
    std::function<void()> run;
    std::function<void()> at_enqueue;  // host-visible effects of the enqueue itself (poisoning, snapshots)
};

// calls: the call-time counters (copies, memsets, cuBLAS, cuRAND) of the captured operations, added to the
// counters at each launch instead of at the capture.
struct CUgraph_st {
    std::vector<Op> ops;
    EmuCounters calls{};
};
struct CUgraphExec_st {
    std::vector<Op> ops;
    EmuCounters calls{};
};

// The counters that count API calls when they are made (kernels count when they run): a - b field by field
// (sign -1) or a + b (sign 1), into a.
static void call_counters_add(EmuCounters *a, const EmuCounters &b, int sign) {
    uint64_t EmuCounters::*f[] = {&EmuCounters::cublas_calls, &EmuCounters::cublas_flops,
                                  &EmuCounters::cublas_bytes_read, &EmuCounters::cublas_bytes_written,
                                  &EmuCounters::curand_calls, &EmuCounters::curand_values, &EmuCounters::h2d_copies,
                                  &EmuCounters::h2d_bytes, &EmuCounters::d2h_copies, &EmuCounters::d2h_bytes,
                                  &EmuCounters::d2d_copies, &EmuCounters::d2d_bytes, &EmuCounters::memsets,
                                  &EmuCounters::memset_bytes};
    for (auto m : f) a->*m = sign > 0 ? a->*m + b.*m : a->*m - b.*m;
}

struct CUstream_st {
    std::deque<Op> q;
    bool blocking = true;
    uint64_t enq = 0, done = 0;  // ops enqueued / executed
    CUgraph_st *capture = nullptr;
    bool capture_invalid = false;
};

struct CUevent_st {
    CUstream_st *stream = nullptr;
    uint64_t seq = 0;
    bool recorded = false;
    double t_ms = 0.0;
};

static CUstream_st g_legacy;
static std::set<CUstream_st *> g_streams;
static std::set<CUevent_st *> g_events;
static std::set<CUgraph_st *> g_graphs;
static std::set<CUgraphExec_st *> g_execs;
static bool g_eager = false, g_eager_init = false;

static bool eager() {
    if (!g_eager_init) {
        g_eager = env_int("MLM_EMU_EAGER", 0) != 0;
        g_eager_init = true;
    }
    return g_eager;
}

static CUstream_st *stream_of(cudaStream_t s, const char *api) {
    if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return &g_legacy;
    if (!g_streams.count(s)) {
        emu_warn("error: %s: stream %p is not a live stream (destroyed, or never created)", api, (void *)s);
        return nullptr;
    }
    return s;
}

static void flush(CUstream_st *s, uint64_t upto) {
    while (s->done < upto && !s->q.empty()) {
        Op op = std::move(s->q.front());
        s->q.pop_front();
        s->done++;
        op.run();
    }
}
static void flush_all(CUstream_st *s) { flush(s, s->enq); }

static void flush_device() {
    flush_all(&g_legacy);
    for (CUstream_st *s : g_streams) flush_all(s);
}

static double now_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

// Queue op on s (or add it to the graph s is capturing).
static void enqueue(CUstream_st *s, Op op) {
    if (s->capture) {
        s->capture->ops.push_back(std::move(op));
        return;
    }
    // The legacy default stream waits for the blocking streams and they wait for it.
    if (s == &g_legacy) {
        for (CUstream_st *o : g_streams)
            if (o->blocking) flush_all(o);
    } else if (s->blocking) {
        flush_all(&g_legacy);
    }
    if (op.at_enqueue) op.at_enqueue();
    s->q.push_back(std::move(op));
    s->enq++;
    if (eager()) flush_all(s);
}

// Host waits are illegal while a stream captures (the real runtime invalidates the capture).
static bool capturing_anywhere() {
    if (g_legacy.capture) return true;
    for (CUstream_st *s : g_streams)
        if (s->capture) return true;
    return false;
}

// ---------------------------------------------------------------------------------------------------------
// Kernel launches.

#ifdef EMU_COUNT_ACCESSES
static inline void count_access(const void *p, size_t n, bool write) {
    if (!g_counting_accesses) return;
    uintptr_t a = (uintptr_t)p;
    if (a < g_dev_lo || a >= g_dev_hi) return;
    if (!find_live(p, 1, nullptr)) return;
    if (write) {
        g_cnt.kernel_bytes_written += n;
        g_cur_kstats->bytes_written += n;
    } else {
        g_cnt.kernel_bytes_read += n;
        g_cur_kstats->bytes_read += n;
    }
}
// GCC's -fsanitize=thread instrumentation of the kernel sources calls these for every load and store; the
// counting build provides them (no ThreadSanitizer runtime is linked) and counts the bytes that fall inside
// device allocations while a kernel body runs.
extern "C" {
void __tsan_init(void) {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit(void) {}
#define EMU_TSAN_RW(N)                                                              \
    void __tsan_read##N(void *p) { count_access(p, N, false); }                     \
    void __tsan_write##N(void *p) { count_access(p, N, true); }                     \
    void __tsan_unaligned_read##N(void *p) { count_access(p, N, false); }           \
    void __tsan_unaligned_write##N(void *p) { count_access(p, N, true); }           \
    void __tsan_volatile_read##N(void *p) { count_access(p, N, false); }            \
    void __tsan_volatile_write##N(void *p) { count_access(p, N, true); }
EMU_TSAN_RW(1)
EMU_TSAN_RW(2)
EMU_TSAN_RW(4)
EMU_TSAN_RW(8)
EMU_TSAN_RW(16)
void __tsan_read_range(void *p, unsigned long n) { count_access(p, n, false); }
void __tsan_write_range(void *p, unsigned long n) { count_access(p, n, true); }
// shared_ptr reference counts (host code of the launch path, never device memory).
int __tsan_atomic32_fetch_add(volatile int *a, int v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
// Device atomics (cuda_emu.h: a load, then compare-and-swap): counted as a read, and a write when it swaps.
#define EMU_TSAN_ATOMIC(N, T)                                                                               \
    T __tsan_atomic##N##_load(const volatile T *a, int) {                                                   \
        count_access((const void *)a, N / 8, false);                                                        \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                        \
    }                                                                                                       \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T *a, T *c, T v, int, int) {                    \
        int ok = __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
        count_access((const void *)a, N / 8, ok != 0);                                                      \
        return ok;                                                                                          \
    }
EMU_TSAN_ATOMIC(32, int)
EMU_TSAN_ATOMIC(64, long long)
void __tsan_vptr_update(void **, void *) {}
void __tsan_vptr_read(void **) {}
}
#endif

static KernelStats *kernel_stats(const char *name) {
    if (!g_kstats) g_kstats = new std::map<std::string, KernelStats>();
    return &(*g_kstats)[name];
}

struct LaunchRec {
    const char *name, *file;
    int line;
    dim3 grid, block;
    size_t shmem;
    std::shared_ptr<emu::Body> body;
};

// Prepares the calling thread's runner for the blocks of launch L: a fiber per thread, their indices, the warps,
// the thread order and the dynamic shared memory.
static void runner_begin(const LaunchRec &L, std::vector<int> *order) {
    BlockRunner *r = g_run;
    unsigned nt = L.block.x * L.block.y * L.block.z;
    while (r->fibers.size() < nt) r->fibers.push_back(fiber_create((int)r->fibers.size()));
    r->warps.resize((nt + 31) / 32);
    r->nthreads = (int)nt;
    for (unsigned i = 0; i < nt; i++)
        r->fibers[i]->tid = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    order->resize(nt);
    for (unsigned i = 0; i < nt; i++) (*order)[i] = g_order == 1 ? (int)(nt - 1 - i) : (int)i;
    r->dyn_shared_bytes = L.shmem;
    r->dyn_shared = L.shmem ? malloc(L.shmem) : nullptr;  // heap: ASan sees accesses past the requested size
}

static void runner_end(void) {
    free(g_run->dyn_shared);
    g_run->dyn_shared = nullptr;
}

// Runs block b (linear, x fastest) of the current launch on the calling thread.
static void run_linear_block(uint64_t b, std::vector<int> &order) {
    const dim3 &g = emu_gridDim;
    emu_blockIdx = dim3((unsigned)(b % g.x), (unsigned)(b / g.x % g.y), (unsigned)(b / ((uint64_t)g.x * g.y)));
    run_block(order);
}

#ifdef EMU_PARALLEL_BLOCKS
// ---- Parallel blocks: the blocks of a grid on MLM_EMU_WORKERS OS threads (default 4: the host thread and a pool
// of 3), each with its own fibers for the threads of a block. Worker w runs blocks w, w + W, w + 2W, ... (a fixed assignment: a shared
// work counter would be an atomic that orders each block after the one taken before it, and ThreadSanitizer
// would then miss their races). Two blocks on different workers are ordered only by what the kernel itself does:
// its atomics and __threadfence (cuda_emu.h). The launch is dispatched and joined under a mutex, so the host's
// work before it happens before every block and every block before the host's work after it, as on a device.
// The threads of one block share their worker's ThreadSanitizer thread: the fiber switches run them one after
// another (in the order MLM_EMU_ORDER selects, which the sequential build already checks), so ThreadSanitizer
// sees each block as one sequential thread and reports only races between blocks.
struct BlockPool {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t go = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
    int workers = 0;          // started
    uint64_t generation = 0;  // launches dispatched so far
    int pending = 0;          // workers still running the current launch
    const LaunchRec *launch = nullptr;
    char dispatched, joined;  // ThreadSanitizer's sync objects of the launch's edges (pool_hide_begin)
};
static BlockPool g_pool;

#if defined(__SANITIZE_THREAD__)
extern "C" void __tsan_acquire(void *addr);
extern "C" void __tsan_release(void *addr);
extern "C" void AnnotateIgnoreSyncBegin(const char *file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char *file, int line);
#endif
// The pool's own bookkeeping (its mutex, condition variables and fields) is hidden from ThreadSanitizer: a worker
// that takes the mutex after another released it would otherwise be ordered after all of that worker's blocks,
// and a race between their blocks would go unreported whenever the two happened not to overlap in time. The
// launch's real edges are declared instead: the host's work before the launch happens before every block
// (dispatched), and every block before the host's work after it (joined).
static void pool_hide_begin(void) {
#if defined(__SANITIZE_THREAD__)
    __tsan_ignore_thread_begin();
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
#endif
}
static void pool_hide_end(void) {
#if defined(__SANITIZE_THREAD__)
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
    __tsan_ignore_thread_end();
#endif
}
static void pool_edge_acquire(char *edge) {
#if defined(__SANITIZE_THREAD__)
    __tsan_acquire(edge);
#else
    (void)edge;
#endif
}
static void pool_edge_release(char *edge) {
#if defined(__SANITIZE_THREAD__)
    __tsan_release(edge);
#else
    (void)edge;
#endif
}

static void worker_run_launch(int w, int workers, const LaunchRec &L) {
    std::vector<int> order;
    runner_begin(L, &order);
    uint64_t blocks = (uint64_t)L.grid.x * L.grid.y * L.grid.z;
    for (uint64_t b = (uint64_t)w; b < blocks; b += (uint64_t)workers) {
        if (g_order == 2) g_run->rng.seed(g_seed + b * 0x9E3779B97F4A7C15ull);  // the same orders on every run
        run_linear_block(b, order);
    }
    runner_end();
}

static void *worker_main(void *arg) {
    int w = (int)(intptr_t)arg;
    g_run = new BlockRunner();
    uint64_t seen = 0;
    for (;;) {
        pool_hide_begin();
        pthread_mutex_lock(&g_pool.mu);
        while (g_pool.generation == seen) pthread_cond_wait(&g_pool.go, &g_pool.mu);
        seen = g_pool.generation;
        const LaunchRec *L = g_pool.launch;
        int workers = g_pool.workers;
        pthread_mutex_unlock(&g_pool.mu);
        pool_hide_end();
        pool_edge_acquire(&g_pool.dispatched);
        worker_run_launch(w, workers, *L);
        pool_edge_release(&g_pool.joined);
        pool_hide_begin();
        pthread_mutex_lock(&g_pool.mu);
        if (--g_pool.pending == 0) pthread_cond_signal(&g_pool.finished);
        pthread_mutex_unlock(&g_pool.mu);
        pool_hide_end();
    }
    return nullptr;
}

// A forked child has none of the parent's workers: it starts its own at its first launch.
static void pool_after_fork_child(void) {
    new (&g_pool) BlockPool();
}

// MLM_EMU_WORKERS threads run blocks: the host thread (worker 0) and the pool's.
static void pool_start(void) {
    int n = std::max(2, std::min(64, env_int("MLM_EMU_WORKERS", 4)));
    static bool at_fork = false;
    if (!at_fork) pthread_atfork(nullptr, nullptr, pool_after_fork_child);
    at_fork = true;
    for (int w = 1; w < n; w++) {
        pthread_t t;
        if (pthread_create(&t, nullptr, worker_main, (void *)(intptr_t)w) != 0)
            emu_fail("cannot start block worker %d of %d: %s (set MLM_EMU_WORKERS lower)", w, n, strerror(errno));
        pthread_detach(t);
    }
    g_pool.workers = n;
}

// The host's own blocks are watched like the workers' (emu_init ignores the host thread otherwise).
static void host_watch(bool on) {
#if defined(__SANITIZE_THREAD__)
    if (on) __tsan_ignore_thread_end();
    else __tsan_ignore_thread_begin();
#else
    (void)on;
#endif
}

static void pool_run(const LaunchRec &L) {
    if (g_pool.workers == 0) pool_start();
    pool_edge_release(&g_pool.dispatched);
    pool_hide_begin();
    pthread_mutex_lock(&g_pool.mu);
    g_pool.launch = &L;
    g_pool.pending = g_pool.workers - 1;
    g_pool.generation++;
    pthread_cond_broadcast(&g_pool.go);
    pthread_mutex_unlock(&g_pool.mu);
    pool_hide_end();
    host_watch(true);
    worker_run_launch(0, g_pool.workers, L);
    host_watch(false);
    pool_hide_begin();
    pthread_mutex_lock(&g_pool.mu);
    while (g_pool.pending > 0) pthread_cond_wait(&g_pool.finished, &g_pool.mu);
    g_pool.launch = nullptr;
    pthread_mutex_unlock(&g_pool.mu);
    pool_hide_end();
    pool_edge_acquire(&g_pool.joined);
}
#endif

static void execute_launch(const LaunchRec &L) {
    init_order();
    if (!g_run) g_run = host_runner();
    uint64_t blocks = (uint64_t)L.grid.x * L.grid.y * L.grid.z;
    unsigned nt = L.block.x * L.block.y * L.block.z;
    g_body = L.body.get();
    g_kernel = L.name;
    g_kernel_file = L.file;
    g_kernel_line = L.line;
    emu_gridDim = L.grid;
    emu_blockDim = L.block;
    g_cur_kstats = kernel_stats(L.name);
    g_cur_kstats->launches++;
    g_cnt.launches++;
    g_cnt.blocks += blocks;
    g_cnt.threads += blocks * nt;
    g_counting_accesses = true;
#ifdef EMU_PARALLEL_BLOCKS
    if (blocks > 1) {
        pool_run(L);
    } else
#endif
    {
        std::vector<int> order;
        runner_begin(L, &order);
        for (uint64_t b = 0; b < blocks; b++) run_linear_block(b, order);
        runner_end();
    }
    g_counting_accesses = false;
    char when[256];
    snprintf(when, sizeof(when), "after kernel %s launched at %s:%d", L.name, L.file, L.line);
    g_kernel = nullptr;
    check_all_redzones(when);
    g_body = nullptr;
}

// ---- Launch recording (emu_api.h): launches as made, for checks against a real architecture's limits at shapes
// too large to emulate (tests/test_launch_resources.c).

static bool g_recording = false, g_skip_bodies = false;
static std::vector<EmuLaunchRecord> &g_records = *new std::vector<EmuLaunchRecord>();

extern "C" void emu_record_launches(int on, int skip_bodies) {
    g_recording = on != 0;
    g_skip_bodies = on && skip_bodies;
}

extern "C" size_t emu_launch_records(const EmuLaunchRecord **out) {
    *out = g_records.data();
    return g_records.size();
}

static void record_launch(const char *kernel, const char *file, int line, const emu::LaunchCfg &c) {
    EmuLaunchRecord r;
    r.kernel = kernel;
    r.file = file;
    r.line = line;
    r.grid[0] = c.grid.x, r.grid[1] = c.grid.y, r.grid[2] = c.grid.z;
    r.block[0] = c.block.x, r.block[1] = c.block.y, r.block[2] = c.block.z;
    r.shmem = c.shmem;
    g_records.push_back(r);
}

void emu_launch(const char *kernel, const char *file, int line, const emu::LaunchCfg &c,
                std::shared_ptr<emu::Body> body) {
    // Recording without bodies: every launch is accepted as made; the test that records judges it against a real
    // architecture's limits (stricter than the generic ones below).
    if (g_recording) record_launch(kernel, file, line, c);
    if (g_skip_bodies && (unsigned long long)c.grid.x * c.grid.y * c.grid.z > 1) {
        g_cnt.launches++;
        return;
    }
    // Configuration errors come back from cudaGetLastError, as on the device (the kernel does not run).
    const dim3 &g = c.grid, &b = c.block;
    unsigned long long nt = (unsigned long long)b.x * b.y * b.z;
    if (b.x == 0 || b.y == 0 || b.z == 0 || g.x == 0 || g.y == 0 || g.z == 0 || nt > 1024 || b.x > 1024 ||
        b.y > 1024 || b.z > 64 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
        emu_warn("launch of %s at %s:%d refused: grid (%u,%u,%u), block (%u,%u,%u) (cudaErrorInvalidConfiguration)",
                 kernel, file, line, g.x, g.y, g.z, b.x, b.y, b.z);
        set_error(cudaErrorInvalidConfiguration);
        return;
    }
    if (c.shmem > 48 * 1024) {
        emu_warn("launch of %s at %s:%d refused: %zu bytes of dynamic shared memory (the default limit is 48 KiB)",
                 kernel, file, line, c.shmem);
        set_error(cudaErrorInvalidValue);
        return;
    }
    CUstream_st *s = stream_of(c.stream, kernel);
    if (!s) {
        set_error(cudaErrorInvalidResourceHandle);
        return;
    }
    note_use(std::string("kernel ") + kernel, s->capture != nullptr);
    LaunchRec rec{kernel, file, line, g, b, c.shmem, std::move(body)};
    enqueue(s, Op{[rec] { execute_launch(rec); }, nullptr});
}

extern "C" int emu_check_kernel_pointer(const char *kernel, int index, const void *p) {
    if (p == nullptr) return 0;
    if (find_live(p, 0, nullptr)) return 0;
    emu_fail("kernel %s: argument %d: %s; kernels can only use device (or pinned host) memory", kernel, index,
             describe_ptr(p).c_str());
}

// ---------------------------------------------------------------------------------------------------------
// Runtime API.

extern "C" {

cudaError_t emu_cudaGetDeviceCount(int *count) {
    if (!count) return set_error(cudaErrorInvalidValue);
    *count = 1;
    return cudaSuccess;
}

cudaError_t emu_cudaGetDeviceProperties(cudaDeviceProp *prop, int device) {
    if (!prop || device != 0) return set_error(device != 0 ? cudaErrorInvalidDevice : cudaErrorInvalidValue);
    memset(prop, 0, sizeof(*prop));
    snprintf(prop->name, sizeof(prop->name), "mlm CPU emulation (tests/emu, order %s%s)",
             (init_order(), g_order == 0 ? "forward" : g_order == 1 ? "reverse" : "random"), EMU_MODE_NAME);
    prop->totalGlobalMem = total_device_bytes();
    prop->sharedMemPerBlock = 48 * 1024;
    prop->regsPerBlock = 65536;
    prop->warpSize = 32;
    prop->maxThreadsPerBlock = 1024;
    prop->maxThreadsDim[0] = prop->maxThreadsDim[1] = 1024;
    prop->maxThreadsDim[2] = 64;
    prop->maxGridSize[0] = 2147483647;
    prop->maxGridSize[1] = prop->maxGridSize[2] = 65535;
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = 1;
    return cudaSuccess;
}

cudaError_t emu_cudaSetDevice(int device) { return device == 0 ? cudaSuccess : set_error(cudaErrorInvalidDevice); }
cudaError_t emu_cudaGetDevice(int *device) {
    if (!device) return set_error(cudaErrorInvalidValue);
    *device = 0;
    return cudaSuccess;
}

cudaError_t emu_cudaDeviceSynchronize(void) {
    if (capturing_anywhere()) return set_error(cudaErrorStreamCaptureUnsupported);
    g_cnt.host_syncs++;
    flush_device();
    return cudaSuccess;
}

cudaError_t emu_cudaDeviceReset(void) {
    flush_device();
    return cudaSuccess;
}

cudaError_t emu_cudaGetLastError(void) {
    cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}
cudaError_t emu_cudaPeekAtLastError(void) { return g_last_error; }

const char *emu_cudaGetErrorName(cudaError_t e) {
    switch (e) {
#define N(x) case x: return #x;
    N(cudaSuccess) N(cudaErrorInvalidValue) N(cudaErrorMemoryAllocation) N(cudaErrorInitializationError)
    N(cudaErrorInvalidConfiguration) N(cudaErrorInvalidDevicePointer) N(cudaErrorInvalidMemcpyDirection)
    N(cudaErrorNoDevice) N(cudaErrorInvalidDevice) N(cudaErrorInvalidResourceHandle) N(cudaErrorIllegalState)
    N(cudaErrorNotReady) N(cudaErrorIllegalAddress) N(cudaErrorLaunchFailure) N(cudaErrorStreamCaptureUnsupported)
    N(cudaErrorStreamCaptureInvalidated) N(cudaErrorStreamCaptureUnmatched) N(cudaErrorStreamCaptureImplicit)
    N(cudaErrorCapturedEvent) N(cudaErrorStreamCaptureWrongThread) N(cudaErrorUnknown)
#undef N
    }
    return "cudaErrorUnknown";
}

const char *emu_cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureUnmatched: return "capture was not initiated in this stream";
    case cudaErrorStreamCaptureImplicit:
        return "operation would make the legacy stream depend on a capturing blocking stream";
    default: return "unspecified emulator error";
    }
}

// emu_lazy_device_memory (emu_api.h): allocations that are address space only until touched.
static bool g_lazy_memory = false;
extern "C" void emu_lazy_device_memory(int on) { g_lazy_memory = on != 0; }

// memset(p, 0, n) inside a lazy allocation without touching its untouched pages: whole pages are handed back to
// the kernel (MADV_DONTNEED: an anonymous private page reads as zeros afterwards), the ends are written.
static void zero_lazy(void *p, size_t n) {
    uintptr_t a = (uintptr_t)p, e = a + n, page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = (a + page - 1) & ~(page - 1), hi = e & ~(page - 1);
    if (hi <= lo || madvise((void *)lo, hi - lo, MADV_DONTNEED) != 0) {
        memset(p, 0, n);
        return;
    }
    memset(p, 0, lo - a);
    memset((void *)hi, 0, e - hi);
}

cudaError_t emu_cudaMalloc(void **ptr, size_t bytes) {
    if (!ptr) return set_error(cudaErrorInvalidValue);
    *ptr = nullptr;
    if (bytes == 0) return cudaSuccess;  // as the runtime: a null pointer, no error
    if (bytes > total_device_bytes() - std::min(g_device_bytes, total_device_bytes()))
        return set_error(cudaErrorMemoryAllocation);
    void *p = nullptr;
    if (g_lazy_memory) {
        p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            emu_warn("error: cudaMalloc(%zu bytes) in lazy device memory: the host refused to reserve the address "
                     "space (%s); with vm.overcommit_memory = 2 such reservations count as commitments",
                     bytes, strerror(errno));
            return set_error(cudaErrorMemoryAllocation);
        }
    } else {
        if (posix_memalign(&p, 256, bytes + EMU_REDZONE) != 0 || !p) return set_error(cudaErrorMemoryAllocation);
        fill_nan_pattern(p, bytes + EMU_REDZONE);
    }
    g_freed.erase((uintptr_t)p);
    g_live[(uintptr_t)p] = Alloc{bytes, ALLOC_DEVICE, g_lazy_memory};
    g_device_bytes += bytes;
    g_device_bytes_peak = std::max(g_device_bytes_peak, g_device_bytes);
    g_dev_lo = std::min(g_dev_lo, (uintptr_t)p);
    g_dev_hi = std::max(g_dev_hi, (uintptr_t)p + bytes);
    *ptr = p;
    return cudaSuccess;
}

static cudaError_t free_alloc(void *p, AllocKind kind, const char *api) {
    if (!p) return cudaSuccess;
    if (capturing_anywhere()) return set_error(cudaErrorStreamCaptureUnsupported);
    auto it = g_live.find((uintptr_t)p);
    if (it == g_live.end() || it->second.kind != kind) {
        emu_warn("error: %s(%p): %s", api, p, describe_ptr(p).c_str());
        return set_error(cudaErrorInvalidValue);
    }
    // cudaFree waits for the device: nothing queued may still use the memory.
    g_cnt.host_syncs++;
    flush_device();
    size_t size = it->second.size;
    check_redzone(it->first, it->second, api);
    bool lazy = it->second.lazy;
    g_live.erase(it);
    if (kind == ALLOC_DEVICE) {
        g_device_bytes -= size;
        g_freed[(uintptr_t)p] = size;
        if (g_freed.size() > 100000) g_freed.erase(g_freed.begin());
    }
    if (lazy) munmap(p, size);
    else free(p);
    return cudaSuccess;
}

cudaError_t emu_cudaFree(void *ptr) { return free_alloc(ptr, ALLOC_DEVICE, "cudaFree"); }

cudaError_t emu_cudaMallocHost(void **ptr, size_t bytes) {
    if (!ptr) return set_error(cudaErrorInvalidValue);
    void *p = nullptr;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return set_error(cudaErrorMemoryAllocation);
    g_live[(uintptr_t)p] = Alloc{bytes, ALLOC_PINNED};
    *ptr = p;
    return cudaSuccess;
}
cudaError_t emu_cudaHostAlloc(void **ptr, size_t bytes, unsigned int flags) { return emu_cudaMallocHost(ptr, bytes); }
cudaError_t emu_cudaFreeHost(void *ptr) { return free_alloc(ptr, ALLOC_PINNED, "cudaFreeHost"); }

cudaError_t emu_cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
    if (!free_bytes || !total_bytes) return set_error(cudaErrorInvalidValue);
    *total_bytes = total_device_bytes();
    *free_bytes = *total_bytes - std::min(g_device_bytes, *total_bytes);
    return cudaSuccess;
}

// ---- Copies ---------------------------------------------------------------------------------------------

static bool is_device(const void *p, size_t n) {
    const Alloc *a = find_live(p, n, nullptr);
    return a && a->kind == ALLOC_DEVICE;
}
static bool is_device_start(const void *p) {
    const Alloc *a = find_live(p, 1, nullptr);
    return a && a->kind == ALLOC_DEVICE;
}
static bool is_pinned(const void *p) {
    const Alloc *a = find_live(p, 1, nullptr);
    return a && a->kind == ALLOC_PINNED;
}

// Checks one side of a copy; returns false (after a report) when it is not what the kind says.
static bool check_side(const char *api, const char *side, const void *p, size_t n, bool device) {
    if (device) {
        if (is_device(p, n)) return true;
        emu_warn("error: %s: %s [%p, +%zu bytes) must lie inside one live device allocation, but %s", api, side, p, n,
                 describe_ptr(p).c_str());
        return false;
    }
    if (is_device_start(p)) {
        emu_warn("error: %s: %s %p is device memory, but the copy kind says host", api, side, p);
        return false;
    }
    return true;  // (freed device memory may be host memory again: malloc reuses it)
}

static cudaError_t memcpy_common(void *dst, const void *src, size_t n, cudaMemcpyKind kind, cudaStream_t stream,
                                 bool async, const char *api) {
    if (n == 0) return cudaSuccess;
    if (!dst || !src) return set_error(cudaErrorInvalidValue);
    if (kind == cudaMemcpyDefault) {
        bool dd = is_device_start(dst), sd = is_device_start(src);
        kind = dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                  : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
    }
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDeviceToDevice)
        return set_error(cudaErrorInvalidMemcpyDirection);
    bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (!check_side(api, "destination", dst, n, dst_dev) || !check_side(api, "source", src, n, src_dev))
        return set_error(cudaErrorInvalidValue);
    CUstream_st *s = async ? stream_of(stream, api) : &g_legacy;
    if (!s) return set_error(cudaErrorInvalidResourceHandle);
    if (!async && capturing_anywhere()) return set_error(cudaErrorStreamCaptureImplicit);
    switch (kind) {
    case cudaMemcpyHostToDevice: g_cnt.h2d_copies++, g_cnt.h2d_bytes += n; break;
    case cudaMemcpyDeviceToHost: g_cnt.d2h_copies++, g_cnt.d2h_bytes += n; break;
    case cudaMemcpyDeviceToDevice: g_cnt.d2d_copies++, g_cnt.d2d_bytes += n; break;
    default: break;
    }
    Op op;
    if (kind == cudaMemcpyHostToDevice && !is_pinned(src) && !s->capture) {
        // From pageable memory the call returns once the source has been staged: snapshot it now.
        auto snap = std::make_shared<std::vector<char>>((const char *)src, (const char *)src + n);
        op.run = [dst, snap] { memcpy(dst, snap->data(), snap->size()); };
    } else {
        op.run = [dst, src, n] { memmove(dst, src, n); };
    }
    if (kind == cudaMemcpyDeviceToHost && async && is_pinned(dst))
        op.at_enqueue = [dst, n] { fill_nan_pattern(dst, n); };  // undefined until the copy has run
    enqueue(s, std::move(op));
    // Synchronous copies, and copies to pageable host memory, return when done.
    bool wait = !async || (kind == cudaMemcpyDeviceToHost && !is_pinned(dst));
    if (wait && !s->capture) {
        g_cnt.host_syncs += !async;
        flush_all(s);
    }
    return cudaSuccess;
}

cudaError_t emu_cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    return memcpy_common(dst, src, bytes, kind, 0, false, "cudaMemcpy");
}
cudaError_t emu_cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
    return memcpy_common(dst, src, bytes, kind, stream, true, "cudaMemcpyAsync");
}

static cudaError_t memset_common(void *dst, int value, size_t n, cudaStream_t stream, bool async, const char *api) {
    if (n == 0) return cudaSuccess;
    if (!check_side(api, "destination", dst, n, true)) return set_error(cudaErrorInvalidValue);
    CUstream_st *s = async ? stream_of(stream, api) : &g_legacy;
    if (!s) return set_error(cudaErrorInvalidResourceHandle);
    if (!async && capturing_anywhere()) return set_error(cudaErrorStreamCaptureImplicit);
    g_cnt.memsets++;
    g_cnt.memset_bytes += n;
    const Alloc *a = find_live(dst, n, nullptr);
    if (a && a->lazy && value == 0)
        enqueue(s, Op{[dst, n] { zero_lazy(dst, n); }, nullptr});
    else
        enqueue(s, Op{[dst, value, n] { memset(dst, value, n); }, nullptr});
    if (!async) {
        g_cnt.host_syncs++;
        flush_all(s);
    }
    return cudaSuccess;
}

cudaError_t emu_cudaMemset(void *dst, int value, size_t bytes) {
    return memset_common(dst, value, bytes, 0, false, "cudaMemset");
}
cudaError_t emu_cudaMemsetAsync(void *dst, int value, size_t bytes, cudaStream_t stream) {
    return memset_common(dst, value, bytes, stream, true, "cudaMemsetAsync");
}

// ---- Streams and events -----------------------------------------------------------------------------------

cudaError_t emu_cudaStreamCreate(cudaStream_t *stream) { return emu_cudaStreamCreateWithFlags(stream, 0); }

cudaError_t emu_cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
    if (!stream || (flags & ~1u)) return set_error(cudaErrorInvalidValue);
    CUstream_st *s = new CUstream_st();
    s->blocking = !(flags & cudaStreamNonBlocking);
    g_streams.insert(s);
    *stream = s;
    return cudaSuccess;
}

cudaError_t emu_cudaStreamDestroy(cudaStream_t stream) {
    if (!stream || !g_streams.count(stream)) {
        emu_warn("error: cudaStreamDestroy(%p): not a live stream", (void *)stream);
        return set_error(cudaErrorInvalidResourceHandle);
    }
    if (stream->capture) return set_error(cudaErrorStreamCaptureUnsupported);
    flush_all(stream);  // queued work still completes
    g_streams.erase(stream);
    for (CUevent_st *e : g_events)
        if (e->stream == stream) e->stream = nullptr;
    delete stream;
    return cudaSuccess;
}

cudaError_t emu_cudaStreamSynchronize(cudaStream_t stream) {
    CUstream_st *s = stream_of(stream, "cudaStreamSynchronize");
    if (!s) return set_error(cudaErrorInvalidResourceHandle);
    if (s->capture) {
        s->capture_invalid = true;
        return set_error(cudaErrorStreamCaptureUnsupported);
    }
    g_cnt.host_syncs++;
    if (s == &g_legacy)
        for (CUstream_st *o : g_streams)
            if (o->blocking) flush_all(o);
    flush_all(s);
    return cudaSuccess;
}

cudaError_t emu_cudaStreamQuery(cudaStream_t stream) {
    CUstream_st *s = stream_of(stream, "cudaStreamQuery");
    if (!s) return set_error(cudaErrorInvalidResourceHandle);
    flush_all(s);  // a polling loop must terminate: the work completes when asked about
    return cudaSuccess;
}

cudaError_t emu_cudaEventCreate(cudaEvent_t *event) { return emu_cudaEventCreateWithFlags(event, 0); }
cudaError_t emu_cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
    if (!event) return set_error(cudaErrorInvalidValue);
    CUevent_st *e = new CUevent_st();
    g_events.insert(e);
    *event = e;
    return cudaSuccess;
}

cudaError_t emu_cudaEventDestroy(cudaEvent_t event) {
    if (!event || !g_events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
    g_events.erase(event);
    delete event;
    return cudaSuccess;
}

cudaError_t emu_cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
    if (!event || !g_events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
    CUstream_st *s = stream_of(stream, "cudaEventRecord");
    if (!s) return set_error(cudaErrorInvalidResourceHandle);
    if (s->capture) {  // inside a graph the event orders nothing else (single-stream capture)
        s->capture->ops.push_back(Op{[] {}, nullptr});
        return cudaSuccess;
    }
    event->recorded = true;
    event->stream = s;
    CUevent_st *e = event;
    enqueue(s, Op{[e] {
                      if (g_events.count(e)) e->t_ms = now_ms();
                  },
                  nullptr});
    event->seq = s->enq;
    return cudaSuccess;
}

static void event_complete(CUevent_st *e) {
    if (e->recorded && e->stream) flush(e->stream, e->seq);
}

cudaError_t emu_cudaEventSynchronize(cudaEvent_t event) {
    if (!event || !g_events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
    g_cnt.host_syncs++;
    event_complete(event);
    return cudaSuccess;
}

cudaError_t emu_cudaEventQuery(cudaEvent_t event) {
    if (!event || !g_events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
    event_complete(event);
    return cudaSuccess;
}

cudaError_t emu_cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
    if (!ms || !g_events.count(start) || !g_events.count(end)) return set_error(cudaErrorInvalidResourceHandle);
    event_complete(start);
    event_complete(end);
    *ms = (float)(end->t_ms - start->t_ms);
    return cudaSuccess;
}

cudaError_t emu_cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
    CUstream_st *s = stream_of(stream, "cudaStreamWaitEvent");
    if (!s || !event || !g_events.count(event)) return set_error(cudaErrorInvalidResourceHandle);
    if (!event->recorded || !event->stream) return cudaSuccess;
    if (s->capture && event->stream != s) {
        emu_warn("error: cudaStreamWaitEvent: joining a second stream into a capture is not emulated");
        return set_error(cudaErrorStreamCaptureUnsupported);
    }
    CUstream_st *es = event->stream;
    uint64_t seq = event->seq;
    enqueue(s, Op{[es, seq] {
                      if (g_streams.count(es) || es == &g_legacy) flush(es, seq);
                  },
                  nullptr});
    return cudaSuccess;
}

// ---- Graphs: stream capture records the operations, a launch replays them -------------------------------

cudaError_t emu_cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
    CUstream_st *s = stream_of(stream, "cudaStreamBeginCapture");
    if (!s) return set_error(cudaErrorInvalidResourceHandle);
    if (s == &g_legacy) return set_error(cudaErrorStreamCaptureUnsupported);  // the legacy stream cannot capture
    if (s->capture) return set_error(cudaErrorIllegalState);
    s->capture = new CUgraph_st();
    s->capture->calls = g_cnt;  // the counters at the start; EndCapture keeps the difference
    s->capture_invalid = false;
    return cudaSuccess;
}

cudaError_t emu_cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t *graph) {
    CUstream_st *s = stream_of(stream, "cudaStreamEndCapture");
    if (!s || !graph) return set_error(cudaErrorInvalidValue);
    if (!s->capture) return set_error(cudaErrorStreamCaptureUnmatched);
    CUgraph_st *g = s->capture;
    s->capture = nullptr;
    // Nothing captured has run: move the calls' counts from the counters into the graph.
    EmuCounters at_start = g->calls;
    g->calls = g_cnt;
    call_counters_add(&g->calls, at_start, -1);
    call_counters_add(&g_cnt, g->calls, -1);
    if (s->capture_invalid) {
        delete g;
        *graph = nullptr;
        return set_error(cudaErrorStreamCaptureInvalidated);
    }
    g_graphs.insert(g);
    *graph = g;
    return cudaSuccess;
}

cudaError_t emu_cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus *status) {
    CUstream_st *s = stream_of(stream, "cudaStreamIsCapturing");
    if (!s || !status) return set_error(cudaErrorInvalidValue);
    *status = s->capture ? (s->capture_invalid ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive)
                         : cudaStreamCaptureStatusNone;
    return cudaSuccess;
}

cudaError_t emu_cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags) {
    if (!exec || !graph || !g_graphs.count(graph)) return set_error(cudaErrorInvalidValue);
    CUgraphExec_st *x = new CUgraphExec_st();
    x->ops = graph->ops;
    x->calls = graph->calls;
    g_execs.insert(x);
    *exec = x;
    return cudaSuccess;
}

cudaError_t emu_cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
    if (!exec || !g_execs.count(exec)) return set_error(cudaErrorInvalidResourceHandle);
    CUstream_st *s = stream_of(stream, "cudaGraphLaunch");
    if (!s) return set_error(cudaErrorInvalidResourceHandle);
    g_cnt.graph_launches++;
    call_counters_add(&g_cnt, exec->calls, 1);
    for (const Op &op : exec->ops) enqueue(s, op);
    return cudaSuccess;
}

cudaError_t emu_cudaGraphDestroy(cudaGraph_t graph) {
    if (!graph || !g_graphs.count(graph)) return set_error(cudaErrorInvalidValue);
    g_graphs.erase(graph);
    delete graph;
    return cudaSuccess;
}

cudaError_t emu_cudaGraphExecDestroy(cudaGraphExec_t exec) {
    if (!exec || !g_execs.count(exec)) return set_error(cudaErrorInvalidValue);
    g_execs.erase(exec);
    delete exec;
    return cudaSuccess;
}

cudaError_t emu_cudaProfilerStart(void) { return cudaSuccess; }
cudaError_t emu_cudaProfilerStop(void) { return cudaSuccess; }

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------
// cuBLAS: sgemm from the BLAS definition, column-major: C = alpha op(A) op(B) + beta C.

struct cublasContext {
    cudaStream_t stream = nullptr;
    cublasMath_t math = CUBLAS_DEFAULT_MATH;
};
static std::set<cublasContext *> g_handles;

// TF32 keeps 10 explicit mantissa bits; the tensor cores round the inputs to nearest.
static inline float to_tf32(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf, NaN
    u += 0x1000u + ((u >> 13) & 1u);
    u &= ~0x1fffu;
    memcpy(&x, &u, 4);
    return x;
}

// Operand extents in elements: a column-major rows x cols matrix with leading dimension ld.
static size_t extent(int rows, int cols, int ld) {
    return rows == 0 || cols == 0 ? 0 : (size_t)(cols - 1) * (size_t)ld + (size_t)rows;
}

static void check_operand(const char *api, const char *name, const float *p, size_t elems, long long stride,
                          int batch) {
    if (elems == 0 || batch == 0) return;
    long long first = std::min(0ll, stride * (batch - 1)), last = std::max(0ll, stride * (batch - 1));
    const float *lo = p + first;
    size_t n = (size_t)(last - first) + elems;
    if (!is_device(lo, n * sizeof(float)))
        emu_fail("%s: operand %s spans [%p, +%zu bytes) (%d batch%s, stride %lld) outside one live device "
                 "allocation: %s", api, name, (const void *)lo, n * sizeof(float), batch, batch == 1 ? "" : "es",
                 stride, describe_ptr(lo).c_str());
}

static cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float *alpha, const float *A, int lda, long long sa, const float *B, int ldb,
                           long long sb, const float *beta, float *C, int ldc, long long sc, int batch,
                           const char *api) {
    if (!h || !g_handles.count(h)) return CUBLAS_STATUS_NOT_INITIALIZED;
    auto op_ok = [](cublasOperation_t t) { return t == CUBLAS_OP_N || t == CUBLAS_OP_T || t == CUBLAS_OP_C; };
    if (!op_ok(ta) || !op_ok(tb) || m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
    int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
    int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
    if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
    g_cnt.cublas_calls++;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    float al = *alpha, be = *beta;  // host pointer mode: read at the call
    bool reads_ab = k > 0 && al != 0.0f;
    if (reads_ab) {
        check_operand(api, "A", A, extent(a_rows, a_cols, lda), sa, batch);
        check_operand(api, "B", B, extent(b_rows, b_cols, ldb), sb, batch);
    }
    check_operand(api, "C", C, extent(m, n, ldc), sc, batch);
    uint64_t fam_flops = 2ull * m * n * k * batch;
    uint64_t fam_read = (uint64_t)batch * 4 * ((reads_ab ? (uint64_t)m * k + (uint64_t)k * n : 0) +
                                               (be != 0.0f ? (uint64_t)m * n : 0));
    uint64_t fam_written = (uint64_t)batch * 4 * m * n;
    g_cnt.cublas_flops += fam_flops;
    g_cnt.cublas_bytes_read += fam_read;
    g_cnt.cublas_bytes_written += fam_written;
    std::string fam = gemm_family_key(api, ta, tb, m, n, k, batch);
    bool tf32 = h->math == CUBLAS_TF32_TENSOR_OP_MATH;
    CUstream_st *s = stream_of(h->stream, api);
    if (!s) return CUBLAS_STATUS_EXECUTION_FAILED;
    char shape[160];
    snprintf(shape, sizeof(shape), "%s %d %d m%d n%d k%d lda%d ldb%d ldc%d x%d tf32 %d", api, (int)ta, (int)tb, m, n, k,
             lda, ldb, ldc, batch, (int)tf32);
    note_use(shape, s->capture != nullptr);
    if (g_skip_bodies) return CUBLAS_STATUS_SUCCESS;  // validated and counted; nothing computed (launch recording)
    enqueue(s, Op{[=] {
        gemm_family_count(fam, fam_flops, fam_read, fam_written);
        // op(A) as rows of length k and op(B) as columns of length k, so the inner product is contiguous.
        std::vector<float> ap((size_t)m * k), bp((size_t)n * k);
        for (int bi = 0; bi < batch; bi++) {
            const float *Ab = A + sa * bi, *Bb = B + sb * bi;
            float *Cb = C + sc * bi;
            if (reads_ab) {
                for (int i = 0; i < m; i++)
                    for (int p = 0; p < k; p++) {
                        float v = ta == CUBLAS_OP_N ? Ab[i + (size_t)p * lda] : Ab[p + (size_t)i * lda];
                        ap[(size_t)i * k + p] = tf32 ? to_tf32(v) : v;
                    }
                for (int j = 0; j < n; j++)
                    for (int p = 0; p < k; p++) {
                        float v = tb == CUBLAS_OP_N ? Bb[p + (size_t)j * ldb] : Bb[j + (size_t)p * ldb];
                        bp[(size_t)j * k + p] = tf32 ? to_tf32(v) : v;
                    }
            }
            for (int j = 0; j < n; j++)
                for (int i = 0; i < m; i++) {
                    double acc = 0.0;
                    if (reads_ab) {
                        const float *x = &ap[(size_t)i * k], *y = &bp[(size_t)j * k];
                        for (int p = 0; p < k; p++) acc += (double)x[p] * (double)y[p];
                    }
                    float *c = &Cb[i + (size_t)j * ldc];
                    // beta == 0: C is not read (it may hold NaN), as BLAS specifies.
                    *c = be == 0.0f ? (float)((double)al * acc) : (float)((double)al * acc + (double)be * *c);
                }
        }
    }, nullptr});
    return CUBLAS_STATUS_SUCCESS;
}

extern "C" {

cublasStatus_t emu_cublasCreate(cublasHandle_t *handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    cublasContext *h = new cublasContext();
    g_handles.insert(h);
    *handle = h;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasDestroy(cublasHandle_t handle) {
    if (!handle || !g_handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    g_handles.erase(handle);
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
    if (!handle || !g_handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream_of(stream, "cublasSetStream")) return CUBLAS_STATUS_INVALID_VALUE;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasGetStream(cublasHandle_t handle, cudaStream_t *stream) {
    if (!handle || !g_handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!stream) return CUBLAS_STATUS_INVALID_VALUE;
    *stream = handle->stream;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
    if (!handle || !g_handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    int base = (int)mode & ~(int)CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION;
    if (base < 0 || base > 3) return CUBLAS_STATUS_INVALID_VALUE;
    handle->math = (cublasMath_t)base;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasGetMathMode(cublasHandle_t handle, cublasMath_t *mode) {
    if (!handle || !g_handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!mode) return CUBLAS_STATUS_INVALID_VALUE;
    *mode = handle->math;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasSetPointerMode(cublasHandle_t handle, cublasPointerMode_t mode) {
    if (!handle || !g_handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (mode != CUBLAS_POINTER_MODE_HOST) return CUBLAS_STATUS_NOT_SUPPORTED;  // device scalars are not emulated
    return CUBLAS_STATUS_SUCCESS;
}

// The products here need no workspace; the buffer is checked as cuBLAS documents it (device memory of the
// given size, 256-byte aligned; NULL with size 0 restores the default).
cublasStatus_t emu_cublasSetWorkspace(cublasHandle_t handle, void *workspace, size_t bytes) {
    if (!handle || !g_handles.count(handle)) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes == 0) return CUBLAS_STATUS_SUCCESS;
    if (!workspace || ((uintptr_t)workspace & 255) || !is_device(workspace, bytes)) {
        emu_warn("error: cublasSetWorkspace: %zu bytes at %p are not one 256-byte aligned device allocation: %s",
                 bytes, workspace, describe_ptr(workspace).c_str());
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t emu_cublasSgemm(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                               int k, const float *alpha, const float *A, int lda, const float *B, int ldb,
                               const float *beta, float *C, int ldc) {
    return gemm(handle, transa, transb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1, "cublasSgemm");
}

cublasStatus_t emu_cublasSgemmStridedBatched(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb,
                                             int m, int n, int k, const float *alpha, const float *A, int lda,
                                             long long strideA, const float *B, int ldb, long long strideB,
                                             const float *beta, float *C, int ldc, long long strideC, int batchCount) {
    return gemm(handle, transa, transb, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C, ldc, strideC,
                batchCount, "cublasSgemmStridedBatched");
}

const char *emu_cublasGetStatusName(cublasStatus_t s) {
    switch (s) {
#define N(x) case x: return #x;
    N(CUBLAS_STATUS_SUCCESS) N(CUBLAS_STATUS_NOT_INITIALIZED) N(CUBLAS_STATUS_ALLOC_FAILED)
    N(CUBLAS_STATUS_INVALID_VALUE) N(CUBLAS_STATUS_ARCH_MISMATCH) N(CUBLAS_STATUS_MAPPING_ERROR)
    N(CUBLAS_STATUS_EXECUTION_FAILED) N(CUBLAS_STATUS_INTERNAL_ERROR) N(CUBLAS_STATUS_NOT_SUPPORTED)
    N(CUBLAS_STATUS_LICENSE_ERROR)
#undef N
    }
    return "CUBLAS_STATUS_UNKNOWN";
}

const char *emu_cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    default: return "cuBLAS error (emulated)";
    }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------
// cuRAND: the Philox4x32-10 device generator, LEGACY ordering. Output g of the stream (seed s) is word g % 4 of
// Philox4x32-10(counter = {q lo, q hi, t lo, t hi}, key = {s lo, s hi}) with block p = g / 4, thread t =
// p % 65536 and iteration q = p / 65536 (cuRAND's legacy launch of 65,536 threads, each thread's subsequence
// t advanced by q blocks), uniform = x * 2^-32 + 2^-33 in float. Written from the Random123 definition.

struct curandGenerator_st {
    unsigned long long seed = 0, offset = 0;
    cudaStream_t stream = nullptr;
    curandOrdering_t ordering = CURAND_ORDERING_PSEUDO_DEFAULT;
    bool warned = false;
};
static std::set<curandGenerator_st *> g_gens;

static void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * ctr[0], p1 = (uint64_t)0xCD9E8D57u * ctr[2];
        uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0, hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
        uint32_t n0 = hi1 ^ ctr[1] ^ k0, n2 = hi0 ^ ctr[3] ^ k1;
        ctr[0] = n0;
        ctr[1] = lo1;
        ctr[2] = n2;
        ctr[3] = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

static void philox_legacy(unsigned long long seed, unsigned long long offset, size_t n, uint32_t *out) {
    uint64_t g = offset, end = offset + n;
    while (g < end) {
        uint64_t p = g / 4, q = p / 65536, t = p % 65536;
        uint32_t ctr[4] = {(uint32_t)q, (uint32_t)(q >> 32), (uint32_t)t, (uint32_t)(t >> 32)};
        philox4x32_10(ctr, (uint32_t)seed, (uint32_t)(seed >> 32));
        for (int j = (int)(g % 4); j < 4 && g < end; j++, g++) out[g - offset] = ctr[j];
    }
}

static curandStatus_t generate(curandGenerator_t gen, void *out, size_t n, bool uniform) {
    if (!gen || !g_gens.count(gen)) return CURAND_STATUS_NOT_INITIALIZED;
    if (n == 0) return CURAND_STATUS_SUCCESS;
    if (!is_device(out, n * 4)) {
        emu_warn("error: curandGenerate%s: output [%p, +%zu bytes) is not inside one live device allocation: %s",
                 uniform ? "Uniform" : "", out, n * 4, describe_ptr(out).c_str());
        return CURAND_STATUS_LAUNCH_FAILURE;
    }
    if (gen->ordering != CURAND_ORDERING_PSEUDO_LEGACY && !gen->warned && env_int("MLM_EMU_QUIET", 0) == 0) {
        emu_warn("note: a Philox generator with ordering %d is emulated in LEGACY ordering; on a device only "
                 "CURAND_ORDERING_PSEUDO_LEGACY is guaranteed to give this stream", (int)gen->ordering);
        gen->warned = true;
    }
    CUstream_st *s = stream_of(gen->stream, "curandGenerate");
    if (!s) return CURAND_STATUS_LAUNCH_FAILURE;
    g_cnt.curand_calls++;
    g_cnt.curand_values += n;
    if (g_skip_bodies) {  // launch recording: the stream advances, nothing is generated
        gen->offset += n;
        return CURAND_STATUS_SUCCESS;
    }
    unsigned long long seed = gen->seed, offset = gen->offset;
    enqueue(s, Op{[=] {
        uint32_t *u = (uint32_t *)out;
        philox_legacy(seed, offset, n, u);
        if (uniform)
            for (size_t i = 0; i < n; i++) {
                float scaled = (float)u[i] * 2.3283064e-10f;  // separate roundings, as _curand_uniform
                float f = scaled + 2.3283064e-10f / 2.0f;
                memcpy(&u[i], &f, 4);
            }
    }, nullptr});
    gen->offset += n;
    return CURAND_STATUS_SUCCESS;
}

extern "C" {

curandStatus_t emu_curandCreateGenerator(curandGenerator_t *gen, curandRngType_t type) {
    if (!gen) return CURAND_STATUS_NOT_INITIALIZED;
    if (type != CURAND_RNG_PSEUDO_PHILOX4_32_10) return CURAND_STATUS_TYPE_ERROR;  // only Philox is emulated
    curandGenerator_st *g = new curandGenerator_st();
    g_gens.insert(g);
    *gen = g;
    return CURAND_STATUS_SUCCESS;
}

curandStatus_t emu_curandDestroyGenerator(curandGenerator_t gen) {
    if (!gen || !g_gens.count(gen)) return CURAND_STATUS_NOT_INITIALIZED;
    g_gens.erase(gen);
    delete gen;
    return CURAND_STATUS_SUCCESS;
}

curandStatus_t emu_curandSetStream(curandGenerator_t gen, cudaStream_t stream) {
    if (!gen || !g_gens.count(gen)) return CURAND_STATUS_NOT_INITIALIZED;
    gen->stream = stream;
    return CURAND_STATUS_SUCCESS;
}

curandStatus_t emu_curandSetPseudoRandomGeneratorSeed(curandGenerator_t gen, unsigned long long seed) {
    if (!gen || !g_gens.count(gen)) return CURAND_STATUS_NOT_INITIALIZED;
    gen->seed = seed;
    gen->offset = 0;  // cuRAND restarts the stream at offset 0 when the seed changes
    return CURAND_STATUS_SUCCESS;
}

curandStatus_t emu_curandSetGeneratorOffset(curandGenerator_t gen, unsigned long long offset) {
    if (!gen || !g_gens.count(gen)) return CURAND_STATUS_NOT_INITIALIZED;
    gen->offset = offset;
    return CURAND_STATUS_SUCCESS;
}

curandStatus_t emu_curandSetGeneratorOrdering(curandGenerator_t gen, curandOrdering_t order) {
    if (!gen || !g_gens.count(gen)) return CURAND_STATUS_NOT_INITIALIZED;
    if (order != CURAND_ORDERING_PSEUDO_BEST && order != CURAND_ORDERING_PSEUDO_DEFAULT &&
        order != CURAND_ORDERING_PSEUDO_LEGACY && order != CURAND_ORDERING_PSEUDO_DYNAMIC)
        return CURAND_STATUS_OUT_OF_RANGE;  // SEEDED is not valid for Philox; QUASI is for quasi generators
    gen->ordering = order;
    return CURAND_STATUS_SUCCESS;
}

curandStatus_t emu_curandGenerateUniform(curandGenerator_t gen, float *out, size_t n) {
    return generate(gen, out, n, true);
}
curandStatus_t emu_curandGenerate(curandGenerator_t gen, unsigned int *out, size_t n) {
    return generate(gen, out, n, false);
}
curandStatus_t emu_curandGetVersion(int *version) {
    if (!version) return CURAND_STATUS_NOT_INITIALIZED;
    *version = 10400;  // the cuRAND whose LEGACY Philox layout the emulation reproduces (checked in test_emu_layer)
    return CURAND_STATUS_SUCCESS;
}

// ---------------------------------------------------------------------------------------------------------
// NVTX: ranges must balance.

static std::vector<std::string> g_nvtx;
static bool g_nvtx_atexit = false;

static void nvtx_check_at_exit(void) {
    if (!g_nvtx.empty()) {
        fprintf(stderr, "emu: error: %zu NVTX range(s) still open at exit (innermost \"%s\"): a nvtxRangePushA "
                "without its nvtxRangePop\n", g_nvtx.size(), g_nvtx.back().c_str());
        fflush(stderr);
        _exit(1);
    }
}

static void counters_at_exit(void) {
    if (env_int("MLM_EMU_COUNT", 0)) {
        fprintf(stderr, "emu: counters at exit (MLM_EMU_COUNT):\n");
        emu_counters_print(stderr);
    }
}

__attribute__((constructor)) static void emu_init(void) {
#ifdef EMU_FP_CONTRACT
    // The kernels were compiled with FMA instructions (MLM_EMU_FP_CONTRACT): a CPU without them cannot run them.
    if (!__builtin_cpu_supports("fma")) {
        printf("SKIP: the emulated kernels were built with FMA contraction (MLM_EMU_FP_CONTRACT=ON) and this CPU has "
               "no FMA instructions; configure with -DMLM_EMU_FP_CONTRACT=OFF here\n");
        fflush(stdout);
        _exit(77);
    }
#endif
#if defined(__SANITIZE_THREAD__)
    __tsan_ignore_thread_begin();
    atexit(tsan_watch_host_at_exit);
#endif
    atexit(counters_at_exit);
}

int emu_nvtxRangePushA(const char *message) {
    if (!g_nvtx_atexit) {
        atexit(nvtx_check_at_exit);
        g_nvtx_atexit = true;
    }
    g_nvtx.push_back(message ? message : "");
    return (int)g_nvtx.size() - 1;
}

int emu_nvtxRangePop(void) {
    if (g_nvtx.empty()) emu_fail("nvtxRangePop without an open range (more pops than pushes)");
    g_nvtx.pop_back();
    return (int)g_nvtx.size();
}

void emu_nvtxMarkA(const char *message) {}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------
// The per-family breakdown for bench/ (bench_emu_step --json, bench/suite.py's roofline): every counter, each
// kernel by name (launches, bytes its loads and stores touch in device memory) and each cuBLAS family (the
// innermost NVTX range with its layer number dropped, the call and its shape: calls, FLOPs, operand bytes).

struct GemmFamily {
    std::string phase, api;
    char ta = 'N', tb = 'N';
    int m = 0, n = 0, k = 0, batch = 0;
    uint64_t calls = 0, flops = 0, bytes_read = 0, bytes_written = 0;
};
static std::map<std::string, GemmFamily> *g_gemm_families;  // leaked on purpose, as g_kstats
static std::map<std::string, GemmFamily> *g_gemm_shapes;     // key -> its description, filled at the call

static void gemm_family_reset(void) {
    if (g_gemm_families) g_gemm_families->clear();
}

// "forward layer 3" -> "forward layer": the layers share their shapes, so one family covers all of them.
static std::string nvtx_phase(void) {
    if (g_nvtx.empty()) return "-";
    std::string r = g_nvtx.back();
    while (!r.empty() && (isdigit((unsigned char)r.back()) || r.back() == ' ')) r.pop_back();
    return r.empty() ? "-" : r;
}

static char op_letter(cublasOperation_t t) { return t == CUBLAS_OP_N ? 'N' : t == CUBLAS_OP_T ? 'T' : 'C'; }

static std::string gemm_family_key(const char *api, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   int batch) {
    GemmFamily f;
    f.phase = nvtx_phase();
    // cuBLAS's own calls by their kind; the other libraries (emu_cublaslt.cc) name their family themselves.
    f.api = strstr(api, "Batched") ? "sgemm_strided_batched" : strncmp(api, "cublas", 6) == 0 ? "sgemm" : api;
    f.ta = op_letter(ta), f.tb = op_letter(tb);
    f.m = m, f.n = n, f.k = k, f.batch = batch;
    char key[256];
    snprintf(key, sizeof(key), "cublas %s %s %c%c m%d n%d k%d x%d", f.phase.c_str(), f.api.c_str(), f.ta, f.tb, m, n,
             k, batch);
    if (!g_gemm_shapes) g_gemm_shapes = new std::map<std::string, GemmFamily>();
    if (!g_gemm_shapes->count(key)) (*g_gemm_shapes)[key] = f;
    return key;
}

static void gemm_family_count(const std::string &key, uint64_t flops, uint64_t bytes_read, uint64_t bytes_written) {
    if (!g_gemm_families) g_gemm_families = new std::map<std::string, GemmFamily>();
    auto it = g_gemm_families->find(key);
    if (it == g_gemm_families->end()) it = g_gemm_families->emplace(key, (*g_gemm_shapes)[key]).first;
    GemmFamily &f = it->second;
    f.calls++;
    f.flops += flops;
    f.bytes_read += bytes_read;
    f.bytes_written += bytes_written;
}

static void json_string(FILE *f, const std::string &s) {
    fputc('"', f);
    for (char c : s) {
        if (c == '"' || c == '\\') fputc('\\', f);
        if ((unsigned char)c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

extern "C" void emu_counters_json(FILE *f) {
    EmuCounters c;
    emu_counters_get(&c);
    fprintf(f, "{\n \"schema\": \"mlm-emu-count/1\",\n \"bytes_counted\": %s,\n \"totals\": {", c.bytes_counted ? "true" : "false");
    const struct { const char *name; uint64_t v; } tot[] = {
        {"launches", c.launches}, {"blocks", c.blocks}, {"threads", c.threads}, {"cublas_calls", c.cublas_calls},
        {"cublas_flops", c.cublas_flops}, {"cublas_bytes_read", c.cublas_bytes_read},
        {"cublas_bytes_written", c.cublas_bytes_written}, {"curand_calls", c.curand_calls},
        {"curand_values", c.curand_values}, {"h2d_copies", c.h2d_copies}, {"h2d_bytes", c.h2d_bytes},
        {"d2h_copies", c.d2h_copies}, {"d2h_bytes", c.d2h_bytes}, {"d2d_copies", c.d2d_copies},
        {"d2d_bytes", c.d2d_bytes}, {"memsets", c.memsets}, {"memset_bytes", c.memset_bytes},
        {"host_syncs", c.host_syncs}, {"kernel_bytes_read", c.kernel_bytes_read},
        {"kernel_bytes_written", c.kernel_bytes_written}, {"device_bytes_live", c.device_bytes_live},
        {"device_bytes_peak", c.device_bytes_peak}};
    for (size_t i = 0; i < sizeof(tot) / sizeof(tot[0]); i++)
        fprintf(f, "%s\"%s\": %llu", i ? ", " : "", tot[i].name, (unsigned long long)tot[i].v);
    fprintf(f, "},\n \"kernels\": [");
    bool first = true;
    if (g_kstats)
        for (const auto &r : *g_kstats) {
            if (!r.second.launches) continue;
            fprintf(f, "%s\n  {\"name\": ", first ? "" : ",");
            json_string(f, r.first);
            fprintf(f, ", \"launches\": %llu, \"bytes_read\": %llu, \"bytes_written\": %llu}",
                    (unsigned long long)r.second.launches, (unsigned long long)r.second.bytes_read,
                    (unsigned long long)r.second.bytes_written);
            first = false;
        }
    fprintf(f, "\n ],\n \"gemms\": [");
    first = true;
    if (g_gemm_families)
        for (const auto &r : *g_gemm_families) {
            const GemmFamily &g = r.second;
            fprintf(f, "%s\n  {\"name\": ", first ? "" : ",");
            json_string(f, r.first);
            fprintf(f, ", \"phase\": ");
            json_string(f, g.phase);
            fprintf(f, ", \"api\": \"%s\", \"op\": \"%c%c\", \"m\": %d, \"n\": %d, \"k\": %d, \"batch\": %d, "
                    "\"calls\": %llu, \"flops\": %llu, \"bytes_read\": %llu, \"bytes_written\": %llu}",
                    g.api.c_str(), g.ta, g.tb, g.m, g.n, g.k, g.batch, (unsigned long long)g.calls,
                    (unsigned long long)g.flops, (unsigned long long)g.bytes_read, (unsigned long long)g.bytes_written);
            first = false;
        }
    fprintf(f, "\n ]\n}\n");
}

// ---------------------------------------------------------------------------------------------------------
// What the other parts of the layer use (emu_internal.h; emu_cublaslt.cc).

namespace emu_internal {

bool is_device_range(const void *p, size_t bytes) { return is_device(p, bytes); }
std::string describe(const void *p) { return describe_ptr(p); }

void fail(const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    emu_fail("%s", msg);
}

void warn(const char *fmt, ...) {
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    emu_warn("%s", msg);
}

bool quiet(void) { return env_int("MLM_EMU_QUIET", 0) != 0; }

bool enqueue_on(cudaStream_t stream, const char *api, std::function<void()> run) {
    CUstream_st *s = stream_of(stream, api);
    if (!s) return false;
    enqueue(s, Op{std::move(run), nullptr});
    return true;
}

static cublasOperation_t op_of(char t) { return t == 'N' ? CUBLAS_OP_N : t == 'T' ? CUBLAS_OP_T : CUBLAS_OP_C; }

std::string gemm_called(const char *api, char ta, char tb, int m, int n, int k, int batch, uint64_t flops,
                        uint64_t bytes_read, uint64_t bytes_written) {
    g_cnt.cublas_calls++;
    g_cnt.cublas_flops += flops;
    g_cnt.cublas_bytes_read += bytes_read;
    g_cnt.cublas_bytes_written += bytes_written;
    return gemm_family_key(api, op_of(ta), op_of(tb), m, n, k, batch);
}

void gemm_executed(const std::string &key, uint64_t flops, uint64_t bytes_read, uint64_t bytes_written) {
    gemm_family_count(key, flops, bytes_read, bytes_written);
}

}  // namespace emu_internal
