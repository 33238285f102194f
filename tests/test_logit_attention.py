"""Fused logit attention (every backend this build has) against kdkernels.reference.

Comparisons are against the float64 reference on the very same values. Near the teacher the
float32 attention outputs A themselves carry rounding that the loss and gradient amplify (eager
float32 is no better); there the bar is the larger of a relative tolerance and twice eager
float32's own error against float64. The Triton kernels run in the interpreter on the CPU, so
their shapes stay tiny.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import (LAYOUTS, assert_close_rel, devices, fused_backends, loss_and_grad, make_layout,
                     random_pair)

OP = "logit_attention_loss"
TARGETS = [(b, d) for d in devices() for b in fused_backends(OP, d)]
IDS = [f"{b}-{d}" for b, d in TARGETS]
HAS_CPU = "cpu" in fused_backends(OP, "cpu")

# Odd sizes, B = 1, K = 1 and 3, 3-D maps, a single row or column, more rows than one Triton row
# block (16), a KDAS-like width past 256 (one Triton column chunk) and a map wider than one
# chunk (512 columns: the scores are recomputed per chunk).
SHAPES = [(2, 1, 7, 9), (1, 3, 5, 11), (3, 13, 6), (2, 3, 1, 4), (1, 1, 9, 1), (1, 2, 37, 20),
          (1, 1, 12, 150), (1, 1, 19, 353), (1, 2, 3, 530)]
# CPU only (the interpreter would take minutes): more rows than one CPU row block (64), one map
# (the maps run one after the other, each phase parallel over row blocks) and several (whole maps
# per thread).
CPU_SHAPES = [(1, 1, 100, 70), (3, 2, 67, 45)]
TAUS = [2.0, 0.5, 4.0]


def _fused(backend):
    return lambda ps, pt, **kw: kdk.logit_attention_loss(ps, pt, backend=backend, **kw)


def _check(backend, ps, pt, loss_rtol=1e-5, grad_rtol=1e-4, **kw):
    """Loss and gradient against float64 on the same values: within rtol (relative to |loss| and
    max |grad|), or no worse than twice eager float32's own error."""
    loss, grad = loss_and_grad(_fused(backend), ps, pt, **kw)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.logit_attention_loss, ps.cpu().double(),
                                       pt.cpu().double(), **kw)
    eager_loss, eager_grad = loss_and_grad(kdk.reference.logit_attention_loss, ps, pt, **kw)
    acc = torch.float64 if ps.dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == acc == eager_loss.dtype
    assert grad.dtype == ps.dtype and grad.shape == ps.shape
    for ours, eager, ref, rtol, what in ((loss, eager_loss, ref_loss, loss_rtol, "loss"),
                                         (grad, eager_grad, ref_grad, grad_rtol, "grad")):
        err = (ours.cpu().double() - ref).abs().max().item()
        eager_err = (eager.cpu().double() - ref).abs().max().item()
        bound = max(rtol * ref.abs().max().item(), 2 * eager_err, 1e-30)
        assert err <= bound, (f"{what}: error {err:.3e} vs float64 > {bound:.3e} (eager float32 "
                              f"{eager_err:.3e}, |ref| {ref.abs().max().item():.3e})")


def _shapes(backend):
    return SHAPES + (CPU_SHAPES if backend == "cpu" else [])


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("index", range(len(SHAPES) + len(CPU_SHAPES)))
def test_matches_reference(backend, device, index):
    shapes = _shapes(backend)
    if index >= len(shapes):
        pytest.skip("CPU-only shape")
    shape = shapes[index]
    ps, pt = random_pair(shape, shape, device, seed=index)
    _check(backend, ps, pt, tau=TAUS[index % len(TAUS)])


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(backend, device, layout):
    ps, pt = random_pair((2, 3, 9, 11), (2, 3, 9, 11), device, seed=3)
    ps = make_layout(ps, layout)
    pt = make_layout(pt, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])  # teacher in another layout
    _check(backend, ps, pt)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 13, 10), (1, 1, 5, 300)], ids=str)
def test_low_precision(backend, device, dtype, shape):
    # The reference upcasts the same half-precision values to float32, so the losses agree to
    # float32 accuracy; the gradient is rounded once to the input dtype. The wide map takes the
    # Triton kernels' map-wide (512-column) tiles.
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter has no real bfloat16")
    ps, pt = random_pair(shape, shape, device, dtype=dtype, seed=5)
    loss, grad = loss_and_grad(_fused(backend), ps, pt)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.logit_attention_loss, ps, pt)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 4e-3 if dtype == torch.float16 else 2e-2, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("noise", [1.0, 1e-2, 1e-3], ids=["random", "near-1e-2", "near-1e-3"])
