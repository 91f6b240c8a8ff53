// Collectives over NVLink-mapped peer buffers: one kernel that moves byte segments between
// ranks (all_to_all, all_gather, broadcast, scatter, gather are all segment exchanges) and
// one that reduces (all_reduce one-shot, reduce_scatter, reduce). Compiled with NVRTC when a
// communicator's CUDA path starts (crates/gpu/src/coll.rs), never lazily.
//
// Every rank's buffer starts with a header: a flag per (source rank, block), written by the
// source through its mapping, and this rank's own counters, a u64 per (block, peer): the
// rounds that block has exchanged with that peer so far. Then the data: four buffers of a
// slot per source rank. A call cuts each pair's payload into rounds of one chunk per block;
// round t of a pair travels in buffer t % 4 and is announced by the flag value t + 1
// (release, system scope, after the block's writes). Each block loops: send round i to every
// peer, then wait for round i - 1 from every peer (a deadline, the peer's liveness word) and
// consume it. A block sends round t only after its peer's flag for t - 2 arrived, which the
// peer wrote after consuming t - 4: four buffers keep a pair's rounds from overwriting what
// is still being read. Counters live in device memory, so calls captured in a CUDA graph
// number themselves afresh at every replay.
//
// A wait that passes its deadline, or whose peer's process died, writes a failure (reason,
// operation, peer; racing failures may overwrite each other) into a word of pinned host
// memory that the host reads; every
// other wait gives up when it sees that word set, so the kernel ends. The group is then
// unusable (its counters disagree) and the host says so.

// Point-to-point messages (send / recv) travel in an area of their own after the data, per
// direction, so that two ranks sending to each other at once never mix their bytes: every
// message is cut into 32 KiB chunks spread over `a.p2p_lanes` blocks (chunk c on lane
// c % lanes; the group's size sets the lanes, at most TW_P2P_MAX_LANES, so that a launch's
// blocks stay few enough to be resident together); each (source, lane) has TW_P2P_DEPTH
// slots in the receiver's buffer. Chunk s of a
// lane goes to slot s % DEPTH with a 16-byte header (the message's length and tag), announced
// by the receiver-side word ready[source][lane] = s + 1; the receiver checks the header
// (another length or tag: a failure, reason 3), copies the chunk out and acknowledges with
// ack[receiver][lane] = s + 1 in the sender's buffer; the sender reuses a slot once its
// previous chunk is acknowledged. A message of up to DEPTH * lanes chunks (2 MiB at 16 lanes)
// is sent without waiting for its receiver. Each lane's chunk counts per peer (sent, received) live
// in device memory, so graph replays number afresh. Every operation of a launch has its own
// blocks: a launch's sends and receives progress independently (two ranks that both send
// and receive in one launch never wait on each other's order).
#define TW_P2P_MAX_LANES 64
#define TW_P2P_DEPTH 4ull
#define TW_P2P_CHUNK 32768ull
#define TW_P2P_SLOT (TW_P2P_CHUNK + 16ull)

#define TW_COLL_RANKS 64
#define TW_COLL_BLOCKS 128
#define TW_COLL_BUFS 4ull
#define TW_OFF_FLAGS 0ull
#define TW_OFF_COUNTERS (TW_COLL_RANKS * TW_COLL_BLOCKS * 8ull)
#define TW_OFF_DATA (2ull * TW_COLL_RANKS * TW_COLL_BLOCKS * 8ull)

typedef unsigned long long u64;

