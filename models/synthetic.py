"""Procedural endoscopy frames: a polyp segmentation set (KDAS/HLFD/CPKD) and an 8-class
classification set after Kvasir-v2 (LTG), deterministic from (seed, index).

Each frame is built the way a colonoscope sees the colon: pink mucosa with fractal texture,
haustral folds around a dark lumen, a vessel network, a light falloff from the scope's lamp and the
black corners of the round field of view. Polyps are domes with wobbly, elongated outlines, soft
borders and a contrast that ranges from obvious to barely there; specular highlights sit on them
and on the folds as distractors. Everything is torch on the CPU from a per-sample generator, so a
sample is the same on every machine and in every process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KVASIR_CLASSES = ("dyed-lifted-polyps", "dyed-resection-margins", "esophagitis", "normal-cecum",
                  "normal-pylorus", "normal-z-line", "polyps", "ulcerative-colitis")


class _Frame:
    """Random draws and coordinate grids for one image of side `size`."""

    def __init__(self, size: int, seed: int, index: int, salt: int):
        self.size = size
        # Distinct streams per (seed, set, index): the sets never share samples.
        self.gen = torch.Generator().manual_seed((seed * 1_000_003 + salt) * 10_000_019 + index)
        axis = torch.linspace(-1, 1, size)
        self.y, self.x = torch.meshgrid(axis, axis, indexing="ij")

    def u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=self.gen).item()

    def point(self, extent: float) -> tuple[float, float]:
        return self.u(-extent, extent), self.u(-extent, extent)

    def noise(self, octaves: int, base: int = 4) -> torch.Tensor:
        """Fractal noise, zero mean, unit std: bicubic-upsampled random grids, amplitude halving."""
        total = torch.zeros(self.size, self.size)
        for o in range(octaves):
            grid = torch.randn(1, 1, base * 2**o, base * 2**o, generator=self.gen)
            up = F.interpolate(grid, size=(self.size, self.size), mode="bicubic", align_corners=True)
            total += up[0, 0] / 2**o
        return (total - total.mean()) / (total.std() + 1e-6)

    def dist(self, cx: float, cy: float) -> torch.Tensor:
        return torch.sqrt((self.x - cx) ** 2 + (self.y - cy) ** 2)


def _rgb(r: float, g: float, b: float) -> torch.Tensor:
    return torch.tensor([r, g, b]).view(3, 1, 1)


def _mucosa(fr: _Frame, tint: torch.Tensor, vessels: float = 1.0) -> torch.Tensor:
    """Textured mucosa with folds around a lumen and a vessel network (3 x S x S, unlit)."""
    tex = fr.noise(5)
    img = tint * (1 + 0.08 * tex * _rgb(1.0, 1.4, 1.4))
    lx, ly = fr.point(1.3)
    r = fr.dist(lx, ly) + 0.08 * fr.noise(3)
    folds = (0.5 + 0.5 * torch.sin(2 * math.pi * fr.u(1.5, 3.5) * r + fr.u(0, 6.3))) ** 3
    img = img * (1 - fr.u(0.05, 0.2) * folds)
    # Vessels: thin dark-red ridges along the zero set of a smooth field, in patches.
    field = fr.noise(3, base=3)
    ridge = torch.exp(-(field / fr.u(0.04, 0.09)) ** 2) * (fr.noise(2) > fr.u(-0.5, 0.5))
    img = img * (1 - vessels * fr.u(0.15, 0.4) * ridge * _rgb(0.25, 1.0, 0.8))
    lumen = torch.exp(-(fr.dist(lx, ly) / fr.u(0.15, 0.35)) ** 2)
    return img * (1 - 0.85 * lumen)


def _polyp(fr: _Frame, img: torch.Tensor, radius: float, contrast: float,
           colour: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blends one polyp into img; returns (image, its mask)."""
    cx, cy = fr.point(0.65)
    angle = fr.u(0, math.pi)
    aspect = fr.u(0.6, 1.0)
    dx, dy = fr.x - cx, fr.y - cy
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = (-dx * math.sin(angle) + dy * math.cos(angle)) / aspect
    rho, theta = torch.sqrt(along**2 + across**2), torch.atan2(across, along)
    wobble = sum(fr.u(0, 0.12) * torch.cos(k * theta + fr.u(0, 6.3)) for k in (2, 3, 4))
    d = rho / (radius * (1 + wobble)) - 1  # < 0 inside; about the relative distance to the rim
    mask = (d < 0).float()
    alpha = torch.sigmoid(-d / fr.u(0.03, 0.15))  # soft border
    # Dome shading: bright towards the lamp side of the cap, darker at the rim.
    height = torch.clamp(1 - (rho / (radius * (1 + wobble))) ** 2, min=0).sqrt()
    lamp = (along * math.cos(angle + 1) + across * math.sin(angle + 1)) / radius
    shade = 1 + contrast * (0.35 * height - 0.1 * lamp.clamp(-1, 1))
    body = img * (1 - alpha) + alpha * (img * (1 + contrast * (colour - 1)) * shade
                                        * (1 + 0.08 * contrast * fr.noise(4, base=8)))
    return body, mask


