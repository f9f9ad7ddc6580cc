// wordpiece_train.c: word counting (BERT basic tokenizer) and WordPiece vocabulary training by the algorithm of
// Hugging Face tokenizers' WordPieceTrainer, which is its BpeTrainer with continuing_subword_prefix "##":
//   1. the special tokens; 2. the alphabet: every character of the words, the limit_alphabet most frequent
//   kept, sorted by code point; 3. each word split into characters, every character after the first written
//   "##c" (a new token when first seen); 4. pair counts over all words (weighted by the word's count), each
//   pair with the set of words it occurs in, in a max-heap ordered by count, then by the smaller (left id,
//   right id); 5. pop the top pair: a stale count is refreshed and pushed back (lazy update); else merge it
//   in the words of its set into "a" + "b" without b's "##", update the counts of the neighbouring pairs and
//   push the pairs that gained words (with those words only), until the vocabulary has vocab_size tokens or
//   the best count is below min_frequency.
// Hugging Face walks its word map in hash order when it gives the "##c" tokens their ids, so its ties between
// equal counts vary from run to run; here the words are walked by count (descending), then bytes, so the
// result is deterministic.
#include "mlm/wordpiece_train.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/wordpiece.h"

static const char *const SPECIALS[5] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};

static uint64_t hash_str(const char *s, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t k;
        memcpy(&k, s, 8);
        h = (h ^ k) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 31;
        s += 8, n -= 8;
    }
    uint64_t k = 0;
    memcpy(&k, s, n);
    h = (h ^ k) * 0x94d049bb133111ebull;
    return h ^ (h >> 29);
}

// ---- String table: byte strings (kept in one pool) -> a 64-bit value; open addressing, never shrinks.

typedef struct {
    uint64_t h, val;
    size_t off, len;  // off == SIZE_MAX: empty slot
} StrSlot;

typedef struct {
    StrSlot *slots;
    size_t cap, n;  // cap is a power of two, n <= cap / 2
    char *pool;
    size_t pool_len, pool_cap;
} StrTable;

static int st_init(StrTable *t, size_t cap) {
    memset(t, 0, sizeof(*t));
    t->cap = cap;
    t->slots = malloc(cap * sizeof(StrSlot));
    if (!t->slots) return -1;
    for (size_t i = 0; i < cap; i++) t->slots[i].off = SIZE_MAX;
    return 0;
}

static void st_free(StrTable *t) {
    free(t->slots);
    free(t->pool);
    memset(t, 0, sizeof(*t));
}

static StrSlot *st_probe(const StrTable *t, const char *s, size_t n, uint64_t h) {
    for (size_t i = h & (t->cap - 1);; i = (i + 1) & (t->cap - 1)) {
        StrSlot *e = &t->slots[i];
        if (e->off == SIZE_MAX) return e;
        if (e->h == h && e->len == n && memcmp(t->pool + e->off, s, n) == 0) return e;
    }
}

static int st_grow(StrTable *t) {
    StrTable bigger = *t;
    bigger.cap = t->cap * 2;
    bigger.slots = malloc(bigger.cap * sizeof(StrSlot));
    if (!bigger.slots) return -1;
    for (size_t i = 0; i < bigger.cap; i++) bigger.slots[i].off = SIZE_MAX;
    for (size_t i = 0; i < t->cap; i++) {
        const StrSlot *e = &t->slots[i];
        if (e->off == SIZE_MAX) continue;
        size_t j = e->h & (bigger.cap - 1);
        while (bigger.slots[j].off != SIZE_MAX) j = (j + 1) & (bigger.cap - 1);
        bigger.slots[j] = *e;
    }
    free(t->slots);
    *t = bigger;
    return 0;
}

