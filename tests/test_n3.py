"""N3 rejection sampler (Algorithm 1) against a brute-force reading of the algorithm."""

import numpy as np
import pytest
import torch

from diadm.n3 import N3RejectionSampler


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    """A tiny deterministic extractor: 2x2 average pooling of the 3 channels -> 12-d."""
    return torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)


def noise_images(batch_size, generators):
    """One 3x8x8 image per generator, in [0, 1]: each image depends on its own seed only."""
    return torch.stack([torch.rand(3, 8, 8, generator=g) for g in generators])


def brute_force_best_seeds(train: np.ndarray, samples: np.ndarray, seeds: list[int]) -> np.ndarray:
    """Per training image, the seed with the highest cosine similarity among the samples whose
    nearest training image it is (nearest: highest similarity, lowest index on ties; best: lowest
    seed on ties); -1 where no sample chose it."""
    t = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = samples / np.linalg.norm(samples, axis=1, keepdims=True)
    sim = q.astype(np.float64) @ t.T.astype(np.float64)
    nearest = sim.argmax(axis=1)
    best = np.full(len(train), -1)
    best_sim = np.full(len(train), -np.inf)
    for i in np.argsort(seeds, kind="stable"):
        j = nearest[i]
        if sim[i, j] > best_sim[j]:
            best_sim[j], best[j] = sim[i, j], seeds[i]
    return best


@pytest.fixture()
def train_features():
    g = torch.Generator().manual_seed(0)
    return pooled_features(torch.rand(25, 3, 8, 8, generator=g))


def test_update_matches_brute_force_with_ties_and_batches(train_features):
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(300, 12)).astype(np.float32)
    samples[50:60] = samples[40:50]  # exact duplicates: ties between seeds
    samples[100:103] = train_features[3].numpy()  # exact matches of a training image
    seeds = list(range(1000, 1300))
    n3 = N3RejectionSampler(train_features, extractor=pooled_features, device="cpu", backend="torch")
    for start in range(0, 300, 37):  # uneven batches
        n3.update(torch.tensor(seeds[start : start + 37]), torch.from_numpy(samples[start : start + 37]))
    expected = brute_force_best_seeds(train_features.numpy(), samples, seeds)
    assert torch.equal(n3.result().best_seed, torch.from_numpy(expected))
    assert n3.result().best_seed[3].item() == 1100  # the first exact match wins
    accepted = n3.result().accepted_seeds
    assert len(accepted) == len(set(accepted.tolist())) == (expected >= 0).sum()


def test_every_training_image_keeps_at_most_one_seed_and_it_is_nearest(train_features):
    n3 = N3RejectionSampler(train_features, extractor=pooled_features, device="cpu")
    result = n3.run(noise_images, range(400), batch_size=64, progress=False)
    assert result.samples_seen == 400 and result.n_invalid == 0
    assert 0 < result.covered <= len(train_features)
    covered = torch.nonzero(result.best_seed >= 0).flatten()
    images = n3.regenerate(noise_images, result.best_seed[covered].tolist())
    nearest, _ = n3.bank.search(pooled_features(images))
    assert torch.equal(nearest.cpu(), covered)  # each accepted sample lies in its own region
    assert result.acceptance_rate == result.covered / 400


def test_resume_after_interruption_gives_the_same_accepted_set(train_features, tmp_path):
    seeds = range(7, 207)
    uninterrupted = N3RejectionSampler(train_features, extractor=pooled_features).run(
        noise_images, seeds, batch_size=32, progress=False
    )

    calls = {"n": 0}

    def crashing(batch_size, generators):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return noise_images(batch_size, generators)

    first = N3RejectionSampler(train_features, extractor=pooled_features)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.run(crashing, seeds, batch_size=32, checkpoint=tmp_path / "n3", progress=False)
    resumed = N3RejectionSampler(train_features, extractor=pooled_features).load(tmp_path / "n3")
    assert resumed.position == 96
    result = resumed.run(noise_images, seeds, batch_size=32, checkpoint=tmp_path / "n3", progress=False)
    assert torch.equal(result.accepted_seeds, uninterrupted.accepted_seeds)
    assert torch.equal(result.best_seed, uninterrupted.best_seed)
    with pytest.raises(ValueError, match="seeds differ"):
        resumed.run(noise_images, range(300), progress=False)


def test_non_finite_samples_are_counted_not_accepted(train_features):
    def some_nan(batch_size, generators):
        images = noise_images(batch_size, generators)
        images[::4] = float("nan")
        return images

    result = N3RejectionSampler(train_features, extractor=pooled_features).run(some_nan, range(64), batch_size=16, progress=False)
    assert result.n_invalid == 16
    assert not set(result.accepted_seeds.tolist()) & set(range(0, 64, 4))


def test_bad_input(train_features):
    with pytest.raises(ValueError, match="train_features"):
        N3RejectionSampler(torch.zeros(0, 12), extractor=pooled_features)
    n3 = N3RejectionSampler(train_features, extractor=pooled_features)
    with pytest.raises(ValueError, match="seeds"):
        n3.run(noise_images, [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        n3.run(noise_images, range(4), batch_size=0, progress=False)
