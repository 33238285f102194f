// Channel-wise distillation (CWD) on the CPU: per (b, c) row of N = H * W pixels,
//   loss = tau^2 / (B C) * sum_rows KL(softmax(ft / tau) || softmax(fs / tau)).
//
// Forward: one read of fs and ft, an online softmax per row (chunk maximum, then the running
// sums rescaled when the maximum grows). Two ways to walk the rows:
// - row path (NCHW, strided views of it): a task owns one row, contiguous rows are read in
//   place, and the loops vectorise along the pixels;
// - lane path (some input has its channels innermost, channels_last): a task owns up to 64
//   channels of a sample and walks the pixels in order, each chunk gathered pixel by pixel into
//   blocks of 16 channels, and the loops vectorise across the channels (one lane per row).
// It returns per row (m_t, log z_t, m_s, log z_s, delta = lse_s - lse_t), with m the row maximum
// of F / tau and z = sum e^(F / tau - m), and the backward recomputes
//   d loss / d fs = g tau / (B C) (p_s - p_t)
// from fs, ft and those numbers in one more pass. The maximum and the log-sum stay apart because
// their sum, lse, rounded to float has an absolute error of ~|F / tau| 6e-8: at logits of 1e6
// that moves every p by ~6%, while F / tau - m is exact for the pixels that carry the
// probability. Saving the unit gradient in the forward instead would move as many bytes for
// float32 (its write and read replace the backward's re-read of fs and ft) and more for 16-bit
// inputs (it must be float32, or a fp16 unit gradient underflows before AMP's loss scale
// multiplies it), and hold a full-size tensor.
//
// Near the teacher the KL is a small difference of large terms. With d = (fs - ft) / tau
// (exact for close values, then one rounding) and phi(d) = e^d - 1 - d (its Taylor series):
//   KL = log E_pt[e^d] - E_pt[d] = E_pt[phi(d)] + (log1p(u) - u),  u = E_pt[e^d - 1],
// a sum of non-negative O(d^2) terms plus a double-precision correction. It is used when every
// |d| <= 1 in the row; other rows (far from the teacher) use, with u = F / tau - m,
//   KL = E_pt[u_t - u_s] + log z_s - log z_t,
// whose terms stay small where the features are huge (lse_s - lse_t - E_pt[d] has terms that
// round apart by ~eps |F / tau|: 1e-3 instead of 0 at features of 1e6). The
// backward likewise takes p_s - p_t = p_t expm1(x), x = d - delta, by the series where
// |x|, |d| <= 1.
//
// Per-element work is in float (float64 for float64 inputs), in vectorised partial sums per
// chunk that are folded into double per row. Each row is reduced by one task in a fixed
// order and the loss sums the rows in order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/relation_common.h"

