// Host launchers of the attention-transfer CUDA kernels. Torch-free on purpose (so the .cu builds
// quickly and on its own): the torch glue in attention_transfer.cpp passes raw pointers, sizes,
// element strides and a dtype tag.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kdk {
namespace gpu {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// A (B, C, H, W) tensor read through its element strides (any layout, no copy).
struct Tensor4 {
  const void* data;
  DType dtype;
  int64_t size[4];
  int64_t stride[4];
};

// The accumulation type ("acc") below is double when fs (and then ft) is float64, else float.

// Number of acc elements of scratch that at_forward needs.
int64_t at_forward_workspace(const Tensor4& fs, const Tensor4& ft);

// Writes *loss = scale * sum_b partial[b] (one acc element), through partial[b] = sum_n
// (a_s - a_t)^2 (B acc elements of scratch), and coeff = d loss / d m_s for a unit upstream
// gradient (B x Ht x Wt acc elements, contiguous). fs is bilinearly resampled to ft's spatial
// size when the sizes differ. scale is the reduction factor (1 / (B N), 1 / B or 1). counter:
// one unsigned int of scratch (no need to zero it). Three kernels, asynchronous on `stream`;
// returns the first launch error.
cudaError_t at_forward(const Tensor4& fs, const Tensor4& ft, double p, double scale,
                       void* workspace, void* partial, void* coeff, void* counter, void* loss,
                       cudaStream_t stream);

// grad_fs (same sizes and dtype as fs, written through grad_fs_stride) from the upstream
// gradient `grad` (one acc element on the device) and coeff (B x Ho x Wo acc, contiguous).
cudaError_t at_backward(const void* grad, const Tensor4& fs, void* grad_fs,
                        const int64_t grad_fs_stride[4], const void* coeff, int64_t Ho, int64_t Wo,
                        double p, cudaStream_t stream);

}  // namespace gpu
}  // namespace kdk
