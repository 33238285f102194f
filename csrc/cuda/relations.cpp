// Torch glue of the relation losses on CUDA: sanity checks (user-facing validation is done in
// Python), buffers, the current stream, launch-error checks, and the GEMMs that cuBLAS does best.
//
// Precision per path:
//  - channel relation: computed in float64 whatever the input dtype (the outputs are cast to the
//    accumulation dtype): the C x C Grams G = Fn Fn^T and the backward's (C x C) x (C x N)
//    product are cuBLAS DGEMMs, which run on the FP64 tensor cores of A100 / H100 at the rate of
//    FP32 SGEMM (no TF32 question arises, and no global flag is touched). The losses are small
//    differences of similar Grams (softmax rows with a large tau have G ~ 1/N, G_s - G_t ~ 1e-4 G):
//    float32 Grams would carry ~1e-7 G of rounding into them, the float32 row softmax as much.
//    The cost is one float64 (B, C, N) copy per input, O(B C N).
//    Why cuBLAS and not a custom split-K kernel: C <= 512 and N long is the tall-K shape cuBLAS's
//    heuristics split (deterministically: no atomics in GEMM), and for "l2" one raw Gram
//    R = F F^T gives both the norms (its diagonal) and G = R / (n_i n_j), so the rows are never
//    normalised in memory.
//  - pixel relation "mse": pixel-normalised A, T in float64 (custom kernel) and float64 Grams
//    (cuBLAS DGEMM); the algebraic identity is evaluated in float64.
//  - pixel relation "kl": the custom tiled kernels in relations_kernel.cu, FP32 FMA (FP64 for
//    float64 inputs); per-row brackets in the accumulation dtype, the cross-row sum in float64.
// Every reduction has a fixed order (ATen reductions, cuBLAS GEMMs, the kernels): deterministic.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include "cuda/relations_kernel.h"
#include "cuda/tensor_view.h"

