"""models/: the networks' parameter counts, a --quick run of every recipe, teacher reuse, and a
2-process gloo DDP run under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("monai", reason="models/ needs the models extra: pip install -e .[models]")

from models.recipes import RECIPES  # noqa: E402
from models.train import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEG_KEYS, CLS_KEYS = {"dice", "iou", "mae", "hd95"}, {"accuracy", "f1"}
TINY = ["--quick", "--train-samples", "8", "--test-samples", "4", "--batch-size", "4"]


def _params(net):
    return sum(p.numel() for p in net.parameters())


def test_parameter_counts_match_the_papers():
    kdas = RECIPES["kdas"]()
    assert abs(_params(kdas.teacher(1)) - 25.1e6) < 0.1e6     # Polyp-PVT on PVTv2-B2
    assert abs(_params(kdas.student(1)) - 3.65e6) < 0.05e6    # on PVTv2-B0
    assert abs(_params(RECIPES["ltg"]().student(8)) - 51.8e3) < 1e3


def _check(out: Path, recipe: str) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    keys = CLS_KEYS if recipe == "ltg" else SEG_KEYS
    assert metrics["recipe"] == recipe
    assert all(isinstance(v, int) for v in metrics["params"].values())
    assert metrics["params"]["teacher"] > metrics["params"]["student"]
    for net in ("teacher", "student_plain", "student_kd"):
        assert set(metrics[net]) == keys
        assert all(v == v for v in metrics[net].values())  # no NaN
    t = metrics["time_s"]
    assert 0 < t["kd_loss"] < t["kd_step"] <= t["total"]
    for name in ("teacher.pt", "student_plain.pt", "student_kd.pt", "panel.png"):
        assert (out / name).stat().st_size > 0
    return metrics


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_quick_run(tmp_path, recipe):
    torch.manual_seed(0)
    assert main(["--recipe", recipe, *TINY, "--out", str(tmp_path)]) == 0
    _check(tmp_path, recipe)


@pytest.mark.slow
def test_reused_teacher_and_torch_backend(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["--recipe", "ltg", *TINY, "--out", str(first)]) == 0
    assert main(["--recipe", "ltg", *TINY, "--teacher", str(first / "teacher.pt"), "--backend", "torch",
                 "--out", str(second)]) == 0
    a, b = _check(first, "ltg"), _check(second, "ltg")
    assert not a["compile_losses"]
    assert a["teacher"] == b["teacher"] and b["budget"]["teacher_epochs"] == 0
    # Same seeds, same data order: the plain student does not depend on the backend or the teacher.
    assert a["student_plain"] == b["student_plain"]


@pytest.mark.slow
def test_compiled_losses(tmp_path):
    """--compile-losses runs the distillation losses under torch.compile: the same training as
    eager up to compiled rounding."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ["--recipe", "kdas", *TINY, "--backend", "torch"]
    assert main([*common, "--out", str(eager)]) == 0
    assert main([*common, "--compile-losses", "--out", str(compiled)]) == 0
    a, b = _check(eager, "kdas"), _check(compiled, "kdas")
    assert b["compile_losses"] and not a["compile_losses"]
    assert a["train_loss_per_epoch"]["student_plain"] == b["train_loss_per_epoch"]["student_plain"]
    assert abs(a["train_loss_per_epoch"]["student_kd"][0] - b["train_loss_per_epoch"]["student_kd"][0]) < 1e-3


@pytest.mark.slow
def test_checkpoints_survive_a_failed_evaluation(tmp_path, monkeypatch):
    """Each network is saved when its training ends: an evaluation that fails (a missing
    optional dependency, say) loses no trained network."""
    import models.train as train_module

    def failing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'scipy'")

    monkeypatch.setattr(train_module, "evaluate", failing)
    with pytest.raises(ModuleNotFoundError):
        main(["--recipe", "ltg", *TINY, "--out", str(tmp_path)])
    for name in ("teacher.pt", "student_plain.pt", "student_kd.pt"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_ddp_two_gloo_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "models.train", "--recipe", "kdas", *TINY, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _check(tmp_path, "kdas")
    assert metrics["world_size"] == 2
    assert len(list(tmp_path.glob("metrics*.json"))) == 1
