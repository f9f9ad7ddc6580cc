// fuzz_prepare_input.c: libFuzzer harness for what `mlm prepare` reads its inputs with: text_pieces_read_file
// (documents, pieces, the UTF-8 check of --invalid-utf8), fed in reads of fuzzed sizes as from a pipe, with pieces
// small enough that every cut rule is met on small inputs (4 to 64 bytes; WordPiece 808 to 928, the least its
// overlong-word rule allows). Properties, against a construction on the whole text: the documents (one per file, or
// blank-line blocks) are the reference's byte for byte (WordPiece: unless the rest of an overlong word was skipped);
// no piece is longer than piece_bytes; tokenizing the pieces one by one gives the ids of tokenizing each reference
// document whole (char: code points with invalid bytes dropped; WordPiece with a small vocabulary, cased and
// uncased), which is what makes prepare's shards independent of its reads and threads; the invalid-UTF-8 count and
// first offset equal a count over the whole text; with stop_invalid, reading stops at the first invalid byte and
// nothing from it on was emitted.
//
// Input: byte 0 = cut kind (bits 0-1), blank documents (bit 2), stop at invalid UTF-8 (bit 3), piece size (bits
// 4-7); byte 1 seeds the read sizes (bit 0 also: WordPiece lower-casing); the rest is the text.
#include "fuzz_util.h"

#include "mlm/data.h"
#include "mlm/text_pieces.h"
#include "mlm/wordpiece.h"

typedef struct {
    char **docs;          // [n_docs] the documents as emitted, each the concatenation of its pieces
    size_t *lens, n_docs, cap_docs;
    char **pieces;        // every piece, in order, with its document
    size_t *piece_lens, *piece_doc, n_pieces, cap_pieces;
    size_t piece_bytes;
    int open;             // a document is open
} Emitted;

static void *resize(void *p, size_t bytes) {
    p = realloc(p, bytes);
    if (!p) abort();
    return p;
}

static void on_piece(void *ctx, const char *s, size_t len, int starts_doc) {
    Emitted *e = ctx;
    if (len > e->piece_bytes) fuzz_fail("a piece of %zu bytes, over piece_bytes %zu", len, e->piece_bytes);
    if (starts_doc) {
        if (e->open) fuzz_fail("a document started inside another");
        if (e->n_docs == e->cap_docs) {
            e->cap_docs = e->cap_docs ? 2 * e->cap_docs : 16;
            e->docs = resize(e->docs, e->cap_docs * sizeof(char *));
            e->lens = resize(e->lens, e->cap_docs * sizeof(size_t));
        }
        e->docs[e->n_docs] = NULL;
        e->lens[e->n_docs++] = 0;
        e->open = 1;
    }
    if (!e->open) fuzz_fail("a piece outside a document");
    size_t d = e->n_docs - 1;
    e->docs[d] = resize(e->docs[d], e->lens[d] + len + 1);
    memcpy(e->docs[d] + e->lens[d], s, len);
    e->lens[d] += len;
    if (e->n_pieces == e->cap_pieces) {
        e->cap_pieces = e->cap_pieces ? 2 * e->cap_pieces : 16;
        e->pieces = resize(e->pieces, e->cap_pieces * sizeof(char *));
        e->piece_lens = resize(e->piece_lens, e->cap_pieces * sizeof(size_t));
        e->piece_doc = resize(e->piece_doc, e->cap_pieces * sizeof(size_t));
    }
    e->pieces[e->n_pieces] = resize(NULL, len + 1);
    memcpy(e->pieces[e->n_pieces], s, len);
    e->piece_lens[e->n_pieces] = len;
    e->piece_doc[e->n_pieces++] = d;
}

static void on_end_doc(void *ctx) {
    Emitted *e = ctx;
    if (!e->open) fuzz_fail("a document ended that was not open");
    e->open = 0;
}

typedef struct {
    const uint8_t *text;
    size_t len, pos;
    uint32_t rng;
} Reader;

