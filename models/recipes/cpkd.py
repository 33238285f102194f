"""CPKD: channel-wise and pixel-wise relational distillation, UNet++ teacher -> ResNet-18 UNet.

L = L_seg + l_c * channel_relation + l_p * pixel_relation (SPEC section 4), on the decoder stages
at strides 16 and 8, the student's stages mapped onto the teacher's channels by learnable 1x1
adapters (channel relations compare C x C matrices, so the counts must match). SPEC leaves l_c and
l_p open: 1 each, the relation losses being means of squared cosine differences, order 0.01-0.1
early in training, like the Dice/focal task loss's gradient scale near convergence.
"""

from __future__ import annotations

import torch.nn as nn

import kdkernels as kdk
from models.recipes.base import Recipe, Sizes
from models.recipes.hlfd import segmentation_loss
from models.unet import hlfd_student, hlfd_teacher

CHANNEL_WEIGHT, PIXEL_WEIGHT = 1.0, 1.0
STAGES = (0, 1)  # decoder stages at strides 16 and 8


class CPKD(Recipe):
    name = "cpkd"
    task = "segmentation"
    teacher_network = "UNet++ (ResNet-34)"
    ops = ("channel_relation_loss", "pixel_relation_loss")
    terms = ("channel", "pixel")
    lr = 1e-3
    default = Sizes(train=320, test=80, image_size=128, batch_size=8, teacher_epochs=6,
                    student_epochs=3)
    quick = Sizes(train=24, test=8, image_size=64, batch_size=4, teacher_epochs=1, student_epochs=1)

    def teacher(self, num_classes):
        return hlfd_teacher()

    def student(self, num_classes):
        return hlfd_student()

    def kd_modules(self, teacher, student):
        return nn.ModuleList(nn.Conv2d(student.decoder_channels[i], teacher.decoder_channels[i], 1,
                                       bias=False) for i in STAGES)

    task_loss = staticmethod(segmentation_loss)

    def logits(self, out):
        return out.logits

    def kd_inputs(self, out):
        return [out.decoder[i] for i in STAGES]

    def kd_terms(self, student, t, modules, y, backend):
        pairs = [(adapter(s), t.decoder[i]) for adapter, s, i in zip(modules, student, STAGES)]
        terms = {}
        if "channel" in self.active:
            terms["channel"] = CHANNEL_WEIGHT * sum(kdk.channel_relation_loss(fs, ft, backend=backend)
                                                    for fs, ft in pairs)
        if "pixel" in self.active:
            terms["pixel"] = PIXEL_WEIGHT * sum(kdk.pixel_relation_loss(fs, ft, backend=backend)
                                                for fs, ft in pairs)
        return terms
