"""The distillation of plain_loop.py as a PyTorch Lightning LightningModule.

The frozen teacher is a submodule that stays in eval mode (Lightning switches the whole module to
train mode each epoch), the student's loss is plain_loop.student_loss (structure loss + kdkernels
attention transfer and pixel KL), and Lightning owns the loop, the optimiser steps and the device.

Run:  python examples/lightning_module.py [--backend auto|torch|cpu|cuda|triton] [--steps 60]
      (needs `pip install lightning`, in the "examples" extra of setup.py; about 6 s on 2 CPU
      cores with the defaults)
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from plain_loop import (SegNet, default_device, parse_args, student_loss, synthetic_polyps,
                        train_teacher)


class DistillationModule(L.LightningModule):
    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, backend: str = "auto",
                 lr: float = 3e-3):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.backend = backend
        self.lr = lr

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # BatchNorm keeps the teacher's statistics
        return self

    def training_step(self, batch, batch_idx):
        x, mask = batch
        with torch.no_grad():
            teacher_out = self.teacher(x)
        loss = student_loss(self.student(x), teacher_out, mask, self.backend)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=self.lr)


def fit(backend: str = "auto", steps: int = 60, teacher_steps: int = 60, size: int = 64,
        batch_size: int = 8, samples: int = 64, seed: int = 0, accelerator: str = "auto",
        callbacks=()) -> DistillationModule:
    """The teacher as in plain_loop.py, then the student distilled by a Lightning Trainer."""
    L.seed_everything(seed, verbose=False)
    x, y = synthetic_polyps(samples, size, seed)
    device = torch.device("cpu") if accelerator == "cpu" else default_device()
    teacher = train_teacher(x, y, teacher_steps, batch_size, seed, device)
    torch.manual_seed(seed + 1)
    module = DistillationModule(teacher, SegNet(width=8), backend)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed + 1))
    trainer = L.Trainer(max_steps=steps, accelerator=accelerator, devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False,
                        callbacks=list(callbacks))
    trainer.fit(module, loader)
    return module


def main(argv=None) -> None:
    args = parse_args(argv, __doc__.splitlines()[0])
    module = fit(args.backend, args.steps, args.teacher_steps, seed=args.seed)
    print(f"backend {args.backend}: final student loss "
          f"{module.trainer.callback_metrics['loss'].item():.4f}")


if __name__ == "__main__":
    main()
