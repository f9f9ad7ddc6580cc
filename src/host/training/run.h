// run.h: the state of one `mlm train` process (train.c), shared with what prints it (print.c) and the run directory's
// files (run_dir.c). Private to src/host/training.
#ifndef MLM_TRAINING_RUN_H
#define MLM_TRAINING_RUN_H

#include <stdio.h>

#include "mlm/backend.h"
#include "mlm/checkpoint.h"
#include "mlm/config.h"
#include "mlm/data.h"
#include "mlm/dist.h"
#include "mlm/mask.h"
#include "mlm/model.h"
#include "mlm/optim.h"
#include "mlm/reducer.h"
#include "mlm/rng.h"
#include "mlm/run_lock.h"
#include "mlm/step.h"
#include "mlm/train.h"

typedef struct {
    Config cfg;
    TrainOptions opt;
    Corpus corpus;
    char corpus_md5[33];
    ModelConfig mc;
    MaskConfig mask;
    unsigned char *continuation;  // [V] mask.whole_word: 1 where a WordPiece token continues a word (## pieces)
    OptimConfig oc;
    RngLayout layout;
    Batcher train_b, valid_b;
    Rng train_rng, valid_rng, sample_rng;
    // The ranks, the backend and the step over them.
    Dist dist;              // this process's rank among the job's (world 1 without mpirun)
    Reducer *rd;            // none, MPI (CPU backend) or NCCL (CUDA backend)
    Backend *be;            // CPU or CUDA
    int gpu;                // the backend is CUDA
    Step train_step;        // the step's setup and host buffers (the host's masks of validation and samples too)
    int max_rows;           // the largest batch: MLM_MAX(batch_size, N_PROMPTS)
    int *tokens;            // [max_rows, T] the batch before masking
    size_t n_params;
    // Progress.
    long step;              // optimizer steps done
    TrainState st;          // what a checkpoint records besides the tensors (st.step mirrors step)
    long total_steps;
    // The run directory and the terminal.
    char run_dir[1024];
    RunLock lock;           // one process per run directory
    FILE *metrics;
    int color;              // ANSI colours on stdout
    int tty;                // progress line rewritten in place
    int profiling;          // between cudaProfilerStart and Stop (--profile-steps)
    double t_start;         // when elapsed_s was last brought up to date
    double t_last_ckpt;     // wall clock of the last checkpoint (train.ckpt_minutes)
    double t_progress;      // wall clock of the last progress line
    long first_step;        // step at which this process started training
    double t_first_step;    // wall clock after this process's first step (the estimate leaves out its warm-up)
    int estimate_shown;
} Run;

// print.c: what the run shows on the terminal and in samples.txt.
void print_header(const Run *r);
void print_device(const Run *r);
// --dry-run: the device memory the CUDA backend would allocate, by cuda_model_memory_plan (nothing allocated).
void print_device_memory(const Run *r);
void print_masked_batch(const Run *r, int rows);
void print_samples(Run *r, long epoch);
void print_progress(const Run *r, long epoch, double loss, double acc, double lr, float gnorm, double tps,
                    double eta_s);
void maybe_print_estimate(Run *r, double now);
void format_duration(double s, char *out, size_t n);

// run_dir.c: the run directory: its name, lock, leftovers, metrics.jsonl and config.conf.
void run_dir_choose(Run *r);
void run_dir_lock(Run *r);
void run_dir_unlock(Run *r);
void run_dir_open_files(Run *r, int resuming);
void log_metrics(Run *r, const char *kind, long epoch, double loss, double acc, double lr, double gnorm,
                 double tok_per_s);

#endif
