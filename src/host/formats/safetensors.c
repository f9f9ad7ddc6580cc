// safetensors.c: reading (with validation) and atomic writing of safetensors files.
//
// Format: u64 little-endian header length H, H bytes of JSON {name: {"dtype", "shape", "data_offsets"},
// "__metadata__": {key: string}}, then the data region; data_offsets are [begin, end) byte offsets into
// the data region. The JSON parser below handles exactly what this needs (objects, strings with escapes,
// non-negative integer arrays) and skips any other JSON value, so it stays small and self-contained.
// Data is little-endian; every host we build for (x86-64, aarch64) is too.
#include "mlm/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"

// Largest header we accept: the official implementation caps it at 100 MB; ours are kilobytes.
#define ST_MAX_HEADER (100u * 1000u * 1000u)

static const char *const dtype_names[] = {"F32", "I32", "I64", "F64", "U8"};
static const size_t dtype_sizes[] = {4, 4, 8, 8, 1};

// ---- JSON subset parser ------------------------------------------------------------------------------

typedef struct {
    const char *s, *end;  // text being parsed (not NUL-terminated)
    const char *base;     // start of the header, for error positions
    char msg[160];        // first error
} Json;

static int jfail(Json *j, const char *what) {
    if (!j->msg[0])
        snprintf(j->msg, sizeof(j->msg), "bad JSON header at byte %ld: %s", (long)(j->s - j->base), what);
    return 1;
}

static void jws(Json *j) {
    while (j->s < j->end && (*j->s == ' ' || *j->s == '\t' || *j->s == '\n' || *j->s == '\r')) j->s++;
}

static int jpeek(Json *j) {
    jws(j);
    return j->s < j->end ? (unsigned char)*j->s : -1;
}

