// Pixel KL on CUDA: the kernel and its host launcher (declared in pixel_kl_kernel.h), torch-free.
// One pass over zs and zt writes the per-block KL sums and, when asked, d loss / d zs.
//
// Thread layout. A group of G threads (a power of two) serves one pixel; thread `slice` of the
// group holds channels slice, slice + G, ... of zs and zt, at most kValues of each, in registers.
// G is the smallest power of two that fits the pixel's Kv = max(K, 2) logits (the binary case is
// the two logits (z, 0)) into kValues per thread: G = 1 up to 16 channels, 2 for HLFD's 19 and
// Hyper-Kvasir's 23 classes, 16 for HLFD's 256 features. Beyond 32 * kValues channels G = 32 and
// every sweep re-reads the logits from memory (CACHED = false). A block of 256 threads covers
// 256 / G pixels of the flattened (b, h, w) index:
//  - pixel lanes (channels are planes: NCHW and views of it): consecutive threads take
//    consecutive pixels of one channel, so one warp load is 32 (G <= 8) or 256 / G consecutive
//    elements;
//  - channel lanes (channel stride 1: channels_last, (B, K) logits): consecutive threads take
//    consecutive channels of a pixel, then the next pixel: warp loads walk contiguous memory.
// The layout follows the gradient's strides when it is written (uncoalesced stores cost more
// than uncoalesced loads), else the student's.
//
// Per thread: the maxima of its channels, then exps and sums against them (no online rescaling:
// the values are at hand). The G partial statistics of a pixel are merged in slice order through
// shared memory by slice 0, which finishes the pixel (KL, lse_s - lse_t, reciprocal sums) and
// shares that back; every thread then writes the gradient of its channels. Each block's KL sum
// is reduced in a fixed order into one double; the caller adds those in order. No atomics:
// results are bitwise reproducible (launch shapes depend only on sizes and strides).
//
// Precision: the formulas of kdkernels/triton/pixel_kl.py (see there and csrc/cpu/pixel_kl.cpp):
// with d = (zs - zt) / T, u = a + c, a = E_pt[d], c = E_pt[e^d - 1 - d]:
//   KL = c - psi(u), lse_s - lse_t = u - psi(u), psi(u) = u - log1p(u),   where every |d| <= 1,
//   KL = lse_s - lse_t - a                                                 elsewhere,
// and p_s - p_t = p_t expm1(d - (lse_s - lse_t)) for small arguments. float32 arithmetic
// (__expf: the logits' own rounding dominates its error), float64 for float64 inputs.
#include "pixel_kl_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kdk {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kValues = 16;    // logits per thread and tensor held in registers
constexpr int kMaxGroup = 32;  // threads per pixel at most
constexpr unsigned kFullMask = 0xffffffffu;

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

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// q = a / b, r = a % b for a >= 0, b > 0: the 32-bit division when both fit.
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

// e^d - 1 - d by its Taylor series, accurate to the last bit of acc_t for |d| <= 1: terms to
// d^11 (float) or d^18 (double).
template <typename acc_t>
__device__ __forceinline__ acc_t phi(acc_t d) {
  constexpr int kTerms = sizeof(acc_t) == 4 ? 10 : 17;  // coefficients 1/2!, ..., 1/(kTerms+1)!
  constexpr double kInvFact[17] = {
      1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
      1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0, 1.0 / 87178291200.0,
      1.0 / 1307674368000.0, 1.0 / 20922789888000.0, 1.0 / 355687428096000.0,
      1.0 / 6402373705728000.0};
  acc_t q = static_cast<acc_t>(kInvFact[kTerms - 1]);
#pragma unroll
  for (int k = kTerms - 2; k >= 0; --k) q = q * d + static_cast<acc_t>(kInvFact[k]);
  return q * d * d;
}

template <typename acc_t>
__device__ __forceinline__ acc_t clamp_unit(acc_t x) {
  return fmin(fmax(x, acc_t(-1)), acc_t(1));
}

// u - log1p(u) >= 0 without cancellation: its series (to u^17) for |u| < 0.1.
template <typename acc_t>
__device__ __forceinline__ acc_t psi(acc_t u) {
  if (fabs(u) >= acc_t(0.1)) return u - log1p(u);
  acc_t q = acc_t(-1.0 / 17.0);
#pragma unroll
  for (int k = 16; k >= 2; --k) q = q * u + acc_t((k % 2 == 0 ? 1.0 : -1.0) / k);
  return q * u * u;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;  // the butterfly leaves the same total in every lane
}

