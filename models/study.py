"""python -m models.study --recipe R: does distillation help? The protocol of docs/kd_study.md.

One data draw (data seed 0) split into fit (80% of the training frames), validation (the other
20%) and the held-out frames. The teacher trains once on fit (seed 0, or --teacher); for each seed
a plain and a distilled student start from the same weights and see the same batches. Beside the
main (faithful) setting: each distillation term alone (--ablations), every term scaled
(--kd-scales) and the declared regimes (--regimes long,semi: twice the student epochs; the task
loss seeing a quarter of the labels). Every choice (LTG's ensemble members, which equal-steps
setting to report) is made on validation; the held-out frames only score the networks. Networks train in --workers processes of one thread each; the teacher's outputs
on the fit frames are computed once and looked up by every distilled student.
Writes runs/study/<recipe>.json and a plot beside it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import multiprocessing
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from models import datasets
from models import train as trainer
from models.engine import Runtime, setup_runtime, train
from models.evaluate import evaluate, predict
from models.recipes import RECIPES, Recipe, Sizes
from models.teacher_cache import TeacherCache

METRIC = {"segmentation": "dice", "classification": "accuracy"}
# The teacher must lead the mean plain student on validation by this much (docs/kd_study.md).
TEACHER_LEAD = {"segmentation": 0.03, "classification": 0.02}
VALIDATION_FRACTION, LABELLED_FRACTION = 0.2, 0.25
REGIMES = {"main": "equal steps, the default budget", "long": "both students at twice the epochs",
           "semi": "task loss on the labels of 25% of the fit frames, distillation on all"}
CACHE_LIMIT_BYTES = 8 * 2**30  # above it, distilled students run the teacher instead


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="kdas")
    p.add_argument("--seeds", type=int, default=5, help="paired seeds (1 .. N)")
    p.add_argument("--ablations", action="store_true", help="also each distillation term alone")
    p.add_argument("--regimes", default="", help="comma-separated extra regimes: long, semi")
    p.add_argument("--kd-scales", default="",
                   help="comma-separated factors on every distillation term, tried beside 1")
    p.add_argument("--teacher", metavar="CKPT", help="reuse a teacher.pt trained on the same fit frames")
    p.add_argument("--workers", type=int, default=2, help="networks trained at once, one thread each")
    p.add_argument("--out", help="output folder (default runs/study)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data and budgets")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "triton"])
    p.add_argument("--resume", action="store_true",
                   help="reuse the networks an interrupted study of the same settings finished")
    args = p.parse_args(argv)
    args.regimes = [r for r in args.regimes.split(",") if r]
    unknown = set(args.regimes) - {"long", "semi"}
    if unknown:
        p.error(f"--regimes {','.join(sorted(unknown))}: expected some of long, semi")
    try:
        args.kd_scales = [float(x) for x in args.kd_scales.split(",") if x]
    except ValueError:
        p.error(f"--kd-scales {args.kd_scales}: expected comma-separated numbers")
    if any(not 0 < x < float("inf") for x in args.kd_scales):
        p.error(f"--kd-scales {args.kd_scales}: expected positive factors")
    if args.seeds < 1 or args.workers < 1:
        p.error("--seeds and --workers: expected at least 1")
    return args


@dataclass(frozen=True)
class Plan:
    """What every job of a study shares (sent to the worker processes)."""

    recipe: str
    sizes: Sizes
    backend: str
    work: str
    members: tuple[int, ...] | None = None  # LTG: the teachers kept, chosen on validation


@dataclass(frozen=True)
class Job:
    kind: str                    # "teacher", "prepare" (evaluate, cache outputs), "plain", "kd"
    seed: int = 0
    regime: str = "main"
    terms: tuple[str, ...] = ()  # kd: the active terms (empty: all, the faithful setting)
    scale: float = 1.0           # kd: a factor on every distillation term

    @property
    def key(self) -> str:
        if self.kind in ("teacher", "prepare"):
            return self.kind
        terms = f"[{'+'.join(self.terms)}]" if self.terms else ""
        scale = f"x{self.scale:g}" if self.scale != 1.0 else ""
        return f"{self.kind}{terms}{scale}-{self.regime}-s{self.seed}"


@dataclass
class Splits:
    fit: datasets.Split
    validation: datasets.Split
    test: datasets.Split
    labelled: torch.Tensor  # bool per fit frame: the labels a semi-supervised task loss sees
    classes: tuple[str, ...]
    source: str


@functools.lru_cache(maxsize=1)
def splits(sizes: Sizes, task: str) -> Splits:
    """Data seed 0; validation carved from the training frames by a fixed permutation."""
    data = datasets.load(task, None, None, sizes.image_size, 0, (sizes.train, sizes.test))
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    n_val = max(1, round(VALIDATION_FRACTION * len(order)))
    val, fit = order[:n_val], order[n_val:]
    pick = torch.randperm(len(fit), generator=torch.Generator().manual_seed(1))
    labelled = torch.zeros(len(fit), dtype=torch.bool)
    labelled[pick[:max(1, round(LABELLED_FRACTION * len(fit)))]] = True
    split = datasets.Split
    return Splits(split(data.train.x[fit], data.train.y[fit]), split(data.train.x[val], data.train.y[val]),
                  data.test, labelled, data.classes, data.source)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _evaluate(net, logits_fn, s: Splits, rt: Runtime, sizes: Sizes, name: str) -> dict:
    k = len(s.classes)
    return {"validation": evaluate(net, logits_fn, s.validation, rt, sizes.batch_size, k, desc=f"val {name}"),
            "test": evaluate(net, logits_fn, s.test, rt, sizes.batch_size, k, desc=f"test {name}")}


def _teacher(plan: Plan, recipe: Recipe, k: int, rt: Runtime):
    teacher = recipe.teacher(k)
    trainer.load_teacher(str(Path(plan.work) / "teacher.pt"), recipe, teacher)
    if plan.members is not None:
        teacher.keep(list(plan.members))
    return teacher.to(rt.device).eval()


def run_job(plan: Plan, job: Job) -> dict:
    """Trains (or prepares) one network in this process; returns its metrics."""
    start = time.perf_counter()
    recipe = RECIPES[plan.recipe](terms=job.terms or None, kd_scale=job.scale)
    s = splits(plan.sizes, recipe.task)
    rt = setup_runtime(False, plan.backend)
    k, sizes, work = len(s.classes), plan.sizes, Path(plan.work)
    result: dict = {"key": job.key, **asdict(job)}
    if job.kind == "teacher":
        torch.manual_seed(0)
        teacher = recipe.teacher(k).to(rt.device)
        train(teacher, recipe, s.fit, rt, epochs=sizes.teacher_epochs, batch_size=sizes.batch_size, seed=0,
              desc="teacher", lr=recipe.teacher_lr, loss_fn=recipe.teacher_loss)
        trainer.save(teacher, work / "teacher.pt", recipe, sizes, s.classes)
        if recipe.task == "classification":  # each member and every ensemble, on validation only
            result["subsets"] = _ensemble_accuracy(teacher, s.validation, rt, sizes.batch_size)
    elif job.kind == "prepare":
        teacher = _teacher(plan, recipe, k, rt)
        result.update(_evaluate(teacher, recipe.teacher_logits, s, rt, sizes, "teacher"))
        cache = TeacherCache.build(teacher, s.fit, rt, sizes.batch_size)
        result["cache_bytes"] = cache.nbytes
        if cache.nbytes <= CACHE_LIMIT_BYTES:
            cache.save(work / "teacher_outputs.pt")
    else:
        epochs = sizes.student_epochs * (2 if job.regime == "long" else 1)
        labelled = s.labelled if job.regime == "semi" else None
        torch.manual_seed(job.seed + 1)  # the pair's shared initial weights
        net = recipe.student(k).to(rt.device)
        common = dict(epochs=epochs, batch_size=sizes.batch_size, seed=job.seed, lr=recipe.lr,
                      labelled=labelled, desc=job.key)
        if job.kind == "plain":
            train(net, recipe, s.fit, rt, loss_fn=recipe.task_loss, **common)
        else:
            teacher = _teacher(plan, recipe, k, rt)
            modules = recipe.kd_modules(teacher, net).to(rt.device)
            cached = work / "teacher_outputs.pt"
            cache = TeacherCache.load(cached) if cached.exists() else None
            train(net, recipe, s.fit, rt, teacher=teacher, kd_modules=modules, teacher_cache=cache, **common)
        result.update(_evaluate(net, recipe.logits, s, rt, sizes, job.key))
    result["time_s"] = time.perf_counter() - start
    return result


@torch.no_grad()
def _ensemble_accuracy(teacher, split: datasets.Split, rt: Runtime, batch_size: int) -> dict[str, float]:
    members = range(len(teacher))
    per_member = [[] for _ in members]
    labels = []
    for outs, y in predict(teacher, lambda outs: torch.stack([lg for lg, _ in outs]), split, rt,
                           batch_size, "teacher members"):
        for i in members:
            per_member[i].append(outs[i])
        labels.append(y)
    logits, y = [torch.cat(m) for m in per_member], torch.cat(labels)
    return {_subset_key(subset): (torch.stack([logits[i] for i in subset]).mean(0).argmax(1) == y)
            .float().mean().item()
            for r in range(1, len(logits) + 1) for subset in itertools.combinations(members, r)}


def _subset_key(members) -> str:
    """An ensemble's key in the teacher job's accuracies: its member indices, ascending."""
    return ",".join(map(str, members))


def choose_members(subsets: dict[str, float]) -> tuple[tuple[int, ...], list[dict]]:
    """Greedy on validation accuracy: the best teacher, then each next-best one kept only if the
    mean-logit ensemble's accuracy rises. Returns the members and what was tried."""
    singles = sorted((int(k) for k in subsets if "," not in k), key=lambda i: -subsets[str(i)])
    chosen, tried = [singles[0]], [{"members": [singles[0]], "validation": subsets[str(singles[0])]}]
    for i in singles[1:]:
        candidate = sorted(chosen + [i])
        value = subsets[_subset_key(candidate)]
        tried.append({"members": candidate, "validation": value})
        if value > subsets[_subset_key(sorted(chosen))]:
            chosen = candidate
    return tuple(sorted(chosen)), tried


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


