// Device pieces shared by the relation kernels (channel_relation_kernel.cu,
// pixel_relation_kernel.cu): reading a (B, C, H, W) input through its strides in any float dtype
// (no contiguous or normalised copies), and the 64 x 64 output tiles that 256 threads compute as
// a 16 x 16 grid of 4 x 4 micro-tiles from chunks staged in shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <cstdint>

#include "cuda/mma_f64.cuh"
#include "cuda/relations_kernel.h"

namespace kdk {
namespace gpu {
namespace rel {

constexpr int kTile = 64;
constexpr int kMicro = 4;
constexpr int kGrid = kTile / kMicro;  // 16
constexpr int kThreads = kGrid * kGrid;
constexpr int kBK = 16;         // depth of one staged chunk of the reduction
constexpr int kLd = kTile + 4;  // padded shared row: fewer bank conflicts on transposed stores
constexpr double kEps = 1e-12;  // the L2-normalisation epsilon (F.normalize's default)
// Split-K blocks aimed at: two waves on a 132-SM H100. A fixed number, so the chunking (and with
// it the rounding) depends on the sizes alone.
constexpr int64_t kTargetBlocks = 264;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t m) { return ceil_div(a, m) * m; }
static_assert(kThreads == 256 && kBK * kTile == 4 * kThreads, "each thread stages 4 elements per chunk");

// A (B, C, H, W) input as the kernels read it: element (b, c, n), n = h * W + w, through its
// element strides.
struct Feat {
  const void* data;
  DType dtype;
  int64_t C, W, N;
  int64_t sB, sC, sH, sW;
};

inline Feat feat(const Tensor4& t) {
  return Feat{t.data, t.dtype, t.size[1], t.size[3], t.size[2] * t.size[3], t.stride[0], t.stride[1], t.stride[2],
              t.stride[3]};
}

// The element offset of pixel n (n < N < 2^31: the launchers check it, so 32-bit division).
__device__ __forceinline__ int64_t pixel_offset(const Feat& f, int64_t n) {
  const uint32_t h = static_cast<uint32_t>(n) / static_cast<uint32_t>(f.W);
  const int64_t w = n - static_cast<int64_t>(h) * f.W;
  return static_cast<int64_t>(h) * f.sH + w * f.sW;
}

// The element at offset `off` of f as acc_t. The dtype switch is uniform across the block.
template <typename acc_t>
__device__ __forceinline__ acc_t load(const Feat& f, int64_t off) {
  switch (f.dtype) {
    case DType::kFloat16: return static_cast<acc_t>(__half2float(static_cast<const __half*>(f.data)[off]));
    case DType::kBFloat16:
      return static_cast<acc_t>(__bfloat162float(static_cast<const __nv_bfloat16*>(f.data)[off]));
    case DType::kFloat32: return static_cast<acc_t>(static_cast<const float*>(f.data)[off]);
    default: return static_cast<acc_t>(static_cast<const double*>(f.data)[off]);
  }
}

// Writes v to element `off` of a tensor of dtype `dt` (half and bfloat16 through the explicit
// intrinsics: torch builds with the implicit conversions disabled).
template <typename acc_t>
__device__ __forceinline__ void store(void* p, DType dt, int64_t off, acc_t v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(p)[off] = __float2half_rn(static_cast<float>(v)); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(p)[off] = __float2bfloat16_rn(static_cast<float>(v)); break;
    case DType::kFloat32: static_cast<float*>(p)[off] = static_cast<float>(v); break;
    default: static_cast<double*>(p)[off] = static_cast<double>(v); break;
  }
}

__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double m_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }

template <typename acc_t>
__device__ __forceinline__ void zero(acc_t (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) acc[r][c] = 0;
}

// acc[r][c] += sum_k As[k][4 ty + r] * Bs[k][4 tx + c] over one staged chunk of kBK rows, As and Bs
// row-major in shared memory with row strides kLdA and kLdB.
// out_t may be wider than the staged type (float64 sums of exact float32 products).
template <typename acc_t, int kLdA = kLd, int kLdB = kLd, typename out_t = acc_t>
__device__ __forceinline__ void multiply_chunk(const acc_t* As, const acc_t* Bs, int ty, int tx,
                                               out_t (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int k = 0; k < kBK; ++k) {
    out_t av[kMicro], bv[kMicro];
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      av[q] = As[k * kLdA + ty * kMicro + q];
      bv[q] = Bs[k * kLdB + tx * kMicro + q];
    }
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) acc[r][c] += av[r] * bv[c];
  }
}

// out[i][j] = acc for this thread's 4 x 4 micro-tile of the 64 x 64 tile at (i0, j0) of an
// n x n row-major matrix, inside the matrix only.
template <typename acc_t>
__device__ __forceinline__ void store_tile(double* out, int64_t n, int64_t i0, int64_t j0, int ty, int tx,
                                           const acc_t (&acc)[kMicro][kMicro]) {
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) {
      const int64_t i = i0 + ty * kMicro + r, j = j0 + tx * kMicro + c;
      if (i < n && j < n) out[i * n + j] = acc[r][c];
    }
}

