// prepare.c: `mlm prepare`: text files, directories or standard input -> token shards and a manifest.
//
// The input is streamed: documents (a file each, or blank-line-separated blocks) are cut into pieces of at
// most PIECE_BYTES at points where the tokenizer's output cannot change (after ASCII whitespace for
// WordPiece, at a character boundary for char, anywhere for byte), pieces are gathered into batches of about
// BATCH_BYTES, each batch is tokenized on every core (OpenMP, one piece per task) and written in input order.
// So the output is the same whatever the thread count, and memory is bounded by the batch, not the corpus.
#define _GNU_SOURCE  // getopt_long
#include <dirent.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/shards.h"
#include "mlm/wordpiece.h"

#define PIECE_BYTES (256 * 1024)
#define BATCH_BYTES (16u * 1024 * 1024)
#define READ_BYTES (4u * 1024 * 1024)
#define BYTE_VOCAB_TEXT "mlm byte vocabulary 1: ids 0..255 = byte values, 256..260 = [PAD] [UNK] [CLS] [SEP] [MASK]"

typedef struct {
    // options
    int tokenizer;             // TokenizerKind
    const char *vocab_path;    // --vocab (wordpiece)
    int lowercase;             // -1: unset (wordpiece default: on)
    int blank_docs;            // --documents blank
    const char *out_dir;
    uint64_t shard_tokens;
    double valid_fraction;
    uint64_t seed;
    int threads, force, quiet;
    char **inputs;
    int n_inputs;
    // inputs expanded to files ("-" = standard input)
    char **files;
    int n_files;
    uint64_t total_bytes;      // 0 when unknown (stdin)
    char *stdin_spool;         // char tokenizer on stdin: a copy in the output directory (two passes)
    // tokenizer state
    WordPiece *wp;
    Vocab cv;                  // char vocabulary
    uint8_t vocab_md5[16];
    Manifest man;
    // batch of pieces
    char *text;                // [BATCH_BYTES + PIECE_BYTES]
    size_t text_len;
    struct Piece { uint64_t doc; size_t off, len; int starts_doc; size_t n_ids; } *pieces;
    int n_pieces, cap_pieces;
    int32_t *ids;              // [text capacity] ids of every piece at its text offset (tokens <= bytes)
    // document state
    uint64_t doc;              // ordinal of the current document (all documents, empty ones included)
    int in_doc, doc_started;   // a document is open / its first non-empty piece was written
    // writers
    ShardWriter w[2];          // train, valid
    int w_open[2], w_index[2];
    uint64_t docs[2], tokens[2];
    // progress
    uint64_t bytes_done;
    double t0, t_last;
    const char *cur_file;
} Prep;

static void usage_prepare(FILE *f) {
    fputs("usage: mlm prepare [OPTIONS] --out DIR INPUT...\n\n"
          "Tokenize UTF-8 text into binary token shards and a manifest (DIR/manifest.txt) for `mlm train\n"
          "--set data.path=DIR`. INPUT: files, directories (every file below them, in name order) or - for\n"
          "standard input. Streams the text (memory stays bounded) and tokenizes on every core; the shards are\n"
          "the same whatever the thread count.\n\n"
          "options:\n"
          "  -o, --out DIR            output directory (created; refused if it holds a shard set, see --force)\n"
          "  -t, --tokenizer KIND     char (the reference's: one id per character of the corpus, sorted), byte\n"
          "                           (256 byte values + [PAD] [UNK] [CLS] [SEP] [MASK]) or wordpiece (default: char)\n"
          "      --vocab FILE         a BERT vocab.txt (wordpiece; copied into DIR)\n"
          "      --lowercase          lower-case and strip accents (BERT uncased; wordpiece default)\n"
          "      --no-lowercase       keep case and accents (BERT cased)\n"
          "      --documents MODE     file: one document per file (default); blank: blank-line-separated blocks\n"
          "      --shard-tokens N     tokens per shard (default 67108864)\n"
          "      --valid-fraction F   share of documents held out for validation, drawn per document from\n"
          "                           --seed (default 0.05; 0: none)\n"
          "      --seed N             seed of the train/valid split (default 1234)\n"
          "      --threads N          threads (default: every core)\n"
          "      --force              replace an existing shard set in DIR\n"
          "  -q, --quiet              no progress line\n"
          "  -h, --help               this help\n", f);
}

