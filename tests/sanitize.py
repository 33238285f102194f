"""compute-sanitizer (memcheck, racecheck, initcheck) over the GPU kernels; needs a CUDA device.

Targets: "workload" (tests/sanitize_workload.py: every op on the cuda and triton backends at small
shapes, every layout, float16/32/64) and "pytest" (the CUDA C++ backend's tests, ids "cuda-cuda",
not the slow ones). Each (tool, target) run is one sanitizer process; a JSON record of all of
them (tool, target, errors, warnings, device, date, commit) is written to tests/sanitizers/.

    python tests/sanitize.py [--tools memcheck,racecheck] [--targets workload] [--ops structure_loss]
                             [--timeout 500]

Exit status: 0 every run clean; 1 a run found errors, failed or timed out; 77 nothing could be
checked here (no CUDA device, no compute-sanitizer, or the sanitizer does not support the
device), with one line saying which.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "tests" / "sanitizers"
TOOLS = ("memcheck", "racecheck", "initcheck")
TARGETS = {
    "workload": [sys.executable, "tests/sanitize_workload.py"],
    "pytest": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
               "-k", "cuda-cuda", "tests"],
}
SKIPPED = 77


def find_sanitizer() -> str | None:
    candidates = [shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "compute-sanitizer"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "compute-sanitizer"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def summary(log: str) -> tuple[int, int]:
    """(errors, warnings) from a sanitizer log's summary lines (racecheck adds its warnings)."""
    errors = sum(int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log))
    race = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", log)
    return errors + sum(int(e) for e, _ in race), sum(int(w) for _, w in race)


def run_one(sanitizer: str, tool: str, target: str, timeout: float, ops: list[str]) -> dict:
    workload_ops = ops if target == "workload" else []
    cmd = [sanitizer, "--tool", tool, "--target-processes", "all", "--print-limit", "50",
           *TARGETS[target], *workload_ops]
    # One device allocation per tensor: the caching allocator would hide overruns inside its blocks.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONUNBUFFERED="1")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log, code = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"), None
    errors, warnings = summary(log)
    sanitizer_lines = [line for line in log.splitlines() if line.startswith("=========")]
    return {"tool": tool, "target": target, "command": " ".join(cmd), "returncode": code,
            "timed_out": code is None, "seconds": round(time.monotonic() - start, 1),
            "errors": errors, "warnings": warnings, "clean": code == 0 and errors == 0,
            "unsupported_device": "Device not supported" in log,
            "report": sanitizer_lines[:80], "output_tail": log.splitlines()[-20:]}


def commit(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout; pass --commit)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--timeout", type=float, default=None, help="seconds per sanitizer run")
    parser.add_argument("--commit", help="the commit checked (default: git rev-parse HEAD)")
    parser.add_argument("--ops", help="comma-separated ops for the workload target (default: all)")
    args = parser.parse_args()
    ops = args.ops.split(",") if args.ops else []
    tools, targets = args.tools.split(","), args.targets.split(",")
    if not set(tools) <= set(TOOLS) or not set(targets) <= set(TARGETS):
        parser.error(f"tools are {', '.join(TOOLS)}; targets are {', '.join(TARGETS)}")

    import torch

    if not torch.cuda.is_available():
        print("sanitize: skipped, torch sees no CUDA device (compute-sanitizer checks GPU kernels)")
        return SKIPPED
    sanitizer = find_sanitizer()
    if sanitizer is None:
        print("sanitize: skipped, compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        return SKIPPED

    runs = []
    for tool in tools:
        for target in targets:
            run = run_one(sanitizer, tool, target, args.timeout, ops)
            if run["unsupported_device"]:
                print(f"sanitize: skipped, {sanitizer} does not support this device (gVisor?)")
                return SKIPPED
            runs.append(run)
            verdict = "clean" if run["clean"] else "TIMED OUT" if run["timed_out"] else "FAILED"
            print(f"sanitize: {tool:9s} {target:8s} {verdict}: {run['errors']} errors, "
                  f"{run['warnings']} warnings, exit {run['returncode']}, {run['seconds']} s", flush=True)

    now = datetime.datetime.now(datetime.timezone.utc)
    device = torch.cuda.get_device_name()
    version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip()
    record = {"date": now.isoformat(timespec="seconds"), "commit": commit(args.commit), "device": device,
              "ops": ops or "all", "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton": _version("triton"), "sanitizer": version.splitlines()[-1] if version else "",
              "clean": all(r["clean"] for r in runs), "runs": runs}
    RECORDS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    # The tools in the name: scripts/gpu_session.sh runs them side by side, each its own process and record.
    path = RECORDS / f"{now:%Y%m%dT%H%M%SZ}-{slug}-{'-'.join(tools)}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"sanitize: {'clean' if record['clean'] else 'ERRORS'}; record {path.relative_to(ROOT)}")
    return 0 if record["clean"] else 1


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