def _speculars(fr: _Frame, img: torch.Tensor, count: int, near: torch.Tensor | None = None) -> torch.Tensor:
    """Small saturated white spots; with `near`, half of them land where near > 0.5."""
    spots = torch.zeros(fr.size, fr.size)
    inside = torch.nonzero(near > 0.5) if near is not None else torch.empty(0, 2)
    for i in range(count):
        if len(inside) and i % 2 == 0:
            py, px = inside[int(fr.u(0, len(inside) - 1e-3))].tolist()
            cx, cy = px / (fr.size - 1) * 2 - 1, py / (fr.size - 1) * 2 - 1
        else:
            cx, cy = fr.point(0.9)
        spots = torch.maximum(spots, torch.exp(-(fr.dist(cx, cy) / fr.u(0.008, 0.03)) ** 2))
    return img + spots * (1.1 - img)


def _finish(fr: _Frame, img: torch.Tensor, lamp: float = 0.9) -> torch.Tensor:
    """Lamp falloff, the round field of view, sensor noise; -> uint8 3 x S x S."""
    lx, ly = fr.point(0.3)
    img = img * (0.35 + 0.75 * torch.exp(-(fr.dist(lx, ly) / lamp) ** 2))
    img = img * (fr.dist(0, 0) < fr.u(1.2, 1.4))
    img = img + 0.015 * torch.randn(img.shape, generator=fr.gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _pink(fr: _Frame) -> torch.Tensor:
    return _rgb(fr.u(0.75, 0.9), fr.u(0.33, 0.45), fr.u(0.3, 0.4))


def polyp_frame(size: int, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One colonoscopy frame with 1-2 polyps: (uint8 3 x S x S image, uint8 S x S mask in {0,1})."""
    fr = _Frame(size, seed, index, salt=1)
    img = _mucosa(fr, _pink(fr))
    mask = torch.zeros(size, size)
    for _ in range(1 if fr.u(0, 1) < 0.8 else 2):
        # Polyps are redder or paler than the wall; the contrast runs from faint to obvious.
        colour = _rgb(fr.u(1.0, 1.2), fr.u(0.6, 1.3), fr.u(0.65, 1.3))
        img, m = _polyp(fr, img, radius=fr.u(0.2, 0.65), contrast=fr.u(0.3, 1.0), colour=colour)
        mask = torch.maximum(mask, m)
    img = _speculars(fr, img, int(fr.u(3, 12)), near=mask)
    return _finish(fr, img), mask.to(torch.uint8)


def _dye(fr: _Frame, img: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Indigo-carmine chromoendoscopy stain over a soft region."""
    blue = _rgb(0.25, 0.35, 0.75) * (1 + 0.15 * fr.noise(4))
    return img * (1 - 0.8 * region) + 0.8 * region * blue * img.mean(0, keepdim=True) * 2


def _blob(fr: _Frame, radius: float, soft: float) -> tuple[torch.Tensor, float, float]:
    cx, cy = fr.point(0.5)
    r = fr.dist(cx, cy) / (radius * (1 + 0.15 * fr.noise(2)))
    return torch.sigmoid((1 - r) / soft), cx, cy


def class_frame(size: int, seed: int, index: int, label: int) -> torch.Tensor:
    """One frame of Kvasir-v2 class `label` (see KVASIR_CLASSES): uint8 3 x S x S."""
    fr = _Frame(size, seed, index * len(KVASIR_CLASSES) + label, salt=2)
    name = KVASIR_CLASSES[label]
    pale = _rgb(fr.u(0.8, 0.9), fr.u(0.6, 0.7), fr.u(0.55, 0.65))  # oesophageal squamous mucosa
    if name in ("dyed-lifted-polyps", "polyps"):
        img = _mucosa(fr, _pink(fr))
        img, mask = _polyp(fr, img, fr.u(0.15, 0.45), fr.u(0.4, 1.0), _rgb(1.1, 0.85, 0.9))
        if name == "dyed-lifted-polyps":
            # The submucosal injection lifts the polyp on a blue cushion around it.
            around = F.max_pool2d(mask[None, None], 2 * (size // 8) + 1, 1, size // 8)[0, 0]
            img = _dye(fr, img, F.avg_pool2d(around[None, None], 5, 1, 2)[0, 0] * fr.u(0.5, 1.0))
        img = _speculars(fr, img, int(fr.u(2, 8)), near=mask)
    elif name == "dyed-resection-margins":
        img = _mucosa(fr, _pink(fr))
        region, cx, cy = _blob(fr, fr.u(0.3, 0.6), 0.15)
        img = _dye(fr, img, region)
        scar = torch.exp(-(fr.dist(cx, cy) / fr.u(0.1, 0.25)) ** 2)
        img = img * (1 - scar) + scar * _rgb(0.85, 0.8, 0.75)  # the pale resection bed
        img = _speculars(fr, img, int(fr.u(2, 8)))
    elif name == "esophagitis":
        img = _mucosa(fr, pale, vessels=0.5)
        theta = torch.atan2(fr.y, fr.x)
        streaks = (torch.cos(int(fr.u(4, 9)) * theta + 0.5 * fr.noise(2)) > fr.u(0.5, 0.85)).float()
        erosions = streaks * (fr.dist(0, 0) > fr.u(0.2, 0.5)) * F.relu(fr.noise(3) + 0.5).clamp(max=1)
        img = img * (1 - 0.5 * erosions * _rgb(0.0, 0.8, 0.8))
        img = _speculars(fr, img, int(fr.u(2, 8)))
    elif name == "normal-cecum":
        img = _mucosa(fr, _rgb(fr.u(0.8, 0.9), fr.u(0.5, 0.6), fr.u(0.35, 0.45)), vessels=1.5)
        # The appendiceal orifice: a small dark crescent.
        cx, cy = fr.point(0.5)
        ring = torch.exp(-((fr.dist(cx, cy) - 0.12) / 0.03) ** 2) * (fr.y - cy > 0)
        img = img * (1 - 0.5 * ring)
        img = _speculars(fr, img, int(fr.u(2, 8)))
    elif name == "normal-pylorus":
        img = _mucosa(fr, _rgb(fr.u(0.8, 0.95), fr.u(0.4, 0.5), fr.u(0.3, 0.4)), vessels=0.3)
        cx, cy = fr.point(0.4)
        theta = torch.atan2(fr.y - cy, fr.x - cx)
        r = fr.dist(cx, cy)
        rays = 0.5 + 0.5 * torch.cos(int(fr.u(5, 10)) * theta)
        img = img * (1 - 0.2 * rays * torch.exp(-r / 0.4))
        img = img * (1 - 0.9 * torch.exp(-(r / fr.u(0.06, 0.14)) ** 2))  # the dark opening
        img = _speculars(fr, img, int(fr.u(2, 8)))
    elif name == "normal-z-line":
        img = _mucosa(fr, _rgb(fr.u(0.75, 0.9), fr.u(0.3, 0.4), fr.u(0.28, 0.36)))
        angle = fr.u(0, 2 * math.pi)
        side = fr.x * math.cos(angle) + fr.y * math.sin(angle) + 0.2 * fr.noise(3) - fr.u(-0.3, 0.3)
        upper = torch.sigmoid(side / 0.04)
        img = img * (1 - upper) + upper * pale * (1 + 0.05 * fr.noise(4))
        img = _speculars(fr, img, int(fr.u(2, 8)))
    else:  # ulcerative-colitis: granular, friable red mucosa, no vessels, fibrin-covered ulcers
        img = _mucosa(fr, _rgb(fr.u(0.75, 0.9), fr.u(0.25, 0.35), fr.u(0.25, 0.32)), vessels=0.0)
        img = img * (1 + 0.12 * fr.noise(2, base=16))
        ulcers = (fr.noise(3, base=6) > fr.u(1.2, 1.8)).float()
        img = img * (1 - ulcers) + ulcers * _rgb(0.9, 0.85, 0.65)
        img = _speculars(fr, img, int(fr.u(4, 12)))
    return _finish(fr, img)


def polyp_set(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """count frames: (uint8 N x 3 x S x S images, uint8 N x S x S masks)."""
    pairs = [polyp_frame(size, seed, i) for i in range(count)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def class_set(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """count frames with labels cycling through the 8 classes: (uint8 images, int64 labels)."""
    labels = torch.arange(count) % len(KVASIR_CLASSES)
    images = torch.stack([class_frame(size, seed, i, int(y)) for i, y in enumerate(labels)])
    return images, labels
