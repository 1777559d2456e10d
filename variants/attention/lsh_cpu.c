/* Fused chunked attention of LSH attention on CPU (float32): the fast path of `_LSHCore`.
 *
 * Built and loaded by lsh_cpu.py (plain C, no torch headers; BLAS is the sgemm_ that torch itself
 * links, passed in as a function pointer). Layouts, all row-major and contiguous:
 *   table     [R, 2d]      (qk | v) row of each (batch, position, head), R = B * L * H
 *   key_scale [R]          shared-QK key scale s (key = s * qk)
 *   rows      [BH, c + N]  table row of each sorted item, the last chunk prepended (cyclic look-back):
 *                          chunk g's window is entries g*c .. g*c + 2c, its queries g*c + c .. g*c + 2c
 *   probs     [BH, N, 2c]  exp(logit - row max), unnormalised (NULL: not kept / recomputed)
 *   row_max, row_sum, scale [BH, N]; out [BH, N, d] (unnormalised E @ V)
 *   grad_out  [R, d], grad_dot [R] (dY . Y per row); grad_table [R, 2d] (accumulated into)
 * Logits are q . k with k = s * qk; a key whose row is the query's own gets self_value, with causal a
 * later key (larger row: rows grow with the position within a head) gets mask_value.
 *
 * Each thread walks its chunks in stretches: a stretch gathers its span's qk, keys and v rows once
 * into thread-local buffers that stay in cache (every window is then a slice of them, no look-back
 * copies), and each chunk's logits, softmax and matmuls run while its [c, 2c] tile is in L1/L2.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's vector expf (libmvec), which its headers declare only under -ffast-math; that flag is
 * avoided because it would set flush-to-zero for the whole process (crtfastmath). */
float expf(float) __attribute__((simd("notinbranch")));

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);
typedef int (*local_threads_fn)(const int *);

static sgemm_fn blas_sgemm;
static local_threads_fn blas_local_threads; /* MKL's mkl_set_num_threads_local_ (optional) */

int lsh_cpu_init(void *sgemm, void *local_threads) {
    blas_sgemm = (sgemm_fn)sgemm;
    blas_local_threads = (local_threads_fn)local_threads;
    return blas_sgemm != NULL ? 0 : 1;
}

