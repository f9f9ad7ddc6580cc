// kernels.h: the CUDA backend's op kernels (device pointers, launched on `stream`), mirroring src/cpu/ops.h
// op for op so that every kernel can be tested against its CPU twin.
//
// Conventions: activations row-major [B, T, ...], N = B * T rows; Linear weights [out, in]. FP32 matmuls are
// not here: the model calls cuBLAS directly (cuda_model.cu); the cuBLASLt products (BF16) are (matmul.cu). Determinism: no kernel uses atomics where the order
// of a floating-point sum would change the result; reductions run in a fixed order (fixed block partition,
// then a second fixed-order pass), so two runs with one seed give bit-identical results.
// Dropout follows THE DROPOUT RULE of src/cpu/ops.h exactly: keep = !(u < p), y = keep ? x * scale : 0,
// scale = 1.0f / (1.0f - p), with u from cuRAND's Philox stream at the same offsets as the CPU (computed inside
// the keep kernel, cuda_dropout_keep_philox; cuda_uniform + cuda_dropout_keep give the same bits).
#ifndef MLM_KERNELS_H
#define MLM_KERNELS_H

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "keep_bits.h"
#include "mlm/mask.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---- Random numbers and masking (mask.cu) -------------------------------------------------------------
// Uniforms in (0, 1] from a device Philox generator (curandGenerator_t passed as void*), at absolute offset.
void cuda_uniform(void *curand_gen, uint64_t offset, float *d_out, size_t n, cudaStream_t stream);

// ---- Per-step scalars in device memory and Philox inside the kernels (mask.cu, optim.cu) ---------------
// A training step reads everything that changes from step to step from one DeviceStep that a single upload
// per step fills, so the step's launches are the same every step and can be captured as one CUDA graph.
// Adam's step constants for (t, lr), computed on the host in double as cpu_adam_update does and rounded to
// float (device pow() is not guaranteed to round as the host's, so the device does not recompute them).
typedef struct {
    float step;          // Noam: lr * sqrt(1 - b2^t) / (1 - b1^t); AdamW: lr / (1 - b1^t)
    float inv_sqrt_bc2;  // AdamW: 1 / sqrt(1 - b2^t); Noam: 1
    float decay;         // AdamW: 1 - lr * weight_decay; Noam: 1
    int32_t pad_;
    // train.precision = bf16: the Philox key and the offset of element 0 of the BF16 copy the update writes (THE
    // ROUNDING RULE; the copy after step t of P parameters is at t * P). cuda_adam_step leaves them 0.
    uint64_t round_seed, round_offset;
} AdamStep;
typedef struct {
    uint64_t philox_seed;  // Philox key of the step's random stream (Rng.seed)
    uint64_t rng_base;     // absolute offset where the step's draws start (RngLayout: step * per_step)
    AdamStep adam;         // for optimizer step t with learning rate lr
    int32_t pad_;
    int64_t t;             // the optimizer step and learning rate the constants are for (logged, checked)
    double lr;
    // Gradient accumulation and data parallel: this (micro-)batch is rows [rng_row0, rng_row0 + B) of the step's
    // whole batch of rng_rows rows (0: the batch is the whole batch), and draws the numbers those rows get there.
    uint64_t rng_row0, rng_rows;
    int32_t norm_targets;  // accumulating: the whole batch's count of targets, the divisor of dlogits
    int32_t accum_first;   // accumulating: 1 on the step's first micro-batch (the sums start), else 0
} DeviceStep;
// out[n] = uniforms in (0, 1] of cuRAND's Philox4x32-10 LEGACY stream with key `seed` from absolute `offset`,
// computed inside the kernel (bit-identical to cuda_uniform and philox_uniform; no cuRAND call).
void cuda_philox_uniform(float *d_out, uint64_t seed, uint64_t offset, size_t n, cudaStream_t stream);
// Draws are addressed as (d_step, offset_in_step): the absolute offset is d_step->rng_base + offset_in_step
// (mask.cu's step_rng_offset, the one place that maps them on the device). The *_rows variants take the
// outputs per row of the draw's region (row_len; T for the mask, n / B for a dropout site): a micro-batch then
// starts d_step->rng_row0 rows into the region, and the mask's four blocks lie d_step->rng_rows rows apart.
// row_len 0 (the plain functions): the batch is the whole batch.
// Masking of n tokens with the uniforms at that offset (layout of mask_apply), generated in the kernel.
// d_continuation: the device copy of c->continuation [n_tokens] (whole-word masking; may be NULL when
// c->whole_word is off).
void cuda_mask_philox(const MaskConfig *c, const unsigned char *d_continuation, const int *d_tokens, size_t n,
                      const DeviceStep *d_step, uint64_t offset_in_step, int *d_inputs, int *d_labels,
                      cudaStream_t stream);
