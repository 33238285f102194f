// Pixel relation on the CPU. S = A^T A (N x N) with A the per-pixel L2-normalised features
// (C x N per sample); the N x N matrices are never held whole.
//
// "mse": the algebraic route, entirely in float64:
//   ||S_s - S_t||_F^2 = ||A A^T||^2 + ||T T^T||^2 - 2 ||A T^T||^2      (C x C Grams, O(N C^2))
// In float32 this identity cancels catastrophically when the student is close to the teacher;
// in float64 the error is ~1e-16 / noise^2 relative, and the Grams are cheap.
//
// "kl": flash-attention style. A task owns a block of kKlRows rows of S and walks the columns
// in tiles of kKlCols: S_s and S_t tiles come from single-threaded BLAS GEMMs in the
// accumulation type (float32 for float16/bfloat16/float32 inputs, float64 for float64), and the
// row statistics are accumulated online (running max, rescaled sums) in float64. Per-thread
// memory is two kKlRows x kKlCols tiles; total memory O(B C N).
//
// Near the teacher, KL_row = sum_j p_t (S_t - S_s) / tau + lse_s - lse_t is a small difference
// of O(1/tau + log N) terms; float32 exps alone leave ~1e-7 relative error in each lse, which is
// the whole loss at noise 1e-3. With d = (S_s - S_t) / tau the same quantity is
//   KL_row = log E_pt[e^d] - E_pt[d] = log1p(E_pt[d] + E_pt[phi(d)]) - E_pt[d],
//   phi(d) = e^d - 1 - d,
// whose terms are all small and accurate when every |d| <= 1 in the row (d is an exact float
// difference, phi comes from its Taylor series); rows with a larger |d| are far from the teacher
// and use the direct form. The backward uses the same idea per element:
//   p_s - p_t = p_t expm1(d - (lse_s - lse_t))   when |d - (lse_s - lse_t)| <= 1.
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
using rel::Map4;

// Rows x columns of S per tile: the two float tiles (S_s, S_t) take 512 KiB, within L2.
constexpr int64_t kKlRows = 64;
constexpr int64_t kKlCols = 1024;
static_assert(kKlRows <= rel::kPixBlock, "a row block goes through normalize_backward_block");

void check_inputs(const char* op, const at::Tensor& fs, const at::Tensor& ft) {
  TORCH_CHECK(fs.dim() == 4 && ft.dim() == 4, op, ": fs and ft must be 4-D (B, C, H, W)");
  TORCH_CHECK(fs.size(0) == ft.size(0) && fs.size(2) == ft.size(2) && fs.size(3) == ft.size(3),
              op, ": fs and ft must have the same batch and spatial sizes, got ", fs.sizes(),
              " and ", ft.sizes());
  const bool f64 = fs.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 == (ft.scalar_type() == at::kDouble), op,
              ": fs and ft must both be float64 or neither");
  TORCH_CHECK(fs.device().is_cpu() && ft.device().is_cpu(), op, ": expects CPU tensors");
}

at::ScalarType acc_type(const at::Tensor& fs) {
  return fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Normalised pixels in a contiguous (B, C, N) buffer of `dtype`, and the raw pixel norms (B, N).
std::pair<at::Tensor, at::Tensor> normalized(const at::Tensor& x, at::ScalarType dtype) {
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2) * x.size(3);
  at::Tensor a = at::empty({B, C, N}, x.options().dtype(dtype));
  at::Tensor norms = at::empty({B, N}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dtype, "kdk_pixel_normalized", [&] {
    rel::pixel_normalize<scalar_t>(x, a.data_ptr<scalar_t>(), norms.data_ptr<double>());
  });
  return {a, norms};
}

double frobenius2(const double* m, int64_t n) {
  double s = 0;
  for (int64_t e = 0; e < n; ++e) s += m[e] * m[e];
  return s;
}