struct CollArgs {
    u64 peers[TW_COLL_RANKS];     // each rank's buffer, mapped for this GPU (ours included)
    u64 alive[TW_COLL_RANKS];     // each rank's liveness word (0: none / ourselves)
    u64 send_off[TW_COLL_RANKS];  // bytes of send_base going to each rank
    u64 send_len[TW_COLL_RANKS];
    u64 recv_off[TW_COLL_RANKS];  // where each rank's bytes land in recv_base
    u64 recv_len[TW_COLL_RANKS];  // (reduce: recv_len[r] > 0 marks a contributor; ours is
                                  // the output's length, recv_off[rank] its offset)
    u64 send_base, recv_base;
    u64 err_at;                   // pinned host word: a failure (see tw_fail)
    u64 gate;                     // device word, kept for the process: 0 once the path closed
    u64 stale_at;                 // pinned host word of the group, kept for the process: launches
                                  // that found the gate closed (see tw_gate_open)
    u64 slot;                     // bytes of one (buffer, source) slot
    long long timeout_ns;
    int rank, ranks;
    int dtype, redop;             // reduce only
    int what;                     // the operation, for failure reports
    int chunk_kib;                // most bytes of a block's round, in KiB (0: the slot's share)
    int p2p_lanes;                // point-to-point: blocks per message (the same on every rank)
};

__device__ __forceinline__ char* tw_slot(const CollArgs& a, int owner, u64 round, int src) {
    return (char*)a.peers[owner] + TW_OFF_DATA + ((round % TW_COLL_BUFS) * (u64)a.ranks + (u64)src) * a.slot;
}

// A pair's chunk (bytes per block per round) and rounds: the same on both ranks of the pair,
// which see the same two byte counts.
__device__ __forceinline__ void tw_pair(const CollArgs& a, int j, u64* chunk, u64* rounds) {
    u64 bytes = a.send_len[j] > a.recv_len[j] ? a.send_len[j] : a.recv_len[j];
    if (j == a.rank || bytes == 0) {
        *chunk = 0;
        *rounds = 0;
        return;
    }
    u64 g = gridDim.x;
    u64 most = (a.slot / g) & ~15ull;
    if (a.chunk_kib > 0 && (u64)a.chunk_kib * 1024ull < most) most = (u64)a.chunk_kib * 1024ull;
    u64 c = ((bytes + g - 1) / g + 15ull) & ~15ull;
    if (c > most) c = most;
    *chunk = c;
    *rounds = (bytes + c * g - 1) / (c * g);
}

