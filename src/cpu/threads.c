// threads.c: cpu_threads_prepare, the OpenMP wait policy of the CPU backend (see mlm/cpu_threads.h).
#include "mlm/cpu_threads.h"

#include <stdlib.h>
#include <unistd.h>

void cpu_threads_prepare(char **argv) {
    if (getenv("OMP_WAIT_POLICY") != NULL || getenv("GOMP_SPINCOUNT") != NULL) return;  // the user's choice
    if (setenv("OMP_WAIT_POLICY", "passive", 1) != 0) return;
    execv("/proc/self/exe", argv);
    // Only reached when the exec failed (no /proc): keep running with the runtime's default policy, and
    // leave the environment as it was for any child process.
    unsetenv("OMP_WAIT_POLICY");
}
