// Expert-parallel dispatch and combine (low-latency form) over NVLink-mapped peer buffers.
// Compiled with NVRTC when an EP buffer is created (crates/gpu/src/ep.rs), never lazily.
//
// Every rank's buffer holds, per parity (calls alternate), a dispatch area (a signal per
// (local expert, source rank); T rows per source rank, row t its token t, written once however
// many of our experts the token selects; per (local expert, source rank) the source tokens
// that select the expert, in token order), a combine area (a signal per global expert; a row
// per (global expert, token)) and the sender's own per-expert completion counters. Senders write rows straight
// into the receiver's buffer through its mapping, then publish a signal tagged with the
// call's sequence number (release, system scope); receivers wait for the tag with a deadline
// (globaltimer) and the sender's liveness word. A sender that misses the deadline, or whose
// process died, is marked inactive in the caller's `active` tensor and counts as sending
// nothing from then on.

#define TW_MAX_RANKS 64
#define TW_MAX_TOPK 16
#define TW_MAX_EXPERTS 1024
// Tokens one dispatch-send block handles at most (the host sizes the grid so).
#define TW_SEND_TOKENS 32

// Every rank's buffer as this GPU reaches it, in device memory that the host rewrites when the
// membership changes (between calls, every buffer new): a call captured in a CUDA graph reads
// the buffers in force at each replay, not those of its capture. Each kernel copies it into
// shared memory first.
struct EpTable {
    unsigned long long peers[TW_MAX_RANKS];  // each rank's buffer, mapped for this GPU (0: absent)
    unsigned long long alive[TW_MAX_RANKS];  // each rank's liveness word (0: none / ourselves)
    unsigned long long half;                 // bytes of one parity
    unsigned long long marks;                // host-mapped u32 per rank: times a wait marked
                                             // it inactive (0: not counted)
};
#define TW_TABLE_WORDS (2 * TW_MAX_RANKS + 2)

struct EpArgs {
    unsigned long long table;                // the EpTable (device memory)
    unsigned long long seq_at;               // device word holding the call's number (from 1;
                                             // parity = seq & 1), set by the dispatch send
    unsigned long long need;                 // bytes of one parity the call's layout uses
    unsigned long long off_dsig, off_ddata, off_dsrc, off_csig, off_cdata, off_fin;
    long long timeout_ns;
    int rank, ranks, experts, local_experts, max_tokens, hidden, topk, num_tokens;
    int fp8;     // dispatch rows as e4m3 + one fp32 scale per 128 channels (else bf16)
    int slices;  // dispatch send: parts each token's row is cut into (one warp each)
    int shape;   // 16 bits naming the call's shape (tokens, hidden, experts, fp8): in every
                 // signal, so that a rank that called with another shape is not read
};

// Adds 1 with acquire-release semantics at GPU scope: our earlier writes (the warp's, after
// __syncwarp) are ordered before it, and the one that completes a count sees all of them.
__device__ __forceinline__ unsigned tw_add_acq_rel(unsigned* p) {
    unsigned old;
    asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(old) : "l"(p) : "memory");
    return old;
}

__device__ __forceinline__ char* tw_base(const EpTable& t, int r, unsigned long long seq) {
    return (char*)t.peers[r] + (seq & 1ull) * t.half;
}

// The table's word `threadIdx.x` (0 past its end), loaded as early as a kernel can: the load is
// in flight during whatever the kernel does before `tw_table_store` needs it.
__device__ __forceinline__ unsigned long long tw_table_word(const EpArgs& a) {
    return threadIdx.x < TW_TABLE_WORDS ? ((const unsigned long long*)a.table)[threadIdx.x] : 0ull;
}

// The table into shared memory (`word` from `tw_table_word`; the rest loaded here where the
// block has fewer threads than words): every thread of the block calls it, and a barrier
// follows before anything reads `t`.
__device__ __forceinline__ void tw_table_store(const EpArgs& a, EpTable* t, unsigned long long word) {
    unsigned long long* to = (unsigned long long*)t;
    if (threadIdx.x < TW_TABLE_WORDS) to[threadIdx.x] = word;
    for (int i = threadIdx.x + blockDim.x; i < TW_TABLE_WORDS; i += blockDim.x)
        to[i] = ((const unsigned long long*)a.table)[i];
}

