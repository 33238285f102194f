"""What a recipe provides to the trainer (models/engine.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Sizes:
    """A run's budget: data, resolution and epochs (students share one budget)."""

    train: int           # synthetic training samples
    test: int            # synthetic held-out samples
    image_size: int
    batch_size: int
    teacher_epochs: int
    student_epochs: int


class Recipe:
    """Networks and losses of one method. The trainer calls, per distillation step:
    out = student(x); kd_in = kd_inputs(out); task_loss(out, y) and kd_loss(leaves of kd_in, ...),
    so the distillation losses are timed, forward and backward, apart from the networks."""

    name: str
    task: str                 # "segmentation" or "classification"
    ops: tuple[str, ...]      # the kdkernels ops it calls
    terms: tuple[str, ...]    # its distillation terms, each runnable alone (term ablations)
    teacher_network: str      # recipes naming the same one share teacher checkpoints
    task_weight = 1.0         # weight of the task loss while distilling
    lr = 1e-3                 # AdamW peak learning rate of the students
    teacher_lr = 1e-3
    default: Sizes
    quick: Sizes

    def teacher(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def student(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def kd_modules(self, teacher: nn.Module, student: nn.Module) -> nn.Module:
        """Learnable student-side modules of the distillation loss (adapters, fusion): trained with
        the student, not counted in its parameters (they are dropped after training)."""
        return nn.ModuleList()

    def teacher_loss(self, out, y, backend: str) -> torch.Tensor:
        return self.task_loss(out, y, backend)

    def task_loss(self, out, y, backend: str) -> torch.Tensor:
        raise NotImplementedError

    def teacher_logits(self, out) -> torch.Tensor:
        return self.logits(out)

    def logits(self, out) -> torch.Tensor:
        """B x 1 x H x W mask logits or B x K class logits, for evaluation."""
        raise NotImplementedError

    def kd_inputs(self, out) -> list[torch.Tensor]:
        """The student tensors the distillation loss reads."""
        raise NotImplementedError

    def __init__(self, terms: tuple[str, ...] | None = None, kd_scale: float = 1.0):
        """terms: the distillation terms to run (default all: the faithful recipe); kd_scale: a
        factor on all of them (1: the recipe's own weights)."""
        unknown = set(terms or ()) - set(self.terms)
        if unknown:
            raise ValueError(f"terms {sorted(unknown)}: not distillation terms of {self.name} "
                             f"(expected some of {list(self.terms)})")
        self.active = tuple(terms) if terms else self.terms
        self.kd_scale = kd_scale

    def kd_terms(self, student: list[torch.Tensor], teacher_out, modules: nn.Module, y,
                 backend: str) -> dict[str, torch.Tensor]:
        """The active distillation terms, each weighted as the recipe defines it, from kd_inputs'
        tensors (as leaves) and the teacher's output; inactive terms are not computed."""
        raise NotImplementedError

    def kd_loss(self, student: list[torch.Tensor], teacher_out, modules: nn.Module, y,
                backend: str) -> torch.Tensor:
        loss = sum(self.kd_terms(student, teacher_out, modules, y, backend).values())
        return loss if self.kd_scale == 1.0 else self.kd_scale * loss
