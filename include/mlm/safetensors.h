// safetensors.h: reading and writing the safetensors format (8-byte little-endian header length, JSON
// header of {name: {dtype, shape, data_offsets}} plus optional "__metadata__", then raw little-endian data).
#ifndef MLM_SAFETENSORS_H
#define MLM_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { ST_F32 = 0, ST_I32 = 1, ST_I64 = 2, ST_F64 = 3, ST_U8 = 4 } StDtype;

#define ST_MAX_DIMS 4

typedef struct {
    char *name;
    StDtype dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    size_t nbytes;
    const void *data;  // points into the file buffer (reader) or the caller's memory (writer)
} StTensor;

typedef struct {
    StTensor *tensors;
    int n;
    char *meta_json;   // raw JSON object text of "__metadata__" (or NULL)
    void *buffer;      // whole file (reader-owned)
} StFile;

// Read and validate a file. On failure returns nonzero and writes a message (naming the file and what
// is wrong: truncated, bad header, offsets out of range, unknown dtype) into err.
int st_read(const char *path, StFile *out, char *err, size_t errlen);
void st_free(StFile *f);
const StTensor *st_find(const StFile *f, const char *name);
// Look up the metadata string value for `key` (metadata values are strings in safetensors). NULL if absent.
// The returned string is malloc'ed and owned by the caller.
char *st_meta_get(const StFile *f, const char *key);

// Write tensors (data from each StTensor.data) and optional metadata key/value string pairs atomically:
// to path.tmp, fsync, rename. Returns nonzero and fills err on failure.
int st_write(const char *path, const StTensor *tensors, int n, const char *const *meta_kv, int n_meta,
             char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
