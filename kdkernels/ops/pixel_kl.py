"""Pixel KL on the compiled extension (CPU C++ and CUDA C++ kernels).

kdkernels::pixel_kl(zs, zt, temperature, mask, need_grad) returns (loss, grad_unit): when
need_grad, grad_unit = d loss / d zs for a unit upstream gradient, written by the forward pass
itself, so the backward is one scale by the upstream gradient and nothing else is saved.
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


def acc_dtype(zs: torch.Tensor) -> torch.dtype:
    return torch.float64 if zs.dtype == torch.float64 else torch.float32


def prepare(zs: torch.Tensor, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(zs, zt, need_grad) for the fused kernels, which take one dtype: a mixed pair runs in the
    promoted dtype (autograd casts the gradient back). The teacher is detached."""
    if zs.dtype != zt.dtype:
        dtype = torch.promote_types(zs.dtype, zt.dtype)
        zs, zt = zs.to(dtype), zt.to(dtype)
    return zs, zt.detach(), zs.requires_grad and torch.is_grad_enabled()


def _fake(zs, zt, temperature, mask, need_grad):
    loss = zs.new_empty((), dtype=acc_dtype(zs))
    return loss, torch.empty_like(zs) if need_grad else zs.new_empty((0,))


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::pixel_kl")(_fake)


def pixel_kl(zs, zt, temperature, mask):
    """Validated inputs (equal shapes, mask bool (B, H, W) or (B,) or None); returns the loss."""
    zs, zt, need_grad = prepare(zs, zt)
    return torch.ops.kdkernels.pixel_kl(zs, zt, float(temperature), mask, need_grad)[0]
