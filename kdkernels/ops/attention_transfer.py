"""Attention transfer on the compiled extension (CPU C++ and CUDA C++ kernels).

kdkernels::attention_transfer returns (loss, coeff): coeff = d loss / d m_s for a unit upstream
gradient, m_s the student's channel-mean power map at the teacher's resolution. The backward is
then one pass over the student: kdkernels::attention_transfer_backward.
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


def acc_dtype(fs: torch.Tensor) -> torch.dtype:
    return torch.float64 if fs.dtype == torch.float64 else torch.float32


def _fake_forward(fs, ft, p, reduction):
    loss = fs.new_empty((), dtype=acc_dtype(fs))
    coeff = fs.new_empty((fs.shape[0], ft.shape[-2], ft.shape[-1]), dtype=acc_dtype(fs))
    return loss, coeff


def _fake_backward(grad, fs, coeff, p):
    return torch.empty_like(fs)


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::attention_transfer")(_fake_forward)
    torch.library.register_fake("kdkernels::attention_transfer_backward")(_fake_backward)


def attention_transfer(fs, ft, p, reduction):
    """Validated inputs, equal dtype class (both float64 or neither); returns the loss."""
    return torch.ops.kdkernels.attention_transfer(fs, ft, float(p), reduction)[0]
