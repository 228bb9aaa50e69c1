/* One-row products for batch-1 decoding (dbrx.native builds this with the machine's C compiler): int4 codes, and at
   the end fp32 weights.

   Weights are dbrx.quant's int4 codes as stored: [E, O, I/2] bytes, the even input column in the low nibble, in
   groups of `group` inputs. Scales come as `sc` [E, O, G, 2] floats (s, c), one pair per row and group, with
   w = q * s + c (c = zero - 8 * s in dbrx.quant's convention). Sums are fp32, and so are activations except in the
   AVX512-BF16 loop, which rounds them to bf16 as torch's packed int4 kernel does.

   Each row is a dot product of its codes with the input split into even and odd columns, one group at a time:
   y = sum_g s_g * (sum_j lo_j * x_even_j + hi_j * x_odd_j) + sum_g c_g * (sum of the group's inputs).
   The codes are converted in registers: to bf16 for vdpbf16ps (AVX512-BF16), or to fp32 for FMAs (AVX-512, AVX2),
   whichever the compiler targets, a plain loop otherwise. Rows are shared among OpenMP threads (torch's own
   runtime, already loaded by the process), as many as the caller passes (torch's intra-op count).

   Shape legend: K rows of input (one per chosen expert), E matrices, O outputs, I inputs, G groups per row,
   D d_model, F expert width. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define STEP 32 /* bytes of codes each vector step takes */
#elif defined(__AVX512F__)
#define STEP 16
#elif defined(__AVX2__) && defined(__FMA__)
#define STEP 8
#else
#define STEP 0
#endif

/* fp32 vectors of the widest width the compiler targets (FW lanes), for the int4 fp32 loop and the fp32 rows */
#if defined(__AVX512F__)
#define FW 16
typedef __m512 vf;
static inline vf vzero(void) { return _mm512_setzero_ps(); }
static inline vf vload(const float *x) { return _mm512_loadu_ps(x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vset(float s) { return _mm512_set1_ps(s); }
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define FW 8
typedef __m256 vf;
static inline vf vzero(void) { return _mm256_setzero_ps(); }
static inline vf vload(const float *x) { return _mm256_loadu_ps(x); }
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vset(float s) { return _mm256_set1_ps(s); }
static inline float vsum(vf v) {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
}
#endif

/* One input, split for the row loops: even and odd columns (fp32, and for the bf16 loop rounded to bf16), each
   group's sum, and each group's sum over the columns the bf16 loop takes, as it takes them. */
struct input {
    float *xe, *xo, *xs, *xv;
    uint16_t *eb, *ob;
};

static inline uint16_t bf16_round(float f) { /* round to nearest even (inputs are finite) */
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7fff + ((v.u >> 16) & 1)) >> 16);
}

static inline float bf16_value(uint16_t b) {
    union { uint32_t u; float f; } v = {(uint32_t)b << 16};
    return v.f;
}

/* room for K inputs of I columns in groups of `group` (NULL where memory ran out) */
static void *input_buffers(int64_t K, int64_t I, int64_t group) {
    return malloc(K * (sizeof(float) * (I + 2 * (I / group)) + sizeof(uint16_t) * I));
}

/* the k-th of K inputs, x [I], split into its place in buf (from input_buffers) */
static struct input split(const float *x, int64_t k, int64_t K, int64_t I, int64_t group, void *buf) {
    const int64_t H = I / 2, G = I / group, h = group / 2, vec_end = STEP ? h - h % STEP : 0;
    float *f = (float *)buf + k * (I + 2 * G);
    uint16_t *b = (uint16_t *)((float *)buf + K * (I + 2 * G)) + k * I;
    struct input in = {f, f + H, f + 2 * H, f + 2 * H + G, b, b + H};
    for (int64_t i = 0; i < H; i++) {
        in.xe[i] = x[2 * i];
        in.xo[i] = x[2 * i + 1];
        in.eb[i] = bf16_round(in.xe[i]);
        in.ob[i] = bf16_round(in.xo[i]);
    }
    for (int64_t g = 0; g < G; g++) {
        float s = 0.f, v = 0.f;
        for (int64_t i = 0; i < group; i++) s += x[g * group + i];
        for (int64_t j = g * h; j < g * h + vec_end; j++)
            v += bf16_value(in.eb[j]) + bf16_value(in.ob[j]);
        in.xs[g] = s;
        in.xv[g] = v;
    }
    return in;
}

