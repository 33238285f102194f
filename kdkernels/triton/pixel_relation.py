"""Pixel relation (CPKD / SKD) in Triton: kernels, launchers and autograd registration.

Per sample every pixel's C-vector is L2-normalised (A = Cs x N from fs, T = Ct x N from ft) and
the N x N cosine-similarity matrices S_s = A^T A, S_t = T^T T are compared. S is never
materialised: memory stays O(B * N * C). Math and op contract: SPEC section 3 and the relations
contract. The kernels load the raw features through their strides and take the pixel norms
(sums of squares in float64) from the tiles they load anyway, so no pass computes them apart.

distance="kl", the flagship (ops kdkernels::pixel_relation_kl_triton[_backward]), three kernels:
* forward, flash-attention style, grid (N / BLOCK_M row blocks I, B): for each column block J
  the tiles X_s = A_I^T A_J / tau and X_t = T_I^T T_J / tau are formed with tl.dot (raw-feature
  products scaled by the per-pixel inverse norms), and per row an online softmax runs for both
  (running max, rescaled sums) together with the rescaled sums of e_t * d and e_t * (exp(d) - 1
  - d), e_t = exp(X_t - running max), d = X_s - X_t. It writes lse_s, lse_t (B, N) and the
  per-row KL term; the loss is their fixed-order float64 sum times tau^2 / (B N)
  (_common._finish). Per-row KL: KL_i = sum_j p_t (X_t - X_s) + lse_s - lse_t. Near the teacher
  this bracket cancels catastrophically (each part is O(|d|), the result O(d^2)). With
  v = sum_j p_t expm1(d) (so lse_s - lse_t = log1p(v)) it equals sum_j p_t (expm1(d) - d) +
  (log1p(v) - v): a sum of non-negative terms plus a smaller correction, both evaluated by
  series for small arguments, accurate to the rounding of the tiles themselves. That form is
  used where every |d| <= 1 in the row (near the teacher), the contract's bracket otherwise.
  There lse_s is also stored as lse_t + log1p(v) (see the backward).
* Tiles: X = (raw dot) * scale_i * scale_j with the scales 1 / (max(n, eps) tau) in float64:
  one rounding per tile entry instead of one per factor; and the diagonal of a unit pixel is
  exactly 1 / tau. Both matter near the teacher.
* backward, grid (row blocks I, B): recomputes the tiles; with Gm_ij = g tau / (B N)
  (p_s_ij - p_t_ij), dA_{:, I} = sum_J A_J (Gm_IJ + Gm_JI^T), and since S is symmetric both
  terms come from the same tiles (lse of rows I and of columns J): no atomics. p_s - p_t is
  evaluated as p_t expm1(d - (lse_s - lse_t)) where that argument is small (lse_s - lse_t is
  exact in floating point for close values, and the forward stored it as log1p(v) rounded once),
  the plain difference otherwise. One program holds every student channel of its rows, so the
  pixel-normalisation backward (which needs <A_i, dA_i> over all channels) is its epilogue;
  past _KL_MAX_BLOCK_CO channels it walks the channel blocks twice (the dots, then the output),
  recomputing the tiles, rather than launching a second kernel.

distance="mse" (ops kdkernels::pixel_relation_mse_triton[_backward]), four kernels: the
algebraic route in float64, ||S_s - S_t||_F^2 = ||A A^T||^2 + ||T T^T||^2 - 2 ||A T^T||^2:
* _pr_gram_kernel, grid (tile pairs of m_ss, m_st and m_tt, splits of N, B): the three small
  Grams split-K over the pixels, the features normalised per pixel as they load;
* _pr_mse_tail_kernel, grid (B,): merges the splits in a fixed order, keeps m_ss and m_st for
  the backward and writes the sample's ||S_s - S_t||^2 (>= 0: a negative rounding residue is
  clamped); _common._finish sums the samples;
* _pr_mse_bwd_kernel, grid (pixel blocks, B): dA = g 4 / (B N^2) (m_ss A - m_st T) for every
  student channel of its pixels, then the pixel-normalisation backward (two passes over the
  channel blocks past _MSE_MAX_BLOCK_CO channels, as above).

Precision per path: mse entirely float64 (tensor-core products, _common._mm); kl tiles float32 products
(tl.dot with _common._DOT_PRECISION = "tf32x3", three TF32 tensor-core products, or 16-bit
tensor-core dots of the raw 16-bit features, whose products are exact in fp32) scaled in
float64, float32 online softmax and row terms, float64 sum of the row terms; float64 inputs run
everything in float64. Under TRITON_INTERPRET=1 the tests emulate the TF32 rounding.
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
    _log1p_minus_x,
    _mm,
    _mm_from16,
    _pixel_offsets,
    _pow2,
    _split_k,
    _strides,
    fused_loss,
)

__all__ = ["pixel_relation"]

# KL tiles, float32 accumulation: BLOCK_M x BLOCK_N pixel tiles; the channel dimension of the
# tile products is padded to a power of two >= 16. Up to _KL_RESIDENT_K channels the I-block of
# features is loaded once per program and kept (one tl.dot per tile), beyond that the products
# step through _KL_BLOCK_K channels at a time. The backward accumulates dA for up to
# _KL_MAX_BLOCK_CO student channels per program (BLOCK_N halved at 128 channels to keep the
# registers); more channels take two passes.
# These sizes come from the ptxas register reports of Triton 3.8's sm_90 builds ("tf32x3" dots),
# not from timings (tests/triton_compile_check.py holds every launch to its spill budget): two
# tile products per step plus the online-softmax state spill heavily at 64 x 64 with 4 warps;
# 32 x 64 with 8 warps compiles without spills in the forward, the backward needs 32 x 32 (at
# 32 x 64 it spilled 232 bytes), and K steps of 16 channels where the channels do not stay
# resident (at 32 the forward spilled 160 bytes). Retune against benchmarks.
_KL_BLOCK = (32, 64)  # (BLOCK_M, BLOCK_N)
_KL_BWD_BLOCK_N = 32
_KL_RESIDENT_K = 64
_KL_BLOCK_K = 16
_KL_MAX_BLOCK_CO = 128
_KL_WARPS = (8, 8)  # (forward, backward)
# float64 (FMA products below 16 deep, see _common._mm): small tiles.
_KL_BLOCK_FP64 = (16, 16)
_KL_BLOCK_K_FP64 = 4
_KL_MAX_BLOCK_CO_FP64 = 32
_KL_WARPS_FP64 = 4
# mse, float64 tensor-core products (_common._mm): Gram tiles [BC, BC] (BC <= 64) over BK
# pixels; backward [BLOCK_N, BLOCK_CO] tiles (two of them, _MSE_BWD_ELEMS elements each) over
# BLOCK_K channels. On a Triton without float64 dots, FMA products of at most 8192 elements per
# step: BC <= 32, BK 8, BLOCK_K 4 (the same BLOCK_N).
_GRAM_BLOCK = (64, 16) if F64_DOT else (32, 8)  # (max BC, BK)
_GRAM_TARGET_PROGRAMS = 512
_MSE_MAX_BLOCK_CO = 128
_MSE_BWD_ELEMS = 2048
_MSE_BWD_BLOCK_K = 16 if F64_DOT else 4
# 8 warps keep the backward's float64 [pixels, k, channels] products in registers (4 spilled up to
# 704 bytes in Triton 3.8's sm_90 build).
_MSE_BWD_WARPS = 8
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
def _normalized_dot(base, off, co, sC, C, mask_p, inv, da):
    """Per pixel sum over the channels co of A * dA, A = raw / n (inv = 1 / max(n, eps)), for a
    [pixels, channels] tile dA."""
    raw = tl.load(base + off[:, None] + (co.to(tl.int64) * sC)[None, :],
                  mask=mask_p[:, None] & (co < C)[None, :], other=0.0)
    return tl.sum(raw.to(da.dtype) * inv[:, None] * da, axis=1)


@triton.jit
def _norm_backward_block(base, off, co, sC, C, mask_p, inv, nrm, dot, da):
    """d fs of the channels co from dA: (dA - A <A, dA>) / n where n = ||fs[:, pixel]|| > eps,
    else dA / eps (dot = <A, dA> over ALL channels of each pixel)."""
    raw = tl.load(base + off[:, None] + (co.to(tl.int64) * sC)[None, :],
                  mask=mask_p[:, None] & (co < C)[None, :], other=0.0)
    dot = tl.where(nrm > _eps_like(nrm), dot, 0.0)
    return (da - raw.to(da.dtype) * inv[:, None] * dot[:, None]) * inv[:, None]


# --- kernels --------------------------------------------------------------------------------


@triton.jit
def _sumsq(tile, axis: tl.constexpr):
    """Float64 sums of squares of a raw feature tile along its channel axis."""
    v = tile.to(tl.float64)
    return tl.sum(v * v, axis=axis)


@triton.jit
def _row_block(base, C, sC, oi, mask_i, RESIDENT: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_M: tl.constexpr):
    """(the [BLOCK_M, BLOCK_K] raw I-block when RESIDENT, else a placeholder; the rows' float64
    sums of squares over all C channels)."""
    if RESIDENT:
        k = tl.arange(0, BLOCK_K)
        a = tl.load(base + oi[:, None] + (k.to(tl.int64) * sC)[None, :],
                    mask=mask_i[:, None] & (k < C)[None, :], other=0.0)
        sq = _sumsq(a, 1)
    else:
        a = tl.zeros([1], dtype=tl.float32)  # unused
        sq = tl.zeros([BLOCK_M], dtype=tl.float64)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            sq += _sumsq(tl.load(base + oi[:, None] + (k.to(tl.int64) * sC)[None, :],
                                 mask=mask_i[:, None] & (k < C)[None, :], other=0.0), 1)
    return a, sq


@triton.jit
def _scores(base, C, sC, i, j, oi, oj, mask_i, mask_j, a_i, scale_i, unit_i, inv_tau,
            RESIDENT: tl.constexpr, ACC: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """([BLOCK_M, BLOCK_N] tile X_ij = scale_i scale_j sum_c x[c, i] x[c, j], scale_j) from the
    raw features; scale_j = 1 / max(n_j, eps) from the column norms summed on the way.

    scale_i = 1 / (max(n_i, eps) tau) in float64 (one rounding of the product). The diagonal of a
    unit pixel (unit_i: n_i > eps) is set to exactly 1 / tau, its true value: near the teacher
    the rounding of the computed one would otherwise be a large part of X_s - X_t there.
    RESIDENT: a_i is the [BLOCK_M, BLOCK_K] I-block (BLOCK_K >= C), one product. Otherwise the
    channels are stepped through BLOCK_K at a time (a_i unused).
    """
    if RESIDENT:
        k = tl.arange(0, BLOCK_K)
        mask_k = k < C
        b_j = tl.load(base + (k.to(tl.int64) * sC)[:, None] + oj[None, :],
                      mask=mask_k[:, None] & mask_j[None, :], other=0.0)
        s = _mm(a_i, b_j, tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC))
        sq_j = _sumsq(b_j, 0)
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        sq_j = tl.zeros([BLOCK_N], dtype=tl.float64)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask_k = k < C
            koff = k.to(tl.int64) * sC
            a = tl.load(base + oi[:, None] + koff[None, :],
                        mask=mask_i[:, None] & mask_k[None, :], other=0.0)
            b_j = tl.load(base + koff[:, None] + oj[None, :],
                          mask=mask_k[:, None] & mask_j[None, :], other=0.0)
            s = _mm(a, b_j, s)
            sq_j += _sumsq(b_j, 0)
    scale_j = _inv_norm(tl.sqrt(sq_j))
    # The scales are float64: one rounding of the product instead of one per factor.
    x = (s.to(tl.float64) * (scale_i[:, None] * scale_j[None, :])).to(ACC)
    return tl.where((i[:, None] == j[None, :]) & unit_i[:, None], inv_tau.to(ACC), x), scale_j


@triton.jit
def _row_setup(s_base, t_base, Cs, Ct, sC, tC, oi_s, oi_t, mask_i, inv_tau,
               RES_S: tl.constexpr, RES_T: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_KS: tl.constexpr, BLOCK_KT: tl.constexpr):
    """Per row block: the resident I-blocks, the row scales 1 / (max(n, eps) tau), the unit
    masks (n > eps) and the student's row norms, for student and teacher."""
    a_s, sq_s = _row_block(s_base, Cs, sC, oi_s, mask_i, RES_S, BLOCK_KS, BLOCK_M)
    a_t, sq_t = _row_block(t_base, Ct, tC, oi_t, mask_i, RES_T, BLOCK_KT, BLOCK_M)
    nrm_s = tl.sqrt(sq_s)
    nrm_t = tl.sqrt(sq_t)
    sc_s = _inv_norm(nrm_s) * inv_tau
    sc_t = _inv_norm(nrm_t) * inv_tau
    return a_s, a_t, sc_s, sc_t, nrm_s > _eps_like(nrm_s), nrm_t > _eps_like(nrm_t), nrm_s


