/* Fused chunked attention of LSH attention on CPU (float32): the fast path of `_LSHCore`.
 *
 * Built and loaded by lsh_cpu.py (plain C, no torch headers; the hashing matmul's BLAS is the sgemm_
 * that torch itself links, passed in as a function pointer; the chunk matmuls are `matmul` below). Layouts, all row-major and contiguous:
 *   table     [R, 2d]      (qk | v) row of each (batch, position, head), R = B * L * H
 *   key_scale [R]          shared-QK key scale s (key = s * qk)
 *   rows      [BH, c + N]  table row of each sorted item, the last chunk prepended (cyclic look-back):
 *                          chunk g's window is entries g*c .. g*c + 2c, its queries g*c + c .. g*c + 2c
 *   probs     [BH, N, 2c]  exp(logit - row max), unnormalised (NULL: not kept / recomputed)
 *   row_max, row_sum, scale [BH, N]; out [BH, N, d] (unnormalised E @ V)
 *   grad_out  [R, d], grad_dot [R] (dY . Y per row); grad_table [R, 2d] (accumulated into)
 *   combined  [R, d], lse_max, lse_sum [R]: the rounds combined per position on the fly (instead of out)
 * Logits are q . k with k = s * qk; a key whose row is the query's own gets self_value, with causal a
 * later key (larger row: rows grow with the position within a head) gets mask_value.
 *
 * Each thread walks its chunks in stretches: a stretch gathers its span's (qk | v) rows once, with
 * the keys (transposed, and as rows in backward) and in backward the values transposed, into
 * thread-local buffers that stay in cache (every window is then a slice of them, no look-back
 * copies), and each chunk's logits, softmax and matmuls run while its [c, 2c] tile is in L1/L2.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

/* glibc's vector expf (libmvec), which its headers declare only under -ffast-math; that flag is
 * avoided because it would set flush-to-zero for the whole process (crtfastmath). */
float expf(float) __attribute__((simd("notinbranch")));

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef int (*local_threads_fn)(const int *);
typedef void (*thread_free_fn)(void);

static sgemm_fn blas_sgemm;
static local_threads_fn blas_local_threads; /* MKL's mkl_set_num_threads_local_ (optional) */
static thread_free_fn blas_thread_free;     /* MKL's per-thread buffer release (optional) */

int lsh_cpu_init(void *sgemm, void *local_threads, void *thread_free) {
    blas_sgemm = (sgemm_fn)sgemm;
    blas_local_threads = (local_threads_fn)local_threads;
    blas_thread_free = (thread_free_fn)thread_free;
    return blas_sgemm != NULL ? 0 : 1;
}

/* Row-major C[m, n] = op(A)[m, k] op(B)[k, n] + beta C, through column-major sgemm (C^T = op(B)^T op(A)^T). */
static void gemm(char ta, char tb, int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                 float beta, float *c, int ldc) {
    const float one = 1.0f;
    blas_sgemm(&tb, &ta, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4))); /* unaligned loads and stores */
typedef int32_t v8i __attribute__((vector_size(32)));

/* The vectors of the softmax and the chunk matmuls: 16 lanes (zmm) where the compiler targets AVX-512F
 * (LSH_CPU_ISA "avx512"), else 8 (ymm under AVX2 / FMA, or what the target has: "avx2", "generic").
 * The build's flags choose (-march=native; -mno-avx512f forces the 8-lane path on an AVX-512 CPU). */
#if defined(__AVX512F__)
#define VLEN 16
#define LSH_CPU_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define VLEN 8
#define LSH_CPU_ISA "avx2"
#else
#define VLEN 8
#define LSH_CPU_ISA "generic"
#endif
typedef float vf __attribute__((vector_size(VLEN * 4)));
typedef float vf_u __attribute__((vector_size(VLEN * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VLEN * 4)));

/* The instruction set the kernel was compiled for: "avx512", "avx2" or "generic". */
const char *lsh_cpu_isa(void) { return LSH_CPU_ISA; }

/* Where the forward's and backward's time goes, in a build with -DLSH_CPU_PROFILE (scripts/lsh_cpu_stages.py
 * --sections): wall nanoseconds per section summed over the threads (a clock_gettime per mark, about
 * 0.5% of a chunk's time). Without it the marks compile to nothing. */
#define PROFILE_SECTION_NAMES                                                                                    \
    "forward gather,forward logits,forward softmax,forward P@V,forward combine,forward finish,"                  \
    "backward gather,backward logits,backward softmax,backward dY rows,backward dV,backward dP,backward dS,"     \
    "backward dQ,backward dK,backward add gradients"
enum {
    F_GATHER, F_LOGITS, F_SOFTMAX, F_PV, F_COMBINE, F_FINISH,
    B_GATHER, B_LOGITS, B_SOFTMAX, B_DY_ROWS, B_DV, B_DP, B_DS, B_DQ, B_DK, B_ADD,
    N_SECTIONS
};
#if defined(LSH_CPU_PROFILE)
static uint64_t section_ns[N_SECTIONS];
static inline uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}
#define PROFILE_START() uint64_t profile_mark = now_ns()
#define PROFILE_SKIP() (profile_mark = now_ns()) /* the time since the last mark was counted elsewhere */
#define PROFILE_MARK(section)                                                                                    \
    do {                                                                                                         \
        const uint64_t profile_now = now_ns();                                                                   \
        __atomic_fetch_add(&section_ns[section], profile_now - profile_mark, __ATOMIC_RELAXED);                 \
        profile_mark = profile_now;                                                                              \
    } while (0)
/* Copies the sections' nanoseconds since the last call into ns [N_SECTIONS] and zeroes them; returns N_SECTIONS. */
int lsh_cpu_profile(uint64_t *ns) {
    for (int i = 0; i < N_SECTIONS; i++) ns[i] = __atomic_exchange_n(&section_ns[i], 0, __ATOMIC_RELAXED);
    return N_SECTIONS;
}
/* The sections' names, comma-separated, in the order of lsh_cpu_profile's array. */
const char *lsh_cpu_profile_sections(void) { return PROFILE_SECTION_NAMES; }
#else
#define PROFILE_START() (void)0
#define PROFILE_SKIP() (void)0
#define PROFILE_MARK(section) (void)0
#endif

#if defined(__AVX512F__)
#ifndef MATMUL_MR
#define MATMUL_MR 8 /* rows per register block */
#endif
#ifndef MATMUL_NV
#define MATMUL_NV 2 /* zmm vectors (16 columns each) per row of a block */
#endif
/* One register block of the AVX-512 matmul: MR rows x 16 NV columns accumulated in MR x NV zmm
 * registers over the whole of k (of the 32 registers, the rest hold B's vectors and a broadcast).
 * mask[v]: the valid columns of vector v (a column tail loads zeros and stores nothing past n). */