// Tile products on the tensor cores where the GPU has them for float32 (TF32) and float64 (sm_80
// and later; the CPU emulation too); FMA before sm_80.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
constexpr bool kTensorCores = true;
#else
constexpr bool kTensorCores = false;
#endif

// The float64 Grams (channel relation, pixel-relation mse): acc += sum over the staged chunk's kBK
// rows k of As[k][i] Bs[k][j] for a 64 x 64 tile, kept in one of two per-thread layouts that
// store_gram_tile writes out:
//  - tensor cores (mma_f64): warp w owns rows 16 (w / 2) + 8 m + g and columns 32 (w % 2) + 8 n +
//    2 q + e (g = lane / 4, q = lane % 4) in acc[2 m + n / 2][2 (n % 2) + e];
//  - FMA: the 4 x 4 micro-tile of multiply_chunk.
__device__ __forceinline__ void gram_chunk(const double* As, const double* Bs, double (&acc)[kMicro][kMicro]) {
  if constexpr (kTensorCores) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, q = lane % 4;
    const int m0 = (w / 2) * 16 + g, n0 = (w % 2) * 32 + g;
#pragma unroll
    for (int k = 0; k < kBK; k += 4) {
      const double a[2] = {As[(k + q) * kLd + m0], As[(k + q) * kLd + m0 + 8]};
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        const double b = Bs[(k + q) * kLd + n0 + 8 * n];
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          double(&d)[kMicro] = acc[2 * m + n / 2];
          mma_f64(d[2 * (n % 2)], d[2 * (n % 2) + 1], a[m], b);
        }
      }
    }
  } else {
    multiply_chunk(As, Bs, threadIdx.x / kGrid, threadIdx.x % kGrid, acc);
  }
}

// out[i][j] = the gram_chunk tile at (i0, j0) of an n x n row-major matrix, inside the matrix only.
__device__ __forceinline__ void store_gram_tile(double* out, int64_t n, int64_t i0, int64_t j0,
                                                const double (&acc)[kMicro][kMicro]) {
  if constexpr (kTensorCores) {
    const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, q = lane % 4;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const int64_t i = i0 + (w / 2) * 16 + 8 * m + g, j = j0 + (w % 2) * 32 + 8 * (c / 2) + 2 * q + c % 2;
        if (i < n && j < n) out[i * n + j] = acc[2 * m + c / 4][c % 4];
      }
  } else {
    store_tile(out, n, i0, j0, threadIdx.x / kGrid, threadIdx.x % kGrid, acc);
  }
}

// Staging maps for one chunk (kBK x 64 = 4 elements per thread):
//  - by row: thread t holds row t / 4 and the 4 consecutive reduction indices 4 (t % 4) + q;
//  - by column: thread t holds reduction index t / 16 and the 4 consecutive columns 4 (t % 16) + q.
// With NCHW inputs both read runs of consecutive pixels.
__device__ __forceinline__ int by_row_row(int t) { return t / 4; }
__device__ __forceinline__ int by_row_k(int t) { return (t % 4) * 4; }
__device__ __forceinline__ int by_col_k(int t) { return t / kGrid; }
__device__ __forceinline__ int by_col_col(int t) { return (t % kGrid) * kMicro; }

// The normalisation denominators max(||x[b, :, n]||_2, eps) of the 64 pixels n0 .. n0 + 63 into
// den[0 .. 63] (1 past N), and the norms themselves into norm (when not null). Callers divide by
// den, as F.normalize does: a single-channel pixel then normalises to +-1 exactly. Four threads per
// pixel each sum a quarter of the channels; the quarters add in a fixed order. Ends with a
// barrier; `scratch` holds kThreads acc_t.
template <typename acc_t>
__device__ __forceinline__ void pixel_norms(const Feat& f, int64_t b, int64_t n0, acc_t* scratch, acc_t* den,
                                                acc_t* norm) {
  const int t = threadIdx.x, p = t % kTile, q = t / kTile;
  const int64_t n = n0 + p;
  acc_t sum = 0;
  if (n < f.N) {
    const int64_t base = b * f.sB + pixel_offset(f, n);
    for (int64_t c = q; c < f.C; c += 4) {
      const acc_t v = load<acc_t>(f, base + c * f.sC);
      sum += v * v;
    }
  }
  scratch[t] = sum;
  __syncthreads();
  if (q == 0) {
    const acc_t total = ((scratch[p] + scratch[p + kTile]) + scratch[p + 2 * kTile]) + scratch[p + 3 * kTile];
    const acc_t nv = m_sqrt(total);
    const acc_t eps = static_cast<acc_t>(kEps);
    den[p] = n < f.N ? (nv < eps ? eps : nv) : acc_t(1);  // clamp_min; NaN propagates
    if (norm != nullptr) norm[p] = nv;
  }
  __syncthreads();
}

}  // namespace rel
}  // namespace gpu
}  // namespace kdk
