"""kdkernels.reference against independent float64 formulas written from SPEC section 3.

Every expected value here is computed in NumPy float64 from the SPEC text with explicit loops,
integral images and hand-written softmax / bilinear / adaptive-pool index arithmetic; nothing is
shared with reference.py. Each test draws fresh random inputs from a generator seeded by the
test's own id, so a failure reproduces exactly. Also covered: gradcheck with respect to the
student in float64 (every option), the teacher never receiving a gradient, result and gradient
dtypes, memory layouts and NaN propagation.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from kdkernels import reference

EPS = 1e-12
RTOL = 1e-10
ATOL = 1e-13


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """The tensors here are tiny: intra-op threads only add overhead (and contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded by the test id: fresh per test, reproducible per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def check(actual, expected, rtol=RTOL, atol=ATOL):
    assert isinstance(actual, torch.Tensor)
    assert actual.dim() == 0, actual.shape
    assert actual.dtype == torch.float64
    got = actual.item()
    assert math.isfinite(expected), expected
    assert abs(got - expected) <= atol + rtol * abs(expected), (got, expected, got - expected)


# ---------------------------------------------------------------------------------------------
# Independent float64 building blocks
# ---------------------------------------------------------------------------------------------


def np_log_softmax(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def kl_sum(logits_t, logits_s, axis):
    """sum over everything of p_t (log p_t - log p_s), distributions along `axis`."""
    lt = np_log_softmax(logits_t, axis)
    ls = np_log_softmax(logits_s, axis)
    return float(np.sum(np.exp(lt) * (lt - ls)))


def l2_normalize_vec(v):
    norm = math.sqrt(sum(float(x) * float(x) for x in v))
    return np.asarray(v, dtype=np.float64) / max(norm, EPS)


def bilinear_matrix(n_in, n_out):
    """PyTorch's bilinear, align_corners=False, as an (n_out, n_in) matrix along one axis."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for o in range(n_out):
        src = max(scale * (o + 0.5) - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[o, i0] += 1.0 - lam
        m[o, i1] += lam
    return m


def adaptive_pool_matrix(n_in, n_out):
    """Adaptive average pooling along one axis: window [floor(o*in/out), ceil((o+1)*in/out))."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        start = (o * n_in) // n_out
        end = -((-(o + 1) * n_in) // n_out)
        m[o, start:end] = 1.0 / (end - start)
    return m


def resize_maps(x, mh, mw):
    """Apply separable (H, W) matrices to every B, C map of x: out = Mh X Mw^T."""
    b, c = x.shape[:2]
    out = np.zeros((b, c, mh.shape[0], mw.shape[0]))
    for i in range(b):
        for j in range(c):
            out[i, j] = mh @ x[i, j] @ mw.T
    return out


def attention_vectors(f, p):
    """Per sample: v_n = mean_c |F_c,n|^p over channels, L2-normalised over pixels."""
    b, c, h, w = f.shape
    out = []
    for i in range(b):
        v = []
        for y in range(h):
            for x in range(w):
                v.append(sum(abs(f[i, ch, y, x]) ** p for ch in range(c)) / c)
        out.append(l2_normalize_vec(v))
    return np.stack(out)


def expected_at(fs, ft, p, resize, reduction):
    hs, ws = fs.shape[-2:]
    ht, wt = ft.shape[-2:]
    if (hs, ws) != (ht, wt):
        if resize == "bilinear":
            fs = resize_maps(fs, bilinear_matrix(hs, ht), bilinear_matrix(ws, wt))
        elif resize == "pool":
            h, w = min(hs, ht), min(ws, wt)
            fs = resize_maps(fs, adaptive_pool_matrix(hs, h), adaptive_pool_matrix(ws, w))
            ft = resize_maps(ft, adaptive_pool_matrix(ht, h), adaptive_pool_matrix(wt, w))
        else:
            raise AssertionError("unreachable")
    a_s, a_t = attention_vectors(fs, p), attention_vectors(ft, p)
    total = float(np.sum((a_s - a_t) ** 2))
    b, n = a_s.shape
    return {"mean": total / (b * n), "batchmean": total / b, "sum": total}[reduction]


def expected_channel_relation(fs, ft, normalize, distance, tau):
    def gram(f):
        b, c = f.shape[:2]
        rows = f.reshape(b, c, -1)
        out = np.zeros((b, c, c))
        for i in range(b):
            if normalize == "l2":
                fn = [l2_normalize_vec(rows[i, k]) for k in range(c)]
            else:
                fn = [np.exp(np_log_softmax(rows[i, k] / tau, 0)) for k in range(c)]
            for k in range(c):
                for m in range(c):
                    out[i, k, m] = sum(fn[k][n] * fn[m][n] for n in range(rows.shape[2]))
        return out

    gs, gt = gram(fs), gram(ft)
    b, c = gs.shape[:2]
    if distance == "mse":
        return float(np.sum((gs - gt) ** 2)) / (b * c * c)
    return tau * tau * kl_sum(gt / tau, gs / tau, axis=-1) / (b * c)


def expected_pixel_relation(fs, ft, distance, tau):
    def sim(f):
        b, c, h, w = f.shape
        n = h * w
        out = np.zeros((b, n, n))
        for i in range(b):
            cols = [l2_normalize_vec(f[i, :, q // w, q % w]) for q in range(n)]
            for q in range(n):
                for r in range(n):
                    out[i, q, r] = float(np.dot(cols[q], cols[r]))
        return out

    ss, st = sim(fs), sim(ft)
    b, n = ss.shape[:2]
    if distance == "mse":
        return float(np.sum((ss - st) ** 2)) / (b * n * n)
    return tau * tau * kl_sum(st / tau, ss / tau, axis=-1) / (b * n)


def expected_sgm(ps, pt, distance):
    h = ps.shape[-1]
    es = np.empty_like(ps)
    et = np.empty_like(pt)
    for i in range(h):
        for j in range(h):
            es[..., i, j] = ps[..., i, j] + ps[..., j, i]
            et[..., i, j] = pt[..., i, j] + pt[..., j, i]
    d = es - et
    return float(np.mean(d * d) if distance == "mse" else np.mean(np.abs(d)))


def attended(x):
    """A(X) = softmax_rows(X X^T / sqrt(W)) X for one H x W map."""
    h, w = x.shape
    scores = np.array([[float(np.dot(x[i], x[j])) / math.sqrt(w) for j in range(h)]
                       for i in range(h)])
    probs = np.exp(np_log_softmax(scores, axis=1))
    return probs @ x


def expected_logit_attention(ps, pt, tau):
    if ps.ndim == 3:
        ps, pt = ps[:, None], pt[:, None]
    b, k = ps.shape[:2]
    total = 0.0
    for i in range(b):
        for j in range(k):
            qs = attended(ps[i, j]).ravel() / tau
            qt = attended(pt[i, j]).ravel() / tau
            total += kl_sum(qt, qs, axis=0)
    return tau * tau * total / (b * k)


def expected_pixel_kl(zs, zt, temperature, mask):
    zs, zt = zs / temperature, zt / temperature
    if zs.shape[1] == 1:
        ps = 1.0 / (1.0 + np.exp(-zs[:, 0]))
        pt = 1.0 / (1.0 + np.exp(-zt[:, 0]))
        kl = pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps))
    else:
        lt = np_log_softmax(zt, axis=1)
        ls = np_log_softmax(zs, axis=1)
        kl = np.sum(np.exp(lt) * (lt - ls), axis=1)
    if mask is None:
        return temperature**2 * float(np.sum(kl)) / kl.size
    counted = [float(v) for v, keep in zip(kl.ravel(), mask.ravel()) if keep]
    return temperature**2 * sum(counted) / len(counted)


def expected_channel_wise_kl(fs, ft, tau):
    b, c = fs.shape[:2]
    total = 0.0
    for i in range(b):
        for j in range(c):
            total += kl_sum(ft[i, j].ravel() / tau, fs[i, j].ravel() / tau, axis=0)
    return tau * tau * total / (b * c)


def box_mean_31(m):
    """31x31 mean with zero padding 15 (padding counted) via an integral image."""
    h, w = m.shape
    padded = np.pad(m, 15)
    integral = np.zeros((h + 31, w + 31))
    integral[1:, 1:] = padded.cumsum(0).cumsum(1)
    out = (integral[31:, 31:] - integral[:-31, 31:] - integral[31:, :-31] + integral[:-31, :-31])
    assert out.shape == (h, w)
    return out / 961.0


def expected_structure(logits, mask):
    b = logits.shape[0]
    per_image = []
    for i in range(b):
        x, y = logits[i, 0], mask[i, 0]
        w = 1.0 + 5.0 * np.abs(box_mean_31(y) - y)
        bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
        wbce = float(np.sum(w * bce) / np.sum(w))
        p = 1.0 / (1.0 + np.exp(-x))
        inter = float(np.sum(p * y * w))
        union = float(np.sum((p + y) * w))
        wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)
        per_image.append(wbce + wiou)
    return sum(per_image) / b


# ---------------------------------------------------------------------------------------------
# Sanity of the building blocks themselves (brute force, no torch)
# ---------------------------------------------------------------------------------------------


def test_box_mean_matches_brute_force(rng):
    m = (rng.random((7, 9)) > 0.5).astype(np.float64)
    fast = box_mean_31(m)
    h, w = m.shape
    for y in range(h):
        for x in range(w):
            s = sum(m[yy, xx] for yy in range(max(0, y - 15), min(h, y + 16))
                    for xx in range(max(0, x - 15), min(w, x + 16)))
            assert abs(fast[y, x] - s / 961.0) < 1e-14


def test_resize_matrices_rows_sum_to_one():
    for n_in, n_out in [(5, 8), (8, 5), (7, 7), (1, 4), (4, 1), (9, 2)]:
        for m in (bilinear_matrix(n_in, n_out), adaptive_pool_matrix(n_in, n_out)):
            assert np.allclose(m.sum(1), 1.0, rtol=0, atol=1e-15)
            assert (m >= 0).all()


# ---------------------------------------------------------------------------------------------
# attention_transfer_loss
# ---------------------------------------------------------------------------------------------

AT_SIZES = {
    "student_larger": ((9, 7), (6, 5)),
    "student_smaller": ((5, 4), (8, 9)),
    "equal": ((6, 5), (6, 5)),
    # larger along H, smaller along W: "pool" brings both to the per-axis minimum
    "mixed": ((9, 4), (6, 7)),
}


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("sizes", list(AT_SIZES))
@pytest.mark.parametrize("resize", ["bilinear", "pool"])
@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, 4.0])
def test_attention_transfer_values(rng, p, resize, sizes, reduction):
    (hs, ws), (ht, wt) = AT_SIZES[sizes]
    fs = rng.standard_normal((2, 3, hs, ws))
    ft = rng.standard_normal((2, 5, ht, wt))
    got = reference.attention_transfer_loss(t64(fs), t64(ft), p=p, resize=resize,
                                            reduction=reduction)
    check(got, expected_at(fs, ft, p, resize, reduction))


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("resize", ["bilinear", "pool", None])
def test_attention_transfer_equal_sizes_any_resize(rng, resize, reduction):
    fs = rng.standard_normal((3, 2, 5, 7))
    ft = rng.standard_normal((3, 4, 5, 7))
    got = reference.attention_transfer_loss(t64(fs), t64(ft), p=2.0, resize=resize,
                                            reduction=reduction)
    check(got, expected_at(fs, ft, 2.0, "unused", reduction))


@pytest.mark.parametrize("b,cs,ct,ss,st", [
    (1, 1, 1, (7, 7), (7, 7)),
    (1, 3, 1, (11, 5), (3, 9)),
    (2, 1, 3, (3, 3), (13, 11)),
    (3, 3, 3, (1, 1), (4, 5)),
    (2, 4, 2, (16, 16), (1, 1)),
])
@pytest.mark.parametrize("resize", ["bilinear", "pool"])
def test_attention_transfer_shapes(rng, b, cs, ct, ss, st, resize):
    fs = rng.standard_normal((b, cs) + ss)
    ft = rng.standard_normal((b, ct) + st)
    got = reference.attention_transfer_loss(t64(fs), t64(ft), p=3.0, resize=resize,
                                            reduction="batchmean")
    check(got, expected_at(fs, ft, 3.0, resize, "batchmean"))


def test_attention_transfer_bilinear_resizes_before_power(rng):
    """The student is resized first, then |.|^p: differs from resizing the attention map."""
    fs = rng.standard_normal((1, 2, 4, 4))
    ft = rng.standard_normal((1, 2, 7, 7))
    got = reference.attention_transfer_loss(t64(fs), t64(ft), p=2.0, resize="bilinear")
    mh = bilinear_matrix(4, 7)
    wrong_as = np.stack([l2_normalize_vec((mh @ np.mean(fs[0] ** 2, axis=0) @ mh.T).ravel())])
    wrong = float(np.sum((wrong_as - attention_vectors(ft, 2.0)) ** 2)) / 49
    assert abs(got.item() - wrong) > 1e-6
    check(got, expected_at(fs, ft, 2.0, "bilinear", "mean"))


def test_attention_transfer_resize_none_rejects_different_sizes(rng):
    fs = t64(rng.standard_normal((1, 2, 4, 4)))
    ft = t64(rng.standard_normal((1, 2, 5, 4)))
    with pytest.raises(ValueError):
        reference.attention_transfer_loss(fs, ft, resize=None)


def test_attention_transfer_is_zero_for_scaled_teacher(rng):
    """a(F) is scale invariant: a student equal to 3x the teacher gives exactly zero loss."""
    ft = rng.standard_normal((2, 3, 5, 5))
    got = reference.attention_transfer_loss(t64(3.0 * ft), t64(ft), p=2.0)
    assert abs(got.item()) < 1e-25


# ---------------------------------------------------------------------------------------------
# channel_relation_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("distance", ["mse", "kl"])
@pytest.mark.parametrize("normalize", ["l2", "softmax"])
def test_channel_relation_values(rng, normalize, distance, tau):
    fs = rng.standard_normal((2, 4, 5, 3))
    ft = rng.standard_normal((2, 4, 5, 3))
    got = reference.channel_relation_loss(t64(fs), t64(ft), normalize=normalize,
                                          distance=distance, tau=tau)
    check(got, expected_channel_relation(fs, ft, normalize, distance, tau))


@pytest.mark.parametrize("shape", [(1, 1, 3, 3), (1, 3, 7, 5), (3, 3, 1, 1), (2, 1, 4, 9)])
@pytest.mark.parametrize("normalize,distance", [("l2", "mse"), ("softmax", "kl"),
                                                ("l2", "kl"), ("softmax", "mse")])
def test_channel_relation_shapes(rng, shape, normalize, distance):
    fs = rng.standard_normal(shape)
    ft = rng.standard_normal(shape)
    got = reference.channel_relation_loss(t64(fs), t64(ft), normalize=normalize,
                                          distance=distance, tau=2.0)
    check(got, expected_channel_relation(fs, ft, normalize, distance, 2.0))


# ---------------------------------------------------------------------------------------------
# pixel_relation_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 0.25, 4.0])
@pytest.mark.parametrize("distance", ["mse", "kl"])
@pytest.mark.parametrize("cs,ct", [(3, 3), (2, 5), (1, 3)])
def test_pixel_relation_values(rng, cs, ct, distance, tau):
    fs = rng.standard_normal((2, cs, 3, 5))
    ft = rng.standard_normal((2, ct, 3, 5))
    got = reference.pixel_relation_loss(t64(fs), t64(ft), distance=distance, tau=tau)
    check(got, expected_pixel_relation(fs, ft, distance, tau))


@pytest.mark.parametrize("shape_s,shape_t", [
    ((1, 1, 1, 1), (1, 3, 1, 1)),
    ((1, 3, 5, 5), (1, 1, 5, 5)),
    ((3, 4, 1, 7), (3, 2, 1, 7)),
    ((1, 3, 4, 6), (1, 3, 4, 6)),
])
@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_pixel_relation_shapes(rng, shape_s, shape_t, distance):
    fs = rng.standard_normal(shape_s)
    ft = rng.standard_normal(shape_t)
    got = reference.pixel_relation_loss(t64(fs), t64(ft), distance=distance, tau=0.5)
    check(got, expected_pixel_relation(fs, ft, distance, 0.5))


@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_pixel_relation_student_near_teacher(rng, distance):
    """Close to the teacher the loss is tiny; the value must still be relatively accurate."""
    ft = rng.standard_normal((2, 4, 4, 3))
    fs = ft + 1e-4 * rng.standard_normal(ft.shape)
    expected = expected_pixel_relation(fs, ft, distance, 1.0)
    assert 0 < expected < 1e-6
    got = reference.pixel_relation_loss(t64(fs), t64(ft), distance=distance, tau=1.0)
    check(got, expected, rtol=1e-6, atol=0.0)


# ---------------------------------------------------------------------------------------------
# sgm_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["mse", "l1"])
@pytest.mark.parametrize("shape", [(2, 5, 5), (1, 7, 7), (3, 1, 1), (2, 1, 6, 6), (1, 3, 5, 5),
                                   (3, 2, 4, 4)])
def test_sgm_values(rng, shape, distance):
    ps = rng.standard_normal(shape)
    pt = rng.standard_normal(shape)
    got = reference.sgm_loss(t64(ps), t64(pt), distance=distance)
    check(got, expected_sgm(ps, pt, distance))


@pytest.mark.parametrize("distance", ["mse", "l1"])
def test_sgm_ignores_antisymmetric_difference(rng, distance):
    """E = P + P^T: adding an antisymmetric map to the student changes nothing."""
    pt = rng.standard_normal((2, 1, 5, 5))
    a = rng.standard_normal((2, 1, 5, 5))
    ps = pt + (a - np.swapaxes(a, -1, -2))
    got = reference.sgm_loss(t64(ps), t64(pt), distance=distance)
    assert abs(got.item()) < 1e-14
    ps2 = pt + a  # generic: nonzero
    check(reference.sgm_loss(t64(ps2), t64(pt), distance=distance),
          expected_sgm(ps2, pt, distance))


# ---------------------------------------------------------------------------------------------
# logit_attention_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [2.0, 1.0, 0.7])
@pytest.mark.parametrize("shape", [(2, 5, 5), (1, 4, 7), (2, 1, 6, 3), (1, 3, 5, 4),
                                   (3, 2, 7, 7)])
def test_logit_attention_values(rng, shape, tau):
    ps = rng.standard_normal(shape)
    pt = rng.standard_normal(shape)
    got = reference.logit_attention_loss(t64(ps), t64(pt), tau=tau)
    check(got, expected_logit_attention(ps, pt, tau))


def test_logit_attention_3d_equals_4d_with_one_channel(rng):
    ps = rng.standard_normal((2, 5, 6))
    pt = rng.standard_normal((2, 5, 6))
    a = reference.logit_attention_loss(t64(ps), t64(pt), tau=2.0)
    b = reference.logit_attention_loss(t64(ps[:, None]), t64(pt[:, None]), tau=2.0)
    check(a, b.item(), rtol=1e-14, atol=0.0)
    check(a, expected_logit_attention(ps, pt, 2.0))


def test_logit_attention_scales_by_sqrt_width(rng):
    """H != W: the attention scores use sqrt(W) (the row length), not sqrt(H)."""
    ps = 3.0 * rng.standard_normal((1, 3, 8))
    pt = 3.0 * rng.standard_normal((1, 3, 8))
    got = reference.logit_attention_loss(t64(ps), t64(pt), tau=1.0)
    check(got, expected_logit_attention(ps, pt, 1.0))

    def attended_sqrt_h(x):  # the same with sqrt(H) would differ
        scores = x @ x.T / math.sqrt(x.shape[0])
        return np.exp(np_log_softmax(scores, 1)) @ x

    wrong = kl_sum(attended_sqrt_h(pt[0]).ravel(), attended_sqrt_h(ps[0]).ravel(), 0)
    assert abs(got.item() - wrong) > 1e-6


# ---------------------------------------------------------------------------------------------
# pixel_kl_loss
# ---------------------------------------------------------------------------------------------


def random_mask(rng, shape):
    mask = rng.random(shape) > 0.4
    mask.flat[0] = True  # never empty
    return mask


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("temperature", [4.0, 1.0, 0.5])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 3), (2, 1, 5, 4), (1, 1, 1, 1),
                                   (3, 7, 1, 2)])
