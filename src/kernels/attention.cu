// attention.cu: the attention core, tiled (FlashAttention-2's algorithm), forward and backward, for any T; nothing
// of size T x T is stored. Twin: src/cpu/attention.c (the same algorithm on the CPU; its opening explains it).
//
// Forward: one block per (query tile, batch x head). Q's tile stays in shared memory while the key tiles stream
// through; the tile's scores live in registers, the online softmax keeps each row's running max m and sum l (in
// FP32 whatever the storage type: when a key tile raises m, l and the output accumulated so far are rescaled by
// exp(m_old - m_new)), and the block writes the output rows and lse = m + log(l) once, at the end.
// Backward: one block per (batch, head), key tiles outer (dK and dV of the tile accumulate in registers), query
// tiles inner: P = exp(S - lse) recomputed, dV += dropout(P)^T dO, dS = P (dP - D) with D = rowsum(dO * O)
// (computed by the block first), dK += dS^T Q, and dQ += dS K added to the block's own rows of dqkv in a fixed
// order (key tile by key tile). No atomics: the results are deterministic, and since every output element is
// written by exactly one thread of one block (the bias partials read dqkv only after the block's barrier), no
// two blocks ever touch the same memory: races between blocks are impossible by construction, no last-block
// tricks.
// Attention dropout is regenerated inside each tile from the Philox counter of each (batch, head, query, key)
// element, at the stream offset THE DROPOUT RULE (src/cpu/ops.h) gives element (b, h, i, j) of the [B, H, T, T]
// site: the decisions of the CPU twin and of the keep masks this file stored before it was tiled.
//
// Tile products run on CUDA cores in FP32 (tile_product: each thread a small register block of the output,
// explicit fused multiply-adds so that the GPU and the CPU execution layer round alike). A BF16 variant would
// replace tile_product and the tile loads and keep the softmax statistics, the lse and the accumulators in FP32.
#include <math.h>

#include "cuda_check.h"
#include "kernels.h"
#include "philox.cuh"

// ---- Shapes ---------------------------------------------------------------------------------------------
// A block has ATT_THREADS threads, seen as ATT_TY x ATT_TX (ty, tx). In a tile product the thread owns the
// output rows ty + ATT_TY a and columns tx + ATT_TX b: the 16 threads of a row sit in one half-warp, so the
// softmax's row max and sum are shuffles within it.
// HS is the head size rounded up to a supported size (16, 32, 64, 128): tiles hold zeros past hs, which add
// nothing. TILE (query rows and keys of a tile) is 32, or 16 at HS 128, so that a block's tiles fit 48 KiB.
enum { ATT_THREADS = 128, ATT_TX = 16, ATT_TY = 8, ATT_MAX_HS = 128 };

template <int HS>
struct AttShape {
    static constexpr int TILE = HS <= 64 ? 32 : 16;
    static constexpr int LDH = HS + 1;    // row stride of the [TILE, HS] tiles: odd, so a warp's loads of
    static constexpr int LDT = TILE + 1;  // different rows hit different banks; likewise [TILE, TILE] tiles
    static constexpr int RT = TILE / ATT_TY;  // rows a thread owns in a tile product
    static constexpr int CT = TILE / ATT_TX;  // ... its columns of a [TILE, TILE] product
    static constexpr int CH = HS / ATT_TX;    // ... its columns of a [TILE, HS] product
    // Dynamic shared memory of the two kernels, in bytes.
    static constexpr size_t fwd_bytes = (3 * TILE * LDH + TILE * LDT) * sizeof(float) + TILE * TILE;
    static constexpr size_t bwd_bytes = (4 * TILE * LDH + 2 * TILE * LDT) * sizeof(float) + TILE * TILE;
};

// The kernels are instantiated for the padded head sizes 16, 32, 64 and 128, in that order (hs_index).
static int hs_index(int hs) { return hs <= 16 ? 0 : hs <= 32 ? 1 : hs <= 64 ? 2 : 3; }

extern "C" int cuda_attention_supported(int C, int H) { return H > 0 && C % H == 0 && C / H <= ATT_MAX_HS; }

