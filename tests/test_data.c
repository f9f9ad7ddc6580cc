// test_data.c: tokenizer on known text, UTF-8 handling, split sizes of the real corpus, and the batcher.
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/data.h"
#include "test_util.h"

static void test_tokenizer(void) {
    const char *text = "hello world\n";
    uint32_t *cps;
    char err[256];
    long n = utf8_decode(text, strlen(text), &cps, err, sizeof(err));
    CHECK(n == 12, "decoded %ld code points", n);
    Vocab v;
    CHECK(vocab_build(&v, cps, (size_t)n, err, sizeof(err)) == 0, "%s", err);
    // sorted(set("hello world\n")) = ['\n', ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']
    CHECK(v.n_chars == 9 && v.pad_id == 9 && v.mask_id == 10 && v.n_tokens == 11, "sizes %d %d %d %d", v.n_chars,
          v.pad_id, v.mask_id, v.n_tokens);
    int ids[12];
    size_t k = vocab_encode(&v, cps, (size_t)n, ids);
    const int expect[12] = {4, 3, 5, 5, 6, 1, 8, 6, 7, 5, 2, 0};
    CHECK(k == 12 && memcmp(ids, expect, sizeof(expect)) == 0, "ids of 'hello world\\n'");
    free(cps);
    // Characters outside the vocabulary are dropped, as the reference's text_to_i does.
    n = utf8_decode("hex!", 4, &cps, err, sizeof(err));
    k = vocab_encode(&v, cps, (size_t)n, ids);
    CHECK(k == 2 && ids[0] == 4 && ids[1] == 3, "unknown characters dropped (%zu kept)", k);
    free(cps);
    // Multi-byte UTF-8 and round trip of the encoder.
    const char *u = "a\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";  // a é € 😀
    n = utf8_decode(u, strlen(u), &cps, err, sizeof(err));
    CHECK(n == 4 && cps[1] == 0xe9 && cps[2] == 0x20ac && cps[3] == 0x1f600, "multi-byte decode (%ld)", n);
    char buf[8];
    utf8_encode(0x20ac, buf);
    CHECK(strcmp(buf, "\xe2\x82\xac") == 0, "encode euro");
    free(cps);
    // Invalid UTF-8 is refused: a lone continuation byte, a truncated sequence, an overlong encoding.
    CHECK(utf8_decode("a\x80", 2, &cps, err, sizeof(err)) < 0, "lone continuation accepted");
    CHECK(utf8_decode("a\xe2\x82", 3, &cps, err, sizeof(err)) < 0, "truncated sequence accepted");
    CHECK(utf8_decode("\xc0\xaf", 2, &cps, err, sizeof(err)) < 0, "overlong encoding accepted");
    char md5[33];
    data_md5("The quick brown fox jumps over the lazy dog", 43, md5);
    CHECK(strcmp(md5, "9e107d9d372bb6826bd81d3542a419d6") == 0, "md5 of the fox: %s", md5);
}

