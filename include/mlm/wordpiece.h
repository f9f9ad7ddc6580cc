// wordpiece.h: the BERT WordPiece tokenizer (a vocab.txt, Hugging Face BertWordPieceTokenizer's ids) and the
// byte tokenizer (256 byte values, then the specials).
#ifndef MLM_WORDPIECE_H
#define MLM_WORDPIECE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define WP_MAX_INPUT_CHARS_PER_WORD 100  // longer words become [UNK], as in BERT
#define WP_VOCAB_MAX_BYTES ((uint64_t)256 << 20)  // a vocab.txt is at most this big (BERT's: 232 KB)

typedef struct WordPiece WordPiece;

// Load a BERT vocab.txt: one token per line, id = line number (0-based), trailing whitespace and '\r' trimmed.
// Rejects anything but a regular file of at most WP_VOCAB_MAX_BYTES, unreadable files, invalid UTF-8, empty lines,
// duplicate tokens and a vocabulary without [UNK],
// with "file:line: what" in err. lower != 0: lower-case and strip accents (BERT uncased; Hugging Face's
// lowercase=True with strip_accents left unset). Returns NULL on error.
WordPiece *wp_load(const char *path, int lower, char *err, size_t errlen);
// The same from the text of a vocab.txt in memory (len bytes, copied; e.g. the one a checkpoint stores); `name`
// stands for the file in messages.
WordPiece *wp_load_text(const char *text, size_t len, const char *name, int lower, char *err, size_t errlen);
void wp_free(WordPiece *wp);
size_t wp_vocab_size(const WordPiece *wp);
// Id of a token given exactly ("[MASK]", "##ing"), or -1 if absent.
int32_t wp_id(const WordPiece *wp, const char *token);
// Token text of an id (NUL-terminated, owned by wp), or NULL if out of range.
const char *wp_token(const WordPiece *wp, int32_t id);

// Tokenize len bytes of UTF-8 text (no [CLS]/[SEP] added). Writes at most cap ids and returns how many
// the text has (call again with a larger buffer when the result exceeds cap). Invalid UTF-8 bytes are
// dropped like U+FFFD. As in Hugging Face, "[PAD]" "[UNK]" "[CLS]" "[SEP]" "[MASK]" written verbatim in the
// text (case-sensitive, before normalisation) become those specials' ids.
size_t wp_encode(const WordPiece *wp, const char *text, size_t len, int32_t *ids, size_t cap);

// 1 if the basic tokenizer always ends a word at code point cp (whitespace, punctuation, a CJK character: each of
// the last two is a word of its own), whatever surrounds it. `mlm prepare` cuts long runs of text there.
int wp_ends_word(uint32_t cp);

// The basic tokenizer alone (BertNormalizer and BertPreTokenizer as wp_encode applies them; specials written in
// the text are not matched, as in Hugging Face's trainer on a fresh tokenizer): emit(ctx, word, len) for each
// word in order (UTF-8, normalised, not NUL-terminated). lower as in wp_load. Used to count words for training.
void wp_pretokenize(const char *text, size_t len, int lower, void (*emit)(void *ctx, const char *word, size_t len),
                    void *ctx);

// ---- Byte tokenizer: id = byte value for 0..255, then the specials; any input, no unknowns.
enum { BT_PAD = 256, BT_UNK = 257, BT_CLS = 258, BT_SEP = 259, BT_MASK = 260, BT_VOCAB_SIZE = 261 };
// Id of "[PAD]" .. "[MASK]", or -1.
int32_t bt_special_id(const char *token);
// One id per byte; returns len (writes min(len, cap)).
size_t bt_encode(const char *text, size_t len, int32_t *ids, size_t cap);
// Bytes of n ids into out (cap bytes): returns the number of bytes, skipping specials; -1 for an id
// outside [0, BT_VOCAB_SIZE) or an out buffer too small.
long bt_decode(const int32_t *ids, size_t n, char *out, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
