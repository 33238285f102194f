// Channel relation on the CPU: per sample, G = Fn Fn^T (C x C) of the normalised channel rows
// (length N), compared between student and teacher.
//
// Both normalisations are a per-row scale of a row that needs no division: "l2" Fn_c = x_c / n_c,
// "softmax" Fn_c = e_c / s_c with e = exp(x / tau - max). So the kernels Gram the raw rows
// (x, or e) and scale the C x C result, G_ij = R_ij / (n_i n_j): no rounding of Fn, and the
// scale (the row norm, which is R's diagonal, or the softmax sum) stays in double. For softmax,
// where G is ~1/N with the signal in small deviations, that halves the float32 error. C is small
// and N long, so the Grams are split-K GEMMs over fixed chunks of N in the accumulation type
// (float32, or float64 for float64 inputs), summed in float64 (rel::gram). The C x C distance,
// its gradient and the row statistics are in float64 (B C^2 work).
// The backward folds the scale into the C x C matrix it multiplies by: dFn = M' rows with
// M' = grad (grad_gram + grad_gram^T) diag(1 / scale), one GEMM per column block; the row
// reductions <Fn_c, dFn_c> are partial sums per block, added in block order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/relation_common.h"

namespace kdk {
namespace {

using rel::ceil_div;
using rel::kEps;
using rel::Map4;

enum class Norm { kL2, kSoftmax };
enum class Dist { kMse, kKl };

Norm parse_norm(c10::string_view s) {
  if (s == "l2") return Norm::kL2;
  TORCH_CHECK(s == "softmax", "channel_relation: normalize must be 'l2' or 'softmax', got ", s);
  return Norm::kSoftmax;
}

Dist parse_dist(c10::string_view s) {
  if (s == "mse") return Dist::kMse;
  TORCH_CHECK(s == "kl", "channel_relation: distance must be 'mse' or 'kl', got ", s);
  return Dist::kKl;
}

at::ScalarType acc_type(const at::Tensor& fs) {
  return fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// One row's exponentials e = exp(x / t - m) and their sum (in double). m = max_n x / t is
// given: for t > 0, rounding x / t is monotone in x, so it is exactly (max_n x) / t, and the
// maximum comes from one vectorised at::amax over all rows (which also propagates NaN).
template <typename T>
KDK_ALWAYS_INLINE double softmax_row(const T* x, T* e_out, int64_t N, T t, T m) {
  constexpr int L = rel::kLanes;
  double part[L] = {};
  int64_t n = 0;
  for (; n + L <= N; n += L)
    for (int l = 0; l < L; ++l) {
      const T e = rel::exp_acc(x[n + l] / t - m);
      e_out[n + l] = e;
      part[l] += static_cast<double>(e);
    }
  double s = 0;
  for (; n < N; ++n) {
    const T e = rel::exp_acc(x[n] / t - m);
    e_out[n] = e;
    s += static_cast<double>(e);
  }
  for (int l = 0; l < L; ++l) s += part[l];
  return s;
}

// The backward's e, from the saved maximum (the forward's expression, so the same values).
template <typename T>
KDK_ALWAYS_INLINE void softmax_row_from_max(const T* x, T* e_out, int64_t N, T t, T m) {
  for (int64_t n = 0; n < N; ++n) e_out[n] = rel::exp_acc(x[n] / t - m);
}

KDK_ROW_CLONES double softmax_row_f32(const float* x, float* e, int64_t N, float t, float m) {
  return softmax_row<float>(x, e, N, t, m);
}
KDK_ROW_CLONES void softmax_row_from_max_f32(const float* x, float* e, int64_t N, float t, float m) {
  softmax_row_from_max<float>(x, e, N, t, m);
}
double softmax_row_acc(const float* x, float* e, int64_t N, float t, float m) {
  return softmax_row_f32(x, e, N, t, m);
}
double softmax_row_acc(const double* x, double* e, int64_t N, double t, double m) {
  return softmax_row<double>(x, e, N, t, m);
}
void softmax_row_from_max_acc(const float* x, float* e, int64_t N, float t, float m) {
  softmax_row_from_max_f32(x, e, N, t, m);
}
void softmax_row_from_max_acc(const double* x, double* e, int64_t N, double t, double m) {
  softmax_row_from_max<double>(x, e, N, t, m);
}

// G (double, B x C x C) of one feature map X (B, C, N); fills row_stats (B, C, 2) of T:
// "l2" [n, 0], "softmax" [max x / tau, sum exp(x / tau - max)].
template <typename T>
at::Tensor normalized_gram(const at::Tensor& X, Norm norm, double tau, T* stats) {
  const int64_t B = X.size(0), C = X.size(1), N = X.size(2);
  at::Tensor g;
  std::vector<double> scale(B * C);  // Fn_c = rows_c * scale_c
  if (norm == Norm::kSoftmax) {
    at::Tensor e = at::empty_like(X);
    const T* xd = X.data_ptr<T>();
    T* ed = e.data_ptr<T>();
    const T t = static_cast<T>(tau);
    const at::Tensor xmax = at::amax(X, {2}).contiguous();  // (B, C)
    const T* xm = xmax.data_ptr<T>();
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        stats[2 * r] = xm[r] / t;
        const double s = softmax_row_acc(xd + r * N, ed + r * N, N, t, stats[2 * r]);
        stats[2 * r + 1] = static_cast<T>(s);
        scale[r] = 1.0 / s;
      }
    });
    g = rel::gram<T>(e, e);
  } else {
    g = rel::gram<T>(X, X);
    const double* gd = g.data_ptr<double>();
    for (int64_t r = 0; r < B * C; ++r) {
      const double n = std::sqrt(gd[r * C + r % C]);
      stats[2 * r] = static_cast<T>(n);
      stats[2 * r + 1] = T(0);
      scale[r] = 1.0 / std::max(n, kEps);
    }
  }
  double* gd = g.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < C; ++i)
      for (int64_t j = 0; j < C; ++j) gd[(b * C + i) * C + j] *= scale[b * C + i] * scale[b * C + j];
  return g;
}

