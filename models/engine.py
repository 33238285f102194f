"""The training loop: one process or DDP under torchrun, seeded data order, and distillation losses
timed apart from the networks.

A distillation step runs the student, the frozen teacher (no grad), then the distillation loss on
detached copies of the student tensors it reads, forward and backward, under a synchronised timer;
the gradients it leaves on those copies are fed into one backward of the networks together with the
task loss. The gradient is exactly that of task_weight * task + kd, and "kd_loss" time is the
losses' own forward and backward, nothing of the networks.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.datasets import Split

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Polyp-PVT's and KDAS's trainers clamp every gradient element to +-0.5.
WEIGHT_DECAY, CLIP_VALUE, WARMUP_FRACTION = 1e-4, 0.5, 0.05
IGNORE_LABEL = -100  # F.cross_entropy's ignore_index: an unlabelled sample
FLIPS = ((1, -1), (2, -2))  # (bit of a flip state, the dimension it flips): width, height


@dataclass
class Runtime:
    """Where and how this process runs: device, rank among world, bf16 autocast, loss backend."""

    device: torch.device
    rank: int = 0
    world: int = 1
    amp: bool = False
    backend: str = "auto"
    compile_losses: bool = False  # the distillation losses under torch.compile

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def bar(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.main, dynamic_ncols=True, **kwargs)


def setup_runtime(amp: bool, backend: str) -> Runtime:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then join the group (nccl on GPUs, gloo on CPUs)."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        return Runtime(device, dist.get_rank(), world, amp, backend)
    return Runtime(torch.device("cuda" if cuda else "cpu"), amp=amp, backend=backend)


def to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 N x 3 x S x S -> ImageNet-normalised float32 on device."""
    x = images.to(device, non_blocking=True).float() / 255
    return (x - IMAGENET_MEAN.to(device)) / IMAGENET_STD.to(device)


def to_target(y: torch.Tensor, task: str, device: torch.device) -> torch.Tensor:
    """Masks -> float B x 1 x H x W; labels stay int64."""
    y = y.to(device, non_blocking=True)
    return y.unsqueeze(1).float() if task == "segmentation" else y


def batches(n: int, batch_size: int, seed: int, epoch: int, rt: Runtime):
    """This rank's share of each global batch of a permutation drawn from (seed, epoch); the last
    partial batch is dropped so every rank takes the same number of steps."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    for start in range(0, n - batch_size + 1, batch_size):
        yield start // batch_size, order[start:start + batch_size][rt.rank::rt.world]


def augment(x: torch.Tensor, y: torch.Tensor, task: str, seed: int):
    """Random horizontal and vertical flips per sample, drawn from `seed` (so two runs that share
    seeds see the same batches); masks flip with their images. Returns (x, y, flips), flips[i] the
    sample's flip state: 1 if flipped along the width, + 2 if along the height."""
    gen = torch.Generator().manual_seed(seed)
    flips = torch.zeros(len(x), dtype=torch.long)
    for bit, dim in FLIPS:
        drawn = torch.rand(len(x), generator=gen) < 0.5
        flips += bit * drawn
        flip = drawn.view(-1, 1, 1, 1).to(x.device)
        x = torch.where(flip, x.flip(dim), x)
        if task == "segmentation":
            y = torch.where(flip, y.flip(dim), y)
    return x, y, flips


def flip_state(x: torch.Tensor, state: int) -> torch.Tensor:
    """x flipped as augment's flip state `state` says."""
    dims = [d for bit, d in FLIPS if state & bit]
    return x.flip(dims) if dims else x


def labelled_only(out, y: torch.Tensor, keep: torch.Tensor):
    """The network output and targets of the batch's labelled samples (every tensor in `out`)."""
    return pytree.tree_map(lambda t: t[keep], out), y[keep]


@dataclass
class Times:
    """Seconds spent, summed over steps."""

    step: float = 0.0
    teacher_forward: float = 0.0
    kd_loss: float = 0.0
    steps: int = 0
    epoch_loss: list[float] = field(default_factory=list)  # mean training loss per epoch


@contextmanager
def timed(rt: Runtime, times: Times, name: str):
    rt.sync()
    start = time.perf_counter()
    yield
    rt.sync()
    setattr(times, name, getattr(times, name) + time.perf_counter() - start)


