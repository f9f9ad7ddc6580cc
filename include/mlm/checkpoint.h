// checkpoint.h: checkpoints that continue a run exactly: model, Adam state, step, config, vocabulary,
// corpus checksum, a format version and per-tensor checksums, written atomically, the last K kept.
//
// Format: a safetensors file (tensors "params", "adam.m", "adam.v", float32 [P]) whose __metadata__ holds
// format = "mlm-checkpoint", format_version, step, tokens, valid_epochs, best_valid_acc, best_epoch, elapsed_s,
// last_valid_step, last_valid_loss, last_valid_acc, n_params, corpus_md5, vocab (comma-separated code
// points, or "KIND:N:specials:MD5" for byte and WordPiece), for WordPiece also vocab_text (the vocab.txt
// itself) and vocab_lowercase (true|false), config (the resolved config text), md5.<tensor> for every tensor,
// and md5.header: the md5 of every other metadata key and value (vocab_text and vocab_lowercase after the
// rest, when present, so that character checkpoints are byte for byte what they were) and of the tensor table
// (names, dtypes, shapes), so that no byte of the file can change unnoticed. Data order and every RNG offset
// derive from (config seed, step), so the step is the whole position of the run.
//
// Version 1 files (before md5.header and last_valid_*) are still read, with a warning that their metadata is
// not covered by a checksum: refusing them would strand runs that took hours, and their tensors are still
// checked, and ckpt_validate still holds their parts to each other.
#ifndef MLM_CHECKPOINT_H
#define MLM_CHECKPOINT_H

#include <stddef.h>

#include "mlm/config.h"
#include "mlm/data.h"
#include "mlm/model.h"

#ifdef __cplusplus
extern "C" {
#endif

#define CKPT_FORMAT "mlm-checkpoint"
#define CKPT_FORMAT_VERSION 2

typedef struct {
    long step;             // optimizer steps done
    double tokens;         // training tokens seen (partial last batches counted as they are)
    long valid_epochs;     // epochs whose validation has run
    double best_valid_acc;
    long best_epoch;       // -1 if none
    double elapsed_s;      // training wall time so far
    long last_valid_step;  // step at which the last validation completed (-1: none yet)
    double last_valid_loss, last_valid_acc;  // its results (NaN when none)
} TrainState;

typedef struct {
    Config cfg;
    Vocab vocab;
    TrainState st;
    char corpus_md5[33];
    size_t n_params;
    float *params, *adam_m, *adam_v;  // [P] each, owned
    // WordPiece only (NULL/0 otherwise): the vocab.txt's bytes (md5 = vocab.md5) and its lower-casing, what
    // decoding and tokenizing need, so that eval, fill and export work without the shard set. Owned (ckpt_free).
    // NULL also for a WordPiece checkpoint written before mlm stored it: resuming works, decoding says what to do.
    char *vocab_text;
    int lowercase;
} Checkpoint;

// Write RUN_DIR/checkpoints/ckpt-<step>.safetensors atomically and delete all but the newest `keep`.
// Writes the path into path_out (may be NULL). Returns nonzero with a message on failure.
int ckpt_save(const char *run_dir, const Checkpoint *c, int keep, char *path_out, size_t path_len, char *err,
              size_t errlen);
// THE way into mlm for a checkpoint: every command that reads one (train --resume, eval, fill, export, info)
// calls this. Loads a checkpoint file, or the newest checkpoint of a run directory, and verifies the file
// (format, version, the header checksum and each tensor's), then ckpt_validate. Returns 0 with `out` filled
// (release it with ckpt_free), or nonzero with a message saying what is wrong in err and `out` empty: after a
// 0, a model built from model_config_from(&out->cfg, out->vocab.n_tokens, out->vocab.pad_id) has exactly
// out->n_params parameters.
int ckpt_load(const char *path, Checkpoint *out, char *err, size_t errlen);
// The consistency checks of ckpt_load on a checkpoint in memory: the config passes config_check and
// model_config_check, the vocabulary is well formed (1..VOCAB_MAX_CHARS ascending code points, PAD and MASK
// after them), n_params equals the parameter count the config and vocabulary describe, the activations of
// one batch fit in 2^40 bytes, the bookkeeping is in range (step >= 0, last_valid_step <= step, ...), and
// every parameter and Adam moment is finite (second moments >= 0). Returns 0, or nonzero with a message.
int ckpt_validate(const Checkpoint *c, char *err, size_t errlen);
void ckpt_free(Checkpoint *c);
// Fill c->vocab_text and c->lowercase from the shard set a run trains on (s may be NULL: a text corpus, nothing to
// do; byte: nothing to store): its vocab.txt, which must still have the md5 the set recorded. Returns 0, or 1 with a
// message (c->vocab_text stays NULL). The caller frees c->vocab_text.
struct ShardSet;
int ckpt_attach_vocab(Checkpoint *c, const struct ShardSet *s, char *err, size_t errlen);
// The tokenizer of a WordPiece checkpoint, from the vocab.txt it stores (wordpiece.h; free with wp_free), or NULL
// with a message saying what to do (a checkpoint from before vocabularies were stored, or another kind).
struct WordPiece;
struct WordPiece *ckpt_wordpiece(const Checkpoint *c, char *err, size_t errlen);
// Path of the newest checkpoint in RUN_DIR/checkpoints; nonzero if there is none.
int ckpt_find_latest(const char *run_dir, char *out, size_t outlen);

#ifdef __cplusplus
}
#endif

#endif
