// common.h: version, fatal-error helpers, checked allocation and small utilities shared by all host code.
#ifndef MLM_COMMON_H
#define MLM_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MLM_VERSION "0.1.0"

// Exit codes: 1 = runtime failure (I/O, numerics, device), 2 = bad usage or bad configuration.
#define MLM_EXIT_FAILURE 1
#define MLM_EXIT_USAGE 2

#if defined(__GNUC__)
#define MLM_NORETURN __attribute__((noreturn))
#define MLM_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define MLM_NORETURN
#define MLM_PRINTF(a, b)
#endif

// Print "mlm: error: <message>" to stderr and exit with `code`.
MLM_NORETURN void mlm_fatal(int code, const char *fmt, ...) MLM_PRINTF(2, 3);
// Print "mlm: warning: <message>" to stderr.
void mlm_warn(const char *fmt, ...) MLM_PRINTF(1, 2);
// Format a message into the caller's err[errlen] buffer (the err/errlen convention of the readers); a NULL or
// empty buffer is left alone.
void mlm_set_error(char *err, size_t errlen, const char *fmt, ...) MLM_PRINTF(3, 4);

// malloc/calloc that exit with a message naming `what` and the byte count on failure.
void *mlm_malloc(size_t bytes, const char *what);
void *mlm_calloc(size_t count, size_t size, const char *what);
char *mlm_strdup(const char *s);
// Zeroed, 64-byte aligned memory for the CPU model's big buffers (parameters, gradients, activations, matmul
// workspaces); free() it. From 2 MiB up it is aligned to 2 MiB and marked for transparent huge pages
// (madvise): the GEMM's row and panel walks over tens of megabytes otherwise miss the TLB every few rows, and
// many kernels (Debian's, this project's VM) grant huge pages only where asked.
void *mlm_calloc_large(size_t count, size_t size, const char *what);

// Read a whole file into a NUL-terminated buffer. Returns NULL and sets errno on failure (EISDIR for a
// directory, so that messages say what is wrong instead of "Input/output error").
char *mlm_read_file(const char *path, size_t *len_out);

// Open `path` for reading only if it is a regular file of at most max_bytes (0: any size). FIFOs, devices,
// sockets and directories are refused without blocking (a FIFO waits for a writer forever, /dev/zero never
// ends). `what` names the file's role in messages ("vocabulary", "shard"). Returns the descriptor (close it)
// and the size in *size_out, or -1 with a message naming the file.
int mlm_open_regular(const char *path, const char *what, uint64_t max_bytes, uint64_t *size_out, char *err,
                     size_t errlen);
// The whole of such a file, NUL-terminated (malloc'ed; *len_out = its length). NULL with a message.
char *mlm_read_regular(const char *path, const char *what, uint64_t max_bytes, size_t *len_out, char *err,
                       size_t errlen);
// What kind of file st_mode is, for messages: "a directory", "a FIFO (named pipe)", "a character device" ...
const char *mlm_file_kind(unsigned mode);

// Strict integers (config keys, command-line numbers, checkpoint metadata): plain decimal digits with an
// optional leading '-' (no '+', spaces, hex, octal or exponent), within [min, max]. Return 0 on success; on
// failure 1 = not a plain decimal integer, 2 = outside [min, max] (the value is not stored either way).
int mlm_parse_long(const char *s, long min, long max, long *out);
int mlm_parse_u64(const char *s, uint64_t max, uint64_t *out);

// Send SIGINT and SIGTERM to `handler`, without SA_RESTART: a read or open blocked on a pipe or a socket returns
// (EINTR) so that the program can stop at its next check instead of waiting for data that may never come.
void mlm_on_stop_signals(void (*handler)(int));

// Monotonic wall clock in seconds.
double mlm_now(void);

#define MLM_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MLM_MAX(a, b) ((a) > (b) ? (a) : (b))
#define MLM_CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

#ifdef __cplusplus
}
#endif

#endif
