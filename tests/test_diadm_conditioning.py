"""Feature-conditioning adapters for diffusers UNets."""

import math

import pytest
import torch

from diffusers import UNet2DConditionModel, UNet2DModel

from diadm.conditioning import (
    DiADMUNet2DModel,
    conditional_forward,
    drop_conditions,
    feature_class_embedding,
    mean_of_features,
    normalize_features,
)

D = 12
UNET2D = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
              norm_num_groups=8)
UNET2D_COND = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   mid_block_type="UNetMidBlock2D", norm_num_groups=8)


def _randomise_output(model):
    # diffusers zero-initialises nothing here, but make sure outputs depend on every input
    for p in model.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _inputs(b=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 8, 8, generator=g), torch.tensor([1, 40, 900][:b]), torch.randn(b, D, generator=g) * 7


def test_normalize_features_unit_rms_and_zero_row():
    f = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 1.0, -1.0, 1.0]])
    n = normalize_features(f)
    torch.testing.assert_close(n[0], torch.tensor([3.0, 4.0, 0.0, 0.0]) / 5 * 2)
    assert torch.equal(n[1], torch.zeros(4))
    torch.testing.assert_close(n[[0, 2]].pow(2).mean(1), torch.ones(2))
    # scale invariance: extractor scale does not matter
    torch.testing.assert_close(normalize_features(f * 123.0), n)


def test_normalize_features_centred():
    f = torch.tensor([[4.0, 6.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 3.0, 1.0, 1.0]])
    center = torch.tensor([1.0, 2.0, 1.0, 1.0])
    n = normalize_features(f, center=center)
    torch.testing.assert_close(n[0], torch.tensor([3.0, 4.0, 0.0, 0.0]) / 5 * 2)  # (f - c) / |f - c| * sqrt(d)
    torch.testing.assert_close(n[2], torch.tensor([0.0, 1.0, 0.0, 0.0]) * 2)
    assert torch.equal(n[1], torch.zeros(4))  # the unconditional row is not moved
    with pytest.raises(ValueError, match="center"):
        normalize_features(f, center=torch.zeros(3))


def test_centring_separates_features_with_a_common_component():
    # extractor-like features: a large shared vector plus small per-image parts (random Inception on digits:
    # mean cosine 0.992 between different images)
    g = torch.Generator().manual_seed(0)
    common, parts = torch.rand(64, generator=g) * 10, torch.randn(50, 64, generator=g)
    f = common + parts
    cos = lambda x: (x @ x.T / x.shape[1])[~torch.eye(len(x), dtype=torch.bool)]  # noqa: E731 (unit-RMS rows)
    assert cos(normalize_features(f)).mean() > 0.9
    centred = normalize_features(f, center=f.mean(0))
    assert cos(centred).abs().mean() < 0.15
    torch.testing.assert_close(centred, normalize_features(parts - parts.mean(0)))


def test_bad_features_give_clear_errors():
    with pytest.raises(ValueError, match="NaN"):
        normalize_features(torch.tensor([[1.0, float("nan")]]))
    model = DiADMUNet2DModel(unet_config=UNET2D, feature_dim=D).eval()
    x, t, f = _inputs()
    with pytest.raises(ValueError, match="feature_dim=12"):
        model(x, t, f[:, :5])
    bad = f.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(x, t, bad)
    with pytest.raises(ValueError, match="rows"):
        model(x, t, f[:2])
    with pytest.raises(TypeError, match="torch.Tensor"):
        model(x, t, f.tolist())
    unet = UNet2DConditionModel(**feature_class_embedding(UNET2D_COND, feature_dim=D))
    with pytest.raises(ValueError, match="feature_dim=12"):
        conditional_forward(unet, x, t, f[:, :11])


def test_drop_conditions_rate_and_zero_rows():
    f = torch.ones(20_000, 3)
    out = drop_conditions(f, 0.25, generator=torch.Generator().manual_seed(0))
    dropped = (out == 0).all(1)
    assert ((out == 1).all(1) | dropped).all()
    assert abs(dropped.float().mean().item() - 0.25) < 0.015  # 5 sigma of Binomial(20000, 0.25)
    assert torch.equal(drop_conditions(f, 0.0), f)
    with pytest.raises(ValueError, match="dropout"):
        drop_conditions(f, 1.5)


def test_feature_class_embedding_config():
    cfg = feature_class_embedding(UNET2D_COND, feature_dim=D)
    assert cfg["class_embed_type"] == "projection" and cfg["projection_class_embeddings_input_dim"] == D
    unet = UNet2DConditionModel(**cfg)
    # validating an existing model's config passes through unchanged
    assert feature_class_embedding(unet.config, feature_dim=D)["projection_class_embeddings_input_dim"] == D
    with pytest.raises(ValueError, match="num_class_embeds"):
        feature_class_embedding(dict(UNET2D_COND, num_class_embeds=10), feature_dim=D)
    with pytest.raises(ValueError, match="differs"):
        feature_class_embedding(unet.config, feature_dim=D + 1)
    with pytest.raises(ValueError, match="feature_dim"):
        feature_class_embedding(UNET2D_COND, feature_dim=0)


