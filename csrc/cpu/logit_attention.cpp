// Logit attention (KDAS attention supervision) on the CPU.
//
// Per map X (H x W, one per sample and channel): S = X X^T, P = softmax_rows(S / sqrt(W)),
// A = P X; q = softmax over the H*W entries of A / tau; loss = tau^2 sum KL(q_t || q_s) / maps.
//
// A map is processed whole, in phases over blocks of kRows rows: the teacher's A_t, the
// student's A_s, the spatial softmax statistics, and (need_grad) the unit gradient
//   dA = tau (q_s - q_t) / maps,  dP = dA X^T,  dS = P o (dP - D),  D_i = <P_i, dP_i>,
//   d loss / d X = P^T dA + (dS + dS^T) X / sqrt(W),
// so the autograd backward is only a scale by the upstream gradient. Only one H x H buffer per
// map in flight: it holds S_t, then P_s, then dS in place. S = X X^T is symmetric: each row block
// computes the strip on and right of the diagonal and mirrors it below (2/3 of a full GEMM's
// time). The GEMMs are single-threaded BLAS calls (at::mm_out) in the accumulation type,
// float32 (float64 for float64 inputs); the row kernels (softmaxes, spatial statistics, the
// gradient) are vectorised, with per-ISA clones (relation_common.h).
//
// Parallelism: with at least as many maps as threads, whole maps per thread (the phases then run
// inline). With fewer maps, the maps go one after the other and each phase is parallel over its
// row blocks. Every reduction has a fixed order (row blocks in order, then maps in order), never
// one that depends on which thread did the work: results are reproducible.
//
// Precision near the teacher: with d = (A_s - A_t) / tau,
//   KL = log E_qt[e^d] - E_qt[d] = log1p(E_qt[d] + E_qt[phi(d)]) - E_qt[d],  phi(d) = e^d - 1 - d,
// whose terms are small and accurate when every |d| <= 1 (phi from its series); otherwise the
// direct form lse_s - lse_t - E_qt[d]. The gradient likewise uses q_s - q_t = q_t expm1(d - dl),
// dl = lse_s - lse_t, where that argument is small (see pixel_relation.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/relation_common.h"

namespace kdk {
namespace {

using rel::ceil_div;

// Rows per block. Single-threaded MKL on the 2-core EPYC, 352 x 352 maps, relative to one whole
// GEMM: 64-row blocks cost 1.06 (32 rows: 1.15, 128: 1.03), and the symmetric strips 0.65 with
// 64 rows (the fewest). A constant, not derived from the thread count: the blocks, hence the
// BLAS calls and the order of every sum, are the same whichever mode runs them.
constexpr int64_t kRows = 64;

// f(block, first row, rows) for every row block of an H-row map, parallel over blocks. Blocks are
// taken in the order 0, n-1, 1, n-2, ...: the symmetric strips shrink with the block index, and
// the contiguous chunks at::parallel_for hands each thread then get about equal work.
template <typename F>
void for_row_blocks(int64_t H, const F& f) {
  const int64_t nb = ceil_div(H, kRows);
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    // ATen calls on views of inputs that may require grad; OpenMP workers do not inherit the
    // entry point's guard (see rel::gram).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = t % 2 == 0 ? t / 2 : nb - 1 - t / 2;
      const int64_t i0 = blk * kRows;
      f(blk, i0, std::min(kRows, H - i0));
    }
  });
}

// ---- row kernels ------------------------------------------------------------------------------