@dataclass
class Study:
    """Runs the jobs of one study in a process pool, reusing finished ones with --resume."""

    args: argparse.Namespace
    plan: Plan
    pool: ProcessPoolExecutor
    done: dict = field(default_factory=dict)

    def submit(self, job: Job):
        path = Path(self.plan.work) / f"{job.key}.json"
        if self.args.resume and path.exists():
            print(f"reusing {path}")
            return _Done(json.loads(path.read_text()))
        future = self.pool.submit(run_job, self.plan, job)
        future.add_done_callback(functools.partial(_save, path))  # as soon as it is trained
        return future

    def result(self, job: Job, future) -> dict:
        self.done[job.key] = future.result()
        return self.done[job.key]


def _save(path: Path, future) -> None:
    if future.exception() is None:
        path.write_text(json.dumps(future.result(), indent=1) + "\n")


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _jobs(args, recipe: Recipe, kind: str) -> list[Job]:
    seeds = range(1, args.seeds + 1)
    jobs = [Job(kind, s) for s in seeds]
    if kind == "kd" and args.ablations and len(recipe.terms) > 1:
        jobs += [Job(kind, s, terms=(t,)) for t in recipe.terms for s in seeds]
    if kind == "kd":
        jobs += [Job(kind, s, scale=x) for x in args.kd_scales for s in seeds]
    for regime in args.regimes:
        jobs += [Job(kind, s, regime) for s in seeds]
    return jobs


