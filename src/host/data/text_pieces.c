// text_pieces.c: a text stream cut into documents and independently tokenizable pieces (what `mlm prepare`
// reads with), and the streaming UTF-8 check of its --invalid-utf8 policy. text_pieces.h says why the cuts are safe.
#include "mlm/text_pieces.h"

#include <string.h>

#include "mlm/data.h"
#include "mlm/wordpiece.h"

static int is_space_byte(unsigned char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// WordPiece: the end of the last character in s[from, limit) that always ends a word (not '[', which may open a
// special written in the text), or 0 if there is none.
static size_t last_word_end(const char *s, size_t from, size_t limit) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = from, best = 0;
    while (i < limit && (u[i] & 0xc0) == 0x80) i++;  // start at a character boundary
    while (i < limit) {
        uint32_t cp;
        size_t k = utf8_next(u + i, limit - i, &cp);
        if (cp != UTF8_INVALID && cp != '[' && i + k <= limit && wp_ends_word(cp)) best = i + k;
        i += k;
    }
    return best;
}

// Where a piece of s[0, limit) may end so that tokenizing the pieces separately gives the same ids as the
// whole: the last such point at or before `limit`, or 0 if there is none. at_end: s[limit] is not read yet
// (the next read continues the text), so a character or word may go on past it. *overlong (WordPiece): the cut
// is inside a word of over limit / 2 bytes, whose rest the caller skips.
static size_t safe_cut(const TextPieces *t, const char *s, size_t limit, int at_end, int *overlong) {
    const unsigned char *u = (const unsigned char *)s;
    *overlong = 0;
    if (t->cut == TEXT_CUT_BYTES) return limit;
    if (t->cut == TEXT_CUT_WORDS) {
        for (size_t k = limit; k > (at_end ? 0 : limit / 2); k--)
            if (is_space_byte(u[k - 1])) return k;
        if (at_end) return 0;
        size_t k = last_word_end(s, limit / 2, limit);
        if (k) return k;
        *overlong = 1;  // a run of word characters of over limit / 2 bytes: one [UNK] whole
    }
    if (limit == 0) return 0;
    // A character boundary: a byte that is not a continuation byte. A decoder (utf8_next) never reads across
    // one, so the bytes before it decode the same alone, invalid ones included.
    size_t k = at_end ? limit - 1 : limit;  // at the end the last character may be incomplete: keep it
    while (k > 0 && (u[k] & 0xc0) == 0x80) k--;
    return k;
}

// Skipping the rest of an overlong word: bytes of s[0, len) up to the first character that ends a word (not
// consumed), all of them if there is none (an incomplete character at the end waits unless final).
static size_t skip_word_rest(TextPieces *t, const char *s, size_t len, int final) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        if (!final && len - i < 4 && u[i] >= 0xc0 && len - i < (size_t)(u[i] >= 0xf0 ? 4 : u[i] >= 0xe0 ? 3 : 2)) break;
        uint32_t cp;
        size_t k = utf8_next(u + i, len - i, &cp);
        if (cp != UTF8_INVALID && wp_ends_word(cp)) {
            t->skip_word = 0;
            break;
        }
        i += k;
    }
    t->bytes_skipped += i;
    return i;
}

static void add_piece(TextPieces *t, const char *s, size_t len) {
    t->piece(t->ctx, s, len, !t->in_doc);
    t->in_doc = 1;
}

// Text s[0, len) of the current document: emit pieces; with final = 0 keep a tail that may go on in the next
// read. Returns the bytes consumed.
static size_t emit_doc_text(TextPieces *t, const char *s, size_t len, int final) {
    size_t done = 0;
    int overlong;
    if (t->skip_word) {
        done = skip_word_rest(t, s, len, final);
        if (t->skip_word) return done;
    }
    while (len - done > t->piece_bytes || (final && done < len)) {
        size_t take = len - done;
        overlong = 0;
        if (take > t->piece_bytes) {
            take = safe_cut(t, s + done, t->piece_bytes, 0, &overlong);
            if (take == 0) take = t->piece_bytes;
        }
        add_piece(t, s + done, take);
        done += take;
        if (overlong) {
            t->skip_word = 1;
            done += skip_word_rest(t, s + done, len - done, final);
            if (t->skip_word) return done;
        }
    }
    if (!final && len > done) {
        size_t take = safe_cut(t, s + done, len - done, 1, &overlong);
        if (take > 0) {
            add_piece(t, s + done, take);
            done += take;
        }
    }
    return done;
}