// Reads of 1 to 16 bytes, as a pipe may deliver them.
static size_t read_some(void *ctx, char *buf, size_t n) {
    Reader *r = ctx;
    r->rng = r->rng * 1103515245u + 12345u;
    size_t k = 1 + (r->rng >> 16) % 16;
    if (k > n) k = n;
    if (k > r->len - r->pos) k = r->len - r->pos;
    memcpy(buf, r->text + r->pos, k);
    r->pos += k;
    return k;
}

static int blank_byte(uint8_t c) { return c == ' ' || c == '\t' || c == '\r'; }
static int space_byte(uint8_t c) { return blank_byte(c) || c == '\n'; }

// The reference documents of text[0, len): file mode, the whole text (none if empty); blank mode, each block from the
// start of the line of its first visible byte to the newline followed by a blank line (or blanks to the end), or
// to the end. Returns the count; starts and ends in s[], e[].
static size_t reference_docs(const uint8_t *t, size_t len, int blank, size_t *s, size_t *e) {
    if (!blank) {
        if (!len) return 0;
        s[0] = 0, e[0] = len;
        return 1;
    }
    size_t n = 0, i = 0;
    while (i < len) {
        size_t k = i;
        while (k < len && space_byte(t[k])) k++;
        if (k == len) break;
        size_t start = k;
        while (start > i && t[start - 1] != '\n') start--;
        size_t end = len;
        for (size_t j = start; j < len; j++) {
            if (t[j] != '\n') continue;
            size_t m = j + 1;
            while (m < len && blank_byte(t[m])) m++;
            if (m == len || t[m] == '\n') {
                end = j + 1;
                break;
            }
        }
        s[n] = start, e[n++] = end;
        i = end;
    }
    return n;
}

// Code points of s[0, n) with invalid bytes dropped (the char tokenizer's reading under --invalid-utf8 skip).
static size_t code_points(const char *s, size_t n, uint32_t *out) {
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_next((const unsigned char *)s + i, n - i, &cp);
        if (cp != UTF8_INVALID) out[k++] = cp;
    }
    return k;
}

