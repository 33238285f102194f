"""Benchmark cases: one Case per (op, shape set). A new op adds rows to CASES.

A case names the public op, the shapes of its inputs (resolved for the device and --quick), the
keyword arguments of the call, how to build the inputs, how much work a mode does (bytes moved
behind the GB/s column, or matrix-product flops behind TFLOP/s for compute-bound cases) and, for
ops whose eager reference holds N x N matrices, how much memory that reference needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def feature_pair(shapes: dict, device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(student, teacher) feature maps, N(0, 1); the student requires a gradient."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(shapes["student"], generator=g, dtype=torch.float32)
    ft = torch.randn(shapes["teacher"], generator=g, dtype=torch.float32)
    fs = fs.to(device=device, dtype=dtype).requires_grad_(True)
    return fs, ft.to(device=device, dtype=dtype)


def segmentation_pair(shapes: dict, device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(logits, mask) for structure_loss: N(0, 2) logits that require a gradient and a 0/1 mask
    holding one random ellipse per map (a polyp-like blob, so the 31x31 boundary weights vary)."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(shapes["student"], generator=g)
    b, k, h, w = shapes["teacher"]
    centre = torch.rand(b, k, 2, 1, 1, generator=g)
    radius = 0.1 + 0.3 * torch.rand(b, k, 2, 1, 1, generator=g)
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    inside = ((y - centre[:, :, 0]) / radius[:, :, 0]) ** 2 + ((x - centre[:, :, 1]) / radius[:, :, 1]) ** 2
    mask = (inside <= 1).to(dtype)
    return logits.to(device=device, dtype=dtype).requires_grad_(True), mask.to(device)


def student_teacher_bytes(shapes: dict, itemsize: int) -> dict:
    """fwd reads student + teacher once; bwd reads the student and writes its gradient."""
    numel = {name: _numel(shape) for name, shape in shapes.items()}
    fwd = (numel["student"] + numel["teacher"]) * itemsize
    bwd = 2 * numel["student"] * itemsize
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def pixel_mse_bytes(shapes: dict, itemsize: int) -> dict:
    """As student_teacher_bytes, but bwd also reads the teacher (it recomputes the normalised T)."""
    out = student_teacher_bytes(shapes, itemsize)
    teacher = _numel(shapes["teacher"]) * itemsize
    return {"fwd": out["fwd"], "bwd": out["bwd"] + teacher, "full": out["full"] + teacher}


def pixel_kl_flops(shapes: dict) -> dict:
    """Matrix-product flops of the tiled kl route (exp, log and normalisation not counted).
    fwd forms every tile of S_s = A^T A and S_t = T^T T: 2 N^2 (Cs + Ct) per sample. bwd recomputes
    both and multiplies the student's column block by the tile Gm_IJ + Gm_JI^T: 2 N^2 Cs more."""
    b, cs, h, w = shapes["student"]
    ct, n = shapes["teacher"][1], h * w
    fwd = 2 * b * n * n * (cs + ct)
    bwd = fwd + 2 * b * n * n * cs
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


def logit_attention_flops(shapes: dict) -> dict:
    """Matrix-product flops of A(X) = softmax(X X^T / sqrt(W)) X per H x W map, as flash-attention
    counts them: fwd 4 H^2 W per map for the scores and P X, student and teacher; bwd the four
    products of the attention backward (dP = dA X^T, P^T dA, dS X, dS^T X), 8 H^2 W per student
    map, recomputation not counted."""
    b, k, h, w = shapes["student"]
    fwd = 2 * b * k * 4 * h * h * w
    bwd = b * k * 8 * h * h * w
    return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}


# N x N float32 matrices that pixel_relation_loss's eager reference ("torch") and its
# torch.compile hold at once, measured on the CPU (B = 2, C = 64, 64 x 64, peak RSS growth):
# (largest single step of any mode, graph kept alive for the "bwd" mode).
PIXEL_NN_MATRICES = {("torch", "mse"): (5, 1), ("torch", "kl"): (7, 2),
                     ("compile", "mse"): (2, 1), ("compile", "kl"): (3, 2)}


