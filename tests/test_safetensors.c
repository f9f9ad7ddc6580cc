// test_safetensors.c: safetensors round trips, reading the PyTorch-written fixture, and rejection of bad files.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/safetensors.h"
#include "test_util.h"

static char tmpdir[256];

static void tmp_path(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", tmpdir, name); }

// Write a file by hand: 8-byte little-endian header length, the header text, then `data`.
static void write_raw(const char *path, uint64_t declared_hlen, const char *header, const void *data, size_t dlen) {
    FILE *f = fopen(path, "wb");
    if (!f) mlm_fatal(1, "cannot create %s", path);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(declared_hlen >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    if (dlen) fwrite(data, 1, dlen, f);
    fclose(f);
}

// Expect st_read to fail with a message that names the file (and, if given, contains `needle`).
static void expect_reject(const char *what, const char *path, const char *needle) {
    StFile f;
    char err[512] = "";
    int rc = st_read(path, &f, err, sizeof(err));
    CHECK(rc != 0, "%s: st_read accepted a bad file", what);
    CHECK(strstr(err, path) != NULL, "%s: message does not name the file: \"%s\"", what, err);
    if (needle) CHECK(strstr(err, needle) != NULL, "%s: message \"%s\" lacks \"%s\"", what, err, needle);
    printf("  rejected %-34s %s\n", what, err);
    if (rc == 0) st_free(&f);
}

static void expect_bad_header(const char *what, const char *header, const char *needle) {
    char path[512];
    tmp_path(path, sizeof(path), "bad.safetensors");
    static const unsigned char data[16] = {0};
    write_raw(path, strlen(header), header, data, sizeof(data));
    expect_reject(what, path, needle);
}

static void test_round_trip(void) {
    char path[512];
    tmp_path(path, sizeof(path), "rt.safetensors");
    float f32[6] = {1.0f, -2.5f, 3.25f, 1e-30f, -0.0f, 65504.0f};
    int64_t i64[4] = {0, -1, INT64_MAX, 66};
    double scalar = 3.141592653589793;
    uint8_t u8[5] = {0, 1, 2, 254, 255};
    int32_t i32[4] = {-7, 7, INT32_MIN, INT32_MAX};
    // Mixed element sizes in an order that would misalign if written naively (U8 before F64).
    StTensor ts[6] = {
        {.name = "bytes", .dtype = ST_U8, .ndim = 1, .shape = {5}, .nbytes = sizeof(u8), .data = u8},
        {.name = "layer.0.weight", .dtype = ST_F32, .ndim = 2, .shape = {2, 3}, .nbytes = sizeof(f32), .data = f32},
        {.name = "ids", .dtype = ST_I64, .ndim = 1, .shape = {4}, .nbytes = sizeof(i64), .data = i64},
        {.name = "step", .dtype = ST_F64, .ndim = 0, .nbytes = sizeof(scalar), .data = &scalar},
        {.name = "name \"with\" \\ escapes\n", .dtype = ST_I32, .ndim = 4, .shape = {1, 2, 1, 2}, .nbytes = sizeof(i32), .data = i32},
        {.name = "empty", .dtype = ST_F32, .ndim = 2, .shape = {0, 3}, .nbytes = 0, .data = NULL},
    };
    const char *meta[] = {"vocab", "67", "note", "quote \" backslash \\ tab \t caf\xc3\xa9", "empty", ""};
    char err[512] = "";
    int rc = st_write(path, ts, 6, meta, 3, err, sizeof(err));
    CHECK(rc == 0, "st_write failed: %s", err);
    char tmp[600];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    CHECK(access(tmp, F_OK) != 0, "temporary file %s left behind", tmp);

    // The header length is a multiple of 8 (padded with spaces).
    FILE *fp = fopen(path, "rb");
    unsigned char len[8] = {0};
    CHECK(fp && fread(len, 1, 8, fp) == 8, "cannot reread %s", path);
    if (fp) fclose(fp);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | len[i];
    CHECK(hlen % 8 == 0, "header length %llu is not a multiple of 8", (unsigned long long)hlen);

    StFile f;
    rc = st_read(path, &f, err, sizeof(err));
    CHECK(rc == 0, "st_read failed: %s", err);
    if (rc) return;
    CHECK(f.n == 6, "read %d tensors, wrote 6", f.n);
    for (int i = 0; i < 6; i++) {
        const StTensor *t = st_find(&f, ts[i].name);
        CHECK(t != NULL, "tensor \"%s\" missing after round trip", ts[i].name);
        if (!t) continue;
        CHECK(t->dtype == ts[i].dtype, "%s: dtype %d, wrote %d", ts[i].name, t->dtype, ts[i].dtype);
        CHECK(t->ndim == ts[i].ndim, "%s: ndim %d, wrote %d", ts[i].name, t->ndim, ts[i].ndim);
        for (int d = 0; d < ts[i].ndim; d++)
            CHECK(t->shape[d] == ts[i].shape[d], "%s: dim %d is %lld", ts[i].name, d, (long long)t->shape[d]);
        CHECK(t->nbytes == ts[i].nbytes, "%s: %zu bytes, wrote %zu", ts[i].name, t->nbytes, ts[i].nbytes);
        if (t->nbytes) CHECK(memcmp(t->data, ts[i].data, t->nbytes) == 0, "%s: data differs", ts[i].name);
        // Readers use the data in place, so it must be aligned to its element size.
        size_t esz = ts[i].dtype == ST_U8 ? 1 : (ts[i].dtype == ST_F64 || ts[i].dtype == ST_I64) ? 8 : 4;
        if (t->nbytes) CHECK((uintptr_t)t->data % esz == 0, "%s: data misaligned", ts[i].name);
    }
    const StTensor *sc = st_find(&f, "step");
    if (sc) {
        double v;
        memcpy(&v, sc->data, sizeof(v));
        CHECK(sc->ndim == 0 && v == scalar, "scalar round trip gave ndim %d value %.17g", sc->ndim, v);
    }
    CHECK(st_find(&f, "missing") == NULL, "st_find found a tensor that was never written");
    for (int m = 0; m < 3; m++) {
        char *v = st_meta_get(&f, meta[2 * m]);
        CHECK(v && strcmp(v, meta[2 * m + 1]) == 0, "metadata %s = \"%s\", wrote \"%s\"", meta[2 * m], v ? v : "(null)",
              meta[2 * m + 1]);
        free(v);
    }
    char *none = st_meta_get(&f, "absent");
    CHECK(none == NULL, "st_meta_get invented a value for an absent key");
    free(none);
    st_free(&f);

    // Overwriting an existing file works (rename replaces it) and files without tensors are valid.
    rc = st_write(path, NULL, 0, NULL, 0, err, sizeof(err));
    CHECK(rc == 0, "writing an empty file failed: %s", err);
    rc = st_read(path, &f, err, sizeof(err));
    CHECK(rc == 0 && f.n == 0 && f.meta_json == NULL, "empty file read back wrongly: %s", err);
    if (rc == 0) st_free(&f);

    // Writer-side validation.
    StTensor bad = {.name = "x", .dtype = ST_F32, .ndim = 1, .shape = {3}, .nbytes = 8, .data = f32};
    err[0] = '\0';
    CHECK(st_write(path, &bad, 1, NULL, 0, err, sizeof(err)) != 0 && err[0], "st_write accepted nbytes != shape");
    StTensor dup[2] = {ts[1], ts[1]};
    err[0] = '\0';
    CHECK(st_write(path, dup, 2, NULL, 0, err, sizeof(err)) != 0 && err[0], "st_write accepted a duplicate name");
    char nodir[600];
    snprintf(nodir, sizeof(nodir), "%s/no/such/dir/x.safetensors", tmpdir);
    err[0] = '\0';
    CHECK(st_write(nodir, ts, 1, NULL, 0, err, sizeof(err)) != 0 && strstr(err, "x.safetensors.tmp"),
          "st_write into a missing directory: \"%s\"", err);
}

static void test_fixture(void) {
    const char *src = getenv("MLM_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof(path), "%s/tests/fixtures/reference_small.safetensors", src ? src : ".");
    StFile f;
    char err[512] = "";
    int rc = st_read(path, &f, err, sizeof(err));
    CHECK(rc == 0, "reading the PyTorch fixture failed: %s", err);
    if (rc) return;
    char *vocab = st_meta_get(&f, "vocab"), *dm = st_meta_get(&f, "d_model"), *eps = st_meta_get(&f, "ln_eps");
    CHECK(vocab && strcmp(vocab, "67") == 0, "metadata vocab = %s", vocab ? vocab : "(null)");
    CHECK(dm && strcmp(dm, "16") == 0, "metadata d_model = %s", dm ? dm : "(null)");
    CHECK(eps && atof(eps) == 1e-5, "metadata ln_eps = %s", eps ? eps : "(null)");
    free(vocab), free(dm), free(eps);
    const StTensor *w = st_find(&f, "src_embed.linear.weight");
    CHECK(w && w->dtype == ST_F32 && w->ndim == 2 && w->shape[0] == 67 && w->shape[1] == 16,
          "src_embed.linear.weight missing or wrongly shaped");
    const StTensor *ids = st_find(&f, "input_ids");
    CHECK(ids && ids->dtype == ST_I64 && ids->ndim == 2 && ids->shape[0] == 8 && ids->shape[1] == 3,
          "input_ids missing or wrongly shaped");
    if (ids) {
        const int64_t *v = ids->data;
        int ok = 1;
        for (int i = 0; i < 24; i++) ok &= v[i] >= 0 && v[i] < 67;
        CHECK(ok, "input_ids hold ids outside [0, 67)");
    }
    const StTensor *loss = st_find(&f, "loss");
    CHECK(loss && loss->ndim == 1 && loss->shape[0] == 1, "loss missing or not shaped [1]");
    if (loss && loss->dtype == ST_F32) {
        float l;
        memcpy(&l, loss->data, 4);
        CHECK(l > 0.0f && l < 10.0f, "implausible loss %g", l);
    }
    printf("  fixture %s: %d tensors\n", path, f.n);
    st_free(&f);
}

static void test_rejections(void) {
    char good[512], path[512];
    tmp_path(good, sizeof(good), "good.safetensors");
    tmp_path(path, sizeof(path), "cut.safetensors");
    float v[4] = {1, 2, 3, 4};
    StTensor t[2] = {
        {.name = "a", .dtype = ST_F32, .ndim = 1, .shape = {2}, .nbytes = 8, .data = v},
        {.name = "b", .dtype = ST_F32, .ndim = 1, .shape = {2}, .nbytes = 8, .data = v + 2},
    };
    const char *meta[] = {"k", "v"};
    char err[512];
    CHECK(st_write(good, t, 2, meta, 1, err, sizeof(err)) == 0, "st_write: %s", err);
    size_t len = 0;
    char *bytes = mlm_read_file(good, &len);
    CHECK(bytes != NULL, "cannot reread %s", good);
    if (!bytes) return;

    // Every proper prefix is rejected: inside the length word, inside the header, inside the data.
    size_t cuts[] = {0, 4, 7, 8, 9, 20, len - 16, len - 1};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        FILE *f = fopen(path, "wb");
        fwrite(bytes, 1, cuts[i], f);
        fclose(f);
        char what[64];
        snprintf(what, sizeof(what), "truncated to %zu of %zu bytes", cuts[i], len);
        expect_reject(what, path, "truncated");
    }
    free(bytes);

    const char *ok_hdr = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    write_raw(path, strlen(ok_hdr) + 1000, ok_hdr, v, 8);
    expect_reject("header length larger than file", path, "exceeds");
    write_raw(path, UINT64_MAX, ok_hdr, v, 8);
    expect_reject("header length 2^64-1", path, "exceeds");
    char missing[600];
    tmp_path(missing, sizeof(missing), "does-not-exist.safetensors");
    expect_reject("missing file", missing, "cannot open");

    expect_bad_header("overlapping offsets",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", "overlap");
    expect_bad_header("offsets beyond the data",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[8],\"data_offsets\":[0,32]}}", "outside");
    expect_bad_header("end before begin",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", "outside");
    expect_bad_header("size does not match shape",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", "needs 12 bytes");
    expect_bad_header("misaligned offset",
                      "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[2,10]}}", "multiple");
    expect_bad_header("unknown dtype",
                      "{\"a\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[0,4]}}", "BF16");
    expect_bad_header("five dimensions",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,1]}}", "more than 4");
    expect_bad_header("negative dimension",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,1]}}", "non-negative");
    expect_bad_header("fractional offset",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1.5]}}", "integer");
    expect_bad_header("missing data_offsets", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1]}}", "lacks");
    expect_bad_header("duplicate tensor",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", "twice");
    expect_bad_header("unterminated object",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}", "bad JSON");
    expect_bad_header("not JSON at all", "hello, world", "bad JSON");
    expect_bad_header("trailing garbage", "{}  x", "trailing");
    expect_bad_header("bad escape", "{\"a\\q\":{}}", "escape");
    expect_bad_header("lone surrogate", "{\"\\ud800\":{}}", "surrogate");
    expect_bad_header("unterminated string", "{\"abc", "unterminated");
    expect_bad_header("metadata not an object", "{\"__metadata__\":[1,2]}", "object");

    // Accepted oddities: unknown keys are skipped, unicode escapes decode to UTF-8, spaces pad the header.
    tmp_path(path, sizeof(path), "odd.safetensors");
    const char *odd = "{ \"__metadata__\" : {\"x\":\"\\u00e9\\ud83d\\ude00\"}, \"caf\\u00e9\" : {\"extra\": [1, {\"n\": null}],"
                      " \"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]}}      ";
    unsigned char one = 42;
    write_raw(path, strlen(odd), odd, &one, 1);
    StFile f;
    int rc = st_read(path, &f, err, sizeof(err));
    CHECK(rc == 0, "valid unusual header rejected: %s", err);
    if (rc == 0) {
        const StTensor *c = st_find(&f, "caf\xc3\xa9");
        CHECK(c && c->ndim == 0 && c->nbytes == 1 && *(const uint8_t *)c->data == 42, "unicode-named scalar wrong");
        char *x = st_meta_get(&f, "x");
        CHECK(x && strcmp(x, "\xc3\xa9\xf0\x9f\x98\x80") == 0, "metadata unicode escapes decoded to \"%s\"", x ? x : "");
        free(x);
        st_free(&f);
    }
}

int main(void) {
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof(tmpdir), "%s/mlm_st_XXXXXX", base && base[0] ? base : "/tmp");
    if (!mkdtemp(tmpdir)) mlm_fatal(1, "cannot create a temporary directory %s", tmpdir);
    test_round_trip();
    test_fixture();
    test_rejections();
    // Remove what we created (the directory is ours alone).
    const char *names[] = {"rt.safetensors", "good.safetensors", "cut.safetensors", "bad.safetensors", "odd.safetensors"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        char p[512];
        tmp_path(p, sizeof(p), names[i]);
        remove(p);
    }
    rmdir(tmpdir);
    return test_finish("test_safetensors");
}