def test_pixel_kl_values(rng, shape, temperature, with_mask):
    zs = 3.0 * rng.standard_normal(shape)
    zt = 3.0 * rng.standard_normal(shape)
    mask = random_mask(rng, (shape[0],) + shape[2:]) if with_mask else None
    got = reference.pixel_kl_loss(t64(zs), t64(zt), temperature=temperature,
                                  mask=None if mask is None else torch.from_numpy(mask))
    check(got, expected_pixel_kl(zs, zt, temperature, mask))


@pytest.mark.parametrize("temperature", [4.0, 1.0])
@pytest.mark.parametrize("shape", [(4, 8), (1, 23), (3, 2), (5, 1), (1, 1)])
def test_pixel_kl_classification(rng, shape, temperature):
    zs = 2.0 * rng.standard_normal(shape)
    zt = 2.0 * rng.standard_normal(shape)
    got = reference.pixel_kl_loss(t64(zs), t64(zt), temperature=temperature)
    check(got, expected_pixel_kl(zs, zt, temperature, None))


def test_pixel_kl_binary_equals_two_class_softmax(rng):
    """K == 1 Bernoulli KL == the K = 2 softmax KL over logits (z, 0)."""
    zs = rng.standard_normal((2, 1, 3, 4))
    zt = rng.standard_normal((2, 1, 3, 4))
    binary = reference.pixel_kl_loss(t64(zs), t64(zt), temperature=2.0)
    two = reference.pixel_kl_loss(t64(np.concatenate([zs, 0 * zs], 1)),
                                  t64(np.concatenate([zt, 0 * zt], 1)), temperature=2.0)
    check(binary, two.item(), rtol=1e-12, atol=0.0)


