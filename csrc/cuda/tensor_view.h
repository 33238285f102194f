// Torch-side views of tensors for the torch-free CUDA launchers, shared by the binding files.
#pragma once

#include <ATen/ATen.h>

#include "cuda/attention_transfer_kernel.h"

namespace kdk {

inline gpu::DType dtype_tag(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return gpu::DType::kFloat16;
    case at::kBFloat16: return gpu::DType::kBFloat16;
    case at::kFloat: return gpu::DType::kFloat32;
    case at::kDouble: return gpu::DType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

inline gpu::Tensor4 view4(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, C, H, W), got ", t.dim(), "-D");
  gpu::Tensor4 v;
  v.data = t.data_ptr();
  v.dtype = dtype_tag(t, op, name);
  for (int d = 0; d < 4; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

}  // namespace kdk