static inline __attribute__((always_inline)) void block_avx512(const int MR, int k, const float *ap, int64_t a_row,
                                                               int64_t a_col, const float *bp, int64_t ldb,
                                                               const __mmask16 *mask, int accumulate, float *cp,
                                                               int64_t ldc) {
    __m512 acc[MATMUL_MR][MATMUL_NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < MATMUL_NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int p = 0; p < k; p++, ap += a_col, bp += ldb) {
        __m512 bv[MATMUL_NV];
        for (int v = 0; v < MATMUL_NV; v++) bv[v] = _mm512_maskz_loadu_ps(mask[v], bp + 16 * v);
        for (int r = 0; r < MR; r++) {
            const __m512 x = _mm512_set1_ps(ap[r * a_row]);
            for (int v = 0; v < MATMUL_NV; v++) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < MATMUL_NV; v++) {
            float *at = cp + r * ldc + 16 * v;
            if (accumulate) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(mask[v], at));
            _mm512_mask_storeu_ps(at, mask[v], acc[r][v]);
        }
}
#endif

/* C[m, n] = A B, or C += A B with accumulate, in float32: A(i, p) = a[i * a_row + p * a_col]
 * (a_col 1: a row-major A; a_row 1: the transpose of a row-major matrix), B(p, j) = b[p * ldb + j],
 * C row-major with leading dimension ldc. The chunk matmuls are small ([2c, 2c] at most) and their
 * operands already sit in L1/L2, where sgemm_ spends a tenth of its time packing them (measured on
 * one core at [64, 128] x [128, 64]: MKL 33 GFLOP/s, this 38): register blocks accumulate over the
 * whole of k instead, without packing. AVX-512: blocks of 8 rows x 32 columns in zmm registers, the
 * column tail masked, the row tail in blocks of 4, 2, 1. Otherwise blocks of 4 rows x 16 columns in
 * 8-lane vectors (AVX2 FMAs under -march=native), the edges one element at a time. Deterministic for
 * a given shape, so a backward that recomputes the logits gets the forward's values exactly. */
static void matmul(int m, int n, int k, const float *a, int64_t a_row, int64_t a_col, const float *b, int64_t ldb,
                   int accumulate, float *c, int64_t ldc) {
#if defined(__AVX512F__)
    for (int j = 0; j < n; j += 16 * MATMUL_NV) {
        __mmask16 mask[MATMUL_NV];
        for (int v = 0; v < MATMUL_NV; v++) {
            const int left = n - j - 16 * v;
            mask[v] = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        }
        const float *bp = b + j;
        int i = 0;
        for (; i + MATMUL_MR <= m; i += MATMUL_MR)
            block_avx512(MATMUL_MR, k, a + i * a_row, a_row, a_col, bp, ldb, mask, accumulate, c + i * ldc + j, ldc);
        for (const int tail = 4; i + tail <= m; i += tail)
            block_avx512(tail, k, a + i * a_row, a_row, a_col, bp, ldb, mask, accumulate, c + i * ldc + j, ldc);
        for (; i < m; i++)
            block_avx512(1, k, a + i * a_row, a_row, a_col, bp, ldb, mask, accumulate, c + i * ldc + j, ldc);
    }
#else
    const int m4 = m - m % 4, n16 = n - n % 16;
    for (int j = 0; j < n16; j += 16)
        for (int i = 0; i < m4; i += 4) {
            v8f c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
            const float *ap = a + i * a_row, *bp = b + j;
            for (int p = 0; p < k; p++, ap += a_col, bp += ldb) {
                const v8f b0 = *(const v8f_u *)bp, b1 = *(const v8f_u *)(bp + 8);
                v8f x = (v8f){0} + ap[0];
                c00 += x * b0, c01 += x * b1;
                x = (v8f){0} + ap[a_row];
                c10 += x * b0, c11 += x * b1;
                x = (v8f){0} + ap[2 * a_row];
                c20 += x * b0, c21 += x * b1;
                x = (v8f){0} + ap[3 * a_row];
                c30 += x * b0, c31 += x * b1;
            }
            v8f_u *c0 = (v8f_u *)(c + i * ldc + j), *c1 = (v8f_u *)(c + (i + 1) * ldc + j);
            v8f_u *c2 = (v8f_u *)(c + (i + 2) * ldc + j), *c3 = (v8f_u *)(c + (i + 3) * ldc + j);
            if (accumulate) {
                c00 += c0[0], c01 += c0[1], c10 += c1[0], c11 += c1[1];
                c20 += c2[0], c21 += c2[1], c30 += c3[0], c31 += c3[1];
            }
            c0[0] = c00, c0[1] = c01, c1[0] = c10, c1[1] = c11;
            c2[0] = c20, c2[1] = c21, c3[0] = c30, c3[1] = c31;
        }
    for (int i = 0; i < m; i++) /* the edges: columns past n16 of the blocked rows, every column of the rest */
        for (int j = i < m4 ? n16 : 0; j < n; j++) {
            float total = 0.0f;
            for (int p = 0; p < k; p++) total += a[i * a_row + p * a_col] * b[p * ldb + j];
            c[i * ldc + j] = accumulate ? c[i * ldc + j] + total : total;
        }
#endif
}

typedef struct {
    const float *table, *key_scale;
    const int64_t *rows;
    int64_t bh, n_items;
    int c, d, causal, stretch, n_threads;
    float mask_value, self_value;
    float *probs, *row_max, *row_sum, *out;                   /* forward */
    float *combined, *lse_max, *lse_sum, *item_scale;          /* forward, rounds combined on the fly */
    int64_t seq_len;
    const float *grad_out, *grad_dot, *scale;                  /* backward */
    float *grad_table;
} Problem;

typedef struct {
    const Problem *p;
    int64_t first, last; /* flattened chunk range [first, last) over bh * n_chunks */
    float *grad_table;   /* where this thread accumulates (backward) */
    int status;
} Task;

/* Rows are read and written at random (sorted order): prefetch them this many rows ahead, or the loops
 * wait on memory (measured: the gradient adds were 44% of the backward's own time without). */
#define PREFETCH_AHEAD 8

static inline void prefetch_bytes(const void *address, int64_t bytes, int for_write) {
    for (int64_t offset = 0; offset < bytes; offset += 64) {
        if (for_write) __builtin_prefetch((const char *)address + offset, 1, 3);
        else __builtin_prefetch((const char *)address + offset, 0, 3);
    }
}

#if defined(__AVX512F__)
/* Writes the [16, 16] block at src (row i at src + i lds, times scale[i] when scale is not NULL)
 * transposed to dst (column i at dst + i, row j at dst + j ldd): 16 loads, 64 in-register shuffles
 * and 16 stores of whole cache lines, instead of 256 scalar stores to 16 lines each. */
