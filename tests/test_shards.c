// test_shards.c: the shard format and the shard-set stream: a write/read round trip at both token widths, the
// reader refusing every kind of damage (magic, header checksum, version, truncation, vocabulary checksum, payload,
// an unfinished .part), the manifest round trip and its errors, the batcher over shards sampling as the reference
// does (a permutation per epoch, offsets in range, rows equal to the tokens), and the packed stream
// against a direct construction.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/shards.h"
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

// A set of three train shards of a char vocabulary, written through the manifest.
static void make_set(const int32_t *ids, size_t n, const size_t *doc_starts, int n_docs, Manifest *m) {
    memset(m, 0, sizeof(*m));
    snprintf(m->dir, sizeof(m->dir), "%s/set", dir);
    mkdir(m->dir, 0755);
    m->tokenizer = TOKENIZER_BYTE;
    m->vocab_size = 261;
    m->token_bytes = 2;
    snprintf(m->vocab_md5, sizeof(m->vocab_md5), "00112233445566778899aabbccddeeff");
    snprintf(m->vocab, sizeof(m->vocab), "bytes");
    m->char_codepoints = mlm_strdup("bytes");
    m->pad_id = 256; m->mask_id = 260; m->unk_id = 257; m->cls_id = 258; m->sep_id = 259;
    uint8_t md5[16];
    for (int i = 0; i < 16; i++) md5[i] = (uint8_t)(i * 0x11);
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
    // The manifest names what is wrong.
    char path[1400];
    snprintf(path, sizeof(path), "%s/" SHARD_MANIFEST, w.dir);
    FILE *f = fopen(path, "a");
    fputs("shard = test x.bin 1 1\n", f);
    fclose(f);
    Manifest bad;
    CHECK(manifest_read(&bad, w.dir, err, sizeof(err)) != 0 && strstr(err, "manifest.txt:"), "bad line: %s", err);
    unlink(path);
    CHECK(manifest_read(&bad, w.dir, err, sizeof(err)) != 0 && strstr(err, "interrupted"), "no manifest: %s", err);
    manifest_free(&m);
    manifest_free(&w);
}

int main(void) {
    snprintf(dir, sizeof(dir), "/tmp/mlm_test_shards_%d", (int)getpid());
    mkdir(dir, 0755);
    test_round_trip_and_damage();
    test_streams();
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    test_run("%s", cmd);
    return test_finish("test_shards");
}
