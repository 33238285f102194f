// Pieces shared by the CPU channel- and pixel-relation kernels: strided reads and writes of a
// (B, C, H, W) feature map, the per-pixel L2 normalisation and its backward, a deterministic
// split-K Gram, and the exp helpers of the float rows.
//
// Determinism: work is split into tasks whose shapes depend only on the problem size (never on
// the thread count), each task's BLAS call runs inside at::parallel_for (single-threaded in an
// OpenMP worker), and partial results are summed in a fixed order. No atomics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace kdk {
namespace rel {

constexpr double kEps = 1e-12;  // the L2-normalisation epsilon (F.normalize's default)

// Pixels per task of the pixel-wise passes: with C = 64 float channels a block is 64 KiB, so the
// second read of it (normalise after the norm) comes from L2.
constexpr int64_t kPixBlock = 256;

// Columns of N per partial Gram: long enough for an efficient GEMM; short, because each partial
// accumulates in the GEMM's type (float32 for float inputs) and only the partials are summed in
// double (512 rather than 2048 halves the float32 error of near-teacher Grams). Fixed, so the
// summation order never depends on the machine.
constexpr int64_t kGramChunk = 512;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Small helpers and row loops are forced inline: into the per-ISA clones (KDK_ROW_CLONES) and so
// that lambdas passed to them vectorise with the loop around them.
#define KDK_ALWAYS_INLINE __attribute__((always_inline)) inline

// A (B, C, H, W) tensor through its strides; pixel n is (n / W, n % W).
struct Map4 {
  int64_t B, C, H, W, N, sB, sC, sH, sW;
};

inline Map4 map4(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3), t.size(2) * t.size(3),
          t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// off[i] = offset of pixel n0 + i inside a (b, c) plane; the division is paid once per pixel,
// not once per element.
inline void pixel_offsets(const Map4& v, int64_t n0, int64_t len, int64_t* off) {
  int64_t h = n0 / v.W, w = n0 % v.W;
  for (int64_t i = 0; i < len; ++i) {
    off[i] = h * v.sH + w * v.sW;
    if (++w == v.W) { w = 0; ++h; }
  }
}

// The pixels of one (b, c) plane of a (B, C, H, W) map, through its strides: in NCHW-style
// layouts (one contiguous run of N) the loops index directly and vectorise; otherwise (channels
// last, strided views) through the offsets of pixel_offsets.
struct PlaneRun {
  bool flat;
  int64_t n0;
  const int64_t* off;
};

inline bool flat_planes(const Map4& v) { return v.sW == 1 && v.sH == v.W; }

// dst[pixel n0 + i of the plane] = value(i) for i < len.
template <typename scalar_t, typename F>
KDK_ALWAYS_INLINE void store_run(scalar_t* plane, const PlaneRun& run, int64_t len, F value) {
  if (run.flat) {
    scalar_t* dst = plane + run.n0;
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<scalar_t>(value(i));
  } else {
    for (int64_t i = 0; i < len; ++i) plane[run.off[i]] = static_cast<scalar_t>(value(i));
  }
}

// f(i, x) for the pixels n0 .. n0 + len of the plane, x = the value as double.
template <typename scalar_t, typename F>
KDK_ALWAYS_INLINE void load_run(const scalar_t* plane, const PlaneRun& run, int64_t len, F f) {
  if (run.flat) {
    const scalar_t* src = plane + run.n0;
    for (int64_t i = 0; i < len; ++i) f(i, static_cast<double>(src[i]));
  } else {
    for (int64_t i = 0; i < len; ++i) f(i, static_cast<double>(plane[run.off[i]]));
  }
}

// One contiguous (B, C, N) tensor of `dtype` with x's values: x itself when it already is one,
// otherwise a single copy (layout change and conversion in one pass).
inline at::Tensor to_bcn(const at::Tensor& x, at::ScalarType dtype) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  if (x.scalar_type() == dtype && x.is_contiguous()) return x.view({B, C, N});
  at::Tensor out = at::empty({B, C, N}, x.options().dtype(dtype));
  out.view(x.sizes()).copy_(x);
  return out;
}

