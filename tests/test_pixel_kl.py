"""Fused pixel KL (every backend this build has) against kdkernels.reference."""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from kdkernels import _dispatch
from helpers import (LAYOUTS, assert_close_rel, devices, free_memory_gib, fused_backends,
                     loss_and_grad, make_layout, random_pair)

OP = "pixel_kl_loss"
TARGETS = [(b, d) for d in devices() for b in fused_backends(OP, d)]
IDS = [f"{b}-{d}" for b, d in TARGETS]

# Odd sizes, B = 1, K = 1 (binary), 2, 3, 19 (HLFD classes), classification logits (B, K)
# including Hyper-Kvasir's 23 classes and a binary one.
MAPS = [(2, 3, 7, 9), (1, 1, 5, 3), (3, 2, 1, 11), (2, 19, 3, 5)]
LOGITS = [(5, 23), (1, 3), (4, 1)]


def _mask(shape, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((shape[0],) + tuple(shape[2:]), generator=g) > p


def _compare(backend, device, zs, zt, loss_rtol=1e-5, grad_rtol=1e-4, **kw):
    loss, grad = loss_and_grad(kdk.pixel_kl_loss, zs, zt, backend=backend, **kw)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs, zt, **kw)
    assert loss.dim() == 0 and loss.dtype == ref_loss.dtype
    assert grad.dtype == zs.dtype and grad.shape == zs.shape
    assert_close_rel(loss, ref_loss, loss_rtol, "loss")
    assert_close_rel(grad, ref_grad, grad_rtol, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("shape", MAPS + LOGITS, ids=str)
@pytest.mark.parametrize("temperature,masked", [(4.0, False), (1.0, True), (0.5, False), (2.5, True)])
def test_matches_reference(backend, device, shape, temperature, masked):
    zs, zt = random_pair(shape, shape, device, seed=int(temperature * 10))
    zs, zt = 3 * zs, 3 * zt  # logits of a few units: both the near and the far branch occur
    mask = _mask(shape, seed=1).to(device) if masked else None
    _compare(backend, device, zs, zt, temperature=temperature, mask=mask)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (2, 1, 4, 6), (1, 19, 8, 9)], ids=str)
def test_layouts(backend, device, layout, shape):
    zs, zt = random_pair(shape, shape, device, seed=3)
    zs = make_layout(zs, layout)
    zt = make_layout(zt, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])  # teacher in another layout
    # The mask as a strided view too: every other column of a wider one.
    mask = torch.zeros(shape[0], shape[2], 2 * shape[3], dtype=torch.bool, device=device)
    mask[:, :, ::2] = _mask(shape, seed=3).to(device)
    _compare(backend, device, zs, zt, temperature=2.0, mask=mask[:, :, ::2])
    loss, grad = loss_and_grad(kdk.pixel_kl_loss, zs, zt, backend=backend)
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_strided_logits(backend, device):
    """(B, K) logits with the batch stride 1, and every other sample and class of larger ones."""
    big_s, big_t = random_pair((12, 46), (12, 46), device, seed=4)
    mask = _mask((6,), seed=4).to(device)
    _compare(backend, device, big_s[::2, ::2], big_t[1::2, 1::2], mask=mask)
    zs, zt = big_s[:6, :23], big_t[:6, :23]
    _compare(backend, device, zs.t().contiguous().t(), zt, mask=mask)


def _low_precision_dtypes(backend):
    # The Triton interpreter has no real bfloat16 arithmetic (see triton/_common.py).
    return [torch.float16] if backend == "triton" else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("low", [0, 1], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (2, 1, 5, 5), (5, 23)], ids=str)
def test_low_precision(backend, device, low, shape):
    dtypes = _low_precision_dtypes(backend)
    if low >= len(dtypes):
        pytest.skip("bfloat16 is not exercised under the Triton interpreter")
    dtype = dtypes[low]
    # The reference upcasts the same 16-bit values, so the losses agree to float32 accuracy; the
    # gradient is rounded once to the input dtype.
    zs, zt = random_pair(shape, shape, device, dtype=dtype, seed=5)
    grad_rtol = 4e-3 if dtype == torch.float16 else 2e-2
    _compare(backend, device, zs, zt, grad_rtol=grad_rtol, mask=_mask(shape, 5).to(device))
    # The gradient of channels_last 16-bit maps keeps both the dtype and the layout.
    if len(shape) == 4:
        _compare(backend, device, make_layout(zs, "channels_last"), zt, grad_rtol=grad_rtol)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 1, 5, 3), (5, 23)], ids=str)
def test_float64(backend, device, shape):
    zs, zt = random_pair(shape, shape, device, dtype=torch.float64, seed=6)
    _compare(backend, device, 4 * zs, 4 * zt, loss_rtol=1e-12, grad_rtol=1e-12, temperature=1.5,
             mask=_mask(shape, 6).to(device))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
