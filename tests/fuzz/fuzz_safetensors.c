// fuzz_safetensors.c: libFuzzer harness for the safetensors reader (st_read, st_find, st_meta_get) with a
// write-and-reread round trip through st_write. Properties: every tensor of an accepted file lies inside the
// file with nbytes = numel * element size (all its bytes are read, so ASan sees any overrun); st_find finds
// each by name; rewriting the tensors and the metadata gives a file that reads back to the same tensors.
#include "fuzz_util.h"

#include "mlm/safetensors.h"

static const size_t elem_size[] = {4, 4, 8, 8, 1};  // StDtype order: F32 I32 I64 F64 U8

static uint32_t touch_bytes(const void *p, size_t n) {
    const uint8_t *b = p;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 16777619u;
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *path = fuzz_input_file(data, size);
    StFile f;
    char err[1024];
    if (st_read(path, &f, err, sizeof(err)) != 0) return 0;
    for (int i = 0; i < f.n; i++) {
        const StTensor *t = &f.tensors[i];
        if ((unsigned)t->dtype > ST_U8 || t->ndim < 0 || t->ndim > ST_MAX_DIMS) fuzz_fail("tensor %d: dtype/ndim", i);
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0) fuzz_fail("tensor '%s': negative dimension", t->name);
            numel *= (size_t)t->shape[d];
        }
        if (numel * elem_size[t->dtype] != t->nbytes) fuzz_fail("tensor '%s': nbytes %zu != shape", t->name, t->nbytes);
        (void)touch_bytes(t->data, t->nbytes);
        if (st_find(&f, t->name) != t) fuzz_fail("st_find does not find '%s' (or finds another)", t->name);
    }
    static const char *keys[] = {"format", "config", "vocab", "n_params", "d_model", "step", ""};
    for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) free(st_meta_get(&f, keys[k]));

    // Round trip: write what was read (tensors; the metadata keys above that exist) and read it back.
    char out[128];
    snprintf(out, sizeof(out), "%s/roundtrip.safetensors", fuzz_scratch_dir());
    const char *meta[2 * 7];
    char *vals[7] = {0};
    int n_meta = 0;
    for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++)
        if ((vals[k] = st_meta_get(&f, keys[k]))) {
            meta[2 * n_meta] = keys[k];
            meta[2 * n_meta + 1] = vals[k];
            n_meta++;
        }
    if (st_write(out, f.tensors, f.n, meta, n_meta, err, sizeof(err)) != 0)
        fuzz_fail("st_write refused what st_read accepted: %s", err);
    StFile g;
    if (st_read(out, &g, err, sizeof(err)) != 0) fuzz_fail("st_read refused what st_write wrote: %s", err);
    if (g.n != f.n) fuzz_fail("%d tensors written, %d read back", f.n, g.n);
    for (int i = 0; i < f.n; i++) {
        const StTensor *a = &f.tensors[i], *b = st_find(&g, a->name);
        if (!b || b->dtype != a->dtype || b->ndim != a->ndim || b->nbytes != a->nbytes ||
            memcmp(b->shape, a->shape, sizeof(a->shape[0]) * (size_t)a->ndim) != 0 ||
            (a->nbytes && memcmp(a->data, b->data, a->nbytes) != 0))
            fuzz_fail("tensor '%s' changed in the round trip", a->name);
    }
    for (int m = 0; m < n_meta; m++) {
        char *v = st_meta_get(&g, meta[2 * m]);
        if (!v || strcmp(v, meta[2 * m + 1]) != 0) fuzz_fail("metadata '%s' changed in the round trip", meta[2 * m]);
        free(v);
    }
    for (size_t k = 0; k < 7; k++) free(vals[k]);
    st_free(&g);
    st_free(&f);
    return 0;
}
