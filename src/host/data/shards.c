// shards.c: token shard files (atomic writer, validating memory-mapped reader), the shard-set manifest and
// a split's shards as one token stream. The format is described in include/mlm/shards.h.
#define _DEFAULT_SOURCE  // madvise
#include "mlm/shards.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/wordpiece.h"

uint64_t shard_fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

const char *tokenizer_name(int kind) {
    return kind == TOKENIZER_BYTE ? "byte" : kind == TOKENIZER_WORDPIECE ? "wordpiece" : "char";
}

// ---- Header encoding (explicit byte positions, so the layout never depends on struct padding).
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static void header_encode(const ShardHeader *h, uint8_t b[SHARD_HEADER_BYTES]) {
    memset(b, 0, SHARD_HEADER_BYTES);
    memcpy(b, SHARD_MAGIC, 8);
    put32(b + 8, h->version);
    put32(b + 12, h->token_bytes);
    put64(b + 16, h->n_tokens);
    put64(b + 24, h->n_docs);
    put32(b + 32, h->vocab_size);
    put32(b + 36, h->flags);
    memcpy(b + 40, h->vocab_md5, 16);
    put64(b + 56, h->payload_hash);
    put64(b + 64, shard_fnv1a(SHARD_FNV_INIT, b, 64));
}

static size_t pad8(size_t n) { return (8 - n % 8) % 8; }

// ---- Writer

int shard_writer_open(ShardWriter *w, const char *path, uint32_t token_bytes, uint32_t vocab_size,
                      const uint8_t vocab_md5[16], int continues, char *err, size_t errlen) {
    memset(w, 0, sizeof(*w));
    snprintf(w->path, sizeof(w->path), "%s", path);
    snprintf(w->tmp, sizeof(w->tmp), "%s.part", path);
    w->h.version = SHARD_VERSION;
    w->h.token_bytes = token_bytes;
    w->h.vocab_size = vocab_size;
    w->h.flags = continues ? SHARD_FLAG_CONTINUES : 0;
    memcpy(w->h.vocab_md5, vocab_md5, 16);
    w->h.payload_hash = SHARD_FNV_INIT;
    snprintf(w->docs_tmp, sizeof(w->docs_tmp), "%s.docs", w->tmp);
    w->f = fopen(w->tmp, "wb");
    w->docs = fopen(w->docs_tmp, "w+b");
    if (!w->f || !w->docs) {
        mlm_set_error(err, errlen, "cannot create %s: %s", w->tmp, strerror(errno));
        shard_writer_abort(w);
        return 1;
    }
    uint8_t zero[SHARD_HEADER_BYTES] = {0};  // the real header goes in at close
    if (fwrite(zero, 1, sizeof(zero), w->f) != sizeof(zero)) {
        mlm_set_error(err, errlen, "cannot write %s: %s", w->tmp, strerror(errno));
        shard_writer_abort(w);
        return 1;
    }
    return 0;
}

void shard_writer_begin_doc(ShardWriter *w) {
    if (fwrite(&w->h.n_tokens, 8, 1, w->docs) != 1)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", w->docs_tmp, strerror(errno));
    w->h.n_docs++;
}

static int write_hashed(ShardWriter *w, const void *p, size_t n, char *err, size_t errlen) {
    w->h.payload_hash = shard_fnv1a(w->h.payload_hash, p, n);
    if (fwrite(p, 1, n, w->f) != n) {
        mlm_set_error(err, errlen, "cannot write %s: %s", w->tmp, strerror(errno));
        return 1;
    }
    return 0;
}

int shard_writer_append(ShardWriter *w, const int32_t *ids, size_t n, char *err, size_t errlen) {
    if (w->h.n_docs == 0) shard_writer_begin_doc(w);
    uint8_t buf[8192];
    size_t per = sizeof(buf) / w->h.token_bytes;
    for (size_t i = 0; i < n; i += per) {
        size_t m = MLM_MIN(per, n - i);
        for (size_t k = 0; k < m; k++) {
            int32_t id = ids[i + k];
            if (id < 0 || (uint32_t)id >= w->h.vocab_size) {
                mlm_set_error(err, errlen, "%s: token id %d outside the vocabulary of %u", w->path, id, w->h.vocab_size);
                return 1;
            }
            if (w->h.token_bytes == 2) { uint16_t v = (uint16_t)id; memcpy(buf + 2 * k, &v, 2); }
            else { uint32_t v = (uint32_t)id; memcpy(buf + 4 * k, &v, 4); }
        }
        if (write_hashed(w, buf, m * w->h.token_bytes, err, errlen)) return 1;
    }
    w->h.n_tokens += n;
    return 0;
}

static void close_docs(ShardWriter *w) {
    if (w->docs) fclose(w->docs);
    w->docs = NULL;
    unlink(w->docs_tmp);
}

void shard_writer_abort(ShardWriter *w) {
    if (w->f) fclose(w->f);
    w->f = NULL;
    unlink(w->tmp);
    close_docs(w);
}

