// Channel relation on CUDA: kernels and host launchers (declared in relations_kernel.h).
//
//  - cr_gram, one block per (sample, input, 64 x 64 tile of G, chunk of pixels): the split-K
//    Gram of fs and of ft in one launch, read through the strides. "l2" accumulates the raw Gram
//    R = F F^T (its diagonal gives the row norms, so rows are never normalised in memory);
//    "softmax" the Gram of exp(F / tau - m) with m the row maxima over the block's chunk, and the
//    diagonal tiles write each chunk's row maxima and sums (the tail merges them, online-softmax
//    style).
//  - cr_tail, one block per sample: merges the chunks in a fixed order, normalises, and evaluates
//    the C x C distance (mse, or the stable row KL) in float64: the sample's per-row loss terms,
//    grad_gram and row_stats (the statistic and the backward's dot per row).
//  - finish_sum (finish_kernel.cu): the fixed-order loss sum.
//  - cr_backward, one block per (sample, 64 channels, 64 pixels): dFn = M Fn, M = grad_gram +
//    grad_gram^T, with Fn rebuilt from fs and row_stats as it loads, and the normalisation
//    backward as the epilogue.
//
// Precision: G_s - G_t is a small difference of O(1) sums when rows are near uniform (softmax
// with a large tau) or the student is near the teacher, so the Grams are float64 products of
// float64 operands, on the float64 tensor cores from sm_80 (gram_chunk; exact for "l2": float32
// products are exact in float64; "softmax" takes exp in float64). Staging float32 values and
// summing in float32 measured, in the CPU emulation, up to 3x eager float32's own error on the
// softmax-mse loss at tau = 4 (1.5e-5 relative, the contract allows 1e-5 or 2x eager); 3xTF32
// products come within eager's error near the teacher but by as little as 10% (see
// docs/ops/channel_relation_loss.md). The chunk merges and the C x C tail run in float64; the
// backward in the accumulation type.
// Deterministic: launch shapes and chunking depend on the sizes only; fixed-order sums.
#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>
#include <cstdint>

#include "cuda/finish_kernel.h"
#include "cuda/relation_tiles.cuh"

