"""KDAS Symmetrical Guiding Module on the compiled extension (CPU C++ and CUDA C++ kernels).

kdkernels::sgm(ps, pt, distance, need_grad) returns (loss, unit): unit = d loss / d ps for a unit
upstream gradient, written in the same pass as the loss (an empty tensor when need_grad is
false). The backward is then one scale: grad * unit.
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def same_dtype(ps: torch.Tensor, pt: torch.Tensor):
    """The kernels take one dtype: a mixed pair runs in the accumulation type of the two."""
    if ps.dtype == pt.dtype:
        return ps, pt
    acc = torch.promote_types(acc_dtype(ps), acc_dtype(pt))
    return ps.to(acc), pt.to(acc)


def need_grad(ps: torch.Tensor) -> bool:
    return ps.requires_grad and torch.is_grad_enabled()


def fake(ps, pt, distance, need_grad):
    unit = torch.empty_like(ps) if need_grad else ps.new_empty((0,))
    return ps.new_empty((), dtype=acc_dtype(ps)), unit


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::sgm")(fake)


def sgm(ps, pt, distance):
    """Validated inputs (equal square shapes); returns the loss."""
    ps, pt = same_dtype(ps, pt)
    return torch.ops.kdkernels.sgm(ps, pt, distance, need_grad(ps))[0]
