"""Feature extractors: registry, construction, local weights, input handling, determinism."""

import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from irs_callbacks import features as feat
from irs_callbacks.features import (FeatureExtractor, WeightsUnavailableError, extract_features, get_extractor,
                                    list_extractors, module_sha256)

SMALL = 75  # smallest input Inception v3 accepts; keeps CPU tests fast


@pytest.fixture(scope="module")
def random_inception():
    return get_extractor("random-inception", input_size=SMALL, device="cpu")


@pytest.fixture(scope="module")
def digits_uint8():
    from sklearn.datasets import load_digits

    images = load_digits().images[:6]  # values 0..16
    return torch.from_numpy((images / 16 * 255).round().astype(np.uint8)).unsqueeze(1)  # [6, 1, 8, 8]


def close(a, b, rel=1e-4):
    scale = max(float(a.abs().max()), 1e-12)
    torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=rel)


def test_registry_lists_builtins_and_rejects_unknown_names():
    names = list_extractors()
    for name in ("random-inception", "inception-v3", "swav-resnet50", "dinov2-vitb14", "clip-vitb16",
                 "convnext-base", "mae-vitb16"):
        assert name in names
    with pytest.raises(ValueError, match="unknown extractor 'nope'.*random-inception"):
        get_extractor("nope")
    with pytest.raises(TypeError):
        get_extractor(3)
    with pytest.raises(ValueError, match="already registered"):
        feat.register_extractor("random-inception", lambda **kw: None)