static inline void transpose_block16(const float *src, int64_t lds, const float *scale, float *dst, int64_t ldd) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) {
        r[i] = _mm512_loadu_ps(src + i * lds);
        if (scale) r[i] = _mm512_mul_ps(r[i], _mm512_set1_ps(scale[i]));
    }
    for (int i = 0; i < 8; i++) { /* pairs of rows interleaved */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* quads of rows: each 128-bit lane holds one column of 4 rows */
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 2; i++) /* then the 128-bit lanes across quads */
        for (int m = 0; m < 4; m++) {
            t[8 * i + m] = _mm512_shuffle_f32x4(r[8 * i + m], r[8 * i + 4 + m], 0x88);
            t[8 * i + 4 + m] = _mm512_shuffle_f32x4(r[8 * i + m], r[8 * i + 4 + m], 0xdd);
        }
    for (int m = 0; m < 8; m++) {
        r[m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88);
        r[8 + m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0xdd);
    }
    for (int j = 0; j < 16; j++) _mm512_storeu_ps(dst + j * ldd, r[j]);
}
#endif

/* The span's table rows [n, 2d] (qk | v), gathered from the table, with (where not NULL) its keys
 * [n, d], keys transposed [d, ld_t] and values transposed [d, ld_t] (the matmuls' B operands); its
 * rows relative to the first, and its key scales [n]. rows_end: the end of the head's rows (the rows
 * past the span, up to it, are prefetched for the next span). */
static void gather_span(const Problem *p, const int64_t *span_rows, const int64_t *rows_end, int n, float *qkv,
                        float *keys, float *keys_t, float *values_t, int64_t ld_t, int32_t *span, float *scales) {
    const int d = p->d;
#if defined(__AVX512F__)
    const int blocked = d % 16 == 0; /* the transposes in 16 x 16 register blocks, after the rows are in */
#else
    const int blocked = 0;
#endif
    for (int r = 0; r < n; r++) {
        if (r + PREFETCH_AHEAD < rows_end - span_rows) {
            prefetch_bytes(p->table + span_rows[r + PREFETCH_AHEAD] * 2 * d, 2 * d * sizeof(float), 0);
            __builtin_prefetch(p->key_scale + span_rows[r + PREFETCH_AHEAD], 0, 3);
        }
        span[r] = (int32_t)(span_rows[r] - span_rows[0]);
        const float *src = p->table + span_rows[r] * 2 * d;
        const float s = scales[r] = p->key_scale[span_rows[r]];
        float *dst = qkv + (int64_t)r * 2 * d;
        for (int j = 0; j < 2 * d; j++) dst[j] = src[j];
        if (keys)
            for (int j = 0; j < d; j++) keys[(int64_t)r * d + j] = s * src[j];
        if (blocked) continue;
        if (keys_t)
            for (int j = 0; j < d; j++) keys_t[j * ld_t + r] = s * src[j];
        if (values_t)
            for (int j = 0; j < d; j++) values_t[j * ld_t + r] = src[d + j];
    }
#if defined(__AVX512F__)
    if (!blocked) return;
    int r = 0;
    for (; r + 16 <= n; r += 16)
        for (int j = 0; j < d; j += 16) {
            const float *row = qkv + (int64_t)r * 2 * d + j;
            if (keys_t) transpose_block16(row, 2 * d, scales + r, keys_t + j * ld_t + r, ld_t);
            if (values_t) transpose_block16(row + d, 2 * d, NULL, values_t + j * ld_t + r, ld_t);
        }
    for (; r < n; r++) { /* the rows past the last whole block */
        const float *row = qkv + (int64_t)r * 2 * d;
        if (keys_t)
            for (int j = 0; j < d; j++) keys_t[j * ld_t + r] = scales[r] * row[j];
        if (values_t)
            for (int j = 0; j < d; j++) values_t[j * ld_t + r] = row[d + j];
    }
#endif
}

/* Logit x of key k for query q (span-relative rows) with the constants in: causal (a later key), then self.
 * Branch-free so that the loops over a row vectorise. */
static inline float masked(float x, int32_t q, int32_t k, int causal, float later_value, float self_value) {
    x = (causal & (k > q)) ? later_value : x;
    return k == q ? self_value : x;
}

/* max of x[0..n) with LANES independent maxima (a plain reduction does not vectorise without
 * -ffinite-math-only). */
#define LANES VLEN
static inline float row_max_of(const float *x, int n) {
    float lanes[LANES];
    for (int u = 0; u < LANES; u++) lanes[u] = -INFINITY;
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int u = 0; u < LANES; u++) lanes[u] = x[j + u] > lanes[u] ? x[j + u] : lanes[u];
    float top = -INFINITY;
    for (; j < n; j++) top = x[j] > top ? x[j] : top;
    for (int u = 0; u < LANES; u++) top = lanes[u] > top ? lanes[u] : top;
    return top;
}

/* exp of VLEN arguments x <= 0 (shifted logits), inlined where the loop runs instead of a call per 8
 * (measured: the libmvec calls were half of the softmax's time). Cephes' expf: x = n ln2 + r with
 * |r| <= ln2 / 2 (ln2 in two parts), a degree-7 polynomial for e^r, 2^n put in the exponent bits;
 * within 4 ulp of expf (measured over [-110, 0] built with this kernel's flags). Below -87.3 (where 2^n would leave the normal range) it gives 0, as expf
 * does for the masked logits (expf's denormals for -103 < x < -87.3 differ from 0 by < 1.2e-38). */
static inline vf exp_nonpositive(vf x) {
    const vi underflow = x < -87.33654f;
    x = (vf)((vi)x & ~underflow); /* those lanes compute exp(0) and are zeroed below */
    const vi whole = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi); /* nearest, x <= 0 */
    const vf n = __builtin_convertvector(whole, vf);
    const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    vf poly = (vf){0} + 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    poly = poly * r * r + r + 1.0f;
    const vi two_n = (whole + 127) << 23;
    return (vf)((vi)(poly * (vf)two_n) & ~underflow);
}

#if defined(__AVX512F__)
/* The softmax part of chunk_exp_logits on 16 lanes: per row, the masks and the row max in one pass
 * (mask registers from the span-relative rows), then exp and the row sum; the tail of a row masked
 * (its lanes read as -inf, whose exp is 0). Measured on one core: 7.5 -> 3.8 us per [64, 128] tile. */
static void masked_exp_rows(const Problem *p, const int32_t *window, float *x, const float *given_max, float *row_max,
                            float *row_sum) {
    const int c = p->c, n = 2 * c;
    const __m512 later = _mm512_set1_ps(p->mask_value), self = _mm512_set1_ps(p->self_value);
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < c; i++) {
        float *xi = x + (int64_t)i * n;
        const __m512i q = _mm512_set1_epi32(window[c + i]);
        __m512 top = minus_inf;
        for (int j = 0; j < n; j += 16) {
            const __mmask16 lanes = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512i k = _mm512_maskz_loadu_epi32(lanes, window + j);
            __m512 v = _mm512_maskz_loadu_ps(lanes, xi + j);
            if (p->causal) v = _mm512_mask_mov_ps(v, _mm512_cmpgt_epi32_mask(k, q), later);
            v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(k, q), self); /* self last: it wins, as in masked() */
            _mm512_mask_storeu_ps(xi + j, lanes, v);
            top = _mm512_mask_max_ps(top, lanes, top, v);
        }
        const float shift = given_max ? given_max[i] : _mm512_reduce_max_ps(top);
        if (!given_max) row_max[i] = shift;
        const __m512 shift_v = _mm512_set1_ps(shift);
        __m512 total = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 16) {
            const __mmask16 lanes = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
            const __m512 v = _mm512_mask_loadu_ps(minus_inf, lanes, xi + j);
            const __m512 e = (__m512)exp_nonpositive((vf)_mm512_sub_ps(v, shift_v));
            _mm512_mask_storeu_ps(xi + j, lanes, e);
            total = _mm512_add_ps(total, e);
        }
        if (row_sum) row_sum[i] = _mm512_reduce_add_ps(total);
    }
}
#endif

