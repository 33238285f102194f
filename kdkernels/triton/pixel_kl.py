"""Pixel KL (response KD) in Triton: kernel, launcher and autograd registration in one place.

loss = T^2 * sum over counted pixels of KL(p_t || p_s) / count, p = softmax(z / T) over the K
channels of a pixel; K == 1 is the Bernoulli case, computed as the two logits (z, 0).

One kernel, grid (cdiv(B * H * W, BLOCK_P),): a program owns BLOCK_P consecutive pixels of the
flattened (b, h, w) index and loads [BLOCK_K, BLOCK_P] tiles of zs and zt through their element
strides (NCHW: coalesced along the pixels; channels_last and (B, K) logits: along the channels;
no copies). When the Kv = max(K, 2) channels fit one tile (K <= 256) the tile stays in registers
from the statistics to the gradient; otherwise the channels are walked twice, with an online
softmax (running maxima, rescaled sums) and then a re-read for the gradient. When the student
needs a gradient the same program writes p_s - p_t, so the backward is one scale. Each program
writes the KL sum and the count of its pixels; a one-program finish kernel sums them in a fixed
order (deterministic, no atomics) into the loss and the backward's factor T / count, which
stay on the device. Three kernels per forward + backward.

Precision (as in csrc/cpu/pixel_kl.cpp). With d = (zs - zt) / T, u = E_pt[e^d] - 1 = a + c,
a = E_pt[d], c = E_pt[phi(d)], phi(d) = e^d - 1 - d (Taylor series, |d| <= 1):
  KL = log1p(u) - a = c - psi(u),  psi(u) = u - log1p(u) (series for |u| < 0.1),
  lse_s - lse_t = log1p(u) = u - psi(u),
all small terms without cancellation where every |d| <= 1 (near the teacher); elsewhere the
direct lse_s - lse_t - a. Gradient: p_s - p_t = p_t expm1(d - (lse_s - lse_t)) for small
arguments, the plain difference otherwise. Float32 throughout (float64 for float64 inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kdkernels.ops.pixel_kl import prepare
from kdkernels.triton._common import (
    _FINISH_BLOCK,
    _acc_dtype,
    _bits,
    _cast_for,
    _div,
    _f64,
    _fixed_sum,
    _flat,
    _launch,
    _pixel_offsets,
    _scaled,
    fused_loss,
)

__all__ = ["pixel_kl"]

# Channels held in one tile (beyond: the two-pass walk), logits per tile and tensor, pixels per
# program at most: 2048 values over 8 warps, 8 per thread and tensor, compile for sm_90 to about
# 80 registers (no spills; 3 programs per SM), 4096 or 1024-pixel tiles to 135-225.
_MAX_TILE_K = 256
_TILE_ELEMS = 2048
_MAX_BLOCK_P = 512
_NUM_WARPS = 8

# --- device helpers -------------------------------------------------------------------------


@triton.jit
def _phi(d):
    """exp(d) - 1 - d by its Taylor series for |d| <= 1: to d^11 (float32), d^18 (float64)."""
    if d.dtype.is_fp64():
        q = d * (1.0 / 6402373705728000.0) + (1.0 / 355687428096000.0)
        q = q * d + (1.0 / 20922789888000.0)
        q = q * d + (1.0 / 1307674368000.0)
        q = q * d + (1.0 / 87178291200.0)
        q = q * d + (1.0 / 6227020800.0)
        q = q * d + (1.0 / 479001600.0)
        q = q * d + (1.0 / 39916800.0)
    else:
        q = tl.full(d.shape, 1.0 / 39916800.0, d.dtype)
    q = q * d + (1.0 / 3628800.0)
    q = q * d + (1.0 / 362880.0)
    q = q * d + (1.0 / 40320.0)
    q = q * d + (1.0 / 5040.0)
    q = q * d + (1.0 / 720.0)
    q = q * d + (1.0 / 120.0)
    q = q * d + (1.0 / 24.0)
    q = q * d + (1.0 / 6.0)
    q = q * d + 0.5
    return d * d * q


@triton.jit
def _psi(u):
    """u - log(1 + u) >= 0 without cancellation: its series (to u^17) for |u| < 0.1."""
    q = u * (-1.0 / 17.0) + (1.0 / 16.0)
    q = q * u - (1.0 / 15.0)
    q = q * u + (1.0 / 14.0)
    q = q * u - (1.0 / 13.0)
    q = q * u + (1.0 / 12.0)
    q = q * u - (1.0 / 11.0)
    q = q * u + (1.0 / 10.0)
    q = q * u - (1.0 / 9.0)
    q = q * u + (1.0 / 8.0)
    q = q * u - (1.0 / 7.0)
    q = q * u + (1.0 / 6.0)
    q = q * u - (1.0 / 5.0)
    q = q * u + (1.0 / 4.0)
    q = q * u - (1.0 / 3.0)
    q = q * u + 0.5
    # Where psi is used, u = E_pt[e^d] - 1 >= e^-1 - 1; the clamp only keeps the lanes of the
    # other branch (any u) out of log's domain error.
    return tl.where(tl.abs(u) < 0.1, u * u * q, u - tl.log(tl.maximum(1.0 + u, 0.25)))


@triton.jit
def _load(ptr, off, c, sC, K, ok, ACC: tl.constexpr):
    """[BLOCK_K, BLOCK_P] logits of channels c (rows c >= K, the binary case's 0, read as 0)."""
    lm = (c < K)[:, None] & ok[None, :]
    return tl.load(ptr + (c.to(tl.int64) * sC)[:, None] + off[None, :], mask=lm, other=0.0).to(ACC)


@triton.jit
def _tile_max(zs, zt, valid):
    ninf = float("-inf")
    return tl.max(tl.where(valid, zs, ninf), axis=0), tl.max(tl.where(valid, zt, ninf), axis=0)


@triton.jit
def _tile_sums(zs, zt, valid, ms, mt, inv_t):
    """Per pixel sums over the tile's channels, against the maxima ms, mt (raw logits):
    e_s, e_t = exp((z - m) / T); returns sum e_s, sum e_t, sum e_t d, sum e_t phi(d), max |d|."""
    e_s = tl.where(valid, tl.exp((zs - ms[None, :]) * inv_t), 0.0)
    e_t = tl.where(valid, tl.exp((zt - mt[None, :]) * inv_t), 0.0)
    d = (zs - zt) * inv_t  # an exact difference, then one rounding
    # phi only matters where every |d| <= 1; elsewhere any finite value will do.
    phi = _phi(tl.minimum(tl.maximum(d, -1.0), 1.0))
    dmax = tl.max(tl.where(valid, tl.abs(d), 0.0), axis=0)
    return (tl.sum(e_s, axis=0), tl.sum(e_t, axis=0), tl.sum(e_t * d, axis=0),
            tl.sum(e_t * phi, axis=0), dmax)


@triton.jit
def _tile_grad(zs, zt, ms, mt, delta, inv_ss, inv_st, inv_t, scale):
    """scale * (p_s - p_t) for a tile, from the pixel statistics."""
    p_t = tl.exp((zt - mt[None, :]) * inv_t) * inv_st[None, :]
    x = (zs - zt) * inv_t - delta[None, :]
    near = p_t * (x + _phi(tl.minimum(tl.maximum(x, -1.0), 1.0)))  # p_t expm1(x)
    far = tl.exp((zs - ms[None, :]) * inv_t) * inv_ss[None, :] - p_t
    return tl.where(tl.abs(x) <= 1.0, near, far) * scale


@triton.jit
def _pixel_kl_kernel(
    zs_ptr, zt_ptr, m_ptr, t_bits, g_ptr, part_ptr, count_ptr,
    K, Kv, N, W, P,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    gB, gC, gH, gW, gN,
    mB, mH, mW, mN,
    FLAT_S: tl.constexpr, FLAT_T: tl.constexpr, FLAT_G: tl.constexpr, FLAT_M: tl.constexpr,
    MASKED: tl.constexpr, NEED_GRAD: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """part[pid] = sum over the program's counted pixels of KL and count[pid] their number;
    g = p_s - p_t for the counted pixels, 0 elsewhere (NEED_GRAD)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    pid = tl.program_id(0)
    p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = p < P
    b = p // N
    n = p % N
    off_s = b * sB + _pixel_offsets(n, W, sH, sW, sN, FLAT_S)
    off_t = b * tB + _pixel_offsets(n, W, tH, tW, tN, FLAT_T)
    if MASKED:
        off_m = b * mB + _pixel_offsets(n, W, mH, mW, mN, FLAT_M)
        counted = ok & (tl.load(m_ptr + off_m, mask=ok, other=0) != 0)
    else:
        counted = ok
    inv_t = _div(tl.full([], 1.0, ACC), _f64(t_bits).to(ACC))
    c = tl.arange(0, BLOCK_K)

    if ONE_TILE:
        valid = (c < Kv)[:, None]  # padding pixels (not ok) read 0: finite, never stored
        zs = _load(zs_ptr, off_s, c, sC, K, ok, ACC)
        zt = _load(zt_ptr, off_t, c, tC, K, ok, ACC)
        ms, mt = _tile_max(zs, zt, valid)
        ss, st, sd, sphi, dmax = _tile_sums(zs, zt, valid, ms, mt, inv_t)
    else:
        ninf = float("-inf")
        ms = tl.full([BLOCK_P], ninf, ACC)
        mt = tl.full([BLOCK_P], ninf, ACC)
        ss = tl.zeros([BLOCK_P], ACC)
        st = tl.zeros([BLOCK_P], ACC)
        sd = tl.zeros([BLOCK_P], ACC)
        sphi = tl.zeros([BLOCK_P], ACC)
        dmax = tl.zeros([BLOCK_P], ACC)
        for k0 in range(0, Kv, BLOCK_K):
            ck = k0 + c
            valid = (ck < Kv)[:, None]
            zs = _load(zs_ptr, off_s, ck, sC, K, ok, ACC)
            zt = _load(zt_ptr, off_t, ck, tC, K, ok, ACC)
            cs, ct = _tile_max(zs, zt, valid)
            ms_new = tl.maximum(ms, cs)
            mt_new = tl.maximum(mt, ct)
            # Online softmax: what was summed against an older, smaller maximum is rescaled.
            fs = tl.exp((ms - ms_new) * inv_t)
            ft = tl.exp((mt - mt_new) * inv_t)
            ms = ms_new
            mt = mt_new
            ks, kt, kd, kphi, kmax = _tile_sums(zs, zt, valid, ms, mt, inv_t)
            ss = ss * fs + ks
            st = st * ft + kt
            sd = sd * ft + kd
            sphi = sphi * ft + kphi
            dmax = tl.maximum(dmax, kmax)

    inv_ss = _div(tl.full([BLOCK_P], 1.0, ACC), ss)
    inv_st = _div(tl.full([BLOCK_P], 1.0, ACC), st)
    a = sd * inv_st
    u = a + sphi * inv_st
    psi = _psi(u)
    near = dmax <= 1.0
    delta = tl.where(near, u - psi, (ms - mt) * inv_t + tl.log(ss * inv_st))
    kl = tl.where(near, sphi * inv_st - psi, delta - a)
    # where, not a product: an excluded pixel may hold NaN.
    tl.store(part_ptr + pid, tl.sum(tl.where(counted, kl, 0.0), axis=0))
    tl.store(count_ptr + pid, tl.sum(counted.to(tl.int32), axis=0))

    if NEED_GRAD:
        scale = 1.0
        off_g = b * gB + _pixel_offsets(n, W, gH, gW, gN, FLAT_G)
        if ONE_TILE:
            g = _tile_grad(zs, zt, ms, mt, delta, inv_ss, inv_st, inv_t, scale)
            g = tl.where(counted[None, :], g, 0.0)
            out = g_ptr + (c.to(tl.int64) * gC)[:, None] + off_g[None, :]
            tl.store(out, _cast_for(g, g_ptr), mask=(c < K)[:, None] & ok[None, :])
        else:
            for k0 in range(0, K, BLOCK_K):
                ck = k0 + c
                zs = _load(zs_ptr, off_s, ck, sC, K, ok, ACC)
                zt = _load(zt_ptr, off_t, ck, tC, K, ok, ACC)
                g = _tile_grad(zs, zt, ms, mt, delta, inv_ss, inv_st, inv_t, scale)
                g = tl.where(counted[None, :], g, 0.0)
                out = g_ptr + (ck.to(tl.int64) * gC)[:, None] + off_g[None, :]
                tl.store(out, _cast_for(g, g_ptr), mask=(ck < K)[:, None] & ok[None, :])


@triton.jit
def _pixel_kl_finish_kernel(part_ptr, count_ptr, n, t_bits, loss_ptr, factor_ptr,
                            BLOCK: tl.constexpr):
    """loss = T^2 sum KL / count; factor = T / count, the backward's scale of p_s - p_t (0 when
    nothing is counted: the loss is then 0 / 0 = NaN like the reference's, the gradient 0)."""
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    t = _f64(t_bits).to(ACC)
    total = _fixed_sum(part_ptr, n, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        acc += tl.load(count_ptr + i, mask=i < n, other=0).to(tl.int64)
    count = tl.sum(acc, axis=0).to(ACC)
    tl.store(loss_ptr, _div(total * t * t, count))
    tl.store(factor_ptr, tl.where(count > 0, _div(t, count), 0.0))


# --- host side ------------------------------------------------------------------------------


def _pixel_strides(x: torch.Tensor) -> tuple:
    """(sB, sC, sH, sW, sN, FLAT) of a (B, K, H, W) tensor or (sB, sH, sW, sN, FLAT) of a mask."""
    if x.dim() == 3:
        flat, s_n = _flat(x.unsqueeze(1))
        return x.stride(0), x.stride(1), x.stride(2), s_n, flat
    flat, s_n = _flat(x)
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3), s_n, flat


def _as_maps(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, K) logits and (B,) masks as (B, K, 1, 1) and (B, 1, 1) views."""
    return x if x.dim() == dim else x[..., None, None]


def _tile(kv: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_P): float64 tiles hold half the elements (a 32 x 64 float64 tile spilled
    256 bytes on sm_90)."""
    block_k = triton.next_power_of_2(min(kv, _MAX_TILE_K))
    elems = _TILE_ELEMS if itemsize <= 4 else _TILE_ELEMS // 2
    return block_k, min(_MAX_BLOCK_P, elems // block_k)


def _pixel_kl_forward(
    zs: torch.Tensor, zt: torch.Tensor, temperature: float, mask: Optional[torch.Tensor],
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, unit, factor): unit = p_s - p_t per counted pixel (need_grad, else empty), factor
    (0-dim) = T / count, so that d loss / d zs = factor * unit."""
    if zs.shape != zt.shape or zs.dtype != zt.dtype or zs.dim() not in (2, 4):
        raise ValueError("pixel_kl_triton: zs and zt must be (B, K) or (B, K, H, W) of one shape and "
                         f"dtype, got {tuple(zs.shape)} {zs.dtype} and {tuple(zt.shape)} {zt.dtype}")
    acc = _acc_dtype(zs)
    zs4, zt4 = _as_maps(zs, 4), _as_maps(zt, 4)
    B, K, H, W = zs4.shape
    N = H * W
    kv = max(K, 2)
    m3 = zs4 if mask is None else _as_maps(mask, 3).view(torch.uint8)  # zs4: unused
    unit = torch.empty_like(zs) if need_grad else zs.new_empty((0,))
    g4 = _as_maps(unit, 4) if need_grad else zs4
    block_k, block_p = _tile(kv, acc.itemsize)
    grid = (triton.cdiv(B * N, block_p),)
    partial = torch.empty(grid, dtype=acc, device=zs.device)
    counts = torch.empty(grid, dtype=torch.int32, device=zs.device)
    t_bits = _bits(temperature)
    s_strides, t_strides = _pixel_strides(zs4), _pixel_strides(zt4)
    g_strides = _pixel_strides(g4)
    m_strides = _pixel_strides(m3) if mask is not None else (0, 0, 0, 0, True)
    _launch(_pixel_kl_kernel)[grid](
        zs4, zt4, m3, t_bits, g4, partial, counts,
        K, kv, N, W, B * N,
        *s_strides[:5], *t_strides[:5], *g_strides[:5], *m_strides[:4],
        FLAT_S=s_strides[5], FLAT_T=t_strides[5], FLAT_G=g_strides[5], FLAT_M=m_strides[4],
        MASKED=mask is not None, NEED_GRAD=need_grad, ONE_TILE=kv <= block_k,
        BLOCK_K=block_k, BLOCK_P=block_p, num_warps=_NUM_WARPS,
    )
    loss = partial.new_empty(())
    factor = partial.new_empty(())
    _launch(_pixel_kl_finish_kernel)[(1,)](partial, counts, grid[0], t_bits, loss, factor,
                                           BLOCK=_FINISH_BLOCK, num_warps=4)
    return loss, unit, factor


def _pixel_kl_backward(grad: torch.Tensor, unit: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if unit.numel() == 0:
        raise RuntimeError("pixel_kl: backward through a call made with need_grad=False")
    return _scaled(unit, grad, factor)


def _fake_forward(zs, zt, temperature, mask, need_grad):
    loss = zs.new_empty((), dtype=_acc_dtype(zs))
    unit = torch.empty_like(zs) if need_grad else zs.new_empty((0,))
    return loss, unit, zs.new_empty((), dtype=_acc_dtype(zs))


def _fake_backward(grad, unit, factor):
    return torch.empty_like(unit)


_pixel_kl = fused_loss("pixel_kl_triton", _pixel_kl_forward, _pixel_kl_backward, _fake_forward,
                       _fake_backward, saved_inputs=(), const_inputs=())


def pixel_kl(zs, zt, temperature, mask):
    """Pixel KL loss (0-dim; float32, float64 for float64 inputs), autograd to zs."""
    zs, zt, need_grad = prepare(zs, zt)
    return _pixel_kl(zs, zt, float(temperature), mask, need_grad)
