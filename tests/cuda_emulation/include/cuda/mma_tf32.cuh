// The emulation's csrc/cuda/mma_tf32.cuh: the same functions on the CPU. mma_tf32 is warp-wide,
// as on the GPU: the 32 lanes publish their fragments, then each forms its own outputs from the
// whole A and B tiles (TF32 operands, exact products, float32 sums in k order).
#pragma once

#include <cstdint>
#include <cstring>

namespace emu {
inline uint32_t mma_a[1024][4];
inline uint32_t mma_b[1024][2];
}  // namespace emu

namespace kdk {
namespace gpu {

inline uint32_t tf32_round(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;  // half an ulp up, truncate
  return u;
}

inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned t = ::emu::linear_thread(), base = t & ~31u, lane = t & 31u;
  std::barrier<>& warp = *::emu::warp_barriers[t / 32];
  for (int i = 0; i < 4; ++i) ::emu::mma_a[t][i] = a[i];
  for (int i = 0; i < 2; ++i) ::emu::mma_b[t][i] = b[i];
  warp.arrive_and_wait();
  // A[r][k] sits with lane 4 (r % 8) + k % 4 at index (r >= 8) + 2 (k >= 4); B[k][c] with lane
  // 4 c + k % 4 at index k >= 4.
  const int g = lane / 4, q = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), c = 2 * q + i % 2;
    float acc = d[i];
    for (int k = 0; k < 8; ++k)
      acc += __uint_as_float(::emu::mma_a[base + 4 * (r % 8) + k % 4][(r >= 8) + 2 * (k >= 4)]) *
             __uint_as_float(::emu::mma_b[base + 4 * c + k % 4][k >= 4]);
    d[i] = acc;
  }
  warp.arrive_and_wait();
}

}  // namespace gpu
}  // namespace kdk