/* sum over bytes [j0, j1) of lo * xe + hi * xo, one element at a time */
static inline float tail_dot(const uint8_t *q, const struct input *in, int64_t j0, int64_t j1) {
    float acc = 0.f;
    for (int64_t j = j0; j < j1; j++) acc += (float)(q[j] & 15) * in->xe[j] + (float)(q[j] >> 4) * in->xo[j];
    return acc;
}

/* n consecutive rows (codes q + i * H, scales sc + i * 2G) against one input, element by element */
static void rows_plain(const uint8_t *q, const float *sc, int64_t n, int64_t H, int64_t G, int64_t half_group,
                       const struct input *in, float *y) {
    for (int64_t i = 0; i < n; i++) {
        float t = 0.f;
        for (int64_t g = 0; g < G; g++)
            t += sc[i * 2 * G + 2 * g] * tail_dot(q + i * H, in, g * half_group, (g + 1) * half_group) +
                 sc[i * 2 * G + 2 * g + 1] * in->xs[g];
        y[i] = t;
    }
}

#if STEP
/* The four rows after these, codes and scales, into the cache while these are summed: with a thread's one stream
   through a layer's small expert matrices, the hardware prefetcher alone left the kernel at 10-13 GB/s on an AMD
   EPYC where this makes 17.7 (docs/inference.md). */
static inline void prefetch_next(const uint8_t *q, const float *sc, int64_t H, int64_t G) {
    for (int64_t l = 0; l < 4 * H; l += 64) _mm_prefetch((const char *)(q + 4 * H + l), _MM_HINT_T0);
    for (int64_t l = 0; l < 4 * 2 * G * (int64_t)sizeof(float); l += 64)
        _mm_prefetch((const char *)(sc + 4 * 2 * G) + l, _MM_HINT_T0);
}
#endif

/* Four consecutive rows at once: each group's products are summed in vector lanes and scaled there, the lanes
   added once per row; the four rows' sums are independent chains (one row's chain would wait on each add), and
   they share the input's loads. A group's bytes past the last whole vector go element by element. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
/* Codes as bf16 of 128 + q (0x4300 | q: exact), against the input rounded to bf16 (as torch's packed int4 kernel
   rounds it), products and sums in fp32 by vdpbf16ps, which takes twice the codes per instruction the fp32 loop
   does; the 128 * sum(x) each group's sum then holds is taken off with the group's zero term. */
static void rows4(const uint8_t *q, const float *sc, int64_t H, int64_t G, int64_t half_group,
                  const struct input *in, float *y) {
    const int64_t vec_end = half_group - half_group % STEP;
    const __m512i m15 = _mm512_set1_epi16(15), bias = _mm512_set1_epi16(0x4300);
    prefetch_next(q, sc, H, G);
    __m512 acc[4];
    float t[4] = {0};
    for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int64_t j0 = g * half_group;
        __m512 a[4];
        for (int i = 0; i < 4; i++) a[i] = _mm512_setzero_ps();
        for (int64_t j = j0; j < j0 + vec_end; j += STEP) {
            const __m512bh e = (__m512bh)_mm512_loadu_si512(in->eb + j), o = (__m512bh)_mm512_loadu_si512(in->ob + j);
            for (int i = 0; i < 4; i++) {
                const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + i * H + j)));
                const __m512bh lo = (__m512bh)_mm512_or_si512(_mm512_and_si512(w, m15), bias);
                const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 4), bias);
                a[i] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a[i], lo, e), hi, o);
            }
        }
        for (int i = 0; i < 4; i++) {
            const float *s = sc + i * 2 * G + 2 * g;
            acc[i] = _mm512_fmadd_ps(a[i], _mm512_set1_ps(s[0]), acc[i]);
            t[i] += s[1] * in->xs[g] - 128.f * s[0] * in->xv[g];
            if (vec_end < half_group) t[i] += s[0] * tail_dot(q + i * H, in, j0 + vec_end, j0 + half_group);
        }
    }
    for (int i = 0; i < 4; i++) y[i] = t[i] + _mm512_reduce_add_ps(acc[i]);
}
#elif defined(FW)
#if defined(__AVX512F__)
typedef __m512i vi;
static inline vi load_codes(const uint8_t *q) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q)); }
static inline vf low(vi w) { return _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(15))); }
static inline vf high(vi w) { return _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4)); }
#else
typedef __m256i vi;
static inline vi load_codes(const uint8_t *q) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q)); }
static inline vf low(vi w) { return _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(15))); }
static inline vf high(vi w) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)); }
#endif
static void rows4(const uint8_t *q, const float *sc, int64_t H, int64_t G, int64_t half_group,
                  const struct input *in, float *y) {
    const int64_t vec_end = half_group - half_group % STEP;
    prefetch_next(q, sc, H, G);
    vf acc[4];
    float t[4] = {0};
    for (int i = 0; i < 4; i++) acc[i] = vzero();
    for (int64_t g = 0; g < G; g++) {
        const int64_t j0 = g * half_group;
        vf a[4], b[4];
        for (int i = 0; i < 4; i++) a[i] = b[i] = vzero();
        for (int64_t j = j0; j < j0 + vec_end; j += STEP) {
            const vf e = vload(in->xe + j), o = vload(in->xo + j);
            for (int i = 0; i < 4; i++) {
                const vi w = load_codes(q + i * H + j);
                a[i] = vfma(low(w), e, a[i]);
                b[i] = vfma(high(w), o, b[i]);
            }
        }
        for (int i = 0; i < 4; i++) {
            const float *s = sc + i * 2 * G + 2 * g;
            acc[i] = vfma(vadd(a[i], b[i]), vset(s[0]), acc[i]);
            t[i] += s[1] * in->xs[g];
            if (vec_end < half_group) t[i] += s[0] * tail_dot(q + i * H, in, j0 + vec_end, j0 + half_group);
        }
    }
    for (int i = 0; i < 4; i++) y[i] = t[i] + vsum(acc[i]);
}
#else
static void rows4(const uint8_t *q, const float *sc, int64_t H, int64_t G, int64_t half_group,
                  const struct input *in, float *y) {
    rows_plain(q, sc, 4, H, G, half_group, in, y);
}
#endif