// The slot of s, inserted with value 0 if absent (*added = 1). NULL when out of memory.
static StrSlot *st_upsert(StrTable *t, const char *s, size_t n, int *added) {
    uint64_t h = hash_str(s, n);
    StrSlot *e = st_probe(t, s, n, h);
    *added = 0;
    if (e->off != SIZE_MAX) return e;
    if (2 * (t->n + 1) > t->cap) {
        if (st_grow(t)) return NULL;
        e = st_probe(t, s, n, h);
    }
    if (t->pool_len + n + 1 > t->pool_cap) {
        size_t nc = t->pool_cap ? t->pool_cap : 1 << 16;
        while (t->pool_len + n + 1 > nc) nc *= 2;
        char *np = realloc(t->pool, nc);
        if (!np) return NULL;
        t->pool = np, t->pool_cap = nc;
    }
    memcpy(t->pool + t->pool_len, s, n);
    t->pool[t->pool_len + n] = '\0';
    *e = (StrSlot){.h = h, .val = 0, .off = t->pool_len, .len = n};
    t->pool_len += n + 1;
    t->n++;
    *added = 1;
    return e;
}

static const StrSlot *st_find(const StrTable *t, const char *s, size_t n) {
    const StrSlot *e = st_probe(t, s, n, hash_str(s, n));
    return e->off == SIZE_MAX ? NULL : e;
}

// ---- Word counts

struct WpCounts {
    StrTable words;  // word -> count
    uint64_t total;
    int lower, oom;
};

WpCounts *wp_counts_new(int lower) {
    WpCounts *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    if (st_init(&c->words, 1 << 12)) { free(c); return NULL; }
    c->lower = lower;
    return c;
}

void wp_counts_free(WpCounts *c) {
    if (!c) return;
    st_free(&c->words);
    free(c);
}

int wp_counts_add_word(WpCounts *c, const char *word, size_t len, uint64_t n) {
    int added;
    StrSlot *e = st_upsert(&c->words, word, len, &added);
    if (!e) return c->oom = -1;
    e->val += n;
    c->total += n;
    return 0;
}

static void count_word(void *ctx, const char *word, size_t len) {
    WpCounts *c = ctx;
    if (!c->oom) wp_counts_add_word(c, word, len, 1);
}

int wp_counts_add_text(WpCounts *c, const char *text, size_t len) {
    wp_pretokenize(text, len, c->lower, count_word, c);
    return c->oom;
}

int wp_counts_merge(WpCounts *dst, const WpCounts *src) {
    for (size_t i = 0; i < src->words.cap; i++) {
        const StrSlot *e = &src->words.slots[i];
        if (e->off != SIZE_MAX && wp_counts_add_word(dst, src->words.pool + e->off, e->len, e->val)) return -1;
    }
    return 0;
}

size_t wp_counts_unique(const WpCounts *c) { return c->words.n; }
uint64_t wp_counts_total(const WpCounts *c) { return c->total; }
uint64_t wp_counts_get(const WpCounts *c, const char *word, size_t len) {
    const StrSlot *e = st_find(&c->words, word, len);
    return e ? e->val : 0;
}

// ---- UTF-8 (words come from wp_pretokenize, so they are valid)

static size_t utf8_next(const unsigned char *s, uint32_t *cp) {
    if (s[0] < 0x80) { *cp = s[0]; return 1; }
    if ((s[0] & 0xE0) == 0xC0) { *cp = ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F); return 2; }
    if ((s[0] & 0xF0) == 0xE0) {
        *cp = ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        return 3;
    }
    *cp = ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) | ((uint32_t)(s[2] & 0x3F) << 6) |
          (s[3] & 0x3F);
    return 4;
}

// ---- Pair counts: (left id, right id) packed as left << 32 | right -> count, and a per-pair scratch value.

#define PAIR(a, b) (((uint64_t)(a) << 32) | (uint32_t)(b))
#define PAIR_EMPTY UINT64_MAX

typedef struct {
    uint64_t *keys;
    int64_t *count;
    size_t cap, n;
} PairMap;

static int pm_init(PairMap *m, size_t cap) {
    m->cap = cap, m->n = 0;
    m->keys = malloc(cap * sizeof(uint64_t));
    m->count = calloc(cap, sizeof(int64_t));
    if (!m->keys || !m->count) return -1;
    memset(m->keys, 0xFF, cap * sizeof(uint64_t));
    return 0;
}

static void pm_free(PairMap *m) {
    free(m->keys);
    free(m->count);
}

