// shards.h: binary token shards and the manifest of a prepared shard set (written by `mlm prepare`, read by
// `mlm train` through data.path).
//
// A shard file (little-endian, as every machine mlm builds for):
//   header, 72 bytes:
//     0  char[8]  magic "MLMSHARD"
//     8  u32      format version (SHARD_VERSION)
//     12 u32      token width in bytes: 2 (vocabularies of up to 65,536 ids) or 4
//     16 u64      n_tokens
//     24 u64      n_docs: document segments in this shard
//     32 u32      vocab_size (every token id is below it)
//     36 u32      flags: SHARD_FLAG_CONTINUES = the first segment continues the previous shard's last document
//     40 u8[16]   md5 of the vocabulary (manifest's vocab_md5)
//     56 u64      FNV-1a 64 of the payload (tokens, padding and document offsets)
//     64 u64      FNV-1a 64 of header bytes [0, 64)
//   tokens: n_tokens ids of the token width;
//   zero padding to a multiple of 8 bytes;
//   document offsets: u64[n_docs + 1], segment d spans tokens [off[d], off[d + 1]); off[0] = 0, off[n_docs] = n_tokens.
// The file size is exactly what the header describes. Shards are written as NAME.part, fsync'ed, then renamed,
// so a shard under its final name is always complete; the manifest is written the same way and last, so a set
// without manifest.txt is an interrupted prepare and is refused.
//
// The manifest (DIR/manifest.txt) is `key = value` lines; `shard = SPLIT FILE TOKENS DOCS` once per shard, in
// order (SPLIT is train or valid). Keys: format, version, tokenizer (char|byte|wordpiece), vocab (vocab.txt in
// the set for wordpiece; the code points for char; "bytes" for byte), vocab_md5, vocab_size, lowercase,
// documents (file|blank), token_bytes, seed, valid_fraction, pad_id, mask_id, unk_id, cls_id, sep_id (-1 when
// absent), train_docs, valid_docs, train_tokens, valid_tokens, source_bytes.
#ifndef MLM_SHARDS_H
#define MLM_SHARDS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "mlm/data.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SHARD_MAGIC "MLMSHARD"
#define SHARD_VERSION 1
#define SHARD_HEADER_BYTES 72
#define SHARD_FLAG_CONTINUES 1u
#define SHARD_MANIFEST "manifest.txt"
#define SHARD_MAX_FILES 100000

typedef struct {
    uint32_t version, token_bytes;
    uint64_t n_tokens, n_docs;
    uint32_t vocab_size, flags;
    uint8_t vocab_md5[16];
    uint64_t payload_hash, header_hash;
} ShardHeader;

uint64_t shard_fnv1a(uint64_t h, const void *data, size_t n);
#define SHARD_FNV_INIT 0xcbf29ce484222325ull

// ---- Writing one shard: open, append tokens and document starts, close (atomic).
typedef struct {
    FILE *f;
    char path[1100], tmp[1200];
    ShardHeader h;
    FILE *docs;          // the segments' start offsets, spooled to NAME.part.docs (memory stays flat)
    char docs_tmp[1220];
} ShardWriter;

int shard_writer_open(ShardWriter *w, const char *path, uint32_t token_bytes, uint32_t vocab_size,
                      const uint8_t vocab_md5[16], int continues, char *err, size_t errlen);
// Start a new document segment at the current token position.
void shard_writer_begin_doc(ShardWriter *w);
// Append n ids (each < vocab_size; checked). Returns 0, or 1 with a message.
int shard_writer_append(ShardWriter *w, const int32_t *ids, size_t n, char *err, size_t errlen);
// Write the offsets and the header, fsync, rename into place. Returns 0, or 1 with a message (tmp removed).
int shard_writer_close(ShardWriter *w, char *err, size_t errlen);
// Drop an unfinished shard (its .part file is deleted).
void shard_writer_abort(ShardWriter *w);

// ---- Reading one shard: memory-mapped, every field validated.
typedef struct {
    char path[1100];
    ShardHeader h;
    const uint8_t *map;    // [map_len] the whole file, read-only
    size_t map_len;
    const uint8_t *tokens; // [n_tokens * token_bytes]
    const uint64_t *doc_off;  // [n_docs + 1]
} Shard;

