"""Every op on every GPU backend at small shapes, forward and backward: the program that
tests/sanitize.py runs under compute-sanitizer. Odd sizes put edge tiles everywhere; each call
is synchronised so that an error is reported against the op that caused it (printed first).

    python tests/sanitize_workload.py [OP ...]   # needs a CUDA device; default: every op
"""

from __future__ import annotations

import sys

import torch

import kdkernels as kdk
from helpers import fused_backends, make_layout

F32, F16, F64 = torch.float32, torch.float16, torch.float64

# op -> [(student shape, teacher shape, keyword arguments)]
CASES = {
    "attention_transfer_loss": [((2, 3, 9, 11), (2, 4, 9, 11), {"p": 2.0}),
                                ((2, 3, 9, 11), (2, 4, 6, 8), {"p": 4.0}),
                                ((1, 5, 6, 8), (1, 2, 13, 7), {"p": 3.0})],
    "channel_relation_loss": [((2, 5, 9, 11), (2, 5, 9, 11), {"normalize": n, "distance": d})
                              for n in ("l2", "softmax") for d in ("mse", "kl")],
    "pixel_relation_loss": [((2, 5, 9, 11), (2, 7, 9, 11), {"distance": "mse"}),
                            ((2, 5, 9, 11), (2, 7, 9, 11), {"distance": "kl", "tau": 0.5})],
    "sgm_loss": [((2, 3, 37, 37), (2, 3, 37, 37), {"distance": d}) for d in ("mse", "l1")],
    "logit_attention_loss": [((2, 3, 9, 11), (2, 3, 9, 11), {}), ((2, 13, 6), (2, 13, 6), {})],
    "pixel_kl_loss": [((2, 5, 9, 11), (2, 5, 9, 11), {}), ((2, 1, 9, 11), (2, 1, 9, 11), {}),
                      ((2, 40, 3, 5), (2, 40, 3, 5), {"temperature": 1.0}), ((6, 5), (6, 5), {})],
    "channel_wise_kl_loss": [((2, 5, 9, 11), (2, 5, 9, 11), {})],
    "structure_loss": [((2, 1, 37, 41), (2, 1, 37, 41), {})],
}
# (dtype, layout): float32 in every layout, the half and double kernels once each.
VARIANTS = [(F32, "contiguous"), (F32, "channels_last"), (F32, "strided"), (F16, "contiguous"),
            (F64, "contiguous")]


def _inputs(op, s_shape, t_shape, kw, dtype, layout, g):
    fs = torch.randn(s_shape, generator=g, dtype=F64)
    ft = torch.randn(t_shape, generator=g, dtype=F64)
    if op == "structure_loss":
        ft = (ft > 0).to(F64)
    if len(s_shape) == 4:
        fs, ft = make_layout(fs, layout), make_layout(ft, layout)
    fs, ft = fs.to("cuda", dtype), ft.to("cuda", dtype)
    if op == "pixel_kl_loss" and len(s_shape) == 4:
        mask = torch.rand(s_shape[0], *s_shape[2:], generator=g) > 0.3
        kw = dict(kw, mask=mask.cuda())
    return fs.requires_grad_(True), ft, kw


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_workload: no CUDA device", file=sys.stderr)
        return 77
    ops = sys.argv[1:] or list(CASES)
    unknown = sorted(set(ops) - set(CASES))
    if unknown:
        print(f"sanitize_workload: unknown op(s) {', '.join(unknown)}; known: {', '.join(CASES)}",
              file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    calls = 0
    for op in ops:
        cases = CASES[op]
        for backend in fused_backends(op, "cuda"):
            for s_shape, t_shape, kw in cases:
                for dtype, layout in VARIANTS:
                    fs, ft, args = _inputs(op, s_shape, t_shape, kw, dtype, layout, g)
                    print(f"{op} backend={backend} {tuple(s_shape)}->{tuple(t_shape)} {dtype} {layout} "
                          f"{sorted(kw)}", flush=True)
                    getattr(kdk, op)(fs, ft, backend=backend, **args).backward()
                    torch.cuda.synchronize()
                    calls += 1
    print(f"sanitize_workload: {calls} forward+backward calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
