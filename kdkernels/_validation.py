"""The one validation layer every public op goes through (SPEC section 2, bad input).

Every message names the op, the argument, what was given and what was expected, so a user can
fix the call without reading our source. Checks use shapes, dtypes and devices only: nothing
here reads tensor values, so validation costs no device synchronisation and traces cleanly
under torch.compile.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def tensor(op: str, name: str, t, ranks: Iterable[int], layout: str) -> None:
    """A floating, non-empty tensor of one of the given ranks; `layout` names the axes."""
    ranks = tuple(ranks)
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ranks:
        _fail(op, f"{name} must be {layout} ({' or '.join(f'{r}-D' for r in ranks)}), "
                  f"got a {t.dim()}-D tensor of shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        _fail(op, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.numel() == 0:
        _fail(op, f"{name} is empty (shape {tuple(t.shape)}); every dimension must be >= 1")


def same_device(op: str, **tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = tensors[names[0]]
    for name in names[1:]:
        if tensors[name].device != first.device:
            _fail(op, f"{names[0]} is on {first.device} but {name} is on {tensors[name].device}; "
                      "move both to the same device")


def same_batch(op: str, student: str, s: torch.Tensor, teacher: str, t: torch.Tensor) -> None:
    if s.shape[0] != t.shape[0]:
        _fail(op, f"{student} and {teacher} must have the same batch size, got "
                  f"{tuple(s.shape)} and {tuple(t.shape)}")


def same_dims(op: str, what: str, dims: slice, student: str, s, teacher: str, t) -> None:
    """Equal sizes on `dims` (e.g. channels, spatial); `what` says which, for the message."""
    if s.shape[dims] != t.shape[dims]:
        _fail(op, f"{student} and {teacher} must have equal {what}, got shapes "
                  f"{tuple(s.shape)} and {tuple(t.shape)}")


def positive(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(op, f"{name} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        _fail(op, f"{name} must be a finite number > 0, got {value!r}")


def choice(op: str, name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        _fail(op, f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def student_teacher(op: str, s_name: str, s, t_name: str, t, ranks, layout: str) -> None:
    """The checks every (student, teacher) pair shares: rank, dtype, emptiness, device, batch.

    One expression for the common case of valid inputs (it runs on every call of every loss);
    the checks below it name what is wrong."""
    if (isinstance(s, torch.Tensor) and isinstance(t, torch.Tensor) and s.dim() in ranks
            and t.dim() == s.dim() and s.dtype in FLOAT_DTYPES and t.dtype in FLOAT_DTYPES
            and s.numel() and t.numel() and s.shape[0] == t.shape[0] and s.device == t.device):
        return
    tensor(op, s_name, s, ranks, layout)
    tensor(op, t_name, t, ranks, layout)
    same_device(op, **{s_name: s, t_name: t})
    if s.dim() != t.dim():
        _fail(op, f"{s_name} and {t_name} must have the same rank, got shapes "
                  f"{tuple(s.shape)} and {tuple(t.shape)}")
    same_batch(op, s_name, s, t_name, t)
