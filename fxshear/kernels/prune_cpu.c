/* Native CPU kernels for fxshear's pruned saved activations (see prune.py for the format).
 *
 * Why native: on CPU the exact per-sample top-k is a torch.topk (a partial sort) followed by
 * mask, two running counts, a scatter and the bit packing, six passes over the activation that
 * cost several times the Linear they serve.  Here one sample is one thread's job: a radix
 * select of the k-th largest magnitude key (a histogram of a sample of the keys, or of all of
 * them, picks top-level bins; one pass collects the keys in those bins, which are narrowed to
 * the exact key), then one pass writes the bits and the values.
 *
 * Semantics are those of prune_pack_reference exactly: a magnitude's key is its IEEE bit
 * pattern without the sign (ordered like the magnitudes), NaN counts as infinity, the kept
 * entries are those above the k-th largest key plus ties at it in index order, values keep
 * their bits, padding bits of the last byte are 0.  Built and loaded by native.py with ctypes;
 * no Python or torch headers, so it compiles in about a second.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FIRST_LEVEL_BITS 11
#define HIST_BINS (1 << FIRST_LEVEL_BITS)

/* Magnitude keys: the bit pattern without the sign, NaN (any payload) mapped to infinity. */
#define KEY_F32(u) (((u) & 0x7fffffffu) > 0x7f800000u ? 0x7f800000u : ((u) & 0x7fffffffu))
#define KEY_F16(u) (((u) & 0x7fffu) > 0x7c00u ? 0x7c00u : ((u) & 0x7fffu))
#define KEY_BF16(u) (((u) & 0x7fffu) > 0x7f80u ? 0x7f80u : ((u) & 0x7fffu))

/* The bin, counted from the top of ``hist`` (``bins`` entries), that holds the need-th largest
 * key; *need becomes that key's rank inside the bin. */
static int pick_bin(const uint32_t *hist, int bins, int64_t *need) {
    int64_t above = 0;
    int bin = bins - 1;
    for (; bin > 0; --bin) {
        if (above + hist[bin] >= *need) break;
        above += hist[bin];
    }
    *need -= above;
    return bin;
}

/* Narrow ``count`` candidate keys, which share all bits above ``hi``, to the need-th largest.
 * Returns the key; *need is left at how many entries equal to it are kept. */
static uint32_t narrow(uint32_t *keys, int64_t count, int hi, uint32_t prefix, int64_t *need) {
    uint32_t hist[HIST_BINS];
    while (hi > 0) {
        const int width = hi < FIRST_LEVEL_BITS ? hi : FIRST_LEVEL_BITS;
        const int shift = hi - width;
        const uint32_t mask = (1u << width) - 1u;
        memset(hist, 0, sizeof(uint32_t) << width);
        for (int64_t j = 0; j < count; ++j) hist[(keys[j] >> shift) & mask]++;
        const uint32_t bin = (uint32_t)pick_bin(hist, 1 << width, need);
        prefix |= bin << shift;
        int64_t m = 0; /* keep the candidates in the chosen bin, in place */
        for (int64_t j = 0; j < count; ++j) {
            const uint32_t kj = keys[j];
            keys[m] = kj;
            m += ((kj >> shift) & mask) == bin;
        }
        count = m;
        hi = shift;
    }
    return prefix;
}

/* A stride near n / SAMPLED_KEYS that is odd and not a multiple of 3, so that the sampled
 * positions do not keep hitting the same columns of power-of-two (or 3 * 2^j) wide rows. */
#define SAMPLED_KEYS 4096
#define SAMPLE_FROM 32768
static int64_t sample_stride(int64_t n) {
    int64_t stride = n / SAMPLED_KEYS;
    while (stride % 2 == 0 || stride % 3 == 0) --stride;
    return stride < 1 ? 1 : stride;
}

/* One sample: values [k] and bits [ceil(n/8)] of x [n].  ``scratch`` has room for n keys and
 * ``staging`` for k + 1 values (the pack writes every entry's value and advances on kept ones).
 *
 * Finding the k-th largest key: a histogram of ~4096 evenly spaced keys predicts which top-level
 * bins (11 key bits) hold it, with a margin of several standard deviations of the sample rank;
 * one pass counts the keys above that bracket and collects those inside it (a few percent), and
 * the bracket is narrowed to the exact key.  The pass checks that the k-th key did fall inside;
 * when it did not (an unlucky or adversarial sample) a histogram of all keys picks the one bin
 * instead and the same pass runs again, so the result is exact either way.  Small samples take
 * the full histogram directly.  Then one pass writes bits and values. */