__device__ __forceinline__ void tw_table_in(const EpArgs& a, EpTable* t) {
    tw_table_store(a, t, tw_table_word(a));
}

// After the table's barrier: whether the buffers hold the call's layout. A call captured in a
// graph before the membership changed to smaller buffers does not fit: it then takes part in
// nothing — block 0 marks every other rank inactive in `active` (what the caller reads) and
// every block returns.
__device__ __forceinline__ bool tw_fits(const EpArgs& a, const EpTable& t, int* active) {
    if (t.half >= a.need) return true;
    if (blockIdx.x == 0)
        for (int r = threadIdx.x; r < a.ranks; r += blockDim.x)
            if (r != a.rank) atomicExch(&active[r], 0);
    return false;
}

// The call's number, written by the dispatch send earlier on the stream (so a CUDA-graph replay
// runs with a fresh one).
__device__ __forceinline__ unsigned long long tw_seq(const EpArgs& a) {
    return *(volatile const unsigned long long*)a.seq_at;
}

// A signal: the call's number (low 32 bits) above the call's shape (16 bits) above a count
// (at most the tokens per rank, 1,024).
__device__ __forceinline__ unsigned long long tw_signal(const EpArgs& a, unsigned long long seq, unsigned count) {
    return ((seq & 0xffffffffull) << 32) | ((unsigned long long)(a.shape & 0xffff) << 16) |
           (unsigned long long)(count & 0xffffu);
}

// Expert `k` of token `t`, or -1 when it is out of range or repeats an earlier expert of the
// token's row: a token reaches an expert once, so an expert's count and positions stay below
// the tokens (a repeated expert would otherwise write past its list).
__device__ __forceinline__ long long tw_sel(const long long* topk, long long t, int k, int K, int E) {
    const long long* r = topk + t * K;
    const long long e = r[k];
    if (e < 0 || e >= E) return -1;
    for (int j = 0; j < k; j++)
        if (r[j] == e) return -1;
    return e;
}

// `active[r]` as it is now (another block, the host or a peer's failure may clear it at any
// time): every read of the flag goes through here. Kernels that need it early read it before
// the table's barrier (its load in flight with the table's).
__device__ __forceinline__ int tw_flag(const int* active, int r) {
    return *(volatile const int*)&active[r];
}

// Whether rank `r` takes part in this call: the caller's `active` says so and its buffer is
// mapped (a rank outside the group's view when the buffers were exchanged has none: address
// 0, never written or waited for).
__device__ __forceinline__ bool tw_active(const EpTable& t, const int* active, int r) {
    return t.peers[r] != 0 && tw_flag(active, r) != 0;
}

// Rank `from` no longer takes part in this call (nor, through the caller's `active`, in the
// next): marked inactive, counted once per transition (what the metrics read on the host),
// and with `shape`, counted apart as a call of another shape (the host names it).
__device__ void tw_drop(const EpArgs& a, const EpTable& t, int from, int* active, bool shape) {
    if (atomicExch(&active[from], 0) != 0 && t.marks != 0) {
        atomicAdd_system((unsigned*)t.marks + from, 1u);
        if (shape) atomicAdd_system((unsigned*)t.marks + a.ranks + from, 1u);
    }
}