__device__ __forceinline__ int4 tw_ldcg4(const int4* p) {
    int4 v;
    asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned tw_ldcg32(const unsigned* p) {
    unsigned v;
    asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned short tw_ldcg16(const unsigned short* p) {
    unsigned short v;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned char tw_ldcg8(const unsigned char* p) {
    unsigned short v;
    asm volatile("ld.global.cg.u8 %0, [%1];" : "=h"(v) : "l"(p));
    return (unsigned char)v;
}
__device__ __forceinline__ u64 tw_ldcg64(const u64* p) {
    u64 v;
    asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p));
    return v;
}

// Copies `len` bytes with the whole block (16-byte words when both ends and the length allow,
// four loads in flight per thread before their stores). Loads bypass L1: the source may be a
// slot other GPUs write.
__device__ void tw_copy(char* dst, const char* src, u64 len) {
    const u64 step = blockDim.x;
    if ((((u64)dst | (u64)src | len) & 15ull) == 0) {
        int4* d = (int4*)dst;
        const int4* s = (const int4*)src;
        u64 n = len >> 4, i = threadIdx.x;
        for (; i + 3 * step < n; i += 4 * step) {
            int4 v0 = tw_ldcg4(s + i), v1 = tw_ldcg4(s + i + step), v2 = tw_ldcg4(s + i + 2 * step),
                 v3 = tw_ldcg4(s + i + 3 * step);
            d[i] = v0;
            d[i + step] = v1;
            d[i + 2 * step] = v2;
            d[i + 3 * step] = v3;
        }
        for (; i < n; i += step) d[i] = tw_ldcg4(s + i);
    } else if ((((u64)dst | (u64)src | len) & 3ull) == 0) {
        for (u64 i = threadIdx.x; i < len >> 2; i += step)
            ((unsigned*)dst)[i] = tw_ldcg32((const unsigned*)src + i);
    } else {
        for (u64 i = threadIdx.x; i < len; i += step)
            ((unsigned char*)dst)[i] = tw_ldcg8((const unsigned char*)src + i);
    }
}

// Records a failure unless one is there: reason (1 deadline, 2 the peer's process died) |
// operation << 8 | (peer + 1) << 16 (a check then a store: racing failures may overwrite).
__device__ void tw_fail(const CollArgs& a, unsigned reason, int peer) {
    volatile unsigned* e = (volatile unsigned*)a.err_at;
    if (*e == 0) *e = reason | ((unsigned)a.what << 8) | ((unsigned)(peer + 1) << 16);
    __threadfence_system();
}

// Waits until `*flag >= want`; false on a failure (this one, recorded, or another's). The
// deadline is checked every 256 spins, host memory (the failure word, the peer's liveness)
// read only every TW_HOST_POLL_NS.
__device__ bool tw_wait_flag(const CollArgs& a, const u64* flag, u64 want, int peer) {
    u64 start = tw_now(), polled = start;
    for (unsigned spins = 0;; spins++) {
        if (tw_ld_acquire(flag) >= want) return true;
        if ((spins & 255u) == 255u) {
            const u64 now = tw_now();
            if (tw_host_poll_due(now, &polled)) {
                if (*(volatile const unsigned*)a.err_at != 0) return false;
                if (a.alive[peer] != 0 && *(volatile const unsigned*)a.alive[peer] == 0) {
                    tw_fail(a, 2, peer);
                    return false;
                }
            }
            if ((long long)(now - start) > a.timeout_ns) {
                tw_fail(a, 1, peer);
                return false;
            }
        }
    }
}

// Element types: storage S, computed in C (half types through float; bool as 0/1, where SUM
// and MAX are OR, PRODUCT and MIN are AND).
template <int D> struct Ty;
template <> struct Ty<0> {
    typedef signed char S; typedef int C;
    static __device__ C from(S v) { return v; }
    static __device__ S to(C c) { return (S)c; }
};
template <> struct Ty<1> {
    typedef short S; typedef int C;
    static __device__ C from(S v) { return v; }
    static __device__ S to(C c) { return (S)c; }
};
template <> struct Ty<2> {
    typedef int S; typedef int C;
    static __device__ C from(S v) { return v; }
    static __device__ S to(C c) { return c; }
};
template <> struct Ty<3> {
    typedef long long S; typedef long long C;
    static __device__ C from(S v) { return v; }
    static __device__ S to(C c) { return c; }
};
template <> struct Ty<4> {
    typedef unsigned char S; typedef unsigned C;
    static __device__ C from(S v) { return v; }
    static __device__ S to(C c) { return (S)c; }
};
template <> struct Ty<5> {
    typedef unsigned char S; typedef unsigned C;
    static __device__ C from(S v) { return v != 0; }
    static __device__ S to(C c) { return c != 0; }
};
template <> struct Ty<6> {
    typedef unsigned short S; typedef float C;
    static __device__ C from(S v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
    }
    static __device__ S to(C c) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(c));
        return h;
    }
};
template <> struct Ty<7> {
    typedef unsigned short S; typedef float C;
    static __device__ C from(S v) { return tw_bf16(v); }
    static __device__ S to(C c) { return tw_to_bf16(c); }
};
template <> struct Ty<8> {
    typedef float S; typedef float C;
    static __device__ C from(S v) { return v; }
    static __device__ S to(C c) { return c; }
};
template <> struct Ty<9> {
    typedef double S; typedef double C;
    static __device__ C from(S v) { return v; }
    static __device__ S to(C c) { return c; }
};

// One element of storage type S, loaded around L1.
template <typename S> __device__ __forceinline__ S tw_ldcg_t(const S* p) {
    if (sizeof(S) == 1) {
        unsigned char v = tw_ldcg8((const unsigned char*)p);
        return *(S*)&v;
    } else if (sizeof(S) == 2) {
        unsigned short v = tw_ldcg16((const unsigned short*)p);
        return *(S*)&v;
    } else if (sizeof(S) == 4) {
        unsigned v = tw_ldcg32((const unsigned*)p);
        return *(S*)&v;
    } else {
        u64 v = tw_ldcg64((const u64*)p);
        return *(S*)&v;
    }
}

