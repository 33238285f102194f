"""Builds kdkernels and its extension kdkernels._C with ninja.

The C++ CPU kernels are always built. The CUDA kernels are added when torch has CUDA and nvcc is
found; KDKERNELS_FORCE_CUDA=1 builds them regardless (fails loudly if impossible),
KDKERNELS_SKIP_CUDA=1 leaves them out. TORCH_CUDA_ARCH_LIST is honoured (default "8.0;9.0").
Without a working C++ toolchain, KDKERNELS_SKIP_EXTENSION=1 installs the pure-Python package.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _extensions():
    if _flag("KDKERNELS_SKIP_EXTENSION"):
        return [], {}
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if _flag("KDKERNELS_SKIP_CUDA"):
        with_cuda = False
    elif _flag("KDKERNELS_FORCE_CUDA"):
        with_cuda = True
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
    return [ext], {"build_ext": _optional_build(BuildExtension, required=with_cuda and _flag("KDKERNELS_FORCE_CUDA"))}


def _optional_build(base, required: bool):
    """A build_ext that, unless the build was forced, warns and goes on when compiling fails,
    so the package still installs with its pure-Python backends (kdk.backends() says why)."""

    class BuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if required:
                    raise
                print(f"WARNING: kdkernels._C was not built ({exc}); installing without it",
                      file=sys.stderr)
                self.extensions = []

    return BuildExt.with_options(use_ninja=True)


ext_modules, cmdclass = _extensions()

setup(
    name="kdkernels",
    version="0.1.0",
    description="Fused Triton, CUDA and C++ kernels for knowledge-distillation losses in medical imaging",
    # models/ (reference networks and the training script, `python -m models.train`) ships beside
    # the library; its own dependencies are the "models" extra.
    packages=find_packages(include=["kdkernels", "kdkernels.*", "models", "models.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis", "pytest-benchmark"],
                    "bench": ["matplotlib", "liger-kernel"], "torchdistill": ["torchdistill"],
                    # examples/: plain_loop.py reads models/ (tqdm), the others add their framework.
                    "examples": ["lightning", "torchdistill", "tqdm"],
                    "models": ["timm", "torchmetrics", "monai", "tqdm", "pillow", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
