// Pixel relation on CUDA: kernels and host launchers (declared in relations_kernel.h). Both
// routes read fs and ft through their strides and normalise pixels as they load (the per-pixel
// norms of a 64-pixel tile are recomputed where a kernel needs them), with no padded copies.
//
// "mse", by the algebraic route |S_s - S_t|^2 = |A A^T|^2 + |T T^T|^2 - 2 |A T^T|^2:
//  - prm_gram, one block per (sample, 64 x 64 tile, chunk of pixels): the split-K Gram of the
//    stacked rows Z = [A; T] ((Cs + Ct) x N), whose blocks are m_ss, m_st and m_tt;
//  - prm_tail, one block per sample: merges the chunks in a fixed order, writes m_ss and m_st
//    and the sample's signed sum of squares;
//  - finish_sum: the fixed-order loss sum, clamped at 0 (the sum is >= 0 in exact arithmetic);
//  - prm_backward, one block per (sample, 64 pixels): dA = m_ss A - m_st T for every student
//    channel, then the pixel-normalisation backward (its per-pixel dot <A, dA> needs every
//    channel: a first pass over the channel blocks forms it, a second writes the gradient).
//    The "mse" route runs in float64 throughout (as the float64 DGEMMs it replaces did; the
//    Gram's tiles on the float64 tensor cores from sm_80, gram_chunk): the
//    identity subtracts sums of squares of O(N) entries to leave |S_s - S_t|^2, which near the
//    teacher is ~1e-6 of them, and dA is likewise a small difference of O(N) products.
// "kl", flash-attention style over 64 x 64 tiles of S_s = A^T A and S_t = T^T T:
//  - prk_forward: one block per (sample, 64-row block), streaming the column blocks with an
//    online softmax for both rows; writes lse_s, lse_t and each row's KL bracket; finish_sum
//    adds the brackets;
//  - prk_backward: the same tiles recomputed, H_IJ = Gm_IJ + Gm_JI^T (S is symmetric, so both
//    come from one tile), dA_I += A_J H_IJ^T kept in registers across the column blocks (up to
//    256 student channels in float32, 64 in float64; above, in the rows of a scratch that only
//    this block touches, written on the first column block: no zero fill, no atomics), and the
//    pixel-normalisation backward as the epilogue.
//
// Precision of "kl": the Gram tiles of float32 inputs are 3xTF32 tensor-core products on sm_80 and
// later (mma_tf32.cuh: ~2^-21 relative error per product, as FP32 FMA; plain TF32's ~5e-4 would
// swamp S_s - S_t near the teacher: 38 of the emulated accuracy tests fail with it), and so are
// the backward's dA_I += A_J H_IJ^T; FP32 FMA on older GPUs, FP64 FMA for float64 inputs. Each
// row's KL bracket is formed in the accumulation type before any cross-row sum and centred on
// the teacher's arg-max column k (see RowState):
//   KL_i = log1p(sum_j p_t expm1(u_j)) - sum_j p_t u_j,   u_j = d_j - d_k,  d = (S_s - S_t) / tau,
// which equals the contract's sum_j p_t (S_t - S_s) / tau + lse_s - lse_t but does not cancel
// catastrophically when the student is close to the teacher: lse_s and lse_t are ~log N + 1/tau
// each, and their float32 difference would carry an absolute error ~1e-6 against a bracket of
// order d^2 (34x the loss at noise 1e-4 for the plain form).
//
// Deterministic: fixed launch shapes and chunking from the sizes, fixed-order sums, no atomics.
#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/finish_kernel.h"
#include "cuda/mma_tf32.cuh"
#include "cuda/relation_tiles.cuh"