/* Row-major C[m, n] = op(A)[m, k] op(B)[k, n] + beta C, through column-major sgemm (C^T = op(B)^T op(A)^T). */
static void gemm(char ta, char tb, int m, int n, int k, const float *a, int lda, const float *b, int ldb,
                 float beta, float *c, int ldc) {
    const float one = 1.0f;
    blas_sgemm(&tb, &ta, &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

typedef struct {
    const float *table, *key_scale;
    const int64_t *rows;
    int64_t bh, n_items;
    int c, d, causal, stretch, n_threads;
    float mask_value, self_value;
    float *probs, *row_max, *row_sum, *out;                   /* forward */
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

/* The span's table rows [n, 2d] (qk | v) and keys [n, d], gathered from the table; its rows relative to the first. */
static void gather_span(const Problem *p, const int64_t *span_rows, int n, float *qkv, float *keys, int32_t *span) {
    const int d = p->d;
    for (int r = 0; r < n; r++) {
        if (r + PREFETCH_AHEAD < n) prefetch_bytes(p->table + span_rows[r + PREFETCH_AHEAD] * 2 * d, 2 * d * sizeof(float), 0);
        span[r] = (int32_t)(span_rows[r] - span_rows[0]);
        const float *src = p->table + span_rows[r] * 2 * d;
        const float s = p->key_scale[span_rows[r]];
        float *dst = qkv + (int64_t)r * 2 * d, *key = keys + (int64_t)r * d;
        for (int j = 0; j < 2 * d; j++) dst[j] = src[j];
        for (int j = 0; j < d; j++) key[j] = s * src[j];
    }
}

/* Logit x of key k for query q (span-relative rows) with the constants in: causal (a later key), then self.
 * Branch-free so that the loops over a row vectorise. */
static inline float masked(float x, int32_t q, int32_t k, int causal, float later_value, float self_value) {
    x = (causal & (k > q)) ? later_value : x;
    return k == q ? self_value : x;
}

/* max of x[0..n) with LANES independent maxima (a plain reduction does not vectorise without
 * -ffinite-math-only). */
#define LANES 8
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

/* The chunk's logits [c, 2c] into x, masked, then exp(logit - row max) in place. query [c, d] (leading
 * dimension 2d: rows of the gathered (qk | v) span), keys [2c, d], window [2c] their span-relative
 * rows. The row max is given (recomputing in backward) or found and written to row_max; row_sum
 * (when not NULL) gets the row sums. */
static void chunk_exp_logits(const Problem *p, const float *query, const float *keys, const int32_t *window,
                             float *x, const float *given_max, float *row_max, float *row_sum) {
    const int c = p->c, d = p->d, causal = p->causal;
    const float later = p->mask_value, self = p->self_value;
    gemm('N', 'T', c, 2 * c, d, query, 2 * d, keys, d, 0.0f, x, 2 * c);
    for (int i = 0; i < c; i++) {
        float *xi = x + (int64_t)i * 2 * c;
        const int32_t q = window[c + i];
        for (int j = 0; j < 2 * c; j++) xi[j] = masked(xi[j], q, window[j], causal, later, self);
        float top;
        if (given_max) top = given_max[i];
        else top = row_max[i] = row_max_of(xi, 2 * c);
        float total = 0.0f;
        for (int j = 0; j < 2 * c; j++) {
            xi[j] = expf(xi[j] - top);
            total += xi[j];
        }
        if (row_sum) row_sum[i] = total;
    }
}

typedef struct {
    float *qkv, *keys, *tile, *d_logits, *d_out, *shift, *grad_qv, *grad_keys;
    int32_t *span; /* span rows relative to the first (rows of one head differ by less than 2^31) */
} Scratch;

static int scratch_alloc(const Problem *p, Scratch *s) {
    const int64_t span = (int64_t)(p->stretch + 1) * p->c, c = p->c, d = p->d;
    s->qkv = malloc(span * 2 * d * sizeof(float));
    s->keys = malloc(span * d * sizeof(float));
    s->tile = malloc(c * 2 * c * sizeof(float));
    s->d_logits = malloc(c * 2 * c * sizeof(float));
    s->d_out = malloc(c * d * sizeof(float));
    s->shift = malloc(c * sizeof(float));
    s->grad_qv = malloc(span * 2 * d * sizeof(float));
    s->grad_keys = malloc(span * d * sizeof(float));
    s->span = malloc(span * sizeof(int32_t));
    return s->qkv && s->keys && s->tile && s->d_logits && s->d_out && s->shift && s->grad_qv && s->grad_keys && s->span
               ? 0
               : 1;
}

static void scratch_free(Scratch *s) {
    free(s->qkv), free(s->keys), free(s->tile), free(s->d_logits), free(s->d_out), free(s->shift), free(s->grad_qv),
        free(s->grad_keys), free(s->span);
}

static void single_blas_thread(void) {
    const int one = 1;
    if (blas_local_threads) blas_local_threads(&one);
}

/* The next stretch of a task: its head, first chunk and number of chunks (never across heads). */
static int64_t next_stretch(const Task *t, int64_t flat, int64_t *bh, int64_t *g0) {
    const int64_t n_chunks = t->p->n_items / t->p->c;
    *bh = flat / n_chunks, *g0 = flat % n_chunks;
    int64_t count = n_chunks - *g0 < t->p->stretch ? n_chunks - *g0 : t->p->stretch;
    return count < t->last - flat ? count : t->last - flat;
}

static void *forward_task(void *arg) {
    Task *t = arg;
    const Problem *p = t->p;
    const int c = p->c, d = p->d;
    Scratch s;
    single_blas_thread();
    if (scratch_alloc(p, &s)) {
        scratch_free(&s);
        t->status = 1;
        return NULL;
    }
    for (int64_t flat = t->first, bh, g0, count; flat < t->last; flat += count) {
        count = next_stretch(t, flat, &bh, &g0);
        const int64_t *span_rows = p->rows + bh * (p->n_items + c) + g0 * c;
        gather_span(p, span_rows, (int)(count + 1) * c, s.qkv, s.keys, s.span);
        for (int64_t l = 0; l < count; l++) {
            const int64_t item = bh * p->n_items + (g0 + l) * c;
            float *x = p->probs ? p->probs + item * 2 * c : s.tile;
            chunk_exp_logits(p, s.qkv + (l + 1) * c * 2 * d, s.keys + l * c * d, s.span + l * c, x, NULL,
                             p->row_max + item, p->row_sum + item);
            gemm('N', 'N', c, d, 2 * c, x, 2 * c, s.qkv + l * c * 2 * d + d, 2 * d, 0.0f, p->out + item * d, d);
        }
    }
    scratch_free(&s);
    return NULL;
}

/* Adds a stretch's gradients onto the table rows: (dqk | dv) plus dk mapped through k = s q
 * (dq = s dk - q (q . dk) s^3, linear in dk, so summing the windows first is exact). */
static void add_span_grads(const Problem *p, const int64_t *span_rows, int span, const Scratch *s, float *grad_table) {
    const int d = p->d;
    for (int r = 0; r < span; r++) {
        const float *q = s->qkv + (int64_t)r * 2 * d, *gk = s->grad_keys + (int64_t)r * d;
        const float *gqv = s->grad_qv + (int64_t)r * 2 * d;
        const float scale = p->key_scale[span_rows[r]];
        if (r + PREFETCH_AHEAD < span)
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
    single_blas_thread();
    if (scratch_alloc(p, &s)) {
        scratch_free(&s);
        t->status = 1;
        return NULL;
    }
    for (int64_t flat = t->first, bh, g0, count; flat < t->last; flat += count) {
        count = next_stretch(t, flat, &bh, &g0);
        const int64_t *span_rows = p->rows + bh * (p->n_items + c) + g0 * c;
        const int span = (int)(count + 1) * c;
        gather_span(p, span_rows, span, s.qkv, s.keys, s.span);
        memset(s.grad_qv, 0, (size_t)span * 2 * d * sizeof(float));
        memset(s.grad_keys, 0, (size_t)span * d * sizeof(float));
        for (int64_t l = 0; l < count; l++) {
            const int64_t item = bh * p->n_items + (g0 + l) * c;
            const int64_t *query_rows = span_rows + (l + 1) * c;
            const int32_t *window = s.span + l * c;
            const float *query = s.qkv + (l + 1) * c * 2 * d, *window_keys = s.keys + l * c * d;
            const float *window_v = s.qkv + l * c * 2 * d + d;
            float *e = p->probs ? p->probs + item * 2 * c : s.tile, *ds = s.d_logits;
            if (!p->probs) chunk_exp_logits(p, query, window_keys, window, e, p->row_max + item, NULL, NULL);
            /* dO_t = (w_t / row sum) dY, and the same scale on dY . Y */
            for (int i = 0; i < c; i++) {
                if (i + PREFETCH_AHEAD < c) prefetch_bytes(p->grad_out + query_rows[i + PREFETCH_AHEAD] * d, d * sizeof(float), 0);
                const float w = p->scale[item + i];
                const float *g = p->grad_out + query_rows[i] * d;
                for (int j = 0; j < d; j++) s.d_out[i * d + j] = w * g[j];
                s.shift[i] = w * p->grad_dot[query_rows[i]];
            }
            gemm('T', 'N', 2 * c, d, c, e, 2 * c, s.d_out, d, 1.0f, s.grad_qv + l * c * 2 * d + d, 2 * d); /* dV */
            gemm('N', 'T', c, 2 * c, d, s.d_out, d, window_v, 2 * d, 0.0f, ds, 2 * c);                   /* dP */
            /* dS = E (dP - shift); constant (masked, self) logits pass no gradient */
            for (int i = 0; i < c; i++) {
                float *dsi = ds + (int64_t)i * 2 * c;
                const float *ei = e + (int64_t)i * 2 * c;
                const int32_t q = window[c + i];
                const float shift = s.shift[i];
                for (int j = 0; j < 2 * c; j++) {
                    const int32_t k = window[j];
                    dsi[j] = (k == q) | (causal & (k > q)) ? 0.0f : (dsi[j] - shift) * ei[j];
                }
            }
            gemm('N', 'N', c, d, 2 * c, ds, 2 * c, window_keys, d, 1.0f, s.grad_qv + (l + 1) * c * 2 * d, 2 * d); /* dQ */
            gemm('T', 'N', 2 * c, d, c, ds, 2 * c, query, 2 * d, 1.0f, s.grad_keys + l * c * d, d);                /* dK */
        }
        add_span_grads(p, span_rows, span, &s, t->grad_table);
    }
    scratch_free(&s);
    return NULL;
}

/* Runs fn over n_threads tasks. Split by whole heads (disjoint table rows) when there are at least
 * as many heads as threads; otherwise by chunks, threads after the first accumulating into private
 * gradient tables that are summed at the end. Returns 0, or 1 when memory ran out. */
static int run_threads(Problem *p, void *(*fn)(void *), int backward, int64_t table_rows) {
    const int64_t n_chunks = p->n_items / p->c, total = p->bh * n_chunks;
    int n = p->n_threads < 1 ? 1 : p->n_threads;
    if (n > 64) n = 64;
    if (n > total) n = (int)total;
    const int by_heads = !backward || p->bh >= n;
    Task tasks[64];
    pthread_t threads[64];
    int status = 0;
    for (int i = 0; i < n; i++) {
        tasks[i].p = p;
        tasks[i].status = 0;
        tasks[i].grad_table = p->grad_table;
        if (by_heads && backward) {
            tasks[i].first = p->bh * i / n * n_chunks;
            tasks[i].last = p->bh * (i + 1) / n * n_chunks;
        } else {
            tasks[i].first = total * i / n;
            tasks[i].last = total * (i + 1) / n;
        }
        if (!by_heads && i > 0) {
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
    for (int i = 1; i < n; i++) {
        if (by_heads || !tasks[i].grad_table) continue;
        if (status == 0)
            for (int64_t j = 0; j < table_rows * 2 * p->d; j++) p->grad_table[j] += tasks[i].grad_table[j];
        free(tasks[i].grad_table);
    }
    return status;
}

/* Forward of every chunk: probs (when not NULL), row_max, row_sum and out. Returns 0 on success. */
int lsh_cpu_forward(const float *table, const float *key_scale, const int64_t *rows, int64_t bh, int64_t n_items,
                    int c, int d, int causal, float mask_value, float self_value, int stretch, int n_threads,
                    float *probs, float *row_max, float *row_sum, float *out) {
    Problem p = {table, key_scale, rows, bh, n_items, c, d, causal, stretch, n_threads, mask_value, self_value,
                 probs, row_max, row_sum, out, NULL, NULL, NULL, NULL};
    return run_threads(&p, forward_task, 0, 0);
}

/* Backward of every chunk, added into grad_table [table_rows, 2d]. probs NULL: recomputed from row_max. */
int lsh_cpu_backward(const float *table, const float *key_scale, const int64_t *rows, int64_t bh, int64_t n_items,
                     int c, int d, int causal, float mask_value, float self_value, int stretch, int n_threads,
                     const float *probs, const float *row_max, const float *scale, const float *grad_out,
                     const float *grad_dot, float *grad_table, int64_t table_rows) {
    Problem p = {table, key_scale, rows, bh, n_items, c, d, causal, stretch, n_threads, mask_value, self_value,
                 (float *)probs, (float *)row_max, NULL, NULL, grad_out, grad_dot, scale, grad_table};
    return run_threads(&p, backward_task, 1, table_rows);
}

/* Angular-LSH buckets: for each of n_vectors rows of rotated [n_vectors, width], factor f's bucket is
 * the argmax over concat([x, -x]) of its slice of halves[f] columns (ties to the first index, as
 * argmax), and bucket = b_0 + 2 halves[0] (b_1 + 2 halves[1] (...)). out [n_vectors]. */
void lsh_cpu_buckets(const float *rotated, int64_t n_vectors, int width, const int *halves, int n_factors, int64_t *out) {
    for (int64_t v = 0; v < n_vectors; v++) {
        const float *x = rotated + v * width;
        int64_t bucket = 0, product = 1;
        for (int f = 0, start = 0; f < n_factors; start += halves[f], f++) {
            const float *part = x + start;
            int high = 0, low = 0;
            for (int j = 1; j < halves[f]; j++) {
                high = part[j] > part[high] ? j : high;
                low = part[j] < part[low] ? j : low;
            }
            bucket += product * (part[high] >= -part[low] ? high : low + halves[f]);
            product *= 2 * halves[f];
        }
        out[v] = bucket;
    }
}
