"""Fused SGM loss (every backend this build has) against kdkernels.reference.

The kernels work on 32 x 32 tile pairs: the sizes below are odd (edge tiles everywhere), a
single pixel, and up to 3 x 3 tiles (diagonal, off-diagonal and edge pairs together).
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import (LAYOUTS, assert_close_rel, devices, free_memory_gib, fused_backends,
                     loss_and_grad, make_layout, random_pair)

OP = "sgm_loss"
TARGETS = [(b, d) for d in devices() for b in fused_backends(OP, d)]
IDS = [f"{b}-{d}" for b, d in TARGETS]
HAS_CPU = "cpu" in fused_backends(OP, "cpu")
DISTANCES = ("mse", "l1")

# B = 1, K = 1 and 3, 3-D maps, H = 1, odd H, H = 70 (3 tile bands, the last of 6 rows) and
# H = 300 (10 bands; not under the Triton interpreter).
SHAPES = [(2, 3, 7, 7), (1, 1, 37, 37), (1, 5, 5), (3, 1, 1, 1), (2, 33, 33), (1, 2, 70, 70),
          (2, 1, 300, 300)]


def _is_interpreted(backend, device):
    return backend == "triton" and device == "cpu"


def _compare(backend, fs, ft, loss_rtol=1e-5, grad_rtol=1e-4, scale=1.0, **kw):
    """Loss and gradient of scale * loss against the reference on the same values."""
    def fused(a, b, **k):
        return scale * kdk.sgm_loss(a, b, backend=backend, **k)

    def ref(a, b, **k):
        return scale * kdk.reference.sgm_loss(a, b, **k)

    loss, grad = loss_and_grad(fused, fs, ft, **kw)
    ref_loss, ref_grad = loss_and_grad(ref, fs, ft, **kw)
    assert loss.dim() == 0 and loss.dtype == ref_loss.dtype
    assert grad.dtype == fs.dtype and grad.shape == fs.shape
    assert_close_rel(loss, ref_loss, loss_rtol, "loss")
    assert_close_rel(grad, ref_grad, grad_rtol, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("distance", DISTANCES)
def test_matches_reference(backend, device, shape, distance):
    if _is_interpreted(backend, device) and shape[-1] > 40:
        pytest.skip("kept small for the Triton interpreter")
    fs, ft = random_pair(shape, shape, device, seed=shape[-1])
    _compare(backend, fs, ft, distance=distance)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_layouts(backend, device, layout, distance):
    fs, ft = random_pair((2, 3, 37, 37), (2, 3, 37, 37), device, seed=3)
    fs = make_layout(fs, layout)
    ft = make_layout(ft, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])  # teacher in another layout
    _compare(backend, fs, ft, distance=distance)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("distance", DISTANCES)
def test_dtypes(backend, device, dtype, distance):
    if dtype == torch.bfloat16 and _is_interpreted(backend, device):
        pytest.skip("the Triton interpreter has no real bfloat16")
    fs, ft = random_pair((2, 3, 37, 37), (2, 3, 37, 37), device, dtype=dtype, seed=5)
    # The reference upcasts the same 16-bit values, so the losses agree to float32 accuracy; the
    # gradient is rounded to the input dtype once, then scaled by the upstream 0.3 (a second
    # rounding).
    grad_rtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}[dtype]
    loss_rtol = 1e-12 if dtype == torch.float64 else 1e-5
    _compare(backend, fs, ft, loss_rtol=loss_rtol, grad_rtol=grad_rtol, scale=0.3, distance=distance)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_mixed_dtypes(backend, device):
    fs, ft = random_pair((2, 3, 7, 7), (2, 3, 7, 7), device, seed=6)
    _compare(backend, fs.half(), ft, grad_rtol=2e-3)
    _compare(backend, fs, ft.double())


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("noise", [1.0, 1e-2, 1e-3], ids=["random", "near-1e-2", "near-1e-3"])
@pytest.mark.parametrize("distance", DISTANCES)
def test_float32_against_float64(backend, device, noise, distance):
    """D = ps - pt is formed from the inputs before the symmetrisation, so the float32 result
    stays within 1e-5 (loss) and 1e-4 (gradient) of float64 near the teacher too, where eager
    float32 (P + P^T first, then the difference) loses digits."""
    g = torch.Generator().manual_seed(7)
    ft = torch.randn(2, 3, 37, 37, generator=g)
    fs = ft + noise * torch.randn(2, 3, 37, 37, generator=g)
    loss, grad = loss_and_grad(kdk.sgm_loss, fs.to(device), ft.to(device), distance=distance,
                               backend=backend)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.sgm_loss, fs.double(), ft.double(),
                                       distance=distance)
    assert_close_rel(loss.cpu(), ref_loss, 1e-5, "loss")
    assert_close_rel(grad.cpu(), ref_grad, 1e-4, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_l1_gradient_is_zero_where_the_maps_agree(backend, device):
    # abs'(0) = 0, as in the reference's autograd. Student and teacher antisymmetric on a block
    # that straddles tiles make M exactly 0 there (fl(a - b) = -fl(b - a)).
    fs, ft = random_pair((1, 1, 37, 37), (1, 1, 37, 37), device, seed=8)
    for x in (fs, ft):
        block = x[..., 20:36, 20:36]
        block.copy_(block - block.transpose(-1, -2))
    _, grad = loss_and_grad(kdk.sgm_loss, fs, ft, distance="l1", backend=backend)
    _, ref_grad = loss_and_grad(kdk.reference.sgm_loss, fs, ft, distance="l1")
    assert (ref_grad[..., 20:36, 20:36] == 0).all()
    assert torch.equal(grad, ref_grad)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_teacher_gets_no_gradient_and_no_grad_works(backend, device):
    fs, ft = random_pair((2, 1, 37, 37), (2, 1, 37, 37), device)
    expected = kdk.reference.sgm_loss(fs, ft)
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    kdk.sgm_loss(fs, ft, backend=backend).backward()
    assert fs.grad is not None and ft.grad is None
    with torch.no_grad():
        assert_close_rel(kdk.sgm_loss(fs, ft, backend=backend), expected, 1e-5, "no_grad loss")
    assert_close_rel(kdk.sgm_loss(fs.detach(), ft, backend=backend), expected, 1e-5, "no-grad input")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_deterministic_and_symmetric(backend, device):
    fs, ft = random_pair((1, 2, 37, 37), (1, 2, 37, 37), device, seed=9)
    loss1, grad1 = loss_and_grad(kdk.sgm_loss, fs, ft, backend=backend)
    loss2, grad2 = loss_and_grad(kdk.sgm_loss, fs, ft, backend=backend)
    assert torch.equal(loss1, loss2) and torch.equal(grad1, grad2)
    assert torch.equal(grad1, grad1.transpose(-1, -2))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_non_finite_propagates(backend, device, distance):
    fs, ft = random_pair((1, 1, 5, 5), (1, 1, 5, 5), device)
    fs[0, 0, 1, 3] = float("nan")
    assert torch.isnan(kdk.sgm_loss(fs, ft, distance, backend=backend))
    fs[0, 0, 1, 3] = float("inf")
    assert not torch.isfinite(kdk.sgm_loss(fs, ft, distance, backend=backend))


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", [(2, 2, 7, 7), (1, 35, 35)], ids=str)
def test_gradcheck_cpu_kernel(distance, shape):
    fs, ft = random_pair(shape, shape, "cpu", dtype=torch.float64, seed=10)
    fs.requires_grad_(True)
    # Fast mode (a random projection of the Jacobian) for the 2 x 2 tile case: the full one
    # would take 2 * 1225 forward calls.
    assert torch.autograd.gradcheck(
        lambda x: kdk.sgm_loss(x, ft, distance=distance, backend="cpu"), (fs,),
        fast_mode=shape[-1] > 32)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("need_grad", [True, False])
def test_opcheck_extension_op(device, need_grad):
    if ("cpu" if device == "cpu" else "cuda") not in fused_backends(OP, device):
        pytest.skip(f"the extension has no {device} kernel in this build")
    fs, ft = random_pair((2, 3, 37, 37), (2, 3, 37, 37), device, seed=11)
    fs = make_layout(fs, "channels_last").requires_grad_(need_grad)
    torch.library.opcheck(torch.ops.kdkernels.sgm.default, (fs, ft, "mse", need_grad))
    torch.library.opcheck(torch.ops.kdkernels.sgm.default, (fs[:, 0], ft[:, 0], "l1", need_grad))


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton_op(device):
    if "triton" not in fused_backends(OP, device):
        pytest.skip(f"no Triton backend on {device} here")
    fs, ft = random_pair((1, 2, 37, 37), (1, 2, 37, 37), device, seed=12)
    fs.requires_grad_(True)
    torch.library.opcheck(torch.ops.kdkernels.sgm_triton.default, (fs, ft, "l1", True))


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
def test_compiles_fullgraph_cpu():
    fs, ft = random_pair((2, 1, 37, 37), (2, 1, 37, 37), "cpu", seed=13)

    @torch.compile(fullgraph=True)
    def step(x, y):
        return kdk.sgm_loss(x, y, backend="cpu") + 0.5 * kdk.sgm_loss(x, y, "l1", backend="cpu")

    def ref(x, y):
        return kdk.reference.sgm_loss(x, y) + 0.5 * kdk.reference.sgm_loss(x, y, "l1")

    loss, grad = loss_and_grad(step, fs, ft)
    ref_loss, ref_grad = loss_and_grad(ref, fs, ft)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "grad")


@pytest.mark.skipif(not HAS_CPU, reason="the CPU extension is not built")
def test_offsets_past_2_31_cpu():
    """64-bit offsets: the second sample of ps starts 2^31 elements into its storage (a 4 GiB
    float16 buffer of which only the used pages are ever touched)."""
    if free_memory_gib() < 5:
        pytest.skip("needs about 5 GiB of free memory to reserve")
    big = torch.empty(2**31 + 1024, dtype=torch.float16)
    fs = big.as_strided((2, 2, 5, 5), (2**31, 25, 5, 1))
    small, ft = random_pair((2, 2, 5, 5), (2, 2, 5, 5), "cpu", dtype=torch.float16, seed=14)
    fs.copy_(small)
    _compare("cpu", fs, ft, grad_rtol=1e-3)
