"""Logit attention (KDAS attention supervision) in Triton: kernels, launcher and autograd.

Per map X (H x W, one per sample and channel): A = softmax_rows(X X^T / sqrt(W)) X (self-attention
with Q = K = V = X, sequence length H, head dim W), q = softmax over the H*W entries of A / tau,
loss = tau^2 sum KL(q_t || q_s) / maps. Four kernels per forward + backward:

* _la_attend_kernel, grid (row blocks I, column chunks C of A of the student then of the
  teacher, maps), flash-attention forward: for each key block J the score tile X_I X_J^T (the
  head dim W stepped through BLOCK_D at a time), an online row softmax, and acc += P_IJ X_J[:, C].
  One chunk spans up to 512 columns, so for W <= 512 (KDAS: 352) every score tile is computed
  once; a wider map splits A's columns over programs, each recomputing the scores. Writes A
  (maps, H, W) and, when the student needs a gradient, its scaled scores s X X^T (maps, H, H:
  per map the size of the map itself when H = W) and row log-sum-exps.
* _la_kl_kernel, grid (maps,): the spatial softmax-KL of one map in row tiles: maxima, then the
  sums, then (need_grad) dA = tau (q_s - q_t) / maps, written over A_t, and D_i = <dA_i, A_i>;
  the loss is the fixed-order float64 sum of the maps' terms (_common._finish).
* _la_bwd_kernel, grid (row blocks J, column chunks C, maps), flash-attention backward with
  Q = K = V = X: program J owns rows J of d loss / d X and walks the blocks I,
      dX_J += P_IJ^T dA_I + s (dS_IJ + dS_JI^T)^T X_I,  s = 1 / sqrt(W),
  with P_IJ = exp(s S_IJ - lse_I) from the saved scores, dS_IJ = P_IJ o (dA_I X_J^T - D_I), and
  since S is symmetric P_JI^T = exp(s S_IJ - lse_J), dS_JI^T = P_JI^T o (X_I dA_J^T - D_J): two
  W-deep products per tile, two into the accumulator, none repeated for W <= 512; every output
  row has one owner (no atomics).
The forward keeps dA, D, the scores and their row log-sum-exps when the student needs a gradient
(need_grad); the backward kernel multiplies by the upstream gradient as it stores.

Near the teacher (d = (A_s - A_t) / tau small) the KL is evaluated without cancellation, as in the
pixel-relation kernels: KL = E_qt[expm1(d) - d] + log1p(v) - v with v = E_qt[expm1(d)], and
q_s - q_t = q_t expm1(d - (lse_s - lse_t)).

Precision: float32 accumulation (float64 for float64 inputs); the tiles of float32 data are
"tf32x3" tensor-core products (_common._DOT_PRECISION: three TF32 products, ~2^-21 relative
error each; under TRITON_INTERPRET=1 the tests emulate their rounding), 16-bit inputs multiply on
the tensor cores in their own type where both factors are inputs (exact products, fp32
accumulation).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdkernels.triton._common import (_acc_dtype, _batch_chunks, _bits, _cast_for, _div, _f64,
                                      _finish, _launch, _log1p_minus_x, _mm, _pow2, fused_loss)
from kdkernels.triton.pixel_relation import _expm1_minus_x, _softmax_diff

__all__ = ["logit_attention"]

# Tiles (BLOCK_M, BLOCK_N, BLOCK_D, max BLOCK_DV), float32 accumulation: score tiles over
# BLOCK_D-wide steps of the head dim, A's columns (and dX's) in chunks of up to max BLOCK_DV. A
# chunk as wide as the map (W <= 512 here) means no product is recomputed for another chunk; its
# [rows, 512] accumulator is what bounds the rows per program. float64 (FMA below 16-deep
# products, float64 tensor cores from there, see _mm): small tiles, chunks recomputing the
# backward's products. From ptxas's sm_90 reports
# (Triton 3.8): see bench/README. Retune against benchmarks.
_FWD_BLOCK = (16, 16, 16, 512)
_BWD_BLOCK = (16, 16, 16, 512)
_BLOCK_FP64 = (16, 16, 8, 16)
_ATTEND_WARPS = 8
# The KL kernel's row tiles: BLOCK_W = W rounded up to a power of two, rows to fill this many.
_KL_TILE = 2048
_KL_WARPS = 8


@triton.jit
def _scores(base, oi, oj, mask_i, mask_j, W, sW, ACC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile X_I X_J^T (unscaled) of rows at offsets oi, oj of one map."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for d0 in range(0, W, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        od = d.to(tl.int64) * sW
        mask_d = d < W
        xi = tl.load(base + oi[:, None] + od[None, :], mask=mask_i[:, None] & mask_d[None, :],
                     other=0.0)
        xj = tl.load(base + od[:, None] + oj[None, :], mask=mask_d[:, None] & mask_j[None, :],
                     other=0.0)
        s = _mm(xi, xj, s)
    return s


@triton.jit
def _attend_tile(
    x_ptr, a_ptr, lse_ptr, sc_ptr, pid_i, pid_c, m, K, H, W, sB, sC, sH, sW, scale,
    SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """A[m, I, C] = (softmax_rows(s X X^T) X)[I, C]; SAVE: the scaled scores sc[m, I, :] = s X_I X^T
    and lse[m, I], their row log-sum-exps (by the programs of the first column chunk)."""
    ACC: tl.constexpr = a_ptr.dtype.element_ty
    i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_c * BLOCK_DV + tl.arange(0, BLOCK_DV)
    base = x_ptr + (m // K) * sB + (m % K) * sC
    mask_i = i < H
    mask_c = c < W
    oi = i.to(tl.int64) * sH
    oc = c.to(tl.int64) * sW
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=ACC)
    sc_rows = sc_ptr + (m * H + i[:, None]) * H
    for j0 in range(0, H, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        mask_j = j < H
        oj = j.to(tl.int64) * sH
        s = _scores(base, oi, oj, mask_i, mask_j, W, sW, ACC, BLOCK_M, BLOCK_N, BLOCK_D) * scale
        if SAVE:
            if pid_c == 0:
                tl.store(sc_rows + j[None, :], s, mask=mask_i[:, None] & mask_j[None, :])
        s = tl.where(mask_j[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(base + oj[:, None] + oc[None, :], mask=mask_j[:, None] & mask_c[None, :],
                    other=0.0)
        acc = _mm(p, v.to(ACC), acc * alpha[:, None])
        m_i = m_new
    out = a_ptr + (m * H + i[:, None]) * W + c[None, :]
    tl.store(out, _div(acc, l_i[:, None]), mask=mask_i[:, None] & mask_c[None, :])
    if SAVE:
        if pid_c == 0:
            tl.store(lse_ptr + m * H + i, m_i + tl.log(l_i), mask=mask_i)


@triton.jit
def _la_attend_kernel(
    xs_ptr, xt_ptr, scale_bits, as_ptr, at_ptr, lse_ptr, sc_ptr,
    m0, K, H, W, chunks,
    sB, sC, sH, sW,
    tB, tC, tH, tW,
    SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """A of the student (column chunks 0 .. chunks - 1 of axis 1) and of the teacher (the next
    chunks), one launch; SAVE: the student's scaled scores and row log-sum-exps."""
    ACC: tl.constexpr = as_ptr.dtype.element_ty
    scale = _f64(scale_bits).to(ACC)
    pid_i = tl.program_id(0)
    pid_c = tl.program_id(1)
    m = (tl.program_id(2) + m0).to(tl.int64)
    if pid_c < chunks:
        _attend_tile(xs_ptr, as_ptr, lse_ptr, sc_ptr, pid_i, pid_c, m, K, H, W, sB, sC, sH, sW,
                     scale, SAVE, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
    else:
        _attend_tile(xt_ptr, at_ptr, lse_ptr, sc_ptr, pid_i, pid_c - chunks, m, K, H, W, tB, tC,
                     tH, tW, scale, False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)


@triton.jit
def _la_kl_kernel(
    as_ptr, at_ptr, inv_tau_bits, coef_bits, kl_ptr, da_ptr, dd_ptr,
    H, W,
    NEED_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Map m: kl[m] = KL(q_t || q_s); NEED_GRAD: dA = coef (q_s - q_t) and D = rowsum(dA o A_s)."""
    ACC: tl.constexpr = as_ptr.dtype.element_ty
    m = tl.program_id(0).to(tl.int64)
    inv_tau = _f64(inv_tau_bits).to(ACC)
    w = tl.arange(0, BLOCK_W)
    mask_w = w < W
    base = m * H * W
    # Pass 1: the maxima of A_s and A_t; max_j (A_j / tau) = (max_j A_j) / tau (tau > 0).
    mx_s = tl.full([BLOCK_R, BLOCK_W], float("-inf"), ACC)
    mx_t = tl.full([BLOCK_R, BLOCK_W], float("-inf"), ACC)
    for r0 in range(0, H, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < H)[:, None] & mask_w[None, :]
        off = base + r[:, None] * W + w[None, :]
        mx_s = tl.maximum(mx_s, tl.load(as_ptr + off, mask=mask, other=float("-inf")))
        mx_t = tl.maximum(mx_t, tl.load(at_ptr + off, mask=mask, other=float("-inf")))
    ms = tl.max(tl.max(mx_s, axis=1), axis=0) * inv_tau
    mt = tl.max(tl.max(mx_t, axis=1), axis=0) * inv_tau
    # Pass 2: sum e_s, sum e_t, the e_t-weighted sums of d and expm1(d) - d, and max |d|.
    zs = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    zt = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    sd = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    sq = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    dmx = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    for r0 in range(0, H, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < H)[:, None] & mask_w[None, :]
        off = base + r[:, None] * W + w[None, :]
        a = tl.load(as_ptr + off, mask=mask, other=0.0)
        t = tl.load(at_ptr + off, mask=mask, other=0.0)
        d = (a - t) * inv_tau  # an exact difference, then one rounding
        e_t = tl.where(mask, tl.exp(t * inv_tau - mt), 0.0)
        zs += tl.where(mask, tl.exp(a * inv_tau - ms), 0.0)
        zt += e_t
        sd += e_t * d
        sq += e_t * _expm1_minus_x(d)
        dmx = tl.maximum(dmx, tl.where(mask, tl.abs(d), 0.0))
    l_t = tl.sum(tl.sum(zt, axis=1), axis=0)
    lse_s = ms + tl.log(tl.sum(tl.sum(zs, axis=1), axis=0))
    lse_t = mt + tl.log(l_t)
    mean_d = _div(tl.sum(tl.sum(sd, axis=1), axis=0), l_t)
    mean_q = _div(tl.sum(tl.sum(sq, axis=1), axis=0), l_t)
    # KL = lse_s - lse_t - E[d], or without cancellation E[expm1(d) - d] + log1p(v) - v with
    # v = E[expm1(d)] where every |d| <= 1. Not for |v| < 1 alone: v = E[d] + E[expm1(d) - d]
    # carries ~max |d| eps of rounding, and a student far below the teacher's mass (d << 0)
    # has 1 + v ~ e^d, below that rounding (the fuzzer found a map's KL of 129 for 1.64).
    v = mean_d + mean_q
    near = tl.max(tl.max(dmx, axis=1), axis=0) <= 1.0
    tl.store(kl_ptr + m, tl.where(near, mean_q + _log1p_minus_x(v), lse_s - lse_t - mean_d))
    if NEED_GRAD:
        coef = _f64(coef_bits).to(ACC)
        # lse_s - lse_t = log1p(v) rounded once near the teacher (see _softmax_diff).
        delta = tl.where(near, _log1p_minus_x(v) + v, lse_s - lse_t)
        lse_s = tl.where(near, lse_t + delta, lse_s)
        for r0 in range(0, H, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mask_r = r < H
            mask = mask_r[:, None] & mask_w[None, :]
            off = base + r[:, None] * W + w[None, :]
            a = tl.load(as_ptr + off, mask=mask, other=0.0)
            t = tl.load(at_ptr + off, mask=mask, other=0.0)
            g = coef * _softmax_diff(a * inv_tau, t * inv_tau, lse_s, lse_t, delta)
            g = tl.where(mask, g, 0.0)
            tl.store(da_ptr + off, g, mask=mask)
            tl.store(dd_ptr + m * H + r, tl.sum(g * a, axis=1), mask=mask_r)


@triton.jit
def _la_bwd_kernel(
    x_ptr, scale_bits, grad_ptr, da_ptr, lse_ptr, dd_ptr, sc_ptr, g_ptr,
    m0, K, H, W,
    sB, sC, sH, sW,
    gB, gC, gH, gW,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """g[m, J, C] = grad (P^T dA + s (dS + dS^T) X)[J, C] for map m (see the module docstring)."""
    ACC: tl.constexpr = da_ptr.dtype.element_ty
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m = (tl.program_id(2) + m0).to(tl.int64)
    base = x_ptr + (m // K) * sB + (m % K) * sC
    da_base = da_ptr + m * H * W
    scale = _f64(scale_bits).to(ACC)
    mask_j = j < H
    mask_c = c < W
    oj = j.to(tl.int64) * sH
    oc = c.to(tl.int64) * sW
    lse_j = tl.load(lse_ptr + m * H + j, mask=mask_j, other=0.0)
    d_j = tl.load(dd_ptr + m * H + j, mask=mask_j, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=ACC)
    for i0 in range(0, H, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        mask_i = i < H
        oi = i.to(tl.int64) * sH
        dp_ij = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)  # dA_I X_J^T
        dp_ji = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)  # (dA_J X_I^T)^T
        for d0 in range(0, W, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask_d = d < W
            od = d.to(tl.int64) * sW
            m_id = mask_i[:, None] & mask_d[None, :]
            m_dj = mask_d[:, None] & mask_j[None, :]
            xi = tl.load(base + oi[:, None] + od[None, :], mask=m_id, other=0.0)
            xj = tl.load(base + od[:, None] + oj[None, :], mask=m_dj, other=0.0)
            dai = tl.load(da_base + i[:, None] * W + d[None, :], mask=m_id, other=0.0)
            daj = tl.load(da_base + j[None, :] * W + d[:, None], mask=m_dj, other=0.0)
            dp_ij = _mm(dai, xj.to(ACC), dp_ij)
            dp_ji = _mm(xi.to(ACC), daj, dp_ji)
        valid = mask_i[:, None] & mask_j[None, :]
        s = tl.load(sc_ptr + (m * H + i[:, None]) * H + j[None, :], mask=valid, other=0.0)
        lse_i = tl.load(lse_ptr + m * H + i, mask=mask_i, other=0.0)
        d_i = tl.load(dd_ptr + m * H + i, mask=mask_i, other=0.0)
        p_ij = tl.where(valid, tl.exp(s - lse_i[:, None]), 0.0)
        p_ji = tl.where(valid, tl.exp(s - lse_j[None, :]), 0.0)
        ds = p_ij * (dp_ij - d_i[:, None]) + p_ji * (dp_ji - d_j[None, :])
        m_ic = mask_i[:, None] & mask_c[None, :]
        dai_c = tl.load(da_base + i[:, None] * W + c[None, :], mask=m_ic, other=0.0)
        xi_c = tl.load(base + oi[:, None] + oc[None, :], mask=m_ic, other=0.0).to(ACC)
        acc = _mm(tl.trans(p_ij), dai_c, acc)
        acc = _mm(tl.trans(ds * scale), xi_c, acc)
    out = g_ptr + (m // K) * gB + (m % K) * gC + (j.to(tl.int64) * gH)[:, None] \
        + (c.to(tl.int64) * gW)[None, :]
    acc = acc * tl.load(grad_ptr).to(ACC)
    tl.store(out, _cast_for(acc, g_ptr), mask=mask_j[:, None] & mask_c[None, :])


# --- host side ------------------------------------------------------------------------------


def _config(W: int, acc: torch.dtype, backward: bool) -> dict:
    if acc == torch.float64:
        bm, bn, bd, max_dv = _BLOCK_FP64
    else:
        bm, bn, bd, max_dv = _BWD_BLOCK if backward else _FWD_BLOCK
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=_pow2(W, 16, max_dv))


def _logit_attention_fwd(
    ps: torch.Tensor, pt: torch.Tensor, tau: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dA, lse, D, scores): with need_grad, what the backward kernel reads (see the
    kernels; accumulation dtype), else empty tensors."""
    B, K, H, W = ps.shape
    maps = B * K
    acc = _acc_dtype(ps)
    dev = ps.device
    scale = _bits(1.0 / math.sqrt(W))
    cfg = _config(W, acc, backward=False)
    a_s = torch.empty((maps, H, W), dtype=acc, device=dev)
    a_t = torch.empty((maps, H, W), dtype=acc, device=dev)
    # Without need_grad: distinct empty outputs (a custom op's outputs may not alias).
    lse = torch.empty((maps, H) if need_grad else (0,), dtype=acc, device=dev)
    sc = torch.empty((maps, H, H) if need_grad else (0,), dtype=acc, device=dev)
    chunks = triton.cdiv(W, cfg["BLOCK_DV"])
    for m0, n in _batch_chunks(maps):
        _launch(_la_attend_kernel)[(triton.cdiv(H, cfg["BLOCK_M"]), 2 * chunks, n)](
            ps, pt, scale, a_s, a_t, lse if need_grad else a_s, sc if need_grad else a_s, m0, K,
            H, W, chunks, *ps.stride(), *pt.stride(), SAVE=need_grad,
            num_warps=_ATTEND_WARPS, **cfg)
    kl = torch.empty((maps,), dtype=torch.float64, device=dev)  # summed in float64
    dd = torch.empty((maps, H) if need_grad else (0,), dtype=acc, device=dev)
    block_w = _pow2(W, 16, 1 << 30)
    # dA overwrites A_t, which nothing reads afterwards.
    _launch(_la_kl_kernel)[(maps,)](
        a_s, a_t, _bits(1.0 / tau), _bits(tau / maps), kl, a_t, dd if need_grad else a_s, H, W,
        NEED_GRAD=need_grad, BLOCK_R=max(1, _KL_TILE // block_w), BLOCK_W=block_w,
        num_warps=_KL_WARPS)
    da = a_t if need_grad else torch.empty((0,), dtype=acc, device=dev)
    return _finish(kl, tau * tau / maps, acc), da, lse, dd, sc


def _logit_attention_bwd(
    grad: torch.Tensor, ps: torch.Tensor, da: torch.Tensor, lse: torch.Tensor, dd: torch.Tensor,
    sc: torch.Tensor,
) -> torch.Tensor:
    """d loss / d ps for upstream gradient `grad` (0-dim), in ps's dtype and memory format."""
    if da.numel() == 0:
        raise RuntimeError("kdkernels::logit_attention_triton was called with need_grad=False; "
                           "call it with need_grad=True to differentiate it")
    B, K, H, W = ps.shape
    cfg = _config(W, da.dtype, backward=True)
    gx = torch.empty_like(ps)
    tiles = (triton.cdiv(H, cfg["BLOCK_N"]), triton.cdiv(W, cfg["BLOCK_DV"]))
    for m0, n in _batch_chunks(B * K):
        _launch(_la_bwd_kernel)[(*tiles, n)](
            ps, _bits(1.0 / math.sqrt(W)), grad, da, lse, dd, sc, gx, m0, K, H, W, *ps.stride(),
            *gx.stride(), num_warps=_ATTEND_WARPS, **cfg)
    return gx


def _fake_fwd(ps, pt, tau, need_grad):
    acc = _acc_dtype(ps)
    maps, H, W = ps.shape[0] * ps.shape[1], ps.shape[2], ps.shape[3]
    if not need_grad:
        return (ps.new_empty((), dtype=acc),) + tuple(ps.new_empty((0,), dtype=acc)
                                                      for _ in range(4))
    return (ps.new_empty((), dtype=acc), ps.new_empty((maps, H, W), dtype=acc),
            ps.new_empty((maps, H), dtype=acc), ps.new_empty((maps, H), dtype=acc),
            ps.new_empty((maps, H, H), dtype=acc))


def _fake_bwd(grad, ps, da, lse, dd, sc):
    return torch.empty_like(ps)


_logit_attention = fused_loss("logit_attention_triton", _logit_attention_fwd, _logit_attention_bwd,
                              _fake_fwd, _fake_bwd, saved_inputs=(0,), const_inputs=())


def logit_attention(ps: torch.Tensor, pt: torch.Tensor, tau: float) -> torch.Tensor:
    """Logit-attention loss (0-dim; float32, float64 for float64 inputs), autograd to ps.

    Inputs are validated by the caller: ps and pt of one shape, (B, H, W) or (B, K, H, W), on one
    device, any strides, each float16/bfloat16/float32, or both float64 (one float64 input
    promotes both).
    """
    if (ps.dtype == torch.float64) != (pt.dtype == torch.float64):
        ps, pt = ps.double(), pt.double()
    if ps.dim() == 3:
        ps, pt = ps.unsqueeze(1), pt.unsqueeze(1)
    need_grad = ps.requires_grad and torch.is_grad_enabled()
    return _logit_attention(ps, pt.detach(), float(tau), need_grad)
