// prepare.c: `mlm prepare`: text files, directories or standard input -> token shards and a manifest.
//
// The input is streamed: documents (a file each, or blank-line-separated blocks) are cut into pieces of at
// most PIECE_BYTES where the tokenizer's output cannot change (text_pieces.c), pieces are gathered into batches
// of about BATCH_BYTES, each batch is tokenized on every core (OpenMP, one piece per task) and written in input
// order. So the output is the same whatever the thread count, and memory is bounded by the batch, not the corpus.
//
// The output directory is handled so that nothing is lost whatever happens (a bad option, bad input, two
// prepares at once, kill -9): DIR is locked as `train` locks a run directory; the new set is written into
// DIR/.prepare.part/ and renamed to DIR/shards-<12 hex of its contents>/ once complete; only then is the manifest
// replaced (the commit), and only after that are the files of the set it replaced removed. Nothing else in DIR
// is written or removed, and every input is checked (vocabulary, UTF-8, readable) before the old set goes.
#define _GNU_SOURCE  // getopt_long
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <omp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/input_files.h"
#include "mlm/run_lock.h"
#include "mlm/shards.h"
#include "mlm/text_pieces.h"
#include "mlm/wordpiece.h"

#define PIECE_BYTES (256 * 1024)
#define BATCH_BYTES (16u * 1024 * 1024)
#define READ_BYTES (4u * 1024 * 1024)

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
    int skip_invalid;          // --invalid-utf8 skip (else: refuse invalid UTF-8)
    char **inputs;
    int n_inputs;
    // inputs expanded to files ("-" = standard input); streams are spooled for the char tokenizer's two passes
    InputFiles in;
    char **spooled_from;       // [in.n] the stream an input was copied from (NULL: read in place)
    uint64_t total_bytes;      // 0 when unknown (a stream)
    // the output directory
    RunLock lock;
    int created_dir, committed;
    char staging[1200];        // DIR/.prepare.part while the new set is written
    Manifest old;              // the set being replaced (--force), when its manifest reads
    int have_old;
    // tokenizer state
    WordPiece *wp;
    Vocab cv;                  // char vocabulary
    uint8_t vocab_md5[16];
    Manifest man;
    // batch of pieces
    TextPieces reader;
    char *text;                // [BATCH_BYTES + PIECE_BYTES]
    size_t text_len;
    struct Piece { uint64_t doc; size_t off, len; int starts_doc; size_t n_ids; } *pieces;
    int n_pieces, cap_pieces;
    int32_t *ids;              // [text capacity] ids of every piece at its text offset (tokens <= bytes)
    int changed_input;         // char: a character the first pass did not see (a file changed between passes)
    // document state
    uint64_t doc;              // ordinal of the current document (all documents, empty ones included)
    int doc_started;           // the current document's first non-empty piece was written
    // writers
    ShardWriter w[2];          // train, valid
    int w_open[2], w_index[2];
    uint64_t docs[2], tokens[2];
    // invalid UTF-8 skipped (--invalid-utf8 skip)
    uint64_t invalid, invalid_files, first_invalid_at;
    char first_invalid_file[1024];
    // reading
    FILE *cur;                 // the input being read
    const char *cur_path;
    // progress
    double t0, t_last;
} Prep;

static void usage_prepare(FILE *f) {
    fputs("usage: mlm prepare [OPTIONS] --out DIR INPUT...\n\n"
          "Tokenize UTF-8 text into binary token shards and a manifest (DIR/manifest.txt) for `mlm train\n"
          "--set data.path=DIR`. INPUT: files, directories (every regular file below them, in name order, each file\n"
          "once; shard sets among them are left out), pipes, or - for standard input. Streams the text (memory stays\n"
          "bounded) and tokenizes on every core; the shards are the same whatever the thread count. DIR is locked\n"
          "while prepare runs; the set goes into DIR/manifest.txt and DIR/shards-*/, nothing else in DIR is touched.\n\n"
          "options:\n"
          "  -o, --out DIR            output directory (created; refused if it holds a shard set, see --force)\n"
          "  -t, --tokenizer KIND     char (the reference's: one id per character of the corpus, sorted), byte\n"
          "                           (256 byte values + [PAD] [UNK] [CLS] [SEP] [MASK]) or wordpiece (default: char)\n"
          "      --vocab FILE         a BERT vocab.txt (wordpiece; copied into the set)\n"
          "      --lowercase          lower-case and strip accents (BERT uncased; wordpiece default)\n"
          "      --no-lowercase       keep case and accents (BERT cased)\n"
          "      --documents MODE     file: one document per file (default); blank: blank-line-separated blocks\n"
          "      --invalid-utf8 MODE  error: refuse text that is not valid UTF-8, naming the file and byte (default);\n"
          "                           skip: drop each invalid byte, count them (manifest: invalid_utf8) and say how\n"
          "                           many (char and wordpiece; the byte tokenizer takes any bytes)\n"
          "      --shard-tokens N     tokens per shard (default 67108864)\n"
          "      --valid-fraction F   share of documents held out for validation, drawn per document from\n"
          "                           --seed (default 0.05; 0: none)\n"
          "      --seed N             seed of the train/valid split (default 1234)\n"
          "      --threads N          threads (default: every core)\n"
          "      --force              replace an existing shard set in DIR (once the new one is complete)\n"
          "  -q, --quiet              no progress line\n"
          "  -h, --help               this help\n", f);
}

