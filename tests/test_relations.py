"""Fused channel and pixel relation (every backend this build has) against kdkernels.reference.

The CUDA C++ kernels also run here without a GPU, through a CPU emulation of their thread and
block model (tests/cuda_emulation): the pseudo-backend "cuda-emu" on CPU tensors.

Comparisons are against the float64 reference on the very same values. Where the eager float32
reference is itself inaccurate (the KL distances, students close to the teacher), the bar is the
larger of a relative tolerance and twice eager float32's own error against float64.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels as kdk
from cuda_emulation import runner as emulation
from helpers import LAYOUTS, devices, fused_backends, loss_and_grad, make_layout, random_pair

CR, PR = "channel_relation_loss", "pixel_relation_loss"
EMU = "cuda-emu"
EMULATED = [(EMU, "cpu")] if emulation.available() else []
CR_TARGETS = [(b, d) for d in devices() for b in fused_backends(CR, d)] + EMULATED
PR_TARGETS = [(b, d) for d in devices() for b in fused_backends(PR, d)] + EMULATED
CR_IDS = [f"{b}-{d}" for b, d in CR_TARGETS]
PR_IDS = [f"{b}-{d}" for b, d in PR_TARGETS]
HAS_CPU = "cpu" in fused_backends(CR, "cpu") and "cpu" in fused_backends(PR, "cpu")
# Backends with either op (the tests below skip the op a backend does not have).
ANY_TARGETS = sorted(set(CR_TARGETS) | set(PR_TARGETS))
ANY_IDS = [f"{b}-{d}" for b, d in ANY_TARGETS]

# Odd spatial sizes (no tile divides N), N = 1 and a single row, B = 1, C = 1 and 3.
CR_SHAPES = [(2, 3, 7, 9), (1, 1, 5, 3), (3, 3, 1, 11), (2, 8, 13, 11), (2, 4, 1, 1), (1, 5, 15, 13)]
# (student, teacher): the channel counts differ.
PR_SHAPES = [((2, 3, 7, 9), (2, 5, 7, 9)), ((1, 1, 5, 3), (1, 1, 5, 3)), ((3, 3, 1, 11), (3, 2, 1, 11)),
             ((2, 8, 13, 11), (2, 6, 13, 11)), ((2, 4, 1, 1), (2, 2, 1, 1)), ((1, 7, 15, 13), (1, 3, 15, 13))]
CR_VARIANTS = [("l2", "mse", 1.0), ("l2", "kl", 0.5), ("l2", "kl", 4.0), ("softmax", "mse", 1.0),
               ("softmax", "mse", 4.0), ("softmax", "kl", 2.0), ("softmax", "kl", 0.5)]
PR_VARIANTS = [("mse", 1.0), ("kl", 1.0), ("kl", 0.25), ("kl", 4.0)]


def _fused(op, backend):
    if backend == EMU:
        return emulation.loss_fn(op)
    fn = getattr(kdk, op)
    return lambda fs, ft, **kw: fn(fs, ft, backend=backend, **kw)


def _check(op, backend, fs, ft, loss_rtol=1e-5, grad_rtol=1e-4, **kw):
    """The fused loss and gradient against float64 on the same values: within rtol (relative to
    |loss| and max |grad|), or no worse than twice eager float32's own error."""
    loss, grad = loss_and_grad(_fused(op, backend), fs, ft, **kw)
    ref_fn = getattr(kdk.reference, op)
    ref_loss, ref_grad = loss_and_grad(ref_fn, fs.cpu().double(), ft.cpu().double(), **kw)
    eager_loss, eager_grad = loss_and_grad(ref_fn, fs, ft, **kw)
    acc = torch.float64 if fs.dtype == torch.float64 else torch.float32
    assert loss.dim() == 0 and loss.dtype == acc == eager_loss.dtype
    assert grad.dtype == fs.dtype and grad.shape == fs.shape
    for ours, eager, ref, rtol, what in ((loss, eager_loss, ref_loss, loss_rtol, "loss"),
                                         (grad, eager_grad, ref_grad, grad_rtol, "grad")):
        err = (ours.cpu().double() - ref).abs().max().item()
        eager_err = (eager.cpu().double() - ref).abs().max().item()
        # (The floor only matters where the reference is exactly 0: N = 1 rows.)
        bound = max(rtol * ref.abs().max().item(), 2 * eager_err, 1e-20)
        assert err <= bound, (f"{what}: error {err:.3e} vs float64 > {bound:.3e} (eager float32 "
                              f"{eager_err:.3e}, |ref| {ref.abs().max().item():.3e})")


