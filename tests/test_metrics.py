"""Metrics against reference packages (torchmetrics, prdc, vendi-score) and direct float64 sums."""

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


def test_prdc_float32_and_duplicates_match_package():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    real[50:55] = real[0]  # duplicated reals: radius 0 balls contain nothing (strict <)
    fake = np.concatenate([rng.normal(size=(250, 16)), real[:20]]).astype(np.float32)
    ref = prdc_pkg.compute_prdc(real.astype(np.float64), fake.astype(np.float64), 5)
    assert M.prdc(real, fake, 5) == {key: float(value) for key, value in ref.items()}


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
    with pytest.raises(ValueError, match="at least 6 rows"):
        M.prdc(np.random.rand(5, 3), np.random.rand(9, 3), k=5)