// ---------------------------------------------------------------------------------------------------------
// Stopping: SIGINT and SIGTERM end the run between reads, cleanly (the old set stays, the new one's files go).

static volatile sig_atomic_t stop_signal;
static void on_signal(int sig) {
    if (stop_signal) {  // a second one: stop now (the next prepare clears what is left)
        signal(sig, SIG_DFL);
        raise(sig);
    }
    stop_signal = sig;
}

static void check_stop(void) {
    if (stop_signal)
        mlm_fatal(128 + stop_signal, "prepare interrupted by %s; nothing was replaced (the unfinished set is removed)",
                  stop_signal == SIGINT ? "SIGINT" : "SIGTERM");
}

// ---------------------------------------------------------------------------------------------------------
// The output directory: lock, leftovers, staging, commit

// Names mlm prepare writes inside a shard folder or its staging folder (nothing else is ever removed there).
static int is_own_name(const char *name) {
    size_t l = strlen(name);
    int shard = (!strncmp(name, "train-", 6) || !strncmp(name, "valid-", 6)) && l >= 15 &&
                strspn(name + 6, "0123456789") >= 5 && !strncmp(name + 6 + strspn(name + 6, "0123456789"), ".bin", 4);
    int vocab = !strcmp(name, "vocab.txt") || !strcmp(name, "vocab.txt.part");
    int stream = !strncmp(name, ".stream-", 8);
    return shard || vocab || stream;
}

// Remove what prepare wrote in `dir` and the folder itself (left, with a warning, if anything else is in it).
static void remove_own_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!is_own_name(e->d_name)) continue;
        char path[1500];
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    if (rmdir(dir) != 0 && errno != ENOENT)
        mlm_warn("left %s in place: it holds files mlm prepare did not write (%s)", dir, strerror(errno));
}

static Prep *cleanup_prep;

// At every exit (errors included): an uncommitted new set is removed, the lock released, a directory this run
// created and left empty removed. The old set is untouched unless the commit happened.
static void cleanup_at_exit(void) {
    Prep *p = cleanup_prep;
    if (!p) return;
    cleanup_prep = NULL;
    if (!p->committed && p->staging[0]) remove_own_dir(p->staging);
    run_lock_release(&p->lock);
    if (p->created_dir && !p->committed) rmdir(p->out_dir);  // only if empty
}

static void fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

// A file named `lock` in DIR that is not an mlm lock (a pid, or empty) is the user's: never take it over.
static void check_lock_file(const char *dir) {
    char path[1200];
    snprintf(path, sizeof(path), "%s/" RUN_LOCK_FILE, dir);
    struct stat st;
    if (lstat(path, &st) != 0) return;
    char buf[32] = {0};
    int fd = S_ISREG(st.st_mode) && st.st_size < 24 ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
    if (fd >= 0) close(fd);
    size_t digits = n > 0 ? strspn(buf, "0123456789") : 0;
    int ours = n == 0 || (n > 0 && digits > 0 && (buf[digits] == '\0' || !strcmp(buf + digits, "\n")));
    if (!ours)
        mlm_fatal(MLM_EXIT_USAGE, "%s exists and is not an mlm lock file; mlm prepare locks DIR with a file of that "
                  "name: move it, or choose another --out", path);
}