// ---- mse --------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_relation_mse_cpu(const at::Tensor& fs,
                                                                      const at::Tensor& ft) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
  check_inputs("pixel_relation_mse", fs, ft);
  const int64_t B = fs.size(0), Cs = fs.size(1), Ct = ft.size(1), N = fs.size(2) * fs.size(3);
  at::Tensor a = normalized(fs, at::kDouble).first;
  at::Tensor t = normalized(ft, at::kDouble).first;
  at::Tensor m_ss = rel::gram<double>(a, a), m_tt = rel::gram<double>(t, t);
  at::Tensor m_st = rel::gram<double>(a, t);
  double total = 0;
  for (int64_t b = 0; b < B; ++b) {
    total += frobenius2(m_ss.data_ptr<double>() + b * Cs * Cs, Cs * Cs) +
             frobenius2(m_tt.data_ptr<double>() + b * Ct * Ct, Ct * Ct) -
             2.0 * frobenius2(m_st.data_ptr<double>() + b * Cs * Ct, Cs * Ct);
  }
  const double n = static_cast<double>(N);
  const double loss = total / (static_cast<double>(B) * n * n);
  return {at::scalar_tensor(loss, fs.options().dtype(acc_type(fs))), m_ss, m_st};
}

at::Tensor pixel_relation_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& fs,
                                           const at::Tensor& ft, const at::Tensor& m_ss,
                                           const at::Tensor& m_st) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
  check_inputs("pixel_relation_mse_backward", fs, ft);
  TORCH_CHECK(m_ss.scalar_type() == at::kDouble && m_st.scalar_type() == at::kDouble &&
                  m_ss.is_contiguous() && m_st.is_contiguous(),
              "pixel_relation_mse_backward: m_ss and m_st must be contiguous float64");
  const int64_t B = fs.size(0), Cs = fs.size(1), Ct = ft.size(1), N = fs.size(2) * fs.size(3);
  auto [a, norms] = normalized(fs, at::kDouble);
  at::Tensor t = normalized(ft, at::kDouble).first;
  const double n = static_cast<double>(N);
  const double k = rel::scalar_grad(grad) * 4.0 / (static_cast<double>(B) * n * n);
  at::Tensor gx = at::empty_like(fs);
  const Map4 g = rel::map4(gx);
  const int64_t blocks = ceil_div(N, rel::kPixBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "kdk_prm_bwd", [&] {
    scalar_t* gd = gx.data_ptr<scalar_t>();
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
      at::Tensor da = at::empty({Cs * rel::kPixBlock}, a.options());
      int64_t goff[rel::kPixBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, n0 = (task % blocks) * rel::kPixBlock;
        const int64_t len = std::min(rel::kPixBlock, N - n0);
        at::Tensor a_blk = a.select(0, b).narrow(1, n0, len);
        // dA = m_ss A - m_st T for these pixels (the factor k is applied below).
        at::Tensor d = da.narrow(0, 0, Cs * len).view({Cs, len});
        if (Cs * (Cs + Ct) * len <= rel::kSmallGemm) {
          double* dd = d.data_ptr<double>();
          rel::small_gemm<double>(m_ss.data_ptr<double>() + b * Cs * Cs, Cs, 1,
                                  a.data_ptr<double>() + b * Cs * N + n0, N, 1, dd, len, Cs, Cs, len);
          rel::small_gemm<double>(m_st.data_ptr<double>() + b * Cs * Ct, Ct, 1,
                                  t.data_ptr<double>() + b * Ct * N + n0, N, 1, dd, len, Cs, Ct, len, -1.0, true);
        } else {
          at::mm_out(d, m_ss.select(0, b), a_blk);
          d.addmm_(m_st.select(0, b), t.select(0, b).narrow(1, n0, len), 1.0, -1.0);
        }
        const rel::PlaneRun run{rel::flat_planes(g), n0, goff};
        if (!run.flat) rel::pixel_offsets(g, n0, len, goff);
        rel::normalize_backward_block<scalar_t, double>(
            d.data_ptr<double>(), len, a.data_ptr<double>() + b * Cs * N + n0, N,
            norms.data_ptr<double>() + b * N + n0, k, Cs, len, gd + b * g.sB, g.sC, run);
      }
    });
  });
  return gx;
}

// ---- kl: forward ------------------------------------------------------------------------------

