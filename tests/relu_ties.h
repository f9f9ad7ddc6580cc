// relu_ties.h: ReLU decisions at the boundary between two backends (tests): the CPU model's hidden units whose
// pre-activation is zero within rounding, and each such tie taken the other backend's way where that explains the
// other backend's gradients (docs/testing.md, "ReLU ties").
#ifndef MLM_RELU_TIES_H
#define MLM_RELU_TIES_H

#include <stddef.h>

#include "mlm/cpu.h"
#include "mlm/model.h"

// One hidden unit whose pre-activation lies within its rounding bound of zero, in the record pass.
typedef struct {
    int forward;       // which forward of the comparison (ReluTies.forward when it ran: a micro-batch)
    int layer, row, unit;
    double z, bound;   // the pre-activation in double, and the bound within which either backend may round it
    float h;           // the CPU's own pre-activation (float); ReLU passes it when h > 0
    int flipped;       // 1: taken the other way (the decision the other backend's gradients show)
    double share;      // how much of this flip's gradient delta the other backend's gradients show (~1 or ~0)
} ReluTie;

typedef enum { RELU_TIES_OFF, RELU_TIES_RECORD, RELU_TIES_PIN } ReluTiesMode;

typedef struct {
    ReluTiesMode mode;
    int forward;       // set by the caller's run before each forward of a comparison
    ReluTie *ties;     // [n] recorded by the last record pass (cap allocated)
    int n, cap;
    ParamEntry *tab;   // [n_tab] the model's tensors (differences are normalised per tensor)
    int n_tab;
    size_t P;
    // Totals over every comparison resolved (for the test's summary line).
    long total_ties, total_flipped, comparisons;
} ReluTies;

// Attach `t` (mode off) to the CPU model as its ReLU hook. relu_ties_free frees what t holds; the model keeps
// the hook, so free the model first or with it.
void relu_ties_attach(ReluTies *t, CpuModel *m);
void relu_ties_free(ReluTies *t);

// run(ctx, t, grads): the CPU side of one comparison (forwards and backwards; t->forward set before each forward),
// leaving the gradients the comparison checks in grads[P]. It must compute the same thing every time it is called.
typedef void (*ReluTiesRun)(void *ctx, ReluTies *t, float *grads);

// The CPU side of one comparison against g_ref[P] (the other backend's gradients), with each ReLU tie decided the
// way g_ref shows: run once recording the ties; if there are any, once per tie with that tie flipped (every other
// tie pinned to the CPU's decision) to measure the flip's gradient delta; take each flip whose delta g_ref shows
// (its share of g_ref - g, per-tensor normalised, within (1/2, 3/2)); then run once more with the flips taken.
// grads[P] and the model's state are the last run's: compare them with g_ref at the usual bounds. Prints a line per
// flip taken, or leaned towards and not taken (prefix `what`); returns how many were taken.
int relu_ties_resolve(ReluTies *t, ReluTiesRun run, void *ctx, const float *g_ref, float *grads, const char *what);

// One line: the ties found and taken `other`'s way over the comparisons so far.
void relu_ties_print(const ReluTies *t, const char *other);

// The usual run: one CPU forward of a masked batch (labels, dropout) and its backward, cm->grads into grads.
typedef struct {
    CpuModel *cm;
    const int *inputs, *labels;
    int B, pad;
    const DropoutCtx *drop;
    float loss;   // out
    int correct;  // out
} CpuPass;
void cpu_pass_run(void *ctx, ReluTies *t, float *grads);
// The pass compared with the other backend's gradients g_ref of the same batch: each ReLU tie taken the way g_ref
// shows (relu_ties_resolve; t attached to p->cm); with t or g_ref NULL, the CPU's own decisions, once. cm->grads,
// the logits, p->loss and p->correct are then the final run's.
void cpu_pass_resolve(CpuPass *p, ReluTies *t, const float *g_ref, const char *what);

#endif
