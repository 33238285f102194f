"""Builds kdkernels and its extension kdkernels._C with ninja.

The C++ CPU kernels are always built; a build that cannot make them stops with a message that
names the fix (install a C++ compiler, or KDKERNELS_SKIP_EXTENSION=1 for the pure-Python package).
The CUDA kernels are added when torch has CUDA and an nvcc of torch's CUDA major version is found:
with another major version the CPU kernels are built alone, with a one-line warning.
KDKERNELS_FORCE_CUDA=1 turns every reason not to build them into an error, KDKERNELS_SKIP_CUDA=1
leaves them out quietly. TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0").
"""

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Written beside the built extension: the torch it was compiled against, which kdkernels checks
# before loading it (an extension built for another torch can load and then crash at first use),
# and the compilers and CUDA targets, which kdkernels.info() reports.
BUILD_RECORD = "_build.json"
SKIP_HINT = "or set KDKERNELS_SKIP_EXTENSION=1 to install only the pure-Python (eager PyTorch) backends"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _locate_cuda_home() -> None:
    # torch guesses CUDA_HOME as nvcc's grandparent; when nvcc is a wrapper in /usr/local/bin that
    # is /usr/local, which has no CUDA headers. Take the first candidate that has them.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def _missing_compiler() -> str:
    """The C++ compiler the build would run but cannot find ("" when it is there): CXX, else
    torch's default for compiling (c++) and Python's for linking."""
    wanted = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", sysconfig.get_config_var("CXX") or "c++"]
    for command in wanted:
        exe = shlex.split(command)[0]
        if not shutil.which(exe):
            return exe
    return ""


def _toolkit_problem(cuda_home: str, torch_cuda: str) -> str:
    """Why the toolkit at cuda_home cannot build for a torch built with CUDA torch_cuda ("" if
    it can). torch itself refuses a major-version mismatch, with an error that stops the build."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} does not run ({exc})"
    found = re.search(r"release (\d+)\.(\d+)", out)
    if found is None:
        return f"{nvcc} --version names no CUDA release"
    major = torch_cuda.split(".")[0]
    if found[1] != major:
        return (f"{nvcc} is CUDA {found[1]}.{found[2]} but torch was built with CUDA {torch_cuda}: install a "
                f"CUDA {major}.x toolkit and point CUDA_HOME at it to build the CUDA kernels")
    return ""


def _plan_cuda():
    """(build the CUDA kernels, a note for build time: an error when KDKERNELS_FORCE_CUDA=1
    cannot be honoured, else a warning; "" for none). No CUDA torch or no toolkit at all is the
    ordinary CPU-machine case and stays quiet; a toolkit that cannot serve this torch is not."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if _flag("KDKERNELS_SKIP_CUDA"):
        return False, ""
    if torch.version.cuda is None or CUDA_HOME is None:
        if not _flag("KDKERNELS_FORCE_CUDA"):
            return False, ""
        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch"
        return False, "no CUDA toolkit was found: put nvcc on the PATH or set CUDA_HOME"
    problem = _toolkit_problem(CUDA_HOME, torch.version.cuda)
    return not problem, problem


def _extensions():
    if _flag("KDKERNELS_SKIP_EXTENSION"):
        return [], {}
    _locate_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda, cuda_note = _plan_cuda()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    csrc = os.path.join("csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    extra = {"cxx": cxx}
    ext_cls = CppExtension
    if with_cuda:
        sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cpp")) + glob.glob(os.path.join(csrc, "cuda", "*.cu")))
        # torch's CUDA headers include cusparse.h, which pip-installed toolkits keep here.
        for site in sys.path:
            cu_include = os.path.join(site, "nvidia", "cu13", "include")
            if os.path.isdir(cu_include):
                include_dirs.append(cu_include)
                break
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        cxx.append("-DKDK_WITH_CUDA")
        ext_cls = CUDAExtension
    ext = ext_cls(
        name="kdkernels._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    return [ext], {"build_ext": _checked_build(BuildExtension, cuda_note, with_cuda)}


def _first_line(command: list) -> str:
    """The first line a tool prints of its version ("" if it does not run)."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.strip() for line in out.splitlines() if line.strip()), "")


def _build_facts(with_cuda: bool) -> dict:
    """What kdkernels.info() reports of the build: compilers and CUDA targets."""
    from torch.utils.cpp_extension import CUDA_HOME

    cxx = shlex.split(os.environ.get("CXX", "c++"))
    facts = {"cxx": _first_line(cxx + ["--version"]), "cuda_kernels": with_cuda}
    if with_cuda:
        nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
        release = re.search(r"release [\d.]+", subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout)
        facts.update(nvcc=release[0] if release else "", cuda_arch_list=os.environ["TORCH_CUDA_ARCH_LIST"])
    return facts


def _checked_build(base, cuda_note: str, with_cuda: bool):
    """A build_ext that checks the toolchain before compiling and says what to do when it
    cannot build (pip shows a failed build's output, but hides a successful one's warnings)."""

    class BuildExt(base):
        def run(self):
            if cuda_note and _flag("KDKERNELS_FORCE_CUDA"):
                raise SystemExit(f"error: KDKERNELS_FORCE_CUDA=1, but {cuda_note}")
            if cuda_note:
                print(f"WARNING: kdkernels: {cuda_note}; building the CPU kernels only "
                      "(KDKERNELS_SKIP_CUDA=1 silences this)", file=sys.stderr)
            missing = _missing_compiler()
            if missing:
                raise SystemExit(f"error: kdkernels: no C++ compiler: {missing!r} is not on the PATH; install "
                                 f"one (e.g. apt install g++) or point CXX at it, {SKIP_HINT}")
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure gets the same advice
                raise SystemExit(
                    f"error: kdkernels: building kdkernels._C failed ({exc}; the compiler's errors are above): "
                    f"fix them, or set KDKERNELS_SKIP_CUDA=1 to leave out the CUDA kernels, {SKIP_HINT}") from exc
            self._record_torch()

        def _record_torch(self):
            import torch

            folders = {os.path.join(self.build_lib, "kdkernels")}
            if self.inplace:
                folders.add(os.path.dirname(self.get_ext_fullpath("kdkernels._C")))
            record = {"torch": torch.__version__, **_build_facts(with_cuda)}
            for folder in folders:
                with open(os.path.join(folder, BUILD_RECORD), "w") as f:
                    json.dump(record, f)

    return BuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = _extensions()

setup(
    name="kdkernels",
    version="0.1.0",
    description="Fused Triton, CUDA and C++ kernels for knowledge-distillation losses in medical imaging",
    # The wheel holds kdkernels alone: a top-level `models` would shadow (or be shadowed by) the
    # package of that name in users' own projects. models/ (the reference networks and
    # `python -m models.train`) runs from a checkout; its dependencies are the "models" extra.
    packages=find_packages(include=["kdkernels", "kdkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis", "pytest-benchmark"],
                    "bench": ["matplotlib", "liger-kernel"], "torchdistill": ["torchdistill"],
                    # examples/: plain_loop.py reads models/ (tqdm), the others add their framework.
                    "examples": ["lightning", "torchdistill", "tqdm"],
                    # scipy: MONAI's HD95 (the distance transform) needs it.
                    "models": ["timm", "torchmetrics", "monai", "scipy", "tqdm", "pillow", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