def test_random_inception_is_deterministic_and_leaves_global_rng_alone(random_inception, digits_uint8):
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    other = get_extractor("random", input_size=SMALL, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    torch.manual_seed(99)
    assert module_sha256(other.model) == module_sha256(random_inception.model)
    assert torch.equal(other(digits_uint8), random_inception(digits_uint8))
    assert random_inception.identity["weights_sha256"] == other.identity["weights_sha256"]
    assert random_inception.identity["input_size"] == [SMALL, SMALL]
    assert random_inception.dim == 2048


def test_uint8_and_float_ranges_and_channels_give_the_same_features(random_inception, digits_uint8):
    reference = random_inception(digits_uint8)
    assert reference.shape == (6, 2048) and reference.dtype == torch.float32 and torch.isfinite(reference).all()
    unit = digits_uint8.float() / 255
    close(random_inception(unit, value_range=(0, 1)), reference)
    close(random_inception(unit * 2 - 1, value_range=(-1, 1)), reference)
    close(random_inception(digits_uint8.expand(-1, 3, -1, -1)), reference, rel=1e-6)
    # resize: the extractor resizes exactly like an antialiased bicubic interpolate + clamp
    resized = F.interpolate(unit, size=(SMALL, SMALL), mode="bicubic", antialias=True).clamp(0, 1)
    close(random_inception(resized), reference, rel=1e-6)
    # a different image gives different features
    assert not torch.allclose(reference[0], reference[1])


def test_input_validation(random_inception):
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="value_range"):
        random_inception(x, value_range=(1, 0))
    with pytest.raises(ValueError, match="value_range"):
        random_inception(x, value_range=(0, float("inf")))
    with pytest.raises(ValueError, match="value_range"):
        random_inception(x, value_range="0-1")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        random_inception(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        random_inception(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_inception(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="empty batch"):
        random_inception(torch.rand(0, 3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        random_inception(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="input_size"):
        get_extractor("random-inception", input_size=32)
    with pytest.raises(ValueError, match="multiple of 14"):
        get_extractor("dinov2", input_size=30, pretrained=False)
    with pytest.raises(ValueError, match="takes no weights"):
        get_extractor("random-inception", weights="x.pth")


def test_nan_images_give_nan_rows_without_touching_the_others(random_inception, digits_uint8):
    clean = random_inception(digits_uint8)
    x = digits_uint8.float() / 255
    x[2, 0, 3, 3] = float("nan")
    x[4, 0, 0, 0] = float("inf")
    out = random_inception(x)
    assert torch.isnan(out[2]).all() and torch.isnan(out[4]).all()
    keep = [0, 1, 3, 5]
    close(out[keep], clean[keep])


def test_custom_module_and_callable_extractors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    extractor = get_extractor(net, input_size=8, device="cpu")
    assert isinstance(extractor, FeatureExtractor) and extractor.dim == 5
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    expected = net((images.float() / 255).expand(-1, 3, -1, -1))
    torch.testing.assert_close(extractor(images), expected)
    assert extractor.identity["weights_sha256"] == module_sha256(net)
    pixels = get_extractor(lambda x: x.flatten(1), input_size=4, custom_name="pixels")
    assert pixels.name == "custom:pixels" and pixels.dim == 3 * 16
    assert get_extractor(extractor) is extractor
    bad = get_extractor(lambda x: x, input_size=4)
    with pytest.raises(ValueError, match=r"shape \[B, d\]"):
        bad(images)


EXPECTED = {  # name -> (input size for a quick forward pass, feature dim)
    "inception-v3": (75, 2048),
    "swav-resnet50": (32, 2048),
    "dinov2-vitb14": (28, 768),
    "clip-vitb16": (32, 512),
    "convnext-base": (32, 1024),
    "mae-vitb16": (32, 768),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pretrained_extractors_construct_without_download(name):
    size, dim = EXPECTED[name]
    extractor = get_extractor(name, pretrained=False, input_size=size, device="cpu")
    assert extractor.dim == dim and extractor.identity["weights"].startswith("random-init")
    out = extractor(torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8))
    assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_local_weights_file_round_trip(tmp_path, digits_uint8):
    source = get_extractor("inception-v3", pretrained=False, seed=3, input_size=SMALL, device="cpu")
    path = tmp_path / "inception.pth"
    torch.save({"state_dict": source.model.state_dict()}, path)  # a wrapped checkpoint
    loaded = get_extractor("inception-v3", weights=path, input_size=SMALL, device="cpu")
    assert torch.equal(loaded(digits_uint8), source(digits_uint8))
    assert loaded.identity["weights_sha256"] == feat.file_sha256(path)
    from safetensors.torch import save_file

    st_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(st_path))
    assert torch.equal(get_extractor("inception", weights=st_path, input_size=SMALL, device="cpu")(digits_uint8),
                       source(digits_uint8))


def test_swav_checkpoint_key_mapping(tmp_path, digits_uint8):
    import timm

    torch.manual_seed(7)
    resnet = timm.create_model("resnet50", num_classes=0).eval()
    checkpoint = {f"module.{k}": v for k, v in resnet.state_dict().items()}
    checkpoint["module.projection_head.0.weight"] = torch.randn(2048, 2048)
    checkpoint["module.prototypes.weight"] = torch.randn(3000, 128)
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(checkpoint, path)
    swav = get_extractor("swav", weights=path, input_size=32, device="cpu")
    reference = FeatureExtractor(resnet, name="ref", input_size=32, mean=feat.IMAGENET_MEAN, std=feat.IMAGENET_STD)
    torch.testing.assert_close(swav(digits_uint8), reference(digits_uint8))
    assert feat.swav_to_timm({"module.conv1.weight": 1, "module.prototypes.weight": 2,
                              "projection_head.0.bias": 3}) == {"conv1.weight": 1}


def test_weights_that_do_not_fit_and_unsafe_files_are_refused(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Linear(3, 4).state_dict(), wrong)
    with pytest.raises(ValueError, match="do not fit extractor 'inception-v3'.*missing keys"):
        get_extractor("inception-v3", weights=wrong, input_size=SMALL)
    pickled = tmp_path / "pickled.pth"
    torch.save({"weight": torch.zeros(1), "payload": _NotAWeight()}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        get_extractor("inception-v3", weights=pickled, input_size=SMALL)
    with pytest.raises(ValueError, match="does not exist"):
        get_extractor("swav", weights=tmp_path / "missing.pth")


class _NotAWeight:
    pass


def test_clear_error_when_weights_cannot_be_downloaded(monkeypatch):
    def no_network(url):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(feat, "download_state_dict", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        get_extractor("swav-resnet50")
    message = str(info.value)
    assert feat.SWAV_URL in message and "weights=PATH" in message and "connect to the internet" in message

    import timm

    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("cannot reach huggingface.co")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(WeightsUnavailableError, match=r"inception_v3\.tf_in1k.*weights=PATH"):
        get_extractor("inception-v3", input_size=SMALL)


def test_extract_features_from_tensors_arrays_datasets_and_loaders(digits_uint8):
    extractor = get_extractor(lambda x: x.flatten(1), input_size=8, custom_name="pixels")
    expected = extractor(digits_uint8)
    nhwc = digits_uint8.permute(0, 2, 3, 1).numpy()
    labels = torch.arange(len(digits_uint8))
    dataset = torch.utils.data.TensorDataset(digits_uint8, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)

    class DictDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(digits_uint8)

        def __getitem__(self, i):
            return {"image": digits_uint8[i], "label": i}

    for data in (digits_uint8, nhwc, digits_uint8[:, 0].numpy(), dataset, loader, DictDataset()):
        out = extract_features(extractor, data, batch_size=4, progress=False)
        assert out.device.type == "cpu"
        torch.testing.assert_close(out, expected)
    # images of different sizes in one batch are resized one by one
    mixed = [torch.zeros(3, 8, 8, dtype=torch.uint8), torch.full((3, 16, 16), 255, dtype=torch.uint8)]
    out = extract_features(extractor, mixed_dataset(mixed), batch_size=2, progress=False)
    torch.testing.assert_close(out, torch.stack([torch.zeros(192), torch.ones(192)]))
    with pytest.raises(ValueError, match="batch_size"):
        extract_features(extractor, digits_uint8, batch_size=0)


def mixed_dataset(items):
    class ListDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    return ListDataset()


# --------------------------------------------------------------------------- calibration, pinned values


def pinned_input():
    """Two fixed 32 x 32 RGB images from closed-form patterns (no RNG), resized to the input size."""
    h = torch.arange(32, dtype=torch.float64)[:, None]
    w = torch.arange(32, dtype=torch.float64)[None, :]
    a = 0.5 + 0.5 * torch.sin(h / 3.0) * torch.cos(w / 5.0)
    b = ((h - 16) ** 2 + (w - 12) ** 2 < 100).double() * 0.8 + 0.1
    return torch.stack([torch.stack([a, a.T, 1 - a]), torch.stack([b, b, b * 0.5])]).float()


PINNED_COORDINATES = [0, 1, 2, 3, 100, 500, 1000, 2047]
PINNED = {  # random-inception at 75 px on pinned_input(), torch 2.14 / timm 1.0.31, CPU float32
    "scale_log2": -22,
    "weights_sha256": "8befa51a96a738c93e73f570c91c781c3f84a5c9ebf30a915c8157db62e817d7",
    "norms": [69.76330, 104.64229],
    "values": [[1.6298599, 1.6888331, 2.6621380, 1.5798485, 0.0, 0.0, 1.6050985, 0.1019646],
               [2.5698245, 2.7384752, 4.2180643, 2.4855528, 0.0, 0.0, 2.4709034, 0.1696583]],
    "argmax": [1442, 1442],
}


def test_default_extractor_matches_pinned_reference_values(random_inception):
    """torch-fidelity style: hard-coded features of the default extractor on a fixed input, so that a
    timm or torch upgrade that changes the network, its random init or the preprocessing is caught.
    Tolerance 1e-4 of the largest feature: summation order (BLAS, threads, batch size) moves the
    features by about 2e-6 of it here; any change of init or preprocessing moves them by O(1)."""
    assert random_inception.identity["weights_sha256"] == PINNED["weights_sha256"]
    assert random_inception.identity["calibration"]["scale_log2"] == PINNED["scale_log2"]
    features = random_inception(pinned_input()).double()
    scale = float(features.abs().max())
    assert scale == pytest.approx(13.788, rel=1e-3)
    tolerance = 1e-4 * scale
    expected = torch.tensor(PINNED["values"], dtype=torch.float64)
    torch.testing.assert_close(features[:, PINNED_COORDINATES], expected, rtol=0, atol=tolerance)
    torch.testing.assert_close(features.norm(dim=1), torch.tensor(PINNED["norms"], dtype=torch.float64),
                               rtol=0, atol=tolerance)
    assert features.argmax(dim=1).tolist() == PINNED["argmax"]


def test_calibration_is_an_exact_power_of_two_of_the_random_network(random_inception, digits_uint8, tmp_path):
    """Calibrated features are the uncalibrated network's output times 2**scale_log2, bit for bit:
    nearest neighbours, ties and cosines are those of the paper's Random extractor."""
    scale_log2 = random_inception.identity["calibration"]["scale_log2"]
    assert random_inception.output_scale == 2.0 ** scale_log2
    x = random_inception.preprocess(digits_uint8)
    with torch.no_grad():
        raw = random_inception.model((x - random_inception.mean) / random_inception.std)
    assert torch.equal(random_inception(digits_uint8), raw * 2.0 ** scale_log2)
    # on its own calibration input the feature RMS is 1 within a factor sqrt(2) ...
    calibration = feat.pink_noise(feat.CALIBRATION_IMAGES, (SMALL, SMALL), torch.Generator().manual_seed(0))
    rms = float(random_inception(calibration).square().mean().sqrt())
    assert 2 ** -0.5 <= rms <= 2 ** 0.5
    # ... and raw features are ~1e8 (what the calibration removes)
    assert float(raw.norm(dim=1).min()) > 1e7
    # part of the identity: a bank built before (no calibration field) is refused by the usual message
    from irs_callbacks.reference import ReferenceBank

    old_identity = {k: v for k, v in random_inception.identity.items() if k != "calibration"}
    old_bank = ReferenceBank.from_features(torch.rand(6, 4), extractor_identity=old_identity, measure=False)
    path = old_bank.save(tmp_path / "old.safetensors")
    with pytest.raises(ValueError, match=r"does not match what is asked for: extractor\.calibration: saved '<missing>'"):
        ReferenceBank.load(path, expect={"extractor": random_inception.identity})


def test_value_range_violations_are_one_line_errors_and_nan_passes(random_inception, digits_uint8):
    unit = digits_uint8.float() / 255
    with pytest.raises(ValueError, match=r"values in \[0, 255\], outside value_range=\(0, 1\).*floats in 0\.\.255: "
                                         r"divide by 255 or pass value_range=\(0, 255\)") as info:
        random_inception(unit * 255)
    assert isinstance(info.value, feat.ValueRangeError) and info.value.suggested == (0.0, 255.0)
    assert "\n" not in str(info.value)
    close(random_inception(unit * 255, value_range=(0, 255)), random_inception(digits_uint8))
    with pytest.raises(ValueError, match=r"values in \[-1, 1\].*pass value_range=\(-1, 1\)"):
        random_inception(unit * 2 - 1)  # diffusers' [-1, 1] data under the default (0, 1)
    # small overshoot (an unclamped sampler) is clipped, not an error
    over = unit * 1.08 - 0.04  # [-0.04, 1.04]
    close(random_inception(over), random_inception(over.clamp(0, 1)), rel=1e-6)
    # NaN/Inf never raise, even next to out-of-range-looking values: invalid rows
    bad = unit.clone()
    bad[0] = float("nan")
    bad[1, 0, 0, 0] = float("inf")
    out = random_inception(bad)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2:]).all()
    assert torch.isnan(random_inception(torch.full((2, 1, 8, 8), float("nan")))).all()
    # uint16 images are 16-bit: 257 * the uint8 values give the same features
    wide = digits_uint8.to(torch.int32).mul(257).to(torch.uint16)
    assert torch.equal(feat.to_unit_range(wide), feat.to_unit_range(digits_uint8))


def _to_unit_range_by_mask(images, low, high):
    """to_unit_range written the plain way (extremes of the finite values, clip the finite ones): the reference."""
    x = (images.double() - low) / (high - low)
    finite = torch.isfinite(x)
    values = x[finite]
    lowest = values.min().item() if values.numel() else float("inf")
    highest = values.max().item() if values.numel() else -float("inf")
    tol = feat.VALUE_RANGE_TOLERANCE
    if lowest < -tol or highest > 1 + tol:
        return None, (lowest * (high - low) + low, highest * (high - low) + low)
    return torch.where(finite, x.clamp(0, 1), x).float(), None


@pytest.mark.parametrize("case", ["inside", "overshoot", "nan", "inf", "all_nan", "nan_and_too_high",
                                  "minus_inf_and_too_low", "wide_range"])
def test_to_unit_range_matches_the_masked_computation(case, monkeypatch):
    g = torch.Generator().manual_seed(0)
    low, high = (-1.0, 1.0) if case == "wide_range" else (0.0, 1.0)
    x = torch.rand(3, 1, 5, 5, generator=g) * (high - low) + low
    if case == "overshoot":
        x = x * 1.08 - 0.04
    if case in ("nan", "nan_and_too_high"):
        x[0, 0, 1] = float("nan")
    if case == "inf":
        x[1, 0, 0, 0], x[2, 0, 0, 0], x[0, 0, 0, 0] = float("inf"), -float("inf"), 1.03
    if case == "all_nan":
        x[:] = float("nan")
    if case == "nan_and_too_high":
        x[2, 0, 4, 4] = 3.5
    if case == "minus_inf_and_too_low":
        x[0, 0, 0, 0], x[1, 0, 2, 2] = -float("inf"), -0.5
    expected, observed = _to_unit_range_by_mask(x, low, high)
    before = x.clone()
    if observed is not None:
        with pytest.raises(feat.ValueRangeError) as info:
            feat.to_unit_range(x, (low, high))
        assert info.value.observed == pytest.approx(observed, rel=1e-6)
        return
    got = feat.to_unit_range(x, (low, high))
    assert got.dtype == torch.float32 and torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x, before, equal_nan=True, rtol=0, atol=0)  # the input is untouched
    if case in ("inside", "overshoot", "wide_range"):  # finite images: no element-wise mask is built
        monkeypatch.setattr(torch, "isfinite", lambda *a: pytest.fail("isfinite on an all-finite batch"))
        torch.testing.assert_close(feat.to_unit_range(x, (low, high)), expected)


def test_offline_pretrained_extractors_fail_at_once(monkeypatch, tmp_path):
    import timm

    real_create = timm.create_model
    calls = []

    def create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs.get("pretrained_cfg_overlay")))
        if pretrained and not kwargs.get("pretrained_cfg_overlay"):
            raise AssertionError("would download")
        return real_create(name, pretrained=pretrained, **kwargs)

    def probe_must_not_run(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE must not touch the network")

    monkeypatch.setattr(timm, "create_model", create)
    monkeypatch.setattr(feat, "_cached_hub_weights", lambda name: None)
    monkeypatch.setattr(feat, "_torch_hub_cached", lambda url: False)
    # 1. HF_HUB_OFFLINE=1: no attempt at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(feat, "_endpoint_reachable", probe_must_not_run)
    for name in ("dinov2-vitb14", "swav-resnet50"):
        with pytest.raises(WeightsUnavailableError, match=r"offline mode.*weights=PATH \(CLI: --weights PATH"):
            get_extractor(name, device="cpu")
    assert not [c for c in calls if c[1]]
    # 2. no offline setting: one quick probe, which fails (simulated), and no download attempt
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(feat, "_endpoint_reachable", lambda url, timeout=3.0: (False, "cannot connect (simulated)"))
    with pytest.raises(WeightsUnavailableError, match="cannot connect \\(simulated\\).*--weights"):
        get_extractor("inception-v3", input_size=SMALL, device="cpu")
    assert not [c for c in calls if c[1]]
    # 3. weights already in the local cache: loaded from it, offline, without any probe
    source = real_create("inception_v3", pretrained=False)
    from safetensors.torch import save_file

    cached = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(cached))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(feat, "_endpoint_reachable", probe_must_not_run)
    monkeypatch.setattr(feat, "_cached_hub_weights", lambda name: str(cached))
    extractor = get_extractor("inception-v3", input_size=SMALL, device="cpu")
    assert calls[-1] == ("inception_v3.tf_in1k", True, {"file": str(cached)})
    reference = get_extractor("inception-v3", weights=cached, input_size=SMALL, device="cpu")
    x = torch.rand(2, 3, SMALL, SMALL)
    torch.testing.assert_close(extractor(x), reference(x))
    assert extractor.identity["weights"] == "timm:inception_v3.tf_in1k"


def test_endpoint_probe_is_one_quick_attempt(monkeypatch):
    import socket

    for key in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        assert feat._endpoint_reachable(f"http://127.0.0.1:{port}", timeout=2.0) == (True, "")
    finally:
        server.close()
    reachable, reason = feat._endpoint_reachable(f"http://127.0.0.1:{port}", timeout=2.0)  # closed now
    assert not reachable and f"127.0.0.1:{port}" in reason
    assert feat._endpoint_reachable("https://host.invalid", timeout=2.0)[0] is False
