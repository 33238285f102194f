// Structure loss (PraNet / Polyp-PVT) on the CPU. Every (b, k) map is one image; it is cut into
// strips of kStrip rows, and the four per-image sums (sum w, sum w bce, I = sum w p m and
// E = sum w (p (1 - m) + (1 - p) m) = U - 2I) are kept per strip in double and added in strip
// order, so the result does not depend on how strips are spread over threads.
//
// A strip in one pass: its mask rows plus the 15-row halo are converted into a local buffer;
// a running column sum in double gives each row's vertical 31-sums (exact for 0/1 masks, and
// its error for general masks is far below float32's); the horizontal 31-sum is a doubling tree
// of shifted adds (sums of 2, 4, 8, 16 neighbours, then 16 + 8 + 4 + 2 + 1), vectorised and with
// an error bounded by its depth rather than growing along the row. Then the pixel terms.
//
// The gradient needs the image's sums, so when the student needs one the first pass also stores
// two per-pixel factors, a = w (p (1 - m) - (1 - p) m) and c = w p (1 - p), and a second pass
// over the image (still in cache) turns them into the unit gradient
//   d loss / dz = (a / sum w + c ((I + 1) - (U + 2) m) / D^2) / images,   D = U - I + 1,
// saved for the backward, which is one scale by the upstream gradient. Recomputing instead
// would pay the exp, the divisions and the box filter again; this costs two cached streams.
// p (1 - m) - (1 - p) m is p - m and E is U - 2I, written so that neither cancels when the
// prediction is close to the mask (1 - p is computed as sigmoid(-z), never as 1 - p).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/relation_common.h"

