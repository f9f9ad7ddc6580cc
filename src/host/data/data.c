// data.c: corpus lookup, download and verification, UTF-8 decoding, the character vocabulary and split, and the
// reference's sample prompts.
#include "mlm/data.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/shards.h"

const char *const SAMPLE_PROMPTS[N_PROMPTS] = {
    "We are accounted poor citizens, the patricians good.",
    "What authority surfeits on would relieve us: if they",
    "would yield us but the superfluity, while it were",
    "wholesome, we might guess they relieved us humanely;",
    "but they think we are too dear: the leanness that",
    "afflicts us, the object of our misery, is as an",
    "inventory to particularise their abundance; our",
    "sufferance is a gain to them Let us revenge this with",
    "our pikes, ere we become rakes: for the gods know I",
    "speak this in hunger for bread, not in thirst for revenge.",
};

static int file_readable(const char *path) { return access(path, R_OK) == 0; }

// Verify a mirrored or downloaded corpus; a mismatch is fatal because training on a different text would
// silently change every result.
static void verify_md5_or_die(const char *path, const char *origin) {
    char md5[33];
    if (data_md5_file(path, md5))
        mlm_fatal(MLM_EXIT_FAILURE, "cannot read %s (%s): %s", path, origin, strerror(errno));
    if (strcmp(md5, CORPUS_MD5) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "%s (%s) has md5 %s but Tiny Shakespeare has %s; the file is corrupt or a "
                  "different text: delete it, or pass your own text explicitly with --data PATH",
                  path, origin, md5, CORPUS_MD5);
}

static int have_program(const char *name) {
    char cmd[256];
    snprintf(cmd, sizeof(cmd), "command -v %s >/dev/null 2>&1", name);
    return system(cmd) == 0;
}

static int download(const char *url, const char *dest) {
    char cmd[2048];
    if (have_program("curl"))
        snprintf(cmd, sizeof(cmd), "curl -fsSL --retry 2 -o '%s' '%s'", dest, url);
    else if (have_program("wget"))
        snprintf(cmd, sizeof(cmd), "wget -q -O '%s' '%s'", dest, url);
    else
        return -1;
    return system(cmd) == 0 ? 0 : 1;
}

void data_locate_corpus(const char *explicit_path, char *out, size_t outlen) {
    if (explicit_path && explicit_path[0]) {
        struct stat st;
        if (stat(explicit_path, &st) == 0 && S_ISDIR(st.st_mode))
            mlm_fatal(MLM_EXIT_USAGE, "the corpus %s (--data or data.path) is a directory; give the text file itself, "
                      "e.g. %s/%s", explicit_path, explicit_path, CORPUS_FILE);
        if (!file_readable(explicit_path))
            mlm_fatal(MLM_EXIT_FAILURE, "cannot read corpus %s: %s; check the path given with --data or data.path",
                      explicit_path, strerror(errno));
        snprintf(out, outlen, "%s", explicit_path);
        return;
    }
    const char *local = "data/" CORPUS_FILE;
    if (file_readable(local)) {
        snprintf(out, outlen, "%s", local);
        return;
    }
    const char *mirror = getenv("MLM_DATA_MIRROR");
    if (mirror && mirror[0]) {
        snprintf(out, outlen, "%s/%s", mirror, CORPUS_FILE);
        if (file_readable(out)) {
            verify_md5_or_die(out, "from $MLM_DATA_MIRROR");
            return;
        }
        mlm_warn("$MLM_DATA_MIRROR is set but %s is not readable; downloading instead", out);
    }
    if (mkdir("data", 0755) != 0 && errno != EEXIST)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot create data/ to download the corpus into: %s; pass --data PATH",
                  strerror(errno));
    const char *tmp = "data/" CORPUS_FILE ".part";
    fprintf(stderr, "mlm: downloading Tiny Shakespeare from %s\n", CORPUS_URL);
    int r = download(CORPUS_URL, tmp);
    if (r != 0) {
        unlink(tmp);
        mlm_fatal(MLM_EXIT_FAILURE, "%s; get %s by hand into data/%s, set MLM_DATA_MIRROR to a directory holding "
                  "it, or pass --data PATH",
                  r < 0 ? "neither curl nor wget is installed to download the corpus" : "downloading the corpus failed",
                  CORPUS_URL, CORPUS_FILE);
    }
    verify_md5_or_die(tmp, "just downloaded");
    if (rename(tmp, local) != 0)
        mlm_fatal(MLM_EXIT_FAILURE, "cannot move %s to %s: %s", tmp, local, strerror(errno));
    snprintf(out, outlen, "%s", local);
}