static WordPiece *vocab(int lower) {
    static WordPiece *wp[2];
    if (!wp[lower]) {
        static const char text[] =
            "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\nc\nd\ne\nt\nh\n##a\n##b\n##c\n##d\n##e\n##t\n##h\nthe\n##ing\n"
            "é\n##é\n中\n.\n,\n!\nA\n##A\nThe\n";
        char err[256];
        wp[lower] = wp_load_text(text, strlen(text), "fuzz-vocab", lower, err, sizeof(err));
        if (!wp[lower]) fuzz_fail("the harness vocabulary: %s", err);
    }
    return wp[lower];
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    TextCut cut = (TextCut)(data[0] & 3) == 3 ? TEXT_CUT_WORDS : (TextCut)(data[0] & 3);
    int blank = (data[0] >> 2) & 1, stop = (data[0] >> 3) & 1, lower = data[1] & 1;
    size_t piece_bytes = (cut == TEXT_CUT_WORDS ? 8 * WP_MAX_INPUT_CHARS_PER_WORD + 8 : 4) + 4 * (size_t)(data[0] >> 4);
    const uint8_t *text = data + 2;
    size_t len = size - 2;
    Emitted e = {.piece_bytes = piece_bytes};
    TextPieces t = {.cut = cut, .blank_docs = blank, .piece_bytes = piece_bytes, .piece = on_piece,
                    .end_doc = on_end_doc, .ctx = &e};
    Reader r = {.text = text, .len = len, .rng = data[1]};
    // A buffer larger than the text: its overflow cut (a line of blanks longer than the buffer) is not the subject.
    size_t cap = len + 2 * piece_bytes + 16;
    char *buf = malloc(cap);
    Utf8Check chk;
    int check = cut != TEXT_CUT_BYTES;
    int rc = text_pieces_read_file(&t, &chk, read_some, &r, buf, cap, check, stop);
    free(buf);
    Utf8Check whole = {0};
    if (check) utf8_check(&whole, (const char *)text, len, 1);
    if (rc == 1) {
        // Stopped at the first invalid byte: it is the whole text's first, and nothing from it on was emitted.
        if (!whole.invalid || chk.first_invalid != whole.first_invalid)
            fuzz_fail("stopped at invalid UTF-8 at %llu, the text's first is at %llu (%llu invalid)",
                      (unsigned long long)chk.first_invalid, (unsigned long long)whole.first_invalid,
                      (unsigned long long)whole.invalid);
        if (t.bytes_done > chk.first_invalid) fuzz_fail("bytes after the first invalid one were cut into pieces");
    } else if (rc != 0) {
        fuzz_fail("text_pieces_read_file returned %d", rc);
    } else {
        if (check && (chk.invalid != whole.invalid || (whole.invalid && chk.first_invalid != whole.first_invalid)))
            fuzz_fail("streamed UTF-8 check: %llu invalid from %llu, the whole text %llu from %llu",
                      (unsigned long long)chk.invalid, (unsigned long long)chk.first_invalid,
                      (unsigned long long)whole.invalid, (unsigned long long)whole.first_invalid);
        if (e.open) fuzz_fail("a document left open at the end of the file");
        size_t *s = malloc((len + 1) * sizeof(size_t)), *en = malloc((len + 1) * sizeof(size_t));
        size_t n = reference_docs(text, len, blank, s, en);
        if (n != e.n_docs) fuzz_fail("%zu documents, the reference has %zu", e.n_docs, n);
        for (size_t d = 0; d < n && !t.bytes_skipped; d++)
            if (e.lens[d] != en[d] - s[d] || memcmp(e.docs[d], text + s[d], e.lens[d]) != 0)
                fuzz_fail("document %zu: %zu bytes, the reference's %zu (from byte %zu)", d, e.lens[d], en[d] - s[d], s[d]);
        if (t.bytes_skipped && cut != TEXT_CUT_WORDS) fuzz_fail("bytes skipped outside WordPiece");
        // Pieces tokenize as their reference document does.
        for (size_t d = 0; d < n; d++) {
            const char *doc = (const char *)text + s[d];
            size_t dl = en[d] - s[d];
            int32_t *whole_ids = malloc((dl + 1) * sizeof(int32_t)), *piece_ids = malloc((dl + 1) * sizeof(int32_t));
            uint32_t *wc = malloc((dl + 1) * sizeof(uint32_t)), *pc = malloc((dl + 1) * sizeof(uint32_t));
            size_t nw = 0, np = 0;
            if (cut == TEXT_CUT_WORDS) nw = wp_encode(vocab(lower), doc, dl, whole_ids, dl + 1);
            if (cut == TEXT_CUT_CHARS) nw = code_points(doc, dl, wc);
            for (size_t p = 0; p < e.n_pieces; p++) {
                if (e.piece_doc[p] != d) continue;
                if (cut == TEXT_CUT_WORDS) np += wp_encode(vocab(lower), e.pieces[p], e.piece_lens[p], piece_ids + np, dl + 1 - np);
                if (cut == TEXT_CUT_CHARS) np += code_points(e.pieces[p], e.piece_lens[p], pc + np);
            }
            if (np != nw || (cut == TEXT_CUT_WORDS && memcmp(whole_ids, piece_ids, nw * sizeof(int32_t))) ||
                (cut == TEXT_CUT_CHARS && memcmp(wc, pc, nw * sizeof(uint32_t))))
                fuzz_fail("document %zu: its pieces tokenize to %zu ids, the whole document to %zu (or other ids)", d, np, nw);
            free(whole_ids); free(piece_ids); free(wc); free(pc);
        }
        free(s);
        free(en);
    }
    for (size_t d = 0; d < e.n_docs; d++) free(e.docs[d]);
    for (size_t p = 0; p < e.n_pieces; p++) free(e.pieces[p]);
    free(e.docs); free(e.lens); free(e.pieces); free(e.piece_lens); free(e.piece_doc);
    return 0;
}
