"""Channel-wise KL (CWD) in Triton: kernels, launchers and autograd registration.

Per (b, c) row of N = H * W pixels, p = softmax(F / tau) over the pixels and
loss = tau^2 / (B C) * sum_rows KL(p_t || p_s). Same math and saved statistics as the CPU kernel
(csrc/cpu/channel_wise_kl.cpp, which also explains the cancellation-free near-teacher forms).

* forward, grid (channel blocks, splits of N, B): a program streams [BLOCK_C, BLOCK_N] tiles of
  fs and ft through their strides over its share of the row's pixels, with an online softmax
  per row (tile maximum, accumulator tiles rescaled when it grows): per lane sums of e_s, e_t,
  e_t d, e_t phi(d), e_t (u_t - u_s) (u = F / tau - m, see the CPU kernel's far rows) and
  max |d|, reduced over the lanes at the end into a (split, B, C, 8) buffer (m_s, m_t, sum e_s,
  sum e_t, sum e_t d, sum e_t phi(d), max |d|, sum e_t (u_t - u_s)). One read of fs, ft.
* finish, grid (row blocks,): merges the splits of each row in split order, in float64, into
  stats (B, C, 5) = (m_t, log z_t, m_s, log z_s, delta = lse_s - lse_t) and the row's KL (the
  maximum and log-sum kept apart as on the CPU: lse = m + log z rounded to float32 would move
  every p by ~|F / tau| 6e-8); the loss is the fixed-order float64 sum of the rows
  (_common._finish, one program). Splitting
  N keeps the GPU busy when B * C is small or the channels are innermost (channels_last packs
  BLOCK_C rows into one program) without atomics: the splits depend only on shape, layout and
  dtype, so the bits are reproducible.
* backward, grid (pixel blocks, channel blocks, B): elementwise, p_s - p_t recomputed from fs,
  ft and the row stats, times g tau / (B C) (g read on the device), stored in fs's dtype and
  layout. Four kernels per forward + backward.

Why the backward re-reads fs and ft instead of the forward writing the unit gradient: it moves
the same HBM bytes for float32 (the forward's extra write and the backward's read of a float32
unit gradient equal the re-read of fs and ft, and the forward would need a second pass over each
row to know lse_s first) and fewer for 16-bit inputs (a 16-bit unit gradient underflows before
AMP's loss scale multiplies it, so it would have to be float32).

Precision: per-element work in float32 (float64 for float64 inputs), lane sums in that type,
the merge of the row statistics and the KL terms in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdkernels.triton._common import (
    _acc_dtype,
    _batch_chunks,
    _bits,
    _cast_for,
    _f64,
    _finish,
    _launch,
    _log1p_minus_x,
    _pixel_offsets,
    _split_k,
    _strides,
    fused_loss,
)

__all__ = ["channel_wise_kl"]

# [BLOCK_C, BLOCK_N] tiles: rows whose pixels are contiguous take 2 rows by 1024 pixels (4 KiB
# contiguous fp32 runs), channels_last rows 32 channels (a 128-byte fp32 run per pixel) by 32
# pixels; float64 tiles are smaller. Sizes and warps from ptxas's sm_90 reports (Triton 3.8), not
# timings: no spills, and at most ~120 registers per thread (the forward keeps five
# accumulator tiles; [32, 64] fp32 tiles with 4 warps spilled at 255 registers). Retune against
# benchmarks.
_TILES = {  # (channels innermost, float64) -> (BLOCK_C, BLOCK_N, num_warps)
    (False, False): (2, 1024, 8), (True, False): (32, 32, 8),
    (False, True): (2, 512, 8), (True, True): (16, 32, 8),
}
_BWD_TILES = {
    (False, False): (8, 256, 4), (True, False): (32, 64, 8),
    (False, True): (4, 256, 4), (True, True): (16, 32, 4),
}
# The forward splits each row's pixels so that about this many programs run (a fixed target,
# not the SM count: the merge order, hence the bits, must not depend on the device).
_TARGET_PROGRAMS = 1024
_FINISH_BLOCK = 128


@triton.jit
def _phi(d):
    """e^d - 1 - d for |d| <= 1 by its Taylor series to d^18 / 18! (float64 accurate)."""
    q = d * (1.0 / 6402373705728000.0) + (1.0 / 355687428096000.0)
    q = q * d + (1.0 / 20922789888000.0)
    q = q * d + (1.0 / 1307674368000.0)
    q = q * d + (1.0 / 87178291200.0)
    q = q * d + (1.0 / 6227020800.0)
    q = q * d + (1.0 / 479001600.0)
    q = q * d + (1.0 / 39916800.0)
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
def _phi_clamped(d):
    """_phi of d clamped to [-1, 1]: exact where |d| <= 1, finite (and unused) elsewhere."""
    return _phi(tl.minimum(tl.maximum(d, -1.0), 1.0))


@triton.jit
def _shift_q(q, z_t, up_s, up_t, alpha_t):
    """sum e_t (u_t - u_s) re-expressed against maxima raised by up_s and up_t (alpha_t =
    exp(-up_t)): each u drops by its raise and each e_t scales by alpha_t. z_t = 0 (nothing
    summed yet, the maxima may still be -inf) leaves it 0."""
    return tl.where(z_t > 0, alpha_t * (q + (up_s - up_t) * z_t), 0.0)


@triton.jit
def _cwd_fwd_kernel(
    s_ptr, t_ptr, inv_tau_bits, part_ptr,
    B, b0, C, N, W, chunk,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    SFLAT: tl.constexpr, TFLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial row statistics of rows c (one channel block) over pixels [split * chunk, +chunk)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(1)
    b = (tl.program_id(2) + b0).to(tl.int64)
    mask_c = c < C
    inv_tau = _f64(inv_tau_bits).to(ACC)
    s_base = s_ptr + b * sB + (c.to(tl.int64) * sC)[:, None]
    t_base = t_ptr + b * tB + (c.to(tl.int64) * tC)[:, None]
    # Rows past C start at 0, not -inf: no -inf - -inf in lanes that are never stored.
    m_s = tl.where(mask_c, float("-inf"), 0.0).to(ACC)
    m_t = m_s
    z_s = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    z_t = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    a = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)  # e_t d
    p = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)  # e_t phi(d)
    q = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)  # e_t (u_t - u_s)
    dmax = tl.zeros([BLOCK_C, BLOCK_N], dtype=ACC)
    start = split * chunk
    end = tl.minimum(start + chunk, N)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_c[:, None] & (n < end)[None, :]
        xs = tl.load(s_base + _pixel_offsets(n, W, sH, sW, sN, SFLAT)[None, :], mask=mask,
                     other=0.0).to(ACC)
        xt = tl.load(t_base + _pixel_offsets(n, W, tH, tW, tN, TFLAT)[None, :], mask=mask,
                     other=0.0).to(ACC)
        zs = xs * inv_tau
        zt = xt * inv_tau
        # Online softmax: the accumulators were summed against the old (smaller) maxima.
        new_s = tl.maximum(m_s, tl.max(tl.where(mask, zs, float("-inf")), axis=1))
        new_t = tl.maximum(m_t, tl.max(tl.where(mask, zt, float("-inf")), axis=1))
        alpha_s = tl.exp(m_s - new_s)[:, None]
        alpha_t = tl.exp(m_t - new_t)[:, None]
        q = _shift_q(q, z_t, (new_s - m_s)[:, None], (new_t - m_t)[:, None], alpha_t)
        m_s = new_s
        m_t = new_t
        e_s = tl.where(mask, tl.exp(zs - m_s[:, None]), 0.0)
        e_t = tl.where(mask, tl.exp(zt - m_t[:, None]), 0.0)
        d = tl.where(mask, (xs - xt) * inv_tau, 0.0)  # exact for close values, then one rounding
        z_s = z_s * alpha_s + e_s
        z_t = z_t * alpha_t + e_t
        a = a * alpha_t + e_t * d
        p = p * alpha_t + e_t * _phi_clamped(d)
        q += tl.where(mask, e_t * ((zt - m_t[:, None]) - (zs - m_s[:, None])), 0.0)
        dmax = tl.maximum(dmax, tl.abs(d))
    out = part_ptr + ((split * B + b) * C + c) * 8
    tl.store(out + 0, m_s, mask=mask_c)
    tl.store(out + 1, m_t, mask=mask_c)
    tl.store(out + 2, tl.sum(z_s, axis=1), mask=mask_c)
    tl.store(out + 3, tl.sum(z_t, axis=1), mask=mask_c)
    tl.store(out + 4, tl.sum(a, axis=1), mask=mask_c)
    tl.store(out + 5, tl.sum(p, axis=1), mask=mask_c)
    tl.store(out + 6, tl.max(dmax, axis=1), mask=mask_c)
    tl.store(out + 7, tl.sum(q, axis=1), mask=mask_c)


# rows: Triton specializes an int argument equal to 1 into a constexpr, which has no .to (B * C = 1).
@triton.jit(do_not_specialize=["rows"])
def _cwd_finish_kernel(part_ptr, stats_ptr, kl_ptr, rows, splits, BLOCK: tl.constexpr):
    """Merges each row's splits in order (float64) into the row's stats and KL."""
    # int64 row offsets: 5 * r and split * rows pass 2^31 from 2^29 rows (B * C) on.
    rows64 = rows.to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < rows
    m_s = tl.full([BLOCK], float("-inf"), tl.float64)
    m_t = tl.full([BLOCK], float("-inf"), tl.float64)
    z_s = tl.zeros([BLOCK], dtype=tl.float64)
    z_t = tl.zeros([BLOCK], dtype=tl.float64)
    a = tl.zeros([BLOCK], dtype=tl.float64)
    p = tl.zeros([BLOCK], dtype=tl.float64)
    dmax = tl.zeros([BLOCK], dtype=tl.float64)
    q = tl.zeros([BLOCK], dtype=tl.float64)
    for split in range(0, splits):
        src = part_ptr + (split * rows64 + r) * 8
        ms = tl.load(src + 0, mask=mask, other=0.0).to(tl.float64)
        mt = tl.load(src + 1, mask=mask, other=0.0).to(tl.float64)
        new_s = tl.maximum(m_s, ms)
        new_t = tl.maximum(m_t, mt)
        f_s = tl.exp(ms - new_s)
        f_t = tl.exp(mt - new_t)
        g_s = tl.exp(m_s - new_s)
        g_t = tl.exp(m_t - new_t)
        zt_k = tl.load(src + 3, mask=mask, other=1.0).to(tl.float64)
        q_k = tl.load(src + 7, mask=mask, other=0.0).to(tl.float64)
        q = _shift_q(q, z_t, new_s - m_s, new_t - m_t, g_t) + \
            _shift_q(q_k, zt_k, new_s - ms, new_t - mt, f_t)
        z_s = z_s * g_s + tl.load(src + 2, mask=mask, other=1.0).to(tl.float64) * f_s
        z_t = z_t * g_t + zt_k * f_t
        a = a * g_t + tl.load(src + 4, mask=mask, other=0.0).to(tl.float64) * f_t
        p = p * g_t + tl.load(src + 5, mask=mask, other=0.0).to(tl.float64) * f_t
        dmax = tl.maximum(dmax, tl.load(src + 6, mask=mask, other=0.0).to(tl.float64))
        m_s = new_s
        m_t = new_t
    log_zt = tl.log(z_t)
    log_zs = tl.log(z_s)
    # Near the teacher (every |d| <= 1): KL = E[phi(d)] + (log1p(u) - u), u = E[e^d - 1].
    near = dmax <= 1.0
    u = tl.where(near, (a + p) / z_t, 0.0)  # (far rows: u < -1 is possible and unused)
    l1m = _log1p_minus_x(u)
    delta = tl.where(near, l1m + u, (m_s - m_t) + (log_zs - log_zt))
    # Far rows: E[u_t - u_s] + log z_s - log z_t, whose terms stay small where the features are
    # huge ((m_s - m_t) - E[d] rounds apart by ~eps |F / tau|).
    kl = tl.where(near, p / z_t + l1m, q / z_t + (log_zs - log_zt))
    row = stats_ptr + 5 * r
    tl.store(row + 0, _cast_for(m_t, stats_ptr), mask=mask)
    tl.store(row + 1, _cast_for(log_zt, stats_ptr), mask=mask)
    tl.store(row + 2, _cast_for(m_s, stats_ptr), mask=mask)
    tl.store(row + 3, _cast_for(log_zs, stats_ptr), mask=mask)
    tl.store(row + 4, _cast_for(delta, stats_ptr), mask=mask)
    tl.store(kl_ptr + r, kl, mask=mask)


@triton.jit
def _cwd_bwd_kernel(
    grad_ptr, coef_bits, s_ptr, t_ptr, inv_tau_bits, stats_ptr, gx_ptr,
    b0, C, N, W,
    sB, sC, sH, sW, sN,
    tB, tC, tH, tW, tN,
    gB, gC, gH, gW, gN,
    SFLAT: tl.constexpr, TFLAT: tl.constexpr, GFLAT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """gx = grad coef (p_s - p_t): p_t expm1(x), x = d - delta, by the series if |x|, |d| <= 1."""
    ACC: tl.constexpr = stats_ptr.dtype.element_ty
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = (tl.program_id(2) + b0).to(tl.int64)
    mask_c = c < C
    mask = mask_c[:, None] & (n < N)[None, :]
    coff = c.to(tl.int64)
    inv_tau = _f64(inv_tau_bits).to(ACC)
    row = stats_ptr + (b * C + coff) * 5
    m_t = tl.load(row + 0, mask=mask_c, other=0.0)[:, None]
    log_zt = tl.load(row + 1, mask=mask_c, other=0.0)[:, None]
    m_s = tl.load(row + 2, mask=mask_c, other=0.0)[:, None]
    log_zs = tl.load(row + 3, mask=mask_c, other=0.0)[:, None]
    delta = tl.load(row + 4, mask=mask_c, other=0.0)[:, None]
    s_off = (coff * sC)[:, None] + _pixel_offsets(n, W, sH, sW, sN, SFLAT)[None, :]
    t_off = (coff * tC)[:, None] + _pixel_offsets(n, W, tH, tW, tN, TFLAT)[None, :]
    xs = tl.load(s_ptr + b * sB + s_off, mask=mask, other=0.0).to(ACC)
    xt = tl.load(t_ptr + b * tB + t_off, mask=mask, other=0.0).to(ACC)
    p_t = tl.exp((xt * inv_tau - m_t) - log_zt)
    d = (xs - xt) * inv_tau
    x = d - delta  # log(p_s / p_t)
    near = p_t * (x + _phi_clamped(x))
    far = tl.exp((xs * inv_tau - m_s) - log_zs) - p_t
    # x carries the rounding of d and delta, ~|d| 6e-8 absolute: only small |d| make it precise.
    coef = tl.load(grad_ptr).to(ACC) * _f64(coef_bits).to(ACC)
    gx = coef * tl.where(tl.maximum(tl.abs(x), tl.abs(d)) <= 1.0, near, far)
    out = gx_ptr + b * gB + (coff * gC)[:, None] + _pixel_offsets(n, W, gH, gW, gN, GFLAT)[None, :]
    tl.store(out, _cast_for(gx, gx_ptr), mask=mask)


# --- host side ------------------------------------------------------------------------------


def _channels_inner(*xs: torch.Tensor) -> bool:
    """Whether some input keeps a pixel's channels together (channels_last-like strides)."""
    return any(x.shape[1] > 1 and x.stride(1) < x.stride(3) for x in xs)


