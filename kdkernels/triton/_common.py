"""Helpers shared by the Triton kernel modules: device functions, layout probes, op registration.

Device helpers (@triton.jit): _div (round-to-nearest division), _inv_norm (1 / max(n, eps)),
_log1p_minus_x (log(1 + v) - v without cancellation, for the near-teacher KLs),
_cast_for (rounding conversion for a store), _pixel_offsets (element offsets of flat pixel
indices through the H/W strides), _mm (a tile matrix product in the accumulation type, see its
docstring for the precision per dtype), _fma_mm (its float64 FMA form), _mm_from16 (its
float64 form for operands that are or come from 16-bit loads), _f64 (a float64 parameter passed
as bits), _fixed_sum.
Kernels: _finish_kernel (a loss as the fixed-order sum of partials), _scale_kernel (a unit
gradient times the upstream gradient).
Host helpers: _acc_dtype, _flat, _strides, _bits, _pow2, _batch_chunks (the launches of a batch
too long for one grid axis), _finish, _scaled, _launch, and fused_loss, which registers a loss
(triton_op on the GPU, custom_op under TRITON_INTERPRET=1) and its eager autograd.Function.

No op calls torch for arithmetic around its kernels: parameters travel as kernel arguments (not
as device scalars, which cost a fill kernel each), the last reductions are kernels of their own,
and the upstream gradient is read by the backward kernel from device memory (no host sync).
"""

from __future__ import annotations

import inspect
import os
import struct
import threading
from contextlib import contextmanager

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# L2-normalisation epsilon (F.normalize's default). Use it through _eps_like: a bare constexpr
# float meets a float64 tensor as float32 1e-12 (9.9999998e-13), off by 2e-8 where eps decides.
_EPS = tl.constexpr(1e-12)

# Precision of float32 x float32 tl.dot products (pixel-relation KL tiles, logit attention, the
# relation backward products): "tf32x3", three TF32 tensor-core products (a = a_big + a_small;
# a_small b_big + a_big b_small + a_big b_big, ~2^-21 relative error per product, fp32
# accumulation; TF32 needs sm_80 or later: on older GPUs set KDKERNELS_DOT_PRECISION=ieee for fp32
# FMA). Plain "tf32" (10-bit mantissa) is never used: near the teacher S_s - S_t is tiny and it
# swamps it (88 of 150 relation and logit-attention tests fail with it). Under TRITON_INTERPRET=1
# the tests round tl.dot operands as the tensor cores do (tests/tf32_emulation.py): with "tf32x3"
# every one of them passes at the float32 tolerances. The relation Grams stay float64 (on the
# float64 tensor cores, see _mm): tf32x3 there comes within eager float32's error by as little as
# 10% near the teacher (docs/ops/channel_relation_loss.md).
_DOT_PRECISION = tl.constexpr(os.environ.get("KDKERNELS_DOT_PRECISION", "tf32x3"))


# Float64 tl.dot (lowered to the float64 tensor cores from sm_80) exists from Triton 3.5; earlier
# releases reject it, and there float64 tiles multiply by FMA (_mm) in the FMA-sized tiles the
# kernels choose from F64_DOT.
F64_DOT = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 5)
_F64_DOT = tl.constexpr(F64_DOT)


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


@triton.jit
def _div(x, y):
    """x / y rounded to nearest (Triton's fp32 '/' is approximate on the GPU).

    y may be a float or an int, tensor or constexpr (the JIT turns int arguments equal to 1
    into constexprs), hence the promotions by arithmetic rather than .to().
    """
    if x.dtype.is_fp64():
        r = x / y
    else:
        r = tl.math.div_rn(x, y * 1.0)
    return r


# Running under TRITON_INTERPRET=1, whose bfloat16 support has gaps (see _mm and _cast_for).
_INTERPRETED = tl.constexpr(_interpreted(_div))


@triton.jit
def _eps_like(n):
    """eps built exactly in n's type and shape."""
    return tl.full(n.shape, _EPS, n.dtype)


@triton.jit
def _inv_norm(n):
    """1 / max(n, eps): the L2-normalisation scale of a vector of norm n (n in ACC)."""
    return _div(tl.full(n.shape, 1.0, n.dtype), tl.maximum(n, _eps_like(n)))


@triton.jit
def _cast_for(x, ptr):
    """x (float32 or float64) converted to ptr's element type, rounding to nearest even.

    Narrowing to 16 bits goes through float32: the interpreter mistranslates a direct float64 ->
    bfloat16 cast, and it truncates float32 -> bfloat16, so there the rounding is done on the
    bits (the GPU's cvt rounds to nearest even itself).
    """
    ty: tl.constexpr = ptr.dtype.element_ty
    if ty.is_fp64():
        r = x.to(tl.float64)
    elif ty.is_fp32():
        r = x.to(tl.float32)
    elif ty.is_bf16():
        if _INTERPRETED:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            r = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            r = x.to(tl.float32).to(ty)
    else:
        r = x.to(tl.float32).to(ty)
    return r


