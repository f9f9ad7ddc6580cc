// fuzz_shard_set.c: libFuzzer harness for a shard set read as training reads it: shard_set_open (manifest,
// vocab.txt, every shard's header and offsets), shard_set_verify (every payload), then an epoch of random and of
// packed batches through the stream batcher. A sound WordPiece set (three shards, vocab.txt, manifest) is made once;
// each input is a list of edits applied to a copy of its files: 4 bytes each, [file and kind] [offset, 2 bytes]
// [value]: kinds xor a byte, truncate, append a byte, copy another file of the set over this one. Property: the
// set is accepted exactly when no byte of it changed (every byte is covered by a checksum: the manifest's, the
// shard headers', the payloads', vocab.txt's md5), and then every batch holds the original tokens.
#include "fuzz_util.h"

#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/shards.h"

enum { N_FILES = 5 };
static const char *const NAMES[N_FILES] = {"manifest.txt", "shards-f/vocab.txt", "shards-f/train-00000.bin",
                                           "shards-f/train-00001.bin", "shards-f/valid-00000.bin"};
static char *orig[N_FILES];
static size_t orig_len[N_FILES];
static char base[200];
static int ref_tokens[2][2][4096];  // [packed][epoch][B * T] the first batch of each epoch, as made from the sound set

static void write_file(const char *dir, int f, const char *data, size_t len) {
    char path[400];
    snprintf(path, sizeof(path), "%s/%s", dir, NAMES[f]);
    FILE *out = fopen(path, "wb");
    if (!out || (len && fwrite(data, 1, len, out) != len) || fclose(out) != 0) fuzz_fail("cannot write %s", path);
}

static void write_shard(const Manifest *m, ShardEntry *e, const char *split, const char *name, const int32_t *ids,
                        size_t n, const uint8_t md5[16]) {
    char path[400], err[512];
    snprintf(path, sizeof(path), "%s/shards-f/%s", m->dir, name);
    ShardWriter w;
    if (shard_writer_open(&w, path, 2, m->vocab_size, md5, 0, err, sizeof(err))) fuzz_fail("%s", err);
    for (size_t i = 0; i < n; i += 7) {  // documents of 7 tokens
        shard_writer_begin_doc(&w);
        if (shard_writer_append(&w, ids + i, MLM_MIN((size_t)7, n - i), err, sizeof(err))) fuzz_fail("%s", err);
    }
    if (shard_writer_close(&w, err, sizeof(err))) fuzz_fail("%s", err);
    memset(e, 0, sizeof(*e));
    snprintf(e->split, sizeof(e->split), "%s", split);
    snprintf(e->file, sizeof(e->file), "%s", name);
    e->n_tokens = w.h.n_tokens;
    e->n_docs = w.h.n_docs;
    e->payload_hash = w.h.payload_hash;
}

static int first_batches(const char *dir, int out[2][2][4096]);

// The sound set, made once: its files kept in memory.
static void make_base(void) {
    snprintf(base, sizeof(base), "%s/base", fuzz_scratch_dir());
    char sub[300];
    snprintf(sub, sizeof(sub), "%s/shards-f", base);
    mkdir(base, 0755);
    mkdir(sub, 0755);
    static const char vocab[] = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nof\nand\nto\n##s\nking\nlord\n";
    write_file(base, 1, vocab, strlen(vocab));
    Manifest m;
    memset(&m, 0, sizeof(m));
    snprintf(m.dir, sizeof(m.dir), "%s", base);
    m.version = MANIFEST_VERSION;
    m.tokenizer = TOKENIZER_WORDPIECE;
    m.lowercase = 1;
    m.blank_docs = 1;
    snprintf(m.vocab, sizeof(m.vocab), "shards-f/vocab.txt");
    snprintf(m.shard_dir, sizeof(m.shard_dir), "shards-f");
    data_md5(vocab, strlen(vocab), m.vocab_md5);
    uint8_t md5[16];
    for (int i = 0; i < 16; i++) {
        unsigned v;
        sscanf(m.vocab_md5 + 2 * i, "%2x", &v);
        md5[i] = (uint8_t)v;
    }
    m.vocab_size = 12; m.token_bytes = 2; m.pad_id = 0; m.mask_id = 4; m.unk_id = 1; m.cls_id = 2; m.sep_id = 3;
    int32_t ids[300];
    for (int i = 0; i < 300; i++) ids[i] = 5 + (i * 7 + i / 11) % 7;
    m.shards = calloc(3, sizeof(ShardEntry));
    write_shard(&m, &m.shards[0], "train", "train-00000.bin", ids, 120, md5);
    write_shard(&m, &m.shards[1], "train", "train-00001.bin", ids + 120, 100, md5);
    write_shard(&m, &m.shards[2], "valid", "valid-00000.bin", ids + 220, 80, md5);
    m.n_shards = 3;
    m.train_tokens = 220;
    m.valid_tokens = 80;
    m.train_docs = 32;
    m.valid_docs = 12;
    char err[512];
    if (manifest_write(&m, err, sizeof(err))) fuzz_fail("%s", err);
    manifest_free(&m);
    for (int f = 0; f < N_FILES; f++) {
        char path[400];
        snprintf(path, sizeof(path), "%s/%s", base, NAMES[f]);
        orig[f] = mlm_read_file(path, &orig_len[f]);
        if (!orig[f]) fuzz_fail("cannot read %s", path);
    }
    if (first_batches(base, ref_tokens) != 0) fuzz_fail("the sound set is refused");
}

