// test_shards.c: the shard format and the shard-set stream: a write/read round trip at both token widths, the
// reader refusing every kind of damage (magic, header checksum, version, truncation, vocabulary checksum, payload,
// an unfinished .part), the manifest round trip and its errors, the batcher over shards sampling as the reference
// does (a permutation per epoch, offsets in range, rows equal to the tokens), and the packed stream
// against a direct construction. Issue 22 (data you can trust): every byte of a manifest covered by its checksum,
// special ids checked against the vocabulary, the identity covering the shards' contents, version-1 manifests
// refused with the command that remakes them, token width and vocabulary size mismatches named as such, the
// set verification (payload, id range with shard and offset, the run directory's stamp), the stream read guard,
// FIFOs and devices refused without blocking.
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/shards.h"
#include "mlm/wordpiece.h"
#include "test_util.h"

static char dir[256];

static void write_shard(const char *name, uint32_t width, uint32_t vsize, const uint8_t md5[16], const int32_t *ids,
                        const size_t *doc_starts, int n_docs, size_t n) {
    ShardWriter w;
    char path[512], err[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    CHECK(shard_writer_open(&w, path, width, vsize, md5, 0, err, sizeof(err)) == 0, "%s", err);
    for (int d = 0; d < n_docs; d++) {
        size_t a = doc_starts[d], b = d + 1 < n_docs ? doc_starts[d + 1] : n;
        shard_writer_begin_doc(&w);
        CHECK(shard_writer_append(&w, ids + a, b - a, err, sizeof(err)) == 0, "%s", err);
    }
    CHECK(shard_writer_close(&w, err, sizeof(err)) == 0, "%s", err);
}

static int open_err(const char *name, const uint8_t *md5, int verify, char *err, size_t errlen) {
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    Shard s;
    int rc = shard_open(&s, path, md5, verify, err, errlen);
    if (!rc) shard_close(&s);
    return rc;
}

// Copy a file with one byte changed (at < 0: truncated by -at bytes).
static void damaged_copy(const char *from, const char *to, long at, unsigned char xor_with) {
    char a[512], b[512];
    snprintf(a, sizeof(a), "%s/%s", dir, from);
    snprintf(b, sizeof(b), "%s/%s", dir, to);
    size_t len;
    char *data = mlm_read_file(a, &len);
    if (at >= 0) data[at] ^= (char)xor_with;
    else len -= (size_t)(-at);
    FILE *f = fopen(b, "wb");
    fwrite(data, 1, len, f);
    fclose(f);
    free(data);
}

static void test_round_trip_and_damage(void) {
    uint8_t md5[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, other[16] = {0};
    int32_t ids[1001];
    for (int i = 0; i < 1001; i++) ids[i] = (i * 7919) % 70000;
    size_t docs[3] = {0, 10, 600};
    write_shard("wide.bin", 4, 70000, md5, ids, docs, 3, 1001);
    for (int i = 0; i < 1001; i++) ids[i] %= 30000;
    write_shard("narrow.bin", 2, 30000, md5, ids, docs, 3, 1001);
    char path[512], err[1024];
    for (int wide = 0; wide < 2; wide++) {
        snprintf(path, sizeof(path), "%s/%s", dir, wide ? "wide.bin" : "narrow.bin");
        Shard s;
        CHECK(shard_open(&s, path, md5, 1, err, sizeof(err)) == 0, "%s", err);
        CHECK(s.h.n_tokens == 1001 && s.h.n_docs == 3 && s.h.token_bytes == (wide ? 4u : 2u), "header read back");
        int ok = 1;
        for (int i = 0; i < 1001; i++) ok &= (int)shard_token(&s, (uint64_t)i) == (wide ? (i * 7919) % 70000 : ids[i]);
        CHECK(ok, "tokens read back (width %d)", wide ? 4 : 2);
        CHECK(s.doc_off[0] == 0 && s.doc_off[1] == 10 && s.doc_off[2] == 600 && s.doc_off[3] == 1001, "document offsets");
        shard_close(&s);
        snprintf(path, sizeof(path), "%s/%s.part", dir, wide ? "wide.bin" : "narrow.bin");
        CHECK(access(path, F_OK) != 0, "no .part left after close");
    }
    // An id outside the vocabulary is refused by the writer.
    ShardWriter w;
    snprintf(path, sizeof(path), "%s/bad.bin", dir);
    CHECK(shard_writer_open(&w, path, 2, 100, md5, 0, err, sizeof(err)) == 0, "%s", err);
    int32_t big = 100;
    CHECK(shard_writer_append(&w, &big, 1, err, sizeof(err)) != 0 && strstr(err, "outside"), "id >= vocab refused");
    // An unfinished shard exists only as .part; aborting removes it, and the final name never appears.
    snprintf(path, sizeof(path), "%s/bad.bin.part", dir);
    CHECK(access(path, F_OK) == 0, "the shard is written as .part");
    shard_writer_abort(&w);
    CHECK(access(path, F_OK) != 0 && open_err("bad.bin", NULL, 0, err, sizeof(err)) != 0, "aborted shard gone");

    struct { long at; unsigned char x; const char *msg; } cases[] = {
        {0, 1, "magic"}, {9, 1, "checksum"}, {20, 1, "checksum"}, {45, 1, "checksum"}, {-1, 0, "truncated"},
        {-2000, 0, "truncated"}, {72 + 10, 0x40, "checksum"}, {72 + 2008 + 8, 1, "checksum"}, {72 + 2008, 1, "offsets"}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        damaged_copy("narrow.bin", "damaged.bin", cases[i].at, cases[i].x);
        // Payload damage is seen by verification; header damage and truncation always.
        int rc = open_err("damaged.bin", md5, 1, err, sizeof(err));
        CHECK(rc != 0 && strstr(err, cases[i].msg) && strstr(err, "mlm prepare"), "case %zu: %s", i, err);
    }
    CHECK(open_err("narrow.bin", other, 0, err, sizeof(err)) != 0 && strstr(err, "vocab"), "vocab checksum: %s", err);
    // A version from the future is named as such (header rewritten with a valid checksum).
    snprintf(path, sizeof(path), "%s/narrow.bin", dir);
    size_t len;
    unsigned char *data = (unsigned char *)mlm_read_file(path, &len);
    data[8] = 9;
    uint64_t h = shard_fnv1a(SHARD_FNV_INIT, data, 64);
    memcpy(data + 64, &h, 8);
    snprintf(path, sizeof(path), "%s/future.bin", dir);
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, len, f);
    fclose(f);
    free(data);
    CHECK(open_err("future.bin", NULL, 0, err, sizeof(err)) != 0 && strstr(err, "version 9"), "version: %s", err);
}

// A set of three train shards of the byte vocabulary, written through the manifest (in `sub`, under dir).
static void make_set_in(const char *sub, const int32_t *ids, size_t n, const size_t *doc_starts, int n_docs,
                        Manifest *m) {
    memset(m, 0, sizeof(*m));
    snprintf(m->dir, sizeof(m->dir), "%s/%s", dir, sub);
    mkdir(m->dir, 0755);
    m->version = MANIFEST_VERSION;
    m->tokenizer = TOKENIZER_BYTE;
    m->vocab_size = 261;
    m->token_bytes = 2;
    data_md5(BYTE_VOCAB_TEXT, strlen(BYTE_VOCAB_TEXT), m->vocab_md5);
    snprintf(m->vocab, sizeof(m->vocab), "bytes");
    m->char_codepoints = mlm_strdup("bytes");
    m->pad_id = 256; m->mask_id = 260; m->unk_id = 257; m->cls_id = 258; m->sep_id = 259;
    uint8_t md5[16];
    for (int i = 0; i < 16; i++) {
        unsigned v;
        sscanf(m->vocab_md5 + 2 * i, "%2x", &v);
        md5[i] = (uint8_t)v;
    }
    // Shard cuts at 1000 and 2500 (mid-document: the next shard continues it).
    size_t cuts[4] = {0, 1000, 2500, n};
    m->shards = calloc(4, sizeof(ShardEntry));
    int d = 0;
    for (int s = 0; s < 3; s++) {
        ShardWriter w;
        char path[1400], err[512];
        snprintf(m->shards[s].file, sizeof(m->shards[s].file), "train-%05d.bin", s);
        snprintf(m->shards[s].split, sizeof(m->shards[s].split), "train");
        snprintf(path, sizeof(path), "%s/%s", m->dir, m->shards[s].file);
        int continues = s > 0;  // no document starts at a cut: each later shard continues one
        CHECK(shard_writer_open(&w, path, 2, 261, md5, continues, err, sizeof(err)) == 0, "%s", err);
        for (size_t i = cuts[s]; i < cuts[s + 1]; i++) {
            if ((d < n_docs && doc_starts[d] == i) || i == cuts[s]) {
                shard_writer_begin_doc(&w);
                if (d < n_docs && doc_starts[d] == i) d++;
            }
            CHECK(shard_writer_append(&w, ids + i, 1, err, sizeof(err)) == 0, "%s", err);
        }
        m->shards[s].n_tokens = w.h.n_tokens;
        m->shards[s].n_docs = w.h.n_docs;
        m->train_tokens += w.h.n_tokens;
        CHECK(shard_writer_close(&w, err, sizeof(err)) == 0, "%s", err);
        m->shards[s].payload_hash = w.h.payload_hash;
    }
    // One valid shard (the stream needs both splits in a set).
    m->shards[3] = m->shards[0];
    snprintf(m->shards[3].split, sizeof(m->shards[3].split), "valid");
    m->valid_tokens = m->shards[0].n_tokens;
    m->n_shards = 4;
    m->train_docs = (uint64_t)n_docs;
    char err[512];
    CHECK(manifest_write(m, err, sizeof(err)) == 0, "%s", err);
}

static void make_set(const int32_t *ids, size_t n, const size_t *doc_starts, int n_docs, Manifest *m) {
    make_set_in("set", ids, n, doc_starts, n_docs, m);
}

static void test_streams(void) {
    enum { N = 4000 };
    int32_t ids[N];
    int ref[N];
    for (int i = 0; i < N; i++) ref[i] = ids[i] = (int32_t)((i * 131u + (unsigned)(i >> 5)) % 256u);
    size_t docs[6] = {0, 7, 900, 1500, 2600, 3999};
    Manifest w;
    make_set(ids, N, docs, 6, &w);
    Manifest m;
    char err[1024];
    CHECK(manifest_read(&m, w.dir, err, sizeof(err)) == 0, "%s", err);
    CHECK(m.n_shards == 4 && m.pad_id == 256 && m.sep_id == 259 && m.vocab_size == 261 && m.train_tokens == N,
          "manifest round trip");
    ShardStream st;
    CHECK(shard_stream_open(&st, &m, "train", 1, err, sizeof(err)) == 0, "%s", err);
    CHECK(st.n == 3 && st.n_tokens == N, "stream of %d shards, %llu tokens", st.n, (unsigned long long)st.n_tokens);
    // The stream batcher samples as the reference does: every epoch a permutation of the (N - 1) / T items, item
    // i starting at i*T + r with r in [0, min(T - 1, N - (i*T + T + 1))], rows equal to the tokens there, a new
    // order each epoch, the same order again for the same (seed, stream, epoch).
    Batcher a, b, b2;
    batcher_init(&a, ref, N, 32, 16, 1, 42, 0);
    batcher_init_stream(&b, &st, 0, 259, 32, 16, 1, 42, 0);
    batcher_init_stream(&b2, &st, 0, 259, 32, 16, 1, 42, 0);
    CHECK(a.n_items == b.n_items && a.n_batches == b.n_batches, "same item and batch counts as the reference");
    size_t n_items = b.n_items;
    int *bb = malloc(16 * 32 * sizeof(int));
    char *seen = calloc(n_items, 1);
    int perm = 1, rows = 1, ranges = 1, again = 1, moved = 0, offs = 0;
    size_t first_prev = (size_t)-1;
    for (long e = 0; e < 3; e++) {
        batcher_set_epoch(&b, e);
        batcher_set_epoch(&b2, e);
        memset(seen, 0, n_items);
        for (size_t i = 0; i < b.n_batches; i++) {
            int nr = batcher_get(&b, i, bb);
            for (int r = 0; r < nr; r++) {
                size_t pos = i * 16 + (size_t)r, start = batcher_item_start(&b, pos), item = start / 32;
                size_t off = start % 32, hi = MLM_MIN((size_t)31, (size_t)N - (item * 32 + 33));
                perm &= item < n_items && !seen[item];
                if (item < n_items) seen[item] = 1;
                ranges &= off <= hi;
                offs |= off != 0;
                rows &= memcmp(bb + r * 32, ref + start, 32 * sizeof(int)) == 0;
                again &= batcher_item_start(&b2, pos) == start;
            }
        }
        moved |= first_prev != (size_t)-1 && first_prev != batcher_item_start(&b, 0);
        first_prev = batcher_item_start(&b, 0);
    }
    CHECK(perm, "each epoch visits every item once");
    CHECK(ranges && offs, "offsets within the reference's range, and not all zero");
    CHECK(rows, "rows are the tokens at their start");
    CHECK(again && moved, "deterministic per (seed, stream, epoch), and a new order each epoch");
    batcher_free(&a);
    batcher_free(&b);
    batcher_free(&b2);
    free(seen);
    // Packed: segments (a document continued across a shard counts once per shard) each followed by SEP.
    int *packed = malloc((N + 16) * sizeof(int));
    size_t k = 0;
    size_t bounds[16], nb = 0;
    size_t cuts[2] = {1000, 2500};
    for (int d = 0; d < 6; d++) bounds[nb++] = docs[d];
    for (int c = 0; c < 2; c++) {
        int dup = 0;
        for (size_t i = 0; i < nb; i++) dup |= bounds[i] == cuts[c];
        if (!dup) bounds[nb++] = cuts[c];
    }
    for (size_t i = 0; i < nb; i++)
        for (size_t j = i + 1; j < nb; j++)
            if (bounds[j] < bounds[i]) { size_t t = bounds[i]; bounds[i] = bounds[j]; bounds[j] = t; }
    for (size_t s = 0; s < nb; s++) {
        size_t e = s + 1 < nb ? bounds[s + 1] : N;
        for (size_t i = bounds[s]; i < e; i++) packed[k++] = ref[i];
        packed[k++] = 259;
    }
    CHECK(k == shard_stream_packed_len(&st) && st.n_docs == nb, "packed length %zu vs %llu (%llu segments)", k,
          (unsigned long long)shard_stream_packed_len(&st), (unsigned long long)st.n_docs);
    int out[300];
    int ok = 1;
    for (size_t q = 0; q + 300 <= k; q += 97) {
        shard_stream_packed_read(&st, q, 300, 259, out);
        ok &= memcmp(out, packed + q, sizeof(out)) == 0;
    }
    CHECK(ok, "packed reads equal the direct construction");
    batcher_init_stream(&b, &st, 1, 259, 32, 16, 1, 42, 0);
    batcher_set_epoch(&b, 0);
    int nbat = batcher_get(&b, 0, bb);
    ok = 1;
    for (int r = 0; r < nbat; r++) ok &= memcmp(bb + r * 32, packed + batcher_item_start(&b, (size_t)r), 32 * sizeof(int)) == 0 &&
                                      batcher_item_start(&b, (size_t)r) % 32 == 0;
    CHECK(ok, "packed batches are whole windows of the packed stream");
    batcher_free(&b);
    free(bb); free(packed);
    shard_stream_close(&st);
    // The manifest names what is wrong: a line added after the checksum, a malformed line under a valid checksum.
    char path[1400];
    snprintf(path, sizeof(path), "%s/" SHARD_MANIFEST, w.dir);
    FILE *f = fopen(path, "a");
    fputs("shard = test x.bin 1 1\n", f);
    fclose(f);
    Manifest bad;
    CHECK(manifest_read(&bad, w.dir, err, sizeof(err)) != 0 && strstr(err, "manifest.txt has text after its checksum"),
          "text after the checksum: %s", err);
    unlink(path);
    CHECK(manifest_read(&bad, w.dir, err, sizeof(err)) != 0 && strstr(err, "interrupted"), "no manifest: %s", err);
    manifest_free(&m);
    manifest_free(&w);
}

// ---- Issue 22

static char *slurp(const char *path, size_t *len) {
    char *d = mlm_read_file(path, len);
    CHECK(d != NULL, "cannot read %s", path);
    return d;
}

static void spit(const char *path, const char *data, size_t len) {
    FILE *f = fopen(path, "wb");
    CHECK(f && fwrite(data, 1, len, f) == len && fclose(f) == 0, "cannot write %s", path);
}

// A byte set's three-shard manifest, as make_set writes it, for the tests below.
static void standard_set(const char *sub, int shift, Manifest *m) {
    enum { N = 4000 };
    static int32_t ids[N];
    for (int i = 0; i < N; i++) ids[i] = (int32_t)((i * 131u + (unsigned)(i >> 5) + (unsigned)shift) % 256u);
    size_t docs[6] = {0, 7, 900, 1500, 2600, 3999};
    make_set_in(sub, ids, N, docs, 6, m);
}

// Bug 3: a manifest had no checksum; 201 of 550 single-bit flips were accepted. Now every single-byte change (at
// every position, three different changes each) and every truncation is refused, naming the manifest.
static void test_manifest_every_byte(void) {
    Manifest m;
    standard_set("mbytes", 0, &m);
    char path[1400], err[4096];
    snprintf(path, sizeof(path), "%s/" SHARD_MANIFEST, m.dir);
    size_t len;
    char *orig = slurp(path, &len);
    int accepted = 0, unnamed = 0, tried = 0;
    static const unsigned char flips[3] = {0x01, 0x20, 0x80};
    for (size_t i = 0; orig && i <= len; i++) {
        for (int k = 0; k < (i < len ? 3 : 1); k++) {
            char *d = malloc(len + 1);
            memcpy(d, orig, len);
            if (i < len) d[i] ^= (char)flips[k];
            spit(path, d, i < len ? len : len - 1);  // i == len: the last byte cut off
            free(d);
            Manifest back;
            tried++;
            if (manifest_read(&back, m.dir, err, sizeof(err)) == 0) {
                accepted++;
                manifest_free(&back);
            } else if (!strstr(err, "manifest.txt")) {
                unnamed++;
            }
        }
    }
    spit(path, orig, len);
    Manifest back;
    CHECK(manifest_read(&back, m.dir, err, sizeof(err)) == 0, "the unchanged manifest reads: %s", err);
    manifest_free(&back);
    CHECK(accepted == 0 && unnamed == 0, "%d of %d changed manifests accepted, %d refused without naming the file",
          accepted, tried, unnamed);
    free(orig);
    manifest_free(&m);
}

// Bug 3: special ids derived from or checked against the vocabulary even under a valid checksum (a manifest
// written through manifest_write with one field wrong).
static int rewrite_reads(Manifest *m, char *err, size_t errlen) {
    char werr[512];
    CHECK(manifest_write(m, werr, sizeof(werr)) == 0, "%s", werr);
    Manifest back;
    int rc = manifest_read(&back, m->dir, err, errlen);
    if (rc == 0) manifest_free(&back);
    return rc;
}

static void write_one_shard(const Manifest *m, ShardEntry *e, const char *split, const char *name, const int32_t *ids,
                            size_t n, uint32_t vocab_size) {
    uint8_t md5[16];
    for (int i = 0; i < 16; i++) {
        unsigned v;
        sscanf(m->vocab_md5 + 2 * i, "%2x", &v);
        md5[i] = (uint8_t)v;
    }
    char path[1400], err[512];
    snprintf(path, sizeof(path), "%s/%s", m->dir, name);
    ShardWriter w;
    CHECK(shard_writer_open(&w, path, m->token_bytes, vocab_size, md5, 0, err, sizeof(err)) == 0, "%s", err);
    CHECK(shard_writer_append(&w, ids, n, err, sizeof(err)) == 0, "%s", err);
    CHECK(shard_writer_close(&w, err, sizeof(err)) == 0, "%s", err);
    memset(e, 0, sizeof(*e));
    snprintf(e->split, sizeof(e->split), "%s", split);
    snprintf(e->file, sizeof(e->file), "%s", name);
    e->n_tokens = w.h.n_tokens;
    e->n_docs = w.h.n_docs;
    e->payload_hash = w.h.payload_hash;
}

static void test_special_ids(void) {
    char err[4096];
    // Byte: the one fixed vocabulary.
    Manifest b;
    standard_set("spbyte", 0, &b);
    b.mask_id = 5;
    CHECK(rewrite_reads(&b, err, sizeof(err)) != 0 && strstr(err, "not the byte vocabulary"), "byte mask_id 5: %s", err);
    b.mask_id = 260;
    b.unk_id = -1;
    CHECK(rewrite_reads(&b, err, sizeof(err)) != 0 && strstr(err, "not the byte vocabulary"), "byte unk_id -1: %s", err);
    b.unk_id = 257;
    b.lowercase = 1;
    CHECK(rewrite_reads(&b, err, sizeof(err)) != 0, "byte lowercase 1: %s", err);
    b.lowercase = 0;
    CHECK(rewrite_reads(&b, err, sizeof(err)) == 0, "the byte set itself reads: %s", err);
    manifest_free(&b);
    // Char: the code-point list has the md5 the shards carry; [PAD] and [MASK] follow it, nothing else.
    Manifest c;
    memset(&c, 0, sizeof(c));
    snprintf(c.dir, sizeof(c.dir), "%s/spchar", dir);
    mkdir(c.dir, 0755);
    c.version = MANIFEST_VERSION;
    c.tokenizer = TOKENIZER_CHAR;
    c.char_codepoints = mlm_strdup("10,32,97,98");
    data_md5(c.char_codepoints, strlen(c.char_codepoints), c.vocab_md5);
    c.vocab_size = 6; c.token_bytes = 2; c.pad_id = 4; c.mask_id = 5; c.unk_id = c.cls_id = c.sep_id = -1;
    CHECK(rewrite_reads(&c, err, sizeof(err)) == 0, "the char manifest reads: %s", err);
    free(c.char_codepoints);
    c.char_codepoints = mlm_strdup("11,32,97,98");  // newline became U+000B (the issue's `10,` -> `11,`)
    CHECK(rewrite_reads(&c, err, sizeof(err)) != 0 && strstr(err, "character list"), "edited code point: %s", err);
    free(c.char_codepoints);
    c.char_codepoints = mlm_strdup("10,32,97,98");
    c.mask_id = 3;
    CHECK(rewrite_reads(&c, err, sizeof(err)) != 0 && strstr(err, "special ids"), "char mask_id 3: %s", err);
    c.mask_id = 5;
    c.unk_id = 2;
    CHECK(rewrite_reads(&c, err, sizeof(err)) != 0 && strstr(err, "special ids"), "char unk_id 2: %s", err);
    c.unk_id = -1;
    manifest_free(&c);
    // WordPiece: every special id is the vocab.txt's own; vocab.txt must have the recorded md5.
    Manifest w;
    memset(&w, 0, sizeof(w));
    snprintf(w.dir, sizeof(w.dir), "%s/spwp", dir);
    mkdir(w.dir, 0755);
    static const char vocab[] = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\n";
    char vpath[1400];
    snprintf(vpath, sizeof(vpath), "%s/vocab.txt", w.dir);
    spit(vpath, vocab, strlen(vocab));
    w.version = MANIFEST_VERSION;
    w.tokenizer = TOKENIZER_WORDPIECE;
    w.lowercase = 1;
    snprintf(w.vocab, sizeof(w.vocab), "vocab.txt");
    w.char_codepoints = mlm_strdup("vocab.txt");
    data_md5(vocab, strlen(vocab), w.vocab_md5);
    w.vocab_size = 7; w.token_bytes = 2; w.pad_id = 0; w.mask_id = 4; w.unk_id = 1; w.cls_id = 2; w.sep_id = 3;
    int32_t ids[12] = {5, 6, 5, 1, 6, 6, 5, 2, 3, 5, 6, 5};
    w.shards = calloc(2, sizeof(ShardEntry));
    write_one_shard(&w, &w.shards[0], "train", "train-00000.bin", ids, 12, 7);
    write_one_shard(&w, &w.shards[1], "valid", "valid-00000.bin", ids + 3, 9, 7);
    w.n_shards = 2;
    w.train_tokens = 12;
    w.valid_tokens = 9;
    char werr[512];
    CHECK(manifest_write(&w, werr, sizeof(werr)) == 0, "%s", werr);
    ShardSet set;
    CHECK(shard_set_open(&set, w.dir, err, sizeof(err)) == 0, "the WordPiece set opens: %s", err);
    shard_set_close(&set);
    struct { int *field; int wrong; const char *name; } edits[] = {
        {&w.mask_id, 5, "mask_id = 5"}, {&w.pad_id, 6, "pad_id = 6"}, {&w.sep_id, 5, "sep_id = 5"},
        {&w.unk_id, -1, "unk_id = -1"}, {&w.cls_id, -1, "cls_id = -1"}};
    for (size_t i = 0; i < sizeof(edits) / sizeof(edits[0]); i++) {
        int keep = *edits[i].field;
        *edits[i].field = edits[i].wrong;
        CHECK(manifest_write(&w, werr, sizeof(werr)) == 0, "%s", werr);
        CHECK(shard_set_open(&set, w.dir, err, sizeof(err)) != 0 && strstr(err, edits[i].name) &&
              strstr(err, "vocab.txt"), "%s refused against vocab.txt: %s", edits[i].name, err);
        *edits[i].field = keep;
    }
    CHECK(manifest_write(&w, werr, sizeof(werr)) == 0, "%s", werr);
    spit(vpath, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nc\n", strlen(vocab));  // one byte of vocab.txt changed
    CHECK(shard_set_open(&set, w.dir, err, sizeof(err)) != 0 && strstr(err, "vocab.txt has md5"), "vocab.txt changed: %s", err);
    spit(vpath, vocab, strlen(vocab));
    manifest_free(&w);
}

// Bug 4: the identity (the manifest's md5) covers the shards' contents, and a shard of another set with the same
// vocabulary and counts, copied over one of this set's, is refused.
static void test_identity(void) {
    Manifest a, b;
    standard_set("ida", 0, &a);
    standard_set("idb", 1, &b);
    char err[4096], from[1400], to[1400];
    ShardSet sa, sb;
    CHECK(shard_set_open(&sa, a.dir, err, sizeof(err)) == 0, "%s", err);
    CHECK(shard_set_open(&sb, b.dir, err, sizeof(err)) == 0, "%s", err);
    CHECK(a.shards[1].n_tokens == b.shards[1].n_tokens && a.shards[1].n_docs == b.shards[1].n_docs &&
          strcmp(sa.md5, sb.md5) != 0, "same counts, other tokens: other identities (%s, %s)", sa.md5, sb.md5);
    shard_set_close(&sa);
    shard_set_close(&sb);
    manifest_shard_path(&b, &b.shards[1], from, sizeof(from));
    manifest_shard_path(&a, &a.shards[1], to, sizeof(to));
    size_t len;
    char *data = slurp(from, &len);
    spit(to, data, len);
    free(data);
    CHECK(shard_set_open(&sa, a.dir, err, sizeof(err)) != 0 && strstr(err, "train-00001.bin") &&
          strstr(err, "payload hash"), "a shard of another set refused at open: %s", err);
    manifest_free(&a);
    manifest_free(&b);
}

// The decision on sets of the previous format: refused, with the command that makes the set again.
static void test_version1(void) {
    Manifest a;
    standard_set("v1", 0, &a);
    char path[1400], err[4096];
    snprintf(path, sizeof(path), "%s/" SHARD_MANIFEST, a.dir);
    FILE *f = fopen(path, "w");
    fprintf(f, "# mlm shard set\nformat = mlm-shards\nversion = 1\ntokenizer = byte\nvocab = bytes\nvocab_md5 = %s\n"
            "vocab_size = 261\nlowercase = 0\ndocuments = blank\ntoken_bytes = 2\nseed = 7\nvalid_fraction = 0.25\n"
            "pad_id = 256\nmask_id = 260\nunk_id = 257\ncls_id = 258\nsep_id = 259\ntrain_tokens = %" PRIu64
            "\nvalid_tokens = %" PRIu64 "\n", a.vocab_md5, a.train_tokens, a.valid_tokens);
    for (int i = 0; i < a.n_shards; i++)
        fprintf(f, "shard = %s %s %" PRIu64 " %" PRIu64 "\n", a.shards[i].split, a.shards[i].file, a.shards[i].n_tokens,
                a.shards[i].n_docs);
    fclose(f);
    Manifest m;
    CHECK(manifest_read(&m, a.dir, err, sizeof(err)) != 0 && strstr(err, "version 1") &&
          strstr(err, "mlm prepare --force --out") && strstr(err, "--tokenizer byte --documents blank") &&
          strstr(err, "--valid-fraction 0.25 --seed 7"), "version 1 refused with the command: %s", err);
    CHECK(manifest_read_v1(&m, a.dir, err, sizeof(err)) == 0 && m.version == 1 && m.n_shards == 4,
          "prepare --force reads it to replace it: %s", err);
    manifest_free(&m);
    manifest_free(&a);
}

// Bug 12: a token width or vocabulary size mismatch is named as such (it said "tokens 352113 vs 352113").
static void test_mismatch_messages(void) {
    Manifest a;
    standard_set("wid", 0, &a);
    char err[4096], werr[512];
    a.token_bytes = 4;
    CHECK(manifest_write(&a, werr, sizeof(werr)) == 0, "%s", werr);
    ShardSet s;
    CHECK(shard_set_open(&s, a.dir, err, sizeof(err)) != 0 && strstr(err, "2 bytes wide, the manifest's 4"),
          "width: %s", err);
    a.token_bytes = 2;
    int32_t ids[5] = {1, 2, 3, 4, 299};
    write_one_shard(&a, &a.shards[3], "valid", "valid-00009.bin", ids, 5, 300);  // same vocabulary md5, 300 ids
    a.valid_tokens = 5;
    CHECK(manifest_write(&a, werr, sizeof(werr)) == 0, "%s", werr);
    CHECK(shard_set_open(&s, a.dir, err, sizeof(err)) != 0 && strstr(err, "written for 300 token ids, the manifest's "
          "vocabulary has 261"), "vocabulary size: %s", err);
    manifest_free(&a);
}

// A shard's token i rewritten to `id` with valid payload and header checksums (what a crafted file or a buggy
// writer would leave), and its manifest entry's hash.
static void craft_token(Manifest *m, int entry, uint64_t i, uint32_t id) {
    char path[1400], err[512];
    manifest_shard_path(m, &m->shards[entry], path, sizeof(path));
    m->shards[entry].payload_hash = test_shard_set_token(path, i, id);
    CHECK(manifest_write(m, err, sizeof(err)) == 0, "%s", err);
}

static int verify(const char *set_dir, const char *stamp_dir, int splits, ShardVerifyResult *res, char *err,
                  size_t errlen) {
    ShardSet s;
    if (shard_set_open(&s, set_dir, err, errlen)) return -1;
    int rc = shard_set_verify(&s, splits, stamp_dir, 1, 1, res, err, errlen);
    shard_set_close(&s);
    return rc;
}

// Bug 1: the payload and id range are verified when a set is opened for use, naming shard and offset; the run
// directory's stamp spares a resume the second reading while, and only while, the files are unchanged.
static void test_verification(void) {
    Manifest a;
    standard_set("ver", 0, &a);
    char err[4096], run[1200], path[1400];
    snprintf(run, sizeof(run), "%s/verrun", dir);
    mkdir(run, 0755);
    ShardVerifyResult r;
    // Files changed within 2 s of a verification are not stamped (their times may not show a change in the same
    // clock tick): verified now, they are read again next time.
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0 && !r.from_stamp &&
          r.n_shards == 4, "a sound set verifies: %s", err);
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0 && !r.from_stamp,
          "just written: read again (racily clean)");
    nanosleep(&(struct timespec){2, 100000000}, NULL);
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0 && !r.from_stamp,
          "verified 2 s after it was written: stamped");
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0 && r.from_stamp,
          "then its stamp spares the second reading");
    CHECK(verify(a.dir, run, SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0 && r.from_stamp && r.n_shards == 1,
          "one split of what was verified (eval) is covered by the stamp");
    CHECK(verify(a.dir, NULL, SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0 && !r.from_stamp, "no stamp: read");
    // A shard touched (mtime and ctime change) is read again.
    manifest_shard_path(&a, &a.shards[2], path, sizeof(path));
    CHECK(test_run("touch -m -d '2001-01-01' %s", path) == 0, "touch");
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0 && !r.from_stamp,
          "a touched shard is verified again");
    // A damaged stamp is not trusted.
    char stamp[1400];
    snprintf(stamp, sizeof(stamp), "%s/" SHARD_VERIFIED_STAMP, run);
    CHECK(test_run("sed -i 's/^set = ./set = 0/' %s", stamp) == 0, "edit the stamp");
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN, &r, err, sizeof(err)) == 0 && !r.from_stamp, "an edited stamp is ignored");
    // An id outside the vocabulary under valid checksums: refused with the shard, token and byte offset.
    craft_token(&a, 1, 17, 261);
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN, &r, err, sizeof(err)) == 1 && strstr(err, "train-00001.bin") &&
          strstr(err, "token 17 (byte offset 106) is id 261, outside the vocabulary of 261"), "id 261: %s", err);
    // A changed payload byte: refused with the shard and the byte range.
    craft_token(&a, 1, 17, 3);
    manifest_shard_path(&a, &a.shards[2], path, sizeof(path));
    CHECK(test_run("printf '\\001' | dd of=%s bs=1 seek=500 conv=notrunc 2>/dev/null", path) == 0, "dd");
    CHECK(verify(a.dir, run, SHARD_VERIFY_TRAIN, &r, err, sizeof(err)) == 1 && strstr(err, "train-00002.bin") &&
          strstr(err, "fails its checksum"), "payload byte: %s", err);
    CHECK(verify(a.dir, run, SHARD_VERIFY_VALID, &r, err, sizeof(err)) == 0, "the valid split alone is sound");
    manifest_free(&a);
}