def pixel_relation_memory(shapes: dict, kwargs: dict, backend: str, modes) -> int | None:
    """Predicted peak bytes of `backend` over the given modes; None for the fused backends."""
    counts = PIXEL_NN_MATRICES.get((backend, kwargs["distance"]))
    if counts is None:
        return None
    step, retained = counts
    b, _, h, w = shapes["student"]
    return (step + (retained if "bwd" in modes else 0)) * b * (h * w) ** 2 * 4


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass(frozen=True)
class Case:
    op: str                      # public function in kdkernels (and kdkernels.reference)
    name: str                    # short label of the shape set
    shapes: dict                 # input name -> shape, first input is the one with the gradient
    kwargs: dict = field(default_factory=dict)
    make_inputs: Callable = feature_pair            # (shapes, device, dtype) -> args tuple
    bytes_model: Callable = student_teacher_bytes   # (shapes, itemsize) -> {mode: bytes}
    flops_model: Callable | None = None  # (shapes) -> {mode: flops}; set for compute-bound cases
    memory_model: Callable | None = None  # (shapes, kwargs, backend, modes) -> bytes or None
    peers: tuple = ()  # other libraries' kernels for the same math (bench/peers.py)

    def inputs(self, device, dtype: torch.dtype) -> tuple:
        return self.make_inputs(self.shapes, device, dtype)

    def work(self, dtype: torch.dtype) -> tuple[str, dict]:
        """("flops", {mode: flops}) for compute-bound cases, else ("bytes", {mode: bytes})."""
        if self.flops_model is not None:
            return "flops", self.flops_model(self.shapes)
        return "bytes", self.bytes_model(self.shapes, torch.empty((), dtype=dtype).element_size())

    def predicted_memory(self, backend: str, modes) -> int | None:
        """Bytes `backend` is predicted to need for `modes` (None: no model, O(inputs))."""
        if self.memory_model is None:
            return None
        return self.memory_model(self.shapes, self.kwargs, backend, modes)


_AT = "attention_transfer_loss"
_CR = "channel_relation_loss"
_PR = "pixel_relation_loss"
_SGM = "sgm_loss"
_LA = "logit_attention_loss"
_PKL = "pixel_kl_loss"
_CWD = "channel_wise_kl_loss"
_ST = "structure_loss"
_KDAS_LOGITS = (1, 352, 352)


def pixel_relation_models(distance: str) -> dict:
    """Case fields of a pixel_relation_loss case: its work model (kl: flops) and eager memory."""
    work = {"flops_model": pixel_kl_flops} if distance == "kl" else {"bytes_model": pixel_mse_bytes}
    return {**work, "memory_model": pixel_relation_memory}


def _pixel(name: str, cs: int, ct: int, side: int, distance: str, b_gpu: int, b_cpu: int,
           quick_side: int = 24) -> tuple:
    """A CASES row for pixel_relation_loss (--quick: 16 / 32 channels at quick_side^2)."""
    return (_PR, name, (cs, side, side), (ct, side, side), dict(distance=distance, tau=1.0),
            b_gpu, b_cpu, ((16, quick_side, quick_side), (32, quick_side, quick_side)),
            pixel_relation_models(distance))