static size_t pm_slot(const PairMap *m, uint64_t key) {
    uint64_t h = key * 0x9E3779B97F4A7C15ull;
    for (size_t i = (h >> 17) & (m->cap - 1);; i = (i + 1) & (m->cap - 1))
        if (m->keys[i] == key || m->keys[i] == PAIR_EMPTY) return i;
}

// Index of key's slot, inserted with count 0 if absent; SIZE_MAX when out of memory.
static size_t pm_get(PairMap *m, uint64_t key) {
    size_t i = pm_slot(m, key);
    if (m->keys[i] == key) return i;
    if (2 * (m->n + 1) > m->cap) {
        PairMap big;
        if (pm_init(&big, m->cap * 2)) { pm_free(&big); return SIZE_MAX; }
        for (size_t j = 0; j < m->cap; j++) {
            if (m->keys[j] == PAIR_EMPTY) continue;
            size_t k = pm_slot(&big, m->keys[j]);
            big.keys[k] = m->keys[j];
            big.count[k] = m->count[j];
        }
        big.n = m->n;
        pm_free(m);
        *m = big;
        i = pm_slot(m, key);
    }
    m->keys[i] = key;
    m->n++;
    return i;
}

// ---- The merge queue: a binary max-heap of (count, pair) with the words the pair was seen in.

typedef struct {
    uint64_t count;
    uint64_t pair;
    uint32_t *pos;  // word indices (distinct)
    uint32_t npos;
} Merge;

typedef struct {
    Merge *a;
    size_t n, cap;
} Heap;

// x comes out before y: a higher count, or the same count and the smaller pair (Hugging Face's Ord for Merge).
static int merge_first(const Merge *x, const Merge *y) {
    return x->count != y->count ? x->count > y->count : x->pair < y->pair;
}

static int heap_push(Heap *h, Merge m) {
    if (h->n == h->cap) {
        size_t nc = h->cap ? 2 * h->cap : 1024;
        Merge *na = realloc(h->a, nc * sizeof(Merge));
        if (!na) return -1;
        h->a = na, h->cap = nc;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!merge_first(&m, &h->a[p])) break;
        h->a[i] = h->a[p];
        i = p;
    }
    h->a[i] = m;
    return 0;
}

static Merge heap_pop(Heap *h) {
    Merge top = h->a[0], last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && merge_first(&h->a[c + 1], &h->a[c])) c++;
        if (!merge_first(&h->a[c], &last)) break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n > 0) h->a[i] = last;
    return top;
}

// ---- Pair changes of one merge step: (pair, +-1, word), applied after all the words are merged.

typedef struct {
    uint64_t pair;
    uint32_t word;
    int32_t delta;
} Change;

typedef struct {
    Change *a;
    size_t n, cap;
    int oom;
} Changes;

static void change_add(Changes *c, uint64_t pair, int32_t delta, uint32_t word) {
    if (c->n == c->cap) {
        size_t nc = c->cap ? 2 * c->cap : 4096;
        Change *na = realloc(c->a, nc * sizeof(Change));
        if (!na) { c->oom = 1; return; }
        c->a = na, c->cap = nc;
    }
    c->a[c->n++] = (Change){pair, word, delta};
}

static int change_cmp(const void *x, const void *y) {
    const Change *a = x, *b = y;
    if (a->pair != b->pair) return a->pair < b->pair ? -1 : 1;
    return (a->word > b->word) - (a->word < b->word);
}

// Merge every non-overlapping (a, b), left to right, into rep in one word; the neighbours' pair counts change
// as Hugging Face's Word::merge reports them (the merged pair itself is not decremented there either).
static void merge_word(uint32_t *sym, uint32_t *len, uint32_t a, uint32_t b, uint32_t rep, uint32_t w, Changes *ch) {
    uint32_t n = *len, out = 0, r = 0;
    while (r < n) {
        if (sym[r] == a && r + 1 < n && sym[r + 1] == b) {
            if (out > 0) {
                change_add(ch, PAIR(sym[out - 1], a), -1, w);
                change_add(ch, PAIR(sym[out - 1], rep), 1, w);
            }
            sym[out++] = rep;
            r += 2;
            if (r < n) {
                change_add(ch, PAIR(b, sym[r]), -1, w);
                change_add(ch, PAIR(rep, sym[r]), 1, w);
            }
        } else {
            sym[out++] = sym[r++];
        }
    }
    *len = out;
}

