// wordpiece_train.h: training a WordPiece vocabulary from word counts, by the algorithm of Hugging Face
// tokenizers' WordPieceTrainer (its BPE trainer with the "##" continuing-subword prefix), and writing vocab.txt.
#ifndef MLM_WORDPIECE_TRAIN_H
#define MLM_WORDPIECE_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- Word counts: the words of the BERT basic tokenizer (wp_pretokenize) and how often each occurs.
typedef struct WpCounts WpCounts;

WpCounts *wp_counts_new(int lower);  // lower: lower-case and strip accents (BERT uncased)
void wp_counts_free(WpCounts *c);
// Pre-tokenize len bytes of UTF-8 text and count its words. Returns 0, or -1 when out of memory.
int wp_counts_add_text(WpCounts *c, const char *text, size_t len);
// Count one word (already normalised) n more times. Returns 0, or -1 when out of memory.
int wp_counts_add_word(WpCounts *c, const char *word, size_t len, uint64_t n);
// Add every word of src to dst (per-thread counts into one). Returns 0, or -1 when out of memory.
int wp_counts_merge(WpCounts *dst, const WpCounts *src);
size_t wp_counts_unique(const WpCounts *c);  // distinct words
uint64_t wp_counts_total(const WpCounts *c);  // words counted
// Count of one word (0 if never seen).
uint64_t wp_counts_get(const WpCounts *c, const char *word, size_t len);

// ---- Training
typedef struct {
    size_t vocab_size;       // stop merging when the vocabulary has this many tokens
    uint64_t min_frequency;  // a merge needs a pair seen at least this often (BertWordPieceTokenizer: 2)
    size_t limit_alphabet;   // keep the most frequent characters only (0: all; BertWordPieceTokenizer: 1000)
    // Called now and then while merging (may be NULL): merges done so far and the vocabulary size.
    void (*progress)(void *ctx, size_t vocab_now, size_t vocab_target);
    void *progress_ctx;
} WpTrainConfig;

typedef struct {
    char **tokens;       // [n] token strings; id = index
    size_t n;
    size_t n_specials;   // [PAD] [UNK] [CLS] [SEP] [MASK]
    size_t n_alphabet;   // single characters after the specials
    size_t n_merges;     // merges made (a merge may re-create an existing token, so n_merges >= new tokens)
} WpVocabOut;

// The specials first ([PAD] [UNK] [CLS] [SEP] [MASK]), then the alphabet (sorted by code point), then each
// character's "##" continuation form and the merged tokens in the order they are made. Returns 0, or -1 with
// a message in err.
int wp_train(const WpCounts *c, const WpTrainConfig *cfg, WpVocabOut *out, char *err, size_t errlen);
void wp_vocab_out_free(WpVocabOut *v);
// Write tokens one per line, atomically (a temporary file beside path, fsync, rename). Returns 0, or -1 with
// a message in err (path untouched).
int wp_write_vocab(const char *path, char *const *tokens, size_t n, char *err, size_t errlen);

// `mlm vocab` (src/host/commands/vocab.c): argv[0] is "vocab"; returns the exit status.
int vocab_command(int argc, char **argv);

#ifdef __cplusplus
}
#endif
#endif
