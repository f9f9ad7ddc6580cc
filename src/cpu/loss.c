// loss.c: cross-entropy over the vocabulary with an ignore index (softmax fused in), its gradient, and accuracy.
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "cpu/ops.h"
#include "mlm/common.h"

static void check_labels(const int *labels, int N, int V, int ignore_index) {
    for (int n = 0; n < N; n++)
        if (labels[n] != ignore_index && (labels[n] < 0 || labels[n] >= V))
            mlm_fatal(MLM_EXIT_FAILURE, "label %d at position %d is outside the vocabulary [0, %d)", labels[n], n, V);
}

// Index of the largest logit; the first one on ties (as torch.argmax).
static int argmax_row(const float *x, int V) {
    int best = 0;
    for (int v = 1; v < V; v++)
        if (x[v] > x[best]) best = v;
    return best;
}

float crossentropy_forward(float *losses, const float *logits, const int *labels, int N, int V, int ignore_index,
                           int *n_targets, int *correct) {
    check_labels(labels, N, V, ignore_index);
#pragma omp parallel for schedule(static) if ((long long)N * V >= MLM_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        if (labels[n] == ignore_index) {
            losses[n] = 0.0f;
            continue;
        }
        const float *x = logits + (size_t)n * V;  // [V]
        float maxv = x[0];
        for (int v = 1; v < V; v++) maxv = fmaxf(maxv, x[v]);
        double sum = 0.0;  // log-sum-exp in double: the loss is the difference of two close numbers
        for (int v = 0; v < V; v++) sum += exp((double)x[v] - maxv);
        losses[n] = (float)(log(sum) + maxv - x[labels[n]]);
    }
    // Reduce serially in row order so the mean does not depend on the thread count.
    double total = 0.0;
    int count = 0, hits = 0;
    for (int n = 0; n < N; n++) {
        if (labels[n] == ignore_index) continue;
        total += losses[n];
        count++;
        hits += argmax_row(logits + (size_t)n * V, V) == labels[n];
    }
    if (n_targets) *n_targets = count;
    if (correct) *correct = hits;
    return count > 0 ? (float)(total / count) : 0.0f;
}

void crossentropy_backward(float *dlogits, const float *logits, const int *labels, int N, int V,
                           int ignore_index, float dloss) {
#pragma omp parallel for schedule(static) if ((long long)N * V >= MLM_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        float *g = dlogits + (size_t)n * V;       // [V]
        const float *x = logits + (size_t)n * V;  // [V]
        if (labels[n] == ignore_index) {
            for (int v = 0; v < V; v++) g[v] = 0.0f;
            continue;
        }
        float maxv = x[0];
        for (int v = 1; v < V; v++) maxv = fmaxf(maxv, x[v]);
        float sum = 0.0f;
        for (int v = 0; v < V; v++) {
            g[v] = expf(x[v] - maxv);
            sum += g[v];
        }
        float inv = dloss / sum;
        for (int v = 0; v < V; v++) g[v] *= inv;
        g[labels[n]] -= dloss;
    }
}

// The sparse head's cross-entropy (every row a target): loss, accuracy and the gradient in one call. Per row,
// one pass finds the max and the argmax, a second writes e = expf(x - max) into dlogits and sums it in
// float (for the gradient, as crossentropy_backward) and in double (for the loss), a third scales dlogits in
// place. The gradient is crossentropy_backward's bit for bit; the loss sums expf's float terms (relative
// rounding ~6e-8 each) where crossentropy_forward sums exp in double: three passes and one exp per logit
// instead of six passes and two exps.
float crossentropy_forward_backward(float *losses, float *dlogits, const float *logits, const int *labels, int N,
                                    int V, float dloss, int *correct) {
    for (int n = 0; n < N; n++)
        if (labels[n] < 0 || labels[n] >= V)
            mlm_fatal(MLM_EXIT_FAILURE, "label %d at row %d is outside the vocabulary [0, %d)", labels[n], n, V);
    int *best = mlm_malloc((size_t)(N > 0 ? N : 1) * sizeof(int), "argmax per row");
#pragma omp parallel for schedule(static) if ((long long)N * V >= MLM_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;  // [V]
        float *g = dlogits + (size_t)n * V;       // [V]
        int arg = 0;
        for (int v = 1; v < V; v++)
            if (x[v] > x[arg]) arg = v;  // the first index on ties, as argmax_row
        float maxv = x[arg];
        float sum = 0.0f;
        double dsum = 0.0;
        for (int v = 0; v < V; v++) {
            g[v] = expf(x[v] - maxv);
            sum += g[v];
            dsum += g[v];
        }
        float inv = dloss / sum;
        for (int v = 0; v < V; v++) g[v] *= inv;
        losses[n] = (float)(log(dsum) + maxv - x[labels[n]]);
        g[labels[n]] -= dloss;
        best[n] = arg;
    }
    double total = 0.0;  // in row order: the same for any thread count
    int hits = 0;
    for (int n = 0; n < N; n++) {
        total += losses[n];
        hits += best[n] == labels[n];
    }
    free(best);
    if (correct) *correct = hits;
    return N > 0 ? (float)(total / N) : 0.0f;
}
