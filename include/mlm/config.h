// config.h: the run configuration (defaults = the reference experiment), its `key = value` file format
// with [sections], command-line overrides, validation and printing.
#ifndef MLM_CONFIG_H
#define MLM_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CONFIG_STR 512

// The values of the enumerated keys that other layers name (a value is the position of its name in the key's list,
// e.g. mask.scheme = reference|bert). They live here, below the masking (mask.h) and the optimizer (optim.h) that
// use them, so that the configuration knows nothing of the code it configures.
typedef enum { MASK_SCHEME_REFERENCE = 0, MASK_SCHEME_BERT = 1 } MaskScheme;            // mask.scheme
typedef enum { OPTIM_NOAM_ADAM = 0, OPTIM_ADAMW = 1 } OptimKind;                        // optim.name
typedef enum { SCHED_NOAM = 0, SCHED_COSINE = 1, SCHED_LINEAR = 2, SCHED_CONSTANT = 3 } ScheduleKind;  // optim.schedule
#define MASK_MAX_NO_MASK 16  // mask.no_mask: at most this many characters (MaskConfig.no_mask holds their ids)

typedef struct Config {
    // [data]
    char data_path[CONFIG_STR];   // data.path: corpus file ("" = look up data/, $MLM_DATA_MIRROR, download)
    int seq_len;                  // data.seq_len: 32
    double train_split;           // data.train_split: 0.9
    int sampling;                 // data.sampling = random (the reference) | packed (shard sets: documents + [SEP])
    // [model]
    int d_model, n_heads, n_layers, d_ff;  // 128, 8, 6, 256
    double dropout;               // 0.1
    double ln_eps;                // 1e-5
    int init_copy_layers;         // model.init = copy (every layer a copy of one template) | pytorch
    int arch;                     // model.arch = labml (the reference) | bert (transformers' BertForMaskedLM)
    int max_positions;            // model.max_positions: 512 (bert: rows of the learned position table)
    int type_vocab_size;          // model.type_vocab_size: 2 (bert)
    double init_std;              // model.init_std: 0.02 (bert: N(0, init_std) weights)
    // [mask]
    int mask_scheme;              // mask.scheme = reference | bert
    double mask_prob, mask_unchanged_prob, mask_random_prob;  // 0.15, 0.1, 0.1
    char no_mask_chars[64];       // mask.no_mask: characters never selected (escapes allowed: "\n")
    int mask_whole_word;          // mask.whole_word: all pieces of a WordPiece word selected together (false)
    // [train]
    int batch_size;               // 64
    int epochs;                   // 1024
    long max_steps;               // 0 = no limit besides epochs
    uint64_t seed;                // one seed fixes every random stream
    double grad_clip;             // global-norm clip (1.0; 0 = off)
    int device;                   // train.device = auto | cpu | cuda
    int eval_dropout;             // train.eval_dropout: keep dropout on in validation/samples (reference: true)
    int log_every;                // progress/metrics line every N steps
    int ckpt_every;               // checkpoint every N steps (0 = only at the end)
    double ckpt_minutes;          // also checkpoint every N minutes of wall time (30; 0 = off)
    int keep_ckpts;               // keep the last K checkpoints
    int init_check_vocab;         // --init refuses weights of another vocabulary (true)
    int threads;                  // CPU threads (0 = OpenMP default)
    int precision;                // train.precision = fp32 | tf32 (default) | bf16 (PrecisionKind)
    int cuda_graph;               // train.cuda_graph: capture/replay the GPU step as a CUDA graph (true)
    int samples;                  // print samples each epoch
    int accum_steps;              // train.accum_steps: micro-batches per optimizer step over all ranks (1)
    int zero;                     // train.zero: ZeRO-1, Adam moments sharded over the ranks
    double dist_timeout;          // train.dist_timeout: seconds before a silent rank stops the job (600)
    int nccl;                     // train.nccl: the CUDA backend's gradients through NCCL even on one rank
    int sparse_prediction;        // train.sparse_prediction: final LayerNorm, classifier, loss at selected positions only (false)
    // [optim]
    int optim_kind;               // optim.name = noam | adamw
    int schedule;                 // optim.schedule = noam | cosine | linear | constant
    double lr;                    // Noam factor (1.0) or peak learning rate
    double beta1, beta2, eps, weight_decay;
    int warmup;                   // 2000
    double min_lr;
} Config;

typedef enum { DEVICE_AUTO = 0, DEVICE_CPU = 1, DEVICE_CUDA = 2 } DeviceKind;
// train.precision. fp32: FP32 everywhere. tf32: FP32 tensors, the GPU's FP32 matmuls on TF32 tensor cores (the CPU
// computes in FP32). bf16: FP32 master weights and Adam moments, a BF16 copy of the parameters (stochastic
// rounding), BF16 activations and activation gradients, FP32 accumulation (include/mlm/bf16.h); on the CPU the same
// tensors rounded to BF16 values at the same points (the reference of the GPU's BF16 step). The old key
// train.tf32 = true | false still reads, as train.precision = tf32 | fp32.
typedef enum { PRECISION_FP32 = 0, PRECISION_TF32 = 1, PRECISION_BF16 = 2 } PrecisionKind;
// "fp32", "tf32", "bf16": the value of train.precision as a configuration file spells it.
const char *precision_name(int precision);

void config_defaults(Config *c);
// Parse a config file into c (on top of what c holds). On error prints "FILE:LINE: message" and exits 2.
void config_load_file(Config *c, const char *path);
// Apply one "key=value" override (from --set). On error prints a message naming the key and exits 2.
void config_set(Config *c, const char *assignment);
// Non-exiting variants for tests: return 0 on success, else write the message into err.
int config_parse_text(Config *c, const char *text, const char *origin, char *err, size_t errlen);
int config_set_value(Config *c, const char *key, const char *value, char *err, size_t errlen);
// Cross-key checks (heads divide d_model, probabilities sum, ...). Exits 2 with a message on failure.
void config_validate(const Config *c, const char *origin);
int config_check(const Config *c, char *err, size_t errlen);
// Settings under which nothing can train (optim.eps whose float is 0, mask.prob 0): 1 with the reason in err.
// Training checks it besides config_check; reading a checkpoint does not.
int config_check_trainable(const Config *c, char *err, size_t errlen);
// Write the resolved configuration in the file format (re-readable by config_load_file).
void config_write(FILE *f, const Config *c);
// The keys in table order: how many, the i-th's dotted name, and its value in c as config_write writes it (out:
// CONFIG_VALUE_TEXT bytes hold any value).
#define CONFIG_VALUE_TEXT (2 * CONFIG_STR + 8)
int config_key_count(void);
const char *config_key_name(int i);
void config_value_text(const Config *c, int i, char *out, size_t outlen);
// One-line help of every key (for `mlm train --help`).
void config_print_keys(FILE *f);

#ifdef __cplusplus
}
#endif

#endif
