// Reference for tidewire's scattered-page path (KV-cache pages): N blocks of B bytes at
// random, non-overlapping places of a pool on one GPU copied to random places of a pool on
// the other, three ways, all issued from GPU 0:
//   1. one cudaMemcpyAsync per block (the copy engine, one API call each),
//   2. one cudaMemcpyBatchAsync for the whole batch (CUDA 12.8 and later),
//   3. one launch of a plain SM gather kernel (one thread block per copied block at a time,
//      16-byte loads and stores over NVLink; no tuning beyond the grid size).
// Both directions: "push" gpu0->gpu1 (what a WRITE does) and "pull" gpu1->gpu0 (a READ).
// Every method's destination is zeroed first and a sample of its blocks is compared with the
// source afterwards. Every CUDA call is checked; every wait on the GPU is bounded.
//
// Build and run (GPU host, two GPUs with peer access):
//   nvcc -O3 -std=c++17 -arch=native -o scattered_blocks scattered_blocks.cu
//   ./scattered_blocks [block bytes ...]        (default: 4096 16384)
// Exit status: 0 ok, 1 CUDA error, 2 unusable machine or arguments, 3 timeout, 4 bad data.
#include <cuda_runtime.h>

#include "ref_util.cuh"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <unordered_set>
#include <vector>

namespace {

constexpr int kSrcDev = 0;
constexpr int kDstDev = 1;
constexpr size_t kPoolBytes = size_t{4} << 30;  // per GPU
constexpr int kMaxBlocks = 16384;
constexpr int kReps = 5;                        // timed batches per method
constexpr int kSampled = 64;                    // blocks compared after each method

// Records an event on `s` and waits for it (bounded): everything enqueued on `s` is done.
void drain(cudaStream_t s, cudaEvent_t ev, const char* what) {
  CHECK(cudaEventRecord(ev, s));
  ref::wait_event(ev, what);
}

// splitmix64: a small seeded generator, so every run scatters the same way.
struct Rng {
  uint64_t x;
  uint64_t next() {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

// `count` distinct slot numbers below `slots`, in random order: Floyd's sampling (memory in
// proportion to `count`, not `slots`), then a shuffle.
std::vector<size_t> pick_slots(size_t slots, size_t count, uint64_t seed) {
  Rng rng{seed};
  std::unordered_set<size_t> taken;
  std::vector<size_t> picked;
  picked.reserve(count);
  for (size_t j = slots - count; j < slots; j++) {
    const size_t t = static_cast<size_t>(rng.next() % (j + 1));
    const size_t slot = taken.count(t) ? j : t;
    taken.insert(slot);
    picked.push_back(slot);
  }
  for (size_t i = picked.size(); i > 1; i--) {
    std::swap(picked[i - 1], picked[static_cast<size_t>(rng.next() % i)]);
  }
  return picked;
}

// Every 8-byte word of the pool gets a value derived from its offset and `seed`, so a block
// copied from the wrong place, or not copied, is seen.
__global__ void fill_pattern(uint64_t* words, size_t count, uint64_t seed) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    words[i] = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
  }
}

struct BlockCopy {
  const uint4* src;
  uint4* dst;
};

// The plain SM gather: thread block b copies blocks b, b + gridDim.x, ...; each thread moves
// 16-byte words, with up to four loads in flight before their stores.
__global__ void gather_blocks(const BlockCopy* copies, int count, unsigned words) {
  for (int c = blockIdx.x; c < count; c += gridDim.x) {
    const uint4* s = copies[c].src;
    uint4* d = copies[c].dst;
    unsigned i = threadIdx.x;
    const unsigned step = blockDim.x;
    for (; i + 3 * step < words; i += 4 * step) {
      const uint4 a = s[i];
      const uint4 b = s[i + step];
      const uint4 e = s[i + 2 * step];
      const uint4 f = s[i + 3 * step];
      d[i] = a;
      d[i + step] = b;
      d[i + 2 * step] = e;
      d[i + 3 * step] = f;
    }
    for (; i < words; i += step) d[i] = s[i];
  }
}

struct Setup {
  char* pool[2];  // pool[k] on GPU k
  cudaStream_t stream;     // on GPU 0: every measured copy is issued here
  cudaStream_t dst_stream; // on GPU 1: zeroing
  cudaEvent_t start, stop, sync, dst_sync;
  int sms;
  char* host_a;  // pinned, for the data check
  char* host_b;
  size_t host_bytes;
};

Setup make_setup(size_t max_block) {
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::fprintf(stderr, "%d GPU(s) visible; this reference needs two\n", n);
    std::exit(2);
  }
  ref::enable_peer(kSrcDev, kDstDev);
  Setup s{};
  for (int d = 0; d < 2; d++) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaMalloc(reinterpret_cast<void**>(&s.pool[d]), kPoolBytes));
  }
  CHECK(cudaSetDevice(kDstDev));
  CHECK(cudaStreamCreateWithFlags(&s.dst_stream, cudaStreamNonBlocking));
  CHECK(cudaEventCreateWithFlags(&s.dst_sync, cudaEventDisableTiming));
  CHECK(cudaSetDevice(kSrcDev));
  CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  CHECK(cudaEventCreate(&s.start));
  CHECK(cudaEventCreate(&s.stop));
  CHECK(cudaEventCreateWithFlags(&s.sync, cudaEventDisableTiming));
  CHECK(cudaDeviceGetAttribute(&s.sms, cudaDevAttrMultiProcessorCount, kSrcDev));
  s.host_bytes = max_block;
  CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.host_a), max_block));
  CHECK(cudaMallocHost(reinterpret_cast<void**>(&s.host_b), max_block));
  return s;
}

