// Attention transfer on the CPU: fused forward (channel-mean power map, normalisation, loss and
// the backward coefficient) and a one-pass backward, parallel with at::parallel_for.
//
// Loop orders follow the memory layout: when a channel plane is one contiguous run (NCHW) a task
// accumulates a chunk of the map over all channels with contiguous inner loops, which the
// compiler vectorises; otherwise (channels_last, strided views) each pixel walks its channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/attention_transfer.h"
#include "cpu/relation_common.h"

namespace kdk {
namespace {

struct View4 {
  int64_t B, C, H, W, sB, sC, sH, sW;
};

View4 view4(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2), t.size(3),
          t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Per-axis taps of the bilinear resample from `in` to `out` points.
std::vector<Taps> axis_taps(int64_t in, int64_t out) {
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  std::vector<Taps> taps(out);
  for (int64_t o = 0; o < out; ++o) taps[o] = bilinear_taps(o, in, scale);
  return taps;
}

template <typename acc_t, typename scalar_t>
inline acc_t sample(const scalar_t* plane, const View4& v, const Taps& th, const Taps& tw) {
  const scalar_t* r0 = plane + th.i0 * v.sH;
  const scalar_t* r1 = plane + th.i1 * v.sH;
  const acc_t top = tw.l0 * static_cast<acc_t>(r0[tw.i0 * v.sW]) + tw.l1 * static_cast<acc_t>(r0[tw.i1 * v.sW]);
  const acc_t bot = tw.l0 * static_cast<acc_t>(r1[tw.i0 * v.sW]) + tw.l1 * static_cast<acc_t>(r1[tw.i1 * v.sW]);
  return th.l0 * top + th.l1 * bot;
}

// Pixels per task of the flat-plane path: each channel contributes one contiguous 32 KiB run
// (float), long enough for the hardware prefetcher, and the 64 KiB of double accumulators stay
// in L2 (measured on a 2-core EPYC: 8192 beats 2048 and 512 by 25-35%).
constexpr int64_t kPlaneChunk = 8192;

// acc[i] += |src[i]|^p, i < len: the inner loop of the flat-plane path. For float inputs and
// p = 2 or 4 it is compiled per ISA (KDK_ROW_CLONES: AVX-512, AVX2, baseline) and picked at load
// time, as the relation kernels' row loops are: the float -> double conversions and double
// multiply-adds vectorise 4 or 8 wide instead of SSE2's 2.
template <int P, typename scalar_t, typename acc_t>
KDK_ALWAYS_INLINE void power_accumulate_impl(const scalar_t* __restrict src, acc_t* __restrict acc,
                                             int64_t len, acc_t p) {
  for (int64_t i = 0; i < len; ++i) acc[i] += at_power<P>(static_cast<acc_t>(src[i]), p);
}
KDK_ROW_CLONES void power_accumulate_p2(const float* src, double* acc, int64_t len) {
  power_accumulate_impl<2>(src, acc, len, 2.0);
}
KDK_ROW_CLONES void power_accumulate_p4(const float* src, double* acc, int64_t len) {
  power_accumulate_impl<4>(src, acc, len, 4.0);
}
template <int P, typename scalar_t, typename acc_t>
void power_accumulate(const scalar_t* src, acc_t* acc, int64_t len, acc_t p) {
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, double> && P == 2)
    power_accumulate_p2(src, acc, len);
  else if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, double> && P == 4)
    power_accumulate_p4(src, acc, len);
  else
    power_accumulate_impl<P>(src, acc, len, p);
}

// m[b, n] += |x[b, c, n]|^p over all c, for planes whose pixels are one contiguous run.
template <int P, typename scalar_t, typename acc_t>
void power_map_flat(const scalar_t* data, const View4& v, acc_t p, acc_t inv_c, acc_t* m) {
  const int64_t N = v.H * v.W, chunks = (N + kPlaneChunk - 1) / kPlaneChunk;
  at::parallel_for(0, v.B * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(kPlaneChunk);
    acc_t* acc = buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks, n0 = (task % chunks) * kPlaneChunk;
      const int64_t len = std::min(kPlaneChunk, N - n0);
      std::fill(acc, acc + len, acc_t(0));
      for (int64_t c = 0; c < v.C; ++c) power_accumulate<P>(data + b * v.sB + c * v.sC + n0, acc, len, p);
      acc_t* out = m + b * N + n0;
      for (int64_t i = 0; i < len; ++i) out[i] = acc[i] * inv_c;
    }
  });
}

