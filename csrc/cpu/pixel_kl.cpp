// Pixel KL (response KD) on the CPU: loss = T^2 * sum over counted pixels of KL(p_t || p_s) /
// count, p = softmax(z / T) over the K channels of a pixel (K == 1: sigmoid, handled as the two
// logits (z, 0), which is the same Bernoulli distribution). One pass over zs and zt; when the
// student needs a gradient the same pass writes d loss / d zs for a unit upstream gradient.
//
// A task owns a block of P pixels (P * max(K, 2) about kBlockElems) of the flattened (b, h, w) pixel
// index, so blocks may straddle samples (that keeps B x K classification logits vectorised).
// NCHW float logits are read where they are (each channel row of a block is one run) and the
// gradient written in place; other layouts and dtypes are gathered once into K x P float buffers
// (channels_last and (B, K) logits read each pixel's contiguous K values). Every loop runs along
// the P pixels, so the compiler vectorises them.
//
// Precision near the teacher. With d = (zs - zt) / T (an exact difference, then one rounding)
//   KL = log E_pt[e^d] - E_pt[d] = log1p(E_pt[d] + E_pt[phi(d)]) - E_pt[d],  phi(d) = e^d - 1 - d,
// and every term is small and accurate when all |d| <= 1 (phi from its Taylor series); the
// pixel's two sums are finished in double, where the final difference does not cancel.
// Separately computed log-sum-exps would leave ~1e-7 absolute error per pixel, the whole KL at
// noise 1e-3. Pixels with a larger |d| are far from the teacher and use the direct form
// lse_s - lse_t - E_pt[d]. The gradient uses the same idea per element:
//   p_s - p_t = p_t expm1(d - (lse_s - lse_t))   when |d - (lse_s - lse_t)| <= 1.
//
// Determinism: the blocks depend only on the sizes; each block's KL sum is a double and the
// block sums are added in block order. No atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/relation_common.h"

