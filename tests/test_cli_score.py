"""`irs score` and `irs reference build` end to end on small folders of digit PNGs."""

import json
import os

import numpy as np
import pytest
import torch

from irs_callbacks.cli import main
from irs_callbacks.stats import adjusted_irs, irs_infinity, rejection_threshold

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
    assert result["alpha_matching"] == "real-subsampled" and result["matched_alpha"] == pytest.approx(12 / 40)
    assert "compared at" in out and "real reference subsampled to the samples' alpha" in out
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


def test_target_prints_a_verdict_and_exits_0_either_way(folders, tmp_path, capsys):
    one = np.stack([np.asarray(__import__("PIL.Image").Image.open(folders / "samples" / "000.png"))] * 12)
    np.save(tmp_path / "one_image.npy", one)  # a collapsed model: 12 samples, one image
    verdicts = {}
    for name, samples in (("diverse", folders / "samples"), ("collapsed", tmp_path / "one_image.npy")):
        out_json = tmp_path / f"{name}.json"
        out = run_ok(["score", str(folders / "train"), str(samples), *FAST, "--target", "0.5",
                      "--json", str(out_json)], capsys)
        result = json.loads(out_json.read_text())
        k_min = rejection_threshold(40, 0.5, 12, 0.05, real_irs=result["real"]["estimate"])
        verdict = result["target"]
        assert verdict["k_min"] == k_min and verdict["scale"] == "relative to real data"
        assert verdict["verdict"] == ("pass" if result["n_learned"] > k_min else "reject")
        assert "verdict" in out and verdict["verdict"] in out and f"k_min {k_min}" in out
        verdicts[name] = verdict["verdict"]
    assert verdicts == {"diverse": "pass", "collapsed": "reject"}
    for option, value, message in (("--target", "1.5", "--target must be a number in (0, 1], got 1.5"),
                                   ("--alpha-e", "1", "--alpha-e must be a number in the open interval (0, 1), got 1.0"),
                                   ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
                                   ("--input-size", "0", "--input-size must be an integer >= 1, got 0"),
                                   ("--value-range", "0,inf", "--value-range: expected LOW,HIGH with finite LOW < HIGH")):
        err = run_fails(["score", str(folders / "train"), str(folders / "samples"), "--no-progress",
                         "--input-size", "75", option, value], capsys)
        assert message in err and (option == "--value-range" or len(err.strip().splitlines()) == 1), err  # argparse


