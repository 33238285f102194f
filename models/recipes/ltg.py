"""Learning Through Guidance: several classifier teachers guide a 52 k-parameter student.

L = CE(student) + response KL (T = 4, against the teachers' mean logits, through pixel_kl_loss with
H = W = 1) + hint MSE (student embedding, through a linear adapter, against the attention fusion of
the teachers' embeddings) + relation (the batch's pairwise cosine-similarity matrix of the student
embeddings against that of the fused embedding, through pixel_relation_loss on a 1 x D x B x 1
view). The fusion trains alongside with a cross-entropy head of its own (see AttentionFusion).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdkernels as kdk
from models.classifiers import AttentionFusion, TeacherEnsemble, TinyStudent
from models.recipes.base import Recipe, Sizes

KL_T = 4.0
RESPONSE_WEIGHT, HINT_WEIGHT, RELATION_WEIGHT = 1.0, 1.0, 1.0


def _as_pixels(emb: torch.Tensor) -> torch.Tensor:
    """B x D embeddings as one D-channel map of B pixels: pixel relations are then sample relations."""
    return emb.t().unsqueeze(0).unsqueeze(-1)


class LTG(Recipe):
    name = "ltg"
    task = "classification"
    ops = ("pixel_kl_loss", "pixel_relation_loss")
    lr = 2e-3
    teacher_lr = 1e-3
    default = Sizes(train=640, test=160, image_size=64, batch_size=32, teacher_epochs=16,
                    student_epochs=8)
    quick = Sizes(train=64, test=16, image_size=32, batch_size=16, teacher_epochs=1, student_epochs=1)

    def teacher(self, num_classes):
        return TeacherEnsemble(num_classes)

    def student(self, num_classes):
        return TinyStudent(num_classes)

    def kd_modules(self, teacher, student):
        fusion = AttentionFusion(teacher.embed_dims, student.fc.out_features)
        hint = nn.Linear(student.embed_dim, fusion.fc.in_features)
        return nn.ModuleDict({"fusion": fusion, "hint": hint})

    def teacher_loss(self, outs, y, backend):
        return sum(F.cross_entropy(logits, y) for logits, _ in outs)

    def task_loss(self, out, y, backend):
        return F.cross_entropy(out[0], y)

    def teacher_logits(self, outs):
        return torch.stack([logits for logits, _ in outs]).mean(0)

    def logits(self, out):
        return out[0]

    def kd_inputs(self, out):
        return list(out)

    def kd_loss(self, student, teacher_out, modules, y, backend):
        logits, emb = student
        fused, fused_logits = modules["fusion"]([e for _, e in teacher_out])
        target = fused.detach()  # the fusion learns from the labels, not from the student
        # Its classifier head lets the fused embedding's scale grow without bound (the hint MSE
        # reached ~800 and swamped CE): the hint matches the layer-normalised embedding instead.
        response = kdk.pixel_kl_loss(logits, self.teacher_logits(teacher_out), temperature=KL_T,
                                     backend=backend)
        hint = F.mse_loss(modules["hint"](emb), F.layer_norm(target, target.shape[-1:]))
        relation = kdk.pixel_relation_loss(_as_pixels(emb), _as_pixels(target), backend=backend)
        return (F.cross_entropy(fused_logits, y) + RESPONSE_WEIGHT * response
                + HINT_WEIGHT * hint + RELATION_WEIGHT * relation)