// m[b, ho, wo] = mean_c |x[b, c, ho, wo]|^p on the Ho x Wo grid (bilinear taps if it differs).
template <int P, typename scalar_t, typename acc_t>
void power_map(const at::Tensor& x, int64_t Ho, int64_t Wo, acc_t p, acc_t* m) {
  const View4 v = view4(x);
  const scalar_t* data = x.data_ptr<scalar_t>();
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(v.C);
  const bool resize = v.H != Ho || v.W != Wo;
  if (!resize && v.sW == 1 && v.sH == v.W) return power_map_flat<P>(data, v, p, inv_c, m);
  const std::vector<Taps> th = resize ? axis_taps(v.H, Ho) : std::vector<Taps>();
  const std::vector<Taps> tw = resize ? axis_taps(v.W, Wo) : std::vector<Taps>();
  at::parallel_for(0, v.B * Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / Ho, h = row % Ho;
      acc_t* out = m + row * Wo;
      for (int64_t w = 0; w < Wo; ++w) out[w] = acc_t(0);
      if (resize) {
        for (int64_t c = 0; c < v.C; ++c) {
          const scalar_t* plane = data + b * v.sB + c * v.sC;
          for (int64_t w = 0; w < Wo; ++w)
            out[w] += at_power<P>(sample<acc_t>(plane, v, th[h], tw[w]), p);
        }
      } else {
        // channels_last and strided views: each pixel walks its channels.
        for (int64_t w = 0; w < Wo; ++w) {
          const scalar_t* src = data + b * v.sB + h * v.sH + w * v.sW;
          acc_t s = 0;
          for (int64_t c = 0; c < v.C; ++c) s += at_power<P>(static_cast<acc_t>(src[c * v.sC]), p);
          out[w] = s;
        }
      }
      for (int64_t w = 0; w < Wo; ++w) out[w] *= inv_c;
    }
  });
}

// Per sample: normalise both maps, the squared distance, and coeff = d loss / d ms.
template <typename acc_t, typename out_t>
void finalize(const acc_t* ms, const acc_t* mt, int64_t B, int64_t N, acc_t scale,
              acc_t* partial, out_t* coeff) {
  const acc_t eps = norm_eps<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* s = ms + b * N;
      const acc_t* t = mt + b * N;
      acc_t ss = 0, tt = 0;
      for (int64_t n = 0; n < N; ++n) { ss += s[n] * s[n]; tt += t[n] * t[n]; }
      const acc_t norm_s = std::sqrt(ss);
      const acc_t ns = std::max(norm_s, eps), nt = std::max(std::sqrt(tt), eps);
      // Reciprocals once per sample: a double multiply per element instead of a division (the
      // quotients move by an ulp of double, far below the float32 result's).
      const acc_t inv_s = acc_t(1) / ns, inv_t = acc_t(1) / nt;
      acc_t sum_d2 = 0, dot = 0;  // dot = <as, d>
      for (int64_t n = 0; n < N; ++n) {
        const acc_t as = s[n] * inv_s, d = as - t[n] * inv_t;
        sum_d2 += d * d;
        dot += as * d;
      }
      partial[b] = sum_d2;
      out_t* c = coeff + b * N;
      // Below eps the norm is the constant eps: coeff = k d / eps (no projection term).
      const acc_t k = acc_t(2) * scale * (norm_s > eps ? inv_s : acc_t(1) / eps);
      const acc_t proj = norm_s > eps ? dot : acc_t(0);
      for (int64_t n = 0; n < N; ++n) {
        const acc_t as = s[n] * inv_s, d = as - t[n] * inv_t;
        c[n] = static_cast<out_t>(k * (d - as * proj));
      }
    }
  });
}

double reduction_scale(c10::string_view reduction, int64_t B, int64_t N) {
  if (reduction == "mean") return 1.0 / (static_cast<double>(B) * static_cast<double>(N));
  if (reduction == "batchmean") return 1.0 / static_cast<double>(B);
  TORCH_CHECK(reduction == "sum", "attention_transfer: unknown reduction ", reduction);
  return 1.0;
}

template <typename acc_t>
void map_dispatch(const at::Tensor& x, int64_t Ho, int64_t Wo, double p, acc_t* m) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kdk_at_map", [&] {
    switch (at_power_kind(p)) {
      case 2: power_map<2, scalar_t, acc_t>(x, Ho, Wo, acc_t(p), m); break;
      case 4: power_map<4, scalar_t, acc_t>(x, Ho, Wo, acc_t(p), m); break;
      default: power_map<0, scalar_t, acc_t>(x, Ho, Wo, acc_t(p), m);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_cpu(
    const at::Tensor& fs, const at::Tensor& ft, double p, c10::string_view reduction) {
  TORCH_CHECK(fs.dim() == 4 && ft.dim() == 4, "attention_transfer: fs and ft must be 4-D");
  TORCH_CHECK(fs.size(0) == ft.size(0), "attention_transfer: batch sizes differ");
  const bool f64 = fs.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 == (ft.scalar_type() == at::kDouble),
              "attention_transfer: fs and ft must both be float64 or neither");
  const int64_t B = ft.size(0), Ho = ft.size(2), Wo = ft.size(3), N = Ho * Wo;
  // The maps and their normalisation accumulate in double whatever the input type: on the CPU
  // it costs little, and near the teacher the loss is a small difference of two maps.
  std::vector<double> maps(2 * B * N), partial(B);
  double* ms = maps.data();
  double* mt = ms + B * N;
  const double scale = reduction_scale(reduction, B, N);
  map_dispatch<double>(fs, Ho, Wo, p, ms);
  map_dispatch<double>(ft, Ho, Wo, p, mt);
  const auto acc = f64 ? at::kDouble : at::kFloat;
  at::Tensor coeff = at::empty({B, Ho, Wo}, fs.options().dtype(acc));
  if (f64) finalize<double>(ms, mt, B, N, scale, partial.data(), coeff.data_ptr<double>());
  else finalize<double>(ms, mt, B, N, scale, partial.data(), coeff.data_ptr<float>());
  double total = 0;
  for (double v : partial) total += v;
  return {at::scalar_tensor(total * scale, fs.options().dtype(acc)), coeff};
}