// Rows of S in place -> softmax(S * scale), rows of length n with leading dimension ld.
template <typename T>
KDK_ALWAYS_INLINE void softmax_rows_impl(T* s, int64_t rows, int64_t n, int64_t ld, T scale) {
  constexpr int L = rel::kLanes;
  for (int64_t i = 0; i < rows; ++i) {
    T* x = s + i * ld;
    T mx[L];
    for (int l = 0; l < L; ++l) mx[l] = -std::numeric_limits<T>::infinity();
    int64_t j = 0;
    for (; j + L <= n; j += L)
      for (int l = 0; l < L; ++l) mx[l] = rel::max_nan_last(x[j + l], mx[l]);
    for (; j < n; ++j) mx[0] = rel::max_nan_last(x[j], mx[0]);
    T m = mx[0];
    for (int l = 1; l < L; ++l) m = rel::max_nan_last(mx[l], m);
    T part[L] = {};
    for (j = 0; j + L <= n; j += L)
      for (int l = 0; l < L; ++l) {
        const T e = rel::exp_acc((x[j + l] - m) * scale);  // NaN stays NaN: the row turns NaN
        x[j + l] = e;
        part[l] += e;
      }
    T sum = 0;
    for (; j < n; ++j) {
      const T e = rel::exp_acc((x[j] - m) * scale);
      x[j] = e;
      sum += e;
    }
    for (int l = 0; l < L; ++l) sum += part[l];
    const T inv = T(1) / sum;
    for (j = 0; j < n; ++j) x[j] *= inv;
  }
}

KDK_ROW_CLONES void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, float scale) {
  softmax_rows_impl<float>(s, rows, n, ld, scale);
}
void softmax_rows(double* s, int64_t rows, int64_t n, int64_t ld, double scale) {
  softmax_rows_impl<double>(s, rows, n, ld, scale);
}

// Spatial softmax statistics of one block of entries (z = A / tau), relative to the block's own
// maxima: sum e_s, sum e_t, sum e_t d, sum e_t phi(d) (in double) and max |d|.
template <typename T>
struct BlockStats {
  T ms, mt, dmax;
  double zs, zt, a, c;
};

template <typename T>
KDK_ALWAYS_INLINE BlockStats<T> block_stats_impl(const T* as, const T* at, int64_t n, T inv_tau) {
  constexpr int L = rel::kLanes;
  T ms_l[L], mt_l[L];
  for (int l = 0; l < L; ++l) ms_l[l] = mt_l[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) {
      ms_l[l] = rel::max_nan_last(as[j + l], ms_l[l]);
      mt_l[l] = rel::max_nan_last(at[j + l], mt_l[l]);
    }
  for (; j < n; ++j) {
    ms_l[0] = rel::max_nan_last(as[j], ms_l[0]);
    mt_l[0] = rel::max_nan_last(at[j], mt_l[0]);
  }
  BlockStats<T> st{ms_l[0], mt_l[0], T(0), 0.0, 0.0, 0.0, 0.0};
  for (int l = 1; l < L; ++l) {
    st.ms = rel::max_nan_last(ms_l[l], st.ms);
    st.mt = rel::max_nan_last(mt_l[l], st.mt);
  }
  // max_j (A_j / tau) = (max_j A_j) / tau: rounding is monotone and tau > 0.
  st.ms *= inv_tau;
  st.mt *= inv_tau;
  const T ms = st.ms, mt = st.mt;
  double zs[L] = {}, zt[L] = {}, a[L] = {}, c[L] = {};
  T dmax[L] = {};
  auto element = [&](int64_t jj, int l) {
    const T es = rel::exp_acc(as[jj] * inv_tau - ms);
    const T et = rel::exp_acc(at[jj] * inv_tau - mt);
    const T d = (as[jj] - at[jj]) * inv_tau;  // an exact difference, then one rounding
    zs[l] += static_cast<double>(es);
    zt[l] += static_cast<double>(et);
    a[l] += static_cast<double>(et) * static_cast<double>(d);
    // phi only matters in maps where every |d| <= 1; elsewhere any finite value will do.
    c[l] += static_cast<double>(et) * static_cast<double>(rel::phi_small(rel::clamp_unit(d)));
    dmax[l] = rel::max_nan_last(std::abs(d), dmax[l]);
  };
  for (j = 0; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) element(j + l, l);
  for (; j < n; ++j) element(j, 0);
  for (int l = 0; l < L; ++l) {
    st.zs += zs[l];
    st.zt += zt[l];
    st.a += a[l];
    st.c += c[l];
    st.dmax = rel::max_nan_last(dmax[l], st.dmax);
  }
  return st;
}

