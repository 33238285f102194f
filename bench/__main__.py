"""python -m bench: time kdkernels ops against eager PyTorch and torch.compile.

Prints a table and writes a JSON record to bench/results/<device-slug>-<UTC date-time>.json and
PNG plots beside it (bench/plots.py; --sweep: pixel_relation_loss against N).
See bench/README.md for the columns, the bytes and flops models and how out-of-memory is decided.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

import kdkernels as kdk
from bench import cases as case_table
from bench import harness, overhead, plots, sweep
from bench.runner import MEM_BUDGET_GB, MODES, log, run_case
from bench.tables import format_table

OOM_METHOD = {
    "cpu": "a backend whose predicted peak memory (bench/cases.py: N x N matrices of the eager "
           "reference) exceeds --mem-budget-gb is not run; its rows have oom set",
    "cuda": "torch.OutOfMemoryError caught while a backend warms up; its rows have oom set",
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (B=1), few repeats")
    ap.add_argument("--sweep", action="store_true",
                    help=f"instead of the cases: {sweep.OP} fwd+bwd time and memory against N")
    ap.add_argument("--ops", help="comma-separated ops (default: all with cases: "
                                  f"{', '.join(case_table.known_ops())})")
    ap.add_argument("--cases", help="comma-separated case names to keep (e.g. acceptance_b8)")
    ap.add_argument("--device", choices=("cpu", "cuda"),
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(harness.DTYPES),
                    help="run this dtype only (default: float32 and bfloat16, or float16 where "
                         "the device has no bfloat16; --sweep: float32)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed samples per backend and mode (default 10, 5 with --quick, "
                         "3 with --sweep)")
    ap.add_argument("--mem-budget-gb", type=float, default=MEM_BUDGET_GB,
                    help="CPU: backends predicted to need more memory than this are not run "
                         "and reported as out of memory (default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="results directory (default: bench/results)")
    ap.add_argument("--threads", help="comma-separated CPU thread counts, each case run under "
                                      "each in turn (default: torch's current count)")
    ap.add_argument("--overhead", action="store_true",
                    help="instead of the cases: host microseconds and kernels per fwd+bwd call "
                         "at a tiny shape, beside F.mse_loss (bench/overhead.py)")
    args = ap.parse_args(argv)
    try:
        args.threads = [int(t) for t in args.threads.split(",")] if args.threads else []
    except ValueError:
        ap.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    if any(t < 1 for t in args.threads):
        ap.error("--threads: each count must be >= 1")
    if args.overhead and (args.sweep or args.quick or args.cases):
        ap.error("--overhead runs alone (its shape is fixed): leave out --sweep, --quick, --cases")
    if args.sweep and args.ops:
        ap.error(f"--sweep always runs {sweep.OP}; leave out --ops")
    args.ops = [op.strip() for op in (args.ops or "").split(",") if op.strip()]
    args.cases = [c.strip() for c in (args.cases or "").split(",") if c.strip()]
    unknown = sorted(set(args.ops) - set(case_table.known_ops()))
    if unknown:
        known = ", ".join(case_table.known_ops())
        ap.error(f"no cases for op(s) {', '.join(unknown)}; known: {known}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.repeats is None:
        args.repeats = 3 if args.sweep else (5 if args.quick else 10)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.dtype:
        args.dtypes = [args.dtype]
    elif args.sweep:  # a scaling study against N: one dtype keeps its minutes in check
        args.dtypes = ["float32"]
    else:
        args.dtypes = harness.default_dtypes(torch.device(args.device))
    return args


def add_derived(rows: list[dict], roof: dict) -> None:
    """GB/s (or TFLOP/s for rows with a flops model), % of the copy (or float32 matmul)
    roofline, and speedups against torch / compile of the same case+mode."""
    by_key = {(r["op"], r["case"], r["dtype"], r["mode"], r["backend"]): r for r in rows}
    for r in rows:
        secs = r["median_ms"] / 1e3 if r["median_ms"] else None  # None: out of memory
        if "flops" in r:
            r["tflops"] = r["flops"] / secs / 1e12 if secs else None
            r["pct_roofline"] = 100 * r["tflops"] / roof["matmul_tflops"] if secs else None
        else:
            r["gbps"] = r["bytes"] / secs / 1e9 if secs else None
            r["pct_roofline"] = 100 * r["gbps"] / roof["copy_gbps"] if secs else None
        graph_s = r["graph_ms"] / 1e3 if r.get("graph_ms") else None
        if graph_s and "flops" not in r:  # the graph-replay time against the copy roofline
            r["graph_pct_roofline"] = 100 * r["bytes"] / graph_s / 1e9 / roof["copy_gbps"]
        for base in ("torch", "compile"):
            ref = by_key.get((r["op"], r["case"], r["dtype"], r["mode"], base))
            ok = secs and ref and ref["median_ms"]
            r[f"speedup_vs_{base}"] = ref["median_ms"] / r["median_ms"] if ok else None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run_settings(args, device: torch.device, modes) -> dict:
    on_cuda = device.type == "cuda"
    # The CPU sweep's eager calls last seconds: one warm-up call.
    warmup = 1 if args.sweep and not on_cuda else harness.WARMUP_CALLS[device.type]
    return {"quick": args.quick, "sweep": args.sweep, "dtypes": args.dtypes,
            "repeats": args.repeats, "warmup": warmup,
            "min_sample_s": 0.002 if args.quick else (0.005 if on_cuda else 0.01),
            "threads": args.threads or torch.get_num_threads(), "modes": list(modes),
            "mem_budget_gb": args.mem_budget_gb if device.type == "cpu" else None}


def bench_rows(args, device: torch.device, case_list: list, settings: dict,
               rows: list, skipped: list) -> None:
    """Run every case in every dtype, appending its rows (without the derived columns) and
    skipped backends as each case finishes, so that an interrupted run keeps the finished ones."""
    modes, warmup, min_sample_s = settings["modes"], settings["warmup"], settings["min_sample_s"]
    mem_budget = args.mem_budget_gb * 1e9
    thread_counts = args.threads or [torch.get_num_threads()]
    for case in case_list:
        shape = {k: list(v) for k, v in case.shapes.items()}
        for threads in thread_counts:
            torch.set_num_threads(threads)
            # With several thread counts each gets its own case label, so that every table,
            # plot and speedup compares backends within one thread count.
            label = case.name if len(thread_counts) == 1 else f"{case.name}@{threads}t"
            for dtype_name in args.dtypes:
                dtype = harness.DTYPES[dtype_name]
                log(f"{case.op} / {label} / {dtype_name}: {case.shapes} {case.kwargs}")
                case_rows, case_skipped = run_case(case, device, dtype, args.repeats, warmup,
                                                   min_sample_s, modes, mem_budget)
                work_key, work = case.work(dtype)
                for r in case_rows:
                    backend, mode = r.pop("backend"), r.pop("mode")
                    rows.append({"op": case.op, "case": label, "backend": backend,
                                 "dtype": dtype_name, "shape": shape, "kwargs": case.kwargs,
                                 "threads": threads, "mode": mode, work_key: work[mode], **r})
                skipped += [{**s, "dtype": dtype_name} for s in case_skipped]


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def write_overhead(args, device: torch.device, env: dict, load_start) -> int:
    """--overhead: the table, and a JSON record <device-slug>-<stamp>-overhead.json."""
    rows = overhead.overhead_rows(device, ops=args.ops or None)
    print(overhead.format_rows(rows))
    settings = {"shape": overhead.SHAPE_NOTE, "threads": 1, "timing": overhead.TIMING_NOTE,
                "kernels": overhead.COUNT_NOTE,
                "loadavg_1_5_15min": {"start": load_start, "end": os.getloadavg()}}
    record = {**env, "settings": settings, "backends": kdk.backends(), "overhead": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"{slug(args.device + '-' + env['device'])}-{stamp}-overhead.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    env = harness.environment(device)
    load_start = os.getloadavg()
    if args.overhead:
        return write_overhead(args, device, env, load_start)
    log(f"kdkernels bench on {env['device']} ({args.device}, {', '.join(args.dtypes)}, torch "
        f"{env['torch']}, {torch.get_num_threads()} threads){' --quick' if args.quick else ''}")
    roof = harness.roofline(device, args.quick)
    log(f"copy roofline: {roof['copy_gbps']:.1f} GB/s; float32 matmul roofline "
        f"({roof['matmul_n']}^2): {roof['matmul_tflops']:.3f} TFLOP/s"
        + (f", bfloat16 {roof['matmul_tflops_bf16']:.1f}" if "matmul_tflops_bf16" in roof else ""))

    if args.sweep:
        case_list, note = sweep.sweep_cases(device.type, args.quick)
        log(note)
        modes = ("full",)
    else:
        case_list = [c for c in case_table.cases(device.type, args.quick, args.ops)
                     if not args.cases or c.name in args.cases]
        modes = MODES
    settings = run_settings(args, device, modes)
    rows, skipped = [], []
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` stops a run with SIGTERM: keep what finished
    try:
        bench_rows(args, device, case_list, settings, rows, skipped)
    except KeyboardInterrupt:
        settings["interrupted"] = True
        log(f"interrupted: writing the {len({(r['case'], r['dtype']) for r in rows})} case/dtype "
            "runs that finished")
    if args.sweep:
        for r in rows:
            r["sweep"] = True
        settings["sweep_note"] = note
    add_derived(rows, roof)
    print(format_table(rows))
    if args.sweep:
        print(note)

    settings.update({
        "loadavg_1_5_15min": {"start": load_start, "end": os.getloadavg()},
        "timing": harness.TIMING_METHOD[device.type],
        "peak_memory": harness.MEMORY_METHOD[device.type],
        "out_of_memory": OOM_METHOD[device.type],
        "bytes_model": "fwd: student + teacher read once; bwd: student read + gradient written "
                       "(2 x student; pixel_relation mse: + teacher); full: fwd + bwd. "
                       "gbps = bytes / median time, % of copy_gbps",
        "flops_model": "pixel_relation kl: matrix-product flops of the tiled route, fwd "
                       "2 B N^2 (Cs + Ct), bwd fwd + 2 B N^2 Cs; logit_attention: fwd "
                       "8 B K H^2 W (scores and P X of student and teacher), bwd 8 B K H^2 W "
                       "(the attention backward's four products, recomputation not counted); "
                       "tflops = flops / median time, % of matmul_tflops (float32)",
        "peers": "other libraries' kernels for the same math (bench/peers.py), inputs "
                 "permuted to their layout inside the timed call",
    })
    record = {**env, "roofline": roof, "settings": settings, "backends": kdk.backends(),
              "skipped": skipped, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{slug(args.device + '-' + env['device'])}-{stamp}{'-quick' if args.quick else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {args.out / stem}.json")
    try:
        for path in plots.draw(record, args.out / stem):
            log(f"wrote {path}")
    except ImportError as exc:  # the record is written; `python -m bench.plots` can draw it later
        log(f"no plots: {exc} (pip install matplotlib, then python -m bench.plots "
            f"{args.out / stem}.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
