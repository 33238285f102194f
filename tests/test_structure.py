"""Fused structure loss (every backend this build has) against kdkernels.reference."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import LAYOUTS, assert_close_rel, devices, fused_backends, make_layout

OP = "structure_loss"
TARGETS = [(b, d) for d in devices() for b in fused_backends(OP, d)]
IDS = [f"{b}-{d}" for b, d in TARGETS]

# Odd sizes, B = 1, K = 1 and 3; maps smaller than the 31 x 31 window, and (for the CPU's 64-row
# strips and the Triton tiles) taller and wider than one strip or tile.
SHAPES = [(2, 3, 37, 41), (1, 1, 5, 3), (3, 1, 70, 33), (1, 3, 9, 130), (1, 1, 150, 97)]


def _mask(shape, kind="binary", seed=0):
    """binary: random 0/1; blob: one ellipse per map (a polyp); soft: uniform values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "soft":
        return torch.rand(shape, generator=g)
    if kind == "binary":
        return (torch.rand(shape, generator=g) < 0.4).float()
    b, k, h, w = shape
    centre = torch.rand(b, k, 2, 1, 1, generator=g)
    radius = 0.2 + 0.3 * torch.rand(b, k, 2, 1, 1, generator=g)
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    r2 = ((y - centre[:, :, 0]) / radius[:, :, 0]) ** 2 + ((x - centre[:, :, 1]) / radius[:, :, 1]) ** 2
    return (r2 <= 1).float()


def _logits(shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed + 100)
    return (2 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)


def _loss_and_grad(fn, logits, mask, scale=1.0, **kw):
    x = logits.detach().requires_grad_(True)
    loss = fn(x, mask, **kw)
    (grad,) = torch.autograd.grad(loss * scale, x)
    return loss.detach(), grad


def _compare(backend, logits, mask, loss_rtol=1e-5, grad_rtol=1e-4, scale=1.0):
    """Against the reference in float64 on the very same values (float64 logits stay float64)."""
    loss, grad = _loss_and_grad(kdk.structure_loss, logits, mask, scale, backend=backend)
    ref_loss, ref_grad = _loss_and_grad(kdk.reference.structure_loss, logits.cpu().double(),
                                        mask.cpu().double(), scale)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == acc
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert_close_rel(loss.cpu(), ref_loss, loss_rtol, "loss")
    assert_close_rel(grad.cpu(), ref_grad, grad_rtol, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["binary", "blob", "soft"])