KDK_ROW_CLONES BlockStats<float> block_stats(const float* as, const float* at, int64_t n,
                                             float inv_tau) {
  return block_stats_impl<float>(as, at, n, inv_tau);
}
BlockStats<double> block_stats(const double* as, const double* at, int64_t n, double inv_tau) {
  return block_stats_impl<double>(as, at, n, inv_tau);
}

// The map's log-sum-exps and KL term from its blocks' statistics, in block order.
struct MapKl {
  double lse_s, lse_t, delta, kl;  // delta = lse_s - lse_t
};

template <typename T>
MapKl combine(const std::vector<BlockStats<T>>& blocks) {
  T ms = -std::numeric_limits<T>::infinity(), mt = ms, dmax = 0;
  for (const auto& b : blocks) {
    ms = rel::max_nan_last(b.ms, ms);
    mt = rel::max_nan_last(b.mt, mt);
    dmax = rel::max_nan_last(b.dmax, dmax);
  }
  double zs = 0, zt = 0, a = 0, c = 0;
  for (const auto& b : blocks) {
    const double fs = std::exp(static_cast<double>(b.ms) - static_cast<double>(ms));
    const double ft = std::exp(static_cast<double>(b.mt) - static_cast<double>(mt));
    zs += b.zs * fs;
    zt += b.zt * ft;
    a += b.a * ft;
    c += b.c * ft;
  }
  const double lse_t = static_cast<double>(mt) + std::log(zt), mean_d = a / zt;
  const double delta = dmax <= T(1) ? std::log1p(mean_d + c / zt)
                                    : static_cast<double>(ms) + std::log(zs) - lse_t;
  return {lse_t + delta, lse_t, delta, delta - mean_d};
}

// dA = coef (q_s - q_t) for one block of entries; q_s - q_t = q_t expm1(d - dl) where
// |d - dl| <= 1 (no cancellation near the teacher), the plain difference otherwise.
template <typename T>
KDK_ALWAYS_INLINE void softmax_grad_impl(const T* as, const T* at, T* da, int64_t n, T inv_tau,
                                         T ls, T lt, T dl, T coef) {
  for (int64_t j = 0; j < n; ++j) {
    const T pt = rel::exp_acc(at[j] * inv_tau - lt);
    const T x = (as[j] - at[j]) * inv_tau - dl;
    const T near = pt * (x + rel::phi_small(rel::clamp_unit(x)));
    const T far = rel::exp_acc(as[j] * inv_tau - ls) - pt;
    da[j] = coef * rel::select(std::abs(x) <= T(1), near, far);
  }
}

KDK_ROW_CLONES void softmax_grad(const float* as, const float* at, float* da, int64_t n,
                                 float inv_tau, float ls, float lt, float dl, float coef) {
  softmax_grad_impl<float>(as, at, da, n, inv_tau, ls, lt, dl, coef);
}
void softmax_grad(const double* as, const double* at, double* da, int64_t n, double inv_tau,
                  double ls, double lt, double dl, double coef) {
  softmax_grad_impl<double>(as, at, da, n, inv_tau, ls, lt, dl, coef);
}

// ---- one map ----------------------------------------------------------------------------------

// Per-task buffers, allocated once for all the maps a task processes.
struct Workspace {
  int64_t H, W;
  at::Tensor p;              // S_t, then P_s, then dS (H x H)
  at::Tensor a_s, a_t, d_a;  // A_s, A_t, dA (H x W)
  // Allocated on first use: the input maps, when they cannot be used in place, and the
  // gradient, when the output map cannot be written in place (H x W).
  at::Tensor xs, xt, gx;

  Workspace(int64_t H_, int64_t W_, const at::TensorOptions& opts, bool grad) : H(H_), W(W_) {
    p = at::empty({H, H}, opts);
    a_s = at::empty({H, W}, opts);
    a_t = at::empty({H, W}, opts);
    if (grad) d_a = at::empty({H, W}, opts);
  }
};

