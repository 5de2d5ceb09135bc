/* Prototype of the non-zstd decode work of the recommended chunk layout, to measure its
 * cost per position on this CPU (benches/codec_experiments.py compiles it with `cc -O3
 * -march=native` into a temporary directory and calls it through ctypes).  It is a
 * measurement aid for choosing the layout, not the Rust implementation.  Times are CPU
 * time of the calling thread (the machine is shared).
 *
 * Tiered byte code: main byte m; ext bytes (big-endian, 0..3 of them) in a separate stream.
 * Decoding is branchless through per-main-byte tables: value = base[m] +
 * ((load_be32(ext) >> shift[m]) & mask[m]); ext += nbytes[m].  Ext buffers must have 4
 * readable padding bytes.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef struct {
    uint32_t base[256];
    uint32_t mask[256];
    uint8_t shift[256];
    uint8_t nbytes[256];
} tier_tables;

static void tier_make(tier_tables *t, int lit, int e1, int e2, int e3) {
    uint32_t b1 = (uint32_t)lit, b2 = b1 + (uint32_t)e1 * 256u, b3 = b2 + (uint32_t)e2 * 65536u;
    for (int m = 0; m < 256; m++) {
        int nb;
        uint32_t base;
        if (m < lit) { nb = 0; base = (uint32_t)m; }
        else if (m < lit + e1) { nb = 1; base = b1 + ((uint32_t)(m - lit) << 8); }
        else if (m < lit + e1 + e2) { nb = 2; base = b2 + ((uint32_t)(m - lit - e1) << 16); }
        else if (m < lit + e1 + e2 + e3) { nb = 3; base = b3 + ((uint32_t)(m - lit - e1 - e2) << 24); }
        else { nb = 0; base = 0xFFFFFFFFu; } /* reserved symbol */
        t->nbytes[m] = (uint8_t)nb;
        t->base[m] = base;
        t->shift[m] = (uint8_t)(nb ? 32 - 8 * nb : 0);
        t->mask[m] = nb ? (nb == 3 ? 0xFFFFFFu : (nb == 2 ? 0xFFFFu : 0xFFu)) : 0u;
    }
}

static inline uint32_t load_be32(const uint8_t *p) {
    uint32_t w;
    memcpy(&w, p, 4);
    return __builtin_bswap32(w);
}

static inline size_t tier_decode(const tier_tables *t, const uint8_t *main, size_t n,
                                 const uint8_t *ext, uint32_t *out) {
    size_t e = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t m = main[i];
        out[i] = t->base[m] + ((load_be32(ext + e) >> t->shift[m]) & t->mask[m]);
        e += t->nbytes[m];
    }
    return e;
}

/* Deep-rank delta pairs: byte m < 225 holds (m / 15, m % 15); 225 = escape, both values
 * then come from a tiered escape stream (cursors *em, *ee). */
static uint8_t pair_a[256], pair_b[256];
static uint64_t pair_ab[256]; /* both values as two little-endian uint32, one 8-byte store */

static void pair_tables(void) {
    for (int m = 0; m < 256; m++) {
        pair_a[m] = (uint8_t)(m < 225 ? m / 15 : 0);
        pair_b[m] = (uint8_t)(m < 225 ? m % 15 : 0);
        pair_ab[m] = (uint64_t)pair_a[m] | ((uint64_t)pair_b[m] << 32);
    }
}

static inline void pair_decode(const tier_tables *t, const uint8_t *pm, size_t npairs,
                               const uint8_t *esc_main, const uint8_t *esc_ext, size_t *em,
                               size_t *ee, uint32_t *out) {
    for (size_t i = 0; i < npairs; i++) {
        uint8_t m = pm[i];
        if (m < 225) {
            out[2 * i] = pair_a[m];
            out[2 * i + 1] = pair_b[m];
        } else {
            *ee += tier_decode(t, esc_main + *em, 2, esc_ext + *ee, out + 2 * i);
            *em += 2;
        }
    }
}

/* Tier decoding with a fast path: blocks of 16 symbols without escapes are widened
 * directly (the compiler vectorizes it); others take the table path. */
static inline size_t tier_decode_fast(const tier_tables *t, int lit, const uint8_t *main,
                                      size_t n, const uint8_t *ext, uint32_t *out) {
    size_t e = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        int esc = 0;
        for (int j = 0; j < 16; j++) esc |= main[i + j] >= lit;
        if (!esc) {
            for (int j = 0; j < 16; j++) out[i + j] = main[i + j];
        } else {
            for (int j = 0; j < 16; j++) {
                uint8_t m = main[i + j];
                out[i + j] = t->base[m] + ((load_be32(ext + e) >> t->shift[m]) & t->mask[m]);
                e += t->nbytes[m];
            }
        }
    }
    e += tier_decode(t, main + i, n - i, ext + e, out + i);
    return e;
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* Best-of-reps time in ns of each part: [0] ids tiered + lookup, [1] ids from u16 byte
 * planes + lookup (same codes: lo = code & 255, hi = code >> 8, as a planes layout
 * would store them), [2] log-probs with the fast-path tier decoder + prefix sums, [3] inputs. */