struct Args {
  int64_t K, Kv, W, N, pixels;
  int G, P;                   // threads per pixel, pixels per block
  int64_t s[4], t[4], g[4];   // element strides of zs, zt, grad (B, K, H, W)
  int64_t m[3];               // of the mask (B, H, W)
  const int64_t* count_dev;   // the number of counted pixels on the device, or nullptr:
  int64_t count_host;         // then this one
  double temperature;
};

// One thread's (and, merged, one pixel's) sums over channels: maxima of the raw logits, sums of
// e = exp((z - m) / T), of e_t d and e_t phi(d), and max |d|.
template <typename acc_t>
struct Stats {
  acc_t ms, mt, ss, st, sd, sphi, dmax;
};
constexpr int kStats = 7;

template <typename acc_t>
__device__ __forceinline__ void put(acc_t (*sh)[kThreads], int i, const Stats<acc_t>& s) {
  sh[0][i] = s.ms;
  sh[1][i] = s.mt;
  sh[2][i] = s.ss;
  sh[3][i] = s.st;
  sh[4][i] = s.sd;
  sh[5][i] = s.sphi;
  sh[6][i] = s.dmax;
}

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> get(const acc_t (*sh)[kThreads], int i) {
  return {sh[0][i], sh[1][i], sh[2][i], sh[3][i], sh[4][i], sh[5][i], sh[6][i]};
}

// x += y, both against their own maxima (online-softmax merge).
template <typename acc_t>
__device__ __forceinline__ void merge(Stats<acc_t>& x, const Stats<acc_t>& y, acc_t inv_t) {
  const acc_t ms = fmax(x.ms, y.ms), mt = fmax(x.mt, y.mt);
  const acc_t fxs = exp_acc((x.ms - ms) * inv_t), fys = exp_acc((y.ms - ms) * inv_t);
  const acc_t fxt = exp_acc((x.mt - mt) * inv_t), fyt = exp_acc((y.mt - mt) * inv_t);
  x.ss = x.ss * fxs + y.ss * fys;
  x.st = x.st * fxt + y.st * fyt;
  x.sd = x.sd * fxt + y.sd * fyt;
  x.sphi = x.sphi * fxt + y.sphi * fyt;
  x.dmax = fmax(x.dmax, y.dmax);
  x.ms = ms;
  x.mt = mt;
}

// What the gradient sweep needs of a finished pixel.
template <typename acc_t>
struct Finished {
  acc_t ms, mt, delta, inv_ss, inv_st;
};
constexpr int kFinished = 5;

template <typename acc_t>
__device__ __forceinline__ Finished<acc_t> finish(const Stats<acc_t>& s, acc_t inv_t, acc_t& kl) {
  Finished<acc_t> f{s.ms, s.mt, acc_t(0), acc_t(1) / s.ss, acc_t(1) / s.st};
  const acc_t a = s.sd * f.inv_st, c = s.sphi * f.inv_st;
  if (s.dmax <= acc_t(1)) {  // near the teacher: small terms, no cancellation
    const acc_t u = a + c, p = psi(u);
    f.delta = u - p;
    kl = c - p;
  } else {
    f.delta = (s.ms - s.mt) * inv_t + log(s.ss * f.inv_st);
    kl = f.delta - a;
  }
  return f;
}

