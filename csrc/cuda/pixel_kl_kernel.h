// Host launcher of the pixel-KL CUDA kernel. Torch-free on purpose (so the .cu builds quickly
// and on its own): the torch glue in pixel_kl.cpp passes raw pointers, sizes, element strides
// and a dtype tag.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_transfer_kernel.h"  // DType, Tensor4

namespace kdk {
namespace gpu {

// A (B, H, W) bool mask read through its element strides; data == nullptr: every pixel counts.
struct Mask3 {
  const bool* data;
  int64_t stride[3];
};

// Number of double partial sums pixel_kl_forward writes (one per thread block).
int64_t pixel_kl_partials(const Tensor4& zs);

// zs, zt: (B, K, H, W) logits of one dtype (any strides; (B, K) logits as (B, K, 1, 1)).
// Writes partial[i] = sum of KL(p_t || p_s) over block i's counted pixels (the loss is
// T^2 * sum_i partial[i] / count) and, when grad != nullptr, grad = d loss / d zs for a unit
// upstream gradient (zs's dtype, written through grad_stride, 0 at excluded pixels). count: the
// number of counted pixels, on the device (count_dev, an int64) or, when count_dev == nullptr,
// count_host. Asynchronous on `stream`; returns the first launch error.
cudaError_t pixel_kl_forward(const Tensor4& zs, const Tensor4& zt, const Mask3& mask,
                             const int64_t* count_dev, int64_t count_host, double temperature,
                             void* grad, const int64_t grad_stride[4], double* partial,
                             cudaStream_t stream);

}  // namespace gpu
}  // namespace kdk
