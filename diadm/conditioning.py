"""Feature vectors as conditions ("pseudo-labels", IRS paper Sec. 3.5) for diffusers models.

Each training image's feature vector (dimension d = the extractor's ``dim``) replaces the class label of an
otherwise unconditional model. Two diffusers backbones are supported:

- :class:`~diffusers.UNet2DConditionModel`, config-native: ``class_embed_type="projection"`` with
  ``projection_class_embeddings_input_dim=d`` (an MLP from the feature to the time embedding); build or check the
  config with :func:`feature_class_embedding`;
- :class:`~diffusers.UNet2DModel`, wrapped by :class:`DiADMUNet2DModel` (the UNet with
  ``class_embed_type="identity"`` plus the same MLP projection, saved and loaded as one diffusers model).

Conventions: features are normalised by :func:`normalize_features` inside the forward pass; the all-zero vector is
the unconditional condition (it stays zero after normalisation), used by condition dropout and classifier-free
guidance. DiT (``DiTTransformer2DModel``) is not supported: its label embedder is an ``nn.Embedding`` of integer
classes duplicated inside every transformer block's adaLN-Zero norm, so a continuous condition would mean
replacing modules in every block (no config-native way).
"""

from __future__ import annotations

import math

import torch

from diffusers import ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.unets.unet_2d import UNet2DOutput

__all__ = [
    "normalize_features",
    "check_features",
    "check_feature_mean",
    "mean_of_features",
    "drop_conditions",
    "feature_class_embedding",
    "conditional_forward",
    "feature_dim_of",
    "DiADMUNet2DModel",
]


def check_features(features, feature_dim: int | None = None, batch_size: int | None = None,
                   name: str = "features") -> torch.Tensor:
    """Validate a condition batch: a float tensor [B, d] without NaN/inf (d = ``feature_dim`` when given)."""
    if not torch.is_tensor(features):
        raise TypeError(f"{name} must be a torch.Tensor [batch, feature_dim], got {type(features).__name__}")
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, feature_dim], got shape {tuple(features.shape)}")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise ValueError(f"{name} has feature dimension {features.shape[1]}, but the model expects "
                         f"feature_dim={feature_dim} (the feature extractor's dimension)")
    if batch_size is not None and features.shape[0] != batch_size:
        raise ValueError(f"{name} has {features.shape[0]} rows, expected one per sample ({batch_size})")
    if not features.is_floating_point():
        features = features.float()
    if not bool(torch.isfinite(features).all()):
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or inf values ({bad} of {features.shape[0]} rows)")
    return features