namespace kdk {
namespace {

using rel::ceil_div;

// Logits per block and tensor: the four K x P float buffers take 512 KiB, within L2. Long
// blocks matter for NCHW with many channels, where each channel row is one contiguous read:
// at K = 256, 128-pixel rows run 1.4x faster than 32-pixel ones (measured on a 2-core EPYC).
constexpr int64_t kBlockElems = 32768;
constexpr int64_t kMaxBlockPixels = 1024;

// Where pixel (b, h, w) of a (B, K, H, W) tensor (or of a (B, H, W) mask) starts.
struct Pixels {
  int64_t sB, sC, sH, sW;
  int64_t plane_step;  // between consecutive pixels of a sample if its plane is one run, else 0
  bool all_run;        // and the run goes on across samples
};

Pixels pixels(const at::Tensor& t, bool has_channels) {
  const int64_t B = t.size(0), H = t.size(-2), W = t.size(-1);
  Pixels p{t.stride(0), has_channels ? t.stride(1) : 0, t.stride(-2), t.stride(-1), 0, false};
  if (H == 1) p.plane_step = p.sW;
  else if (W == 1 || p.sH == W * p.sW) p.plane_step = W == 1 ? p.sH : p.sW;
  p.all_run = p.plane_step != 0 && (B == 1 || p.sB == H * W * p.plane_step);
  return p;
}

// The flattened pixels p0 .. p0 + len of a B x H x W grid.
struct Block {
  int64_t p0, len, N, W;
  bool one_sample;
};

void offsets(const Pixels& s, const Block& blk, int64_t* off) {
  int64_t b = blk.p0 / blk.N, n = blk.p0 % blk.N, h = n / blk.W, w = n % blk.W;
  for (int64_t i = 0; i < blk.len; ++i) {
    off[i] = b * s.sB + h * s.sH + w * s.sW;
    if (++w == blk.W) {
      w = 0;
      if (++h * blk.W == blk.N) { h = 0; ++b; }
    }
  }
}

// The block's pixels are consecutive elements (then rows are copied, not gathered).
bool unit_run(const Pixels& s, const Block& blk) {
  return s.plane_step == 1 && (s.all_run || blk.one_sample);
}

// dst[c * ld + i] = z[pixel i, channel c] for c < K; rows K .. Kv - 1 (the binary case's second
// logit) are zero.
template <typename scalar_t, typename T>
void gather(const scalar_t* z, const Pixels& s, const Block& blk, const int64_t* off, int64_t K,
            int64_t Kv, int64_t ld, T* dst) {
  const int64_t len = blk.len;
  if (unit_run(s, blk)) {
    for (int64_t c = 0; c < K; ++c) {
      const scalar_t* src = z + off[0] + c * s.sC;
      T* row = dst + c * ld;
      for (int64_t i = 0; i < len; ++i) row[i] = static_cast<T>(src[i]);
    }
  } else if (s.sC == 1) {  // channels_last, (B, K) logits: each pixel's K values are contiguous
    for (int64_t i = 0; i < len; ++i) {
      const scalar_t* src = z + off[i];
      for (int64_t c = 0; c < K; ++c) dst[c * ld + i] = static_cast<T>(src[c]);
    }
  } else {
    for (int64_t c = 0; c < K; ++c)
      for (int64_t i = 0; i < len; ++i) dst[c * ld + i] = static_cast<T>(z[off[i] + c * s.sC]);
  }
  for (int64_t c = K; c < Kv; ++c) std::fill(dst + c * ld, dst + c * ld + len, T(0));
}

template <typename scalar_t, typename T>
void scatter(const T* src, const Pixels& s, const Block& blk, const int64_t* off, int64_t K,
             int64_t ld, scalar_t* g) {
  const int64_t len = blk.len;
  if (unit_run(s, blk)) {
    for (int64_t c = 0; c < K; ++c) {
      scalar_t* dst = g + off[0] + c * s.sC;
      const T* row = src + c * ld;
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<scalar_t>(row[i]);
    }
  } else if (s.sC == 1) {
    for (int64_t i = 0; i < len; ++i) {
      scalar_t* dst = g + off[i];
      for (int64_t c = 0; c < K; ++c) dst[c] = static_cast<scalar_t>(src[c * ld + i]);
    }
  } else {
    for (int64_t c = 0; c < K; ++c)
      for (int64_t i = 0; i < len; ++i) g[off[i] + c * s.sC] = static_cast<scalar_t>(src[c * ld + i]);
  }
}

// Per-thread buffers of one block: logits and exps K x P, per-pixel statistics P.
template <typename T>
struct Scratch {
  int64_t ld;
  std::vector<T> zs, zt, es, et;
  std::vector<T> ms, mt, ss, st, sd, sphi, dmax, delta, inv_ss, inv_st;
  std::vector<unsigned char> counted;
  std::vector<int64_t> off_s, off_t, off_g, off_m;
  Scratch(int64_t Kv, int64_t P, int64_t ld_)
      : ld(ld_), zs(Kv * ld), zt(Kv * ld), es(Kv * ld), et(Kv * ld), ms(P), mt(P), ss(P), st(P),
        sd(P), sphi(P), dmax(P), delta(P), inv_ss(P), inv_st(P), counted(P), off_s(P),
        off_t(P), off_g(P), off_m(P) {}
};

// The per-pixel sums over the Kv channels: maxima ms, mt of the raw logits; ss, st = sum of
// es, et = exp((z - m) / T) (kept for the gradient); sd = sum et d, sphi = sum et phi(d),
// dmax = max |d|. Logit c of pixel i is zs[c * lds + i] (zt likewise, ldt): the block's buffers
// or, for NCHW float inputs, the input itself; es, et are buffers with row stride ld.
template <typename T>
KDK_ALWAYS_INLINE void block_sums(const T* __restrict__ zs, int64_t lds, const T* __restrict__ zt, int64_t ldt,
                                  T* __restrict__ es, T* __restrict__ et, int64_t Kv, int64_t ld,
                                  int64_t len, T inv_t, T* __restrict__ ms, T* __restrict__ mt,
                                  T* __restrict__ ss, T* __restrict__ st, T* __restrict__ sd,
                                  T* __restrict__ sphi, T* __restrict__ dmax) {
  for (int64_t i = 0; i < len; ++i) {
    ms[i] = zs[i];
    mt[i] = zt[i];
    ss[i] = st[i] = sd[i] = sphi[i] = dmax[i] = T(0);
  }
  for (int64_t c = 1; c < Kv; ++c)
    for (int64_t i = 0; i < len; ++i) {
      ms[i] = rel::max_nan_last(zs[c * lds + i], ms[i]);
      mt[i] = rel::max_nan_last(zt[c * ldt + i], mt[i]);
    }
  for (int64_t c = 0; c < Kv; ++c)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t e = c * ld + i;
      const T s = zs[c * lds + i], t = zt[c * ldt + i];
      const T xs = rel::exp_acc((s - ms[i]) * inv_t), xt = rel::exp_acc((t - mt[i]) * inv_t);
      const T d = (s - t) * inv_t;
      es[e] = xs;
      et[e] = xt;
      ss[i] += xs;
      st[i] += xt;
      sd[i] += xt * d;
      // phi only matters where every |d| <= 1; elsewhere any finite value will do.
      sphi[i] += xt * rel::phi_small(rel::clamp_unit(d));
      dmax[i] = rel::max_nan_last(std::abs(d), dmax[i]);
    }
}

// out[c * ldo + i] = scale * (p_s - p_t) at counted pixels, 0 elsewhere, for c < K (out may be
// es itself, ldo = ld, or the NCHW gradient tensor).
template <typename T>
KDK_ALWAYS_INLINE void block_grad(const T* __restrict__ zs, int64_t lds, const T* __restrict__ zt, int64_t ldt,
                                  const T* es, const T* __restrict__ et, int64_t K, int64_t ld, T* out,
                                  int64_t ldo, int64_t len, T inv_t, T scale, const T* __restrict__ delta,
                                  const T* __restrict__ inv_ss, const T* __restrict__ inv_st,
                                  const unsigned char* __restrict__ counted) {
  for (int64_t c = 0; c < K; ++c)
    for (int64_t i = 0; i < len; ++i) {
      const int64_t e = c * ld + i;
      const T x = (zs[c * lds + i] - zt[c * ldt + i]) * inv_t - delta[i];
      const T pt = et[e] * inv_st[i];
      const T near = pt * (x + rel::phi_small(rel::clamp_unit(x)));  // p_t expm1(x)
      const T far = es[e] * inv_ss[i] - pt;
      const T g = rel::select(std::abs(x) <= T(1), near, far) * scale;
      out[c * ldo + i] = rel::select(counted[i] != 0, g, T(0));
    }
}

KDK_ROW_CLONES void block_sums_f32(const float* zs, int64_t lds, const float* zt, int64_t ldt, float* es,
                                   float* et, int64_t Kv, int64_t ld, int64_t len, float inv_t, float* ms,
                                   float* mt, float* ss, float* st, float* sd, float* sphi, float* dmax) {
  block_sums<float>(zs, lds, zt, ldt, es, et, Kv, ld, len, inv_t, ms, mt, ss, st, sd, sphi, dmax);
}

KDK_ROW_CLONES void block_grad_f32(const float* zs, int64_t lds, const float* zt, int64_t ldt, const float* es,
                                   const float* et, int64_t K, int64_t ld, float* out, int64_t ldo, int64_t len,
                                   float inv_t, float scale, const float* delta, const float* inv_ss,
                                   const float* inv_st, const unsigned char* counted) {
  block_grad<float>(zs, lds, zt, ldt, es, et, K, ld, out, ldo, len, inv_t, scale, delta, inv_ss, inv_st, counted);
}

// Where the block's logits are read (its buffers, or the input) and its gradient is written.
template <typename T>
struct Views {
  const T* zs;
  int64_t lds;
  const T* zt;
  int64_t ldt;
  T* out;
  int64_t ldo;
};

void run_sums(Scratch<float>& w, const Views<float>& v, int64_t Kv, int64_t len, float inv_t) {
  block_sums_f32(v.zs, v.lds, v.zt, v.ldt, w.es.data(), w.et.data(), Kv, w.ld, len, inv_t, w.ms.data(),
                 w.mt.data(), w.ss.data(), w.st.data(), w.sd.data(), w.sphi.data(), w.dmax.data());
}
void run_sums(Scratch<double>& w, const Views<double>& v, int64_t Kv, int64_t len, double inv_t) {
  block_sums<double>(v.zs, v.lds, v.zt, v.ldt, w.es.data(), w.et.data(), Kv, w.ld, len, inv_t, w.ms.data(),
                     w.mt.data(), w.ss.data(), w.st.data(), w.sd.data(), w.sphi.data(), w.dmax.data());
}

void run_grad(Scratch<float>& w, const Views<float>& v, int64_t K, int64_t len, float inv_t, float scale) {
  block_grad_f32(v.zs, v.lds, v.zt, v.ldt, w.es.data(), w.et.data(), K, w.ld, v.out, v.ldo, len, inv_t, scale,
                 w.delta.data(), w.inv_ss.data(), w.inv_st.data(), w.counted.data());
}
void run_grad(Scratch<double>& w, const Views<double>& v, int64_t K, int64_t len, double inv_t, double scale) {
  block_grad<double>(v.zs, v.lds, v.zt, v.ldt, w.es.data(), w.et.data(), K, w.ld, v.out, v.ldo, len, inv_t, scale,
                     w.delta.data(), w.inv_ss.data(), w.inv_st.data(), w.counted.data());
}

// The per-pixel KL from the block sums, in double; writes delta = lse_s - lse_t and the
// reciprocal sums for the gradient. Returns the sum over counted pixels.
template <typename T>
double block_kl(Scratch<T>& w, int64_t len, double inv_t) {
  double total = 0;
  for (int64_t i = 0; i < len; ++i) {
    const double st = w.st[i], ss = w.ss[i];
    const double mean_d = w.sd[i] / st;
    double delta;
    if (w.dmax[i] <= T(1)) {
      delta = std::log1p(mean_d + w.sphi[i] / st);
    } else {
      delta = (static_cast<double>(w.ms[i]) - static_cast<double>(w.mt[i])) * inv_t +
              std::log(ss) - std::log(st);
    }
    w.delta[i] = static_cast<T>(delta);
    w.inv_ss[i] = static_cast<T>(1.0 / ss);
    w.inv_st[i] = static_cast<T>(1.0 / st);
    if (w.counted[i]) total += delta - mean_d;  // an excluded pixel may hold NaN: never added
  }
  return total;
}

struct Problem {
  int64_t B, K, H, W, N, Kv, P, ld, blocks;  // ld: row stride of the K x P buffers
};

Problem problem(const at::Tensor& zs4) {
  Problem p;
  p.B = zs4.size(0);
  p.K = zs4.size(1);
  p.H = zs4.size(2);
  p.W = zs4.size(3);
  p.N = p.H * p.W;
  p.Kv = std::max<int64_t>(p.K, 2);
  p.P = std::clamp<int64_t>(kBlockElems / p.Kv / 16 * 16, 16, kMaxBlockPixels);
  p.P = std::min(p.P, p.B * p.N);  // small problems (classification logits): one short block
  // Rows a multiple of 4 KiB apart share L1 sets: the transposing copies of channels_last
  // inputs, which touch one element per row, ran 2.5x slower with ld = P = 1024.
  p.ld = p.P + 16;
  p.blocks = ceil_div(p.B * p.N, p.P);
  return p;
}

Block block_of(const Problem& pr, int64_t task) {
  const int64_t p0 = task * pr.P, len = std::min(pr.P, pr.B * pr.N - p0);
  return {p0, len, pr.N, pr.W, p0 / pr.N == (p0 + len - 1) / pr.N};
}

int64_t count_mask(const at::Tensor& mask3, const Problem& pr) {
  const Pixels m = pixels(mask3, false);
  const bool* md = mask3.data_ptr<bool>();
  std::vector<int64_t> counts(pr.blocks);
  at::parallel_for(0, pr.blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> off(pr.P);
    for (int64_t task = begin; task < end; ++task) {
      const Block blk = block_of(pr, task);
      offsets(m, blk, off.data());
      int64_t n = 0;
      for (int64_t i = 0; i < blk.len; ++i) n += md[off[i]] ? 1 : 0;
      counts[task] = n;
    }
  });
  int64_t total = 0;
  for (int64_t n : counts) total += n;
  return total;
}

