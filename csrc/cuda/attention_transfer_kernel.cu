// Attention transfer on CUDA: kernels and their host launchers (declared in
// attention_transfer_kernel.h). Torch-free so that it compiles on its own.
//
// Forward: a map kernel per input writes the channel sums of |x|^p on the teacher's grid (the
// student read through its 4 bilinear taps when the sizes differ, never resized in memory);
// then one finalize block per sample normalises both maps, writes the per-sample squared
// distance and coeff = d loss / d m_s. Backward: one pass over the student; through a resize
// each input pixel gathers from the outputs that read it, so there are no atomics anywhere and
// every result is deterministic (launch shapes depend on tensor sizes and strides, not the GPU).
//
// The memory-bound kernels come in two thread layouts, picked from the strides:
//  - pixel lanes: a warp reads 32 neighbouring pixels of one channel (coalesced for NCHW); the
//    8 warps of a block split the channels and reduce through shared memory.
//  - channel lanes: a warp reads 32 neighbouring channels of one pixel (coalesced for
//    channels_last); each warp handles kPixPerWarp pixels at once and reduces with shuffles.
// Channels are further split over gridDim.z ("splits") when pixels alone give too few blocks
// (small maps, many channels: e.g. a 1024 x 24 x 24 teacher); the finalize kernel adds the
// per-split partial maps in a fixed order.
#include "attention_transfer_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/attention_transfer.h"
#include "common/bilinear.h"