// Bug 1, defence in depth: a file changed after verification (the mapping shows it) stops the read with the shard
// and offset before the id reaches a model (the CUDA embedding would index with it unchecked).
static void test_stream_guard(void) {
    Manifest a;
    standard_set("guard", 0, &a);
    char err[4096], path[1400];
    ShardSet s;
    CHECK(shard_set_open(&s, a.dir, err, sizeof(err)) == 0, "%s", err);
    manifest_shard_path(&a, &a.shards[1], path, sizeof(path));
    int fds[2];
    CHECK(pipe(fds) == 0, "pipe");
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        FILE *f = fopen(path, "r+b");
        uint16_t bad = 999;
        fseek(f, SHARD_HEADER_BYTES + 2 * 40, SEEK_SET);
        fwrite(&bad, 2, 1, f);
        fclose(f);
        int out[64];
        shard_stream_read(&s.train, 1000 + 20, 64, out);  // stream position 1000 = shard 1's token 0
        _exit(0);
    }
    close(fds[1]);
    char msg[2048] = {0};
    size_t got = 0;
    ssize_t n;
    while (got < sizeof(msg) - 1 && (n = read(fds[0], msg + got, sizeof(msg) - 1 - got)) > 0) got += (size_t)n;
    close(fds[0]);
    int rc = test_wait(pid);
    CHECK(rc == 1 && strstr(msg, "train-00001.bin") && strstr(msg, "token 40 (byte offset 152) is id 999"),
          "changed after verification: exit %d, %s", rc, msg);
    shard_set_close(&s);
    manifest_free(&a);
}