@triton.jit
def _pixel_offsets(n, W, sH, sW, sN, FLAT: tl.constexpr):
    """Element offsets (int64) of flat pixel indices n of an H x W plane."""
    if FLAT:  # the plane is one strided run (sH == W * sW, or H == 1, or W == 1)
        off = n.to(tl.int64) * sN
    else:
        off = (n // W).to(tl.int64) * sH + (n % W).to(tl.int64) * sW
    return off


@triton.jit
def _fma_mm(a, b, acc):
    """acc + a @ b in float64 by FMA: a broadcast product reduced over K."""
    return acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)


@triton.jit
def _mm(a, b, acc):
    """acc + a @ b for tiles a [M, K], b [K, N] and an accumulator acc [M, N].

    * acc float64, M, N and K all at least 16 (and Triton 3.5 or later, F64_DOT): tl.dot in
      float64, which Triton lowers to the float64 tensor-core mma (mma.sync .f64, sm_80 and
      later: IEEE float64 products and sums, tests/triton_compile_check.py checks the PTX) and
      to FMA before sm_80.
    * acc float64 otherwise: FMA, as a broadcast product reduced over K; keep M * K * N small
      (a few thousand).
    * acc float32, a and b float32 (or wider): tl.dot with _DOT_PRECISION ("tf32x3").
    * acc float32, a float16/bfloat16 (b of the same type): tl.dot on the tensor cores in that
      type; the products of 16-bit floats are exact in fp32 and the accumulation is fp32.
    M, N and K are powers of two, at least 16 for the tl.dot paths. (The interpreter stores
    bfloat16 as raw uint16 and its tl.dot would multiply the bit patterns: there bfloat16 tiles
    are widened to fp32 first.)
    """
    # (Nested ifs, no chained and/or: older Triton front ends reject those.)
    if acc.dtype.is_fp64():
        DOT: tl.constexpr = (a.shape[0] >= 16) & (a.shape[1] >= 16) & (b.shape[1] >= 16)
        if DOT:
            if _F64_DOT:
                r = tl.dot(a.to(tl.float64), b.to(tl.float64), acc, out_dtype=tl.float64)
            else:
                r = _fma_mm(a, b, acc)
        else:
            r = _fma_mm(a, b, acc)
    elif a.dtype.is_fp16():
        r = tl.dot(a, b.to(tl.float16), acc)
    elif a.dtype.is_bf16():
        if _INTERPRETED:
            r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=_DOT_PRECISION)
        else:
            r = tl.dot(a, b.to(tl.bfloat16), acc)
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=_DOT_PRECISION)
    return r


@triton.jit
def _mm_from16(a, b, acc, FROM16: tl.constexpr):
    """_mm(a, b, acc) for a float64 accumulator, where FROM16 says that a and b are, or are
    computed from, 16-bit loads: Triton (3.6 and 3.8 checked) cannot lower a float64 tensor-core
    dot whose operands it traces back to 16-bit loads (an assertion in its MMAv2 lowering), so
    with F64_DOT that step is a float32 _mm added in float64: 16-bit a and b multiply exactly in
    their own type; computed ones as "tf32x3" products of their float32 roundings (good to
    ~2^-22, far below the 2^-9 .. 2^-12 rounding of the 16-bit inputs themselves)."""
    if FROM16:
        if _F64_DOT:
            r = acc + _mm(a, b, tl.zeros(acc.shape, dtype=tl.float32)).to(tl.float64)
        else:
            r = _mm(a, b, acc)
    else:
        r = _mm(a, b, acc)
    return r


# --- host side ------------------------------------------------------------------------------


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _flat(x: torch.Tensor) -> tuple[bool, int]:
    """Whether x's H x W plane is one strided run, and that run's stride."""
    H, W = x.shape[2], x.shape[3]
    sH, sW = x.stride(2), x.stride(3)
    if H == 1:
        return True, sW
    if W == 1:
        return True, sH
    if sH == W * sW:
        return True, sW
    return False, sW


def _strides(x: torch.Tensor) -> tuple:
    """(sB, sC, sH, sW, sN, FLAT) of a (B, C, H, W) tensor for the kernels' pixel addressing."""
    flat, s_n = _flat(x)
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3), s_n, flat


