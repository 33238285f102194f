"""nn.Module wrappers: one per loss, keyword arguments fixed at construction.

    criterion = kdk.losses.AttentionTransferLoss(p=4.0, reduction="batchmean")
    loss = criterion(student_features, teacher_features)
"""

from __future__ import annotations

import torch
from torch import nn

from kdkernels import functional


class _KDLoss(nn.Module):
    _fn = staticmethod(lambda student, teacher: None)

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self._fn(student, teacher, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


def _module(name: str, fn, signature: str) -> type:
    doc = f"nn.Module form of :func:`kdkernels.{fn.__name__}`: {name}({signature}).\n\n{fn.__doc__}"
    return type(name, (_KDLoss,), {"_fn": staticmethod(fn), "__doc__": doc, "__module__": __name__})


AttentionTransferLoss = _module("AttentionTransferLoss", functional.attention_transfer_loss,
                                "p=2.0, resize='bilinear', reduction='mean', backend='auto'")
ChannelRelationLoss = _module("ChannelRelationLoss", functional.channel_relation_loss,
                              "normalize='l2', distance='mse', tau=1.0, backend='auto'")
PixelRelationLoss = _module("PixelRelationLoss", functional.pixel_relation_loss,
                            "distance='mse', tau=1.0, backend='auto'")
SGMLoss = _module("SGMLoss", functional.sgm_loss, "distance='mse', backend='auto'")
LogitAttentionLoss = _module("LogitAttentionLoss", functional.logit_attention_loss,
                             "tau=2.0, backend='auto'")
PixelKLLoss = _module("PixelKLLoss", functional.pixel_kl_loss,
                      "temperature=4.0, mask=None, backend='auto'")
ChannelWiseKLLoss = _module("ChannelWiseKLLoss", functional.channel_wise_kl_loss,
                            "tau=4.0, backend='auto'")
StructureLoss = _module("StructureLoss", functional.structure_loss, "backend='auto'")

__all__ = [
    "AttentionTransferLoss", "ChannelRelationLoss", "PixelRelationLoss", "SGMLoss",
    "LogitAttentionLoss", "PixelKLLoss", "ChannelWiseKLLoss", "StructureLoss",
]
