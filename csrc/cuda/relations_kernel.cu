// Pixel-relation losses on CUDA: kernels and their host launchers (declared in relations_kernel.h).
// Torch-free so that it compiles on its own.
//
// Both pixel routes start from a contiguous, zero-padded (B, Cpad, Npad) copy of the
// pixel-normalised features (normalize_pixels, one pass over the input through its strides) and
// end with the pixel-normalisation backward fused with the final scaling (normalize_backward).
// In between:
//  - "mse" runs on cuBLAS DGEMMs in the torch glue (float64 C x C Grams, see relations.cpp);
//  - "kl" runs the two tiled kernels below. S_s = A^T A and S_t = T^T T (N x N) exist only as
//    64 x 64 register tiles: kl_forward streams the column blocks of a 64-row block with an online
//    softmax for both rows (flash-attention style); kl_backward recomputes the same tiles, forms
//    H_IJ = Gm_IJ + Gm_JI^T from them (S is symmetric, so both come from one tile) and
//    accumulates dA_I += A_J H_IJ^T into rows of dA that only its block touches: no atomics.
//
// Precision: the tile products are plain FP32 (or FP64) FMAs, never TF32/bf16 tensor cores. Near
// the teacher S_s - S_t is tiny and TF32's 10-bit mantissa (relative error ~5e-4 per product)
// would swamp it; the loss is a sum of terms ~ (S_s - S_t)^2 / tau^2. Each row's KL bracket is
// formed in the accumulation type before any cross-row sum, and centred on the teacher's arg-max
// column k (see RowState):
//   KL_i = log1p(sum_j p_t expm1(u_j)) - sum_j p_t u_j,   u_j = d_j - d_k,  d = (S_s - S_t) / tau,
// which equals the contract's sum_j p_t (S_t - S_s) / tau + lse_s - lse_t but does not cancel
// catastrophically when the student is close to the teacher: lse_s and lse_t are ~log N + 1/tau
// each, and their float32 difference would carry an absolute error ~1e-6 against a bracket of
// order d^2 (measured in the CPU emulation: 34x the loss at noise 1e-4 for the plain form).
//
// Deterministic: fixed launch shapes from tensor sizes, fixed-order sums, no atomics.
#include "relations_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <cstdint>

