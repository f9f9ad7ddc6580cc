// data.h: corpus lookup and verification, the character tokenizer, the train/valid split and the batcher.
#ifndef MLM_DATA_H
#define MLM_DATA_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/rng.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CORPUS_FILE "tinyshakespeare.txt"
#define CORPUS_MD5 "6fb458f1232090904fb40fe944165e91"
#define CORPUS_URL "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
#define VOCAB_MAX_CHARS 4096

// The reference's sample prompts (the opening of the corpus), shown masked and predicted before every epoch. A run
// holds batches of MLM_MAX(batch_size, N_PROMPTS) sequences so that they fit in one.
#define N_PROMPTS 10
extern const char *const SAMPLE_PROMPTS[N_PROMPTS];

// Find the corpus: `explicit_path` if given (used as is, any UTF-8 text), else data/tinyshakespeare.txt,
// else $MLM_DATA_MIRROR/tinyshakespeare.txt, else download into data/. Files that were mirrored or
// downloaded are verified against CORPUS_MD5. Writes the chosen path into out; exits with a message that
// says what to do when nothing works.
void data_locate_corpus(const char *explicit_path, char *out, size_t outlen);
// md5 of a file as 32 lowercase hex digits; returns nonzero if unreadable.
int data_md5_file(const char *path, char out[33]);
void data_md5(const void *data, size_t len, char out[33]);

// Character vocabulary: sorted unique code points of the corpus; ids [0, n_chars), then PAD, MASK.
typedef struct {
    int n_chars;
    uint32_t chars[VOCAB_MAX_CHARS];  // code point of each id, ascending
    int pad_id, mask_id, n_tokens;
    // A prepared shard set's byte or WordPiece vocabulary (kind != VOCAB_KIND_CHAR): chars[] is unused, n_chars
    // is the id range random replacement draws from (256 bytes; the whole WordPiece vocabulary, as Hugging
    // Face's collator), the specials are the vocabulary's own, md5 identifies it.
    int kind;                    // VOCAB_KIND_CHAR (0, the reference) | VOCAB_KIND_BYTE | VOCAB_KIND_WORDPIECE
    int unk_id, cls_id, sep_id;  // -1 when absent (char)
    char md5[33];                // "" for char
} Vocab;
enum { VOCAB_KIND_CHAR = 0, VOCAB_KIND_BYTE = 1, VOCAB_KIND_WORDPIECE = 2 };
// Well-formedness of a Vocab (checkpoints): char: 1..VOCAB_MAX_CHARS ascending code points, PAD and MASK after
// them; byte/wordpiece: specials inside [0, n_tokens), distinct, md5 of 32 hex digits. 0, or 1 with a message.
int vocab_check(const Vocab *v, char *err, size_t errlen);

// One character of s[0, n) (n >= 1): returns the bytes it takes (>= 1) and its code point in *cp, or UTF8_INVALID
// with 1 byte for an invalid sequence (a stray or truncated one, an overlong form, a surrogate, over U+10FFFF).
// The one definition of valid UTF-8 in mlm: every tokenizer drops or refuses exactly these bytes.
#define UTF8_INVALID 0xFFFFFFFFu
size_t utf8_next(const unsigned char *s, size_t n, uint32_t *cp);
// Decode UTF-8 text into code points (malloc'ed). Returns -1 with a message in err for invalid UTF-8.
long utf8_decode(const char *text, size_t len, uint32_t **out, char *err, size_t errlen);
// Encode one code point as UTF-8 into buf (>= 5 bytes), NUL-terminated; returns the byte count.
int utf8_encode(uint32_t cp, char *buf);

int vocab_build(Vocab *v, const uint32_t *cps, size_t n, char *err, size_t errlen);
int vocab_id(const Vocab *v, uint32_t cp);  // -1 if absent
// Encode code points to ids, dropping characters outside the vocabulary; returns the count written.
size_t vocab_encode(const Vocab *v, const uint32_t *cps, size_t n, int *ids);
// The printable text of an id ("[PAD]" / "[MASK]" for the specials) into buf (>= 8 bytes).
const char *vocab_token_text(const Vocab *v, int id, char *buf);
// The characters as decimal code points, comma-separated (malloc'ed): the exact form checkpoints and exports
// store (exact for any character, NUL included). vocab_from_codepoints parses it back (strictly increasing,
// 1..VOCAB_MAX_CHARS code points) and sets the special ids; returns 0, or 1 on malformed text.
// A byte or WordPiece vocabulary is written "KIND:N_TOKENS:PAD,MASK,UNK,CLS,SEP:MD5" (e.g.
// "wordpiece:30522:0,103,100,101,102:<md5 of vocab.txt>"), and parsed back the same way.
char *vocab_codepoints_text(const Vocab *v);
int vocab_from_codepoints(const char *s, Vocab *v);

