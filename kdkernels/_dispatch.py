"""Backend discovery and selection.

Availability is decided once, at import, from what is really there: the compiled extension and
which dispatch keys its ops are registered for, a CUDA device, Triton (on the GPU, or on the CPU
under TRITON_INTERPRET=1). Selection then is a dictionary lookup, which keeps it cheap per call
and traceable by torch.compile.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import warnings
from typing import Callable

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
ENV_VAR = "KDKERNELS_BACKEND"

# "auto" takes the first available entry that implements the op. On CUDA tensors the CUDA C++
# kernels come first until the GPU benchmark records say otherwise; the Triton interpreter is
# never picked automatically on the CPU (it is a correctness tool, orders of magnitude slower).
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}

_IMPLS: dict[str, dict[str, Callable]] = {}
# (op, backend as asked, KDKERNELS_BACKEND, device type) -> implementation, for the calls that
# resolved without an error (errors are raised again on every call); cleared by register().
_RESOLVED: dict[tuple, Callable] = {}


REBUILD = "rebuild it against this torch: pip install --no-build-isolation -e . (in the kdkernels source)"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _warn_caller(message: str) -> None:
    """A RuntimeWarning attributed to the code that imported kdkernels (the first frame outside
    this package and importlib), so it points at the user's import rather than at this file."""
    frame = sys._getframe(1)
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                        or "importlib" in frame.f_code.co_filename):
        frame = frame.f_back
    warnings.warn_explicit(message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}))


def _built_for() -> str | None:
    """The torch version kdkernels._C was compiled against (setup.py records it), if known."""
    try:
        with open(os.path.join(_PACKAGE, "_build.json")) as f:
            return json.load(f)["torch"]
    except (OSError, ValueError, KeyError):
        return None


def _load_extension() -> str:
    """Loads kdkernels._C (which registers its ops); returns why it is not usable ("" if it is).

    An extension that was never built (KDKERNELS_SKIP_EXTENSION=1, a source checkout) is a
    choice and stays quiet. One that is there but cannot be used warns once: backend="auto"
    then runs the eager reference, and without the warning nobody would notice. An extension
    built for another torch is not loaded at all, since it may load and crash at first use.
    """
    if importlib.util.find_spec("kdkernels._C") is None:
        return ("kdkernels was installed without its compiled extension kdkernels._C "
                "(KDKERNELS_SKIP_EXTENSION=1, or a source checkout that was not built); build it with "
                "a C++ compiler and ninja: pip install --no-build-isolation -e .")
    built = _built_for()
    # The local part (+cu130, +cpu) may differ: a CUDA build that lacks its CUDA libraries fails
    # to load below, with a message naming them.
    if built is not None and built.split("+")[0] != torch.__version__.split("+")[0]:
        why = f"kdkernels._C was built for torch {built} but torch {torch.__version__} is installed; {REBUILD}"
    else:
        try:
            importlib.import_module("kdkernels._C")  # registers the ops
            return ""
        except Exception as exc:  # noqa: BLE001 - any failure to load leaves the pure-Python backends
            detail = " ".join(str(exc).split())
            why = (f"the compiled extension kdkernels._C could not be loaded ({type(exc).__name__}: {detail}); "
                   f"it was probably built for another torch or CUDA than torch {torch.__version__}: {REBUILD}")
    _warn_caller(f"kdkernels: {why}. The cpu and cuda backends are off; backend='auto' runs the eager "
                 "PyTorch reference.")
    return why


def _extension_status() -> tuple[bool, bool, str]:
    """(cpu kernels loaded, cuda kernels compiled in, why not)."""
    why = _load_extension()
    if why:
        return False, False, why
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
            "kdkernels was built without its CUDA kernels (no nvcc, an nvcc of another CUDA major "
            "version than torch's, a CPU-only torch at build time, or KDKERNELS_SKIP_CUDA=1); rebuild with "
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
        _RESOLVED.clear()
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


# KDKERNELS_BACKEND is read on every call (a test or a notebook may set it at any time), from
# the environment's underlying dict: os.environ.get re-encodes the key each time, which costs
# about as much as the rest of the dispatch.
_ENVIRON = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)
except AttributeError:  # an os.environ without the CPython internals: the public, slower route
    _ENVIRON = None


def _env_backend() -> str:
    if _ENVIRON is None:
        return os.environ.get(ENV_VAR, "")
    raw = _ENVIRON.get(_ENV_KEY)
    return "" if raw is None else os.environ.decodevalue(raw)


def runnable(op: str, device: torch.device) -> list[str]:
    """The available fused backends (all but "torch") that implement `op` and run on tensors on
    `device`: Triton on CPU tensors only in the interpreter."""
    return [name for name in BACKENDS if name != "torch" and _STATUS[name]["available"]
            and name in _IMPLS.get(op, {}) and _runs_on(name, device)]


def resolve(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of `op` for `backend` ("auto" or a name) on tensors on `device`."""
    env = _env_backend() if backend == "auto" else ""
    key = (op, backend, env, device.type)
    impl = _RESOLVED.get(key)
    if impl is None:
        impl = _RESOLVED[key] = _resolve(op, backend, env or "auto", device)
    return impl


def _resolve(op: str, backend: str, env: str, device: torch.device) -> Callable:
    impls = _IMPLS[op]
    if backend == "auto":
        backend = env
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