// The loss and gg = d loss / d G_s (unit upstream gradient) from the two Grams, in double.
double relation_distance(const double* gs, const double* gt, int64_t B, int64_t C, Dist dist,
                         double tau, double* gg) {
  const int64_t rows = B * C;
  std::vector<double> row_loss(rows);
  const double inv_bcc = 1.0 / (static_cast<double>(rows) * static_cast<double>(C));
  const double inv_bc = 1.0 / static_cast<double>(rows);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> zs(C), zt(C);
    for (int64_t r = begin; r < end; ++r) {
      const double* s = gs + r * C;
      const double* t = gt + r * C;
      double* g = gg + r * C;
      double acc = 0;
      if (dist == Dist::kMse) {
        for (int64_t j = 0; j < C; ++j) {
          const double d = s[j] - t[j];
          acc += d * d;
          g[j] = 2.0 * d * inv_bcc;
        }
      } else {
        double ms = -std::numeric_limits<double>::infinity(), mt = ms;
        for (int64_t j = 0; j < C; ++j) {
          zs[j] = s[j] / tau;
          zt[j] = t[j] / tau;
          ms = std::max(ms, zs[j]);
          mt = std::max(mt, zt[j]);
        }
        double ss = 0, st = 0;
        for (int64_t j = 0; j < C; ++j) {
          ss += std::exp(zs[j] - ms);
          st += std::exp(zt[j] - mt);
        }
        const double lse_s = ms + std::log(ss), lse_t = mt + std::log(st);
        for (int64_t j = 0; j < C; ++j) {
          const double pt = std::exp(zt[j] - lse_t), ps = std::exp(zs[j] - lse_s);
          acc += pt * (zt[j] - zs[j]);
          g[j] = tau * (ps - pt) * inv_bc;
        }
        acc += lse_s - lse_t;
      }
      row_loss[r] = acc;
    }
  });
  double total = 0;
  for (double v : row_loss) total += v;
  return dist == Dist::kMse ? total * inv_bcc : tau * tau * total * inv_bc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_relation_cpu(
    const at::Tensor& fs, const at::Tensor& ft, c10::string_view normalize,
    c10::string_view distance, double tau) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
  TORCH_CHECK(fs.dim() == 4 && fs.sizes() == ft.sizes(),
              "channel_relation: fs and ft must be 4-D of the same shape, got ", fs.sizes(),
              " and ", ft.sizes());
  const bool f64 = fs.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 == (ft.scalar_type() == at::kDouble),
              "channel_relation: fs and ft must both be float64 or neither");
  TORCH_CHECK(tau > 0, "channel_relation: tau must be positive, got ", tau);
  const Norm norm = parse_norm(normalize);
  const Dist dist = parse_dist(distance);
  const auto acc = acc_type(fs);
  const int64_t B = fs.size(0), C = fs.size(1);
  at::Tensor row_stats = at::empty({B, C, 2}, fs.options().dtype(acc));
  at::Tensor grad_gram = at::empty({B, C, C}, fs.options().dtype(acc));
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_cr_fwd", [&] {
    std::vector<scalar_t> stats_t(B * C * 2);
    at::Tensor gs = normalized_gram<scalar_t>(rel::to_bcn(fs, acc), norm, tau,
                                              row_stats.data_ptr<scalar_t>());
    at::Tensor gt = normalized_gram<scalar_t>(rel::to_bcn(ft, acc), norm, tau, stats_t.data());
    std::vector<double> gg(B * C * C);
    loss = relation_distance(gs.data_ptr<double>(), gt.data_ptr<double>(), B, C, dist, tau,
                             gg.data());
    std::copy(gg.begin(), gg.end(), grad_gram.data_ptr<scalar_t>());
  });
  return {at::scalar_tensor(loss, fs.options().dtype(acc)), grad_gram, row_stats};
}