static void open_out_dir(Prep *p) {
    struct stat st;
    if (stat(p->out_dir, &st) == 0) {
        if (!S_ISDIR(st.st_mode))
            mlm_fatal(MLM_EXIT_USAGE, "--out %s is %s, not a directory", p->out_dir, mlm_file_kind(st.st_mode));
    } else if (errno == ENOENT) {
        if (mkdir(p->out_dir, 0755) == 0) p->created_dir = 1;
        else if (errno != EEXIST || stat(p->out_dir, &st) != 0 || !S_ISDIR(st.st_mode))  // EEXIST: another prepare
            mlm_fatal(MLM_EXIT_FAILURE, "cannot create %s: %s", p->out_dir, strerror(errno));
    } else {
        mlm_fatal(MLM_EXIT_FAILURE, "cannot use --out %s: %s", p->out_dir, strerror(errno));
    }
    cleanup_prep = p;
    atexit(cleanup_at_exit);
    check_lock_file(p->out_dir);
    char err[1400];
    p->lock.fd = -1;
    if (run_lock_acquire(p->out_dir, &p->lock, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "%s", err);
}

// The set DIR holds now: refused without --force; with it, read so that its files can go after the commit.
static void read_old_set(Prep *p) {
    char m[1200], err[2400];
    snprintf(m, sizeof(m), "%s/" SHARD_MANIFEST, p->out_dir);
    if (access(m, F_OK) != 0) return;
    if (!p->force)
        mlm_fatal(MLM_EXIT_USAGE, "%s already holds a shard set (%s); choose another --out or pass --force to "
                  "replace it (it is replaced once the new set is complete)", p->out_dir, m);
    if (manifest_read_v1(&p->old, p->out_dir, err, sizeof(err)) == 0) {
        p->have_old = 1;
        return;
    }
    // Not readable as a set: replace it only if it is an mlm manifest at all (a damaged one); its files stay.
    size_t len;
    char *text = mlm_read_regular(m, "shard manifest", MANIFEST_MAX_BYTES, &len, NULL, 0);
    int ours = text && strstr(text, "\nformat = mlm-shards\n") != NULL;
    free(text);
    if (!ours)
        mlm_fatal(MLM_EXIT_USAGE, "%s is not the manifest of an mlm shard set; mlm prepare does not overwrite it: "
                  "choose another --out", m);
    mlm_warn("the manifest of the set being replaced cannot be read (%s); it is replaced all the same (--force): its "
             "shard folder goes, files a version-1 set kept in DIR itself stay", err);
}

// Leftovers of earlier prepares killed before they finished: the staging folder, and shard folders no manifest
// names (killed between moving the folder into place and the commit).
static void remove_leftovers(Prep *p) {
    snprintf(p->staging, sizeof(p->staging), "%s/" SHARD_STAGING, p->out_dir);
    remove_own_dir(p->staging);
    DIR *d = opendir(p->out_dir);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, "shards-", 7) || strlen(e->d_name) != 19) continue;
        if (p->have_old && !strcmp(e->d_name, p->old.shard_dir)) continue;
        char path[1400];
        snprintf(path, sizeof(path), "%s/%s", p->out_dir, e->d_name);
        remove_own_dir(path);
    }
    if (d) closedir(d);
    if (mkdir(p->staging, 0755) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot create %s: %s", p->staging, strerror(errno));
}

// ---------------------------------------------------------------------------------------------------------
// Inputs

static void expand_inputs(Prep *p) {
    InputRules rules = {.skip_dir = p->out_dir, .set_marker = SHARD_MANIFEST};
    for (int i = 0; i < p->n_inputs; i++) input_files_add(&p->in, p->inputs[i], &rules);
    if (!p->quiet) input_files_report(&p->in, "prepare");
    if (p->in.n == 0) mlm_fatal(MLM_EXIT_USAGE, "the inputs hold no files; give text files, directories or -");
    for (size_t i = 0; i < p->in.n; i++) {
        struct stat st;
        if (p->in.stream[i] || stat(p->in.paths[i], &st) != 0) {
            p->total_bytes = 0;  // unknown
            return;
        }
        p->total_bytes += (uint64_t)st.st_size;
    }
}

static const char *input_name(const char *path) { return strcmp(path, "-") ? path : "standard input"; }

// Input i as the user named it (a spooled stream by its origin).
static const char *input_label(const Prep *p, size_t i) {
    return input_name(p->spooled_from && p->spooled_from[i] ? p->spooled_from[i] : p->in.paths[i]);
}

static FILE *open_input(const char *path) {
    if (!strcmp(path, "-")) return stdin;
    FILE *f = fopen(path, "rb");  // a pipe named as an input blocks here until its writer comes
    check_stop();
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot read %s: %s", path, strerror(errno));
    return f;
}

