// embedding.cu: token embedding * sqrt(C) + sinusoidal positions (forward) and its token-row gradient sums (backward);
// BERT's word + token type + learned position embeddings and their gradients (model.arch = bert). Templates over the
// storage type X of the tables and activations (act.cuh); the table gradients are FP32 (the positional table of
// labml stays FP32, a constant).
#include <math.h>

#include "act.cuh"
#include "cuda_check.h"
#include "kernels.h"

// ---- Forward ------------------------------------------------------------------------------------------

// out[n, c] = tok_emb[tokens[n], c] * scale + pe[n % T, c], one thread per element (coalesced along c).
// __fmul_rn / __fadd_rn keep the CPU's two roundings (no fused multiply-add), so the result is bit-identical.
// Tokens must lie in [0, V): the device masking only produces such ids and the host checks its inputs.
template <typename X>
static __global__ void embedding_forward_kernel(X *out /* [N, C] */, const int *tokens /* [N] */,
                                                const X *tok_emb /* [V, C] */, const float *pe /* [T, C] */, size_t NC,
                                                int T, int C, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < NC; i += (size_t)gridDim.x * blockDim.x) {
        size_t n = i / (size_t)C;
        int c = (int)(i % (size_t)C), t = (int)(n % (size_t)T);
        st(out, i, __fadd_rn(__fmul_rn(ld(tok_emb, (size_t)tokens[n] * C + c), scale), pe[(size_t)t * C + c]));
    }
}

template <typename X>
static void embedding_forward(X *out, const int *tokens, const X *tok_emb, const float *pe, int B, int T, int C,
                              cudaStream_t stream) {
    size_t NC = (size_t)B * T * C;
    if (NC == 0) return;
    float scale = sqrtf((float)C);  // as embedding_forward: sqrt(d_model) rounded to float
    size_t blocks = (NC + 255) / 256;
    unsigned grid = (unsigned)(blocks < (1u << 20) ? blocks : (1u << 20));
    embedding_forward_kernel<X><<<grid, 256, 0, stream>>>(out, tokens, tok_emb, pe, NC, T, C, scale);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_embedding_forward(float *out, const int *tokens, const float *tok_emb, const float *pe, int B,
                                       int T, int C, cudaStream_t stream) {
    embedding_forward(out, tokens, tok_emb, pe, B, T, C, stream);
}
void cuda_embedding_forward(bf16 *out, const int *tokens, const bf16 *tok_emb, const float *pe, int B, int T, int C,
                            cudaStream_t stream) {
    embedding_forward(out, tokens, tok_emb, pe, B, T, C, stream);
}

// ---- Backward -----------------------------------------------------------------------------------------
// dtok_emb[v, c] += scale * dout[n, c] over the positions n whose token is v, added one at a time in
// position order: exactly the CPU's sequence of roundings, so the result is bit-identical to
// embedding_backward and needs no atomics. Block (v, column chunk): each thread owns one column c of row v
// and keeps its running sum in a register. A warp reads 32 consecutive tokens (coalesced), takes a ballot
// of those equal to v and walks the set bits from the lowest (= earliest position), so the whole warp skips
// the ~(V-1)/V of positions that do not match with one compare each.

enum { EMB_BWD_MAX_THREADS = 128 };

template <typename X>
static __global__ void embedding_backward_kernel(float *dtok_emb /* [V, C] */, const X *dout /* [N, C] */,
                                                 const int *tokens /* [N] */, int N, int C, float scale) {
    int v = blockIdx.x;
    int c = blockIdx.y * blockDim.x + threadIdx.x;
    int lane = threadIdx.x % 32;
    bool active = c < C;  // lanes past C still vote (the ballot needs the full warp) but do not read or write
    float acc = active ? dtok_emb[(size_t)v * C + c] : 0.0f;
    for (int base = 0; base < N; base += 32) {
        int n = base + lane;
        int tok = n < N ? tokens[n] : -1;
        unsigned hits = __ballot_sync(0xffffffffu, tok == v);
        while (hits) {  // warp-uniform loop: every lane holds the same ballot
            int j = __ffs(hits) - 1;
            hits &= hits - 1;
            if (active) acc = __fadd_rn(acc, __fmul_rn(ld(dout, (size_t)(base + j) * C + c), scale));
        }
    }
    if (active) dtok_emb[(size_t)v * C + c] = acc;
}

template <typename X>
static void embedding_backward(float *dtok_emb, const X *dout, const int *tokens, int B, int T, int C, int V,
                               cudaStream_t stream) {
    int N = B * T;
    if (N <= 0 || C <= 0 || V <= 0) return;
    float scale = sqrtf((float)C);
    // Whole warps (the ballot), at most EMB_BWD_MAX_THREADS columns per block.
    int threads = ((C + 31) / 32) * 32;
    if (threads > EMB_BWD_MAX_THREADS) threads = EMB_BWD_MAX_THREADS;
    dim3 grid((unsigned)V, (unsigned)((C + threads - 1) / threads));
    embedding_backward_kernel<X><<<grid, threads, 0, stream>>>(dtok_emb, dout, tokens, N, C, scale);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_embedding_backward(float *dtok_emb, const float *dout, const int *tokens, int B, int T, int C,
                                        int V, cudaStream_t stream) {
    embedding_backward(dtok_emb, dout, tokens, B, T, C, V, stream);
}
void cuda_embedding_backward(float *dtok_emb, const bf16 *dout, const int *tokens, int B, int T, int C, int V,
                             cudaStream_t stream) {
    embedding_backward(dtok_emb, dout, tokens, B, T, C, V, stream);
}

// ---- BERT (model.arch = bert) ---------------------------------------------------------------------------
// out[n, c] = (word[tokens[n], c] + type[c]) + pos[n % T, c] (type 0 everywhere), the order and roundings of
// bert_embedding_forward: bit-identical.
template <typename X>
static __global__ void bert_embedding_forward_kernel(X *out /* [N, C] */, const int *tokens /* [N] */,
                                                     const X *word /* [V, C] */, const X *pos /* [P, C] */,
                                                     const X *type /* [TV, C] */, size_t NC, int T, int C) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < NC; i += (size_t)gridDim.x * blockDim.x) {
        size_t n = i / (size_t)C;
        int c = (int)(i % (size_t)C), t = (int)(n % (size_t)T);
        st(out, i, __fadd_rn(__fadd_rn(ld(word, (size_t)tokens[n] * C + c), ld(type, c)), ld(pos, (size_t)t * C + c)));
    }
}