int shard_writer_close(ShardWriter *w, char *err, size_t errlen) {
    if (w->h.n_docs == 0) shard_writer_begin_doc(w);  // an empty shard still has one (empty) segment
    uint8_t zero[8] = {0};
    int rc = write_hashed(w, zero, pad8(w->h.n_tokens * w->h.token_bytes), err, errlen);
    if (!rc && (fflush(w->docs) != 0 || fseek(w->docs, 0, SEEK_SET) != 0)) {
        mlm_set_error(err, errlen, "cannot read back %s: %s", w->docs_tmp, strerror(errno));
        rc = 1;
    }
    uint64_t offs[1024];
    for (uint64_t d = 0; !rc && d < w->h.n_docs; d += 1024) {
        size_t m = (size_t)MLM_MIN((uint64_t)1024, w->h.n_docs - d);
        if (fread(offs, 8, m, w->docs) != m) {
            mlm_set_error(err, errlen, "cannot read back %s", w->docs_tmp);
            rc = 1;
        } else {
            rc = write_hashed(w, offs, 8 * m, err, errlen);
        }
    }
    close_docs(w);
    if (!rc) rc = write_hashed(w, &w->h.n_tokens, 8, err, errlen);
    uint8_t hdr[SHARD_HEADER_BYTES];
    header_encode(&w->h, hdr);
    // The data must be on disk before the rename makes the shard visible under its final name.
    if (!rc && (fseek(w->f, 0, SEEK_SET) != 0 || fwrite(hdr, 1, sizeof(hdr), w->f) != sizeof(hdr) ||
                fflush(w->f) != 0 || fsync(fileno(w->f)) != 0)) {
        mlm_set_error(err, errlen, "cannot write %s: %s", w->tmp, strerror(errno));
        rc = 1;
    }
    if (!rc && fclose(w->f) != 0) {
        w->f = NULL;
        mlm_set_error(err, errlen, "cannot write %s: %s", w->tmp, strerror(errno));
        rc = 1;
    } else if (!rc) {
        w->f = NULL;
    }
    if (!rc && rename(w->tmp, w->path) != 0) {
        mlm_set_error(err, errlen, "cannot rename %s into place: %s", w->tmp, strerror(errno));
        rc = 1;
    }
    if (rc) shard_writer_abort(w);
    return rc;
}

// ---- Reader

static int shard_fail(Shard *s, char *err, size_t errlen, const char *what) {
    mlm_set_error(err, errlen, "shard %s: %s; run `mlm prepare` again to rebuild the shard set", s->path, what);
    shard_close(s);
    return 1;
}

int shard_open(Shard *s, const char *path, const uint8_t *vocab_md5, int verify_payload, char *err, size_t errlen) {
    memset(s, 0, sizeof(*s));
    snprintf(s->path, sizeof(s->path), "%s", path);
    uint64_t size;
    int fd = mlm_open_regular(path, "shard", 0, &size, err, errlen);
    if (fd < 0) return 1;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        mlm_set_error(err, errlen, "cannot read shard %s: %s", path, strerror(errno));
        close(fd);
        return 1;
    }
    s->dev = (uint64_t)st.st_dev;
    s->ino = (uint64_t)st.st_ino;
    s->size = size;
    s->mtime_ns = (uint64_t)st.st_mtim.tv_sec * 1000000000u + (uint64_t)st.st_mtim.tv_nsec;
    s->ctime_ns = (uint64_t)st.st_ctim.tv_sec * 1000000000u + (uint64_t)st.st_ctim.tv_nsec;
    s->map_len = (size_t)size;
    if (s->map_len < SHARD_HEADER_BYTES) {
        close(fd);
        return shard_fail(s, err, errlen, "too short for a shard header (truncated?)");
    }
    void *m = mmap(NULL, s->map_len, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        mlm_set_error(err, errlen, "cannot map shard %s: %s", path, strerror(errno));
        return 1;
    }
    s->map = m;
    const uint8_t *b = s->map;
    if (memcmp(b, SHARD_MAGIC, 8) != 0) return shard_fail(s, err, errlen, "not a shard (wrong magic number at byte 0)");
    ShardHeader *h = &s->h;
    h->version = get32(b + 8);
    h->token_bytes = get32(b + 12);
    h->n_tokens = get64(b + 16);
    h->n_docs = get64(b + 24);
    h->vocab_size = get32(b + 32);
    h->flags = get32(b + 36);
    memcpy(h->vocab_md5, b + 40, 16);
    h->payload_hash = get64(b + 56);
    h->header_hash = get64(b + 64);
    if (h->header_hash != shard_fnv1a(SHARD_FNV_INIT, b, 64))
        return shard_fail(s, err, errlen, "its header (bytes 0..63) fails its checksum (corrupt)");
    if (h->version != SHARD_VERSION) {
        char msg[128];
        snprintf(msg, sizeof(msg), "format version %u, but this mlm reads version %d", h->version, SHARD_VERSION);
        return shard_fail(s, err, errlen, msg);
    }
    if (h->token_bytes != 2 && h->token_bytes != 4) return shard_fail(s, err, errlen, "token width is not 2 or 4 bytes");
    if (h->flags & ~SHARD_FLAG_CONTINUES) return shard_fail(s, err, errlen, "unknown flags in the header");
    if (h->vocab_size == 0) return shard_fail(s, err, errlen, "vocabulary size 0");
    if (h->token_bytes == 2 && h->vocab_size > 65536) return shard_fail(s, err, errlen, "16-bit tokens for a vocabulary over 65,536");
    if (h->n_docs < 1 || h->n_tokens > ((uint64_t)1 << 40) || h->n_docs > h->n_tokens + 1)
        return shard_fail(s, err, errlen, "token or document count out of range");
    uint64_t tok_bytes = h->n_tokens * h->token_bytes;
    uint64_t want = SHARD_HEADER_BYTES + tok_bytes + pad8(tok_bytes) + 8 * (h->n_docs + 1);
    if (want != s->map_len) {
        char msg[200];
        snprintf(msg, sizeof(msg), "%zu bytes, but its header describes %" PRIu64 " (truncated or corrupt)", s->map_len, want);
        return shard_fail(s, err, errlen, msg);
    }
    if (vocab_md5 && memcmp(vocab_md5, h->vocab_md5, 16) != 0)
        return shard_fail(s, err, errlen, "tokenized with another vocabulary than the manifest's (vocab checksum differs)");
    s->tokens = b + SHARD_HEADER_BYTES;
    s->doc_off = (const uint64_t *)(s->tokens + tok_bytes + pad8(tok_bytes));
    uint64_t off0 = SHARD_HEADER_BYTES + tok_bytes + pad8(tok_bytes);  // file offset of the document offsets
    char msg[200];
    for (size_t i = 0; i < pad8(tok_bytes); i++)  // one encoding per shard: the padding is zero
        if (s->tokens[tok_bytes + i]) {
            snprintf(msg, sizeof(msg), "nonzero padding after the tokens at byte %" PRIu64 " (corrupt)",
                     SHARD_HEADER_BYTES + tok_bytes + i);
            return shard_fail(s, err, errlen, msg);
        }
    if (s->doc_off[0] != 0 || s->doc_off[h->n_docs] != h->n_tokens) {
        snprintf(msg, sizeof(msg), "document offsets (bytes %" PRIu64 "..%zu) do not span the tokens", off0, s->map_len - 1);
        return shard_fail(s, err, errlen, msg);
    }
    for (uint64_t d = 0; d < h->n_docs; d++)
        if (s->doc_off[d + 1] < s->doc_off[d]) {
            snprintf(msg, sizeof(msg), "document offset %" PRIu64 " (byte %" PRIu64 ") is below the one before it",
                     d + 1, off0 + 8 * (d + 1));
            return shard_fail(s, err, errlen, msg);
        }
    if (verify_payload && shard_verify(s, NULL, err, errlen)) {
        shard_close(s);
        return 1;
    }
    // Training reads sequences at random offsets: no read-ahead of neighbouring pages. The pages read by the
    // checks above are let go (a read-only file mapping reloads them on demand), so the resident size does not
    // grow with the corpus.
    madvise((void *)s->map, s->map_len, MADV_DONTNEED);
    posix_madvise((void *)s->map, s->map_len, POSIX_MADV_RANDOM);
    return 0;
}