// Waits until `*sig` carries the call `seq` in its high 32 bits; returns its count, or -1 when
// rank `from` died, is marked inactive, the deadline passed, or its signal names another
// shape of call (it is then marked inactive in `active`: its rows are laid out for another
// shape and are not read). The deadline and `active` (device memory) are checked every 256
// spins, the peer's liveness word (host memory) only every TW_HOST_POLL_NS.
__device__ long long tw_wait(const EpArgs& a, const EpTable& t, const unsigned long long* sig,
                             unsigned long long seq, int from, int* active) {
    const unsigned long long tag = seq & 0xffffffffull;
    unsigned long long start = tw_now(), polled = start;
    for (unsigned spins = 0;; spins++) {
        unsigned long long v = tw_ld_acquire(sig);
        if ((v >> 32) == tag) {
            if (((v >> 16) & 0xffffull) == (unsigned long long)(a.shape & 0xffff)) return (long long)(v & 0xffffull);
            tw_drop(a, t, from, active, true);
            return -1;
        }
        if ((spins & 255u) == 255u) {
            const unsigned long long now = tw_now();
            bool dead = t.alive[from] != 0 && tw_host_poll_due(now, &polled) &&
                        *(volatile const unsigned*)t.alive[from] == 0;
            if (dead || (long long)(now - start) > a.timeout_ns || tw_flag(active, from) == 0) {
                tw_drop(a, t, from, active, false);
                return -1;
            }
        }
    }
}

// Two floats to two e4m3 (saturating, round to nearest even): `hi` in the upper byte.
__device__ __forceinline__ unsigned tw_e4m3x2(float hi, float lo) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