template <typename T>
struct KlRow {
  T ms, mt;      // running row maxima of S_s, S_t
  T dmax;        // max |d| so far
  double zs, zt; // sum exp((S - m) / tau)
  double a, b;   // sum e_t d, sum e_t phi(d)   (e_t = exp((S_t - m_t) / tau))
};

// Folds one row of a tile (n columns of S_s and S_t) into the row's running statistics.
template <typename T>
KDK_ALWAYS_INLINE void kl_row_update(KlRow<T>& s, const T* ss, const T* st, int64_t n, T inv_tau) {
  constexpr int L = rel::kLanes;
  T ms_l[L], mt_l[L];
  for (int l = 0; l < L; ++l) ms_l[l] = mt_l[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) {
      ms_l[l] = rel::max_nan_last(ss[j + l], ms_l[l]);
      mt_l[l] = rel::max_nan_last(st[j + l], mt_l[l]);
    }
  for (; j < n; ++j) {
    ms_l[0] = rel::max_nan_last(ss[j], ms_l[0]);
    mt_l[0] = rel::max_nan_last(st[j], mt_l[0]);
  }
  T tms = ms_l[0], tmt = mt_l[0];
  for (int l = 1; l < L; ++l) {
    tms = rel::max_nan_last(ms_l[l], tms);
    tmt = rel::max_nan_last(mt_l[l], tmt);
  }
  // Online softmax: rescale what was summed against an older, smaller maximum.
  if (tms > s.ms) {
    s.zs *= std::exp(static_cast<double>(s.ms - tms) * static_cast<double>(inv_tau));
    s.ms = tms;
  }
  if (tmt > s.mt) {
    const double f = std::exp(static_cast<double>(s.mt - tmt) * static_cast<double>(inv_tau));
    s.zt *= f;
    s.a *= f;
    s.b *= f;
    s.mt = tmt;
  }
  const T ms = s.ms, mt = s.mt;
  double zs[L] = {}, zt[L] = {}, a[L] = {}, b[L] = {};
  T dmax[L];
  for (int l = 0; l < L; ++l) dmax[l] = s.dmax;
  auto element = [&](int64_t jj, int l) {
    const T et = rel::exp_acc((st[jj] - mt) * inv_tau);
    const T es = rel::exp_acc((ss[jj] - ms) * inv_tau);
    const T d = (ss[jj] - st[jj]) * inv_tau;  // an exact difference, then one rounding
    zs[l] += static_cast<double>(es);
    zt[l] += static_cast<double>(et);
    a[l] += static_cast<double>(et) * static_cast<double>(d);
    // phi only matters in rows where every |d| <= 1; elsewhere any finite value will do.
    b[l] += static_cast<double>(et) * static_cast<double>(rel::phi_small(rel::clamp_unit(d)));
    dmax[l] = rel::max_nan_last(std::abs(d), dmax[l]);
  };
  for (j = 0; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) element(j + l, l);
  for (; j < n; ++j) element(j, 0);
  for (int l = 0; l < L; ++l) {
    s.zs += zs[l];
    s.zt += zt[l];
    s.a += a[l];
    s.b += b[l];
    s.dmax = rel::max_nan_last(dmax[l], s.dmax);
  }
}

template <typename T>
KDK_ALWAYS_INLINE void kl_tile_update(KlRow<T>* rows, const T* ss, const T* st, int64_t r,
                                      int64_t jc, T inv_tau) {
  for (int64_t i = 0; i < r; ++i) kl_row_update(rows[i], ss + i * jc, st + i * jc, jc, inv_tau);
}

KDK_ROW_CLONES void kl_tile_update_f32(KlRow<float>* rows, const float* ss, const float* st,
                                       int64_t r, int64_t jc, float inv_tau) {
  kl_tile_update<float>(rows, ss, st, r, jc, inv_tau);
}

void tile_update(KlRow<float>* rows, const float* ss, const float* st, int64_t r, int64_t jc,
                 float inv_tau) {
  kl_tile_update_f32(rows, ss, st, r, jc, inv_tau);
}
void tile_update(KlRow<double>* rows, const double* ss, const double* st, int64_t r, int64_t jc,
                 double inv_tau) {
  kl_tile_update<double>(rows, ss, st, r, jc, inv_tau);
}