// ---- The vocabulary being built: token string -> id, and id -> token.

typedef struct {
    StrTable map;  // token -> id
    size_t *off;   // [n] offset of id's token in map.pool
    size_t n, cap;
} Vocab;

// Id of token s[0..n), added at the end if new; -1 when out of memory.
static int64_t vocab_get_or_add(Vocab *v, const char *s, size_t n) {
    int added;
    StrSlot *e = st_upsert(&v->map, s, n, &added);
    if (!e) return -1;
    if (!added) return (int64_t)e->val;
    if (v->n == v->cap) {
        size_t nc = v->cap ? 2 * v->cap : 1024;
        size_t *no = realloc(v->off, nc * sizeof(size_t));
        if (!no) return -1;
        v->off = no, v->cap = nc;
    }
    e->val = v->n;
    v->off[v->n] = e->off;
    return (int64_t)v->n++;
}

static const char *vocab_token(const Vocab *v, uint32_t id) { return v->map.pool + v->off[id]; }

// ---- Training

typedef struct {
    uint32_t cp;
    uint64_t count;
} CharCount;

static int by_count_then_cp_desc(const void *x, const void *y) {
    const CharCount *a = x, *b = y;
    if (a->count != b->count) return a->count < b->count ? -1 : 1;
    return (a->cp < b->cp) - (a->cp > b->cp);
}

static int by_cp(const void *x, const void *y) {
    const CharCount *a = x, *b = y;
    return (a->cp > b->cp) - (a->cp < b->cp);
}

// Adds the alphabet to v (specials already there): the characters of the words weighted by the words' counts,
// the limit_alphabet most frequent kept (the rarest dropped; equal counts drop the higher code point first),
// in code point order.
static int add_alphabet(const WpCounts *c, size_t limit, Vocab *v, size_t *n_alphabet) {
    uint64_t *cc = calloc(0x110000, sizeof(uint64_t));
    if (!cc) return -1;
    size_t distinct = 0;
    for (size_t i = 0; i < c->words.cap; i++) {
        const StrSlot *e = &c->words.slots[i];
        if (e->off == SIZE_MAX) continue;
        const unsigned char *s = (const unsigned char *)c->words.pool + e->off;
        for (size_t k = 0; k < e->len;) {
            uint32_t cp;
            k += utf8_next(s + k, &cp);
            distinct += cc[cp] == 0;
            cc[cp] += e->val;
        }
    }
    CharCount *kept = malloc((distinct + 1) * sizeof(CharCount));
    if (!kept) { free(cc); return -1; }
    size_t n = 0;
    for (uint32_t cp = 0; cp < 0x110000; cp++)
        if (cc[cp]) kept[n++] = (CharCount){cp, cc[cp]};
    free(cc);
    size_t drop = 0;
    if (limit && n > limit) {
        qsort(kept, n, sizeof(CharCount), by_count_then_cp_desc);
        drop = n - limit;
        qsort(kept + drop, limit, sizeof(CharCount), by_cp);
    }
    size_t before = v->n;
    for (size_t i = drop; i < n; i++) {
        char buf[4];
        uint32_t cp = kept[i].cp;
        size_t len;
        if (cp < 0x80) buf[0] = (char)cp, len = 1;
        else if (cp < 0x800) buf[0] = (char)(0xC0 | (cp >> 6)), buf[1] = (char)(0x80 | (cp & 0x3F)), len = 2;
        else if (cp < 0x10000)
            buf[0] = (char)(0xE0 | (cp >> 12)), buf[1] = (char)(0x80 | ((cp >> 6) & 0x3F)),
            buf[2] = (char)(0x80 | (cp & 0x3F)), len = 3;
        else
            buf[0] = (char)(0xF0 | (cp >> 18)), buf[1] = (char)(0x80 | ((cp >> 12) & 0x3F)),
            buf[2] = (char)(0x80 | ((cp >> 6) & 0x3F)), buf[3] = (char)(0x80 | (cp & 0x3F)), len = 4;
        if (vocab_get_or_add(v, buf, len) < 0) { free(kept); return -1; }
    }
    *n_alphabet = v->n - before;
    free(kept);
    return 0;
}

