"""The CUDA kernels run on CPU tensors through their emulation (build.py), with the same launch
sequences as the torch glue in csrc/cuda/*.cpp. Each op function returns (loss, gradient of the
student) for an upstream gradient `grad`; `loss_fn` wraps them as a differentiable loss with the
public signature, and `launches()` counts the kernels launched so far."""

from __future__ import annotations

import ctypes
import subprocess

import torch

from .build import build

_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


class Tensor4(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("size", ctypes.c_int64 * 4), ("stride", ctypes.c_int64 * 4)]


def _view(t: torch.Tensor) -> Tensor4:
    return Tensor4(t.data_ptr(), _DTYPES[t.dtype], (ctypes.c_int64 * 4)(*t.shape),
                   (ctypes.c_int64 * 4)(*t.stride()))


_LIB = None


def _lib():
    global _LIB
    if _LIB is None:
        _LIB = ctypes.CDLL(str(build()))
        for name in ("emu_launches", "emu_cr_workspace", "emu_prm_workspace", "emu_prk_forward_workspace",
                     "emu_prk_backward_workspace", "emu_at_forward_workspace", "emu_sgm_partials",
                     "emu_pixel_kl_partials"):
            getattr(_LIB, name).restype = ctypes.c_int64
    return _LIB


def _acc(fs):
    return torch.float64 if fs.dtype == torch.float64 else torch.float32


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def _check(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what}: error {rc}")


def _grad_out(fs):
    g = torch.empty_like(fs)
    return g, (ctypes.c_int64 * 4)(*g.stride())


def channel_relation(fs, ft, normalize, distance, tau, grad=1.0):
    lib, acc = _lib(), _acc(fs)
    vs, vt = _view(fs), _view(ft)
    b, c = fs.shape[:2]
    ws = torch.empty(lib.emu_cr_workspace(ctypes.byref(vs)), dtype=torch.float64)
    loss, gg, rs = torch.empty((), dtype=acc), torch.empty(b, c, c, dtype=acc), torch.empty(b, c, 2, dtype=acc)
    _check(lib.emu_cr_forward(ctypes.byref(vs), ctypes.byref(vt), normalize == "softmax", distance == "kl",
                              ctypes.c_double(tau), _p(ws), _p(gg), _p(rs), _p(loss)), "cr_forward")
    g = torch.tensor(grad, dtype=acc)
    out, stride = _grad_out(fs)
    _check(lib.emu_cr_backward(_p(g), ctypes.byref(vs), _p(gg), _p(rs), normalize == "softmax",
                               ctypes.c_double(tau), _p(out), stride), "cr_backward")
    return loss, out


def pixel_relation(fs, ft, distance, tau, grad=1.0):
    lib, acc = _lib(), _acc(fs)
    vs, vt = _view(fs), _view(ft)
    b, cs, ct, n = fs.shape[0], fs.shape[1], ft.shape[1], fs.shape[2] * fs.shape[3]
    loss, g = torch.empty((), dtype=acc), torch.tensor(grad, dtype=acc)
    out, stride = _grad_out(fs)
    if distance == "mse":
        ws = torch.empty(lib.emu_prm_workspace(ctypes.byref(vs), ctypes.byref(vt)), dtype=torch.float64)
        m_ss = torch.empty(b, cs, cs, dtype=torch.float64)
        m_st = torch.empty(b, cs, ct, dtype=torch.float64)
        _check(lib.emu_prm_forward(ctypes.byref(vs), ctypes.byref(vt), _p(ws), _p(m_ss), _p(m_st), _p(loss)),
               "prm_forward")
        _check(lib.emu_prm_backward(_p(g), ctypes.byref(vs), ctypes.byref(vt), _p(m_ss), _p(m_st), _p(out),
                                    stride), "prm_backward")
        return loss, out
    ws = torch.empty(lib.emu_prk_forward_workspace(ctypes.byref(vs)), dtype=acc)
    lse_s, lse_t = torch.empty(b, n, dtype=acc), torch.empty(b, n, dtype=acc)
    _check(lib.emu_prk_forward(ctypes.byref(vs), ctypes.byref(vt), ctypes.c_double(tau), _p(ws), _p(lse_s),
                               _p(lse_t), _p(loss)), "prk_forward")
    wb = torch.empty(lib.emu_prk_backward_workspace(ctypes.byref(vs)), dtype=acc)
    _check(lib.emu_prk_backward(_p(g), ctypes.byref(vs), ctypes.byref(vt), ctypes.c_double(tau), _p(lse_s),
                                _p(lse_t), _p(wb), _p(out), stride), "prk_backward")
    return loss, out


def attention_transfer(fs, ft, p, reduction, grad=1.0):
    lib, acc = _lib(), _acc(fs)
    vs, vt = _view(fs), _view(ft)
    b, ho, wo = ft.shape[0], ft.shape[2], ft.shape[3]
    scale = {"mean": 1.0 / (b * ho * wo), "batchmean": 1.0 / b, "sum": 1.0}[reduction]
    ws = torch.empty(lib.emu_at_forward_workspace(ctypes.byref(vs), ctypes.byref(vt)), dtype=acc)
    partial, coeff = torch.empty(b, dtype=acc), torch.empty(b, ho, wo, dtype=acc)
    counter, loss = torch.empty(1, dtype=torch.int32), torch.empty((), dtype=acc)
    _check(lib.emu_at_forward(ctypes.byref(vs), ctypes.byref(vt), ctypes.c_double(p), ctypes.c_double(scale),
                              _p(ws), _p(partial), _p(coeff), _p(counter), _p(loss)), "at_forward")
    g = torch.tensor(grad, dtype=acc)
    out, stride = _grad_out(fs)
    _check(lib.emu_at_backward(_p(g), ctypes.byref(vs), _p(out), stride, _p(coeff), ctypes.c_int64(ho),
                               ctypes.c_int64(wo), ctypes.c_double(p)), "at_backward")
    return loss, out


