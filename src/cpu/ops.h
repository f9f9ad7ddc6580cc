// ops.h: the CPU backend's layer operations, each forward beside its backward (used by cpu_model.c and the tests).
//
// Conventions: activations are row-major [B, T, ...] (N = B * T rows); Linear weights are [out, in].
// "+=" in a comment means the function accumulates into that buffer; otherwise it overwrites.
// Every loop is parallel over independent outputs, and every sum (including parameter-gradient sums over
// the N rows) runs in a fixed order, so results are bit-identical for any number of OpenMP threads.
#ifndef MLM_CPU_OPS_H
#define MLM_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "mlm/cpu.h"
#include "keep_bits.h"
#include "mlm/rng.h"

// Loops with less work than this (elements, or multiply-adds for matmuls) run on one thread: an OpenMP
// fork/join costs microseconds, and far more when the machine is oversubscribed. Results do not change,
// since every output is computed the same way whichever thread computes it.
#define MLM_PARALLEL_MIN_WORK 32768

// ---- Dropout (feedforward.c) -------------------------------------------------------------------------
// THE DROPOUT RULE, which the CUDA backend replicates bit for bit:
//   For dropout site `site` of layer `layer`, with n = the number of elements of that site for the ACTUAL
//   batch B (B*H*T*T attention probabilities, B*T*C residual, B*T*F FFN hidden), laid out row-major in
//   [B, ...] order (a prefix of the site's region in RngLayout, which is sized for the configured batch):
//     u[0..n-1] = rng_uniform(drop->rng, rng_dropout_offset(&drop->layout, drop->step, layer, site), u, n)
//     keep[i]   = !(u[i] < p)                       (u is in (0, 1]; element i is dropped when u[i] < p)
//   stored as bits (keep_bits.h: bit i % 32 of word i / 32), the same words on both backends;
//     y[i]      = keep[i] ? x[i] * scale : 0.0f,   scale = 1.0f / (1.0f - p) evaluated in float
//   (the CPU computes x[i] * (keep[i] * scale), identical except that a dropped negative x gives -0.0).
//   The attention site is applied to the softmax probabilities [B, H, T, T] (before P V; never stored: the tiles of
//   attention.c compute each element's uniform where they use it); the two residual
//   sites to the block outputs [B, T, C] before they are added to the residual stream; the FFN site to
//   ReLU(Linear1) [B, T, F].

// 1 when `drop` asks for dropout (not NULL, p > 0 and an rng).
int dropout_is_active(const DropoutCtx *drop);
// scale = 1 / (1 - p) in float, as in the rule above.
float dropout_scale(float p);
// The smallest raw Philox output x whose uniform is >= p (2^32 if none): keep = !(u < p) is exactly x >= it.
uint64_t dropout_keep_threshold(float p);
// keep[keep_words(n)] for one site, by the rule above: element i kept is bit i of the packed mask (keep_bits.h),
// the bits past n zero.
void dropout_keep_mask(KeepWord *keep, const DropoutCtx *drop, int layer, DropSite site, size_t n);
// The absolute stream offset of element 0 of that site's n elements (a micro-batch's rows start inside the
// whole batch's region): where dropout_keep_mask draws from.
uint64_t dropout_site_offset(const DropoutCtx *drop, int layer, DropSite site, size_t n);

// The code that packs keep masks and runs the masked passes below (feedforward.c): the CPU's widest by default.
// Tests force each in turn (1 if this CPU runs it; isa < 0 goes back to the default); all give the same bits.
enum { DROPOUT_SIMD_PORTABLE = 0, DROPOUT_SIMD_AVX2 = 1, DROPOUT_SIMD_AVX512 = 2 };
int dropout_simd_force(int isa);
// h[n] = ReLU(h) then dropout (keep == NULL: no dropout), in place.
void relu_dropout_forward(float *h, const KeepWord *keep, float scale, size_t n);
// dh[n] in place, given the forward's output h[n]: h > 0 exactly where the unit was positive and kept,
// so the mask itself is not needed: dh = h > 0 ? dh * scale : 0 (scale = 1 without dropout).
void relu_dropout_backward(float *dh, const float *h, float scale, size_t n);

// out[n] = res[n] + dropout(y[n]) (keep == NULL: out = res + y). out may alias res.
void residual_dropout_forward(float *out, const float *res, const float *y, const KeepWord *keep, float scale,
                              size_t n);
// dy[n] = dout * keep * scale (the residual branch's gradient; the skip path's gradient is dout itself).
void residual_dropout_backward(float *dy, const float *dout, const KeepWord *keep, float scale, size_t n);