// grad_x for inputs on the output grid: one elementwise pass.
template <int P, typename scalar_t, typename acc_t>
void backward_same_size(const at::Tensor& x, at::Tensor& gx, const acc_t* coeff, acc_t k, acc_t p) {
  const View4 v = view4(x), g = view4(gx);
  const scalar_t* xd = x.data_ptr<scalar_t>();
  scalar_t* gd = gx.data_ptr<scalar_t>();
  at::parallel_for(0, v.B * v.C * v.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row % v.H, bc = row / v.H, c = bc % v.C, b = bc / v.C;
      const scalar_t* src = xd + b * v.sB + c * v.sC + h * v.sH;
      scalar_t* dst = gd + b * g.sB + c * g.sC + h * g.sH;
      const acc_t* cf = coeff + (b * v.H + h) * v.W;
      for (int64_t w = 0; w < v.W; ++w)
        dst[w * g.sW] = static_cast<scalar_t>(k * cf[w] * at_power_grad<P>(static_cast<acc_t>(src[w * v.sW]), p));
    }
  });
}

// grad_x through the bilinear resample: per (b, c) plane, the gradient on the output grid is
// formed in a scratch row-set and scattered to its taps by one thread, so it is deterministic.
template <int P, typename scalar_t, typename acc_t>
void backward_resized(const at::Tensor& x, at::Tensor& gx, const acc_t* coeff, int64_t Ho,
                      int64_t Wo, acc_t k, acc_t p) {
  const View4 v = view4(x), g = view4(gx);
  const scalar_t* xd = x.data_ptr<scalar_t>();
  scalar_t* gd = gx.data_ptr<scalar_t>();
  const std::vector<Taps> th = axis_taps(v.H, Ho), tw = axis_taps(v.W, Wo);
  at::parallel_for(0, v.B * v.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(v.H * v.W);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / v.C, c = bc % v.C;
      const scalar_t* plane = xd + b * v.sB + c * v.sC;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t h = 0; h < Ho; ++h) {
        const acc_t* cf = coeff + (b * Ho + h) * Wo;
        const Taps& a = th[h];
        for (int64_t w = 0; w < Wo; ++w) {
          const Taps& e = tw[w];
          const acc_t dy = k * cf[w] * at_power_grad<P>(sample<acc_t>(plane, v, a, e), p);
          acc[a.i0 * v.W + e.i0] += a.l0 * e.l0 * dy;
          acc[a.i0 * v.W + e.i1] += a.l0 * e.l1 * dy;
          acc[a.i1 * v.W + e.i0] += a.l1 * e.l0 * dy;
          acc[a.i1 * v.W + e.i1] += a.l1 * e.l1 * dy;
        }
      }
      scalar_t* dst = gd + b * g.sB + c * g.sC;
      for (int64_t h = 0; h < v.H; ++h)
        for (int64_t w = 0; w < v.W; ++w) dst[h * g.sH + w * g.sW] = static_cast<scalar_t>(acc[h * v.W + w]);
    }
  });
}

at::Tensor attention_transfer_backward_cpu(const at::Tensor& grad, const at::Tensor& fs,
                                           const at::Tensor& coeff, double p) {
  TORCH_CHECK(coeff.is_contiguous() && coeff.dim() == 3, "attention_transfer_backward: bad coeff");
  at::Tensor gx = at::empty_like(fs);
  const int64_t Ho = coeff.size(1), Wo = coeff.size(2);
  const bool resize = fs.size(2) != Ho || fs.size(3) != Wo;
  AT_DISPATCH_FLOATING_TYPES(coeff.scalar_type(), "kdk_at_bwd_acc", [&] {
    using acc_t = scalar_t;
    const acc_t k = grad.item<acc_t>() / static_cast<acc_t>(fs.size(1));
    const acc_t* cf = coeff.data_ptr<acc_t>();
    const acc_t pa = static_cast<acc_t>(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "kdk_at_bwd", [&] {
      auto run = [&](auto kind) {
        constexpr int P = decltype(kind)::value;
        if (resize) backward_resized<P, scalar_t, acc_t>(fs, gx, cf, Ho, Wo, k, pa);
        else backward_same_size<P, scalar_t, acc_t>(fs, gx, cf, k, pa);
      };
      switch (at_power_kind(p)) {
        case 2: run(std::integral_constant<int, 2>()); break;
        case 4: run(std::integral_constant<int, 4>()); break;
        default: run(std::integral_constant<int, 0>());
      }
    });
  });
  return gx;
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("attention_transfer", &kdk::attention_transfer_cpu);
  m.impl("attention_transfer_backward", &kdk::attention_transfer_backward_cpu);
}
