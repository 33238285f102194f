"""python -m models.train --recipe {kdas,hlfd,cpkd,ltg}: teacher, plain student, distilled student.

Trains the teacher (or loads --teacher), then two students from the same initialisation, on the
same batches in the same order and for the same number of steps: one on the task loss alone, one
with the recipe's distillation losses. Evaluates the three on the held-out split and writes
checkpoints, metrics.json and panel.png into --out. Under torchrun it runs DDP (one metrics.json).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import torch

import kdkernels as kdk
from models import datasets
from models.engine import Runtime, setup_runtime, to_input, train
from models.evaluate import evaluate
from models.panel import save_panel
from models.recipes import RECIPES, Recipe, Sizes

PANEL_IMAGES = {"segmentation": 4, "classification": 8}
STRIDE = 32  # the networks' coarsest stage: image sides must be multiples of it


class UsageError(Exception):
    """A bad argument or file; printed as one line, exit code 2."""


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="kdas")
    p.add_argument("--data", help="a Kvasir-SEG / PraNet folder (segmentation) or an ImageFolder "
                   "tree (ltg); default: the embedded synthetic set")
    p.add_argument("--test-data", help="held-out folder of the same kind (default: 20%% of --data)")
    p.add_argument("--epochs", type=int, help="student epochs (both students)")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--image-size", type=int, help=f"a multiple of {STRIDE}")
    p.add_argument("--batch-size", type=int, help="global batch, split across DDP ranks")
    p.add_argument("--train-samples", type=int, help="synthetic training set size")
    p.add_argument("--test-samples", type=int, help="synthetic held-out set size")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "cuda", "triton"],
                   help="kdkernels backend of every loss op (compare fused vs torch on one run)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile-losses", action="store_true",
                   help="run the distillation losses under torch.compile (with --backend torch: "
                   "compiled eager PyTorch, the benchmarks' baseline)")
    p.add_argument("--out", help="output folder (default runs/<recipe>)")
    p.add_argument("--quick", action="store_true", help="smoke run: same networks, tiny data and sizes")
    p.add_argument("--teacher", metavar="CKPT", help="reuse a trained teacher (a teacher.pt of a run)")
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights and batch order (and the synthetic data, unless --data-seed)")
    p.add_argument("--data-seed", type=int,
                   help="the synthetic data and the held-out split alone (default: --seed)")
    return p.parse_args(argv)


def sizes_for(args, recipe: Recipe) -> Sizes:
    base = recipe.quick if args.quick else recipe.default
    sizes = Sizes(
        train=args.train_samples or base.train, test=args.test_samples or base.test,
        image_size=args.image_size or base.image_size, batch_size=args.batch_size or base.batch_size,
        teacher_epochs=base.teacher_epochs if args.teacher_epochs is None else args.teacher_epochs,
        student_epochs=args.epochs or base.student_epochs)
    if sizes.image_size % STRIDE:
        raise UsageError(f"--image-size {sizes.image_size}: expected a multiple of {STRIDE}")
    return sizes


def check_backend(name: str, recipe: Recipe, device: torch.device) -> None:
    """A backend asked for by name must run every op of the recipe on this device: say so before
    training rather than fail at the first distillation step."""
    if name == "auto":
        return
    status = kdk.backends()[name]
    if not status["available"]:
        raise UsageError(f"--backend {name}: unavailable: {status['reason']}")
    wanted = "cpu" if name == "cpu" else ("cuda" if name in ("cuda", "triton") else device.type)
    if wanted != device.type:
        raise UsageError(f"--backend {name}: runs on {wanted} tensors, this run is on {device.type}")
    missing = [op for op in recipe.ops if op not in status["ops"]]
    if missing:
        raise UsageError(f"--backend {name}: no {name} kernel yet for {', '.join(missing)} (recipe "
                         f"{recipe.name}); use --backend auto (fused where available) or torch")


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def load_teacher(path: str, recipe: Recipe, teacher: torch.nn.Module) -> None:
    if not Path(path).is_file():
        raise UsageError(f"{path}: no such file (expected a teacher.pt written by models.train)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        owner = RECIPES.get(ckpt.get("recipe"))
        if owner is None or owner.teacher_network != recipe.teacher_network:
            raise UsageError(f"{path}: a {ckpt.get('recipe')} checkpoint (expected a {recipe.teacher_network} "
                             f"teacher, as {recipe.name} uses)")
        teacher.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, KeyError, AttributeError, EOFError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: not a {recipe.name} teacher checkpoint ({first})") from None


def save(net, path: Path, recipe: Recipe, sizes: Sizes, classes) -> None:
    torch.save({"recipe": recipe.name, "state_dict": net.state_dict(), "image_size": sizes.image_size,
                "classes": list(classes)}, path)


def _panel(out: Path, recipe: Recipe, data: datasets.Data, nets: dict, rt: Runtime) -> None:
    n = min(PANEL_IMAGES[recipe.task], len(data.test))
    x = to_input(data.test.x[:n], rt.device)
    preds = {}
    with torch.no_grad():
        for name, (net, logits_fn) in nets.items():
            net.eval()
            logits = logits_fn(net(x)).float().cpu()
            preds[name] = torch.sigmoid(logits[:, 0]) if recipe.task == "segmentation" else logits.argmax(1)
    save_panel(out / "panel.png", data.test.x[:n], data.test.y[:n], preds, data.classes)


def _table(metrics: dict) -> str:
    names = list(metrics["teacher"])
    rows = [f"{'network':<16}{'params':>11}" + "".join(f"{k:>9}" for k in names)]
    for key, label, params in (("teacher", "teacher", "teacher"),
                               ("student_plain", "student plain", "student"),
                               ("student_kd", "student KD", "student")):
        rows.append(f"{label:<16}{metrics['params'][params] / 1e6:>9.3f} M"
                    + "".join(f"{metrics[key][k]:>9.4f}" for k in names))
    gain = "  ".join(f"{k} {metrics['student_kd'][k] - metrics['student_plain'][k]:+.4f}" for k in names)
    t = metrics["time_s"]
    lower = "  (lower is better for mae and hd95)" if "hd95" in names else ""
    rows.append(f"KD - plain: {gain}{lower}")
    rows.append(f"time: total {t['total']:.0f} s | teacher {t['teacher_train']:.0f} s | plain student "
                f"{t['student_plain_train']:.0f} s | KD student {t['student_kd_train']:.0f} s, of which "
                f"teacher forward {t['teacher_forward']:.1f} s and distillation losses {t['kd_loss']:.1f} s "
                f"= {100 * metrics['kd_loss_share']:.1f}% of KD step time")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    recipe = RECIPES[args.recipe]()
    sizes = sizes_for(args, recipe)
    rt = setup_runtime(args.amp, args.backend)
    rt.compile_losses = args.compile_losses
    check_backend(args.backend, recipe, rt.device)
    out = Path(args.out or f"runs/{recipe.name}")
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    data_seed = args.seed if args.data_seed is None else args.data_seed
    data = datasets.load(recipe.task, args.data, args.test_data, sizes.image_size, data_seed,
                         (sizes.train, sizes.test))
    if len(data.train) < sizes.batch_size:
        raise UsageError(f"{len(data.train)} training samples: fewer than --batch-size {sizes.batch_size}")
    data_s = time.perf_counter() - t0
    k = len(data.classes)
    common = dict(split=data.train, rt=rt, batch_size=sizes.batch_size, seed=args.seed)

    torch.manual_seed(args.seed)
    teacher = recipe.teacher(k).to(rt.device)
    t0 = time.perf_counter()
    teacher_curve = []
    if args.teacher:
        load_teacher(args.teacher, recipe, teacher)
    else:
        teacher_curve = train(teacher, recipe, epochs=sizes.teacher_epochs, desc="teacher", lr=recipe.teacher_lr,
                              loss_fn=recipe.teacher_loss, **common).epoch_loss
    teacher_s = time.perf_counter() - t0
    teacher.eval()
    # Each network is saved as soon as it is trained, before anything that could fail after it
    # (the other trainings, evaluation and its optional dependencies).
    if rt.main:
        save(teacher, out / "teacher.pt", recipe, sizes, data.classes)

    # Both students start from the same weights and see the same batches: only distillation differs.
    torch.manual_seed(args.seed + 1)
    plain = recipe.student(k).to(rt.device)
    torch.manual_seed(args.seed + 1)
    distilled = recipe.student(k).to(rt.device)
    kd_modules = recipe.kd_modules(teacher, distilled).to(rt.device)
    t0 = time.perf_counter()
    plain_times = train(plain, recipe, epochs=sizes.student_epochs, desc="student (plain)", lr=recipe.lr,
                        loss_fn=recipe.task_loss, **common)
    plain_s = time.perf_counter() - t0
    if rt.main:
        save(plain, out / "student_plain.pt", recipe, sizes, data.classes)
    t0 = time.perf_counter()
    kd_times = train(distilled, recipe, epochs=sizes.student_epochs, desc="student (KD)", lr=recipe.lr,
                     teacher=teacher, kd_modules=kd_modules, **common)
    kd_s = time.perf_counter() - t0
    if rt.main:
        save(distilled, out / "student_kd.pt", recipe, sizes, data.classes)

    t0 = time.perf_counter()
    nets = {"teacher": (teacher, recipe.teacher_logits), "student_plain": (plain, recipe.logits),
            "student_kd": (distilled, recipe.logits)}
    scores = {name: evaluate(net, fn, data.test, rt, sizes.batch_size, k, desc=f"eval {name}")
              for name, (net, fn) in nets.items()}
    eval_s = time.perf_counter() - t0

    metrics = {
        "recipe": recipe.name,
        "data": {"source": data.source, "train": len(data.train), "test": len(data.test),
                 "image_size": sizes.image_size, "classes": list(data.classes)},
        "budget": {"teacher_epochs": 0 if args.teacher else sizes.teacher_epochs,
                   "student_epochs": sizes.student_epochs, "batch_size": sizes.batch_size,
                   "lr": {"teacher": recipe.teacher_lr, "student": recipe.lr},
                   "student_steps": plain_times.steps},
        "backend": args.backend, "compile_losses": args.compile_losses, "amp": args.amp,
        "world_size": rt.world, "seed": args.seed, "data_seed": data_seed,
        "device": str(rt.device),
        "params": {"teacher": count(teacher), "student": count(plain)},
        **scores,
        "time_s": {"total": 0.0, "data": data_s, "teacher_train": teacher_s, "student_plain_train": plain_s,
                   "student_kd_train": kd_s, "teacher_forward": kd_times.teacher_forward,
                   "kd_loss": kd_times.kd_loss, "kd_step": kd_times.step, "plain_step": plain_times.step,
                   "eval": eval_s},
        "kd_loss_share": kd_times.kd_loss / max(kd_times.step, 1e-9),
        "steps_per_s": {"student_plain": plain_times.steps / max(plain_times.step, 1e-9),
                        "student_kd": kd_times.steps / max(kd_times.step, 1e-9)},
        # The whole run's peak on this rank's GPU (the teacher's training included); null on CPU.
        "peak_memory_gb": (torch.cuda.max_memory_allocated(rt.device) / 2**30
                           if rt.device.type == "cuda" else None),
        "train_loss_per_epoch": {"teacher": teacher_curve, "student_plain": plain_times.epoch_loss,
                                 "student_kd": kd_times.epoch_loss},
    }
    if rt.main:
        _panel(out, recipe, data, {"teacher": nets["teacher"], "plain student": nets["student_plain"],
                                   "KD student": nets["student_kd"]}, rt)
        metrics["time_s"]["total"] = time.perf_counter() - start
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"\n{recipe.name}: {data.source}, {len(data.train)} train / {len(data.test)} test at "
              f"{sizes.image_size} px, backend {args.backend}, {rt.world} process(es) on {rt.device.type}")
        print(_table(metrics))
        print(f"wrote {out}/metrics.json, panel.png and checkpoints")
    rt.barrier()
    return metrics


def main(argv=None) -> int:
    args = parse(argv)
    try:
        run(args)
    except (datasets.DataError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
