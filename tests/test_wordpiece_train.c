// test_wordpiece_train.c: the WordPiece trainer on a hand-worked example (the vocabulary, in order, that Hugging
// Face's BertWordPieceTokenizer.train gives on it too), min_frequency and limit_alphabet, word counting through
// the basic tokenizer, and on Tiny Shakespeare its properties: specials first, the requested size, no duplicate,
// every word of the corpus tokenizable without [UNK] by the written vocab.txt, the same vocabulary from counts
// made in pieces and merged, and the same vocabulary twice (deterministic).
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/wordpiece.h"
#include "mlm/wordpiece_train.h"
#include "test_util.h"

static WpCounts *toy_counts(void) {
    // The word counts of the example in Hugging Face's course: hug 10, pug 5, pun 12, bun 4, hugs 5.
    WpCounts *c = wp_counts_new(1);
    const char *w[] = {"hug", "pug", "pun", "bun", "hugs"};
    const uint64_t n[] = {10, 5, 12, 4, 5};
    for (int i = 0; i < 5; i++) wp_counts_add_word(c, w[i], strlen(w[i]), n[i]);
    return c;
}

static int same_tokens(const WpVocabOut *v, const char *const *want) {
    size_t n = 0;
    while (want[n]) n++;
    if (v->n != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (strcmp(v->tokens[i], want[i])) return 0;
    return 1;
}

static void test_toy(void) {
    // Worked by hand: pairs (##u,##g) 20, (p,##u) 17, (##u,##n) 16, (h,##u) 15, ... merge ##ug, then ##un 16,
    // hug 15, pun 12, then the tie (p,##ug) = (hug,##s) = 5 goes to the smaller pair (p's id < hug's id): pug,
    // hugs, and bun 4. Hugging Face gives this list in this order (tokenizers 0.23, min_frequency 0).
    static const char *const want[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "b", "g", "h", "n", "p", "s",
                                       "u", "##u", "##n", "##g", "##s", "##ug", "##un", "hug", "pun", "pug", "hugs",
                                       "bun", NULL};
    WpCounts *c = toy_counts();
    WpVocabOut v;
    char err[256];
    WpTrainConfig cfg = {.vocab_size = 23};
    CHECK(wp_train(c, &cfg, &v, err, sizeof err) == 0, "toy: %s", err);
    CHECK(same_tokens(&v, want), "toy: %zu tokens, not the hand-worked 23 (token 18: %s)", v.n, v.n > 18 ? v.tokens[18] : "-");
    CHECK(v.n_specials == 5 && v.n_alphabet == 7 && v.n_merges == 7, "toy: %zu specials, %zu characters, %zu merges",
          v.n_specials, v.n_alphabet, v.n_merges);
    wp_vocab_out_free(&v);

    // A bigger size: the merges run out (every word is one token); a smaller one stops early.
    cfg.vocab_size = 1000;
    CHECK(wp_train(c, &cfg, &v, err, sizeof err) == 0 && v.n == 23, "toy, size 1000: %zu tokens, want 23", v.n);
    wp_vocab_out_free(&v);
    cfg.vocab_size = 19;
    CHECK(wp_train(c, &cfg, &v, err, sizeof err) == 0 && v.n == 19 && !strcmp(v.tokens[18], "hug"),
          "toy, size 19: %zu tokens", v.n);
    wp_vocab_out_free(&v);

    // min_frequency 5: bun (4) is never merged (Hugging Face: the same list without "bun").
    cfg = (WpTrainConfig){.vocab_size = 100, .min_frequency = 5};
    CHECK(wp_train(c, &cfg, &v, err, sizeof err) == 0 && v.n == 22 && !strcmp(v.tokens[21], "hugs"),
          "toy, min_frequency 5: %zu tokens, want 22 ending in hugs", v.n);
    wp_vocab_out_free(&v);

    // limit_alphabet 4: the four most frequent characters kept (u 36, g 20, n 16, p 17), sorted: g n p u;
    // a word's dropped characters are skipped, so "hug" is "##u ##g" and "bun" "##u ##n".
    cfg = (WpTrainConfig){.vocab_size = 9};
    cfg.limit_alphabet = 4;
    CHECK(wp_train(c, &cfg, &v, err, sizeof err) == 0 && v.n >= 9 && v.n_alphabet == 4 &&
              !strcmp(v.tokens[5], "g") && !strcmp(v.tokens[6], "n") && !strcmp(v.tokens[7], "p") &&
              !strcmp(v.tokens[8], "u"), "toy, limit_alphabet 4: alphabet of %zu", v.n_alphabet);
    wp_vocab_out_free(&v);
    wp_counts_free(c);
}

static void test_counting(void) {
    WpCounts *c = wp_counts_new(1);
    const char *text = "Hello, hello WORLD! Caf\xc3\xa9 cafe\n\xe4\xb8\xad\xe5\x9b\xbd [MASK]";
    CHECK(wp_counts_add_text(c, text, strlen(text)) == 0, "counting failed");
    // hello x2, "," "!", world, cafe x2 (accent stripped), 中, 国 (CJK split), "[", "mask", "]" (no specials).
    CHECK(wp_counts_get(c, "hello", 5) == 2 && wp_counts_get(c, "cafe", 4) == 2 && wp_counts_get(c, "world", 5) == 1,
          "hello %llu cafe %llu world %llu", (unsigned long long)wp_counts_get(c, "hello", 5),
          (unsigned long long)wp_counts_get(c, "cafe", 4), (unsigned long long)wp_counts_get(c, "world", 5));
    CHECK(wp_counts_get(c, "\xe4\xb8\xad", 3) == 1 && wp_counts_get(c, "mask", 4) == 1 && wp_counts_get(c, "[", 1) == 1,
          "CJK characters and the brackets of [MASK] are words of their own");
    CHECK(wp_counts_total(c) == 12 && wp_counts_unique(c) == 10, "%llu words, %zu distinct; want 12, 10",
          (unsigned long long)wp_counts_total(c), wp_counts_unique(c));
    wp_counts_free(c);
    c = wp_counts_new(0);
    wp_counts_add_text(c, text, strlen(text));
    CHECK(wp_counts_get(c, "Hello", 5) == 1 && wp_counts_get(c, "Caf\xc3\xa9", 5) == 1, "cased counts keep case and accents");
    wp_counts_free(c);
}

static void test_corpus(const char *path, const char *dir) {
    size_t len;
    char *text = mlm_read_file(path, &len);
    CHECK(text != NULL, "cannot read %s", path);
    if (!text) return;
    enum { SIZE = 2000 };
    WpCounts *whole = wp_counts_new(1), *part[3];
    wp_counts_add_text(whole, text, len);
    // The same counts from three pieces cut at newlines, merged (as `mlm vocab` counts on several threads).
    size_t cut1 = len / 3, cut2 = 2 * len / 3;
    while (text[cut1] != '\n') cut1++;
    while (text[cut2] != '\n') cut2++;
    size_t from[3] = {0, cut1, cut2}, to[3] = {cut1, cut2, len};
    for (int i = 0; i < 3; i++) {
        part[i] = wp_counts_new(1);
        wp_counts_add_text(part[i], text + from[i], to[i] - from[i]);
        if (i) wp_counts_merge(part[0], part[i]);
    }
    WpTrainConfig cfg = {.vocab_size = SIZE, .min_frequency = 2, .limit_alphabet = 1000};
    WpVocabOut a, b, m;
    char err[512];
    CHECK(wp_train(whole, &cfg, &a, err, sizeof err) == 0, "%s", err);
    CHECK(wp_train(whole, &cfg, &b, err, sizeof err) == 0, "%s", err);
    CHECK(wp_train(part[0], &cfg, &m, err, sizeof err) == 0, "%s", err);
    CHECK(wp_counts_total(part[0]) == wp_counts_total(whole) && wp_counts_unique(part[0]) == wp_counts_unique(whole),
          "merged counts: %llu words, whole: %llu", (unsigned long long)wp_counts_total(part[0]),
          (unsigned long long)wp_counts_total(whole));
    CHECK(a.n == SIZE, "%zu tokens, asked for %d", a.n, SIZE);
    static const char *const specials[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
    for (int i = 0; i < 5 && i < (int)a.n; i++) CHECK(!strcmp(a.tokens[i], specials[i]), "token %d is %s", i, a.tokens[i]);
    int same_ab = a.n == b.n, same_am = a.n == m.n;
    for (size_t i = 0; i < a.n && same_ab; i++) same_ab = !strcmp(a.tokens[i], b.tokens[i]);
    for (size_t i = 0; i < a.n && same_am; i++) same_am = !strcmp(a.tokens[i], m.tokens[i]);
    CHECK(same_ab, "two trainings on the same counts differ");
    CHECK(same_am, "training on counts merged from pieces differs from the whole");

    // The written vocab.txt loads (no duplicates: wp_load rejects them) and tokenizes the corpus without [UNK]:
    // every character is in the alphabet (65 < limit_alphabet), so every word splits into known pieces.
    char vpath[600];
    snprintf(vpath, sizeof vpath, "%s/vocab.txt", dir);
    CHECK(wp_write_vocab(vpath, a.tokens, a.n, err, sizeof err) == 0, "%s", err);
    WordPiece *wp = wp_load(vpath, 1, err, sizeof err);
    CHECK(wp != NULL, "the written vocabulary does not load: %s", err);
    if (wp) {
        CHECK(wp_vocab_size(wp) == SIZE, "loaded %zu tokens", wp_vocab_size(wp));
        size_t n = wp_encode(wp, text, len, NULL, 0);
        int32_t *ids = malloc(n * sizeof(int32_t));
        wp_encode(wp, text, len, ids, n);
        size_t unk = 0;
        for (size_t i = 0; i < n; i++) unk += ids[i] == wp_id(wp, "[UNK]");
        CHECK(unk == 0, "%zu of %zu tokens are [UNK]", unk, n);
        double tpw = (double)n / (double)wp_counts_total(whole);
        printf("Tiny Shakespeare, %d tokens: %zu tokens for %llu words (%.4f per word)\n", SIZE, n,
               (unsigned long long)wp_counts_total(whole), tpw);
        CHECK(tpw > 1.0 && tpw < 1.5, "tokens per word %.4f outside (1, 1.5) at size %d", tpw, SIZE);
        free(ids);
        wp_free(wp);
    }
    // A write into a missing directory fails with a message and leaves nothing behind.
    char bad[700];
    snprintf(bad, sizeof bad, "%s/missing/vocab.txt", dir);
    CHECK(wp_write_vocab(bad, a.tokens, a.n, err, sizeof err) != 0 && strstr(err, "missing"), "bad path: %s", err);
    unlink(vpath);
    wp_vocab_out_free(&a);
    wp_vocab_out_free(&b);
    wp_vocab_out_free(&m);
    for (int i = 0; i < 3; i++) wp_counts_free(part[i]);
    wp_counts_free(whole);
    free(text);
}

int main(int argc, char **argv) {
    test_toy();
    test_counting();
    const char *corpus = test_corpus_path(argc, argv);
    if (corpus) {
        char dir[] = "/tmp/mlm_wptrain_XXXXXX";
        CHECK(mkdtemp(dir) != NULL, "mkdtemp");
        test_corpus(corpus, dir);
        rmdir(dir);
    }
    return test_finish("test_wordpiece_train");
}