// Bug 10: a FIFO or a device where a shard, manifest or vocab.txt should be is refused at once (it hung).
static void test_not_regular(void) {
    alarm(60);  // a hang fails the test instead of blocking CI
    char fifo[1200], err[4096];
    snprintf(fifo, sizeof(fifo), "%s/fifo.bin", dir);
    CHECK(mkfifo(fifo, 0644) == 0, "mkfifo: %s", strerror(errno));
    Shard s;
    CHECK(shard_open(&s, fifo, NULL, 0, err, sizeof(err)) != 0 && strstr(err, "FIFO"), "FIFO shard: %s", err);
    WordPiece *wp = wp_load(fifo, 1, err, sizeof(err));
    CHECK(!wp && strstr(err, "FIFO"), "FIFO vocab.txt: %s", err);
    wp = wp_load("/dev/zero", 1, err, sizeof(err));
    CHECK(!wp && strstr(err, "character device"), "/dev/zero as vocab.txt: %s", err);
    char big[1200];
    snprintf(big, sizeof(big), "%s/huge-vocab.txt", dir);
    CHECK(test_run("truncate -s 300M %s", big) == 0, "truncate");
    wp = wp_load(big, 1, err, sizeof(err));
    CHECK(!wp && strstr(err, "more than"), "a 300 MB vocab.txt is refused without reading it: %s", err);
    unlink(big);
    char mdir[1200], mpath[1300];
    snprintf(mdir, sizeof(mdir), "%s/fifoset", dir);
    mkdir(mdir, 0755);
    snprintf(mpath, sizeof(mpath), "%s/" SHARD_MANIFEST, mdir);
    CHECK(mkfifo(mpath, 0644) == 0, "mkfifo");
    Manifest m;
    CHECK(manifest_read(&m, mdir, err, sizeof(err)) != 0 && strstr(err, "FIFO"), "FIFO manifest: %s", err);
    alarm(0);
}

int main(void) {
    // tmpfs where there is one: the writers fsync every shard and manifest, which costs seconds on a busy disk.
    snprintf(dir, sizeof(dir), "%s/mlm_test_shards_%d", access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (int)getpid());
    mkdir(dir, 0755);
    test_round_trip_and_damage();
    test_streams();
    test_manifest_every_byte();
    test_special_ids();
    test_identity();
    test_version1();
    test_mismatch_messages();
    test_verification();
    test_stream_guard();
    test_not_regular();
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    test_run("%s", cmd);
    return test_finish("test_shards");
}
