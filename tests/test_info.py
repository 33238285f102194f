"""kdkernels.info() and `python -m kdkernels`: the report, and a self-check that can fail."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import kdkernels as kdk
from kdkernels import _dispatch, _info

ROOT = Path(__file__).resolve().parents[1]


def test_report_without_check():
    report = kdk.info(self_check=False)
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["kdkernels"] == kdk.__version__
    assert report["backends"] == kdk.backends()
    assert report["devices"][0].startswith("cpu: ")
    assert "checks" not in report
    if kdk.backends()["cpu"]["available"]:
        assert report["build"]["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_every_available_backend_is_checked_and_agrees():
    report = kdk.info()
    expected = {(op, name) for op, *_ in _info.CHECKS for name, st in kdk.backends().items()
                if name != "torch" and st["available"] and op in st["ops"]}
    assert {(r["op"], r["backend"]) for r in report["checks"]} == expected
    assert all(r["ok"] for r in report["checks"]), [r for r in report["checks"] if not r["ok"]]


def test_command_line_report():
    out = subprocess.run([sys.executable, "-m", "kdkernels"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"kdkernels {kdk.__version__}: torch {torch.__version__}" in out.stdout
    assert "checks passed" in out.stdout and "MISMATCH" not in out.stdout


def test_a_wrong_kernel_fails_the_check(monkeypatch, capsys):
    """A backend whose loss is off by 1% is reported as a mismatch and the command exits 1."""
    backend = next((name for name in ("cpu", "triton") if kdk.backends()[name]["available"]
                    and "sgm_loss" in kdk.backends()[name]["ops"]), "torch")
    real = _dispatch._IMPLS["sgm_loss"][backend]
    monkeypatch.setitem(_dispatch._IMPLS["sgm_loss"], backend, lambda *a: 1.01 * real(*a))
    monkeypatch.setattr(_dispatch, "_RESOLVED", {})
    if backend == "torch":  # no fused backend here: make one appear to the check
        monkeypatch.setattr(_info, "_targets", lambda: [("sgm_loss", "torch", "cpu")])
    assert _info.main([]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out
    assert any(line.split()[:2] == ["sgm_loss", backend] and "MISMATCH" in line
               for line in out.splitlines())