namespace kdk {
namespace {

using rel::Map4;

// Row path (each (b, c) row one task): pixels per chunk. The float lane sums then hold 16 terms
// each before they are folded into double.
constexpr int64_t kChunk = 256;
// Lane path (channels innermost): kLanes channel rows per task, vectorised across the rows
// (lane l = channel c0 + l: one 64-byte line of float channels per pixel), kLaneChunk pixels per
// chunk (a 4 KiB block per input, in L1; 64 terms per lane sum before the fold into double).
constexpr int64_t kLanes = 16;
constexpr int64_t kLaneChunk = 64;
// Lane blocks per task: up to 64 channels, so that a task reads whole 256-byte runs of a pixel's
// channels in order (the blocks of one pixel chunk, 16 KiB per input, share L1). With a task per
// 16 channels the reads of a 64-channel map skip 192 of every 256 bytes, which measured ~1.5x
// slower out of DRAM.
constexpr int64_t kMaxGroup = 4;
constexpr int64_t kLaneBlock = kLanes * kLaneChunk;
constexpr int64_t kBlock = std::max(kChunk, kMaxGroup * kLaneBlock);  // buffer per input

// An input tensor as the kernels read it: any floating dtype, any strides.
struct Src {
  const void* data;
  at::ScalarType dtype;
  Map4 v;
  bool flat;  // each (b, c) plane is one contiguous run of N
};

Src src(const at::Tensor& x) {
  const Map4 v = rel::map4(x);
  return {x.data_ptr(), x.scalar_type(), v, rel::flat_planes(v)};
}

// How rows are split into tasks. Rows go through the lane path when some input keeps a pixel's
// channels together. The split never changes a row's arithmetic, only which task does it.
struct Plan {
  bool lanes;
  int64_t rows;   // rows per task: 1, or a multiple of kLanes
  int64_t chunk;  // pixels per step
  int64_t tasks_per_sample;
};

Plan plan(const Src& s, const Src& t) {
  auto inner = [](const Src& x) { return !x.flat && x.v.C > 1 && x.v.sC < x.v.sW; };
  const int64_t B = s.v.B, C = s.v.C;
  if (!inner(s) && !inner(t)) return {false, 1, kChunk, C};
  int64_t group = std::min(kMaxGroup, rel::ceil_div(C, kLanes));
  while (group > 1 && B * rel::ceil_div(C, group * kLanes) < 2 * at::get_num_threads()) group /= 2;
  return {true, group * kLanes, kLaneChunk, rel::ceil_div(C, group * kLanes)};
}

// Pixels n0 .. n0 + len of row (b, c) in T: in place when it already is a contiguous run of T,
// else converted into buf. off: the pixels' offsets when the planes are not flat.
template <typename T>
const T* gather_row(const Src& s, int64_t b, int64_t c, int64_t n0, int64_t len,
                    const int64_t* off, T* buf) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.dtype, "kdk_cwd_row", [&] {
    const scalar_t* plane = static_cast<const scalar_t*>(s.data) + b * s.v.sB + c * s.v.sC;
    if constexpr (std::is_same_v<scalar_t, T>) {
      if (s.flat) return plane + n0;
    }
    if (s.flat) {
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<T>(plane[n0 + i]);
    } else {
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<T>(plane[off[i]]);
    }
    return static_cast<const T*>(buf);
  });
}

// Lane-block buffers: row c0 + k * kLanes + l, pixel n0 + i at
// buf[k * kLaneBlock + i * kLanes + l] (0 in lanes past the last row). Filled pixel by pixel, so memory is read in order.
template <typename T>
void gather_lanes(const Src& s, int64_t b, int64_t c0, int64_t rows, int64_t n0, int64_t len,
                  const int64_t* off, T* buf) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.dtype, "kdk_cwd_lanes", [&] {
    const scalar_t* base = static_cast<const scalar_t*>(s.data) + b * s.v.sB + c0 * s.v.sC;
    for (int64_t i = 0; i < len; ++i) {
      const scalar_t* px = base + (s.flat ? n0 + i : off[i]);
      for (int64_t k = 0; k * kLanes < rows; ++k) {
        const scalar_t* src_k = px + k * kLanes * s.v.sC;
        T* dst = buf + k * kLaneBlock + i * kLanes;
        const int64_t rb = std::min(kLanes, rows - k * kLanes);
        if (s.v.sC == 1 && rb == kLanes) {  // channels_last: one contiguous run per pixel
          for (int64_t l = 0; l < kLanes; ++l) dst[l] = static_cast<T>(src_k[l]);
        } else {
          for (int64_t l = 0; l < rb; ++l) dst[l] = static_cast<T>(src_k[l * s.v.sC]);
          for (int64_t l = rb; l < kLanes; ++l) dst[l] = T(0);
        }
      }
    }
  });
}

// ---- forward -------------------------------------------------------------------------------

template <typename T>
struct RowAcc {
  T ms, mt;       // running maxima of fs / tau, ft / tau
  T dmax;         // max |d| so far
  double zs, zt;  // sum e_s, sum e_t   (e = exp(x / tau - running max))
  double a, p;    // sum e_t d, sum e_t phi(d)
  double q;       // sum e_t (u_t - u_s), u = x / tau - running max
};

// The same for kLanes rows, one per lane.
template <typename T>
struct LaneAcc {
  T ms[kLanes], mt[kLanes], dmax[kLanes];
  double zs[kLanes], zt[kLanes], a[kLanes], p[kLanes], q[kLanes];
  RowAcc<T> row(int64_t l) const {
    return {ms[l], mt[l], dmax[l], zs[l], zt[l], a[l], p[l], q[l]};
  }
  void init() {
    std::fill(ms, ms + kLanes, -std::numeric_limits<T>::infinity());
    std::fill(mt, mt + kLanes, -std::numeric_limits<T>::infinity());
    std::fill(dmax, dmax + kLanes, T(0));
    for (double* x : {zs, zt, a, p, q}) std::fill(x, x + kLanes, 0.0);
  }
};

