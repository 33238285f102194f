"""Fused attention transfer (every backend this build has) against kdkernels.reference."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import (LAYOUTS, assert_close_rel, devices, free_memory_gib, fused_backends,
                     loss_and_grad, make_layout, random_pair)

OP = "attention_transfer_loss"
TARGETS = [(b, d) for d in devices() for b in fused_backends(OP, d)]
IDS = [f"{b}-{d}" for b, d in TARGETS]

# (student shape, teacher shape): odd sizes, B = 1, C = 1 and 3, different channel counts, and
# the student both larger (bilinear downsampling, down to HLFD's factor 8) and smaller.
SAME = [((2, 3, 7, 9), (2, 5, 7, 9)), ((1, 1, 5, 3), (1, 1, 5, 3)), ((3, 3, 1, 11), (3, 2, 1, 11))]
RESIZED = [((2, 3, 13, 11), (2, 4, 5, 7)), ((2, 3, 5, 6), (2, 2, 11, 13)),
           ((1, 3, 24, 24), (1, 2, 3, 3)), ((1, 2, 1, 4), (1, 3, 3, 9))]
REDUCTIONS = ("mean", "batchmean", "sum")


def _compare(backend, device, fs, ft, loss_rtol=1e-5, grad_rtol=1e-4, **kw):
    loss, grad = loss_and_grad(kdk.attention_transfer_loss, fs, ft, backend=backend, **kw)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.attention_transfer_loss, fs, ft, **kw)
    assert loss.dim() == 0 and loss.dtype == ref_loss.dtype
    assert grad.dtype == fs.dtype and grad.shape == fs.shape
    assert_close_rel(loss, ref_loss, loss_rtol, "loss")
    assert_close_rel(grad, ref_grad, grad_rtol, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("shapes", SAME + RESIZED, ids=lambda s: f"{s[0]}->{s[1]}")
@pytest.mark.parametrize("p", [2.0, 4.0, 3.0, 1.5])
def test_matches_reference(backend, device, shapes, p):
    fs, ft = random_pair(*shapes, device, seed=int(p * 10))
    reduction = REDUCTIONS[int(p * 2) % 3]
    _compare(backend, device, fs, ft, p=p, reduction=reduction, resize="bilinear")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shapes", [SAME[0], RESIZED[0], RESIZED[1]], ids=["same", "down", "up"])
def test_layouts(backend, device, layout, shapes):
    fs, ft = random_pair(*shapes, device, seed=3)
    fs = make_layout(fs, layout)
    ft = make_layout(ft, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])  # teacher in another layout
    _compare(backend, device, fs, ft, p=2.0)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shapes", [((2, 70, 6, 5), (2, 100, 6, 5)), ((1, 130, 9, 7), (1, 77, 4, 3))],
                         ids=["same", "down"])
def test_many_channels_on_few_pixels(backend, device, layout, shapes):
    """Deep maps on small grids (HLFD's 512-channel teacher stages): the channel reduction is
    split across programs (Triton, CUDA) and the splits merged in order."""
    fs, ft = random_pair(*shapes, device, seed=6)
    _compare(backend, device, make_layout(fs, layout), make_layout(ft, layout), p=2.0)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("shapes", RESIZED[:2] + [((2, 3, 9, 5), (2, 4, 6, 8))],
                         ids=["student-larger", "teacher-larger", "mixed"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_pool_resize(backend, device, shapes, reduction):
    fs, ft = random_pair(*shapes, device, seed=4)
    _compare(backend, device, fs, ft, p=2.0, resize="pool", reduction=reduction)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shapes", [SAME[0], RESIZED[0]], ids=["same", "down"])
def test_low_precision(backend, device, dtype, shapes):
    # The reference upcasts the same half-precision values to float32, so the losses agree to
    # float32 accuracy; the gradient is rounded once to the input dtype.
    fs, ft = random_pair(*shapes, device, dtype=dtype, seed=5)
    grad_rtol = 4e-3 if dtype == torch.float16 else 2e-2
    _compare(backend, device, fs, ft, loss_rtol=1e-5, grad_rtol=grad_rtol, p=4.0)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("noise", [1.0, 1e-2, 1e-3], ids=["random", "near-1e-2", "near-1e-3"])
def test_float32_against_float64(backend, device, noise):
    """The acceptance bar: float32 within 1e-5 (loss) and 1e-4 (gradient) of float64, also with
    the student near the teacher, where the loss is a small difference of similar maps."""
    g = torch.Generator().manual_seed(6)
    ft = torch.randn(2, 6, 9, 11, generator=g)
    fs = ft + noise * torch.randn(2, 6, 9, 11, generator=g)
    loss, grad = loss_and_grad(kdk.attention_transfer_loss, fs.to(device), ft.to(device),
                                backend=backend)
    # float64 on the very same (float32-representable) inputs: only the arithmetic differs.
    ref_loss, ref_grad = loss_and_grad(kdk.reference.attention_transfer_loss, fs.double(),
                                        ft.double())
    # Near the teacher the float32 maps themselves carry ~1e-7 relative rounding, amplified by
    # 1 / noise in their difference. The loss's bar there is its condition: the change that one
    # rounding of every input (eps |x|) can make, eps * sum |dL/dx * x| over student and teacher
    # (the loss is symmetric in them); one such rounding moves it by a median 0.04 of that here,
    # and the CUDA kernel's FMA-contracted sums land 4x further from float64 than eager's on the
    # H200. The gradient's bar is eager float32's own error (x 2).
    eager_loss, eager_grad = loss_and_grad(kdk.reference.attention_transfer_loss, fs, ft)
    cond = sum((dx * x.double()).abs().sum() for x, dx in (
        (fs, ref_grad), (ft, loss_and_grad(kdk.reference.attention_transfer_loss, ft.double(),
                                           fs.double())[1])))
    for ours, eager, ref, rtol, what in ((loss, eager_loss, ref_loss, 1e-5, "loss"),
                                         (grad, eager_grad, ref_grad, 1e-4, "grad")):
        err = (ours.cpu().double() - ref).abs().max()
        eager_err = (eager.double() - ref).abs().max()
        near = 2.0**-24 * cond if what == "loss" else 2 * eager_err
        bound = max(rtol * ref.abs().max(), near) if noise < 1 else rtol * ref.abs().max()
        if what == "loss":  # a bar eager float32 itself misses would be too tight
            assert eager_err <= bound, f"loss bar {bound:.3e} below eager's error {eager_err:.3e}"
        assert err <= bound, f"{what}: error {err:.3e} vs float64 > {bound:.3e} (eager {eager_err:.3e})"


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_teacher_gets_no_gradient(backend, device):
    fs, ft = random_pair(*RESIZED[0], device)
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    kdk.attention_transfer_loss(fs, ft, backend=backend).backward()
    assert fs.grad is not None and ft.grad is None


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_non_finite_propagates(backend, device):
    fs, ft = random_pair(*SAME[0], device)
    fs[0, 1, 2, 3] = float("nan")
    assert torch.isnan(kdk.attention_transfer_loss(fs, ft, backend=backend))
    fs[0, 1, 2, 3] = float("inf")
    assert not torch.isfinite(kdk.attention_transfer_loss(fs, ft, backend=backend))


@pytest.mark.parametrize("shapes", [SAME[0], RESIZED[0], RESIZED[1]], ids=["same", "down", "up"])
@pytest.mark.parametrize("p", [2.0, 4.0, 2.5])
def test_gradcheck_cpu_kernel(shapes, p):
    if "cpu" not in fused_backends(OP, "cpu"):
        pytest.skip("the CPU extension is not built")
    fs, ft = random_pair(*shapes, "cpu", dtype=torch.float64, seed=7)
    fs.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kdk.attention_transfer_loss(x, ft, p=p, reduction="sum", backend="cpu"), (fs,))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shapes", [SAME[0], RESIZED[0]], ids=["same", "down"])
def test_opcheck_extension_op(device, shapes):
    if not fused_backends(OP, device) or ("cpu" if device == "cpu" else "cuda") not in fused_backends(OP, device):
        pytest.skip(f"the extension has no {device} kernel in this build")
    fs, ft = random_pair(*shapes, device, seed=8)
    fs.requires_grad_(True)
    torch.library.opcheck(torch.ops.kdkernels.attention_transfer.default, (fs, ft, 2.0, "mean"))


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton_op(device):
    if "triton" not in fused_backends(OP, device):
        pytest.skip(f"no Triton backend on {device} here")
    fs, ft = random_pair(*RESIZED[0], device, seed=8)
    fs.requires_grad_(True)
    torch.library.opcheck(torch.ops.kdkernels.attention_transfer_triton.default, (fs, ft, 4.0, "sum"))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_compiles_fullgraph(backend, device):
    fs, ft = random_pair(*RESIZED[0], device, seed=9)

    @torch.compile(fullgraph=True)
    def step(x, y):
        return kdk.attention_transfer_loss(x, y, p=4.0, backend=backend)

    loss, grad = loss_and_grad(step, fs, ft)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.attention_transfer_loss, fs, ft, p=4.0)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "grad")


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in fused_backends(OP, "cpu"), reason="no CPU extension")
def test_over_2_31_elements_cpu():
    """64-bit indexing: a float16 batch of 2^31 + 2 * 2^20 elements agrees with the sum of the
    per-sample losses, each computed on a slice that 32-bit offsets could still address."""
    if free_memory_gib() < 14:
        pytest.skip("needs about 14 GiB of free memory")
    per_sample = (1, 64, 4096, 4096 + 64)
    fs = torch.empty((2,) + per_sample[1:], dtype=torch.float16)
    for b in range(2):
        fs[b].normal_(generator=torch.Generator().manual_seed(b))
    assert fs.numel() > 2**31
    ft = torch.randn(2, 3, 17, 19)  # the student is resampled down to the teacher's grid
    fs.requires_grad_(True)
    loss = kdk.attention_transfer_loss(fs, ft, reduction="sum", backend="cpu")
    loss.backward()
    for b in (0, 1):
        part = fs[b:b + 1].detach().requires_grad_(True)
        expected = kdk.attention_transfer_loss(part, ft[b:b + 1], reduction="sum", backend="cpu")
        expected.backward()
        # Each sample's gradient, last row included (those are the elements past 2^31 for b = 1).
        assert torch.equal(fs.grad[b, :, -3:], part.grad[0, :, -3:])
        assert torch.equal(fs.grad[b, :, :3], part.grad[0, :, :3])
        del part
    totals = [kdk.attention_transfer_loss(fs[b:b + 1].detach(), ft[b:b + 1], reduction="sum",
                                          backend="cpu") for b in (0, 1)]
    torch.testing.assert_close(loss.detach(), sum(totals), rtol=1e-6, atol=0)