// relu_dropout_backward / residual_dropout_backward over [N, C] rows, then dbias[C] += column sums of the result:
// the twins of the CUDA backend's fused cuda_relu_dropout_backward_sums / cuda_residual_dropout_backward_sums.
void relu_dropout_backward_sums(float *dh, const float *h, float scale, int N, int C, float *dbias);
void residual_dropout_backward_sums(float *dy, const float *dout, const KeepWord *keep, float scale, int N, int C,
                                    float *dbias);

// ---- Embedding (embedding.c) -------------------------------------------------------------------------
// out[B,T,C] = tok_emb[tokens[b,t]] * sqrt(C) + pe[t]; fatal error on a token outside [0, V).
void embedding_forward(float *out, const int *tokens, const float *tok_emb, const float *pe, int B, int T,
                       int C, int V);
// embedding_forward, then ln_out = LayerNorm(out) (layernorm_forward): the twin of the CUDA backend's fused
// cuda_embedding_layernorm_forward.
void embedding_layernorm_forward(float *out, float *ln_out, float *mean, float *rstd, const int *tokens,
                                 const float *tok_emb, const float *pe, const float *w, const float *b, int B, int T,
                                 int C, int V, float eps);
// dtok_emb[V,C] += sqrt(C) * dout[b,t] at row tokens[b,t] (positions summed in order b, t).
void embedding_backward(float *dtok_emb, const float *dout, const int *tokens, int B, int T, int C);

// BERT (transformers' BertEmbeddings without its LayerNorm and dropout): out[B,T,C] = (word[tokens[b,t]] +
// type[0]) + pos[t] (every position is token type 0); fatal error on a token outside [0, V).
void bert_embedding_forward(float *out, const int *tokens, const float *word, const float *pos, const float *type,
                            int B, int T, int C, int V);
// dword[V,C] += dout[b,t] at row tokens[b,t]; dpos[T,C] += dout[b,t] at row t; dtype[C] (row 0) += every dout
// (positions summed in order b, t). The caller zeroes the [PAD] row's gradient (model.h: it is frozen).
void bert_embedding_backward(float *dword, float *dpos, float *dtype, const float *dout, const int *tokens, int B,
                             int T, int C);

// ---- GELU (gelu.c) -----------------------------------------------------------------------------------
// out[n] = GELU(inp) = inp * Phi(inp), the exact erf form (transformers' "gelu"); out may alias inp.
void gelu_forward(float *out, const float *inp, size_t n);
// dinp[n] = dout * GELU'(inp), from the forward's input (dinp may alias dout).
void gelu_backward(float *dinp, const float *dout, const float *inp, size_t n);

// ---- LayerNorm (layernorm.c) -------------------------------------------------------------------------
// out[N,C] = (inp - mean) * rstd * w + b with the biased variance (as PyTorch); saves mean[N], rstd[N].
void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                       int N, int C, float eps);
// res_out[N,C] = res + dropout(y) (residual_dropout_forward), then ln_out = LayerNorm(res_out): the twin of the
// CUDA backend's fused residual add + LayerNorm (cuda_residual_layernorm_forward).
void residual_layernorm_forward(float *res_out, float *ln_out, float *mean, float *rstd, const float *res,
                                const float *y, const KeepWord *keep, float scale, const float *w, const float *b,
                                int N, int C, float eps);
// dinp[N,C] +=, dw[C] +=, db[C] +=.
void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                        const float *mean, const float *rstd, int N, int C);
// layernorm_backward, then dy[N,C] = residual_dropout_backward(dinp) and dbias[C] += its column sums (dbias may
// be NULL): the twin of the CUDA backend's fused cuda_layernorm_backward_residual.
void layernorm_residual_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                 const float *w, const float *mean, const float *rstd, int N, int C, float *dy,
                                 const KeepWord *keep, float scale, float *dbias);

// ---- Linear (matmul.c) -------------------------------------------------------------------------------
// out[N,OC] = inp[N,IC] * w[OC,IC]^T + b[OC] (b may be NULL).
void linear_forward(float *out, const float *inp, const float *w, const float *b, int N, int IC, int OC);
// dinp[N,IC] = dout * w (skipped if dinp is NULL); dw[OC,IC] += dout^T * inp; db[OC] += column sums of
// dout (skipped if db is NULL).
void linear_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                     int N, int IC, int OC);
// sums[C] += x[N,C] summed over rows, in row order.
void column_sums_accumulate(float *sums, const float *x, int N, int C);