namespace kdk {
namespace gpu {
namespace {

using namespace rel;


// ---------------------------------------------------------------------------------------------
// "mse"

struct PrmPlan {
  int64_t B, Cs, Ct, R, N, nt, splits, chunk;
};

PrmPlan prm_plan(const Tensor4& fs, const Tensor4& ft) {
  PrmPlan p;
  p.B = fs.size[0];
  p.Cs = fs.size[1];
  p.Ct = ft.size[1];
  p.R = p.Cs + p.Ct;
  p.N = fs.size[2] * fs.size[3];
  p.nt = ceil_div(p.R, kTile);
  const int64_t tiles = p.B * p.nt * p.nt;
  const int64_t want = tiles > 0 ? ceil_div(kTargetBlocks, tiles) : 1;
  // At least 256 pixels per chunk, and the partial Grams (splits x R^2 doubles per sample) at most
  // half the inputs' R N floats: splits <= N / (4 R).
  const int64_t by_chunk = p.N > 0 ? ceil_div(p.N, 4 * kTile) : 1;
  const int64_t by_memory = p.R > 0 ? p.N / (4 * p.R) : 1;
  const int64_t max_splits = std::max<int64_t>(1, std::min(by_chunk, by_memory));
  const int64_t splits = want < max_splits ? want : max_splits;
  p.chunk = round_up(ceil_div(p.N > 0 ? p.N : 1, splits), kTile);
  p.splits = p.N > 0 ? ceil_div(p.N, p.chunk) : 1;
  return p;
}

struct PrmGramArgs {
  Feat fs, ft;
  PrmPlan p;
  double* part;  // (splits, B, R, R)
};

// Row r of Z = [A; T] at pixel n (index p in the current 64-pixel tile); 0 outside.
__device__ __forceinline__ double stacked_value(const Feat& fs, const Feat& ft, int64_t b, int64_t r, int64_t n,
                                                int p, const double* den_s, const double* den_t) {
  if (n >= fs.N) return 0;
  if (r < fs.C) return load<double>(fs, b * fs.sB + r * fs.sC + pixel_offset(fs, n)) / den_s[p];
  r -= fs.C;
  if (r < ft.C) return load<double>(ft, b * ft.sB + r * ft.sC + pixel_offset(ft, n)) / den_t[p];
  return 0;
}

__global__ void __launch_bounds__(kThreads) prm_gram(PrmGramArgs a) {
  __shared__ double As[kBK * kLd];
  __shared__ double Bs[kBK * kLd];
  __shared__ double scratch[kThreads];
  __shared__ double den_s[kTile], den_t[kTile];
  const PrmPlan& p = a.p;
  const int t = threadIdx.x;
  int64_t idx = blockIdx.x;
  const int64_t split = idx % p.splits;
  idx /= p.splits;
  const int64_t tile = idx % (p.nt * p.nt), b = idx / (p.nt * p.nt);
  const int64_t i0 = (tile / p.nt) * kTile, j0 = (tile % p.nt) * kTile;
  const int64_t n_begin = split * p.chunk;
  const int64_t n_end = n_begin + p.chunk < p.N ? n_begin + p.chunk : p.N;
  const int sr = by_row_row(t), sk = by_row_k(t);

  double acc[kMicro][kMicro];
  zero(acc);
  for (int64_t f0 = n_begin; f0 < n_end; f0 += kTile) {
    pixel_norms(a.fs, b, f0, scratch, den_s, static_cast<double*>(nullptr));
    pixel_norms(a.ft, b, f0, scratch, den_t, static_cast<double*>(nullptr));
    for (int k0 = 0; k0 < kTile; k0 += kBK) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int pk = k0 + sk + q;
        const int64_t n = f0 + pk < n_end ? f0 + pk : p.N;  // past the chunk: a zero
        As[(sk + q) * kLd + sr] = stacked_value(a.fs, a.ft, b, i0 + sr, n, pk, den_s, den_t);
        Bs[(sk + q) * kLd + sr] = stacked_value(a.fs, a.ft, b, j0 + sr, n, pk, den_s, den_t);
      }
      __syncthreads();
      gram_chunk(As, Bs, acc);
      __syncthreads();
    }
  }
  store_gram_tile(a.part + (split * p.B + b) * p.R * p.R, p.R, i0, j0, acc);
}

// Block-wide fixed-order sum of one double per thread (a tree over `red`); every thread gets it.
__device__ double block_sum(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) red[threadIdx.x] += red[threadIdx.x + width];
    __syncthreads();
  }
  const double total = red[0];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kThreads)
    prm_tail(PrmPlan p, const double* __restrict__ part, double* __restrict__ m_ss, double* __restrict__ m_st,
             double* __restrict__ terms) {
  __shared__ double red[kThreads];
  const int64_t b = blockIdx.x, RR = p.R * p.R;
  double local = 0;
  for (int64_t e = threadIdx.x; e < RR; e += kThreads) {
    double v = 0;
    for (int64_t k = 0; k < p.splits; ++k) v += part[(k * p.B + b) * RR + e];
    const int64_t i = e / p.R, j = e % p.R;
    const bool si = i < p.Cs, sj = j < p.Cs;
    local += si == sj ? v * v : -(v * v);  // the m_st block appears twice (st and ts)
    if (si && sj) m_ss[(b * p.Cs + i) * p.Cs + j] = v;
    if (si && !sj) m_st[(b * p.Cs + i) * p.Ct + (j - p.Cs)] = v;
  }
  const double total = block_sum(local, red);
  if (threadIdx.x == 0) terms[b] = total;
}

template <typename g_t>
struct PrmBwdArgs {
  Feat fs, ft;
  int64_t npx;
  const g_t* grad;
  double mult;
  const double* m_ss;
  const double* m_st;
  void* out;
  int64_t o[4];
};

