// shard_verify.c: reading every byte of a shard set once before it is trusted (each shard's payload checksum and
// token ids, the shards in parallel), and the run directory's stamp that lets a resumed run skip it while the files
// are unchanged.
//
// Why once per run and not per open: the payload is all of the data (gigabytes for a real corpus), so a resume or
// a restart after a crash should not read it again; the stamp names each file by device, inode, size and the
// modification and change times it had when it was verified. Writing a file changes its change time, which no
// user command can set back, so a stamp that matches means the very bytes that were verified. One exception, the
// one git calls "racily clean": file times tick coarsely (milliseconds, or 1-2 s on some file systems), so a file
// written again within the tick in which it was verified keeps its times. A file changed less than
// STAMP_RACY_NS before its verification started is therefore left out of the stamp (read again next time).
#define _DEFAULT_SOURCE  // madvise
#include <errno.h>
#include <inttypes.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mlm/common.h"
#include "mlm/shards.h"

#define VERIFY_CHUNK ((size_t)1 << 20)            // bytes hashed and range-checked at a time
#define VERIFY_PROGRESS_BYTES ((uint64_t)256 << 20)  // sets from this size show progress
#define STAMP_RACY_NS 2000000000ull                  // files changed this shortly before a verification: not stamped

// The first token of tokens[0, n) (ids of `width` bytes) at or above V, or n.
static size_t first_outside(const uint8_t *tokens, size_t n, uint32_t width, uint32_t V) {
    uint32_t bad = 0;
    if (width == 2) {
        const uint16_t *t = (const uint16_t *)tokens;
        for (size_t i = 0; i < n; i++) bad |= t[i] >= V;
    } else {
        const uint32_t *t = (const uint32_t *)tokens;
        for (size_t i = 0; i < n; i++) bad |= t[i] >= V;
    }
    if (!bad) return n;
    for (size_t i = 0; i < n; i++) {
        uint32_t v;
        if (width == 2) { uint16_t x; memcpy(&x, tokens + 2 * i, 2); v = x; }
        else memcpy(&v, tokens + 4 * i, 4);
        if (v >= V) return i;
    }
    return n;
}

int shard_verify(const Shard *s, uint64_t *done, char *err, size_t errlen) {
    const ShardHeader *h = &s->h;
    const uint8_t *p = s->map + SHARD_HEADER_BYTES;
    size_t len = s->map_len - SHARD_HEADER_BYTES;
    uint64_t tok_bytes = h->n_tokens * h->token_bytes, bad_token = UINT64_MAX, hash = SHARD_FNV_INIT;
    for (size_t off = 0; off < len; off += VERIFY_CHUNK) {
        size_t n = MLM_MIN(VERIFY_CHUNK, len - off);
        hash = shard_fnv1a(hash, p + off, n);
        if (off < tok_bytes && bad_token == UINT64_MAX) {  // chunks are multiples of 4 bytes: whole tokens
            size_t nt = (size_t)MLM_MIN((uint64_t)n, tok_bytes - off) / h->token_bytes;
            size_t i = first_outside(p + off, nt, h->token_bytes, h->vocab_size);
            if (i < nt) bad_token = off / h->token_bytes + i;
        }
        madvise((void *)(((uintptr_t)(p + off)) & ~(uintptr_t)4095), n, MADV_DONTNEED);  // read once: let it go
        if (done) {
#pragma omp atomic
            *done += n;
        }
    }
    char where[200] = "";
    if (bad_token != UINT64_MAX) {
        uint32_t v;
        if (h->token_bytes == 2) { uint16_t x; memcpy(&x, p + 2 * bad_token, 2); v = x; }
        else memcpy(&v, p + 4 * bad_token, 4);
        snprintf(where, sizeof(where), "token %" PRIu64 " (byte offset %" PRIu64 ") is id %u, outside the vocabulary of %u ids",
                 bad_token, SHARD_HEADER_BYTES + bad_token * h->token_bytes, v, h->vocab_size);
    }
    if (hash != h->payload_hash) {
        mlm_set_error(err, errlen, "shard %s: its payload (bytes %d..%zu) fails its checksum (corrupt)%s%s; run `mlm "
                      "prepare` again to rebuild the shard set", s->path, SHARD_HEADER_BYTES, s->map_len - 1,
                      where[0] ? "; first damage seen: " : "", where);
        return 1;
    }
    if (where[0]) {
        mlm_set_error(err, errlen, "shard %s: %s; run `mlm prepare` again to rebuild the shard set", s->path, where);
        return 1;
    }
    return 0;
}

// ---- The stamp: RUN_DIR/SHARD_VERIFIED_STAMP

// One line per shard: its key as opened, and its path (last, so that spaces in it need no quoting).
static void stamp_line(const Shard *s, char *out, size_t outlen) {
    snprintf(out, outlen, "shard = %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %s\n", s->dev, s->ino,
             s->size, s->mtime_ns, s->ctime_ns, s->path);
}

static uint64_t realtime_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

// The stamp's text for these shards (malloc'ed): the set identity, the shards verified from `started` on (those not
// changed just before it), a checksum line over them.
static char *stamp_text(const ShardSet *set, Shard **shards, int n, uint64_t started) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) mlm_fatal(MLM_EXIT_FAILURE, "out of memory");
    fprintf(f, "# mlm: the shard set below was verified for this run (every shard's payload checksum and token ids);\n"
               "# a resumed run skips that while each shard keeps its device, inode, size, mtime and ctime\n");
    fprintf(f, "set = %s %s\n", set->md5, set->m.dir);
    char line[1400];
    for (int i = 0; i < n; i++) {
        if (shards[i]->ctime_ns + STAMP_RACY_NS >= started) continue;  // racily clean: read it again next time
        stamp_line(shards[i], line, sizeof(line));
        fputs(line, f);
    }
    fclose(f);
    char md5[33];
    data_md5(text, len, md5);
    char *all = mlm_malloc(len + 48, "stamp");
    snprintf(all, len + 48, "%schecksum = %s\n", text, md5);
    free(text);
    return all;
}

