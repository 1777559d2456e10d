/* The fused CPU kernel's chunk matmuls on their own: GFLOP/s of `matmul` (variants/attention/lsh_cpu.c)
 * on the six chunk shapes (c = d = 64), one thread, operands hot in L1/L2, thread CPU time, best of 5
 * rounds of 4000 calls. docs/performance.md (issue #34) quotes it for both builds:
 *
 *   cc -O3 -march=native -fno-math-errno -fno-trapping-math -fassociative-math -fno-signed-zeros \
 *      -mprefer-vector-width=256 [-mno-avx512f] scripts/lsh_cpu_matmul.c -o /tmp/lsh_cpu_matmul -lpthread -lm
 *   /tmp/lsh_cpu_matmul
 *
 * (the kernel's CFLAGS of lsh_cpu.py; -mno-avx512f gives the AVX2 path on an AVX-512 CPU;
 * -DKERNEL='"/path/to/lsh_cpu.c"' times another version of the kernel). */
#ifndef KERNEL
#define KERNEL "../variants/attention/lsh_cpu.c"
#endif
#include KERNEL
#include <stdio.h>
#include <time.h>

static double thread_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    enum { c = 64, d = 64, span = 5 * c, calls = 4000 };
    float *qkv = aligned_alloc(64, span * 2 * d * 4), *keys_t = aligned_alloc(64, d * span * 4);
    float *keys = aligned_alloc(64, span * d * 4), *tile = aligned_alloc(64, c * 2 * c * 4);
    float *out = aligned_alloc(64, c * d * 4), *grad_qv = aligned_alloc(64, span * 2 * d * 4);
    float *grad_keys = aligned_alloc(64, span * d * 4);
    for (int i = 0; i < span * 2 * d; i++) qkv[i] = (i % 7) * 0.1f, grad_qv[i] = 0.0f;
    for (int i = 0; i < span * d; i++) keys_t[i] = (i % 5) * 0.1f, keys[i] = (i % 3) * 0.1f, grad_keys[i] = 0.0f;
    for (int i = 0; i < c * 2 * c; i++) tile[i] = (i % 11) * 0.01f;
    for (int i = 0; i < c * d; i++) out[i] = (i % 13) * 0.01f;
    const char *names[6] = {"q.k  [c,d] x [d,2c]", "P@V  [c,2c] x [2c,d]", "dV   [2c,c]^T x [c,d]",
                            "dP   [c,d] x [d,2c]", "dQ   [c,2c] x [2c,d]", "dK   [2c,c]^T x [c,d]"};
    printf("ISA %s\n", lsh_cpu_isa());
    for (int shape = 0; shape < 6; shape++) {
        double best = 1e9;
        for (int round = 0; round < 5; round++) {
            const double start = thread_seconds();
            for (int call = 0; call < calls; call++) switch (shape) { /* the calls of forward_task / backward_task */
                case 0: matmul(c, 2 * c, d, qkv + c * 2 * d, 2 * d, 1, keys_t, span, 0, tile, 2 * c); break;
                case 1: matmul(c, d, 2 * c, tile, 2 * c, 1, qkv + d, 2 * d, 0, out, d); break;
                case 2: matmul(2 * c, d, c, tile, 1, 2 * c, out, d, 1, grad_qv + d, 2 * d); break;
                case 3: matmul(c, 2 * c, d, out, d, 1, keys_t, span, 0, tile, 2 * c); break;
                case 4: matmul(c, d, 2 * c, tile, 2 * c, 1, keys, d, 1, grad_qv + c * 2 * d, 2 * d); break;
                default: matmul(2 * c, d, c, tile, 1, 2 * c, qkv, 2 * d, 1, grad_keys, d); break;
                }
            const double seconds = (thread_seconds() - start) / calls;
            best = seconds < best ? seconds : best;
        }
        printf("%-24s %6.1f GFLOP/s\n", names[shape], 2.0 * c * 2 * c * d / best * 1e-9);
    }
    return 0;
}