template <int OP, typename C> __device__ __forceinline__ C tw_op(C acc, C v) {
    if (OP == 0 || OP == 1) return acc + v;
    if (OP == 2) return acc * v;
    if (OP == 3) return v < acc ? v : acc;
    return v > acc ? v : acc;
}

// AVG's last step: the sum divided by the rank count. Integers wrap in their own type first
// (as the host path does), then divide truncating.
template <int D> __device__ __forceinline__ typename Ty<D>::C tw_avg(typename Ty<D>::C acc, int ranks) {
    typedef typename Ty<D>::C C;
    if (D <= 5) acc = Ty<D>::from(Ty<D>::to(acc));
    return acc / (C)ranks;
}

// Sixteen bytes of elements.
template <typename S> union Vec16 {
    int4 v;
    S s[16 / sizeof(S)];
};

// out[e] = src[0][e] op src[1][e] op ... (in rank order: the same result on every rank); AVG
// divides the sum by the rank count (integers truncate). Sixteen bytes a thread, two in
// flight, when every pointer and the length allow; else an element a thread.
template <int D, int OP>
__device__ void tw_reduce_t(char* out, const char* const* src, int nsrc, u64 len, int ranks) {
    typedef typename Ty<D>::S S;
    typedef typename Ty<D>::C C;
    const int L = 16 / sizeof(S);
    u64 align = (u64)out | len;
    for (int s = 0; s < nsrc; s++) align |= (u64)src[s];
    if ((align & 15ull) == 0) {
        const u64 nv = len >> 4, step = blockDim.x;
        for (u64 v = threadIdx.x; v < nv; v += 2 * step) {
            const bool two = v + step < nv;
            Vec16<S> a0, a1, x0, x1;
            a0.v = tw_ldcg4((const int4*)src[0] + v);
            if (two) a1.v = tw_ldcg4((const int4*)src[0] + v + step);
            C c0[16 / sizeof(S)], c1[16 / sizeof(S)];
#pragma unroll
            for (int l = 0; l < L; l++) {
                c0[l] = Ty<D>::from(a0.s[l]);
                c1[l] = two ? Ty<D>::from(a1.s[l]) : c0[l];
            }
            for (int s = 1; s < nsrc; s++) {
                x0.v = tw_ldcg4((const int4*)src[s] + v);
                if (two) x1.v = tw_ldcg4((const int4*)src[s] + v + step);
#pragma unroll
                for (int l = 0; l < L; l++) {
                    c0[l] = tw_op<OP>(c0[l], Ty<D>::from(x0.s[l]));
                    if (two) c1[l] = tw_op<OP>(c1[l], Ty<D>::from(x1.s[l]));
                }
            }
#pragma unroll
            for (int l = 0; l < L; l++) {
                if (OP == 1) {
                    c0[l] = tw_avg<D>(c0[l], ranks);
                    c1[l] = tw_avg<D>(c1[l], ranks);
                }
                a0.s[l] = Ty<D>::to(c0[l]);
                a1.s[l] = Ty<D>::to(c1[l]);
            }
            ((int4*)out)[v] = a0.v;
            if (two) ((int4*)out)[v + step] = a1.v;
        }
        return;
    }
    const u64 n = len / sizeof(S);
    for (u64 e = threadIdx.x; e < n; e += blockDim.x) {
        C acc = Ty<D>::from(tw_ldcg_t((const S*)src[0] + e));
        for (int s = 1; s < nsrc; s++) acc = tw_op<OP>(acc, Ty<D>::from(tw_ldcg_t((const S*)src[s] + e)));
        if (OP == 1) acc = tw_avg<D>(acc, ranks);
        ((S*)out)[e] = Ty<D>::to(acc);
    }
}