# --- against the reference ------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", CR_TARGETS, ids=CR_IDS)
@pytest.mark.parametrize("shape", CR_SHAPES, ids=str)
@pytest.mark.parametrize("variant", CR_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_channel_matches_reference(backend, device, shape, variant):
    normalize, distance, tau = variant
    fs, ft = random_pair(shape, shape, device, seed=sum(shape))
    _check(CR, backend, fs, ft, normalize=normalize, distance=distance, tau=tau)


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
@pytest.mark.parametrize("shapes", PR_SHAPES, ids=lambda s: f"{s[0]}-{s[1][1]}")
@pytest.mark.parametrize("variant", PR_VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_pixel_matches_reference(backend, device, shapes, variant):
    distance, tau = variant
    fs, ft = random_pair(*shapes, device, seed=sum(shapes[0]))
    _check(PR, backend, fs, ft, distance=distance, tau=tau)


@pytest.mark.parametrize("backend,device", CR_TARGETS, ids=CR_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("normalize", ["l2", "softmax"])
def test_channel_layouts(backend, device, layout, normalize):
    fs, ft = random_pair((2, 5, 7, 9), (2, 5, 7, 9), device, seed=3)
    fs = make_layout(fs, layout)
    ft = make_layout(ft, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])  # teacher in another layout
    _check(CR, backend, fs, ft, normalize=normalize, distance="kl", tau=2.0)
    if layout == "channels_last":
        (grad,) = torch.autograd.grad(
            _fused(CR, backend)(fs.requires_grad_(True), ft), fs)
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_pixel_layouts(backend, device, layout, distance):
    fs, ft = random_pair((2, 5, 7, 9), (2, 3, 7, 9), device, seed=4)
    fs = make_layout(fs, layout)
    ft = make_layout(ft, LAYOUTS[(LAYOUTS.index(layout) + 1) % 3])
    _check(PR, backend, fs, ft, distance=distance, tau=0.5)
    if layout == "channels_last":
        (grad,) = torch.autograd.grad(
            _fused(PR, backend)(fs.requires_grad_(True), ft, distance=distance), fs)
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend,device", CR_TARGETS, ids=CR_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", [("l2", "mse"), ("softmax", "kl")], ids="-".join)
def test_channel_low_precision(backend, device, dtype, variant):
    # Losses accumulate in float32 from the same half-precision values; the gradient is rounded
    # once to the input dtype.
    fs, ft = random_pair((2, 6, 9, 7), (2, 6, 9, 7), device, dtype=dtype, seed=5)
    grad_rtol = 4e-3 if dtype == torch.float16 else 2e-2
    _check(CR, backend, fs, ft, grad_rtol=grad_rtol, normalize=variant[0], distance=variant[1], tau=2.0)


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_pixel_low_precision(backend, device, dtype, distance):
    fs, ft = random_pair((2, 6, 9, 7), (2, 4, 9, 7), device, dtype=dtype, seed=5)
    grad_rtol = 4e-3 if dtype == torch.float16 else 2e-2
    _check(PR, backend, fs, ft, grad_rtol=grad_rtol, distance=distance, tau=0.5)


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
@pytest.mark.parametrize("dtypes", [(torch.float64, torch.float32), (torch.float16, torch.float32),
                                    (torch.float32, torch.float64)], ids=str)
def test_mixed_dtypes(backend, device, dtypes):
    """A float64 member makes the pair run in float64; other mixes accumulate in float32."""
    fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), device, seed=12)
    fs, ft = fs.to(dtypes[0]), ft.to(dtypes[1])
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    for op, kw in ((CR, {"normalize": "softmax"}), (PR, {"distance": "kl"})):
        if backend != EMU and backend not in fused_backends(op, device):
            continue
        loss, grad = loss_and_grad(_fused(op, backend), fs, ft, **kw)
        assert loss.dtype == acc and grad.dtype == fs.dtype
        ref = getattr(kdk.reference, op)(fs.double(), ft.double(), **kw)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5 if acc == torch.float32 else 1e-12, atol=0)