// The eight bf16 of `v` as floats.
__device__ __forceinline__ void tw_unpack8(const int4& v, float* f) {
    const unsigned w[4] = {(unsigned)v.x, (unsigned)v.y, (unsigned)v.z, (unsigned)v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Dispatch, send phase. Blocks take contiguous token ranges; warps take (token, slice of its
// row). Each token is read and quantized once and written once to every other rank that owns
// an expert it selects (its row `t` of our rows there), and its index at the position that
// keeps each (expert, source) list in token order. A per-expert counter
// (ours, in this parity) counts the finished (token, slice) pieces; the piece that completes
// an expert publishes its signal (`seq`, tokens) at the owner.
//
// Our own tokens for our own experts go straight into `recv_x` (and `recv_scales`,
// `src_info`), at the start of each local expert's rows: the receive kernel then copies only
// what other ranks sent.
//
// The kernel numbers the call: `counter[0]` is the buffer's last call number, `counter[1]` the
// blocks of this launch that are done. Every block reads `counter[0] + 1` at its start; the
// last block to finish stores it into `counter[0]` and the call's `seq_at` (which the later
// kernels of the call read), so a CUDA-graph replay numbers its calls afresh.
extern "C" __global__ void __launch_bounds__(1024) tw_ep_dispatch_send(EpArgs a, const unsigned short* x,
                                                                      const long long* topk, int* active,
                                                                      unsigned short* recv_x, float* recv_scales,
                                                                      int* src_info, unsigned long long* counter) {
    __shared__ int before[TW_MAX_EXPERTS];  // tokens before ours that select e (then: next position)
    __shared__ int total[TW_MAX_EXPERTS];   // our tokens that select e
    __shared__ int pos[TW_SEND_TOKENS * TW_MAX_TOPK];
    __shared__ EpTable tab;
    const int E = a.experts, K = a.topk, T = a.num_tokens, H = a.hidden;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int per_block = (T + gridDim.x - 1) / gridDim.x;
    const int t0 = min(T, (int)blockIdx.x * per_block), t1 = min(T, t0 + per_block);
    const unsigned long long seq = *(volatile const unsigned long long*)counter + 1ull;
    // The table's load in flight during the count (which does not read it; it only fills
    // shared memory): stored, and checked, at the count's barrier.
    const unsigned long long word = tw_table_word(a);
    for (int e = threadIdx.x; e < E; e += blockDim.x) before[e] = total[e] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < T * K; i += blockDim.x) {
        const long long e = tw_sel(topk, i / K, i % K, K, E);
        if (e >= 0) {
            atomicAdd(&total[e], 1);
            if (i < t0 * K) atomicAdd(&before[e], 1);
        }
    }
    tw_table_store(a, &tab, word);
    __syncthreads();
    if (!tw_fits(a, tab, active)) return;  // unnumbered: the call's later kernels see it too
    if (warp == 0) {
        // In token order: each selection's position in its expert's list.
        for (int t = t0; t < t1; t++) {
            int p = -1;
            if (lane < K) {
                const long long e = tw_sel(topk, t, lane, K, E);
                if (e >= 0) p = atomicAdd(&before[e], 1);
                pos[(t - t0) * K + lane] = p;
            }
            __syncwarp();
        }
    }
    // Experts we send nothing: their signal now (count 0), spread over the grid.
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) {
        const int dst = e / a.local_experts;
        if (total[e] == 0 && tw_active(tab, active, dst)) {
            char* base = tw_base(tab, dst, seq);
            unsigned long long slot = (unsigned long long)(e % a.local_experts) * a.ranks + a.rank;
            tw_st_release((unsigned long long*)(base + a.off_dsig) + slot, tw_signal(a, seq, 0));
        }
    }
    __syncthreads();
    unsigned* fin = (unsigned*)(tw_base(tab, a.rank, seq) + a.off_fin);
    const unsigned long long row = (unsigned long long)H * 2;  // a dispatch row's stride
    const int steps = (H + 511) / 512;                          // 512 channels per warp step
    const int S = a.slices, per_slice = (steps + S - 1) / S;
    for (int task = warp; task < (t1 - t0) * S; task += warps) {
        const int tl = task / S, sl = task % S, t = t0 + tl;
        // Lane k < K holds where selection k's row goes (null: nowhere — no selection, an
        // inactive rank, or a rank an earlier selection of this token already writes to),
        // where its row's first scale goes and the stride of the next ones (floats); the warp
        // reads them by shuffle (registers: no shared-memory load between the stores).
        long long e = -1;
        char* r = nullptr;
        float* sp = nullptr;
        unsigned long long ss = 1;
        int dst = -1;
        if (lane < K) {
            e = tw_sel(topk, t, lane, K, E);
            if (e >= 0) dst = (int)(e / a.local_experts);
        }
        // The row crosses to another rank once: the first selection of that rank writes it.
        bool first = true;
        for (int j = 0; j < K; j++) {
            const int dj = __shfl_sync(0xffffffffu, dst, j);
            if (j < lane && dj == dst) first = false;
        }
        if (lane < K) {
            if (e >= 0) {
                const int el = (int)(e % a.local_experts);
                const int p = pos[tl * K + lane];
                if (dst == a.rank) {
                    // Ours: the first rows of the expert's block in the output.
                    const unsigned long long col = (unsigned long long)a.ranks * a.max_tokens;
                    const unsigned long long at = (unsigned long long)el * col + p;
                    r = (char*)recv_x + at * (a.fp8 ? (unsigned long long)H : 2ull * H);
                    sp = recv_scales + (unsigned long long)el * (H / 128) * col + p;
                    ss = col;
                    if (sl == 0) src_info[at] = t;
                } else if (tw_active(tab, active, dst)) {
                    char* base = tw_base(tab, dst, seq);
                    const unsigned long long slot = (unsigned long long)el * a.ranks + a.rank;
                    if (first) {
                        r = base + a.off_ddata + ((unsigned long long)a.rank * a.max_tokens + t) * row;
                        sp = (float*)(r + H);
                    }
                    if (sl == 0) ((int*)(base + a.off_dsrc))[slot * a.max_tokens + p] = t;
                }
            } else {
                e = -1;
            }
        }
        const unsigned short* in = x + (unsigned long long)t * H;
        const int s_end = min(steps, (sl + 1) * per_slice);
        for (int step = sl * per_slice; step < s_end; step++) {
            const int c = step * 512 + lane * 16;  // this lane's 16 channels
            const bool ok = c < H;
            int4 v0 = make_int4(0, 0, 0, 0), v1 = v0;
            if (ok) {
                v0 = ((const int4*)(in + c))[0];
                v1 = ((const int4*)(in + c))[1];
            }
            if (a.fp8) {
                float f[16];
                tw_unpack8(v0, f);
                tw_unpack8(v1, f + 8);
                float amax = 0.f;
#pragma unroll
                for (int i = 0; i < 16; i++) amax = fmaxf(amax, fabsf(f[i]));
                // A 128-channel group is 8 lanes.
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
                const float scale = fmaxf(amax, 1e-4f) / 448.f, inv = 1.f / scale;
                int4 q;
                q.x = (int)(tw_e4m3x2(f[1] * inv, f[0] * inv) | (tw_e4m3x2(f[3] * inv, f[2] * inv) << 16));
                q.y = (int)(tw_e4m3x2(f[5] * inv, f[4] * inv) | (tw_e4m3x2(f[7] * inv, f[6] * inv) << 16));
                q.z = (int)(tw_e4m3x2(f[9] * inv, f[8] * inv) | (tw_e4m3x2(f[11] * inv, f[10] * inv) << 16));
                q.w = (int)(tw_e4m3x2(f[13] * inv, f[12] * inv) | (tw_e4m3x2(f[15] * inv, f[14] * inv) << 16));
                // Every row's bytes first, then the scales (a lane per 128 channels).
                for (int k = 0; k < K; k++) {
                    char* rk = (char*)__shfl_sync(0xffffffffu, (unsigned long long)r, k);
                    if (ok && rk != nullptr) *(int4*)(rk + c) = q;
                }
                for (int k = 0; k < K; k++) {
                    float* sk = (float*)__shfl_sync(0xffffffffu, (unsigned long long)sp, k);
                    const unsigned long long st = __shfl_sync(0xffffffffu, ss, k);
                    if (ok && sk != nullptr && (lane & 7) == 0) sk[(c >> 7) * st] = scale;
                }
            } else {
                for (int k = 0; k < K; k++) {
                    char* rk = (char*)__shfl_sync(0xffffffffu, (unsigned long long)r, k);
                    if (ok && rk != nullptr) {
                        ((int4*)(rk + 2 * c))[0] = v0;
                        ((int4*)(rk + 2 * c))[1] = v1;
                    }
                }
            }
        }
        // Our rows (every lane writes a part of each; a row at another rank serves every
        // expert of that rank the token selects, so each of those experts counts this piece)
        // before the count (release, GPU scope); the piece that
        // completes the count has seen every piece's rows (acquire), and a system-scope fence
        // orders them all before the signal.
        __syncwarp();
        if (e >= 0) {
            const unsigned done = tw_add_acq_rel(&fin[e]) + 1u;
            if (done == (unsigned)total[e] * (unsigned)S) {
                atomicExch(&fin[e], 0u);  // every piece of this call is in: ready for the next
                __threadfence_system();
                const int dst = (int)(e / a.local_experts);
                if (tw_active(tab, active, dst)) {
                    char* base = tw_base(tab, dst, seq);
                    const unsigned long long slot = (unsigned long long)(e % a.local_experts) * a.ranks + a.rank;
                    tw_st_release((unsigned long long*)(base + a.off_dsig) + slot, tw_signal(a, seq, total[e]));
                }
            }
        }
        __syncwarp();
    }
    // The call's number, once every block has read the previous one (above, at its start).
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(counter + 1, 1ull) + 1ull == (unsigned long long)gridDim.x) {
            __threadfence();  // after every block's count (acquire side of the fences above)
            counter[1] = 0;
            counter[0] = seq;
            *(unsigned long long*)a.seq_at = seq;
        }
    }
}