def _bits(value: float) -> int:
    """A float parameter as the int64 bit pattern of its float64 value, for _f64 in a kernel:
    Triton passes a Python float as float32 (too coarse for float64 inputs), and a device tensor
    would cost a fill kernel per call. Positive normal floats have patterns >= 2^52, which Triton
    types as int64 (whether the pattern divides by 16 is all it specialises on: two variants)."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def _f64(bits):
    """The float64 value whose bit pattern _bits passed."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _fixed_sum(ptr, n, BLOCK: tl.constexpr):
    """sum of ptr[0:n] in ptr's type, in an order fixed by n and BLOCK (deterministic)."""
    acc = tl.zeros([BLOCK], dtype=ptr.dtype.element_ty)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + i, mask=i < n, other=0.0)
    return tl.sum(acc, axis=0)


_FINISH_BLOCK = 1024


@triton.jit
def _finish_kernel(part_ptr, n, mul_bits, loss_ptr, BLOCK: tl.constexpr):
    """loss = mul * (the fixed-order sum of the n partials): the last step of a loss, one program."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    total = _fixed_sum(part_ptr, n, BLOCK) * _f64(mul_bits).to(ACC)
    tl.store(loss_ptr, _cast_for(total, loss_ptr))


def _finish(partial: torch.Tensor, mul: float, dtype=None) -> torch.Tensor:
    """The 0-dim loss mul * sum(partial) (1-D, contiguous), summed in a fixed order in the
    partials' type, in `dtype` (default: the partials')."""
    loss = partial.new_empty((), dtype=dtype or partial.dtype)
    _launch(_finish_kernel)[(1,)](partial, partial.numel(), _bits(mul), loss,
                                  BLOCK=_FINISH_BLOCK, num_warps=4)
    return loss


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, g_ptr, f_ptr, BLOCK: tl.constexpr):
    """out = x * g * f: a unit gradient scaled by the upstream gradient g and a factor f that the
    forward left on the device, flat over dense storage, in float32 or float64."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if x_ptr.dtype.element_ty.is_fp64():
        x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    else:
        x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    k = tl.load(g_ptr).to(x.dtype) * tl.load(f_ptr).to(x.dtype)
    tl.store(out_ptr + i, _cast_for(x * k, out_ptr), mask=i < n)


_SCALE_BLOCK = 1024


