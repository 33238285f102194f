"""HLFD: hierarchical layer-selective feedback distillation, UNet++ teacher -> ResNet-18 UNet student.

Wired as the released code (`train_kd.py`, branch `recursive_feedback_ours`) and SPEC section 4:
L = L_seg + 0.1 * L_pixel + 0.9 * L_feature, L_seg = 0.5 focal (gamma 2) + 0.5 soft Dice (MONAI's
DiceFocalLoss), e1..e5 the encoder stages (strides 2..32), d5..d2 the decoder stages (16..2):
- L_feature = 0.5 * AT(s_e1 <- concat(t_e2, t_e3, t_e4) brought to s_e1's resolution)
            + 0.5 * sum_{k=2..4} AT(s_ek <- t_e5)          (p = 4, bilinear, batchmean);
- L_pixel = 0.5 * KL(s_d5 <- concat(t_d5, t_d4, t_d3) at s_d5's resolution)
          + 0.5 * sum_{k=4,3,2} KL(s_dk <- the teacher's output logits)          (T = 4).
The student stages reach the teacher's channels through learnable 1x1 adapters registered as
student-side modules (the released code builds a fresh random conv at every call, so its
"projection" is noise that never learns).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceFocalLoss

import kdkernels as kdk
from models.recipes.base import Recipe, Sizes
from models.unet import hlfd_student, hlfd_teacher

PIXEL_WEIGHT, FEATURE_WEIGHT = 0.1, 0.9
AT_P, KL_T = 4.0, 4.0

_seg_loss = DiceFocalLoss(sigmoid=True, gamma=2.0, lambda_dice=0.5, lambda_focal=0.5)


def segmentation_loss(out, mask, backend):
    return _seg_loss(out.logits, mask)


def pooled_to(x: torch.Tensor, size) -> torch.Tensor:
    """Resize to `size`; stages differ by powers of two, so shrinking is exact average pooling."""
    if x.shape[-1] >= size[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class HLFD(Recipe):
    name = "hlfd"
    task = "segmentation"
    teacher_network = "UNet++ (ResNet-34)"
    ops = ("attention_transfer_loss", "pixel_kl_loss")
    terms = ("feature", "pixel")
    lr = 1e-3
    default = Sizes(train=320, test=80, image_size=128, batch_size=8, teacher_epochs=6,
                    student_epochs=3)
    quick = Sizes(train=24, test=8, image_size=64, batch_size=4, teacher_epochs=1, student_epochs=1)

    def teacher(self, num_classes):
        return hlfd_teacher()

    def student(self, num_classes):
        return hlfd_student()

    def kd_modules(self, teacher, student):
        d5, *finer = student.decoder_channels
        to_teacher = nn.Conv2d(d5, sum(teacher.decoder_channels[:3]), 1)  # s_d5 -> [t_d5, t_d4, t_d3]
        to_logit = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in finer)       # s_d4..s_d2 -> the output
        return nn.ModuleDict({"to_logit": to_logit, "to_teacher": to_teacher})

    task_loss = staticmethod(segmentation_loss)

    def logits(self, out):
        return out.logits

    def kd_inputs(self, out):
        return out.encoder[:4] + out.decoder  # s_e1..s_e4, s_d5..s_d2

    def kd_terms(self, student, t, modules, y, backend):
        (e1, *middle), (d5, *finer) = student[:4], student[4:]
        terms = {}
        if "feature" in self.active:
            def at(s, target):
                return kdk.attention_transfer_loss(s, target, p=AT_P, resize="bilinear",
                                                   reduction="batchmean", backend=backend)

            recursive = torch.cat([pooled_to(f, e1.shape[-2:]) for f in t.encoder[1:4]], 1)
            terms["feature"] = FEATURE_WEIGHT * 0.5 * (
                at(e1, recursive) + sum(at(s, t.encoder[4]) for s in middle))
        if "pixel" in self.active:
            def kl(s, target):
                return kdk.pixel_kl_loss(s, target, temperature=KL_T, backend=backend)

            recursive = torch.cat([pooled_to(f, d5.shape[-2:]) for f in t.decoder[:3]], 1)
            terms["pixel"] = PIXEL_WEIGHT * 0.5 * (
                kl(modules["to_teacher"](d5), recursive)
                + sum(kl(adapter(d), pooled_to(t.logits, d.shape[-2:]))
                      for adapter, d in zip(modules["to_logit"], finer)))
        return terms