def test_pixel_kl_mask_true_means_counted(rng):
    zs = rng.standard_normal((1, 3, 2, 2))
    zt = rng.standard_normal((1, 3, 2, 2))
    mask = np.zeros((1, 2, 2), dtype=bool)
    mask[0, 1, 0] = True
    got = reference.pixel_kl_loss(t64(zs), t64(zt), temperature=1.0, mask=torch.from_numpy(mask))
    only = kl_sum(zt[0, :, 1, 0], zs[0, :, 1, 0], axis=0)
    check(got, only)
    everything = reference.pixel_kl_loss(t64(zs), t64(zt), temperature=1.0,
                                         mask=torch.ones(1, 2, 2, dtype=torch.bool))
    check(everything, expected_pixel_kl(zs, zt, 1.0, None))


# ---------------------------------------------------------------------------------------------
# channel_wise_kl_loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [4.0, 1.0, 0.5])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 3, 3), (3, 2, 1, 7), (1, 4, 5, 5),
                                   (2, 3, 1, 1)])
def test_channel_wise_kl_values(rng, shape, tau):
    fs = 2.0 * rng.standard_normal(shape)
    ft = 2.0 * rng.standard_normal(shape)
    got = reference.channel_wise_kl_loss(t64(fs), t64(ft), tau=tau)
    check(got, expected_channel_wise_kl(fs, ft, tau))