// keep[keep_words(n)] = !(u < p) in bits (THE DROPOUT RULE; keep_bits.h) with u from (d_step, offset_in_step),
// generated in the kernel: cuda_uniform + cuda_dropout_keep in one launch and without the uniforms buffer. keep must
// start on a word; a thread writes whole words (the bits past n zero).
void cuda_dropout_keep_philox(KeepWord *keep, const DeviceStep *d_step, uint64_t offset_in_step, float p, size_t n,
                              cudaStream_t stream);
void cuda_mask_philox_rows(const MaskConfig *c, const unsigned char *d_continuation, const int *d_tokens, size_t n,
                           size_t row_len, const DeviceStep *d_step, uint64_t offset_in_step, int *d_inputs,
                           int *d_labels, cudaStream_t stream);
void cuda_dropout_keep_philox_rows(KeepWord *keep, const DeviceStep *d_step, uint64_t offset_in_step, size_t row_len,
                                   float p, size_t n, cudaStream_t stream);

// ---- Dropout, ReLU, residual (feedforward.cu) ---------------------------------------------------------
// keep[keep_words(n)] = !(u[n] < p) in bits (keep_bits.h). The masks below are read in the same layout.
void cuda_dropout_keep(KeepWord *keep, const float *u, float p, size_t n, cudaStream_t stream);
// h[n] = ReLU(h + bias[col]) then dropout (keep may be NULL), with h viewed as [n / F, F]; bias may be NULL.
void cuda_bias_relu_dropout_forward(float *h, const float *bias, const KeepWord *keep, float scale, size_t n, int F,
                                    cudaStream_t stream);
// dh = h > 0 ? dh * scale : 0 (in place; h is the forward's output).
void cuda_relu_dropout_backward(float *dh, const float *h, float scale, size_t n, cudaStream_t stream);
// out[n] = res[n] + dropout(y[n] + bias[col]) with y viewed as [n / C, C]; bias may be NULL; out may alias res.
void cuda_residual_dropout_forward(float *out, const float *res, const float *y, const float *bias,
                                   const KeepWord *keep, float scale, size_t n, int C, cudaStream_t stream);
// dy[n] = dout * keep * scale (keep NULL: dy = dout * scale).
void cuda_residual_dropout_backward(float *dy, const float *dout, const KeepWord *keep, float scale, size_t n,
                                    cudaStream_t stream);
// The two backward ops above over [N, C] rows fused with the column sums of their result into dbias[C] (the bias
// gradient of the Linear before them; scratch as cuda_column_sums_accumulate): dh in place, dy from dout.
// Twins: relu_dropout_backward_sums, residual_dropout_backward_sums.
void cuda_relu_dropout_backward_sums(float *dh, const float *h, float scale, int N, int F, float *dbias,
                                     float *scratch, cudaStream_t stream);
void cuda_residual_dropout_backward_sums(float *dy, const float *dout, const KeepWord *keep, float scale, int N, int C,
                                         float *dbias, float *scratch, cudaStream_t stream);
