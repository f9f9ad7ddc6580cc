// vocab.c: `mlm vocab`: train a WordPiece vocabulary (vocab.txt) from text files or standard input, by the
// algorithm of Hugging Face's WordPieceTrainer (wordpiece_train.c), with BertWordPieceTokenizer's defaults.
#define _GNU_SOURCE  // getopt_long
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <dirent.h>
#include <omp.h>
#include <sys/stat.h>

#include "mlm/common.h"
#include "mlm/input_files.h"
#include "mlm/shards.h"
#include "mlm/wordpiece_train.h"

// Read and count the input in blocks of this size (MLM_VOCAB_BLOCK_BYTES overrides it, for the tests).
#define BLOCK_BYTES ((size_t)64 << 20)

static size_t block_bytes(void) {
    const char *s = getenv("MLM_VOCAB_BLOCK_BYTES");
    long v;
    if (!s || !*s) return BLOCK_BYTES;
    if (mlm_parse_long(s, 16, 1L << 40, &v))
        mlm_fatal(MLM_EXIT_USAGE, "MLM_VOCAB_BLOCK_BYTES=%s: expected a number of bytes from 16", s);
    return (size_t)v;
}

static void usage_vocab(FILE *f) {
    fputs("usage: mlm vocab --size N --out vocab.txt [OPTIONS] FILE|DIR... | -\n\n"
          "Train a WordPiece vocabulary of N tokens on UTF-8 text: files, the files under directories (recursively,\n"
          "hidden ones skipped) or standard input (-). The algorithm is Hugging Face tokenizers' WordPieceTrainer:\n"
          "the BERT basic tokenizer splits the text into words; the vocabulary is [PAD] [UNK] [CLS] [SEP] [MASK],\n"
          "the characters, then BPE-style merges of word pieces (\"##\" marks a piece that continues a word) until\n"
          "N tokens. Writes vocab.txt in BERT's format (one token per line, id = line - 1), which Hugging Face and\n"
          "mlm's WordPiece tokenizer load. The defaults are BertWordPieceTokenizer.train's.\n\n"
          "options:\n"
          "  -n, --size N             vocabulary size (required; BERT: 30522)\n"
          "  -o, --out PATH           where to write vocab.txt (required; written atomically)\n"
          "      --lowercase          lower-case and strip accents, as BERT uncased (the default)\n"
          "      --no-lowercase       keep case and accents (BERT cased)\n"
          "      --min-frequency F    merge only pairs seen at least F times (default 2)\n"
          "      --limit-alphabet K   keep the K most frequent characters (default 1000; 0: all)\n"
          "      --threads T          threads for counting words (default: OpenMP's)\n"
          "  -q, --quiet              no progress\n"
          "  -h, --help               this help\n", f);
}

typedef struct {
    size_t size;
    const char *out;
    int lower, quiet, threads;
    uint64_t min_frequency;
    size_t limit_alphabet;
} VocabOptions;

typedef struct {
    WpCounts **per_thread;  // one counter per thread, merged at the end
    int threads;
    size_t bytes;           // counted so far
    double t0;
    int quiet, tty;
} Counting;

static void show_count_progress(const Counting *k, int final) {
    if (k->quiet || (!k->tty && !final)) return;
    double dt = mlm_now() - k->t0, mb = (double)k->bytes / 1e6;
    fprintf(stderr, "%scounting words: %.1f MB, %.1f MB/s%s", k->tty ? "\r" : "", mb, dt > 0 ? mb / dt : 0.0,
            final ? "\n" : "");
}