/* The chunk's logits [c, 2c] into x, masked, then exp(logit - row max) in place. query [c, d] (leading
 * dimension 2d: rows of the gathered (qk | v) span), keys_t the window's keys transposed [d, 2c]
 * (leading dimension ld_t), window [2c] their span-relative rows. The row max is given (recomputing in backward) or found and written to row_max; row_sum
 * (when not NULL) gets the row sums. logits_section: the profile section of the matmul (the softmax's is the next). */
static void chunk_exp_logits(const Problem *p, const float *query, const float *keys_t, int64_t ld_t,
                             const int32_t *window, float *x, const float *given_max, float *row_max, float *row_sum,
                             int logits_section) {
    const int c = p->c, d = p->d, causal = p->causal;
    const float later = p->mask_value, self = p->self_value;
    PROFILE_START();
    matmul(c, 2 * c, d, query, 2 * d, 1, keys_t, ld_t, 0, x, 2 * c);
    PROFILE_MARK(logits_section);
    (void)logits_section;
#if defined(__AVX512F__)
    (void)causal, (void)later, (void)self;
    masked_exp_rows(p, window, x, given_max, row_max, row_sum);
    PROFILE_MARK(logits_section + 1);
#else
    for (int i = 0; i < c; i++) {
        float *xi = x + (int64_t)i * 2 * c;
        const int32_t q = window[c + i];
        for (int j = 0; j < 2 * c; j++) xi[j] = masked(xi[j], q, window[j], causal, later, self);
        float top;
        if (given_max) top = given_max[i];
        else top = row_max[i] = row_max_of(xi, 2 * c);
        vf lanes = {0};
        int j = 0;
        for (; j + VLEN <= 2 * c; j += VLEN) {
            const vf e = exp_nonpositive(*(vf_u *)(xi + j) - top);
            *(vf_u *)(xi + j) = e;
            lanes += e;
        }
        float total = 0.0f;
        for (; j < 2 * c; j++) {
            xi[j] = expf(xi[j] - top);
            total += xi[j];
        }
        for (int u = 0; u < VLEN; u++) total += lanes[u];
        if (row_sum) row_sum[i] = total;
    }
    PROFILE_MARK(logits_section + 1);
#endif
}

typedef struct {
    float *qkv, *keys, *keys_t, *values_t, *tile, *d_logits, *d_out, *shift, *grad_qv, *grad_keys;
    int64_t ld_t; /* leading dimension of keys_t and values_t: the longest span */
    int32_t *span; /* span rows relative to the first (rows of one head differ by less than 2^31) */
    float *scales; /* the span rows' key scales */
} Scratch;

/* bytes of memory starting on a cache line (64 bytes), or NULL: whole-line vector stores stay on one line. */
static void *alloc_lines(size_t bytes) {
    void *memory = NULL;
    return posix_memalign(&memory, 64, bytes > 0 ? bytes : 64) == 0 ? memory : NULL;
}

static int scratch_alloc(const Problem *p, Scratch *s) {
    const int64_t span = (int64_t)(p->stretch + 1) * p->c, c = p->c, d = p->d;
    s->qkv = alloc_lines(span * 2 * d * sizeof(float));
    s->keys = alloc_lines(span * d * sizeof(float));
    s->keys_t = alloc_lines(span * d * sizeof(float));
    s->values_t = alloc_lines(span * d * sizeof(float));
    s->ld_t = span;
    s->tile = alloc_lines(c * 2 * c * sizeof(float));
    s->d_logits = alloc_lines(c * 2 * c * sizeof(float));
    s->d_out = alloc_lines(c * d * sizeof(float));
    s->shift = alloc_lines(c * sizeof(float));
    s->grad_qv = alloc_lines(span * 2 * d * sizeof(float));
    s->grad_keys = alloc_lines(span * d * sizeof(float));
    s->span = alloc_lines(span * sizeof(int32_t));
    s->scales = alloc_lines(span * sizeof(float));
    return s->qkv && s->keys && s->keys_t && s->values_t && s->tile && s->d_logits && s->d_out && s->shift && s->grad_qv && s->grad_keys && s->span && s->scales
               ? 0
               : 1;
}

static void scratch_free(Scratch *s) {
    free(s->qkv), free(s->keys), free(s->keys_t), free(s->values_t), free(s->tile), free(s->d_logits), free(s->d_out), free(s->shift), free(s->grad_qv),
        free(s->grad_keys), free(s->span), free(s->scales);
}

static void single_blas_thread(void) {
    const int one = 1;
    if (blas_local_threads) blas_local_threads(&one);
}

/* MKL keeps per-thread work buffers until told otherwise: without this every call's threads would
 * leave theirs behind (measured: resident memory grew with every step). */
static void release_blas_thread(void) {
    if (blas_thread_free) blas_thread_free();
}

/* The next stretch of a task: its head, first chunk and number of chunks (never across heads). */
static int64_t next_stretch(const Task *t, int64_t flat, int64_t *bh, int64_t *g0) {
    const int64_t n_chunks = t->p->n_items / t->p->c;
    *bh = flat / n_chunks, *g0 = flat % n_chunks;
    int64_t count = n_chunks - *g0 < t->p->stretch ? n_chunks - *g0 : t->p->stretch;
    return count < t->last - flat ? count : t->last - flat;
}

/* Adds a chunk's outputs o [c, d] (E @ V, unnormalised) into its positions' running combination over
 * rounds: with z the item's logsumexp, M the largest z so far and S the sum of exp(z - M), combined
 * holds the sum of exp(z - M) o / row sum (rescaled whenever M grows). At the end combined / S is
 * sum_r softmax_r(z) o_r, and M, S give every item's weight exp(z - M) / S. */