// ---------------------------------------------------------------------------------------------------------
// Inputs

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void add_file(Prep *p, const char *path) {
    p->files = realloc(p->files, (size_t)(p->n_files + 1) * sizeof(char *));
    if (!p->files) mlm_fatal(MLM_EXIT_FAILURE, "out of memory listing inputs");
    p->files[p->n_files++] = mlm_strdup(path);
}

// Every regular file below dir (hidden names skipped), in name order, so the shards do not depend on the
// order the file system lists them in.
static void add_dir(Prep *p, const char *dir) {
    DIR *d = opendir(dir);
    if (!d) mlm_fatal(MLM_EXIT_USAGE, "cannot read directory %s: %s", dir, strerror(errno));
    char **names = NULL;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        names = realloc(names, (size_t)(n + 1) * sizeof(char *));
        if (!names) mlm_fatal(MLM_EXIT_FAILURE, "out of memory listing %s", dir);
        names[n++] = mlm_strdup(e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof(char *), cmp_str);
    for (int i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/%s", dir, names[i]);
        struct stat st;
        if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) add_dir(p, path);
        else if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) add_file(p, path);
        free(names[i]);
    }
    free(names);
}

static void expand_inputs(Prep *p) {
    int have_stdin = 0;
    for (int i = 0; i < p->n_inputs; i++) {
        const char *in = p->inputs[i];
        struct stat st;
        if (!strcmp(in, "-")) {
            if (have_stdin++) mlm_fatal(MLM_EXIT_USAGE, "standard input (-) given twice");
            add_file(p, "-");
            continue;
        }
        if (stat(in, &st) != 0) mlm_fatal(MLM_EXIT_USAGE, "cannot read input %s: %s", in, strerror(errno));
        if (S_ISDIR(st.st_mode)) add_dir(p, in);
        else add_file(p, in);
    }
    if (p->n_files == 0) mlm_fatal(MLM_EXIT_USAGE, "the inputs hold no files; give text files, directories or -");
    for (int i = 0; i < p->n_files; i++) {
        struct stat st;
        if (strcmp(p->files[i], "-") && stat(p->files[i], &st) == 0) p->total_bytes += (uint64_t)st.st_size;
        else if (!strcmp(p->files[i], "-")) p->total_bytes = 0, i = p->n_files;  // unknown
    }
    if (have_stdin) p->total_bytes = 0;
}

static FILE *open_input(const Prep *p, const char *path) {
    if (!strcmp(path, "-")) return stdin;
    FILE *f = fopen(path, "rb");
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot read %s: %s", path, strerror(errno));
    return f;
}