def mean_of_features(features: torch.Tensor, block_elements: int = 1 << 23) -> torch.Tensor:
    """The mean row [d] (float64) of ``features`` [N, d], summed in float64 block by block: a block of
    ``block_elements // d`` rows (64 MiB of float64) at a time, never a float64 copy of the whole bank (21 GB for
    ImageNet's 1,281,166 x 2048). A NaN or inf anywhere makes the mean non-finite."""
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"features must have shape [N >= 1, feature_dim], got shape {tuple(features.shape)}")
    rows = max(1, block_elements // max(1, features.shape[1]))
    total = torch.zeros(features.shape[1], dtype=torch.float64, device=features.device)
    for start in range(0, features.shape[0], rows):
        total += features[start:start + rows].sum(0, dtype=torch.float64)
    return total / features.shape[0]


def check_feature_mean(feature_mean, feature_dim: int, name: str = "feature_mean") -> torch.Tensor:
    """A centre of the conditions as a finite float tensor [feature_dim]: ``feature_mean`` is that mean, or
    training features [N, feature_dim] whose mean is taken (:func:`mean_of_features`, float64)."""
    mean = torch.as_tensor(feature_mean).detach()
    if mean.ndim == 2:
        if mean.shape[1] != feature_dim:
            raise ValueError(f"{name}: training features have dimension {mean.shape[1]}, but the model expects "
                             f"feature_dim={feature_dim} (the feature extractor's dimension)")
        mean = mean_of_features(mean if mean.is_floating_point() else mean.float())
    return check_features(mean.reshape(1, -1), feature_dim, 1, name=name)[0]


def normalize_features(features: torch.Tensor, eps: float = 1e-12, *, center: torch.Tensor | None = None) -> torch.Tensor:
    """Centre, L2-normalise each row, then scale by sqrt(d) so entries have unit RMS (as EDM2 scales its labels: a
    one-hot label times sqrt(d) has RMS 1). This makes the condition's scale independent of the extractor and keeps
    the projection's input O(1) entry-wise. A zero row (the unconditional condition) stays zero.

    ``center`` [d]: subtracted from every non-zero row first; use the mean of the training features. Extractor
    features share a large common component (non-negative pooled activations): for the random-init Inception on
    digits the mean cosine similarity between two different training images is 0.992, so without centring 99 % of
    every condition's energy is the same vector and the per-image part is ~9 % of its RMS -- too weak a signal for
    the model to pick up in practice. Centring keeps the extractor's Euclidean geometry (a translation)."""
    features = check_features(features)
    if center is not None:
        center = check_features(torch.as_tensor(center).reshape(1, -1), features.shape[1], 1, name="center")[0]
        conditioned = features.ne(0).any(dim=1, keepdim=True)
        features = torch.where(conditioned, features - center.to(features.device, features.dtype), features)
    norm = features.norm(dim=1, keepdim=True).clamp_min(eps)
    return features / norm * math.sqrt(features.shape[1])


def drop_conditions(features: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Condition dropout: replace each row by the zero vector (unconditional) with probability ``p``. Training
    with ``p > 0`` (e.g. 0.1) makes unconditional sampling and classifier-free guidance possible."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"condition dropout probability p must be in [0, 1], got {p!r}")
    if p == 0.0:
        return features
    gen_device = generator.device if generator is not None else features.device
    keep = torch.rand(features.shape[0], generator=generator, device=gen_device) >= p
    return features * keep.to(features.device, features.dtype).unsqueeze(1)


# -- UNet2DConditionModel: config-native projection ------------------------------------------------------------------
def feature_class_embedding(config: dict | None = None, feature_dim: int | None = None, **overrides) -> dict:
    """Return a :class:`~diffusers.UNet2DConditionModel` config (dict) whose class embedding takes
    ``feature_dim``-dimensional features: ``class_embed_type="projection"``,
    ``projection_class_embeddings_input_dim=feature_dim``. ``config`` may be a dict or a model ``.config``; a
    config that already uses other class conditioning (integer classes, another input dimension) is refused.

    Example: ``UNet2DConditionModel(**feature_class_embedding(dict(sample_size=32, ...), feature_dim=2048))``.
    """
    if not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError(f"feature_dim must be a positive int (the extractor's dimension), got {feature_dim!r}")
    cfg = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}
    cfg.update(overrides)
    if cfg.get("num_class_embeds") is not None:
        raise ValueError("config: num_class_embeds is set (integer class labels); remove it for feature conditioning")
    embed_type = cfg.get("class_embed_type")
    if embed_type not in (None, "projection"):
        raise ValueError(f"config: class_embed_type={embed_type!r} conflicts with feature conditioning "
                         f"(needs 'projection')")
    given = cfg.get("projection_class_embeddings_input_dim")
    if embed_type == "projection" and given not in (None, feature_dim):
        raise ValueError(f"config: projection_class_embeddings_input_dim={given} differs from feature_dim={feature_dim}")
    cfg.update(class_embed_type="projection", projection_class_embeddings_input_dim=feature_dim)
    return cfg


def _has_cross_attention(unet: UNet2DConditionModel) -> bool:
    blocks = [*unet.config.down_block_types, *unet.config.up_block_types, unet.config.mid_block_type or ""]
    return any("CrossAttn" in b for b in blocks)


def feature_dim_of(model) -> int:
    """The feature dimension a feature-conditioned model expects (ValueError if it is not one)."""
    if isinstance(model, DiADMUNet2DModel):
        return model.config.feature_dim
    if isinstance(model, UNet2DConditionModel):
        if model.config.class_embed_type != "projection" or model.config.projection_class_embeddings_input_dim is None:
            raise ValueError("model: UNet2DConditionModel needs class_embed_type='projection' and "
                             "projection_class_embeddings_input_dim=feature_dim (see feature_class_embedding)")
        return model.config.projection_class_embeddings_input_dim
    raise TypeError(f"model must be a DiADMUNet2DModel or a projection-conditioned UNet2DConditionModel, "
                    f"got {type(model).__name__}")


def conditional_forward(model, sample: torch.Tensor, timestep, features: torch.Tensor | None, *,
                        encoder_hidden_states: torch.Tensor | None = None, condition_dropout: float = 0.0,
                        generator: torch.Generator | None = None, normalize: bool = True,
                        feature_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Run a feature-conditioned model and return its prediction tensor.

    ``features`` [B, d] raw extractor features (normalised here with :func:`normalize_features` unless
    ``normalize=False``) or ``None`` for the unconditional (zero) condition. ``condition_dropout`` drops rows to
    zero (training). A :class:`DiADMUNet2DModel` centres with its own ``feature_mean``; for a UNet2DConditionModel
    pass the training features' mean as ``feature_mean`` (in training and sampling alike; ``DiADMPipeline`` takes
    it as ``feature_mean=`` and keeps it in its feature bank). For a
    UNet2DConditionModel without cross-attention blocks ``encoder_hidden_states`` may be None; with
    cross-attention it must be given.
    """
    dim = feature_dim_of(model)
    if features is None:
        features = sample.new_zeros(sample.shape[0], dim)
    features = check_features(features, dim, sample.shape[0])
    if isinstance(model, DiADMUNet2DModel):  # raw zero rows normalise to zero: drop first, the model normalises
        features = drop_conditions(features, condition_dropout, generator)
        return model(sample, timestep, features, normalize=normalize).sample
    features = normalize_features(features, center=feature_mean) if normalize else features
    features = drop_conditions(features, condition_dropout, generator)
    if encoder_hidden_states is None and _has_cross_attention(model):
        raise ValueError("encoder_hidden_states: this UNet2DConditionModel has cross-attention blocks and needs "
                         "encoder_hidden_states; use DownBlock2D/UpBlock2D/UNetMidBlock2D for feature-only conditioning")
    return model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                 class_labels=features.to(sample.dtype)).sample


# -- UNet2DModel: wrapper with its own config ---------------------------------------------------------------------------
def _plain(value):
    """Config values as JSON gives them back (tuples -> lists), so a reloaded config compares equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class DiADMUNet2DModel(ModelMixin, ConfigMixin):
    """A :class:`~diffusers.UNet2DModel` conditioned on feature vectors (pseudo-labels).

    The condition ``normalize_features(f, center=feature_mean)`` [B, feature_dim] goes through a ``TimestepEmbedding`` MLP
    (Linear-SiLU-Linear, as UNet2DConditionModel's "projection") to the time-embedding width and is added to the
    time embedding (the UNet runs with ``class_embed_type="identity"``). Config: ``unet_config`` (the UNet2DModel config,
    a dict), ``feature_dim``, ``condition_dropout`` (probability of the zero condition per sample, applied only in
    ``train()`` mode, like DiT's label dropout). ``feature_mean`` [feature_dim]: the mean of the training
    features, subtracted before normalising (see :func:`normalize_features`: without it the common component of
    extractor features drowns the per-image signal); kept as a buffer, not in the config. Give it here, e.g.
    ``feature_mean=PseudoLabelDataset(...).feature_mean``, or later with :meth:`set_feature_mean`; zeros (the
    default) mean no centring. ``save_pretrained``/``from_pretrained`` round-trip all weights and the mean.
    """

    config_name = "config.json"
    ignore_for_config = ["feature_mean"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, unet_config: dict | None = None, feature_dim: int = 2048, condition_dropout: float = 0.0,
                 feature_mean: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int (the extractor's dimension), got {feature_dim!r}")
        if not 0.0 <= condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1], got {condition_dropout!r}")
        unet_config = {k: v for k, v in dict(unet_config or {}).items() if not k.startswith("_")}
        if unet_config.get("num_class_embeds") is not None or unet_config.get("class_embed_type") not in (None, "identity"):
            raise ValueError("unet_config: the UNet2DModel config must not use its own class conditioning "
                             "(num_class_embeds / class_embed_type); DiADMUNet2DModel adds the feature projection")
        unet_config.update(class_embed_type="identity", num_class_embeds=None)
        self.register_to_config(unet_config=_plain(unet_config))
        self.unet = UNet2DModel(**unet_config)
        time_embed_dim = self.unet.time_embedding.linear_2.out_features
        self.feature_projection = TimestepEmbedding(feature_dim, time_embed_dim)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        if feature_mean is not None:
            self.set_feature_mean(feature_mean)

    def set_feature_mean(self, feature_mean) -> None:
        """Set the centre of the conditions: a [feature_dim] mean, or training features [N, feature_dim] (their
        mean is taken in float64)."""
        mean = check_feature_mean(feature_mean, self.config.feature_dim)
        self.feature_mean.copy_(mean.to(self.feature_mean.device, self.feature_mean.dtype))

    @classmethod
    def from_unet(cls, unet: UNet2DModel, feature_dim: int, condition_dropout: float = 0.0,
                  feature_mean: torch.Tensor | None = None) -> "DiADMUNet2DModel":
        """Wrap an existing unconditional UNet2DModel (its weights are copied; the projection is new)."""
        if not isinstance(unet, UNet2DModel):
            raise TypeError(f"unet must be a diffusers UNet2DModel, got {type(unet).__name__}")
        model = cls(unet_config=dict(unet.config), feature_dim=feature_dim, condition_dropout=condition_dropout,
                    feature_mean=feature_mean)
        missing, unexpected = model.unet.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or any(not k.startswith("class_embedding") for k in missing):
            raise ValueError(f"unet: weights do not fit (missing {missing}, unexpected {unexpected})")
        return model.to(unet.device, unet.dtype)

    def forward(self, sample: torch.Tensor, timestep, features: torch.Tensor | None = None, *,
                normalize: bool = True, return_dict: bool = True):
        """``features`` [B, feature_dim] raw features (normalised here unless ``normalize=False``) or None for
        the unconditional condition. Returns ``UNet2DOutput(sample=...)`` like UNet2DModel."""
        dim = self.config.feature_dim
        if features is None:
            features = sample.new_zeros(sample.shape[0], dim)
        features = check_features(features, dim, sample.shape[0])
        if normalize:
            features = normalize_features(features, center=self.feature_mean)
        if self.training and self.config.condition_dropout > 0:
            features = drop_conditions(features, self.config.condition_dropout)
        class_emb = self.feature_projection(features.to(self.feature_projection.linear_1.weight.dtype))
        out = self.unet(sample, timestep, class_labels=class_emb).sample
        return UNet2DOutput(sample=out) if return_dict else (out,)