template <typename T>
RowAcc<T> row_init() {
  const T ninf = -std::numeric_limits<T>::infinity();
  return {ninf, ninf, T(0), 0.0, 0.0, 0.0, 0.0, 0.0};
}

// Online softmax: sums taken against an older, smaller maximum are rescaled to the new one.
// m_chunk = max(x) / tau, which is max(x / tau) exactly (tau > 0, rounding is monotone).
template <typename T>
KDK_ALWAYS_INLINE void raise_max(T m_chunk, T& m, std::initializer_list<double*> sums) {
  if (m_chunk > m) {
    const double f = std::exp(static_cast<double>(m) - static_cast<double>(m_chunk));
    for (double* x : sums) *x *= f;
    m = m_chunk;
  }
}

// Both running maxima raised to a chunk's: sum e_t (u_t - u_s) first, since each u drops by its
// maximum's raise (while z_t is still against the old m_t; nothing summed yet leaves it 0).
template <typename T>
KDK_ALWAYS_INLINE void raise_maxima(T ms_chunk, T mt_chunk, T& ms, T& mt, double& zs, double& zt,
                                    double& a, double& p, double& q) {
  if (zt > 0) {
    const double up_s = ms_chunk > ms ? static_cast<double>(ms_chunk) - static_cast<double>(ms) : 0.0;
    const double up_t = mt_chunk > mt ? static_cast<double>(mt_chunk) - static_cast<double>(mt) : 0.0;
    q += (up_s - up_t) * zt;
  }
  raise_max(ms_chunk, ms, {&zs});
  raise_max(mt_chunk, mt, {&zt, &a, &p, &q});
}

// One element's contributions, against the running maxima ms, mt.
template <typename T>
KDK_ALWAYS_INLINE void element(T xs, T xt, T inv_tau, T ms, T mt, T& zs, T& zt, T& a, T& p, T& q,
                               T& dmax) {
  const T us = xs * inv_tau - ms, ut = xt * inv_tau - mt;
  const T es = rel::exp_acc(us);
  const T et = rel::exp_acc(ut);
  const T d = (xs - xt) * inv_tau;  // exact difference for close values, then one rounding
  zs += es;
  zt += et;
  a += et * d;
  q += et * (ut - us);
  // phi only matters in rows where every |d| <= 1; elsewhere any finite value will do.
  p += et * rel::phi_small(rel::clamp_unit(d));
  dmax = rel::max_nan_last(std::abs(d), dmax);
}

// Row path: n contiguous pixels of one row.
template <typename T>
KDK_ALWAYS_INLINE void row_update(RowAcc<T>& s, const T* xs, const T* xt, int64_t n, T inv_tau) {
  constexpr int L = 16;  // partial sums: one AVX-512 register of floats
  T ms[L], mt[L];
  for (int l = 0; l < L; ++l) ms[l] = mt[l] = -std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) {
      ms[l] = rel::max_nan_last(xs[j + l], ms[l]);
      mt[l] = rel::max_nan_last(xt[j + l], mt[l]);
    }
  for (; j < n; ++j) {
    ms[0] = rel::max_nan_last(xs[j], ms[0]);
    mt[0] = rel::max_nan_last(xt[j], mt[0]);
  }
  for (int l = 1; l < L; ++l) {
    ms[0] = rel::max_nan_last(ms[l], ms[0]);
    mt[0] = rel::max_nan_last(mt[l], mt[0]);
  }
  raise_maxima(ms[0] * inv_tau, mt[0] * inv_tau, s.ms, s.mt, s.zs, s.zt, s.a, s.p, s.q);
  T zs[L] = {}, zt[L] = {}, a[L] = {}, p[L] = {}, q[L] = {}, dmax[L] = {};
  for (j = 0; j + L <= n; j += L)
    for (int l = 0; l < L; ++l)
      element(xs[j + l], xt[j + l], inv_tau, s.ms, s.mt, zs[l], zt[l], a[l], p[l], q[l], dmax[l]);
  for (; j < n; ++j)
    element(xs[j], xt[j], inv_tau, s.ms, s.mt, zs[0], zt[0], a[0], p[0], q[0], dmax[0]);
  for (int l = 0; l < L; ++l) {
    s.zs += zs[l];
    s.zt += zt[l];
    s.a += a[l];
    s.p += p[l];
    s.q += q[l];
    s.dmax = rel::max_nan_last(dmax[l], s.dmax);
  }
}

