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
// The manifest (DIR/manifest.txt, version MANIFEST_VERSION) is `key = value` lines; `shard = SPLIT FILE TOKENS DOCS
// HASH` once per shard, in order (SPLIT is train or valid, HASH the shard's payload FNV-1a 64 in 16 hex digits, so
// the manifest, and the set identity checkpoints record (its md5), covers every shard's contents). Keys: format,
// version, tokenizer (char|byte|wordpiece), vocab (vocab.txt in the set for wordpiece, relative to DIR; the code
// points for char; "bytes" for byte), vocab_md5, vocab_size, lowercase, documents (file|blank), token_bytes, seed,
// valid_fraction, pad_id, mask_id, unk_id, cls_id, sep_id (-1 when absent), train_docs, valid_docs, train_tokens,
// valid_tokens, source_bytes, invalid_utf8 (bytes of invalid UTF-8 dropped by --invalid-utf8 skip), shard_dir (the
// folder of DIR holding the shards; absent: DIR itself), replaces (optional: the identity of the version-1 manifest
// this set replaced with the very same shards, so that runs checkpointed on that one resume), and last `checksum =
// MD5`, the md5 of every byte before that line. Every special id is checked against the vocabulary (vocab.txt's
// own [PAD]... for wordpiece, the fixed byte vocabulary, the code-point list for char, whose md5 is vocab_md5).
//
// `mlm prepare --out DIR` writes a set as DIR/manifest.txt and DIR/shards-<12 hex>/ (shards and vocab.txt, named
// after the set's contents) and touches nothing else in DIR: it locks DIR (DIR/lock, as `train` locks a run
// directory), writes the new set into DIR/.prepare.part/, renames that folder into place, and only then replaces
// the manifest (the commit) and removes the files of the set it replaced.
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
#define MANIFEST_VERSION 2
#define SHARD_HEADER_BYTES 72
#define SHARD_FLAG_CONTINUES 1u
#define SHARD_MANIFEST "manifest.txt"
#define SHARD_MAX_FILES 100000
#define SHARD_STAGING ".prepare.part"    // where `mlm prepare` writes a set before it is complete
#define SHARD_VERIFIED_STAMP "data-verified.txt"  // in a run directory: the set verified for this run
#define MANIFEST_MAX_BYTES ((uint64_t)64 << 20)
// The byte tokenizer's vocabulary as text; its md5 is a byte set's vocab_md5.
#define BYTE_VOCAB_TEXT "mlm byte vocabulary 1: ids 0..255 = byte values, 256..260 = [PAD] [UNK] [CLS] [SEP] [MASK]"

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
    uint64_t dev, ino, size, mtime_ns, ctime_ns;  // the file as opened (the verification stamp's key)
    const uint8_t *map;    // [map_len] the whole file, read-only
    size_t map_len;
    const uint8_t *tokens; // [n_tokens * token_bytes]
    const uint64_t *doc_off;  // [n_docs + 1]
} Shard;

// Map and validate `path` (a regular file): magic, version, width, header checksum, size, offsets (0, increasing,
// ending at n_tokens); vocab_md5 (if not NULL) must match. verify_payload != 0 also reads the whole payload to
// check its checksum and that every id is below vocab_size (shard_verify). Returns 0, or 1 with a message naming
// the file and the byte offset of what is wrong.
int shard_open(Shard *s, const char *path, const uint8_t *vocab_md5, int verify_payload, char *err, size_t errlen);
// Read the whole payload once: its FNV-1a 64 against the header's, every token id below vocab_size. *done
// (if not NULL) is advanced as bytes are read (progress). Returns 0, or 1 with a message naming the file and offset.
int shard_verify(const Shard *s, uint64_t *done, char *err, size_t errlen);
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
    char file[256];    // relative to the set's shard folder
    uint64_t n_tokens, n_docs;
    uint64_t payload_hash;  // the shard header's payload FNV-1a 64
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
    uint64_t invalid_utf8;   // bytes of invalid UTF-8 prepare dropped (--invalid-utf8 skip)
    char shard_dir[64];      // the folder of dir holding the shards ("" = dir itself)
    char replaces[33];       // "" or the md5 of the version-1 manifest whose shards these are, byte for byte
    int version;             // MANIFEST_VERSION (manifest_read refuses others)
    char md5[33];            // md5 of the manifest file as read (the set's identity)
    int n_shards;
    ShardEntry *shards;      // [n_shards]
    char *char_codepoints;   // char: the code points as vocab_codepoints_text writes them (malloc'ed)
} Manifest;

