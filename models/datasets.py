"""Data for the recipes: the synthetic sets by default, real folders by path.

Segmentation folders: Kvasir-SEG (`images/` + `masks/`) or PraNet's layout (`image/` + `mask/`),
jpg or png, a mask per image with the same file stem. Classification folders: an ImageFolder tree
(one sub-folder of images per class, e.g. Kvasir-v2). Everything is decoded once, resized to the
run's image size and kept in memory as uint8 (1000 Kvasir-SEG frames at 352 px are 370 MB).
Without --test-data the set is split 80/20 by a permutation drawn from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from models import synthetic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
SEG_LAYOUTS = (("images", "masks"), ("image", "mask"))
TEST_FRACTION = 0.2


class DataError(Exception):
    """A data path that cannot be used; the message is one line naming the path and what was expected."""


@dataclass
class Split:
    """Inputs x (uint8 N x 3 x S x S) and targets y (uint8 N x S x S masks or int64 N labels)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Data:
    train: Split
    test: Split
    classes: tuple[str, ...]  # ("polyp",) for segmentation
    source: str


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _directory(path: str, expected: str) -> Path:
    root = Path(path)
    if not root.exists():
        raise DataError(f"{path}: no such directory (expected {expected})")
    if not root.is_dir():
        raise DataError(f"{path}: not a directory (expected {expected})")
    return root


def _read(path: Path, size: int, mode: str) -> torch.Tensor:
    with Image.open(path) as im:
        # Masks are resized by nearest neighbour so they stay binary; images bilinearly.
        resample = Image.NEAREST if mode == "L" else Image.BILINEAR
        im = im.convert(mode).resize((size, size), resample)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(size, size, -1).permute(2, 0, 1)


def load_segmentation_folder(path: str, size: int) -> Split:
    expected = "a Kvasir-SEG folder with images/ and masks/, or PraNet's image/ and mask/"
    root = _directory(path, expected)
    layout = next(((root / i, root / m) for i, m in SEG_LAYOUTS if (root / i).is_dir()), None)
    if layout is None:
        raise DataError(f"{path}: no images/ or image/ sub-folder (expected {expected})")
    image_dir, mask_dir = layout
    images = _images(image_dir)
    if not images:
        raise DataError(f"{image_dir}: no images (expected {', '.join(IMAGE_SUFFIXES)} files)")
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: no such directory (expected one mask per image in {image_dir})")
    masks = _images(mask_dir)
    missing = [stem for stem in images if stem not in masks]
    if missing:
        raise DataError(f"{mask_dir}: no mask for {len(missing)} of {len(images)} images, e.g. "
                        f"{images[missing[0]].name} (expected a mask with the same name)")
    xs, ys = [], []
    for stem, image in tqdm(images.items(), desc=f"loading {root.name}", leave=False):
        xs.append(_read(image, size, "RGB"))
        ys.append((_read(masks[stem], size, "L")[0] > 127).to(torch.uint8))
    return Split(torch.stack(xs), torch.stack(ys))


def load_classification_folder(path: str, size: int, classes: tuple[str, ...] | None = None):
    """An ImageFolder tree -> (Split, class names). With `classes` (the training set's), the folder
    must use the same class names (a test set)."""
    expected = "an ImageFolder tree: one sub-folder of images per class"
    root = _directory(path, expected)
    found = {d.name: _images(d) for d in sorted(root.iterdir()) if d.is_dir()}
    found = {name: files for name, files in found.items() if files}
    if not found:
        raise DataError(f"{path}: no class sub-folders with images (expected {expected})")
    if classes is not None and set(found) - set(classes):
        raise DataError(f"{path}: classes {sorted(set(found) - set(classes))} are not in the training "
                        f"set (expected a subset of {list(classes)})")
    names = classes or tuple(found)
    xs, ys = [], []
    for label, name in enumerate(names):
        for image in tqdm(found.get(name, {}).values(), desc=f"loading {name}", leave=False):
            xs.append(_read(image, size, "RGB"))
            ys.append(label)
    return Split(torch.stack(xs), torch.tensor(ys)), names


def _split(data: Split, seed: int) -> tuple[Split, Split]:
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(TEST_FRACTION * len(data)))
    if len(data) - n_test < 1:
        raise DataError(f"only {len(data)} samples: too few to hold out a test split (pass --test-data)")
    test, train = order[:n_test], order[n_test:]
    return Split(data.x[train], data.y[train]), Split(data.x[test], data.y[test])


def load(task: str, path: str | None, test_path: str | None, size: int, seed: int,
         synthetic_counts: tuple[int, int]) -> Data:
    """The run's data. task: "segmentation" or "classification"; synthetic_counts: (train, test)."""
    if path is None:
        n_train, n_test = synthetic_counts
        # Test frames come from indices after the training ones: disjoint, same distribution.
        make = synthetic.polyp_set if task == "segmentation" else synthetic.class_set
        x, y = make(n_train + n_test, size, seed)
        classes = ("polyp",) if task == "segmentation" else synthetic.KVASIR_CLASSES
        return Data(Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), classes,
                    f"synthetic (seed {seed})")
    if task == "segmentation":
        full, classes = load_segmentation_folder(path, size), ("polyp",)
        test = load_segmentation_folder(test_path, size) if test_path else None
    else:
        full, classes = load_classification_folder(path, size)
        test = load_classification_folder(test_path, size, classes)[0] if test_path else None
    train, held_out = (full, test) if test is not None else _split(full, seed)
    return Data(train, held_out, classes, path)
