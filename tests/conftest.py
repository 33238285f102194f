"""Test configuration. Without a GPU the Triton kernels run in the interpreter, which must be
switched on before Triton (or kdkernels, which imports it) is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kdkernels  # noqa: E402,F401  (imported after the switch above on purpose)

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_report_header(config):
    status = kdkernels.backends()
    return "kdkernels backends: " + ", ".join(
        f"{name}={'yes' if s['available'] else 'no'}" for name, s in status.items())
