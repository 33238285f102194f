"""kdkernels.info() and `python -m kdkernels`: what this installation is, and whether it works.

Versions (kdkernels, torch, CUDA, Triton, Python), the extension's build record (the torch and
compilers it was built with), every backend with its ops or why it is off, the devices, and a
self-check: every op on every available fused backend, at a small shape, against the float64
eager reference. `python -m kdkernels` prints it as a compact report and exits 1 on a mismatch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys

import torch

from kdkernels import _dispatch, reference

# (op, student shape, teacher shape, keywords): small, odd, every op.
CHECKS = [
    ("attention_transfer_loss", (2, 3, 7, 6), (2, 4, 5, 5), {"p": 2.0}),
    ("channel_relation_loss", (2, 3, 7, 6), (2, 3, 7, 6), {}),
    ("pixel_relation_loss", (2, 3, 7, 6), (2, 5, 7, 6), {"distance": "kl"}),
    ("sgm_loss", (2, 1, 9, 9), (2, 1, 9, 9), {}),
    ("logit_attention_loss", (2, 1, 7, 6), (2, 1, 7, 6), {}),
    ("pixel_kl_loss", (2, 4, 7, 6), (2, 4, 7, 6), {}),
    ("channel_wise_kl_loss", (2, 3, 7, 6), (2, 3, 7, 6), {}),
    ("structure_loss", (2, 1, 9, 7), (2, 1, 9, 7), {}),
]
# float32 inputs against float64: a correct kernel is ~1e-7 off, a wrong one by far more.
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(__import__(module), "__version__", "unknown")


def _build_record() -> dict | None:
    try:
        with open(os.path.join(_dispatch._PACKAGE, "_build.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _devices() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    found = [f"cpu: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        found.append(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    return found


def _targets() -> list[tuple[str, str, str]]:
    """(op, backend, device) for every available fused backend and the devices it runs on."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(op, name, d) for op, *_ in CHECKS for d in devices
            for name in _dispatch.runnable(op, torch.device(d))]


def _rel_err(value: torch.Tensor, truth: torch.Tensor) -> float:
    scale = truth.abs().max().clamp_min(1e-30)
    return float((value.double().cpu() - truth.cpu()).abs().max() / scale)


def check(op: str, backend: str, device: str) -> dict:
    """One op on one backend against the float64 reference: the relative errors and a verdict."""
    import kdkernels

    s_shape, t_shape, kw = next((s, t, k) for name, s, t, k in CHECKS if name == op)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(s_shape, generator=g)
    teacher = torch.randn(t_shape, generator=g)
    if op == "structure_loss":
        teacher = (teacher > 0).float()
    row = {"op": op, "backend": backend, "device": device}
    try:
        x = student.to(device).requires_grad_(True)
        loss = getattr(kdkernels, op)(x, teacher.to(device), backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, x)
        x64 = student.double().requires_grad_(True)
        ref = getattr(reference, op)(x64, teacher.double(), **kw)
        (ref_grad,) = torch.autograd.grad(ref, x64)
        row.update(loss_err=_rel_err(loss.detach(), ref.detach()), grad_err=_rel_err(grad, ref_grad))
        row["ok"] = row["loss_err"] <= LOSS_RTOL and row["grad_err"] <= GRAD_RTOL
    except Exception as exc:  # noqa: BLE001 - a failing backend is a finding, not a crash
        row.update(ok=False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    return row


def info(self_check: bool = True) -> dict:
    """The installation report as a dict; with self_check, every op on every available fused
    backend against the float64 reference (seconds on a CPU)."""
    import kdkernels

    report = {
        "versions": {"kdkernels": kdkernels.__version__, "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"),
                     "python": platform.python_version()},
        "build": _build_record(),
        "backends": _dispatch.backends(),
        "devices": _devices(),
    }
    if self_check:
        report["checks"] = [check(*target) for target in _targets()]
    return report


def format_report(report: dict) -> str:
    v = report["versions"]
    lines = [f"kdkernels {v['kdkernels']}: torch {v['torch']} (CUDA {v['cuda'] or 'none'}), "
             f"triton {v['triton'] or 'not installed'}, Python {v['python']}"]
    build = report["build"]
    if build is None:
        lines.append("build: no compiled extension record (kdkernels._C was not built)")
    else:
        lines.append("build: torch " + build.get("torch", "?")
                     + "".join(f", {k} {build[k]}" for k in ("cxx", "nvcc", "cuda_arch_list") if build.get(k)))
    lines += [f"device {d}" for d in report["devices"]]
    for name, st in report["backends"].items():
        state = "available: " + ", ".join(o.removesuffix("_loss") for o in st["ops"]) if st["available"] \
            else "off: " + st["reason"]
        lines.append(f"backend {name:6s} {state}")
    checks = report.get("checks")
    if checks is not None:
        lines.append(f"self-check against the float64 reference (bars: loss {LOSS_RTOL:g}, "
                     f"gradient {GRAD_RTOL:g} relative):")
        lines.append(f"  {'op':23s} {'backend':7s} {'device':6s} {'loss err':>9s} {'grad err':>9s}")
        for r in checks:
            errs = (f"{r['loss_err']:9.1e} {r['grad_err']:9.1e}" if "loss_err" in r
                    else f"{'-':>9s} {'-':>9s}")
            lines.append(f"  {r['op']:23s} {r['backend']:7s} {r['device']:6s} {errs}  "
                         f"{'ok' if r['ok'] else 'MISMATCH'}{'  ' + r['error'] if 'error' in r else ''}")
        if not checks:
            lines.append("  (no fused backend available: only the eager reference runs here)")
        bad = sum(not r["ok"] for r in checks)
        lines.append(f"{len(checks) - bad} of {len(checks)} checks passed")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kdkernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-check", action="store_true", help="report only, skip the self-check")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = info(self_check=not args.no_check)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 1 if any(not r["ok"] for r in report.get("checks", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
