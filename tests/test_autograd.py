"""The autograd of every fused op (C++ Autograd kernels for cpu/cuda, the eager Function of the
Triton backend): the upstream gradient reaches the kernels, the teacher never gets a gradient, an
unused loss or a no_grad call costs nothing and breaks nothing, and a retained graph gives the
same gradient twice (nothing is scaled in place)."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import assert_close_rel, devices, fused_backends, op_inputs

# op -> (student shape, teacher shape, keywords): small and odd, one per op.
CASES = {
    "attention_transfer_loss": ((2, 3, 5, 7), (2, 4, 4, 6), {}),
    "channel_relation_loss": ((2, 3, 5, 7), (2, 3, 5, 7), {"normalize": "softmax", "distance": "kl"}),
    "pixel_relation_loss": ((2, 3, 5, 7), (2, 4, 5, 7), {}),
    "sgm_loss": ((2, 1, 7, 7), (2, 1, 7, 7), {}),
    "logit_attention_loss": ((2, 1, 6, 5), (2, 1, 6, 5), {}),
    "pixel_kl_loss": ((2, 3, 5, 7), (2, 3, 5, 7), {}),
    "channel_wise_kl_loss": ((2, 3, 5, 7), (2, 3, 5, 7), {}),
    "structure_loss": ((2, 1, 9, 7), (2, 1, 9, 7), {}),
}
TARGETS = [(op, b, d) for op in CASES for d in devices() for b in fused_backends(op, d)]
IDS = [f"{op.removesuffix('_loss')}-{b}-{d}" for op, b, d in TARGETS]


def _inputs(op, device):
    s_shape, t_shape, kw = CASES[op]
    student, teacher = op_inputs(op, s_shape, t_shape, device, seed=5)
    return student.requires_grad_(True), teacher, kw


@pytest.mark.parametrize("op,backend,device", TARGETS, ids=IDS)
def test_upstream_gradient_scales(op, backend, device):
    student, teacher, kw = _inputs(op, device)
    fn = getattr(kdk, op)
    (unit,) = torch.autograd.grad(fn(student, teacher, backend=backend, **kw), student)
    (scaled,) = torch.autograd.grad(-0.37 * fn(student, teacher, backend=backend, **kw), student)
    assert_close_rel(scaled, -0.37 * unit, 1e-6, "gradient of -0.37 * loss")


@pytest.mark.parametrize("op,backend,device", TARGETS, ids=IDS)
def test_teacher_gets_no_gradient(op, backend, device):
    student, teacher, kw = _inputs(op, device)
    teacher.requires_grad_(True)
    loss = getattr(kdk, op)(student, teacher, backend=backend, **kw)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("op,backend,device", TARGETS, ids=IDS)
def test_unused_loss_and_no_grad(op, backend, device):
    student, teacher, kw = _inputs(op, device)
    fn = getattr(kdk, op)
    unused = fn(student, teacher, backend=backend, **kw)
    (student * student).sum().backward()  # the graph of `unused` is never run
    assert unused.requires_grad
    assert_close_rel(student.grad, 2 * student.detach(), 0, "the other loss's gradient")
    with torch.no_grad():
        quiet = fn(student, teacher, backend=backend, **kw)
    assert quiet.grad_fn is None and not quiet.requires_grad
    assert_close_rel(quiet, unused.detach(), 1e-6, "no_grad loss")


@pytest.mark.parametrize("op,backend,device", TARGETS, ids=IDS)
def test_retained_graph_gives_the_same_gradient_twice(op, backend, device):
    student, teacher, kw = _inputs(op, device)
    loss = 2.5 * getattr(kdk, op)(student, teacher, backend=backend, **kw)
    (first,) = torch.autograd.grad(loss, student, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student)
    assert torch.equal(first, second)
