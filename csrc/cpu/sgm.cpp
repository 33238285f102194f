// KDAS Symmetrical Guiding Module on the CPU: the loss and, when asked, the unit gradient
// d loss / d ps, both in the forward call.
//
// With D = ps - pt and M = D + D^T (symmetric), the loss is mean f(M) with f(m) = m^2 ("mse") or
// |m| ("l1"), and d loss / d ps = 2 f'(M) / n. The transpose is what makes this op slow on a
// CPU: a tile-pair kernel that reads the mirrored tiles of ps and pt straight from memory walks
// down columns in 128-byte runs, which measured about twice as slow as streaming when the maps
// are not in cache. So:
//  - pass 1 streams ps and pt once, row by row, into D (accumulation type, tile-padded scratch);
//  - pass 2 takes a band of kTile rows of one plane: M[band, :] = D[band, :] + D[:, band]^T,
//    the second term read from D (just written, in cache) in kTile x kTile blocks transposed in
//    L1; the band's loss and gradient rows follow, and the gradient is written row by row.
// Every access to ps, pt and the gradient is a sequential run. Sums: kLanes partials per tile in
// the accumulation type (at most 128 non-negative terms each: float loses < 1e-5 relative), the
// tiles of a band in double, the bands in task order: the result does not depend on the thread
// count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

namespace kdk {
namespace {

// Tile edge: 128-byte (float) runs of D per transposed block row.
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

// out[c] = s[c] - t[c] for one row of H elements, zero up to the tile-padded width ldd.
template <typename scalar_t, typename acc_t>
void diff_row(const scalar_t* s, int64_t ss, const scalar_t* t, int64_t ts, int64_t H, int64_t ldd,
              acc_t* out) {
  if (ss == 1 && ts == 1) {
    for (int64_t c = 0; c < H; ++c) out[c] = static_cast<acc_t>(s[c]) - static_cast<acc_t>(t[c]);
  } else {
    for (int64_t c = 0; c < H; ++c) out[c] = static_cast<acc_t>(s[c * ss]) - static_cast<acc_t>(t[c * ts]);
  }
  std::fill(out + H, out + ldd, acc_t(0));
}

// out (row stride ld_out) = the transpose of the kTile x kTile block in (row stride ld_in).
template <typename acc_t>
void transpose(const acc_t* __restrict in, int64_t ld_in, acc_t* __restrict out, int64_t ld_out) {
  for (int64_t r = 0; r < kTile; ++r)
    for (int64_t c = 0; c < kTile; ++c) out[c * ld_out + r] = in[r * ld_in + c];
}

// For the first `rows` rows of the tile M = a + bt (a and g with row stride ld): returns sum f(M)
// and writes g = k * f'(M) (f'(0) = 0 and f'(NaN) = 0: torch's sign convention).
template <typename acc_t, bool L1>
double tile_loss_grad(const acc_t* __restrict a, const acc_t* __restrict bt, acc_t* __restrict g,
                      int64_t ld, int64_t rows, acc_t k) {
  acc_t part[kLanes] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* ar = a + r * ld;
    const acc_t* br = bt + r * kTile;
    acc_t* gr = g + r * ld;
    for (int64_t c0 = 0; c0 < kTile; c0 += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t m = ar[c0 + l] + br[c0 + l];
        if constexpr (L1) {
          part[l] += std::abs(m);
          gr[c0 + l] = k * (static_cast<acc_t>(m > 0) - static_cast<acc_t>(m < 0));
        } else {
          part[l] += m * m;
          gr[c0 + l] = k * m;
        }
      }
    }
  }
  double sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

template <typename scalar_t, typename acc_t>
void store(const acc_t* buf, int64_t ld, int64_t rows, int64_t cols, scalar_t* g, const Maps& vg) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* in = buf + r * ld;
    scalar_t* out = g + r * vg.sH;
    if (vg.sW == 1) {
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<scalar_t>(in[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c * vg.sW] = static_cast<scalar_t>(in[c]);
    }
  }
}

// Returns sum f(M) over all planes; writes k * f'(M) into grad when it is defined (the two
// passes of the header comment).
template <typename scalar_t, typename acc_t, bool L1>
double sgm_pass(const at::Tensor& ps, const at::Tensor& pt, at::Tensor* grad, acc_t k) {
  const Maps vs = maps_of(ps), vt = maps_of(pt);
  const Maps vg = grad ? maps_of(*grad) : vs;
  const scalar_t* sd = ps.data_ptr<scalar_t>();
  const scalar_t* td = pt.data_ptr<scalar_t>();
  scalar_t* gd = grad ? grad->data_ptr<scalar_t>() : nullptr;
  const int64_t H = vs.H, planes = vs.B * vs.K, tiles = (H + kTile - 1) / kTile, ldd = tiles * kTile;
  // D, zero-padded to whole tiles; left uninitialised here since pass 1 writes all of it.
  std::unique_ptr<acc_t[]> diff(new acc_t[planes * ldd * ldd]);
  at::parallel_for(0, planes * ldd, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t plane = row / ldd, h = row % ldd, bi = plane / vs.K, ki = plane % vs.K;
      acc_t* out = diff.get() + row * ldd;
      if (h < H) {
        diff_row(sd + bi * vs.sB + ki * vs.sK + h * vs.sH, vs.sW, td + bi * vt.sB + ki * vt.sK + h * vt.sH,
                 vt.sW, H, ldd, out);
      } else {
        std::fill(out, out + ldd, acc_t(0));  // the padding rows of the last tile band
      }
    }
  });
  const int64_t tasks = planes * tiles;
  std::vector<double> partial(tasks);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffers(kTile * ldd + kTile * kTile);
    acc_t* band = buffers.data();  // the band's gradient rows
    acc_t* bt = band + kTile * ldd;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / tiles, i0 = (task % tiles) * kTile, bi = plane / vs.K, ki = plane % vs.K;
      const acc_t* d = diff.get() + plane * ldd * ldd;
      const int64_t ni = std::min(kTile, H - i0);
      double sum = 0;
      for (int64_t j0 = 0; j0 < ldd; j0 += kTile) {
        transpose(d + j0 * ldd + i0, ldd, bt, kTile);
        sum += tile_loss_grad<acc_t, L1>(d + i0 * ldd + j0, bt, band + j0, ldd, ni, k);
      }
      partial[task] = sum;
      if (gd) store(band, ldd, ni, H, gd + bi * vg.sB + ki * vg.sK + i0 * vg.sH, vg);
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
