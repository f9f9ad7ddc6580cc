// keep_bits.h: the packed layout of a dropout keep mask, shared verbatim by the CPU backend and the CUDA kernels
// so that one test can compare the two masks word for word.
#ifndef MLM_KEEP_BITS_H
#define MLM_KEEP_BITS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __CUDACC__
#define KEEP_FN __host__ __device__ static inline
#else
#define KEEP_FN static inline
#endif

// A mask of n elements is keep_words(n) 32-bit words: element i is bit i % 32 (least significant first) of word
// i / 32, 1 = kept. The bits past n in the last word are 0. Every stored mask starts on a word boundary (a layer's
// slot is keep_words(max elements) words), so a word never holds two masks' bits and each word has one writer.
// Bits, not bytes: at bert-base T 512 batch 256 the two residual masks are 2 x 151 MB instead of 2 x 1.2 GB.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "keep_bits.h: keep_bit reads the bytes of little-endian words; this machine is not little-endian"
#endif
typedef uint32_t KeepWord;
enum { KEEP_WORD_BITS = 32 };

KEEP_FN size_t keep_words(size_t n) { return (n + KEEP_WORD_BITS - 1) / KEEP_WORD_BITS; }

// 1 if element i of the mask is kept, else 0. It reads the byte that holds the bit, byte i / 8 of the little-endian
// words (x86 and NVIDIA GPUs are little-endian): a thread per element then loads 1 byte rather than 4 (a warp's 32
// loads fall in one word either way), and the bits are those of the words, so writers still write whole words.
KEEP_FN uint32_t keep_bit(const KeepWord *keep, size_t i) {
    return ((const uint8_t *)keep)[i / 8] >> (i % 8) & 1u;
}

#endif
