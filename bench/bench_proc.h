// What the process benchmarks (pvr_bench.c, a2a_bench.c) share: a clock, a barrier of n
// processes over two words of a shared mapping, and the comparison their medians sort by.
#pragma once
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

// The n processes meet here (`arrive` counts them, `phase` moves on when the last came); one
// that does not come within `limit_s` (it died) ends the run of process `me`.
static void proc_barrier(_Atomic uint32_t *arrive, _Atomic uint32_t *phase, uint32_t n, int me,
                         double limit_s) {
    uint32_t p = atomic_load(phase);
    if (atomic_fetch_add(arrive, 1) == n - 1) {
        atomic_store(arrive, 0);
        atomic_store(phase, p + 1);
        return;
    }
    double until = now_us() + limit_s * 1e6;
    while (atomic_load(phase) == p) {
        if (now_us() > until) {
            fprintf(stderr, "rank %d: a peer did not reach the barrier in %.0f s\n", me, limit_s);
            exit(1);
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