# Table rows: op, name, student (C, H, W), teacher (C, H, W), kwargs, B on GPU, B on CPU,
# the --quick shapes (student, teacher, B = 1) and, optionally, a dict of further Case fields
# (make_inputs, bytes_model, flops_model, memory_model). Sizes: SPEC section 5.
CASES = [
    # KDAS features: student 32 x 88 x 88 against teacher 64 x 88 x 88 (no resize needed).
    (_AT, "kdas_features", (32, 88, 88), (64, 88, 88),
     dict(p=2.0, resize="bilinear", reduction="mean"), 16, 2,
     ((8, 32, 32), (16, 32, 32))),
    # HLFD feature level: student stage 896 x 192 x 192 resized to the teacher's 24 x 24.
    (_AT, "hlfd_at", (896, 192, 192), (1024, 24, 24),
     dict(p=4.0, resize="bilinear", reduction="batchmean"), 8, 2,
     ((56, 64, 64), (64, 8, 8))),
    # The acceptance case, B = 8 on every device.
    (_AT, "acceptance_b8", (64, 88, 88), (64, 88, 88),
     dict(p=2.0, resize="bilinear", reduction="mean"), 8, 8,
     ((16, 32, 32), (16, 32, 32))),
    # CPKD channel relation: 128 x 128 Grams of rows of length 88^2.
    (_CR, "cpkd_c128", (128, 88, 88), (128, 88, 88),
     dict(normalize="l2", distance="mse", tau=1.0), 8, 2,
     ((32, 32, 32), (32, 32, 32))),
    # The acceptance case, B = 8 on every device.
    (_CR, "acceptance_b8", (64, 88, 88), (64, 88, 88),
     dict(normalize="l2", distance="mse", tau=1.0), 8, 8,
     ((16, 32, 32), (16, 32, 32))),
    # CPKD pixel relation: student 64 / teacher 128 channels, N = 56^2 and 88^2.
    _pixel("cpkd_56_mse", 64, 128, 56, "mse", 8, 2, quick_side=16),
    _pixel("cpkd_56_kl", 64, 128, 56, "kl", 8, 2, quick_side=16),
    _pixel("cpkd_88_mse", 64, 128, 88, "mse", 8, 2),
    _pixel("cpkd_88_kl", 64, 128, 88, "kl", 8, 2),
    # The acceptance cases, B = 2 on every device: 96 x 96, and 128 x 128 where the eager
    # reference needs gigabytes for its N x N matrices (the memory case).
    _pixel("acceptance_96_mse", 64, 64, 96, "mse", 2, 2, quick_side=32),
    _pixel("memory_128_mse", 64, 64, 128, "mse", 2, 2, quick_side=32),
    _pixel("memory_128_kl", 64, 64, 128, "kl", 2, 2, quick_side=32),
    # KDAS: full-resolution 1-channel logit maps P1/P2, student against teacher.
    (_SGM, "kdas", _KDAS_LOGITS, _KDAS_LOGITS, dict(distance="mse"), 16, 2,
     ((1, 64, 64), (1, 64, 64))),
    (_SGM, "acceptance_b8", _KDAS_LOGITS, _KDAS_LOGITS, dict(distance="mse"), 8, 8,
     ((1, 96, 96), (1, 96, 96))),
    (_SGM, "kdas_l1", _KDAS_LOGITS, _KDAS_LOGITS, dict(distance="l1"), 16, 2,
     ((1, 64, 64), (1, 64, 64))),
    (_LA, "kdas", _KDAS_LOGITS, _KDAS_LOGITS, dict(tau=2.0), 16, 2,
     ((1, 48, 48), (1, 48, 48)), dict(flops_model=logit_attention_flops)),
    (_LA, "acceptance_b8", _KDAS_LOGITS, _KDAS_LOGITS, dict(tau=2.0), 8, 8,
     ((1, 64, 64), (1, 64, 64)), dict(flops_model=logit_attention_flops)),
    (_ST, "kdas", _KDAS_LOGITS, _KDAS_LOGITS, {}, 16, 2,
     ((1, 64, 64), (1, 64, 64)), dict(make_inputs=segmentation_pair)),
    (_ST, "acceptance_b8", _KDAS_LOGITS, _KDAS_LOGITS, {}, 8, 8,
     ((1, 96, 96), (1, 96, 96)), dict(make_inputs=segmentation_pair)),
    # HLFD pixel level: per-pixel distributions over 256 channels at 384 x 384 (the largest
    # tensors of SPEC section 5), and the acceptance case over 19 classes.
    (_PKL, "hlfd", (256, 384, 384), (256, 384, 384), dict(temperature=4.0), 8, 2,
     ((32, 32, 32), (32, 32, 32)), dict(peers=("liger",))),
    (_PKL, "acceptance_b8", (19, 128, 128), (19, 128, 128), dict(temperature=4.0), 8, 8,
     ((19, 32, 32), (19, 32, 32)), dict(peers=("liger",))),
    # KDAS binary logits (K = 1: sigmoid, Bernoulli KL) and LTG's classification logits
    # (Hyper-Kvasir, 23 classes; B x K, so the batch is the row count).
    (_PKL, "kdas_binary", _KDAS_LOGITS, _KDAS_LOGITS, dict(temperature=4.0), 16, 2,
     ((1, 64, 64), (1, 64, 64))),
    (_PKL, "ltg_logits", (23,), (23,), dict(temperature=4.0), 4096, 4096,
     ((23,), (23,)), dict(peers=("liger",))),
    # CWD on KDAS-sized features, and the acceptance case.
    (_CWD, "kdas_features", (64, 88, 88), (64, 88, 88), dict(tau=4.0), 16, 2,
     ((16, 32, 32), (16, 32, 32))),
    (_CWD, "acceptance_b8", (64, 88, 88), (64, 88, 88), dict(tau=4.0), 8, 8,
     ((16, 32, 32), (16, 32, 32))),
]


def cases(device_kind: str, quick: bool = False, ops=None) -> list[Case]:
    """The cases for a device kind ("cpu" or "cuda"), optionally only the listed ops."""
    out = []
    for op, name, student, teacher, kwargs, b_gpu, b_cpu, small, *extra in CASES:
        if ops and op not in ops:
            continue
        if quick:
            batch, (student, teacher) = 1, small
        else:
            batch = b_cpu if device_kind == "cpu" else b_gpu
        shapes = {"student": (batch, *student), "teacher": (batch, *teacher)}
        out.append(Case(op, name, shapes, dict(kwargs), **(extra[0] if extra else {})))
    return out


def known_ops() -> list[str]:
    return sorted({row[0] for row in CASES})
