// Logit attention (KDAS attention supervision) on the CPU.
//
// Per map X (H x W, one per sample and channel): S = X X^T, P = softmax_rows(S / sqrt(W)),
// A = P X; q = softmax over the H*W entries of A / tau; loss = tau^2 sum KL(q_t || q_s) / maps.
//
// A map is processed whole: the teacher's A_t, the student's P_s and A_s, the spatial softmax
// statistics and, when the student needs a gradient, the unit gradient
//   dA = tau (q_s - q_t) / maps,  dP = dA X^T,  dS = P o (dP - D),  D_i = <P_i, dP_i>,
//   d loss / d X = P^T dA + (dS + dS^T) X / sqrt(W),
// so the autograd backward is only a scale by the upstream gradient. Seven GEMMs per map (eager
// autograd: eight, plus some twenty elementwise passes over B x H x H and B x H x W tensors); the
// softmaxes, the spatial KL and its gradient are fused row loops over data still in cache, and
// at most two H x H matrices of one map exist per thread (P_s and dP).
//
// GEMMs: float32 through oneDNN where torch has it (see matmul_nt), float64 through at::mm; the
// row loops are vectorised, with per-ISA clones (relation_common.h).
// Parallelism: with at least as many maps as threads, whole maps per thread, each single-threaded.
// With fewer maps, the maps go one after the other and the GEMMs and row loops inside use all
// threads. Partial sums are taken over fixed blocks of rows and added in order, then the maps in
// order: results are reproducible (for a given thread count where the GEMMs are threaded).
//
// Precision near the teacher: with d = (A_s - A_t) / tau,
//   KL = log E_qt[e^d] - E_qt[d] = log1p(E_qt[d] + E_qt[phi(d)]) - E_qt[d],  phi(d) = e^d - 1 - d,
// whose terms are small and accurate when every |d| <= 1 (phi from its series); otherwise the
// direct form lse_s - lse_t - E_qt[d]. The gradient likewise uses q_s - q_t = q_t expm1(d - dl),
// dl = lse_s - lse_t, where that argument is small (see pixel_relation.cpp). What remains is the
// float32 rounding of A itself, which eager float32 has too.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/relation_common.h"

namespace kdk {
namespace {

using rel::ceil_div;

// Rows per block of the row loops. A constant, not derived from the thread count: the partial
// sums per block, added in block order, never depend on it.
constexpr int64_t kRows = 64;

// f(block, first row, rows) for the row blocks of an H-row map, parallel over blocks unless
// already inside a parallel region (whole maps per thread).
template <typename F>
void for_row_blocks(int64_t H, const F& f) {
  at::parallel_for(0, ceil_div(H, kRows), 1, [&](int64_t begin, int64_t end) {
    // ATen calls on views of inputs that may require grad; OpenMP workers do not inherit the
    // entry point's guard (see rel::gram).
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t blk = begin; blk < end; ++blk) {
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

// x w^T, the product of a linear layer. float32 goes through oneDNN's matmul where torch has it
// (mkldnn::_linear_pointwise, the op Inductor lowers CPU linear layers to): on the 2-core AMD EPYC
// it runs a 352 x 352 x 352 product in 0.39 ms against 0.84 ms for MKL's sgemm behind at::mm,
// which stays on its AVX2 path there. x must be contiguous (oneDNN's strided path is slow), w may
// be a transposed view. float64, builds without oneDNN, and torch.backends.mkldnn.enabled = False
// take at::mm.
at::Tensor matmul_nt(const at::Tensor& x, const at::Tensor& w) {
  using Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>);
  static const std::optional<c10::TypedOperatorHandle<Linear>> onednn =
      []() -> std::optional<c10::TypedOperatorHandle<Linear>> {
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!op || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    try {
      return op->typed<Linear>();
    } catch (const c10::Error&) {  // another signature in another torch release
      return std::nullopt;
    }
  }();
  const int64_t M = x.size(0), K = x.size(1), P = w.size(0);
  if (M * K * P <= rel::kSmallGemm) {
    at::Tensor out = at::empty({M, P}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kdk_small_nt", [&] {
      rel::small_gemm<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w.data_ptr<scalar_t>(),
                                w.stride(1), w.stride(0), out.data_ptr<scalar_t>(), P, M, K, P);
    });
    return out;
  }
  if (onednn && x.scalar_type() == at::kFloat && at::globalContext().userEnabledMkldnn())
    return onednn->call(x, w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(),
                        std::nullopt);
  return at::mm(x, w.t());
}

// x itself when it is a contiguous matrix of type T, else a contiguous copy in T.
template <typename T>
at::Tensor as_matrix(const at::Tensor& x) {
  constexpr auto type = c10::CppTypeToScalarType<T>::value;
  if (x.scalar_type() == type && x.is_contiguous()) return x;
  return at::empty(x.sizes(), x.options().dtype(type)).copy_(x);
}

// P = softmax_rows(X X^T * scale) and A = P X.
template <typename T>
std::pair<at::Tensor, at::Tensor> attend(const at::Tensor& x, T scale) {
  const int64_t H = x.size(0);
  at::Tensor p = matmul_nt(x, x);
  T* pd = p.data_ptr<T>();
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    softmax_rows(pd + i0 * H, r, H, H, scale);
  });
  return {p, matmul_nt(p, x.t())};
}

