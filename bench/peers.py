"""Other libraries' kernels for the same math, timed beside ours.

A peer is a factory: peer(kwargs) -> f(*case inputs) -> loss, raising ImportError (with what to
install) when its library is missing. Cases name their peers (bench/cases.py, `peers`).
Peers are benchmark-only dependencies: `pip install -e .[bench]` or scripts/fetch_peers.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# Peers unpacked by scripts/fetch_peers.sh (for machines where nothing can be pip-installed);
# an installed copy elsewhere on sys.path wins.
_VENDORED = Path(__file__).resolve().parent.parent / ".peers"
if _VENDORED.is_dir():
    sys.path.append(str(_VENDORED))


def liger_pixel_kl(kwargs: dict):
    """Liger-Kernel's KL divergence (Triton) on the (rows, classes) layout it expects.

    The NCHW logits are permuted to (B*H*W, K) rows and turned into log-probabilities with
    torch.log_softmax, both counted in its time: that is what a user of Liger writes for
    per-pixel distillation. batchmean over rows = mean over pixels, times T^2 as in the SPEC.
    """
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError as exc:
        raise ImportError(f"liger-kernel is not installed ({exc}): pip install liger-kernel") from exc
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    temperature = kwargs["temperature"]

    def run(zs, zt):
        k = zs.shape[1]
        log_ps = torch.log_softmax(zs.movedim(1, -1).reshape(-1, k).float() / temperature, dim=-1)
        log_pt = torch.log_softmax(zt.movedim(1, -1).reshape(-1, k).float() / temperature, dim=-1)
        return kl(log_ps, log_pt) * temperature**2

    return run


# label -> (factory, device types it runs on). A case lists the peers that compute its math.
PEERS = {"liger": (liger_pixel_kl, ("cuda",))}
