"""python -m bench: time kdkernels ops against eager PyTorch and torch.compile.

Prints a table and writes a JSON record to bench/results/<device-slug>-<UTC date-time>.json.
See bench/README.md for the columns and the bytes-moved model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import kdkernels as kdk
from bench import cases as case_table
from bench import harness
from bench.runner import MODES, log, run_case

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = [  # header, row key, format
    ("op", "op", "{}"), ("case", "case", "{}"), ("backend", "backend", "{}"),
    ("dtype", "dtype", "{}"), ("mode", "mode", "{}"), ("median ms", "median_ms", "{:.3f}"),
    ("peak MB", "peak_mem_mb", "{:.1f}"), ("GB/s", "gbps", "{:.1f}"),
    ("% roof", "pct_roofline", "{:.1f}"), ("x torch", "speedup_vs_torch", "{:.2f}"),
    ("x compile", "speedup_vs_compile", "{:.2f}"),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (B=1), few repeats")
    ap.add_argument("--ops", default=",".join(case_table.known_ops()),
                    help="comma-separated ops (default: all with cases: %(default)s)")
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed samples per backend and mode (default 10, 5 with --quick)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="results directory (default: bench/results)")
    args = ap.parse_args(argv)
    args.ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = sorted(set(args.ops) - set(case_table.known_ops()))
    if unknown:
        known = ", ".join(case_table.known_ops())
        ap.error(f"no cases for op(s) {', '.join(unknown)}; known: {known}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def add_derived(rows: list[dict], copy_gbps: float) -> None:
    """GB/s, % of the copy roofline, and speedups against torch / compile of the same case+mode."""
    by_key = {(r["op"], r["case"], r["dtype"], r["mode"], r["backend"]): r for r in rows}
    for r in rows:
        secs = r["median_ms"] / 1e3
        r["gbps"] = r["bytes"] / secs / 1e9 if secs > 0 else None
        r["pct_roofline"] = 100 * r["gbps"] / copy_gbps if r["gbps"] and copy_gbps else None
        for base in ("torch", "compile"):
            ref = by_key.get((r["op"], r["case"], r["dtype"], r["mode"], base))
            r[f"speedup_vs_{base}"] = ref["median_ms"] / r["median_ms"] if ref else None


def format_table(rows: list[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else fmt.format(r[k]) for _, k, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    text_cols = 5  # left-aligned; the numbers are right-aligned
    lines = ["  ".join(c.ljust(w) if i < text_cols else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def bench_rows(args, device: torch.device, dtype: torch.dtype) -> tuple[list, list, dict]:
    """Run every selected case; rows (without the derived columns), skipped backends, settings."""
    on_cuda = device.type == "cuda"
    warmup = 5 if on_cuda else 2
    min_sample_s = 0.002 if args.quick else (0.005 if on_cuda else 0.01)
    rows, skipped = [], []
    for case in case_table.cases(device.type, args.quick, args.ops):
        log(f"{case.op} / {case.name}: {case.shapes} {case.kwargs}")
        case_rows, case_skipped = run_case(case, device, dtype, args.repeats, warmup, min_sample_s)
        nbytes = case.bytes_moved(dtype)
        shape = {k: list(v) for k, v in case.shapes.items()}
        for r in case_rows:
            backend, mode = r.pop("backend"), r.pop("mode")
            rows.append({"op": case.op, "case": case.name, "backend": backend, "dtype": args.dtype,
                         "shape": shape, "kwargs": case.kwargs, "mode": mode,
                         "bytes": nbytes[mode], **r})
        skipped += case_skipped
        if on_cuda:
            torch.cuda.empty_cache()
    settings = {"quick": args.quick, "dtype": args.dtype, "repeats": args.repeats,
                "warmup": warmup, "min_sample_s": min_sample_s,
                "threads": torch.get_num_threads(), "modes": list(MODES)}
    return rows, skipped, settings


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = harness.environment(device)
    load_start = os.getloadavg()
    log(f"kdkernels bench on {env['device']} ({args.device}, {args.dtype}, torch {env['torch']}, "
        f"{torch.get_num_threads()} threads){' --quick' if args.quick else ''}")
    roof = harness.roofline(device, args.quick)
    log(f"copy roofline: {roof['copy_gbps']:.1f} GB/s")

    rows, skipped, settings = bench_rows(args, device, DTYPES[args.dtype])
    add_derived(rows, roof["copy_gbps"])
    print(format_table(rows))

    settings.update({
        "loadavg_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "timing": harness.TIMING_METHOD[device.type],
        "peak_memory": harness.MEMORY_METHOD[device.type],
        "bytes_model": "fwd: student + teacher read once; bwd: student read + gradient written "
                       "(2 x student); full: fwd + bwd. gbps = bytes / median time",
    })
    record = {**env, "roofline": roof, "settings": settings, "backends": kdk.backends(),
              "skipped": skipped, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{slug(args.device + '-' + env['device'])}-{stamp}{'-quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