// 1 if the stamp in stamp_dir lists this set and every one of these shards with the key it has now.
static int stamp_matches(const char *stamp_dir, const ShardSet *set, Shard **shards, int n) {
    char path[1200], why[8];
    snprintf(path, sizeof(path), "%s/" SHARD_VERIFIED_STAMP, stamp_dir);
    size_t len;
    char *have = mlm_read_regular(path, "verification stamp", MANIFEST_MAX_BYTES, &len, why, sizeof(why));
    if (!have) return 0;
    // The stamp may list more shards than asked for (eval reads one split of what train verified): each wanted
    // line must be in it, and the stamp itself intact.
    int ok = 0;
    char *sum = strstr(have, "\nchecksum = ");
    if (sum) {
        char md5[33];
        data_md5(have, (size_t)(sum + 1 - have), md5);
        ok = strlen(sum) == 12 + 32 + 1 && !strncmp(sum + 12, md5, 32);
        sum[1] = '\0';
    }
    char line[1400];
    snprintf(line, sizeof(line), "\nset = %s %s\n", set->md5, set->m.dir);
    ok = ok && strstr(have, line) != NULL;
    for (int i = 0; ok && i < n; i++) {
        line[0] = '\n';
        stamp_line(shards[i], line + 1, sizeof(line) - 1);
        ok = strstr(have, line) != NULL;
    }
    free(have);
    return ok;
}

static void stamp_write(const char *stamp_dir, const ShardSet *set, Shard **shards, int n, uint64_t started) {
    char path[1200], tmp[1300];
    snprintf(path, sizeof(path), "%s/" SHARD_VERIFIED_STAMP, stamp_dir);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    char *text = stamp_text(set, shards, n, started);
    FILE *f = fopen(tmp, "w");
    int ok = f && fputs(text, f) >= 0;
    ok = (f && fclose(f) == 0) && ok && rename(tmp, path) == 0;
    if (!ok) {
        // Not fatal: the set was verified; a later resume verifies it again.
        mlm_warn("cannot write %s (%s); a resumed run will verify the shard set again", path, strerror(errno));
        unlink(tmp);
    }
    free(text);
}

// ---- The whole set

static void show_progress(uint64_t done, uint64_t total, double t0, int last) {
    double dt = mlm_now() - t0;
    fprintf(stderr, "\rverifying the shard set: %.0f of %.0f MB (%.0f%%), %.0f MB/s%s", (double)done / 1e6,
            (double)total / 1e6, 100.0 * (double)done / (double)(total ? total : 1), (double)done / 1e6 / (dt > 0 ? dt : 1e-9),
            last ? "\n" : "");
}

int shard_set_verify(ShardSet *set, int splits, const char *stamp_dir, int write_stamp, int quiet,
                     ShardVerifyResult *res, char *err, size_t errlen) {
    memset(res, 0, sizeof(*res));
    double t0 = mlm_now();
    uint64_t started = realtime_ns();
    int n = 0;
    Shard **shards = mlm_calloc((size_t)set->train.n + (size_t)set->valid.n + 1, sizeof(Shard *), "shard list");
    if (splits & SHARD_VERIFY_TRAIN)
        for (int i = 0; i < set->train.n; i++) shards[n++] = &set->train.shards[i];
    if (splits & SHARD_VERIFY_VALID)
        for (int i = 0; i < set->valid.n; i++) shards[n++] = &set->valid.shards[i];
    res->n_shards = n;
    for (int i = 0; i < n; i++) res->bytes += shards[i]->map_len - SHARD_HEADER_BYTES;
    if (stamp_dir && stamp_matches(stamp_dir, set, shards, n)) {
        res->from_stamp = 1;
        free(shards);
        return 0;
    }
    // Largest first, one shard per task: the hash is sequential within a shard, so shards are the parallel unit.
    for (int i = 1; i < n; i++)
        for (int k = i; k > 0 && shards[k]->map_len > shards[k - 1]->map_len; k--) {
            Shard *t = shards[k]; shards[k] = shards[k - 1]; shards[k - 1] = t;
        }
    int show = !quiet && res->bytes >= VERIFY_PROGRESS_BYTES;
    uint64_t done = 0;
    int failed = n;  // index of the first failing shard in list order (the message does not depend on timing)
    double t_show = t0;
#pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < n; i++) {
        char why[1600];
        if (shard_verify(shards[i], &done, why, sizeof(why))) {
#pragma omp critical(shard_verify_fail)
            if (i < failed) {
                failed = i;
                mlm_set_error(err, errlen, "%s", why);
            }
        }
        if (show && omp_get_thread_num() == 0 && mlm_now() - t_show > 0.5) {
            uint64_t seen;
#pragma omp atomic read
            seen = done;
            show_progress(seen, res->bytes, t0, 0);
            t_show = mlm_now();
        }
    }
    if (show) show_progress(res->bytes, res->bytes, t0, 1);
    res->seconds = mlm_now() - t0;
    if (failed == n && stamp_dir && write_stamp) stamp_write(stamp_dir, set, shards, n, started);
    free(shards);
    return failed < n;
}