namespace kdk {
namespace {

constexpr double kEps = 1e-12;  // the L2-normalisation epsilon

at::ScalarType acc_type(const at::Tensor& fs) { return fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The (fs, ft) checks every op shares: CUDA, one device, 4-D, same batch and spatial size, both
// float64 or neither (and the same channel count when `same_channels`).
void check_pair(const char* op, const at::Tensor& fs, const at::Tensor& ft, bool same_channels) {
  TORCH_CHECK(fs.is_cuda() && ft.is_cuda(), op, ": fs and ft must be CUDA tensors");
  TORCH_CHECK(fs.device() == ft.device(), op, ": fs and ft are on different devices");
  TORCH_CHECK(fs.dim() == 4 && ft.dim() == 4, op, ": fs and ft must be 4-D (B, C, H, W)");
  TORCH_CHECK(fs.size(0) == ft.size(0) && fs.size(2) == ft.size(2) && fs.size(3) == ft.size(3), op,
              ": fs and ft must have the same batch and spatial sizes, got ", fs.sizes(), " and ", ft.sizes());
  TORCH_CHECK(!same_channels || fs.size(1) == ft.size(1), op, ": fs and ft must have the same channel count, got ",
              fs.sizes(), " and ", ft.sizes());
  TORCH_CHECK((fs.scalar_type() == at::kDouble) == (ft.scalar_type() == at::kDouble), op,
              ": fs and ft must both be float64 or neither");
  dtype_tag(fs, op, "fs");
  dtype_tag(ft, op, "ft");
}

// The upstream gradient as a 0-dim device tensor of `dtype` (normally already one: then no copy).
// It is read on the device, never with .item(), so the backward does not synchronise.
at::Tensor device_scalar(const at::Tensor& grad, const at::Tensor& fs, at::ScalarType dtype, const char* op) {
  TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one element, got ", grad.numel());
  return grad.to(fs.device(), dtype).reshape({});
}

int64_t round_up(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

// ---------------------------------------------------------------------------------------------
// Channel relation.

// Everything below runs in float64 (see the file comment).

// x y^T per sample (B x C x N times B x N x C): cuBLAS DGEMM.
at::Tensor gram(const at::Tensor& x, const at::Tensor& y) { return at::bmm(x, y.transpose(1, 2)); }

// G = Fn Fn^T of the L2-normalised rows of x (B x C x N) from the raw Gram: G_ij = R_ij / (d_i d_j),
// d = max(n, eps), n = sqrt(R_ii) the row norms (returned in *norms when given).
at::Tensor l2_gram(const at::Tensor& x, at::Tensor* norms) {
  const at::Tensor r = gram(x, x);
  const at::Tensor n = r.diagonal(0, 1, 2).sqrt();  // (B, C); R_ii = sum_n x^2 >= 0
  const at::Tensor d = n.clamp_min(kEps);
  if (norms != nullptr) *norms = n;
  return r / (d.unsqueeze(2) * d.unsqueeze(1));
}

// Row softmax of x / tau over N: returns Fn and (when given) the row max of x / tau and the row
// sum of exp(x / tau - max), each (B, C).
at::Tensor softmax_rows(const at::Tensor& x, double tau, at::Tensor* row_max, at::Tensor* row_sum) {
  const at::Tensor z = x / tau;
  const at::Tensor m = z.amax({2}, /*keepdim=*/true);
  const at::Tensor e = (z - m).exp();
  const at::Tensor s = e.sum({2}, /*keepdim=*/true);
  if (row_max != nullptr) *row_max = m.squeeze(2);
  if (row_sum != nullptr) *row_sum = s.squeeze(2);
  return e / s;
}

// Fn of the student rebuilt from the saved row statistics (B, C, 2), with the forward's
// expressions. The statistics were rounded to the accumulation dtype: for "softmax" that scales
// each row by 1 + O(1e-7), for "l2" likewise, a relative change of the gradient of that order.
at::Tensor rebuild_rows(const at::Tensor& x, const at::Tensor& row_stats, bool l2, double tau) {
  if (l2) return x / row_stats.select(2, 0).unsqueeze(2).clamp_min(kEps);
  return (x / tau - row_stats.select(2, 0).unsqueeze(2)).exp() / row_stats.select(2, 1).unsqueeze(2);
}

// The loss and grad_gram = d loss / d G_s (unit upstream gradient) from the two Grams.
std::pair<at::Tensor, at::Tensor> gram_distance(const at::Tensor& gs, const at::Tensor& gt, bool mse, double tau) {
  const int64_t B = gs.size(0), C = gs.size(1);
  if (mse) {
    const double cells = static_cast<double>(B) * static_cast<double>(C) * static_cast<double>(C);
    const at::Tensor diff = gs - gt;
    return {diff.square().sum() / cells, diff * (2.0 / cells)};
  }
  // KL of the row softmaxes, per row the bracket sum_j p_t (z_t - z_s) + lse_s - lse_t centred on
  // the teacher's arg-max column k (as the pixel "kl" kernel, see relations_kernel.cu):
  //   KL = log1p(sum_j p_t expm1(u_j)) - sum_j p_t u_j,  u = d - d_k,  d = (G_s - G_t) / tau,
  // which does not cancel when the student is close to the teacher (u small) or the rows are
  // nearly one-hot (then the float64 eager log_softmax loses the dominant column's term,
  // 1 + e^-40 == 1); the plain difference where lse_s - lse_t - d_k is not small.
  const double rows = static_cast<double>(B) * static_cast<double>(C);
  const at::Tensor zs = gs / tau, zt = gt / tau;
  const at::Tensor lse_s = zs.logsumexp({2}, /*keepdim=*/true);
  const at::Tensor lse_t = zt.logsumexp({2}, /*keepdim=*/true);
  const at::Tensor log_pt = zt - lse_t;
  const at::Tensor ps = (zs - lse_s).exp(), pt = log_pt.exp();
  const at::Tensor d = (gs - gt) / tau;
  const at::Tensor ck = d.gather(2, zt.argmax(2, /*keepdim=*/true));  // (B, C, 1)
  const at::Tensor u = d - ck;
  // p_t expm1(u), without inf * 0 where a tiny tau makes u large
  const at::Tensor pe = at::where(u.lt(1.0), pt * u.expm1(), (log_pt + u).exp() - pt);
  const at::Tensor e = pe.sum(2);  // exp(lse_s - lse_t - d_k) - 1
  const at::Tensor mu = (pt * u).sum(2);
  const at::Tensor delta =
      at::where(e.gt(-0.5).logical_and(e.lt(1.0)), e.log1p(), (lse_s - lse_t - ck).squeeze(2));
  return {(delta - mu).sum() * (tau * tau / rows), (ps - pt) * (tau / rows)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_relation_cuda(const at::Tensor& fs, const at::Tensor& ft,
                                                                     c10::string_view normalize,
                                                                     c10::string_view distance, double tau) {
  const char* op = "channel_relation";
  check_pair(op, fs, ft, /*same_channels=*/true);
  TORCH_CHECK(normalize == "l2" || normalize == "softmax", op, ": normalize must be 'l2' or 'softmax', got ",
              normalize);
  TORCH_CHECK(distance == "mse" || distance == "kl", op, ": distance must be 'mse' or 'kl', got ", distance);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const c10::cuda::CUDAGuard guard(fs.device());
  const at::ScalarType acc = acc_type(fs);
  const int64_t B = fs.size(0), C = fs.size(1), N = fs.size(2) * fs.size(3);
  const at::Tensor xs = fs.reshape({B, C, N}).to(at::kDouble);
  const at::Tensor xt = ft.reshape({B, C, N}).to(at::kDouble);

  at::Tensor gs, gt, row_stats;
  if (normalize == "l2") {
    at::Tensor ns;
    gs = l2_gram(xs, &ns);
    gt = l2_gram(xt, nullptr);
    row_stats = at::stack({ns, at::zeros_like(ns)}, 2);
  } else {
    at::Tensor mx, sum;
    const at::Tensor ps = softmax_rows(xs, tau, &mx, &sum);
    const at::Tensor pt = softmax_rows(xt, tau, nullptr, nullptr);
    gs = gram(ps, ps);
    gt = gram(pt, pt);
    row_stats = at::stack({mx, sum}, 2);
  }
  auto [loss, grad_gram] = gram_distance(gs, gt, distance == "mse", tau);
  return {loss.to(acc), grad_gram.to(acc), row_stats.to(acc)};
}

at::Tensor channel_relation_backward_cuda(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& grad_gram,
                                          const at::Tensor& row_stats, c10::string_view normalize, double tau) {
  const char* op = "channel_relation_backward";
  TORCH_CHECK(fs.is_cuda() && grad_gram.is_cuda() && row_stats.is_cuda(), op,
              ": fs, grad_gram and row_stats must be CUDA tensors");
  TORCH_CHECK(fs.device() == grad_gram.device() && fs.device() == row_stats.device(), op,
              ": fs, grad_gram and row_stats are on different devices");
  TORCH_CHECK(fs.dim() == 4, op, ": fs must be 4-D (B, C, H, W), got ", fs.dim(), "-D");
  dtype_tag(fs, op, "fs");
  TORCH_CHECK(normalize == "l2" || normalize == "softmax", op, ": normalize must be 'l2' or 'softmax', got ",
              normalize);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const at::ScalarType acc = acc_type(fs);
  const int64_t B = fs.size(0), C = fs.size(1), N = fs.size(2) * fs.size(3);
  TORCH_CHECK(grad_gram.dim() == 3 && grad_gram.size(0) == B && grad_gram.size(1) == C && grad_gram.size(2) == C &&
                  grad_gram.scalar_type() == acc,
              op, ": grad_gram must be (B, C, C) of the accumulation dtype, got ", grad_gram.sizes(), " ",
              grad_gram.scalar_type());
  TORCH_CHECK(row_stats.dim() == 3 && row_stats.size(0) == B && row_stats.size(1) == C && row_stats.size(2) == 2 &&
                  row_stats.scalar_type() == acc,
              op, ": row_stats must be (B, C, 2) of the accumulation dtype, got ", row_stats.sizes(), " ",
              row_stats.scalar_type());
  const c10::cuda::CUDAGuard guard(fs.device());
  const at::Tensor g = device_scalar(grad, fs, at::kDouble, op);
  const bool l2 = normalize == "l2";
  const at::Tensor x = fs.reshape({B, C, N}).to(at::kDouble);
  const at::Tensor stats = row_stats.to(at::kDouble);
  const at::Tensor fn = rebuild_rows(x, stats, l2, tau);
  const at::Tensor gg = grad_gram.to(at::kDouble);
  const at::Tensor dfn = at::bmm((gg + gg.transpose(1, 2)) * g, fn);  // dFn = grad (gg + gg^T) Fn
  const at::Tensor dot = (fn * dfn).sum({2}, /*keepdim=*/true);
  at::Tensor dx;
  if (l2) {
    const at::Tensor n = stats.select(2, 0).unsqueeze(2);
    dx = at::where(n.gt(kEps), (dfn - fn * dot) / n, dfn / kEps);
  } else {
    dx = fn * (dfn - dot) / tau;
  }
  at::Tensor grad_fs = at::empty_like(fs);  // keeps channels_last for dense inputs
  grad_fs.copy_(dx.reshape(fs.sizes()));
  return grad_fs;
}

// ---------------------------------------------------------------------------------------------
// Pixel relation.

// The contiguous pixel-normalised copy (B, Cpad, Npad) of x in `dtype` (float32 or float64), and
// the per-pixel norms (B, N) when `norms` is given.
at::Tensor normalized_pixels(const at::Tensor& x, int64_t Cpad, int64_t Npad, at::ScalarType dtype, at::Tensor* norms,
                             const char* op, const char* name) {
  const gpu::Tensor4 v = view4(x, op, name);
  const int64_t B = x.size(0), N = x.size(2) * x.size(3);
  TORCH_CHECK(N <= INT32_MAX, op, ": at most 2^31 - 1 pixels per map are supported, got ", N);
  at::Tensor out = at::empty({B, Cpad, Npad}, x.options().dtype(dtype));
  void* norms_ptr = nullptr;
  if (norms != nullptr) {
    *norms = at::empty({B, N}, x.options().dtype(dtype));
    norms_ptr = norms->data_ptr();
  }
  C10_CUDA_CHECK(
      gpu::rel_normalize_pixels(v, Cpad, Npad, dtype == at::kDouble, out.data_ptr(), norms_ptr, current_stream()));
  return out;
}

// grad_fs from dA (B, Cpad, Npad), the student's A and norms: the pixel normalisation backward
// times grad * mult.
at::Tensor normalization_backward(const at::Tensor& dA, const at::Tensor& A, const at::Tensor& norms,
                                  const at::Tensor& g, double mult, const at::Tensor& fs, const char* op) {
  at::Tensor grad_fs = at::empty_like(fs);  // keeps channels_last for dense inputs
  if (grad_fs.numel() == 0) return grad_fs;
  const gpu::Tensor4 v = view4(fs, op, "fs");
  const int64_t gstride[4] = {grad_fs.stride(0), grad_fs.stride(1), grad_fs.stride(2), grad_fs.stride(3)};
  C10_CUDA_CHECK(gpu::rel_normalize_backward(dA.data_ptr(), A.data_ptr(), norms.data_ptr(),
                                             A.scalar_type() == at::kDouble, A.size(1), A.size(2), g.data_ptr(), mult,
                                             v, grad_fs.data_ptr(), gstride, current_stream()));
  return grad_fs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_relation_mse_cuda(const at::Tensor& fs, const at::Tensor& ft) {
  const char* op = "pixel_relation_mse";
  check_pair(op, fs, ft, /*same_channels=*/false);
  const c10::cuda::CUDAGuard guard(fs.device());
  const int64_t B = fs.size(0), Cs = fs.size(1), Ct = ft.size(1), N = fs.size(2) * fs.size(3);
  // The algebraic route in float64 (see the file comment): A, T and their Grams.
  const at::Tensor A = normalized_pixels(fs, Cs, N, at::kDouble, nullptr, op, "fs");
  const at::Tensor T = normalized_pixels(ft, Ct, N, at::kDouble, nullptr, op, "ft");
  const at::Tensor m_ss = at::bmm(A, A.transpose(1, 2));
  const at::Tensor m_tt = at::bmm(T, T.transpose(1, 2));
  const at::Tensor m_st = at::bmm(A, T.transpose(1, 2));
  // >= 0 in exact arithmetic; a negative value is rounding of terms ~N^2 (e.g. N = 1: all 1).
  const at::Tensor total =
      (m_ss.square().sum() + m_tt.square().sum() - 2.0 * m_st.square().sum()).clamp_min(0.0);
  const double scale = 1.0 / (static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(N));
  return {(total * scale).to(acc_type(fs)), m_ss, m_st};
}

at::Tensor pixel_relation_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                            const at::Tensor& m_ss, const at::Tensor& m_st) {
  const char* op = "pixel_relation_mse_backward";
  check_pair(op, fs, ft, /*same_channels=*/false);
  const int64_t B = fs.size(0), Cs = fs.size(1), Ct = ft.size(1), N = fs.size(2) * fs.size(3);
  TORCH_CHECK(m_ss.device() == fs.device() && m_st.device() == fs.device(), op,
              ": m_ss and m_st must be on fs's device");
  TORCH_CHECK(m_ss.dim() == 3 && m_ss.size(0) == B && m_ss.size(1) == Cs && m_ss.size(2) == Cs &&
                  m_ss.scalar_type() == at::kDouble,
              op, ": m_ss must be (B, Cs, Cs) float64, got ", m_ss.sizes(), " ", m_ss.scalar_type());
  TORCH_CHECK(m_st.dim() == 3 && m_st.size(0) == B && m_st.size(1) == Cs && m_st.size(2) == Ct &&
                  m_st.scalar_type() == at::kDouble,
              op, ": m_st must be (B, Cs, Ct) float64, got ", m_st.sizes(), " ", m_st.scalar_type());
  const c10::cuda::CUDAGuard guard(fs.device());
  const at::Tensor g = device_scalar(grad, fs, at::kDouble, op);
  at::Tensor norms;
  const at::Tensor A = normalized_pixels(fs, Cs, N, at::kDouble, &norms, op, "fs");
  const at::Tensor T = normalized_pixels(ft, Ct, N, at::kDouble, nullptr, op, "ft");
  // dA = m_ss A - m_st T (float64 DGEMMs); the factor grad * 4 / (B N^2) is applied by the kernel.
  const at::Tensor dA = at::baddbmm(at::bmm(m_ss, A), m_st, T, /*beta=*/1, /*alpha=*/-1).contiguous();
  const double mult = 4.0 / (static_cast<double>(B) * static_cast<double>(N) * static_cast<double>(N));
  return normalization_backward(dA, A, norms, g, mult, fs, op);
}

// The padded shapes of the tiled kernels.
gpu::RelKlShape kl_shape(const at::Tensor& fs, const at::Tensor& ft, const char* op) {
  const bool f64 = fs.scalar_type() == at::kDouble;
  const int64_t bk = gpu::rel_channel_pad(f64);
  gpu::RelKlShape s;
  s.B = fs.size(0);
  s.N = fs.size(2) * fs.size(3);
  s.Npad = round_up(s.N, gpu::kRelTile);
  s.Cs_pad = round_up(fs.size(1), bk);
  s.Ct_pad = round_up(ft.size(1), bk);
  TORCH_CHECK(s.B * (s.Npad / gpu::kRelTile) <= INT32_MAX, op, ": B * ceil(N / 64) = ",
              s.B * (s.Npad / gpu::kRelTile), " row blocks exceed the grid limit");
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_relation_kl_cuda(const at::Tensor& fs, const at::Tensor& ft,
                                                                      double tau) {
  const char* op = "pixel_relation_kl";
  check_pair(op, fs, ft, /*same_channels=*/false);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const c10::cuda::CUDAGuard guard(fs.device());
  const at::ScalarType acc = acc_type(fs);
  const bool f64 = acc == at::kDouble;
  const gpu::RelKlShape s = kl_shape(fs, ft, op);
  const at::Tensor A = normalized_pixels(fs, s.Cs_pad, s.Npad, acc, nullptr, op, "fs");
  const at::Tensor T = normalized_pixels(ft, s.Ct_pad, s.Npad, acc, nullptr, op, "ft");
  const auto opts = fs.options().dtype(acc);
  at::Tensor lse_s = at::empty({s.B, s.N}, opts);
  at::Tensor lse_t = at::empty({s.B, s.N}, opts);
  at::Tensor terms = at::empty({s.B, s.N}, opts);
  C10_CUDA_CHECK(gpu::rel_kl_forward(A.data_ptr(), T.data_ptr(), s, tau, f64, lse_s.data_ptr(), lse_t.data_ptr(),
                                     terms.data_ptr(), current_stream()));
  // The per-row brackets summed in float64 (a fixed-order reduction).
  const double scale = tau * tau / (static_cast<double>(s.B) * static_cast<double>(s.N));
  const at::Tensor loss = (terms.sum(at::kDouble) * scale).to(acc);
  return {loss, lse_s, lse_t};
}

at::Tensor pixel_relation_kl_backward_cuda(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                           const at::Tensor& lse_s, const at::Tensor& lse_t, double tau) {
  const char* op = "pixel_relation_kl_backward";
  check_pair(op, fs, ft, /*same_channels=*/false);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const at::ScalarType acc = acc_type(fs);
  const bool f64 = acc == at::kDouble;
  const gpu::RelKlShape s = kl_shape(fs, ft, op);
  for (const at::Tensor* t : {&lse_s, &lse_t})
    TORCH_CHECK(t->device() == fs.device() && t->dim() == 2 && t->size(0) == s.B && t->size(1) == s.N &&
                    t->scalar_type() == acc,
                op, ": lse_s and lse_t must be (B, N) of the accumulation dtype on fs's device, got ", t->sizes(),
                " ", t->scalar_type());
  const c10::cuda::CUDAGuard guard(fs.device());
  const at::Tensor g = device_scalar(grad, fs, acc, op);
  at::Tensor norms;
  const at::Tensor A = normalized_pixels(fs, s.Cs_pad, s.Npad, acc, &norms, op, "fs");
  const at::Tensor T = normalized_pixels(ft, s.Ct_pad, s.Npad, acc, nullptr, op, "ft");
  const at::Tensor ls = lse_s.contiguous(), lt = lse_t.contiguous();
  at::Tensor dA = at::zeros({s.B, s.Cs_pad, s.Npad}, fs.options().dtype(acc));
  C10_CUDA_CHECK(gpu::rel_kl_backward(A.data_ptr(), T.data_ptr(), s, tau, f64, ls.data_ptr(), lt.data_ptr(),
                                      dA.data_ptr(), current_stream()));
  const double mult = tau / (static_cast<double>(s.B) * static_cast<double>(s.N));
  return normalization_backward(dA, A, norms, g, mult, fs, op);
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("channel_relation", &kdk::channel_relation_cuda);
  m.impl("channel_relation_backward", &kdk::channel_relation_backward_cuda);
  m.impl("pixel_relation_mse", &kdk::pixel_relation_mse_cuda);
  m.impl("pixel_relation_mse_backward", &kdk::pixel_relation_mse_backward_cuda);
  m.impl("pixel_relation_kl", &kdk::pixel_relation_kl_cuda);
  m.impl("pixel_relation_kl_backward", &kdk::pixel_relation_kl_backward_cuda);
}