template <int D>
__device__ void tw_reduce_d(int op, char* out, const char* const* src, int nsrc, u64 len, int ranks) {
    switch (op) {
        case 0: tw_reduce_t<D, 0>(out, src, nsrc, len, ranks); break;
        case 1: tw_reduce_t<D, 1>(out, src, nsrc, len, ranks); break;
        case 2: tw_reduce_t<D, 2>(out, src, nsrc, len, ranks); break;
        case 3: tw_reduce_t<D, 3>(out, src, nsrc, len, ranks); break;
        default: tw_reduce_t<D, 4>(out, src, nsrc, len, ranks); break;
    }
}

__device__ void tw_reduce(const CollArgs& a, char* out, const char* const* src, int nsrc, u64 len) {
    switch (a.dtype) {
        case 0: tw_reduce_d<0>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 1: tw_reduce_d<1>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 2: tw_reduce_d<2>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 3: tw_reduce_d<3>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 4: tw_reduce_d<4>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 5: tw_reduce_d<5>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 6: tw_reduce_d<6>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 7: tw_reduce_d<7>(a.redop, out, src, nsrc, len, a.ranks); break;
        case 8: tw_reduce_d<8>(a.redop, out, src, nsrc, len, a.ranks); break;
        default: tw_reduce_d<9>(a.redop, out, src, nsrc, len, a.ranks); break;
    }
}

// Whether the path is still open. A launch captured in a CUDA graph keeps its arguments; once
// the group re-formed over other members (or was destroyed) the path's buffers are freed and
// unmapped, and a replay must touch none of them: it finds the gate 0, moves nothing, and
// counts itself in the group's `stale_at`, which the group's next call reports. One verdict
// per block (every thread then returns, or none).
__device__ __forceinline__ bool tw_gate_open(const CollArgs& a) {
    const int closed = __syncthreads_or(*(volatile const unsigned*)a.gate == 0u);
    if (closed && blockIdx.x == 0 && threadIdx.x == 0) atomicAdd_system((unsigned*)a.stale_at, 1u);
    return !closed;
}