enum { BLOCK = 64 }; /* rows a thread takes at a time */

/* rows [r0, r1) of one matrix (codes q [O, H], scales sc [O, G, 2]) against one input, four at a time */
static inline void matrix_rows(const uint8_t *q, const float *sc, int64_t r0, int64_t r1, int64_t H, int64_t G,
                               int64_t half_group, const struct input *in, float *y) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) rows4(q + r * H, sc + r * 2 * G, H, G, half_group, in, y + r);
    rows_plain(q + r * H, sc + r * 2 * G, r1 - r, H, G, half_group, in, y + r);
}

/* which loop this build runs: 3 AVX512-BF16 (bf16 activations), 2 AVX-512, 1 AVX2, 0 plain C */
int dbrx_int4_isa(void) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    return 3;
#elif defined(__AVX512F__)
    return 2;
#elif defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}

/* y [K, O] = x_k [K, I] . W_{idx[k]} (W = matrix 0 where idx is NULL). Returns 0, or -1 where memory ran out. */
int dbrx_int4_rows(int64_t K, int64_t O, int64_t I, int64_t group, const float *x, const uint8_t *q,
                   const float *sc, const int64_t *idx, float *y, int threads) {
    const int64_t G = I / group, H = I / 2, blocks = (O + BLOCK - 1) / BLOCK;
    void *buf = input_buffers(K, I, group);
    struct input *in = malloc(sizeof(struct input) * K);
    if (!buf || !in) {
        free(buf);
        free(in);
        return -1;
    }
    for (int64_t k = 0; k < K; k++) in[k] = split(x + k * I, k, K, I, group, buf);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t kb = 0; kb < K * blocks; kb++) {
        const int64_t k = kb / blocks, o0 = kb % blocks * BLOCK, o1 = o0 + BLOCK < O ? o0 + BLOCK : O;
        const int64_t m = (idx ? idx[k] : 0) * O;
        matrix_rows(q + m * H, sc + m * G * 2, o0, o1, H, G, group / 2, &in[k], y + k * O);
    }
    free(in);
    free(buf);
    return 0;
}

/* ---- fp32 weights: y [K, O] = x_k [K, I] . W [O, I], W row-major (a float linear layer, the output head) ---- */

static inline float f32_dot(const float *w, const float *x, int64_t j0, int64_t I) {
    float t = 0.f;
    for (int64_t j = j0; j < I; j++) t += w[j] * x[j];
    return t;
}

#if defined(FW)
/* four rows at once, two sums each (eight independent FMA chains), the next four rows prefetched */
static void f32_rows4(const float *w, int64_t I, const float *x, float *y) {
    for (int64_t l = 0; l < 4 * I * (int64_t)sizeof(float); l += 64)
        _mm_prefetch((const char *)(w + 4 * I) + l, _MM_HINT_T0);
    vf a[4], b[4];
    for (int r = 0; r < 4; r++) a[r] = b[r] = vzero();
    int64_t i = 0;
    for (; i + 2 * FW <= I; i += 2 * FW) {
        const vf x0 = vload(x + i), x1 = vload(x + i + FW);
        for (int r = 0; r < 4; r++) {
            a[r] = vfma(vload(w + r * I + i), x0, a[r]);
            b[r] = vfma(vload(w + r * I + i + FW), x1, b[r]);
        }
    }
    for (int r = 0; r < 4; r++) y[r] = vsum(vadd(a[r], b[r])) + f32_dot(w + r * I, x, i, I);
}
#else
static void f32_rows4(const float *w, int64_t I, const float *x, float *y) {
    for (int r = 0; r < 4; r++) y[r] = f32_dot(w + r * I, x, 0, I);
}
#endif