namespace kdk {
namespace gpu {
namespace {

constexpr int kLanes = 32;  // blockDim.x: one warp
constexpr int kRows = 8;    // blockDim.y
constexpr int kThreads = kLanes * kRows;
constexpr int kUnroll = 4;      // independent loads in flight per thread and channel loop step
constexpr int kPixPerWarp = 4;  // channel lanes: pixels per warp, so small C still has loads in flight
constexpr int kFinalizeThreads = 512;
constexpr int kFinalizeUnroll = 4;  // map elements per finalize thread and step
constexpr int64_t kTargetBlocks = 1024;  // about what an H100 holds at once (132 SMs x 8 blocks)
constexpr int64_t kMaxSplits = 16;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Element access. Half and bfloat16 go through the explicit intrinsics (torch builds with the
// implicit conversions disabled).

__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// q = a / b, r = a % b for a >= 0, b > 0. The 32-bit division is a handful of instructions, the
// 64-bit one a long software routine, and these run once per thread.
__device__ __forceinline__ void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((a | b) >> 32) == 0) {
    const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    q = q32;
    r = a - static_cast<int64_t>(q32) * b;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;  // the butterfly leaves the same total in every lane
}

// Where one output pixel reads its value inside a (b, c) plane: one element, or 4 bilinear taps.
template <bool RESIZE>
struct Pixel;

template <>
struct Pixel<false> {
  int64_t off;
};

template <>
struct Pixel<true> {
  int64_t o00, o01, o10, o11;  // element offsets of (i0h, i0w), (i0h, i1w), (i1h, i0w), (i1h, i1w)
  float h0, h1, w0, w1;
};

__device__ __forceinline__ Pixel<true> tap_pixel(const Taps& th, const Taps& tw, int64_t sH, int64_t sW) {
  Pixel<true> px;
  px.o00 = th.i0 * sH + tw.i0 * sW;
  px.o01 = th.i0 * sH + tw.i1 * sW;
  px.o10 = th.i1 * sH + tw.i0 * sW;
  px.o11 = th.i1 * sH + tw.i1 * sW;
  px.h0 = th.l0;
  px.h1 = th.l1;
  px.w0 = tw.l0;
  px.w1 = tw.l1;
  return px;
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t sample(const T* plane, const Pixel<false>& px) {
  return load(plane + px.off);
}

// The same expression as PyTorch's upsample_bilinear2d; forward and backward both use it, so
// the backward differentiates exactly the value the forward raised to the power.
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t sample(const T* plane, const Pixel<true>& px) {
  const acc_t v00 = load(plane + px.o00), v01 = load(plane + px.o01);
  const acc_t v10 = load(plane + px.o10), v11 = load(plane + px.o11);
  const acc_t w0 = px.w0, w1 = px.w1;
  return acc_t(px.h0) * (w0 * v00 + w1 * v01) + acc_t(px.h1) * (w0 * v10 + w1 * v11);
}

// ---------------------------------------------------------------------------------------------
// Forward maps: part[z, b, n] = sum over split z's channels of |x[b, c, n]|^p, n on the output
// grid (Ho, Wo).

struct MapArgs {
  int64_t B, C, H, W;       // the input (student or teacher)
  int64_t sB, sC, sH, sW;   // its element strides
  int64_t Ho, Wo, N;        // the output grid, N = Ho * Wo
  float scale_h, scale_w;   // float(H) / float(Ho), float(W) / float(Wo): PyTorch's scales
  int slices, splits;       // channel partition: slices within a block, splits over gridDim.z
};

template <bool RESIZE>
__device__ __forceinline__ Pixel<RESIZE> output_pixel(int64_t ho, int64_t wo, const MapArgs& a) {
  if constexpr (RESIZE) {
    return tap_pixel(bilinear_taps(ho, a.H, a.scale_h), bilinear_taps(wo, a.W, a.scale_w), a.sH, a.sW);
  } else {
    return Pixel<false>{ho * a.sH + wo * a.sW};
  }
}

// The map launch that comes first zeroes the finalize kernel's block counter (see finalize), so
// that no memset is launched for it: the stream orders the two kernels.
__device__ __forceinline__ void zero_counter(unsigned* counter) {
  if (counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0 &&
      threadIdx.y == 0)
    *counter = 0;
}

// A block covers 32 * (8 / slices) output pixels (lane = pixel); the `slices` rows of a pixel
// group each sum a contiguous channel range, then row 0 adds them in order.
template <typename T, typename acc_t, bool RESIZE, int P>
__global__ void __launch_bounds__(kThreads)
    map_pixel_lanes(const T* __restrict__ x, MapArgs a, acc_t p, acc_t* __restrict__ part, unsigned* counter) {
  __shared__ acc_t red[kRows][kLanes];
  zero_counter(counter);
  const int lane = threadIdx.x, row = threadIdx.y;
  const int slice = row % a.slices, group = row / a.slices, groups = kRows / a.slices;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * groups + group) * kLanes + lane;
  const bool active = n < a.N;
  const int64_t parts = static_cast<int64_t>(a.splits) * a.slices;
  const int64_t part_id = static_cast<int64_t>(blockIdx.z) * a.slices + slice;
  const int64_t c_begin = part_id * a.C / parts, c_end = (part_id + 1) * a.C / parts;

  Pixel<RESIZE> px{};
  if (active) {
    int64_t ho, wo;
    divmod(n, a.Wo, ho, wo);
    px = output_pixel<RESIZE>(ho, wo, a);
  }
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {  // block-uniform trip count
    acc_t sum = 0;
    if (active) {
      const T* xb = x + b * a.sB;
      int64_t c = c_begin;
      for (; c + kUnroll <= c_end; c += kUnroll) {
        acc_t v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = sample<acc_t>(xb + (c + u) * a.sC, px);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) sum += at_power<P>(v[u], p);
      }
      for (; c < c_end; ++c) sum += at_power<P>(sample<acc_t>(xb + c * a.sC, px), p);
    }
    red[row][lane] = sum;
    __syncthreads();
    if (active && slice == 0) {
      acc_t total = red[row][lane];
      for (int s = 1; s < a.slices; ++s) total += red[row + s][lane];
      part[(static_cast<int64_t>(blockIdx.z) * a.B + b) * a.N + n] = total;
    }
    __syncthreads();  // red is rewritten by the next sample
  }
}

// Each warp covers kPixPerWarp consecutive output pixels; lane = channel (stride 32 within the
// split's channel range).
template <typename T, typename acc_t, bool RESIZE, int P>
__global__ void __launch_bounds__(kThreads)
    map_channel_lanes(const T* __restrict__ x, MapArgs a, acc_t p, acc_t* __restrict__ part, unsigned* counter) {
  zero_counter(counter);
  const int lane = threadIdx.x;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y) * kPixPerWarp;
  if (n0 >= a.N) return;  // warp-uniform, and there is no block-level sync below
  const int64_t z = blockIdx.z;
  const int64_t c_begin = z * a.C / a.splits, c_end = (z + 1) * a.C / a.splits;

