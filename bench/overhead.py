"""`python -m bench --overhead`: what one fused loss call costs the host, and how many kernels.

At small shapes a loss is all fixed cost: Python, the dispatcher, autograd, allocations and
kernel launches. Per op and backend this measures, at a tiny shape (B=2, C=4, 8 x 8, one thread):

- host microseconds of forward + backward of the public call, interleaved with `F.mse_loss`
  forward + backward on tensors of the same size (the cheapest torch loss) so that the ratio
  holds on a busy machine;
- device kernels per forward + backward, counted, not estimated (`count_kernels`).

The kernel counter is shared with the tests (tests/test_kernel_counts.py).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

import kdkernels as kdk
from bench.cases import known_ops

# Leaf aten ops that launch nothing on a GPU: allocation, views, metadata. Every other leaf aten
# op of a call counts as one kernel (fill_, copy_, add, sum, ...); `_local_scalar_dense` is a
# `.item()`, a kernel-free but synchronising read, and is reported as such.
NO_KERNEL = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view",
    "aten::as_strided", "aten::reshape", "aten::_reshape_alias", "aten::alias", "aten::detach",
    "detach", "aten::detach_", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
    "aten::select", "aten::slice", "aten::narrow", "aten::unsqueeze", "aten::squeeze",
    "aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::set_", "aten::diagonal",
    "aten::unbind", "aten::split", "aten::contiguous", "aten::_has_compatible_shallow_copy_type",
    "aten::result_type", "aten::is_nonzero", "aten::new_empty", "aten::new_empty_strided",
    "aten::view_as", "aten::flatten", "aten::unflatten", "aten::movedim", "aten::expand_as",
})
SYNC = "aten::_local_scalar_dense"
_TRITON_MARK = "kdk_triton_launch:"


@contextmanager
def _marked_triton_launches():
    """Each interpreted Triton launch inside a profiler range named after its kernel, so that
    the interpreter's own tensor copies are not mistaken for the op's aten kernels."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    run = interpreter.InterpretedFunction.run

    def marked(self, *args, **kwargs):
        with record_function(_TRITON_MARK + self.fn.__name__):
            return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = marked
    try:
        yield
    finally:
        interpreter.InterpretedFunction.run = run


def _inside(ev, ranges) -> bool:
    return any(start <= ev.time_range.start and ev.time_range.end <= end for start, end in ranges)


def count_kernels(fn, device: torch.device) -> dict:
    """Run fn() once under the profiler; {"kernels": n, "names": [...], "syncs": n}.

    CUDA: every kernel, memset and memcpy the device ran (CUDA activity). CPU (the Triton
    interpreter or the C++ kernels): Triton launches, plus each kdkernels C++ operator called at
    top level (one fused kernel), plus the outermost aten calls outside both that would launch a
    kernel on a GPU (see _launches).
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _marked_triton_launches(), profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = list(prof.events())
    syncs = sum(ev.name == SYNC for ev in events)
    if device.type == "cuda":
        names = [ev.name for ev in events if ev.device_type == torch.autograd.DeviceType.CUDA]
        return {"kernels": len(names), "names": names, "syncs": syncs}
    names, fused = [], []
    for ev in events:
        if ev.name.startswith(_TRITON_MARK):
            names.append(ev.name[len(_TRITON_MARK):])
            fused.append((ev.time_range.start, ev.time_range.end))
        elif ev.name.startswith("kdkernels::") and not ev.name.endswith("_triton") \
                and not ev.name.endswith("_triton_backward") and not _inside(ev, fused):
            names.append(ev.name)
            fused.append((ev.time_range.start, ev.time_range.end))
    for ev in events:
        if (ev.name.startswith("aten::") and not _aten_parent(ev) and _launches(ev)
                and not _inside(ev, fused)):
            names.append(ev.name)
    return {"kernels": len(names), "names": names, "syncs": syncs}


def _aten_parent(ev) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _launches(ev) -> bool:
    """Whether an aten call would launch a kernel: some leaf under it (or itself) does. The CPU
    implementations nest further aten calls (a sum zero-fills its output), so an outermost aten
    op counts once, as its single GPU kernel."""
    if not ev.cpu_children:
        return ev.name not in NO_KERNEL and ev.name != SYNC
    return any(_launches(child) for child in ev.cpu_children)


# --- the tiny-shape calls -------------------------------------------------------------------

B, C, S = 2, 4, 8  # batch, channels, side
SHAPE_NOTE = (f"student and teacher ({B}, {C}, {S}, {S}); 1-channel maps ({B}, 1, {S}, {S}) for "
              "sgm, logit_attention and structure (mask = teacher > 0); float32; default keywords")
TIMING_NOTE = ("one thread; host microseconds per fwd + bwd of the public call (autograd.grad "
               "with a ready upstream gradient), 200 back-to-back calls per sample, 15 samples "
               "alternating with F.mse_loss fwd + bwd on (B, C, S, S); medians, and the median "
               "of the per-sample ratios; CUDA synchronised once per sample")
COUNT_NOTE = ("kernels per fwd + bwd: CUDA, every kernel, memset and memcpy of the profiler's "
              "CUDA activity; CPU, the interpreted Triton launches, kdkernels C++ ops and the "
              "outermost aten calls that launch a kernel on a GPU (bench/overhead.py NO_KERNEL); "
              "syncs: .item()-style reads (aten::_local_scalar_dense)")


def tiny_inputs(op: str, device, dtype=torch.float32, seed: int = 0) -> tuple:
    """(student, teacher) of `op` at the tiny shape; the student requires a gradient."""
    g = torch.Generator().manual_seed(seed)
    channels = 1 if op in ("sgm_loss", "logit_attention_loss", "structure_loss") else C
    s = torch.randn(B, channels, S, S, generator=g)
    t = torch.randn(B, channels, S, S, generator=g)
    if op == "structure_loss":
        t = (t > 0).float()
    return s.to(device, dtype).requires_grad_(True), t.to(device, dtype)


def fwd_bwd(op: str, backend: str, student, teacher, **kwargs):
    """fwd + bwd of the public call, the gradient through autograd.grad with a ready upstream
    gradient: the seed of a backward is the caller's, not a kernel of the loss."""
    fn = getattr(kdk, op)
    seed = torch.ones((), device=student.device)
    return lambda: torch.autograd.grad(fn(student, teacher, backend=backend, **kwargs), student, seed)