// out[n] = x[n] + bias[col] (x viewed as [n / C, C]); out may alias x.
void cuda_add_bias(float *out, const float *x, const float *bias, size_t n, int C, cudaStream_t stream);
// sums[C] += column sums of x[N, C] in a fixed order (bias gradients); scratch holds at least
// cuda_column_sums_scratch(N, C) floats.
size_t cuda_column_sums_scratch(int N, int C);
void cuda_column_sums_accumulate(float *sums, const float *x, int N, int C, float *scratch, cudaStream_t stream);
// sums[C] += sum over k of partial[k, C], k in order (the second pass of the column sums, for kernels that
// write their own per-chunk partial sums).
void cuda_column_sums_finish(float *sums, const float *partial, int chunks, int C, cudaStream_t stream);

// ---- Embedding (embedding.cu) -------------------------------------------------------------------------
// out[B,T,C] = tok_emb[tokens[b,t]] * sqrt(C) + pe[t].
void cuda_embedding_forward(float *out, const int *tokens, const float *tok_emb, const float *pe, int B, int T,
                            int C, cudaStream_t stream);
// cuda_embedding_forward fused with the first LayerNorm: emb_out[B,T,C] as cuda_embedding_forward, then ln_out =
// LayerNorm(emb_out) with mean, rstd, bit-identical to the two kernels (layernorm.cu). Twin:
// embedding_layernorm_forward.
void cuda_embedding_layernorm_forward(float *emb_out, float *ln_out, float *mean, float *rstd, const int *tokens,
                                      const float *tok_emb, const float *pe, const float *w, const float *b, int B,
                                      int T, int C, float eps, cudaStream_t stream);
// dtok_emb[V,C] += sqrt(C) * sum of dout rows whose token is v, summed in position order (no atomics).
void cuda_embedding_backward(float *dtok_emb, const float *dout, const int *tokens, int B, int T, int C, int V,
                             cudaStream_t stream);

// BERT (model.arch = bert): out[B,T,C] = (word[tokens] + type[0]) + pos[t]; twin bert_embedding_forward
// (bit-identical).
void cuda_bert_embedding_forward(float *out, const int *tokens, const float *word, const float *pos,
                                 const float *type, int B, int T, int C, cudaStream_t stream);
// dword[V,C] += dout rows by token, dpos[T,C] += dout summed over the batch, dtype[C] (row 0) += every dout row, each
// sum in position order (no atomics); twin bert_embedding_backward (bit-identical).
void cuda_bert_embedding_backward(float *dword, float *dpos, float *dtype, const float *dout, const int *tokens,
                                  int B, int T, int C, int V, cudaStream_t stream);

// ---- GELU (gelu.cu) -----------------------------------------------------------------------------------
// pre[n] += bias[col] (pre viewed as [n / F, F]; bias may be NULL; pre keeps the result for the backward), then
// out[n] = GELU(pre), the erf form. Twin: linear_forward's bias add, then gelu_forward.
void cuda_bias_gelu_forward(float *pre, float *out, const float *bias, size_t n, int F, cudaStream_t stream);
// dinp[n] = dout * GELU'(inp) (dinp may alias dout). Twin: gelu_backward.
void cuda_gelu_backward(float *dinp, const float *dout, const float *inp, size_t n, cudaStream_t stream);

// ---- LayerNorm (layernorm.cu) -------------------------------------------------------------------------
void cuda_layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                            int N, int C, float eps, cudaStream_t stream);
// res_out[N,C] = res + dropout(y + bias[col]) (bias, keep may be NULL; res_out must not alias res or y), then
// ln_out = LayerNorm(res_out) with mean, rstd: cuda_residual_dropout_forward + cuda_layernorm_forward in one
// pass, bit-identical to them. Twin: residual_layernorm_forward.
void cuda_residual_layernorm_forward(float *res_out, float *ln_out, float *mean, float *rstd, const float *res,
                                     const float *y, const float *bias, const KeepWord *keep, float scale,
                                     const float *w, const float *b, int N, int C, float eps, cudaStream_t stream);
