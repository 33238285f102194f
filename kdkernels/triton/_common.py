"""Helpers shared by the Triton kernel modules: device functions, layout probes, op registration.

Device helpers (@triton.jit): _div (round-to-nearest division), _inv_norm (1 / max(n, eps)),
_log1p_minus_x (log(1 + v) - v without cancellation, for the near-teacher KLs),
_cast_for (rounding conversion for a store), _pixel_offsets (element offsets of flat pixel
indices through the H/W strides), _mm (a tile matrix product in the accumulation type, see its
docstring for the precision per dtype), _gram_kernel (split-K Gram matrices over the pixels,
shared by the channel and pixel relations).
Host helpers: _acc_dtype, _flat, _strides, _scalar, _pow2, _batch_chunks (the launches of a
batch too long for one grid axis), _gram, _define_op (triton_op on the GPU, custom_op under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

# L2-normalisation epsilon (F.normalize's default). Use it through _eps_like: a bare constexpr
# float meets a float64 tensor as float32 1e-12 (9.9999998e-13), off by 2e-8 where eps decides.
_EPS = tl.constexpr(1e-12)

# Precision of float32 x float32 tl.dot products (the tiles of the relation kernels). "ieee" is
# true fp32 FMA: the pixel-relation KL differences S_s - S_t are tiny near the teacher, where the
# 10-bit mantissa of plain "tf32" tensor cores would swamp them (so never "tf32"). "tf32x3"
# (3 TF32 passes, ~2^-21 relative product error) is the faster alternative on Hopper if a
# benchmark ever says the FMA path is the bottleneck. Float16/bfloat16 tiles go through the
# tensor cores in their own type (exact products, fp32 accumulation) and float64 tiles through
# FMA (see _mm). Under TRITON_INTERPRET=1 every tl.dot is a numpy float32 matmul anyway.
_DOT_PRECISION = tl.constexpr("ieee")


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
def _mm(a, b, acc):
    """acc + a @ b for tiles a [M, K], b [K, N] and an accumulator acc [M, N].

    * acc float64: FMA, as a broadcast product reduced over K (no reliance on fp64 tl.dot, whose
      GPU lowering differs between Triton releases); keep M * K * N small (a few thousand).
    * acc float32, a and b float32 (or wider): tl.dot with _DOT_PRECISION ("ieee": fp32 FMA).
    * acc float32, a float16/bfloat16 (b of the same type): tl.dot on the tensor cores in that
      type; the products of 16-bit floats are exact in fp32 and the accumulation is fp32.
    M, N and K are powers of two, at least 16 for the tl.dot paths. (The interpreter stores
    bfloat16 as raw uint16 and its tl.dot would multiply the bit patterns: there bfloat16 tiles
    are widened to fp32 first.)
    """
    # (Nested ifs, no chained and/or: older Triton front ends reject those.)
    if acc.dtype.is_fp64():
        r = acc + tl.sum(a.to(tl.float64)[:, :, None] * b.to(tl.float64)[None, :, :], axis=1)
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


def _scalar(value: float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim device tensor holding value: the kernels read float parameters such as tau from
    memory because Triton passes Python floats as float32 (too coarse for float64 inputs)."""
    return torch.full((), value, dtype=dtype, device=like.device)


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


# --- split-K Gram matrices ------------------------------------------------------------------

# Gram tiles: [BC1, BC2] outputs, BK pixels per step. float32/16-bit: tl.dot tiles up to 64 x 64
# with 64-pixel steps; float64 (FMA broadcast in _mm): 32 x 8 x 32 products per step.
_GRAM_BLOCK = (64, 64)  # (max BC, BK) for float32 accumulation
_GRAM_BLOCK_FP64 = (32, 8)
_GRAM_WARPS = (8, 4)  # (float32 accumulation, float64): no spills in ptxas's sm_90 reports
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


# Split-K: the pixel range is cut into equal chunks so that about this many programs run; the
# per-split partial Grams are then summed in a fixed order (deterministic, no atomics). A fixed
# target (not the SM count) keeps the summation order, hence the bits, device-independent.
_GRAM_TARGET_PROGRAMS = 512
GRAM_RAW, GRAM_SOFTMAX_ROWS, GRAM_PIXEL_NORM = 0, 1, 2


