// text_pieces.h: what `mlm prepare` reads with: a text stream cut into documents (a file each, or blocks separated
// by blank lines) and pieces of at most piece_bytes that tokenize independently, and the streaming UTF-8 check
// behind its --invalid-utf8 policy.
//
// Pieces are cut only where the tokenizer's output cannot change: for WordPiece after ASCII whitespace, else (in
// over piece_bytes / 2 bytes without any) after a character that always ends a word (wp_ends_word: whitespace,
// punctuation other than '[', which may open a special such as [MASK], a CJK character); at a character boundary
// for char; anywhere for bytes. A WordPiece "word" longer than that (no such character in piece_bytes / 2 bytes,
// so over WP_MAX_INPUT_CHARS_PER_WORD characters: [UNK] whole) is cut at a character boundary and the rest of it,
// up to its end, is skipped: its first piece already ends in that [UNK]. So tokenizing the pieces one by one, in
// any number of threads, gives the ids of tokenizing each document whole (one pathological exception: a word of
// over piece_bytes / 2 bytes that lower-casing and accent stripping shrink to at most 100 characters), and memory
// is bounded by the read buffer, not the corpus.
#ifndef MLM_TEXT_PIECES_H
#define MLM_TEXT_PIECES_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { TEXT_CUT_BYTES = 0, TEXT_CUT_CHARS = 1, TEXT_CUT_WORDS = 2 } TextCut;

typedef struct {
    TextCut cut;
    int blank_docs;        // documents are blank-line-separated blocks (else: one per file)
    size_t piece_bytes;    // pieces are at most this long (WordPiece: at least 8 x WP_MAX_INPUT_CHARS_PER_WORD + 8, so
                           // that half of it holds over that many characters of 4 bytes)
    // piece(ctx, s, len, starts_doc): the next piece of the current document (starts_doc: its first; a document's
    // first piece may be empty). end_doc(ctx): the current document, which had at least one piece, ended.
    void (*piece)(void *ctx, const char *s, size_t len, int starts_doc);
    void (*end_doc)(void *ctx);
    void *ctx;
    int in_doc;            // a document is open (state)
    int skip_word;         // WordPiece: skipping the rest of an overlong word that was cut (state)
    uint64_t bytes_done;   // bytes of text consumed so far (progress)
    uint64_t bytes_skipped;  // of which skipped (the rest of overlong words)
} TextPieces;

// Feed s[0, len) of the current file; eof: nothing follows it in this file. Returns the bytes consumed: the rest
// (a tail that a later read may continue) must be given again, followed by more text, in the next call.
size_t text_pieces_feed(TextPieces *t, const char *s, size_t len, int eof);
// The current file ended (after its last feed): its document ends (a document never spans files).
void text_pieces_end_file(TextPieces *t);

// Invalid UTF-8 in a stream, as utf8_next (data.h) defines it: pos is the file offset of the next byte to check,
// invalid the number of invalid bytes seen, first_invalid the offset of the first.
typedef struct {
    uint64_t pos, invalid, first_invalid;
} Utf8Check;
// Check s[0, len), the bytes that follow those checked before; returns how many were checked: all of them when
// eof, else up to the start of a character that may continue in the next read (at most 3 bytes are left).
size_t utf8_check(Utf8Check *c, const char *s, size_t len, int eof);

// Read one file through t: read(ctx, buf, n) fills buf with up to n bytes and returns how many (0 at its end).
// buf[cap] is the read buffer (cap > 2 * piece_bytes + 8; a line of blanks longer than cap is cut as text). check_utf8: check every byte with c (zeroed first),
// and stop at the first invalid one if stop_invalid. Returns 0 at the end of the file (its document ended), 1 stopped at invalid UTF-8 (c->first_invalid), -1 if read returned (size_t)-1.
int text_pieces_read_file(TextPieces *t, Utf8Check *c, size_t (*read)(void *ctx, char *buf, size_t n), void *ctx,
                          char *buf, size_t cap, int check_utf8, int stop_invalid);

#ifdef __cplusplus
}
#endif
#endif