# ---------------------------------------------------------------------------------------------
# structure_loss
# ---------------------------------------------------------------------------------------------


def random_binary_mask(rng, shape, kind):
    b, _, h, w = shape
    if kind == "noise":
        return (rng.random(shape) > 0.5).astype(np.float64)
    m = np.zeros(shape)
    for i in range(b):  # a random rectangle ("polyp") on an empty background
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0 + 1, h + 1), rng.integers(x0 + 1, w + 1)
        m[i, 0, y0:y1, x0:x1] = 1.0
    if kind == "empty":
        m[:] = 0.0
    if kind == "full":
        m[:] = 1.0
    return m


@pytest.mark.parametrize("kind", ["noise", "blob", "empty", "full"])
@pytest.mark.parametrize("shape", [(2, 1, 37, 40), (1, 1, 9, 13), (3, 1, 33, 29), (1, 1, 31, 31),
                                   (2, 1, 1, 1), (1, 1, 45, 5)])
def test_structure_values(rng, shape, kind):
    logits = 3.0 * rng.standard_normal(shape)
    mask = random_binary_mask(rng, shape, kind)
    got = reference.structure_loss(t64(logits), t64(mask))
    check(got, expected_structure(logits, mask))


def test_structure_bool_mask(rng):
    logits = rng.standard_normal((2, 1, 35, 34))
    mask = random_binary_mask(rng, logits.shape, "blob")
    got = reference.structure_loss(t64(logits), torch.from_numpy(mask > 0.5))
    check(got, expected_structure(logits, mask))