static int checked_head_size(int C, int H, const char *who) {
    if (!cuda_attention_supported(C, H))
        mlm_fatal(MLM_EXIT_USAGE, "%s: d_model %d with %d heads is a head size of %s; the CUDA attention kernels take "
                  "head sizes up to %d: use more heads (model.n_heads) or --device cpu", who, C, H,
                  H > 0 && C % H == 0 ? "more than 128" : "no whole number", ATT_MAX_HS);
    return C / H;
}

extern "C" size_t cuda_attention_bias_scratch(int B, int C) { return (size_t)B * 3 * (size_t)C; }
extern "C" size_t cuda_attention_delta_scratch(int B, int T, int H) { return (size_t)B * H * T; }

// ---- Pieces shared by the two kernels -------------------------------------------------------------------

// dst[r, d] (row stride HS + 1) = src[(row0 + r) * ld + d] (+ bias[d]) for the tile's rows, 0 past T and past hs:
// a tile of one head's q, k or v (src and bias at the head's first column) or of its dO.
template <int HS, int TILE>
static __device__ void load_rows(float *dst, const float *src, size_t ld, const float *bias, int row0, int T,
                                 int hs) {
    for (int idx = threadIdx.x; idx < TILE * HS; idx += blockDim.x) {
        int r = idx / HS, d = idx % HS, t = row0 + r;
        float x = 0.0f;
        if (t < T && d < hs) {
            x = src[(size_t)t * ld + d];
            if (bias) x = __fadd_rn(x, bias[d]);
        }
        dst[r * (HS + 1) + d] = x;
    }
}

// acc[a][b] += sum_k A(row, k) B(k, col) over k < K for the thread's rows ty + ATT_TY a and columns tx + ATT_TX b.
// Shared-memory operands: A(row, k) = a[row * lda + k] (A_T: a[k * lda + row]), B(k, col) = b[k * ldb + col]
// (B_T: b[col * ldb + k]). Each sum in k order, one rounding per term (fused multiply-add).
template <int R, int CC, int K, bool A_T, bool B_T>
static __device__ __forceinline__ void tile_product(float (&acc)[R][CC], const float *a, int lda, const float *b,
                                                    int ldb) {
    int tx = threadIdx.x % ATT_TX, ty = threadIdx.x / ATT_TX;
    for (int k = 0; k < K; k++) {
        float av[R], bv[CC];
        for (int i = 0; i < R; i++) {
            int row = ty + ATT_TY * i;
            av[i] = A_T ? a[k * lda + row] : a[row * lda + k];
        }
        for (int j = 0; j < CC; j++) {
            int col = tx + ATT_TX * j;
            bv[j] = B_T ? b[col * ldb + k] : b[k * ldb + col];
        }
        for (int i = 0; i < R; i++)
            for (int j = 0; j < CC; j++) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
    }
}