namespace kdk {
namespace gpu {
namespace {

using namespace rel;

constexpr int64_t kMinChunk = 256;  // pixels per split at least

struct CrPlan {
  int64_t B, C, N, nt, splits, chunk;
};

CrPlan cr_plan(const Tensor4& fs) {
  CrPlan p;
  p.B = fs.size[0];
  p.C = fs.size[1];
  p.N = fs.size[2] * fs.size[3];
  p.nt = ceil_div(p.C, kTile);
  const int64_t tiles = p.B * 2 * p.nt * p.nt;
  const int64_t want = tiles > 0 ? ceil_div(kTargetBlocks, tiles) : 1;
  // At least 256 pixels per chunk, and the partial Grams (splits x 2C^2 doubles per sample) at
  // most half the inputs' 2CN floats: splits <= N / (4C).
  const int64_t by_chunk = p.N > 0 ? ceil_div(p.N, kMinChunk) : 1;
  const int64_t by_memory = p.C > 0 ? p.N / (4 * p.C) : 1;
  const int64_t max_splits = std::max<int64_t>(1, std::min(by_chunk, by_memory));
  const int64_t splits = want < max_splits ? want : max_splits;
  p.chunk = ceil_div(ceil_div(p.N > 0 ? p.N : 1, splits), kBK) * kBK;
  p.splits = p.N > 0 ? ceil_div(p.N, p.chunk) : 1;
  return p;
}

// Workspace layout (doubles): partial Grams (splits, B, 2, C, C) whose split-0 slab receives the
// merged normalised Grams, chunk row maxima and sums (splits, B, 2, C) each, merged row
// statistics (B, 2, C, 2), per-row loss terms (B, C).
struct CrWork {
  double *part, *cmax, *csum, *rows, *terms;
};

CrWork cr_work(const CrPlan& p, void* ws) {
  CrWork w;
  w.part = static_cast<double*>(ws);
  w.cmax = w.part + p.splits * p.B * 2 * p.C * p.C;
  w.csum = w.cmax + p.splits * p.B * 2 * p.C;
  w.rows = w.csum + p.splits * p.B * 2 * p.C;
  w.terms = w.rows + p.B * 2 * p.C * 2;
  return w;
}

struct GramArgs {
  Feat fs, ft;
  CrPlan p;
  bool softmax;
  double inv_tau;
  CrWork w;
};

// The Gram operand in float64: raw x ("l2"; exact) or exp(x / tau - m_row) ("softmax"); 0
// outside the matrix.
__device__ __forceinline__ double gram_value(const Feat& f, int64_t base, int64_t row, int64_t n, int64_t n_end,
                                             bool softmax, double inv_tau, double m) {
  if (row >= f.C || n >= n_end) return 0;
  const double x = load<double>(f, base + row * f.sC + pixel_offset(f, n));
  return softmax ? exp(x * inv_tau - m) : x;
}

__global__ void __launch_bounds__(kThreads) cr_gram(GramArgs a) {
  __shared__ double As[kBK * kLd];
  __shared__ double Bs[kBK * kLd];
  __shared__ double rmax[2][kTile];  // chunk maxima of x / tau for rows I (0) and J (1)
  const CrPlan& p = a.p;
  const int t = threadIdx.x;
  int64_t idx = blockIdx.x;
  const int64_t split = idx % p.splits;
  idx /= p.splits;
  const int64_t tile = idx % (p.nt * p.nt);
  idx /= p.nt * p.nt;
  const int src = static_cast<int>(idx % 2);
  const int64_t b = idx / 2;
  const Feat f = src == 0 ? a.fs : a.ft;
  const int64_t i0 = (tile / p.nt) * kTile, j0 = (tile % p.nt) * kTile;
  const int64_t n_begin = split * p.chunk;
  const int64_t n_end = n_begin + p.chunk < p.N ? n_begin + p.chunk : p.N;
  const int64_t base = b * f.sB;
  const int64_t slab = (split * p.B + b) * 2 + src;  // (split, b, src)

  if (a.softmax) {
    // Row maxima and sums over the chunk, two threads per row (even / odd pixels), online.
    const int set = t / (2 * kTile), r = (t % (2 * kTile)) / 2, half = t % 2;
    const int64_t row = (set == 0 ? i0 : j0) + r;
    double m = -INFINITY, s = 0;
    if (row < f.C) {
      for (int64_t n = n_begin + half; n < n_end; n += 2) {
        const double x = load<double>(f, base + row * f.sC + pixel_offset(f, n)) * a.inv_tau;
        if (x > m) {
          s = s * exp(m - x) + 1.0;
          m = x;
        } else {
          s += exp(x - m);
        }
      }
    }
    const double mo = __shfl_xor_sync(0xffffffffu, m, 1), so = __shfl_xor_sync(0xffffffffu, s, 1);
    const double mm = m > mo ? m : mo;
    const double ss = mm == -INFINITY ? 0.0
                                      : (half == 0 ? s * exp(m - mm) + so * exp(mo - mm)
                                                   : so * exp(mo - mm) + s * exp(m - mm));
    if (half == 0) {
      rmax[set][r] = mm;
      if (set == 0 && i0 == j0 && row < f.C) {
        a.w.cmax[slab * p.C + row] = mm;
        a.w.csum[slab * p.C + row] = ss;
      }
    }
    __syncthreads();
  }

  double acc[kMicro][kMicro];
  zero(acc);
  const int sr = by_row_row(t), sk = by_row_k(t);
  const double mi = a.softmax ? rmax[0][sr] : 0.0, mj = a.softmax ? rmax[1][sr] : 0.0;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t n = n0 + sk + q;
      As[(sk + q) * kLd + sr] = gram_value(f, base, i0 + sr, n, n_end, a.softmax, a.inv_tau, mi);
      Bs[(sk + q) * kLd + sr] = gram_value(f, base, j0 + sr, n, n_end, a.softmax, a.inv_tau, mj);
    }
    __syncthreads();
    gram_chunk(As, Bs, acc);
    __syncthreads();
  }
  store_gram_tile(a.w.part + slab * p.C * p.C, p.C, i0, j0, acc);
}

template <typename acc_t>
struct TailArgs {
  CrPlan p;
  bool softmax, kl;
  double tau;
  CrWork w;
  acc_t* grad_gram;
  acc_t* row_stats;
};

// One row of the distance: its loss term and grad_gram row (unit upstream gradient). gs, gt: the
// row of G_s and G_t (float64).
template <typename acc_t>
__device__ __forceinline__ double distance_row(const double* gs, const double* gt, int64_t C, bool kl, double tau, double rows,
                               double cells, acc_t* gg) {
  if (!kl) {
    double term = 0;
    for (int64_t j = 0; j < C; ++j) {
      const double d = gs[j] - gt[j];
      term += d * d;
      gg[j] = static_cast<acc_t>(d * (2.0 / cells));
    }
    return term;
  }
  // KL of the row softmaxes of G / tau, centred on the teacher's arg-max column k (the stable
  // form of relations.cpp's file comment): KL = log1p(sum_j p_t expm1(u_j)) - sum_j p_t u_j,
  // u = d - d_k, d = (G_s - G_t) / tau; the plain difference where lse_s - lse_t - d_k is large.
  double ms = -INFINITY, mt = -INFINITY;
  int64_t k = 0;
  for (int64_t j = 0; j < C; ++j) {
    ms = fmax(ms, gs[j] / tau);
    if (gt[j] / tau > mt) {
      mt = gt[j] / tau;
      k = j;
    }
  }
  double ls = 0, lt = 0;
  for (int64_t j = 0; j < C; ++j) {
    ls += exp(gs[j] / tau - ms);
    lt += exp(gt[j] / tau - mt);
  }
  const double lse_s = ms + log(ls), lse_t = mt + log(lt);
  const double ck = (gs[k] - gt[k]) / tau;
  double e = 0, mu = 0;
  for (int64_t j = 0; j < C; ++j) {
    const double log_pt = gt[j] / tau - lse_t, pt = exp(log_pt), ps = exp(gs[j] / tau - lse_s);
    const double u = (gs[j] - gt[j]) / tau - ck;
    e += u < 1.0 ? pt * expm1(u) : exp(log_pt + u) - pt;  // no inf * 0 where a tiny tau makes u large
    mu += pt * u;
    gg[j] = static_cast<acc_t>((ps - pt) * (tau / rows));
  }
  const double delta = (e > -0.5 && e < 1.0) ? log1p(e) : lse_s - lse_t - ck;
  return delta - mu;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) cr_tail(TailArgs<acc_t> a) {
  const CrPlan& p = a.p;
  const int64_t b = blockIdx.x, C = p.C, CC = C * C;
  const int t = threadIdx.x;
  auto slab = [&](int64_t split, int src) { return a.w.part + ((split * p.B + b) * 2 + src) * CC; };
  auto chunk_stat = [&](const double* s, int64_t split, int src, int64_t i) {
    return s[((split * p.B + b) * 2 + src) * C + i];
  };
  double* rows = a.w.rows + b * 2 * C * 2;  // (src, i): softmax (max, sum), l2 (norm, max(norm, eps))

  for (int64_t e = t; e < 2 * C; e += kThreads) {
    const int src = static_cast<int>(e / C);
    const int64_t i = e % C;
    double s0 = 0, s1 = 0;
    if (a.softmax) {
      s0 = -INFINITY;
      for (int64_t k = 0; k < p.splits; ++k) s0 = fmax(s0, chunk_stat(a.w.cmax, k, src, i));
      for (int64_t k = 0; k < p.splits; ++k)
        s1 += chunk_stat(a.w.csum, k, src, i) * exp(chunk_stat(a.w.cmax, k, src, i) - s0);
    } else {
      double r = 0;
      for (int64_t k = 0; k < p.splits; ++k) r += slab(k, src)[i * C + i];
      s0 = sqrt(r);
      s1 = fmax(s0, kEps);
    }
    rows[e * 2] = s0;
    rows[e * 2 + 1] = s1;
  }
  __syncthreads();

  // The normalised Grams, merged in split order into the split-0 slab (each element is read and
  // written by one thread).
  for (int64_t e = t; e < 2 * CC; e += kThreads) {
    const int src = static_cast<int>(e / CC);
    const int64_t i = (e % CC) / C, j = e % C;
    const double* ri = rows + (src * C + i) * 2;
    const double* rj = rows + (src * C + j) * 2;
    double v = 0;
    for (int64_t k = 0; k < p.splits; ++k) {
      const double x = slab(k, src)[i * C + j];
      v += a.softmax ? x * exp((chunk_stat(a.w.cmax, k, src, i) - ri[0]) + (chunk_stat(a.w.cmax, k, src, j) - rj[0]))
                     : x;
    }
    slab(0, src)[i * C + j] = v / (ri[1] * rj[1]);
  }
  __syncthreads();

  const double* gs = slab(0, 0);
  const double* gt = slab(0, 1);
  acc_t* gg = a.grad_gram + b * CC;
  const double nrows = static_cast<double>(p.B) * static_cast<double>(C);
  const double cells = nrows * static_cast<double>(C);
  for (int64_t i = t; i < C; i += kThreads)
    a.w.terms[b * C + i] = distance_row(gs + i * C, gt + i * C, C, a.kl, a.tau, nrows, cells, gg + i * C);
  __syncthreads();  // grad_gram's rows are all written (block-wide visibility of global memory)

  for (int64_t i = t; i < C; i += kThreads) {
    double dot = 0;
    for (int64_t j = 0; j < C; ++j)
      dot += (static_cast<double>(gg[i * C + j]) + static_cast<double>(gg[j * C + i])) * gs[i * C + j];
    const double* ri = rows + i * 2;
    acc_t* out = a.row_stats + (b * C + i) * 2;
    out[0] = static_cast<acc_t>(a.softmax ? ri[0] + log(ri[1]) : ri[0]);
    out[1] = static_cast<acc_t>(dot);
  }
}

template <typename acc_t>
struct BwdArgs {
  Feat f;
  int64_t C, N, nt, npx;
  bool softmax;
  acc_t inv_tau;
  const acc_t* grad;
  const acc_t* gg;
  const acc_t* stats;
  void* out;
  int64_t o[4];  // grad_fs element strides
};

// Fn[b, j, n] rebuilt from x and the row statistic (l2: x / max(norm, eps); softmax:
// exp(x / tau - lse)).
template <typename acc_t>
__device__ __forceinline__ acc_t rebuild(acc_t x, acc_t stat, bool softmax, acc_t inv_tau) {
  if (softmax) return m_exp(x * inv_tau - stat);
  const acc_t eps = static_cast<acc_t>(kEps);
  return x / (stat < eps ? eps : stat);
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads) cr_backward(BwdArgs<acc_t> a) {
  __shared__ acc_t Ms[kBK * kLd];  // Ms[k][i] = M[i0 + i, j0 + k]
  __shared__ acc_t Xs[kBK * kLd];  // Xs[k][p] = Fn[j0 + k, n0 + p]
  const int t = threadIdx.x, ty = t / kGrid, tx = t % kGrid;
  int64_t idx = blockIdx.x;
  const int64_t pb = idx % a.npx;
  idx /= a.npx;
  const int64_t i0 = (idx % a.nt) * kTile, b = idx / a.nt, n0 = pb * kTile;
  const Feat& f = a.f;
  const int64_t base = b * f.sB;
  const acc_t* gg = a.gg + b * a.C * a.C;
  const acc_t* stats = a.stats + b * a.C * 2;

  const int mr = by_row_row(t), mk = by_row_k(t);  // Ms staging: row i, 4 consecutive k
  const int xk = by_col_k(t), xp = by_col_col(t);  // Xs staging: k, 4 consecutive pixels
  int64_t xoff[kMicro];
#pragma unroll
  for (int q = 0; q < kMicro; ++q) xoff[q] = n0 + xp + q < a.N ? pixel_offset(f, n0 + xp + q) : 0;

  acc_t acc[kMicro][kMicro];
  zero(acc);
  for (int64_t j0 = 0; j0 < a.C; j0 += kBK) {
    const int64_t i = i0 + mr;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + mk + q;
      Ms[(mk + q) * kLd + mr] = (i < a.C && j < a.C) ? gg[i * a.C + j] + gg[j * a.C + i] : acc_t(0);
    }
    const int64_t j = j0 + xk;
    const acc_t stat = j < a.C ? stats[j * 2] : acc_t(0);
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const bool ok = j < a.C && n0 + xp + q < a.N;
      Xs[xk * kLd + xp + q] =
          ok ? rebuild(load<acc_t>(f, base + j * f.sC + xoff[q]), stat, a.softmax, a.inv_tau) : acc_t(0);
    }
    __syncthreads();
    multiply_chunk(Ms, Xs, ty, tx, acc);
    __syncthreads();
  }

  const acc_t g = *a.grad;
  const acc_t eps = static_cast<acc_t>(kEps);