// dinp[N,C] +=, dw[C] +=, db[C] += (weight/bias sums in a fixed order); scratch holds at least
// cuda_layernorm_backward_scratch(N, C) floats.
size_t cuda_layernorm_backward_scratch(int N, int C);
void cuda_layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                             const float *mean, const float *rstd, int N, int C, float *scratch,
                             cudaStream_t stream);
// cuda_layernorm_backward fused with the residual-dropout backward of its result: after dinp +=, dy[N,C] =
// dinp * keep * scale (keep NULL: dinp * scale) and dbias[C] += column sums of dy (dbias may be NULL; dy NULL:
// the plain backward). One kernel plus the sums' second pass, with the arithmetic and summation order of
// cuda_layernorm_backward, cuda_residual_dropout_backward and cuda_column_sums_accumulate in turn. Twin:
// layernorm_residual_backward.
void cuda_layernorm_backward_residual(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                      const float *w, const float *mean, const float *rstd, int N, int C, float *dy,
                                      const KeepWord *keep, float scale, float *dbias, float *scratch,
                                      cudaStream_t stream);

// ---- Attention (attention.cu) --------------------------------------------------------------------------
// Tiled attention (FlashAttention-2), any T, nothing of size T x T stored. qkv[B,T,3C] without its bias, which the
// kernels add as they load (qkv_bias[3C], may be NULL); head h = features h*hs..h*hs+hs-1 of each of q, k, v,
// hs = C / H at most 128 (cuda_attention_supported). key_valid[B,T] (NULL: every key valid): 0 marks a [PAD] key
// that no query attends to; a sequence with no valid key attends to every key (attention_forward's rule). Dropout
// of the probabilities by THE DROPOUT RULE, its uniforms computed in the tiles at (step, offset_in_step) as site
// DROP_ATTN_PROBS of the step ([B, H, T, T] order; a micro-batch's rows start step->rng_row0 rows in). Twins: attention_forward / attention_backward (src/cpu/attention.c).
typedef struct {
    const DeviceStep *step;   // the step's seed and base offset (device memory); NULL: no dropout
    uint64_t offset_in_step;  // rng_dropout_offset(layout, 0, layer, DROP_ATTN_PROBS)
    float p, scale;           // drop probability (0: no dropout), 1 / (1 - p)
} CudaAttnDropout;
int cuda_attention_supported(int C, int H);
// out[B,T,C] (heads concatenated) and lse[B,H,T] (log-sum-exp of each row's scores over its valid keys).
void cuda_attention_forward(float *out, float *lse, const float *qkv, const float *qkv_bias, const uint8_t *key_valid,
                            CudaAttnDropout drop, int B, int T, int C, int H, cudaStream_t stream);
// dqkv[B,T,3C] (overwritten) from dout[B,T,C] and the forward's qkv, qkv_bias, out, lse (same key_valid and drop);
// delta: cuda_attention_delta_scratch(B, T, H) floats of scratch. bias_partial[B,3C] (may be NULL;
// cuda_attention_bias_scratch(B, C) floats) receives per-sequence column sums of dqkv, which
// cuda_column_sums_finish(dqkv_bias, bias_partial, B, 3C) adds to the bias gradient.
size_t cuda_attention_bias_scratch(int B, int C);
size_t cuda_attention_delta_scratch(int B, int T, int H);
void cuda_attention_backward(float *dqkv, float *bias_partial, float *delta, const float *dout, const float *qkv,
                             const float *qkv_bias, const float *out, const float *lse, const uint8_t *key_valid,
                             CudaAttnDropout drop, int B, int T, int C, int H, cudaStream_t stream);
// valid[n] = inputs[n] != pad_id (the key-padding mask of model.arch = bert).
void cuda_key_valid(uint8_t *valid, const int *inputs, size_t n, int pad_id, cudaStream_t stream);