// Write DIR/manifest.txt atomically, its checksum line last. Returns 0, or 1 with a message.
int manifest_write(const Manifest *m, char *err, size_t errlen);
// Read DIR/manifest.txt (dir = the set's directory, or the manifest file itself; a regular file of at most
// MANIFEST_MAX_BYTES): its checksum first, then every line. A version-1 manifest (no checksum, no shard hashes) is
// refused with the `mlm prepare` command that makes the set again. Returns 0, or 1 with a message ("file:line:
// what" for a malformed line).
int manifest_read(Manifest *m, const char *dir_or_file, char *err, size_t errlen);
// The version-1 manifest at dir_or_file, read for `mlm prepare --force` to replace it (no checksum to check).
int manifest_read_v1(Manifest *m, const char *dir_or_file, char *err, size_t errlen);
void manifest_free(Manifest *m);
// Path of shard entry e of m (dir/shard_dir/file) into out.
void manifest_shard_path(const Manifest *m, const ShardEntry *e, char *out, size_t outlen);
// 1 if `path` names a shard set (a directory holding manifest.txt, or a manifest.txt file).
int shards_is_set(const char *path);
// 1 if the directory holds what an interrupted `mlm prepare` leaves (its staging folder, or shards without a
// manifest), so that a reader can say so instead of taking the folder for a text.
int shards_interrupted(const char *dir);

// ---- A split of a shard set as one token stream (train or valid shards concatenated), memory-mapped.
typedef struct ShardStream {
    int n;
    Shard *shards;        // [n]
    uint64_t *start;      // [n + 1] stream position of each shard's first token
    uint64_t n_tokens;
    uint64_t n_docs;      // document segments
} ShardStream;

// Open every shard of `split` listed in the manifest, validated against its entry (counts, payload hash, token
// width, vocabulary size) and the vocab checksum.
int shard_stream_open(ShardStream *st, const Manifest *m, const char *split, int verify_payload, char *err,
                      size_t errlen);
void shard_stream_close(ShardStream *st);
// Copy tokens [pos, pos + n) of the stream into out (across shard boundaries). An id outside the vocabulary
// (possible only if a file changed after it was verified: the mapping shows later writes) stops the program
// with the shard, its token index and byte offset, before the id can reach a model.
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
    char md5[33];           // md5 of manifest.txt: the identity of the set in checkpoints (it covers every
                            // shard's payload hash, so the identity is the contents)
} ShardSet;

// Open the set at `path` (its directory or manifest.txt): the manifest (checksum, special ids against the
// vocabulary), every shard's header, size and offsets against its entry, the vocabulary file. The payloads are
// read by shard_set_verify. Returns 0, or 1 with a message.
int shard_set_open(ShardSet *s, const char *path, char *err, size_t errlen);
void shard_set_close(ShardSet *s);

// What shard_set_verify did.
typedef struct {
    int n_shards;          // shards of the splits asked for
    uint64_t bytes;        // their payload bytes
    int from_stamp;        // 1: unchanged since this run verified them (nothing read)
    double seconds;
} ShardVerifyResult;
enum { SHARD_VERIFY_TRAIN = 1, SHARD_VERIFY_VALID = 2 };
// Verify the payload (checksum and token ids) of every shard of the splits in `splits` (SHARD_VERIFY_* bits), on
// every core, printing progress to stderr for sets of over a few hundred MB unless quiet. stamp_dir (may be NULL):
// a run directory whose SHARD_VERIFIED_STAMP names this set and each shard's device, inode, size and times as
// verified before; when they all match nothing is read. write_stamp: (re)write that stamp after a verification
// (only the holder of the run directory's lock). Returns 0, or 1 with a message naming the shard and offset.
int shard_set_verify(ShardSet *s, int splits, const char *stamp_dir, int write_stamp, int quiet, ShardVerifyResult *res,
                     char *err, size_t errlen);
// 1 if a checkpoint recording set identity `md5` trained on this set: its identity, or the version-1 identity it
// replaced with the same shards (Manifest.replaces).
int shard_set_identity_matches(const ShardSet *s, const char *md5);

// `mlm prepare` (src/host/commands/prepare.c): argv[0] is "prepare"; returns the exit status.
int prepare_main(int argc, char **argv);

// The Vocab (data.h) a shard set describes: specials from the manifest, kind and checksum filled in.
int manifest_vocab(const Manifest *m, Vocab *v, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif
#endif