// lse_t, lse_s (rounded so that lse_s - lse_t stays as close as T allows to the exact
// difference, which the backward needs) and the row's KL term.
template <typename T>
void kl_row_finish(const KlRow<T>& s, double inv_tau, T* lse_s, T* lse_t, double* kl) {
  const double lt = static_cast<double>(s.mt) * inv_tau + std::log(s.zt);
  double delta, row;
  if (s.dmax <= T(1)) {
    const double mean_d = s.a / s.zt, mean_phi = s.b / s.zt;
    delta = std::log1p(mean_d + mean_phi);
    row = delta - mean_d;
  } else {
    delta = static_cast<double>(s.ms) * inv_tau + std::log(s.zs) - lt;
    row = delta - s.a / s.zt;
  }
  const T lt_out = static_cast<T>(lt);
  *lse_t = lt_out;
  *lse_s = static_cast<T>(static_cast<double>(lt_out) + delta);
  *kl = row;
}

// The r x jc tiles S_s = A_I^T A_J and S_t = T_I^T T_J of one (row block, column block), into
// preallocated per-thread buffers; the forward and the recomputing backward share them.
std::pair<at::Tensor, at::Tensor> score_tiles(const at::Tensor& ss_buf, const at::Tensor& st_buf,
                                              const at::Tensor& a_rows, const at::Tensor& t_rows,
                                              const at::Tensor& ab, const at::Tensor& tb,
                                              int64_t j0, int64_t jc) {
  const int64_t r = a_rows.size(0);
  at::Tensor ss = ss_buf.narrow(0, 0, r * jc).view({r, jc});
  at::Tensor st = st_buf.narrow(0, 0, r * jc).view({r, jc});
  at::mm_out(ss, a_rows, ab.narrow(1, j0, jc));
  at::mm_out(st, t_rows, tb.narrow(1, j0, jc));
  return {ss, st};
}

template <typename T>
void kl_forward(const at::Tensor& a, const at::Tensor& t, double tau, T* lse_s, T* lse_t,
                double* row_kl) {
  const int64_t B = a.size(0), N = a.size(2);
  const int64_t blocks = ceil_div(N, kKlRows);
  const T inv_tau = static_cast<T>(1.0 / tau);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
    at::Tensor ss_buf = at::empty({kKlRows * kKlCols}, a.options());
    at::Tensor st_buf = at::empty({kKlRows * kKlCols}, a.options());
    std::vector<KlRow<T>> rows(kKlRows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * kKlRows;
      const int64_t r = std::min(kKlRows, N - i0);
      const at::Tensor ab = a.select(0, b), tb = t.select(0, b);
      const at::Tensor a_rows = ab.narrow(1, i0, r).t(), t_rows = tb.narrow(1, i0, r).t();
      const T ninf = -std::numeric_limits<T>::infinity();
      std::fill(rows.begin(), rows.end(), KlRow<T>{ninf, ninf, T(0), 0.0, 0.0, 0.0, 0.0});
      for (int64_t j0 = 0; j0 < N; j0 += kKlCols) {
        const int64_t jc = std::min(kKlCols, N - j0);
        auto [ss, st] = score_tiles(ss_buf, st_buf, a_rows, t_rows, ab, tb, j0, jc);
        tile_update(rows.data(), ss.data_ptr<T>(), st.data_ptr<T>(), r, jc, inv_tau);
      }
      for (int64_t i = 0; i < r; ++i) {
        const int64_t row = b * N + i0 + i;
        kl_row_finish(rows[i], 1.0 / tau, lse_s + row, lse_t + row, row_kl + row);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_relation_kl_cpu(const at::Tensor& fs,
                                                                     const at::Tensor& ft,
                                                                     double tau) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
  check_inputs("pixel_relation_kl", fs, ft);
  TORCH_CHECK(tau > 0, "pixel_relation_kl: tau must be positive, got ", tau);
  const int64_t B = fs.size(0), N = fs.size(2) * fs.size(3);
  const auto acc = acc_type(fs);
  at::Tensor a = normalized(fs, acc).first;
  at::Tensor t = normalized(ft, acc).first;
  at::Tensor lse_s = at::empty({B, N}, fs.options().dtype(acc));
  at::Tensor lse_t = at::empty({B, N}, fs.options().dtype(acc));
  std::vector<double> row_kl(B * N);
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_prkl_fwd", [&] {
    kl_forward<scalar_t>(a, t, tau, lse_s.data_ptr<scalar_t>(), lse_t.data_ptr<scalar_t>(),
                         row_kl.data());
  });
  double total = 0;
  for (double v : row_kl) total += v;
  const double loss = tau * tau * total / (static_cast<double>(B) * static_cast<double>(N));
  return {at::scalar_tensor(loss, fs.options().dtype(acc)), lse_s, lse_t};
}

