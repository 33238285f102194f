"""Timing, peak memory, the copy-bandwidth roofline and the run's environment record."""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Environment variables that change what or how fast the run measures; recorded when set.
ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
            "KDKERNELS_BACKEND", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Calls before timing: compilation, autotuning and allocator growth happen there.
WARMUP_CALLS = {"cuda": 5, "cpu": 2}

TIMING_METHOD = {
    "cpu": "time.perf_counter around `inner` back-to-back calls, divided by inner",
    "cuda": "CUDA events around `inner` back-to-back calls (synchronized before and after), "
            "divided by inner",
}
MEMORY_METHOD = {
    "cpu": "process RSS high-water mark: VmHWM (/proc/self/status) after one step minus VmRSS "
           "before it; VmHWM reset by writing 5 to /proc/self/clear_refs, freed heap returned "
           "with malloc_trim(0) and gc.collect() first",
    "cuda": "torch.cuda.max_memory_allocated after one step minus memory_allocated before it "
            "(peak stats reset before the step)",
}


def default_dtypes(device: torch.device) -> list[str]:
    """float32 and a 16-bit type: bfloat16, or float16 on a GPU without bfloat16 arithmetic (CUDA
    before sm_80: neither cuBLAS nor Triton has it there). The Triton interpreter has no bfloat16
    either, but it is never benchmarked."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return ["float32", "float16"]
    return ["float32", "bfloat16"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- timing ---------------------------------------------------------------------------------


def time_per_call(fn, inner: int, device: torch.device) -> float:
    """Seconds per call of `fn`, from `inner` back-to-back calls."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def graph_time_per_call(fn, inner: int, device: torch.device) -> tuple[float | None, str | None]:
    """(seconds per call of `fn` replayed from a CUDA graph, None) on a GPU: the kernels' own
    time, without the host's launch and Python work; (None, why) where it cannot be captured
    (eager code that synchronises, say) or off the GPU."""
    if device.type != "cuda":
        return None, "no CUDA graphs off the GPU"
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graph wants
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize(device)
        return time_per_call(graph.replay, inner, device), None
    except Exception as exc:  # noqa: BLE001 (a backend that cannot be captured is reported)
        torch.cuda.synchronize(device)
        return None, f"{type(exc).__name__}: {str(exc)[:200]}"


def warm_and_calibrate(fn, device: torch.device, warmup: int, min_sample_s: float) -> int:
    """Run `fn` `warmup` times, then pick how many calls make one sample last >= min_sample_s."""
    for _ in range(warmup):
        fn()
    sync(device)
    once = time_per_call(fn, 1, device)
    if once < min_sample_s:  # min of three: robust to a stray stall (slow calls skip it: inner 1)
        once = min(once, *(time_per_call(fn, 1, device) for _ in range(2)))
    return max(1, min(1000, math.ceil(min_sample_s / max(once, 1e-9))))


def median(values) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# --- peak memory ----------------------------------------------------------------------------


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_memory_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_status_kb("VmHWM")
        return True
    except OSError:
        return False


def peak_memory_mb(step, device: torch.device) -> float | None:
    """Peak memory growth (MiB) while `step()` runs once; None where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    base = _proc_status_kb("VmRSS")
    step()
    return max(0, _proc_status_kb("VmHWM") - base) / 1024


# --- roofline -------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """GB/s of a large same-device tensor copy: 2 * bytes (read + write) / median time."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touches every page before timing
    sync(device)
    t = median(time_per_call(lambda: dst.copy_(src), 1, device) for _ in range(repeats))
    return 2 * nbytes / t / 1e9


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """TFLOP/s of torch.mm of two n x n matrices: 2 n^3 / median time."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty_like(a)

    def step():
        torch.mm(a, b, out=out)

    inner = warm_and_calibrate(step, device, 1, 0.05)
    t = median(time_per_call(step, inner, device) for _ in range(repeats))
    return 2 * n**3 / t / 1e12


def roofline(device: torch.device, quick: bool) -> dict:
    """Copy bandwidth (the GB/s roof) and float32 matmul throughput (the TFLOP/s roof; TF32 off;
    on CUDA also bfloat16, the tensor-core peak, for reference)."""
    nbytes = (64 if quick else 256) * 2**20
    out = {"copy_bytes": nbytes, "copy_gbps": copy_bandwidth(device, nbytes)}
    if device.type == "cpu":
        threads = torch.get_num_threads()
        out["threads"] = threads
        torch.set_num_threads(1)
        try:
            out["copy_gbps_single_thread"] = copy_bandwidth(device, nbytes)
        finally:
            torch.set_num_threads(threads)
    n = 8192 if device.type == "cuda" else (2048 if quick else 4096)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # plain float32 products, no TF32
    try:
        out.update(matmul_n=n, matmul_tflops=matmul_tflops(device, n, torch.float32))
    finally:
        torch.set_float32_matmul_precision(precision)
    if device.type == "cuda":
        out["matmul_tflops_bf16"] = matmul_tflops(device, n, torch.bfloat16)
    return out


# --- environment ----------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return getattr(triton, "__version__", "unknown")


def environment(device: torch.device) -> dict:
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return {
        "device": device_name(device),
        "device_kind": device.type,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(status) if status is not None else True,
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "argv": sys.argv[1:],
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
