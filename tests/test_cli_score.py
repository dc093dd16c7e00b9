"""`irs score` and `irs reference build` end to end on small folders of digit PNGs."""

import json

import numpy as np
import pytest
import torch

from irs_callbacks.cli import main
from irs_callbacks.stats import adjusted_irs, irs_infinity

FAST = ["--input-size", "75", "--no-progress"]  # default extractor (random-inception), tiny input


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits

    images = (load_digits().images / 16 * 255).round().astype(np.uint8)
    root = tmp_path_factory.mktemp("digits")
    for name, part in (("train", images[:40]), ("samples", images[40:52])):
        (root / name).mkdir()
        for i, image in enumerate(part):
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def reuse_extractors(monkeypatch):
    """Build each extractor once per module (the CLI builds one per call; this only saves time)."""
    from irs_callbacks import features

    build = features.get_extractor

    def memo(name=features.DEFAULT_EXTRACTOR, **kwargs):
        if not isinstance(name, str):
            return build(name, **kwargs)
        key = (name, repr(sorted(kwargs.items())))
        if key not in _EXTRACTORS:
            _EXTRACTORS[key] = build(name, **kwargs)
        return _EXTRACTORS[key]

    monkeypatch.setattr(features, "get_extractor", memo)


_EXTRACTORS = {}


def run_ok(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out


def run_fails(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "error:" in err and "Traceback" not in err
    return err


def test_score_folders_prints_and_writes_consistent_numbers(folders, tmp_path, capsys):
    out_json = tmp_path / "score.json"
    out = run_ok(["score", str(folders / "train"), str(folders / "samples"), *FAST, "--json", str(out_json),
                  "--cache-dir", str(tmp_path / "cache")], capsys)
    for label in ("IRS_alpha", "IRS_inf", "IRS_inf,real", "IRS_inf,a", "N_learned", "n_samples",
                  "invalid samples", "duplicate train features", "random-inception"):
        assert label in out
    result = json.loads(out_json.read_text())
    assert result["n_train"] == 40 and result["n_samples"] == 12 and result["n_invalid"] == 0
    k = result["n_learned"]
    assert 1 <= k <= 12 and result["irs_alpha"] == k / 40
    assert result["irs_inf"] == irs_infinity(k, 12, 40).as_dict()
    real = result["real"]
    # split of TRAIN: 20 queries vs 20; at the samples' alpha (12/40) 6 of the queries
    assert result["real_measurement"]["method"] == "split" and real["n_samples"] == 6 and real["n_train"] == 20
    assert result["adjusted"] == pytest.approx(adjusted_irs(result["irs_inf"]["estimate"], real["estimate"]))
    assert result["extractor"]["input_size"] == [75, 75]
    # second run: the cached bank gives the very same numbers
    out_json2 = tmp_path / "score2.json"
    run_ok(["score", str(folders / "train"), str(folders / "samples"), *FAST, "--json", str(out_json2),
            "--cache-dir", str(tmp_path / "cache")], capsys)
    again = json.loads(out_json2.read_text())
    assert {k: v for k, v in again.items() if k != "timings"} == {k: v for k, v in result.items() if k != "timings"}


def test_reference_build_then_score_the_saved_bank(folders, tmp_path, capsys):
    bank = tmp_path / "bank.safetensors"
    out = run_ok(["reference", "build", str(folders / "train"), "--out", str(bank),
                  "--reference-set", str(folders / "samples"), *FAST], capsys)
    assert "saved" in out and "N = 40" in out
    meta = json.loads(run_ok(["reference", "info", str(bank)], capsys))
    assert meta["real_measurement"]["method"] == "held-out" and meta["extractor"]["name"] == "random-inception"
    out_json = tmp_path / "s.json"
    # extractor and input size come from the bank
    run_ok(["score", str(bank), str(folders / "samples"), "--no-progress", "--json", str(out_json)], capsys)
    result = json.loads(out_json.read_text())
    # samples == the held-out reference set here, so the synthetic and real measurements coincide
    assert result["irs_inf"] == result["real"] and result["adjusted"] == pytest.approx(1.0)
    err = run_fails(["score", str(bank), str(folders / "samples"), "--input-size", "80", "--no-progress"], capsys)
    assert "extractor.input_size" in err
    err = run_fails(["score", str(bank), str(folders / "samples"), "--distance", "cosine", "--no-progress"], capsys)
    assert "distance" in err


def test_bad_input_exits_with_code_2_and_a_message(folders, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in run_fails(["score", str(folders / "train"), str(empty), *FAST], capsys)
    assert "unknown extractor" in run_fails(["score", str(folders / "train"), str(folders / "samples"),
                                             "--extractor", "nope", "--no-progress"], capsys)
    assert "--metrics" in run_fails(["score", str(folders / "train"), str(folders / "samples"),
                                     "--metrics", "irs,bogus", *FAST], capsys)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"garbage")
    assert "x.png" in run_fails(["score", str(folders / "train"), str(broken), *FAST], capsys)
    np.save(tmp_path / "wrong.npy", np.zeros((3, 5)))
    assert "shape" in run_fails(["score", str(folders / "train"), str(tmp_path / "wrong.npy"), *FAST], capsys)
    assert ".safetensors" in run_fails(["reference", "build", str(folders / "train"), "--out",
                                        str(tmp_path / "b.bin"), *FAST], capsys)


def test_nan_samples_are_counted_as_invalid(folders, tmp_path, capsys):
    samples = np.random.default_rng(0).random((6, 8, 8, 1)).astype(np.float32)
    samples[1] = np.nan
    np.save(tmp_path / "samples.npy", samples)
    out_json = tmp_path / "nan.json"
    run_ok(["score", str(folders / "train"), str(tmp_path / "samples.npy"), *FAST, "--json", str(out_json)], capsys)
    result = json.loads(out_json.read_text())
    assert result["n_samples"] == 6 and result["n_invalid"] == 1 and result["n_learned"] <= 5


def test_other_metrics_are_delegated(folders, tmp_path, capsys, monkeypatch):
    metrics = pytest.importorskip("irs_callbacks.metrics")
    calls = {}

    def fake_compute_metrics(real_features, fake_features, metrics=(), k=5):
        calls.update(real=real_features.shape, fake=fake_features.shape, metrics=metrics, k=k)
        return {"fid": 1.5}

    monkeypatch.setattr(metrics, "compute_metrics", fake_compute_metrics)
    out_json = tmp_path / "m.json"
    out = run_ok(["score", str(folders / "train"), str(folders / "samples"), *FAST, "--metrics", "irs,fid",
                  "--json", str(out_json)], capsys)
    assert calls == {"real": torch.Size([40, 2048]), "fake": torch.Size([12, 2048]), "metrics": ("fid",), "k": 5}
    assert "fid" in out and json.loads(out_json.read_text())["metrics"] == {"fid": 1.5}