void decode_parts(int reps, int n, int k,
                  const uint8_t *id_main, const uint8_t *id_ext, const int32_t *id_of_rank,
                  const uint8_t *plane_lo, const uint8_t *plane_hi,
                  const uint8_t *q0_main, const uint8_t *q0_ext,
                  const uint8_t *d1_main, const uint8_t *d1_ext,
                  const uint8_t *d4_main, const uint8_t *d4_ext,
                  const uint8_t *p16_main, const uint8_t *p16_esc_main,
                  const uint8_t *p16_esc_ext,
                  const uint8_t *in_pos, const uint8_t *in_main, const uint8_t *in_ext,
                  int32_t *ids, float *lp, int32_t *inputs, uint32_t *tmp, double *best) {
    tier_tables idt, lpt;
    tier_make(&idt, 192, 48, 16, 0);
    tier_make(&lpt, 240, 13, 2, 0);
    pair_tables();
    const int g1 = k < 4 ? k : 4, g2 = k < 16 ? k : 16;
    size_t nk = (size_t)n * (size_t)k;
    if (k < 16 || (k - 16) % 2) {
        for (int p = 0; p < 4; p++) best[p] = -1.0;
        return; /* the prototype handles K >= 16 with an even count of deep ranks */
    }
    for (int p = 0; p < 4; p++) best[p] = 1e30;
    for (int rep = 0; rep < reps; rep++) {
        double t0 = now_ns();
        tier_decode(&idt, id_main, nk, id_ext, tmp);
        for (size_t i = 0; i < nk; i++) ids[i] = id_of_rank[tmp[i]];
        double t1 = now_ns();
        for (size_t i = 0; i < nk; i++) tmp[i] = (uint32_t)plane_lo[i] | ((uint32_t)plane_hi[i] << 8);
        for (size_t i = 0; i < nk; i++) ids[i] = id_of_rank[tmp[i]];
        double t2 = now_ns();
        uint32_t *q0 = tmp;
        uint32_t *d1 = q0 + n;
        uint32_t *d4 = d1 + (size_t)n * (g1 - 1);
        uint32_t *d16 = d4 + (size_t)n * (g2 - g1);
        tier_decode(&lpt, q0_main, n, q0_ext, q0);
        tier_decode_fast(&lpt, 240, d1_main, (size_t)n * (g1 - 1), d1_ext, d1);
        tier_decode_fast(&lpt, 240, d4_main, (size_t)n * (g2 - g1), d4_ext, d4);
        {
            size_t em = 0, ee = 0;
            pair_decode(&lpt, p16_main, (size_t)n * (size_t)(k - g2) / 2, p16_esc_main,
                        p16_esc_ext, &em, &ee, d16);
        }
        const float fine = 1.0f / 4096.0f, coarse = 1.0f / 64.0f;
        for (int r = 0; r < n; r++) {
            float *o = lp + (size_t)r * k;
            int32_t q = (int32_t)(q0[r] >> 6);
            o[0] = -(float)(int32_t)q0[r] * fine;
            const uint32_t *a = d1 + (size_t)r * (g1 - 1);
            for (int j = 1; j < g1; j++) { q += (int32_t)a[j - 1]; o[j] = -(float)q * coarse; }
            const uint32_t *b = d4 + (size_t)r * (g2 - g1);
            for (int j = g1; j < g2; j++) { q += (int32_t)b[j - g1]; o[j] = -(float)q * coarse; }
            const uint32_t *c = d16 + (size_t)r * (k - g2);
            for (int j = g2; j < k; j++) { q += (int32_t)c[j - g2]; o[j] = -(float)q * coarse; }
        }
        double t3 = now_ns();
        size_t e = 0, esc = 0;
        for (int i = 0; i < n; i++) {
            uint8_t p = in_pos[i];
            if (p < k && i > 0) {
                inputs[i] = ids[(size_t)(i - 1) * k + p];
            } else {
                uint8_t m = in_main[esc++];
                uint32_t rank = idt.base[m] + ((load_be32(in_ext + e) >> idt.shift[m]) & idt.mask[m]);
                e += idt.nbytes[m];
                inputs[i] = id_of_rank[rank];
            }
        }
        double t4 = now_ns();
        double d[4] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3};
        for (int p = 0; p < 4; p++) if (d[p] < best[p]) best[p] = d[p];
    }
}