// Upstream gradient of a 0-dim loss, whatever its dtype.
inline double scalar_grad(const at::Tensor& grad) { return grad.item<double>(); }

// ---------------------------------------------------------------------------------------------
// Row kernels. They are written so that GCC vectorises them at -O3:
// - selects go through select() below: a ternary on a floating-point comparison is a branch to
//   GCC's if-conversion, which (with -ftrapping-math, the default) refuses to speculate FP work
//   past it and then gives up on the whole loop;
// - reductions keep kLanes partial sums, folded in lane order at the end: the compiler may not
//   reorder a single floating-point sum, but it vectorises the lane loop, and the order is fixed
//   by the source, so results are deterministic.
// The float kernels are additionally compiled for x86-64-v3/v4 (AVX2+FMA / AVX-512) and picked
// at load time (KDK_ROW_CLONES): the exp-heavy kl rows run about 2.5x faster than with SSE2.
// Results then differ between machines in the last bits (FMA), never between runs.
constexpr int kLanes = 8;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KDK_ROW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KDK_ROW_CLONES
#endif

inline uint32_t bits_of(float x) { uint32_t b; std::memcpy(&b, &x, sizeof(b)); return b; }
inline uint64_t bits_of(double x) { uint64_t b; std::memcpy(&b, &x, sizeof(b)); return b; }
inline float from_bits(uint32_t b) { float x; std::memcpy(&x, &b, sizeof(x)); return x; }
inline double from_bits(uint64_t b) { double x; std::memcpy(&x, &b, sizeof(x)); return x; }

// c ? a : b, branch-free: the comparison becomes an all-ones / all-zeros mask.
template <typename T>
KDK_ALWAYS_INLINE T select(bool c, T a, T b) {
  using U = decltype(bits_of(a));
  const U m = U(0) - static_cast<U>(c);
  return from_bits(static_cast<U>((bits_of(a) & m) | (bits_of(b) & ~m)));
}
template <typename T>
KDK_ALWAYS_INLINE T max_nan_last(T a, T m) { return select(a > m, a, m); }  // NaN a is skipped

// exp for the float rows: libm's expf is a call the compiler cannot vectorise. Cody-Waite
// reduction x = k ln2 + r, |r| <= ln2 / 2, and Cephes' degree-5 polynomial for e^r: about 1 ulp
// on [-87.3, 88]; 0 below, +inf above; NaN stays NaN. 2^k is built in the integer domain from
// the float k + 127 + 1.5 * 2^23, whose low mantissa bits are k + 127 (no float-to-int
// conversion). The double rows use std::exp: they serve float64 inputs, where accuracy is the
// point and speed is not.
KDK_ALWAYS_INLINE float exp_acc(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  float xc = select(x < lo, lo, x);  // NaN passes through both clamps
  xc = select(xc > hi, hi, xc);
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (xc - kf * 0.693359375f) - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const float scale = from_bits(bits_of(kf + 12583039.0f) << 23);  // 12583039 = 1.5 * 2^23 + 127
  return select(x > hi, std::numeric_limits<float>::infinity(), select(x < lo, 0.0f, y * scale));
}
KDK_ALWAYS_INLINE double exp_acc(double x) { return std::exp(x); }

template <typename T>
KDK_ALWAYS_INLINE T clamp_unit(T x) { return select(x > T(1), T(1), select(x < T(-1), T(-1), x)); }

// phi(d) = e^d - 1 - d for |d| <= 1 from its Taylor series, accurate to the last bit of T where
// the subtraction would cancel: phi(d) ~ d^2 / 2 near 0. Terms up to d^10 / 10! (float) or
// d^18 / 18! (double): the first term left out is below 4e-8 (float) / 2e-17 (double) of phi.
template <typename T>
KDK_ALWAYS_INLINE T phi_small(T d) {
  constexpr int kTerms = sizeof(T) == 4 ? 9 : 17;  // coefficients 1/2!, ..., 1/(kTerms+1)!
  constexpr double kInvFact[17] = {  // 1/k! for k = 2 .. 18
      1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
      1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0, 1.0 / 87178291200.0,
      1.0 / 1307674368000.0, 1.0 / 20922789888000.0, 1.0 / 355687428096000.0,
      1.0 / 6402373705728000.0};
  T p = static_cast<T>(kInvFact[kTerms - 1]);
  for (int k = kTerms - 2; k >= 0; --k) p = p * d + static_cast<T>(kInvFact[k]);
  return p * d * d;
}

