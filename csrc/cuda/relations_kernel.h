// Host launchers of the relation-loss CUDA kernels (channel relation, pixel relation "mse" and
// "kl"). Torch-free on purpose, like attention_transfer_kernel.h: the torch glue in relations.cpp
// passes raw pointers, sizes, element strides and dtype tags; the kernels read the inputs
// through their strides (any layout, no copies). The accumulation type ("acc") is double when
// fs (and then ft) is float64, else float. Every launch is asynchronous on `stream` and returns
// the first launch error. Kernels per forward + backward: channel relation 4, pixel relation
// "mse" 4, "kl" 3.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_transfer_kernel.h"  // DType, Tensor4

namespace kdk {
namespace gpu {

// --- Channel relation: Gram G = Fn Fn^T (C x C) of the rows normalised over the N pixels.

// Doubles of scratch cr_forward needs for fs (B, C, H, W).
int64_t cr_workspace(const Tensor4& fs);

// loss (one acc element), grad_gram = d loss / d G_s for a unit upstream gradient (B x C x C acc)
// and row_stats (B x C x 2 acc): per row the normalisation statistic (l2: the row norm;
// softmax: the row log-sum-exp of F / tau) and dot = sum_j (grad_gram_ij + grad_gram_ji) G_s,ij,
// which the backward's normalisation step needs. Three kernels: split-K Grams of fs and ft, the
// per-sample C x C tail (float64), the fixed-order loss sum.
cudaError_t cr_forward(const Tensor4& fs, const Tensor4& ft, bool softmax, bool kl, double tau, void* workspace,
                       void* grad_gram, void* row_stats, void* loss, cudaStream_t stream);

// grad_fs (fs's sizes and dtype, written through grad_fs_stride) = grad * d loss / d fs, from
// grad (one acc element on the device), grad_gram and row_stats. One kernel.
cudaError_t cr_backward(const void* grad, const Tensor4& fs, const void* grad_gram, const void* row_stats,
                        bool softmax, double tau, void* grad_fs, const int64_t grad_fs_stride[4], cudaStream_t stream);

// --- Pixel relation: S = A^T A (N x N) of the pixel-normalised features, never held.

// Doubles of scratch prm_forward needs.
int64_t prm_workspace(const Tensor4& fs, const Tensor4& ft);

// "mse" by the algebraic route: loss (one acc element) = max(0, |m_ss|^2 + |m_tt|^2 -
// 2 |m_st|^2) / (B N^2) from the Grams m_ss = A A^T (B x Cs x Cs), m_st = A T^T (B x Cs x Ct),
// both written (double), and m_tt. Three kernels: split-K Grams normalising pixels as they load,
// the per-sample sums of squares, the fixed-order loss sum.
cudaError_t prm_forward(const Tensor4& fs, const Tensor4& ft, void* workspace, void* m_ss, void* m_st, void* loss,
                        cudaStream_t stream);

// grad_fs = grad * 4 / (B N^2) * (pixel-normalisation backward of dA = m_ss A - m_st T), in
// float64; grad is one acc element on the device. One kernel.
cudaError_t prm_backward(const void* grad, const Tensor4& fs, const Tensor4& ft, const void* m_ss,
                         const void* m_st, void* grad_fs, const int64_t grad_fs_stride[4], cudaStream_t stream);

// Acc elements of the per-row scratch of prk_forward (B * N) and of the gradient scratch of
// prk_backward (B * round_up(Cs, 64) * round_up(N, 64); none up to 64 student channels, whose
// gradient rows stay in registers).
int64_t prk_forward_workspace(const Tensor4& fs);
int64_t prk_backward_workspace(const Tensor4& fs);

// "kl", flash-attention style: loss (one acc element) = tau^2 / (B N) sum of the per-row KL
// brackets, and lse_s, lse_t (B x N acc, the row log-sum-exps of S / tau) for the backward. Two
// kernels: the tiled row pass (pixel norms computed as the tiles load), the fixed-order sum.
cudaError_t prk_forward(const Tensor4& fs, const Tensor4& ft, double tau, void* workspace, void* lse_s, void* lse_t,
                        void* loss, cudaStream_t stream);

// grad_fs = grad * tau / (B N) * d(sum of brackets) / d fs: one kernel that recomputes the tiles,
// keeps each row block's gradient to itself (no atomics) and ends with the pixel-normalisation
// backward. grad is one acc element on the device.
cudaError_t prk_backward(const void* grad, const Tensor4& fs, const Tensor4& ft, double tau, const void* lse_s,
                         const void* lse_t, void* workspace, void* grad_fs, const int64_t grad_fs_stride[4],
                         cudaStream_t stream);

}  // namespace gpu
}  // namespace kdk