template <typename scalar_t, typename T>
void pixel_kl_blocks(const at::Tensor& zs4, const at::Tensor& zt4, const at::Tensor& mask3,
                     at::Tensor& g4, const Problem& pr, double temperature, double count,
                     double* partial) {
  const Pixels ps = pixels(zs4, true), pt = pixels(zt4, true);
  const bool need_grad = g4.defined(), masked = mask3.defined();
  const Pixels pg = need_grad ? pixels(g4, true) : ps;
  const Pixels pm = masked ? pixels(mask3, false) : ps;
  const scalar_t* zsd = zs4.data_ptr<scalar_t>();
  const scalar_t* ztd = zt4.data_ptr<scalar_t>();
  scalar_t* gd = need_grad ? g4.data_ptr<scalar_t>() : nullptr;
  const bool* md = masked ? mask3.data_ptr<bool>() : nullptr;
  const T inv_t = static_cast<T>(1.0 / temperature);
  const T scale = static_cast<T>(temperature / count);
  const bool direct = std::is_same_v<scalar_t, T> && pr.K == pr.Kv;
  at::parallel_for(0, pr.blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> w(pr.Kv, pr.P, pr.ld);
    for (int64_t task = begin; task < end; ++task) {
      const Block blk = block_of(pr, task);
      offsets(ps, blk, w.off_s.data());
      offsets(pt, blk, w.off_t.data());
      // NCHW float inputs are read in place (each channel row of the block is one run); other
      // layouts, dtypes and the binary case (a zero second logit) are gathered into buffers.
      Views<T> v{w.zs.data(), pr.ld, w.zt.data(), pr.ld, w.es.data(), pr.ld};
      if (direct && unit_run(ps, blk)) {
        v.zs = reinterpret_cast<const T*>(zsd) + w.off_s[0];
        v.lds = ps.sC;
      } else {
        gather(zsd, ps, blk, w.off_s.data(), pr.K, pr.Kv, pr.ld, w.zs.data());
      }
      if (direct && unit_run(pt, blk)) {
        v.zt = reinterpret_cast<const T*>(ztd) + w.off_t[0];
        v.ldt = pt.sC;
      } else {
        gather(ztd, pt, blk, w.off_t.data(), pr.K, pr.Kv, pr.ld, w.zt.data());
      }
      if (masked) {
        offsets(pm, blk, w.off_m.data());
        for (int64_t i = 0; i < blk.len; ++i) w.counted[i] = md[w.off_m[i]] ? 1 : 0;
      } else {
        std::fill(w.counted.begin(), w.counted.begin() + blk.len, 1);
      }
      run_sums(w, v, pr.Kv, blk.len, inv_t);
      partial[task] = block_kl(w, blk.len, 1.0 / temperature);
      if (need_grad) {
        offsets(pg, blk, w.off_g.data());
        const bool in_place = direct && unit_run(pg, blk);
        if (in_place) {
          v.out = reinterpret_cast<T*>(gd) + w.off_g[0];
          v.ldo = pg.sC;
        }
        run_grad(w, v, pr.K, blk.len, inv_t, scale);
        if (!in_place) scatter(w.es.data(), pg, blk, w.off_g.data(), pr.K, pr.ld, gd);
      }
    }
  });
}

