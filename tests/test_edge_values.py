"""Edge values on every backend: non-finite inputs propagate, all-zero features give the documented
finite result (docs/README.md "Edge values, determinism, fuzzing"). The all-False pixel_kl mask is
refused: tests/test_validation.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdkernels as kdk
from helpers import (all_backends, assert_close_rel, devices, fused_backends, loss_and_grad,
                     op_inputs)

NAN, INF = float("nan"), float("inf")

# (op, kwargs, student shape, teacher shape): every option that changes the arithmetic.
CASES = [
    ("attention_transfer_loss", {}, (2, 3, 5, 6), (2, 4, 5, 6)),
    ("attention_transfer_loss", {"resize": "bilinear", "p": 1.0}, (2, 3, 4, 3), (2, 2, 5, 6)),
    ("attention_transfer_loss", {"resize": "pool", "reduction": "batchmean"}, (2, 3, 6, 8),
     (2, 2, 3, 4)),
    ("attention_transfer_loss", {"reduction": "sum", "p": 3.0}, (2, 3, 5, 6), (2, 4, 5, 6)),
    ("channel_relation_loss", {"distance": "mse"}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("channel_relation_loss", {"distance": "kl"}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("channel_relation_loss", {"normalize": "softmax"}, (2, 3, 5, 6), (2, 3, 5, 6)),
    ("channel_relation_loss", {"normalize": "softmax", "distance": "kl"}, (2, 3, 5, 6),
     (2, 3, 5, 6)),
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
IDS = [f"{op}-{'-'.join(map(str, kw.values())) or 'default'}-{'x'.join(map(str, s))}"
       for op, kw, s, _ in CASES]


def _poison(x, value, index=17):
    x = x.clone()
    x.view(-1)[index % x.numel()] = value
    return x


def _assert_close(actual, ref64, eager32, rtol, what):
    """|actual - ref64| within rtol of |ref64|, or within twice the float32 eager reference's
    own error (a small float32 KL of near-uniform relation rows cancels: 1e-4 relative on the
    torch backend itself), as tests/test_relations.py bounds it."""
    ref64 = ref64.double()
    err = (actual.cpu().double() - ref64).abs().max().item()
    bound = max(rtol * ref64.abs().max().item(),
                2 * (eager32.cpu().double() - ref64).abs().max().item())
    assert err <= bound, f"{what}: max abs err {err:.3e} > {bound:.3e}"


# --- non-finite inputs -----------------------------------------------------------------------

POISONS = [("student", NAN), ("student", INF), ("student", -INF), ("teacher", NAN),
           ("teacher", INF), ("teacher", -INF)]
POISON_IDS = ["nan-student", "inf-student", "-inf-student", "nan-teacher", "inf-teacher",
              "-inf-teacher"]


def _softmax_normalized(op, kw):
    return op == "channel_relation_loss" and kw.get("normalize") == "softmax"


def _binary(op, s_shape):
    return op == "structure_loss" or op == "pixel_kl_loss" and s_shape[1] == 1


def _expected_loss(op, kw, s_shape, where, value):
    """What the mathematics gives, as far as every backend agrees on it:
    "finite"  -inf is a zero probability inside channel_relation's softmax normalisation of a row
              of features (e^-inf = 0): the relation stays finite;
    "+inf"    sgm: |E_s - E_t| is +inf for any infinite entry of either map; the KL ops with a
              -inf student logit: p_s = 0 where p_t > 0, KL = +inf;
    "nonfinite" everything else (NaN, or Inf: never silently zeroed). Note that a -inf *teacher*
              logit in pixel_kl / channel_wise_kl is mathematically a zero probability too (KL
              finite), and a +inf structure_loss logit on a mask pixel of 1 has BCE 0, but every
              backend gives NaN there (0 * log 0, inf - inf): documented, not relied on."""
    if value == -INF and _softmax_normalized(op, kw):
        return "finite"
    if op == "sgm_loss" and math.isinf(value):
        return "+inf"
    if where == "student" and value == -INF and op in ("pixel_kl_loss", "channel_wise_kl_loss"):
        return "+inf"
    return "nonfinite"


def _gradient_is_non_finite(op, kw, s_shape, value):
    """Whether the student's gradient must hold a non-finite value. It need not where the
    derivative stays bounded: sgm's "l1" (a sign, and torch.sign(NaN) = 0), the softmax
    normalisation and the KL ops at a -inf logit (a zero probability: p_s - p_t is finite),
    and a sigmoid saturated by an infinite logit (structure_loss, pixel_kl with K = 1)."""
    if kw.get("distance") == "l1":
        return False
    if value == -INF and (_softmax_normalized(op, kw)
                          or op in ("pixel_kl_loss", "channel_wise_kl_loss")):
        return False
    if math.isinf(value) and _binary(op, s_shape):
        return False
    return True


@pytest.mark.parametrize("op,kw,s_shape,t_shape", CASES, ids=IDS)
@pytest.mark.parametrize("where,value", POISONS, ids=POISON_IDS)
def test_non_finite_propagates(op, kw, s_shape, t_shape, where, value):
    """One non-finite entry makes the loss non-finite (never silently zeroed) on every backend,
    +inf where that is the exact answer; a NaN or an infinity in the student makes its gradient
    non-finite unless the derivative is bounded there. structure_loss's teacher is the mask: a
    non-finite value there propagates as well. Every call returns (no hang, no crash)."""
    fn = getattr(kdk, op)
    expected = _expected_loss(op, kw, s_shape, where, value)
    ref = None
    for backend, device in all_backends(op):
        fs, ft = op_inputs(op, s_shape, t_shape, device)
        if where == "student":
            fs = _poison(fs, value)
        else:
            ft = _poison(ft, value)
        loss, grad = loss_and_grad(fn, fs, ft, backend=backend, **kw)
        what = f"{backend}-{device}: loss {loss.item()}"
        if expected == "finite":
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), what
            # -inf is exactly a zero probability: the reference in float64 agrees.
            if ref is None:
                ref = loss_and_grad(getattr(kdk.reference, op), fs.cpu().double(),
                                    ft.cpu().double(), **kw)
                eager = loss_and_grad(getattr(kdk.reference, op), fs.cpu(), ft.cpu(), **kw)
            _assert_close(loss, ref[0], eager[0], 1e-5, what)
            _assert_close(grad, ref[1], eager[1], 1e-4, f"{backend}-{device} gradient")
            continue
        if expected == "+inf":
            assert loss.item() == INF, what
        assert not torch.isfinite(loss), what
        if where == "student" and _gradient_is_non_finite(op, kw, s_shape, value):
            assert not torch.isfinite(grad).all(), f"{backend}-{device}: gradient all finite"


@pytest.mark.parametrize("device", devices())
def test_nan_in_excluded_pixel_is_ignored(device):
    """pixel_kl's mask excludes a pixel entirely: NaN there changes nothing. The loss equals the
    reference on the same input with that pixel zeroed, and the pixel's gradient is 0."""
    zs, zt = op_inputs("pixel_kl_loss", (2, 3, 5, 6), (2, 3, 5, 6), device)
    mask = torch.ones(2, 5, 6, dtype=torch.bool, device=device)
    mask[1, 2, 3] = False
    zs[1, :, 2, 3] = 0
    zt[1, :, 2, 3] = 0
    nan_s, nan_t = zs.clone(), zt.clone()
    nan_s[1, :, 2, 3] = NAN
    nan_t[1, 0, 2, 3] = NAN
    ref, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs, zt, mask=mask)
    for backend in ["torch"] + fused_backends("pixel_kl_loss", device):
        loss, grad = loss_and_grad(kdk.pixel_kl_loss, nan_s, nan_t, mask=mask, backend=backend)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), backend
        assert_close_rel(loss, ref, 1e-6, backend)
        assert torch.equal(grad[1, :, 2, 3], torch.zeros_like(grad[1, :, 2, 3])), backend
        assert_close_rel(grad, ref_grad, 1e-5, backend)