template <typename X>
static void bert_embedding_forward(X *out, const int *tokens, const X *word, const X *pos, const X *type, int B, int T,
                                   int C, cudaStream_t stream) {
    size_t NC = (size_t)B * T * C;
    if (NC == 0) return;
    size_t blocks = (NC + 255) / 256;
    unsigned grid = (unsigned)(blocks < (1u << 20) ? blocks : (1u << 20));
    bert_embedding_forward_kernel<X><<<grid, 256, 0, stream>>>(out, tokens, word, pos, type, NC, T, C);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_bert_embedding_forward(float *out, const int *tokens, const float *word, const float *pos,
                                            const float *type, int B, int T, int C, cudaStream_t stream) {
    bert_embedding_forward(out, tokens, word, pos, type, B, T, C, stream);
}
void cuda_bert_embedding_forward(bf16 *out, const int *tokens, const bf16 *word, const bf16 *pos, const bf16 *type,
                                 int B, int T, int C, cudaStream_t stream) {
    bert_embedding_forward(out, tokens, word, pos, type, B, T, C, stream);
}

// dpos[t, c] += dout[b, t, c] over b in order, and dtype[c] (row 0) += dout[n, c] over n in order: one thread per
// (t, c) and per c, each summing its column in the CPU's order (bert_embedding_backward), so bit-identical.
template <typename X>
static __global__ void bert_position_type_backward_kernel(float *dpos /* [P, C] */, float *dtype /* [TV, C] */,
                                                          const X *dout /* [B, T, C] */, int B, int T, int C) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t TC = (size_t)T * C;
    if (i < TC) {  // position t = i / C, column c = i % C
        float acc = dpos[i];
        for (int b = 0; b < B; b++) acc = __fadd_rn(acc, ld(dout, (size_t)b * TC + i));
        dpos[i] = acc;
    } else if (i < TC + (size_t)C) {
        size_t c = i - TC, N = (size_t)B * T;
        float acc = dtype[c];
        for (size_t n = 0; n < N; n++) acc = __fadd_rn(acc, ld(dout, n * C + c));
        dtype[c] = acc;
    }
}

template <typename X>
static void bert_embedding_backward(float *dword, float *dpos, float *dtype, const X *dout, const int *tokens, int B,
                                    int T, int C, int V, cudaStream_t stream) {
    int N = B * T;
    if (N <= 0 || C <= 0 || V <= 0) return;
    // The word rows: labml's token-row sums with scale 1 (x * 1.0f is x exactly).
    int threads = ((C + 31) / 32) * 32;
    if (threads > EMB_BWD_MAX_THREADS) threads = EMB_BWD_MAX_THREADS;
    dim3 grid((unsigned)V, (unsigned)((C + threads - 1) / threads));
    embedding_backward_kernel<X><<<grid, threads, 0, stream>>>(dword, dout, tokens, N, C, 1.0f);
    CUDA_CHECK_LAUNCH();
    size_t n = (size_t)T * C + (size_t)C;
    bert_position_type_backward_kernel<X><<<(unsigned)((n + 255) / 256), 256, 0, stream>>>(dpos, dtype, dout, B, T, C);
    CUDA_CHECK_LAUNCH();
}
extern "C" void cuda_bert_embedding_backward(float *dword, float *dpos, float *dtype, const float *dout,
                                             const int *tokens, int B, int T, int C, int V, cudaStream_t stream) {
    bert_embedding_backward(dword, dpos, dtype, dout, tokens, B, T, C, V, stream);
}
void cuda_bert_embedding_backward(float *dword, float *dpos, float *dtype, const bf16 *dout, const int *tokens, int B,
                                  int T, int C, int V, cudaStream_t stream) {
    bert_embedding_backward(dword, dpos, dtype, dout, tokens, B, T, C, V, stream);
}