namespace kdk {
namespace {

using rel::ceil_div;
using rel::select;

constexpr int64_t kRadius = 15;  // the 31 x 31 window
constexpr double kInvArea = 1.0 / 961.0;
// Rows per strip: the unit of parallel work and of the fixed-order partial sums. Each strip
// starts its running column sums afresh (30 extra rows of adds), so not much shorter.
constexpr int64_t kStrip = 64;
// Pixels per float32 lane partial before it is folded into double.
constexpr int64_t kFoldChunk = 256;

struct Plane {
  const char* data;
  int64_t elem, K, sB, sK, sH, sW;
};

Plane plane_of(const at::Tensor& t) {
  return {static_cast<const char*>(t.data_ptr()), t.element_size(), t.size(1),
          t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// out[j] = row element j of image img, converted to T; one instantiation per input dtype.
template <typename T>
using RowLoader = void (*)(const Plane&, int64_t img, int64_t row, int64_t W, T* out);

template <typename src_t, typename T>
void load_row(const Plane& p, int64_t img, int64_t row, int64_t W, T* out) {
  const src_t* src = reinterpret_cast<const src_t*>(p.data) + (img / p.K) * p.sB +
                     (img % p.K) * p.sK + row * p.sH;
  if (p.sW == 1) {
    for (int64_t j = 0; j < W; ++j) out[j] = static_cast<T>(src[j]);
  } else {
    for (int64_t j = 0; j < W; ++j) out[j] = static_cast<T>(src[j * p.sW]);
  }
}

template <typename T>
RowLoader<T> loader_for(at::ScalarType type) {
  RowLoader<T> f = nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, type, "kdk_structure_row",
                                  [&] { f = &load_row<scalar_t, T>; });
  return f;
}

// log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) <= 1/3, by its odd series; the first
// term left out (s^15 / 15) is below 2e-8 of the sum. libm's log1pf does not vectorise.
KDK_ALWAYS_INLINE float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}
KDK_ALWAYS_INLINE double log1p_unit(double e) { return std::log1p(e); }

// The horizontal 31-sums of one row: v holds the row's vertical sums at v[kRadius .. kRadius + W)
// with kRadius zeros on either side (the zero padding); tmp has room for 4 (W + 28) values.
template <typename T>
KDK_ALWAYS_INLINE void box_row(const T* v, int64_t W, T* tmp, T* box) {
  T* s2 = tmp;
  T* s4 = s2 + W + 28;
  T* s8 = s4 + W + 28;
  T* s16 = s8 + W + 28;
  for (int64_t t = 0; t < W + 28; ++t) s2[t] = v[t] + v[t + 1];
  for (int64_t t = 0; t < W + 24; ++t) s4[t] = s2[t] + s2[t + 2];
  for (int64_t t = 0; t < W + 16; ++t) s8[t] = s4[t] + s4[t + 4];
  for (int64_t t = 0; t < W; ++t) s16[t] = s8[t] + s8[t + 8];
  for (int64_t j = 0; j < W; ++j) box[j] = s16[j] + s8[j + 16] + s4[j + 24] + s2[j + 28] + v[j + 30];
}

// The sums of one row (added to sums[0..3] in double) and, if GRAD, its gradient factors.
template <typename T, bool GRAD>
KDK_ALWAYS_INLINE void row_terms(const T* z, const T* m, const T* box, int64_t W, T* a, T* c,
                                 double* sums) {
  constexpr int L = rel::kLanes;
  for (int64_t j0 = 0; j0 < W; j0 += kFoldChunk) {
    const int64_t j1 = std::min(W, j0 + kFoldChunk);
    T part[4][L] = {};
    auto pixel = [&](int64_t j, int l) {
      const T mj = m[j], zj = z[j];
      const T w = T(1) + T(5) * std::abs(box[j] * T(kInvArea) - mj);
      const T e = rel::exp_acc(-std::abs(zj));
      const T r = T(1) / (T(1) + e), er = e * r;
      const bool pos = zj >= T(0);
      const T p = select(pos, r, er), q = select(pos, er, r);  // q = 1 - p = sigmoid(-z)
      const T bce = select(zj > T(0), zj, T(0)) - zj * mj + log1p_unit(e);
      const T pm = p * (T(1) - mj), qm = q * mj;
      part[0][l] += w;
      part[1][l] += w * bce;
      part[2][l] += w * p * mj;
      part[3][l] += w * (pm + qm);
      if (GRAD) {
        a[j] = w * (pm - qm);
        c[j] = w * p * q;
      }
    };
    int64_t j = j0;
    for (; j + L <= j1; j += L)
      for (int l = 0; l < L; ++l) pixel(j + l, l);
    for (int l = 0; j < j1; ++j, ++l) pixel(j, l);
    for (int s = 0; s < 4; ++s)
      for (int l = 0; l < L; ++l) sums[s] += static_cast<double>(part[s][l]);
  }
}

template <typename T>
KDK_ALWAYS_INLINE void row(const T* v, const T* z, const T* m, int64_t W, T* tmp, T* a, T* c,
                           double* sums, bool grad) {
  T* box = tmp + 4 * (W + 28);
  box_row(v, W, tmp, box);
  if (grad) row_terms<T, true>(z, m, box, W, a, c, sums);
  else row_terms<T, false>(z, m, box, W, a, c, sums);
}

// The float rows are also compiled for AVX2 / AVX-512 (see KDK_ROW_CLONES).
KDK_ROW_CLONES void row_f32(const float* v, const float* z, const float* m, int64_t W, float* tmp,
                            float* a, float* c, double* sums, bool grad) {
  row(v, z, m, W, tmp, a, c, sums, grad);
}
void row_dispatch(const float* v, const float* z, const float* m, int64_t W, float* tmp, float* a,
                  float* c, double* sums, bool grad) {
  row_f32(v, z, m, W, tmp, a, c, sums, grad);
}
void row_dispatch(const double* v, const double* z, const double* m, int64_t W, double* tmp,
                  double* a, double* c, double* sums, bool grad) {
  row(v, z, m, W, tmp, a, c, sums, grad);
}

// unit = a * ka + c * (c1 - c2 m), in place over a.
template <typename T>
KDK_ALWAYS_INLINE void grad_row(T* a, const T* c, const T* m, int64_t W, T ka, T c1, T c2) {
  for (int64_t j = 0; j < W; ++j) a[j] = a[j] * ka + c[j] * (c1 - c2 * m[j]);
}
KDK_ROW_CLONES void grad_row_f32(float* a, const float* c, const float* m, int64_t W, float ka,
                                 float c1, float c2) {
  grad_row(a, c, m, W, ka, c1, c2);
}
void grad_row_dispatch(float* a, const float* c, const float* m, int64_t W, float ka, float c1, float c2) {
  grad_row_f32(a, c, m, W, ka, c1, c2);
}
void grad_row_dispatch(double* a, const double* c, const double* m, int64_t W, double ka, double c1,
                       double c2) {
  grad_row(a, c, m, W, ka, c1, c2);
}

struct Sums {
  double w, wbce, inter, err;  // sum w, sum w bce, I, E = U - 2I
};

template <typename T>
class Structure {
 public:
  Structure(const at::Tensor& logits, const at::Tensor& mask, bool grad, T* unit)
      : z_(plane_of(logits)), m_(plane_of(mask)),
        load_z_(loader_for<T>(logits.scalar_type())), load_m_(loader_for<T>(mask.scalar_type())),
        images_(logits.size(0) * logits.size(1)), H_(logits.size(2)), W_(logits.size(3)),
        strips_(ceil_div(H_, kStrip)), grad_(grad), unit_(unit),
        partial_(images_ * strips_ * 4) {}

