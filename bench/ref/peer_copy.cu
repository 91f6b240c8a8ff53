// Reference for tidewire's large contiguous GPU copies: the copy engine's ceiling between
// GPU 0 and GPU 1, as cudaMemcpyPeerAsync of one buffer, both directions, issued on a stream
// of GPU 0 (as the engine issues its copies from the initiator's GPU) and timed with events.
// The destination is zeroed first and compared with the source (start, middle, end)
// afterwards. Every CUDA call is checked; every wait on the GPU is bounded.
//
// Build and run (GPU host, two GPUs):
//   nvcc -O2 -std=c++17 -o peer_copy peer_copy.cu
//   ./peer_copy [MiB ...]          (default: 256)
// Output, one line per size and direction (scripts/gpu-bench.sh keeps it in reference.txt):
//   cudaMemcpyPeer gpu0->gpu1 256 MiB: 395.1 GB/s
// Exit status: 0 ok, 1 CUDA error, 2 unusable machine or arguments, 3 timeout, 4 bad data.
#include <cuda_runtime.h>

#include "ref_util.cuh"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int kReps = 20;           // timed copies per line, after 3 untimed ones
constexpr size_t kProbe = 1 << 20;  // bytes compared at each of three places

__global__ void fill_pattern(uint64_t* words, size_t count, uint64_t seed) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    words[i] = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<size_t> sizes;
  for (int i = 1; i < argc; i++) {
    char* end = nullptr;
    const unsigned long long mib = std::strtoull(argv[i], &end, 0);
    if (end == argv[i] || *end != '\0' || mib == 0 || mib > (size_t{64} << 10)) {
      std::fprintf(stderr, "size %s: need a whole number of MiB, 1 to 65536\n", argv[i]);
      return 2;
    }
    sizes.push_back(static_cast<size_t>(mib) << 20);
  }
  if (sizes.empty()) sizes.push_back(size_t{256} << 20);
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::fprintf(stderr, "%d GPU(s) visible; this reference needs two\n", n);
    return 2;
  }
  ref::enable_peer(0, 1);
  uint8_t* host_a = nullptr;  // pinned: reading back is a stream operation we can bound
  uint8_t* host_b = nullptr;
  CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_a), kProbe));
  CHECK(cudaMallocHost(reinterpret_cast<void**>(&host_b), kProbe));
  bool all_ok = true;
  for (size_t len : sizes) {
    char* buf[2] = {nullptr, nullptr};
    for (int d = 0; d < 2; d++) {
      CHECK(cudaSetDevice(d));
      CHECK(cudaMalloc(reinterpret_cast<void**>(&buf[d]), len));
    }
    CHECK(cudaSetDevice(0));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1, sync;
    CHECK(cudaEventCreate(&e0));
    CHECK(cudaEventCreate(&e1));
    CHECK(cudaEventCreateWithFlags(&sync, cudaEventDisableTiming));
    for (int dir = 0; dir < 2; dir++) {
      const int from = dir == 0 ? 0 : 1;
      const int to = 1 - from;
      // Source pattern and zeroed destination, each on its own GPU, finished before timing.
      CHECK(cudaSetDevice(from));
      fill_pattern<<<1024, 256>>>(reinterpret_cast<uint64_t*>(buf[from]), len / 8, 0xC0FFEEull);
      CHECK(cudaGetLastError());
      CHECK(cudaSetDevice(to));
      CHECK(cudaMemset(buf[to], 0, len));
      for (int d : {from, to}) {
        CHECK(cudaSetDevice(d));
        cudaEvent_t done;
        CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
        CHECK(cudaEventRecord(done, 0));  // legacy default stream: after the fill / memset
        ref::wait_event(done, "preparing the buffers");
        CHECK(cudaEventDestroy(done));
      }
      CHECK(cudaSetDevice(0));
      for (int w = 0; w < 3; w++) {
        CHECK(cudaMemcpyPeerAsync(buf[to], to, buf[from], from, len, s));
      }
      CHECK(cudaEventRecord(e0, s));
      for (int i = 0; i < kReps; i++) {
        CHECK(cudaMemcpyPeerAsync(buf[to], to, buf[from], from, len, s));
      }
      CHECK(cudaEventRecord(e1, s));
      ref::wait_event(e1, "cudaMemcpyPeerAsync");
      float ms = 0;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      bool ok = true;
      const size_t probe = len < kProbe ? len : kProbe;
      for (size_t at : {size_t{0}, (len - probe) / 2, len - probe}) {
        CHECK(cudaMemcpyAsync(host_a, buf[from] + at, probe, cudaMemcpyDefault, s));
        CHECK(cudaMemcpyAsync(host_b, buf[to] + at, probe, cudaMemcpyDefault, s));
        CHECK(cudaEventRecord(sync, s));
        ref::wait_event(sync, "reading the buffers back");
        ok &= std::memcmp(host_a, host_b, probe) == 0;
      }
      std::printf("cudaMemcpyPeer gpu%d->gpu%d %zu MiB: %.1f GB/s%s\n", from, to, len >> 20,
                  static_cast<double>(len) * kReps / (ms * 1e-3) / 1e9,
                  ok ? "" : "  DATA WRONG");
      std::fflush(stdout);
      all_ok &= ok;
    }
    CHECK(cudaEventDestroy(e0));
    CHECK(cudaEventDestroy(e1));
    CHECK(cudaEventDestroy(sync));
    CHECK(cudaStreamDestroy(s));
    for (int d = 0; d < 2; d++) {
      CHECK(cudaSetDevice(d));
      CHECK(cudaFree(buf[d]));
    }
    CHECK(cudaSetDevice(0));
  }
  CHECK(cudaFreeHost(host_a));
  CHECK(cudaFreeHost(host_b));
  return all_ok ? 0 : 4;
}