// fread that stops the program, naming the input, on a read error (a closed standard input, a directory on it).
static size_t read_input(FILE *f, const char *path, char *buf, size_t n) {
    check_stop();
    size_t got = fread(buf, 1, n, f);
    check_stop();  // a signal interrupts a read blocked on a pipe
    if (got == 0 && ferror(f))
        mlm_fatal(MLM_EXIT_FAILURE, "cannot read %s: %s", input_name(path), strerror(errno ? errno : EIO));
    return got;
}

// The char tokenizer reads its inputs twice (the vocabulary is every character of the corpus), so standard input
// and pipes are first copied into the staging folder, which goes at exit whatever happens.
static void spool_streams(Prep *p) {
    p->spooled_from = mlm_calloc(p->in.n, sizeof(char *), "input names");
    for (size_t i = 0; i < p->in.n; i++) {
        if (!p->in.stream[i]) continue;
        char path[1300];
        snprintf(path, sizeof(path), "%s/.stream-%zu.part", p->staging, i);
        FILE *in = open_input(p->in.paths[i]), *f = fopen(path, "wb");
        if (!f) mlm_fatal(MLM_EXIT_FAILURE, "cannot create %s: %s", path, strerror(errno));
        char *buf = mlm_malloc(READ_BYTES, "read buffer");
        size_t n;
        while ((n = read_input(in, p->in.paths[i], buf, READ_BYTES)) > 0)
            if (fwrite(buf, 1, n, f) != n) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
        free(buf);
        if (fclose(f) != 0) mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
        if (in != stdin) fclose(in);
        p->spooled_from[i] = p->in.paths[i];
        p->in.paths[i] = mlm_strdup(path);
        p->in.stream[i] = 0;
    }
}

