// KDAS Symmetrical Guiding Module on the CPU: one pass over ps and pt that forms the loss and,
// when asked, the unit gradient d loss / d ps.
//
// With D = ps - pt and M = D + D^T (symmetric), the loss is mean f(M) with f(m) = m^2 ("mse") or
// |m| ("l1"), and d loss / d D = 2 f'(M) / n. A task takes one tile pair (I, J), I <= J, of one
// (b, k) plane: it reads the tiles (I, J) and (J, I) of both inputs once (rows contiguous for
// NCHW), transposes the second in a small buffer, and writes the gradient of both tiles from one
// M tile. Off-diagonal pairs count twice in the loss. A tile sums its f(M) in kLanes partials of
// the accumulation type (at most 128 non-negative terms each, so float loses < 1e-5 relative),
// the tile sums are added in double in task order: the result does not depend on the thread
// count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace kdk {
namespace {

// Tile edge: the three tile buffers (12 KiB in float) stay in L1, and each tile row is a
// 128-byte (float) run of memory.
constexpr int64_t kTile = 32;
constexpr int kLanes = 8;  // partial sums per tile, folded in lane order (vectorisable, fixed)

// A 3-D (B, H, W) or 4-D (B, K, H, W) map through its strides, as (B, K, H, W).
struct Maps {
  int64_t B, K, H, sB, sK, sH, sW;
};

Maps maps_of(const at::Tensor& t) {
  if (t.dim() == 3) return {t.size(0), 1, t.size(1), t.stride(0), 0, t.stride(1), t.stride(2)};
  return {t.size(0), t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// buf[r][c] = s[r, c] - t[r, c] for the rows x cols block whose corner s and t point at; the
// rest of the kTile x kTile buffer is zero, so the tile loops run over whole rows and the
// padding adds f(0) = 0.
template <typename scalar_t, typename acc_t>
void load_diff(const scalar_t* s, const Maps& vs, const scalar_t* t, const Maps& vt, int64_t rows,
               int64_t cols, acc_t* buf) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* sr = s + r * vs.sH;
    const scalar_t* tr = t + r * vt.sH;
    acc_t* out = buf + r * kTile;
    if (vs.sW == 1 && vt.sW == 1) {
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<acc_t>(sr[c]) - static_cast<acc_t>(tr[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c)
        out[c] = static_cast<acc_t>(sr[c * vs.sW]) - static_cast<acc_t>(tr[c * vt.sW]);
    }
    std::fill(out + cols, out + kTile, acc_t(0));
  }
  std::fill(buf + rows * kTile, buf + kTile * kTile, acc_t(0));
}

template <typename acc_t>
void transpose(const acc_t* __restrict in, acc_t* __restrict out) {
  for (int64_t r = 0; r < kTile; ++r)
    for (int64_t c = 0; c < kTile; ++c) out[c * kTile + r] = in[r * kTile + c];
}

// The first `rows` rows of M = a + bt: returns sum f(M) and leaves k * f'(M) in a (f'(0) = 0
// and f'(NaN) = 0: torch's sign convention).
template <typename acc_t, bool L1>
double tile_loss_grad(acc_t* __restrict a, const acc_t* __restrict bt, int64_t rows, acc_t k) {
  acc_t part[kLanes] = {};
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* ar = a + r * kTile;
    const acc_t* br = bt + r * kTile;
    for (int64_t c0 = 0; c0 < kTile; c0 += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t m = ar[c0 + l] + br[c0 + l];
        if constexpr (L1) {
          part[l] += std::abs(m);
          ar[c0 + l] = k * (static_cast<acc_t>(m > 0) - static_cast<acc_t>(m < 0));
        } else {
          part[l] += m * m;
          ar[c0 + l] = k * m;
        }
      }
    }
  }
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* buf, int64_t rows, int64_t cols, scalar_t* g, const Maps& vg) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* in = buf + r * kTile;
    scalar_t* out = g + r * vg.sH;
    if (vg.sW == 1) {
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<scalar_t>(in[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c * vg.sW] = static_cast<scalar_t>(in[c]);
    }
  }
}

