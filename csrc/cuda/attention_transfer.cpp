// Torch glue of the attention-transfer CUDA kernels: sanity checks (user-facing validation is done
// in Python), output allocation, the current stream, and launch-error checks. The kernels and
// their launchers live in the torch-free attention_transfer_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/attention_transfer_kernel.h"
#include "cuda/tensor_view.h"

namespace kdk {
namespace {

constexpr const char* kOp = "attention_transfer";

double reduction_scale(c10::string_view reduction, int64_t B, int64_t N) {
  if (reduction == "mean") return 1.0 / (static_cast<double>(B) * static_cast<double>(N));
  if (reduction == "batchmean") return 1.0 / static_cast<double>(B);
  TORCH_CHECK(reduction == "sum", "attention_transfer: unknown reduction ", reduction);
  return 1.0;
}

std::tuple<at::Tensor, at::Tensor> attention_transfer_cuda(const at::Tensor& fs, const at::Tensor& ft, double p,
                                                           c10::string_view reduction) {
  TORCH_CHECK(fs.is_cuda() && ft.is_cuda(), "attention_transfer: fs and ft must be CUDA tensors");
  TORCH_CHECK(fs.device() == ft.device(), "attention_transfer: fs and ft are on different devices");
  const gpu::Tensor4 vs = view4(fs, kOp, "fs"), vt = view4(ft, kOp, "ft");
  TORCH_CHECK(fs.size(0) == ft.size(0), "attention_transfer: batch sizes differ (", fs.size(0), " vs ",
              ft.size(0), ")");
  const bool f64 = fs.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 == (ft.scalar_type() == at::kDouble),
              "attention_transfer: fs and ft must both be float64 or neither");
  const c10::cuda::CUDAGuard guard(fs.device());
  const int64_t B = ft.size(0), Ho = ft.size(2), Wo = ft.size(3);
  const double scale = reduction_scale(reduction, B, Ho * Wo);
  const auto opts = fs.options().dtype(f64 ? at::kDouble : at::kFloat);
  at::Tensor workspace = at::empty({gpu::at_forward_workspace(vs, vt)}, opts);
  at::Tensor partial = at::empty({B}, opts);
  at::Tensor coeff = at::empty({B, Ho, Wo}, opts);
  at::Tensor counter = at::empty({1}, fs.options().dtype(at::kInt));
  at::Tensor loss = at::empty({}, opts);
  C10_CUDA_CHECK(gpu::at_forward(vs, vt, p, scale, workspace.data_ptr(), partial.data_ptr(), coeff.data_ptr(),
                                 counter.data_ptr(), loss.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return {loss, coeff};
}

at::Tensor attention_transfer_backward_cuda(const at::Tensor& grad, const at::Tensor& fs, const at::Tensor& coeff,
                                            double p) {
  TORCH_CHECK(fs.is_cuda() && coeff.is_cuda(), "attention_transfer_backward: fs and coeff must be CUDA tensors");
  TORCH_CHECK(fs.device() == coeff.device(), "attention_transfer_backward: fs and coeff are on different devices");
  const gpu::Tensor4 vs = view4(fs, kOp, "fs");
  const auto acc = fs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(coeff.dim() == 3 && coeff.size(0) == fs.size(0) && coeff.scalar_type() == acc,
              "attention_transfer_backward: coeff must be (B, Ho, Wo) of the accumulation dtype");
  TORCH_CHECK(grad.numel() == 1, "attention_transfer_backward: grad must hold one element");
  const c10::cuda::CUDAGuard guard(fs.device());
  // Normally already a device scalar of the accumulation dtype (then no copy); read on the device,
  // never with .item(), so the backward does not synchronise.
  const at::Tensor g = grad.to(fs.device(), acc);
  const at::Tensor cf = coeff.contiguous();
  at::Tensor grad_fs = at::empty_like(fs);  // keeps channels_last for dense inputs
  if (grad_fs.numel() == 0) return grad_fs;
  const int64_t gstride[4] = {grad_fs.stride(0), grad_fs.stride(1), grad_fs.stride(2), grad_fs.stride(3)};
  C10_CUDA_CHECK(gpu::at_backward(g.data_ptr(), vs, grad_fs.data_ptr(), gstride, cf.data_ptr(), cf.size(1),
                                  cf.size(2), p, at::cuda::getCurrentCUDAStream()));
  return grad_fs;
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("attention_transfer", &kdk::attention_transfer_cuda);
  m.impl("attention_transfer_backward", &kdk::attention_transfer_backward_cuda);
}