def _pairs(done: dict, metric: str, split: str, regime: str = "main", terms: tuple = (),
           scale: float = 1.0) -> list[dict]:
    pairs = []
    for plain in (v for v in done.values() if v["kind"] == "plain" and v["regime"] == regime):
        kd = done[Job("kd", plain["seed"], regime, terms, scale).key]
        pairs.append({"seed": plain["seed"], "plain": plain[split][metric], "kd": kd[split][metric]})
    return sorted(pairs, key=lambda p: p["seed"])


def _setting(done: dict, metric: str, regime: str = "main", terms: tuple = (), scale: float = 1.0) -> dict:
    test = _pairs(done, metric, "test", regime, terms, scale)
    val = _pairs(done, metric, "validation", regime, terms, scale)
    return {"pairs": test, "stats": paired_stats(test), "validation_pairs": val,
            "validation_stats": paired_stats(val)}


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    recipe = RECIPES[args.recipe]()
    sizes = recipe.quick if args.quick else recipe.default
    out = Path(args.out or "runs/study")
    work = out / args.recipe
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.recipe, sizes, args.backend, str(work))
    data = splits(sizes, recipe.task)
    metric, ensemble_tried = METRIC[recipe.task], []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_worker_init,
                             initargs=(1,)) as pool:
        study = Study(args, plan, pool)
        teacher_job = Job("teacher")
        if args.teacher:
            (work / "teacher.pt").write_bytes(Path(args.teacher).read_bytes())
            teacher_future = _Done({"key": "teacher", "kind": "teacher", "reused": args.teacher})
        else:
            teacher_future = study.submit(teacher_job)
        plain = [(job, study.submit(job)) for job in _jobs(args, recipe, "plain")]
        teacher = study.result(teacher_job, teacher_future)
        if "subsets" in teacher:
            members, ensemble_tried = choose_members(teacher["subsets"])
            plan = study.plan = Plan(args.recipe, sizes, args.backend, str(work), members)
        prepare_job = Job("prepare")
        prepared = study.result(prepare_job, study.submit(prepare_job))
        kd = [(job, study.submit(job)) for job in _jobs(args, recipe, "kd")]
        for job, future in plain + kd:
            study.result(job, future)
    done = study.done
    plain_val = [v["validation"][metric] for v in done.values() if v["kind"] == "plain" and v["regime"] == "main"]
    lead = prepared["validation"][metric] - sum(plain_val) / len(plain_val)
    main_setting = _setting(done, metric)
    ablations = ({t: _setting(done, metric, terms=(t,)) for t in recipe.terms}
                 if args.ablations and len(recipe.terms) > 1 else {})
    scaled = {f"{x:g}": _setting(done, metric, scale=x) for x in args.kd_scales}
    # The equal-steps settings, compared on validation alone; the chosen one's held-out pairs are
    # its result.
    candidates = {"faithful": main_setting, **{f"{t} only": v for t, v in ablations.items()},
                  **{f"all terms x{x}": v for x, v in scaled.items()}}
    tried = [{"setting": name, "validation_mean": v["validation_stats"]["mean"],
              "validation_positive": v["validation_stats"]["positive"]} for name, v in candidates.items()]
    chosen = max(candidates, key=lambda name: candidates[name]["validation_stats"]["mean"])
    record = {
        "recipe": args.recipe, "metric": metric,
        "setting": "faithful (SPEC section 4, HLFD as its released code)",
        "teacher": prepared["test"][metric], "teacher_validation": prepared["validation"][metric],
        "teacher_lead_validation": lead, "teacher_ahead": lead >= TEACHER_LEAD[recipe.task],
        "teacher_checkpoint": args.teacher,
        **main_setting, "ablations": ablations, "scaled": scaled,
        "regimes": {r: {"description": REGIMES[r], **_setting(done, metric, r)} for r in args.regimes},
        "tried": tried, "chosen_on_validation": {"setting": chosen, "stats": candidates[chosen]["stats"]},
        "ensemble_tried": ensemble_tried, "members": list(plan.members) if plan.members is not None else None,
        "networks": {k: {"validation": v.get("validation"), "test": v.get("test"), "time_s": v.get("time_s")}
                     for k, v in sorted(done.items())},
        "budget": asdict(sizes) | {"fit": len(data.fit), "validation": len(data.validation)},
        "teacher_outputs_cached": (work / "teacher_outputs.pt").exists(),
        "backend": args.backend, "quick": args.quick, "workers": args.workers, "threads_per_worker": 1,
        "commit": _commit(), "torch": torch.__version__, "time_s": time.perf_counter() - start,
    }
    path = out / f"{args.recipe}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out / f"{args.recipe}.png")
    _summary(record)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return record


