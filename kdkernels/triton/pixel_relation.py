"""Pixel relation (CPKD / SKD) in Triton: kernels, launchers and autograd registration.

Per sample every pixel's C-vector is L2-normalised (A = Cs x N from fs, T = Ct x N from ft) and
the N x N cosine-similarity matrices S_s = A^T A, S_t = T^T T are compared. S is never
materialised: memory stays O(B * N * C). Math and op contract: SPEC section 3 and the relations
contract. Pixel norms come from _pixel_norm_kernel (grid (N blocks, B)) into a (B, N) buffer; the
other kernels load the raw features through their strides and normalise on the fly.

distance="kl", the flagship (ops kdkernels::pixel_relation_kl_triton[_backward]):
* forward, flash-attention style, grid (N / BLOCK_M row blocks I, B): for each column block J
  the tiles X_s = A_I^T A_J / tau and X_t = T_I^T T_J / tau are formed with tl.dot (raw-feature
  products scaled by the per-pixel inverse norms), and per row an online softmax runs for both
  (running max, rescaled sums) together with the rescaled sums of e_t * d and e_t * (exp(d) - 1
  - d), e_t = exp(X_t - running max), d = X_s - X_t. It writes lse_s, lse_t (B, N) and the
  per-row KL term; the loss is their fixed-order sum (in float64) times tau^2 / (B N).
  Per-row KL: KL_i = sum_j p_t (X_t - X_s) + lse_s - lse_t. Near the teacher this bracket
  cancels catastrophically (each part is O(|d|), the result O(d^2)). With v = sum_j p_t expm1(d)
  (so lse_s - lse_t = log1p(v)) it equals sum_j p_t (expm1(d) - d) + (log1p(v) - v): a sum of
  non-negative terms plus a smaller correction, both evaluated by series for small arguments,
  accurate to the rounding of the tiles themselves. That form is used where every |d| <= 1 in
  the row (near the teacher), the contract's bracket otherwise. There lse_s is also stored as
  lse_t + log1p(v) (see the backward).
* Tiles: X = (raw dot) * scale_i * scale_j with the scales 1 / (max(n, eps) tau) in float64 (the
  pixel norms are accumulated in float64): one rounding per tile entry instead of one per
  factor; and the diagonal of a unit pixel is exactly 1 / tau. Both matter near the teacher.
* backward, grid (row blocks I, channel blocks of Cs, B): recomputes the tiles; with
  Gm_ij = g tau / (B N) (p_s_ij - p_t_ij), dA_{:, I} = sum_J A_J (Gm_IJ + Gm_JI^T), and since
  S is symmetric both terms come from the same tiles (lse of rows I and of columns J): no
  atomics. p_s - p_t is evaluated as p_t expm1(d - (lse_s - lse_t)) where that argument is
  small (lse_s - lse_t is exact in floating point for close values, and the forward stored it as
  log1p(v) rounded once), the plain difference otherwise. The pixel-normalisation backward needs
  <A_i, dA_i> over all channels: fused into the epilogue when one channel block covers Cs, else
  dA goes to a (B, Cs, N) buffer and _pixel_norm_bwd_kernel finishes.

distance="mse" (ops kdkernels::pixel_relation_mse_triton[_backward]): the algebraic route in
float64, ||S_s - S_t||_F^2 = ||A A^T||^2 + ||T T^T||^2 - 2 ||A T^T||^2, with the small Grams
m_ss, m_st, m_tt computed by the split-K Gram kernel (_common._gram) from A, T normalised in
float64; backward dA = g 4 / (B N^2) (m_ss A - m_st T) by _pr_mse_bwd_kernel (float64), then the
pixel-normalisation backward (fused or via the buffer, as above).

Precision per path: mse entirely float64 (FMA products, _common._mm); kl tiles float32 products
(fp32 tl.dot with _common._DOT_PRECISION = "ieee", or 16-bit tensor-core dots of the raw 16-bit
features, whose products are exact in fp32) scaled in float64, float32 online softmax and row
terms, float64 sum of the row terms; float64 inputs run everything in float64. Under
TRITON_INTERPRET=1 every tl.dot is a numpy fp32 matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from kdkernels.triton._common import (
    GRAM_PIXEL_NORM,
    _acc_dtype,
    _batch_chunks,
    _cast_for,
    _define_op,
    _div,
    _eps_like,
    _gram,
    _inv_norm,
    _log1p_minus_x,
    _mm,
    _pixel_offsets,
    _pow2,
    _scalar,
    _strides,
)

__all__ = ["pixel_relation"]

# Streaming tiles [BLOCK_C, BLOCK_N] for the pixel norms and the normalisation backward: NCHW-like
# inputs (pixels contiguous) take few channels by many pixels, channels_last ones 32 channels by
# 64 pixels (as in attention_transfer).
_TILE_PIXELS_CONTIGUOUS = (8, 256)
_TILE_CHANNELS_CONTIGUOUS = (32, 64)
# KL tiles, float32 accumulation: BLOCK_M x BLOCK_N pixel tiles; the channel dimension of the
# tile products is padded to a power of two >= 16. Up to _KL_RESIDENT_K channels the I-block of
# features is loaded once per program and kept (one tl.dot per tile), beyond that the products
# step through _KL_BLOCK_K channels at a time. The backward accumulates dA for up to
# _KL_MAX_BLOCK_CO channels per program (more channels: several programs per row block, each
# recomputing the tiles, and a separate normalisation-backward pass).
# These sizes come from ptxas register reports for sm_90 (Triton 3.8), not from timings: two
# fp32 "ieee" (FMA) tile products per step plus the online-softmax state spill heavily at
# 64 x 64 with 4 warps; 32 x 64 with 8 warps compiles without spills (forward) or with a few
# hundred bytes (backward, 64 dA channels). Retune against benchmarks.
_KL_BLOCK = (32, 64)  # (BLOCK_M, BLOCK_N)
_KL_RESIDENT_K = 64
_KL_BLOCK_K = 32
_KL_MAX_BLOCK_CO = 64
_KL_WARPS = (8, 8)  # (forward, backward)
# float64 (FMA products, see _common._mm): small tiles.
_KL_BLOCK_FP64 = (16, 16)
_KL_BLOCK_K_FP64 = 4
_KL_MAX_BLOCK_CO_FP64 = 32
_KL_WARPS_FP64 = 4
# mse backward (float64 FMA): [BLOCK_N, BLOCK_CO] tiles, BLOCK_K channels per step.
_MSE_BWD_BLOCK = (32, 4)  # (BLOCK_N, BLOCK_K)
_MSE_MAX_BLOCK_CO = 64
_NUM_WARPS = 4


# --- device helpers -------------------------------------------------------------------------


@triton.jit
def _use_series(x):
    """Where |x| is small enough for the Taylor series below (truncation ~1e-11 relative in
    float32 for |x| < 0.5, ~1e-19 in float64 for |x| < 0.1)."""
    if x.dtype.is_fp64():
        r = tl.abs(x) < 0.1
    else:
        r = tl.abs(x) < 0.5
    return r


@triton.jit
def _expm1_minus_x_series(d):
    """exp(d) - 1 - d by its Taylor series to d^11 (where _use_series(d))."""
    q = d * (1.0 / 39916800.0) + (1.0 / 3628800.0)
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
def _expm1_minus_x(d):
    """exp(d) - 1 - d (>= 0) without cancellation: the series for small |d|."""
    return tl.where(_use_series(d), _expm1_minus_x_series(d), tl.exp(d) - 1.0 - d)


@triton.jit
def _softmax_diff(xs, xt, lse_s, lse_t, delta):
    """p_s - p_t = exp(xs - lse_s) - exp(xt - lse_t) for tiles xs, xt and broadcastable row
    statistics, delta = lse_s - lse_t. For small |z|, z = (xs - xt) - delta, it is evaluated as
    p_t expm1(z): near the teacher the direct difference of two nearly equal probabilities
    loses the digits that z keeps."""
    p_t = tl.exp(xt - lse_t)
    z = (xs - xt) - delta
    return tl.where(_use_series(z), p_t * (z + _expm1_minus_x_series(z)),
                    tl.exp(xs - lse_s) - p_t)


@triton.jit
def _scores(base, C, sC, i, j, oi, oj, mask_i, mask_j, a_i, scale_i, scale_j, unit_i, inv_tau,
            RESIDENT: tl.constexpr, ACC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] tile X_ij = scale_i scale_j sum_c x[c, i] x[c, j] from the raw features.

    scale_i = 1 / (max(n_i, eps) tau), scale_j = 1 / max(n_j, eps), in float64 (one rounding of
    the product). The diagonal of a unit pixel (unit_i: n_i > eps) is set to exactly 1 / tau,
    its true value: near the teacher the rounding of the computed one would otherwise be a
    large part of X_s - X_t there.
    RESIDENT: a_i is the [BLOCK_M, BLOCK_K] I-block (BLOCK_K >= C), one product. Otherwise the
    channels are stepped through BLOCK_K at a time (a_i unused).
    """
    if RESIDENT:
        k = tl.arange(0, BLOCK_K)
        mask_k = k < C
        b_j = tl.load(base + (k.to(tl.int64) * sC)[:, None] + oj[None, :],
                      mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        s = _mm(a_i, b_j, tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC))
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask_k = k < C
            koff = k.to(tl.int64) * sC
            a = tl.load(base + oi[:, None] + koff[None, :],
                        mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            b_j = tl.load(base + koff[:, None] + oj[None, :],
                          mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            s = _mm(a, b_j, s)
    # The scales are float64: one rounding of the product instead of one per factor.
    x = (s.to(tl.float64) * (scale_i[:, None] * scale_j[None, :])).to(ACC)
    return tl.where((i[:, None] == j[None, :]) & unit_i[:, None], inv_tau.to(ACC), x)


@triton.jit
def _resident_block(base, C, sC, oi, mask_i, RESIDENT: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] raw I-block of features when RESIDENT (else a placeholder)."""
    if RESIDENT:
        k = tl.arange(0, BLOCK_K)
        a = tl.load(base + oi[:, None] + (k.to(tl.int64) * sC)[None, :],
                    mask=mask_i[:, None] & (k < C)[None, :], other=0.0)
    else:
        a = tl.zeros([1], dtype=tl.float32)  # unused
    return a


@triton.jit
def _pixel_norm_backward(da, raw, nrm):
    """d fs for a [pixels, channels] tile holding ALL channels of its pixels, given dA.

    (dA - A <A, dA>) / n where n = ||fs[:, pixel]|| > eps, else dA / eps.
    """
    inv = _inv_norm(nrm)
    a = raw.to(da.dtype) * inv[:, None]
    dot = tl.where(nrm > _eps_like(nrm), tl.sum(a * da, axis=1), 0.0)
    return (da - a * dot[:, None]) * inv[:, None]


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _pixel_norm_kernel(
    x_ptr, nrm_ptr,
    b0, C, N, W,
    sB, sC, sH, sW, sN,
    FLAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """nrm[b, n] = ||x[b, :, n]||_2, accumulated in nrm's dtype."""
    ACC: tl.constexpr = nrm_ptr.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = (tl.program_id(1) + b0).to(tl.int64)
    mask_n = n < N
    off = _pixel_offsets(n, W, sH, sW, sN, FLAT)
    base = x_ptr + b * sB
    acc = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & mask_n[None, :]
        v = tl.load(base + (c.to(tl.int64) * sC)[:, None] + off[None, :], mask=mask,
                    other=0.0).to(ACC)
        acc += v * v
    ss = tl.sum(acc, axis=0)
    if ss.dtype.is_fp64():
        nrm = tl.sqrt(ss)
    else:
        nrm = tl.sqrt_rn(ss)
    tl.store(nrm_ptr + b * N + n, nrm, mask=mask_n)


@triton.jit
def _pixel_norm_bwd_kernel(
    da_ptr, x_ptr, nrm_ptr, gx_ptr,
    b0, C, N, W,
    dB, dC, dH, dW, dN,
    sB, sC, sH, sW, sN,
    gB, gC, gH, gW, gN,
    DFLAT: tl.constexpr, FLAT: tl.constexpr, GFLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_x from dA (a (B, C, H, W) buffer in ACC): two passes over the channels."""
    ACC: tl.constexpr = da_ptr.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = (tl.program_id(1) + b0).to(tl.int64)
    mask_n = n < N
    nrm = tl.load(nrm_ptr + b * N + n, mask=mask_n, other=1.0)
    inv = _inv_norm(nrm).to(ACC)
    d_base = da_ptr + b * dB
    x_base = x_ptr + b * sB
    g_base = gx_ptr + b * gB
    doff = _pixel_offsets(n, W, dH, dW, dN, DFLAT)[None, :]
    xoff = _pixel_offsets(n, W, sH, sW, sN, FLAT)[None, :]
    goff = _pixel_offsets(n, W, gH, gW, gN, GFLAT)[None, :]
    dot = tl.zeros([BLOCK_N], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (c < C)[:, None] & mask_n[None, :]
        da = tl.load(d_base + (c * dC)[:, None] + doff, mask=mask, other=0.0)
        a = tl.load(x_base + (c * sC)[:, None] + xoff, mask=mask, other=0.0).to(ACC)
        dot += tl.sum(a * inv[None, :] * da, axis=0)
    dot = tl.where(nrm > _eps_like(nrm), dot, 0.0)
    for c0 in range(0, C, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = (c < C)[:, None] & mask_n[None, :]
        da = tl.load(d_base + (c * dC)[:, None] + doff, mask=mask, other=0.0)
        a = tl.load(x_base + (c * sC)[:, None] + xoff, mask=mask, other=0.0).to(ACC)
        gx = (da - a * inv[None, :] * dot[None, :]) * inv[None, :]
        tl.store(g_base + (c * gC)[:, None] + goff, _cast_for(gx, gx_ptr), mask=mask)


@triton.jit
def _pr_kl_fwd_kernel(
    s_ptr, t_ptr, ns_ptr, nt_ptr, tau_ptr, lse_s_ptr, lse_t_ptr, term_ptr,
    b0, Cs, Ct, N, W,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    SFLAT: tl.constexpr, TFLAT: tl.constexpr, RES_S: tl.constexpr, RES_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KS: tl.constexpr, BLOCK_KT: tl.constexpr,
):
    """Row block I of sample b: lse_s, lse_t and the KL term of every row i in I."""
    ACC: tl.constexpr = lse_s_ptr.dtype.element_ty
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (tl.program_id(1) + b0).to(tl.int64)
    mask_i = i < N
    row = b * N + i
    inv_tau = 1.0 / tl.load(tau_ptr)  # float64 (see _scores)
    s_base = s_ptr + b * sB
    t_base = t_ptr + b * tB
    oi_s = _pixel_offsets(i, W, sH, sW, sN, SFLAT)
    oi_t = _pixel_offsets(i, W, tH, tW, tN, TFLAT)
    # Row scales carry 1/tau: X = S / tau.
    nrm_i = tl.load(ns_ptr + row, mask=mask_i, other=1.0)
    nrm_ti = tl.load(nt_ptr + row, mask=mask_i, other=1.0)
    sc_s = _inv_norm(nrm_i) * inv_tau
    sc_t = _inv_norm(nrm_ti) * inv_tau
    unit_s = nrm_i > _eps_like(nrm_i)
    unit_t = nrm_ti > _eps_like(nrm_ti)
    a_s = _resident_block(s_base, Cs, sC, oi_s, mask_i, RES_S, BLOCK_KS)
    a_t = _resident_block(t_base, Ct, tC, oi_t, mask_i, RES_T, BLOCK_KT)
    m_s = tl.full([BLOCK_M], float("-inf"), ACC)
    l_s = tl.zeros([BLOCK_M], dtype=ACC)
    m_t = tl.full([BLOCK_M], float("-inf"), ACC)
    l_t = tl.zeros([BLOCK_M], dtype=ACC)
    w = tl.zeros([BLOCK_M], dtype=ACC)  # sum e_t d
    q = tl.zeros([BLOCK_M], dtype=ACC)  # sum e_t (exp(d) - 1 - d)
    dmax = tl.zeros([BLOCK_M], dtype=ACC)  # max |d|
    for j0 in range(0, N, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        mask_j = j < N
        col = b * N + j
        oj_s = _pixel_offsets(j, W, sH, sW, sN, SFLAT)
        oj_t = _pixel_offsets(j, W, tH, tW, tN, TFLAT)
        sc_sj = _inv_norm(tl.load(ns_ptr + col, mask=mask_j, other=1.0))
        sc_tj = _inv_norm(tl.load(nt_ptr + col, mask=mask_j, other=1.0))
        xs = _scores(s_base, Cs, sC, i, j, oi_s, oj_s, mask_i, mask_j, a_s,
                     sc_s, sc_sj, unit_s, inv_tau, RES_S, ACC, BLOCK_M, BLOCK_N,
                     BLOCK_KS)
        xt = _scores(t_base, Ct, tC, i, j, oi_t, oj_t, mask_i, mask_j, a_t,
                     sc_t, sc_tj, unit_t, inv_tau, RES_T, ACC, BLOCK_M, BLOCK_N,
                     BLOCK_KT)
        valid = mask_j[None, :]
        # Student: online logsumexp.
        m_new = tl.maximum(m_s, tl.max(tl.where(valid, xs, float("-inf")), axis=1))
        e_s = tl.where(valid, tl.exp(xs - m_new[:, None]), 0.0)
        l_s = l_s * tl.exp(m_s - m_new) + tl.sum(e_s, axis=1)
        m_s = m_new
        # Teacher: online logsumexp plus the p_t-weighted sums of d and expm1(d) - d.
        m_new = tl.maximum(m_t, tl.max(tl.where(valid, xt, float("-inf")), axis=1))
        alpha = tl.exp(m_t - m_new)
        e_t = tl.where(valid, tl.exp(xt - m_new[:, None]), 0.0)
        d = tl.where(valid, xs - xt, 0.0)
        l_t = l_t * alpha + tl.sum(e_t, axis=1)
        w = w * alpha + tl.sum(e_t * d, axis=1)
        q = q * alpha + tl.sum(e_t * _expm1_minus_x(d), axis=1)
        dmax = tl.maximum(dmax, tl.max(tl.abs(d), axis=1))
        m_t = m_new
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    # Contract bracket: sum_j p_t (X_t - X_s) + lse_s - lse_t.
    plain = lse_s - lse_t - _div(w, l_t)
    # The same, without cancellation: E[expm1(d) - d] + log1p(v) - v with v = E[expm1(d)].
    v = _div(q + w, l_t)
    compensated = _div(q, l_t) + _log1p_minus_x(v)
    # Only where every |d| <= 1: v = (w + q) / l_t carries ~max |d| eps of rounding, more than
    # 1 + v itself when the student is far below the teacher's mass (|v| < 1 does not bound it).
    near = dmax <= 1.0
    term = tl.where(near, compensated, plain)
    # Near the teacher store lse_s as lse_t + log1p(v): the same value to rounding, but then
    # lse_s - lse_t (exact in floating point for close values) is log1p(v) rounded once, which
    # the backward's p_s - p_t = p_t expm1(d - (lse_s - lse_t)) relies on.
    lse_s = tl.where(near, lse_t + (_log1p_minus_x(v) + v), lse_s)
    tl.store(lse_s_ptr + row, lse_s, mask=mask_i)
    tl.store(lse_t_ptr + row, lse_t, mask=mask_i)
    tl.store(term_ptr + row, term, mask=mask_i)


@triton.jit
def _pr_kl_bwd_kernel(
    coef_ptr, s_ptr, t_ptr, ns_ptr, nt_ptr, tau_ptr, lse_s_ptr, lse_t_ptr, out_ptr,
    b0, Cs, Ct, N, W,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    oB, oC, oH, oW, oN,
    FUSE: tl.constexpr, SFLAT: tl.constexpr, TFLAT: tl.constexpr, OFLAT: tl.constexpr,
    RES_S: tl.constexpr, RES_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KS: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """dA[b, co, I] = coef sum_J A[co, J] (P_IJ + P_JI^T), P = p_s - p_t; FUSE: then d fs."""
    ACC: tl.constexpr = lse_s_ptr.dtype.element_ty
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = (tl.program_id(2) + b0).to(tl.int64)
    mask_i = i < N
    mask_co = co < Cs
    co_off = (co.to(tl.int64) * sC)[None, :]
    row = b * N + i
    inv_tau = 1.0 / tl.load(tau_ptr)  # float64 (see _scores)
    s_base = s_ptr + b * sB
    t_base = t_ptr + b * tB
    oi_s = _pixel_offsets(i, W, sH, sW, sN, SFLAT)
    oi_t = _pixel_offsets(i, W, tH, tW, tN, TFLAT)
    nrm_i = tl.load(ns_ptr + row, mask=mask_i, other=1.0)
    nrm_ti = tl.load(nt_ptr + row, mask=mask_i, other=1.0)
    sc_s = _inv_norm(nrm_i) * inv_tau
    sc_t = _inv_norm(nrm_ti) * inv_tau
    unit_s = nrm_i > _eps_like(nrm_i)
    unit_t = nrm_ti > _eps_like(nrm_ti)
    lse_si = tl.load(lse_s_ptr + row, mask=mask_i, other=0.0)
    lse_ti = tl.load(lse_t_ptr + row, mask=mask_i, other=0.0)
    a_s = _resident_block(s_base, Cs, sC, oi_s, mask_i, RES_S, BLOCK_KS)
    a_t = _resident_block(t_base, Ct, tC, oi_t, mask_i, RES_T, BLOCK_KT)
    acc = tl.zeros([BLOCK_M, BLOCK_CO], dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        mask_j = j < N
        col = b * N + j
        oj_s = _pixel_offsets(j, W, sH, sW, sN, SFLAT)
        oj_t = _pixel_offsets(j, W, tH, tW, tN, TFLAT)
        sc_sj = _inv_norm(tl.load(ns_ptr + col, mask=mask_j, other=1.0))
        sc_tj = _inv_norm(tl.load(nt_ptr + col, mask=mask_j, other=1.0))
        xs = _scores(s_base, Cs, sC, i, j, oi_s, oj_s, mask_i, mask_j, a_s,
                     sc_s, sc_sj, unit_s, inv_tau, RES_S, ACC, BLOCK_M, BLOCK_N,
                     BLOCK_KS)
        xt = _scores(t_base, Ct, tC, i, j, oi_t, oj_t, mask_i, mask_j, a_t,
                     sc_t, sc_tj, unit_t, inv_tau, RES_T, ACC, BLOCK_M, BLOCK_N,
                     BLOCK_KT)
        lse_sj = tl.load(lse_s_ptr + col, mask=mask_j, other=0.0)
        lse_tj = tl.load(lse_t_ptr + col, mask=mask_j, other=0.0)
        # Rows I with the lse of rows I (Gm_IJ) plus, S being symmetric, Gm_JI^T with the lse
        # of rows J.
        p = _softmax_diff(xs, xt, lse_si[:, None], lse_ti[:, None], (lse_si - lse_ti)[:, None]) \
            + _softmax_diff(xs, xt, lse_sj[None, :], lse_tj[None, :], (lse_sj - lse_tj)[None, :])
        # A_J = raw_J / n_J: the column scale goes on p.
        p = tl.where(mask_j[None, :], p * sc_sj.to(ACC)[None, :], 0.0)
        a_j = tl.load(s_base + oj_s[:, None] + co_off,
                      mask=mask_j[:, None] & mask_co[None, :], other=0.0).to(ACC)
        acc = _mm(p, a_j, acc)
    acc = acc * tl.load(coef_ptr).to(ACC)
    mask = mask_i[:, None] & mask_co[None, :]
    if FUSE:
        raw = tl.load(s_base + oi_s[:, None] + co_off, mask=mask, other=0.0)
        acc = _pixel_norm_backward(acc, raw, nrm_i)
    out = out_ptr + b * oB + _pixel_offsets(i, W, oH, oW, oN, OFLAT)[:, None] \
        + (co.to(tl.int64) * oC)[None, :]
    tl.store(out, _cast_for(acc, out_ptr), mask=mask)


@triton.jit
def _pr_mse_bwd_kernel(
    coef_ptr, s_ptr, t_ptr, ns_ptr, nt_ptr, mss_ptr, mst_ptr, out_ptr,
    b0, Cs, Ct, N, W,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    oB, oC, oH, oW, oN,
    FUSE: tl.constexpr, SFLAT: tl.constexpr, TFLAT: tl.constexpr, OFLAT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA^T[b, n, co] = coef (sum_k A[k, n] m_ss[co, k] - sum_k T[k, n] m_st[co, k]) (float64)."""
    ACC: tl.constexpr = mss_ptr.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    b = (tl.program_id(2) + b0).to(tl.int64)
    mask_n = n < N
    mask_co = co < Cs
    nrm_s = tl.load(ns_ptr + b * N + n, mask=mask_n, other=1.0)
    inv_s = _inv_norm(nrm_s)
    inv_t = _inv_norm(tl.load(nt_ptr + b * N + n, mask=mask_n, other=1.0))
    s_base = s_ptr + b * sB
    t_base = t_ptr + b * tB
    os_ = _pixel_offsets(n, W, sH, sW, sN, SFLAT)
    ot = _pixel_offsets(n, W, tH, tW, tN, TFLAT)
    mss = mss_ptr + (b * Cs + co.to(tl.int64)) * Cs  # rows co of m_ss[b]
    mst = mst_ptr + (b * Cs + co.to(tl.int64)) * Ct  # rows co of m_st[b]
    acc = tl.zeros([BLOCK_N, BLOCK_CO], dtype=ACC)
    for k0 in range(0, Cs, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < Cs
        a = tl.load(s_base + os_[:, None] + (k.to(tl.int64) * sC)[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(ACC) * inv_s[:, None]
        m = tl.load(mss[None, :] + k[:, None], mask=mask_k[:, None] & mask_co[None, :], other=0.0)
        acc = _mm(a, m, acc)
    for k0 in range(0, Ct, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < Ct
        t = tl.load(t_base + ot[:, None] + (k.to(tl.int64) * tC)[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(ACC) * inv_t[:, None]
        m = tl.load(mst[None, :] + k[:, None], mask=mask_k[:, None] & mask_co[None, :], other=0.0)
        acc = _mm(t, -m, acc)
    acc = acc * tl.load(coef_ptr)
    mask = mask_n[:, None] & mask_co[None, :]
    if FUSE:
        raw = tl.load(s_base + os_[:, None] + (co.to(tl.int64) * sC)[None, :], mask=mask,
                      other=0.0)
        acc = _pixel_norm_backward(acc, raw, nrm_s)
    out = out_ptr + b * oB + _pixel_offsets(n, W, oH, oW, oN, OFLAT)[:, None] \
        + (co.to(tl.int64) * oC)[None, :]
    tl.store(out, _cast_for(acc, out_ptr), mask=mask)


# --- host side ------------------------------------------------------------------------------


def _stream_tile(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_N) for streaming x: channels contiguous (channels_last) or pixels."""
    if x.shape[1] > 1 and x.stride(1) == 1:
        return _TILE_CHANNELS_CONTIGUOUS
    return _TILE_PIXELS_CONTIGUOUS


def _pixel_norms(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) L2 norms of x's pixel vectors, accumulated in dtype."""
    B, C, H, W = x.shape
    nrm = torch.empty((B, H * W), dtype=dtype, device=x.device)
    sB, sC, sH, sW, sN, flat = _strides(x)
    block_c, block_n = _stream_tile(x)
    for b0, nb in _batch_chunks(B):
        wrap_triton(_pixel_norm_kernel)[(triton.cdiv(H * W, block_n), nb)](
            x, nrm, b0, C, H * W, W, sB, sC, sH, sW, sN,
            FLAT=flat, BLOCK_C=block_c, BLOCK_N=block_n, num_warps=_NUM_WARPS,
        )
    return nrm


def _finish_norm_backward(da: torch.Tensor, fs: torch.Tensor, nrm: torch.Tensor,
                          gx: torch.Tensor) -> None:
    """gx = pixel-normalisation backward of dA (a (B, Cs, H, W) buffer)."""
    B, C, H, W = fs.shape
    dB, dC, dH, dW, dN, dflat = _strides(da)
    sB, sC, sH, sW, sN, flat = _strides(fs)
    gB, gC, gH, gW, gN, gflat = _strides(gx)
    block_c, block_n = _stream_tile(fs)
    for b0, nb in _batch_chunks(B):
        wrap_triton(_pixel_norm_bwd_kernel)[(triton.cdiv(H * W, block_n), nb)](
            da, fs, nrm, gx, b0, C, H * W, W,
            dB, dC, dH, dW, dN, sB, sC, sH, sW, sN, gB, gC, gH, gW, gN,
            DFLAT=dflat, FLAT=flat, GFLAT=gflat, BLOCK_C=block_c, BLOCK_N=block_n,
            num_warps=_NUM_WARPS,
        )


def _kl_config(Cs: int, Ct: int, acc: torch.dtype) -> dict:
    """Tile sizes of the KL kernels for these channel counts and accumulation type."""
    if acc == torch.float64:
        bm, bn = _KL_BLOCK_FP64
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KS=_KL_BLOCK_K_FP64, BLOCK_KT=_KL_BLOCK_K_FP64,
                    RES_S=False, RES_T=False), _pow2(Cs, 16, _KL_MAX_BLOCK_CO_FP64)
    bm, bn = _KL_BLOCK
    ks, kt = _pow2(Cs, 16, 1 << 30), _pow2(Ct, 16, 1 << 30)
    res_s, res_t = ks <= _KL_RESIDENT_K, kt <= _KL_RESIDENT_K
    return dict(BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_KS=ks if res_s else _KL_BLOCK_K, BLOCK_KT=kt if res_t else _KL_BLOCK_K,
                RES_S=res_s, RES_T=res_t), _pow2(Cs, 16, _KL_MAX_BLOCK_CO)


def _kl_warps(acc: torch.dtype, backward: int) -> int:
    return _KL_WARPS_FP64 if acc == torch.float64 else _KL_WARPS[backward]


# -- kl --


@_define_op("kdkernels::pixel_relation_kl_triton", mutates_args=())
def _pixel_relation_kl_fwd(
    fs: torch.Tensor, ft: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse_s (B, N), lse_t (B, N)) in the accumulation dtype."""
    B, Cs, H, W = fs.shape
    Ct = ft.shape[1]
    N = H * W
    acc = _acc_dtype(fs)
    # Pixel norms, hence the tile scales, in float64 (see _scores).
    ns, nt = _pixel_norms(fs, torch.float64), _pixel_norms(ft, torch.float64)
    lse_s = torch.empty((B, N), dtype=acc, device=fs.device)
    lse_t = torch.empty((B, N), dtype=acc, device=fs.device)
    term = torch.empty((B, N), dtype=acc, device=fs.device)
    cfg, _ = _kl_config(Cs, Ct, acc)
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    tau64 = _scalar(tau, fs, torch.float64)
    for b0, nb in _batch_chunks(B):
        wrap_triton(_pr_kl_fwd_kernel)[(triton.cdiv(N, cfg["BLOCK_M"]), nb)](
            fs, ft, ns, nt, tau64, lse_s, lse_t, term,
            b0, Cs, Ct, N, W,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            SFLAT=sflat, TFLAT=tflat, num_warps=_kl_warps(acc, 0), **cfg,
        )
    # Fixed-order sum of the per-row terms, in float64 (B * N values: free).
    loss = term.sum(dtype=torch.float64) * (tau * tau / (B * N))
    return loss.to(acc), lse_s, lse_t


@_define_op("kdkernels::pixel_relation_kl_triton_backward", mutates_args=())
def _pixel_relation_kl_bwd(
    grad: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, lse_s: torch.Tensor,
    lse_t: torch.Tensor, tau: float,
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    B, Cs, H, W = fs.shape
    Ct = ft.shape[1]
    N = H * W
    acc = lse_s.dtype
    lse_s, lse_t = lse_s.contiguous(), lse_t.contiguous()
    # Pixel norms, hence the tile scales, in float64 (see _scores).
    ns, nt = _pixel_norms(fs, torch.float64), _pixel_norms(ft, torch.float64)
    coef = grad.to(acc) * (tau / (B * N))  # d loss / d S_s = coef (p_s - p_t)
    gx = torch.empty_like(fs)
    cfg, block_co = _kl_config(Cs, Ct, acc)
    fuse = Cs <= block_co
    out = gx if fuse else torch.empty((B, Cs, H, W), dtype=acc, device=fs.device)
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    oB, oC, oH, oW, oN, oflat = _strides(out)
    tiles = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(Cs, block_co))
    tau64 = _scalar(tau, fs, torch.float64)
    for b0, nb in _batch_chunks(B):
        wrap_triton(_pr_kl_bwd_kernel)[(*tiles, nb)](
            coef, fs, ft, ns, nt, tau64, lse_s, lse_t, out,
            b0, Cs, Ct, N, W,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            oB, oC, oH, oW, oN,
            FUSE=fuse, SFLAT=sflat, TFLAT=tflat, OFLAT=oflat, BLOCK_CO=block_co,
            num_warps=_kl_warps(acc, 1), **cfg,
        )
    if not fuse:
        _finish_norm_backward(out, fs, ns, gx)
    return gx


@_pixel_relation_kl_fwd.register_fake
def _fake_kl_fwd(fs, ft, tau):
    acc = _acc_dtype(fs)
    B, N = fs.shape[0], fs.shape[2] * fs.shape[3]
    return (fs.new_empty((), dtype=acc), fs.new_empty((B, N), dtype=acc),
            fs.new_empty((B, N), dtype=acc))


@_pixel_relation_kl_bwd.register_fake
def _fake_kl_bwd(grad, fs, ft, lse_s, lse_t, tau):
    return torch.empty_like(fs)


def _setup_kl(ctx, inputs, output):
    fs, ft, tau = inputs
    ctx.save_for_backward(fs, ft, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.tau = tau


def _backward_kl(ctx, grad_loss, _grad_lse_s, _grad_lse_t):
    fs, ft, lse_s, lse_t = ctx.saved_tensors
    grad_fs = torch.ops.kdkernels.pixel_relation_kl_triton_backward(
        grad_loss, fs, ft, lse_s, lse_t, ctx.tau)
    return grad_fs, None, None


torch.library.register_autograd(
    "kdkernels::pixel_relation_kl_triton", _backward_kl, setup_context=_setup_kl)


# -- mse --


@_define_op("kdkernels::pixel_relation_mse_triton", mutates_args=())
def _pixel_relation_mse_fwd(
    fs: torch.Tensor, ft: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss in the accumulation dtype, m_ss (B, Cs, Cs), m_st (B, Cs, Ct) in float64)."""
    B, H, W = fs.shape[0], fs.shape[2], fs.shape[3]
    N = H * W
    f64 = torch.float64
    ns, nt = _pixel_norms(fs, f64), _pixel_norms(ft, f64)
    m_ss = _gram(fs, fs, ns, ns, GRAM_PIXEL_NORM, f64)
    m_st = _gram(fs, ft, ns, nt, GRAM_PIXEL_NORM, f64)
    m_tt = _gram(ft, ft, nt, nt, GRAM_PIXEL_NORM, f64)
    total = (m_ss * m_ss).sum() + (m_tt * m_tt).sum() - 2.0 * (m_st * m_st).sum()
    # ||S_s - S_t||^2 >= 0; the identity's rounding can only leave a tiny negative residue.
    loss = total.clamp_min(0.0) / (B * N * N)
    return loss.to(_acc_dtype(fs)), m_ss, m_st


@_define_op("kdkernels::pixel_relation_mse_triton_backward", mutates_args=())
def _pixel_relation_mse_bwd(
    grad: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, m_ss: torch.Tensor,
    m_st: torch.Tensor,
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    B, Cs, H, W = fs.shape
    Ct = ft.shape[1]
    N = H * W
    f64 = torch.float64
    m_ss, m_st = m_ss.to(f64).contiguous(), m_st.to(f64).contiguous()
    ns, nt = _pixel_norms(fs, f64), _pixel_norms(ft, f64)
    coef = grad.to(f64) * (4.0 / (B * N * N))
    gx = torch.empty_like(fs)
    block_n, block_k = _MSE_BWD_BLOCK
    block_co = _pow2(Cs, 16, _MSE_MAX_BLOCK_CO)
    fuse = Cs <= block_co
    out = gx if fuse else torch.empty((B, Cs, H, W), dtype=f64, device=fs.device)
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    oB, oC, oH, oW, oN, oflat = _strides(out)
    tiles = (triton.cdiv(N, block_n), triton.cdiv(Cs, block_co))
    for b0, nb in _batch_chunks(B):
        wrap_triton(_pr_mse_bwd_kernel)[(*tiles, nb)](
            coef, fs, ft, ns, nt, m_ss, m_st, out,
            b0, Cs, Ct, N, W,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            oB, oC, oH, oW, oN,
            FUSE=fuse, SFLAT=sflat, TFLAT=tflat, OFLAT=oflat,
            BLOCK_N=block_n, BLOCK_CO=block_co, BLOCK_K=block_k, num_warps=_NUM_WARPS,
        )
    if not fuse:
        _finish_norm_backward(out, fs, ns, gx)
    return gx


@_pixel_relation_mse_fwd.register_fake
def _fake_mse_fwd(fs, ft):
    B, Cs, Ct = fs.shape[0], fs.shape[1], ft.shape[1]
    return (fs.new_empty((), dtype=_acc_dtype(fs)), fs.new_empty((B, Cs, Cs), dtype=torch.float64),
            fs.new_empty((B, Cs, Ct), dtype=torch.float64))


@_pixel_relation_mse_bwd.register_fake
def _fake_mse_bwd(grad, fs, ft, m_ss, m_st):
    return torch.empty_like(fs)


def _setup_mse(ctx, inputs, output):
    fs, ft = inputs
    ctx.save_for_backward(fs, ft, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_mse(ctx, grad_loss, _grad_m_ss, _grad_m_st):
    fs, ft, m_ss, m_st = ctx.saved_tensors
    grad_fs = torch.ops.kdkernels.pixel_relation_mse_triton_backward(grad_loss, fs, ft, m_ss, m_st)
    return grad_fs, None


torch.library.register_autograd(
    "kdkernels::pixel_relation_mse_triton", _backward_mse, setup_context=_setup_mse)


def pixel_relation(fs: torch.Tensor, ft: torch.Tensor, distance: str, tau: float) -> torch.Tensor:
    """Pixel-relation loss (0-dim; float32, float64 for float64 inputs), autograd to fs.

    Inputs are validated by the caller: fs (B, Cs, H, W) and ft (B, Ct, H, W) on one device, any
    strides, each float16/bfloat16/float32, or both float64 (one float64 input promotes both).
    """
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    if distance == "mse":
        return torch.ops.kdkernels.pixel_relation_mse_triton(fs, ft.detach())[0]
    if distance == "kl":
        return torch.ops.kdkernels.pixel_relation_kl_triton(fs, ft.detach(), float(tau))[0]
    raise ValueError(f"pixel_relation: unknown distance {distance!r}")