namespace kdk {
namespace gpu {
namespace {

// Per-pixel kernels: blockDim (32, 8); lane = pixel (coalesced on the contiguous copies), the 8 rows
// split the channels and combine through shared memory in a fixed order.
constexpr int kLanes = 32;
constexpr int kRows = 8;
constexpr int kThreads = kLanes * kRows;

// Tiled kernels: 64 x 64 tiles of S, 256 threads as a 16 x 16 grid, each thread a 4 x 4 micro-tile
// (rows i0 + 4 ty + r, columns j0 + 4 tx + c) of both S_s and S_t (32 accumulators). The channel
// dimension streams through shared memory in chunks of kBK (16 floats / 8 doubles, so one chunk of
// 64 pixels is one 16-byte vector per thread).
constexpr int kTile = static_cast<int>(kRelTile);
constexpr int kMicro = 4;
constexpr int kGrid = kTile / kMicro;  // 16
constexpr int kTileThreads = kGrid * kGrid;
constexpr int kLd = kTile + 4;  // padded shared row: 16-byte aligned, fewer bank conflicts on transposed stores
static_assert(kTileThreads == 256, "the load mappings below assume 256 threads");

template <typename acc_t>
struct TileCfg;
template <>
struct TileCfg<float> {
  static constexpr int kBK = 16;
  using Vec = float4;
};
template <>
struct TileCfg<double> {
  static constexpr int kBK = 8;
  using Vec = double2;
};

// Float tiles: at most 128 registers so that two blocks share an SM (without the hint ptxas picks
// 80 on sm_80 and spills); double tiles need ~200 registers, one block per SM.
template <typename acc_t>
constexpr int kKlMinBlocks = sizeof(acc_t) == 4 ? 2 : 1;

constexpr double kEps = 1e-12;  // the L2-normalisation epsilon (F.normalize's default)

// ---------------------------------------------------------------------------------------------
// Element access and math in the accumulation type. Half and bfloat16 go through the explicit
// intrinsics (torch builds with the implicit conversions disabled).

__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ double load_f(const double* p) { return *p; }

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load(const T* p) {
  return static_cast<acc_t>(load_f(p));
}

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__half* p, double v) { *p = __double2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, double v) { *p = __double2bfloat16(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(float* p, double v) { *p = static_cast<float>(v); }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ float m_exp(float x) { return expf(x); }
__device__ __forceinline__ double m_exp(double x) { return exp(x); }
__device__ __forceinline__ float m_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double m_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float m_log(float x) { return logf(x); }
__device__ __forceinline__ double m_log(double x) { return log(x); }
__device__ __forceinline__ float m_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double m_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float m_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double m_sqrt(double x) { return sqrt(x); }

// One 16-byte vector (4 floats / 2 doubles), 16-byte aligned address, to/from registers.
__device__ __forceinline__ void vload(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void vload(const double* p, double (&v)[2]) {
  const double2 t = *reinterpret_cast<const double2*>(p);
  v[0] = t.x;
  v[1] = t.y;
}

// One 16-byte vector from src to dst, both 16-byte aligned.
template <typename acc_t>
__device__ __forceinline__ void copy16(acc_t* dst, const acc_t* src) {
  using V = typename TileCfg<acc_t>::Vec;
  *reinterpret_cast<V*>(dst) = *reinterpret_cast<const V*>(src);
}

// Four consecutive elements at a 16-byte aligned address (shared or global), to/from registers.
__device__ __forceinline__ void ld4(const float* p, float (&v)[4]) { vload(p, v); }
__device__ __forceinline__ void ld4(const double* p, double (&v)[4]) {
  const double2 t0 = *reinterpret_cast<const double2*>(p);
  const double2 t1 = *reinterpret_cast<const double2*>(p + 2);
  v[0] = t0.x;
  v[1] = t0.y;
  v[2] = t1.x;
  v[3] = t1.y;
}
__device__ __forceinline__ void st4(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void st4(double* p, const double (&v)[4]) {
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  *reinterpret_cast<double2*>(p + 2) = make_double2(v[2], v[3]);
}

// q = a / b, r = a % b for 0 <= a, 0 < b, both below 2^32 (the launchers check it): the 32-bit
// division is a few instructions, the 64-bit one a software routine call.
__device__ __forceinline__ void divmod32(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  const uint32_t q32 = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  q = q32;
  r = a - static_cast<int64_t>(q32) * b;
}

// ---------------------------------------------------------------------------------------------
// Pixel normalisation and its backward.

struct NormArgs {
  int64_t B, C, W, N;      // input sizes (N = H * W)
  int64_t sB, sC, sH, sW;  // input element strides
  int64_t Cpad, Npad;      // output (B, Cpad, Npad), contiguous
};

// Block: 32 pixels (lane) x 8 channel slices (row). Grid: (ceil(Npad / 32), min(B, 65535)); the
// samples beyond gridDim.y are looped over (block-uniform trip count).
template <typename T, typename out_t>
__global__ void __launch_bounds__(kThreads)
    normalize_pixels(const T* __restrict__ x, NormArgs a, out_t* __restrict__ out, out_t* __restrict__ norms) {
  __shared__ out_t red[kRows][kLanes];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kLanes + lane;
  const bool valid = n < a.N;      // a real pixel
  const bool inside = n < a.Npad;  // a column of out (N <= n < Npad is padding)
  int64_t xo = 0;
  if (valid) {
    int64_t h, w;
    divmod32(n, a.W, h, w);  // n < N < 2^31
    xo = h * a.sH + w * a.sW;
  }
  const int64_t c_begin = row * a.C / kRows, c_end = (row + 1) * a.C / kRows;
  const int64_t p_begin = row * a.Cpad / kRows, p_end = (row + 1) * a.Cpad / kRows;
  const out_t eps = static_cast<out_t>(kEps);
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const T* xb = x + b * a.sB + xo;
    out_t sum = 0;
    if (valid) {
#pragma unroll 4
      for (int64_t c = c_begin; c < c_end; ++c) {
        const out_t v = load<out_t>(xb + c * a.sC);
        sum += v * v;
      }
    }
    red[row][lane] = sum;
    __syncthreads();
    out_t total = red[0][lane];
#pragma unroll
    for (int r = 1; r < kRows; ++r) total += red[r][lane];
    const out_t norm = m_sqrt(total);
    const out_t denom = norm < eps ? eps : norm;  // clamp_min(norm, eps); NaN propagates
    const out_t inv = out_t(1) / denom;  // one division per pixel (a multiply per element)
    if (valid && row == 0 && norms != nullptr) norms[b * a.N + n] = norm;
    if (inside) {
      out_t* ob = out + b * a.Cpad * a.Npad + n;
#pragma unroll 4
      for (int64_t c = p_begin; c < p_end; ++c)
        ob[c * a.Npad] = (valid && c < a.C) ? load<out_t>(xb + c * a.sC) * inv : out_t(0);
    }
    __syncthreads();  // red is rewritten by the next sample
  }
}

struct NormBwdArgs {
  int64_t B, C, W, N, Cpad, Npad;
  int64_t gB, gC, gH, gW;  // grad_fs element strides
};

// grad_fs = s * (n > eps ? (dA - A <A, dA>) / n : dA / eps) per pixel; same block shape as
// normalize_pixels, grid over the N real pixels.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    normalize_backward(const acc_t* __restrict__ dA, const acc_t* __restrict__ A, const acc_t* __restrict__ norms,
                       const acc_t* __restrict__ grad, acc_t mult, NormBwdArgs a, T* __restrict__ gx) {
  __shared__ acc_t red[kRows][kLanes];
  const int lane = threadIdx.x, row = threadIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kLanes + lane;
  const bool valid = n < a.N;
  int64_t go = 0;
  if (valid) {
    int64_t h, w;
    divmod32(n, a.W, h, w);  // n < N < 2^31
    go = h * a.gH + w * a.gW;
  }
  const int64_t c_begin = row * a.C / kRows, c_end = (row + 1) * a.C / kRows;
  const acc_t eps = static_cast<acc_t>(kEps);
  const acc_t s = *grad * mult;
  for (int64_t b = blockIdx.y; b < a.B; b += gridDim.y) {
    const int64_t base = b * a.Cpad * a.Npad + n;
    const acc_t* db = dA + base;
    const acc_t* ab = A + base;
    acc_t dot = 0;
    if (valid) {
      for (int64_t c = c_begin; c < c_end; ++c) dot += ab[c * a.Npad] * db[c * a.Npad];
    }
    red[row][lane] = dot;
    __syncthreads();
    if (valid) {
      acc_t total = red[0][lane];
#pragma unroll
      for (int r = 1; r < kRows; ++r) total += red[r][lane];
      const acc_t nv = norms[b * a.N + n];
      const bool live = nv > eps;
      const acc_t k = s / (live ? nv : eps);
      const acc_t d0 = live ? total : acc_t(0);
      T* gb = gx + b * a.gB + go;
      for (int64_t c = c_begin; c < c_end; ++c)
        store(gb + c * a.gC, (db[c * a.Npad] - ab[c * a.Npad] * d0) * k);
    }
    __syncthreads();  // red is rewritten by the next sample
  }
}

// ---------------------------------------------------------------------------------------------
// Tiled Gram products for the "kl" route.

struct KlArgs {
  int64_t Cs_pad, Ct_pad, N, Npad, row_blocks;
};

// acc[r][c] = sum_k X[k, i0 + 4 ty + r] * X[k, j0 + 4 tx + c] over the Cpad channels of one sample
// X (Cpad x Npad, contiguous; Cpad a multiple of kBK, i0 + 64 and j0 + 64 <= Npad). Starts with a
// barrier, so the caller may reuse As / Bs right before calling.
template <typename acc_t>
__device__ __forceinline__ void gram_tile(const acc_t* __restrict__ X, int64_t Cpad, int64_t Npad, int64_t i0,
                                          int64_t j0, acc_t (*As)[kLd], acc_t (*Bs)[kLd], acc_t (&acc)[kMicro][kMicro]) {
  constexpr int kBK = TileCfg<acc_t>::kBK;
  constexpr int kVec = 16 / static_cast<int>(sizeof(acc_t));
  constexpr int kPerRow = kTile / kVec;  // threads per chunk row: kBK * kPerRow == 256
  static_assert(kBK * kPerRow == kTileThreads, "one 16-byte vector per thread and operand");
  const int tid = threadIdx.x, ty = tid / kGrid, tx = tid % kGrid;
  const int lk = tid / kPerRow, lc = (tid % kPerRow) * kVec;
#pragma unroll
  for (int r = 0; r < kMicro; ++r)
#pragma unroll
    for (int c = 0; c < kMicro; ++c) acc[r][c] = 0;
  for (int64_t k0 = 0; k0 < Cpad; k0 += kBK) {
    const acc_t* src = X + (k0 + lk) * Npad;
    __syncthreads();  // the previous readers of As / Bs are done
    copy16(&As[lk][lc], src + i0 + lc);
    copy16(&Bs[lk][lc], src + j0 + lc);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kBK; ++k) {
      acc_t av[kMicro], bv[kMicro];
      ld4(&As[k][ty * kMicro], av);
      ld4(&Bs[k][tx * kMicro], bv);
#pragma unroll
      for (int r = 0; r < kMicro; ++r)
#pragma unroll
        for (int c = 0; c < kMicro; ++c) acc[r][c] += av[r] * bv[c];  // FP32/FP64 FMA
    }
  }
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

// One block per (sample, 64-row block): grid B * row_blocks, 256 threads.
template <typename acc_t>
__global__ void __launch_bounds__(kTileThreads, kKlMinBlocks<acc_t>)
    kl_forward(const acc_t* __restrict__ A, const acc_t* __restrict__ T, KlArgs a, acc_t inv_tau,
               acc_t* __restrict__ lse_s, acc_t* __restrict__ lse_t, acc_t* __restrict__ terms) {
  constexpr int kBK = TileCfg<acc_t>::kBK;
  __shared__ __align__(16) acc_t As[kBK][kLd];
  __shared__ __align__(16) acc_t Bs[kBK][kLd];
  const int tid = threadIdx.x, ty = tid / kGrid, tx = tid % kGrid;
  int64_t b, ib;
  divmod32(blockIdx.x, a.row_blocks, b, ib);  // at most INT32_MAX blocks
  const int64_t i0 = ib * kTile;
  const acc_t* Ab = A + b * a.Cs_pad * a.Npad;
  const acc_t* Tb = T + b * a.Ct_pad * a.Npad;
  const acc_t ninf = static_cast<acc_t>(-INFINITY);

  // One state per row of the thread, over the thread's own columns (see RowState).
  RowState<acc_t> row[kMicro];
#pragma unroll
  for (int r = 0; r < kMicro; ++r) row[r] = RowState<acc_t>{ninf, 0, ninf, 0, 0, 0, 0};

  for (int64_t j0 = 0; j0 < a.N; j0 += kTile) {
    acc_t ss[kMicro][kMicro], st[kMicro][kMicro];
    gram_tile(Ab, a.Cs_pad, a.Npad, i0, j0, As, Bs, ss);
    gram_tile(Tb, a.Ct_pad, a.Npad, i0, j0, As, Bs, st);
    const int64_t nv = a.N - (j0 + tx * kMicro);  // this thread's real columns: min(nv, 4)
    if (nv <= 0) continue;                         // (the barriers are all inside gram_tile)
#pragma unroll
    for (int r = 0; r < kMicro; ++r) {
      RowState<acc_t>& q = row[r];
      acc_t xs[kMicro], xt[kMicro], d[kMicro];
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const bool ok = c < nv;
        xs[c] = ok ? ss[r][c] * inv_tau : ninf;  // padded columns: exp(-inf - m) = 0
        xt[c] = ok ? st[r][c] * inv_tau : ninf;
        d[c] = ok ? (ss[r][c] - st[r][c]) * inv_tau : acc_t(0);
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
      if (i >= a.N) continue;
      const RowState<acc_t>& q = row[r];
      const acc_t lse_si = q.ms + m_log(q.ls);
      const acc_t lse_ti = q.mt + m_log(q.lt);
      const acc_t e = q.vt / q.lt;  // sum_j p_t expm1(u_j) = exp(lse_s - lse_t - ct) - 1
      // log1p where lse_s - lse_t - ct is small (there the plain difference would cancel); the
      // plain difference where it is large, or where vt overflowed (inf / NaN fail the test).
      const acc_t delta = (e > acc_t(-0.5) && e < acc_t(1)) ? m_log1p(e) : (lse_si - lse_ti) - q.ct;
      lse_s[b * a.N + i] = lse_si;
      lse_t[b * a.N + i] = lse_ti;
      terms[b * a.N + i] = delta - q.wt / q.lt;
    }
  }
}

// One block per (sample, 64-row block I), looping over the column blocks J:
//   H_IJ[i][j] = (p_s - p_t)[i][j] (with lse of row i) + (p_s - p_t)[j][i] (with lse of row j; S is
//   symmetric so S[j][i] = S[i][j] comes from the same tile),
//   dA[:, I] += A[:, J] H_IJ^T, in channel chunks of 64 (a 4 x 4 micro-tile of (channel, row) per
//   thread) read-modify-written in global memory by their single owner thread.
template <typename acc_t>
__global__ void __launch_bounds__(kTileThreads, kKlMinBlocks<acc_t>)
    kl_backward(const acc_t* __restrict__ A, const acc_t* __restrict__ T, KlArgs a, acc_t inv_tau,
                const acc_t* __restrict__ lse_s, const acc_t* __restrict__ lse_t, acc_t* __restrict__ dA) {
  constexpr int kBK = TileCfg<acc_t>::kBK;
  constexpr int kVec = 16 / static_cast<int>(sizeof(acc_t));
  constexpr int kPerChan = kBK / kVec;  // threads per channel when staging A[:, J] transposed: 4
  static_assert(kPerChan * kTile == kTileThreads, "one 16-byte vector per thread");
  __shared__ __align__(16) acc_t As[kBK][kLd];  // also the transposed A[c-chunk, j-chunk] stage
  __shared__ __align__(16) acc_t Bs[kBK][kLd];
  __shared__ __align__(16) acc_t Ht[kTile][kLd];  // Ht[j][i] = H_IJ[i][j]
  const int tid = threadIdx.x, ty = tid / kGrid, tx = tid % kGrid;
  int64_t b, ib;
  divmod32(blockIdx.x, a.row_blocks, b, ib);  // at most INT32_MAX blocks
  const int64_t i0 = ib * kTile;
  const acc_t* Ab = A + b * a.Cs_pad * a.Npad;
  const acc_t* Tb = T + b * a.Ct_pad * a.Npad;
  acc_t* dAb = dA + b * a.Cs_pad * a.Npad;

  acc_t lsi[kMicro], lti[kMicro];
  bool vi[kMicro];
#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
    const int64_t i = i0 + ty * kMicro + r;
    vi[r] = i < a.N;
    lsi[r] = vi[r] ? lse_s[b * a.N + i] : acc_t(0);
    lti[r] = vi[r] ? lse_t[b * a.N + i] : acc_t(0);
  }
  const int sc = tid / kPerChan, sj = (tid % kPerChan) * kVec;  // staging: channel, first column

  for (int64_t j0 = 0; j0 < a.N; j0 += kTile) {
    acc_t h[kMicro][kMicro];
    {
      acc_t ss[kMicro][kMicro], st[kMicro][kMicro];
      gram_tile(Ab, a.Cs_pad, a.Npad, i0, j0, As, Bs, ss);
      gram_tile(Tb, a.Ct_pad, a.Npad, i0, j0, As, Bs, st);
      acc_t lsj[kMicro], ltj[kMicro];
      bool vj[kMicro];
#pragma unroll
      for (int c = 0; c < kMicro; ++c) {
        const int64_t j = j0 + tx * kMicro + c;
        vj[c] = j < a.N;
        lsj[c] = vj[c] ? lse_s[b * a.N + j] : acc_t(0);
        ltj[c] = vj[c] ? lse_t[b * a.N + j] : acc_t(0);
      }
#pragma unroll
      for (int r = 0; r < kMicro; ++r)
#pragma unroll
        for (int c = 0; c < kMicro; ++c) {
          h[r][c] = 0;
          if (vi[r] && vj[c]) {
            const acc_t xs = ss[r][c] * inv_tau, xt = st[r][c] * inv_tau;
            h[r][c] = (m_exp(xs - lsi[r]) - m_exp(xt - lti[r])) + (m_exp(xs - lsj[c]) - m_exp(xt - ltj[c]));
          }
        }
    }
    __syncthreads();  // the previous tile's readers of Ht are done (also when there are no channels)
#pragma unroll
    for (int r = 0; r < kMicro; ++r)
#pragma unroll
      for (int c = 0; c < kMicro; ++c) Ht[tx * kMicro + c][ty * kMicro + r] = h[r][c];

    for (int64_t cc = 0; cc < a.Cs_pad; cc += kTile) {
      acc_t acc[kMicro][kMicro];  // (channel cc + 4 ty + r, row i0 + 4 tx + q)
#pragma unroll
      for (int r = 0; r < kMicro; ++r)
#pragma unroll
        for (int q = 0; q < kMicro; ++q) acc[r][q] = 0;
      for (int jk = 0; jk < kTile; jk += kBK) {
        __syncthreads();  // Ht is published (first pass); the previous readers of As are done
        {
          const int64_t cg = cc + sc;
          acc_t v[kVec];
          if (cg < a.Cs_pad) {
            vload(Ab + cg * a.Npad + j0 + jk + sj, v);
          } else {
#pragma unroll
            for (int q = 0; q < kVec; ++q) v[q] = 0;
          }
#pragma unroll
          for (int q = 0; q < kVec; ++q) As[sj + q][sc] = v[q];  // As[j][c] = A[cc + c, j0 + jk + j]
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kBK; ++k) {
          acc_t av[kMicro], hv[kMicro];
          ld4(&As[k][ty * kMicro], av);
          ld4(&Ht[jk + k][tx * kMicro], hv);
#pragma unroll
          for (int r = 0; r < kMicro; ++r)
#pragma unroll
            for (int q = 0; q < kMicro; ++q) acc[r][q] += av[r] * hv[q];
        }
      }
#pragma unroll
      for (int r = 0; r < kMicro; ++r) {
        const int64_t cg = cc + ty * kMicro + r;
        if (cg < a.Cs_pad) {
          acc_t* p = dAb + cg * a.Npad + i0 + tx * kMicro;
          acc_t cur[kMicro];
          ld4(p, cur);  // global, 16-byte aligned (Npad and i0 are multiples of 64)
#pragma unroll
          for (int q = 0; q < kMicro; ++q) cur[q] += acc[r][q];
          st4(p, cur);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, typename out_t>
cudaError_t launch_normalize(const Tensor4& x, const NormArgs& a, void* out, void* norms, cudaStream_t stream) {
  const int64_t tiles = ceil_div(a.Npad, kLanes);
  if (tiles > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(a.B < 65535 ? a.B : 65535));
  normalize_pixels<T, out_t><<<grid, dim3(kLanes, kRows), 0, stream>>>(
      static_cast<const T*>(x.data), a, static_cast<out_t*>(out), static_cast<out_t*>(norms));
  return cudaGetLastError();
}

template <typename T, typename acc_t>
cudaError_t launch_normalize_backward(const void* dA, const void* A, const void* norms, const void* grad,
                                      double mult, const NormBwdArgs& a, void* grad_fs, cudaStream_t stream) {
  const int64_t tiles = ceil_div(a.N, kLanes);
  if (tiles > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(a.B < 65535 ? a.B : 65535));
  normalize_backward<T, acc_t><<<grid, dim3(kLanes, kRows), 0, stream>>>(
      static_cast<const acc_t*>(dA), static_cast<const acc_t*>(A), static_cast<const acc_t*>(norms),
      static_cast<const acc_t*>(grad), static_cast<acc_t>(mult), a, static_cast<T*>(grad_fs));
  return cudaGetLastError();
}

bool kl_shape_ok(const RelKlShape& s, bool f64) {
  const int64_t bk = rel_channel_pad(f64);
  return s.B >= 0 && s.N >= 0 && s.Npad >= s.N && s.Npad % kTile == 0 && s.Cs_pad >= 0 && s.Ct_pad >= 0 &&
         s.Cs_pad % bk == 0 && s.Ct_pad % bk == 0 && s.B * (s.Npad / kTile) <= INT32_MAX;
}

KlArgs kl_args(const RelKlShape& s) {
  KlArgs a;
  a.Cs_pad = s.Cs_pad;
  a.Ct_pad = s.Ct_pad;
  a.N = s.N;
  a.Npad = s.Npad;
  a.row_blocks = s.Npad / kTile;
  return a;
}

}  // namespace

int64_t rel_channel_pad(bool f64) { return f64 ? TileCfg<double>::kBK : TileCfg<float>::kBK; }

cudaError_t rel_normalize_pixels(const Tensor4& x, int64_t Cpad, int64_t Npad, bool out_f64, void* out,
                                 void* norms, cudaStream_t stream) {
  NormArgs a;
  a.B = x.size[0];
  a.C = x.size[1];
  a.W = x.size[3];
  a.N = x.size[2] * x.size[3];
  a.sB = x.stride[0];
  a.sC = x.stride[1];
  a.sH = x.stride[2];
  a.sW = x.stride[3];
  a.Cpad = Cpad;
  a.Npad = Npad;
  if (Cpad < a.C || Npad < a.N || a.N > INT32_MAX) return cudaErrorInvalidValue;
  if (a.B == 0 || Npad == 0) return cudaSuccess;
  if (out_f64) {
    switch (x.dtype) {
      case DType::kFloat16: return launch_normalize<__half, double>(x, a, out, norms, stream);
      case DType::kBFloat16: return launch_normalize<__nv_bfloat16, double>(x, a, out, norms, stream);
      case DType::kFloat32: return launch_normalize<float, double>(x, a, out, norms, stream);
      case DType::kFloat64: return launch_normalize<double, double>(x, a, out, norms, stream);
    }
    return cudaErrorInvalidValue;
  }
  switch (x.dtype) {
    case DType::kFloat16: return launch_normalize<__half, float>(x, a, out, norms, stream);
    case DType::kBFloat16: return launch_normalize<__nv_bfloat16, float>(x, a, out, norms, stream);
    case DType::kFloat32: return launch_normalize<float, float>(x, a, out, norms, stream);
    default: return cudaErrorInvalidValue;  // float64 needs float64 accumulation
  }
}

cudaError_t rel_normalize_backward(const void* dA, const void* A, const void* norms, bool acc_f64, int64_t Cpad,
                                   int64_t Npad, const void* grad, double mult, const Tensor4& fs, void* grad_fs,
                                   const int64_t grad_fs_stride[4], cudaStream_t stream) {
  NormBwdArgs a;
  a.B = fs.size[0];
  a.C = fs.size[1];
  a.W = fs.size[3];
  a.N = fs.size[2] * fs.size[3];
  a.Cpad = Cpad;
  a.Npad = Npad;
  a.gB = grad_fs_stride[0];
  a.gC = grad_fs_stride[1];
  a.gH = grad_fs_stride[2];
  a.gW = grad_fs_stride[3];
  if (Cpad < a.C || Npad < a.N || a.N > INT32_MAX) return cudaErrorInvalidValue;
  if (a.B == 0 || a.C == 0 || a.N == 0) return cudaSuccess;
  if (acc_f64) {
    switch (fs.dtype) {
      case DType::kFloat16:
        return launch_normalize_backward<__half, double>(dA, A, norms, grad, mult, a, grad_fs, stream);
      case DType::kBFloat16:
        return launch_normalize_backward<__nv_bfloat16, double>(dA, A, norms, grad, mult, a, grad_fs, stream);
      case DType::kFloat32:
        return launch_normalize_backward<float, double>(dA, A, norms, grad, mult, a, grad_fs, stream);
      case DType::kFloat64:
        return launch_normalize_backward<double, double>(dA, A, norms, grad, mult, a, grad_fs, stream);
    }
    return cudaErrorInvalidValue;
  }
  switch (fs.dtype) {
    case DType::kFloat16:
      return launch_normalize_backward<__half, float>(dA, A, norms, grad, mult, a, grad_fs, stream);
    case DType::kBFloat16:
      return launch_normalize_backward<__nv_bfloat16, float>(dA, A, norms, grad, mult, a, grad_fs, stream);
    case DType::kFloat32:
      return launch_normalize_backward<float, float>(dA, A, norms, grad, mult, a, grad_fs, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t rel_kl_forward(const void* A, const void* T, const RelKlShape& shape, double tau, bool f64,
                           void* lse_s, void* lse_t, void* terms, cudaStream_t stream) {
  if (!kl_shape_ok(shape, f64)) return cudaErrorInvalidValue;
  if (shape.B == 0 || shape.N == 0) return cudaSuccess;
  const KlArgs a = kl_args(shape);
  const dim3 grid(static_cast<unsigned>(shape.B * a.row_blocks));
  if (f64) {
    kl_forward<double><<<grid, kTileThreads, 0, stream>>>(
        static_cast<const double*>(A), static_cast<const double*>(T), a, 1.0 / tau, static_cast<double*>(lse_s),
        static_cast<double*>(lse_t), static_cast<double*>(terms));
  } else {
    kl_forward<float><<<grid, kTileThreads, 0, stream>>>(
        static_cast<const float*>(A), static_cast<const float*>(T), a, static_cast<float>(1.0 / tau),
        static_cast<float*>(lse_s), static_cast<float*>(lse_t), static_cast<float*>(terms));
  }
  return cudaGetLastError();
}

cudaError_t rel_kl_backward(const void* A, const void* T, const RelKlShape& shape, double tau, bool f64,
                            const void* lse_s, const void* lse_t, void* dA, cudaStream_t stream) {
  if (!kl_shape_ok(shape, f64)) return cudaErrorInvalidValue;
  if (shape.B == 0 || shape.N == 0) return cudaSuccess;
  const KlArgs a = kl_args(shape);
  const dim3 grid(static_cast<unsigned>(shape.B * a.row_blocks));
  if (f64) {
    kl_backward<double><<<grid, kTileThreads, 0, stream>>>(
        static_cast<const double*>(A), static_cast<const double*>(T), a, 1.0 / tau,
        static_cast<const double*>(lse_s), static_cast<const double*>(lse_t), static_cast<double*>(dA));
  } else {
    kl_backward<float><<<grid, kTileThreads, 0, stream>>>(
        static_cast<const float*>(A), static_cast<const float*>(T), a, static_cast<float>(1.0 / tau),
        static_cast<const float*>(lse_s), static_cast<const float*>(lse_t), static_cast<float*>(dA));
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace kdk