  // The loss; fills unit (images x H x W) with the unit gradient when grad.
  double run() {
    const int64_t plane = H_ * W_;
    if (images_ >= at::get_num_threads()) {
      // An image per task: its second pass finds the first pass's data in cache.
      at::parallel_for(0, images_, 1, [&](int64_t begin, int64_t end) {
        Scratch s(*this);
        std::vector<T> c(grad_ ? plane : 0);
        for (int64_t img = begin; img < end; ++img) {
          for (int64_t st = 0; st < strips_; ++st) forward_strip(s, img, st, c.data());
          if (grad_)
            for (int64_t st = 0; st < strips_; ++st) grad_strip(s, img, st, c.data());
        }
      });
    } else {
      // Fewer images than threads: strips in parallel, then the gradient pass.
      std::vector<T> c(grad_ ? images_ * plane : 0);
      const int64_t tasks = images_ * strips_;
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        Scratch s(*this);
        for (int64_t t = begin; t < end; ++t)
          forward_strip(s, t / strips_, t % strips_, c.data() + (t / strips_) * plane);
      });
      if (grad_)
        at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
          Scratch s(*this);
          for (int64_t t = begin; t < end; ++t)
            grad_strip(s, t / strips_, t % strips_, c.data() + (t / strips_) * plane);
        });
    }
    double loss = 0;
    for (int64_t img = 0; img < images_; ++img) {
      const Sums s = sums(img);
      loss += s.wbce / s.w + s.err / (s.err + s.inter + 1);
    }
    return loss / static_cast<double>(images_);
  }

 private:
  struct Scratch {
    explicit Scratch(const Structure& op)
        : mask((kStrip + 2 * kRadius) * op.W_), v(op.W_ + 2 * kRadius, T(0)), z(op.W_),
          tmp(5 * (op.W_ + 28)), col(op.W_) {}
    std::vector<T> mask, v, z, tmp;
    std::vector<double> col;
  };

  void forward_strip(Scratch& s, int64_t img, int64_t st, T* c_img) {
    const int64_t r0 = st * kStrip, r1 = std::min(H_, r0 + kStrip), W = W_;
    const int64_t h0 = std::max<int64_t>(0, r0 - kRadius), h1 = std::min(H_, r1 + kRadius);
    for (int64_t h = h0; h < h1; ++h) load_m_(m_, img, h, W, s.mask.data() + (h - h0) * W);
    auto mrow = [&](int64_t h) { return s.mask.data() + (h - h0) * W; };
    // Column sums of rows r0 - 15 .. r0 + 14: the window of row r0 but for its last row.
    std::fill(s.col.begin(), s.col.end(), 0.0);
    for (int64_t h = h0; h < std::min(H_, r0 + kRadius); ++h) add_row(s.col.data(), mrow(h), W, 1.0);
    double* sums = partial_.data() + (img * strips_ + st) * 4;
    std::fill(sums, sums + 4, 0.0);
    for (int64_t h = r0; h < r1; ++h) {
      if (h + kRadius < H_) add_row(s.col.data(), mrow(h + kRadius), W, 1.0);
      for (int64_t j = 0; j < W; ++j) s.v[kRadius + j] = static_cast<T>(s.col[j]);
      if (h - kRadius >= 0) add_row(s.col.data(), mrow(h - kRadius), W, -1.0);
      load_z_(z_, img, h, W, s.z.data());
      // The gradient's factors; a goes where the unit gradient will be (see grad_strip).
      T* a = grad_ ? unit_ + (img * H_ + h) * W : nullptr;
      T* c = grad_ ? c_img + h * W : nullptr;
      row_dispatch(s.v.data(), s.z.data(), mrow(h), W, s.tmp.data(), a, c, sums, grad_);
    }
  }

  void grad_strip(Scratch& s, int64_t img, int64_t st, const T* c_img) {
    const Sums q = sums(img);
    const double n = static_cast<double>(images_), d = q.err + q.inter + 1;
    const T ka = static_cast<T>(1 / (n * q.w));
    const T c1 = static_cast<T>((q.inter + 1) / (n * d * d));
    const T c2 = static_cast<T>((q.err + 2 * q.inter + 2) / (n * d * d));  // (U + 2) / (n D^2)
    const int64_t r0 = st * kStrip, r1 = std::min(H_, r0 + kStrip);
    for (int64_t h = r0; h < r1; ++h) {
      load_m_(m_, img, h, W_, s.z.data());
      grad_row_dispatch(unit_ + (img * H_ + h) * W_, c_img + h * W_, s.z.data(), W_, ka, c1, c2);
    }
  }

  Sums sums(int64_t img) const {
    Sums s{0, 0, 0, 0};
    for (int64_t st = 0; st < strips_; ++st) {
      const double* p = partial_.data() + (img * strips_ + st) * 4;
      s.w += p[0];
      s.wbce += p[1];
      s.inter += p[2];
      s.err += p[3];
    }
    return s;
  }

  static void add_row(double* col, const T* row, int64_t W, double sign) {
    for (int64_t j = 0; j < W; ++j) col[j] += sign * static_cast<double>(row[j]);
  }

  Plane z_, m_;
  RowLoader<T> load_z_, load_m_;
  int64_t images_, H_, W_, strips_;
  bool grad_;
  T* unit_;
  std::vector<double> partial_;
};

std::tuple<at::Tensor, at::Tensor> structure_cpu(const at::Tensor& logits, const at::Tensor& mask,
                                                 bool need_grad) {
  TORCH_CHECK(logits.dim() == 4 && mask.sizes() == logits.sizes(),
              "structure: logits and mask must be 4-D of one shape");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "structure: logits must be floating");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(acc);
  at::Tensor unit = need_grad ? at::empty(logits.sizes(), opts) : at::empty({0}, opts);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(acc, "kdk_structure", [&] {
    loss = Structure<scalar_t>(logits, mask, need_grad, unit.data_ptr<scalar_t>()).run();
  });
  return {at::scalar_tensor(loss, opts), unit};
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) {
  m.impl("structure", &kdk::structure_cpu);
}
