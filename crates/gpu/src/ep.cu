// Expert-parallel dispatch and combine (low-latency form) over NVLink-mapped peer buffers.
// Compiled with NVRTC when an EP buffer is created (crates/gpu/src/ep.rs), never lazily.
//
// Every rank's buffer holds, per parity (calls alternate), a dispatch area (a signal per
// (local expert, source rank); a slot of T rows and their source token per (local expert,
// source rank)) and a combine area (a signal per global expert; a row per (global expert,
// token)). Senders write rows straight into the receiver's buffer through its mapping, then
// publish a signal tagged with the call's sequence number (release, system scope); receivers
// wait for the tag with a deadline (globaltimer) and the sender's liveness word. A sender
// that misses the deadline, or whose process died, is marked inactive in the caller's
// `active` tensor and counts as sending nothing from then on.

#define TW_MAX_RANKS 64

struct EpArgs {
    unsigned long long peers[TW_MAX_RANKS];  // each rank's buffer, mapped for this GPU
    unsigned long long alive[TW_MAX_RANKS];  // each rank's liveness word (0: none / ourselves)
    unsigned long long seq_at;               // device word holding the call's number (from 1;
                                             // parity = seq & 1), set by tw_ep_begin
    unsigned long long half;                 // bytes of one parity
    unsigned long long off_dsig, off_ddata, off_dsrc, off_csig, off_cdata;
    long long timeout_ns;
    int rank, ranks, experts, local_experts, max_tokens, hidden, topk, num_tokens;
    int fp8;  // dispatch rows as e4m3 + one fp32 scale per 128 channels (else bf16)
    int _pad;
};

__device__ __forceinline__ unsigned long long tw_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ unsigned long long tw_ld_acquire(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void tw_st_release(unsigned long long* p, unsigned long long v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ char* tw_base(const EpArgs& a, int r, unsigned long long seq) {
    return (char*)a.peers[r] + (seq & 1ull) * a.half;
}

// The call's number, written by tw_ep_begin earlier on the stream (so a CUDA-graph replay
// runs with a fresh one).
__device__ __forceinline__ unsigned long long tw_seq(const EpArgs& a) {
    return *(volatile const unsigned long long*)a.seq_at;
}

// Numbers a dispatch: one more than the buffer's last (a counter in device memory).
extern "C" __global__ void tw_ep_begin(unsigned long long* counter, unsigned long long* seq_out) {
    unsigned long long v = *counter + 1;
    *counter = v;
    *seq_out = v;
}

// Waits until `*sig` carries tag `tag` in its high 32 bits; returns the low 32 bits, or -1
// when rank `from` died or the deadline passed (it is then marked inactive in `active`).
__device__ long long tw_wait(const EpArgs& a, const unsigned long long* sig, unsigned long long tag,
                             int from, int* active) {
    unsigned long long start = tw_now();
    for (unsigned spins = 0;; spins++) {
        unsigned long long v = tw_ld_acquire(sig);
        if ((v >> 32) == tag) return (long long)(v & 0xffffffffull);
        if ((spins & 255u) == 255u) {
            bool dead = a.alive[from] != 0 && *(volatile const unsigned*)a.alive[from] == 0;
            if (dead || (long long)(tw_now() - start) > a.timeout_ns || *(volatile int*)&active[from] == 0) {
                atomicExch(&active[from], 0);
                return -1;
            }
        }
    }
}

__device__ __forceinline__ float tw_bf16(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }

// Two floats to two e4m3 (saturating, round to nearest even): `hi` in the upper byte.
__device__ __forceinline__ unsigned short tw_e4m3x2(float hi, float lo) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ unsigned short tw_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}


// One block per global expert: its tokens (in token order) into the owner's slot for us.
extern "C" __global__ void tw_ep_dispatch_send(EpArgs a, const unsigned short* x,
                                               const long long* topk, int* active) {
    __shared__ int tok[1024];
    __shared__ int warp_sum[32];
    __shared__ int count;
    const int e = blockIdx.x, dst = e / a.local_experts, el = e % a.local_experts;
    if (active[dst] == 0) return;
    // Which tokens route to e, and their slots (a block-wide prefix sum in token order).
    for (int chunk = 0; chunk < a.num_tokens; chunk += blockDim.x) {
        int t = chunk + threadIdx.x;
        int hit = 0;
        if (t < a.num_tokens)
            for (int k = 0; k < a.topk; k++) hit |= topk[(long long)t * a.topk + k] == e;
        unsigned mask = __ballot_sync(0xffffffffu, hit);
        int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane == 0) warp_sum[warp] = __popc(mask);
        __syncthreads();
        if (threadIdx.x == 0) {
            int run = chunk == 0 ? 0 : count;
            for (int w = 0; w < (int)(blockDim.x + 31) / 32; w++) {
                int c = warp_sum[w];
                warp_sum[w] = run;
                run += c;
            }
            count = run;
        }
        __syncthreads();
        if (hit) tok[warp_sum[warp] + __popc(mask & ((1u << lane) - 1u))] = t;
        __syncthreads();
    }
    if (a.num_tokens == 0 && threadIdx.x == 0) count = 0;
    __syncthreads();
    const int n = count;
    const unsigned long long row = (unsigned long long)a.hidden * 2;
    const unsigned long long seq = tw_seq(a);
    char* base = tw_base(a, dst, seq);
    const unsigned long long slot = (unsigned long long)el * a.ranks + a.rank;
    char* data = base + a.off_ddata + slot * a.max_tokens * row;
    int* src = (int*)(base + a.off_dsrc) + slot * a.max_tokens;
    if (a.fp8) {
        // A warp per (row, 128-channel group): amax over the group, scale = amax / 448, the
        // 128 channels as e4m3 at the row's start, the scales after them.
        const int groups = a.hidden / 128, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
        for (int i = threadIdx.x >> 5; i < n * groups; i += warps) {
            const int j = i / groups, g = i % groups;
            const unsigned short* in = x + (unsigned long long)tok[j] * a.hidden + g * 128 + lane * 4;
            float v[4], amax = 0.f;
            for (int q = 0; q < 4; q++) {
                v[q] = tw_bf16(in[q]);
                amax = fmaxf(amax, fabsf(v[q]));
            }
            for (int o = 16; o; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            const float scale = fmaxf(amax, 1e-4f) / 448.f, inv = 1.f / scale;
            unsigned packed = (unsigned)tw_e4m3x2(v[1] * inv, v[0] * inv) |
                              ((unsigned)tw_e4m3x2(v[3] * inv, v[2] * inv) << 16);
            char* r = data + (unsigned long long)j * row;
            ((unsigned*)(r + g * 128))[lane] = packed;
            if (lane == 0) ((float*)(r + a.hidden))[g] = scale;
        }
    } else {
        unsigned long long per = row / 16;
        for (unsigned long long i = threadIdx.x; i < (unsigned long long)n * per; i += blockDim.x) {
            unsigned long long j = i / per, w = i % per;
            ((int4*)(data + j * row))[w] = ((const int4*)((const char*)x + (unsigned long long)tok[j] * row))[w];
        }
    }
    for (int j = threadIdx.x; j < n; j += blockDim.x) src[j] = tok[j];
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long* sig = (unsigned long long*)(base + a.off_dsig) + slot;
        tw_st_release(sig, (seq << 32) | (unsigned long long)n);
    }
}