// The body of both kernels (REDUCE: the reduce kernel).
template <bool REDUCE>
__device__ void tw_coll(const CollArgs& a) {
    __shared__ u64 base[TW_COLL_RANKS], chunk[TW_COLL_RANKS], rounds[TW_COLL_RANKS];
    __shared__ u64 most;
    __shared__ int failed;
    if (!tw_gate_open(a)) return;
    const int b = blockIdx.x, t = threadIdx.x;
    const u64 g = gridDim.x;
    char* mine = (char*)a.peers[a.rank];
    u64* counters = (u64*)(mine + TW_OFF_COUNTERS) + (u64)b * TW_COLL_RANKS;
    const u64* flags_in = (const u64*)(mine + TW_OFF_FLAGS);
    if (t < a.ranks) {
        base[t] = counters[t];
        tw_pair(a, t, &chunk[t], &rounds[t]);
    }
    if (t == 0) failed = 0;
    __syncthreads();
    if (t == 0) {
        u64 m = 0;
        for (int j = 0; j < a.ranks; j++) m = rounds[j] > m ? rounds[j] : m;
        most = m;
    }
    if (!REDUCE) {
        // Our own segment: a local copy, shared by the blocks.
        const char* src = (const char*)a.send_base + a.send_off[a.rank];
        char* dst = (char*)a.recv_base + a.recv_off[a.rank];
        u64 len = a.recv_len[a.rank];
        if (src != dst && len > 0) {
            u64 piece = ((len + g - 1) / g + 15ull) & ~15ull;
            u64 at = (u64)b * piece;
            if (at < len) tw_copy(dst + at, src + at, len - at < piece ? len - at : piece);
        }
    }
    __syncthreads();
    const u64 last = most;
    for (u64 i = 0; i <= last; i++) {
        if (i < last) {
            for (int j = 0; j < a.ranks; j++) {
                if (i >= rounds[j]) continue;
                u64 c = chunk[j], at = (i * g + (u64)b) * c;
                u64 n = a.send_len[j] > at ? (a.send_len[j] - at < c ? a.send_len[j] - at : c) : 0;
                if (n > 0)
                    tw_copy(tw_slot(a, j, base[j] + i, a.rank) + (u64)b * c,
                            (const char*)a.send_base + a.send_off[j] + at, n);
            }
            __syncthreads();
            if (t == 0) {
                __threadfence_system();
                for (int j = 0; j < a.ranks; j++) {
                    if (i >= rounds[j]) continue;
                    u64* flag = (u64*)((char*)a.peers[j] + TW_OFF_FLAGS) + (u64)a.rank * TW_COLL_BLOCKS + b;
                    tw_st_release(flag, base[j] + i + 1);
                }
            }
        }
        if (i == 0) continue;
        const u64 k = i - 1;
        if (t < a.ranks && k < rounds[t]) {
            if (!tw_wait_flag(a, flags_in + (u64)t * TW_COLL_BLOCKS + b, base[t] + k + 1, t)) failed = 1;
        }
        __syncthreads();
        if (failed) return;
        if (!REDUCE) {
            for (int j = 0; j < a.ranks; j++) {
                if (k >= rounds[j]) continue;
                u64 c = chunk[j], at = (k * g + (u64)b) * c;
                u64 n = a.recv_len[j] > at ? (a.recv_len[j] - at < c ? a.recv_len[j] - at : c) : 0;
                if (n > 0)
                    tw_copy((char*)a.recv_base + a.recv_off[j] + at, tw_slot(a, a.rank, base[j] + k, j) + (u64)b * c, n);
            }
        } else {
            const u64 out_len = a.recv_len[a.rank];
            const char* src[TW_COLL_RANKS];
            int nsrc = 0;
            u64 c = 0;
            for (int j = 0; j < a.ranks; j++) {
                if (j != a.rank && a.recv_len[j] > 0 && k < rounds[j]) c = chunk[j];
            }
            u64 at = (k * g + (u64)b) * c;
            if (c > 0 && at < out_len) {
                for (int j = 0; j < a.ranks; j++) {
                    if (j == a.rank)
                        src[nsrc++] = (const char*)a.send_base + a.send_off[j] + at;
                    else if (a.recv_len[j] > 0)
                        src[nsrc++] = tw_slot(a, a.rank, base[j] + k, j) + (u64)b * c;
                }
                u64 n = out_len - at < c ? out_len - at : c;
                tw_reduce(a, (char*)a.recv_base + a.recv_off[a.rank] + at, src, nsrc, n);
            }
        }
        __syncthreads();
    }
    if (t < a.ranks) counters[t] = base[t] + rounds[t];
}

extern "C" __global__ void __launch_bounds__(512) tw_coll_exchange(CollArgs a) { tw_coll<false>(a); }

extern "C" __global__ void __launch_bounds__(512) tw_coll_reduce(CollArgs a) { tw_coll<true>(a); }

// The point-to-point area of rank `owner`'s buffer (after the collectives' data).
__device__ __forceinline__ char* tw_p2p(const CollArgs& a, int owner) {
    return (char*)a.peers[owner] + TW_OFF_DATA + TW_COLL_BUFS * (u64)a.ranks * a.slot;
}

// Word `table` (0 ready, 1 ack, 2 sent, 3 received) of (rank `r`, `lane`) in `owner`'s area.
__device__ __forceinline__ u64* tw_p2p_word(const CollArgs& a, int owner, int table, int r, int lane) {
    return (u64*)tw_p2p(a, owner) + ((u64)table * TW_COLL_RANKS + (u64)r) * TW_P2P_MAX_LANES + (u64)lane;
}

// The slot of chunk `seq` of (source `src`, `lane`) in the receiver `owner`'s area.
__device__ __forceinline__ char* tw_p2p_slot(const CollArgs& a, int owner, int src, int lane, u64 seq) {
    return tw_p2p(a, owner) + 4ull * TW_COLL_RANKS * TW_P2P_MAX_LANES * 8ull +
           (((u64)src * (u64)a.p2p_lanes + (u64)lane) * TW_P2P_DEPTH + seq % TW_P2P_DEPTH) * TW_P2P_SLOT;
}