def test_float32_against_float64(backend, device, noise):
    """The acceptance bar, also with the student near the teacher, where the loss is a small
    difference of two nearly equal distributions."""
    shape = (2, 1, 24, 20) if backend == "triton" else (2, 1, 52, 44)
    g = torch.Generator().manual_seed(6)
    pt = torch.randn(shape, generator=g)
    ps = pt + noise * torch.randn(shape, generator=g)
    _check(backend, ps.to(device), pt.to(device))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_float64(backend, device):
    ps, pt = random_pair((2, 1, 9, 7), (2, 1, 9, 7), device, dtype=torch.float64, seed=7)
    loss, grad = loss_and_grad(_fused(backend), ps, pt, tau=1.5)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.logit_attention_loss, ps, pt, tau=1.5)
    assert loss.dtype == grad.dtype == torch.float64
    assert_close_rel(loss, ref_loss, 1e-12, "loss")
    assert_close_rel(grad, ref_grad, 1e-11, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_mixed_dtypes(backend, device):
    ps, pt = random_pair((1, 2, 6, 5), (1, 2, 6, 5), device, seed=8)
    _check(backend, ps.half(), pt)  # the student in float16, the teacher in float32
    loss, grad = loss_and_grad(_fused(backend), ps, pt.double())  # one float64: both float64
    ref_loss, ref_grad = loss_and_grad(kdk.reference.logit_attention_loss, ps.double(), pt.double())
    assert loss.dtype == torch.float64 and grad.dtype == torch.float32
    assert_close_rel(loss, ref_loss, 1e-12, "loss")
    assert_close_rel(grad, ref_grad, 1e-6, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_teacher_gets_no_gradient_and_upstream_scales(backend, device):
    ps, pt = random_pair((2, 1, 6, 7), (2, 1, 6, 7), device, seed=9)
    ps.requires_grad_(True)
    pt.requires_grad_(True)
    loss = kdk.logit_attention_loss(ps, pt, backend=backend)
    (2.5 * loss).backward()
    assert ps.grad is not None and pt.grad is None
    _, grad = loss_and_grad(_fused(backend), ps.detach(), pt.detach())
    assert_close_rel(ps.grad, 2.5 * grad, 1e-6, "scaled grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_no_grad(backend, device):
    ps, pt = random_pair((1, 2, 7, 6), (1, 2, 7, 6), device, seed=10)
    with_grad, _ = loss_and_grad(_fused(backend), ps, pt)
    with torch.no_grad():
        off = kdk.logit_attention_loss(ps.detach().requires_grad_(True), pt, backend=backend)
    plain = kdk.logit_attention_loss(ps, pt, backend=backend)  # no input requires grad
    assert not off.requires_grad and not plain.requires_grad
    assert torch.equal(off, with_grad) and torch.equal(plain, with_grad)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy
def test_non_finite_propagates(backend, device):
    ps, pt = random_pair((2, 1, 7, 9), (2, 1, 7, 9), device, seed=11)
    ps[1, 0, 2, 3] = float("nan")
    assert torch.isnan(kdk.logit_attention_loss(ps, pt, backend=backend))
    ps[1, 0, 2, 3] = float("inf")
    assert not torch.isfinite(kdk.logit_attention_loss(ps, pt, backend=backend))


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
def test_cpu_bitwise_reproducible():
    ps, pt = random_pair((3, 1, 41, 29), (3, 1, 41, 29), "cpu", seed=12)
    first = loss_and_grad(_fused("cpu"), ps, pt)
    second = loss_and_grad(_fused("cpu"), ps, pt)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
def test_cpu_parallel_modes_agree():
    """Whole maps per thread (maps >= threads) and one map at a time with threaded GEMMs and row
    loops (fewer maps than threads) agree, to the GEMMs' rounding if they split work differently."""
    ps, pt = random_pair((3, 1, 100, 70), (3, 1, 100, 70), "cpu", seed=18)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 4):
            torch.set_num_threads(n)
            results.append(loss_and_grad(_fused("cpu"), ps, pt))
    finally:
        torch.set_num_threads(threads)
    assert_close_rel(results[0][0], results[1][0], 1e-6, "loss")
    assert_close_rel(results[0][1], results[1][1], 1e-5, "grad")


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # from torch's flags()
def test_cpu_without_onednn():
    """float32 GEMMs go through oneDNN when torch has it, else (or when disabled) at::mm."""
    ps, pt = random_pair((2, 1, 37, 29), (2, 1, 37, 29), "cpu", seed=19)
    with torch.backends.mkldnn.flags(enabled=False):
        _check("cpu", ps, pt)


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
@pytest.mark.parametrize("shape", [(1, 2, 5, 4), (1, 70, 3)], ids=str)
@pytest.mark.parametrize("tau", [2.0, 0.7])
def test_gradcheck_cpu_kernel(shape, tau):
    ps, pt = random_pair(shape, shape, "cpu", dtype=torch.float64, seed=13)
    ps.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kdk.logit_attention_loss(x, pt, tau=tau, backend="cpu"), (ps,))


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
def test_cpu_op_needs_need_grad_for_backward():
    ps, pt = random_pair((1, 1, 4, 5), (1, 1, 4, 5), "cpu", seed=14)
    ps.requires_grad_(True)
    loss, unit = torch.ops.kdkernels.logit_attention(ps, pt, 2.0, False)
    assert unit.numel() == 0
    with pytest.raises(RuntimeError, match="need_grad=True"):
        loss.backward()


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck_extension_op(need_grad):
    ps, pt = random_pair((2, 1, 6, 5), (2, 1, 6, 5), "cpu", seed=15)
    ps.requires_grad_(need_grad)
    torch.library.opcheck(torch.ops.kdkernels.logit_attention.default, (ps, pt, 2.0, need_grad))


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton_op(device):
    if "triton" not in fused_backends(OP, device):
        pytest.skip(f"no Triton backend on {device} here")
    ps, pt = random_pair((1, 2, 6, 5), (1, 2, 6, 5), device, seed=16)
    ps.requires_grad_(True)
    torch.library.opcheck(torch.ops.kdkernels.logit_attention_triton.default, (ps, pt, 2.0, True))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_compiles_fullgraph(backend, device):
    ps, pt = random_pair((2, 9, 7), (2, 9, 7), device, seed=17)

    @torch.compile(fullgraph=True)
    def step(x, y):
        return kdk.logit_attention_loss(x, y, tau=1.5, backend=backend)

    loss, grad = loss_and_grad(step, ps, pt)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.logit_attention_loss, ps, pt, tau=1.5)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "grad")
    with torch.no_grad():
        assert_close_rel(step(ps, pt), ref_loss, 1e-5, "no_grad loss")
