// How one host can move an all_to_all's blocks between R processes, apart from tidewire: R
// processes (fork), each with a heap source of R blocks and a heap destination, every rank
// taking block `me` of every peer's source into its destination's block `peer`. Ways:
//   pvr    process_vm_readv of each peer's block, one thread, peer after peer
//   pvrT   the same, one thread per peer (threads spin between iterations: no wake-up cost)
//   pipe   each rank vmsplices its blocks into a pipe per peer (its own pages, referenced, not
//          copied: the pins are the owner's lock-free ones) and reads its peers' pipes
//   pipeT  the same, one thread per peer (its pipe both ways)
//   stage  each rank copies its source into a shared stage, a barrier, then copies out of the
//          peers' stages (two copies, no pins)
//   shm    the sources already in shared memory, one memcpy a block (a bound: no user memory
//          can be had this way)
// Medians (and p10) of ITERS iterations on rank 0's clock, from a barrier of all R to a barrier
// of all R; the destination is checked after the last iteration of each row.
//
//   cc -O2 -pthread -o a2a_bench bench/a2a_bench.c && ./a2a_bench R [ITERS] [PIPE_BYTES]
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench_proc.h"

#define MAXR 8
#define MAXB (16u << 20)  // bytes a rank's source holds at most

struct shared {
    _Atomic uint32_t arrive, phase;
    pid_t pid[MAXR];
    uint64_t src[MAXR];
    _Atomic int bad;
    char stage[MAXR][MAXB];
};

static struct shared *S;
static int R, me;
static int pipes[MAXR][MAXR][2];  // pipes[from][to]
static char *src, *dst;
static size_t blk;
static _Atomic uint32_t gen, left;

// All R meet here; one that does not come within 20 s (it died) ends the run.
static void pbarrier(void) { proc_barrier(&S->arrive, &S->phase, R, me, 20); }

static void die(const char *what) {
    fprintf(stderr, "rank %d: %s: %s\n", me, what, strerror(errno));
    exit(1);
}

static int worker_way;

// One try each way with peer j, without waiting: our block into its pipe (vmsplice), its
// block out of ours; `sent` and `got` count the bytes so far. Whether both are whole.
static int pipe_step(int j, size_t *sent, size_t *got) {
    if (*sent < blk) {
        struct iovec v = {src + j * blk + *sent, blk - *sent};
        ssize_t n = vmsplice(pipes[me][j][1], &v, 1, SPLICE_F_NONBLOCK);
        if (n > 0) *sent += n;
        else if (errno != EAGAIN) die("vmsplice");
    }
    if (*got < blk) {
        ssize_t n = read(pipes[j][me][0], dst + j * blk + *got, blk - *got);
        if (n > 0) *got += n;
        else if (n == 0 || errno != EAGAIN) die("read");
    }
    return *sent == blk && *got == blk;
}

// The pipes with peer j until both blocks are whole (a thread per peer: pipeT).
static void pipe_pair(int j) {
    size_t sent = 0, got = 0;
    double until = now_us() + 20e6;
    while (!pipe_step(j, &sent, &got)) {
        if (now_us() > until) {
            fprintf(stderr, "rank %d: pipe with %d stalled\n", me, j);
            exit(1);
        }
    }
}

static void pvr_one(int peer) {
    struct iovec l = {dst + peer * blk, blk}, r = {(void *)(S->src[peer] + me * blk), blk};
    if (process_vm_readv(S->pid[peer], &l, 1, &r, 1, 0) != (ssize_t)blk) die("process_vm_readv");
}

static void *worker(void *arg) {
    int peer = (int)(intptr_t)arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t g;
        while ((g = atomic_load(&gen)) == seen) {
        }
        seen = g;
        if (g == UINT32_MAX) return NULL;
        if (worker_way == 1) pvr_one(peer);
        else pipe_pair(peer);
        atomic_fetch_sub(&left, 1);
    }
}

// Every peer's pipes on this thread (pipe): our own block copied, then one try each way with
// every peer in turn until all are whole.
static void run_pipe(void) {
    size_t sent[MAXR] = {0}, got[MAXR] = {0};
    memcpy(dst + me * blk, src + me * blk, blk);
    double until = now_us() + 20e6;
    for (int whole = 0; whole < R - 1;) {
        whole = 0;
        for (int j = 0; j < R; j++)
            if (j != me) whole += pipe_step(j, &sent[j], &got[j]);
        if (now_us() > until) {
            fprintf(stderr, "rank %d: pipes stalled\n", me);
            exit(1);
        }
    }
}

static unsigned char pattern(int rank, int block, size_t i) {
    return (unsigned char)(rank * 31 + block * 7 + (i >> 12) * 13 + i);
}

