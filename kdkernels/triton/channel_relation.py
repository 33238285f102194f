"""Channel relation (CPKD) in Triton: kernels, launcher and autograd registration in one place.

Per sample the C rows F_c (length N = H * W) are normalised (l2: F_c / max(||F_c||, eps);
softmax: softmax(F_c / tau) over N), G = Fn Fn^T (C x C) and G_s is compared with G_t (mse, or
tau^2 KL of the row softmaxes of G / tau). Math and op contract: SPEC section 3 and the relations
contract (outputs loss, grad_gram = d loss / d G_s, row_stats). Four kernels per forward +
backward, whatever the shape:

* _cr_gram_kernel, grid (C tile pairs of the student then of the teacher, splits of N, B):
  split-K Grams of both inputs in one launch, each program summing its chunk of pixels. "l2"
  forms the raw Gram R = F F^T (its diagonal holds the squared row norms, so the rows are never
  normalised in memory); "softmax" the Gram of exp(F / tau - m) with m the running row maximum
  of the chunk, the accumulator rescaled as the maxima grow (online softmax), and writes each
  chunk's row maxima and sums. One read of fs and ft, no statistics pass.
* _cr_tail_kernel, grid (B,): per sample, merges the splits in a fixed order (rescaled to the
  global row maxima for "softmax"), normalises (G_ij = R_ij / (n_i n_j), or / (z_i z_j)), and
  evaluates the C x C distance in float64: the sample's loss term, grad_gram, G_s (kept for the
  backward) and row_stats.
* _common._finish: the fixed-order sum of the samples' terms.
* _cr_backward_kernel, grid (N blocks, C blocks, B): dFn = M Fn with M = g (grad_gram +
  grad_gram^T) formed from grad_gram as it loads, Fn recomputed from the raw input and row_stats,
  fused with the normalisation backward; its per-row dot <Fn_c, dFn_c> = sum_k M_ck G_ck (G
  symmetric) comes from the saved G_s in the same loop. g is read on the device.

Precision: the Grams are float64 products (tensor cores, _common._mm): G_s - G_t is a small
difference of O(1) sums whenever the rows are near uniform (softmax rows with a large tau) or
near the teacher's, and the C x C part is float64 too, where the KL of the row softmaxes of
G / tau would otherwise cancel. The backward runs in the accumulation type (float32, float64 for
float64 inputs). Inputs are read through their element strides (NCHW, channels_last, slices)
with int64 offsets; nothing is copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.triton._common import (
    F64_DOT,
    _acc_dtype,
    _batch_chunks,
    _bits,
    _cast_for,
    _div,
    _eps_like,
    _f64,
    _finish,
    _inv_norm,
    _launch,
    _mm,
    _mm_from16,
    _pixel_offsets,
    _pow2,
    _split_k,
    _strides,
    fused_loss,
)

__all__ = ["channel_relation"]

# Gram tiles: [BC, BC] outputs (BC = C rounded up to a power of two, 16 .. max BC), BK pixels
# per step, float64 tensor-core products (_common._mm; FMA-sized tiles on a Triton without
# float64 dots); splits of N so that about _GRAM_TARGET_PROGRAMS programs run (_common._split_k).
_GRAM_BLOCK = (64, 16) if F64_DOT else (32, 8)  # (max BC, BK)
_GRAM_WARPS = 8 if F64_DOT else 4
_GRAM_TARGET_PROGRAMS = 512
# Tail: BR rows of the C x C matrices at a time, all columns (padded to a power of two).
_TAIL_ELEMS = 2048
# 8 warps: the kl tail's ten live float64 tiles then fit in registers (4 spilled ~0.9-1.3 kB per
# thread block in Triton 3.8's sm_90 build).
_TAIL_WARPS = 8
# Backward: [BLOCK_CO, BLOCK_N] output tiles, BLOCK_K channels per tl.dot step (BLOCK_CO and
# BLOCK_K shrink to the next power of two >= C, at least 16). float64 uses FMA products
# (BLOCK_CO x BLOCK_K x BLOCK_N = 8192 per step). Sizes and warps from ptxas register reports
# for sm_90 (no spills), not from timings.
_BWD_BLOCK = (64, 64, 16)  # (max BLOCK_CO, BLOCK_N, max BLOCK_K)
_BWD_BLOCK_FP64 = (32, 32, 8)
_BWD_WARPS = (8, 4)  # (float32 accumulation, float64)

_NORMALIZE = ("l2", "softmax")
_DISTANCE = ("mse", "kl")


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _gram_tile(x_ptr, b, c1, c2, C, W, start, end, inv_tau,
               xB, xC, xH, xW, xN,
               SOFTMAX: tl.constexpr, FLAT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """[BC, BC] float64 Gram tile of rows c1 x rows c2 over pixels [start, end), with (SOFTMAX)
    the rows' running maxima of x / tau over those pixels and their sums of exp(x / tau - max).
    16-bit rows go through _mm_from16: the raw products exact in a 16-bit tensor-core step
    ("l2"), the float64 exponentials as tf32x3 products ("softmax")."""
    FROM16: tl.constexpr = x_ptr.dtype.element_ty.primitive_bitwidth == 16
    m1_ok = c1 < C
    m2_ok = c2 < C
    base1 = x_ptr + b * xB + (c1.to(tl.int64) * xC)[:, None]
    base2 = x_ptr + b * xB + (c2.to(tl.int64) * xC)[None, :]
    acc = tl.zeros([BC, BC], dtype=tl.float64)
    # Rows past C start at 0, not -inf: no -inf - -inf in lanes that are never stored.
    mx1 = tl.where(m1_ok, float("-inf"), 0.0).to(tl.float64)
    mx2 = tl.where(m2_ok, float("-inf"), 0.0).to(tl.float64)
    z1 = tl.zeros([BC], dtype=tl.float64)
    for k0 in range(start, end, BK):
        n = k0 + tl.arange(0, BK)
        mn = n < end
        mask1 = m1_ok[:, None] & mn[None, :]
        mask2 = mn[:, None] & m2_ok[None, :]
        x1 = tl.load(base1 + _pixel_offsets(n, W, xH, xW, xN, FLAT)[None, :], mask=mask1, other=0.0)
        x2 = tl.load(base2 + _pixel_offsets(n, W, xH, xW, xN, FLAT)[:, None], mask=mask2, other=0.0)
        if SOFTMAX:
            u1 = tl.where(mask1, x1.to(tl.float64) * inv_tau, float("-inf"))
            u2 = tl.where(mask2, x2.to(tl.float64) * inv_tau, float("-inf"))
            new1 = tl.maximum(mx1, tl.max(u1, axis=1))
            new2 = tl.maximum(mx2, tl.max(u2, axis=0))
            a1 = tl.exp(mx1 - new1)
            acc = acc * a1[:, None] * tl.exp(mx2 - new2)[None, :]
            e1 = tl.exp(u1 - new1[:, None])
            z1 = z1 * a1 + tl.sum(e1, axis=1)
            acc = _mm_from16(e1, tl.exp(u2 - new2[None, :]), acc, FROM16)
            mx1 = new1
            mx2 = new2
        else:
            acc = _mm_from16(x1, x2, acc, FROM16)
    return acc, mx1, z1


@triton.jit
def _cr_gram_kernel(
    s_ptr, t_ptr, inv_tau_bits, part_ptr, stat_ptr,
    B, b0, C, N, W, chunk, tiles,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    SOFTMAX: tl.constexpr, SFLAT: tl.constexpr, TFLAT: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr,
):
    """part[split, which, b] = the Gram tile of the student (which 0) or teacher (1) over the
    split's pixels; stat[split, which, b, c] = (row max, row sum) of that chunk (SOFTMAX)."""
    pid = tl.program_id(0)
    which = pid // tiles
    tile = pid % tiles
    split = tl.program_id(1)
    b = (tl.program_id(2) + b0).to(tl.int64)
    per_row = tl.cdiv(C, BC)
    c1 = (tile // per_row) * BC + tl.arange(0, BC)
    c2 = (tile % per_row) * BC + tl.arange(0, BC)
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    inv_tau = _f64(inv_tau_bits)
    if which == 0:
        acc, mx, z = _gram_tile(s_ptr, b, c1, c2, C, W, start, end, inv_tau,
                                sB, sC, sH, sW, sN, SOFTMAX, SFLAT, BC, BK)
    else:
        acc, mx, z = _gram_tile(t_ptr, b, c1, c2, C, W, start, end, inv_tau,
                                tB, tC, tH, tW, tN, SOFTMAX, TFLAT, BC, BK)
    slot = (split * 2 + which) * B + b
    out = part_ptr + (slot * C + c1[:, None]) * C + c2[None, :]
    tl.store(out, acc, mask=(c1 < C)[:, None] & (c2 < C)[None, :])
    if SOFTMAX:
        if tile % per_row == 0:  # one writer per row
            row = stat_ptr + (slot * C + c1) * 2
            tl.store(row, mx, mask=c1 < C)
            tl.store(row + 1, z, mask=c1 < C)


@triton.jit
def _merged_rows(part_ptr, stat_ptr, which, b, B, rows, cols, C, splits, mx_r, mx_c,
                 SOFTMAX: tl.constexpr):
    """sum over the splits of the Gram rows `rows` x `cols` of input `which`, each split rescaled
    to the global row maxima mx_r (rows) and mx_c (columns) when SOFTMAX."""
    mask = (rows < C)[:, None] & (cols < C)[None, :]
    g = tl.zeros(mask.shape, dtype=tl.float64)
    for split in range(0, splits):
        slot = (split * 2 + which) * B + b
        tile = tl.load(part_ptr + (slot * C + rows[:, None]) * C + cols[None, :], mask=mask,
                       other=0.0)
        if SOFTMAX:
            mr = tl.load(stat_ptr + (slot * C + rows) * 2, mask=rows < C, other=0.0)
            mc = tl.load(stat_ptr + (slot * C + cols) * 2, mask=cols < C, other=0.0)
            tile = tile * tl.exp(mr - mx_r)[:, None] * tl.exp(mc - mx_c)[None, :]
        g += tile
    return g


@triton.jit
def _row_scales(part_ptr, stat_ptr, which, b, B, c, C, splits, SOFTMAX: tl.constexpr):
    """Per row c of input `which`: (1 / max(n, eps), n) for "l2" from the merged diagonal, or
    (1 / z, max) for "softmax" with the global maximum and sum z of exp(x / tau - max)."""
    ok = c < C
    if SOFTMAX:
        mx = tl.full(c.shape, float("-inf"), tl.float64)
        for split in range(0, splits):
            slot = (split * 2 + which) * B + b
            mx = tl.maximum(mx, tl.load(stat_ptr + (slot * C + c) * 2, mask=ok, other=0.0))
        mx = tl.where(ok, mx, 0.0)
        z = tl.zeros(c.shape, dtype=tl.float64)
        for split in range(0, splits):
            slot = (split * 2 + which) * B + b
            m = tl.load(stat_ptr + (slot * C + c) * 2, mask=ok, other=0.0)
            z += tl.load(stat_ptr + (slot * C + c) * 2 + 1, mask=ok, other=0.0) * tl.exp(m - mx)
        scale = 1.0 / tl.where(ok, z, 1.0)
        stat = mx
    else:
        sq = tl.zeros(c.shape, dtype=tl.float64)
        for split in range(0, splits):
            slot = (split * 2 + which) * B + b
            sq += tl.load(part_ptr + (slot * C + c) * C + c, mask=ok, other=0.0)
        stat = tl.sqrt(sq)  # R_cc = sum x^2 >= 0
        scale = _inv_norm(stat)
    return scale, stat


@triton.jit
def _cr_tail_kernel(
    part_ptr, stat_ptr, tau_bits, grad_gram_ptr, gs_ptr, row_stats_ptr, term_ptr,
    B, C, splits, coef_bits,
    SOFTMAX: tl.constexpr, KL: tl.constexpr, BR: tl.constexpr, BCOL: tl.constexpr,
):
    """Sample b: G_s, G_t from the split partials; term[b] = its share of the loss before the
    final scale, grad_gram = d loss / d G_s (unit upstream gradient), G_s and row_stats kept."""
    b = tl.program_id(0).to(tl.int64)
    tau = _f64(tau_bits)
    coef = _f64(coef_bits)  # grad_gram = coef (G_s - G_t) (mse) or coef (p_s - p_t) (kl)
    cols = tl.arange(0, BCOL)
    ok_c = cols < C
    sc_s, st_s = _row_scales(part_ptr, stat_ptr, 0, b, B, cols, C, splits, SOFTMAX)
    sc_t, st_t = _row_scales(part_ptr, stat_ptr, 1, b, B, cols, C, splits, SOFTMAX)
    if SOFTMAX:
        z_s = 1.0 / sc_s
        mx_s = st_s
        mx_t = st_t
    else:
        z_s = tl.zeros([BCOL], dtype=tl.float64)
        mx_s = z_s
        mx_t = z_s
    tl.store(row_stats_ptr + (b * C + cols) * 2, _cast_for(st_s, row_stats_ptr), mask=ok_c)
    tl.store(row_stats_ptr + (b * C + cols) * 2 + 1, _cast_for(z_s, row_stats_ptr), mask=ok_c)
    total = tl.zeros([BR, BCOL], dtype=tl.float64)
    for r0 in range(0, C, BR):
        rows = r0 + tl.arange(0, BR)
        ok_r = rows < C
        mask = ok_r[:, None] & ok_c[None, :]
        # The rows' scales and statistics (softmax: the global maxima; l2: the norms).
        sr_s, rst_s = _row_scales(part_ptr, stat_ptr, 0, b, B, rows, C, splits, SOFTMAX)
        sr_t, rst_t = _row_scales(part_ptr, stat_ptr, 1, b, B, rows, C, splits, SOFTMAX)
        gs = _merged_rows(part_ptr, stat_ptr, 0, b, B, rows, cols, C, splits, rst_s, mx_s, SOFTMAX)
        gt = _merged_rows(part_ptr, stat_ptr, 1, b, B, rows, cols, C, splits, rst_t, mx_t, SOFTMAX)
        gs = gs * sr_s[:, None] * sc_s[None, :]
        gt = gt * sr_t[:, None] * sc_t[None, :]
        if not SOFTMAX:
            # A unit row's self-similarity is exactly 1 (R_cc / n_c^2 is 1 only up to rounding).
            diag = rows[:, None] == cols[None, :]
            gs = tl.where(diag & (rst_s > 1e-12)[:, None], 1.0, gs)
            gt = tl.where(diag & (rst_t > 1e-12)[:, None], 1.0, gt)
        if KL:
            xs = tl.where(mask, gs / tau, float("-inf"))
            xt = tl.where(mask, gt / tau, float("-inf"))
            ms = tl.max(xs, axis=1)
            mt = tl.max(xt, axis=1)
            ms = tl.where(ok_r, ms, 0.0)
            mt = tl.where(ok_r, mt, 0.0)
            ls = tl.log(tl.sum(tl.where(mask, tl.exp(xs - ms[:, None]), 0.0), axis=1)) + ms
            lt = tl.log(tl.sum(tl.where(mask, tl.exp(xt - mt[:, None]), 0.0), axis=1)) + mt
            log_ps = xs - ls[:, None]
            log_pt = xt - lt[:, None]
            p_t = tl.where(mask, tl.exp(log_pt), 0.0)
            total += tl.where(mask, p_t * (log_pt - log_ps), 0.0)
            g = (tl.exp(log_ps) - p_t) * coef
        else:
            diff = gs - gt
            total += tl.where(mask, diff * diff, 0.0)
            g = diff * coef
        off = (b * C + rows[:, None]) * C + cols[None, :]
        tl.store(grad_gram_ptr + off, _cast_for(g, grad_gram_ptr), mask=mask)
        tl.store(gs_ptr + off, gs, mask=mask)
    tl.store(term_ptr + b, tl.sum(tl.sum(total, axis=1), axis=0))


@triton.jit
def _normalized_rows(x, mask, stats_ptr, row, mask_row, tau, SOFTMAX: tl.constexpr):
    """Fn of a loaded [rows, pixels] tile x (rows = flat (b, c) indices `row`) in ACC."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    r0 = tl.load(stats_ptr + row * 2, mask=mask_row, other=1.0)
    if SOFTMAX:
        inv_sum = _div(tl.full(r0.shape, 1.0, ACC),
                       tl.load(stats_ptr + row * 2 + 1, mask=mask_row, other=1.0))
        e = tl.exp(_div(x.to(ACC), tau) - r0[:, None]) * inv_sum[:, None]
        fn = tl.where(mask, e, 0.0)
    else:
        fn = x.to(ACC) * _inv_norm(r0)[:, None]  # masked lanes loaded 0
    return fn


@triton.jit
def _cr_backward_kernel(
    grad_ptr, gg_ptr, gs_ptr, stats_ptr, tau_bits, x_ptr, gx_ptr,
    b0, C, N, W,
    sB, sC, sH, sW, sN,
    gB, gC, gH, gW, gN,
    SOFTMAX: tl.constexpr, FLAT: tl.constexpr, GFLAT: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x[b, co, n] from dFn = M Fn (M = g (grad_gram + grad_gram^T), dot = <Fn, dFn>)."""
    ACC: tl.constexpr = gg_ptr.dtype.element_ty
    tau = _f64(tau_bits).to(ACC)
    g = tl.load(grad_ptr).to(ACC)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = (tl.program_id(2) + b0).to(tl.int64)
    mask_n = n < N
    mask_co = co < C
    off = _pixel_offsets(n, W, sH, sW, sN, FLAT)
    base = x_ptr + b * sB
    rows = (b * C + co.to(tl.int64)) * C  # rows co of the (B, C, C) matrices
    acc = tl.zeros([BLOCK_CO, BLOCK_N], dtype=ACC)
    dot = tl.zeros([BLOCK_CO], dtype=tl.float64)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < C
        mask_m = mask_co[:, None] & mask_k[None, :]
        m = (tl.load(gg_ptr + rows[:, None] + k[None, :], mask=mask_m, other=0.0)
             + tl.load(gg_ptr + (b * C + k.to(tl.int64))[None, :] * C + co[:, None], mask=mask_m,
                       other=0.0)) * g
        # <Fn_c, dFn_c> = sum_k M_ck G_kc, G symmetric: from the saved G_s (float64).
        dot += tl.sum(m.to(tl.float64) * tl.load(gs_ptr + rows[:, None] + k[None, :], mask=mask_m,
                                                 other=0.0), axis=1)
        mask = mask_k[:, None] & mask_n[None, :]
        x = tl.load(base + (k.to(tl.int64) * sC)[:, None] + off[None, :], mask=mask, other=0.0)
        fn = _normalized_rows(x, mask, stats_ptr, b * C + k, mask_k, tau, SOFTMAX)
        acc = _mm(m, fn, acc)  # dFn[co, n]
    mask = mask_co[:, None] & mask_n[None, :]
    x = tl.load(base + (co.to(tl.int64) * sC)[:, None] + off[None, :], mask=mask, other=0.0)
    row = b * C + co
    fn = _normalized_rows(x, mask, stats_ptr, row, mask_co, tau, SOFTMAX)
    dot = dot.to(ACC)
    if SOFTMAX:
        gx = _div(fn * (acc - dot[:, None]), tau)
    else:
        # Below eps the norm is the constant eps: dF = dFn / eps (no projection term).
        nrm = tl.load(stats_ptr + row * 2, mask=mask_co, other=1.0)
        dot = tl.where(nrm > _eps_like(nrm), dot, 0.0)
        gx = (acc - fn * dot[:, None]) * _inv_norm(nrm)[:, None]
    goff = _pixel_offsets(n, W, gH, gW, gN, GFLAT)
    g_out = gx_ptr + b * gB + (co.to(tl.int64) * gC)[:, None] + goff[None, :]
    tl.store(g_out, _cast_for(gx, gx_ptr), mask=mask)


# --- host side ------------------------------------------------------------------------------


def _check(normalize: str, distance: str | None = None) -> None:
    if normalize not in _NORMALIZE:
        raise ValueError(f"channel_relation: unknown normalize {normalize!r}")
    if distance is not None and distance not in _DISTANCE:
        raise ValueError(f"channel_relation: unknown distance {distance!r}")


def _gram_splits(B: int, C: int, N: int) -> tuple[int, int, int, int]:
    """(BC, tiles per input, splits, chunk) of the split-K Grams."""
    max_bc, bk = _GRAM_BLOCK
    bc = _pow2(C, 16, max_bc)
    tiles = triton.cdiv(C, bc) ** 2
    return (bc, tiles) + _split_k(N, bk, 2 * tiles * B, _GRAM_TARGET_PROGRAMS)


def _channel_relation_fwd(
    fs: torch.Tensor, ft: torch.Tensor, normalize: str, distance: str, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_gram (B, C, C), row_stats (B, C, 2)) in the accumulation dtype, and G_s
    (B, C, C, float64) for the backward."""
    _check(normalize, distance)
    acc = _acc_dtype(fs)
    B, C, H, W = fs.shape
    N = H * W
    f64 = torch.float64
    softmax = normalize == "softmax"
    bc, tiles, splits, chunk = _gram_splits(B, C, N)
    part = torch.empty((splits, 2, B, C, C), dtype=f64, device=fs.device)
    stat = torch.empty((splits, 2, B, C, 2) if softmax else (1,), dtype=f64, device=fs.device)
    for b0, nb in _batch_chunks(B):
        _launch(_cr_gram_kernel)[(2 * tiles, splits, nb)](
            fs, ft, _bits(1.0 / tau), part, stat, B, b0, C, N, W, chunk, tiles,
            *_strides(fs)[:5], *_strides(ft)[:5],
            SOFTMAX=softmax, SFLAT=_strides(fs)[5], TFLAT=_strides(ft)[5],
            BC=bc, BK=_GRAM_BLOCK[1], num_warps=_GRAM_WARPS,
        )
    grad_gram = torch.empty((B, C, C), dtype=acc, device=fs.device)
    gs = torch.empty((B, C, C), dtype=f64, device=fs.device)
    row_stats = torch.empty((B, C, 2), dtype=acc, device=fs.device)
    term = torch.empty((B,), dtype=f64, device=fs.device)
    kl = distance == "kl"
    # mse: mean over B C C of (G_s - G_t)^2; kl: tau^2 sum p_t (log p_t - log p_s) / (B C).
    coef, scale = (tau / (B * C), tau * tau / (B * C)) if kl else (2.0 / (B * C * C), 1.0 / (B * C * C))
    bcol = _pow2(C, 16, 1 << 30)
    _launch(_cr_tail_kernel)[(B,)](
        part, stat, _bits(tau), grad_gram, gs, row_stats, term, B, C, splits, _bits(coef),
        SOFTMAX=softmax, KL=kl, BR=max(1, _TAIL_ELEMS // bcol), BCOL=bcol, num_warps=_TAIL_WARPS,
    )
    return _finish(term, scale, acc), grad_gram, row_stats, gs


def _channel_relation_bwd(
    grad: torch.Tensor, fs: torch.Tensor, grad_gram: torch.Tensor, row_stats: torch.Tensor,
    gs: torch.Tensor, normalize: str, tau: float,
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    _check(normalize)
    B, C, H, W = fs.shape
    acc = grad_gram.dtype
    gx = torch.empty_like(fs)
    if acc == torch.float64:
        max_co, block_n, max_k = _BWD_BLOCK_FP64
        block_co, block_k = _pow2(C, 16, max_co), max_k
    else:
        max_co, block_n, max_k = _BWD_BLOCK
        block_co, block_k = _pow2(C, 16, max_co), _pow2(C, 16, max_k)
    sB, sC, sH, sW, sN, flat = _strides(fs)
    gB, gC, gH, gW, gN, gflat = _strides(gx)
    tiles = (triton.cdiv(H * W, block_n), triton.cdiv(C, block_co))
    for b0, nb in _batch_chunks(B):
        _launch(_cr_backward_kernel)[(*tiles, nb)](
            grad, grad_gram, gs, row_stats, _bits(tau), fs, gx,
            b0, C, H * W, W,
            sB, sC, sH, sW, sN,
            gB, gC, gH, gW, gN,
            SOFTMAX=normalize == "softmax", FLAT=flat, GFLAT=gflat,
            BLOCK_CO=block_co, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=_BWD_WARPS[acc == torch.float64],
        )
    return gx


# Explicit fake (meta) kernels, used on every device.
def _fake_fwd(fs, ft, normalize, distance, tau):
    acc = _acc_dtype(fs)
    B, C = fs.shape[0], fs.shape[1]
    return (fs.new_empty((), dtype=acc), fs.new_empty((B, C, C), dtype=acc),
            fs.new_empty((B, C, 2), dtype=acc), fs.new_empty((B, C, C), dtype=torch.float64))


def _fake_bwd(grad, fs, grad_gram, row_stats, gs, normalize, tau):
    return torch.empty_like(fs)


_channel_relation = fused_loss("channel_relation_triton", _channel_relation_fwd,
                               _channel_relation_bwd, _fake_fwd, _fake_bwd,
                               saved_inputs=(0,), const_inputs=(2, 4))


def channel_relation(
    fs: torch.Tensor, ft: torch.Tensor, normalize: str, distance: str, tau: float
) -> torch.Tensor:
    """Channel-relation loss (0-dim; float32, float64 for float64 inputs), autograd to fs.

    Inputs are validated by the caller: fs and ft (B, C, H, W) of equal shapes on one device, any
    strides, each float16/bfloat16/float32, or both float64 (one float64 input promotes both).
    """
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    return _channel_relation(fs, ft.detach(), normalize, distance, float(tau))
