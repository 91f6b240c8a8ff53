// Helpers shared by the kernel sources (prepended to each by the Rust side before NVRTC):
// the global timer, system-scope acquire loads and release stores (signals between GPUs),
// and bf16 conversions.

__device__ __forceinline__ unsigned long long tw_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Waits read words in host memory (the first failure, a peer's liveness) at most once per
// TW_HOST_POLL_NS each: when a few hundred waiting threads read pinned host memory every few
// hundred spins, every call stalled by about 155 µs (measured on 2×H200 with 128 blocks of
// two waiters each). The deadline itself is read from the GPU's timer, not from the host.
#define TW_HOST_POLL_NS 4000000ull

// Whether a wait that began at `start` and last read host memory at `*polled` may read it
// now (and then notes the time).
__device__ __forceinline__ bool tw_host_poll_due(unsigned long long now, unsigned long long* polled) {
    if (now - *polled < TW_HOST_POLL_NS) return false;
    *polled = now;
    return true;
}

__device__ __forceinline__ unsigned long long tw_ld_acquire(const unsigned long long* p) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void tw_st_release(unsigned long long* p, unsigned long long v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ float tw_bf16(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }

__device__ __forceinline__ unsigned short tw_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