static void combine_rounds(const Problem *p, const int64_t *query_rows, const int64_t *rows_end, int64_t item,
                           const float *o) {
    const int c = p->c, d = p->d;
    for (int i = 0; i < c; i++) {
        const int64_t row = query_rows[i];
        if (i + PREFETCH_AHEAD < rows_end - query_rows) { /* random rows: fetch ahead (into the next chunk's), as in gather_span */
            const int64_t ahead = query_rows[i + PREFETCH_AHEAD];
            prefetch_bytes(p->combined + ahead * d, d * sizeof(float), 1);
            __builtin_prefetch(p->lse_max + ahead, 1, 3);
            __builtin_prefetch(p->lse_sum + ahead, 1, 3);
        }
        const float z = p->row_max[item + i] + logf(p->row_sum[item + i]), top = p->lse_max[row];
        float *acc = p->combined + row * d, w;
        if (z > top) { /* a new largest z: rescale what is there (nothing yet when top is -inf) */
            const float shrink = expf(top - z);
            for (int j = 0; j < d; j++) acc[j] *= shrink;
            p->lse_sum[row] *= shrink;
            p->lse_max[row] = z;
            w = 1.0f;
        } else {
            w = expf(z - top);
        }
        p->lse_sum[row] += w;
        const float scale = w / p->row_sum[item + i], *oi = o + (int64_t)i * d;
        for (int j = 0; j < d; j++) acc[j] += scale * oi[j];
    }
}

/* dst[0..n) = src[0..n) without reading dst's lines first or keeping them in cache (the kept
 * probabilities are read again only in backward): x86 non-temporal stores when dst is 64-byte (AVX-512)
 * or 32-byte aligned. */