#pragma unroll
  for (int c = 0; c < kMicro; ++c) {
    const int64_t n = n0 + tx * kMicro + c;
    if (n >= a.N) continue;
    const int64_t w = n % f.W, h = n / f.W;
    const int64_t xo = pixel_offset(f, n), oo = h * a.o[2] + w * a.o[3];
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      const int64_t i = i0 + ty * kMicro + r;
      if (i >= a.C) continue;
      const acc_t stat = stats[i * 2], dot = stats[i * 2 + 1];
      const acc_t fn = rebuild(load<acc_t>(f, base + i * f.sC + xo), stat, a.softmax, a.inv_tau);
      acc_t v;
      if (a.softmax) {
        v = g * fn * (acc[r][c] - dot) * a.inv_tau;
      } else {
        v = stat > eps ? g * (acc[r][c] - fn * dot) / stat : g * acc[r][c] / eps;
      }
      store(a.out, f.dtype, b * a.o[0] + i * a.o[1] + oo, v);
    }
  }
}

template <typename acc_t>
cudaError_t forward(const Tensor4& fs, const Tensor4& ft, bool softmax, bool kl, double tau, void* workspace,
                    void* grad_gram, void* row_stats, void* loss, cudaStream_t stream) {
  const CrPlan p = cr_plan(fs);
  const CrWork w = cr_work(p, workspace);
  const GramArgs ga{feat(fs), feat(ft), p, softmax, 1.0 / tau, w};
  cr_gram<<<static_cast<unsigned>(p.B * 2 * p.nt * p.nt * p.splits), kThreads, 0, stream>>>(ga);
  TailArgs<acc_t> ta{p, softmax, kl, tau, w, static_cast<acc_t*>(grad_gram), static_cast<acc_t*>(row_stats)};
  cr_tail<acc_t><<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(ta);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const double rows = static_cast<double>(p.B) * static_cast<double>(p.C);
  const double scale = kl ? tau * tau / rows : 1.0 / (rows * static_cast<double>(p.C));
  return finish_sum(w.terms, true, p.B * p.C, scale, nullptr, false, loss, sizeof(acc_t) == 8, stream);
}

}  // namespace

