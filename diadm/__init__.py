"""Diversity-Aware Diffusion Models (DiADM) for diffusers.

- :class:`DetailedBalanceNoiseSampler` -- the detailed-balance noise-level distribution
  (detailed-balance paper, Eq. 5) replacing diffusers' uniform timesteps / EDM's log-normal sigmas;
- conditioning adapters feeding training-image features as pseudo-labels (IRS paper, Sec. 3.5);
- :class:`DiADMPipeline` -- sampling that draws those conditions;
- the N3 rejection sampler (detailed-balance paper, Algorithm 1).

``diadm`` may use :mod:`irs_callbacks` (features, banks); never the reverse.
Names are loaded lazily so ``import diadm`` stays cheap.
"""

from importlib import import_module

_LAZY = {
    "DetailedBalanceNoiseSampler": "noise",
    "edm_precondition": "noise",
    "add_noise_at_sigma": "noise",
    "normalize_features": "conditioning",
    "DiADMUNet2DModel": "conditioning",
    "feature_class_embedding": "conditioning",
    "PseudoLabelDataset": "dataset",
    "DiADMPipeline": "pipeline",
    "DiADMFeatureBank": "pipeline",
    "DiADMSampler": "sampler",
    "conditional_forward": "conditioning",
    "drop_conditions": "conditioning",
    "check_features": "conditioning",
    "scheduler_sigmas": "noise",
    "N3RejectionSampler": "n3",
}

__all__ = list(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diadm' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
