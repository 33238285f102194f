// Torch glue of the relation losses on CUDA: sanity checks (user-facing validation is done in
// Python), outputs and scratch buffers, the current stream, launch-error checks. The kernels
// (channel_relation_kernel.cu, pixel_relation_kernel.cu) read fs and ft through their strides;
// nothing here copies or converts them, so a forward + backward is the launches alone: channel
// relation 4, pixel relation "mse" 4, "kl" 3. Precision per route is described in the kernel
// files.
//
// row_stats of the channel relation are this backend's own: (row statistic, dot) per row, where
// the statistic is the row norm ("l2") or the row log-sum-exp of F / tau ("softmax") and dot the
// normalisation backward's per-row term from the Grams (relations_kernel.h). The CPU backend
// stores (norm, 0) or (max, sum): a forward and its backward always run on one device.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cuda/relations_kernel.h"
#include "cuda/tensor_view.h"

namespace kdk {
namespace {

at::ScalarType acc_type(const at::Tensor& fs) { return fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The (fs, ft) checks every op shares: CUDA, one device, 4-D, non-empty, same batch and spatial
// size, both float64 or neither (and the same channel count when `same_channels`).
void check_pair(const char* op, const at::Tensor& fs, const at::Tensor& ft, bool same_channels) {
  TORCH_CHECK(fs.is_cuda() && ft.is_cuda(), op, ": fs and ft must be CUDA tensors");
  TORCH_CHECK(fs.device() == ft.device(), op, ": fs and ft are on different devices");
  TORCH_CHECK(fs.dim() == 4 && ft.dim() == 4, op, ": fs and ft must be 4-D (B, C, H, W)");
  TORCH_CHECK(fs.numel() > 0 && ft.numel() > 0, op, ": fs and ft must not be empty");
  TORCH_CHECK(fs.size(0) == ft.size(0) && fs.size(2) == ft.size(2) && fs.size(3) == ft.size(3), op,
              ": fs and ft must have the same batch and spatial sizes, got ", fs.sizes(), " and ", ft.sizes());
  TORCH_CHECK(!same_channels || fs.size(1) == ft.size(1), op, ": fs and ft must have the same channel count, got ",
              fs.sizes(), " and ", ft.sizes());
  TORCH_CHECK((fs.scalar_type() == at::kDouble) == (ft.scalar_type() == at::kDouble), op,
              ": fs and ft must both be float64 or neither");
  TORCH_CHECK(fs.size(2) * fs.size(3) <= INT32_MAX, op, ": at most 2^31 - 1 pixels per map are supported, got ",
              fs.size(2) * fs.size(3));
}

// The upstream gradient as one acc element on fs's device (normally already one: then no copy,
// no kernel). It is read on the device, never with .item(), so the backward does not synchronise.
at::Tensor device_scalar(const at::Tensor& grad, const at::Tensor& fs, const char* op) {
  TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one element, got ", grad.numel());
  return grad.to(fs.device(), acc_type(fs)).contiguous();
}

// A tensor of fs's sizes and dtype for the gradient (keeps channels_last for dense inputs) and
// its strides.
at::Tensor gradient_like(const at::Tensor& fs, int64_t (&stride)[4]) {
  at::Tensor g = at::empty_like(fs);
  for (int d = 0; d < 4; ++d) stride[d] = g.stride(d);
  return g;
}

// Scratch of `n` elements of `dtype`: an allocation, no kernel.
at::Tensor scratch(const at::Tensor& like, int64_t n, at::ScalarType dtype) {
  return at::empty({n}, like.options().dtype(dtype));
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

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
  const gpu::Tensor4 vs = view4(fs, op, "fs"), vt = view4(ft, op, "ft");
  const int64_t B = fs.size(0), C = fs.size(1);
  const auto opts = fs.options().dtype(acc_type(fs));
  at::Tensor loss = at::empty({}, opts);
  at::Tensor grad_gram = at::empty({B, C, C}, opts);
  at::Tensor row_stats = at::empty({B, C, 2}, opts);
  const at::Tensor ws = scratch(fs, gpu::cr_workspace(vs), at::kDouble);
  C10_CUDA_CHECK(gpu::cr_forward(vs, vt, normalize == "softmax", distance == "kl", tau, ws.data_ptr(),
                                 grad_gram.data_ptr(), row_stats.data_ptr(), loss.data_ptr(), current_stream()));
  return {loss, grad_gram, row_stats};
}

at::Tensor channel_relation_backward_cuda(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& grad_gram,
                                          const at::Tensor& row_stats, c10::string_view normalize, double tau) {
  const char* op = "channel_relation_backward";
  TORCH_CHECK(fs.is_cuda() && grad_gram.is_cuda() && row_stats.is_cuda(), op,
              ": fs, grad_gram and row_stats must be CUDA tensors");
  TORCH_CHECK(fs.device() == grad_gram.device() && fs.device() == row_stats.device(), op,
              ": fs, grad_gram and row_stats are on different devices");
  TORCH_CHECK(normalize == "l2" || normalize == "softmax", op, ": normalize must be 'l2' or 'softmax', got ",
              normalize);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const gpu::Tensor4 vs = view4(fs, op, "fs");
  const at::ScalarType acc = acc_type(fs);
  const int64_t B = fs.size(0), C = fs.size(1);
  TORCH_CHECK(grad_gram.dim() == 3 && grad_gram.size(0) == B && grad_gram.size(1) == C && grad_gram.size(2) == C &&
                  grad_gram.scalar_type() == acc && grad_gram.is_contiguous(),
              op, ": grad_gram must be (B, C, C) contiguous of the accumulation dtype, got ", grad_gram.sizes(), " ",
              grad_gram.scalar_type());
  TORCH_CHECK(row_stats.dim() == 3 && row_stats.size(0) == B && row_stats.size(1) == C && row_stats.size(2) == 2 &&
                  row_stats.scalar_type() == acc && row_stats.is_contiguous(),
              op, ": row_stats must be (B, C, 2) contiguous of the accumulation dtype, got ", row_stats.sizes(), " ",
              row_stats.scalar_type());
  const c10::cuda::CUDAGuard guard(fs.device());
  const at::Tensor g = device_scalar(grad, fs, op);
  int64_t stride[4];
  at::Tensor grad_fs = gradient_like(fs, stride);
  C10_CUDA_CHECK(gpu::cr_backward(g.data_ptr(), vs, grad_gram.data_ptr(), row_stats.data_ptr(),
                                  normalize == "softmax", tau, grad_fs.data_ptr(), stride, current_stream()));
  return grad_fs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_relation_mse_cuda(const at::Tensor& fs, const at::Tensor& ft) {
  const char* op = "pixel_relation_mse";
  check_pair(op, fs, ft, /*same_channels=*/false);
  const c10::cuda::CUDAGuard guard(fs.device());
  const gpu::Tensor4 vs = view4(fs, op, "fs"), vt = view4(ft, op, "ft");
  const int64_t B = fs.size(0), Cs = fs.size(1), Ct = ft.size(1);
  at::Tensor loss = at::empty({}, fs.options().dtype(acc_type(fs)));
  const auto f64 = fs.options().dtype(at::kDouble);
  at::Tensor m_ss = at::empty({B, Cs, Cs}, f64);
  at::Tensor m_st = at::empty({B, Cs, Ct}, f64);
  const at::Tensor ws = scratch(fs, gpu::prm_workspace(vs, vt), at::kDouble);
  C10_CUDA_CHECK(gpu::prm_forward(vs, vt, ws.data_ptr(), m_ss.data_ptr(), m_st.data_ptr(), loss.data_ptr(),
                                  current_stream()));
  return {loss, m_ss, m_st};
}

at::Tensor pixel_relation_mse_backward_cuda(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                            const at::Tensor& m_ss, const at::Tensor& m_st) {
  const char* op = "pixel_relation_mse_backward";
  check_pair(op, fs, ft, /*same_channels=*/false);
  const int64_t B = fs.size(0), Cs = fs.size(1), Ct = ft.size(1);
  TORCH_CHECK(m_ss.device() == fs.device() && m_st.device() == fs.device(), op,
              ": m_ss and m_st must be on fs's device");
  TORCH_CHECK(m_ss.dim() == 3 && m_ss.size(0) == B && m_ss.size(1) == Cs && m_ss.size(2) == Cs &&
                  m_ss.scalar_type() == at::kDouble && m_ss.is_contiguous(),
              op, ": m_ss must be (B, Cs, Cs) contiguous float64, got ", m_ss.sizes(), " ", m_ss.scalar_type());
  TORCH_CHECK(m_st.dim() == 3 && m_st.size(0) == B && m_st.size(1) == Cs && m_st.size(2) == Ct &&
                  m_st.scalar_type() == at::kDouble && m_st.is_contiguous(),
              op, ": m_st must be (B, Cs, Ct) contiguous float64, got ", m_st.sizes(), " ", m_st.scalar_type());
  const c10::cuda::CUDAGuard guard(fs.device());
  const at::Tensor g = device_scalar(grad, fs, op);
  int64_t stride[4];
  at::Tensor grad_fs = gradient_like(fs, stride);
  C10_CUDA_CHECK(gpu::prm_backward(g.data_ptr(), view4(fs, op, "fs"), view4(ft, op, "ft"), m_ss.data_ptr(),
                                   m_st.data_ptr(), grad_fs.data_ptr(), stride, current_stream()));
  return grad_fs;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_relation_kl_cuda(const at::Tensor& fs, const at::Tensor& ft,
                                                                      double tau) {
  const char* op = "pixel_relation_kl";
  check_pair(op, fs, ft, /*same_channels=*/false);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const c10::cuda::CUDAGuard guard(fs.device());
  const gpu::Tensor4 vs = view4(fs, op, "fs"), vt = view4(ft, op, "ft");
  const at::ScalarType acc = acc_type(fs);
  const auto opts = fs.options().dtype(acc);
  const int64_t B = fs.size(0), N = fs.size(2) * fs.size(3);
  at::Tensor loss = at::empty({}, opts);
  at::Tensor lse_s = at::empty({B, N}, opts);
  at::Tensor lse_t = at::empty({B, N}, opts);
  const at::Tensor ws = scratch(fs, gpu::prk_forward_workspace(vs), acc);
  C10_CUDA_CHECK(gpu::prk_forward(vs, vt, tau, ws.data_ptr(), lse_s.data_ptr(), lse_t.data_ptr(), loss.data_ptr(),
                                  current_stream()));
  return {loss, lse_s, lse_t};
}

at::Tensor pixel_relation_kl_backward_cuda(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& ft,
                                           const at::Tensor& lse_s, const at::Tensor& lse_t, double tau) {
  const char* op = "pixel_relation_kl_backward";
  check_pair(op, fs, ft, /*same_channels=*/false);
  TORCH_CHECK(tau > 0, op, ": tau must be > 0, got ", tau);
  const at::ScalarType acc = acc_type(fs);
  const int64_t B = fs.size(0), N = fs.size(2) * fs.size(3);
  for (const at::Tensor* t : {&lse_s, &lse_t})
    TORCH_CHECK(t->device() == fs.device() && t->dim() == 2 && t->size(0) == B && t->size(1) == N &&
                    t->scalar_type() == acc && t->is_contiguous(),
                op, ": lse_s and lse_t must be (B, N) contiguous of the accumulation dtype on fs's device, got ",
                t->sizes(), " ", t->scalar_type());
  const c10::cuda::CUDAGuard guard(fs.device());
  const gpu::Tensor4 vs = view4(fs, op, "fs");
  const at::Tensor g = device_scalar(grad, fs, op);
  const at::Tensor ws = scratch(fs, gpu::prk_backward_workspace(vs), acc);
  int64_t stride[4];
  at::Tensor grad_fs = gradient_like(fs, stride);
  C10_CUDA_CHECK(gpu::prk_backward(g.data_ptr(), vs, view4(ft, op, "ft"), tau, lse_s.data_ptr(), lse_t.data_ptr(),
                                   ws.data_ptr(), grad_fs.data_ptr(), stride, current_stream()));
  return grad_fs;
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
