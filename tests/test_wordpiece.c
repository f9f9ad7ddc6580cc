// test_wordpiece.c: the WordPiece tokenizer on hand-checked cases with a small vocabulary (punctuation,
// accents, CJK, ## continuations, [UNK], long words, control characters, empty input), vocab.txt
// validation errors, and the byte tokenizer's round trip.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/wordpiece.h"
#include "test_util.h"

static const char *VOCAB[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", ",", ".",
                              "!", "hello", "world", "cafe", "\xe4\xb8\xad" /* 中 */, "\xe5\x9b\xbd" /* 国 */,
                              "a", "##a", "resume", "naive", "##s", "\"", "i", "$", NULL};

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(1); }
    fputs(text, f);
    fclose(f);
}

// Tokenize s and compare with the expected ids (terminated by -1).
static void expect(const WordPiece *wp, const char *s, const int32_t *want) {
    int32_t got[256];
    size_t n = wp_encode(wp, s, strlen(s), got, 256), nw = 0;
    while (want[nw] >= 0) nw++;
    int same = n == nw;
    for (size_t i = 0; same && i < n; i++) same = got[i] == want[i];
    CHECK(same, "\"%s\": %zu ids (want %zu), first got %d want %d", s, n, nw, n ? got[0] : -1, nw ? want[0] : -1);
}
#define EXPECT(wp, s, ...) expect(wp, s, (const int32_t[]){__VA_ARGS__, -1})

static void expect_load_error(const char *dir, const char *name, const char *content, const char *needle) {
    char path[512], err[512] = "";
    snprintf(path, sizeof path, "%s/%s", dir, name);
    write_file(path, content);
    WordPiece *wp = wp_load(path, 1, err, sizeof err);
    CHECK(wp == NULL, "%s: loaded, expected an error containing \"%s\"", name, needle);
    CHECK(strstr(err, needle) != NULL, "%s: error \"%s\" does not contain \"%s\"", name, err, needle);
    wp_free(wp);
}