template <typename g_t>
__global__ void __launch_bounds__(kThreads) prm_backward(PrmBwdArgs<g_t> a) {
  __shared__ double Ms[kBK * kLd];  // Ms[k][i] = (m_ss | -m_st)[c0 + i, j0 + k]
  __shared__ double Xs[kBK * kLd];  // Xs[k][p] = (A | T)[j0 + k, n0 + p]
  __shared__ double scratch[kThreads];
  __shared__ double den_s[kTile], den_t[kTile], norm_s[kTile], dot[kTile];
  __shared__ double red[kGrid][kTile];
  const Feat &fs = a.fs, &ft = a.ft;
  const int64_t Cs = fs.C, Ct = ft.C, N = fs.N;
  const int t = threadIdx.x, ty = t / kGrid, tx = t % kGrid;
  const int64_t b = blockIdx.x / a.npx, n0 = (blockIdx.x % a.npx) * kTile;
  pixel_norms(fs, b, n0, scratch, den_s, norm_s);
  pixel_norms(ft, b, n0, scratch, den_t, static_cast<double*>(nullptr));
  const double* mss = a.m_ss + b * Cs * Cs;
  const double* mst = a.m_st + b * Cs * Ct;
  const int mr = by_row_row(t), mk = by_row_k(t);
  const int xk = by_col_k(t), xp = by_col_col(t);
  int64_t offs[kMicro], offt[kMicro];
#pragma unroll
  for (int q = 0; q < kMicro; ++q) {
    const bool ok = n0 + xp + q < N;
    offs[q] = ok ? pixel_offset(fs, n0 + xp + q) : 0;
    offt[q] = ok ? pixel_offset(ft, n0 + xp + q) : 0;
  }
  const double s = static_cast<double>(*a.grad) * a.mult;
  const double eps = kEps;

  // Pass 0 forms the per-pixel dot <A, dA> over all channels; pass 1 recomputes dA and writes.
  for (int pass = 0; pass < 2; ++pass) {
    double part[kMicro] = {0, 0, 0, 0};
    for (int64_t c0 = 0; c0 < Cs; c0 += kTile) {
      double acc[kMicro][kMicro];
      zero(acc);
      // dA = m_ss A over the student's channels, then - m_st T over the teacher's.
      for (int src = 0; src < 2; ++src) {
        const Feat& f = src == 0 ? fs : ft;
        const double* m = src == 0 ? mss : mst;
        const double* den = src == 0 ? den_s : den_t;
        const int64_t K = f.C;
        const double sign = src == 0 ? 1.0 : -1.0;
        for (int64_t j0 = 0; j0 < K; j0 += kBK) {
          const int64_t i = c0 + mr;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const int64_t j = j0 + mk + q;
            Ms[(mk + q) * kLd + mr] = (i < Cs && j < K) ? sign * m[i * K + j] : 0.0;
          }
          const int64_t j = j0 + xk;
#pragma unroll
          for (int q = 0; q < kMicro; ++q) {
            const bool ok = j < K && n0 + xp + q < N;
            const int64_t off = src == 0 ? offs[q] : offt[q];
            Xs[xk * kLd + xp + q] = ok ? load<double>(f, b * f.sB + j * f.sC + off) / den[xp + q] : 0.0;
          }
          __syncthreads();
          multiply_chunk(Ms, Xs, ty, tx, acc);
          __syncthreads();
        }
      }
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const int px = tx * kMicro + c;
        const int64_t n = n0 + px;
        if (n >= N) continue;
        const int64_t h = n / fs.W, w = n % fs.W;
#pragma unroll
        for (int r = 0; r < kMicro; ++r) {
          const int64_t ch = c0 + ty * kMicro + r;
          if (ch >= Cs) continue;
          const double A = load<double>(fs, b * fs.sB + ch * fs.sC + offs[c]) / den_s[px];
          if (pass == 0) {
            part[c] += A * acc[r][c];
          } else {
            const double nv = norm_s[px];
            const double v = nv > eps ? s * (acc[r][c] - A * dot[px]) / nv : s * acc[r][c] / eps;
            store(a.out, fs.dtype, b * a.o[0] + ch * a.o[1] + h * a.o[2] + w * a.o[3], v);
          }
        }
      }
    }
    if (pass == 0) {
#pragma unroll
      for (int c = 0; c < kMicro; ++c) red[ty][tx * kMicro + c] = part[c];
      __syncthreads();
      if (t < kTile) {
        double d = 0;
        for (int y = 0; y < kGrid; ++y) d += red[y][t];
        dot[t] = d;
      }
      __syncthreads();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// "kl"

struct PrkPlan {
  int64_t B, N, row_blocks, Cs_pad, Npad;
};

PrkPlan prk_plan(const Tensor4& fs) {
  PrkPlan p;
  p.B = fs.size[0];
  p.N = fs.size[2] * fs.size[3];
  p.row_blocks = ceil_div(p.N, kTile);
  p.Cs_pad = round_up(fs.size[1], kTile);
  p.Npad = p.row_blocks * kTile;
  return p;
}

// The element offsets of the 4 pixels n0 + 4 (t % 16) + q a thread stages (0 past N).
__device__ __forceinline__ void stage_offsets(const Feat& f, int64_t n0, int64_t (&off)[kMicro]) {
  const int p = by_col_col(threadIdx.x);
#pragma unroll
  for (int q = 0; q < kMicro; ++q) off[q] = n0 + p + q < f.N ? pixel_offset(f, n0 + p + q) : 0;
}

// float32 tile products on the tensor cores (3xTF32, mma_tf32.cuh) where the GPU has TF32
// (kTensorCores); FP32 FMA before sm_80, FP64 FMA for float64 inputs.
template <typename acc_t>
constexpr bool kMmaTiles = kTensorCores && std::is_same<acc_t, float>::value;
constexpr int kLdX = kTile + 1;  // the exchange tile's row stride (see frag_to_micro)

// frag += the staged chunk's contribution to one warp's part of a 64 x 64 tile, sum over kBK rows
// k of As[k][m] Bs[k][n] (row strides kLdA, kLdB), as 3xTF32 tensor-core products: warp w owns
// rows 16 (w / 2) .. + 15 and columns 32 (w % 2) .. + 31, four m16n8 tiles (frag[n]: columns
// 8 n + ...) in mma_tf32's layout.
template <int kLdA = kLd, int kLdB = kLd>
__device__ __forceinline__ void mma_chunk(const float* As, const float* Bs, float (&frag)[4][4]) {
  const int lane = threadIdx.x % 32, w = threadIdx.x / 32, g = lane / 4, q = lane % 4;
  const int m0 = (w / 2) * 16 + g, n0 = (w % 2) * 32 + g;
  auto split = [](float x, uint32_t& big, uint32_t& small) {
    big = tf32_round(x);
    small = tf32_round(x - __uint_as_float(big));
  };
#pragma unroll
  for (int k = 0; k < kBK; k += 8) {
    uint32_t ab[4], as[4];
    split(As[(k + q) * kLdA + m0], ab[0], as[0]);
    split(As[(k + q) * kLdA + m0 + 8], ab[1], as[1]);
    split(As[(k + q + 4) * kLdA + m0], ab[2], as[2]);
    split(As[(k + q + 4) * kLdA + m0 + 8], ab[3], as[3]);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      uint32_t bb[2], bs[2];
      split(Bs[(k + q) * kLdB + n0 + 8 * n], bb[0], bs[0]);
      split(Bs[(k + q + 4) * kLdB + n0 + 8 * n], bb[1], bs[1]);
      mma_tf32(frag[n], as, bb);  // the small terms first
      mma_tf32(frag[n], ab, bs);
      mma_tf32(frag[n], ab, bb);
    }
  }
}

// acc += the tile in the warps' mma fragments, each thread its 4 x 4 micro-tile (rows 4 ty + r,
// columns 4 tx + c: the layout the softmax code works in), through X (64 x kLdX floats).
__device__ __forceinline__ void frag_to_micro(const float (&frag)[4][4], float* X, float (&acc)[kMicro][kMicro]) {
  const int t = threadIdx.x, lane = t % 32, w = t / 32, g = lane / 4, q = lane % 4;
  const int m0 = (w / 2) * 16 + g, n0 = (w % 2) * 32 + 2 * q;
  __syncthreads();  // X's previous readers are done
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) X[(m0 + 8 * (i / 2)) * kLdX + n0 + 8 * n + i % 2] = frag[n][i];
  __syncthreads();
  const int ty = t / kGrid, tx = t % kGrid;
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) acc[r][c] += X[(ty * kMicro + r) * kLdX + tx * kMicro + c];
}