def _channel_wise_kl_forward(
    fs: torch.Tensor, ft: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, stats (B, C, 5): see the finish kernel) in the accumulation dtype."""
    B, C, H, W = fs.shape
    N = H * W
    acc = _acc_dtype(fs)
    block_c, block_n, warps = _TILES[(_channels_inner(fs, ft), acc == torch.float64)]
    row_blocks = triton.cdiv(C, block_c) * B
    splits, chunk = _split_k(N, block_n, row_blocks, _TARGET_PROGRAMS)
    part = torch.empty((splits, B, C, 8), dtype=acc, device=fs.device)
    inv_tau = _bits(1.0 / tau)
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    for b0, nb in _batch_chunks(B):
        _launch(_cwd_fwd_kernel)[(triton.cdiv(C, block_c), splits, nb)](
            fs, ft, inv_tau, part, B, b0, C, N, W, chunk,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            SFLAT=sflat, TFLAT=tflat, BLOCK_C=block_c, BLOCK_N=block_n, num_warps=warps,
        )
    stats = torch.empty((B, C, 5), dtype=acc, device=fs.device)
    kl = torch.empty((B * C,), dtype=torch.float64, device=fs.device)
    _launch(_cwd_finish_kernel)[(triton.cdiv(B * C, _FINISH_BLOCK),)](
        part, stats, kl, B * C, splits, BLOCK=_FINISH_BLOCK, num_warps=4,
    )
    return _finish(kl, tau * tau / (B * C), acc), stats


def _channel_wise_kl_backward(
    grad: torch.Tensor, fs: torch.Tensor, ft: torch.Tensor, stats: torch.Tensor, tau: float
) -> torch.Tensor:
    """grad_fs for upstream gradient `grad` (0-dim), in fs's dtype and memory format."""
    B, C, H, W = fs.shape
    N = H * W
    acc = stats.dtype
    gx = torch.empty_like(fs)
    block_c, block_n, warps = _BWD_TILES[(_channels_inner(fs, ft), acc == torch.float64)]
    sB, sC, sH, sW, sN, sflat = _strides(fs)
    tB, tC, tH, tW, tN, tflat = _strides(ft)
    gB, gC, gH, gW, gN, gflat = _strides(gx)
    for b0, nb in _batch_chunks(B):
        _launch(_cwd_bwd_kernel)[(triton.cdiv(N, block_n), triton.cdiv(C, block_c), nb)](
            grad, _bits(tau / (B * C)), fs, ft, _bits(1.0 / tau), stats, gx, b0, C, N, W,
            sB, sC, sH, sW, sN,
            tB, tC, tH, tW, tN,
            gB, gC, gH, gW, gN,
            SFLAT=sflat, TFLAT=tflat, GFLAT=gflat, BLOCK_C=block_c, BLOCK_N=block_n,
            num_warps=warps,
        )
    return gx


def _fake_fwd(fs, ft, tau):
    acc = _acc_dtype(fs)
    return fs.new_empty((), dtype=acc), fs.new_empty((fs.shape[0], fs.shape[1], 5), dtype=acc)


def _fake_bwd(grad, fs, ft, stats, tau):
    return torch.empty_like(fs)


_channel_wise_kl = fused_loss("channel_wise_kl_triton", _channel_wise_kl_forward,
                              _channel_wise_kl_backward, _fake_fwd, _fake_bwd,
                              saved_inputs=(0, 1), const_inputs=(2,))


def channel_wise_kl(fs: torch.Tensor, ft: torch.Tensor, tau: float) -> torch.Tensor:
    """CWD loss (0-dim; float32, float64 for float64 inputs), autograd to fs.

    Inputs are validated by the caller: equal shapes (B, C, H, W) on one device, any strides,
    each float16/bfloat16/float32, or both float64 (one float64 input promotes both).
    """
    if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
        fs, ft = fs.double(), ft.double()
    return _channel_wise_kl(fs, ft.detach(), float(tau))
