"""Reference banks: real-data measurement, sources, file round trip, cache, mismatch refusal."""

import json

import numpy as np
import pytest
import torch

from irs_callbacks import reference as reference_module
from irs_callbacks.features import get_extractor
from irs_callbacks.reference import ReferenceBank, measure_real, split_for_real, subsampled_learned
from irs_callbacks.stats import adjusted_irs, irs_infinity, ml_diversity

def brute_force_nn(bank, queries, distance="euclidean"):
    """Independent truth: exact nearest neighbour in float64 (lowest index on ties), -1 for NaN rows."""
    b, q = torch.as_tensor(bank).double(), torch.as_tensor(queries).double()
    if distance == "cosine":
        b, q = b / b.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    d = ((q[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    dist, idx = d.min(dim=1)
    bad = ~torch.isfinite(q).all(dim=1)
    idx[bad], dist[bad] = -1, float("nan")
    return idx, dist


def distinct(idx):
    return len(set(int(i) for i in idx if i >= 0))


PIXELS = dict(input_size=8, custom_name="pixels")


def pixels():
    return get_extractor(lambda x: x.flatten(1), device="cpu", **PIXELS)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy((data.images / 16 * 255).round().astype(np.uint8)).unsqueeze(1)
    return images, torch.from_numpy(data.target)


def test_split_for_real_follows_the_papers_rule():
    bank, queries = split_for_real(11, seed=3)
    assert len(bank) == 6 and len(queries) == 5
    assert sorted(torch.cat([bank, queries]).tolist()) == list(range(11))
    again = split_for_real(11, seed=3)
    assert torch.equal(again[0], bank) and torch.equal(again[1], queries)
    big_bank, big_queries = split_for_real(120_000)
    assert len(big_queries) == 50_000 and len(big_bank) == 70_000
    with pytest.raises(ValueError):
        split_for_real(1)


def test_real_measurement_matches_brute_force(digits):
    images, _ = digits
    feats = images[:300].flatten(1).float()
    real, info = measure_real(feats, seed=5)
    bank_idx, query_idx = split_for_real(300, seed=5)
    idx, _ = brute_force_nn(feats[bank_idx], feats[query_idx])
    assert info["method"] == "split" and info["n_queries"] == 150 and info["n_bank"] == 150
    assert real == irs_infinity(distinct(idx), 150, 150)
    # held-out reference: queries against the full training set
    held = images[300:400].flatten(1).float()
    real_held, info_held = measure_real(feats, held, distance="cosine")
    idx, _ = brute_force_nn(feats, held, "cosine")
    assert info_held["method"] == "held-out"
    assert real_held == irs_infinity(distinct(idx), 100, 300)


def test_build_from_tensor_folder_and_arrays_agree(tmp_path, digits):
    from PIL import Image

    images, _ = digits
    train = images[:40]
    folder = tmp_path / "train"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(train):  # recursive, sorted by relative path
        where = folder / "sub" if i >= 30 else folder
        Image.fromarray(image[0].numpy()).save(where / f"{i:03d}.png")
    np.save(tmp_path / "train.npy", train.permute(0, 2, 3, 1).numpy())  # NHWC
    np.savez(tmp_path / "train.npz", images=train.numpy())
    banks = [ReferenceBank.build(source, extractor=pixels(), progress=False)
             for source in (train, folder, tmp_path / "train.npy", tmp_path / "train.npz", train.numpy())]
    for bank in banks:
        assert bank.n_train == 40 and bank.dim == 192
        torch.testing.assert_close(bank.features, banks[0].features)
        assert bank.real == banks[0].real and bank.real is not None
        assert len(bank.metadata["train_fingerprint"]) == 64
    # pixel features of a grey image: the same value in all three channels, scaled to [0, 1]
    for channel in range(3):
        torch.testing.assert_close(banks[0].features.view(40, 3, 64)[:, channel], train.flatten(1).float() / 255)


def test_bad_sources_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        ReferenceBank.build(tmp_path / "empty", extractor=pixels())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="a.png"):
        ReferenceBank.build(broken, extractor=pixels(), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        ReferenceBank.build(tmp_path / "nowhere", extractor=pixels())
    np.save(tmp_path / "flat.npy", np.zeros((5, 7)))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        ReferenceBank.build(tmp_path / "flat.npy", extractor=pixels())
    with pytest.raises(ValueError, match="distance"):
        ReferenceBank.build(torch.zeros(4, 1, 8, 8), extractor=pixels(), distance="manhattan")
    nan_train = torch.rand(6, 1, 8, 8)
    nan_train[2, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        ReferenceBank.build(nan_train, extractor=pixels(), progress=False)


def test_save_load_round_trip_and_mismatch_refusal(tmp_path, digits):
    images, _ = digits
    bank = ReferenceBank.build(images[:60], reference=images[60:90], extractor=pixels(), progress=False)
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = ReferenceBank.load(path, expect={"extractor": pixels().identity, "distance": "euclidean"})
    assert torch.equal(loaded.features, bank.features)
    assert loaded.real == bank.real and loaded.metadata == bank.metadata
    assert loaded.metadata["real_measurement"]["method"] == "held-out"
    assert loaded.metadata["library_version"] and loaded.metadata["n_train"] == 60
    with pytest.raises(ValueError) as info:
        ReferenceBank.load(path, expect={"extractor": {**pixels().identity, "input_size": [9, 9]},
                                         "distance": "cosine"})
    message = str(info.value)
    assert "extractor.input_size" in message and "distance" in message and "cosine" in message
    # a safetensors file that is not a bank, and a file that is not safetensors at all
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an IRS reference bank"):
        ReferenceBank.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 30)
    with pytest.raises(ValueError, match="not a safetensors"):
        ReferenceBank.load(tmp_path / "junk.safetensors")
    # the metadata is plain JSON in the safetensors header
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["irs_reference"])["dim"] == 192


def test_cache_is_reused_only_for_the_same_images_and_extractor(tmp_path, digits, monkeypatch):
    images, _ = digits
    first = ReferenceBank.build(images[:50], extractor=pixels(), cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 1

    def no_extraction(*args, **kwargs):
        raise AssertionError("features extracted although a matching cache exists")

    monkeypatch.setattr(reference_module, "extract_features", no_extraction)
    second = ReferenceBank.build(images[:50], extractor=pixels(), cache_dir=tmp_path, progress=False)
    assert torch.equal(second.features, first.features) and second.real == first.real
    monkeypatch.undo()
    changed = images[:50].clone()
    changed[0, 0, 0, 0] ^= 1  # one pixel differs -> new fingerprint, new cache entry
    ReferenceBank.build(changed, extractor=pixels(), cache_dir=tmp_path, progress=False)
    other_size = get_extractor(lambda x: x.flatten(1), input_size=4, custom_name="pixels")
    ReferenceBank.build(images[:50], extractor=other_size, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 3


def test_duplicates_are_counted_and_scores_match_brute_force(digits):
    images, _ = digits
    train = torch.cat([images[:30], images[:3]])  # 3 exact duplicates
    bank = ReferenceBank.build(train, extractor=pixels(), progress=False)
    assert bank.duplicate_count == 3 and bank.metadata["duplicate_count"] == 3
    samples = images[100:130].float() / 255
    samples[4] = float("nan")
    feats = pixels()(samples)
    result = bank.score(feats)
    idx, _ = brute_force_nn(bank.features, feats)
    assert result.n_samples == 30 and result.n_invalid == 1 and result.n_learned == distinct(idx)
    assert result.irs_alpha == distinct(idx) / 33
    assert result.irs_inf == irs_infinity(distinct(idx), 29, 33)  # from the 29 valid samples
    # real: 16 split queries against a 17-image bank, taken at the valid samples' alpha: 15 of them
    assert result.real == bank.real_at(29) and result.real.n_samples == 15 and result.real.n_train == 17
    assert result.alpha_matching == "real-subsampled" and result.synthetic_matched == result.irs_inf
    assert result.adjusted == pytest.approx(adjusted_irs(result.irs_inf, bank.real_at(29)))
    assert result.as_dict()["irs_inf"]["n_learned"] == distinct(idx)
    assert result == bank.score_indices(idx)  # search + score_indices
    with pytest.raises(ValueError, match="dimension"):
        bank.score(torch.zeros(3, 5))


def test_dataset_and_loader_sources_are_fingerprinted(digits):
    images, labels = digits
    dataset = torch.utils.data.TensorDataset(images[:20], labels[:20])
    from_dataset = ReferenceBank.build(dataset, extractor=pixels(), progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7)
    from_loader = ReferenceBank.build(loader, extractor=pixels(), progress=False)
    from_tensor = ReferenceBank.build(images[:20], extractor=pixels(), progress=False)
    assert torch.equal(from_dataset.features, from_tensor.features)
    assert torch.equal(from_loader.features, from_tensor.features)
    assert from_dataset.metadata["train_fingerprint"] == from_loader.metadata["train_fingerprint"]
    assert len(from_dataset.metadata["train_fingerprint"]) == 64


def test_real_reference_is_taken_at_the_samples_sampling_rate(digits, tmp_path):
    """IRS_inf(real) is re-estimated from as many real queries as give the synthetic alpha."""
    images, _ = digits
    bank = ReferenceBank.build(images[:400], extractor=pixels(), progress=False)  # split: 200 vs 200
    nearest = bank.real_nearest
    assert nearest.shape == (200,) and bank.real.n_samples == 200 and bank.real.n_train == 200
    assert bank.real.n_learned == torch.unique(nearest).numel()
    small = bank.real_at(100)  # alpha = 100/400 -> 50 queries against the 200-image bank
    assert (small.n_samples, small.n_train) == (50, 200)
    assert 0 < small.lower <= small.estimate <= small.upper <= 1
    assert small == bank.real_at(100) == bank.real_at(99)  # deterministic, one value per subset size
    # n_learned and bounds: those of the exact mean N_learned of all 50-query subsets; estimate: the
    # mean ML estimate over subsets (checked against 3,000 independent random subsets)
    counts = torch.bincount(nearest).numpy()
    typical = irs_infinity(round(subsampled_learned(counts, 200, 50)), 50, 200)
    assert (small.n_learned, small.lower, small.upper) == (typical.n_learned, typical.lower, typical.upper)
    rng = np.random.default_rng(1234)
    ks = [len(set(nearest[rng.permutation(200)[:50]].tolist())) for _ in range(3000)]
    assert abs(np.mean(ks) - subsampled_learned(counts, 200, 50)) < 0.15  # sd of the mean of 3,000: ~0.04
    mean_estimate = np.mean([ml_diversity(k, 50, 200) / 200 for k in ks])
    assert small.estimate == pytest.approx(mean_estimate, rel=0.05)  # 32 subsets: within a few percent
    assert bank.real_at(400) == bank.real  # all queries needed: the full measurement
    bank.save(tmp_path / "b.safetensors")
    loaded = ReferenceBank.load(tmp_path / "b.safetensors")
    assert torch.equal(loaded.real_nearest, nearest) and loaded.real_at(100) == small
    with pytest.raises(ValueError, match="n_samples"):
        bank.real_at(0)


def test_subsampled_learned_is_the_exact_mean_over_every_subset():
    """Independent truth: enumerate all C(n, m) subsets of a small list of draws."""
    import itertools

    draws = [0, 0, 0, 1, 1, 2, 3, -1, 5, 5]  # value -> count; -1 is a draw that retrieved nothing
    counts = np.bincount([d for d in draws if d >= 0])
    for m in range(0, len(draws) + 1):
        subsets = list(itertools.combinations(draws, m))
        mean = np.mean([len({d for d in sub if d >= 0}) for sub in subsets])
        assert subsampled_learned(counts, len(draws), m) == pytest.approx(mean, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="m <= n"):
        subsampled_learned(counts, 10, 11)


def _simulated_retrievals(rng, n, probabilities):
    return rng.choice(len(probabilities), size=n, p=probabilities)


def test_adjusted_scores_compare_real_and_samples_at_one_alpha():
    """Real data and 'samples' retrieve from the same non-uniform distribution over training images
    (a few often, many rarely: IRS_inf then grows with alpha, as on real data, paper Table 4), at
    very different set sizes. Compared at one alpha they score about 1 whatever the sizes; the real
    value taken at its own alpha (what happens without matching) is far off."""
    n_train = 4000
    weights = 1.0 / np.arange(1, 2501) ** 0.8  # 2,500 producible images, Zipf-like
    p = np.zeros(n_train)
    p[np.random.default_rng(99).permutation(n_train)[:2500]] = weights / weights.sum()
    rng = np.random.default_rng(0)
    features = torch.zeros(n_train, 1)  # the bank's features are not used by score_indices
    for n_real, n_samples, matching in ((400, 3600, "samples-subsampled"), (3600, 400, "real-subsampled"),
                                        (1000, 1000, "equal")):
        adjusted, unmatched = [], []
        for _ in range(20):
            real_idx = _simulated_retrievals(rng, n_real, p)
            real = irs_infinity(len(set(real_idx.tolist())), n_real, n_train)
            bank = ReferenceBank(features, real=real, real_nearest=torch.from_numpy(real_idx),
                                 metadata={"duplicate_count": 0})
            result = bank.score_indices(_simulated_retrievals(rng, n_samples, p))
            assert result.alpha_matching == matching
            m = min(n_real, n_samples)
            assert result.matched_alpha == pytest.approx(m / n_train)
            assert result.real.n_samples == m and result.synthetic_matched.n_samples == m
            adjusted.append(result.adjusted)
            unmatched.append(result.irs_inf.estimate / real.estimate)
        assert 0.95 < np.mean(adjusted) < 1.05, (n_real, n_samples, np.mean(adjusted))
        if matching != "equal":
            assert abs(np.mean(unmatched) - 1) > 0.2  # what comparing at different alphas gives here


def test_score_indices_checks_its_input_and_is_cheap_to_repeat(digits):
    images, _ = digits
    bank = ReferenceBank.build(images[:400], extractor=pixels(), reference=images[400:500], progress=False)
    rows = torch.tensor([3, 3, 7, -1, 12, 399])
    result = bank.score_indices(rows)
    assert (result.n_samples, result.n_invalid, result.n_learned) == (6, 1, 4)
    assert result.irs_inf == irs_infinity(4, 5, 400) and result.alpha_matching == "real-subsampled"
    assert result == bank.score_indices(rows.numpy()) == bank.score_indices(rows.to(torch.int32))
    for bad, message in ((torch.tensor([[1, 2]]), "1-D integer"), (torch.tensor([0.5]), "1-D integer"),
                         (torch.tensor([400]), "valid rows are 0..399"), (torch.tensor([-2]), "-1 marks")):
        with pytest.raises(ValueError, match=message):
            bank.score_indices(bad)
    everything_invalid = bank.score_indices(torch.full((5,), -1))
    assert everything_invalid.irs_inf is None and everything_invalid.adjusted == 0.0
    assert everything_invalid.n_invalid == 5


def test_score_searches_the_samples_as_given_and_marks_invalid_rows(monkeypatch):
    g = torch.Generator().manual_seed(11)
    ref = ReferenceBank.from_features(torch.randn(200, 16, generator=g), seed=0)
    samples = torch.randn(50, 16, generator=g, dtype=torch.float64)
    samples[3, 1] = float("nan")
    samples[7, 0] = 1e300  # finite in float64, inf once rounded to float32 like the bank: invalid
    bank, seen = ref.bank(), []
    search = bank.search
    monkeypatch.setattr(bank, "search", lambda queries, **kw: seen.append(queries) or search(queries, **kw))
    result = ref.score(samples)
    truth, _ = brute_force_nn(ref.features, samples.float())
    assert truth[[3, 7]].tolist() == [-1, -1]
    assert result == ref.score_indices(truth) and result.n_invalid == 2 and result.n_samples == 50
    as_stored = samples.float()
    ref.score(as_stored)
    assert seen[-1].data_ptr() == as_stored.data_ptr()  # float32 on the bank's device: searched without a copy
