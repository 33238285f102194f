"""Structure loss on the compiled extension (CPU C++ kernel).

kdkernels::structure(logits, mask, need_grad) returns (loss, unit): unit = d loss / d logits for
a unit upstream gradient, computed in the forward pass while each image is in cache (contiguous,
float32, or float64 for float64 logits; empty when need_grad is False). The backward is a
scale by the upstream gradient. unit stays in float32 for 16-bit logits: per pixel it is about
1 / (images * H * W), below float16's normal range, which a loss scale would only restore after
the rounding.
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _fake_forward(logits, mask, need_grad):
    acc = _acc_dtype(logits)
    unit = logits.new_empty(logits.shape if need_grad else (0,), dtype=acc)
    return logits.new_empty((), dtype=acc), unit


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::structure")(_fake_forward)


def structure(logits, mask):
    """Validated inputs of one shape; returns the loss (0-dim, float32 or float64)."""
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    return torch.ops.kdkernels.structure(logits, mask, need_grad)[0]
