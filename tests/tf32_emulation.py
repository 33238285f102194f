"""TF32 rounding in the Triton interpreter, so that the CPU tests judge the accuracy that
tensor-core products will have on a GPU. The interpreter computes every tl.dot as a float32
numpy matmul whatever its input_precision; with this patch "tf32" rounds both operands to TF32
(10 explicit mantissa bits, round to nearest, ties away: cvt.rna.tf32.f32) and "tf32x3" does
what Triton lowers it to on NVIDIA GPUs: a = a_big + a_small, both TF32, and
a_small b_big + a_big b_small + a_big b_big, each product of two TF32 values exact in float32 and
accumulated in float32."""

from __future__ import annotations

import numpy as np
from triton._C.libtriton import ir
from triton.runtime import interpreter

_ORIGINAL = interpreter.InterpreterBuilder.create_dot


def tf32(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    precise = (ir.INPUT_PRECISION.TF32, ir.INPUT_PRECISION.TF32x3)
    if input_precision not in precise or a.data.dtype != np.float32 or b.data.dtype != np.float32:
        return _ORIGINAL(self, a, b, d, input_precision, max_num_imprecise_acc)
    a_big, b_big = tf32(a.data), tf32(b.data)
    acc = d.data.astype(np.float32)
    if input_precision == ir.INPUT_PRECISION.TF32x3:
        a_small, b_small = tf32(a.data - a_big), tf32(b.data - b_big)
        acc = np.matmul(a_small, b_big, dtype=np.float32) + acc
        acc = np.matmul(a_big, b_small, dtype=np.float32) + acc
    acc = np.matmul(a_big, b_big, dtype=np.float32) + acc
    return interpreter.TensorHandle(acc, d.dtype.scalar)


def install() -> None:
    interpreter.InterpreterBuilder.create_dot = _create_dot
