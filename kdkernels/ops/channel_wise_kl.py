"""Channel-wise KL (CWD) on the compiled extension (CPU C++ kernels).

kdkernels::channel_wise_kl returns (loss, stats): stats (B, C, STATS) holds per (b, c) row the
maxima and log-sums of the spatial softmaxes and delta = lse_s - lse_t, from which
kdkernels::channel_wise_kl_backward
recomputes p_s - p_t in one pass over fs and ft (see csrc/cpu/channel_wise_kl.cpp for why the
forward does not save a full-size unit gradient instead).
"""

from __future__ import annotations

import torch

from kdkernels import _dispatch


# (m_t, log z_t, m_s, log z_s, delta) per row: csrc/cpu/channel_wise_kl.cpp says why lse is split.
STATS = 5


def acc_dtype(fs: torch.Tensor) -> torch.dtype:
    return torch.float64 if fs.dtype == torch.float64 else torch.float32


def _fake_forward(fs, ft, tau):
    acc = acc_dtype(fs)
    return fs.new_empty((), dtype=acc), fs.new_empty((fs.shape[0], fs.shape[1], STATS), dtype=acc)


def _fake_backward(grad, fs, ft, stats, tau):
    return torch.empty_like(fs)


if _dispatch._STATUS["cpu"]["available"]:
    torch.library.register_fake("kdkernels::channel_wise_kl")(_fake_forward)
    torch.library.register_fake("kdkernels::channel_wise_kl_backward")(_fake_backward)


def channel_wise_kl(fs, ft, tau):
    """Validated inputs of equal shapes; returns the loss. A float64/other mix runs in float64."""
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    return torch.ops.kdkernels.channel_wise_kl(fs, ft, float(tau))[0]
