"""Channel relation on the compiled extension (CPU C++ and CUDA C++ kernels).

kdkernels::channel_relation returns (loss, grad_gram, row_stats): grad_gram = d loss / d G_s
(B x C x C) for a unit upstream gradient, row_stats the per-row normalisation statistics
(B x C x 2). The backward rebuilds the student's normalised rows from row_stats and applies
grad_gram: kdkernels::channel_relation_backward, one pass over fs.
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


def acc_dtype(fs: torch.Tensor) -> torch.dtype:
    return torch.float64 if fs.dtype == torch.float64 else torch.float32


def _fake_forward(fs, ft, normalize, distance, tau):
    b, c = fs.shape[0], fs.shape[1]
    loss = fs.new_empty((), dtype=acc_dtype(fs))
    grad_gram = fs.new_empty((b, c, c), dtype=acc_dtype(fs))
    row_stats = fs.new_empty((b, c, 2), dtype=acc_dtype(fs))
    return loss, grad_gram, row_stats


def _fake_backward(grad, fs, grad_gram, row_stats, normalize, tau):
    return torch.empty_like(fs)


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::channel_relation")(_fake_forward)
    torch.library.register_fake("kdkernels::channel_relation_backward")(_fake_backward)


def channel_relation(fs, ft, normalize, distance, tau):
    """Validated inputs (equal shapes); returns the loss. A float64/other mix runs in float64."""
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    return torch.ops.kdkernels.channel_relation(fs, ft, normalize, distance, float(tau))[0]