// Lane path: n pixels of kLanes rows, xs[i * kLanes + l].
template <typename T>
KDK_ALWAYS_INLINE void lanes_update(LaneAcc<T>& s, const T* xs, const T* xt, int64_t n,
                                    T inv_tau) {
  constexpr int L = kLanes;
  T ms[L], mt[L];
  for (int l = 0; l < L; ++l) ms[l] = mt[l] = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i)
    for (int l = 0; l < L; ++l) {
      ms[l] = rel::max_nan_last(xs[i * L + l], ms[l]);
      mt[l] = rel::max_nan_last(xt[i * L + l], mt[l]);
    }
  for (int l = 0; l < L; ++l)
    raise_maxima(ms[l] * inv_tau, mt[l] * inv_tau, s.ms[l], s.mt[l], s.zs[l], s.zt[l], s.a[l],
                 s.p[l], s.q[l]);
  T zs[L] = {}, zt[L] = {}, a[L] = {}, p[L] = {}, q[L] = {}, dmax[L] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int l = 0; l < L; ++l)
      element(xs[i * L + l], xt[i * L + l], inv_tau, s.ms[l], s.mt[l], zs[l], zt[l], a[l], p[l],
              q[l], dmax[l]);
  for (int l = 0; l < L; ++l) {
    s.zs[l] += zs[l];
    s.zt[l] += zt[l];
    s.a[l] += a[l];
    s.p[l] += p[l];
    s.q[l] += q[l];
    s.dmax[l] = rel::max_nan_last(dmax[l], s.dmax[l]);
  }
}

KDK_ROW_CLONES void row_update_f32(RowAcc<float>& s, const float* xs, const float* xt, int64_t n,
                                   float inv_tau) {
  row_update<float>(s, xs, xt, n, inv_tau);
}
KDK_ROW_CLONES void lanes_update_f32(LaneAcc<float>& s, const float* xs, const float* xt,
                                     int64_t n, float inv_tau) {
  lanes_update<float>(s, xs, xt, n, inv_tau);
}
void update(RowAcc<float>& s, const float* xs, const float* xt, int64_t n, float inv_tau) {
  row_update_f32(s, xs, xt, n, inv_tau);
}
void update(LaneAcc<float>& s, const float* xs, const float* xt, int64_t n, float inv_tau) {
  lanes_update_f32(s, xs, xt, n, inv_tau);
}
void update(RowAcc<double>& s, const double* xs, const double* xt, int64_t n, double inv_tau) {
  row_update<double>(s, xs, xt, n, inv_tau);
}
void update(LaneAcc<double>& s, const double* xs, const double* xt, int64_t n, double inv_tau) {
  lanes_update<double>(s, xs, xt, n, inv_tau);
}

// Numbers kept per row for the backward: kStats of them, in this order.
enum Stat { kMt, kLogZt, kMs, kLogZs, kDelta, kStats };

// The row's KL; stats[kMt .. kDelta] as above.
template <typename T>
double row_finish(const RowAcc<T>& s, T* stats) {
  const double log_zt = std::log(s.zt), log_zs = std::log(s.zs);
  double delta, kl;
  if (s.dmax <= T(1)) {
    const double u = (s.a + s.p) / s.zt;
    delta = std::log1p(u);
    kl = s.p / s.zt + (delta - u);
  } else {
    delta = (static_cast<double>(s.ms) - static_cast<double>(s.mt)) + (log_zs - log_zt);
    kl = s.q / s.zt + (log_zs - log_zt);
  }
  stats[kMt] = s.mt;
  stats[kLogZt] = static_cast<T>(log_zt);
  stats[kMs] = s.ms;
  stats[kLogZs] = static_cast<T>(log_zs);
  stats[kDelta] = static_cast<T>(delta);
  return kl;
}

