"""Eager PyTorch versions of every kdkernels loss: the ground truth for every fused kernel.

Each function follows SPEC section 3 literally, one tensor op per formula term, so a reader can
check it against the paper. Inputs are promoted to float32 (float64 stays float64) before any
arithmetic; the teacher argument is detached. These functions do not validate their inputs: the
public API in :mod:`kdkernels.functional` does that before calling them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-12  # the L2-normalisation epsilon of SPEC section 3 (F.normalize's default)

__all__ = [
    "attention_transfer_loss",
    "channel_relation_loss",
    "pixel_relation_loss",
    "sgm_loss",
    "logit_attention_loss",
    "pixel_kl_loss",
    "channel_wise_kl_loss",
    "structure_loss",
]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Promote to the accumulation dtype: float64 stays, everything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _kl_rows(log_p_t: torch.Tensor, log_p_s: torch.Tensor) -> torch.Tensor:
    """sum over everything of p_t * (log p_t - log p_s), from log-probabilities."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum()


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """a(F) = normalize over N of mean_c |F_c|^p, shape (B, N)."""
    return F.normalize(f.abs().pow(p).mean(1).flatten(1), dim=1, eps=EPS)


def attention_transfer_loss(fs, ft, p=2.0, resize="bilinear", reduction="mean"):
    fs, ft = _acc(fs), _acc(ft.detach())
    size_s, size_t = tuple(fs.shape[-2:]), tuple(ft.shape[-2:])
    if size_s != size_t:
        if resize == "bilinear":
            fs = F.interpolate(fs, size=size_t, mode="bilinear", align_corners=False)
        elif resize == "pool":
            target = (min(size_s[0], size_t[0]), min(size_s[1], size_t[1]))
            if size_s != target:
                fs = F.adaptive_avg_pool2d(fs, target)
            if size_t != target:
                ft = F.adaptive_avg_pool2d(ft, target)
        else:
            raise ValueError(f"resize=None needs equal spatial sizes, got {size_s} and {size_t}")
    total = (attention_map(fs, p) - attention_map(ft, p)).pow(2).sum()
    batch, n = fs.shape[0], fs.shape[-2] * fs.shape[-1]
    if reduction == "mean":
        return total / (batch * n)
    if reduction == "batchmean":
        return total / batch
    return total


def _channel_rows(f: torch.Tensor, normalize: str, tau: float) -> torch.Tensor:
    rows = f.flatten(2)  # B x C x N
    if normalize == "l2":
        return F.normalize(rows, dim=2, eps=EPS)
    return torch.softmax(rows / tau, dim=2)


def _relation_distance(gs, gt, distance: str, tau: float) -> torch.Tensor:
    """mse: mean of squared differences; kl: tau^2 * KL of row softmaxes / number of rows."""
    if distance == "mse":
        return (gs - gt).pow(2).mean()
    rows = gs.shape[0] * gs.shape[1]
    log_ps = torch.log_softmax(gs / tau, dim=-1)
    log_pt = torch.log_softmax(gt / tau, dim=-1)
    return tau * tau * _kl_rows(log_pt, log_ps) / rows


def channel_relation_loss(fs, ft, normalize="l2", distance="mse", tau=1.0):
    fns = _channel_rows(_acc(fs), normalize, tau)
    fnt = _channel_rows(_acc(ft.detach()), normalize, tau)
    gs = fns @ fns.transpose(1, 2)  # B x C x C
    gt = fnt @ fnt.transpose(1, 2)
    return _relation_distance(gs, gt, distance, tau)


def pixel_relation_loss(fs, ft, distance="mse", tau=1.0):
    # The eager form materialises the B x N x N matrices: exactly what the fused kernels avoid.
    fns = F.normalize(_acc(fs).flatten(2), dim=1, eps=EPS)  # B x C x N, unit pixel vectors
    fnt = F.normalize(_acc(ft.detach()).flatten(2), dim=1, eps=EPS)
    ss = fns.transpose(1, 2) @ fns  # B x N x N
    st = fnt.transpose(1, 2) @ fnt
    return _relation_distance(ss, st, distance, tau)