// ---- Cross-entropy (loss.cu) --------------------------------------------------------------------------
// Fused softmax + loss + gradient over logits[N,V]: losses[N] (0 on ignored rows), correct[N] (1 where argmax
// == label on a target row, ties to the lowest index), and dlogits[N,V] = (softmax - onehot) * (1 / n_targets)
// where n_targets is read from d_n_targets (device, computed by cuda_count_targets) so no host sync is needed.
// dlogits may alias logits.
void cuda_count_targets(int *d_n_targets, const int *labels, int N, int ignore_index, cudaStream_t stream);
void cuda_crossentropy_forward_backward(float *losses, int *correct, float *dlogits, const float *logits,
                                        const int *labels, const int *d_n_targets, int N, int V, int ignore_index,
                                        cudaStream_t stream);
// d_out[3] = {mean loss over targets, number correct, number of targets} (fixed-order reduction).
void cuda_loss_reduce(float *d_out, const float *losses, const int *correct, const int *d_n_targets, int N,
                      cudaStream_t stream);
// Sparse prediction (the head on the selected rows only). sel_rows[0..n) = the rows with label != ignore_index
// in increasing order and *d_n_sel = n (counted on the device: the host never waits for it).
void cuda_select_rows(int *sel_rows, int *d_n_sel, const int *labels, int N, int ignore_index, cudaStream_t stream);
// For i < cap: out[i, C] = x[sel_rows[i]] and out_labels[i] = labels[sel_rows[i]] where i < *d_n_sel; past it a
// zero row and ignore_index (the head gives those zero loss and zero gradient).
void cuda_gather_rows(float *out, int *out_labels, const float *x, const int *labels, const int *sel_rows,
                      const int *d_n_sel, int cap, int C, int ignore_index, cudaStream_t stream);
// dx[sel_rows[i], C] = drows[i] for i < min(*d_n_sel, cap); the other rows of dx are not touched.
void cuda_scatter_rows(float *dx, const float *drows, const int *sel_rows, const int *d_n_sel, int cap, int C,
                       cudaStream_t stream);

// ---- Gradient norm, clipping and the optimizer over all parameters (optim.cu) -------------------------
// d_norm[0] = global L2 norm of grads[n] (fixed-order two-pass reduction in double, one launch: the last
// block to finish adds the partials); scratch holds at least cuda_grad_norm_scratch(n) doubles and must be
// zeroed once before its first use (the kernel leaves it zeroed again: its last slot counts finished blocks).
size_t cuda_grad_norm_scratch(size_t n);
void cuda_grad_norm(float *d_norm, const float *grads, size_t n, double *scratch, cudaStream_t stream);
// One launch over all n parameters: g = grads * clip_coef with clip_coef = min(1, max_norm / (norm + 1e-6))
// read from d_norm (max_norm <= 0: no clipping), then the Adam update of optim.h (kind 0 = labml's Noam Adam,
// 1 = AdamW with decoupled decay where decay_mask[i]) at step t with learning rate lr.
void cuda_adam_update(float *params, const float *grads, float *m, float *v, const uint8_t *decay_mask,
                      const float *d_norm, float max_norm, size_t n, int kind, float beta1, float beta2, float eps,
                      float weight_decay, long t, double lr, cudaStream_t stream);
// The step constants of (t, lr) (host, double, as cpu_adam_update) and the same update reading them from
// device memory (d_step: &DeviceStep.adam), so a captured step replays with each step's t and lr.
AdamStep cuda_adam_step(int kind, float beta1, float beta2, float weight_decay, long t, double lr);
// copy (train.precision = bf16; NULL otherwise): the BF16 copy [n] of the updated parameters, written by THE
// ROUNDING RULE at d_step's round_seed / round_offset + copy_first (the index of params[0] among all parameters) in
// the same pass.
void cuda_adam_update_dev(float *params, const float *grads, float *m, float *v, const uint8_t *decay_mask,
                          const float *d_norm, float max_norm, size_t n, int kind, float beta1, float beta2, float eps,
                          const AdamStep *d_step, uint16_t *copy, uint64_t copy_first, cudaStream_t stream);

