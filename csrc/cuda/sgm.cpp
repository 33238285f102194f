// Torch glue of the Symmetrical Guiding Module CUDA kernel: sanity checks (user-facing
// validation is done in Python), output allocation, the current stream, launch-error checks. The
// kernel and its launcher live in the torch-free sgm_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/finish_kernel.h"
#include "cuda/sgm_kernel.h"
#include "cuda/tensor_view.h"

namespace kdk {
namespace {

constexpr const char* kOp = "sgm";

// A (B, H, W) map is a (B, 1, H, W) one.
at::Tensor as4(const at::Tensor& t) { return t.dim() == 3 ? t.unsqueeze(1) : t; }

std::tuple<at::Tensor, at::Tensor> sgm_cuda(const at::Tensor& ps, const at::Tensor& pt, c10::string_view distance,
                                            bool need_grad) {
  TORCH_CHECK(ps.is_cuda() && pt.is_cuda(), "sgm: ps and pt must be CUDA tensors");
  TORCH_CHECK(ps.device() == pt.device(), "sgm: ps and pt are on different devices");
  TORCH_CHECK(ps.dim() == 3 || ps.dim() == 4, "sgm: ps must be 3-D or 4-D");
  TORCH_CHECK(ps.sizes() == pt.sizes(), "sgm: ps and pt must have the same shape");
  TORCH_CHECK(ps.size(-1) == ps.size(-2), "sgm: the maps must be square");
  TORCH_CHECK(ps.scalar_type() == pt.scalar_type(), "sgm: ps and pt must have the same dtype");
  TORCH_CHECK(distance == "mse" || distance == "l1", "sgm: unknown distance ", distance);
  const c10::cuda::CUDAGuard guard(ps.device());
  const bool l1 = distance == "l1";
  const gpu::Tensor4 vs = view4(as4(ps), kOp, "ps"), vt = view4(as4(pt), kOp, "pt");
  const auto acc = ps.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = need_grad ? at::empty_like(ps) : at::empty({0}, ps.options());
  at::Tensor partial = at::empty({gpu::sgm_partials(vs)}, ps.options().dtype(acc));
  int64_t gstride[4] = {0, 0, 0, 0};
  if (need_grad) {
    const at::Tensor g4 = as4(grad);
    for (int d = 0; d < 4; ++d) gstride[d] = g4.stride(d);
  }
  const double n = static_cast<double>(ps.numel());
  C10_CUDA_CHECK(gpu::sgm_forward(vs, vt, l1, (l1 ? 2.0 : 4.0) / n, need_grad ? grad.data_ptr() : nullptr,
                                  gstride, partial.data_ptr(), at::cuda::getCurrentCUDAStream()));
  // A fixed-order reduction of the per-tile partials keeps the loss deterministic.
  at::Tensor loss = at::empty({}, partial.options());
  C10_CUDA_CHECK(gpu::finish_sum(partial.data_ptr(), acc == at::kDouble, partial.numel(), 1.0 / n, nullptr, false,
                                 loss.data_ptr(), acc == at::kDouble, at::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("sgm", &kdk::sgm_cuda);
}