def test_structure_large_logits_stable(rng):
    logits = 60.0 * rng.standard_normal((1, 1, 12, 12))
    mask = random_binary_mask(rng, logits.shape, "blob")
    got = reference.structure_loss(t64(logits), t64(mask))
    check(got, expected_structure(logits, mask))


# ---------------------------------------------------------------------------------------------
# gradcheck with respect to the student, every option, float64
# ---------------------------------------------------------------------------------------------


def _gc(fn, student):
    s = t64(student).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


AT_GRAD_CASES = (
    [(p, resize, sizes, "mean") for p in (1.5, 2.0, 3.0, 4.0) for resize in ("bilinear", "pool")
     for sizes in ("student_larger", "student_smaller", "equal")]
    + [(2.0, resize, "student_larger", reduction) for resize in ("bilinear", "pool")
       for reduction in ("batchmean", "sum")]
    + [(4.0, "bilinear", "student_smaller", "batchmean"), (1.5, "pool", "equal", "sum")]
)


@pytest.mark.parametrize("p,resize,sizes,reduction", AT_GRAD_CASES)
def test_gradcheck_attention_transfer(rng, p, resize, sizes, reduction):
    small = {"student_larger": ((5, 4), (3, 3)), "student_smaller": ((3, 2), (4, 5)),
             "equal": ((3, 4), (3, 4))}[sizes]
    fs = rng.standard_normal((2, 2) + small[0])
    ft = t64(rng.standard_normal((2, 3) + small[1]))
    _gc(lambda s: reference.attention_transfer_loss(s, ft, p=p, resize=resize,
                                                    reduction=reduction), fs)


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("distance", ["mse", "kl"])
@pytest.mark.parametrize("normalize", ["l2", "softmax"])
def test_gradcheck_channel_relation(rng, normalize, distance, tau):
    fs = rng.standard_normal((2, 3, 3, 2))
    ft = t64(rng.standard_normal((2, 3, 3, 2)))
    _gc(lambda s: reference.channel_relation_loss(s, ft, normalize=normalize, distance=distance,
                                                  tau=tau), fs)


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("distance", ["mse", "kl"])
def test_gradcheck_pixel_relation(rng, distance, tau):
    fs = rng.standard_normal((2, 3, 2, 3))
    ft = t64(rng.standard_normal((2, 4, 2, 3)))
    _gc(lambda s: reference.pixel_relation_loss(s, ft, distance=distance, tau=tau), fs)


