// Torch glue of the pixel-KL CUDA kernel: sanity checks (user-facing validation is done in
// Python), output allocation, the device-side pixel count, the current stream and launch-error
// checks. The kernel and its launcher live in the torch-free pixel_kl_kernel.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/finish_kernel.h"
#include "cuda/pixel_kl_kernel.h"
#include "cuda/tensor_view.h"

namespace kdk {
namespace {

constexpr const char* kOp = "pixel_kl";

// (B, K) logits and (B,) masks as (B, K, 1, 1) and (B, 1, 1): views, no copies.
at::Tensor as_maps(const at::Tensor& t, int64_t dim) {
  return t.dim() == dim ? t : t.unsqueeze(-1).unsqueeze(-1);
}

std::tuple<at::Tensor, at::Tensor> pixel_kl_cuda(const at::Tensor& zs, const at::Tensor& zt,
                                                 double temperature,
                                                 const c10::optional<at::Tensor>& mask,
                                                 bool need_grad) {
  TORCH_CHECK(zs.is_cuda() && zt.is_cuda() && zs.device() == zt.device(),
              "pixel_kl: zs and zt must be CUDA tensors on one device");
  TORCH_CHECK((zs.dim() == 2 || zs.dim() == 4) && zs.sizes() == zt.sizes(),
              "pixel_kl: zs and zt must both be (B, K) or (B, K, H, W) of equal shapes, got ",
              zs.sizes(), " and ", zt.sizes());
  TORCH_CHECK(zs.scalar_type() == zt.scalar_type(), "pixel_kl: zs and zt must have one dtype, got ",
              zs.scalar_type(), " and ", zt.scalar_type());
  TORCH_CHECK(temperature > 0, "pixel_kl: temperature must be positive, got ", temperature);
  const c10::cuda::CUDAGuard guard(zs.device());
  const at::Tensor zs4 = as_maps(zs, 4), zt4 = as_maps(zt, 4);
  const gpu::Tensor4 vs = view4(zs4, kOp, "zs"), vt = view4(zt4, kOp, "zt");
  const int64_t B = zs4.size(0), H = zs4.size(2), W = zs4.size(3);

  gpu::Mask3 m{nullptr, {0, 0, 0}};
  at::Tensor count;  // on the device: no synchronisation, and it traces under torch.compile
  if (mask.has_value() && mask->defined()) {
    const at::Tensor mask3 = as_maps(*mask, 3);
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask3.dim() == 3 && mask3.size(0) == B &&
                    mask3.size(1) == H && mask3.size(2) == W && mask->device() == zs.device(),
                "pixel_kl: mask must be bool of shape (B, H, W) (or (B,) for (B, K) logits) on "
                "zs's device, got ", mask->scalar_type(), " ", mask->sizes());
    m.data = mask3.data_ptr<bool>();
    for (int d = 0; d < 3; ++d) m.stride[d] = mask3.stride(d);
    count = mask3.sum();
  }
  const auto acc = zs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = need_grad ? at::empty_like(zs) : at::empty({0}, zs.options());
  int64_t gstride[4] = {0, 0, 0, 0};
  if (need_grad) {
    const at::Tensor g4 = as_maps(grad, 4);
    for (int d = 0; d < 4; ++d) gstride[d] = g4.stride(d);
  }
  at::Tensor partial = at::empty({gpu::pixel_kl_partials(vs)}, zs.options().dtype(at::kDouble));
  C10_CUDA_CHECK(gpu::pixel_kl_forward(
      vs, vt, m, count.defined() ? count.data_ptr<int64_t>() : nullptr, B * H * W, temperature,
      need_grad ? grad.data_ptr() : nullptr, gstride, partial.data_ptr<double>(),
      at::cuda::getCurrentCUDAStream()));
  // A fixed-order sum of the per-block partials keeps the loss deterministic. Nothing counted:
  // 0 / 0 = NaN, like the reference.
  const double t2 = temperature * temperature;
  at::Tensor loss = at::empty({}, zs.options().dtype(acc));
  C10_CUDA_CHECK(gpu::finish_sum(partial.data_ptr(), true, partial.numel(),
                                 count.defined() ? t2 : t2 / static_cast<double>(B * H * W),
                                 count.defined() ? count.data_ptr<int64_t>() : nullptr, false, loss.data_ptr(),
                                 acc == at::kDouble, at::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

}  // namespace
}  // namespace kdk

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) { m.impl("pixel_kl", &kdk::pixel_kl_cuda); }
