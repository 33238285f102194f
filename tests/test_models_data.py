"""models/ data: the synthetic generators, the folder loaders on files written here, the split,
and the one-line errors (exit code 2, no traceback) for unusable paths."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("monai", reason="models/ needs the models extra: pip install -e .[models]")

from models import datasets, synthetic  # noqa: E402
from models.train import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, array: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.numpy()).save(path)


def _kvasir(root: Path, n: int, images="images", masks="masks", suffix=".jpg") -> None:
    for i in range(n):
        img, mask = synthetic.polyp_frame(40, seed=3, index=i)
        _write(root / images / f"cju{i:03d}{suffix}", img.permute(1, 2, 0).contiguous())
        _write(root / masks / f"cju{i:03d}{suffix}", mask * 255)


def test_synthetic_is_deterministic_and_plausible():
    x1, y1 = synthetic.polyp_set(4, 64, seed=7)
    x2, y2 = synthetic.polyp_set(4, 64, seed=7)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 3, 64, 64) and x1.dtype == torch.uint8 and y1.shape == (4, 64, 64)
    assert not torch.equal(x1, synthetic.polyp_set(4, 64, seed=8)[0])
    area = y1.float().mean((1, 2))
    assert ((area > 0) & (area < 0.6)).all()  # every frame has a polyp, none fills it
    red, green = x1[:, 0].float().mean(), x1[:, 1].float().mean()
    assert red > green  # pinkish mucosa
    xc, yc = synthetic.class_set(16, 32, seed=0)
    assert xc.shape == (16, 3, 32, 32) and sorted(yc.unique().tolist()) == list(range(8))


@pytest.mark.parametrize("layout", [("images", "masks", ".jpg"), ("image", "mask", ".png")])
def test_segmentation_folder(tmp_path, layout):
    _kvasir(tmp_path, 5, *layout)
    split = datasets.load_segmentation_folder(str(tmp_path), 32)
    assert split.x.shape == (5, 3, 32, 32) and split.y.shape == (5, 32, 32)
    assert set(split.y.unique().tolist()) <= {0, 1} and split.y.sum() > 0
    data = datasets.load("segmentation", str(tmp_path), None, 32, seed=0, synthetic_counts=(0, 0))
    assert (len(data.train), len(data.test)) == (4, 1)
    again = datasets.load("segmentation", str(tmp_path), None, 32, seed=0, synthetic_counts=(0, 0))
    assert torch.equal(data.test.x, again.test.x)  # the split is a function of the seed


def test_classification_folder_and_test_data(tmp_path):
    for split_name, n in (("train", 3), ("test", 1)):
        for label, cls in enumerate(("normal-cecum", "polyps")):
            for i in range(n):
                img = synthetic.class_frame(32, 0, i, label + 3).permute(1, 2, 0).contiguous()
                _write(tmp_path / split_name / cls / f"{i}.png", img)
    data = datasets.load("classification", str(tmp_path / "train"), str(tmp_path / "test"), 32, 0, (0, 0))
    assert data.classes == ("normal-cecum", "polyps")
    assert (len(data.train), len(data.test)) == (6, 2) and data.train.y.tolist() == [0, 0, 0, 1, 1, 1]


def _bad(tmp_path: Path, case: str) -> Path:
    if case == "missing":
        return tmp_path / "nowhere"
    if case == "empty":
        (tmp_path / "images").mkdir()
        (tmp_path / "masks").mkdir()
        return tmp_path
    if case == "no-layout":
        (tmp_path / "stuff").mkdir()
        return tmp_path
    _kvasir(tmp_path, 3)  # "unmasked": one mask missing
    (tmp_path / "masks" / "cju001.jpg").unlink()
    return tmp_path


@pytest.mark.parametrize("case,expected", [("missing", "no such directory"), ("empty", "no images"),
                                           ("no-layout", "images/"), ("unmasked", "no mask for 1 of 3")])
def test_bad_data_is_one_line_exit_2(tmp_path, capsys, case, expected):
    path = _bad(tmp_path, case)
    assert main(["--recipe", "kdas", "--data", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and expected in err
    assert str(tmp_path) in err


def test_bad_data_from_the_command_line(tmp_path):
    """The real command: exit status 2 and no traceback."""
    proc = subprocess.run([sys.executable, "-m", "models.train", "--recipe", "ltg", "--data",
                           str(tmp_path / "absent")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(tmp_path / "absent") in proc.stderr


def test_bad_teacher_checkpoint(tmp_path, capsys):
    junk = tmp_path / "teacher.pt"
    junk.write_text("not a checkpoint")
    assert main(["--recipe", "ltg", "--quick", "--teacher", str(junk), "--out", str(tmp_path)]) == 2
    assert "not a ltg teacher checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args,expected", [
    (["--image-size", "100"], "multiple of 32"),
    (["--backend", "cuda"], "--backend cuda"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, args, expected):
    if args[0] == "--backend" and torch.cuda.is_available():
        pytest.skip("the CUDA backend may be available here")
    assert main(["--recipe", "kdas", "--quick", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
