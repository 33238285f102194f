"""Fused channel-wise KL (CWD; every backend this build has) against kdkernels.reference.

Comparisons are against the float64 reference on the very same values, with float32 bars of
1e-5 (loss) and 1e-4 (gradient, relative to its largest entry), also with the student close to
the teacher, where the KL is a small difference of large terms.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import LAYOUTS, devices, fused_backends, loss_and_grad, make_layout, random_pair

OP = "channel_wise_kl_loss"
TARGETS = [(b, d) for d in devices() for b in fused_backends(OP, d)]
IDS = [f"{b}-{d}" for b, d in TARGETS]
HAS_CPU = "cpu" in fused_backends(OP, "cpu")

# Odd sizes (no chunk or tile divides N), B = 1, C = 1 and 3, a single image row, channel counts
# that leave partial blocks of 16 rows, and rows longer than one CPU chunk / Triton tile (so the
# Triton forward splits them and merges the splits).
SHAPES = [(2, 3, 7, 9), (1, 1, 5, 3), (3, 3, 1, 11), (2, 20, 13, 11), (1, 33, 5, 17),
          (1, 2, 37, 61)]
TAUS = [4.0, 1.0, 0.5, 3.0]


def _fused(backend):
    return lambda fs, ft, **kw: kdk.channel_wise_kl_loss(fs, ft, backend=backend, **kw)


def _check(backend, fs, ft, loss_rtol=1e-5, grad_rtol=1e-4, **kw):
    """Loss and gradient against float64 on the same values, relative to |loss| and max |grad|."""
    loss, grad = loss_and_grad(_fused(backend), fs, ft, **kw)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.channel_wise_kl_loss, fs.cpu().double(),
                                       ft.cpu().double(), **kw)
    acc = torch.float64 if torch.float64 in (fs.dtype, ft.dtype) else torch.float32
    assert loss.dim() == 0 and loss.dtype == acc
    assert grad.dtype == fs.dtype and grad.shape == fs.shape
    for ours, ref, rtol, what in ((loss, ref_loss, loss_rtol, "loss"),
                                  (grad, ref_grad, grad_rtol, "grad")):
        err = (ours.cpu().double() - ref).abs().max().item()
        bound = rtol * ref.abs().max().item()
        assert err <= bound, f"{what}: error {err:.3e} vs float64 > {bound:.3e}"
    return grad


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tau", TAUS)
def test_matches_reference(backend, device, shape, tau):
    fs, ft = random_pair(shape, shape, device, seed=sum(shape) + int(tau * 4))
    _check(backend, fs, ft, tau=tau)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (4, 40, 7, 9)], ids=str)
def test_layouts(backend, device, layout, shape):
    fs, ft = random_pair(shape, shape, device, seed=3)
    fs = make_layout(fs, layout)
    ft = make_layout(ft, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])  # teacher in another layout
    grad = _check(backend, fs, ft, tau=2.0)
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_low_precision(backend, device, dtype, layout):
    # The interpreter's bfloat16 support has gaps: the Triton kernels are checked in float16 here.
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bfloat16 under the Triton interpreter")
    fs, ft = random_pair((2, 6, 9, 7), (2, 6, 9, 7), device, dtype=dtype, seed=5)
    grad_rtol = 4e-3 if dtype == torch.float16 else 2e-2  # one rounding of the gradient
    _check(backend, make_layout(fs, layout), ft, grad_rtol=grad_rtol, tau=2.0)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float64), (torch.float64, torch.float32),
                                    (torch.float32, torch.float64), (torch.float16, torch.float32)],
                         ids=str)
def test_dtypes(backend, device, dtypes):
    """float64 runs in float64 (a float64 member promotes the pair); other mixes in float32."""
    fs, ft = random_pair((2, 3, 21, 13), (2, 3, 21, 13), device, seed=12)
    fs, ft = fs.to(dtypes[0]), ft.to(dtypes[1])
    loss_rtol = 1e-12 if torch.float64 in dtypes else 1e-5
    # The gradient is rounded once to fs's dtype.
    grad_rtol = {torch.float64: 1e-12, torch.float32: 2e-7, torch.float16: 4e-3}[fs.dtype]
    _check(backend, fs, ft, loss_rtol=loss_rtol, grad_rtol=grad_rtol, tau=0.7)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("noise", [1.0, 1e-2, 1e-3], ids=["random", "near-1e-2", "near-1e-3"])
@pytest.mark.parametrize("tau", [4.0, 1.0])
def test_float32_against_float64(backend, device, noise, tau):
    """The acceptance bar, also where eager float32 itself misses it (near the teacher)."""
    g = torch.Generator().manual_seed(6)
    ft = torch.randn(2, 6, 33, 35, generator=g)
    fs = ft + noise * torch.randn(ft.shape, generator=g)
    _check(backend, fs.to(device), ft.to(device), tau=tau)


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_long_rows_cpu(layout):
    """HLFD-sized rows (N = 384^2), near the teacher."""
    g = torch.Generator().manual_seed(7)
    ft = torch.randn(1, 18, 384, 384, generator=g)
    fs = ft + 1e-2 * torch.randn(ft.shape, generator=g)
    _check("cpu", make_layout(fs, layout), make_layout(ft, layout), tau=4.0)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_upstream_gradient_and_no_grad(backend, device):
    fs, ft = random_pair((2, 4, 9, 7), (2, 4, 9, 7), device, seed=8)
    loss, grad = loss_and_grad(_fused(backend), fs, ft)
    scaled = fs.detach().requires_grad_(True)
    (2.5 * kdk.channel_wise_kl_loss(scaled, ft, backend=backend)).backward()
    torch.testing.assert_close(scaled.grad, 2.5 * grad, rtol=1e-6, atol=0)
    with torch.no_grad():
        again = kdk.channel_wise_kl_loss(fs.requires_grad_(True), ft, backend=backend)
    assert not again.requires_grad and torch.equal(again, loss)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_teacher_gets_no_gradient(backend, device):
    fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), device, seed=9)
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    kdk.channel_wise_kl_loss(fs, ft, backend=backend).backward()
    assert fs.grad is not None and ft.grad is None


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_non_finite_propagates(backend, device):
    fs, ft = random_pair((2, 3, 7, 9), (2, 3, 7, 9), device, seed=10)
    for bad in (float("nan"), float("inf")):
        for x in (fs, ft):
            y = x.clone()
            y[1, 2, 3, 4] = bad
            args = (y, ft) if x is fs else (fs, y)
            assert not torch.isfinite(kdk.channel_wise_kl_loss(*args, backend=backend))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_deterministic(backend, device):
    fs, ft = random_pair((2, 40, 13, 11), (2, 40, 13, 11), device, seed=11)
    first = loss_and_grad(_fused(backend), fs, ft)
    again = loss_and_grad(_fused(backend), fs, ft)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_thread_count_invariant_cpu(layout):
    """Rows are split into tasks by the thread count, never their arithmetic: same bits."""
    fs, ft = random_pair((2, 40, 13, 11), (2, 40, 13, 11), "cpu", seed=11)
    fs, ft = make_layout(fs, layout), make_layout(ft, layout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grad(_fused("cpu"), fs, ft)
        torch.set_num_threads(4)
        four = loss_and_grad(_fused("cpu"), fs, ft)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])


# --- autograd, operator registration, compile --------------------------------------------------


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("tau", [4.0, 0.5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_cpu(tau, layout):
    fs, ft = random_pair((2, 3, 4, 5), (2, 3, 4, 5), "cpu", dtype=torch.float64, seed=15)
    fs = make_layout(fs, layout).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kdk.channel_wise_kl_loss(x, ft, tau=tau, backend="cpu"), (fs,))


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
def test_opcheck_extension_ops():
    ops = torch.ops.kdkernels
    fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), "cpu", seed=18)
    torch.library.opcheck(ops.channel_wise_kl.default, (fs.requires_grad_(True), ft, 0.5))
    _, stats = ops.channel_wise_kl(fs.detach(), ft, 0.5)
    torch.library.opcheck(ops.channel_wise_kl_backward.default,
                          (torch.tensor(1.5), fs.detach(), ft, stats, 0.5))


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton_ops(device):
    if "triton" not in fused_backends(OP, device):
        pytest.skip(f"no Triton backend on {device} here")
    ops = torch.ops.kdkernels
    fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), device, seed=18)
    torch.library.opcheck(ops.channel_wise_kl_triton.default, (fs.requires_grad_(True), ft, 0.5))
    _, stats = ops.channel_wise_kl_triton(fs.detach(), ft, 0.5)
    torch.library.opcheck(ops.channel_wise_kl_triton_backward.default,
                          (torch.tensor(1.5, device=device), fs.detach(), ft, stats, 0.5))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_compiles_fullgraph(backend, device):
    fs, ft = random_pair((2, 4, 7, 9), (2, 4, 7, 9), device, seed=20)

    @torch.compile(fullgraph=True)
    def step(x, y):
        return kdk.channel_wise_kl_loss(x, y, tau=2.0, backend=backend)

    loss, grad = loss_and_grad(step, fs, ft)
    ref_loss, ref_grad = loss_and_grad(_fused(backend), fs, ft, tau=2.0)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=0)