def test_matches_reference(backend, device, shape, kind):
    seed = SHAPES.index(shape)
    _compare(backend, _logits(shape, seed, device=device), _mask(shape, kind, seed).to(device))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_mask_dtypes(backend, device, mask_dtype):
    shape = SHAPES[0]
    kind = "soft" if mask_dtype == torch.float64 else "binary"  # float64: rounded to float32 first
    mask = (_mask(shape, kind, 1) > 0.5 if mask_dtype == torch.bool else _mask(shape, kind, 1))
    _compare(backend, _logits(shape, 1, device=device), mask.to(device=device, dtype=mask_dtype))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(backend, device, layout):
    shape = (2, 3, 19, 35)
    logits = make_layout(_logits(shape, 2, device=device), layout)
    mask = make_layout(_mask(shape, "blob", 2).to(device), LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])
    _compare(backend, logits, mask, scale=0.7)  # and an upstream gradient other than 1


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(backend, device, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter has no real bfloat16")
    shape = SHAPES[0]
    logits = _logits(shape, 3, dtype=dtype, device=device)
    # The reference upcasts the same 16-bit values, so the loss agrees to float32 accuracy; the
    # gradient is rounded once to the logits' dtype. scale: a loss scale as under AMP, where the
    # unit gradient (~1e-5 here, ~1e-8 at KDAS sizes) would be subnormal in float16.
    _compare(backend, logits, _mask(shape, "blob", 3).to(device).bool(),
             grad_rtol=4e-3 if dtype == torch.float16 else 2e-2, scale=1024.0)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_float64(backend, device):
    shape = SHAPES[2]
    _compare(backend, _logits(shape, 4, dtype=torch.float64, device=device),
             _mask(shape, "soft", 4).double().to(device), loss_rtol=1e-12, grad_rtol=1e-11)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("sharpness", [0.0, 6.0, 12.0], ids=["random", "close", "very-close"])
def test_float32_against_float64(backend, device, sharpness):
    """The prediction close to the mask (logits sharpness * (2m - 1) + noise): the loss is small
    and 1 - (I + 1) / (U - I + 1) cancels in the eager form. Float32 within 1e-5 (loss) and
    1e-4 (gradient) of float64, or no worse than twice eager float32's own error."""
    shape = (2, 1, 45, 38)
    mask = _mask(shape, "blob", 5)
    logits = sharpness * (2 * mask - 1) + torch.randn(shape, generator=torch.Generator().manual_seed(5))
    loss, grad = _loss_and_grad(kdk.structure_loss, logits.to(device), mask.to(device), backend=backend)
    ref_loss, ref_grad = _loss_and_grad(kdk.reference.structure_loss, logits.double(), mask.double())
    eager_loss, eager_grad = _loss_and_grad(kdk.reference.structure_loss, logits, mask)
    for ours, eager, ref, rtol, what in ((loss, eager_loss, ref_loss, 1e-5, "loss"),
                                         (grad, eager_grad, ref_grad, 1e-4, "grad")):
        err = (ours.cpu().double() - ref).abs().max()
        eager_err = (eager.double() - ref).abs().max()
        bound = max(rtol * ref.abs().max(), 2 * eager_err)
        assert err <= bound, f"{what}: error {err:.3e} vs float64 > {bound:.3e} (eager {eager_err:.3e})"


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_mask_gets_no_gradient_and_no_grad_works(backend, device):
    logits = _logits(SHAPES[0], 6, device=device).requires_grad_(True)
    mask = _mask(SHAPES[0], "blob", 6).to(device).requires_grad_(True)
    loss = kdk.structure_loss(logits, mask, backend=backend)
    loss.backward()
    assert logits.grad is not None and mask.grad is None
    with torch.no_grad():
        again = kdk.structure_loss(logits, mask, backend=backend)
    assert not again.requires_grad
    assert torch.equal(again, loss.detach())  # deterministic, with or without the gradient pass


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf * 0
@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_non_finite_propagates(backend, device):
    logits = _logits(SHAPES[0], 7, device=device)
    mask = _mask(SHAPES[0], "binary", 7).to(device)
    logits[0, 1, 2, 3] = float("nan")
    assert torch.isnan(kdk.structure_loss(logits, mask, backend=backend))
    logits[0, 1, 2, 3] = float("inf")
    mask[0, 1, 2, 3] = 0.0
    assert not torch.isfinite(kdk.structure_loss(logits, mask, backend=backend))


def _need_cpu_kernel():
    if "cpu" not in fused_backends(OP, "cpu"):
        pytest.skip("the CPU extension is not built")


def test_cpu_thread_count_independent():
    """Strips are the unit of the fixed-order sums: one thread (an image per task) and two (the
    strips of one image in parallel) give the same bits."""
    _need_cpu_kernel()
    shape = (1, 1, 200, 77)
    logits, mask = _logits(shape, 8), _mask(shape, "blob", 8)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_loss_and_grad(kdk.structure_loss, logits, mask, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_gradcheck_cpu_kernel(kind):
    _need_cpu_kernel()
    shape = (1, 2, 6, 33)  # wider than the window, so pixels weigh differently along the rows
    logits = _logits(shape, 9, dtype=torch.float64).requires_grad_(True)
    mask = _mask(shape, kind, 9).double()
    assert torch.autograd.gradcheck(lambda x: kdk.structure_loss(x, mask, backend="cpu"), (logits,))


@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck_extension_op(need_grad):
    _need_cpu_kernel()
    shape = SHAPES[0]
    logits = _logits(shape, 10).requires_grad_(need_grad)
    torch.library.opcheck(torch.ops.kdkernels.structure.default,
                          (logits, _mask(shape, "blob", 10), need_grad))


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton_op(device):
    if "triton" not in fused_backends(OP, device):
        pytest.skip(f"no Triton backend on {device} here")
    shape = (2, 1, 19, 35)
    logits = _logits(shape, 11, device=device).requires_grad_(True)
    torch.library.opcheck(torch.ops.kdkernels.structure_triton.default,
                          (logits, _mask(shape, "blob", 11).to(device).bool()))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_compiles_fullgraph(backend, device):
    shape = (2, 1, 19, 35)
    logits, mask = _logits(shape, 12, device=device), _mask(shape, "blob", 12).to(device)

    @torch.compile(fullgraph=True)
    def step(x, m):
        return 0.7 * kdk.structure_loss(x, m, backend=backend)

    loss, grad = _loss_and_grad(step, logits, mask)
    ref_loss, ref_grad = _loss_and_grad(lambda x, m: 0.7 * kdk.reference.structure_loss(x, m),
                                        logits.cpu().double(), mask.cpu().double())
    assert_close_rel(loss.cpu(), ref_loss, 1e-5, "loss")
    assert_close_rel(grad.cpu(), ref_grad, 1e-4, "grad")