// The order in which words get their symbols (and so the "##c" tokens their ids): by count, most frequent
// first, then by bytes.
static const StrTable *g_sort_words;
static int by_count_then_bytes(const void *x, const void *y) {
    const StrSlot *a = &g_sort_words->slots[*(const size_t *)x], *b = &g_sort_words->slots[*(const size_t *)y];
    if (a->val != b->val) return a->val > b->val ? -1 : 1;
    size_t n = MLM_MIN(a->len, b->len);
    int r = memcmp(g_sort_words->pool + a->off, g_sort_words->pool + b->off, n);
    if (r) return r;
    return (a->len > b->len) - (a->len < b->len);
}

typedef struct {
    uint32_t *sym;     // every word's symbols, back to back (a word shrinks in place as it merges)
    size_t *start;     // [n_words] first symbol of each word
    uint32_t *len;     // [n_words] symbols of each word now
    uint64_t *count;   // [n_words]
    size_t n_words;
} Words;

static void words_free(Words *w) {
    free(w->sym);
    free(w->start);
    free(w->len);
    free(w->count);
}

// Split each word into alphabet symbols ("c" first, "##c" after; characters outside the alphabet are skipped,
// as in Hugging Face, and position, not symbol, decides the "##").
static int split_words(const WpCounts *c, Vocab *v, Words *w) {
    size_t nw = c->words.n, nbytes = 0;
    size_t *order = malloc((nw + 1) * sizeof(size_t));
    w->start = malloc((nw + 1) * sizeof(size_t));
    w->len = malloc((nw + 1) * sizeof(uint32_t));
    w->count = malloc((nw + 1) * sizeof(uint64_t));
    if (!order || !w->start || !w->len || !w->count) { free(order); return -1; }
    size_t k = 0;
    for (size_t i = 0; i < c->words.cap; i++)
        if (c->words.slots[i].off != SIZE_MAX) order[k++] = i, nbytes += c->words.slots[i].len;
    g_sort_words = &c->words;
    qsort(order, nw, sizeof(size_t), by_count_then_bytes);
    w->sym = malloc((nbytes + 1) * sizeof(uint32_t));  // at most one symbol per byte
    if (!w->sym) { free(order); return -1; }
    char buf[8] = "##";
    size_t at = 0;
    for (size_t i = 0; i < nw; i++) {
        const StrSlot *e = &c->words.slots[order[i]];
        const unsigned char *s = (const unsigned char *)c->words.pool + e->off;
        w->start[i] = at;
        w->count[i] = e->val;
        for (size_t b = 0; b < e->len;) {
            uint32_t cp;
            size_t cl = utf8_next(s + b, &cp);
            if (st_find(&v->map, (const char *)s + b, cl)) {
                memcpy(buf + 2, s + b, cl);
                int64_t id = b == 0 ? vocab_get_or_add(v, buf + 2, cl) : vocab_get_or_add(v, buf, cl + 2);
                if (id < 0) { free(order); return -1; }
                w->sym[at++] = (uint32_t)id;
            }
            b += cl;
        }
        w->len[i] = (uint32_t)(at - w->start[i]);
    }
    w->n_words = nw;
    free(order);
    return 0;
}