// Sends and receives: `send_off[j]` / `recv_off[j]` are the message's device address (not an
// offset), `send_len[j]` / `recv_len[j]` its bytes + 1 in the low 48 bits (0: no message with
// rank j) and its tag above. The operations are the sends in rank order, then the receives;
// `a.p2p_lanes` blocks each (block b: operation b / lanes, lane b % lanes).
// Two blocks an SM at least (at most 64 registers a thread): a launch's blocks must all be
// resident at once (see p2p_lanes in coll.rs).
extern "C" __global__ void __launch_bounds__(512, 2) tw_coll_p2p(CollArgs a) {
    __shared__ int peer, sending, failed;
    __shared__ u64 base;
    if (!tw_gate_open(a)) return;
    const int lanes = a.p2p_lanes, t = threadIdx.x, lane = blockIdx.x % lanes;
    if (t == 0) {
        const int want = blockIdx.x / lanes;
        int k = 0;
        peer = -1;
        sending = 0;
        for (int j = 0; j < a.ranks && peer < 0; j++)
            if (a.send_len[j] != 0 && k++ == want) peer = j, sending = 1;
        for (int j = 0; j < a.ranks && peer < 0; j++)
            if (a.recv_len[j] != 0 && k++ == want) peer = j;
        failed = 0;
        if (peer >= 0) base = *tw_p2p_word(a, a.rank, sending ? 2 : 3, peer, lane);
    }
    __syncthreads();
    if (peer < 0) return;
    const int j = peer;
    const u64 word = sending ? a.send_len[j] : a.recv_len[j];
    const u64 len = (word & 0xffffffffffffull) - 1ull, tag = word >> 48;
    const u64 nch = len == 0 ? 1ull : (len + TW_P2P_CHUNK - 1ull) / TW_P2P_CHUNK;
    const u64 m = nch / (u64)lanes + ((u64)lane < nch % (u64)lanes ? 1ull : 0ull);
    for (u64 i = 0; i < m; i++) {
        const u64 seq = base + i, at = ((u64)lane + i * (u64)lanes) * TW_P2P_CHUNK;
        const u64 n = len > at ? (len - at < TW_P2P_CHUNK ? len - at : TW_P2P_CHUNK) : 0ull;
        if (sending) {
            // The slot is free once the receiver acknowledged the chunk DEPTH before.
            if (t == 0 && seq >= TW_P2P_DEPTH &&
                !tw_wait_flag(a, tw_p2p_word(a, a.rank, 1, j, lane), seq + 1ull - TW_P2P_DEPTH, j))
                failed = 1;
            __syncthreads();
            if (failed) return;
            char* slot = tw_p2p_slot(a, j, a.rank, lane, seq);
            if (t == 0) {
                ((volatile u64*)slot)[0] = len;
                ((volatile u64*)slot)[1] = tag;
            }
            if (n) tw_copy(slot + 16, (const char*)a.send_off[j] + at, n);
            __syncthreads();
            if (t == 0) {
                __threadfence_system();
                tw_st_release(tw_p2p_word(a, j, 0, a.rank, lane), seq + 1ull);
            }
        } else {
            if (t == 0 && !tw_wait_flag(a, tw_p2p_word(a, a.rank, 0, j, lane), seq + 1ull, j)) failed = 1;
            __syncthreads();
            if (failed) return;
            const char* slot = tw_p2p_slot(a, a.rank, j, lane, seq);
            if (t == 0 && (tw_ldcg64((const u64*)slot) != len || tw_ldcg64((const u64*)slot + 1) != tag)) {
                tw_fail(a, 3, j);
                failed = 1;
            }
            __syncthreads();
            if (failed) return;
            if (n) tw_copy((char*)a.recv_off[j] + at, slot + 16, n);
            __syncthreads();
            if (t == 0) {
                __threadfence_system();
                tw_st_release(tw_p2p_word(a, j, 1, a.rank, lane), seq + 1ull);
            }
        }
    }
    if (t == 0) *tw_p2p_word(a, a.rank, sending ? 2 : 3, j, lane) = base + m;
}