// ASCII bytes the BERT basic tokenizer always treats as word ends (a cut after one splits no word).
static int is_word_end(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// The end of the last word end in buf[0..n), 0 if there is none.
static size_t last_cut(const char *buf, size_t n) {
    for (size_t i = n; i > 0; i--)
        if (is_word_end(buf[i - 1])) return i;
    return 0;
}

// Count the words of buf[0..n) (complete words only) on every thread: n split at word ends.
static int count_block(Counting *k, const char *buf, size_t n) {
    int T = k->threads, oom = 0;
    size_t *cut = malloc((size_t)(T + 1) * sizeof(size_t));
    if (!cut) return -1;
    cut[0] = 0;
    for (int t = 1; t < T; t++) {
        size_t c = MLM_MAX(cut[t - 1], n * (size_t)t / (size_t)T);
        while (c < n && !is_word_end(buf[c])) c++;
        cut[t] = c < n ? c + 1 : n;
    }
    cut[T] = n;
#pragma omp parallel for num_threads(T) schedule(static, 1) reduction(| : oom)
    for (int t = 0; t < T; t++)
        oom |= wp_counts_add_text(k->per_thread[t], buf + cut[t], cut[t + 1] - cut[t]) != 0;
    free(cut);
    k->bytes += n;
    show_count_progress(k, 0);
    return oom ? -1 : 0;
}

// Stream one file (or stdin) through count_block, carrying a partial word from one block to the next.
static int count_stream(Counting *k, FILE *f, const char *name) {
    size_t cap = block_bytes(), len = 0;
    char *buf = malloc(cap);
    if (!buf) mlm_fatal(MLM_EXIT_FAILURE, "out of memory for a %zu MB read buffer", cap >> 20);
    for (;;) {
        size_t got = fread(buf + len, 1, cap - len, f);
        len += got;
        int eof = got == 0 || feof(f);
        if (ferror(f)) {
            free(buf);
            mlm_fatal(MLM_EXIT_FAILURE, "%s: read error: %s", name, strerror(errno));
        }
        size_t use = eof ? len : last_cut(buf, len);
        if (use == 0 && !eof && len == cap) {  // one word longer than the buffer: grow it
            char *nb = realloc(buf, cap *= 2);
            if (!nb) { free(buf); mlm_fatal(MLM_EXIT_FAILURE, "%s: out of memory for a word of over %zu MB", name, cap >> 21); }
            buf = nb;
            continue;
        }
        if (use && count_block(k, buf, use)) {
            free(buf);
            mlm_fatal(MLM_EXIT_FAILURE, "out of memory while counting words (%zu MB read)", k->bytes >> 20);
        }
        memmove(buf, buf + use, len - use);
        len -= use;
        if (eof && len == 0) break;
    }
    free(buf);
    return 0;
}

static void show_merge_progress(void *ctx, size_t now, size_t target) {
    const Counting *k = ctx;
    if (k->quiet || !k->tty) return;
    fprintf(stderr, "\rtraining: %zu / %zu tokens", now, target);
}

static int parse_size(const char *opt, const char *s, long min, long max, long *out) {
    int r = mlm_parse_long(s, min, max, out);
    if (r == 1) mlm_fatal(MLM_EXIT_USAGE, "%s %s: expected a whole number", opt, s);
    if (r == 2) mlm_fatal(MLM_EXIT_USAGE, "%s %s: must be between %ld and %ld", opt, s, min, max);
    return 0;
}

// The directory of path must exist and be writable, so that a long training does not end in a failed write.
static void check_out_dir(const char *path) {
    char *copy = mlm_strdup(path);
    const char *dir = dirname(copy);
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        mlm_fatal(MLM_EXIT_USAGE, "--out %s is a directory; give the file to write, e.g. %s/vocab.txt", path, path);
    if (access(dir, W_OK) != 0)
        mlm_fatal(MLM_EXIT_USAGE, "--out %s: cannot write in %s: %s", path, dir, strerror(errno));
    free(copy);
}

int vocab_command(int argc, char **argv) {
    VocabOptions o = {.lower = 1, .min_frequency = 2, .limit_alphabet = 1000};
    enum { OPT_LOWER = 1000, OPT_NO_LOWER, OPT_MIN_FREQ, OPT_LIMIT_ALPHA, OPT_THREADS };
    static const struct option longopts[] = {
        {"size", required_argument, 0, 'n'},       {"out", required_argument, 0, 'o'},
        {"lowercase", no_argument, 0, OPT_LOWER},  {"no-lowercase", no_argument, 0, OPT_NO_LOWER},
        {"min-frequency", required_argument, 0, OPT_MIN_FREQ},
        {"limit-alphabet", required_argument, 0, OPT_LIMIT_ALPHA},
        {"threads", required_argument, 0, OPT_THREADS},
        {"quiet", no_argument, 0, 'q'},            {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    long v;
    int ch;
    while ((ch = getopt_long(argc, argv, "n:o:qh", longopts, NULL)) != -1) {
        switch (ch) {
        case 'n': parse_size("--size", optarg, 1, 1L << 31, &v); o.size = (size_t)v; break;
        case 'o': o.out = optarg; break;
        case OPT_LOWER: o.lower = 1; break;
        case OPT_NO_LOWER: o.lower = 0; break;
        case OPT_MIN_FREQ: parse_size("--min-frequency", optarg, 0, 1L << 62, &v); o.min_frequency = (uint64_t)v; break;
        case OPT_LIMIT_ALPHA: parse_size("--limit-alphabet", optarg, 0, 0x110000, &v); o.limit_alphabet = (size_t)v; break;
        case OPT_THREADS: parse_size("--threads", optarg, 1, 4096, &v); o.threads = (int)v; break;
        case 'q': o.quiet = 1; break;
        case 'h': usage_vocab(stdout); return 0;
        default: usage_vocab(stderr); return MLM_EXIT_USAGE;
        }
    }
    if (!o.size) mlm_fatal(MLM_EXIT_USAGE, "mlm vocab: --size N is required (the vocabulary size, e.g. 30522)");
    if (!o.out) mlm_fatal(MLM_EXIT_USAGE, "mlm vocab: --out PATH is required (where to write vocab.txt)");
    if (optind >= argc)
        mlm_fatal(MLM_EXIT_USAGE, "mlm vocab: no input; give text files, or - to read standard input");
    check_out_dir(o.out);
    // Regular files, pipes named here, each file once however many links lead to it; shard sets left out.
    InputFiles inputs = {0};
    InputRules rules = {.set_marker = SHARD_MANIFEST};
    for (int i = optind; i < argc; i++) input_files_add(&inputs, argv[i], &rules);
    if (!o.quiet) input_files_report(&inputs, "mlm vocab");
    if (inputs.n == 0) mlm_fatal(MLM_EXIT_USAGE, "mlm vocab: the directories given hold no files");

    Counting k = {.threads = o.threads ? o.threads : omp_get_max_threads(), .t0 = mlm_now(), .quiet = o.quiet,
                  .tty = isatty(2)};
    k.per_thread = mlm_calloc((size_t)k.threads, sizeof(WpCounts *), "word counters");
    for (int t = 0; t < k.threads; t++)
        if (!(k.per_thread[t] = wp_counts_new(o.lower))) mlm_fatal(MLM_EXIT_FAILURE, "out of memory");
    for (size_t i = 0; i < inputs.n; i++) {
        const char *path = inputs.paths[i];
        int is_stdin = !strcmp(path, "-");
        FILE *f = is_stdin ? stdin : fopen(path, "rb");
        if (!f) mlm_fatal(MLM_EXIT_FAILURE, "%s: %s", path, strerror(errno));
        count_stream(&k, f, is_stdin ? "standard input" : path);
        if (!is_stdin) fclose(f);
    }
    input_files_free(&inputs);
    for (int t = 1; t < k.threads; t++) {
        if (wp_counts_merge(k.per_thread[0], k.per_thread[t]))
            mlm_fatal(MLM_EXIT_FAILURE, "out of memory while merging the word counts");
        wp_counts_free(k.per_thread[t]);
    }
    WpCounts *counts = k.per_thread[0];
    free(k.per_thread);
    show_count_progress(&k, 1);
    if (wp_counts_total(counts) == 0) mlm_fatal(MLM_EXIT_FAILURE, "the input has no words; nothing to train on");
    if (!o.quiet)
        fprintf(stderr, "%llu words, %zu distinct (%s)\n", (unsigned long long)wp_counts_total(counts),
                wp_counts_unique(counts), o.lower ? "lower-cased, accents stripped" : "cased");

    double t1 = mlm_now();
    WpTrainConfig cfg = {.vocab_size = o.size, .min_frequency = o.min_frequency, .limit_alphabet = o.limit_alphabet,
                         .progress = show_merge_progress, .progress_ctx = &k};
    WpVocabOut out;
    char err[512];
    if (wp_train(counts, &cfg, &out, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    wp_counts_free(counts);
    if (!o.quiet && k.tty) fputc('\n', stderr);
    if (wp_write_vocab(o.out, out.tokens, out.n, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    if (!o.quiet) {
        fprintf(stderr, "wrote %s: %zu tokens (%zu specials, %zu characters, %zu merges) in %.1f s of training\n",
                o.out, out.n, out.n_specials, out.n_alphabet, out.n_merges, mlm_now() - t1);
        if (out.n < o.size)
            fprintf(stderr, "note: fewer than the %zu tokens asked for: no pair left seen at least %llu times "
                            "(--min-frequency) in this corpus\n", o.size, (unsigned long long)o.min_frequency);
        else if (out.n > o.size)
            fprintf(stderr, "note: more than the %zu tokens asked for: the specials, characters and their ## forms "
                            "alone are %zu (lower --limit-alphabet)\n", o.size, out.n);
    }
    wp_vocab_out_free(&out);
    return 0;
}