// ---- kl: backward -----------------------------------------------------------------------------

// g = p_s - p_t for one element from z_s = S_s / tau, z_t = S_t / tau, d = (S_s - S_t) / tau
// and the row's lse_s, lse_t, dl = lse_s - lse_t.
template <typename T>
KDK_ALWAYS_INLINE T prob_diff(T zs, T zt, T d, T ls, T lt, T dl) {
  const T pt = rel::exp_acc(zt - lt);
  const T x = d - dl;
  const T near = pt * (x + rel::phi_small(rel::clamp_unit(x)));  // p_t expm1(x)
  const T far = rel::exp_acc(zs - ls) - pt;
  return rel::select(std::abs(x) <= T(1), near, far);
}

// Turns a tile of S_s (rows I, columns J) into M_ij = k (Gm_ij + Gm_ji) in place. S is
// symmetric, so the transposed element's probabilities come from the same S values with the
// column's statistics.
template <typename T>
KDK_ALWAYS_INLINE void kl_tile_grad(T* ss_m, const T* st, int64_t r, int64_t jc, T inv_tau, T k,
                                    const T* ls_i, const T* lt_i, const T* dl_i, const T* ls_j,
                                    const T* lt_j, const T* dl_j) {
  for (int64_t i = 0; i < r; ++i) {
    T* m = ss_m + i * jc;
    const T* t = st + i * jc;
    const T lsi = ls_i[i], lti = lt_i[i], dli = dl_i[i];
    for (int64_t j = 0; j < jc; ++j) {
      const T d = (m[j] - t[j]) * inv_tau;
      const T zs = m[j] * inv_tau, zt = t[j] * inv_tau;
      m[j] = k * (prob_diff(zs, zt, d, lsi, lti, dli) + prob_diff(zs, zt, d, ls_j[j], lt_j[j], dl_j[j]));
    }
  }
}

KDK_ROW_CLONES void kl_tile_grad_f32(float* ss_m, const float* st, int64_t r, int64_t jc,
                                     float inv_tau, float k, const float* ls_i, const float* lt_i,
                                     const float* dl_i, const float* ls_j, const float* lt_j,
                                     const float* dl_j) {
  kl_tile_grad<float>(ss_m, st, r, jc, inv_tau, k, ls_i, lt_i, dl_i, ls_j, lt_j, dl_j);
}

void tile_grad(float* ss_m, const float* st, int64_t r, int64_t jc, float inv_tau, float k,
               const float* ls_i, const float* lt_i, const float* dl_i, const float* ls_j,
               const float* lt_j, const float* dl_j) {
  kl_tile_grad_f32(ss_m, st, r, jc, inv_tau, k, ls_i, lt_i, dl_i, ls_j, lt_j, dl_j);
}
void tile_grad(double* ss_m, const double* st, int64_t r, int64_t jc, double inv_tau, double k,
               const double* ls_i, const double* lt_i, const double* dl_i, const double* ls_j,
               const double* lt_j, const double* dl_j) {
  kl_tile_grad<double>(ss_m, st, r, jc, inv_tau, k, ls_i, lt_i, dl_i, ls_j, lt_j, dl_j);
}

