"""DiADM sampling: a diffusers pipeline whose conditions are features of training images (IRS paper, Sec. 3.5).

Every training instance acts as its own class: a condition is drawn from the bank of training features
(``"cycle"``: each instance once per N samples; ``"uniform"``: with replacement; ``"perturb"``: uniform plus small
noise), the model denoises under it, optionally with classifier-free guidance against the zero condition.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .conditioning import (DiADMUNet2DModel, check_feature_mean, check_features, conditional_forward,
                           feature_dim_of)

__all__ = ["DiADMFeatureBank", "DiADMPipeline", "CONDITION_STRATEGIES"]

CONDITION_STRATEGIES = ("cycle", "uniform", "perturb")


class DiADMFeatureBank(ModelMixin, ConfigMixin):
    """The training features [N, d] (raw extractor output, float32) as a pipeline component, so
    ``DiADMPipeline.save_pretrained`` stores them (safetensors) and ``from_pretrained`` restores them.
    ``extractor_identity`` (JSON-able dict, optional) records which extractor produced them.

    ``feature_mean`` [d] (a buffer, saved with the features): the centre of the conditions for a model that does
    not carry one (a :class:`~diffusers.UNet2DConditionModel`): the ``feature_mean`` it was trained with through
    :func:`~diadm.conditioning.conditional_forward`. Zeros (the default) mean no centring. A
    :class:`~diadm.DiADMUNet2DModel` carries its own centre; then leave this one at zeros or equal to it."""

    @register_to_config
    def __init__(self, n_train: int = 1, feature_dim: int = 1, extractor_identity: dict | None = None):
        super().__init__()
        self.features = nn.Parameter(torch.zeros(n_train, feature_dim), requires_grad=False)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))

    @classmethod
    def from_features(cls, features, extractor_identity: dict | None = None,
                      feature_mean=None) -> "DiADMFeatureBank":
        """From a tensor [N, d], or an object with ``.features`` (e.g. an irs_callbacks ``ReferenceBank``);
        ``feature_mean`` as for :meth:`set_feature_mean`."""
        if extractor_identity is None:
            extractor_identity = getattr(features, "extractor_identity", None)
        features = getattr(features, "features", features)
        features = check_features(torch.as_tensor(features), name="feature_bank").detach().float().cpu()
        if features.shape[0] < 1:
            raise ValueError("feature_bank must hold at least one feature vector")
        bank = cls(n_train=features.shape[0], feature_dim=features.shape[1], extractor_identity=extractor_identity)
        bank.features.data.copy_(features)
        if feature_mean is not None:
            bank.set_feature_mean(feature_mean)
        return bank

    def set_feature_mean(self, feature_mean) -> None:
        """Set the centre of the conditions: a [feature_dim] mean (e.g. ``PseudoLabelDataset.feature_mean``, the
        value given to ``conditional_forward`` in training), or training features [N, feature_dim] (their mean)."""
        mean = check_feature_mean(feature_mean, self.config.feature_dim)
        self.feature_mean.copy_(mean.to(self.feature_mean.device, self.feature_mean.dtype))

    @property
    def n_train(self) -> int:
        return self.features.shape[0]

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.features[indices.to(self.features.device)]


class DiADMPipeline(DiffusionPipeline):
    """Sampling from a feature-conditioned model (:class:`~diadm.DiADMUNet2DModel` or a projection-conditioned
    :class:`~diffusers.UNet2DConditionModel` without cross-attention).

    Args:
        unet: the denoiser, trained on images scaled to [-1, 1].
        scheduler: any diffusers scheduler matching the model's training (DDPM, DDIM, EDM Euler, ...).
        feature_bank: :class:`DiADMFeatureBank`, a tensor [N, d] or a ``ReferenceBank`` (raw training features;
            the model normalises them).
        feature_mean: the centre of the conditions for a UNet2DConditionModel: the ``feature_mean`` it was trained
            with (stored in the bank, :meth:`DiADMFeatureBank.set_feature_mean`, so ``save_pretrained`` keeps it).
            A DiADMUNet2DModel uses its own ``feature_mean``; a different one here is refused.

    Calling ``pipeline(batch_size=b, generator=g, output_type="pt").images`` gives float32 images [b, C, H, W] in
    [0, 1] (the model's [-1, 1] output mapped by ``x / 2 + 0.5`` and clamped) -- directly usable as a sampler
    for :class:`irs_callbacks.IRSMonitor`. The bank indices of the last call are in ``last_condition_indices``.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler, feature_bank, feature_mean=None):
        super().__init__()
        if not isinstance(feature_bank, DiADMFeatureBank):
            feature_bank = DiADMFeatureBank.from_features(feature_bank)
        dim = feature_dim_of(unet)
        if feature_bank.config.feature_dim != dim:
            raise ValueError(f"feature_bank: features have dimension {feature_bank.config.feature_dim}, the unet "
                             f"expects feature_dim={dim}")
        if feature_mean is not None:
            feature_bank.set_feature_mean(feature_mean)
        if isinstance(unet, DiADMUNet2DModel) and bool(feature_bank.feature_mean.any()) and not torch.equal(
                feature_bank.feature_mean.cpu(), unet.feature_mean.float().cpu()):
            raise ValueError("feature_mean: a DiADMUNet2DModel centres its conditions with its own feature_mean; "
                             "give the centre to the model (set_feature_mean), not to the pipeline")
        self.register_modules(unet=unet, scheduler=scheduler, feature_bank=feature_bank)
        self.reset_cycle()
        self.last_condition_indices = None

    def as_irs_sampler(self, **options):
        """The sampler protocol of ``irs_callbacks.samplers.as_sampler``: a
        :class:`~diadm.sampler.DiADMSampler` over this pipeline (conditions fixed per global sample
        index); ``options`` as for ``DiADMSampler``."""
        from .sampler import DiADMSampler

        return DiADMSampler(self, **options)

    # -- conditions --------------------------------------------------------------------------------------------
    @property
    def feature_mean(self) -> torch.Tensor:
        """The centre of the conditions [d]: the model's own (DiADMUNet2DModel) or the bank's (other models)."""
        if isinstance(self.unet, DiADMUNet2DModel):
            return self.unet.feature_mean
        return self.feature_bank.feature_mean

    def reset_cycle(self, seed: int = 0) -> None:
        """Restart the "cycle" strategy: permutation ``k`` of the bank is drawn with seed ``seed + k``."""
        self._cycle_seed, self._cycle_epoch, self._cycle_pos, self._cycle_perm = int(seed), 0, 0, None

    def _next_cycle_indices(self, count: int) -> torch.Tensor:
        n = self.feature_bank.n_train
        out = []
        while count > 0:
            if self._cycle_perm is None or self._cycle_pos >= n:
                gen = torch.Generator().manual_seed(self._cycle_seed + self._cycle_epoch)
                self._cycle_perm, self._cycle_pos = torch.randperm(n, generator=gen), 0
                self._cycle_epoch += 1
            take = min(count, n - self._cycle_pos)
            out.append(self._cycle_perm[self._cycle_pos:self._cycle_pos + take])
            self._cycle_pos += take
            count -= take
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def draw_conditions(self, batch_size: int, condition_strategy: str = "cycle", generator=None,
                        perturb_scale: float = 0.1):
        """Bank indices [B] and conditions [B, d] for one batch.

        ``"cycle"`` walks seeded permutations of the whole bank (state kept across calls, see
        :meth:`reset_cycle`), so the first N draws use every training instance exactly once; ``"uniform"`` draws
        indices with replacement from ``generator``; ``"perturb"`` draws like "uniform" and adds noise so that the
        model's normalised condition is ``n + perturb_scale * noise`` (renormalised), ``n`` the normalised
        feature (:func:`~diadm.conditioning.normalize_features`, centred with :attr:`feature_mean`) and the
        noise standard normal: ``perturb_scale`` is the noise-to-signal ratio per entry (default 0.1). Conditions
        are returned in the raw feature space, like the bank's.
        """
        if condition_strategy not in CONDITION_STRATEGIES:
            raise ValueError(f"condition_strategy must be one of {CONDITION_STRATEGIES}, got {condition_strategy!r}")
        gen = generator[0] if isinstance(generator, list) else generator
        gen_device = gen.device if gen is not None else "cpu"
        n = self.feature_bank.n_train
        if condition_strategy == "cycle":
            indices = self._next_cycle_indices(batch_size)
        else:
            indices = torch.randint(n, (batch_size,), generator=gen, device=gen_device).cpu()
        features = self.feature_bank(indices).float()
        if condition_strategy == "perturb":
            if not perturb_scale >= 0:
                raise ValueError(f"perturb_scale must be >= 0, got {perturb_scale!r}")
            noise = torch.randn(features.shape, generator=gen, device=gen_device).to(features.device)
            centred = features - self.feature_mean.to(features.device, features.dtype)
            rms = centred.norm(dim=1, keepdim=True) / features.shape[1] ** 0.5  # normalised = centred / rms
            features = features + perturb_scale * rms * noise
        return indices, features

    def _predict(self, sample, t, features, guidance_scale):
        model_input = self.scheduler.scale_model_input(sample, t)
        mean = self.feature_mean  # a DiADMUNet2DModel centres with its own; conditional_forward ignores this one
        cond = conditional_forward(self.unet, model_input, t, features, feature_mean=mean)
        if guidance_scale == 1.0:
            return cond  # exactly the conditional prediction
        uncond = conditional_forward(self.unet, model_input, t, None, feature_mean=mean)
        return uncond + guidance_scale * (cond - uncond)

    # -- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, batch_size: int = 1, conditions: torch.Tensor | None = None, condition_strategy: str = "cycle",
                 guidance_scale: float = 1.0, num_inference_steps: int = 50, generator=None,
                 output_type: str = "pil", return_dict: bool = True, perturb_scale: float = 0.1):
        """Generate ``batch_size`` images.

        Args:
            conditions: explicit raw features [B, d] (then ``condition_strategy`` is not used).
            condition_strategy: "cycle" | "uniform" | "perturb" (see :meth:`draw_conditions`).
            guidance_scale: classifier-free guidance against the zero (unconditional) condition:
                ``uncond + g (cond - uncond)``; 1 is the plain conditional prediction (one model call per step).
                Needs a model trained with condition dropout for g != 1.
            output_type: "pil" (list of PIL images), "np" (float array [B, H, W, C] in [0, 1]) or "pt" (float32
                tensor [B, C, H, W] in [0, 1]).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if conditions is not None:
            conditions = check_features(conditions, feature_dim_of(self.unet), batch_size, name="conditions")
            self.last_condition_indices = None
        else:
            self.last_condition_indices, conditions = self.draw_conditions(
                batch_size, condition_strategy, generator, perturb_scale)
        device = self._execution_device
        conditions = conditions.to(device)

        cfg = self.unet.unet.config if isinstance(self.unet, DiADMUNet2DModel) else self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else (cfg.sample_size,) * 2
        shape = (batch_size, cfg.in_channels, *size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator: got a list of {len(generator)} generators for batch_size={batch_size}")
        image = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        image = image * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_output = self._predict(image, t, conditions, guidance_scale)
            image = self.scheduler.step(model_output, t, image, **step_kwargs).prev_sample

        image = (image.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