def _summary(record: dict) -> None:
    def line(name, setting):
        s = setting["stats"]
        return (f"  {name:<22} KD - plain {s['mean']:+.4f} +- {s['sd']:.4f} (SE {s['se']:.4f}), "
                f"{s['positive']}/{s['n']} positive: {'a gain' if s['gain'] else 'no gain'}")

    print(f"\n{record['recipe']}: teacher held-out {record['metric']} {record['teacher']:.4f} (leads the "
          f"plain students by {record['teacher_lead_validation']:+.4f} on validation); "
          f"{record['time_s']:.0f} s")
    print(line("faithful", record))
    for term, setting in record["ablations"].items():
        print(line(f"{term} only", setting))
    for scale, setting in record["scaled"].items():
        print(line(f"all terms x{scale}", setting))
    for regime, setting in record["regimes"].items():
        print(line(f"regime {regime}", setting))
    print(f"  chosen on validation: {record['chosen_on_validation']['setting']}")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, metric = record["pairs"], record["metric"]
    settings = {"faithful": record, **{f"{t} only": s for t, s in record["ablations"].items()},
                **{f"all terms x{x}": s for x, s in record["scaled"].items()},
                **{f"regime {r}": s for r, s in record["regimes"].items()}}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    seeds = [p["seed"] for p in pairs]
    left.axhline(record["teacher"], color="k", ls="--", label="teacher")
    left.plot(seeds, [p["plain"] for p in pairs], "o", label="plain student")
    left.plot(seeds, [p["kd"] for p in pairs], "s", label="distilled student")
    left.set(xlabel="seed", ylabel=f"held-out {metric}", title=f"{record['recipe']}: faithful setting")
    left.legend(fontsize=8)
    width = 0.8 / len(settings)
    for i, (name, setting) in enumerate(settings.items()):
        s = setting["stats"]
        x = [p["seed"] + (i - (len(settings) - 1) / 2) * width for p in setting["pairs"]]
        right.bar(x, s["differences"], width, label=f"{name}: {s['mean']:+.4f} (SE {s['se']:.4f})")
    right.axhline(0, color="k", lw=0.8)
    right.set(xlabel="seed", ylabel=f"KD - plain (held-out {metric})", title="paired differences")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str | None:
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