// Fills `pool` (on GPU `dev`) with the pattern for `seed`; returns when done (bounded).
void fill(Setup& s, int dev, uint64_t seed) {
  CHECK(cudaSetDevice(dev));
  cudaStream_t st = dev == kSrcDev ? s.stream : s.dst_stream;
  cudaEvent_t ev = dev == kSrcDev ? s.sync : s.dst_sync;
  fill_pattern<<<1024, 256, 0, st>>>(reinterpret_cast<uint64_t*>(s.pool[dev]),
                                     kPoolBytes / sizeof(uint64_t), seed);
  CHECK(cudaGetLastError());
  drain(st, ev, "filling a pool");
  CHECK(cudaSetDevice(kSrcDev));
}

// Zeroes the pool on GPU `dev`; returns when done (bounded).
void zero(Setup& s, int dev) {
  CHECK(cudaSetDevice(dev));
  cudaStream_t st = dev == kSrcDev ? s.stream : s.dst_stream;
  cudaEvent_t ev = dev == kSrcDev ? s.sync : s.dst_sync;
  CHECK(cudaMemsetAsync(s.pool[dev], 0, kPoolBytes, st));
  drain(st, ev, "zeroing a pool");
  CHECK(cudaSetDevice(kSrcDev));
}

// Compares a sample of the copied blocks (first, last and evenly spaced) with their sources.
bool check_blocks(Setup& s, const std::vector<void*>& src, const std::vector<void*>& dst,
                  size_t block) {
  const size_t n = src.size();
  size_t last = SIZE_MAX;
  for (int k = 0; k <= kSampled; k++) {
    const size_t i = k == kSampled ? n - 1 : n * static_cast<size_t>(k) / kSampled;
    if (i == last) continue;  // small batches: each block once
    last = i;
    CHECK(cudaMemcpyAsync(s.host_a, src[i], block, cudaMemcpyDefault, s.stream));
    CHECK(cudaMemcpyAsync(s.host_b, dst[i], block, cudaMemcpyDefault, s.stream));
    drain(s.stream, s.sync, "reading blocks back");
    if (std::memcmp(s.host_a, s.host_b, block) != 0) {
      std::fprintf(stderr, "block %zu of %zu differs from its source after the copy\n", i, n);
      return false;
    }
  }
  return true;
}

void report(const char* dir, size_t block, size_t n, const char* method, float ms_total,
            bool ok) {
  const double ms = ms_total / kReps;
  const double gbps = static_cast<double>(block) * n / (ms * 1e-3) / 1e9;
  std::printf("%-10s %7zu B x %5zu  %-36s %8.1f GB/s  %9.3f ms/batch  %s\n", dir, block, n,
              method, gbps, ms, ok ? "data ok" : "DATA WRONG");
  std::fflush(stdout);
}

// Runs `enqueue` (one whole batch) once to warm up, then kReps times between two events.
template <typename F>
float time_batches(Setup& s, F enqueue, const char* what) {
  enqueue();
  drain(s.stream, s.sync, what);
  CHECK(cudaEventRecord(s.start, s.stream));
  for (int r = 0; r < kReps; r++) enqueue();
  CHECK(cudaEventRecord(s.stop, s.stream));
  ref::wait_event(s.stop, what);
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, s.start, s.stop));
  return ms;
}

