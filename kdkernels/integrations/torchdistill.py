"""torchdistill integration: one mid-level loss per kdkernels loss, usable by name in YAML configs.

    import kdkernels.integrations.torchdistill  # registers KDKAttentionTransferLoss, ...

Each registered class is named "KDK" + the nn.Module's name in :mod:`kdkernels.losses`
(KDKAttentionTransferLoss, KDKChannelRelationLoss, KDKPixelRelationLoss, KDKSGMLoss,
KDKLogitAttentionLoss, KDKPixelKLLoss, KDKChannelWiseKLLoss, KDKStructureLoss). It takes `pairs`,
the structure of torchdistill's ATLoss `at_pairs`:

    pairs:
      layer3:
        student: {io: output, path: layer3}
        teacher: {io: output, path: layer3}
        weight: 1

plus the op's keyword arguments (p, reduction, tau, backend, ...), and returns the weighted sum
over the pairs. A pair without a `teacher` entry compares the student's tensor with the training
targets (KDKStructureLoss: logits against the ground-truth mask).
"""

from __future__ import annotations

import torch
from torch import nn
from torchdistill.losses.registry import register_mid_level_loss

from kdkernels import losses

__all__ = [f"KDK{name}" for name in losses.__all__]


def _io_tensor(io_dict: dict, side: dict) -> torch.Tensor:
    return io_dict[side["path"]][side["io"]]


class _PairedLoss(nn.Module):
    _criterion_cls = nn.Module

    def __init__(self, pairs: dict, **kwargs):
        super().__init__()
        if not pairs:
            raise ValueError(f"{type(self).__name__}: pairs is empty; give at least one "
                             "{name: {student: {io, path}, teacher: {io, path}, weight}}")
        self.pairs = pairs
        self.criterion = self._criterion_cls(**kwargs)

    def forward(self, student_io_dict, teacher_io_dict, targets=None, *args, **kwargs):
        total = 0
        for name, pair in self.pairs.items():
            student = _io_tensor(student_io_dict, pair["student"])
            if "teacher" in pair:
                teacher = _io_tensor(teacher_io_dict, pair["teacher"])
            elif targets is not None:
                teacher = targets
            else:
                raise ValueError(f"{type(self).__name__}: pair {name!r} has no teacher entry and "
                                 "no targets were passed to compare the student with")
            total = total + pair.get("weight", 1) * self.criterion(student, teacher)
        return total


for _name in losses.__all__:
    _cls = type(f"KDK{_name}", (_PairedLoss,), {
        "_criterion_cls": getattr(losses, _name), "__module__": __name__,
        "__doc__": f"torchdistill mid-level form of :class:`kdkernels.losses.{_name}` over `pairs`.",
    })
    globals()[_cls.__name__] = register_mid_level_loss(_cls)