int64_t cr_workspace(const Tensor4& fs) {
  const CrPlan p = cr_plan(fs);
  return p.splits * p.B * 2 * p.C * p.C + 2 * p.splits * p.B * 2 * p.C + p.B * 2 * p.C * 2 + p.B * p.C;
}

cudaError_t cr_forward(const Tensor4& fs, const Tensor4& ft, bool softmax, bool kl, double tau, void* workspace,
                       void* grad_gram, void* row_stats, void* loss, cudaStream_t stream) {
  const CrPlan p = cr_plan(fs);
  if (p.B == 0 || p.C == 0 || p.N == 0) return cudaErrorInvalidValue;
  if (p.N > INT32_MAX || p.B * 2 * p.nt * p.nt * p.splits > INT32_MAX || p.B > INT32_MAX)
    return cudaErrorInvalidConfiguration;
  if (fs.dtype == DType::kFloat64) return forward<double>(fs, ft, softmax, kl, tau, workspace, grad_gram, row_stats, loss, stream);
  return forward<float>(fs, ft, softmax, kl, tau, workspace, grad_gram, row_stats, loss, stream);
}

cudaError_t cr_backward(const void* grad, const Tensor4& fs, const void* grad_gram, const void* row_stats,
                        bool softmax, double tau, void* grad_fs, const int64_t grad_fs_stride[4], cudaStream_t stream) {
  const int64_t B = fs.size[0], C = fs.size[1], N = fs.size[2] * fs.size[3];
  if (B == 0 || C == 0 || N == 0) return cudaSuccess;
  const int64_t nt = ceil_div(C, kTile), npx = ceil_div(N, kTile);
  if (N > INT32_MAX || B * nt * npx > INT32_MAX) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(B * nt * npx);
  auto launch = [&](auto zero_acc) {
    using acc_t = decltype(zero_acc);
    BwdArgs<acc_t> a{feat(fs), C, N, nt, npx, softmax, static_cast<acc_t>(1.0 / tau),
                     static_cast<const acc_t*>(grad), static_cast<const acc_t*>(grad_gram),
                     static_cast<const acc_t*>(row_stats), grad_fs,
                     {grad_fs_stride[0], grad_fs_stride[1], grad_fs_stride[2], grad_fs_stride[3]}};
    cr_backward<acc_t><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  return fs.dtype == DType::kFloat64 ? launch(0.0) : launch(0.0f);
}

}  // namespace gpu
}  // namespace kdk
