"""Deterministic mode: every backend gives bitwise-identical loss and gradient run to run.

The fused kernels have no floating-point atomics and fix every summation order from the tensor
sizes alone, so they are deterministic whether or not torch.use_deterministic_algorithms is on;
the CPU kernels also give the same bits for any thread count. The torch backend is PyTorch's own
eager code: deterministic on the CPU; on CUDA PyTorch raises for its nondeterministic kernels
(bilinear and adaptive-pool backward) when the mode is on.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import devices, fused_backends

INTERPRETED = not torch.cuda.is_available()

# Sizes that take the multi-block paths: more (b, c) maps than threads, rows longer than one
# block or chunk, several split-K partial sums. Smaller under the Triton interpreter.
CASES = [
    ("attention_transfer_loss", {}, (3, 5, 37, 41), (3, 7, 37, 41)),
    ("attention_transfer_loss", {"resize": "bilinear"}, (3, 5, 19, 23), (3, 7, 37, 41)),
    ("channel_relation_loss", {"distance": "mse"}, (3, 9, 37, 41), (3, 9, 37, 41)),
    ("channel_relation_loss", {"distance": "kl", "normalize": "softmax"}, (3, 9, 37, 41),
     (3, 9, 37, 41)),
    ("pixel_relation_loss", {"distance": "mse"}, (2, 5, 23, 29), (2, 7, 23, 29)),
    ("pixel_relation_loss", {"distance": "kl"}, (2, 5, 23, 29), (2, 7, 23, 29)),
    ("sgm_loss", {}, (3, 5, 41, 41), (3, 5, 41, 41)),
    ("logit_attention_loss", {}, (3, 5, 19, 23), (3, 5, 19, 23)),
    ("pixel_kl_loss", {}, (3, 19, 37, 41), (3, 19, 37, 41)),
    ("channel_wise_kl_loss", {}, (3, 9, 37, 41), (3, 9, 37, 41)),
    ("structure_loss", {}, (3, 1, 37, 41), (3, 1, 37, 41)),
]
IDS = [f"{op}-{'-'.join(kw.values()) or 'default'}" for op, kw, _, _ in CASES]


def _targets(op):
    return [(b, d) for d in devices() for b in ["torch"] + fused_backends(op, d)]


def _shrink(shape, backend):
    if backend == "triton" and INTERPRETED:
        return tuple(shape[:2]) + tuple(max(1, s // 3) for s in shape[2:])
    return tuple(shape)


def _inputs(op, s_shape, t_shape, device):
    g = torch.Generator().manual_seed(11)
    fs = torch.randn(s_shape, generator=g)
    ft = (torch.rand(t_shape, generator=g) > 0.5).float() if op == "structure_loss" \
        else torch.randn(t_shape, generator=g)
    return fs.to(device), ft.to(device)


def _run(op, backend, fs, ft, kw):
    x = fs.detach().clone().requires_grad_(True)
    loss = getattr(kdk, op)(x, ft, backend=backend, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _nondeterministic_in_torch(op, kw, device, s_shape, t_shape):
    """PyTorch has no deterministic CUDA backward for bilinear upsampling: it raises."""
    return device == "cuda" and op == "attention_transfer_loss" and s_shape[-2:] != t_shape[-2:]


@pytest.mark.parametrize("op,kw,s_shape,t_shape", CASES, ids=IDS)
def test_bitwise_identical_runs(op, kw, s_shape, t_shape, deterministic):
    for backend, device in _targets(op):
        fs, ft = _inputs(op, _shrink(s_shape, backend), _shrink(t_shape, backend), device)
        if backend == "torch" and _nondeterministic_in_torch(op, kw, device, s_shape, t_shape):
            with pytest.raises(RuntimeError, match="deterministic"):
                _run(op, backend, fs, ft, kw)
            continue
        first = _run(op, backend, fs, ft, kw)
        for _ in range(2):
            again = _run(op, backend, fs, ft, kw)
            assert torch.equal(first[0], again[0]), f"{backend}-{device}: loss differs"
            assert torch.equal(first[1], again[1]), f"{backend}-{device}: gradient differs"


@pytest.mark.parametrize("op,kw,s_shape,t_shape", CASES, ids=IDS)
def test_cpu_kernels_independent_of_thread_count(op, kw, s_shape, t_shape):
    if "cpu" not in fused_backends(op, "cpu"):
        pytest.skip("built without the C++ extension")
    fs, ft = _inputs(op, s_shape, t_shape, "cpu")
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_run(op, "cpu", fs, ft, kw))
    finally:
        torch.set_num_threads(threads)
    for n, (loss, grad) in zip((2, 3), results[1:]):
        assert torch.equal(loss, results[0][0]), f"loss with {n} threads differs from 1 thread"
        assert torch.equal(grad, results[0][1]), f"gradient with {n} threads differs"