// In one pass over the pairs of 16 x 16 tiles (I, J >= I): m <- m + m^T (dS + dS^T) and
// p <- p^T, both H x H, so that the last two GEMMs read contiguous rows. Each tile is copied out
// row by row first: walking a column of an H x H matrix directly hits one cache set over and over
// when H is a multiple of 256 (at H = 1024, 20x slower). Tile row I owns the pairs (I, J >= I),
// so no two tasks meet; long and short tile rows alternate, for equal work per thread.
template <typename T>
void symmetrize_and_transpose(T* m, T* p, int64_t H) {
  constexpr int64_t kT = 16;
  const int64_t nt = ceil_div(H, kT);
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    T a[kT][kT], b[kT][kT], pa[kT][kT], pb[kT][kT];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i0 = (t % 2 == 0 ? t / 2 : nt - 1 - t / 2) * kT, ni = std::min(kT, H - i0);
      for (int64_t j0 = i0; j0 < H; j0 += kT) {
        const int64_t nj = std::min(kT, H - j0);
        for (int64_t r = 0; r < ni; ++r)
          for (int64_t c = 0; c < nj; ++c) {
            a[r][c] = m[(i0 + r) * H + j0 + c];
            pa[r][c] = p[(i0 + r) * H + j0 + c];
          }
        for (int64_t r = 0; r < nj; ++r)
          for (int64_t c = 0; c < ni; ++c) {
            b[r][c] = m[(j0 + r) * H + i0 + c];
            pb[r][c] = p[(j0 + r) * H + i0 + c];
          }
        for (int64_t r = 0; r < ni; ++r)
          for (int64_t c = 0; c < nj; ++c) {
            m[(i0 + r) * H + j0 + c] = a[r][c] + b[c][r];
            p[(i0 + r) * H + j0 + c] = pb[c][r];
          }
        for (int64_t r = 0; r < nj; ++r)
          for (int64_t c = 0; c < ni; ++c) {
            m[(j0 + r) * H + i0 + c] = a[c][r] + b[r][c];
            p[(j0 + r) * H + i0 + c] = pa[c][r];
          }
      }
    }
  });
}

// A map small enough that its products cost less than a BLAS call's set-up: the same steps as
// map_kl below on one per-thread scratch buffer (no tensors, no ATen calls), products by
// rel::small_gemm.
template <typename T>
double map_kl_small(const at::Tensor& ps_map, const at::Tensor& pt_map, at::Tensor g_out,
                    double tau, double coef) {
  const int64_t H = ps_map.size(0), W = ps_map.size(1), hw = H * W, hh = H * H;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(W)));
  const T inv_tau = static_cast<T>(1.0 / tau);
  thread_local std::vector<T> scratch;
  scratch.resize(5 * hw + 2 * hh);
  T* xs = scratch.data();  // X_s, X_t, A_s, A_t, dA: H x W; P, dS: H x H
  T* xt = xs + hw;
  T* as = xt + hw;
  T* at = as + hw;
  T* da = at + hw;
  T* p = da + hw;
  T* ds = p + hh;
  auto load = [&](const at::Tensor& m, T* out) {
    const int64_t sh = m.stride(0), sw = m.stride(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "kdk_la_load", [&] {
      const scalar_t* src = m.data_ptr<scalar_t>();
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j) out[i * W + j] = static_cast<T>(src[i * sh + j * sw]);
    });
  };
  // P = softmax_rows(X X^T * scale), A = P X (P left in p).
  auto attend_small = [&](const T* x, T* a) {
    rel::small_gemm<T>(x, W, 1, x, 1, W, p, H, H, W, H);
    softmax_rows(p, H, H, H, scale);
    rel::small_gemm<T>(p, H, 1, x, W, 1, a, W, H, H, W);
  };
  load(pt_map, xt);
  attend_small(xt, at);
  load(ps_map, xs);
  attend_small(xs, as);
  std::vector<BlockStats<T>> stats;
  for (int64_t i0 = 0; i0 < H; i0 += kRows)
    stats.push_back(block_stats(as + i0 * W, at + i0 * W, std::min(kRows, H - i0) * W, inv_tau));
  const MapKl k = combine(stats);
  if (!g_out.defined()) return k.kl;
  softmax_grad(as, at, da, hw, inv_tau, static_cast<T>(k.lse_s), static_cast<T>(k.lse_t),
               static_cast<T>(k.delta), static_cast<T>(coef));
  rel::small_gemm<T>(da, W, 1, xs, 1, W, ds, H, H, W, H);
  for (int64_t i = 0; i < H; ++i) {  // dS = P o (dP - D), D_i = <P_i, dP_i>
    const T di = static_cast<T>(rel::dot_acc(p + i * H, ds + i * H, H));
    for (int64_t j = 0; j < H; ++j) ds[i * H + j] = p[i * H + j] * (ds[i * H + j] - di);
  }
  symmetrize_and_transpose(ds, p, H);
  rel::small_gemm<T>(p, H, 1, da, W, 1, as, W, H, H, W);  // P^T dA, into A_s's buffer
  rel::small_gemm<T>(ds, H, 1, xs, W, 1, as, W, H, H, W, scale, true);
  const int64_t gh = g_out.stride(0), gw = g_out.stride(1);
  AT_DISPATCH_FLOATING_TYPES(g_out.scalar_type(), "kdk_la_store", [&] {
    scalar_t* g = g_out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) g[i * gh + j * gw] = static_cast<scalar_t>(as[i * W + j]);
  });
  return k.kl;
}

