"""Channel relation (CPKD) in Triton: kernels, launcher and autograd registration in one place.

Per sample the C rows F_c (length N = H * W) are normalised (l2: F_c / max(||F_c||, eps);
softmax: softmax(F_c / tau) over N), G = Fn Fn^T (C x C) and G_s is compared with G_t (mse, or
tau^2 KL of the row softmaxes of G / tau). Math and op contract: SPEC section 3 and the relations
contract (outputs loss, grad_gram = d loss / d G_s, row_stats).

* Gram, split-K over N (_common._gram, grid (C tiles, splits, B)): each program sums its chunk of
  pixels with tl.dot, the per-split partial Grams are summed in a fixed order (no atomics). The
  normalisation is folded in: "l2" forms the raw Gram R = F F^T and scales it by the norms on its
  diagonal, G_ij = R_ij / (n_i n_j); "softmax" first runs _softmax_stats_kernel (grid
  (C blocks, B): online row max and sum of exp(F / tau - max)), then the Gram of
  exp(F / tau - max) divided by sum_i sum_j.
* The C x C loss part (mse / kl on G, grad_gram) is plain torch on (B, C, C) tensors, in
  float64: it is tiny next to the O(N C^2) Grams.
* Backward (_cr_backward_kernel, grid (N blocks, C blocks, B)): dFn = (g (grad_gram +
  grad_gram^T)) Fn as tiles of a (C x C) x (C x N) product, Fn recomputed from the raw input and
  row_stats, fused with the normalisation backward. Its per-row dot <Fn_c, dFn_c> spans all of N;
  it equals sum_k M_ck G_ck (M = g (grad_gram + grad_gram^T), G = Fn Fn^T symmetric), so the
  student Gram is recomputed (one split-K pass) and the dot formed in torch before the kernel.

Precision: float32 accumulation (float64 for float64 inputs). Tiles: tl.dot in float16/bfloat16
for raw 16-bit l2 Grams (exact products, fp32 sums), otherwise fp32 tl.dot with
_common._DOT_PRECISION ("ieee"); float64 by FMA. Inputs are read through their element strides
(NCHW, channels_last, slices) with int64 offsets; nothing is copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kdkernels.triton._common import (
    GRAM_RAW,
    GRAM_SOFTMAX_ROWS,
    _acc_dtype,
    _batch_chunks,
    _cast_for,
    _define_op,
    _div,
    _eps_like,
    _gram,
    _inv_norm,
    _mm,
    _pixel_offsets,
    _pow2,
    _scalar,
    _strides,
)

__all__ = ["channel_relation"]

# Softmax statistics: [BLOCK_C, BLOCK_N] tiles streamed over N (4096 elements, 4 warps).
_STATS_BLOCK = (16, 256)
# Backward: [BLOCK_CO, BLOCK_N] output tiles, BLOCK_K channels per tl.dot step (BLOCK_CO and
# BLOCK_K shrink to the next power of two >= C, at least 16). float64 uses FMA products
# (BLOCK_CO x BLOCK_K x BLOCK_N = 8192 per step). Sizes and warps from ptxas register reports
# for sm_90 (no spills), not from timings.
_BWD_BLOCK = (64, 64, 16)  # (max BLOCK_CO, BLOCK_N, max BLOCK_K)
_BWD_BLOCK_FP64 = (32, 32, 8)
_BWD_WARPS = (8, 4)  # (float32 accumulation, float64)
_NUM_WARPS = 4

_NORMALIZE = ("l2", "softmax")
_DISTANCE = ("mse", "kl")


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _softmax_stats_kernel(
    x_ptr, tau_ptr, stats_ptr,
    b0, C, N, W,
    sB, sC, sH, sW, sN,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """stats[b, c] = [max_n x / tau, sum_n exp(x / tau - max)] with an online softmax."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    tau = tl.load(tau_ptr)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = (tl.program_id(1) + b0).to(tl.int64)
    mask_c = c < C
    base = x_ptr + b * sB + (c.to(tl.int64) * sC)[:, None]
    m = tl.full([BLOCK_C], float("-inf"), ACC)
    s = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        mask_n = n < N
        off = _pixel_offsets(n, W, sH, sW, sN, FLAT)
        x = tl.load(base + off[None, :], mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        # Padding rows read 0 (finite), padding columns -inf (weight 0).
        x = tl.where(mask_n[None, :], _div(x.to(ACC), tau), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    out = stats_ptr + (b * C + c) * 2
    tl.store(out, m, mask=mask_c)
    tl.store(out + 1, s, mask=mask_c)


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
    m_ptr, dot_ptr, stats_ptr, tau_ptr, x_ptr, gx_ptr,
    b0, C, N, W,
    sB, sC, sH, sW, sN,
    gB, gC, gH, gW, gN,
    SOFTMAX: tl.constexpr, FLAT: tl.constexpr, GFLAT: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x[b, co, n] from dFn = M Fn (M = g (grad_gram + grad_gram^T), dot = <Fn, dFn>)."""
    ACC: tl.constexpr = m_ptr.dtype.element_ty
    tau = tl.load(tau_ptr)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = (tl.program_id(2) + b0).to(tl.int64)
    mask_n = n < N
    mask_co = co < C
    off = _pixel_offsets(n, W, sH, sW, sN, FLAT)
    base = x_ptr + b * sB
    m_base = m_ptr + (b * C + co.to(tl.int64)) * C  # rows co of M[b]
    acc = tl.zeros([BLOCK_CO, BLOCK_N], dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < C
        m = tl.load(m_base[:, None] + k[None, :], mask=mask_co[:, None] & mask_k[None, :],
                    other=0.0)
        mask = mask_k[:, None] & mask_n[None, :]
        x = tl.load(base + (k.to(tl.int64) * sC)[:, None] + off[None, :], mask=mask, other=0.0)
        fn = _normalized_rows(x, mask, stats_ptr, b * C + k, mask_k, tau, SOFTMAX)
        acc = _mm(m, fn, acc)  # dFn[co, n]
    mask = mask_co[:, None] & mask_n[None, :]
    x = tl.load(base + (co.to(tl.int64) * sC)[:, None] + off[None, :], mask=mask, other=0.0)
    row = b * C + co
    fn = _normalized_rows(x, mask, stats_ptr, row, mask_co, tau, SOFTMAX)
    dot = tl.load(dot_ptr + row, mask=mask_co, other=0.0)
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


def _softmax_stats(x: torch.Tensor, tau: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    B, C, H, W = x.shape
    stats = torch.empty((B, C, 2), dtype=acc, device=x.device)
    sB, sC, sH, sW, sN, flat = _strides(x)
    block_c, block_n = _STATS_BLOCK
    for b0, nb in _batch_chunks(B):
        wrap_triton(_softmax_stats_kernel)[(triton.cdiv(C, block_c), nb)](
            x, tau, stats, b0, C, H * W, W, sB, sC, sH, sW, sN,
            FLAT=flat, BLOCK_C=block_c, BLOCK_N=block_n, num_warps=_NUM_WARPS,
        )
    return stats


def _channel_gram(x, normalize, tau, acc, stats=None):
    """(G, row_stats): G = Fn Fn^T (B, C, C) in float64, row_stats (B, C, 2) in acc.

    The Gram is accumulated in acc; its scaling by the row norms (or softmax sums) is done in
    float64: one rounding less per factor, which matters when G_s - G_t is small. row_stats are
    recomputed unless given. tau: 0-dim acc tensor.
    """
    f64 = torch.float64
    if normalize == "l2":
        raw = _gram(x, x, x, x, GRAM_RAW, acc).to(f64)
        if stats is None:
            norms = raw.diagonal(dim1=1, dim2=2).sqrt()
            stats = torch.stack([norms, torch.zeros_like(norms)], dim=-1).to(acc)
        else:
            norms = stats[..., 0].to(f64)
        inv = 1.0 / norms.clamp_min(1e-12)
        gram = raw * inv[:, :, None] * inv[:, None, :]
        # A unit row's self-similarity is exactly 1 (R_cc / n_c^2 is 1 only up to rounding).
        diag = gram.diagonal(dim1=1, dim2=2)
        unit = torch.where(norms > 1e-12, 1.0, diag)
        return gram - torch.diag_embed(diag) + torch.diag_embed(unit), stats
    if stats is None:
        stats = _softmax_stats(x, tau, acc)
    raw = _gram(x, x, stats, stats, GRAM_SOFTMAX_ROWS, acc, tau).to(f64)
    inv = 1.0 / stats[..., 1].to(f64)
    return raw * inv[:, :, None] * inv[:, None, :], stats


@_define_op("kdkernels::channel_relation_triton", mutates_args=())
def _channel_relation_fwd(
    fs: torch.Tensor, ft: torch.Tensor, normalize: str, distance: str, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_gram (B, C, C), row_stats (B, C, 2)), all in the accumulation dtype."""
    _check(normalize, distance)
    acc = _acc_dtype(fs)
    B, C = fs.shape[0], fs.shape[1]
    # The Grams accumulate in float64: G_s - G_t is a small difference of O(1) sums whenever
    # the rows are near uniform (softmax rows with a large tau) or near the teacher's, and the
    # fp64 split-K pass costs O(N C^2) FMA, small next to the loss's value to a user.
    tau_t = _scalar(tau, fs, torch.float64)
    gs, stats = _channel_gram(fs, normalize, tau_t, torch.float64)
    gt, _ = _channel_gram(ft, normalize, tau_t, torch.float64)
    stats = stats.to(acc)
    # The C x C part in float64 (B * C * C elements: free): near the teacher, and for softmax
    # rows whose G is close to uniform, the KL of the row softmaxes of G / tau cancels
    # catastrophically in float32; in float64 its error is the Grams' own rounding.
    if distance == "mse":
        diff = gs - gt
        loss = (diff * diff).sum() / (B * C * C)
        grad_gram = diff * (2.0 / (B * C * C))
    else:
        log_ps = torch.log_softmax(gs / tau, dim=-1)
        log_pt = torch.log_softmax(gt / tau, dim=-1)
        p_t = log_pt.exp()
        loss = (p_t * (log_pt - log_ps)).sum() * (tau * tau / (B * C))
        grad_gram = (log_ps.exp() - p_t) * (tau / (B * C))
    return loss.to(acc), grad_gram.to(acc).contiguous(), stats.contiguous()


@_define_op("kdkernels::channel_relation_triton_backward", mutates_args=())
def _channel_relation_bwd(
    grad: torch.Tensor, fs: torch.Tensor, grad_gram: torch.Tensor, row_stats: torch.Tensor,
    normalize: str, tau: float,
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    _check(normalize)
    B, C, H, W = fs.shape
    acc = grad_gram.dtype
    stats = row_stats.to(acc).contiguous()
    tau_t = _scalar(tau, fs, acc)
    gs, _ = _channel_gram(fs, normalize, tau_t, acc, stats)
    m = (grad_gram + grad_gram.transpose(1, 2)) * grad.to(acc)
    # <Fn_c, dFn_c> = sum_k M_ck G_kc (G symmetric), in float64 then acc.
    dot = (m.to(torch.float64) * gs).sum(-1).to(acc).contiguous()
    m = m.contiguous()
    gx = torch.empty_like(fs)
    if fs.numel() == 0:
        return gx
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
        wrap_triton(_cr_backward_kernel)[(*tiles, nb)](
            m, dot, stats, tau_t, fs, gx,
            b0, C, H * W, W,
            sB, sC, sH, sW, sN,
            gB, gC, gH, gW, gN,
            SOFTMAX=normalize == "softmax", FLAT=flat, GFLAT=gflat,
            BLOCK_CO=block_co, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=_BWD_WARPS[acc == torch.float64],
        )
    return gx


# Explicit fake (meta) kernels, used on every device.
@_channel_relation_fwd.register_fake
def _fake_fwd(fs, ft, normalize, distance, tau):
    acc = _acc_dtype(fs)
    B, C = fs.shape[0], fs.shape[1]
    return (fs.new_empty((), dtype=acc), fs.new_empty((B, C, C), dtype=acc),
            fs.new_empty((B, C, 2), dtype=acc))


@_channel_relation_bwd.register_fake
def _fake_bwd(grad, fs, grad_gram, row_stats, normalize, tau):
    return torch.empty_like(fs)


def _setup_context(ctx, inputs, output):
    fs, _, normalize, _, tau = inputs
    ctx.save_for_backward(fs, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.normalize = normalize
    ctx.tau = tau


def _backward(ctx, grad_loss, _grad_gram, _grad_stats):
    fs, grad_gram, row_stats = ctx.saved_tensors
    grad_fs = torch.ops.kdkernels.channel_relation_triton_backward(
        grad_loss, fs, grad_gram, row_stats, ctx.normalize, ctx.tau)
    return grad_fs, None, None, None, None


torch.library.register_autograd(
    "kdkernels::channel_relation_triton", _backward, setup_context=_setup_context)


def channel_relation(
    fs: torch.Tensor, ft: torch.Tensor, normalize: str, distance: str, tau: float
) -> torch.Tensor:
    """Channel-relation loss (0-dim; float32, float64 for float64 inputs), autograd to fs.

    Inputs are validated by the caller: fs and ft (B, C, H, W) of equal shapes on one device, any
    strides, each float16/bfloat16/float32, or both float64 (one float64 input promotes both).
    """
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    return torch.ops.kdkernels.channel_relation_triton(
        fs, ft.detach(), normalize, distance, float(tau))[0]
