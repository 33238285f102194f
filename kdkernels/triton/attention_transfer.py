"""Attention transfer in Triton: kernels, launcher and autograd registration in one place.

The math mirrors the C++/CUDA kernels (csrc/common/attention_transfer.h and bilinear.h):

* map kernel, grid (pixel blocks x channel splits of the student, then of the teacher, B):
  the partial sums sum_c |y[b, c, n]|^p over one split's channels on the teacher's Ho x Wo grid,
  y the input itself or (student only, RESIZE) its bilinear resample (align_corners=False) read
  straight from the 4 taps, so no resized tensor ever exists. [BLOCK_C, BLOCK_N] tiles are loaded
  through the element strides and reduced over channels. The channels are split across programs
  (as the CUDA kernel does) when pixel blocks alone give too few programs: a 512-channel 4 x 4
  map is one pixel block.
* finalize kernel, grid (B,): m = (sum of the splits in order) / C, then pass 1 the L2 norms
  of ms[b] and mt[b], pass 2 the per-sample sum
  of squared differences and <as, d>, pass 3 coeff = d loss / d ms. The loss is the fixed-order
  sum of the per-sample partials (no float atomics: deterministic).
* backward kernel, grid (cdiv(Hs * Ws, BLOCK_N), cdiv(Cs, BLOCK_C), B): grad_fs = g / Cs * sum
  over the output pixels o that read (h, w) of weight * coeff[b, o] * dpow(y[b, c, o]). Without a
  resize o = (h, w); with one it is a gather over a short window of output rows and columns
  (deterministic, no atomics) that recomputes y at o from its taps.

attention_transfer(fs, ft, p, reduction) is the entry point; kdkernels::attention_transfer_triton
returns (loss, coeff) and kdkernels::attention_transfer_triton_backward maps (g, fs, coeff, p) to
grad_fs. On the GPU both are torch.library.triton_op custom ops, so torch.compile(fullgraph=True)
traces into them and Inductor sees the kernels. Under TRITON_INTERPRET=1 (CPU tensors) the same
bodies are registered with torch.library.custom_op instead (see _define_op) and run eagerly.
Tensors are read and written through their element strides (NCHW, channels_last, slices) with
int64 offsets; nothing is copied to contiguous form and no resized tensor is made.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kdkernels.triton._common import (
    _EPS,
    _acc_dtype,
    _batch_chunks,
    _div,
    _finish,
    _flat,
    _launch,
    _pixel_offsets,
    _split_k,
    fused_loss,
)

__all__ = ["attention_transfer"]

# Tiles. The map and backward kernels load [BLOCK_C, BLOCK_N] tiles (2048 elements, 4 warps):
# NCHW-like inputs (pixels contiguous) take few channels by many pixels, so each tile row is a
# 256-element contiguous run; channels_last inputs (channels contiguous) take 32 channels (a
# 128-byte fp32 / 64-byte half run per pixel) by 64 pixels. The finalize kernel streams one
# sample's B x N maps in 1024-element blocks.
_TILE_PIXELS_CONTIGUOUS = (8, 256)  # (BLOCK_C, BLOCK_N)
_TILE_CHANNELS_CONTIGUOUS = (32, 64)
_BLOCK_FINALIZE = 1024
_NUM_WARPS = 4
# The backward's [channels, pixels] tiles with the resize window: 8 warps compile without spills
# for sm_90 (4 spilled 320 bytes).
_BWD_WARPS = 8
# Channel splits of the map kernel: enough programs for two waves of a 132-SM H100, a fixed
# number so that the summation order (the bits) depends on the shapes alone.
_MAP_TARGET_PROGRAMS = 264

# --- device helpers -------------------------------------------------------------------------


@triton.jit
def _power(v, p, P: tl.constexpr):
    """|v|^p; P == 2 and P == 4 are the fast paths, P == 0 the general exponent (0 at v == 0)."""
    if P == 2:
        r = v * v
    elif P == 4:
        v2 = v * v
        r = v2 * v2
    else:
        a = tl.abs(v)
        nz = a != 0
        r = tl.where(nz, tl.exp2(p * tl.log2(tl.where(nz, a, 1.0))), 0.0)
    return r


@triton.jit
def _power_grad(v, p, P: tl.constexpr):
    """d|v|^p / dv = p |v|^(p-1) sign(v), taken as 0 at v == 0."""
    if P == 2:
        r = 2.0 * v
    elif P == 4:
        r = 4.0 * v * v * v
    else:
        a = tl.abs(v)
        nz = a != 0
        mag = p * tl.exp2((p - 1.0) * tl.log2(tl.where(nz, a, 1.0)))
        r = tl.where(v > 0, mag, tl.where(v < 0, -mag, 0.0))
    return r


@triton.jit
def _float_args(scale_h, scale_w, p, ACC: tl.constexpr):
    """The float arguments in the types the kernels compute in: Triton passes a Python float as
    float32, but torch.compile (inductor) passes it as float64, which would widen the sums."""
    return tl.cast(scale_h, tl.float32), tl.cast(scale_w, tl.float32), tl.cast(p, ACC)


@triton.jit
def _taps(o, size, scale):
    """PyTorch bilinear (align_corners=False) taps of output index o: i0, i1, l0, l1 (fp32)."""
    src = scale * (o.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), size - 1)  # src >= 0: truncation is floor
    i1 = i0 + (i0 < size - 1).to(tl.int32)
    l1 = src - i0.to(tl.float32)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def _window_first(i, scale):
    """First output index whose taps may touch input index i (bilinear_window_first)."""
    lo = tl.math.div_rn(i.to(tl.float32) - 0.5, scale) - 0.5
    first = tl.maximum(lo, 0.0).to(tl.int32) - 1
    return tl.maximum(first, 0)


@triton.jit
def _sample(base, coff, mask, h0, h1, w0, w1, lh0, lh1, lw0, lw1, sH, sW, ACC: tl.constexpr):
    """Bilinear sample of a [BLOCK_C, BLOCK_N] tile from its 4 taps (bilinear.h's order)."""
    r0 = h0.to(tl.int64) * sH
    r1 = h1.to(tl.int64) * sH
    c0 = w0.to(tl.int64) * sW
    c1 = w1.to(tl.int64) * sW
    x00 = tl.load(base + coff + (r0 + c0)[None, :], mask=mask, other=0.0).to(ACC)
    x01 = tl.load(base + coff + (r0 + c1)[None, :], mask=mask, other=0.0).to(ACC)
    x10 = tl.load(base + coff + (r1 + c0)[None, :], mask=mask, other=0.0).to(ACC)
    x11 = tl.load(base + coff + (r1 + c1)[None, :], mask=mask, other=0.0).to(ACC)
    top = lw0[None, :] * x00 + lw1[None, :] * x01
    bot = lw0[None, :] * x10 + lw1[None, :] * x11
    return lh0[None, :] * top + lh1[None, :] * bot


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _map_tile(
    x_ptr, part_ptr, pid, tiles, B, b, C, chunk, H, W, Wo, N, sB, sC, sH, sW, sN, scale_h,
    scale_w, p,
    P: tl.constexpr, RESIZE: tl.constexpr, FLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """part[split, b, n] = sum over the split's channels of |y[b, c, n]|^p for one block of the
    Ho x Wo grid (N = Ho * Wo); program pid is (split, pixel block) = divmod(pid, tiles)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    split = pid // tiles
    n = (pid % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = n < N
    base = x_ptr + b * sB
    if RESIZE:
        h0, h1, lh0, lh1 = _taps(n // Wo, H, scale_h)
        w0, w1, lw0, lw1 = _taps(n % Wo, W, scale_w)
    else:
        off = _pixel_offsets(n, W, sH, sW, sN, FLAT)
    c_lo = split * chunk
    c_hi = tl.minimum(c_lo + chunk, C)
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    for c_start in range(c_lo, c_hi, BLOCK_C):
        c = c_start + tl.arange(0, BLOCK_C)
        mask = (c < c_hi)[:, None] & mask_n[None, :]
        coff = (c.to(tl.int64) * sC)[:, None]
        if RESIZE:
            v = _sample(base, coff, mask, h0, h1, w0, w1, lh0, lh1, lw0, lw1, sH, sW, ACC)
        else:
            v = tl.load(base + coff + off[None, :], mask=mask, other=0.0).to(ACC)
        acc += _power(v, p, P)  # masked lanes load 0 and |0|^p = 0
    tl.store(part_ptr + (split * B + b) * N + n, tl.sum(acc, axis=0), mask=mask_n)


@triton.jit
def _at_map_kernel(
    s_ptr, t_ptr, ps_ptr, pt_ptr,
    b0, B, tiles_s, progs_s, chunk_s, tiles_t, chunk_t, Cs, Hs, Ws, Ct, Wo, N,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    scale_h, scale_w, p,
    P: tl.constexpr, RESIZE: tl.constexpr, SFLAT: tl.constexpr, TFLAT: tl.constexpr,
    BLOCK_CS: tl.constexpr, BLOCK_NS: tl.constexpr, BLOCK_CT: tl.constexpr, BLOCK_NT: tl.constexpr,
):
    """The channel-split power sums of the student (the first progs_s programs of axis 0, its
    resample when RESIZE) and of the teacher (the rest), in one launch."""
    ACC: tl.constexpr = ps_ptr.dtype.element_ty
    scale_h, scale_w, p = _float_args(scale_h, scale_w, p, ACC)
    pid = tl.program_id(0)
    b = (tl.program_id(1) + b0).to(tl.int64)
    if pid < progs_s:
        _map_tile(s_ptr, ps_ptr, pid, tiles_s, B, b, Cs, chunk_s, Hs, Ws, Wo, N, sB, sC, sH, sW,
                  sN, scale_h, scale_w, p, P, RESIZE, SFLAT, BLOCK_CS, BLOCK_NS)
    else:
        _map_tile(t_ptr, pt_ptr, pid - progs_s, tiles_t, B, b, Ct, chunk_t, 1, Wo, Wo, N, tB, tC,
                  tH, tW, tN, 1.0, 1.0, p, P, False, TFLAT, BLOCK_CT, BLOCK_NT)


@triton.jit
def _merged(part_ptr, splits, B, b, N, n, mask, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The channel mean at pixels n: the splits' partial sums added in split order, / C."""
    m = tl.zeros([BLOCK], dtype=ACC)
    for k in range(0, splits):
        m += tl.load(part_ptr + (k * B + b) * N + n, mask=mask, other=0.0)
    return _div(m, C)


@triton.jit
def _at_finalize_kernel(
    ps_ptr, pt_ptr, coeff_ptr, partial_ptr,
    B, N, splits_s, splits_t, Cs, Ct, denom,
    BLOCK: tl.constexpr,
):
    """Per sample b: ms[b], mt[b] from the channel splits, partial[b] = ||as - at||^2 and
    coeff[b] = d loss / d ms[b]."""
    ACC: tl.constexpr = coeff_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    c_ptr = coeff_ptr + b * N
    eps = tl.full([], _EPS, ACC)
    k = _div(tl.full([], 2.0, ACC), denom)  # 2 * reduction scale

    # Pass 1: the norms.
    ss = tl.zeros([BLOCK], dtype=ACC)
    tt = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        n = start + tl.arange(0, BLOCK)
        mask = n < N
        s = _merged(ps_ptr, splits_s, B, b, N, n, mask, Cs, ACC, BLOCK)
        t = _merged(pt_ptr, splits_t, B, b, N, n, mask, Ct, ACC, BLOCK)
        ss += s * s
        tt += t * t
    ss_sum = tl.sum(ss, axis=0)
    tt_sum = tl.sum(tt, axis=0)
    if ss_sum.dtype.is_fp64():
        norm_s = tl.sqrt(ss_sum)
        norm_t = tl.sqrt(tt_sum)
    else:
        norm_s = tl.sqrt_rn(ss_sum)
        norm_t = tl.sqrt_rn(tt_sum)
    ns = tl.maximum(norm_s, eps)
    nt = tl.maximum(norm_t, eps)

    # Pass 2: sum of d^2 and <as, d>, d = as - at.
    d2 = tl.zeros([BLOCK], dtype=ACC)
    dt = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N, BLOCK):
        n = start + tl.arange(0, BLOCK)
        mask = n < N
        a_s = _div(_merged(ps_ptr, splits_s, B, b, N, n, mask, Cs, ACC, BLOCK), ns)
        d = a_s - _div(_merged(pt_ptr, splits_t, B, b, N, n, mask, Ct, ACC, BLOCK), nt)
        d2 += d * d
        dt += a_s * d
    tl.store(partial_ptr + b, tl.sum(d2, axis=0))
    # Below eps the norm is the constant eps: coeff = k * d / eps (no projection term).
    dot = tl.where(norm_s > eps, tl.sum(dt, axis=0), 0.0)

    # Pass 3: coeff = k * (d - as <as, d>) / ns.
    for start in range(0, N, BLOCK):
        n = start + tl.arange(0, BLOCK)
        mask = n < N
        a_s = _div(_merged(ps_ptr, splits_s, B, b, N, n, mask, Cs, ACC, BLOCK), ns)
        d = a_s - _div(_merged(pt_ptr, splits_t, B, b, N, n, mask, Ct, ACC, BLOCK), nt)
        tl.store(c_ptr + n, _div(k * (d - a_s * dot), ns), mask=mask)


@triton.jit
def _at_backward_kernel(
    g_ptr, x_ptr, coeff_ptr, gx_ptr,
    b0, C, H, W, Ho, Wo,
    sB, sC, sH, sW, sN,
    gB, gC, gH, gW, gN,
    scale_h, scale_w, win_h, win_w, p,
    P: tl.constexpr, RESIZE: tl.constexpr, FLAT: tl.constexpr, GFLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_x[b, c, h, w] = g / C * sum_o weight(o, (h, w)) * coeff[b, o] * dpow(y[b, c, o])."""
    ACC: tl.constexpr = coeff_ptr.dtype.element_ty
    scale_h, scale_w, p = _float_args(scale_h, scale_w, p, ACC)
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (tl.program_id(2) + b0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input pixels
    mask_n = n < H * W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = c < C
    k = _div(tl.load(g_ptr).to(ACC), C)  # upstream gradient / C, read on the device
    base = x_ptr + b * sB
    coff = (c.to(tl.int64) * sC)[:, None]
    cf_base = coeff_ptr + b * Ho * Wo
    if RESIZE:
        hi = n // W
        wi = n % W
        first_h = _window_first(hi, scale_h)
        first_w = _window_first(wi, scale_w)
        acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
        for dh in range(0, win_h):
            ho = first_h + dh
            h0, h1, lh0, lh1 = _taps(ho, H, scale_h)
            # Weights in ACC: exact sums and products of the fp32 tap weights in float64.
            wh = tl.where(h0 == hi, lh0.to(ACC), 0.0) + tl.where(h1 == hi, lh1.to(ACC), 0.0)
            wh = tl.where(ho < Ho, wh, 0.0)
            for dw in range(0, win_w):
                wo = first_w + dw
                w0, w1, lw0, lw1 = _taps(wo, W, scale_w)
                ww = tl.where(w0 == wi, lw0.to(ACC), 0.0) + tl.where(w1 == wi, lw1.to(ACC), 0.0)
                ww = tl.where(wo < Wo, ww, 0.0)
                wgt = wh * ww
                ok = mask_n & (wgt != 0.0)
                y = _sample(base, coff, mask_c[:, None] & ok[None, :],
                            h0, h1, w0, w1, lh0, lh1, lw0, lw1, sH, sW, ACC)
                cf = tl.load(cf_base + ho.to(tl.int64) * Wo + wo, mask=ok, other=0.0)
                acc += (wgt * cf)[None, :] * _power_grad(y, p, P)
        gx = k * acc
    else:
        mask = mask_c[:, None] & mask_n[None, :]
        off = _pixel_offsets(n, W, sH, sW, sN, FLAT)
        v = tl.load(base + coff + off[None, :], mask=mask, other=0.0).to(ACC)
        cf = tl.load(cf_base + n, mask=mask_n, other=0.0)
        gx = (k * cf)[None, :] * _power_grad(v, p, P)
    goff = _pixel_offsets(n, W, gH, gW, gN, GFLAT)
    g_out = gx_ptr + b * gB + (c.to(tl.int64) * gC)[:, None] + goff[None, :]
    tl.store(g_out, gx.to(gx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_n[None, :])


# --- host side ------------------------------------------------------------------------------


def _power_kind(p: float) -> int:
    return 2 if p == 2.0 else (4 if p == 4.0 else 0)


def _tile(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_N) for x's layout: channels contiguous (channels_last) or pixels."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        return _TILE_CHANNELS_CONTIGUOUS
    return _TILE_PIXELS_CONTIGUOUS


def _resize_params(size_in: int, size_out: int) -> tuple[float, int]:
    """PyTorch's float32 scale in / out and the backward gather window (bilinear.h)."""
    scale = np.float32(int(size_in)) / np.float32(int(size_out))
    window = int(np.float32(2.0) / scale) + 4
    return float(scale), window


def _map_plan(x: torch.Tensor, N: int, B: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_C, BLOCK_N, pixel blocks, channel splits, channels per split) of one input."""
    block_c, block_n = _tile(x)
    tiles = triton.cdiv(N, block_n)
    splits, chunk = _split_k(x.shape[1], block_c, tiles * B, _MAP_TARGET_PROGRAMS)
    return block_c, block_n, tiles, splits, chunk


def _launch_maps(fs: torch.Tensor, ft: torch.Tensor, p: float):
    """The channel-split power sums of fs (resampled) and ft: ((splits, B, N) each, splits)."""
    B, Cs, Hs, Ws = fs.shape
    Ct, Ho, Wo = ft.shape[1], ft.shape[2], ft.shape[3]
    N = Ho * Wo
    resize = (Hs, Ws) != (Ho, Wo)
    scale_h = _resize_params(Hs, Ho)[0] if resize else 1.0
    scale_w = _resize_params(Ws, Wo)[0] if resize else 1.0
    s_flat, s_n = _flat(fs)
    t_flat, t_n = _flat(ft)
    block_cs, block_ns, tiles_s, splits_s, chunk_s = _map_plan(fs, N, B)
    block_ct, block_nt, tiles_t, splits_t, chunk_t = _map_plan(ft, N, B)
    acc = _acc_dtype(fs)
    part_s = torch.empty((splits_s, B, N), dtype=acc, device=fs.device)
    part_t = torch.empty((splits_t, B, N), dtype=acc, device=fs.device)
    progs_s = tiles_s * splits_s
    for b0, nb in _batch_chunks(B):
        _launch(_at_map_kernel)[(progs_s + tiles_t * splits_t, nb)](
            fs, ft, part_s, part_t, b0, B, tiles_s, progs_s, chunk_s, tiles_t, chunk_t,
            Cs, Hs, Ws, Ct, Wo, N,
            *fs.stride(), s_n, *ft.stride(), t_n,
            scale_h, scale_w, p,
            P=_power_kind(p), RESIZE=resize, SFLAT=s_flat, TFLAT=t_flat,
            BLOCK_CS=block_cs, BLOCK_NS=block_ns, BLOCK_CT=block_ct, BLOCK_NT=block_nt,
            num_warps=_NUM_WARPS,
        )
    return part_s, part_t, splits_s, splits_t


_DENOM = {"mean": lambda b, n: b * n, "batchmean": lambda b, n: b, "sum": lambda b, n: 1}


def _attention_transfer_fwd(
    fs: torch.Tensor, ft: torch.Tensor, p: float, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, coeff): coeff[b, ho, wo] = d loss / d ms[b, ho, wo] for a unit upstream gradient."""
    if reduction not in _DENOM:
        raise ValueError(f"attention_transfer: unknown reduction {reduction!r}")
    B, Ho, Wo = ft.shape[0], ft.shape[2], ft.shape[3]
    N = Ho * Wo
    acc = _acc_dtype(fs)
    coeff = torch.empty((B, Ho, Wo), dtype=acc, device=fs.device)
    partial = torch.empty((B,), dtype=acc, device=fs.device)
    part_s, part_t, splits_s, splits_t = _launch_maps(fs, ft, p)
    denom = _DENOM[reduction](B, N)
    _launch(_at_finalize_kernel)[(B,)](
        part_s, part_t, coeff, partial, B, N, splits_s, splits_t, fs.shape[1], ft.shape[1], denom,
        BLOCK=_BLOCK_FINALIZE, num_warps=_NUM_WARPS)
    return _finish(partial, 1.0 / denom), coeff


def _attention_transfer_bwd(
    grad: torch.Tensor, fs: torch.Tensor, coeff: torch.Tensor, p: float
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    if coeff.dim() != 3 or not coeff.is_contiguous():
        raise ValueError("attention_transfer_backward: coeff must be a contiguous (B, Ho, Wo) map")
    B, C, H, W = fs.shape
    Ho, Wo = coeff.shape[1], coeff.shape[2]
    gx = torch.empty_like(fs)
    resize = (H, W) != (Ho, Wo)
    scale_h, win_h = _resize_params(H, Ho) if resize else (1.0, 1)
    scale_w, win_w = _resize_params(W, Wo) if resize else (1.0, 1)
    flat, s_n = _flat(fs)
    gflat, g_n = _flat(gx)
    block_c, block_n = _tile(fs)
    tiles = (triton.cdiv(H * W, block_n), triton.cdiv(C, block_c))
    for b0, nb in _batch_chunks(B):
        _launch(_at_backward_kernel)[(*tiles, nb)](
            grad, fs, coeff, gx,
            b0, C, H, W, Ho, Wo,
            fs.stride(0), fs.stride(1), fs.stride(2), fs.stride(3), s_n,
            gx.stride(0), gx.stride(1), gx.stride(2), gx.stride(3), g_n,
            scale_h, scale_w, win_h, win_w, p,
            P=_power_kind(p), RESIZE=resize, FLAT=flat, GFLAT=gflat,
            BLOCK_C=block_c, BLOCK_N=block_n, num_warps=_BWD_WARPS,
        )
    return gx


# Explicit fake (meta) kernels, used on every device: triton_op could trace the bodies above
# instead, but these are cheaper and the interpreter's custom_op needs them.
def _fake_fwd(fs, ft, p, reduction):
    acc = _acc_dtype(fs)
    loss = fs.new_empty((), dtype=acc)
    coeff = fs.new_empty((ft.shape[0], ft.shape[2], ft.shape[3]), dtype=acc)
    return loss, coeff


def _fake_bwd(grad, fs, coeff, p):
    return torch.empty_like(fs)


_attention_transfer = fused_loss(
    "attention_transfer_triton", _attention_transfer_fwd, _attention_transfer_bwd, _fake_fwd,
    _fake_bwd, saved_inputs=(0,), const_inputs=(2,))


def attention_transfer(fs: torch.Tensor, ft: torch.Tensor, p: float, reduction: str) -> torch.Tensor:
    """Attention-transfer loss (0-dim; float32, float64 for float64 inputs), autograd to fs.

    Inputs are validated by the caller: fs (B, Cs, Hs, Ws) and ft (B, Ct, Ht, Wt) on one device,
    any strides; the student is bilinearly resampled to the teacher's grid inside the kernels.
    """
    return _attention_transfer(fs, ft.detach(), float(p), reduction)
