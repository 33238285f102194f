"""Benchmark cases: one Case per (op, shape set). A new op adds rows to CASES.

A case names the public op, the shapes of its inputs (resolved for the device and --quick), the
keyword arguments of the call, how to build the inputs and how many bytes a mode must move
(the "bytes moved" model behind the GB/s column).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def feature_pair(shapes: dict, device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(student, teacher) feature maps, N(0, 1); the student requires a gradient."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(shapes["student"], generator=g, dtype=torch.float32)
    ft = torch.randn(shapes["teacher"], generator=g, dtype=torch.float32)
    fs = fs.to(device=device, dtype=dtype).requires_grad_(True)
    return fs, ft.to(device=device, dtype=dtype)


def student_teacher_bytes(shapes: dict, itemsize: int) -> dict:
    """fwd reads student + teacher once; bwd reads the student and writes its gradient."""
    numel = {name: _numel(shape) for name, shape in shapes.items()}
    fwd = (numel["student"] + numel["teacher"]) * itemsize
    bwd = 2 * numel["student"] * itemsize
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class Case:
    op: str                      # public function in kdkernels (and kdkernels.reference)
    name: str                    # short label of the shape set
    shapes: dict                 # input name -> shape, first input is the one with the gradient
    kwargs: dict = field(default_factory=dict)
    make_inputs: Callable = feature_pair            # (shapes, device, dtype) -> args tuple
    bytes_model: Callable = student_teacher_bytes   # (shapes, itemsize) -> {mode: bytes}

    def inputs(self, device, dtype: torch.dtype) -> tuple:
        return self.make_inputs(self.shapes, device, dtype)

    def bytes_moved(self, dtype: torch.dtype) -> dict:
        return self.bytes_model(self.shapes, torch.empty((), dtype=dtype).element_size())


# Table rows: op, name, student (C, H, W), teacher (C, H, W), kwargs, B on GPU, B on CPU,
# the --quick shapes (student, teacher, B = 1) and, optionally, a dict of further Case fields
# (make_inputs, bytes_model) for ops whose inputs are not two feature maps. Sizes: SPEC section 5.
_AT = "attention_transfer_loss"
CASES = [
    # KDAS features: student 32 x 88 x 88 against teacher 64 x 88 x 88 (no resize needed).
    (_AT, "kdas_features", (32, 88, 88), (64, 88, 88),
     dict(p=2.0, resize="bilinear", reduction="mean"), 16, 2,
     ((8, 32, 32), (16, 32, 32))),
    # HLFD feature level: student stage 896 x 192 x 192 resized to the teacher's 24 x 24.
    (_AT, "hlfd_at", (896, 192, 192), (1024, 24, 24),
     dict(p=4.0, resize="bilinear", reduction="batchmean"), 8, 2,
     ((56, 64, 64), (64, 8, 8))),
    # The acceptance case, B = 8 on every device.
    (_AT, "acceptance_b8", (64, 88, 88), (64, 88, 88),
     dict(p=2.0, resize="bilinear", reduction="mean"), 8, 8,
     ((16, 32, 32), (16, 32, 32))),
]


def cases(device_kind: str, quick: bool = False, ops=None) -> list[Case]:
    """The cases for a device kind ("cpu" or "cuda"), optionally only the listed ops."""
    out = []
    for op, name, student, teacher, kwargs, b_gpu, b_cpu, small, *extra in CASES:
        if ops and op not in ops:
            continue
        if quick:
            batch, (student, teacher) = 1, small
        else:
            batch = b_cpu if device_kind == "cpu" else b_gpu
        shapes = {"student": (batch, *student), "teacher": (batch, *teacher)}
        out.append(Case(op, name, shapes, dict(kwargs), **(extra[0] if extra else {})))
    return out


def known_ops() -> list[str]:
    return sorted({row[0] for row in CASES})