// The corpus, tokenized and split as the reference does: train = first floor(split * N) characters.
typedef struct {
    char path[1024];
    size_t n_chars_total;   // N code points
    Vocab vocab;
    int *train; size_t n_train;  // token ids
    int *valid; size_t n_valid;
    struct ShardSet *shards;     // data.path named a prepared shard set (train/valid NULL; see corpus_load_shards)
} Corpus;

// data.path naming a shard set written by `mlm prepare`: its manifest and vocabulary, the splits memory-mapped
// (n_train/n_valid = the splits' token counts). Exits with a clear message when the set is incomplete, corrupt or
// too short (each split needs seq_len + 2 tokens). corpus_free releases it.
void corpus_load_shards(Corpus *c, const char *path, int seq_len);
// Read every byte of the shard set once (checksums and token ids, on every core) unless run_dir's stamp says this
// run verified these very files before; write_stamp: record the result there (the holder of run_dir's lock).
// Prints one line on stdout unless quiet; exits naming the shard and offset when the set is damaged. No-op for a
// text corpus (it is read whole and decoded, so every id is in range by construction).
void corpus_verify_shards(Corpus *c, const char *run_dir, int write_stamp, int quiet);

// Load, decode, build the vocabulary (over train + valid, i.e. all text) and split. Exits with a clear
// message for a missing, unreadable, empty, non-UTF-8 or too-short corpus (needs > seq_len + 1 tokens in
// each split).
void corpus_load(Corpus *c, const char *path, double train_split, int seq_len);
void corpus_free(Corpus *c);

// Sequence sampling of the reference: item i starts at i*T + r with r uniform in
// [0, min(T-1, N - (i*T + T + 1))]; (N - 1) / T items; shuffled without replacement every epoch; the last
// partial batch is kept. Randomness from the DATA Philox stream, indexed by epoch, so any epoch's order and
// offsets can be regenerated.
struct ShardStream;
typedef struct {
    const int *tokens;    // [N] (borrowed), or NULL when reading a shard stream
    const struct ShardStream *shards;  // memory-mapped shards (borrowed), or NULL
    int packed;           // stream only: documents each followed by sep_id, consecutive sequences, no offsets
    int sep_id;
    uint64_t key;         // stream only: seeds the per-epoch permutation and offsets, computed per item
    size_t n_tokens;
    int seq_len, batch_size;
    size_t n_items;       // (N - 1) / T
    size_t n_batches;     // ceil(n_items / batch_size)
    int shuffle;          // train: 1, valid: 0 (valid still draws random offsets)
    Rng rng;
    uint64_t stream;      // distinguishes train and valid batchers in the DATA stream
    long epoch;           // epoch whose order is loaded
    size_t *order;        // [n_items] item index per position in the epoch
    int *offsets;         // [n_items] random offset r of each item this epoch
} Batcher;

void batcher_init(Batcher *b, const int *tokens, size_t n_tokens, int seq_len, int batch_size, int shuffle,
                  uint64_t seed, uint64_t stream);
// The same sampling over a split of a shard set (n_tokens = the stream's tokens): (N - 1) / T items, item i at
// i*T + r, r uniform in the same range, shuffled without replacement every epoch; but the order and offsets are
// computed per item (a keyed Feistel permutation with cycle-walking, a hashed offset), deterministic in (seed,
// stream, epoch), so that memory does not grow with the corpus (order and offsets arrays are not allocated).
// packed != 0: the documents, each followed by sep_id, cut into consecutive sequences of seq_len (offset 0).
void batcher_init_stream(Batcher *b, const struct ShardStream *st, int packed, int sep_id, int seq_len,
                         int batch_size, int shuffle, uint64_t seed, uint64_t stream);
void batcher_free(Batcher *b);
// Prepare epoch `epoch` (order and offsets). Deterministic in (seed, stream, epoch).
void batcher_set_epoch(Batcher *b, long epoch);
// Copy batch `index` of the current epoch into out[B, T] (row per sequence); returns its batch size
// (batch_size, or less for the last batch).
int batcher_get(const Batcher *b, size_t index, int *out);
// Start position in the token array of the item at `pos` of the current epoch.
size_t batcher_item_start(const Batcher *b, size_t pos);

#ifdef __cplusplus
}
#endif

#endif
