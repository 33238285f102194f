"""Compile every Triton kernel launch the test suite made for a GPU, on a machine without one.

The interpreter (TRITON_INTERPRET=1, how the suite runs Triton here) never compiles a kernel, so a
kernel that the compiler rejects passes every CPU test and fails on the first GPU. Three such
failures were first seen on a GPU: a float64 loop-carried tl.sum that Triton 3.6 rejects on
sm_90, an int argument equal to 1 (which Triton specializes into a constexpr) used as a tensor,
and float arguments typed float64 by torch.compile. So the suite records each distinct launch
(conftest.py, when KDK_TRITON_LAUNCHES names a file) and this script compiles them for sm_90 with
the installed Triton: with float arguments as float32 (Triton's JIT) and as float64 (inductor).

    KDK_TRITON_LAUNCHES=build/launches.jsonl pytest tests      # record (scripts/test.sh does)
    python tests/triton_compile_check.py build/launches.jsonl  # compile; exit 1 on a failure

It also checks that the kernels whose float32 products are meant for the tensor cores
(TENSOR_CORE_KERNELS, "tf32x3" dots) do use them: their PTX for float32 or 16-bit data holds mma
or wgmma instructions (their float64 launches multiply by FMA on purpose), as does every launch of
the kernels with float64 tensor-core products (FLOAT64_TENSOR_CORE_KERNELS), and that no launch spills
registers to local memory beyond SPILL_BUDGET_BYTES (spill stores + loads in the ptxas -v report
of the build itself), printing the largest spill per kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch dtype name -> Triton pointer element type
POINTEE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
           "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


# The kernels with float32 (or 16-bit) tl.dot tile products.
TENSOR_CORE_KERNELS = {"_la_attend_kernel", "_la_bwd_kernel", "_pr_kl_fwd_kernel", "_pr_kl_bwd_kernel",
                       "_cr_backward_kernel"}
# The kernels whose float64 products are tl.dot tiles of at least 16 x 16 x 16 (_common._mm): the
# relation Grams and the pixel-relation mse backward, float64 mma for every input dtype (float32
# mma for the steps computed from 16-bit inputs) where Triton has float64 dots (_common.F64_DOT).
FLOAT64_TENSOR_CORE_KERNELS = {"_cr_gram_kernel", "_pr_gram_kernel", "_pr_mse_bwd_kernel"}

# Spill stores + loads per launch, in bytes: a few words of spill are harmless, hundreds in a
# tile loop are not.
SPILL_BUDGET_BYTES = 64
# Known launches above it: kernel -> (the constexpr that marks them, their budget, why).
SPILL_EXCEPTIONS = {
    "_pr_kl_bwd_kernel": ("TWO_PASS", 2560,
                          "above 64 student channels: a [BLOCK_N, 128] gradient tile beside both "
                          "recomputed products (~2.3 kB); 64- or 32-channel blocks still spill "
                          "0.8-1.4 kB and add passes: to be tuned on a GPU"),
}

UNRECORDED_RUN = None  # the interpreter's own launch, before any recording wrapped it


def record_launches(path: str) -> None:
    """Append each distinct interpreted launch (kernel, argument kinds, constexpr values,
    num_warps/num_stages) to `path` as a JSON line."""
    global UNRECORDED_RUN
    import torch
    from triton.runtime import interpreter

    if UNRECORDED_RUN is None:
        UNRECORDED_RUN = interpreter.InterpretedFunction.run
    seen: set[str] = set()
    run = interpreter.InterpretedFunction.run

    def kind(v):
        if isinstance(v, torch.Tensor):
            return ["tensor", str(v.dtype).removeprefix("torch.")]
        if isinstance(v, (bool, int, float)) or v is None:
            return [type(v).__name__, v]
        return ["repr", repr(v)]

    def recording_run(self, *args, grid, warmup, **kwargs):
        values = dict(zip(self.arg_names, args))
        values.update((k, v) for k, v in kwargs.items() if k in self.arg_names)
        line = json.dumps({"module": self.fn.__module__, "name": self.fn.__name__,
                           "options": {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs},
                           "args": {k: kind(v) for k, v in values.items()}}, sort_keys=True)
        if line not in seen:
            seen.add(line)
            with open(path, "a") as f:
                f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run


def _signature(fn, args: dict, float_type: str) -> tuple[dict, dict]:
    """(signature, constexprs) of a launch as Triton's JIT specializes it."""
    import triton.language as tl

    sig, consts = {}, {}
    for p in fn.params:
        kind = args.get(p.name)
        if kind is None:  # left to its default
            sig[p.name] = "constexpr"
            consts[p.name] = p.default
        elif p.is_constexpr:
            value = kind[1] if len(kind) > 1 else None
            if kind[0] == "repr":  # a tl.dtype such as triton.language.float32
                value = getattr(tl, value.rsplit(".", 1)[-1])
            sig[p.name], consts[p.name] = "constexpr", value
        elif kind[0] == "tensor":
            sig[p.name] = "*" + POINTEE[kind[1]]
        elif kind[0] == "int" and kind[1] == 1 and not p.do_not_specialize:
            sig[p.name], consts[p.name] = "constexpr", 1  # the JIT's specialization of 1
        elif kind[0] == "int":
            sig[p.name] = "i64" if not -2**31 <= kind[1] < 2**31 else "i32"
        elif kind[0] == "float":
            sig[p.name] = float_type
        elif kind[0] == "bool":
            sig[p.name] = "i1"
        elif kind[0] == "NoneType":
            sig[p.name], consts[p.name] = "constexpr", None
        else:
            raise ValueError(f"{fn.__name__}: argument {p.name} of unsupported kind {kind}")
    return sig, consts