void shard_close(Shard *s) {
    if (s->map) munmap((void *)s->map, s->map_len);
    s->map = NULL;
}

// ---- Manifest

int shards_is_set(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) return 0;
    if (S_ISREG(st.st_mode)) {
        const char *base = strrchr(path, '/');
        return !strcmp(base ? base + 1 : path, SHARD_MANIFEST);
    }
    if (!S_ISDIR(st.st_mode)) return 0;
    char m[1200];
    snprintf(m, sizeof(m), "%s/" SHARD_MANIFEST, path);
    return access(m, F_OK) == 0;
}

int shards_interrupted(const char *dir) {
    char p[1200];
    snprintf(p, sizeof(p), "%s/" SHARD_STAGING, dir);
    if (access(p, F_OK) == 0) return 1;
    snprintf(p, sizeof(p), "%s/train-00000.bin", dir);  // version 1 wrote the shards into the set's directory
    return access(p, F_OK) == 0;
}

void manifest_shard_path(const Manifest *m, const ShardEntry *e, char *out, size_t outlen) {
    if (m->shard_dir[0]) snprintf(out, outlen, "%s/%s/%s", m->dir, m->shard_dir, e->file);
    else snprintf(out, outlen, "%s/%s", m->dir, e->file);
}

static const char HEX[] = "0123456789abcdef";

static int is_hex(const char *s, size_t n) { return strlen(s) == n && strspn(s, HEX) == n; }

// A folder name inside the set's directory: letters, digits, '-', '_' and '.', not "." or "..".
static int is_plain_name(const char *s) {
    size_t n = strlen(s);
    return n > 0 && n < 64 && strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") == n &&
           strcmp(s, ".") && strcmp(s, "..");
}

int manifest_write(const Manifest *m, char *err, size_t errlen) {
    char path[1100], tmp[1200];
    snprintf(path, sizeof(path), "%s/" SHARD_MANIFEST, m->dir);
    snprintf(tmp, sizeof(tmp), "%s.part", path);
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "out of memory writing a manifest");
    fprintf(f, "# mlm shard set, written by mlm prepare %s; train with --set data.path=%s\n", MLM_VERSION, m->dir);
    fprintf(f, "format = mlm-shards\nversion = %d\ntokenizer = %s\n", MANIFEST_VERSION, tokenizer_name(m->tokenizer));
    fprintf(f, "vocab = %s\n", m->tokenizer == TOKENIZER_CHAR ? m->char_codepoints : m->vocab);
    fprintf(f, "vocab_md5 = %s\nvocab_size = %u\nlowercase = %d\ndocuments = %s\ntoken_bytes = %u\n", m->vocab_md5,
            m->vocab_size, m->lowercase, m->blank_docs ? "blank" : "file", m->token_bytes);
    fprintf(f, "seed = %" PRIu64 "\nvalid_fraction = %.17g\n", m->seed, m->valid_fraction);
    fprintf(f, "pad_id = %d\nmask_id = %d\nunk_id = %d\ncls_id = %d\nsep_id = %d\n", m->pad_id, m->mask_id, m->unk_id,
            m->cls_id, m->sep_id);
    fprintf(f, "train_docs = %" PRIu64 "\nvalid_docs = %" PRIu64 "\ntrain_tokens = %" PRIu64 "\nvalid_tokens = %" PRIu64
            "\nsource_bytes = %" PRIu64 "\ninvalid_utf8 = %" PRIu64 "\n", m->train_docs, m->valid_docs, m->train_tokens,
            m->valid_tokens, m->source_bytes, m->invalid_utf8);
    if (m->replaces[0]) fprintf(f, "replaces = %s\n", m->replaces);
    if (m->shard_dir[0]) fprintf(f, "shard_dir = %s\n", m->shard_dir);
    for (int i = 0; i < m->n_shards; i++)
        fprintf(f, "shard = %s %s %" PRIu64 " %" PRIu64 " %016" PRIx64 "\n", m->shards[i].split, m->shards[i].file,
                m->shards[i].n_tokens, m->shards[i].n_docs, m->shards[i].payload_hash);
    if (fclose(f) != 0) mlm_fatal(MLM_EXIT_FAILURE, "out of memory writing a manifest");
    char md5[33];
    data_md5(text, len, md5);
    FILE *out = fopen(tmp, "w");
    if (!out) {
        mlm_set_error(err, errlen, "cannot create %s: %s", tmp, strerror(errno));
        free(text);
        return 1;
    }
    int rc = fwrite(text, 1, len, out) != len;
    free(text);
    fprintf(out, "checksum = %s\n", md5);
    rc |= ferror(out) || fflush(out) != 0 || fsync(fileno(out)) != 0;
    rc |= fclose(out) != 0;
    if (!rc && rename(tmp, path) != 0) rc = 1;
    if (rc) {
        mlm_set_error(err, errlen, "cannot write %s: %s", path, strerror(errno));
        unlink(tmp);
    }
    return rc;
}