static void test_corpus(const char *path) {
    char md5[33];
    CHECK(data_md5_file(path, md5) == 0 && strcmp(md5, CORPUS_MD5) == 0, "corpus md5 %s", md5);
    Corpus c;
    corpus_load(&c, path, 0.9, 32);
    CHECK(c.n_chars_total == 1115394, "N = %zu", c.n_chars_total);
    CHECK(c.n_train == 1003854 && c.n_valid == 111540, "split %zu / %zu", c.n_train, c.n_valid);
    CHECK(c.vocab.n_chars == 65 && c.vocab.n_tokens == 67 && c.vocab.pad_id == 65 && c.vocab.mask_id == 66,
          "vocab %d chars, %d tokens", c.vocab.n_chars, c.vocab.n_tokens);
    CHECK(c.vocab.chars[0] == '\n' && c.vocab.chars[1] == ' ', "id 0 = newline, id 1 = space");
    CHECK(c.train[0] == vocab_id(&c.vocab, 'F'), "corpus starts with 'First Citizen'");

    // Train batcher: 31,370 sequences, 491 batches, the last of 10.
    Batcher b;
    batcher_init(&b, c.train, c.n_train, 32, 64, 1, 42, 0);
    CHECK(b.n_items == 31370 && b.n_batches == 491, "train items %zu batches %zu", b.n_items, b.n_batches);
    batcher_set_epoch(&b, 0);
    int *seen = calloc(b.n_items, sizeof(int));
    int *batch = malloc(64 * 32 * sizeof(int));
    int last_size = 0, bad_slices = 0, bad_offsets = 0;
    for (size_t i = 0; i < b.n_batches; i++) {
        int bs = batcher_get(&b, i, batch);
        last_size = bs;
        for (int r = 0; r < bs; r++) {
            size_t pos = i * 64 + (size_t)r, item = b.order[pos];
            seen[item]++;
            size_t start = batcher_item_start(&b, pos);
            // Offsets follow the reference: r in [0, min(T - 1, N - (item*T + T + 1))].
            size_t lo = item * 32, hi = lo + MLM_MIN((size_t)31, c.n_train - (item * 32 + 33));
            if (start < lo || start > hi) bad_offsets++;
            if (memcmp(batch + r * 32, c.train + start, 32 * sizeof(int)) != 0) bad_slices++;
        }
    }
    int missing = 0, repeated = 0;
    for (size_t i = 0; i < b.n_items; i++) {
        if (seen[i] == 0) missing++;
        if (seen[i] > 1) repeated++;
    }
    CHECK(last_size == 10, "last batch %d", last_size);
    CHECK(missing == 0 && repeated == 0, "epoch visits every item once (%d missing, %d repeated)", missing, repeated);
    CHECK(bad_slices == 0 && bad_offsets == 0, "%d sequences not slices, %d offsets out of range", bad_slices, bad_offsets);

    // Same seed, same order and offsets; another epoch, another order.
    size_t *order0 = malloc(b.n_items * sizeof(size_t));
    int *off0 = malloc(b.n_items * sizeof(int));
    memcpy(order0, b.order, b.n_items * sizeof(size_t));
    memcpy(off0, b.offsets, b.n_items * sizeof(int));
    Batcher b2;
    batcher_init(&b2, c.train, c.n_train, 32, 64, 1, 42, 0);
    batcher_set_epoch(&b2, 0);
    CHECK(memcmp(order0, b2.order, b.n_items * sizeof(size_t)) == 0 && memcmp(off0, b2.offsets, b.n_items * sizeof(int)) == 0,
          "same seed gives the same epoch");
    batcher_set_epoch(&b2, 1);
    CHECK(memcmp(order0, b2.order, b.n_items * sizeof(size_t)) != 0, "epoch 1 has a new order");
    batcher_set_epoch(&b2, 0);  // any epoch can be regenerated out of order (resume)
    CHECK(memcmp(order0, b2.order, b.n_items * sizeof(size_t)) == 0, "epoch 0 regenerated after epoch 1");
    Batcher b3;
    batcher_init(&b3, c.train, c.n_train, 32, 64, 1, 43, 0);
    batcher_set_epoch(&b3, 0);
    CHECK(memcmp(order0, b3.order, b.n_items * sizeof(size_t)) != 0, "another seed, another order");
    // Offsets are spread over their whole range (mean of r near 15.5 for T = 32).
    double mean_r = 0;
    for (size_t i = 0; i < b.n_items - 1; i++) mean_r += off0[i];
    mean_r /= (double)(b.n_items - 1);
    // sd of U{0..31} is 9.23; 5 sd of the mean of 31,369 draws is 0.26.
    CHECK(mean_r > 15.5 - 0.26 && mean_r < 15.5 + 0.26, "mean offset %.3f", mean_r);

    Batcher v;
    batcher_init(&v, c.valid, c.n_valid, 32, 64, 1, 42, 1);
    CHECK(v.n_items == 3485 && v.n_batches == 55, "valid items %zu batches %zu", v.n_items, v.n_batches);
    batcher_free(&v);
    batcher_free(&b);
    batcher_free(&b2);
    batcher_free(&b3);
    free(seen); free(batch); free(order0); free(off0);
    corpus_free(&c);
}

int main(int argc, char **argv) {
    test_tokenizer();
    const char *corpus = test_corpus_path(argc, argv);
    if (corpus) test_corpus(corpus);
    else printf("note: corpus tests not run (see above)\n");
    int rc = test_finish("test_data");
    return rc ? rc : (corpus ? 0 : test_skip("corpus not available; the tokenizer checks passed"));
}