// The char tokenizer needs two passes (the vocabulary is every character of the corpus), so standard input is
// first copied into the output directory.
static void spool_stdin(Prep *p) {
    for (int i = 0; i < p->n_files; i++) {
        if (strcmp(p->files[i], "-")) continue;
        char path[1200];
        snprintf(path, sizeof(path), "%s/.stdin.part", p->out_dir);
        FILE *f = fopen(path, "wb");
        if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot create %s: %s", path, strerror(errno));
        char *buf = mlm_malloc(READ_BYTES, "read buffer");
        size_t n;
        while ((n = fread(buf, 1, READ_BYTES, stdin)) > 0)
            if (fwrite(buf, 1, n, f) != n) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
        free(buf);
        if (fclose(f) != 0) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
        free(p->files[i]);
        p->files[i] = mlm_strdup(path);
        p->stdin_spool = mlm_strdup(path);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Vocabularies

static void md5_raw(const char hex[33], uint8_t out[16]) {
    for (int i = 0; i < 16; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (uint8_t)v;
    }
}

// Char: the sorted distinct code points of every input (the reference's sorted(set(text))).
static void build_char_vocab(Prep *p) {
    uint8_t *seen = mlm_calloc(0x110000, 1, "code point set");
    char *buf = mlm_malloc(READ_BYTES + 8, "read buffer");
    for (int i = 0; i < p->n_files; i++) {
        FILE *f = open_input(p, p->files[i]);
        size_t carry = 0, n;
        uint64_t pos = 0;
        while ((n = fread(buf + carry, 1, READ_BYTES, f)) > 0 || carry) {
            size_t len = carry + n, end = len;
            if (n > 0) {  // keep an incomplete character for the next read
                size_t k = len;
                while (k > 0 && len - k < 4 && ((unsigned char)buf[k - 1] & 0xc0) == 0x80) k--;
                if (k > 0 && (unsigned char)buf[k - 1] >= 0xc0) end = k - 1;
            }
            uint32_t *cps;
            char err[128];
            long m = utf8_decode(buf, end, &cps, err, sizeof(err));
            if (m < 0) {
                size_t at = 0;
                sscanf(err, "invalid UTF-8 at byte %zu", &at);
                mlm_fatal(MLM_EXIT_FAILURE, "%s: invalid UTF-8 at byte %" PRIu64 "; the char tokenizer needs UTF-8 text "
                          "(the byte tokenizer takes anything)", p->files[i], pos + at);
            }
            for (long k = 0; k < m; k++) seen[cps[k]] = 1;
            free(cps);
            pos += end;
            memmove(buf, buf + end, len - end);
            carry = len - end;
            if (n == 0) break;
        }
        if (f != stdin) fclose(f);
    }
    free(buf);
    uint32_t *list = mlm_malloc((VOCAB_MAX_CHARS + 1) * sizeof(uint32_t), "character list");
    size_t count = 0;
    for (uint32_t c = 0; c < 0x110000; c++)
        if (seen[c]) {
            if (count == VOCAB_MAX_CHARS)
                mlm_fatal(MLM_EXIT_USAGE, "the text has more than %d distinct characters; use --tokenizer byte or "
                          "wordpiece", VOCAB_MAX_CHARS);
            list[count++] = c;
        }
    free(seen);
    char err[256];
    if (vocab_build(&p->cv, list, count, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "inputs: %s", err);
    free(list);
    p->man.char_codepoints = vocab_codepoints_text(&p->cv);
    data_md5(p->man.char_codepoints, strlen(p->man.char_codepoints), p->man.vocab_md5);
    p->man.vocab_size = (uint32_t)p->cv.n_tokens;
    p->man.pad_id = p->cv.pad_id;
    p->man.mask_id = p->cv.mask_id;
}

static void copy_file_atomic(const char *from, const char *to) {
    size_t len;
    char *text = mlm_read_file(from, &len);
    if (!text) mlm_fatal(MLM_EXIT_FAILURE, "cannot read %s: %s", from, strerror(errno));
    char tmp[1300];
    snprintf(tmp, sizeof(tmp), "%s.part", to);
    FILE *f = fopen(tmp, "wb");
    if (!f || fwrite(text, 1, len, f) != len || fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0 ||
        rename(tmp, to) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", to, strerror(errno));
    free(text);
}

static void load_wordpiece(Prep *p) {
    if (!p->vocab_path) mlm_fatal(MLM_EXIT_USAGE, "--tokenizer wordpiece needs --vocab vocab.txt (a BERT vocabulary, or "
                                  "one trained with `mlm vocab`)");
    char err[512];
    p->wp = wp_load(p->vocab_path, p->lowercase, err, sizeof(err));
    if (!p->wp) mlm_fatal(MLM_EXIT_USAGE, "--vocab: %s", err);
    if (data_md5_file(p->vocab_path, p->man.vocab_md5))
        mlm_fatal(MLM_EXIT_FAILURE, "cannot read %s: %s", p->vocab_path, strerror(errno));
    p->man.vocab_size = (uint32_t)wp_vocab_size(p->wp);
    p->man.pad_id = wp_id(p->wp, "[PAD]");
    p->man.mask_id = wp_id(p->wp, "[MASK]");
    p->man.unk_id = wp_id(p->wp, "[UNK]");
    p->man.cls_id = wp_id(p->wp, "[CLS]");
    p->man.sep_id = wp_id(p->wp, "[SEP]");
    if (p->man.pad_id < 0 || p->man.mask_id < 0)
        mlm_fatal(MLM_EXIT_USAGE, "--vocab %s has no %s token; a masked language model needs [PAD] and [MASK]",
                  p->vocab_path, p->man.pad_id < 0 ? "[PAD]" : "[MASK]");
    char to[1200];
    snprintf(to, sizeof(to), "%s/vocab.txt", p->out_dir);
    copy_file_atomic(p->vocab_path, to);
    snprintf(p->man.vocab, sizeof(p->man.vocab), "vocab.txt");
}

static void setup_vocab(Prep *p) {
    Manifest *m = &p->man;
    m->unk_id = m->cls_id = m->sep_id = -1;
    if (p->tokenizer == TOKENIZER_CHAR) {
        build_char_vocab(p);
    } else if (p->tokenizer == TOKENIZER_BYTE) {
        data_md5(BYTE_VOCAB_TEXT, strlen(BYTE_VOCAB_TEXT), m->vocab_md5);
        m->vocab_size = BT_VOCAB_SIZE;
        m->pad_id = BT_PAD; m->mask_id = BT_MASK; m->unk_id = BT_UNK; m->cls_id = BT_CLS; m->sep_id = BT_SEP;
        snprintf(m->vocab, sizeof(m->vocab), "bytes");
    } else {
        load_wordpiece(p);
    }
    if (!m->char_codepoints) m->char_codepoints = mlm_strdup(m->vocab);
    m->token_bytes = m->vocab_size <= 65536 ? 2 : 4;
    md5_raw(m->vocab_md5, p->vocab_md5);
}

// ---------------------------------------------------------------------------------------------------------
// Tokenizing one piece

// Char: decode and map every code point (all are in the vocabulary: it was built from these inputs).
static size_t encode_chars(const Vocab *v, const char *s, size_t len, int32_t *ids) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, n = 0;
    while (i < len) {
        uint32_t c = u[i];
        int extra = c < 0x80 ? 0 : c >= 0xf0 ? 3 : c >= 0xe0 ? 2 : 1;
        if (extra) c &= 0x3f >> extra;
        for (int k = 1; k <= extra && i + (size_t)k < len; k++) c = (c << 6) | (u[i + k] & 0x3f);
        ids[n++] = vocab_id(v, c);
        i += (size_t)extra + 1;
    }
    return n;
}

static size_t encode_piece(const Prep *p, const char *s, size_t len, int32_t *ids) {
    if (p->tokenizer == TOKENIZER_BYTE) return bt_encode(s, len, ids, len);
    if (p->tokenizer == TOKENIZER_CHAR) return encode_chars(&p->cv, s, len, ids);
    size_t n = wp_encode(p->wp, s, len, ids, len);
    if (n > len) mlm_fatal(MLM_EXIT_FAILURE, "internal error: WordPiece gave more tokens than bytes");
    return n;
}

// ---------------------------------------------------------------------------------------------------------
// Output: shards, split by document

// Document d goes to the validation split with probability valid_fraction, from a hash of (seed, d): the same
// documents whatever the batch or thread count.
static int doc_is_valid(const Prep *p, uint64_t d) {
    uint64_t x = p->seed ^ (0x9E3779B97F4A7C15ull * (d + 1));
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27; x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return (double)(x >> 11) * 0x1.0p-53 < p->valid_fraction;
}

static void add_manifest_entry(Prep *p, int split, const ShardWriter *w) {
    Manifest *m = &p->man;
    m->shards = realloc(m->shards, (size_t)(m->n_shards + 1) * sizeof(ShardEntry));
    if (!m->shards) mlm_fatal(MLM_EXIT_FAILURE, "out of memory");
    ShardEntry *e = &m->shards[m->n_shards++];
    snprintf(e->split, sizeof(e->split), "%s", split ? "valid" : "train");
    const char *base = strrchr(w->path, '/');
    snprintf(e->file, sizeof(e->file), "%s", base ? base + 1 : w->path);
    e->n_tokens = w->h.n_tokens;
    e->n_docs = w->h.n_docs;
}

static void close_writer(Prep *p, int split) {
    if (!p->w_open[split]) return;
    char err[1400];
    ShardWriter *w = &p->w[split];
    if (w->h.n_docs == 0) shard_writer_begin_doc(w);
    add_manifest_entry(p, split, w);
    p->man.shards[p->man.n_shards - 1].n_docs = w->h.n_docs;
    if (shard_writer_close(w, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    p->w_open[split] = 0;
}

static void open_writer(Prep *p, int split, int continues) {
    char path[1200], err[1400];
    if (p->w_index[split] >= SHARD_MAX_FILES)
        mlm_fatal(MLM_EXIT_USAGE, "more than %d shards; raise --shard-tokens", SHARD_MAX_FILES);
    snprintf(path, sizeof(path), "%s/%s-%05d.bin", p->out_dir, split ? "valid" : "train", p->w_index[split]++);
    if (shard_writer_open(&p->w[split], path, p->man.token_bytes, p->man.vocab_size, p->vocab_md5, continues, err,
                          sizeof(err)))
        mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    p->w_open[split] = 1;
}

static void write_piece(Prep *p, const struct Piece *pc) {
    if (pc->starts_doc) p->doc_started = 0;
    if (pc->n_ids == 0) return;
    int split = doc_is_valid(p, pc->doc);
    ShardWriter *w = &p->w[split];
    if (p->w_open[split] && w->h.n_tokens >= p->shard_tokens) close_writer(p, split);
    if (!p->w_open[split]) open_writer(p, split, p->doc_started);
    if (!p->doc_started || w->h.n_docs == 0) {
        shard_writer_begin_doc(w);
        if (!p->doc_started) p->docs[split]++;
        p->doc_started = 1;
    }
    char err[1400];
    if (shard_writer_append(w, p->ids + pc->off, pc->n_ids, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    p->tokens[split] += pc->n_ids;
}

static void progress(Prep *p, int last) {
    if (p->quiet) return;
    double now = mlm_now();
    if (!last && now - p->t_last < (isatty(STDERR_FILENO) ? 0.5 : 10.0)) return;
    p->t_last = now;
    double mb = (double)p->bytes_done / 1e6, rate = mb / MLM_MAX(now - p->t0, 1e-9);
    char left[64] = "";
    if (p->total_bytes && !last) {
        double s = ((double)p->total_bytes / 1e6 - mb) / MLM_MAX(rate, 1e-9);
        snprintf(left, sizeof(left), " of %.1f MB (%.0f%%), %.0f s left", (double)p->total_bytes / 1e6,
                 100.0 * (double)p->bytes_done / (double)p->total_bytes, s);
    }
    fprintf(stderr, "%sprepare: %.1f MB%s, %.1f MB/s, %" PRIu64 " tokens, %" PRIu64 " documents%s",
            isatty(STDERR_FILENO) ? "\r\x1b[2K" : "", mb, left, rate, p->tokens[0] + p->tokens[1],
            p->docs[0] + p->docs[1], isatty(STDERR_FILENO) && !last ? "" : "\n");
}

// Tokenize every piece of the batch on all cores, then write them in order.
static void flush_batch(Prep *p) {
    int n = p->n_pieces;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        struct Piece *pc = &p->pieces[i];
        pc->n_ids = encode_piece(p, p->text + pc->off, pc->len, p->ids + pc->off);
    }
    for (int i = 0; i < n; i++) write_piece(p, &p->pieces[i]);
    p->n_pieces = 0;
    p->text_len = 0;
    progress(p, 0);
}

static void add_piece(Prep *p, const char *s, size_t len, int starts_doc) {
    if (len == 0 && !starts_doc) return;
    if (p->text_len + len > BATCH_BYTES + PIECE_BYTES || p->n_pieces == p->cap_pieces) flush_batch(p);
    if (p->n_pieces == p->cap_pieces) {
        p->cap_pieces = p->cap_pieces ? 2 * p->cap_pieces : 1024;
        p->pieces = realloc(p->pieces, (size_t)p->cap_pieces * sizeof(*p->pieces));
        if (!p->pieces) mlm_fatal(MLM_EXIT_FAILURE, "out of memory");
    }
    memcpy(p->text + p->text_len, s, len);
    p->pieces[p->n_pieces++] = (struct Piece){.doc = p->doc, .off = p->text_len, .len = len, .starts_doc = starts_doc};
    p->text_len += len;
    if (p->text_len >= BATCH_BYTES) flush_batch(p);
}

// ---------------------------------------------------------------------------------------------------------
// Reading: documents and pieces

static int is_space_byte(unsigned char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

// Where a piece of s[0, limit) may end so that tokenizing the pieces separately gives the same ids as the
// whole: the last such point at or before `limit`, or 0 if there is none. at_end: s[limit] is not read yet
// (the next read continues the text), so a character or word may go on past it.
static size_t safe_cut(const Prep *p, const char *s, size_t limit, int at_end) {
    const unsigned char *u = (const unsigned char *)s;
    if (p->tokenizer == TOKENIZER_BYTE) return limit;
    if (p->tokenizer == TOKENIZER_WORDPIECE) {
        for (size_t k = limit; k > (at_end ? 0 : limit / 2); k--)
            if (is_space_byte(u[k - 1])) return k;
        if (at_end) return 0;
        // A "word" of over PIECE_BYTES / 2 bytes without ASCII whitespace: cut at a character boundary (such a
        // word is [UNK] either way; it gives one more [UNK] per cut).
    }
    if (limit == 0) return 0;
    size_t k = at_end ? limit - 1 : limit;  // at the end the last character may be incomplete: keep it
    while (k > 0 && (u[k] & 0xc0) == 0x80) k--;
    return k;
}

// Text s[0, len) of the current document: emit pieces; with final = 0 keep a tail that may go on in the next
// read. Returns the bytes consumed.
static size_t emit_doc_text(Prep *p, const char *s, size_t len, int final) {
    size_t done = 0;
    while (len - done > PIECE_BYTES || (final && done < len)) {
        size_t take = len - done;
        if (take > PIECE_BYTES) {
            take = safe_cut(p, s + done, PIECE_BYTES, 0);
            if (take == 0) take = PIECE_BYTES;
        }
        add_piece(p, s + done, take, !p->in_doc);
        p->in_doc = 1;
        done += take;
    }
    if (!final && len > done) {
        size_t take = safe_cut(p, s + done, len - done, 1);
        if (take > 0) {
            add_piece(p, s + done, take, !p->in_doc);
            p->in_doc = 1;
            done += take;
        }
    }
    return done;
}

static void end_doc(Prep *p) {
    if (p->in_doc) p->doc++;
    p->in_doc = 0;
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

// Feed s[0, len) of the current file; returns the bytes consumed (the rest is carried to the next read).
static size_t feed(Prep *p, const char *s, size_t len, int eof) {
    if (!p->blank_docs) return emit_doc_text(p, s, len, eof);
    size_t done = 0;
    while (done < len) {
        if (!p->in_doc) {  // skip the blank lines between documents
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
            if (b > 1) done += emit_doc_text(p, s + done, b - 1, 0);
            return done;
        }
        if (b == len - done && !eof) return done + emit_doc_text(p, s + done, len - done, 0);
        emit_doc_text(p, s + done, b, 1);
        end_doc(p);
        done += b;
    }
    return done;
}

static void tokenize_inputs(Prep *p) {
    size_t cap = READ_BYTES + 2 * PIECE_BYTES + 8;
    char *buf = mlm_malloc(cap, "read buffer");
    for (int i = 0; i < p->n_files; i++) {
        p->cur_file = p->files[i];
        FILE *f = open_input(p, p->files[i]);
        size_t carry = 0, n;
        for (;;) {
            n = fread(buf + carry, 1, cap - carry - 1, f);
            int eof = n == 0;
            if (n == 0 && ferror(f)) mlm_fatal(MLM_EXIT_FAILURE, "cannot read %s: %s", p->files[i], strerror(errno));
            size_t len = carry + n;
            size_t used = feed(p, buf, len, eof);
            p->bytes_done += used;
            memmove(buf, buf + used, len - used);
            carry = len - used;
            if (eof) break;
            if (carry >= cap - 1) {  // cannot happen with the cuts above; guard against an endless loop
                p->bytes_done += emit_doc_text(p, buf, carry, 1);
                carry = 0;
            }
        }
        if (!p->blank_docs) end_doc(p);
        if (f != stdin) fclose(f);
    }
    flush_batch(p);
    free(buf);
}

// ---------------------------------------------------------------------------------------------------------

static void prepare_out_dir(Prep *p) {
    if (mkdir(p->out_dir, 0755) != 0 && errno != EEXIST)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot create %s: %s", p->out_dir, strerror(errno));
    char m[1200];
    snprintf(m, sizeof(m), "%s/" SHARD_MANIFEST, p->out_dir);
    if (access(m, F_OK) == 0) {
        if (!p->force)
            mlm_fatal(MLM_EXIT_USAGE, "%s already holds a shard set (%s); choose another --out or pass --force to "
                      "replace it", p->out_dir, m);
        // The old manifest goes first: from here until the new one is written the directory is not a set.
        if (unlink(m) != 0) mlm_fatal(MLM_EXIT_FAILURE, "cannot remove %s: %s", m, strerror(errno));
    }
    // Old shards are removed so that the set holds exactly what the new manifest lists.
    DIR *d = opendir(p->out_dir);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        size_t l = strlen(e->d_name);
        int shard = (!strncmp(e->d_name, "train-", 6) || !strncmp(e->d_name, "valid-", 6)) &&
                    ((l > 4 && !strcmp(e->d_name + l - 4, ".bin")) || (l > 9 && !strcmp(e->d_name + l - 9, ".bin.part")));
        if (!shard) continue;
        char path[1400];
        snprintf(path, sizeof(path), "%s/%s", p->out_dir, e->d_name);
        unlink(path);
    }
    if (d) closedir(d);
}

static uint64_t parse_count(const char *opt, const char *s, uint64_t min, uint64_t max) {
    uint64_t v;
    if (mlm_parse_u64(s, max, &v) || v < min)
        mlm_fatal(MLM_EXIT_USAGE, "%s %s: expected an integer in [%" PRIu64 ", %" PRIu64 "]", opt, s, min, max);
    return v;
}

static void parse_options(Prep *p, int argc, char **argv) {
    enum { O_VOCAB = 256, O_LOWER, O_NOLOWER, O_DOCS, O_SHARD, O_VALID, O_SEED, O_THREADS, O_FORCE };
    static const struct option opts[] = {
        {"out", required_argument, 0, 'o'},        {"tokenizer", required_argument, 0, 't'},
        {"vocab", required_argument, 0, O_VOCAB},  {"lowercase", no_argument, 0, O_LOWER},
        {"no-lowercase", no_argument, 0, O_NOLOWER}, {"documents", required_argument, 0, O_DOCS},
        {"shard-tokens", required_argument, 0, O_SHARD}, {"valid-fraction", required_argument, 0, O_VALID},
        {"seed", required_argument, 0, O_SEED},    {"threads", required_argument, 0, O_THREADS},
        {"force", no_argument, 0, O_FORCE},        {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    p->lowercase = -1;
    p->shard_tokens = 64ull << 20;
    p->valid_fraction = 0.05;
    p->seed = 1234;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "o:t:qh", opts, NULL)) != -1) {
        switch (c) {
        case 'o': p->out_dir = optarg; break;
        case 't':
            if (!strcmp(optarg, "char")) p->tokenizer = TOKENIZER_CHAR;
            else if (!strcmp(optarg, "byte")) p->tokenizer = TOKENIZER_BYTE;
            else if (!strcmp(optarg, "wordpiece")) p->tokenizer = TOKENIZER_WORDPIECE;
            else mlm_fatal(MLM_EXIT_USAGE, "--tokenizer %s: expected char, byte or wordpiece", optarg);
            break;
        case O_VOCAB: p->vocab_path = optarg; break;
        case O_LOWER: p->lowercase = 1; break;
        case O_NOLOWER: p->lowercase = 0; break;
        case O_DOCS:
            if (!strcmp(optarg, "file")) p->blank_docs = 0;
            else if (!strcmp(optarg, "blank")) p->blank_docs = 1;
            else mlm_fatal(MLM_EXIT_USAGE, "--documents %s: expected file or blank", optarg);
            break;
        case O_SHARD: p->shard_tokens = parse_count("--shard-tokens", optarg, 1, 1ull << 40); break;
        case O_VALID: {
            char *end;
            p->valid_fraction = strtod(optarg, &end);
            if (*end || end == optarg || !(p->valid_fraction >= 0 && p->valid_fraction < 1))
                mlm_fatal(MLM_EXIT_USAGE, "--valid-fraction %s: expected a number in [0, 1)", optarg);
            break;
        }
        case O_SEED: p->seed = parse_count("--seed", optarg, 0, UINT64_MAX); break;
        case O_THREADS: p->threads = (int)parse_count("--threads", optarg, 1, 4096); break;
        case O_FORCE: p->force = 1; break;
        case 'q': p->quiet = 1; break;
        case 'h': usage_prepare(stdout); exit(0);
        default: usage_prepare(stderr); exit(MLM_EXIT_USAGE);
        }
    }
    if (!p->out_dir) mlm_fatal(MLM_EXIT_USAGE, "mlm prepare needs --out DIR (see mlm prepare --help)");
    if (optind >= argc) mlm_fatal(MLM_EXIT_USAGE, "mlm prepare needs inputs: files, directories or - for standard input");
    if (p->vocab_path && p->tokenizer != TOKENIZER_WORDPIECE)
        mlm_fatal(MLM_EXIT_USAGE, "--vocab is for --tokenizer wordpiece");
    if (p->lowercase >= 0 && p->tokenizer != TOKENIZER_WORDPIECE)
        mlm_fatal(MLM_EXIT_USAGE, "--lowercase/--no-lowercase are for --tokenizer wordpiece");
    if (p->lowercase < 0) p->lowercase = p->tokenizer == TOKENIZER_WORDPIECE;
    p->inputs = argv + optind;
    p->n_inputs = argc - optind;
}

int prepare_main(int argc, char **argv) {
    Prep *p = mlm_calloc(1, sizeof(Prep), "prepare state");
    parse_options(p, argc, argv);
    if (p->threads > 0) omp_set_num_threads(p->threads);
    expand_inputs(p);
    prepare_out_dir(p);
    if (p->tokenizer == TOKENIZER_CHAR) spool_stdin(p);
    setup_vocab(p);
    p->t0 = p->t_last = mlm_now();
    Manifest *m = &p->man;
    snprintf(m->dir, sizeof(m->dir), "%s", p->out_dir);
    m->tokenizer = p->tokenizer;
    m->lowercase = p->tokenizer == TOKENIZER_WORDPIECE ? p->lowercase : 0;
    m->blank_docs = p->blank_docs;
    m->seed = p->seed;
    m->valid_fraction = p->valid_fraction;
    p->text = mlm_malloc(BATCH_BYTES + PIECE_BYTES, "batch text");
    p->ids = mlm_malloc((BATCH_BYTES + PIECE_BYTES) * sizeof(int32_t), "batch ids");
    tokenize_inputs(p);
    close_writer(p, 0);
    close_writer(p, 1);
    m->train_docs = p->docs[0];
    m->valid_docs = p->docs[1];
    m->train_tokens = p->tokens[0];
    m->valid_tokens = p->tokens[1];
    m->source_bytes = p->bytes_done;
    char err[1400];
    if (manifest_write(m, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    if (p->stdin_spool) unlink(p->stdin_spool);
    progress(p, 1);
    if (!p->quiet)
        fprintf(stderr, "prepare: %s: %s tokenizer, %u tokens in the vocabulary; train %" PRIu64 " documents / %" PRIu64
                " tokens, valid %" PRIu64 " / %" PRIu64 ", %d shards\n", p->out_dir, tokenizer_name(p->tokenizer),
                m->vocab_size, m->train_docs, m->train_tokens, m->valid_docs, m->valid_tokens, m->n_shards);
    if (p->wp) wp_free(p->wp);
    manifest_free(m);
    for (int i = 0; i < p->n_files; i++) free(p->files[i]);
    free(p->files);
    free(p->text);
    free(p->ids);
    free(p->pieces);
    free(p->stdin_spool);
    free(p);
    return 0;
}