def _schedule(optimizer, total: int):
    """Linear warm-up over the first 5% of steps, then cosine decay to zero."""
    warmup = max(1, int(WARMUP_FRACTION * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _average_gradients(module: nn.Module, world: int) -> None:
    """All-reduce the gradients of modules that DDP does not wrap (the distillation adapters,
    whose gradients come from the separate loss backward)."""
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def train(net: nn.Module, recipe, split: Split, rt: Runtime, *, epochs: int, batch_size: int,
          seed: int, desc: str, lr: float, loss_fn=None, teacher: nn.Module | None = None,
          kd_modules: nn.Module | None = None, teacher_cache=None,
          labelled: torch.Tensor | None = None) -> Times:
    """Trains `net` in place: on loss_fn(out, y, backend) alone, or, given `teacher`, on the
    recipe's task and distillation losses. teacher_cache (a TeacherCache of `split`) replaces the
    teacher's forward by a lookup. labelled (bool per sample of `split`): the task loss sees only
    those samples' labels, the distillation losses every sample (semi-supervised distillation); a
    plain student skips the batches without a labelled sample."""
    net.train()
    extra = kd_modules if kd_modules is not None else nn.ModuleList()
    extra.train()
    params = list(net.parameters()) + list(extra.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    scheduler = _schedule(optimizer, epochs * (len(split) // batch_size))
    # Gradients as views of the all-reduce buckets: no copy, and no stride mismatch warnings for
    # depthwise weights whose size-1 dimension strides differ.
    model = DistributedDataParallel(net, gradient_as_bucket_view=True) if rt.world > 1 else net
    times = Times()
    for epoch in rt.bar(range(epochs), desc=desc, unit="epoch"):
        steps = rt.bar(batches(len(split), batch_size, seed, epoch, rt), desc=f"  epoch {epoch + 1}",
                       total=len(split) // batch_size, leave=False, unit="step")
        total = 0.0
        for step, idx in steps:
            x = to_input(split.x[idx], rt.device)
            y = to_target(split.y[idx], recipe.task, rt.device)
            x, y, flips = augment(x, y, recipe.task, seed * 1_000_003 + epoch * 10_007 + step)
            keep = None if labelled is None else labelled[idx].to(rt.device)
            if teacher is None and keep is not None and not keep.any():
                optimizer.step()  # no gradients: updates nothing, keeps the schedule in step
                scheduler.step()
                continue
            with timed(rt, times, "step"):
                with rt.autocast():
                    out = model(x)
                if teacher is None:
                    with rt.autocast():
                        loss = loss_fn(*_task_view(out, y, keep), rt.backend)
                    loss.backward()
                else:
                    teacher_out = (teacher_cache.lookup(idx, flips, rt.device) if teacher_cache is not None
                                   else teacher)
                    loss = _distill_backward(recipe, out, x, y, keep, teacher_out, extra, rt, times)
                if rt.world > 1 and kd_modules is not None:
                    _average_gradients(extra, rt.world)
                torch.nn.utils.clip_grad_value_(params, CLIP_VALUE)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            times.steps += 1
            total += loss.item()
            steps.set_postfix(loss=f"{loss.item():.3f}")
        times.epoch_loss.append(total / max(1, len(split) // batch_size))
    return times


def _task_view(out, y, keep):
    return (out, y) if keep is None or keep.all() else labelled_only(out, y, keep)


def _compiled_kd_loss(recipe):
    """recipe.kd_loss under torch.compile, compiled once per recipe object (with --backend torch:
    the eager losses as Inductor fuses them, the baseline the fused kernels are measured against)."""
    if getattr(recipe, "_compiled_kd_loss", None) is None:
        recipe._compiled_kd_loss = torch.compile(recipe.kd_loss)
    return recipe._compiled_kd_loss


def _distill_backward(recipe, out, x, y, keep, teacher, modules, rt: Runtime, times: Times) -> torch.Tensor:
    """teacher: the frozen network, or its outputs for this batch (looked up in a TeacherCache)."""
    if isinstance(teacher, nn.Module):
        with timed(rt, times, "teacher_forward"), torch.no_grad(), rt.autocast():
            teacher_out = teacher(x)
    else:
        teacher_out = teacher
    if keep is not None and not keep.any():
        task = torch.zeros((), device=x.device)
    else:
        with rt.autocast():
            task = recipe.task_weight * recipe.task_loss(*_task_view(out, y, keep), rt.backend)
    if keep is not None and recipe.task == "classification":
        y = y.masked_fill(~keep, IGNORE_LABEL)  # label-reading modules (LTG's fusion) skip these
    kd_in = recipe.kd_inputs(out)
    leaves = [t.detach().requires_grad_() for t in kd_in]
    kd_loss = _compiled_kd_loss(recipe) if rt.compile_losses else recipe.kd_loss
    with timed(rt, times, "kd_loss"):
        with rt.autocast():
            kd = kd_loss(leaves, teacher_out, modules, y, rt.backend)
        kd.backward()
    fed = [(t, leaf.grad) for t, leaf in zip(kd_in, leaves) if leaf.grad is not None]
    if task.requires_grad:
        fed.insert(0, (task, None))
    torch.autograd.backward([t for t, _ in fed], [g for _, g in fed])
    return task.detach() + kd.detach()
