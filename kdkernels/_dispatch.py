"""Backend discovery and selection.

Availability is decided once, at import, from what is really there: the compiled extension and
which dispatch keys its ops are registered for, a CUDA device, Triton (on the GPU, or on the CPU
under TRITON_INTERPRET=1). Selection then is a dictionary lookup, which keeps it cheap per call
and traceable by torch.compile.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
ENV_VAR = "KDKERNELS_BACKEND"

# "auto" takes the first available entry that implements the op. On CUDA tensors the CUDA C++
# kernels come first until the GPU benchmark records say otherwise; the Triton interpreter is
# never picked automatically on the CPU (it is a correctness tool, orders of magnitude slower).
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_IMPLS: dict[str, dict[str, Callable]] = {}


def _extension_status() -> tuple[bool, bool, str]:
    """(cpu kernels loaded, cuda kernels compiled in, why not)."""
    try:
        from kdkernels import _C  # noqa: F401  (loading it registers the ops)
    except ImportError as exc:
        return False, False, (
            f"the compiled extension kdkernels._C could not be loaded ({exc}); reinstall with a C++ "
            "compiler and ninja: pip install --no-build-isolation -e .")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(
        "kdkernels::attention_transfer", "CUDA")
    return True, has_cuda, ""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


HAS_TRITON = importlib.util.find_spec("triton") is not None


def _probe() -> dict[str, dict]:
    cpu_ok, cuda_built, ext_reason = _extension_status()
    gpu = torch.cuda.is_available()
    status = {"torch": (True, "")}
    status["cpu"] = (cpu_ok, ext_reason)
    if not cpu_ok:
        status["cuda"] = (False, ext_reason)
    elif not cuda_built:
        status["cuda"] = (False, (
            "kdkernels was built without its CUDA kernels (no nvcc or a CPU-only torch at build "
            "time, or KDKERNELS_SKIP_CUDA=1); rebuild on a CUDA machine with "
            "KDKERNELS_FORCE_CUDA=1 pip install --no-build-isolation -e ."))
    elif not gpu:
        status["cuda"] = (False, "the CUDA kernels are built but torch sees no CUDA device")
    else:
        status["cuda"] = (True, "")
    if not HAS_TRITON:
        status["triton"] = (False, "triton is not installed: pip install triton")
    elif not (gpu or _triton_interpret()):
        status["triton"] = (False, (
            "no GPU for Triton; set TRITON_INTERPRET=1 before importing kdkernels to run the Triton "
            "kernels in the (slow) CPU interpreter"))
    else:
        status["triton"] = (True, "")
    return {name: {"available": ok, "reason": why} for name, (ok, why) in status.items()}


_STATUS = _probe()


def register(op: str, backend: str):
    """Decorator: `fn` implements public op `op` on `backend` (same arguments, validated)."""
    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn
    return wrap


def backends() -> dict[str, dict]:
    """name -> {"available": bool, "reason": why not ("" if available), "ops": fused ops it has}."""
    return {
        name: dict(_STATUS[name], ops=sorted(op for op, impls in _IMPLS.items() if name in impls))
        for name in BACKENDS
    }


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpret())
    return True


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of `op` for `backend` ("auto" or a name) on tensors on `device`."""
    impls = _IMPLS[op]
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend != "auto" and backend not in impls and backend in BACKENDS:
            backend = "auto"  # the override only applies to ops that have that backend
    if backend == "auto":
        for name in PREFERENCE.get(device.type, ("torch",)):
            if name in impls and _STATUS[name]["available"] and _runs_on(name, device):
                return impls[name]
        return impls["torch"]
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto' or one of {', '.join(BACKENDS)}, "
                         f"got {backend!r}")
    if not _STATUS[backend]["available"]:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: "
                           f"{_STATUS[backend]['reason']}")
    if backend not in impls:
        have = ", ".join(sorted(impls))
        raise RuntimeError(f"{op}: there is no fused {backend!r} implementation of this op yet "
                           f"(it has: {have}); use backend='auto' or one of those")
    if not _runs_on(backend, device):
        raise RuntimeError(f"{op}: backend {backend!r} cannot run on {device.type} tensors; move "
                           "the inputs or pick another backend (see kdkernels.backends())")
    return impls[backend]