@triton.jit
def _gram_kernel(
    x_ptr, y_ptr, xs_ptr, ys_ptr, tau_ptr, out_ptr,
    B, b0, C1, C2, N, W, chunk,
    xB, xC, xH, xW, xN,
    yB, yC, yH, yW, yN,
    MODE: tl.constexpr, XFLAT: tl.constexpr, YFLAT: tl.constexpr,
    BC1: tl.constexpr, BC2: tl.constexpr, BK: tl.constexpr,
):
    """out[split, b, c1, c2] = sum over the split's pixels n of X~[b, c1, n] * Y~[b, c2, n].

    MODE 0 (raw): X~ = x. MODE 1 (softmax rows): X~ = exp(x / tau - max_n(x / tau)), xs/ys the
    (B, C, 2) row stats [max, sum] (the caller divides by sum_i sum_j), tau_ptr the 0-dim tau
    in ACC. MODE 2 (pixel norm):
    X~ = x / max(||x[b, :, n]||, eps), xs/ys the (B, N) pixel norms.
    """
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (tl.program_id(2) + b0).to(tl.int64)
    tiles2 = tl.cdiv(C2, BC2)
    c1 = (pid // tiles2) * BC1 + tl.arange(0, BC1)
    c2 = (pid % tiles2) * BC2 + tl.arange(0, BC2)
    m1 = c1 < C1
    m2 = c2 < C2
    x_base = x_ptr + b * xB + (c1.to(tl.int64) * xC)[:, None]
    y_base = y_ptr + b * yB + (c2.to(tl.int64) * yC)[None, :]
    if MODE == 1:
        tau = tl.load(tau_ptr)
        max1 = tl.load(xs_ptr + (b * C1 + c1) * 2, mask=m1, other=0.0)
        max2 = tl.load(ys_ptr + (b * C2 + c2) * 2, mask=m2, other=0.0)
    acc = tl.zeros([BC1, BC2], dtype=ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    for k0 in range(start, end, BK):
        n = k0 + tl.arange(0, BK)
        mn = n < end
        mx = m1[:, None] & mn[None, :]
        my = mn[:, None] & m2[None, :]
        x = tl.load(x_base + _pixel_offsets(n, W, xH, xW, xN, XFLAT)[None, :], mask=mx, other=0.0)
        y = tl.load(y_base + _pixel_offsets(n, W, yH, yW, yN, YFLAT)[:, None], mask=my, other=0.0)
        if MODE == 1:
            x = tl.where(mx, tl.exp(_div(x.to(ACC), tau) - max1[:, None]), 0.0)
            y = tl.where(my, tl.exp(_div(y.to(ACC), tau) - max2[None, :]), 0.0)
        elif MODE == 2:
            inv_x = _inv_norm(tl.load(xs_ptr + b * N + n, mask=mn, other=1.0))
            inv_y = _inv_norm(tl.load(ys_ptr + b * N + n, mask=mn, other=1.0))
            x = x.to(ACC) * inv_x[None, :]
            y = y.to(ACC) * inv_y[:, None]
        acc = _mm(x, y, acc)
    out = out_ptr + ((split * B + b) * C1 + c1[:, None]) * C2 + c2[None, :]
    tl.store(out, acc, mask=m1[:, None] & m2[None, :])


def _gram(x, y, xs, ys, mode: int, acc: torch.dtype, tau=None) -> torch.Tensor:
    """(B, C1, C2) Gram of x (B, C1, H, W) and y (B, C2, H, W) over the pixels, split-K.

    xs, ys: the row stats (mode GRAM_SOFTMAX_ROWS, with tau a 0-dim acc tensor) or the pixel
    norms (GRAM_PIXEL_NORM) of x and y; ignored (any tensor) for GRAM_RAW.
    """
    B, C1, H, W = x.shape
    C2 = y.shape[1]
    N = H * W
    max_bc, bk = _GRAM_BLOCK_FP64 if acc == torch.float64 else _GRAM_BLOCK
    bc1, bc2 = _pow2(C1, 16, max_bc), _pow2(C2, 16, max_bc)
    tiles = triton.cdiv(C1, bc1) * triton.cdiv(C2, bc2)
    split = max(1, min(triton.cdiv(N, bk), _GRAM_TARGET_PROGRAMS // (tiles * B)))
    chunk = triton.cdiv(triton.cdiv(N, split), bk) * bk
    split = triton.cdiv(N, chunk)
    partial = torch.empty((split, B, C1, C2), dtype=acc, device=x.device)
    xB, xC, xH, xW, xN, xflat = _strides(x)
    yB, yC, yH, yW, yN, yflat = _strides(y)
    for b0, nb in _batch_chunks(B):
        wrap_triton(_gram_kernel)[(tiles, split, nb)](
            x, y, xs, ys, xs if tau is None else tau, partial,
            B, b0, C1, C2, N, W, chunk,
            xB, xC, xH, xW, xN,
            yB, yC, yH, yW, yN,
            MODE=mode, XFLAT=xflat, YFLAT=yflat, BC1=bc1, BC2=bc2, BK=bk,
            num_warps=_GRAM_WARPS[acc == torch.float64],
        )
    return partial.sum(0)