static void store_streaming(float *dst, const float *src, int64_t n) {
#if defined(__AVX512F__)
    if (((uintptr_t)dst & 63) == 0 && n % 16 == 0) {
        for (int64_t j = 0; j < n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
        return;
    }
#endif
#if defined(__AVX__)
    if (((uintptr_t)dst & 31) == 0 && n % 8 == 0) {
        for (int64_t j = 0; j < n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
        return;
    }
#endif
    memcpy(dst, src, n * sizeof(float));
}

/* A head's combination finished: combined / S for its positions, and each item's scale
 * w_t / row sum_t with w_t = exp(z_t - M) / S (M, S of the item's position). Round 0's items (sorted
 * indices 0 .. L) are the head's positions, each once. */
static void finish_head(const Problem *p, int64_t bh) {
    const int64_t *rows = p->rows + bh * (p->n_items + p->c) + p->c;
    for (int64_t k = 0; k < p->n_items; k++) {
        const int64_t item = bh * p->n_items + k, row = rows[k];
        const float z = p->row_max[item] + logf(p->row_sum[item]);
        p->item_scale[item] = expf(z - p->lse_max[row]) / p->lse_sum[row] / p->row_sum[item];
    }
    for (int64_t k = 0; k < p->seq_len; k++) {
        float *acc = p->combined + rows[k] * p->d;
        const float inverse = 1.0f / p->lse_sum[rows[k]];
        for (int j = 0; j < p->d; j++) acc[j] *= inverse;
    }
}

static void *forward_task(void *arg) {
    Task *t = arg;
    const Problem *p = t->p;
    const int c = p->c, d = p->d;
    Scratch s;
    if (scratch_alloc(p, &s)) {
        scratch_free(&s);
        t->status = 1;
        return NULL;
    }
    for (int64_t flat = t->first, bh, g0, count; flat < t->last; flat += count) {
        count = next_stretch(t, flat, &bh, &g0);
        const int64_t *span_rows = p->rows + bh * (p->n_items + c) + g0 * c, *rows_end = p->rows + (bh + 1) * (p->n_items + c);
        PROFILE_START();
        gather_span(p, span_rows, rows_end, (int)(count + 1) * c, s.qkv, NULL, s.keys_t, NULL, s.ld_t, s.span, s.scales);
        PROFILE_MARK(F_GATHER);
        for (int64_t l = 0; l < count; l++) {
            const int64_t item = bh * p->n_items + (g0 + l) * c;
            float *x = s.tile; /* the tile stays in cache; the kept copy is streamed out below */
            chunk_exp_logits(p, s.qkv + (l + 1) * c * 2 * d, s.keys_t + l * c, s.ld_t, s.span + l * c, x, NULL,
                             p->row_max + item, p->row_sum + item, F_LOGITS);
            PROFILE_SKIP();
            if (p->probs) store_streaming(p->probs + item * 2 * c, x, (int64_t)c * 2 * c);
            PROFILE_MARK(F_SOFTMAX);
            if (!p->combined) {
                matmul(c, d, 2 * c, x, 2 * c, 1, s.qkv + l * c * 2 * d + d, 2 * d, 0, p->out + item * d, d);
                PROFILE_MARK(F_PV);
                continue;
            }
            matmul(c, d, 2 * c, x, 2 * c, 1, s.qkv + l * c * 2 * d + d, 2 * d, 0, s.d_out, d);
            PROFILE_MARK(F_PV);
            combine_rounds(p, span_rows + (l + 1) * c, rows_end, item, s.d_out);
            PROFILE_MARK(F_COMBINE);
        }
    }
    PROFILE_START();
    if (p->combined) /* this thread's heads are complete: finish them */
        for (int64_t bh = t->first / (p->n_items / c); bh < t->last / (p->n_items / c); bh++) finish_head(p, bh);
    PROFILE_MARK(F_FINISH);
#if defined(__AVX__)
    _mm_sfence(); /* the streamed stores are visible to whoever reads probs next */
#endif
    scratch_free(&s);
    return NULL;
}

/* Adds a stretch's gradients onto the table rows: (dqk | dv) plus dk mapped through k = s q
 * (dq = s dk - q (q . dk) s^3, linear in dk, so summing the windows first is exact). */
static void add_span_grads(const Problem *p, const int64_t *span_rows, const int64_t *rows_end, int span, const Scratch *s,
                           float *grad_table) {
    const int d = p->d;
    for (int r = 0; r < span; r++) {
        const float *q = s->qkv + (int64_t)r * 2 * d, *gk = s->grad_keys + (int64_t)r * d;
        const float *gqv = s->grad_qv + (int64_t)r * 2 * d;
        const float scale = s->scales[r];
        if (r + PREFETCH_AHEAD < rows_end - span_rows)
            prefetch_bytes(grad_table + span_rows[r + PREFETCH_AHEAD] * 2 * d, 2 * d * sizeof(float), 1);
        float dot = 0.0f;
        for (int j = 0; j < d; j++) dot += q[j] * gk[j];
        const float along = dot * scale * scale * scale;
        float *dst = grad_table + span_rows[r] * 2 * d;
        for (int j = 0; j < d; j++) dst[j] += gqv[j] + scale * gk[j] - q[j] * along;
        for (int j = d; j < 2 * d; j++) dst[j] += gqv[j];
    }
}

static void *backward_task(void *arg) {
    Task *t = arg;
    const Problem *p = t->p;
    const int c = p->c, d = p->d, causal = p->causal;
    Scratch s;
    if (scratch_alloc(p, &s)) {
        scratch_free(&s);
        t->status = 1;
        return NULL;
    }
    for (int64_t flat = t->first, bh, g0, count; flat < t->last; flat += count) {
        count = next_stretch(t, flat, &bh, &g0);
        const int64_t *span_rows = p->rows + bh * (p->n_items + c) + g0 * c, *rows_end = p->rows + (bh + 1) * (p->n_items + c);
        const int span = (int)(count + 1) * c;
        PROFILE_START();
        gather_span(p, span_rows, rows_end, span, s.qkv, s.keys, p->probs ? NULL : s.keys_t, s.values_t, s.ld_t, s.span,
                    s.scales);
        memset(s.grad_qv, 0, (size_t)span * 2 * d * sizeof(float));
        memset(s.grad_keys, 0, (size_t)span * d * sizeof(float));
        PROFILE_MARK(B_GATHER);
        for (int64_t l = 0; l < count; l++) {
            const int64_t item = bh * p->n_items + (g0 + l) * c;
            const int64_t *query_rows = span_rows + (l + 1) * c;
            const int32_t *window = s.span + l * c;
            const float *query = s.qkv + (l + 1) * c * 2 * d, *window_keys = s.keys + l * c * d;
            float *e = p->probs ? p->probs + item * 2 * c : s.tile, *ds = s.d_logits;
            if (!p->probs)
                chunk_exp_logits(p, query, s.keys_t + l * c, s.ld_t, window, e, p->row_max + item, NULL, NULL, B_LOGITS);
            PROFILE_SKIP();
            /* dO_t = (w_t / row sum) dY, and the same scale on dY . Y */
            for (int i = 0; i < c; i++) {
                if (i + PREFETCH_AHEAD < rows_end - query_rows) {
                    prefetch_bytes(p->grad_out + query_rows[i + PREFETCH_AHEAD] * d, d * sizeof(float), 0);
                    __builtin_prefetch(p->grad_dot + query_rows[i + PREFETCH_AHEAD], 0, 3);
                }
                const float w = p->scale[item + i];
                const float *g = p->grad_out + query_rows[i] * d;
                for (int j = 0; j < d; j++) s.d_out[i * d + j] = w * g[j];
                s.shift[i] = w * p->grad_dot[query_rows[i]];
            }
            PROFILE_MARK(B_DY_ROWS);
            matmul(2 * c, d, c, e, 1, 2 * c, s.d_out, d, 1, s.grad_qv + l * c * 2 * d + d, 2 * d); /* dV = E^T dO */
            PROFILE_MARK(B_DV);
            matmul(c, 2 * c, d, s.d_out, d, 1, s.values_t + l * c, s.ld_t, 0, ds, 2 * c);      /* dP = dO V^T */
            PROFILE_MARK(B_DP);
            /* dS = E (dP - shift); constant (masked, self) logits pass no gradient */
            for (int i = 0; i < c; i++) {
                float *dsi = ds + (int64_t)i * 2 * c;
                const float *ei = e + (int64_t)i * 2 * c;
                const int32_t q = window[c + i];
                const float shift = s.shift[i];
                for (int j = 0; j < 2 * c; j++) { /* ei is finite everywhere: read unconditionally (no masked loads) */
                    const int32_t k = window[j];
                    const float x = (dsi[j] - shift) * ei[j];
                    dsi[j] = (k == q) | (causal & (k > q)) ? 0.0f : x;
                }
            }
            PROFILE_MARK(B_DS);
            matmul(c, d, 2 * c, ds, 2 * c, 1, window_keys, d, 1, s.grad_qv + (l + 1) * c * 2 * d, 2 * d); /* dQ = dS K */
            PROFILE_MARK(B_DQ);
            matmul(2 * c, d, c, ds, 1, 2 * c, query, 2 * d, 1, s.grad_keys + l * c * d, d);                /* dK = dS^T Q */
            PROFILE_MARK(B_DK);
        }
        add_span_grads(p, span_rows, rows_end, span, &s, t->grad_table);
        PROFILE_MARK(B_ADD);
    }
    scratch_free(&s);
    return NULL;
}

/* Runs fn over n_threads tasks. Work that adds into rows (a backward, or a forward combining rounds)
 * splits by whole heads, whose rows are disjoint, when there are at least as many heads as threads
 * (a combining forward always: it runs on fewer threads otherwise). A backward with fewer heads than
 * threads splits by chunks, threads after the first adding into private gradient tables that are
 * summed at the end, unless those would exceed PRIVATE_TABLES_BYTES (then one thread per head). A
 * plain forward splits by chunks. Returns 0, or 1 when memory ran out. */
/* Most memory the private gradient tables of a backward may take together; past it the backward
 * runs on one thread per head instead (at 1M tokens one table is 2 GiB). */
#define PRIVATE_TABLES_BYTES ((int64_t)256 << 20)

static int run_threads(Problem *p, void *(*fn)(void *), int backward, int64_t table_rows) {
    const int64_t n_chunks = p->n_items / p->c, total = p->bh * n_chunks;
    int n = p->n_threads < 1 ? 1 : p->n_threads;
    if (n > 64) n = 64;
    if (n > total) n = (int)total;
    if (!backward && p->combined && n > p->bh) n = (int)p->bh;
    if (backward && n > p->bh && (n - 1) * table_rows * 2 * p->d * (int64_t)sizeof(float) > PRIVATE_TABLES_BYTES)
        n = (int)p->bh;
    const int by_heads = backward ? p->bh >= n : p->combined != NULL;
    const int private_tables = backward && !by_heads;
    Task tasks[64];
    pthread_t threads[64];
    int status = 0;
    for (int i = 0; i < n; i++) {
        tasks[i].p = p;
        tasks[i].status = 0;
        tasks[i].grad_table = p->grad_table;
        if (by_heads) {
            tasks[i].first = p->bh * i / n * n_chunks;
            tasks[i].last = p->bh * (i + 1) / n * n_chunks;
        } else {
            tasks[i].first = total * i / n;
            tasks[i].last = total * (i + 1) / n;
        }
        if (private_tables && i > 0) {
            tasks[i].grad_table = calloc((size_t)table_rows * 2 * p->d, sizeof(float));
            if (!tasks[i].grad_table) status = 1;
        }
    }
    if (status == 0) {
        for (int i = 0; i < n; i++)
            if (pthread_create(&threads[i], NULL, fn, &tasks[i])) tasks[i].status = 2;
        for (int i = 0; i < n; i++)
            if (tasks[i].status != 2) pthread_join(threads[i], NULL);
        for (int i = 0; i < n; i++) status |= tasks[i].status;
    }
    for (int i = 1; private_tables && i < n; i++) {
        if (!tasks[i].grad_table) continue;
        if (status == 0)
            for (int64_t j = 0; j < table_rows * 2 * p->d; j++) p->grad_table[j] += tasks[i].grad_table[j];
        free(tasks[i].grad_table);
    }
    return status;
}

/* Forward of every chunk: probs (when not NULL), row_max, row_sum, and either out or (combined not
 * NULL) the rounds combined per position: combined (then divided by S: the output), lse_max (M),
 * lse_sum (S), initialised by the caller to 0, -inf and 0, and item_scale [BH, N] = w_t / row sum_t.
 * Returns 0 on success. */
int lsh_cpu_forward(const float *table, const float *key_scale, const int64_t *rows, int64_t bh, int64_t n_items,
                    int c, int d, int causal, float mask_value, float self_value, int stretch, int n_threads,
                    float *probs, float *row_max, float *row_sum, float *out, float *combined, float *lse_max,
                    float *lse_sum, float *item_scale, int64_t seq_len) {
    Problem p = {table, key_scale, rows, bh, n_items, c, d, causal, stretch, n_threads, mask_value, self_value,
                 probs, row_max, row_sum, out, combined, lse_max, lse_sum, item_scale, seq_len,
                 NULL, NULL, NULL, NULL};
    return run_threads(&p, forward_task, 0, 0);
}

/* Backward of every chunk, added into grad_table [table_rows, 2d]. probs NULL: recomputed from row_max. */
int lsh_cpu_backward(const float *table, const float *key_scale, const int64_t *rows, int64_t bh, int64_t n_items,
                     int c, int d, int causal, float mask_value, float self_value, int stretch, int n_threads,
                     const float *probs, const float *row_max, const float *scale, const float *grad_out,
                     const float *grad_dot, float *grad_table, int64_t table_rows) {
    Problem p = {table, key_scale, rows, bh, n_items, c, d, causal, stretch, n_threads, mask_value, self_value,
                 (float *)probs, (float *)row_max, NULL, NULL, NULL, NULL, NULL, NULL, 0, grad_out, grad_dot, scale, grad_table};
    return run_threads(&p, backward_task, 1, table_rows);
}

/* Buckets of n positions from their rotated values x [sum(halves), ld] (one row per rotation,
 * positions along the row): factor f's bucket is the argmax over concat([x_f, -x_f]) of its
 * halves[f] rows (ties to the first index, as argmax), and the bucket is
 * b_0 + 2 halves[0] (b_1 + 2 halves[1] (...)). Eight positions at a time in vector registers
 * (GCC vector extensions: SIMD where the target has it), the rest one by one. */
static void buckets_of(const float *x, int n, int ld, const int *halves, int n_factors, int64_t *bucket) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8i total = {0}, product = {1, 1, 1, 1, 1, 1, 1, 1};
        for (int f = 0, start = 0; f < n_factors; start += halves[f], f++) {
            v8f high, low, v;
            v8i high_at = {0}, low_at = {0};
            memcpy(&high, x + (int64_t)start * ld + i, sizeof(high));
            low = high;
            for (int j = 1; j < halves[f]; j++) {
                memcpy(&v, x + (int64_t)(start + j) * ld + i, sizeof(v));
                const v8i above = v > high, below = v < low, at = (v8i){0} + j;
                high_at = (at & above) | (high_at & ~above);
                high = (v8f)(((v8i)v & above) | ((v8i)high & ~above));
                low_at = (at & below) | (low_at & ~below);
                low = (v8f)(((v8i)v & below) | ((v8i)low & ~below));
            }
            const v8i first_half = high >= -low;
            total += product * ((high_at & first_half) | ((low_at + halves[f]) & ~first_half));
            product *= 2 * halves[f];
        }
        for (int u = 0; u < 8; u++) bucket[i + u] = total[u];
    }
    for (; i < n; i++) {
        int64_t total = 0, product = 1;
        for (int f = 0, start = 0; f < n_factors; start += halves[f], f++) {
            int high = 0, low = 0;
            for (int j = 1; j < halves[f]; j++) {
                const float v = x[(int64_t)(start + j) * ld + i];
                high = v > x[(int64_t)(start + high) * ld + i] ? j : high;
                low = v < x[(int64_t)(start + low) * ld + i] ? j : low;
            }
            const float top = x[(int64_t)(start + high) * ld + i], bottom = x[(int64_t)(start + low) * ld + i];
            total += product * (top >= -bottom ? high : low + halves[f]);
            product *= 2 * halves[f];
        }
        bucket[i] = total;
    }
}