#define DEFINE_PACK_SAMPLE(NAME, T, KEY, KEY_BITS)                                                   \
static void NAME(const T *x, int64_t n, int64_t k, T *values, uint8_t *bits, uint32_t *scratch,     \
                 T *staging) {                                                                       \
    const int64_t row_bytes = (n + 7) / 8;                                                           \
    if (k >= n) { /* everything kept */                                                              \
        memcpy(values, x, sizeof(T) * (size_t)n);                                                    \
        memset(bits, 0xff, (size_t)(n / 8));                                                         \
        if (n % 8) bits[n / 8] = (uint8_t)((1u << (n % 8)) - 1u);                                    \
        return;                                                                                      \
    }                                                                                                \
    const int width = KEY_BITS < FIRST_LEVEL_BITS ? KEY_BITS : FIRST_LEVEL_BITS;                     \
    const int shift = KEY_BITS - width;                                                              \
    uint32_t hist[4][HIST_BINS];                                                                     \
    int64_t ties, j;                                                                                 \
    uint32_t threshold;                                                                              \
    for (int full = n < SAMPLE_FROM;; full = 1) {                                                    \
        uint32_t lo_bin, hi_bin;                                                                     \
        memset(hist, 0, full ? sizeof(hist) : sizeof(hist[0]));                                      \
        if (full) { /* every key; four interleaved counters so runs of one bin overlap */            \
            for (j = 0; j + 4 <= n; j += 4) {                                                        \
                hist[0][(KEY(x[j])) >> shift]++;                                                     \
                hist[1][(KEY(x[j + 1])) >> shift]++;                                                 \
                hist[2][(KEY(x[j + 2])) >> shift]++;                                                 \
                hist[3][(KEY(x[j + 3])) >> shift]++;                                                 \
            }                                                                                        \
            for (; j < n; ++j) hist[0][(KEY(x[j])) >> shift]++;                                      \
            for (int b = 0; b < (1 << width); ++b) hist[0][b] += hist[1][b] + hist[2][b] + hist[3][b];\
            int64_t need = k;                                                                        \
            lo_bin = hi_bin = (uint32_t)pick_bin(hist[0], 1 << width, &need);                        \
        } else { /* evenly spaced keys, a bracket of >= 6 standard deviations of the rank */         \
            const int64_t stride = sample_stride(n);                                                 \
            int64_t m = 0;                                                                           \
            for (j = 0; j < n; j += stride, ++m) hist[0][(KEY(x[j])) >> shift]++;                    \
            const int64_t rank = (k * m + n - 1) / n;                                                \
            int64_t margin = 16;                                                                     \
            while (margin * margin < 36 * rank) margin += 16;                                        \
            int64_t need_hi = rank > margin ? rank - margin : 1;                                     \
            int64_t need_lo = rank + margin < m ? rank + margin : m;                                 \
            hi_bin = (uint32_t)pick_bin(hist[0], 1 << width, &need_hi);                              \
            lo_bin = (uint32_t)pick_bin(hist[0], 1 << width, &need_lo);                              \
        }                                                                                            \
        int64_t above = 0, count = 0; /* keys above the bracket; keys inside it, collected */        \
        for (j = 0; j < n; ++j) {                                                                    \
            const uint32_t kj = KEY(x[j]);                                                           \
            const uint32_t bin = kj >> shift;                                                        \
            scratch[count] = kj;                                                                     \
            count += (bin >= lo_bin) & (bin <= hi_bin);                                              \
            above += bin > hi_bin;                                                                   \
        }                                                                                            \
        if (above < k && above + count >= k) { /* always true after the full histogram */            \
            ties = k - above;                                                                        \
            threshold = narrow(scratch, count, KEY_BITS, 0, &ties);                                  \
            break;                                                                                   \
        }                                                                                            \
    }                                                                                                \
    int64_t kept = 0;                                                                                \
    for (int64_t byte = 0; byte < row_bytes; ++byte) {                                               \
        const int64_t start = byte * 8, stop = start + 8 < n ? start + 8 : n;                        \
        uint32_t b = 0;                                                                              \
        for (j = start; j < stop; ++j) {                                                             \
            const uint32_t kj = KEY(x[j]);                                                           \
            uint32_t keep = kj > threshold;                                                          \
            if (kj == threshold && ties > 0) { keep = 1; --ties; }                                   \
            staging[kept] = x[j];                                                                    \
            kept += keep;                                                                            \
            b |= keep << (j - start);                                                                \
        }                                                                                            \
        bits[byte] = (uint8_t)b;                                                                     \
    }                                                                                                \
    memcpy(values, staging, sizeof(T) * (size_t)k);                                                  \
}