int dbrx_f32_rows(int64_t K, int64_t O, int64_t I, const float *x, const float *w, float *y, int threads) {
    const int64_t blocks = (O + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t kb = 0; kb < K * blocks; kb++) {
        const int64_t k = kb / blocks, o0 = kb % blocks * BLOCK, o1 = o0 + BLOCK < O ? o0 + BLOCK : O;
        int64_t o = o0;
        for (; o + 4 <= o1; o += 4) f32_rows4(w + o * I, I, x + k * I, y + k * O + o);
        for (; o < o1; o++) y[k * O + o] = f32_dot(w + o * I, x + k * I, 0, I);
    }
    return 0;
}

static inline float activation(float g, int act) {
    if (act == 0) return g / (1.f + expf(-g));          /* silu */
    return 0.5f * g * (1.f + erff(g * 0.70710678118654752f)); /* gelu (erf) */
}

/* One token through its K experts: y [D] = sum_k weight_k * w2_k(act(w1_k x) * v1_k x). w1, v1: [E, F, D/2] codes
   in groups of group1 with scales [E, F, D/group1, 2]; w2 transposed per expert: [E, D, F/2] in groups of group2.
   act: 0 silu, 1 gelu. Returns 0, or -1 where memory ran out (y untouched). */
int dbrx_int4_experts(int64_t K, int64_t D, int64_t F, int64_t group1, int64_t group2, int act, const float *x,
                      const float *weight, const int64_t *idx, const uint8_t *q1, const float *sc1,
                      const uint8_t *qv, const float *scv, const uint8_t *q2, const float *sc2, float *y, int threads) {
    const int64_t G1 = D / group1, G2 = F / group2, HD = D / 2, HF = F / 2;
    const int64_t blocks_f = (F + BLOCK - 1) / BLOCK, blocks_d = (D + BLOCK - 1) / BLOCK;
    void *xbuf = input_buffers(1, D, group1), *hbuf = input_buffers(K, F, group2);
    float *gu = malloc(sizeof(float) * (2 * K * F + K * D)); /* [2, K, F]: w1 x, then v1 x; then [K, D] */
    struct input *h = malloc(sizeof(struct input) * K);
    if (!xbuf || !hbuf || !gu || !h) {
        free(xbuf);
        free(hbuf);
        free(gu);
        free(h);
        return -1;
    }
    float *yk = gu + 2 * K * F;
    const struct input in = split(x, 0, 1, D, group1, xbuf);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < 2 * K * blocks_f; u++) { /* (w1 or v1, expert, block of rows) */
            const int64_t v = u / (K * blocks_f), k = u / blocks_f % K, f0 = u % blocks_f * BLOCK;
            const int64_t f1 = f0 + BLOCK < F ? f0 + BLOCK : F, m = idx[k] * F;
            matrix_rows((v ? qv : q1) + m * HD, (v ? scv : sc1) + m * G1 * 2, f0, f1, HD, G1, group1 / 2, &in,
                        gu + (v * K + k) * F);
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < K; k++) { /* h = act(w1 x) * v1 x, in place of w1 x, then split as an input */
            for (int64_t i = 0; i < F; i++) gu[k * F + i] = activation(gu[k * F + i], act) * gu[(K + k) * F + i];
            h[k] = split(gu + k * F, k, K, F, group2, hbuf);
        }
#pragma omp for schedule(static)
        for (int64_t u = 0; u < K * blocks_d; u++) {
            const int64_t k = u / blocks_d, d0 = u % blocks_d * BLOCK, d1 = d0 + BLOCK < D ? d0 + BLOCK : D;
            const int64_t m = idx[k] * D;
            matrix_rows(q2 + m * HF, sc2 + m * G2 * 2, d0, d1, HF, G2, group2 / 2, &h[k], yk + k * D);
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++) { /* in the experts' order, as the eager loop adds them */
            float s = 0.f;
            for (int64_t k = 0; k < K; k++) s += weight[k] * yk[k * D + d];
            y[d] = s;
        }
    }
    free(xbuf);
    free(hbuf);
    free(gu);
    free(h);
    return 0;
}
