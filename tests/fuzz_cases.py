"""Hypothesis strategies for tests/test_fuzz.py: one random call of each op.

A case draws the shapes (1 to a few hundred per axis, primes included, capped in elements so the
Triton interpreter keeps up), the memory layout of each input, the dtype, every keyword option,
the value scale (extreme but finite: logits up to +-80, features from 1e-20 to 1e20 where the dtype
can hold their squares), and how close the student is to the teacher. Values come from a
generator seeded by hypothesis, so a failure shrinks to a small seed and shape and replays exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

PRIMES = (13, 17, 31, 37, 61, 127, 131, 257, 263)

# Feature scales whose squares (summed over a row) stay inside each dtype's range. float32
# sums |F|^p in float32, so 1e20 features would overflow it (see docs "Edge values").
FEATURE_SCALES = {
    torch.float64: (1e-20, 1e-6, 1.0, 1e6, 1e20),
    torch.float32: (1e-6, 1e-3, 1.0, 1e3, 1e6),
    torch.float16: (1e-2, 1.0, 100.0),
    torch.bfloat16: (1e-6, 1.0, 1e6),
}
LOGIT_SCALES = (1e-3, 0.3, 1.0, 4.0, 16.0)
SPIKE = 80.0  # the largest logit magnitude a fuzzed map may hold
NEAR = (None, 0.0, 1e-3, 0.1)  # student = teacher + NEAR * noise; None: independent


@dataclass(repr=False)
class Case:
    """One call: op(student, teacher, **kwargs), and how to rebuild a far teacher of its scale."""

    student: torch.Tensor
    teacher: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    far_teacher: torch.Tensor | None = None  # an independent teacher: sets the loss's natural size

    def __repr__(self) -> str:
        def t(x):
            return f"{tuple(x.shape)} {str(x.dtype)[6:]} stride={x.stride()}"
        return f"student {t(self.student)}, teacher {t(self.teacher)}, kwargs {self.kwargs}"

    def _repr_pretty_(self, printer, cycle):  # how hypothesis prints a falsifying case
        printer.text(repr(self))


def _axis(rem: int):
    small = st.integers(1, max(1, min(12, rem)))
    primes = [p for p in PRIMES if p <= rem]
    return st.one_of(small, st.sampled_from(primes)) if primes else small


def shape(draw, rank: int, cap: int, fixed: dict | None = None) -> list[int]:
    """rank sizes with product <= cap; axes drawn in a random order so any axis can be the big one.
    fixed: {axis: size} already decided (they count against the cap)."""
    fixed = dict(fixed or {})
    dims = [0] * rank
    rem = cap
    for a, v in fixed.items():
        dims[a] = v
        rem //= v
    for a in draw(st.permutations([a for a in range(rank) if a not in fixed])):
        dims[a] = draw(_axis(rem))
        rem = max(1, rem // dims[a])
    return dims


def layout(draw, x: torch.Tensor) -> torch.Tensor:
    """Same values, drawn memory layout: contiguous, channels_last, a strided slice, or transposed."""
    kinds = ["contiguous", "strided", "transposed"] + (["channels_last"] if x.dim() == 4 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        # A view that skips every other element of the last axis and starts past an offset.
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype)
        big[..., 1::2] = x
        return big[..., 1::2]
    if kind == "transposed":
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    return x.contiguous()


def values(g: torch.Generator, dims, scale: float, dtype) -> torch.Tensor:
    return (torch.randn(dims, generator=g, dtype=torch.float64) * scale).to(dtype)


def spikes(draw, g: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    """Maybe set about 5% of the entries to +-SPIKE (saturated logits)."""
    if not draw(st.booleans()):
        return x
    pick = torch.rand(x.shape, generator=g) < 0.05
    sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return torch.where(pick, (SPIKE * sign).to(x.dtype), x)


def pair(draw, g, s_dims, t_dims, scale, dtype, logits: bool):
    """(student, teacher, far teacher): the student possibly near the teacher. The far teacher is
    independent and at least of unit scale: tiny logits make tiny losses but not tiny roundoff."""
    teacher = values(g, t_dims, scale, dtype)
    far = values(g, t_dims, max(scale, 1.0), dtype)
    near = draw(st.sampled_from(NEAR)) if list(s_dims) == list(t_dims) else None
    if near is None:
        student = values(g, s_dims, scale, dtype)
    else:
        noise = torch.randn(t_dims, generator=g, dtype=torch.float64) * scale * near
        student = (teacher.double() + noise).to(dtype)
    if logits:
        student, teacher = spikes(draw, g, student), spikes(draw, g, teacher)
    return student, teacher, far


@st.composite
def case(draw, op: str, dtypes, cap: int) -> Case:
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    tau = draw(st.sampled_from((0.5, 1.0, 2.0, 4.0)))
    kw: dict = {}
    if op in ("sgm_loss", "logit_attention_loss", "pixel_kl_loss", "structure_loss"):
        logits = True
        scale = draw(st.sampled_from(LOGIT_SCALES))
    else:
        logits = False
        scale = draw(st.sampled_from(FEATURE_SCALES[dtype]))

    if op == "attention_transfer_loss":
        p = draw(st.sampled_from((0.5, 1.0, 1.5, 2.0, 3.0)))
        if dtype != torch.float64 and (8 * scale) ** (2 * p) * cap > 1e37:
            # a(F) is normalised through sum |F|^(2p): float32 holds it for |F| up to
            # (3e38 / N)^(1 / 2p), about 1e5 at p = 3 (docs "Edge values").
            scale = 1.0
        kw = {"p": p,
              "resize": draw(st.sampled_from(("bilinear", "pool", None))),
              "reduction": draw(st.sampled_from(("mean", "batchmean", "sum")))}
        t_dims = shape(draw, 4, cap // 2)
        s_dims = shape(draw, 4, cap // 2, {0: t_dims[0]})
        if kw["resize"] is None:
            s_dims[2:] = t_dims[2:]
        elif draw(st.booleans()):
            s_dims[1] = t_dims[1]
    elif op in ("channel_relation_loss", "pixel_relation_loss", "channel_wise_kl_loss"):
        t_dims = shape(draw, 4, cap // 2)
        s_dims = list(t_dims)
        if op == "pixel_relation_loss":
            # Channel counts may differ; N x N relations keep N small for the eager reference.
            t_dims = shape(draw, 4, min(cap // 2, 1200))
            s_dims = list(t_dims)
            if draw(st.booleans()):
                pixels = t_dims[0] * t_dims[2] * t_dims[3]
                s_dims[1] = draw(_axis(max(1, cap // 2 // pixels)))
            kw = {"distance": draw(st.sampled_from(("mse", "kl"))), "tau": tau}
        elif op == "channel_relation_loss":
            kw = {"normalize": draw(st.sampled_from(("l2", "softmax"))),
                  "distance": draw(st.sampled_from(("mse", "kl"))), "tau": tau}
        else:
            kw = {"tau": tau}
    elif op == "sgm_loss":
        rank = draw(st.sampled_from((3, 4)))
        side = draw(_axis(int(math.sqrt(cap // 2))))
        lead = shape(draw, rank - 2, max(1, cap // 2 // (side * side)))
        t_dims = s_dims = lead + [side, side]
        kw = {"distance": draw(st.sampled_from(("mse", "l1")))}
    elif op == "logit_attention_loss":
        t_dims = s_dims = shape(draw, draw(st.sampled_from((3, 4))), cap // 2)
        kw = {"tau": tau}
    elif op == "pixel_kl_loss":
        t_dims = s_dims = shape(draw, draw(st.sampled_from((2, 4))), cap // 2)
        kw = {"temperature": tau}
    elif op == "structure_loss":
        dims = shape(draw, 4, cap // 2)
        logits_ = spikes(draw, g, values(g, dims, scale, dtype))
        mask = (torch.rand(dims, generator=g) < draw(st.sampled_from((0.0, 0.3, 1.0)))).to(
            draw(st.sampled_from((dtype, torch.bool))))
        return Case(layout(draw, logits_), layout(draw, mask), {})
    else:
        raise KeyError(op)

    student, teacher, far = pair(draw, g, s_dims, t_dims, scale, dtype, logits)
    if op == "pixel_kl_loss" and draw(st.booleans()):
        mask_dims = [s_dims[0]] + s_dims[2:]
        mask = torch.rand(mask_dims, generator=g) < 0.6
        mask.view(-1)[draw(st.integers(0, mask.numel() - 1))] = True  # at least one pixel counted
        kw["mask"] = layout(draw, mask)
    return Case(layout(draw, student), layout(draw, teacher), kw, far)