static void test_uncased(const WordPiece *wp) {
    int32_t ids[4];
    CHECK(wp_encode(wp, "", 0, ids, 4) == 0, "empty input gives no ids");
    CHECK(wp_encode(wp, " \t\r\n \xc2\xa0", 7, ids, 4) == 0, "whitespace only gives no ids");
    EXPECT(wp, "unaffable", 5, 6, 7);
    EXPECT(wp, "Hello, World!", 11, 8, 12, 10);
    EXPECT(wp, "Caf\xc3\xa9", 13);                 // Café: precomposed é
    EXPECT(wp, "Cafe\xcc\x81", 13);                // Café: e + combining acute (Mn) dropped
    EXPECT(wp, "R\xc3\x89SUM\xc3\x89S", 18, 20);   // RÉSUMÉS -> resume ##s
    EXPECT(wp, "na\xc3\xafve.", 19, 9);            // naïve.
    EXPECT(wp, "\xc4\xb0", 22);                    // İ: NFD I + U+0307, mark dropped, then lower-cased
    EXPECT(wp, "\xe4\xb8\xad\xe5\x9b\xbd", 14, 15);  // 中国: one token per ideograph
    EXPECT(wp, "a\xe4\xb8\xad" "a", 16, 14, 16);   // a中a: CJK splits the word
    EXPECT(wp, "aaa", 16, 17, 17);
    EXPECT(wp, "unknownword", 1);
    EXPECT(wp, "unaffablex hello", 1, 11);          // unmatched tail: the whole word is [UNK]
    EXPECT(wp, "$a", 23, 16);                       // ASCII punctuation outside category P (Sc)
    EXPECT(wp, "\xc2\xabhello\xc2\xbb", 1, 11, 1);  // «hello»: Unicode punctuation (Pi, Pf) splits
    EXPECT(wp, "hel\x01lo", 11);                    // control character dropped
    EXPECT(wp, "hel\xef\xbf\xbdlo", 11);            // U+FFFD dropped
    EXPECT(wp, "hel\xfflo", 11);                    // invalid UTF-8 byte dropped
    EXPECT(wp, "hel\xe2\x80\x8blo", 11);            // U+200B zero width space is Cf: dropped
    EXPECT(wp, "hello\xe3\x80\x80world", 11, 12);   // U+3000 ideographic space splits
    EXPECT(wp, "hello\xe2\x80\xa8world", 11, 12);   // U+2028 line separator (Zl) splits
    EXPECT(wp, "hel\x0blo hel\x0clo", 11, 11);        // VT, FF: controls before whitespace, dropped (tokenizers)
    EXPECT(wp, "hello\xcd\xb8", 1);                   // U+0378 unassigned (Cn): kept as a letter, word unknown
    EXPECT(wp, "a\xf0\xab\xa0\xa0" "a", 1);           // U+2B820: not CJK for tokenizers (range starts 2B920)
    EXPECT(wp, "a\xf0\xab\xa4\xa0" "a", 16, 1, 16);   // U+2B920: CJK, split off
    EXPECT(wp, "[MASK]", 4);                        // specials verbatim in the text, as Hugging Face
    EXPECT(wp, "hello[MASK]world[SEP]", 11, 4, 12, 3);
    EXPECT(wp, "[mask] [MASK", 1, 1, 1, 1, 1);      // not verbatim: ordinary text, "[" "mask" "]" unknown
    {   // NUL inside the buffer (length given): dropped, words join
        int32_t got[4];
        size_t n = wp_encode(wp, "hel\0lo", 6, got, 4);
        CHECK(n == 1 && got[0] == 11, "NUL dropped: %zu ids, first %d", n, got[0]);
    }
    // Words of 100 characters are tokenized, longer ones are [UNK].
    char word[102];
    memset(word, 'a', sizeof word);
    int32_t many[128];
    word[100] = 0;
    size_t n = wp_encode(wp, word, 100, many, 128);
    int ok = n == 100 && many[0] == 16;
    for (size_t i = 1; ok && i < n; i++) ok = many[i] == 17;
    CHECK(ok, "100 a's: %zu ids, want a + 99 ##a", n);
    word[100] = 'a';
    word[101] = 0;
    n = wp_encode(wp, word, 101, many, 128);
    CHECK(n == 1 && many[0] == 1, "101 a's: %zu ids, want [UNK]", n);
    // A small output buffer: the full count is returned, only cap ids are written.
    int32_t two[3] = {-7, -7, -7};
    n = wp_encode(wp, "hello world hello", 17, two, 2);
    CHECK(n == 3 && two[0] == 11 && two[1] == 12 && two[2] == -7, "cap 2: n %zu, ids %d %d %d", n, two[0], two[1], two[2]);
}

// Random bytes (mostly invalid UTF-8, controls, punctuation, '[' for the specials): ids stay in range and a
// buffer of exactly the returned size gives the same ids as a large one (sanitizer builds check the memory).
static void test_random_bytes(const WordPiece *wp) {
    static const char alphabet[] = "aun[]MASK!,. \t\n\xc3\xa9\xe4\xb8\xad\xff\x80\x01";
    uint64_t x = 88172645463325252ULL;
    int ok = 1;
    for (int it = 0; it < 2000 && ok; it++) {
        char text[64];
        int32_t big[128], exact[128];
        size_t len = (size_t)(it % 64);
        for (size_t i = 0; i < len; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            text[i] = (it & 1) ? (char)(x >> 32) : alphabet[(x >> 32) % (sizeof alphabet - 1)];
        }
        size_t n = wp_encode(wp, text, len, big, 128);
        ok &= n <= len;
        for (size_t i = 0; ok && i < n; i++) ok &= big[i] >= 0 && (size_t)big[i] < wp_vocab_size(wp);
        ok &= wp_encode(wp, text, len, exact, n) == n && (n == 0 || memcmp(big, exact, n * sizeof *big) == 0);
        if (!ok) fprintf(stderr, "random input %d (%zu bytes): %zu ids\n", it, len, n);
    }
    CHECK(ok, "random bytes: ids in range, same with an exact-size buffer");
}