// acc[r][c] = S[i0 + 4 ty + r, j0 + 4 tx + c] for one input: the sum over channels of the
// normalised pixels, staged as they load (den_i / den_j: the tiles' pixel-norm denominators;
// off_i / off_j: this thread's staging offsets). Starts with a barrier, so the caller may reuse
// As / Bs right before calling. X: the exchange tile of the tensor-core route (float32).
template <typename acc_t>
__device__ __forceinline__ void gram_tile(const Feat& f, int64_t b, int64_t i0, int64_t j0, const acc_t* den_i,
                                          const acc_t* den_j, const int64_t (&off_i)[kMicro],
                                          const int64_t (&off_j)[kMicro], acc_t* As, acc_t* Bs, acc_t* X,
                                          acc_t (&acc)[kMicro][kMicro]) {
  const int t = threadIdx.x, ty = t / kGrid, tx = t % kGrid;
  const int sk = by_col_k(t), sp = by_col_col(t);
  float frag[4][4] = {};
  zero(acc);
  for (int64_t c0 = 0; c0 < f.C; c0 += kBK) {
    const int64_t c = c0 + sk;
    const int64_t row = b * f.sB + c * f.sC;
    __syncthreads();  // the previous readers of As / Bs are done
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const bool ci = c < f.C && i0 + sp + q < f.N, cj = c < f.C && j0 + sp + q < f.N;
      As[sk * kLd + sp + q] = ci ? load<acc_t>(f, row + off_i[q]) / den_i[sp + q] : acc_t(0);
      Bs[sk * kLd + sp + q] = cj ? load<acc_t>(f, row + off_j[q]) / den_j[sp + q] : acc_t(0);
    }
    __syncthreads();
    if constexpr (kMmaTiles<acc_t>)
      mma_chunk(As, Bs, frag);
    else
      multiply_chunk(As, Bs, ty, tx, acc);
  }
  if constexpr (kMmaTiles<acc_t>) frag_to_micro(frag, X, acc);
}

// Online state of one row, flash-attention style, over the columns seen so far:
//  - student: ms = max_j x_s, ls = sum_j exp(x_s - ms)                          (-> lse_s)
//  - teacher: mt = max_j x_t, lt = sum_j e_j, e_j = exp(x_t - mt)               (-> lse_t)
//    ct = d at the column of that max (the centre), d = (S_s - S_t) / tau, u_j = d_j - ct,
//    vt = sum_j e_j expm1(u_j), wt = sum_j e_j u_j.
// With p_t = e / lt at the end, the row's KL bracket is
//   KL = lse_s - lse_t - sum_j p_t d_j = log1p(vt / lt) - wt / lt,
// as lse_s - lse_t - ct = log sum_j p_t exp(u_j). Centring on the teacher's arg-max keeps both
// terms small, without cancellation, when the student is close to the teacher (u ~ d small) and
// when the rows are nearly one-hot (the dominant column has u = 0 exactly): the plain
// lse_s - lse_t - sum_j p_t d_j would cancel to an absolute error ~ eps |lse| instead.
template <typename acc_t>
struct RowState {
  acc_t ms, ls, mt, lt, ct, vt, wt;
};

// e * expm1(u) without inf * 0: where u >= 1 (exp(u) - 1 well conditioned) as exp(log_e + u) - e.
template <typename acc_t>
__device__ __forceinline__ acc_t scaled_expm1(acc_t e, acc_t log_e, acc_t u) {
  return u < acc_t(1) ? e * m_expm1(u) : m_exp(log_e + u) - e;
}

// Re-expresses the teacher sums relative to a new max m and centre c (m >= the old max).
// exp(a + s) * vt can overflow only when the student's logits differ by more than ~88 (a tiny
// tau): vt then turns inf / NaN and the final bracket falls back to the plain difference.
template <typename acc_t>
__device__ __forceinline__ void rebase_teacher(RowState<acc_t>& st, acc_t m, acc_t c) {
  const acc_t a = st.mt - m, sh = st.ct - c;  // a = -inf for an empty state: everything becomes 0
  const acc_t alpha = m_exp(a);
  const acc_t grow = m_exp(a + sh);  // alpha * exp(sh)
  const acc_t l = alpha * st.lt;
  // sum_j e_j' expm1(u_j') = grow * vt + l * expm1(sh), with e' = alpha e, u' = u + sh
  st.vt = grow * st.vt + (sh < acc_t(1) ? l * m_expm1(sh) : grow * st.lt - l);
  st.wt = alpha * (st.wt + sh * st.lt);
  st.lt = l;
  st.mt = m;
  st.ct = c;
}

// Merges state o into st (fixed order: the caller's lane order is fixed).
template <typename acc_t>
__device__ __forceinline__ void merge_states(RowState<acc_t>& st, RowState<acc_t> o) {
  const acc_t ninf = static_cast<acc_t>(-INFINITY);
  const acc_t m = st.ms > o.ms ? st.ms : o.ms;
  if (m != ninf) {
    st.ls = st.ls * m_exp(st.ms - m) + o.ls * m_exp(o.ms - m);  // exp(-inf) = 0 for an empty side
    st.ms = m;
  }
  if (st.mt == ninf && o.mt == ninf) return;  // both teachers empty
  // The centre follows the larger teacher max (ties keep st's).
  const bool keep = st.mt >= o.mt;
  const acc_t mt = keep ? st.mt : o.mt, ct = keep ? st.ct : o.ct;
  rebase_teacher(st, mt, ct);
  rebase_teacher(o, mt, ct);
  st.lt += o.lt;
  st.vt += o.vt;
  st.wt += o.wt;
}


template <typename acc_t>
struct PrkArgs {
  Feat fs, ft;
  PrkPlan p;
  acc_t den_tau;
  acc_t* lse_s;
  acc_t* lse_t;
  acc_t* terms;
};

// One block per (sample, 64-row block): grid B * row_blocks, 256 threads.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) prk_forward_kernel(PrkArgs<acc_t> a) {
  __shared__ acc_t As[kBK * kLd];
  __shared__ acc_t Bs[kBK * kLd];
  __shared__ acc_t scratch[kThreads];
  __shared__ acc_t den_is[kTile], den_it[kTile], den_js[kTile], den_jt[kTile];
  __shared__ acc_t X[kMmaTiles<acc_t> ? kTile * kLdX : 1];  // gram_tile's exchange
  const PrkPlan& p = a.p;
  const int t = threadIdx.x, ty = t / kGrid, tx = t % kGrid;
  const int64_t b = blockIdx.x / p.row_blocks, i0 = (blockIdx.x % p.row_blocks) * kTile;
  const acc_t ninf = static_cast<acc_t>(-INFINITY);
  const acc_t den_tau = a.den_tau;
  pixel_norms(a.fs, b, i0, scratch, den_is, static_cast<acc_t*>(nullptr));
  pixel_norms(a.ft, b, i0, scratch, den_it, static_cast<acc_t*>(nullptr));
  int64_t ois[kMicro], oit[kMicro];
  stage_offsets(a.fs, i0, ois);
  stage_offsets(a.ft, i0, oit);

  // One state per row of the thread, over the thread's own columns (see RowState).
  RowState<acc_t> row[kMicro];
