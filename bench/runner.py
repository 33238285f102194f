"""Run one case: build the implementations, time their modes interleaved, measure memory."""

from __future__ import annotations

import sys
import time

import torch

import kdkernels as kdk
from bench import harness
from bench.cases import Case

MODES = ("fwd", "bwd", "full")
# Devices each fused backend is benchmarked on (Triton on the CPU is the interpreter: never).
_RUNS_ON = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fused_backends(op: str, device: torch.device) -> list[str]:
    """Available kdkernels backends other than "torch" that implement `op` on `device`."""
    return [name for name, st in kdk.backends().items()
            if name != "torch" and st["available"] and op in st["ops"]
            and device.type in _RUNS_ON.get(name, ())]


def implementations(case: Case, device: torch.device) -> dict:
    """backend label -> f(*inputs) -> loss. "torch" is the public API with backend="torch" (the
    eager reference behind the same validation), "compile" the reference under torch.compile."""
    public = getattr(kdk, case.op)
    kw = case.kwargs
    impls = {"torch": lambda *a: public(*a, backend="torch", **kw)}
    torch._dynamo.reset()  # compile once per case, from a clean cache
    compiled = torch.compile(getattr(kdk.reference, case.op), dynamic=False)
    impls["compile"] = lambda *a: compiled(*a, **kw)
    for name in fused_backends(case.op, device):
        impls[name] = lambda *a, _b=name: public(*a, backend=_b, **kw)
    return impls


def modes(call, args: tuple) -> dict:
    """fwd: the loss (with autograd recording, as in training); bwd: the backward of one retained
    graph; full: both. The gradient of args[0] comes from autograd.grad (no .grad accumulation)."""
    student = args[0]
    retained = call(*args)

    def fwd():
        call(*args)

    def bwd():
        torch.autograd.grad(retained, student, retain_graph=True)

    def full():
        torch.autograd.grad(call(*args), student)

    return {"fwd": fwd, "bwd": bwd, "full": full}


def run_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int,
             min_sample_s: float) -> tuple[list[dict], list[dict]]:
    """Rows {backend, mode, median_ms, min_ms, peak_mem_mb, inner, samples_ms}, skipped backends."""
    args = case.inputs(device, dtype)
    fns, inner, skipped = {}, {}, []
    for backend, call in implementations(case, device).items():
        t0 = time.perf_counter()
        try:
            fns[backend] = modes(call, args)
            for mode, fn in fns[backend].items():
                inner[backend, mode] = harness.warm_and_calibrate(fn, device, warmup, min_sample_s)
        except Exception as exc:  # a broken backend is reported, not fatal for the others
            fns.pop(backend, None)
            skipped.append({"case": case.name, "backend": backend, "error": repr(exc)[:500]})
            log(f"  {backend}: skipped ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        log(f"  {backend}: ready in {time.perf_counter() - t0:.1f} s "
            f"(inner {', '.join(str(inner[backend, m]) for m in MODES)})")

    # Round-robin: every repeat visits every backend (rotated start), so drift hits all alike.
    names = list(fns)
    samples = {key: [] for key in inner}
    for r in range(repeats):
        for i in range(len(names)):
            backend = names[(i + r) % len(names)]
            for mode in MODES:
                key = (backend, mode)
                samples[key].append(harness.time_per_call(fns[backend][mode], inner[key], device))

    rows = []
    for backend in names:
        for mode in MODES:
            key = (backend, mode)
            rows.append({
                "backend": backend, "mode": mode,
                "median_ms": harness.median(samples[key]) * 1e3,
                "min_ms": min(samples[key]) * 1e3,
                "peak_mem_mb": harness.peak_memory_mb(fns[backend][mode], device),
                "inner": inner[key], "samples_ms": [round(t * 1e3, 4) for t in samples[key]],
            })
    del fns, args
    return rows, skipped
