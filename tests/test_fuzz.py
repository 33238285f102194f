"""Property-based fuzzing: every op on every backend against the float64 reference, gradients included.

The cases (tests/fuzz_cases.py) draw shapes, layouts, dtypes, keyword options, value scales and how
near the student is to the teacher. The property: the backend's loss and student gradient match
kdkernels.reference evaluated in float64 on the same (already rounded) inputs, to

    |loss - ref| <= rtol * |ref| + atol * far        max|grad - ref| <= rtol * max|ref| + atol * far

where "far" is the reference's loss (or largest gradient) for an independent teacher of the same
shape and scale: the natural size of the op at that scale. It keeps the bound tight where the
student sits on the teacher and the loss is nearly zero, which is where cancellation bites.
The teacher never receives a gradient.

Profiles (tests/conftest.py): "ci" (default, derandomized: the same examples every run) and "long"
(`pytest tests/test_fuzz.py --hypothesis-profile long`) for GPU machines and releases. The examples
drawn per test: `--hypothesis-show-statistics`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import kdkernels as kdk
from fuzz_cases import Case, case
from helpers import devices, fused_backends

OPS = ("attention_transfer_loss", "channel_relation_loss", "pixel_relation_loss", "sgm_loss",
       "logit_attention_loss", "pixel_kl_loss", "channel_wise_kl_loss", "structure_loss")
INTERPRETED = not torch.cuda.is_available()  # Triton runs in its (slow, bfloat16-less) interpreter

# (loss rtol, loss atol, grad rtol, grad atol) against float64, per input dtype. Half inputs are
# accumulated in float32; their gradient is rounded to the input dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10, 1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5, 1e-4, 1e-4),
    torch.float16: (2e-3, 1e-4, 4e-3, 1e-4),
    torch.bfloat16: (2e-3, 1e-4, 2e-2, 2e-3),
}
ALL_DTYPES = tuple(TOLERANCES)


def _targets(op):
    return [("torch", "cpu")] + [(b, d) for d in devices() for b in fused_backends(op, d)]


COMPILED = [(op, b, d) for op in OPS for b, d in _targets(op) if b != "triton"]
TRITON = [(op, b, d) for op in OPS for b, d in _targets(op) if b == "triton"]
# The interpreter runs a case in ~1000x the time of the C++ kernels: a fifteenth of the examples.
TRITON_EXAMPLES = max(4, settings.default.max_examples // 15) if INTERPRETED else \
    settings.default.max_examples


def _on(case_: Case, device) -> Case:
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    kw = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in case_.kwargs.items()}
    return Case(move(case_.student), move(case_.teacher), kw, move(case_.far_teacher))


def _loss_and_grads(fn, student, teacher, **kw):
    """loss, d loss / d student, d loss / d teacher (None when unused) for fresh leaves."""
    s = student.detach().requires_grad_(True)
    t = teacher.detach()
    if t.is_floating_point():
        t.requires_grad_(True)
    loss = fn(s, t, **kw)
    inputs = [s, t] if t.requires_grad else [s]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), grads[0], grads[1] if len(grads) > 1 else None


def _float64(op, case_: Case, teacher):
    ref = getattr(kdk.reference, op)
    return _loss_and_grads(ref, case_.student.double(), teacher.double(), **case_.kwargs)


def _unit_loss(op, case_: Case) -> float:
    """The size of the terms an op sums where that does not depend on the input's scale: the L2
    normalised maps and relations are O(1), the KL terms O(tau^2). A floor for the loss bound
    where the input's shape makes the loss identically zero (N = 1, C = 1)."""
    kw = case_.kwargs
    if op == "attention_transfer_loss":
        pixels = case_.teacher.shape[-2:].numel()
        return {"mean": 1 / pixels, "batchmean": 1.0, "sum": float(case_.teacher.shape[0])}[
            kw["reduction"]]
    tau = kw.get("tau", kw.get("temperature", 1.0))
    if op in ("channel_relation_loss", "pixel_relation_loss"):
        return tau * tau if kw["distance"] == "kl" else 1.0
    return tau * tau if op in ("logit_attention_loss", "pixel_kl_loss", "channel_wise_kl_loss") \
        else 0.0