// The (I, J) tile pairs of one plane, I <= J, row band by row band.
std::vector<std::pair<int64_t, int64_t>> tile_pairs(int64_t H) {
  const int64_t tiles = (H + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  pairs.reserve(tiles * (tiles + 1) / 2);
  for (int64_t i = 0; i < tiles; ++i)
    for (int64_t j = i; j < tiles; ++j) pairs.emplace_back(i, j);
  return pairs;
}

// Returns sum f(M) over all planes; writes k * f'(M) into grad when it is defined.
template <typename scalar_t, typename acc_t, bool L1>
double sgm_pass(const at::Tensor& ps, const at::Tensor& pt, at::Tensor* grad, acc_t k) {
  const Maps vs = maps_of(ps), vt = maps_of(pt);
  const Maps vg = grad ? maps_of(*grad) : vs;
  const scalar_t* sd = ps.data_ptr<scalar_t>();
  const scalar_t* td = pt.data_ptr<scalar_t>();
  scalar_t* gd = grad ? grad->data_ptr<scalar_t>() : nullptr;
  const auto pairs = tile_pairs(vs.H);
  const int64_t npairs = static_cast<int64_t>(pairs.size()), tasks = vs.B * vs.K * npairs;
  std::vector<double> partial(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t a[kTile * kTile], b[kTile * kTile], bt[kTile * kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / npairs, bi = plane / vs.K, ki = plane % vs.K;
      const int64_t i0 = pairs[task % npairs].first * kTile, j0 = pairs[task % npairs].second * kTile;
      const int64_t ni = std::min(kTile, vs.H - i0), nj = std::min(kTile, vs.H - j0);
      const scalar_t* s = sd + bi * vs.sB + ki * vs.sK;
      const scalar_t* t = td + bi * vt.sB + ki * vt.sK;
      load_diff(s + i0 * vs.sH + j0 * vs.sW, vs, t + i0 * vt.sH + j0 * vt.sW, vt, ni, nj, a);
      load_diff(s + j0 * vs.sH + i0 * vs.sW, vs, t + j0 * vt.sH + i0 * vt.sW, vt, nj, ni, b);
      transpose(b, bt);
      const double sum = tile_loss_grad<acc_t, L1>(a, bt, ni, k);
      partial[task] = i0 == j0 ? sum : 2.0 * sum;
      if (!gd) continue;
      scalar_t* g = gd + bi * vg.sB + ki * vg.sK;
      store_tile(a, ni, nj, g + i0 * vg.sH + j0 * vg.sW, vg);
      if (i0 == j0) continue;
      transpose(a, bt);  // the (J, I) gradient tile is the transpose of the (I, J) one
      store_tile(bt, nj, ni, g + j0 * vg.sH + i0 * vg.sW, vg);
    }
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

std::tuple<at::Tensor, at::Tensor> sgm_cpu(const at::Tensor& ps, const at::Tensor& pt,
                                           c10::string_view distance, bool need_grad) {
  TORCH_CHECK(ps.dim() == 3 || ps.dim() == 4, "sgm: ps must be 3-D or 4-D");
  TORCH_CHECK(ps.sizes() == pt.sizes(), "sgm: ps and pt must have the same shape");
  TORCH_CHECK(ps.size(-1) == ps.size(-2), "sgm: the maps must be square");
  TORCH_CHECK(ps.scalar_type() == pt.scalar_type(), "sgm: ps and pt must have the same dtype");
  TORCH_CHECK(distance == "mse" || distance == "l1", "sgm: unknown distance ", distance);
  const bool l1 = distance == "l1";
  const auto acc = ps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = need_grad ? at::empty_like(ps) : at::empty({0}, ps.options());
  const double n = static_cast<double>(ps.numel());
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ps.scalar_type(), "kdk_sgm", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    at::Tensor* g = need_grad ? &grad : nullptr;
    const acc_t k = static_cast<acc_t>((l1 ? 2.0 : 4.0) / n);
    total = l1 ? sgm_pass<scalar_t, acc_t, true>(ps, pt, g, k) : sgm_pass<scalar_t, acc_t, false>(ps, pt, g, k);
  });
  return {at::scalar_tensor(total / n, ps.options().dtype(acc)), grad};
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("sgm", &kdk::sgm_cpu);
}