// Dispatch, receive phase: one block per local expert. A thread per source waits for its
// signal; the rows are packed into `recv_x` with our own first (already there), then the
// other ranks' in rank order from ours (rank + 1, ..., wrapping), a warp per row, each found
// through the expert's list of the source's tokens.
extern "C" __global__ void __launch_bounds__(1024) tw_ep_dispatch_recv(EpArgs a, unsigned short* recv_x, int* src_info,
                                                                     long long* layout_range, int* recv_count,
                                                                     int* active, float* recv_scales) {
    __shared__ int cnt[TW_MAX_RANKS], beg[TW_MAX_RANKS + 1];  // by position: source (rank + o) % R
    __shared__ EpTable tab;
    const int el = blockIdx.x, R = a.ranks, H = a.hidden;
    // Both loads in flight at once: the call's number does not depend on the table.
    const unsigned long long seq = tw_seq(a);
    const int on = (int)threadIdx.x < R ? tw_flag(active, (a.rank + (int)threadIdx.x) % R) : 0;
    tw_table_in(a, &tab);
    __syncthreads();
    if (!tw_fits(a, tab, active)) {
        // Nothing received (what the combine then reads).
        for (int s = threadIdx.x; s < R; s += blockDim.x) layout_range[(unsigned long long)el * R + s] = 0;
        if (threadIdx.x == 0) recv_count[el] = 0;
        return;
    }
    char* base = tw_base(tab, a.rank, seq);
    for (int o = threadIdx.x; o < R; o += blockDim.x) {
        const int s = (a.rank + o) % R;
        const unsigned long long slot = (unsigned long long)el * R + s;
        long long got = -1;
        // The flag read above for this thread's first source; later ones (more ranks than
        // threads) now.
        if (tab.peers[s] != 0 && (o == (int)threadIdx.x ? on : tw_flag(active, s)) != 0)
            got = tw_wait(a, tab, (const unsigned long long*)(base + a.off_dsig) + slot, seq, s, active);
        cnt[o] = got < 0 ? 0 : min((int)got, a.max_tokens);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int o = 0; o < R; o++) {
            beg[o] = run;
            run += cnt[o];
        }
        beg[R] = run;
        recv_count[el] = run;
    }
    __syncthreads();
    for (int o = threadIdx.x; o < R; o += blockDim.x)
        layout_range[(unsigned long long)el * R + (a.rank + o) % R] = ((long long)beg[o] << 32) | (long long)cnt[o];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned long long row = (unsigned long long)H * 2;
    const unsigned long long out_row = a.fp8 ? (unsigned long long)H : row;
    const int per = (int)(out_row / 16), groups = H / 128;
    const unsigned long long col = (unsigned long long)R * a.max_tokens;
    // Our own rows are in place (the send kernel wrote them); the others' follow.
    for (int r = beg[1] + warp; r < beg[R]; r += warps) {
        int o = 1;
        while (r >= beg[o + 1]) o++;
        const int s = (a.rank + o) % R, j = r - beg[o];
        const unsigned long long slot = (unsigned long long)el * R + s;
        // The sender's token (kept inside its rows whatever a peer wrote).
        const int t = min(max(((const int*)(base + a.off_dsrc))[slot * a.max_tokens + j], 0), a.max_tokens - 1);
        const char* data = base + a.off_ddata + ((unsigned long long)s * a.max_tokens + t) * row;
        int4* out = (int4*)((char*)recv_x + ((unsigned long long)el * col + r) * out_row);
        int v = lane;
        for (; v + 96 < per; v += 128) {
            const int4 q0 = ((const int4*)data)[v], q1 = ((const int4*)data)[v + 32];
            const int4 q2 = ((const int4*)data)[v + 64], q3 = ((const int4*)data)[v + 96];
            out[v] = q0;
            out[v + 32] = q1;
            out[v + 64] = q2;
            out[v + 96] = q3;
        }
        for (; v < per; v += 32) out[v] = ((const int4*)data)[v];
        if (a.fp8) {
            // Scales `[local_experts, hidden / 128, ranks · max_tokens]` (the column-major
            // layout of `[local_experts, ranks · max_tokens, hidden / 128]`).
            for (int g = lane; g < groups; g += 32)
                recv_scales[((unsigned long long)el * groups + g) * col + r] = ((const float*)(data + H))[g];
        }
        if (lane == 0) src_info[(unsigned long long)el * col + r] = t;
    }
}

