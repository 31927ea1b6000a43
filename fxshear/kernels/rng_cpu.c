/* Bernoulli keep-masks for fxshear's "fast" dropout on CPU, packed 8 flags to a byte.
 *
 * Why: Inductor's CPU code for torch.rand runs a whole Philox4x32-10 per element and keeps one
 * of its four 32-bit outputs (~3.5 ns per element on a 2-core Xeon); dropout masks of a BERT
 * step are tens of millions of elements.  Here each Philox call gives four flags, the loop over
 * 16 bytes at a time is plain 32-bit arithmetic the compiler vectorizes, and the flags go
 * straight into the packed layout of fxshear/kernels/bits.py (element i is bit i % 8 of byte
 * i / 8, pad bits 0), so no bool tensor is written and read back.
 *
 * Stream: flag i is word (i % 4) of Philox4x32-10 (Salmon et al., SC'11; the generator of
 * curand and torch's CUDA RNG) with key = seed and counter = (i / 4, 0, 0, 0), kept when the
 * word is below `threshold` (keep probability threshold / 2^32).  Pure function of (seed, i):
 * any thread split gives the same bits.
 */
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define CHUNK 16 /* bytes per vectorizable batch: 128 flags, 32 Philox blocks */

/* Philox4x32-10 of counters (c0[j], c1, 0, 0) for j < n, written to out[4 * j + w]. */
static void philox_blocks(const uint32_t *c0, uint32_t c1, uint32_t k0, uint32_t k1, int n, uint32_t *out) {
    uint32_t x0[2 * CHUNK], x1[2 * CHUNK], x2[2 * CHUNK], x3[2 * CHUNK];
    for (int j = 0; j < n; ++j) {
        x0[j] = c0[j];
        x1[j] = c1;
        x2[j] = 0;
        x3[j] = 0;
    }
    uint32_t a = k0, b = k1;
    for (int round = 0; round < 10; ++round) {
        for (int j = 0; j < n; ++j) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * x0[j];
            uint64_t p1 = (uint64_t)PHILOX_M1 * x2[j];
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1[j] ^ a;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ x3[j] ^ b;
            x1[j] = (uint32_t)p1;
            x3[j] = (uint32_t)p0;
            x0[j] = y0;
            x2[j] = y2;
        }
        a += PHILOX_W0;
        b += PHILOX_W1;
    }
    for (int j = 0; j < n; ++j) {
        out[4 * j + 0] = x0[j];
        out[4 * j + 1] = x1[j];
        out[4 * j + 2] = x2[j];
        out[4 * j + 3] = x3[j];
    }
}

/* Writes packed_numel(numel) bytes of flags "word(i) < threshold" (threshold <= 2^32). */
int fxshear_bernoulli_bits(uint8_t *out, int64_t numel, uint64_t seed, uint64_t threshold, int threads) {
    if (numel < 0 || threshold > ((uint64_t)1 << 32)) return -2;
    const int64_t bytes = (numel + 7) / 8;
    const int64_t chunks = (bytes + CHUNK - 1) / CHUNK;
    const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
#else
    (void)threads;
#endif
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        uint32_t counters[2 * CHUNK], words[8 * CHUNK];
        const int64_t first_byte = chunk * CHUNK;
        const int n_bytes = (int)(bytes - first_byte < CHUNK ? bytes - first_byte : CHUNK);
        const uint64_t first_block = (uint64_t)first_byte * 2; /* 8 flags = 2 blocks per byte */
        const uint32_t c1 = (uint32_t)(first_block >> 32);
        for (int j = 0; j < 2 * CHUNK; ++j) counters[j] = (uint32_t)first_block + (uint32_t)j;
        /* A chunk never straddles a 2^32-block boundary: first_block is a multiple of 2 * CHUNK. */
        philox_blocks(counters, c1, k0, k1, 2 * n_bytes, words);
        for (int j = 0; j < n_bytes; ++j) {
            uint8_t byte = 0;
            for (int bit = 0; bit < 8; ++bit) byte |= (uint8_t)(((uint64_t)words[8 * j + bit] < threshold) << bit);
            out[first_byte + j] = byte;
        }
    }
    const int pad = (int)(bytes * 8 - numel);
    if (pad) out[bytes - 1] &= (uint8_t)(0xFFu >> pad);
    return 0;
}
