"""tests/triton_compile_check.py itself: interpreted launches are recorded, and a launch that the
compiler rejects (here an int argument equal to 1, which Triton's JIT turns into a constexpr) or
that spills registers (a tile too large for one warp's registers) is reported, while the others
pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

import triton_compile_check  # noqa: E402
from triton_compile_check import record_launches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@triton.jit
def _scale_kernel(x_ptr, n, scale, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(x_ptr + i, x * tl.cast(scale, tl.float32), mask=i < n)


@triton.jit
def _int_arg_kernel(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK).to(tl.int64)
    tl.store(x_ptr + i, i.to(tl.float32), mask=i < n.to(tl.int64))


@triton.jit
def _spilling_kernel(x_ptr, BLOCK: tl.constexpr):
    # The whole tile stays live across the reduction: 256 floats per thread of one warp.
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i)
    tl.store(x_ptr + i, x / tl.sum(x * x))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records interpreted launches")
def test_records_and_reports_a_rejected_launch(tmp_path, monkeypatch):
    # The interpreter's own launch (restored after the test), so that these deliberately rejected
    # launches stay out of the suite's own record (KDK_TRITON_LAUNCHES, scripts/test.sh).
    monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                        triton_compile_check.UNRECORDED_RUN or interpreter.InterpretedFunction.run)
    launches = tmp_path / "launches.jsonl"
    record_launches(str(launches))
    x = torch.ones(16)
    _scale_kernel[(1,)](x, 5, 2.0, BLOCK=16)
    _scale_kernel[(1,)](x, 5, 2.0, BLOCK=16)  # the same launch: recorded once
    _int_arg_kernel[(1,)](x, 7, BLOCK=16)
    _int_arg_kernel[(1,)](x, 1, BLOCK=16)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0] + [1.0] * 9  # the launches ran
    big = torch.ones(8192)
    _spilling_kernel[(1,)](big, BLOCK=8192, num_warps=1)
    assert big[0].item() == 1 / 8192
    recorded = [json.loads(line) for line in launches.read_text().splitlines()]
    assert [(r["name"], r["args"].get("n")) for r in recorded] == [
        ("_scale_kernel", ["int", 5]), ("_int_arg_kernel", ["int", 7]), ("_int_arg_kernel", ["int", 1]),
        ("_spilling_kernel", None)]

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "tests/triton_compile_check.py", str(launches)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr[-2000:]
    # 4 launches, the float-argument one also with float64 floats (as torch.compile passes them)
    assert "5 launches (4 recorded), 2 failed the checks" in out, out
    assert "_int_arg_kernel(" in out and "n=1" in out, out
    assert "_spilling_kernel(" in out and "bytes of register spills (budget 64)" in out, out
    assert "_scale_kernel 0" in out, out