// Open and verify the set at dir as training does, then read an epoch of random and of packed batches (B 4, T 16),
// keeping the first batch of each. 0 if accepted.
static int first_batches(const char *dir, int out[2][2][4096]) {
    ShardSet s;
    char err[4096];
    if (shard_set_open(&s, dir, err, sizeof(err))) return 1;
    ShardVerifyResult r;
    if (shard_set_verify(&s, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, NULL, 0, 1, &r, err, sizeof(err))) {
        shard_set_close(&s);
        return 1;
    }
    int batch[64];
    for (int packed = 0; packed < 2; packed++) {
        Batcher b;
        batcher_init_stream(&b, &s.train, packed, s.m.sep_id, 16, 4, 1, 7, 0);
        for (long epoch = 0; epoch < 2; epoch++) {
            batcher_set_epoch(&b, epoch);
            for (size_t i = 0; i < b.n_batches; i++) {
                int rows = batcher_get(&b, i, batch);
                for (int k = 0; k < rows * 16; k++)
                    if (batch[k] < 0 || (uint32_t)batch[k] >= s.m.vocab_size) fuzz_fail("id %d read from the set", batch[k]);
                if (i == 0) memcpy(out[packed][epoch], batch, (size_t)rows * 16 * sizeof(int));
            }
        }
        batcher_free(&b);
    }
    shard_set_close(&s);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!orig[0]) make_base();
    // One capacity for every file: a copy may make a file as long as the longest, and each edit appends at most
    // one byte, so no file outgrows the longest original plus one byte per edit.
    char *files[N_FILES];
    size_t lens[N_FILES], cap = size / 4;
    for (int f = 0; f < N_FILES; f++) cap = MLM_MAX(cap, orig_len[f] + size / 4);
    for (int f = 0; f < N_FILES; f++) {
        lens[f] = orig_len[f];
        files[f] = malloc(cap + 1);
        memcpy(files[f], orig[f], orig_len[f]);
    }
    for (size_t k = 0; k + 4 <= size; k += 4) {
        int f = data[k] % N_FILES, kind = data[k] / N_FILES % 4;
        size_t at = lens[f] ? ((size_t)data[k + 1] | (size_t)data[k + 2] << 8) % lens[f] : 0;
        if (kind == 0 && lens[f]) files[f][at] ^= (char)data[k + 3];
        else if (kind == 1) lens[f] = at;
        else if (kind == 2 && lens[f] < cap) files[f][lens[f]++] = (char)data[k + 3];
        else if (kind == 3) {
            int g = data[k + 3] % N_FILES;
            if (g != f) {
                memcpy(files[f], files[g], lens[g]);
                lens[f] = lens[g];
            }
        }
    }
    int changed = 0;
    for (int f = 0; f < N_FILES; f++) changed |= lens[f] != orig_len[f] || memcmp(files[f], orig[f], lens[f]) != 0;
    char dir[200], sub[300];
    snprintf(dir, sizeof(dir), "%s/set", fuzz_scratch_dir());
    snprintf(sub, sizeof(sub), "%s/shards-f", dir);
    mkdir(dir, 0755);
    mkdir(sub, 0755);
    for (int f = 0; f < N_FILES; f++) write_file(dir, f, files[f], lens[f]);
    static int got[2][2][4096];
    int refused = first_batches(dir, got);
    if (refused && !changed) fuzz_fail("the unchanged set was refused");
    if (!refused && changed) fuzz_fail("a set with changed bytes was accepted");
    if (!refused && memcmp(got, ref_tokens, sizeof(got))) fuzz_fail("the batches differ from the sound set's");
    for (int f = 0; f < N_FILES; f++) free(files[f]);
    return 0;
}