// Columns of N per backward GEMM task (each column block is independent: no reduction).
constexpr int64_t kApplyBlock = 2048;

template <typename T, typename scalar_t>
void channel_backward(const at::Tensor& X, const at::Tensor& grad_gram, const T* stats, Norm norm,
                      double tau, double g, at::Tensor& gx) {
  const int64_t B = X.size(0), C = X.size(1), N = X.size(2);
  // Fn_c = rows_c * scale_c: "l2" rows = x, scale = 1 / max(n, eps); "softmax" rows = e (rebuilt
  // from the saved max), scale = 1 / s.
  std::vector<double> scale(B * C);
  for (int64_t r = 0; r < B * C; ++r)
    scale[r] = norm == Norm::kL2 ? 1.0 / std::max(static_cast<double>(stats[2 * r]), kEps)
                                 : 1.0 / static_cast<double>(stats[2 * r + 1]);
  at::Tensor e;
  if (norm == Norm::kSoftmax) {
    e = at::empty_like(X);
    const T* xd = X.data_ptr<T>();
    T* ed = e.data_ptr<T>();
    const T t = static_cast<T>(tau);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) softmax_row_from_max_acc(xd + r * N, ed + r * N, N, t, stats[2 * r]);
    });
  }
  const at::Tensor& rows = norm == Norm::kSoftmax ? e : X;
  const T* rd = rows.data_ptr<T>();
  // M' = g (gg + gg^T) diag(scale), so dFn = M' rows.
  at::Tensor m = at::empty({B, C, C}, X.options());
  {
    const T* gg = grad_gram.data_ptr<T>();
    T* md = m.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < C; ++i)
        for (int64_t j = 0; j < C; ++j)
          md[(b * C + i) * C + j] = static_cast<T>(
              g * (static_cast<double>(gg[(b * C + i) * C + j]) + static_cast<double>(gg[(b * C + j) * C + i])) *
              scale[b * C + j]);
  }
  at::Tensor dfn = at::empty_like(X);
  T* dd = dfn.data_ptr<T>();
  const int64_t blocks = ceil_div(N, kApplyBlock);
  std::vector<double> dot_part(B * blocks * C);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, blk = task % blocks, n0 = blk * kApplyBlock;
      const int64_t len = std::min(kApplyBlock, N - n0);
      if (C * C * len <= rel::kSmallGemm) {
        rel::small_gemm<T>(m.data_ptr<T>() + b * C * C, C, 1, rd + b * C * N + n0, N, 1,
                           dd + b * C * N + n0, N, C, C, len);
      } else {
        at::Tensor out = dfn.select(0, b).narrow(1, n0, len);
        at::mm_out(out, m.select(0, b), rows.select(0, b).narrow(1, n0, len));
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t row = (b * C + c) * N + n0;
        dot_part[(b * blocks + blk) * C + c] = rel::dot_acc(rd + row, dd + row, len);
      }
    }
  });
  // dot[b, c] = <Fn_c, dFn_c> = scale_c <rows_c, dFn_c>, partials added in block order.
  std::vector<double> dot(B * C, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t c = 0; c < C; ++c) dot[b * C + c] += dot_part[(b * blocks + blk) * C + c];
  for (int64_t r = 0; r < B * C; ++r) dot[r] *= scale[r];

  const Map4 gv = rel::map4(gx);
  scalar_t* gd = gx.data_ptr<scalar_t>();
  const int64_t pblocks = ceil_div(N, rel::kPixBlock);
  const double inv_tau = 1.0 / tau;
  at::parallel_for(0, B * pblocks, 1, [&](int64_t begin, int64_t end) {
    int64_t goff[rel::kPixBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / pblocks, n0 = (task % pblocks) * rel::kPixBlock;
      const int64_t len = std::min(rel::kPixBlock, N - n0);
      const rel::PlaneRun run{rel::flat_planes(gv), n0, goff};
      if (!run.flat) rel::pixel_offsets(gv, n0, len, goff);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t row = b * C + c;
        const T* r = rd + row * N + n0;
        const T* d = dd + row * N + n0;
        scalar_t* dst = gd + b * gv.sB + c * gv.sC;
        const double dt = dot[row], sc = scale[row];
        if (norm == Norm::kL2) {
          // dF = (dFn - Fn <Fn, dFn>) / n;  dFn / eps when n <= eps (then Fn = x / eps does
          // not depend on the norm).
          const bool unit = static_cast<double>(stats[2 * row]) > kEps;
          const double proj = unit ? dt * sc : 0.0;
          rel::store_run(dst, run, len, [&](int64_t i) {
            return (static_cast<double>(d[i]) - static_cast<double>(r[i]) * proj) * sc;
          });
        } else {
          // dF = Fn (dFn - <Fn, dFn>) / tau
          const double k = sc * inv_tau;
          rel::store_run(dst, run, len, [&](int64_t i) {
            return static_cast<double>(r[i]) * (static_cast<double>(d[i]) - dt) * k;
          });
        }
      }
    }
  });
}

