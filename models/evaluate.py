"""Held-out metrics from torchmetrics and MONAI, sharded over ranks and synchronised by torchmetrics.

Segmentation: Dice and IoU of the mask thresholded at p = 0.5, averaged per image (the polyp
literature's mDice/mIoU); MAE of the probability map; HD95 (MONAI, in pixels) per image, where an
empty prediction, which has no surface to measure, counts as the image diagonal: the worst
distance there is, rather than a silently dropped image. Classification: accuracy and macro F1.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from monai.metrics import compute_hausdorff_distance
from torchmetrics import MeanAbsoluteError, MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.segmentation import DiceScore, MeanIoU

from models.datasets import Split
from models.engine import Runtime, to_input, to_target

# Handled or not ours: `average` is set explicitly; empty predictions are scored as the diagonal
# below; the deprecation is MONAI calling its own API.
warnings.filterwarnings("ignore", message="DiceScore metric currently defaults")
warnings.filterwarnings("ignore", message="the prediction of class 0 is all 0")
warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)


@torch.no_grad()
def predict(net: nn.Module, logits_fn, split: Split, rt: Runtime, batch_size: int, desc: str):
    """Yields (logits as float32, target) over this rank's share of the split."""
    net.eval()
    task = "classification" if split.y.dim() == 1 else "segmentation"
    mine = torch.arange(rt.rank, len(split), rt.world)
    for start in rt.bar(range(0, len(mine), batch_size), desc=desc, leave=False, unit="batch"):
        idx = mine[start:start + batch_size]
        with rt.autocast():
            logits = logits_fn(net(to_input(split.x[idx], rt.device)))
        yield logits.float(), to_target(split.y[idx], task, rt.device)


def evaluate(net, logits_fn, split: Split, rt: Runtime, batch_size: int, num_classes: int,
             desc: str) -> dict[str, float]:
    if split.y.dim() == 1:
        metrics = {"accuracy": MulticlassAccuracy(num_classes, average="micro"),
                   "f1": MulticlassF1Score(num_classes, average="macro")}
        for m in metrics.values():
            m.to(rt.device)
        for logits, y in predict(net, logits_fn, split, rt, batch_size, desc):
            for m in metrics.values():
                m.update(logits, y)
        return {k: m.compute().item() for k, m in metrics.items()}
    metrics = {"dice": DiceScore(num_classes=1, average="micro", aggregation_level="samplewise"),
               "iou": MeanIoU(num_classes=1), "mae": MeanAbsoluteError(), "hd95": MeanMetric()}
    for m in metrics.values():
        m.to(rt.device)
    diagonal = math.hypot(*split.y.shape[-2:])
    for logits, mask in predict(net, logits_fn, split, rt, batch_size, desc):
        prob = torch.sigmoid(logits)
        pred, target = (prob > 0.5).long(), mask.long()
        metrics["dice"].update(pred, target)
        metrics["iou"].update(pred, target)
        metrics["mae"].update(prob, mask)
        hd = compute_hausdorff_distance(pred, target, include_background=True, percentile=95)
        metrics["hd95"].update(torch.nan_to_num(hd, nan=diagonal, posinf=diagonal))
    return {k: m.compute().item() for k, m in metrics.items()}
