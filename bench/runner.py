"""Run one case: build the implementations, time their modes interleaved, measure memory."""

from __future__ import annotations

import gc
import sys
import time

import torch
import torch._functorch.config  # not imported by `import torch`; set below

import kdkernels as kdk
from bench import harness, peers
from bench.cases import Case

MODES = ("fwd", "bwd", "full")
# CPU: a backend predicted to need more memory than this is not run (Linux would rather kill the
# process than fail an allocation); the machine this was written on has 24 GB.
MEM_BUDGET_GB = 8.0
# Devices each fused backend is benchmarked on (Triton on the CPU is the interpreter: never).
_RUNS_ON = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
# The "bwd" mode runs backward repeatedly through one retained graph, which torch.compile refuses
# when its backward donates (reuses) saved buffers: switch that memory optimisation off.
torch._functorch.config.donated_buffer = False


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fused_backends(op: str, device: torch.device) -> list[str]:
    """Available kdkernels backends other than "torch" that implement `op` on `device`."""
    return [name for name, st in kdk.backends().items()
            if name != "torch" and st["available"] and op in st["ops"]
            and device.type in _RUNS_ON.get(name, ())]


def backend_labels(case: Case, device: torch.device) -> list[str]:
    """The backends timed for `case` on `device`: "torch" (the public API with backend="torch",
    the eager reference behind the same validation), "compile" (the reference under
    torch.compile), the fused backends that run there and the case's peers that run there."""
    return ["torch", "compile", *fused_backends(case.op, device),
            *(label for label in case.peers if device.type in peers.PEERS[label][1])]


def implementation(case: Case, label: str):
    """f(*inputs) -> loss for one backend label; ImportError when a peer's library is missing."""
    kw = case.kwargs
    if label == "compile":
        torch._dynamo.reset()  # a clean cache: compiled once for this case, never from another's
        compiled = torch.compile(getattr(kdk.reference, case.op), dynamic=False)
        return lambda *a: compiled(*a, **kw)
    if label in peers.PEERS:
        return peers.PEERS[label][0](kw)
    public = getattr(kdk, case.op)
    return lambda *a: public(*a, backend=label, **kw)


def implementations(case: Case, device: torch.device) -> tuple[dict, list[dict]]:
    """(backend label -> f(*inputs) -> loss, peers skipped for a missing library)."""
    impls, skipped = {}, []
    for label in backend_labels(case, device):
        try:
            impls[label] = implementation(case, label)
        except ImportError as exc:
            skipped.append({"case": case.name, "backend": label, "error": str(exc)[:500]})
            log(f"  {label}: skipped ({exc})")
    return impls, skipped


def mode_steps(call, args: tuple, wanted) -> dict:
    """fwd: the loss (with autograd recording, as in training); bwd: the backward of one retained
    graph (built here only if bwd is wanted); full: both. The gradient of args[0] comes from
    autograd.grad (no .grad accumulation)."""
    student = args[0]
    steps = {"fwd": lambda: call(*args),
             "full": lambda: torch.autograd.grad(call(*args), student)}
    if "bwd" in wanted:
        retained = call(*args)
        steps["bwd"] = lambda: torch.autograd.grad(retained, student, retain_graph=True)
    return {mode: steps[mode] for mode in wanted}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, device: torch.device, dtype: torch.dtype, repeats: int, warmup: int,
             min_sample_s: float, modes, mem_budget: float) -> tuple[list[dict], list[dict]]:
    """Rows {backend, mode, median_ms, min_ms, peak_mem_mb, inner, samples_ms, oom[,
    predicted_peak_mb]}, skipped backends. On the CPU a backend whose predicted memory exceeds
    mem_budget (bytes) is not run; on CUDA an out-of-memory error is caught. Both give rows with
    oom set to the reason and no timings."""
    args = case.inputs(device, dtype)
    fns, inner, oom, predicted = {}, {}, {}, {}
    impls, skipped = implementations(case, device)
    for backend, call in impls.items():
        predicted[backend] = case.predicted_memory(backend, modes)
        if device.type == "cpu" and (predicted[backend] or 0) > mem_budget:
            oom[backend] = (f"predicted {predicted[backend] / 1e9:.3g} GB > budget "
                            f"{mem_budget / 1e9:.3g} GB: not run")
            log(f"  {backend}: out of memory ({oom[backend]})")
            continue
        t0 = time.perf_counter()
        ready = False
        try:
            fns[backend] = mode_steps(call, args, modes)
            for mode, fn in fns[backend].items():
                inner[backend, mode] = harness.warm_and_calibrate(fn, device, warmup, min_sample_s)
            ready = True
        except torch.OutOfMemoryError as exc:
            oom[backend] = f"caught {type(exc).__name__}"
            log(f"  {backend}: out of memory ({oom[backend]})")
        except Exception as exc:  # a broken backend is reported, not fatal for the others
            skipped.append({"case": case.name, "backend": backend, "error": repr(exc)[:500]})
            log(f"  {backend}: skipped ({type(exc).__name__}: {str(exc)[:200]})")
        if not ready:
            fns.pop(backend, None)
            _free(device)  # here, not in the except clause, whose traceback holds its tensors
            continue
        log(f"  {backend}: ready in {time.perf_counter() - t0:.1f} s "
            f"(inner {', '.join(str(inner[backend, m]) for m in modes)})")

    # Round-robin: every repeat visits every backend (rotated start), so drift hits all alike.
    names = list(fns)
    samples = {key: [] for key in inner}
    for r in range(repeats):
        for i in range(len(names)):
            backend = names[(i + r) % len(names)]
            for mode in modes:
                key = (backend, mode)
                samples[key].append(harness.time_per_call(fns[backend][mode], inner[key], device))

    rows = []
    for backend in (b for b in predicted if b in fns or b in oom):  # implementation order
        for mode in modes:
            key = (backend, mode)
            if backend in oom:
                row = {"median_ms": None, "min_ms": None, "peak_mem_mb": None, "inner": None,
                       "samples_ms": [], "oom": oom[backend]}
            else:
                row = {"median_ms": harness.median(samples[key]) * 1e3,
                       "min_ms": min(samples[key]) * 1e3,
                       "peak_mem_mb": harness.peak_memory_mb(fns[backend][mode], device),
                       "inner": inner[key], "samples_ms": [round(t * 1e3, 4) for t in samples[key]],
                       "oom": None}
                if device.type == "cuda":  # the kernels alone: one call captured, replayed
                    graph_s, why = harness.graph_time_per_call(fns[backend][mode], inner[key], device)
                    row["graph_ms"] = graph_s * 1e3 if graph_s is not None else None
                    if why:
                        row["graph_error"] = why
            if predicted[backend] is not None:
                row["predicted_peak_mb"] = predicted[backend] / 2**20
            rows.append({"backend": backend, "mode": mode, **row})
    del fns, args
    _free(device)
    return rows, skipped
