// fuzz_shards.c: libFuzzer harness for the token-shard reader (shard_open with payload verification) and the
// shard-set manifest reader. Properties: an accepted shard's tokens and document offsets lie inside the file (all
// read, so ASan sees any overrun), ids are below the vocabulary size, offsets increase from 0 to n_tokens; writing
// its tokens and documents again with the ShardWriter gives the very same bytes. An accepted manifest written with
// manifest_write reads back to the same fields.
#include "fuzz_util.h"

#include <sys/stat.h>

#include "mlm/common.h"
#include "mlm/shards.h"

static void check_shard(const char *path, const uint8_t *data, size_t size) {
    Shard s;
    char err[2048];
    if (shard_open(&s, path, NULL, 1, err, sizeof(err)) != 0) return;
    const ShardHeader *h = &s.h;
    if (h->n_docs < 1 || s.doc_off[0] != 0 || s.doc_off[h->n_docs] != h->n_tokens) fuzz_fail("offsets not spanning");
    for (uint64_t d = 0; d < h->n_docs; d++)
        if (s.doc_off[d + 1] < s.doc_off[d]) fuzz_fail("offsets decrease at %llu", (unsigned long long)d);
    int32_t *ids = malloc((size_t)h->n_tokens * sizeof(int32_t) + 4);
    for (uint64_t i = 0; i < h->n_tokens; i++) {
        ids[i] = (int32_t)shard_token(&s, i);
        if ((uint32_t)ids[i] >= h->vocab_size) fuzz_fail("id %d >= vocab %u", ids[i], h->vocab_size);
    }
    // Round trip through the writer: the same bytes.
    char out[160];
    snprintf(out, sizeof(out), "%s/roundtrip.bin", fuzz_scratch_dir());
    ShardWriter w;
    if (shard_writer_open(&w, out, h->token_bytes, h->vocab_size, h->vocab_md5, (int)(h->flags & SHARD_FLAG_CONTINUES),
                          err, sizeof(err)))
        fuzz_fail("writer: %s", err);
    w.h.flags = h->flags;
    for (uint64_t d = 0; d < h->n_docs; d++) {
        shard_writer_begin_doc(&w);
        if (shard_writer_append(&w, ids + s.doc_off[d], (size_t)(s.doc_off[d + 1] - s.doc_off[d]), err, sizeof(err)))
            fuzz_fail("append: %s", err);
    }
    if (shard_writer_close(&w, err, sizeof(err))) fuzz_fail("close: %s", err);
    size_t len;
    char *again = mlm_read_file(out, &len);
    if (!again || len != size || memcmp(again, data, size) != 0) fuzz_fail("rewritten shard differs (%zu vs %zu bytes)", len, size);
    free(again);
    free(ids);
    shard_close(&s);
}

static void check_manifest(const uint8_t *data, size_t size) {
    char dir[160], path[200], err[2048];
    snprintf(dir, sizeof(dir), "%s/set", fuzz_scratch_dir());
    mkdir(dir, 0755);
    snprintf(path, sizeof(path), "%s/" SHARD_MANIFEST, dir);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, size, f) != size || fclose(f) != 0) fuzz_fail("cannot write %s", path);
    Manifest m, back;
    if (manifest_read(&m, dir, err, sizeof(err)) != 0) return;
    char dir2[160];
    snprintf(dir2, sizeof(dir2), "%s/set2", fuzz_scratch_dir());
    mkdir(dir2, 0755);
    snprintf(m.dir, sizeof(m.dir), "%s", dir2);
    if (m.tokenizer == TOKENIZER_WORDPIECE) snprintf(m.vocab, sizeof(m.vocab), "vocab.txt");
    if (m.tokenizer == TOKENIZER_BYTE) snprintf(m.vocab, sizeof(m.vocab), "bytes");
    if (manifest_write(&m, err, sizeof(err)) != 0) fuzz_fail("manifest_write: %s", err);
    if (manifest_read(&back, dir2, err, sizeof(err)) != 0) fuzz_fail("rewritten manifest refused: %s", err);
    int same = back.tokenizer == m.tokenizer && back.vocab_size == m.vocab_size && back.token_bytes == m.token_bytes &&
               back.n_shards == m.n_shards && back.pad_id == m.pad_id && back.mask_id == m.mask_id &&
               back.sep_id == m.sep_id && back.seed == m.seed && back.train_tokens == m.train_tokens &&
               !strcmp(back.vocab_md5, m.vocab_md5);
    for (int i = 0; same && i < m.n_shards; i++)
        same = !strcmp(back.shards[i].file, m.shards[i].file) && !strcmp(back.shards[i].split, m.shards[i].split) &&
               back.shards[i].n_tokens == m.shards[i].n_tokens && back.shards[i].n_docs == m.shards[i].n_docs;
    if (!same) fuzz_fail("manifest round trip changed a field");
    manifest_free(&back);
    manifest_free(&m);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size >= 8 && !memcmp(data, SHARD_MAGIC, 8)) check_shard(fuzz_input_file(data, size), data, size);
    else check_manifest(data, size);
    return 0;
}
