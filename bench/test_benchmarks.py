"""The cases of bench/cases.py as pytest-benchmark benchmarks, one per case x dtype x backend x
mode (the same list, backends and modes as `python -m bench`; parametrized in bench/conftest.py):

    pytest bench/ --benchmark-only                  # time them (quick sizes)
    pytest bench/ --benchmark-only --bench-full     # SPEC section 5 sizes
    pytest bench/                                   # each once: a smoke check
"""

from __future__ import annotations

import pytest
import torch

from bench import harness
from bench.runner import MEM_BUDGET_GB, implementation, mode_steps

_prepared = {}  # the current (case, dtype, backend) -> (callable, inputs), shared by its modes


def _prepare(case, device, dtype: str, backend: str):
    key = (case.op, case.name, dtype, backend)
    if key not in _prepared:
        _prepared.clear()
        try:
            call = implementation(case, backend)
        except ImportError as exc:  # a peer whose library is missing
            pytest.skip(str(exc))
        _prepared[key] = call, case.inputs(device, harness.DTYPES[dtype])
    return _prepared[key]


def test_case(benchmark, bench_case):
    case, device, dtype, backend, mode = bench_case
    need = case.predicted_memory(backend, (mode,))
    if device.type == "cpu" and need and need > MEM_BUDGET_GB * 1e9:
        pytest.skip(f"predicted {need / 1e9:.3g} GB > {MEM_BUDGET_GB:g} GB: not run")
    call, args = _prepare(case, device, dtype, backend)
    work_key, work = case.work(harness.DTYPES[dtype])
    benchmark.group = f"{case.op} {case.name} {dtype} {mode}"  # the backends side by side
    benchmark.extra_info.update(op=case.op, case=case.name, backend=backend, dtype=dtype,
                                mode=mode, shape={k: list(v) for k, v in case.shapes.items()},
                                kwargs=case.kwargs, **{work_key: work[mode]})
    try:
        step = mode_steps(call, args, (mode,))[mode]

        def timed():
            out = step()
            harness.sync(device)  # CUDA: the kernels' time, not their launch
            return out

        if not benchmark.disabled:  # compilation, autotuning and allocator growth happen here
            for _ in range(harness.WARMUP_CALLS[device.type]):
                timed()
        out = benchmark(timed)
    except torch.OutOfMemoryError:
        pytest.skip("out of memory")
    tensors = out if isinstance(out, tuple) else (out,)
    assert all(bool(torch.isfinite(t).all()) for t in tensors)
