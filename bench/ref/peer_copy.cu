// The copy-engine ceiling for contiguous peer copies: cudaMemcpyPeerAsync of one buffer
// between GPU 0 and GPU 1, both directions, timed with events. Build: nvcc -O2 peer_copy.cu
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdlib>
#define CK(x) do { cudaError_t r = (x); if (r != cudaSuccess) { printf("%s -> %s\n", #x, cudaGetErrorString(r)); exit(1); } } while (0)

int main(int argc, char** argv) {
  size_t len = (argc > 1 ? strtoull(argv[1], 0, 0) : 256ull) << 20;
  char *a, *b;
  CK(cudaSetDevice(1)); CK(cudaMalloc(&b, len));
  CK(cudaSetDevice(0)); CK(cudaMalloc(&a, len)); CK(cudaDeviceEnablePeerAccess(1, 0));
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int dir = 0; dir < 2; dir++) {
    const int reps = 20;
    for (int w = 0; w < 3; w++) CK(cudaMemcpyPeerAsync(dir ? a : b, dir ? 0 : 1, dir ? b : a, dir ? 1 : 0, len, s));
    CK(cudaEventRecord(e0, s));
    for (int i = 0; i < reps; i++) CK(cudaMemcpyPeerAsync(dir ? a : b, dir ? 0 : 1, dir ? b : a, dir ? 1 : 0, len, s));
    CK(cudaEventRecord(e1, s)); CK(cudaEventSynchronize(e1));
    float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
    printf("cudaMemcpyPeer %s %zu MiB: %.1f GB/s\n", dir ? "gpu1->gpu0" : "gpu0->gpu1", len >> 20, (double)len * reps / ms / 1e6);
  }
  return 0;
}