@pytest.mark.parametrize("noise", [1.0, 1e-2, 1e-3], ids=["random", "near-1e-2", "near-1e-3"])
@pytest.mark.parametrize("shape", [(2, 19, 9, 11), (2, 1, 9, 11), (64, 23)], ids=str)
def test_float32_against_float64(backend, device, noise, shape):
    """The acceptance bar: float32 within 1e-5 (loss) and 1e-4 (gradient) of float64, also with
    the student near the teacher, where KL is O(noise^2) while its terms are O(noise): eager
    float32 is off by 10 % and more at noise 1e-3."""
    g = torch.Generator().manual_seed(7)
    zt = 3 * torch.randn(shape, generator=g)
    zs = zt + noise * torch.randn(shape, generator=g)
    mask = _mask(shape, 7)
    loss, grad = loss_and_grad(kdk.pixel_kl_loss, zs.to(device), zt.to(device), backend=backend,
                               mask=mask.to(device))
    # float64 on the very same (float32-representable) inputs: only the arithmetic differs.
    ref_loss, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs.double(), zt.double(),
                                       mask=mask)
    assert_close_rel(loss.cpu(), ref_loss, 1e-5, "loss")
    assert_close_rel(grad.cpu(), ref_grad, 1e-4, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_two_pass_channel_walk(backend, device, monkeypatch):
    """More channels than one tile holds (HLFD's K = 256 features and beyond)."""
    if backend == "triton":
        import kdkernels.triton.pixel_kl as tpk

        monkeypatch.setattr(tpk, "_MAX_TILE_K", 4)  # the interpreter is slow: walk 11 channels
        shape = (2, 11, 3, 5)
    else:  # the CUDA kernel holds 32 x 16 logits per pixel in registers: 600 are re-read
        shape = (2, 600, 3, 5)
    zs, zt = random_pair(shape, shape, device, seed=8)
    _compare(backend, device, 2 * zs, 2 * zt, mask=_mask(shape, 8).to(device))
    # Near the teacher in float16: against float64 on the same values (eager float32 is off).
    zs16, zt16 = (zt + 1e-2 * zs).to(torch.float16), zt.to(torch.float16)
    loss, grad = loss_and_grad(kdk.pixel_kl_loss, zs16, zt16, backend=backend)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs16.double(), zt16.double())
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    # Gradients this small are float16 subnormals: one rounding is 2^-25 absolute.
    torch.testing.assert_close(grad, ref_grad.to(torch.float16), rtol=1e-3, atol=2**-24)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_mixed_dtypes(backend, device):
    zs, zt = random_pair((2, 3, 5, 4), (2, 3, 5, 4), device, seed=9)
    for s_dtype, t_dtype in [(torch.float16, torch.float32), (torch.float32, torch.float64)]:
        s, t = zs.to(s_dtype), zt.to(t_dtype)
        loss, grad = loss_and_grad(kdk.pixel_kl_loss, s, t, backend=backend)
        ref_loss, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, s, t)
        assert grad.dtype == s_dtype and loss.dtype == ref_loss.dtype
        assert_close_rel(loss, ref_loss, 1e-5, "loss")
        assert_close_rel(grad, ref_grad, 4e-3, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_masked_pixels_may_hold_anything(backend, device):
    shape = (2, 3, 4, 5)
    zs, zt = random_pair(shape, shape, device, seed=10)
    mask = torch.ones(2, 4, 5, dtype=torch.bool, device=device)
    mask[1, 2, 3] = False
    mask[0, 0, 0] = False
    expected, expected_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs, zt, mask=mask)
    zs[1, :, 2, 3] = float("nan")
    zt[1, 0, 2, 3] = float("inf")
    zs[0, 1, 0, 0] = float("-inf")
    zt[0, 2, 0, 0] = float("nan")
    loss, grad = loss_and_grad(kdk.pixel_kl_loss, zs, zt, backend=backend, mask=mask)
    assert_close_rel(loss, expected, 1e-5, "loss")
    assert torch.isfinite(grad).all() and grad[1, :, 2, 3].eq(0).all() and grad[0, :, 0, 0].eq(0).all()
    assert_close_rel(grad, expected_grad, 1e-4, "grad")


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_nothing_counted(backend, device):
    """An all-False mask is refused by pixel_kl_loss, but inside torch.compile (no check) it
    reaches the kernel: NaN (0 / 0) like the reference, a zero gradient, no crash."""
    zs, zt = random_pair((2, 3, 4, 5), (2, 3, 4, 5), device, seed=11)
    mask = torch.zeros(2, 4, 5, dtype=torch.bool, device=device)
    kernel = _dispatch.resolve(OP, backend, zs.device)
    loss, grad = loss_and_grad(lambda a, b: kernel(a, b, 4.0, mask), zs, zt)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs, zt, mask=mask)
    assert torch.isnan(loss) and torch.isnan(ref_loss)
    assert torch.equal(grad, ref_grad) and not grad.any()


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_non_finite_propagates(backend, device):
    zs, zt = random_pair((2, 3, 4, 5), (2, 3, 4, 5), device, seed=12)
    for value in (float("nan"), float("inf")):
        for target in (zs, zt):
            s, t = zs.clone(), zt.clone()
            (s if target is zs else t)[1, 2, 3, 4] = value
            assert not torch.isfinite(kdk.pixel_kl_loss(s, t, backend=backend))


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_autograd_contract(backend, device):
    """The teacher gets no gradient, the upstream gradient scales, no_grad calls work, and the
    forward is bitwise reproducible."""
    zs, zt = random_pair((2, 3, 5, 4), (2, 3, 5, 4), device, seed=13)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    (3.0 * kdk.pixel_kl_loss(zs, zt, backend=backend)).backward()
    assert zs.grad is not None and zt.grad is None
    _, unit = loss_and_grad(kdk.pixel_kl_loss, zs, zt, backend=backend)
    assert_close_rel(zs.grad, 3.0 * unit, 1e-6, "scaled grad")
    with torch.no_grad():
        a = kdk.pixel_kl_loss(zs, zt, backend=backend)
    b = kdk.pixel_kl_loss(zs.detach(), zt, backend=backend)
    assert not a.requires_grad and torch.equal(a, b)