def _zero_gradient(op, case_: Case) -> bool:
    """Shapes where an L2 normalisation or a one-entry softmax makes the loss constant in the
    student: its true gradient is zero, and any computed one is rounding left over from terms
    that cancel exactly, amplified by 1 / ||x|| (large for tiny features)."""
    s, t, kw = case_.student, case_.teacher, case_.kwargs
    n_s = s.shape[-2:].numel()
    if op == "attention_transfer_loss":
        if kw["resize"] == "pool":
            return min(s.shape[-2], t.shape[-2]) * min(s.shape[-1], t.shape[-1]) == 1
        # Resized bilinearly, the student's map is constant along an axis that either side has 1 of.
        return all(a == 1 or b == 1 for a, b in zip(s.shape[-2:], t.shape[-2:]))
    if op == "channel_relation_loss":
        return n_s == 1 or s.shape[1] == 1 and (kw["normalize"] == "l2" or kw["distance"] == "kl")
    if op == "pixel_relation_loss":
        return n_s == 1 or s.shape[1] == 1
    # A softmax over one entry: one pixel per channel (CWD), a 1 x 1 map (logit attention).
    return op in ("channel_wise_kl_loss", "logit_attention_loss") and n_s == 1


def _sign_tie(op, case_: Case) -> bool:
    """sgm "l1": d|E_s - E_t| / dE_s = sign(E_s - E_t) flips between dtypes where the difference
    is below the inputs' rounding (a student on the teacher)."""
    if op != "sgm_loss" or case_.kwargs["distance"] != "l1":
        return False
    e_s, e_t = (x.double() + x.double().transpose(-1, -2) for x in (case_.student, case_.teacher))
    return bool(((e_s - e_t).abs() <= 1e-3 * e_s.abs().max()).any())


def _acc_eps(x: torch.Tensor) -> float:
    """The rounding unit of the arithmetic on x: float64, else float32 (half inputs accumulate
    in float32)."""
    return torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps


def _kink_tie(op, case_: Case) -> bool:
    """attention_transfer at p = 1: d|y|/dy = sign(y) flips where a resampled student value y
    cancels to within the resampling's rounding of 0 (+-7.98e-3 neighbours interpolate to exactly
    0 in float64, to -1.9e-9 in float32). p < 1 is not compared at all; without resampling, or
    where every tap is 0, the values are the same in both."""
    if op != "attention_transfer_loss" or case_.kwargs["p"] != 1.0:
        return False
    s, t = case_.student.double(), case_.teacher.double()
    if case_.kwargs["resize"] == "pool":
        target = tuple(min(a, b) for a, b in zip(s.shape[-2:], t.shape[-2:]))
        if tuple(s.shape[-2:]) == target:
            return False

        def resample(x):
            return torch.nn.functional.adaptive_avg_pool2d(x, target)
    elif s.shape[-2:] != t.shape[-2:]:
        def resample(x):
            return torch.nn.functional.interpolate(x, size=t.shape[-2:], mode="bilinear",
                                                   align_corners=False)
    else:
        return False
    scale = resample(s.abs())  # the size of the taps, hence of the rounding
    near_zero = resample(s).abs() <= 4 * torch.finfo(torch.float32).eps * scale
    return bool((near_zero & (scale > 0)).any())


def _attention_allowance(op, case_: Case) -> float:
    """logit_attention's softmax backward dS = P o (dP - D) keeps ~eps |dA_i| |X|^2 / sqrt(W) of
    rounding: from dP's own rounding in every backend (eager float32 included: 2.6e-4 of the
    largest gradient at logits of 80), and in the Triton backend also from flash attention's
    D_i = <dA_i, A_i> standing in for <P_i, dP_i>, which leaves that much even on one-hot rows
    where eager gets exactly 0. Through (dS + dS^T) X / sqrt(W), summed over a map's rows
    (||dA||_1 <= 2 tau / maps): ~4 eps tau max|X|^2 / (sqrt(W) maps) per entry. It matters only
    where the logits are large enough to saturate the attention rows (X X^T / sqrt(W) >> 1)."""
    if op != "logit_attention_loss":
        return 0.0
    x = case_.student
    maps = x.shape[0] * (x.shape[1] if x.dim() == 4 else 1)
    tau = case_.kwargs["tau"]
    return 4 * _acc_eps(x) * tau * float(x.double().abs().max()) ** 2 / (math.sqrt(x.shape[-1]) * maps)


