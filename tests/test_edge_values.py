"""Edge values on every backend: non-finite inputs propagate, all-zero features give the documented
finite result, a mask that selects nothing is refused (docs/README.md "Edge values")."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import assert_close_rel, devices, fused_backends, loss_and_grad

# (op, kwargs, student shape, teacher shape): every option that changes the arithmetic.
CASES = [
    ("attention_transfer_loss", {}, (2, 3, 5, 6), (2, 4, 5, 6)),
    ("attention_transfer_loss", {"resize": "bilinear", "p": 1.0}, (2, 3, 4, 3), (2, 2, 5, 6)),
    ("channel_relation_loss", {"distance": "mse"}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("channel_relation_loss", {"distance": "kl"}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("channel_relation_loss", {"normalize": "softmax"}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("pixel_relation_loss", {"distance": "mse"}, (2, 3, 5, 6), (2, 4, 5, 6)),
    ("pixel_relation_loss", {"distance": "kl"}, (2, 3, 5, 6), (2, 4, 5, 6)),
    ("sgm_loss", {"distance": "mse"}, (2, 3, 5, 5), (2, 3, 5, 5)),
    ("sgm_loss", {"distance": "l1"}, (2, 5, 5), (2, 5, 5)),
    ("logit_attention_loss", {}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("pixel_kl_loss", {}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("pixel_kl_loss", {}, (2, 1, 5, 6), (2, 1, 5, 6)),
    ("pixel_kl_loss", {}, (4, 7), (4, 7)),
    ("channel_wise_kl_loss", {}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("structure_loss", {}, (2, 1, 6, 7), (2, 1, 6, 7)),
]
IDS = [f"{op}-{'-'.join(map(str, kw.values())) or 'default'}-{len(s)}d" for op, kw, s, _ in CASES]


def _targets(op):
    return [(b, d) for d in devices() for b in ["torch"] + fused_backends(op, d)]


def _inputs(op, s_shape, t_shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(s_shape, generator=g)
    if op == "structure_loss":
        teacher = (torch.rand(t_shape, generator=g) > 0.5).float()
    else:
        teacher = torch.randn(t_shape, generator=g)
    return student.to(device), teacher.to(device)


def _poison(x, value, index):
    x = x.clone()
    x.view(-1)[index % x.numel()] = value
    return x


@pytest.mark.parametrize("op,kw,s_shape,t_shape", CASES, ids=IDS)
@pytest.mark.parametrize("where,value", [("student", float("nan")), ("student", float("inf")),
                                         ("teacher", float("nan")), ("teacher", float("inf"))],
                         ids=["nan-student", "inf-student", "nan-teacher", "inf-teacher"])
def test_non_finite_propagates(op, kw, s_shape, t_shape, where, value):
    """One non-finite entry makes the loss non-finite (never silently zeroed); a NaN in the student
    makes its gradient non-finite too. structure_loss's teacher is the mask: NaN there propagates
    as well. (-inf is left out: inside a softmax it is a legitimate zero probability.)"""
    fn = getattr(kdk, op)
    for backend, device in _targets(op):
        fs, ft = _inputs(op, s_shape, t_shape, device)
        if where == "student":
            fs = _poison(fs, value, 17)
        else:
            ft = _poison(ft, value, 17)
        loss, grad = loss_and_grad(fn, fs, ft, backend=backend, **kw)
        assert not torch.isfinite(loss), f"{backend}-{device}: finite loss {loss.item()}"
        # Not sgm's "l1", whose gradient is a sign; an infinite logit may saturate a sigmoid
        # (pixel_kl's K = 1, structure_loss) and leave a finite gradient.
        if where == "student" and value != value and kw.get("distance") != "l1":
            assert not torch.isfinite(grad).all(), f"{backend}-{device}: gradient all finite"


@pytest.mark.parametrize("device", devices())
def test_nan_in_excluded_pixel_is_ignored(device):
    """pixel_kl's mask excludes a pixel entirely: NaN there changes nothing."""
    zs, zt = _inputs("pixel_kl_loss", (2, 3, 5, 6), (2, 3, 5, 6), device)
    mask = torch.ones(2, 5, 6, dtype=torch.bool, device=device)
    mask[1, 2, 3] = False
    nan_s, nan_t = zs.clone(), zt.clone()
    nan_s[1, :, 2, 3] = float("nan")
    nan_t[1, 0, 2, 3] = float("nan")
    for backend in ["torch"] + fused_backends("pixel_kl_loss", device):
        loss, grad = loss_and_grad(kdk.pixel_kl_loss, nan_s, nan_t, mask=mask, backend=backend)
        ref, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs, zt, mask=mask)
        assert_close_rel(loss, ref, 1e-6, backend)
        assert torch.equal(grad[1, :, 2, 3], torch.zeros_like(grad[1, :, 2, 3])), backend
        assert_close_rel(grad, ref_grad, 1e-5, backend)