template <typename T, typename scalar_t>
void kl_backward(const at::Tensor& a, const at::Tensor& t, const double* norms, const T* lse_s,
                 const T* lse_t, double tau, double k, at::Tensor& gx) {
  const int64_t B = a.size(0), C = a.size(1), N = a.size(2);
  const int64_t blocks = ceil_div(N, kKlRows);
  const T inv_tau = static_cast<T>(1.0 / tau), kk = static_cast<T>(k);
  std::vector<T> dl(B * N);
  for (int64_t e = 0; e < B * N; ++e) dl[e] = lse_s[e] - lse_t[e];
  const Map4 g = rel::map4(gx);
  scalar_t* gd = gx.data_ptr<scalar_t>();
  const T* ad = a.data_ptr<T>();
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
    at::Tensor ss_buf = at::empty({kKlRows * kKlCols}, a.options());
    at::Tensor st_buf = at::empty({kKlRows * kKlCols}, a.options());
    at::Tensor da_buf = at::empty({C * kKlRows}, a.options());
    int64_t goff[kKlRows];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, i0 = (task % blocks) * kKlRows;
      const int64_t r = std::min(kKlRows, N - i0);
      const at::Tensor ab = a.select(0, b), tb = t.select(0, b);
      const at::Tensor a_rows = ab.narrow(1, i0, r).t(), t_rows = tb.narrow(1, i0, r).t();
      at::Tensor da = da_buf.narrow(0, 0, C * r).view({C, r});
      const int64_t row0 = b * N;
      for (int64_t j0 = 0; j0 < N; j0 += kKlCols) {
        const int64_t jc = std::min(kKlCols, N - j0);
        auto [ss, st] = score_tiles(ss_buf, st_buf, a_rows, t_rows, ab, tb, j0, jc);
        const int64_t ri = row0 + i0, cj = row0 + j0;
        tile_grad(ss.data_ptr<T>(), st.data_ptr<T>(), r, jc, inv_tau, kk, lse_s + ri, lse_t + ri,
                  dl.data() + ri, lse_s + cj, lse_t + cj, dl.data() + cj);
        // dA[:, I] += A[:, J] M^T
        const at::Tensor a_cols = ab.narrow(1, j0, jc);
        if (j0 == 0) at::mm_out(da, a_cols, ss.t());
        else da.addmm_(a_cols, ss.t());
      }
      const rel::PlaneRun run{rel::flat_planes(g), i0, goff};
      if (!run.flat) rel::pixel_offsets(g, i0, r, goff);
      rel::normalize_backward_block<scalar_t, T>(da.data_ptr<T>(), r, ad + b * C * N + i0, N,
                                                 norms + b * N + i0, 1.0, C, r, gd + b * g.sB,
                                                 g.sC, run);
    }
  });
}

at::Tensor pixel_relation_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& fs,
                                          const at::Tensor& ft, const at::Tensor& lse_s,
                                          const at::Tensor& lse_t, double tau) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // see rel::gram
  check_inputs("pixel_relation_kl_backward", fs, ft);
  const auto acc = acc_type(fs);
  const int64_t B = fs.size(0), N = fs.size(2) * fs.size(3);
  TORCH_CHECK(lse_s.scalar_type() == acc && lse_t.scalar_type() == acc && lse_s.is_contiguous() &&
                  lse_t.is_contiguous() && lse_s.numel() == B * N && lse_t.numel() == B * N,
              "pixel_relation_kl_backward: lse_s and lse_t must be contiguous (B, N) tensors of the "
              "accumulation dtype");
  auto [a, norms] = normalized(fs, acc);
  at::Tensor t = normalized(ft, acc).first;
  const double k = rel::scalar_grad(grad) * tau / (static_cast<double>(B) * static_cast<double>(N));
  at::Tensor gx = at::empty_like(fs);
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_prkl_bwd_acc", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fs.scalar_type(), "kdk_prkl_bwd", [&] {
      kl_backward<T, scalar_t>(a, t, norms.data_ptr<double>(), lse_s.data_ptr<T>(),
                               lse_t.data_ptr<T>(), tau, k, gx);
    });
  });
  return gx;
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("pixel_relation_mse", &kdk::pixel_relation_mse_cpu);
  m.impl("pixel_relation_mse_backward", &kdk::pixel_relation_mse_backward_cpu);
  m.impl("pixel_relation_kl", &kdk::pixel_relation_kl_cpu);
  m.impl("pixel_relation_kl_backward", &kdk::pixel_relation_kl_backward_cpu);
}