def _scaled(unit: torch.Tensor, grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """unit * grad * factor (0-dim device tensors) with unit's dtype and strides: one kernel.
    unit must be dense (non-overlapping, no gaps: a fresh empty_like is), so that its storage is
    walked flat."""
    out = torch.empty_like(unit)
    n = unit.numel()
    _launch(_scale_kernel)[(triton.cdiv(n, _SCALE_BLOCK),)](
        unit, out, n, grad, factor, BLOCK=_SCALE_BLOCK, num_warps=4)
    return out


def _split_k(n: int, step: int, blocks: int, target: int) -> tuple[int, int]:
    """(splits, chunk): n cut into chunks of a multiple of `step` so that blocks * splits is
    about `target` programs (at least one split, at most one per step). A fixed target, not the
    SM count, keeps the summation order, hence the bits, the same on every device."""
    splits = max(1, min(triton.cdiv(n, step), target // max(blocks, 1)))
    chunk = triton.cdiv(triton.cdiv(n, splits), step) * step
    return triton.cdiv(n, chunk), chunk


def _pow2(n: int, lo: int, hi: int) -> int:
    """The next power of two >= n, clamped to [lo, hi] (lo, hi powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# One op body for both modes; only the decorator differs. On the GPU, triton_op: torch.compile
# decomposes the op into its wrap_triton kernel calls, which Inductor sees and schedules. Under
# TRITON_INTERPRET=1 @triton.jit gives InterpretedFunction objects, which wrap_triton hands back
# unwrapped, so triton_op's decomposition (run on fake/functional tensors inside AOTAutograd)
# would execute the interpreter on tensors without data; there the op is a plain custom_op,
# opaque to torch.compile, whose body runs eagerly on real CPU tensors.
_define_op = torch.library.custom_op if _interpreted(_div) else triton_op

# Outside compilation the ops run through a plain torch.autograd.Function (fused_loss below) and
# launch their kernels directly: wrap_triton's tracing wrapper is only needed while triton_op is
# traced. A flag, not a check of the tracing state, so no tracing case can be missed.
_direct = threading.local()


def _launch(kernel):
    """kernel itself in an eager fused_loss call, else wrap_triton(kernel) (triton_op bodies)."""
    return kernel if getattr(_direct, "on", False) else wrap_triton(kernel)


@contextmanager
def _launching_directly():
    previous = getattr(_direct, "on", False)
    _direct.on = True
    try:
        yield
    finally:
        _direct.on = previous


def _plain(*tensors) -> bool:
    """Whether the eager Function may run: plain tensors (no fake or other subclass), no
    compilation and no dispatch mode (FakeTensorMode, FlopCounterMode, ...) active."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors))


def fused_loss(name: str, forward, backward, fake_forward, fake_backward,
               saved_inputs: tuple, const_inputs: tuple):
    """Registers the Triton loss kdkernels::<name> and its backward; returns call(*inputs) -> loss.

    forward(*inputs) -> (loss, *aux): the kernels, annotated for the op schema. backward(grad,
    *saved, *aux, *consts) -> gradient of inputs[0], where saved / consts are the inputs at
    saved_inputs (tensors) / const_inputs (parameters). The aux tensors are saved, never
    differentiated, and no zero gradient is materialised for them.

    The op pair (triton_op on the GPU, custom_op in the interpreter) serves torch.compile and
    opcheck; eager calls take a plain autograd.Function over the same bodies, which costs the
    host a fraction of a custom op's autograd (measured by `python -m bench --overhead`).
    """
    fwd_op = _define_op(f"kdkernels::{name}", mutates_args=())(forward)
    bwd_op = _define_op(f"kdkernels::{name}_backward", mutates_args=())(backward)
    fwd_op.register_fake(fake_forward)
    bwd_op.register_fake(fake_backward)
    n_inputs = len(inspect.signature(forward).parameters)

    def save(ctx, inputs, aux):
        ctx.save_for_backward(*(inputs[i] for i in saved_inputs), *aux)
        ctx.consts = tuple(inputs[i] for i in const_inputs)
        ctx.set_materialize_grads(False)

    def setup_context(ctx, inputs, output):
        save(ctx, inputs, output[1:])
        ctx.mark_non_differentiable(*output[1:])

    def op_backward(ctx, grad, *_aux_grads):
        grad_input = None if grad is None else bwd_op(grad, *ctx.saved_tensors, *ctx.consts)
        return (grad_input,) + (None,) * (n_inputs - 1)

    torch.library.register_autograd(f"kdkernels::{name}", op_backward, setup_context=setup_context)

    def eager_forward(ctx, *inputs):
        with _launching_directly():
            loss, *aux = forward(*inputs)
        save(ctx, inputs, aux)
        return loss

    def eager_backward(ctx, grad):
        if grad is None:
            return (None,) * n_inputs
        with _launching_directly():
            grad_input = backward(grad, *ctx.saved_tensors, *ctx.consts)
        return (grad_input,) + (None,) * (n_inputs - 1)

    # Named after the op, so that a loss's grad_fn says which (e.g. SgmTritonBackward).
    eager = type("".join(w.title() for w in name.split("_")), (torch.autograd.Function,),
                 {"forward": staticmethod(eager_forward), "backward": staticmethod(eager_backward)})
    op_packet = getattr(torch.ops.kdkernels, name)

    def call(*inputs):
        if _plain(inputs[0], inputs[1]):
            return eager.apply(*inputs)
        return op_packet(*inputs)[0]

    return call


@triton.jit
def _log1p_minus_x(v):
    """log(1 + v) - v without cancellation: its series (to v^17) for |v| < 0.1."""
    q = v * (1.0 / 17.0) - (1.0 / 16.0)
    q = q * v + (1.0 / 15.0)
    q = q * v - (1.0 / 14.0)
    q = q * v + (1.0 / 13.0)
    q = q * v - (1.0 / 12.0)
    q = q * v + (1.0 / 11.0)
    q = q * v - (1.0 / 10.0)
    q = q * v + (1.0 / 9.0)
    q = q * v - (1.0 / 8.0)
    q = q * v + (1.0 / 7.0)
    q = q * v - (1.0 / 6.0)
    q = q * v + (1.0 / 5.0)
    q = q * v - (1.0 / 4.0)
    q = q * v + (1.0 / 3.0)
    q = q * v - 0.5
    return tl.where(tl.abs(v) < 0.1, v * v * q, tl.log(1.0 + v) - v)


# CUDA runs at most 65535 programs along grid axes 1 and 2 (2^31 - 1 along axis 0); a launch past
# that fails with "invalid argument" (triton-lang/triton#3299). Kernels with the batch (or the
# maps) on axis 1 or 2 take the index of their first entry and are launched per chunk of it.
_GRID_YZ_MAX = 65535


def _batch_chunks(n) -> list[tuple[int, int]]:
    """(first, count) launches that cover n batch entries, at most _GRID_YZ_MAX each."""
    if n <= _GRID_YZ_MAX:  # a guard, not a specialisation, where torch.compile makes n symbolic
        return [(0, n)]
    return [(b0, min(_GRID_YZ_MAX, n - b0)) for b0 in range(0, n, _GRID_YZ_MAX)]