def _maps4(t):
    return t.unsqueeze(1) if t.dim() == 3 else t


def _finish(partial, scale, loss, count=None, clamp=False):
    _check(_lib().emu_finish_sum(_p(partial), partial.dtype == torch.float64, ctypes.c_int64(partial.numel()),
                                 ctypes.c_double(scale), None if count is None else _p(count), clamp, _p(loss),
                                 loss.dtype == torch.float64), "finish_sum")


def sgm(ps, pt, distance, grad=1.0):
    lib, acc = _lib(), _acc(ps)
    vs, vt = _view(_maps4(ps)), _view(_maps4(pt))
    n = ps.numel()
    out = torch.empty_like(ps)
    stride = (ctypes.c_int64 * 4)(*_maps4(out).stride())
    partial, loss = torch.empty(lib.emu_sgm_partials(ctypes.byref(vs)), dtype=acc), torch.empty((), dtype=acc)
    l1 = distance == "l1"
    _check(lib.emu_sgm_forward(ctypes.byref(vs), ctypes.byref(vt), l1, ctypes.c_double((2.0 if l1 else 4.0) / n),
                               _p(out), stride, _p(partial)), "sgm_forward")
    _finish(partial, 1.0 / n, loss)
    return loss, out * grad


def pixel_kl(zs, zt, temperature, mask=None, grad=1.0):
    lib, acc = _lib(), _acc(zs)
    z4s = zs.unsqueeze(-1).unsqueeze(-1) if zs.dim() == 2 else zs
    z4t = zt.unsqueeze(-1).unsqueeze(-1) if zt.dim() == 2 else zt
    vs, vt = _view(z4s), _view(z4t)
    b, h, w = z4s.shape[0], z4s.shape[2], z4s.shape[3]
    count, mask_ptr, mask_stride = None, None, (ctypes.c_int64 * 3)(0, 0, 0)
    if mask is not None:
        m3 = mask.unsqueeze(-1).unsqueeze(-1) if mask.dim() == 1 else mask
        count = m3.sum().reshape(1)
        mask_ptr, mask_stride = _p(m3), (ctypes.c_int64 * 3)(*m3.stride())
    out = torch.empty_like(zs)
    o4 = out.unsqueeze(-1).unsqueeze(-1) if out.dim() == 2 else out
    stride = (ctypes.c_int64 * 4)(*o4.stride())
    partial = torch.empty(lib.emu_pixel_kl_partials(ctypes.byref(vs)), dtype=torch.float64)
    _check(lib.emu_pixel_kl_forward(ctypes.byref(vs), ctypes.byref(vt), mask_ptr, mask_stride,
                                    None if count is None else _p(count), ctypes.c_int64(b * h * w),
                                    ctypes.c_double(temperature), _p(out), stride,
                                    ctypes.c_void_p(partial.data_ptr())), "pixel_kl_forward")
    loss = torch.empty((), dtype=acc)
    t2 = temperature * temperature
    _finish(partial, t2 if count is not None else t2 / (b * h * w), loss, count)
    return loss, out * grad


def launches() -> int:
    return _lib().emu_launches()


def available() -> bool:
    """Whether the emulation builds here (a C++20 compiler with std::barrier and _Float16)."""
    try:
        _lib()
    except (OSError, subprocess.CalledProcessError, FileNotFoundError):
        return False
    return True


class _Loss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fs, ft, run):
        loss, grad = run(fs.detach(), ft.detach())
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None


def loss_fn(op: str):
    """The emulated CUDA backend of `op` with the public keyword arguments (attention transfer:
    resize "bilinear" or equal sizes); a float64/other mix runs in float64, as the dispatcher
    does."""
    def run(fs, ft, **kw):
        if (fs.dtype == torch.float64) != (ft.dtype == torch.float64):
            fs, ft = fs.double(), ft.double()
        if op == "attention_transfer_loss":
            if fs.dtype == torch.float64 and fs.shape[-2:] != ft.shape[-2:]:
                # As kdkernels.functional does: float64 resamples in torch (the kernels' bilinear
                # weights are float32).
                fs = torch.nn.functional.interpolate(fs, size=ft.shape[-2:], mode="bilinear",
                                                     align_corners=False)
            args = (float(kw.get("p", 2.0)), kw.get("reduction", "mean"))
            return _Loss.apply(fs, ft, lambda s, t: attention_transfer(s, t, *args))
        if op == "sgm_loss":
            return _Loss.apply(fs, ft, lambda s, t: sgm(s, t, kw.get("distance", "mse")))
        if op == "pixel_kl_loss":
            args = (float(kw.get("temperature", 4.0)), kw.get("mask"))
            return _Loss.apply(fs, ft, lambda s, t: pixel_kl(s, t, *args))
        if op == "channel_relation_loss":
            args = (kw.get("normalize", "l2"), kw.get("distance", "mse"), float(kw.get("tau", 1.0)))
            return _Loss.apply(fs, ft, lambda s, t: channel_relation(s, t, *args))
        args = (kw.get("distance", "mse"), float(kw.get("tau", 1.0)))
        return _Loss.apply(fs, ft, lambda s, t: pixel_relation(s, t, *args))
    return run