size_t utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned char c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    size_t k; uint32_t v, min;
    if ((c & 0xE0) == 0xC0) { k = 2; v = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { k = 3; v = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { k = 4; v = c & 0x07; min = 0x10000; }
    else { *cp = UTF8_INVALID; return 1; }
    if (n < k) { *cp = UTF8_INVALID; return 1; }
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) { *cp = UTF8_INVALID; return 1; }
        v = (v << 6) | (s[i] & 0x3F);
    }
    // Overlong forms and surrogates are invalid, so that one character has exactly one encoding.
    if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) { *cp = UTF8_INVALID; return 1; }
    *cp = v;
    return k;
}

long utf8_decode(const char *text, size_t len, uint32_t **out, char *err, size_t errlen) {
    uint32_t *cps = mlm_malloc((len + 1) * sizeof(uint32_t), "decoded text");
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0, n = 0;
    while (i < len) {
        size_t k = utf8_next(s + i, len - i, &cps[n]);
        if (cps[n] == UTF8_INVALID) {
            snprintf(err, errlen, "invalid UTF-8 at byte %zu", i);
            free(cps);
            return -1;
        }
        n++;
        i += k;
    }
    *out = cps;
    return (long)n;
}

int utf8_encode(uint32_t cp, char *buf) {
    int n;
    if (cp < 0x80) { buf[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { buf[0] = (char)(0xc0 | (cp >> 6)); buf[1] = (char)(0x80 | (cp & 0x3f)); n = 2; }
    else if (cp < 0x10000) {
        buf[0] = (char)(0xe0 | (cp >> 12)); buf[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        buf[2] = (char)(0x80 | (cp & 0x3f)); n = 3;
    } else {
        buf[0] = (char)(0xf0 | (cp >> 18)); buf[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        buf[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); buf[3] = (char)(0x80 | (cp & 0x3f)); n = 4;
    }
    buf[n] = '\0';
    return n;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

int vocab_build(Vocab *v, const uint32_t *cps, size_t n, char *err, size_t errlen) {
    // Mark seen code points; a sort of the distinct ones gives the reference's sorted(set(text)).
    size_t cap = 0, count = 0;
    uint32_t *seen = NULL;
    unsigned char ascii[128] = {0};
    for (size_t i = 0; i < n; i++) {
        uint32_t c = cps[i];
        if (c < 128) {
            if (ascii[c]) continue;
            ascii[c] = 1;
        } else {
            int dup = 0;
            for (size_t k = 0; k < count; k++)
                if (seen[k] == c) { dup = 1; break; }
            if (dup) continue;
        }
        if (count == cap) {
            cap = cap ? cap * 2 : 256;
            seen = realloc(seen, cap * sizeof(uint32_t));
            if (!seen) mlm_fatal(MLM_EXIT_FAILURE, "out of memory building the vocabulary");
        }
        seen[count++] = c;
        if (count > VOCAB_MAX_CHARS) {
            free(seen);
            snprintf(err, errlen, "the text has more than %d distinct characters; a character-level model needs "
                     "a smaller alphabet", VOCAB_MAX_CHARS);
            return 1;
        }
    }
    if (count == 0) { free(seen); snprintf(err, errlen, "the text is empty"); return 1; }
    qsort(seen, count, sizeof(uint32_t), cmp_u32);
    memcpy(v->chars, seen, count * sizeof(uint32_t));
    free(seen);
    v->n_chars = (int)count;
    v->pad_id = v->n_chars;
    v->mask_id = v->n_chars + 1;
    v->n_tokens = v->n_chars + 2;
    v->kind = VOCAB_KIND_CHAR;
    v->unk_id = v->cls_id = v->sep_id = -1;
    memset(v->md5, 0, sizeof(v->md5));
    return 0;
}

int vocab_id(const Vocab *v, uint32_t cp) {
    int lo = 0, hi = v->n_chars - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (v->chars[mid] == cp) return mid;
        if (v->chars[mid] < cp) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

size_t vocab_encode(const Vocab *v, const uint32_t *cps, size_t n, int *ids) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int id = vocab_id(v, cps[i]);
        if (id >= 0) ids[k++] = id;
    }
    return k;
}

const char *vocab_token_text(const Vocab *v, int id, char *buf) {
    if (id == v->pad_id) return "[PAD]";
    if (id == v->mask_id) return "[MASK]";
    if (id < 0 || id >= v->n_chars) return "?";
    utf8_encode(v->chars[id], buf);
    return buf;
}

// Control characters other than tab, newline and carriage return (C0, DEL and C1).
static int is_control(uint32_t c) { return (c < 0x20 && c != '\t' && c != '\n' && c != '\r') || (c >= 0x7f && c < 0xa0); }

// A text a model can learn nothing from trains without a word otherwise (200 KB of NUL bytes did): say so.
static void warn_unlikely_text(const char *path, const Vocab *v, const uint32_t *cps, size_t n) {
    if (v->n_chars < 2) {
        char buf[8];
        mlm_warn("corpus %s has a single distinct character (U+%04X '%s'); there is nothing to predict, so the model "
                 "will learn nothing: is it the right file?", path, (unsigned)v->chars[0],
                 is_control(v->chars[0]) ? "?" : (utf8_encode(v->chars[0], buf), buf));
        return;
    }
    size_t ctrl = 0;
    for (size_t i = 0; i < n; i++) ctrl += is_control(cps[i]);
    if (2 * ctrl > n)
        mlm_warn("corpus %s is %.0f%% control characters (NUL and the like); it looks like a binary file, not text: "
                 "is it the right file?", path, 100.0 * (double)ctrl / (double)n);
}

void corpus_load(Corpus *c, const char *path, double train_split, int seq_len) {
    memset(c, 0, sizeof(*c));
    snprintf(c->path, sizeof(c->path), "%s", path);
    size_t len;
    char why[1400];
    // A regular file only: /dev/zero given as the corpus filled the memory, a FIFO read once could not be checksummed.
    char *text = mlm_read_regular(path, "corpus", 0, &len, why, sizeof(why));
    if (!text) mlm_fatal(MLM_EXIT_FAILURE, "%s", why);
    if (len == 0) mlm_fatal(MLM_EXIT_FAILURE, "corpus %s is empty; give a text file with --data", path);
    uint32_t *cps;
    char err[256];
    long n = utf8_decode(text, len, &cps, err, sizeof(err));
    free(text);
    if (n < 0) mlm_fatal(MLM_EXIT_FAILURE, "corpus %s: %s; the corpus must be UTF-8 text", path, err);
    if (vocab_build(&c->vocab, cps, (size_t)n, err, sizeof(err)))
        mlm_fatal(MLM_EXIT_FAILURE, "corpus %s: %s", path, err);
    warn_unlikely_text(path, &c->vocab, cps, (size_t)n);
    c->n_chars_total = (size_t)n;
    size_t n_train = (size_t)(train_split * (double)n);  // floor, as int(0.9 * N) in the reference
    size_t n_valid = (size_t)n - n_train;
    size_t need = (size_t)seq_len + 2;  // at least one item of seq_len + 1 characters in each split
    if (n_train < need || n_valid < need)
        mlm_fatal(MLM_EXIT_FAILURE, "corpus %s is too short: %ld characters split into %zu train / %zu valid, but "
                  "each split needs at least data.seq_len + 2 = %zu; use a longer text or a smaller data.seq_len",
                  path, n, n_train, n_valid, need);
    c->train = mlm_malloc(n_train * sizeof(int), "train tokens");
    c->valid = mlm_malloc(n_valid * sizeof(int), "valid tokens");
    c->n_train = vocab_encode(&c->vocab, cps, n_train, c->train);
    c->n_valid = vocab_encode(&c->vocab, cps + n_train, n_valid, c->valid);
    free(cps);
}

void corpus_free(Corpus *c) {
    if (c->shards) {
        shard_set_close(c->shards);
        free(c->shards);
        c->shards = NULL;
    }
    free(c->train);
    free(c->valid);
    c->train = c->valid = NULL;
}

static const char *const VOCAB_KIND_NAMES[3] = {"char", "byte", "wordpiece"};

char *vocab_codepoints_text(const Vocab *v) {
    if (v->kind != VOCAB_KIND_CHAR) {
        char *s = mlm_malloc(160, "vocabulary text");
        snprintf(s, 160, "%s:%d:%d,%d,%d,%d,%d:%s", VOCAB_KIND_NAMES[v->kind == VOCAB_KIND_BYTE ? 1 : 2], v->n_tokens,
                 v->pad_id, v->mask_id, v->unk_id, v->cls_id, v->sep_id, v->md5);
        return s;
    }
    size_t cap = (size_t)v->n_chars * 12 + 1, k = 0;
    char *s = mlm_malloc(cap, "vocabulary text");
    s[0] = '\0';
    for (int i = 0; i < v->n_chars; i++) k += (size_t)snprintf(s + k, cap - k, i ? ",%u" : "%u", v->chars[i]);
    return s;
}

// "KIND:N:PAD,MASK,UNK,CLS,SEP:MD5" of a byte or WordPiece vocabulary.
static int vocab_from_subword_text(const char *s, Vocab *v) {
    char kind[16], md5[40];
    int n, ids[5], used = 0;
    if (sscanf(s, "%15[a-z]:%d:%d,%d,%d,%d,%d:%39[0-9a-f]%n", kind, &n, &ids[0], &ids[1], &ids[2], &ids[3], &ids[4],
               md5, &used) != 8 || s[used] != '\0' || strlen(md5) != 32)
        return 1;
    if (!strcmp(kind, "byte")) v->kind = VOCAB_KIND_BYTE;
    else if (!strcmp(kind, "wordpiece")) v->kind = VOCAB_KIND_WORDPIECE;
    else return 1;
    v->n_tokens = n;
    v->n_chars = v->kind == VOCAB_KIND_BYTE ? 256 : n;
    v->pad_id = ids[0]; v->mask_id = ids[1]; v->unk_id = ids[2]; v->cls_id = ids[3]; v->sep_id = ids[4];
    memcpy(v->md5, md5, 33);
    char err[8];
    return vocab_check(v, err, sizeof(err));
}

int vocab_check(const Vocab *v, char *err, size_t errlen) {
    if (v->kind == VOCAB_KIND_CHAR) {
        int ok = v->n_chars >= 1 && v->n_chars <= VOCAB_MAX_CHARS;
        for (int i = 1; ok && i < v->n_chars; i++) ok = v->chars[i] > v->chars[i - 1];
        if (!ok || v->chars[v->n_chars - 1] > 0x10ffff || v->pad_id != v->n_chars || v->mask_id != v->n_chars + 1 ||
            v->n_tokens != v->n_chars + 2) {
            mlm_set_error(err, errlen, "its vocabulary is malformed (%d characters)", v->n_chars);
            return 1;
        }
        return 0;
    }
    int n = v->n_tokens, ok = (v->kind == VOCAB_KIND_BYTE || v->kind == VOCAB_KIND_WORDPIECE) && n >= 2 &&
                              n <= (1 << 24) && v->n_chars >= 1 && v->n_chars <= n && strlen(v->md5) == 32;
    int sp[5] = {v->pad_id, v->mask_id, v->unk_id, v->cls_id, v->sep_id};
    for (int i = 0; ok && i < 5; i++) {
        ok = (sp[i] >= 0 && sp[i] < n) || (i >= 2 && sp[i] == -1);
        for (int k = 0; ok && k < i; k++) ok = sp[i] == -1 || sp[i] != sp[k];
    }
    if (!ok) mlm_set_error(err, errlen, "its %s vocabulary is malformed (%d tokens, specials %d,%d,%d,%d,%d)",
                           v->kind == VOCAB_KIND_BYTE ? "byte" : "subword", n, sp[0], sp[1], sp[2], sp[3], sp[4]);
    return !ok;
}

int vocab_from_codepoints(const char *s, Vocab *v) {
    memset(v, 0, sizeof(*v));
    v->unk_id = v->cls_id = v->sep_id = -1;
    if (*s >= 'a' && *s <= 'z') return vocab_from_subword_text(s, v);
    int n = 0;
    while (*s) {
        char *end;
        unsigned long cp = strtoul(s, &end, 10);
        if (end == s || cp > 0x10ffff || n >= VOCAB_MAX_CHARS || (n > 0 && cp <= v->chars[n - 1])) return 1;
        v->chars[n++] = (uint32_t)cp;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return 1;
    }
    if (n == 0) return 1;
    v->n_chars = n;
    v->pad_id = n;
    v->mask_id = n + 1;
    v->n_tokens = n + 2;
    return 0;
}
