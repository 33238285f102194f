"""python -m models.study --recipe R: paired seeds of plain and distilled students, one teacher.

The main (faithful) setting of the protocol in docs/kd_study.md: the teacher is trained once
(seed 0, or loaded with --teacher), then for each seed a plain and a distilled student from the
same initial weights on the same batches, all on the same data (data seed 0). Writes
runs/study/<recipe>.json (recipe, metric, teacher, pairs, the paired statistics, budget) and a
plot of the paired differences beside it. Term ablations and the other regimes of the protocol
are not run by this command yet.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from models import train as trainer
from models.recipes import RECIPES

METRIC = {"segmentation": "dice", "classification": "accuracy"}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="kdas")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds (1 .. N)")
    p.add_argument("--teacher", metavar="CKPT", help="reuse a trained teacher instead of training one")
    p.add_argument("--out", help="output folder (default runs/study)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and budgets")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "triton"])
    p.add_argument("--resume", action="store_true",
                   help="reuse the teacher and the seeds an interrupted study of the same settings finished")
    return p.parse_args(argv)


def paired_stats(pairs: list[dict]) -> dict:
    """Mean, standard deviation, standard error and sign count of kd - plain over the pairs, and
    whether the gain passes the protocol's bar (mean > 2 SE and at least 4 of 5 positive)."""
    d = [p["kd"] - p["plain"] for p in pairs]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    positive = sum(x > 0 for x in d)
    return {"differences": d, "mean": mean, "sd": sd, "se": se, "positive": positive, "n": n,
            "gain": n > 1 and mean > 2 * se and positive >= math.ceil(0.8 * n)}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, metric = record["pairs"], record["metric"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    seeds = [p["seed"] for p in pairs]
    left.axhline(record["teacher"], color="k", ls="--", label="teacher")
    left.plot(seeds, [p["plain"] for p in pairs], "o", label="plain student")
    left.plot(seeds, [p["kd"] for p in pairs], "s", label="distilled student")
    left.set(xlabel="seed", ylabel=f"held-out {metric}", title=record["recipe"])
    left.legend(fontsize=8)
    stats = record["stats"]
    colours = ["tab:green" if x > 0 else "tab:red" for x in stats["differences"]]
    right.bar(seeds, stats["differences"], color=colours)
    right.axhline(0, color="k", lw=0.8)
    right.axhline(stats["mean"], color="tab:blue", ls="--",
                  label=f"mean {stats['mean']:+.4f} (SE {stats['se']:.4f})")
    right.set(xlabel="seed", ylabel=f"KD - plain ({metric})", title="paired differences")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    recipe = RECIPES[args.recipe]()
    out = Path(args.out or "runs/study")
    work = out / args.recipe
    quick = ["--quick"] if args.quick else []
    common = ["--recipe", args.recipe, "--data-seed", "0", "--backend", args.backend, *quick]
    teacher = args.teacher
    if teacher is None:  # seed 0 trains the teacher (and a pair that is not one of the study's)
        first = _run(args, [*common, "--seed", "0"], work / "teacher")
        teacher = str(work / "teacher" / "teacher.pt")
        teacher_value = first["teacher"][METRIC[recipe.task]]
    pairs, runs = [], []
    for seed in range(1, args.seeds + 1):
        m = _run(args, [*common, "--seed", str(seed), "--teacher", teacher], work / f"seed{seed}")
        key = METRIC[recipe.task]
        pairs.append({"seed": seed, "plain": m["student_plain"][key], "kd": m["student_kd"][key]})
        runs.append({"seed": seed, "student_plain": m["student_plain"], "student_kd": m["student_kd"],
                     "time_s": m["time_s"]["total"]})
        teacher_value = m["teacher"][key]  # the same teacher on the same held-out frames
    record = {
        "recipe": args.recipe, "metric": METRIC[recipe.task], "setting": "faithful (SPEC section 4)",
        "teacher": teacher_value, "pairs": pairs, "stats": paired_stats(pairs), "runs": runs,
        "budget": m["budget"], "data": m["data"], "backend": args.backend, "quick": args.quick,
        "commit": _commit(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "time_s": time.perf_counter() - start,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.recipe}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out / f"{args.recipe}.png")
    s = record["stats"]
    print(f"\n{args.recipe}: teacher {record['metric']} {teacher_value:.4f}; KD - plain over {s['n']} "
          f"pairs: {s['mean']:+.4f} +- {s['sd']:.4f} (SE {s['se']:.4f}), {s['positive']}/{s['n']} "
          f"positive, {'a gain' if s['gain'] else 'no gain'} by the protocol; {record['time_s']:.0f} s")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return record


def _run(args, train_args: list[str], out: Path) -> dict:
    """One models.train run into `out`, or with --resume the metrics it already wrote there."""
    done = out / "metrics.json"
    if args.resume and done.exists():
        print(f"reusing {done}")
        return json.loads(done.read_text())
    return trainer.run(trainer.parse([*train_args, "--out", str(out)]))


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    args = parse(argv)
    try:
        run(args)
    except trainer.UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