static int jexpect(Json *j, char c) {
    if (jpeek(j) != (unsigned char)c) {
        char what[32];
        snprintf(what, sizeof(what), "expected '%c'", c);
        return jfail(j, what);
    }
    j->s++;
    return 0;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int read_hex4(Json *j, unsigned *out) {
    if (j->end - j->s < 4) return jfail(j, "truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval((unsigned char)j->s[i]);
        if (h < 0) return jfail(j, "bad \\u escape");
        v = v * 16 + (unsigned)h;
    }
    j->s += 4;
    *out = v;
    return 0;
}

// Parse a JSON string; if out != NULL store the unescaped UTF-8 text as a malloc'ed NUL-terminated string.
static int jstring(Json *j, char **out) {
    if (jexpect(j, '"')) return 1;
    // Unescaped text is never longer than the escaped text, so one allocation of the raw span suffices.
    const char *p = j->s;
    while (p < j->end && *p != '"') p += (*p == '\\' && p + 1 < j->end) ? 2 : 1;
    if (p >= j->end) return jfail(j, "unterminated string");
    char *buf = out ? mlm_malloc((size_t)(p - j->s) + 1, "a safetensors name") : NULL;
    size_t n = 0;
    while (*j->s != '"') {
        unsigned char c = (unsigned char)*j->s++;
        if (c < 0x20) { free(buf); return jfail(j, "control character in string"); }
        if (c != '\\') { if (buf) buf[n++] = (char)c; continue; }
        char e = *j->s++;
        unsigned cp;
        switch (e) {
            case '"': cp = '"'; break;
            case '\\': cp = '\\'; break;
            case '/': cp = '/'; break;
            case 'b': cp = '\b'; break;
            case 'f': cp = '\f'; break;
            case 'n': cp = '\n'; break;
            case 'r': cp = '\r'; break;
            case 't': cp = '\t'; break;
            case 'u':
                if (read_hex4(j, &cp)) { free(buf); return 1; }
                if (cp >= 0xD800 && cp <= 0xDBFF) {  // high surrogate: must be followed by \uDC00..DFFF
                    unsigned lo;
                    if (j->end - j->s < 2 || j->s[0] != '\\' || j->s[1] != 'u') { free(buf); return jfail(j, "lone surrogate"); }
                    j->s += 2;
                    if (read_hex4(j, &lo)) { free(buf); return 1; }
                    if (lo < 0xDC00 || lo > 0xDFFF) { free(buf); return jfail(j, "bad surrogate pair"); }
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    free(buf);
                    return jfail(j, "lone surrogate");
                }
                break;
            default: free(buf); return jfail(j, "bad escape");
        }
        if (!buf) continue;
        // UTF-8 encode; a \uXXXX escape (6 bytes) or a pair (12 bytes) never needs more than it occupied.
        if (cp < 0x80) buf[n++] = (char)cp;
        else if (cp < 0x800) { buf[n++] = (char)(0xC0 | (cp >> 6)); buf[n++] = (char)(0x80 | (cp & 0x3F)); }
        else if (cp < 0x10000) {
            buf[n++] = (char)(0xE0 | (cp >> 12)); buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3F));
            buf[n++] = (char)(0x80 | (cp & 0x3F));
        } else {
            buf[n++] = (char)(0xF0 | (cp >> 18)); buf[n++] = (char)(0x80 | ((cp >> 12) & 0x3F));
            buf[n++] = (char)(0x80 | ((cp >> 6) & 0x3F)); buf[n++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    j->s++;  // closing quote
    if (buf) { buf[n] = '\0'; *out = buf; }
    return 0;
}

// Non-negative integer that fits in 63 bits.
static int juint(Json *j, uint64_t *out) {
    jws(j);
    if (j->s >= j->end || *j->s < '0' || *j->s > '9') return jfail(j, "expected a non-negative integer");
    uint64_t v = 0;
    while (j->s < j->end && *j->s >= '0' && *j->s <= '9') {
        unsigned d = (unsigned)(*j->s++ - '0');
        if (v > (UINT64_C(0x7FFFFFFFFFFFFFFF) - d) / 10) return jfail(j, "integer too large");
        v = v * 10 + d;
    }
    if (j->s < j->end && (*j->s == '.' || *j->s == 'e' || *j->s == 'E')) return jfail(j, "expected an integer");
    *out = v;
    return 0;
}

// [u, u, ...] with at most `max` entries; *n receives the count.
static int juint_array(Json *j, uint64_t *vals, int max, int *n, const char *what) {
    if (jexpect(j, '[')) return 1;
    *n = 0;
    if (jpeek(j) == ']') { j->s++; return 0; }
    for (;;) {
        if (*n >= max) {
            char m[64];
            snprintf(m, sizeof(m), "%s has more than %d entries", what, max);
            return jfail(j, m);
        }
        if (juint(j, &vals[(*n)++])) return 1;
        int c = jpeek(j);
        if (c == ',') { j->s++; continue; }
        if (c == ']') { j->s++; return 0; }
        return jfail(j, "expected ',' or ']'");
    }
}

// Skip any JSON value (for keys we do not use), with a depth limit against stack exhaustion.
static int jskip(Json *j, int depth) {
    if (depth > 64) return jfail(j, "nesting too deep");
    int c = jpeek(j);
    if (c == '"') return jstring(j, NULL);
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->s++;
        if (jpeek(j) == close) { j->s++; return 0; }
        for (;;) {
            if (c == '{') {
                if (jstring(j, NULL) || jexpect(j, ':')) return 1;
            }
            if (jskip(j, depth + 1)) return 1;
            int d = jpeek(j);
            if (d == ',') { j->s++; continue; }
            if (d == close) { j->s++; return 0; }
            return jfail(j, "expected ',' or a closing bracket");
        }
    }
    // Scalars: numbers, true, false, null.
    const char *start = j->s;
    while (j->s < j->end && *j->s && strchr("+-.0123456789eEtrufalsn", *j->s)) j->s++;
    if (j->s == start) return jfail(j, "unexpected character");
    return 0;
}

// ---- Reader ------------------------------------------------------------------------------------------

void st_free(StFile *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) free(f->tensors[i].name);
    free(f->tensors);
    free(f->meta_json);
    free(f->buffer);
    memset(f, 0, sizeof(*f));
}

