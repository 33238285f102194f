// Host launchers of the relation-loss CUDA kernels (pixel relation "mse" and "kl"; the channel
// relation is all cuBLAS + ATen in relations.cpp). Torch-free on purpose, like
// attention_transfer_kernel.h: the torch glue in relations.cpp passes raw pointers, sizes, element
// strides and dtype tags. Every launch is asynchronous on `stream` and returns the first launch
// error.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/attention_transfer_kernel.h"  // DType, Tensor4

namespace kdk {
namespace gpu {

// The pixel-relation kernels work on a zero-padded, contiguous (B, Cpad, Npad) copy of the
// pixel-normalised features ("A" for the student, "T" for the teacher) in the accumulation type
// (float, or double for float64 inputs and for the whole "mse" route). The tiled "kl" kernels
// need Npad a multiple of kRelTile and Cpad a multiple of rel_channel_pad(f64).
constexpr int64_t kRelTile = 64;
int64_t rel_channel_pad(bool f64);  // 16 (float tiles) or 8 (double tiles)

// out[b, c, n] = x[b, c, n] * (1 / max(||x[b, :, n]||_2, 1e-12)) for c < C, n < N (n = h * W + w), and 0
// in the padding (C <= c < Cpad, N <= n < Npad). norms[b, n] = ||x[b, :, n]||_2 (B x N, contiguous;
// may be null). out and norms are double when out_f64, else float (x then must not be float64).
// The squares are summed in the output type. N must be below 2^31.
cudaError_t rel_normalize_pixels(const Tensor4& x, int64_t Cpad, int64_t Npad, bool out_f64, void* out,
                                 void* norms, cudaStream_t stream);

// Pixel normalisation backward fused with the final scaling, for the student:
//   grad_fs[b, c, n] = s * (n_bn > 1e-12 ? (dA - A <A, dA>) / n_bn : dA / 1e-12),  s = *grad * mult,
// with dA, A (B, Cpad, Npad) and norms (B, N) contiguous in the accumulation type (double when
// acc_f64, else float) and grad one acc element on the device. fs gives the sizes and the output
// dtype (its data is not read); grad_fs is written through grad_fs_stride.
cudaError_t rel_normalize_backward(const void* dA, const void* A, const void* norms, bool acc_f64, int64_t Cpad,
                                   int64_t Npad, const void* grad, double mult, const Tensor4& fs, void* grad_fs,
                                   const int64_t grad_fs_stride[4], cudaStream_t stream);

// Shapes of the tiled "kl" kernels: A is (B, Cs_pad, Npad), T is (B, Ct_pad, Npad), N valid pixels.
struct RelKlShape {
  int64_t B, Cs_pad, Ct_pad, N, Npad;
};

// Flash-attention style forward over tiles of S_s = A^T A and S_t = T^T T (never held whole):
// lse_s[b, i] = logsumexp_j S_s[b, i, j] / tau, lse_t likewise, and the per-row KL bracket
// terms[b, i] = sum_j p_t (S_t - S_s)_ij / tau + lse_s_i - lse_t_i (all B x N, contiguous, float or
// double as f64). The loss is tau^2 / (B N) * sum(terms), summed by the caller in a fixed order.
cudaError_t rel_kl_forward(const void* A, const void* T, const RelKlShape& shape, double tau, bool f64,
                           void* lse_s, void* lse_t, void* terms, cudaStream_t stream);

// Recomputing backward: dA[b, :, i] = sum_j A[b, :, j] (H_ij), H_ij = (p_s - p_t)_ij + (p_s - p_t)_ji,
// p = exp(S / tau - lse_row), without the factor grad * tau / (B N) (rel_normalize_backward applies
// it). dA is (B, Cs_pad, Npad), must be zero on entry; each block owns a row block of every sample,
// so there are no atomics.
cudaError_t rel_kl_backward(const void* A, const void* T, const RelKlShape& shape, double tau, bool f64,
                            const void* lse_s, const void* lse_t, void* dA, cudaStream_t stream);

}  // namespace gpu
}  // namespace kdk