template <typename T>
void forward(const Src& s, const Src& t, double tau, T* stats, double* row_kl) {
  const int64_t C = s.v.C, N = s.v.N;
  const Plan pl = plan(s, t);
  const T inv_tau = static_cast<T>(1.0 / tau);
  at::parallel_for(0, s.v.B * pl.tasks_per_sample, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(2 * kBlock);
    T* bs = buf.data();
    T* bt = bs + kBlock;
    int64_t off_s[kChunk], off_t[kChunk];
    RowAcc<T> row;
    LaneAcc<T> lane[kMaxGroup];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / pl.tasks_per_sample, c0 = (task % pl.tasks_per_sample) * pl.rows;
      const int64_t rows = std::min(pl.rows, C - c0);
      row = row_init<T>();
      for (LaneAcc<T>& la : lane) la.init();
      for (int64_t n0 = 0; n0 < N; n0 += pl.chunk) {
        const int64_t len = std::min(pl.chunk, N - n0);
        if (!s.flat) rel::pixel_offsets(s.v, n0, len, off_s);
        if (!t.flat) rel::pixel_offsets(t.v, n0, len, off_t);
        if (!pl.lanes) {
          update(row, gather_row(s, b, c0, n0, len, off_s, bs),
                 gather_row(t, b, c0, n0, len, off_t, bt), len, inv_tau);
          continue;
        }
        gather_lanes(s, b, c0, rows, n0, len, off_s, bs);
        gather_lanes(t, b, c0, rows, n0, len, off_t, bt);
        for (int64_t k = 0; k * kLanes < rows; ++k)
          update(lane[k], bs + k * kLaneBlock, bt + k * kLaneBlock, len, inv_tau);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = b * C + c0 + r;
        const RowAcc<T> acc = pl.lanes ? lane[r / kLanes].row(r % kLanes) : row;
        row_kl[i] = row_finish(acc, stats + kStats * i);
      }
    }
  });
}

void check_inputs(const char* op, const at::Tensor& fs, const at::Tensor& ft, double tau) {
  TORCH_CHECK(fs.dim() == 4 && fs.sizes() == ft.sizes(), op,
              ": fs and ft must be 4-D (B, C, H, W) of equal shapes, got ", fs.sizes(), " and ",
              ft.sizes());
  TORCH_CHECK((fs.scalar_type() == at::kDouble) == (ft.scalar_type() == at::kDouble), op,
              ": fs and ft must both be float64 or neither");
  TORCH_CHECK(fs.device().is_cpu() && ft.device().is_cpu(), op, ": expects CPU tensors");
  TORCH_CHECK(tau > 0, op, ": tau must be positive, got ", tau);
}

at::ScalarType acc_type(const at::Tensor& fs) {
  return fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> channel_wise_kl_cpu(const at::Tensor& fs, const at::Tensor& ft,
                                                       double tau) {
  check_inputs("channel_wise_kl", fs, ft, tau);
  const int64_t B = fs.size(0), C = fs.size(1);
  const auto acc = acc_type(fs);
  at::Tensor stats = at::empty({B, C, kStats}, fs.options().dtype(acc));
  std::vector<double> row_kl(B * C);
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_cwd_fwd", [&] {
    forward<scalar_t>(src(fs), src(ft), tau, stats.data_ptr<scalar_t>(), row_kl.data());
  });
  double total = 0;
  for (double v : row_kl) total += v;
  const double loss = tau * tau * total / static_cast<double>(B * C);
  return {at::scalar_tensor(loss, fs.options().dtype(acc)), stats};
}

// ---- backward ------------------------------------------------------------------------------

// Row statistics as the backward reads them: stat j of lane l at st[j * kStatStride + l] (the row
// path uses lane 0), so the lane loops load each statistic as one vector.
constexpr int64_t kStatStride = kMaxGroup * kLanes;

// One row's statistics, copied out of st so that the compiler sees they cannot alias the
// output.
template <typename T>
struct RowStats {
  T mt, lzt, ms, lzs, dl;
  RowStats(const T* st, int64_t l)
      : mt(st[kMt * kStatStride + l]), lzt(st[kLogZt * kStatStride + l]),
        ms(st[kMs * kStatStride + l]), lzs(st[kLogZs * kStatStride + l]),
        dl(st[kDelta * kStatStride + l]) {}
};

