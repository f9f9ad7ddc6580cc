// attention_ref.h: the materialised multi-head attention in double precision (every [T, T] matrix formed), the
// independent reference of the tiled attention's tests on both backends (test_cpu_ops, test_gpu_ops).
#ifndef MLM_TEST_ATTENTION_REF_H
#define MLM_TEST_ATTENTION_REF_H

#include <stddef.h>
#include <stdint.h>

// qkv[B,T,3C] (bias included); key_valid[B,T] or NULL (0: a [PAD] key, never attended to); keep[B,H,T,T] or NULL:
// the dropout decisions of the probabilities, applied as P * keep * drop_scale. scale = the float 1 / sqrtf(hs) the
// kernels use. A sequence whose keys are all [PAD] attends to every key (ops.h).
// out[B,T,C] and lse[B,H,T] (either may be NULL).
void attention_ref_forward(double *out, double *lse, const float *qkv, const uint8_t *key_valid, const uint8_t *keep,
                           float drop_scale, int B, int T, int C, int H);
// dqkv[B,T,3C] (overwritten) from dout[B,T,C].
void attention_ref_backward(double *dqkv, const float *dout, const float *qkv, const uint8_t *key_valid,
                            const uint8_t *keep, float drop_scale, int B, int T, int C, int H);
// key_valid[B,T] for the tests (malloc'd): in sequence 0 every fifth key and the last are [PAD]; in sequence 1 the
// first third and the last quarter (whole key tiles of [PAD] before and after the valid ones at T >= 128); sequence
// 2 (when there is one) is all [PAD], so it attends to every key.
uint8_t *attention_ref_key_valid(int B, int T);
// max |got - want| / max |want| over n elements taken every `stride` from `first` (the columns of one of q, k, v);
// 0 when want is all zero and got equals it; +inf when got holds a NaN.
double attention_ref_error(const float *got, const double *want, size_t n, size_t first, size_t stride, size_t width);

#endif