// A BLAS-ready matrix: rows contiguous, row stride at least W.
bool blas_ready(const at::Tensor& m) {
  return m.stride(1) == 1 && (m.size(0) == 1 || m.stride(0) >= m.size(1));
}

// x itself when it is a BLAS-ready matrix of type T, else its values in buf.
template <typename T>
const at::Tensor& as_matrix(const at::Tensor& x, at::Tensor& buf) {
  if (x.scalar_type() == c10::CppTypeToScalarType<T>::value && blas_ready(x)) return x;
  if (!buf.defined()) buf = at::empty(x.sizes(), x.options().dtype(c10::CppTypeToScalarType<T>::value));
  buf.copy_(x);
  return buf;
}

// a = softmax_rows(X X^T * scale) X, leaving P in s.
template <typename T>
void attend(const at::Tensor& x, at::Tensor& s, at::Tensor& a, T scale) {
  const int64_t H = x.size(0);
  T* sd = s.data_ptr<T>();
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    at::Tensor strip = s.narrow(0, i0, r).narrow(1, i0, H - i0);
    at::mm_out(strip, x.narrow(0, i0, r), x.narrow(0, i0, H - i0).t());
    // Mirror below the diagonal: no other block writes these entries or reads them here.
    for (int64_t j = i0 + r; j < H; ++j)
      for (int64_t c = 0; c < r; ++c) sd[j * H + i0 + c] = sd[(i0 + c) * H + j];
  });
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    softmax_rows(sd + i0 * H, r, H, H, scale);
    at::Tensor out = a.narrow(0, i0, r);
    at::mm_out(out, s.narrow(0, i0, r), x);
  });
}

// gx = d loss / d X for dA (in ws.d_a) with P_s in ws.p, which becomes dS, then dS + dS^T.
template <typename T>
void attention_backward(Workspace& ws, const at::Tensor& x, at::Tensor& gx, T scale) {
  const int64_t H = ws.H;
  T* sd = ws.p.data_ptr<T>();
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    at::Tensor out = gx.narrow(0, i0, r);
    at::mm_out(out, ws.p.narrow(1, i0, r).t(), ws.d_a);  // (P^T dA)_I
  });
  // dS_I = P_I o (dP_I - D_I), dP = dA X^T, D_i = <P_i, dP_i> (the softmax backward), in place
  // once every block has read P.
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    at::Tensor dp = at::mm(ws.d_a.narrow(0, i0, r), x.t());
    const T* dpd = dp.data_ptr<T>();
    for (int64_t i = 0; i < r; ++i) {
      T* p = sd + (i0 + i) * H;
      const T* g = dpd + i * H;
      const T di = static_cast<T>(rel::dot_acc(p, g, H));
      for (int64_t j = 0; j < H; ++j) p[j] = p[j] * (g[j] - di);
    }
  });
  // dS + dS^T in place: block I owns the pairs (i, j > i), i in I, so no two blocks meet.
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    for (int64_t i = i0; i < i0 + r; ++i) {
      sd[i * H + i] *= T(2);
      for (int64_t j = i + 1; j < H; ++j) {
        const T m = sd[i * H + j] + sd[j * H + i];
        sd[i * H + j] = m;
        sd[j * H + i] = m;
      }
    }
  });
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    gx.narrow(0, i0, r).addmm_(ws.p.narrow(0, i0, r), x, 1.0, static_cast<double>(scale));
  });
}