at::Tensor channel_relation_backward_cpu(const at::Tensor& grad, const at::Tensor& fs,
                                         const at::Tensor& grad_gram, const at::Tensor& row_stats,
                                         c10::string_view normalize, double tau) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
  TORCH_CHECK(fs.dim() == 4, "channel_relation_backward: fs must be 4-D");
  const auto acc = acc_type(fs);
  const int64_t B = fs.size(0), C = fs.size(1);
  TORCH_CHECK(grad_gram.scalar_type() == acc && row_stats.scalar_type() == acc &&
                  grad_gram.is_contiguous() && row_stats.is_contiguous() &&
                  grad_gram.numel() == B * C * C && row_stats.numel() == B * C * 2,
              "channel_relation_backward: grad_gram (B, C, C) and row_stats (B, C, 2) must be "
              "contiguous tensors of the accumulation dtype");
  const Norm norm = parse_norm(normalize);
  const double g = rel::scalar_grad(grad);
  at::Tensor gx = at::empty_like(fs);
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_cr_bwd_acc", [&] {
    using T = scalar_t;
    const at::Tensor X = rel::to_bcn(fs, acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "kdk_cr_bwd", [&] {
      channel_backward<T, scalar_t>(X, grad_gram, row_stats.data_ptr<T>(), norm, tau, g, gx);
    });
  });
  return gx;
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("channel_relation", &kdk::channel_relation_cpu);
  m.impl("channel_relation_backward", &kdk::channel_relation_backward_cpu);
}