@pytest.mark.parametrize("kind", ["unet2d", "unet2d_condition"])
def test_forward_backward_and_condition_matters(kind):
    torch.manual_seed(0)
    if kind == "unet2d":
        model = _randomise_output(DiADMUNet2DModel(unet_config=UNET2D, feature_dim=D))
    else:
        model = _randomise_output(UNet2DConditionModel(**feature_class_embedding(UNET2D_COND, feature_dim=D)))
    x, t, f = _inputs()
    out = conditional_forward(model, x, t, f)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    proj = model.feature_projection if kind == "unet2d" else model.class_embedding
    assert proj.linear_1.weight.grad is not None and proj.linear_1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        other = conditional_forward(model, x, t, f.flip(0))
        uncond = conditional_forward(model, x, t, None)
        scaled = conditional_forward(model, x, t, f * 5.0)  # normalisation makes the scale irrelevant
        zero = conditional_forward(model, x, t, torch.zeros_like(f))
        base = conditional_forward(model, x, t, f)
    assert not torch.allclose(base, other) and not torch.allclose(base, uncond)
    torch.testing.assert_close(scaled, base, rtol=1e-4, atol=1e-5)
    assert torch.equal(zero, uncond)


def test_unet2d_wrapper_matches_manual_composition():
    torch.manual_seed(0)
    model = _randomise_output(DiADMUNet2DModel(unet_config=UNET2D, feature_dim=D)).eval()
    x, t, f = _inputs()
    with torch.no_grad():
        emb = model.feature_projection(f / f.norm(dim=1, keepdim=True) * math.sqrt(D))
        manual = model.unet(x, t, class_labels=emb).sample
        torch.testing.assert_close(model(x, t, f).sample, manual)
        # with a centre: the conditions are centred first; conditional_forward uses the model's centre
        center = torch.linspace(-2, 2, D)
        model.set_feature_mean(torch.stack([center - 1, center + 1]))  # training features: their mean is taken
        torch.testing.assert_close(model.feature_mean, center)
        c = f - center
        emb = model.feature_projection(c / c.norm(dim=1, keepdim=True) * math.sqrt(D))
        manual = model.unet(x, t, class_labels=emb).sample
        torch.testing.assert_close(model(x, t, f).sample, manual)
        torch.testing.assert_close(conditional_forward(model, x, t, f), manual)
        assert torch.equal(model(x, t, torch.zeros_like(f)).sample, model(x, t, None).sample)


def test_mean_of_features_is_exact_over_blocks():
    """The blockwise float64 sum gives the exact mean: dyadic values (k / 64, |k| < 2^20) make every float64
    sum exact, so the result equals the mean computed with fractions, for every block size."""
    from fractions import Fraction

    ints = torch.randint(-2 ** 20, 2 ** 20, (23, 5), generator=torch.Generator().manual_seed(0))
    features = (ints.double() / 64).float()  # exactly representable in float32
    exact = [float(Fraction(sum(col), 64 * len(col))) for col in zip(*ints.tolist())]
    for block_elements in (1, 5, 7 * 5, 1 << 23):  # one row per block, 7 rows (a ragged last block), all at once
        assert mean_of_features(features, block_elements).tolist() == exact
    assert mean_of_features(features).dtype == torch.float64
    torch.testing.assert_close(mean_of_features(features), features.double().mean(0), rtol=1e-15, atol=0)
    model = DiADMUNet2DModel(unet_config=UNET2D, feature_dim=5)
    model.set_feature_mean(features)
    assert model.feature_mean.tolist() == torch.tensor(exact).float().tolist()
    features[4, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.set_feature_mean(features)
    with pytest.raises(ValueError, match="dimension 5"):
        DiADMUNet2DModel(unet_config=UNET2D, feature_dim=6).set_feature_mean(features)


def test_condition_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = _randomise_output(DiADMUNet2DModel(unet_config=UNET2D, feature_dim=D, condition_dropout=1.0))
    x, t, f = _inputs()
    with torch.no_grad():
        train_out = model(x, t, f).sample  # p = 1: every condition dropped
        model.eval()
        torch.testing.assert_close(train_out, model(x, t, None).sample, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x, t, f).sample, model(x, t, None).sample)


def test_unet2d_wrapper_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _randomise_output(DiADMUNet2DModel(unet_config=UNET2D, feature_dim=D, condition_dropout=0.1,
                                               feature_mean=torch.arange(D, dtype=torch.float32))).eval()
    x, t, f = _inputs()
    with torch.no_grad():
        before = model(x, t, f).sample
    model.save_pretrained(tmp_path)
    assert "feature_mean" not in model.config
    loaded = DiADMUNet2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.feature_dim == D and loaded.config.condition_dropout == 0.1
    assert loaded.config.unet_config == model.config.unet_config
    state, state2 = model.state_dict(), loaded.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)
    assert torch.equal(loaded.feature_mean, torch.arange(D, dtype=torch.float32))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, f).sample, before)
    # plain diffusers would silently drop the projection: loading the inner UNet alone loses it
    assert any(k.startswith("feature_projection.") for k in state)


def test_unet2d_condition_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = _randomise_output(UNet2DConditionModel(**feature_class_embedding(UNET2D_COND, feature_dim=D))).eval()
    x, t, f = _inputs()
    with torch.no_grad():
        before = conditional_forward(unet, x, t, f)
    unet.save_pretrained(tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(conditional_forward(loaded, x, t, f), before)


def test_from_unet_keeps_weights():
    torch.manual_seed(0)
    plain = _randomise_output(UNet2DModel(**UNET2D)).eval()
    model = DiADMUNet2DModel.from_unet(plain, feature_dim=D).eval()
    for k, v in plain.state_dict().items():
        assert torch.equal(model.unet.state_dict()[k], v)
    with pytest.raises(ValueError, match="class conditioning"):
        DiADMUNet2DModel(unet_config=dict(UNET2D, num_class_embeds=10), feature_dim=D)


def test_cross_attention_unet_needs_encoder_states():
    unet = UNet2DConditionModel(**feature_class_embedding(dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8), feature_dim=D))
    x, t, f = _inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        conditional_forward(unet, x, t, f)
    out = conditional_forward(unet, x, t, f, encoder_hidden_states=torch.zeros(3, 1, 8))
    assert out.shape == x.shape
