// wp_encode_tool.c: prints the WordPiece ids of each line of a file (one output line per input line, ids
// separated by spaces), for the comparison with Hugging Face in test_wordpiece_hf.py.
// Usage: wp_encode_tool VOCAB.txt TEXT_FILE [--cased]
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/wordpiece.h"

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s VOCAB.txt TEXT_FILE [--cased]\n", argv[0]); return 2; }
    char err[512];
    WordPiece *wp = wp_load(argv[1], !(argc > 3 && strcmp(argv[3], "--cased") == 0), err, sizeof err);
    if (!wp) { fprintf(stderr, "%s\n", err); return 1; }
    FILE *f = fopen(argv[2], "rb");
    if (!f) { perror(argv[2]); return 1; }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)len + 1);
    if (!text || fread(text, 1, (size_t)len, f) != (size_t)len) { fprintf(stderr, "%s: read failed\n", argv[2]); return 1; }
    fclose(f);
    size_t cap = 1 << 16;
    int32_t *ids = malloc(cap * sizeof *ids);
    for (char *s = text, *end = text + len; s <= end;) {
        char *nl = memchr(s, '\n', (size_t)(end - s));
        size_t n = nl ? (size_t)(nl - s) : (size_t)(end - s);
        size_t k = wp_encode(wp, s, n, ids, cap);
        if (k > cap) {
            cap = k;
            ids = realloc(ids, cap * sizeof *ids);
            wp_encode(wp, s, n, ids, cap);
        }
        for (size_t i = 0; i < k; i++) printf(i ? " %d" : "%d", ids[i]);
        putchar('\n');
        s += n + 1;
    }
    free(ids); free(text); wp_free(wp);
    return 0;
}