// Max and sum over the 16 threads of a tile row (one half-warp; every lane of the warp takes part).
static __device__ __forceinline__ float row_max(float x) {
    for (int o = ATT_TX / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
static __device__ __forceinline__ float row_sum(float x) {
    for (int o = ATT_TX / 2; o > 0; o >>= 1) x = __fadd_rn(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Whether query row i may attend to key j: a key of the sequence ([PAD] keys masked when key_valid is given).
static __device__ __forceinline__ bool key_ok(int j, int T, const uint8_t *key_valid /* [T] or NULL */) {
    return j < T && (!key_valid || key_valid[j]);
}

// The key mask of sequence b (attention.c's sequence_key_mask): its T flags, or NULL when every key or none is valid
// (a sequence with no valid key attends to every key), so that every query row has a valid key. Each thread reads
// the flags itself: no shared state and no barrier, T bytes against the block's T x tile x hs products.
static __device__ const uint8_t *sequence_key_mask(const uint8_t *key_valid /* [B, T] or NULL */, int b, int T) {
    if (!key_valid) return NULL;
    const uint8_t *v = key_valid + (size_t)b * T;  // [T]
    bool any = false, all = true;
    for (int j = 0; j < T; j++) {
        any |= v[j] != 0;
        all &= v[j] != 0;
    }
    return any && !all ? v : NULL;
}

// The Philox key and the absolute offset of element 0 of the (micro-)batch's attention site, read once per block
// (thread 0; the caller's next barrier publishes them).
struct AttnRng {
    uint64_t seed, base;
};
static __device__ void load_attn_rng(AttnRng *s, const DeviceStep *step, uint64_t offset_in_step, int H, int T) {
    if (threadIdx.x == 0 && step) {
        s->seed = step->philox_seed;
        s->base = step_rng_offset(step, offset_in_step, (uint64_t)H * T * T);  // outputs per batch row: H T T
    }
}

// keep[r * TILE + c] = THE DROPOUT RULE for element (b, h, i0 + r, j0 + c) of the attention site, whose uniform is
// the stream's output base + (bh T + i) T + j. One Philox block (4 outputs) per task: a row's keys [j0, j0 + TILE)
// touch at most TILE / 4 + 1 blocks. Entries past T are not written (the softmax never reads them).
template <int TILE>
static __device__ void tile_keep(uint8_t *keep, const AttnRng *rng, float p, int bh, int i0, int j0, int T) {
    constexpr int per_row = TILE / 4 + 1;
    int n = min(TILE, T - j0);
    for (int w = threadIdx.x; w < TILE * per_row; w += blockDim.x) {
        int r = w / per_row, i = i0 + r;
        if (i >= T) continue;
        uint64_t g0 = rng->base + ((uint64_t)bh * T + i) * T + j0;  // the row's first key
        uint64_t blk = g0 / 4 + w % per_row;
        if (blk * 4 >= g0 + n) continue;
        uint32_t x[4];
        philox_block(rng->seed, blk, x);
        for (int k = 0; k < 4; k++) {
            uint64_t g = blk * 4 + k;
            if (g >= g0 && g < g0 + n) keep[r * TILE + (int)(g - g0)] = !(philox_to_uniform(x[k]) < p);
        }
    }
}

// ---- Forward --------------------------------------------------------------------------------------------
// grid (B * H, ceil(T / TILE)), block ATT_THREADS, dynamic shared memory AttShape<HS>::fwd_bytes.
template <int HS>
static __global__ void attention_forward_kernel_hs(float *out /* [B, T, C] */, float *lse /* [B, H, T] */,
                                                   const float *qkv /* [B, T, 3C] */,
                                                   const float *bias /* [3C] or NULL */,
                                                   const uint8_t *key_valid /* [B, T] or NULL */,
                                                   const DeviceStep *drop_step /* NULL: no dropout */,
                                                   uint64_t drop_offset_in_step, float drop_p, float drop_scale, int T,
                                                   int C, int H, int hs, float scale) {
    typedef AttShape<HS> S;
    constexpr int TILE = S::TILE, LDH = S::LDH, LDT = S::LDT, RT = S::RT, CT = S::CT, CH = S::CH;
    extern __shared__ float attn_sh[];
    float *qs = attn_sh;                          // [TILE, LDH] the block's queries
    float *ks = qs + TILE * LDH;                  // [TILE, LDH] a key tile
    float *vs = ks + TILE * LDH;                  // [TILE, LDH] its values
    float *ps = vs + TILE * LDH;                  // [TILE, LDT] dropout(exp(S - m)) of the tile
    uint8_t *keep = (uint8_t *)(ps + TILE * LDT);  // [TILE, TILE] the tile's dropout decisions
    __shared__ AttnRng rng;
    int bh = blockIdx.x, b = bh / H, h = bh % H, i0 = blockIdx.y * TILE;
    int tx = threadIdx.x % ATT_TX, ty = threadIdx.x / ATT_TX;
    bool dropping = drop_step != NULL && drop_p > 0.0f;
    const float *seq = qkv + (size_t)b * T * 3 * C + (size_t)h * hs;  // the head's q columns of sequence b
    const uint8_t *valid = sequence_key_mask(key_valid, b, T);
    load_attn_rng(&rng, drop_step, drop_offset_in_step, H, T);
    load_rows<HS, TILE>(qs, seq, 3 * (size_t)C, bias ? bias + (size_t)h * hs : NULL, i0, T, hs);
    float o[RT][CH], m[RT], l[RT];  // the thread's output rows (unnormalised) and their running max and sum
    for (int a = 0; a < RT; a++) {
        m[a] = -INFINITY, l[a] = 0.0f;
        for (int c = 0; c < CH; c++) o[a][c] = 0.0f;
    }
    for (int j0 = 0; j0 < T; j0 += TILE) {
        __syncthreads();  // the previous tile's products are done with ks, vs, ps and keep
        load_rows<HS, TILE>(ks, seq + C, 3 * (size_t)C, bias ? bias + C + (size_t)h * hs : NULL, j0, T, hs);
        load_rows<HS, TILE>(vs, seq + 2 * C, 3 * (size_t)C, bias ? bias + 2 * C + (size_t)h * hs : NULL, j0, T, hs);
        if (dropping) tile_keep<TILE>(keep, &rng, drop_p, bh, i0, j0, T);
        __syncthreads();
        float s[RT][CT] = {};
        tile_product<RT, CT, HS, false, true>(s, qs, LDH, ks, LDH);  // Q K^T
        for (int a = 0; a < RT; a++) {
            int row = ty + ATT_TY * a;
            bool row_ok = i0 + row < T;  // rows past T (the last query tile) attend to nothing
            float mx = -INFINITY;
            for (int c = 0; c < CT; c++) {
                int j = j0 + tx + ATT_TX * c;
                s[a][c] = row_ok && key_ok(j, T, valid) ? __fmul_rn(s[a][c], scale) : -INFINITY;
                mx = fmaxf(mx, s[a][c]);
            }
            float m_new = fmaxf(m[a], row_max(mx));
            // Rescale the earlier tiles' sum and output (exp(-inf) = 0 before the first valid key); while every key so
            // far is [PAD] there is nothing to rescale and every p is 0.
            float corr = m_new == -INFINITY ? 1.0f : expf(__fsub_rn(m[a], m_new));
            float sum = 0.0f;
            for (int c = 0; c < CT; c++) {
                int col = tx + ATT_TX * c;
                float p = s[a][c] == -INFINITY ? 0.0f : expf(__fsub_rn(s[a][c], m_new));
                sum = __fadd_rn(sum, p);
                if (dropping && p != 0.0f)  // THE DROPOUT RULE on the probabilities (keep is read for valid keys only)
                    p = __fmul_rn(p, (float)keep[row * TILE + col] * drop_scale);
                ps[row * LDT + col] = p;
            }
            l[a] = __fadd_rn(__fmul_rn(l[a], corr), row_sum(sum));
            m[a] = m_new;
            for (int c = 0; c < CH; c++) o[a][c] = __fmul_rn(o[a][c], corr);
        }
        // The product reads only the thread's own rows of ps (ty + ATT_TY a), which its half-warp wrote: the warp's
        // barrier orders those writes before the reads (the whole block's would wait for nothing more).
        __syncwarp();
        tile_product<RT, CH, TILE, false, false>(o, ps, LDT, vs, LDH);  // o += dropout(P~) V
    }
    for (int a = 0; a < RT; a++) {
        int i = i0 + ty + ATT_TY * a;
        if (i >= T) continue;
        float inv = __fdiv_rn(1.0f, l[a]);  // every row has a valid key (sequence_key_mask), so l > 0
        float *y = out + ((size_t)b * T + i) * C + (size_t)h * hs;
        for (int c = 0; c < CH; c++) {
            int d = tx + ATT_TX * c;
            if (d < hs) y[d] = __fmul_rn(o[a][c], inv);
        }
        if (tx == 0) lse[(size_t)bh * T + i] = __fadd_rn(m[a], logf(l[a]));
    }
}

// One instantiation's launch: the kernel, its tile and its shared memory all follow from the head size.
template <int HS>
static void attention_forward_launch(float *out, float *lse, const float *qkv, const float *qkv_bias,
                                     const uint8_t *key_valid, const DeviceStep *step, CudaAttnDropout drop, int B,
                                     int T, int C, int H, int hs, cudaStream_t stream) {
    dim3 grid((unsigned)(B * H), (unsigned)((T + AttShape<HS>::TILE - 1) / AttShape<HS>::TILE));
    attention_forward_kernel_hs<HS><<<grid, ATT_THREADS, AttShape<HS>::fwd_bytes, stream>>>(
        out, lse, qkv, qkv_bias, key_valid, step, drop.offset_in_step, drop.p, drop.scale, T, C, H, hs,
        1.0f / sqrtf((float)hs));
}

extern "C" void cuda_attention_forward(float *out, float *lse, const float *qkv, const float *qkv_bias,
                                       const uint8_t *key_valid, CudaAttnDropout drop, int B, int T, int C, int H,
                                       cudaStream_t stream) {
    int hs = checked_head_size(C, H, "cuda_attention_forward");
    if (B <= 0 || T <= 0) return;
    const DeviceStep *step = drop.p > 0.0f ? drop.step : NULL;
#define ATTN_FORWARD(HS) \
    attention_forward_launch<HS>(out, lse, qkv, qkv_bias, key_valid, step, drop, B, T, C, H, hs, stream)
    switch (hs_index(hs)) {  // the instantiation for the head size, padded (hs_index)
    case 0: ATTN_FORWARD(16); break;
    case 1: ATTN_FORWARD(32); break;
    case 2: ATTN_FORWARD(64); break;
    default: ATTN_FORWARD(128);
    }
#undef ATTN_FORWARD
    CUDA_CHECK_LAUNCH();
}

// ---- Backward -------------------------------------------------------------------------------------------
// grid B * H, block ATT_THREADS, dynamic shared memory AttShape<HS>::bwd_bytes. The head's slices of dqkv are
// overwritten; delta[bh, T] is the block's scratch for D; bias_partial[b, 3C] (if not NULL) receives the column
// sums over t of the block's columns of dqkv, in t order.
template <int HS>
static __global__ void attention_backward_kernel_hs(float *dqkv /* [B, T, 3C] */, float *bias_partial /* [B, 3C] */,
                                                    float *delta /* [B, H, T] */, const float *dout /* [B, T, C] */,
                                                    const float *qkv /* [B, T, 3C] */,
                                                    const float *bias /* [3C] or NULL */,
                                                    const float *out /* [B, T, C] */,
                                                    const float *lse /* [B, H, T] */,
                                                    const uint8_t *key_valid /* [B, T] or NULL */,
                                                    const DeviceStep *drop_step /* NULL: no dropout */,
                                                    uint64_t drop_offset_in_step, float drop_p, float drop_scale,
                                                    int T, int C, int H, int hs, float scale) {
    typedef AttShape<HS> S;
    constexpr int TILE = S::TILE, LDH = S::LDH, LDT = S::LDT, RT = S::RT, CT = S::CT, CH = S::CH;
    extern __shared__ float attn_sh[];
    float *ks = attn_sh;                           // [TILE, LDH] the key tile
    float *vs = ks + TILE * LDH;                   // [TILE, LDH] its values
    float *qs = vs + TILE * LDH;                   // [TILE, LDH] a query tile
    float *gs = qs + TILE * LDH;                   // [TILE, LDH] its rows of dO
    float *ps = gs + TILE * LDH;                   // [TILE, LDT] dropout(P) of the pair
    float *dss = ps + TILE * LDT;                  // [TILE, LDT] dS of the pair
    uint8_t *keep = (uint8_t *)(dss + TILE * LDT);  // [TILE, TILE] the pair's dropout decisions
    __shared__ AttnRng rng;
    int bh = blockIdx.x, b = bh / H, h = bh % H;
    int tx = threadIdx.x % ATT_TX, ty = threadIdx.x / ATT_TX;
    bool dropping = drop_step != NULL && drop_p > 0.0f;
    size_t C3 = 3 * (size_t)C, col0 = (size_t)h * hs;
    const float *seq = qkv + (size_t)b * T * C3 + col0;       // the head's q columns of sequence b
    const float *go = dout + (size_t)b * T * C + col0;        // [T, hs], row stride C
    const float *y = out + (size_t)b * T * C + col0;          // [T, hs], row stride C
    float *dseq = dqkv + (size_t)b * T * C3 + col0;           // the head's dq columns of sequence b
    const float *lse_h = lse + (size_t)bh * T, *delta_h = delta + (size_t)bh * T;
    const uint8_t *valid = sequence_key_mask(key_valid, b, T);
    load_attn_rng(&rng, drop_step, drop_offset_in_step, H, T);
    // D_i = dO_i . O_i = sum_j P_ij dP_ij (dropout included): the softmax backward's row sum.
    for (int i = threadIdx.x; i < T; i += blockDim.x) {
        float d = 0.0f;
        for (int e = 0; e < hs; e++) d = __fmaf_rn(go[(size_t)i * C + e], y[(size_t)i * C + e], d);
        delta[(size_t)bh * T + i] = d;
    }
    for (int j0 = 0; j0 < T; j0 += TILE) {
        __syncthreads();  // D written; the previous key tile's products are done with ks and vs
        load_rows<HS, TILE>(ks, seq + C, C3, bias ? bias + C + col0 : NULL, j0, T, hs);
        load_rows<HS, TILE>(vs, seq + 2 * C, C3, bias ? bias + 2 * C + col0 : NULL, j0, T, hs);
        float dk[RT][CH] = {}, dv[RT][CH] = {};  // the thread's rows ty + ATT_TY a of the key tile
        for (int i0 = 0; i0 < T; i0 += TILE) {
            __syncthreads();  // the previous pair's products are done with qs, gs, ps, dss and keep
            load_rows<HS, TILE>(qs, seq, C3, bias ? bias + col0 : NULL, i0, T, hs);
            load_rows<HS, TILE>(gs, go, C, NULL, i0, T, hs);
            if (dropping) tile_keep<TILE>(keep, &rng, drop_p, bh, i0, j0, T);
            __syncthreads();
            float s[RT][CT] = {}, dpd[RT][CT] = {};
            tile_product<RT, CT, HS, false, true>(s, qs, LDH, ks, LDH);   // Q K^T
            tile_product<RT, CT, HS, false, true>(dpd, gs, LDH, vs, LDH);  // d dropout(P) = dO V^T
            for (int a = 0; a < RT; a++) {
                int row = ty + ATT_TY * a, i = i0 + row;
                float lse_i = i < T ? lse_h[i] : INFINITY, d_i = i < T ? delta_h[i] : 0.0f;
                for (int c = 0; c < CT; c++) {
                    int col = tx + ATT_TX * c, j = j0 + col;
                    float p = i < T && key_ok(j, T, valid) ? expf(__fsub_rn(__fmul_rn(s[a][c], scale), lse_i)) : 0.0f;
                    float pd = p, g = dpd[a][c];
                    if (dropping && p != 0.0f) {  // undo the dropout: dP = d dropout(P) * keep * scale
                        float z = (float)keep[row * TILE + col] * drop_scale;
                        pd = __fmul_rn(p, z);
                        g = __fmul_rn(g, z);
                    }
                    ps[row * LDT + col] = pd;
                    dss[row * LDT + col] = __fmul_rn(__fmul_rn(p, __fsub_rn(g, d_i)), scale);  // dS = P (dP - D) scale
                }
            }
            __syncthreads();  // ps and dss complete: the products below read them by column, across warps
            tile_product<RT, CH, TILE, true, false>(dv, ps, LDT, gs, LDH);   // dV += dropout(P)^T dO
            tile_product<RT, CH, TILE, true, false>(dk, dss, LDT, qs, LDH);  // dK += dS^T Q
            float dq[RT][CH] = {};
            tile_product<RT, CH, TILE, false, false>(dq, dss, LDT, ks, LDH);  // this key tile's part of dS K
            // dQ: the thread's own elements, the first key tile's part written, the later ones added in order.
            for (int a = 0; a < RT; a++) {
                int i = i0 + ty + ATT_TY * a;
                if (i >= T) continue;
                for (int c = 0; c < CH; c++) {
                    int d = tx + ATT_TX * c;
                    if (d >= hs) continue;
                    float *dst = dseq + (size_t)i * C3 + d;
                    *dst = j0 == 0 ? dq[a][c] : __fadd_rn(*dst, dq[a][c]);
                }
            }
        }
        for (int a = 0; a < RT; a++) {
            int j = j0 + ty + ATT_TY * a;
            if (j >= T) continue;
            for (int c = 0; c < CH; c++) {
                int d = tx + ATT_TX * c;
                if (d >= hs) continue;
                float *row = dseq + (size_t)j * C3 + d;
                row[C] = dk[a][c];
                row[2 * C] = dv[a][c];
            }
        }
    }
    if (!bias_partial) return;
    __syncthreads();  // the block's own global writes above are visible to the block after the barrier
    for (int idx = threadIdx.x; idx < 3 * hs; idx += blockDim.x) {
        int which = idx / hs, d = idx % hs;
        size_t c = (size_t)which * C + col0 + d;
        float s = 0.0f;
        for (int t = 0; t < T; t++) s = __fadd_rn(s, dqkv[((size_t)b * T + t) * C3 + c]);
        bias_partial[(size_t)b * C3 + c] = s;
    }
}

template <int HS>
static void attention_backward_launch(float *dqkv, float *bias_partial, float *delta, const float *dout,
                                      const float *qkv, const float *qkv_bias, const float *out, const float *lse,
                                      const uint8_t *key_valid, const DeviceStep *step, CudaAttnDropout drop, int B,
                                      int T, int C, int H, int hs, cudaStream_t stream) {
    attention_backward_kernel_hs<HS><<<(unsigned)(B * H), ATT_THREADS, AttShape<HS>::bwd_bytes, stream>>>(
        dqkv, bias_partial, delta, dout, qkv, qkv_bias, out, lse, key_valid, step, drop.offset_in_step, drop.p,
        drop.scale, T, C, H, hs, 1.0f / sqrtf((float)hs));
}

extern "C" void cuda_attention_backward(float *dqkv, float *bias_partial, float *delta, const float *dout,
                                        const float *qkv, const float *qkv_bias, const float *out, const float *lse,
                                        const uint8_t *key_valid, CudaAttnDropout drop, int B, int T, int C, int H,
                                        cudaStream_t stream) {
    int hs = checked_head_size(C, H, "cuda_attention_backward");
    if (B <= 0 || T <= 0) return;
    const DeviceStep *step = drop.p > 0.0f ? drop.step : NULL;
#define ATTN_BACKWARD(HS) \
    attention_backward_launch<HS>(dqkv, bias_partial, delta, dout, qkv, qkv_bias, out, lse, key_valid, step, drop, B, \
                                  T, C, H, hs, stream)
    switch (hs_index(hs)) {
    case 0: ATTN_BACKWARD(16); break;
    case 1: ATTN_BACKWARD(32); break;
    case 2: ATTN_BACKWARD(64); break;
    default: ATTN_BACKWARD(128);
    }
#undef ATTN_BACKWARD
    CUDA_CHECK_LAUNCH();
}

// ---- The key-padding mask (model.arch = bert) -------------------------------------------------------------
// valid[n] = inputs[n] != pad_id: transformers' attention_mask, as cpu_model.c derives it.
static __global__ void key_valid_kernel(uint8_t *valid /* [n] */, const int *inputs /* [n] */, size_t n, int pad_id) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        valid[i] = inputs[i] != pad_id;
}

extern "C" void cuda_key_valid(uint8_t *valid, const int *inputs, size_t n, int pad_id, cudaStream_t stream) {
    if (n == 0) return;
    size_t blocks = (n + 255) / 256;
    key_valid_kernel<<<(unsigned)(blocks < (1u << 20) ? blocks : (1u << 20)), 256, 0, stream>>>(valid, inputs, n, pad_id);
    CUDA_CHECK_LAUNCH();
}
