// KDAS Symmetrical Guiding Module on CUDA: kernel and host launcher (declared in sgm_kernel.h).
//
// With D = ps - pt and M = D + D^T (symmetric), the loss is mean f(M) and d loss / d ps =
// 2 f'(M) / n. One block per tile pair (I, J), I <= J, of a (b, k) plane: a warp reads one
// 32-element tile row at a time (coalesced for row-major planes), D of tile (J, I) goes through
// shared memory so that each thread meets its transposed partner, and the gradient of tile
// (J, I) goes back through shared memory so that its stores are coalesced too. Each input
// element is read once (a diagonal tile twice, the second time from cache) and each gradient element
// written once. Each block writes one partial loss (a fixed-order block reduction); the caller
// sums them in a fixed order: no atomics, the result is bitwise reproducible.
#include "sgm_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace kdk {
namespace gpu {
namespace {

constexpr int kTile = 32;  // blockDim.x: one warp per tile row
constexpr int kRows = 8;   // blockDim.y
constexpr int kPer = kTile / kRows;  // tile rows per thread
constexpr int kThreads = kTile * kRows;
constexpr unsigned kFullMask = 0xffffffffu;
// Resident blocks per SM asked of ptxas: 8 (32 registers, 2048 threads) holds a whole batch of
// 16 maps of 352 x 352 (1056 tile pairs) on an H100's 132 SMs in one wave; the float64 variants
// would spill at 32 registers and take 6.

// Half and bfloat16 go through the explicit intrinsics (torch builds with the implicit
// conversions disabled).
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kTile / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

struct SgmArgs {
  int64_t K, H, npairs, tasks;
  int64_t s[4], t[4], g[4];  // element strides (B, K, H, W) of ps, pt and grad
};

// ps - pt at (row, col) of a plane, 0 outside the H x H map.
template <typename T, typename acc_t>
__device__ __forceinline__ acc_t diff(const T* s, const T* t, const SgmArgs& a, int64_t row, int64_t col) {
  if (row >= a.H || col >= a.H) return acc_t(0);
  return static_cast<acc_t>(load(s + row * a.s[2] + col * a.s[3])) -
         static_cast<acc_t>(load(t + row * a.t[2] + col * a.t[3]));
}

template <typename T, typename acc_t, bool L1, bool GRAD>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t) == 4 ? 8 : 6)
    sgm_tiles(const T* __restrict__ ps, const T* __restrict__ pt, T* __restrict__ grad, SgmArgs a,
              acc_t k, acc_t* __restrict__ partial) {
  __shared__ acc_t tile[kTile][kTile + 1];  // +1: the transposed reads hit 32 different banks
  __shared__ acc_t red[kRows];
  const int x = threadIdx.x, y = threadIdx.y;
  for (int64_t task = blockIdx.x; task < a.tasks; task += gridDim.x) {
    const int64_t plane = task / a.npairs, p = task % a.npairs;
    // Pair p = J (J + 1) / 2 + I with 0 <= I <= J; the root is off by at most one.
    int64_t J = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(p) + 1.0) - 1.0) * 0.5);
    if (J * (J + 1) / 2 > p) --J;
    if ((J + 1) * (J + 2) / 2 <= p) ++J;
    const int64_t i0 = (p - J * (J + 1) / 2) * kTile, j0 = J * kTile;
    const int64_t b = plane / a.K, c = plane % a.K;
    const T* s = ps + b * a.s[0] + c * a.s[1];
    const T* t = pt + b * a.t[0] + c * a.t[1];

    acc_t m[kPer];
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      const int r = y + q * kRows;
      tile[r][x] = diff<T, acc_t>(s, t, a, j0 + r, i0 + x);  // D of tile (J, I)
      m[q] = diff<T, acc_t>(s, t, a, i0 + r, j0 + x);        // D of tile (I, J)
    }
    __syncthreads();
    acc_t sum = 0;
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      m[q] += tile[x][y + q * kRows];  // M[i0 + r][j0 + x]; padding adds f(0) = 0
      sum += L1 ? fabs(m[q]) : m[q] * m[q];
    }
    if constexpr (GRAD) {
      T* g = grad + b * a.g[0] + c * a.g[1];
#pragma unroll
      for (int q = 0; q < kPer; ++q) {
        // f'(0) = 0 and sign(NaN) = 0: torch's conventions.
        m[q] = L1 ? k * (static_cast<acc_t>(m[q] > 0) - static_cast<acc_t>(m[q] < 0)) : k * m[q];
        const int64_t row = i0 + y + q * kRows, col = j0 + x;
        if (row < a.H && col < a.H) store(g + row * a.g[2] + col * a.g[3], m[q]);
      }
      if (i0 != j0) {  // block-uniform: the (J, I) tile is the transpose of the (I, J) one
        __syncthreads();
#pragma unroll
        for (int q = 0; q < kPer; ++q) tile[y + q * kRows][x] = m[q];
        __syncthreads();
#pragma unroll
        for (int q = 0; q < kPer; ++q) {
          const int64_t row = j0 + y + q * kRows, col = i0 + x;
          if (row < a.H && col < a.H) store(g + row * a.g[2] + col * a.g[3], tile[x][y + q * kRows]);
        }
      }
    }
    sum = warp_sum(sum);
    if (x == 0) red[y] = sum;
    __syncthreads();
    if (x == 0 && y == 0) {
      acc_t total = 0;
      for (int w = 0; w < kRows; ++w) total += red[w];
      partial[task] = i0 == j0 ? total : acc_t(2) * total;
    }
    __syncthreads();  // tile and red are reused by the next task
  }
}

