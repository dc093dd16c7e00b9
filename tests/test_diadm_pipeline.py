"""DiADMPipeline: condition strategies, guidance, output formats, save/load."""

import numpy as np
import pytest
import torch

from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, UNet2DConditionModel

from diadm.conditioning import DiADMUNet2DModel, conditional_forward, feature_class_embedding, normalize_features
from diadm.pipeline import DiADMFeatureBank, DiADMPipeline

D, N = 6, 10
UNET2D = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
              down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
              norm_num_groups=8)


def _pipeline(scheduler=None):
    torch.manual_seed(0)
    model = DiADMUNet2DModel(unet_config=UNET2D, feature_dim=D).eval()
    for p in model.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.2)
    bank = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    pipe = DiADMPipeline(model, scheduler or DDIMScheduler(num_train_timesteps=100), bank)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, **kw):
    kw = {"batch_size": 3, "num_inference_steps": 3, "output_type": "pt",
          "generator": torch.Generator().manual_seed(0), **kw}
    return pipe(**kw).images


def test_cycle_visits_every_entry_once_per_n_draws():
    pipe = _pipeline()
    drawn = torch.cat([pipe.draw_conditions(b)[0] for b in (3, 3, 3, 1)])
    assert sorted(drawn.tolist()) == list(range(N))
    second = torch.cat([pipe.draw_conditions(b)[0] for b in (4, 4, 2)])
    assert sorted(second.tolist()) == list(range(N)) and not torch.equal(second, drawn)  # next epoch, new order
    # a batch that straddles the epoch boundary still completes the epoch first
    pipe.reset_cycle()
    straddle = pipe.draw_conditions(7)[0].tolist() + pipe.draw_conditions(7)[0].tolist()
    assert sorted(straddle[:N]) == list(range(N))
    pipe.reset_cycle()
    assert pipe.draw_conditions(N)[0].tolist() == drawn.tolist()  # resettable and seeded
    pipe.reset_cycle(seed=5)
    assert pipe.draw_conditions(N)[0].tolist() != drawn.tolist()


def test_cycle_state_is_kept_across_calls():
    pipe = _pipeline()
    seen = []
    for _ in range(5):
        _call(pipe, batch_size=2)
        seen += pipe.last_condition_indices.tolist()
    assert sorted(seen) == list(range(N))


def test_uniform_and_perturb_strategies():
    pipe = _pipeline()
    idx, feats = pipe.draw_conditions(2000, "uniform", torch.Generator().manual_seed(0))
    counts = np.bincount(idx.numpy(), minlength=N)
    assert counts.min() > 120 and counts.max() < 280  # ~200 each, with replacement
    torch.testing.assert_close(feats, pipe.feature_bank.features[idx])
    pipe.unet.set_feature_mean(pipe.feature_bank.features.mean(0) + 3.0)  # perturbation around the model's centre
    idx2, pert = pipe.draw_conditions(500, "perturb", torch.Generator().manual_seed(0), perturb_scale=0.1)
    center = pipe.unet.feature_mean
    base = normalize_features(pipe.feature_bank.features[idx2], center=center)
    residual = normalize_features(pert, center=center) * (1 + 0.1 ** 2) ** 0.5 - base  # undo the renormalisation
    assert abs(residual.std().item() - 0.1) < 0.01 and abs(residual.mean().item()) < 0.01
    with pytest.raises(ValueError, match="condition_strategy"):
        pipe.draw_conditions(2, "random")


def test_guidance_scale_one_is_the_conditional_prediction():
    pipe = _pipeline()
    conds = pipe.feature_bank.features[:3]
    x, t = torch.randn(3, 1, 8, 8), torch.tensor(50)
    pipe.scheduler.set_timesteps(3)
    with torch.no_grad():
        cond = conditional_forward(pipe.unet, x, t, conds)
        assert torch.equal(pipe._predict(x, t, conds, 1.0), cond)
        uncond = conditional_forward(pipe.unet, x, t, None)
        torch.testing.assert_close(pipe._predict(x, t, conds, 3.0), uncond + 3.0 * (cond - uncond))
    # and end to end: explicit conditions through the whole sampler
    a = _call(pipe, conditions=conds, guidance_scale=1.0)
    b = _call(pipe, conditions=conds, guidance_scale=2.0)
    assert not torch.allclose(a, b)


def test_output_types_and_value_range():
    pipe = _pipeline(DDPMScheduler(num_train_timesteps=100))
    pt = _call(pipe)
    assert pt.shape == (3, 1, 8, 8) and pt.dtype == torch.float32
    assert pt.min() >= 0 and pt.max() <= 1
    pipe.reset_cycle()
    arr = _call(pipe, output_type="np")
    assert arr.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    pil = _call(pipe, output_type="pil")
    assert len(pil) == 3 and pil[0].size == (8, 8)
    with pytest.raises(ValueError, match="output_type"):
        _call(pipe, output_type="latent")
    with pytest.raises(ValueError, match="feature_dim"):
        _call(pipe, conditions=torch.zeros(3, D + 1))
    with pytest.raises(ValueError, match="NaN"):
        _call(pipe, conditions=torch.full((3, D), float("nan")))


def test_same_generator_same_images():
    pipe = _pipeline(DDPMScheduler(num_train_timesteps=100))
    a = _call(pipe, condition_strategy="uniform")
    b = _call(pipe, condition_strategy="uniform")
    assert torch.equal(a, b)


