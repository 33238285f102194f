"""Builds the CPU emulation of the CUDA kernels (include/emu_cuda.h) as a shared library.

The kernel sources are compiled unchanged except for their launches, which are rewritten from
kernel<<<grid, block, smem, stream>>>(args) into ::emu::Launch(grid, block, smem, stream).run(kernel,
args). The library is cached by the hash of every input file.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
KERNELS = ("attention_transfer_kernel.cu", "channel_relation_kernel.cu", "finish_kernel.cu", "pixel_kl_kernel.cu",
           "pixel_relation_kernel.cu", "sgm_kernel.cu")
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def _inputs() -> list[Path]:
    return ([CSRC / "cuda" / k for k in KERNELS] + sorted((CSRC / "cuda").glob("*.h"))
            + sorted((CSRC / "cuda").glob("*.cuh")) + sorted((HERE / "include").rglob("*.h"))
            + sorted((HERE / "include").rglob("*.cuh"))
            + [HERE / "driver.cpp", Path(__file__)])


def build() -> Path:
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _inputs())).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"kdk-cuda-emulation-{digest}"
    lib = out / "libkdk_emu.so"
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    sources = []
    for name in KERNELS:
        text = _LAUNCH.sub(r"::emu::Launch(\2).run(\1, ", (CSRC / "cuda" / name).read_text())
        src = out / (name + ".cpp")
        src.write_text(text)
        sources.append(str(src))
    tmp = out / "libkdk_emu.so.tmp"
    subprocess.run(["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-w",
                    f"-I{HERE / 'include'}", f"-I{CSRC}", f"-I{CSRC / 'cuda'}", "-include", "emu_cuda.h",
                    *sources, str(HERE / "driver.cpp"), "-o", str(tmp)], check=True)
    tmp.rename(lib)
    return lib


if __name__ == "__main__":
    print(build())