def sgm_loss(ps, pt, distance="mse"):
    ps, pt = _acc(ps), _acc(pt.detach())
    es = ps + ps.transpose(-1, -2)
    et = pt + pt.transpose(-1, -2)
    if distance == "mse":
        return (es - et).pow(2).mean()
    return (es - et).abs().mean()


def _attended(x: torch.Tensor) -> torch.Tensor:
    """A(X) = softmax_rows(X X^T / sqrt(W)) X for every (b, k) map X of shape H x W."""
    scores = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
    return torch.softmax(scores, dim=-1) @ x


def logit_attention_loss(ps, pt, tau=2.0):
    ps, pt = _acc(ps), _acc(pt.detach())
    if ps.dim() == 3:
        ps, pt = ps.unsqueeze(1), pt.unsqueeze(1)
    maps = ps.shape[0] * ps.shape[1]
    log_qs = torch.log_softmax(_attended(ps).flatten(2) / tau, dim=-1)
    log_qt = torch.log_softmax(_attended(pt).flatten(2) / tau, dim=-1)
    return tau * tau * _kl_rows(log_qt, log_qs) / maps


def pixel_kl_loss(zs, zt, temperature=4.0, mask=None):
    zs = _acc(zs) / temperature
    zt = _acc(zt.detach()) / temperature
    if mask is not None:
        # An excluded pixel may hold anything (NaN padding included): zero it before the softmax,
        # or its NaN would come back through the softmax's backward as a NaN gradient.
        zs = torch.where(mask.unsqueeze(1), zs, 0.0)
        zt = torch.where(mask.unsqueeze(1), zt, 0.0)
    if zs.shape[1] == 1:
        # Binary maps: Bernoulli KL between sigmoid(z_t / T) and sigmoid(z_s / T).
        log_pt, log_qt = F.logsigmoid(zt), F.logsigmoid(-zt)
        log_ps, log_qs = F.logsigmoid(zs), F.logsigmoid(-zs)
        kl = log_pt.exp() * (log_pt - log_ps) + log_qt.exp() * (log_qt - log_qs)
        kl = kl[:, 0]
    else:
        log_pt = torch.log_softmax(zt, dim=1)
        log_ps = torch.log_softmax(zs, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    # kl: B x H x W (or B for classification logits)
    # Excluded pixels were zeroed on both sides above: their KL is exactly 0.
    return temperature**2 * kl.sum() / (kl.numel() if mask is None else mask.sum())


def channel_wise_kl_loss(fs, ft, tau=4.0):
    log_ps = torch.log_softmax(_acc(fs).flatten(2) / tau, dim=2)
    log_pt = torch.log_softmax(_acc(ft.detach()).flatten(2) / tau, dim=2)
    rows = fs.shape[0] * fs.shape[1]
    return tau * tau * _kl_rows(log_pt, log_ps) / rows


def structure_loss(logits, mask):
    logits = _acc(logits)
    mask = mask.detach().to(logits.dtype)
    # Boundary weight: pixels whose 31x31 neighbourhood disagrees with them weigh up to 6x.
    pooled = F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15, count_include_pad=True)
    weight = 1 + 5 * (pooled - mask).abs()
    # BCE with logits as m softplus(-x) + (1 - m) softplus(x) (logaddexp: no threshold): its
    # autograd gradient -m sigmoid(-x) + (1 - m) sigmoid(x) does not cancel near a binary mask,
    # where PyTorch's sigmoid(x) - m does (1e-6 relative error at a loss of 4e-11 in float64).
    zero = torch.zeros_like(logits)
    bce = mask * torch.logaddexp(-logits, zero) + (1 - mask) * torch.logaddexp(logits, zero)
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    # 1 - (inter + 1) / (union - inter + 1), with its numerator union - 2 inter summed from
    # non-negative terms (1 - prob = sigmoid(-logits)): the plain form cancels when the
    # prediction is close to the mask (1e-6 relative error at a loss of 4e-11 in float64).
    apart = (weight * (prob * (1 - mask) + mask * torch.sigmoid(-logits))).sum(dim=(2, 3))
    wiou = apart / (union - inter + 1)
    return (wbce + wiou).mean()
