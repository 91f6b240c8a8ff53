// What one host's direct reads between two processes cost, apart from tidewire: two processes
// (fork), each with a source and a destination buffer, read each other's source with
// process_vm_readv (or, for comparison, copy from a shared mapping with memcpy), the bytes cut
// among T threads that spin between iterations (no wake-up cost) or sleep on a futex (the
// wake-up of each iteration counted). Medians of ITERS iterations, rank 0's clock, from a
// barrier of both processes to the last thread's end.
//
//   cc -O2 -pthread -static -o pvr_bench bench/pvr_bench.c && ./pvr_bench [ITERS]
//
// Rows: alloc (heap: malloc; nothp / thp: mmap with MADV_NOHUGEPAGE / MADV_HUGEPAGE),
// mode (sym: both read at once; one: rank 0 reads, rank 1 waits; shm: memcpy from a
// MAP_SHARED copy of the peer's source, both at once), wake (spin / futex), chunk (bytes per
// system call: 0 = the thread's whole piece), threads, bytes, median and p10 in µs, GB/s.
#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_proc.h"

#define MAXT 16
#define MAXB (8u << 20)

struct shared {
    _Atomic uint32_t arrive;   // process barrier: arrivals
    _Atomic uint32_t phase;    // process barrier: generation
    pid_t pid[2];
    uint64_t src[2];           // each rank's source address (in its own process)
    char shm[2][MAXB];         // the shm mode's sources
};

static struct shared *S;
static int me, nthreads, mode, waker, chunk;  // mode 0 sym, 1 one, 2 shm; waker 0 spin, 1 futex
static size_t nbytes;
static char *dst;
static _Atomic uint32_t gen, left;

// Both processes meet here; a peer that does not come within 10 s (it died) ends the run.
static void pbarrier(void) { proc_barrier(&S->arrive, &S->phase, 2, me, 10); }

static void fwait(_Atomic uint32_t *a, uint32_t v) {
    syscall(SYS_futex, (uint32_t *)a, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
}
static void fwake(_Atomic uint32_t *a) {
    syscall(SYS_futex, (uint32_t *)a, FUTEX_WAKE_PRIVATE, 1 << 30, NULL, NULL, 0);
}

static void piece(int t) {
    size_t per = (nbytes + nthreads - 1) / nthreads, at = per * t;
    if (at >= nbytes) return;
    size_t len = nbytes - at < per ? nbytes - at : per;
    int peer = 1 - me;
    if (mode == 2) {
        memcpy(dst + at, S->shm[peer] + at, len);
        return;
    }
    size_t step = chunk ? (size_t)chunk : len;
    for (size_t off = 0; off < len; off += step) {
        size_t n = len - off < step ? len - off : step;
        struct iovec l = {dst + at + off, n}, r = {(void *)(S->src[peer] + at + off), n};
        if (process_vm_readv(S->pid[peer], &l, 1, &r, 1, 0) != (ssize_t)n) {
            perror("process_vm_readv");
            exit(1);
        }
    }
}

static void *worker(void *arg) {
    int t = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t g;
        while ((g = atomic_load(&gen)) == seen) {
            if (waker) fwait(&gen, seen);
        }
        seen = g;
        if (g == UINT32_MAX) return NULL;
        piece(t);
        if (atomic_fetch_sub(&left, 1) == 1 && waker) fwake(&left);
    }
}

static char *alloc(int kind) {
    if (kind == 0) {
        char *p = malloc(MAXB);
        memset(p, 1, MAXB);
        return p;
    }
    char *p = mmap(NULL, MAXB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(p, MAXB, kind == 2 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(p, 1, MAXB);
    return p;
}

int main(int argc, char **argv) {
    int iters = argc > 1 ? atoi(argv[1]) : 200;
    S = mmap(NULL, sizeof *S, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    memset(S, 0, sizeof *S);
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    me = child == 0;
    S->pid[me] = getpid();
    static const char *allocs[] = {"heap", "nothp", "thp"}, *modes[] = {"sym", "one", "shm"},
                      *wakes[] = {"spin", "futex"};
    size_t sizes[] = {512u << 10, 1u << 20, 2u << 20, 4u << 20, 8u << 20};
    int threads[] = {1, 2, 4, 8}, chunks[] = {0, 256 << 10};
    double *t = malloc(sizeof(double) * iters);
    if (!me) printf("%-6s %-4s %-5s %7s %2s %8s %9s %9s %6s\n", "alloc", "mode", "wake", "chunk", "T", "bytes", "med_us", "p10_us", "GB/s");
    for (int a = 0; a < 3; a++) {
        char *src = alloc(a);
        dst = alloc(a);
        memset(S->shm[me], 2, MAXB);
        S->src[me] = (uint64_t)(uintptr_t)src;
        pbarrier();
        for (int m = 0; m < 3; m++)
            for (int w = 0; w < 2; w++)
                for (int c = 0; c < 2; c++)
                    for (int ti = 0; ti < 4; ti++)
                        for (int si = 0; si < 5; si++) {
                            if (m == 2 && (c || a)) continue;  // memcpy: one row set
                            if (w == 1 && (c || a == 2)) continue;
                            mode = m, waker = w, chunk = chunks[c], nthreads = threads[ti], nbytes = sizes[si];
                            pthread_t th[MAXT];
                            atomic_store(&gen, 0);
                            for (int i = 1; i < nthreads; i++) pthread_create(&th[i], NULL, worker, (void *)(intptr_t)i);
                            for (int it = -10; it < iters; it++) {
                                pbarrier();
                                double t0 = now_us();
                                if (!(mode == 1 && me == 1)) {
                                    atomic_store(&left, nthreads - 1);
                                    atomic_fetch_add(&gen, 1);
                                    if (waker) fwake(&gen);
                                    piece(0);
                                    uint32_t l;
                                    while ((l = atomic_load(&left)) != 0) {
                                        if (waker) fwait(&left, l);
                                    }
                                }
                                if (it >= 0) t[it] = now_us() - t0;
                            }
                            pbarrier();
                            atomic_store(&gen, UINT32_MAX);
                            fwake(&gen);
                            for (int i = 1; i < nthreads; i++) pthread_join(th[i], NULL);
                            if (!me) {
                                qsort(t, iters, sizeof *t, cmp_double);
                                double med = t[iters / 2];
                                printf("%-6s %-4s %-5s %7d %2d %8zu %9.1f %9.1f %6.2f\n", allocs[a], modes[m], wakes[w], chunk, nthreads, nbytes, med, t[iters / 10], nbytes / med / 1e3);
                                fflush(stdout);
                            }
                        }
        pbarrier();
    }
    if (child) waitpid(child, NULL, 0);
    return 0;
}
