// batcher.c: the reference's sequence sampling (random offsets, per-epoch shuffle, partial last batch).
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/shards.h"

// Uniform integer in [0, n) from one 32-bit draw (multiply-shift; bias below 2^-32 * n, negligible here).
static size_t bounded(uint32_t u, size_t n) { return (size_t)(((uint64_t)u * (uint64_t)n) >> 32); }

void batcher_init(Batcher *b, const int *tokens, size_t n_tokens, int seq_len, int batch_size, int shuffle,
                  uint64_t seed, uint64_t stream) {
    memset(b, 0, sizeof(*b));
    b->tokens = tokens;
    b->n_tokens = n_tokens;
    b->seq_len = seq_len;
    b->batch_size = batch_size;
    b->shuffle = shuffle;
    b->stream = stream;
    b->n_items = n_tokens > 1 ? (n_tokens - 1) / (size_t)seq_len : 0;
    if (b->n_items == 0)
        mlm_fatal(MLM_EXIT_FAILURE, "%zu tokens hold no sequence of data.seq_len + 1 = %d; use more text or a "
                  "smaller data.seq_len", n_tokens, seq_len + 1);
    b->n_batches = MLM_CEIL_DIV(b->n_items, (size_t)batch_size);
    // Each batcher (train, valid) gets its own DATA stream so their draws never overlap.
    rng_init(&b->rng, seed ^ (0xD1B54A32D192ED03ull * (stream + 1)), RNG_DOMAIN_DATA);
    b->order = mlm_malloc(b->n_items * sizeof(size_t), "epoch order");
    b->offsets = mlm_malloc(b->n_items * sizeof(int), "sequence offsets");
    b->epoch = -1;
}

// ---- Shard streams: order and offsets computed per item (memory independent of the corpus size).

static uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27; x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t epoch_key(const Batcher *b, uint64_t salt) { return mix64(b->key ^ mix64(4 * (uint64_t)b->epoch + salt)); }

// A balanced 4-round Feistel network: a bijection of [0, 2^(2 half)).
static uint64_t feistel(uint64_t x, int half, uint64_t key) {
    uint64_t mask = (1ull << half) - 1, l = x >> half, r = x & mask;
    for (uint64_t round = 1; round <= 4; round++) {
        uint64_t t = l ^ (mix64(r ^ key ^ (0x9E3779B97F4A7C15ull * round)) & mask);
        l = r;
        r = t;
    }
    return (l << half) | r;
}

// The item at position pos of the epoch: cycle-walking the Feistel bijection back into [0, n) gives a
// permutation of [0, n) (expected fewer than 4 steps: the domain is below 4 n).
static size_t stream_item(const Batcher *b, size_t pos) {
    if (!b->shuffle) return pos;
    int bits = 2;
    while (bits < 62 && (1ull << bits) < (uint64_t)b->n_items) bits += 2;
    uint64_t x = pos, key = epoch_key(b, 1);
    do x = feistel(x, bits / 2, key);
    while (x >= (uint64_t)b->n_items);
    return (size_t)x;
}

static size_t stream_offset(const Batcher *b, size_t item) {
    if (b->packed) return 0;
    size_t T = (size_t)b->seq_len, start = item * T;
    size_t hi = MLM_MIN(T - 1, b->n_tokens - (start + T + 1));
    return bounded((uint32_t)(mix64(epoch_key(b, 2) ^ item) >> 32), hi + 1);
}

void batcher_init_stream(Batcher *b, const ShardStream *st, int packed, int sep_id, int seq_len, int batch_size,
                         int shuffle, uint64_t seed, uint64_t stream) {
    memset(b, 0, sizeof(*b));
    b->shards = st;
    b->packed = packed;
    b->sep_id = sep_id;
    b->seq_len = seq_len;
    b->batch_size = batch_size;
    b->shuffle = shuffle;
    b->stream = stream;
    b->n_tokens = (size_t)(packed ? shard_stream_packed_len(st) : st->n_tokens);
    b->n_items = b->n_tokens > 1 ? (b->n_tokens - 1) / (size_t)seq_len : 0;
    if (b->n_items == 0)
        mlm_fatal(MLM_EXIT_FAILURE, "%zu tokens hold no sequence of data.seq_len + 1 = %d; use more text or a "
                  "smaller data.seq_len", b->n_tokens, seq_len + 1);
    b->n_batches = MLM_CEIL_DIV(b->n_items, (size_t)batch_size);
    b->key = seed ^ (0xD1B54A32D192ED03ull * (stream + 1));
    b->epoch = -1;
}

void batcher_free(Batcher *b) {
    rng_free(&b->rng);
    free(b->order);
    free(b->offsets);
    b->order = NULL;
    b->offsets = NULL;
}

void batcher_set_epoch(Batcher *b, long epoch) {
    if (b->shards) {  // computed per item
        b->epoch = epoch;
        return;
    }
    size_t n = b->n_items, T = (size_t)b->seq_len;
    uint32_t *u = mlm_malloc(2 * n * sizeof(uint32_t), "batcher random draws");
    // Epoch e owns outputs [2 n e, 2 n (e + 1)): n for the shuffle, n for the offsets.
    rng_u32(&b->rng, 2 * (uint64_t)n * (uint64_t)epoch, u, 2 * n);
    for (size_t i = 0; i < n; i++) b->order[i] = i;
    if (b->shuffle) {
        for (size_t i = n - 1; i > 0; i--) {  // Fisher-Yates: a permutation drawn without replacement
            size_t j = bounded(u[i], i + 1);
            size_t t = b->order[i];
            b->order[i] = b->order[j];
            b->order[j] = t;
        }
    }
    for (size_t i = 0; i < n; i++) {
        // Offsets are drawn per item (not per position), as the dataset's __getitem__ draws them.
        size_t start = i * T;
        size_t room = b->n_tokens - (start + T + 1);  // >= 0 since i < (N - 1) / T
        size_t hi = MLM_MIN(T - 1, room);
        b->offsets[i] = (int)bounded(u[n + i], hi + 1);
    }
    free(u);
    b->epoch = epoch;
}

size_t batcher_item_start(const Batcher *b, size_t pos) {
    if (b->shards) {
        size_t it = stream_item(b, pos);
        return it * (size_t)b->seq_len + stream_offset(b, it);
    }
    size_t item = b->order[pos];
    return item * (size_t)b->seq_len + (size_t)b->offsets[item];
}

int batcher_get(const Batcher *b, size_t index, int *out) {
    size_t first = index * (size_t)b->batch_size;
    int count = (int)MLM_MIN((size_t)b->batch_size, b->n_items - first);
    for (int r = 0; r < count; r++) {
        size_t start = batcher_item_start(b, first + (size_t)r);
        int *row = out + (size_t)r * b->seq_len;
        if (!b->shards) memcpy(row, b->tokens + start, (size_t)b->seq_len * sizeof(int));
        else if (b->packed) shard_stream_packed_read(b->shards, start, (size_t)b->seq_len, b->sep_id, row);
        else shard_stream_read(b->shards, start, (size_t)b->seq_len, row);
    }
    return count;
}