template <typename T, typename acc_t, bool CHANNEL_LANES, bool CACHED>
__global__ void __launch_bounds__(kThreads)
    pixel_kl_kernel(const T* __restrict__ zs, const T* __restrict__ zt, const bool* __restrict__ mask,
                    T* __restrict__ grad, Args a, double* __restrict__ partial) {
  __shared__ acc_t part[kStats][kThreads];   // per thread, for the merge (G > 1)
  __shared__ acc_t fin[kFinished][kThreads];  // per pixel of the block, shared back (G > 1)
  __shared__ double warp_kl[kWarps];
  const int tid = threadIdx.x, G = a.G, P = a.P;
  const int slice = CHANNEL_LANES ? tid % G : tid / P;
  const int px = CHANNEL_LANES ? tid / G : tid % P;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * P + px;
  const bool ok = pixel < a.pixels;
  int64_t b = 0, n = 0, h = 0, w = 0;
  if (ok) {
    divmod(pixel, a.N, b, n);
    divmod(n, a.W, h, w);
  }
  const T* s_px = zs + b * a.s[0] + h * a.s[2] + w * a.s[3];
  const T* t_px = zt + b * a.t[0] + h * a.t[2] + w * a.t[3];
  const bool counted = ok && (mask == nullptr || mask[b * a.m[0] + h * a.m[1] + w * a.m[2]]);
  const acc_t inv_t = static_cast<acc_t>(1.0 / a.temperature);
  const int J = ok ? static_cast<int>((a.Kv - slice + G - 1) / G) : 0;  // this thread's channels

  // Channel slice + j * G; the rows K .. Kv - 1 (the binary case's second logit) are 0.
  auto logit = [&](const T* base, int64_t stride, int j) -> acc_t {
    const int64_t c = slice + static_cast<int64_t>(j) * G;
    return c < a.K ? static_cast<acc_t>(load(base + c * stride)) : acc_t(0);
  };
  acc_t vs[CACHED ? kValues : 1], vt[CACHED ? kValues : 1];
  if constexpr (CACHED) {
#pragma unroll
    for (int j = 0; j < kValues; ++j)
      if (j < J) {
        vs[j] = logit(s_px, a.s[1], j);
        vt[j] = logit(t_px, a.t[1], j);
      }
  }
  // f(j, zs_j, zt_j) over this thread's channels; fully unrolled over registers when CACHED.
  auto each = [&](auto&& f) {
    if constexpr (CACHED) {
#pragma unroll
      for (int j = 0; j < kValues; ++j)
        if (j < J) f(j, vs[j], vt[j]);
    } else {
      for (int j = 0; j < J; ++j) f(j, logit(s_px, a.s[1], j), logit(t_px, a.t[1], j));
    }
  };

  const acc_t ninf = -INFINITY;
  Stats<acc_t> st{ninf, ninf, acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  each([&](int, acc_t s, acc_t t) {
    st.ms = fmax(st.ms, s);
    st.mt = fmax(st.mt, t);
  });
  each([&](int, acc_t s, acc_t t) {
    const acc_t es = exp_acc((s - st.ms) * inv_t), et = exp_acc((t - st.mt) * inv_t);
    const acc_t d = (s - t) * inv_t;  // an exact difference, then one rounding
    st.ss += es;
    st.st += et;
    st.sd += et * d;
    // phi only matters where every |d| <= 1; elsewhere any finite value will do.
    st.sphi += et * phi(clamp_unit(d));
    st.dmax = fmax(st.dmax, fabs(d));
  });

  acc_t kl = 0;
  Finished<acc_t> f;
  if (G == 1) {
    f = finish(st, inv_t, kl);
  } else {
    put(part, tid, st);
    __syncthreads();
    if (slice == 0 && ok) {
      for (int s = 1; s < G; ++s) merge(st, get(part, CHANNEL_LANES ? tid + s : tid + s * P), inv_t);
      f = finish(st, inv_t, kl);
      fin[0][px] = f.ms;
      fin[1][px] = f.mt;
      fin[2][px] = f.delta;
      fin[3][px] = f.inv_ss;
      fin[4][px] = f.inv_st;
    }
    __syncthreads();
    f = {fin[0][px], fin[1][px], fin[2][px], fin[3][px], fin[4][px]};
  }

  if (grad != nullptr && ok) {
    const acc_t count = a.count_dev != nullptr ? static_cast<acc_t>(*a.count_dev)
                                               : static_cast<acc_t>(a.count_host);
    const acc_t scale = static_cast<acc_t>(a.temperature) / count;
    T* g_px = grad + b * a.g[0] + h * a.g[2] + w * a.g[3];
    each([&](int j, acc_t s, acc_t t) {
      const int64_t c = slice + static_cast<int64_t>(j) * G;
      if (c >= a.K) return;
      const acc_t pt = exp_acc((t - f.mt) * inv_t) * f.inv_st;
      const acc_t x = (s - t) * inv_t - f.delta;
      acc_t g;
      if (fabs(x) <= acc_t(1)) g = pt * (x + phi(x));  // p_t expm1(x)
      else g = exp_acc((s - f.ms) * inv_t) * f.inv_ss - pt;
      // An excluded pixel may hold NaN: its gradient is 0, never g * 0.
      store(g_px + c * a.g[1], counted ? g * scale : acc_t(0));
    });
  }

  double v = slice == 0 && counted ? static_cast<double>(kl) : 0.0;
  v = warp_sum(v);
  if (tid % 32 == 0) warp_kl[tid / 32] = v;
  __syncthreads();
  if (tid == 0) {
    double total = 0;
    for (int k = 0; k < kWarps; ++k) total += warp_kl[k];
    partial[blockIdx.x] = total;
  }
}

struct Plan {
  int G, P;
  bool cached;
  int64_t blocks;
};

Plan make_plan(const Tensor4& zs) {
  const int64_t K = zs.size[1], Kv = K < 2 ? 2 : K;
  Plan p;
  p.G = 1;
  while (p.G < kMaxGroup && (Kv + p.G - 1) / p.G > kValues) p.G *= 2;
  p.cached = (Kv + p.G - 1) / p.G <= kValues;
  p.P = kThreads / p.G;
  const int64_t pixels = zs.size[0] * zs.size[2] * zs.size[3];
  p.blocks = (pixels + p.P - 1) / p.P;
  return p;
}

template <typename T, typename acc_t>
cudaError_t launch(const Tensor4& zs, const Tensor4& zt, const Mask3& mask, void* grad,
                   bool channel_lanes, const Plan& plan, const Args& a, double* partial,
                   cudaStream_t stream) {
  const T* s = static_cast<const T*>(zs.data);
  const T* t = static_cast<const T*>(zt.data);
  T* g = static_cast<T*>(grad);
  const auto kernel =
      channel_lanes ? (plan.cached ? pixel_kl_kernel<T, acc_t, true, true> : pixel_kl_kernel<T, acc_t, true, false>)
                    : (plan.cached ? pixel_kl_kernel<T, acc_t, false, true> : pixel_kl_kernel<T, acc_t, false, false>);
  kernel<<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(s, t, mask.data, g, a, partial);
  return cudaGetLastError();
}

}  // namespace