// sum_i x[i] * y[i] in double (lane partials, see kLanes).
template <typename T>
KDK_ALWAYS_INLINE double dot_acc(const T* x, const T* y, int64_t n) {
  double part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l)
      part[l] += static_cast<double>(x[i + l]) * static_cast<double>(y[i + l]);
  double s = 0;
  for (; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Per-pixel L2 normalisation: out[b, c, n] = x[b, c, n] / max(||x[b, :, n]||, eps) into a
// contiguous (B, C, N) buffer of out_t, reading x through its strides; norms[b, n] = the raw
// norm (the backward needs it for its eps branch). Sums of squares and the division are in
// double whatever the input type: it costs one pass over B*C*N and keeps unit vectors unit.
template <typename out_t>
void pixel_normalize(const at::Tensor& x, out_t* out, double* norms) {
  const Map4 v = map4(x);
  const int64_t blocks = ceil_div(v.N, kPixBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kdk_pixel_normalize", [&] {
    const scalar_t* xd = x.data_ptr<scalar_t>();
    at::parallel_for(0, v.B * blocks, 1, [&](int64_t begin, int64_t end) {
      int64_t off[kPixBlock];
      double inv[kPixBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, n0 = (task % blocks) * kPixBlock;
        const int64_t len = std::min(kPixBlock, v.N - n0);
        const PlaneRun run{flat_planes(v), n0, off};
        if (!run.flat) pixel_offsets(v, n0, len, off);
        std::fill(inv, inv + len, 0.0);
        for (int64_t c = 0; c < v.C; ++c)
          load_run(xd + b * v.sB + c * v.sC, run, len, [&](int64_t i, double x) { inv[i] += x * x; });
        for (int64_t i = 0; i < len; ++i) {
          const double nrm = std::sqrt(inv[i]);
          norms[b * v.N + n0 + i] = nrm;
          inv[i] = std::max(nrm, kEps);
        }
        for (int64_t c = 0; c < v.C; ++c) {
          out_t* dst = out + (b * v.C + c) * v.N + n0;
          load_run(xd + b * v.sB + c * v.sC, run, len,
                   [&](int64_t i, double x) { dst[i] = static_cast<out_t>(x / inv[i]); });
        }
      }
    });
  });
}