/* Positions hashed per matmul: the [HASH_BLOCK, n_hashes * sum(halves)] rotated tile stays in cache. */
#define HASH_BLOCK 256

typedef struct {
    const float *qk, *rotations;
    int64_t stride_b, stride_h, stride_l, batch, heads, seq_len;
    int d, n_hashes, n_factors, width, n_threads;
    const int *halves;
    int64_t *out;
} HashProblem;

typedef struct {
    const HashProblem *p;
    int64_t first, last; /* range of (batch * heads * position blocks) */
    int status;
} HashTask;

static void *hash_task(void *arg) {
    HashTask *t = arg;
    const HashProblem *p = t->p;
    const int d = p->d, columns = p->n_hashes * p->width;
    const int64_t blocks = (p->seq_len + HASH_BLOCK - 1) / HASH_BLOCK;
    float *q = malloc((size_t)HASH_BLOCK * d * sizeof(float)), *rotated = malloc((size_t)HASH_BLOCK * columns * sizeof(float));
    int64_t *bucket = malloc(HASH_BLOCK * sizeof(int64_t));
    single_blas_thread();
    if (!q || !rotated || !bucket) t->status = 1;
    for (int64_t unit = t->first; unit < t->last && !t->status; unit++) {
        const int64_t bh = unit / blocks, b = bh / p->heads, h = bh % p->heads, first = unit % blocks * HASH_BLOCK;
        const int n = (int)(p->seq_len - first < HASH_BLOCK ? p->seq_len - first : HASH_BLOCK);
        const float *src = p->qk + b * p->stride_b + h * p->stride_h + first * p->stride_l;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < d; j++) q[i * d + j] = src[i * p->stride_l + j];
        /* rotated^T [columns, n] = rotations_h^T [columns, d] q^T [d, n] */
        gemm('T', 'T', columns, n, d, p->rotations + h * d * columns, columns, q, d, 0.0f, rotated, HASH_BLOCK);
        for (int r = 0; r < p->n_hashes; r++) {
            buckets_of(rotated + (int64_t)r * p->width * HASH_BLOCK, n, HASH_BLOCK, p->halves, p->n_factors, bucket);
            memcpy(p->out + (bh * p->n_hashes + r) * p->seq_len + first, bucket, n * sizeof(int64_t));
        }
    }
    free(q), free(rotated), free(bucket);
    release_blas_thread();
    return NULL;
}

/* Angular-LSH buckets of qk (element (b, h, l, j) at qk[b stride_b + h stride_h + l stride_l + j], j < d)
 * with rotations [heads, d, n_hashes, sum(halves)] (contiguous): out [batch, heads, n_hashes, seq_len],
 * without the round offsets. Returns 0, or 1 when memory ran out. */