def _zero_cases():
    return [c for c in CASES if c[0] != "structure_loss"]


@pytest.mark.parametrize("op,kw,s_shape,t_shape", _zero_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("zero", ["student", "teacher", "both"])
def test_all_zero_features(op, kw, s_shape, t_shape, zero):
    """All-zero inputs: finite loss and gradient on every backend, equal to the reference, and
    equal to what the formulas give with normalize(0) = 0 (eps) where that is simple:
    both zero -> identical inputs -> 0; a zero side of a normalised map or Gram is all zeros."""
    fn = getattr(kdk, op)
    fs0, ft0 = _inputs(op, s_shape, t_shape, "cpu", seed=1)
    fs = torch.zeros_like(fs0) if zero in ("student", "both") else fs0
    ft = torch.zeros_like(ft0) if zero in ("teacher", "both") else ft0
    ref, ref_grad = loss_and_grad(kdk.reference.__dict__[op], fs.double(), ft.double(), **kw)
    if zero == "both":
        assert ref == 0
    elif op == "attention_transfer_loss" and kw.get("reduction", "mean") == "mean" \
            and s_shape[-2:] == t_shape[-2:]:
        # a(0) = 0 and the other map is a unit vector per sample: sum = B, mean over B * N.
        assert ref.item() == pytest.approx(1 / (t_shape[-1] * t_shape[-2]), rel=1e-12)
    elif op in ("channel_relation_loss", "pixel_relation_loss") and kw.get("distance") == "mse" \
            and kw.get("normalize", "l2") == "l2":
        other = (ft if zero == "student" else fs).double()
        rows = other.flatten(2) if op == "channel_relation_loss" else other.flatten(2).transpose(1, 2)
        unit = torch.nn.functional.normalize(rows, dim=2)
        assert ref.item() == pytest.approx((unit @ unit.transpose(1, 2)).pow(2).mean().item(),
                                           rel=1e-12)
    for backend, device in _targets(op):
        loss, grad = loss_and_grad(fn, fs.to(device), ft.to(device), backend=backend, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"{backend}-{device}"
        assert_close_rel(loss, ref, 1e-5, f"{backend}-{device} loss")
        # Where the true gradient is 0 (a normalised map against zeros), float32 leaves ~1e-10.
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-7,
                                   msg=lambda m: f"{backend}-{device} gradient: {m}")


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (4, 7), (3, 1, 4, 4)], ids=str)
def test_all_false_mask_raises(shape):
    zs, zt = _inputs("pixel_kl_loss", shape, shape, "cpu")
    mask = torch.zeros((shape[0],) + shape[2:], dtype=torch.bool)
    for backend in ["torch"] + fused_backends("pixel_kl_loss", "cpu"):
        with pytest.raises(ValueError, match=r"mask selects no pixel .*shape \("):
            kdk.pixel_kl_loss(zs, zt, mask=mask, backend=backend)
    # One counted pixel is enough: the mean over that pixel alone.
    mask.view(-1)[-1] = True
    for backend in ["torch"] + fused_backends("pixel_kl_loss", "cpu"):
        loss = kdk.pixel_kl_loss(zs, zt, mask=mask, backend=backend)
        one = kdk.reference.pixel_kl_loss(zs.movedim(1, -1).flatten(0, -2)[-1:],
                                          zt.movedim(1, -1).flatten(0, -2)[-1:])
        assert_close_rel(loss, one, 1e-5, backend)


def test_all_false_mask_inside_compile_is_nan():
    """The emptiness check needs the mask's values: torch.compile skips it (documented)."""
    zs, zt = _inputs("pixel_kl_loss", (2, 3, 4, 4), (2, 3, 4, 4), "cpu")
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    compiled = torch.compile(lambda a, b, m: kdk.pixel_kl_loss(a, b, mask=m, backend="torch"),
                             backend="eager", fullgraph=True)
    assert torch.isnan(compiled(zs, zt, mask))
