// corpus_shards.c: a Corpus from a shard set written by `mlm prepare` (data.path naming its directory), and the
// verification of its contents before training reads them.
#include <stdlib.h>
#include <string.h>

#include "mlm/common.h"
#include "mlm/data.h"
#include "mlm/shards.h"

void corpus_load_shards(Corpus *c, const char *path, int seq_len) {
    memset(c, 0, sizeof(*c));
    snprintf(c->path, sizeof(c->path), "%s", path);
    ShardSet *s = mlm_calloc(1, sizeof(ShardSet), "shard set");
    char err[2048];
    if (shard_set_open(s, path, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "data.path %s: %s", path, err);
    if (manifest_vocab(&s->m, &c->vocab, err, sizeof(err))) mlm_fatal(MLM_EXIT_FAILURE, "data.path %s: %s", path, err);
    c->shards = s;
    c->n_train = (size_t)s->train.n_tokens;
    c->n_valid = (size_t)s->valid.n_tokens;
    c->n_chars_total = c->n_train + c->n_valid;
    size_t need = (size_t)seq_len + 2;
    if (c->n_train < need || c->n_valid < need)
        mlm_fatal(MLM_EXIT_FAILURE, "the shard set %s has %zu train / %zu valid tokens, but each split needs at least "
                  "data.seq_len + 2 = %zu; prepare more text, raise --valid-fraction (documents = %s%s), or lower "
                  "data.seq_len", path, c->n_train, c->n_valid, need, s->m.blank_docs ? "blank" : "file",
                  s->m.blank_docs ? "" : ": one document per file, so a single file has no validation split; "
                  "use --documents blank");
}

void corpus_verify_shards(Corpus *c, const char *run_dir, int write_stamp, int quiet) {
    if (!c->shards) return;
    ShardVerifyResult res;
    char err[2048];
    if (shard_set_verify(c->shards, SHARD_VERIFY_TRAIN | SHARD_VERIFY_VALID, run_dir, write_stamp, quiet, &res, err,
                         sizeof(err)))
        mlm_fatal(MLM_EXIT_FAILURE, "data.path %s: %s", c->path, err);
    if (quiet) return;
    if (res.from_stamp)
        printf("# shard set: %d shards, %.1f MB, verified earlier in this run (unchanged since: %s/%s)\n", res.n_shards,
               (double)res.bytes / 1e6, run_dir, SHARD_VERIFIED_STAMP);
    else
        printf("# shard set: %d shards, %.1f MB verified (checksums and token ids) in %.3f s, %.0f MB/s\n", res.n_shards,
               (double)res.bytes / 1e6, res.seconds, (double)res.bytes / 1e6 / (res.seconds > 0 ? res.seconds : 1e-9));
}
