// A CPU emulation of the parts of the CUDA programming model the kdkernels CUDA kernels use,
// so that their source runs unchanged on a machine without a GPU: each block's threads are real
// threads (one per CUDA thread) meeting at a barrier for __syncthreads, blocks run one after
// another (so __shared__ arrays can be function statics), warp shuffles go through an exchange
// array and a per-warp barrier. Launches (kernel<<<grid, block, smem, stream>>>(args)) are
// rewritten by build.py into ::emu::Launch(grid, block, smem, stream).run(kernel, args). Device memory is host memory.
#pragma once

#include <atomic>
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;

namespace emu {
inline thread_local uint3 thread_idx{0, 0, 0};
inline thread_local uint3 block_idx{0, 0, 0};
inline uint3 grid_dim{1, 1, 1};
inline uint3 block_dim{1, 1, 1};
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;  // one per warp of 32 threads
inline double exchange[1024];
inline int64_t launches = 0;  // kernels launched so far

struct Launch {
  dim3 grid, block;
  Launch(dim3 g, dim3 b, size_t = 0, cudaStream_t = nullptr) : grid(g), block(b) {}

  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) {
    ++launches;
    const unsigned threads = block.x * block.y * block.z;
    grid_dim = {grid.x, grid.y, grid.z};
    block_dim = {block.x, block.y, block.z};
    block_barrier = std::make_unique<std::barrier<>>(threads);
    warp_barriers.clear();
    for (unsigned w = 0; w < threads; w += 32) warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w)));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        for (unsigned z = 0; z < grid.z; ++z)
          for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
              block_idx = {x, y, z};
              kernel(static_cast<P>(args)...);
              block_barrier->arrive_and_wait();  // the block ends before the next one's statics are reused
            }
      });
    }
    for (auto& th : pool) th.join();
  }
};

inline unsigned linear_thread() {
  return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
}
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { ::emu::block_barrier->arrive_and_wait(); }
inline void __threadfence() {}

// Every thread of the warp must call it (the full mask, which is all the kernels use).
template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  const unsigned t = ::emu::linear_thread();
  std::barrier<>& warp = *::emu::warp_barriers[t / 32];
  ::emu::exchange[t] = static_cast<double>(v);
  warp.arrive_and_wait();
  const T r = static_cast<T>(::emu::exchange[(t & ~31u) | ((t & 31u) ^ static_cast<unsigned>(lane_mask))]);
  warp.arrive_and_wait();
  return r;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T __ldcg(const T* p) {
  return *p;
}
inline float __expf(float x) { return std::exp(x); }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct __half {
  _Float16 v;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (finite inputs)
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
