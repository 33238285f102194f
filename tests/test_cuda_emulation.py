"""The CUDA C++ kernels of attention transfer, SGM and pixel KL against kdkernels.reference,
run on CPU tensors through a CPU emulation of their threads, blocks, shared memory, shuffles
and atomics (tests/cuda_emulation), so that they are checked on machines without a GPU too.
The relation kernels are checked the same way in test_relations.py (pseudo-backend
"cuda-emu"); kernel counts in test_kernel_counts.py. On a GPU the real kernels run the full
per-op suites as well.

Tolerances as elsewhere: float64 within 1e-12; otherwise within rtol of float64 on the same
values (relative to |loss| and max |grad|) or no worse than twice eager's own error.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from cuda_emulation import runner as emulation
from helpers import LAYOUTS, loss_and_grad, make_layout, random_pair

pytestmark = pytest.mark.skipif(not emulation.available(), reason="the CUDA emulation does not build here")

AT, SGM, PKL = "attention_transfer_loss", "sgm_loss", "pixel_kl_loss"
# (op, student shape, teacher shape, keywords): odd sizes, B = 1, C = 1 and 3, resizing, channel
# counts past one block and past the channel split, 3-D maps, (B, K) logits, binary maps.
CASES = [
    (AT, (2, 5, 9, 7), (2, 3, 9, 7), {}),
    (AT, (1, 1, 11, 13), (1, 3, 6, 5), {"p": 3.0, "reduction": "sum"}),
    (AT, (2, 3, 5, 5), (2, 2, 9, 11), {"p": 4.0, "reduction": "batchmean"}),
    (AT, (1, 300, 40, 41), (1, 7, 40, 41), {}),
    (SGM, (2, 1, 33, 33), None, {}),
    (SGM, (3, 5, 5), None, {"distance": "l1"}),
    (SGM, (1, 3, 70, 70), None, {}),
    (PKL, (2, 3, 5, 7), None, {}),
    (PKL, (2, 1, 5, 7), None, {"temperature": 2.0}),
    (PKL, (6, 300), None, {}),
    (PKL, (1, 19, 33, 31), None, {"temperature": 1.0}),
]
IDS = [f"{op.removesuffix('_loss')}-{'x'.join(map(str, s))}" for op, s, _, _ in CASES]


def _pair(op, s_shape, t_shape, dtype, seed, layout="contiguous"):
    fs, ft = random_pair(s_shape, t_shape or s_shape, "cpu", dtype=dtype, seed=seed)
    if fs.dim() == 4:
        fs, ft = make_layout(fs, layout), make_layout(ft, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])
    return fs, ft


def _check(op, fs, ft, loss_rtol, grad_rtol, **kw):
    loss, grad = loss_and_grad(emulation.loss_fn(op), fs, ft, **kw)
    ref_fn = getattr(kdk.reference, op)
    ref_loss, ref_grad = loss_and_grad(ref_fn, fs.double(), ft.double(), **kw)
    eager_loss, eager_grad = loss_and_grad(ref_fn, fs, ft, **kw)
    assert grad.dtype == fs.dtype and grad.shape == fs.shape
    for ours, eager, ref, rtol, what in ((loss, eager_loss, ref_loss, loss_rtol, "loss"),
                                         (grad, eager_grad, ref_grad, grad_rtol, "grad")):
        err = (ours.double() - ref).abs().max().item()
        bound = max(rtol * ref.abs().max().item(), 2 * (eager.double() - ref).abs().max().item())
        assert err <= bound, f"{what}: error {err:.3e} > {bound:.3e} (|ref| {ref.abs().max().item():.3e})"


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(case, dtype):
    op, s_shape, t_shape, kw = case
    fs, ft = _pair(op, s_shape, t_shape, dtype, seed=len(s_shape) + s_shape[-1])
    tight = dtype == torch.float64
    _check(op, fs, ft, 1e-12 if tight else 1e-5, 1e-12 if tight else 1e-4, **kw)


@pytest.mark.parametrize("op", [AT, SGM, PKL])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(op, layout):
    shapes = {AT: ((2, 5, 9, 7), (2, 3, 6, 5)), SGM: ((2, 3, 9, 9), None), PKL: ((2, 4, 9, 7), None)}[op]
    fs, ft = _pair(op, *shapes, torch.float32, seed=3, layout=layout)
    _check(op, fs, ft, 1e-5, 1e-4)
    if layout == "channels_last":
        (grad,) = torch.autograd.grad(emulation.loss_fn(op)(fs.requires_grad_(True), ft), fs)
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("op", [AT, SGM, PKL])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(op, dtype):
    shapes = {AT: ((2, 5, 9, 7), (2, 3, 9, 7)), SGM: ((2, 1, 9, 9), None), PKL: ((2, 4, 9, 7), None)}[op]
    fs, ft = _pair(op, *shapes, dtype, seed=5)
    _check(op, fs, ft, 1e-5, 4e-3 if dtype == torch.float16 else 2e-2)


@pytest.mark.parametrize("op", [AT, SGM, PKL])
@pytest.mark.parametrize("noise", [1e-2, 1e-3])
def test_near_teacher(op, noise):
    g = torch.Generator().manual_seed(7)
    ft = torch.randn(2, 3, 9, 9, generator=g)
    fs = ft + noise * torch.randn(ft.shape, generator=g)
    _check(op, fs, ft, 1e-3, 1e-3)


def test_pixel_kl_mask():
    fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), "cpu", seed=8)
    mask = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(9)) > 0.3
    _check(PKL, fs, ft, 1e-5, 1e-4, mask=mask)
    # An all-False mask on CUDA: NaN loss (0 / 0), zero gradient, no error and no host read.
    loss, grad = loss_and_grad(emulation.loss_fn(PKL), fs, ft, mask=torch.zeros(2, 5, 7, dtype=torch.bool))
    assert torch.isnan(loss) and torch.count_nonzero(grad) == 0


def test_upstream_gradient_scales():
    """The kernels read the upstream gradient from memory (attention transfer) or the glue scales
    the unit gradient: either way grad = g * unit."""
    for fn, args in ((emulation.attention_transfer, (2.0, "mean")), (emulation.sgm, ("mse",)),
                     (emulation.pixel_kl, (4.0,))):
        fs, ft = random_pair((2, 3, 9, 9), (2, 3, 9, 9), "cpu", dtype=torch.float64, seed=10)
        _, unit = fn(fs, ft, *args)
        _, scaled = fn(fs, ft, *args, grad=-2.5)
        torch.testing.assert_close(scaled, -2.5 * unit, rtol=1e-14, atol=0)
