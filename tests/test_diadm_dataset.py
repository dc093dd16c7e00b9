"""PseudoLabelDataset: features computed once with the registry, cached as a reference bank."""

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from irs_callbacks.features import extract_features, get_extractor

from diadm.dataset import PseudoLabelDataset


class _Pool(nn.Module):
    """A tiny deterministic custom extractor: 4x4 average-pooled pixels (48-d)."""

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _images(n=12, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_features_match_extractor_and_items_pair_up():
    images = _images()
    data = TensorDataset(images, torch.arange(len(images)))
    ds = PseudoLabelDataset(data, _Pool(), device="cpu", progress=False)
    expected = extract_features(get_extractor(_Pool(), device="cpu"), images, progress=False)
    assert ds.feature_dim == 48 and len(ds) == 12
    torch.testing.assert_close(ds.features, expected)
    item = ds[5]
    assert torch.equal(item["image"], images[5]) and item["index"] == 5
    torch.testing.assert_close(item["features"], expected[5])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["features"].shape == (4, 48)
    # the centre of the conditions: the float64 mean, computed once
    assert ds.feature_mean.dtype == torch.float32
    torch.testing.assert_close(ds.feature_mean, expected.double().mean(0).float(), rtol=0, atol=0)
    assert ds.feature_mean is ds.feature_mean


def test_bank_file_round_trip_and_mismatch_refused(tmp_path):
    images = _images()
    path = tmp_path / "labels.safetensors"
    first = PseudoLabelDataset(TensorDataset(images), _Pool(), bank_path=path, device="cpu", progress=False)
    assert path.is_file()
    again = PseudoLabelDataset(TensorDataset(images), _Pool(), bank_path=path, device="cpu", progress=False)
    assert torch.equal(again.features, first.features)
    assert again.bank.metadata["train_fingerprint"] == first.bank.metadata["train_fingerprint"]
    changed = images.clone()
    changed[3, 0, 0, 0] += 0.5
    with pytest.raises(ValueError, match="train_fingerprint"):
        PseudoLabelDataset(TensorDataset(changed), _Pool(), bank_path=path, device="cpu", progress=False)
    with pytest.raises(ValueError, match="n_train"):
        PseudoLabelDataset(TensorDataset(images[:10]), _Pool(), bank_path=path, device="cpu", progress=False)

    class Other(_Pool):
        pass

    with pytest.raises(ValueError, match="extractor"):
        PseudoLabelDataset(TensorDataset(images), Other(), bank_path=path, device="cpu", progress=False)


def test_feature_source_for_augmented_datasets():
    images = _images()

    class Flipping(Dataset):  # random augmentation: features must come from the clean view
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"pixel_values": images[i].flip(-1) * 2 - 1}

    ds = PseudoLabelDataset(Flipping(), _Pool(), feature_source=images, device="cpu", progress=False)
    torch.testing.assert_close(ds.features, _Pool()(images))
    assert torch.equal(ds[0]["image"], images[0].flip(-1) * 2 - 1)
    with pytest.raises(ValueError, match="feature_source"):
        PseudoLabelDataset(Flipping(), _Pool(), feature_source=images[:3], device="cpu", progress=False)


def test_value_range_is_declared_never_assumed():
    """diffusers data is usually [-1, 1]: under the default (0, 1) it is an error naming the fix, and
    with value_range=(-1, 1) the features are those of the same images in [0, 1]."""
    images = _images()
    signed = images * 2 - 1
    with pytest.raises(ValueError, match=r"values in \[-0.99\d+, 0.99\d+\].*pass value_range=\(-1, 1\)"):
        PseudoLabelDataset(TensorDataset(signed), _Pool(), device="cpu", progress=False)
    ds = PseudoLabelDataset(TensorDataset(signed), _Pool(), value_range=(-1, 1), device="cpu", progress=False)
    unit = PseudoLabelDataset(TensorDataset(images), _Pool(), device="cpu", progress=False)
    torch.testing.assert_close(ds.features, unit.features)
    with pytest.raises(ValueError, match="value_range"):
        PseudoLabelDataset(TensorDataset(images), _Pool(), value_range=(1, -1), device="cpu", progress=False)