@pytest.mark.parametrize("shape,masked", [((2, 3, 4, 5), True), ((1, 1, 3, 4), True),
                                          ((2, 19, 2, 3), False), ((6, 23), True), ((3, 1), False)],
                         ids=str)
def test_gradcheck_cpu_kernel(shape, masked):
    if "cpu" not in fused_backends(OP, "cpu"):
        pytest.skip("the CPU extension is not built")
    zs, zt = random_pair(shape, shape, "cpu", dtype=torch.float64, seed=14)
    zs.requires_grad_(True)
    mask = _mask(shape, 14) if masked else None
    assert torch.autograd.gradcheck(
        lambda x: kdk.pixel_kl_loss(x, zt, temperature=2.0, mask=mask, backend="cpu"), (zs,))


def _opcheck_cases(device):
    zs, zt = random_pair((2, 3, 5, 4), (2, 3, 5, 4), device, seed=15)
    ls, lt = random_pair((6, 23), (6, 23), device, seed=15)
    zs.requires_grad_(True)
    ls.requires_grad_(True)
    mask = _mask((2, 3, 5, 4), 15).to(device)
    return [(zs, zt, 4.0, None, True), (zs, zt, 2.0, mask, True),
            (zs.detach(), zt, 1.0, mask, False), (ls, lt, 4.0, None, True)]


@pytest.mark.parametrize("device", devices())
def test_opcheck_extension_op(device):
    key = "cpu" if device == "cpu" else "cuda"
    if key not in fused_backends(OP, device):
        pytest.skip(f"the extension has no {device} kernel in this build")
    for args in _opcheck_cases(device):
        torch.library.opcheck(torch.ops.kdkernels.pixel_kl.default, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_triton_op(device):
    if "triton" not in fused_backends(OP, device):
        pytest.skip(f"no Triton backend on {device} here")
    for args in _opcheck_cases(device)[1:3]:
        torch.library.opcheck(torch.ops.kdkernels.pixel_kl_triton.default, args)


@pytest.mark.parametrize("backend,device", TARGETS, ids=IDS)
def test_compiles_fullgraph(backend, device):
    zs, zt = random_pair((2, 3, 5, 7), (2, 3, 5, 7), device, seed=16)
    mask = _mask((2, 3, 5, 7), 16).to(device)

    @torch.compile(fullgraph=True)
    def step(x, y):
        return kdk.pixel_kl_loss(x, y, temperature=2.0, mask=mask, backend=backend)

    loss, grad = loss_and_grad(step, zs, zt)
    ref_loss, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs, zt, temperature=2.0,
                                       mask=mask)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-4, "grad")


@pytest.mark.slow
@pytest.mark.skipif("cpu" not in fused_backends(OP, "cpu"), reason="no CPU extension")
def test_over_2_31_elements_cpu():
    """64-bit indexing: a float16 student of 2^31 + 2^25 elements (the teacher a broadcast view)
    gives the mean of the per-sample losses, each computed on a slice that 32-bit offsets could
    still address."""
    if free_memory_gib() < 8:
        pytest.skip("needs about 8 GiB of free memory")
    per_sample = (64, 4096, 4096 + 128)
    zs = torch.empty((2,) + per_sample, dtype=torch.float16)
    for b in range(2):
        zs[b].normal_(generator=torch.Generator().manual_seed(b))
    assert zs.numel() > 2**31
    zt = torch.randn(1, 64, 1, 4096 + 128).to(torch.float16).expand_as(zs)
    mask = torch.ones(2, 4096, 4096 + 128, dtype=torch.bool)
    mask[1, -1, -3:] = False  # the very last pixels, past 2^31 elements
    with torch.no_grad():
        loss = kdk.pixel_kl_loss(zs, zt, mask=mask, backend="cpu")
        parts = [kdk.pixel_kl_loss(zs[b:b + 1], zt[b:b + 1], mask=mask[b:b + 1], backend="cpu")
                 for b in (0, 1)]
    counts = mask.flatten(1).sum(1).double()
    expected = (parts[0] * counts[0] + parts[1] * counts[1]) / counts.sum()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
