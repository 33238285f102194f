"""Knowledge distillation in a plain PyTorch loop, with kdkernels losses in place of eager ones.

A small CNN teacher learns to segment synthetic polyp frames (models/synthetic.py); a 4x narrower
student then learns from the masks and from the frozen teacher: attention transfer on both encoder
stages and a per-pixel KL on the logits, on top of the structure loss. Moving an eager loop to
kdkernels changes only the loss lines; the networks, the optimiser and the loop stay as they are:

    # eager (RepDistiller-style AT, hand-written KL)   # kdkernels: one fused call each
    a = lambda f: F.normalize(f.pow(2).mean(1).flatten(1))
    at = (a(fs) - a(ft)).pow(2).mean()                  at = kdk.attention_transfer_loss(fs, ft)
    kl = T * T * F.kl_div(...)                          kl = kdk.pixel_kl_loss(zs, zt, temperature=T)

`--backend torch` runs kdkernels' eager reference of the same losses (the ground truth); "auto"
picks the fastest fused backend for the device (the C++ kernels on a CPU, CUDA/Triton on a GPU).

Run:  python examples/plain_loop.py [--backend auto|torch|cpu|cuda|triton] [--steps 60]
      (about 5 s on 2 CPU cores with the defaults)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import kdkernels as kdk

# models/ (the synthetic data) lives in the kdkernels checkout beside examples/, not in the wheel.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.engine import to_input  # noqa: E402
from models.synthetic import polyp_set  # noqa: E402

BACKENDS = ["auto", *kdk.backends()]  # auto, torch, triton, cuda, cpu
# An AT term is a mean over N pixels of squared differences of unit-norm maps, O(1/N): this is
# the weight RepDistiller and torchdistill's samples give it.
AT_WEIGHT = 1000.0
TEMPERATURE = 4.0


class SegNet(nn.Module):
    """Two stride-2 conv stages and a 1x1 head upsampled to the input size.
    forward(x) -> (B x 1 x H x W logits, [stage 1, stage 2] features)."""

    def __init__(self, width: int):
        super().__init__()
        self.stage1 = self._block(3, width)
        self.stage2 = self._block(width, 2 * width)
        self.head = nn.Conv2d(2 * width, 1, 1)

    @staticmethod
    def _block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        f1 = self.stage1(x)
        f2 = self.stage2(f1)
        logits = F.interpolate(self.head(f2), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, [f1, f2]


def synthetic_polyps(samples: int, size: int, seed: int):
    """(normalised B x 3 x S x S frames, B x 1 x S x S float masks) from models/synthetic.py."""
    images, masks = polyp_set(samples, size, seed)
    return to_input(images, torch.device("cpu")), masks.unsqueeze(1).float()


def batches(x, y, batch_size: int, steps: int, seed: int, device):
    """`steps` batches from a seeded permutation per pass over the data."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.randperm(len(x), generator=gen)
        idx, order = order[:batch_size], order[batch_size:]
        yield x[idx].to(device), y[idx].to(device)


def student_loss(student_out, teacher_out, mask, backend: str) -> torch.Tensor:
    """Structure loss on the mask + AT on each encoder stage + per-pixel KL on the logits."""
    (zs, feats_s), (zt, feats_t) = student_out, teacher_out
    task = kdk.structure_loss(zs, mask, backend=backend)
    at = sum(kdk.attention_transfer_loss(fs, ft, p=2.0, backend=backend)
             for fs, ft in zip(feats_s, feats_t))
    kl = kdk.pixel_kl_loss(zs, zt, temperature=TEMPERATURE, backend=backend)
    return task + AT_WEIGHT * at + kl


def train_teacher(x, y, steps: int, batch_size: int, seed: int, device) -> SegNet:
    """A teacher trained on the masks alone (structure loss), returned frozen in eval mode."""
    torch.manual_seed(seed)
    teacher = SegNet(width=32).to(device)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for xb, yb in batches(x, y, batch_size, steps, seed, device):
        loss = kdk.structure_loss(teacher(xb)[0], yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return teacher.eval().requires_grad_(False)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def distil(backend: str = "auto", steps: int = 60, teacher_steps: int = 60, size: int = 64,
           batch_size: int = 8, samples: int = 64, seed: int = 0, device=None) -> list[float]:
    """Trains a teacher, then a student with distillation; returns the student's loss per step."""
    device = torch.device(device) if device is not None else default_device()
    x, y = synthetic_polyps(samples, size, seed)
    teacher = train_teacher(x, y, teacher_steps, batch_size, seed, device)
    torch.manual_seed(seed + 1)
    student = SegNet(width=8).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for xb, yb in batches(x, y, batch_size, steps, seed + 1, device):
        with torch.no_grad():
            teacher_out = teacher(xb)
        loss = student_loss(student(xb), teacher_out, yb, backend)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def parse_args(argv, description: str) -> argparse.Namespace:
    """The command line of this example and of lightning_module.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=60, help="student steps")
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv, __doc__.splitlines()[0])
    losses = distil(args.backend, args.steps, args.teacher_steps, seed=args.seed)
    window = max(1, len(losses) // 10)
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"backend {args.backend}: student loss {first:.4f} (first {window} steps) -> "
          f"{last:.4f} (last {window})")


if __name__ == "__main__":
    main()
