"""Acceptance on real data with the default extractor (random-inception, at 75 px for speed):
sklearn's digits, features extracted once for the module.

- FID, KID and Vendi are sane numbers: held-out real digits are close to the training set, a
  2-class subset is clearly not; KID of the held-out set is within its standard deviation of 0;
  every value finite and below 1e6 (raw random-Inception features have norms around 1e8, which
  gave FID 1e14 and KID -1e37 before the calibration and the scale-safe metrics).
- Held-out real digits score IRS_inf,a about 1 whatever the sizes of the real reference set and
  of the sample set, because both sides are compared at one sampling rate.
"""

import numpy as np
import pytest
import torch

from irs_callbacks import metrics as M
from irs_callbacks.features import extract_features, get_extractor
from irs_callbacks.reference import ReferenceBank

N_TRAIN = 1200  # of the 1,797 digits; the other 597 are held out


@pytest.fixture(scope="module")
def digits_features():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy((data.images / 16 * 255).round().astype(np.uint8)).unsqueeze(1)
    extractor = get_extractor("random-inception", input_size=75, device="cpu")
    return extract_features(extractor, images, batch_size=128, progress=False), data.target


def split(seed):
    order = np.random.default_rng(seed).permutation(1797)
    return order[:N_TRAIN], order[N_TRAIN:]


def test_fid_kid_vendi_are_sane_with_the_default_extractor(digits_features):
    features, labels = digits_features
    assert float(features.norm(dim=1).median()) < 1e3  # calibrated (raw: ~5e8)
    train, held = split(0)
    two_classes = held[np.isin(labels[held], [0, 1])]
    f = features.numpy()
    held_m = M.compute_metrics(f[train], f[held], metrics=("fid", "kid", "vendi"))
    two_m = M.compute_metrics(f[train], f[two_classes], metrics=("fid", "kid", "vendi"))
    for values in (held_m, two_m):
        assert all(np.isfinite(v) and abs(v) < 1e6 for v in values.values()), values
    assert held_m["fid"] < 10 and two_m["fid"] > 4 * held_m["fid"]
    assert held_m["kid_mean"] >= -held_m["kid_std"]  # same distribution: within its noise of 0, or positive
    assert two_m["kid_mean"] > max(held_m["kid_mean"], 0) + 3 * held_m["kid_std"]
    assert two_m["vendi"] < held_m["vendi"]


CONFIGS = [(n_reference, n_samples) for n_reference in (300, 500, None) for n_samples in (200, 300, 400, 497)]


def test_held_out_real_digits_score_about_1_whatever_the_set_sizes(digits_features):
    """Reference sets of 300, 500 and all 597 held-out images, sample sets of 200 to 497 held-out
    images (the last ones of the held-out order; they overlap the larger reference sets). One draw
    of 200 samples has a standard deviation of about 0.25 here (a coupon-collector estimate from a
    few dozen repeats), so the criterion [0.85, 1.15] is applied to the mean over 20 seeded
    train / held-out splits: no systematic dependence on the set sizes. Each score says how the
    two sides were brought to one alpha."""
    features, _ = digits_features
    scores = {config: [] for config in CONFIGS}
    for seed in range(20):
        train, held = split(seed)
        for n_reference in (300, 500, None):
            reference = held if n_reference is None else held[:n_reference]
            bank = ReferenceBank.from_features(features[train], reference_features=features[reference])
            for n_samples in (200, 300, 400, 497):
                result = bank.score(features[held[-n_samples:]])
                expected = ("equal" if len(reference) == n_samples else
                            "real-subsampled" if n_samples < len(reference) else "samples-subsampled")
                assert result.alpha_matching == expected
                assert result.matched_alpha == pytest.approx(min(n_samples, len(reference)) / N_TRAIN)
                scores[(n_reference, n_samples)].append(result.adjusted)
    means = {config: float(np.mean(values)) for config, values in scores.items()}
    assert all(0.85 <= mean <= 1.15 for mean in means.values()), means