def test_bad_arrays_banks_outputs_and_devices_get_one_line(folders, tmp_path, capsys):
    train, samples = str(folders / "train"), str(folders / "samples")
    digits = np.stack([np.asarray(__import__("PIL.Image").Image.open(p)) for p in sorted((folders / "samples").iterdir())])
    cases = {
        "bool.npy": (digits > 8, "bool arrays are not images"),
        "complex.npy": (digits.astype(np.complex64), "complex arrays are not images"),
        "int16.npy": (digits.astype(np.int16) * 200, "store 16-bit images as uint16"),
        "float255.npy": (digits.astype(np.float32), "floats in 0..255: divide by 255"),
        "signed.npy": (digits.astype(np.float32) / 127.5 - 1, "pass value_range=(-1, 1)"),
    }
    for name, (array, message) in cases.items():
        np.save(tmp_path / name, array)
        err = run_fails(["score", train, str(tmp_path / name), *FAST], capsys)
        assert message in err and len(err.strip().splitlines()) == 1, err
    err = run_fails(["score", train, str(tmp_path / "float255.npy"), *FAST], capsys)
    assert "--value-range 0,255" in err and "[0, 255]" in err
    for argv in (["reference", "build", str(tmp_path / "float255.npy"), "--out", str(tmp_path / "f.safetensors")],
                 ["score", str(tmp_path / "float255.npy"), samples]):  # the same fix when TRAIN is the array
        err = run_fails([*argv, *FAST], capsys)
        assert "[0, 255]" in err and err.strip().endswith("; here: --value-range 0,255"), err
    # uint16 arrays are 16-bit images: the same digits at 16 bits score exactly as at 8 bits
    np.save(tmp_path / "u16.npy", digits.astype(np.uint16) * 257)
    np.save(tmp_path / "u8.npy", digits)
    scores = {}
    for name, extra in (("u8.npy", []), ("u16.npy", []), ("float255.npy", ["--value-range", "0,255"]),
                        ("signed.npy", ["--value-range", "-1,1"])):  # a value with a minus sign, as in the help
        run_ok(["score", train, str(tmp_path / name), *FAST, "--json", str(tmp_path / f"{name}.json"), *extra], capsys)
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["u16.npy"]["n_learned"] == scores["u8.npy"]["n_learned"] == scores["float255.npy"]["n_learned"]
    assert scores["signed.npy"]["n_samples"] == scores["u8.npy"]["n_samples"]
    assert scores["u16.npy"]["irs_inf"] == scores["u8.npy"]["irs_inf"]
    # outputs: a folder, a path under a file; checked before any work
    assert "is a folder" in run_fails(["reference", "build", train, "--out", str(tmp_path), *FAST], capsys)
    (tmp_path / "plain").write_text("x")
    assert "not a writable folder" in run_fails(["reference", "build", train, "--out",
                                                 str(tmp_path / "plain" / "b.safetensors"), *FAST], capsys)
    assert "is a folder" in run_fails(["score", train, samples, *FAST, "--json", str(tmp_path)], capsys)
    # a bank missing a metadata field
    bank = tmp_path / "bank.safetensors"
    old = os.umask(0o022)
    try:
        run_ok(["reference", "build", train, "--out", str(bank), *FAST], capsys)
    finally:
        os.umask(old)
    assert (bank.stat().st_mode & 0o777) == 0o644  # follows the umask (was 0600)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(bank), framework="pt") as handle:
        meta = json.loads(handle.metadata()["irs_reference"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    del meta["dim"]
    save_file(tensors, str(tmp_path / "nodim.safetensors"), metadata={"irs_reference": json.dumps(meta)})
    err = run_fails(["score", str(tmp_path / "nodim.safetensors"), samples, "--no-progress"], capsys)
    assert "lacks metadata dim" in err and len(err.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        err = run_fails(["score", train, samples, *FAST, "--device", "cuda"], capsys)
        assert "no" in err and "--device cpu" in err


def test_paths_are_expanded(folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(folders))
    monkeypatch.setenv("IRS_TEST_OUT", str(tmp_path))
    run_ok(["score", "~/train", "~/samples", *FAST, "--json", "$IRS_TEST_OUT/s.json"], capsys)
    assert json.loads((tmp_path / "s.json").read_text())["train"] == str(folders / "train")


def test_offline_pretrained_extractor_fails_at_once_with_one_line(folders, capsys, monkeypatch):
    from irs_callbacks import features

    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not touch the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(features, "_endpoint_reachable", no_network)
    monkeypatch.setattr(features, "_cached_hub_weights", lambda name: None)
    err = run_fails(["score", str(folders / "train"), str(folders / "samples"), "--extractor", "dinov2-vitb14",
                     "--no-progress"], capsys)
    assert "--weights PATH" in err and "HF_HUB_OFFLINE" in err and len(err.strip().splitlines()) == 1


def test_a_samples_array_is_read_once(folders, tmp_path, capsys, monkeypatch):
    """The early check of SAMPLES only looks at an array's path (it used to load the whole array and throw it away)."""
    from irs_callbacks import image_io

    digits = np.stack([np.asarray(__import__("PIL.Image").Image.open(p)) for p in sorted((folders / "samples").iterdir())])
    np.save(tmp_path / "samples.npy", digits)
    loads, real_load = [], image_io.load_array
    monkeypatch.setattr(image_io, "load_array", lambda path: loads.append(str(path)) or real_load(path))
    run_ok(["score", str(folders / "train"), str(tmp_path / "samples.npy"), *FAST], capsys)
    assert loads == [str(tmp_path / "samples.npy")]
    err = run_fails(["score", str(folders / "train"), str(tmp_path / "missing.npz"), *FAST], capsys)
    assert "missing.npz' does not exist" in err