static void end_doc(TextPieces *t) {
    if (t->in_doc && t->end_doc) t->end_doc(t->ctx);
    t->in_doc = 0;
    t->skip_word = 0;
}

// Blank mode: the end of the current document in s[0, len): just after the newline that is followed by a
// blank line (only spaces, tabs or '\r' up to the next newline, or up to the end of the input). *undecided = 1
// when the newline found is followed by blanks up to the end of what was read so far (the next read decides).
// len when there is no newline that could end the document.
static size_t next_blank(const char *s, size_t len, int eof, int *undecided) {
    *undecided = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] != '\n') continue;
        size_t k = i + 1;
        while (k < len && (s[k] == ' ' || s[k] == '\t' || s[k] == '\r')) k++;
        if (k < len && s[k] == '\n') return i + 1;
        if (k == len) {
            *undecided = !eof;
            return i + 1;
        }
    }
    return len;
}

size_t text_pieces_feed(TextPieces *t, const char *s, size_t len, int eof) {
    if (!t->blank_docs) return emit_doc_text(t, s, len, eof);
    size_t done = 0;
    while (done < len) {
        if (!t->in_doc) {  // skip the blank lines between documents
            size_t k = done;
            while (k < len && is_space_byte((unsigned char)s[k])) k++;
            if (k == len) {
                if (eof) return len;
                while (k > done && s[k - 1] != '\n') k--;  // a partial line of blanks may start a document
                return k;
            }
            while (k > done && s[k - 1] != '\n') k--;  // a document starts at the start of its first line
            done = k;
        }
        int undecided;
        size_t b = next_blank(s + done, len - done, eof, &undecided);
        if (undecided) {
            // The text up to the newline is the document's for sure; the newline stays for the next scan.
            if (b > 1) done += emit_doc_text(t, s + done, b - 1, 0);
            return done;
        }
        if (b == len - done && !eof) return done + emit_doc_text(t, s + done, len - done, 0);
        emit_doc_text(t, s + done, b, 1);
        end_doc(t);
        done += b;
    }
    return done;
}

void text_pieces_end_file(TextPieces *t) {
    // A document never spans files. (In blank mode a last document whose text ended in blanks, all consumed before
    // the end of the file was seen, stayed open, and the next file's first document was merged into it.)
    end_doc(t);
}

size_t utf8_check(Utf8Check *c, const char *s, size_t len, int eof) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        // Not at the end of the input, a lead byte whose sequence runs past what was read waits for the next read.
        if (!eof && len - i < 4 && u[i] >= 0xc0) {
            size_t need = u[i] >= 0xf0 ? 4 : u[i] >= 0xe0 ? 3 : 2;
            if (len - i < need) break;
        }
        uint32_t cp;
        size_t k = utf8_next(u + i, len - i, &cp);
        if (cp == UTF8_INVALID) {
            if (!c->invalid) c->first_invalid = c->pos + i;
            c->invalid++;
        }
        i += k;
    }
    c->pos += i;
    return i;
}

int text_pieces_read_file(TextPieces *t, Utf8Check *c, size_t (*read)(void *ctx, char *buf, size_t n), void *ctx,
                          char *buf, size_t cap, int check_utf8, int stop_invalid) {
    *c = (Utf8Check){0};
    size_t carry = 0, checked = 0;  // buf[0, carry) is read and not consumed; buf[0, checked) is checked
    for (;;) {
        size_t n = read(ctx, buf + carry, cap - carry - 1);
        if (n == (size_t)-1) return -1;
        int eof = n == 0;
        size_t len = carry + n;
        if (check_utf8) {
            checked += utf8_check(c, buf + checked, len - checked, eof);
            if (c->invalid && stop_invalid) return 1;
        } else {
            checked = len;
        }
        // Only checked bytes are cut into pieces (at most 3 wait for the rest of their character).
        size_t used = text_pieces_feed(t, buf, checked, eof && checked == len);
        t->bytes_done += used;
        memmove(buf, buf + used, len - used);
        carry = len - used;
        checked -= used;
        if (eof) break;
        if (carry >= cap - 1) {
            // The feed keeps less than a piece, or a line that may still turn out blank: only a run of blanks
            // longer than the buffer (4 MB in prepare) gets here. It is cut as text rather than read forever.
            size_t k = emit_doc_text(t, buf, checked, 1);
            t->bytes_done += k;
            memmove(buf, buf + k, carry - k);
            carry -= k;
            checked -= k;
        }
    }
    text_pieces_end_file(t);
    return 0;
}