// ---- BF16 copies (bf16.cu; train.precision = bf16) --------------------------------------------------------
// BF16 values as uint16_t bits (include/mlm/bf16.h). Twins: bf16_round_array, bf16_to_float_array,
// bf16_stochastic_round_array (src/cpu/bf16.c).
// out[n] = in[n] rounded to the nearest BF16 (ties to even).
void cuda_bf16_round(uint16_t *out, const float *in, size_t n, cudaStream_t stream);
// out[n] = in[n] as floats (exact).
void cuda_bf16_to_float(float *out, const uint16_t *in, size_t n, cudaStream_t stream);
// out[n] = THE ROUNDING RULE (stochastic rounding) of in[n] with the Philox stream `seed` from absolute `offset`.
void cuda_bf16_stochastic_round(uint16_t *out, const float *in, size_t n, uint64_t seed, uint64_t offset,
                                cudaStream_t stream);

// ---- The Linear layers' products through cuBLASLt (matmul.cu) ----------------------------------------------
// Row-major views (Linear weights [out, in]), FP32 accumulation (CUBLAS_COMPUTE_32F, FP32 scale); inputs of type
// in_t (FP32 inputs use TF32 tensor cores when the CudaLt says so), the output of its own type; beta 0 overwrites
// (the output is not read), beta 1 adds to it. Twins: linear_forward / linear_backward (src/cpu/matmul.c) on the
// same values (BF16 ones rounded as floats).
typedef enum { MLM_DTYPE_F32 = 0, MLM_DTYPE_BF16 = 1 } MlmDtype;
typedef struct {
    void *handle;            // cublasLtHandle_t
    void *workspace;         // device memory the products may use (shared with cuBLAS: one stream)
    size_t workspace_bytes;
    int tf32;                // FP32 products on TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32)
} CudaLt;
void cuda_lt_create(CudaLt *lt, void *workspace, size_t workspace_bytes, int tf32);
void cuda_lt_destroy(CudaLt *lt);
// out[N,OC] = beta out + inp[N,IC] w[OC,IC]^T (+ bias[OC], of out's type; NULL: none).
void cuda_lt_linear_forward(const CudaLt *lt, void *out, MlmDtype out_t, const void *inp, const void *w,
                            MlmDtype in_t, const void *bias, int N, int IC, int OC, float beta, cudaStream_t stream);
// dinp[N,IC] = beta dinp + dout[N,OC] w[OC,IC].
void cuda_lt_linear_backward_input(const CudaLt *lt, void *dinp, MlmDtype dinp_t, const void *dout, const void *w,
                                   MlmDtype in_t, int N, int IC, int OC, float beta, cudaStream_t stream);
// dw[OC,IC] = beta dw + dout[N,OC]^T inp[N,IC].
void cuda_lt_linear_backward_weight(const CudaLt *lt, void *dw, MlmDtype dw_t, const void *dout, const void *inp,
                                    MlmDtype in_t, int N, int IC, int OC, float beta, cudaStream_t stream);

#ifdef __cplusplus
}

// ---- The same ops on BF16 tensors (train.precision = bf16; C++ overloads of the functions above) ---------------
// Activations, their gradients and the parameters they read are BF16 (act.cuh: bf16 = __nv_bfloat16); LayerNorm
// statistics, losses, scratch sums and parameter gradients stay FP32. Each computes in FP32 from the BF16 values
// and rounds where it stores (to nearest even), going on from the stored value: the roundings of the CPU
// reference's BF16 mode (src/cpu/cpu_model.c), so the twins are the same functions on bf16_point'ed tensors.
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16;
void cuda_bias_relu_dropout_forward(bf16 *h, const bf16 *bias, const KeepWord *keep, float scale, size_t n, int F,
                                    cudaStream_t stream);
void cuda_relu_dropout_backward(bf16 *dh, const bf16 *h, float scale, size_t n, cudaStream_t stream);
void cuda_residual_dropout_forward(bf16 *out, const bf16 *res, const bf16 *y, const bf16 *bias, const KeepWord *keep,
                                   float scale, size_t n, int C, cudaStream_t stream);
