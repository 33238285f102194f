"""python -m bench --sweep: pixel_relation_loss fwd+bwd time and peak memory against N = H x W.

The eager reference holds B x N x N matrices, the fused backends O(B x C x N): the sweep shows
where eager (and torch.compile) run out of memory and how the time of each route grows with N.
"""

from __future__ import annotations

from pathlib import Path

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


def _n(row: dict) -> int:
    h, w = row["shape"]["student"][-2:]
    return h * w


def plot(rows: list[dict], stem: Path, title: str) -> list[Path]:
    """Two log-log PNGs next to the JSON: time and peak memory against N, one line per
    (backend, distance); out-of-memory points marked (memory: at the predicted need)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {}  # (backend, distance) -> rows, in run order
    for r in rows:
        lines.setdefault((r["backend"], r["kwargs"]["distance"]), []).append(r)
    colors = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(b for b, _ in lines))}
    sides = sorted({r["shape"]["student"][-1] for r in rows})
    paths = []
    for what, key, ylabel in (("time", "median_ms", "fwd+bwd time per call (ms)"),
                              ("memory", "peak_mem_mb", "peak memory growth (MiB)")):
        fig, ax = plt.subplots(figsize=(10, 5))
        on_top = []
        for (backend, distance), mine in lines.items():
            name, color = f"{backend} {distance}", colors[backend]
            ran = [r for r in mine if r["oom"] is None and r[key]]  # a log axis has no 0
            ax.plot([_n(r) for r in ran], [r[key] for r in ran], marker="o", ms=4, color=color,
                    linestyle="-" if distance == "mse" else "--", label=name)
            oom = [r for r in mine if r["oom"]]
            sized = [r for r in oom if what == "memory" and r.get("predicted_peak_mb")]
            mark = dict(marker="x" if distance == "mse" else "+", ms=9, mew=2, linestyle="",
                        color=color)
            if sized:  # at the predicted need, which is why it was not run (CPU) or failed
                ax.plot([_n(r) for r in sized], [r["predicted_peak_mb"] for r in sized], **mark,
                        label=f"{name}: out of memory (predicted need)")
            elif oom:  # no time: a row of marks above the data, one height per line
                on_top.append(0.97 - 0.04 * len(on_top))
                ax.plot([_n(r) for r in oom], [on_top[-1]] * len(oom), **mark,
                        transform=ax.get_xaxis_transform(), label=f"{name}: out of memory")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if on_top:  # room above the data for the out-of-memory marks
            low, high = ax.get_ylim()
            ax.set_ylim(low, high * (high / low) ** 0.3)
        ax.set_xticks([s * s for s in sides], [f"{s}²" for s in sides])
        ax.minorticks_off()
        ax.set_xlabel("N = H x W (pixels)")
        ax.set_ylabel(ylabel)
        fig.suptitle(title, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        paths.append(stem.with_name(f"{stem.name}-sweep-{what}.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