@pytest.mark.parametrize("distance", ["mse", "l1"])
@pytest.mark.parametrize("shape", [(2, 4, 4), (1, 2, 3, 3)])
def test_gradcheck_sgm(rng, shape, distance):
    fs = rng.standard_normal(shape)
    ft = t64(rng.standard_normal(shape))
    _gc(lambda s: reference.sgm_loss(s, ft, distance=distance), fs)


@pytest.mark.parametrize("tau", [2.0, 0.7])
@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 2, 4, 3)])
def test_gradcheck_logit_attention(rng, shape, tau):
    fs = rng.standard_normal(shape)
    ft = t64(rng.standard_normal(shape))
    _gc(lambda s: reference.logit_attention_loss(s, ft, tau=tau), fs)


@pytest.mark.parametrize("temperature", [4.0, 1.0])
@pytest.mark.parametrize("shape,with_mask", [
    ((2, 3, 2, 3), False), ((2, 3, 2, 3), True), ((2, 1, 3, 2), False), ((2, 1, 3, 2), True),
    ((3, 4), False), ((3, 1), False),  # classification logits: no mask
])
def test_gradcheck_pixel_kl(rng, shape, with_mask, temperature):
    fs = 2.0 * rng.standard_normal(shape)
    ft = t64(2.0 * rng.standard_normal(shape))
    mask = torch.from_numpy(random_mask(rng, (shape[0],) + shape[2:])) if with_mask else None
    _gc(lambda s: reference.pixel_kl_loss(s, ft, temperature=temperature, mask=mask), fs)