def _rounded_sign(op, case_: Case) -> bool:
    """sgm "l1" on the fused backends: they form E_s - E_t as (s - t) + (s - t)^T, which avoids
    the cancellation of E_s - E_t near the teacher but rounds by ~eps (|s| + |t|) per entry, so
    its sign (the gradient) flips or vanishes where |E_s - E_t| is below that: a teacher pair
    that cancels (-80 and +80) against a student pair of 6e-5 and -6e-5."""
    if op != "sgm_loss" or case_.kwargs["distance"] != "l1":
        return False
    s, t = case_.student.double(), case_.teacher.double()
    d = (s + s.transpose(-1, -2)) - (t + t.transpose(-1, -2))
    size = s.abs() + t.abs() + s.abs().transpose(-1, -2) + t.abs().transpose(-1, -2)
    return bool((d.abs() <= 4 * _acc_eps(case_.student) * size).any())


def _check(op, backend, device, case_: Case):
    case_ = _on(case_, device)
    loss, grad, teacher_grad = _loss_and_grads(getattr(kdk, op), case_.student, case_.teacher,
                                               backend=backend, **case_.kwargs)
    dtype = case_.student.dtype
    assert loss.dim() == 0
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == case_.student.shape
    assert teacher_grad is None or not teacher_grad.any(), "the teacher received a gradient"

    ref_loss, ref_grad, _ = _float64(op, case_, case_.teacher)
    if case_.far_teacher is None:
        far_loss, far_grad = ref_loss.abs(), ref_grad.abs().max()
    else:
        far_loss, g, _ = _float64(op, case_, case_.far_teacher)
        far_loss, far_grad = far_loss.abs(), g.abs().max()
    rtol, atol, grad_rtol, grad_atol = TOLERANCES[dtype]
    bound = rtol * ref_loss.abs() + atol * max(far_loss, _unit_loss(op, case_))
    # Floors: the loss per unit of input per element (where the far gradient underflows: a
    # saturated softmax), the scale-free size of the loss per element (softmax terms), and the
    # gradient's rounding to the student's dtype (float16 has subnormals from 6e-5 down).
    x = case_.student.double()
    finfo = torch.finfo(dtype)
    grad_bound = grad_rtol * ref_grad.abs().max() + grad_atol * far_grad + \
        grad_atol * far_loss / (x.abs().max().clamp_min(1e-300) * x.numel()) + \
        grad_atol * _unit_loss(op, case_) / x.numel() + \
        finfo.smallest_normal * finfo.eps
    if backend != "torch":
        # A fused kernel may also be as far from float64 as the eager reference in the same dtype
        # (a few times that: its sums run in another order), as torch.compile's accuracy checks
        # allow.
        eager_loss, eager_grad, _ = _loss_and_grads(getattr(kdk.reference, op), case_.student,
                                                    case_.teacher, **case_.kwargs)
        bound = bound + 4 * (eager_loss.double() - ref_loss).abs()
        grad_bound = grad_bound + 4 * (eager_grad.double() - ref_grad).abs().max()
    grad_bound = grad_bound + _attention_allowance(op, case_)

    err = (loss.double() - ref_loss).abs()
    note(f"loss {loss.item():.9g} vs float64 {ref_loss.item():.9g} (far {far_loss.item():.3g})")
    assert err <= bound, f"loss error {err:.3e} > bound {bound:.3e}"
    if _zero_gradient(op, case_) or _kink_tie(op, case_) or \
            (_sign_tie(op, case_) if backend == "torch" else _rounded_sign(op, case_)):
        return
    if op == "attention_transfer_loss" and case_.kwargs["p"] < 1:
        return  # d|y|^p/dy, p < 1, is unbounded at y = 0: the gradient is ill-conditioned there
    grad_err = (grad.double() - ref_grad).abs().max()
    note(f"gradient error {grad_err:.3e}, max |float64 gradient| {ref_grad.abs().max():.3e}")
    assert grad_err <= grad_bound, f"gradient error {grad_err:.3e} > bound {grad_bound:.3e}"


@pytest.mark.parametrize("op,backend,device", COMPILED, ids=["-".join(t) for t in COMPILED])
@given(data=st.data())
def test_matches_float64(op, backend, device, data):
    _check(op, backend, device, data.draw(case(op, ALL_DTYPES, cap=20000), label="case"))


@pytest.mark.parametrize("op,backend,device", TRITON, ids=["-".join(t) for t in TRITON])
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_triton_matches_float64(op, backend, device, data):
    dtypes = tuple(d for d in ALL_DTYPES if d != torch.bfloat16) if INTERPRETED else ALL_DTYPES
    cap = 1500 if INTERPRETED else 20000
    _check(op, backend, device, data.draw(case(op, dtypes, cap=cap), label="case"))