// Combine send: piece `task` of the block's rows (of `tasks`) into `q` (this lane's four
// 16-byte words of it); returns the token it is for (-1: no such piece).
__device__ __forceinline__ int tw_piece(const char* rows, const int* info, unsigned long long row, int per,
                                        int chunks, int lane, int task, int tasks, int4* q) {
    if (task >= tasks) return -1;
    const int j = task / chunks;
    const int4* src = (const int4*)(rows + (unsigned long long)j * row);
    const int v = (task % chunks) * 128 + lane;
#pragma unroll
    for (int i = 0; i < 4; i++)
        if (v + 32 * i < per) q[i] = src[v + 32 * i];
    return info[j];
}

// Combine, send phase: one block per (local expert, home rank): the expert's output rows for
// that rank's tokens into its combine area (row of (expert, token)), then the expert's signal
// there, with or without rows.
//
// Two blocks per SM (at most 32 registers a thread): its grid is a block per (local expert,
// rank), 256 at E = 256, which at 46 registers (one block per SM) took two waves on 132 SMs.
extern "C" __global__ void __launch_bounds__(1024, 2) tw_ep_combine_send(EpArgs a, const unsigned short* y, const int* src_info,
                                                                    const long long* layout_range, int* active) {
    __shared__ EpTable tab;
    const int el = blockIdx.x / a.ranks, s = blockIdx.x % a.ranks;
    // The loads that do not depend on the table in flight with it.
    const unsigned long long seq = tw_seq(a);
    const unsigned long long slot = (unsigned long long)el * a.ranks + s;
    const long long range = layout_range[slot];
    const int on = tw_flag(active, s);
    const unsigned long long word = tw_table_word(a);
    const int begin = (int)(range >> 32), most = a.ranks * a.max_tokens;
    // A range outside the expert's rows (a corrupt handle) is clamped to them.
    const int n = (begin < 0 || begin > most) ? 0 : min((int)(range & 0xffffffffll), most - begin);
    const unsigned long long row = (unsigned long long)a.hidden * 2;
    const unsigned long long first = (unsigned long long)el * a.ranks * a.max_tokens + begin;
    const char* rows = (const char*)y + first * row;
    const int* info = src_info + first;
    // Pieces of 2 KiB (a warp, four 16-byte words a lane): each warp's first piece is loaded
    // before the table's barrier (at T = 128 most warps have one), the next one after each
    // piece's stores.
    const int per = (int)(row / 16), chunks = (per + 127) / 128;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int4 q[4];
    int task = warp;
    int tok = tw_piece(rows, info, row, per, chunks, lane, task, n * chunks, q);
    tw_table_store(a, &tab, word);
    // The barrier also makes the flag one verdict for the block (each thread read it; a
    // thread that left early would miss the barrier before the signal).
    const int all_on = __syncthreads_and(on != 0);
    if (!tw_fits(a, tab, active) || tab.peers[s] == 0 || !all_on) return;
    const int e = a.rank * a.local_experts + el;
    char* base = tw_base(tab, s, seq);
    char* cdata = base + a.off_cdata + (unsigned long long)e * a.max_tokens * row;
    for (; task < n * chunks; task += warps) {
        // A token number outside the call (a corrupt handle) is skipped, not written.
        if ((unsigned)tok < (unsigned)a.max_tokens) {
            int4* dst = (int4*)(cdata + (unsigned long long)tok * row);
            const int v = (task % chunks) * 128 + lane;
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (v + 32 * i < per) dst[v + 32 * i] = q[i];
        }
        tok = tw_piece(rows, info, row, per, chunks, lane, task + warps, n * chunks, q);
    }
    // Every thread's rows before the signal: the barrier orders them before thread 0's
    // system-scope fence (cumulative), which orders them before the signal.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence_system();
        tw_st_release((unsigned long long*)(base + a.off_csig) + e, tw_signal(a, seq, 0));
    }
}

