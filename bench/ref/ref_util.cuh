// Shared by the reference programs: every CUDA call checked (the failing call named), every
// wait on the GPU bounded.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace ref {

constexpr double kWaitLimitS = 60.0;  // any single wait on the GPU

inline void check(cudaError_t r, const char* call, const char* file, int line) {
  if (r != cudaSuccess) {
    std::fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", file, line, call, cudaGetErrorName(r),
                 cudaGetErrorString(r));
    std::exit(1);
  }
}

// Waits until `ev` has completed, polling, for at most kWaitLimitS seconds (exit 3 after).
inline void wait_event(cudaEvent_t ev, const char* what) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t r = cudaEventQuery(ev);
    if (r == cudaSuccess) return;
    if (r != cudaErrorNotReady) check(r, "cudaEventQuery", __FILE__, __LINE__);
    const std::chrono::duration<double> waited = std::chrono::steady_clock::now() - start;
    if (waited.count() > kWaitLimitS) {
      std::fprintf(stderr, "timeout: %s not finished after %.0f s\n", what, kWaitLimitS);
      std::exit(3);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// Lets GPU `from` access GPU `to`'s memory; exits 2 (nothing to measure) without a peer path.
inline void enable_peer(int from, int to) {
  int can = 0;
  check(cudaDeviceCanAccessPeer(&can, from, to), "cudaDeviceCanAccessPeer", __FILE__, __LINE__);
  if (!can) {
    std::fprintf(stderr, "GPU %d cannot access GPU %d's memory: no peer path to measure\n", from,
                 to);
    std::exit(2);
  }
  check(cudaSetDevice(from), "cudaSetDevice", __FILE__, __LINE__);
  const cudaError_t r = cudaDeviceEnablePeerAccess(to, 0);
  if (r == cudaErrorPeerAccessAlreadyEnabled) {
    (void)cudaGetLastError();  // clears the recorded error; access is on, which is the goal
  } else {
    check(r, "cudaDeviceEnablePeerAccess", __FILE__, __LINE__);
  }
}

}  // namespace ref

#define CHECK(call) ::ref::check((call), #call, __FILE__, __LINE__)
