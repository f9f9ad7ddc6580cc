// agree.c: the ranks' start-up agreement (agree.h): hashes of named values gathered on every rank, compared with
// rank 0's, and a refusal by every rank that names what differs where. Exchanged through dist_allgather_items, so
// this file needs no MPI of its own.
#include "mlm/agree.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"

static uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

// One 8-byte word at a time through xxHash64's round (multiply, rotate, multiply: every input bit reaches every
// bit of the state, so two differences cannot cancel as in plain FNV), then its final avalanche.
uint64_t agree_hash(const void *data, size_t bytes, uint64_t seed) {
    const unsigned char *p = (const unsigned char *)data;
    uint64_t h = seed ^ 0x27d4eb2f165667c5ull;
    size_t i = 0;
    for (; i + 8 <= bytes; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = rotl64(h + w * 0xc2b2ae3d27d4eb4full, 31) * 0x9e3779b185ebca87ull;
    }
    uint64_t tail = 0;
    memcpy(&tail, p + i, bytes - i);
    h = rotl64(h + (tail ^ (uint64_t)bytes) * 0xc2b2ae3d27d4eb4full, 31) * 0x9e3779b185ebca87ull;
    h ^= h >> 33;
    h *= 0xc2b2ae3d27d4eb4full;
    h ^= h >> 29;
    h *= 0x165667b19e3779f9ull;
    h ^= h >> 32;
    return h;
}

// What each rank sends per value: its hash (what is compared) and the start of its text (what the message shows).
enum { SHOWN = 48 };
typedef struct {
    uint64_t hash;
    char shown[SHOWN];
} AgreeItem;

// Every rank leaves MPI together and exits 2 (MPI_Finalize is collective, so no rank is killed mid-message).
static MLM_NORETURN void refuse_together(const Dist *d, const char *msg) {
    if (d->rank == 0) fprintf(stderr, "mlm: error: %s\n", msg);
    fflush(stdout);
    fflush(stderr);
    Dist copy = *d;
    dist_finalize(&copy);
    exit(MLM_EXIT_USAGE);
}

// Append printf-style text to msg[cap] (silently cut at its end).
static void append(char *msg, size_t cap, const char *fmt, ...) MLM_PRINTF(3, 4);
static void append(char *msg, size_t cap, const char *fmt, ...) {
    size_t len = strlen(msg);
    if (len + 1 >= cap) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + len, cap - len, fmt, ap);
    va_end(ap);
}

// The keys whose hash on some rank differs from rank 0's, each with rank 0's value and up to three other ranks'.
static int describe_differences(const Dist *d, const char *what, int n, const char *const *names,
                                const AgreeItem *all, char *msg, size_t cap) {
    enum { KEYS_SHOWN = 8, RANKS_SHOWN = 3 };
    int keys = 0;
    snprintf(msg, cap, "the %d ranks of this job do not run the same %s, so every rank refuses to start:", d->world,
             what);
    for (int i = 0; i < n; i++) {
        const AgreeItem *ref = &all[i];
        int differing = 0;
        for (int r = 1; r < d->world; r++) {
            const AgreeItem *it = &all[(size_t)r * n + i];
            if (it->hash == ref->hash) continue;
            if (differing == 0 && keys < KEYS_SHOWN)
                append(msg, cap, "%s %s is %s on rank 0", keys ? ";" : "", names[i], ref->shown);
            if (differing < RANKS_SHOWN && keys < KEYS_SHOWN) append(msg, cap, ", %s on rank %d", it->shown, r);
            differing++;
        }
        if (differing > RANKS_SHOWN && keys < KEYS_SHOWN)
            append(msg, cap, " (and %d more ranks differ)", differing - RANKS_SHOWN);
        keys += differing > 0;
    }
    if (keys > KEYS_SHOWN) append(msg, cap, "; and %d more keys differ", keys - KEYS_SHOWN);
    return keys;
}

int dist_require_same(const Dist *d, const char *what, const char *advice, int n, const char *const *names,
                      const char *const *values) {
    if (d->world == 1 || !d->mpi) return 0;
    // The list itself first (its length and names): ranks of different builds must not compare misaligned lists.
    uint64_t schema = agree_hash(&n, sizeof(n), 0);
    for (int i = 0; i < n; i++) schema = agree_hash(names[i], strlen(names[i]), schema);
    uint64_t *schemas = mlm_calloc((size_t)d->world, sizeof(uint64_t), "agreement schemas");
    schemas[d->rank] = schema;
    dist_allgather_items(d, schemas, (size_t)d->world, sizeof(uint64_t));
    for (int r = 1; r < d->world; r++) {
        if (schemas[r] == schemas[0]) continue;
        char msg[512];
        snprintf(msg, sizeof(msg), "rank %d compares another list of %s keys than rank 0: the ranks run different "
                 "mlm builds; start every rank with the same mlm binary", r, what);
        free(schemas);
        refuse_together(d, msg);
    }
    free(schemas);
    AgreeItem *all = mlm_calloc((size_t)d->world * (size_t)n, sizeof(AgreeItem), "agreement values");
    AgreeItem *mine = all + (size_t)d->rank * n;
    for (int i = 0; i < n; i++) {
        size_t len = strlen(values[i]);
        mine[i].hash = agree_hash(values[i], len, 0);
        if (len < SHOWN) {
            memcpy(mine[i].shown, values[i], len);
        } else {
            memcpy(mine[i].shown, values[i], SHOWN - 4);
            memcpy(mine[i].shown + SHOWN - 4, "...", 3);
        }
    }
    dist_allgather_items(d, all, (size_t)d->world, (size_t)n * sizeof(AgreeItem));
    char msg[8192];
    int keys = describe_differences(d, what, n, names, all, msg, sizeof(msg));
    free(all);
    if (keys == 0) return 1;
    append(msg, sizeof(msg), ". %s", advice);
    refuse_together(d, msg);
}