void manifest_free(Manifest *m) {
    free(m->shards);
    free(m->char_codepoints);
    m->shards = NULL;
    m->char_codepoints = NULL;
}

static int parse_u64_field(const char *v, uint64_t *out) { return mlm_parse_u64(v, UINT64_MAX, out); }
static int parse_int_field(const char *v, long min, long max, int *out) {
    long x;
    if (mlm_parse_long(v, min, max, &x)) return 1;
    *out = (int)x;
    return 0;
}

// One `key = value` line into m; returns 0, or 1 (the caller names the line).
static int manifest_line(Manifest *m, const char *key, char *val, int *seen_format) {
    uint64_t u;
    if (!strcmp(key, "format")) { *seen_format = !strcmp(val, "mlm-shards"); return !*seen_format; }
    if (!strcmp(key, "version")) return parse_int_field(val, 1, MANIFEST_VERSION, &m->version);
    if (!strcmp(key, "tokenizer")) {
        if (!strcmp(val, "char")) m->tokenizer = TOKENIZER_CHAR;
        else if (!strcmp(val, "byte")) m->tokenizer = TOKENIZER_BYTE;
        else if (!strcmp(val, "wordpiece")) m->tokenizer = TOKENIZER_WORDPIECE;
        else return 1;
        return 0;
    }
    if (!strcmp(key, "vocab")) {
        free(m->char_codepoints);
        m->char_codepoints = mlm_strdup(val);
        if (val[0] == '/') snprintf(m->vocab, sizeof(m->vocab), "%s", val);
        else snprintf(m->vocab, sizeof(m->vocab), "%s/%s", m->dir, val);
        return 0;
    }
    if (!strcmp(key, "vocab_md5")) {
        if (!is_hex(val, 32)) return 1;
        memcpy(m->vocab_md5, val, 33);
        return 0;
    }
    if (!strcmp(key, "vocab_size")) return parse_u64_field(val, &u) || u < 2 || u > (1u << 24) || !(m->vocab_size = (uint32_t)u);
    if (!strcmp(key, "lowercase")) return parse_int_field(val, 0, 1, &m->lowercase);
    if (!strcmp(key, "documents")) {
        if (strcmp(val, "file") && strcmp(val, "blank")) return 1;
        m->blank_docs = !strcmp(val, "blank");
        return 0;
    }
    if (!strcmp(key, "token_bytes")) return parse_u64_field(val, &u) || (u != 2 && u != 4) || !(m->token_bytes = (uint32_t)u);
    if (!strcmp(key, "seed")) return parse_u64_field(val, &m->seed);
    if (!strcmp(key, "valid_fraction")) {
        char *end;
        m->valid_fraction = strtod(val, &end);
        return *end || end == val || !(m->valid_fraction >= 0 && m->valid_fraction < 1);
    }
    if (!strcmp(key, "pad_id")) return parse_int_field(val, 0, 1 << 24, &m->pad_id);
    if (!strcmp(key, "mask_id")) return parse_int_field(val, 0, 1 << 24, &m->mask_id);
    if (!strcmp(key, "unk_id")) return parse_int_field(val, -1, 1 << 24, &m->unk_id);
    if (!strcmp(key, "cls_id")) return parse_int_field(val, -1, 1 << 24, &m->cls_id);
    if (!strcmp(key, "sep_id")) return parse_int_field(val, -1, 1 << 24, &m->sep_id);
    if (!strcmp(key, "train_docs")) return parse_u64_field(val, &m->train_docs);
    if (!strcmp(key, "valid_docs")) return parse_u64_field(val, &m->valid_docs);
    if (!strcmp(key, "train_tokens")) return parse_u64_field(val, &m->train_tokens);
    if (!strcmp(key, "valid_tokens")) return parse_u64_field(val, &m->valid_tokens);
    if (!strcmp(key, "source_bytes")) return parse_u64_field(val, &m->source_bytes);
    if (!strcmp(key, "invalid_utf8")) return parse_u64_field(val, &m->invalid_utf8);
    if (!strcmp(key, "shard_dir")) {
        if (!is_plain_name(val)) return 1;
        snprintf(m->shard_dir, sizeof(m->shard_dir), "%s", val);
        return 0;
    }
    if (!strcmp(key, "replaces")) {
        if (!is_hex(val, 32)) return 1;
        memcpy(m->replaces, val, 33);
        return 0;
    }
    if (!strcmp(key, "checksum")) return 1;  // only as the last line (manifest_load takes it off)
    if (!strcmp(key, "shard")) {
        if (m->n_shards >= SHARD_MAX_FILES) return 1;
        m->shards = realloc(m->shards, (size_t)(m->n_shards + 1) * sizeof(ShardEntry));
        if (!m->shards) mlm_fatal(MLM_EXIT_FAILURE, "out of memory reading a manifest");
        ShardEntry *e = &m->shards[m->n_shards];
        memset(e, 0, sizeof(*e));
        char split[16], file[300], toks[32], docs[32], hash[32], extra[2];
        int n = sscanf(val, "%15s %299s %31s %31s %31s %1s", split, file, toks, docs, hash, extra);
        if (n != 4 && n != 5) return 1;
        if (n == 5 && (!is_hex(hash, 16) || sscanf(hash, "%16" SCNx64, &e->payload_hash) != 1)) return 1;
        if ((n == 4) != (m->version == 1)) return 1;  // version 2 lists every shard's payload hash
        if ((strcmp(split, "train") && strcmp(split, "valid")) || !is_plain_name(file) ||
            parse_u64_field(toks, &e->n_tokens) || parse_u64_field(docs, &e->n_docs))
            return 1;
        snprintf(e->split, sizeof(e->split), "%.7s", split);
        snprintf(e->file, sizeof(e->file), "%.255s", file);
        m->n_shards++;
        return 0;
    }
    return 0;  // unknown keys are ignored, so later versions may add information
}

