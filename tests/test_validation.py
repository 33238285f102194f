"""Bad input (SPEC section 2) gets a ValueError naming the argument, the shapes and the expectation."""

from __future__ import annotations

import re

import pytest
import torch

import kdkernels as kdk
from helpers import all_backends, assert_close_rel, loss_and_grad

F4 = (2, 3, 6, 6)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device) if dtype.is_floating_point \
        else torch.ones(*shape, dtype=dtype, device=device)


# (op, student argument name, extra kwargs, a valid student, a valid teacher)
PAIRS = [
    (kdk.attention_transfer_loss, "fs", {}, _t(*F4), _t(*F4)),
    (kdk.channel_relation_loss, "fs", {}, _t(*F4), _t(*F4)),
    (kdk.pixel_relation_loss, "fs", {}, _t(*F4), _t(*F4)),
    (kdk.sgm_loss, "ps", {}, _t(*F4), _t(*F4)),
    (kdk.logit_attention_loss, "ps", {}, _t(*F4), _t(*F4)),
    (kdk.pixel_kl_loss, "zs", {}, _t(*F4), _t(*F4)),
    (kdk.channel_wise_kl_loss, "fs", {}, _t(*F4), _t(*F4)),
    (kdk.structure_loss, "logits", {}, _t(2, 1, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()),
]
IDS = [p[0].__name__ for p in PAIRS]


@pytest.mark.parametrize("fn,name,kw,s,t", PAIRS, ids=IDS)
def test_valid_inputs_pass(fn, name, kw, s, t):
    assert torch.isfinite(fn(s, t, **kw))


@pytest.mark.parametrize("fn,name,kw,s,t", PAIRS, ids=IDS)
def test_wrong_rank(fn, name, kw, s, t):
    shape = re.escape(str(tuple(s.shape) + (1,)))
    with pytest.raises(ValueError, match=rf"{fn.__name__}: {name} must be .*got a 5-D tensor of shape {shape}"):
        fn(s.unsqueeze(-1), t, **kw)


@pytest.mark.parametrize("fn,name,kw,s,t", PAIRS, ids=IDS)
def test_integer_dtype(fn, name, kw, s, t):
    with pytest.raises(ValueError, match=rf"{name} must be float16, bfloat16, float32 or float64, got torch.int64"):
        fn(s.long(), t, **kw)


@pytest.mark.parametrize("fn,name,kw,s,t", PAIRS, ids=IDS)
def test_empty(fn, name, kw, s, t):
    with pytest.raises(ValueError, match=rf"{name} is empty \(shape \(0, "):
        fn(s[:0], t[:0], **kw)


@pytest.mark.parametrize("fn,name,kw,s,t", PAIRS[:-1], ids=IDS[:-1])
def test_batch_mismatch(fn, name, kw, s, t):
    with pytest.raises(ValueError, match=r"same batch size|equal shapes"):
        fn(s, t[:1], **kw)


@pytest.mark.parametrize("fn,name,kw,s,t", PAIRS, ids=IDS)
def test_meta_device_mismatch(fn, name, kw, s, t):
    with pytest.raises(ValueError, match=r"is on cpu but .* is on meta"):
        fn(s, t.to("meta"), **kw)


def test_structure_mask_shape_and_dtype():
    logits = _t(2, 1, 6, 6)
    with pytest.raises(ValueError, match=r"mask must have the shape of logits \(2, 1, 6, 6\), got \(2, 1, 6, 5\)"):
        kdk.structure_loss(logits, torch.zeros(2, 1, 6, 5))
    with pytest.raises(ValueError, match=r"mask must be a floating or bool tensor"):
        kdk.structure_loss(logits, torch.zeros(2, 1, 6, 6, dtype=torch.int64))


@pytest.mark.parametrize("fn,kw", [
    (kdk.channel_relation_loss, {}), (kdk.channel_wise_kl_loss, {}),
])
def test_channel_mismatch(fn, kw):
    with pytest.raises(ValueError, match=r"equal (channel counts|shapes), got shapes \(2, 3, 6, 6\) and \(2, 4, 6, 6\)"):
        fn(_t(2, 3, 6, 6), _t(2, 4, 6, 6), **kw)


@pytest.mark.parametrize("fn", [kdk.channel_relation_loss, kdk.pixel_relation_loss,
                                kdk.channel_wise_kl_loss, kdk.sgm_loss, kdk.pixel_kl_loss])
def test_spatial_mismatch(fn):
    with pytest.raises(ValueError, match=r"\(2, 3, 6, 6\) and \(2, 3, 6, 4\)"):
        fn(_t(2, 3, 6, 6), _t(2, 3, 6, 4))


def test_pixel_relation_allows_channel_mismatch():
    assert torch.isfinite(kdk.pixel_relation_loss(_t(2, 3, 5, 4), _t(2, 7, 5, 4)))


def test_attention_transfer_resize_none_needs_equal_sizes():
    with pytest.raises(ValueError, match=r"resize=None needs fs and ft with equal spatial sizes, got shapes \(2, 3, 6, 6\) and \(2, 3, 4, 4\)"):
        kdk.attention_transfer_loss(_t(2, 3, 6, 6), _t(2, 3, 4, 4), resize=None)


def test_sgm_needs_square_maps():
    with pytest.raises(ValueError, match=r"square \(H == W\).*\(2, 1, 6, 5\)"):
        kdk.sgm_loss(_t(2, 1, 6, 5), _t(2, 1, 6, 5))


@pytest.mark.parametrize("fn,param", [
    (kdk.attention_transfer_loss, "p"), (kdk.channel_relation_loss, "tau"),
    (kdk.pixel_relation_loss, "tau"), (kdk.logit_attention_loss, "tau"),
    (kdk.pixel_kl_loss, "temperature"), (kdk.channel_wise_kl_loss, "tau"),
])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_parameters(fn, param, value):
    with pytest.raises(ValueError, match=rf"{param} must be a finite number > 0, got {value!r}"):
        fn(_t(*F4), _t(*F4), **{param: value})


@pytest.mark.parametrize("fn,kw,allowed", [
    (kdk.attention_transfer_loss, {"reduction": "avg"}, "reduction"),
    (kdk.attention_transfer_loss, {"resize": "nearest"}, "resize"),
    (kdk.channel_relation_loss, {"normalize": "l1"}, "normalize"),
    (kdk.channel_relation_loss, {"distance": "l1"}, "distance"),
    (kdk.pixel_relation_loss, {"distance": "cos"}, "distance"),
    (kdk.sgm_loss, {"distance": "kl"}, "distance"),
])
def test_unknown_options(fn, kw, allowed):
    with pytest.raises(ValueError, match=rf"{allowed} must be one of"):
        fn(_t(*F4), _t(*F4), **kw)


def test_pixel_kl_mask_checks():
    zs, zt = _t(2, 3, 5, 4), _t(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5, 4\)"):
        kdk.pixel_kl_loss(zs, zt, mask=torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor"):
        kdk.pixel_kl_loss(zs, zt, mask=torch.ones(2, 5, 4))
    mask = torch.rand(2, 5, 4) > 0.3
    assert torch.isfinite(kdk.pixel_kl_loss(zs, zt, mask=mask))


def test_b1_works_everywhere():
    for fn, _, kw, s, t in PAIRS:
        assert torch.isfinite(fn(s[:1], t[:1], **kw)), fn.__name__


# --- pixel_kl_loss: a mask must select at least one pixel ------------------------------------

PKL_TARGETS = all_backends("pixel_kl_loss")
PKL_IDS = [f"{b}-{d}" for b, d in PKL_TARGETS]
# (B, K, H, W) maps with a (B, H, W) mask, binary maps, (B, K) logits with a (B,) mask.
PKL_SHAPES = [(2, 3, 5, 4), (3, 1, 4, 4), (4, 7), (3, 1)]


@pytest.mark.parametrize("backend,device", PKL_TARGETS, ids=PKL_IDS)
@pytest.mark.parametrize("shape", PKL_SHAPES, ids=str)
def test_pixel_kl_all_false_mask_raises(backend, device, shape):
    """CPU tensors: ValueError. CUDA tensors: the host never reads the mask (no sync), so the loss
    is NaN (0 / 0), as inside torch.compile; the fused kernels leave a zero gradient."""
    zs, zt = _t(*shape, device=device), _t(*shape, device=device)
    mask = torch.zeros((shape[0],) + shape[2:], dtype=torch.bool, device=device)
    if device == "cpu":
        expected = re.escape(f"mask selects no pixel (all False, shape {tuple(mask.shape)})")
        with pytest.raises(ValueError, match=expected):
            kdk.pixel_kl_loss(zs, zt, mask=mask, backend=backend)
        return
    zs.requires_grad_(True)
    loss = kdk.pixel_kl_loss(zs, zt, mask=mask, backend=backend)
    (grad,) = torch.autograd.grad(loss, zs)
    assert torch.isnan(loss)
    if backend != "torch":
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("backend,device", PKL_TARGETS, ids=PKL_IDS)
@pytest.mark.parametrize("shape", PKL_SHAPES, ids=str)
def test_pixel_kl_single_counted_pixel(backend, device, shape):
    """One True pixel is enough: the reference (float64) with that mask, which is the unmasked
    loss of that pixel alone."""
    g = torch.Generator().manual_seed(11)  # fixed draws: the torch backend's K = 1 bar is a bound
    zs, zt = (torch.randn(*shape, generator=g).to(device) for _ in range(2))
    mask = torch.zeros((shape[0],) + shape[2:], dtype=torch.bool, device=device)
    mask.view(-1)[mask.numel() // 2] = True
    loss, grad = loss_and_grad(kdk.pixel_kl_loss, zs, zt, mask=mask, backend=backend)
    ref, ref_grad = loss_and_grad(kdk.reference.pixel_kl_loss, zs.double(), zt.double(), mask=mask)
    pixel = lambda z: z.movedim(1, -1).reshape(-1, shape[1])[mask.numel() // 2:][:1]  # noqa: E731
    alone = kdk.reference.pixel_kl_loss(pixel(zs).double(), pixel(zt).double())
    assert torch.isfinite(loss) and loss > 0
    # The torch backend's float32 Bernoulli KL (K = 1) is a difference of log-sigmoids that
    # cancels (3e-5 relative here); the fused kernels keep 1e-6 of float64.
    assert_close_rel(loss, ref, 1e-4 if backend == "torch" else 1e-5, "loss vs reference")
    assert_close_rel(ref, alone, 1e-6, "reference vs the pixel alone")
    assert_close_rel(grad, ref_grad, 1e-4, "gradient")
    # Only the counted pixel gets a gradient.
    assert torch.equal(grad.movedim(1, -1)[~mask] != 0, torch.zeros_like(grad.movedim(1, -1)[~mask],
                                                                          dtype=torch.bool))


def test_pixel_kl_mask_check_skipped_without_values():
    """Meta and fake tensors have no values to check (shape propagation, FakeTensorMode): the
    mask check must not read them. Such calls used to fail in mask.any()."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    zs = torch.empty(2, 3, 5, 4, device="meta", requires_grad=True)
    mask = torch.zeros(2, 5, 4, dtype=torch.bool, device="meta")
    loss = kdk.pixel_kl_loss(zs, zs.detach(), mask=mask, backend="torch")
    assert loss.device.type == "meta" and loss.shape == ()
    backends = ["torch"] + (["cpu"] if kdk.backends()["cpu"]["available"] else [])
    with FakeTensorMode():
        zs, zt = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
        mask = torch.zeros(2, 5, 4, dtype=torch.bool)
        for backend in backends:
            loss = kdk.pixel_kl_loss(zs, zt, mask=mask, backend=backend)
            assert loss.shape == () and loss.dtype == torch.float32, backend