@pytest.mark.parametrize("tau", [4.0, 1.0])
def test_gradcheck_channel_wise_kl(rng, tau):
    fs = rng.standard_normal((2, 3, 2, 3))
    ft = t64(rng.standard_normal((2, 3, 2, 3)))
    _gc(lambda s: reference.channel_wise_kl_loss(s, ft, tau=tau), fs)


@pytest.mark.parametrize("shape", [(2, 1, 5, 4), (1, 1, 3, 34)])
def test_gradcheck_structure(rng, shape):
    logits = rng.standard_normal(shape)
    mask = t64(random_binary_mask(rng, shape, "blob"))
    _gc(lambda s: reference.structure_loss(s, mask), logits)


# ---------------------------------------------------------------------------------------------
# Conventions shared by every op: no teacher gradient, dtypes, layouts, NaN propagation
# ---------------------------------------------------------------------------------------------


def _maps(rng, shape, dtype):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def _binary(rng, shape, dtype):
    return torch.from_numpy(random_binary_mask(rng, shape, "blob")).to(dtype)


def _kl_mask(shape):
    mask = torch.ones(shape, dtype=torch.bool)
    mask.view(-1)[1::3] = False
    return mask


# name -> (call(student, teacher), student shape, teacher shape, teacher maker)
CASES = {
    "at_bilinear": (lambda s, t: reference.attention_transfer_loss(s, t, p=2.0),
                    (2, 3, 9, 7), (2, 4, 6, 5), _maps),
    "at_pool_p4_batchmean": (lambda s, t: reference.attention_transfer_loss(
        s, t, p=4.0, resize="pool", reduction="batchmean"), (2, 3, 4, 5), (2, 2, 7, 6), _maps),
    "at_p1.5_sum": (lambda s, t: reference.attention_transfer_loss(s, t, p=1.5, reduction="sum"),
                    (1, 3, 5, 5), (1, 3, 5, 5), _maps),
    "channel_relation_l2_mse": (lambda s, t: reference.channel_relation_loss(s, t),
                                (2, 3, 4, 5), (2, 3, 4, 5), _maps),
    "channel_relation_softmax_kl": (lambda s, t: reference.channel_relation_loss(
        s, t, normalize="softmax", distance="kl", tau=2.0), (2, 3, 4, 5), (2, 3, 4, 5), _maps),
    "pixel_relation_mse": (lambda s, t: reference.pixel_relation_loss(s, t),
                           (2, 3, 4, 3), (2, 5, 4, 3), _maps),
    "pixel_relation_kl": (lambda s, t: reference.pixel_relation_loss(s, t, distance="kl", tau=0.5),
                          (2, 3, 4, 3), (2, 5, 4, 3), _maps),
    "sgm_mse_3d": (lambda s, t: reference.sgm_loss(s, t), (2, 5, 5), (2, 5, 5), _maps),
    "sgm_l1_4d": (lambda s, t: reference.sgm_loss(s, t, distance="l1"),
                  (2, 2, 5, 5), (2, 2, 5, 5), _maps),
    "logit_attention_3d": (lambda s, t: reference.logit_attention_loss(s, t),
                           (2, 5, 6), (2, 5, 6), _maps),
    "logit_attention_4d": (lambda s, t: reference.logit_attention_loss(s, t, tau=1.0),
                           (2, 2, 6, 5), (2, 2, 6, 5), _maps),
    "pixel_kl_k3": (lambda s, t: reference.pixel_kl_loss(s, t), (2, 3, 4, 5), (2, 3, 4, 5), _maps),
    "pixel_kl_k1_mask": (lambda s, t: reference.pixel_kl_loss(s, t, temperature=2.0,
                                                              mask=_kl_mask((2, 4, 5))),
                         (2, 1, 4, 5), (2, 1, 4, 5), _maps),
    "pixel_kl_k3_mask": (lambda s, t: reference.pixel_kl_loss(s, t, temperature=1.0,
                                                              mask=_kl_mask((2, 4, 5))),
                         (2, 3, 4, 5), (2, 3, 4, 5), _maps),
    "pixel_kl_classification": (lambda s, t: reference.pixel_kl_loss(s, t), (4, 8), (4, 8), _maps),
    "channel_wise_kl": (lambda s, t: reference.channel_wise_kl_loss(s, t),
                        (2, 3, 4, 5), (2, 3, 4, 5), _maps),
    "structure": (lambda s, t: reference.structure_loss(s, t),
                  (2, 1, 34, 35), (2, 1, 34, 35), _binary),
}