// The special ids and the vocabulary the manifest describes must agree: a char set's code points have the md5
// the shards carry, and its specials follow them; a byte set is the one fixed vocabulary. (WordPiece: checked
// against vocab.txt by shard_set_open, which reads it.) 0, or 1 with a message.
static int manifest_check_vocab(const Manifest *m, const char *path, char *err, size_t errlen) {
    char md5[33];
    if (m->tokenizer == TOKENIZER_CHAR) {
        Vocab v;
        data_md5(m->char_codepoints, strlen(m->char_codepoints), md5);
        if (strcmp(md5, m->vocab_md5)) {
            mlm_set_error(err, errlen, "%s: the character list (vocab) has md5 %s, not the vocab_md5 %s the set was "
                          "tokenized with (edited or damaged); run `mlm prepare` again", path, md5, m->vocab_md5);
            return 1;
        }
        if (vocab_from_codepoints(m->char_codepoints, &v) || v.kind != VOCAB_KIND_CHAR ||
            (uint32_t)v.n_tokens != m->vocab_size || m->pad_id != v.pad_id || m->mask_id != v.mask_id ||
            m->unk_id != -1 || m->cls_id != -1 || m->sep_id != -1 || m->lowercase) {
            mlm_set_error(err, errlen, "%s: the special ids or vocab_size do not follow the character list (a char set "
                          "has [PAD] and [MASK] after its characters, nothing else); run `mlm prepare` again", path);
            return 1;
        }
        return 0;
    }
    if (m->tokenizer == TOKENIZER_BYTE) {
        data_md5(BYTE_VOCAB_TEXT, strlen(BYTE_VOCAB_TEXT), md5);
        if (strcmp(md5, m->vocab_md5) || m->vocab_size != BT_VOCAB_SIZE || m->pad_id != BT_PAD ||
            m->mask_id != BT_MASK || m->unk_id != BT_UNK || m->cls_id != BT_CLS || m->sep_id != BT_SEP ||
            m->lowercase || strcmp(m->char_codepoints, "bytes")) {
            mlm_set_error(err, errlen, "%s: not the byte vocabulary (its vocab_md5, vocab_size or special ids differ "
                          "from the byte tokenizer's: 261 ids, [PAD] [UNK] [CLS] [SEP] [MASK] = 256..260); run `mlm "
                          "prepare` again", path);
            return 1;
        }
        return 0;
    }
    return 0;
}

// Counts that must add up across the shard list.
static int manifest_check_counts(const Manifest *m, const char *path, char *err, size_t errlen) {
    uint64_t t[2] = {0, 0};
    for (int i = 0; i < m->n_shards; i++) t[!strcmp(m->shards[i].split, "valid")] += m->shards[i].n_tokens;
    if (t[0] != m->train_tokens || t[1] != m->valid_tokens) {
        mlm_set_error(err, errlen, "%s: its shards hold %" PRIu64 " train / %" PRIu64 " valid tokens but it says %"
                      PRIu64 " / %" PRIu64 "; run `mlm prepare` again", path, t[0], t[1], m->train_tokens,
                      m->valid_tokens);
        return 1;
    }
    if (m->token_bytes == 2 && m->vocab_size > 65536) {
        mlm_set_error(err, errlen, "%s: 2-byte tokens for a vocabulary of %u; run `mlm prepare` again", path, m->vocab_size);
        return 1;
    }
    return 0;
}

// The command that makes a version-1 set again (its options are all in the manifest; the text is not).
static void prepare_again_command(const Manifest *m, char *out, size_t outlen) {
    char vocab[1300] = "";
    if (m->tokenizer == TOKENIZER_WORDPIECE)
        snprintf(vocab, sizeof(vocab), " --vocab %s%s", m->vocab, m->lowercase ? "" : " --no-lowercase");
    snprintf(out, outlen, "mlm prepare --force --out %s --tokenizer %s%s --documents %s --valid-fraction %.17g --seed %"
             PRIu64 " TEXT...", m->dir, tokenizer_name(m->tokenizer), vocab, m->blank_docs ? "blank" : "file",
             m->valid_fraction, m->seed);
}

