// cpu_threads.h: how the CPU backend's OpenMP threads wait (set before the OpenMP runtime starts).
#ifndef MLM_CPU_THREADS_H
#define MLM_CPU_THREADS_H

// Call first thing in main(). libgomp reads OMP_WAIT_POLICY when it is loaded, before main() runs, and its
// default lets a thread that waits at a barrier spin for a while. A training step has hundreds of parallel
// regions, so on a core shared with another busy process the spinning thread takes the time its partner
// needs: with one busy loop beside it, 2 threads ran 5x slower than with passive waiting. When the user has
// set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT, this sets OMP_WAIT_POLICY=passive and re-executes the
// program (/proc/self/exe, same arguments) so that the runtime starts with it; if that cannot be done, the
// program goes on as it is. Set OMP_WAIT_POLICY yourself (e.g. active on a dedicated machine) to opt out.
void cpu_threads_prepare(char **argv);

#endif