template <typename T, typename acc_t>
cudaError_t launch(const Tensor4& ps, const Tensor4& pt, bool l1, double unit_scale, void* grad,
                   const SgmArgs& a, void* partial, cudaStream_t stream) {
  const T* s = static_cast<const T*>(ps.data);
  const T* t = static_cast<const T*>(pt.data);
  T* g = static_cast<T*>(grad);
  acc_t* out = static_cast<acc_t*>(partial);
  const acc_t k = static_cast<acc_t>(unit_scale);
  const dim3 block(kTile, kRows);
  const dim3 blocks(static_cast<unsigned>(a.tasks < INT32_MAX ? a.tasks : INT32_MAX));
  if (l1 && g) sgm_tiles<T, acc_t, true, true><<<blocks, block, 0, stream>>>(s, t, g, a, k, out);
  else if (l1) sgm_tiles<T, acc_t, true, false><<<blocks, block, 0, stream>>>(s, t, g, a, k, out);
  else if (g) sgm_tiles<T, acc_t, false, true><<<blocks, block, 0, stream>>>(s, t, g, a, k, out);
  else sgm_tiles<T, acc_t, false, false><<<blocks, block, 0, stream>>>(s, t, g, a, k, out);
  return cudaGetLastError();
}

int64_t tile_pairs(int64_t H) {
  const int64_t tiles = (H + kTile - 1) / kTile;
  return tiles * (tiles + 1) / 2;
}

}  // namespace

int64_t sgm_partials(const Tensor4& ps) { return ps.size[0] * ps.size[1] * tile_pairs(ps.size[2]); }

cudaError_t sgm_forward(const Tensor4& ps, const Tensor4& pt, bool l1, double unit_scale, void* grad,
                        const int64_t grad_stride[4], void* partial, cudaStream_t stream) {
  if (ps.dtype != pt.dtype || ps.size[2] != ps.size[3]) return cudaErrorInvalidValue;
  SgmArgs a;
  a.K = ps.size[1];
  a.H = ps.size[2];
  a.npairs = tile_pairs(a.H);
  a.tasks = sgm_partials(ps);
  for (int d = 0; d < 4; ++d) {
    a.s[d] = ps.stride[d];
    a.t[d] = pt.stride[d];
    a.g[d] = grad ? grad_stride[d] : 0;
  }
  if (a.tasks == 0) return cudaSuccess;
  switch (ps.dtype) {
    case DType::kFloat16: return launch<__half, float>(ps, pt, l1, unit_scale, grad, a, partial, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16, float>(ps, pt, l1, unit_scale, grad, a, partial, stream);
    case DType::kFloat32: return launch<float, float>(ps, pt, l1, unit_scale, grad, a, partial, stream);
    case DType::kFloat64: return launch<double, double>(ps, pt, l1, unit_scale, grad, a, partial, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace kdk