static void test_cased(const WordPiece *wp) {
    EXPECT(wp, "Hello hello", 1, 11);
    EXPECT(wp, "caf\xc3\xa9 cafe", 1, 13);  // no accent stripping without lower-casing
}

static void test_byte(void) {
    char text[512], back[512];
    int32_t ids[512];
    for (int i = 0; i < 512; i++) text[i] = (char)(i * 37 + 11);  // every byte value
    CHECK(bt_encode(text, 512, ids, 512) == 512, "byte count");
    int ok = 1;
    for (int i = 0; i < 512; i++) ok &= ids[i] == (unsigned char)text[i];
    CHECK(ok, "byte ids are the byte values");
    CHECK(bt_decode(ids, 512, back, 512) == 512 && memcmp(back, text, 512) == 0, "byte round trip");
    int32_t withspec[] = {BT_CLS, 'h', 'i', BT_MASK, BT_SEP, BT_PAD};
    CHECK(bt_decode(withspec, 6, back, 512) == 2 && back[0] == 'h' && back[1] == 'i', "specials skipped in decode");
    int32_t bad[] = {'a', BT_VOCAB_SIZE};
    CHECK(bt_decode(bad, 2, back, 512) == -1, "id out of range rejected");
    CHECK(bt_decode(ids, 4, back, 3) == -1, "small buffer rejected");
    CHECK(bt_special_id("[PAD]") == 256 && bt_special_id("[UNK]") == 257 && bt_special_id("[CLS]") == 258 &&
          bt_special_id("[SEP]") == 259 && bt_special_id("[MASK]") == 260 && bt_special_id("x") == -1, "byte specials");
}

int main(void) {
    char dir[] = "/tmp/mlm_test_wordpiece_XXXXXX";
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 1; }
    char path[512], err[512] = "", text[1024] = "";
    for (int i = 0; VOCAB[i]; i++) { strcat(text, VOCAB[i]); strcat(text, i % 3 ? "\n" : "\r\n"); }
    snprintf(path, sizeof path, "%s/vocab.txt", dir);
    write_file(path, text);

    WordPiece *wp = wp_load(path, 1, err, sizeof err);
    CHECK(wp != NULL, "load: %s", err);
    if (!wp) return test_finish("test_wordpiece");
    CHECK(wp_vocab_size(wp) == 24, "vocab size %zu", wp_vocab_size(wp));
    CHECK(wp_id(wp, "[PAD]") == 0 && wp_id(wp, "[UNK]") == 1 && wp_id(wp, "[CLS]") == 2 && wp_id(wp, "[SEP]") == 3 &&
          wp_id(wp, "[MASK]") == 4, "special ids");
    CHECK(wp_id(wp, "nope") == -1 && wp_id(wp, "##able") == 7, "lookups");
    CHECK(wp_token(wp, 11) && strcmp(wp_token(wp, 11), "hello") == 0 && wp_token(wp, 24) == NULL, "wp_token");
    test_uncased(wp);
    test_random_bytes(wp);
    wp_free(wp);
    wp = wp_load(path, 0, err, sizeof err);
    CHECK(wp != NULL, "load cased: %s", err);
    if (wp) test_cased(wp);
    wp_free(wp);

    expect_load_error(dir, "dup.txt", "[UNK]\na\nb\na\n", "dup.txt:4: duplicate token \"a\" (first on line 2)");
    expect_load_error(dir, "utf8.txt", "[UNK]\nok\nbad\xc3\n", "utf8.txt:3: token is not valid UTF-8");
    expect_load_error(dir, "empty.txt", "[UNK]\n\nx\n", "empty.txt:2: empty token");
    expect_load_error(dir, "nounk.txt", "[PAD]\nx\n", "no [UNK] token");
    CHECK(wp_load("/nonexistent/vocab.txt", 1, err, sizeof err) == NULL && strstr(err, "/nonexistent/vocab.txt: cannot open"),
          "missing file: %s", err);

    test_byte();
    test_run("rm -rf %s", dir);
    return test_finish("test_wordpiece");
}