// (B, K) logits and (B,) masks as (B, K, 1, 1) and (B, 1, 1): views, no copies.
at::Tensor as_maps(const at::Tensor& t, int64_t dim) {
  return t.dim() == dim ? t : t.unsqueeze(-1).unsqueeze(-1);
}

std::tuple<at::Tensor, at::Tensor> pixel_kl_cpu(const at::Tensor& zs, const at::Tensor& zt,
                                                double temperature,
                                                const c10::optional<at::Tensor>& mask,
                                                bool need_grad) {
  TORCH_CHECK((zs.dim() == 2 || zs.dim() == 4) && zs.sizes() == zt.sizes(),
              "pixel_kl: zs and zt must both be (B, K) or (B, K, H, W) of equal shapes, got ",
              zs.sizes(), " and ", zt.sizes());
  TORCH_CHECK(zs.scalar_type() == zt.scalar_type(), "pixel_kl: zs and zt must have one dtype, got ",
              zs.scalar_type(), " and ", zt.scalar_type());
  TORCH_CHECK(zs.device().is_cpu() && zt.device().is_cpu(), "pixel_kl: expects CPU tensors");
  TORCH_CHECK(temperature > 0, "pixel_kl: temperature must be positive, got ", temperature);
  const at::Tensor zs4 = as_maps(zs, 4), zt4 = as_maps(zt, 4);
  const Problem pr = problem(zs4);
  at::Tensor mask3;
  if (mask.has_value() && mask->defined()) {
    const auto expected = std::vector<int64_t>{pr.B, pr.H, pr.W};
    mask3 = as_maps(*mask, 3);
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask3.sizes() == at::IntArrayRef(expected),
                "pixel_kl: mask must be bool of shape (B, H, W) (or (B,) for (B, K) logits), got ",
                mask->scalar_type(), " ", mask->sizes());
  }
  const at::ScalarType acc = zs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = need_grad ? at::empty_like(zs) : at::empty({0}, zs.options());
  at::Tensor g4 = need_grad ? as_maps(grad, 4) : at::Tensor();
  const int64_t count = mask3.defined() ? count_mask(mask3, pr) : pr.B * pr.N;
  std::vector<double> partial(pr.blocks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "kdk_pixel_kl", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    pixel_kl_blocks<scalar_t, T>(zs4, zt4, mask3, g4, pr, temperature,
                                 static_cast<double>(count), partial.data());
  });
  double total = 0;
  for (double v : partial) total += v;
  // count == 0 (nothing counted) gives 0 / 0 = NaN like the reference, and a zero gradient.
  const double loss = temperature * temperature * total / static_cast<double>(count);
  return {at::scalar_tensor(loss, zs.options().dtype(acc)), grad};
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CPU, m) { m.impl("pixel_kl", &kdk::pixel_kl_cpu); }