// The map's KL term; with g_out defined (an H x W view, any strides), also writes d loss / d ps
// for this map into it.
template <typename T>
double map_kl(const at::Tensor& ps_map, const at::Tensor& pt_map, at::Tensor g_out, double tau,
              double coef) {
  const int64_t H = ps_map.size(0), W = ps_map.size(1);
  if (H * H * W <= rel::kSmallGemm) return map_kl_small<T>(ps_map, pt_map, g_out, tau, coef);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(W)));
  const T inv_tau = static_cast<T>(1.0 / tau);
  const at::Tensor a_t = attend<T>(as_matrix<T>(pt_map), scale).second;
  const at::Tensor xs = as_matrix<T>(ps_map);
  at::Tensor p, a_s;
  std::tie(p, a_s) = attend<T>(xs, scale);
  const T* ad = a_s.data_ptr<T>();
  const T* td = a_t.data_ptr<T>();
  std::vector<BlockStats<T>> stats(ceil_div(H, kRows));
  for_row_blocks(H, [&](int64_t blk, int64_t i0, int64_t r) {
    stats[blk] = block_stats(ad + i0 * W, td + i0 * W, r * W, inv_tau);
  });
  const MapKl k = combine(stats);
  if (!g_out.defined()) return k.kl;

  const T lt = static_cast<T>(k.lse_t), ls = static_cast<T>(k.lse_s);
  const T dl = static_cast<T>(k.delta), cf = static_cast<T>(coef);
  const at::Tensor da = at::empty_like(a_s);
  T* dad = da.data_ptr<T>();
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    softmax_grad(ad + i0 * W, td + i0 * W, dad + i0 * W, r * W, inv_tau, ls, lt, dl, cf);
  });
  // dS = P o (dP - D) in place of dP; D_i = <P_i, dP_i> (the softmax backward).
  const at::Tensor ds = matmul_nt(da, xs);
  T* dsd = ds.data_ptr<T>();
  T* pd = p.data_ptr<T>();
  for_row_blocks(H, [&](int64_t, int64_t i0, int64_t r) {
    for (int64_t i = i0; i < i0 + r; ++i) {
      const T* pi = pd + i * H;
      T* g = dsd + i * H;
      const T di = static_cast<T>(rel::dot_acc(pi, g, H));
      for (int64_t j = 0; j < H; ++j) g[j] = pi[j] * (g[j] - di);
    }
  });
  symmetrize_and_transpose(dsd, pd, H);
  // P^T dA + (dS + dS^T) X / sqrt(W)
  at::add_out(g_out, matmul_nt(p, da.t()), matmul_nt(ds, xs.t()), static_cast<double>(scale));
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
  const int64_t B = ps.size(0), K = ps.size(1), maps = B * K;
  const auto opts = ps.options().dtype(f64 ? at::kDouble : at::kFloat);
  // In ps's memory format: NCHW maps are written in place by the last add.
  at::Tensor grad = need_grad ? at::empty_like(ps, opts) : at::empty({0}, opts);
  const double coef = tau / static_cast<double>(maps);  // d loss / d A_s = coef (q_s - q_t)
  std::vector<double> kl(maps);
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "kdk_logit_attention", [&] {
    auto run = [&](int64_t m) {
      const int64_t b = m / K, c = m % K;
      at::Tensor g = need_grad ? grad.select(0, b).select(0, c) : at::Tensor();
      kl[m] = map_kl<scalar_t>(ps.select(0, b).select(0, c), pt.select(0, b).select(0, c), g, tau,
                               coef);
    };
    const int64_t threads = at::get_num_threads();
    if (maps >= threads) {
      // One task per thread, each taking the next map when done: on a busy machine a thread
      // that is held up takes fewer maps. Which thread runs a map never changes its result.
      std::atomic<int64_t> next{0};
      at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd_worker;
        for (int64_t m = next++; m < maps; m = next++) run(m);
      });
    } else {
      for (int64_t m = 0; m < maps; ++m) run(m);
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