const StTensor *st_find(const StFile *f, const char *name) {
    for (int i = 0; i < f->n; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}

// Offsets kept beside each tensor while validating.
typedef struct {
    uint64_t begin, end;
    int index;
} Span;

static int span_cmp(const void *a, const void *b) {
    const Span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : (x->end > y->end) - (x->end < y->end);
}

// Parse one tensor entry {"dtype": ..., "shape": [...], "data_offsets": [b, e]} into t and sp.
static int parse_tensor_entry(Json *j, StTensor *t, Span *sp) {
    int have_dtype = 0, have_shape = 0, have_offsets = 0;
    if (jexpect(j, '{')) return 1;
    if (jpeek(j) == '}') return jfail(j, "empty tensor entry");
    for (;;) {
        char *key = NULL;
        if (jstring(j, &key)) return 1;
        if (jexpect(j, ':')) { free(key); return 1; }
        int rc = 0;
        if (strcmp(key, "dtype") == 0) {
            char *dt = NULL;
            rc = jstring(j, &dt);
            if (!rc) {
                int found = -1;
                for (int d = 0; d < (int)(sizeof(dtype_names) / sizeof(dtype_names[0])); d++)
                    if (strcmp(dt, dtype_names[d]) == 0) found = d;
                if (found < 0) {
                    char m[96];
                    snprintf(m, sizeof(m), "unsupported dtype \"%.40s\" (F32, I32, I64, F64, U8 are)", dt);
                    rc = jfail(j, m);
                } else {
                    t->dtype = (StDtype)found;
                }
                free(dt);
            }
            have_dtype = 1;
        } else if (strcmp(key, "shape") == 0) {
            uint64_t dims[ST_MAX_DIMS];
            rc = juint_array(j, dims, ST_MAX_DIMS, &t->ndim, "shape");
            for (int d = 0; !rc && d < t->ndim; d++) t->shape[d] = (int64_t)dims[d];
            have_shape = 1;
        } else if (strcmp(key, "data_offsets") == 0) {
            uint64_t off[2];
            int n = 0;
            rc = juint_array(j, off, 2, &n, "data_offsets");
            if (!rc && n != 2) rc = jfail(j, "data_offsets needs exactly 2 entries");
            if (!rc) { sp->begin = off[0]; sp->end = off[1]; }
            have_offsets = 1;
        } else {
            rc = jskip(j, 1);
        }
        free(key);
        if (rc) return 1;
        int c = jpeek(j);
        if (c == ',') { j->s++; continue; }
        if (c == '}') { j->s++; break; }
        return jfail(j, "expected ',' or '}'");
    }
    if (!have_dtype || !have_shape || !have_offsets) return jfail(j, "tensor entry lacks dtype, shape or data_offsets");
    return 0;
}

int st_read(const char *path, StFile *out, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    FILE *fp = fopen(path, "rb");
    if (!fp) { mlm_set_error(err, errlen, "%s: cannot open: %s", path, strerror(errno)); return 1; }
    struct stat stt;
    if (fstat(fileno(fp), &stt) != 0 || !S_ISREG(stt.st_mode)) {
        mlm_set_error(err, errlen, "%s: not a regular file", path);
        fclose(fp);
        return 1;
    }
    uint64_t fsize = (uint64_t)stt.st_size;
    unsigned char lenbuf[8];
    if (fsize < 8 || fread(lenbuf, 1, 8, fp) != 8) {
        mlm_set_error(err, errlen, "%s: truncated: %llu bytes, less than the 8-byte header length", path,
               (unsigned long long)fsize);
        fclose(fp);
        return 1;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | lenbuf[i];
    if (hlen > fsize - 8) {
        mlm_set_error(err, errlen, "%s: truncated or corrupt: header length %llu exceeds the %llu bytes after it", path,
               (unsigned long long)hlen, (unsigned long long)(fsize - 8));
        fclose(fp);
        return 1;
    }
    if (hlen < 2 || hlen > ST_MAX_HEADER) {
        mlm_set_error(err, errlen, "%s: corrupt: implausible header length %llu", path, (unsigned long long)hlen);
        fclose(fp);
        return 1;
    }
    // Read header and data so that the data region starts 16-byte aligned whatever the header length,
    // so tensors whose offsets are multiples of their element size can be used in place.
    size_t rest = (size_t)(fsize - 8);
    size_t pad = (16 - (size_t)(hlen % 16)) % 16;
    unsigned char *buf = mlm_malloc(pad + rest + 1, "a safetensors file");
    if (fread(buf + pad, 1, rest, fp) != rest) {
        mlm_set_error(err, errlen, "%s: read error or file changed while reading: %s", path,
               ferror(fp) ? strerror(errno) : "short read");
        free(buf);
        fclose(fp);
        return 1;
    }
    fclose(fp);
    const char *hdr = (const char *)buf + pad;
    const unsigned char *data = buf + pad + hlen;
    uint64_t data_len = rest - hlen;
    out->buffer = buf;

    Json j = {hdr, hdr + hlen, hdr, {0}};
    char where[80] = "";  // which tensor entry a parse error is in
    int cap = 16, n = 0;
    StTensor *ts = mlm_calloc((size_t)cap, sizeof(StTensor), "safetensors entries");
    Span *spans = mlm_calloc((size_t)cap, sizeof(Span), "safetensors offsets");
    out->tensors = ts;
    int rc = jexpect(&j, '{');
    if (!rc && jpeek(&j) == '}') j.s++;
    else while (!rc) {
        char *name = NULL;
        if ((rc = jstring(&j, &name)) || (rc = jexpect(&j, ':'))) { free(name); break; }
        if (strcmp(name, "__metadata__") == 0) {
            free(name);
            if (out->meta_json) { rc = jfail(&j, "two __metadata__ entries"); break; }
            if (jpeek(&j) != '{') { rc = jfail(&j, "__metadata__ must be an object"); break; }
            const char *start = j.s;
            if ((rc = jskip(&j, 1))) break;
            size_t len = (size_t)(j.s - start);
            out->meta_json = mlm_malloc(len + 1, "safetensors metadata");
            memcpy(out->meta_json, start, len);
            out->meta_json[len] = '\0';
        } else {
            if (n == cap) {
                cap *= 2;
                ts = realloc(ts, (size_t)cap * sizeof(StTensor));
                spans = realloc(spans, (size_t)cap * sizeof(Span));
                if (!ts || !spans) mlm_fatal(MLM_EXIT_FAILURE, "out of host memory reading %s", path);
                out->tensors = ts;
            }
            memset(&ts[n], 0, sizeof(StTensor));
            ts[n].name = name;
            spans[n].index = n;
            out->n = ++n;  // counted now so st_free releases the name on failure
            if ((rc = parse_tensor_entry(&j, &ts[n - 1], &spans[n - 1]))) {
                snprintf(where, sizeof(where), " (in tensor \"%.60s\")", name);
                break;
            }
        }
        int c = jpeek(&j);
        if (c == ',') { j.s++; continue; }
        if (c == '}') { j.s++; break; }
        rc = jfail(&j, "expected ',' or '}'");
    }
    if (!rc && jpeek(&j) != -1) rc = jfail(&j, "trailing characters after the header object");
    if (rc) {
        mlm_set_error(err, errlen, "%s: corrupt: %s%s", path, j.msg, where);
        free(spans);
        st_free(out);
        return 1;
    }
    // Per-tensor checks: sizes agree with shapes, offsets inside the data region, aligned.
    for (int i = 0; i < n && !rc; i++) {
        StTensor *t = &ts[i];
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            uint64_t dim = (uint64_t)t->shape[d];
            if (dim && numel > UINT64_MAX / 16 / dim) { rc = 1; break; }
            numel *= dim;
        }
        uint64_t esz = dtype_sizes[t->dtype];
        if (rc) {
            mlm_set_error(err, errlen, "%s: corrupt: tensor \"%s\" has an impossibly large shape", path, t->name);
        } else if (spans[i].end < spans[i].begin || spans[i].end > data_len) {
            mlm_set_error(err, errlen, "%s: truncated or corrupt: tensor \"%s\" has data_offsets [%llu, %llu] outside the "
                   "%llu-byte data region", path, t->name, (unsigned long long)spans[i].begin,
                   (unsigned long long)spans[i].end, (unsigned long long)data_len);
            rc = 1;
        } else if (spans[i].end - spans[i].begin != numel * esz) {
            mlm_set_error(err, errlen, "%s: corrupt: tensor \"%s\" (%s, %llu elements) needs %llu bytes but data_offsets "
                   "span %llu", path, t->name, dtype_names[t->dtype], (unsigned long long)numel,
                   (unsigned long long)(numel * esz), (unsigned long long)(spans[i].end - spans[i].begin));
            rc = 1;
        } else if (spans[i].begin % esz) {
            mlm_set_error(err, errlen, "%s: unsupported: tensor \"%s\" starts at data offset %llu, not a multiple of its "
                   "%llu-byte element size", path, t->name, (unsigned long long)spans[i].begin,
                   (unsigned long long)esz);
            rc = 1;
        } else {
            t->nbytes = (size_t)(numel * esz);
            t->data = data + spans[i].begin;
        }
    }
    // No two tensors may share bytes, and no name may repeat.
    if (!rc && n > 1) {
        qsort(spans, (size_t)n, sizeof(Span), span_cmp);
        for (int i = 1; i < n && !rc; i++) {
            if (spans[i].begin < spans[i - 1].end) {
                mlm_set_error(err, errlen, "%s: corrupt: tensors \"%s\" [%llu, %llu) and \"%s\" [%llu, %llu) overlap", path,
                       ts[spans[i - 1].index].name, (unsigned long long)spans[i - 1].begin,
                       (unsigned long long)spans[i - 1].end, ts[spans[i].index].name,
                       (unsigned long long)spans[i].begin, (unsigned long long)spans[i].end);
                rc = 1;
            }
        }
        for (int a = 0; a < n && !rc; a++)
            for (int b = a + 1; b < n && !rc; b++)
                if (strcmp(ts[a].name, ts[b].name) == 0) {
                    mlm_set_error(err, errlen, "%s: corrupt: tensor \"%s\" appears twice", path, ts[a].name);
                    rc = 1;
                }
    }
    free(spans);
    if (rc) { st_free(out); return 1; }
    return 0;
}

char *st_meta_get(const StFile *f, const char *key) {
    if (!f->meta_json) return NULL;
    Json j = {f->meta_json, f->meta_json + strlen(f->meta_json), f->meta_json, {0}};
    if (jexpect(&j, '{')) return NULL;
    if (jpeek(&j) == '}') return NULL;
    for (;;) {
        char *k = NULL;
        if (jstring(&j, &k)) return NULL;
        if (jexpect(&j, ':')) { free(k); return NULL; }
        int match = strcmp(k, key) == 0;
        free(k);
        if (jpeek(&j) == '"') {
            char *v = NULL;
            if (jstring(&j, &v)) return NULL;
            if (match) return v;
            free(v);
        } else if (jskip(&j, 1)) {  // non-string values violate the format; ignore them
            return NULL;
        }
        int c = jpeek(&j);
        if (c == ',') { j.s++; continue; }
        return NULL;
    }
}

// ---- Writer ------------------------------------------------------------------------------------------

typedef struct {
    char *s;
    size_t len, cap;
} Buf;

static void bput(Buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (b->len + n + 1 > cap) cap *= 2;
        char *ns = realloc(b->s, cap);
        if (!ns) mlm_fatal(MLM_EXIT_FAILURE, "out of host memory building a safetensors header");
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void bputs(Buf *b, const char *s) { bput(b, s, strlen(s)); }

static void bprintf(Buf *b, const char *fmt, ...) MLM_PRINTF(2, 3);
static void bprintf(Buf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    bput(b, tmp, (size_t)n);
}

// JSON string literal; bytes >= 0x80 pass through (UTF-8), control characters become \u00XX.
static void bput_jstring(Buf *b, const char *s) {
    bputs(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"') bputs(b, "\\\"");
        else if (*p == '\\') bputs(b, "\\\\");
        else if (*p == '\n') bputs(b, "\\n");
        else if (*p == '\t') bputs(b, "\\t");
        else if (*p == '\r') bputs(b, "\\r");
        else if (*p < 0x20) bprintf(b, "\\u%04x", *p);
        else bput(b, (const char *)p, 1);
    }
    bputs(b, "\"");
}

static int write_all(FILE *fp, const void *p, size_t n) { return n == 0 || fwrite(p, 1, n, fp) == n ? 0 : 1; }

int st_write(const char *path, const StTensor *tensors, int n, const char *const *meta_kv, int n_meta,
             char *err, size_t errlen) {
    // Validate before touching the disk.
    for (int i = 0; i < n; i++) {
        const StTensor *t = &tensors[i];
        if (!t->name || !t->name[0] || strcmp(t->name, "__metadata__") == 0) {
            mlm_set_error(err, errlen, "%s: tensor %d has an empty or reserved name", path, i);
            return 1;
        }
        if ((unsigned)t->dtype > ST_U8 || t->ndim < 0 || t->ndim > ST_MAX_DIMS) {
            mlm_set_error(err, errlen, "%s: tensor \"%s\" has a bad dtype or %d dimensions", path, t->name, t->ndim);
            return 1;
        }
        uint64_t numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0) { mlm_set_error(err, errlen, "%s: tensor \"%s\" has a negative dimension", path, t->name); return 1; }
            numel *= (uint64_t)t->shape[d];
        }
        if (numel * dtype_sizes[t->dtype] != t->nbytes || (t->nbytes && !t->data)) {
            mlm_set_error(err, errlen, "%s: tensor \"%s\": nbytes %zu does not match its shape and dtype (%llu bytes)", path,
                   t->name, t->nbytes, (unsigned long long)(numel * dtype_sizes[t->dtype]));
            return 1;
        }
        for (int k = 0; k < i; k++)
            if (strcmp(tensors[k].name, t->name) == 0) {
                mlm_set_error(err, errlen, "%s: tensor \"%s\" given twice", path, t->name);
                return 1;
            }
    }
    // Data order: the given order, stably grouped by decreasing element size so every tensor starts at a
    // multiple of its element size (the data region starts 8-aligned) without gaps, which readers reject.
    int *order = mlm_malloc((size_t)(n ? n : 1) * sizeof(int), "safetensors order");
    int k = 0;
    for (size_t esz = 8; esz >= 1; esz /= 2)
        for (int i = 0; i < n; i++)
            if (dtype_sizes[tensors[i].dtype] == esz) order[k++] = i;
    uint64_t *begin = mlm_malloc((size_t)(n ? n : 1) * sizeof(uint64_t), "safetensors offsets");
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        begin[order[i]] = off;
        off += tensors[order[i]].nbytes;
    }

    Buf h = {0};
    bputs(&h, "{");
    int first = 1;
    if (n_meta > 0) {
        bputs(&h, "\"__metadata__\":{");
        for (int m = 0; m < n_meta; m++) {
            if (m) bputs(&h, ",");
            bput_jstring(&h, meta_kv[2 * m] ? meta_kv[2 * m] : "");
            bputs(&h, ":");
            bput_jstring(&h, meta_kv[2 * m + 1] ? meta_kv[2 * m + 1] : "");
        }
        bputs(&h, "}");
        first = 0;
    }
    for (int i = 0; i < n; i++) {  // header entries in the given order
        const StTensor *t = &tensors[i];
        if (!first) bputs(&h, ",");
        first = 0;
        bput_jstring(&h, t->name);
        bprintf(&h, ":{\"dtype\":\"%s\",\"shape\":[", dtype_names[t->dtype]);
        for (int d = 0; d < t->ndim; d++) bprintf(&h, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        bprintf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)begin[i],
                (unsigned long long)(begin[i] + t->nbytes));
    }
    bputs(&h, "}");
    while (h.len % 8) bputs(&h, " ");  // pad with spaces so the data region is 8-byte aligned

    size_t plen = strlen(path);
    char *tmp = mlm_malloc(plen + 5, "a path");
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    int rc = 0;
    FILE *fp = fopen(tmp, "wb");
    if (!fp) {
        mlm_set_error(err, errlen, "%s: cannot create: %s", tmp, strerror(errno));
        rc = 1;
    } else {
        unsigned char lenbuf[8];
        uint64_t hl = h.len;
        for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)(hl >> (8 * i));
        rc = write_all(fp, lenbuf, 8) || write_all(fp, h.s, h.len);
        for (int i = 0; i < n && !rc; i++) rc = write_all(fp, tensors[order[i]].data, tensors[order[i]].nbytes);
        // The data must be on disk before the rename makes it visible under the final name.
        if (!rc) rc = fflush(fp) != 0 || fsync(fileno(fp)) != 0;
        int saved = errno;
        if (fclose(fp) != 0) rc = 1;
        if (rc) {
            mlm_set_error(err, errlen, "%s: write failed: %s", tmp, strerror(saved ? saved : errno));
            remove(tmp);
        } else if (rename(tmp, path) != 0) {
            mlm_set_error(err, errlen, "%s: cannot rename %s into place: %s", path, tmp, strerror(errno));
            remove(tmp);
            rc = 1;
        } else {
            // Persist the rename itself (best effort: some filesystems refuse fsync on directories).
            char *dir = mlm_strdup(path);
            char *slash = strrchr(dir, '/');
            if (slash == dir) slash[1] = '\0';
            else if (slash) *slash = '\0';
            else { dir[0] = '.'; dir[1] = '\0'; }
            int dfd = open(dir, O_RDONLY);
            if (dfd >= 0) { (void)fsync(dfd); close(dfd); }
            free(dir);
        }
    }
    free(tmp);
    free(h.s);
    free(begin);
    free(order);
    return rc;
}
