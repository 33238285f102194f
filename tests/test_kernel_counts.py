"""What one fused call costs the device: kernels per forward + backward, host syncs, CUDA graphs.

- Every Triton op, every route and the shapes that change the launch plan (split-K Grams, two-pass
  channel walks, several channel blocks), forward + backward: at most MAX_KERNELS kernels
  (counted by bench/overhead.py: Triton launches plus the aten calls that launch a kernel on a
  GPU) and no `.item()`-style read. In the interpreter here; with the CUDA profiler on a GPU,
  where the CUDA C++ ops are counted too.
- On a GPU: no op synchronises the host (torch.cuda.set_sync_debug_mode("error")), every op's
  forward + backward can be captured in a CUDA graph and replayed to the eager result, and runs
  under torch.compile(mode="reduce-overhead").
Counts, not times: speed is measured by `python -m bench --overhead`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import kdkernels as kdk
from cuda_emulation import runner as emulation
from helpers import assert_close_rel, fused_backends, op_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.overhead import count_kernels  # noqa: E402

MAX_KERNELS = 4
HAS_CUDA = torch.cuda.is_available()
# (op, student shape, teacher shape, keywords): every route, and shapes past one block of each
# kernel (odd sizes, split-K over many pixels, channel counts past a tile and past the
# backward's channel block).
ROUTES = [
    ("attention_transfer_loss", (2, 5, 9, 7), (2, 3, 9, 7), {}),
    ("attention_transfer_loss", (2, 5, 11, 13), (2, 3, 6, 5), {"p": 3.0, "reduction": "sum"}),
    ("attention_transfer_loss", (1, 3, 5, 5), (1, 2, 5, 5), {"p": 4.0, "reduction": "batchmean"}),
    ("channel_relation_loss", (2, 3, 5, 7), None, {}),
    ("channel_relation_loss", (2, 37, 9, 9), None, {"normalize": "softmax", "distance": "kl"}),
    ("channel_relation_loss", (1, 3, 40, 40), None, {"normalize": "l2", "distance": "kl"}),
    ("pixel_relation_loss", (2, 3, 5, 7), (2, 4, 5, 7), {}),
    ("pixel_relation_loss", (1, 33, 9, 9), (1, 5, 9, 9), {}),
    ("pixel_relation_loss", (2, 3, 5, 7), (2, 4, 5, 7), {"distance": "kl"}),
    ("pixel_relation_loss", (1, 130, 3, 5), (1, 70, 3, 5), {"distance": "kl", "tau": 0.5}),
    ("sgm_loss", (2, 1, 33, 33), None, {}),
    ("sgm_loss", (3, 5, 5), None, {"distance": "l1"}),
    ("logit_attention_loss", (2, 1, 9, 11), None, {}),
    ("logit_attention_loss", (1, 2, 33, 20), None, {"tau": 1.0}),
    ("pixel_kl_loss", (2, 3, 5, 7), None, {}),
    ("pixel_kl_loss", (2, 1, 5, 7), None, {"temperature": 2.0}),
    ("pixel_kl_loss", (6, 300), None, {}),
    ("channel_wise_kl_loss", (2, 3, 5, 7), None, {}),
    ("channel_wise_kl_loss", (1, 2, 70, 70), None, {"tau": 1.0}),
    ("structure_loss", (2, 1, 9, 11), None, {}),
    ("structure_loss", (1, 2, 40, 33), None, {}),
]
IDS = [f"{op.removesuffix('_loss')}-{'x'.join(map(str, s))}-{i}"
       for i, (op, s, _, _) in enumerate(ROUTES)]


def _call(op, backend, device, s_shape, t_shape, kw, mask=False):
    student, teacher = op_inputs(op, s_shape, t_shape or s_shape, device, seed=len(IDS))
    student.requires_grad_(True)
    if mask:
        g = torch.Generator().manual_seed(1)
        kw = dict(kw, mask=(torch.rand((s_shape[0],) + tuple(s_shape[2:]), generator=g) > 0.3).to(device))
    seed = torch.ones((), device=device)  # the caller's upstream gradient, made beforehand
    fn = getattr(kdk, op)
    return student, lambda: torch.autograd.grad(fn(student, teacher, backend=backend, **kw), student, seed)


def _targets(backends):
    devices = ["cuda"] if HAS_CUDA else ["cpu"]
    return [(b, d, route) for d in devices for b in backends for route in ROUTES
            if b in fused_backends(route[0], d)]


def _count(backend, device, route, mask=False):
    op, s_shape, t_shape, kw = route
    _, step = _call(op, backend, device, s_shape, t_shape, kw, mask)
    step()  # compile and cache everything before counting
    return count_kernels(step, torch.device(device))


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_triton_kernels_per_call(route):
    device = "cuda" if HAS_CUDA else "cpu"
    if "triton" not in fused_backends(route[0], device):
        pytest.skip(f"no Triton backend on {device} here")
    counted = _count("triton", device, route)
    assert counted["kernels"] <= MAX_KERNELS, counted["names"]
    assert counted["syncs"] == 0, counted["names"]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_pixel_kl_masked_kernels_per_call(backend):
    device = "cuda" if HAS_CUDA else "cpu"
    if backend not in fused_backends("pixel_kl_loss", device):
        pytest.skip(f"no {backend} backend on {device} here")
    counted = _count(backend, device, ("pixel_kl_loss", (2, 3, 5, 7), None, {}), mask=True)
    # A CPU mask is checked for emptiness on the host (mask.any()); a CUDA one never is.
    host_check = ["aten::any"] if device == "cpu" else []
    kernels = [n for n in counted["names"] if n not in host_check]
    assert len(kernels) <= MAX_KERNELS, counted["names"]
    assert counted["syncs"] == len(host_check), counted["names"]


CUDA_BOUNDED = ("attention_transfer_loss", "sgm_loss", "pixel_kl_loss", "channel_relation_loss",
                "pixel_relation_loss")
CUDA_ROUTES = [r for r in ROUTES if r[0] in CUDA_BOUNDED]


@pytest.mark.skipif(not emulation.available(), reason="the CUDA emulation does not build here")
@pytest.mark.parametrize("route", CUDA_ROUTES, ids=[IDS[ROUTES.index(r)] for r in CUDA_ROUTES])
def test_cuda_kernels_emulated(route):
    """The CUDA C++ kernels, run through their CPU emulation (tests/cuda_emulation): the
    launches of one forward + backward (the glue around them launches nothing else; a
    pixel_kl_loss mask adds its count, test_pixel_kl_masked_kernels_per_call)."""
    op, s_shape, t_shape, kw = route
    student, teacher = op_inputs(op, s_shape, t_shape or s_shape, "cpu", seed=len(IDS))
    student.requires_grad_(True)
    before = emulation.launches()
    torch.autograd.grad(emulation.loss_fn(op)(student, teacher, **kw), student)
    assert 0 < emulation.launches() - before <= MAX_KERNELS


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (the CUDA C++ kernels)")
@pytest.mark.parametrize("route", [r for r in ROUTES if r[0] in CUDA_BOUNDED],
                         ids=[i for i, r in zip(IDS, ROUTES) if r[0] in CUDA_BOUNDED])
def test_cuda_kernels_per_call(route):
    if "cuda" not in fused_backends(route[0], "cuda"):
        pytest.skip("built without the CUDA kernels")
    counted = _count("cuda", "cuda", route)
    assert counted["kernels"] <= MAX_KERNELS, counted["names"]
    assert counted["syncs"] == 0, counted["names"]


GPU_TARGETS = _targets(("cuda", "triton")) if HAS_CUDA else []
GPU_IDS = [f"{b}-{IDS[ROUTES.index(r)]}" for b, _, r in GPU_TARGETS]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend,device,route", GPU_TARGETS, ids=GPU_IDS)
def test_no_host_sync(backend, device, route):
    op, s_shape, t_shape, kw = route
    _, step = _call(op, backend, device, s_shape, t_shape, kw, mask=op == "pixel_kl_loss")
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend,device,route", GPU_TARGETS, ids=GPU_IDS)
def test_cuda_graph_capture(backend, device, route):
    """fwd + bwd captured once, replayed on new values of the same tensors: the eager result."""
    op, s_shape, t_shape, kw = route
    student, step = _call(op, backend, device, s_shape, t_shape, kw)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs advises
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (grad,) = step()
    with torch.no_grad():
        student.mul_(0.5).add_(0.25)
    graph.replay()
    torch.cuda.synchronize()
    (expected,) = step()
    assert_close_rel(grad, expected, 1e-6, f"{backend} {op} graph replay")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend,device,route", GPU_TARGETS, ids=GPU_IDS)
def test_reduce_overhead_compile(backend, device, route):
    op, s_shape, t_shape, kw = route
    student, teacher = op_inputs(op, s_shape, t_shape or s_shape, device, seed=3)
    fn = getattr(kdk, op)

    def step(s, t):
        s = s.detach().requires_grad_(True)
        loss = fn(s, t, backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, s)
        return loss.detach(), grad

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):  # record, then replay the CUDA graph
        loss, grad = compiled(student, teacher)
    ref_loss, ref_grad = step(student, teacher)
    assert_close_rel(loss, ref_loss, 1e-5, "loss")
    assert_close_rel(grad, ref_grad, 1e-5, "grad")
