"""Metrics against reference packages (torchmetrics, prdc, vendi-score) and direct float64 sums."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from irs_callbacks import metrics as M

prdc_pkg = pytest.importorskip("prdc")
vendi_pkg = pytest.importorskip("vendi_score.vendi")


@pytest.fixture(scope="module")
def digits():
    x = load_digits().data.astype(np.float64)  # 1,797 x 64 integer pixels (many exact ties)
    return x[:900], x[900:1700]


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(0)
    return rng.normal(size=(600, 40)), rng.normal(size=(500, 40)) * 1.1 + 0.15


class _Identity(torch.nn.Module):
    num_features = 64

    def forward(self, x):
        return x


def torchmetrics_fid(real, fake):
    from torchmetrics.image.fid import FrechetInceptionDistance

    module = _Identity()
    module.num_features = real.shape[1]
    metric = FrechetInceptionDistance(feature=module)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    return float(metric.compute())


@pytest.mark.parametrize("data", ["digits", "gaussian"])
def test_fid_matches_torchmetrics(data, request):
    real, fake = request.getfixturevalue(data)
    ours, ref = M.fid(real, fake), torchmetrics_fid(real, fake)
    assert ours == pytest.approx(ref, rel=1e-4)
    assert M.fid(real, real) == pytest.approx(0.0, abs=1e-6 * np.trace(np.cov(real, rowvar=False)))


@pytest.mark.parametrize("data", ["digits", "gaussian"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_package_exactly(data, k, request, capsys):
    real, fake = request.getfixturevalue(data)
    ref = prdc_pkg.compute_prdc(real, fake, k)
    ours = M.prdc(real, fake, k)
    assert ours == {key: float(value) for key, value in ref.items()}


def duplicates_float32():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    real[50:55] = real[0]  # duplicated reals: radius 0 balls contain nothing (strict <)
    fake = np.concatenate([rng.normal(size=(250, 16)), real[:20]]).astype(np.float32)
    return real, fake


def reference_prdc(real, fake, k):
    ref = prdc_pkg.compute_prdc(real.astype(np.float64), fake.astype(np.float64), k)
    return {key: float(value) for key, value in ref.items()}


@pytest.mark.parametrize("k", [1, 5])
def test_prdc_float32_and_duplicates_match_package(k, capsys):
    real, fake = duplicates_float32()
    assert M.prdc(real, fake, k) == reference_prdc(real, fake, k)


def far_from_origin():
    """float32 features whose norms dwarf their distances: the float32 screen cannot order neighbours."""
    rng = np.random.default_rng(2)
    offset = rng.normal(size=16) * 300
    return tuple((rng.normal(size=(n, 16)) + offset).astype(np.float32) for n in (200, 150))


@pytest.mark.parametrize("k", [1, 3])
def test_prdc_integer_and_float32_inputs_match_package(digits, gaussian, k, capsys):
    real, fake = digits
    assert M.prdc(real.astype(np.int64), fake.astype(np.uint8), k) == reference_prdc(real, fake, k)
    for real, fake in ([x.astype(np.float32) for x in gaussian], far_from_origin()):
        assert M.prdc(real, fake, k) == reference_prdc(real, fake, k)


def test_prdc_float64_is_not_rounded_to_float32(capsys):
    # fake 1 - 1e-12 lies inside the real ball of radius 1 around 0 only in float64
    real = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [10.0, 3.0]])
    fake = np.array([[1 - 1e-12, 0.0], [-20.0, 0.0], [-20.0, 5.0]])
    assert np.float32(fake[0, 0]) == 1.0
    ours = M.prdc(real, fake, 1)
    assert ours == reference_prdc(real, fake, 1)
    assert ours["precision"] == pytest.approx(1 / 3)


def test_prdc_does_not_depend_on_scale(capsys):
    real, fake = far_from_origin()
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    expected = reference_prdc(real, fake, 3)
    for scale in (2.0 ** 90, 2.0 ** -90):  # exact scalings, beyond float32's range for squared distances
        assert M.prdc(real * scale, fake * scale, 3) == expected


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [16, 256])
def test_screen_error_is_within_its_bound(dtype, d):
    rng = np.random.default_rng(d)
    x = (rng.normal(size=(80, d)) + rng.normal(size=d) * 50).astype(dtype)
    y = (rng.normal(size=(60, d)) * 3 + rng.normal(size=d) * 50).astype(dtype)
    sx, sy = M._ScreenedSet(x, np.float32, M._sqnorms(x)), M._ScreenedSet(y, np.float32, M._sqnorms(y))
    screened = sx.keys(0, 80, sy, 0, 60, np.empty(80 * 60, np.float32)) + sx.sqnorms_screen[:, None]
    exact = ((x[:, None].astype(np.float64) - y[None]) ** 2).sum(-1)
    error = np.abs(screened.astype(np.float64) - exact)
    tol = sx.tolerance(sx.sqnorms, sy.sqnorm_max)[:, None]
    assert (error <= tol).all()
    assert error.max() > 1e-4 * tol.max()  # the screen does round: the bound is exercised


@pytest.mark.parametrize("data", ["digits", "duplicates"])
def test_prdc_numpy_and_torch_paths_agree(data, request, monkeypatch):
    real, fake = request.getfixturevalue(data) if data == "digits" else duplicates_float32()
    numpy_values = M.prdc(real, fake, 3)

    def refuse(path):
        def fail(*args):
            raise AssertionError(f"this call must not take the {path} path")
        return fail

    with monkeypatch.context() as patch:  # CPU tensors: numpy, on the free .numpy() view
        patch.setattr(M, "_prdc_torch", refuse("torch"))
        assert M.prdc(torch.from_numpy(real), torch.from_numpy(fake), 3) == numpy_values
    monkeypatch.setattr(M, "_prdc_numpy", refuse("numpy"))  # an explicit backend: FeatureBank
    assert M.prdc(torch.from_numpy(real), torch.from_numpy(fake), 3, backend="torch") == numpy_values
    assert M.prdc(real, fake, 3, backend="torch") == numpy_values


@pytest.mark.parametrize("block_size, block_elements", [(1, 2 ** 22), (7, 35), (64, 64 * 9)])
def test_prdc_blocks_do_not_change_the_result(block_size, block_elements, monkeypatch, capsys):
    real, fake = duplicates_float32()
    sets = [(real[:130], fake[-110:]), far_from_origin()]  # duplicates, fakes equal to reals; near-ties
    monkeypatch.setattr(M, "PRDC_BLOCK_ELEMENTS", block_elements)  # tiles of block_size x (this / block_size)
    for real, fake in sets:
        for k in (1, 5):
            assert M.prdc(real, fake, k, block_size=block_size) == reference_prdc(real, fake, k)


def test_numpy_inputs_do_not_import_torch():
    code = ("import sys, numpy as np; import irs_callbacks.metrics as M; rng = np.random.default_rng(0); "
            "r, f = rng.normal(size=(60, 8)), rng.normal(size=(50, 8)).astype(np.float32); "
            "M.prdc(r, f, 3); M.compute_metrics(r, f, k=3, kid_subsets=2, kid_subset_size=20); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("data", ["digits", "gaussian"])
def test_vendi_matches_package(data, request):
    real, fake = request.getfixturevalue(data)
    for x in (real, fake):
        assert M.vendi(x) == pytest.approx(vendi_pkg.score_dual(x), rel=1e-6)
    assert M.vendi(np.repeat(real[:1], 50, axis=0)) == pytest.approx(1.0, rel=1e-9)


def test_kid_matches_direct_float64(gaussian):
    real, fake = gaussian
    mean, std = M.kid(real, fake, subsets=7, subset_size=120, seed=3)
    rng = np.random.default_rng(3)
    values = []
    d = real.shape[1]
    for _ in range(7):
        x = real[rng.choice(len(real), 120, replace=False)]
        y = fake[rng.choice(len(fake), 120, replace=False)]
        kern = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
        m = 120
        kxx, kyy, kxy = kern(x, x), kern(y, y), kern(x, y)
        values.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                      - 2 * kxy.mean())
    assert mean == pytest.approx(np.mean(values), rel=1e-10)
    assert std == pytest.approx(np.std(values), rel=1e-8)


def test_compute_metrics_entry_point(digits):
    real, fake = digits
    out = M.compute_metrics(real, fake, k=3, kid_subsets=5, kid_subset_size=100)
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall", "density", "coverage",
                        "vendi", "vendi_real"}
    assert out["precision"] == float(prdc_pkg.compute_prdc(real, fake, 3)["precision"])
    only = M.compute_metrics(torch.from_numpy(real), torch.from_numpy(fake), metrics=("recall",), k=3)
    assert only == {"recall": out["recall"]}


def test_input_validation():
    x = np.zeros((10, 4))
    with pytest.raises(ValueError, match="dimension"):
        M.compute_metrics(x, np.zeros((10, 5)))
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        M.fid(np.zeros(10), x)
    bad = np.ones((10, 4))
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.compute_metrics(x, bad, metrics=("fid",))
    with pytest.raises(ValueError, match="unknown metric"):
        M.compute_metrics(x, x, metrics=("is",))
    with pytest.raises(ValueError, match="real_features needs at least 6 rows"):
        M.prdc(np.random.rand(5, 3), np.random.rand(9, 3), k=5)


@pytest.mark.parametrize("to", [np.asarray, torch.from_numpy])
def test_prdc_input_errors_name_the_argument(to):
    x = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match=r"fake_features must have shape \[N, d\]"):
        M.prdc(to(x), to(x[None]), 3)
    with pytest.raises(ValueError, match="real_features have dimension 4 but fake_features have 3"):
        M.prdc(to(x), to(x[:, :3].copy()), 3)
    bad = x.copy()
    bad[2, 1], bad[7, 3] = np.inf, np.nan
    with pytest.raises(ValueError, match=r"real_features has 2 rows with NaN/inf \(first \[2, 7\]\)"):
        M.prdc(to(bad), to(x), 3)
    with pytest.raises(ValueError, match=r"fake_features needs at least 21 rows \(k \+ 1 for k = 20\), got 20"):
        M.prdc(to(np.concatenate([x, x])), to(x), 20)
    for k in (0, 2.5, None, "3"):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            M.prdc(to(x), to(x), k)
    with pytest.raises(ValueError, match="block_size must be an integer >= 1"):
        M.prdc(to(x), to(x), 3, block_size=0)
    with pytest.raises(TypeError, match="real_features must be"):
        M.prdc(x.tolist(), x, 3)
    with pytest.raises(TypeError, match="real numbers"):
        M.prdc(x > 0, x, 3)


def test_tensors_give_the_same_fid_kid_vendi(gaussian):
    real, fake = gaussian
    tensors = torch.from_numpy(real), torch.from_numpy(fake).float()
    assert M.fid(*tensors) == M.fid(real, fake.astype(np.float32))
    assert M.kid(*tensors, subsets=3, subset_size=50) == M.kid(real, fake.astype(np.float32), subsets=3, subset_size=50)
    assert M.vendi(tensors[0].to(torch.bfloat16)) == M.vendi(tensors[0].to(torch.bfloat16).float().numpy())


def _exact_kid_of_rows(x, y):
    """Unbiased MMD^2 with (a.b/d + 1)^3 in exact rational arithmetic (independent truth)."""
    from fractions import Fraction

    d, m = x.shape[1], x.shape[0]
    xs = [[Fraction(int(v)) for v in row] for row in x]
    ys = [[Fraction(int(v)) for v in row] for row in y]

    def k(a, b):
        return (sum(p * q for p, q in zip(a, b)) / d + 1) ** 3

    within = sum(k(a, b) for i, a in enumerate(xs) for j, b in enumerate(xs) if i != j)
    within += sum(k(a, b) for i, a in enumerate(ys) for j, b in enumerate(ys) if i != j)
    cross = sum(k(a, b) for a in xs for b in ys)
    return within / (m * (m - 1)) - 2 * cross / (m * m)


def test_kid_fid_vendi_at_any_feature_scale():
    """Integer features with a large common offset (random-Inception's raw features share one huge
    direction, norms ~1e8): KID equals the exact rational value, where the direct float64 sum loses
    it to cancellation; FID is homogeneous of degree 2 and shift-invariant; Vendi is scale-free."""
    rng = np.random.default_rng(0)
    small_r, small_f = rng.integers(-8, 9, size=(12, 3)), rng.integers(-8, 9, size=(12, 3))  # one distribution
    for scale, offset in ((1, 2 ** 40), (2 ** 30, 2 ** 45), (1, 0), (2 ** 20, -(2 ** 30))):
        real = small_r.astype(np.float64) * scale + offset
        fake = small_f.astype(np.float64) * scale + offset
        mean, std = M.kid(real, fake, subsets=1, subset_size=6, seed=5)
        pick = np.random.default_rng(5)
        rows_r, rows_f = pick.choice(12, 6, replace=False), pick.choice(12, 6, replace=False)
        exact = float(_exact_kid_of_rows(small_r[rows_r] * scale + offset, small_f[rows_f] * scale + offset))
        assert mean == pytest.approx(exact, rel=1e-6) and std == 0.0, (scale, offset)
        if (scale, offset) == (1, 2 ** 40):
            x, y, d = real[rows_r], fake[rows_f], 3
            naive = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
            kxx, kyy, kxy = naive(x, x), naive(y, y), naive(x, y)
            direct = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / 30 - 2 * kxy.mean()
            assert abs(direct - exact) > 0.5 * abs(exact)  # the direct sum loses it (here: 0.0)
    x, y = rng.normal(size=(300, 20)), rng.normal(size=(200, 20)) * 1.2 + 0.3
    base_fid, base_vendi = M.fid(x, y), M.vendi(x)
    for scale in (1e-150, 1e-3, 1e8, 1e150):
        shift = 7.0 * scale
        assert M.fid(x * scale + shift, y * scale + shift) / scale ** 2 == pytest.approx(base_fid, rel=1e-9)
        assert M.vendi(x * scale) == pytest.approx(base_vendi, rel=1e-9)
    assert np.isfinite(M.kid(x * 1e8, y * 1e8, subsets=3)[0])