#pragma unroll
  for (int r = 0; r < kMicro; ++r) row[r] = RowState<acc_t>{ninf, 0, ninf, 0, 0, 0, 0};

  for (int64_t j0 = 0; j0 < p.N; j0 += kTile) {
    pixel_norms(a.fs, b, j0, scratch, den_js, static_cast<acc_t*>(nullptr));
    pixel_norms(a.ft, b, j0, scratch, den_jt, static_cast<acc_t*>(nullptr));
    int64_t ojs[kMicro], ojt[kMicro];
    stage_offsets(a.fs, j0, ojs);
    stage_offsets(a.ft, j0, ojt);
    acc_t ss[kMicro][kMicro], st[kMicro][kMicro];
    gram_tile(a.fs, b, i0, j0, den_is, den_js, ois, ojs, As, Bs, X, ss);
    gram_tile(a.ft, b, i0, j0, den_it, den_jt, oit, ojt, As, Bs, X, st);
    __syncthreads();  // den_js / den_jt are rewritten by the next column block
    const int64_t nv = p.N - (j0 + tx * kMicro);  // this thread's real columns: min(nv, 4)
    if (nv <= 0) continue;
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      RowState<acc_t>& q = row[r];
      acc_t xs[kMicro], xt[kMicro], d[kMicro];
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const bool ok = c < nv;
        xs[c] = ok ? ss[r][c] * den_tau : ninf;  // padded columns: exp(-inf - m) = 0
        xt[c] = ok ? st[r][c] * den_tau : ninf;
        d[c] = ok ? (ss[r][c] - st[r][c]) * den_tau : acc_t(0);
      }
      // Student: running max and rescaled sum. Column 0 is real, so mxs is finite.
      acc_t mxs = q.ms;
#pragma unroll
      for (int c = 0; c < kMicro; ++c) mxs = xs[c] > mxs ? xs[c] : mxs;
      acc_t es = 0;
#pragma unroll
      for (int c = 0; c < kMicro; ++c) es += m_exp(xs[c] - mxs);
      q.ls = q.ls * m_exp(q.ms - mxs) + es;
      q.ms = mxs;
      // Teacher: the new max and centre (d at the first column reaching it), then the columns.
      acc_t mxt = q.mt, cnew = q.ct;
#pragma unroll
      for (int c = 0; c < kMicro; ++c)
        if (xt[c] > mxt) {
          mxt = xt[c];
          cnew = d[c];
        }
      rebase_teacher(q, mxt, cnew);
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const acc_t le = xt[c] - mxt, e = m_exp(le);  // 0 for padded columns
        const acc_t u = c < nv ? d[c] - cnew : acc_t(0);
        q.lt += e;
        q.vt += scaled_expm1(e, le, u);
        q.wt += e * u;
      }
    }
  }

  // Combine the 16 column-threads of each row: lanes tx = 0..15 of one half-warp share ty.
#pragma unroll
  for (int off = kGrid / 2; off > 0; off /= 2) {
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      RowState<acc_t> o;
      o.ms = __shfl_xor_sync(0xffffffffu, row[r].ms, off);
      o.ls = __shfl_xor_sync(0xffffffffu, row[r].ls, off);
      o.mt = __shfl_xor_sync(0xffffffffu, row[r].mt, off);
      o.lt = __shfl_xor_sync(0xffffffffu, row[r].lt, off);
      o.ct = __shfl_xor_sync(0xffffffffu, row[r].ct, off);
      o.vt = __shfl_xor_sync(0xffffffffu, row[r].vt, off);
      o.wt = __shfl_xor_sync(0xffffffffu, row[r].wt, off);
      merge_states(row[r], o);
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      const int64_t i = i0 + ty * kMicro + r;
      if (i >= p.N) continue;
      const RowState<acc_t>& q = row[r];
      const acc_t lse_si = q.ms + m_log(q.ls);
      const acc_t lse_ti = q.mt + m_log(q.lt);
      const acc_t e = q.vt / q.lt;  // sum_j p_t expm1(u_j) = exp(lse_s - lse_t - ct) - 1
      // log1p where lse_s - lse_t - ct is small (there the plain difference would cancel); the
      // plain difference where it is large, or where vt overflowed (inf / NaN fail the test).
      const acc_t delta = (e > acc_t(-0.5) && e < acc_t(1)) ? m_log1p(e) : (lse_si - lse_ti) - q.ct;
      a.lse_s[b * p.N + i] = lse_si;
      a.lse_t[b * p.N + i] = lse_ti;
      a.terms[b * p.N + i] = delta - q.wt / q.lt;
    }
  }
}

template <typename acc_t>
struct PrkBwdArgs {
  Feat fs, ft;
  PrkPlan p;
  acc_t den_tau;
  const acc_t* lse_s;
  const acc_t* lse_t;
  const acc_t* grad;
  acc_t mult;
  acc_t* dA;  // (B, Cs_pad, Npad) scratch
  void* out;
  int64_t o[4];
};

// The row log-sum-exps of the 4 pixels first .. first + 3 of sample b (0 past N, valid[] false).
template <typename acc_t>
__device__ __forceinline__ void load_lse(const acc_t* lse_s, const acc_t* lse_t, int64_t b, int64_t N, int64_t first,
                                         bool (&valid)[kMicro], acc_t (&ls)[kMicro], acc_t (&lt)[kMicro]) {
#pragma unroll
  for (int q = 0; q < kMicro; ++q) {
    const int64_t i = first + q;
    valid[q] = i < N;
    ls[q] = valid[q] ? lse_s[b * N + i] : acc_t(0);
    lt[q] = valid[q] ? lse_t[b * N + i] : acc_t(0);
  }
}

constexpr int kLdH = kTile + 1;  // Ht's row stride: odd, so its transposed stores spread over the banks

