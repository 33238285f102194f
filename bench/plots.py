"""PNG plots of a bench record, drawn beside its JSON: python -m bench.plots RECORD.json ...

A case run gets <stem>-speedup.png (fwd+bwd speedup of every backend over eager PyTorch, its
speedup over torch.compile marked) and <stem>-memory.png (peak memory of one fwd+bwd per
backend), one panel per dtype; a --sweep run gets <stem>-sweep-time.png and
<stem>-sweep-memory.png (against N). Everything is drawn from the record alone, so any committed
record (a GPU run's too) can be redrawn. matplotlib is a bench-only dependency.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.tables import layout

# One colour per backend in every plot; unknown labels (new peers) take the spare ones in turn.
COLORS = {"torch": "C7", "compile": "C1", "cpu": "C2", "cuda": "C3", "triton": "C0", "liger": "C4"}
SPARE_COLORS = ("C5", "C6", "C8", "C9")
MODE = "full"  # what a training step pays (several fused ops do the gradient work in the forward)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _colors(backends) -> dict:
    spare = iter(SPARE_COLORS * len(backends))
    return {b: COLORS.get(b) or next(spare) for b in backends}


def _title(record: dict) -> str:
    settings = record["settings"]
    load = settings.get("loadavg_1_5_15min", {})
    dirty = " (uncommitted changes)" if record.get("dirty") else ""
    return (f"{record['device']} ({record['device_kind']}), {record['date'][:16]} UTC, "
            f"commit {record['commit'][:10]}{dirty}, torch {record['torch']}, "
            f"triton {record['triton']}{', --quick' if settings.get('quick') else ''}"
            + (f"\n1-min load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end"
               f", torch threads: {settings['threads']}" if load else ""))


def _case_axes(plt, groups: list, dtypes: list, bars: int):
    width = max(8.0, 0.22 * len(groups) * bars + 2.5)
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(width, 3.6 * len(dtypes) + 2.6),
                             squeeze=False)
    return fig, [row[0] for row in axes]


def _finish(fig, axes, groups: list, title: str, path: Path) -> Path:
    for ax in axes:
        ax.set_xticks(range(len(groups)),
                      [f"{op.removesuffix('_loss')} / {case}" for op, case in groups],
                      rotation=35, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(True, axis="y", which="major", alpha=0.3)
    unique = {}  # one entry per label, not per bar, from every panel
    for ax in axes:
        unique.update(zip(*reversed(ax.get_legend_handles_labels())))
    axes[0].legend(unique.values(), unique.keys(), fontsize=7, loc="upper left",
                   bbox_to_anchor=(1.005, 1))
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def speedup_plot(record: dict, path: Path) -> Path:
    """Grouped bars per (op, case): fwd+bwd time of eager torch / time of the backend (log
    scale); a black diamond on each non-compile bar at its speedup over torch.compile."""
    plt = _pyplot()
    groups, dtypes, backends, cells = layout(record["results"], MODE)
    shown = [b for b in backends if b != "torch"]
    colors = _colors(backends)
    fig, axes = _case_axes(plt, groups, dtypes, len(shown))
    width = 0.8 / len(shown)
    for ax, dtype in zip(axes, dtypes):
        ax.axhline(1.0, color="k", lw=0.8, label="eager torch (= 1)")
        for j, backend in enumerate(shown):
            for i, (op, case) in enumerate(groups):
                row, x = cells.get((op, case, dtype, backend)), i - 0.4 + width * (j + 0.5)
                if row is None:
                    continue
                if row["oom"] or row["speedup_vs_torch"] is None:
                    eager = cells.get((op, case, dtype, "torch"))
                    why = ("oom" if row["oom"] else
                           "eager oom" if eager and eager["oom"] else "no eager time")
                    ax.text(x, 0.02, why, rotation=90, fontsize=6, ha="center", va="bottom",
                            transform=ax.get_xaxis_transform())
                else:
                    s = row["speedup_vs_torch"]
                    ax.bar(x, s, width, color=colors[backend], label=backend)
                    ax.text(x, s * 1.04, f"{s:.3g}", rotation=90, fontsize=5.5, ha="center",
                            va="bottom")
                if backend != "compile" and row["speedup_vs_compile"] is not None:
                    ax.plot(x, row["speedup_vs_compile"], "D", color="k", ms=3.5,
                            label="the bar's backend: speedup over torch.compile")
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 1.6)  # room for the value labels
        ax.set_ylabel(f"speedup over eager, {dtype}")
    return _finish(fig, axes, groups, f"fwd+bwd speedup over eager PyTorch (>1: faster)\n"
                                      f"{_title(record)}", path)


def memory_plot(record: dict, path: Path) -> Path:
    """Grouped bars per (op, case): peak memory growth of one fwd+bwd per backend (symmetric log
    scale: 0 stays visible); out-of-memory backends drawn hollow at their predicted need."""
    plt = _pyplot()
    groups, dtypes, backends, cells = layout(record["results"], MODE)
    colors = _colors(backends)
    fig, axes = _case_axes(plt, groups, dtypes, len(backends))
    width = 0.8 / len(backends)
    for ax, dtype in zip(axes, dtypes):
        for j, backend in enumerate(backends):
            for i, (op, case) in enumerate(groups):
                row, x = cells.get((op, case, dtype, backend)), i - 0.4 + width * (j + 0.5)
                if row is None:
                    continue
                if row["oom"]:
                    need = row.get("predicted_peak_mb")
                    if need:
                        ax.bar(x, need, width, facecolor="none", edgecolor=colors[backend],
                               hatch="///", label=f"{backend}: out of memory (predicted need)")
                    ax.text(x, 0.02, "oom", rotation=90, fontsize=6, ha="center", va="bottom",
                            transform=ax.get_xaxis_transform())
                elif row["peak_mem_mb"] is not None:
                    ax.bar(x, row["peak_mem_mb"], width, color=colors[backend], label=backend)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0)
        ax.set_ylabel(f"peak memory growth (MiB), {dtype}")
    return _finish(fig, axes, groups, f"peak memory of one fwd+bwd (growth over the inputs)\n"
                                      f"{_title(record)}", path)


def _n(row: dict) -> int:
    h, w = row["shape"]["student"][-2:]
    return h * w


def sweep_plots(record: dict, stem: Path) -> list[Path]:
    """Two log-log PNGs: time and peak memory against N, one line per (backend, distance);
    out-of-memory points marked (memory: at the predicted need)."""
    plt = _pyplot()
    rows = record["results"]
    title = (f"{record['device']} ({record['device_kind']}, "
             f"{', '.join(dict.fromkeys(r['dtype'] for r in rows))})\n"
             f"{record['settings']['sweep_note']}")
    lines = {}  # (backend, distance) -> rows, in run order
    for r in rows:
        lines.setdefault((r["backend"], r["kwargs"]["distance"]), []).append(r)
    colors = _colors(list(dict.fromkeys(b for b, _ in lines)))
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


def draw(record: dict, stem: Path) -> list[Path]:
    """The plots of `record`, written as <stem>-*.png; their paths."""
    if record["settings"].get("sweep"):
        return sweep_plots(record, stem)
    plt = _pyplot()
    paths = [speedup_plot(record, stem.with_name(f"{stem.name}-speedup.png")),
             memory_plot(record, stem.with_name(f"{stem.name}-memory.png"))]
    plt.close("all")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", type=Path, help="JSON records written by python -m bench")
    args = ap.parse_args(argv)
    for path in args.records:
        for png in draw(json.loads(path.read_text()), path.with_suffix("")):
            print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