DEFINE_PACK_SAMPLE(pack_sample_f32, uint32_t, KEY_F32, 31)
DEFINE_PACK_SAMPLE(pack_sample_f16, uint16_t, KEY_F16, 15)
DEFINE_PACK_SAMPLE(pack_sample_bf16, uint16_t, KEY_BF16, 15)

/* values [samples, k] and bits uint8[samples, ceil(n/8)] of x [samples, n], one sample per
 * thread.  dtype_code: 0 fp32, 1 fp16, 2 bf16.  Returns 0, -1 when out of memory, -2 for an
 * unknown dtype. */
int fxshear_prune_pack(const void *x, int64_t samples, int64_t n, int64_t k, int dtype_code, void *values,
                       uint8_t *bits, int threads) {
    if (dtype_code < 0 || dtype_code > 2) return -2;
    const size_t elem = dtype_code == 0 ? 4 : 2;
    const int64_t row_bytes = (n + 7) / 8;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (samples > 1 && threads > 1)
    {
        uint32_t *scratch = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(n > 0 ? n : 1));
        void *staging = malloc(elem * (size_t)(k + 1));
        if (scratch == NULL || staging == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < samples; ++s) {
            if (scratch == NULL || staging == NULL) continue;
            const size_t x_at = (size_t)(s * n), v_at = (size_t)(s * k);
            uint8_t *bs = bits + s * row_bytes;
            if (dtype_code == 0)
                pack_sample_f32((const uint32_t *)x + x_at, n, k, (uint32_t *)values + v_at, bs, scratch,
                                (uint32_t *)staging);
            else if (dtype_code == 1)
                pack_sample_f16((const uint16_t *)x + x_at, n, k, (uint16_t *)values + v_at, bs, scratch,
                                (uint16_t *)staging);
            else
                pack_sample_bf16((const uint16_t *)x + x_at, n, k, (uint16_t *)values + v_at, bs, scratch,
                                 (uint16_t *)staging);
        }
        free(scratch);
        free(staging);
    }
    return failed ? -1 : 0;
}

/* dense [samples, n]: the kept values in place, zeros (all bits 0) elsewhere.  A memset and
 * writes at the set bits only: faster than one branchless pass writing every entry (1.7 vs
 * 2.6 ms for 16 x 196608 fp32 on a 2-core Xeon). */
int fxshear_unprune(const void *values, const uint8_t *bits, int64_t samples, int64_t n, int64_t k,
                    int elem_size, void *dense, int threads) {
    if (elem_size != 4 && elem_size != 2) return -2;
    const int64_t row_bytes = (n + 7) / 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (samples > 1 && threads > 1)
    for (int64_t s = 0; s < samples; ++s) {
        const char *vs = (const char *)values + (size_t)(s * k) * elem_size;
        const uint8_t *bs = bits + s * row_bytes;
        char *ds = (char *)dense + (size_t)(s * n) * elem_size;
        int64_t taken = 0;
        memset(ds, 0, (size_t)n * elem_size);
        for (int64_t byte = 0; byte < row_bytes; ++byte) {
            uint8_t b = bs[byte];
            while (b) {
                int bit = __builtin_ctz(b);
                int64_t j = byte * 8 + bit;
                b &= (uint8_t)(b - 1);
                if (j < n && taken < k) {
                    if (elem_size == 4)
                        ((uint32_t *)ds)[j] = ((const uint32_t *)vs)[taken];
                    else
                        ((uint16_t *)ds)[j] = ((const uint16_t *)vs)[taken];
                    ++taken;
                }
            }
        }
    }
    return 0;
}
