"""Shared test utilities: layouts, backends per device, comparisons."""

from __future__ import annotations

import torch

from kdkernels import _dispatch

LAYOUTS = ("contiguous", "channels_last", "strided")


def make_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as x in the requested memory layout (a leaf tensor, no gradient yet)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        # A view into a wider tensor: every stride differs from the contiguous one.
        big = torch.zeros(x.shape[0], x.shape[1] + 1, x.shape[2], 2 * x.shape[3],
                          dtype=x.dtype, device=x.device)
        big[:, 1:, :, ::2] = x
        return big[:, 1:, :, ::2]
    return x.contiguous()


def fused_backends(op: str, device: str) -> list[str]:
    """The fused backends that implement `op` and can run on `device` in this build (Triton
    takes CPU tensors only in its interpreter, not on a GPU machine's test run)."""
    return _dispatch.runnable(op, torch.device(device))


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def all_backends(op: str) -> list[tuple[str, str]]:
    """(backend, device) for every backend that runs `op` here, the torch reference included."""
    return [(b, d) for d in devices() for b in ["torch"] + fused_backends(op, d)]


def op_inputs(op: str, s_shape, t_shape, device, seed=0):
    """N(0, 1) student and teacher for `op`; structure_loss's second argument is a {0, 1} mask."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(s_shape, generator=g)
    if op == "structure_loss":
        target = (torch.rand(t_shape, generator=g) > 0.5).float()
    else:
        target = torch.randn(t_shape, generator=g)
    return student.to(device), target.to(device)


def assert_close_rel(actual, expected, rtol, what=""):
    """max |actual - expected| <= rtol * max |expected| (scale-aware, fails on any real bug)."""
    actual = actual.double()
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:g} * {scale:.3e}"


def random_pair(s_shape, t_shape, device, dtype=torch.float32, seed=0):
    """Fresh N(0, 1) (student, teacher) inputs, drawn in float32 on the CPU, then converted."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(s_shape, generator=g).to(device=device, dtype=dtype)
    ft = torch.randn(t_shape, generator=g).to(device=device, dtype=dtype)
    return fs, ft


def loss_and_grad(fn, fs, ft, **kw):
    """(loss, d loss / d fs) of fn(fs, ft, **kw) for a fresh leaf copy of fs."""
    fs = fs.detach().requires_grad_(True)
    loss = fn(fs, ft, **kw)
    (grad,) = torch.autograd.grad(loss, fs)
    return loss.detach(), grad


def free_memory_gib() -> float:
    """Memory the OS can still hand out (MemAvailable), for the tests that need many GiB."""
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20