// p_s - p_t of one element.
template <typename T>
KDK_ALWAYS_INLINE T prob_diff(T xs, T xt, T inv_tau, T mt, T lzt, T ms, T lzs, T dl) {
  const T pt = rel::exp_acc((xt * inv_tau - mt) - lzt);
  const T d = (xs - xt) * inv_tau;
  const T x = d - dl;  // log(p_s / p_t)
  const T near = pt * (x + rel::phi_small(rel::clamp_unit(x)));  // p_t expm1(x)
  const T far = rel::exp_acc((xs * inv_tau - ms) - lzs) - pt;
  // x carries the rounding of d and delta, ~|d| 6e-8 absolute: only small |d| make it precise.
  return rel::select(std::max(std::abs(x), std::abs(d)) <= T(1), near, far);
}

// Row path: out[i] = k (p_s - p_t) for n pixels of a row.
template <typename T>
KDK_ALWAYS_INLINE void row_grad(T* out, const T* xs, const T* xt, int64_t n, const T* st,
                                T inv_tau, T k) {
  const RowStats<T> r(st, 0);
  for (int64_t i = 0; i < n; ++i)
    out[i] = k * prob_diff(xs[i], xt[i], inv_tau, r.mt, r.lzt, r.ms, r.lzs, r.dl);
}

// Lane path: out[i * kLanes + l].
template <typename T>
KDK_ALWAYS_INLINE void lanes_grad(T* out, const T* xs, const T* xt, int64_t n, const T* st,
                                  T inv_tau, T k) {
  T mt[kLanes], lzt[kLanes], ms[kLanes], lzs[kLanes], dl[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    const RowStats<T> r(st, l);
    mt[l] = r.mt, lzt[l] = r.lzt, ms[l] = r.ms, lzs[l] = r.lzs, dl[l] = r.dl;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < kLanes; ++l)
      out[i * kLanes + l] = k * prob_diff(xs[i * kLanes + l], xt[i * kLanes + l], inv_tau, mt[l],
                                          lzt[l], ms[l], lzs[l], dl[l]);
}

KDK_ROW_CLONES void row_grad_f32(float* out, const float* xs, const float* xt, int64_t n,
                                 const float* st, float inv_tau, float k) {
  row_grad<float>(out, xs, xt, n, st, inv_tau, k);
}
KDK_ROW_CLONES void lanes_grad_f32(float* out, const float* xs, const float* xt, int64_t n,
                                   const float* st, float inv_tau, float k) {
  lanes_grad<float>(out, xs, xt, n, st, inv_tau, k);
}
void grad(bool lanes, float* out, const float* xs, const float* xt, int64_t n, const float* st,
          float inv_tau, float k) {
  lanes ? lanes_grad_f32(out, xs, xt, n, st, inv_tau, k)
        : row_grad_f32(out, xs, xt, n, st, inv_tau, k);
}
void grad(bool lanes, double* out, const double* xs, const double* xt, int64_t n,
          const double* st, double inv_tau, double k) {
  lanes ? lanes_grad<double>(out, xs, xt, n, st, inv_tau, k)
        : row_grad<double>(out, xs, xt, n, st, inv_tau, k);
}

// Writes a chunk into gx (its dtype and strides): rows c0 .. c0 + rows, pixels n0 .. n0 + len,
// from vals[i] (row path, one row) or the lane-block buffers (lane path).
template <typename T>
void scatter(const Src& g, void* data, bool lanes, int64_t b, int64_t c0, int64_t rows,
             int64_t n0, int64_t len, const int64_t* off, const T* vals) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.dtype, "kdk_cwd_scatter", [&] {
    scalar_t* base = static_cast<scalar_t*>(data) + b * g.v.sB + c0 * g.v.sC;
    for (int64_t i = 0; i < len; ++i) {
      scalar_t* px = base + (g.flat ? n0 + i : off[i]);
      if (!lanes) {
        *px = static_cast<scalar_t>(vals[i]);
        continue;
      }
      for (int64_t k = 0; k * kLanes < rows; ++k) {
        scalar_t* dst = px + k * kLanes * g.v.sC;
        const T* v = vals + k * kLaneBlock + i * kLanes;
        const int64_t rb = std::min(kLanes, rows - k * kLanes);
        if (g.v.sC == 1 && rb == kLanes) {  // channels_last: one contiguous run per pixel
          for (int64_t l = 0; l < kLanes; ++l) dst[l] = static_cast<scalar_t>(v[l]);
        } else {
          for (int64_t l = 0; l < rb; ++l) dst[l * g.v.sC] = static_cast<scalar_t>(v[l]);
        }
      }
    }
  });
}

