"""Logit attention (KDAS) on the compiled extension (CPU C++ kernel).

kdkernels::logit_attention(ps, pt, tau, need_grad) returns (loss, unit): with need_grad, unit =
d loss / d ps for a unit upstream gradient (ps's shape and memory format, accumulation dtype),
computed in the same pass as the loss; otherwise an empty tensor. The backward is a scale.
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


def acc_dtype(ps: torch.Tensor) -> torch.dtype:
    return torch.float64 if ps.dtype == torch.float64 else torch.float32


def _fake(ps, pt, tau, need_grad):
    acc = acc_dtype(ps)
    unit = torch.empty_like(ps, dtype=acc) if need_grad else ps.new_empty((0,), dtype=acc)
    return ps.new_empty((), dtype=acc), unit


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::logit_attention")(_fake)


def logit_attention(ps, pt, tau):
    """Validated inputs of one shape, (B, H, W) or (B, K, H, W); returns the loss. A
    float64/other mix runs in float64."""
    if (ps.dtype == torch.float64) != (pt.dtype == torch.float64):
        ps, pt = ps.double(), pt.double()
    if ps.dim() == 3:
        ps, pt = ps.unsqueeze(1), pt.unsqueeze(1)
    need_grad = ps.requires_grad and torch.is_grad_enabled()
    return torch.ops.kdkernels.logit_attention(ps, pt, float(tau), need_grad)[0]
