// The emulation's csrc/cuda/mma_f64.cuh: the same function on the CPU, warp-wide as on the GPU:
// the 32 lanes publish their fragments, then each forms its own outputs from the whole A and B
// tiles (float64 fused multiply-adds in k order).
#pragma once

#include <cmath>

namespace emu {
inline double mma_f64_a[1024];
inline double mma_f64_b[1024];
}  // namespace emu

namespace kdk {
namespace gpu {

inline void mma_f64(double& d0, double& d1, double a, double b) {
  const unsigned t = ::emu::linear_thread(), base = t & ~31u, lane = t & 31u;
  std::barrier<>& warp = *::emu::warp_barriers[t / 32];
  ::emu::mma_f64_a[t] = a;
  ::emu::mma_f64_b[t] = b;
  warp.arrive_and_wait();
  // A[r][k] sits with lane 4 r + k, B[k][c] with lane 4 c + k.
  const unsigned g = lane / 4, q = lane % 4;
  double* d[2] = {&d0, &d1};
  for (unsigned i = 0; i < 2; ++i) {
    const unsigned c = 2 * q + i;
    double acc = *d[i];
    for (unsigned k = 0; k < 4; ++k)
      acc = std::fma(::emu::mma_f64_a[base + 4 * g + k], ::emu::mma_f64_b[base + 4 * c + k], acc);
    *d[i] = acc;
  }
  warp.arrive_and_wait();
}

}  // namespace gpu
}  // namespace kdk