// Register-resident dA_I: how many 64-channel blocks of it one thread keeps (16 values each) for
// sizes up to kKeptMax blocks; above, the blocks go through the scratch. float64 keeps one block
// (a second would exceed 255 registers); float32 up to four (256 channels).
template <typename acc_t>
constexpr int kKeptMax = sizeof(acc_t) == 8 ? 1 : 4;

// acc += A[cc .. cc + 63, J] H_IJ^T: one 64-channel block of dA_I from column block J (Ht staged
// in HB), A staged through As in kBK-column chunks, normalised as it loads; float32 on the tensor
// cores as the Gram tiles (X: the exchange tile).
template <typename acc_t>
__device__ __forceinline__ void accumulate_dA(const Feat& fs, int64_t b, int64_t j0, int64_t N, int64_t cc,
                                              const acc_t* den_js, acc_t* As, const acc_t* HB, acc_t* X,
                                              acc_t (&acc)[kMicro][kMicro]) {
  float frag[4][4] = {};
  const int t = threadIdx.x, ty = t / kGrid, tx = t % kGrid;
  const int sc = by_row_row(t), sj = by_row_k(t);  // staging: channel, 4 consecutive columns
  const int64_t c = cc + sc;
  const int64_t row = b * fs.sB + c * fs.sC;
  for (int jk = 0; jk < kTile; jk += kBK) {
    __syncthreads();  // Ht is published (first pass); the previous readers of As are done
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t j = j0 + jk + sj + q;
      As[(sj + q) * kLd + sc] =
          (c < fs.C && j < N) ? load<acc_t>(fs, row + pixel_offset(fs, j)) / den_js[jk + sj + q] : acc_t(0);
    }
    __syncthreads();
    if constexpr (kMmaTiles<acc_t>)
      mma_chunk<kLd, kLdH>(As, HB + jk * kLdH, frag);
    else
      multiply_chunk<acc_t, kLd, kLdH>(As, HB + jk * kLdH, ty, tx, acc);
  }
  if constexpr (kMmaTiles<acc_t>) frag_to_micro(frag, X, acc);
}

