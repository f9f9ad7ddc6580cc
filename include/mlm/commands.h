// commands.h: the commands that use a trained checkpoint (eval, fill, export, info) and their shared helpers.
//
// main.c parses each command's options into the structs below; the functions here do the work and return
// the process exit status (0, or MLM_EXIT_USAGE / MLM_EXIT_FAILURE after printing a message).
#ifndef MLM_COMMANDS_H
#define MLM_COMMANDS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "mlm/checkpoint.h"
#include "mlm/cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { EVAL_SPLIT_UNSET = 0, EVAL_SPLIT_VALID = 1, EVAL_SPLIT_ALL = 2 } EvalSplit;

typedef struct {
    const char *ckpt;   // checkpoint file or run directory
    const char *data;   // NULL: the run's corpus (md5-checked); else this text (then split must be set)
    int split;          // EvalSplit: the validation split (default without --data) or the whole text
    int has_seed;
    uint64_t seed;      // masking seed (default: the checkpoint's train.seed)
    int device;         // DeviceKind; only the CPU evaluates for now
    int json;           // one JSON object instead of the human summary
} EvalOptions;

#define FILL_MAX_TOP_K 100000

typedef struct {
    const char *ckpt;
    const char *text;   // the text, or "-" for one text per line of standard input
    int top_k;          // candidates per masked position in --json output (clamped to the vocabulary)
    int json;
    int logits;         // --json also carries each masked position's raw logits
} FillOptions;

// `mlm eval`: masked loss, accuracy and perplexity with a fixed masking seed and dropout off.
int eval_run(const EvalOptions *o);
// `mlm fill`: predict the characters marked with _ or [MASK].
int fill_run(const FillOptions *o);
// `mlm export`: the checkpoint's weights as safetensors with PyTorch state_dict names and shapes (hf == 0), or a
// model.arch = bert checkpoint as a transformers BertForMaskedLM directory (hf == 1, hf_bert.h).
int export_run(const char *ckpt, const char *out_path, int hf);
// `mlm info`: configuration, size, progress and the last metrics of a checkpoint and its run.
int info_run(const char *ckpt);

// Shared by the commands (defined in info.c).
// Resolve a checkpoint path (a run directory means its newest checkpoint) into out; exits 2 with a message
// if there is none.
void cmd_resolve_ckpt(const char *path, char *out, size_t outlen);
// Load a checkpoint or exit 2 with a message saying what is wrong and what to pass instead.
void cmd_load_ckpt(const char *path, Checkpoint *ck);
// A CPU model of the checkpoint's configuration holding its parameters, for forwards of up to max_B sequences
// (the checkpoint comes from ckpt_load, which guarantees the sizes agree; checked again here).
CpuModel *cmd_cpu_model(const Checkpoint *ck, int max_B);
// Apply the checkpoint's train.threads to OpenMP (0 keeps the OpenMP default).
void cmd_set_threads(const Config *c);
// Write s as a JSON string literal (quotes included; UTF-8 passes through, control characters escaped).
void json_write_string(FILE *f, const char *s);

#ifdef __cplusplus
}
#endif

#endif