# --- accuracy: float32 against float64 on the same inputs, also near the teacher --------------


def _near_pairs():
    """(name, student, teacher): random pairs, students close to the teacher (where the losses
    are small differences of similar matrices), and for the pixel relation a student with twice
    the teacher's channels built from it (the same cosine similarities, up to the noise)."""
    g = torch.Generator().manual_seed(6)
    ft = torch.randn(2, 6, 9, 11, generator=g)
    pairs = [("random", torch.randn(2, 6, 9, 11, generator=g), ft)]
    for noise in (1e-2, 1e-3):
        pairs.append((f"near-{noise:g}", ft + noise * torch.randn(ft.shape, generator=g), ft))
        pairs.append((f"double-{noise:g}", torch.cat([ft, ft], 1) + noise * torch.randn(2, 12, 9, 11, generator=g), ft))
    return pairs


NEAR = _near_pairs()


def _check_f32_vs_f64(op, backend, device, fs, ft, near, **kw):
    loss, grad = loss_and_grad(_fused(op, backend), fs.to(device), ft.to(device), **kw)
    ref_fn = getattr(kdk.reference, op)
    ref_loss, ref_grad = loss_and_grad(ref_fn, fs.double(), ft.double(), **kw)
    eager_loss, eager_grad = loss_and_grad(ref_fn, fs, ft, **kw)
    # float32 is within 1e-4 (loss) and 1e-3 (gradient, relative to its largest entry) of float64;
    # near the teacher within 1e-3, or no worse than eager float32 itself (x 2).
    for ours, eager, ref, rtol, what in ((loss, eager_loss, ref_loss, 1e-3 if near else 1e-4, "loss"),
                                         (grad, eager_grad, ref_grad, 1e-3, "grad")):
        err = (ours.cpu().double() - ref).abs().max().item()
        eager_err = (eager.double() - ref).abs().max().item()
        bound = rtol * ref.abs().max().item()
        if near:
            bound = max(bound, 2 * eager_err)
        assert err <= bound, (f"{what}: error {err:.3e} vs float64 > {bound:.3e} (eager float32 "
                              f"{eager_err:.3e}, |ref| {ref.abs().max().item():.3e})")


@pytest.mark.parametrize("backend,device", CR_TARGETS, ids=CR_IDS)
@pytest.mark.parametrize("pair", [p for p in NEAR if not p[0].startswith("double")], ids=lambda p: p[0])
@pytest.mark.parametrize("variant", [("l2", "mse", 1.0), ("l2", "kl", 4.0), ("softmax", "mse", 4.0),
                                     ("softmax", "kl", 1.0)], ids=lambda v: "-".join(map(str, v)))
def test_channel_float32_against_float64(backend, device, pair, variant):
    name, fs, ft = pair
    _check_f32_vs_f64(CR, backend, device, fs, ft, name != "random",
                      normalize=variant[0], distance=variant[1], tau=variant[2])


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
@pytest.mark.parametrize("pair", NEAR, ids=lambda p: p[0])
@pytest.mark.parametrize("variant", [("mse", 1.0), ("kl", 1.0), ("kl", 4.0), ("kl", 0.25)],
                         ids=lambda v: "-".join(map(str, v)))
