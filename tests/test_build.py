"""Build and load failures: each either falls back to the pure-Python backends with one warning
line or stops with a message that names the fix, never a crash at first use.

Simulated cheaply: setup.py runs against a missing, a failing or a mismatched toolchain (each
stops before or at the first compile), and a copy of the package imports a broken extension.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDKERNELS_") and k != "CUDA_HOME"}
    env.update(OMP_NUM_THREADS="1", MAX_JOBS="1", **extra)
    return env


def _setup_build_ext(tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """`setup.py build_ext` into tmp_path (the sources are found from the repository root)."""
    out = tmp_path / "build"
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")],
        cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)


def _executable(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def _nothing_built(tmp_path: Path) -> bool:
    return not list(tmp_path.glob("build/lib/**/_C*.so"))


def test_no_compiler_stops_with_the_fix(tmp_path):
    run = _setup_build_ext(tmp_path, CXX=str(tmp_path / "no-such-g++"), KDKERNELS_SKIP_CUDA="1")
    assert run.returncode != 0
    assert "no C++ compiler" in run.stderr and "KDKERNELS_SKIP_EXTENSION=1" in run.stderr, run.stderr
    assert _nothing_built(tmp_path)


def test_failing_compiler_stops_with_the_fix(tmp_path):
    cxx = _executable(tmp_path / "bin" / "g++", 'echo "fake compiler: refuses" >&2; exit 1')
    run = _setup_build_ext(tmp_path, CXX=str(cxx), KDKERNELS_SKIP_CUDA="1")
    assert run.returncode != 0
    assert "building kdkernels._C failed" in run.stderr, run.stderr[-3000:]
    assert "KDKERNELS_SKIP_EXTENSION=1" in run.stderr
    assert _nothing_built(tmp_path)


def _fake_toolkit(tmp_path: Path) -> tuple[Path, str]:
    """A CUDA_HOME whose nvcc reports a CUDA major version other than torch's."""
    release = "11.8" if not torch.version.cuda.startswith("11.") else "12.4"
    home = tmp_path / "cuda"
    _executable(home / "bin" / "nvcc", f'echo "Cuda compilation tools, release {release}, V{release}.89"')
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    return home, release


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch builds no CUDA kernels")
def test_mismatched_cuda_toolkit_builds_cpu_kernels_with_a_warning(tmp_path):
    home, release = _fake_toolkit(tmp_path)
    # The missing compiler stops the build right after the CUDA decision: nothing is compiled.
    run = _setup_build_ext(tmp_path, CUDA_HOME=str(home), CXX=str(tmp_path / "no-such-g++"))
    warnings = [line for line in run.stderr.splitlines() if line.startswith("WARNING: kdkernels:")]
    assert len(warnings) == 1, run.stderr
    assert f"is CUDA {release} but torch was built with CUDA {torch.version.cuda}" in warnings[0]
    assert "building the CPU kernels only" in warnings[0]
    assert "no C++ compiler" in run.stderr


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch builds no CUDA kernels")
def test_mismatched_cuda_toolkit_is_an_error_when_forced(tmp_path):
    home, release = _fake_toolkit(tmp_path)
    run = _setup_build_ext(tmp_path, CUDA_HOME=str(home), KDKERNELS_FORCE_CUDA="1")
    assert run.returncode != 0
    assert f"error: KDKERNELS_FORCE_CUDA=1, but {home}/bin/nvcc is CUDA {release}" in run.stderr, run.stderr
    assert _nothing_built(tmp_path)


# --- import of a package whose extension cannot be used -------------------------------------

USE = textwrap.dedent("""
    import sys
    # An editable install maps kdkernels._C to the repository's own build: hide it from the copy.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import torch
    import kdkernels as kdk
    assert kdk.__file__.startswith(sys.argv[1]), kdk.__file__
    status = kdk.backends()
    assert not status["cpu"]["available"] and not status["cuda"]["available"]
    assert status["cpu"]["reason"] == status["cuda"]["reason"]
    print(status["cpu"]["reason"])
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    for op in ("sgm_loss", "pixel_kl_loss", "attention_transfer_loss"):
        assert torch.equal(getattr(kdk, op)(fs, ft), getattr(kdk.reference, op)(fs, ft)), op
""")

BROKEN = {
    # A file that is no shared library: dlopen fails, Python raises ImportError.
    "garbage-so": ("_C" + EXTENSION_SUFFIXES[0], "not an ELF file\n", "ImportError"),
    # A loader that fails with OSError (a missing CUDA runtime library, say).
    "oserror": ("_C.py", "raise OSError('libcudart.so.13: cannot open shared object file')\n", "OSError"),
    # Recorded as built for another torch: it must not even be loaded (it would exit here).
    "other-torch": ("_C.py", "import os\nos._exit(3)\n", "was built for torch 1.0.0"),
}


def _package_copy(tmp_path: Path) -> Path:
    pkg = tmp_path / "kdkernels"
    shutil.copytree(ROOT / "kdkernels", pkg,
                    ignore=shutil.ignore_patterns("_C*.so", "_build.json", "__pycache__"))
    return pkg


def _import_copy(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", USE, str(tmp_path)], cwd=tmp_path,
                          env=_env(PYTHONWARNINGS="default"), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", BROKEN)
def test_unusable_extension_warns_once_and_falls_back_to_torch(tmp_path, case):
    name, content, cause = BROKEN[case]
    pkg = _package_copy(tmp_path)
    (pkg / name).write_text(content)
    if case == "other-torch":
        (pkg / "_build.json").write_text('{"torch": "1.0.0"}')
    run = _import_copy(tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "RuntimeWarning: kdkernels:" in lines[0] and cause in lines[0]
    assert "pip install --no-build-isolation -e ." in lines[0]
    assert cause in run.stdout  # backends() gives the same reason


def test_extension_never_built_is_quiet(tmp_path):
    _package_copy(tmp_path)
    run = _import_copy(tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert "KDKERNELS_SKIP_EXTENSION=1" in run.stdout


def test_wheel_ships_kdkernels_alone(tmp_path):
    """The packages setup.py hands to setuptools (what a wheel installs): kdkernels and its
    subpackages, no other top-level name (a stray `models` would shadow users' own package)."""
    probe = textwrap.dedent("""
        import json, sys, setuptools
        captured = {}
        setuptools.setup = lambda **kw: captured.update(kw)
        sys.argv = ["setup.py", "--name"]
        code = compile(open("setup.py").read(), "setup.py", "exec")
        exec(code, {"__name__": "__main__", "__file__": "setup.py"})
        print(json.dumps(captured["packages"]))
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         env=_env(KDKERNELS_SKIP_EXTENSION="1"), timeout=120)
    assert out.returncode == 0, out.stderr
    packages = json.loads(out.stdout.strip().splitlines()[-1])
    assert "kdkernels" in packages and "kdkernels.triton" in packages
    assert {p.split(".")[0] for p in packages} == {"kdkernels"}, packages