@pytest.mark.parametrize("name", list(CASES))
def test_teacher_gets_no_gradient(rng, name):
    call, s_shape, t_shape, make_t = CASES[name]
    s = _maps(rng, s_shape, torch.float64).requires_grad_(True)
    t = make_t(rng, t_shape, torch.float64).requires_grad_(True)
    loss = call(s, t)
    loss.backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.shape == s.shape
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_result_dtype_and_value(rng, name, dtype):
    """float32/16/bf16 in -> 0-dim float32 out, close to the float64 value of the same inputs;
    the gradient has the student's dtype."""
    call, s_shape, t_shape, make_t = CASES[name]
    s = _maps(rng, s_shape, dtype).requires_grad_(True)
    t = make_t(rng, t_shape, dtype)
    loss = call(s, t)
    assert loss.dtype == torch.float32
    assert loss.dim() == 0
    exact = call(s.detach().double(), t.double())
    assert abs(loss.item() - exact.item()) <= 1e-6 + 1e-4 * abs(exact.item())
    loss.backward()
    assert s.grad.dtype == dtype
    assert s.grad.shape == s.shape


def _strided_copy(x):
    """Same values, non-contiguous storage (every other element of a wider buffer)."""
    wide = torch.zeros(x.shape[:-1] + (2 * x.shape[-1],), dtype=x.dtype)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


LAYOUT_CASES = [(name, layout) for name in CASES for layout in ("channels_last", "strided")
                if layout == "strided" or len(CASES[name][1]) == 4]


@pytest.mark.parametrize("name,layout", LAYOUT_CASES)
def test_layouts_agree(rng, name, layout):
    call, s_shape, t_shape, make_t = CASES[name]
    s = _maps(rng, s_shape, torch.float64)
    t = make_t(rng, t_shape, torch.float64)
    base = call(s, t).item()
    if layout == "channels_last":
        s2 = s.contiguous(memory_format=torch.channels_last)
        t2 = t.contiguous(memory_format=torch.channels_last)
    else:
        s2, t2 = _strided_copy(s), _strided_copy(t)
    got = call(s2, t2).item()
    assert abs(got - base) <= 1e-12 * abs(base) + 1e-15


@pytest.mark.parametrize("name", list(CASES))
def test_nan_propagates(rng, name):
    call, s_shape, t_shape, make_t = CASES[name]
    s = _maps(rng, s_shape, torch.float32)
    t = make_t(rng, t_shape, torch.float32)
    s.view(-1)[0] = float("nan")
    assert torch.isnan(call(s, t))


def test_pixel_kl_mask_excludes_non_finite_pixels():
    """A masked-out pixel does not reach the loss at all, whatever it holds."""
    zs, zt = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[1, 2, 3] = False
    expected = reference.pixel_kl_loss(zs, zt, mask=mask)
    zs[1, :, 2, 3] = float("nan")
    zt[1, 0, 2, 3] = float("inf")
    torch.testing.assert_close(reference.pixel_kl_loss(zs, zt, mask=mask), expected, rtol=0, atol=0)