// Pair counts over all words and one queue entry per pair with the words it occurs in.
static int count_pairs(const Words *w, PairMap *pc, Heap *q) {
    for (size_t i = 0; i < w->n_words; i++) {
        const uint32_t *s = w->sym + w->start[i];
        for (uint32_t j = 0; j + 1 < w->len[i]; j++) {
            size_t a = pm_get(pc, PAIR(s[j], s[j + 1]));
            if (a == SIZE_MAX) return -1;
            pc->count[a] += (int64_t)w->count[i];
        }
    }
    // Each pair's word list, exactly sized: count the distinct words per pair (the last word seen tells), then
    // fill. (pc no longer grows from here on, so its slots stay put.)
    uint32_t *last = malloc(pc->cap * sizeof(uint32_t)), *npos = calloc(pc->cap, sizeof(uint32_t));
    uint32_t **pos = calloc(pc->cap, sizeof(uint32_t *));
    int rc = -1;
    if (!last || !npos || !pos) goto done;
    for (int pass = 0; pass < 2; pass++) {
        memset(last, 0xFF, pc->cap * sizeof(uint32_t));
        for (size_t i = 0; i < w->n_words; i++) {
            const uint32_t *s = w->sym + w->start[i];
            for (uint32_t j = 0; j + 1 < w->len[i]; j++) {
                size_t a = pm_slot(pc, PAIR(s[j], s[j + 1]));
                if (last[a] == (uint32_t)i) continue;
                last[a] = (uint32_t)i;
                if (pass == 0) npos[a]++;
                else pos[a][npos[a]++] = (uint32_t)i;
            }
        }
        if (pass == 1) break;
        for (size_t k = 0; k < pc->cap; k++) {
            if (pc->keys[k] == PAIR_EMPTY) continue;
            if (!(pos[k] = malloc((size_t)npos[k] * sizeof(uint32_t)))) goto done;
            npos[k] = 0;
        }
    }
    rc = 0;
    for (size_t k = 0; k < pc->cap; k++) {
        if (pc->keys[k] == PAIR_EMPTY) continue;
        Merge m = {(uint64_t)pc->count[k], pc->keys[k], pos[k], npos[k]};
        if (rc == 0 && pc->count[k] > 0 && heap_push(q, m) == 0) pos[k] = NULL;
        else if (pc->count[k] > 0) rc = -1;
        free(pos[k]);
        pos[k] = NULL;
    }
done:
    if (rc && pos)
        for (size_t k = 0; k < pc->cap; k++) free(pos[k]);
    free(pos);
    free(last);
    free(npos);
    return rc;
}

// Queue entries for the pairs that gained words in this step (Hugging Face's where_to_update), each with
// the pair's whole count and only those words.
static int push_gained(Changes *ch, PairMap *pc, Heap *q) {
    size_t k = 0;
    for (size_t i = 0; i < ch->n; i++)
        if (ch->a[i].delta > 0) ch->a[k++] = ch->a[i];
    qsort(ch->a, k, sizeof(Change), change_cmp);
    for (size_t i = 0; i < k;) {
        size_t j = i;
        while (j < k && ch->a[j].pair == ch->a[i].pair) j++;
        int64_t count = pc->count[pm_slot(pc, ch->a[i].pair)];
        if (count > 0) {
            uint32_t *pos = malloc((j - i) * sizeof(uint32_t)), np = 0;
            if (!pos) return -1;
            for (size_t t = i; t < j; t++)
                if (np == 0 || pos[np - 1] != ch->a[t].word) pos[np++] = ch->a[t].word;
            if (heap_push(q, (Merge){(uint64_t)count, ch->a[i].pair, pos, np})) { free(pos); return -1; }
        }
        i = j;
    }
    return 0;
}

static int do_merges(const WpTrainConfig *cfg, Vocab *v, Words *w, PairMap *pc, Heap *q, size_t *n_merges) {
    Changes ch = {0};
    char *tok = NULL;
    size_t tokcap = 0;
    int rc = 0;
    while (v->n < cfg->vocab_size && q->n > 0) {
        Merge top = heap_pop(q);
        int64_t now = pc->count[pm_slot(pc, top.pair)];
        if (top.count != (uint64_t)now) {  // stale: push back with the current count
            top.count = (uint64_t)now;
            if (heap_push(q, top)) { free(top.pos); rc = -1; break; }
            continue;
        }
        if (top.count < 1 || cfg->min_frequency > top.count) { free(top.pos); break; }
        uint32_t a = (uint32_t)(top.pair >> 32), b = (uint32_t)top.pair;
        const char *ta = vocab_token(v, a), *tb = vocab_token(v, b);
        if (tb[0] == '#' && tb[1] == '#') tb += 2;
        size_t la = strlen(ta), lb = strlen(tb);
        if (la + lb + 1 > tokcap) {
            tokcap = 2 * (la + lb + 1);
            char *nt = realloc(tok, tokcap);
            if (!nt) { free(top.pos); rc = -1; break; }
            tok = nt;
        }
        memcpy(tok, ta, la);
        memcpy(tok + la, tb, lb);
        int64_t rep = vocab_get_or_add(v, tok, la + lb);
        if (rep < 0) { free(top.pos); rc = -1; break; }
        (*n_merges)++;
        ch.n = 0;
        for (uint32_t k = 0; k < top.npos; k++) {
            uint32_t i = top.pos[k];
            merge_word(w->sym + w->start[i], &w->len[i], a, b, (uint32_t)rep, i, &ch);
        }
        free(top.pos);
        if (ch.oom) { rc = -1; break; }
        for (size_t k = 0; k < ch.n; k++) {
            size_t s = pm_get(pc, ch.a[k].pair);
            if (s == SIZE_MAX) { rc = -1; break; }
            pc->count[s] += (int64_t)ch.a[k].delta * (int64_t)w->count[ch.a[k].word];
        }
        if (rc || push_gained(&ch, pc, q)) { rc = -1; break; }
        if (cfg->progress && (*n_merges % 256 == 0)) cfg->progress(cfg->progress_ctx, v->n, cfg->vocab_size);
    }
    if (cfg->progress) cfg->progress(cfg->progress_ctx, v->n, cfg->vocab_size);
    free(ch.a);
    free(tok);
    return rc;
}

