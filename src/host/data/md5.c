// md5.c: MD5 (RFC 1321) for verifying the downloaded or mirrored corpus.
// Neither the C library nor the CUDA Toolkit provides MD5, and the checksum is fixed by the reference, so
// this small implementation avoids a dependency on OpenSSL just for one digest.
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "mlm/data.h"

typedef struct {
    uint32_t a, b, c, d;
    uint64_t len;        // bytes consumed
    uint8_t buf[64];
    size_t fill;
} Md5;

static const uint32_t K[64] = {
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391};
static const int R[64] = {7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22,
                          5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20, 5, 9,  14, 20,
                          4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23,
                          6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21};

static uint32_t rotl(uint32_t x, int c) { return (x << c) | (x >> (32 - c)); }

static void md5_block(Md5 *m, const uint8_t *p) {
    uint32_t w[16];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 | (uint32_t)p[4 * i + 3] << 24;
    uint32_t a = m->a, b = m->b, c = m->c, d = m->d;
    for (int i = 0; i < 64; i++) {
        uint32_t f;
        int g;
        if (i < 16) { f = (b & c) | (~b & d); g = i; }
        else if (i < 32) { f = (d & b) | (~d & c); g = (5 * i + 1) % 16; }
        else if (i < 48) { f = b ^ c ^ d; g = (3 * i + 5) % 16; }
        else { f = c ^ (b | ~d); g = (7 * i) % 16; }
        uint32_t tmp = d;
        d = c;
        c = b;
        b = b + rotl(a + f + K[i] + w[g], R[i]);
        a = tmp;
    }
    m->a += a; m->b += b; m->c += c; m->d += d;
}

static void md5_init(Md5 *m) {
    m->a = 0x67452301; m->b = 0xefcdab89; m->c = 0x98badcfe; m->d = 0x10325476;
    m->len = 0;
    m->fill = 0;
}

static void md5_update(Md5 *m, const uint8_t *p, size_t n) {
    m->len += n;
    while (n > 0) {
        size_t take = 64 - m->fill;
        if (take > n) take = n;
        memcpy(m->buf + m->fill, p, take);
        m->fill += take;
        p += take;
        n -= take;
        if (m->fill == 64) { md5_block(m, m->buf); m->fill = 0; }
    }
}

static void md5_final(Md5 *m, char out[33]) {
    uint64_t bits = m->len * 8;
    uint8_t pad = 0x80, zero = 0, len8[8];
    md5_update(m, &pad, 1);
    while (m->fill != 56) md5_update(m, &zero, 1);
    for (int i = 0; i < 8; i++) len8[i] = (uint8_t)(bits >> (8 * i));
    md5_update(m, len8, 8);
    uint32_t words[4] = {m->a, m->b, m->c, m->d};
    for (int i = 0; i < 16; i++) snprintf(out + 2 * i, 3, "%02x", (words[i / 4] >> (8 * (i % 4))) & 0xff);
}

void data_md5(const void *data, size_t len, char out[33]) {
    Md5 m;
    md5_init(&m);
    md5_update(&m, data, len);
    md5_final(&m, out);
}

int data_md5_file(const char *path, char out[33]) {
    FILE *f = fopen(path, "rb");
    if (!f) return 1;
    Md5 m;
    md5_init(&m);
    uint8_t buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof(buf), f)) > 0) md5_update(&m, buf, got);
    int err = ferror(f);
    fclose(f);
    if (err) return 1;
    md5_final(&m, out);
    return 0;
}
