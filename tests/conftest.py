"""Test configuration. Without a GPU the Triton kernels run in the interpreter, which must be
switched on before Triton (or kdkernels, which imports it) is first imported."""

import hashlib
import os
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _inductor_cache_dir() -> str:
    """torch.compile's on-disk cache does not key on custom-op schemas (pytorch/pytorch#144344): a
    cache filled under other definitions of these ops can replay a stale graph. The suite's is
    keyed by the sources that define them."""
    root = Path(__file__).resolve().parents[1]
    sources = sorted((root / "kdkernels").rglob("*.py")) + sorted((root / "csrc").glob("*.cpp"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / f"kdk-inductor-{digest}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import kdkernels  # noqa: E402,F401  (imported after the switch above on purpose)

if os.environ.get("TRITON_INTERPRET") == "1":
    # tl.dot's TF32 input precisions round as the tensor cores do (tests/tf32_emulation.py).
    from tf32_emulation import install

    install()

if os.environ.get("KDK_TRITON_LAUNCHES") and os.environ.get("TRITON_INTERPRET") == "1":
    # Record the interpreted launches for tests/triton_compile_check.py (scripts/test.sh).
    from triton_compile_check import record_launches

    record_launches(os.environ["KDK_TRITON_LAUNCHES"])

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_report_header(config):
    status = kdkernels.backends()
    return "kdkernels backends: " + ", ".join(
        f"{name}={'yes' if s['available'] else 'no'}" for name, s in status.items())


# Hypothesis profiles for tests/test_fuzz.py. "ci" (the default) replays the same examples every
# run; "long" (`--hypothesis-profile long`) draws fresh ones, many more, for GPU runs and releases.
settings.register_profile("ci", max_examples=60, derandomize=True, database=None, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")