// Combine, receive phase: one block per token (waits for the signals of its experts, then the
// weighted sum in fp32), and one more block that waits for every expert's signal, so that the
// call ends only when every rank is done with this half (a rank that has not yet read what we
// sent it must not see it overwritten by our next call on this half).
extern "C" __global__ void __launch_bounds__(1024) tw_ep_combine_recv(EpArgs a, const long long* topk, const float* weights,
                                                                     unsigned short* out, int* active) {
    __shared__ const int4* rows[TW_MAX_TOPK];
    __shared__ float wk[TW_MAX_TOPK];
    __shared__ int nk;
    __shared__ EpTable tab;
    const int t = blockIdx.x;
    // The loads that do not depend on the table in flight with it: the call's number, and
    // the token's experts (as in the dispatch, a repeated expert of the row counts once).
    const unsigned long long seq = tw_seq(a);
    const long long sel = t < a.num_tokens && threadIdx.x < (unsigned)a.topk
                              ? tw_sel(topk, t, threadIdx.x, a.topk, a.experts)
                              : -1;
    const int on = sel >= 0 ? tw_flag(active, (int)(sel / a.local_experts)) : 0;
    tw_table_in(a, &tab);
    __syncthreads();
    if (!tw_fits(a, tab, active)) {
        // Nothing combined: the token's row is zeros.
        if (t < a.num_tokens)
            for (int v = threadIdx.x; v < a.hidden / 8; v += blockDim.x)
                ((int4*)(out + (long long)t * a.hidden))[v] = make_int4(0, 0, 0, 0);
        return;
    }
    char* base = tw_base(tab, a.rank, seq);
    if (t == a.num_tokens) {
        for (int e = threadIdx.x; e < a.experts; e += blockDim.x) {
            const int owner = e / a.local_experts;
            if (tw_active(tab, active, owner))
                tw_wait(a, tab, (const unsigned long long*)(base + a.off_csig) + e, seq, owner, active);
        }
        return;
    }
    const unsigned long long row = (unsigned long long)a.hidden * 2;
    if (threadIdx.x < 32) {
        const long long e = sel;
        int ok = 0;
        if (e >= 0) {
            int owner = (int)(e / a.local_experts);
            if (tab.peers[owner] != 0 && on != 0)
                ok = tw_wait(a, tab, (const unsigned long long*)(base + a.off_csig) + e, seq, owner, active) >= 0;
        }
        // The valid slots, compacted in slot order (the sum's order is the same on every call).
        unsigned mask = __ballot_sync(0xffffffffu, ok);
        if (ok) {
            int at = __popc(mask & ((1u << threadIdx.x) - 1u));
            rows[at] = (const int4*)(base + a.off_cdata + ((unsigned long long)e * a.max_tokens + t) * row);
            wk[at] = weights[(long long)t * a.topk + threadIdx.x];
        }
        if (threadIdx.x == 0) nk = __popc(mask);
    }
    __syncthreads();
    // Eight channels per thread and step: one 16-byte load per expert row (all issued before
    // the sums), fp32 sums.
    const int n = nk;
    int4* o = (int4*)(out + (long long)t * a.hidden);
    for (int v = threadIdx.x; v < a.hidden / 8; v += blockDim.x) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int k0 = 0; k0 < n; k0 += 8) {
            int4 q[8];
#pragma unroll
            for (int k = 0; k < 8; k++)
                if (k0 + k < n) q[k] = rows[k0 + k][v];
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if (k0 + k < n) {
                    float f[8];
                    tw_unpack8(q[k], f);
                    const float w = wk[k0 + k];
#pragma unroll
                    for (int i = 0; i < 8; i++) acc[i] += w * f[i];
                }
            }
        }
        int4 r;
        r.x = (int)((unsigned)tw_to_bf16(acc[0]) | ((unsigned)tw_to_bf16(acc[1]) << 16));
        r.y = (int)((unsigned)tw_to_bf16(acc[2]) | ((unsigned)tw_to_bf16(acc[3]) << 16));
        r.z = (int)((unsigned)tw_to_bf16(acc[4]) | ((unsigned)tw_to_bf16(acc[5]) << 16));
        r.w = (int)((unsigned)tw_to_bf16(acc[6]) | ((unsigned)tw_to_bf16(acc[7]) << 16));
        o[v] = r;
    }
}
