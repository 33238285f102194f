"""The HLFD/CPKD pair: a UNet++ teacher on a ResNet-34 encoder and a UNet student on ResNet-18.

Both take their encoders from timm (pretrained=False) and return a `Stages` record: the logits at
input size plus the encoder stages e1..e5 (strides 2, 4, 8, 16, 32) and the decoder stages d5..d2
(strides 16, 8, 4, 2), which is what HLFD's feature and pixel levels and CPKD's relations read.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree


@dataclass
class Stages:
    logits: torch.Tensor          # B x 1 x H x W
    encoder: list[torch.Tensor]   # e1..e5: strides 2, 4, 8, 16, 32
    decoder: list[torch.Tensor]   # d5..d2: strides 16, 8, 4, 2


# A pytree node: the trainer slices and caches network outputs tensor by tensor.
pytree.register_dataclass(Stages)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU: the UNet/UNet++ node."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _encoder(name: str) -> nn.Module:
    # out_indices 0..4: the stem (stride 2) and the four residual stages (strides 4..32).
    return timm.create_model(name, pretrained=False, features_only=True)


class UNetPlusPlus(nn.Module):
    """UNet++ (Zhou et al., 2018): nested, densely skip-connected decoder nodes X[i][j] =
    block(cat(X[i][0..j-1], up(X[i+1][j-1]))) with deep supervision left out (one head on X[0][4])."""

    def __init__(self, encoder: str = "resnet34", widths=(64, 64, 128, 256)):
        super().__init__()
        self.encoder = _encoder(encoder)
        enc = self.encoder.feature_info.channels()  # 5 levels, strides 2..32
        self.decoder_channels = list(reversed(widths))  # strides 16, 8, 4, 2
        self.nodes = nn.ModuleDict()
        for j in range(1, 5):
            for i in range(0, 5 - j):
                below = enc[i + 1] if j == 1 else widths[i + 1]
                self.nodes[f"{i}_{j}"] = ConvBlock(enc[i] + (j - 1) * widths[i] + below, widths[i])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x) -> Stages:
        feats = self.encoder(x)
        grid = {(i, 0): f for i, f in enumerate(feats)}
        for j in range(1, 5):
            for i in range(0, 5 - j):
                inputs = [grid[i, k] for k in range(j)] + [_up(grid[i + 1, j - 1], grid[i, 0])]
                grid[i, j] = self.nodes[f"{i}_{j}"](torch.cat(inputs, 1))
        logits = F.interpolate(self.head(grid[0, 4]), size=x.shape[-2:], mode="bilinear")
        # The decoder path proper: the last node of each level (strides 16, 8, 4, 2).
        return Stages(logits, feats, [grid[3, 1], grid[2, 2], grid[1, 3], grid[0, 4]])


class UNet(nn.Module):
    """UNet with a ResNet encoder: one decoder block per level, skip connections by concatenation."""

    def __init__(self, encoder: str = "resnet18", widths=(128, 64, 32, 16)):
        super().__init__()
        self.encoder = _encoder(encoder)
        enc = self.encoder.feature_info.channels()
        ins = [enc[4] + enc[3], widths[0] + enc[2], widths[1] + enc[1], widths[2] + enc[0]]
        self.blocks = nn.ModuleList(ConvBlock(cin, cout) for cin, cout in zip(ins, widths))
        self.decoder_channels = list(widths)  # strides 16, 8, 4, 2
        self.head = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, x) -> Stages:
        feats = self.encoder(x)
        y, decoder = feats[4], []
        for block, skip in zip(self.blocks, reversed(feats[:4])):
            y = block(torch.cat((_up(y, skip), skip), 1))
            decoder.append(y)
        logits = F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear")
        return Stages(logits, feats, decoder)


def hlfd_teacher() -> UNetPlusPlus:
    return UNetPlusPlus("resnet34")


def hlfd_student() -> UNet:
    return UNet("resnet18")