int wp_train(const WpCounts *c, const WpTrainConfig *cfg, WpVocabOut *out, char *err, size_t errlen) {
    memset(out, 0, sizeof(*out));
    Vocab v = {0};
    Words w = {0};
    PairMap pc = {0};
    Heap q = {0};
    int rc = -1;
    if (st_init(&v.map, 1 << 12)) goto done;
    for (int i = 0; i < 5; i++)
        if (vocab_get_or_add(&v, SPECIALS[i], strlen(SPECIALS[i])) < 0) goto done;
    out->n_specials = v.n;
    if (add_alphabet(c, cfg->limit_alphabet, &v, &out->n_alphabet)) goto done;
    if (split_words(c, &v, &w)) goto done;
    if (pm_init(&pc, 1 << 16) || count_pairs(&w, &pc, &q)) goto done;
    if (do_merges(cfg, &v, &w, &pc, &q, &out->n_merges)) goto done;
    out->tokens = calloc(v.n ? v.n : 1, sizeof(char *));
    if (!out->tokens) goto done;
    for (size_t i = 0; i < v.n; i++) {
        out->tokens[i] = strdup(vocab_token(&v, (uint32_t)i));
        if (!out->tokens[i]) goto done;
        out->n = i + 1;
    }
    rc = 0;
done:
    if (rc) {
        wp_vocab_out_free(out);
        mlm_set_error(err, errlen, "out of memory while training the vocabulary (%zu distinct words)",
                      wp_counts_unique(c));
    }
    for (size_t i = 0; i < q.n; i++) free(q.a[i].pos);
    free(q.a);
    pm_free(&pc);
    words_free(&w);
    st_free(&v.map);
    free(v.off);
    return rc;
}

void wp_vocab_out_free(WpVocabOut *v) {
    if (v->tokens)
        for (size_t i = 0; i < v->n; i++) free(v->tokens[i]);
    free(v->tokens);
    memset(v, 0, sizeof(*v));
}

int wp_write_vocab(const char *path, char *const *tokens, size_t n, char *err, size_t errlen) {
    size_t pl = strlen(path);
    char *tmp = malloc(pl + 32);
    if (!tmp) { mlm_set_error(err, errlen, "%s: out of memory", path); return -1; }
    snprintf(tmp, pl + 32, "%s.tmp.%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        mlm_set_error(err, errlen, "%s: cannot create %s: %s (is the directory writable?)", path, tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    int bad = 0;
    for (size_t i = 0; i < n && !bad; i++) bad = fputs(tokens[i], f) < 0 || fputc('\n', f) == EOF;
    bad |= fflush(f) != 0 || fsync(fileno(f)) != 0;
    int e = errno;
    bad |= fclose(f) != 0;
    if (!bad && rename(tmp, path) != 0) bad = 1, e = errno;
    if (bad) {
        remove(tmp);
        mlm_set_error(err, errlen, "%s: cannot write the vocabulary: %s", path, strerror(e));
    }
    free(tmp);
    return bad ? -1 : 0;
}