// Read and parse; v1_ok: accept a version-1 manifest (for prepare --force to replace it), else refuse it.
static int manifest_load(Manifest *m, const char *dir_or_file, int v1_ok, char *err, size_t errlen) {
    memset(m, 0, sizeof(*m));
    m->unk_id = m->cls_id = m->sep_id = -1;
    m->pad_id = m->mask_id = -1;
    char path[1200];
    struct stat st;
    if (stat(dir_or_file, &st) == 0 && !S_ISDIR(st.st_mode)) {
        snprintf(path, sizeof(path), "%s", dir_or_file);
        const char *slash = strrchr(dir_or_file, '/');
        snprintf(m->dir, sizeof(m->dir), "%.*s", slash ? (int)(slash - dir_or_file) : 1, slash ? dir_or_file : ".");
    } else {
        snprintf(m->dir, sizeof(m->dir), "%s", dir_or_file);
        snprintf(path, sizeof(path), "%s/" SHARD_MANIFEST, dir_or_file);
    }
    size_t len;
    char *text = mlm_read_regular(path, "shard manifest", MANIFEST_MAX_BYTES, &len, err, errlen);
    if (!text) {
        if (errno == ENOENT)
            mlm_set_error(err, errlen, "cannot read %s: %s; a shard set without its manifest is an interrupted "
                          "`mlm prepare`: run it again", path, strerror(ENOENT));
        return 1;
    }
    data_md5(text, len, m->md5);
    // The checksum: the last line, over every byte before it.
    size_t body = len;
    int have_sum = 0;
    if (len > 0 && text[len - 1] == '\n') {
        size_t start = len - 1;
        while (start > 0 && text[start - 1] != '\n') start--;
        if (!strncmp(text + start, "checksum = ", 11)) {
            have_sum = 1;
            body = start;
            char md5[33];
            data_md5(text, body, md5);
            text[len - 1] = '\0';
            if (!is_hex(text + start + 11, 32) || strcmp(md5, text + start + 11)) {
                mlm_set_error(err, errlen, "%s fails its checksum (the file is damaged or was edited; only `mlm "
                              "prepare` writes it): run `mlm prepare` again to rebuild the shard set", path);
                free(text);
                return 1;
            }
        }
    }
    if (!have_sum && strstr(text, "\nchecksum = ")) {
        mlm_set_error(err, errlen, "%s has text after its checksum line (damaged, or appended to); run `mlm prepare` "
                      "again to rebuild the shard set", path);
        free(text);
        return 1;
    }
    text[body] = '\0';
    int line_no = 0, seen_format = 0, rc = 0;
    for (char *line = text; *line && !rc;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = '\0';
        line_no++;
        if (line[0] && line[0] != '#') {
            char *eq = strstr(line, " = ");
            if (!eq) rc = 1;
            else {
                *eq = '\0';
                rc = manifest_line(m, line, eq + 3, &seen_format);
                if (rc) *eq = ' ';
            }
            if (rc) mlm_set_error(err, errlen, "%s:%d: malformed manifest line '%.200s'", path, line_no, line);
        }
        line = nl ? nl + 1 : line + strlen(line);
    }
    free(text);
    if (!rc && (!seen_format || !m->version || !m->vocab_size || !m->token_bytes || m->vocab_md5[0] == '\0' ||
                !m->char_codepoints || m->pad_id < 0 || m->mask_id < 0)) {
        mlm_set_error(err, errlen, "%s: not a complete mlm shard manifest (format, version, vocab, vocab_md5, "
                      "vocab_size, token_bytes, pad_id and mask_id are required)", path);
        rc = 1;
    }
    if (!rc && m->version == 1 && !v1_ok) {
        char cmd[2000];
        prepare_again_command(m, cmd, sizeof(cmd));
        mlm_set_error(err, errlen, "%s is a shard set of format version 1 (from an mlm before manifests had checksums), whose manifest has no "
                      "checksum and does not cover the shards' contents, so it is not read any more; prepare it again "
                      "from the same text with the same options: %s (add --shard-tokens N if it was made with it). The "
                      "shards come out the same, and runs checkpointed on this set resume on the new one", path, cmd);
        rc = 1;
    }
    if (!rc && m->version > 1 && !have_sum) {
        mlm_set_error(err, errlen, "%s has no checksum line at its end (damaged or cut short); run `mlm prepare` "
                      "again to rebuild the shard set", path);
        rc = 1;
    }
    if (!rc && m->version > 1) rc = manifest_check_vocab(m, path, err, errlen) || manifest_check_counts(m, path, err, errlen);
    if (rc) manifest_free(m);
    return rc;
}

int manifest_read(Manifest *m, const char *dir_or_file, char *err, size_t errlen) {
    return manifest_load(m, dir_or_file, 0, err, errlen);
}

int manifest_read_v1(Manifest *m, const char *dir_or_file, char *err, size_t errlen) {
    return manifest_load(m, dir_or_file, 1, err, errlen);
}

