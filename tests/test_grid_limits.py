"""Batches past CUDA's 65535 programs on grid axes 1 and 2, in every Triton kernel.

The Triton kernels that put the batch (or the maps, B * K) on grid axis 1 or 2 are launched once
per chunk of at most `_common._GRID_YZ_MAX` entries; one launch of more fails on the GPU with
"invalid argument". A batch of 65536 takes too long in the interpreter, so the limit is lowered
to 2 here: every launch must keep to it, and a batch of 5 (chunks 2, 2, 1) must give bit for bit
the answer of the unchunked launches, which itself matches the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import assert_close_rel, fused_backends

pytestmark = pytest.mark.skipif("triton" not in fused_backends("sgm_loss", "cpu"),
                                reason="the Triton backend is not available in the interpreter")

LIMIT = 2
B = 5
# op -> [(student shape, teacher shape or None for the student's, keyword arguments)]: every
# Triton kernel with the batch on grid axis 1 or 2, each of its routes.
CASES = {
    "attention_transfer_loss": [((B, 3, 6, 7), None, {}), ((B, 3, 6, 7), (B, 2, 4, 5), {"p": 3.0})],
    "channel_relation_loss": [((B, 3, 4, 5), None, {}),
                              ((B, 3, 4, 5), None, {"normalize": "softmax", "distance": "kl"})],
    # 65 student channels: past the mse backward's channel block, so the normalisation
    # backward runs as a kernel of its own.
    "pixel_relation_loss": [((B, 65, 3, 4), (B, 3, 3, 4), {}),
                            ((B, 3, 3, 4), (B, 4, 3, 4), {"distance": "kl"})],
    "logit_attention_loss": [((B, 1, 6, 7), None, {}), ((1, B, 6, 7), None, {})],
    "structure_loss": [((B, 1, 9, 11), None, {})],
    "channel_wise_kl_loss": [((B, 3, 4, 5), None, {})],
    "sgm_loss": [((B, 1, 6, 6), None, {})],
    "pixel_kl_loss": [((B, 3, 4, 5), None, {})],
}
TARGETS = [(op, i) for op, cases in CASES.items() for i in range(len(cases))]


def _inputs(op, s_shape, t_shape):
    g = torch.Generator().manual_seed(len(op) + s_shape[1])
    fs = torch.randn(s_shape, generator=g, dtype=torch.float64)
    ft = torch.randn(t_shape or s_shape, generator=g, dtype=torch.float64)
    if op == "structure_loss":
        ft = (ft > 0).double()
    return fs, ft


def _run(op, fs, ft, kw):
    x = fs.clone().requires_grad_(True)
    loss = getattr(kdk, op)(x, ft, backend="triton", **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def _recorded(monkeypatch, fn):
    """(fn(), [(kernel name, grid as 3 axes)] of the launches it made)."""
    from triton.runtime import interpreter

    grids = []
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        grids.append((self.fn.__name__, tuple(grid) + (1,) * (3 - len(grid))))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(interpreter.InterpretedFunction, "run", recording_run)
        return fn(), grids


IDS = [f"{op.removesuffix('_loss')}{i or ''}" for op, i in TARGETS]


@pytest.mark.parametrize("op,case", TARGETS, ids=IDS)
def test_batch_chunked_past_grid_limit(monkeypatch, op, case):
    from kdkernels.triton import _common

    s_shape, t_shape, kw = CASES[op][case]
    fs, ft = _inputs(op, s_shape, t_shape)
    whole = _run(op, fs, ft, kw)
    # Axes 1 and 2 also hold channel tiles and K splits, which do not grow with the batch: their
    # extent with one sample (or one map) bounds them.
    one = (slice(0, 1),) if s_shape[0] == B else (slice(None), slice(0, 1))  # (1, B, H, W): maps
    _, single = _recorded(monkeypatch, lambda: _run(op, fs[one], ft[one], kw))
    bound = {}
    for name, grid in single:
        bound[name] = [max(LIMIT, a, b) for a, b in zip(bound.get(name, (0, 0, 0)), grid)]

    monkeypatch.setattr(_common, "_GRID_YZ_MAX", LIMIT)
    chunked, grids = _recorded(monkeypatch, lambda: _run(op, fs, ft, kw))

    assert grids, "no Triton kernel ran"
    over = [(name, grid) for name, grid in grids
            if any(g > b for g, b in zip(grid[1:], bound[name][1:]))]
    assert not over, f"launches past {LIMIT} batch entries on grid axis 1 or 2: {over}"
    for what, a, b in zip(("loss", "gradient"), chunked, whole):
        assert torch.equal(a, b), f"{what} of the chunked launches differs from one launch"

    ref_fs = fs.clone().requires_grad_(True)
    ref_loss = getattr(kdk.reference, op)(ref_fs, ft, **kw)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_fs)
    assert_close_rel(whole[0], ref_loss, 1e-10, "loss")
    assert_close_rel(whole[1], ref_grad, 1e-10, "gradient")