// The map's KL term; with g_out defined, also writes d loss / d ps for this map into it.
template <typename T>
double map_kl(Workspace& ws, const at::Tensor& xs_in, const at::Tensor& xt_in,
              at::Tensor g_out, double tau, double coef) {
  const int64_t W = ws.W;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(W)));
  const T inv_tau = static_cast<T>(1.0 / tau);
  attend<T>(as_matrix<T>(xt_in, ws.xt), ws.p, ws.a_t, scale);
  const at::Tensor& xs = as_matrix<T>(xs_in, ws.xs);
  attend<T>(xs, ws.p, ws.a_s, scale);
  const T* ad = ws.a_s.data_ptr<T>();
  const T* td = ws.a_t.data_ptr<T>();
  std::vector<BlockStats<T>> stats(ceil_div(ws.H, kRows));
  for_row_blocks(ws.H, [&](int64_t blk, int64_t i0, int64_t r) {
    stats[blk] = block_stats(ad + i0 * W, td + i0 * W, r * W, inv_tau);
  });
  const MapKl k = combine(stats);
  if (!g_out.defined()) return k.kl;

  const T lt = static_cast<T>(k.lse_t), ls = static_cast<T>(k.lse_s);
  const T dl = static_cast<T>(k.delta), cf = static_cast<T>(coef);
  T* dad = ws.d_a.data_ptr<T>();
  for_row_blocks(ws.H, [&](int64_t, int64_t i0, int64_t r) {
    softmax_grad(ad + i0 * W, td + i0 * W, dad + i0 * W, r * W, inv_tau, ls, lt, dl, cf);
  });
  const bool direct = blas_ready(g_out);
  if (!direct && !ws.gx.defined()) ws.gx = at::empty({ws.H, W}, g_out.options());
  at::Tensor gx = direct ? g_out : ws.gx;
  attention_backward<T>(ws, xs, gx, scale);
  if (!direct) g_out.copy_(gx);
  return k.kl;
}

// ---- op ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> logit_attention_cpu(const at::Tensor& ps, const at::Tensor& pt,
                                                       double tau, bool need_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see for_row_blocks
  TORCH_CHECK(ps.dim() == 4 && ps.sizes() == pt.sizes(),
              "logit_attention: ps and pt must be 4-D (B, K, H, W) of one shape, got ", ps.sizes(),
              " and ", pt.sizes());
  const bool f64 = ps.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 == (pt.scalar_type() == at::kDouble),
              "logit_attention: ps and pt must both be float64 or neither");
  TORCH_CHECK(ps.device().is_cpu() && pt.device().is_cpu(), "logit_attention: expects CPU tensors");
  TORCH_CHECK(tau > 0, "logit_attention: tau must be positive, got ", tau);
  const int64_t B = ps.size(0), K = ps.size(1), H = ps.size(2), W = ps.size(3), maps = B * K;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const auto opts = ps.options().dtype(acc);
  // The gradient keeps ps's memory format, so in NCHW and channels_last (K = 1) it is written
  // straight by the GEMMs.
  at::Tensor grad = need_grad ? at::empty_like(ps, opts) : at::empty({0}, opts);
  const double coef = tau / static_cast<double>(maps);  // d loss / d A_s = coef (q_s - q_t)
  std::vector<double> kl(maps);
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_logit_attention", [&] {
    auto run = [&](Workspace& ws, int64_t m) {
      const int64_t b = m / K, c = m % K;
      at::Tensor g = need_grad ? grad.select(0, b).select(0, c) : at::Tensor();
      kl[m] = map_kl<scalar_t>(ws, ps.select(0, b).select(0, c), pt.select(0, b).select(0, c), g,
                               tau, coef);
    };
    const int64_t threads = at::get_num_threads();
    if (maps >= threads) {
      // One task per thread, each taking the next map when done: on a busy machine a thread
      // that is held up takes fewer maps. Which thread runs a map never changes its result.
      std::atomic<int64_t> next{0};
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd_worker;
        Workspace ws(H, W, opts, need_grad);
        for (int64_t m = next++; m < maps; m = next++) run(ws, m);
      });
    } else {
      Workspace ws(H, W, opts, need_grad);
      for (int64_t m = 0; m < maps; ++m) run(ws, m);
    }
  });
  double total = 0;
  for (double v : kl) total += v;
  const double loss = tau * tau * total / static_cast<double>(maps);
  return {at::scalar_tensor(loss, opts), grad};
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("logit_attention", &kdk::logit_attention_cpu);
}