static void md5_bytes(const char hex[33], uint8_t out[16]) {
    for (int i = 0; i < 16; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
}

int manifest_vocab(const Manifest *m, Vocab *v, char *err, size_t errlen) {
    memset(v, 0, sizeof(*v));
    if (m->tokenizer == TOKENIZER_CHAR) {
        if (vocab_from_codepoints(m->char_codepoints, v) || v->kind != VOCAB_KIND_CHAR ||
            (uint32_t)v->n_tokens != m->vocab_size) {
            mlm_set_error(err, errlen, "%s/" SHARD_MANIFEST ": malformed character vocabulary", m->dir);
            return 1;
        }
        return 0;
    }
    v->kind = m->tokenizer == TOKENIZER_BYTE ? VOCAB_KIND_BYTE : VOCAB_KIND_WORDPIECE;
    v->n_tokens = (int)m->vocab_size;
    v->n_chars = v->kind == VOCAB_KIND_BYTE ? 256 : v->n_tokens;
    v->pad_id = m->pad_id;
    v->mask_id = m->mask_id;
    v->unk_id = m->unk_id;
    v->cls_id = m->cls_id;
    v->sep_id = m->sep_id;
    memcpy(v->md5, m->vocab_md5, 33);
    char why[200];
    if (vocab_check(v, why, sizeof(why))) {
        mlm_set_error(err, errlen, "%s/" SHARD_MANIFEST ": %s", m->dir, why);
        return 1;
    }
    return 0;
}

// ---- A split as one stream

int shard_stream_open(ShardStream *st, const Manifest *m, const char *split, int verify_payload, char *err,
                      size_t errlen) {
    memset(st, 0, sizeof(*st));
    uint8_t md5[16];
    md5_bytes(m->vocab_md5, md5);
    st->shards = mlm_calloc((size_t)m->n_shards + 1, sizeof(Shard), "shards");
    st->start = mlm_calloc((size_t)m->n_shards + 2, sizeof(uint64_t), "shard starts");
    for (int i = 0; i < m->n_shards; i++) {
        const ShardEntry *e = &m->shards[i];
        if (strcmp(e->split, split)) continue;
        char path[1400];
        manifest_shard_path(m, e, path, sizeof(path));
        Shard *s = &st->shards[st->n];
        if (shard_open(s, path, md5, verify_payload, err, errlen)) {
            shard_stream_close(st);
            return 1;
        }
        st->n++;
        const ShardHeader *h = &s->h;
        char what[300] = "";
        if (h->token_bytes != m->token_bytes)
            snprintf(what, sizeof(what), "its tokens are %u bytes wide, the manifest's %u", h->token_bytes, m->token_bytes);
        else if (h->vocab_size != m->vocab_size)
            snprintf(what, sizeof(what), "it was written for %u token ids, the manifest's vocabulary has %u", h->vocab_size,
                     m->vocab_size);
        else if (h->n_tokens != e->n_tokens || h->n_docs != e->n_docs)
            snprintf(what, sizeof(what), "it holds %" PRIu64 " tokens in %" PRIu64 " document segments, its manifest "
                     "entry says %" PRIu64 " in %" PRIu64, h->n_tokens, h->n_docs, e->n_tokens, e->n_docs);
        else if (m->version > 1 && h->payload_hash != e->payload_hash)
            snprintf(what, sizeof(what), "its payload hash %016" PRIx64 " is not the %016" PRIx64 " its manifest entry "
                     "lists (a shard of another set, or of another prepare)", h->payload_hash, e->payload_hash);
        if (what[0]) {
            mlm_set_error(err, errlen, "shard %s does not match its manifest entry: %s; run `mlm prepare` again", path,
                          what);
            shard_stream_close(st);
            return 1;
        }
        st->start[st->n] = st->start[st->n - 1] + s->h.n_tokens;
        st->n_docs += s->h.n_docs;
    }
    st->n_tokens = st->start[st->n];
    return 0;
}

void shard_stream_close(ShardStream *st) {
    for (int i = 0; i < st->n; i++) shard_close(&st->shards[i]);
    free(st->shards);
    free(st->start);
    memset(st, 0, sizeof(*st));
}

// Index of the shard holding stream position pos (< n_tokens).
static int shard_of(const ShardStream *st, uint64_t pos) {
    int lo = 0, hi = st->n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (st->start[mid] <= pos) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// An id read from a mapped shard is outside the vocabulary: the file changed after it was verified (a mapping
// shows later writes to the file). Stop before the id reaches a model (the CUDA embedding does not check).
MLM_NORETURN static void shard_id_outside(const Shard *s, uint64_t local, uint32_t id) {
    mlm_fatal(MLM_EXIT_FAILURE, "shard %s: token %" PRIu64 " (byte offset %" PRIu64 ") is id %u, outside the vocabulary "
              "of %u ids; the file was changed after it was verified (is another program writing it?): run `mlm "
              "prepare` again, then `mlm train --resume`", s->path, local, SHARD_HEADER_BYTES + local * s->h.token_bytes,
              id, s->h.vocab_size);
}

void shard_stream_read(const ShardStream *st, uint64_t pos, size_t n, int *out) {
    size_t k = 0;
    while (k < n) {
        int i = shard_of(st, pos + k);
        const Shard *s = &st->shards[i];
        uint64_t local = pos + k - st->start[i];
        size_t m = (size_t)MLM_MIN((uint64_t)(n - k), s->h.n_tokens - local);
        uint32_t bad = 0, V = s->h.vocab_size;
        if (s->h.token_bytes == 2) {
            const uint16_t *t = (const uint16_t *)s->tokens + local;
            for (size_t j = 0; j < m; j++) bad |= (out[k + j] = t[j]) >= V;
        } else {
            const uint32_t *t = (const uint32_t *)s->tokens + local;
            for (size_t j = 0; j < m; j++) bad |= t[j] >= V, out[k + j] = (int)t[j];
        }
        if (bad)
            for (size_t j = 0; j < m; j++)
                if ((uint32_t)out[k + j] >= V) shard_id_outside(s, local + j, (uint32_t)out[k + j]);
        k += m;
    }
}

uint64_t shard_stream_doc_start(const ShardStream *st, uint64_t d) {
    for (int i = 0; i < st->n; i++) {
        if (d < st->shards[i].h.n_docs) return st->start[i] + st->shards[i].doc_off[d];
        d -= st->shards[i].h.n_docs;
    }
    return st->n_tokens;
}

// Packed position of document segment d's first token: every earlier segment adds one separator.
static uint64_t packed_doc_start(const ShardStream *st, uint64_t d) { return shard_stream_doc_start(st, d) + d; }

void shard_stream_packed_read(const ShardStream *st, uint64_t q, size_t n, int sep_id, int *out) {
    uint64_t lo = 0, hi = st->n_docs - 1;  // the last segment starting at or before q
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo + 1) / 2;
        if (packed_doc_start(st, mid) <= q) lo = mid;
        else hi = mid - 1;
    }
    uint64_t d = lo, start = packed_doc_start(st, d), end = shard_stream_doc_start(st, d + 1) + d;  // end: its separator
    size_t k = 0;
    while (k < n) {
        if (q + k < end) {
            size_t m = (size_t)MLM_MIN((uint64_t)(n - k), end - (q + k));
            shard_stream_read(st, q + k - d, m, out + k);  // stream position = packed position - separators before
            k += m;
        } else {
            out[k++] = sep_id;
            d++;
            start = end + 1;
            end = d < st->n_docs ? shard_stream_doc_start(st, d + 1) + d : start;
        }
    }
    (void)start;
}

