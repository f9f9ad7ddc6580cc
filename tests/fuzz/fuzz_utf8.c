// fuzz_utf8.c: libFuzzer harness for the UTF-8 decoder (utf8_decode, utf8_encode) and the vocabulary built
// from decoded text (vocab_build, vocab_id), as the corpus and `mlm fill` read text. Properties: the decoder
// accepts exactly what an independent RFC 3629 check accepts; what it accepts re-encodes to the same bytes;
// every decoded character is in the vocabulary built from the text, at an id that maps back to it.
#include "fuzz_util.h"

#include "mlm/data.h"

// Well-formed UTF-8 per RFC 3629 (Table 3-7 of the Unicode standard): no overlongs, no surrogates, <= U+10FFFF.
static int valid_utf8(const uint8_t *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t k;
        uint8_t lo = 0x80, hi = 0xbf;
        if (c <= 0x7f) { i++; continue; }
        else if (c >= 0xc2 && c <= 0xdf) k = 1;
        else if (c == 0xe0) { k = 2; lo = 0xa0; }
        else if (c >= 0xe1 && c <= 0xec) k = 2;
        else if (c == 0xed) { k = 2; hi = 0x9f; }
        else if (c >= 0xee && c <= 0xef) k = 2;
        else if (c == 0xf0) { k = 3; lo = 0x90; }
        else if (c >= 0xf1 && c <= 0xf3) k = 3;
        else if (c == 0xf4) { k = 3; hi = 0x8f; }
        else return 0;
        if (i + k >= n) return 0;  // not enough bytes left
        if (s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (size_t j = 2; j <= k; j++)
            if ((s[i + j] & 0xc0) != 0x80) return 0;
        i += k + 1;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char *text = malloc(size ? size : 1);  // exactly `size` bytes: a read past the end is caught by ASan
    if (!text) abort();
    memcpy(text, data, size);
    uint32_t *cps = NULL;
    char err[256];
    long n = utf8_decode(text, size, &cps, err, sizeof(err));
    int expect = valid_utf8(data, size);
    if ((n >= 0) != expect)
        fuzz_fail("utf8_decode %s input that RFC 3629 calls %s (%s)", n >= 0 ? "accepted" : "refused",
                  expect ? "valid" : "invalid", n >= 0 ? "" : err);
    if (n >= 0) {
        char *back = malloc((size_t)n * 4 + 5);
        if (!back) abort();
        size_t k = 0;
        for (long i = 0; i < n; i++) k += (size_t)utf8_encode(cps[i], back + k);
        if (k != size || memcmp(back, data, size) != 0) fuzz_fail("decode -> encode changed the bytes");
        free(back);
        if (n > 0) {
            Vocab v;
            if (vocab_build(&v, cps, (size_t)n, err, sizeof(err)) == 0) {
                for (long i = 0; i < n; i++) {
                    int id = vocab_id(&v, cps[i]);
                    if (id < 0 || id >= v.n_chars || v.chars[id] != cps[i])
                        fuzz_fail("U+%04X has vocabulary id %d", (unsigned)cps[i], id);
                }
                char buf[16];
                for (int id = 0; id < v.n_tokens; id++) (void)vocab_token_text(&v, id, buf);
            }
        }
        free(cps);
    }
    free(text);
    return 0;
}
