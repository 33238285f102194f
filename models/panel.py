"""The PNG panel: held-out images with the ground truth and the three networks' predictions."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

CLASS_COLUMNS = 4


def _show(ax, image: torch.Tensor, title: str) -> None:
    if image.dim() == 2:
        ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image.numpy())
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_panel(path, images: torch.Tensor, truth: torch.Tensor, predictions: dict[str, torch.Tensor],
               classes: tuple[str, ...]) -> None:
    """images: uint8 N x 3 x S x S; truth: masks N x S x S or labels N; predictions: name ->
    probability maps N x S x S (one row per image) or class indices N (a grid, guesses as titles)."""
    n = len(images)
    if truth.dim() == 3:
        rows, cols, height = n, 2 + len(predictions), 2.5
    else:  # room for four lines of title above each image
        rows, cols, height = math.ceil(n / CLASS_COLUMNS), min(n, CLASS_COLUMNS), 3.4
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        rgb = images[i].permute(1, 2, 0)
        if truth.dim() == 3:
            _show(axes[i, 0], rgb, "image")
            _show(axes[i, 1], truth[i].float(), "ground truth")
            for c, (name, maps) in enumerate(predictions.items(), start=2):
                _show(axes[i, c], maps[i], name)
        else:
            guesses = "\n".join(f"{name}: {classes[int(p[i])]}" for name, p in predictions.items())
            _show(axes[i // CLASS_COLUMNS, i % CLASS_COLUMNS], rgb,
                  f"truth: {classes[int(truth[i])]}\n{guesses}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
