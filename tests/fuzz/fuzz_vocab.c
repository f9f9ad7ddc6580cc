// fuzz_vocab.c: libFuzzer harness for the vocab.txt parser and the WordPiece encoder (wp_load, wp_load_text,
// wp_encode). Input: byte 0 = where the vocabulary ends (a fraction of the rest) and lower-casing (bit 0); the
// vocabulary text, then a text to encode. Properties: the file reader and the in-memory parser agree; an accepted
// vocabulary maps every id to a token that maps back to it (non-empty, valid UTF-8, no newline, no trailing blank)
// and has [UNK]; encoding gives ids inside the vocabulary, the same count whatever the output capacity (a prefix
// when it is smaller), the same ids twice, and the same ids when the text is cut after ASCII whitespace and the
// parts encoded apart (what `mlm prepare` relies on to tokenize pieces in parallel).
#include "fuzz_util.h"

#include "mlm/data.h"
#include "mlm/wordpiece.h"

static int valid_token(const char *t) {
    size_t n = strlen(t);
    if (!n || strchr(t, '\n') || t[n - 1] == ' ' || t[n - 1] == '\t' || t[n - 1] == '\r') return 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_next((const unsigned char *)t + i, n - i, &cp);
        if (cp == UTF8_INVALID) return 0;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    int lower = data[0] & 1;
    size_t rest = size - 1, vlen = (size_t)(data[0] >> 1) * rest / 127;
    const char *vtext = (const char *)data + 1, *text = vtext + vlen;
    size_t tlen = rest - vlen;
    char err[512], err2[512];
    WordPiece *wp = wp_load_text(vtext, vlen, "vocab.txt", lower, err, sizeof(err));
    WordPiece *wf = wp_load(fuzz_input_file((const uint8_t *)vtext, vlen), lower, err2, sizeof(err2));
    if (!wp != !wf) fuzz_fail("file and memory parsers disagree: %s / %s", wp ? "ok" : err, wf ? "ok" : err2);
    if (wf && wp_vocab_size(wf) != wp_vocab_size(wp)) fuzz_fail("file and memory parsers: other sizes");
    if (wf) wp_free(wf);
    if (!wp) return 0;
    size_t n = wp_vocab_size(wp);
    for (size_t id = 0; id < n; id++) {
        const char *t = wp_token(wp, (int32_t)id);
        if (!t || !valid_token(t)) fuzz_fail("token %zu is empty, not UTF-8 or holds a newline or trailing blank", id);
        if (wp_id(wp, t) != (int32_t)id) fuzz_fail("token %zu does not map back to its id", id);
    }
    if (wp_id(wp, "[UNK]") < 0) fuzz_fail("a vocabulary without [UNK] was accepted");
    if (wp_token(wp, (int32_t)n) || wp_token(wp, -1)) fuzz_fail("a token outside the vocabulary");
    int32_t *ids = malloc((tlen + 1) * sizeof(int32_t)), *again = malloc((tlen + 1) * sizeof(int32_t));
    size_t m = wp_encode(wp, text, tlen, ids, tlen + 1);
    if (m > tlen) fuzz_fail("%zu ids for %zu bytes", m, tlen);
    for (size_t i = 0; i < m; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= n) fuzz_fail("id %d outside the vocabulary of %zu", ids[i], n);
    if (wp_encode(wp, text, tlen, NULL, 0) != m) fuzz_fail("the count depends on the output capacity");
    size_t half = m / 2;
    if (wp_encode(wp, text, tlen, again, half) != m || memcmp(again, ids, half * sizeof(int32_t)))
        fuzz_fail("a smaller output is not the prefix");
    if (wp_encode(wp, text, tlen, again, tlen + 1) != m || memcmp(again, ids, m * sizeof(int32_t)))
        fuzz_fail("not deterministic");
    // Cut after the first ASCII whitespace at or after the middle: the parts encode to the whole's ids.
    size_t cut = tlen / 2;
    while (cut < tlen && !(text[cut] == ' ' || text[cut] == '\n' || text[cut] == '\t' || text[cut] == '\r')) cut++;
    if (cut < tlen) {
        cut++;
        size_t a = wp_encode(wp, text, cut, again, tlen + 1);
        size_t b = wp_encode(wp, text + cut, tlen - cut, again + a, tlen + 1 - a);
        if (a + b != m || memcmp(again, ids, m * sizeof(int32_t)))
            fuzz_fail("cut at byte %zu (after whitespace): %zu + %zu ids, the whole %zu (or other ids)", cut, a, b, m);
    }
    free(ids);
    free(again);
    wp_free(wp);
    return 0;
}
