"""Backend selection, kdk.backends(), the nn.Module wrappers and torch.compile of every op."""

from __future__ import annotations

import importlib

import pytest
import torch

import kdkernels as kdk
from kdkernels import _dispatch
from helpers import assert_close_rel

OPS = ["attention_transfer_loss", "channel_relation_loss", "pixel_relation_loss", "sgm_loss",
       "logit_attention_loss", "pixel_kl_loss", "channel_wise_kl_loss", "structure_loss"]
MODULES = ["AttentionTransferLoss", "ChannelRelationLoss", "PixelRelationLoss", "SGMLoss",
           "LogitAttentionLoss", "PixelKLLoss", "ChannelWiseKLLoss", "StructureLoss"]


def _inputs(op, seed=0):
    g = torch.Generator().manual_seed(seed)
    if op == "structure_loss":
        return torch.randn(2, 1, 9, 9, generator=g), (torch.rand(2, 1, 9, 9, generator=g) > 0.5).float()
    return torch.randn(2, 3, 7, 7, generator=g), torch.randn(2, 3, 7, 7, generator=g)


def test_backends_report_is_truthful():
    status = kdk.backends()
    assert set(status) == {"torch", "triton", "cuda", "cpu"}
    assert status["torch"]["available"] and set(status["torch"]["ops"]) == set(OPS)
    try:
        importlib.import_module("kdkernels._C")
        has_ext = True
    except ImportError:
        has_ext = False
    assert status["cpu"]["available"] == has_ext
    cuda_kernels = has_ext and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kdkernels::attention_transfer", "CUDA")
    assert status["cuda"]["available"] == (cuda_kernels and torch.cuda.is_available())
    for name, s in status.items():
        assert s["available"] == (s["reason"] == ""), name


def test_unknown_backend_is_a_value_error():
    fs, ft = _inputs("attention_transfer_loss")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of torch, triton, cuda, cpu, got 'fast'"):
        kdk.attention_transfer_loss(fs, ft, backend="fast")


@pytest.mark.parametrize("name", ["cuda", "triton", "cpu"])
def test_unavailable_backend_says_why(name):
    status = kdk.backends()[name]
    if status["available"]:
        pytest.skip(f"{name} is available here")
    fs, ft = _inputs("attention_transfer_loss")
    with pytest.raises(RuntimeError, match=rf"backend '{name}' is not available: .+"):
        kdk.attention_transfer_loss(fs, ft, backend=name)


def test_op_without_fused_backend_says_so(monkeypatch):
    # Available backends may implement every op: hide one implementation to reach the error.
    fused = [n for n, s in kdk.backends().items() if n != "torch" and s["available"]]
    if not fused:
        pytest.skip("no fused backend is available here")
    monkeypatch.delitem(_dispatch._IMPLS["sgm_loss"], fused[0], raising=False)
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})  # forget what earlier calls resolved
    ps, pt = _inputs("sgm_loss")
    with pytest.raises(RuntimeError, match=rf"no fused '{fused[0]}' implementation of this op yet"):
        kdk.sgm_loss(ps, pt, backend=fused[0])


def test_cpu_backend_refuses_other_devices():
    if not kdk.backends()["cpu"]["available"]:
        pytest.skip("no CPU extension")
    fs, ft = _inputs("attention_transfer_loss")
    with pytest.raises((RuntimeError, ValueError)):
        kdk.attention_transfer_loss(fs.to("meta"), ft.to("meta"), backend="cpu")


def test_auto_picks_the_compiled_kernel_on_cpu(monkeypatch):
    if not kdk.backends()["cpu"]["available"]:
        pytest.skip("no CPU extension")
    fs, ft = _inputs("attention_transfer_loss")
    calls = []
    original = torch.ops.kdkernels.attention_transfer
    monkeypatch.setattr(torch.ops.kdkernels, "attention_transfer",
                        lambda *a: calls.append(1) or original(*a))
    kdk.attention_transfer_loss(fs, ft)
    assert calls, "auto did not use the CPU kernel"
    calls.clear()
    monkeypatch.setenv("KDKERNELS_BACKEND", "torch")
    kdk.attention_transfer_loss(fs, ft)
    assert not calls, "KDKERNELS_BACKEND=torch did not override auto"
    kdk.attention_transfer_loss(fs, ft, backend="cpu")
    assert calls, "an explicit backend must win over KDKERNELS_BACKEND"


def test_env_override_to_unavailable_backend_raises(monkeypatch):
    if kdk.backends()["cuda"]["available"]:
        pytest.skip("cuda is available here")
    monkeypatch.setenv("KDKERNELS_BACKEND", "cuda")
    fs, ft = _inputs("attention_transfer_loss")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        kdk.attention_transfer_loss(fs, ft)


@pytest.mark.parametrize("op,module", list(zip(OPS, MODULES)))
def test_modules_match_functions(op, module):
    kw = {"tau": 3.0} if op in ("channel_relation_loss", "channel_wise_kl_loss") else {}
    s, t = _inputs(op, seed=1)
    criterion = getattr(kdk.losses, module)(**kw)
    assert isinstance(criterion, torch.nn.Module)
    torch.testing.assert_close(criterion(s, t), getattr(kdk, op)(s, t, **kw), rtol=0, atol=0)
    if kw:
        assert "tau=3.0" in repr(criterion)


@pytest.mark.parametrize("op", OPS)
def test_compiles_fullgraph_and_matches_reference(op):
    s, t = _inputs(op, seed=2)
    fn = getattr(kdk, op)
    compiled = torch.compile(lambda a, b: fn(a, b), fullgraph=True, backend="aot_eager")
    s = s.requires_grad_(True)
    loss = compiled(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    s2 = s.detach().requires_grad_(True)
    ref = getattr(kdk.reference, op)(s2, t)
    (ref_grad,) = torch.autograd.grad(ref, s2)
    assert_close_rel(loss, ref, 1e-5, f"{op} loss")
    assert_close_rel(grad, ref_grad, 1e-4, f"{op} grad")


def test_public_api_names():
    for op in OPS:
        assert callable(getattr(kdk, op)) and callable(getattr(kdk.reference, op))
    for module in MODULES:
        assert issubclass(getattr(kdk.losses, module), torch.nn.Module)