// One block per (local expert, source rank): waits for its signal, then copies its rows out.
extern "C" __global__ void tw_ep_dispatch_recv(EpArgs a, unsigned short* recv_x, int* src_info,
                                               long long* layout_range, int* recv_count, int* active,
                                               float* recv_scales) {
    __shared__ int n;
    const int el = blockIdx.x / a.ranks, s = blockIdx.x % a.ranks;
    const unsigned long long slot = (unsigned long long)el * a.ranks + s;
    const unsigned long long seq = tw_seq(a);
    char* base = tw_base(a, a.rank, seq);
    if (threadIdx.x == 0) {
        long long got = -1;
        if (*(volatile int*)&active[s] != 0)
            got = tw_wait(a, (const unsigned long long*)(base + a.off_dsig) + slot, seq, s, active);
        n = got < 0 ? 0 : (int)got;
        layout_range[slot] = ((long long)s * a.max_tokens << 32) | (long long)n;
        if (n) atomicAdd(&recv_count[el], n);
    }
    __syncthreads();
    const unsigned long long row = (unsigned long long)a.hidden * 2;
    const char* data = base + a.off_ddata + slot * a.max_tokens * row;
    // Output rows: bf16 (2·hidden bytes), or e4m3 (hidden bytes) with the scales apart.
    const unsigned long long out_row = a.fp8 ? (unsigned long long)a.hidden : row;
    const unsigned long long first = (unsigned long long)el * a.ranks * a.max_tokens + (unsigned long long)s * a.max_tokens;
    char* out = (char*)recv_x + first * out_row;
    unsigned long long per = out_row / 16;
    for (unsigned long long i = threadIdx.x; i < (unsigned long long)n * per; i += blockDim.x) {
        unsigned long long j = i / per, w = i % per;
        ((int4*)(out + j * out_row))[w] = ((const int4*)(data + j * row))[w];
    }
    if (a.fp8) {
        // Scales `[local_experts, hidden / 128, ranks · max_tokens]` (the column-major layout
        // of `[local_experts, ranks · max_tokens, hidden / 128]`).
        const int groups = a.hidden / 128;
        const unsigned long long col = (unsigned long long)a.ranks * a.max_tokens;
        for (int i = threadIdx.x; i < n * groups; i += blockDim.x) {
            const int j = i / groups, g = i % groups;
            recv_scales[((unsigned long long)el * groups + g) * col + (unsigned long long)s * a.max_tokens + j] =
                ((const float*)(data + (unsigned long long)j * row + a.hidden))[g];
        }
    }
    const int* src = (const int*)(base + a.off_dsrc) + slot * a.max_tokens;
    int* info = src_info + (unsigned long long)el * a.ranks * a.max_tokens + (unsigned long long)s * a.max_tokens;
    for (int j = threadIdx.x; j < n; j += blockDim.x) info[j] = src[j];
}

