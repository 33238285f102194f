// Host launcher of the KDAS Symmetrical Guiding Module CUDA kernel. Torch-free (see
// attention_transfer_kernel.h for Tensor4 and DType): the glue in sgm.cpp passes raw pointers,
// sizes, element strides and a dtype tag.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_transfer_kernel.h"

namespace kdk {
namespace gpu {

// Number of partial sums sgm_forward writes for (B, K, H, H) maps: one per tile pair.
int64_t sgm_partials(const Tensor4& ps);

// ps, pt: (B, K, H, H) maps of one dtype. Writes partial[] (sgm_partials(ps) elements of the
// accumulation type: double for float64 inputs, else float), whose sum is sum over all
// elements of f(M), M = D + D^T, D = ps - pt, f(m) = |m| (l1) or m^2. When grad is not null it
// also writes grad = unit_scale * f'(M) (ps's dtype, element strides grad_stride). Asynchronous
// on `stream`; returns the launch error.
cudaError_t sgm_forward(const Tensor4& ps, const Tensor4& pt, bool l1, double unit_scale, void* grad,
                        const int64_t grad_stride[4], void* partial, cudaStream_t stream);

}  // namespace gpu
}  // namespace kdk
