"""python -m bench --sweep: pixel_relation_loss fwd+bwd time and peak memory against N = H x W.

The eager reference holds B x N x N matrices, the fused backends O(B x C x N): the sweep shows
where eager (and torch.compile) run out of memory and how the time of each route grows with N.
"""

from __future__ import annotations

from bench.cases import Case, pixel_relation_models

OP = "pixel_relation_loss"
SIDES = (32, 48, 64, 88, 128, 176)
QUICK_SIDES = (16, 24, 32)
DISTANCES = ("mse", "kl")
# The kl route does 1280 N^2 flops per fwd+bwd at B = 2, C = 64: 1.2 TFLOP at 176^2, over 10 s a
# call at a 2-core CPU's float32 matmul peak (0.2 TFLOP/s), so the CPU sweep stops kl at this side.
CPU_KL_MAX_SIDE = 128


def sweep_cases(device_kind: str, quick: bool) -> tuple[list[Case], str]:
    """The sweep's cases and a line saying what it covers."""
    if quick:
        batch, channels, sides = 1, 16, QUICK_SIDES
    else:
        batch, channels, sides = (2 if device_kind == "cpu" else 8), 64, SIDES
    kl_cap = device_kind == "cpu" and not quick
    out = []
    for distance in DISTANCES:
        for side in sides:
            if distance == "kl" and kl_cap and side > CPU_KL_MAX_SIDE:
                continue
            shape = (batch, channels, side, side)
            out.append(Case(OP, f"sweep_{distance}_{side}", {"student": shape, "teacher": shape},
                            dict(distance=distance, tau=1.0), **pixel_relation_models(distance)))
    note = f"sweep: {OP} fwd+bwd, B={batch}, C={channels}, sides {', '.join(map(str, sides))}"
    if kl_cap:
        note += f"; kl only up to {CPU_KL_MAX_SIDE}x{CPU_KL_MAX_SIDE} on the CPU (slow route)"
    return out, note