// Invalid UTF-8 under the --invalid-utf8 policy: refused (naming the file and byte) or counted.
MLM_NORETURN static void refuse_invalid_utf8(const Prep *p, size_t i, uint64_t at) {
    mlm_fatal(MLM_EXIT_FAILURE, "%s: invalid UTF-8 at byte %" PRIu64 "; the %s tokenizer reads UTF-8 text: convert the "
              "file (e.g. iconv -f latin1 -t utf-8), pass --invalid-utf8 skip to drop such bytes (they are counted), "
              "or use --tokenizer byte. Nothing was written", input_label(p, i), at, tokenizer_name(p->tokenizer));
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
    for (size_t i = 0; i < p->in.n; i++) {
        const char *path = p->in.paths[i];
        FILE *f = open_input(path);
        Utf8Check chk = {0};
        size_t carry = 0;
        for (;;) {
            size_t n = read_input(f, path, buf + carry, READ_BYTES), len = carry + n;
            size_t m = utf8_check(&chk, buf, len, n == 0);  // whole characters only; at the end, everything
            if (chk.invalid && !p->skip_invalid) refuse_invalid_utf8(p, i, chk.first_invalid);
            for (size_t k = 0; k < m;) {
                uint32_t cp;
                k += utf8_next((const unsigned char *)buf + k, m - k, &cp);
                if (cp != UTF8_INVALID) seen[cp] = 1;
            }
            memmove(buf, buf + m, len - m);
            carry = len - m;
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
    if (count == 0)
        mlm_fatal(MLM_EXIT_USAGE, "the inputs hold no text (%zu file%s, all empty%s); nothing to prepare", p->in.n,
                  p->in.n == 1 ? "" : "s", p->skip_invalid ? " or invalid UTF-8" : "");
    char err[256];
    if (vocab_build(&p->cv, list, count, err, sizeof(err))) mlm_fatal(MLM_EXIT_USAGE, "inputs: %s", err);
    free(list);
    p->man.char_codepoints = vocab_codepoints_text(&p->cv);
    data_md5(p->man.char_codepoints, strlen(p->man.char_codepoints), p->man.vocab_md5);
    p->man.vocab_size = (uint32_t)p->cv.n_tokens;
    p->man.pad_id = p->cv.pad_id;
    p->man.mask_id = p->cv.mask_id;
}

static void write_file_synced(const char *path, const char *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fflush(f) != 0 || fsync(fileno(f)) != 0 || fclose(f) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot write %s: %s", path, strerror(errno));
}

// WordPiece: vocab.txt is read once (a regular file of bounded size); those very bytes are parsed, checksummed and
// copied into the set.
static void load_wordpiece(Prep *p) {
    if (!p->vocab_path) mlm_fatal(MLM_EXIT_USAGE, "--tokenizer wordpiece needs --vocab vocab.txt (a BERT vocabulary, or "
                                  "one trained with `mlm vocab`)");
    char err[1400];
    size_t len;
    char *text = mlm_read_regular(p->vocab_path, "vocabulary", WP_VOCAB_MAX_BYTES, &len, err, sizeof(err));
    if (!text) mlm_fatal(MLM_EXIT_USAGE, "--vocab: %s", err);
    p->wp = wp_load_text(text, len, p->vocab_path, p->lowercase, err, sizeof(err));
    if (!p->wp) mlm_fatal(MLM_EXIT_USAGE, "--vocab: %s", err);
    data_md5(text, len, p->man.vocab_md5);
    p->man.vocab_size = (uint32_t)wp_vocab_size(p->wp);
    p->man.pad_id = wp_id(p->wp, "[PAD]");
    p->man.mask_id = wp_id(p->wp, "[MASK]");
    p->man.unk_id = wp_id(p->wp, "[UNK]");
    p->man.cls_id = wp_id(p->wp, "[CLS]");
    p->man.sep_id = wp_id(p->wp, "[SEP]");
    if (p->man.pad_id < 0 || p->man.mask_id < 0)
        mlm_fatal(MLM_EXIT_USAGE, "--vocab %s has no %s token; a masked language model needs [PAD] and [MASK]",
                  p->vocab_path, p->man.pad_id < 0 ? "[PAD]" : "[MASK]");
    char to[1300];
    snprintf(to, sizeof(to), "%s/vocab.txt", p->staging);
    write_file_synced(to, text, len);
    free(text);
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

// Char: decode and map every code point (all are in the vocabulary: it was built from these inputs). Invalid bytes
// are dropped (--invalid-utf8 skip; under the default policy there are none by now). -1: a character the first
// pass did not see, so the file changed between the passes.
static size_t encode_chars(const Vocab *v, const char *s, size_t len, int32_t *ids) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, n = 0;
    while (i < len) {
        uint32_t c;
        i += utf8_next(u + i, len - i, &c);
        if (c == UTF8_INVALID) continue;
        int id = vocab_id(v, c);
        if (id < 0) return (size_t)-1;
        ids[n++] = id;
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
    snprintf(e->file, sizeof(e->file), "%.255s", base ? base + 1 : w->path);
    e->n_tokens = w->h.n_tokens;
    e->n_docs = w->h.n_docs;
}

static void close_writer(Prep *p, int split) {
    if (!p->w_open[split]) return;
    char err[1400];
    ShardWriter *w = &p->w[split];
    if (w->h.n_docs == 0) shard_writer_begin_doc(w);
    add_manifest_entry(p, split, w);
    if (shard_writer_close(w, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    p->man.shards[p->man.n_shards - 1].payload_hash = w->h.payload_hash;  // final once the shard is closed
    p->w_open[split] = 0;
}

static void open_writer(Prep *p, int split, int continues) {
    char path[1300], err[1500];
    if (p->w_index[split] >= SHARD_MAX_FILES)
        mlm_fatal(MLM_EXIT_USAGE, "more than %d shards; raise --shard-tokens", SHARD_MAX_FILES);
    snprintf(path, sizeof(path), "%s/%s-%05d.bin", p->staging, split ? "valid" : "train", p->w_index[split]++);
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
    double mb = (double)p->reader.bytes_done / 1e6, rate = mb / MLM_MAX(now - p->t0, 1e-9);
    char left[64] = "";
    if (p->total_bytes && !last) {
        double s = ((double)p->total_bytes / 1e6 - mb) / MLM_MAX(rate, 1e-9);
        snprintf(left, sizeof(left), " of %.1f MB (%.0f%%), %.0f s left", (double)p->total_bytes / 1e6,
                 100.0 * (double)p->reader.bytes_done / (double)p->total_bytes, s);
    }
    fprintf(stderr, "%sprepare: %.1f MB%s, %.1f MB/s, %" PRIu64 " tokens, %" PRIu64 " documents%s",
            isatty(STDERR_FILENO) ? "\r\x1b[2K" : "", mb, left, rate, p->tokens[0] + p->tokens[1],
            p->docs[0] + p->docs[1], isatty(STDERR_FILENO) && !last ? "" : "\n");
}

// Tokenize every piece of the batch on all cores, then write them in order.
static void flush_batch(Prep *p) {
    check_stop();
    int n = p->n_pieces;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        struct Piece *pc = &p->pieces[i];
        pc->n_ids = encode_piece(p, p->text + pc->off, pc->len, p->ids + pc->off);
    }
    for (int i = 0; i < n; i++)
        if (p->pieces[i].n_ids == (size_t)-1)
            mlm_fatal(MLM_EXIT_FAILURE, "an input changed while it was read: the char tokenizer met a character its "
                      "first pass over the inputs did not see (is another program writing them?); run prepare again");
    for (int i = 0; i < n; i++) write_piece(p, &p->pieces[i]);
    p->n_pieces = 0;
    p->text_len = 0;
    progress(p, 0);
}

// TextPieces' callbacks: a piece of the current document, and its end.
static void add_piece(void *ctx, const char *s, size_t len, int starts_doc) {
    Prep *p = ctx;
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

static void end_doc(void *ctx) { ((Prep *)ctx)->doc++; }

// ---------------------------------------------------------------------------------------------------------
// Reading

static size_t read_file(void *ctx, char *buf, size_t n) {
    Prep *p = ctx;
    return read_input(p->cur, p->cur_path, buf, n);
}

static void tokenize_inputs(Prep *p) {
    size_t cap = READ_BYTES + 2 * PIECE_BYTES + 8;
    char *buf = mlm_malloc(cap, "read buffer");
    p->reader = (TextPieces){.cut = p->tokenizer == TOKENIZER_BYTE ? TEXT_CUT_BYTES
                                    : p->tokenizer == TOKENIZER_CHAR ? TEXT_CUT_CHARS : TEXT_CUT_WORDS,
                             .blank_docs = p->blank_docs, .piece_bytes = PIECE_BYTES, .piece = add_piece,
                             .end_doc = end_doc, .ctx = p};
    for (size_t i = 0; i < p->in.n; i++) {
        p->cur_path = p->in.paths[i];
        p->cur = open_input(p->cur_path);
        Utf8Check chk;
        if (text_pieces_read_file(&p->reader, &chk, read_file, p, buf, cap, p->tokenizer != TOKENIZER_BYTE,
                                  !p->skip_invalid))
            refuse_invalid_utf8(p, i, chk.first_invalid);
        if (p->cur != stdin) fclose(p->cur);
        if (chk.invalid) {
            if (!p->invalid_files++) {
                snprintf(p->first_invalid_file, sizeof(p->first_invalid_file), "%s", input_label(p, i));
                p->first_invalid_at = chk.first_invalid;
            }
            p->invalid += chk.invalid;
        }
    }
    flush_batch(p);
    free(buf);
}

// ---------------------------------------------------------------------------------------------------------
// Finishing: the manifest, the commit, the old set's files

// The shard folder's name: 12 hex digits of the md5 of what the folder holds (the vocabulary and every shard's
// split, counts and payload hash), so that preparing the same text twice gives the same manifest.
static void shard_folder_name(const Manifest *m, char out[20]) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "out of memory");
    fprintf(f, "%s %s %u\n", tokenizer_name(m->tokenizer), m->vocab_md5, m->token_bytes);
    for (int i = 0; i < m->n_shards; i++)
        fprintf(f, "%s %s %" PRIu64 " %" PRIu64 " %016" PRIx64 "\n", m->shards[i].split, m->shards[i].file,
                m->shards[i].n_tokens, m->shards[i].n_docs, m->shards[i].payload_hash);
    fclose(f);
    char md5[33];
    data_md5(text, len, md5);
    free(text);
    snprintf(out, 20, "shards-%.12s", md5);
}

// 1 if the set being replaced holds these very shards (same vocabulary, options, counts and payload hashes; a
// version-1 manifest lists no hashes, so they are read from its shards' headers).
static int same_shards(const Manifest *a, const Manifest *b) {
    if (a->tokenizer != b->tokenizer || strcmp(a->vocab_md5, b->vocab_md5) || a->vocab_size != b->vocab_size ||
        a->token_bytes != b->token_bytes || a->lowercase != b->lowercase || a->blank_docs != b->blank_docs ||
        a->pad_id != b->pad_id || a->mask_id != b->mask_id || a->unk_id != b->unk_id || a->cls_id != b->cls_id ||
        a->sep_id != b->sep_id || a->n_shards != b->n_shards)
        return 0;
    for (int i = 0; i < a->n_shards; i++) {
        const ShardEntry *x = &a->shards[i], *y = &b->shards[i];
        if (strcmp(x->split, y->split) || x->n_tokens != y->n_tokens || x->n_docs != y->n_docs) return 0;
        uint64_t hash = x->payload_hash;
        if (a->version == 1) {
            char path[1400], err[1600];
            Shard s;
            manifest_shard_path(a, x, path, sizeof(path));
            if (shard_open(&s, path, NULL, 0, err, sizeof(err))) return 0;
            hash = s.h.payload_hash;
            shard_close(&s);
        }
        if (hash != y->payload_hash) return 0;
    }
    return 1;
}

// The old set's files that the new set does not use, once the new manifest is in place.
static void remove_old_set(Prep *p) {
    const Manifest *o = &p->old;
    if (!p->have_old || !strcmp(o->shard_dir, p->man.shard_dir)) return;
    if (o->shard_dir[0]) {
        char dir[1200];
        snprintf(dir, sizeof(dir), "%s/%s", p->out_dir, o->shard_dir);
        remove_own_dir(dir);
        return;
    }
    // A version-1 set, written into DIR itself: its shards (each checked to be one) and its vocab.txt copy.
    for (int i = 0; i < o->n_shards; i++) {
        char path[1400];
        manifest_shard_path(o, &o->shards[i], path, sizeof(path));
        FILE *f = fopen(path, "rb");
        char magic[8] = {0};
        int shard = f && fread(magic, 1, 8, f) == 8 && !memcmp(magic, SHARD_MAGIC, 8);
        if (f) fclose(f);
        if (shard) unlink(path);
    }
    char vocab[1200];
    snprintf(vocab, sizeof(vocab), "%s/vocab.txt", p->out_dir);
    if (o->tokenizer == TOKENIZER_WORDPIECE && !strcmp(o->vocab, vocab)) unlink(vocab);
}

static void commit(Prep *p) {
    Manifest *m = &p->man;
    shard_folder_name(m, m->shard_dir);
    if (m->tokenizer == TOKENIZER_WORDPIECE) snprintf(m->vocab, sizeof(m->vocab), "%s/vocab.txt", m->shard_dir);
    if (p->have_old && same_shards(&p->old, m))
        snprintf(m->replaces, sizeof(m->replaces), "%s", p->old.version == 1 ? p->old.md5 : p->old.replaces);
    char final[1200];
    snprintf(final, sizeof(final), "%s/%s", p->out_dir, m->shard_dir);
    if (p->have_old && !strcmp(p->old.shard_dir, m->shard_dir)) {
        remove_own_dir(p->staging);  // the same shards are in place already
    } else {
        if (access(final, F_OK) == 0) remove_own_dir(final);  // left by a prepare killed before its commit
        if (rename(p->staging, final) != 0)
            mlm_fatal(MLM_EXIT_FAILURE, "cannot move %s to %s: %s", p->staging, final, strerror(errno));
    }
    p->staging[0] = '\0';
    fsync_dir(p->out_dir);
    char err[1400];
    if (manifest_write(m, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "%s", err);
    p->committed = 1;
    fsync_dir(p->out_dir);
    remove_old_set(p);
}

// ---------------------------------------------------------------------------------------------------------

static uint64_t parse_count(const char *opt, const char *s, uint64_t min, uint64_t max) {
    uint64_t v;
    if (mlm_parse_u64(s, max, &v) || v < min)
        mlm_fatal(MLM_EXIT_USAGE, "%s %s: expected an integer in [%" PRIu64 ", %" PRIu64 "]", opt, s, min, max);
    return v;
}

static void parse_options(Prep *p, int argc, char **argv) {
    enum { O_VOCAB = 256, O_LOWER, O_NOLOWER, O_DOCS, O_SHARD, O_VALID, O_SEED, O_THREADS, O_FORCE, O_INVALID };
    static const struct option opts[] = {
        {"out", required_argument, 0, 'o'},        {"tokenizer", required_argument, 0, 't'},
        {"vocab", required_argument, 0, O_VOCAB},  {"lowercase", no_argument, 0, O_LOWER},
        {"no-lowercase", no_argument, 0, O_NOLOWER}, {"documents", required_argument, 0, O_DOCS},
        {"shard-tokens", required_argument, 0, O_SHARD}, {"valid-fraction", required_argument, 0, O_VALID},
        {"seed", required_argument, 0, O_SEED},    {"threads", required_argument, 0, O_THREADS},
        {"force", no_argument, 0, O_FORCE},        {"quiet", no_argument, 0, 'q'},
        {"invalid-utf8", required_argument, 0, O_INVALID},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    p->lowercase = -1;
    p->shard_tokens = 64ull << 20;
    p->valid_fraction = 0.05;
    p->seed = 1234;
    int invalid_given = 0;
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
        case O_INVALID:
            if (!strcmp(optarg, "error")) p->skip_invalid = 0;
            else if (!strcmp(optarg, "skip")) p->skip_invalid = 1;
            else mlm_fatal(MLM_EXIT_USAGE, "--invalid-utf8 %s: expected error or skip", optarg);
            invalid_given = 1;
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
    if (invalid_given && p->tokenizer == TOKENIZER_BYTE)
        mlm_fatal(MLM_EXIT_USAGE, "--invalid-utf8 is for --tokenizer char and wordpiece (the byte tokenizer takes any "
                  "bytes)");
    if (p->lowercase < 0) p->lowercase = p->tokenizer == TOKENIZER_WORDPIECE;
    p->inputs = argv + optind;
    p->n_inputs = argc - optind;
}

// A closed standard input leaves descriptor 0 free, and the next file opened (the lock, a shard) would become
// "standard input": refuse "-" then, and otherwise hold 0 with /dev/null.
static void check_stdin_open(const Prep *p) {
    if (fcntl(STDIN_FILENO, F_GETFD) != -1) return;
    for (int i = 0; i < p->n_inputs; i++)
        if (!strcmp(p->inputs[i], "-"))
            mlm_fatal(MLM_EXIT_FAILURE, "cannot read standard input: %s (it is closed); give the text on it, or as files",
                      strerror(EBADF));
    if (open("/dev/null", O_RDONLY) != STDIN_FILENO) mlm_fatal(MLM_EXIT_FAILURE, "cannot open /dev/null");
}

int prepare_main(int argc, char **argv) {
    Prep *p = mlm_calloc(1, sizeof(Prep), "prepare state");
    parse_options(p, argc, argv);
    check_stdin_open(p);
    if (p->threads > 0) omp_set_num_threads(p->threads);
    mlm_on_stop_signals(on_signal);  // no SA_RESTART: an open or read blocked on a pipe returns, and the run stops
    open_out_dir(p);      // locked from here; cleanup_at_exit removes what this run wrote unless it commits
    read_old_set(p);
    expand_inputs(p);
    remove_leftovers(p);  // and creates the staging folder
    if (p->tokenizer == TOKENIZER_CHAR) spool_streams(p);
    setup_vocab(p);
    p->t0 = p->t_last = mlm_now();
    Manifest *m = &p->man;
    snprintf(m->dir, sizeof(m->dir), "%s", p->out_dir);
    m->version = MANIFEST_VERSION;
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
    check_stop();
    m->train_docs = p->docs[0];
    m->valid_docs = p->docs[1];
    m->train_tokens = p->tokens[0];
    m->valid_tokens = p->tokens[1];
    m->source_bytes = p->reader.bytes_done;
    m->invalid_utf8 = p->invalid;
    commit(p);
    progress(p, 1);
    if (p->invalid)
        mlm_warn("skipped %" PRIu64 " bytes of invalid UTF-8 in %" PRIu64 " file%s (--invalid-utf8 skip), the first in "
                 "%s at byte %" PRIu64, p->invalid, p->invalid_files, p->invalid_files == 1 ? "" : "s",
                 p->first_invalid_file, p->first_invalid_at);
    if (!p->quiet)
        fprintf(stderr, "prepare: %s: %s tokenizer, %u tokens in the vocabulary; train %" PRIu64 " documents / %" PRIu64
                " tokens, valid %" PRIu64 " / %" PRIu64 ", %d shards%s\n", p->out_dir, tokenizer_name(p->tokenizer),
                m->vocab_size, m->train_docs, m->train_tokens, m->valid_docs, m->valid_tokens, m->n_shards,
                m->replaces[0] ? "; the same shards as the set it replaced, whose runs resume on it" : "");
    cleanup_at_exit();    // the lock
    if (p->wp) wp_free(p->wp);
    manifest_free(m);
    if (p->have_old) manifest_free(&p->old);
    for (size_t i = 0; p->spooled_from && i < p->in.n; i++) free(p->spooled_from[i]);
    free(p->spooled_from);
    input_files_free(&p->in);
    free(p->text);
    free(p->ids);
    free(p->pieces);
    free(p);
    return 0;
}