template <typename T>
void backward(const Src& s, const Src& t, const at::Tensor& gx, const T* stats, double tau,
              double k) {
  const int64_t C = s.v.C, N = s.v.N;
  const Src g = src(gx);
  const Plan pl = plan(s, t);
  const T inv_tau = static_cast<T>(1.0 / tau), kk = static_cast<T>(k);
  // Row path into a contiguous gradient row of the accumulation type (NCHW float32 / float64):
  // the row loop writes gx itself, no buffer and scatter.
  T* direct = !pl.lanes && g.flat && gx.scalar_type() == c10::CppTypeToScalarType<T>::value
                  ? static_cast<T*>(gx.data_ptr())
                  : nullptr;
  // Long chunks when nothing needs pixel offsets (the backward keeps no lane sums, so the
  // forward's short chunks buy nothing here but per-chunk overhead).
  const int64_t chunk = !pl.lanes && s.flat && t.flat && g.flat ? kBlock : pl.chunk;
  at::parallel_for(0, s.v.B * pl.tasks_per_sample, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(3 * kBlock);
    T* bs = buf.data();
    T* bt = bs + kBlock;
    T* out = bt + kBlock;
    int64_t off_s[kChunk], off_t[kChunk], off_g[kChunk];
    T st[kStats * kStatStride];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / pl.tasks_per_sample, c0 = (task % pl.tasks_per_sample) * pl.rows;
      const int64_t rows = std::min(pl.rows, C - c0);
      const T* row_stats = stats + kStats * (b * C + c0);
      for (int64_t r = 0; r < kStatStride; ++r)  // lanes past the rows: any finite values
        for (int64_t j = 0; j < kStats; ++j)
          st[j * kStatStride + r] = r < rows ? row_stats[kStats * r + j] : T(0);
      for (int64_t n0 = 0; n0 < N; n0 += chunk) {
        const int64_t len = std::min(chunk, N - n0);
        if (!s.flat) rel::pixel_offsets(s.v, n0, len, off_s);
        if (!t.flat) rel::pixel_offsets(t.v, n0, len, off_t);
        if (!g.flat) rel::pixel_offsets(g.v, n0, len, off_g);
        if (!pl.lanes) {
          T* row_out = direct != nullptr ? direct + b * g.v.sB + c0 * g.v.sC + n0 : out;
          grad(false, row_out, gather_row(s, b, c0, n0, len, off_s, bs),
               gather_row(t, b, c0, n0, len, off_t, bt), len, st, inv_tau, kk);
          if (direct == nullptr) scatter(g, gx.data_ptr(), false, b, c0, 1, n0, len, off_g, out);
          continue;
        }
        gather_lanes(s, b, c0, rows, n0, len, off_s, bs);
        gather_lanes(t, b, c0, rows, n0, len, off_t, bt);
        for (int64_t k = 0; k * kLanes < rows; ++k)
          grad(true, out + k * kLaneBlock, bs + k * kLaneBlock, bt + k * kLaneBlock, len,
               st + k * kLanes, inv_tau, kk);
        scatter(g, gx.data_ptr(), true, b, c0, rows, n0, len, off_g, out);
      }
    }
  });
}

at::Tensor channel_wise_kl_backward_cpu(const at::Tensor& grad, const at::Tensor& fs,
                                        const at::Tensor& ft, const at::Tensor& stats,
                                        double tau) {
  check_inputs("channel_wise_kl_backward", fs, ft, tau);
  const int64_t B = fs.size(0), C = fs.size(1);
  const auto acc = acc_type(fs);
  TORCH_CHECK(stats.scalar_type() == acc && stats.is_contiguous() &&
                  stats.numel() == kStats * B * C,
              "channel_wise_kl_backward: stats must be a contiguous (B, C, 5) tensor of the "
              "accumulation dtype");
  const double k = grad.item<double>() * tau / static_cast<double>(B * C);
  at::Tensor gx = at::empty_like(fs);
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_cwd_bwd", [&] {
    backward<scalar_t>(src(fs), src(ft), gx, stats.data_ptr<scalar_t>(), tau, k);
  });
  return gx;
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("channel_wise_kl", &kdk::channel_wise_kl_cpu);
  m.impl("channel_wise_kl_backward", &kdk::channel_wise_kl_backward_cpu);
}