// One block per (local expert, source rank): the expert's output rows back to the tokens'
// home rank, then the expert's signal there.
extern "C" __global__ void tw_ep_combine_send(EpArgs a, const unsigned short* y, const int* src_info,
                                              const long long* layout_range, int* active) {
    const int el = blockIdx.x / a.ranks, s = blockIdx.x % a.ranks;
    if (active[s] == 0) return;
    const unsigned long long slot = (unsigned long long)el * a.ranks + s;
    const int n = (int)(layout_range[slot] & 0xffffffffll);
    const int e = a.rank * a.local_experts + el;
    const unsigned long long row = (unsigned long long)a.hidden * 2;
    const unsigned long long seq = tw_seq(a);
    char* base = tw_base(a, s, seq);
    char* cdata = base + a.off_cdata + (unsigned long long)e * a.max_tokens * row;
    const char* rows = (const char*)y + ((unsigned long long)el * a.ranks * a.max_tokens + (unsigned long long)s * a.max_tokens) * row;
    const int* info = src_info + (unsigned long long)el * a.ranks * a.max_tokens + (unsigned long long)s * a.max_tokens;
    unsigned long long per = row / 16;
    for (unsigned long long i = threadIdx.x; i < (unsigned long long)n * per; i += blockDim.x) {
        unsigned long long j = i / per, w = i % per;
        ((int4*)(cdata + (unsigned long long)info[j] * row))[w] = ((const int4*)(rows + j * row))[w];
    }
    __threadfence_system();
    __syncthreads();
    // Every expert signals every active home rank, with or without rows for it; only the
    // block of the last local... (each (el, s) block signals expert e at rank s once).
    if (threadIdx.x == 0) tw_st_release((unsigned long long*)(base + a.off_csig) + e, seq << 32);
}

// One block per token: waits for the signals of its experts, then the weighted sum (fp32).
extern "C" __global__ void tw_ep_combine_recv(EpArgs a, const long long* topk, const float* weights,
                                              unsigned short* out, int* active) {
    __shared__ const int4* rows[16];
    __shared__ float wk[16];
    __shared__ int nk;
    const int t = blockIdx.x;
    const unsigned long long seq = tw_seq(a);
    char* base = tw_base(a, a.rank, seq);
    const unsigned long long row = (unsigned long long)a.hidden * 2;
    if (threadIdx.x < (unsigned)a.topk) {
        long long e = topk[(long long)t * a.topk + threadIdx.x];
        int ok = 0;
        if (e >= 0 && e < a.experts) {
            int owner = (int)(e / a.local_experts);
            if (*(volatile int*)&active[owner] != 0)
                ok = tw_wait(a, (const unsigned long long*)(base + a.off_csig) + e, seq, owner, active) >= 0;
        }
        // The valid slots, compacted in slot order (the sum's order is the same on every call).
        unsigned mask = __ballot_sync(0xffffffffu >> (32 - a.topk), ok);
        if (ok) {
            int at = __popc(mask & ((1u << threadIdx.x) - 1u));
            rows[at] = (const int4*)(base + a.off_cdata + ((unsigned long long)e * a.max_tokens + t) * row);
            wk[at] = weights[(long long)t * a.topk + threadIdx.x];
        }
        if (threadIdx.x == 0) nk = __popc(mask);
    }
    __syncthreads();
    // Eight channels per thread and step: one 16-byte load per expert row, fp32 sums.
    const int n = nk;
    int4* o = (int4*)(out + (long long)t * a.hidden);
    for (int v = threadIdx.x; v < a.hidden / 8; v += blockDim.x) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int k = 0; k < n; k++) {
            int4 q = rows[k][v];
            const unsigned short* h = (const unsigned short*)&q;
            for (int i = 0; i < 8; i++) acc[i] += wk[k] * tw_bf16(h[i]);
        }
        int4 r;
        unsigned short* rh = (unsigned short*)&r;
        for (int i = 0; i < 8; i++) rh[i] = tw_to_bf16(acc[i]);
        o[v] = r;
    }
}
