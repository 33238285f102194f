"""kdkernels.integrations.torchdistill against torchdistill's own ATLoss and KDLoss."""

from __future__ import annotations

import pytest
import torch

# The submodule: a bare "torchdistill" can resolve to the examples/torchdistill folder.
pytest.importorskip("torchdistill.losses.mid_level")

import kdkernels as kdk  # noqa: E402
import kdkernels.integrations.torchdistill as kdk_td  # noqa: E402
from torchdistill.losses.mid_level import ATLoss, KDLoss  # noqa: E402
from torchdistill.losses.registry import get_mid_level_loss  # noqa: E402


def _side(path):
    return {"io": "output", "path": path}


def _get(key, **kwargs):
    return get_mid_level_loss({"key": key, "kwargs": kwargs})


def test_every_loss_is_registered_by_name():
    for name in kdk.losses.__all__:
        assert isinstance(_get(f"KDK{name}", pairs={"a": {"student": _side("x")}}),
                          getattr(kdk_td, f"KDK{name}"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_attention_transfer_matches_atloss_code_mode(dtype):
    g = torch.Generator().manual_seed(0)
    student = {p: {"output": torch.randn(3, c, s, s + 2, generator=g, dtype=dtype)}
               for p, c, s in (("layer3", 8, 7), ("layer4", 16, 5))}
    teacher = {p: {"output": torch.randn(3, 2 * c, s, s + 2, generator=g, dtype=dtype)}
               for p, c, s in (("layer3", 8, 7), ("layer4", 16, 5))}
    pairs = {p: {"student": _side(p), "teacher": _side(p), "weight": w}
             for p, w in (("layer3", 1.0), ("layer4", 0.5))}
    ours = _get("KDKAttentionTransferLoss", pairs=pairs, p=2.0, reduction="mean")(student, teacher)
    theirs = ATLoss(at_pairs=pairs, mode="code")(student, teacher)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-5, atol=0)


def test_pixel_kl_matches_kdloss():
    # KDLoss = alpha * CE + (1 - alpha) * T^2 * KL(batchmean); ours is the T^2 * KL term.
    g = torch.Generator().manual_seed(1)
    zs = torch.randn(16, 23, generator=g, requires_grad=True)
    zt = torch.randn(16, 23, generator=g)
    targets = torch.randint(0, 23, (16,), generator=g)
    io_s, io_t = {"fc": {"output": zs}}, {"fc": {"output": zt}}
    theirs = KDLoss("fc", "output", "fc", "output", temperature=4.0, alpha=0.5)(io_s, io_t, targets)
    kd = _get("KDKPixelKLLoss", pairs={"fc": {"student": _side("fc"), "teacher": _side("fc")}},
              temperature=4.0)(io_s, io_t)
    ours = 0.5 * torch.nn.functional.cross_entropy(zs, targets) + 0.5 * kd
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)
    (g_ours,) = torch.autograd.grad(ours, zs)
    (g_theirs,) = torch.autograd.grad(theirs, zs)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)


def test_pair_without_teacher_uses_targets():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 40, 40, generator=g)
    mask = (torch.rand(2, 1, 40, 40, generator=g) > 0.7).float()
    loss = _get("KDKStructureLoss", pairs={"out": {"student": _side("seg"), "weight": 3.0}})
    got = loss({"seg": {"output": logits}}, {}, mask)
    torch.testing.assert_close(got, 3.0 * kdk.structure_loss(logits, mask), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="no teacher entry"):
        loss({"seg": {"output": logits}}, {})


def test_empty_pairs_is_an_error():
    with pytest.raises(ValueError, match="pairs is empty"):
        _get("KDKSGMLoss", pairs={})