// Measures the three methods for one block size and direction; false if data was wrong.
bool run(Setup& s, size_t block, bool push) {
  const int src_dev = push ? kSrcDev : kDstDev;
  const int dst_dev = push ? kDstDev : kSrcDev;
  const char* dir = push ? "gpu0->gpu1" : "gpu1->gpu0";
  const size_t slots = kPoolBytes / block;
  const size_t n = std::min<size_t>(kMaxBlocks, kPoolBytes / 2 / block);
  const std::vector<size_t> from = pick_slots(slots, n, 0x5eed0000 + block);
  const std::vector<size_t> to = pick_slots(slots, n, 0xd0570000 + block);
  std::vector<void*> src(n), dst(n);
  std::vector<size_t> sizes(n, block);
  std::vector<BlockCopy> copies(n);
  for (size_t i = 0; i < n; i++) {
    src[i] = s.pool[src_dev] + from[i] * block;
    dst[i] = s.pool[dst_dev] + to[i] * block;
    copies[i] = {static_cast<const uint4*>(src[i]), static_cast<uint4*>(dst[i])};
  }
  fill(s, src_dev, 0xA5A5A5A5ull + block);
  bool all_ok = true;

  // 1. One cudaMemcpyAsync per block.
  zero(s, dst_dev);
  float ms = time_batches(
      s,
      [&] {
        for (size_t i = 0; i < n; i++) {
          CHECK(cudaMemcpyAsync(dst[i], src[i], block, cudaMemcpyDefault, s.stream));
        }
      },
      "per-block cudaMemcpyAsync");
  bool ok = check_blocks(s, src, dst, block);
  report(dir, block, n, "one cudaMemcpyAsync per block", ms, ok);
  all_ok &= ok;

  // 2. One cudaMemcpyBatchAsync for the batch.
#if CUDART_VERSION >= 12080
  zero(s, dst_dev);
  cudaMemcpyAttributes attr;
  std::memset(&attr, 0, sizeof attr);
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;  // sources are read in stream order
  size_t attr_first = 0;  // the one attribute set applies from copy 0 on
  ms = time_batches(
      s,
      [&] {
#if CUDART_VERSION >= 13000
        // CUDA 13: (dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs, stream).
        CHECK(cudaMemcpyBatchAsync(dst.data(), src.data(), sizes.data(), n, &attr, &attr_first,
                                   1, s.stream));
#else
        // CUDA 12.8 / 12.9 also report the index of a failed copy.
        size_t failed = SIZE_MAX;
        CHECK(cudaMemcpyBatchAsync(dst.data(), src.data(), sizes.data(), n, &attr, &attr_first,
                                   1, &failed, s.stream));
#endif
      },
      "cudaMemcpyBatchAsync");
  ok = check_blocks(s, src, dst, block);
  report(dir, block, n, "one cudaMemcpyBatchAsync", ms, ok);
  all_ok &= ok;
#else
  std::printf("%-10s %7zu B x %5zu  %-36s not in CUDA runtime %d\n", dir, block, n,
              "one cudaMemcpyBatchAsync", CUDART_VERSION);
#endif

  // 3. One gather-kernel launch, at a few grid sizes.
  BlockCopy* dev_copies = nullptr;
  CHECK(cudaMalloc(reinterpret_cast<void**>(&dev_copies), n * sizeof(BlockCopy)));
  CHECK(cudaMemcpyAsync(dev_copies, copies.data(), n * sizeof(BlockCopy),
                        cudaMemcpyHostToDevice, s.stream));
  drain(s.stream, s.sync, "uploading the gather descriptors");
  const unsigned words = static_cast<unsigned>(block / sizeof(uint4));
  const int threads = block <= 8192 ? 256 : 512;
  for (int per_sm : {1, 2, 4}) {
    const int grid = s.sms * per_sm;
    zero(s, dst_dev);
    ms = time_batches(
        s,
        [&] {
          gather_blocks<<<grid, threads, 0, s.stream>>>(dev_copies, static_cast<int>(n), words);
          CHECK(cudaGetLastError());
        },
        "gather kernel");
    ok = check_blocks(s, src, dst, block);
    char method[64];
    std::snprintf(method, sizeof method, "SM gather kernel, %d x %d threads", grid, threads);
    report(dir, block, n, method, ms, ok);
    all_ok &= ok;
  }
  CHECK(cudaFree(dev_copies));
  return all_ok;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<size_t> blocks;
  for (int i = 1; i < argc; i++) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(argv[i], &end, 0);
    if (end == argv[i] || *end != '\0' || v < 16 || v % 16 != 0 || v > kPoolBytes / 2) {
      std::fprintf(stderr, "block size %s: need a multiple of 16 bytes, at most %zu\n", argv[i],
                   kPoolBytes / 2);
      return 2;
    }
    blocks.push_back(static_cast<size_t>(v));
  }
  if (blocks.empty()) blocks = {4096, 16384};
  const size_t max_block = *std::max_element(blocks.begin(), blocks.end());
  Setup s = make_setup(max_block);
  int runtime = 0, driver = 0;
  CHECK(cudaRuntimeGetVersion(&runtime));
  CHECK(cudaDriverGetVersion(&driver));
  std::printf("scattered blocks: CUDA runtime %d, driver %d, pools of %zu MiB, %d SMs, %d timed "
              "batches per line\n",
              runtime, driver, kPoolBytes >> 20, s.sms, kReps);
  bool ok = true;
  for (size_t block : blocks) {
    for (bool push : {true, false}) ok &= run(s, block, push);
  }
  CHECK(cudaSetDevice(kSrcDev));
  CHECK(cudaFreeHost(s.host_a));
  CHECK(cudaFreeHost(s.host_b));
  CHECK(cudaEventDestroy(s.start));
  CHECK(cudaEventDestroy(s.stop));
  CHECK(cudaEventDestroy(s.sync));
  CHECK(cudaStreamDestroy(s.stream));
  CHECK(cudaFree(s.pool[kSrcDev]));
  CHECK(cudaSetDevice(kDstDev));
  CHECK(cudaEventDestroy(s.dst_sync));
  CHECK(cudaStreamDestroy(s.dst_stream));
  CHECK(cudaFree(s.pool[kDstDev]));
  return ok ? 0 : 4;
}