#ifdef __AVX2__
#include <immintrin.h>

/* Inclusive prefix sum of 8 int32 lanes. */
static inline __m256i prefix8(__m256i x) {
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 4));
    x = _mm256_add_epi32(x, _mm256_slli_si256(x, 8));
    __m256i low_last = _mm256_shuffle_epi32(x, 0xFF);              /* lane-wise element 3 */
    low_last = _mm256_permute2x128_si256(low_last, low_last, 0x08); /* low -> high, zero low */
    return _mm256_add_epi32(x, low_last);
}

/* Log-probs of the recommended layout in one pass per row (k == 64 only): the row's delta
 * bytes sit at fixed offsets of the group streams (3 + 12 tier bytes, 24 pair bytes); when
 * none is an escape they are expanded straight into int32 lanes, prefix-summed in AVX2
 * registers and converted to float; rows with escapes take the scalar path (each stream
 * keeps its own escape cursor).  Returns best-of-reps CPU ns. */
double decode_lp_simd(int reps, int n, int k,
                      const uint8_t *q0_main, const uint8_t *q0_ext,
                      const uint8_t *d1_main, const uint8_t *d1_ext,
                      const uint8_t *d4_main, const uint8_t *d4_ext,
                      const uint8_t *p16_main, const uint8_t *p16_esc_main,
                      const uint8_t *p16_esc_ext,
                      float *lp, uint32_t *tmp) {
    if (k != 64) return -1.0;
    tier_tables lpt;
    tier_make(&lpt, 240, 13, 2, 0);
    pair_tables();
    double best = 1e30;
    int32_t buf[64] __attribute__((aligned(32)));
    const __m256 scale = _mm256_set1_ps(-1.0f / 64.0f);
    const __m256i seven = _mm256_set1_epi32(7);
    const __m128i bias = _mm_set1_epi8((char)0x80);
    const __m128i pair_lim = _mm_set1_epi8((char)(225 - 128 - 1)); /* byte >= 225: escape */
    for (int rep = 0; rep < reps; rep++) {
        double t0 = now_ns();
        uint32_t *q0 = tmp;
        tier_decode(&lpt, q0_main, n, q0_ext, q0);
        size_t e1 = 0, e4 = 0, em = 0, ee = 0;
        for (int r = 0; r < n; r++) {
            const uint8_t *m1 = d1_main + (size_t)r * 3;
            const uint8_t *m4 = d4_main + (size_t)r * 12;
            const uint8_t *p16 = p16_main + (size_t)r * 24;
            int esc = (m1[0] >= 240) | (m1[1] >= 240) | (m1[2] >= 240);
            for (int j = 0; j < 12; j++) esc |= m4[j] >= 240;
            buf[0] = (int32_t)(q0[r] >> 6);
            if (!esc) {
                buf[1] = m1[0]; buf[2] = m1[1]; buf[3] = m1[2];
                for (int j = 0; j < 12; j++) buf[4 + j] = m4[j];
            } else {
                e1 += tier_decode(&lpt, m1, 3, d1_ext + e1, (uint32_t *)buf + 1);
                e4 += tier_decode(&lpt, m4, 12, d4_ext + e4, (uint32_t *)buf + 4);
            }
            /* pair escape test: unsigned byte >= 225 via a signed compare after the bias */
            __m128i v0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p16), bias);
            __m128i v1 = _mm_xor_si128(_mm_loadl_epi64((const __m128i *)(p16 + 16)), bias);
            int pesc = _mm_movemask_epi8(_mm_cmpgt_epi8(v0, pair_lim)) |
                       (_mm_movemask_epi8(_mm_cmpgt_epi8(v1, pair_lim)) & 0xFF);
            if (!pesc) {
                for (int j = 0; j < 24; j++) memcpy(buf + 16 + 2 * j, &pair_ab[p16[j]], 8);
            } else {
                pair_decode(&lpt, p16, 24, p16_esc_main, p16_esc_ext, &em, &ee,
                            (uint32_t *)buf + 16);
            }
            float *o = lp + (size_t)r * 64;
            __m256i carry = _mm256_setzero_si256();
            for (int j = 0; j < 64; j += 8) {
                __m256i x = prefix8(_mm256_load_si256((const __m256i *)(buf + j)));
                x = _mm256_add_epi32(x, carry);
                carry = _mm256_permutevar8x32_epi32(x, seven);
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale));
            }
            o[0] = -(float)(int32_t)q0[r] * (1.0f / 4096.0f);
        }
        double d = now_ns() - t0;
        if (d < best) best = d;
    }
    return best;
}
#endif