  Pixel<RESIZE> px[kPixPerWarp];
  bool valid[kPixPerWarp];
  {
    int64_t ho, wo;
    divmod(n0, a.Wo, ho, wo);
#pragma unroll
    for (int j = 0; j < kPixPerWarp; ++j) {
      valid[j] = n0 + j < a.N;
      px[j] = output_pixel<RESIZE>(valid[j] ? ho : 0, valid[j] ? wo : 0, a);
      if (++wo == a.Wo) { wo = 0; ++ho; }
    }
  }
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const T* xb = x + b * a.sB;
    acc_t sum[kPixPerWarp];
#pragma unroll
    for (int j = 0; j < kPixPerWarp; ++j) sum[j] = 0;
    for (int64_t c = c_begin + lane; c < c_end; c += kLanes) {
      const T* xc = xb + c * a.sC;
      acc_t v[kPixPerWarp];
#pragma unroll
      for (int j = 0; j < kPixPerWarp; ++j) v[j] = valid[j] ? sample<acc_t>(xc, px[j]) : acc_t(0);
#pragma unroll
      for (int j = 0; j < kPixPerWarp; ++j) sum[j] += at_power<P>(v[j], p);
    }
#pragma unroll
    for (int j = 0; j < kPixPerWarp; ++j) sum[j] = warp_sum(sum[j]);
    if (lane == 0) {
      acc_t* out = part + (z * a.B + b) * a.N + n0;
#pragma unroll
      for (int j = 0; j < kPixPerWarp; ++j)
        if (valid[j]) out[j] = sum[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Finalize: one block per sample.

// Sums x and y over the block; every thread gets the totals. Deterministic: fixed tree.
template <typename acc_t>
__device__ __forceinline__ void block_sum2(acc_t& x, acc_t& y, acc_t* smem /* 2 * kLanes */) {
  const int lane = threadIdx.x % kLanes, warp = threadIdx.x / kLanes, warps = blockDim.x / kLanes;
  x = warp_sum(x);
  y = warp_sum(y);
  __syncthreads();  // readers of the previous call are done with smem
  if (lane == 0) {
    smem[warp] = x;
    smem[kLanes + warp] = y;
  }
  __syncthreads();
  x = warp_sum(lane < warps ? smem[lane] : acc_t(0));
  y = warp_sum(lane < warps ? smem[kLanes + lane] : acc_t(0));
}

// ms, mt: the per-split channel sums [split][B][N]; each sample's split 0 is overwritten with its
// channel-mean map. The three passes keep the norms and the distance separate (the expanded
// |x|^2 + |y|^2 - 2 x.y would cancel catastrophically when student ~= teacher). Each thread owns
// n = n0 + u * blockDim.x in every pass, so pass 1's writes need no barrier before passes 2 and 3;
// kFinalizeUnroll of them per step keep several loads in flight, as one block per sample has
// few threads to hide latency with. The last block to finish (counted on `counter`, zeroed by
// the map kernel) sums the samples' partials in a fixed order into the loss: the forward needs
// no kernel after this one, and the result does not depend on which block came last.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize(acc_t* __restrict__ ms, int splits_s, acc_t inv_cs, acc_t* __restrict__ mt, int splits_t,
             acc_t inv_ct, int64_t B, int64_t N, acc_t scale, acc_t* __restrict__ partial,
             acc_t* __restrict__ coeff, unsigned* counter, acc_t* __restrict__ loss) {
  __shared__ acc_t smem[2 * kLanes];
  __shared__ bool last;
  const int64_t b = blockIdx.x;
  const int64_t split_stride = B * N;
  const int64_t step = static_cast<int64_t>(kFinalizeUnroll) * blockDim.x;
  acc_t* s_b = ms + b * N;
  acc_t* t_b = mt + b * N;

  acc_t ss = 0, tt = 0;
  for (int64_t n0 = threadIdx.x; n0 < N; n0 += step) {
    acc_t s[kFinalizeUnroll], t[kFinalizeUnroll];
#pragma unroll
    for (int u = 0; u < kFinalizeUnroll; ++u) {
      const int64_t n = n0 + u * blockDim.x;
      s[u] = n < N ? s_b[n] : acc_t(0);
      t[u] = n < N ? t_b[n] : acc_t(0);
    }
    for (int z = 1; z < splits_s; ++z)
#pragma unroll
      for (int u = 0; u < kFinalizeUnroll; ++u) {
        const int64_t n = n0 + u * blockDim.x;
        if (n < N) s[u] += s_b[z * split_stride + n];
      }
    for (int z = 1; z < splits_t; ++z)
#pragma unroll
      for (int u = 0; u < kFinalizeUnroll; ++u) {
        const int64_t n = n0 + u * blockDim.x;
        if (n < N) t[u] += t_b[z * split_stride + n];
      }
#pragma unroll
    for (int u = 0; u < kFinalizeUnroll; ++u) {
      const int64_t n = n0 + u * blockDim.x;
      if (n < N) {
        s[u] *= inv_cs;
        t[u] *= inv_ct;
        s_b[n] = s[u];
        t_b[n] = t[u];
        ss += s[u] * s[u];
        tt += t[u] * t[u];
      }
    }
  }
  block_sum2(ss, tt, smem);
  const acc_t eps = norm_eps<acc_t>();
  const acc_t norm_s = sqrt(ss), norm_t = sqrt(tt);
  const acc_t ns = norm_s > eps ? norm_s : eps, nt = norm_t > eps ? norm_t : eps;

  acc_t d2 = 0, dot = 0;  // dot = <a_s, d>
  for (int64_t n0 = threadIdx.x; n0 < N; n0 += step) {
    acc_t s[kFinalizeUnroll], t[kFinalizeUnroll];
#pragma unroll
    for (int u = 0; u < kFinalizeUnroll; ++u) {
      const int64_t n = n0 + u * blockDim.x;
      s[u] = n < N ? s_b[n] : acc_t(0);
      t[u] = n < N ? t_b[n] : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kFinalizeUnroll; ++u) {
      const acc_t as = s[u] / ns, d = as - t[u] / nt;  // 0 past the end
      d2 += d * d;
      dot += as * d;
    }
  }
  block_sum2(d2, dot, smem);
  if (threadIdx.x == 0) {
    partial[b] = d2;
    __threadfence();  // the partial is visible device-wide before this block is counted
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {
    acc_t total = 0, unused = 0;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) total += __ldcg(partial + i);  // L2, not L1
    block_sum2(total, unused, smem);
    if (threadIdx.x == 0) *loss = total * scale;
  }

  // d loss / d m_s through the normalisation (its Jacobian is (I - a a^T) / |m| above eps).
  const acc_t k = acc_t(2) * scale;
  const bool live = norm_s > eps;
  acc_t* c_b = coeff + b * N;
  for (int64_t n0 = threadIdx.x; n0 < N; n0 += step) {
    acc_t s[kFinalizeUnroll], t[kFinalizeUnroll];
#pragma unroll
    for (int u = 0; u < kFinalizeUnroll; ++u) {
      const int64_t n = n0 + u * blockDim.x;
      s[u] = n < N ? s_b[n] : acc_t(0);
      t[u] = n < N ? t_b[n] : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kFinalizeUnroll; ++u) {
      const int64_t n = n0 + u * blockDim.x;
      const acc_t as = s[u] / ns, d = as - t[u] / nt;
      if (n < N) c_b[n] = live ? k * (d - as * dot) / ns : k * d / eps;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_fs[b, c, h, w] = grad / C * sum over the outputs (ho, wo) reading (h, w) of
// weight * coeff[b, ho, wo] * d|y|^p/dy at y = ys[b, c, ho, wo] (one output, weight 1, without
// a resize).

struct BwdArgs {
  int64_t B, C, H, W;      // fs
  int64_t sB, sC, sH, sW;  // fs strides
  int64_t gB, gC, gH, gW;  // grad_fs strides
  int64_t Ho, Wo;          // coeff's grid
  float scale_h, scale_w;
  int slices, splits;
};

// Resized gradient of input pixel (h, w) for channels c, c + step, ... < c_end, kUnroll of them
// at a time so that the window walk is shared by several channels.
template <int P, typename T, typename acc_t>
__device__ __forceinline__ void gather_channels(const T* xb, T* gp, const acc_t* cb, int64_t h, int64_t w,
                                                const Range& rh, const Range& rw, const BwdArgs& a,
                                                int64_t c, int64_t c_end, int64_t step, acc_t k, acc_t p) {
  for (; c < c_end; c += kUnroll * step) {
    acc_t acc[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc[u] = 0;
    for (int64_t ho = rh.lo; ho < rh.hi; ++ho) {
      const Taps th = bilinear_taps(ho, a.H, a.scale_h);
      const float wh = tap_weight(th, h);
      if (wh == 0.f) continue;
      for (int64_t wo = rw.lo; wo < rw.hi; ++wo) {
        const Taps tw = bilinear_taps(wo, a.W, a.scale_w);
        const float ww = tap_weight(tw, w);
        if (ww == 0.f) continue;
        const acc_t wc = acc_t(wh) * acc_t(ww) * cb[ho * a.Wo + wo];
        const Pixel<true> px = tap_pixel(th, tw, a.sH, a.sW);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t cu = c + u * step;
          if (cu < c_end) acc[u] += wc * at_power_grad<P>(sample<acc_t>(xb + cu * a.sC, px), p);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t cu = c + u * step;
      if (cu < c_end) store(gp + cu * a.gC, acc[u] * k);
    }
  }
}

// Lane = input pixel, rows = contiguous channel ranges (as map_pixel_lanes, without a reduction).
template <typename T, typename acc_t, bool RESIZE, int P>
__global__ void __launch_bounds__(kThreads)
    bwd_pixel_lanes(const T* __restrict__ x, T* __restrict__ gx, const acc_t* __restrict__ coeff,
                    const acc_t* __restrict__ grad, BwdArgs a, acc_t p) {
  const int lane = threadIdx.x, row = threadIdx.y;
  const int slice = row % a.slices, group = row / a.slices, groups = kRows / a.slices;
  const int64_t n_in = a.H * a.W;
  const int64_t n = (static_cast<int64_t>(blockIdx.x) * groups + group) * kLanes + lane;
  if (n >= n_in) return;  // no block-level sync in this kernel
  const int64_t parts = static_cast<int64_t>(a.splits) * a.slices;
  const int64_t part_id = static_cast<int64_t>(blockIdx.z) * a.slices + slice;
  const int64_t c_begin = part_id * a.C / parts, c_end = (part_id + 1) * a.C / parts;
  int64_t h, w;
  divmod(n, a.W, h, w);
  const int64_t go = h * a.gH + w * a.gW;
  const acc_t k = *grad / static_cast<acc_t>(a.C);

  if constexpr (RESIZE) {
    const Range rh = bilinear_hit_range(h, a.H, a.Ho, a.scale_h);
    const Range rw = bilinear_hit_range(w, a.W, a.Wo, a.scale_w);
    for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y)
      gather_channels<P>(x + b * a.sB, gx + b * a.gB + go, coeff + b * a.Ho * a.Wo, h, w, rh, rw, a,
                         c_begin, c_end, 1, k, p);
  } else {
    const int64_t xo = h * a.sH + w * a.sW;
    for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
      const T* xp = x + b * a.sB + xo;
      T* gp = gx + b * a.gB + go;
      const acc_t f = k * coeff[b * n_in + n];  // same grid: coeff index n = h * Wo + w
      int64_t c = c_begin;
      for (; c + kUnroll <= c_end; c += kUnroll) {
        acc_t v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = load(xp + (c + u) * a.sC);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) store(gp + (c + u) * a.gC, f * at_power_grad<P>(v[u], p));
      }
      for (; c < c_end; ++c) store(gp + c * a.gC, f * at_power_grad<P>(acc_t(load(xp + c * a.sC)), p));
    }
  }
}

// Lane = channel, each warp kPixPerWarp consecutive input pixels.
template <typename T, typename acc_t, bool RESIZE, int P>
__global__ void __launch_bounds__(kThreads)
    bwd_channel_lanes(const T* __restrict__ x, T* __restrict__ gx, const acc_t* __restrict__ coeff,
                      const acc_t* __restrict__ grad, BwdArgs a, acc_t p) {
  const int lane = threadIdx.x;
  const int64_t n_in = a.H * a.W;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y) * kPixPerWarp;
  if (n0 >= n_in) return;
  const int64_t z = blockIdx.z;
  const int64_t c_begin = z * a.C / a.splits, c_end = (z + 1) * a.C / a.splits;
  const acc_t k = *grad / static_cast<acc_t>(a.C);
  int64_t h0, w0;
  divmod(n0, a.W, h0, w0);

  if constexpr (RESIZE) {
    for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
      int64_t h = h0, w = w0;
      for (int j = 0; j < kPixPerWarp && n0 + j < n_in; ++j) {
        const Range rh = bilinear_hit_range(h, a.H, a.Ho, a.scale_h);
        const Range rw = bilinear_hit_range(w, a.W, a.Wo, a.scale_w);
        gather_channels<P>(x + b * a.sB, gx + b * a.gB + h * a.gH + w * a.gW, coeff + b * a.Ho * a.Wo, h,
                           w, rh, rw, a, c_begin + lane, c_end, kLanes, k, p);
        if (++w == a.W) { w = 0; ++h; }
      }
    }
  } else {
    int64_t xo[kPixPerWarp], go[kPixPerWarp];
    bool valid[kPixPerWarp];
    {
      int64_t h = h0, w = w0;
#pragma unroll
      for (int j = 0; j < kPixPerWarp; ++j) {
        valid[j] = n0 + j < n_in;
        xo[j] = h * a.sH + w * a.sW;
        go[j] = h * a.gH + w * a.gW;
        if (++w == a.W) { w = 0; ++h; }
      }
    }
    for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
      const T* xb = x + b * a.sB;
      T* gb = gx + b * a.gB;
      acc_t f[kPixPerWarp];
#pragma unroll
      for (int j = 0; j < kPixPerWarp; ++j) f[j] = valid[j] ? k * coeff[b * n_in + n0 + j] : acc_t(0);
      for (int64_t c = c_begin + lane; c < c_end; c += kLanes) {
        acc_t v[kPixPerWarp];
#pragma unroll
        for (int j = 0; j < kPixPerWarp; ++j) v[j] = valid[j] ? acc_t(load(xb + xo[j] + c * a.sC)) : acc_t(0);
#pragma unroll
        for (int j = 0; j < kPixPerWarp; ++j)
          if (valid[j]) store(gb + go[j] + c * a.gC, f[j] * at_power_grad<P>(v[j], p));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Channel lanes when channels are the innermost of the dims that vary (channels_last).
bool use_channel_lanes(const int64_t size[4], const int64_t stride[4]) {
  if (size[1] <= 1) return false;
  int64_t pixel_stride = INT64_MAX;
  if (size[2] > 1 && stride[2] < pixel_stride) pixel_stride = stride[2];
  if (size[3] > 1 && stride[3] < pixel_stride) pixel_stride = stride[3];
  return stride[1] < pixel_stride;
}

struct Plan {
  bool channel_lanes;
  int slices, splits;
  dim3 grid;
};

// Launch shape for a kernel walking `pixels` pixels per sample of a tensor with these sizes and
// strides. Depends on shapes only, so results are bitwise reproducible across GPUs.
bool make_plan(const int64_t size[4], const int64_t stride[4], int64_t pixels, Plan& plan) {
  const int64_t B = size[0], C = size[1];
  const int64_t grid_b = B < 65535 ? B : 65535;  // kernels loop over the rest
  plan.channel_lanes = use_channel_lanes(size, stride);
  int64_t tiles, max_splits;
  if (plan.channel_lanes) {
    plan.slices = 1;
    tiles = ceil_div(pixels, kRows * kPixPerWarp);
    max_splits = C / (2 * kLanes);  // keep >= 2 channels per lane
  } else {
    plan.slices = C >= 128 ? 8 : C >= 64 ? 4 : C >= 32 ? 2 : 1;  // >= 16 channels per slice
    tiles = ceil_div(pixels, kLanes * (kRows / plan.slices));
    max_splits = C / (16 * plan.slices);
  }
  const int64_t blocks = tiles * grid_b;
  int64_t splits = blocks > 0 ? ceil_div(kTargetBlocks, blocks) : 1;
  if (splits > max_splits) splits = max_splits;
  if (splits > kMaxSplits) splits = kMaxSplits;
  if (splits < 1) splits = 1;
  plan.splits = static_cast<int>(splits);
  plan.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(grid_b), plan.splits);
  return tiles >= 1 && tiles <= INT32_MAX && grid_b >= 1;
}

// Compile-time (RESIZE, P) from the runtime flag and exponent.
template <bool R, int Pw>
struct Variant {
  static constexpr bool kResize = R;
  static constexpr int kP = Pw;
};

template <typename F>
cudaError_t with_variant(bool resize, double p, F&& f) {
  switch (at_power_kind(p)) {
    case 2: return resize ? f(Variant<true, 2>{}) : f(Variant<false, 2>{});
    case 4: return resize ? f(Variant<true, 4>{}) : f(Variant<false, 4>{});
    default: return resize ? f(Variant<true, 0>{}) : f(Variant<false, 0>{});
  }
}

template <typename T, typename acc_t>
cudaError_t launch_map(const Tensor4& t, const MapArgs& a, const Plan& plan, double p, acc_t* part,
                       unsigned* counter, cudaStream_t stream) {
  const T* x = static_cast<const T*>(t.data);
  const bool resize = a.H != a.Ho || a.W != a.Wo;
  return with_variant(resize, p, [&](auto v) {
    constexpr bool R = decltype(v)::kResize;
    constexpr int P = decltype(v)::kP;
    const dim3 block(kLanes, kRows);
    if (plan.channel_lanes)
      map_channel_lanes<T, acc_t, R, P><<<plan.grid, block, 0, stream>>>(x, a, acc_t(p), part, counter);
    else
      map_pixel_lanes<T, acc_t, R, P><<<plan.grid, block, 0, stream>>>(x, a, acc_t(p), part, counter);
    return cudaGetLastError();
  });
}

cudaError_t map_dtype(const Tensor4& t, const MapArgs& a, const Plan& plan, double p, float* part,
                      unsigned* counter, cudaStream_t stream) {
  switch (t.dtype) {
    case DType::kFloat16: return launch_map<__half>(t, a, plan, p, part, counter, stream);
    case DType::kBFloat16: return launch_map<__nv_bfloat16>(t, a, plan, p, part, counter, stream);
    case DType::kFloat32: return launch_map<float>(t, a, plan, p, part, counter, stream);
    default: return cudaErrorInvalidValue;  // float64 needs float64 accumulation
  }
}

cudaError_t map_dtype(const Tensor4& t, const MapArgs& a, const Plan& plan, double p, double* part,
                      unsigned* counter, cudaStream_t stream) {
  if (t.dtype != DType::kFloat64) return cudaErrorInvalidValue;
  return launch_map<double>(t, a, plan, p, part, counter, stream);
}

MapArgs map_args(const Tensor4& t, int64_t Ho, int64_t Wo, const Plan& plan) {
  MapArgs a;
  a.B = t.size[0];
  a.C = t.size[1];
  a.H = t.size[2];
  a.W = t.size[3];
  a.sB = t.stride[0];
  a.sC = t.stride[1];
  a.sH = t.stride[2];
  a.sW = t.stride[3];
  a.Ho = Ho;
  a.Wo = Wo;
  a.N = Ho * Wo;
  a.scale_h = static_cast<float>(a.H) / static_cast<float>(Ho);
  a.scale_w = static_cast<float>(a.W) / static_cast<float>(Wo);
  a.slices = plan.slices;
  a.splits = plan.splits;
  return a;
}

template <typename acc_t>
cudaError_t forward_impl(const Tensor4& fs, const Tensor4& ft, double p, double scale, acc_t* workspace,
                         acc_t* partial, acc_t* coeff, unsigned* counter, acc_t* loss, cudaStream_t stream) {
  const int64_t B = fs.size[0], Ho = ft.size[2], Wo = ft.size[3], N = Ho * Wo;
  Plan ps, pt;
  const bool ok_s = make_plan(fs.size, fs.stride, N, ps), ok_t = make_plan(ft.size, ft.stride, N, pt);
  acc_t* ms = workspace;
  acc_t* mt = workspace + ps.splits * B * N;
  if (N <= 0 || !ok_s || !ok_t) return cudaErrorInvalidConfiguration;
  cudaError_t err = map_dtype(fs, map_args(fs, Ho, Wo, ps), ps, p, ms, counter, stream);
  if (err != cudaSuccess) return err;
  err = map_dtype(ft, map_args(ft, Ho, Wo, pt), pt, p, mt, nullptr, stream);
  if (err != cudaSuccess) return err;
  if (B > INT32_MAX) return cudaErrorInvalidConfiguration;
  const acc_t inv_cs = acc_t(1) / static_cast<acc_t>(fs.size[1]);
  const acc_t inv_ct = acc_t(1) / static_cast<acc_t>(ft.size[1]);
  finalize<acc_t><<<static_cast<unsigned>(B), kFinalizeThreads, 0, stream>>>(
      ms, ps.splits, inv_cs, mt, pt.splits, inv_ct, B, N, static_cast<acc_t>(scale), partial, coeff, counter, loss);
  return cudaGetLastError();
}

template <typename T, typename acc_t>
cudaError_t backward_impl(const acc_t* grad, const Tensor4& fs, void* grad_fs, const BwdArgs& a,
                          const Plan& plan, const acc_t* coeff, double p, cudaStream_t stream) {
  const T* x = static_cast<const T*>(fs.data);
  T* gx = static_cast<T*>(grad_fs);
  const bool resize = a.H != a.Ho || a.W != a.Wo;
  return with_variant(resize, p, [&](auto v) {
    constexpr bool R = decltype(v)::kResize;
    constexpr int P = decltype(v)::kP;
    const dim3 block(kLanes, kRows);
    if (plan.channel_lanes)
      bwd_channel_lanes<T, acc_t, R, P><<<plan.grid, block, 0, stream>>>(x, gx, coeff, grad, a, acc_t(p));
    else
      bwd_pixel_lanes<T, acc_t, R, P><<<plan.grid, block, 0, stream>>>(x, gx, coeff, grad, a, acc_t(p));
    return cudaGetLastError();
  });
}

}  // namespace

int64_t at_forward_workspace(const Tensor4& fs, const Tensor4& ft) {
  const int64_t B = fs.size[0], N = ft.size[2] * ft.size[3];
  Plan ps, pt;
  make_plan(fs.size, fs.stride, N, ps);
  make_plan(ft.size, ft.stride, N, pt);
  return (static_cast<int64_t>(ps.splits) + pt.splits) * B * N;
}

cudaError_t at_forward(const Tensor4& fs, const Tensor4& ft, double p, double scale, void* workspace,
                       void* partial, void* coeff, void* counter, void* loss, cudaStream_t stream) {
  if (fs.size[0] == 0) return cudaErrorInvalidValue;  // validation rejects empty inputs
  unsigned* count = static_cast<unsigned*>(counter);
  if (fs.dtype == DType::kFloat64)
    return forward_impl(fs, ft, p, scale, static_cast<double*>(workspace), static_cast<double*>(partial),
                        static_cast<double*>(coeff), count, static_cast<double*>(loss), stream);
  return forward_impl(fs, ft, p, scale, static_cast<float*>(workspace), static_cast<float*>(partial),
                      static_cast<float*>(coeff), count, static_cast<float*>(loss), stream);
}

cudaError_t at_backward(const void* grad, const Tensor4& fs, void* grad_fs, const int64_t grad_fs_stride[4],
                        const void* coeff, int64_t Ho, int64_t Wo, double p, cudaStream_t stream) {
  if (fs.size[0] == 0 || fs.size[1] == 0 || fs.size[2] == 0 || fs.size[3] == 0) return cudaSuccess;
  BwdArgs a;
  a.B = fs.size[0];
  a.C = fs.size[1];
  a.H = fs.size[2];
  a.W = fs.size[3];
  a.sB = fs.stride[0];
  a.sC = fs.stride[1];
  a.sH = fs.stride[2];
  a.sW = fs.stride[3];
  a.gB = grad_fs_stride[0];
  a.gC = grad_fs_stride[1];
  a.gH = grad_fs_stride[2];
  a.gW = grad_fs_stride[3];
  a.Ho = Ho;
  a.Wo = Wo;
  a.scale_h = static_cast<float>(a.H) / static_cast<float>(Ho);
  a.scale_w = static_cast<float>(a.W) / static_cast<float>(Wo);
  // The writes decide the layout: uncoalesced stores cost far more than uncoalesced loads.
  Plan plan;
  if (!make_plan(fs.size, grad_fs_stride, a.H * a.W, plan)) return cudaErrorInvalidConfiguration;
  a.slices = plan.slices;
  a.splits = plan.splits;
  switch (fs.dtype) {
    case DType::kFloat16:
      return backward_impl<__half>(static_cast<const float*>(grad), fs, grad_fs, a, plan,
                                   static_cast<const float*>(coeff), p, stream);
    case DType::kBFloat16:
      return backward_impl<__nv_bfloat16>(static_cast<const float*>(grad), fs, grad_fs, a, plan,
                                          static_cast<const float*>(coeff), p, stream);
    case DType::kFloat32:
      return backward_impl<float>(static_cast<const float*>(grad), fs, grad_fs, a, plan,
                                  static_cast<const float*>(coeff), p, stream);
    case DType::kFloat64:
      return backward_impl<double>(static_cast<const double*>(grad), fs, grad_fs, a, plan,
                                   static_cast<const double*>(coeff), p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace kdk
