"""bench/: its cases cover every op, a --quick record has the issue's schema in float32 and bfloat16
with its plots beside it, and pytest collects the same cases as pytest-benchmark benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdkernels as kdk
from bench import cases as case_table
from bench import harness, plots
from bench.__main__ import main
from bench.runner import MODES, backend_labels

ROOT = Path(__file__).resolve().parents[1]
OPS = kdk.backends()["torch"]["ops"]  # the eager reference has every public op


def test_cases_cover_every_op():
    assert sorted(case_table.known_ops()) == sorted(OPS)
    for device in ("cpu", "cuda"):
        for quick in (False, True):
            assert {c.op for c in case_table.cases(device, quick)} == set(OPS)


def test_quick_record_schema_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    argv = ["--quick", "--device", "cpu", "--ops", "sgm_loss", "--cases", "kdas", "--repeats", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert {"device", "date", "commit", "torch", "triton"} <= set(record)
    assert record["settings"]["dtypes"] == ["float32", "bfloat16"]
    rows, memory = record["results"], harness.cpu_memory_supported()
    backends = {"torch", "compile", "cpu"}
    assert {(r["backend"], r["dtype"], r["mode"]) for r in rows} == {
        (b, d, m) for b in backends for d in ("float32", "bfloat16") for m in MODES}
    for r in rows:
        assert r["op"] == "sgm_loss" and r["shape"] == {"student": [1, 1, 64, 64],
                                                         "teacher": [1, 1, 64, 64]}
        assert r["median_ms"] > 0 and r["gbps"] > 0 and "tflops" not in r
        assert r["peak_mem_mb"] >= 0 if memory else r["peak_mem_mb"] is None
        # The work model of the row's own dtype: fwd reads both maps, bwd the student and its
        # gradient, full both.
        itemsize = 2 if r["dtype"] == "bfloat16" else 4
        assert r["bytes"] == {"fwd": 2, "bwd": 2, "full": 4}[r["mode"]] * 64 * 64 * itemsize
        if r["backend"] == "torch":
            assert r["speedup_vs_torch"] == 1.0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"{path.stem}-memory.png", f"{path.stem}-speedup.png"]
    for png in tmp_path.glob("*.png"):
        png.unlink()
    assert plots.main([str(path)]) == 0  # redrawn from the record alone
    assert sorted(p.name for p in tmp_path.glob("*.png")) == pngs


def test_pytest_collects_the_bench_cases():
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    ids = [line.split("[", 1)[1].rstrip("]") for line in out.stdout.splitlines()
           if line.startswith("bench/test_benchmarks.py::test_case[")]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = [f"{c.op}-{c.name}-{d}-{b}-{m}" for c in case_table.cases(device.type, quick=True)
                for d in harness.default_dtypes(device) for b in backend_labels(c, device)
                for m in MODES]
    assert ids == expected


def test_bench_without_pytest_benchmark_skips_with_one_clear_reason():
    """Without the plugin (-p no:benchmark stands in for it not being installed) pytest bench/
    skips every case and says how to install it, instead of an INTERNALERROR."""
    out = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-rs", "-p", "no:benchmark",
                          "-p", "no:cacheprovider", "-k", "sgm_loss and float32 and fwd"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "INTERNALERROR" not in out.stdout + out.stderr
    assert "skipped" in out.stdout and "passed" not in out.stdout
    assert "pip install pytest-benchmark" in out.stdout


def test_overhead_counts_kernels_and_times_the_host(tmp_path):
    """python -m bench --overhead writes a record with a row per (op, backend); the cpu rows
    are timed beside F.mse_loss, and every row's kernels are counted (at least one)."""
    assert main(["--overhead", "--device", "cpu", "--ops", "sgm_loss,pixel_kl_loss",
                 "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*-overhead.json")
    record = json.loads(path.read_text())
    rows = {(r["op"], r["backend"]): r for r in record["overhead"]}
    assert {op for op, _ in rows} == {"sgm_loss", "pixel_kl_loss"}
    assert all(r["kernels"] >= 1 for r in rows.values())
    if kdk.backends()["cpu"]["available"]:
        cpu = rows["sgm_loss", "cpu"]
        assert cpu["host_us"] > 0 and cpu["mse_us"] > 0 and cpu["ratio_to_mse"] > 0
        assert cpu["kernel_names"][0] == "kdkernels::sgm"
    assert record["settings"]["threads"] == 1 and "loadavg_1_5_15min" in record["settings"]


def test_graph_replay_timing_off_the_gpu_and_table_columns():
    """CUDA-graph replay timing says why there is none off the GPU; the table shows its columns
    only for rows that have them."""
    from bench import harness, tables

    assert harness.graph_time_per_call(lambda: None, 3, torch.device("cpu")) == (
        None, "no CUDA graphs off the GPU")
    row = {"op": "sgm_loss", "case": "c", "backend": "cuda", "dtype": "float32", "mode": "full",
           "median_ms": 0.5, "oom": None}
    assert "graph ms" not in tables.format_table([row])
    table = tables.format_table([{**row, "graph_ms": 0.125, "graph_pct_roofline": 61.0}])
    assert "graph ms" in table and "0.125" in table and "61.0" in table