# --- all-zero features -----------------------------------------------------------------------

def _kl_rows(log_p, log_q):
    """sum_k p_k (log p_k - log q_k) over the last axis, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _uniform_kl(logits_other, zero, tau):
    """Per row, KL(p_t || p_s) when one side's logits are all 0 (softmax(0) = uniform 1/n, so
    log u = -log n): KL(p || u) = sum p log p + log n; KL(u || q) = -log n - mean log q."""
    n = logits_other.shape[-1]
    log_p = torch.log_softmax(logits_other / tau, -1)
    if zero == "student":
        return (log_p.exp() * log_p).sum(-1) + math.log(n)
    return -math.log(n) - log_p.mean(-1)


def _zero_expected(op, kw, fs, ft, zero):
    """The closed form of the loss when `zero` ("student", "teacher", "both") is all zeros, in
    float64 from the formulas of SPEC section 3 with normalize(0) = 0 (eps = 1e-12). Both zero:
    identical inputs give 0 (every op but structure_loss). fs, ft: float64 inputs (zeros on
    the zero side)."""
    other = ft if zero == "student" else fs
    B = fs.shape[0]
    if op == "structure_loss":
        return _structure_zero(fs, ft)
    if zero == "both":
        return 0.0
    if op == "attention_transfer_loss":
        # a(0) = 0, a(other) is a unit vector per sample: sum over samples of ||a||^2 = B.
        if kw.get("resize") == "pool":
            N = min(fs.shape[-2], ft.shape[-2]) * min(fs.shape[-1], ft.shape[-1])
        else:
            N = ft.shape[-2] * ft.shape[-1]  # bilinear resizes the student to the teacher
        return {"mean": 1 / N, "batchmean": 1.0, "sum": float(B)}[kw.get("reduction", "mean")]
    if op == "channel_relation_loss":
        tau = kw.get("tau", 1.0)
        rows = other.flatten(2)  # B x C x N
        if kw.get("normalize", "l2") == "l2":
            # G(0) = 0 x 0^T = 0 (C x C zero matrix)
            fn, g_zero = F.normalize(rows, dim=2), 0.0
        else:
            # softmax(0) over N: rows of 1/N, G(0) = N * (1/N)^2 = 1/N everywhere
            fn, g_zero = torch.softmax(rows / tau, dim=2), 1 / rows.shape[-1]
        g = fn @ fn.transpose(1, 2)
        if kw.get("distance", "mse") == "mse":
            return (g - g_zero).pow(2).mean().item()
        log_other = torch.log_softmax(g / tau, -1)
        log_zero = torch.log_softmax(torch.full_like(g, g_zero) / tau, -1)  # uniform 1/C
        kl = _kl_rows(log_zero, log_other) if zero == "teacher" else _kl_rows(log_other, log_zero)
        return tau**2 * kl.mean().item()
    if op == "pixel_relation_loss":
        tau = kw.get("tau", 1.0)
        fn = F.normalize(other.flatten(2), dim=1)  # each pixel's C-vector a unit vector
        s = fn.transpose(1, 2) @ fn  # N x N; S(0) = 0
        if kw.get("distance", "mse") == "mse":
            return s.pow(2).mean().item()
        return tau**2 * _uniform_kl(s, zero, tau).mean().item()
    if op == "sgm_loss":
        e = other + other.transpose(-1, -2)  # E(0) = 0
        return (e.pow(2) if kw.get("distance", "mse") == "mse" else e.abs()).mean().item()
    if op == "logit_attention_loss":
        # A(0) = softmax(0) @ 0 = 0: q = softmax(0) is uniform over the H*W entries.
        tau = kw.get("tau", 2.0)
        x = other
        a = torch.softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), -1) @ x
        return tau**2 * _uniform_kl(a.flatten(2), zero, tau).mean().item()
    if op == "pixel_kl_loss":
        T = kw.get("temperature", 4.0)
        z = other.movedim(1, -1)  # pixels x K
        if z.shape[-1] >= 2:
            return T**2 * _uniform_kl(z, zero, T).mean().item()
        # K = 1: sigmoid(0) = 1/2; Bernoulli KL as a two-class softmax over (z, 0).
        two = torch.cat([z, torch.zeros_like(z)], -1)
        return T**2 * _uniform_kl(two, zero, T).mean().item()
    if op == "channel_wise_kl_loss":
        tau = kw.get("tau", 4.0)
        return tau**2 * _uniform_kl(other.flatten(2), zero, tau).mean().item()
    raise AssertionError(op)


def _structure_zero(logits, mask):
    """structure_loss at zero logits and/or a zero mask. Zero logits: p = 1/2 and BCE = log 2 at
    every pixel, so the weighted mean wbce = log 2 whatever w is; I = sum(m w) / 2,
    U = sum(w) / 2 + sum(m w). Zero mask: w = 1 (the pooled mask is 0), BCE = softplus(x),
    I = 0, U = sum sigmoid(x): wiou = 1 - 1 / (U + 1). Both: log 2 + 1 - 1 / (H W / 2 + 1)."""
    if not logits.any():
        w = 1 + 5 * (F.avg_pool2d(mask, 31, 1, 15, count_include_pad=True) - mask).abs()
        inter = (mask * w).sum((2, 3)) / 2
        union = w.sum((2, 3)) / 2 + (mask * w).sum((2, 3))
        return (math.log(2) + 1 - (inter + 1) / (union - inter + 1)).mean().item()
    wbce = F.softplus(logits).mean((2, 3))
    return (wbce + 1 - 1 / (torch.sigmoid(logits).sum((2, 3)) + 1)).mean().item()


@pytest.mark.parametrize("op,kw,s_shape,t_shape", CASES, ids=IDS)
@pytest.mark.parametrize("zero", ["student", "teacher", "both"])
def test_all_zero_features(op, kw, s_shape, t_shape, zero):
    """All-zero inputs: finite loss and gradient on every backend, equal to the reference and to
    the closed form (_zero_expected). structure_loss: "teacher" is the mask."""
    fn = getattr(kdk, op)
    fs0, ft0 = op_inputs(op, s_shape, t_shape, "cpu", seed=1)
    fs = torch.zeros_like(fs0) if zero in ("student", "both") else fs0
    ft = torch.zeros_like(ft0) if zero in ("teacher", "both") else ft0
    ref, ref_grad = loss_and_grad(getattr(kdk.reference, op), fs.double(), ft.double(), **kw)
    expected = _zero_expected(op, kw, fs.double(), ft.double(), zero)
    assert ref.item() == pytest.approx(expected, rel=1e-12, abs=1e-15), "reference vs closed form"
    eager, _ = loss_and_grad(getattr(kdk.reference, op), fs, ft, **kw)
    for backend, device in all_backends(op):
        loss, grad = loss_and_grad(fn, fs.to(device), ft.to(device), backend=backend, **kw)
        what = f"{backend}-{device}"
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), what
        _assert_close(loss, ref, eager, 1e-5, f"{what} loss")
        # Where the true gradient is 0 (a normalised map against zeros), float32 leaves ~1e-10.
        torch.testing.assert_close(grad.cpu().double(), ref_grad, rtol=1e-4, atol=1e-7,
                                   msg=lambda m: f"{what} gradient: {m}")


def test_all_false_mask_inside_compile_is_nan():
    """The emptiness check needs the mask's values: torch.compile skips it (documented)."""
    zs, zt = op_inputs("pixel_kl_loss", (2, 3, 4, 4), (2, 3, 4, 4), "cpu")
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    compiled = torch.compile(lambda a, b, m: kdk.pixel_kl_loss(a, b, mask=m, backend="torch"),
                             backend="eager", fullgraph=True)
    assert torch.isnan(compiled(zs, zt, mask))
    with pytest.raises(ValueError, match="mask selects no pixel"):
        kdk.pixel_kl_loss(zs, zt, mask=mask, backend="torch")