def test_pipeline_save_load_round_trip(tmp_path):
    pipe = _pipeline()
    before = _call(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = DiADMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.feature_bank, DiADMFeatureBank) and isinstance(loaded.unet, DiADMUNet2DModel)
    assert torch.equal(loaded.feature_bank.features, pipe.feature_bank.features)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    assert torch.equal(_call(loaded.to(torch.float32)), before)


def test_unet2d_condition_model_with_edm_scheduler(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**feature_class_embedding(dict(UNET2D, mid_block_type="UNetMidBlock2D"), feature_dim=D))
    bank = DiADMFeatureBank.from_features(torch.randn(N, D), extractor_identity={"name": "toy"})
    pipe = DiADMPipeline(unet, EDMEulerScheduler(), bank)
    pipe.set_progress_bar_config(disable=True)
    out = _call(pipe, guidance_scale=1.5)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()
    pipe.save_pretrained(tmp_path)
    loaded = DiADMPipeline.from_pretrained(tmp_path)
    assert loaded.feature_bank.config.extractor_identity == {"name": "toy"}
    with pytest.raises(ValueError, match="dimension"):
        DiADMPipeline(unet, EDMEulerScheduler(), torch.randn(N, D + 2))


def test_pipeline_gives_its_own_irs_sampler_through_the_protocol():
    """as_sampler finds DiADMSampler through as_irs_sampler (irs_callbacks never imports diadm);
    conditions are fixed by the global sample index, whatever the batch split."""
    from irs_callbacks.samplers import as_sampler, preserved_training_state

    from diadm.sampler import DiADMSampler

    pipe = _pipeline()
    sampler = as_sampler(pipe, num_inference_steps=2)
    assert isinstance(sampler, DiADMSampler) and sampler.num_inference_steps == 2
    rows = sampler.condition_indices(range(2 * N)).tolist()
    assert sorted(rows[:N]) == list(range(N)) and sorted(rows[N:]) == list(range(N))  # each once per N
    assert sampler.condition_indices([3, 17]).tolist() == [rows[3], rows[17]]
    with preserved_training_state(sampler.modules()), sampler.context():
        whole = sampler.sample(range(5), seed=1)
        parts = torch.cat([sampler.sample([0, 1], seed=1), sampler.sample([2, 3, 4], seed=1)])
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-5)


def test_n3_runs_on_a_diadm_pipeline():
    """N3 draws from the pipeline's sampler by seed (this used to fail: a side channel between
    sample() and generate())."""
    from diadm.n3 import N3RejectionSampler

    pipe = _pipeline()
    training_images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # the extractor sees RGB
    features = torch.nn.functional.adaptive_avg_pool2d(training_images, 2).flatten(1)
    n3 = N3RejectionSampler(features, extractor=lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))
    result = n3.run(pipe.as_irs_sampler(num_inference_steps=2), seeds=range(16), batch_size=8, progress=False)
    assert 1 <= result.accepted_seeds.numel() <= 12 and result.samples_seen == 16


def _capture_class_labels(unet):
    """Record the class_labels (the normalised condition) of every forward call of a UNet2DConditionModel."""
    seen = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"].clone()),
                                   with_kwargs=True)
    return seen


def test_unet2d_condition_model_is_sampled_with_its_training_centre(tmp_path):
    """A UNet2DConditionModel trained with conditional_forward(..., feature_mean=m) receives the same normalised
    condition when sampled (this used to be uncentred: the pipeline had nowhere to keep m), also after
    save/load, and "perturb" perturbs around m."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**feature_class_embedding(dict(UNET2D, mid_block_type="UNetMidBlock2D"), feature_dim=D))
    features = torch.randn(N, D, generator=torch.Generator().manual_seed(1)) + 5.0  # a large common component
    mean = features.double().mean(0).float()
    seen = _capture_class_labels(unet)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor(50)
    with torch.no_grad():
        conditional_forward(unet, x, t, features[:3], feature_mean=mean)  # the training call
    trained = seen.pop()
    c = features[:3] - mean
    torch.testing.assert_close(trained, c / c.norm(dim=1, keepdim=True) * D ** 0.5)  # independent: centred, unit RMS

    pipe = DiADMPipeline(unet, DDIMScheduler(num_train_timesteps=100), features, feature_mean=mean)
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(pipe.feature_bank.feature_mean, mean)
    _call(pipe, conditions=features[:3])
    assert seen and all(torch.equal(s, trained) for s in seen)  # every denoising step
    pipe.save_pretrained(tmp_path)
    loaded = DiADMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded.feature_bank.feature_mean, mean)
    seen = _capture_class_labels(loaded.unet)
    _call(loaded, conditions=features[:3])
    assert seen and all(torch.equal(s, trained) for s in seen)
    # "perturb" adds noise relative to the centred feature's RMS (without the centre: the raw RMS, ~5x larger)
    idx, pert = pipe.draw_conditions(500, "perturb", torch.Generator().manual_seed(0), perturb_scale=0.1)
    base = normalize_features(features[idx], center=mean)
    residual = normalize_features(pert, center=mean) * (1 + 0.1 ** 2) ** 0.5 - base
    assert abs(residual.std().item() - 0.1) < 0.01


def test_pipeline_refuses_a_second_centre_for_a_diadm_unet():
    pipe = _pipeline()
    features = pipe.feature_bank.features
    with pytest.raises(ValueError, match="its own feature_mean"):
        DiADMPipeline(pipe.unet, pipe.scheduler, features, feature_mean=features.mean(0))
    pipe.unet.set_feature_mean(features)
    same = DiADMPipeline(pipe.unet, pipe.scheduler, features, feature_mean=pipe.unet.feature_mean)
    assert torch.equal(same.feature_mean, pipe.unet.feature_mean)
