"""Static checks of the CUDA kernels as compiled for sm_90 (H100/H200), with nvcc where the
machine has it, no GPU needed: every kernel's register spills stay within SPILL_BUDGET bytes
(ptxas -v), and the kernels whose tiles are meant for the tensor cores (TENSOR_CORE) hold mma
instructions in their PTX. The tails that hold a few float64 values past their register
allocation (the attention-transfer finalize, the channel-relation C x C tail, the pixel-KL pass)
spill a few dozen bytes; a hot tile loop that spilled would show hundreds."""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CUDA = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
KERNELS = sorted(p.name for p in CUDA.glob("*_kernel.cu"))
SPILL_BUDGET = 64  # bytes of spill stores per kernel
# source -> the (mangled) entry-name stems of its kernels with tensor-core tile products: the
# float32 kl kernels (3xTF32) and the float64 Grams (mma .f64)
TENSOR_CORE = {"pixel_relation_kernel.cu": ("prk_forward_kernelIf", "prk_backward_kernelIf", "prm_gram"),
               "channel_relation_kernel.cu": ("cr_gram",)}
NVCC = shutil.which("nvcc")
SM90 = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_90", f"-I{CUDA.parent}"]

pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def _ptxas_report(source: str) -> list[tuple[str, int, int]]:
    """(kernel, spill store bytes, registers) per entry function of one .cu for sm_90."""
    out = subprocess.run([NVCC, *SM90, "-c", str(CUDA / source), "-o", "/dev/null", "-Xptxas", "-v"],
                         capture_output=True, text=True, check=True).stderr
    rows, name = [], None
    for line in out.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line):
            name = m.group(1)
        elif name and (m := re.search(r"(\d+) bytes spill stores", line)):
            spills = int(m.group(1))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            rows.append((name, spills, int(m.group(1))))
            name = None
    return rows


@pytest.fixture(scope="module")
def reports():
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(KERNELS, pool.map(_ptxas_report, KERNELS)))


@pytest.mark.parametrize("source", KERNELS)
def test_spills_within_budget(reports, source):
    rows = reports[source]
    assert rows, f"ptxas reported no kernels for {source}"
    over = [(name, spills) for name, spills, _ in rows if spills > SPILL_BUDGET]
    assert not over, f"{source}: kernels spilling more than {SPILL_BUDGET} bytes: {over}"


def _ptx_entries(source: str, tmp_path: Path) -> dict[str, str]:
    """Entry name -> its PTX body, for one .cu compiled for sm_90."""
    out = tmp_path / "kernels.ptx"
    subprocess.run([NVCC, *SM90, "--ptx", str(CUDA / source), "-o", str(out)], capture_output=True, check=True)
    parts = re.split(r"\.entry (\w+)\(", out.read_text())
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("source", sorted(TENSOR_CORE))
def test_tensor_core_kernels_use_mma(source, tmp_path):
    entries = _ptx_entries(source, tmp_path)
    meant = {name: body for name, body in entries.items()
             if any(stem in name for stem in TENSOR_CORE[source])}
    assert meant, f"{source}: no entry matches {TENSOR_CORE[source]} (names: {sorted(entries)})"
    missing = [name for name, body in meant.items() if "mma.sync" not in body]
    assert not missing, f"{source}: no mma instruction in {missing}"