@triton.jit
def _pr_kl_fwd_kernel(
    s_ptr, t_ptr, tau_bits, lse_s_ptr, lse_t_ptr, term_ptr,
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
    inv_tau = 1.0 / _f64(tau_bits)  # float64 (see _scores)
    s_base = s_ptr + b * sB
    t_base = t_ptr + b * tB
    oi_s = _pixel_offsets(i, W, sH, sW, sN, SFLAT)
    oi_t = _pixel_offsets(i, W, tH, tW, tN, TFLAT)
    # Row scales carry 1/tau: X = S / tau.
    a_s, a_t, sc_s, sc_t, unit_s, unit_t, nrm_s = _row_setup(
        s_base, t_base, Cs, Ct, sC, tC, oi_s, oi_t, mask_i, inv_tau, RES_S, RES_T, BLOCK_M,
        BLOCK_KS, BLOCK_KT)
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
        oj_s = _pixel_offsets(j, W, sH, sW, sN, SFLAT)
        oj_t = _pixel_offsets(j, W, tH, tW, tN, TFLAT)
        # (The column scales, the second results, are the backward's business.)
        xs, sc_sj = _scores(s_base, Cs, sC, i, j, oi_s, oj_s, mask_i, mask_j, a_s, sc_s, unit_s,
                            inv_tau, RES_S, ACC, BLOCK_M, BLOCK_N, BLOCK_KS)
        xt, sc_tj = _scores(t_base, Ct, tC, i, j, oi_t, oj_t, mask_i, mask_j, a_t, sc_t, unit_t,
                            inv_tau, RES_T, ACC, BLOCK_M, BLOCK_N, BLOCK_KT)
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
def _kl_da(s_base, t_base, lse_s_ptr, lse_t_ptr, b, co, Cs, Ct, N, W, sC, tC, sH, sW, sN,
           tH, tW, tN, i, oi_s, oi_t, mask_i, a_s, a_t, sc_s, sc_t, unit_s, unit_t, inv_tau,
           SFLAT: tl.constexpr, TFLAT: tl.constexpr, RES_S: tl.constexpr, RES_T: tl.constexpr,
           ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_KS: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_CO: tl.constexpr):
    """[BLOCK_M, BLOCK_CO] sum_J A[co, J] (P_IJ + P_JI^T), P = p_s - p_t (without the coef)."""
    row = b * N + i
    mask_co = co < Cs
    co_off = (co.to(tl.int64) * sC)[None, :]
    lse_si = tl.load(lse_s_ptr + row, mask=mask_i, other=0.0)
    lse_ti = tl.load(lse_t_ptr + row, mask=mask_i, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_CO], dtype=ACC)
    for j0 in range(0, N, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        mask_j = j < N
        col = b * N + j
        oj_s = _pixel_offsets(j, W, sH, sW, sN, SFLAT)
        oj_t = _pixel_offsets(j, W, tH, tW, tN, TFLAT)
        xs, sc_sj = _scores(s_base, Cs, sC, i, j, oi_s, oj_s, mask_i, mask_j, a_s, sc_s, unit_s,
                            inv_tau, RES_S, ACC, BLOCK_M, BLOCK_N, BLOCK_KS)
        xt, sc_tj = _scores(t_base, Ct, tC, i, j, oi_t, oj_t, mask_i, mask_j, a_t, sc_t, unit_t,
                            inv_tau, RES_T, ACC, BLOCK_M, BLOCK_N, BLOCK_KT)
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
    return acc


@triton.jit
def _pr_kl_bwd_kernel(
    grad_ptr, coef_bits, s_ptr, t_ptr, tau_bits, lse_s_ptr, lse_t_ptr, gx_ptr,
    b0, Cs, Ct, N, W,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    gB, gC, gH, gW, gN,
    SFLAT: tl.constexpr, TFLAT: tl.constexpr, GFLAT: tl.constexpr,
    RES_S: tl.constexpr, RES_T: tl.constexpr, TWO_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KS: tl.constexpr, BLOCK_KT: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    """d fs[b, :, I] = the pixel-normalisation backward of dA[:, I] = coef g sum_J A_J (P_IJ +
    P_JI^T), every student channel (in channel blocks, twice, when TWO_PASS)."""
    ACC: tl.constexpr = lse_s_ptr.dtype.element_ty
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (tl.program_id(1) + b0).to(tl.int64)
    mask_i = i < N
    inv_tau = 1.0 / _f64(tau_bits)  # float64 (see _scores)
    coef = tl.load(grad_ptr).to(ACC) * _f64(coef_bits).to(ACC)  # g tau / (B N)
    s_base = s_ptr + b * sB
    t_base = t_ptr + b * tB
    oi_s = _pixel_offsets(i, W, sH, sW, sN, SFLAT)
    oi_t = _pixel_offsets(i, W, tH, tW, tN, TFLAT)
    oi_g = _pixel_offsets(i, W, gH, gW, gN, GFLAT)
    a_s, a_t, sc_s, sc_t, unit_s, unit_t, nrm_i = _row_setup(
        s_base, t_base, Cs, Ct, sC, tC, oi_s, oi_t, mask_i, inv_tau, RES_S, RES_T, BLOCK_M,
        BLOCK_KS, BLOCK_KT)
    # A = raw / n in float64 (inv float64): for a single channel A is then +-1 to the last bit
    # and dA - A <A, dA> vanishes as it should.
    inv = _inv_norm(nrm_i)
    # <A_i, dA_i> over every channel: from a first walk over the channel blocks (TWO_PASS), or
    # from the one block that holds them all, just before its store.
    dot = tl.zeros([BLOCK_M], dtype=tl.float64)
    if TWO_PASS:
        for co0 in range(0, Cs, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            da = coef * _kl_da(s_base, t_base, lse_s_ptr, lse_t_ptr, b, co, Cs, Ct, N, W, sC, tC,
                               sH, sW, sN, tH, tW, tN, i, oi_s, oi_t, mask_i, a_s, a_t, sc_s,
                               sc_t, unit_s, unit_t, inv_tau, SFLAT, TFLAT, RES_S, RES_T, ACC,
                               BLOCK_M, BLOCK_N, BLOCK_KS, BLOCK_KT, BLOCK_CO)
            dot += _normalized_dot(s_base, oi_s, co, sC, Cs, mask_i, inv, da)
    for co0 in range(0, Cs, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        da = coef * _kl_da(s_base, t_base, lse_s_ptr, lse_t_ptr, b, co, Cs, Ct, N, W, sC, tC,
                           sH, sW, sN, tH, tW, tN, i, oi_s, oi_t, mask_i, a_s, a_t, sc_s,
                           sc_t, unit_s, unit_t, inv_tau, SFLAT, TFLAT, RES_S, RES_T, ACC,
                           BLOCK_M, BLOCK_N, BLOCK_KS, BLOCK_KT, BLOCK_CO)
        if not TWO_PASS:
            dot = _normalized_dot(s_base, oi_s, co, sC, Cs, mask_i, inv, da)
        gx = _norm_backward_block(s_base, oi_s, co, sC, Cs, mask_i, inv, nrm_i, dot, da)
        out = gx_ptr + b * gB + oi_g[:, None] + (co.to(tl.int64) * gC)[None, :]
        tl.store(out, _cast_for(gx, gx_ptr), mask=mask_i[:, None] & (co < Cs)[None, :])


@triton.jit
def _normalized_cols(x_ptr, b, c, C, n, mn, W, xB, xC, xH, xW, xN, FLAT: tl.constexpr):
    """[len(c), len(n)] float64 tile of pixel-normalised features: rows c of the pixels n, each
    pixel divided by max(its norm over all C channels, eps) (the norm summed channel by
    channel)."""
    base = x_ptr + b * xB
    off = _pixel_offsets(n, W, xH, xW, xN, FLAT)
    sq = tl.zeros(n.shape, dtype=tl.float64)
    row = off  # int64 offsets of channel k, stepped: k * xC may pass 2^31
    for _k in range(0, C):
        v = tl.load(base + row, mask=mn, other=0.0).to(tl.float64)
        sq += v * v
        row += xC
    x = tl.load(base + (c.to(tl.int64) * xC)[:, None] + off[None, :],
                mask=(c < C)[:, None] & mn[None, :], other=0.0).to(tl.float64)
    return x * _inv_norm(tl.sqrt(sq))[None, :]


@triton.jit
def _pr_gram_kernel(
    s_ptr, t_ptr, part_ptr,
    B, b0, Cs, Ct, N, W, chunk, tiles_ss, tiles_st,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    SFLAT: tl.constexpr, TFLAT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
):
    """One [BC, BC] tile of m_ss = A A^T, m_st = A T^T or m_tt = T T^T (axis 0: the tiles of
    the three in that order) over the split's pixels, float64, into part[split, b]: the three
    Grams packed as Cs * Cs + Cs * Ct + Ct * Ct values per (split, b)."""
    FROM16: tl.constexpr = ((s_ptr.dtype.element_ty.primitive_bitwidth == 16)
                            | (t_ptr.dtype.element_ty.primitive_bitwidth == 16))
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (tl.program_id(2) + b0).to(tl.int64)
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    # Which Gram: selects rather than branches, so that every name keeps one type (a size the JIT
    # specialised into a constant would not match a runtime value across the branches).
    is_ss = pid < tiles_ss
    is_tt = pid >= tiles_ss + tiles_st
    tile = pid - tl.where(is_ss, 0, tl.where(is_tt, tiles_ss + tiles_st, tiles_ss))
    C1 = tl.where(is_tt, Ct, Cs)
    C2 = tl.where(is_ss, Cs, Ct)
    cols = tl.cdiv(C2, BC)
    offset = tl.where(is_ss, 0, tl.where(is_tt, Cs * Cs + Cs * Ct, Cs * Cs))
    c1 = (tile // cols) * BC + tl.arange(0, BC)
    c2 = (tile % cols) * BC + tl.arange(0, BC)
    acc = tl.zeros([BC, BC], dtype=tl.float64)
    for k0 in range(start, end, BK):
        n = k0 + tl.arange(0, BK)
        mn = n < end
        if is_tt:
            x = _normalized_cols(t_ptr, b, c1, Ct, n, mn, W, tB, tC, tH, tW, tN, TFLAT)
        else:
            x = _normalized_cols(s_ptr, b, c1, Cs, n, mn, W, sB, sC, sH, sW, sN, SFLAT)
        if is_ss:
            y = _normalized_cols(s_ptr, b, c2, Cs, n, mn, W, sB, sC, sH, sW, sN, SFLAT)
        else:
            y = _normalized_cols(t_ptr, b, c2, Ct, n, mn, W, tB, tC, tH, tW, tN, TFLAT)
        acc = _mm_from16(x, tl.trans(y), acc, FROM16)
    per = Cs * Cs + Cs * Ct + Ct * Ct
    out = part_ptr + (split * B + b) * per + offset + c1[:, None] * C2 + c2[None, :]
    tl.store(out, acc, mask=(c1 < C1)[:, None] & (c2 < C2)[None, :])


@triton.jit
def _merged_sq(part_ptr, out_ptr, slot0, stride, offset, size, splits, STORE: tl.constexpr,
               BLOCK: tl.constexpr):
    """sum of squares of a Gram merged over its splits (and, STORE, the merged Gram itself)."""
    total = tl.zeros([BLOCK], dtype=tl.float64)
    for e0 in range(0, size, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        mask = e < size
        g = tl.zeros([BLOCK], dtype=tl.float64)
        slot = slot0 + offset + e  # int64, stepped by stride: split * stride may pass 2^31
        for _split in range(0, splits):
            g += tl.load(part_ptr + slot, mask=mask, other=0.0)
            slot += stride
        total += g * g
        if STORE:
            tl.store(out_ptr + e, g, mask=mask)
    return tl.sum(total, axis=0)


@triton.jit
def _pr_mse_tail_kernel(part_ptr, mss_ptr, mst_ptr, term_ptr, B, Cs, Ct, splits,
                        BLOCK: tl.constexpr):
    """Sample b: m_ss and m_st merged over the splits (kept), term[b] = max(||m_ss||^2 +
    ||m_tt||^2 - 2 ||m_st||^2, 0) = ||S_s - S_t||^2 up to rounding."""
    b = tl.program_id(0).to(tl.int64)
    per = Cs * Cs + Cs * Ct + Ct * Ct
    slot0 = b * per
    stride = B * per
    ss = _merged_sq(part_ptr, mss_ptr + b * Cs * Cs, slot0, stride, 0, Cs * Cs, splits, True,
                    BLOCK)
    st = _merged_sq(part_ptr, mst_ptr + b * Cs * Ct, slot0, stride, Cs * Cs, Cs * Ct, splits,
                    True, BLOCK)
    tt = _merged_sq(part_ptr, mss_ptr, slot0, stride, Cs * Cs + Cs * Ct, Ct * Ct, splits, False,
                    BLOCK)
    total = ss + tt - 2.0 * st
    tl.store(term_ptr + b, tl.where(total < 0.0, 0.0, total))  # NaN and Inf pass through


@triton.jit
def _mse_da(s_base, t_base, mss_ptr, mst_ptr, b, co, Cs, Ct, n, mask_n, os_, ot, sC, tC,
            BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
    """(dA^T [BLOCK_N, BLOCK_CO] = m_ss A - m_st T at pixels n for channels co (without the
    coefficient), the pixels' student norms), float64, the norms summed on the way."""
    mask_co = co < Cs
    mss = mss_ptr + (b * Cs + co.to(tl.int64)) * Cs  # rows co of m_ss[b]
    mst = mst_ptr + (b * Cs + co.to(tl.int64)) * Ct  # rows co of m_st[b]
    acc_s = tl.zeros([BLOCK_N, BLOCK_CO], dtype=tl.float64)
    acc_t = tl.zeros([BLOCK_N, BLOCK_CO], dtype=tl.float64)
    sq_s = tl.zeros([BLOCK_N], dtype=tl.float64)
    sq_t = tl.zeros([BLOCK_N], dtype=tl.float64)
    for k0 in range(0, Cs, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < Cs
        a = tl.load(s_base + os_[:, None] + (k.to(tl.int64) * sC)[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float64)
        sq_s += tl.sum(a * a, axis=1)
        m = tl.load(mss[None, :] + k[:, None], mask=mask_k[:, None] & mask_co[None, :], other=0.0)
        acc_s = _mm_from16(a, m, acc_s, s_base.dtype.element_ty.primitive_bitwidth == 16)
    for k0 in range(0, Ct, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < Ct
        t = tl.load(t_base + ot[:, None] + (k.to(tl.int64) * tC)[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float64)
        sq_t += tl.sum(t * t, axis=1)
        m = tl.load(mst[None, :] + k[:, None], mask=mask_k[:, None] & mask_co[None, :], other=0.0)
        acc_t = _mm_from16(t, m, acc_t, t_base.dtype.element_ty.primitive_bitwidth == 16)
    nrm_s = tl.sqrt(sq_s)
    da = acc_s * _inv_norm(nrm_s)[:, None] - acc_t * _inv_norm(tl.sqrt(sq_t))[:, None]
    return da, nrm_s


@triton.jit
def _pr_mse_bwd_kernel(
    grad_ptr, coef_bits, s_ptr, t_ptr, mss_ptr, mst_ptr, gx_ptr,
    b0, Cs, Ct, N, W,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    gB, gC, gH, gW, gN,
    SFLAT: tl.constexpr, TFLAT: tl.constexpr, GFLAT: tl.constexpr, TWO_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """d fs at pixels n: the pixel-normalisation backward of dA = coef g (m_ss A - m_st T), every
    student channel (in channel blocks, twice, when TWO_PASS); float64."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = (tl.program_id(1) + b0).to(tl.int64)
    mask_n = n < N
    coef = tl.load(grad_ptr).to(tl.float64) * _f64(coef_bits)  # g 4 / (B N^2)
    s_base = s_ptr + b * sB
    t_base = t_ptr + b * tB
    os_ = _pixel_offsets(n, W, sH, sW, sN, SFLAT)
    ot = _pixel_offsets(n, W, tH, tW, tN, TFLAT)
    og = _pixel_offsets(n, W, gH, gW, gN, GFLAT)
    dot = tl.zeros([BLOCK_N], dtype=tl.float64)
    if TWO_PASS:  # <A_n, dA_n> over every channel first (see _pr_kl_bwd_kernel)
        for co0 in range(0, Cs, BLOCK_CO):
            co = co0 + tl.arange(0, BLOCK_CO)
            da, nrm = _mse_da(s_base, t_base, mss_ptr, mst_ptr, b, co, Cs, Ct, n, mask_n, os_, ot,
                              sC, tC, BLOCK_N, BLOCK_CO, BLOCK_K)
            dot += _normalized_dot(s_base, os_, co, sC, Cs, mask_n, _inv_norm(nrm), da * coef)
    for co0 in range(0, Cs, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        da, nrm = _mse_da(s_base, t_base, mss_ptr, mst_ptr, b, co, Cs, Ct, n, mask_n, os_, ot,
                          sC, tC, BLOCK_N, BLOCK_CO, BLOCK_K)
        inv = _inv_norm(nrm)
        if not TWO_PASS:
            dot = _normalized_dot(s_base, os_, co, sC, Cs, mask_n, inv, da * coef)
        gx = _norm_backward_block(s_base, os_, co, sC, Cs, mask_n, inv, nrm, dot, da * coef)
        out = gx_ptr + b * gB + og[:, None] + (co.to(tl.int64) * gC)[None, :]
        tl.store(out, _cast_for(gx, gx_ptr), mask=mask_n[:, None] & (co < Cs)[None, :])


# --- host side ------------------------------------------------------------------------------


def _kl_config(Cs: int, Ct: int, acc: torch.dtype) -> dict:
    """Tile sizes of the KL kernels for these channel counts and accumulation type; BLOCK_CO and
    TWO_PASS for the backward."""
    if acc == torch.float64:
        bm, bn = _KL_BLOCK_FP64
        block_co = _pow2(Cs, 16, _KL_MAX_BLOCK_CO_FP64)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KS=_KL_BLOCK_K_FP64, BLOCK_KT=_KL_BLOCK_K_FP64,
                    RES_S=False, RES_T=False), dict(BLOCK_CO=block_co, TWO_PASS=Cs > block_co)
    bm, bn = _KL_BLOCK
    ks, kt = _pow2(Cs, 16, 1 << 30), _pow2(Ct, 16, 1 << 30)
    res_s, res_t = ks <= _KL_RESIDENT_K, kt <= _KL_RESIDENT_K
    block_co = _pow2(Cs, 16, _KL_MAX_BLOCK_CO)
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn,
               BLOCK_KS=ks if res_s else _KL_BLOCK_K, BLOCK_KT=kt if res_t else _KL_BLOCK_K,
               RES_S=res_s, RES_T=res_t)
    return cfg, dict(BLOCK_CO=block_co, TWO_PASS=Cs > block_co)


def _kl_warps(acc: torch.dtype, backward: int) -> int:
    return _KL_WARPS_FP64 if acc == torch.float64 else _KL_WARPS[backward]


# -- kl --


def _pixel_relation_kl_fwd(
    fs: torch.Tensor, ft: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse_s (B, N), lse_t (B, N)) in the accumulation dtype."""
    B, Cs, H, W = fs.shape
    Ct = ft.shape[1]
    N = H * W
    acc = _acc_dtype(fs)
    lse_s = torch.empty((B, N), dtype=acc, device=fs.device)
    lse_t = torch.empty((B, N), dtype=acc, device=fs.device)
    term = torch.empty((B * N,), dtype=torch.float64, device=fs.device)  # summed in float64
    cfg, _ = _kl_config(Cs, Ct, acc)
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    for b0, nb in _batch_chunks(B):
        _launch(_pr_kl_fwd_kernel)[(triton.cdiv(N, cfg["BLOCK_M"]), nb)](
            fs, ft, _bits(tau), lse_s, lse_t, term,
            b0, Cs, Ct, N, W,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            SFLAT=sflat, TFLAT=tflat, num_warps=_kl_warps(acc, 0), **cfg,
        )
    return _finish(term, tau * tau / (B * N), acc), lse_s, lse_t


def _pixel_relation_kl_bwd(
    grad: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, lse_s: torch.Tensor,
    lse_t: torch.Tensor, tau: float,
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    B, Cs, H, W = fs.shape
    Ct = ft.shape[1]
    N = H * W
    acc = lse_s.dtype
    gx = torch.empty_like(fs)
    cfg, bwd = _kl_config(Cs, Ct, acc)
    cfg = dict(cfg, BLOCK_N=min(cfg["BLOCK_N"], _KL_BWD_BLOCK_N))
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    gB, gC, gH, gW, gN, gflat = _strides(gx)
    for b0, nb in _batch_chunks(B):
        _launch(_pr_kl_bwd_kernel)[(triton.cdiv(N, cfg["BLOCK_M"]), nb)](
            grad, _bits(tau / (B * N)), fs, ft, _bits(tau), lse_s, lse_t, gx,
            b0, Cs, Ct, N, W,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            gB, gC, gH, gW, gN,
            SFLAT=sflat, TFLAT=tflat, GFLAT=gflat, num_warps=_kl_warps(acc, 1), **cfg, **bwd,
        )
    return gx


def _fake_kl_fwd(fs, ft, tau):
    acc = _acc_dtype(fs)
    B, N = fs.shape[0], fs.shape[2] * fs.shape[3]
    return (fs.new_empty((), dtype=acc), fs.new_empty((B, N), dtype=acc),
            fs.new_empty((B, N), dtype=acc))


def _fake_kl_bwd(grad, fs, ft, lse_s, lse_t, tau):
    return torch.empty_like(fs)


_pixel_relation_kl = fused_loss("pixel_relation_kl_triton", _pixel_relation_kl_fwd,
                                _pixel_relation_kl_bwd, _fake_kl_fwd, _fake_kl_bwd,
                                saved_inputs=(0, 1), const_inputs=(2,))


# -- mse --


def _pixel_relation_mse_fwd(
    fs: torch.Tensor, ft: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss in the accumulation dtype, m_ss (B, Cs, Cs), m_st (B, Cs, Ct) in float64)."""
    B, Cs, H, W = fs.shape
    Ct = ft.shape[1]
    N = H * W
    f64 = torch.float64
    max_bc, bk = _GRAM_BLOCK
    bc = _pow2(max(Cs, Ct), 16, max_bc)
    tiles_ss = triton.cdiv(Cs, bc) ** 2
    tiles_st = triton.cdiv(Cs, bc) * triton.cdiv(Ct, bc)
    tiles = tiles_ss + tiles_st + triton.cdiv(Ct, bc) ** 2
    splits, chunk = _split_k(N, bk, tiles * B, _GRAM_TARGET_PROGRAMS)
    part = torch.empty((splits, B, Cs * Cs + Cs * Ct + Ct * Ct), dtype=f64, device=fs.device)
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    for b0, nb in _batch_chunks(B):
        _launch(_pr_gram_kernel)[(tiles, splits, nb)](
            fs, ft, part, B, b0, Cs, Ct, N, W, chunk, tiles_ss, tiles_st,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            SFLAT=sflat, TFLAT=tflat, BC=bc, BK=bk, num_warps=_NUM_WARPS,
        )
    m_ss = torch.empty((B, Cs, Cs), dtype=f64, device=fs.device)
    m_st = torch.empty((B, Cs, Ct), dtype=f64, device=fs.device)
    term = torch.empty((B,), dtype=f64, device=fs.device)
    _launch(_pr_mse_tail_kernel)[(B,)](part, m_ss, m_st, term, B, Cs, Ct, splits, BLOCK=1024,
                                       num_warps=4)
    return _finish(term, 1.0 / (B * N * N), _acc_dtype(fs)), m_ss, m_st


def _pixel_relation_mse_bwd(
    grad: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, m_ss: torch.Tensor,
    m_st: torch.Tensor,
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    B, Cs, H, W = fs.shape
    Ct = ft.shape[1]
    N = H * W
    gx = torch.empty_like(fs)
    block_co = _pow2(Cs, 16, _MSE_MAX_BLOCK_CO)
    block_k = _MSE_BWD_BLOCK_K
    block_n = _MSE_BWD_ELEMS // block_co  # 16 .. 128: block_co is 16 .. 128
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    gB, gC, gH, gW, gN, gflat = _strides(gx)
    for b0, nb in _batch_chunks(B):
        _launch(_pr_mse_bwd_kernel)[(triton.cdiv(N, block_n), nb)](
            grad, _bits(4.0 / (B * N * N)), fs, ft, m_ss, m_st, gx,
            b0, Cs, Ct, N, W,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            gB, gC, gH, gW, gN,
            SFLAT=sflat, TFLAT=tflat, GFLAT=gflat, TWO_PASS=Cs > block_co,
            BLOCK_N=block_n, BLOCK_CO=block_co, BLOCK_K=block_k, num_warps=_MSE_BWD_WARPS,
        )
    return gx


def _fake_mse_fwd(fs, ft):
    B, Cs, Ct = fs.shape[0], fs.shape[1], ft.shape[1]
    return (fs.new_empty((), dtype=_acc_dtype(fs)), fs.new_empty((B, Cs, Cs), dtype=torch.float64),
            fs.new_empty((B, Cs, Ct), dtype=torch.float64))


def _fake_mse_bwd(grad, fs, ft, m_ss, m_st):
    return torch.empty_like(fs)


_pixel_relation_mse = fused_loss("pixel_relation_mse_triton", _pixel_relation_mse_fwd,
                                 _pixel_relation_mse_bwd, _fake_mse_fwd, _fake_mse_bwd,
                                 saved_inputs=(0, 1), const_inputs=())


def pixel_relation(fs: torch.Tensor, ft: torch.Tensor, distance: str, tau: float) -> torch.Tensor:
    """Pixel-relation loss (0-dim; float32, float64 for float64 inputs), autograd to fs.

    Inputs are validated by the caller: fs (B, Cs, H, W) and ft (B, Ct, H, W) on one device, any
    strides, each float16/bfloat16/float32, or both float64 (one float64 input promotes both).
    """
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    if distance == "mse":
        return _pixel_relation_mse(fs, ft.detach())
    if distance == "kl":
        return _pixel_relation_kl(fs, ft.detach(), float(tau))
    raise ValueError(f"pixel_relation: unknown distance {distance!r}")
