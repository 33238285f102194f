"""tests/sanitize.py (the compute-sanitizer runner of scripts/gpu_session.sh): its reading of the
sanitizer's summaries, and its clean skip where there is no GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sanitize

MEMCHECK = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at sgm_tiles+0x1d0
========= ERROR SUMMARY: 3 errors
"""
RACECHECK = """========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at finalize+0x60
========= RACECHECK SUMMARY: 5 hazards displayed (2 errors, 3 warnings)
"""
CLEAN = "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"


@pytest.mark.parametrize("log,expected", [(MEMCHECK, (3, 0)), (RACECHECK, (2, 3)), (CLEAN, (0, 0)),
                                          ("Traceback (most recent call last):\n", (0, 0))])
def test_summaries_are_counted(log, expected):
    assert sanitize.summary(log) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there: the script would run")
def test_without_gpu_it_skips_with_one_line():
    script = Path(sanitize.__file__)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == sanitize.SKIPPED == 77
    assert run.stdout.strip().splitlines() == ["sanitize: skipped, torch sees no CUDA device "
                                               "(compute-sanitizer checks GPU kernels)"]
