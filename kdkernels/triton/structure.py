"""Structure loss (PraNet / Polyp-PVT) in Triton: kernels, launcher and autograd in one place.

Every (b, k) map is one image. The 31 x 31 box filter is separable, and each direction is a
sliding sum written without register shifts: for a tile starting at row r0 the window sum of
row r0 - 1 is one [32, TW] load summed over its 31 live rows, and the sums of the tile's rows
follow as that carry plus a cumulative sum of (entering row - leaving row), two shifted loads.
So a pixel costs about 2.5 cached loads per direction instead of 31, and the rounding of a
general (non 0/1) mask grows only along one tile, not along the image; 0/1 masks are exact.

* vsum kernel, grid (row tiles * column tiles, images): vs = the vertical 31-sums of the mask,
  (images, H, W) in the accumulation type. The one intermediate in memory.
* forward kernel, same grid over [TH, TW] tiles: the horizontal 31-sums of vs give w; with the
  logits the tile's sums of w, w * bce, I = w p m and E = w (p (1 - m) + (1 - p) m) = U - 2I go
  to a (images, tiles, 4) buffer (no atomics).
* finalize kernel, one program: per image the tiles' sums in a fixed order, in float64, the
  loss, and the three gradient constants (images, 3). Deterministic run to run.
* backward kernel, the forward's grid: recomputes w, p from vs and the logits and writes
  grad = g * w * ((p (1 - m) - (1 - p) m) / sum w + p (1 - p) ((I + 1) - (U + 2) m) / D^2) / images
  (D = U - I + 1) straight in the logits' dtype and layout.
The backward recomputes rather than saving a unit gradient from the forward: per pixel it reads
logits, mask and vs (12 bytes for float32) where the saved-gradient route pays a full gradient
write in the forward and its read in the backward (16 bytes) for compute that is free on a
memory-bound GPU kernel. E and p - m are formed as above (1 - p as sigmoid(-z)) so that neither
cancels when the prediction is close to the mask.

Tensors are read through their element strides with int64 offsets (NCHW, channels_last, views);
bool masks are read as bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.triton._common import _acc_dtype, _batch_chunks, _cast_for, _div, _launch, fused_loss

__all__ = ["structure"]

# [rows, columns] per program: the vsum kernel's column sums and the forward/backward tiles
# (64-element rows: 256-byte coalesced float32 runs); the finalize kernel's [images, tiles] step.
# 8 warps: ptxas (sm_90) gives the [32, 64] tiles 79-114 registers, no spills, float64 included
# (with 4 warps: 133-168, and the float64 forward spills).
_TILE_VSUM = (64, 64)
_TILE = (32, 64)
_FINALIZE = (16, 64)
_NUM_WARPS = 8


@triton.jit
def _load_tile(base, rows, cols, H, W, sH, sW, ACC: tl.constexpr):
    """x[rows, cols] of an H x W plane in ACC, 0 outside it (the box filter's zero padding)."""
    ok = ((rows >= 0) & (rows < H))[:, None] & ((cols >= 0) & (cols < W))[None, :]
    off = rows.to(tl.int64)[:, None] * sH + cols.to(tl.int64)[None, :] * sW
    return tl.load(base + off, mask=ok, other=0).to(ACC)


@triton.jit
def _image_base(ptr, img, K, sB, sK):
    return ptr + (img // K).to(tl.int64) * sB + (img % K).to(tl.int64) * sK


@triton.jit
def _vsum_kernel(m_ptr, vs_ptr, img0, K, H, W, mB, mK, mH, mW,
                 TH: tl.constexpr, TW: tl.constexpr):
    """vs[img, r, c] = sum of mask[img, r - 15 .. r + 15, c]."""
    ACC: tl.constexpr = vs_ptr.dtype.element_ty
    img = tl.program_id(1) + img0
    tiles_w = tl.cdiv(W, TW)
    r0 = (tl.program_id(0) // tiles_w) * TH
    cols = (tl.program_id(0) % tiles_w) * TW + tl.arange(0, TW)
    base = _image_base(m_ptr, img, K, mB, mK)
    t = tl.arange(0, 32)
    halo = tl.where(t < 31, r0 - 16 + t, -1)  # rows r0 - 16 .. r0 + 14: the window of r0 - 1
    carry = tl.sum(_load_tile(base, halo, cols, H, W, mH, mW, ACC), axis=0)
    rows = r0 + tl.arange(0, TH)
    step = _load_tile(base, rows + 15, cols, H, W, mH, mW, ACC) - \
        _load_tile(base, rows - 16, cols, H, W, mH, mW, ACC)
    vs = carry[None, :] + tl.cumsum(step, axis=0)
    out = vs_ptr + img.to(tl.int64) * H * W + rows.to(tl.int64)[:, None] * W + cols[None, :]
    tl.store(out, vs, mask=(rows < H)[:, None] & (cols < W)[None, :])


@triton.jit
def _tile_terms(z_ptr, m_ptr, vs_ptr, img, K, H, W, zB, zK, zH, zW, mB, mK, mH, mW,
                TH: tl.constexpr, TW: tl.constexpr):
    """The program's [TH, TW] tile: (rows, cols, in-image mask, m, w, p, q, bce), w = 0 outside."""
    ACC: tl.constexpr = vs_ptr.dtype.element_ty
    tiles_w = tl.cdiv(W, TW)
    rows = (tl.program_id(0) // tiles_w) * TH + tl.arange(0, TH)
    c0 = (tl.program_id(0) % tiles_w) * TW
    cols = c0 + tl.arange(0, TW)
    # Horizontal 31-sums of vs: carry = the window of column c0 - 1, then entering - leaving.
    vs = vs_ptr + img.to(tl.int64) * H * W
    t = tl.arange(0, 32)
    halo = tl.where(t < 31, c0 - 16 + t, -1)
    carry = tl.sum(_load_tile(vs, rows, halo, H, W, W, 1, ACC), axis=1)
    step = _load_tile(vs, rows, cols + 15, H, W, W, 1, ACC) - \
        _load_tile(vs, rows, cols - 16, H, W, W, 1, ACC)
    box = carry[:, None] + tl.cumsum(step, axis=1)

    z = _load_tile(_image_base(z_ptr, img, K, zB, zK), rows, cols, H, W, zH, zW, ACC)
    m = _load_tile(_image_base(m_ptr, img, K, mB, mK), rows, cols, H, W, mH, mW, ACC)
    inside = (rows < H)[:, None] & (cols < W)[None, :]
    w = tl.where(inside, 1.0 + 5.0 * tl.abs(_div(box, 961.0) - m), 0.0)
    e = tl.exp(-tl.abs(z))
    u = 1.0 + e
    r = _div(tl.full(e.shape, 1.0, ACC), u)
    er = e * r
    pos = z >= 0
    p = tl.where(pos, r, er)
    q = tl.where(pos, er, r)  # 1 - p, as sigmoid(-z)
    # log1p(e) = log(u) * e / (u - 1): exact up to log's rounding even where u rounds to 1.
    log1p = tl.where(u == 1.0, e, tl.log(u) * _div(e, tl.where(u == 1.0, 1.0, u - 1.0)))
    bce = tl.maximum(z, 0.0) - z * m + log1p
    return m, w, p, q, bce, rows, cols, inside


@triton.jit
def _structure_fwd_kernel(
    z_ptr, m_ptr, vs_ptr, part_ptr,
    img0, K, H, W, zB, zK, zH, zW, mB, mK, mH, mW,
    TH: tl.constexpr, TW: tl.constexpr,
):
    """part[img, tile] = the tile's (sum w, sum w bce, I, E)."""
    img = tl.program_id(1) + img0
    m, w, p, q, bce, _, _, _ = _tile_terms(z_ptr, m_ptr, vs_ptr, img, K, H, W,
                                           zB, zK, zH, zW, mB, mK, mH, mW, TH, TW)
    out = part_ptr + (img.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * 4
    tl.store(out, tl.sum(w))
    tl.store(out + 1, tl.sum(w * bce))
    tl.store(out + 2, tl.sum(w * p * m))
    tl.store(out + 3, tl.sum(w * (p * (1.0 - m) + q * m)))


@triton.jit
def _structure_finalize_kernel(part_ptr, consts_ptr, loss_ptr, images, tiles,
                               BI: tl.constexpr, BT: tl.constexpr):
    """Per image: the loss term and consts = (1 / sum w, (I + 1) / D^2, (U + 2) / D^2) / images."""
    ACC: tl.constexpr = consts_ptr.dtype.element_ty
    n = tl.zeros([BI], tl.float64) + images
    total = tl.zeros([BI], tl.float64)
    for i0 in range(0, images, BI):
        img = i0 + tl.arange(0, BI)
        ok_img = img < images
        # [BI, BT] accumulators reduced once after the loop: Triton 3.6 fails to compile a float64
        # tl.sum carried through the loop (its thread-locality pass, on sm_90).
        a_w = tl.zeros([BI, BT], tl.float64)
        a_b = tl.zeros([BI, BT], tl.float64)
        a_i = tl.zeros([BI, BT], tl.float64)
        a_e = tl.zeros([BI, BT], tl.float64)
        for t0 in range(0, tiles, BT):
            t = t0 + tl.arange(0, BT)
            ok = ok_img[:, None] & (t < tiles)[None, :]
            src = part_ptr + (img.to(tl.int64)[:, None] * tiles + t[None, :]) * 4
            a_w += tl.load(src, mask=ok, other=0.0).to(tl.float64)
            a_b += tl.load(src + 1, mask=ok, other=0.0).to(tl.float64)
            a_i += tl.load(src + 2, mask=ok, other=0.0).to(tl.float64)
            a_e += tl.load(src + 3, mask=ok, other=0.0).to(tl.float64)
        s_b = tl.sum(a_b, axis=1)
        s_i = tl.sum(a_i, axis=1)
        s_e = tl.sum(a_e, axis=1)
        s_w = tl.where(ok_img, tl.sum(a_w, axis=1), 1.0)
        d = s_e + s_i + 1.0
        total += tl.where(ok_img, s_b / s_w + s_e / d, 0.0)
        nd2 = n * d * d
        dst = consts_ptr + img.to(tl.int64) * 3
        tl.store(dst, (1.0 / (n * s_w)).to(ACC), mask=ok_img)
        tl.store(dst + 1, ((s_i + 1.0) / nd2).to(ACC), mask=ok_img)
        tl.store(dst + 2, ((s_e + 2.0 * s_i + 2.0) / nd2).to(ACC), mask=ok_img)
    tl.store(loss_ptr, (tl.sum(total) / images).to(ACC))


@triton.jit
def _structure_bwd_kernel(
    g_ptr, z_ptr, m_ptr, vs_ptr, consts_ptr, gx_ptr,
    img0, K, H, W, zB, zK, zH, zW, mB, mK, mH, mW, gB, gK, gH, gW,
    TH: tl.constexpr, TW: tl.constexpr,
):
    ACC: tl.constexpr = vs_ptr.dtype.element_ty
    img = tl.program_id(1) + img0
    m, w, p, q, _, rows, cols, inside = _tile_terms(z_ptr, m_ptr, vs_ptr, img, K, H, W,
                                                    zB, zK, zH, zW, mB, mK, mH, mW, TH, TW)
    c = consts_ptr + img.to(tl.int64) * 3
    ka = tl.load(c)
    c1 = tl.load(c + 1)
    c2 = tl.load(c + 2)
    g = tl.load(g_ptr).to(ACC)
    gx = (g * w) * ((p * (1.0 - m) - q * m) * ka + p * q * (c1 - c2 * m))
    off = rows.to(tl.int64)[:, None] * gH + cols.to(tl.int64)[None, :] * gW
    dst = _image_base(gx_ptr, img, K, gB, gK) + off
    tl.store(dst, _cast_for(gx, gx_ptr), mask=inside)


# --- host side ------------------------------------------------------------------------------


def _readable(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _tiles(shape, tile) -> int:
    return triton.cdiv(shape[2], tile[0]) * triton.cdiv(shape[3], tile[1])


def _structure_fwd(
    logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, vs, consts): vs the mask's vertical 31-sums, consts the per-image gradient constants."""
    B, K, H, W = logits.shape
    acc = _acc_dtype(logits)
    m = _readable(mask)
    dev = logits.device
    vs = torch.empty((B * K, H, W), dtype=acc, device=dev)
    tiles = _tiles(logits.shape, _TILE)
    partial = torch.empty((B * K, tiles, 4), dtype=acc, device=dev)
    for img0, n in _batch_chunks(B * K):
        _launch(_vsum_kernel)[(_tiles(logits.shape, _TILE_VSUM), n)](
            m, vs, img0, K, H, W, *m.stride(),
            TH=_TILE_VSUM[0], TW=_TILE_VSUM[1], num_warps=_NUM_WARPS)
        _launch(_structure_fwd_kernel)[(tiles, n)](
            logits, m, vs, partial, img0, K, H, W, *logits.stride(), *m.stride(),
            TH=_TILE[0], TW=_TILE[1], num_warps=_NUM_WARPS)
    consts = torch.empty((B * K, 3), dtype=acc, device=dev)
    loss = torch.empty((), dtype=acc, device=dev)
    _launch(_structure_finalize_kernel)[(1,)](
        partial, consts, loss, B * K, tiles, BI=_FINALIZE[0], BT=_FINALIZE[1], num_warps=4)
    return loss, vs, consts


def _structure_bwd(
    grad: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, vs: torch.Tensor,
    consts: torch.Tensor,
) -> torch.Tensor:
    """d loss / d logits for upstream gradient `grad` (0-dim), in the logits' dtype and layout."""
    gx = torch.empty_like(logits)
    m = _readable(mask)
    B, K, H, W = logits.shape
    for img0, n in _batch_chunks(B * K):
        _launch(_structure_bwd_kernel)[(_tiles(logits.shape, _TILE), n)](
            grad, logits, m, vs, consts, gx, img0, K, H, W,
            *logits.stride(), *m.stride(), *gx.stride(),
            TH=_TILE[0], TW=_TILE[1], num_warps=_NUM_WARPS)
    return gx


def _fake_fwd(logits, mask):
    B, K, H, W = logits.shape
    acc = _acc_dtype(logits)
    return (logits.new_empty((), dtype=acc), logits.new_empty((B * K, H, W), dtype=acc),
            logits.new_empty((B * K, 3), dtype=acc))


def _fake_bwd(grad, logits, mask, vs, consts):
    return torch.empty_like(logits)


_structure = fused_loss("structure_triton", _structure_fwd, _structure_bwd, _fake_fwd, _fake_bwd,
                       saved_inputs=(0, 1), const_inputs=())


def structure(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Structure loss (0-dim; float32, float64 for float64 logits), autograd to the logits.

    Inputs validated by the caller: logits (B, K, H, W) and a mask of the same shape (floating
    or bool), any strides, on one device.
    """
    return _structure(logits, mask.detach())