int64_t pixel_kl_partials(const Tensor4& zs) { return make_plan(zs).blocks; }

cudaError_t pixel_kl_forward(const Tensor4& zs, const Tensor4& zt, const Mask3& mask,
                             const int64_t* count_dev, int64_t count_host, double temperature,
                             void* grad, const int64_t grad_stride[4], double* partial,
                             cudaStream_t stream) {
  if (zs.dtype != zt.dtype) return cudaErrorInvalidValue;
  const Plan plan = make_plan(zs);
  if (plan.blocks < 1) return cudaSuccess;
  if (plan.blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  Args a;
  a.K = zs.size[1];
  a.Kv = a.K < 2 ? 2 : a.K;
  a.W = zs.size[3];
  a.N = zs.size[2] * zs.size[3];
  a.pixels = zs.size[0] * a.N;
  a.G = plan.G;
  a.P = plan.P;
  for (int d = 0; d < 4; ++d) {
    a.s[d] = zs.stride[d];
    a.t[d] = zt.stride[d];
    a.g[d] = grad != nullptr ? grad_stride[d] : 0;
  }
  for (int d = 0; d < 3; ++d) a.m[d] = mask.stride[d];
  a.count_dev = count_dev;
  a.count_host = count_host;
  a.temperature = temperature;
  const int64_t* layout = grad != nullptr ? grad_stride : zs.stride;
  const bool channel_lanes = a.K > 1 && layout[1] == 1;
  switch (zs.dtype) {
    case DType::kFloat16:
      return launch<__half, float>(zs, zt, mask, grad, channel_lanes, plan, a, partial, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16, float>(zs, zt, mask, grad, channel_lanes, plan, a, partial, stream);
    case DType::kFloat32:
      return launch<float, float>(zs, zt, mask, grad, channel_lanes, plan, a, partial, stream);
    case DType::kFloat64:
      return launch<double, double>(zs, zt, mask, grad, channel_lanes, plan, a, partial, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace kdk
