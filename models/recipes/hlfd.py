"""HLFD: hierarchical layer-selective feedback distillation, UNet++ teacher -> ResNet-18 UNet student.

L = L_seg + 0.1 * L_pixel + 0.9 * L_feature (SPEC section 4), L_seg = 0.5 focal (gamma 2)
+ 0.5 soft Dice (MONAI's DiceFocalLoss).
- feature level: attention transfer (p = 4, bilinear, batchmean) from the teacher's deepest encoder
  stage to every student encoder stage, and from all teacher encoder stages, pooled to the smallest
  and concatenated, to the student's first stage;
- pixel level: per-pixel KL (T = 4) from the teacher's output logits to every student decoder stage,
  and from the concatenated teacher decoder stages to the student's last decoder stage.
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
    ops = ("attention_transfer_loss", "pixel_kl_loss")
    lr = 1e-3
    default = Sizes(train=320, test=80, image_size=128, batch_size=8, teacher_epochs=6,
                    student_epochs=3)
    quick = Sizes(train=24, test=8, image_size=64, batch_size=4, teacher_epochs=1, student_epochs=1)

    def teacher(self, num_classes):
        return hlfd_teacher()

    def student(self, num_classes):
        return hlfd_student()

    def kd_modules(self, teacher, student):
        to_logit = nn.ModuleList(nn.Conv2d(c, 1, 1) for c in student.decoder_channels)
        to_teacher = nn.Conv2d(student.decoder_channels[-1], sum(teacher.decoder_channels), 1)
        return nn.ModuleDict({"to_logit": to_logit, "to_teacher": to_teacher})

    task_loss = staticmethod(segmentation_loss)

    def logits(self, out):
        return out.logits

    def kd_inputs(self, out):
        return out.encoder + out.decoder

    def kd_loss(self, student, t, modules, y, backend):
        encoder, decoder = student[:4], student[4:]

        def at(s, target):
            return kdk.attention_transfer_loss(s, target, p=AT_P, resize="bilinear",
                                               reduction="batchmean", backend=backend)

        deepest = t.encoder[-1]
        stacked = torch.cat([pooled_to(f, deepest.shape[-2:]) for f in t.encoder], 1)
        feature = sum(at(s, deepest) for s in encoder) + at(encoder[0], stacked)

        def kl(s, target):
            return kdk.pixel_kl_loss(s, target, temperature=KL_T, backend=backend)

        pixel = sum(kl(adapter(d), pooled_to(t.logits, d.shape[-2:]))
                    for adapter, d in zip(modules["to_logit"], decoder))
        last = decoder[-1]
        recursive = torch.cat([pooled_to(f, last.shape[-2:]) for f in t.decoder], 1)
        pixel = pixel + kl(modules["to_teacher"](last), recursive)
        return PIXEL_WEIGHT * pixel + FEATURE_WEIGHT * feature
