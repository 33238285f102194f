"""Pixel relation on the compiled extension (CPU C++ and CUDA C++ kernels).

Two ops, one per distance, neither of which holds the N x N similarity matrices:

- kdkernels::pixel_relation_mse returns (loss, m_ss, m_st): the float64 Grams A A^T and A T^T of
  the pixel-normalised student A and teacher T (the algebraic route); the backward multiplies
  them back onto A and T.
- kdkernels::pixel_relation_kl returns (loss, lse_s, lse_t): the row log-sum-exps of S_s / tau
  and S_t / tau (B x N), from which the backward recomputes the probabilities tile by tile.
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


def acc_dtype(fs: torch.Tensor) -> torch.dtype:
    return torch.float64 if fs.dtype == torch.float64 else torch.float32


def _fake_mse(fs, ft):
    b, cs, ct = fs.shape[0], fs.shape[1], ft.shape[1]
    loss = fs.new_empty((), dtype=acc_dtype(fs))
    return (loss, fs.new_empty((b, cs, cs), dtype=torch.float64),
            fs.new_empty((b, cs, ct), dtype=torch.float64))


def _fake_mse_backward(grad, fs, ft, m_ss, m_st):
    return torch.empty_like(fs)


def _fake_kl(fs, ft, tau):
    b, n = fs.shape[0], fs.shape[2] * fs.shape[3]
    loss = fs.new_empty((), dtype=acc_dtype(fs))
    return (loss, fs.new_empty((b, n), dtype=acc_dtype(fs)),
            fs.new_empty((b, n), dtype=acc_dtype(fs)))


def _fake_kl_backward(grad, fs, ft, lse_s, lse_t, tau):
    return torch.empty_like(fs)


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::pixel_relation_mse")(_fake_mse)
    torch.library.register_fake("kdkernels::pixel_relation_mse_backward")(_fake_mse_backward)
    torch.library.register_fake("kdkernels::pixel_relation_kl")(_fake_kl)
    torch.library.register_fake("kdkernels::pixel_relation_kl_backward")(_fake_kl_backward)


def pixel_relation(fs, ft, distance, tau):
    """Validated inputs (equal batch and spatial sizes); returns the loss. A float64/other mix
    runs in float64."""
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    if distance == "mse":
        return torch.ops.kdkernels.pixel_relation_mse(fs, ft)[0]
    return torch.ops.kdkernels.pixel_relation_kl(fs, ft, float(tau))[0]