// One block per (sample, 64-row block I), looping over the column blocks J:
//   H_IJ[i][j] = (p_s - p_t)[i][j] (with lse of row i) + (p_s - p_t)[j][i] (with lse of row j; S is
//   symmetric so S[j][i] = S[i][j] comes from the same tile),
//   dA[:, I] += A[:, J] H_IJ^T, in channel blocks of 64 (a 4 x 4 micro-tile of (channel, row) per
//   thread);
// then the pixel-normalisation backward of the block's 64 pixels.
//
// KEPT > 0 (up to KEPT x 64 student channels: the CPKD decoders' 64 and 128): the block's whole
// dA_I stays in registers across the column blocks, each thread KEPT micro-tiles; no scratch is
// read or written and the epilogue works from the registers. KEPT = 0: each channel block's
// micro-tile is written (first J) or read-modify-written in the scratch by its single owner.
//
// __launch_bounds__ with a minimum of 1 block per SM, so that ptxas may use up to 255 registers:
// left to itself it holds the scratch route to 128 (two blocks per SM) and spills ~150 bytes in
// the tile loop.
template <typename acc_t, int KEPT>
__global__ void __launch_bounds__(kThreads, 1) prk_backward_kernel(PrkBwdArgs<acc_t> a) {
  __shared__ acc_t As[kBK * kLd];  // gram tiles: A[c, I]; dA phase: As[j][c] = A[cc + c, j0 + jk + j]
  __shared__ acc_t HB[kTile * kLdH];  // gram tiles: the second stage; dA phase: Ht[j][i] = H_IJ[i][j]
  __shared__ acc_t scratch[kThreads];
  __shared__ acc_t den_is[kTile], den_it[kTile], norm_is[kTile], den_js[kTile], den_jt[kTile], dot[kTile];
  __shared__ acc_t X[kMmaTiles<acc_t> ? kTile * kLdX : 1];  // the mma tiles' exchange
  static_assert(kBK * kLd <= kTile * kLdH, "HB holds a stage");
  const PrkPlan& p = a.p;
  const Feat &fs = a.fs, &ft = a.ft;
  const int t = threadIdx.x, ty = t / kGrid, tx = t % kGrid;
  const int64_t b = blockIdx.x / p.row_blocks, i0 = (blockIdx.x % p.row_blocks) * kTile;
  const acc_t den_tau = a.den_tau;
  acc_t* dAb = a.dA + b * p.Cs_pad * p.Npad;
  pixel_norms(fs, b, i0, scratch, den_is, norm_is);
  pixel_norms(ft, b, i0, scratch, den_it, static_cast<acc_t*>(nullptr));
  int64_t ois[kMicro], oit[kMicro];
  stage_offsets(fs, i0, ois);
  stage_offsets(ft, i0, oit);

  acc_t lsi[kMicro], lti[kMicro];
  bool vi[kMicro];
  load_lse(a.lse_s, a.lse_t, b, p.N, i0 + ty * kMicro, vi, lsi, lti);
  acc_t kept[KEPT > 0 ? KEPT : 1][kMicro][kMicro];  // dA_I, (channel 64 k + 4 ty + r, row i0 + 4 tx + q)
#pragma unroll
  for (int k = 0; k < KEPT; ++k) zero(kept[k]);

  for (int64_t j0 = 0; j0 < p.N; j0 += kTile) {
    pixel_norms(fs, b, j0, scratch, den_js, static_cast<acc_t*>(nullptr));
    pixel_norms(ft, b, j0, scratch, den_jt, static_cast<acc_t*>(nullptr));
    int64_t ojs[kMicro], ojt[kMicro];
    stage_offsets(fs, j0, ojs);
    stage_offsets(ft, j0, ojt);
    acc_t h[kMicro][kMicro];
    {
      acc_t ss[kMicro][kMicro], st[kMicro][kMicro];
      gram_tile(fs, b, i0, j0, den_is, den_js, ois, ojs, As, HB, X, ss);
      gram_tile(ft, b, i0, j0, den_it, den_jt, oit, ojt, As, HB, X, st);
      acc_t lsj[kMicro], ltj[kMicro];
      bool vj[kMicro];
      load_lse(a.lse_s, a.lse_t, b, p.N, j0 + tx * kMicro, vj, lsj, ltj);
#pragma unroll
      for (int r = 0; r < kMicro; ++r)
#pragma unroll
        for (int c = 0; c < kMicro; ++c) {
          h[r][c] = 0;
          if (vi[r] && vj[c]) {
            const acc_t xs = ss[r][c] * den_tau, xt = st[r][c] * den_tau;
            h[r][c] = (m_exp(xs - lsi[r]) - m_exp(xt - lti[r])) + (m_exp(xs - lsj[c]) - m_exp(xt - ltj[c]));
          }
        }
    }
    __syncthreads();  // the gram tiles' readers of HB are done
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) HB[(tx * kMicro + c) * kLdH + ty * kMicro + r] = h[r][c];

    if constexpr (KEPT > 0) {
#pragma unroll
      for (int k = 0; k < KEPT; ++k)
        if (k * kTile < p.Cs_pad) accumulate_dA(fs, b, j0, p.N, int64_t{k} * kTile, den_js, As, HB, X, kept[k]);
    } else {
      for (int64_t cc = 0; cc < p.Cs_pad; cc += kTile) {
        acc_t acc[kMicro][kMicro];  // (channel cc + 4 ty + r, row i0 + 4 tx + q)
        zero(acc);
        accumulate_dA(fs, b, j0, p.N, cc, den_js, As, HB, X, acc);
#pragma unroll
        for (int r = 0; r < kMicro; ++r) {
          acc_t* dst = dAb + (cc + ty * kMicro + r) * p.Npad + i0 + tx * kMicro;
#pragma unroll
          for (int q = 0; q < kMicro; ++q) dst[q] = j0 == 0 ? acc[r][q] : dst[q] + acc[r][q];
        }
      }
    }
    __syncthreads();  // the readers of HB (as Ht) and of den_js are done before the next column block
  }

  const acc_t s = *a.grad * a.mult, eps = static_cast<acc_t>(kEps);
  if constexpr (KEPT > 0) {
    // Pixel-normalisation backward from the registers: the per-pixel dot over the channels (16
    // threads hold 4 of each block; their partials add in ty order), then each thread its outputs.
    acc_t (*red)[kTile] = reinterpret_cast<acc_t (*)[kTile]>(HB);  // kGrid x kTile fits in HB
    // A = fs / norm, loaded again for the outputs rather than held: registers go to kept.
    auto normalised = [&](int64_t c, int q) {
      return c < fs.C && i0 + tx * kMicro + q < p.N
                 ? load<acc_t>(fs, b * fs.sB + c * fs.sC + ois[q]) / den_is[tx * kMicro + q]
                 : acc_t(0);
    };
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      acc_t part = 0;
#pragma unroll
      for (int k = 0; k < KEPT; ++k)
#pragma unroll
        for (int r = 0; r < kMicro; ++r) part += normalised(k * kTile + ty * kMicro + r, q) * kept[k][r][q];
      red[ty][tx * kMicro + q] = part;
    }
    __syncthreads();
    if (t < kTile) {
      acc_t d = 0;
      for (int y = 0; y < kGrid; ++y) d += red[y][t];
      dot[t] = d;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kMicro; ++q) {
      const int px = tx * kMicro + q;
      const int64_t i = i0 + px;
      if (i >= p.N) continue;
      const acc_t nv = norm_is[px];
      const int64_t h = i / fs.W, w = i % fs.W;
#pragma unroll
      for (int k = 0; k < KEPT; ++k)
#pragma unroll
        for (int r = 0; r < kMicro; ++r) {
          const int64_t c = k * kTile + ty * kMicro + r;
          if (c >= fs.C) continue;
          const acc_t g = kept[k][r][q];
          store(a.out, fs.dtype, b * a.o[0] + c * a.o[1] + h * a.o[2] + w * a.o[3],
                nv > eps ? s * (g - normalised(c, q) * dot[px]) / nv : s * g / eps);
        }
    }
    return;
  }

  // Pixel-normalisation backward of the 64 rows (pixels) of I: four threads per pixel, each a
  // quarter of the channels; the block's own dA writes are visible after the barrier.
  const int px = t % kTile, quarter = t / kTile;
  const int64_t i = i0 + px;
  const bool live = i < p.N;
  const int64_t xo = live ? pixel_offset(fs, i) : 0;
  acc_t d = 0;
  if (live) {
    for (int64_t c = quarter; c < fs.C; c += 4)
      d += load<acc_t>(fs, b * fs.sB + c * fs.sC + xo) / den_is[px] * dAb[c * p.Npad + i];
  }
  scratch[t] = d;
  __syncthreads();
  if (quarter == 0)
    dot[px] = ((scratch[px] + scratch[px + kTile]) + scratch[px + 2 * kTile]) + scratch[px + 3 * kTile];
  __syncthreads();
  if (!live) return;
  const acc_t nv = norm_is[px];
  const int64_t h = i / fs.W, w = i % fs.W;
  for (int64_t c = quarter; c < fs.C; c += 4) {
    const acc_t A = load<acc_t>(fs, b * fs.sB + c * fs.sC + xo) / den_is[px];
    const acc_t g = dAb[c * p.Npad + i];
    store(a.out, fs.dtype, b * a.o[0] + c * a.o[1] + h * a.o[2] + w * a.o[3],
          nv > eps ? s * (g - A * dot[px]) / nv : s * g / eps);
  }
}

// The register-resident channel blocks of a launch: 1, 2 or 4 (the next that holds Cs), 0 above
// kKeptMax (the scratch route).
template <typename acc_t>
int kept_blocks(const PrkPlan& p) {
  const int64_t blocks = p.Cs_pad / kTile;
  if (blocks > kKeptMax<acc_t>) return 0;
  return blocks <= 1 ? 1 : blocks <= 2 ? 2 : 4;
}

