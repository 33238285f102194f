"""The tables of a bench record: the console table of every row that `python -m bench` prints, and
the Markdown summary (fwd+bwd) that bench/README.md shows: python -m bench.tables RECORD.json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = [  # header, row key, format
    ("op", "op", "{}"), ("case", "case", "{}"), ("backend", "backend", "{}"),
    ("dtype", "dtype", "{}"), ("mode", "mode", "{}"), ("median ms", "median_ms", "{:.3f}"),
    ("graph ms", "graph_ms", "{:.3f}"), ("graph % roof", "graph_pct_roofline", "{:.1f}"),
    ("peak MB", "peak_mem_mb", "{:.1f}"), ("GB/s", "gbps", "{:.1f}"),
    ("TFLOP/s", "tflops", "{:.3f}"), ("% roof", "pct_roofline", "{:.1f}"),
    ("x torch", "speedup_vs_torch", "{:.2f}"), ("x compile", "speedup_vs_compile", "{:.2f}"),
]
EAGER = ("torch", "compile")  # the baselines every other backend is compared with


def format_table(rows: list[dict]) -> str:
    # The CUDA-graph columns only where a row has them (GPU records).
    columns = [c for c in COLUMNS if not c[1].startswith("graph_") or any(r.get(c[1]) for r in rows)]
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append(["oom" if k == "median_ms" and r["oom"] else
                      "-" if r.get(k) is None else fmt.format(r[k]) for _, k, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    text_cols = 5  # left-aligned; the numbers are right-aligned
    lines = ["  ".join(c.ljust(w) if i < text_cols else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def layout(rows: list[dict], mode: str) -> tuple[list, list, list, dict]:
    """(op, case) groups, dtypes and backends in run order (torch and compile first), and the rows
    of `mode` by (op, case, dtype, backend)."""
    picked = [r for r in rows if r["mode"] == mode]
    groups = list(dict.fromkeys((r["op"], r["case"]) for r in picked))
    dtypes = list(dict.fromkeys(r["dtype"] for r in picked))
    found = dict.fromkeys(r["backend"] for r in picked)
    backends = [b for b in EAGER if b in found] + [b for b in found if b not in EAGER]
    cells = {(r["op"], r["case"], r["dtype"], r["backend"]): r for r in picked}
    return groups, dtypes, backends, cells


def _num(value, fmt: str, row: dict | None) -> str:
    if row is None:
        return ""
    if row["oom"]:
        return "oom"
    return "-" if value is None else fmt.format(value)


def markdown_summary(rows: list[dict], mode: str = "full") -> str:
    """One line per (op, case, dtype): the time of every backend, the speedups of every backend
    but torch over torch and compile, and the peak memory of every backend."""
    groups, dtypes, backends, cells = layout(rows, mode)
    others = [b for b in backends if b != "torch"]
    header = (["op", "case", "dtype"] + [f"{b} ms" for b in backends]
              + [f"{b} x torch / x compile" if b != "compile" else "compile x torch"
                 for b in others]
              + ["peak MB " + " / ".join(backends)])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * 3 + " ---: |" * (len(header) - 3)]
    for op, case in groups:
        for dtype in dtypes:
            row = {b: cells.get((op, case, dtype, b)) for b in backends}
            if not any(row.values()):
                continue
            times = [_num(r and r["median_ms"], "{:.3f}", r) for r in row.values()]
            speedups = []
            for b in others:
                r = row[b]
                vs = [_num(r and r["speedup_vs_torch"], "{:.2f}", r)]
                if b != "compile":
                    vs.append(_num(r and r["speedup_vs_compile"], "{:.2f}", r))
                speedups.append(" / ".join(vs) if r else "")
            peaks = " / ".join(_num(r and r["peak_mem_mb"], "{:.1f}", r) or "n/a"
                               for r in row.values())
            lines.append("| " + " | ".join([op, case, dtype, *times, *speedups, peaks]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__)
    ap.add_argument("records", nargs="+", type=Path, help="JSON records written by python -m bench")
    ap.add_argument("--mode", choices=("fwd", "bwd", "full"), default="full")
    args = ap.parse_args(argv)
    for path in args.records:
        record = json.loads(path.read_text())
        print(f"{path.name}: {record['device']}, commit {record['commit'][:10]}\n")
        print(markdown_summary(record["results"], args.mode) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
