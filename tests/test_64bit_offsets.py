"""64-bit element offsets in every op, option route and backend, on small data.

Each input is a small tensor laid out inside a large storage so that the offsets along one
dimension pass 2^31 elements: the batch stride is 2^31 itself (an int64 kernel argument), the
channel, row and column strides fit in int32 but their product with the last index does not
(the classic `index * stride` overflow of 32-bit index arithmetic). Only the touched pages of
the storages (4 GiB of float16 per input) are ever committed, so this runs everywhere in
seconds; the answer is compared with the float64 reference on a compact copy of the values.
Tensors with more than 2^31 elements are tested where memory allows (test_huge_tensors.py).
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import assert_close_rel, devices, fused_backends, loss_and_grad

SHAPE = (2, 3, 7, 7)
DIMS = {"batch": 0, "channel": 1, "row": 2, "col": 3}
ROOM = 2**31 + 2**16  # elements per storage: the last index along any DIMS entry lands past 2^31
# op -> [(teacher shape, None for the student's; keyword arguments, mask=True for a mask)]:
# every route through the kernels that has its own index arithmetic.
CASES = {
    "attention_transfer_loss": [(None, {}), ((2, 4, 5, 6), {"p": 3.0})],  # resampled student
    "channel_relation_loss": [(None, {}), (None, {"normalize": "softmax", "distance": "kl"})],
    "pixel_relation_loss": [(None, {}), ((2, 5, 7, 7), {"distance": "kl"})],
    "sgm_loss": [(None, {})],
    "logit_attention_loss": [(None, {})],
    "pixel_kl_loss": [(None, {}), (None, {"mask": True})],
    "channel_wise_kl_loss": [(None, {})],
    "structure_loss": [(None, {})],
}
TARGETS = [(op, i, b, d) for op, cases in CASES.items() for i in range(len(cases))
           for d in devices() for b in fused_backends(op, d)]
IDS = [f"{op.removesuffix('_loss')}{i or ''}-{b}-{d}" for op, i, b, d in TARGETS]


@pytest.fixture(scope="module")
def storages():
    """Reserved storages per (device, role), made on first use and freed with the module."""
    made: dict = {}

    def get(device: str, role: str, dtype: torch.dtype) -> torch.Tensor:
        if (device, role) not in made:
            try:
                made[device, role] = torch.empty(ROOM, dtype=dtype, device=device)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                pytest.skip(f"cannot reserve {ROOM} elements on {device}: {exc}")
        return made[device, role]

    yield get
    made.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _far(values: torch.Tensor, dim: int, storage: torch.Tensor) -> torch.Tensor:
    """values (compact) copied into a view of `storage` whose stride along `dim` sends its last
    index past 2^31; the other dimensions stay contiguous in one block."""
    size = values.shape
    far = -(-2**31 // (size[dim] - 1))  # ceil: (size - 1) * far >= 2^31
    inner, strides = 1, [0] * values.dim()
    for d in reversed(range(values.dim())):
        if d != dim:
            strides[d] = inner
            inner *= size[d]
    strides[dim] = far
    view = storage.as_strided(size, strides)
    view.copy_(values)
    return view


def _inputs(op, t_shape, device, g):
    fs = torch.randn(SHAPE, generator=g).to(torch.float16)
    ft = torch.randn(t_shape or SHAPE, generator=g).to(torch.float16)
    if op == "structure_loss":
        ft = (ft > 0).to(torch.float16)
    mask = torch.rand(SHAPE[0], *SHAPE[2:], generator=g) > 0.3
    return fs.to(device), ft.to(device), mask.to(device)


def _scaled(fn):
    """fn times 1000: some of these gradients are ~1e-5, float16 subnormals, without it."""
    return lambda *args, **kw: 1000.0 * fn(*args, **kw)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("op,case,backend,device", TARGETS, ids=IDS)
def test_offsets_past_2_31(storages, op, case, backend, device, dim):
    t_shape, kw = CASES[op][case]
    fs, ft, mask = _inputs(op, t_shape, device, torch.Generator().manual_seed(case))
    d = DIMS[dim]
    fs_far = _far(fs, d, storages(device, "student", torch.float16))
    ft_far = _far(ft, d, storages(device, "teacher", torch.float16))
    if kw.get("mask"):
        # The mask is (B, H, W): far along the same dimension, or compact for "channel".
        mask_far = mask if d == 1 else _far(mask, d - (d > 1), storages(device, "mask", torch.bool))
        kw, ref_kw = dict(kw, mask=mask_far), dict(kw, mask=mask)
    else:
        ref_kw = kw
    loss, grad = loss_and_grad(_scaled(getattr(kdk, op)), fs_far, ft_far, backend=backend, **kw)
    ref_loss, ref_grad = loss_and_grad(_scaled(getattr(kdk.reference, op)), fs.double(), ft.double(), **ref_kw)
    assert_close_rel(loss, ref_loss, 1e-3, "loss")
    assert_close_rel(grad, ref_grad, 2e-3, "grad")
