"""The public loss functions: validate, pick a backend, call it.

Each function checks its arguments through :mod:`kdkernels._validation`, then runs the
implementation that :func:`kdkernels._dispatch.resolve` picks for the requested backend and the
inputs' device. The "torch" backend of every op is :mod:`kdkernels.reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels import _dispatch, reference
from kdkernels import _validation as check
from kdkernels.ops import attention_transfer as _at_ext
from kdkernels.ops import channel_relation as _cr_ext
from kdkernels.ops import channel_wise_kl as _cwd_ext
from kdkernels.ops import logit_attention as _la_ext
from kdkernels.ops import pixel_kl as _pkl_ext
from kdkernels.ops import pixel_relation as _pr_ext
from kdkernels.ops import sgm as _sgm_ext
from kdkernels.ops import structure as _st_ext

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

_FEATURES = "a feature map (B, C, H, W)"
_MAPS = "a logit map (B, H, W) or (B, K, H, W)"

for _name in __all__:
    _dispatch.register(_name, "torch")(getattr(reference, _name))


def _run(op: str, backend: str, device: torch.device, *args):
    return _dispatch.resolve(op, backend, device)(*args)


def _has_values(t: torch.Tensor) -> bool:
    """Whether t's values can be read now: not while torch.compile / export traces (symbolic),
    not for meta or fake tensors (shapes only: FakeTensorMode, meta-device shape inference)."""
    return not (torch.compiler.is_compiling() or t.device.type == "meta"
                or torch._subclasses.fake_tensor.is_fake(t))


# --- attention transfer -------------------------------------------------------------------


def _pool_to_common(fs, ft):
    """resize="pool": adaptive-average-pool whichever map is larger to the smaller size, in
    float32 for half inputs as the reference does (a pooled map rounded to bfloat16 moves the
    loss by ~1e-3, the fuzzer found)."""
    target = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    if tuple(fs.shape[-2:]) != target:
        fs = F.adaptive_avg_pool2d(reference._acc(fs), target)
    if tuple(ft.shape[-2:]) != target:
        ft = F.adaptive_avg_pool2d(reference._acc(ft.detach()), target)
    return fs, ft


def _fused_at(kernel):
    """A fused attention-transfer backend: pooling in torch, bilinear inside the kernel."""
    def run(fs, ft, p, resize, reduction):
        if resize == "pool":
            fs, ft = _pool_to_common(fs, ft)
        elif fs.dtype == torch.float64 and fs.shape[-2:] != ft.shape[-2:]:
            # The kernels' bilinear weights are float32, as PyTorch's are for float32 and half
            # inputs; for float64 PyTorch computes them in float64 (1e-8 closer), so resample
            # float64 (a validation dtype, not a fast path) the way the reference does.
            fs = F.interpolate(fs, size=ft.shape[-2:], mode="bilinear", align_corners=False)
        if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
            fs, ft = fs.double(), ft.double()
        return kernel(fs, ft, p, reduction)
    return run


# One compiled op serves both: its CPU and CUDA kernels are registered per dispatch key.
_dispatch.register("attention_transfer_loss", "cpu")(_fused_at(_at_ext.attention_transfer))
_dispatch.register("attention_transfer_loss", "cuda")(_fused_at(_at_ext.attention_transfer))
if _dispatch.HAS_TRITON:
    from kdkernels.triton import attention_transfer as _at_triton

    _dispatch.register("attention_transfer_loss", "triton")(_fused_at(_at_triton.attention_transfer))


def attention_transfer_loss(fs, ft, p=2.0, resize="bilinear", reduction="mean", backend="auto"):
    """Attention transfer (Zagoruyko & Komodakis; HLFD's feature level).

    a(F) = L2-normalise over pixels of mean_c |F_c|^p; the loss compares a(fs) with a(ft).
    Channel counts may differ. Spatial sizes may differ: resize="bilinear" resizes the student to
    the teacher's size before the power, "pool" adaptive-average-pools the larger map to the
    smaller, None requires equal sizes. reduction: "mean" (over B*N), "batchmean" (over B), "sum".
    """
    op = "attention_transfer_loss"
    check.student_teacher(op, "fs", fs, "ft", ft, (4,), _FEATURES)
    check.positive(op, "p", p)
    check.choice(op, "resize", resize, ("bilinear", "pool", None))
    check.choice(op, "reduction", reduction, ("mean", "batchmean", "sum"))
    if resize is None and fs.shape[-2:] != ft.shape[-2:]:
        raise ValueError(f"{op}: resize=None needs fs and ft with equal spatial sizes, got shapes "
                         f"{tuple(fs.shape)} and {tuple(ft.shape)}; pass resize='bilinear' or 'pool'")
    return _run(op, backend, fs.device, fs, ft, p, resize, reduction)


# --- relations ----------------------------------------------------------------------------

# One entry per op for both: the CPU and CUDA kernels are registered per dispatch key.
_dispatch.register("channel_relation_loss", "cpu")(_cr_ext.channel_relation)
_dispatch.register("channel_relation_loss", "cuda")(_cr_ext.channel_relation)
_dispatch.register("pixel_relation_loss", "cpu")(_pr_ext.pixel_relation)
_dispatch.register("pixel_relation_loss", "cuda")(_pr_ext.pixel_relation)
if _dispatch.HAS_TRITON:
    from kdkernels.triton import channel_relation as _cr_triton
    from kdkernels.triton import pixel_relation as _pr_triton

    _dispatch.register("channel_relation_loss", "triton")(_cr_triton.channel_relation)
    _dispatch.register("pixel_relation_loss", "triton")(_pr_triton.pixel_relation)


def channel_relation_loss(fs, ft, normalize="l2", distance="mse", tau=1.0, backend="auto"):
    """CPKD channel relation: C x C Gram matrices of per-channel normalised rows, compared."""
    op = "channel_relation_loss"
    check.student_teacher(op, "fs", fs, "ft", ft, (4,), _FEATURES)
    check.same_dims(op, "channel counts", slice(1, 2), "fs", fs, "ft", ft)
    check.same_dims(op, "spatial sizes", slice(2, 4), "fs", fs, "ft", ft)
    check.choice(op, "normalize", normalize, ("l2", "softmax"))
    check.choice(op, "distance", distance, ("mse", "kl"))
    check.positive(op, "tau", tau)
    return _run(op, backend, fs.device, fs, ft, normalize, distance, tau)


def pixel_relation_loss(fs, ft, distance="mse", tau=1.0, backend="auto"):
    """CPKD/SKD pixel relation: N x N cosine-similarity matrices of pixels, compared."""
    op = "pixel_relation_loss"
    check.student_teacher(op, "fs", fs, "ft", ft, (4,), _FEATURES)
    check.same_dims(op, "spatial sizes", slice(2, 4), "fs", fs, "ft", ft)
    check.choice(op, "distance", distance, ("mse", "kl"))
    check.positive(op, "tau", tau)
    return _run(op, backend, fs.device, fs, ft, distance, tau)


# --- KDAS and response level -----------------------------------------------------------------


def _same_maps(op, s_name, s, t_name, t, layout=_MAPS):
    check.student_teacher(op, s_name, s, t_name, t, (3, 4), layout)
    check.same_dims(op, "shapes", slice(None), s_name, s, t_name, t)


# One compiled op serves both: its CPU and CUDA kernels are registered per dispatch key.
_dispatch.register("sgm_loss", "cpu")(_sgm_ext.sgm)
_dispatch.register("sgm_loss", "cuda")(_sgm_ext.sgm)
if _dispatch.HAS_TRITON:
    from kdkernels.triton import sgm as _sgm_triton

    _dispatch.register("sgm_loss", "triton")(_sgm_triton.sgm)


def sgm_loss(ps, pt, distance="mse", backend="auto"):
    """KDAS Symmetrical Guiding Module: compares P + P^T of student and teacher maps (H == W)."""
    op = "sgm_loss"
    _same_maps(op, "ps", ps, "pt", pt)
    if ps.shape[-1] != ps.shape[-2]:
        raise ValueError(f"{op}: ps and pt must be square (H == W) for the transpose, got shape "
                         f"{tuple(ps.shape)}")
    check.choice(op, "distance", distance, ("mse", "l1"))
    return _run(op, backend, ps.device, ps, pt, distance)


_dispatch.register("logit_attention_loss", "cpu")(_la_ext.logit_attention)
if _dispatch.HAS_TRITON:
    from kdkernels.triton import logit_attention as _la_triton

    _dispatch.register("logit_attention_loss", "triton")(_la_triton.logit_attention)


def logit_attention_loss(ps, pt, tau=2.0, backend="auto"):
    """KDAS attention supervision: softmax-KL between self-attended logit maps (well-posed form)."""
    op = "logit_attention_loss"
    _same_maps(op, "ps", ps, "pt", pt)
    check.positive(op, "tau", tau)
    return _run(op, backend, ps.device, ps, pt, tau)


# One entry for both: the CPU and CUDA kernels are registered per dispatch key.
_dispatch.register("pixel_kl_loss", "cpu")(_pkl_ext.pixel_kl)
_dispatch.register("pixel_kl_loss", "cuda")(_pkl_ext.pixel_kl)
if _dispatch.HAS_TRITON:
    from kdkernels.triton import pixel_kl as _pkl_triton

    _dispatch.register("pixel_kl_loss", "triton")(_pkl_triton.pixel_kl)


def pixel_kl_loss(zs, zt, temperature=4.0, mask=None, backend="auto"):
    """Response KD: T^2 * mean over pixels of KL(p_t || p_s), softmax over K (sigmoid if K == 1).

    zs, zt: (B, K, H, W) maps or (B, K) classification logits. mask: bool, (B, H, W) or (B,),
    True where a pixel is counted (at least one). Excluded pixels may hold anything, NaN
    included. An all-False CPU mask raises ValueError. On a GPU the mask is not read by the host
    (that would synchronise every call and break CUDA-graph capture): there, as inside
    torch.compile and for meta/fake tensors, an all-False mask gives a NaN loss (0 / 0) and a
    zero gradient.
    """
    op = "pixel_kl_loss"
    check.student_teacher(op, "zs", zs, "zt", zt, (2, 4), "logits (B, K) or (B, K, H, W)")
    check.same_dims(op, "shapes", slice(None), "zs", zs, "zt", zt)
    check.positive(op, "temperature", temperature)
    if mask is not None:
        expected = (zs.shape[0],) + tuple(zs.shape[2:])
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{op}: mask must be a bool tensor of shape {expected}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if tuple(mask.shape) != expected:
            raise ValueError(f"{op}: mask must have shape {expected} (batch and spatial sizes of "
                             f"zs {tuple(zs.shape)}), got {tuple(mask.shape)}")
        check.same_device(op, zs=zs, mask=mask)
        # 0 / 0 otherwise (see the docstring for where the check is skipped, and why).
        if mask.device.type == "cpu" and _has_values(mask) and not mask.any():
            raise ValueError(f"{op}: mask selects no pixel (all False, shape {tuple(mask.shape)}); "
                             "it must be True for at least one pixel to average over")
    return _run(op, backend, zs.device, zs, zt, temperature, mask)


_dispatch.register("channel_wise_kl_loss", "cpu")(_cwd_ext.channel_wise_kl)
if _dispatch.HAS_TRITON:
    from kdkernels.triton import channel_wise_kl as _cwd_triton

    _dispatch.register("channel_wise_kl_loss", "triton")(_cwd_triton.channel_wise_kl)


def channel_wise_kl_loss(fs, ft, tau=4.0, backend="auto"):
    """Channel-wise distillation (CWD): per channel, KL of spatial softmaxes with temperature."""
    op = "channel_wise_kl_loss"
    check.student_teacher(op, "fs", fs, "ft", ft, (4,), _FEATURES)
    check.same_dims(op, "shapes", slice(None), "fs", fs, "ft", ft)
    check.positive(op, "tau", tau)
    return _run(op, backend, fs.device, fs, ft, tau)


_dispatch.register("structure_loss", "cpu")(_st_ext.structure)
if _dispatch.HAS_TRITON:
    from kdkernels.triton import structure as _st_triton

    _dispatch.register("structure_loss", "triton")(_st_triton.structure)


def structure_loss(logits, mask, backend="auto"):
    """PraNet/Polyp-PVT structure loss: boundary-weighted BCE plus weighted IoU against a mask."""
    op = "structure_loss"
    check.tensor(op, "logits", logits, (4,), "segmentation logits (B, K, H, W)")
    if not isinstance(mask, torch.Tensor) or not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise ValueError(f"{op}: mask must be a floating or bool tensor with values in {{0, 1}}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != logits.shape:
        raise ValueError(f"{op}: mask must have the shape of logits {tuple(logits.shape)}, got "
                         f"{tuple(mask.shape)}")
    check.same_device(op, logits=logits, mask=mask)
    return _run(op, backend, logits.device, logits, mask)
