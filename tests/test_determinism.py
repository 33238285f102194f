"""Deterministic mode: every backend gives bitwise-identical loss and gradient run to run.

The fused kernels have no floating-point atomics and fix every summation order from the tensor
sizes alone, so they are deterministic whether or not torch.use_deterministic_algorithms is on
(and give the same bits with it on as off); the CPU kernels also give the same bits for any
thread count. The torch backend is PyTorch's own eager code: deterministic on the CPU; on CUDA
PyTorch raises for its nondeterministic kernels (bilinear and adaptive-pool backward) when the
mode is on, and so do the fused backends where they call them (resize="pool").
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from helpers import all_backends, fused_backends, loss_and_grad, op_inputs

INTERPRETED = not torch.cuda.is_available()

# (op, kwargs, compiled shapes (student, teacher), Triton-interpreter shapes). The compiled
# shapes take the multi-block paths of csrc/cpu: more (b, c) maps than threads, rows longer than
# one block or chunk (attention_transfer kPlaneChunk 8192 pixels, relation kGramChunk 512,
# pixel_kl 1024 pixels per block, channel_wise_kl kChunk 256, sgm kTile 32, structure kStrip 64
# rows, logit_attention kRows 64, pixel_relation kKlCols 1024), and the single-sample paths
# (B * K below the thread count: structure's strips, logit_attention's threaded GEMMs). The
# interpreter shapes still span several programs / split-K partials of the Triton kernels
# (pixel_kl 512 pixels, Gram split 64, sgm tile 32, structure tile 32 x 64, logit_attention
# rows 32, pixel_relation KL tiles 32 x 64) but stay small: the interpreter is slow.
CASES = [
    ("attention_transfer_loss", {}, ((3, 5, 97, 91), (3, 7, 97, 91)),
     ((3, 5, 23, 29), (3, 7, 23, 29))),
    ("attention_transfer_loss", {"resize": "bilinear"}, ((3, 5, 19, 23), (3, 7, 37, 41)),
     ((2, 3, 9, 11), (2, 4, 19, 23))),
    ("attention_transfer_loss", {"resize": "pool", "reduction": "batchmean"},
     ((3, 5, 37, 41), (3, 7, 19, 23)), ((2, 3, 19, 23), (2, 4, 9, 11))),
    ("channel_relation_loss", {"distance": "mse"}, ((3, 9, 37, 41), (3, 9, 37, 41)),
     ((3, 9, 12, 13), (3, 9, 12, 13))),
    ("channel_relation_loss", {"distance": "kl", "normalize": "softmax"},
     ((3, 9, 37, 41), (3, 9, 37, 41)), ((3, 9, 12, 13), (3, 9, 12, 13))),
    ("pixel_relation_loss", {"distance": "mse"}, ((2, 5, 23, 29), (2, 7, 23, 29)),
     ((2, 5, 9, 10), (2, 7, 9, 10))),
    ("pixel_relation_loss", {"distance": "kl"}, ((2, 5, 33, 35), (2, 7, 33, 35)),
     ((2, 5, 9, 10), (2, 7, 9, 10))),
    ("sgm_loss", {}, ((3, 5, 41, 41), (3, 5, 41, 41)), ((1, 2, 41, 41), (1, 2, 41, 41))),
    ("sgm_loss", {"distance": "l1"}, ((1, 70, 70), (1, 70, 70)), ((1, 35, 35), (1, 35, 35))),
    ("logit_attention_loss", {}, ((3, 5, 70, 23), (3, 5, 70, 23)),
     ((2, 2, 40, 23), (2, 2, 40, 23))),
    ("logit_attention_loss", {}, ((1, 1, 150, 97), (1, 1, 150, 97)),
     ((1, 1, 40, 23), (1, 1, 40, 23))),
    ("pixel_kl_loss", {}, ((3, 19, 37, 41), (3, 19, 37, 41)), ((2, 5, 23, 29), (2, 5, 23, 29))),
    ("pixel_kl_loss", {}, ((2, 1, 37, 41), (2, 1, 37, 41)), ((2, 1, 23, 29), (2, 1, 23, 29))),
    ("channel_wise_kl_loss", {}, ((3, 9, 37, 41), (3, 9, 37, 41)),
     ((2, 3, 23, 29), (2, 3, 23, 29))),
    ("structure_loss", {}, ((3, 1, 37, 41), (3, 1, 37, 41)), ((2, 1, 40, 70), (2, 1, 40, 70))),
    ("structure_loss", {}, ((1, 1, 150, 97), (1, 1, 150, 97)), ((1, 1, 40, 70), (1, 1, 40, 70))),
]
IDS = [f"{op}-{'-'.join(kw.values()) or 'default'}-{'x'.join(map(str, big[0]))}"
       for op, kw, big, _ in CASES]


def _shapes(big, small, backend):
    return small if backend == "triton" and INTERPRETED else big


def _run(op, backend, fs, ft, kw):
    return loss_and_grad(getattr(kdk, op), fs, ft, backend=backend, **kw)


@pytest.fixture
def deterministic():
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


def _raises_in_deterministic_mode(op, kw, backend, device, s_shape, t_shape):
    """PyTorch has no deterministic CUDA backward for bilinear upsampling (the torch backend's
    resize="bilinear"; the fused kernels resample in-kernel) or for adaptive average pooling
    (resize="pool", which every backend runs through F.adaptive_avg_pool2d): it raises."""
    if device != "cuda" or op != "attention_transfer_loss" or s_shape[-2:] == t_shape[-2:]:
        return False
    return kw.get("resize", "bilinear") == "pool" or backend == "torch"


@pytest.mark.parametrize("op,kw,big,small", CASES, ids=IDS)
def test_bitwise_identical_runs(op, kw, big, small, deterministic):
    """Three forward + backward passes in deterministic mode give the same bits, and the same
    bits as with the mode off (the fused kernels do not depend on it; the mode also fills
    uninitialised memory with NaN, which would show if a kernel read a buffer it did not
    write)."""
    for backend, device in all_backends(op):
        s_shape, t_shape = _shapes(big, small, backend)
        fs, ft = op_inputs(op, s_shape, t_shape, device, seed=11)
        what = f"{backend}-{device}"
        if _raises_in_deterministic_mode(op, kw, backend, device, s_shape, t_shape):
            with pytest.raises(RuntimeError, match="deterministic"):
                _run(op, backend, fs, ft, kw)
            continue
        first = _run(op, backend, fs, ft, kw)
        assert torch.isfinite(first[0]) and torch.isfinite(first[1]).all(), what
        for _ in range(2):
            again = _run(op, backend, fs, ft, kw)
            assert torch.equal(first[0], again[0]), f"{what}: loss differs"
            assert torch.equal(first[1], again[1]), f"{what}: gradient differs"
        torch.use_deterministic_algorithms(False)
        try:
            free = _run(op, backend, fs, ft, kw)
        finally:
            torch.use_deterministic_algorithms(True)
        # On CUDA PyTorch's own kernels may pick other algorithms with the mode off.
        if not (backend == "torch" and device == "cuda"):
            assert torch.equal(first[0], free[0]), f"{what}: loss differs with the mode off"
            assert torch.equal(first[1], free[1]), f"{what}: gradient differs with the mode off"


@pytest.mark.parametrize("op,kw,big,small", CASES, ids=IDS)
def test_cpu_kernels_independent_of_thread_count(op, kw, big, small):
    """Every CPU kernel's work split and summation order depend on the sizes only, so 1, 2 and 3
    threads give the same bits, including the paths taken with fewer maps than threads. (For
    logit_attention with B * K below the thread count the GEMMs themselves are threaded: their
    bits are oneDNN's, equal here, guaranteed by csrc/cpu/logit_attention.cpp only for a given
    thread count; docs/README.md says so.)"""
    if "cpu" not in fused_backends(op, "cpu"):
        pytest.skip("built without the C++ extension")
    fs, ft = op_inputs(op, *big, "cpu", seed=11)
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