void cuda_residual_dropout_backward(bf16 *dy, const bf16 *dout, const KeepWord *keep, float scale, size_t n,
                                    cudaStream_t stream);
void cuda_relu_dropout_backward_sums(bf16 *dh, const bf16 *h, float scale, int N, int F, float *dbias, float *scratch,
                                     cudaStream_t stream);
void cuda_residual_dropout_backward_sums(bf16 *dy, const bf16 *dout, const KeepWord *keep, float scale, int N, int C,
                                         float *dbias, float *scratch, cudaStream_t stream);
void cuda_add_bias(bf16 *out, const bf16 *x, const bf16 *bias, size_t n, int C, cudaStream_t stream);
void cuda_column_sums_accumulate(float *sums, const bf16 *x, int N, int C, float *scratch, cudaStream_t stream);
void cuda_embedding_forward(bf16 *out, const int *tokens, const bf16 *tok_emb, const float *pe, int B, int T, int C,
                            cudaStream_t stream);
void cuda_embedding_layernorm_forward(bf16 *emb_out, bf16 *ln_out, float *mean, float *rstd, const int *tokens,
                                      const bf16 *tok_emb, const float *pe, const bf16 *w, const bf16 *b, int B, int T,
                                      int C, float eps, cudaStream_t stream);
void cuda_embedding_backward(float *dtok_emb, const bf16 *dout, const int *tokens, int B, int T, int C, int V,
                             cudaStream_t stream);
void cuda_bert_embedding_forward(bf16 *out, const int *tokens, const bf16 *word, const bf16 *pos, const bf16 *type,
                                 int B, int T, int C, cudaStream_t stream);
void cuda_bert_embedding_backward(float *dword, float *dpos, float *dtype, const bf16 *dout, const int *tokens, int B,
                                  int T, int C, int V, cudaStream_t stream);
void cuda_bias_gelu_forward(bf16 *pre, bf16 *out, const bf16 *bias, size_t n, int F, cudaStream_t stream);
void cuda_gelu_backward(bf16 *dinp, const bf16 *dout, const bf16 *inp, size_t n, cudaStream_t stream);
void cuda_layernorm_forward(bf16 *out, float *mean, float *rstd, const bf16 *inp, const bf16 *w, const bf16 *b, int N,
                            int C, float eps, cudaStream_t stream);
void cuda_residual_layernorm_forward(bf16 *res_out, bf16 *ln_out, float *mean, float *rstd, const bf16 *res,
                                     const bf16 *y, const bf16 *bias, const KeepWord *keep, float scale, const bf16 *w,
                                     const bf16 *b, int N, int C, float eps, cudaStream_t stream);
void cuda_layernorm_backward(bf16 *dinp, float *dw, float *db, const bf16 *dout, const bf16 *inp, const bf16 *w,
                             const float *mean, const float *rstd, int N, int C, float *scratch, cudaStream_t stream);
void cuda_layernorm_backward_residual(bf16 *dinp, float *dw, float *db, const bf16 *dout, const bf16 *inp,
                                      const bf16 *w, const float *mean, const float *rstd, int N, int C, bf16 *dy,
                                      const KeepWord *keep, float scale, float *dbias, float *scratch,
                                      cudaStream_t stream);
void cuda_crossentropy_forward_backward(float *losses, int *correct, bf16 *dlogits, const bf16 *logits,
                                        const int *labels, const int *d_n_targets, int N, int V, int ignore_index,
                                        cudaStream_t stream);
void cuda_gather_rows(bf16 *out, int *out_labels, const bf16 *x, const int *labels, const int *sel_rows,
                      const int *d_n_sel, int cap, int C, int ignore_index, cudaStream_t stream);
void cuda_scatter_rows(bf16 *dx, const bf16 *drows, const int *sel_rows, const int *d_n_sel, int cap, int C,
                       cudaStream_t stream);
#endif

#endif