def test_pixel_float32_against_float64(backend, device, pair, variant):
    name, fs, ft = pair
    _check_f32_vs_f64(PR, backend, device, fs, ft, name != "random", distance=variant[0], tau=variant[1])


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("noise", [1e-2, 1e-3])
def test_pixel_near_teacher_beats_eager_cpu(noise):
    """The CPU kernels' near-teacher routes (float64 algebra for mse, the log1p / expm1 forms
    for kl) are far more accurate than eager float32: within 1e-5 (loss) and 1e-4 (grad)."""
    _, fs, ft = next(p for p in NEAR if p[0] == f"near-{noise:g}")
    for distance, tau in (("mse", 1.0), ("kl", 1.0), ("kl", 4.0)):
        loss, grad = loss_and_grad(_fused(PR, "cpu"), fs, ft, distance=distance, tau=tau)
        ref_loss, ref_grad = loss_and_grad(kdk.reference.pixel_relation_loss, fs.double(),
                                            ft.double(), distance=distance, tau=tau)
        assert abs(loss.double() - ref_loss) <= 1e-5 * abs(ref_loss), (distance, tau)
        assert (grad.double() - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max(), (distance, tau)


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("noise", [1.0, 1e-2], ids=["random", "near"])
def test_long_rows_cpu(noise):
    """N = 2491: several column tiles of S per row block (the online softmax of the kl route)
    and several split-K chunks of the Grams."""
    g = torch.Generator().manual_seed(22)
    ft = torch.randn(1, 5, 47, 53, generator=g)
    fs = (ft if noise < 1 else torch.randn(1, 5, 47, 53, generator=g)) + noise * torch.randn(1, 5, 47, 53, generator=g)
    for distance, tau in (("mse", 1.0), ("kl", 1.0), ("kl", 0.1)):
        _check(PR, "cpu", fs, ft[:, :4], distance=distance, tau=tau)
        # Bitwise deterministic at this size too (many tasks over both threads).
        first = loss_and_grad(_fused(PR, "cpu"), fs, ft[:, :4], distance=distance, tau=tau)
        again = loss_and_grad(_fused(PR, "cpu"), fs, ft[:, :4], distance=distance, tau=tau)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), (distance, tau)
    # Near the teacher the channel Grams carry float32 rounding (as eager's do): the near bar.
    for normalize, distance in (("l2", "mse"), ("softmax", "kl")):
        _check(CR, "cpu", fs, ft, loss_rtol=1e-3 if noise < 1 else 1e-5, normalize=normalize,
               distance=distance, tau=2.0)