def _mse_step(device, dtype):
    s = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(B, C, S, S, device=device, dtype=dtype)
    seed = torch.ones((), device=device, dtype=dtype)
    return lambda: torch.autograd.grad(F.mse_loss(s, t), s, seed)


def _per_call(fn, calls: int, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / calls


def host_us(fn, baseline, device, calls: int = 200, repeats: int = 15) -> tuple[float, float, float]:
    """(median us per call of fn, of baseline, median of the per-repeat ratios): fn and baseline
    alternate, `calls` back-to-back calls each, `repeats` times."""
    for _ in range(calls // 4):
        fn(), baseline()
    mine, base, ratio = [], [], []
    for _ in range(repeats):
        a = _per_call(fn, calls, device)
        b = _per_call(baseline, calls, device)
        mine.append(a * 1e6)
        base.append(b * 1e6)
        ratio.append(a / b)
    return statistics.median(mine), statistics.median(base), statistics.median(ratio)


def overhead_rows(device: torch.device, backends=None, ops=None) -> list[dict]:
    """One row per (op, backend): host us fwd+bwd, mse us in the same run, ratio, kernels."""
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        baseline = _mse_step(device, torch.float32)
        for op in ops or known_ops():
            # The Triton interpreter included: its kernels are counted, not timed.
            for backend in ["torch", *kdk._dispatch.runnable(op, device)]:
                if backends and backend not in backends:
                    continue
                s, t = tiny_inputs(op, device)
                step = fwd_bwd(op, backend, s, t)
                counted = count_kernels(step, device)
                # Interpreted Triton runs kernels in numpy: its time says nothing about the host.
                interpreted = backend == "triton" and device.type == "cpu"
                us = base = ratio = None
                if not interpreted:
                    us, base, ratio = host_us(step, baseline, device)
                rows.append({"op": op, "backend": backend, "host_us": us, "mse_us": base,
                             "ratio_to_mse": ratio, "kernels": counted["kernels"],
                             "kernel_names": counted["names"], "syncs": counted["syncs"]})
    finally:
        torch.set_num_threads(threads)
    return rows


def format_rows(rows: list[dict]) -> str:
    head = f"{'op':24s} {'backend':8s} {'host us':>8s} {'mse us':>7s} {'x mse':>6s} {'kernels':>7s} {'syncs':>5s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        us = f"{r['host_us']:8.1f}" if r["host_us"] is not None else f"{'-':>8s}"
        base = f"{r['mse_us']:7.1f}" if r["mse_us"] is not None else f"{'-':>7s}"
        ratio = f"{r['ratio_to_mse']:6.2f}" if r["ratio_to_mse"] is not None else f"{'-':>6s}"
        lines.append(f"{r['op']:24s} {r['backend']:8s} {us} {base} {ratio} {r['kernels']:7d} {r['syncs']:5d}")
    return "\n".join(lines)
