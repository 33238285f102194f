"""KDAS Symmetrical Guiding Module in Triton: kernel, launcher and autograd registration.

With D = ps - pt and M = D + D^T (symmetric), the loss is mean f(M), f(m) = m^2 ("mse") or |m|
("l1"), and d loss / d ps = 2 f'(M) / n (f'(0) = 0, torch's sign convention). One program per
tile pair (I, J), I <= J, of one (b, k) plane, grid (B * K * pairs,): it loads the tiles (I, J)
and (J, I) of ps and pt once (coalesced along the rows), transposes the second with tl.trans (a
layout conversion through shared memory on the GPU), writes its partial loss (off-diagonal
pairs count twice) and, when the student needs a gradient, the unit gradient of both tiles. The
partials are summed in a fixed order afterwards: no atomics, deterministic.

kdkernels::sgm_triton(ps, pt, distance, need_grad) -> (loss, unit) mirrors the C++ op
kdkernels::sgm; the backward is grad * unit. Three kernels per forward + backward: the tiles,
the fixed-order sum of their partials (_common._finish) and the scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.ops import sgm as _ext
from kdkernels.triton._common import _acc_dtype, _cast_for, _div, _finish, _launch, fused_loss

__all__ = ["sgm"]

# A 32 x 32 tile: a 128-byte (fp32) row per load, 8 elements per thread and tile with 4 warps,
# and enough programs (66 per 352 x 352 plane) to fill an H100 from a batch of 16 maps.
_BLOCK = 32
_NUM_WARPS = 4


@triton.jit
def _sgm_kernel(
    ps_ptr, pt_ptr, g_ptr, partial_ptr,
    K, H, npairs, n,
    sB, sK, sH, sW,
    tB, tK, tH, tW,
    gB, gK, gH, gW,
    L1: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    pid = tl.program_id(0)
    plane = pid // npairs
    p = pid % npairs
    # Pair p = J (J + 1) / 2 + I, 0 <= I <= J; the float square root is off by at most one.
    j = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    j = tl.where(j * (j + 1) // 2 > p, j - 1, j)
    j = tl.where((j + 1) * (j + 2) // 2 <= p, j + 1, j)
    i = p - j * (j + 1) // 2
    b = (plane // K).to(tl.int64)
    c = (plane % K).to(tl.int64)

    ri = i * BLOCK + tl.arange(0, BLOCK)  # rows / columns of band I
    rj = j * BLOCK + tl.arange(0, BLOCK)
    ri64 = ri.to(tl.int64)
    rj64 = rj.to(tl.int64)
    mask_ij = (ri < H)[:, None] & (rj < H)[None, :]
    mask_ji = (rj < H)[:, None] & (ri < H)[None, :]
    s = ps_ptr + b * sB + c * sK
    t = pt_ptr + b * tB + c * tK
    s_ij = ri64[:, None] * sH + rj64[None, :] * sW
    t_ij = ri64[:, None] * tH + rj64[None, :] * tW
    s_ji = rj64[:, None] * sH + ri64[None, :] * sW
    t_ji = rj64[:, None] * tH + ri64[None, :] * tW
    d_ij = (tl.load(s + s_ij, mask=mask_ij, other=0.0).to(ACC)
            - tl.load(t + t_ij, mask=mask_ij, other=0.0).to(ACC))
    d_ji = (tl.load(s + s_ji, mask=mask_ji, other=0.0).to(ACC)
            - tl.load(t + t_ji, mask=mask_ji, other=0.0).to(ACC))
    m = d_ij + tl.trans(d_ji)  # masked entries are 0 + 0 and add f(0) = 0
    if L1:
        f = tl.abs(m)
    else:
        f = m * m
    total = tl.sum(tl.sum(f, axis=1), axis=0)
    tl.store(partial_ptr + pid, tl.where(i == j, total, 2.0 * total))
    if NEED_GRAD:
        if L1:  # the unit gradient 2 f'(M) / n
            k = _div(tl.full([], 2.0, ACC), n)
        else:
            k = _div(tl.full([], 4.0, ACC), n)
        if L1:
            unit = tl.where(m > 0, k, tl.where(m < 0, -k, 0.0))
        else:
            unit = k * m
        g = g_ptr + b * gB + c * gK
        g_ij = ri64[:, None] * gH + rj64[None, :] * gW
        g_ji = rj64[:, None] * gH + ri64[None, :] * gW
        tl.store(g + g_ij, _cast_for(unit, g_ptr), mask=mask_ij)
        # The (J, I) tile is the transpose; a diagonal tile is already complete.
        tl.store(g + g_ji, _cast_for(tl.trans(unit), g_ptr), mask=mask_ji & (i != j))


def _maps_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(sB, sK, sH, sW) of a (B, H, W) or (B, K, H, W) map."""
    if x.dim() == 3:
        return x.stride(0), 0, x.stride(1), x.stride(2)
    return tuple(x.stride())


def _sgm_forward(ps: torch.Tensor, pt: torch.Tensor, distance: str,
                 need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, unit): unit = d loss / d ps for a unit upstream gradient (empty unless need_grad)."""
    if distance not in ("mse", "l1"):
        raise ValueError(f"sgm: unknown distance {distance!r}")
    acc = _acc_dtype(ps)
    H = ps.shape[-1]
    K = ps.shape[1] if ps.dim() == 4 else 1
    planes = ps.shape[0] * K
    tiles = triton.cdiv(H, _BLOCK)
    npairs = tiles * (tiles + 1) // 2
    n = ps.numel()
    unit = torch.empty_like(ps) if need_grad else ps.new_empty((0,))
    partial = torch.empty((planes * npairs,), dtype=acc, device=ps.device)
    # Without need_grad the kernel stores no gradient: any output buffer stands in for g_ptr.
    g, g_strides = (unit, _maps_strides(unit)) if need_grad else (partial, (0, 0, 0, 0))
    _launch(_sgm_kernel)[(planes * npairs,)](
        ps, pt, g, partial,
        K, H, npairs, n,
        *_maps_strides(ps), *_maps_strides(pt), *g_strides,
        L1=distance == "l1", NEED_GRAD=need_grad, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
    )
    return _finish(partial, 1.0 / n), unit


def _sgm_backward(grad: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    if unit.numel() == 0:
        raise RuntimeError("sgm: the op ran with need_grad=False, so it saved no gradient")
    return unit * grad


def _fake_backward(grad, unit):
    return torch.empty_like(unit)


_sgm = fused_loss("sgm_triton", _sgm_forward, _sgm_backward, _ext.fake, _fake_backward,
                  saved_inputs=(), const_inputs=())


def sgm(ps: torch.Tensor, pt: torch.Tensor, distance: str) -> torch.Tensor:
    """Validated inputs (equal square shapes); returns the loss, autograd to ps."""
    ps, pt = _ext.same_dtype(ps, pt.detach())
    return _sgm(ps, pt, distance, _ext.need_grad(ps))