// prk_backward_kernel<acc_t, kept>, for kept = 0 or a power of two up to KEPT.
template <typename acc_t, int KEPT = kKeptMax<acc_t>>
void launch_backward(int kept, unsigned grid, cudaStream_t stream, const PrkBwdArgs<acc_t>& a) {
  if constexpr (KEPT == 0) {
    prk_backward_kernel<acc_t, 0><<<grid, kThreads, 0, stream>>>(a);
  } else {
    if (kept == KEPT)
      prk_backward_kernel<acc_t, KEPT><<<grid, kThreads, 0, stream>>>(a);
    else
      launch_backward<acc_t, KEPT / 2>(kept, grid, stream, a);
  }
}

}  // namespace

int64_t prm_workspace(const Tensor4& fs, const Tensor4& ft) {
  const PrmPlan p = prm_plan(fs, ft);
  return p.splits * p.B * p.R * p.R + p.B;
}

cudaError_t prm_forward(const Tensor4& fs, const Tensor4& ft, void* workspace, void* m_ss, void* m_st, void* loss,
                        cudaStream_t stream) {
  const PrmPlan p = prm_plan(fs, ft);
  if (p.B == 0 || p.N == 0) return cudaErrorInvalidValue;
  if (p.N > INT32_MAX || p.B * p.nt * p.nt * p.splits > INT32_MAX) return cudaErrorInvalidConfiguration;
  double* part = static_cast<double*>(workspace);
  double* terms = part + p.splits * p.B * p.R * p.R;
  prm_gram<<<static_cast<unsigned>(p.B * p.nt * p.nt * p.splits), kThreads, 0, stream>>>(
      PrmGramArgs{feat(fs), feat(ft), p, part});
  prm_tail<<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(p, part, static_cast<double*>(m_ss),
                                                                 static_cast<double*>(m_st), terms);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const double scale = 1.0 / (static_cast<double>(p.B) * static_cast<double>(p.N) * static_cast<double>(p.N));
  return finish_sum(terms, true, p.B, scale, nullptr, true, loss, fs.dtype == DType::kFloat64, stream);
}

cudaError_t prm_backward(const void* grad, const Tensor4& fs, const Tensor4& ft, const void* m_ss,
                         const void* m_st, void* grad_fs, const int64_t grad_fs_stride[4], cudaStream_t stream) {
  const int64_t B = fs.size[0], N = fs.size[2] * fs.size[3];
  if (B == 0 || N == 0 || fs.size[1] == 0) return cudaSuccess;
  const int64_t npx = ceil_div(N, kTile);
  if (N > INT32_MAX || B * npx > INT32_MAX) return cudaErrorInvalidConfiguration;
  const double mult = 4.0 / (static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(N));
  auto launch = [&](auto* g) {
    using g_t = std::remove_const_t<std::remove_pointer_t<decltype(g)>>;
    PrmBwdArgs<g_t> a{feat(fs), feat(ft), npx, g, mult, static_cast<const double*>(m_ss),
                      static_cast<const double*>(m_st), grad_fs,
                      {grad_fs_stride[0], grad_fs_stride[1], grad_fs_stride[2], grad_fs_stride[3]}};
    prm_backward<g_t><<<static_cast<unsigned>(B * npx), kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  if (fs.dtype == DType::kFloat64) return launch(static_cast<const double*>(grad));
  return launch(static_cast<const float*>(grad));
}

int64_t prk_forward_workspace(const Tensor4& fs) { return fs.size[0] * fs.size[2] * fs.size[3]; }

int64_t prk_backward_workspace(const Tensor4& fs) {
  const PrkPlan p = prk_plan(fs);
  const int kept = fs.dtype == DType::kFloat64 ? kept_blocks<double>(p) : kept_blocks<float>(p);
  return kept > 0 ? 0 : p.B * p.Cs_pad * p.Npad;  // resident dA_I needs no scratch
}

cudaError_t prk_forward(const Tensor4& fs, const Tensor4& ft, double tau, void* workspace, void* lse_s, void* lse_t,
                        void* loss, cudaStream_t stream) {
  const PrkPlan p = prk_plan(fs);
  if (p.B == 0 || p.N == 0) return cudaErrorInvalidValue;
  if (p.N > INT32_MAX || p.B * p.row_blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(p.B * p.row_blocks);
  const bool f64 = fs.dtype == DType::kFloat64;
  auto launch = [&](auto one) {
    using acc_t = decltype(one);
    PrkArgs<acc_t> a{feat(fs), feat(ft), p, static_cast<acc_t>(1.0 / tau), static_cast<acc_t*>(lse_s),
                     static_cast<acc_t*>(lse_t), static_cast<acc_t*>(workspace)};
    prk_forward_kernel<acc_t><<<grid, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  const cudaError_t err = f64 ? launch(1.0) : launch(1.0f);
  if (err != cudaSuccess) return err;
  const double scale = tau * tau / (static_cast<double>(p.B) * static_cast<double>(p.N));
  return finish_sum(workspace, f64, p.B * p.N, scale, nullptr, false, loss, f64, stream);
}

cudaError_t prk_backward(const void* grad, const Tensor4& fs, const Tensor4& ft, double tau, const void* lse_s,
                         const void* lse_t, void* workspace, void* grad_fs, const int64_t grad_fs_stride[4],
                         cudaStream_t stream) {
  const PrkPlan p = prk_plan(fs);
  if (p.B == 0 || p.N == 0 || fs.size[1] == 0) return cudaSuccess;
  if (p.N > INT32_MAX || p.B * p.row_blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(p.B * p.row_blocks);
  const double mult = tau / (static_cast<double>(p.B) * static_cast<double>(p.N));
  auto launch = [&](auto one) {
    using acc_t = decltype(one);
    PrkBwdArgs<acc_t> a{feat(fs), feat(ft), p, static_cast<acc_t>(1.0 / tau), static_cast<const acc_t*>(lse_s),
                        static_cast<const acc_t*>(lse_t), static_cast<const acc_t*>(grad),
                        static_cast<acc_t>(mult), static_cast<acc_t*>(workspace), grad_fs,
                        {grad_fs_stride[0], grad_fs_stride[1], grad_fs_stride[2], grad_fs_stride[3]}};
    launch_backward(kept_blocks<acc_t>(p), grid, stream, a);
    return cudaGetLastError();
  };
  return fs.dtype == DType::kFloat64 ? launch(1.0) : launch(1.0f);
}

}  // namespace gpu
}  // namespace kdk
