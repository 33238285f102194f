"""pytest-benchmark collection of the bench cases (bench/test_benchmarks.py): pytest bench/.

Timing is opt-in, as pytest-benchmark users set it up when benchmarks sit beside a test suite:
`pytest bench/` runs every benchmark once as a smoke check (pytest-benchmark's
--benchmark-disable); `--benchmark-only` (or `--benchmark-enable`) times them.
"""

from __future__ import annotations

import pytest
import torch

from bench import cases as case_table
from bench import harness
from bench.runner import MODES, backend_labels


def pytest_addoption(parser):
    group = parser.getgroup("kdkernels bench")
    group.addoption("--bench-full", action="store_true",
                    help="the full (SPEC section 5) sizes instead of the --quick ones")
    group.addoption("--bench-dtype", choices=tuple(harness.DTYPES),
                    help="this dtype only (default: those of python -m bench)")


MISSING_PLUGIN = "pytest-benchmark is not installed: pip install pytest-benchmark (or pip install -e .[test])"


def _has_plugin(config) -> bool:
    return config.pluginmanager.hasplugin("benchmark")


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads these options.
    if not _has_plugin(config):
        return
    if not (config.getoption("benchmark_only") or config.getoption("benchmark_enable")):
        config.option.benchmark_disable = True


def pytest_report_header(config):
    return None if _has_plugin(config) else f"kdkernels bench: skipped, {MISSING_PLUGIN}"


def pytest_collection_modifyitems(config, items):
    if not _has_plugin(config):
        skip = pytest.mark.skip(reason=MISSING_PLUGIN)
        for item in items:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = metafunc.config.getoption("bench_dtype")
    dtypes = [chosen] if chosen else harness.default_dtypes(device)
    quick = not metafunc.config.getoption("bench_full")
    params, ids = [], []
    # Mode innermost: the modes of one (case, dtype, backend) share its inputs and compilation.
    for case in case_table.cases(device.type, quick):
        for dtype in dtypes:
            for backend in backend_labels(case, device):
                for mode in MODES:
                    params.append((case, device, dtype, backend, mode))
                    ids.append(f"{case.op}-{case.name}-{dtype}-{backend}-{mode}")
    metafunc.parametrize("bench_case", params, ids=ids)