int main(int argc, char **argv) {
    R = argc > 1 ? atoi(argv[1]) : 4;
    int iters = argc > 2 ? atoi(argv[2]) : 200;
    if (R < 2 || R > MAXR) {
        fprintf(stderr, "R must be 2..%d\n", MAXR);
        return 1;
    }
    S = mmap(NULL, sizeof *S, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (S == MAP_FAILED) die("mmap");
    int pipe_size = argc > 3 ? atoi(argv[3]) : 1 << 20;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            if (i == j) continue;
            if (pipe2(pipes[i][j], O_NONBLOCK) != 0) die("pipe2");
            if (fcntl(pipes[i][j][1], F_SETPIPE_SZ, pipe_size) < 0) die("F_SETPIPE_SZ");
        }
    me = 0;
    for (int r = 1; r < R; r++) {
        pid_t c = fork();
        if (c < 0) die("fork");
        if (c == 0) {
            me = r;
            break;
        }
    }
    S->pid[me] = getpid();
    src = malloc(MAXB);
    dst = malloc(MAXB);
    if (!src || !dst) die("malloc");
    S->src[me] = (uint64_t)(uintptr_t)src;
    static const char *ways[] = {"pvr", "pvrT", "pipe", "stage", "shm", "pipeT"};
    size_t sizes[] = {256u << 10, 512u << 10, 1u << 20, 2u << 20, 4u << 20, 8u << 20};
    double *t = malloc(sizeof(double) * iters);
    if (!me) printf("R=%d pipe=%d %-6s %9s %9s %9s %7s\n", R, pipe_size, "way", "bytes", "med_us", "p10_us", "busGB/s");
    for (int si = 0; si < 6; si++)
        for (int w = 0; w < 6; w++) {
            worker_way = w;
            size_t total = sizes[si];
            blk = total / R / 64 * 64;
            for (int b = 0; b < R; b++)
                for (size_t i = 0; i < blk; i++) src[b * blk + i] = pattern(me, b, i);
            if (w == 4)
                for (int b = 0; b < R; b++) memcpy(S->stage[me] + b * blk, src + b * blk, blk);
            pthread_t th[MAXR];
            atomic_store(&gen, 0);
            if (w == 1 || w == 5)
                for (int j = 0; j < R; j++)
                    if (j != me) pthread_create(&th[j], NULL, worker, (void *)(intptr_t)j);
            for (int it = -10; it < iters; it++) {
                memset(dst, 0xEE, R * blk);  // poisoned before every iteration
                pbarrier();
                double t0 = now_us();
                switch (w) {
                case 0:
                    memcpy(dst + me * blk, src + me * blk, blk);
                    for (int j = 0; j < R; j++)
                        if (j != me) pvr_one(j);
                    break;
                case 1:
                case 5:
                    atomic_store(&left, R - 1);
                    atomic_fetch_add(&gen, 1);
                    memcpy(dst + me * blk, src + me * blk, blk);
                    while (atomic_load(&left) != 0) {
                    }
                    break;
                case 2:
                    run_pipe();
                    break;
                case 3:
                    memcpy(S->stage[me], src, R * blk);
                    pbarrier();
                    for (int j = 0; j < R; j++) memcpy(dst + j * blk, S->stage[j] + me * blk, blk);
                    break;
                case 4:
                    for (int j = 0; j < R; j++) memcpy(dst + j * blk, S->stage[j] + me * blk, blk);
                    break;
                }
                pbarrier();
                if (it >= 0) t[it] = now_us() - t0;
            }
            if (w == 1 || w == 5) {
                atomic_store(&gen, UINT32_MAX);
                for (int j = 0; j < R; j++)
                    if (j != me) pthread_join(th[j], NULL);
            }
            for (int j = 0; j < R; j++)
                for (size_t i = 0; i < blk; i++)
                    if ((unsigned char)dst[j * blk + i] != pattern(j, me, i)) {
                        fprintf(stderr, "rank %d way %s: byte %zu of block %d wrong\n", me, ways[w], i, j);
                        atomic_store(&S->bad, 1);
                        break;
                    }
            pbarrier();
            if (!me) {
                qsort(t, iters, sizeof *t, cmp_double);
                double med = t[iters / 2];
                // busbw of an all_to_all: (R-1)/R of a rank's bytes over the time
                printf("R=%d %-6s %9zu %9.1f %9.1f %7.2f\n", R, ways[w], blk * R, med, t[iters / 10],
                       (double)blk * (R - 1) / med / 1e3);
                fflush(stdout);
            }
        }
    if (me) return 0;
    for (int r = 1; r < R; r++) wait(NULL);
    if (atomic_load(&S->bad)) {
        fprintf(stderr, "some destination held wrong bytes\n");
        return 1;
    }
    return 0;
}