// ---- Exponentials of a row (vexp.c) ------------------------------------------------------------------
// y[n] = exp(x[n] - shift) (y may alias x), within 2 ulp of the exact value (the argument is at the top of vexp.c):
// AVX-512 where the CPU has it, else exp_shifted_scalar, the same algorithm one value at a time, with the same bits.
void exp_shifted(float *y, const float *x, float shift, int n);
void exp_shifted_scalar(float *y, const float *x, float shift, int n);
// y[n] = exp(x[n] - shift) as exp_shifted, then y[i] *= mult[i] when mult is not NULL (the dropout multipliers);
// returns the sum of the exponentials (before mult) in THE ROW ORDER of vexp.c (16 lane sums, then a fixed tree).
float exp_shifted_sum(float *y, const float *x, float shift, const float *mult, int n);
float exp_shifted_sum_scalar(float *y, const float *x, float shift, const float *mult, int n);
// The largest of x[n] that is not NaN (-inf for none); the same value in any order, up to the sign of a zero maximum,
// which both paths choose alike (vexp.c's lane order).
float row_max(const float *x, int n);
float row_max_scalar(const float *x, int n);
// sum of x[i] over n in THE ROW ORDER of vexp.c.
float row_sum(const float *x, int n);
float row_sum_scalar(const float *x, int n);
// sum of a[i] b[i] over n, each product rounded, in THE ROW ORDER of vexp.c.
float row_dot(const float *a, const float *b, int n);
float row_dot_scalar(const float *a, const float *b, int n);
// 1 when exp_shifted (and the row loops above) run the AVX-512 path on this CPU.
int exp_shifted_vectorized(void);

// ---- Multi-head attention core (attention.c) ---------------------------------------------------------
// qkv[B,T,3C] holds query, key, value (head h = features h*hs..h*hs+hs-1 of each, hs = C/H). Tiled (FlashAttention-2):
// nothing of size T x T is stored; the forward saves lse[B,H,T], the backward recomputes the probabilities.
//   out[B,T,C] = dropout(softmax(Q K^T / sqrt(hs) + mask)) V per head, the heads concatenated, where mask is -inf
//   at the keys j of sequence b with key_valid[b, j] == 0 ([PAD] tokens of arch = bert, transformers'
//   attention_mask; key_valid NULL: every key is valid). A sequence with no valid key at all attends to every key
//   (nothing reads such rows: they are all padding).
//   lse[B,H,T] = log sum_j exp(score_ij) over the valid keys (before dropout).
// Dropout of the probabilities (drop NULL: none) follows THE DROPOUT RULE above for site DROP_ATTN_PROBS, element
// (b, h, i, j) at index ((b H + h) T + i) T + j of the site, its uniform computed inside the tile from Philox.
typedef struct {
    uint64_t seed;       // Philox key of the step's stream (Rng.seed)
    uint64_t offset;     // absolute stream offset of element 0 of this batch's attention site
    uint64_t threshold;  // dropout_keep_threshold(p): kept where the raw output is >= it
    float p, scale;      // drop probability, 1 / (1 - p)
} AttnDropout;
// Fill *ad for layer `layer` of a forward over n = B*H*T*T attention elements; returns 0 (ad untouched) when
// `drop` asks for no dropout. Fatal when the stream cannot be regenerated inside the tiles (rng_reproduced).
int attention_dropout(AttnDropout *ad, const DropoutCtx *drop, int layer, size_t n);
void attention_forward(float *out, float *lse, const float *qkv, const uint8_t *key_valid, const AttnDropout *drop,
                       int B, int T, int C, int H);
// dqkv[B,T,3C] (overwritten) from dout[B,T,C] and the forward's qkv, out, lse (same key_valid and drop).
void attention_backward(float *dqkv, const float *dout, const float *qkv, const float *out, const float *lse,
                        const uint8_t *key_valid, const AttnDropout *drop, int B, int T, int C, int H);

// ---- Cross-entropy with an ignore index (loss.c) -----------------------------------------------------
// losses[N] = -log softmax(logits[n])[labels[n]] (0 where labels[n] == ignore_index). Returns the mean over
// the non-ignored rows (0 if none); *n_targets = their count; *correct (if not NULL) = how many of them have
// argmax(logits[n]) == labels[n] (ties go to the lowest index). Fatal error on a label outside [0, V).
float crossentropy_forward(float *losses, const float *logits, const int *labels, int N, int V, int ignore_index,
                           int *n_targets, int *correct);
// dlogits[N,V] = (softmax(logits[n]) - onehot(labels[n])) * dloss, 0 on ignored rows (dloss = 1 / n_targets
// for the mean).
void crossentropy_backward(float *dlogits, const float *logits, const int *labels, int N, int V,
                           int ignore_index, float dloss);
// Both at once for rows that are all targets (the sparse head): losses[N], dlogits[N,V] with dloss as above
// (crossentropy_backward's values bit for bit), *correct (if not NULL); returns the mean loss (0 if N == 0).
float crossentropy_forward_backward(float *losses, float *dlogits, const float *logits, const int *labels, int N,
                                    int V, float dloss, int *correct);

#endif