// The normalisation backward for pixels n0 .. n0 + len of sample b:
//   gx[b, :, n] = k * (dA - a <a, dA>) / n   (n > eps),   k * dA / eps   (otherwise)
// with dA (C x len, row stride ldd) and a = the normalised pixels (C x len, row stride lda).
// Writes gx (any strides, fs's dtype).
template <typename scalar_t, typename T>
void normalize_backward_block(const T* dA, int64_t ldd, const T* a, int64_t lda,
                              const double* norms, double k, int64_t C, int64_t len,
                              scalar_t* gx_b, int64_t gsC, const PlaneRun& run) {
  double dot[kPixBlock];
  std::fill(dot, dot + len, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const T* ar = a + c * lda;
    const T* dr = dA + c * ldd;
    for (int64_t i = 0; i < len; ++i) dot[i] += static_cast<double>(ar[i]) * static_cast<double>(dr[i]);
  }
  double scale[kPixBlock];
  for (int64_t i = 0; i < len; ++i) {
    const bool unit = norms[i] > kEps;
    scale[i] = k / (unit ? norms[i] : kEps);
    if (!unit) dot[i] = 0.0;  // x / eps has no norm dependence: the projection drops out
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* ar = a + c * lda;
    const T* dr = dA + c * ldd;
    store_run(gx_b + c * gsC, run, len, [&](int64_t i) {
      return (static_cast<double>(dr[i]) - static_cast<double>(ar[i]) * dot[i]) * scale[i];
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Products below this many multiply-adds skip BLAS: a BLAS or oneDNN call costs microseconds of
// set-up, several times the product itself at the shapes of a classification head or a small map.
constexpr int64_t kSmallGemm = int64_t(1) << 15;

// out (M x P, row stride ldo) = alpha * x y (+ beta * out when accumulate): x (M x K) and y
// (K x P) through their row and column strides, sums in Acc. For small products only.
template <typename T, typename Acc = T>
void small_gemm(const T* x, int64_t xr, int64_t xc, const T* y, int64_t yr, int64_t yc, T* out, int64_t ldo,
                int64_t M, int64_t K, int64_t P, Acc alpha = Acc(1), bool accumulate = false) {
  std::vector<Acc> row(P);
  for (int64_t i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), Acc(0));
    for (int64_t k = 0; k < K; ++k) {
      const Acc a = static_cast<Acc>(x[i * xr + k * xc]);
      const T* yk = y + k * yr;
      for (int64_t j = 0; j < P; ++j) row[j] += a * static_cast<Acc>(yk[j * yc]);
    }
    T* o = out + i * ldo;
    for (int64_t j = 0; j < P; ++j)
      o[j] = static_cast<T>(accumulate ? static_cast<Acc>(o[j]) + alpha * row[j] : alpha * row[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// out[b] = X[b] Y[b]^T in double, X (B, Cx, N) and Y (B, Cy, N) contiguous of T. Split-K over
// fixed chunks of N (the reduction is long, the output small): each chunk one single-threaded
// GEMM in T, the partials summed in double in chunk order.
//
// The kernels call ATen ops (the GEMMs) on views of their inputs, which may require grad. The
// kernel entry points hold an AutoDispatchBelowADInplaceOrView; OpenMP worker threads do not
// inherit that thread-local state, so every parallel body that calls ATen takes its own.
template <typename T>
at::Tensor gram(const at::Tensor& X, const at::Tensor& Y) {
  const int64_t B = X.size(0), Cx = X.size(1), Cy = Y.size(1), N = X.size(2);
  if (Cx * Cy * N <= kSmallGemm) {  // one chunk, summed in double directly
    at::Tensor g = at::empty({B, Cx, Cy}, X.options().dtype(at::kDouble));
    const T* xd = X.data_ptr<T>();
    const T* yd = Y.data_ptr<T>();
    double* gd = g.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Cx; ++i)
        for (int64_t j = 0; j < Cy; ++j)
          gd[(b * Cx + i) * Cy + j] = dot_acc(xd + (b * Cx + i) * N, yd + (b * Cy + j) * N, N);
    return g;
  }
  const int64_t chunks = ceil_div(N, kGramChunk);
  at::Tensor part = at::empty({B, chunks, Cx, Cy}, X.options());
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, n0 = (task % chunks) * kGramChunk;
      const int64_t len = std::min(kGramChunk, N - n0);
      at::Tensor out = part.select(0, b).select(0, task % chunks);
      at::mm_out(out, X.select(0, b).narrow(1, n0, len), Y.select(0, b).narrow(1, n0, len).t());
    }
  });
  at::Tensor g = at::empty({B, Cx, Cy}, X.options().dtype(at::kDouble));
  const T* pd = part.data_ptr<T>();
  double* gd = g.data_ptr<double>();
  const int64_t cc = Cx * Cy;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* dst = gd + b * cc;
      const T* src = pd + b * chunks * cc;
      for (int64_t e = 0; e < cc; ++e) dst[e] = static_cast<double>(src[e]);
      for (int64_t k = 1; k < chunks; ++k)
        for (int64_t e = 0; e < cc; ++e) dst[e] += static_cast<double>(src[k * cc + e]);
    }
  });
  return g;
}

}  // namespace rel
}  // namespace kdk