// Map and validate `path`: magic, version, width, header checksum, size, offsets (0, increasing, ending at
// n_tokens); vocab_md5 (if not NULL) must match. verify_payload != 0 also reads the whole payload to check its
// checksum and that every id is below vocab_size. Returns 0, or 1 with a message saying what is wrong.
int shard_open(Shard *s, const char *path, const uint8_t *vocab_md5, int verify_payload, char *err, size_t errlen);
void shard_close(Shard *s);
static inline uint32_t shard_token(const Shard *s, uint64_t i) {
    if (s->h.token_bytes == 2) {
        uint16_t v;
        __builtin_memcpy(&v, s->tokens + 2 * i, 2);
        return v;
    }
    uint32_t v;
    __builtin_memcpy(&v, s->tokens + 4 * i, 4);
    return v;
}

// ---- The manifest of a shard set.
typedef enum { TOKENIZER_CHAR = 0, TOKENIZER_BYTE = 1, TOKENIZER_WORDPIECE = 2 } TokenizerKind;
const char *tokenizer_name(int kind);

typedef struct {
    char split[8];     // "train" | "valid"
    char file[256];    // relative to the set's directory
    uint64_t n_tokens, n_docs;
} ShardEntry;

typedef struct {
    char dir[1024];
    int tokenizer;           // TokenizerKind
    char vocab[1200];        // wordpiece: the vocab.txt's path (resolved against dir); char: filled into vocab_chars
    char vocab_md5[33];
    uint32_t vocab_size;
    int lowercase;
    int blank_docs;          // documents = blank (else file)
    uint32_t token_bytes;
    uint64_t seed;
    double valid_fraction;
    int pad_id, mask_id, unk_id, cls_id, sep_id;
    uint64_t train_docs, valid_docs, train_tokens, valid_tokens, source_bytes;
    int n_shards;
    ShardEntry *shards;      // [n_shards]
    char *char_codepoints;   // char: the code points as vocab_codepoints_text writes them (malloc'ed)
} Manifest;

// Write DIR/manifest.txt atomically. Returns 0, or 1 with a message.
int manifest_write(const Manifest *m, char *err, size_t errlen);
// Read DIR/manifest.txt (dir = the set's directory, or the manifest file itself). Returns 0, or 1 with a
// message ("file:line: what" for a malformed line).
int manifest_read(Manifest *m, const char *dir_or_file, char *err, size_t errlen);
void manifest_free(Manifest *m);
// 1 if `path` names a shard set (a directory holding manifest.txt, or a manifest.txt file).
int shards_is_set(const char *path);

// ---- A split of a shard set as one token stream (train or valid shards concatenated), memory-mapped.
typedef struct ShardStream {
    int n;
    Shard *shards;        // [n]
    uint64_t *start;      // [n + 1] stream position of each shard's first token
    uint64_t n_tokens;
    uint64_t n_docs;      // document segments
} ShardStream;

// Open every shard of `split` listed in the manifest, validated against its entry and the vocab checksum.
int shard_stream_open(ShardStream *st, const Manifest *m, const char *split, int verify_payload, char *err,
                      size_t errlen);
void shard_stream_close(ShardStream *st);
// Copy tokens [pos, pos + n) of the stream into out (across shard boundaries).
void shard_stream_read(const ShardStream *st, uint64_t pos, size_t n, int *out);
// Stream position of the start of document segment d (0 <= d <= n_docs; n_docs gives n_tokens).
uint64_t shard_stream_doc_start(const ShardStream *st, uint64_t d);

// The packed stream: the split's document segments, each followed by one sep_id, as one stream. Copies its
// positions [q, q + n) into out.
void shard_stream_packed_read(const ShardStream *st, uint64_t q, size_t n, int sep_id, int *out);
// Length of the packed stream: n_tokens + n_docs (documents continued across shards count once per segment).
static inline uint64_t shard_stream_packed_len(const ShardStream *st) { return st->n_tokens + st->n_docs; }

// ---- A prepared shard set opened for training (data.path naming it): manifest, vocabulary, both splits.
typedef struct ShardSet {
    Manifest m;
    ShardStream train, valid;
    struct WordPiece *wp;   // wordpiece: the set's vocab.txt, to show tokens as text (NULL otherwise)
    char md5[33];           // md5 of manifest.txt: the identity of the set in checkpoints
} ShardSet;

// Open the set at `path` (its directory or manifest.txt). Returns 0, or 1 with a message.
int shard_set_open(ShardSet *s, const char *path, char *err, size_t errlen);
void shard_set_close(ShardSet *s);

// `mlm prepare` (src/host/commands/prepare.c): argv[0] is "prepare"; returns the exit status.
int prepare_main(int argc, char **argv);

// The Vocab (data.h) a shard set describes: specials from the manifest, kind and checksum filled in.
int manifest_vocab(const Manifest *m, Vocab *v, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