# --- channel counts ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
@pytest.mark.parametrize("channels", [(1, 1), (1, 8), (8, 2), (3, 3), (70, 5)], ids=str)
def test_pixel_channel_counts(backend, device, channels):
    fs, ft = random_pair((2, channels[0], 5, 7), (2, channels[1], 5, 7), device, seed=9)
    for distance in ("mse", "kl"):
        _check(PR, backend, fs, ft, distance=distance, tau=0.5)


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels", [100, 200, 300])
def test_pixel_kl_student_channel_blocks(backend, device, dtype, channels):
    """The kl backward's student channels in 64-channel blocks: 2 and 4 (kept in registers by the
    CUDA kernel in float32) and 5 (its scratch route, which float64 takes above 64)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 Triton tiles take minutes in the interpreter (float32 covers them)")
    fs, ft = random_pair((2, channels, 5, 7), (2, 6, 5, 7), device, dtype=dtype, seed=channels)
    _check(PR, backend, fs, ft, distance="kl", tau=0.5)


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("channels", [64, 130, 512])
def test_many_channels_cpu(channels):
    fs, ft = random_pair((2, channels, 5, 7), (2, channels, 5, 7), "cpu", seed=channels)
    _check(CR, "cpu", fs, ft, normalize="l2", distance="kl", tau=0.5)
    _check(CR, "cpu", fs, ft, normalize="softmax", distance="mse", tau=1.0)
    _check(PR, "cpu", fs, ft[:, : channels // 2 + 1], distance="mse")
    _check(PR, "cpu", fs, ft, distance="kl", tau=0.5)


# --- properties ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", ANY_TARGETS, ids=ANY_IDS)
def test_teacher_gets_no_gradient(backend, device):
    for op, kw in ((CR, {"distance": "kl"}), (PR, {"distance": "kl"}), (PR, {"distance": "mse"})):
        if backend != EMU and backend not in fused_backends(op, device):
            continue
        fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), device, seed=10)
        fs.requires_grad_(True)
        ft.requires_grad_(True)
        _fused(op, backend)(fs, ft, **kw).backward()
        assert fs.grad is not None and ft.grad is None


@pytest.mark.parametrize("backend,device", ANY_TARGETS, ids=ANY_IDS)
def test_non_finite_propagates(backend, device):
    for op, kw in ((CR, {"normalize": "l2"}), (CR, {"normalize": "softmax", "distance": "kl"}),
                   (PR, {"distance": "mse"}), (PR, {"distance": "kl"})):
        if backend != EMU and backend not in fused_backends(op, device):
            continue
        fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), device, seed=11)
        fs[0, 1, 2, 3] = float("nan")
        assert torch.isnan(_fused(op, backend)(fs, ft, **kw)), (op, kw)
        fs[0, 1, 2, 3] = float("inf")
        assert not torch.isfinite(_fused(op, backend)(fs, ft, **kw)), (op, kw)


@pytest.mark.parametrize("backend,device", PR_TARGETS, ids=PR_IDS)
def test_zero_pixels(backend, device):
    """Pixels whose vector is zero (norm below eps) take the eps branch of the normalisation."""
    fs, ft = random_pair((2, 4, 5, 7), (2, 3, 5, 7), device, seed=13)
    fs[0, :, 1, 2] = 0
    ft[1, :, 3, 4] = 0
    fs[1, :, 0, 0] = 1e-14
    for distance in ("mse", "kl"):
        _check(PR, backend, fs, ft, distance=distance, tau=0.5)


@pytest.mark.parametrize("backend,device", ANY_TARGETS, ids=ANY_IDS)
def test_deterministic(backend, device):
    for op, kw in ((CR, {"normalize": "softmax", "distance": "kl"}), (PR, {"distance": "mse"}),
                   (PR, {"distance": "kl"})):
        if backend != EMU and backend not in fused_backends(op, device):
            continue
        fs, ft = random_pair((2, 8, 13, 11), (2, 8, 13, 11), device, seed=14)
        first = loss_and_grad(_fused(op, backend), fs, ft, **kw)
        again = loss_and_grad(_fused(op, backend), fs, ft, **kw)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), (op, kw)


# --- autograd, operator registration, compile --------------------------------------------------


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("variant", [(n, d, t) for n in ("l2", "softmax") for d in ("mse", "kl")
                                     for t in (0.5, 2.0)], ids=lambda v: "-".join(map(str, v)))
def test_gradcheck_channel_cpu(variant):
    normalize, distance, tau = variant
    fs, ft = random_pair((2, 3, 4, 5), (2, 3, 4, 5), "cpu", dtype=torch.float64, seed=15)
    fs.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kdk.channel_relation_loss(x, ft, normalize=normalize, distance=distance, tau=tau,
                                            backend="cpu"), (fs,))


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.parametrize("variant", [("mse", 1.0), ("kl", 0.3), ("kl", 1.0), ("kl", 3.0)],
                         ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("noise", [1.0, 1e-3], ids=["random", "near"])
def test_gradcheck_pixel_cpu(variant, noise):
    distance, tau = variant
    ft = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    fs = (ft[:, :3] + noise * torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(17),
                                          dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kdk.pixel_relation_loss(x, ft, distance=distance, tau=tau, backend="cpu"), (fs,))


def _extension_targets():
    return [d for d in devices() if ("cpu" if d == "cpu" else "cuda") in fused_backends(PR, d)]


@pytest.mark.parametrize("device", _extension_targets())
def test_opcheck_extension_ops(device):
    ops = torch.ops.kdkernels
    fs, ft = random_pair((2, 3, 5, 7), (2, 3, 5, 7), device, seed=18)
    fs_wide = random_pair((2, 4, 5, 7), (2, 4, 5, 7), device, seed=19)[0]
    grad = torch.tensor(1.0, device=device)
    for normalize, distance in (("l2", "mse"), ("softmax", "kl")):
        args = (fs.requires_grad_(True), ft, normalize, distance, 0.5)
        torch.library.opcheck(ops.channel_relation.default, args)
        _, gg, stats = ops.channel_relation(fs.detach(), ft, normalize, distance, 0.5)
        torch.library.opcheck(ops.channel_relation_backward.default,
                              (grad, fs.detach(), gg, stats, normalize, 0.5))
    torch.library.opcheck(ops.pixel_relation_mse.default, (fs_wide.requires_grad_(True), ft))
    _, m_ss, m_st = ops.pixel_relation_mse(fs_wide.detach(), ft)
    torch.library.opcheck(ops.pixel_relation_mse_backward.default,
                          (grad, fs_wide.detach(), ft, m_ss, m_st))
    torch.library.opcheck(ops.pixel_relation_kl.default, (fs_wide, ft, 0.5))
    _, lse_s, lse_t = ops.pixel_relation_kl(fs_wide.detach(), ft, 0.5)
    torch.library.opcheck(ops.pixel_relation_kl_backward.default,
                          (grad, fs_wide.detach(), ft, lse_s, lse_t, 0.5))


@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
def test_compiles_fullgraph_cpu():
    fs, ft = random_pair((2, 4, 7, 9), (2, 3, 7, 9), "cpu", seed=20)

    def losses(x, y):
        return (kdk.channel_relation_loss(x, y[:, :1].expand(-1, 4, -1, -1), normalize="softmax",
                                          distance="kl", tau=2.0, backend="cpu")
                + kdk.pixel_relation_loss(x, y, backend="cpu")
                + kdk.pixel_relation_loss(x, y, distance="kl", tau=0.5, backend="cpu"))

    loss, grad = loss_and_grad(torch.compile(losses, fullgraph=True), fs, ft)
    ref_loss, ref_grad = loss_and_grad(losses, fs, ft)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)


# --- memory: the N x N matrices are never materialised -----------------------------------------


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_rss_growth(fn):
    """Peak resident memory during fn() above what the process held before it (Linux)."""
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    fn()
    return _status_bytes("VmHWM") - before


def _can_measure_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CPU, reason="no CPU extension")
@pytest.mark.skipif(not _can_measure_peak(), reason="needs /proc/self/clear_refs and VmHWM")
@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_no_n_by_n_matrix_cpu(distance):
    """B = 2, C = 64, 128 x 128: N = 16384, so one float32 S matrix alone is 2 GiB. Forward and
    backward together must stay far below that (the kl route takes a few seconds here)."""
    g = torch.Generator().manual_seed(21)
    fs = torch.randn(2, 64, 128, 128, generator=g).requires_grad_(True)
    ft = torch.randn(2, 64, 128, 128, generator=g)
    # Warm up the allocator and the kernels on a small problem first.
    kdk.pixel_relation_loss(fs[:, :, :8, :8], ft[:, :, :8, :8], distance=distance, backend="cpu").backward()
    fs.grad = None

    def step():
        kdk.pixel_relation_loss(fs, ft, distance=distance, tau=1.0, backend="cpu").backward()

    growth = _peak_rss_growth(step)
    assert torch.isfinite(fs.grad).all()
    assert growth < 1.2e9, f"peak RSS grew by {growth / 2**20:.0f} MiB"