def _worker_init() -> None:
    """Every launch compiled afresh with Triton's ptxas report printed (to read its spills from
    the ptxas that builds the kernel), and no compiler dumps: a rejected kernel makes the compiler
    dump its MLIR to stderr; the one-line reports suffice, so the workers (not this process: its
    own errors stay visible) write it nowhere."""
    import triton

    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def spill_bytes(ptxas_log: str) -> int:
    """Spill stores + loads in a ptxas -v report (the largest over its functions)."""
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    return max((int(a) + int(b) for a, b in found), default=0)


def compile_one(job: tuple[dict, str, int]) -> tuple[str | None, str, int]:
    """(None if the launch compiles within the checks, else a one-line description of the
    failure; the kernel's name; its spill bytes)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch, float_type, arch = job
    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    sig, consts = _signature(fn, launch["args"], float_type)
    typed = ", ".join(f"{k}={consts[k]}" if k in consts else f"{k}: {v}" for k, v in sig.items())
    log = io.StringIO()  # Triton prints its ptxas -v report here (dump_ptxas_log, _worker_init)
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", arch, 32),
                                      options=launch["options"])
    except Exception as exc:  # noqa: BLE001 (every compiler error is a finding)
        lines = [s for s in str(exc).splitlines() if s.strip()]
        why = next((s for s in reversed(lines) if "error" in s.lower()), lines[-1] if lines else "")
        return (f"{launch['name']}({typed}) [floats {float_type}]: {type(exc).__name__}: {why.strip()[:300]}",
                launch["name"], 0)
    fp64 = any(kind[:2] == ["tensor", "float64"] for kind in launch["args"].values())
    from kdkernels.triton._common import F64_DOT  # float64 dots: Triton 3.5 and later

    expect_mma = ((launch["name"] in FLOAT64_TENSOR_CORE_KERNELS and F64_DOT)
                  or (launch["name"] in TENSOR_CORE_KERNELS and not fp64))
    if expect_mma and "mma" not in compiled.asm["ptx"]:
        return (f"{launch['name']}({typed}): no mma / wgmma instruction in its PTX (expected tensor-core "
                "products)", launch["name"], 0)
    spilled = spill_bytes(log.getvalue())
    budget = SPILL_BUDGET_BYTES
    marker, allowed, _ = SPILL_EXCEPTIONS.get(launch["name"], (None, budget, ""))
    if marker is not None and consts.get(marker):
        budget = allowed
    if spilled > budget:
        return (f"{launch['name']}({typed}): {spilled} bytes of register spills (budget {budget})",
                launch["name"], spilled)
    return None, launch["name"], spilled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("launches", type=Path, help="the JSON lines the suite recorded")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    launches = [json.loads(line) for line in args.launches.read_text().splitlines()]
    # float arguments as the JIT passes them, and as torch.compile (inductor) does
    jobs = [(launch, "fp32", args.arch) for launch in launches]
    jobs += [(launch, "fp64", args.arch) for launch in launches
             if any(kind[0] == "float" for kind in launch["args"].values())]
    with ProcessPoolExecutor(args.jobs, initializer=_worker_init) as pool:
        results = list(pool.map(compile_one, jobs, chunksize=8))
    failures = [f for f, _, _ in results if f]
    spills: dict[str, int] = {}
    for _, name, spilled in results:
        spills[name] = max(spills.get(name, 0), spilled)
    import triton

    print(f"triton_compile_check: Triton {triton.__version__}, sm_{args.arch}: {len(jobs)} launches "
          f"({len(launches)} recorded), {len(failures)} failed the checks")
    print("  largest spill per kernel (bytes): "
          + ", ".join(f"{name} {n}" for name, n in sorted(spills.items(), key=lambda kv: -kv[1])))
    for failure in failures:
        print("  " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