// ---- A whole set

// Read the set's vocab.txt once (a regular file of bounded size): its md5 must be the one the shards were made
// with, and its [PAD] [MASK] [UNK] [CLS] [SEP] and size those of the manifest.
static int open_wordpiece_vocab(ShardSet *s, const char *mpath, char *err, size_t errlen) {
    const Manifest *m = &s->m;
    size_t len;
    char why[1400];
    char *text = mlm_read_regular(m->vocab, "vocabulary", WP_VOCAB_MAX_BYTES, &len, why, sizeof(why));
    if (!text) {
        mlm_set_error(err, errlen, "%s: %s; the set needs the vocab.txt it was made with (md5 %s)", mpath, why,
                      m->vocab_md5);
        return 1;
    }
    char md5[33];
    data_md5(text, len, md5);
    if (strcmp(md5, m->vocab_md5) != 0) {
        mlm_set_error(err, errlen, "%s: the vocabulary %s has md5 %s, not the %s the shards were made with (damaged or "
                      "replaced); run `mlm prepare` again", mpath, m->vocab, md5, m->vocab_md5);
        free(text);
        return 1;
    }
    s->wp = wp_load_text(text, len, m->vocab, m->lowercase, err, errlen);
    free(text);
    if (!s->wp) return 1;
    int want[5] = {wp_id(s->wp, "[PAD]"), wp_id(s->wp, "[MASK]"), wp_id(s->wp, "[UNK]"), wp_id(s->wp, "[CLS]"),
                   wp_id(s->wp, "[SEP]")};
    int have[5] = {m->pad_id, m->mask_id, m->unk_id, m->cls_id, m->sep_id};
    static const char *const names[5] = {"pad_id", "mask_id", "unk_id", "cls_id", "sep_id"};
    if (wp_vocab_size(s->wp) != m->vocab_size) {
        mlm_set_error(err, errlen, "%s: vocab_size %u, but %s has %zu tokens; run `mlm prepare` again", mpath,
                      m->vocab_size, m->vocab, wp_vocab_size(s->wp));
        return 1;
    }
    for (int i = 0; i < 5; i++)
        if (want[i] != have[i]) {
            mlm_set_error(err, errlen, "%s: %s = %d, but %s has that token at id %d; run `mlm prepare` again", mpath,
                          names[i], have[i], m->vocab, want[i]);
            return 1;
        }
    return 0;
}

static int shard_set_open_once(ShardSet *s, const char *path, char *err, size_t errlen) {
    memset(s, 0, sizeof(*s));
    if (manifest_read(&s->m, path, err, errlen)) return 1;
    memcpy(s->md5, s->m.md5, sizeof(s->md5));
    char mpath[1200];
    snprintf(mpath, sizeof(mpath), "%s/" SHARD_MANIFEST, s->m.dir);
    if (s->m.tokenizer == TOKENIZER_WORDPIECE && open_wordpiece_vocab(s, mpath, err, errlen)) {
        shard_set_close(s);
        return 1;
    }
    if (shard_stream_open(&s->train, &s->m, "train", 0, err, errlen) ||
        shard_stream_open(&s->valid, &s->m, "valid", 0, err, errlen)) {
        shard_set_close(s);
        return 1;
    }
    return 0;
}

int shard_set_open(ShardSet *s, const char *path, char *err, size_t errlen) {
    if (shard_set_open_once(s, path, err, errlen) == 0) return 0;
    // `mlm prepare --force` may have replaced the set between the manifest and its files (it swaps the manifest,
    // then removes the old shards): if the manifest changed meanwhile, the new set is complete; open it instead.
    Manifest again;
    char ignored[8];
    if (manifest_read(&again, path, ignored, sizeof(ignored)) != 0) return 1;
    int changed = strcmp(again.md5, s->md5) != 0 && s->md5[0];
    manifest_free(&again);
    return changed ? shard_set_open_once(s, path, err, errlen) : 1;
}

int shard_set_identity_matches(const ShardSet *s, const char *md5) {
    return !strcmp(s->md5, md5) || (s->m.replaces[0] && !strcmp(s->m.replaces, md5));
}

void shard_set_close(ShardSet *s) {
    shard_stream_close(&s->train);
    shard_stream_close(&s->valid);
    if (s->wp) wp_free(s->wp);
    s->wp = NULL;
    manifest_free(&s->m);
}