int lsh_cpu_hash(const float *qk, int64_t stride_b, int64_t stride_h, int64_t stride_l, int64_t batch, int64_t heads,
                 int64_t seq_len, int d, const float *rotations, int n_hashes, const int *halves, int n_factors,
                 int n_threads, int64_t *out) {
    int width = 0;
    for (int f = 0; f < n_factors; f++) width += halves[f];
    HashProblem p = {qk, rotations, stride_b, stride_h, stride_l, batch, heads, seq_len,
                     d, n_hashes, n_factors, width, n_threads, halves, out};
    const int64_t total = batch * heads * ((seq_len + HASH_BLOCK - 1) / HASH_BLOCK);
    int n = n_threads < 1 ? 1 : n_threads > 64 ? 64 : n_threads, status = 0;
    if (n > total) n = (int)total;
    HashTask tasks[64];
    pthread_t threads[64];
    for (int i = 0; i < n; i++) {
        tasks[i] = (HashTask){&p, total * i / n, total * (i + 1) / n, 0};
        if (pthread_create(&threads[i], NULL, hash_task, &tasks[i])) tasks[i].status = 2;
    }
    for (int i = 0; i < n; i++) {
        if (tasks[i].status != 2) pthread_join(threads[i], NULL);
        status |= tasks[i].status;
    }
    return status;
}

typedef struct {
    const float *out, *scale;
    const int64_t *undo;
    int64_t heads, seq_len, first, last;
    int n_hashes, d;
    float *combined;
} CombineTask;

static void *combine_task(void *arg) {
    CombineTask *t = arg;
    const int64_t n_items = t->n_hashes * t->seq_len;
    const int d = t->d;
    for (int64_t row = t->first; row < t->last; row++) {
        const int64_t h = row % t->heads, position = row / t->heads % t->seq_len, b = row / (t->heads * t->seq_len);
        const int64_t base = (b * t->heads + h) * n_items;
        float *acc = t->combined + row * d;
        if (row + 2 < t->last) { /* the next rows' items, a row ahead */
            const int64_t h2 = (row + 2) % t->heads, p2 = (row + 2) / t->heads % t->seq_len;
            const int64_t b2 = (row + 2) / (t->heads * t->seq_len), base2 = (b2 * t->heads + h2) * n_items;
            for (int r = 0; r < t->n_hashes; r++)
                prefetch_bytes(t->out + (base2 + t->undo[base2 + r * t->seq_len + p2]) * d, d * sizeof(float), 0);
        }
        for (int j = 0; j < d; j++) acc[j] = 0.0f;
        for (int r = 0; r < t->n_hashes; r++) {
            const int64_t item = base + t->undo[base + r * t->seq_len + position];
            const float w = t->scale[item], *o = t->out + item * d;
            for (int j = 0; j < d; j++) acc[j] += w * o[j];
        }
    }
    return NULL;
}

/* Combine over rounds and unsort: combined [B * L * H, d], row (b * L + position) * H + h, is the sum
 * over rounds r of scale[i] * out[i] for i = undo[b * H + h, r * L + position] (sorted index) of
 * out [BH, N, d], scale [BH, N]. */
void lsh_cpu_combine(const float *out, const float *scale, const int64_t *undo, int64_t batch, int64_t heads,
                     int64_t seq_len, int n_hashes, int d, int n_threads, float *combined) {
    const int64_t rows = batch * seq_len * heads;
    int n = n_threads < 1 ? 1 : n_threads > 64 ? 64 : n_threads;
    if (n > rows) n = (int)rows;
    CombineTask tasks[64];
    pthread_t threads[64];
    int started[64];
    for (int i = 0; i < n; i++) {
        tasks[i] = (CombineTask){out, scale, undo, heads, seq_len, rows * i / n, rows * (i + 1) / n, n_hashes, d, combined};
        started[i] = pthread_create(&threads[i], NULL, combine_task, &tasks[i]) == 0;
        if (!started[i]) combine_task(&tasks[i]); /* no thread: do its share here */
    }
    for (int i = 0; i < n; i++)
        if (started[i]) pthread_join(threads[i], NULL);
}

typedef struct {
    const int64_t *buckets;
    int64_t n_items, n_buckets, heads, seq_len, first, last;
    int c, status;
    int64_t *sort_idx, *undo, *rows;
} SortTask;

static void *sort_task(void *arg) {
    SortTask *t = arg;
    const int64_t n = t->n_items, c = t->c;
    int64_t *start = malloc((size_t)t->n_buckets * sizeof(int64_t));
    if (!start) {
        t->status = 1;
        return NULL;
    }
    for (int64_t bh = t->first; bh < t->last; bh++) {
        const int64_t *bucket = t->buckets + bh * n, b = bh / t->heads, h = bh % t->heads;
        int64_t *sort_idx = t->sort_idx + bh * n, *undo = t->undo + bh * n, *rows = t->rows + bh * (n + c);
        memset(start, 0, (size_t)t->n_buckets * sizeof(int64_t));
        for (int64_t i = 0; i < n; i++) start[bucket[i]]++;
        for (int64_t k = 0, total = 0; k < t->n_buckets; k++) {
            const int64_t count = start[k];
            start[k] = total, total += count;
        }
        /* items in id order (round-major, positions ascending): a stable sort by (bucket, position) */
        for (int64_t i = 0; i < n; i++) {
            const int64_t at = start[bucket[i]]++;
            sort_idx[at] = i, undo[i] = at;
            rows[c + at] = (b * t->seq_len + i % t->seq_len) * t->heads + h;
        }
        memcpy(rows, rows + n, (size_t)c * sizeof(int64_t)); /* the last chunk first: the cyclic look-back */
    }
    free(start);
    return NULL;
}

/* One stable counting sort of every head's items by bucket (buckets [BH, N] in [0, n_buckets), item
 * id r * L + position): sort_idx [BH, N] (item id at each sorted index), undo [BH, N] (its inverse)
 * and rows [BH, c + N] (table row of each sorted item, the last chunk prepended), exactly what
 * argsort of bucket * L + position gives. Returns 0, or 1 when memory ran out. */
int lsh_cpu_sort(const int64_t *buckets, int64_t bh, int64_t n_items, int64_t n_buckets, int64_t heads, int64_t seq_len,
                 int c, int n_threads, int64_t *sort_idx, int64_t *undo, int64_t *rows) {
    int n = n_threads < 1 ? 1 : n_threads > 64 ? 64 : n_threads, status = 0;
    if (n > bh) n = (int)bh;
    SortTask tasks[64];
    pthread_t threads[64];
    for (int i = 0; i < n; i++) {
        tasks[i] = (SortTask){buckets, n_items, n_buckets, heads, seq_len, bh * i / n, bh * (i + 1) / n, c, 0,
                              sort_idx, undo, rows};
        if (pthread_create(&threads[i], NULL, sort_task, &tasks[i])) tasks[i].status = 2;
    }
    for (int i = 0; i < n; i++) {
        if (tasks[i].status != 2) pthread_join(threads[i], NULL);
        status |= tasks[i].status;
    }
    return status;
}
