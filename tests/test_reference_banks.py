"""ReferenceBank set-up: one cached retrieval bank per arguments, the split measured on it,
streamed safetensors files and shard reads."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from irs_callbacks import retrieval
from irs_callbacks.reference import ReferenceBank, split_for_real
from irs_callbacks.stats import irs_infinity


def features(n=300, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[n - 3:] = x[:3]  # 3 exact duplicates
    return x


def brute_nearest(bank, queries):
    return (queries.double()[:, None] - bank.double()[None]).square().sum(-1).argmin(1)


def test_bank_is_built_once_and_reused(monkeypatch):
    built = []
    original = retrieval.FeatureBank._prepare_screen
    monkeypatch.setattr(retrieval.FeatureBank, "_prepare_screen",
                        lambda self, *args: built.append(self) or original(self, *args))
    ref = ReferenceBank.from_features(features(), seed=1)
    assert len(built) == 1  # the real-data measurement and the duplicate count share one bank
    assert ref.duplicate_count == 3 and ref.metadata["duplicate_count"] == 3
    default = retrieval.resolve_screen_dtype(None, "cpu")
    assert ref.bank() is ref.bank(device="cpu") is ref.bank(screen_dtype=default) is built[0]
    ref.score(features(40, seed=2))
    assert len(built) == 1  # scoring reuses it too
    half = ref.bank(screen_dtype="float16")  # (never the CPU default)
    assert half is not built[0] and half is ref.bank(screen_dtype=torch.float16) and len(built) == 2
    assert half.features.data_ptr() == ref.features.data_ptr()  # the master is shared, never copied
    ref.clear_banks()
    assert ref.bank() is not built[0]


def test_split_is_measured_on_the_full_bank_restricted_to_its_bank_half():
    x = features()
    ref = ReferenceBank.from_features(x, seed=4)
    bank_idx, query_idx = split_for_real(len(x), 4)
    truth = bank_idx[brute_nearest(x[bank_idx], x[query_idx])]  # training indices
    assert torch.equal(ref.real_nearest, truth)
    assert ref.real == irs_infinity(int(torch.unique(truth).numel()), len(query_idx), len(bank_idx))
    assert ref.metadata["real_measurement"]["n_bank"] == len(bank_idx)


def test_streamed_file_reads_back_with_safetensors_and_by_rows(tmp_path):
    x = features(257, 24)
    ref = ReferenceBank.from_features(x, seed=0, metadata={"note": "streamed"})
    path = ref.save(tmp_path / "bank.safetensors")
    tensors = load_file(str(path))  # safetensors' own reader
    assert torch.equal(tensors["features"], x) and torch.equal(tensors["real_nearest"], ref.real_nearest)
    loaded = ReferenceBank.load(path)
    assert torch.equal(loaded.features, x) and loaded.real == ref.real and loaded.duplicate_count == 3
    assert loaded.metadata["note"] == "streamed"
    assert torch.equal(ReferenceBank.read_features(path, rows=slice(100, 180)), x[100:180])
    assert torch.equal(ReferenceBank.read_features(path), x)
    with pytest.raises(ValueError, match="contiguous slice"):
        ReferenceBank.read_features(path, rows=slice(0, 10, 2))


def test_non_finite_training_rows_are_named_and_sharded_needs_a_process_group():
    x = features(50, 8)
    x[7, 2] = float("nan")
    x[9] = 3e38  # finite: a row sum overflows, the exact check clears it
    with pytest.raises(ValueError, match=r"1 of 50 training features are not finite .*\[7\]"):
        ReferenceBank(x)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        ReferenceBank(features(50, 8)).bank(sharded=True)


def test_numpy_features_and_lazy_duplicate_count():
    x = features(80, 6).numpy().astype(np.float64)
    ref = ReferenceBank(x)
    assert "duplicate_count" not in ref.metadata
    assert ref.duplicate_count == 3 and ref.metadata["duplicate_count"] == 3


def test_unmeasured_bank_counts_duplicates_with_the_bank_it_keeps_for_scoring(monkeypatch):
    built = []
    original = retrieval.FeatureBank._prepare_screen
    monkeypatch.setattr(retrieval.FeatureBank, "_prepare_screen",
                        lambda self, *args: built.append(self) or original(self, *args))
    ref = ReferenceBank.from_features(features(), measure=False, device="cpu")
    assert ref.real is None and ref.metadata["duplicate_count"] == 3 and len(built) == 1
    assert ref.bank(device="cpu") is built[0]


def test_invalid_held_out_queries_count_for_nothing():
    """A held-out reference with NaN rows measures exactly what the same reference without them does."""
    x = features(300, 16)
    held = torch.randn(120, 16, generator=torch.Generator().manual_seed(5))
    with_nan = torch.cat([held[:50], torch.full((10, 16), float("nan")), held[50:]])
    clean = ReferenceBank.from_features(x, reference_features=held)
    dirty = ReferenceBank.from_features(x, reference_features=with_nan)
    truth = brute_nearest(x, held)
    assert clean.real == irs_infinity(int(torch.unique(truth).numel()), 120, 300)
    assert dirty.real == clean.real and dirty.real.n_samples == 120
    assert dirty.metadata["real_measurement"]["n_invalid"] == 10
    assert dirty.real_at(100) == clean.real_at(100) != clean.real  # subsets of the 120 valid queries
    assert dirty.real_at(119) == clean.real_at(119) and dirty.real_at(120) == clean.real
